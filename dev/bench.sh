#!/usr/bin/env bash
# dev/bench.sh: build dev/bench_step and time train_et's d12 training step on
# this machine's GPU (SPEC "Performance": tokens/s, MFU, memory, the step by
# phase): the dense model, then the MoE model with 16 experts under each
# router (ET, EC, TC). `make test` compiles it too, so it cannot rot unseen.
#
#   bash dev/bench.sh            build, run the four d12 configurations at B=16 T=2048
#   bash dev/bench.sh -r 50      extra flags go to every bench_step run (later ones win)
#
# Each run's output is also written to ${OUT:-build}/bench_d12_<config>.txt.
# Without a GPU it builds, then stops with exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."

make --no-print-directory build/bench_step

if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo "bench.sh: no GPU here (nvidia-smi -L lists none): built build/bench_step, did not run it" >&2
    exit 2
fi

out=${OUT:-build}
mkdir -p "$out"
for config in dense et ec tc; do
    log="$out/bench_d12_$config.txt"
    run=(build/bench_step -m d12 -b 16 -t 2048)
    [ "$config" != dense ] && run+=(-e 16 -rt "$config")
    run+=("$@")
    echo "run:   ${run[*]}" | tee "$log"
    # The card's state as found (METHOD.md: measure it as it is, note if odd).
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | tee -a "$log" ||
        echo "(nvidia-smi could not report the clocks)" | tee -a "$log"
    "${run[@]}" 2>&1 | tee -a "$log"
done
