#!/usr/bin/env bash
# The wheels the GPU check carries to a GPU machine without package access, in .whl/ of the project root (the
# device tool's carry: [".whl"]; at most 64 MiB together with the working tree). Run from anywhere in the repository:
#   benchmarks/gpu/fetch-wheels.sh
# 1. ../shared/gpu/fetch-wheels.sh: trl 1.16, datasets 5.2, bitsandbytes 0.50.2, transformers 5.23, peft 0.21.2,
#    dill, multiprocess (57 MB), unless already there;
# 2. the bitsandbytes wheel slimmed to its CUDA 12.6-13.2 and CPU libraries (benchmarks/gpu/slim_wheel.py);
# 3. .whl/compat/: what transformers 5.23 checks at import (tokenizers 0.23, huggingface-hub >= 1.31 and its needs,
#    safetensors 0.8, regex), what datasets 5.2 needs (xxhash, fsspec <= 2026.9) and accelerate 1.15 (trl-sstoken's
#    minimum), which an image with an older transformers may lack. The device command does not install these blindly: benchmarks/gpu/wheels.py installs
#    only those whose requirement the image does not meet.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
if ! ls .whl/trl-*.whl >/dev/null 2>&1; then
  ../shared/gpu/fetch-wheels.sh
fi
grep -qx '/.whl/' .gitignore 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
python3 benchmarks/gpu/slim_wheel.py .whl/bitsandbytes-*.whl
mkdir -p .whl/compat
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl/compat "huggingface_hub==2.4.0" "tokenizers==0.23.3" "safetensors==0.8.0" "fsspec==2026.9.0" regex xxhash
# accelerate without its requirements (they would bring torch and its CUDA libraries); psutil, which it needs and
# the image has (peft needs it too), is checked like every other requirement
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl/compat "accelerate==1.15.0"
du -sh .whl .whl/compat
tree_bytes=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
whl_bytes=$(du -sb .whl | cut -f1)
echo "carry: .whl $((whl_bytes / 1048576)) MiB + tracked tree $((tree_bytes / 1048576)) MiB (limit 64 MiB)"
