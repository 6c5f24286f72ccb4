#!/usr/bin/env bash
# Runs every test of wsrelay on a Debian/Ubuntu machine that has Rust.
# Installs what the tests need when it is missing (redis-server, nginx, Node.js with
# npm and Chromium from Debian's packages; the browser tests' npm packages), then runs
# the unit and integration tests (extra arguments go to `cargo test`), then the
# JavaScript client's tests and the browser tests (`node --test`, against the debug
# binary).
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server for every Redis test (redis-sentinel and redis-cli for the failover
# tests), nginx for the local cluster behind a load
# balancer, Node.js and Chromium for the pages.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing+=(chromium)
python3 -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]} (Debian packages)" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian installs nginx in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin"

# The Python example client's test needs `websockets`, and the example backend's
# (tests/backend.rs) Flask as its requirements.txt pins it, from PyPI, in a venv of
# their own.
if [ ! -x .cache/pyenv/bin/python ] || ! .cache/pyenv/bin/python -c "import websockets, flask" 2>/dev/null; then
  echo "test.sh: installing websockets and Flask (PyPI) into .cache/pyenv" >&2
  python3 -m venv .cache/pyenv
  .cache/pyenv/bin/pip install --quiet 'websockets==15.0.1' -r examples/backend/requirements.txt
fi
export WSRELAY_PYTHON="$PWD/.cache/pyenv/bin/python"

cargo test --locked "$@"

# The JavaScript suites drive the binary cargo test built: the client's (with its
# type check, and a lint: tsc checking the JavaScript itself) and the browser tests (playwright-core only talks to the system's
# Chromium; it downloads no browser).
cargo build --locked --bin wsrelay
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm run --silent typecheck && npm run --silent lint && node --test test/)
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error && node --test)
