// router_config.h: the router's settings, the sizes derived from them, and
// the routing statistics a training step reports. Plain C++ (no CUDA), so
// the start-up report, the CPU tests and the CUDA code (router.cuh) share
// one source of truth.
//
// SPEC: The MoE layer. A router scores every token for every expert
// (r = W_r x, fp32); TC lets each token take its top-K experts, EC lets each
// expert take its top-k tokens of a pool, and ET gives each expert a cutoff
// c_i tracked as an EMA of EC's k-th largest logit, so a token routes alone
// (causally): z_ti = 1{r_ti >= c_i}. With N tokens in a pool, E experts and
// K experts per token on average, each expert's target is k = N * K / E.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

enum class RouterKind { TC, EC, ET };
enum class TcBalance { None, Aux, LossFree };
enum class EcPool { MicroBatch, Sequence, Global };
enum class EvalRouting { Threshold, Batch };

// How routed experts are chosen (SPEC: The MoE layer, Routers).
struct RouterConfig {
    RouterKind kind = RouterKind::ET;
    int top_k = 1;                  // K: average routed experts per token
    // ET: cutoff EMA, EC warm-up, training-time capacity clamp
    double et_beta = 0.999;
    int et_warmup_steps = -1;       // -1: 20% of the run
    double capacity = 0.5;          // clamp to [k(1-C), k(1+C)]; negative: off
    // TC: load balancing
    TcBalance tc_balance = TcBalance::Aux;
    double aux_alpha = 0.001;
    double lossfree_rate = 0.001;
    // EC (and ET's statistic and clamp): which tokens compete for an expert
    EcPool ec_pool = EcPool::MicroBatch;
    // EC/ET at evaluation: tracked cutoffs (causal) or the batch's top-k (leaks)
    EvalRouting eval_routing = EvalRouting::Threshold;
};

// Tokens per expert per routing pool of N tokens: k = N * K / E.
inline double expert_target(int64_t pool_tokens, int top_k, int n_experts) {
    return (double)pool_tokens * top_k / n_experts;
}

// Tokens in one routing pool of a B x T micro-batch on each of `ranks`
// processes: the global pool is every rank's micro-batch (with one process,
// this GPU's).
inline int64_t routing_pool_tokens(EcPool pool, int B, int T, int ranks = 1) {
    return pool == EcPool::Sequence ? T : (int64_t)B * T * (pool == EcPool::Global ? ranks : 1);
}

// ET's EC warm-up: the paper used 4000 of ~19k steps; by default we keep
// that share (20%) of however long this run is.
inline int et_warmup_steps(const RouterConfig& r, int total_steps) {
    return r.et_warmup_steps >= 0 ? r.et_warmup_steps : total_steps / 5;
}

// The training clamp's bounds on an expert's tokens per pool:
// lo = ceil(k(1 - C)), hi = floor(k(1 + C)). The 1e-9 keeps a bound that is an
// integer in exact arithmetic from rounding past it (k = 10, C = 0.7: the
// double product is 3.0000000000000004, and lo must be 3, not 4).
inline void et_capacity_bounds(int k, double capacity, int* lo, int* hi) {
    *lo = std::max(0, (int)std::ceil(k * (1 - capacity) - 1e-9));
    *hi = (int)std::floor(k * (1 + capacity) + 1e-9);
}

inline const char* router_name(RouterKind k) {
    return k == RouterKind::TC ? "tc" : k == RouterKind::EC ? "ec" : "et";
}

// ---------------------------------------------------------------------------
// Routing statistics of one MoE layer over one training step (all its
// micro-batches), as router.cuh reads them back at a logging step.

struct LayerRoutingStats {
    int layer = 0;                     // index of the model layer
    std::vector<int64_t> counts;       // tokens routed to each expert
    int64_t tokens = 0;                // tokens that went through the layer
    int64_t fanout[4] = {0, 0, 0, 0};  // tokens with 0, 1, 2, 3+ routed experts
    int64_t clamped = 0;               // (pool, expert) selections the ET capacity clamp changed
    std::vector<float> batch_cutoff;   // EC/ET: each expert's k-th largest logit per pool, mean over the step
    std::vector<float> cutoff;         // EC/ET: the tracked cutoff in effect (empty before its first update)
    double aux_loss = 0;               // TC aux: the layer's loss, mean over micro-batches
};

// What the log prints of it.
struct RoutingSummary {
    double usage_min = 0, usage_max = 0;  // fraction of the routed pairs each expert got
    double usage_cv = 0;                  // coefficient of variation of the expert counts
    double fanout_mean = 0;               // routed experts per token
    double fanout_frac[4] = {0, 0, 0, 0}; // share of tokens with 0, 1, 2, 3+
    double cutoff_dev = NAN;              // mean over experts of |batch cutoff - tracked cutoff|
};

inline RoutingSummary summarize_routing(const LayerRoutingStats& s) {
    RoutingSummary r;
    const int E = (int)s.counts.size();
    int64_t pairs = 0;
    for (int64_t c : s.counts) pairs += c;
    if (E > 0 && pairs > 0) {
        double mean = (double)pairs / E, var = 0;
        r.usage_min = r.usage_max = (double)s.counts[0] / pairs;
        for (int64_t c : s.counts) {
            r.usage_min = std::min(r.usage_min, (double)c / pairs);
            r.usage_max = std::max(r.usage_max, (double)c / pairs);
            var += (c - mean) * (c - mean);
        }
        r.usage_cv = std::sqrt(var / E) / mean;
    }
    if (s.tokens > 0) {
        r.fanout_mean = (double)pairs / s.tokens;
        for (int b = 0; b < 4; b++) r.fanout_frac[b] = (double)s.fanout[b] / s.tokens;
    }
    if (!s.cutoff.empty() && s.cutoff.size() == s.batch_cutoff.size()) {
        double dev = 0;
        for (size_t i = 0; i < s.cutoff.size(); i++) dev += std::fabs((double)s.batch_cutoff[i] - s.cutoff[i]);
        r.cutoff_dev = dev / s.cutoff.size();
    }
    return r;
}
