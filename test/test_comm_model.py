"""test/test_comm_model.py: dev/comm_model.py, data parallelism's traffic and its cost.

Checks the bytes against a hand count (the gradients' reduce-scatter,
4 P (R - 1) / R; the weights' all-gather, bf16 and the routers' fp32; the
logits' 4 N E (R - 1) per MoE layer and micro-step), that the buckets cover every parameter and the backward FLOPs,
that one rank moves nothing, that the overlap hides what the backward pass
can hide and no more, that the paper's models reach the 90% target at 8
ranks at the default bandwidth, and the command line.
"""
import os
import subprocess
import sys

from harness import REPO, main

sys.path.insert(0, os.path.join(REPO, "dev"))
import comm_model  # noqa: E402
from roofline import Config  # noqa: E402

SCRIPT = os.path.join(REPO, "dev", "comm_model.py")


def test_bytes_by_hand():
    c = Config("d12", experts=16, router="et")
    m = comm_model.model(c, 8, 0.4, 370e9, 0.0, pooled=True)
    P = c.stored_params()
    router = 11 * 16 * 768  # the routers' fp32 weights travel too
    assert m["params"] == P and m["grads_bytes"] == 4 * P * 7 / 8, m
    assert m["weights_bytes"] == (2 * P + 4 * router) * 7 / 8, m
    assert m["micro_steps"] == 524288 // (8 * 16 * 2048) == 2, m
    assert m["logits_bytes"] == 4 * 16 * 2048 * 16 * 7 * 11 * 2, m  # 11 MoE layers, 2 micro-steps
    assert abs(m["weights_s"] - m["weights_bytes"] / 370e9) < 1e-12, m


def test_buckets_cover_the_model():
    for c in (Config("d12", experts=0), Config("d20", experts=16, router="tc")):
        b = comm_model.buckets(c)
        assert sum(params for _, params, _ in b) == c.stored_params(), c.name()
        assert abs(sum(share for _, _, share in b) - 1.0) < 1e-9, c.name()  # every FLOP of the step in some bucket
        assert b[0][0] == "lm_head" and b[-1][0] == "wte" and b[1][0] == f"layer {c.L - 1}", [x[0] for x in b]


def test_one_rank_moves_nothing():
    m = comm_model.model(Config("d12", experts=16, router="ec"), 1, 0.4, 370e9, 0.0, pooled=True)
    assert m["grads_bytes"] == m["weights_bytes"] == m["logits_bytes"] == 0 and m["grads_exposed_s"] == 0, m


def test_overlap():
    """At a high bandwidth only the buckets ready at the very end (layer 0's and wte's: the
    embedding's backward has no matmul FLOPs) are exposed; at a low one the gradients outlast the
    backward pass and the excess shows."""
    c = Config("d12", experts=0)
    fast = comm_model.model(c, 8, 0.4, 1e15, 0.0, pooled=False)
    last = sum(params for name, params, _ in comm_model.buckets(c) if name in ("layer 0", "wte")) * 4 * 7 / 8 / 1e15
    assert abs(fast["grads_exposed_s"] - last) < 1e-12, (fast, last)
    slow = comm_model.model(c, 8, 0.4, 1e9, 0.0, pooled=False)
    assert slow["grads_exposed_s"] >= slow["grads_bytes"] / 1e9 - slow["backward_s"] - 1e-9, slow
    assert slow["efficiency"] < fast["efficiency"], (slow, fast)


def test_paper_models_scale():
    for name, settings in comm_model.CASES:
        c = Config(batch=16, **settings)
        m = comm_model.model(c, 8, 0.4, 370e9, 20e-6, pooled=bool(c.E))
        assert m["efficiency"] >= 0.9, f"{name}: {m['efficiency']:.3f}"


def test_command_line():
    r = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.count("scaling efficiency") == 4 and "no multi-GPU run yet" in r.stdout, r
    r = subprocess.run([sys.executable, SCRIPT, "--preset", "d12-ec-512k", "-R", "2"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "d12-ec-512k" in r.stdout and "2 ranks" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, SCRIPT, "-R", "3"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "do not divide into 3 ranks" in r.stderr, r.stderr


if __name__ == "__main__":
    main(globals())
