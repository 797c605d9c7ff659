// test/gpu_test_moe.cu: GPU parity of the MoE layer (router.cuh) against the
// CPU reference (test/reference_moe.h), and the routing properties the SPEC
// asks for.
//
// What it checks, and why:
//   1. Selection, exactly: TC top-K (with and without the loss-free bias), the
//      pool selection's EC top-k with its k-th-largest statistic, ET's threshold
//      with and without the capacity clamp (and the clamp counter), the eval
//      threshold. A selection is a step function of the logits, so both sides
//      get the same fp32 logits and must pick the same pairs, bit for bit.
//      The logits are drawn to provoke the tie rules: nine values (many ties,
//      -0 and +0 among them), values distinct per column (so a cutoff admits
//      an exact count), magnitudes across the whole float range (every byte
//      of the radix select), a pool whose tokens all have one logit, and
//      NaN logits (ranked last). The pool selection works on tiles of a pool
//      (router.cuh), so the pools span many tiles, the last one partial,
//      with ties across tile boundaries, up to pools of 80,000 tokens.
//   2. Dispatch: counts, offsets, each expert's tokens in increasing order,
//      slot_of, the gates, the row-tile schedule, the fan-out histogram; with
//      an expert that gets no token, one that gets them all, tokens with none,
//      dispatch tiles with none, more tiles than one chunk of the scan over
//      tiles, and a buffer too small (the pairs past it dropped and counted).
//      The expert matmul over a dispatch of mostly empty row tiles, with its
//      one-wave grid and with blocks that each loop over many tiles.
//   3. The layer, forward and backward, for every router and pass, called as
//      model.cuh calls it. The GPU's own logits go through the reference
//      selection (which must equal the GPU's mask), then through the reference
//      layer in double: y, the intermediates, dh (with the router's share
//      dr W_r), dr and every weight gradient are compared. Eval by
//      thresholds in sub-batches of tokens gives the bits of one pass.
//   4. The TC aux loss's mean gate over many tiles and experts, the same
//      bits run to run; the step's end over two micro-steps and two MoE
//      layers: the statistics a logging step reads (counts, fan-out, clamped
//      pairs, EC cutoffs, the tracked cutoff, aux loss) and the state updates
//      (the cutoff EMA with its bias correction, the TC loss-free biases).
//   5. Determinism: the layer run twice gives the same bits everywhere.
//   6. Causality of a whole model: the predictions at positions <= t ignore
//      the tokens after t for TC, ET (thresholds at eval and generation; in
//      training with the clamp off) and EC evaluated with tracked cutoffs; EC
//      in batch eval mode provably does not.
//
// Conventions as test/gpu_test_model.cu, with the helpers of
// test/gpu_check.h: seeded random inputs, never zeros; outputs poisoned
// before the kernels run (0xFF bytes, NaN, for floats; 0x55 bytes for ints
// and mask bytes, since -1 is a legal slot_of) and every element the kernels
// promise to write is checked; floatX results within a relative L2 error TOL
// of the reference (1e-4 FP32, 2e-2 BF16), fp32 results computed in fp32
// from the same inputs within TOL_FP32; integer results and selections exact.
// Why 2e-2 holds here: the BF16 build rounds to bf16 (each rounding at most
// 2^-8 relative, about 0.16% RMS) what it stores between kernels: the shared
// expert's pre-activation, relu^2, dact, dpre and output; expert_pre,
// expert_out, y, grad_pre, grad_x, dh; and the expert kernels stage their
// left operand (gathered x, relu(pre)^2, gate * dy) as bf16 for the tensor
// cores. Simulated on these shapes: y, dh and expert_out within about 0.5%,
// dr and the router gradient within about 0.7%, so 2e-2 leaves a margin of
// about 3x, while a real bug (a wrong slot, a missing gate, an expert
// dropped) makes the error O(1).
//
// Build: make build/gpu_test_moe.bf16 build/gpu_test_moe.fp32 for a GPU, where a
// CUDA that cannot start fails the program; make build/emu/plain/gpu_test_moe.bf16
// (and .fp32, and the asan variant) for the emulated device (test/emu).
// TRAIN_ET_TEST_VERBOSE=1 also prints every measured error (lines starting "#").
#include "../model.cuh"

// The references share op names with model.cuh's launchers, so they live in
// namespace ref. Everything they include is included here first, at global
// scope; their own #includes are then no-ops.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "../model_config.h"
#include "../router_config.h"
#include "check.h"
namespace ref {
#include "reference.h"
#include "reference_moe.h"
}

#include "gpu_check.h"

// ----------------------------------------------------------------------------
// Helpers of this file (the shared ones are in gpu_check.h)

inline std::vector<floatX> random_normal_floatX(Rng& rng, size_t n, double std) {
    std::vector<floatX> v(n);
    for (floatX& x : v) x = to_floatX(std * normal(rng));
    return v;
}

// ----------------------------------------------------------------------------
// Selections: reference calls and exact comparisons

static const char* routing_name(Routing how) {
    return how == Routing::TopK ? "top-K" : how == Routing::Choice ? "expert choice" : "threshold";
}

// A pass's routing pool and each expert's target k in it (the test shapes
// give a whole k, as train_et requires of training shapes).
static void pool_and_k(const RouterConfig& rc, int B, int T, int E, int* pool, int* k) {
    *pool = (int)routing_pool_tokens(rc.ec_pool, B, T);
    if (*pool * rc.top_k % E != 0) fail("internal: test shape with k = %d * %d / %d not whole", *pool, rc.top_k, E);
    *k = *pool * rc.top_k / E;
}

// The reference's selection of a pass routed `how`, on exactly the GPU's
// logits. bias and raw are the layer's TC biases and raw cutoffs; the
// threshold is raw / correction in float, as the kernels compute it.
// *clamped (may be null): the (pool, expert) pairs the ET clamp changed.
static std::vector<int> reference_selection(const RouterConfig& rc, Routing how, bool training,
                                            const std::vector<float>& logits, const float* bias, const float* raw,
                                            float correction, int B, int T, int E, int* clamped) {
    const int N = B * T;
    int pool, k, changed = 0;
    pool_and_k(rc, B, T, E, &pool, &k);
    std::vector<int> mask((size_t)N * E);
    if (how == Routing::TopK) {
        ref::tc_select<float>(mask.data(), logits.data(), rc.tc_balance == TcBalance::LossFree ? bias : nullptr, N, E,
                              rc.top_k);
    } else if (how == Routing::Choice) {
        ref::ec_select<float>(mask.data(), nullptr, logits.data(), N, E, pool, k);
    } else {
        std::vector<float> cutoff(E);
        for (int e = 0; e < E; e++) cutoff[e] = raw[e] / correction;
        changed =
            ref::et_select<float>(mask.data(), logits.data(), cutoff.data(), N, E, pool, k, rc.capacity, training);
    }
    if (clamped) *clamped = changed;
    return mask;
}

// Every mask byte equal to the reference's 0/1 (a poison byte never is).
static void check_mask(Test& t, const std::string& what, const std::vector<uint8_t>& gpu,
                       const std::vector<int>& want) {
    size_t wrong = 0, first = 0;
    for (size_t i = 0; i < want.size(); i++)
        if (i >= gpu.size() || gpu[i] != want[i]) {
            if (wrong++ == 0) first = i;
        }
    CHECK(t, wrong == 0,
          "%s: %zu of %zu mask entries differ from the reference (first: pair %zu, GPU %d, reference %d)",
          what.c_str(), wrong, want.size(), first, first < gpu.size() ? (int)gpu[first] : -1,
          want.empty() ? -1 : want[first]);
}

// The k-th largest logits, compared as floats: -0 and +0 are one logit (the
// radix key merges them); a NaN logit (ranked last) gives a NaN. The tests
// poison kth with INT_POISON bytes, a number no test logit equals, so an
// unwritten value never passes.
static void check_kth(Test& t, const std::string& what, const std::vector<float>& gpu, const std::vector<float>& want) {
    size_t wrong = 0;
    for (size_t i = 0; i < want.size(); i++)
        wrong += !(gpu[i] == want[i] || (std::isnan(gpu[i]) && std::isnan(want[i])));
    CHECK(t, wrong == 0, "%s: %zu of %zu k-th largest logits differ from the reference", what.c_str(), wrong,
          want.size());
}

// ----------------------------------------------------------------------------
// 1. Selection kernels

struct SelectShape {
    int B, T, E;
    int N() const { return B * T; }
    // the pools worth testing: the micro-batch and one sequence (the same with one sequence)
    std::vector<int> pools() const { return B == 1 ? std::vector<int>{T} : std::vector<int>{N(), T}; }
};
// The pool selection cuts a pool into tiles of SELECT_MIN_TILE = 64 tokens
// or more (select_tiling), so most shapes below have pools of many tiles,
// the last one partial, with the tie rule deciding across tile boundaries.
static const SelectShape select_shapes[] = {
    {1, 8, 4},    // tiny: k from 1 to the whole pool, one tile
    {2, 24, 4},   // the layer tests' shape
    {2, 24, 6},   //
    {2, 40, 16},  // many experts; a pool of 80: a tile of 64 and one of 16
    {2, 600, 5},  // pools of 600 and 1200: 10 and 19 tiles, the last partial
    {8, 100, 3},  // eight pools of two tiles (64 + 36), or one of 13; E = 3
    {1, 1100, 20},  // 18 tiles; more experts than one shared histogram holds (16)
};

enum class Dist { Quarters, Distinct, Wide, Constant, WithNaN };
static const Dist all_dists[] = {Dist::Quarters, Dist::Distinct, Dist::Wide, Dist::Constant};
// The pool selection also sees NaN logits (a diverged run): ranked last.
static const Dist pool_dists[] = {Dist::Quarters, Dist::Distinct, Dist::Wide, Dist::Constant, Dist::WithNaN};
static const char* dist_name(Dist d) {
    return d == Dist::Quarters   ? "quarters"
           : d == Dist::Distinct ? "distinct"
           : d == Dist::Wide     ? "wide"
           : d == Dist::Constant ? "constant"
                                 : "quarters with NaN";
}

// Router logits (N, E) drawn to exercise one tie rule or another:
//   Quarters: multiples of 0.25 in [-1, 1], zeros of either sign: many ties,
//             -0 tying with +0;
//   Distinct: each pool's column a permutation of distinct values, so a
//             cutoff at a column's m-th largest admits exactly m tokens;
//   Wide:     +-2^-100 .. 2^101, so every byte of the radix key matters; each
//             eighth token repeats the one before it (ties far from zero);
//   Constant: Quarters, but every logit of pool 0 is 0.5: all its tokens tie;
//   WithNaN:  Quarters, but every eighth token (n % 8 == 3) has NaN logits.
static std::vector<float> selection_logits(Rng& rng, Dist d, int N, int E, int pool) {
    std::vector<float> r((size_t)N * E);
    if (d == Dist::Distinct) {
        std::vector<int> perm(pool);
        for (int first = 0; first < N; first += pool)
            for (int e = 0; e < E; e++) {
                for (int j = 0; j < pool; j++) perm[j] = j;
                rng.shuffle(perm);
                for (int j = 0; j < pool; j++) r[(size_t)(first + j) * E + e] = (float)(perm[j] - pool / 2) / 8.0f;
            }
        return r;
    }
    for (int n = 0; n < N; n++)
        for (int e = 0; e < E; e++) {
            float& x = r[(size_t)n * E + e];
            if (d == Dist::Wide) {
                const float m = std::ldexp(1.0f + (float)rng.uniform(), (int)rng.below(201) - 100);
                x = n % 8 == 7 ? r[(size_t)(n - 1) * E + e] : rng.below(2) ? m : -m;
            } else {
                const int q = (int)rng.below(9) - 4;
                x = q == 0 && rng.below(2) ? -0.0f : 0.25f * q;
                if (d == Dist::Constant && n < pool) x = 0.5f;
                if (d == Dist::WithNaN && n % 8 == 3) x = NAN;
            }
        }
    return r;
}

static std::string select_name(const SelectShape& s, Dist d, int pool, int k) {
    return string_format("B=%d T=%d E=%d %s pool=%d k=%d", s.B, s.T, s.E, dist_name(d), pool, k);
}

// TC, K = 1, 2, 3 and E: with no bias, a bias in quarters (r + b ties
// exactly) and a continuous one.
static void test_moe_tc_select(Test& t) {
    Rng rng(1101);
    for (const SelectShape& s : select_shapes)
        for (Dist d : all_dists)
            for (int K : {1, 2, 3, s.E})
                for (int b = 0; b < 3; b++) {
                    if (K > s.E || (K == s.E && K <= 3)) continue;
                    const int N = s.N(), E = s.E;
                    const std::vector<float> logits = selection_logits(rng, d, N, E, N);
                    std::vector<float> bias(E);
                    for (float& x : bias) x = b == 1 ? 0.25f * ((int)rng.below(5) - 2) : (float)uniform(rng, -0.3, 0.3);
                    DeviceBuffer<float> d_logits(logits), d_bias(bias);
                    DeviceBuffer<uint8_t> d_mask((size_t)N * E);
                    d_mask.poison(INT_POISON);
                    tc_select_kernel<<<ceil_div(N, TC_SELECT_THREADS), TC_SELECT_THREADS>>>(d_mask.ptr, d_logits.ptr,
                                                                       b > 0 ? d_bias.ptr : nullptr, N, E, K);
                    launchCheck();
                    sync_after("tc_select_kernel");

                    std::vector<int> want((size_t)N * E);
                    ref::tc_select<float>(want.data(), logits.data(), b > 0 ? bias.data() : nullptr, N, E, K);
                    const char* bias_kind = b == 0 ? "no bias" : b == 1 ? "bias in quarters" : "bias";
                    check_mask(t, string_format("B=%d T=%d E=%d %s K=%d %s", s.B, s.T, E, dist_name(d), K, bias_kind),
                               d_mask.download(), want);
                }
}

// The k worth testing for a pool: 1, the targets of K = 1 and 2, the whole pool.
static std::vector<int> test_ks(int pool, int E) { return {1, std::max(1, pool / E), std::max(1, 2 * pool / E), pool}; }

// The pool selection's scratch for the selection tests, poisoned before
// each use (0x55 bytes: nothing may read what the selection did not write).
struct SelectScratchBuffers {
    SelectScratch s;
    size_t bytes = 0;
    SelectScratchBuffers(int B, int E) : s(select_scratch_allocate(B, E, &bytes)) {}
    ~SelectScratchBuffers() { select_scratch_free(s); }
    SelectScratchBuffers(const SelectScratchBuffers&) = delete;
    SelectScratchBuffers& operator=(const SelectScratchBuffers&) = delete;
    const SelectScratch& poisoned(int B, int E) {
        poison(s.hist, (size_t)select_tiles_bound(B) * E * 256, INT_POISON);
        poison(s.tile_ints, (size_t)select_tiles_bound(B) * E, INT_POISON);
        poison(s.sel_key, (size_t)B * E, INT_POISON);
        poison(s.sel_rank, (size_t)B * E, INT_POISON);
        return s;
    }
};

// The logits the reference ranks: a NaN (ranked last by the GPU) becomes
// -inf, below every logit of the tests (none is -inf), and the k-th largest
// statistic of a NaN is NaN.
static std::vector<float> nan_ranked_last(const std::vector<float>& logits) {
    std::vector<float> r = logits;
    for (float& x : r)
        if (std::isnan(x)) x = -INFINITY;
    return r;
}
static void kth_of_nan(std::vector<float>& kth) {
    for (float& x : kth)
        if (x == -INFINITY) x = NAN;
}

// EC: the top-k tokens of each (pool, expert), with and without the k-th
// largest statistic (an EC eval pass skips it; the mask must not change).
static void test_moe_pool_select_top_k(Test& t) {
    Rng rng(1201);
    for (const SelectShape& s : select_shapes)
        for (Dist d : pool_dists)
            for (int pool : s.pools())
                for (int k : test_ks(pool, s.E)) {
                    const int N = s.N(), E = s.E, pools = N / pool;
                    const std::string what = select_name(s, d, pool, k);
                    const std::vector<float> logits = selection_logits(rng, d, N, E, pool);
                    std::vector<int> want((size_t)N * E);
                    std::vector<float> want_kth((size_t)pools * E);
                    ref::ec_select<float>(want.data(), want_kth.data(), nan_ranked_last(logits).data(), N, E, pool, k);
                    kth_of_nan(want_kth);

                    SelectScratchBuffers scratch(s.B, E);
                    DeviceBuffer<float> d_logits(logits), d_kth((size_t)pools * E);
                    DeviceBuffer<float> d_raw(std::vector<float>(E, 1.0f));  // read only by the threshold modes
                    DeviceBuffer<int> d_clamped(std::vector<int>{7});
                    DeviceBuffer<uint8_t> d_mask((size_t)N * E);
                    for (bool statistic : {true, false}) {
                        d_mask.poison(INT_POISON);
                        d_kth.poison(INT_POISON);
                        pool_select(d_mask.ptr, statistic ? d_kth.ptr : nullptr, d_clamped.ptr,
                                    scratch.poisoned(s.B, E), d_logits.ptr, d_raw.ptr, 1.0f, N, E, pool, k, 0, 0,
                                    SELECT_TOP_K);
                        sync_after("pool_select (top-k)");
                        check_mask(t, what + (statistic ? "" : " (no statistic)"), d_mask.download(), want);
                        if (statistic) check_kth(t, what, d_kth.download(), want_kth);
                    }
                    CHECK(t, d_clamped.download()[0] == 7, "%s: top-k changed the clamp counter", what.c_str());
                }
}

// Expert e's cutoff: the m-th largest logit of its column in pool 0, with m
// cycling over the experts through lo - 1, k and hi + 1, so that the clamp
// pulls some experts up, pushes some down and leaves some (exactly so for
// Distinct logits; ties at the cutoff admit more).
// NaN logits (ranked last) never reach a cutoff: where the m-th is one, the
// cutoff is -FLT_MAX, which no NaN passes either.
static std::vector<float> clamp_test_cutoffs(const std::vector<float>& logits, int E, int pool, int k, int lo, int hi) {
    std::vector<float> cutoff(E), column(pool);
    for (int e = 0; e < E; e++) {
        for (int n = 0; n < pool; n++) column[n] = logits[(size_t)n * E + e];
        std::sort(column.begin(), column.end(),
                  [](float a, float b) { return a > b || (std::isnan(b) && !std::isnan(a)); });
        const int m = e % 3 == 0 ? lo - 1 : e % 3 == 1 ? k : hi + 1;
        cutoff[e] = column[std::clamp(m, 1, pool) - 1];
        if (std::isnan(cutoff[e])) cutoff[e] = -FLT_MAX;
    }
    return cutoff;
}

// ET: the training threshold without the clamp (capacity -1), with it
// (capacity 0.5, and 0: lo = hi = k), the clamp counter, the k-th largest
// statistic a training pass also computes; then the eval threshold.
// correction = 0.5 and raw = cutoff / 2: the kernels' raw / correction gives
// back exactly the logit values chosen as cutoffs, so tokens tie with them.
static void test_moe_threshold_select(Test& t) {
    Rng rng(1301);
    const float correction = 0.5f;
    int under = 0, over = 0, within = 0;  // (pool, expert) pairs the clamp pulled up, pushed down, left
    for (const SelectShape& s : select_shapes)
        for (Dist d : pool_dists)
            for (int pool : s.pools())
                for (int K : {1, 2}) {
                    const int N = s.N(), E = s.E, pools = N / pool, k = std::max(1, pool * K / E);
                    const std::vector<float> logits = selection_logits(rng, d, N, E, pool);
                    const std::vector<float> ranked = nan_ranked_last(logits);  // what the reference sees
                    DeviceBuffer<float> d_logits(logits), d_kth((size_t)pools * E);
                    DeviceBuffer<uint8_t> d_mask((size_t)N * E);
                    SelectScratchBuffers select_scratch(s.B, E);
                    std::vector<float> want_kth((size_t)pools * E);
                    std::vector<int> scratch((size_t)N * E);
                    ref::ec_select<float>(scratch.data(), want_kth.data(), ranked.data(), N, E, pool, k);
                    kth_of_nan(want_kth);
                    for (double capacity : {-1.0, 0.5, 0.0}) {
                        int lo, hi;
                        et_capacity_bounds(k, capacity < 0 ? 0.5 : capacity, &lo, &hi);
                        const std::vector<float> cutoff = clamp_test_cutoffs(logits, E, pool, k, lo, hi);
                        std::vector<float> raw(E);
                        for (int e = 0; e < E; e++) raw[e] = cutoff[e] * correction;
                        const std::string what = select_name(s, d, pool, k) + string_format(" capacity %g", capacity);

                        DeviceBuffer<float> d_raw(raw);
                        DeviceBuffer<int> d_clamped(std::vector<int>{7});  // it counts on from wherever it is
                        d_mask.poison(INT_POISON);
                        d_kth.poison(INT_POISON);
                        const PoolSelect mode = capacity < 0 ? SELECT_THRESHOLD : SELECT_THRESHOLD_CLAMPED;
                        pool_select(d_mask.ptr, d_kth.ptr, d_clamped.ptr, select_scratch.poisoned(s.B, E),
                                    d_logits.ptr, d_raw.ptr, correction, N, E, pool, k, lo, hi, mode);
                        sync_after("pool_select (threshold)");

                        std::vector<float> ref_cutoff(E);
                        for (int e = 0; e < E; e++) ref_cutoff[e] = raw[e] / correction;
                        std::vector<int> want((size_t)N * E);
                        const int clamped = ref::et_select<float>(want.data(), ranked.data(), ref_cutoff.data(), N, E,
                                                                  pool, k, capacity, true);
                        check_mask(t, what, d_mask.download(), want);
                        check_kth(t, what, d_kth.download(), want_kth);
                        const int got = d_clamped.download()[0];
                        CHECK(t, got == 7 + clamped,
                              "%s: the clamp counter went from 7 to %d, the reference clamped %d", what.c_str(), got,
                              clamped);
                        if (capacity < 0) continue;
                        for (int first = 0; first < N; first += pool)
                            for (int e = 0; e < E; e++) {
                                int count = 0;
                                for (int n = first; n < first + pool; n++)
                                    count += logits[(size_t)n * E + e] >= ref_cutoff[e];
                                (count < lo ? under : count > hi ? over : within)++;
                            }
                    }

                    // Eval: the thresholds alone, token by token.
                    std::vector<float> cutoff = clamp_test_cutoffs(logits, E, pool, k, k, k), raw(E);
                    for (int e = 0; e < E; e++) raw[e] = cutoff[e] * correction;
                    DeviceBuffer<float> d_raw(raw);
                    d_mask.poison(INT_POISON);
                    threshold_select_kernel<<<ceil_div((size_t)N * E, THREADS), THREADS>>>(d_mask.ptr, d_logits.ptr,
                                                                                          d_raw.ptr, correction, N, E);
                    launchCheck();
                    sync_after("threshold_select_kernel");
                    for (int e = 0; e < E; e++) cutoff[e] = raw[e] / correction;
                    std::vector<int> want((size_t)N * E);
                    ref::et_select<float>(want.data(), ranked.data(), cutoff.data(), N, E, pool, k, 0.5, false);
                    check_mask(t, select_name(s, d, pool, k) + " eval threshold", d_mask.download(), want);
                }
    CHECK(t, under > 0 && over > 0 && within > 0,
          "the clamp cases are not all exercised: %d pulled up, %d pushed down, %d left alone", under, over, within);
}

// Each token's rank in its pool's column of expert e (0 = its best), in the
// reference's order (ref::outranks: the higher logit, of equal logits the
// lower token), by sorting: the reference's rank_in_pool counts in O(pool^2),
// too slow for the large pools below. NaN-free logits (see nan_ranked_last).
static std::vector<int> sorted_pool_ranks(const std::vector<float>& r, int N, int E, int pool) {
    std::vector<int> rank((size_t)N * E), order(pool);
    for (int first = 0; first < N; first += pool)
        for (int e = 0; e < E; e++) {
            for (int j = 0; j < pool; j++) order[j] = first + j;
            std::sort(order.begin(), order.end(), [&](int a, int b) {
                return ref::outranks(r[(size_t)a * E + e], a, r[(size_t)b * E + e], b);
            });
            for (int j = 0; j < pool; j++) rank[(size_t)order[j] * E + e] = j;
        }
    return rank;
}

// Pools of tens of thousands of tokens, as a micro-batch of 16 x 2048 or the
// logits of 8 ranks will be: tiles of more than SELECT_THREADS tokens (each
// marked in several chunks, ties carried from chunk to chunk), many tiles a
// pool, few distinct logits (quarters, with NaN: ties in every tile). EC
// top-k with its statistic and the ET clamp, against the reference's rules
// at scale: EC takes rank < k (ref::ec_select); the clamp keeps the
// threshold's tokens when their count is within [lo, hi], else rank < keep
// (ref::et_select).
static void test_moe_pool_select_large(Test& t) {
    Rng rng(1401);
    const float correction = 0.5f;
    const SelectShape shapes[] = {{1, 80000, 3}, {4, 20000, 3}};
    for (const SelectShape& s : shapes)
        for (Dist d : {Dist::Quarters, Dist::WithNaN})
            for (int pool : s.pools()) {
                const int N = s.N(), E = s.E, pools = N / pool, k = pool / E;
                const SelectTiling tiling = select_tiling(N, pool);
                CHECK(t, tiling.tile > SELECT_THREADS && tiling.per_pool > 1,
                      "B=%d T=%d pool=%d: tiles of %d tokens, %d a pool: not the large case", s.B, s.T, pool,
                      tiling.tile, tiling.per_pool);
                const std::vector<float> logits = selection_logits(rng, d, N, E, pool);
                const std::vector<float> ranked = nan_ranked_last(logits);
                const std::vector<int> rank = sorted_pool_ranks(ranked, N, E, pool);
                SelectScratchBuffers scratch(s.B, E);
                DeviceBuffer<float> d_logits(logits), d_kth((size_t)pools * E);
                DeviceBuffer<uint8_t> d_mask((size_t)N * E);
                DeviceBuffer<int> d_clamped(std::vector<int>{0});

                const std::string what = select_name(s, d, pool, k);
                std::vector<int> want((size_t)N * E);
                std::vector<float> want_kth((size_t)pools * E);
                for (size_t i = 0; i < want.size(); i++) {
                    want[i] = rank[i] < k;
                    if (rank[i] == k - 1) want_kth[i / E / pool * E + i % E] = ranked[i];
                }
                kth_of_nan(want_kth);
                DeviceBuffer<float> d_raw(std::vector<float>(E, 1.0f));
                d_mask.poison(INT_POISON);
                d_kth.poison(INT_POISON);
                pool_select(d_mask.ptr, d_kth.ptr, d_clamped.ptr, scratch.poisoned(s.B, E), d_logits.ptr, d_raw.ptr,
                            1.0f, N, E, pool, k, 0, 0, SELECT_TOP_K);
                sync_after("pool_select (top-k, large)");
                check_mask(t, what + " top-k", d_mask.download(), want);
                check_kth(t, what + " top-k", d_kth.download(), want_kth);

                // ET, clamped: expert 2's cutoff admits more than hi tokens,
                // so it is pushed down to hi; 0 and 1 as their ties fall
                int lo, hi;
                et_capacity_bounds(k, 0.5, &lo, &hi);
                const std::vector<float> cutoff = clamp_test_cutoffs(logits, E, pool, k, lo, hi);
                std::vector<float> raw(E), ref_cutoff(E);
                for (int e = 0; e < E; e++) {
                    raw[e] = cutoff[e] * correction;
                    ref_cutoff[e] = raw[e] / correction;
                }
                int clamped = 0;
                for (int first = 0; first < N; first += pool)
                    for (int e = 0; e < E; e++) {
                        int count = 0;
                        for (int n = first; n < first + pool; n++) count += ranked[(size_t)n * E + e] >= ref_cutoff[e];
                        const int keep = std::clamp(count, lo, hi);
                        clamped += keep != count;
                        for (int n = first; n < first + pool; n++) {
                            const size_t i = (size_t)n * E + e;
                            want[i] = keep != count ? rank[i] < keep : ranked[i] >= ref_cutoff[e];
                        }
                    }
                CHECK(t, clamped > 0, "%s: no expert clamped", what.c_str());
                DeviceBuffer<float> d_raw_et(raw);
                d_mask.poison(INT_POISON);
                d_kth.poison(INT_POISON);
                pool_select(d_mask.ptr, d_kth.ptr, d_clamped.ptr, scratch.poisoned(s.B, E), d_logits.ptr,
                            d_raw_et.ptr, correction, N, E, pool, k, lo, hi, SELECT_THRESHOLD_CLAMPED);
                sync_after("pool_select (threshold clamped, large)");
                check_mask(t, what + " threshold clamped", d_mask.download(), want);
                check_kth(t, what + " threshold clamped", d_kth.download(), want_kth);
                CHECK(t, d_clamped.download()[0] == clamped, "%s: %d clamped, the reference %d", what.c_str(),
                      d_clamped.download()[0], clamped);
            }
}

// ----------------------------------------------------------------------------
// 2. Dispatch

// What the dispatch kernel wrote into a MoeBuffers, downloaded.
struct Dispatch {
    std::vector<int> slot_of, slot_token, offsets, tile_expert, tile_row;
    std::vector<float> slot_gate;
    int num_tiles = 0;
};

static Dispatch download_dispatch(const MoeBuffers& b, int N, int E) {
    Dispatch d;
    d.slot_of = download_from(b.slot_of, (size_t)N * E);
    d.slot_token = download_from(b.slot_token, b.capacity);
    d.slot_gate = download_from(b.slot_gate, b.capacity);
    d.offsets = download_from(b.offsets, E + 1);
    d.tile_expert = download_from(b.tile_expert, b.max_tiles);
    d.tile_row = download_from(b.tile_row, b.max_tiles);
    d.num_tiles = download_from(b.num_tiles, 1)[0];
    return d;
}

static void poison_buffers(const MoeBuffers& b, int N, int E, int C) {
    poison(b.logits, (size_t)N * E);
    poison(b.slot_of, (size_t)N * E, INT_POISON);
    poison(b.slot_token, b.capacity, INT_POISON);
    poison(b.slot_gate, b.capacity);
    poison(b.offsets, E + 1, INT_POISON);
    poison(b.tile_expert, b.max_tiles, INT_POISON);
    poison(b.tile_row, b.max_tiles, INT_POISON);
    poison(b.num_tiles, 1, INT_POISON);
    poison(b.expert_pre, (size_t)b.capacity * 2 * C);
    poison(b.expert_out, (size_t)b.capacity * C);
}

// The routed pairs (n*E + e) in slot order: expert by expert, tokens in
// increasing order; at most `capacity` of them (the rest are dropped).
static std::vector<size_t> slot_pairs(const std::vector<int>& mask, int N, int E, size_t capacity) {
    std::vector<size_t> pairs;
    for (int e = 0; e < E; e++)
        for (int n = 0; n < N; n++)
            if (mask[(size_t)n * E + e] && pairs.size() < capacity) pairs.push_back((size_t)n * E + e);
    return pairs;
}

// The dispatch of `mask` into buffers of `capacity` slots as the kernel must
// build it: offsets the exclusive prefix sum of the (kept) counts, each
// expert's tokens in increasing order, slot_of the inverse (-1 where not
// routed or dropped), gates sigmoid(logit) to 1e-6 (expf), and row tiles of
// EXPERT_TILE slots covering each expert's slots exactly.
static void check_dispatch(Test& t, const std::string& what, const std::vector<int>& mask,
                           const std::vector<float>& logits, int N, int E, size_t capacity, const Dispatch& d) {
    const std::vector<size_t> pairs = slot_pairs(mask, N, E, capacity);
    std::vector<int> offsets(E + 1, 0), slot_of((size_t)N * E, -1), tile_expert, tile_row;
    for (size_t s = 0; s < pairs.size(); s++) {
        slot_of[pairs[s]] = (int)s;
        offsets[pairs[s] % E + 1]++;
    }
    for (int e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    for (int e = 0; e < E; e++)
        for (int row = offsets[e]; row < offsets[e + 1]; row += EXPERT_TILE) {
            tile_expert.push_back(e);
            tile_row.push_back(row);
        }
    CHECK(t, d.offsets == offsets, "%s: offsets are not the exclusive prefix sum of the counts", what.c_str());
    CHECK(t, d.slot_of == slot_of, "%s: slot_of does not number each expert's tokens in order (-1: not routed)",
          what.c_str());
    size_t wrong_tokens = 0, wrong_gates = 0;
    for (size_t s = 0; s < pairs.size(); s++) {
        if (s >= d.slot_token.size() || d.slot_token[s] != (int)(pairs[s] / E)) {
            wrong_tokens++;
            continue;
        }
        const double gate = ref::sigmoid((double)logits[pairs[s]]);
        wrong_gates += !(std::fabs(d.slot_gate[s] - gate) <= 1e-6 * gate);
    }
    CHECK(t, wrong_tokens == 0, "%s: %zu of %zu slots hold the wrong token", what.c_str(), wrong_tokens, pairs.size());
    CHECK(t, wrong_gates == 0, "%s: %zu of %zu gates are not sigmoid(logit)", what.c_str(), wrong_gates, pairs.size());
    const int tiles = (int)tile_expert.size();
    CHECK(t, d.num_tiles == tiles, "%s: %d row tiles, expected %d", what.c_str(), d.num_tiles, tiles);
    CHECK(t, tiles <= (int)d.tile_expert.size() &&
                 std::equal(tile_expert.begin(), tile_expert.end(), d.tile_expert.begin()) &&
                 std::equal(tile_row.begin(), tile_row.end(), d.tile_row.begin()),
          "%s: the row tiles do not cover each expert's slots in steps of %d", what.c_str(), EXPERT_TILE);
}

enum class MaskKind { Random, Edges, OneExpert, Gaps };

// Random: 30% of the pairs. Edges: expert 0 gets no token, every fifth token
// no expert, the rest half the pairs. OneExpert: every token to expert E/2,
// the others none. Gaps: every other dispatch tile routes nothing, the others
// 40% of their pairs (tiles with no token, and experts skipping tiles).
static std::vector<int> dispatch_mask(Rng& rng, MaskKind kind, int N, int E) {
    std::vector<int> mask((size_t)N * E);
    for (int n = 0; n < N; n++)
        for (int e = 0; e < E; e++) {
            int& m = mask[(size_t)n * E + e];
            if (kind == MaskKind::Random) m = rng.uniform() < 0.3;
            else if (kind == MaskKind::Edges) m = e != 0 && n % 5 != 0 && rng.uniform() < 0.5;
            else if (kind == MaskKind::Gaps) m = n / DISPATCH_TILE % 2 == 1 && rng.uniform() < 0.4;
            else m = e == E / 2;
        }
    return mask;
}

static void test_moe_dispatch(Test& t) {
    Rng rng(1401);
    struct Shape { int N, E; };
    // 1000 x 16: eight dispatch tiles, the last one partial; 33000 x 2: more
    // tiles than one chunk of the scan over tiles
    for (Shape s : {Shape{1, 3}, Shape{48, 4}, Shape{700, 6}, Shape{300, 1}, Shape{1000, 16}, Shape{33000, 2}})
        for (MaskKind kind : {MaskKind::Random, MaskKind::Edges, MaskKind::OneExpert, MaskKind::Gaps})
            for (bool short_buffer : {false, true}) {
                const int N = s.N, E = s.E;
                const std::vector<int> mask = dispatch_mask(rng, kind, N, E);
                int total = 0;
                for (int m : mask) total += m;
                if (short_buffer && total < 2) continue;
                // short: five pairs (or half, if fewer than ten) more than the buffer holds
                const int capacity = short_buffer ? total - std::min(5, total / 2) : N * E;
                const std::string what = string_format("N=%d E=%d %s%s", N, E,
                                                       kind == MaskKind::Random  ? "random"
                                                       : kind == MaskKind::Edges ? "edges"
                                                       : kind == MaskKind::Gaps  ? "gaps"
                                                                                 : "one expert",
                                                       short_buffer ? ", buffer short" : "");
                std::vector<uint8_t> mask8(mask.begin(), mask.end());
                std::vector<int> counts(E, 0), fanout_ref(4, 0);
                for (int n = 0; n < N; n++) {
                    int routed = 0;
                    for (int e = 0; e < E; e++) {
                        counts[e] += mask[(size_t)n * E + e];
                        routed += mask[(size_t)n * E + e];
                    }
                    fanout_ref[std::min(routed, 3)]++;
                }
                std::vector<float> logits(mask.size());
                for (float& x : logits) x = (float)(2 * normal(rng));
                std::vector<int> step_start(E), fanout_start = {2, 7, 1, 8};
                for (int e = 0; e < E; e++) step_start[e] = 3 + e * 5 % 7;

                size_t bytes = 0;
                MoeBuffers b = moe_buffers_allocate(N, E, 1, capacity, &bytes);
                poison_buffers(b, N, E, 1);
                upload_to(b.logits, logits);
                DeviceBuffer<uint8_t> d_mask(mask8);
                DeviceBuffer<int> d_counts(E), d_dropped(std::vector<int>{0}), d_fanout(fanout_start);
                DeviceBuffer<int> d_step(step_start);
                d_counts.poison(INT_POISON);
                DeviceBuffer<int> d_tiles((size_t)E * dispatch_tiles(N));
                d_tiles.poison(INT_POISON);
                expert_count(d_counts.ptr, d_step.ptr, d_tiles.ptr, d_mask.ptr, N, E);
                expert_dispatch(b.slot_of, b.slot_token, b.slot_gate, b.offsets, b.tile_expert, b.tile_row,
                                b.num_tiles, d_dropped.ptr, d_counts.ptr, d_tiles.ptr, d_mask.ptr, b.logits, N, E,
                                capacity);
                fanout_kernel<<<ceil_div(N, THREADS), THREADS>>>(d_fanout.ptr, d_mask.ptr, N, E);
                launchCheck();
                sync_after("expert_count + expert_dispatch + fanout_kernel");

                CHECK(t, d_counts.download() == counts, "%s: counts differ from the mask's", what.c_str());
                std::vector<int> step = d_step.download(), fanout = d_fanout.download();
                size_t step_wrong = 0;
                for (int e = 0; e < E; e++) step_wrong += step[e] != step_start[e] + counts[e];
                CHECK(t, step_wrong == 0, "%s: the step counts did not grow by the counts", what.c_str());
                for (int i = 0; i < 4; i++)
                    CHECK(t, fanout[i] == fanout_start[i] + fanout_ref[i],
                          "%s: fan-out bucket %d went from %d to %d; %d tokens have that many experts", what.c_str(), i,
                          fanout_start[i], fanout[i], fanout_ref[i]);
                const int dropped = d_dropped.download()[0];
                CHECK(t, dropped == total - std::min(total, capacity), "%s: %d pairs counted as dropped, expected %d",
                      what.c_str(), dropped, total - std::min(total, capacity));
                check_dispatch(t, what, mask, logits, N, E, capacity, download_dispatch(b, N, E));

                // Without step counts (an eval pass): the same counts, nothing else touched.
                d_counts.poison(INT_POISON);
                expert_count(d_counts.ptr, nullptr, d_tiles.ptr, d_mask.ptr, N, E);
                sync_after("expert_count (no step counts)");
                CHECK(t, d_counts.download() == counts && d_step.download() == step,
                      "%s: without step counts, the counts differ or the step counts moved", what.c_str());
                moe_buffers_free(b);
            }
}

// The expert matmul's persistent grid: a dispatch whose host bound is N*E
// pairs (launch_tiles = all the buffer's row tiles, most of them empty), an
// expert with no token and experts of two row tiles, OC not a multiple of
// EXPERT_BN. The launcher's grid (one block per item here) must match the
// reference; a grid of 3 blocks, each looping over many items, must give the
// same bits. Both products the layer runs: fc (weights (OC, IC), gathered
// token rows) and the backward's dpre (weights (IC, OC), gated rows, the
// ReLU^2 derivative on the way out).
static void test_moe_expert_matmul_grid(Test& t) {
    Rng rng(1451);
    const int N = 300, E = 5, C = 48, W = 2 * C;
    const std::vector<int> mask = dispatch_mask(rng, MaskKind::Edges, N, E);
    const std::vector<uint8_t> mask8(mask.begin(), mask.end());
    size_t bytes = 0;
    MoeBuffers b = moe_buffers_allocate(N, E, C, (int64_t)N * E, &bytes);
    b.launch_tiles = b.max_tiles;
    upload_to(b.logits, random_float(rng, (size_t)N * E, -2, 2));
    DeviceBuffer<uint8_t> d_mask(mask8);
    DeviceBuffer<int> d_counts(E), d_dropped(std::vector<int>{0}), d_tiles((size_t)E * dispatch_tiles(N));
    expert_count(d_counts.ptr, nullptr, d_tiles.ptr, d_mask.ptr, N, E);
    expert_dispatch(b.slot_of, b.slot_token, b.slot_gate, b.offsets, b.tile_expert, b.tile_row, b.num_tiles,
                    d_dropped.ptr, d_counts.ptr, d_tiles.ptr, d_mask.ptr, b.logits, N, E, b.capacity);
    sync_after("expert_count + expert_dispatch");
    const Dispatch d = download_dispatch(b, N, E);
    const int pairs = d.offsets[E];
    CHECK(t, d.offsets[1] == 0 && d.num_tiles > E && d.num_tiles * 2 < b.max_tiles,
          "the case needs an empty expert, two-tile experts and mostly empty tiles (%d of %d real)", d.num_tiles,
          b.max_tiles);

    const std::vector<floatX> x = random_floatX(rng, (size_t)N * C, -1, 1), dy = random_floatX(rng, (size_t)N * C, -1, 1);
    const std::vector<floatX> pre = random_floatX(rng, (size_t)pairs * W, -1, 1);
    const std::vector<floatX> fc = random_floatX(rng, (size_t)E * W * C, -0.2, 0.2);
    const std::vector<floatX> proj = random_floatX(rng, (size_t)E * C * W, -0.2, 0.2);
    DeviceBuffer<floatX> d_x(x), d_dy(dy), d_pre(pre), d_fc(fc), d_proj(proj), d_out((size_t)pairs * W),
        d_out3((size_t)pairs * W);
    // the slots' expert, then out[s][o] = sum_j row_s[j] w_e(o, j) in double
    std::vector<int> expert_of(pairs);
    for (int e = 0; e < E; e++)
        for (int s = d.offsets[e]; s < d.offsets[e + 1]; s++) expert_of[s] = e;
    auto reference = [&](bool gated) {
        std::vector<double> out((size_t)pairs * W);
        for (int s = 0; s < pairs; s++) {
            const int n = d.slot_token[s], e = expert_of[s];
            for (int o = 0; o < W; o++) {
                double sum = 0;
                for (int j = 0; j < C; j++) {
                    const double row = gated ? (double)d.slot_gate[s] * to_double(dy[(size_t)n * C + j])
                                             : to_double(x[(size_t)n * C + j]);
                    // fc_e (W, C) read as (OC, IC); proj_e (C, W) read as (IC, OC)
                    sum += row * to_double(gated ? proj[(size_t)e * C * W + (size_t)j * W + o]
                                                 : fc[(size_t)e * W * C + (size_t)o * C + j]);
                }
                out[(size_t)s * W + o] = gated ? sum * 2 * std::max(0.0, to_double(pre[(size_t)s * W + o])) : sum;
            }
        }
        return out;
    };
    for (bool gated : {false, true}) {
        const char* what = gated ? "dpre = (gate dy) proj_e * relu2'(pre)" : "pre = fc_e x";
        const TokenRows token_rows{d_x.ptr, b.slot_token, C};
        const GatedTokenRows gated_rows{d_dy.ptr, b.slot_token, b.slot_gate, C};
        d_out.poison();
        d_out3.poison();
        if (gated) {
            expert_matmul<false, true>(d_out.ptr, gated_rows, d_proj.ptr, d_pre.ptr, b, C, W);
            expert_matmul_kernel<GatedTokenRows, false, true><<<3, EXPERT_THREADS>>>(
                d_out3.ptr, gated_rows, d_proj.ptr, d_pre.ptr, b.tile_expert, b.tile_row, b.num_tiles, b.offsets, C, W);
        } else {
            expert_matmul<true, false>(d_out.ptr, token_rows, d_fc.ptr, nullptr, b, C, W);
            expert_matmul_kernel<TokenRows, true, false><<<3, EXPERT_THREADS>>>(
                d_out3.ptr, token_rows, d_fc.ptr, nullptr, b.tile_expert, b.tile_row, b.num_tiles, b.offsets, C, W);
        }
        launchCheck();
        sync_after(what);
        const std::vector<floatX> out = d_out.download(), out3 = d_out3.download();
        check_close(t, what, to_doubles(out), reference(gated), TOL);
        CHECK(t, same_bits(out, out3), "%s: a grid of 3 blocks looping over the tiles differs from one block per tile",
              what);
    }
    moe_buffers_free(b);
}

// ----------------------------------------------------------------------------
// 3. The layer, forward and backward

// A MoE layer's five tensors in parameter_tensors()' order: router (E, C),
// shared fc (2C, C), shared proj (C, 2C), experts fc (E*2C, C), experts proj
// (E*C, 2C). Gradients are stored this way, all fp32, one after the other.
enum { ROUTER, SHARED_FC, SHARED_PROJ, EXPERTS_FC, EXPERTS_PROJ, LAYER_TENSORS };
static const char* const tensor_names[LAYER_TENSORS] = {"router", "shared.fc", "shared.proj", "experts.fc",
                                                        "experts.proj"};
static size_t tensor_size(int i, int C, int E) {
    return i == ROUTER ? (size_t)E * C : i < EXPERTS_FC ? (size_t)2 * C * C : (size_t)E * 2 * C * C;
}
static size_t tensor_offset(int i, int C, int E) {
    size_t offset = 0;
    for (int j = 0; j < i; j++) offset += tensor_size(j, C, E);
    return offset;
}
template <typename T>
static std::vector<T> tensor_slice(const std::vector<T>& all, int i, int C, int E) {
    const size_t offset = tensor_offset(i, C, E);
    return std::vector<T>(all.begin() + offset, all.begin() + offset + tensor_size(i, C, E));
}

// One MoE layer's weights, on the host (what the reference reads) and on the
// GPU: the router in fp32 (its logits are fp32 through and through), the FFNs
// in floatX, rounded once on the host so that both sides read the same
// numbers. The router N(0, 1/C) as at init, the fc matrices N(0, 1/C), the
// projections N(0, 1/(2C)) (not zero: every path must carry gradient).
struct LayerWeights {
    int C, E;
    std::vector<float> router;
    std::vector<floatX> ffn;  // shared fc, shared proj, experts fc, experts proj, one after the other
    DeviceBuffer<float> d_router;
    DeviceBuffer<floatX> d_ffn;

    LayerWeights(Rng& rng, int C_, int E_)
        : C(C_), E(E_), router(random_router(rng, C_, E_)), ffn(random_ffn(rng, C_, E_)), d_router(router),
          d_ffn(ffn) {}
    static std::vector<float> random_router(Rng& rng, int C, int E) {
        std::vector<float> w((size_t)E * C);
        for (float& x : w) x = (float)(normal(rng) / std::sqrt((double)C));
        return w;
    }
    static std::vector<floatX> random_ffn(Rng& rng, int C, int E) {
        std::vector<floatX> w;
        for (int i = SHARED_FC; i < LAYER_TENSORS; i++) {
            const double std = 1.0 / std::sqrt((double)(i == SHARED_FC || i == EXPERTS_FC ? C : 2 * C));
            const std::vector<floatX> part = random_normal_floatX(rng, tensor_size(i, C, E), std);
            w.insert(w.end(), part.begin(), part.end());
        }
        return w;
    }
    size_t ffn_offset(int i) const { return tensor_offset(i, C, E) - tensor_offset(SHARED_FC, C, E); }
    MoeWeights device() const {
        return {d_router.ptr, d_ffn.ptr + ffn_offset(SHARED_FC), d_ffn.ptr + ffn_offset(SHARED_PROJ),
                d_ffn.ptr + ffn_offset(EXPERTS_FC), d_ffn.ptr + ffn_offset(EXPERTS_PROJ)};
    }
    // tensor i in double, for the reference
    std::vector<double> tensor(int i) const {
        if (i == ROUTER) return to_doubles(router);
        const std::vector<double> all = to_doubles(ffn);
        return std::vector<double>(all.begin() + ffn_offset(i), all.begin() + ffn_offset(i) + tensor_size(i, C, E));
    }
};

// h (N, C) @ router^T in double: the logits the GPU's fp32 matmul approximates.
static std::vector<double> host_logits(const std::vector<floatX>& h, const std::vector<float>& router, int N, int C,
                                       int E) {
    std::vector<double> out((size_t)N * E);
    ref::matmul_forward<double>(out.data(), to_doubles(h).data(), to_doubles(router).data(), N, C, E);
    return out;
}

static RouterConfig tc_router(int K, TcBalance balance) {
    RouterConfig rc;
    rc.kind = RouterKind::TC;
    rc.top_k = K;
    rc.tc_balance = balance;
    rc.et_warmup_steps = 0;
    return rc;
}
static RouterConfig ec_router(int K, EcPool pool, EvalRouting eval = EvalRouting::Threshold) {
    RouterConfig rc;
    rc.kind = RouterKind::EC;
    rc.top_k = K;
    rc.ec_pool = pool;
    rc.eval_routing = eval;
    rc.et_warmup_steps = 0;
    return rc;
}
static RouterConfig et_router(int K, double capacity, EcPool pool = EcPool::MicroBatch, int warmup = 0) {
    RouterConfig rc;
    rc.kind = RouterKind::ET;
    rc.top_k = K;
    rc.capacity = capacity;
    rc.ec_pool = pool;
    rc.et_warmup_steps = warmup;
    return rc;
}

struct LayerCase {
    const char* name;
    int B, T, C, E;
    RouterConfig router;
    int updates;               // cutoff EMA updates so far (0: no cutoff yet, EC/ET route by EC)
    RoutingPass pass;
    Routing expect;            // how that pass must route
    bool edge_cutoffs = false; // ET: expert 0's cutoff above every logit, expert 1's below every logit
};

// aux_alpha 100 in the TC aux case: with the default 0.001 the aux loss's
// gradient would be 1e-5 of the gates' and hide under the tolerance; at 100
// it is about half as large, and alone in the unrouted pairs.
static std::vector<LayerCase> layer_cases() {
    RouterConfig tc_aux = tc_router(2, TcBalance::Aux);
    tc_aux.aux_alpha = 100;
    const RoutingPass train = RoutingPass::Train, eval = RoutingPass::Eval;
    return {
        {"tc K=1", 2, 24, 48, 4, tc_router(1, TcBalance::None), 0, train, Routing::TopK},
        {"tc aux K=2, two row tiles per expert", 2, 100, 64, 4, tc_aux, 0, train, Routing::TopK},
        {"tc loss-free K=1, C=40", 2, 24, 40, 6, tc_router(1, TcBalance::LossFree), 0, train, Routing::TopK},
        {"ec micro-batch pool K=1", 2, 24, 48, 4, ec_router(1, EcPool::MicroBatch), 0, train, Routing::Choice},
        {"ec sequence pools K=2", 2, 24, 64, 6, ec_router(2, EcPool::Sequence), 0, train, Routing::Choice},
        {"et warm-up routes by ec", 2, 24, 48, 4, et_router(1, 0.5, EcPool::MicroBatch, 5), 2, train,
         Routing::Choice},
        {"et first step routes by ec", 2, 24, 48, 4, et_router(1, 0.5), 0, train, Routing::Choice},
        {"et threshold, clamp, K=1", 2, 24, 48, 4, et_router(1, 0.5), 3, train, Routing::Threshold},
        {"et threshold, clamp, sequence pools K=2", 2, 24, 64, 6, et_router(2, 0.5, EcPool::Sequence), 3, train,
         Routing::Threshold},
        {"et threshold, no clamp, K=2", 2, 24, 48, 6, et_router(2, -1), 3, train, Routing::Threshold},
        {"et threshold, no clamp: an expert with no token, one with all 80", 2, 40, 48, 4, et_router(1, -1), 3, train,
         Routing::Threshold, true},
        {"et eval threshold", 2, 24, 48, 4, et_router(1, 0.5), 3, eval, Routing::Threshold},
        {"ec eval with tracked cutoffs", 2, 24, 48, 4, ec_router(1, EcPool::MicroBatch), 3, eval, Routing::Threshold},
        {"ec eval in batch mode", 2, 24, 48, 4, ec_router(1, EcPool::MicroBatch, EvalRouting::Batch), 3, eval,
         Routing::Choice},
    };
}

// Cutoffs for a layer test: expert e's lets through about share_e * k tokens
// per pool, share cycling over 0.4, 1, 1.6 (below the clamp's lo, on target,
// above its hi at C = 0.5), at midpoints between neighbouring host logits so
// the counts do not hinge on the last bit of a logit. Edge: expert 0's
// cutoff is above every logit, expert 1's below.
static std::vector<float> layer_cutoffs(const std::vector<double>& logits, int N, int E, int pools, int k, bool edge) {
    static const double share[3] = {0.4, 1.0, 1.6};
    std::vector<float> cutoff(E);
    std::vector<double> column(N);
    for (int e = 0; e < E; e++) {
        if (edge && e < 2) {
            cutoff[e] = e == 0 ? 1e20f : -1e20f;
            continue;
        }
        for (int n = 0; n < N; n++) column[n] = logits[(size_t)n * E + e];
        std::sort(column.begin(), column.end(), [](double a, double b) { return a > b; });
        const int m = std::clamp((int)std::lround(share[e % 3] * k) * pools, 1, N - 1);
        cutoff[e] = (float)((column[m - 1] + column[m]) / 2);
    }
    return cutoff;
}

static const float AUX_WEIGHT = 0.75f;  // d(objective)/d(aux loss): not 1, so a missing factor shows

// What one pass of the layer left, downloaded (the backward's part only after
// a training pass).
struct LayerRun {
    std::vector<float> logits;
    std::vector<uint8_t> mask;
    Dispatch dispatch;
    std::vector<floatX> y, shared_pre, expert_pre, expert_out, dh;
    std::vector<float> dr, grads;
};

// One MoE layer: a Router allocated as for a model of two layers (layer 1
// its only MoE layer), seeded random weights, inputs and router state, and
// the pass run as model_forward / model_backward run it.
struct MoeLayer {
    const LayerCase lc;
    const int N, C, E, W;
    Router r;
    Rng rng;
    LayerWeights w;
    const std::vector<floatX> h, dy;
    const std::vector<float> grad_start;  // the gradients accumulate onto these
    std::vector<float> raw, bias;         // the layer's raw cutoffs and TC biases, as uploaded
    DeviceBuffer<floatX> d_h, d_dy, d_y, d_dh, d_shared_pre, d_act, d_wide;
    DeviceBuffer<float> d_grads;

    MoeLayer(const LayerCase& c, uint64_t seed)
        : lc(c), N(c.B * c.T), C(c.C), E(c.E), W(2 * c.C), rng(seed), w(rng, C, E),
          h(random_floatX(rng, (size_t)N * C, -1, 1)), dy(random_floatX(rng, (size_t)N * C, -1, 1)),
          grad_start(random_float(rng, tensor_offset(LAYER_TENSORS, C, E), -0.5, 0.5)), raw(E, 0.0f), bias(E, 0.0f),
          d_h(h), d_dy(dy), d_y((size_t)N * C), d_dh((size_t)N * C), d_shared_pre((size_t)N * W),
          d_act((size_t)N * W), d_wide((size_t)N * W), d_grads(grad_start.size()) {
        ModelConfig mc;
        mc.n_layer = 2;
        mc.n_embd = C;
        mc.n_experts = E;
        mc.router = c.router;
        router_allocate(&r, mc, c.B, c.T);
        r.updates = c.updates;
        if (c.router.kind == RouterKind::TC && c.router.tc_balance == TcBalance::LossFree) {
            bias = random_float(rng, E, -0.2, 0.2);
            upload_to(r.tc_bias, bias);
        }
        if (c.router.kind != RouterKind::TC && c.updates > 0) {
            int pool, k;
            pool_and_k(c.router, c.B, c.T, E, &pool, &k);
            const std::vector<float> cutoff =
                layer_cutoffs(host_logits(h, w.router, N, C, E), N, E, N / pool, k, c.edge_cutoffs);
            for (int e = 0; e < E; e++) raw[e] = cutoff[e] * cutoff_correction(r);
            upload_to(r.raw_cutoff, raw);
        }
    }
    ~MoeLayer() { router_free(&r); }
    MoeLayer(const MoeLayer&) = delete;
    MoeLayer& operator=(const MoeLayer&) = delete;

    MoeGrads grads() const {
        float* g = d_grads.ptr;
        return {g + tensor_offset(ROUTER, C, E), g + tensor_offset(SHARED_FC, C, E),
                g + tensor_offset(SHARED_PROJ, C, E), g + tensor_offset(EXPERTS_FC, C, E),
                g + tensor_offset(EXPERTS_PROJ, C, E)};
    }

    // Everything the pass writes is poisoned first; the gradients start from grad_start.
    LayerRun run() {
        const bool train = lc.pass == RoutingPass::Train;
        MoeBuffers& buf = pass_buffers(r, 0, lc.pass);
        const size_t train_capacity = r.train[0].capacity;
        poison_buffers(buf, N, E, C);
        poison(r.mask, (size_t)N * E, INT_POISON);
        poison(r.counts, E, INT_POISON);
        poison(r.kth, (size_t)lc.B * E);
        poison(r.gate_mean, E);
        poison(r.dr, (size_t)N * E);
        poison(r.h32, (size_t)N * C);
        poison(r.grad_pre, train_capacity * W);
        poison(r.grad_x, train_capacity * C);
        d_y.poison();
        d_dh.poison();
        d_shared_pre.poison();
        d_act.poison();
        d_wide.poison();
        d_grads.upload(grad_start);

        if (train) {
            router_step_begin(r, 0);
            router_micro_step(r, AUX_WEIGHT);
        }
        moe_forward(r, 0, g_cublas, d_y.ptr, d_shared_pre.ptr, d_act.ptr, d_h.ptr, w.device(), lc.B, lc.T, lc.pass);
        sync_after("moe_forward");
        LayerRun out;
        out.logits = download_from(buf.logits, (size_t)N * E);
        out.mask = download_from(r.mask, (size_t)N * E);
        out.dispatch = download_dispatch(buf, N, E);
        out.y = d_y.download();
        out.shared_pre = d_shared_pre.download();
        out.expert_pre = download_from(buf.expert_pre, (size_t)buf.capacity * W);
        out.expert_out = download_from(buf.expert_out, (size_t)buf.capacity * C);
        if (!train) return out;
        moe_backward(r, 0, g_cublas, d_dh.ptr, d_wide.ptr, d_act.ptr, d_dy.ptr, d_h.ptr, d_shared_pre.ptr, w.device(),
                     grads(), lc.B, lc.T);
        sync_after("moe_backward");
        out.dh = d_dh.download();
        out.dr = download_from(r.dr, (size_t)N * E);
        out.grads = d_grads.download();
        return out;
    }
};

// Rows `width` wide: the first `rows` of a slot-ordered GPU buffer, and the
// reference's rows of the given pairs (laid out like the mask).
static std::vector<double> first_rows(const std::vector<double>& m, size_t rows, int width) {
    return std::vector<double>(m.begin(), m.begin() + rows * width);
}
static std::vector<double> pair_rows(const std::vector<double>& m, const std::vector<size_t>& pairs, int width) {
    std::vector<double> out;
    for (size_t p : pairs) out.insert(out.end(), m.begin() + p * width, m.begin() + (p + 1) * width);
    return out;
}

static void check_layer(Test& t, const LayerCase& lc, uint64_t seed) {
    MoeLayer L(lc, seed);
    const int N = L.N, C = L.C, E = L.E, W = L.W;
    const std::string name = lc.name;
    const bool train = lc.pass == RoutingPass::Train;
    const Routing how = pass_routing(L.r, lc.pass);
    CHECK(t, how == lc.expect, "%s: routes by %s, expected %s", lc.name, routing_name(how), routing_name(lc.expect));
    const LayerRun run = L.run();

    // The logits: an fp32 matmul of the same inputs.
    check_close(t, name + " logits", to_doubles(run.logits), host_logits(L.h, L.w.router, N, C, E), TOL_FP32);

    // The selection, on exactly the GPU's logits, and the dispatch of it.
    const std::vector<int> mask = reference_selection(lc.router, lc.expect, train, run.logits, L.bias.data(),
                                                      L.raw.data(), cutoff_correction(L.r), lc.B, lc.T, E, nullptr);
    check_mask(t, name + " mask", run.mask, mask);
    // An eval pass by thresholds runs in sub-batches of tokens when the
    // buffers cannot hold E pairs per token: they hold the dispatch and the
    // expert rows of the last one, tokens `last` .. N-1 (all: last = 0).
    const MoeBuffers& buf = pass_buffers(L.r, 0, lc.pass);
    const int chunk = pass_chunk_tokens(L.r, lc.pass, how, lc.B, lc.T, buf.capacity);
    const int last = (N - 1) / chunk * chunk;
    const std::vector<int> last_mask(mask.begin() + (size_t)last * E, mask.end());
    Dispatch last_dispatch = run.dispatch;
    last_dispatch.slot_of.resize(last_mask.size());
    check_dispatch(t, name, last_mask, std::vector<float>(run.logits.begin() + (size_t)last * E, run.logits.end()),
                   N - last, E, buf.capacity, last_dispatch);
    std::vector<size_t> pairs = slot_pairs(last_mask, N - last, E, buf.capacity);
    for (size_t& p : pairs) p += (size_t)last * E;
    std::vector<int> counts(E);
    ref::expert_counts(counts.data(), mask.data(), N, E);
    CHECK(t, !pairs.empty(), "%s: nothing routed: the case tests nothing", lc.name);
    const int dropped = download_from(L.r.dropped, 1)[0];
    CHECK(t, dropped == 0, "%s: %d routed pairs dropped: the host's capacity bound is wrong", lc.name, dropped);
    if (lc.edge_cutoffs)
        CHECK(t, counts[0] == 0 && counts[1] == N, "%s: experts 0 and 1 got %d and %d tokens, not 0 and %d", lc.name,
              counts[0], counts[1], N);

    // Forward: the reference layer in double, on the same numbers.
    const std::vector<double> h = to_doubles(L.h), r = to_doubles(run.logits), dy = to_doubles(L.dy);
    std::vector<double> w[LAYER_TENSORS];
    for (int i = 0; i < LAYER_TENSORS; i++) w[i] = L.w.tensor(i);
    ref::MoeActivations<double> acts;
    std::vector<double> y((size_t)N * C);
    ref::moe_forward<double>(y.data(), &acts, h.data(), r.data(), mask.data(), w[SHARED_FC].data(),
                             w[SHARED_PROJ].data(), w[EXPERTS_FC].data(), w[EXPERTS_PROJ].data(), N, C, E);
    check_close(t, name + " y", to_doubles(run.y), y, TOL);
    check_close(t, name + " shared_pre", to_doubles(run.shared_pre), acts.shared_pre, TOL);
    check_close(t, name + " expert_pre", first_rows(to_doubles(run.expert_pre), pairs.size(), W),
                pair_rows(acts.expert_pre, pairs, W), TOL);
    check_close(t, name + " expert_out", first_rows(to_doubles(run.expert_out), pairs.size(), C),
                pair_rows(acts.expert_out, pairs, C), TOL);
    if (!train) return;

    // Backward, the routing held fixed, for the objective sum(y * dy) (plus
    // AUX_WEIGHT times the aux loss): the layer's gradients, then the
    // router's share of dh, dr W_r, and its weight gradient dr^T h.
    std::vector<double> dh((size_t)N * C), dr((size_t)N * E, 0.0), contribution(L.grad_start.size(), 0.0);
    auto grad = [&](int i) { return &contribution[tensor_offset(i, C, E)]; };
    ref::moe_backward<double>(dh.data(), dr.data(), grad(SHARED_FC), grad(SHARED_PROJ), grad(EXPERTS_FC),
                              grad(EXPERTS_PROJ), dy.data(), h.data(), r.data(), mask.data(), w[SHARED_FC].data(),
                              w[SHARED_PROJ].data(), w[EXPERTS_FC].data(), w[EXPERTS_PROJ].data(), acts, N, C, E);
    if (lc.router.kind == RouterKind::TC && lc.router.tc_balance == TcBalance::Aux)
        ref::aux_loss_backward<double>(dr.data(), r.data(), mask.data(), N, E, lc.router.aux_alpha, AUX_WEIGHT);
    std::vector<double> dh_router((size_t)N * C);
    ref::matmul_backward<double>(dh_router.data(), grad(ROUTER), dr.data(), h.data(), w[ROUTER].data(), N, C, E);
    for (size_t i = 0; i < dh.size(); i++) dh[i] += dh_router[i];
    check_close(t, name + " dh", to_doubles(run.dh), dh, TOL);
    check_close(t, name + " dr", to_doubles(run.dr), dr, TOL);
    const std::vector<double> got = to_doubles(run.grads), start = to_doubles(L.grad_start);
    for (int i = 0; i < LAYER_TENSORS; i++)
        check_accumulated(t, name + " d" + tensor_names[i], tensor_slice(got, i, C, E), tensor_slice(start, i, C, E),
                          tensor_slice(contribution, i, C, E), TOL);

    // dW_r from the GPU's own dr: an fp32 matmul of the same inputs (the
    // check above measures dr's error through it).
    std::vector<double> from_gpu_dr((size_t)E * C, 0.0), unused((size_t)N * C);
    ref::matmul_backward<double>(unused.data(), from_gpu_dr.data(), to_doubles(run.dr).data(), h.data(),
                                 w[ROUTER].data(), N, C, E);
    check_accumulated(t, name + " drouter = (GPU dr)^T h", tensor_slice(got, ROUTER, C, E),
                      tensor_slice(start, ROUTER, C, E), from_gpu_dr, TOL_FP32);

    // An expert with no token adds nothing to its gradients, not even -0.
    const size_t per_expert = (size_t)2 * C * C;
    for (int e = 0; e < E; e++) {
        if (counts[e] > 0) continue;
        for (int i : {EXPERTS_FC, EXPERTS_PROJ}) {
            const size_t first = tensor_offset(i, C, E) + e * per_expert;
            CHECK(t, std::memcmp(&run.grads[first], &L.grad_start[first], per_expert * sizeof(float)) == 0,
                  "%s: expert %d got no token but its %s gradient changed", lc.name, e, tensor_names[i]);
        }
    }
}

static void check_layers(Test& t, bool (*selected)(const LayerCase&)) {
    const std::vector<LayerCase> cases = layer_cases();
    for (size_t i = 0; i < cases.size(); i++)
        if (selected(cases[i])) check_layer(t, cases[i], 1501 + i);
}
// The router's logits kernel alone, on shapes the layer cases do not reach:
// tokens not a multiple of its ROUTER_TOKENS, experts past one tile of
// ROUTER_EXPERTS and not a multiple of it, a width not a multiple of a warp.
static void test_moe_router_logits(Test& t) {
    Rng rng(1201);
    for (int N : {5, 37})
        for (int C : {40, 96})
            for (int E : {3, 16, 20, 33}) {
                const std::vector<floatX> h = random_floatX(rng, (size_t)N * C, -1, 1);
                const std::vector<float> w = random_float(rng, (size_t)E * C, -0.5, 0.5);
                DeviceBuffer<floatX> d_h(h);
                DeviceBuffer<float> d_w(w), d_logits((size_t)N * E);
                d_logits.poison(INT_POISON);
                router_logits_kernel<<<ceil_div((size_t)ceil_div(N, ROUTER_TOKENS) * WARP, ROUTER_THREADS),
                                       ROUTER_THREADS>>>(d_logits.ptr, d_h.ptr, d_w.ptr, N, C, E);
                launchCheck();
                sync_after("router_logits_kernel");
                check_close(t, string_format("N=%d C=%d E=%d", N, C, E), to_doubles(d_logits.download()),
                            host_logits(h, w, N, C, E), TOL_FP32);
            }
}

static void test_moe_layer_tc(Test& t) {
    check_layers(t, [](const LayerCase& c) { return c.router.kind == RouterKind::TC; });
}
static void test_moe_layer_ec(Test& t) {
    check_layers(t, [](const LayerCase& c) { return c.router.kind == RouterKind::EC && c.pass == RoutingPass::Train; });
}
static void test_moe_layer_et(Test& t) {
    check_layers(t, [](const LayerCase& c) { return c.router.kind == RouterKind::ET && c.pass == RoutingPass::Train; });
}
static void test_moe_layer_eval(Test& t) {
    check_layers(t, [](const LayerCase& c) { return c.pass == RoutingPass::Eval; });
}

// Eval by thresholds in sub-batches of tokens (buffers sized for training
// hold fewer than E pairs per token: ET with the clamp, EC) must give what
// one pass over all tokens gives: the same inputs, weights and cutoffs
// through a router whose buffers hold N*E pairs (ET without the clamp) give
// the same mask and the same bits of y. With several sub-batches, the last
// one shorter; an expert with no token and one with every token (two row
// tiles per sub-batch); K = 3 over 8 experts.
static void test_moe_eval_sub_batches(Test& t) {
    struct Case {
        const char* name;
        int B, T, C, E;
        RouterConfig router;
        bool edge_cutoffs;
    };
    const Case cases[] = {
        {"et eval, buffers of the clamp", 2, 24, 48, 4, et_router(1, 0.5), false},
        {"et eval, an expert with no token, one with every token", 2, 100, 32, 4, et_router(1, 0.5), true},
        {"ec eval with tracked cutoffs, K=3 of 8 experts", 3, 24, 64, 8, ec_router(3, EcPool::MicroBatch), false},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const Case& c = cases[i];
        const LayerCase sub{c.name, c.B, c.T, c.C, c.E, c.router, 3, RoutingPass::Eval, Routing::Threshold,
                            c.edge_cutoffs};
        LayerCase whole = sub;
        whole.router = et_router(c.router.top_k, -1, c.router.ec_pool);
        MoeLayer a(sub, 1601 + i), b(whole, 1601 + i);
        const int N = c.B * c.T;
        const int chunk = pass_chunk_tokens(a.r, RoutingPass::Eval, Routing::Threshold, c.B, c.T,
                                            a.r.train[0].capacity);
        const int whole_chunk = pass_chunk_tokens(b.r, RoutingPass::Eval, Routing::Threshold, c.B, c.T,
                                                  b.r.train[0].capacity);
        CHECK(t, chunk < N && N % chunk != 0 && whole_chunk == N,
              "%s: sub-batches of %d and %d tokens of %d: the case does not test a short last sub-batch against one "
              "pass", c.name, chunk, whole_chunk, N);
        const LayerRun ra = a.run(), rb = b.run();
        CHECK(t, same_bits(ra.mask, rb.mask), "%s: the two routers select differently", c.name);
        CHECK(t, same_bits(ra.y, rb.y), "%s: y in sub-batches of %d tokens differs from one pass", c.name, chunk);
    }
}

// ----------------------------------------------------------------------------
// 4. The step's end: statistics and router state

struct StepCase {
    const char* name;
    int B, T, C, E;
    RouterConfig router;
    int updates;
};

// Two micro-steps through two MoE layers (a model of three layers), forward
// passes only (the statistics come from them), fresh inputs each time; the
// reference follows each pass on the GPU's logits. The EC statistic and the
// cutoff EMA are float arithmetic the GPU does in the reference's order
// (router.cuh rounds the EMA without fused multiply-adds), so the mean of the
// k-th largest logits is summed here in float in the kernels' order, and the
// step's EC cutoffs and the raw cutoffs after the EMA must match bit for bit.
// The cutoff in effect, raw / (1 - beta^updates), is host arithmetic on both
// sides (powf), compared to TOL_FP32. ET's cutoffs: expert 0 below every
// logit, expert 1 above (both clamped in every pool), the rest near the target.
static void check_step(Test& t, const StepCase& sc, uint64_t seed) {
    const int B = sc.B, T = sc.T, C = sc.C, E = sc.E, N = B * T, layers = 2, micro_steps = 2;
    const RouterConfig& rc = sc.router;
    const bool tracks_cutoffs = rc.kind != RouterKind::TC;
    ModelConfig mc;
    mc.n_layer = layers + 1;
    mc.n_embd = C;
    mc.n_experts = E;
    mc.router = rc;
    Router r;
    router_allocate(&r, mc, B, T);
    r.updates = sc.updates;
    Rng rng(seed);
    const LayerWeights w0(rng, C, E), w1(rng, C, E);
    const LayerWeights* weights[layers] = {&w0, &w1};
    const float correction = cutoff_correction(r), beta = (float)rc.et_beta;
    std::vector<float> raw((size_t)layers * E, 0.0f), bias((size_t)layers * E, 0.0f);
    for (int i = 0; i < layers * E; i++) {
        const int e = i % E;
        if (rc.kind == RouterKind::ET && sc.updates > 0)
            raw[i] = (e == 0 ? -10.0f : e == 1 ? 10.0f : (float)uniform(rng, 0.2, 0.6)) * correction;
        if (rc.kind == RouterKind::TC && rc.tc_balance == TcBalance::LossFree) bias[i] = (float)uniform(rng, -0.2, 0.2);
    }
    upload_to(r.raw_cutoff, raw);
    upload_to(r.tc_bias, bias);
    DeviceBuffer<floatX> d_h((size_t)N * C), d_y((size_t)N * C), d_shared_pre((size_t)N * 2 * C),
        d_act((size_t)N * 2 * C);
    int pool, k;
    pool_and_k(rc, B, T, E, &pool, &k);
    const int pools = N / pool;
    const Routing how = pass_routing(r, RoutingPass::Train);

    // the reference's account of the step, per layer
    std::vector<int> counts((size_t)layers * E, 0), clamped(layers, 0);
    std::vector<int64_t> fanout((size_t)layers * 4, 0);
    std::vector<float> kth_sum((size_t)layers * E, 0.0f);
    std::vector<double> aux(layers, 0.0);
    router_step_begin(r, 0);
    for (int micro = 0; micro < micro_steps; micro++) {
        router_micro_step(r, AUX_WEIGHT);
        for (int l = 0; l < layers; l++) {
            d_h.upload(random_floatX(rng, (size_t)N * C, -1, 1));
            moe_forward(r, l, g_cublas, d_y.ptr, d_shared_pre.ptr, d_act.ptr, d_h.ptr, weights[l]->device(), B, T,
                        RoutingPass::Train);
            sync_after("moe_forward");
            const std::vector<float> logits = download_from(r.train[l].logits, (size_t)N * E);
            const std::string what = string_format("%s micro-step %d layer %d", sc.name, micro, l);
            int changed;
            const std::vector<int> mask = reference_selection(rc, how, true, logits, &bias[(size_t)l * E],
                                                              &raw[(size_t)l * E], correction, B, T, E, &changed);
            check_mask(t, what, download_from(r.mask, (size_t)N * E), mask);
            clamped[l] += changed;
            for (int n = 0; n < N; n++) {
                int routed = 0;
                for (int e = 0; e < E; e++) {
                    counts[(size_t)l * E + e] += mask[(size_t)n * E + e];
                    routed += mask[(size_t)n * E + e];
                }
                fanout[(size_t)l * 4 + std::min(routed, 3)]++;
            }
            if (tracks_cutoffs) {
                std::vector<int> scratch((size_t)N * E);
                std::vector<float> kth((size_t)pools * E);
                ref::ec_select<float>(scratch.data(), kth.data(), logits.data(), N, E, pool, k);
                for (int e = 0; e < E; e++) {
                    float sum = 0.0f;
                    for (int p = 0; p < pools; p++) sum += kth[(size_t)p * E + e];
                    kth_sum[(size_t)l * E + e] += sum / pools;
                }
            }
            if (rc.kind == RouterKind::TC && rc.tc_balance == TcBalance::Aux)
                aux[l] += ref::aux_loss<double>(to_doubles(logits).data(), mask.data(), N, E, rc.aux_alpha);
        }
    }
    if (rc.kind == RouterKind::ET && sc.updates > 0)
        CHECK(t, clamped[0] > 0 && clamped[1] > 0, "%s: the clamp never acted: the case tests nothing", sc.name);

    // The statistics a logging step reads (before the step's end).
    std::vector<float> kth_mean((size_t)layers * E);
    for (int i = 0; i < layers * E; i++) kth_mean[i] = kth_sum[i] / micro_steps;
    const std::vector<LayerRoutingStats> stats = router_read_stats(r);
    CHECK(t, stats.size() == (size_t)layers, "%s: statistics of %zu layers, expected %d", sc.name, stats.size(),
          layers);
    for (int l = 0; l < layers && l < (int)stats.size(); l++) {
        const LayerRoutingStats& s = stats[l];
        const std::string what = string_format("%s layer %d", sc.name, l);
        const std::vector<int64_t> want_counts(counts.begin() + l * E, counts.begin() + (l + 1) * E);
        CHECK(t, s.layer == l + 1, "%s: reported as model layer %d", what.c_str(), s.layer);
        CHECK(t, s.tokens == (int64_t)micro_steps * N, "%s: %lld tokens, expected %d", what.c_str(),
              (long long)s.tokens, micro_steps * N);
        CHECK(t, s.counts == want_counts, "%s: expert counts differ from the reference's", what.c_str());
        CHECK(t, std::equal(s.fanout, s.fanout + 4, fanout.begin() + l * 4), "%s: fan-out differs", what.c_str());
        CHECK(t, s.clamped == clamped[l], "%s: %lld clamped pairs, the reference clamped %d", what.c_str(),
              (long long)s.clamped, clamped[l]);
        if (tracks_cutoffs) {
            const std::vector<float> want_batch(kth_mean.begin() + l * E, kth_mean.begin() + (l + 1) * E);
            CHECK(t, s.batch_cutoff == want_batch, "%s: the step's EC cutoffs differ from the reference's",
                  what.c_str());
            if (sc.updates > 0) {
                std::vector<float> cutoff(E);
                ref::et_cutoff<float>(cutoff.data(), &raw[(size_t)l * E], sc.updates, E, beta);
                check_close(t, what + " cutoff in effect", to_doubles(s.cutoff), to_doubles(cutoff), TOL_FP32);
            } else {
                CHECK(t, s.cutoff.empty(), "%s: a cutoff reported before the first update", what.c_str());
            }
        } else {
            CHECK(t, s.batch_cutoff.empty() && s.cutoff.empty(), "%s: TC reports cutoffs", what.c_str());
        }
        if (rc.kind == RouterKind::TC && rc.tc_balance == TcBalance::Aux)
            check_close(t, what + " aux loss", {s.aux_loss}, {aux[l] / micro_steps}, TOL_FP32);
        else
            CHECK(t, s.aux_loss == 0, "%s: aux loss %g without aux balancing", what.c_str(), s.aux_loss);
    }

    // The step's end.
    router_step_end(r);
    sync_after("router_step_end");
    const std::vector<float> raw_after = download_from(r.raw_cutoff, raw.size());
    const std::vector<float> bias_after = download_from(r.tc_bias, bias.size());
    if (tracks_cutoffs) {
        CHECK(t, r.updates == sc.updates + 1, "%s: %d cutoff updates after the step, expected %d", sc.name, r.updates,
              sc.updates + 1);
        std::vector<float> want = raw;
        for (int l = 0; l < layers; l++) {
            int updates = sc.updates;  // each layer's EMA is one update
            ref::et_cutoff_update<float>(&want[(size_t)l * E], &updates, &kth_mean[(size_t)l * E], E, beta);
        }
        CHECK(t, same_bits(raw_after, want), "%s: the raw cutoffs after the step differ from the reference EMA's",
              sc.name);
        CHECK(t, same_bits(bias_after, bias), "%s: the TC biases moved", sc.name);
        // From the first update on, the bias-corrected cutoff is a true average.
        const std::vector<LayerRoutingStats> after = router_read_stats(r);
        for (int l = 0; l < layers && l < (int)after.size(); l++) {
            std::vector<float> cutoff(E);
            ref::et_cutoff<float>(cutoff.data(), &want[(size_t)l * E], sc.updates + 1, E, beta);
            check_close(t, string_format("%s layer %d cutoff after the update", sc.name, l),
                        to_doubles(after[l].cutoff), to_doubles(cutoff), TOL_FP32);
        }
    } else {
        CHECK(t, r.updates == sc.updates, "%s: TC counted a cutoff update", sc.name);
        CHECK(t, same_bits(raw_after, raw), "%s: TC moved the raw cutoffs", sc.name);
        std::vector<float> want = bias;
        if (rc.tc_balance == TcBalance::LossFree)
            for (int l = 0; l < layers; l++)
                ref::lossfree_bias_update<float>(&want[(size_t)l * E], &counts[(size_t)l * E], E,
                                                 (float)rc.lossfree_rate);
        CHECK(t, same_bits(bias_after, want), "%s: the TC biases after the step differ from the reference's", sc.name);
    }
    router_free(&r);
}

// The TC aux loss's mean gate per expert, summed at two levels in a fixed
// order: many dispatch tiles (the last partial), and more experts than one
// block's threads (two spans of experts); against the mean in double, and
// the same bits a second time.
static void test_moe_gate_mean(Test& t) {
    Rng rng(1801);
    const struct {
        int N, E;
    } shapes[] = {{1000, 5}, {300, 300}};
    for (const auto& shape : shapes) {
        const int N = shape.N, E = shape.E, tiles = dispatch_tiles(N);
        const std::vector<float> logits = random_float(rng, (size_t)N * E, -4.0, 4.0);
        std::vector<double> want(E, 0.0);
        for (int n = 0; n < N; n++)
            for (int e = 0; e < E; e++) want[e] += ref::sigmoid((double)logits[(size_t)n * E + e]) / N;
        DeviceBuffer<float> d_logits(logits), d_partial((size_t)E * tiles), d_mean(E);
        std::vector<float> first;
        for (int run = 0; run < 2; run++) {
            d_partial.poison();
            d_mean.poison();
            gate_partial_kernel<<<tiles, DISPATCH_THREADS>>>(d_partial.ptr, d_logits.ptr, N, E);
            launchCheck();
            gate_mean_kernel<<<E, DISPATCH_THREADS>>>(d_mean.ptr, d_partial.ptr, tiles, N);
            launchCheck();
            sync_after("gate_partial_kernel, gate_mean_kernel");
            const std::vector<float> got = d_mean.download();
            if (run == 0) {
                check_close(t, string_format("N=%d E=%d gate mean", N, E), to_doubles(got), want, TOL_FP32);
                first = got;
            } else {
                CHECK(t, std::memcmp(first.data(), got.data(), E * sizeof(float)) == 0,
                      "N=%d E=%d: the gate mean differs from run to run", N, E);
            }
        }
    }
}

static void test_moe_step_end(Test& t) {
    const StepCase cases[] = {
        {"et after warm-up, clamp on", 2, 24, 48, 4, et_router(1, 0.5), 3},
        {"ec sequence pools, first update", 2, 24, 48, 6, ec_router(2, EcPool::Sequence), 0},
        {"tc aux", 2, 24, 48, 4, tc_router(2, TcBalance::Aux), 0},
        {"tc loss-free", 2, 24, 48, 4, tc_router(1, TcBalance::LossFree), 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) check_step(t, cases[i], 1701 + i);
}

// ----------------------------------------------------------------------------
// 5. Determinism

// The first output of two runs that differs in any bit, or null.
static const char* first_difference(const LayerRun& a, const LayerRun& b) {
    if (!same_bits(a.logits, b.logits)) return "logits";
    if (!same_bits(a.mask, b.mask)) return "mask";
    if (!same_bits(a.dispatch.slot_of, b.dispatch.slot_of) ||
        !same_bits(a.dispatch.slot_token, b.dispatch.slot_token) ||
        !same_bits(a.dispatch.slot_gate, b.dispatch.slot_gate) || !same_bits(a.dispatch.offsets, b.dispatch.offsets) ||
        !same_bits(a.dispatch.tile_expert, b.dispatch.tile_expert) ||
        !same_bits(a.dispatch.tile_row, b.dispatch.tile_row) || a.dispatch.num_tiles != b.dispatch.num_tiles)
        return "dispatch";
    if (!same_bits(a.y, b.y)) return "y";
    if (!same_bits(a.shared_pre, b.shared_pre)) return "shared_pre";
    if (!same_bits(a.expert_pre, b.expert_pre)) return "expert_pre";
    if (!same_bits(a.expert_out, b.expert_out)) return "expert_out";
    if (!same_bits(a.dh, b.dh)) return "dh";
    if (!same_bits(a.dr, b.dr)) return "dr";
    if (!same_bits(a.grads, b.grads)) return "weight gradients";
    return nullptr;
}

// Every layer case twice on the same inputs (poisoned afresh, gradients from
// the same start): every output and gradient the same bits.
static void test_moe_layer_determinism(Test& t) {
    const std::vector<LayerCase> cases = layer_cases();
    for (size_t i = 0; i < cases.size(); i++) {
        MoeLayer L(cases[i], 1501 + i);
        const LayerRun a = L.run(), b = L.run();
        const char* differs = first_difference(a, b);
        CHECK(t, differs == nullptr, "%s: %s differ between two identical runs", cases[i].name, differs);
    }
}

// ----------------------------------------------------------------------------
// 6. Causality of a whole model
//
// Two batches of tokens share positions 0..t of each sequence and differ
// after it; for a causal router, what positions <= t predict from must not
// change in a single bit. The later tokens are COLD (a token whose router
// logits are far below every other token's, for every expert) in one batch,
// HOT (far above) in the other, and random in a third: the change of routing
// after t is as large as it can be.
//
// The model makes HOT and COLD so: a direction d; the routers of both MoE
// layers are d + noise (row by row); HOT embeds as +sqrt(C) d, COLD as
// -sqrt(C) d, every other token's embedding has its d-component removed. The
// embedding is RMS-normalised, so a HOT token's normalised input has a
// d-component of sqrt(C) = 8 and a router logit near 7 after the blocks'
// small contributions (the zero-initialised matrices are drawn N(0, 0.02^2));
// other tokens' logits are about N(0, 0.7^2). (This very model run through
// the CPU reference in double: HOT logits >= 5.6, COLD <= -7.3, the others
// in [-1.7, 2.2], in both MoE layers, with weights in fp32 or in bf16.)
//
// EC in batch eval mode must leak, and here it provably does: the pool is the
// micro-batch (64 tokens, 32 at positions <= t), each expert takes its k = 16
// best. With COLD later tokens, every expert takes 16 tokens at positions
// <= t; with HOT ones, all 16 after t, and none at <= t. The premise (the
// logits margin) is checked on the last MoE layer's selection; given it,
// positions <= t lose all their routed experts in that layer, so their
// outputs change (unless random weights cancel exactly).
//
// ET in training: thresholds are causal, but the capacity clamp looks at the
// whole pool (a later token can push an earlier one out of a full expert),
// so the training pass is checked with the clamp off (capacity -1) and the
// cutoffs frozen (no step end between the runs). Its logits become dlogits,
// so the final normed hidden state lnf is compared instead.

static const int CAUSAL_B = 2, CAUSAL_T = 32, CAUSAL_LAST = 15;  // positions 0..15 must not see 16..31
static const int CAUSAL_VOCAB = 512, HOT = 510, COLD = 511;
static const float CAUSAL_CUTOFF = 0.5f;  // ET/EC tracked cutoff: about a quarter of the ordinary tokens pass

struct CausalCase {
    const char* name;
    RouterConfig router;
    int updates;
    RoutingPass pass;
    bool causal;
};

static void build_causal_model(Model* model, const CausalCase& cc) {
    ModelConfig c;
    c.preset = "gpu_test_moe";
    c.n_layer = 3;  // layer 0 dense, layers 1 and 2 MoE
    c.n_embd = 64;
    c.n_head = c.n_kv_head = 2;
    c.vocab_size = CAUSAL_VOCAB;
    c.seq_len = CAUSAL_T;
    c.n_experts = 4;
    c.router = cc.router;
    model->config = c;
    model_allocate(model, CAUSAL_B, CAUSAL_T);
    model_init_parameters(model, 1801);
    const int C = c.n_embd;
    std::vector<float> master = download_from(model->master, model->num_params);
    Rng rng(1802);
    for (size_t i = 0; i < model->tensors.size(); i++) {
        const ParamTensor& p = model->tensors[i];
        if (p.init_std != 0.0) continue;
        const size_t real = (size_t)((p.rows - p.padding_rows) * p.cols);
        for (size_t j = 0; j < real; j++) master[model->offsets[i] + j] = (float)(0.02 * normal(rng));
    }
    std::vector<double> d(C);
    double norm = 0;
    for (double& x : d) {
        x = normal(rng);
        norm += x * x;
    }
    for (double& x : d) x /= std::sqrt(norm);
    float* wte = &master[model->offsets[model->tensor_index("wte")]];
    for (int v = 0; v < c.vocab_size; v++) {
        float* row = wte + (size_t)v * C;
        double along = 0;
        for (int j = 0; j < C; j++) along += row[j] * d[j];
        for (int j = 0; j < C; j++)
            row[j] = v == HOT ? (float)(std::sqrt((double)C) * d[j])
                     : v == COLD ? (float)(-std::sqrt((double)C) * d[j])
                                 : (float)(row[j] - along * d[j]);
    }
    for (int l = 1; l < c.n_layer; l++) {
        float* router = &master[model->offsets[model->tensor_index("h" + std::to_string(l) + ".moe.router")]];
        for (int e = 0; e < c.n_experts; e++)
            for (int j = 0; j < C; j++)
                router[(size_t)e * C + j] = (float)(d[j] + 0.5 / std::sqrt((double)C) * normal(rng));
    }
    upload_to(model->master, master);
    copy_to_floatX(model->params, model->master, model->num_params);
    Router& r = model->router;
    r.updates = cc.updates;
    if (cc.updates > 0)
        upload_to(r.raw_cutoff, std::vector<float>(r.layers.size() * r.E, CAUSAL_CUTOFF * cutoff_correction(r)));
    sync_after("building the model");
}

// One pass over `tokens`; returns, per position, what its prediction is made
// from: the logits (width Vp), or after a training pass (whose logits become
// dlogits) the final normed hidden state lnf (width C). *mask: the last MoE
// layer's selection.
static std::vector<floatX> causal_run(Model& model, const CausalCase& cc, const std::vector<int>& tokens,
                                      const std::vector<int>& targets, std::vector<uint8_t>* mask) {
    const int B = CAUSAL_B, T = CAUSAL_T, N = B * T;
    const ModelConfig& c = model.config;
    upload_to(model.acts.tokens, tokens);
    upload_to(model.acts.targets, targets);
    cudaCheck(cudaMemset(model.loss_total, 0, sizeof(float)));
    if (cc.pass == RoutingPass::Train) {
        router_step_begin(model.router, 0);
        model_forward(&model, B, T, true, true, 1.0f / N);
    } else {
        model_forward(&model, B, T, cc.pass == RoutingPass::Eval, false, 0.0f);
    }
    sync_after("model_forward");
    *mask = download_from(model.router.mask, (size_t)N * c.n_experts);
    if (cc.pass == RoutingPass::Train) return download_from(model.acts.lnf, (size_t)N * c.n_embd);
    return download_from(model.acts.logits, (size_t)N * c.padded_vocab());
}

// Whether the rows of positions <= last (after: > last) of every sequence
// are bit-identical in a and b.
static bool rows_same(const std::vector<floatX>& a, const std::vector<floatX>& b, int T, int last, bool after) {
    const size_t width = a.size() / (CAUSAL_B * T);
    for (int n = 0; n < CAUSAL_B * T; n++)
        if ((n % T > last) == after && std::memcmp(&a[n * width], &b[n * width], width * sizeof(floatX)) != 0)
            return false;
    return true;
}

// Routed pairs of a selection at positions <= last (after: > last).
static int routed_at(const std::vector<uint8_t>& mask, int E, int T, int last, bool after) {
    int routed = 0;
    for (size_t i = 0; i < mask.size(); i++) routed += mask[i] && ((int)(i / E) % T > last) == after;
    return routed;
}

static void test_moe_causality(Test& t) {
    const CausalCase cases[] = {
        {"tc, generation", tc_router(1, TcBalance::Aux), 0, RoutingPass::Generate, true},
        {"et thresholds, generation", et_router(1, 0.5), 5, RoutingPass::Generate, true},
        {"et thresholds, eval", et_router(1, 0.5), 5, RoutingPass::Eval, true},
        {"ec with tracked cutoffs, eval", ec_router(1, EcPool::MicroBatch), 5, RoutingPass::Eval, true},
        {"et training, clamp off, cutoffs frozen", et_router(1, -1), 5, RoutingPass::Train, true},
        {"ec batch eval (leaks)", ec_router(1, EcPool::MicroBatch, EvalRouting::Batch), 5, RoutingPass::Eval, false},
    };
    const int B = CAUSAL_B, T = CAUSAL_T, N = B * T, E = 4;
    Rng rng(1803);
    std::vector<int> cold(N), hot(N), random(N), targets(N);
    for (int n = 0; n < N; n++) {
        const int ordinary = (int)rng.below(HOT);  // any token but HOT and COLD
        const bool later = n % T > CAUSAL_LAST;
        cold[n] = later ? COLD : ordinary;
        hot[n] = later ? HOT : ordinary;
        random[n] = later ? (int)rng.below(HOT) : ordinary;
        targets[n] = (int)rng.below(CAUSAL_VOCAB);
    }
    for (const CausalCase& cc : cases) {
        Model model;
        build_causal_model(&model, cc);
        std::vector<uint8_t> mask_cold, mask_hot, mask_random;
        const std::vector<floatX> out_cold = causal_run(model, cc, cold, targets, &mask_cold);
        const std::vector<floatX> out_hot = causal_run(model, cc, hot, targets, &mask_hot);
        const std::vector<floatX> out_random = causal_run(model, cc, random, targets, &mask_random);
        model_free(&model);

        CHECK(t, !rows_same(out_cold, out_hot, T, CAUSAL_LAST, true),
              "%s: the positions after t did not change either: the test is vacuous", cc.name);
        if (cc.causal && cc.router.kind != RouterKind::TC) {
            // thresholds: the later tokens' routing must really swing, from no expert to every one
            const int cold_later = routed_at(mask_cold, E, T, CAUSAL_LAST, true);
            const int hot_later = routed_at(mask_hot, E, T, CAUSAL_LAST, true);
            CHECK(t, cold_later == 0 && hot_later == B * (T - 1 - CAUSAL_LAST) * E,
                  "%s: the test's premise failed: in the last MoE layer the tokens after t routed %d pairs when "
                  "COLD (expected 0) and %d when HOT (expected %d)", cc.name, cold_later, hot_later,
                  B * (T - 1 - CAUSAL_LAST) * E);
        }
        if (cc.causal) {
            CHECK(t, rows_same(out_cold, out_hot, T, CAUSAL_LAST, false) &&
                         rows_same(out_cold, out_random, T, CAUSAL_LAST, false),
                  "%s: positions <= %d changed with the tokens after them", cc.name, CAUSAL_LAST);
            continue;
        }
        const int cold_later = routed_at(mask_cold, E, T, CAUSAL_LAST, true);
        const int hot_early = routed_at(mask_hot, E, T, CAUSAL_LAST, false);
        CHECK(t, cold_later == 0 && hot_early == 0,
              "%s: the test's premise failed: in the last MoE layer %d pairs after t were routed with COLD "
              "later tokens and %d at <= t with HOT ones (both should be 0)", cc.name, cold_later, hot_early);
        CHECK(t, !rows_same(out_cold, out_hot, T, CAUSAL_LAST, false),
              "%s: positions <= %d did not change with the tokens after them", cc.name, CAUSAL_LAST);
    }
}

// ----------------------------------------------------------------------------

int main() {
    return run_gpu_tests("gpu_moe", {
        GPU_TEST(moe_tc_select), GPU_TEST(moe_pool_select_top_k), GPU_TEST(moe_threshold_select),
        GPU_TEST(moe_pool_select_large),
        GPU_TEST(moe_dispatch), GPU_TEST(moe_expert_matmul_grid), GPU_TEST(moe_router_logits),
        GPU_TEST(moe_layer_tc), GPU_TEST(moe_layer_ec), GPU_TEST(moe_layer_et), GPU_TEST(moe_layer_eval),
        GPU_TEST(moe_eval_sub_batches),
        GPU_TEST(moe_gate_mean), GPU_TEST(moe_step_end),
        GPU_TEST(moe_layer_determinism),
        GPU_TEST(moe_causality),
    });
}
