// test_reference_moe: the CPU reference of the MoE layer and its routers
// (test/reference_moe.h) is right, so the GPU kernels can be checked against it.
//
// Selections are checked exactly: on random logits against brute-force sorts
// that follow the SPEC's words (some logits rounded to quarters, so ties are
// common), and on hand-made cases whose answers are written out, ties
// included. The ET cutoff EMA, the loss-free bias and the aux loss are checked
// against hand computations; the aux loss's and the layer's gradients against
// central differences in double precision, the routing held fixed. Then the
// edge cases the SPEC names (experts with no tokens, tokens with no expert,
// every token to one expert) and causality at the routing level.
#include <cmath>
#include <functional>

#include "check.h"
#include "gradcheck.h"
#include "reference_moe.h"

using Mask = std::vector<int>;

// Multiples of 0.25 in [-1, 1]: nine values, so equal logits are common and
// the tie rules get exercised.
static Vec random_quarters(Rng& rng, size_t n) {
    Vec v(n);
    for (double& x : v) x = ((int)rng.below(9) - 4) * 0.25;
    return v;
}

// Hand-made cases are easiest to read one expert at a time; the reference
// wants (N, E) rows. columns[i][n] -> out[n*E + i].
template <typename T>
static std::vector<T> from_columns(const std::vector<std::vector<T>>& columns) {
    const int E = (int)columns.size(), N = (int)columns[0].size();
    std::vector<T> out(N * E);
    for (int i = 0; i < E; i++)
        for (int n = 0; n < N; n++) out[n * E + i] = columns[i][n];
    return out;
}

static double largest_magnitude(const Vec& v) {
    double largest = 0;
    for (double x : v) largest = std::max(largest, std::fabs(x));
    return largest;
}

// ---------------------------------------------------------------------------
// Brute force, straight from the SPEC's words: sort the candidates and take
// the first ones.

// The candidates (given in index order) best first: by score, descending;
// the sort is stable, so of equal scores the lower index stays first.
static std::vector<int> best_first(std::vector<int> candidates, const std::function<double(int)>& score) {
    std::stable_sort(candidates.begin(), candidates.end(), [&](int a, int b) { return score(a) > score(b); });
    return candidates;
}

static std::vector<int> range(int first, int count) {
    std::vector<int> v(count);
    for (int j = 0; j < count; j++) v[j] = first + j;
    return v;
}

// Each token's K best experts by r + bias.
static Mask brute_tc(const Vec& r, const Vec* bias, int N, int E, int K) {
    Mask mask(N * E, 0);
    for (int n = 0; n < N; n++) {
        auto score = [&](int i) { return r[n * E + i] + (bias ? (*bias)[i] : 0.0); };
        std::vector<int> order = best_first(range(0, E), score);
        for (int j = 0; j < K; j++) mask[n * E + order[j]] = 1;
    }
    return mask;
}

// Each expert's k best tokens of each pool, and the k-th one's logit.
static Mask brute_ec(Vec* kth, const Vec& r, int N, int E, int pool, int k) {
    Mask mask(N * E, 0);
    kth->assign(N / pool * E, NAN);
    for (int first = 0; first < N; first += pool)
        for (int i = 0; i < E; i++) {
            std::vector<int> order = best_first(range(first, pool), [&](int n) { return r[n * E + i]; });
            for (int j = 0; j < k; j++) mask[order[j] * E + i] = 1;
            (*kth)[first / pool * E + i] = r[order[k - 1] * E + i];
        }
    return mask;
}

// The thresholds, then per pool and expert: over hi, keep the hi highest of
// the selected tokens; under lo, add the highest of the others until lo.
static Mask brute_et_clamped(int* clamped, const Vec& r, const Vec& cutoff, int N, int E, int pool, int k,
                             double capacity) {
    int lo, hi;
    et_capacity_bounds(k, capacity, &lo, &hi);
    Mask mask(N * E);
    *clamped = 0;
    for (int first = 0; first < N; first += pool)
        for (int i = 0; i < E; i++) {
            std::vector<int> selected, others;
            for (int n = first; n < first + pool; n++) {
                const bool above = r[n * E + i] >= cutoff[i];
                mask[n * E + i] = above;
                (above ? selected : others).push_back(n);
            }
            auto logit = [&](int n) { return r[n * E + i]; };
            const int count = (int)selected.size();
            if (count > hi) {
                std::vector<int> order = best_first(selected, logit);
                for (int j = hi; j < count; j++) mask[order[j] * E + i] = 0;
            } else if (count < lo) {
                std::vector<int> order = best_first(others, logit);
                for (int j = 0; j < lo - count; j++) mask[order[j] * E + i] = 1;
            }
            *clamped += count > hi || count < lo;
        }
    return mask;
}

// ---------------------------------------------------------------------------
// Token choice

static void test_tc_select_random(Test& t) {
    Rng rng(1);
    const int N = 9, E = 5;
    for (int trial = 0; trial < 20; trial++)
        for (int K = 1; K <= 3; K++) {
            const bool ties = trial % 2;
            const Vec r = ties ? random_quarters(rng, N * E) : random_vector(rng, N * E);
            const Vec bias = ties ? random_quarters(rng, E) : random_vector(rng, E, -0.5, 0.5);
            for (const Vec* b : {(const Vec*)nullptr, &bias}) {
                Mask mask(N * E, -1);
                tc_select(mask.data(), r.data(), b ? b->data() : nullptr, N, E, K);
                CHECK(t, mask == brute_tc(r, b, N, E, K), "trial %d, K = %d, %s bias, %s: not the top-K", trial, K,
                      b ? "with" : "no", ties ? "ties" : "no ties");
            }
        }
}

static void test_tc_select_hand(Test& t) {
    struct Case { Vec r, bias; int K; Mask expected; const char* why; };
    const std::vector<Case> cases = {
        {{1, 3, 3, 0}, {}, 1, {0, 1, 0, 0}, "a tie for first: the lower expert"},
        {{1, 3, 3, 0}, {}, 2, {0, 1, 1, 0}, "both tied experts"},
        {{2, 2, 2, 2}, {}, 1, {1, 0, 0, 0}, "all equal, K = 1"},
        {{2, 2, 2, 2}, {}, 3, {1, 1, 1, 0}, "all equal, K = 3"},
        {{1, 0.75}, {}, 1, {1, 0}, "no bias: the larger logit"},
        {{1, 0.75}, {0, 0.5}, 1, {0, 1}, "the bias overturns it: 1.25 > 1"},
        {{1, 0.5}, {0, 0.5}, 1, {1, 0}, "the bias makes a tie: the lower expert"},
    };
    for (const Case& c : cases) {
        const int E = (int)c.r.size();
        Mask mask(E, -1);
        tc_select(mask.data(), c.r.data(), c.bias.empty() ? nullptr : c.bias.data(), 1, E, c.K);
        CHECK(t, mask == c.expected, "%s", c.why);
    }
}

// ---------------------------------------------------------------------------
// Expert choice

static void test_ec_select_random(Test& t) {
    Rng rng(2);
    const int B = 3, T = 6, N = B * T, E = 3, K = 1;
    for (int trial = 0; trial < 20; trial++)
        for (int pool : {N, T}) {
            const int k = pool * K / E;
            const bool ties = trial % 2;
            const Vec r = ties ? random_quarters(rng, N * E) : random_vector(rng, N * E);
            Mask mask(N * E, -1);
            Vec kth = nans(N / pool * E), expected_kth;
            ec_select(mask.data(), kth.data(), r.data(), N, E, pool, k);
            CHECK(t, mask == brute_ec(&expected_kth, r, N, E, pool, k), "trial %d, pool %d: not the top-k", trial,
                  pool);
            CHECK(t, kth == expected_kth, "trial %d, pool %d: not the k-th largest logit", trial, pool);
        }
}

static void test_ec_select_hand(Test& t) {
    // Two sequences of 4 tokens, two experts.
    const Vec r = from_columns<double>({
        {0.5, 0.9, 0.5, 0.5, /**/ -1, -1, 0.25, -1},
        {1, 1, 1, 1, /**/ 0, 2, 1, 0.5},
    });
    const int N = 8, E = 2;
    Mask mask(N * E);
    Vec kth = nans(2 * E);  // two pools at most

    // Per sequence, k = 2. Expert 0: token 1, then of the three 0.5s the
    // first; in sequence 2 token 6, then of the three -1s the first. Expert 1:
    // four tied 1s, the first two; then tokens 5 (2) and 6 (1).
    ec_select(mask.data(), kth.data(), r.data(), N, E, 4, 2);
    CHECK(t, mask == from_columns<int>({{1, 1, 0, 0, 1, 0, 1, 0}, {1, 1, 0, 0, 0, 1, 1, 0}}), "per sequence");
    CHECK(t, kth[0] == 0.5 && kth[1] == 1 && kth[2] == -1 && kth[3] == 1, "per sequence: k-th logits %g %g %g %g",
          kth[0], kth[1], kth[2], kth[3]);

    // The micro-batch, k = 4. Expert 0: 0.9 and the three 0.5s. Expert 1:
    // token 5 (2), then of the five tied 1s the first three.
    ec_select(mask.data(), kth.data(), r.data(), N, E, N, 4);
    CHECK(t, mask == from_columns<int>({{1, 1, 1, 1, 0, 0, 0, 0}, {1, 1, 1, 0, 0, 1, 0, 0}}), "micro-batch");
    CHECK(t, kth[0] == 0.5 && kth[1] == 1, "micro-batch: k-th logits %g %g", kth[0], kth[1]);
}

// ---------------------------------------------------------------------------
// Expert threshold

static void test_et_select_thresholds(Test& t) {
    // Exactly at the cutoff is in; the next double below it is out.
    const Vec cutoff = {0.25, 0.5, 0};
    const Vec r = {0.25, std::nextafter(0.5, 0.0), -0.25, /**/ 1, 1, 0};
    Mask mask(6, -1);
    CHECK(t, et_select(mask.data(), r.data(), cutoff.data(), 2, 3, 2, 1, 0.5, false) == 0, "eval clamped");
    CHECK(t, mask == Mask({1, 0, 0, 1, 1, 1}), "hand case: not r >= c");

    // Random, in eval and in training without the clamp: r >= c, nothing else.
    Rng rng(3);
    const int B = 2, T = 5, N = B * T, E = 3;
    for (int trial = 0; trial < 20; trial++) {
        Vec logits = random_quarters(rng, N * E), cutoffs = random_quarters(rng, E);
        Mask expected(N * E);
        for (int j = 0; j < N * E; j++) expected[j] = logits[j] >= cutoffs[j % E];
        for (bool training : {false, true}) {
            const double capacity = training ? -1 : 0.5;
            Mask got(N * E, -1);
            int clamped = et_select(got.data(), logits.data(), cutoffs.data(), N, E, T, 2, capacity, training);
            CHECK(t, got == expected && clamped == 0, "trial %d, training %d: not the thresholds alone", trial,
                  training);
        }
    }
}

static void test_et_capacity_bounds(Test& t) {
    struct Case { int k; double capacity; int lo, hi; };
    const std::vector<Case> cases = {
        {4, 0.5, 2, 6},   {5, 0.5, 3, 7},  // 2.5 rounds up to 3, 7.5 down to 7
        {1, 0.5, 1, 1},   {3, 0, 3, 3},
        // Integers in exact arithmetic that plain doubles round past:
        // 10 * (1 - 0.7) = 3.0000000000000004, 45 * (1 + 0.4) = 62.99999999999999.
        {10, 0.7, 3, 17}, {45, 0.4, 27, 63},
        {4, 1, 0, 8},     {4, 1.5, 0, 10},  // lo never below 0
    };
    for (const Case& c : cases) {
        int lo = -1, hi = -1;
        et_capacity_bounds(c.k, c.capacity, &lo, &hi);
        CHECK(t, lo == c.lo && hi == c.hi, "k %d, C %g: [%d, %d], expected [%d, %d]", c.k, c.capacity, lo, hi, c.lo,
              c.hi);
    }
}

static void test_et_clamp_hand(Test& t) {
    // One pool of 8 tokens, k = 4, C = 0.5: each expert keeps 2..6 tokens.
    const int N = 8, E = 5, k = 4;
    const Vec cutoff(E, 0.0);
    const Vec r = from_columns<double>({
        {0.5, 0.25, 0.25, 1, 0.25, 0.75, 0.25, -1},      // 7 above: over hi
        {-0.5, 2, -0.25, -0.75, -0.25, -1, -0.25, -2},  // 1 above: under lo
        {0, -1, 3, -1, 1, -1, 2, -1},                   // 4 (one exactly at 0): inside
        {-1, -1, 1, -1, -1, -1, -1, 1},                 // exactly lo
        {1, 1, -1, 1, 1, -1, 1, 1},                     // exactly hi
    });
    const Mask thresholds = from_columns<int>({
        {1, 1, 1, 1, 1, 1, 1, 0},
        {0, 1, 0, 0, 0, 0, 0, 0},
        {1, 0, 1, 0, 1, 0, 1, 0},
        {0, 0, 1, 0, 0, 0, 0, 1},
        {1, 1, 0, 1, 1, 0, 1, 1},
    });
    // Expert 0 drops one of its four tied 0.25s, the last (token 6). Expert 1
    // adds one of its three tied -0.25s, the first (token 2).
    const Mask clamped_mask = from_columns<int>({
        {1, 1, 1, 1, 1, 1, 0, 0},
        {0, 1, 1, 0, 0, 0, 0, 0},
        {1, 0, 1, 0, 1, 0, 1, 0},
        {0, 0, 1, 0, 0, 0, 0, 1},
        {1, 1, 0, 1, 1, 0, 1, 1},
    });
    Mask mask(N * E, -1);
    int clamped = et_select(mask.data(), r.data(), cutoff.data(), N, E, N, k, 0.5, true);
    CHECK(t, mask == clamped_mask, "training: not the clamped selection");
    CHECK(t, clamped == 2, "training: %d experts clamped, expected 2", clamped);

    clamped = et_select(mask.data(), r.data(), cutoff.data(), N, E, N, k, 0.5, false);
    CHECK(t, mask == thresholds && clamped == 0, "eval: clamped");
    clamped = et_select(mask.data(), r.data(), cutoff.data(), N, E, N, k, -1.0, true);
    CHECK(t, mask == thresholds && clamped == 0, "training with capacity < 0: clamped");
}

static void test_et_clamp_random(Test& t) {
    Rng rng(4);
    const int B = 3, T = 8, N = B * T, E = 4, K = 1;
    int over = 0, under = 0;  // that the random cases reach both sides of the clamp
    for (int trial = 0; trial < 40; trial++)
        for (int pool : {T, N}) {
            const int k = pool * K / E;
            Vec r = random_quarters(rng, N * E), cutoff = random_quarters(rng, E);
            int expected_clamped;
            const Mask expected = brute_et_clamped(&expected_clamped, r, cutoff, N, E, pool, k, 0.5);
            Mask mask(N * E, -1);
            int clamped = et_select(mask.data(), r.data(), cutoff.data(), N, E, pool, k, 0.5, true);
            CHECK(t, mask == expected, "trial %d, pool %d: wrong clamped selection", trial, pool);
            CHECK(t, clamped == expected_clamped, "trial %d, pool %d: %d clamped, expected %d", trial, pool, clamped,
                  expected_clamped);
            int lo, hi;
            et_capacity_bounds(k, 0.5, &lo, &hi);
            for (int first = 0; first < N; first += pool)
                for (int i = 0; i < E; i++) {
                    int count = 0;
                    for (int n = first; n < first + pool; n++) count += r[n * E + i] >= cutoff[i];
                    over += count > hi;
                    under += count < lo;
                }
        }
    CHECK(t, over > 0 && under > 0, "the random cases never clamp both ways (%d over, %d under)", over, under);
}

// A cutoff above every logit: the thresholds take nothing; the clamp then
// fills each expert up to lo from the top, which is EC with k = lo.
static void test_et_cutoff_above_all(Test& t) {
    Rng rng(5);
    const int B = 2, T = 8, N = B * T, E = 4, k = 4;  // K = 2
    const double capacity = 0.25;                     // lo = 3
    const Vec r = random_quarters(rng, N * E), cutoff(E, 10.0);
    Mask mask(N * E, -1), ec(N * E);
    et_select(mask.data(), r.data(), cutoff.data(), N, E, T, k, capacity, false);
    CHECK(t, mask == Mask(N * E, 0), "eval: a token passed a cutoff above every logit");
    int clamped = et_select(mask.data(), r.data(), cutoff.data(), N, E, T, k, capacity, true);
    ec_select(ec.data(), (double*)nullptr, r.data(), N, E, T, 3);
    CHECK(t, mask == ec, "training: not the top lo = 3 of each pool");
    CHECK(t, clamped == B * E, "%d clamped, expected every one of %d", clamped, B * E);
}

static void test_et_cutoff_ema(Test& t) {
    // beta 0.9; expert 0 sees batch means 2, 4, 1; expert 1 sees 3 throughout.
    //   raw = 0.1 * 2                = 0.2    c = 0.2   / (1 - 0.9)   = 2
    //   raw = 0.9 * 0.2  + 0.1 * 4   = 0.58   c = 0.58  / (1 - 0.81)  = 3.0526315789473686
    //   raw = 0.9 * 0.58 + 0.1 * 1   = 0.622  c = 0.622 / (1 - 0.729) = 2.2952029520295203
    const double beta = 0.9;
    const Vec means[3] = {{2, 3}, {4, 3}, {1, 3}};
    const double raw_expected[3] = {0.2, 0.58, 0.622}, cutoff_expected[3] = {2, 3.0526315789473686, 2.2952029520295203};
    Vec raw = {0, 0}, cutoff(2);
    int updates = 0;
    for (int step = 0; step < 3; step++) {
        et_cutoff_update(raw.data(), &updates, means[step].data(), 2, beta);
        et_cutoff(cutoff.data(), raw.data(), updates, 2, beta);
        CHECK(t, updates == step + 1, "update %d: count %d", step + 1, updates);
        CHECK(t, std::fabs(raw[0] - raw_expected[step]) < 1e-15, "update %d: raw %.17g", step + 1, raw[0]);
        CHECK(t, std::fabs(cutoff[0] - cutoff_expected[step]) < 1e-14, "update %d: cutoff %.17g", step + 1, cutoff[0]);
        CHECK(t, std::fabs(cutoff[1] - 3) < 1e-14, "update %d: constant 3 gave cutoff %.17g", step + 1, cutoff[1]);
    }
}

// With the same batch statistic every step, the bias-corrected cutoff is that
// statistic from the first update on: no drift up from raw's 0.
static void test_et_cutoff_constant(Test& t) {
    const Vec statistic = {-0.75, 0.1, 2.5};
    for (double beta : {0.9, 0.999}) {
        Vec raw(3, 0.0), cutoff(3);
        int updates = 0;
        for (int step = 1; step <= 10; step++) {
            et_cutoff_update(raw.data(), &updates, statistic.data(), 3, beta);
            et_cutoff(cutoff.data(), raw.data(), updates, 3, beta);
            for (int i = 0; i < 3; i++)
                CHECK(t, std::fabs(cutoff[i] - statistic[i]) < 1e-12 * std::fabs(statistic[i]),
                      "beta %g, update %d, expert %d: cutoff %.17g, statistic %g", beta, step, i, cutoff[i],
                      statistic[i]);
        }
    }
}

// ---------------------------------------------------------------------------
// Balancing: the loss-free bias and the aux loss

static void test_lossfree_bias(Test& t) {
    // Counts 3, 1, 2, 2: mean 2, so the busy expert 0 goes down by u, the idle
    // expert 1 up by u, and the two at the mean stay.
    Vec bias = {0.1, -0.2, 0, 0.5};
    const int counts[4] = {3, 1, 2, 2};
    lossfree_bias_update(bias.data(), counts, 4, 0.001);
    CHECK(t, std::fabs(bias[0] - 0.099) < 1e-15 && std::fabs(bias[1] - -0.199) < 1e-15 && bias[2] == 0 &&
                 bias[3] == 0.5,
          "got [%.17g %.17g %.17g %.17g]", bias[0], bias[1], bias[2], bias[3]);

    // A mean that is not an integer: counts 1, 2 have mean 1.5.
    Vec two = {0, 0};
    const int uneven[2] = {1, 2};
    lossfree_bias_update(two.data(), uneven, 2, 0.25);
    CHECK(t, two == Vec({0.25, -0.25}), "mean 1.5: got [%g %g]", two[0], two[1]);
}

static void test_aux_loss_forward(Test& t) {
    // N = 4, E = 2, alpha = 0.01. Tokens 0-2 go to expert 0, token 3 to
    // expert 1: f = (2/4) * (3, 1) = (1.5, 0.5). Logits 0 and +-log 3 have
    // gates 0.5 and 0.75 / 0.25: P_0 = (0.5 + 0.75 + 0.25 + 0.5) / 4 = 0.5,
    // P_1 = (3 * 0.75 + 0.5) / 4 = 0.6875.
    // loss = 0.01 * (1.5 * 0.5 + 0.5 * 0.6875) = 0.0109375.
    const double l3 = std::log(3.0);
    const Vec r = from_columns<double>({{0, l3, -l3, 0}, {l3, l3, 0, l3}});
    const Mask mask = from_columns<int>({{1, 1, 1, 0}, {0, 0, 0, 1}});
    const double loss = aux_loss(r.data(), mask.data(), 4, 2, 0.01);
    CHECK(t, std::fabs(loss - 0.0109375) < 1e-15, "loss %.17g, expected 0.0109375", loss);

    // Nobody routed: every f is 0.
    CHECK(t, aux_loss(r.data(), Mask(8, 0).data(), 4, 2, 0.01) == 0, "no routing, yet a loss");
}

static void test_aux_loss_backward(Test& t) {
    Rng rng(6);
    const int N = 7, E = 4;
    const double alpha = 0.01, dloss = 0.7;
    Vec r = random_vector(rng, N * E, -2, 2);
    Mask mask(N * E);
    tc_select(mask.data(), r.data(), (const double*)nullptr, N, E, 2);
    Vec before = random_vector(rng, N * E), dr = before;  // it accumulates
    aux_loss_backward(dr.data(), r.data(), mask.data(), N, E, alpha, dloss);
    check_gradient(t, "dr", &r, minus(dr, before),
                   [&] { return dloss * aux_loss(r.data(), mask.data(), N, E, alpha); });
}

// ---------------------------------------------------------------------------
// The MoE layer

// What the backward produces, one gradient per input of the layer.
struct MoeGrads {
    Vec h, r, shared_fc, shared_proj, experts_fc, experts_proj;
};

// A layer of the brief's test size with random weights (the
// down-projections too: zero, as at init, would hide their gradients), a
// random input and upstream gradient, and a given routing.
struct MoeProblem {
    static constexpr int N = 7, C = 6, E = 4;
    Vec h, r, shared_fc, shared_proj, experts_fc, experts_proj, dy;
    Mask mask;
    Vec y = nans(N * C);
    MoeActivations<double> acts;

    MoeProblem(uint64_t seed, const Mask& routing) : mask(routing) {
        Rng rng(seed);
        h = random_vector(rng, N * C);
        r = random_vector(rng, N * E, -2, 2);
        shared_fc = random_vector(rng, 2 * C * C);
        shared_proj = random_vector(rng, 2 * C * C);
        experts_fc = random_vector(rng, E * 2 * C * C);
        experts_proj = random_vector(rng, E * 2 * C * C);
        dy = random_vector(rng, N * C);
    }
    void forward() {
        moe_forward(y.data(), &acts, h.data(), r.data(), mask.data(), shared_fc.data(), shared_proj.data(),
                    experts_fc.data(), experts_proj.data(), N, C, E);
    }
    // The objective whose gradient the backward computes: sum(y * dy).
    double objective() {
        forward();
        return dot(y, dy);
    }
    void backward(MoeGrads* g) const {
        moe_backward(g->h.data(), g->r.data(), g->shared_fc.data(), g->shared_proj.data(), g->experts_fc.data(),
                     g->experts_proj.data(), dy.data(), h.data(), r.data(), mask.data(), shared_fc.data(),
                     shared_proj.data(), experts_fc.data(), experts_proj.data(), acts, N, C, E);
    }
};

// Seven tokens, four experts: tokens 2, 5 and 6 have two experts, token 4
// none, expert 3 no token.
static const Mask mixed_routing = from_columns<int>({
    {1, 0, 1, 0, 0, 0, 1},
    {0, 1, 1, 0, 0, 1, 0},
    {0, 0, 0, 1, 0, 1, 1},
    {0, 0, 0, 0, 0, 0, 0},
});
// Every token to expert 1, the others empty.
static const Mask all_to_one = from_columns<int>({
    {0, 0, 0, 0, 0, 0, 0},
    {1, 1, 1, 1, 1, 1, 1},
    {0, 0, 0, 0, 0, 0, 0},
    {0, 0, 0, 0, 0, 0, 0},
});

static void check_layer_gradient(Test& t, const char* routing, const Mask& mask) {
    const int N = MoeProblem::N, C = MoeProblem::C, E = MoeProblem::E;
    MoeProblem p(7, mask);
    p.forward();
    // dh is overwritten, so it starts as NaN; everything else accumulates
    // onto random values, subtracted again below.
    Rng rng(8);
    const MoeGrads before = {nans(N * C), random_vector(rng, N * E), random_vector(rng, 2 * C * C),
                             random_vector(rng, 2 * C * C), random_vector(rng, E * 2 * C * C),
                             random_vector(rng, E * 2 * C * C)};
    MoeGrads g = before;
    p.backward(&g);

    const struct { const char* name; Vec* x; Vec analytic; } grads[] = {
        {"dh", &p.h, g.h},
        {"dr", &p.r, minus(g.r, before.r)},
        {"dshared_fc", &p.shared_fc, minus(g.shared_fc, before.shared_fc)},
        {"dshared_proj", &p.shared_proj, minus(g.shared_proj, before.shared_proj)},
        {"dexperts_fc", &p.experts_fc, minus(g.experts_fc, before.experts_fc)},
        {"dexperts_proj", &p.experts_proj, minus(g.experts_proj, before.experts_proj)},
    };
    for (const auto& grad : grads) {
        const std::string what = std::string(routing) + ": " + grad.name;
        check_gradient(t, what, grad.x, grad.analytic, [&] { return p.objective(); });
        // a vanished gradient would make the comparison empty
        CHECK(t, largest_magnitude(grad.analytic) > 1e-4, "%s: largest gradient %.3g", what.c_str(),
              largest_magnitude(grad.analytic));
    }

    // Exactly nothing flows where nothing was routed: to unrouted gates, and
    // to the weights of experts without tokens.
    const Vec &dr = grads[1].analytic, &dexperts_fc = grads[4].analytic, &dexperts_proj = grads[5].analytic;
    for (int i = 0; i < E; i++) {
        int count = 0;
        for (int n = 0; n < N; n++) {
            count += mask[n * E + i];
            if (!mask[n * E + i]) CHECK(t, dr[n * E + i] == 0, "%s: dr of unrouted pair (%d, %d)", routing, n, i);
        }
        if (count > 0) continue;
        for (size_t j = expert_offset(i, C); j < expert_offset(i + 1, C); j++)
            CHECK(t, dexperts_fc[j] == 0 && dexperts_proj[j] == 0, "%s: empty expert %d has a gradient", routing, i);
    }
}

static void test_layer_gradient(Test& t) { check_layer_gradient(t, "mixed routing", mixed_routing); }
static void test_layer_gradient_all_to_one(Test& t) { check_layer_gradient(t, "all to one", all_to_one); }

// Empty experts and tokens without an expert give finite values everywhere,
// and such a token's output is the shared expert's alone.
static void test_layer_edge_cases(Test& t) {
    const int N = MoeProblem::N, C = MoeProblem::C, E = MoeProblem::E;
    MoeProblem shared_only(9, Mask(N * E, 0));  // nothing routed: y = shared(h)
    shared_only.forward();

    const std::pair<const char*, const Mask*> routings[] = {{"mixed routing", &mixed_routing},
                                                            {"all to one", &all_to_one}};
    for (const auto& [name, mask] : routings) {
        MoeProblem p(9, *mask);  // the same seed: the same weights and inputs
        p.forward();
        MoeGrads g = {Vec(N * C), Vec(N * E, 0.0), Vec(2 * C * C, 0.0), Vec(2 * C * C, 0.0), Vec(E * 2 * C * C, 0.0),
                      Vec(E * 2 * C * C, 0.0)};
        p.backward(&g);
        for (const Vec* v : {&p.y, &g.h, &g.r, &g.shared_fc, &g.shared_proj, &g.experts_fc, &g.experts_proj})
            for (double x : *v) CHECK(t, std::isfinite(x), "%s: a value is not finite", name);
        for (int n = 0; n < N; n++) {
            bool routed = false;
            for (int i = 0; i < E; i++) routed |= (*mask)[n * E + i];
            if (routed) continue;
            for (int c = 0; c < C; c++)
                CHECK(t, p.y[n * C + c] == shared_only.y[n * C + c],
                      "%s: token %d has no expert, yet its output is not the shared expert's", name, n);
        }
    }
}

// ---------------------------------------------------------------------------
// Causality at the routing level

// Whether the masks of the tokens at positions <= t agree, in every sequence.
static bool same_up_to(const Mask& a, const Mask& b, int t, int B, int T, int E) {
    for (int s = 0; s < B; s++)
        for (int n = s * T; n <= s * T + t; n++)
            for (int i = 0; i < E; i++)
                if (a[n * E + i] != b[n * E + i]) return false;
    return true;
}

static void test_routing_causality(Test& t) {
    // TC and ET (eval, and training without the clamp) route each token
    // alone: new logits after position t change no mask at or before it.
    Rng rng(10);
    const int B = 2, T = 6, N = B * T, E = 4;
    const Vec r = random_vector(rng, N * E), bias = random_vector(rng, E, -0.5, 0.5);
    const Vec cutoff = random_vector(rng, E, -0.5, 0.5);
    for (int pos = 0; pos < T - 1; pos++) {
        Vec later = r;  // fresh logits at every position after pos
        for (int n = 0; n < N; n++)
            if (n % T > pos)
                for (int i = 0; i < E; i++) later[n * E + i] = rng.uniform() * 2 - 1;
        Mask a(N * E), b(N * E);
        tc_select(a.data(), r.data(), bias.data(), N, E, 2);
        tc_select(b.data(), later.data(), bias.data(), N, E, 2);
        CHECK(t, same_up_to(a, b, pos, B, T, E), "TC: a later token changed a route at or before %d", pos);
        for (bool training : {false, true}) {
            et_select(a.data(), r.data(), cutoff.data(), N, E, T, 2, training ? -1 : 0.5, training);
            et_select(b.data(), later.data(), cutoff.data(), N, E, T, 2, training ? -1 : 0.5, training);
            CHECK(t, same_up_to(a, b, pos, B, T, E), "ET (training %d, no clamp): a later token changed a route at "
                  "or before %d", training, pos);
        }
    }

    // EC with the micro-batch as its pool: two sequences of 2 tokens, k = 2.
    // Expert 0 takes tokens 0 and 2; when token 3 (position 1) scores higher,
    // token 2 (position 0) loses its place.
    {
        Vec logits = from_columns<double>({{0.5, -1, 0.25, -1}, {-0.5, 0.5, -0.5, 0.5}});
        Mask before(8), after(8);
        ec_select(before.data(), (double*)nullptr, logits.data(), 4, 2, 4, 2);
        logits[3 * 2 + 0] = 1;
        ec_select(after.data(), (double*)nullptr, logits.data(), 4, 2, 4, 2);
        CHECK(t, before[2 * 2 + 0] == 1 && after[2 * 2 + 0] == 0, "EC: token 2 did not lose expert 0 to token 3");
        CHECK(t, !same_up_to(before, after, 0, 2, 2, 2), "EC: a later token changed no earlier route");
    }

    // ET's training clamp ranks the pool too, so it is not causal either: a
    // pool of 4, k = 2, C = 0.5 (hi = 3). Three tokens pass the cutoff, then
    // a fourth, later one does: the clamp drops the lowest-ranked, token 2.
    {
        Vec logits = {1, 1, 1, -1};
        const Vec zero = {0};
        Mask before(4), after(4);
        et_select(before.data(), logits.data(), zero.data(), 4, 1, 4, 2, 0.5, true);
        logits[3] = 2;
        et_select(after.data(), logits.data(), zero.data(), 4, 1, 4, 2, 0.5, true);
        CHECK(t, before == Mask({1, 1, 1, 0}) && after == Mask({1, 1, 0, 1}), "ET clamp: token 2 kept its expert");
    }
}

int main() {
    return run_tests({
        {"reference_moe_tc_select_random", test_tc_select_random},
        {"reference_moe_tc_select_hand", test_tc_select_hand},
        {"reference_moe_ec_select_random", test_ec_select_random},
        {"reference_moe_ec_select_hand", test_ec_select_hand},
        {"reference_moe_et_select_thresholds", test_et_select_thresholds},
        {"reference_moe_et_capacity_bounds", test_et_capacity_bounds},
        {"reference_moe_et_clamp_hand", test_et_clamp_hand},
        {"reference_moe_et_clamp_random", test_et_clamp_random},
        {"reference_moe_et_cutoff_above_all", test_et_cutoff_above_all},
        {"reference_moe_et_cutoff_ema", test_et_cutoff_ema},
        {"reference_moe_et_cutoff_constant", test_et_cutoff_constant},
        {"reference_moe_lossfree_bias", test_lossfree_bias},
        {"reference_moe_aux_loss_forward", test_aux_loss_forward},
        {"reference_moe_aux_loss_backward", test_aux_loss_backward},
        {"reference_moe_layer_gradient", test_layer_gradient},
        {"reference_moe_layer_gradient_all_to_one", test_layer_gradient_all_to_one},
        {"reference_moe_layer_edge_cases", test_layer_edge_cases},
        {"reference_moe_routing_causality", test_routing_causality},
    });
}
