"""test/test_roofline.py: dev/roofline.py, the predicted step on an H200.

Checks that its FLOPs per token (the MFU numerator) are train_et's own, from
train_et's start-up report (run with no GPU, so it stops right after it) for
d12 dense, d12 with 16 ET experts and d20; that the phases' FLOPs add up to
the step's; the bytes and time arithmetic of one hand-counted kernel and of
the optimizer; presets.h's rows read as train_et reads them; the merging of
a bench_step output (a made-up one, in bench_step's format); the help text
and the errors.
"""
import os
import re
import subprocess
import sys
import tempfile

from harness import REPO, main

sys.path.insert(0, os.path.join(REPO, "dev"))
import roofline  # noqa: E402

SCRIPT = os.path.join(REPO, "dev", "roofline.py")
TRAIN_ET = os.path.join(REPO, "train_et")
EFF = {name: default for name, default, _ in roofline.EFFICIENCIES}


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)


def train_et_report(*args):
    """train_et's 'params' ... 'flops' lines for these flags (no GPU: it stops after the report)."""
    if not os.path.exists(TRAIN_ET):
        raise AssertionError(f"{TRAIN_ET} is not built (make train_et)")
    with tempfile.TemporaryDirectory() as work:
        r = subprocess.run([TRAIN_ET, "-i", "synthetic", *args], capture_output=True, text=True, cwd=work,
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert r.stderr.startswith("error: no CUDA device"), r.stderr
    m = re.search(r"^flops\s+([\d.]+) GFLOP per token, training \(6 x ([\d.]+)M active matmul weights", r.stdout, re.M)
    assert m, r.stdout
    return float(m.group(1)), float(m.group(2))


def test_flops_per_token_is_train_ets():
    for flags, config in ((["-m", "d12", "-e", "0"], roofline.Config("d12", experts=0)),
                          (["-m", "d12", "-e", "16", "-r", "et"], roofline.Config("d12", experts=16, router="et")),
                          (["-m", "d20", "-e", "0", "-b", "8"], roofline.Config("d20", experts=0, batch=8)),
                          (["-m", "d20", "-e", "16", "-r", "tc", "-b", "8"],
                           roofline.Config("d20", experts=16, router="tc", batch=8))):
        gflop, active_m = train_et_report(*flags)
        assert round(config.flops_per_token() / 1e9, 3) == gflop, (flags, config.flops_per_token(), gflop)
        assert round(config.active_matmul_params() / 1e6, 2) == active_m, (flags, config.active_matmul_params())


def test_phase_flops_add_up_to_the_step():
    for c in (roofline.Config("d12", experts=0), roofline.Config("d12", experts=16, optimizer="muon"),
              roofline.Config("d20", experts=16, router="tc", optimizer="muon")):
        phases = roofline.predict(c, EFF)
        ops_flops = c.micro_steps * sum(op.flops for op in roofline.micro_step_ops(c)) + \
            sum(op.flops for op in roofline.step_ops(c))
        assert abs(sum(p.flops for p in phases) - ops_flops) <= 1e-9 * ops_flops
        # the tensor-core matmuls alone: 6 x active weights per token, the padded lm_head rows and the router included
        N, C = c.D, c.C
        matmul = sum(p.flops for p in phases if "matmul" in p.name or "expert FFN" in p.name or "router" in p.name)
        expected = 6 * N * (c.active_matmul_params() + (c.Vp - c.V) * C)
        assert abs(matmul - expected) <= 1e-9 * expected, (matmul, expected)
        # attention: the model's 6 L C T per token, executed as 3.5x the exact causal forward
        att = sum(p.flops for p in phases if p.name.startswith("attention core"))
        exact = 3.5 * 4 * c.B * c.H * c.T * (c.T + 1) / 2 * c.hd * c.L * c.micro_steps
        assert abs(att - exact) <= 1e-9 * exact


def test_bytes_and_time_by_hand():
    # one bf16 matmul: (1024 x 512) @ (512 x 256)^T: 2*1024*512*256 FLOPs;
    # bytes 2 * (1024*512 + 512*256 + 1024*256) = 1835008
    op = roofline.gemm("x", "y", 1024, 512, 256)
    assert op.flops == 268435456 and op.bytes == 1835008
    eff = dict(EFF, gemm_eff=0.5, mem_eff=0.5)
    compute, memory = op.times(eff)
    assert abs(compute - 268435456 / (989e12 * 0.5)) < 1e-18
    assert abs(memory - 1835008 / (4.8e12 * 0.5)) < 1e-18
    # AdamW on the tiny model: 30 bytes per parameter (4 fp32 reads, 3 fp32 + 1 bf16 writes), plus the
    # grad norm's read (4) and the memset (4); no FLOPs; memory-bound at 4.8 TB/s x mem-eff
    c = roofline.Config("tiny", experts=0, batch=4, seq_len=64, total_batch=256, vocab=1000)
    n = 1000 * 64 * 2 + 2 * (4 * 64 * 64 + 2 * 4 * 64 * 64) + (1024 - 1000) * 64  # wte, layers, padded lm_head
    assert c.stored_params() == n
    phases = {p.name: p for p in roofline.predict(c, eff)}
    assert phases["optimizer"].bytes == 34 * n and phases["zero grads"].bytes == 4 * n
    assert abs(phases["optimizer"].time_s - 34 * n / (4.8e12 * 0.5)) < 1e-15


def test_presets_read_as_train_et():
    settings = roofline.preset_settings("d12-et")
    assert settings == {"vocab": 65536, "optimizer": "muon", "total_batch": 524288, "seq_len": 2048, "model": "d12",
                        "experts": 16, "top_k": 1, "router": "et", "pool": "micro", "batch": 128}, settings
    gflop, _ = train_et_report("-preset", "d12-et", "-sv", "65536", "-b", "16")
    assert round(roofline.Config(**dict(settings, batch=16)).flops_per_token() / 1e9, 3) == gflop
    r = run("--preset", "d20-dense", "-b", "8")
    assert r.returncode == 0, r.stderr
    assert "d20 dense, B=8 x T=2048, 32 micro-steps" in r.stdout and "muon" in r.stdout


BENCH = """\
gpu      NVIDIA H200, 132 SMs, 140 GiB, compute capability 9.0, peak bf16 989 TFLOP/s (the MFU denominator)
batch    B=16 x T=2048 = 32768 tokens per micro-step

== bench_step: d12 dense, bf16, B=16 T=2048 (32768 tokens/micro-step), adamw, median of 20 runs ==
phase (all layers)                           ms/micro   % micro    TFLOP/s
attention forward                               4.000      6.0%      310.0
attention backward                             10.000     15.0%      250.0
matmul forward (cuBLAS, + lm_head)             10.000     15.0%      600.0
matmul backward (cuBLAS, + lm_head)            20.000     30.0%      600.0
norms (rmsnorm, rope_qknorm; fwd+bwd)           4.000      6.0%
elementwise (relu2, residual, copies)           5.000      7.5%
embedding (fwd + sort + bwd)                    1.000      1.5%
loss (softcap CE + sum)                         3.000      4.5%
sum of phases                                  57.000     85.5%
measured micro-step (fwd + bwd)                66.700    100.0%   (min 66.0, max 67.0)
in no phase (measured - sum)                    9.700     14.5%
optimizer grad_norm + adamw)                    2.000 ms per optimizer step
zero grads                                      0.250 ms per optimizer step

micro-step        66.700 ms, 491271 tokens/s, MFU 42.4%
train_et step     -d 524288 = 16 micro-steps + zero + update: 1069.450 ms, 490242 tokens/s, MFU 42.4%
"""


def test_bench_merging():
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write(BENCH)
        f.flush()
        r = run("-m", "d12", "-e", "0", "--bench", f.name)
        assert r.returncode == 0, r.stderr
        rows = {m.group(1): m.groups()[1:] for m in
                re.finditer(r"^\| (.+?) \| ([\d,.]+) \| ([\w ,.]+) \| ([\d.x]*) \|$", r.stdout, re.M)}
        # per micro-step x 16 micro-steps; the two matmul rows are one; per-step rows as they are
        assert rows["attention forward"][1] == "64.00", rows
        assert rows["matmul (cuBLAS, + lm_head)"][1] == "480.00", rows
        assert rows["optimizer"][1] == "2.00" and rows["zero grads"][1] == "0.25", rows
        assert rows["**train_et step**"][1] == "1,069.45", rows
        pred = float(rows["attention forward"][0].replace(",", ""))
        assert rows["attention forward"][2] == f"{64 / pred:.2f}x"
        assert "measured MFU" in r.stdout
        # a bench of another batch is refused
        r = run("-m", "d12", "-e", "0", "-b", "8", "--bench", f.name)
        assert r.returncode == 2 and "the bench ran B=16 x T=2048" in r.stderr, r.stderr
        f.seek(0)
        f.truncate()
        f.write("not a bench\n")
        f.flush()
        r = run("--bench", f.name)
        assert r.returncode == 2 and "no phase table" in r.stderr, r.stderr


def test_output_states_bounds_and_assumptions():
    r = run("-m", "d12", "-e", "16", "-r", "tc", "-opt", "muon", "--attn-eff", "0.4", "--target", "40")
    assert r.returncode == 0, r.stderr
    assert "attn-eff 0.40" in r.stdout and "989 TFLOP/s" in r.stdout and "4.8 TB/s" in r.stdout
    bounds = dict(re.findall(r"^\| ([^|*]+?) \|(?:[^|]*\|){5} (compute|memory) \|", r.stdout, re.M))
    assert bounds["lm_head matmul"] == "compute" and bounds["moe dispatch"] == "memory", bounds
    assert bounds["optimizer"] == "compute"  # Muon's Newton-Schulz products outweigh its memory traffic
    assert re.search(r"predicted MFU: [\d.]+%", r.stdout) and "MFU 40% needs" in r.stdout and "routing" in r.stdout


def test_help_and_errors():
    r = run("-h")
    assert r.returncode == 0 and "--bench" in r.stdout and "--gemm-eff" in r.stdout and "--preset" in r.stdout
    options = re.findall(r"^  (-[\w-]+)", r.stdout, re.M)
    assert len(options) >= 18, options
    for args, message in ((["-m", "d13"], "-m: unknown model 'd13'"),
                          (["--preset", "d12-xx"], "--preset: unknown preset 'd12-xx'"),
                          (["--mem-eff", "1.5"], "--mem-eff: 1.5 is not a fraction"),
                          (["-d", "1000"], "-d: 1000 tokens per step is not a multiple"),
                          (["-e", "2", "-k", "3"], "-k: 3 experts per token"),
                          (["--bench", "/nonexistent/x"], "--bench: cannot read /nonexistent/x")):
        r = run(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


if __name__ == "__main__":
    main(globals())
