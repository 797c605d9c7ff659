"""test/test_plot_runs.py: dev/plot_runs.py, the plots of train_et runs, run as a user runs it.

Writes the train.jsonl of made-up runs in train_et's format: a dense one,
and an ET MoE one (3 MoE layers, 4 experts) that switches from its EC
warm-up to thresholds, has no cutoffs and a null cutoff_dev at its first
logged step, and was resumed from a checkpoint (steps logged twice, the
later records being the ones that count). Checks the PNGs (valid, of sane
size), the summary's numbers, the labels taken from the run records, the
loss against tokens and time, that the figures stay readable from 8 to 64
experts (bounded width and file size, the heatmap's labels), and that a
missing, empty or malformed log stops the script with one error line naming
the file (and the line). The plot tests skip without matplotlib; the error
tests need none.
"""
import atexit
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile

from harness import REPO, Skip, main, png_size

SCRIPT = os.path.join(REPO, "dev", "plot_runs.py")
WORK = tempfile.mkdtemp(prefix="train_et_plots_")
atexit.register(shutil.rmtree, WORK, ignore_errors=True)
LAYERS, EXPERTS, WARMUP = [1, 2, 3], 4, 60  # ET routes by EC through step 60


def plot_runs(*args, cwd=WORK):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def need_matplotlib():
    if importlib.util.find_spec("matplotlib") is None:
        raise Skip("matplotlib is not installed", "pip install -r dev/requirements.txt")


def write_log(path, records, tail=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)
    return path


# -----------------------------------------------------------------------------
# Two made-up runs, as train_et logs them: step 1, then every 10 steps; val every 50


LOGGED = [1] + list(range(10, 201, 10))
EVALS = list(range(0, 201, 50))


def loss_at(step, offset=0.0):
    return round(2.5 + 8 * math.exp(-step / 40) + offset, 6)


def train_record(step, loss):
    return {"step": step, "loss": loss, "lr": 6e-4, "grad_norm": 0.9, "step_ms": 120.0, "tokens_per_s": 4.3e6,
            "mfu": 0.31, "tokens": step * 524288, "elapsed_s": step * 0.12}


def val_record(step, loss):
    return {"step": step, "val_loss": loss, "tokens": step * 524288, "elapsed_s": step * 0.12}


def run_record(router, experts, top_k=1, **more):
    """A run record as train_et writes it (the parts plot_runs reads, and a few others)."""
    settings = {"-i": "synthetic", "-o": "log_et", "-y": 0, "-m": "d12", "-e": experts, "-r": router, "-k": top_k,
                "-l": 0.0006, "-b": 16, "-sd": 1337, **more}
    return {"run": {"command": "./train_et", "settings": settings, "start_time": "2026-01-01T00:00:00Z"}}


def dense_run():
    records = [val_record(0, loss_at(0, 0.1))]
    for step in LOGGED:
        records.append(train_record(step, loss_at(step)))
        if step % 50 == 0:  # train_et evaluates before the next step, and once more after the last
            records.append(val_record(step, loss_at(step, 0.1)))
    records[3]["grad_norm"] = None  # not finite
    return records


def moe_layer(layer, step, rng, experts=EXPERTS):
    """One layer's routing statistics at a step; layer 3's expert 3 is starving."""
    counts = [int(1024 * (1 + 0.3 * rng.uniform(-1, 1))) for _ in range(experts)]
    if layer == 3:
        counts[3] = 20
    total = sum(counts)
    shares = [c / total for c in counts]
    m = total / experts
    cv = math.sqrt(sum((c - m) ** 2 for c in counts) / experts) / m
    hist = [0.3, 0.45, 0.2, 0.05] if step <= WARMUP else [0.1, 0.8, 0.08, 0.02]
    rec = {"layer": layer, "usage_min": round(min(shares), 6), "usage_max": round(max(shares), 6),
           "usage_cv": round(cv, 6), "fanout_mean": round(hist[1] + 2 * hist[2] + 3 * hist[3] + 0.01 * layer, 6),
           "fanout_hist": hist, "clamped": 2 if step > WARMUP else 0, "aux_loss": 0.0, "cutoff_dev": None}
    batch = [round(0.5 + 0.1 * e + 2 * math.exp(-step / 30) + 0.05 * rng.uniform(-1, 1), 6) for e in range(experts)]
    if step > 1:  # no tracked cutoff before the first update
        rec["cutoff"] = [round(b + 0.03, 6) for b in batch]
        rec["cutoff_dev"] = 0.03
    rec["batch_cutoff"] = batch
    rec["counts"] = counts
    return rec


def et_run(layers=LAYERS, experts=EXPERTS):
    """Logged to step 170, resumed from the checkpoint at step 100 (which logs
    the evaluation at 100 again), on to 200. The first attempt's records past
    step 100 have losses 1.0 lower, which the summary must not see."""
    rng = random.Random(1)

    def segment(first, last, offset):
        out = []
        for step in [s for s in LOGGED if first <= s <= last]:
            rec = train_record(step, loss_at(step, offset))
            rec["routing"] = "ec (et warm-up)" if step <= WARMUP else "et"
            rec["moe"] = [moe_layer(layer, step, rng, experts) for layer in layers]
            out.append(rec)
            if step in EVALS:
                out.append(val_record(step, loss_at(step, 0.05 + offset)))
        return out

    return [val_record(0, loss_at(0, 0.05))] + segment(1, 100, 0.0) + segment(110, 170, -1.0) + \
        [val_record(100, loss_at(100, 0.05))] + segment(110, 200, 0.0)


def expected_summary(label, records):
    """The summary line, from the records that count: a step's last."""
    train, val = {}, {}
    for r in records:
        (val if "val_loss" in r else train)[r["step"]] = r
    last = train[max(train)]
    best = min((r["val_loss"], s) for s, r in val.items())
    line = f"{label}: last step {last['step']} | loss {last['loss']:.4f} | best val {best[0]:.4f} (step {best[1]}) | "
    if "moe" not in last:
        return line + "fanout mean - | usage cv - | dense"
    fanout = sum(m["fanout_mean"] for m in last["moe"]) / len(LAYERS)
    cv = sum(m["usage_cv"] for m in last["moe"]) / len(LAYERS)
    return line + f"fanout mean {fanout:.3f} | usage cv {cv:.3f} | routing et"


def check_png(path, max_width=6000, max_bytes=None):
    width, height, size = png_size(path)
    assert 400 <= width <= max_width and 300 <= height <= 6000, f"{path}: {width} x {height} pixels"
    assert size > 10_000, f"{path}: {size} bytes, too small for a plot"
    assert max_bytes is None or size <= max_bytes, f"{path}: {size} bytes, more than {max_bytes}"


# -----------------------------------------------------------------------------


def test_plots_and_summary():
    need_matplotlib()
    dense, et = dense_run(), et_run()
    write_log(os.path.join(WORK, "log_dense", "train.jsonl"), dense)
    et_file = write_log(os.path.join(WORK, "runs", "et", "train.jsonl"), et)
    out = os.path.join(WORK, "two_runs")
    r = plot_runs("log_dense", f"{et_file}:ET 16x", "-o", out, "--last", "5")
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    lines = r.stdout.splitlines()
    assert lines[0] == expected_summary("log_dense", dense), f"dense summary: {lines[0]!r}"
    assert lines[1] == expected_summary("ET 16x", et), f"ET summary: {lines[1]!r} != {expected_summary('ET 16x', et)!r}"
    pngs = ["loss.png", "fanout.png", "ET_16x_usage.png", "ET_16x_cutoffs.png"]
    assert sorted(os.listdir(out)) == sorted(pngs), f"wrote {sorted(os.listdir(out))}"
    assert lines[2:] == [f"wrote {os.path.join(out, p)}" for p in pngs], r.stdout
    for p in pngs:
        check_png(os.path.join(out, p))


def test_dense_only_and_default_out_dir():
    need_matplotlib()
    with tempfile.TemporaryDirectory(dir=WORK) as d:
        # with the CORE and routes records a run with -ce and -rf writes at its end: they plot nothing here
        extra = [{"step": 200, "core": 0.05, "core_partial": True, "core_missing": ["squad"],
                  "core_tasks": {"copa": {"accuracy": 0.5, "centered": 0.0, "examples": 30}}, "core_seconds": 1.5},
                 {"step": 200, "routes": "routes_000200.bin", "routes_tokens": 64, "routes_fanout": [1.0]}]
        write_log(os.path.join(d, "train.jsonl"), dense_run() + extra)
        r = plot_runs(d, f"{d}:again", cwd=d)  # the same run twice, into the default -o plots/
        assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
        assert r.stdout.splitlines()[1].startswith("again: last step 200 |"), r.stdout
        assert r.stdout.splitlines()[2:] == ["wrote plots/loss.png"], r.stdout
        check_png(os.path.join(d, "plots", "loss.png"))


def test_readable_from_8_to_64_experts():
    """d12's 11 MoE layers at 8, 16 and 64 experts: every figure at most 2,200 px
    wide and 700 KB, at the default dpi. (PLOT_RUNS_KEEP=DIR keeps the PNGs, to look at.)"""
    need_matplotlib()
    spec = importlib.util.spec_from_file_location("plot_runs_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.expert_ticks(16) == list(range(16)), script.expert_ticks(16)
    assert script.expert_ticks(64) == list(range(0, 64, 8)), script.expert_ticks(64)
    keep = os.environ.get("PLOT_RUNS_KEEP")
    for experts in (8, 16, 64):
        log = write_log(os.path.join(WORK, f"e{experts}", "train.jsonl"),
                        [run_record("et", experts)] + et_run(layers=list(range(1, 12)), experts=experts))
        out = keep or os.path.join(WORK, f"e{experts}_plots")
        r = plot_runs(log, "-o", out)
        assert r.returncode == 0, f"{experts} experts: exit {r.returncode}: {r.stderr}"
        name = f"et_-e_{experts}_-k_1"
        for png in ("loss.png", "fanout.png", f"{name}_usage.png", f"{name}_cutoffs.png"):
            check_png(os.path.join(out, png), max_width=2200, max_bytes=700_000)


def test_labels_from_the_run_records():
    need_matplotlib()
    with tempfile.TemporaryDirectory(dir=WORK) as d:
        runs = {"a": [run_record("et", 4)] + et_run(), "b": [run_record("tc", 4, top_k=2)] + et_run(),
                "c": [run_record("et", 4, **{"-l": 0.0003})] + et_run(), "d": [run_record("et", 0)] + dense_run()}
        for name, records in runs.items():
            write_log(os.path.join(d, name, "train.jsonl"), records)
        r = plot_runs(*[os.path.join(d, name) for name in runs], "-o", os.path.join(d, "plots"))
        assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
        labels = [line.split(":")[0] for line in r.stdout.splitlines()[:4]]
        assert labels == ["et -e 4 -k 1, -l 0.0006", "tc -e 4 -k 2", "et -e 4 -k 1, -l 0.0003", "dense"], labels
        assert os.path.isfile(os.path.join(d, "plots", "tc_-e_4_-k_2_usage.png")), os.listdir(os.path.join(d, "plots"))
        r = plot_runs(f"{os.path.join(d, 'a')}:mine", "-o", os.path.join(d, "plots"))
        assert r.stdout.startswith("mine: last step 200"), r.stdout


def test_loss_against_tokens_and_time():
    need_matplotlib()
    with tempfile.TemporaryDirectory(dir=WORK) as d:
        write_log(os.path.join(d, "run", "train.jsonl"), [run_record("et", 4)] + et_run())
        for axis in ("tokens", "time"):
            r = plot_runs(os.path.join(d, "run"), "-o", os.path.join(d, axis), "--x", axis)
            assert r.returncode == 0, f"--x {axis}: exit {r.returncode}: {r.stderr}"
            check_png(os.path.join(d, axis, "loss.png"))
        old = [{k: v for k, v in rec.items() if k not in ("tokens", "elapsed_s")} for rec in dense_run()]
        path = write_log(os.path.join(d, "old", "train.jsonl"), old)
        assert_one_error(plot_runs(path, "--x", "tokens"), f"{path}: step 1 has no \"tokens\"")


def assert_one_error(r, want):
    assert r.returncode != 0, f"exit {r.returncode}"
    assert r.stdout == "", f"printed {r.stdout!r}"
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: " + want), f"stderr {r.stderr!r}, want {want!r}"


def test_missing_log():
    missing = os.path.join(WORK, "nonexistent", "train.jsonl")
    assert_one_error(plot_runs(missing), f"{missing}: no such file")
    with tempfile.TemporaryDirectory(dir=WORK) as d:  # an output dir without a log
        assert_one_error(plot_runs(d), f"{d}/train.jsonl: no such file (not a train_et output dir?)")


def test_empty_log():
    path = write_log(os.path.join(WORK, "empty", "train.jsonl"), [], tail="\n\n")
    assert_one_error(plot_runs(path), f"{path}: empty (no records)")


def test_malformed_log():
    good = dense_run()[:3]
    path = write_log(os.path.join(WORK, "bad_json", "train.jsonl"), good, tail='{"step": 20, "loss": 3.1,\n')
    assert_one_error(plot_runs(os.path.dirname(path), "-o", os.path.join(WORK, "unused")), f"{path}:4: bad JSON: ")
    path = write_log(os.path.join(WORK, "no_step", "train.jsonl"), good + [{"loss": 3.0}])
    assert_one_error(plot_runs(path), f"{path}:4: no \"step\"")
    et = et_run()
    et[5]["moe"][1]["cutoff"] = [0.1, 0.2]  # not one per expert
    path = write_log(os.path.join(WORK, "bad_cutoff", "train.jsonl"), et)
    assert_one_error(plot_runs(path), f"{path}:6: moe[1].cutoff is not a list of 4 numbers")
    assert not os.path.exists(os.path.join(WORK, "unused")), "wrote plots despite the error"


def test_incomplete_last_line_is_skipped():
    need_matplotlib()
    with tempfile.TemporaryDirectory(dir=WORK) as d:
        write_log(os.path.join(d, "train.jsonl"), dense_run(), tail='{"step": 210, "lo')  # a run still writing
        r = plot_runs(d, "-o", os.path.join(d, "plots"))
        assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
        assert "incomplete last line skipped" in r.stderr and "last step 200 |" in r.stdout, r.stderr + r.stdout


def test_help_describes_every_option():
    r = plot_runs("-h")
    assert r.returncode == 0, r.stderr
    for option in ["RUN[:LABEL]", "-o OUTDIR, --out OUTDIR", "--last N", "--ymax YMAX", "--dpi DPI", "--x {step,tokens,time}"]:
        assert option in r.stdout, f"-h does not list {option}"
    r = plot_runs("x", "--last", "0")
    assert r.returncode == 2 and "--last: 0 is not >= 1" in r.stderr, r.stderr


if __name__ == "__main__":
    main(globals())
