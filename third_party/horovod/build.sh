#!/usr/bin/env bash
# Build Horovod for this virtual environment's PyTorch and install it (make horovod runs this).
#   third_party/horovod/build.sh [--wheel-only] PYTHON
# --wheel-only builds the wheel into the cache and leaves the environment as it is: it needs only
# PyTorch, setuptools and wheel installed, so `make test` builds while the rest installs.
# Horovod 0.28.1 (its last release) as published does not compile against PyTorch 2.x, whose
# headers require C++20: the sdist from the package registry is patched with the patches
# beside this script, then built with PyTorch and Gloo only (no TensorFlow, MXNet or MPI).
#
# Variant (HOROVOD_VARIANT=auto|cpu|gpu, default auto):
#   gpu  NCCL operations for CUDA tensors, against the NCCL that PyTorch's wheels bring.
#        Needs a complete CUDA toolkit (nvcc, headers, cudart); the Dockerfile builds this one.
#   cpu  Gloo only. partial-cuda-toolkit.patch lets a CUDA build of PyTorch build it where the
#        toolkit is partial (nvcc without the runtime) instead of failing to link cudart.
#   auto gpu where the toolkit is complete, else cpu.
# The wheel is cached in the user's cache (HOROVOD_WHEEL_CACHE, default ~/.cache/dcgan/horovod),
# named after Horovod, PyTorch, the variant and the patches, so a rebuilt .venv, or a new clone
# on the same machine (CI), reinstalls it in seconds; a change to any of them builds anew.
set -euo pipefail

wheel_only=false
if [ "${1:-}" = --wheel-only ]; then wheel_only=true; shift; fi
python=${1:?usage: build.sh [--wheel-only] PYTHON}
here=$(cd "$(dirname "$0")" && pwd)
cache=${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dcgan/horovod}
version=0.28.1
patches=("$here/cxx20.patch" "$here/partial-cuda-toolkit.patch" "$here/no-debug-info.patch")

cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
toolkit_is_complete() {
    [ -x "$cuda_home/bin/nvcc" ] && [ -f "$cuda_home/include/cuda_runtime_api.h" ] &&
        compgen -G "$cuda_home/lib*/libcudart.so*" >/dev/null
}
variant=${HOROVOD_VARIANT:-auto}
if [ "$variant" = auto ]; then
    if toolkit_is_complete; then variant=gpu; else variant=cpu; fi
fi
case $variant in
    cpu | gpu) ;;
    *) echo "HOROVOD_VARIANT must be auto, cpu or gpu, not '$variant'" >&2; exit 2 ;;
esac
if [ "$variant" = gpu ] && ! toolkit_is_complete; then
    echo "HOROVOD_VARIANT=gpu needs a complete CUDA toolkit (nvcc, cuda_runtime_api.h, libcudart) under $cuda_home; set CUDA_HOME" >&2
    exit 2
fi

torch_version=$("$python" -c 'import torch; print(torch.__version__.split("+")[0])')
patch_digest=$(cat "${patches[@]}" | sha256sum | cut -c1-8)
local_version="torch${torch_version}.${variant}.p${patch_digest}"   # PEP 440 local version
wheel=$(compgen -G "$cache/horovod-$version+$local_version-*.whl" | head -n1 || true)

if [ -z "$wheel" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "building Horovod $version ($variant variant, PyTorch $torch_version): a few minutes, once"
    "$python" -m pip download --quiet --no-deps --no-binary=:all: "horovod==$version" -d "$work"
    tar -xzf "$work/horovod-$version.tar.gz" -C "$work"
    for patch in "${patches[@]}"; do patch --quiet -p1 -d "$work/horovod-$version" < "$patch"; done
    # --no-build-isolation builds with these; installed only where missing (another pip may be
    # installing into this environment meanwhile: make test).
    "$python" -c 'import setuptools, wheel; assert int(setuptools.__version__.split(".")[0]) >= 61' 2>/dev/null ||
        "$python" -m pip install --quiet "setuptools>=61" wheel
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        HOROVOD_WITHOUT_MPI=1 HOROVOD_LOCAL_VERSION="$local_version" MAKEFLAGS="-j$(nproc)"
    if [ "$variant" = gpu ]; then
        # PyTorch's own NCCL (the nvidia-nccl wheel), so both libraries share one libnccl.so.2.
        nccl=$("$python" -c 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])')
        mkdir -p "$work/nccl-lib" && ln -s "$nccl/lib/libnccl.so.2" "$work/nccl-lib/libnccl.so"  # the name the linker looks for
        export CUDA_HOME="$cuda_home" HOROVOD_CUDA_HOME="$cuda_home" HOROVOD_GPU_OPERATIONS=NCCL \
            HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$work/nccl-lib" HOROVOD_NCCL_LINK=SHARED
    fi
    # Without build isolation: Horovod's build imports this environment's torch.
    "$python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$work/dist" "$work/horovod-$version"
    mkdir -p "$cache"
    cp "$work"/dist/horovod-*.whl "$cache/"
    wheel=$(compgen -G "$cache/horovod-$version+$local_version-*.whl" | head -n1)
fi
if $wheel_only; then echo "cached $wheel"; exit 0; fi
"$python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
"$python" -m pip install --quiet "cloudpickle" "psutil" "pyyaml" "packaging"  # Horovod's own requirements
"$python" -c 'import horovod.torch as hvd; assert hvd.gloo_built(), "Horovod was built without Gloo"'
echo "installed $(basename "$wheel")"
