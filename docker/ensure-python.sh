#!/bin/sh
# ensure-python [venv]: make sure the base image has a python3 (and, with "venv", its venv module).
# The official python images have both, and so has the Debian base that docker/ci.sh builds;
# NVIDIA CUDA runtime images and plain Debian/Ubuntu images get them from apt here.
set -eu
want_venv=${1:-}
if command -v python3 >/dev/null 2>&1 && { [ -z "$want_venv" ] || python3 -c 'import ensurepip, venv' 2>/dev/null; }; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-python: no python3 in the base image and no apt-get to install it" >&2
    exit 1
fi
pkgs="python3"
[ -n "$want_venv" ] && pkgs="python3 python3-venv"
export DEBIAN_FRONTEND=noninteractive
apt-get update
# shellcheck disable=SC2086
apt-get install -y --no-install-recommends $pkgs
rm -rf /var/lib/apt/lists/*
