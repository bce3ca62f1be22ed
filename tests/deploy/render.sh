#!/usr/bin/env bash
# Renders deploy/ with the real kustomize (`kubectl kustomize deploy/`) and
# runs tests/deploy_manifests.rs on the rendered output: every object typed by
# k8s-openapi with no unknown field, the same objects as the files list.
# Installs kubectl when it is missing (Debian 12, as root: the
# `kubernetes-client` package; its kubectl 1.20 embeds kustomize v2, enough for
# this plain resource list), then an overlay with kustomize's `namespace:`
# (nothing may be left in `default`).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v kubectl >/dev/null 2>&1; then
  echo "== installing kubectl (Debian kubernetes-client)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null
fi
kubectl version --client 2>/dev/null | head -2 || true
mkdir -p target
rendered="$PWD/target/deploy-rendered.yaml"
kubectl kustomize deploy/ >"$rendered"
echo "rendered $(grep -c '^kind:' "$rendered") objects: $(grep '^kind:' "$rendered" | awk '{print $2}' | sort | uniq -c | awk '{printf "%s %s, ", $1, $2}')"
SDGATE_RENDERED="$rendered" cargo test --test deploy_manifests kubectl_kustomize 2>&1
