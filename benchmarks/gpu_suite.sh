#!/usr/bin/env bash
# The whole GPU run in one command, for an H200 (or any CUDA GPU), within 8 minutes:
#
#     benchmarks/gpu_suite.sh OUT_DIR            # on the GPU machine
#     benchmarks/gpu_suite.sh --dry-run OUT_DIR  # the same plumbing on a CPU, tiny shapes (CI runs it)
#
# Stages, most valuable numbers first, each in its own process under `timeout` (SIGTERM at
# its limit, SIGKILL GRACE seconds later, to the stage's whole process group), so a slow
# or broken stage never loses the others:
#   build       the C++ sampling extension in place, then `import gptfast._C`, in the background
#               while env and warm run (those two run with GPTFAST_NO_EXT=1); if it fails, every
#               later stage runs with GPTFAST_NO_EXT=1 (Python twin) and the summary says so
#   env         gptfast info (builds nothing), nvidia-smi
#   warm        compile, in parallel processes, every kernel the later stages launch into one
#               TRITON_CACHE_DIR, every tuning candidate, and the end-to-end torch.compile cases
#               into one TORCHINDUCTOR_CACHE_DIR (gptfast.bench.warm), so compiles do not eat
#               the stage limits
#   check       gptfast check --quick: the sampler first, then every op, bf16 first
#   tune        python -m gptfast.tune --quick --budget-s: every candidate of every kernel and key
#               (checked against the twin, then timed briefly), most valuable keys first; then
#               --install the table into kernels/tuned/ so the later stages run the tuned
#               configs (not in a dry run; "not available" where gptfast.tune is absent)
#   tests       the test suite on the GPU, in parallel (pytest -n, -v: failures named as they come)
#   attention   causal attention fwd/bwd vs SDPA          (gptfast bench --suite kernels)
#   decode      decode attention over a KV cache
#   layernorm   layernorm fwd/bwd vs F.layer_norm
#   e2e_decode  GPT-2 124M decode, batch 1 and 8          (gptfast bench --suite e2e)
#   train       GPT-2 124M training step, MFU, peak memory: fused and torch backends, eager and compiled
#   hf          HF transformers GPT-2 with gptfast        (gptfast bench --suite hf --quick)
#   overhead    host microseconds per eager call           (gptfast bench --suite overhead;
#               "not available" where that suite is absent)
#   profile     gptfast profile generate: batch 1, 256 new tokens (host syncs per token)
#   summary     gptfast.bench.suite_summary: failures first, targets, check and test counts, stages
# A stage that hits a CUDA error stops at that case and names it; the next stage starts a
# fresh process. The bench stages stop starting new cases BUDGET_MARGIN seconds before their
# limit (least important cases cut first) and write what they measured when stopped.
# Kernel rows carry the kernel time (CUDA-graph replay) and the eager time (plain calls).
#
# OUT_DIR ends up holding at most four files: summary.md, stages.tsv (stage, status, seconds,
# limit_s, note), tuned.json (when the tune stage wrote it) and results.tar.gz (every JSON,
# CSV, plot, log and trace, under results/). The summary is printed last. Limits can be
# changed through the environment (LIMIT_CHECK=60 ...); the interpreter is $PY (default
# python3, else python). Runs from a source checkout with no network access.
set -u -o pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:?usage: benchmarks/gpu_suite.sh [--dry-run] OUT_DIR}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [ -z "${PY:-}" ]; then
    if command -v python3 > /dev/null 2>&1; then PY=python3; else PY=python; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

GRACE=${GRACE:-2}
BUDGET_MARGIN=${BUDGET_MARGIN:-8}
# build runs alongside env and warm; the others one after another (tests/test_gpu_suite.py
# checks that the limits, kill grace included, add up to at most 480 s).
LIMIT_BUILD=${LIMIT_BUILD:-55}
LIMIT_ENV=${LIMIT_ENV:-10}
LIMIT_WARM=${LIMIT_WARM:-50}
LIMIT_CHECK=${LIMIT_CHECK:-20}
LIMIT_TUNE=${LIMIT_TUNE:-60}
LIMIT_TESTS=${LIMIT_TESTS:-124}
LIMIT_ATTENTION=${LIMIT_ATTENTION:-30}
LIMIT_DECODE=${LIMIT_DECODE:-14}
LIMIT_LAYERNORM=${LIMIT_LAYERNORM:-14}
LIMIT_E2E_DECODE=${LIMIT_E2E_DECODE:-30}
LIMIT_TRAIN=${LIMIT_TRAIN:-40}
LIMIT_HF=${LIMIT_HF:-26}
LIMIT_OVERHEAD=${LIMIT_OVERHEAD:-12}
LIMIT_PROFILE=${LIMIT_PROFILE:-15}
LIMIT_SUMMARY=${LIMIT_SUMMARY:-6}

if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    DEVICE=(--device cpu)
    JOBS=2
    TUNE_ARGS="--dry-run --device-name dry-run-cpu"
    TESTS_ARGS=(-n 2 tests/test_train_config.py)  # the stage's plumbing on one quick file
    PROFILE_ARGS=(--new-tokens 8)
    BENCH_ARGS=(--providers gptfast,torch)  # the plumbing, not every provider
    TITLE="gptfast GPU suite: DRY RUN on the CPU (fake device name dry-run-cpu; no number here means anything)"
else
    DEVICE=()
    JOBS=$(nproc 2> /dev/null || echo 8)
    [ "$JOBS" -gt 16 ] && JOBS=16
    TUNE_ARGS="--quick"
    # The files that exercise the device kernels first (a stage cut short has run them), then
    # the rest of the suite (pytest skips the files already named).
    TESTS_ARGS=(-n "$((JOBS > 15 ? 14 : JOBS > 2 ? JOBS - 1 : 1))" tests/test_causal_attention.py
        tests/test_decode_attention.py tests/test_skinny_linear.py tests/test_linear_cross_entropy.py
        tests/test_layer_norm.py tests/test_decode_step.py tests/test_train_fused.py tests/test_overhead.py
        tests/test_int8_linear.py tests/test_model_fused.py tests/test_hf_integration.py tests)
    PROFILE_ARGS=(--new-tokens 256)
    BENCH_ARGS=()
    TITLE="gptfast GPU suite"
fi
if [ -z "${TRITON_CACHE_DIR:-}" ]; then  # one fresh cache for every stage, removed at the end
    TRITON_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gptfast-triton.XXXXXX")"
    trap 'rm -rf "$TRITON_CACHE_DIR"' EXIT
fi
export TRITON_CACHE_DIR
# inductor's compiled graphs (the warm stage's torch.compile cases), fresh for this run too
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$TRITON_CACHE_DIR/inductor}"

WORK="$OUT/results"
rm -rf "$WORK" "$OUT/summary.md" "$OUT/stages.tsv" "$OUT/tuned.json" "$OUT/results.tar.gz"
mkdir -p "$WORK/logs"
STAGES="$OUT/stages.tsv"
printf 'stage\tstatus\tseconds\tlimit_s\tnote\n' > "$STAGES"
SUITE_START=$(date +%s)
NOTES=()

record() {  # record NAME STATUS SECONDS LIMIT NOTE
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STAGES"
}

stage() {  # stage NAME LIMIT_S COMMAND...: run it under timeout, log to results/logs/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0 rc status
    t0=$(date +%s)
    echo "=== [$name] limit ${limit}s: $*" | cut -c1-200
    timeout --signal=TERM --kill-after="$GRACE" "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out" ;;
        *) status="failed (exit $rc)" ;;
    esac
    record "$name" "$status" "$(($(date +%s) - t0))" "$limit" ""
    echo "    $status in $(($(date +%s) - t0)) s"
    grep -m1 'STOPPED at the first CUDA error' "$WORK/logs/$name.log" | cut -c1-240 | sed 's/^/    /'
    tail -n 2 "$WORK/logs/$name.log" | cut -c1-160 | sed 's/^/    /'
    return $rc
}

bench() {  # bench NAME LIMIT SUITE [OPS]: one benchmark stage (no OPS: the whole suite, every provider)
    local name=$1 limit=$2 suite=$3 ops=${4:-}
    local select=("${BENCH_ARGS[@]}")
    if [ -n "$ops" ]; then select+=(--ops "$ops"); else select=(); fi
    stage "$name" "$limit" "$PY" -m gptfast bench --suite "$suite" --quick -v "${DEVICE[@]}" "${select[@]}" \
        --budget-s $((limit > BUDGET_MARGIN + 5 ? limit - BUDGET_MARGIN : 5)) \
        --json "$WORK/$name.json" --csv "$WORK/$name.csv" --plot "$WORK/plots"
}

env_report() {
    "$PY" -m gptfast info
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2> /dev/null || true
}
export -f env_report
export PY

# --- build: a dry run only checks the import (a compile takes minutes on a small CPU) ---
build_ext() {
    if [ "$DRY" = 1 ]; then
        echo "dry run: no compile, only the import check"
    else
        "$PY" setup.py build_ext --inplace || return
    fi
    "$PY" -c "import torch, gptfast._C; print('import gptfast._C: ok')"
}
export -f build_ext
export DRY
# build in the background (its own line in stages.tsv, put first once it is done); env and
# warm run meanwhile without the extension, which is being written
STAGES_MAIN=$STAGES
(STAGES="$WORK/build.tsv" && stage build "$LIMIT_BUILD" bash -c build_ext) &
BUILD_PID=$!
stage env "$LIMIT_ENV" env GPTFAST_NO_EXT=1 bash -c env_report
stage warm "$LIMIT_WARM" env GPTFAST_NO_EXT=1 "$PY" -m gptfast.bench.warm --jobs "$JOBS" --e2e --tune --compile "${DEVICE[@]}"
if wait "$BUILD_PID"; then
    NOTES+=("C++ extension: import gptfast._C works")
else
    export GPTFAST_NO_EXT=1
    NOTES+=("C++ extension NOT available (build or import failed, see logs/build.log): every later stage ran with GPTFAST_NO_EXT=1, the Python twin sampler; C++ loop rows are missing")
    echo "    later stages run with GPTFAST_NO_EXT=1"
fi
[ -s "$WORK/build.tsv" ] || printf 'build\tfailed (no record)\t0\t%s\t\n' "$LIMIT_BUILD" > "$WORK/build.tsv"
{ head -n 1 "$STAGES_MAIN"; cat "$WORK/build.tsv"; tail -n +2 "$STAGES_MAIN"; } > "$STAGES_MAIN.tmp"
mv "$STAGES_MAIN.tmp" "$STAGES_MAIN"
rm -f "$WORK/build.tsv"

stage check "$LIMIT_CHECK" "$PY" -m gptfast check --quick -v "${DEVICE[@]}" --json "$WORK/check.json"

# Tune, then install what was tuned (a table cut short is still valid) into kernels/tuned/,
# where the launchers of the later stages find it; a dry run installs nothing into the checkout.
tune_and_install() {
    # shellcheck disable=SC2086 # TUNE_ARGS holds plain flags
    timeout --kill-after=2 $((LIMIT_TUNE - 6)) "$PY" -m gptfast.tune --out "$OUT/tuned.json" $TUNE_ARGS \
        --budget-s $((LIMIT_TUNE - 16))
    local rc=$?
    if [ "$DRY" = 1 ]; then
        echo "dry run: the table is not installed"
    elif [ -s "$OUT/tuned.json" ]; then
        "$PY" -m gptfast.tune --install "$OUT/tuned.json" || return
    fi
    return $rc
}
export -f tune_and_install
export OUT TUNE_ARGS LIMIT_TUNE
if [ -f gptfast/tune.py ] || [ -f gptfast/tune/__main__.py ]; then
    stage tune "$LIMIT_TUNE" bash -c tune_and_install
    if [ "$DRY" != 1 ] && grep -q '^installed ' "$WORK/logs/tune.log"; then
        NOTES+=("Tuned table installed: the stages after tune ran with its configs")
    fi
else
    record tune "not available" 0 "$LIMIT_TUNE" "gptfast.tune is not in this checkout"
    echo "=== [tune] not available: gptfast.tune is not in this checkout"
fi

# The tests on the device, in parallel; -v prints each outcome as it comes, so a stage cut
# short still names the failures seen so far (the summary reads them from logs/tests.log).
stage tests "$LIMIT_TESTS" "$PY" -m pytest -v -rfE -p no:cacheprovider "${TESTS_ARGS[@]}"

bench attention "$LIMIT_ATTENTION" kernels causal_attention
bench decode "$LIMIT_DECODE" kernels decode_attention
bench layernorm "$LIMIT_LAYERNORM" kernels layer_norm
bench e2e_decode "$LIMIT_E2E_DECODE" e2e decode
bench train "$LIMIT_TRAIN" e2e train_step
bench hf "$LIMIT_HF" hf
if [ -f gptfast/bench/suites/overhead.py ]; then
    bench overhead "$LIMIT_OVERHEAD" overhead
else
    record overhead "not available" 0 "$LIMIT_OVERHEAD" "gptfast/bench/suites/overhead.py is not in this checkout"
    echo "=== [overhead] not available: gptfast/bench/suites/overhead.py is not in this checkout"
fi
stage profile "$LIMIT_PROFILE" "$PY" -m gptfast profile generate --batch 1 "${PROFILE_ARGS[@]}" "${DEVICE[@]}" \
    --out "$WORK/profile"

NOTE_ARGS=()
for note in "${NOTES[@]}"; do NOTE_ARGS+=(--note "$note"); done
stage summary "$LIMIT_SUMMARY" "$PY" -m gptfast.bench.suite_summary "$WORK" --stages "$STAGES" \
    --out "$OUT/summary.md" --tuned "$OUT/tuned.json" --title "$TITLE" "${NOTE_ARGS[@]}"

# --- one archive for everything else (the channel back carries few files) ---
cp "$STAGES" "$WORK/stages.tsv"
tar -czf "$OUT/results.tar.gz" -C "$OUT" results
if [ "$(stat -c %s "$OUT/results.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
    tar -czf "$OUT/results.tar.gz" -C "$OUT" --exclude=trace.json results
    ARCHIVE_NOTE="; the profile trace was left out (over 15 MiB)"
fi
rm -rf "$WORK"
TOTAL=$(($(date +%s) - SUITE_START))
{
    echo
    echo "Suite: ${TOTAL} s in all; results.tar.gz $(($(stat -c %s "$OUT/results.tar.gz") / 1024)) KiB${ARCHIVE_NOTE:-} (logs, JSON, CSV, plots, profile)."
} >> "$OUT/summary.md"
[ -s "$OUT/summary.md" ] || echo "(the summary stage wrote nothing: see logs/summary.log in results.tar.gz)" >> "$OUT/summary.md"

echo
echo "=== stages (total ${TOTAL} s)"
column -t -s $'\t' "$STAGES" 2> /dev/null || cat "$STAGES"
echo
cat "$OUT/summary.md"
