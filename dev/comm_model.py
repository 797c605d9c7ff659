#!/usr/bin/env python3
"""dev/comm_model.py: what data-parallel training moves between GPUs, per step, and what it costs.

train_et on R ranks (multi_gpu.cuh) moves, per optimizer step and rank:
  - the gradients, fp32, each bucket (a layer's tensors, lm_head, wte) reduced
    to the ranks that own its shards, on a second stream as the last
    micro-step's backward pass finishes the layer: a reduce-scatter's traffic,
    4 P (R - 1) / R bytes for P parameters;
  - the new weights from their owners to every rank after the update: the
    matmuls' bf16 copy, and the routers' fp32 weights (every rank's forward
    reads them; the fp32 master weights stay sharded): an all-gather's,
    (2 P + 4 P_router) (R - 1) / R bytes, not overlapped (the next forward
    needs them);
  - with -ep global (EC, and ET's cutoff statistic): every MoE layer's router
    logits, every micro-step, gathered from all ranks: 4 N E (R - 1) bytes
    received, N = -b x -t tokens per rank, on the main stream (selection waits);
  - scalars: the gradient norm's 512 partial sums, the loss, TC's counts.
The time of a collective is bytes / bus bandwidth + a latency (NCCL's ring on
NVLink: --busbw, --latency). The backward pass's compute is the model's
FLOPs at the target MFU (dev/roofline.py's model: 6 x active matmul weights
+ causal attention per token), split over the buckets by their FLOPs; the
gradient stream runs the buckets in order as they become ready, so what it
has left when the backward pass ends is exposed. Scaling efficiency: compute
/ (compute + exposed communication), with compute = one rank's share of the
step at the target MFU.

No multi-GPU run has happened: these are predictions for the node we do not
have, to hold the first real run against (dev/gpu_check.sh reports the
measured communication share when it runs on several GPUs).

    python3 dev/comm_model.py                     d12 and d20, dense and ET (-ep global), 8 ranks
    python3 dev/comm_model.py --preset d20-et -R 8 --busbw 300
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from roofline import PEAK_BF16, Config, preset_settings  # noqa: E402

NORM_BLOCKS = 512  # model.cuh: the gradient norm's partial sums


def buckets(c):
    """The gradient buckets in the order the backward pass completes them: (name, parameters, share of the
    backward FLOPs). lm_head first, then the layers from the top, wte (no matmul FLOPs) last."""
    fpt = c.flops_per_token()
    tensors = c.tensors()
    head = [t for t in tensors if t[0] == "lm_head"][0]
    out = [("lm_head", head[1] * head[2] + (c.Vp - c.V) * c.C, 6.0 * head[1] * head[2] / fpt)]
    for l in reversed(range(c.L)):
        mine = [t for t in tensors if t[0].startswith(f"h{l}.")]
        params = sum(r * cols for _, r, cols, _, _ in mine)
        flops = sum(6.0 * a * r * cols for _, r, cols, a, mm in mine if mm) + 6.0 * c.C * c.T
        out.append((f"layer {l}", params, flops / fpt))
    wte = tensors[0]
    out.append(("wte", wte[1] * wte[2], 0.0))
    return out


def model(c, ranks, mfu, busbw, latency, pooled):
    """Per optimizer step and rank: the traffic by kind, and the times."""
    R = ranks
    P = c.stored_params()
    micro = c.D // (c.N * R)
    compute = c.flops_per_token() * c.D / R / (mfu * PEAK_BF16)  # one rank's share of the step
    backward = compute / micro * 2 / 3  # the last micro-step's backward pass
    share = (R - 1) / R
    # the gradient stream: buckets in order, each starting when ready and when the one before is done
    t_ready = stream = 0.0
    for _, params, flops_share in buckets(c):
        t_ready += backward * flops_share
        stream = max(stream, t_ready) + 4 * params * share / busbw + latency
    grads_exposed = max(0.0, stream - backward)
    grads_bytes = 4 * P * share
    router = sum(r * cols for name, r, cols, _, _ in c.tensors() if name.endswith(".moe.router"))
    weights_bytes = (2 * P + 4 * router) * share
    weights_time = weights_bytes / busbw + latency
    moe_layers = c.L - 1 if c.E else 0
    logits_bytes = 4 * c.N * c.E * (R - 1) * moe_layers * micro if pooled else 0
    logits_time = (logits_bytes / busbw + latency * moe_layers * micro) if pooled else 0.0
    scalars_time = 2 * latency + 4 * NORM_BLOCKS / busbw
    if R == 1:  # one process makes no collective calls at all
        grads_exposed = weights_time = logits_time = scalars_time = 0.0
    exposed = grads_exposed + weights_time + logits_time + scalars_time
    return {
        "params": P, "micro_steps": micro, "compute_s": compute, "backward_s": backward,
        "grads_bytes": grads_bytes, "grads_s": grads_bytes / busbw, "grads_exposed_s": grads_exposed,
        "weights_bytes": weights_bytes, "weights_s": weights_time, "logits_bytes": logits_bytes,
        "logits_s": logits_time, "scalars_s": scalars_time, "exposed_s": exposed,
        "efficiency": compute / (compute + exposed),
    }


def report(name, c, ranks, mfu, busbw, latency, pooled):
    m = model(c, ranks, mfu, busbw, latency, pooled)
    ms = lambda s: f"{s * 1e3:7.2f} ms"  # noqa: E731
    gb = lambda b: f"{b / 1e9:7.3f} GB"  # noqa: E731
    lines = [f"{name}: {c.name()}, {m['params'] / 1e6:.0f}M parameters, {ranks} ranks of -b {c.B} x -t {c.T}, "
             f"{m['micro_steps']} micro-step(s) each, step of {c.D} tokens",
             f"  compute per rank at {mfu:.0%} MFU      {ms(m['compute_s'])}  (last backward pass {ms(m['backward_s'])})",
             f"  gradients (fp32, to their owners)  {gb(m['grads_bytes'])} {ms(m['grads_s'])}, exposed after the "
             f"backward pass {ms(m['grads_exposed_s'])}",
             f"  weights (bf16, from their owners)  {gb(m['weights_bytes'])} {ms(m['weights_s'])}, exposed",
             f"  router logits (-ep global)         {gb(m['logits_bytes'])} {ms(m['logits_s'])}, exposed"
             if pooled else "  router logits                      none (the pool is each rank's own)",
             f"  norm, loss                                    {ms(m['scalars_s'])}, exposed",
             f"  exposed communication {ms(m['exposed_s'])} of a {ms(m['compute_s'] + m['exposed_s'])} step: "
             f"scaling efficiency {m['efficiency']:.1%} (target 90%)"]
    return "\n".join(lines) + "\n", m


CASES = [("d12 dense", {"model": "d12", "experts": 0}), ("d12 ET", {"model": "d12", "experts": 16, "router": "et"}),
         ("d20 dense", {"model": "d20", "experts": 0}), ("d20 ET", {"model": "d20", "experts": 16, "router": "et"})]


def main(argv):
    p = argparse.ArgumentParser(prog="dev/comm_model.py", description=__doc__.split("\n\n")[0])
    p.add_argument("-R", dest="ranks", type=int, default=8, help="ranks (GPUs) (default 8)")
    p.add_argument("-b", dest="batch", type=int, default=16, help="sequences per rank per micro-step (default 16)")
    p.add_argument("--preset", default=None, help="one row of presets.h instead of the four default cases")
    p.add_argument("--mfu", type=float, default=0.40, help="the MFU the compute runs at (default 0.40)")
    p.add_argument("--busbw", type=float, default=370e9,
                   help="NCCL bus bandwidth in bytes/s (default 370e9: NVLink 4, 8 GPUs, large messages)")
    p.add_argument("--latency", type=float, default=20e-6, help="seconds per collective call (default 20e-6)")
    p.add_argument("--pool", choices=["global", "micro"], default="global",
                   help="EC/ET routing pool: global gathers the logits (default global)")
    a = p.parse_args(argv)
    if a.ranks < 1 or not 0 < a.mfu <= 1 or a.busbw <= 0 or a.latency < 0:
        p.error("-R >= 1, 0 < --mfu <= 1, --busbw > 0 and --latency >= 0")
    cases = CASES
    if a.preset:
        try:
            s = preset_settings(a.preset)
        except ValueError as e:
            p.error(str(e))
        cases = [(a.preset, {k: v for k, v in s.items() if k in ("model", "experts", "router", "top_k", "vocab",
                                                                  "kv_heads", "seq_len")})]
    print(f"{a.ranks} ranks, bus bandwidth {a.busbw / 1e9:.0f} GB/s, {a.latency * 1e6:.0f} us per collective, "
          f"compute at {a.mfu:.0%} MFU of {PEAK_BF16 / 1e12:.0f} TFLOP/s (predictions: no multi-GPU run yet)\n")
    for name, settings in cases:
        try:
            c = Config(batch=a.batch, total_batch=524288, **settings)
        except ValueError as e:
            p.error(str(e))
        if c.D % (c.N * a.ranks):
            p.error(f"{name}: {c.D} tokens per step do not divide into {a.ranks} ranks x {c.N} tokens")
        pooled = bool(c.E) and c.router != "tc" and a.pool == "global"
        text, _ = report(name, c, a.ranks, a.mfu, a.busbw, a.latency, pooled)
        print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
