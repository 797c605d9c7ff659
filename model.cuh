// model.cuh: the transformer on the GPU: kernels, forward, backward, AdamW.
//
// Reading order:
//   1. plumbing: precision (floatX), checked CUDA/cuBLAS calls, the GPU;
//   2. the kernels, one op at a time, each with its math, its parallel
//      layout and its memory traffic; every one has a plain C++ twin in
//      test/reference.h that the GPU parity tests compare it with; then
//      router.cuh, the MoE layer's kernels (twins in test/reference_moe.h);
//   3. Model: parameters (one contiguous buffer each for the bf16 weights,
//      fp32 master weights, fp32 gradients and the two AdamW moments),
//      activations sized once from (B, T), the memory plan (model_plan: what
//      model_allocate will take, counted before the GPU is touched), and
//      forward / backward / update.
//
// Determinism: no kernel uses atomics whose order could change a result.
// Every reduction has one owner (a warp or a block) that sums in a fixed
// order, the embedding backward sorts tokens first (a stable radix sort)
// and sums each token's run chunk by chunk, then the chunks in order, and
// the attention backward computes dQ and dK/dV in two passes that each
// own their rows. cuBLAS is deterministic on a given GPU and toolkit.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cub/cub.cuh>
#include <string>
#include <vector>

#include "common.h"
#include "model_config.h"
#include "schedule.h"

// ----------------------------------------------------------------------------
// 1. Plumbing

#ifdef ENABLE_FP32
typedef float floatX;
static const cudaDataType_t CUBLAS_FLOATX = CUDA_R_32F;
#else
typedef __nv_bfloat16 floatX;
static const cudaDataType_t CUBLAS_FLOATX = CUDA_R_16BF;
#endif

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

inline void cuda_check(cudaError_t err, const char* call, const char* file, int line) {
    if (err != cudaSuccess) fail("CUDA: %s failed at %s:%d: %s", call, file, line, cudaGetErrorString(err));
}
#define cudaCheck(call) cuda_check((call), #call, __FILE__, __LINE__)

inline void cublas_check(cublasStatus_t status, const char* call, const char* file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS)
        fail("cuBLAS: %s failed at %s:%d: %s", call, file, line, cublasGetStatusString(status));
}
#define cublasCheck(call) cublas_check((call), #call, __FILE__, __LINE__)

// Kernel launches are asynchronous: this catches a bad launch configuration
// where it happened; errors inside a kernel surface at the next sync.
#define launchCheck() cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

struct GpuInfo {
    cudaDeviceProp prop;
    double peak_bf16_flops = 0;  // dense, per second; 0 when unknown
};

// Dense bf16 tensor-core peak by architecture (datasheet figures for the
// data-centre part of each generation: A100, H100/H200).
inline double peak_bf16_flops(const cudaDeviceProp& p) {
    if (p.major == 9) return 989e12;
    if (p.major == 8 && p.minor == 0) return 312e12;
    return 0;
}

// Selects GPU `local_rank`. Returns "" or why there is no usable device;
// *no_device (when given) tells a machine without a GPU, "no CUDA device
// (...)", from a GPU that CUDA cannot start (an old driver, say), which is
// reported with the driver's and the runtime's CUDA versions.
inline std::string gpu_open(int local_rank, GpuInfo* gpu, bool* no_device = nullptr) {
    int count = 0, driver = 0, runtime = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    cudaDriverGetVersion(&driver);  // 0: no NVIDIA driver installed at all
    cudaRuntimeGetVersion(&runtime);
    const bool none = err == cudaErrorNoDevice || (err == cudaErrorInsufficientDriver && driver == 0) ||
                      (err == cudaSuccess && count == 0);
    if (no_device) *no_device = none;
    if (none)
        return std::string("no CUDA device (cudaGetDeviceCount: ") +
               (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") + (driver == 0 ? ", no NVIDIA driver" : "") +
               ")";
    if (err != cudaSuccess)
        return string_format("CUDA cannot start: cudaGetDeviceCount: %s (%s); the driver supports CUDA %d.%d, this "
                             "program was built with CUDA %d.%d", cudaGetErrorName(err), cudaGetErrorString(err),
                             driver / 1000, driver % 1000 / 10, runtime / 1000, runtime % 1000 / 10);
    if (local_rank >= count)
        return string_format("process %d needs GPU %d but only %d are visible", local_rank, local_rank, count);
    cudaCheck(cudaSetDevice(local_rank));
    cudaCheck(cudaGetDeviceProperties(&gpu->prop, local_rank));
    gpu->peak_bf16_flops = peak_bf16_flops(gpu->prop);
    return "";
}

static const int WARP = 32;
static const float RMSNORM_EPS = 1e-6f;
static const float SOFTCAP = 15.0f;

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
    return x;
}

inline int ceil_div(size_t a, size_t b) { return (int)((a + b - 1) / b); }

// ----------------------------------------------------------------------------
// 2. Kernels

// Embedding: out[n, c] = wte[tokens[n], c]. One thread per element; reads
// and writes N*C values.
__global__ void embedding_forward_kernel(floatX* out, const int* tokens, const floatX* wte, int N, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * C) return;
    size_t n = i / C, c = i % C;
    out[i] = wte[(size_t)tokens[n] * C + c];
}

// Embedding backward: dwte[v] += sum of dout[n] over the n with tokens[n] = v.
// The positions are sorted by token first (a stable radix sort: each token's
// run of positions is in increasing order), then each run is summed in two
// levels, each in a fixed order: deterministic, no atomics, and a batch
// dominated by one token spreads over the whole GPU instead of one block.
//
// Level 1 (embedding_backward_chunk_kernel): the sorted array is cut into
// chunks of EMBEDDING_CHUNK positions, k = 0 .. ceil(N / CHUNK) - 1. Block
// (k, y) owns chunk k and channels [y, y + 1) x blockDim.x, one channel per
// thread; it stages the chunk's tokens and positions in shared memory and
// sums each piece of a run inside the chunk in position order. A run that
// lies wholly in the chunk is added to its dwte row there; a piece of a run
// that crosses a chunk edge is written to partial instead: the piece that
// begins at the chunk's start and continues an earlier run is chunk k's
// "head" (partial row 2k), the piece that starts a run and runs past the
// chunk's end its "tail" (row 2k + 1). A chunk has at most one of each.
// Reads N*C gradients once (8 rows in flight per thread), read-modify-writes
// each short run's row, writes at most two partial rows per chunk.
//
// Level 2 (embedding_backward_combine_kernel): block (k, y) owns the run
// whose tail is chunk k's, if there is one (a run that starts in chunk k and
// continues past it), and the same channels; it finds the run's end by binary
// search in the sorted tokens and adds tail(k) + head(k + 1) + ... +
// head(last chunk of the run), in chunk order, to the run's dwte row. Reads
// each partial row once; a run of L positions costs its owner L / CHUNK
// loads per channel, all independent.
static const int EMBEDDING_CHUNK = 64;
static const int EMBEDDING_ROWS_IN_FLIGHT = 8;

__global__ void embedding_backward_chunk_kernel(float* __restrict__ dwte, float* __restrict__ partial,
                                                const int* __restrict__ sorted_tokens,
                                                const int* __restrict__ sorted_positions,
                                                const floatX* __restrict__ dout, int N, int C) {
    // token[i + 1] is sorted_tokens[begin + i]; token[0] and token[len + 1]
    // are the neighbours outside the chunk (-1 past either end of the array)
    __shared__ int token[EMBEDDING_CHUNK + 2];
    __shared__ int position[EMBEDDING_CHUNK];
    const int k = blockIdx.x, begin = k * EMBEDDING_CHUNK, len = min(EMBEDDING_CHUNK, N - begin);
    for (int i = threadIdx.x; i < len + 2; i += blockDim.x) {
        int j = begin - 1 + i;
        token[i] = j >= 0 && j < N ? sorted_tokens[j] : -1;
    }
    for (int i = threadIdx.x; i < len; i += blockDim.x) position[i] = sorted_positions[begin + i];
    __syncthreads();
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.0f;
    int first = 0;  // where the current piece starts in the chunk
    for (int i0 = 0; i0 < len; i0 += EMBEDDING_ROWS_IN_FLIGHT) {
        float row[EMBEDDING_ROWS_IN_FLIGHT];
#pragma unroll
        for (int u = 0; u < EMBEDDING_ROWS_IN_FLIGHT; u++)
            row[u] = i0 + u < len ? to_float(dout[(size_t)position[i0 + u] * C + c]) : 0.0f;
#pragma unroll
        for (int u = 0; u < EMBEDDING_ROWS_IN_FLIGHT; u++) {
            const int i = i0 + u;
            if (i >= len) break;
            acc += row[u];
            const int v = token[i + 1];
            if (i + 1 < len && token[i + 2] == v) continue;  // the piece goes on in this chunk
            const bool starts_run = token[first] != v, ends_run = token[i + 2] != v;
            if (starts_run && ends_run) dwte[(size_t)v * C + c] += acc;
            else partial[(size_t)(2 * k + (starts_run ? 1 : 0)) * C + c] = acc;
            acc = 0.0f;
            first = i + 1;
        }
    }
}

__global__ void embedding_backward_combine_kernel(float* __restrict__ dwte, const float* __restrict__ partial,
                                                  const int* __restrict__ sorted_tokens, int N, int C) {
    const int k = blockIdx.x, last = (k + 1) * EMBEDDING_CHUNK - 1;  // the chunk's last position
    if (last + 1 >= N) return;
    const int v = sorted_tokens[last];
    if (sorted_tokens[last + 1] != v) return;                             // no run leaves this chunk
    if (k > 0 && sorted_tokens[k * EMBEDDING_CHUNK - 1] == v) return;     // it started in an earlier chunk
    int lo = last + 1, hi = N;  // the run's end: the first index past last whose token is not v
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (sorted_tokens[mid] == v) lo = mid + 1;
        else hi = mid;
    }
    const int last_chunk = (lo - 1) / EMBEDDING_CHUNK;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = partial[(size_t)(2 * k + 1) * C + c];
#pragma unroll 8
    for (int j = k + 1; j <= last_chunk; j++) acc += partial[(size_t)(2 * j) * C + c];
    dwte[(size_t)v * C + c] += acc;
}

// RMSNorm without weight: out = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps).
// One warp per row; reads C values twice (from L1 the second time), writes C.
__global__ void rmsnorm_forward_kernel(floatX* out, float* rstd, const floatX* inp, int N, int C) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= N) return;
    const floatX* x = inp + (size_t)row * C;
    float ss = 0.0f;
    for (int c = lane; c < C; c += WARP) { float v = to_float(x[c]); ss += v * v; }
    float r = rsqrtf(warp_sum(ss) / C + RMSNORM_EPS);
    for (int c = lane; c < C; c += WARP) out[(size_t)row * C + c] = from_float<floatX>(to_float(x[c]) * r);
    if (lane == 0) rstd[row] = r;
}

// RMSNorm backward from its output y = x * rstd:
//   dx += rstd * (dy - y * mean(dy * y)).  One warp per row; accumulates.
__global__ void rmsnorm_backward_kernel(floatX* dinp, const floatX* dout, const floatX* out, const float* rstd, int N,
                                        int C) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= N) return;
    size_t base = (size_t)row * C;
    float dot = 0.0f;
    for (int c = lane; c < C; c += WARP) dot += to_float(dout[base + c]) * to_float(out[base + c]);
    dot = warp_sum(dot) / C;
    float r = rstd[row];
    for (int c = lane; c < C; c += WARP) {
        float g = r * (to_float(dout[base + c]) - to_float(out[base + c]) * dot);
        dinp[base + c] = from_float<floatX>(to_float(dinp[base + c]) + g);
    }
}

// RoPE (rotate-half) then RMSNorm of each q and k head, in place on qkv.
// For head dim d and pair i < d/2 at position t, with angle t * 10000^(-2i/d):
//   (x_i, x_{i+d/2}) -> (x_i cos - x_{i+d/2} sin, x_{i+d/2} cos + x_i sin),
// then the head is divided by its RMS. One warp per (token, head) for the
// H + KVH rotated heads; each lane keeps its pairs in registers (d <= 256).
// Reads and writes the q and k parts of qkv once.
static const int ROPE_MAX_PAIRS_PER_LANE = 4;
__global__ void rope_qknorm_forward_kernel(floatX* qkv, float* rstd, const float* cos_table, const float* sin_table,
                                           int N, int T, int H, int KVH, int hd) {
    int item = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int heads = H + KVH;
    if (item >= N * heads) return;
    int n = item / heads, head = item % heads, t = n % T, half = hd / 2;
    floatX* x = qkv + (size_t)n * (H + 2 * KVH) * hd + (size_t)head * hd;
    float a[ROPE_MAX_PAIRS_PER_LANE], b[ROPE_MAX_PAIRS_PER_LANE], ss = 0.0f;
#pragma unroll
    for (int r = 0; r < ROPE_MAX_PAIRS_PER_LANE; r++) {
        int i = lane + r * WARP;
        a[r] = b[r] = 0.0f;
        if (i < half) {
            float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
            float c = cos_table[t * half + i], s = sin_table[t * half + i];
            a[r] = x1 * c - x2 * s;
            b[r] = x2 * c + x1 * s;
            ss += a[r] * a[r] + b[r] * b[r];
        }
    }
    float rs = rsqrtf(warp_sum(ss) / hd + RMSNORM_EPS);
#pragma unroll
    for (int r = 0; r < ROPE_MAX_PAIRS_PER_LANE; r++) {
        int i = lane + r * WARP;
        if (i < half) {
            x[i] = from_float<floatX>(a[r] * rs);
            x[i + half] = from_float<floatX>(b[r] * rs);
        }
    }
    if (lane == 0) rstd[item] = rs;
}

// Backward of rope_qknorm, in place on the q and k parts of dqkv: first the
// RMSNorm backward (from the normalised output y, as in rmsnorm_backward),
// then the inverse rotation (the transpose of a rotation):
//   dx_i = dr_i cos + dr_{i+d/2} sin,  dx_{i+d/2} = dr_{i+d/2} cos - dr_i sin.
__global__ void rope_qknorm_backward_kernel(floatX* dqkv, const floatX* qkv, const float* rstd, const float* cos_table,
                                            const float* sin_table, int N, int T, int H, int KVH, int hd) {
    int item = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int heads = H + KVH;
    if (item >= N * heads) return;
    int n = item / heads, head = item % heads, t = n % T, half = hd / 2;
    size_t off = (size_t)n * (H + 2 * KVH) * hd + (size_t)head * hd;
    floatX* dx = dqkv + off;
    const floatX* y = qkv + off;
    float dot = 0.0f;
    for (int i = lane; i < hd; i += WARP) dot += to_float(dx[i]) * to_float(y[i]);
    dot = warp_sum(dot) / hd;
    float rs = rstd[item];
    for (int i = lane; i < half; i += WARP) {
        float d1 = rs * (to_float(dx[i]) - to_float(y[i]) * dot);
        float d2 = rs * (to_float(dx[i + half]) - to_float(y[i + half]) * dot);
        float c = cos_table[t * half + i], s = sin_table[t * half + i];
        dx[i] = from_float<floatX>(d1 * c + d2 * s);
        dx[i + half] = from_float<floatX>(d2 * c - d1 * s);
    }
}

// Causal attention, flash-style: out_i = sum_{j<=i} softmax_j(q_i.k_j / sqrt(d)) v_j
// with an online softmax, so no T x T matrix ever exists; lse_i (the
// log-sum-exp of row i's scaled scores) is kept for the backward.
// Layout: a block of ATT_ROWS warps owns ATT_ROWS consecutive query rows of
// one (batch, head), one warp per row. The block walks the keys in tiles of
// 32, staged in shared memory as fp32 (rows padded by one word so that lane
// j reading row j hits distinct banks). In a tile, lane j scores key j; the
// warp then rescales its running (max, sum, output), and each lane owns the
// output dims lane, lane + 32, ... Each K/V tile is read from global memory
// once per block: T / ATT_ROWS times per (batch, head) in all.
// Arithmetic runs on the CUDA cores in fp32: simple and exact. This is the
// FP32 build's kernel (the tight tests) and any head dim the tensor-core
// kernels below are not compiled for; the BF16 build otherwise runs
// flash_attention_forward_kernel.
static const int ATT_ROWS = 16;
static const int ATT_TILE = 32;
static const int ATT_MAX_DIMS_PER_LANE = 8;  // head dim <= 256

inline size_t attention_smem_bytes(int hd) {
    return (2 * (size_t)ATT_TILE * (hd + 1) + 2 * (size_t)ATT_ROWS * hd) * sizeof(float);
}

// Stages rows [row0, row0 + n) of one head (hd values at src + row *
// src_stride) into shared memory as fp32, dst_stride apart, with zeros for
// rows at or past `rows`. All threads of the block take part.
__device__ void load_rows(float* dst, int n, int dst_stride, const floatX* src, size_t src_stride, int row0, int rows,
                          int hd) {
    for (int i = threadIdx.x; i < n * hd; i += blockDim.x) {
        int r = i / hd, d = i % hd;
        dst[r * dst_stride + d] = row0 + r < rows ? to_float(src[(size_t)(row0 + r) * src_stride + d]) : 0.0f;
    }
}
// A tile of ATT_TILE rows, padded to hd + 1 so lane j reading row j hits distinct banks.
__device__ void load_tile(float* dst, const floatX* src, size_t src_stride, int row0, int rows, int hd) {
    load_rows(dst, ATT_TILE, hd + 1, src, src_stride, row0, rows, hd);
}

// The keys and values of positions j0 .. j0 + ATT_TILE - 1 of KV head g, once
// every warp is done with the previous tile; visible to all warps on return.
// base is one sequence's qkv rows, `stride` apart.
__device__ void load_kv_tiles(float* k_tile, float* v_tile, const floatX* base, size_t stride, int H, int KVH, int g,
                              int j0, int T, int hd) {
    __syncthreads();
    load_tile(k_tile, base + (size_t)(H + g) * hd, stride, j0, T, hd);
    load_tile(v_tile, base + (size_t)(H + KVH + g) * hd, stride, j0, T, hd);
    __syncthreads();
}

__global__ void attention_forward_kernel(floatX* out, float* lse, const floatX* qkv, int T, int H, int KVH, int hd) {
    extern __shared__ float smem[];
    float* k_tile = smem;
    float* v_tile = k_tile + ATT_TILE * (hd + 1);
    float* q_rows = v_tile + ATT_TILE * (hd + 1);
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int row0 = blockIdx.x * ATT_ROWS, h = blockIdx.y, b = blockIdx.z, g = h / (H / KVH);
    int i = row0 + warp;  // this warp's query row
    size_t stride = (size_t)(H + 2 * KVH) * hd;
    const floatX* base = qkv + (size_t)b * T * stride;
    const float scale = rsqrtf((float)hd);
    load_rows(q_rows, ATT_ROWS, hd, base + (size_t)h * hd, stride, row0, T, hd);
    float m = -INFINITY, l = 0.0f, o[ATT_MAX_DIMS_PER_LANE];
#pragma unroll
    for (int r = 0; r < ATT_MAX_DIMS_PER_LANE; r++) o[r] = 0.0f;
    int last_row = min(row0 + ATT_ROWS, T) - 1;
    for (int j0 = 0; j0 <= last_row; j0 += ATT_TILE) {
        load_kv_tiles(k_tile, v_tile, base, stride, H, KVH, g, j0, T, hd);
        if (i >= T || j0 > i) continue;
        int j = j0 + lane;
        float s = -INFINITY;
        if (j <= i) {
            s = 0.0f;
            for (int d = 0; d < hd; d++) s += q_rows[warp * hd + d] * k_tile[lane * (hd + 1) + d];
            s *= scale;
        }
        float m_new = fmaxf(m, warp_max(s));
        float p = j <= i ? __expf(s - m_new) : 0.0f;
        float correction = __expf(m - m_new);
        l = l * correction + warp_sum(p);
        m = m_new;
#pragma unroll
        for (int r = 0; r < ATT_MAX_DIMS_PER_LANE; r++) o[r] *= correction;
        for (int jj = 0; jj < ATT_TILE; jj++) {
            float pj = __shfl_sync(0xffffffff, p, jj);  // all lanes: shuffles must not diverge
#pragma unroll
            for (int r = 0; r < ATT_MAX_DIMS_PER_LANE; r++) {
                int d = lane + r * WARP;
                if (d < hd) o[r] += pj * v_tile[jj * (hd + 1) + d];
            }
        }
    }
    if (i >= T) return;
    size_t row = (size_t)b * T + i;
#pragma unroll
    for (int r = 0; r < ATT_MAX_DIMS_PER_LANE; r++) {
        int d = lane + r * WARP;
        if (d < hd) out[row * H * hd + h * hd + d] = from_float<floatX>(o[r] / l);
    }
    if (lane == 0) lse[row * H + h] = m + logf(l);
}

// Attention backward, step 1: D_i = sum_d dout_i,d * out_i,d per (row, head),
// the row term of the softmax gradient. One warp per (row, head).
__global__ void attention_delta_kernel(float* delta, const floatX* dout, const floatX* out, int N, int H, int hd) {
    int item = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (item >= N * H) return;
    float acc = 0.0f;
    for (int d = lane; d < hd; d += WARP) acc += to_float(dout[(size_t)item * hd + d]) * to_float(out[(size_t)item * hd + d]);
    acc = warp_sum(acc);
    if (lane == 0) delta[item] = acc;
}

// Attention backward, step 2: dq. With p_ij = exp(q_i.k_j * scale - lse_i)
// recomputed, dp_ij = dout_i.v_j and ds_ij = p_ij (dp_ij - D_i):
//   dq_i = scale * sum_{j<=i} ds_ij k_j.
// Same layout as the forward (a warp per query row, K/V tiles in shared
// memory, lane j handles key j of the tile); the warp owns dq_i, so no two
// threads ever add into the same value.
__global__ void attention_backward_dq_kernel(floatX* dqkv, const floatX* dout, const float* lse, const float* delta,
                                             const floatX* qkv, int T, int H, int KVH, int hd) {
    extern __shared__ float smem[];
    float* k_tile = smem;
    float* v_tile = k_tile + ATT_TILE * (hd + 1);
    float* q_rows = v_tile + ATT_TILE * (hd + 1);
    float* do_rows = q_rows + ATT_ROWS * hd;
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int row0 = blockIdx.x * ATT_ROWS, h = blockIdx.y, b = blockIdx.z, g = h / (H / KVH);
    int i = row0 + warp;
    size_t stride = (size_t)(H + 2 * KVH) * hd;
    const floatX* base = qkv + (size_t)b * T * stride;
    const float scale = rsqrtf((float)hd);
    const floatX* dout_b = dout + (size_t)b * T * H * hd;
    load_rows(q_rows, ATT_ROWS, hd, base + (size_t)h * hd, stride, row0, T, hd);
    load_rows(do_rows, ATT_ROWS, hd, dout_b + (size_t)h * hd, (size_t)H * hd, row0, T, hd);
    size_t row_i = (size_t)b * T + i;
    float lse_i = i < T ? lse[row_i * H + h] : 0.0f, d_i = i < T ? delta[row_i * H + h] : 0.0f;
    float dq[ATT_MAX_DIMS_PER_LANE];
#pragma unroll
    for (int r = 0; r < ATT_MAX_DIMS_PER_LANE; r++) dq[r] = 0.0f;
    int last_row = min(row0 + ATT_ROWS, T) - 1;
    for (int j0 = 0; j0 <= last_row; j0 += ATT_TILE) {
        load_kv_tiles(k_tile, v_tile, base, stride, H, KVH, g, j0, T, hd);
        if (i >= T || j0 > i) continue;
        int j = j0 + lane;
        float ds = 0.0f;
        if (j <= i) {
            float s = 0.0f, dp = 0.0f;
            for (int d = 0; d < hd; d++) {
                s += q_rows[warp * hd + d] * k_tile[lane * (hd + 1) + d];
                dp += do_rows[warp * hd + d] * v_tile[lane * (hd + 1) + d];
            }
            float p = __expf(s * scale - lse_i);
            ds = p * (dp - d_i);
        }
        for (int jj = 0; jj < ATT_TILE; jj++) {
            float ds_j = __shfl_sync(0xffffffff, ds, jj);
#pragma unroll
            for (int r = 0; r < ATT_MAX_DIMS_PER_LANE; r++) {
                int d = lane + r * WARP;
                if (d < hd) dq[r] += ds_j * k_tile[jj * (hd + 1) + d];
            }
        }
    }
    if (i >= T) return;
#pragma unroll
    for (int r = 0; r < ATT_MAX_DIMS_PER_LANE; r++) {
        int d = lane + r * WARP;
        if (d < hd) dqkv[(size_t)row_i * stride + h * hd + d] = from_float<floatX>(dq[r] * scale);
    }
}

// Attention backward, step 3: dk and dv, mirrored: a warp owns key row j of
// kv head g and sums over every query head h of g's group and every query
// i >= j:  dv_j = sum p_ij dout_i,  dk_j = scale * sum ds_ij q_i.
// The block's warps own ATT_ROWS consecutive key rows; the queries go by in
// tiles of 32 (Q and dO staged in shared memory, with their lse and D), lane
// i handling query i of the tile.
__global__ void attention_backward_dkv_kernel(floatX* dqkv, const floatX* dout, const float* lse, const float* delta,
                                              const floatX* qkv, int T, int H, int KVH, int hd) {
    extern __shared__ float smem[];
    float* q_tile = smem;
    float* do_tile = q_tile + ATT_TILE * (hd + 1);
    float* k_rows = do_tile + ATT_TILE * (hd + 1);
    float* v_rows = k_rows + ATT_ROWS * hd;
    __shared__ float lse_tile[ATT_TILE], delta_tile[ATT_TILE];
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int row0 = blockIdx.x * ATT_ROWS, g = blockIdx.y, b = blockIdx.z, group = H / KVH;
    int j = row0 + warp;  // this warp's key row
    size_t stride = (size_t)(H + 2 * KVH) * hd;
    const floatX* base = qkv + (size_t)b * T * stride;
    const float scale = rsqrtf((float)hd);
    const floatX* dout_b = dout + (size_t)b * T * H * hd;
    load_rows(k_rows, ATT_ROWS, hd, base + (size_t)(H + g) * hd, stride, row0, T, hd);
    load_rows(v_rows, ATT_ROWS, hd, base + (size_t)(H + KVH + g) * hd, stride, row0, T, hd);
    float dk[ATT_MAX_DIMS_PER_LANE], dv[ATT_MAX_DIMS_PER_LANE];
#pragma unroll
    for (int r = 0; r < ATT_MAX_DIMS_PER_LANE; r++) dk[r] = dv[r] = 0.0f;
    for (int h = g * group; h < (g + 1) * group; h++) {
        for (int i0 = row0 / ATT_TILE * ATT_TILE; i0 < T; i0 += ATT_TILE) {
            __syncthreads();
            load_tile(q_tile, base + (size_t)h * hd, stride, i0, T, hd);
            load_tile(do_tile, dout_b + (size_t)h * hd, (size_t)H * hd, i0, T, hd);
            if (threadIdx.x < ATT_TILE) {
                size_t row = (size_t)b * T + i0 + threadIdx.x;
                bool ok = i0 + (int)threadIdx.x < T;
                lse_tile[threadIdx.x] = ok ? lse[row * H + h] : 0.0f;
                delta_tile[threadIdx.x] = ok ? delta[row * H + h] : 0.0f;
            }
            __syncthreads();
            if (j >= T || i0 + ATT_TILE <= j) continue;
            int i = i0 + lane;
            float p = 0.0f, ds = 0.0f;
            if (i >= j && i < T) {
                float s = 0.0f, dp = 0.0f;
                for (int d = 0; d < hd; d++) {
                    s += q_tile[lane * (hd + 1) + d] * k_rows[warp * hd + d];
                    dp += do_tile[lane * (hd + 1) + d] * v_rows[warp * hd + d];
                }
                p = __expf(s * scale - lse_tile[lane]);
                ds = p * (dp - delta_tile[lane]);
            }
            for (int ii = 0; ii < ATT_TILE; ii++) {
                float p_i = __shfl_sync(0xffffffff, p, ii), ds_i = __shfl_sync(0xffffffff, ds, ii);
#pragma unroll
                for (int r = 0; r < ATT_MAX_DIMS_PER_LANE; r++) {
                    int d = lane + r * WARP;
                    if (d < hd) {
                        dv[r] += p_i * do_tile[ii * (hd + 1) + d];
                        dk[r] += ds_i * q_tile[ii * (hd + 1) + d];
                    }
                }
            }
        }
    }
    if (j >= T) return;
    size_t row_j = (size_t)b * T + j;
#pragma unroll
    for (int r = 0; r < ATT_MAX_DIMS_PER_LANE; r++) {
        int d = lane + r * WARP;
        if (d < hd) {
            dqkv[row_j * stride + (H + g) * hd + d] = from_float<floatX>(dk[r] * scale);
            dqkv[row_j * stride + (H + KVH + g) * hd + d] = from_float<floatX>(dv[r]);
        }
    }
}

#ifndef ENABLE_FP32
// ----------------------------------------------------------------------------
// Flash attention on the tensor cores (the BF16 build; the FP32 build keeps
// the exact CUDA-core kernels above for its tight tests, and they also serve
// head dims these kernels do not take: flash_supported).
//
// The FlashAttention-2 structure. A block of FA_WARPS = 4 warps owns FA_BQ =
// 64 query rows of one (batch, head), warp w rows 16w .. 16w + 15; it walks
// the keys in tiles of FA_BK = 64 up to the diagonal (causal: tiles above it
// are skipped, the diagonal tile is masked inside). Per key tile, each warp:
//   S = Q K^T             wmma 16x16x16, bf16 in, fp32 out, staged in shared
//   m' = max(m, max_j s)  online softmax in fp32: two lanes per row, each
//   p  = exp(s - m')      owning 32 of the 64 columns (a shuffle joins them)
//   l  = l e^(m - m') + sum_j p
//   O  = O e^(m - m') + P V   P as bf16 in shared, O fp32 in shared, rescaled
//                             there and then loaded as the accumulator
// and at the end out = O / l, lse = m + log l. A warp reads and writes only
// its own rows of S, P and O, so between the phases a __syncwarp suffices;
// the block synchronises only around the shared K/V tile loads.
// Q stays in registers (hd/16 matrix_a fragments) for the whole block.
// Shared rows are padded (bf16 rows by 8 elements, fp32 by 4) so that the
// 8 rows a fragment load touches fall in distinct banks; the softmax lanes
// walk their 32 columns rotated by the lane number for the same reason.
// Memory traffic: Q, out once; each K/V tile once per block, so K and V are
// read T / 64 times per (batch, head) in all (half that on average, causal).
// Shared memory: 110 KB a block at hd 128 (2 blocks per SM), 70 KB at hd 64
// (3); the grid is (T / 64, H, B): 3072 blocks at d12, B = 16, T = 2048.
static const int FA_BQ = 64, FA_BK = 64, FA_WARPS = 4, FA_THREADS = FA_WARPS * WARP;
static const int FA_MAX_HD = 128;
static const int FA_S_LD = FA_BK + 4;  // fp32 score rows
static const int FA_P_LD = FA_BK + 8;  // bf16 probability rows
static_assert(FA_BQ == 16 * FA_WARPS && FA_BK == 64, "a warp owns 16 query rows; two lanes per row own 32 keys each");

// Head dims with a tensor-core kernel: compiled for 32, 64 and 128.
inline bool flash_supported(int hd) { return hd == 32 || hd == 64 || hd == 128; }

// Q, K and V tiles (bf16, rows of hd + 8), S (fp32), P (bf16) and O (fp32, rows of hd + 4).
inline size_t flash_forward_smem_bytes(int hd) {
    return 3 * (size_t)FA_BQ * (hd + 8) * 2 + (size_t)FA_BQ * FA_S_LD * 4 + (size_t)FA_BQ * FA_P_LD * 2 +
           (size_t)FA_BQ * (hd + 4) * 4;
}

// Copies rows [row0, row0 + 64) of one head (hd values at src + row *
// src_stride) into shared memory, ld apart, 16 bytes at a time, with zeros
// for rows at or past `rows` (zero, not poison: their P is 0, and 0 * NaN
// would not be). All threads of the block take part.
template <int HD>
__device__ void flash_load_tile(floatX* dst, int ld, const floatX* src, size_t src_stride, int row0, int rows) {
    const int chunks = HD / 8;
    for (int c = threadIdx.x; c < 64 * chunks; c += blockDim.x) {
        int r = c / chunks, k = (c % chunks) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (row0 + r < rows) v = *reinterpret_cast<const uint4*>(src + (size_t)(row0 + r) * src_stride + k);
        *reinterpret_cast<uint4*>(dst + r * ld + k) = v;
    }
}

template <int HD>
__global__ void __launch_bounds__(FA_THREADS)
    flash_attention_forward_kernel(floatX* out, float* lse, const floatX* qkv, int T, int H, int KVH) {
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char flash_smem[];
    const int ld = HD + 8, o_ld = HD + 4;
    floatX* q_s = (floatX*)flash_smem;
    floatX* k_s = q_s + FA_BQ * ld;
    floatX* v_s = k_s + FA_BK * ld;
    float* s_s = (float*)(v_s + FA_BK * ld);
    floatX* p_s = (floatX*)(s_s + FA_BQ * FA_S_LD);
    float* o_s = (float*)(p_s + FA_BQ * FA_P_LD);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    // The last query tiles have the most key tiles: they go first, so the short ones fill the tail.
    const int q0 = (gridDim.x - 1 - blockIdx.x) * FA_BQ, h = blockIdx.y, b = blockIdx.z, g = h / (H / KVH);
    const size_t stride = (size_t)(H + 2 * KVH) * HD;
    const floatX* base = qkv + (size_t)b * T * stride;
    const float scale = rsqrtf((float)HD);
    const int w0 = 16 * warp;                   // the warp's first row in the tile
    const int r = lane / 2, half = lane % 2;    // softmax: this lane's row of the warp's 16, and its half of the keys
    const int i = q0 + w0 + r;                  // ... as a query position
    flash_load_tile<HD>(q_s, ld, base + (size_t)h * HD, stride, q0, T);
    for (int e = threadIdx.x; e < FA_BQ * HD; e += blockDim.x) o_s[e / HD * o_ld + e % HD] = 0.0f;
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, floatX, wmma::row_major> q_frag[HD / 16];
#pragma unroll
    for (int k = 0; k < HD / 16; k++) wmma::load_matrix_sync(q_frag[k], q_s + w0 * ld + 16 * k, ld);
    float m = -INFINITY, l = 0.0f;  // row i's running max and sum (both lanes of the row hold them)
    const int last = min(q0 + FA_BQ, T) - 1;
    for (int j0 = 0; j0 <= last; j0 += FA_BK) {
        __syncthreads();  // every warp is done with the previous K and V
        flash_load_tile<HD>(k_s, ld, base + (size_t)(H + g) * HD, stride, j0, T);
        flash_load_tile<HD>(v_s, ld, base + (size_t)(H + KVH + g) * HD, stride, j0, T);
        __syncthreads();
        // S = Q K^T for the warp's 16 rows: K read as a column-major matrix_b (element (d, j) at k_s[j][d]).
#pragma unroll
        for (int n = 0; n < FA_BK; n += 16) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int k = 0; k < HD / 16; k++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, floatX, wmma::col_major> kf;
                wmma::load_matrix_sync(kf, k_s + n * ld + 16 * k, ld);
                wmma::mma_sync(acc, q_frag[k], kf, acc);
            }
            wmma::store_matrix_sync(s_s + w0 * FA_S_LD + n, acc, FA_S_LD, wmma::mem_row_major);
        }
        __syncwarp();
        // Online softmax: this lane's 32 keys j0 + 32 half + c, masked past the diagonal and past T.
        const float* srow = s_s + (w0 + r) * FA_S_LD + 32 * half;
        floatX* prow = p_s + (w0 + r) * FA_P_LD + 32 * half;
        const int jmax = min(i, T - 1) - j0 - 32 * half;  // this lane's columns c <= jmax are live
        float mx = -INFINITY;
        for (int c = 0; c < 32; c++) {
            int cc = (c + lane) % 32;
            if (cc <= jmax) mx = fmaxf(mx, srow[cc] * scale);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        const float m_new = fmaxf(m, mx);  // finite: key 0 is live for every row in the first tile
        float sum = 0.0f;
        for (int c = 0; c < 32; c++) {
            int cc = (c + lane) % 32;
            float p = cc <= jmax ? __expf(srow[cc] * scale - m_new) : 0.0f;
            sum += p;
            prow[cc] = from_float<floatX>(p);
        }
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        const float correction = __expf(m - m_new);
        l = l * correction + sum;
        m = m_new;
        float* orow = o_s + (w0 + r) * o_ld + HD / 2 * half;
        for (int c = 0; c < HD / 2; c++) orow[(c + lane) % (HD / 2)] *= correction;
        __syncwarp();
        // O += P V: V read as a row-major matrix_b (element (j, d) at v_s[j][d]).
#pragma unroll
        for (int n = 0; n < HD; n += 16) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, o_s + w0 * o_ld + n, o_ld, wmma::mem_row_major);
#pragma unroll
            for (int k = 0; k < FA_BK; k += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, floatX, wmma::row_major> pf;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, floatX, wmma::row_major> vf;
                wmma::load_matrix_sync(pf, p_s + w0 * FA_P_LD + k, FA_P_LD);
                wmma::load_matrix_sync(vf, v_s + k * ld + n, ld);
                wmma::mma_sync(acc, pf, vf, acc);
            }
            wmma::store_matrix_sync(o_s + w0 * o_ld + n, acc, o_ld, wmma::mem_row_major);
        }
        __syncwarp();
    }
    // out = O / l, written by the whole warp a row at a time (coalesced); S's first column holds each row's 1 / l.
    if (half == 0) s_s[(w0 + r) * FA_S_LD] = 1.0f / l;
    if (half == 0 && i < T) lse[((size_t)b * T + i) * H + h] = m + logf(l);
    __syncwarp();
    for (int rr = 0; rr < 16; rr++) {
        int ii = q0 + w0 + rr;
        if (ii >= T) break;
        const float inv_l = s_s[(w0 + rr) * FA_S_LD];
        floatX* dst = out + ((size_t)b * T + ii) * H * HD + (size_t)h * HD;
        for (int d = lane; d < HD; d += WARP) dst[d] = from_float<floatX>(o_s[(w0 + rr) * o_ld + d] * inv_l);
    }
}

// Flash attention backward (FA-2), in two passes that each own their outputs,
// so the sums need no atomics and come out the same every run. With
// p_ij = exp(scale q_i.k_j - lse_i) recomputed from the forward's lse,
// dp_ij = dout_i.v_j, D_i = dout_i.out_i (attention_delta_kernel) and
// ds_ij = p_ij (dp_ij - D_i):
//   dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij dout_i.
// Pass 1 (flash_attention_backward_dq_kernel): the forward's layout, a block
// of 4 warps owns 64 query rows of one (batch, head), warp w rows 16w..16w+15,
// and walks the key tiles up to the diagonal: S = Q K^T and dP = dO V^T
// (wmma, fp32, staged in shared), dS in bf16 (two lanes per row, 32 keys
// each), then dQ += dS K into the warp's fp32 accumulator fragments, which
// stay in registers for the whole pass (no rescaling here: lse is final).
// Pass 2 (flash_attention_backward_dkv_kernel): mirrored, a block owns 64
// key rows of KV head g, warp w rows 16w..16w+15, and walks every query head
// of g's group and every query tile from the diagonal on: S^T = K Q^T and
// dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q into register fragments.
// Memory traffic: pass 1 reads K, V once per query tile (T/64 times per
// (batch, head), half that on average, causal), pass 2 reads Q, dO, lse and D
// once per key tile; each writes its outputs once.
// Shared memory: 111.5 KB a block at hd 128, 79.5 KB at hd 64 (2 blocks per
// SM); grids (T / 64, H, B) and (T / 64, KVH, B).
static const int FA_DS_LD = FA_BK + 8;  // bf16 dS / P rows

// Both passes: Q, dO, K, V tiles (bf16), S and dP (fp32), dS (bf16), lse and D of 64 rows.
inline size_t flash_backward_smem_bytes(int hd) {
    return 4 * (size_t)FA_BQ * (hd + 8) * 2 + 2 * (size_t)FA_BQ * FA_S_LD * 4 + (size_t)FA_BQ * FA_DS_LD * 2 +
           2 * (size_t)FA_BQ * 4;
}

// Both passes' shared memory, carved from the dynamic buffer (rows of bf16
// tiles ld = hd + 8 apart): the Q and dO tiles, then K and V (each pair
// contiguous: at its end a pass reuses the pair it is done with as fp32
// scratch for its output rows), S and dP, dS, then lse and D.
struct FlashBackwardSmem {
    floatX *q, *dout, *k, *v, *ds;
    float *s, *dp, *lse, *delta;
    __device__ FlashBackwardSmem(unsigned char* base, int ld) {
        q = (floatX*)base;
        dout = q + FA_BQ * ld;
        k = dout + FA_BQ * ld;
        v = k + FA_BK * ld;
        s = (float*)(v + FA_BK * ld);
        dp = s + FA_BQ * FA_S_LD;
        ds = (floatX*)(dp + FA_BQ * FA_S_LD);
        lse = (float*)(ds + FA_BQ * FA_DS_LD);
        delta = lse + FA_BQ;
    }
};

// The lse and D of rows [row0, row0 + 64) of head h into shared memory (0 past T).
__device__ void flash_load_rowstats(float* lse_s, float* delta_s, const float* lse, const float* delta, size_t row_b,
                                    int row0, int T, int H, int h) {
    for (int r = threadIdx.x; r < 64; r += blockDim.x) {
        bool ok = row0 + r < T;
        size_t item = (row_b + row0 + r) * H + h;
        lse_s[r] = ok ? lse[item] : 0.0f;
        delta_s[r] = ok ? delta[item] : 0.0f;
    }
}

// acc (16 x 16 per fragment, 16 x 64 in all) = A B^T for the warp's 16 rows:
// A's rows at a (ld apart), B's 64 rows at bm (ld apart), both HD wide; B is
// read as a column-major matrix_b (element (d, j) at bm[j][d]). Stored to out.
template <int HD>
__device__ void flash_rows_times_tile_t(float* out, const floatX* a, const floatX* bm, int ld) {
    using namespace nvcuda;
#pragma unroll
    for (int n = 0; n < 64; n += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
#pragma unroll
        for (int k = 0; k < HD / 16; k++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, floatX, wmma::row_major> af;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, floatX, wmma::col_major> bf;
            wmma::load_matrix_sync(af, a + 16 * k, ld);
            wmma::load_matrix_sync(bf, bm + n * ld + 16 * k, ld);
            wmma::mma_sync(acc, af, bf, acc);
        }
        wmma::store_matrix_sync(out + n, acc, FA_S_LD, wmma::mem_row_major);
    }
}

// acc[n] (16 x HD) += A B with A the warp's 16 x 64 bf16 rows at a (FA_DS_LD
// apart) and B a 64 x HD tile at bm (ld apart), row-major.
template <int HD>
__device__ void flash_rows_times_tile(nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>* acc,
                                      const floatX* a, const floatX* bm, int ld) {
    using namespace nvcuda;
    // Not unrolled over k: with the accumulators holding up to 128 registers,
    // ptxas hoisting the next k step's fragment loads spills.
#pragma unroll 1
    for (int k = 0; k < 64; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, floatX, wmma::row_major> af;
        wmma::load_matrix_sync(af, a + k, FA_DS_LD);
#pragma unroll
        for (int n = 0; n < HD / 16; n++) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, floatX, wmma::row_major> bf;
            wmma::load_matrix_sync(bf, bm + k * ld + 16 * n, ld);
            wmma::mma_sync(acc[n], af, bf, acc[n]);
        }
    }
}

// Writes the warp's 16 x HD accumulator fragments times `mul` as floatX rows
// row0 .. row0 + 15 (those < T) of dst (stride apart), staged through the
// warp's fp32 scratch (16 rows of HD + 4); the whole warp writes a row at a time.
template <int HD>
__device__ void flash_write_rows(floatX* dst, size_t stride, int row0, int T, float mul,
                                 const nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>* acc,
                                 float* scratch) {
    using namespace nvcuda;
    const int lane = threadIdx.x % WARP, ld = HD + 4;
#pragma unroll
    for (int n = 0; n < HD / 16; n++) wmma::store_matrix_sync(scratch + 16 * n, acc[n], ld, wmma::mem_row_major);
    __syncwarp();
    for (int r = 0; r < 16 && row0 + r < T; r++)
        for (int d = lane; d < HD; d += WARP)
            dst[(size_t)(row0 + r) * stride + d] = from_float<floatX>(scratch[r * ld + d] * mul);
    __syncwarp();
}

template <int HD>
__global__ void __launch_bounds__(FA_THREADS)
    flash_attention_backward_dq_kernel(floatX* dqkv, const floatX* dout, const float* lse, const float* delta,
                                       const floatX* qkv, int T, int H, int KVH) {
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char flash_smem[];
    const int ld = HD + 8;
    const FlashBackwardSmem sm(flash_smem, ld);
    floatX *q_s = sm.q, *do_s = sm.dout, *k_s = sm.k, *v_s = sm.v, *ds_s = sm.ds;
    float *s_s = sm.s, *dp_s = sm.dp, *lse_s = sm.lse, *delta_s = sm.delta;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * FA_BQ, h = blockIdx.y, b = blockIdx.z, g = h / (H / KVH);
    const size_t stride = (size_t)(H + 2 * KVH) * HD;
    const floatX* base = qkv + (size_t)b * T * stride;
    const float scale = rsqrtf((float)HD);
    const int w0 = 16 * warp, r = lane / 2, half = lane % 2, i = q0 + w0 + r;
    flash_load_tile<HD>(q_s, ld, base + (size_t)h * HD, stride, q0, T);
    flash_load_tile<HD>(do_s, ld, dout + (size_t)b * T * H * HD + (size_t)h * HD, (size_t)H * HD, q0, T);
    flash_load_rowstats(lse_s, delta_s, lse, delta, (size_t)b * T, q0, T, H, h);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> dq[HD / 16];
#pragma unroll
    for (int n = 0; n < HD / 16; n++) wmma::fill_fragment(dq[n], 0.0f);
    const int last = min(q0 + FA_BQ, T) - 1;
    for (int j0 = 0; j0 <= last; j0 += FA_BK) {
        __syncthreads();  // every warp is done with the previous K and V (and, the first time, Q, dO, lse, D are in)
        flash_load_tile<HD>(k_s, ld, base + (size_t)(H + g) * HD, stride, j0, T);
        flash_load_tile<HD>(v_s, ld, base + (size_t)(H + KVH + g) * HD, stride, j0, T);
        __syncthreads();
        flash_rows_times_tile_t<HD>(s_s + w0 * FA_S_LD, q_s + w0 * ld, k_s, ld);
        flash_rows_times_tile_t<HD>(dp_s + w0 * FA_S_LD, do_s + w0 * ld, v_s, ld);
        __syncwarp();
        // dS for this lane's 32 keys j0 + 32 half + c (rotated by lane: distinct banks), 0 past the diagonal and T.
        const int jmax = min(i, T - 1) - j0 - 32 * half;
        const float lse_i = lse_s[w0 + r], d_i = delta_s[w0 + r];
        const float* srow = s_s + (w0 + r) * FA_S_LD + 32 * half;
        const float* dprow = dp_s + (w0 + r) * FA_S_LD + 32 * half;
        floatX* dsrow = ds_s + (w0 + r) * FA_DS_LD + 32 * half;
        for (int c = 0; c < 32; c++) {
            int cc = (c + lane) % 32;
            float ds = 0.0f;
            if (cc <= jmax) ds = __expf(srow[cc] * scale - lse_i) * (dprow[cc] - d_i);
            dsrow[cc] = from_float<floatX>(ds);
        }
        __syncwarp();
        flash_rows_times_tile<HD>(dq, ds_s + w0 * FA_DS_LD, k_s, ld);
    }
    __syncthreads();  // K and V are done with: their space holds the warps' fp32 dq rows
    float* scratch = (float*)k_s + w0 * (HD + 4);
    flash_write_rows<HD>(dqkv + (size_t)b * T * stride + (size_t)h * HD, stride, q0 + w0, T, scale, dq, scratch);
}

// Registers: dK and dV live in 2 HD / 16 accumulator fragments (128 registers
// at hd 128). Two blocks per SM is what shared memory allows at hd 64 and 128;
// saying so lets ptxas use up to 255 registers (224 at hd 128 on sm_90), where
// a lower cap spilled. ptxas -v: no spills on sm_80 or sm_90.
template <int HD>
__global__ void __launch_bounds__(FA_THREADS, 2)
    flash_attention_backward_dkv_kernel(floatX* dqkv, const floatX* dout, const float* lse, const float* delta,
                                        const floatX* qkv, int T, int H, int KVH) {
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char flash_smem[];
    const int ld = HD + 8;
    const FlashBackwardSmem sm(flash_smem, ld);  // here S and dP hold S^T and dP^T: row j (key), column i (query)
    floatX *q_s = sm.q, *do_s = sm.dout, *k_s = sm.k, *v_s = sm.v, *ds_s = sm.ds;
    float *s_s = sm.s, *dp_s = sm.dp, *lse_s = sm.lse, *delta_s = sm.delta;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int k0 = blockIdx.x * FA_BK, g = blockIdx.y, b = blockIdx.z, group = H / KVH;
    const size_t stride = (size_t)(H + 2 * KVH) * HD;
    const floatX* base = qkv + (size_t)b * T * stride;
    const floatX* dout_b = dout + (size_t)b * T * H * HD;
    const float scale = rsqrtf((float)HD);
    const int w0 = 16 * warp, r = lane / 2, half = lane % 2, j = k0 + w0 + r;
    flash_load_tile<HD>(k_s, ld, base + (size_t)(H + g) * HD, stride, k0, T);
    flash_load_tile<HD>(v_s, ld, base + (size_t)(H + KVH + g) * HD, stride, k0, T);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk[HD / 16], dv[HD / 16];
#pragma unroll
    for (int n = 0; n < HD / 16; n++) {
        wmma::fill_fragment(dk[n], 0.0f);
        wmma::fill_fragment(dv[n], 0.0f);
    }
    for (int h = g * group; h < (g + 1) * group; h++) {
        for (int i0 = k0; i0 < T; i0 += FA_BQ) {
            __syncthreads();  // every warp is done with the previous Q, dO, lse, D
            flash_load_tile<HD>(q_s, ld, base + (size_t)h * HD, stride, i0, T);
            flash_load_tile<HD>(do_s, ld, dout_b + (size_t)h * HD, (size_t)H * HD, i0, T);
            flash_load_rowstats(lse_s, delta_s, lse, delta, (size_t)b * T, i0, T, H, h);
            __syncthreads();
            flash_rows_times_tile_t<HD>(s_s + w0 * FA_S_LD, k_s + w0 * ld, q_s, ld);
            flash_rows_times_tile_t<HD>(dp_s + w0 * FA_S_LD, v_s + w0 * ld, do_s, ld);
            __syncwarp();
            // P^T, then dS^T, for this lane's 32 queries i0 + 32 half + c: live when j <= i < T (and j < T).
            // One bf16 buffer serves both: dV takes P^T before dS^T (p recomputed) overwrites it.
            const int cmin = j - i0 - 32 * half, cmax = T - 1 - i0 - 32 * half;
            const float* srow = s_s + (w0 + r) * FA_S_LD + 32 * half;
            const float* dprow = dp_s + (w0 + r) * FA_S_LD + 32 * half;
            floatX* prow = ds_s + (w0 + r) * FA_DS_LD + 32 * half;
            const bool live_row = j < T;
            for (int c = 0; c < 32; c++) {
                int cc = (c + lane) % 32;
                float p = 0.0f;
                if (live_row && cc >= cmin && cc <= cmax) p = __expf(srow[cc] * scale - lse_s[32 * half + cc]);
                prow[cc] = from_float<floatX>(p);
            }
            __syncwarp();
            flash_rows_times_tile<HD>(dv, ds_s + w0 * FA_DS_LD, do_s, ld);
            __syncwarp();
            for (int c = 0; c < 32; c++) {
                int cc = (c + lane) % 32, col = 32 * half + cc;
                float ds = 0.0f;
                if (live_row && cc >= cmin && cc <= cmax)
                    ds = __expf(srow[cc] * scale - lse_s[col]) * (dprow[cc] - delta_s[col]);
                prow[cc] = from_float<floatX>(ds);
            }
            __syncwarp();
            flash_rows_times_tile<HD>(dk, ds_s + w0 * FA_DS_LD, q_s, ld);
        }
    }
    __syncthreads();  // Q and dO are done with: their space holds the warps' fp32 rows
    float* scratch = (float*)q_s + w0 * (HD + 4);
    floatX* dst = dqkv + (size_t)b * T * stride;
    flash_write_rows<HD>(dst + (size_t)(H + g) * HD, stride, k0 + w0, T, scale, dk, scratch);
    flash_write_rows<HD>(dst + (size_t)(H + KVH + g) * HD, stride, k0 + w0, T, 1.0f, dv, scratch);
}
#endif  // !ENABLE_FP32

// ReLU squared, forward out = relu(x)^2 and backward dx = dout * 2 relu(x).
// One thread per element.
__global__ void relu2_forward_kernel(floatX* out, const floatX* inp, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = fmaxf(to_float(inp[i]), 0.0f);
    out[i] = from_float<floatX>(x * x);
}
__global__ void relu2_backward_kernel(floatX* dinp, const floatX* dout, const floatX* inp, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dinp[i] = from_float<floatX>(to_float(dout[i]) * 2.0f * fmaxf(to_float(inp[i]), 0.0f));
}

// Residual: x += y. One thread per element.
__global__ void residual_forward_kernel(floatX* x, const floatX* y, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    x[i] = from_float<floatX>(to_float(x[i]) + to_float(y[i]));
}

// Soft-capped softmax cross-entropy and its backward in one kernel, in place.
// Row n: c_j = 15 tanh(z_j / 15) over the first V columns,
//   loss_n = logsumexp(c) - c_target,
//   dz_j = dloss * (softmax(c)_j - [j = target]) * (1 - (c_j / 15)^2),
// and dz_j = 0 for the padding columns V <= j < Vp. One block per row:
// pass 1 keeps a running (max, sum of exp) per thread, merged across the
// block in a fixed order; pass 2 overwrites the logits with dz. Reads the
// row twice and writes it once; probabilities are never stored.
static const int CE_THREADS = 512;
__global__ void softcap_cross_entropy_kernel(float* losses, floatX* logits, const int* targets, int V, int Vp,
                                             float dloss, bool write_grad) {
    __shared__ float shared_m[CE_THREADS / WARP], shared_s[CE_THREADS / WARP];
    int n = blockIdx.x, warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    floatX* z = logits + (size_t)n * Vp;
    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float c = SOFTCAP * tanhf(to_float(z[j]) / SOFTCAP);
        if (c > m) { s = s * __expf(m - c) + 1.0f; m = c; }
        else s += __expf(c - m);
    }
    // merge (m, s) pairs: first within each warp, then across warps
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
        float mm = fmaxf(m, m2);
        s = (m == -INFINITY ? 0.0f : s * __expf(m - mm)) + (m2 == -INFINITY ? 0.0f : s2 * __expf(m2 - mm));
        m = mm;
    }
    if (lane == 0) { shared_m[warp] = m; shared_s[warp] = s; }
    __syncthreads();
    float row_max = -INFINITY, row_sum = 0.0f;
    for (int w = 0; w < (int)blockDim.x / WARP; w++) row_max = fmaxf(row_max, shared_m[w]);
    for (int w = 0; w < (int)blockDim.x / WARP; w++)
        if (shared_m[w] != -INFINITY) row_sum += shared_s[w] * __expf(shared_m[w] - row_max);
    int target = targets[n];
    float c_target = SOFTCAP * tanhf(to_float(z[target]) / SOFTCAP);
    if (threadIdx.x == 0) losses[n] = logf(row_sum) + row_max - c_target;
    if (!write_grad) return;
    __syncthreads();  // every thread has read z[target] before it is overwritten
    for (int j = threadIdx.x; j < Vp; j += blockDim.x) {
        float g = 0.0f;
        if (j < V) {
            float c = SOFTCAP * tanhf(to_float(z[j]) / SOFTCAP);
            float p = __expf(c - row_max) / row_sum;
            g = dloss * (p - (j == target ? 1.0f : 0.0f)) * (1.0f - (c / SOFTCAP) * (c / SOFTCAP));
        }
        z[j] = from_float<floatX>(g);
    }
}

// The greedy prediction of each row: out[n] = argmax_j softcap(z[n][j]) over
// the real vocab, the first index on ties (as torch.argmax; the soft-cap is
// monotonic, but it can make near-equal large logits equal). One block per
// row: each thread keeps its best of a strided slice, then a warp shuffle
// tree and thread 0 over the warps merge (value, index) pairs. Reads the
// row once, writes one int.
__device__ __forceinline__ bool argmax_better(float v, int i, float best_v, int best_i) {
    return v > best_v || (v == best_v && i < best_i);
}
__global__ void logits_argmax_kernel(int* out, const floatX* logits, int V, int Vp) {
    __shared__ float warp_v[CE_THREADS / WARP];
    __shared__ int warp_i[CE_THREADS / WARP];
    const floatX* z = logits + (size_t)blockIdx.x * Vp;
    float best_v = -INFINITY;
    int best_i = V;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        const float c = SOFTCAP * tanhf(to_float(z[j]) / SOFTCAP);
        if (argmax_better(c, j, best_v, best_i)) { best_v = c; best_i = j; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffff, best_v, o);
        const int i = __shfl_xor_sync(0xffffffff, best_i, o);
        if (argmax_better(v, i, best_v, best_i)) { best_v = v; best_i = i; }
    }
    if (threadIdx.x % WARP == 0) {
        warp_v[threadIdx.x / WARP] = best_v;
        warp_i[threadIdx.x / WARP] = best_i;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (int w = 1; w < (int)blockDim.x / WARP; w++)
        if (argmax_better(warp_v[w], warp_i[w], best_v, best_i)) { best_v = warp_v[w]; best_i = warp_i[w]; }
    out[blockIdx.x] = best_i < V ? best_i : 0;  // a row of NaNs predicts token 0
}

// Sums losses[0..N) into *total (+=), in one block, in a fixed order.
__global__ void loss_sum_kernel(float* total, const float* losses, int N) {
    __shared__ float partial[CE_THREADS / WARP];
    float acc = 0.0f;
    for (int i = threadIdx.x; i < N; i += blockDim.x) acc += losses[i];
    acc = warp_sum(acc);
    if (threadIdx.x % WARP == 0) partial[threadIdx.x / WARP] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int w = 0; w < (int)blockDim.x / WARP; w++) sum += partial[w];
        *total += sum;
    }
}

// The sum of squares of x[start], x[start + stride], ... below n over one
// block, in a fixed order: each thread's strided sum, a warp shuffle tree,
// then thread 0 adds the warps in order. The total is valid in thread 0 only;
// warp_sums is the caller's shared array of blockDim.x / WARP floats.
template <typename T>
__device__ float block_sum_of_squares(const T* x, size_t n, size_t start, size_t stride, float* warp_sums) {
    float acc = 0.0f;
    for (size_t i = start; i < n; i += stride) {
        const float v = to_float(x[i]);
        acc += v * v;
    }
    acc = warp_sum(acc);
    if (threadIdx.x % WARP == 0) warp_sums[threadIdx.x / WARP] = acc;
    __syncthreads();
    float sum = 0.0f;
    if (threadIdx.x == 0)
        for (int w = 0; w < (int)blockDim.x / WARP; w++) sum += warp_sums[w];
    return sum;
}

// Global gradient norm, deterministically: NORM_BLOCKS blocks each sum the
// squares of a fixed grid-stride slice, then one block adds the partial sums
// in order and turns the norm into the clip factor min(1, max_norm / norm)
// that AdamW reads from device memory (so clipping needs no host sync).
static const int NORM_BLOCKS = 512, NORM_THREADS = 512;
__global__ void grad_norm_partial_kernel(float* partial, const float* grads, size_t n) {
    __shared__ float warp_sums[NORM_THREADS / WARP];
    const float sum = block_sum_of_squares(grads, n, (size_t)blockIdx.x * blockDim.x + threadIdx.x,
                                           (size_t)gridDim.x * blockDim.x, warp_sums);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}
__global__ void grad_norm_final_kernel(float* norm, float* clip_scale, const float* partial, float max_norm) {
    if (threadIdx.x != 0) return;
    double sum = 0.0;
    for (int b = 0; b < NORM_BLOCKS; b++) sum += partial[b];
    float nrm = (float)sqrt(sum);
    *norm = nrm;
    *clip_scale = max_norm > 0.0f && nrm > max_norm ? max_norm / nrm : 1.0f;
}

// AdamW on fp32 master weights, one thread per parameter:
//   g = grad * clip; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//   w -= lr * (m / bc1 / (sqrt(v / bc2) + eps) + wd * w),
// bc = 1 - beta^step (bias corrections). Also writes the floatX copy the
// matmuls read. Reads 4 and writes 4 values per parameter.
__global__ void adamw_kernel(float* master, floatX* params, float* m, float* v, const float* grads, size_t n, float lr,
                             float beta1, float beta2, float bc1, float bc2, float eps, float weight_decay,
                             const float* clip_scale) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grads[i] * *clip_scale;
    float mi = beta1 * m[i] + (1.0f - beta1) * g;
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float w = master[i];
    w -= lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + weight_decay * w);
    master[i] = w;
    params[i] = from_float<floatX>(w);
}

__global__ void copy_to_floatX_kernel(floatX* out, const float* inp, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_float<floatX>(inp[i]);
}

// ----------------------------------------------------------------------------
// Host-side launchers: one per op, the shapes as the reference states them.

static const int THREADS = 256;

inline void embedding_forward(floatX* out, const int* tokens, const floatX* wte, int N, int C) {
    embedding_forward_kernel<<<ceil_div((size_t)N * C, THREADS), THREADS>>>(out, tokens, wte, N, C);
    launchCheck();
}

// Device memory: model_allocate takes every buffer a run needs once, at
// start-up, through device_alloc, and fills fresh ones with device_zero and
// device_upload. A planning pass (model_plan, memory_planning set) runs that
// same code with these three only counting: device_alloc returns null, the
// others do nothing. So the estimate train_et prints before it touches the
// GPU is, byte for byte, what model_allocate then takes.
inline bool memory_planning = false;

// cudaMalloc that also counts the bytes (for the start-up memory report).
// Running out of memory is a setting too large for this GPU, so it says
// which settings to lower rather than only that cudaMalloc failed.
template <typename T>
static T* device_alloc(size_t count, size_t* total) {
    *total += count * sizeof(T);
    if (memory_planning) return nullptr;
    T* p = nullptr;
    cudaError_t err = cudaMalloc(&p, count * sizeof(T));
    if (err == cudaErrorMemoryAllocation) {
        size_t free = 0, capacity = 0;
        cudaCheck(cudaMemGetInfo(&free, &capacity));
        fail("out of GPU memory: %.2f GiB more wanted, %.2f of %.2f GiB free. Use a smaller micro-batch (-b) or "
             "model (-m); an MoE model's routing buffers grow with -b x -t x -e, most for ET without its capacity "
             "clamp (-ec < 0), which can send every token to every expert",
             count * sizeof(T) / 1073741824.0, free / 1073741824.0, capacity / 1073741824.0);
    }
    cudaCheck(err);
    return p;
}

inline void device_zero(void* p, size_t bytes) {
    if (!memory_planning) cudaCheck(cudaMemset(p, 0, bytes));
}

inline void device_upload(void* device, const void* host, size_t bytes) {
    if (!memory_planning) cudaCheck(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice));
}

// Scratch for the embedding backward, sized once for N tokens of width C: the
// sort's (and a copy of the positions 0 .. N-1 to sort with the tokens) and
// the two partial rows (head, tail) per chunk of EMBEDDING_CHUNK positions.
// CUB's onesweep radix sort of N (key, value) pairs needs one more copy of
// them, a histogram per pass and a lookback table of 1 KiB per tile
// (cub/device/dispatch/dispatch_radix_sort.cuh); CUB answers its size query
// only on the GPU, so the plan reserves a fixed bound, twice that copy plus
// 4 MiB, and a run checks CUB's own answer against it.
inline size_t sort_scratch_bytes(int n_tokens) { return 4 * (size_t)n_tokens * sizeof(int) + (4 << 20); }

struct EmbeddingSortScratch {
    int *positions = nullptr, *sorted_tokens = nullptr, *sorted_positions = nullptr;
    float* partial = nullptr;  // (2 * chunks, C): chunk k's head at row 2k, its tail at 2k + 1
    void* cub_temp = nullptr;
    size_t cub_bytes = 0;
    int N = 0, C = 0, vocab_bits = 0;

    int chunks() const { return ceil_div(N, EMBEDDING_CHUNK); }

    // Returns the device bytes it took.
    size_t allocate(int n_tokens, int width, int vocab_size) {
        N = n_tokens;
        C = width;
        vocab_bits = 1;
        while ((1 << vocab_bits) < vocab_size) vocab_bits++;
        std::vector<int> iota(N);
        for (int i = 0; i < N; i++) iota[i] = i;
        size_t bytes = 0;
        positions = device_alloc<int>(N, &bytes);
        sorted_tokens = device_alloc<int>(N, &bytes);
        sorted_positions = device_alloc<int>(N, &bytes);
        partial = device_alloc<float>((size_t)2 * chunks() * C, &bytes);
        device_upload(positions, iota.data(), N * sizeof(int));
        cub_bytes = sort_scratch_bytes(N);
        if (!memory_planning) {
            size_t needed = 0;
            cudaCheck(cub::DeviceRadixSort::SortPairs(nullptr, needed, (const int*)nullptr, (int*)nullptr,
                                                      (const int*)nullptr, (int*)nullptr, N, 0, vocab_bits));
            if (needed > cub_bytes)
                fail("internal: CUB's radix sort of %d tokens wants %zu bytes of scratch, more than the %zu of "
                     "sort_scratch_bytes (model.cuh): raise that bound", N, needed, cub_bytes);
        }
        cub_temp = device_alloc<char>(cub_bytes, &bytes);
        return bytes;
    }
    void release() {
        cudaCheck(cudaFree(positions));
        cudaCheck(cudaFree(sorted_tokens));
        cudaCheck(cudaFree(sorted_positions));
        cudaCheck(cudaFree(partial));
        cudaCheck(cudaFree(cub_temp));
    }
};

inline void embedding_backward(float* dwte, const int* tokens, const floatX* dout, int N, int C,
                               EmbeddingSortScratch& scratch) {
    size_t bytes = scratch.cub_bytes;
    cudaCheck(cub::DeviceRadixSort::SortPairs(scratch.cub_temp, bytes, tokens, scratch.sorted_tokens, scratch.positions,
                                              scratch.sorted_positions, N, 0, scratch.vocab_bits));
    if (N > scratch.N || C > scratch.C)
        fail("internal: embedding_backward of %d tokens x %d channels with scratch for %d x %d", N, C, scratch.N,
             scratch.C);
    const dim3 grid(ceil_div(N, EMBEDDING_CHUNK), ceil_div(C, THREADS));
    embedding_backward_chunk_kernel<<<grid, THREADS>>>(dwte, scratch.partial, scratch.sorted_tokens,
                                                       scratch.sorted_positions, dout, N, C);
    launchCheck();
    if (grid.x > 1) {  // the last chunk starts no run that leaves it
        embedding_backward_combine_kernel<<<dim3(grid.x - 1, grid.y), THREADS>>>(dwte, scratch.partial,
                                                                                 scratch.sorted_tokens, N, C);
        launchCheck();
    }
}

inline void rmsnorm_forward(floatX* out, float* rstd, const floatX* inp, int N, int C) {
    rmsnorm_forward_kernel<<<ceil_div(N, THREADS / WARP), THREADS>>>(out, rstd, inp, N, C);
    launchCheck();
}

inline void rmsnorm_backward(floatX* dinp, const floatX* dout, const floatX* out, const float* rstd, int N, int C) {
    rmsnorm_backward_kernel<<<ceil_div(N, THREADS / WARP), THREADS>>>(dinp, dout, out, rstd, N, C);
    launchCheck();
}

// out (N, OC) = inp (N, IC) @ weight (OC, IC)^T. Row-major storage seen by
// column-major cuBLAS: out^T = weight^T-as-stored (op T) x inp^T.
inline void matmul_forward(cublasHandle_t cublas, floatX* out, const floatX* inp, const floatX* weight, int N, int IC,
                           int OC) {
    const float one = 1.0f, zero = 0.0f;
    cublasCheck(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &one, weight, CUBLAS_FLOATX, IC, inp,
                             CUBLAS_FLOATX, IC, &zero, out, CUBLAS_FLOATX, OC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// dinp (N, IC) = dout @ weight (overwrites); dweight (OC, IC, fp32) += dout^T @ inp.
inline void matmul_backward(cublasHandle_t cublas, floatX* dinp, float* dweight, const floatX* dout, const floatX* inp,
                            const floatX* weight, int N, int IC, int OC) {
    const float one = 1.0f, zero = 0.0f;
    cublasCheck(cublasGemmEx(cublas, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, &one, weight, CUBLAS_FLOATX, IC, dout,
                             CUBLAS_FLOATX, OC, &zero, dinp, CUBLAS_FLOATX, IC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    cublasCheck(cublasGemmEx(cublas, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, &one, inp, CUBLAS_FLOATX, IC, dout,
                             CUBLAS_FLOATX, OC, &one, dweight, CUDA_R_32F, IC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// RoPE angles t * 10000^(-2i/d) for t < T, i < d/2, computed in double on
// the host once, so the kernels only look them up.
struct RopeTables {
    float *cos = nullptr, *sin = nullptr;
    // Returns the device bytes it took.
    size_t allocate(int T, int hd) {
        int half = hd / 2;
        std::vector<float> c((size_t)T * half), s((size_t)T * half);
        for (int t = 0; t < T; t++)
            for (int i = 0; i < half; i++) {
                double angle = t * std::pow(10000.0, -2.0 * i / hd);
                c[(size_t)t * half + i] = (float)std::cos(angle);
                s[(size_t)t * half + i] = (float)std::sin(angle);
            }
        size_t bytes = 0;
        cos = device_alloc<float>(c.size(), &bytes);
        sin = device_alloc<float>(s.size(), &bytes);
        device_upload(cos, c.data(), c.size() * sizeof(float));
        device_upload(sin, s.data(), s.size() * sizeof(float));
        return bytes;
    }
    void release() {
        cudaCheck(cudaFree(cos));
        cudaCheck(cudaFree(sin));
    }
};

inline void rope_qknorm_forward(floatX* qkv, float* rstd, const RopeTables& rope, int B, int T, int H, int KVH, int hd) {
    int items = B * T * (H + KVH);
    rope_qknorm_forward_kernel<<<ceil_div(items, THREADS / WARP), THREADS>>>(qkv, rstd, rope.cos, rope.sin, B * T, T,
                                                                             H, KVH, hd);
    launchCheck();
}

inline void rope_qknorm_backward(floatX* dqkv, const floatX* qkv, const float* rstd, const RopeTables& rope, int B,
                                 int T, int H, int KVH, int hd) {
    int items = B * T * (H + KVH);
    rope_qknorm_backward_kernel<<<ceil_div(items, THREADS / WARP), THREADS>>>(dqkv, qkv, rstd, rope.cos, rope.sin,
                                                                              B * T, T, H, KVH, hd);
    launchCheck();
}

#ifndef ENABLE_FP32
template <int HD>
void flash_setup() {
    const int fwd = (int)flash_forward_smem_bytes(HD), bwd = (int)flash_backward_smem_bytes(HD);
    cudaCheck(cudaFuncSetAttribute(flash_attention_forward_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   fwd));
    cudaCheck(cudaFuncSetAttribute(flash_attention_backward_dq_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   bwd));
    cudaCheck(cudaFuncSetAttribute(flash_attention_backward_dkv_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   bwd));
}
#endif

// The attention kernels need more than the default 48 KB of shared memory
// for wide heads: raise their limit once to what the widest supported head
// needs (a limit, not an allocation: each launch asks for what its hd uses).
inline void attention_setup() {
    int bytes = (int)attention_smem_bytes(ATT_MAX_DIMS_PER_LANE * WARP);
    cudaCheck(cudaFuncSetAttribute(attention_forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    cudaCheck(cudaFuncSetAttribute(attention_backward_dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    cudaCheck(cudaFuncSetAttribute(attention_backward_dkv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
#ifndef ENABLE_FP32
    flash_setup<32>();
    flash_setup<64>();
    flash_setup<128>();
#endif
}

// The BF16 build runs the tensor-core kernel for the head dims it is compiled
// for; the FP32 build (and any other head dim) the exact CUDA-core one.
inline void attention_forward(floatX* out, float* lse, const floatX* qkv, int B, int T, int H, int KVH, int hd) {
#ifndef ENABLE_FP32
    if (flash_supported(hd)) {
        dim3 grid(ceil_div(T, FA_BQ), H, B);
        size_t smem = flash_forward_smem_bytes(hd);
        if (hd == 32) flash_attention_forward_kernel<32><<<grid, FA_THREADS, smem>>>(out, lse, qkv, T, H, KVH);
        else if (hd == 64) flash_attention_forward_kernel<64><<<grid, FA_THREADS, smem>>>(out, lse, qkv, T, H, KVH);
        else flash_attention_forward_kernel<128><<<grid, FA_THREADS, smem>>>(out, lse, qkv, T, H, KVH);
        launchCheck();
        return;
    }
#endif
    dim3 grid(ceil_div(T, ATT_ROWS), H, B);
    attention_forward_kernel<<<grid, ATT_ROWS * WARP, attention_smem_bytes(hd)>>>(out, lse, qkv, T, H, KVH, hd);
    launchCheck();
}

#ifndef ENABLE_FP32
// The two passes of the tensor-core backward (delta already computed).
template <int HD>
void flash_attention_backward(floatX* dqkv, const floatX* dout, const float* lse, const float* delta,
                              const floatX* qkv, int B, int T, int H, int KVH) {
    size_t smem = flash_backward_smem_bytes(HD);
    flash_attention_backward_dq_kernel<HD><<<dim3(ceil_div(T, FA_BQ), H, B), FA_THREADS, smem>>>(dqkv, dout, lse,
                                                                                              delta, qkv, T, H, KVH);
    launchCheck();
    flash_attention_backward_dkv_kernel<HD><<<dim3(ceil_div(T, FA_BK), KVH, B), FA_THREADS, smem>>>(dqkv, dout, lse,
                                                                                                 delta, qkv, T, H, KVH);
    launchCheck();
}
#endif

// delta is (N, H) fp32 scratch.
inline void attention_backward(floatX* dqkv, const floatX* dout, const floatX* out, const float* lse, const floatX* qkv,
                               float* delta, int B, int T, int H, int KVH, int hd) {
    attention_delta_kernel<<<ceil_div((size_t)B * T * H, THREADS / WARP), THREADS>>>(delta, dout, out, B * T, H, hd);
    launchCheck();
#ifndef ENABLE_FP32
    if (flash_supported(hd)) {
        if (hd == 32) flash_attention_backward<32>(dqkv, dout, lse, delta, qkv, B, T, H, KVH);
        else if (hd == 64) flash_attention_backward<64>(dqkv, dout, lse, delta, qkv, B, T, H, KVH);
        else flash_attention_backward<128>(dqkv, dout, lse, delta, qkv, B, T, H, KVH);
        return;
    }
#endif
    attention_backward_dq_kernel<<<dim3(ceil_div(T, ATT_ROWS), H, B), ATT_ROWS * WARP, attention_smem_bytes(hd)>>>(
        dqkv, dout, lse, delta, qkv, T, H, KVH, hd);
    launchCheck();
    attention_backward_dkv_kernel<<<dim3(ceil_div(T, ATT_ROWS), KVH, B), ATT_ROWS * WARP, attention_smem_bytes(hd)>>>(
        dqkv, dout, lse, delta, qkv, T, H, KVH, hd);
    launchCheck();
}

inline void relu2_forward(floatX* out, const floatX* inp, size_t n) {
    relu2_forward_kernel<<<ceil_div(n, THREADS), THREADS>>>(out, inp, n);
    launchCheck();
}

inline void relu2_backward(floatX* dinp, const floatX* dout, const floatX* inp, size_t n) {
    relu2_backward_kernel<<<ceil_div(n, THREADS), THREADS>>>(dinp, dout, inp, n);
    launchCheck();
}

inline void residual_forward(floatX* x, const floatX* y, size_t n) {
    residual_forward_kernel<<<ceil_div(n, THREADS), THREADS>>>(x, y, n);
    launchCheck();
}

// In place: logits (N, Vp) become dlogits when write_grad.
inline void softcap_cross_entropy(float* losses, floatX* logits, const int* targets, int N, int V, int Vp, float dloss,
                                  bool write_grad) {
    softcap_cross_entropy_kernel<<<N, CE_THREADS>>>(losses, logits, targets, V, Vp, dloss, write_grad);
    launchCheck();
}

inline void logits_argmax(int* out, const floatX* logits, int N, int V, int Vp) {
    logits_argmax_kernel<<<N, CE_THREADS>>>(out, logits, V, Vp);
    launchCheck();
}

inline void loss_sum(float* total, const float* losses, int N) {
    loss_sum_kernel<<<1, CE_THREADS>>>(total, losses, N);
    launchCheck();
}

// partial is NORM_BLOCKS floats of scratch. In two halves for data
// parallelism: each rank's partial sums of squares of its own shard are
// summed over the ranks before the final one.
inline void grad_norm_partial(float* partial, const float* grads, size_t n) {
    grad_norm_partial_kernel<<<NORM_BLOCKS, NORM_THREADS>>>(partial, grads, n);
    launchCheck();
}
inline void grad_norm_final(float* norm, float* clip_scale, const float* partial, float max_norm) {
    grad_norm_final_kernel<<<1, WARP>>>(norm, clip_scale, partial, max_norm);
    launchCheck();
}
inline void grad_norm(float* norm, float* clip_scale, float* partial, const float* grads, size_t n, float max_norm) {
    grad_norm_partial(partial, grads, n);
    grad_norm_final(norm, clip_scale, partial, max_norm);
}

inline void adamw_update(float* master, floatX* params, float* m, float* v, const float* grads, size_t n, float lr,
                         float beta1, float beta2, float eps, float weight_decay, int step, const float* clip_scale) {
    float bc1 = 1.0f - powf(beta1, (float)step), bc2 = 1.0f - powf(beta2, (float)step);
    adamw_kernel<<<ceil_div(n, THREADS), THREADS>>>(master, params, m, v, grads, n, lr, beta1, beta2, bc1, bc2, eps,
                                                    weight_decay, clip_scale);
    launchCheck();
}

inline void copy_to_floatX(floatX* out, const float* inp, size_t n) {
    copy_to_floatX_kernel<<<ceil_div(n, THREADS), THREADS>>>(out, inp, n);
    launchCheck();
}

// Data parallelism's communication, Muon (the paper's optimizer for the
// matrices) and the MoE layer (routers, dispatch and combine, expert FFNs)
// build on the plumbing and launchers above.
#include "multi_gpu.cuh"
#include "optimizer.cuh"
#include "router.cuh"

// ----------------------------------------------------------------------------
// 3. The model: parameters, activations, forward, backward, update.

// Activations of one micro-batch of B x T tokens (N = B*T), allocated once.
// What the backward needs is kept per layer: the normalised inputs of the
// attention and the FFN (and their rstd), qkv after RoPE and QK-norm (and
// their rstd), the attention output and its lse, and the FFN's
// pre-activation (in an MoE layer: the shared expert's; the router keeps the
// routed experts'). The residual stream itself is one buffer updated in
// place: no backward op needs it, only the normalised copies.
struct Activations {
    int B = 0, T = 0;
    int *tokens = nullptr, *targets = nullptr;
    floatX *x0 = nullptr, *residual = nullptr, *lnf = nullptr, *logits = nullptr;
    float *x0_rstd = nullptr, *lnf_rstd = nullptr, *losses = nullptr;
    int* predicted = nullptr;  // an evaluation's greedy predictions (CORE's language-modelling tasks)
    struct Layer {
        floatX *ln1, *qkv, *atty, *ln2, *fc_pre;
        float *ln1_rstd, *qk_rstd, *lse, *ln2_rstd;
    };
    std::vector<Layer> layers;
    // reused by every layer: dresidual is the residual stream's gradient; the
    // scratch buffers hold branch outputs in the forward and gradients in the
    // backward (narrow: N x C, wide: N x max(4C, qkv width))
    floatX *dresidual = nullptr, *scratch_wide = nullptr, *scratch_narrow = nullptr, *ffn_act = nullptr;
    float* att_delta = nullptr;
};

// The device memory a model takes, by part: every byte model_allocate
// allocates is in one of them. train_et prints it at start-up; the dry run
// (test/emu) checks it against what the emulated device saw allocated.
struct MemoryPlan {
    size_t weights = 0;      // the floatX copy the matmuls read (none in the FP32 build: the master weights serve)
    size_t master = 0;       // fp32 master weights
    size_t gradients = 0;    // fp32
    size_t adam = 0;         // both AdamW moments, fp32 (Muon keeps its momentum in the first)
    size_t muon = 0;         // Muon's Newton-Schulz scratch (-opt muon)
    size_t activations = 0;  // what one micro-batch keeps for its backward, and the scratch buffers
    size_t routing = 0;      // the MoE layers' routing buffers and state (router.cuh)
    size_t other = 0;        // RoPE tables, the embedding sort's scratch, the step's scalars

    size_t parameters() const { return weights + master + gradients + adam; }
    size_t total() const { return parameters() + muon + activations + routing + other; }
    std::string describe() const {
        const double GiB = 1073741824.0;
        std::string out = string_format("%.2f GiB on the GPU: parameters %.2f (", total() / GiB, parameters() / GiB);
        if (weights) out += string_format("weights %.2f, ", weights / GiB);
        out += string_format("fp32 master %.2f, gradients %.2f, AdamW %.2f), activations %.2f", master / GiB,
                             gradients / GiB, adam / GiB, activations / GiB);
        if (muon) out += string_format(", Muon scratch %.2f", muon / GiB);
        if (routing) out += string_format(", routing buffers %.2f", routing / GiB);
        return out + string_format(", other %.3f", other / GiB);
    }
};

struct Model {
    ModelConfig config;
    OptimizerConfig optim;
    std::vector<ParamTensor> tensors;
    std::vector<ParamGroup> groups;         // which optimizer trains which tensors, at which peak rate
    std::vector<MuonMatrix> muon_matrices;  // -opt muon: the matrices Muon orthogonalises one by one
    MuonWorkspace muon;
    std::vector<size_t> offsets;  // of each tensor in the flat buffers
    size_t num_params = 0;
    // data parallel: this rank of `world` (set before model_allocate); it
    // owns shards.begin[rank] .. begin[rank + 1] of the flat parameters: the
    // optimizer moments and the fp32 master weights of that slice alone, and
    // its update (ZeRO-1)
    int rank = 0, world = 1;
    MultiGpu* multi = nullptr;  // null: one process
    ShardPlan shards;
    bool reduce_grads = false;  // model_backward reduces each layer's gradients as it finishes them (last micro-step)
    float* grads = nullptr;
    // fp32 master weights: element i is parameter master_begin() + i. With
    // several ranks only the shard's (the FP32 build keeps them all: its
    // matmuls read them); the routers' fp32 weights, which every rank's
    // forward reads, then live whole in router_master, (MoE layers, E, C).
    float *master = nullptr, *router_master = nullptr;
    std::vector<int> router_tensors;             // the storage index of each MoE layer's router
    float *adam_m = nullptr, *adam_v = nullptr;  // the shard's: element i is parameter shard_begin() + i
    floatX* params = nullptr;  // what the matmuls read; aliases master in the FP32 build
    Activations acts;
    RopeTables rope;
    EmbeddingSortScratch embedding_sort;
    Router router;  // the MoE layers' routing buffers and state (empty for a dense model)
    MemoryPlan memory;
    cublasHandle_t cublas = nullptr;
    // step scalars on the device: read by the host only at logging steps
    float *loss_total = nullptr, *grad_norm_value = nullptr, *clip_scale = nullptr, *norm_partial = nullptr;

    const floatX* param(int tensor) const { return params + offsets[tensor]; }
    float* grad(int tensor) const { return grads + offsets[tensor]; }
    size_t shard_begin() const { return shards.begin[rank]; }
    size_t shard_size() const { return shards.size(rank); }
    bool master_sharded() const {
#ifdef ENABLE_FP32
        return false;
#else
        return world > 1;
#endif
    }
    size_t master_begin() const { return master_sharded() ? shard_begin() : 0; }
    size_t master_size() const { return master_sharded() ? shard_size() : num_params; }
    // the fp32 weights of tensor t: a router's wherever they are whole, any other's on its owner
    const float* master_of(int t) const {
        for (size_t i = 0; router_master && i < router_tensors.size(); i++)
            if (router_tensors[i] == t) return router_master + i * (size_t)tensors[t].numel();
        return master + offsets[t] - master_begin();
    }
    int tensor_index(const std::string& name) const {
        for (size_t i = 0; i < tensors.size(); i++)
            if (tensors[i].name == name) return (int)i;
        fail("internal: no parameter tensor '%s'", name.c_str());
    }
};

// Allocates everything a training run needs for micro-batches of B x T,
// once, for model->config trained by model->optim. Returns the bytes allocated (model->memory has them by part). In a
// planning pass (model_plan) it allocates nothing and only counts.
inline size_t model_allocate(Model* model, int B, int T) {
    const ModelConfig& c = model->config;
    if (c.head_dim() % 2 != 0 || c.head_dim() > ATT_MAX_DIMS_PER_LANE * WARP)
        fail("head dim %d: the attention kernels need an even head dim <= %d", c.head_dim(),
             ATT_MAX_DIMS_PER_LANE * WARP);
    model->tensors = parameter_tensors(c);
    model->offsets.clear();
    model->num_params = 0;
    for (const ParamTensor& t : model->tensors) {
        model->offsets.push_back(model->num_params);
        model->num_params += (size_t)t.numel();
    }
    model->groups = optimizer_groups(c, model->tensors, model->optim);
    model->muon_matrices = muon_matrices(c, model->tensors, model->optim);
    model->shards = shard_plan(model->offsets, model->num_params, model->muon_matrices, model->world);
    MemoryPlan& plan = model->memory;
    plan = MemoryPlan{};
    const size_t n = model->num_params, shard = model->shard_size();
    model->router_tensors.clear();
    for (int t = 0; t < (int)model->tensors.size(); t++)
        if (param_role(model->tensors[t]) == ParamRole::Router) model->router_tensors.push_back(t);
    model->master = device_alloc<float>(model->master_size(), &plan.master);
    model->router_master = model->master_sharded() && c.n_experts > 0
                               ? device_alloc<float>(model->router_tensors.size() * c.n_experts * c.n_embd, &plan.master)
                               : nullptr;
    model->grads = device_alloc<float>(n, &plan.gradients);
    model->adam_m = device_alloc<float>(shard, &plan.adam);
    model->adam_v = device_alloc<float>(shard, &plan.adam);
#ifdef ENABLE_FP32
    model->params = model->master;
#else
    model->params = device_alloc<floatX>(n, &plan.weights);
#endif
    device_zero(model->adam_m, shard * sizeof(float));
    device_zero(model->adam_v, shard * sizeof(float));
    device_zero(model->grads, n * sizeof(float));
    plan.muon = model->muon.allocate(model->muon_matrices);

    Activations& a = model->acts;
    const size_t N = (size_t)B * T, C = c.n_embd, Vp = c.padded_vocab();
    const size_t qkv_width = (size_t)(c.n_head + 2 * c.n_kv_head) * c.head_dim(), ffn = 4 * C;
    a.B = B;
    a.T = T;
    size_t& bytes = plan.activations;
    a.tokens = device_alloc<int>(N, &bytes);
    a.targets = device_alloc<int>(N, &bytes);
    a.x0 = device_alloc<floatX>(N * C, &bytes);
    a.x0_rstd = device_alloc<float>(N, &bytes);
    a.residual = device_alloc<floatX>(N * C, &bytes);
    a.layers.resize(c.n_layer);
    for (auto& L : a.layers) {
        L.ln1 = device_alloc<floatX>(N * C, &bytes);
        L.ln1_rstd = device_alloc<float>(N, &bytes);
        L.qkv = device_alloc<floatX>(N * qkv_width, &bytes);
        L.qk_rstd = device_alloc<float>(N * (c.n_head + c.n_kv_head), &bytes);
        L.atty = device_alloc<floatX>(N * C, &bytes);
        L.lse = device_alloc<float>(N * c.n_head, &bytes);
        L.ln2 = device_alloc<floatX>(N * C, &bytes);
        L.ln2_rstd = device_alloc<float>(N, &bytes);
        L.fc_pre = device_alloc<floatX>(N * (c.is_moe_layer(&L - &a.layers[0]) ? 2 * C : ffn), &bytes);
    }
    a.lnf = device_alloc<floatX>(N * C, &bytes);
    a.lnf_rstd = device_alloc<float>(N, &bytes);
    a.logits = device_alloc<floatX>(N * Vp, &bytes);
    a.losses = device_alloc<float>(N, &bytes);
    a.predicted = device_alloc<int>(N, &bytes);
    a.dresidual = device_alloc<floatX>(N * C, &bytes);
    a.scratch_wide = device_alloc<floatX>(N * std::max(ffn, qkv_width), &bytes);
    a.scratch_narrow = device_alloc<floatX>(N * C, &bytes);
    a.ffn_act = device_alloc<floatX>(N * ffn, &bytes);
    a.att_delta = device_alloc<float>(N * c.n_head, &bytes);
    if (c.n_experts > 0) {
        router_allocate(&model->router, c, B, T, model->world, model->rank);
        model->router.multi = model->multi;
        plan.routing = model->router.bytes;
    }
    plan.other += model->rope.allocate(T, c.head_dim());
    plan.other += model->embedding_sort.allocate((int)N, (int)C, c.vocab_size);
    model->loss_total = device_alloc<float>(1, &plan.other);
    model->grad_norm_value = device_alloc<float>(1, &plan.other);
    model->clip_scale = device_alloc<float>(1, &plan.other);
    model->norm_partial = device_alloc<float>(NORM_BLOCKS, &plan.other);
    if (memory_planning) return plan.total();
    cublasCheck(cublasCreate(&model->cublas));
    cublasCheck(cublasSetMathMode(model->cublas, CUBLAS_DEFAULT_MATH));  // no TF32 in the FP32 build
    attention_setup();
    return plan.total();
}

// The model model_allocate(B, T) will make on rank `rank` of `world`, worked
// out on the host without touching the GPU: its memory plan, parameter count
// and router shapes are the real ones; every buffer is null (never to be
// used or freed).
inline Model model_plan(const ModelConfig& config, const OptimizerConfig& optim, int B, int T, int world = 1,
                        int rank = 0) {
    Model planned;
    planned.config = config;
    planned.optim = optim;
    planned.world = world;
    planned.rank = rank;
    memory_planning = true;
    model_allocate(&planned, B, T);
    memory_planning = false;
    return planned;
}

// Sets the weights from `whole`, all parameters in fp32 on the device: the
// matmuls' copy, this rank's master weights and the routers' (`whole` may be
// the gradient buffer, as a staging area between steps).
inline void model_set_weights(Model* model, const float* whole) {
    cudaCheck(cudaMemcpy(model->master, whole + model->master_begin(), model->master_size() * sizeof(float),
                         cudaMemcpyDeviceToDevice));
#ifndef ENABLE_FP32
    copy_to_floatX(model->params, whole, model->num_params);
#endif
    for (size_t i = 0; model->router_master && i < model->router_tensors.size(); i++) {
        const int t = model->router_tensors[i];
        const size_t n = (size_t)model->tensors[t].numel();
        cudaCheck(cudaMemcpy(model->router_master + i * n, whole + model->offsets[t], n * sizeof(float),
                             cudaMemcpyDeviceToDevice));
    }
}

// SPEC init (model_config.h gives each tensor its std), drawn on the host
// from the seed in storage order, so it is the same on every GPU.
inline void model_init_parameters(Model* model, uint64_t seed) {
    std::vector<float> host(model->num_params);
    Rng rng(seed_mix(seed, 0x1417));
    for (size_t t = 0; t < model->tensors.size(); t++) {
        const ParamTensor& p = model->tensors[t];
        float* w = host.data() + model->offsets[t];
        int64_t real = (p.rows - p.padding_rows) * p.cols;
        for (int64_t i = 0; i < p.numel(); i++) {
            if (i >= real || p.init_std == 0.0) { w[i] = 0.0f; continue; }
            double u1 = rng.uniform(), u2 = rng.uniform();  // Box-Muller
            w[i] = (float)(p.init_std * std::sqrt(-2.0 * std::log(1.0 - u1)) * std::cos(2.0 * M_PI * u2));
        }
    }
    cudaCheck(cudaMemcpy(model->grads, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
    model_set_weights(model, model->grads);
    cudaCheck(cudaMemset(model->grads, 0, host.size() * sizeof(float)));
}

// An MoE layer's tensors, from its router at storage index t: router,
// shared fc and proj, experts fc and proj (model_config.h's order).
inline MoeWeights moe_weights(const Model* model, int t) {
    return {model->master_of(t), model->param(t + 1), model->param(t + 2), model->param(t + 3),
            model->param(t + 4)};
}
inline MoeGrads moe_grads(const Model* model, int t) {
    return {model->grad(t), model->grad(t + 1), model->grad(t + 2), model->grad(t + 3), model->grad(t + 4)};
}

// Forward pass on B' x T' tokens (B' <= B, T' <= T) already in acts.tokens.
// With targets, the per-token losses are added into *loss_total; with
// `backward_next`, the logits are turned into dlogits for dloss = the
// weight of one token in the step's mean loss. The pass routes as training
// when backward_next, as evaluation with targets, else as generation.
inline void model_forward(Model* model, int B, int T, bool with_targets, bool backward_next, float dloss) {
    const ModelConfig& c = model->config;
    Activations& a = model->acts;
    cublasHandle_t h = model->cublas;
    const int N = B * T, C = c.n_embd, H = c.n_head, KVH = c.n_kv_head, hd = c.head_dim();
    const int qkv_width = (H + 2 * KVH) * hd, ffn = 4 * C;
    const RoutingPass pass = backward_next ? RoutingPass::Train : with_targets ? RoutingPass::Eval : RoutingPass::Generate;
    if (pass == RoutingPass::Train && c.n_experts > 0) router_micro_step(model->router, dloss * N);
    int t = 0;  // tensor cursor: the storage order is the order of use
    embedding_forward(a.residual, a.tokens, model->param(t++), N, C);
    rmsnorm_forward(a.x0, a.x0_rstd, a.residual, N, C);
    cudaCheck(cudaMemcpyAsync(a.residual, a.x0, (size_t)N * C * sizeof(floatX), cudaMemcpyDeviceToDevice));
    for (int l = 0; l < c.n_layer; l++) {
        Activations::Layer& L = a.layers[l];
        rmsnorm_forward(L.ln1, L.ln1_rstd, a.residual, N, C);
        matmul_forward(h, L.qkv, L.ln1, model->param(t), N, C, qkv_width);  // wq, wk, wv are adjacent
        t += 3;
        rope_qknorm_forward(L.qkv, L.qk_rstd, model->rope, B, T, H, KVH, hd);
        attention_forward(L.atty, L.lse, L.qkv, B, T, H, KVH, hd);
        matmul_forward(h, a.scratch_narrow, L.atty, model->param(t++), N, C, C);
        residual_forward(a.residual, a.scratch_narrow, (size_t)N * C);
        rmsnorm_forward(L.ln2, L.ln2_rstd, a.residual, N, C);
        if (c.is_moe_layer(l)) {
            moe_forward(model->router, l - 1, h, a.scratch_narrow, L.fc_pre, a.ffn_act, L.ln2, moe_weights(model, t),
                        B, T, pass);
            t += 5;
        } else {
            matmul_forward(h, L.fc_pre, L.ln2, model->param(t++), N, C, ffn);
            relu2_forward(a.ffn_act, L.fc_pre, (size_t)N * ffn);
            matmul_forward(h, a.scratch_narrow, a.ffn_act, model->param(t++), N, ffn, C);
        }
        residual_forward(a.residual, a.scratch_narrow, (size_t)N * C);
    }
    rmsnorm_forward(a.lnf, a.lnf_rstd, a.residual, N, C);
    matmul_forward(h, a.logits, a.lnf, model->param(t), N, C, c.padded_vocab());
    if (with_targets) {
        softcap_cross_entropy(a.losses, a.logits, a.targets, N, c.vocab_size, c.padded_vocab(), dloss, backward_next);
        loss_sum(model->loss_total, a.losses, N);
    }
}

// Backward of the last forward, which ran on the same B x T with
// backward_next: adds this micro-batch's gradients into model->grads. With
// model->reduce_grads (the step's last micro-step, several ranks), each
// layer's gradients are sent to their owners as soon as they are complete,
// while the layers below are still being worked on.
inline void model_backward(Model* model, int B, int T) {
    const ModelConfig& c = model->config;
    Activations& a = model->acts;
    cublasHandle_t h = model->cublas;
    const int N = B * T, C = c.n_embd, H = c.n_head, KVH = c.n_kv_head, hd = c.head_dim();
    const int qkv_width = (H + 2 * KVH) * hd, ffn = 4 * C;
    auto complete = [&](int first_tensor, int end_tensor) {  // the gradients of these tensors are final
        if (!model->reduce_grads || !model->multi) return;
        const size_t end = end_tensor < (int)model->tensors.size() ? model->offsets[end_tensor] : model->num_params;
        multi_gpu_reduce_bucket(*model->multi, model->shards, model->grads, model->offsets[first_tensor], end);
    };
    int t = (int)model->tensors.size() - 1;  // lm_head; walk the storage order backwards
    cudaCheck(cudaMemsetAsync(a.dresidual, 0, (size_t)N * C * sizeof(floatX)));
    matmul_backward(h, a.scratch_narrow, model->grad(t), a.logits, a.lnf, model->param(t), N, C, c.padded_vocab());
    complete(t, t + 1);
    t--;
    rmsnorm_backward(a.dresidual, a.scratch_narrow, a.lnf, a.lnf_rstd, N, C);
    for (int l = c.n_layer - 1; l >= 0; l--) {
        Activations::Layer& L = a.layers[l];
        const int layer_end = t + 1;
        if (c.is_moe_layer(l)) {
            // MoE FFN: x += shared(ln2) + sum of gated routed experts(ln2)
            t -= 4;  // to the router, the first of the layer's five tensors
            moe_backward(model->router, l - 1, h, a.scratch_narrow, a.scratch_wide, a.ffn_act, a.dresidual, L.ln2,
                         L.fc_pre, moe_weights(model, t), moe_grads(model, t), B, T);
            t--;
        } else {
            // FFN: x += relu2(ln2 @ fc^T) @ proj^T
            relu2_forward(a.ffn_act, L.fc_pre, (size_t)N * ffn);  // recomputed, not stored
            matmul_backward(h, a.scratch_wide, model->grad(t), a.dresidual, a.ffn_act, model->param(t), N, ffn, C);
            t--;
            relu2_backward(a.scratch_wide, a.scratch_wide, L.fc_pre, (size_t)N * ffn);
            matmul_backward(h, a.scratch_narrow, model->grad(t), a.scratch_wide, L.ln2, model->param(t), N, C, ffn);
            t--;
        }
        rmsnorm_backward(a.dresidual, a.scratch_narrow, L.ln2, L.ln2_rstd, N, C);
        // attention: x += attention(rope_qknorm(ln1 @ wqkv^T)) @ wo^T
        matmul_backward(h, a.scratch_narrow, model->grad(t), a.dresidual, L.atty, model->param(t), N, C, C);
        t--;
        attention_backward(a.scratch_wide, a.scratch_narrow, L.atty, L.lse, L.qkv, a.att_delta, B, T, H, KVH, hd);
        rope_qknorm_backward(a.scratch_wide, L.qkv, L.qk_rstd, model->rope, B, T, H, KVH, hd);
        t -= 2;  // wq, wk, wv as one matrix starting at wq
        matmul_backward(h, a.scratch_narrow, model->grad(t), a.scratch_wide, L.ln1, model->param(t), N, C, qkv_width);
        t--;
        complete(t + 1, layer_end);
        rmsnorm_backward(a.dresidual, a.scratch_narrow, L.ln1, L.ln1_rstd, N, C);
    }
    // the embedding's RMSNorm, then the lookup
    cudaCheck(cudaMemsetAsync(a.scratch_narrow, 0, (size_t)N * C * sizeof(floatX)));
    rmsnorm_backward(a.scratch_narrow, a.dresidual, a.x0, a.x0_rstd, N, C);
    embedding_backward(model->grad(t), a.tokens, a.scratch_narrow, N, C, model->embedding_sort);
    complete(t, t + 1);
}

// Global-norm clipping, then each group's optimizer at its peak rate times
// the schedule's factor for the 0-based step: AdamW tensor by tensor, Muon
// matrix by matrix (its momentum warmed up by the step). Weight decay on the
// matrices only (ParamTensor::decays). Each rank updates the slice it owns
// (all of it with one process); the norm's sums of squares are summed over
// the ranks first, and the owners send the new weights to every rank after.
inline void model_update(Model* model, const Schedule& schedule, float max_grad_norm, int step) {
    const OptimizerConfig& o = model->optim;
    const size_t lo = model->shard_begin(), hi = lo + model->shard_size();
    float* master = model->master - model->master_begin();  // indexed by parameter: valid in [lo, hi)
    if (model->multi) multi_gpu_buckets_done(*model->multi);
    grad_norm_partial(model->norm_partial, model->grads + lo, hi - lo);
    if (model->multi) multi_gpu_sum(*model->multi, model->norm_partial, NORM_BLOCKS);
    grad_norm_final(model->grad_norm_value, model->clip_scale, model->norm_partial, max_grad_norm);
    for (const ParamGroup& g : model->groups) {
        const float lr = (float)(g.lr * schedule.factor(step, g.warmup));
        if (g.muon) {  // optimizer_groups puts every Muon tensor in this one group
            for (const MuonMatrix& mm : model->muon_matrices) {
                // this rank's matrices of the batch: a shard never cuts one
                const size_t size = (size_t)mm.rows * mm.cols, first = model->offsets[mm.first_tensor];
                size_t a, b;
                model->shards.overlap(model->rank, first, first + mm.batch * size, &a, &b);
                if (a == b) continue;
                const float wd = model->tensors[mm.first_tensor].decays() ? (float)o.weight_decay : 0.0f;
                muon_step(model->cublas, model->muon, master + a, model->params + a, model->adam_m + (a - lo),
                          model->grads + a, (int)mm.rows, (int)mm.cols, (int)((b - a) / size), lr,
                          (float)(mm.routed_experts && !o.expert_momentum_warmup ? o.momentum_end
                                                                                 : muon_momentum(o, step)),
                          wd, o.ns_steps, model->clip_scale);
            }
            continue;
        }
        for (int i : g.tensors) {
            size_t a, b;
            model->shards.overlap(model->rank, model->offsets[i], model->offsets[i] + model->tensors[i].numel(), &a, &b);
            if (a == b) continue;
            const float wd = model->tensors[i].decays() ? (float)o.weight_decay : 0.0f;
            adamw_update(master + a, model->params + a, model->adam_m + (a - lo), model->adam_v + (a - lo),
                         model->grads + a, b - a, lr, (float)o.beta1, (float)o.beta2, (float)o.eps, wd, step + 1,
                         model->clip_scale);
        }
    }
    if (!model->multi || !model->multi->active()) return;
    // the owners' new weights to every rank: the matmuls' copy as the owner
    // rounded it (the FP32 build: its master weights), and the routers' fp32
#ifdef ENABLE_FP32
    multi_gpu_share_shards(*model->multi, model->shards, model->master);
#else
    multi_gpu_share_shards(*model->multi, model->shards, model->params);
    for (size_t i = 0; model->router_master && i < model->router_tensors.size(); i++) {
        const int t = model->router_tensors[i];
        const size_t n = (size_t)model->tensors[t].numel();
        multi_gpu_share_range(*model->multi, model->shards, model->master, model->router_master + i * n,
                              model->offsets[t], model->offsets[t] + n);
    }
#endif
}

inline void model_free(Model* model) {
    Activations& a = model->acts;
    for (auto& L : a.layers)
        for (void* p : {(void*)L.ln1, (void*)L.ln1_rstd, (void*)L.qkv, (void*)L.qk_rstd, (void*)L.atty, (void*)L.lse,
                        (void*)L.ln2, (void*)L.ln2_rstd, (void*)L.fc_pre})
            cudaCheck(cudaFree(p));
    for (void* p : {(void*)a.tokens, (void*)a.targets, (void*)a.x0, (void*)a.x0_rstd, (void*)a.residual, (void*)a.lnf,
                    (void*)a.lnf_rstd, (void*)a.logits, (void*)a.losses, (void*)a.predicted, (void*)a.dresidual, (void*)a.scratch_wide,
                    (void*)a.scratch_narrow, (void*)a.ffn_act, (void*)a.att_delta, (void*)model->master, (void*)model->router_master, (void*)model->grads,
                    (void*)model->adam_m, (void*)model->adam_v, (void*)model->loss_total, (void*)model->grad_norm_value,
                    (void*)model->clip_scale, (void*)model->norm_partial})
        cudaCheck(cudaFree(p));
#ifndef ENABLE_FP32
    cudaCheck(cudaFree(model->params));
#endif
    model->rope.release();
    model->muon.release();
    model->embedding_sort.release();
    if (model->config.n_experts > 0) router_free(&model->router);
    cublasCheck(cublasDestroy(model->cublas));
}
