// test/gpu_check.h: what the GPU parity tests (test/gpu_test_*.cu) share:
// the tolerances, seeded random inputs rounded as the GPU rounds, device
// buffers and poisoning, the comparisons with a CPU reference, and the
// runner that names the test a kernel fault happens in.
//
// Why one header: every GPU test program checks its kernels the same way
// (test/gpu_test_model.cu says how and why), so the rules live in one place
// and a program holds only its own tests. Include it at global scope after
// ../model.cuh and check.h, and after the `namespace ref` block that wraps
// the CPU references, so the references never see these helpers.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../model.cuh"
#include "check.h"

#ifdef ENABLE_FP32
#define PRECISION_NAME "fp32"
static const double TOL = 1e-4;  // floatX outputs
#else
#define PRECISION_NAME "bf16"
static const double TOL = 2e-2;
#endif
static const double TOL_FP32 = 1e-4;  // fp32 outputs computed from the same inputs as the reference

#define TEST_NAME(op) "gpu_" PRECISION_NAME "_" op
// The test case test_<op>, named gpu_<precision>_<op>.
#define GPU_TEST(op) TestCase{TEST_NAME(#op), test_##op}

// ----------------------------------------------------------------------------
// Numbers and random inputs

inline double to_double(float x) { return x; }
inline double to_double(__nv_bfloat16 x) { return (double)__bfloat162float(x); }

// Rounds to floatX as the GPU does (round to nearest even).
inline floatX to_floatX(double x) {
#ifdef ENABLE_FP32
    return (float)x;
#else
    return __float2bfloat16((float)x);
#endif
}

template <typename T>
std::vector<double> to_doubles(const std::vector<T>& v) {
    std::vector<double> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = to_double(v[i]);
    return out;
}

inline double uniform(Rng& rng, double lo, double hi) { return lo + (hi - lo) * rng.uniform(); }
inline double normal(Rng& rng) {  // Box-Muller
    double u1 = rng.uniform(), u2 = rng.uniform();
    return std::sqrt(-2.0 * std::log(1.0 - u1)) * std::cos(2.0 * M_PI * u2);
}
inline std::vector<floatX> random_floatX(Rng& rng, size_t n, double lo, double hi) {
    std::vector<floatX> v(n);
    for (floatX& x : v) x = to_floatX(uniform(rng, lo, hi));
    return v;
}
inline std::vector<float> random_float(Rng& rng, size_t n, double lo, double hi) {
    std::vector<float> v(n);
    for (float& x : v) x = (float)uniform(rng, lo, hi);
    return v;
}

// ----------------------------------------------------------------------------
// Device memory

template <typename T>
std::vector<T> download_from(const T* device, size_t n) {
    std::vector<T> host(n);
    cudaCheck(cudaMemcpy(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
}
template <typename T>
void upload_to(T* device, const std::vector<T>& host) {
    cudaCheck(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
}

// Poison bytes: 0xFF is NaN as bf16 and fp32. Integers get 0x55 bytes
// (0x55555555 is no valid slot, token, count or -1; a mask byte 0x55 is
// neither 0 nor 1).
static const int FLOAT_POISON = 0xFF, INT_POISON = 0x55;
template <typename T>
void poison(T* device, size_t n, int byte = FLOAT_POISON) {
    cudaCheck(cudaMemset(device, byte, n * sizeof(T)));
}

// A device array that frees itself.
template <typename T>
struct DeviceBuffer {
    T* ptr = nullptr;
    size_t n = 0;
    explicit DeviceBuffer(size_t count) : n(count) { cudaCheck(cudaMalloc(&ptr, (count ? count : 1) * sizeof(T))); }
    explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
    ~DeviceBuffer() { cudaCheck(cudaFree(ptr)); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    void upload(const std::vector<T>& host) {
        if (host.size() != n) fail("internal: uploading %zu values into a buffer of %zu", host.size(), n);
        upload_to(ptr, host);
    }
    std::vector<T> download() const { return download_from(ptr, n); }
    void poison(int byte = FLOAT_POISON) { ::poison(ptr, n, byte); }
};

// ----------------------------------------------------------------------------
// The test now running, and faults

// Named when a kernel faults or a checked call in model.cuh or router.cuh
// ends the program (fail() exits; the hook below still names the test).
static const char* g_test = "?";
static bool g_in_test = false;
static void name_test_on_exit() {
    if (g_in_test) printf("FAIL - %s: the program exited inside this test (the error is above)\n", g_test);
    fflush(stdout);
}

// Waits for the kernels under test; a fault is reported against this test
// and ends the program (the CUDA context is unusable after one).
inline void sync_after(const char* op) {
    cudaError_t err = cudaDeviceSynchronize();
    if (err == cudaSuccess) err = cudaGetLastError();
    if (err != cudaSuccess) {
        printf("FAIL - %s: %s: %s\n", g_test, op, cudaGetErrorString(err));
        g_in_test = false;
        exit(1);
    }
}

inline bool verbose() {
    static const bool on = getenv("TRAIN_ET_TEST_VERBOSE") != nullptr;
    return on;
}

// ----------------------------------------------------------------------------
// Comparisons

// (memcmp may not be given an empty vector's null data(), even for 0 bytes)
template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

inline double l2_norm(const std::vector<double>& v) {
    double sum = 0;
    for (double x : v) sum += x * x;
    return std::sqrt(sum);
}
inline double l2_distance(const std::vector<double>& a, const std::vector<double>& b) {
    double sum = 0;
    for (size_t i = 0; i < a.size(); i++) sum += (a[i] - b[i]) * (a[i] - b[i]);
    return std::sqrt(sum);
}
inline size_t count_nan(const std::vector<double>& v) {
    size_t n = 0;
    for (double x : v) n += std::isnan(x) ? 1 : 0;
    return n;
}

// ||gpu - ref|| / ||scale|| (absolute when scale is all zero); NaN stays NaN.
inline double relative_error(const std::vector<double>& gpu, const std::vector<double>& ref,
                             const std::vector<double>& scale) {
    double norm = l2_norm(scale), dist = l2_distance(gpu, ref);
    return norm > 0 ? dist / norm : dist;
}

inline void check_error(Test& t, const std::string& what, double err, double tol) {
    if (verbose()) printf("#   %s: %s: relative error %.3e (tolerance %.0e)\n", g_test, what.c_str(), err, tol);
    CHECK(t, err < tol, "%s: relative error %.3e, tolerance %.0e", what.c_str(), err, tol);
}

// An output the kernels overwrite: every element written (no poison NaN
// left) and close to the reference.
inline void check_close(Test& t, const std::string& what, const std::vector<double>& gpu,
                        const std::vector<double>& ref, double tol) {
    if (gpu.size() != ref.size()) {
        CHECK(t, false, "%s: %zu values, the reference has %zu", what.c_str(), gpu.size(), ref.size());
        return;
    }
    size_t nan = count_nan(gpu);
    CHECK(t, nan == 0, "%s: %zu of %zu values NaN (never written, or computed as NaN)", what.c_str(), nan, gpu.size());
    check_error(t, what, relative_error(gpu, ref, ref), tol);
}

// An output the kernels accumulate into: it started as `start`, the
// reference says they add `contribution`.
inline void check_accumulated(Test& t, const std::string& what, const std::vector<double>& gpu,
                              const std::vector<double>& start, const std::vector<double>& contribution, double tol) {
    std::vector<double> ref(start.size());
    for (size_t i = 0; i < ref.size(); i++) ref[i] = start[i] + contribution[i];
    size_t nan = count_nan(gpu);
    CHECK(t, nan == 0, "%s: %zu of %zu values NaN", what.c_str(), nan, gpu.size());
    check_error(t, what + " (error relative to the contribution)", relative_error(gpu, ref, contribution), tol);
}

// ----------------------------------------------------------------------------
// The program

static cublasHandle_t g_cublas = nullptr;

// Opens the GPU and cuBLAS, then runs the tests one at a time, so a fault or
// an exit names its test. Returns non-zero if any test failed. A GPU that
// cannot be opened is a failure with the reason, never a skip: run_tests.sh
// runs these programs only where nvidia-smi lists a GPU (elsewhere their
// emulated builds run), so there CUDA must start.
inline int run_gpu_tests(const char* program, const std::vector<TestCase>& tests) {
    GpuInfo gpu;
    const std::string err = gpu_open(0, &gpu);
    if (!err.empty()) {
        printf("FAIL - %s: %s\n", program, err.c_str());
        return 1;
    }
    if (verbose()) printf("# %s, %s build\n", gpu.prop.name, PRECISION_NAME);
    cublasCheck(cublasCreate(&g_cublas));
    cublasCheck(cublasSetMathMode(g_cublas, CUBLAS_DEFAULT_MATH));  // as the model: no TF32 in the FP32 build

    atexit(name_test_on_exit);
    int failed = 0;
    for (const TestCase& tc : tests) {
        g_test = tc.name;
        g_in_test = true;
        failed |= run_tests({tc});
        g_in_test = false;
    }
    cublasCheck(cublasDestroy(g_cublas));
    return failed;
}
