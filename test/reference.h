// test/reference.h: the plain C++ CPU reference of every op of the dense
// model, forward and backward, and of the whole dense model.
//
// This is the ground truth. Each function states one op's math as simply as
// it can be written (plain loops, no tricks, no speed), with exactly the
// signature the CUDA kernels implement, so the GPU parity tests can run the
// same inputs through both and compare. Everything is templated on the number
// type: F = double for the finite-difference checks of test_reference.cpp
// (which make this file trustworthy), F = float for GPU parity.
//
// Conventions (see SPEC "The model"): N = B*T token rows, row-major (N, width);
// token n is at position t = n % T of sequence b = n / T. Weights are stored
// (out, in), a linear layer is out = inp @ W^T. No biases, RMSNorm without
// weight, eps = 1e-6. qkv rows hold H query heads, then KVH key heads, then KVH
// value heads, hd wide each; query head h reads kv head h / (H / KVH).
// Backward functions accumulate (+=) into weight gradients; for activation
// gradients each function says whether it accumulates or overwrites.
#pragma once

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "../model_config.h"

template <typename F> constexpr F rms_eps() { return F(1e-6); }
template <typename F> constexpr F softcap_limit() { return F(15); }

// ---------------------------------------------------------------------------
// The ops

// out[n] = wte[tokens[n]]
template <typename F>
void embedding_forward(F* out, const int* tokens, const F* wte, int N, int C) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) out[n * C + c] = wte[tokens[n] * C + c];
}

// dwte[tokens[n]] += dout[n]
template <typename F>
void embedding_backward(F* dwte, const int* tokens, const F* dout, int N, int C) {
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) dwte[tokens[n] * C + c] += dout[n * C + c];
}

// out = x * rstd, rstd = 1 / sqrt(mean_c(x^2) + eps), per row. out may alias inp.
template <typename F>
void rmsnorm_forward(F* out, F* rstd, const F* inp, int N, int C) {
    for (int n = 0; n < N; n++) {
        const F* x = inp + n * C;
        F sum_sq = 0;
        for (int c = 0; c < C; c++) sum_sq += x[c] * x[c];
        F r = 1 / std::sqrt(sum_sq / C + rms_eps<F>());
        for (int c = 0; c < C; c++) out[n * C + c] = x[c] * r;
        rstd[n] = r;
    }
}

// dinp += rstd * (dout - out * mean_c(dout * out))   (accumulates into dinp)
template <typename F>
void rmsnorm_backward(F* dinp, const F* dout, const F* out, const F* rstd, int N, int C) {
    for (int n = 0; n < N; n++) {
        const F* dy = dout + n * C;
        const F* y = out + n * C;
        F dot = 0;
        for (int c = 0; c < C; c++) dot += dy[c] * y[c];
        F mean_dot = dot / C;
        for (int c = 0; c < C; c++) dinp[n * C + c] += rstd[n] * (dy[c] - y[c] * mean_dot);
    }
}

// out = inp @ w^T: out[n][o] = sum_i inp[n][i] * w[o][i]
template <typename F>
void matmul_forward(F* out, const F* inp, const F* w, int N, int IC, int OC) {
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            F sum = 0;
            for (int i = 0; i < IC; i++) sum += inp[n * IC + i] * w[o * IC + i];
            out[n * OC + o] = sum;
        }
}

// dinp = dout @ w (overwrites dinp), dw += dout^T @ inp
template <typename F>
void matmul_backward(F* dinp, F* dw, const F* dout, const F* inp, const F* w, int N, int IC, int OC) {
    for (int n = 0; n < N; n++)
        for (int i = 0; i < IC; i++) {
            F sum = 0;
            for (int o = 0; o < OC; o++) sum += dout[n * OC + o] * w[o * IC + i];
            dinp[n * IC + i] = sum;
        }
    for (int o = 0; o < OC; o++)
        for (int i = 0; i < IC; i++) {
            F sum = 0;
            for (int n = 0; n < N; n++) sum += dout[n * OC + o] * inp[n * IC + i];
            dw[o * IC + i] += sum;
        }
}

// The RoPE angle of pair i (of hd/2) at position t: t * 10000^(-2i/hd).
template <typename F>
F rope_angle(int t, int i, int hd) {
    return F(t) * std::pow(F(10000), -F(2 * i) / F(hd));
}

// In place on the q and k heads of qkv (v untouched): rotate-half RoPE,
// (x_i, x_{i+hd/2}) -> (x_i cos - x_{i+hd/2} sin, x_{i+hd/2} cos + x_i sin),
// then RMSNorm of each head over its hd values; rstd is (N, H + KVH).
template <typename F>
void rope_qknorm_forward(F* qkv, F* rstd, int B, int T, int H, int KVH, int hd) {
    const int width = (H + 2 * KVH) * hd, half = hd / 2;
    for (int n = 0; n < B * T; n++) {
        F* heads = qkv + n * width;  // the H q heads then the KVH k heads, back to back
        for (int j = 0; j < H + KVH; j++) {
            F* x = heads + j * hd;
            for (int i = 0; i < half; i++) {
                F angle = rope_angle<F>(n % T, i, hd), cos = std::cos(angle), sin = std::sin(angle);
                F a = x[i], b = x[i + half];
                x[i] = a * cos - b * sin;
                x[i + half] = b * cos + a * sin;
            }
        }
        rmsnorm_forward(heads, rstd + n * (H + KVH), heads, H + KVH, hd);
    }
}

// In place: dqkv holds grads w.r.t. the output of rope_qknorm_forward on
// entry and w.r.t. its input on exit; qkv is the forward output. The RMSNorm
// backward, then the inverse (transposed) rotation; the v part is untouched.
template <typename F>
void rope_qknorm_backward(F* dqkv, const F* qkv, const F* rstd, int B, int T, int H, int KVH, int hd) {
    const int width = (H + 2 * KVH) * hd, half = hd / 2;
    std::vector<F> drotated((H + KVH) * hd);
    for (int n = 0; n < B * T; n++) {
        F* dheads = dqkv + n * width;
        std::fill(drotated.begin(), drotated.end(), F(0));
        rmsnorm_backward(drotated.data(), dheads, qkv + n * width, rstd + n * (H + KVH), H + KVH, hd);
        for (int j = 0; j < H + KVH; j++) {
            const F* dy = drotated.data() + j * hd;
            F* dx = dheads + j * hd;
            for (int i = 0; i < half; i++) {
                F angle = rope_angle<F>(n % T, i, hd), cos = std::cos(angle), sin = std::sin(angle);
                dx[i] = dy[i] * cos + dy[i + half] * sin;
                dx[i + half] = dy[i + half] * cos - dy[i] * sin;
            }
        }
    }
}

// Where head h's q, and the k and v it reads, start in token n's qkv row.
inline int q_column(int h, int hd) { return h * hd; }
inline int k_column(int h, int H, int KVH, int hd) { return (H + h / (H / KVH)) * hd; }
inline int v_column(int h, int H, int KVH, int hd) { return (H + KVH + h / (H / KVH)) * hd; }

// out[t] = sum_{u<=t} softmax_u(q_t . k_u / sqrt(hd)) v_u per sequence and
// head; lse[t] = log sum_{u<=t} exp(q_t . k_u / sqrt(hd)). out (N, H*hd), lse (N, H).
template <typename F>
void attention_forward(F* out, F* lse, const F* qkv, int B, int T, int H, int KVH, int hd) {
    const int width = (H + 2 * KVH) * hd;
    const F scale = 1 / std::sqrt(F(hd));
    std::vector<F> scores(T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const F* q = qkv + (b * T + t) * width + q_column(h, hd);
                F max = -INFINITY;
                for (int u = 0; u <= t; u++) {
                    const F* k = qkv + (b * T + u) * width + k_column(h, H, KVH, hd);
                    F dot = 0;
                    for (int i = 0; i < hd; i++) dot += q[i] * k[i];
                    scores[u] = dot * scale;
                    max = std::max(max, scores[u]);
                }
                F sum = 0;
                for (int u = 0; u <= t; u++) sum += std::exp(scores[u] - max);
                F log_sum = max + std::log(sum);
                F* o = out + (b * T + t) * H * hd + h * hd;
                for (int i = 0; i < hd; i++) o[i] = 0;
                for (int u = 0; u <= t; u++) {
                    const F* v = qkv + (b * T + u) * width + v_column(h, H, KVH, hd);
                    F p = std::exp(scores[u] - log_sum);
                    for (int i = 0; i < hd; i++) o[i] += p * v[i];
                }
                lse[(b * T + t) * H + h] = log_sum;
            }
}

// Overwrites all of dqkv. With p_tu = exp(s_tu - lse_t) and D_t = dout_t . out_t:
// dv_u += p_tu dout_t, ds_tu = p_tu (dout_t . v_u - D_t), dq_t += ds_tu k_u / sqrt(hd),
// dk_u += ds_tu q_t / sqrt(hd); k and v grads summed over the q heads sharing them.
template <typename F>
void attention_backward(F* dqkv, const F* dout, const F* out, const F* lse, const F* qkv, int B, int T, int H,
                        int KVH, int hd) {
    const int width = (H + 2 * KVH) * hd;
    const F scale = 1 / std::sqrt(F(hd));
    for (int i = 0; i < B * T * width; i++) dqkv[i] = 0;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const int row = b * T + t;
                const F* q = qkv + row * width + q_column(h, hd);
                F* dq = dqkv + row * width + q_column(h, hd);
                const F* dy = dout + row * H * hd + h * hd;
                const F* y = out + row * H * hd + h * hd;
                F dy_dot_y = 0;
                for (int i = 0; i < hd; i++) dy_dot_y += dy[i] * y[i];
                for (int u = 0; u <= t; u++) {
                    const F* k = qkv + (b * T + u) * width + k_column(h, H, KVH, hd);
                    const F* v = qkv + (b * T + u) * width + v_column(h, H, KVH, hd);
                    F* dk = dqkv + (b * T + u) * width + k_column(h, H, KVH, hd);
                    F* dv = dqkv + (b * T + u) * width + v_column(h, H, KVH, hd);
                    F q_dot_k = 0, dy_dot_v = 0;
                    for (int i = 0; i < hd; i++) {
                        q_dot_k += q[i] * k[i];
                        dy_dot_v += dy[i] * v[i];
                    }
                    F p = std::exp(q_dot_k * scale - lse[row * H + h]);
                    F dscore = p * (dy_dot_v - dy_dot_y);
                    for (int i = 0; i < hd; i++) {
                        dv[i] += p * dy[i];
                        dq[i] += dscore * scale * k[i];
                        dk[i] += dscore * scale * q[i];
                    }
                }
            }
}

// out = relu(inp)^2
template <typename F>
void relu2_forward(F* out, const F* inp, int n) {
    for (int i = 0; i < n; i++) {
        F r = inp[i] > 0 ? inp[i] : F(0);
        out[i] = r * r;
    }
}

// dinp = dout * 2 * relu(inp)   (overwrites dinp)
template <typename F>
void relu2_backward(F* dinp, const F* dout, const F* inp, int n) {
    for (int i = 0; i < n; i++) dinp[i] = dout[i] * 2 * (inp[i] > 0 ? inp[i] : F(0));
}

// x += y
template <typename F>
void residual_forward(F* x, const F* y, int n) {
    for (int i = 0; i < n; i++) x[i] += y[i];
}

// c = 15 tanh(z / 15): logits squashed smoothly into (-15, 15)
template <typename F>
F softcap(F z) {
    return softcap_limit<F>() * std::tanh(z / softcap_limit<F>());
}

// The greedy prediction of a row: argmax_{j<V} softcap(logits[j]), the first
// index on ties; 0 when no value compares (a row of NaNs).
template <typename F>
int softcap_argmax(const F* logits, int V) {
    int best = -1;
    F best_c = 0;
    for (int j = 0; j < V; j++) {
        const F c = softcap(logits[j]);
        if (best < 0 ? c == c : c > best_c) {
            best = j;
            best_c = c;
        }
    }
    return best < 0 ? 0 : best;
}

// losses[n] = logsumexp_{j<V}(c_j) - c_target with c = softcap(logits[n]);
// dlogits[n][j] = dloss * (softmax(c)_j - [j == target]) * (1 - tanh(z_j/15)^2)
// for j < V, 0 for the padding V <= j < Vp (overwrites dlogits).
template <typename F>
void softcap_cross_entropy(F* losses, F* dlogits, const F* logits, const int* targets, int N, int V, int Vp,
                           F dloss) {
    for (int n = 0; n < N; n++) {
        const F* z = logits + n * Vp;
        F max = -INFINITY;
        for (int j = 0; j < V; j++) max = std::max(max, softcap(z[j]));
        F sum = 0;
        for (int j = 0; j < V; j++) sum += std::exp(softcap(z[j]) - max);
        F log_sum = max + std::log(sum);
        losses[n] = log_sum - softcap(z[targets[n]]);
        for (int j = 0; j < Vp; j++) {
            F* d = dlogits + n * Vp + j;
            if (j >= V) {
                *d = 0;
                continue;
            }
            F p = std::exp(softcap(z[j]) - log_sum), tanh = std::tanh(z[j] / softcap_limit<F>());
            *d = dloss * (p - (j == targets[n] ? F(1) : F(0))) * (1 - tanh * tanh);
        }
    }
}

// g = grad * grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// param -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * param), with the
// bias-corrected m_hat = m / (1 - b1^step), v_hat = v / (1 - b2^step); step is 1-based.
template <typename F>
void adamw_update(F* param, F* m, F* v, const F* grad, size_t n, F lr, F beta1, F beta2, F eps, F weight_decay,
                  int step, F grad_scale) {
    const F m_correction = 1 - std::pow(beta1, F(step)), v_correction = 1 - std::pow(beta2, F(step));
    for (size_t i = 0; i < n; i++) {
        F g = grad[i] * grad_scale;
        m[i] = beta1 * m[i] + (1 - beta1) * g;
        v[i] = beta2 * v[i] + (1 - beta2) * g * g;
        F m_hat = m[i] / m_correction, v_hat = v[i] / v_correction;
        param[i] -= lr * (m_hat / (std::sqrt(v_hat) + eps) + weight_decay * param[i]);
    }
}

// Muon's Newton-Schulz map, in place on X (r x c, r <= c, row-major), which
// has been scaled to Frobenius norm 1: `steps` times
//   A = X X^T;  X = a X + (b A + c A A) X.
template <typename F>
void newton_schulz(F* X, int r, int c, int steps, F a, F b, F cc) {
    std::vector<F> A((size_t)r * r), P((size_t)r * r), Y((size_t)r * c);
    for (int s = 0; s < steps; s++) {
        for (int i = 0; i < r; i++)
            for (int j = 0; j < r; j++) {
                F sum = 0;
                for (int k = 0; k < c; k++) sum += X[(size_t)i * c + k] * X[(size_t)j * c + k];
                A[(size_t)i * r + j] = sum;
            }
        for (int i = 0; i < r; i++)
            for (int j = 0; j < r; j++) {
                F sum = 0;
                for (int k = 0; k < r; k++) sum += A[(size_t)i * r + k] * A[(size_t)k * r + j];
                P[(size_t)i * r + j] = b * A[(size_t)i * r + j] + cc * sum;
            }
        for (int i = 0; i < r; i++)
            for (int j = 0; j < c; j++) {
                F sum = 0;
                for (int k = 0; k < r; k++) sum += P[(size_t)i * r + k] * X[(size_t)k * c + j];
                Y[(size_t)i * c + j] = a * X[(size_t)i * c + j] + sum;
            }
        std::copy(Y.begin(), Y.end(), X);
    }
}

// One Muon step of a weight matrix W (rows x cols, row-major) from its
// gradient g, with momentum buffer m (SPEC: Training):
//   g' = g * grad_scale (the clip factor)
//   m = mu m + (1 - mu) g';  u = (1 - mu) g' + mu m     (Nesterov)
//   X = u / (||u||_F + eps), transposed when rows > cols (the wide orientation)
//   X = newton_schulz(X), transposed back
//   W = W (1 - lr wd) - lr sqrt(max(1, rows / cols)) X
template <typename F>
void muon_update(F* w, F* m, const F* grad, int rows, int cols, F lr, F mu, F weight_decay, F grad_scale, int steps,
                 F a, F b, F c, F eps) {
    const bool tall = rows > cols;
    const int r = tall ? cols : rows, wide = tall ? rows : cols;
    std::vector<F> X((size_t)rows * cols);
    F norm = 0;
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            const size_t at = (size_t)i * cols + j;
            const F g = grad[at] * grad_scale;
            m[at] = mu * m[at] + (1 - mu) * g;
            const F u = (1 - mu) * g + mu * m[at];
            X[tall ? (size_t)j * rows + i : at] = u;
            norm += u * u;
        }
    norm = std::sqrt(norm);
    for (F& x : X) x /= norm + eps;
    newton_schulz(X.data(), r, wide, steps, a, b, c);
    const F scale = std::sqrt(std::max(F(1), F(rows) / F(cols)));
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < cols; j++) {
            const size_t at = (size_t)i * cols + j;
            w[at] = w[at] * (1 - lr * weight_decay) - lr * scale * X[tall ? (size_t)j * rows + i : at];
        }
}

// sqrt(sum g^2)
template <typename F>
F global_norm(const F* grad, size_t n) {
    F sum_sq = 0;
    for (size_t i = 0; i < n; i++) sum_sq += grad[i] * grad[i];
    return std::sqrt(sum_sq);
}

// ---------------------------------------------------------------------------
// The whole dense model (n_experts == 0):
//   x = rmsnorm(wte[tokens])
//   per layer: x += attention(rope_qknorm(rmsnorm(x) @ [wq;wk;wv]^T)) @ wo^T
//              x += relu2(rmsnorm(x) @ fc^T) @ proj^T
//   logits = rmsnorm(x) @ lm_head^T (V columns: the reference has no padding)
//   loss = mean over the N rows of softcap_cross_entropy

// Where each weight starts in the flat parameter vector (parameter_tensors
// order, contiguous). wq, wk, wv are consecutive, so together they are the one
// (C + 2 kv_dim, C) matrix that makes qkv in a single matmul.
struct RefLayout {
    struct Layer { size_t wqkv, wo, fc, proj; };
    size_t wte = 0, lm_head = 0, total = 0;
    std::vector<Layer> layers;

    explicit RefLayout(const ModelConfig& config) {
        if (config.n_experts != 0) fail("the reference model is dense only (n_experts = %d)", config.n_experts);
        std::map<std::string, size_t> offset;
        for (const ParamTensor& p : parameter_tensors(config)) {
            offset[p.name] = total;
            total += (size_t)p.numel();
        }
        const size_t C = config.n_embd;
        wte = offset["wte"];
        lm_head = offset["lm_head"];
        for (int l = 0; l < config.n_layer; l++) {
            std::string L = "h" + std::to_string(l) + ".";
            layers.push_back({offset[L + "attn.wq"], offset[L + "attn.wo"], offset[L + "mlp.fc"], offset[L + "mlp.proj"]});
            if (offset[L + "attn.wk"] != offset[L + "attn.wq"] + C * C ||
                offset[L + "attn.wv"] != offset[L + "attn.wk"] + (size_t)config.n_kv_head * config.head_dim() * C)
                fail("wq, wk, wv of layer %d are not consecutive", l);
        }
    }
};

template <typename F>
struct RefModel {
    ModelConfig config;  // vocab_size set, n_experts == 0

    // What the forward pass keeps for the backward pass.
    struct Activations {
        struct Layer {
            std::vector<F> h, h_rstd;      // rmsnorm(x) before attention
            std::vector<F> qkv, qk_rstd;   // qkv after RoPE and QK-norm
            std::vector<F> att, lse;       // attention output, per-row log-sum-exp
            std::vector<F> h2, h2_rstd;    // rmsnorm(x) before the MLP
            std::vector<F> fc, act;        // MLP pre-activation and relu2 of it
        };
        std::vector<F> x0, x0_rstd;        // rmsnorm of the embeddings: the residual stream's start
        std::vector<Layer> layers;
        std::vector<F> hf, hf_rstd;        // the final rmsnorm
        std::vector<F> logits, losses;
        std::vector<F> dlogits;            // d(mean loss)/d(logits), made by the fused loss
    };

    // The mean loss over the N = B*T rows.
    F forward(const std::vector<F>& params, const int* tokens, const int* targets, int B, int T,
              Activations* a) const {
        const RefLayout layout(config);
        if (params.size() != layout.total) fail("%zu parameters, expected %zu", params.size(), layout.total);
        const int N = B * T, C = config.n_embd, H = config.n_head, KVH = config.n_kv_head, hd = config.head_dim();
        const int QKV = C + 2 * KVH * hd, V = config.vocab_size;
        const F* w = params.data();

        std::vector<F> embedded(N * C);
        embedding_forward(embedded.data(), tokens, w + layout.wte, N, C);
        a->x0.resize(N * C);
        a->x0_rstd.resize(N);
        rmsnorm_forward(a->x0.data(), a->x0_rstd.data(), embedded.data(), N, C);

        std::vector<F> x = a->x0, branch(N * C);  // the residual stream, and what a block adds to it
        a->layers.resize(config.n_layer);
        for (int l = 0; l < config.n_layer; l++) {
            const RefLayout::Layer& lw = layout.layers[l];
            typename Activations::Layer& la = a->layers[l];
            la.h.resize(N * C); la.h_rstd.resize(N);
            la.qkv.resize(N * QKV); la.qk_rstd.resize(N * (H + KVH));
            la.att.resize(N * C); la.lse.resize(N * H);
            la.h2.resize(N * C); la.h2_rstd.resize(N);
            la.fc.resize(N * 4 * C); la.act.resize(N * 4 * C);

            rmsnorm_forward(la.h.data(), la.h_rstd.data(), x.data(), N, C);
            matmul_forward(la.qkv.data(), la.h.data(), w + lw.wqkv, N, C, QKV);
            rope_qknorm_forward(la.qkv.data(), la.qk_rstd.data(), B, T, H, KVH, hd);
            attention_forward(la.att.data(), la.lse.data(), la.qkv.data(), B, T, H, KVH, hd);
            matmul_forward(branch.data(), la.att.data(), w + lw.wo, N, C, C);
            residual_forward(x.data(), branch.data(), N * C);

            rmsnorm_forward(la.h2.data(), la.h2_rstd.data(), x.data(), N, C);
            matmul_forward(la.fc.data(), la.h2.data(), w + lw.fc, N, C, 4 * C);
            relu2_forward(la.act.data(), la.fc.data(), N * 4 * C);
            matmul_forward(branch.data(), la.act.data(), w + lw.proj, N, 4 * C, C);
            residual_forward(x.data(), branch.data(), N * C);
        }

        a->hf.resize(N * C); a->hf_rstd.resize(N);
        a->logits.resize(N * V); a->losses.resize(N); a->dlogits.resize(N * V);
        rmsnorm_forward(a->hf.data(), a->hf_rstd.data(), x.data(), N, C);
        matmul_forward(a->logits.data(), a->hf.data(), w + layout.lm_head, N, C, V);
        softcap_cross_entropy(a->losses.data(), a->dlogits.data(), a->logits.data(), targets, N, V, V, F(1) / N);
        F sum = 0;
        for (int n = 0; n < N; n++) sum += a->losses[n];
        return sum / N;
    }

    // grads += d(mean loss)/d(params), the forward pass run backwards.
    // The targets are already folded into a.dlogits by the fused loss.
    void backward(const std::vector<F>& params, const int* tokens, const int* /*targets*/, int B, int T,
                  const Activations& a, std::vector<F>* grads) const {
        const RefLayout layout(config);
        if (grads->size() != layout.total) fail("%zu gradients, expected %zu", grads->size(), layout.total);
        const int N = B * T, C = config.n_embd, H = config.n_head, KVH = config.n_kv_head, hd = config.head_dim();
        const int QKV = C + 2 * KVH * hd, V = config.vocab_size;
        const F* w = params.data();
        F* g = grads->data();

        std::vector<F> dx(N * C, F(0)), dh(N * C), dqkv(N * QKV), datt(N * C), dfc(N * 4 * C), dact(N * 4 * C);
        matmul_backward(dh.data(), g + layout.lm_head, a.dlogits.data(), a.hf.data(), w + layout.lm_head, N, C, V);
        rmsnorm_backward(dx.data(), dh.data(), a.hf.data(), a.hf_rstd.data(), N, C);

        // dx is the residual stream's gradient: each block's branch gets it
        // whole, and its norm's backward adds the branch's share back in.
        for (int l = config.n_layer - 1; l >= 0; l--) {
            const RefLayout::Layer& lw = layout.layers[l];
            const typename Activations::Layer& la = a.layers[l];

            matmul_backward(dact.data(), g + lw.proj, dx.data(), la.act.data(), w + lw.proj, N, 4 * C, C);
            relu2_backward(dfc.data(), dact.data(), la.fc.data(), N * 4 * C);
            matmul_backward(dh.data(), g + lw.fc, dfc.data(), la.h2.data(), w + lw.fc, N, C, 4 * C);
            rmsnorm_backward(dx.data(), dh.data(), la.h2.data(), la.h2_rstd.data(), N, C);

            matmul_backward(datt.data(), g + lw.wo, dx.data(), la.att.data(), w + lw.wo, N, C, C);
            attention_backward(dqkv.data(), datt.data(), la.att.data(), la.lse.data(), la.qkv.data(), B, T, H, KVH, hd);
            rope_qknorm_backward(dqkv.data(), la.qkv.data(), la.qk_rstd.data(), B, T, H, KVH, hd);
            matmul_backward(dh.data(), g + lw.wqkv, dqkv.data(), la.h.data(), w + lw.wqkv, N, C, QKV);
            rmsnorm_backward(dx.data(), dh.data(), la.h.data(), la.h_rstd.data(), N, C);
        }

        std::vector<F> dembedded(N * C, F(0));
        rmsnorm_backward(dembedded.data(), dx.data(), a.x0.data(), a.x0_rstd.data(), N, C);
        embedding_backward(g + layout.wte, tokens, dembedded.data(), N, C);
    }
};
