#!/usr/bin/env bash
# Everything adacc measures on one GPU, in one call that ends on time.
#
#     bash bench/gpu/run.sh                    # from the repository root
#
# 1. highspy from a carried wheel in .whl/ when the machine has none;
# 2. bench/gpu/codecs.py: every codec's CUDA kernels checked against the
#    references, then timed against the copy bandwidth (at most CODECS_SECONDS);
# 3. bench/gpu/e2e.py: training steps of a Llama, adacc against stock Inductor,
#    PyTorch's activation_memory_budget and checkpointing, with whatever time is
#    left of RUN_SECONDS (E2E_ARGS adds options, e.g. "--layers 12").
#
# Results go to $OUT (else bench/results/gpu): the files of both scripts and
# run.log, the whole console output. The exit status is that of the first
# script that failed.
set -uo pipefail

out=${OUT:-bench/results/gpu}
py=${PYTHON:-python3}
run_seconds=${RUN_SECONDS:-560}
codecs_seconds=${CODECS_SECONDS:-200}
# What e2e.py needs after its last preparation starts: that variant's compile
# and the interleaved timing of all of them.
e2e_tail_seconds=${E2E_TAIL_SECONDS:-150}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

main() {
    local started=$SECONDS status=0
    if ! "$py" -c "import highspy" 2>/dev/null; then
        local wheels=(.whl/highspy-*.whl)
        [ -e "${wheels[0]}" ] || { echo "no highspy here and no .whl/highspy-*.whl to install it from"; return 2; }
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/adacc_site "${wheels[@]}" || return 2
        export PYTHONPATH=/tmp/adacc_site${PYTHONPATH:+:$PYTHONPATH}
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1
    "$py" -c "import torch, triton, highspy; print('torch', torch.__version__, 'triton', triton.__version__, 'highspy', highspy.__file__)"
    git log -1 --format='commit %H %s' 2>/dev/null

    echo "=== codecs ($codecs_seconds s at most)"
    timeout "$codecs_seconds" "$py" bench/gpu/codecs.py --out "$out" || status=$?
    echo "=== codecs exit $status after $((SECONDS - started)) s"

    local left=$((run_seconds - (SECONDS - started)))
    local prepare=$((left - e2e_tail_seconds))
    if [ "$prepare" -lt 60 ]; then
        echo "=== e2e skipped: $left s left of RUN_SECONDS=$run_seconds"
        return $((status ? status : 3))
    fi
    echo "=== e2e (variants prepared for $prepare s, stopped at $((left - 5)) s)"
    # shellcheck disable=SC2086  # E2E_ARGS is a list of options
    timeout "$((left - 5))" "$py" bench/gpu/e2e.py --out "$out" --time-limit "$prepare" ${E2E_ARGS:-} || {
        local rc=$?
        status=$((status ? status : rc))
    }
    echo "=== done after $((SECONDS - started)) s, exit $status"
    return "$status"
}

main 2>&1 | tee "$out/run.log"
exit "${PIPESTATUS[0]}"
