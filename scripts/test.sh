#!/usr/bin/env bash
# Runs every test of wsrelay on a Debian/Ubuntu machine that has Rust.
# Installs what the tests need when it is missing (redis-server, from Debian's
# packages), then runs unit and integration tests. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "test.sh: installing redis-server (Debian package)" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi

exec cargo test --locked "$@"
