// test/emu/emu.h: what a kernel sees when train_et's CUDA sources run on the
// emulated device, the CPU.
//
// The emulator compiles the project's unchanged CUDA sources with g++ as host
// C++ (README: "The emulated device"). test/emu/rewrite.py first turns what
// host C++ cannot express (kernel<<<grid, block>>>(args), __shared__
// declarations, __launch_bounds__) into calls of this header; g++
// force-includes it (-include) before every emulated source. It gives the kernels what nvcc
// gives them on a GPU:
//   - the built-in variables threadIdx, blockIdx, blockDim, gridDim, warpSize;
//   - __syncthreads and the warp intrinsics (__shfl*_sync, __ballot_sync,
//     __any_sync, __all_sync, __syncwarp) as rendezvous of the emulated
//     threads, which are fibers run by test/emu/device.cpp; every call passes
//     its source line, so a barrier or shuffle that the threads reach at
//     different places is reported, not silently merged;
//   - atomics, and the device math intrinsics with their CPU equivalents
//     (exact ones: __expf is expf here, an approximation on the GPU);
//   - shared memory (emu::shared_var, emu::dynamic_shared) and launches
//     (emu::launch) in the form rewrite.py writes.
// The runtime API keeps the declarations of CUDA's own headers (so the
// signatures are the real ones); test/emu/runtime.cpp defines it, and
// test/emu/cublas.cpp the cuBLAS calls. CUB and wmma come from
// test/emu/include/, found before the toolkit's headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// A __shared__ declaration that rewrite.py did not turn into emu::shared_var
// would be one variable per thread here: stop the build instead.
#undef __shared__
#define __shared__ emu_error_this_shared_declaration_was_not_rewritten_by_test_emu_rewrite_py

namespace emu {

// A place in the source: barriers and warp operations match by it, and
// every report names it.
struct Site {
    const char* file;
    int line;
};
#define EMU_CALL_SITE const char *emu_file = __builtin_FILE(), int emu_line = __builtin_LINE()

// A cp.async copy on its way (include/cuda_pipeline.h): the bytes, read
// from the source when it was issued, and where they land.
struct AsyncCopy {
    unsigned char* dst;
    std::vector<unsigned char> bytes;
};

// The emulated thread now running (device.cpp switches it with the fiber).
struct Thread {
    uint3 idx;  // threadIdx
    unsigned lane, warp;
    // its cp.async copies not landed yet: the committed batches, oldest
    // first, and the open one (issued since the last commit)
    std::deque<std::vector<AsyncCopy>> async_committed;
    std::vector<AsyncCopy> async_open;
};
extern Thread* current_thread;
extern uint3 current_block;
extern dim3 current_block_dim, current_grid_dim;

// Reports a broken device-side contract (a CUB or wmma precondition) for the
// thread now running, as a fault of its kernel. Does not return.
[[noreturn]] void device_fault(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// ---------------------------------------------------------------------------
// Barriers and warp operations

void block_barrier(Site site);
// Barriers the block has completed so far (CUB's temp-storage rule uses it).
unsigned long block_barriers_completed();

// One lane's part in a warp-wide operation. The lanes named in `mask` meet;
// when the last one arrives, `resolve` runs once with every lane's call
// (lanes[l], null outside the mask) and writes each lane's result. The lanes
// must call the same operation with the same mask at the same place.
struct WarpCall {
    const char* op;
    unsigned mask;
    Site site;
    void (*resolve)(WarpCall* const* lanes);
    uint64_t value = 0, result = 0;  // shuffles and votes: the operand and result, as raw bits
    int arg = 0, width = 32;         // source lane, delta or lane mask; segment width
    void* ptr[4] = {};               // wmma: fragments and memory
    unsigned ldm = 0;
    int layout = 0;
};
void warp_rendezvous(WarpCall& call);

void resolve_shfl(WarpCall* const* lanes);
void resolve_shfl_up(WarpCall* const* lanes);
void resolve_shfl_down(WarpCall* const* lanes);
void resolve_shfl_xor(WarpCall* const* lanes);
void resolve_ballot(WarpCall* const* lanes);
void resolve_nothing(WarpCall* const* lanes);

// The emulator's own work inside a warp operation (moving a wmma tile from
// lane to lane), which is no GPU thread's memory access: a ThreadSanitizer
// build does not see the accesses made while one of these exists.
struct EmulatorWork {
    EmulatorWork();
    ~EmulatorWork();
    EmulatorWork(const EmulatorWork&) = delete;
    EmulatorWork& operator=(const EmulatorWork&) = delete;
};

template <class T>
uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>,
                  "warp shuffles move values of at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}
template <class T>
T from_bits(uint64_t bits) {
    T v;
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}
template <class T>
T shuffle(const char* op, void (*resolve)(WarpCall* const*), unsigned mask, T var, int arg, int width, Site site) {
    WarpCall call{op, mask, site, resolve};
    call.value = to_bits(var);
    call.arg = arg;
    call.width = width;
    warp_rendezvous(call);
    return from_bits<T>(call.result);
}

// ---------------------------------------------------------------------------
// Shared memory. Static: one variable per declaration and block, poisoned
// (0xFF bytes) when the block first reaches the declaration; `tag` is a
// static of the declaring function, unique per declaration. Dynamic: the
// launch's byte count, poisoned at each block's start.

void* shared_storage(const void* tag, size_t bytes, size_t align, const char* name, Site site);
void* dynamic_shared_storage();

template <class T, size_t Align = 0>
T& shared_var(const void* tag, const char* name, const char* file, int line) {
    static_assert(std::is_trivially_default_constructible_v<std::remove_all_extents_t<T>>,
                  "a __shared__ variable must be trivially constructible");
    return *static_cast<T*>(shared_storage(tag, sizeof(T), std::max(Align, alignof(T)), name, {file, line}));
}
template <class T>
T* dynamic_shared() {
    return static_cast<T*>(dynamic_shared_storage());
}

// ---------------------------------------------------------------------------
// Launches. rewrite.py turns kernel<<<grid, block, smem, stream>>>(args) into
// emu::launch("kernel", kernel, __FILE__, __LINE__, grid, block, smem,
// stream)(args): the arguments convert to the kernel's parameter types as
// at a real launch, and every thread gets its own copy of them.

struct LaunchConfig {
    dim3 grid, block;
    size_t shared_bytes;
    cudaStream_t stream;
};
void run_kernel(const char* name, const void* kernel, const LaunchConfig& config, Site site,
                void (*thread_body)(void*), void* closure);

template <class... P>
struct KernelLaunch {
    const char* name;
    void (*kernel)(P...);
    LaunchConfig config;
    Site site;

    template <class... A>
    void operator()(A&&... args) const {
        static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
        using Params = std::tuple<std::decay_t<P>...>;
        struct Closure {
            void (*kernel)(P...);
            Params params;
        } closure{kernel, Params(std::forward<A>(args)...)};
        run_kernel(name, reinterpret_cast<const void*>(kernel), config, site,
                   [](void* c) {
                       Closure* k = static_cast<Closure*>(c);
                       std::apply(k->kernel, k->params);  // by value: a copy per thread
                   },
                   &closure);
    }
};

template <class... P>
KernelLaunch<P...> launch(const char* name, void (*kernel)(P...), const char* file, int line, dim3 grid, dim3 block,
                          size_t shared_bytes = 0, cudaStream_t stream = nullptr) {
    return {name, kernel, {grid, block, shared_bytes, stream}, {file, line}};
}

// A kernel template whose arguments the launch deduces (kernel<<<g, b>>>(args)
// with no <...>): no function pointer exists before the call, so rewrite.py
// passes `call`, a generic lambda making it; each thread gets a copy of the
// arguments (decayed) and the call deduces and converts as on a GPU.
template <class Call>
struct DeducedKernelLaunch {
    const char* name;
    Call call;
    LaunchConfig config;
    Site site;

    template <class... A>
    void operator()(A&&... args) const {
        using Args = std::tuple<std::decay_t<A>...>;
        struct Closure {
            Call call;
            Args args;
        } closure{call, Args(std::forward<A>(args)...)};
        run_kernel(name, nullptr, config, site,
                   [](void* c) {
                       Closure* k = static_cast<Closure*>(c);
                       std::apply(k->call, k->args);
                   },
                   &closure);
    }
};

template <class Call>
DeducedKernelLaunch<Call> launch_deduced(const char* name, Call call, const char* file, int line, dim3 grid,
                                         dim3 block, size_t shared_bytes = 0, cudaStream_t stream = nullptr) {
    return {name, call, {grid, block, shared_bytes, stream}, {file, line}};
}

// __launch_bounds__(max_threads, ...) of a kernel, recorded by rewrite.py at
// namespace scope after the kernel's body; launches with more threads fail.
bool register_launch_bounds(const char* kernel, const char* file, int line, int max_threads, int min_blocks = 0,
                            int max_cluster = 0);

// What a CUB collective hands the threads that get no result (the block
// reduction's result exists in thread 0 only): NaN, or a pattern for integers.
template <class T>
T unspecified_value() {
    if constexpr (std::is_floating_point_v<T>) return std::numeric_limits<T>::quiet_NaN();
    T v;
    std::memset(static_cast<void*>(&v), 0x55, sizeof(T));
    return v;
}

// Library code on the host side (CUB's device-wide algorithms): a range it
// reads or writes must lie inside one device allocation; if not, the call
// is a fault (reported; returns false).
bool check_library_range(const void* p, size_t bytes, const char* call, const char* what);
void count_library_call();
bool sticky_fault();  // a fault has happened: the device runs nothing more
bool dry_run();

}  // namespace emu

// The runtime's C++ overload for kernels (CUDA's own is for nvcc only).
template <class... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
    return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// ---------------------------------------------------------------------------
// The built-in variables (not for the emulator's own sources, where names
// like cudaDeviceProp::warpSize must stay what they are)

#ifndef EMU_RUNTIME
#define threadIdx (::emu::current_thread->idx)
#define blockIdx (::emu::current_block)
#define blockDim (::emu::current_block_dim)
#define gridDim (::emu::current_grid_dim)
#ifndef warpSize
#define warpSize 32
#endif
#endif

// ---------------------------------------------------------------------------
// Synchronisation

inline void __syncthreads(EMU_CALL_SITE) { ::emu::block_barrier({emu_file, emu_line}); }
inline void __syncwarp(unsigned mask = 0xffffffffu, EMU_CALL_SITE) {
    ::emu::WarpCall call{"__syncwarp", mask, {emu_file, emu_line}, ::emu::resolve_nothing};
    ::emu::warp_rendezvous(call);
}
// Memory is coherent on the emulated device: fences order nothing further.
inline void __threadfence() {}
inline void __threadfence_block() {}

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, EMU_CALL_SITE) {
    return ::emu::shuffle("__shfl_sync", ::emu::resolve_shfl, mask, var, src_lane, width, {emu_file, emu_line});
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, EMU_CALL_SITE) {
    return ::emu::shuffle("__shfl_up_sync", ::emu::resolve_shfl_up, mask, var, (int)delta, width, {emu_file, emu_line});
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, EMU_CALL_SITE) {
    return ::emu::shuffle("__shfl_down_sync", ::emu::resolve_shfl_down, mask, var, (int)delta, width,
                          {emu_file, emu_line});
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, EMU_CALL_SITE) {
    return ::emu::shuffle("__shfl_xor_sync", ::emu::resolve_shfl_xor, mask, var, lane_mask, width,
                          {emu_file, emu_line});
}
inline unsigned __ballot_sync(unsigned mask, int predicate, EMU_CALL_SITE) {
    return (unsigned)::emu::shuffle("__ballot_sync", ::emu::resolve_ballot, mask, (unsigned)(predicate != 0), 0, 32,
                                    {emu_file, emu_line});
}
inline int __any_sync(unsigned mask, int predicate, EMU_CALL_SITE) {
    return ::emu::shuffle("__any_sync", ::emu::resolve_ballot, mask, (unsigned)(predicate != 0), 0, 32,
                          {emu_file, emu_line}) != 0;
}
inline int __all_sync(unsigned mask, int predicate, EMU_CALL_SITE) {
    return ::emu::shuffle("__all_sync", ::emu::resolve_ballot, mask, (unsigned)(predicate != 0), 0, 32,
                          {emu_file, emu_line}) == mask;
}

// ---------------------------------------------------------------------------
// Atomics. Threads switch only at barriers and warp operations, so every
// read-modify-write is whole; the __atomic builtins also tell a
// ThreadSanitizer build that these accesses are atomic.

#define EMU_ATOMIC_INT(name, builtin)                                                                             \
    inline int name(int* a, int v) { return builtin(a, v, __ATOMIC_RELAXED); }                                  \
    inline unsigned name(unsigned* a, unsigned v) { return builtin(a, v, __ATOMIC_RELAXED); }                   \
    inline unsigned long long name(unsigned long long* a, unsigned long long v) {                               \
        return builtin(a, v, __ATOMIC_RELAXED);                                                                 \
    }
EMU_ATOMIC_INT(atomicAdd, __atomic_fetch_add)
EMU_ATOMIC_INT(atomicSub, __atomic_fetch_sub)
EMU_ATOMIC_INT(atomicAnd, __atomic_fetch_and)
EMU_ATOMIC_INT(atomicOr, __atomic_fetch_or)
EMU_ATOMIC_INT(atomicXor, __atomic_fetch_xor)
#undef EMU_ATOMIC_INT

template <class T, class F>
T emu_atomic_update(T* a, F f) {
    T old = __atomic_load_n(a, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(a, &old, f(old), false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    return old;
}
inline float atomicAdd(float* a, float v) {
    return ::emu::from_bits<float>(emu_atomic_update((uint32_t*)a, [v](uint32_t old) {
        return (uint32_t)::emu::to_bits(::emu::from_bits<float>(old) + v);
    }));
}
inline double atomicAdd(double* a, double v) {
    return ::emu::from_bits<double>(emu_atomic_update((uint64_t*)a, [v](uint64_t old) {
        return ::emu::to_bits(::emu::from_bits<double>(old) + v);
    }));
}
template <class T>
T atomicMax(T* a, T v) {
    return emu_atomic_update(a, [v](T old) { return old > v ? old : v; });
}
template <class T>
T atomicMin(T* a, T v) {
    return emu_atomic_update(a, [v](T old) { return old < v ? old : v; });
}
template <class T>
T atomicExch(T* a, T v) {
    return __atomic_exchange_n(a, v, __ATOMIC_RELAXED);
}
inline float atomicExch(float* a, float v) {
    return ::emu::from_bits<float>(__atomic_exchange_n((uint32_t*)a, (uint32_t)::emu::to_bits(v), __ATOMIC_RELAXED));
}
template <class T>
T atomicCAS(T* a, T compare, T v) {
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return compare;  // the old value either way
}

// ---------------------------------------------------------------------------
// Device math: the CPU's exact functions stand in for the GPU's intrinsics
// (so fast-math approximations are not reproduced), rounding to nearest.

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float cospif(float x) { return (float)cos(M_PI * (double)x); }
inline float sinpif(float x) { return (float)sin(M_PI * (double)x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }

inline unsigned __float_as_uint(float x) { return ::emu::from_bits<unsigned>(::emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ::emu::from_bits<float>(::emu::to_bits(x)); }
inline int __float_as_int(float x) { return ::emu::from_bits<int>(::emu::to_bits(x)); }
inline float __int_as_float(int x) { return ::emu::from_bits<float>(::emu::to_bits(x)); }
inline long long __double_as_longlong(double x) { return ::emu::from_bits<long long>(::emu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return ::emu::from_bits<double>(::emu::to_bits(x)); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
template <class T>
T __ldg(const T* p) {
    return *p;
}
