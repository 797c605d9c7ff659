#!/usr/bin/env python3
"""dev/roofline.py: what one training step of train_et should cost on an H200, phase by phase.

SPEC "Performance" sets MFU targets (issue 10: d12 dense >= 45%, d12 with 16
ET experts >= 40%, routing + dispatch + combine <= 5% of the step) for a
step that has never been timed. This is the prediction to hold the kernels
against: for each phase of one optimizer step (embedding, the attention
matmuls, the attention core forward and backward, norms and RoPE,
elementwise ops, the dense FFN, the MoE router and selection, dispatch,
expert FFNs, combine and shared expert, lm_head, cross-entropy, the
optimizer) it counts the FLOPs the kernels execute and the bytes they move,
kernel by kernel as model.cuh, router.cuh and optimizer.cuh run them, and
takes each kernel's lower-bound time max(FLOPs / (peak x efficiency),
bytes / (bandwidth x efficiency)). The efficiencies are options, printed
with the result. Their sum is the predicted step; MFU divides the model
FLOPs (model_config.h's training_flops_per_token: 6 x active matmul weights
+ causal attention, so not the recomputations or the padding) by it.

With --bench FILE (the output of build/bench_step, dev/bench_step.cu) the
measured times stand next to the predicted ones, phase by bench phase.

Counting rules (bf16 build): activations and weights 2 bytes, master
weights, gradients, moments and the router's logits 4; every kernel reads
its inputs and writes its outputs once from HBM (caches ignored, so a
kernel that re-reads from L2 is not charged for it; a kernel that can only
re-read from HBM is under-charged); the routed experts see the nominal N x K
(token, expert) pairs (ET's real count varies around it); elementwise
arithmetic counts no FLOPs (it is not what the tensor-core peak measures);
launch gaps are not counted (bench_step's "in no phase" row shows them).

  python3 dev/roofline.py -m d12 -e 0                  d12 dense
  python3 dev/roofline.py -m d12 -e 16 -r et           d12, 16 ET experts
  python3 dev/roofline.py --preset d20-et              a row of the paper's tables (presets.h)
  python3 dev/roofline.py -m d12 -e 0 --bench bench_dense.txt
"""
import argparse
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_BF16 = 989e12   # dense bf16 tensor-core FLOP/s of an H100/H200 SXM: the MFU denominator (model.cuh)
PEAK_FP32 = 67e12    # plain fp32 (CUDA cores): the router's logits and its backward's cublasSgemm run there
SELECT_TILES = 256   # router.cuh: the tiles a selection cuts its pools into
BANDWIDTH = 4.8e12   # HBM3e bytes/s of an H200
SYNTHETIC_VOCAB = 50257  # train_et's -sv default and bench_step's VOCAB (GPT-2's)
BF16, FP32 = 2, 4

# (option, default, help) of the efficiencies: the fraction of a ceiling a kind of kernel reaches.
EFFICIENCIES = [
    ("gemm_eff", 0.75, "cuBLAS bf16 matmuls (and Muon's Newton-Schulz) as a fraction of the 989 TFLOP/s peak "
                       "(an 8192^3 product measured 0.78-0.81 on the H200s here)"),
    ("attn_eff", 0.50, "flash attention forward and backward on tensor cores (mma.sync, FlashAttention-2 style), "
                       "fraction of the bf16 peak"),
    ("expert_eff", 0.60, "the grouped expert matmuls (wmma/mma.sync with cp.async), fraction of the bf16 peak"),
    ("fp32_eff", 0.70, "the router's fp32 products, fraction of the 67 TFLOP/s fp32 peak"),
    ("mem_eff", 0.80, "every kernel's HBM traffic, fraction of 4.8 TB/s (a device copy measured 0.90 here)"),
]
PEAK_OF = {"gemm": ("gemm_eff", PEAK_BF16), "attn": ("attn_eff", PEAK_BF16), "expert": ("expert_eff", PEAK_BF16),
           "fp32": ("fp32_eff", PEAK_FP32), "mem": ("gemm_eff", PEAK_BF16)}

# The phases in the order of the table, and the bench_step row each belongs to
# (bench_step times the cuBLAS matmuls together, forward and backward).
PHASES = [
    ("embedding", "embedding (fwd + sort + bwd)"),
    ("attention matmuls (qkv, wo)", "matmul (cuBLAS, + lm_head)"),
    ("attention core forward", "attention forward"),
    ("attention core backward", "attention backward"),
    ("rmsnorm + rope/qk-norm", "norms (rmsnorm, rope_qknorm; fwd+bwd)"),
    ("elementwise (residual, relu2, copies)", "elementwise (relu2, residual, copies)"),
    ("dense FFN matmuls", "matmul (cuBLAS, + lm_head)"),
    ("moe router + selection", "moe router + selection (fwd + bwd)"),
    ("moe dispatch", "moe dispatch"),
    ("moe expert FFNs forward", "moe experts forward (grouped)"),
    ("moe expert FFNs backward (+ gates)", "moe experts backward (grouped, + gates)"),
    ("moe combine", "moe combine (fwd + bwd)"),
    ("moe shared expert matmuls", "matmul (cuBLAS, + lm_head)"),
    ("lm_head matmul", "matmul (cuBLAS, + lm_head)"),
    ("cross-entropy (softcap)", "loss (softcap CE + sum)"),
    ("zero grads", "zero grads"),
    ("optimizer", "optimizer"),
]
PER_STEP = {"zero grads", "optimizer"}  # once per optimizer step; the rest once per micro-step
ROUTING = {"moe router + selection", "moe dispatch", "moe combine"}


class Config:
    """The model and run a prediction is for (train_et's flags and defaults)."""

    def __init__(self, model="d12", experts=16, router="et", top_k=1, batch=16, seq_len=2048, total_batch=524288,
                 optimizer="adamw", vocab=SYNTHETIC_VOCAB, kv_heads=None, pool="micro"):
        m = re.fullmatch(r"d(\d+)", model)
        if model == "tiny":
            self.L, self.C, self.H = 2, 64, 2
        elif m and 2 <= int(m.group(1)) <= 64 and int(m.group(1)) % 2 == 0:
            n = int(m.group(1))
            self.L, self.C, self.H = n, 64 * n, n // 2
        else:
            raise ValueError(f"-m: unknown model '{model}': use tiny, or dN with N even in 2..64")
        self.KVH = kv_heads or self.H
        if self.H % self.KVH:
            raise ValueError(f"-kv: {self.KVH} key/value heads do not divide the {self.H} heads of {model}")
        if experts and top_k > experts:
            raise ValueError(f"-k: {top_k} experts per token is more than the {experts} routed experts")
        if total_batch % (batch * seq_len):
            raise ValueError(f"-d: {total_batch} tokens per step is not a multiple of -b x -t = {batch * seq_len}")
        self.model, self.E, self.router, self.K = model, experts, router, top_k
        self.B, self.T, self.D, self.opt, self.V, self.pool = batch, seq_len, total_batch, optimizer, vocab, pool
        self.hd = self.C // self.H
        self.Vp = (vocab + 127) // 128 * 128
        self.N = batch * seq_len
        self.micro_steps = total_batch // self.N

    def name(self):
        moe = f"{self.E} {self.router.upper()} experts, K = {self.K}" if self.E else "dense"
        return f"{self.model} {moe}"

    def is_moe_layer(self, l):
        return self.E > 0 and l > 0

    def tensors(self):
        """(name, rows, cols, active fraction, is matmul), model_config.h's parameter_tensors."""
        C, kv = self.C, self.KVH * self.hd
        p = [("wte", self.V, C, 1.0, False)]
        for l in range(self.L):
            p += [(f"h{l}.attn.wq", C, C, 1.0, True), (f"h{l}.attn.wk", kv, C, 1.0, True),
                  (f"h{l}.attn.wv", kv, C, 1.0, True), (f"h{l}.attn.wo", C, C, 1.0, True)]
            if not self.is_moe_layer(l):
                p += [(f"h{l}.mlp.fc", 4 * C, C, 1.0, True), (f"h{l}.mlp.proj", C, 4 * C, 1.0, True)]
                continue
            used = self.K / self.E
            p += [(f"h{l}.moe.router", self.E, C, 1.0, True), (f"h{l}.moe.shared.fc", 2 * C, C, 1.0, True),
                  (f"h{l}.moe.shared.proj", C, 2 * C, 1.0, True),
                  (f"h{l}.moe.experts.fc", self.E * 2 * C, C, used, True),
                  (f"h{l}.moe.experts.proj", self.E * C, 2 * C, used, True)]
        p.append(("lm_head", self.V, C, 1.0, True))  # the real rows: the padding is never trained
        return p

    def stored_params(self):
        """Parameters in device memory (lm_head padded): what the optimizer and zeroing walk."""
        return sum(r * c for _, r, c, _, _ in self.tensors()) + (self.Vp - self.V) * self.C

    def active_matmul_params(self):
        return sum(a * r * c for _, r, c, a, mm in self.tensors() if mm)

    def flops_per_token(self):
        """model_config.h's training_flops_per_token: the MFU numerator."""
        return 6.0 * self.active_matmul_params() + 6.0 * self.L * self.C * self.T


class Op:
    """One kernel (or cuBLAS call) of a phase: FLOPs and HBM bytes per run, on which ceiling."""

    def __init__(self, phase, what, flops, nbytes, kind="mem"):
        self.phase, self.what, self.flops, self.bytes, self.kind = phase, what, float(flops), float(nbytes), kind

    def times(self, eff):
        """(compute seconds, memory seconds) at the efficiencies eff."""
        key, peak = PEAK_OF[self.kind]
        compute = self.flops / (peak * eff[key]) if self.flops else 0.0
        return compute, self.bytes / (BANDWIDTH * eff["mem_eff"])


def gemm(phase, what, M, K, N_out, kind="gemm", act=BF16):
    """out (M, N_out) = in (M, K) @ W^T: 2 M K N_out FLOPs, reads in and W, writes out."""
    return Op(phase, what, 2.0 * M * K * N_out, act * (M * K + K * N_out + M * N_out), kind)


def gemm_backward(phase, what, M, IC, OC, kind="gemm", act=BF16):
    """matmul_backward: dinp = dout W (overwrites), dW (fp32) += dout^T inp."""
    return [Op(phase, what + " dinp", 2.0 * M * IC * OC, act * (M * OC + OC * IC + M * IC), kind),
            Op(phase, what + " dW", 2.0 * M * IC * OC, act * (M * IC + M * OC) + 2 * FP32 * OC * IC, kind)]


def elementwise(phase, what, reads, writes):
    return Op(phase, what, 0, reads + writes)


def micro_step_ops(c):
    """The kernels of one micro-step (model_forward + model_backward), each with its phase."""
    N, C, T = c.N, c.C, c.T
    qkv_w, rot = (c.H + 2 * c.KVH) * c.hd, (c.H + c.KVH) * c.hd
    NC = N * C * BF16
    ops = []

    def rmsnorm(what):
        ops.append(elementwise("rmsnorm + rope/qk-norm", what + " fwd", NC, NC + FP32 * N))
        ops.append(elementwise("rmsnorm + rope/qk-norm", what + " bwd", 3 * NC + FP32 * N, NC))  # dinp accumulates

    def relu2(phase, width):
        n = N * width * BF16
        ops.append(elementwise(phase, "relu2 fwd", n, n))
        ops.append(elementwise(phase, "relu2 recompute (bwd)", n, n))
        ops.append(elementwise(phase, "relu2 bwd", 2 * n, n))

    def matmul(phase, what, IC, OC):
        ops.append(gemm(phase, what + " fwd", N, IC, OC))
        ops.extend(gemm_backward(phase, what + " bwd", N, IC, OC))

    # embedding, its RMSNorm, the residual copy; the embedding backward sorts
    # the N token ids (a CUB radix sort of (key, position) pairs: 4 passes
    # read and write 8 bytes each), then sums each used row of wte's fp32 grad.
    ops.append(elementwise("embedding", "lookup", NC + 4 * N, NC))
    ops.append(elementwise("embedding", "sort (radix, 4 passes)", 4 * 8 * N, 4 * 8 * N))
    ops.append(elementwise("embedding", "backward row sums", NC + 8 * N + FP32 * min(N, c.V) * C,
                           FP32 * min(N, c.V) * C))
    rmsnorm("x0")
    ops.append(elementwise("elementwise (residual, relu2, copies)", "residual copy + 2 memsets", NC, 3 * NC))
    att_fwd = 4.0 * c.B * c.H * (T * (T + 1) / 2) * c.hd  # q.k and p.v over the causal half
    for l in range(c.L):
        rmsnorm("ln1")
        rmsnorm("ln2")
        matmul("attention matmuls (qkv, wo)", "qkv", C, qkv_w)
        matmul("attention matmuls (qkv, wo)", "wo", C, C)
        rq = N * rot * BF16
        ops.append(elementwise("rmsnorm + rope/qk-norm", "rope_qknorm fwd", rq, rq + FP32 * N * (c.H + c.KVH)))
        ops.append(elementwise("rmsnorm + rope/qk-norm", "rope_qknorm bwd", 2 * rq + FP32 * N * (c.H + c.KVH), rq))
        # flash: q, k, v in, out and lse out; the backward recomputes the
        # scores (2.5x the forward FLOPs: 5 products of the forward's 2), reads
        # q, k, v, out, dout, lse and writes dq, dk, dv (+ the delta pass)
        ops.append(Op("attention core forward", "flash fwd", att_fwd,
                      BF16 * N * qkv_w + NC + FP32 * N * c.H, "attn"))
        ops.append(elementwise("attention core backward", "delta = rowsum(dout * out)", 2 * NC, FP32 * N * c.H))
        ops.append(Op("attention core backward", "flash bwd (dq, dk, dv)", 2.5 * att_fwd,
                      BF16 * N * qkv_w + 2 * NC + 2 * FP32 * N * c.H + BF16 * N * qkv_w, "attn"))
        ops.append(elementwise("elementwise (residual, relu2, copies)", "2 residual adds", 4 * NC, 2 * NC))
        if not c.is_moe_layer(l):
            matmul("dense FFN matmuls", "fc", C, 4 * C)
            matmul("dense FFN matmuls", "proj", 4 * C, C)
            relu2("elementwise (residual, relu2, copies)", 4 * C)
            continue
        E, P, W = c.E, N * c.K, 2 * C   # P: routed (token, expert) pairs, nominal
        ph = "moe router + selection"
        # router_logits_kernel: the bf16 activations read once, fp32 weights and sums
        ops.append(Op(ph, "router logits (bf16 h, fp32 W)", 2.0 * N * C * E, NC + FP32 * (E * C + N * E), "fp32"))
        if c.router == "tc":
            ops.append(elementwise(ph, "selection (top-K)", FP32 * N * E, N * E))
        else:  # radix select: 4 byte passes of tile histograms (SELECT_TILES tiles), then the marking pass
            hist = SELECT_TILES * E * 256 * 4
            ops.append(elementwise(ph, "selection (4 histogram passes, marking)", 5 * FP32 * N * E + 4 * hist,
                                   4 * hist + N * E))
        if c.router == "tc":
            ops.append(elementwise(ph, "aux loss bwd", FP32 * N * E, FP32 * N * E))
        ops.append(elementwise(ph, "h to fp32 (bwd)", NC, FP32 * N * C))
        ops.extend(gemm_backward(ph, "router (fp32)", N, C, E, "fp32", FP32))
        ops.append(elementwise(ph, "dh += router's", FP32 * N * C + NC, NC))
        ph = "moe dispatch"
        ops.append(elementwise(ph, "count + fanout (mask)", 2 * N * E, 0))
        ops.append(elementwise(ph, "token lists, gates, slot_of", N * E + FP32 * N * E, 2 * FP32 * P + FP32 * N * E))
        if c.router == "tc":
            ops.append(elementwise(ph, "gate mean (aux)", FP32 * N * E, 0))
        ph = "moe expert FFNs forward"
        ops.append(Op(ph, "fc (gathered rows)", 2.0 * P * C * W, BF16 * (P * C + E * W * C + P * W), "expert"))
        ops.append(Op(ph, "proj (relu2 fused)", 2.0 * P * W * C, BF16 * (P * W + E * W * C + P * C), "expert"))
        ph = "moe expert FFNs backward (+ gates)"
        ops.append(elementwise(ph, "gate grads", NC + BF16 * P * C + FP32 * N * E, FP32 * N * E))
        ops.append(Op(ph, "dpre = gate dy proj * relu2'", 2.0 * P * C * W,
                      BF16 * (P * C + E * W * C + 2 * P * W), "expert"))
        ops.append(Op(ph, "dproj", 2.0 * P * C * W, BF16 * (P * C + P * W) + 2 * FP32 * E * W * C, "expert"))
        ops.append(Op(ph, "dfc", 2.0 * P * C * W, BF16 * (P * W + P * C) + 2 * FP32 * E * W * C, "expert"))
        ops.append(Op(ph, "dx = dpre fc", 2.0 * P * W * C, BF16 * (P * W + E * W * C + P * C), "expert"))
        ph = "moe combine"
        ops.append(elementwise(ph, "fwd: y += gated outputs", NC + BF16 * P * C + FP32 * N * E + FP32 * P, NC))
        ops.append(elementwise(ph, "bwd: dh += slot grads", NC + BF16 * P * C + FP32 * N * E, NC))
        matmul("moe shared expert matmuls", "shared fc", C, W)
        matmul("moe shared expert matmuls", "shared proj", W, C)
        relu2("elementwise (residual, relu2, copies)", W)
    rmsnorm("lnf")
    matmul("lm_head matmul", "lm_head", C, c.Vp)
    # one block a row: reads the logits twice, writes dlogits once
    ops.append(elementwise("cross-entropy (softcap)", "softcap CE fwd + bwd", 2 * BF16 * N * c.Vp + 4 * N,
                           BF16 * N * c.Vp + FP32 * N))
    return ops


def step_ops(c, ns_steps=5):
    """The kernels run once per optimizer step: zeroing the gradients, the gradient norm and the update."""
    n = c.stored_params()
    ops = [elementwise("zero grads", "memset fp32 grads", 0, FP32 * n),
           elementwise("optimizer", "grad norm", FP32 * n, 0)]
    if c.opt == "adamw":
        ops.append(elementwise("optimizer", "AdamW", 4 * FP32 * n, 3 * FP32 * n + BF16 * n))
        return ops
    # -opt muon (the paper's recipe): Muon for the matrices, AdamW for wte,
    # lm_head and the router (optimizer_config.h's muon_matrices); qkv is one
    # matrix; EC/ET experts one each (a batch of E), TC's experts one tall one.
    adamw, matrices = 0, []
    tensors = c.tensors()
    i = 0
    while i < len(tensors):
        name, rows, cols, _, _ = tensors[i]
        if name in ("wte", "lm_head") or name.endswith("router"):
            adamw += rows * cols + (c.Vp - c.V) * c.C * (name == "lm_head")
        elif name.endswith("attn.wq"):
            matrices.append((rows + tensors[i + 1][1] + tensors[i + 2][1], cols, 1))
            i += 2
        elif name.endswith(("experts.fc", "experts.proj")) and c.router != "tc":
            matrices.append((rows // c.E, cols, c.E))
        else:
            matrices.append((rows, cols, 1))
        i += 1
    ops.append(elementwise("optimizer", "AdamW (wte, lm_head, routers)", 4 * FP32 * adamw,
                           3 * FP32 * adamw + BF16 * adamw))
    for rows, cols, b in matrices:
        r, k = min(rows, cols), max(rows, cols)  # X is r x k, r <= k
        x, g = b * r * k, b * r * r
        ops.append(elementwise("optimizer", "Muon momentum", 2 * FP32 * x, FP32 * x + BF16 * x))
        ops.append(elementwise("optimizer", "Muon normalize", 2 * BF16 * x, BF16 * x))
        for _ in range(ns_steps):
            ops.append(Op("optimizer", "NS A = X X^T", 2.0 * b * r * r * k, BF16 * (x + g), "gemm"))
            ops.append(elementwise("optimizer", "NS copies", BF16 * (g + x), BF16 * (g + x)))
            ops.append(Op("optimizer", "NS P = bA + cA^2", 2.0 * b * r ** 3, BF16 * 3 * g, "gemm"))
            ops.append(Op("optimizer", "NS X = aX + PX", 2.0 * b * r * r * k, BF16 * (g + 3 * x), "gemm"))
        ops.append(elementwise("optimizer", "Muon apply", FP32 * x + BF16 * x, FP32 * x + BF16 * x))
    return ops


class Phase:
    def __init__(self, name, bench_row):
        self.name, self.bench_row = name, bench_row
        self.flops = self.bytes = self.compute_s = self.memory_s = self.time_s = 0.0


def predict(c, eff):
    """Per phase, per optimizer step: FLOPs, bytes, compute and memory time, lower-bound time."""
    phases = {name: Phase(name, row) for name, row in PHASES}
    for ops, repeat in ((micro_step_ops(c), c.micro_steps), (step_ops(c), 1)):
        for op in ops:
            p = phases[op.phase]
            compute, memory = op.times(eff)
            p.flops += repeat * op.flops
            p.bytes += repeat * op.bytes
            p.compute_s += repeat * compute
            p.memory_s += repeat * memory
            p.time_s += repeat * max(compute, memory)
    return [p for p in phases.values() if p.flops or p.bytes]


def parse_bench(text):
    """bench_step's phase table: {row: ms per micro-step}, plus 'optimizer' and 'zero grads' per step, 'step' ms."""
    rows = {}
    table = re.search(r"^phase \(all layers\).*\n((?:.*\n)*?)sum of phases", text, re.M)
    if not table:
        raise ValueError("no phase table (a 'phase (all layers)' header down to 'sum of phases'): "
                         "is it bench_step's output?")
    for line in table.group(1).splitlines():
        m = re.match(r"^(.+?)\s+([\d.]+)\s+([\d.]+)%", line)
        if m:
            # the forward and backward matmul rows are one row here
            name = "matmul (cuBLAS, + lm_head)" if m.group(1).startswith("matmul ") else m.group(1)
            rows[name] = rows.get(name, 0.0) + float(m.group(2))
    for key, pattern in (("optimizer", r"^optimizer .*?\s([\d.]+) ms per optimizer step"),
                         ("zero grads", r"^zero grads\s+([\d.]+) ms per optimizer step"),
                         ("step", r"^train_et step\s+.*: ([\d.]+) ms, \d+ tokens/s"),
                         ("micro", r"^measured micro-step \(fwd \+ bwd\)\s+([\d.]+)")):
        m = re.search(pattern, text, re.M)
        if m:
            rows[key] = float(m.group(1))
    m = re.search(r"^batch\s+B=(\d+) x T=(\d+)", text, re.M)
    if m:
        rows["batch"] = (int(m.group(1)), int(m.group(2)))
    return rows


def fmt(x, digits=2):
    return f"{x:,.{digits}f}"


def report(c, eff, bench=None, targets=()):
    phases = predict(c, eff)
    step_s = sum(p.time_s for p in phases)
    flops_exec = sum(p.flops for p in phases)
    tokens = c.D
    model_flops = c.flops_per_token() * tokens
    mfu = model_flops / (PEAK_BF16 * step_s)
    out = [f"## Roofline: {c.name()}, B={c.B} x T={c.T}, {c.micro_steps} micro-steps = {c.D} tokens per step, "
           f"{c.opt}, bf16, H200",
           "",
           f"Ceilings: {PEAK_BF16 / 1e12:.0f} TFLOP/s bf16 tensor cores, {PEAK_FP32 / 1e12:.0f} TFLOP/s fp32, "
           f"{BANDWIDTH / 1e12:.1f} TB/s HBM. Efficiencies: "
           + ", ".join(f"{k.replace('_', '-')} {eff[k]:.2f}" for k, _, _ in EFFICIENCIES) + ".",
           "Each kernel takes max(FLOPs / (peak x eff), bytes / (bandwidth x mem-eff)); a phase is the sum of its "
           "kernels, compute-bound when their compute time exceeds their memory time. Per optimizer step.",
           ""]
    measured = {}
    if bench:
        if bench.get("batch") and bench["batch"] != (c.B, c.T):
            raise ValueError(f"--bench: the bench ran B={bench['batch'][0]} x T={bench['batch'][1]}, "
                             f"the prediction is for B={c.B} x T={c.T}: give the same -b and -t")
        for key, ms in bench.items():
            if key in ("batch", "step", "micro"):
                continue
            measured[key] = ms * (1 if key in PER_STEP else c.micro_steps)
    head = "| phase | GFLOP | GB | FLOP/B | compute ms | memory ms | bound | predicted ms | % step |"
    rule = "|---|---:|---:|---:|---:|---:|---|---:|---:|"
    out += [head, rule]
    for p in phases:
        ai = p.flops / p.bytes if p.bytes else float("inf")
        bound = "compute" if p.compute_s > p.memory_s else "memory"
        out.append(f"| {p.name} | {fmt(p.flops / 1e9, 1)} | {fmt(p.bytes / 1e9, 2)} | {fmt(ai, 0)} | "
                   f"{fmt(p.compute_s * 1e3)} | {fmt(p.memory_s * 1e3)} | {bound} | {fmt(p.time_s * 1e3)} | "
                   f"{100 * p.time_s / step_s:.1f}% |")
    out.append(f"| **step** | {fmt(flops_exec / 1e9, 1)} | {fmt(sum(p.bytes for p in phases) / 1e9, 2)} | | "
               f"{fmt(sum(p.compute_s for p in phases) * 1e3)} | {fmt(sum(p.memory_s for p in phases) * 1e3)} | | "
               f"{fmt(step_s * 1e3)} | 100% |")
    routing = sum(p.time_s for p in phases if p.name in ROUTING)
    out += ["",
            f"- predicted step: {step_s * 1e3:.1f} ms, {tokens / step_s:,.0f} tokens/s",
            f"- model FLOPs: {c.flops_per_token() / 1e9:.4f} GFLOP/token (6 x {c.active_matmul_params() / 1e6:.2f}M "
            f"active matmul weights + causal attention; train_et's 'flops' line) = {model_flops / 1e12:.1f} TFLOP "
            f"per step; executed: {flops_exec / 1e12:.1f} TFLOP (with attention's recomputation, the padded "
            f"lm_head{', Muon' if c.opt == 'muon' else ''})",
            f"- **predicted MFU: {100 * mfu:.1f}%**"]
    if c.E:
        out.append(f"- routing (router + selection, dispatch, combine): {100 * routing / step_s:.1f}% of the step "
                   "(target <= 5%)")
    for target in targets:
        budget = model_flops / (PEAK_BF16 * target)
        mem = sum(p.time_s for p in phases if p.compute_s <= p.memory_s)
        tc_flops = sum(p.flops for p in phases if p.compute_s > p.memory_s)
        left = budget - mem
        need = f"{100 * tc_flops / (PEAK_BF16 * left):.0f}% of peak on average" if left > 0 else "impossible"
        out.append(f"- MFU {100 * target:.0f}% needs a step of {budget * 1e3:.1f} ms: with the memory-bound phases "
                   f"at their predicted {mem * 1e3:.1f} ms, the compute-bound phases ({tc_flops / 1e12:.1f} TFLOP) "
                   f"must run at {need}")
    if bench:
        out += ["", "### Against bench_step (ms per optimizer step; bench rows per micro-step x "
                    f"{c.micro_steps})", "",
                "| bench_step row | predicted ms | measured ms | measured / predicted |", "|---|---:|---:|---:|"]
        rows = {}
        for p in phases:
            rows[p.bench_row] = rows.get(p.bench_row, 0.0) + p.time_s * 1e3
        for row, pred in rows.items():
            got = measured.get(row)
            out.append(f"| {row} | {fmt(pred)} | {fmt(got) if got is not None else 'not measured'} | "
                       f"{f'{got / pred:.2f}x' if got is not None and pred > 0 else ''} |")
        if "step" in bench:
            got = bench["step"]
            out.append(f"| **train_et step** | {fmt(step_s * 1e3)} | {fmt(got)} | {got / step_s:.2f}x |")
            got_mfu = model_flops / (PEAK_BF16 * got / 1e3)
            out += ["", f"- measured MFU (model FLOPs / measured step): {100 * got_mfu:.1f}%"]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------
# presets.h: its macros and rows, read as text (the C++ is the source of truth)

def read_presets(path=os.path.join(REPO, "presets.h")):
    """{name: flags string} of presets.h, and PAPER_VOCAB."""
    text = open(path).read()
    macros = {}
    for m in re.finditer(r'^#define (\w+) ((?:.*\\\n)*.*)$', text, re.M):
        body = m.group(2).replace("\\\n", " ")
        macros[m.group(1)] = expand(body, macros)
    presets = {}
    for m in re.finditer(r'\{"([\w-]+)",\s*"(?:[^"\\]|\\.)*"\s*,((?:\s*"[^"]*"|\s*[A-Z][A-Z0-9_]*)+)\s*,', text):
        presets[m.group(1)] = expand(m.group(2), macros)
    vocab = int(re.search(r"PAPER_VOCAB = (\d+)", text).group(1))
    return presets, vocab


def expand(body, macros):
    """C string concatenation of literals and macro names."""
    return "".join(tok[1:-1] if tok.startswith('"') else macros.get(tok, "")
                   for tok in re.findall(r'"[^"]*"|[A-Z][A-Z0-9_]*', body))


PRESET_FLAGS = {"-m": "model", "-e": "experts", "-r": "router", "-k": "top_k", "-b": "batch", "-t": "seq_len",
                "-d": "total_batch", "-opt": "optimizer", "-ep": "pool", "-kv": "kv_heads"}


def preset_settings(name):
    presets, vocab = read_presets()
    if name not in presets:
        raise ValueError(f"--preset: unknown preset '{name}' (presets.h has {', '.join(presets)})")
    words, settings = presets[name].split(), {"vocab": vocab}
    for flag, value in zip(words, words[1:]):
        if flag in PRESET_FLAGS:
            key = PRESET_FLAGS[flag]
            settings[key] = value if key in ("model", "router", "optimizer", "pool") else int(value)
    return settings


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="dev/roofline.py",
        description="Predicted time of one train_et training step on an H200, phase by phase: FLOPs, bytes, "
                    "lower-bound time max(FLOPs / peak, bytes / bandwidth) at the stated efficiencies, and the "
                    "predicted MFU. The model flags mean what train_et's do, with its defaults.",
        epilog="Example: python3 dev/roofline.py -m d12 -e 0 (d12 dense); --preset d12-et; "
               "--bench out.txt puts bench_step's measured times next to the predictions.")
    p.add_argument("-m", dest="model", default=None, help="model: tiny, or dN with N even (default d12)")
    p.add_argument("-e", dest="experts", type=int, default=None,
                   help="routed experts per MoE layer; 0: dense (default 16, as train_et)")
    p.add_argument("-r", dest="router", choices=["tc", "ec", "et"], default=None,
                   help="router of the MoE layers (default et)")
    p.add_argument("-k", dest="top_k", type=int, default=None,
                   help="K: routed experts per token on average (default 1)")
    p.add_argument("-kv", dest="kv_heads", type=int, default=None, help="key/value heads (default: as many as heads)")
    p.add_argument("-b", dest="batch", type=int, default=None, help="sequences per micro-step (default 16)")
    p.add_argument("-t", dest="seq_len", type=int, default=None, help="sequence length (default 2048)")
    p.add_argument("-d", dest="total_batch", type=int, default=None, help="tokens per optimizer step (default 524288)")
    p.add_argument("-opt", dest="optimizer", choices=["adamw", "muon"], default=None,
                   help="optimizer: adamw for every tensor, or muon for the matrices (default adamw)")
    p.add_argument("-V", "--vocab", dest="vocab", type=int, default=None,
                   help=f"vocab size (default {SYNTHETIC_VOCAB}, train_et's synthetic corpus; a --preset: the paper's)")
    p.add_argument("--preset", default=None, help="a row of presets.h (d12-dense, d12-et, d20-et, ...); "
                   "flags given with it win")
    p.add_argument("--precision", choices=["bf16"], default="bf16",
                   help="the build modelled (only bf16, the trained one)")
    for name, default, text in EFFICIENCIES:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=default,
                       help=f"{text} (default {default})")
    p.add_argument("--target", type=float, action="append", default=None,
                   help="an MFU target in percent: prints what it asks of the compute-bound phases "
                        "(repeatable; default 45 and 40, issue 10's)")
    p.add_argument("--bench", default=None, metavar="FILE",
                   help="bench_step output (dev/bench_step.cu) of the same model, -b and -t: "
                        "measured times next to the predicted")
    a = p.parse_args(argv)
    for name, _, _ in EFFICIENCIES:
        if not 0 < getattr(a, name) <= 1:
            p.error(f"--{name.replace('_', '-')}: {getattr(a, name)} is not a fraction in (0, 1]")
    for flag, v in (("-b", a.batch), ("-t", a.seq_len), ("-d", a.total_batch), ("-k", a.top_k), ("-V", a.vocab)):
        if v is not None and v < 1:
            p.error(f"{flag}: {v} is not a positive integer")
    if a.experts is not None and a.experts < 0:
        p.error(f"-e: {a.experts} is negative")
    return p, a


def main(argv):
    p, a = parse_args(argv)
    try:
        settings = preset_settings(a.preset) if a.preset else {}
        for key in ("model", "experts", "router", "top_k", "kv_heads", "batch", "seq_len", "total_batch", "optimizer",
                    "vocab"):
            if getattr(a, key) is not None:
                settings[key] = getattr(a, key)
        c = Config(**settings)
        bench = None
        if a.bench:
            try:
                text = open(a.bench).read()
            except OSError as e:
                raise ValueError(f"--bench: cannot read {a.bench}: {e.strerror}")
            bench = parse_bench(text)
        eff = {name: getattr(a, name) for name, _, _ in EFFICIENCIES}
        targets = [t / 100 for t in (a.target or [45.0, 40.0])]
        sys.stdout.write(report(c, eff, bench, targets))
    except ValueError as e:
        p.exit(2, f"dev/roofline.py: error: {e}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
