#!/usr/bin/env bash
# test/run_tests.sh: what `make test` runs. Builds and runs every test this
# machine can run, counts the "ok / FAIL / skip" lines the test programs
# print, and ends with one line "N passed, N failed, N skipped".
#
# A build is a test too: the CPU tests, and the CUDA program and the GPU
# tests in both precisions (nvcc compiles them without a GPU). GPU tests run
# only where a CUDA device exists; elsewhere they are reported as skipped.
set -u
shopt -s nullglob
cd "$(dirname "$0")/.."
mkdir -p build
passed=0
failed=0
skipped=0

# Runs one test program; echoes its lines and adds them to the counts. A
# program that exits non-zero without reporting a failure (a crash) counts
# as one failure.
run() {
    local name=$1
    shift
    local out rc
    out=$("$@" 2>&1)
    rc=$?
    [ -n "$out" ] && echo "$out"
    local ok fail skip
    ok=$(grep -c '^ok - ' <<<"$out")
    fail=$(grep -c '^FAIL - ' <<<"$out")
    skip=$(grep -c '^skip - ' <<<"$out")
    if [ "$rc" -ne 0 ] && [ "$fail" -eq 0 ]; then
        echo "FAIL - $name: exited with status $rc"
        fail=1
    fi
    passed=$((passed + ok))
    failed=$((failed + fail))
    skipped=$((skipped + skip))
}

# A build step: one ok or FAIL line. The build must also be warning-free:
# a compiler warning fails it, with the compiler's output shown.
build() {
    local name=$1
    shift
    local out
    if out=$("$@" 2>&1) && ! grep -qi 'warning' <<<"$out"; then
        echo "ok - build $name"
        passed=$((passed + 1))
    else
        echo "$out" | tail -n 30
        echo "FAIL - build $name"
        failed=$((failed + 1))
        return 1
    fi
}

echo "== builds"
cpu_tests=$(ls test/test_*.cpp | sed 's|^test/|build/|; s|\.cpp$||')
gpu_tests=$(ls test/gpu_test_*.cu 2>/dev/null | sed 's|^test/|build/|; s|\.cu$||' | sed 's|.*|&.bf16 &.fp32|')
build "CPU tests" make --no-print-directory -s $cpu_tests
build "train_et (BF16, the default)" make --no-print-directory -s train_et
build "train_et (FP32)" make --no-print-directory -s build/train_et_fp32
[ -n "$gpu_tests" ] && build "GPU tests (BF16 and FP32)" make --no-print-directory -s $gpu_tests
build "dev/bench_step" make --no-print-directory -s build/bench_step

echo "== CPU tests"
for t in $cpu_tests; do
    if [ -x "$t" ]; then run "$t" "$t"; fi
done
for t in test/test_*.py; do
    run "$t" python3 "$t"
done

echo "== GPU tests"
if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    for t in $gpu_tests; do
        if [ -x "$t" ]; then run "$t" "$t"; fi
    done
    for t in test/gpu_test_*.py; do
        run "$t" python3 "$t"
    done
else
    echo "skip - GPU tests: no CUDA device on this machine ($(echo $gpu_tests test/gpu_test_*.py | wc -w) programs compiled or ready, not run)"
    skipped=$((skipped + 1))
fi

echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
