#!/usr/bin/env bash
# dev/gpu_check.sh OUTDIR: what is worth doing in the first minutes on a GPU
# machine (this project's GPU time is rare and short), as one command of at
# most 9 minutes that leaves OUTDIR/summary.md and the full logs in OUTDIR:
#
#   1. build for this GPU's architecture: train_et, the GPU tests in both
#      precisions, dev/bench_step (make -j);
#   2. the native GPU tests: test/gpu_test_*.cu in both precisions, then the
#      training runs of test/gpu_test_train.py;
#   3. make bench: the d12 step at B = 16, T = 2048, dense and 16 experts
#      under ET, EC and TC (tok/s, MFU, the phase split, peak memory);
#   4. a 300-step run on the synthetic corpus with each router and dense (d6,
#      8 experts), to see them learn and route on a real GPU;
#   5. on a machine with several GPUs and mpirun: the d6 ET run on one GPU and
#      on all of them with -ep global, the same micro-batch per GPU, whose step
#      times give the communication share;
#   6. OUTDIR/summary.md (dev/gpu_check_summary.py): each test's result, tok/s,
#      MFU, the phase split, and the peak memory next to the plan model_allocate
#      made (what the emulator's dry run checks).
#
# Each part has its own time limit, so one slow part cannot take the others'
# time, and the summary is rewritten after each. Without a GPU it stops at
# once (exit 2) and runs nothing. Extra arguments go to every bench_step run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: dev/gpu_check.sh OUTDIR [bench_step flags]}
shift
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo "gpu_check.sh: no GPU here (nvidia-smi -L lists none): nothing run; this is for a GPU machine" >&2
    exit 2
fi
mkdir -p "$out"
start=$SECONDS
summarize() { python3 dev/gpu_check_summary.py "$out" >/dev/null || echo "gpu_check.sh: the summary failed" >&2; }

# step NAME LIMIT_S COMMAND...: runs a part with its log in OUTDIR/NAME.log and
# its exit status and seconds in OUTDIR/NAME.status ("124" when it ran out of time).
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$rc $((SECONDS - t0))" >"$out/$name.status"
    echo "   exit $rc after $((SECONDS - t0)) s"
    summarize
}

{
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
    nvcc --version
} >"$out/machine.log" 2>&1

gpu_tests=$(ls test/gpu_test_*.cu | sed 's|^test/|build/|; s|\.cu$||' | sed 's|.*|&.bf16 &.fp32|')
# the limits, with 5 s each to stop, add up to 8.2 minutes (8.9 with several GPUs)
step build 140 make -j"$(nproc)" --no-print-directory train_et build/train_et_fp32 build/bench_step $gpu_tests
step gpu_tests 50 bash -c "rc=0; for t in $gpu_tests; do \$t || rc=1; done; exit \$rc"
step train_tests 90 python3 test/gpu_test_train.py
step bench 125 env OUT="$out" bash dev/bench.sh -r 5 "$@"
step synthetic_runs 60 bash -c "for r in dense et ec tc; do
    rm -rf '$out/run_'\$r
    model='-e 8 -r '\$r; [ \$r = dense ] && model='-e 0'
    ./train_et -m d6 \$model -i synthetic -sv 8192 -b 8 -t 512 -d 4096 -x 300 -v 100 -vm 4 -s 0 -li 50 -n 0 \
        -o '$out/run_'\$r > '$out/run_'\$r.log 2>&1 || echo \"run \$r failed: exit \$?\"
done"
gpus=$(nvidia-smi -L | grep -c '^GPU')
if [ "$gpus" -ge 2 ] && command -v mpirun >/dev/null; then
    step ranks 40 bash -c "for n in 1 $gpus; do
        rm -rf '$out/ranks_'\$n
        OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -np \$n --bind-to none ./train_et -m d6 \
            -e 8 -r et -ep global -i synthetic -sv 8192 -b 8 -t 512 -d \$((n * 4096)) -x 60 -v 0 -s 0 -li 10 -n 0 \
            -o '$out/ranks_'\$n > '$out/ranks_'\$n.log 2>&1 || echo \"\$n ranks failed: exit \$?\"
    done"
fi
summarize
echo "gpu_check.sh: done in $((SECONDS - start)) s; summary in $out/summary.md"
cat "$out/summary.md"
