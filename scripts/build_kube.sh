#!/usr/bin/env bash
# Idempotent: builds the tests' Kubernetes control plane into .tools/bin from the Go module proxy:
# kube-apiserver and kube-controller-manager (deploy/kube, a wrapper module pinned by its go.sum)
# and kine (etcd API over SQLite). A cold build takes about 20 CPU-minutes; a relink seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.tools/bin
KUBE_VERSION=v1.35.4
KINE_VERSION=v0.17.5
mkdir -p "$BIN"

# The binaries report the version stamped into them; unstamped they say v0.0.0-master, and helm
# refuses charts whose kubeVersion constraint that fails.
kube_ok() {
  [ -x "$BIN/$1" ] && [ "$("$BIN/$1" --version 2>/dev/null)" = "Kubernetes $KUBE_VERSION" ]
}

if ! kube_ok kube-apiserver || ! kube_ok kube-controller-manager; then
  major=${KUBE_VERSION#v}; major=${major%%.*}
  minor=${KUBE_VERSION#v*.}; minor=${minor%%.*}
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean"
  done
  echo "build_kube: building kube-apiserver, kube-controller-manager $KUBE_VERSION (slow the first time)" >&2
  # One go build for both: they share most packages. Static, like the upstream release binaries.
  (cd deploy/kube && CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "$ldflags" \
    -o "$BIN/" ./cmd/kube-apiserver ./cmd/kube-controller-manager)
  kube_ok kube-apiserver && kube_ok kube-controller-manager \
    || { echo "build_kube: built binaries do not report $KUBE_VERSION" >&2; exit 1; }
fi

# kine stores the API server's data in SQLite (cgo).
if [ ! -x "$BIN/kine" ] || ! go version -m "$BIN/kine" | grep -q "mod[[:space:]]*github.com/k3s-io/kine[[:space:]]*${KINE_VERSION}"; then
  echo "build_kube: building kine $KINE_VERSION" >&2
  CGO_ENABLED=1 GOBIN=$BIN go install -trimpath "github.com/k3s-io/kine@${KINE_VERSION}"
fi
