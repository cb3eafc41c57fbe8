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

# --- runtime -----------------------------------------------------------------------------------
FROM rayproject/ray:2.60.0-py311-gpu
COPY --from=build --chown=1000:100 /tmp/wheels /tmp/wheels
# tensorflow[and-cuda] brings TensorFlow's CUDA 12 libraries as wheels (plain `tensorflow` finds
# none and trains on the CPU); torch brings its own CUDA 13 ones. pip resolves the two sets side
# by side (a dry-run resolve of this line finds no conflict). The node's driver must support CUDA 13.
# The eval and export extras (torchmetrics, onnx...) at the versions the test suite ran with.
RUN pip install --no-cache-dir /tmp/wheels/*.whl \
        "ray[default,train]==2.60.0" "torch==2.14.1" "torchvision==0.29.1" "tensorflow[and-cuda]==2.21.0" \
        "torchmetrics==1.9.0" "torch-fidelity==0.4.0" "scipy==1.17.1" "safetensors==0.8.0" \
        "onnx==1.23.2" "onnxruntime==1.32.0" \
    && rm -rf /tmp/wheels
WORKDIR /app
COPY --chown=1000:100 configs ./configs
# The base image's `ray` user, by number, so Kubernetes can verify runAsNonRoot.
USER 1000:100
ENV HOME=/tmp/home XDG_CACHE_HOME=/tmp/cache KERAS_HOME=/tmp/keras MPLCONFIGDIR=/tmp/matplotlib
ENTRYPOINT ["dcgan"]
CMD ["--help"]
