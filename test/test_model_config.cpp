// test_model_config: presets, parameter counts (checked against sums done
// by hand for the paper's d12), FLOPs per token, the router sizes derived
// from the settings, and which tensors Muon orthogonalises as one matrix and
// which optimizer group trains each tensor (optimizer_config.h).
#include <cmath>
#include <map>

#include "../model_config.h"
#include "../optimizer_config.h"
#include "check.h"

static ModelConfig d12(int experts) {
    ModelConfig c;
    model_preset("d12", &c);
    c.vocab_size = 50257;
    c.seq_len = 2048;
    c.n_experts = experts;
    return c;
}

static void test_presets(Test& t) {
    ModelConfig c;
    CHECK(t, model_preset("d12", &c).empty() && c.n_layer == 12 && c.n_embd == 768 && c.n_head == 6 && c.head_dim() == 128,
          "d12 is %d/%d/%d", c.n_layer, c.n_embd, c.n_head);
    CHECK(t, model_preset("d20", &c).empty() && c.n_layer == 20 && c.n_embd == 1280 && c.n_head == 10, "d20");
    CHECK(t, model_preset("tiny", &c).empty() && c.n_layer == 2 && c.n_kv_head == c.n_head, "tiny");
    for (const char* bad : {"d13", "d0", "d", "x12", "d12x", "d66", ""})
        CHECK(t, model_preset(bad, &c).find("unknown model") == 0, "'%s' accepted", bad);
    c.vocab_size = 50257;
    CHECK(t, c.padded_vocab() == 50304, "padded vocab %d", c.padded_vocab());
    c.vocab_size = 256;
    CHECK(t, c.padded_vocab() == 256, "padded vocab %d", c.padded_vocab());
}

// 2VC embeddings + 12 x 4C^2 attention + layer 0's 8C^2 dense FFN + 11 MoE
// layers of (E x C router + 4C^2 shared + E x 4C^2 experts), C = 768.
static void test_parameter_counts_d12(Test& t) {
    ParamCounts moe = count_parameters(d12(16));
    CHECK(t, moe.total == 551548416.0, "d12 E16 total %.0f", moe.total);
    CHECK(t, moe.active == 162264576.0, "d12 E16 active %.0f", moe.active);
    CHECK(t, moe.active_matmul == 162264576.0 - 50257.0 * 768, "d12 E16 active matmul %.0f", moe.active_matmul);
    ParamCounts dense = count_parameters(d12(0));
    CHECK(t, dense.total == 162129408.0 && dense.active == dense.total, "d12 dense %.0f / %.0f", dense.total, dense.active);
    // the MoE model's active compute matches the dense model's but for the router
    CHECK(t, moe.active - dense.active == 11 * 16 * 768, "active difference %.0f", moe.active - dense.active);
    ModelConfig k2 = d12(16);
    k2.router.top_k = 2;
    CHECK(t, count_parameters(k2).active - moe.active == 11 * 4.0 * 768 * 768, "K = 2 adds one expert per MoE layer");
    ModelConfig gqa = d12(0);
    gqa.n_kv_head = 2;
    CHECK(t, dense.total - count_parameters(gqa).total == 12 * 2 * (768.0 - 256) * 768, "GQA k/v sizes");
}

static void test_tensor_layout(Test& t) {
    ModelConfig c = d12(16);
    std::vector<ParamTensor> p = parameter_tensors(c);
    CHECK(t, p.front().name == "wte" && !p.front().is_matmul, "first tensor %s", p.front().name.c_str());
    CHECK(t, p.back().name == "lm_head" && p.back().rows == 50304 && p.back().padding_rows == 47, "last tensor %s",
          p.back().name.c_str());
    int routers = 0;
    for (const ParamTensor& x : p) routers += x.name.find("moe.router") != std::string::npos;
    CHECK(t, routers == 11, "%d router tensors, expected 11 (layer 0 is dense)", routers);
}

static void test_flops_per_token(Test& t) {
    ModelConfig c = d12(16);
    double want = 6.0 * (162264576.0 - 50257.0 * 768) + 6.0 * 12 * 768 * 2048;
    CHECK(t, training_flops_per_token(c) == want, "flops %.0f vs %.0f", training_flops_per_token(c), want);
}

static void test_router_sizes(Test& t) {
    CHECK(t, expert_target(16 * 2048, 1, 16) == 2048, "k for a 32K pool");
    CHECK(t, expert_target(2048, 2, 16) == 256, "k for one sequence, K = 2");
    RouterConfig r;
    CHECK(t, et_warmup_steps(r, 19073) == 3814, "default warm-up %d", et_warmup_steps(r, 19073));
    r.et_warmup_steps = 4000;
    CHECK(t, et_warmup_steps(r, 19073) == 4000, "explicit warm-up");
}

// Muon's matrices of d12, written out by hand: (rows, cols, batch) by name.
static void test_muon_matrices(Test& t) {
    struct Want {
        int64_t rows, cols;
        int batch;
    };
    auto matrices = [](const ModelConfig& c, const OptimizerConfig& o) {
        std::map<std::string, Want> out;
        for (const MuonMatrix& m : muon_matrices(c, parameter_tensors(c), o)) out[m.name] = {m.rows, m.cols, m.batch};
        return out;
    };
    auto same = [](const Want& a, const Want& b) { return a.rows == b.rows && a.cols == b.cols && a.batch == b.batch; };
    OptimizerConfig muon;
    muon.kind = OptimizerKind::Muon;
    ModelConfig et = d12(16);
    std::map<std::string, Want> m = matrices(et, muon);
    CHECK(t, same(m["h1.attn.qkv"], {2304, 768, 1}), "ET qkv %lld x %lld x %d", (long long)m["h1.attn.qkv"].rows,
          (long long)m["h1.attn.qkv"].cols, m["h1.attn.qkv"].batch);
    CHECK(t, same(m["h1.attn.wo"], {768, 768, 1}) && same(m["h0.mlp.fc"], {3072, 768, 1}), "wo or the dense fc");
    CHECK(t, same(m["h1.moe.experts.fc"], {1536, 768, 16}) && same(m["h1.moe.experts.proj"], {768, 1536, 16}),
          "ET's experts one by one");
    CHECK(t, same(m["h1.moe.shared.fc"], {1536, 768, 1}), "the shared expert");
    CHECK(t, m.count("h1.moe.router") == 0 && m.count("wte") == 0 && m.count("lm_head") == 0,
          "the router, wte or lm_head under Muon by default");
    // 12 qkv + 12 wo + layer 0's fc and proj + 11 MoE layers' shared fc, proj and experts' fc, proj
    CHECK(t, m.size() == 12 + 12 + 2 + 11 * 4, "%zu matrices", m.size());
    ModelConfig tc = et;
    tc.router.kind = RouterKind::TC;
    m = matrices(tc, muon);
    CHECK(t, same(m["h1.moe.experts.fc"], {24576, 768, 1}) && same(m["h1.moe.experts.proj"], {12288, 1536, 1}),
          "TC's experts stacked");
    ModelConfig gqa = et;
    gqa.n_kv_head = 2;
    CHECK(t, same(matrices(gqa, muon)["h1.attn.qkv"], {768 + 2 * 256, 768, 1}), "qkv with 2 KV heads");
    OptimizerConfig paper = muon;
    paper.router = RouterGroup::Muon;
    CHECK(t, same(matrices(et, paper)["h1.moe.router"], {16, 768, 1}), "the router under Muon (-og muon)");
    OptimizerConfig adamw;
    CHECK(t, matrices(et, adamw).empty(), "-opt adamw has Muon matrices");
}

// The groups and their rates: d20 (muP factor sqrt(768/1280)) under both
// readings of the paper, and -opt adamw's single group.
static void test_optimizer_groups(Test& t) {
    ModelConfig c = d12(16);
    model_preset("d20", &c);
    const std::vector<ParamTensor> tensors = parameter_tensors(c);
    OptimizerConfig o;
    o.kind = OptimizerKind::Muon;
    const double s = std::sqrt(768.0 / 1280);
    std::map<std::string, ParamGroup> g;
    for (const ParamGroup& x : optimizer_groups(c, tensors, o)) g[x.name] = x;
    CHECK(t, g.size() == 4 && g["matrices"].muon && !g["matrices"].warmup && g["matrices"].lr == 0.02,
          "the code's reading: Muon at 0.02 unscaled");
    CHECK(t, std::fabs(g["embedding"].lr - 0.2 * s) < 1e-12 && std::fabs(g["router"].lr - 0.004 * s) < 1e-12 &&
                 !g["router"].muon && g["embedding"].warmup,
          "AdamW groups at the muP-scaled rates");
    double total = 0;
    for (const auto& [name, x] : g) total += x.params;
    CHECK(t, std::fabs(total - count_parameters(c).total) < 0.5, "groups hold %.0f of %.0f parameters", total,
          count_parameters(c).total);
    o.router = RouterGroup::Muon;
    o.mup = MupScope::All;
    g.clear();
    for (const ParamGroup& x : optimizer_groups(c, tensors, o)) g[x.name] = x;
    CHECK(t, g.size() == 3 && std::fabs(g["matrices"].lr - 0.02 * s) < 1e-12, "the paper's reading");
    const std::vector<ParamGroup> one = optimizer_groups(c, tensors, OptimizerConfig{});
    CHECK(t, one.size() == 1 && one[0].name == "all" && one[0].lr == 6e-4 && !one[0].muon, "-opt adamw");
}

int main() {
    return run_tests({
        {"model_presets", test_presets},
        {"model_parameter_counts_d12", test_parameter_counts_d12},
        {"model_tensor_layout", test_tensor_layout},
        {"model_flops_per_token", test_flops_per_token},
        {"router_sizes", test_router_sizes},
        {"muon_matrices", test_muon_matrices},
        {"optimizer_groups", test_optimizer_groups},
    });
}
