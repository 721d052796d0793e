#!/usr/bin/env bash
# Builds .bnb/bitsandbytes.tar.xz in the current directory (run it from the project root): the
# bitsandbytes package for a GPU machine without it, small enough to travel with .devbundle/.
#
# Why: the wheel (~125 MB installed) holds a CUDA library for every CUDA and ROCm release; a torch
# built for CUDA 13.0 loads only libbitsandbytes_cuda130.so (4 MB). Keeping it, the CPU library
# and the Python files packs to a few MB. Its needs (torch, numpy, packaging) are on the machine.
#
# Use in a device run:   carry [".devbundle", ".bnb"], and after `source .devbundle/setup.sh`:
#                        tar -C /tmp/site -xJf .bnb/bitsandbytes.tar.xz
set -euo pipefail
version=${1:-0.50.2}
out=.bnb
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 -d "$tmp" "bitsandbytes==$version"
mkdir "$tmp/t" && (cd "$tmp/t" && python3 -m zipfile -e "$tmp"/bitsandbytes-*.whl .)
find "$tmp/t/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete
tar -C "$tmp/t" -cf - . | xz -T0 -6 > "$out/bitsandbytes.tar.xz"
ls -la "$out"
