// test/emu/cublas.cpp: the cuBLAS calls of the emulated device.
//
// The declarations are cuBLAS's own (cublas_v2.h); libcublas is not linked.
// What the documentation promises is what happens here:
//   - column-major operands, op(A) = A, A^T (or A^H, the same for reals);
//     C = alpha op(A) op(B) + beta C, with products accumulated in fp32
//     (CUBLAS_COMPUTE_32F) and the result rounded once to C's type (round
//     to nearest even for bf16);
//   - C is never read when beta is 0, so it may hold anything (NaN);
//   - the arguments are checked in the documented order with the documented
//     statuses: a null or destroyed handle, a bad transpose, negative sizes,
//     leading dimensions smaller than the rows they stride over, null alpha or
//     beta; an unsupported type combination is CUBLAS_STATUS_NOT_SUPPORTED;
//     m = 0 or n = 0 returns at once, and k = 0 scales C by beta.
// Beyond cuBLAS, every operand's footprint (the columns its leading dimension
// spans, times the batch) must lie inside one device allocation: reading
// past one is a fault of the call, the usual sign of a transposition or
// leading-dimension mistake. A dry run checks all this and computes nothing.
// The accumulation order is fixed (eight fp32 partial sums per dot product),
// so results are deterministic; they match a GPU's to fp32 rounding, not bit
// for bit.
#include <cublas_v2.h>

#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "internal.h"

struct cublasContext {
    cublasMath_t math = CUBLAS_DEFAULT_MATH;
    cudaStream_t stream = nullptr;
};

namespace {

std::set<cublasHandle_t>& handles = *new std::set<cublasHandle_t>;  // outlives the program's statics

struct Operand {
    const void* p;
    cudaDataType type;
    int ld;
    long long stride;
};

size_t type_bytes(cudaDataType t) {
    switch (t) {
        case CUDA_R_32F: return 4;
        case CUDA_R_16BF:
        case CUDA_R_16F: return 2;
        default: return 0;
    }
}

const char* type_name(cudaDataType t) {
    switch (t) {
        case CUDA_R_32F: return "CUDA_R_32F";
        case CUDA_R_16BF: return "CUDA_R_16BF";
        case CUDA_R_16F: return "CUDA_R_16F";
        default: return "an unsupported type";
    }
}

float load(const void* p, cudaDataType t, size_t i) {
    switch (t) {
        case CUDA_R_32F: return ((const float*)p)[i];
        case CUDA_R_16BF: return __bfloat162float(((const __nv_bfloat16*)p)[i]);
        default: return __half2float(((const __half*)p)[i]);
    }
}

void store(void* p, cudaDataType t, size_t i, float v) {
    switch (t) {
        case CUDA_R_32F: ((float*)p)[i] = v; break;
        case CUDA_R_16BF: ((__nv_bfloat16*)p)[i] = __float2bfloat16(v); break;
        default: ((__half*)p)[i] = __float2half(v); break;
    }
}

// op(X) as a dense row-major (rows x depth) fp32 matrix: row r holds
// op(X)(r, 0..depth) contiguously, whichever way X is stored. For A, rows = m
// and element (i, p); for B^T, rows = n and element (p, j).
void pack(std::vector<float>& out, const Operand& x, const void* base, bool transposed, int rows, int depth,
          bool rows_are_columns) {
    out.resize((size_t)rows * depth);
    for (int r = 0; r < rows; r++)
        for (int p = 0; p < depth; p++) {
            // stored element (row, col) of the column-major operand
            const bool along = transposed != rows_are_columns;
            const size_t row = along ? p : r, col = along ? r : p;
            out[(size_t)r * depth + p] = load(base, x.type, row + col * (size_t)x.ld);
        }
}

float dot(const float* a, const float* b, int k) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int p = 0;
    for (; p + 8 <= k; p += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[p + l] * b[p + l];
    float tail = 0.0f;
    for (; p < k; p++) tail += a[p] * b[p];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

const char* op_name(cublasOperation_t op) { return op == CUBLAS_OP_N ? "N" : op == CUBLAS_OP_T ? "T" : "C"; }

// The bytes an operand of `rows` x `cols` (as stored) spans over `batch`
// matrices; "" if they lie in one device allocation.
std::string check_footprint(const Operand& x, int rows, int cols, int batch) {
    if (rows == 0 || cols == 0 || batch == 0) return "";
    const size_t elements = (size_t)(batch - 1) * x.stride + (size_t)x.ld * (cols - 1) + rows;
    return emu::check_device_bytes(x.p, elements * type_bytes(x.type));
}

cublasStatus_t gemm(const char* call, cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                    int k, const float* alpha, Operand A, Operand B, const float* beta, Operand C, int batch,
                    cublasComputeType_t compute) {
    emu::counters().blas_calls++;
    if (!handle || !handles.count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    auto valid_op = [](cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C; };
    if (!valid_op(ta) || !valid_op(tb) || m < 0 || n < 0 || k < 0 || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    const bool a_t = ta != CUBLAS_OP_N, b_t = tb != CUBLAS_OP_N;
    if (A.ld < std::max(1, a_t ? k : m) || B.ld < std::max(1, b_t ? n : k) || C.ld < std::max(1, m))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (!alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
    const bool fp32_math = compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_PEDANTIC;
    const bool types_ok = A.type == B.type && type_bytes(A.type) > 0 && (C.type == CUDA_R_32F || C.type == A.type);
    if (!fp32_math || !types_ok || (handle->math & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH) {
        fprintf(stderr, "emu: error: %s: A %s, B %s, C %s, compute type %d, math mode %d: not emulated (fp32 "
                        "compute without TF32 on fp32, bf16 or fp16 inputs is)\n",
                call, type_name(A.type), type_name(B.type), type_name(C.type), (int)compute, (int)handle->math);
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
    if (emu::has_fault()) return CUBLAS_STATUS_EXECUTION_FAILED;  // after a fault nothing more runs on the device
    const int a_rows = a_t ? k : m, a_cols = a_t ? m : k, b_rows = b_t ? n : k, b_cols = b_t ? k : n;
    const std::string problems[3] = {check_footprint(A, a_rows, a_cols, k ? batch : 0),
                                     check_footprint(B, b_rows, b_cols, k ? batch : 0), check_footprint(C, m, n, batch)};
    for (int i = 0; i < 3; i++)
        if (!problems[i].empty()) {
            emu::fault(cudaErrorLaunchFailure,
                       "%s(op %s, op %s, m %d, n %d, k %d, lda %d, ldb %d, ldc %d%s): %c, %d x %d as stored with "
                       "leading dimension %d%s: %s",
                       call, op_name(ta), op_name(tb), m, n, k, A.ld, B.ld, C.ld,
                       batch > 1 ? string_format(", batch %d", batch).c_str() : "", "ABC"[i],
                       i == 0 ? a_rows : i == 1 ? b_rows : m, i == 0 ? a_cols : i == 1 ? b_cols : n,
                       i == 0 ? A.ld : i == 1 ? B.ld : C.ld,
                       batch > 1 ? string_format(" and stride %lld", i == 0 ? A.stride : i == 1 ? B.stride : C.stride).c_str()
                                 : "",
                       problems[i].c_str());
            return CUBLAS_STATUS_EXECUTION_FAILED;
        }
    if (emu::dry_run()) return CUBLAS_STATUS_SUCCESS;
    std::vector<float> a, bt;
    for (int b = 0; b < batch; b++) {
        const void* a_base = (const char*)A.p + (size_t)b * A.stride * type_bytes(A.type);
        const void* b_base = (const char*)B.p + (size_t)b * B.stride * type_bytes(B.type);
        void* c_base = (char*)C.p + (size_t)b * C.stride * type_bytes(C.type);
        if (k > 0) {
            pack(a, A, a_base, a_t, m, k, false);
            pack(bt, B, b_base, b_t, n, k, true);
        }
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                const size_t at = i + (size_t)j * C.ld;
                float v = k > 0 ? *alpha * dot(&a[(size_t)i * k], &bt[(size_t)j * k], k) : 0.0f;
                if (*beta != 0.0f) v += *beta * load(c_base, C.type, at);
                store(c_base, C.type, at, v);
            }
    }
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
    *handle = new cublasContext;
    handles.insert(*handle);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
    if (!handles.erase(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
    if (!handles.count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->math = mode;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasGetMathMode(cublasHandle_t handle, cublasMath_t* mode) {
    if (!handles.count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    *mode = handle->math;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
    if (!handles.count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!emu::stream_valid(stream)) return CUBLAS_STATUS_INVALID_VALUE;
    handle->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void*, size_t) {
    return handles.count(handle) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}

const char* cublasGetStatusName(cublasStatus_t status) {
    switch (status) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
        default: return "CUBLAS_STATUS (not emulated)";
    }
}

const char* cublasGetStatusString(cublasStatus_t status) {
    switch (status) {
        case CUBLAS_STATUS_SUCCESS: return "success";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
        case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
        case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute (the emulated device "
                                                    "reported why above)";
        default: return "a status the emulated cuBLAS never returns";
    }
}

cublasStatus_t cublasSgemm_v2(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                              const float* alpha, const float* A, int lda, const float* B, int ldb, const float* beta,
                              float* C, int ldc) {
    return gemm("cublasSgemm", handle, ta, tb, m, n, k, alpha, {A, CUDA_R_32F, lda, 0}, {B, CUDA_R_32F, ldb, 0}, beta,
                {C, CUDA_R_32F, ldc, 0}, 1, CUBLAS_COMPUTE_32F);
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m,
                                         int n, int k, const float* alpha, const float* A, int lda, long long strideA,
                                         const float* B, int ldb, long long strideB, const float* beta, float* C,
                                         int ldc, long long strideC, int batch) {
    return gemm("cublasSgemmStridedBatched", handle, ta, tb, m, n, k, alpha, {A, CUDA_R_32F, lda, strideA},
                {B, CUDA_R_32F, ldb, strideB}, beta, {C, CUDA_R_32F, ldc, strideC}, batch, CUBLAS_COMPUTE_32F);
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t) {
    return gemm("cublasGemmEx", handle, ta, tb, m, n, k, (const float*)alpha, {A, Atype, lda, 0}, {B, Btype, ldb, 0},
                (const float*)beta, {C, Ctype, ldc, 0}, 1, compute);
}

cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m,
                                          int n, int k, const void* alpha, const void* A, cudaDataType Atype, int lda,
                                          long long strideA, const void* B, cudaDataType Btype, int ldb,
                                          long long strideB, const void* beta, void* C, cudaDataType Ctype, int ldc,
                                          long long strideC, int batch, cublasComputeType_t compute,
                                          cublasGemmAlgo_t) {
    return gemm("cublasGemmStridedBatchedEx", handle, ta, tb, m, n, k, (const float*)alpha, {A, Atype, lda, strideA},
                {B, Btype, ldb, strideB}, (const float*)beta, {C, Ctype, ldc, strideC}, batch, compute);
}

}  // extern "C"
