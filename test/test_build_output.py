"""test/test_build_output.py: how `make test` reads its builds (test/build_output.sh), and the build's switches.

A build's compiler warnings fail it, make's own warnings (clock skew) do not;
each file is named as its build starts, not when the whole build is done;
GPU_ARCH given as 8.0 or sm_80 stops make with a one-line hint. The builds
make test does not make (without NCCL: one GPU only; several ranks in the FP32
build; without MPI) still compile warning-free: g++ reads the emulated
device's copy of train_et.cu in each (syntax and types only, in seconds).
"""
import os
import shutil
import subprocess
import time

from harness import REPO, Skip, main

HELPERS = os.path.join(REPO, "test", "build_output.sh")
CUDA_HOME = os.path.dirname(os.path.dirname(shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"))  # as the Makefile

MAKE_OWN = [
    "make: warning:  Clock skew detected.  Your build may be incomplete.",
    "make[1]: Warning: File 'train_et.cu' has modification time 0.84 s in the future",
    "make: warning: jobserver unavailable: using -j1.  Add '+' to parent make rule.",
]
COMPILERS = [
    "test/test_shard.cpp:42:9: warning: unused variable 'x' [-Wunused-variable]",
    "model.cuh:120: warning: ignoring #pragma omp [-Wunknown-pragmas]",
    "train_et.cu(310): warning #177-D: variable \"y\" was declared but never referenced",
    "nvcc warning : Support for offline compilation for architectures prior to '<compute/sm/lto>_75' will be removed",
    "ptxas warning : Registers are spilled to local memory in function 'kernel', 8 bytes spill stores",
    "/usr/bin/ld: warning: libfoo.so, needed by bar, not found",
    "cc1plus: warning: command-line option '-Wno-x' is valid for C/ObjC but not for C++",
]
OTHER = [
    "g++ -O2 -std=c++17 -Wall -Wextra -Werror test/test_shard.cpp -o build/test_shard",
    "nvcc -O3 -Xcompiler -Wall,-Wextra train_et.cu -o train_et -lcublas",
    "make: 'train_et' is up to date.",
    "In file included from test/test_shard.cpp:5:",
    # ptxas -v's report (the Makefile keeps it in build/kernels/, for test/test_kernels_compiled.py)
    "ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'",
    "ptxas info    : Function properties for _Z1kPf",
    "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
    "ptxas info    : Used 32 registers, used 1 barriers, 380 bytes cmem[0]",
    "ptxas info    : Compile time = 9.681 ms",
]


def helper(function, text):
    r = subprocess.run(["bash", "-c", f"source {HELPERS}; {function}"], input=text, capture_output=True, text=True,
                       timeout=60)
    return r.stdout.splitlines()


def test_compiler_warnings_only():
    found = helper("compiler_warnings", "\n".join(MAKE_OWN + OTHER + COMPILERS) + "\n")
    assert found == COMPILERS, f"matched {found}"
    assert helper("compiler_warnings", "\n".join(MAKE_OWN + OTHER) + "\n") == [], "make's own warnings matched"


def test_each_build_is_named_as_it_starts():
    """The first file is announced while the second command has not started yet."""
    commands = "echo 'g++ -O2 a.cpp -o build/a'; sleep 3; echo 'g++ -O2 b.cpp -o build/b -lm'"
    script = f"source {HELPERS}; ({commands}) | announce_builds"
    start = time.monotonic()
    with subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, text=True) as p:
        first = p.stdout.readline()
        seconds = time.monotonic() - start
        rest = p.stdout.read()
    assert first.strip() == "build/a" and seconds < 2.5, f"{first!r} after {seconds:.1f} s"
    assert rest.strip() == "build/b", rest


def test_gpu_arch_takes_digits():
    for wrong in ("8.0", "sm_80"):
        r = subprocess.run(["make", "-n", f"GPU_ARCH={wrong}", "train_et"], cwd=REPO, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0 and r.stderr.count("\n") == 1, f"GPU_ARCH={wrong}: exit {r.returncode}: {r.stderr}"
        assert f"GPU_ARCH={wrong}: give the compute capability as digits only, e.g. GPU_ARCH=80" in r.stderr, r.stderr
    r = subprocess.run(["make", "-n", "GPU_ARCH=75", "train_et"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "compute capability 8.0 or newer" in r.stderr, r.stderr
    r = subprocess.run(["make", "-n", "GPU_ARCH=80", "train_et"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "-arch=sm_80" in r.stdout, f"exit {r.returncode}: {r.stderr}"



def test_other_builds_compile():
    src = os.path.join(REPO, "build/emu/src/train_et.cu")
    if not os.path.exists(src):
        raise Skip("the emulated device's sources are not rewritten on this machine",
                   "make build/emu/src/.stamp (make test does, where it emulates the GPU)")
    base = ["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-fsyntax-only",
            "-I" + os.path.join(REPO, "test/emu/include"), "-I" + os.path.join(CUDA_HOME, "include"),
            "-include", os.path.join(REPO, "test/emu/emu.h")]
    for what, flags in (("without NCCL", ["-DENABLE_BF16"]), ("FP32 with NCCL", ["-DENABLE_FP32", "-DMULTI_GPU"]),
                        ("BF16 with NCCL, without MPI", ["-DENABLE_BF16", "-DMULTI_GPU"])):
        r = subprocess.run(base + flags + ["-x", "c++", src], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and not r.stderr, f"train_et {what}: {r.stderr[-2000:]}"


if __name__ == "__main__":
    main(globals())
