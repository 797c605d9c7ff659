// test_reference: the CPU reference (test/reference.h) is right, so the GPU
// kernels can be checked against it.
//
// Every backward is checked in double precision against central differences
// of its forward: with random inputs x and a random upstream gradient dout,
// the objective L = sum(out * dout) has dL/dx = the backward's result, for
// every input element. Forwards are checked against closed forms (RMSNorm's
// unit mean square, RoPE's rotations, attention at T = 1, -log p computed a
// second way), AdamW against values worked out by hand, Muon's Newton-Schulz
// map against its scalar polynomial and its rotation symmetry, Muon's step
// against its definition, and the whole dense model's gradient against
// central differences of its mean loss.
#include <cmath>
#include <functional>

#include "check.h"
#include "gradcheck.h"
#include "reference.h"

// ---------------------------------------------------------------------------
// Embedding, RMSNorm, matmul

static void test_embedding(Test& t) {
    Rng rng(1);
    const int N = 6, C = 7, V = 4;
    const int tokens[N] = {2, 0, 2, 3, 1, 2};  // token 2 three times: its gradients add up
    Vec wte = random_vector(rng, V * C), dout = random_vector(rng, N * C), out(N * C);
    embedding_forward(out.data(), tokens, wte.data(), N, C);
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++)
            CHECK(t, out[n * C + c] == wte[tokens[n] * C + c], "out[%d][%d] is not wte[%d][%d]", n, c, tokens[n], c);

    Vec before = random_vector(rng, V * C), dwte = before;  // it accumulates
    embedding_backward(dwte.data(), tokens, dout.data(), N, C);
    check_gradient(t, "dwte", &wte, minus(dwte, before), [&] {
        embedding_forward(out.data(), tokens, wte.data(), N, C);
        return dot(out, dout);
    });
}

static void test_rmsnorm_forward(Test& t) {
    Rng rng(2);
    const int N = 5, C = 7;
    Vec x = random_vector(rng, N * C, -3, 3), out = nans(N * C), rstd = nans(N);
    rmsnorm_forward(out.data(), rstd.data(), x.data(), N, C);
    for (int n = 0; n < N; n++) {
        double in_sq = 0, out_sq = 0;
        for (int c = 0; c < C; c++) {
            in_sq += x[n * C + c] * x[n * C + c];
            out_sq += out[n * C + c] * out[n * C + c];
        }
        CHECK(t, std::fabs(out_sq / C - 1) < 1e-5, "row %d: mean square %.9f", n, out_sq / C);
        CHECK(t, std::fabs(rstd[n] - 1 / std::sqrt(in_sq / C + 1e-6)) < 1e-14, "row %d: rstd %.15f", n, rstd[n]);
    }
    Vec in_place = x, rstd2(N);  // QK-norm normalises in place
    rmsnorm_forward(in_place.data(), rstd2.data(), in_place.data(), N, C);
    CHECK(t, in_place == out && rstd2 == rstd, "in place differs from out of place");
}

static void test_rmsnorm_backward(Test& t) {
    Rng rng(3);
    const int N = 5, C = 7;
    Vec x = random_vector(rng, N * C), dout = random_vector(rng, N * C), out(N * C), rstd(N);
    rmsnorm_forward(out.data(), rstd.data(), x.data(), N, C);
    Vec before = random_vector(rng, N * C), dx = before;  // it accumulates
    rmsnorm_backward(dx.data(), dout.data(), out.data(), rstd.data(), N, C);
    check_gradient(t, "dinp", &x, minus(dx, before), [&] {
        rmsnorm_forward(out.data(), rstd.data(), x.data(), N, C);
        return dot(out, dout);
    });
}

static void test_matmul_forward(Test& t) {
    // [1 2 3; 4 5 6] @ [1 0 -1; 2 1 0]^T = [-2 4; -2 13]
    const Vec inp = {1, 2, 3, 4, 5, 6}, w = {1, 0, -1, 2, 1, 0}, expected = {-2, 4, -2, 13};
    Vec out = nans(4);
    matmul_forward(out.data(), inp.data(), w.data(), 2, 3, 2);
    CHECK(t, out == expected, "got [%g %g; %g %g]", out[0], out[1], out[2], out[3]);
}

static void test_matmul_backward(Test& t) {
    Rng rng(4);
    const int N = 5, IC = 7, OC = 3;
    Vec inp = random_vector(rng, N * IC), w = random_vector(rng, OC * IC), dout = random_vector(rng, N * OC);
    Vec out(N * OC), dinp = nans(N * IC), before = random_vector(rng, OC * IC), dw = before;
    matmul_backward(dinp.data(), dw.data(), dout.data(), inp.data(), w.data(), N, IC, OC);
    auto objective = [&] {
        matmul_forward(out.data(), inp.data(), w.data(), N, IC, OC);
        return dot(out, dout);
    };
    check_gradient(t, "dinp", &inp, dinp, objective);
    check_gradient(t, "dw", &w, minus(dw, before), objective);
}

// ---------------------------------------------------------------------------
// RoPE + QK-norm, attention

struct AttentionShape {
    int B, T, H, KVH, hd;
    int N() const { return B * T; }
    int width() const { return (H + 2 * KVH) * hd; }
    std::string name() const { return string_format("B=%d T=%d H=%d KVH=%d hd=%d", B, T, H, KVH, hd); }
};

static void test_rope_qknorm_forward(Test& t) {
    for (int hd : {6, 8}) {
        const AttentionShape s = {2, 5, 2, 1, hd};
        const int width = s.width(), half = hd / 2, heads = s.H + s.KVH;
        Rng rng(5 + hd);
        Vec in = random_vector(rng, s.N() * width), out = in, rstd = nans(s.N() * heads);
        rope_qknorm_forward(out.data(), rstd.data(), s.B, s.T, s.H, s.KVH, hd);
        for (int n = 0; n < s.N(); n++) {
            const int pos = n % s.T;
            for (int c = heads * hd; c < width; c++)
                CHECK(t, out[n * width + c] == in[n * width + c], "%s: v changed", s.name().c_str());
            for (int j = 0; j < heads; j++) {
                const double* x = &in[n * width + j * hd];
                const double* y = &out[n * width + j * hd];
                const double r = rstd[n * heads + j];
                double sum_sq = 0;
                for (int i = 0; i < hd; i++) sum_sq += x[i] * x[i];
                // A rotation keeps the head's norm, so rstd is the input's.
                CHECK(t, std::fabs(r - 1 / std::sqrt(sum_sq / hd + 1e-6)) < 1e-12, "%s: rstd", s.name().c_str());
                for (int i = 0; i < half; i++) {
                    // Each pair (i, i + hd/2) keeps its own norm, scaled by rstd.
                    double in_norm = std::hypot(x[i], x[i + half]), out_norm = std::hypot(y[i], y[i + half]);
                    CHECK(t, std::fabs(out_norm - r * in_norm) < 1e-12, "%s: pair %d norm", s.name().c_str(), i);
                    if (pos == 0)  // angle 0: RoPE is the identity
                        CHECK(t, std::fabs(y[i] - r * x[i]) < 1e-15 && std::fabs(y[i + half] - r * x[i + half]) < 1e-15,
                              "%s: t=0 is not the identity", s.name().c_str());
                }
                // Pair 0 turns by exactly t radians (frequency 10000^0 = 1);
                // the last pair by t * 10000^(-(hd-2)/hd).
                const double a0 = pos, a1 = pos * std::pow(10000.0, -(double)(hd - 2) / hd);
                CHECK(t, std::fabs(y[0] - r * (x[0] * std::cos(a0) - x[half] * std::sin(a0))) < 1e-12 &&
                         std::fabs(y[half] - r * (x[half] * std::cos(a0) + x[0] * std::sin(a0))) < 1e-12 &&
                         std::fabs(y[half - 1] - r * (x[half - 1] * std::cos(a1) - x[hd - 1] * std::sin(a1))) < 1e-12 &&
                         std::fabs(y[hd - 1] - r * (x[hd - 1] * std::cos(a1) + x[half - 1] * std::sin(a1))) < 1e-12,
                      "%s: token %d head %d: wrong rotation", s.name().c_str(), n, j);
            }
        }
    }
}

static void test_rope_qknorm_backward(Test& t) {
    for (const AttentionShape& s : {AttentionShape{2, 5, 2, 1, 6}, AttentionShape{2, 5, 2, 2, 8}}) {
        Rng rng(7 + s.KVH);
        Vec in = random_vector(rng, s.N() * s.width()), dout = random_vector(rng, s.N() * s.width());
        Vec out = in, rstd(s.N() * (s.H + s.KVH));
        rope_qknorm_forward(out.data(), rstd.data(), s.B, s.T, s.H, s.KVH, s.hd);
        Vec din = dout;  // in place: the output's gradient in, the input's out
        rope_qknorm_backward(din.data(), out.data(), rstd.data(), s.B, s.T, s.H, s.KVH, s.hd);
        check_gradient(t, s.name(), &in, din, [&] {
            out = in;
            rope_qknorm_forward(out.data(), rstd.data(), s.B, s.T, s.H, s.KVH, s.hd);
            return dot(out, dout);
        });
    }
}

// Head counts (H, KVH): one shared kv head, one each, and groups of two
// (where q heads 0, 1 read kv head 0 and 2, 3 read kv head 1).
static const int head_counts[][2] = {{2, 1}, {2, 2}, {4, 2}};

static void test_attention_forward(Test& t) {
    for (const auto& [H, KVH] : head_counts) {
        const int hd = 4, width = (H + 2 * KVH) * hd;
        Rng rng(9 + H + KVH);

        // T = 1: the only key gets weight 1, the output is its value.
        {
            const AttentionShape s = {3, 1, H, KVH, hd};
            Vec qkv = random_vector(rng, s.N() * width), out = nans(s.N() * H * hd), lse = nans(s.N() * H);
            attention_forward(out.data(), lse.data(), qkv.data(), s.B, s.T, H, KVH, hd);
            for (int n = 0; n < s.N(); n++)
                for (int h = 0; h < H; h++) {
                    const double* q = &qkv[n * width + h * hd];
                    const double* k = &qkv[n * width + (H + h / (H / KVH)) * hd];
                    const double* v = &qkv[n * width + (H + KVH + h / (H / KVH)) * hd];
                    for (int i = 0; i < hd; i++)
                        CHECK(t, out[(n * H + h) * hd + i] == v[i], "%s: T=1 output is not v", s.name().c_str());
                    double score = (q[0] * k[0] + q[1] * k[1] + q[2] * k[2] + q[3] * k[3]) / 2;  // sqrt(hd) = 2
                    CHECK(t, std::fabs(lse[n * H + h] - score) < 1e-15, "%s: T=1 lse", s.name().c_str());
                }
        }

        // Equal keys: every visible position gets the same weight, so the
        // output at t is the mean of the values at 0..t.
        const AttentionShape s = {2, 5, H, KVH, hd};
        Vec qkv = random_vector(rng, s.N() * width), out(s.N() * H * hd), lse(s.N() * H);
        for (int n = 0; n < s.N(); n++)
            for (int c = H * hd; c < (H + KVH) * hd; c++) qkv[n * width + c] = qkv[c];
        attention_forward(out.data(), lse.data(), qkv.data(), s.B, s.T, H, KVH, hd);
        for (int b = 0; b < s.B; b++)
            for (int pos = 0; pos < s.T; pos++)
                for (int h = 0; h < H; h++)
                    for (int i = 0; i < hd; i++) {
                        double mean = 0;
                        for (int u = 0; u <= pos; u++) mean += qkv[(b * s.T + u) * width + (H + KVH + h / (H / KVH)) * hd + i];
                        mean /= pos + 1;
                        CHECK(t, std::fabs(out[((b * s.T + pos) * H + h) * hd + i] - mean) < 1e-14,
                              "%s: equal keys: not the mean of the values", s.name().c_str());
                    }

        // Causal: changing the last token of a sequence changes no earlier output.
        Vec changed = random_vector(rng, s.N() * width), out2(out.size()), lse2(lse.size());
        for (int i = 0; i < s.N() * width; i++)
            if (i / width % s.T != s.T - 1) changed[i] = qkv[i];
        attention_forward(out2.data(), lse2.data(), changed.data(), s.B, s.T, H, KVH, hd);
        for (int i = 0; i < s.N() * H * hd; i++)
            if (i / (H * hd) % s.T != s.T - 1)
                CHECK(t, out2[i] == out[i], "%s: an output sees a later token", s.name().c_str());
    }
}

static void test_attention_backward(Test& t) {
    for (const auto& [H, KVH] : head_counts) {
        const AttentionShape s = {2, 5, H, KVH, 4};
        Rng rng(11 + H + KVH);
        Vec qkv = random_vector(rng, s.N() * s.width()), dout = random_vector(rng, s.N() * s.H * s.hd);
        Vec out(s.N() * s.H * s.hd), lse(s.N() * s.H), dqkv = nans(qkv.size());
        attention_forward(out.data(), lse.data(), qkv.data(), s.B, s.T, s.H, s.KVH, s.hd);
        attention_backward(dqkv.data(), dout.data(), out.data(), lse.data(), qkv.data(), s.B, s.T, s.H, s.KVH, s.hd);
        check_gradient(t, s.name(), &qkv, dqkv, [&] {
            attention_forward(out.data(), lse.data(), qkv.data(), s.B, s.T, s.H, s.KVH, s.hd);
            return dot(out, dout);
        });
    }
}

// ---------------------------------------------------------------------------
// ReLU^2, residual, soft-capped cross-entropy

static void test_relu2(Test& t) {
    const Vec x = {-2, -0.5, 0, 0.5, 3};
    Vec out = nans(5);
    relu2_forward(out.data(), x.data(), 5);
    CHECK(t, out == Vec({0, 0, 0, 0.25, 9}), "relu2 of [-2 -0.5 0 0.5 3] is [%g %g %g %g %g]", out[0], out[1],
          out[2], out[3], out[4]);

    Rng rng(13);
    const int n = 35;
    Vec inp = random_vector(rng, n), dout = random_vector(rng, n), dinp = nans(n);
    out.resize(n);
    relu2_backward(dinp.data(), dout.data(), inp.data(), n);
    check_gradient(t, "dinp", &inp, dinp, [&] {
        relu2_forward(out.data(), inp.data(), n);
        return dot(out, dout);
    });
}

static void test_residual(Test& t) {
    Vec x = {1, 2, 3};
    const Vec y = {0.5, -2, 4};
    residual_forward(x.data(), y.data(), 3);
    CHECK(t, x == Vec({1.5, 0, 7}), "got [%g %g %g]", x[0], x[1], x[2]);
}

static void test_softcap(Test& t) {
    for (double z : {1e-3, 0.5, 3.0, 20.0, 100.0, 200.0}) {
        CHECK(t, softcap(-z) == -softcap(z), "softcap is not odd at %g", z);
        CHECK(t, softcap(z) < 15 && softcap(z) < z, "softcap(%g) = %.17g", z, softcap(z));
        CHECK(t, softcap(z) < softcap(z * 1.01), "softcap is not increasing at %g", z);
    }
    // Far out, tanh rounds to 1 in floating point: the cap is reached, never passed.
    for (double z : {1e3, 1e30, 1e300}) CHECK(t, softcap(z) == 15 && softcap(-z) == -15, "softcap(%g)", z);
    // Near 0, 15 tanh(z/15) = z - z^3/675 + O(z^5).
    CHECK(t, std::fabs(softcap(1e-3) - (1e-3 - 1e-9 / 675)) < 1e-18, "softcap(1e-3) = %.17g", softcap(1e-3));
    CHECK(t, softcap(1e-3f) > 0 && softcap(100.0f) <= 15.0f, "float softcap");
}

static void test_cross_entropy_forward(Test& t) {
    Rng rng(14);
    const int N = 4, V = 7, Vp = 9;
    const int targets[N] = {0, 6, 3, 3};
    Vec logits = random_vector(rng, N * Vp, -30, 30), losses = nans(N), dlogits = nans(N * Vp);
    for (int n = 0; n < N; n++)
        for (int j = V; j < Vp; j++) logits[n * Vp + j] = 1e6;  // padding: would dominate if it counted
    softcap_cross_entropy(losses.data(), dlogits.data(), logits.data(), targets, N, V, Vp, 1.0);
    for (int n = 0; n < N; n++) {
        // p = exp(c_target) / sum_j exp(c_j), straight from the definition:
        // the cap keeps every exp in range, so no max needs subtracting.
        double sum = 0;
        for (int j = 0; j < V; j++) sum += std::exp(15 * std::tanh(logits[n * Vp + j] / 15));
        double p = std::exp(15 * std::tanh(logits[n * Vp + targets[n]] / 15)) / sum;
        CHECK(t, std::fabs(losses[n] + std::log(p)) < 1e-12, "row %d: loss %.15f, -log p %.15f", n, losses[n],
              -std::log(p));
        for (int j = V; j < Vp; j++) CHECK(t, dlogits[n * Vp + j] == 0, "row %d: padded gradient %g", n, dlogits[n * Vp + j]);
    }
}

static void test_cross_entropy_backward(Test& t) {
    Rng rng(15);
    const int N = 5, V = 7, Vp = 10;
    const int targets[N] = {2, 0, 6, 2, 4};
    const double dloss = 0.37;
    Vec logits = random_vector(rng, N * Vp, -25, 25), losses(N), dlogits = nans(N * Vp), scratch(N * Vp);
    softcap_cross_entropy(losses.data(), dlogits.data(), logits.data(), targets, N, V, Vp, dloss);
    // L = dloss * sum of the row losses; its gradient w.r.t. the padding is 0, as it must be.
    check_gradient(t, "dlogits", &logits, dlogits, [&] {
        softcap_cross_entropy(losses.data(), scratch.data(), logits.data(), targets, N, V, Vp, dloss);
        double sum = 0;
        for (double l : losses) sum += l;
        return dloss * sum;
    });
    for (int n = 0; n < N; n++)
        for (int j = V; j < Vp; j++) CHECK(t, dlogits[n * Vp + j] == 0, "padded gradient [%d][%d] is not 0", n, j);
}

// ---------------------------------------------------------------------------
// AdamW, global norm

static void test_adamw(Test& t) {
    // Element 0, step 1 from zero moments: m_hat = g, v_hat = g^2, so the
    // step is lr * (g / (|g| + eps) + wd * param). g = -2 * 0.5 = -1:
    // 0.5 - 0.01 * (-1 / (1 + 1e-8) + 0.1 * 0.5) = 0.5094999999000001.
    // Element 1, step 3 from m = 0.02, v = 0.001: g = 0.4 * 0.5 = 0.2,
    // m = 0.9 * 0.02 + 0.1 * 0.2 = 0.038, v = 0.95 * 0.001 + 0.05 * 0.04 = 0.00295,
    // m_hat = 0.038 / (1 - 0.9^3) = 0.14022140221402218,
    // v_hat = 0.00295 / (1 - 0.95^3) = 0.020683610867659942,
    // -0.3 - 0.002 * (m_hat / (sqrt(v_hat) + 1e-8) + 0.1 * -0.3) = -0.3018899841976811.
    double param0 = 0.5, m0 = 0, v0 = 0, grad0 = -2;
    adamw_update(&param0, &m0, &v0, &grad0, 1, 0.01, 0.9, 0.95, 1e-8, 0.1, 1, 0.5);
    CHECK(t, std::fabs(param0 - 0.5094999999000001) < 1e-15, "step 1: param %.17g", param0);
    CHECK(t, std::fabs(m0 - -0.1) < 1e-15 && std::fabs(v0 - 0.05) < 1e-15, "step 1: m %.17g v %.17g", m0, v0);

    Vec param = {-0.3, 1.0}, m = {0.02, 0.0}, v = {0.001, 0.0}, grad = {0.4, 0.0};
    adamw_update(param.data(), m.data(), v.data(), grad.data(), 2, 0.002, 0.9, 0.95, 1e-8, 0.1, 3, 0.5);
    CHECK(t, std::fabs(param[0] - -0.3018899841976811) < 1e-15, "step 3: param %.17g", param[0]);
    CHECK(t, std::fabs(m[0] - 0.038) < 1e-15 && std::fabs(v[0] - 0.00295) < 1e-15, "step 3: m %.17g v %.17g", m[0],
          v[0]);
    // Zero gradient and moments: only the weight decay moves it, 1 - 0.002 * 0.1.
    CHECK(t, std::fabs(param[1] - 0.9998) < 1e-15, "weight decay alone: %.17g", param[1]);
}

static void test_global_norm(Test& t) {
    const Vec g = {3, -4, 12};
    CHECK(t, global_norm(g.data(), 3) == 13, "|(3, -4, 12)| = %.17g", global_norm(g.data(), 3));
    CHECK(t, global_norm(g.data(), 0) == 0, "the empty norm");
}

// ---------------------------------------------------------------------------
// Muon

static const double NS_A = 3.4445, NS_B = -4.7750, NS_C = 2.0315;

static void test_newton_schulz(Test& t) {
    // On a "diagonal" 3 x 5 matrix the map acts on each diagonal value alone:
    // s <- a s + b s^3 + c s^5, five times.
    const double s0[3] = {0.9, 0.3, 0.001};
    Vec X(15, 0.0);
    for (int i = 0; i < 3; i++) X[i * 5 + i] = s0[i];
    newton_schulz(X.data(), 3, 5, 5, NS_A, NS_B, NS_C);
    for (int i = 0; i < 3; i++) {
        double s = s0[i];
        for (int k = 0; k < 5; k++) s = NS_A * s + NS_B * s * s * s + NS_C * s * s * s * s * s;
        CHECK(t, std::fabs(X[i * 5 + i] - s) < 1e-12, "diagonal %d: %.17g, the scalar map gives %.17g", i, X[i * 5 + i], s);
        if (s0[i] > 0.0015) CHECK(t, s > 0.68 && s < 1.21, "singular value %g went to %g", s0[i], s);
    }
    for (int i = 0; i < 15; i++)
        if (i % 6 != 0) CHECK(t, X[i] == 0, "off-diagonal %d: %g", i, X[i]);

    // The map commutes with a rotation of the rows: NS(Q X) = Q NS(X).
    Rng rng(7);
    Vec Y = random_vector(rng, 2 * 6), QY(12);
    double norm = std::sqrt(dot(Y, Y));
    for (double& y : Y) y /= norm;
    const double cs = std::cos(0.7), sn = std::sin(0.7);
    for (int j = 0; j < 6; j++) {
        QY[j] = cs * Y[j] - sn * Y[6 + j];
        QY[6 + j] = sn * Y[j] + cs * Y[6 + j];
    }
    newton_schulz(Y.data(), 2, 6, 5, NS_A, NS_B, NS_C);
    newton_schulz(QY.data(), 2, 6, 5, NS_A, NS_B, NS_C);
    for (int j = 0; j < 6; j++) {
        CHECK(t, std::fabs(QY[j] - (cs * Y[j] - sn * Y[6 + j])) < 1e-12, "rotated row 0, column %d", j);
        CHECK(t, std::fabs(QY[6 + j] - (sn * Y[j] + cs * Y[6 + j])) < 1e-12, "rotated row 1, column %d", j);
    }
}

static void test_muon_update(Test& t) {
    // No Newton-Schulz steps: W moves by -lr u / |u| with u Nesterov's
    // look-ahead, and m keeps the EMA.
    Rng rng(11);
    const int rows = 3, cols = 4;
    const double lr = 0.02, mu = 0.9, wd = 0.1, clip = 0.5;
    Vec w = random_vector(rng, 12), m = random_vector(rng, 12), g = random_vector(rng, 12);
    Vec w0 = w, m0 = m, u(12);
    muon_update(w.data(), m.data(), g.data(), rows, cols, lr, mu, wd, clip, 0, NS_A, NS_B, NS_C, 0.0);
    for (int i = 0; i < 12; i++) {
        const double mi = mu * m0[i] + (1 - mu) * g[i] * clip;
        CHECK(t, std::fabs(m[i] - mi) < 1e-15, "momentum %d: %.17g, expected %.17g", i, m[i], mi);
        u[i] = (1 - mu) * g[i] * clip + mu * mi;
    }
    const double un = std::sqrt(dot(u, u));
    for (int i = 0; i < 12; i++) {
        const double want = w0[i] * (1 - lr * wd) - lr * u[i] / un;
        CHECK(t, std::fabs(w[i] - want) < 1e-15, "weight %d: %.17g, expected %.17g", i, w[i], want);
    }

    // A tall matrix is orthogonalised as its wide transpose, and its step is
    // scaled by sqrt(rows / cols): update(G) = sqrt(6 / 2) update(G^T)^T.
    const int tall = 6, narrow = 2;
    Vec G = random_vector(rng, tall * narrow), GT(tall * narrow);
    for (int i = 0; i < tall; i++)
        for (int j = 0; j < narrow; j++) GT[j * tall + i] = G[i * narrow + j];
    Vec w_tall(12, 0.0), m_tall(12, 0.0), w_wide(12, 0.0), m_wide(12, 0.0);
    muon_update(w_tall.data(), m_tall.data(), G.data(), tall, narrow, lr, mu, 0.0, 1.0, 5, NS_A, NS_B, NS_C, 1e-7);
    muon_update(w_wide.data(), m_wide.data(), GT.data(), narrow, tall, lr, mu, 0.0, 1.0, 5, NS_A, NS_B, NS_C, 1e-7);
    for (int i = 0; i < tall; i++)
        for (int j = 0; j < narrow; j++) {
            const double a = w_tall[i * narrow + j], b = std::sqrt(3.0) * w_wide[j * tall + i];
            CHECK(t, std::fabs(a - b) < 1e-14, "tall [%d][%d]: %.17g, the wide transpose gives %.17g", i, j, a, b);
        }
}

// ---------------------------------------------------------------------------
// The whole dense model

static ModelConfig tiny_config(int n_kv_head) {
    ModelConfig c;
    c.preset = "reference";
    c.n_layer = 2;
    c.n_embd = 16;
    c.n_head = 2;  // head_dim 8
    c.n_kv_head = n_kv_head;
    c.vocab_size = 11;
    c.seq_len = 5;
    return c;
}

static std::vector<int> random_tokens(Rng& rng, int n, int V) {
    std::vector<int> tokens(n);
    for (int& x : tokens) x = (int)rng.below(V);
    return tokens;
}

// d(mean loss)/d(param) for ~40 parameters of every tensor vs central differences.
static void check_model_gradient(Test& t, int n_kv_head) {
    const int B = 2, T = 5;
    RefModel<double> model{tiny_config(n_kv_head)};
    const RefLayout layout(model.config);
    Rng rng(16 + n_kv_head);
    Vec params = random_vector(rng, layout.total, -0.3, 0.3);
    const std::vector<int> tokens = random_tokens(rng, B * T, model.config.vocab_size);
    const std::vector<int> targets = random_tokens(rng, B * T, model.config.vocab_size);

    RefModel<double>::Activations acts;
    model.forward(params, tokens.data(), targets.data(), B, T, &acts);
    Vec before = random_vector(rng, layout.total), grads = before;  // it accumulates
    model.backward(params, tokens.data(), targets.data(), B, T, acts, &grads);
    const Vec analytic = minus(grads, before);

    auto loss = [&] { return model.forward(params, tokens.data(), targets.data(), B, T, &acts); };
    size_t offset = 0;
    for (const ParamTensor& p : parameter_tensors(model.config)) {
        const size_t numel = (size_t)p.numel();
        std::vector<size_t> sample;
        for (int i = 0; i < 40; i++) sample.push_back(offset + rng.below(numel));
        const std::string what = string_format("n_kv_head %d: %s", n_kv_head, p.name.c_str());
        check_gradient(t, what, &params, analytic, loss, sample);
        double largest = 0;  // a vanished gradient would make the comparison empty
        for (size_t i = offset; i < offset + numel; i++) largest = std::max(largest, std::fabs(analytic[i]));
        CHECK(t, largest > 1e-4, "%s: largest gradient %.3g", what.c_str(), largest);
        offset += numel;
    }
}

static void test_model_gradient(Test& t) { check_model_gradient(t, 2); }
static void test_model_gradient_gqa(Test& t) { check_model_gradient(t, 1); }

// With lm_head = 0 every logit is 0, the prediction uniform: loss = log V.
static void test_model_loss_at_zero_head(Test& t) {
    const int B = 2, T = 5;
    RefModel<double> model{tiny_config(2)};
    const RefLayout layout(model.config);
    Rng rng(18);
    Vec params = random_vector(rng, layout.total);
    std::fill(params.begin() + layout.lm_head, params.end(), 0.0);
    const std::vector<int> tokens = random_tokens(rng, B * T, 11), targets = random_tokens(rng, B * T, 11);
    RefModel<double>::Activations acts;
    double loss = model.forward(params, tokens.data(), targets.data(), B, T, &acts);
    for (int n = 0; n < B * T; n++)
        CHECK(t, acts.losses[n] == std::log(11.0), "row %d: loss %.17g, log V %.17g", n, acts.losses[n], std::log(11.0));
    CHECK(t, std::fabs(loss - std::log(11.0)) < 1e-15, "mean loss %.17g, log V %.17g", loss, std::log(11.0));
}

int main() {
    return run_tests({
        {"reference_embedding", test_embedding},
        {"reference_rmsnorm_forward", test_rmsnorm_forward},
        {"reference_rmsnorm_backward", test_rmsnorm_backward},
        {"reference_matmul_forward", test_matmul_forward},
        {"reference_matmul_backward", test_matmul_backward},
        {"reference_rope_qknorm_forward", test_rope_qknorm_forward},
        {"reference_rope_qknorm_backward", test_rope_qknorm_backward},
        {"reference_attention_forward", test_attention_forward},
        {"reference_attention_backward", test_attention_backward},
        {"reference_relu2", test_relu2},
        {"reference_residual", test_residual},
        {"reference_softcap", test_softcap},
        {"reference_cross_entropy_forward", test_cross_entropy_forward},
        {"reference_cross_entropy_backward", test_cross_entropy_backward},
        {"reference_adamw", test_adamw},
        {"reference_global_norm", test_global_norm},
        {"reference_newton_schulz", test_newton_schulz},
        {"reference_muon_update", test_muon_update},
        {"reference_model_gradient", test_model_gradient},
        {"reference_model_gradient_gqa", test_model_gradient_gqa},
        {"reference_model_loss_at_zero_head", test_model_loss_at_zero_head},
    });
}
