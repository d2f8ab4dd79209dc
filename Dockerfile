# embedrpc server image: CUDA 13 + cuDNN 9 runtime, the model mounted at /models or
# downloaded at start, `embedrpc serve` as the entrypoint.
#
#   docker build -t embedrpc .
#   docker run --gpus all -p 50051:50051 -v /srv/Qwen3-Embedding-0.6B-onnx:/models:ro embedrpc
#   docker run --gpus all -p 50051:50051 -v hf-cache:/cache \
#       -e EMBEDRPC_MODEL=onnx-community/Qwen3-Embedding-0.6B-ONNX embedrpc   # fetched at start
#   docker run -p 50051:50051 embedrpc --model demo --device cpu             # no GPU, demo model
#
# Flags go after the image name or in EMBEDRPC_* variables (`embedrpc serve --help`).
# A CPU-only image, about 3 GB smaller, from the same file:
#   docker build --build-arg BASE_IMAGE=ubuntu:24.04 -t embedrpc:cpu .
#
# Why a CUDA base image: the onnxruntime-gpu wheel (1.31, CUDA 13 build) links against
# the CUDA 13 runtime, cuBLAS/cuBLASLt, cuFFT, cuRAND and cuDNN 9 but does not ship
# them. NVIDIA's cudnn-runtime image has exactly these as system libraries on the
# loader's path, built and tested together; only the driver (libcuda) comes from the
# host, through the NVIDIA container toolkit (`--gpus`, or the Kubernetes device
# plugin). The alternative, `pip install onnxruntime-gpu[cuda,cudnn]` (the nvidia-*-cu13
# wheels, found by onnxruntime.preload_dlls(), which the worker calls), gives an image of
# about the same size but needs NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES set
# by hand and pins the CUDA libraries through pip; the base image is the simpler of the
# two. CUDA 13.x minor versions are interchangeable for a build made with any 13.x
# (NVIDIA's minor version compatibility); the host driver must support CUDA 13 (580+).
ARG BASE_IMAGE=nvidia/cuda:13.1.1-cudnn-runtime-ubuntu24.04

# ---- build: a virtualenv with embedrpc and its dependencies (all binary wheels) ----
FROM ${BASE_IMAGE} AS build
# Optional extras: "hub" downloads models by Hugging Face id at start; "" for none.
ARG EXTRAS=hub
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's python3 (3.12 on 24.04), the same package the runtime stage installs, so the
# virtualenv's interpreter link stays valid there. Versions follow the base image's
# release (not pinned one by one).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY server ./server
COPY client ./client
# The versions are pyproject.toml's; pip itself is left behind with the build stage.
RUN /opt/venv/bin/pip install --no-cache-dir ".${EXTRAS:+[${EXTRAS}]}" \
    && /opt/venv/bin/pip uninstall --yes pip

# ---- runtime: the base image, Python, the virtualenv; no compiler, pip or sources ----
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 embedrpc \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/embedrpc --create-home \
        --shell /usr/sbin/nologin embedrpc \
    && mkdir -p /models /cache \
    && chown 10001:10001 /cache
COPY --from=build /opt/venv /opt/venv

# Every serve flag reads EMBEDRPC_<FLAG>: override with `-e` or flags after the image.
# EMBEDRPC_MODEL: a directory (mount it at /models) or a Hugging Face id (downloaded
# into HF_HOME at start; mount a volume at /cache to keep it across restarts).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    EMBEDRPC_MODEL=/models \
    EMBEDRPC_HOST=0.0.0.0 \
    EMBEDRPC_PORT=50051

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/embedrpc
EXPOSE 50051

# The gRPC health service: SERVING once every worker has answered a warm-up batch,
# NOT_SERVING while no worker is alive or during shutdown. Loading a large model (or
# downloading it) takes a while, hence the start period. The port follows EMBEDRPC_PORT;
# with TLS or --auth-health on, give the check EMBEDRPC_TLS_CA / EMBEDRPC_API_KEY.
# Shell form on purpose, to expand ${EMBEDRPC_PORT} (DL3025 is about signal delivery to
# CMD/ENTRYPOINT, which does not apply to a health check).
# hadolint ignore=DL3025
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD embedrpc health --target "localhost:${EMBEDRPC_PORT}" --timeout 4 > /dev/null || exit 1

# `embedrpc serve` runs as PID 1: it handles SIGTERM itself (health NOT_SERVING, in-flight
# calls finish within --grace-seconds, exit 0) and reaps its worker processes.
ENTRYPOINT ["embedrpc", "serve"]
