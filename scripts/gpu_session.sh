#!/bin/sh
# One short GPU session: the GPU tests and the GPU benchmark, on a machine with no package
# registry and no embedrpc installed (see ../shared/device/README.md).
#
# Here, once, from the repository root:
#     sh ../shared/device/pack-ort-gpu.sh    # onnxruntime-gpu → .device-carry/ (ignored)
#     sh scripts/gpu_session.sh pack         # grpc wheels → .whl/ (ignored, ~8 MB)
# There: the six calls that unpack onnxruntime-gpu into /tmp/ort-site, the last one
# carrying [".device-carry/kit", ".device-carry/part5", ".whl"] and ending with
#     sh scripts/gpu_session.sh run [gpu_bench.py options]
# which writes gpu_tests.log, gpu_bench.log and gpu_bench.json under $OUT.
#
# `run` stages the package from this checkout (src/embedrpc with server/ and client/
# linked in, as pyproject's package-dir maps them), installs the two grpc add-ons that
# image lacks, and grpcio/protobuf too only when the image's are too old for our stubs.
# PYTHON=... and a dry run here (`run --smoke`, no GPU) check the script itself.
set -eu
PY=${PYTHON:-python3}
WHEELS="grpcio==1.85.3 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1"

case "${1:-}" in
pack)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir .whl
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $WHEELS
    ls -la .whl
    ;;
run)
    shift
    out=${OUT:-/tmp/embedrpc-out}
    stage=/tmp/embedrpc-stage
    mkdir -p "$out" /tmp/site
    rm -rf "$stage" && mkdir -p "$stage"
    cp -r src/embedrpc "$stage/"
    ln -s "$PWD/server" "$stage/embedrpc/server"
    ln -s "$PWD/client" "$stage/embedrpc/client"
    export PYTHONPATH="$stage:/tmp/site:/tmp/ort-site" PYTHONUNBUFFERED=1
    install() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site "$@"; }
    if ! "$PY" -c "import grpc_health, grpc_reflection" 2>/dev/null; then
        install .whl/grpcio_health_checking-*.whl .whl/grpcio_reflection-*.whl
    fi
    if ! "$PY" -c "import embedrpc.v1.embedder_pb2_grpc" 2>/dev/null; then
        echo "gpu_session: the image's grpcio/protobuf are older than our stubs; using .whl/"
        install .whl/grpcio-*.whl .whl/protobuf-*.whl
    fi
    "$PY" -c "import embedrpc.server, embedrpc.client, embedrpc.prepare; print('embedrpc from', embedrpc.server.__file__)"
    "$PY" -c "import onnxruntime as o; o.preload_dlls() if hasattr(o, 'preload_dlls') else None; print('onnxruntime', o.__version__, o.get_available_providers())"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    set +e
    timeout "${TESTS_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_gpu.py tests/test_prepare.py 2>&1 | tee "$out/gpu_tests.log"
    timeout "${BENCH_TIMEOUT:-420}" "$PY" benchmarks/gpu_bench.py --json "$out/gpu_bench.json" \
        "$@" 2>&1 | tee "$out/gpu_bench.log"
    ;;
*)
    echo "usage: sh scripts/gpu_session.sh pack | run [gpu_bench.py options]" >&2
    exit 2
    ;;
esac
