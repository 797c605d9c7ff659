// test/gpu_test_model.cu: GPU parity of every kernel in model.cuh against the
// CPU reference (test/reference.h), then of a whole training step.
//
// Why: a kernel is trusted once it agrees with the plain-loop reference on
// random inputs of awkward shapes (N = 1, widths that are not multiples of
// 32, T past a tile edge, grouped-query heads). Every op test
//   - draws seeded random inputs (never zeros) and rounds them to floatX; the
//     reference runs in double on exactly those rounded values, so the error
//     measured is the kernel's own;
//   - fills each output with 0xFF bytes first (NaN in bf16 and in fp32) and
//     checks that no NaN is left: every element was written. Outputs that
//     accumulate start from random values instead and are compared with
//     those values plus the reference's contribution (the error is measured
//     against the contribution, so the start values cannot hide it);
//   - measures ||gpu - ref||_2 / ||ref||_2: below 1e-4 in the FP32 build and
//     2e-2 in the BF16 build for floatX outputs. fp32 outputs computed in
//     fp32 from the same inputs (rstd, lse, losses, weight gradients, norms,
//     AdamW state) are held to 1e-4 in both builds;
//   - synchronises after each op under test, so a kernel fault is reported
//     against the test that caused it.
// Then the whole dense model: forward + backward against RefModel<double>
// (the loss and every tensor's gradient), gradient accumulation over a second
// micro-batch, and one model_update (global-norm clipping + AdamW) against the
// reference update on the same gradients.
//
// Build: make build/gpu_test_model.bf16 build/gpu_test_model.fp32 for a GPU, where a
// CUDA that cannot start fails the program; make build/emu/plain/gpu_test_model.bf16
// (and .fp32, and the asan variant) for the emulated device (test/emu).
// TRAIN_ET_TEST_VERBOSE=1 also prints every measured error (lines starting "#").
#include "../model.cuh"

// The reference's ops share their names with model.cuh's launchers (and would
// be picked by overload resolution for some argument types), so it lives in
// namespace ref. Everything it includes is included here first, at global
// scope; its own #includes are then no-ops.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "../model_config.h"
#include "check.h"
namespace ref {
#include "reference.h"
}

#include "gpu_check.h"

// ----------------------------------------------------------------------------
// Helpers of this file (the shared ones are in gpu_check.h)

inline std::vector<floatX> to_floatXs(const std::vector<double>& v) {
    std::vector<floatX> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = to_floatX(v[i]);
    return out;
}
inline std::vector<float> to_floats(const std::vector<double>& v) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = (float)v[i];
    return out;
}
inline std::vector<int> random_tokens(Rng& rng, int n, int V) {
    std::vector<int> v(n);
    for (int& x : v) x = (int)rng.below(V);
    return v;
}

// Columns [c0, c1) of a row-major matrix `width` wide.
inline std::vector<double> columns(const std::vector<double>& m, int width, int c0, int c1) {
    std::vector<double> out;
    const size_t rows = m.size() / width;
    out.reserve(rows * (c1 - c0));
    for (size_t r = 0; r < rows; r++)
        for (int c = c0; c < c1; c++) out.push_back(m[r * width + c]);
    return out;
}

// ----------------------------------------------------------------------------
// Embedding

struct EmbeddingShape {
    int N, C, V;
    std::string name() const { return string_format("N=%d C=%d V=%d", N, C, V); }
};
static const EmbeddingShape embedding_shapes[] = {{1, 64, 10}, {37, 100, 50}, {2 * 33, 96, 300}, {2 * 200, 128, 1000}};

static void test_embedding_forward(Test& t) {
    Rng rng(101);
    for (const EmbeddingShape& s : embedding_shapes) {
        const std::vector<int> tokens = random_tokens(rng, s.N, s.V);
        const std::vector<floatX> wte = random_floatX(rng, (size_t)s.V * s.C, -1, 1);
        DeviceBuffer<int> d_tokens(tokens);
        DeviceBuffer<floatX> d_wte(wte), d_out((size_t)s.N * s.C);
        d_out.poison();
        embedding_forward(d_out.ptr, d_tokens.ptr, d_wte.ptr, s.N, s.C);
        sync_after("embedding_forward");

        std::vector<double> ref((size_t)s.N * s.C);
        ref::embedding_forward(ref.data(), tokens.data(), to_doubles(wte).data(), s.N, s.C);
        const std::vector<floatX> out = d_out.download();
        check_close(t, s.name(), to_doubles(out), ref, TOL);
        CHECK(t, same_bits(out, to_floatXs(ref)), "%s: not an exact copy of the rows", s.name().c_str());
    }
}

// One embedding backward against the reference, run twice: each token's rows
// are summed in a fixed order (chunks of EMBEDDING_CHUNK sorted positions,
// then the chunks in order), so the two runs must agree bit for bit.
static void check_embedding_backward(Test& t, Rng& rng, const std::string& name, const std::vector<int>& tokens,
                                     int C, int V) {
    const int N = (int)tokens.size();
    const std::vector<floatX> dout = random_floatX(rng, (size_t)N * C, -1, 1);
    const std::vector<float> start = random_float(rng, (size_t)V * C, -1, 1);
    DeviceBuffer<int> d_tokens(tokens);
    DeviceBuffer<floatX> d_dout(dout);
    DeviceBuffer<float> d_dwte(start);
    EmbeddingSortScratch scratch;
    scratch.allocate(N, C, V);
    embedding_backward(d_dwte.ptr, d_tokens.ptr, d_dout.ptr, N, C, scratch);
    sync_after("embedding_backward");
    const std::vector<float> first = d_dwte.download();
    d_dwte.upload(start);
    embedding_backward(d_dwte.ptr, d_tokens.ptr, d_dout.ptr, N, C, scratch);
    sync_after("embedding_backward (second run)");
    const std::vector<float> second = d_dwte.download();
    scratch.release();

    std::vector<double> contribution((size_t)V * C, 0.0);
    ref::embedding_backward(contribution.data(), tokens.data(), to_doubles(dout).data(), N, C);
    check_accumulated(t, name + " dwte", to_doubles(first), to_doubles(start), contribution, TOL_FP32);
    CHECK(t, same_bits(first, second), "%s: two runs differ (not deterministic)", name.c_str());
    std::vector<bool> used(V, false);
    for (int token : tokens) used[token] = true;
    size_t changed = 0;
    for (int v = 0; v < V; v++)
        if (!used[v])
            for (int c = 0; c < C; c++) changed += first[(size_t)v * C + c] != start[(size_t)v * C + c];
    CHECK(t, changed == 0, "%s: %zu values of unused rows changed", name.c_str(), changed);
}

// Tokens with runs of the given lengths once sorted (token i, runs[i] times),
// in a random order of positions.
static std::vector<int> tokens_with_runs(Rng& rng, const std::vector<int>& runs) {
    std::vector<int> tokens;
    for (size_t v = 0; v < runs.size(); v++) tokens.insert(tokens.end(), runs[v], (int)v);
    rng.shuffle(tokens);
    return tokens;
}

static void test_embedding_backward(Test& t) {
    Rng rng(102);
    for (const EmbeddingShape& s : embedding_shapes) {
        std::vector<int> tokens = random_tokens(rng, s.N, s.V);
        for (int n = 0; n < s.N; n += 2) tokens[n] = 7 % s.V;      // half the positions: one token
        for (int n = 1; n < s.N; n += 5) tokens[n] = s.V - 1;      // and some the last id
        check_embedding_backward(t, rng, s.name(), tokens, s.C, s.V);
    }
    // A batch dominated by one token: its run spans many chunks (and the
    // width needs two blocks of channels).
    {
        const int N = 2000, C = 300, V = 500;
        std::vector<int> tokens = random_tokens(rng, N, V);
        for (int n = 0; n < N; n++)
            if (n % 10 != 3) tokens[n] = 123;
        check_embedding_backward(t, rng, string_format("90%% one token N=%d C=%d V=%d", N, C, V), tokens, C, V);
    }
    // Runs that start and end exactly at chunk edges, and one past them.
    const int K = EMBEDDING_CHUNK;
    const std::vector<std::vector<int>> edge_runs = {
        {K, 2 * K, K - 1, 1},               // N = 4K: every run ends at a chunk's end
        {1, K, 2 * K - 1, 1, 2 * K - 1},    // N = 5K: a run of K across an edge, runs ending at edges
        {K + 1, K - 1},                     // N = 2K: one position into the next chunk
        {5 * K},                            // one token only, N = 5K
    };
    for (const std::vector<int>& runs : edge_runs) {
        std::string name = "runs";
        for (int r : runs) name += string_format(" %d", r);
        check_embedding_backward(t, rng, name + " C=96", tokens_with_runs(rng, runs), 96, (int)runs.size() + 3);
    }
}

// ----------------------------------------------------------------------------
// RMSNorm

struct RowShape {
    int N, C;
    std::string name() const { return string_format("N=%d C=%d", N, C); }
};
static const RowShape rmsnorm_shapes[] = {{1, 64}, {37, 100}, {2 * 33, 96}, {5, 768}, {3, 1280}};

static void test_rmsnorm_forward(Test& t) {
    Rng rng(201);
    for (const RowShape& s : rmsnorm_shapes) {
        const size_t NC = (size_t)s.N * s.C;
        std::vector<double> x(NC);
        for (int n = 0; n < s.N; n++) {  // rows of different scales
            double scale = 0.05 + 3.0 * rng.uniform();
            for (int c = 0; c < s.C; c++) x[(size_t)n * s.C + c] = scale * uniform(rng, -1, 1);
        }
        const std::vector<floatX> inp = to_floatXs(x);
        DeviceBuffer<floatX> d_inp(inp), d_out(NC);
        DeviceBuffer<float> d_rstd(s.N);
        d_out.poison();
        d_rstd.poison();
        rmsnorm_forward(d_out.ptr, d_rstd.ptr, d_inp.ptr, s.N, s.C);
        sync_after("rmsnorm_forward");

        std::vector<double> ref(NC), ref_rstd(s.N);
        ref::rmsnorm_forward(ref.data(), ref_rstd.data(), to_doubles(inp).data(), s.N, s.C);
        check_close(t, s.name() + " out", to_doubles(d_out.download()), ref, TOL);
        check_close(t, s.name() + " rstd", to_doubles(d_rstd.download()), ref_rstd, TOL_FP32);
    }
}

static void test_rmsnorm_backward(Test& t) {
    Rng rng(202);
    for (const RowShape& s : rmsnorm_shapes) {
        const size_t NC = (size_t)s.N * s.C;
        // The forward's output and rstd, from the reference, stored as the GPU stores them.
        std::vector<double> x(NC), fwd_out(NC), fwd_rstd(s.N);
        for (double& v : x) v = uniform(rng, -2, 2);
        ref::rmsnorm_forward(fwd_out.data(), fwd_rstd.data(), x.data(), s.N, s.C);
        const std::vector<floatX> out = to_floatXs(fwd_out);
        const std::vector<float> rstd = to_floats(fwd_rstd);
        const std::vector<floatX> dout = random_floatX(rng, NC, -1, 1), start = random_floatX(rng, NC, -1, 1);
        DeviceBuffer<floatX> d_out(out), d_dout(dout), d_dinp(start);
        DeviceBuffer<float> d_rstd(rstd);
        rmsnorm_backward(d_dinp.ptr, d_dout.ptr, d_out.ptr, d_rstd.ptr, s.N, s.C);
        sync_after("rmsnorm_backward");

        std::vector<double> contribution(NC, 0.0);
        ref::rmsnorm_backward(contribution.data(), to_doubles(dout).data(), to_doubles(out).data(),
                              to_doubles(rstd).data(), s.N, s.C);
        check_accumulated(t, s.name() + " dinp", to_doubles(d_dinp.download()), to_doubles(start), contribution, TOL);
    }
}

// ----------------------------------------------------------------------------
// Matmul (cuBLAS)

struct MatmulShape {
    int N, IC, OC;
    std::string name() const { return string_format("N=%d IC=%d OC=%d", N, IC, OC); }
};
static const MatmulShape matmul_shapes[] = {
    {1, 64, 96}, {37, 100, 96}, {2 * 33, 64, 384}, {33, 96, 100}, {2 * 33, 256, 64}};

static void test_matmul_forward(Test& t) {
    Rng rng(251);
    for (const MatmulShape& s : matmul_shapes) {
        const std::vector<floatX> inp = random_floatX(rng, (size_t)s.N * s.IC, -1, 1);
        const std::vector<floatX> w = random_floatX(rng, (size_t)s.OC * s.IC, -1, 1);
        DeviceBuffer<floatX> d_inp(inp), d_w(w), d_out((size_t)s.N * s.OC);
        d_out.poison();
        matmul_forward(g_cublas, d_out.ptr, d_inp.ptr, d_w.ptr, s.N, s.IC, s.OC);
        sync_after("matmul_forward");

        std::vector<double> ref((size_t)s.N * s.OC);
        ref::matmul_forward(ref.data(), to_doubles(inp).data(), to_doubles(w).data(), s.N, s.IC, s.OC);
        check_close(t, s.name() + " out", to_doubles(d_out.download()), ref, TOL);
    }
}

static void test_matmul_backward(Test& t) {
    Rng rng(252);
    for (const MatmulShape& s : matmul_shapes) {
        const std::vector<floatX> inp = random_floatX(rng, (size_t)s.N * s.IC, -1, 1);
        const std::vector<floatX> w = random_floatX(rng, (size_t)s.OC * s.IC, -1, 1);
        const std::vector<floatX> dout = random_floatX(rng, (size_t)s.N * s.OC, -1, 1);
        const std::vector<float> start = random_float(rng, (size_t)s.OC * s.IC, -1, 1);
        DeviceBuffer<floatX> d_inp(inp), d_w(w), d_dout(dout), d_dinp((size_t)s.N * s.IC);
        DeviceBuffer<float> d_dw(start);
        d_dinp.poison();
        matmul_backward(g_cublas, d_dinp.ptr, d_dw.ptr, d_dout.ptr, d_inp.ptr, d_w.ptr, s.N, s.IC, s.OC);
        sync_after("matmul_backward");

        std::vector<double> ref_dinp((size_t)s.N * s.IC), contribution((size_t)s.OC * s.IC, 0.0);
        ref::matmul_backward(ref_dinp.data(), contribution.data(), to_doubles(dout).data(), to_doubles(inp).data(),
                             to_doubles(w).data(), s.N, s.IC, s.OC);
        check_close(t, s.name() + " dinp", to_doubles(d_dinp.download()), ref_dinp, TOL);
        check_accumulated(t, s.name() + " dweight", to_doubles(d_dw.download()), to_doubles(start), contribution,
                          TOL_FP32);
    }
}

// ----------------------------------------------------------------------------
// RoPE + QK-norm, attention

struct AttentionShape {
    int B, T, H, KVH, hd;
    int N() const { return B * T; }
    int width() const { return (H + 2 * KVH) * hd; }
    std::string name() const { return string_format("B=%d T=%d H=%d KVH=%d hd=%d", B, T, H, KVH, hd); }
};
static const AttentionShape rope_shapes[] = {
    {2, 33, 4, 2, 32}, {2, 37, 2, 2, 64}, {2, 1, 4, 2, 128}, {3, 20, 2, 1, 128}, {2, 17, 2, 2, 256}};
static const AttentionShape attention_shapes[] = {
    {2, 1, 4, 2, 64},     // one position: the output is v
    {2, 33, 4, 2, 32},    // GQA; T one past a 32-key tile, not a multiple of 16
    {2, 33, 2, 2, 128},   // wide heads: more than 48 KB of shared memory
    {3, 200, 4, 2, 64},   // long: many key tiles and row blocks
    {2, 200, 2, 1, 128},  // one kv head for every q head
    {2, 17, 2, 2, 256},   // the widest head the kernels take (CUDA cores in both builds)
    {2, 130, 8, 2, 128},  // 4 q heads per kv head; two 64-row tiles and two rows
    {1, 128, 4, 1, 64},   // T a multiple of the 64-row tile; one kv head
};

static void test_rope_qknorm_forward(Test& t) {
    Rng rng(301);
    for (const AttentionShape& s : rope_shapes) {
        const int W = s.width(), heads = s.H + s.KVH, qk = heads * s.hd;
        const size_t N = s.N();
        RopeTables rope;
        rope.allocate(s.T, s.hd);
        const std::vector<floatX> qkv = random_floatX(rng, N * W, -2, 2);
        DeviceBuffer<floatX> d_qkv(qkv);  // in place
        DeviceBuffer<float> d_rstd(N * heads);
        d_rstd.poison();
        rope_qknorm_forward(d_qkv.ptr, d_rstd.ptr, rope, s.B, s.T, s.H, s.KVH, s.hd);
        sync_after("rope_qknorm_forward");
        const std::vector<double> got = to_doubles(d_qkv.download());
        rope.release();

        std::vector<double> ref = to_doubles(qkv), ref_rstd(N * heads);
        ref::rope_qknorm_forward(ref.data(), ref_rstd.data(), s.B, s.T, s.H, s.KVH, s.hd);
        check_close(t, s.name() + " q,k", columns(got, W, 0, qk), columns(ref, W, 0, qk), TOL);
        check_close(t, s.name() + " rstd", to_doubles(d_rstd.download()), ref_rstd, TOL_FP32);
        CHECK(t, columns(got, W, qk, W) == columns(to_doubles(qkv), W, qk, W), "%s: v changed", s.name().c_str());
    }
}

static void test_rope_qknorm_backward(Test& t) {
    Rng rng(302);
    for (const AttentionShape& s : rope_shapes) {
        const int W = s.width(), heads = s.H + s.KVH, qk = heads * s.hd;
        const size_t N = s.N();
        // The forward's output and rstd, from the reference, stored as the GPU stores them.
        std::vector<double> fwd = to_doubles(random_floatX(rng, N * W, -2, 2)), fwd_rstd(N * heads);
        ref::rope_qknorm_forward(fwd.data(), fwd_rstd.data(), s.B, s.T, s.H, s.KVH, s.hd);
        const std::vector<floatX> y = to_floatXs(fwd);
        const std::vector<float> rstd = to_floats(fwd_rstd);
        const std::vector<floatX> dqkv = random_floatX(rng, N * W, -1, 1);
        RopeTables rope;
        rope.allocate(s.T, s.hd);
        DeviceBuffer<floatX> d_y(y), d_dqkv(dqkv);  // in place
        DeviceBuffer<float> d_rstd(rstd);
        rope_qknorm_backward(d_dqkv.ptr, d_y.ptr, d_rstd.ptr, rope, s.B, s.T, s.H, s.KVH, s.hd);
        sync_after("rope_qknorm_backward");
        const std::vector<double> got = to_doubles(d_dqkv.download());
        rope.release();

        std::vector<double> ref = to_doubles(dqkv);
        ref::rope_qknorm_backward(ref.data(), to_doubles(y).data(), to_doubles(rstd).data(), s.B, s.T, s.H, s.KVH,
                                  s.hd);
        check_close(t, s.name() + " dq,dk", columns(got, W, 0, qk), columns(ref, W, 0, qk), TOL);
        CHECK(t, columns(got, W, qk, W) == columns(to_doubles(dqkv), W, qk, W), "%s: dv changed", s.name().c_str());
    }
}

static void test_attention_forward(Test& t) {
    Rng rng(401);
    for (const AttentionShape& s : attention_shapes) {
        const size_t N = s.N(), O = (size_t)s.H * s.hd;
        const std::vector<floatX> qkv = random_floatX(rng, N * s.width(), -2, 2);
        DeviceBuffer<floatX> d_qkv(qkv), d_out(N * O), d_out2(N * O);
        DeviceBuffer<float> d_lse(N * s.H), d_lse2(N * s.H);
        d_out.poison();
        d_lse.poison();
        d_out2.poison();
        d_lse2.poison();
        attention_setup();
        attention_forward(d_out.ptr, d_lse.ptr, d_qkv.ptr, s.B, s.T, s.H, s.KVH, s.hd);
        sync_after("attention_forward");
        attention_forward(d_out2.ptr, d_lse2.ptr, d_qkv.ptr, s.B, s.T, s.H, s.KVH, s.hd);
        sync_after("attention_forward (second run)");

        std::vector<double> ref(N * O), ref_lse(N * s.H);
        ref::attention_forward(ref.data(), ref_lse.data(), to_doubles(qkv).data(), s.B, s.T, s.H, s.KVH, s.hd);
        const std::vector<floatX> out = d_out.download();
        const std::vector<float> lse = d_lse.download();
        check_close(t, s.name() + " out", to_doubles(out), ref, TOL);
        check_close(t, s.name() + " lse", to_doubles(lse), ref_lse, TOL_FP32);
        CHECK(t, same_bits(out, d_out2.download()) && same_bits(lse, d_lse2.download()),
              "%s: two runs differ (not deterministic)", s.name().c_str());
    }
}

static void test_attention_backward(Test& t) {
    Rng rng(402);
    for (const AttentionShape& s : attention_shapes) {
        const int W = s.width(), q_end = s.H * s.hd, k_end = (s.H + s.KVH) * s.hd;
        const size_t N = s.N(), O = (size_t)s.H * s.hd;
        const std::vector<floatX> qkv = random_floatX(rng, N * W, -2, 2), dout = random_floatX(rng, N * O, -1, 1);
        const std::vector<double> qkv_d = to_doubles(qkv);
        // The forward's out and lse, from the reference, stored as the GPU stores them.
        std::vector<double> fwd_out(N * O), fwd_lse(N * s.H);
        ref::attention_forward(fwd_out.data(), fwd_lse.data(), qkv_d.data(), s.B, s.T, s.H, s.KVH, s.hd);
        const std::vector<floatX> out = to_floatXs(fwd_out);
        const std::vector<float> lse = to_floats(fwd_lse);

        DeviceBuffer<floatX> d_qkv(qkv), d_dout(dout), d_out(out), d_dqkv(N * W), d_dqkv2(N * W);
        DeviceBuffer<float> d_lse(lse), d_delta(N * s.H);
        d_dqkv.poison();
        d_dqkv2.poison();
        d_delta.poison();
        attention_setup();
        attention_backward(d_dqkv.ptr, d_dout.ptr, d_out.ptr, d_lse.ptr, d_qkv.ptr, d_delta.ptr, s.B, s.T, s.H, s.KVH,
                           s.hd);
        sync_after("attention_backward");
        d_delta.poison();
        attention_backward(d_dqkv2.ptr, d_dout.ptr, d_out.ptr, d_lse.ptr, d_qkv.ptr, d_delta.ptr, s.B, s.T, s.H,
                           s.KVH, s.hd);
        sync_after("attention_backward (second run)");

        std::vector<double> ref(N * W);
        ref::attention_backward(ref.data(), to_doubles(dout).data(), to_doubles(out).data(), to_doubles(lse).data(),
                                qkv_d.data(), s.B, s.T, s.H, s.KVH, s.hd);
        const std::vector<floatX> got = d_dqkv.download();
        const std::vector<double> g = to_doubles(got);
        check_close(t, s.name() + " dq", columns(g, W, 0, q_end), columns(ref, W, 0, q_end), TOL);
        check_close(t, s.name() + " dk", columns(g, W, q_end, k_end), columns(ref, W, q_end, k_end), TOL);
        check_close(t, s.name() + " dv", columns(g, W, k_end, W), columns(ref, W, k_end, W), TOL);
        CHECK(t, same_bits(got, d_dqkv2.download()), "%s: two runs differ (not deterministic)", s.name().c_str());
    }
}

// ----------------------------------------------------------------------------
// ReLU^2, residual

static const size_t elementwise_sizes[] = {1, 1000, 12347};

static void test_relu2_forward(Test& t) {
    Rng rng(501);
    for (size_t n : elementwise_sizes) {
        const std::vector<floatX> inp = random_floatX(rng, n, -2, 2);
        DeviceBuffer<floatX> d_inp(inp), d_out(n);
        d_out.poison();
        relu2_forward(d_out.ptr, d_inp.ptr, n);
        sync_after("relu2_forward");

        std::vector<double> ref(n);
        ref::relu2_forward(ref.data(), to_doubles(inp).data(), (int)n);
        check_close(t, string_format("n=%zu", n), to_doubles(d_out.download()), ref, TOL);
    }
}

// Also in place (dinp == dout), as model_backward runs it.
static void test_relu2_backward(Test& t) {
    Rng rng(502);
    for (size_t n : elementwise_sizes) {
        const std::vector<floatX> inp = random_floatX(rng, n, -2, 2), dout = random_floatX(rng, n, -1, 1);
        DeviceBuffer<floatX> d_inp(inp), d_dout(dout), d_dinp(n);
        d_dinp.poison();
        relu2_backward(d_dinp.ptr, d_dout.ptr, d_inp.ptr, n);
        sync_after("relu2_backward");
        relu2_backward(d_dout.ptr, d_dout.ptr, d_inp.ptr, n);
        sync_after("relu2_backward (in place)");

        std::vector<double> ref(n);
        ref::relu2_backward(ref.data(), to_doubles(dout).data(), to_doubles(inp).data(), (int)n);
        check_close(t, string_format("n=%zu", n), to_doubles(d_dinp.download()), ref, TOL);
        check_close(t, string_format("n=%zu in place", n), to_doubles(d_dout.download()), ref, TOL);
    }
}

static void test_residual_forward(Test& t) {
    Rng rng(503);
    for (size_t n : elementwise_sizes) {
        const std::vector<floatX> x = random_floatX(rng, n, -1, 1), y = random_floatX(rng, n, -1, 1);
        DeviceBuffer<floatX> d_x(x), d_y(y);  // x += y in place
        residual_forward(d_x.ptr, d_y.ptr, n);
        sync_after("residual_forward");

        std::vector<double> ref = to_doubles(x);
        ref::residual_forward(ref.data(), to_doubles(y).data(), (int)n);
        check_close(t, string_format("n=%zu", n), to_doubles(d_x.download()), ref, TOL);
    }
}

// ----------------------------------------------------------------------------
// Soft-capped cross-entropy, loss sum

struct LossShape {
    int N, V, Vp;
    std::string name() const { return string_format("N=%d V=%d Vp=%d", N, V, Vp); }
};

// In place: the logits become dlogits. Some logits are far past the cap
// (|z| up to 300, where tanh saturates); the padding columns hold 1e4 (capped
// to 15, far above every real logit), which would dominate the loss if any
// of them were counted.
// Greedy predictions: random rows, and rows whose best value is tied (equal
// logits, and distinct logits the soft-cap saturates to the same float),
// one row of NaNs; the padding columns are larger than any real logit.
static void test_logits_argmax(Test& t) {
    Rng rng(602);
    for (const LossShape& s : {LossShape{1, 50, 128}, LossShape{37, 300, 384}, LossShape{12, 1000, 1024}}) {
        std::vector<double> z((size_t)s.N * s.Vp);
        for (int n = 0; n < s.N; n++) {
            double* row = &z[(size_t)n * s.Vp];
            for (int j = 0; j < s.V; j++) row[j] = uniform(rng, -8, 8);
            for (int j = s.V; j < s.Vp; j++) row[j] = 1e4;
            const int a = (int)rng.below(s.V), b = (int)rng.below(s.V);
            if (n % 4 == 1) row[a] = row[b] = 9;      // an exact tie: the lower index wins
            if (n % 4 == 2) row[a] = 200, row[b] = 300;  // both soft-cap to 15 exactly
            if (n % 4 == 3 && n == s.N - 1)
                for (int j = 0; j < s.V; j++) row[j] = NAN;
        }
        const std::vector<floatX> logits = to_floatXs(z);
        DeviceBuffer<floatX> d_logits(logits);
        DeviceBuffer<int> d_out(s.N);
        d_out.poison(INT_POISON);
        logits_argmax(d_out.ptr, d_logits.ptr, s.N, s.V, s.Vp);
        sync_after("logits_argmax");
        const std::vector<int> got = d_out.download();
        std::vector<float> rounded(logits.size());
        for (size_t i = 0; i < logits.size(); i++) rounded[i] = (float)to_double(logits[i]);
        int wrong = 0, first_wrong = -1;
        for (int n = 0; n < s.N; n++)
            if (got[n] != ref::softcap_argmax(&rounded[(size_t)n * s.Vp], s.V) && wrong++ == 0) first_wrong = n;
        CHECK(t, wrong == 0, "%s: %d rows predict another token than the reference (first: row %d, %d vs %d)",
              s.name().c_str(), wrong, first_wrong, first_wrong < 0 ? 0 : got[first_wrong],
              first_wrong < 0 ? 0 : ref::softcap_argmax(&rounded[(size_t)first_wrong * s.Vp], s.V));
    }
}

static void test_softcap_cross_entropy(Test& t) {
    Rng rng(601);
    for (const LossShape& s : {LossShape{1, 50, 128}, LossShape{37, 300, 384}, LossShape{2 * 33, 1000, 1024},
                               LossShape{4, 256, 256}}) {
        std::vector<int> targets = random_tokens(rng, s.N, s.V);
        targets[0] = s.V - 1;
        if (s.N > 1) targets[1] = 0;
        std::vector<double> z((size_t)s.N * s.Vp);
        for (int n = 0; n < s.N; n++) {
            double* row = &z[(size_t)n * s.Vp];
            for (int j = 0; j < s.V; j++) row[j] = uniform(rng, -8, 8);
            for (int j = s.V; j < s.Vp; j++) row[j] = 1e4;
            if (n % 3 == 1)  // saturated logits at random columns
                for (int k = 0; k < 8; k++) row[rng.below(s.V)] = (k % 2 ? -1 : 1) * uniform(rng, 30, 300);
            if (n % 3 == 2) row[targets[n]] = 60;  // a saturated right answer
        }
        const std::vector<floatX> logits = to_floatXs(z);
        const float dloss = 1.0f / s.N;
        DeviceBuffer<floatX> d_logits(logits);
        DeviceBuffer<float> d_losses(s.N);
        DeviceBuffer<int> d_targets(targets);
        d_losses.poison();
        softcap_cross_entropy(d_losses.ptr, d_logits.ptr, d_targets.ptr, s.N, s.V, s.Vp, dloss, true);
        sync_after("softcap_cross_entropy");
        const std::vector<double> losses = to_doubles(d_losses.download()), dlogits = to_doubles(d_logits.download());

        std::vector<double> ref_losses(s.N), ref_dlogits((size_t)s.N * s.Vp);
        ref::softcap_cross_entropy(ref_losses.data(), ref_dlogits.data(), to_doubles(logits).data(), targets.data(),
                                   s.N, s.V, s.Vp, (double)dloss);
        check_close(t, s.name() + " losses", losses, ref_losses, TOL_FP32);
        check_close(t, s.name() + " dlogits", dlogits, ref_dlogits, TOL);
        size_t padded_nonzero = 0;
        for (int n = 0; n < s.N; n++)
            for (int j = s.V; j < s.Vp; j++) padded_nonzero += dlogits[(size_t)n * s.Vp + j] != 0.0;
        CHECK(t, padded_nonzero == 0, "%s: %zu padded dlogits are not exactly 0", s.name().c_str(), padded_nonzero);

        // Without the gradient: the same losses, the logits untouched.
        d_logits.upload(logits);
        d_losses.poison();
        softcap_cross_entropy(d_losses.ptr, d_logits.ptr, d_targets.ptr, s.N, s.V, s.Vp, dloss, false);
        sync_after("softcap_cross_entropy (no gradient)");
        check_close(t, s.name() + " losses, no gradient", to_doubles(d_losses.download()), ref_losses, TOL_FP32);
        CHECK(t, same_bits(d_logits.download(), logits), "%s: logits changed without write_grad", s.name().c_str());
    }
}

static void test_loss_sum(Test& t) {
    Rng rng(602);
    for (int N : {1, 37, 5000}) {
        const std::vector<float> losses = random_float(rng, N, 0.5, 10), start = random_float(rng, 1, 1, 5);
        DeviceBuffer<float> d_losses(losses), d_total(start);  // accumulates into *total
        loss_sum(d_total.ptr, d_losses.ptr, N);
        sync_after("loss_sum");
        double sum = 0;
        for (float l : losses) sum += l;
        check_accumulated(t, string_format("N=%d", N), to_doubles(d_total.download()), to_doubles(start), {sum},
                          TOL_FP32);
    }
}

// ----------------------------------------------------------------------------
// Global norm, AdamW, floatX copies

static const size_t optimizer_sizes[] = {1, 1000, 300007};  // the last: more than one grid-stride pass

enum class Clip { Active, Inactive, Off };
static const char* clip_name(Clip c) {
    return c == Clip::Active ? "clipping" : c == Clip::Inactive ? "no clipping" : "max_norm 0";
}
static float max_norm_for(Clip c, double norm) {
    return c == Clip::Active ? (float)(0.5 * norm) : c == Clip::Inactive ? (float)(2.0 * norm) : 0.0f;
}

static void test_grad_norm(Test& t) {
    Rng rng(701);
    for (size_t n : optimizer_sizes) {
        const std::vector<float> grads = random_float(rng, n, -1, 1);
        const double norm = ref::global_norm(to_doubles(grads).data(), n);
        DeviceBuffer<float> d_grads(grads), d_norm(1), d_clip(1), d_partial(NORM_BLOCKS);
        for (Clip clip : {Clip::Active, Clip::Inactive, Clip::Off}) {
            const float max_norm = max_norm_for(clip, norm);
            d_norm.poison();
            d_clip.poison();
            d_partial.poison();
            grad_norm(d_norm.ptr, d_clip.ptr, d_partial.ptr, d_grads.ptr, n, max_norm);
            sync_after("grad_norm");
            const std::string what = string_format("n=%zu %s", n, clip_name(clip));
            check_close(t, what + " norm", to_doubles(d_norm.download()), {norm}, TOL_FP32);
            const float scale = d_clip.download()[0];
            if (clip == Clip::Active)
                check_close(t, what + " clip factor", {(double)scale}, {max_norm / norm}, TOL_FP32);
            else
                CHECK(t, scale == 1.0f, "%s: clip factor %.9g, expected exactly 1", what.c_str(), scale);
        }
    }
}

// grad_norm makes the clip factor adamw_update reads, as in training.
static void test_adamw_update(Test& t) {
    Rng rng(702);
    const float lr = 1e-2f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
    const int step = 3;
    for (size_t n : optimizer_sizes) {
        for (Clip clip : {Clip::Active, Clip::Inactive}) {
            const std::vector<float> grads = random_float(rng, n, -1, 1), master = random_float(rng, n, -1, 1);
            const std::vector<float> m = random_float(rng, n, -0.1, 0.1), v = random_float(rng, n, 1e-4, 1e-2);
            const double norm = ref::global_norm(to_doubles(grads).data(), n);
            const float max_norm = max_norm_for(clip, norm);
            DeviceBuffer<float> d_grads(grads), d_master(master), d_m(m), d_v(v);
            DeviceBuffer<float> d_norm(1), d_clip(1), d_partial(NORM_BLOCKS);
            DeviceBuffer<floatX> d_params(n);
            d_params.poison();
            grad_norm(d_norm.ptr, d_clip.ptr, d_partial.ptr, d_grads.ptr, n, max_norm);
            adamw_update(d_master.ptr, d_params.ptr, d_m.ptr, d_v.ptr, d_grads.ptr, n, lr, beta1, beta2, eps,
                         weight_decay, step, d_clip.ptr);
            sync_after("grad_norm + adamw_update");

            const double scale = clip == Clip::Active ? max_norm / norm : 1.0;
            std::vector<double> ref_w = to_doubles(master), ref_m = to_doubles(m), ref_v = to_doubles(v);
            ref::adamw_update(ref_w.data(), ref_m.data(), ref_v.data(), to_doubles(grads).data(), n, (double)lr,
                              (double)beta1, (double)beta2, (double)eps, (double)weight_decay, step, scale);
            const std::vector<float> got_w = d_master.download();
            const std::string what = string_format("n=%zu %s", n, clip_name(clip));
            check_close(t, what + " m", to_doubles(d_m.download()), ref_m, TOL_FP32);
            check_close(t, what + " v", to_doubles(d_v.download()), ref_v, TOL_FP32);
            // The step itself, not the weights (which barely move).
            std::vector<double> step_gpu(n), step_ref(n);
            for (size_t i = 0; i < n; i++) {
                step_gpu[i] = (double)got_w[i] - master[i];
                step_ref[i] = ref_w[i] - master[i];
            }
            check_close(t, what + " weight step", step_gpu, step_ref, TOL_FP32);
            std::vector<floatX> expected(n);
            for (size_t i = 0; i < n; i++) expected[i] = to_floatX(got_w[i]);
            CHECK(t, same_bits(d_params.download(), expected), "%s: params are not the rounded master weights",
                  what.c_str());
        }
    }
}

static void test_copy_to_floatX(Test& t) {
    Rng rng(703);
    for (size_t n : {(size_t)1, (size_t)1001}) {
        const std::vector<float> inp = random_float(rng, n, -3, 3);
        DeviceBuffer<float> d_inp(inp);
        DeviceBuffer<floatX> d_out(n);
        d_out.poison();
        copy_to_floatX(d_out.ptr, d_inp.ptr, n);
        sync_after("copy_to_floatX");
        std::vector<floatX> expected(n);
        for (size_t i = 0; i < n; i++) expected[i] = to_floatX(inp[i]);
        CHECK(t, same_bits(d_out.download(), expected), "n=%zu: not rounded to nearest", n);
    }
}

// ----------------------------------------------------------------------------
// The whole model: forward, backward, gradient accumulation, update

// Fills every activation buffer with NaN: the forward and backward must
// write each value before they read it.
static void poison_activations(Model& model) {
    const ModelConfig& c = model.config;
    Activations& a = model.acts;
    const size_t N = (size_t)a.B * a.T, C = c.n_embd, H = c.n_head, KVH = c.n_kv_head, Vp = c.padded_vocab();
    const size_t qkv_width = (H + 2 * KVH) * c.head_dim(), ffn = 4 * C;
    poison(a.x0, N * C);
    poison(a.x0_rstd, N);
    poison(a.residual, N * C);
    for (Activations::Layer& L : a.layers) {
        poison(L.ln1, N * C);
        poison(L.ln1_rstd, N);
        poison(L.qkv, N * qkv_width);
        poison(L.qk_rstd, N * (H + KVH));
        poison(L.atty, N * C);
        poison(L.lse, N * H);
        poison(L.ln2, N * C);
        poison(L.ln2_rstd, N);
        poison(L.fc_pre, N * ffn);
    }
    poison(a.lnf, N * C);
    poison(a.lnf_rstd, N);
    poison(a.logits, N * Vp);
    poison(a.losses, N);
    poison(a.dresidual, N * C);
    poison(a.scratch_wide, N * std::max(ffn, qkv_width));
    poison(a.scratch_narrow, N * C);
    poison(a.ffn_act, N * ffn);
    poison(a.att_delta, N * H);
}

static void check_model_step(Test& t, int n_kv_head) {
    const int B = 2, T = 33, N = B * T;
    ModelConfig c;
    c.preset = "gpu_test";
    c.n_layer = 2;
    c.n_embd = 64;
    c.n_head = 2;  // head dim 32
    c.n_kv_head = n_kv_head;
    c.vocab_size = 300;  // padded to 384
    c.seq_len = T;
    const float lr = 1e-3f, weight_decay = 0.1f;  // of the update at the end
    Model model;
    model.config = c;
    model.optim.lr = lr;  // the groups' rates are fixed when model_allocate forms them
    model.optim.weight_decay = weight_decay;
    model_allocate(&model, B, T);
    const size_t P = model.num_params;
    const std::string cfg = string_format("n_kv_head %d", n_kv_head);

    // Parameters N(0, 0.1) everywhere (lm_head, wo and proj too, so every
    // path carries gradient); lm_head's padding rows zero, as at init.
    Rng rng(801 + n_kv_head);
    std::vector<float> master(P, 0.0f);
    for (size_t i = 0; i < model.tensors.size(); i++) {
        const ParamTensor& p = model.tensors[i];
        const size_t real = (size_t)((p.rows - p.padding_rows) * p.cols);
        for (size_t j = 0; j < real; j++) master[model.offsets[i] + j] = (float)(0.1 * normal(rng));
    }
    upload_to(model.master, master);
    copy_to_floatX(model.params, model.master, P);
    sync_after("copy_to_floatX");
    const std::vector<double> params = to_doubles(download_from(model.params, P));  // what the matmuls read

    std::vector<int> tokens = random_tokens(rng, N, c.vocab_size);
    const std::vector<int> targets = random_tokens(rng, N, c.vocab_size);
    for (int n = 0; n < N; n += 7) tokens[n] = 42;  // a token at many positions
    upload_to(model.acts.tokens, tokens);
    upload_to(model.acts.targets, targets);
    poison_activations(model);
    cudaCheck(cudaMemset(model.loss_total, 0, sizeof(float)));
    cudaCheck(cudaMemset(model.grads, 0, P * sizeof(float)));

    model_forward(&model, B, T, true, true, 1.0f / N);
    sync_after("model_forward");
    model_backward(&model, B, T);
    sync_after("model_backward");
    const float loss_total = download_from(model.loss_total, 1)[0];
    const std::vector<double> grads = to_doubles(download_from(model.grads, P));

    // The reference: the same parameters and tokens, in double.
    ref::RefModel<double> reference{c};
    ref::RefModel<double>::Activations acts;
    const double ref_loss = reference.forward(params, tokens.data(), targets.data(), B, T, &acts);
    std::vector<double> ref_grads(P, 0.0);
    reference.backward(params, tokens.data(), targets.data(), B, T, acts, &ref_grads);

    check_close(t, cfg + " loss", {(double)loss_total / N}, {ref_loss}, TOL);
    for (size_t i = 0; i < model.tensors.size(); i++) {
        const ParamTensor& p = model.tensors[i];
        const size_t off = model.offsets[i], numel = (size_t)p.numel();
        const size_t real = (size_t)((p.rows - p.padding_rows) * p.cols);
        const std::vector<double> got(grads.begin() + off, grads.begin() + off + real);
        const std::vector<double> want(ref_grads.begin() + off, ref_grads.begin() + off + real);
        check_close(t, cfg + " d" + p.name, got, want, TOL);
        CHECK(t, l2_norm(want) > 0, "%s: the reference gradient of %s is zero", cfg.c_str(), p.name.c_str());
        size_t padding_nonzero = 0;
        for (size_t j = off + real; j < off + numel; j++) padding_nonzero += grads[j] != 0.0;
        CHECK(t, padding_nonzero == 0, "%s: %zu gradients of %s's padding rows are not 0", cfg.c_str(),
              padding_nonzero, p.name.c_str());
    }

    // A second micro-batch of the same tokens: the loss and the gradients
    // accumulate (they double).
    poison_activations(model);
    model_forward(&model, B, T, true, true, 1.0f / N);
    sync_after("model_forward (second micro-batch)");
    model_backward(&model, B, T);
    sync_after("model_backward (second micro-batch)");
    const std::vector<double> grads2 = to_doubles(download_from(model.grads, P));
    std::vector<double> twice(P);
    for (size_t i = 0; i < P; i++) twice[i] = 2 * grads[i];
    check_close(t, cfg + " gradients after two micro-batches vs twice one", grads2, twice, TOL_FP32);
    check_close(t, cfg + " loss total after two micro-batches", to_doubles(download_from(model.loss_total, 1)),
                {2.0 * loss_total}, TOL_FP32);

    // One update on those gradients, clipping active, against the reference
    // AdamW (weight decay on the matrices only).
    const double norm = ref::global_norm(grads2.data(), P);
    const float max_norm = (float)(0.5 * norm);
    model_update(&model, Schedule{LrSchedule::Wsd, 0.0, 0.0, 0, 1}, max_norm, 0);
    sync_after("model_update");
    const double scale = max_norm / norm;
    std::vector<double> ref_w = to_doubles(master), ref_m(P, 0.0), ref_v(P, 0.0);
    for (size_t i = 0; i < model.tensors.size(); i++) {
        const size_t off = model.offsets[i];
        const double wd = model.tensors[i].decays() ? (double)weight_decay : 0.0;
        ref::adamw_update(&ref_w[off], &ref_m[off], &ref_v[off], &grads2[off], (size_t)model.tensors[i].numel(),
                          (double)lr, (double)0.9f, (double)0.95f, (double)1e-8f, wd, 1, scale);
    }
    check_close(t, cfg + " grad norm", to_doubles(download_from(model.grad_norm_value, 1)), {norm}, TOL_FP32);
    check_close(t, cfg + " adam m", to_doubles(download_from(model.adam_m, P)), ref_m, TOL_FP32);
    check_close(t, cfg + " adam v", to_doubles(download_from(model.adam_v, P)), ref_v, TOL_FP32);
    const std::vector<float> new_master = download_from(model.master, P);
    for (size_t i = 0; i < model.tensors.size(); i++) {  // the step of each tensor (weight decay differs)
        const size_t off = model.offsets[i], numel = (size_t)model.tensors[i].numel();
        std::vector<double> step_gpu(numel), step_ref(numel);
        for (size_t j = 0; j < numel; j++) {
            step_gpu[j] = (double)new_master[off + j] - master[off + j];
            step_ref[j] = ref_w[off + j] - master[off + j];
        }
        check_close(t, cfg + " weight step of " + model.tensors[i].name, step_gpu, step_ref, TOL_FP32);
    }
    std::vector<floatX> rounded(P);
    for (size_t i = 0; i < P; i++) rounded[i] = to_floatX(new_master[i]);
    CHECK(t, same_bits(download_from(model.params, P), rounded), "%s: params are not the rounded master weights",
          cfg.c_str());
    const int head = (int)model.tensors.size() - 1;
    const size_t pad_begin = model.offsets[head] + (size_t)(c.vocab_size * c.n_embd);
    size_t padding_nonzero = 0;
    for (size_t j = pad_begin; j < P; j++) padding_nonzero += new_master[j] != 0.0f;
    CHECK(t, padding_nonzero == 0, "%s: %zu lm_head padding weights moved", cfg.c_str(), padding_nonzero);
    model_free(&model);
}

static void test_model_step(Test& t) { check_model_step(t, 2); }
static void test_model_step_gqa(Test& t) { check_model_step(t, 1); }

// ----------------------------------------------------------------------------

int main() {
    return run_gpu_tests("gpu_model", {
        GPU_TEST(embedding_forward), GPU_TEST(embedding_backward),
        GPU_TEST(rmsnorm_forward), GPU_TEST(rmsnorm_backward),
        GPU_TEST(matmul_forward), GPU_TEST(matmul_backward),
        GPU_TEST(rope_qknorm_forward), GPU_TEST(rope_qknorm_backward),
        GPU_TEST(attention_forward), GPU_TEST(attention_backward),
        GPU_TEST(relu2_forward), GPU_TEST(relu2_backward),
        GPU_TEST(residual_forward),
        GPU_TEST(softcap_cross_entropy),
        GPU_TEST(logits_argmax),
        GPU_TEST(loss_sum),
        GPU_TEST(grad_norm),
        GPU_TEST(adamw_update),
        GPU_TEST(copy_to_floatX),
        GPU_TEST(model_step), GPU_TEST(model_step_gqa),
    });
}
