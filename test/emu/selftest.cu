// test/emu/selftest.cu: the emulated device's own tests (the emulator must
// be right before it can judge train_et's kernels).
//
//   selftest              the contracts: shuffles and votes, barriers and
//                         shared memory, atomics, CUB, wmma, cp.async, cuBLAS against
//                         plain loops (every transposition, fp32 and bf16),
//                         the runtime's errors. One "ok/FAIL - emu-selftest:"
//                         line each.
//   selftest bug NAME     a kernel with one deliberate bug, or its correct
//   selftest twin NAME    twin; prints "NAME: right" (exit 0) or "NAME:
//                         wrong ..." (exit 3) about its result. What must
//                         happen to each (an emulator report, a wrong result
//                         in some schedule, an AddressSanitizer report) is
//                         test/emu/test_emulator.py's table, which runs them.
//   selftest list         the bug names.
//
// Written as CUDA (it goes through test/emu/rewrite.py like the project's
// sources); built only for the emulator.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cub/cub.cuh>
#include <functional>
#include <string>
#include <vector>

#include "../../common.h"
#include "../check.h"

#define CUDA_OK(call)                                                                                      \
    do {                                                                                                   \
        cudaError_t e = (call);                                                                            \
        if (e != cudaSuccess) fail("%s:%d: %s: %s", __FILE__, __LINE__, #call, cudaGetErrorString(e));     \
    } while (0)

template <class T>
static T* device_copy(const std::vector<T>& host) {
    T* d = nullptr;
    CUDA_OK(cudaMalloc(&d, host.size() * sizeof(T)));
    CUDA_OK(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
template <class T>
static std::vector<T> host_copy(const T* d, size_t n) {
    std::vector<T> host(n);
    CUDA_OK(cudaMemcpy(host.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
}

// ============================================================================
// Contracts

// ---- shuffles and votes: every lane's result, as the CUDA guide defines it

__global__ void shuffle_kernel(int* out, int width) {
    const int lane = threadIdx.x % 32, v = 100 + (int)threadIdx.x;
    int* o = out + threadIdx.x * 7;
    o[0] = __shfl_sync(0xffffffffu, v, 5, width);
    o[1] = __shfl_up_sync(0xffffffffu, v, 3, width);
    o[2] = __shfl_down_sync(0xffffffffu, v, 3, width);
    o[3] = __shfl_xor_sync(0xffffffffu, v, 6, width);
    o[4] = (int)__ballot_sync(0xffffffffu, lane % 3 == 0);
    o[5] = __any_sync(0xffffffffu, lane == 17);
    o[6] = __all_sync(0xffffffffu, lane < 31);
}

static void test_shuffles(Test& t) {
    for (int width : {32, 16, 8}) {
        const int n = 64;
        int* d = nullptr;
        CUDA_OK(cudaMalloc(&d, n * 7 * sizeof(int)));
        shuffle_kernel<<<1, n>>>(d, width);
        CUDA_OK(cudaGetLastError());
        const std::vector<int> got = host_copy(d, n * 7);
        CUDA_OK(cudaFree(d));
        int wrong = 0;
        for (int i = 0; i < n; i++) {
            const int lane = i % 32, base = i - i % width, in_seg = i % width, value = 100 + i;
            int ballot = 0;
            for (int l = 0; l < 32; l++) ballot |= (l % 3 == 0) << l;
            const int xor_src = (lane ^ 6) >= (lane / width + 1) * width ? lane : (lane ^ 6);
            const int want[7] = {100 + base + 5 % width, in_seg >= 3 ? value - 3 : value,
                                 in_seg + 3 < width ? value + 3 : value, 100 + i - lane + xor_src, ballot, 1, 0};
            for (int k = 0; k < 7; k++) wrong += got[i * 7 + k] != want[k];
        }
        CHECK(t, wrong == 0, "width %d: %d shuffle or vote results differ from the CUDA guide's", width, wrong);
    }
}

// ---- a block-wide sum in shared memory, with its barrier (schedule-proof)

__global__ void shared_sum_kernel(float* out) {
    __shared__ float values[256];
    values[threadIdx.x] = (float)threadIdx.x + 1;
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) {
        float sum = 0;
        for (unsigned i = 0; i < blockDim.x; i++) sum += values[i];
        out[blockIdx.x] = sum;
    }
}

static void test_shared_memory_and_barriers(Test& t) {
    float* d = nullptr;
    CUDA_OK(cudaMalloc(&d, 3 * sizeof(float)));
    shared_sum_kernel<<<3, 256>>>(d);
    CUDA_OK(cudaGetLastError());
    const std::vector<float> got = host_copy(d, 3);
    CUDA_OK(cudaFree(d));
    for (float g : got) CHECK(t, g == 256 * 257 / 2, "block sum %g, expected %d", g, 256 * 257 / 2);
}

// ---- atomics: every thread adds, integers exactly

__global__ void atomics_kernel(int* count, float* sum, unsigned* max) {
    atomicAdd(count, 1);
    atomicAdd(sum, 0.5f);
    atomicMax(max, threadIdx.x + blockIdx.x * blockDim.x);
}

static void test_atomics(Test& t) {
    int* count = device_copy(std::vector<int>{7});
    float* sum = device_copy(std::vector<float>{1.0f});
    unsigned* max = device_copy(std::vector<unsigned>{0});
    atomics_kernel<<<4, 96>>>(count, sum, max);
    CUDA_OK(cudaGetLastError());
    CHECK(t, host_copy(count, 1)[0] == 7 + 384, "atomicAdd(int): %d", host_copy(count, 1)[0]);
    CHECK(t, host_copy(sum, 1)[0] == 1.0f + 192.0f, "atomicAdd(float): %g", host_copy(sum, 1)[0]);
    CHECK(t, host_copy(max, 1)[0] == 383, "atomicMax: %u", host_copy(max, 1)[0]);
    CUDA_OK(cudaFree(count));
    CUDA_OK(cudaFree(sum));
    CUDA_OK(cudaFree(max));
}

// ---- CUB: the reduction only in thread 0, scans in every thread, the sort stable

static const int CUB_THREADS = 128;

__global__ void cub_kernel(float* reduce_out, int* scan_out) {
    using Reduce = cub::BlockReduce<float, CUB_THREADS>;
    using Scan = cub::BlockScan<int, CUB_THREADS>;
    __shared__ typename Reduce::TempStorage reduce_storage;
    __shared__ typename Scan::TempStorage scan_storage;
    const int t = threadIdx.x;
    reduce_out[t] = Reduce(reduce_storage).Sum(0.25f * t);
    int prefix, total;
    Scan(scan_storage).ExclusiveSum(t % 5, prefix, total);
    __syncthreads();
    int inclusive;
    Scan(scan_storage).InclusiveSum(1, inclusive);
    scan_out[3 * t] = prefix;
    scan_out[3 * t + 1] = total;
    scan_out[3 * t + 2] = inclusive;
}

static void test_cub(Test& t) {
    float* reduce = nullptr;
    int* scan = nullptr;
    CUDA_OK(cudaMalloc(&reduce, CUB_THREADS * sizeof(float)));
    CUDA_OK(cudaMalloc(&scan, 3 * CUB_THREADS * sizeof(int)));
    cub_kernel<<<1, CUB_THREADS>>>(reduce, scan);
    CUDA_OK(cudaGetLastError());
    const std::vector<float> r = host_copy(reduce, CUB_THREADS);
    const std::vector<int> s = host_copy(scan, 3 * CUB_THREADS);
    CHECK(t, r[0] == 0.25f * CUB_THREADS * (CUB_THREADS - 1) / 2, "BlockReduce::Sum in thread 0: %g", r[0]);
    int nan = 0;
    for (int i = 1; i < CUB_THREADS; i++) nan += std::isnan(r[i]);
    CHECK(t, nan == CUB_THREADS - 1, "threads other than 0 must not get the aggregate: %d of %d got NaN", nan,
          CUB_THREADS - 1);
    int prefix = 0, total = 0, wrong = 0;
    for (int i = 0; i < CUB_THREADS; i++) total += i % 5;
    for (int i = 0; i < CUB_THREADS; i++) {
        wrong += s[3 * i] != prefix || s[3 * i + 1] != total || s[3 * i + 2] != i + 1;
        prefix += i % 5;
    }
    CHECK(t, wrong == 0, "BlockScan: %d threads got a wrong prefix or aggregate", wrong);
    CUDA_OK(cudaFree(reduce));
    CUDA_OK(cudaFree(scan));

    // DeviceRadixSort: the size query, then a stable sort on the low bits only
    const int n = 1000;
    std::vector<int> keys(n), values(n);
    Rng rng(3);
    for (int i = 0; i < n; i++) {
        keys[i] = (int)rng.below(64) + ((int)rng.below(4) << 6);  // bits 6..7 must be ignored
        values[i] = i;
    }
    int *k_in = device_copy(keys), *v_in = device_copy(values), *k_out = nullptr, *v_out = nullptr;
    CUDA_OK(cudaMalloc(&k_out, n * sizeof(int)));
    CUDA_OK(cudaMalloc(&v_out, n * sizeof(int)));
    size_t bytes = 0;
    CUDA_OK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, k_in, k_out, v_in, v_out, n, 0, 6));
    CHECK(t, bytes > 0, "the temp-storage query returned 0 bytes");
    void* temp = nullptr;
    CUDA_OK(cudaMalloc(&temp, bytes));
    CUDA_OK(cub::DeviceRadixSort::SortPairs(temp, bytes, k_in, k_out, v_in, v_out, n, 0, 6));
    std::vector<int> order(n);
    for (int i = 0; i < n; i++) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return (keys[a] & 63) < (keys[b] & 63); });
    const std::vector<int> got_v = host_copy(v_out, n), got_k = host_copy(k_out, n);
    int unstable = 0;
    for (int i = 0; i < n; i++) unstable += got_v[i] != order[i] || got_k[i] != keys[order[i]];
    CHECK(t, unstable == 0, "SortPairs on bits [0, 6): %d of %d positions differ from a stable sort", unstable, n);
    for (void* p : {(void*)k_in, (void*)v_in, (void*)k_out, (void*)v_out, temp}) CUDA_OK(cudaFree(p));
}

// ---- wmma: one warp, d = a b + c for every layout pair

template <class LA, class LB>
__global__ void wmma_kernel(float* d, const __nv_bfloat16* a, const __nv_bfloat16* b, const float* c) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, LA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, LB> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, b, 16);
    wmma::load_matrix_sync(fc, c, 16, wmma::mem_col_major);
    wmma::mma_sync(fc, fa, fb, fc);
    wmma::store_matrix_sync(d, fc, 16, wmma::mem_row_major);
}

template <class LA, class LB>
static void check_wmma(Test& t, const char* what) {
    Rng rng(11);
    std::vector<__nv_bfloat16> a(256), b(256);
    std::vector<float> c(256);
    for (int i = 0; i < 256; i++) {
        a[i] = __float2bfloat16((float)rng.uniform() - 0.5f);
        b[i] = __float2bfloat16((float)rng.uniform() - 0.5f);
        c[i] = (float)rng.uniform();
    }
    __nv_bfloat16 *da = device_copy(a), *db = device_copy(b);
    float *dc = device_copy(c), *dd = nullptr;
    CUDA_OK(cudaMalloc(&dd, 256 * sizeof(float)));
    wmma_kernel<LA, LB><<<1, 32>>>(dd, da, db, dc);
    CUDA_OK(cudaGetLastError());
    const std::vector<float> d = host_copy(dd, 256);
    const bool a_row = std::is_same_v<LA, nvcuda::wmma::row_major>, b_row = std::is_same_v<LB, nvcuda::wmma::row_major>;
    double worst = 0;
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            double want = c[j * 16 + i];  // c was loaded column-major
            for (int k = 0; k < 16; k++)
                want += (double)__bfloat162float(a[a_row ? i * 16 + k : k * 16 + i]) *
                        (double)__bfloat162float(b[b_row ? k * 16 + j : j * 16 + k]);
            worst = std::max(worst, std::fabs(d[i * 16 + j] - want));
        }
    CHECK(t, worst < 1e-5, "wmma %s: largest error %.3g against a plain loop", what, worst);
    for (void* p : {(void*)da, (void*)db, (void*)dc, (void*)dd}) CUDA_OK(cudaFree(p));
}

static void test_wmma(Test& t) {
    using namespace nvcuda::wmma;
    check_wmma<row_major, row_major>(t, "row/row");
    check_wmma<row_major, col_major>(t, "row/col");
    check_wmma<col_major, row_major>(t, "col/row");
    check_wmma<col_major, col_major>(t, "col/col");
}

// ---- cp.async (include/cuda_pipeline.h): a copy lands at the wait that
// covers it, its destination poisoned until then; zfill zeros the tail

__global__ void pipeline_kernel(float* out, const float* in) {
    __shared__ __align__(16) float staged[3][32 * 4];
    const int t = threadIdx.x;
    for (int b = 0; b < 3; b++) {  // three batches of one 16-byte copy; the third copies 8 bytes, zero-fills 8
        __pipeline_memcpy_async(&staged[b][t * 4], in + b * 128 + t * 4, 16, b == 2 ? 8 : 0);
        __pipeline_commit();
    }
    float* o = out + t * 6;
    o[0] = staged[0][t * 4];  // no wait yet: poison
    __pipeline_wait_prior(2);
    o[1] = staged[0][t * 4];  // the oldest batch has landed
    o[2] = staged[1][t * 4];  // the next has not: poison
    __pipeline_wait_prior(0);
    o[3] = staged[1][t * 4 + 3];
    o[4] = staged[2][t * 4 + 1];
    o[5] = staged[2][t * 4 + 3];  // zero-filled
}

static void test_pipeline(Test& t) {
    std::vector<float> in(3 * 128);
    for (size_t i = 0; i < in.size(); i++) in[i] = 1.0f + (float)i;
    float *din = device_copy(in), *dout = nullptr;
    CUDA_OK(cudaMalloc(&dout, 32 * 6 * sizeof(float)));
    pipeline_kernel<<<1, 32>>>(dout, din);
    CUDA_OK(cudaGetLastError());
    const std::vector<float> got = host_copy(dout, 32 * 6);
    int wrong = 0;
    for (int i = 0; i < 32; i++) {
        const float* o = &got[i * 6];
        wrong += !std::isnan(o[0]) || o[1] != in[i * 4] || !std::isnan(o[2]) || o[3] != in[128 + i * 4 + 3] ||
                 o[4] != in[256 + i * 4 + 1] || o[5] != 0.0f;
    }
    CHECK(t, wrong == 0, "cp.async: %d of 32 threads saw data before its wait, or not after it", wrong);
    for (void* p : {(void*)din, (void*)dout}) CUDA_OK(cudaFree(p));
}

// ---- cuBLAS against a plain triple loop in double

// C(i, j) of op(A) op(B) for column-major A (lda) and B (ldb), in double.
static double naive_element(const std::vector<double>& A, const std::vector<double>& B, bool ta, bool tb, int lda,
                            int ldb, int k, int i, int j) {
    double sum = 0;
    for (int p = 0; p < k; p++)
        sum += (ta ? A[p + (size_t)i * lda] : A[i + (size_t)p * lda]) * (tb ? B[j + (size_t)p * ldb] : B[p + (size_t)j * ldb]);
    return sum;
}

static float round_to(cudaDataType type, double x) {
    return type == CUDA_R_16BF ? __bfloat162float(__float2bfloat16((float)x)) : (float)x;
}

// One GemmEx call (or Sgemm when fp32 everywhere and `sgemm`) against the
// loop: C = alpha op(A) op(B) + beta C, C poisoned with NaN when beta is 0.
static void check_gemm(Test& t, cublasHandle_t h, cudaDataType ab, cudaDataType ct, bool ta, bool tb, float beta,
                       bool sgemm) {
    const int m = 37, n = 29, k = 45;
    const int lda = (ta ? k : m) + 3, ldb = (tb ? n : k) + 2, ldc = m + 5;
    const float alpha = 0.75f;
    Rng rng(17 + ta * 2 + tb);
    auto draw = [&](size_t count, cudaDataType type) {
        std::vector<double> v(count);
        for (double& x : v) x = round_to(type, rng.uniform() * 2 - 1);
        return v;
    };
    const std::vector<double> A = draw((size_t)lda * (ta ? m : k), ab), B = draw((size_t)ldb * (tb ? k : n), ab);
    std::vector<double> C = draw((size_t)ldc * n, ct);
    auto upload = [&](const std::vector<double>& v, cudaDataType type) {
        void* d = nullptr;
        const size_t elem = type == CUDA_R_32F ? 4 : 2;
        CUDA_OK(cudaMalloc(&d, v.size() * elem));
        std::vector<char> bytes(v.size() * elem);
        for (size_t i = 0; i < v.size(); i++) {
            if (type == CUDA_R_32F) ((float*)bytes.data())[i] = (float)v[i];
            else ((__nv_bfloat16*)bytes.data())[i] = __float2bfloat16((float)v[i]);
        }
        CUDA_OK(cudaMemcpy(d, bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
        return d;
    };
    void *dA = upload(A, ab), *dB = upload(B, ab), *dC = upload(C, ct);
    if (beta == 0.0f) CUDA_OK(cudaMemset(dC, 0xFF, C.size() * (ct == CUDA_R_32F ? 4 : 2)));
    const cublasOperation_t oa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasStatus_t st;
    if (sgemm)
        st = cublasSgemm(h, oa, ob, m, n, k, &alpha, (const float*)dA, lda, (const float*)dB, ldb, &beta, (float*)dC, ldc);
    else
        st = cublasGemmEx(h, oa, ob, m, n, k, &alpha, dA, ab, lda, dB, ab, ldb, &beta, dC, ct, ldc, CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT);
    const std::string what = string_format("%s %s%s A,B %s C %s beta %g", sgemm ? "Sgemm" : "GemmEx", ta ? "T" : "N",
                                           tb ? "T" : "N", ab == CUDA_R_32F ? "fp32" : "bf16",
                                           ct == CUDA_R_32F ? "fp32" : "bf16", beta);
    CHECK(t, st == CUBLAS_STATUS_SUCCESS, "%s: status %d", what.c_str(), (int)st);
    std::vector<double> got(C.size());
    if (ct == CUDA_R_32F) {
        const std::vector<float> g = host_copy((const float*)dC, C.size());
        for (size_t i = 0; i < g.size(); i++) got[i] = g[i];
    } else {
        const std::vector<__nv_bfloat16> g = host_copy((const __nv_bfloat16*)dC, C.size());
        for (size_t i = 0; i < g.size(); i++) got[i] = __bfloat162float(g[i]);
    }
    // fp32 accumulation of k products errs by at most about k * 2^-24 of the sum of their
    // magnitudes; a bf16 C adds one rounding (2^-8 of the result)
    double worst = 0;
    size_t padding_changed = 0;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < ldc; i++) {
            const size_t at = i + (size_t)j * ldc;
            if (i >= m) {  // rows past m are ldc padding: never written
                padding_changed += beta != 0.0f && got[at] != C[at];
                continue;
            }
            const double want = alpha * naive_element(A, B, ta, tb, lda, ldb, k, i, j) + beta * C[at];
            double magnitude = std::fabs(beta * C[at]);
            for (int p = 0; p < k; p++)
                magnitude += std::fabs(alpha * (ta ? A[p + (size_t)i * lda] : A[i + (size_t)p * lda]) *
                                       (tb ? B[j + (size_t)p * ldb] : B[p + (size_t)j * ldb]));
            const double bound = (k + 2) * std::ldexp(magnitude, -24) + (ct == CUDA_R_16BF ? std::ldexp(std::fabs(want), -8) : 0);
            const double err = std::fabs(got[at] - want) / bound;
            worst = std::isnan(err) ? INFINITY : std::max(worst, err);
        }
    CHECK(t, worst <= 1.0, "%s: an error %.3g times the fp32 accumulation bound", what.c_str(), worst);
    CHECK(t, padding_changed == 0, "%s: %zu values in C's ldc padding changed", what.c_str(), padding_changed);
    for (void* p : {dA, dB, dC}) CUDA_OK(cudaFree(p));
}

static void test_cublas_against_loops(Test& t) {
    cublasHandle_t h;
    CHECK(t, cublasCreate(&h) == CUBLAS_STATUS_SUCCESS, "cublasCreate");
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (float beta : {0.0f, 0.5f}) {
                check_gemm(t, h, CUDA_R_32F, CUDA_R_32F, ta, tb, beta, true);
                check_gemm(t, h, CUDA_R_32F, CUDA_R_32F, ta, tb, beta, false);
                check_gemm(t, h, CUDA_R_16BF, CUDA_R_16BF, ta, tb, beta, false);
                check_gemm(t, h, CUDA_R_16BF, CUDA_R_32F, ta, tb, beta, false);
            }
    cublasDestroy(h);
}

// The documented statuses, and the emulator's footprint check.
static void test_cublas_arguments(Test& t) {
    cublasHandle_t h;
    cublasCreate(&h);
    float *a = nullptr, *c = nullptr;
    CUDA_OK(cudaMalloc(&a, 64 * sizeof(float)));
    CUDA_OK(cudaMalloc(&c, 64 * sizeof(float)));
    CUDA_OK(cudaMemset(a, 0, 64 * sizeof(float)));
    const float one = 1.0f, zero = 0.0f;
    CHECK(t, cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 8, 8, 8, &one, a, 7, a, 8, &zero, c, 8) ==
                 CUBLAS_STATUS_INVALID_VALUE, "lda < m must be CUBLAS_STATUS_INVALID_VALUE");
    CHECK(t, cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, -1, 8, 8, &one, a, 8, a, 8, &zero, c, 8) ==
                 CUBLAS_STATUS_INVALID_VALUE, "m < 0 must be CUBLAS_STATUS_INVALID_VALUE");
    CHECK(t, cublasSgemm(nullptr, CUBLAS_OP_N, CUBLAS_OP_N, 8, 8, 8, &one, a, 8, a, 8, &zero, c, 8) ==
                 CUBLAS_STATUS_NOT_INITIALIZED, "a null handle must be CUBLAS_STATUS_NOT_INITIALIZED");
    CHECK(t, cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 8, 8, 8, &one, a, CUDA_R_32F, 8, a, CUDA_R_16BF, 8, &zero, c,
                          CUDA_R_32F, 8, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED,
          "mixed A and B types must be CUBLAS_STATUS_NOT_SUPPORTED");
    CHECK(t, cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 0, 8, 8, &one, nullptr, 8, nullptr, 8, &zero, nullptr, 8) ==
                 CUBLAS_STATUS_SUCCESS, "m = 0 returns at once, touching nothing");
    // k = 0: C = beta C
    CUDA_OK(cudaMemcpy(c, std::vector<float>(64, 2.0f).data(), 64 * sizeof(float), cudaMemcpyHostToDevice));
    const float half = 0.5f;
    CHECK(t, cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 8, 8, 0, &one, a, 8, a, 1, &half, c, 8) == CUBLAS_STATUS_SUCCESS,
          "k = 0");
    CHECK(t, host_copy(c, 64) == std::vector<float>(64, 1.0f), "k = 0 must scale C by beta");
    CUDA_OK(cudaFree(a));
    CUDA_OK(cudaFree(c));
    cublasDestroy(h);
}

// ---- the runtime: copies checked against allocations and directions, launch errors

static void test_runtime_errors(Test& t) {
    float* d = nullptr;
    CUDA_OK(cudaMalloc(&d, 16 * sizeof(float)));
    std::vector<float> host(32, 1.0f);
    CHECK(t, cudaMemcpy(d, host.data(), 32 * sizeof(float), cudaMemcpyHostToDevice) == cudaErrorInvalidValue,
          "a copy past the end of a device allocation must fail");
    CHECK(t, cudaMemcpy(host.data(), d, 16 * sizeof(float), cudaMemcpyHostToDevice) == cudaErrorInvalidValue,
          "a copy in the wrong direction must fail");
    CHECK(t, cudaMemset(host.data(), 0, 4) == cudaErrorInvalidValue, "cudaMemset of host memory must fail");
    std::vector<float> poisoned = host_copy(d, 16);
    size_t nan = 0;
    for (float x : poisoned) nan += std::isnan(x);
    CHECK(t, nan == 16, "fresh device memory must read as NaN (poison); %zu of 16 did", nan);
    CHECK(t, cudaGetLastError() == cudaErrorInvalidValue, "cudaGetLastError returns the last failed call's error");
    CHECK(t, cudaGetLastError() == cudaSuccess, "and then clears it (not sticky)");
    CUDA_OK(cudaFree(d));
    cudaDeviceProp p;
    CUDA_OK(cudaGetDeviceProperties(&p, 0));
    CHECK(t, p.major == 9 && p.maxThreadsPerBlock == 1024 && p.sharedMemPerBlockOptin == 227 * 1024,
          "the emulated device must report an H200's limits");
}

// ============================================================================
// Deliberate bugs, each with its correct twin. run_case() says whether the
// result was right; test_emulator.py knows what the emulator must do about it.

static const int N = 256;

// A missing barrier: the last thread sums what every thread wrote. In the
// natural schedule the last thread runs last and the sum is right anyway.
template <bool BUG>
__global__ void sum_kernel(float* out) {
    __shared__ float values[N];
    values[threadIdx.x] = 1.0f;
    if (!BUG) __syncthreads();
    if (threadIdx.x == N - 1) {
        float sum = 0;
        for (int i = 0; i < N; i++) sum += values[i];
        *out = sum;
    }
}

// An out-of-bounds write: one element past a device buffer (a loop bound <=).
template <bool BUG>
__global__ void write_kernel(float* out, int n) {
    for (int i = threadIdx.x; BUG ? i <= n : i < n; i += blockDim.x) out[i] = 1.0f;
}

// A shuffle in divergent code: the lanes that skip it never arrive.
template <bool BUG>
__global__ void shuffle_divergent_kernel(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_sync(BUG ? 0xffffffffu : 0x0000ffffu, v, 0);
    out[threadIdx.x] = v;
}

// A shuffle that names lanes waiting at a barrier instead: neither can complete.
template <bool BUG>
__global__ void shuffle_deadlock_kernel(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x % 32 < 16) v = __shfl_sync(BUG ? 0xffffffffu : 0x0000ffffu, v, 0);
    __syncthreads();
    out[threadIdx.x] = v;
}

// A barrier only some threads reach.
template <bool BUG>
__global__ void barrier_divergent_kernel(float* out) {
    if (!BUG || threadIdx.x < 32) __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Threads that return early while the others go on to a barrier.
template <bool BUG>
__global__ void early_exit_kernel(float* out) {
    if (BUG && threadIdx.x >= 64) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Dynamic shared memory: 64 KB used, launched with the opt-in or without it.
__global__ void big_dynamic_shared_kernel(float* out) {
    extern __shared__ float big[];
    big[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = big[(threadIdx.x + 1) % blockDim.x];
}

// Dynamic shared memory 4 bytes short of what the kernel indexes.
__global__ void short_dynamic_shared_kernel(float* out) {
    extern __shared__ float table[];
    table[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = table[blockDim.x - 1 - threadIdx.x];
}

// Static shared memory past the 48 KB a kernel may declare.
template <bool BUG>
__global__ void static_shared_kernel(float* out) {
    __shared__ float big[BUG ? 13000 : 12000];
    big[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = big[threadIdx.x];
}

// Past the end of a static __shared__ array.
template <bool BUG>
__global__ void shared_overflow_kernel(float* out) {
    __shared__ float values[N];
    values[threadIdx.x + (BUG ? 1 : 0)] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = values[threadIdx.x % (N - 1)];
}

__global__ void fill_kernel(float* out) { out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f; }

// More threads than the kernel's __launch_bounds__.
__global__ void __launch_bounds__(128) bounded_kernel(float* out) { out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f; }

// A read of memory nothing wrote: the sum of a fresh buffer.
__global__ void sum_buffer_kernel(float* out, const float* in, int n) {
    if (threadIdx.x != 0) return;
    float sum = 0;
    for (int i = 0; i < n; i++) sum += in[i];
    *out = sum;
}

// A shared histogram used without zeroing it first.
template <bool BUG>
__global__ void histogram_kernel(int* out) {
    __shared__ int hist[4];
    if (!BUG && threadIdx.x < 4) hist[threadIdx.x] = 0;
    __syncthreads();
    atomicAdd(&hist[threadIdx.x % 4], 1);
    __syncthreads();
    if (threadIdx.x < 4) out[threadIdx.x] = hist[threadIdx.x];
}

// CUB temp storage used twice with no barrier in between.
template <bool BUG>
__global__ void cub_reuse_kernel(int* out) {
    using Reduce = cub::BlockReduce<int, N>;
    __shared__ typename Reduce::TempStorage storage;
    const int a = Reduce(storage).Sum(1);
    if (!BUG) __syncthreads();
    const int b = Reduce(storage).Sum(2);
    if (threadIdx.x == 0) *out = a + b;
}

// A tile staged by cp.async and read before the wait that covers it: the
// wait comes after the barrier, too late.
template <bool BUG>
__global__ void staged_sum_kernel(float* out, const float* in) {
    __shared__ __align__(16) float staged[N];
    if (threadIdx.x < N / 4) __pipeline_memcpy_async(&staged[threadIdx.x * 4], in + threadIdx.x * 4, 16);
    __pipeline_commit();
    if (!BUG) __pipeline_wait_prior(0);
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0;
        for (int i = 0; i < N; i++) sum += staged[i];
        *out = sum;
    }
    if (BUG) __pipeline_wait_prior(0);
}

// cp.async copies that no wait covers: the thread exits with them in flight.
template <bool BUG>
__global__ void unwaited_copy_kernel(float* out, const float* in) {
    __shared__ __align__(16) float staged[N];
    __pipeline_memcpy_async(&staged[threadIdx.x], in + threadIdx.x, 4);
    __pipeline_commit();
    if (!BUG) __pipeline_wait_prior(0);
    out[threadIdx.x] = 1.0f;
}

static bool close_to(float got, float want) { return std::fabs(got - want) <= 1e-6f * std::fabs(want); }

// Runs bug (or twin) `name`; returns "" if its result was right, else what was wrong.
static std::string run_case(const std::string& name, bool bug) {
    float* out = nullptr;
    CUDA_OK(cudaMalloc(&out, 1024 * sizeof(float)));  // room for the largest block
    const std::vector<float> ones(N, 1.0f);
    auto all_ones = [&](int n) {
        const std::vector<float> got = host_copy(out, n);
        return std::equal(got.begin(), got.end(), ones.begin()) ? "" : "not every value written is 1";
    };
    if (name == "missing_barrier") {
        if (bug) sum_kernel<true><<<1, N>>>(out);
        else sum_kernel<false><<<1, N>>>(out);
        CUDA_OK(cudaGetLastError());
        const float got = host_copy(out, 1)[0];
        return close_to(got, N) ? "" : string_format("sum %g, expected %d", got, N);
    }
    if (name == "out_of_bounds_write") {
        float* exact = nullptr;  // N floats, nothing to spare
        CUDA_OK(cudaMalloc(&exact, N * sizeof(float)));
        if (bug) write_kernel<true><<<1, 64>>>(exact, N);
        else write_kernel<false><<<1, 64>>>(exact, N);
        CUDA_OK(cudaGetLastError());
        const std::vector<float> got = host_copy(exact, N);
        CUDA_OK(cudaFree(exact));
        return std::equal(got.begin(), got.end(), ones.begin()) ? "" : "not every value written is 1";
    }
    if (name == "divergent_shuffle") {
        if (bug) shuffle_divergent_kernel<true><<<1, 32>>>(out);
        else shuffle_divergent_kernel<false><<<1, 32>>>(out);
        CUDA_OK(cudaGetLastError());
        CUDA_OK(cudaDeviceSynchronize());
        const std::vector<float> got = host_copy(out, 32);
        for (int i = 0; i < 32; i++)
            if (got[i] != (i < 16 ? 0.0f : (float)i)) return "wrong shuffle result";
        return "";
    }
    if (name == "shuffle_deadlock") {
        if (bug) shuffle_deadlock_kernel<true><<<1, 64>>>(out);
        else shuffle_deadlock_kernel<false><<<1, 64>>>(out);
        CUDA_OK(cudaGetLastError());
        const std::vector<float> got = host_copy(out, 64);
        for (int i = 0; i < 64; i++)
            if (got[i] != (i % 32 < 16 ? (float)(i - i % 32) : (float)i)) return "wrong shuffle result";
        return "";
    }
    if (name == "divergent_barrier" || name == "exit_before_barrier") {
        if (name == "divergent_barrier" && bug) barrier_divergent_kernel<true><<<1, 128>>>(out);
        else if (name == "divergent_barrier") barrier_divergent_kernel<false><<<1, 128>>>(out);
        else if (bug) early_exit_kernel<true><<<1, 128>>>(out);
        else early_exit_kernel<false><<<1, 128>>>(out);
        CUDA_OK(cudaGetLastError());
        CUDA_OK(cudaDeviceSynchronize());
        return all_ones(bug && name == "exit_before_barrier" ? 64 : 128);
    }
    if (name == "fault_is_sticky") {
        // after a fault every call returns it, however often it is read, and nothing more runs
        if (bug) barrier_divergent_kernel<true><<<1, 128>>>(out);
        else barrier_divergent_kernel<false><<<1, 128>>>(out);
        const cudaError_t want = bug ? cudaErrorLaunchFailure : cudaSuccess;
        const cudaError_t first = cudaGetLastError(), second = cudaGetLastError();
        std::vector<float> host(4);
        const cudaError_t copy = cudaMemcpy(host.data(), out, sizeof(float), cudaMemcpyDeviceToHost);
        fill_kernel<<<1, 4>>>(out);
        const cudaError_t after = cudaDeviceSynchronize();
        if (first != want || second != want || copy != want || after != want)
            return string_format("errors %s, %s, %s, %s; each should be %s", cudaGetErrorName(first),
                                 cudaGetErrorName(second), cudaGetErrorName(copy), cudaGetErrorName(after),
                                 cudaGetErrorName(want));
        return "";
    }
    if (name == "too_much_dynamic_shared_memory") {
        const int bytes = 64 << 10;
        if (!bug)
            CUDA_OK(cudaFuncSetAttribute(big_dynamic_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
        big_dynamic_shared_kernel<<<1, N, bytes>>>(out);
        CUDA_OK(cudaGetLastError());
        return all_ones(N);
    }
    if (name == "dynamic_shared_memory_short") {
        short_dynamic_shared_kernel<<<1, N, N * sizeof(float) - (bug ? 4 : 0)>>>(out);
        CUDA_OK(cudaGetLastError());
        const std::vector<float> got = host_copy(out, N);
        for (int i = 0; i < N; i++)
            if (got[i] != (float)(N - 1 - i)) return "wrong values";
        return "";
    }
    if (name == "static_shared_over_48k") {
        if (bug) static_shared_kernel<true><<<1, N>>>(out);
        else static_shared_kernel<false><<<1, N>>>(out);
        CUDA_OK(cudaGetLastError());
        return all_ones(N);
    }
    if (name == "shared_array_overflow") {
        if (bug) shared_overflow_kernel<true><<<1, N>>>(out);
        else shared_overflow_kernel<false><<<1, N>>>(out);
        CUDA_OK(cudaGetLastError());
        CUDA_OK(cudaDeviceSynchronize());
        return "";
    }
    if (name == "block_of_2048_threads") {
        fill_kernel<<<1, bug ? 2048 : 1024>>>(out);
        const cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return std::string("launch failed: ") + cudaGetErrorString(e);
        return "";
    }
    if (name == "launch_bounds_exceeded") {
        bounded_kernel<<<1, bug ? 256 : 128>>>(out);
        const cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return std::string("launch failed: ") + cudaGetErrorString(e);
        return "";
    }
    if (name == "unchecked_launch_error") {
        fill_kernel<<<1, 2048>>>(out);  // refused either way; the twin reads the error, as a program must
        if (!bug && cudaGetLastError() == cudaSuccess) return "the launch of 2048 threads did not fail";
        return "";
    }
    if (name == "cp_async_read_before_wait" || name == "cp_async_never_waited") {
        float* in = device_copy(ones);
        if (name == "cp_async_read_before_wait" && bug) staged_sum_kernel<true><<<1, N>>>(out, in);
        else if (name == "cp_async_read_before_wait") staged_sum_kernel<false><<<1, N>>>(out, in);
        else if (bug) unwaited_copy_kernel<true><<<1, N>>>(out, in);
        else unwaited_copy_kernel<false><<<1, N>>>(out, in);
        CUDA_OK(cudaGetLastError());
        CUDA_OK(cudaDeviceSynchronize());
        CUDA_OK(cudaFree(in));
        if (name == "cp_async_never_waited") return all_ones(N);
        const float got = host_copy(out, 1)[0];
        return close_to(got, N) ? "" : string_format("sum %g, expected %d", got, N);
    }
    if (name == "unwritten_memory_read") {
        float* fresh = nullptr;
        CUDA_OK(cudaMalloc(&fresh, N * sizeof(float)));
        if (!bug) CUDA_OK(cudaMemcpy(fresh, ones.data(), N * sizeof(float), cudaMemcpyHostToDevice));
        sum_buffer_kernel<<<1, 32>>>(out, fresh, N);
        CUDA_OK(cudaGetLastError());
        const float got = host_copy(out, 1)[0];
        CUDA_OK(cudaFree(fresh));
        return close_to(got, N) ? "" : string_format("sum %g, expected %d", got, N);
    }
    if (name == "unzeroed_shared_histogram") {
        int* hist = nullptr;
        CUDA_OK(cudaMalloc(&hist, 4 * sizeof(int)));
        if (bug) histogram_kernel<true><<<1, 64>>>(hist);
        else histogram_kernel<false><<<1, 64>>>(hist);
        CUDA_OK(cudaGetLastError());
        const std::vector<int> got = host_copy(hist, 4);
        CUDA_OK(cudaFree(hist));
        return got == std::vector<int>(4, 16) ? "" : string_format("histogram [%d %d %d %d], expected 16 each", got[0],
                                                                  got[1], got[2], got[3]);
    }
    if (name == "cub_storage_reused_without_barrier") {
        int* sum = nullptr;
        CUDA_OK(cudaMalloc(&sum, sizeof(int)));
        if (bug) cub_reuse_kernel<true><<<1, N>>>(sum);
        else cub_reuse_kernel<false><<<1, N>>>(sum);
        CUDA_OK(cudaGetLastError());
        const int got = host_copy(sum, 1)[0];
        CUDA_OK(cudaFree(sum));
        return got == 3 * N ? "" : string_format("sum %d, expected %d", got, 3 * N);
    }
    if (name == "cublas_transposition_error") {
        // out (M x Nn) = A (M x K) B (K x Nn), all row-major. Column-major, cuBLAS computes
        // out^T (Nn x M) = B^T (Nn x K, ld Nn) A^T (K x M, ld K). The bug marks A^T as transposed:
        // read as stored M x K with ld K, it spans 16 * 15 + 8 = 248 floats of a 128-float buffer.
        const int M = 8, K = 16, Nn = 4;
        std::vector<float> a(M * K), b(K * Nn);
        for (size_t i = 0; i < a.size(); i++) a[i] = (float)(i % 7);
        for (size_t i = 0; i < b.size(); i++) b[i] = (float)(i % 5);
        float *da = device_copy(a), *db = device_copy(b), *dc = nullptr;
        CUDA_OK(cudaMalloc(&dc, M * Nn * sizeof(float)));
        cublasHandle_t h;
        cublasCreate(&h);
        const float one = 1.0f, zero = 0.0f;
        const cublasStatus_t st = cublasSgemm(h, CUBLAS_OP_N, bug ? CUBLAS_OP_T : CUBLAS_OP_N, Nn, M, K, &one, db, Nn,
                                              da, K, &zero, dc, Nn);
        cublasDestroy(h);
        if (st != CUBLAS_STATUS_SUCCESS) return string_format("cublasSgemm returned %d", (int)st);
        const std::vector<float> got = host_copy(dc, M * Nn);
        for (int i = 0; i < M; i++)
            for (int j = 0; j < Nn; j++) {
                float want = 0;
                for (int k = 0; k < K; k++) want += a[i * K + k] * b[k * Nn + j];
                if (got[i * Nn + j] != want) return "wrong product";
            }
        return "";
    }
    fail("unknown case '%s' (selftest list)", name.c_str());
}

static const char* const CASES[] = {"missing_barrier", "out_of_bounds_write", "divergent_shuffle", "shuffle_deadlock",
                                    "divergent_barrier", "exit_before_barrier", "fault_is_sticky", "too_much_dynamic_shared_memory",
                                    "dynamic_shared_memory_short", "static_shared_over_48k", "shared_array_overflow",
                                    "block_of_2048_threads", "launch_bounds_exceeded", "unchecked_launch_error",
                                    "unwritten_memory_read", "unzeroed_shared_histogram",
                                    "cub_storage_reused_without_barrier", "cublas_transposition_error",
                                    "cp_async_read_before_wait", "cp_async_never_waited"};

int main(int argc, char** argv) {
    if (argc == 2 && std::string(argv[1]) == "list") {
        for (const char* c : CASES) printf("%s\n", c);
        return 0;
    }
    if (argc == 3 && (std::string(argv[1]) == "bug" || std::string(argv[1]) == "twin")) {
        const std::string wrong = run_case(argv[2], std::string(argv[1]) == "bug");
        printf("%s: %s%s\n", argv[2], wrong.empty() ? "right" : "wrong: ", wrong.c_str());
        fflush(stdout);
        return wrong.empty() ? 0 : 3;
    }
    if (argc != 1) fail("usage: selftest | selftest list | selftest bug|twin NAME");
    return run_tests({
        {"emu-selftest: shuffles and votes", test_shuffles},
        {"emu-selftest: shared memory and barriers", test_shared_memory_and_barriers},
        {"emu-selftest: atomics", test_atomics},
        {"emu-selftest: CUB block reduce, block scan, radix sort", test_cub},
        {"emu-selftest: wmma against a plain loop", test_wmma},
        {"emu-selftest: cp.async lands at its wait, poison before", test_pipeline},
        {"emu-selftest: cuBLAS against plain loops (every transposition, fp32 and bf16)", test_cublas_against_loops},
        {"emu-selftest: cuBLAS argument checks", test_cublas_arguments},
        {"emu-selftest: runtime errors and poisoned memory", test_runtime_errors},
    });
}
