#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 toolchain wheels (nvcc, cudart, CCCL) from PyPI into .cuda-toolchain/
# inside the project. build.rs finds nvcc there when CUDA_HOME and PATH have none.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.cuda-toolchain"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88
cu13=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
# The wheels ship libcudart.so.13 but not the unversioned name the linker looks for.
if [[ -f "$cu13/lib/libcudart.so.13" && ! -e "$cu13/lib/libcudart.so" ]]; then
  ln -s libcudart.so.13 "$cu13/lib/libcudart.so"
fi
ln -sfn "$cu13" "$venv/cuda"
echo "CUDA toolchain: $venv/cuda/bin/nvcc"
"$venv/cuda/bin/nvcc" --version | tail -2
