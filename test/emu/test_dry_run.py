"""test/emu/test_dry_run.py: training steps at the paper's sizes (d12, d20; B = 16, T = 2048,
16 experts; dense and each router), checked on the emulated device without running them.

build/emu/plain/dry_run runs the host side of two training steps with gradient
accumulation, an evaluation and a generation pass, CORE's batch shapes and the
routes of a sequence (test/emu/dry_run.cu) under
EMU_DRY_RUN=1: every launch configuration and cuBLAS call is checked as an H200
checks it, and device memory is only counted. Every preset (a row of the paper's
Tables 1 and 2, presets.h) is dry-run at its size too, and d20 as rank 0 of 8 ranks
(its shard of the optimizer state, its NCCL calls checked). Each run must pass every check,
route as its router does (ET: its EC warm-up, then thresholds), and leave in use
exactly the memory model_allocate counted, which is also the emulator's peak and
the estimate train_et prints before it touches the GPU (model_plan).
A model too big for the H200 must stop with the out-of-memory advice.
"""
import os
import re
import subprocess

from harness import REPO, main

DRY_RUN = os.path.join(REPO, "build/emu/plain/dry_run")
ENV = dict(os.environ, EMU_DRY_RUN="1")


def dry_run(*args):
    if not os.path.exists(DRY_RUN):
        raise AssertionError(f"{DRY_RUN} is not built (make build/emu/plain/dry_run)")
    return subprocess.run([DRY_RUN, *args], capture_output=True, text=True, env=ENV, timeout=600)


def check(preset, router, args=None):
    """Dry-runs -m preset with the router (or dense), or the given dry_run arguments; returns the plan's bytes."""
    args = args or ["-m", preset] + (["-e", "0"] if router == "dense" else ["-e", "16", "-r", router])
    r = dry_run(*args)
    assert r.returncode == 0 and "emu: error" not in r.stderr, f"{preset} {router}: exit {r.returncode}: {r.stderr[-1500:]}"
    estimate = int(re.search(r"^memory   estimate (\d+) bytes", r.stdout, re.M).group(1))
    plan = int(re.search(r"^memory   plan (\d+) bytes", r.stdout, re.M).group(1))
    in_use = int(re.search(r"^memory   in use after the steps: (\d+) bytes", r.stdout, re.M).group(1))
    report = re.search(r"emu: dry run: (\d+) launches of (\d+) kernels and (\d+) cuBLAS .* device memory peak (\d+) bytes",
                       r.stderr)
    assert report, f"{preset} {router}: no dry-run report from the emulator: {r.stderr[-500:]}"
    launches, kernels, gemms, peak = map(int, report.groups())
    assert estimate == plan == in_use == peak, \
        f"{preset} {router}: estimate {estimate}, plan {plan}, in use {in_use}, emulator's peak {peak} bytes"
    assert launches > 1000 and kernels >= 15 and gemms > 1000, f"{preset} {router}: {report.group(0)}"
    assert re.search(r"^core     6 batch shapes, from \d+ rows of 64 tokens to \d+ of 2048$", r.stdout, re.M), \
        f"{args}: CORE's batch shapes were not all run: {r.stdout[-600:]}"
    routed = re.findall(r"routed by (.+)$", r.stdout, re.M)
    want = {"dense": ["dense", "dense"], "tc": ["tc", "tc"], "ec": ["ec", "ec"], "et": ["ec (et warm-up)", "et"]}[router]
    assert routed == want, f"{preset} {router}: the steps were routed by {routed}, expected {want}"
    return plan


def test_d12_every_router():
    plans = {router: check("d12", router) for router in ("dense", "tc", "ec", "et")}
    assert plans["dense"] < plans["tc"] < plans["et"], f"memory plans: {plans}"


def test_d20_every_router():
    plans = {router: check("d20", router) for router in ("dense", "tc", "ec", "et")}
    assert max(plans.values()) < 141e9, f"d20 should fit an H200: {plans}"


def test_d20_on_eight_ranks():
    """Rank 0 of 8 (multi_gpu.cuh): an eighth of the AdamW moments and master weights; with -ep
    global every rank's logits, and buffers for the most pairs one rank can get of the global
    pool's selections."""
    for router, pool in (("dense", "micro"), ("tc", "micro"), ("et", "global")):
        args = ["-m", "d20", "-np", "8", "-ep", pool, "-d", "262144"]
        args += ["-e", "0"] if router == "dense" else ["-e", "16", "-r", router]
        plan = check("d20", router, args)
        assert plan < 141e9, f"d20 {router} at 8 ranks: {plan} bytes do not fit an H200"
    gib = {}
    for ranks in (1, 8):
        r = dry_run("-m", "d20", "-e", "16", "-r", "et", "-np", str(ranks), "-d", "262144")
        gib[ranks] = [float(x) for x in re.search(r"fp32 master ([\d.]+), gradients [\d.]+, AdamW ([\d.]+)\)",
                                                     r.stdout).groups()]
        assert (f"rank 0 of {ranks}" in r.stdout) == (ranks > 1), r.stdout[:600]
    for part, one, eighth in zip(("master", "AdamW"), gib[1], gib[8]):
        assert abs(eighth - one / 8) < 0.02, f"{part} GiB on 1 rank {one}, on rank 0 of 8 {eighth}"


def presets():
    """The preset names in presets.h (the table train_et and dry_run read)."""
    with open(os.path.join(REPO, "presets.h")) as f:
        return re.findall(r'^\s*\{"(d\d+-[\w-]+)", "Table', f.read(), re.M)


def test_every_preset_fits_an_h200():
    """Every row of the paper's tables, at its size, with Muon and the paper's 65,536-token vocab."""
    found = presets()
    assert len(found) == 13, f"presets.h has {sorted(found)}"
    for name in found:
        router = "dense" if name.endswith("dense") else name.split("-")[1]
        plan = check(name, router, ["-preset", name])
        assert plan < 141e9, f"{name}: {plan} bytes do not fit an H200"
    r = dry_run("-preset", "d12-ec-512k")
    assert "muon" in r.stdout and "B=128 x T=2048, 2 micro-steps" in r.stdout, r.stdout[:500]
    assert re.search(r"Muon scratch [\d.]+", r.stdout), r.stdout[:800]


def test_too_big_for_the_device_stops_with_advice():
    r = dry_run("-m", "d20", "-e", "64", "-r", "et")
    assert r.returncode == 1 and "error: out of GPU memory" in r.stderr and "smaller micro-batch (-b)" in r.stderr, \
        f"exit {r.returncode}: {r.stderr[-500:]}"


if __name__ == "__main__":
    main(globals())
