"""test/test_sweep.py: dev/sweep.py, the sweep of the routers, run as a user runs it, with a stand-in for train_et.

The stand-in (this file run with --fake-train, behind a small shell script)
takes train_et's flags, records its argv, and writes what train_et writes:
train.jsonl (the run record, then training records with routing statistics,
validations, CORE records with -ce) and checkpoints, with losses and
seconds from tables here: each config's final validation CE per seed from
FAKE_CE, its seconds per step, validation, checkpoint and CORE evaluation
from constants, so that the budget's arithmetic can be checked exactly. It
refuses what train_et refuses (-y 1 without a checkpoint, a fresh run over
checkpoints) and fails a run on request (FAKE_FAIL).

Checked: the runs a sweep makes (every config and seed, seed by seed, the
flags of each); the steps a --budget chooses and why; resuming a cut-short
sweep (finished runs skipped, runs with checkpoints continued with -y 1,
the rest started, a run without its final CORE continued); a sweep keeping
its settings (a rerun that changes one is refused; more --seeds add runs);
a failed run stopping the sweep with its error, and the sweep continuing
after; bad options and malformed logs named in one error line; and, on logs
written here, the table (mean +- half-range, partial CORE, a missing run)
and the verdicts on the paper's ordering: one set where it holds, one where
it fails and is unclear, one it cannot judge. The tests that run a sweep
need matplotlib (the sweep draws loss.png) and skip without it.
test/gpu_test_sweep.py runs the sweep with the real train_et.
"""
import atexit
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

from harness import REPO, Skip, main

SCRIPT = os.path.join(REPO, "dev", "sweep.py")
WORK = tempfile.mkdtemp(prefix="train_et_sweep_")
atexit.register(shutil.rmtree, WORK, ignore_errors=True)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONFIGS = ["dense", "tc_aux", "tc_lossfree", "ec", "et"]
FLAGS = {"dense": ["-e", "0"], "tc_aux": ["-r", "tc", "-tb", "aux"], "tc_lossfree": ["-r", "tc", "-tb", "lossfree"],
         "ec": ["-r", "ec"], "et": ["-r", "et"]}
# the stand-in's seconds: per step (the first of a process also warms up), per validation, checkpoint, CORE
STEP_S = {"dense": 0.5, "tc_aux": 0.6, "tc_lossfree": 0.6, "ec": 0.6, "et": 0.6}
WARMUP_S, VAL_S, CKPT_S, CORE_S = 3.0, 2.0, 1.0, 5.0
TOKENS_PER_STEP = 4096
TASKS = ["hellaswag", "arc_easy", "piqa", "winograd"]
HOLDS = {"dense": [3.60, 3.62], "tc_aux": [3.50, 3.52], "tc_lossfree": [3.49, 3.51], "ec": [3.40, 3.42],
         "et": [3.41, 3.43]}
CORE = {"dense": [0.10, 0.12], "tc_aux": [0.13, 0.14], "tc_lossfree": [0.13, None], "ec": [0.16, 0.17],
        "et": [None, 0.17]}


# -----------------------------------------------------------------------------
# What train_et writes


def config_of(flags):
    if flags.get("-e") == "0":
        return "dense"
    return {"tc": f"tc_{flags.get('-tb', 'aux')}", "ec": "ec", "et": "et"}[flags.get("-r", "et")]


def run_record(argv, flags, steps, resumed_from):
    settings = {"-i": flags.get("-i", "synthetic"), "-o": flags["-o"], "-y": int(flags.get("-y", 0)),
                "-n": int(flags.get("-n", 1000)), "-m": flags.get("-m", "d12"), "-e": int(flags.get("-e", 16)),
                "-r": flags.get("-r", "et"), "-k": 1, "-tb": flags.get("-tb", "aux"), "-x": steps,
                "-v": int(flags.get("-v", 250)), "-cv": int(flags.get("-cv", 0)), "-li": int(flags.get("-li", 10)),
                "-sd": int(flags.get("-sd", 1337))}
    experts = settings["-e"]
    return {"run": {"command": " ".join(argv), "argv": argv, "start_time": "2026-01-01T00:00:00Z",
                    "resumed_from_step": resumed_from, "settings": settings,
                    "model": {"layers": 2, "width": 64, "heads": 2, "vocab": 1024, "experts": experts,
                              "moe_layers": 1 if experts else 0},
                    "batch": {"tokens_per_step": TOKENS_PER_STEP, "micro_steps": 1, "steps": steps},
                    "params": {"total": 1e6, "active": 5e5, "active_matmul": 4e5}, "precision": "bf16",
                    "gpu": "NVIDIA H200"}}


def moe_stats(step):
    counts = [300 + 10 * e + step % 7 for e in range(4)]
    return [{"layer": 1, "usage_min": 0.24, "usage_max": 0.26, "usage_cv": 0.03, "fanout_mean": 1.0,
             "fanout_hist": [0.1, 0.8, 0.08, 0.02], "clamped": 0, "aux_loss": 0.0, "cutoff_dev": None,
             "counts": counts}]


def write_run(out, argv, flags, ce, core=None, missing=(), start=0, stop=None):
    """Appends (from a checkpoint at `start`) or writes anew the train.jsonl of a run
    as train_et's loop does, with checkpoints; ends at `stop` (a run killed there) or
    with the final validation (val loss `ce`) and, with -ce, the final CORE (`core`)."""
    steps, config = int(flags["-x"]), config_of(flags)
    v, n, li = int(flags.get("-v", 250)), int(flags.get("-n", 1000)), int(flags.get("-li", 10))
    cv = int(flags.get("-cv", 0))
    step_s = STEP_S[config]
    os.makedirs(out, exist_ok=True)
    records = [run_record(argv, flags, steps, start if start else None)]
    t = start * step_s

    def evaluate(step, val_loss, validate=True):
        nonlocal t
        if validate:
            t += VAL_S
            records.append({"step": step, "val_loss": round(val_loss, 6), "tokens": step * TOKENS_PER_STEP,
                            "elapsed_s": round(t, 3)})
        if "-ce" in flags and (step == steps or (cv and step > 0 and step % cv == 0)):  # as train_et scores CORE
            t += CORE_S
            records.append({"step": step, "core": core, "core_partial": bool(missing), "core_missing": list(missing),
                            "core_tasks": {task: {"accuracy": 0.5, "centered": 0.1, "examples": 30}
                                           for task in TASKS if task not in missing},
                            "core_seconds": CORE_S, "tokens": step * TOKENS_PER_STEP, "elapsed_s": round(t, 3)})

    def loss(step):
        return ce - 0.01 + 4 * math.exp(-5 * step / steps)

    for step in range(start, steps if stop is None else stop):
        if step % v == 0 or (cv and step > 0 and step % cv == 0):
            evaluate(step, loss(step) + 0.02, step % v == 0)
        seconds = step_s + (WARMUP_S if step == start else 0)
        t += seconds
        done = step + 1
        checkpoint = done == steps or (n and done % n == 0)
        if done % li == 0 or done == 1 or done == steps or checkpoint:
            rec = {"step": done, "loss": round(loss(done), 6), "lr": 6e-4, "grad_norm": 0.9,
                   "step_ms": seconds * 1e3, "tokens_per_s": TOKENS_PER_STEP / seconds, "mfu": 0.3,
                   "tokens": done * TOKENS_PER_STEP, "elapsed_s": round(t, 3)}
            if config != "dense":
                rec.update(routing="et" if config == "et" and done > steps // 5 else config.split("_")[0],
                           moe=moe_stats(done))
            records.append(rec)
        if checkpoint:
            t += CKPT_S
            with open(os.path.join(out, f"ckpt_{done:010d}.bin"), "wb") as f:
                f.write(b"checkpoint")
    if stop is None:
        evaluate(steps, ce)
    with open(os.path.join(out, "train.jsonl"), "a" if start else "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def fake_train(argv):
    """The stand-in for train_et: records its argv, then runs as write_run says."""
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps(argv) + "\n")
    flags = dict(zip(argv[0::2], argv[1::2]))
    out, seed, config = flags["-o"], int(flags["-sd"]), config_of(flags)
    if os.environ.get("FAKE_FAIL") == os.path.basename(out):
        print("error: loss nan, gradient norm nan at step 7: training diverged", file=sys.stderr)
        return 1
    checkpoints = sorted(glob.glob(os.path.join(out, "ckpt_*.bin")))
    if flags.get("-y") == "1" and not checkpoints:
        print(f"error: -y 1: no checkpoint (ckpt_*.bin) in {out} to resume from", file=sys.stderr)
        return 1
    if flags.get("-y") != "1" and checkpoints:
        print(f"error: -o: {out} holds checkpoints of an earlier run: resume it with -y 1", file=sys.stderr)
        return 1
    start = int(re.search(r"(\d+)\.bin$", checkpoints[-1]).group(1)) if flags.get("-y") == "1" else 0
    ce = json.loads(os.environ["FAKE_CE"])[config][seed - 1] if "FAKE_CE" in os.environ else 3.0 + seed / 100
    core = json.loads(os.environ.get("FAKE_CORE", "null"))
    write_run(out, ["./train_et", *argv], flags, ce, core[config][seed - 1] if core else 0.15, start=start,
              missing=json.loads(os.environ.get("FAKE_CORE_MISSING", "[]")))
    return 0


# -----------------------------------------------------------------------------
# Running the sweep


def fake_binary():
    path = os.path.join(WORK, "fake_train_et")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\nexec '{sys.executable}' '{os.path.abspath(__file__)}' --fake-train \"$@\"\n")
        os.chmod(path, 0o755)
    return path


def sweep(*args, fake=None, cwd=WORK):
    """Runs dev/sweep.py with the stand-in as train_et; returns (result, the stand-in's calls)."""
    calls = os.path.join(WORK, "calls.jsonl")
    if os.path.exists(calls):
        os.remove(calls)
    env = dict(os.environ, FAKE_CALLS=calls,
               **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (fake or {}).items()})
    r = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    made = [json.loads(line) for line in open(calls)] if os.path.exists(calls) else []
    return r, made


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    return r.stdout


def need_matplotlib():
    if importlib.util.find_spec("matplotlib") is None:
        raise Skip("matplotlib is not installed", "pip install -r dev/requirements.txt")


def new_dir(name):
    path = os.path.join(WORK, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


def check_png(path):
    assert os.path.isfile(path), f"{path} was not written"
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, f"{path} is not a PNG of a plot"


def flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def table_row(text, label):
    rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 1, f"no one row for {label} in:\n{text}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def verdicts(text):
    """{check: verdict} from sweep.md's list."""
    return {m.group(2): m.group(1) for m in re.finditer(r"^- \*\*([a-z ]+)\*\*: ([^:]+):", text, re.M)}


# -----------------------------------------------------------------------------
# Recorded logs: gathering and judging (--report)


def recorded_sweep(name, ce, core=None, flags=(), skip=(), stop=None, missing=None):
    """A sweep dir as the sweep leaves it (sweep.json and the runs' logs), written here; `skip`
    lists runs (config, seed) not there at all, `stop` runs cut off at that step, `missing`
    the CORE tasks a config's bundle lacked."""
    d = new_dir(name)
    steps = 200
    os.makedirs(d)
    plan = {"version": 1, "command": "python3 dev/sweep.py recorded", "model": "d6", "experts": 8, "batch": None,
            "seq_len": None, "total_batch": None, "train_et_flags": list(flags), "steps": steps, "seeds": 2,
            "budget_s": None, "timing": None}
    with open(os.path.join(d, "sweep.json"), "w") as f:
        json.dump(plan, f)
    for config in CONFIGS:
        for seed in (1, 2):
            if (config, seed) in skip:
                continue
            out = os.path.join(d, f"{config}_seed{seed}")
            argv = ["-m", "d6", *FLAGS[config], *flags, "-sd", str(seed), "-x", str(steps), "-o", out, "-v", "50"]
            if config != "dense":
                argv[2:2] = ["-e", "8"]
            write_run(out, ["./train_et", *argv], dict(zip(argv[0::2], argv[1::2])), ce[config][seed - 1],
                      core[config][seed - 1] if core else None, (missing or {}).get(config, ()),
                      stop=(stop or {}).get((config, seed)))
    return d


def test_ordering_holds():
    need_matplotlib()
    d = recorded_sweep("holds", HOLDS)
    text = ok(sweep(d, "--report")[0])
    md = open(os.path.join(d, "sweep.md")).read()
    assert text.startswith(md), "the table printed is not sweep.md"
    assert table_row(md, "dense")[:6] == ["dense", "`-e 0`", "2/2", "3.6100 \u00b1 0.0100", "-", "3.6000, 3.6200"]
    assert table_row(md, "TC loss-free")[:4] == ["TC loss-free", "`-r tc -tb lossfree`", "2/2", "3.5000 \u00b1 0.0100"]
    assert table_row(md, "ET")[3] == "3.4200 \u00b1 0.0100", table_row(md, "ET")
    assert "mean over the finished seeds \u00b1 half their range" in md, md
    v = verdicts(md)
    assert v == {"dense worse than TC aux": "holds", "dense worse than TC loss-free": "holds",
                 "TC aux worse than EC": "holds", "TC aux worse than ET": "holds",
                 "TC loss-free worse than EC": "holds", "TC loss-free worse than ET": "holds",
                 "EC and ET level": "holds"}, v
    assert "- **holds**: dense worse than TC aux: val CE dense 3.6100 \u00b1 0.0100 vs TC aux 3.5100 \u00b1 0.0100: " \
           "every dense seed above every TC aux seed" in md, md
    assert "EC and ET level: val CE EC 3.4100 \u00b1 0.0100 vs ET 3.4200 \u00b1 0.0100: |difference| 0.0100 <= " \
           "0.0200" in md, md
    assert "**The paper's ordering holds: all 7 checks hold.**" in md, md
    assert text.endswith(f"wrote {d}/sweep.md\nwrote {d}/loss.png\n"), text[-300:]
    check_png(os.path.join(d, "loss.png"))


def test_ordering_fails_or_is_unclear():
    need_matplotlib()
    ce = dict(HOLDS, dense=[3.45, 3.46], tc_aux=[3.41, 3.45], et=[3.30, 3.31])
    d = recorded_sweep("fails", ce)
    md = ok(sweep(d, "--report")[0])
    v = verdicts(md)
    assert v["dense worse than TC aux"] == "unclear", v  # 3.455 > 3.43, but 3.45 is inside TC aux's range
    assert v["dense worse than TC loss-free"] == "fails", v  # 3.455 < 3.50
    assert v["TC aux worse than EC"] == "unclear", v
    assert v["TC aux worse than ET"] == "holds", v
    assert v["EC and ET level"] == "fails", v
    assert "EC and ET level: val CE EC 3.4100 \u00b1 0.0100 vs ET 3.3050 \u00b1 0.0050: |difference| 0.1050 > " \
           "0.0150, the sum of the half-ranges: the seed ranges are apart" in md, md
    assert "dense worse than TC loss-free: val CE dense 3.4550 \u00b1 0.0050 vs TC loss-free 3.5000 \u00b1 0.0100: " \
           "dense's mean is not the higher" in md, md
    assert "**The paper's ordering does not hold: 2 of 7 checks fail.**" in md, md
    ce = dict(HOLDS, tc_aux=[3.41, 3.45])  # only unclear
    md = ok(sweep(recorded_sweep("unclear", ce), "--report")[0])
    assert "**The paper's ordering is not settled (more seeds or longer runs would tell): 2 of 7 checks are " \
           "unclear.**" in md, md


def test_partial_core_and_missing_runs():
    need_matplotlib()
    d = recorded_sweep("partial", HOLDS, core=CORE, flags=["-ce", "core.bin"], skip=[("et", 2)],
                       stop={("ec", 2): 120}, missing={"tc_aux": ["piqa", "winograd"], "tc_lossfree": ["piqa"]})
    md = ok(sweep(d, "--report")[0])
    row = table_row(md, "dense")
    assert row[2:5] == ["2/2", "3.6100 \u00b1 0.0100", "0.1100 \u00b1 0.0100"], row
    assert table_row(md, "TC aux")[4] == "0.1350 \u00b1 0.0050 (partial)", table_row(md, "TC aux")
    assert "TC aux: partial CORE, over the tasks the bundle has; missing: piqa, winograd." in md, md
    assert "TC loss-free: partial CORE, over the tasks the bundle has; missing: piqa." in md, md
    row = table_row(md, "TC loss-free")
    assert row[4] == "0.1300 \u00b1 0.0000 (1 of 2 seeds) (partial)", row
    assert table_row(md, "EC")[2:6] == ["1/2", "3.4000 \u00b1 0.0000", "0.1600 \u00b1 0.0000", "3.4000"], \
        table_row(md, "EC")  # seed 2 stopped at step 120 of 200: not finished
    assert table_row(md, "ET")[2:5] == ["1/2", "3.4100 \u00b1 0.0000", "-"], table_row(md, "ET")  # CORE null
    v = verdicts(md)
    assert v["dense worse than TC aux"] == "holds" and v["TC aux worse than EC"] == "cannot judge", v
    assert "- **cannot judge**: EC and ET level: EC has 1 finished seed, ET has 1 finished seed (2 needed)" in md, md
    assert "**The paper's ordering cannot be judged yet: 5 of 7 checks cannot be judged.**" in md, md
    check_png(os.path.join(d, "loss.png"))


# -----------------------------------------------------------------------------
# Running sweeps with the stand-in


def test_runs_every_config_and_seed():
    need_matplotlib()
    d = new_dir("runs")
    r, calls = sweep(d, "--model", "d6", "--experts", "8", "--batch", "8", "--seq-len", "256", "--total-batch",
                       "4096", "--steps", "30", "--seeds", "3", "--train", fake_binary(), "--", "-i", "synthetic",
                       "-v", "10", "-opt", "muon", fake={"FAKE_CE": {c: [3.0, 3.1, 3.2] for c in CONFIGS}})
    text = ok(r)
    assert len(calls) == 15, [flag(c, "-o") for c in calls]
    expected = [(config, seed) for seed in (1, 2, 3) for config in CONFIGS]  # seed by seed
    for argv, (config, seed) in zip(calls, expected):
        assert flag(argv, "-o") == os.path.join(d, f"{config}_seed{seed}"), argv
        size = ["-m", "d6"] + (["-e", "8"] if config != "dense" else []) + ["-b", "8", "-t", "256", "-d", "4096"]
        assert argv == [*size, *FLAGS[config], "-i", "synthetic", "-v", "10", "-opt", "muon", "-sd", str(seed), "-x",
                        "30", "-o", flag(argv, "-o")], argv
    assert "15 runs of 30 steps: 0 done, 0 to resume, 15 to start" in text, text
    assert f"[1/15] dense seed 1: start (console: {d}/dense_seed1/train.log)" in text, text
    assert re.search(r"\[1/15\] dense seed 1: done in \d+s, val loss 3\.0000 \| 14 more to run, ETA \d+s", text), text
    assert re.search(r"\[15/15\] et seed 3: done in \d+s, val loss 3\.2000 \| 0 more to run\n", text), text
    assert table_row(text, "EC")[2:4] == ["3/3", "3.1000 \u00b1 0.1000"], table_row(text, "EC")
    assert "--model d6, --experts 8, --batch 8, --seq-len 256, --total-batch 4096; 30 steps of 4,096 tokens per " \
           "run; seeds 1 to 3; train_et flags: `-i synthetic -v 10 -opt muon`" in text, text
    check_png(os.path.join(d, "loss.png"))
    r, calls = sweep(d, "--train", fake_binary())  # all done: nothing runs, the table again
    assert "15 runs of 30 steps: 15 done, 0 to resume, 0 to start" in ok(r) and calls == [], r.stdout


def test_resumes_a_cut_short_sweep():
    need_matplotlib()
    d = new_dir("resume")
    args = [d, "--steps", "40", "--train", fake_binary(), "--", "-v", "10", "-n", "10", "-ce", "core.bin"]
    r, calls = sweep(*args)
    assert len(calls) == 10, ok(r)

    def cut(run, keep_until, checkpoints_from):
        """As if the run had died: its log up to a step, its checkpoints from a step on gone."""
        path = os.path.join(d, run, "train.jsonl")
        kept = [line for line in open(path) if json.loads(line).get("step", 0) <= keep_until]
        open(path, "w").writelines(kept)
        for ckpt in glob.glob(os.path.join(d, run, "ckpt_*.bin")):
            if int(re.search(r"(\d+)\.bin$", ckpt).group(1)) >= checkpoints_from:
                os.remove(ckpt)

    cut("et_seed1", 33, 40)  # died after step 33: resumes from step 30
    path = os.path.join(d, "tc_aux_seed2", "train.jsonl")  # died in its final CORE evaluation: resumes from 40
    lines = open(path).readlines()
    assert '"core"' in lines[-1], lines[-1]
    open(path, "w").writelines(lines[:-1])
    cut("ec_seed2", 8, 0)  # died before its first checkpoint: starts again
    shutil.rmtree(os.path.join(d, "dense_seed1"))  # never started
    r, calls = sweep(*args)
    text = ok(r)
    assert "10 runs of 40 steps: 6 done, 2 to resume (et seed 1 from step 30, tc_aux seed 2 from step 40), 2 to " \
           "start" in text, text
    made = [(os.path.basename(flag(argv, "-o")), flag(argv, "-y")) for argv in calls]
    assert made == [("dense_seed1", None), ("et_seed1", "1"), ("tc_aux_seed2", "1"), ("ec_seed2", None)], made
    assert "[8/10] et seed 1: resume from step 30" in text and "[9/10] tc_aux seed 2: resume from step 40" in text
    for label in ("dense", "TC aux", "EC", "ET"):
        assert table_row(text, label)[2] == "2/2", table_row(text, label)


def test_budget_chooses_the_steps():
    need_matplotlib()
    d = new_dir("budget")
    args = [d, "--budget", "2h", "--timing-steps", "5", "--train", fake_binary(), "--", "-v", "50", "-n", "100", "-ce",
            "core.bin", "-cv", "30", "-li", "20"]
    r, calls = sweep(*args)
    text = ok(r)
    timing, runs = calls[:5], calls[5:]
    for argv, config in zip(timing, CONFIGS):
        assert argv == [*FLAGS[config], "-v", "50", "-n", "100", "-ce", "core.bin", "-cv", "30", "-li", "1", "-sd", "1",
                        "-x", "5",
                        "-o", os.path.join(d, "timing", config)], argv
    assert not glob.glob(os.path.join(d, "timing", "*", "ckpt_*.bin")), "the timing runs' checkpoints were kept"

    def cost(steps):  # what the stand-in's runs take: 2 seeds of each config
        evals = (math.ceil(steps / 50) + 1) * VAL_S + ((steps - 1) // 30 + 1) * CORE_S  # -cv 30
        return 2 * sum(steps * STEP_S[c] + evals + math.ceil(steps / 100) * CKPT_S for c in CONFIGS)

    steps = int(flag(runs[0], "-x"))
    assert cost(steps) <= 0.95 * 7200 and cost(steps + 1) > 0.95 * (7200 - 30), f"{steps} steps: {cost(steps)} s"
    assert len(runs) == 10 and all(flag(argv, "-x") == str(steps) for argv in runs), runs
    assert "  dense        start-up 0.00 s, step 500.0 ms, validation 2.00 s (every 50 steps and at the end), CORE " \
           "5.00 s (every 30 steps and at the end), checkpoint 1.00 s (every 100 steps and at the end)" in text, text
    assert "  et           start-up 0.00 s, step 600.0 ms," in text, text
    assert re.search(rf"chose {steps} steps \({steps * TOKENS_PER_STEP:,} tokens per run\): 10 runs in about "
                     rf"1h 5\dm, the most that fit in 1h 59m less a 5% margin", text), text
    with open(os.path.join(d, "sweep.json")) as f:
        plan = json.load(f)
    assert plan["steps"] == steps and plan["timing"]["ec"]["step_s"] == 0.6, plan
    shutil.rmtree(os.path.join(d, "et_seed2"))
    r, calls = sweep(*args)  # the steps it chose stay: no timing again
    text = ok(r)
    assert f"{steps} steps per run, as this sweep chose at its start ({d}/sweep.json)" in text, text
    assert [os.path.basename(flag(argv, "-o")) for argv in calls] == ["et_seed2"], calls


def test_a_failed_run_stops_the_sweep():
    need_matplotlib()
    d = new_dir("failed")
    args = [d, "--steps", "20", "--train", fake_binary(), "--", "-i", "synthetic"]
    r, calls = sweep(*args, fake={"FAKE_FAIL": "ec_seed1"})
    assert r.returncode == 1 and len(calls) == 4, (r.returncode, calls)
    command = f"{fake_binary()} -r ec -i synthetic -sd 1 -x 20 -o {d}/ec_seed1"
    assert r.stderr == f"error: {command} exited with status 1: error: loss nan, gradient norm nan at step 7: " \
                       f"training diverged (its console: {d}/ec_seed1/train.log); fix it and rerun the sweep: it " \
                       f"resumes\n", r.stderr
    r, calls = sweep(*args)
    assert "10 runs of 20 steps: 3 done, 0 to resume, 7 to start" in ok(r), r.stdout
    assert len(calls) == 7 and flag(calls[0], "-o").endswith("ec_seed1"), calls


def assert_one_error(r, want):
    assert r.returncode != 0, f"exit {r.returncode}: {r.stdout}"
    assert r.stderr.count("\n") == 1 and want in r.stderr, f"stderr {r.stderr!r}, want {want!r}"


def test_malformed_logs_are_named():
    need_matplotlib()
    d = recorded_sweep("malformed", HOLDS, core=CORE, flags=["-ce", "core.bin"])
    path = os.path.join(d, "ec_seed1", "train.jsonl")
    lines = open(path).readlines()
    open(path, "w").writelines(lines[:2] + ['{"step": 1, "loss": 3.1,\n'] + lines[2:])
    assert_one_error(sweep(d, "--report")[0], f"error: {path}:3: bad JSON: ")
    core = next(i for i, line in enumerate(lines) if '"core"' in line)
    bad = lines[:core] + [lines[core].replace('"core_partial": false, ', "")] + lines[core + 1:]
    open(path, "w").writelines(bad)
    assert_one_error(sweep(d, "--report")[0], f"error: {path}:{core + 1}: a CORE record without \"core_partial\"")
    open(path, "w").writelines(lines + ['{"step": 210, "loss": 3.0, "lr"'])  # a line still being written: left out
    r = sweep(d, "--report")[0]
    assert f"warning: {path}:{len(lines) + 1}: incomplete last line skipped" in r.stderr, r.stderr
    assert table_row(ok(r), "EC")[2:4] == ["2/2", "3.4100 \u00b1 0.0100"], table_row(r.stdout, "EC")


def test_bad_options_name_the_fix():
    d = new_dir("errors")
    train = ["--train", fake_binary()]
    for args, want in [
        ([d, "--steps", "10", *train, "--", "-e", "8"], "error: -e after --: use --experts"),
        ([d, "--steps", "10", *train, "--", "-r", "et"], "error: -r after --: each config sets its router"),
        ([d, "--steps", "10", *train, "--", "-x", "5"], "error: -x after --: use --steps or --budget"),
        ([d, "--steps", "10", *train, "--", "-v", "0"], "error: -v 0 after --: the sweep compares the final "
                                                         "validation loss"),
        ([d, "--steps", "10", *train, "--", "-i"], "error: -i after --: no value"),
        ([d, "--steps", "10", *train, "--", "synthetic"], "error: 'synthetic' after --: not a train_et flag"),
        ([d, *train], f"error: {d} holds no sweep yet: give --steps N or --budget TIME"),
        ([d, "--steps", "10", "--train", "nowhere/train_et"],
         "error: --train nowhere/train_et: no such program (build it: make train_et, or give --train PATH)"),
        ([d, "--report"], f"error: {d}: no sweep.json: not a sweep dir (run the sweep first)"),
    ]:
        assert_one_error(sweep(*args)[0], want)
    assert not os.path.exists(d), "an error left a sweep dir behind"
    for args, want in [  # argparse's: the usage line, then the error
        ([d, "--steps", "10", "--seeds", "1"], "--seeds: 1 is fewer than 2: the seed spread needs at least 2"),
        ([d, "--budget", "3 hours"], "--budget: '3 hours' is not a duration (say 3h, 90m, 1h30m, 45s)"),
        ([d, "--steps", "10", "--budget", "1h"], "--budget: not allowed with argument --steps"),
    ]:
        r = sweep(*args)[0]
        assert r.returncode == 2 and want in r.stderr, r.stderr


def test_a_sweep_keeps_its_settings():
    need_matplotlib()
    d, train = new_dir("settings"), ["--train", fake_binary()]
    ok(sweep(d, "--model", "d6", "--steps", "10", *train, "--", "-i", "synthetic")[0])
    for args, want in [
        ([d, "--model", "d8", *train, "--", "-i", "synthetic"],
         f"error: --model d8: this sweep's runs have --model d6 ({d}/sweep.json); rerun with the same settings"),
        ([d, "--model", "d6", "--steps", "20", *train, "--", "-i", "synthetic"],
         f"error: --steps 20: this sweep's runs have 10 steps ({d}/sweep.json); rerun with --steps 10 or without it"),
        ([d, "--model", "d6", *train, "--", "-i", "other"],
         f"error: train_et flags after -- differ from this sweep's ({d}/sweep.json: -i synthetic)"),
    ]:
        assert_one_error(sweep(*args)[0], want)
    r, calls = sweep(d, "--seeds", "3", *train)  # more seeds: the same runs, and the new seed's
    assert "15 runs of 10 steps: 10 done, 0 to resume, 5 to start" in ok(r), r.stdout
    assert [flag(argv, "-sd") for argv in calls] == ["3"] * 5 and flag(calls[0], "-m") == "d6", calls


def test_durations():
    spec = importlib.util.spec_from_file_location("sweep_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert [script.duration(t) for t in ("3h", "90m", "1h30m", "45s", "600", "1.5h")] == \
           [10800, 5400, 5400, 45, 600, 5400]
    assert [script.hms(s) for s in (12, 185, 3720)] == ["12s", "3m 05s", "1h 02m"]


def test_help_describes_every_option():
    r = sweep("-h")[0]
    assert r.returncode == 0, r.stderr
    for option in ["SWEEP_DIR", "--model NAME", "--experts N", "--batch N", "--seq-len N", "--total-batch N",
                   "--steps N", "--budget TIME", "--seeds N", "--timing-steps N", "--train PATH", "--report",
                   "--ymax LOSS", "-- TRAIN_ET_FLAGS"]:
        assert option in r.stdout, f"-h does not list {option}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fake-train"]:
        sys.exit(fake_train(sys.argv[2:]))
    main(globals())
