"""test/emu/test_emulator.py: the emulated device's own tests, run by `make test`.

First the contracts (build/emu/plain/selftest: shuffles, barriers, atomics, CUB, cp.async,
wmma, cuBLAS against plain loops, runtime errors). Then every deliberate bug of
test/emu/selftest.cu: each must be caught the way the table below says, and
its correct twin must pass in every schedule and under the sanitizers, with
no emulator error. What "caught" means per bug:
  REPORT    the emulator reports it (an "emu: error:" line with the given words)
            and the program exits non-zero, in the natural schedule (for
            fault_is_sticky the program's own checks of CUDA's sticky errors
            after the fault must also hold: its result is "right");
  WRONG     the program computes a wrong result (poisoned memory), natural schedule;
  RACE      right in the natural schedule, wrong in the reversed one: a race only
            another schedule shows;
  SANITIZER the AddressSanitizer + UBSan build reports it (the plain build may not).
And the ThreadSanitizer build must name the missing barrier's race even in the
natural schedule, where its result is right, and find none in its twin.
Then the emulated NCCL across processes (build/emu/plain/nccl_selftest, see
test/emu/nccl_selftest.cu) with 2 and 3 ranks, and as a dry run.
Run from the repository root after `make build/emu/{plain,asan,tsan}/selftest
build/emu/plain/nccl_selftest`.
"""
import os
import subprocess
import sys

from harness import REPO

PLAIN = os.path.join(REPO, "build/emu/plain/selftest")
ASAN = os.path.join(REPO, "build/emu/asan/selftest")
TSAN = os.path.join(REPO, "build/emu/tsan/selftest")
NCCL = os.path.join(REPO, "build/emu/plain/nccl_selftest")
SCHEDULES = ("natural", "reversed", "random:1", "random:2")

REPORT, WRONG, RACE, SANITIZER = "report", "wrong", "race", "sanitizer"
# bug -> (how it must be caught, words the report must contain)
# unchecked_launch_error's twin makes the same refused launch but reads the
# error: the emulator still prints it, and must not fail the program for it.
TWIN_PRINTS_ERROR = {"unchecked_launch_error"}
BUGS = {
    "missing_barrier": (RACE, None),
    "out_of_bounds_write": (SANITIZER, "heap-buffer-overflow"),
    "divergent_shuffle": (REPORT, "exits while lane 0 waits for it at __shfl_sync"),
    "shuffle_deadlock": (REPORT, "no thread can move"),
    "divergent_barrier": (REPORT, "exits while 32 other threads of the block wait at __syncthreads"),
    "fault_is_sticky": (REPORT, "exits while 32 other threads of the block wait at __syncthreads"),
    "exit_before_barrier": (REPORT, "wait at __syncthreads"),
    "too_much_dynamic_shared_memory": (REPORT, "cudaFuncAttributeMaxDynamicSharedMemorySize"),
    "dynamic_shared_memory_short": (SANITIZER, "heap-buffer-overflow"),
    "static_shared_over_48k": (REPORT, "a kernel may declare at most 49152"),
    "shared_array_overflow": (SANITIZER, "out of bounds"),
    "block_of_2048_threads": (REPORT, "2048 threads: at most"),
    "launch_bounds_exceeded": (REPORT, "more than the kernel's __launch_bounds__(128)"),
    "unchecked_launch_error": (REPORT, "without having read the launch error"),
    "unwritten_memory_read": (WRONG, None),
    "unzeroed_shared_histogram": (WRONG, None),
    "cub_storage_reused_without_barrier": (REPORT, "TempStorage used again with no __syncthreads()"),
    "cublas_transposition_error": (REPORT, "end 480 bytes past it"),
    "cp_async_read_before_wait": (WRONG, None),
    "cp_async_never_waited": (REPORT, "cp.async copies that no __pipeline_wait_prior made visible"),
}


def run(binary, *args, schedule="natural", **settings):
    env = dict(os.environ, EMU_SCHEDULE=schedule, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1",
               **settings)
    r = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=300)
    return r.returncode, r.stdout, r.stderr


def check_bug(name):
    """None if the bug was caught as BUGS says, else why not."""
    how, words = BUGS[name]
    if how == SANITIZER:
        rc, out, err = run(ASAN, "bug", name)
        if rc == 0 or words not in err:
            return f"the sanitizer build did not report '{words}' (exit {rc}): {err[-300:]}"
        return None
    rc, out, err = run(PLAIN, "bug", name)
    if how == REPORT:
        if rc == 0 or "emu: error:" not in err or words not in err:
            return f"no emulator report with '{words}' (exit {rc}): {(out + err)[-300:]}"
        if name == "fault_is_sticky" and "right" not in out:
            return f"the errors after the fault are not CUDA's sticky ones: {out.strip()}"
    elif how == WRONG:
        if rc != 3 or "wrong" not in out:
            return f"the poisoned memory did not show in the result (exit {rc}): {out.strip()}"
    elif how == RACE:
        if rc != 0:
            return f"expected a right result in the natural schedule (only other schedules show this race): {out}{err}"
        rc, out, err = run(PLAIN, "bug", name, schedule="reversed")
        if rc != 3 or "wrong" not in out:
            return f"the reversed schedule did not expose the race (exit {rc}): {out.strip()}"
    return None


def check_twin(name):
    """None if the correct twin passes in every schedule and under the sanitizers."""
    runs = [(PLAIN, s) for s in SCHEDULES] + [(ASAN, "natural")]
    for binary, schedule in runs:
        rc, out, err = run(binary, "twin", name, schedule=schedule)
        reported = "emu: error" in err and name not in TWIN_PRINTS_ERROR
        if rc != 0 or "right" not in out or reported or "runtime error" in err:
            where = "sanitizer build" if binary == ASAN else f"{schedule} schedule"
            return f"{where}: exit {rc}: {(out + err).strip()[-300:]}"
    return None


def check_thread_sanitizer():
    """None if the tsan build reports the missing barrier (natural schedule) and nothing in its twin."""
    rc, out, err = run(TSAN, "bug", "missing_barrier")
    if "ThreadSanitizer: data race" not in err or "sum_kernel<true>" not in err or rc == 0:
        return f"no data race reported in sum_kernel<true> (exit {rc}): {(out + err)[-300:]}"
    rc, out, err = run(TSAN, "twin", "missing_barrier")
    if "ThreadSanitizer" in err or rc != 0:
        return f"the twin has a report (exit {rc}): {err[-300:]}"
    return None


def check_nccl():
    """Runs nccl_selftest with 2 and 3 ranks and as a dry run; prints its lines; returns the failures."""
    failed = 0
    for nranks in (2, 3):
        rc, out, err = run(NCCL, "-n", str(nranks))
        lines = [line for line in out.splitlines() if line.startswith(("ok - ", "FAIL - "))]
        print("\n".join(lines), flush=True)
        failed += sum(line.startswith("FAIL") for line in lines)
        last = nranks - 1
        # each failure names its cause in one line, from every rank that saw it
        for words in (f"emu: nccl: rank 0: ncclAllReduce: rank {last} died",
                      f"emu: nccl: rank 0: ncclAllReduce: rank {last} did not arrive within 1 s",
                      f"emu: nccl: rank {last}: ncclAllReduce: rank 0 aborted",
                      f"ncclCommInitRank: 1 of {nranks} ranks did not arrive within 1 s"):
            if words not in err:
                failed += 1
                print(f"FAIL - emu-nccl: {nranks} ranks: no line '{words}' on stderr: {err[-500:]}", flush=True)
        if rc != 0 and not any(line.startswith("FAIL") for line in lines):
            failed += 1
            print(f"FAIL - emu-nccl: {nranks} ranks: exited {rc}: {(out + err).strip()[-500:]}", flush=True)
    rc, out, err = run(NCCL, "-n", "4", EMU_DRY_RUN="1")
    print(out.strip(), flush=True)
    if rc != 0 or "ok - " not in out or "5 CUB and NCCL calls checked" not in err:
        failed += 1
        print(f"FAIL - emu-nccl: dry run: exit {rc}, expected 5 NCCL calls counted: {(out + err).strip()[-500:]}")
    return failed


def main():
    for binary in (PLAIN, ASAN, TSAN, NCCL):
        if not os.path.exists(binary):
            print(f"FAIL - emu-selftest: {binary} is not built (make {os.path.relpath(binary, REPO)})")
            return 1
    failed = 0
    for binary, label in ((PLAIN, ""), (ASAN, " (sanitizer build)")):
        rc, out, err = run(binary)
        lines = [line for line in out.splitlines() if line.startswith(("ok - ", "FAIL - ", "skip - "))]
        for line in lines:
            print(line + label if line.startswith("ok - ") else line)
        if rc != 0:
            failed += 1
            if not any(line.startswith("FAIL") for line in lines):
                print(f"FAIL - emu-selftest{label}: exited {rc}: {(out + err).strip()[-500:]}")
            else:
                print(err.strip()[-2000:])
    failed += check_nccl()
    listed = run(PLAIN, "list")[1].split()
    if sorted(listed) != sorted(BUGS):
        print(f"FAIL - emu-selftest: the bug table and selftest list differ: {sorted(set(listed) ^ set(BUGS))}")
        failed += 1
    for name in listed:
        if name not in BUGS:
            continue
        for kind, check in (("bug", check_bug), ("twin", check_twin)):
            why = check(name)
            label = f"emu-selftest: {kind} {name}" + (f" ({BUGS[name][0]})" if kind == "bug" else " passes everywhere")
            if why:
                failed += 1
                print(f"FAIL - {label}: {' '.join(why.split())}", flush=True)
            else:
                print(f"ok - {label}", flush=True)
    why = check_thread_sanitizer()
    label = "emu-selftest: the ThreadSanitizer build names the missing barrier's race, and none in its twin"
    print(f"FAIL - {label}: {' '.join(why.split())}" if why else f"ok - {label}", flush=True)
    failed += why is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
