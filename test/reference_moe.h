// test/reference_moe.h: the plain C++ CPU reference of the Mixture-of-Experts
// layer and its routers (TC, EC, ET), forward and backward.
//
// This is the ground truth the CUDA router, dispatch/combine and expert
// kernels are checked against. Each function states the SPEC's math ("The MoE
// layer", "Routers") as plainly as it can be written: loops, no tricks, no
// speed. test_reference_moe.cpp checks it: selections against brute-force
// sorts and hand-made cases, gradients against central differences in double
// precision. Templated on the number type like test/reference.h.
//
// Conventions (as test/reference.h): N = B*T token rows, token n is position
// n % T of sequence n / T. Router logits r are (N, E), and a selection is an
// (N, E) 0/1 int mask: mask[n*E + i] = 1 when token n goes to expert i.
// A routing pool is `pool` consecutive tokens (pool = N: the micro-batch;
// pool = T: one sequence), pool p holding tokens p*pool .. (p+1)*pool - 1; k is
// each expert's target in a pool (pool * K / E, computed by the caller).
// Ties: of two equal scores the lower index wins (the lower expert index for
// TC, the lower token index for EC and the ET clamp), so every selection is a
// deterministic function of the logits that the GPU must reproduce exactly.
// Weights as parameter_tensors() stores them: shared fc (2C, C), proj (C, 2C);
// the routed experts stacked, fc (E*2C, C), proj (E*C, 2C). The router matmul
// r = h @ W_r^T is reference.h's matmul_forward and not repeated here.
// Backward: weight gradients and dr accumulate (+=); dh is overwritten.
//
// Beyond reference.h it includes only router_config.h (the clamp's bounds,
// et_capacity_bounds, are host arithmetic the GPU code shares), so a GPU
// test can wrap both references in one namespace, as test/gpu_test_model.cu
// does with reference.h, once router_config.h is included at global scope.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "../router_config.h"
#include "reference.h"

// p = 1 / (1 + e^-x): the gate of a routed expert
template <typename F>
F sigmoid(F x) {
    return 1 / (1 + std::exp(-x));
}

// Whether candidate a (score, index) ranks above candidate b: the higher
// score, and of equal scores the lower index.
template <typename F>
bool outranks(F score_a, int index_a, F score_b, int index_b) {
    return score_a > score_b || (score_a == score_b && index_a < index_b);
}

// ---------------------------------------------------------------------------
// Selection

// Token choice: mask[n][i] = 1 for the K experts with the largest
// r[n][i] + bias[i] (bias may be null): expert i is taken iff fewer than K
// experts outrank it. The bias steers selection only, never the gate.
template <typename F>
void tc_select(int* mask, const F* r, const F* bias, int N, int E, int K) {
    if (K < 0 || K > E) fail("top-%d of %d experts", K, E);
    for (int n = 0; n < N; n++) {
        auto score = [&](int i) { return r[n * E + i] + (bias ? bias[i] : F(0)); };
        for (int i = 0; i < E; i++) {
            int rank = 0;
            for (int j = 0; j < E; j++)
                if (outranks(score(j), j, score(i), i)) rank++;
            mask[n * E + i] = rank < K;
        }
    }
}

// Pools must tile the N tokens, and each pool must hold the k tokens an
// expert takes from it.
inline void check_routing_pools(int N, int pool, int k) {
    if (pool < 1 || N % pool != 0) fail("a routing pool of %d tokens does not divide N = %d", pool, N);
    if (k < 1 || k > pool) fail("k = %d tokens per expert from a pool of %d", k, pool);
}

// How many tokens of token n's pool outrank it on expert i (0 = its best).
template <typename F>
int rank_in_pool(const F* r, int n, int i, int E, int pool) {
    const int first = n / pool * pool;
    int rank = 0;
    for (int u = first; u < first + pool; u++)
        if (outranks(r[u * E + i], u, r[n * E + i], n)) rank++;
    return rank;
}

// Expert choice: in each pool each expert takes its k top-ranked tokens.
// kth[p*E + i] = the logit of expert i's k-th token in pool p: the EC cutoff
// of that pool, the statistic ET tracks (kth may be null).
template <typename F>
void ec_select(int* mask, F* kth, const F* r, int N, int E, int pool, int k) {
    check_routing_pools(N, pool, k);
    for (int n = 0; n < N; n++)
        for (int i = 0; i < E; i++) {
            // Ties are broken, so the ranks in a pool are 0 .. pool-1, each once.
            const int rank = rank_in_pool(r, n, i, E, pool);
            mask[n * E + i] = rank < k;
            if (kth && rank == k - 1) kth[n / pool * E + i] = r[n * E + i];
        }
}

// Expert threshold: z_ti = 1{r_ti >= c_i}. In training with capacity >= 0,
// each expert's count in each pool is then clamped to [lo, hi]: over hi it
// keeps its hi highest logits, under lo it adds its highest tokens below the
// cutoff until it has lo. Eval, or capacity < 0: the thresholds alone
// (pool and k unused). Returns how many (pool, expert) pairs were clamped.
template <typename F>
int et_select(int* mask, const F* r, const F* cutoff, int N, int E, int pool, int k, double capacity,
              bool training) {
    for (int n = 0; n < N; n++)
        for (int i = 0; i < E; i++) mask[n * E + i] = r[n * E + i] >= cutoff[i];
    if (!training || capacity < 0) return 0;

    check_routing_pools(N, pool, k);
    int lo, hi;
    et_capacity_bounds(k, capacity, &lo, &hi);
    int clamped = 0;
    for (int first = 0; first < N; first += pool)
        for (int i = 0; i < E; i++) {
            int count = 0;
            for (int n = first; n < first + pool; n++) count += mask[n * E + i];
            const int keep = std::clamp(count, lo, hi);
            if (keep == count) continue;
            clamped++;
            // The tokens at or above the cutoff are exactly the `count`
            // top-ranked ones, so dropping the lowest of them or adding the
            // highest below both leave the `keep` top-ranked tokens.
            for (int n = first; n < first + pool; n++) mask[n * E + i] = rank_in_pool(r, n, i, E, pool) < keep;
        }
    return clamped;
}

// counts[i] = how many tokens go to expert i
inline void expert_counts(int* counts, const int* mask, int N, int E) {
    for (int i = 0; i < E; i++) {
        counts[i] = 0;
        for (int n = 0; n < N; n++) counts[i] += mask[n * E + i];
    }
}

// ---------------------------------------------------------------------------
// Router state, updated once per step

// raw_i = beta raw_i + (1 - beta) mean_i, updates += 1, with mean_i expert i's
// EC cutoff (kth) averaged over the step's micro-batches.
template <typename F>
void et_cutoff_update(F* raw, int* updates, const F* batch_kth_mean, int E, F beta) {
    for (int i = 0; i < E; i++) raw[i] = beta * raw[i] + (1 - beta) * batch_kth_mean[i];
    (*updates)++;
}

// c_i = raw_i / (1 - beta^updates): raw starts at 0, and this bias correction
// undoes the pull toward that 0, so c is a true average from the first update.
template <typename F>
void et_cutoff(F* cutoff, const F* raw, int updates, int E, F beta) {
    if (updates < 1) fail("no ET cutoff before the first update");
    const F correction = 1 - std::pow(beta, F(updates));
    for (int i = 0; i < E; i++) cutoff[i] = raw[i] / correction;
}

// Loss-free balancing: b_i += u * sign(mean_count - count_i), raising the
// bias of under-used experts and lowering it for over-used ones. The sign is
// taken in integers, sign(total - E * count_i), so an expert exactly at the
// mean gets 0 whatever the rounding of total / E.
template <typename F>
void lossfree_bias_update(F* bias, const int* counts, int E, F rate) {
    int64_t total = 0;
    for (int i = 0; i < E; i++) total += counts[i];
    for (int i = 0; i < E; i++) {
        const int64_t surplus = total - (int64_t)E * counts[i];
        bias[i] += rate * F((surplus > 0) - (surplus < 0));
    }
}

// alpha * sum_i f_i P_i with f_i = (E/N) * count_i, P_i = mean_n sigmoid(r_ni)
template <typename F>
F aux_loss(const F* r, const int* mask, int N, int E, F alpha) {
    std::vector<int> counts(E);
    expert_counts(counts.data(), mask, N, E);
    F loss = 0;
    for (int i = 0; i < E; i++) {
        F mean_gate = 0;
        for (int n = 0; n < N; n++) mean_gate += sigmoid(r[n * E + i]);
        mean_gate /= N;
        loss += F(E) / N * counts[i] * mean_gate;
    }
    return alpha * loss;
}

// dr_ni += dloss * alpha * f_i * p_ni (1 - p_ni) / N. f_i counts a selection
// (a step function of r): a constant for the gradient.
template <typename F>
void aux_loss_backward(F* dr, const F* r, const int* mask, int N, int E, F alpha, F dloss) {
    std::vector<int> counts(E);
    expert_counts(counts.data(), mask, N, E);
    for (int n = 0; n < N; n++)
        for (int i = 0; i < E; i++) {
            const F p = sigmoid(r[n * E + i]), f = F(E) / N * counts[i];
            dr[n * E + i] += dloss * alpha * f * p * (1 - p) / N;
        }
}

// ---------------------------------------------------------------------------
// The layer: y_n = shared(h_n) + sum_{i: mask_ni} sigmoid(r_ni) expert_i(h_n)

// Where expert i's fc (2C, C) and proj (C, 2C) start in the stacked tensors:
// both hold 2C*C numbers per expert.
inline size_t expert_offset(int i, int C) { return (size_t)i * 2 * C * C; }

// One token through one 2C-wide expert: pre = fc @ x, act = relu(pre)^2,
// out = proj @ act.
template <typename F>
void ffn_forward(F* out, F* pre, F* act, const F* x, const F* fc, const F* proj, int C) {
    matmul_forward(pre, x, fc, 1, C, 2 * C);
    relu2_forward(act, pre, 2 * C);
    matmul_forward(out, act, proj, 1, 2 * C, C);
}

// Its backward for that token: dx overwritten, dfc and dproj += its share.
template <typename F>
void ffn_backward(F* dx, F* dfc, F* dproj, const F* dout, const F* x, const F* pre, const F* act, const F* fc,
                  const F* proj, int C) {
    std::vector<F> dact(2 * C), dpre(2 * C);
    matmul_backward(dact.data(), dproj, dout, act, proj, 1, 2 * C, C);
    relu2_backward(dpre.data(), dact.data(), pre, 2 * C);
    matmul_backward(dx, dfc, dpre.data(), x, fc, 1, C, 2 * C);
}

// What the forward pass keeps for the backward pass. Pairs (n, i) are laid
// out like the mask; the entries of pairs not routed stay 0.
template <typename F>
struct MoeActivations {
    std::vector<F> shared_pre, shared_act;  // (N, 2C): the shared expert's fc output, relu^2 of it
    std::vector<F> expert_pre, expert_act;  // (N, E, 2C): the same per routed pair
    std::vector<F> expert_out;              // (N, E, C): expert_i(h_n), before its gate
};

// y (N, C) overwritten; h (N, C) is the normalised input, r (N, E) the logits.
template <typename F>
void moe_forward(F* y, MoeActivations<F>* a, const F* h, const F* r, const int* mask, const F* shared_fc,
                 const F* shared_proj, const F* experts_fc, const F* experts_proj, int N, int C, int E) {
    const int W = 2 * C;  // every expert's hidden width
    a->shared_pre.assign((size_t)N * W, F(0));
    a->shared_act.assign((size_t)N * W, F(0));
    a->expert_pre.assign((size_t)N * E * W, F(0));
    a->expert_act.assign((size_t)N * E * W, F(0));
    a->expert_out.assign((size_t)N * E * C, F(0));
    for (int n = 0; n < N; n++) {
        const F* x = h + n * C;
        F* out = y + n * C;
        ffn_forward(out, &a->shared_pre[(size_t)n * W], &a->shared_act[(size_t)n * W], x, shared_fc, shared_proj,
                    C);
        for (int i = 0; i < E; i++) {
            if (!mask[n * E + i]) continue;
            const size_t pair = (size_t)n * E + i;
            F* expert_out = &a->expert_out[pair * C];
            ffn_forward(expert_out, &a->expert_pre[pair * W], &a->expert_act[pair * W], x,
                        experts_fc + expert_offset(i, C), experts_proj + expert_offset(i, C), C);
            const F gate = sigmoid(r[pair]);
            for (int c = 0; c < C; c++) out[c] += gate * expert_out[c];
        }
    }
}

// The routing held fixed (the mask is a step function of r, with no
// gradient), for the objective sum(y * dy):
//   dh overwritten (the router's share, from r = h @ W_r^T, is the caller's to add);
//   the shared and experts' fc/proj gradients += theirs (unrouted experts get none);
//   dr_ni += mask_ni * (dy_n . expert_i(h_n)) * p_ni (1 - p_ni): the gate's gradient.
template <typename F>
void moe_backward(F* dh, F* dr, F* dshared_fc, F* dshared_proj, F* dexperts_fc, F* dexperts_proj, const F* dy,
                  const F* h, const F* r, const int* mask, const F* shared_fc, const F* shared_proj,
                  const F* experts_fc, const F* experts_proj, const MoeActivations<F>& a, int N, int C, int E) {
    const int W = 2 * C;
    std::vector<F> dx(C), dexpert_out(C);
    for (int n = 0; n < N; n++) {
        const F* x = h + n * C;
        const F* dout = dy + n * C;
        ffn_backward(dh + n * C, dshared_fc, dshared_proj, dout, x, &a.shared_pre[(size_t)n * W],
                     &a.shared_act[(size_t)n * W], shared_fc, shared_proj, C);
        for (int i = 0; i < E; i++) {
            if (!mask[n * E + i]) continue;
            const size_t pair = (size_t)n * E + i;
            const F gate = sigmoid(r[pair]);
            F dgate = 0;
            for (int c = 0; c < C; c++) {
                dgate += dout[c] * a.expert_out[pair * C + c];
                dexpert_out[c] = gate * dout[c];
            }
            dr[pair] += dgate * gate * (1 - gate);
            ffn_backward(dx.data(), dexperts_fc + expert_offset(i, C), dexperts_proj + expert_offset(i, C),
                         dexpert_out.data(), x, &a.expert_pre[pair * W], &a.expert_act[pair * W],
                         experts_fc + expert_offset(i, C), experts_proj + expert_offset(i, C), C);
            for (int c = 0; c < C; c++) dh[n * C + c] += dx[c];
        }
    }
}
