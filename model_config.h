// model_config.h: what a model is, before any GPU memory exists.
//
// The model presets, the MoE and router settings, the list of parameter
// tensors with their shapes, and from that the parameter counts (total and
// active per token) and the training FLOPs per token that MFU is measured
// against. Plain C++, so tests and the start-up report share one source of
// truth with the CUDA code that allocates these tensors (model.cuh).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "common.h"
#include "router_config.h"

struct ModelConfig {
    std::string preset;
    int n_layer = 0, n_embd = 0, n_head = 0, n_kv_head = 0;
    int vocab_size = 0;  // from the data
    int seq_len = 0;
    int n_experts = 0;   // routed experts per MoE layer; 0 = dense model
    RouterConfig router;

    int head_dim() const { return n_embd / n_head; }
    // lm_head rows padded to a multiple of 128 for fast matmuls; the padded
    // logits never enter the loss or sampling.
    int padded_vocab() const { return (vocab_size + 127) / 128 * 128; }
    bool is_moe_layer(int l) const { return n_experts > 0 && l > 0; }
};

// "tiny" (for tests), or "dN" in the nanochat family: N layers, width 64N,
// heads of 128 (so N must be even). d12 and d20 are the paper's models.
// Returns "" or why the name is not a preset.
inline std::string model_preset(const std::string& name, ModelConfig* c) {
    c->preset = name;
    if (name == "tiny") {
        c->n_layer = 2; c->n_embd = 64; c->n_head = c->n_kv_head = 2;
        return "";
    }
    char* end = nullptr;
    long n = name.size() > 1 && name[0] == 'd' ? strtol(name.c_str() + 1, &end, 10) : 0;
    if (end == nullptr || *end != '\0' || n < 2 || n > 64 || n % 2 != 0)
        return "unknown model '" + name + "': use tiny, or dN with N even in 2..64 (d12, d20 are the paper's)";
    c->n_layer = (int)n;
    c->n_embd = 64 * (int)n;
    c->n_head = c->n_kv_head = c->n_embd / 128;
    return "";
}

// One parameter tensor: rows x cols (a vector has rows = 1), how many of it
// a token uses on average, whether it is a matmul weight, and its init.
struct ParamTensor {
    std::string name;
    int64_t rows, cols;
    double active;    // fraction of the tensor one token's forward pass touches
    bool is_matmul;   // multiplied against activations (counts in FLOPs)
    double init_std;  // N(0, init_std^2) at init; 0 = zeros
    int64_t padding_rows = 0;  // trailing rows that only pad the shape (zero, never trained)
    int64_t numel() const { return rows * cols; }
    // Weight decay applies to matrices only; this model has no vectors (no
    // biases, no norm weights), so in practice every tensor decays.
    bool decays() const { return rows > 1 && cols > 1; }
};

// SPEC init: a matrix mapping fan_in -> fan_out features starts at
// N(0, 1/fan_in) * min(1, sqrt(fan_out/fan_in)); the layers that write into
// the residual stream (attention out, FFN/expert down-projections) and the
// lm_head start at zero, so the model starts as the identity on its input.
inline double matrix_init_std(int64_t fan_out, int64_t fan_in) {
    return std::sqrt(1.0 / fan_in) * std::min(1.0, std::sqrt((double)fan_out / fan_in));
}

// The parameters in storage order. Matrices are stored (out, in). The token
// embedding is a lookup (no FLOPs). Each MoE layer holds a router (E x C),
// a shared expert (2C wide) and E routed experts (2C wide) of which a token
// uses K on average.
inline std::vector<ParamTensor> parameter_tensors(const ModelConfig& c) {
    const int64_t C = c.n_embd, kv = (int64_t)c.n_kv_head * c.head_dim();
    std::vector<ParamTensor> p;
    p.push_back({"wte", c.vocab_size, C, 1.0, false, 1.0});
    for (int l = 0; l < c.n_layer; l++) {
        std::string L = "h" + std::to_string(l) + ".";
        p.push_back({L + "attn.wq", C, C, 1.0, true, matrix_init_std(C, C)});
        p.push_back({L + "attn.wk", kv, C, 1.0, true, matrix_init_std(kv, C)});
        p.push_back({L + "attn.wv", kv, C, 1.0, true, matrix_init_std(kv, C)});
        p.push_back({L + "attn.wo", C, C, 1.0, true, 0.0});
        if (!c.is_moe_layer(l)) {
            p.push_back({L + "mlp.fc", 4 * C, C, 1.0, true, matrix_init_std(4 * C, C)});
            p.push_back({L + "mlp.proj", C, 4 * C, 1.0, true, 0.0});
            continue;
        }
        const int64_t E = c.n_experts;
        double used = (double)c.router.top_k / E;
        p.push_back({L + "moe.router", E, C, 1.0, true, std::sqrt(1.0 / C)});
        p.push_back({L + "moe.shared.fc", 2 * C, C, 1.0, true, matrix_init_std(2 * C, C)});
        p.push_back({L + "moe.shared.proj", C, 2 * C, 1.0, true, 0.0});
        p.push_back({L + "moe.experts.fc", E * 2 * C, C, used, true, matrix_init_std(2 * C, C)});
        p.push_back({L + "moe.experts.proj", E * C, 2 * C, used, true, 0.0});
    }
    p.push_back({"lm_head", c.padded_vocab(), C, 1.0, true, 0.0, c.padded_vocab() - c.vocab_size});
    return p;
}

struct ParamCounts {
    double total = 0, active = 0, active_matmul = 0;
};

inline ParamCounts count_parameters(const ModelConfig& c) {
    ParamCounts n;
    for (const ParamTensor& t : parameter_tensors(c)) {
        double real = (double)(t.rows - t.padding_rows) * t.cols;
        n.total += real;
        n.active += t.active * real;
        if (t.is_matmul) n.active_matmul += t.active * real;
    }
    return n;
}

// Training FLOPs per token (forward + backward = 3 x forward): 6 per active
// matmul weight, plus causal attention. Per layer and token the forward pass
// does q.k for T/2 keys on average (2 * C * T/2 FLOPs) and the same for the
// weighted sum of values: 2 * C * T, so 6 * L * C * T for training.
inline double training_flops_per_token(const ModelConfig& c) {
    return 6.0 * count_parameters(c).active_matmul + 6.0 * c.n_layer * c.n_embd * (double)c.seq_len;
}
