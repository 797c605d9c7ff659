"""test/gpu_test_sweep.py: dev/sweep.py with the real train_et, a whole sweep at a tiny size.

A sweep of the five configs x 2 seeds on the synthetic corpus under a
--budget of 30 seconds (60 on a GPU, where each run's CUDA start-up costs
more): the timing runs read train_et's real logs (step_ms, elapsed_s, the
run record's -v, -n and tokens per step), the steps chosen are the ones
every run gets, every run ends with its final validation, and the table,
the verdicts and loss.png are written; the whole sweep takes no more than
twice its budget (the margin for a machine whose load changes between the
timing runs and the sweep). Then one run is cut back to its
second-to-last checkpoint, as if it had died: the sweep resumes it alone
(-y 1), and its final validation loss is the one it had, to the bit.
test/test_sweep.py checks the sweep's logic with a stand-in for train_et.

run_tests.sh runs it with ./train_et where a CUDA device exists, and else with
TRAIN_ET_EMULATED=1: build/emu/plain/train_et on the emulated device (test/emu),
at a quarter of the tokens per step.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from harness import REPO, main

EMULATED = os.environ.get("TRAIN_ET_EMULATED") == "1"
TRAIN_ET = os.path.join(REPO, "build/emu/plain/train_et" if EMULATED else "train_et")
SCRIPT = os.path.join(REPO, "dev", "sweep.py")
B, T = (2, 32) if EMULATED else (4, 64)
BUDGET_S = 30 if EMULATED else 60


def sweep(*args):
    r = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"dev/sweep.py exited {r.returncode}: {r.stderr.strip()}"
    return r.stdout


def final_val(out, steps):
    with open(os.path.join(out, "train.jsonl")) as f:
        vals = [rec for rec in map(json.loads, f) if "val_loss" in rec]
    assert vals and vals[-1]["step"] == steps, f"{out}: no final validation at step {steps}"
    return vals[-1]["val_loss"]


def test_sweep_at_a_tiny_size():
    assert os.path.exists(TRAIN_ET), f"{TRAIN_ET} is not built"
    with tempfile.TemporaryDirectory() as d:
        args = [d, "--model", "tiny", "--experts", "4", "--batch", str(B), "--seq-len", str(T), "--total-batch",
                str(B * T), "--train", TRAIN_ET]
        flags = ["--", "-i", "synthetic", "-sv", "1024", "-v", "4", "-vm", "1", "-s", "0", "-n", "1"]
        start = time.time()
        out = sweep(*args, "--budget", f"{BUDGET_S}s", "--timing-steps", "3", *flags)
        took = time.time() - start
        chosen = re.search(r"^chose (\d+) steps \(([\d,]+) tokens per run\)", out, re.M)
        assert chosen, out
        steps = int(chosen.group(1))
        assert steps >= 2 and int(chosen.group(2).replace(",", "")) == steps * B * T, out
        assert took <= 2 * BUDGET_S, f"the sweep took {took:.0f} s of a {BUDGET_S} s budget:\n{out}"
        with open(os.path.join(d, "sweep.md")) as f:
            md = f.read()
        rows = [line for line in md.splitlines() if re.match(r"\| (dense|TC aux|TC loss-free|EC|ET) \|", line)]
        assert len(rows) == 5 and all("| 2/2 |" in row for row in rows), md
        assert len(re.findall(r"^- \*\*(holds|unclear|fails)\*\*: ", md, re.M)) == 7, md
        assert os.path.getsize(os.path.join(d, "loss.png")) > 10_000, "no loss.png"
        run = os.path.join(d, "et_seed2")  # dies after its second-to-last checkpoint
        before = final_val(run, steps)
        os.remove(os.path.join(run, f"ckpt_{steps:010d}.bin"))
        with open(os.path.join(run, "train.jsonl")) as f:
            kept = [line for line in f if json.loads(line).get("step", 0) < steps]
        with open(os.path.join(run, "train.jsonl"), "w") as f:
            f.writelines(kept)
        out = sweep(d, "--train", TRAIN_ET)
        assert f"9 done, 1 to resume (et seed 2 from step {steps - 1}), 0 to start" in out, out
        assert final_val(run, steps) == before, f"resumed: {final_val(run, steps)}, before: {before}"


if __name__ == "__main__":
    main(globals())
