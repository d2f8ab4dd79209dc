# embedrpc server image. CPU-ready as is; for GPUs, the onnxruntime-gpu wheel it
# installs also needs CUDA 12/13 and cuDNN libraries at run time (a CUDA runtime
# base image, or `pip install "onnxruntime-gpu[cuda,cudnn]"`).
#
#   docker build -t embedrpc .
#   docker run -p 50051:50051 embedrpc                               # bundled demo model
#   docker run -p 50051:50051 -v /models/qwen3:/model embedrpc --model /model
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY src ./src
COPY server ./server
COPY client ./client
RUN pip install . && rm -rf /src

RUN useradd --create-home --uid 10001 embedrpc
USER embedrpc
WORKDIR /home/embedrpc

EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('localhost:50051')).Check(h.HealthCheckRequest(), timeout=2); sys.exit(0 if s.status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["embedrpc", "serve"]
CMD ["--model", "demo", "--host", "0.0.0.0", "--port", "50051"]
