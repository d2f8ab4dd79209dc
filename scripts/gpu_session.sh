#!/bin/sh
# The GPU session (issue 15, part 2): the `gpu` tests and the GPU benchmark on a bare GPU
# machine with no package registry and no embedrpc installed, in ONE device call that
# ends inside the 600 s such a call may run (see ../shared/device/README.md).
#
# Here, once, from the repository root:
#     sh ../shared/device/pack-ort-gpu.sh    # onnxruntime-gpu → .device-carry/ (ignored)
#     sh scripts/gpu_session.sh pack         # grpc wheels → .whl/ (ignored, ~8 MB)
# There, with the device tool's `run`, back to back (a machine idle for 30 s goes back):
#   calls 1-5, carry [".device-carry/partN"] (N = 0..4), a second each:
#       mkdir -p /tmp/ort-parts && cp .device-carry/partN /tmp/ort-parts/
#   call 6, carry [".device-carry/kit", ".device-carry/part5", ".whl"], timeout_s 600:
#       cp .device-carry/part5 /tmp/ort-parts/ && EMBEDRPC_COMMIT=<sha> sh scripts/gpu_session.sh run
# `run` unpacks onnxruntime-gpu (when the parts are there and it is not yet), stages
# embedrpc from this checkout, runs the gpu tests (at most TESTS_TIMEOUT s), then the
# benchmark in what is left of BUDGET_S (the whole command; default 480 s: the call ends
# two minutes inside its 600 s, and the session's 15 device minutes keep room for the
# machine's start and the five copies; raise it when `status` shows more time left), and
# writes under $OUT: setup.log, gpu_tests.log, gpu_bench.log, gpu_bench.json and
# summary.md (the table, the targets, the other figures). The benchmark's steps go in
# order of need and each is skipped, and said so, when it would not fit the time left.
#
# A dry run here, on the CPU: `OUT=/tmp/gpu-dry PYTHON=... sh scripts/gpu_session.sh run --smoke`
# (extra arguments go to benchmarks/gpu_bench.py; the gpu tests skip without a GPU).
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
    start=$(date +%s)
    budget=${BUDGET_S:-480}
    left() { echo $((budget - ($(date +%s) - start))); }
    out=${OUT:-/tmp/embedrpc-out}
    stage=/tmp/embedrpc-stage
    mkdir -p "$out" /tmp/site
    {
        echo "gpu_session: $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${budget}s, commit ${EMBEDRPC_COMMIT:-unknown}"
        if [ -f .device-carry/kit/unpack.sh ] && [ -d /tmp/ort-parts ]; then
            sh .device-carry/kit/unpack.sh
        fi
        rm -rf "$stage" && mkdir -p "$stage"
        cp -r src/embedrpc "$stage/"
        ln -s "$PWD/server" "$stage/embedrpc/server"
        ln -s "$PWD/client" "$stage/embedrpc/client"
    } 2>&1 | tee "$out/setup.log"
    export PYTHONPATH="$stage:/tmp/site:/tmp/ort-site" PYTHONUNBUFFERED=1
    install() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site "$@"; }
    {
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
        echo "setup done, $(left)s left"
    } 2>&1 | tee -a "$out/setup.log"
    set +e
    tests=$(( $(left) - 280 ))  # the benchmark keeps at least 280 s
    [ "$tests" -gt "${TESTS_TIMEOUT:-150}" ] && tests=${TESTS_TIMEOUT:-150}
    if [ "$tests" -gt 20 ]; then
        timeout -k 5 "$tests" "$PY" -m pytest -q -p no:cacheprovider -m gpu \
            -o timeout=100 tests/test_gpu.py tests/test_prepare.py 2>&1 | tee "$out/gpu_tests.log"
    else
        echo "gpu_session: no time left for the tests" | tee "$out/gpu_tests.log"
    fi
    bench=$(( $(left) - 10 ))
    echo "gpu_session: benchmark with ${bench}s" | tee "$out/gpu_bench.log"
    EMBEDRPC_COMMIT=${EMBEDRPC_COMMIT:-unknown} timeout -k 5 "$bench" "$PY" \
        benchmarks/gpu_bench.py --json "$out/gpu_bench.json" --budget-s $((bench - 15)) \
        --seconds 1 "$@" 2>&1 | tee -a "$out/gpu_bench.log"
    "$PY" - "$out/gpu_bench.json" > "$out/summary.md" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    print(f"no benchmark report: {exc}")
    raise SystemExit(0)
print(f"GPU benchmark, {r.get('started')}, {r.get('gpu', r.get('device'))}, commit "
      f"{r.get('commit') or 'unknown'}, {r.get('versions')}, {r.get('elapsed_s')} s"
      f"{'' if r.get('complete') else ' (INCOMPLETE)'}\n")
print(r.get("table", ""))
print()
print("\n".join(f"- {line}" for line in r.get("targets", []) + r.get("notes", [])))
for stage, error in r.get("errors", {}).items():
    print(f"- error in {stage}: {error}")
EOF
    cat "$out/summary.md"
    echo "gpu_session: done in $(( $(date +%s) - start ))s"
    ;;
*)
    echo "usage: sh scripts/gpu_session.sh pack | run [gpu_bench.py options]" >&2
    exit 2
    ;;
esac
