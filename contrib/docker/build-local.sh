#!/usr/bin/env bash
# Build the relay image where no image registry is reachable: a Debian
# bookworm base made with debootstrap from Debian's packages, imported into
# podman, then the Dockerfile on top of it. Usage (root):
#   contrib/docker/build-local.sh [TAG]        (default tag: localhost/relay:latest)
# Needs: debootstrap, podman, buildah (apt-get install debootstrap podman buildah).
# RUN steps use chroot isolation and the host's network and CA bundle, so the
# build also works inside a container without cgroup delegation or behind a
# TLS-intercepting proxy.
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:-localhost/relay:latest}
base=localhost/relay-base:bookworm
if ! podman image exists "$base"; then
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import - "$base" >/dev/null
fi
ca=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  ca=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
fi
podman build -q --format docker --isolation=chroot --network=host "${ca[@]}" \
  --build-arg BASE="$base" -t "$tag" -f Dockerfile . >/dev/null
echo "$tag"
