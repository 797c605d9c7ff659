// optimizer_config.h: how the parameters are trained, before any GPU memory
// exists: the optimizer settings, which tensor goes to which optimizer at
// which learning rate, and the matrices Muon orthogonalises one by one.
//
// SPEC: Training. Two recipes:
//   -opt adamw  AdamW for every tensor, one learning rate;
//   -opt muon   the paper's: Muon for the matrices, AdamW for the embedding
//               and the head, at per-group rates (embedding 0.2, head 0.004,
//               matrices 0.02) scaled by the muP factor (n_embd / 768)^-1/2.
// Where the paper's text and the authors' code part, both are offered (the
// README's settings table says which produced the paper's numbers): the
// router trains with AdamW at the head's rate (code: src/optimizers/
// factory.py treats it as an unembedding) or with Muon at the matrices'
// (paper Table 7); the muP factor scales the AdamW groups only (code) or
// every group (paper). docs/settings.md has every such setting side by side.
//
// Plain C++, so the start-up report, the CPU tests and optimizer.cuh share
// one source of truth.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "model_config.h"

enum class OptimizerKind { AdamW, Muon };   // the order of the -opt flag's choices
enum class RouterGroup { AdamW, Muon };     // -og: the router's optimizer under -opt muon
enum class MupScope { AdamW, All };         // -om: the groups the muP factor scales under -opt muon

struct OptimizerConfig {
    OptimizerKind kind = OptimizerKind::AdamW;
    double lr = 6e-4;  // -opt adamw: every tensor's peak learning rate
    // -opt muon: the groups' peak rates before the muP factor
    double lr_embedding = 0.2, lr_head = 0.004, lr_matrix = 0.02;
    RouterGroup router = RouterGroup::AdamW;
    MupScope mup = MupScope::AdamW;
    double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;  // AdamW
    double weight_decay = 0.1;  // AdamW: on matrices only; Muon: decoupled, w *= 1 - lr * wd
    // Muon: Nesterov momentum warmed up linearly from start to end over the
    // first momentum_warmup steps, then ns_steps of the Newton-Schulz map
    double momentum_start = 0.85, momentum_end = 0.95;
    int momentum_warmup = 300, ns_steps = 5;
    // whether EC's and ET's routed experts warm their momentum up too: the
    // authors' expert-parallel runs (their EC 512k/256k and ET rows) train
    // them with a Muon of its own that the warm-up never touches (constant
    // end momentum: src/optimizers/factory.py, train.py)
    bool expert_momentum_warmup = true;
};

// The quintic Newton-Schulz map of Muon (the public Muon's coefficients):
// X <- a X + (b A + c A^2) X, A = X X^T, on X scaled to Frobenius norm 1.
// Five steps send every singular value above about 0.0015 into [0.68, 1.21].
static const double NS_A = 3.4445, NS_B = -4.7750, NS_C = 2.0315, NS_EPS = 1e-7;

inline const char* optimizer_name(OptimizerKind k) { return k == OptimizerKind::AdamW ? "adamw" : "muon"; }

// The muP learning-rate factor of a model's width.
inline double mup_factor(int n_embd) { return std::sqrt(768.0 / n_embd); }

// Muon's momentum at a 0-based step: start -> end linearly over the warm-up.
inline double muon_momentum(const OptimizerConfig& o, int step) {
    if (o.momentum_warmup <= 0) return o.momentum_end;
    const double f = std::min(1.0, (double)step / o.momentum_warmup);
    return (1 - f) * o.momentum_start + f * o.momentum_end;
}

// Muon's update of a rows x cols matrix is scaled by sqrt(max(1, rows/cols)),
// so that a tall matrix moves as far per element as a wide one.
inline double muon_scale(int64_t rows, int64_t cols) { return std::sqrt(std::max(1.0, (double)rows / cols)); }

// ---------------------------------------------------------------------------
// Parameter groups: the tensors one optimizer trains at one rate.

struct ParamGroup {
    std::string name;         // "all", "embedding", "head", "router", "matrices"
    bool muon = false;
    double lr = 0;            // peak learning rate (the schedule scales it)
    bool warmup = true;       // follows the schedule's warm-up (Muon's groups: never, in paper and code)
    std::vector<int> tensors; // indexes into parameter_tensors()
    double params = 0;        // how many parameters (padding rows excluded)
};

enum class ParamRole { Embedding, Head, Router, Matrix };

inline bool name_ends_with(const std::string& name, const std::string& suffix) {
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

inline ParamRole param_role(const ParamTensor& t) {
    if (t.name == "wte") return ParamRole::Embedding;
    if (t.name == "lm_head") return ParamRole::Head;
    if (name_ends_with(t.name, ".moe.router")) return ParamRole::Router;
    return ParamRole::Matrix;
}

inline std::vector<ParamGroup> optimizer_groups(const ModelConfig& c, const std::vector<ParamTensor>& tensors,
                                                const OptimizerConfig& o) {
    std::vector<ParamGroup> groups;
    auto add = [&](int i, const char* name, bool muon, double lr) {
        auto g = std::find_if(groups.begin(), groups.end(), [&](const ParamGroup& x) { return x.name == name; });
        if (g == groups.end()) {
            groups.push_back({name, muon, lr, !muon, {}, 0});
            g = groups.end() - 1;
        }
        g->tensors.push_back(i);
        g->params += (double)(tensors[i].rows - tensors[i].padding_rows) * tensors[i].cols;
    };
    const double mup = mup_factor(c.n_embd), muon_mup = o.mup == MupScope::All ? mup : 1.0;
    for (int i = 0; i < (int)tensors.size(); i++) {
        if (o.kind == OptimizerKind::AdamW) {
            add(i, "all", false, o.lr);
            continue;
        }
        switch (param_role(tensors[i])) {
            case ParamRole::Embedding: add(i, "embedding", false, o.lr_embedding * mup); break;
            case ParamRole::Head: add(i, "head", false, o.lr_head * mup); break;
            case ParamRole::Router:
                if (o.router == RouterGroup::AdamW) add(i, "router", false, o.lr_head * mup);
                else add(i, "matrices", true, o.lr_matrix * muon_mup);
                break;
            case ParamRole::Matrix: add(i, "matrices", true, o.lr_matrix * muon_mup); break;
        }
    }
    return groups;
}

// ---------------------------------------------------------------------------
// Muon's matrices. Muon orthogonalises each weight matrix on its own; which
// slices of the parameters are one matrix follows the authors' model:
//   - q, k and v are one (C + 2 kv) x C matrix (their fused c_attn); wo, the
//     dense FFN's fc and proj, the shared expert's fc and proj, and (under
//     Muon) the router are one matrix each;
//   - EC and ET keep one parameter per expert, so each expert's 2C x C and
//     C x 2C matrices are orthogonalised on their own (a batch of E);
//   - TC stacks its experts into one E 2C x C and one E C x 2C matrix (their
//     token_choice.py), orthogonalised as two matrices.

struct MuonMatrix {
    std::string name;
    int first_tensor = 0, tensor_count = 1;  // consecutive tensors that form it (q, k, v: 3)
    int64_t rows = 0, cols = 0;              // one matrix, stored (out, in) row-major
    int batch = 1;                           // matrices of this shape, one after the other
    bool routed_experts = false;             // EC's or ET's experts, one matrix each
};

inline std::vector<MuonMatrix> muon_matrices(const ModelConfig& c, const std::vector<ParamTensor>& tensors,
                                             const OptimizerConfig& o) {
    std::vector<MuonMatrix> out;
    if (o.kind != OptimizerKind::Muon) return out;
    const bool per_expert = c.router.kind != RouterKind::TC;
    for (int i = 0; i < (int)tensors.size(); i++) {
        const ParamTensor& t = tensors[i];
        const ParamRole role = param_role(t);
        if (role == ParamRole::Embedding || role == ParamRole::Head) continue;
        if (role == ParamRole::Router && o.router == RouterGroup::AdamW) continue;
        if (name_ends_with(t.name, "attn.wq")) {  // wq, wk, wv are adjacent: one matrix
            out.push_back({t.name.substr(0, t.name.size() - 2) + "qkv", i, 3,
                           t.rows + tensors[i + 1].rows + tensors[i + 2].rows, t.cols, 1});
            i += 2;
        } else if (per_expert && (name_ends_with(t.name, "experts.fc") || name_ends_with(t.name, "experts.proj"))) {
            out.push_back({t.name, i, 1, t.rows / c.n_experts, t.cols, c.n_experts, true});
        } else {
            out.push_back({t.name, i, 1, t.rows, t.cols, 1});
        }
    }
    return out;
}
