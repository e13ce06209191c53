#!/usr/bin/env bash
# The whole GPU benchmark in one command, for an H200 (or any CUDA GPU):
#
#     benchmarks/gpu_suite.sh OUT_DIR
#
# Stages, each under `timeout` so that one failing or slow stage never loses the others
# (their logs are OUT_DIR/<stage>.log):
#   build    the C++ sampling extension, in place (else gptfast JIT-builds it on first use)
#   env      versions, the device and the sampler in use (gptfast info, nvidia-smi)
#   check    gptfast check --quick: every fused op against its reference (bf16 first)
#   kernels  gptfast bench --suite kernels: attention, decode, layernorm, sampler step
#   e2e      gptfast bench --suite e2e --quick: prefill, decode at batch 1/8/64, training step
#   profile  gptfast profile generate: GPT-2 124M, batch 1, 256 new tokens (host syncs per token)
#   summary  tables and the issue targets from the JSON files, printed last
# Outputs: OUT_DIR/{check,kernels,e2e}.json, {kernels,e2e}.csv, plots/*.png, profile/ (trace.json
# for https://ui.perfetto.dev, key_averages.txt, summary.json), summary.md, stages.tsv.
#
# The stage limits add up to 8 minutes (480 s); the bench stages stop starting new cases a little
# before their limit (--budget-s, least important cases cut first) and write what they
# measured when `timeout` stops them. Limits can be changed through the environment
# (LIMIT_BUILD=120 ...). Runs from a source checkout with no network access.
set -u -o pipefail

OUT="${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PY OUT

LIMIT_BUILD=${LIMIT_BUILD:-90}
LIMIT_ENV=${LIMIT_ENV:-15}
LIMIT_CHECK=${LIMIT_CHECK:-75}
LIMIT_KERNELS=${LIMIT_KERNELS:-140}
LIMIT_E2E=${LIMIT_E2E:-115}
LIMIT_PROFILE=${LIMIT_PROFILE:-35}
LIMIT_SUMMARY=${LIMIT_SUMMARY:-10}

STAGES="$OUT/stages.tsv"
printf 'stage\tresult\tseconds\n' > "$STAGES"
SUITE_START=$(date +%s)

stage() {  # stage NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0 rc verdict
    t0=$(date +%s)
    echo "=== [$name] limit ${limit}s: $*"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) verdict=ok ;;
        124 | 137) verdict="timed out (results so far kept)" ;;
        *) verdict="exit $rc" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$verdict" "$(($(date +%s) - t0))" >> "$STAGES"
    tail -n 4 "$OUT/$name.log" | sed 's/^/    /'
}

env_report() {
    "$PY" -m gptfast info
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
}

stage build "$LIMIT_BUILD" "$PY" setup.py build_ext --inplace
# `timeout` runs programs, not shell functions: the function stages go through `bash -c`.
export -f env_report
stage env "$LIMIT_ENV" bash -c env_report
stage check "$LIMIT_CHECK" "$PY" -m gptfast check --quick -v --json "$OUT/check.json"
stage kernels "$LIMIT_KERNELS" "$PY" -m gptfast bench --suite kernels -v --budget-s $((LIMIT_KERNELS - 30)) \
    --json "$OUT/kernels.json" --csv "$OUT/kernels.csv" --plot "$OUT/plots"
stage e2e "$LIMIT_E2E" "$PY" -m gptfast bench --suite e2e --quick -v --budget-s $((LIMIT_E2E - 30)) \
    --json "$OUT/e2e.json" --csv "$OUT/e2e.csv" --plot "$OUT/plots"
stage profile "$LIMIT_PROFILE" "$PY" -m gptfast profile generate --batch 1 --new-tokens 256 --out "$OUT/profile"

summary() {
    local files=()
    for f in "$OUT/kernels.json" "$OUT/e2e.json"; do [ -f "$f" ] && files+=("$f"); done
    echo "# gptfast GPU suite, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Command: \`benchmarks/gpu_suite.sh $1\`"
    if [ ${#files[@]} -gt 0 ]; then
        local profile=()
        [ -f "$OUT/profile/summary.json" ] && profile=(--profile-summary "$OUT/profile/summary.json")
        "$PY" -m gptfast bench --from-json "${files[@]}" "${profile[@]}"
    else
        echo "(no benchmark results were written: see kernels.log and e2e.log)"
    fi
    if [ -f "$OUT/check.json" ]; then
        "$PY" - "$OUT/check.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
rows = doc["results"]
failed = [r for r in rows if not r["passed"]]
print(f"\n## gptfast check\n\n{len(rows) - len(failed)}/{len(rows)} passed on {doc['device']}")
for r in failed:
    print(f"- FAIL {r['op']} {r['variant']} [{r['shape']}] {r['dtype']} {r['direction']}: ratio {r['ratio']} {r['detail']}")
EOF
    fi
    if [ -f "$OUT/profile/summary.json" ]; then
        "$PY" - "$OUT/profile/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"\n## profile: {s['what']}\n")
print(f"wall {s['wall_ms']:.1f} ms, kernels {s['kernel_ms']} ms, host gaps {s['host_gap_ms']} ms, "
      f"host syncs {s['host_syncs']} ({s['host_syncs_per_token']} per generated token)")
EOF
    fi
}
export -f summary
stage summary "$LIMIT_SUMMARY" bash -c 'summary "$OUT"'
cp "$OUT/summary.log" "$OUT/summary.md" 2>/dev/null

echo
echo "=== stages (total $(($(date +%s) - SUITE_START)) s; logs in $OUT)"
column -t -s $'\t' "$STAGES" 2>/dev/null || cat "$STAGES"
echo
cat "$OUT/summary.md" 2>/dev/null
