// router.cuh: Mixture-of-Experts routing: token choice (TC), expert choice
// (EC) and expert threshold (ET).
//
// SPEC: The MoE layer. A router scores every token for every expert
// (r = W_r x, fp32); TC lets each token take its top-K experts, EC lets each
// expert take its top-k tokens of a pool, and ET gives each expert a cutoff
// c_i tracked as an EMA of EC's k-th largest logit, so a token routes alone
// (causally): z_ti = 1{r_ti >= c_i}. With N tokens in a pool, E experts and
// K experts per token on average, each expert's target is k = N * K / E.
//
// This file starts with the settings and the sizes derived from them, which
// the start-up report and the tests use; it is plain C++ so far.
#pragma once

#include <cstdint>

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
    // EC: which tokens compete for an expert
    EcPool ec_pool = EcPool::MicroBatch;
    // EC/ET at evaluation: tracked cutoffs (causal) or the batch's top-k (leaks)
    EvalRouting eval_routing = EvalRouting::Threshold;
};

// Tokens per expert per routing pool of N tokens: k = N * K / E.
inline double expert_target(int64_t pool_tokens, int top_k, int n_experts) {
    return (double)pool_tokens * top_k / n_experts;
}

// ET's EC warm-up: the paper used 4000 of ~19k steps; by default we keep
// that share (20%) of however long this run is.
inline int et_warmup_steps(const RouterConfig& r, int total_steps) {
    return r.et_warmup_steps >= 0 ? r.et_warmup_steps : total_steps / 5;
}

inline const char* router_name(RouterKind k) {
    return k == RouterKind::TC ? "tc" : k == RouterKind::EC ? "ec" : "et";
}
