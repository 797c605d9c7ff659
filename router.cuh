// router.cuh: the Mixture-of-Experts FFN on the GPU: the TC / EC / ET
// routers, dispatch and combine, the expert FFNs, and the router state
// (ET cutoffs, TC loss-free biases) with the statistics a step reports.
//
// SPEC: The MoE layer. Every layer but the first replaces the dense FFN with
//   y_n = shared(h_n) + sum over selected i of p_ni * expert_i(h_n),
//   p_ni = sigmoid(r_ni), r = h W_r^T (E logits per token, fp32),
// where shared and every expert are ReLU^2 FFNs of width 2C. The routers
// differ only in which (token, expert) pairs they select; router_config.h
// holds their settings, test/reference_moe.h states their math in plain C++.
//
// Reading order:
//   1. selection kernels: TC top-K per token; EC top-k per (pool, expert)
//      by a radix select over tiles of the pool (per-tile histograms, merged
//      per pool), which also serves the ET training threshold with its
//      capacity clamp and the k-th-largest statistic; the plain ET threshold
//      for eval;
//   2. dispatch: each expert's tokens listed in token order (per-tile counts
//      scanned over tiles, then each tile numbers its own tokens), their
//      gates, and a tile schedule for the experts;
//   3. the expert FFNs: a grouped matmul over the variable-size token lists,
//      with the gather, ReLU^2 and its derivative fused into its loads and
//      stores, and the matching weight-gradient kernel;
//   4. combine, the gate's gradient, balancing (aux loss, loss-free bias) and
//      the cutoff EMA;
//   5. Router: buffers allocated once, the per-step state and statistics, and
//      the layer's forward and backward built from the phases above.
//
// No host sync inside a step: the number of tokens an expert gets lives on
// the device only. The expert kernels are launched for a bound on the work
// that is known on the host (the training capacity below) and read the real
// sizes on the device: the row-tile matmuls loop over the real tiles with a
// grid of at most one wave, the weight-gradient blocks of an expert without
// tokens leave at once. The
// bound per micro-batch of N tokens: TC and EC exactly N*K routed pairs;
// ET with the capacity clamp at most hi = floor(k(1+C)) per pool and expert;
// ET without the clamp, and eval by thresholds, up to N*E. Eval and
// generation reuse the training buffers: a pass that could route more pairs
// than they hold selects over all its tokens, then dispatches, runs the
// experts and combines in sub-batches of tokens (see pass_chunk_tokens).
//
// Determinism: every list is built by scans in token order, every sum has
// one owner that adds in a fixed order; the only atomics add integers
// (histograms and counters), whose result does not depend on their order.
//
// Included by model.cuh after its kernels: it uses their plumbing (floatX,
// cudaCheck, the matmul and relu2 launchers).
#pragma once

#include <cuda_pipeline.h>
#include <mma.h>

#include <cstdint>

#include "router_config.h"

// ----------------------------------------------------------------------------
// 1. Selection. The logits r are (N, E) fp32, row n = token n; a selection is
// an (N, E) byte mask. Ties: the higher score wins, equal scores go to the
// lower index (expert for TC, token for EC and the clamp), as in the
// reference, so the GPU selects exactly what it selects.

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// TC's score of expert i for a token: r + bias (bias may be null). A NaN
// (a diverged run) ranks last, so a token still takes exactly K experts.
__device__ __forceinline__ float tc_score(const float* r, const float* bias, int i) {
    const float s = r[i] + (bias ? bias[i] : 0.0f);
    return isnan(s) ? -INFINITY : s;
}

// TC: mask[n][i] = 1 for the K experts with the largest score. The scores
// with the tie rule (higher score first, equal scores: lower index first) are
// a strict total order, so the K-th best pair (s_K, i_K) decides the mask:
// expert i is taken iff (s_i, i) ranks at or above it -- exactly "fewer than
// K experts outrank i". It is found by K passes of an argmax over E: pass p
// takes the best expert ranked strictly below pass p-1's pick, so no taken
// set is kept. O(E (K + 1)) compares per token instead of O(E^2).
// Layout: one thread per token, TC_SELECT_THREADS per block (256 blocks at
// N = 32k, enough for 132 SMs). Memory: a warp's reads span its 32 rows, a
// contiguous 32 E floats, every sector used (the K + 1 passes hit L1); E
// bytes written per token.
static const int TC_SELECT_THREADS = 128;
__global__ void __launch_bounds__(TC_SELECT_THREADS)
tc_select_kernel(uint8_t* mask, const float* logits, const float* bias, int N, int E, int K) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const float* r = logits + (size_t)n * E;
    float kth_score = INFINITY;  // the pick so far; (+inf, -1) outranks every pair
    int kth = -1;
    for (int p = 0; p < K; p++) {
        float best_score = -INFINITY;
        int best = -1;
        for (int j = 0; j < E; j++) {
            const float sj = tc_score(r, bias, j);
            const bool below = sj < kth_score || (sj == kth_score && j > kth);  // ranked after the last pick
            if (below && (best < 0 || sj > best_score)) {  // equal scores keep the lower index
                best_score = sj;
                best = j;
            }
        }
        kth_score = best_score;
        kth = best;
    }
    for (int i = 0; i < E; i++) {
        const float si = tc_score(r, bias, i);
        mask[(size_t)n * E + i] = si > kth_score || (si == kth_score && i <= kth);
    }
}

// A float as an unsigned key with the same order (larger float, larger key),
// so a radix select can work on its bytes. -0 is made +0 first: the two
// compare equal as floats, so they must tie here too. A NaN (a diverged run)
// gets the lowest key, so it is chosen last, as TC ranks it.
__device__ __forceinline__ unsigned int order_key(float x) {
    if (isnan(x)) return 0u;
    const unsigned int u = __float_as_uint(x == 0.0f ? 0.0f : x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(unsigned int key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Two block-wide tools the selection and the dispatch share.
//
// block_exclusive_scan: store(i, sum over j < i of load(j)) for i < n, in
// order, by a block-wide scan in chunks of THREADS_ items carried from chunk
// to chunk; returns the sum of all n (to every thread). The whole block calls
// it; integer sums, so the result is exact.
template <int THREADS_, typename Load, typename Store>
__device__ int block_exclusive_scan(int n, Load load, Store store) {
    using BlockScan = cub::BlockScan<int, THREADS_>;
    __shared__ typename BlockScan::TempStorage scan;
    int carry = 0;  // the items of the chunks before this one
    for (int base = 0; base < n; base += THREADS_) {
        const int i = base + threadIdx.x;
        const int value = i < n ? load(i) : 0;
        int before, total;
        BlockScan(scan).ExclusiveSum(value, before, total);
        if (i < n) store(i, carry + before);
        carry += total;
        __syncthreads();  // the scan storage is reused by the next chunk
    }
    return carry;
}

// Ranks of flagged items in thread order, one item per thread and E flags an
// item (one per expert). warp_flag_count records each warp's count of flag e
// in warp_count[warp][e]; after a __syncthreads, block_flag_rank gives the
// flagged threads before this one in the block (its rank if it is flagged).
// Every lane of the warp calls both (each is one ballot).
__device__ __forceinline__ void warp_flag_count(int* warp_count, int E, int e, bool flag) {
    const unsigned votes = __ballot_sync(0xffffffffu, flag);
    if (threadIdx.x % WARP == 0) warp_count[threadIdx.x / WARP * E + e] = __popc(votes);
}
__device__ __forceinline__ int block_flag_rank(const int* warp_count, int E, int e, bool flag) {
    const unsigned votes = __ballot_sync(0xffffffffu, flag);
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    int rank = __popc(votes & ((1u << lane) - 1));  // the lanes before this one
    for (int w = 0; w < warp; w++) rank += warp_count[w * E + e];
    return rank;
}

// EC top-k and the ET training threshold, per (pool p, expert e) of `pool`
// consecutive tokens:
//   kth[p][e] = the k-th largest logit (the EC cutoff of this pool; skipped
//               when kth is null);
//   SELECT_TOP_K (EC): the top-k tokens;
//   SELECT_THRESHOLD (ET, training without the clamp): r >= c_e;
//   SELECT_THRESHOLD_CLAMPED (ET training): r >= c_e, and if that is more
//               than hi or fewer than lo tokens, the top hi or lo instead
//               (*clamped += 1 for each such (p, e): an integer, so the order
//               of adds is moot).
// c_e = raw_cutoff[e] / correction (the EMA's bias correction). The clamp
// looks at the whole pool, so it is the one non-causal step of ET training:
// a later token can push an earlier one out of a full expert (thresholds
// alone, and eval, are causal).
//
// The m-th largest key of a column is found by a radix select over the
// 32-bit order keys, one byte a pass from the top: a pass histograms the
// next byte of the keys that match the bytes chosen so far and picks the
// bucket that holds the m-th largest. So that a pool of 32k tokens, or of
// 8 x 32k, keeps every SM busy and reads the (N, E) logits row by row, the
// pools are cut into tiles of consecutive tokens (select_tiling: about
// SELECT_TILES tiles over all pools, whatever N) and every pass is two
// kernels: select_histogram_kernel, one block per tile, histograms all E
// experts of its tile at once; select_pick_kernel, one block per (pool,
// expert), adds its pool's tile histograms (integers: exact in any order) and
// picks the byte. After the last byte, the chosen key is the m-th largest
// and `ties` of the tokens equal to it belong to the top m: the lowest-indexed
// ones, so the pick also scans the tiles' counts of that key (the last pass's
// bucket) into each tile's first rank among the equal tokens, and
// select_mark_top_kernel marks each tile. All integer: the selection is
// exactly the reference's (ties included) in any schedule.
//
// The state of a (pool, expert) between kernels: sel_key, the key's bytes
// chosen so far (after the last pass: the key), and sel_rank, the rank still
// to find among the keys matching them (after the last pass: the ties taken);
// sel_rank 0 marks a (pool, expert) that is not selecting (the ET clamp
// selects only for the experts it clamps).
enum PoolSelect { SELECT_TOP_K, SELECT_THRESHOLD, SELECT_THRESHOLD_CLAMPED };

static const int SELECT_THREADS = 256;       // threads of the tile kernels
static const int SELECT_PICK_THREADS = 256;  // threads of the pick: one per bucket of a byte
static const int SELECT_TILES = 256;         // the tiles a selection aims at over all pools: ~2 per SM of an H200
static const int SELECT_MIN_TILE = 64;       // tokens; smaller pools are one tile
static const int SELECT_HIST_EXPERTS = 16;   // experts histogrammed at once: 16 x 256 ints of shared memory

// How a selection cuts its pools: pool p's tile t holds its tokens
// t * tile .. min((t + 1) * tile, pool) - 1; tile g of all is t + p * per_pool.
struct SelectTiling {
    int pool, pools, tile, per_pool;
    int tiles() const { return pools * per_pool; }
};
inline SelectTiling select_tiling(int N, int pool) {
    SelectTiling s;
    s.pool = pool;
    s.pools = N / pool;
    const int wanted = ceil_div(SELECT_TILES, s.pools);  // tiles per pool
    s.tile = std::min(pool, std::max(SELECT_MIN_TILE, ceil_div(pool, wanted)));
    s.per_pool = ceil_div(pool, s.tile);
    return s;
}
// The most tiles a pass of at most B sequences cuts (pools <= B): per pool
// at most ceil(SELECT_TILES / pools).
inline int64_t select_tiles_bound(int64_t B) { return SELECT_TILES + B; }

// First token of tile g and its number of tokens.
__device__ __forceinline__ int tile_first_token(const SelectTiling& s, int g, int* rows) {
    const int p = g / s.per_pool, t = g % s.per_pool;
    *rows = min(s.tile, s.pool - t * s.tile);
    return p * s.pool + t * s.tile;
}

// The radix select's bits decided before the pass on byte `shift`.
__device__ __forceinline__ unsigned int known_bits(int shift) { return shift == 24 ? 0u : ~0u << (shift + 8); }

// Every (pool, expert) starts a selection of its m-th largest key (m >= 1).
// One thread per (pool, expert).
__global__ void select_start_kernel(unsigned int* sel_key, int* sel_rank, int pairs, int m) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= pairs) return;
    sel_key[i] = 0u;
    sel_rank[i] = m;
}

// One pass of the radix select, step 1: hist[g][e][b] = the keys of tile g's
// column e whose decided bytes match sel_key[p][e] and whose byte at `shift`
// is b, for each selecting expert e (others are not written).
// Layout: one block per tile; its threads stride over the tile's rows,
// SELECT_HIST_EXPERTS experts at a time (all of them for E <= 16), so
// consecutive threads read consecutive floats of a row: coalesced. Shared
// histograms take integer atomics (order does not matter). Memory: the
// tile's logits read once (E floats a token), 1 KB written per expert.
__global__ void __launch_bounds__(SELECT_THREADS)
select_histogram_kernel(int* hist, const float* logits, const unsigned int* sel_key, const int* sel_rank,
                        SelectTiling s, int E, int shift) {
    __shared__ int tile_hist[SELECT_HIST_EXPERTS][256];
    __shared__ unsigned int prefix[SELECT_HIST_EXPERTS];
    __shared__ bool selecting[SELECT_HIST_EXPERTS];
    const int g = blockIdx.x, p = g / s.per_pool;
    int rows;
    const int first = tile_first_token(s, g, &rows);
    const unsigned int known = known_bits(shift);
    for (int e0 = 0; e0 < E; e0 += SELECT_HIST_EXPERTS) {
        const int width = min(SELECT_HIST_EXPERTS, E - e0);
        for (int i = threadIdx.x; i < width * 256; i += SELECT_THREADS) tile_hist[i / 256][i % 256] = 0;
        if ((int)threadIdx.x < width) {
            prefix[threadIdx.x] = sel_key[(size_t)p * E + e0 + threadIdx.x];
            selecting[threadIdx.x] = sel_rank[(size_t)p * E + e0 + threadIdx.x] > 0;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < rows * width; i += SELECT_THREADS) {
            const int n = first + i / width, j = i % width;
            if (!selecting[j]) continue;
            const unsigned int key = order_key(logits[(size_t)n * E + e0 + j]);
            if ((key & known) == prefix[j]) atomicAdd(&tile_hist[j][(key >> shift) & 255], 1);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < width * 256; i += SELECT_THREADS)
            if (selecting[i / 256]) hist[((size_t)g * E + e0 + i / 256) * 256 + i % 256] = tile_hist[i / 256][i % 256];
        __syncthreads();  // the shared histograms are reset for the next experts
    }
}

// One pass of the radix select, step 2, for a selecting (pool p, expert e):
// the pool's histogram of byte `shift` (the sum of its tiles'), and the
// bucket b holding the sel_rank-th largest of the matching keys: the bucket
// where the count of keys in buckets above it first reaches the rank.
// sel_key gets b, sel_rank the rank left within b. After the last byte
// (shift 0) the key is the m-th largest itself, kth[p][e] its logit (kth not
// null), and tile_ties[g][e], for each tile g of the pool, the pool's tokens
// equal to it in the tiles before g (an exclusive scan of the last
// histograms' bucket b).
// Layout: one block per (expert, pool); thread i adds bucket 255 - i % 256
// of every GROUPS-th tile from i / 256 on (integers: exact in any order;
// GROUPS > 1 would keep more loads in flight in these few blocks, which only
// a GPU's timing can weigh against their cost); the GROUPS partial sums meet
// in shared memory, and a block-wide exclusive scan
// in thread order counts the keys above each bucket (threads 0..255, the
// others adding 0 after them). Memory: per_pool x 1 KB of histogram read,
// coalesced; after the last byte one int per tile read again and written.
__global__ void __launch_bounds__(SELECT_PICK_THREADS)
select_pick_kernel(unsigned int* sel_key, int* sel_rank, int* tile_ties, float* kth, const int* hist, SelectTiling s,
                   int E, int shift) {
    static const int GROUPS = SELECT_PICK_THREADS / 256;  // tile groups
    static_assert(SELECT_PICK_THREADS % 256 == 0, "whole groups of one thread per bucket");
    using BlockScan = cub::BlockScan<int, SELECT_PICK_THREADS>;
    __shared__ typename BlockScan::TempStorage scan;
    __shared__ int group_count[GROUPS][256];
    __shared__ int s_bucket, s_above;
    const int e = blockIdx.x, p = blockIdx.y;
    const size_t pe = (size_t)p * E + e;
    const int rank = sel_rank[pe];
    if (rank == 0) return;  // not selecting: the whole block leaves
    const unsigned int prefix = sel_key[pe];  // read before thread 0 writes it below
    const int bucket = 255 - threadIdx.x % 256, group = threadIdx.x / 256;
    const int* pool_hist = hist + ((size_t)p * s.per_pool * E + e) * 256;
    int count = 0;
    for (int t = group; t < s.per_pool; t += GROUPS) count += pool_hist[(size_t)t * E * 256 + bucket];
    group_count[group][threadIdx.x % 256] = count;
    __syncthreads();
    count = 0;
    if (threadIdx.x < 256)
        for (int gr = 0; gr < GROUPS; gr++) count += group_count[gr][threadIdx.x];
    int above;
    BlockScan(scan).ExclusiveSum(count, above);
    // exactly one bucket holds the rank-th largest (1 <= rank <= the matching keys);
    // bucket 0 takes it otherwise, as a plain loop down the buckets would
    if (threadIdx.x < 256 && above < rank && (above + count >= rank || bucket == 0)) {
        s_bucket = bucket;
        s_above = above;
    }
    __syncthreads();
    const unsigned int key = prefix | ((unsigned int)s_bucket << shift);
    if (threadIdx.x == 0) {
        sel_key[pe] = key;
        sel_rank[pe] = rank - s_above;
        if (shift == 0 && kth) kth[pe] = key_value(key);
    }
    if (shift != 0) return;
    int* ties = tile_ties + (size_t)p * s.per_pool * E + e;
    block_exclusive_scan<SELECT_PICK_THREADS>(
        s.per_pool, [&](int t) { return pool_hist[(size_t)t * E * 256 + s_bucket]; },
        [&](int t, int before) { ties[(size_t)t * E] = before; });
}

// Marks the top of every selecting (pool, expert) in tile g, after the last
// pass: mask[n][e] = key > sel_key, or key == sel_key and fewer than sel_rank
// (the ties taken) equal tokens before n in the pool: tile_ties[g][e] in the
// tiles before, the rest ranked in the tile. Non-selecting experts' mask is
// left as it is.
// Layout: one block per tile, one thread per token, the tile in chunks of
// SELECT_THREADS tokens; per expert a warp ballot ranks the equal tokens
// within the warp, the warps' counts (shared) within the chunk, a carry
// (shared) across chunks. Dynamic shared memory: (SELECT_THREADS / 32 + 1) E
// ints. Memory: each warp reads its 32 rows (contiguous, every sector used;
// the second look hits L1), one byte written per selecting pair.
__global__ void __launch_bounds__(SELECT_THREADS)
select_mark_top_kernel(uint8_t* mask, const float* logits, const unsigned int* sel_key, const int* sel_rank,
                       const int* tile_ties, SelectTiling s, int E) {
    extern __shared__ int mark_smem[];
    int* warp_count = mark_smem;                             // (SELECT_THREADS / 32, E)
    int* carry = warp_count + SELECT_THREADS / WARP * E;     // (E) equal tokens in the chunks before
    const int g = blockIdx.x, p = g / s.per_pool;
    const unsigned int* key = sel_key + (size_t)p * E;
    const int* ties = sel_rank + (size_t)p * E;
    int rows;
    const int first = tile_first_token(s, g, &rows);
    for (int e = threadIdx.x; e < E; e += SELECT_THREADS) carry[e] = tile_ties[(size_t)g * E + e];
    for (int base = 0; base < rows; base += SELECT_THREADS) {
        const int i = base + threadIdx.x;
        const float* row = logits + (size_t)(first + i) * E;
        for (int e = 0; e < E; e++)
            warp_flag_count(warp_count, E, e, i < rows && ties[e] > 0 && order_key(row[e]) == key[e]);
        __syncthreads();
        for (int e = 0; e < E; e++) {
            if (ties[e] == 0) continue;  // the same for the whole block
            const unsigned int k = i < rows ? order_key(row[e]) : 0u;
            const bool equal = i < rows && k == key[e];
            const int rank = carry[e] + block_flag_rank(warp_count, E, e, equal);
            if (i < rows) mask[(size_t)(first + i) * E + e] = k > key[e] || (equal && rank < ties[e]);
        }
        __syncthreads();  // every thread has read carry
        for (int e = threadIdx.x; e < E; e += SELECT_THREADS)
            for (int w = 0; w < SELECT_THREADS / WARP; w++) carry[e] += warp_count[w * E + e];
        __syncthreads();  // carry is updated before the next chunk, warp_count read before it is written again
    }
}

// The ET threshold for tile g: mask[n][e] = r[n][e] >= c_e, and (when
// tile_count is not null) tile_count[g][e] = the tile's tokens taken.
// Layout: one block per tile; its threads stride over the tile's rows x E
// logits (one contiguous span, read coalesced) and count into a shared
// histogram of E ints (integer atomics). Dynamic shared memory: E floats
// (the cutoffs) and E ints. Memory: the logits read once, a byte written
// per pair, E ints per tile.
__global__ void __launch_bounds__(SELECT_THREADS)
select_mark_threshold_kernel(uint8_t* mask, int* tile_count, const float* logits, const float* raw_cutoff,
                             float correction, SelectTiling s, int E) {
    extern __shared__ float threshold_smem[];
    float* cutoff = threshold_smem;                  // (E)
    int* taken = (int*)(threshold_smem + E);         // (E)
    const int g = blockIdx.x;
    int rows;
    const int first = tile_first_token(s, g, &rows);
    for (int e = threadIdx.x; e < E; e += SELECT_THREADS) {
        cutoff[e] = raw_cutoff[e] / correction;
        taken[e] = 0;
    }
    __syncthreads();
    const float* r = logits + (size_t)first * E;
    uint8_t* m = mask + (size_t)first * E;
    for (int i = threadIdx.x; i < rows * E; i += SELECT_THREADS) {
        const bool take = r[i] >= cutoff[i % E];
        m[i] = take;
        if (take && tile_count) atomicAdd(&taken[i % E], 1);
    }
    __syncthreads();
    if (tile_count)
        for (int e = threadIdx.x; e < E; e += SELECT_THREADS) tile_count[(size_t)g * E + e] = taken[e];
}

// The ET clamp: count = the pool's tokens at or above the cutoff (the sum of
// its tiles' counts), keep = clamp(count, lo, hi). An expert whose count
// changes starts a selection of its keep-th largest key (keep >= 1: a changed
// count is hi >= k >= 1, or lo > count >= 0) and is counted in *clamped; the
// others select nothing. One thread per (pool, expert), its tiles in order.
__global__ void select_clamp_kernel(unsigned int* sel_key, int* sel_rank, int* clamped, const int* tile_count,
                                    SelectTiling s, int E, int lo, int hi) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= s.pools * E) return;
    const int p = i / E, e = i % E;
    int count = 0;
    for (int t = 0; t < s.per_pool; t++) count += tile_count[((size_t)p * s.per_pool + t) * E + e];
    const int keep = min(max(count, lo), hi);
    if (keep != count) atomicAdd(clamped, 1);
    sel_key[i] = 0u;
    sel_rank[i] = keep != count ? keep : 0;
}

// Scratch of the selection: allocated once for passes of at most N tokens in
// at most B pools.
struct SelectScratch {
    int* hist = nullptr;              // (tiles, E, 256) the tiles' histograms of a pass
    int* tile_ints = nullptr;         // (tiles, E) the clamp's counts, then tile_ties
    unsigned int* sel_key = nullptr;  // (pools, E)
    int* sel_rank = nullptr;          // (pools, E)
};
inline SelectScratch select_scratch_allocate(int64_t B, int64_t E, size_t* bytes) {
    SelectScratch s;
    s.hist = device_alloc<int>(select_tiles_bound(B) * E * 256, bytes);
    s.tile_ints = device_alloc<int>(select_tiles_bound(B) * E, bytes);
    s.sel_key = device_alloc<unsigned int>(B * E, bytes);
    s.sel_rank = device_alloc<int>(B * E, bytes);
    return s;
}
inline void select_scratch_free(SelectScratch& s) {
    for (void* p : {(void*)s.hist, (void*)s.tile_ints, (void*)s.sel_key, (void*)s.sel_rank}) cudaCheck(cudaFree(p));
}

// The radix select of each selecting (pool, expert), started by
// select_start_kernel or select_clamp_kernel: four passes of a byte.
inline void radix_select(const SelectScratch& scratch, float* kth, const float* logits, const SelectTiling& s, int E) {
    for (int shift = 24; shift >= 0; shift -= 8) {
        select_histogram_kernel<<<s.tiles(), SELECT_THREADS>>>(scratch.hist, logits, scratch.sel_key,
                                                               scratch.sel_rank, s, E, shift);
        launchCheck();
        select_pick_kernel<<<dim3(E, s.pools), SELECT_PICK_THREADS>>>(scratch.sel_key, scratch.sel_rank,
                                                                      scratch.tile_ints, kth, scratch.hist, s, E,
                                                                      shift);
        launchCheck();
    }
}

inline void select_mark_top(uint8_t* mask, const SelectScratch& scratch, const float* logits, const SelectTiling& s, int E) {
    const size_t smem = (size_t)(SELECT_THREADS / WARP + 1) * E * sizeof(int);
    if (smem > 48 * 1024) fail("MoE: the selection of %d experts needs %zu bytes of shared memory per block", E, smem);
    select_mark_top_kernel<<<s.tiles(), SELECT_THREADS, smem>>>(mask, logits, scratch.sel_key, scratch.sel_rank,
                                                                scratch.tile_ints, s, E);
    launchCheck();
}

// The selection of a pass of N tokens in pools of `pool` (see PoolSelect),
// each expert's target k in a pool; lo, hi: the clamp's bounds.
inline void pool_select(uint8_t* mask, float* kth, int* clamped, const SelectScratch& scratch, const float* logits,
                        const float* raw_cutoff, float correction, int N, int E, int pool, int k, int lo, int hi,
                        PoolSelect mode) {
    const SelectTiling s = select_tiling(N, pool);
    const int pairs = s.pools * E;
    if (kth || mode == SELECT_TOP_K) {
        select_start_kernel<<<ceil_div(pairs, THREADS), THREADS>>>(scratch.sel_key, scratch.sel_rank, pairs, k);
        launchCheck();
        radix_select(scratch, kth, logits, s, E);
    }
    if (mode == SELECT_TOP_K) {
        select_mark_top(mask, scratch, logits, s, E);
        return;
    }
    const bool clamp = mode == SELECT_THRESHOLD_CLAMPED;
    select_mark_threshold_kernel<<<s.tiles(), SELECT_THREADS, 2 * E * sizeof(float)>>>(
        mask, clamp ? scratch.tile_ints : nullptr, logits, raw_cutoff, correction, s, E);
    launchCheck();
    if (!clamp) return;
    select_clamp_kernel<<<ceil_div(pairs, THREADS), THREADS>>>(scratch.sel_key, scratch.sel_rank, clamped,
                                                               scratch.tile_ints, s, E, lo, hi);
    launchCheck();
    radix_select(scratch, nullptr, logits, s, E);
    select_mark_top(mask, scratch, logits, s, E);
}

// ET at eval and generation: mask[n][i] = r[n][i] >= raw[i] / correction,
// each token on its own (causal). One thread per pair.
__global__ void threshold_select_kernel(uint8_t* mask, const float* logits, const float* raw_cutoff, float correction,
                                        int N, int E) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)N * E) mask[i] = logits[i] >= raw_cutoff[i % E] / correction;
}

// kth_sum[e] += (sum over pools of kth[p][e]) / pools: this micro-batch's
// EC cutoff, for the step's mean. One thread per expert, pools in order.
__global__ void kth_accumulate_kernel(float* kth_sum, const float* kth, int pools, int E) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E) return;
    float sum = 0.0f;
    for (int p = 0; p < pools; p++) sum += kth[(size_t)p * E + e];
    kth_sum[e] += sum / pools;
}

// ----------------------------------------------------------------------------
// 2. Dispatch. The routed pairs are numbered expert by expert, tokens in
// order within an expert: slot s of expert e lies in [offsets[e],
// offsets[e+1]). The expert kernels work on tiles of EXPERT_TILE slots of one
// expert; tile_expert / tile_row list them.

static const int EXPERT_TILE = 64;  // slots per row tile of the expert matmuls
static const int DISPATCH_THREADS = 256;
// The count and dispatch kernels work on tiles of DISPATCH_TILE consecutive
// tokens (rows of the mask): 256 tiles, so 256 blocks, at N = 32k.
static const int DISPATCH_TILE = 128;
static_assert(DISPATCH_TILE % 32 == 0, "dispatch tiles are whole warps");
inline int dispatch_tiles(int64_t N) { return (int)((N + DISPATCH_TILE - 1) / DISPATCH_TILE); }

// Counting and dispatch in two passes over tiles of tokens, so that every
// pass has many blocks and reads the (N, E) mask row by row:
//   1. expert_tile_count_kernel: tile_counts[e][t] = tokens of tile t routed
//      to expert e;
//   2. expert_tile_scan_kernel: per expert, the exclusive scan over tiles
//      (tile_counts[e][t] becomes the tokens of e in tiles before t) and the
//      total counts[e];
//   3. expert_dispatch_kernel: each tile numbers its tokens of each expert
//      in token order, from that expert's first slot plus the tiles before.
// The result is the same as one scan per expert over all tokens in order:
// slots numbered expert by expert, tokens in increasing order.
// tile_counts: (E, dispatch_tiles(N)) ints of scratch.

// Pass 1: tile_counts[e][t] = sum over the tile's tokens n of mask[n][e].
// Layout: one block per tile; its threads stride over the tile's
// DISPATCH_TILE x E mask bytes (one contiguous span, read coalesced) and add
// into a shared histogram of E ints (integer atomics: order does not
// matter). Dynamic shared memory: E ints. Memory: N E bytes read once, E
// ints written per tile.
__global__ void __launch_bounds__(DISPATCH_THREADS)
expert_tile_count_kernel(int* tile_counts, const uint8_t* mask, int N, int E) {
    extern __shared__ int tile_hist[];
    const int tile = blockIdx.x, tiles = gridDim.x;
    for (int e = threadIdx.x; e < E; e += DISPATCH_THREADS) tile_hist[e] = 0;
    __syncthreads();
    const int first = tile * DISPATCH_TILE, rows = min(DISPATCH_TILE, N - first);
    const uint8_t* m = mask + (size_t)first * E;
    for (int i = threadIdx.x; i < rows * E; i += DISPATCH_THREADS)
        if (m[i]) atomicAdd(&tile_hist[i % E], 1);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += DISPATCH_THREADS) tile_counts[(size_t)e * tiles + tile] = tile_hist[e];
}

// Pass 2: for expert e, tile_counts[e][t] <- sum over t' < t of
// tile_counts[e][t'] (in place), and counts[e] = the sum over all tiles (and
// step_counts[e] += it when not null). Layout: one block per expert, a
// block-wide scan over its row of tiles (block_exclusive_scan). Little work:
// N / DISPATCH_TILE ints per expert, read and written once, contiguous.
__global__ void __launch_bounds__(DISPATCH_THREADS)
expert_tile_scan_kernel(int* tile_counts, int* counts, int* step_counts, int tiles) {
    const int e = blockIdx.x;
    int* row = tile_counts + (size_t)e * tiles;
    const int total = block_exclusive_scan<DISPATCH_THREADS>(
        tiles, [&](int t) { return row[t]; }, [&](int t, int before) { row[t] = before; });
    if (threadIdx.x == 0) {
        counts[e] = total;
        if (step_counts) step_counts[e] += total;
    }
}

// counts[e] = tokens routed to expert e (and step_counts[e] += it when not
// null); tile_counts (E, dispatch_tiles(N)) left holding each tile's first
// rank per expert, for expert_dispatch.
inline void expert_count(int* counts, int* step_counts, int* tile_counts, const uint8_t* mask, int N, int E) {
    const int tiles = dispatch_tiles(N);
    expert_tile_count_kernel<<<tiles, DISPATCH_THREADS, E * sizeof(int)>>>(tile_counts, mask, N, E);
    launchCheck();
    expert_tile_scan_kernel<<<E, DISPATCH_THREADS>>>(tile_counts, counts, step_counts, tiles);
    launchCheck();
}

// Pass 3. Expert e's slots start at the sum of the (kept) counts before it,
// its row tiles at the sum of their tiles; a routed pair (n, e) whose token
// is the r-th of expert e (r = tile_first[e][tile], the scanned tile_counts,
// plus the tile's tokens of e before n) takes slot offsets[e] + r:
//   slot_token[s] = n, slot_gate[s] = sigmoid(r[n][e]), slot_of[n][e] = s (-1: not routed).
// Block 0 also writes offsets[0..E] and the number of row tiles, and the
// blocks share out the row-tile schedule (tile_expert, tile_row).
// The host sizes the buffers for the most pairs a pass can route, so
// `capacity` is never reached; if it were (a bug, or NaN logits), each
// expert keeps its first tokens in order up to it, the pairs past it are
// dropped and counted in *dropped rather than written out of bounds, and the
// log reports it.
// Layout: one block per tile, one thread per token (DISPATCH_TILE threads).
// Thread 0 first lays out every expert's first slot, kept count and first row
// tile in shared memory (O(E), serial: E is small). Then, per expert, a warp
// ballot gives each token its rank within its warp, the warps' totals (in
// shared memory) its rank within the tile (warp_flag_count, block_flag_rank).
// Dynamic shared memory: 3 E + 1 ints + (DISPATCH_TILE / 32) E ints (E up to
// about 1700). Memory: each warp reads its 32 rows of the mask and logits
// (contiguous spans of 32 E bytes and floats, every sector used, the second
// pass over the mask from L1); writes E ints of slot_of per token and two
// words per routed slot.
__global__ void __launch_bounds__(DISPATCH_TILE)
expert_dispatch_kernel(int* slot_of, int* slot_token, float* slot_gate, int* offsets, int* tile_expert, int* tile_row,
                       int* num_tiles, int* dropped, const int* counts, const int* tile_first, const uint8_t* mask,
                       const float* logits, int N, int E, int capacity) {
    extern __shared__ int dispatch_smem[];
    int* first_slot = dispatch_smem;        // (E) expert's first slot
    int* kept = first_slot + E;             // (E) its slots (counts, less any dropped)
    int* first_tile = kept + E;             // (E + 1) its first row tile; [E] = all row tiles
    int* warp_count = first_tile + E + 1;   // (DISPATCH_TILE / 32, E) each warp's tokens of each expert
    const int tile = blockIdx.x, tiles = gridDim.x;
    if (threadIdx.x == 0) {
        int slot = 0, row_tile = 0, lost = 0;
        for (int e = 0; e < E; e++) {
            const int k = min(counts[e], capacity - slot);
            lost += counts[e] - k;
            first_slot[e] = slot;
            kept[e] = k;
            first_tile[e] = row_tile;
            slot += k;
            row_tile += (k + EXPERT_TILE - 1) / EXPERT_TILE;
        }
        first_tile[E] = row_tile;
        if (tile == 0) {
            for (int e = 0; e < E; e++) offsets[e] = first_slot[e];
            offsets[E] = slot;
            *num_tiles = row_tile;
            if (lost > 0) atomicAdd(dropped, lost);
        }
    }
    __syncthreads();
    // the row-tile schedule, shared out over the blocks: row tile g belongs to
    // the expert e with first_tile[e] <= g < first_tile[e + 1] (binary search)
    for (int g = tile * DISPATCH_TILE + threadIdx.x; g < first_tile[E]; g += tiles * DISPATCH_TILE) {
        int lo = 0, hi = E - 1;  // the last e with first_tile[e] <= g
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (first_tile[mid] <= g) lo = mid;
            else hi = mid - 1;
        }
        tile_expert[g] = lo;
        tile_row[g] = first_slot[lo] + (g - first_tile[lo]) * EXPERT_TILE;
    }
    const int n = tile * DISPATCH_TILE + threadIdx.x;
    const uint8_t* row = mask + (size_t)n * E;
    for (int e = 0; e < E; e++) warp_flag_count(warp_count, E, e, n < N && row[e]);
    __syncthreads();
    for (int e = 0; e < E; e++) {
        const bool routed = n < N && row[e];
        const int in_tile = block_flag_rank(warp_count, E, e, routed);  // every lane: n >= N ones vote no
        if (n >= N) continue;
        int slot = -1;
        if (routed) {
            const int rank = tile_first[(size_t)e * tiles + tile] + in_tile;  // e's tokens before n
            if (rank < kept[e]) {
                slot = first_slot[e] + rank;
                slot_token[slot] = n;
                slot_gate[slot] = sigmoidf(logits[(size_t)n * E + e]);
            }
        }
        slot_of[(size_t)n * E + e] = slot;
    }
}

// Builds the dispatch from the mask, counts and tile_counts as expert_count
// left them.
inline void expert_dispatch(int* slot_of, int* slot_token, float* slot_gate, int* offsets, int* tile_expert,
                            int* tile_row, int* num_tiles, int* dropped, const int* counts, const int* tile_counts,
                            const uint8_t* mask, const float* logits, int N, int E, int capacity) {
    const size_t smem = (size_t)(3 * E + 1 + DISPATCH_TILE / 32 * E) * sizeof(int);
    if (smem > 48 * 1024) fail("MoE: dispatch of %d experts needs %zu bytes of shared memory per block", E, smem);
    expert_dispatch_kernel<<<dispatch_tiles(N), DISPATCH_TILE, smem>>>(slot_of, slot_token, slot_gate, offsets,
                                                                       tile_expert, tile_row, num_tiles, dropped,
                                                                       counts, tile_counts, mask, logits, N, E,
                                                                       capacity);
    launchCheck();
}

// fanout[b] += tokens with b routed experts (b = 0, 1, 2, 3+). One thread
// per token; integer histograms in shared memory, then in global memory.
__global__ void fanout_kernel(int* fanout, const uint8_t* mask, int N, int E) {
    __shared__ int hist[4];
    if (threadIdx.x < 4) hist[threadIdx.x] = 0;
    __syncthreads();
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n < N) {
        int routed = 0;
        for (int i = 0; i < E; i++) routed += mask[(size_t)n * E + i];
        atomicAdd(&hist[min(routed, 3)], 1);
    }
    __syncthreads();
    if (threadIdx.x < 4 && hist[threadIdx.x] > 0) atomicAdd(&fanout[threadIdx.x], hist[threadIdx.x]);
}

// ----------------------------------------------------------------------------
// 3. The expert FFNs. Every routed slot s runs through its expert e:
//   pre_s = fc_e x_s (2C), out_s = proj_e relu(pre_s)^2 (C),
// with fc_e (2C, C) and proj_e (C, 2C) slices of the stacked expert tensors.
// cuBLAS has no grouped GEMM whose group sizes stay on the device, so these
// are our own tiled kernels: 64 x 64 output tiles, operands staged in shared
// memory by cp.async, two K steps in flight (the next step's tiles load
// while the tensor cores multiply this one's); tensor cores (wmma) in the
// BF16 build, exact fp32 in the FP32 build. (No wgmma yet.)
//
// The left operand's rows are read through a "rows" functor: row(s) is
// where slot s's row starts in global memory (the gather of token rows), and
// finish(s, v) turns a staged element into the operand (the gate, ReLU^2),
// applied in shared memory once the copy has landed, so the copies stay
// plain 16-byte cp.async and nothing is materialised in global memory.
// STAGED_AS_LOADED rows skip that pass.

struct TokenRows {  // x[slot_token[s]][j]: the tokens' inputs, gathered
    static constexpr bool STAGED_AS_LOADED = true;
    const floatX* x;
    const int* slot_token;
    int width;
    __device__ const floatX* row(int s) const { return x + (size_t)slot_token[s] * width; }
    __device__ floatX finish(int, floatX v) const { return v; }
};
struct GatedTokenRows {  // gate[s] * dy[slot_token[s]][j]: the gradient at an expert's output
    static constexpr bool STAGED_AS_LOADED = false;
    const floatX* dy;
    const int* slot_token;
    const float* gate;
    int width;
    __device__ const floatX* row(int s) const { return dy + (size_t)slot_token[s] * width; }
    __device__ floatX finish(int s, floatX v) const { return from_float<floatX>(gate[s] * (float)v); }
};
struct Relu2Rows {  // relu(pre[s][j])^2: the hidden activation, recomputed from the pre-activation
    static constexpr bool STAGED_AS_LOADED = false;
    const floatX* pre;
    int width;
    __device__ const floatX* row(int s) const { return pre + (size_t)s * width; }
    __device__ floatX finish(int, floatX v) const {
        const float p = fmaxf((float)v, 0.0f);
        return from_float<floatX>(p * p);
    }
};
struct SlotRows {  // m[s][j]
    static constexpr bool STAGED_AS_LOADED = true;
    const floatX* m;
    int width;
    __device__ const floatX* row(int s) const { return m + (size_t)s * width; }
    __device__ floatX finish(int, floatX v) const { return v; }
};

static const int EXPERT_BN = 64, EXPERT_BK = 32, EXPERT_THREADS = 256;
// Blocks of expert_matmul_kernel resident on one SM: its __launch_bounds__
// keep the registers to what that many blocks of 256 threads can hold, and
// that many times its shared memory (20 KB in BF16, 40 KB in FP32) fits an
// SM of sm_80 or later. BF16: 4 blocks, 64 registers a thread, no spills;
// the FP32 build (the tests' exact path) spills at 3 blocks' 80 and runs 2.
#ifdef ENABLE_FP32
static const int EXPERT_BLOCKS_PER_SM = 2;
#else
static const int EXPERT_BLOCKS_PER_SM = 4;
#endif
// The copies move chunks of CHUNK consecutive elements (16 bytes in BF16, 32
// in FP32: whole 16-byte cp.async), so every width (C and 2C) must be a
// multiple of CHUNK (router_allocate checks). A stage of 64 x 32 elements is
// 256 chunks: one per thread.
static const int CHUNK = 8;
// Row strides of the staged panels, padded by 8 elements: a panel 32 wide
// (64 rows by K) and one 64 wide (32 K rows by 64). TILE_LD is also the
// fp32 output tile's.
static const int PANEL_LD = EXPERT_BK + 8, TILE_LD = EXPERT_BN + 8;
static const int STAGE_ELEMS = EXPERT_TILE * PANEL_LD;  // one operand's panel, either shape (64 x 40 >= 32 x 72)
static_assert(EXPERT_TILE == 64 && EXPERT_BN == 64 && EXPERT_BK == 32 && EXPERT_THREADS == 256,
              "TileAccumulator's layout (a 64 x 64 tile, 8 warps or 16 x 16 threads, k in steps of 16) and one "
              "chunk per thread per operand and K step");
static_assert(EXPERT_BK * TILE_LD <= STAGE_ELEMS, "a 32 x 64 panel fits a stage");
static_assert(PANEL_LD % 8 == 0 && TILE_LD % 8 == 0 && 16 * PANEL_LD * sizeof(floatX) % 32 == 0 &&
                  16 * TILE_LD * sizeof(floatX) % 32 == 0 && 16 * TILE_LD * sizeof(float) % 32 == 0 &&
                  STAGE_ELEMS * sizeof(floatX) % 32 == 0 && PANEL_LD * sizeof(floatX) % 16 == 0 &&
                  TILE_LD * sizeof(floatX) % 16 == 0,
              "wmma: ldm a multiple of 8 elements, fragments 32-byte aligned; cp.async: 16-byte aligned rows");

// The shared memory of one expert kernel block: two stages of both operands,
// and the fp32 output tile, which reuses them once the K loop is done.
static constexpr size_t EXPERT_SMEM = std::max(4 * STAGE_ELEMS * sizeof(floatX), EXPERT_TILE * TILE_LD * sizeof(float));

// Stages CHUNK consecutive elements from global src to shared dst by
// cp.async (landing at the __pipeline_wait_prior that covers the next
// commit), or zeros when the chunk lies outside the operand (plain stores,
// visible at the next barrier).
__device__ __forceinline__ void stage_chunk(floatX* dst, const floatX* src, bool inside) {
#pragma unroll
    for (int b = 0; b < CHUNK * (int)sizeof(floatX); b += 16) {
        if (inside) __pipeline_memcpy_async((char*)dst + b, (const char*)src + b, 16);
        else *(uint4*)((char*)dst + b) = make_uint4(0, 0, 0, 0);
    }
}
// The rows' finish on a chunk this thread staged, once it has landed (a row
// outside the operand stays zero).
template <class Rows>
__device__ __forceinline__ void finish_chunk(floatX* chunk, const Rows& rows, int s, bool inside) {
    if constexpr (!Rows::STAGED_AS_LOADED) {
        if (!inside) return;
#pragma unroll
        for (int i = 0; i < CHUNK; i++) chunk[i] = rows.finish(s, chunk[i]);
    }
}

// The product of two staged panels, accumulated over the K steps:
// acc (64 x 64) += A B, A (64 x EXPERT_BK) and B (EXPERT_BK x 64) in shared
// memory, each stored row-major (element (m, k) at a[m * lda + k]) or
// column-major (at a[k * lda + m]) as its copies found it contiguous.
// The FP32 build multiplies exact fp32 on CUDA cores (the tight tests), the
// BF16 build uses the tensor cores.
#ifdef ENABLE_FP32
struct TileAccumulator {
    float acc[4][4] = {};  // thread (ty, tx) of 16 x 16 owns rows 4ty..4ty+3, columns 4tx..4tx+3
    template <bool A_ROW_MAJOR, bool B_ROW_MAJOR>
    __device__ void multiply_add(const floatX* a, int lda, const floatX* b, int ldb) {
        const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
        for (int kk = 0; kk < EXPERT_BK; kk++) {
            float av[4], bv[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int m = ty * 4 + i, n = tx * 4 + i;
                av[i] = A_ROW_MAJOR ? a[m * lda + kk] : a[kk * lda + m];
                bv[i] = B_ROW_MAJOR ? b[kk * ldb + n] : b[n * ldb + kk];
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
        }
    }
    __device__ void store(float (*out)[TILE_LD]) const {
        const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) out[ty * 4 + i][tx * 4 + j] = acc[i][j];
    }
};
#else
// wmma 16 x 16 x 16, bf16 in, fp32 accumulate: warp w of 8 owns rows
// 16 (w / 2) .. +15 and columns 32 (w % 2) .. +31 (two fragments).
struct TileAccumulator {
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];
    __device__ TileAccumulator() {
        nvcuda::wmma::fill_fragment(acc[0], 0.0f);
        nvcuda::wmma::fill_fragment(acc[1], 0.0f);
    }
    template <bool A_ROW_MAJOR, bool B_ROW_MAJOR>
    __device__ void multiply_add(const floatX* a, int lda, const floatX* b, int ldb) {
        using namespace nvcuda;
        using LayoutA = std::conditional_t<A_ROW_MAJOR, wmma::row_major, wmma::col_major>;
        using LayoutB = std::conditional_t<B_ROW_MAJOR, wmma::row_major, wmma::col_major>;
        const int warp = threadIdx.x / WARP, row = 16 * (warp / 2), col = 32 * (warp % 2);
#pragma unroll
        for (int kk = 0; kk < EXPERT_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, floatX, LayoutA> fa;
            wmma::load_matrix_sync(fa, A_ROW_MAJOR ? a + row * lda + kk : a + kk * lda + row, lda);
#pragma unroll
            for (int f = 0; f < 2; f++) {
                const int n = col + 16 * f;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, floatX, LayoutB> fb;
                wmma::load_matrix_sync(fb, B_ROW_MAJOR ? b + kk * ldb + n : b + n * ldb + kk, ldb);
                wmma::mma_sync(acc[f], fa, fb, acc[f]);
            }
        }
    }
    __device__ void store(float (*out)[TILE_LD]) const {
        const int warp = threadIdx.x / WARP, row = 16 * (warp / 2), col = 32 * (warp % 2);
        for (int f = 0; f < 2; f++)
            nvcuda::wmma::store_matrix_sync(&out[row][col + 16 * f], acc[f], TILE_LD, nvcuda::wmma::mem_row_major);
    }
};
#endif

// out[s][o] = sum_j rows(s, j) * W_e(o, j) for every routed slot s, its
// expert e and all OC outputs o. W_e is weights + e*OC*IC, stored (OC, IC)
// when OUT_BY_IN, else (IC, OC) (the backward's products with the
// untransposed weight). RELU2_GRAD multiplies by relu2'(pre[s][o]) =
// 2 relu(pre[s][o]) on the way out (dpre from dact).
// Work items: (row tile of EXPERT_TILE slots of one expert, EXPERT_BN output
// columns), numbered row tile by row tile, *num_tiles x ceil(OC / EXPERT_BN)
// of them; every item costs the same (one pass over IC).
// Grid: persistent, 1-D, at most one wave (SMs x EXPERT_BLOCKS_PER_SM
// blocks; fewer when the host's bound on the items is smaller); block b
// takes items b, b + gridDim.x, ... below the real count. So the host's
// bound (ET without the clamp: N*E pairs, N*E/64 row tiles, almost all
// empty) costs nothing: no block is scheduled for an empty tile, where one
// block per bound tile would launch about 200k blocks at d12 that only read
// num_tiles and leave. Neighbouring blocks take the column tiles of one row
// tile (its rows and its expert's weights shared in L2).
// Per item, K steps of 32, two in flight: each thread copies one 8-element
// chunk of the 64 rows (row r = tid / 4, row-major, the gathered row's
// address from rows.row) and one of the 64 weight columns (stored rows
// contiguous along j for (OC, IC): column-major B; along o for (IC, OC):
// row-major B) for step i + 1 by cp.async, then waits for its step i
// copies, finishes its row chunk (gate, ReLU^2), and after a barrier
// TileAccumulator multiplies step i. The 64 x 64 result leaves through
// shared memory (over the stages), written row by row. Traffic: each weight
// tile is read once per row tile, each row once per output tile.
template <class Rows, bool OUT_BY_IN, bool RELU2_GRAD>
__global__ void __launch_bounds__(EXPERT_THREADS, EXPERT_BLOCKS_PER_SM)
expert_matmul_kernel(floatX* out, Rows rows, const floatX* weights, const floatX* pre, const int* tile_expert,
                     const int* tile_row, const int* num_tiles, const int* offsets, int IC, int OC) {
    __shared__ __align__(128) unsigned char smem[EXPERT_SMEM];
    floatX* As = (floatX*)smem;          // [2][64][PANEL_LD]: rows by k
    floatX* Ws = As + 2 * STAGE_ELEMS;   // [2]: [64][PANEL_LD] o by k (OUT_BY_IN), else [32][TILE_LD] k by o
    float(*Cs)[TILE_LD] = (float(*)[TILE_LD])smem;
    const int ldw = OUT_BY_IN ? PANEL_LD : TILE_LD;
    // this thread's chunks: row a_row, elements a_k..+7 of the K step; weight
    // chunk at (w_major, w_minor) of the stored layout
    const int a_row = threadIdx.x / 4, a_k = threadIdx.x % 4 * CHUNK;
    const int w_major = OUT_BY_IN ? threadIdx.x / 4 : threadIdx.x / 8;
    const int w_minor = OUT_BY_IN ? threadIdx.x % 4 * CHUNK : threadIdx.x % 8 * CHUNK;
    const int col_tiles = (OC + EXPERT_BN - 1) / EXPERT_BN, items = *num_tiles * col_tiles;
    const int steps = (IC + EXPERT_BK - 1) / EXPERT_BK;
    for (int item = blockIdx.x; item < items; item += gridDim.x) {
        const int tile = item / col_tiles, col0 = item % col_tiles * EXPERT_BN;
        const int e = tile_expert[tile], row0 = tile_row[tile], row_end = offsets[e + 1];
        const floatX* W = weights + (size_t)e * OC * IC;
        const int s = row0 + a_row;
        const floatX* a_src = s < row_end ? rows.row(s) : nullptr;
        TileAccumulator acc;
        // iteration i starts step i's copies (none at i = steps) and multiplies step i - 1
        for (int step = 0; step <= steps; step++) {
            if (step < steps) {
                floatX* a_dst = As + step % 2 * STAGE_ELEMS + a_row * PANEL_LD + a_k;
                const int j = step * EXPERT_BK + a_k;
                stage_chunk(a_dst, a_src && j < IC ? a_src + j : nullptr, a_src && j < IC);
                // OUT_BY_IN: output o = col0 + w_major, k = w_minor; else k = w_major, o = col0 + w_minor
                const int o = col0 + (OUT_BY_IN ? w_major : w_minor);
                const int jw = step * EXPERT_BK + (OUT_BY_IN ? w_minor : w_major);
                const bool w_inside = o < OC && jw < IC;
                const floatX* w_src = !w_inside ? nullptr : OUT_BY_IN ? W + (size_t)o * IC + jw : W + (size_t)jw * OC + o;
                stage_chunk(Ws + step % 2 * STAGE_ELEMS + w_major * ldw + w_minor, w_src, w_inside);
            }
            __pipeline_commit();  // empty at step = steps: step - 1's batch is always the second most recent
            if (step == 0) continue;
            __pipeline_wait_prior(1);
            const int buf = (step - 1) % 2, j = (step - 1) * EXPERT_BK + a_k;
            finish_chunk(As + buf * STAGE_ELEMS + a_row * PANEL_LD + a_k, rows, s, a_src && j < IC);
            __syncthreads();  // every thread's chunks of step - 1 have landed
            acc.multiply_add<true, !OUT_BY_IN>(As + buf * STAGE_ELEMS, PANEL_LD, Ws + buf * STAGE_ELEMS, ldw);
            __syncthreads();  // step - 1's stage is read before step + 1 copies over it
        }
        acc.store(Cs);
        __syncthreads();
        for (int i = threadIdx.x; i < EXPERT_TILE * EXPERT_BN; i += EXPERT_THREADS) {
            const int r = i / EXPERT_BN, o = col0 + i % EXPERT_BN, so = row0 + r;
            if (so >= row_end || o >= OC) continue;
            float v = Cs[r][i % EXPERT_BN];
            if (RELU2_GRAD) v *= 2.0f * fmaxf((float)pre[(size_t)so * OC + o], 0.0f);
            out[(size_t)so * OC + o] = from_float<floatX>(v);
        }
        __syncthreads();  // every thread has read Cs before the next item stages over it
    }
}

// dW_e(o, j) += sum over expert e's slots s of grad(s, o) * input(s, j), with
// dW_e the fp32 (OC, IC) slice dweights + e*OC*IC. Grid (IC / 64, OC / 64, E):
// each block owns a 64 x 64 tile of one expert's gradient and walks that
// expert's slots in order, 32 at a time (one owner, a fixed order: no
// atomics), two steps in flight as in expert_matmul_kernel: each thread
// copies one 8-element chunk of a grad row (slot kk = tid / 8) and one of
// the same slot's input row per step, both panels K (slot) by 64, so A is
// column-major and B row-major. An expert with no tokens adds nothing: its
// blocks leave at once (E x (IC / 64) x (OC / 64) blocks in all, not a
// bound that grows with N). Traffic: each slot's rows are read once per
// output tile.
template <class GradRows, class InputRows>
__global__ void __launch_bounds__(EXPERT_THREADS)
expert_weight_grad_kernel(float* dweights, GradRows grad, InputRows input, const int* offsets, int OC, int IC) {
    const int e = blockIdx.z, o0 = blockIdx.y * EXPERT_TILE, j0 = blockIdx.x * EXPERT_BN;
    const int first = offsets[e], end = offsets[e + 1];
    if (first == end) return;
    __shared__ __align__(128) unsigned char smem[EXPERT_SMEM];
    floatX* Gs = (floatX*)smem;          // [2][32][TILE_LD]: slots by o
    floatX* Xs = Gs + 2 * STAGE_ELEMS;   // [2][32][TILE_LD]: slots by j
    float(*Cs)[TILE_LD] = (float(*)[TILE_LD])smem;
    const int kk = threadIdx.x / 8, c = threadIdx.x % 8 * CHUNK;  // this thread's chunks: slot kk, elements c..+7
    const int steps = (end - first + EXPERT_BK - 1) / EXPERT_BK;
    TileAccumulator acc;
    // iteration i starts step i's copies (none at i = steps) and multiplies step i - 1
    for (int step = 0; step <= steps; step++) {
        if (step < steps) {
            const int s = first + step * EXPERT_BK + kk, buf = step % 2;
            const bool g_inside = s < end && o0 + c < OC, x_inside = s < end && j0 + c < IC;
            stage_chunk(Gs + buf * STAGE_ELEMS + kk * TILE_LD + c, g_inside ? grad.row(s) + o0 + c : nullptr, g_inside);
            stage_chunk(Xs + buf * STAGE_ELEMS + kk * TILE_LD + c, x_inside ? input.row(s) + j0 + c : nullptr, x_inside);
        }
        __pipeline_commit();  // empty at step = steps: step - 1's batch is always the second most recent
        if (step == 0) continue;
        __pipeline_wait_prior(1);
        const int s = first + (step - 1) * EXPERT_BK + kk, buf = (step - 1) % 2;
        finish_chunk(Gs + buf * STAGE_ELEMS + kk * TILE_LD + c, grad, s, s < end && o0 + c < OC);
        finish_chunk(Xs + buf * STAGE_ELEMS + kk * TILE_LD + c, input, s, s < end && j0 + c < IC);
        __syncthreads();  // every thread's chunks of step - 1 have landed
        acc.multiply_add<false, true>(Gs + buf * STAGE_ELEMS, TILE_LD, Xs + buf * STAGE_ELEMS, TILE_LD);
        __syncthreads();  // step - 1's stage is read before step + 1 copies over it
    }
    acc.store(Cs);
    __syncthreads();
    float* dW = dweights + (size_t)e * OC * IC;
    for (int i = threadIdx.x; i < EXPERT_TILE * EXPERT_BN; i += EXPERT_THREADS) {
        const int o = o0 + i / EXPERT_BN, j = j0 + i % EXPERT_BN;
        if (o < OC && j < IC) dW[(size_t)o * IC + j] += Cs[i / EXPERT_BN][i % EXPERT_BN];
    }
}

// ----------------------------------------------------------------------------
// 4. Combine, the gate's gradient, balancing, the cutoff EMA.

// y[n][c] = base[n][c] + sum over token n's routed experts e, in expert
// order, of w * rows[slot_of[n][e]][c], w = slot_gate[slot] (or 1 when
// slot_gate is null). Forward: y = the shared expert's output plus the gated
// expert outputs. Backward: dh += each expert's input gradient. y may be
// base. One block per token; its slots and gates staged in shared memory
// (8E bytes); reads the token's rows once, writes its row once.
__global__ void moe_combine_kernel(floatX* y, const floatX* base, const floatX* rows, const int* slot_of,
                                   const float* slot_gate, int E, int C) {
    extern __shared__ int combine_smem[];
    int* slots = combine_smem;
    float* weights = (float*)(combine_smem + E);
    const int n = blockIdx.x;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const int s = slot_of[(size_t)n * E + e];
        slots[e] = s;
        weights[e] = s < 0 ? 0.0f : slot_gate ? slot_gate[s] : 1.0f;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = (float)base[(size_t)n * C + c];
        for (int e = 0; e < E; e++)
            if (slots[e] >= 0) acc += weights[e] * (float)rows[(size_t)slots[e] * C + c];
        y[(size_t)n * C + c] = from_float<floatX>(acc);
    }
}

// The gate's gradient for the objective sum(y * dy):
//   dr[n][e] = (dy_n . out_s) p (1 - p) for a routed pair (slot s, gate p), else 0.
// One warp per token; lanes stride over C, a fixed shuffle tree sums.
__global__ void gate_backward_kernel(float* dr, const floatX* dy, const floatX* expert_out, const int* slot_of,
                                     const float* slot_gate, int N, int E, int C) {
    const int n = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
    if (n >= N) return;
    for (int e = 0; e < E; e++) {
        const int s = slot_of[(size_t)n * E + e];
        float dot = 0.0f;
        if (s >= 0)
            for (int c = lane; c < C; c += WARP) dot += (float)dy[(size_t)n * C + c] * (float)expert_out[(size_t)s * C + c];
        for (int offset = WARP / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        if (lane == 0) dr[(size_t)n * E + e] = s >= 0 ? dot * slot_gate[s] * (1.0f - slot_gate[s]) : 0.0f;
    }
}

// TC aux loss, step 1: gate_mean[e] = the sum over this rank's tokens of
// sigmoid(r[n][e]) / N_all (N_all = N on one rank; with several, summing
// the ranks' results gives the mean over all their tokens), summed in a
// fixed order at two levels, so it is the same bits every run.
// Level 1, gate_partial_kernel: gate_partial[e][tile] = the sum over the
// tile's DISPATCH_TILE tokens. Layout: one block per tile (256 blocks at
// N = 32k); for a span of `width` experts (all of them for E <= 256), thread
// i owns expert i % width and the rows i / width, + groups, ... of the tile
// (groups = DISPATCH_THREADS / width), so consecutive threads read
// consecutive floats of a row (coalesced); the groups' sums then meet in
// shared memory and the expert's thread adds them in group order. Memory:
// the logits read once, E floats written per tile.
__global__ void __launch_bounds__(DISPATCH_THREADS)
gate_partial_kernel(float* gate_partial, const float* logits, int N, int E) {
    __shared__ float group_sum[DISPATCH_THREADS];
    const int tile = blockIdx.x, tiles = gridDim.x;
    const int first = tile * DISPATCH_TILE, rows = min(DISPATCH_TILE, N - first);
    for (int e0 = 0; e0 < E; e0 += DISPATCH_THREADS) {
        const int width = min(DISPATCH_THREADS, E - e0), groups = DISPATCH_THREADS / width;
        const int j = threadIdx.x % width, group = threadIdx.x / width;
        if (group < groups) {
            float sum = 0.0f;
            for (int n = group; n < rows; n += groups) sum += sigmoidf(logits[(size_t)(first + n) * E + e0 + j]);
            group_sum[group * width + j] = sum;
        }
        __syncthreads();
        if ((int)threadIdx.x < width) {
            float sum = 0.0f;
            for (int gr = 0; gr < groups; gr++) sum += group_sum[gr * width + threadIdx.x];
            gate_partial[(size_t)(e0 + threadIdx.x) * tiles + tile] = sum;
        }
        __syncthreads();  // group_sum is read before the next span writes it
    }
}

// Level 2: gate_mean[e] = (the sum of gate_partial[e][...] over the tiles) / N_all.
// One block per expert, a fixed-order block reduction over its tiles (a
// contiguous row of floats).
__global__ void __launch_bounds__(DISPATCH_THREADS)
gate_mean_kernel(float* gate_mean, const float* gate_partial, int tiles, int N_all) {
    using BlockReduce = cub::BlockReduce<float, DISPATCH_THREADS>;
    __shared__ typename BlockReduce::TempStorage reduce;
    const int e = blockIdx.x;
    float sum = 0.0f;
    for (int t = threadIdx.x; t < tiles; t += DISPATCH_THREADS) sum += gate_partial[(size_t)e * tiles + t];
    sum = BlockReduce(reduce).Sum(sum);
    if (threadIdx.x == 0) gate_mean[e] = sum / N_all;
}

// Step 2: aux_sum += alpha * sum_e f_e P_e, f_e = (E/N) * count_e, P_e =
// gate_mean[e], over the N tokens the counts and means are of (with several
// ranks: all ranks' tokens). One thread, experts in order.
__global__ void aux_loss_kernel(float* aux_sum, const float* gate_mean, const int* counts, int N, int E, float alpha) {
    float loss = 0.0f;
    for (int e = 0; e < E; e++) loss += (float)E / N * counts[e] * gate_mean[e];
    *aux_sum += alpha * loss;
}

// Its gradient (f_e counts a selection: constant): dr[n][e] += weight *
// alpha * f_e * p (1 - p) / N_all for this rank's n tokens, f_e and N_all as
// in the loss, weight = d(objective)/d(this aux loss). One thread per pair.
__global__ void aux_loss_backward_kernel(float* dr, const float* logits, const int* counts, int n, int N_all, int E,
                                         float alpha, float weight) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * E) return;
    const int e = (int)(i % E);
    const float p = sigmoidf(logits[i]), f = (float)E / N_all * counts[e];
    dr[i] += weight * alpha * f * p * (1.0f - p) / N_all;
}

// End of a step, EC and ET: raw[l][e] = beta raw + (1 - beta) mean, mean =
// the step's EC cutoffs kth_sum[l][e] / micro_steps (stats_float holds each
// layer's kth_sum first, `stride` floats per layer). One thread per (l, e).
__global__ void cutoff_update_kernel(float* raw, const float* stats_float, int E, int stride, int layers, float beta,
                                     int micro_steps) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= layers * E) return;
    const int l = i / E, e = i % E;
    const float mean = stats_float[(size_t)l * stride + e] / micro_steps;
    // rounded as the reference rounds it (no fused multiply-add): the cutoffs
    // and so the routing stay bit-identical to the CPU's
    raw[i] = __fadd_rn(__fmul_rn(beta, raw[i]), __fmul_rn(1.0f - beta, mean));
}

// End of a step, TC loss-free: b[l][e] += u * sign(mean_count - count_e),
// the sign taken in integers as sign(total - E * count_e), with the counts
// summed over the step (stats_int holds each layer's counts first). One
// thread per (l, e).
__global__ void lossfree_bias_kernel(float* bias, const int* stats_int, int E, int stride, int layers, float rate) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= layers * E) return;
    const int* counts = stats_int + (size_t)(i / E) * stride;
    int64_t total = 0;
    for (int e = 0; e < E; e++) total += counts[e];
    const int64_t surplus = total - (int64_t)E * counts[i % E];
    bias[i] += rate * (float)((surplus > 0) - (surplus < 0));
}

// The router's logits, r = h W_r^T: r[n][e] = sum_c h[n][c] W[e][c] with h
// in the activations' precision and W and every sum in fp32 (the products
// of an fp32 GEMM on h converted to fp32, a conversion that is exact).
// Layout: a warp owns ROUTER_TOKENS tokens and ROUTER_EXPERTS experts at a
// time; lane l takes the columns l, l + 32, ...; the lanes' partial sums are
// added by a butterfly, the same on every lane and in every schedule.
// Memory: h read once (2 bytes an element in the BF16 build, where
// converting it for an fp32 GEMM moves 2 + 4 + 4), W from L1/L2 once per
// ROUTER_TOKENS tokens, a warp's reads of h and W 32 consecutive elements.
static const int ROUTER_TOKENS = 4, ROUTER_EXPERTS = 16, ROUTER_THREADS = 256;
__global__ void __launch_bounds__(ROUTER_THREADS)
router_logits_kernel(float* logits, const floatX* h, const float* w, int N, int C, int E) {
    const int lane = threadIdx.x % WARP;
    const int n0 = (int)(((size_t)blockIdx.x * blockDim.x + threadIdx.x) / WARP) * ROUTER_TOKENS;
    if (n0 >= N) return;  // the whole warp
    for (int e0 = 0; e0 < E; e0 += ROUTER_EXPERTS) {
        const int experts = min(ROUTER_EXPERTS, E - e0);
        float acc[ROUTER_TOKENS][ROUTER_EXPERTS] = {};
        for (int c = lane; c < C; c += WARP) {
            float x[ROUTER_TOKENS];
            for (int t = 0; t < ROUTER_TOKENS; t++) x[t] = n0 + t < N ? (float)h[(size_t)(n0 + t) * C + c] : 0.0f;
            for (int e = 0; e < ROUTER_EXPERTS; e++) {
                if (e >= experts) break;
                const float we = w[(size_t)(e0 + e) * C + c];
                for (int t = 0; t < ROUTER_TOKENS; t++) acc[t][e] += x[t] * we;
            }
        }
        for (int t = 0; t < ROUTER_TOKENS; t++)
            for (int e = 0; e < ROUTER_EXPERTS; e++) {
                const float sum = warp_sum(acc[t][e]);
                if (lane == (t * ROUTER_EXPERTS + e) % WARP && n0 + t < N && e < experts)
                    logits[(size_t)(n0 + t) * E + e0 + e] = sum;
            }
    }
}

// The router's input as fp32 for its backward's GEMMs, and the router's
// input gradient added back into the bf16 stream.
__global__ void to_float_kernel(float* out, const floatX* inp, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = (float)inp[i];
}
__global__ void add_float_kernel(floatX* y, const float* x, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = from_float<floatX>((float)y[i] + x[i]);
}

// ----------------------------------------------------------------------------
// 5. The router: buffers, state, statistics, and the layer's passes.

// One layer's routing of one micro-batch: what the forward pass leaves for
// the backward pass. Eval and generation passes use layer 0's set.
struct MoeBuffers {
    int capacity = 0, max_tiles = 0;  // routed pairs it can hold; row tiles for that many
    int launch_tiles = 0;             // the most row tiles the current pass can have (host's bound): caps the expert grid
    float* logits = nullptr;          // (N, E) fp32 router logits; (ranks x N, E) where the pool spans the ranks
    float* own_logits = nullptr;      // this rank's (N, E) of them in a training pass
    int* slot_of = nullptr;           // (N, E) slot of each routed pair, -1 if not routed
    int* slot_token = nullptr;        // (capacity) token of each slot
    float* slot_gate = nullptr;       // (capacity) sigmoid(r) of each slot
    int* offsets = nullptr;           // (E + 1) first slot of each expert; [E] = all routed pairs
    int *tile_expert = nullptr, *tile_row = nullptr, *num_tiles = nullptr;  // the expert kernels' row tiles
    floatX* expert_pre = nullptr;     // (capacity, 2C) pre-activations
    floatX* expert_out = nullptr;     // (capacity, C) outputs, before the gate
};

// How one forward pass routes.
enum class Routing { TopK, Choice, Threshold };
enum class RoutingPass { Train, Eval, Generate };

struct Router {
    RouterConfig config;
    int E = 0, C = 0, B = 0, T = 0;
    // data parallel: this rank of `ranks`, each routing its own B x T tokens.
    // EC and ET with -ep global pool every rank's tokens: the logits are
    // gathered and every rank selects over all of them, the same selection
    // bit for bit; TC sums its counts and gate means over the ranks.
    int ranks = 1, rank = 0;
    MultiGpu* multi = nullptr;
    std::vector<int> layers;         // the model layer of each MoE layer
    std::vector<MoeBuffers> train;   // per MoE layer; eval and generation passes use train[0]
    // state, saved in checkpoints: (layers, E) each
    float *raw_cutoff = nullptr, *tc_bias = nullptr;
    int updates = 0;  // cutoff EMA updates so far (host; EC and ET track cutoffs)
    // the step: its statistics per layer, reset at its start
    int step = 0, micro_steps = 0;
    float aux_weight = 0.0f;         // d(objective)/d(one micro-batch's aux loss)
    int* stats_int = nullptr;        // per layer: counts[E], fanout[4], clamped
    int* dropped = nullptr;          // routed pairs past a buffer's capacity, ever (0 unless something broke)
    float* stats_float = nullptr;    // per layer: kth_sum[E], aux_sum
    // scratch shared by the layers
    uint8_t* mask = nullptr;         // (N, E)
    // the routes of one sequence, layer by layer, for the routing pictures
    // (train_et -rf): (layers, T, E), filled by an eval or generation pass of
    // one sequence while record_routes is set
    uint8_t* route_record = nullptr;
    bool record_routes = false;
    int* counts = nullptr;           // (E)
    int* aux_counts = nullptr;       // (layers, E) TC aux: each layer's counts (summed over the ranks)
    int* tile_counts = nullptr;      // (E, dispatch_tiles(N)): expert_count's per-tile counts, then first ranks
    SelectScratch select;            // the EC / ET pool selection's scratch
    float *kth = nullptr, *gate_mean = nullptr, *dr = nullptr, *h32 = nullptr;  // (pools, E), (E), (N, E), (N, C)
    float* gate_partial = nullptr;   // (E, dispatch_tiles(N)): gate_mean's per-tile sums
    floatX *grad_pre = nullptr, *grad_x = nullptr;  // (train capacity, 2C), (train capacity, C)
    size_t bytes = 0;

    int stats_int_stride() const { return E + 5; }
    int stats_float_stride() const { return E + 1; }
    bool pools_ranks() const { return ranks > 1 && config.kind != RouterKind::TC && config.ec_pool == EcPool::Global; }
    bool sums_ranks() const { return ranks > 1 && config.kind == RouterKind::TC; }
    // how many ranks' statistics router_share_stats adds up (1: the pool
    // spans the ranks, so every rank already holds the global ones)
    int stats_ranks() const { return ranks > 1 && !pools_ranks() ? ranks : 1; }
};

// The EMA's bias correction 1 - beta^updates, in float as the reference has it.
inline float cutoff_correction(const Router& r) {
    return 1.0f - powf((float)r.config.et_beta, (float)r.updates);
}

// The ranks whose tokens a pass selects over: every rank's for a training
// pass pooled over them, else this rank's alone (eval and generation route
// their own tokens).
inline int pass_ranks(const Router& r, RoutingPass pass) {
    return pass == RoutingPass::Train && r.pools_ranks() ? r.ranks : 1;
}

// Tokens per pool and each expert's target k in it, for a pass of B x T.
// Training shapes give a whole k (train_et checks); a generation pass of one
// short sequence may not, and takes k = max(1, floor).
inline void pool_shape(const Router& r, RoutingPass pass, int B, int T, int* pool, int* k) {
    *pool = (int)routing_pool_tokens(r.config.ec_pool, B, T, pass_ranks(r, pass));
    *k = std::max<int>(1, (int)((int64_t)*pool * r.config.top_k / r.E));
}

inline Routing pass_routing(const Router& r, RoutingPass pass) {
    if (r.config.kind == RouterKind::TC) return Routing::TopK;
    // no cutoff exists before the first update: route by EC until then
    if (r.updates == 0) return Routing::Choice;
    if (pass == RoutingPass::Train)
        return r.config.kind == RouterKind::EC || r.step < r.config.et_warmup_steps ? Routing::Choice
                                                                                   : Routing::Threshold;
    if (pass == RoutingPass::Eval && r.config.eval_routing == EvalRouting::Batch) return Routing::Choice;
    return Routing::Threshold;
}

// What routes a training step now, for the log.
inline const char* router_routing_now(const Router& r) {
    if (r.layers.empty()) return "";
    Routing how = pass_routing(r, RoutingPass::Train);
    if (r.config.kind == RouterKind::ET && how == Routing::Choice) return "ec (et warm-up)";
    return router_name(r.config.kind);
}

// The most routed pairs a pass can produce on this rank's B x T tokens (the
// host's bound; the device knows the real count). A pool over every rank's
// tokens may give all of an expert's picks to one rank: at most min(k, N).
inline int64_t routed_pairs_bound(const Router& r, RoutingPass pass, Routing how, int B, int T) {
    const int64_t N = (int64_t)B * T;
    int pool, k;
    pool_shape(r, pass, B, T, &pool, &k);
    if (how == Routing::TopK) return N * r.config.top_k;
    const int64_t pools = std::max<int64_t>(1, N / pool), tokens = std::min<int64_t>(pool, N);
    if (how == Routing::Choice) return pools * r.E * std::min<int64_t>(k, tokens);
    if (pass != RoutingPass::Train || r.config.capacity < 0) return N * r.E;
    int lo, hi;
    et_capacity_bounds(k, r.config.capacity, &lo, &hi);
    return pools * r.E * std::min<int64_t>(hi, tokens);
}

// Buffers for N tokens of this rank; the logits for `ranks` x N (rank
// `rank`'s block its own) where the routing pool spans the ranks.
inline MoeBuffers moe_buffers_allocate(int64_t N, int E, int C, int64_t capacity, size_t* bytes, int ranks = 1,
                                       int rank = 0) {
    if (capacity > INT32_MAX) fail("MoE: %lld routed pairs per micro-batch do not fit int32 slots; use a smaller -b",
                                   (long long)capacity);
    MoeBuffers b;
    b.capacity = (int)capacity;
    b.max_tiles = (int)((capacity + EXPERT_TILE - 1) / EXPERT_TILE + E);
    b.logits = device_alloc<float>(ranks * N * E, bytes);
    b.own_logits = b.logits ? b.logits + rank * N * E : nullptr;
    b.slot_of = device_alloc<int>(N * E, bytes);
    b.slot_token = device_alloc<int>(capacity, bytes);
    b.slot_gate = device_alloc<float>(capacity, bytes);
    b.offsets = device_alloc<int>(E + 1, bytes);
    b.tile_expert = device_alloc<int>(b.max_tiles, bytes);
    b.tile_row = device_alloc<int>(b.max_tiles, bytes);
    b.num_tiles = device_alloc<int>(1, bytes);
    b.expert_pre = device_alloc<floatX>(capacity * 2 * C, bytes);
    b.expert_out = device_alloc<floatX>(capacity * C, bytes);
    return b;
}

inline void moe_buffers_free(MoeBuffers& b) {
    for (void* p : {(void*)b.logits, (void*)b.slot_of, (void*)b.slot_token, (void*)b.slot_gate, (void*)b.offsets,
                    (void*)b.tile_expert, (void*)b.tile_row, (void*)b.num_tiles, (void*)b.expert_pre,
                    (void*)b.expert_out})
        cudaCheck(cudaFree(p));
}

// Allocates the router of every MoE layer for micro-batches of B x T on
// rank `rank` of `ranks`, once. config.router.et_warmup_steps must be
// resolved (et_warmup_steps()) first.
inline void router_allocate(Router* r, const ModelConfig& c, int B, int T, int ranks = 1, int rank = 0) {
    r->config = c.router;
    r->ranks = ranks;
    r->rank = rank;
    if (r->config.et_warmup_steps < 0) fail("internal: resolve the ET warm-up (et_warmup_steps) before allocating");
    r->E = c.n_experts;
    r->C = c.n_embd;
    r->B = B;
    r->T = T;
    if (c.n_experts > 0 && c.n_embd % CHUNK != 0)
        fail("MoE: the expert kernels copy rows in chunks of %d elements, so the width (-m's n_embd %d) must be a "
             "multiple of %d", CHUNK, c.n_embd, CHUNK);
    r->layers.clear();
    for (int l = 0; l < c.n_layer; l++)
        if (c.is_moe_layer(l)) r->layers.push_back(l);
    const int64_t N = (int64_t)B * T, E = r->E, C = r->C, L = (int64_t)r->layers.size();
    const int64_t pooled = r->pools_ranks() ? ranks : 1;  // ranks whose logits a training pass selects over
    // the training capacity: the most pairs any training pass can route
    const Routing first = r->config.kind == RouterKind::TC ? Routing::TopK : Routing::Choice;  // EC, ET's warm-up
    int64_t capacity = routed_pairs_bound(*r, RoutingPass::Train, first, B, T);
    if (r->config.kind == RouterKind::ET)
        capacity = std::max(capacity, routed_pairs_bound(*r, RoutingPass::Train, Routing::Threshold, B, T));
    size_t bytes = 0;
    for (int64_t l = 0; l < L; l++)
        r->train.push_back(moe_buffers_allocate(N, r->E, r->C, capacity, &bytes, (int)pooled, pooled > 1 ? rank : 0));
    r->raw_cutoff = device_alloc<float>(L * E, &bytes);
    r->tc_bias = device_alloc<float>(L * E, &bytes);
    device_zero(r->raw_cutoff, L * E * sizeof(float));
    device_zero(r->tc_bias, L * E * sizeof(float));
    r->stats_int = device_alloc<int>(L * r->stats_int_stride(), &bytes);
    r->stats_float = device_alloc<float>(L * r->stats_float_stride(), &bytes);
    r->dropped = device_alloc<int>(1, &bytes);
    device_zero(r->stats_int, L * r->stats_int_stride() * sizeof(int));
    device_zero(r->stats_float, L * r->stats_float_stride() * sizeof(float));
    device_zero(r->dropped, sizeof(int));
    r->mask = device_alloc<uint8_t>(pooled * N * E, &bytes);
    r->route_record = device_alloc<uint8_t>(L * T * E, &bytes);
    r->counts = device_alloc<int>(E, &bytes);
    r->aux_counts = device_alloc<int>(L * E, &bytes);
    r->tile_counts = device_alloc<int>(E * dispatch_tiles(pooled * N), &bytes);
    r->select = select_scratch_allocate(B, E, &bytes);
    r->kth = device_alloc<float>((int64_t)B * E, &bytes);  // (pools, E): at most one pool per sequence
    r->gate_mean = device_alloc<float>(E, &bytes);
    r->gate_partial = device_alloc<float>(E * dispatch_tiles(N), &bytes);
    r->dr = device_alloc<float>(N * E, &bytes);
    r->h32 = device_alloc<float>(N * C, &bytes);
    r->grad_pre = device_alloc<floatX>(capacity * 2 * C, &bytes);
    r->grad_x = device_alloc<floatX>(capacity * C, &bytes);
    r->bytes = bytes;
    r->updates = 0;
    r->step = r->micro_steps = 0;
}

inline void router_free(Router* r) {
    for (MoeBuffers& b : r->train) moe_buffers_free(b);
    r->train.clear();
    select_scratch_free(r->select);
    for (void* p : {(void*)r->raw_cutoff, (void*)r->tc_bias, (void*)r->stats_int, (void*)r->stats_float,
                    (void*)r->dropped, (void*)r->mask, (void*)r->route_record, (void*)r->counts, (void*)r->aux_counts,
                    (void*)r->tile_counts, (void*)r->kth, (void*)r->gate_mean, (void*)r->gate_partial,
                    (void*)r->dr, (void*)r->h32, (void*)r->grad_pre, (void*)r->grad_x})
        cudaCheck(cudaFree(p));
}

// Start of a training step (step = the 0-based index of the step to train).
inline void router_step_begin(Router& r, int step) {
    if (r.layers.empty()) return;
    r.step = step;
    r.micro_steps = 0;
    const size_t L = r.layers.size();
    cudaCheck(cudaMemsetAsync(r.stats_int, 0, L * r.stats_int_stride() * sizeof(int)));
    cudaCheck(cudaMemsetAsync(r.stats_float, 0, L * r.stats_float_stride() * sizeof(float)));
}

// A training forward pass starts; aux_weight = d(objective)/d(its aux loss).
inline void router_micro_step(Router& r, float aux_weight) {
    r.micro_steps++;
    r.aux_weight = aux_weight;
}

// End of a training step: EC and ET move their cutoffs toward the step's
// mean EC cutoff (at every step, ET's warm-up included); TC loss-free nudges
// its biases toward balance.
inline void router_step_end(Router& r) {
    if (r.layers.empty() || r.micro_steps == 0) return;
    const int n = (int)r.layers.size() * r.E;
    if (r.config.kind != RouterKind::TC) {
        cutoff_update_kernel<<<ceil_div(n, THREADS), THREADS>>>(r.raw_cutoff, r.stats_float, r.E,
                                                                r.stats_float_stride(), (int)r.layers.size(),
                                                                (float)r.config.et_beta,
                                                                r.micro_steps * r.stats_ranks());
        launchCheck();
        r.updates++;
    } else if (r.config.tc_balance == TcBalance::LossFree) {
        lossfree_bias_kernel<<<ceil_div(n, THREADS), THREADS>>>(r.tc_bias, r.stats_int, r.E, r.stats_int_stride(),
                                                                (int)r.layers.size(), (float)r.config.lossfree_rate);
        launchCheck();
    }
}

// After a step's micro-steps, with several ranks: the step's statistics
// summed over the ranks where each rank has only its own (pools within a
// rank; TC), so every rank logs global figures and moves its cutoffs and
// biases identically. The kth and aux sums are then stats_ranks() times
// too large (a sum of per-rank means); readers divide.
inline void router_share_stats(Router& r) {
    if (r.layers.empty() || r.stats_ranks() == 1) return;
    const size_t L = r.layers.size();
    multi_gpu_sum(*r.multi, r.stats_int, L * r.stats_int_stride());
    multi_gpu_sum(*r.multi, r.stats_float, L * r.stats_float_stride());
}

// The step's routing per layer, copied to the host (a sync: logging steps
// only, after the micro-steps and router_share_stats, before router_step_end).
inline std::vector<LayerRoutingStats> router_read_stats(const Router& r) {
    std::vector<LayerRoutingStats> out;
    if (r.layers.empty()) return out;
    const size_t L = r.layers.size();
    std::vector<int> si(L * r.stats_int_stride());
    std::vector<float> sf(L * r.stats_float_stride()), raw(L * r.E);
    cudaCheck(cudaMemcpy(si.data(), r.stats_int, si.size() * sizeof(int), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(sf.data(), r.stats_float, sf.size() * sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(raw.data(), r.raw_cutoff, raw.size() * sizeof(float), cudaMemcpyDeviceToHost));
    int dropped = 0;
    const int* dropped_all = r.dropped;
    if (r.ranks > 1) {  // every rank's, so that all fail together, in these words
        cudaCheck(cudaMemcpyAsync(r.counts, r.dropped, sizeof(int), cudaMemcpyDeviceToDevice));
        multi_gpu_sum(*r.multi, r.counts, 1);
        dropped_all = r.counts;
    }
    cudaCheck(cudaMemcpy(&dropped, dropped_all, sizeof(int), cudaMemcpyDeviceToHost));
    if (dropped > 0)
        fail("MoE: %d routed (token, expert) pairs did not fit the routing buffers and were dropped; with finite "
             "router logits this cannot happen, so the run has diverged or the capacity bound is wrong",
             dropped);
    const float correction = cutoff_correction(r);
    const int steps = std::max(r.micro_steps, 1) * r.stats_ranks();
    for (size_t l = 0; l < L; l++) {
        LayerRoutingStats s;
        const int* ints = si.data() + l * r.stats_int_stride();
        const float* floats = sf.data() + l * r.stats_float_stride();
        s.layer = r.layers[l];
        s.counts.assign(ints, ints + r.E);
        s.tokens = (int64_t)r.micro_steps * r.B * r.T * r.ranks;
        for (int b = 0; b < 4; b++) s.fanout[b] = ints[r.E + b];
        s.clamped = ints[r.E + 4];
        if (r.config.kind != RouterKind::TC) {
            for (int e = 0; e < r.E; e++) s.batch_cutoff.push_back(floats[e] / steps);
            if (r.updates > 0)
                for (int e = 0; e < r.E; e++) s.cutoff.push_back(raw[l * r.E + e] / correction);
        }
        s.aux_loss = floats[r.E] / steps;
        out.push_back(s);
    }
    return out;
}

// Router state for checkpoints: the raw cutoffs, then the TC biases.
inline size_t router_state_floats(const Router& r) { return 2 * r.layers.size() * r.E; }
inline void router_save_state(const Router& r, float* host) {
    const size_t n = r.layers.size() * r.E;
    if (n == 0) return;
    cudaCheck(cudaMemcpy(host, r.raw_cutoff, n * sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(host + n, r.tc_bias, n * sizeof(float), cudaMemcpyDeviceToHost));
}
inline void router_load_state(Router& r, const float* host) {
    const size_t n = r.layers.size() * r.E;
    if (n == 0) return;
    cudaCheck(cudaMemcpy(r.raw_cutoff, host, n * sizeof(float), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(r.tc_bias, host + n, n * sizeof(float), cudaMemcpyHostToDevice));
}

// The weights of one MoE layer as the kernels read them: the router from the
// fp32 master copy (its logits are fp32 through and through), the FFNs from
// the matmul copy. Gradients are fp32.
struct MoeWeights {
    const float* router;
    const floatX *shared_fc, *shared_proj, *experts_fc, *experts_proj;
};
struct MoeGrads {
    float *router, *shared_fc, *shared_proj, *experts_fc, *experts_proj;
};

inline MoeBuffers& pass_buffers(Router& r, int layer, RoutingPass pass) {
    return r.train[pass == RoutingPass::Train ? layer : 0];
}
// The pass's own tokens' logits: a training pass's block of every rank's,
// an eval or generation pass's (which routes its own tokens alone) the first.
inline float* pass_logits(const MoeBuffers& buf, RoutingPass pass) {
    return pass == RoutingPass::Train ? buf.own_logits : buf.logits;
}

// Tokens per sub-batch of a pass's dispatch, experts and combine: all N when
// the pass can route no more pairs than the buffers hold. Else the pass
// routes each token alone (eval and generation by thresholds: up to E pairs
// per token, N*E in all, which would need 2.4 GB of expert activations at
// d12) and a sub-batch is as many tokens as the buffers hold E pairs for.
// The result is the same as one pass over all tokens: the selection runs
// over the whole pass first, and a token's dispatch, expert rows and
// combine depend on its own pairs only.
inline int pass_chunk_tokens(const Router& r, RoutingPass pass, Routing how, int B, int T, int capacity) {
    if (routed_pairs_bound(r, pass, how, B, T) <= capacity) return B * T;
    if (pass == RoutingPass::Train || how != Routing::Threshold)
        fail("internal: a %d x %d pass can route more pairs than the %d its buffers hold", B, T, capacity);
    return capacity / r.E;  // >= 1: the training capacity holds at least E pairs (k >= 1 per expert)
}

// h as fp32 for the router's backward: converted into r.h32 (the FP32 build reads h).
inline const float* router_input(Router& r, const floatX* h, size_t n) {
#ifdef ENABLE_FP32
    (void)r;
    (void)n;
    return h;
#else
    to_float_kernel<<<ceil_div(n, THREADS), THREADS>>>(r.h32, h, n);
    launchCheck();
    return r.h32;
#endif
}

// Phase "router + selection": logits = h W_r^T (fp32, router_logits_kernel),
// then the pass's selection into r.mask; a training pass of EC or ET also adds
// its EC cutoffs to the step's statistics. A training pass whose pool spans
// the ranks gathers every rank's logits first and selects over all of them
// (the mask then covers every rank's tokens; moe_dispatch takes its own).
inline void moe_route(Router& r, int layer, const floatX* h, const float* w_router, int B, int T, RoutingPass pass) {
    MoeBuffers& buf = pass_buffers(r, layer, pass);
    const int E = r.E, C = r.C, ranks = pass_ranks(r, pass);
    const int N = B * T * ranks;  // the tokens selected over
    const Routing how = pass_routing(r, pass);
    // a short generation pass launches few tiles, not the whole buffer's;
    // a pass in sub-batches at most the buffer's
    const int64_t bound = std::min<int64_t>(routed_pairs_bound(r, pass, how, B, T), buf.capacity);
    buf.launch_tiles = (int)std::min<int64_t>(buf.max_tiles, (bound + EXPERT_TILE - 1) / EXPERT_TILE + E);
    const int own = B * T;
    router_logits_kernel<<<ceil_div((size_t)ceil_div(own, ROUTER_TOKENS) * WARP, ROUTER_THREADS), ROUTER_THREADS>>>(
        pass_logits(buf, pass), h, w_router, own, C, E);
    launchCheck();
    if (ranks > 1) multi_gpu_gather(*r.multi, buf.logits, (size_t)B * T * E);
    const bool statistics = pass == RoutingPass::Train && r.config.kind != RouterKind::TC;
    int* stats_int = r.stats_int + (size_t)layer * r.stats_int_stride();
    float* stats_float = r.stats_float + (size_t)layer * r.stats_float_stride();
    if (how == Routing::TopK) {
        const float* bias = r.config.tc_balance == TcBalance::LossFree ? r.tc_bias + (size_t)layer * E : nullptr;
        tc_select_kernel<<<ceil_div(N, TC_SELECT_THREADS), TC_SELECT_THREADS>>>(r.mask, buf.logits, bias, N, E,
                                                                                r.config.top_k);
        launchCheck();
        return;
    }
    if (how == Routing::Threshold && pass != RoutingPass::Train) {
        threshold_select_kernel<<<ceil_div((size_t)N * E, THREADS), THREADS>>>(
            r.mask, buf.logits, r.raw_cutoff + (size_t)layer * E, cutoff_correction(r), N, E);
        launchCheck();
        return;
    }
    int pool, k, lo = 0, hi = 0;
    pool_shape(r, pass, B, T, &pool, &k);
    PoolSelect mode = SELECT_TOP_K;
    if (how == Routing::Threshold) {
        mode = r.config.capacity < 0 ? SELECT_THRESHOLD : SELECT_THRESHOLD_CLAMPED;
        et_capacity_bounds(k, r.config.capacity, &lo, &hi);
    }
    const int pools = N / pool;
    pool_select(r.mask, statistics ? r.kth : nullptr, stats_int + E + 4, r.select, buf.logits,
                r.raw_cutoff + (size_t)layer * E, cutoff_correction(r), N, E, pool, k, lo, hi, mode);
    if (statistics) {
        kth_accumulate_kernel<<<ceil_div(E, THREADS), THREADS>>>(stats_float, r.kth, pools, E);
        launchCheck();
    }
}

// An eval or generation pass of one sequence while record_routes is set:
// the layer's selection into route_record.
inline void moe_record_routes(Router& r, int layer, int N, RoutingPass pass) {
    if (pass == RoutingPass::Train || !r.record_routes) return;
    if (N > r.T) fail("internal: recording the routes of %d tokens, more than one sequence (%d)", N, r.T);
    cudaCheck(cudaMemcpyAsync(r.route_record + (size_t)layer * r.T * r.E, r.mask, (size_t)N * r.E,
                              cudaMemcpyDeviceToDevice));
}

// Phase "dispatch": the experts' token lists, gates and row tiles from the
// rows first .. first+N-1 of r.mask (a sub-batch of the pass, or all of it;
// token numbers and slot_of's rows count from `first`); in training (all
// tokens) also the step's counts and fanout, and the TC aux loss. Where the
// pool spans the ranks, the step's statistics count every rank's tokens (the
// same on every rank) and the lists hold this rank's.
inline void moe_dispatch(Router& r, int layer, int first, int N, RoutingPass pass) {
    MoeBuffers& buf = pass_buffers(r, layer, pass);
    const int E = r.E;
    const bool train = pass == RoutingPass::Train, pooled = train && r.pools_ranks();
    int* stats_int = r.stats_int + (size_t)layer * r.stats_int_stride();
    const uint8_t* mask = r.mask + (size_t)(pooled ? r.rank * N : first) * E;
    if (pooled) {
        expert_count(r.counts, stats_int, r.tile_counts, r.mask, N * r.ranks, E);
        fanout_kernel<<<ceil_div((size_t)N * r.ranks, THREADS), THREADS>>>(stats_int + E, r.mask, N * r.ranks, E);
        launchCheck();
    }
    expert_count(r.counts, train && !pooled ? stats_int : nullptr, r.tile_counts, mask, N, E);
    expert_dispatch(buf.slot_of, buf.slot_token, buf.slot_gate, buf.offsets, buf.tile_expert, buf.tile_row,
                    buf.num_tiles, r.dropped, r.counts, r.tile_counts, mask, pass_logits(buf, pass) + (size_t)first * E,
                    N, E, buf.capacity);
    if (!train || pooled) return;
    fanout_kernel<<<ceil_div(N, THREADS), THREADS>>>(stats_int + E, r.mask, N, E);
    launchCheck();
    if (r.config.kind == RouterKind::TC && r.config.tc_balance == TcBalance::Aux) {
        gate_partial_kernel<<<dispatch_tiles(N), DISPATCH_THREADS>>>(r.gate_partial, buf.own_logits, N, E);
        launchCheck();
        gate_mean_kernel<<<E, DISPATCH_THREADS>>>(r.gate_mean, r.gate_partial, dispatch_tiles(N), N * r.ranks);
        launchCheck();
        int* counts = r.aux_counts + (size_t)layer * E;  // kept for the backward
        cudaCheck(cudaMemcpyAsync(counts, r.counts, E * sizeof(int), cudaMemcpyDeviceToDevice));
        if (r.sums_ranks()) {
            multi_gpu_sum(*r.multi, counts, E);
            multi_gpu_sum(*r.multi, r.gate_mean, E);
        }
        aux_loss_kernel<<<1, 1>>>(r.stats_float + (size_t)layer * r.stats_float_stride() + E, r.gate_mean, counts,
                                  N * r.ranks, E, (float)r.config.aux_alpha);
        launchCheck();
    }
}

// expert_matmul_kernel over buf's row tiles (the pass's bound, launch_tiles,
// and the device's count): a grid of one wave at most, SMs x
// EXPERT_BLOCKS_PER_SM blocks, fewer when the bound has fewer items.
template <bool OUT_BY_IN, bool RELU2_GRAD, class Rows>
inline void expert_matmul(floatX* out, Rows rows, const floatX* weights, const floatX* pre, const MoeBuffers& buf,
                          int IC, int OC) {
    int device = 0, sms = 0;
    cudaCheck(cudaGetDevice(&device));
    cudaCheck(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int64_t items = (int64_t)buf.launch_tiles * ceil_div(OC, EXPERT_BN);
    const int grid = (int)std::min<int64_t>(items, (int64_t)sms * EXPERT_BLOCKS_PER_SM);
    expert_matmul_kernel<Rows, OUT_BY_IN, RELU2_GRAD><<<grid, EXPERT_THREADS>>>(
        out, rows, weights, pre, buf.tile_expert, buf.tile_row, buf.num_tiles, buf.offsets, IC, OC);
    launchCheck();
}

// Phase "experts": pre = fc_e x for every routed slot, out = proj_e relu(pre)^2.
inline void moe_experts_forward(Router& r, int layer, const floatX* h, const MoeWeights& w, RoutingPass pass) {
    MoeBuffers& buf = pass_buffers(r, layer, pass);
    const int C = r.C, W = 2 * C;
    expert_matmul<true, false>(buf.expert_pre, TokenRows{h, buf.slot_token, C}, w.experts_fc, nullptr, buf, C, W);
    expert_matmul<true, false>(buf.expert_out, Relu2Rows{buf.expert_pre, W}, w.experts_proj, nullptr, buf, W, C);
}

// Phase "combine": y += the gated expert outputs (y holds the shared expert's output).
inline void moe_combine(Router& r, int layer, floatX* y, int N, RoutingPass pass) {
    MoeBuffers& buf = pass_buffers(r, layer, pass);
    moe_combine_kernel<<<N, 128, 2 * r.E * sizeof(int)>>>(y, y, buf.expert_out, buf.slot_of, buf.slot_gate, r.E, r.C);
    launchCheck();
}

// The shared expert: y = proj relu(fc h)^2 (cuBLAS), pre kept for the backward.
inline void moe_shared_forward(cublasHandle_t cublas, floatX* y, floatX* pre, floatX* act, const floatX* h,
                               const MoeWeights& w, int N, int C) {
    matmul_forward(cublas, pre, h, w.shared_fc, N, C, 2 * C);
    relu2_forward(act, pre, (size_t)N * 2 * C);
    matmul_forward(cublas, y, act, w.shared_proj, N, 2 * C, C);
}

// The MoE FFN of MoE layer `layer` on h (B*T, C): y (N, C) overwritten.
// shared_pre (N, 2C) is kept for the backward; act (N, 2C) is scratch. The
// routed experts run in sub-batches of tokens when the pass could route
// more pairs than the buffers hold (pass_chunk_tokens); training never does.
inline void moe_forward(Router& r, int layer, cublasHandle_t cublas, floatX* y, floatX* shared_pre, floatX* act,
                        const floatX* h, const MoeWeights& w, int B, int T, RoutingPass pass) {
    const int N = B * T, C = r.C;
    moe_route(r, layer, h, w.router, B, T, pass);
    moe_record_routes(r, layer, N, pass);
    moe_shared_forward(cublas, y, shared_pre, act, h, w, N, C);
    const int chunk = pass_chunk_tokens(r, pass, pass_routing(r, pass), B, T, pass_buffers(r, layer, pass).capacity);
    for (int first = 0; first < N; first += chunk) {
        const int n = std::min(chunk, N - first);
        moe_dispatch(r, layer, first, n, pass);
        moe_experts_forward(r, layer, h + (size_t)first * C, w, pass);
        moe_combine(r, layer, y + (size_t)first * C, n, pass);
    }
}

// Backward of the shared expert: dh overwritten; its weight gradients added.
// wide and act are (N, 2C) scratch.
inline void moe_shared_backward(cublasHandle_t cublas, floatX* dh, floatX* wide, floatX* act, const floatX* dy,
                                const floatX* h, const floatX* shared_pre, const MoeWeights& w, const MoeGrads& g,
                                int N, int C) {
    relu2_forward(act, shared_pre, (size_t)N * 2 * C);  // recomputed, not stored
    matmul_backward(cublas, wide, g.shared_proj, dy, act, w.shared_proj, N, 2 * C, C);
    relu2_backward(wide, wide, shared_pre, (size_t)N * 2 * C);
    matmul_backward(cublas, dh, g.shared_fc, wide, h, w.shared_fc, N, C, 2 * C);
}

// Backward of the routed experts for the objective sum(y * dy): the gate's
// gradient into r.dr (every pair written), the experts' weight gradients
// added, and each slot's input gradient into r.grad_x.
inline void moe_experts_backward(Router& r, int layer, const floatX* dy, const floatX* h, const MoeWeights& w,
                                 const MoeGrads& g, int N) {
    MoeBuffers& buf = r.train[layer];
    const int E = r.E, C = r.C, W = 2 * C;
    gate_backward_kernel<<<ceil_div((size_t)N * WARP, THREADS), THREADS>>>(r.dr, dy, buf.expert_out, buf.slot_of,
                                                                          buf.slot_gate, N, E, C);
    launchCheck();
    const GatedTokenRows gated_dy{dy, buf.slot_token, buf.slot_gate, C};
    // dpre = (gate dy) proj_e * relu2'(pre): proj_e (C, 2C) read as (IC, OC)
    expert_matmul<false, true>(r.grad_pre, gated_dy, w.experts_proj, buf.expert_pre, buf, C, W);
    // dproj_e += (gate dy)^T relu(pre)^2; dfc_e += dpre^T x
    expert_weight_grad_kernel<<<dim3(ceil_div(W, EXPERT_BN), ceil_div(C, EXPERT_TILE), E), EXPERT_THREADS>>>(
        g.experts_proj, gated_dy, Relu2Rows{buf.expert_pre, W}, buf.offsets, C, W);
    launchCheck();
    expert_weight_grad_kernel<<<dim3(ceil_div(C, EXPERT_BN), ceil_div(W, EXPERT_TILE), E), EXPERT_THREADS>>>(
        g.experts_fc, SlotRows{r.grad_pre, W}, TokenRows{h, buf.slot_token, C}, buf.offsets, W, C);
    launchCheck();
    // dx = dpre fc_e: fc_e (2C, C) read as (IC, OC)
    expert_matmul<false, false>(r.grad_x, SlotRows{r.grad_pre, W}, w.experts_fc, nullptr, buf, W, C);
}

// Backward of combine: dh += each routed slot's input gradient (r.grad_x).
inline void moe_combine_backward(Router& r, int layer, floatX* dh, int N) {
    moe_combine_kernel<<<N, 128, 2 * r.E * sizeof(int)>>>(dh, dh, r.grad_x, r.train[layer].slot_of, nullptr, r.E, r.C);
    launchCheck();
}

// Backward of the router: the TC aux loss's gradient joins the gates' in
// r.dr; then dh += dr W_r and dW_r += dr^T h (fp32 cuBLAS).
inline void moe_router_backward(Router& r, int layer, cublasHandle_t cublas, floatX* dh, const floatX* h,
                                const float* w_router, float* g_router, int N) {
    MoeBuffers& buf = r.train[layer];
    const int E = r.E, C = r.C;
    if (r.config.kind == RouterKind::TC && r.config.tc_balance == TcBalance::Aux) {
        aux_loss_backward_kernel<<<ceil_div((size_t)N * E, THREADS), THREADS>>>(
            r.dr, buf.own_logits, r.aux_counts + (size_t)layer * E, N, N * r.ranks, E,
            (float)r.config.aux_alpha, r.aux_weight * r.ranks);
        launchCheck();
    }
    const float one = 1.0f, zero = 0.0f;
    const float* h32 = router_input(r, h, (size_t)N * C);
    cublasCheck(cublasSgemm(cublas, CUBLAS_OP_N, CUBLAS_OP_T, C, E, N, &one, h32, C, r.dr, E, &one, g_router, C));
    // r.h32 is free again (the FP32 build never wrote it): the input gradient goes there
    cublasCheck(cublasSgemm(cublas, CUBLAS_OP_N, CUBLAS_OP_N, C, N, E, &one, w_router, C, r.dr, E, &zero, r.h32, C));
    add_float_kernel<<<ceil_div((size_t)N * C, THREADS), THREADS>>>(dh, r.h32, (size_t)N * C);
    launchCheck();
}

// Backward of moe_forward's training pass: dh (N, C) overwritten with the
// gradient at h; every weight gradient of the layer added. wide and act are
// (N, 2C) scratch.
inline void moe_backward(Router& r, int layer, cublasHandle_t cublas, floatX* dh, floatX* wide, floatX* act,
                         const floatX* dy, const floatX* h, const floatX* shared_pre, const MoeWeights& w,
                         const MoeGrads& g, int B, int T) {
    const int N = B * T;
    moe_shared_backward(cublas, dh, wide, act, dy, h, shared_pre, w, g, N, r.C);
    moe_experts_backward(r, layer, dy, h, w, g, N);
    moe_combine_backward(r, layer, dh, N);
    moe_router_backward(r, layer, cublas, dh, h, w.router, g.router, N);
}
