// optimizer.cuh: Muon on the GPU, the optimizer of the paper's recipe for
// the weight matrices (SPEC: Training; optimizer_config.h says which
// matrices, at which rates).
//
// One Muon step of a matrix W (rows x cols) from its gradient g:
//   m = mu m + (1 - mu) g;  u = (1 - mu) g + mu m            (Nesterov)
//   X = u / (||u||_F + 1e-7), taken wide (transposed when rows > cols)
//   5 times: A = X X^T;  X = a X + (b A + c A^2) X           (Newton-Schulz)
//   W = W (1 - lr wd) - lr sqrt(max(1, rows / cols)) X        (transposed back)
// The Newton-Schulz products are cuBLAS GEMMs on floatX operands (bf16 in
// the BF16 build, as the authors run them; fp32 in the FP32 build) with fp32
// accumulation, strided-batched over the matrices of a batch (the experts of
// an EC or ET layer, each orthogonalised on its own). The elementwise steps
// are one kernel each. Muon's momentum lives where AdamW's first moment
// would (model->adam_m), so checkpoints hold it with no change of format.
//
// Reading order: the kernels (momentum, Frobenius norm, apply), then the
// workspace sized once for the largest batch, then muon_step.
// Included by model.cuh after its kernels: it uses their plumbing.
#pragma once

#include "optimizer_config.h"

// m = mu m + (1 - mu) g s;  x = (1 - mu) g s + mu m, with s the clip factor
// (device memory: clipping needs no host sync). x is written transposed
// (x[b][col][row]) for a tall matrix. One thread per element; reads g and m,
// writes m and x once.
__global__ void muon_momentum_kernel(floatX* x, float* m, const float* grads, size_t n, int rows, int cols,
                                     bool transposed, float mu, const float* clip_scale) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = grads[i] * *clip_scale;
    const float mi = mu * m[i] + (1.0f - mu) * g;
    m[i] = mi;
    const size_t per = (size_t)rows * cols, b = i / per, e = i % per;
    const size_t at = transposed ? b * per + (e % cols) * rows + e / cols : i;
    x[at] = from_float<floatX>((1.0f - mu) * g + mu * mi);
}

// x /= ||x||_F + eps for each of the batch's matrices of `per` values. One
// block per matrix: block_sum_of_squares adds the squares in a fixed order
// (deterministic), and the block scales its matrix. Reads the matrix twice,
// writes it once.
static const int MUON_THREADS = 512;
__global__ void muon_normalize_kernel(floatX* x, size_t per, float eps) {
    __shared__ float warp_sums[MUON_THREADS / WARP];
    __shared__ float scale;
    floatX* mat = x + blockIdx.x * per;
    const float sum = block_sum_of_squares(mat, per, threadIdx.x, blockDim.x, warp_sums);
    if (threadIdx.x == 0) scale = 1.0f / (sqrtf(sum) + eps);
    __syncthreads();
    for (size_t i = threadIdx.x; i < per; i += blockDim.x) mat[i] = from_float<floatX>(to_float(mat[i]) * scale);
}

// W = W (1 - lr wd) - lr scale x, reading x transposed for a tall matrix;
// also writes the floatX copy the matmuls read. One thread per element.
__global__ void muon_apply_kernel(float* master, floatX* params, const floatX* x, size_t n, int rows, int cols,
                                  bool transposed, float lr, float scale, float weight_decay) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const size_t per = (size_t)rows * cols, b = i / per, e = i % per;
    const size_t at = transposed ? b * per + (e % cols) * rows + e / cols : i;
    const float w = master[i] * (1.0f - lr * weight_decay) - lr * scale * to_float(x[at]);
    master[i] = w;
    params[i] = from_float<floatX>(w);
}

// Newton-Schulz scratch, sized once for the largest batch of matrices: X and
// the next X (batch x r x c), A and the polynomial b A + c A^2 (batch x r x r),
// with r <= c the wide orientation's rows.
struct MuonWorkspace {
    floatX *x = nullptr, *x_next = nullptr, *gram = nullptr, *poly = nullptr;
    size_t x_capacity = 0, gram_capacity = 0;

    // Returns the device bytes it took.
    size_t allocate(const std::vector<MuonMatrix>& matrices) {
        for (const MuonMatrix& m : matrices) {
            const size_t r = (size_t)std::min(m.rows, m.cols);
            x_capacity = std::max(x_capacity, (size_t)m.batch * m.rows * m.cols);
            gram_capacity = std::max(gram_capacity, (size_t)m.batch * r * r);
        }
        size_t bytes = 0;
        if (x_capacity == 0) return 0;
        x = device_alloc<floatX>(x_capacity, &bytes);
        x_next = device_alloc<floatX>(x_capacity, &bytes);
        gram = device_alloc<floatX>(gram_capacity, &bytes);
        poly = device_alloc<floatX>(gram_capacity, &bytes);
        return bytes;
    }
    void release() {
        for (void* p : {(void*)x, (void*)x_next, (void*)gram, (void*)poly}) cudaCheck(cudaFree(p));
    }
};

// C = alpha op(A) op(B) + beta C for a batch of column-major matrices, floatX
// in and out, fp32 accumulation.
inline void gemm_batched(cublasHandle_t cublas, cublasOperation_t ta, int m, int n, int k, float alpha,
                         const floatX* A, int lda, long long stride_a, const floatX* B, int ldb, long long stride_b,
                         float beta, floatX* C, int ldc, long long stride_c, int batch) {
    cublasCheck(cublasGemmStridedBatchedEx(cublas, ta, CUBLAS_OP_N, m, n, k, &alpha, A, CUBLAS_FLOATX, lda, stride_a,
                                           B, CUBLAS_FLOATX, ldb, stride_b, &beta, C, CUBLAS_FLOATX, ldc, stride_c,
                                           batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// One Muon step of a batch of `batch` matrices of rows x cols, stored one after
// the other at master/params/grads/m (fp32 except params). clip_scale is the
// device-side clip factor of grad_norm.
inline void muon_step(cublasHandle_t cublas, MuonWorkspace& ws, float* master, floatX* params, float* m,
                      const float* grads, int rows, int cols, int batch, float lr, float mu, float weight_decay,
                      int ns_steps, const float* clip_scale) {
    const bool transposed = rows > cols;
    const int r = transposed ? cols : rows, c = transposed ? rows : cols;  // X is r x c, r <= c
    const size_t per = (size_t)rows * cols, n = per * batch;
    if (n > ws.x_capacity || (size_t)batch * r * r > ws.gram_capacity)
        fail("internal: a %d x %d x %d Muon batch does not fit its workspace", batch, rows, cols);
    muon_momentum_kernel<<<ceil_div(n, THREADS), THREADS>>>(ws.x, m, grads, n, rows, cols, transposed, mu, clip_scale);
    launchCheck();
    muon_normalize_kernel<<<batch, MUON_THREADS>>>(ws.x, per, (float)NS_EPS);
    launchCheck();
    // Row-major X (r x c) is column-major X^T (c x r, ld c):
    //   A = X X^T:             op(A) = (X^T)^T, op(B) = X^T     -> r x r, ld r
    //   P = b A + c A A:        P starts as a copy of A           -> r x r
    //   X' = a X + P X, as X'^T = a X^T + X^T P (P symmetric)    -> c x r, ld c
    const long long xs = (long long)r * c, gs = (long long)r * r;
    for (int s = 0; s < ns_steps; s++) {
        gemm_batched(cublas, CUBLAS_OP_T, r, r, c, 1.0f, ws.x, c, xs, ws.x, c, xs, 0.0f, ws.gram, r, gs, batch);
        cudaCheck(cudaMemcpyAsync(ws.poly, ws.gram, (size_t)batch * gs * sizeof(floatX), cudaMemcpyDeviceToDevice));
        gemm_batched(cublas, CUBLAS_OP_N, r, r, r, (float)NS_C, ws.gram, r, gs, ws.gram, r, gs, (float)NS_B, ws.poly, r,
                     gs, batch);
        cudaCheck(cudaMemcpyAsync(ws.x_next, ws.x, n * sizeof(floatX), cudaMemcpyDeviceToDevice));
        gemm_batched(cublas, CUBLAS_OP_N, c, r, r, 1.0f, ws.x, c, xs, ws.poly, r, gs, (float)NS_A, ws.x_next, c, xs,
                     batch);
        std::swap(ws.x, ws.x_next);
    }
    muon_apply_kernel<<<ceil_div(n, THREADS), THREADS>>>(master, params, ws.x, n, rows, cols, transposed, lr,
                                                         (float)muon_scale(rows, cols), weight_decay);
    launchCheck();
}
