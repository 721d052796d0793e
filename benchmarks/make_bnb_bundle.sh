#!/bin/sh
# Builds .bnb/ in the project root: bitsandbytes for the GPU machines (torch 2.11 + CUDA 13.0,
# Python 3.12, no network there), to travel beside .devbundle/. The wheel (43 MB) holds a library
# per CUDA and ROCm version; only the CUDA 13.0 one (and the CPU one) is kept, ~6 MB installed.
# Use there:  export PYTHONPATH="$PWD/.bnb/site:$PYTHONPATH"
#   sh benchmarks/make_bnb_bundle.sh                  # downloads the wheel with pip
#   sh benchmarks/make_bnb_bundle.sh path/to/bitsandbytes-0.50.2-...whl
set -e
cd "$(dirname "$0")/.."
VERSION=0.50.2
rm -rf .bnb
mkdir -p .bnb/wheel
if [ -n "$1" ]; then
    cp "$1" .bnb/wheel/
else
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 -d .bnb/wheel "bitsandbytes==$VERSION"
fi
python3 -m zipfile -e .bnb/wheel/bitsandbytes-*.whl .bnb/site
find .bnb/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda130.so' \
    ! -name 'libbitsandbytes_cpu.so' -delete
rm -rf .bnb/wheel
du -sh .bnb
