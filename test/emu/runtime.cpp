// test/emu/runtime.cpp: the CUDA runtime API of the emulated device.
//
// Every function keeps the declaration in CUDA's own cuda_runtime_api.h, so a
// call that compiles against the toolkit compiles here with the same
// signature; libcudart is not linked. The device is one H200 (its limits in
// cudaGetDeviceProperties); device memory is host memory, filled with 0xFF
// bytes (NaN as bf16 and fp32) when allocated, so a kernel that reads what
// nothing wrote computes NaN. Copies and memsets are checked against the
// allocations they touch and the direction they claim. Kernels run when they
// are launched, so streams and events only keep their order, and an event's
// time is the wall clock at its record.
//
// Errors behave as CUDA's: a launch the device refuses is returned once by
// cudaGetLastError; a fault (see internal.h) is sticky and returned by every
// later call. The emulator also prints each as "emu: error: ...", and a
// process with a fault, or with a launch error it never asked about, exits
// non-zero: nothing passes silently.
//
// At exit: EMU_DIGEST writes the hash of every device-to-host copy, and a dry
// run (EMU_DRY_RUN=1) reports what it checked and the device memory it would
// have used.
//
// EMU_CUDA_DRIVER=VERSION stands in for a machine where CUDA cannot start:
// cudaGetDeviceCount fails with cudaErrorInsufficientDriver, as CUDA's does,
// and cudaDriverGetVersion reports VERSION: 0 for no NVIDIA driver at all,
// 12040 (say) for a driver older than this toolkit needs. EMU_GPUS=N makes
// the machine report N devices, for the multi-process tests: each process
// picks one (cudaSetDevice) and emulates it alone, its own memory its own.
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <string>

#include "internal.h"

namespace emu {

namespace {

Settings settings_from_environment() {
    Settings s;
    if (const char* order = getenv("EMU_SCHEDULE")) {
        std::string o = order;
        if (o == "natural") s.order = Settings::Natural;
        else if (o == "reversed") s.order = Settings::Reversed;
        else if (o == "random" || o.rfind("random:", 0) == 0) {
            s.order = Settings::Random;
            if (o.size() > 7) {
                char* end = nullptr;
                s.seed = strtoull(o.c_str() + 7, &end, 10);
                if (*end != '\0') {
                    fprintf(stderr, "emu: error: EMU_SCHEDULE=%s: the seed after 'random:' must be an integer\n", order);
                    exit(2);
                }
            }
        } else {
            fprintf(stderr, "emu: error: EMU_SCHEDULE=%s: use natural, reversed, random or random:SEED\n", order);
            exit(2);
        }
    }
    auto flag = [](const char* name) {
        const char* v = getenv(name);
        return v && *v && strcmp(v, "0") != 0;
    };
    s.dry_run = flag("EMU_DRY_RUN");
    s.trace = flag("EMU_TRACE");
    s.profile = flag("EMU_PROFILE");
    if (const char* digest = getenv("EMU_DIGEST")) s.digest_path = digest;
    if (const char* driver = getenv("EMU_CUDA_DRIVER")) {
        char* end = nullptr;
        long version = strtol(driver, &end, 10);
        if (*driver == '\0' || *end != '\0' || version < 0 || version >= CUDART_VERSION) {
            fprintf(stderr, "emu: error: EMU_CUDA_DRIVER=%s: give a CUDA version below this toolkit's %d (0: no driver)\n",
                    driver, CUDART_VERSION);
            exit(2);
        }
        s.driver = (int)version;
    }
    if (const char* gpus = getenv("EMU_GPUS")) {
        char* end = nullptr;
        const long n = strtol(gpus, &end, 10);
        if (*gpus == '\0' || *end != '\0' || n < 1 || n > 64) {
            fprintf(stderr, "emu: error: EMU_GPUS=%s: give a device count from 1 to 64\n", gpus);
            exit(2);
        }
        s.gpus = (int)n;
    }
    return s;
}

// The state below that has a destructor is allocated once and never freed:
// the exit handler (at_exit) and the destructors of the program's own statics
// still use it, in whatever order the C++ runtime ends things.

// Errors, as the runtime keeps them.
cudaError_t last_error = cudaSuccess;    // cudaGetLastError's, until it is read
cudaError_t sticky_error = cudaSuccess;  // after a fault, every call's
bool launch_error_unread = false;        // a refused launch nobody asked cudaGetLastError about
std::string& first_unread_launch = *new std::string;
int faults = 0;

// The digest of every device-to-host copy (FNV-1a, 64 bits).
uint64_t digest = 0xcbf29ce484222325ull;
uint64_t digest_bytes = 0;
void add_to_digest(const void* p, size_t n) {
    const unsigned char* b = (const unsigned char*)p;
    for (size_t i = 0; i < n; i++) digest = (digest ^ b[i]) * 0x100000001b3ull;
    digest_bytes += n;
}

std::map<uintptr_t, Allocation>& allocations = *new std::map<uintptr_t, Allocation>;
uintptr_t next_fake_address = 0x100000000000ull;  // dry run: addresses nothing is ever written at

struct EventRecord {
    unsigned flags = 0;
    bool recorded = false;
    double seconds = 0;
};
std::map<cudaEvent_t, EventRecord>& events = *new std::map<cudaEvent_t, EventRecord>;
std::set<cudaStream_t>& streams = *new std::set<cudaStream_t>;
std::map<const void*, size_t>& dynamic_shared_limits = *new std::map<const void*, size_t>;

double now_seconds() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// What every call returns: the sticky error once there is one.
cudaError_t result(cudaError_t e) {
    if (sticky_error != cudaSuccess) return sticky_error;
    if (e != cudaSuccess) last_error = e;
    return e;
}

// A call the program got wrong: printed, and returned as CUDA returns it.
cudaError_t misuse(cudaError_t e, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
cudaError_t misuse(cudaError_t e, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "emu: error: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    va_end(args);
    return result(e);
}

void at_exit() {
    const Settings& s = settings();
    if (!s.digest_path.empty()) {
        FILE* f = fopen(s.digest_path.c_str(), "w");
        if (!f || fprintf(f, "%016" PRIx64 " %" PRIu64 "\n", digest, digest_bytes) < 0 || fclose(f) != 0)
            fprintf(stderr, "emu: error: cannot write the digest to %s\n", s.digest_path.c_str());
    }
    const Counters& c = counters();
    if (s.dry_run)
        fprintf(stderr,
                "emu: dry run: %" PRIu64 " launches of %zu kernels and %" PRIu64 " cuBLAS and %" PRIu64
                " CUB and NCCL calls checked, nothing executed; device memory peak %zu bytes (%.3f GiB)\n",
                c.launches, distinct_kernels(), c.blas_calls, c.library_calls, c.peak_device_bytes,
                c.peak_device_bytes / 1073741824.0);
    if (s.profile) fputs(profile_report().c_str(), stderr);
    bool failed = faults > 0;
    if (launch_error_unread) {
        fprintf(stderr, "emu: error: the program ends without having read the launch error of %s "
                        "(cudaGetLastError after every launch)\n", first_unread_launch.c_str());
        failed = true;
    }
    if (failed) {
        fprintf(stderr, "emu: exiting with status 1: the emulated device reported errors (above)\n");
        fflush(stdout);
        fflush(stderr);
        _exit(1);
    }
}

struct Startup {
    Startup() {
        settings();  // read the environment now, so a bad setting stops the program before it starts
        atexit(at_exit);
    }
} startup;

}  // namespace

const Settings& settings() {
    static const Settings* s = new Settings(settings_from_environment());
    return *s;
}

const char* order_name() {
    switch (settings().order) {
        case Settings::Natural: return "natural";
        case Settings::Reversed: return "reversed";
        case Settings::Random: return "random";
    }
    return "?";
}

void vfault(cudaError_t error, const char* fmt, va_list args) {
    fprintf(stderr, "emu: error: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    fflush(stderr);
    faults++;
    if (sticky_error == cudaSuccess) sticky_error = error;
}

void fault(cudaError_t error, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vfault(error, fmt, args);
    va_end(args);
}

void launch_error(cudaError_t error, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    char buf[4096];
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    fprintf(stderr, "emu: error: %s\n", buf);
    last_error = error;
    if (!launch_error_unread) first_unread_launch = buf;
    launch_error_unread = true;
}

bool has_fault() { return sticky_error != cudaSuccess; }
bool sticky_fault() { return has_fault(); }

Counters& counters() {
    static Counters* c = new Counters;
    return *c;
}

namespace {
std::set<std::string>& kernel_names() {
    static std::set<std::string>* names = new std::set<std::string>;
    return *names;
}
}  // namespace
void note_kernel(const char* name) { kernel_names().insert(name); }
size_t distinct_kernels() { return kernel_names().size(); }

bool dry_run() { return settings().dry_run; }

const Allocation* find_allocation(const void* p) {
    const uintptr_t a = (uintptr_t)p;
    auto it = allocations.upper_bound(a);
    if (it == allocations.begin()) return nullptr;
    --it;
    const Allocation& al = it->second;
    return a < al.base + std::max<size_t>(al.bytes, 1) ? &al : nullptr;
}

std::string check_device_bytes(const void* p, size_t bytes) {
    const Allocation* a = find_allocation(p);
    if (!a || !a->device) return string_format("%p is not device memory (no cudaMalloc returned a range holding it)", p);
    const size_t offset = (uintptr_t)p - a->base;
    if (offset + bytes > a->bytes)
        return string_format("%zu bytes at offset %zu of a %zu-byte device allocation (%p) end %zu bytes past it", bytes,
                      offset, a->bytes, (void*)a->base, offset + bytes - a->bytes);
    return "";
}

bool check_library_range(const void* p, size_t bytes, const char* call, const char* what) {
    std::string why = check_device_bytes(p, bytes);
    if (why.empty()) return true;
    fault(cudaErrorLaunchFailure, "%s: %s: %s", call, what, why.c_str());
    return false;
}

void count_library_call() { counters().library_calls++; }

bool stream_valid(cudaStream_t stream) { return stream == nullptr || streams.count(stream) > 0; }

size_t max_dynamic_shared(const void* kernel) {
    auto it = dynamic_shared_limits.find(kernel);
    return it == dynamic_shared_limits.end() ? DEFAULT_DYNAMIC_SHARED : it->second;
}

}  // namespace emu

using namespace emu;

struct CUstream_st {
    int unused;
};
struct CUevent_st {
    int unused;
};

// ---------------------------------------------------------------------------
// Device and errors

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
    *count = settings().driver >= 0 ? 0 : settings().gpus;
    return result(settings().driver >= 0 ? cudaErrorInsufficientDriver : cudaSuccess);
}

static int current_device = 0;  // cudaSetDevice's choice

cudaError_t cudaSetDevice(int device) {
    if (device < 0 || device >= settings().gpus)
        return misuse(cudaErrorInvalidDevice, "cudaSetDevice(%d): the emulated machine has %d device%s (EMU_GPUS)",
                      device, settings().gpus, settings().gpus == 1 ? "" : "s");
    current_device = device;
    return result(cudaSuccess);
}

cudaError_t cudaGetDevice(int* device) {
    *device = current_device;
    return result(cudaSuccess);
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
    if (device < 0 || device >= settings().gpus)
        return misuse(cudaErrorInvalidDevice, "cudaGetDeviceProperties(device %d): the emulated machine has %d (EMU_GPUS)",
                      device, settings().gpus);
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "NVIDIA H200 (emulated on the CPU: test/emu, %s schedule%s)", order_name(),
             settings().dry_run ? ", dry run" : "");
    p->totalGlobalMem = DEVICE_MEMORY;
    p->pciBusID = 0x18 + device;  // the machine's GPUs are told apart as a real machine's are
    p->uuid.bytes[0] = (char)(device + 1);
    p->sharedMemPerBlock = STATIC_SHARED_LIMIT;
    p->sharedMemPerBlockOptin = SHARED_PER_BLOCK_OPTIN;
    p->sharedMemPerMultiprocessor = 228 << 10;
    p->reservedSharedMemPerBlock = 1 << 10;
    p->regsPerBlock = 65536;
    p->regsPerMultiprocessor = 65536;
    p->warpSize = 32;
    p->maxThreadsPerBlock = MAX_THREADS;
    p->maxThreadsDim[0] = 1024;
    p->maxThreadsDim[1] = 1024;
    p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 2147483647;
    p->maxGridSize[1] = 65535;
    p->maxGridSize[2] = 65535;
    p->totalConstMem = 64 << 10;
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 132;
    p->maxThreadsPerMultiProcessor = 2048;
    p->maxBlocksPerMultiProcessor = 32;
    p->l2CacheSize = 50 << 20;
    p->memoryBusWidth = 6144;
    p->concurrentKernels = 1;
    p->unifiedAddressing = 1;
    p->managedMemory = 1;
    p->cooperativeLaunch = 1;
    p->clusterLaunch = 1;
    return result(cudaSuccess);
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess) return e;
    switch (attr) {
        case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; break;
        case cudaDevAttrMaxSharedMemoryPerBlock: *value = (int)p.sharedMemPerBlock; break;
        case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = (int)p.sharedMemPerBlockOptin; break;
        case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
        case cudaDevAttrComputeCapabilityMajor: *value = p.major; break;
        case cudaDevAttrComputeCapabilityMinor: *value = p.minor; break;
        case cudaDevAttrWarpSize: *value = p.warpSize; break;
        case cudaDevAttrL2CacheSize: *value = p.l2CacheSize; break;
        default:
            return misuse(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute %d is not emulated", (int)attr);
    }
    return result(cudaSuccess);
}

cudaError_t cudaDriverGetVersion(int* version) {
    *version = settings().driver >= 0 ? settings().driver : CUDART_VERSION;
    return result(cudaSuccess);
}

cudaError_t cudaRuntimeGetVersion(int* version) {
    *version = CUDART_VERSION;
    return result(cudaSuccess);
}

cudaError_t cudaDeviceSynchronize(void) { return result(cudaSuccess); }

cudaError_t cudaDeviceReset(void) {
    for (auto& [base, a] : allocations)
        if (!settings().dry_run || !a.device) free((void*)base);
    allocations.clear();
    counters().device_bytes = 0;
    sticky_error = last_error = cudaSuccess;
    launch_error_unread = false;
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
    cudaError_t e = sticky_error != cudaSuccess ? sticky_error : last_error;
    last_error = cudaSuccess;
    launch_error_unread = false;
    return e;
}

cudaError_t cudaPeekAtLastError(void) {
    launch_error_unread = false;
    return sticky_error != cudaSuccess ? sticky_error : last_error;
}

const char* cudaGetErrorName(cudaError_t error) {
    switch (error) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        case cudaErrorNoDevice: return "cudaErrorNoDevice";
        case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
        case cudaErrorNotReady: return "cudaErrorNotReady";
        case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
        default: return "cudaError (not emulated)";
    }
}

const char* cudaGetErrorString(cudaError_t error) {
    switch (error) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorInvalidResourceHandle: return "invalid resource handle";
        case cudaErrorLaunchFailure: return "unspecified launch failure (the emulated device reported the fault above)";
        case cudaErrorNoDevice: return "no CUDA-capable device is detected";
        case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
        case cudaErrorNotReady: return "device not ready";
        case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
        default: return "an error the emulated device never raises";
    }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || (size_t)value > SHARED_PER_BLOCK_OPTIN)
            return misuse(cudaErrorInvalidValue,
                          "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d): at most %zu bytes on an H200", value,
                          SHARED_PER_BLOCK_OPTIN);
        dynamic_shared_limits[func] = (size_t)value;
    }
    return result(cudaSuccess);
}

// ---------------------------------------------------------------------------
// Memory

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
    *ptr = nullptr;
    if (sticky_error != cudaSuccess) return sticky_error;
    if (bytes == 0) return result(cudaSuccess);
    Counters& c = counters();
    if (c.device_bytes + bytes > DEVICE_MEMORY) return result(cudaErrorMemoryAllocation);
    void* p = nullptr;
    if (settings().dry_run) {
        p = (void*)next_fake_address;
        next_fake_address += (bytes + 255) / 256 * 256 + 256;
    } else {
        if (posix_memalign(&p, 256, bytes) != 0) return result(cudaErrorMemoryAllocation);
        memset(p, 0xFF, bytes);  // poison: NaN as bf16 and fp32
    }
    allocations[(uintptr_t)p] = {(uintptr_t)p, bytes, true};
    c.device_bytes += bytes;
    c.peak_device_bytes = std::max(c.peak_device_bytes, c.device_bytes);
    *ptr = p;
    return result(cudaSuccess);
}

cudaError_t cudaFree(void* ptr) {
    if (!ptr) return result(cudaSuccess);
    auto it = allocations.find((uintptr_t)ptr);
    if (it == allocations.end() || !it->second.device)
        return misuse(cudaErrorInvalidValue, "cudaFree(%p): not a pointer cudaMalloc returned (or freed twice)", ptr);
    counters().device_bytes -= it->second.bytes;
    allocations.erase(it);
    if (!settings().dry_run) free(ptr);
    return result(cudaSuccess);
}

cudaError_t cudaMallocHost(void** ptr, size_t bytes) {
    *ptr = nullptr;
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) return result(cudaErrorMemoryAllocation);
    allocations[(uintptr_t)p] = {(uintptr_t)p, bytes, false};
    *ptr = p;
    return result(cudaSuccess);
}

cudaError_t cudaHostAlloc(void** ptr, size_t bytes, unsigned int) { return cudaMallocHost(ptr, bytes); }

cudaError_t cudaFreeHost(void* ptr) {
    if (!ptr) return result(cudaSuccess);
    auto it = allocations.find((uintptr_t)ptr);
    if (it == allocations.end() || it->second.device)
        return misuse(cudaErrorInvalidValue, "cudaFreeHost(%p): not a pointer cudaMallocHost returned", ptr);
    allocations.erase(it);
    free(ptr);
    return result(cudaSuccess);
}

cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total) {
    *total = DEVICE_MEMORY;
    *free_bytes = DEVICE_MEMORY - counters().device_bytes;
    return result(cudaSuccess);
}

}  // extern "C"

namespace {

bool is_device(const void* p) {
    const Allocation* a = find_allocation(p);
    return a && a->device;
}

const char* kind_name(cudaMemcpyKind kind) {
    switch (kind) {
        case cudaMemcpyHostToHost: return "cudaMemcpyHostToHost";
        case cudaMemcpyHostToDevice: return "cudaMemcpyHostToDevice";
        case cudaMemcpyDeviceToHost: return "cudaMemcpyDeviceToHost";
        case cudaMemcpyDeviceToDevice: return "cudaMemcpyDeviceToDevice";
        case cudaMemcpyDefault: return "cudaMemcpyDefault";
    }
    return "an unknown cudaMemcpyKind";
}

cudaError_t copy(const char* call, void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
    if (sticky_error != cudaSuccess) return sticky_error;
    if (!stream_valid(stream)) return misuse(cudaErrorInvalidResourceHandle, "%s: not a live stream", call);
    if (bytes == 0) return result(cudaSuccess);
    const bool dst_device = is_device(dst), src_device = is_device(src);
    if (kind == cudaMemcpyDefault)
        kind = src_device ? (dst_device ? cudaMemcpyDeviceToDevice : cudaMemcpyDeviceToHost)
                          : (dst_device ? cudaMemcpyHostToDevice : cudaMemcpyHostToHost);
    const bool want_src = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    const bool want_dst = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDeviceToDevice)
        return misuse(cudaErrorInvalidMemcpyDirection, "%s: %d is not a cudaMemcpyKind", call, (int)kind);
    if (want_src != src_device || want_dst != dst_device)
        return misuse(cudaErrorInvalidValue, "%s(dst %p, src %p, %zu bytes, %s): the %s is %s memory", call, dst, src,
                      bytes, kind_name(kind), want_src != src_device ? "source" : "destination",
                      (want_src != src_device ? src_device : dst_device) ? "device" : "host");
    for (int side = 0; side < 2; side++) {
        const void* p = side ? src : dst;
        if (!(side ? want_src : want_dst)) continue;
        std::string why = check_device_bytes(p, bytes);
        if (!why.empty())
            return misuse(cudaErrorInvalidValue, "%s(%s, %zu bytes): the %s: %s", call, kind_name(kind), bytes,
                          side ? "source" : "destination", why.c_str());
    }
    if (settings().dry_run) {
        if (!want_src && !want_dst) memmove(dst, src, bytes);
        return result(cudaSuccess);
    }
    memmove(dst, src, bytes);
    if (kind == cudaMemcpyDeviceToHost) add_to_digest(dst, bytes);
    return result(cudaSuccess);
}

cudaError_t fill(const char* call, void* dst, int value, size_t bytes, cudaStream_t stream) {
    if (sticky_error != cudaSuccess) return sticky_error;
    if (!stream_valid(stream)) return misuse(cudaErrorInvalidResourceHandle, "%s: not a live stream", call);
    if (bytes == 0) return result(cudaSuccess);
    std::string why = check_device_bytes(dst, bytes);
    if (!why.empty()) return misuse(cudaErrorInvalidValue, "%s(%p, %d, %zu bytes): %s", call, dst, value, bytes, why.c_str());
    if (!settings().dry_run) memset(dst, value, bytes);
    return result(cudaSuccess);
}

}  // namespace

extern "C" {

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    return copy("cudaMemcpy", dst, src, bytes, kind, nullptr);
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
    return copy("cudaMemcpyAsync", dst, src, bytes, kind, stream);
}
cudaError_t cudaMemset(void* dst, int value, size_t bytes) { return fill("cudaMemset", dst, value, bytes, nullptr); }
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream) {
    return fill("cudaMemsetAsync", dst, value, bytes, stream);
}

// ---------------------------------------------------------------------------
// Streams and events: work runs at its launch, so they keep order by themselves.

cudaError_t cudaStreamCreate(cudaStream_t* stream) {
    *stream = new CUstream_st;
    streams.insert(*stream);
    return result(cudaSuccess);
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) { return cudaStreamCreate(stream); }
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
    if (!streams.erase(stream)) return misuse(cudaErrorInvalidResourceHandle, "cudaStreamDestroy: not a live stream");
    delete stream;
    return result(cudaSuccess);
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    if (!stream_valid(stream)) return misuse(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize: not a live stream");
    return result(cudaSuccess);
}
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int) {
    if (!stream_valid(stream) || !events.count(event))
        return misuse(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent: not a live stream and event");
    return result(cudaSuccess);
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
    *event = new CUevent_st;
    events[*event] = EventRecord{flags, false, 0};
    return result(cudaSuccess);
}
cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }
cudaError_t cudaEventDestroy(cudaEvent_t event) {
    if (!events.erase(event)) return misuse(cudaErrorInvalidResourceHandle, "cudaEventDestroy: not a live event");
    delete event;
    return result(cudaSuccess);
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
    auto it = events.find(event);
    if (it == events.end() || !stream_valid(stream))
        return misuse(cudaErrorInvalidResourceHandle, "cudaEventRecord: not a live event and stream");
    it->second.recorded = true;
    it->second.seconds = now_seconds();
    return result(cudaSuccess);
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
    if (!events.count(event)) return misuse(cudaErrorInvalidResourceHandle, "cudaEventSynchronize: not a live event");
    return result(cudaSuccess);
}
cudaError_t cudaEventQuery(cudaEvent_t event) {
    if (!events.count(event)) return misuse(cudaErrorInvalidResourceHandle, "cudaEventQuery: not a live event");
    return result(cudaSuccess);
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
    auto a = events.find(start), b = events.find(end);
    if (a == events.end() || b == events.end())
        return misuse(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: not live events");
    if ((a->second.flags | b->second.flags) & cudaEventDisableTiming)
        return misuse(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event made with cudaEventDisableTiming");
    if (!a->second.recorded || !b->second.recorded)
        return misuse(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event never recorded");
    *ms = (float)((b->second.seconds - a->second.seconds) * 1e3);
    return result(cudaSuccess);
}

}  // extern "C"
