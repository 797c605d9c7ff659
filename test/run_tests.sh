#!/usr/bin/env bash
# test/run_tests.sh: what `make test` runs; with the argument "emu", what
# `make test-emu` runs (the emulated GPU and training tests alone).
#
# Builds and runs every test this machine can run, counts the "ok / FAIL /
# skip" lines the test programs print, and ends with one line "N passed, N
# failed, N skipped". A build is a test too, and must be warning-free: the
# CPU tests, the CUDA program and the GPU tests in both precisions (nvcc
# compiles them without a GPU), and the emulated device's programs.
#
# The GPU tests run natively where nvidia-smi lists a GPU (a CUDA that cannot
# start fails them). Elsewhere they run on the emulated device (test/emu;
# README "The emulated device"), every line marked "emu" so that no one takes
# it for a GPU run:
#   - the emulator's own tests (test/emu/test_emulator.py), NCCL's across
#     processes included;
#   - the GPU test programs, both precisions, each in the natural, reversed
#     and a random schedule, whose results must be bit-identical (a digest of
#     every device-to-host copy), and built with AddressSanitizer + UBSan;
#   - the GPU tests in Python (test/gpu_test_*.py) with the emulated programs:
#     the training tests run the emulated train_et, one test per job;
#   - the dry run at the paper's sizes (test/emu/test_dry_run.py);
#   - the benchmark and dev/gpu_check.sh's summary on a tiny model.
# Independent programs run side by side, one per core; each part's time is
# printed after it.
set -u
shopt -s nullglob
cd "$(dirname "$0")/.."
mode=${1:-all}
case $mode in
    all | emu) ;;
    *) echo "usage: test/run_tests.sh [emu]" >&2; exit 2 ;;
esac
mkdir -p build
passed=0
failed=0
skipped=0
cores=$(nproc 2>/dev/null || echo 2)
work=$(mktemp -d "${TMPDIR:-/tmp}/train_et_tests.XXXXXX")
trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$PWD/test${PYTHONPATH:+:$PYTHONPATH}"

# Counts a program's output: its ok / FAIL / skip lines (with `label` put in
# front of each test's name), and one failure for a non-zero exit that
# reported none (a crash).
count() {
    local name=$1 file=$2 rc=$3 label=$4
    if [ -n "$label" ]; then
        sed -i -E "s#^(ok|FAIL|skip) - #\1 - $label #" "$file"
    fi
    cat "$file"
    local ok fail skip
    ok=$(grep -c '^ok - ' "$file")
    fail=$(grep -c '^FAIL - ' "$file")
    skip=$(grep -c '^skip - ' "$file")
    if [ "$rc" -ne 0 ] && [ "$fail" -eq 0 ]; then
        echo "FAIL - $label${label:+ }$name: exited with status $rc"
        fail=1
    fi
    passed=$((passed + ok))
    failed=$((failed + fail))
    skipped=$((skipped + skip))
}

# Runs one test program now.
run() {
    local name=$1
    shift
    "$@" >"$work/run.out" 2>&1
    count "$name" "$work/run.out" $? ""
}

# Starts one test program in the background (at most one per core); collect
# waits for them all and counts their output in the order they were started.
jobs_started=0
spawn() {
    local name=$1 label=$2
    shift 2
    while [ "$(jobs -rp | wc -l)" -ge "$cores" ]; do wait -n; done
    local n=$((jobs_started++))
    echo "$name" >"$work/job$n.name"
    echo "$label" >"$work/job$n.label"
    ("$@" >"$work/job$n.out" 2>&1; echo $? >"$work/job$n.rc") &
}
collect() {
    wait
    local n
    for ((n = 0; n < jobs_started; n++)); do
        local rc
        rc=$(cat "$work/job$n.rc" 2>/dev/null) || rc=1  # no status: the job was killed
        count "$(cat "$work/job$n.name")" "$work/job$n.out" "$rc" "$(cat "$work/job$n.label")"
    done
    jobs_started=0
    rm -f "$work"/job*
}

# A build step: each file it builds is named as its build starts, then one
# ok or FAIL line. The build must also be warning-free: a compiler warning
# fails it, with the compiler's output shown (make's own warnings do not).
source test/build_output.sh
build() {
    local name=$1
    shift
    echo "   building $name"
    "$@" 2>&1 | tee "$work/build.out" | announce_builds
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ] && [ -z "$(compiler_warnings <"$work/build.out")" ]; then
        echo "ok - build $name"
        passed=$((passed + 1))
    else
        tail -n 30 "$work/build.out"
        echo "FAIL - build $name"
        failed=$((failed + 1))
        return 1
    fi
}

part_start=$SECONDS
part_done() { echo "   ($1: $((SECONDS - part_start)) s)"; part_start=$SECONDS; }

gpu=no
if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then gpu=yes; fi
emulate=no
if [ "$mode" = emu ] || [ "$gpu" = no ]; then emulate=yes; fi
cpu_tests=$(ls test/test_*.cpp | sed 's|^test/|build/|; s|\.cpp$||')
gpu_programs=$(ls test/gpu_test_*.cu | sed 's|^test/||; s|\.cu$||')
gpu_tests=$(for p in $gpu_programs; do echo "build/$p.bf16 build/$p.fp32"; done)
emu_gpu_tests=$(for p in $gpu_programs; do echo "$p.bf16 $p.fp32"; done)

echo "== builds"
if [ "$mode" = all ]; then
    build "CPU tests" make --no-print-directory -j"$cores" $cpu_tests
    build "train_et (BF16, the default)" make --no-print-directory train_et
    build "train_et (FP32)" make --no-print-directory build/train_et_fp32
    build "GPU tests (BF16 and FP32)" make --no-print-directory -j"$cores" $gpu_tests
    build "dev/bench_step" make --no-print-directory build/bench_step
fi
if [ "$emulate" = yes ]; then
    plain=$(for t in $emu_gpu_tests train_et bench_step selftest nccl_selftest dry_run; do echo "build/emu/plain/$t"; done)
    asan=$(for t in $emu_gpu_tests selftest; do echo "build/emu/asan/$t"; done)
    build "emulated device: GPU tests, train_et, bench_step, selftest, nccl_selftest, dry_run (test/emu)" \
        make --no-print-directory -j"$cores" $plain
    build "emulated device, sanitizer builds: GPU tests and selftest (AddressSanitizer + UBSan), selftest (ThreadSanitizer)" \
        make --no-print-directory -j"$cores" $asan build/emu/tsan/selftest
fi
part_done builds

if [ "$mode" = all ]; then
    echo "== CPU tests"
    for t in $cpu_tests; do
        if [ -x "$t" ]; then run "$t" "$t"; fi
    done
    for t in test/test_*.py; do
        run "$t" python3 "$t"
    done
    part_done "CPU tests"
fi

if [ "$gpu" = yes ] && [ "$mode" = all ]; then
    echo "== GPU tests (native)"
    for t in $gpu_tests; do
        if [ -x "$t" ]; then run "$t" "$t"; else echo "FAIL - $t: not built"; failed=$((failed + 1)); fi
    done
    for t in test/gpu_test_*.py; do
        run "$t" python3 "$t"
    done
    part_done "native GPU tests"
fi

if [ "$emulate" = yes ]; then
    echo "== GPU tests on the emulated device (test/emu: the CPU, not a GPU)"
    seed=${EMU_RANDOM_SEED:-1}
    # longest first, so the cores stay busy to the end: the training and the
    # multi-rank runs one test per job
    for module in gpu_test_train gpu_test_ranks; do
        tests=$(python3 -c "import $module as m; print(' '.join(n for n in vars(m) if n.startswith('test_')))")
        if [ -z "$tests" ]; then
            echo "FAIL - test/$module.py: cannot list its tests"
            failed=$((failed + 1))
        fi
        for t in $tests; do
            spawn "test/$module.py $t" "emu:" env TRAIN_ET_EMULATED=1 python3 "test/$module.py" "$t"
        done
    done
    for t in test/gpu_test_*.py; do
        case "$t" in
            test/gpu_test_train.py | test/gpu_test_ranks.py) ;;
            *) spawn "$t" "emu:" env TRAIN_ET_EMULATED=1 python3 "$t" ;;
        esac
    done
    for t in $emu_gpu_tests; do
        spawn "build/emu/asan/$t" "emu(asan):" env ASAN_OPTIONS=detect_leaks=0 build/emu/asan/"$t"
    done
    for t in $emu_gpu_tests; do
        spawn "build/emu/plain/$t" "emu:" env EMU_DIGEST="$work/$t.natural" build/emu/plain/"$t"
        spawn "build/emu/plain/$t" "emu(reversed):" env EMU_SCHEDULE=reversed EMU_DIGEST="$work/$t.reversed" \
            build/emu/plain/"$t"
        spawn "build/emu/plain/$t" "emu(random):" env EMU_SCHEDULE="random:$seed" EMU_DIGEST="$work/$t.random" \
            build/emu/plain/"$t"
    done
    spawn "test/emu/test_emulator.py" "" python3 test/emu/test_emulator.py
    spawn "test/emu/test_dry_run.py" "emu: dry run:" python3 test/emu/test_dry_run.py
    spawn "test/emu/test_gpu_check.py" "emu: dev/gpu_check.sh:" python3 test/emu/test_gpu_check.py
    collect
    for t in $emu_gpu_tests; do
        if cmp -s "$work/$t.natural" "$work/$t.reversed" && cmp -s "$work/$t.natural" "$work/$t.random"; then
            echo "ok - emu: $t: bit-identical results in the natural, reversed and random:$seed schedules"
            passed=$((passed + 1))
        else
            echo "FAIL - emu: $t: results differ between schedules (a race between threads of a block): digests" \
                "natural $(cat "$work/$t.natural" 2>/dev/null), reversed $(cat "$work/$t.reversed" 2>/dev/null)," \
                "random $(cat "$work/$t.random" 2>/dev/null)"
            failed=$((failed + 1))
        fi
    done
    part_done "emulated GPU tests"
fi

if [ "$gpu" = no ] && [ "$mode" = all ]; then
    echo "skip - native GPU tests: no CUDA device on this machine (they ran on the emulated device above); to run" \
        "it: a machine with an NVIDIA GPU (dev/gpu_check.sh)"
    skipped=$((skipped + 1))
fi

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
