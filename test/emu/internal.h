// test/emu/internal.h: what the emulator's parts share: the settings read
// from the environment, errors (sticky faults and launch errors, as CUDA has
// them), the device-memory table, and the counters a dry run reports.
// device.cpp runs kernels, runtime.cpp is the CUDA runtime API, cublas.cpp
// the cuBLAS calls; the kernel-facing side is emu.h.
#pragma once

#include <cstdarg>
#include <cstdint>
#include <string>

#include "../../common.h"  // string_format
#define EMU_RUNTIME
#include "emu.h"

namespace emu {

// EMU_SCHEDULE: natural (warp 0 first, lane 0 first, blocks in grid order),
// reversed (the exact reverse), or random[:seed] (a fresh permutation of the
// ready threads at every round and of the blocks at every launch). EMU_DRY_RUN=1: check every launch and
// library call, execute nothing, take no memory. EMU_DIGEST=file: write a hash
// of every device-to-host copy there at exit (two schedules of a race-free
// program give the same digest). EMU_TRACE=1: print every launch.
// EMU_PROFILE=1: print at exit where the emulation's time went, by kernel.
struct Settings {
    enum Order { Natural, Reversed, Random } order = Natural;
    uint64_t seed = 1;
    bool dry_run = false, trace = false, profile = false;
    std::string digest_path;
    int driver = -1;  // EMU_CUDA_DRIVER: the CUDA version of a driver that cannot start this CUDA (0: none); -1: fine
    int gpus = 1;     // EMU_GPUS: the devices the machine reports (each process emulates the one it picks)
};
const Settings& settings();
const char* order_name();

// An H200's limits, as cudaGetDeviceProperties reports them.
static const size_t DEVICE_MEMORY = 143771ull << 20;  // 143771 MiB, as nvidia-smi shows an H200's
static const size_t STATIC_SHARED_LIMIT = 48 << 10;   // bytes of __shared__ a kernel may declare
static const size_t DEFAULT_DYNAMIC_SHARED = 48 << 10; // dynamic shared memory without the opt-in
static const size_t SHARED_PER_BLOCK_OPTIN = 227 << 10; // static + dynamic, with the opt-in
static const int MAX_THREADS = 1024;

// Errors. A fault is what a GPU would do wrong inside a kernel or a library
// call (a hang, a bad access, a broken contract): it is printed, and it
// becomes the sticky error every later runtime call returns, as after a
// kernel fault on a GPU; the process then exits non-zero whatever it does.
// A launch error is a launch the GPU refuses (bad configuration, too much
// shared memory): printed, and returned once by cudaGetLastError.
void fault(cudaError_t error, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void vfault(cudaError_t error, const char* fmt, va_list args);
void launch_error(cudaError_t error, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
bool has_fault();

// Device memory: every cudaMalloc'd range, and pinned host memory.
struct Allocation {
    uintptr_t base;
    size_t bytes;
    bool device;
};
// The allocation holding p, or null.
const Allocation* find_allocation(const void* p);
// "" if [p, p + bytes) lies in one device allocation, else why not.
std::string check_device_bytes(const void* p, size_t bytes);

// Streams: null (the default stream) or one cudaStreamCreate made.
bool stream_valid(cudaStream_t stream);
// The dynamic shared memory a kernel may use (cudaFuncSetAttribute).
size_t max_dynamic_shared(const void* kernel);

// What ran, for the dry run's report.
struct Counters {
    uint64_t launches = 0, blocks = 0, threads = 0, blas_calls = 0, library_calls = 0;
    size_t device_bytes = 0, peak_device_bytes = 0;
};
Counters& counters();
void note_kernel(const char* name);
size_t distinct_kernels();
// EMU_PROFILE: the kernels by the wall time their emulation took.
std::string profile_report();

}  // namespace emu
