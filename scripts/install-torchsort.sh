#!/usr/bin/env bash
# Build torchsort (sdist only, no wheels) against the torch already installed in the given Python.
# pip's isolated build cannot see that torch, hence --no-build-isolation. When nvcc is on PATH the
# build also compiles the CUDA kernels and needs CUDA_HOME and TORCH_CUDA_ARCH_LIST; we find them.
set -euo pipefail
PY=${1:?usage: install-torchsort.sh PYTHON [VERSION]}
VERSION=${2:-0.1.10}
if "$PY" -c "import torchsort" 2>/dev/null; then
  echo "torchsort already installed"; exit 0
fi
if command -v nvcc >/dev/null 2>&1; then
  if [ -z "${CUDA_HOME:-}" ]; then
    # nvcc may be a wrapper script; look for the toolkit folder whose bin/ holds the real nvcc.
    cand="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    if [ ! -f "$cand/include/cuda_runtime.h" ]; then
      cand="$(grep -o '/[^ "]*/bin/nvcc' "$(command -v nvcc)" 2>/dev/null | head -1 | xargs -r dirname | xargs -r dirname || true)"
    fi
    if [ -z "$cand" ] || [ ! -f "$cand/include/cuda_runtime.h" ]; then
      cand="$(ls -d /usr/local/cuda /usr/local/cuda-* 2>/dev/null | while read -r d; do [ -x "$d/bin/nvcc" ] && echo "$d"; done | head -1)"
    fi
    if [ -n "$cand" ]; then export CUDA_HOME="$cand"; fi
  fi
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
  echo "building torchsort with CUDA (CUDA_HOME=${CUDA_HOME:-unset}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
else
  echo "building torchsort CPU-only (no nvcc on PATH)"
fi
"$PY" -m pip install --no-build-isolation "torchsort==$VERSION"
"$PY" -c "import torchsort, torch; print('torchsort OK:', torchsort.soft_rank(torch.tensor([[3.0, 1.0, 2.0]])).tolist())"
