#!/usr/bin/env python3
"""dev/sweep.py: the paper's comparison in one command: a seeded sweep of the routers, its table and its verdict.

The paper's Table 1 compares, at one model size and token budget, a dense
model with the same model under token choice (TC, with an aux loss or
loss-free balancing), expert choice (EC) and expert threshold (ET) routing:
dense is worst, TC in between, EC and ET best and level. This script runs
that comparison with train_et, each config with several seeds, so that a
difference can be told from seed noise:

    dense        -e 0
    tc_aux       -r tc -tb aux
    tc_lossfree  -r tc -tb lossfree
    ec           -r ec
    et           -r et

Each run writes to SWEEP_DIR/<config>_seed<k>/ (train_et's -o, seed -sd k),
seed by seed (every config's seed 1 first), so that a sweep cut short has
every config at least once. The size (--model, --experts, --batch,
--seq-len, --total-batch) and the steps are the same for every run; any
other train_et flag goes after `--` to every run (data -i/-j, -ce for CORE,
-preset, -opt muon, ...).

Steps: --steps N, or --budget TIME (3h, 90m, 1h30m, 45s). With a budget, a
timing run of each config (--timing-steps steps, under SWEEP_DIR/timing/)
measures what a run costs: start-up, seconds per step (the mean step_ms
past step 1), one validation (and CORE evaluation), one checkpoint. A run of
S steps costs start-up + S x step + its validations (every -v steps and at
the end) + its CORE evaluations (every -cv steps and at the end) + its
checkpoints (every -n steps and at the end), -v, -cv and -n as the run
record resolved them; the sweep takes the largest
S whose runs fit in the budget left after the timing runs, less a 5% margin,
and prints the sums.

Resuming: the plan (the settings and the steps) is kept in
SWEEP_DIR/sweep.json, and running the same command again, or just
`dev/sweep.py SWEEP_DIR` (an option left out keeps the sweep's; a changed
one is refused, but --seeds may grow), continues the sweep: a run whose
train.jsonl has its final validation (and, with -ce, its final CORE) is
skipped, one with checkpoints continues from the newest (-y 1), the others
start. A run that fails stops the sweep, with its error and where its log is.
Between runs it prints the progress and an ETA (from the runs done so far,
else from the timing runs).

Results, from the runs that finished (also with --report, which starts
nothing): SWEEP_DIR/sweep.md, a table of each config's final validation CE
and CORE as the mean over seeds +- half the range (max - min) / 2, so that
the interval spans every seed's value, and the verdict on the paper's
ordering; SWEEP_DIR/loss.png, the train loss of each config (the mean over
its seeds) and its validation loss dashed. The verdict, one check a line:

    A worse than B (dense vs each TC, each TC vs EC and ET):
        holds        every seed of A has a higher CE than every seed of B
        unclear      the means are in that order, but the seed ranges overlap
        fails        the means are not in that order
    EC and ET level: holds when their seed ranges overlap
                     (|mean_EC - mean_ET| <= half-range_EC + half-range_ET), else fails

A config with fewer than two finished seeds cannot be judged. The ordering
holds when every check holds.

    python3 dev/sweep.py runs/d6 --model d6 --experts 8 --budget 3h -- \
        -i 'data/edu_fineweb10B/edu_fineweb_train_*.bin' -j 'data/edu_fineweb10B/edu_fineweb_val_*.bin'
    python3 dev/sweep.py runs/d6 --report                 # the table and the verdict so far
    python3 dev/sweep.py runs/emu --model tiny --experts 4 --batch 2 --seq-len 32 --total-batch 64 --steps 20 \
        --train build/emu/plain/train_et -- -i synthetic -sv 1024 -v 10 -vm 1 -s 0   # on the CPU: under a minute

Needs matplotlib for loss.png (pip install -r dev/requirements.txt); it
reads the logs with dev/plot_runs.py's checks and draws with its loss plot.
"""
import argparse
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plot_runs  # noqa: E402: dev/ is not a package

CONFIGS = {  # name -> (label, train_et flags)
    "dense": ("dense", ["-e", "0"]),
    "tc_aux": ("TC aux", ["-r", "tc", "-tb", "aux"]),
    "tc_lossfree": ("TC loss-free", ["-r", "tc", "-tb", "lossfree"]),
    "ec": ("EC", ["-r", "ec"]),
    "et": ("ET", ["-r", "et"]),
}
WORSE = [("dense", "tc_aux"), ("dense", "tc_lossfree"), ("tc_aux", "ec"), ("tc_aux", "et"), ("tc_lossfree", "ec"),
         ("tc_lossfree", "et")]  # (A, B): A has the higher CE in the paper
LEVEL = ("ec", "et")  # level in the paper: within the seed spread of each other
SIZE = {"model": "-m", "experts": "-e", "batch": "-b", "seq_len": "-t", "total_batch": "-d"}  # option -> train_et flag
OWNED = {"-o": "the sweep sets it: SWEEP_DIR/<config>_seed<k>", "-y": "the sweep resumes runs itself",
         "-x": "use --steps or --budget", "-sd": "use --seeds", "-r": "each config sets its router",
         "-tb": "each config sets its TC balancing", "-m": "use --model", "-e": "use --experts", "-b": "use --batch",
         "-t": "use --seq-len", "-d": "use --total-batch"}
MARGIN = 0.05  # of the budget, left unplanned
DPI = 120
PLAN = "sweep.json"
PLAN_VERSION = 1


class SweepError(Exception):
    """What stops the sweep. The message is the whole error line."""


def duration(text):
    """'3h', '90m', '1h30m', '45s' or plain seconds -> seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms]?)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", "") or \
            (len(parts) > 1 and not all(u for _, u in parts)):
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration (say 3h, 90m, 1h30m, 45s)")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive duration")
    return seconds


def hms(seconds):
    """1h 02m, 3m 05s, 12s."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


# -----------------------------------------------------------------------------
# The plan: what every run shares, kept in SWEEP_DIR/sweep.json


def train_et_pairs(flags):
    """The flags after `--` as (flag, value) pairs, checked: every train_et flag takes one value."""
    pairs = []
    for i in range(0, len(flags), 2):
        flag = flags[i]
        if not re.fullmatch(r"-[A-Za-z]\w*", flag):
            raise SweepError(f"'{flag}' after --: not a train_et flag (what follows -- is FLAG VALUE pairs)")
        if i + 1 == len(flags):
            raise SweepError(f"{flag} after --: no value")
        if flag in OWNED:
            raise SweepError(f"{flag} after --: {OWNED[flag]}")
        if flag == "-v" and re.fullmatch(r"0+", flags[i + 1]):
            raise SweepError("-v 0 after --: the sweep compares the final validation loss; give -v N > 0 or leave "
                             "it out")
        pairs.append((flag, flags[i + 1]))
    return pairs


def new_plan(args, pairs):
    return {"version": PLAN_VERSION, "command": shlex.join(["python3", *sys.argv]),
            **{option: getattr(args, option) for option in SIZE}, "train_et_flags": [x for p in pairs for x in p],
            "steps": args.steps, "seeds": args.seeds or 2, "budget_s": args.budget, "timing": None}


def load_plan(sweep_dir):
    path = os.path.join(sweep_dir, PLAN)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            plan = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SweepError(f"{path}: cannot read the sweep's plan: {e}") from None
    if plan.get("version") != PLAN_VERSION:
        raise SweepError(f"{path}: a plan of another version ({plan.get('version')}): use another sweep dir")
    return plan


def save_plan(sweep_dir, plan):
    path = os.path.join(sweep_dir, PLAN)
    with open(path + ".tmp", "w") as f:
        json.dump(plan, f, indent=1)
    os.replace(path + ".tmp", path)


def check_same_settings(plan, args, pairs, path):
    """A sweep continues with the settings it started with: an option left out keeps the
    sweep's, one given must equal it; name the first that differs."""
    for option in SIZE:
        value = getattr(args, option)
        if value is not None and value != plan[option]:
            flag = "--" + option.replace("_", "-")
            raise SweepError(f"{flag} {value}: this sweep's runs have {flag} {plan[option]} ({path}); rerun with "
                             f"the same settings (or none), or start another sweep dir")
    flags = [x for p in pairs for x in p]
    if flags and flags != plan["train_et_flags"]:
        raise SweepError(f"train_et flags after -- differ from this sweep's ({path}: "
                         f"{shlex.join(plan['train_et_flags']) or 'none'}); rerun with the same (or none), or start "
                         f"another sweep dir")
    if args.steps is not None and args.steps != plan["steps"]:
        raise SweepError(f"--steps {args.steps}: this sweep's runs have {plan['steps']} steps ({path}); rerun with "
                         f"--steps {plan['steps']} or without it, or start another sweep dir")


# -----------------------------------------------------------------------------
# A run's log


class RunLog:
    """One train.jsonl: the last run record (a resume appends one), and the training,
    validation and CORE records in step order, a resumed run's re-logged steps replaced."""

    def __init__(self, file):
        self.file = file
        self.record, self.train, self.val, self.core = None, [], [], []
        for n, rec in plot_runs.json_lines(file):
            problem = check_core(rec) if isinstance(rec, dict) and "core" in rec else plot_runs.check_record(rec)
            if problem:
                raise SweepError(f"{file}:{n}: {problem}")
            if "run" in rec:
                self.record = rec["run"]
            else:
                kind = self.core if "core" in rec else self.val if "val_loss" in rec else self.train
                plot_runs.append(kind, rec)


def final(records, steps):
    """The last evaluation's record if it is the final one (at step == steps), else None."""
    return records[-1] if records and records[-1]["step"] == steps else None


def check_core(rec):
    """What is wrong with a CORE record, or None."""
    if not isinstance(rec.get("step"), int) or isinstance(rec["step"], bool) or rec["step"] < 0:
        return "no \"step\" (a whole number >= 0)"
    if not plot_runs.is_number(rec["core"]):
        return "\"core\" is not a number"
    if not isinstance(rec.get("core_partial"), bool) or not isinstance(rec.get("core_missing"), list):
        return "a CORE record without \"core_partial\" (true or false) and \"core_missing\" (a list)"
    return None


def read_run(run_dir):
    """The run's log, or None where it has none yet."""
    file = os.path.join(run_dir, "train.jsonl")
    return RunLog(file) if os.path.exists(file) else None


def checkpoint_step(run_dir):
    """The step of the newest checkpoint, or None."""
    found = sorted(glob.glob(os.path.join(run_dir, "ckpt_*.bin")))
    return int(re.search(r"ckpt_(\d+)\.bin$", found[-1]).group(1)) if found else None


def is_finished(log, steps, core):
    """Whether a run's log has its final validation, and with -ce (core) its final CORE."""
    return log is not None and final(log.val, steps) is not None and (not core or final(log.core, steps) is not None)


# -----------------------------------------------------------------------------
# Running train_et


def run_dir(sweep_dir, config, seed):
    return os.path.join(sweep_dir, f"{config}_seed{seed}")


def size_flags(plan, config):
    flags = []
    for option, flag in SIZE.items():
        if plan[option] is not None and not (config == "dense" and flag == "-e"):
            flags += [flag, str(plan[option])]
    return flags


def run_train_et(argv, out_dir):
    """Runs train_et (its console goes to out_dir/train.log, which train_et writes);
    returns the seconds it took, or stops the sweep with its error."""
    start = time.time()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else "no error message"
        raise SweepError(f"{shlex.join(argv)} exited with status {r.returncode}: {why} (its console: "
                         f"{os.path.join(out_dir, 'train.log')}); fix it and rerun the sweep: it resumes")
    return time.time() - start


def measure(log, wall):
    """A timing run's costs (seconds): start-up, a step, a validation, a CORE evaluation, a
    checkpoint; and the cadences and batch its run record resolved."""
    try:
        steps = [r["step_ms"] / 1000 for r in log.train if r["step"] >= 2]  # step 1 warms up
        val_s = next(r["elapsed_s"] for r in log.val if r["step"] == 0)  # the first thing the loop does
        core_s = sum(r["core_seconds"] for r in log.core) / len(log.core) if log.core else 0.0
        last = max(r["elapsed_s"] for r in log.train + log.val + log.core)
        settings = log.record["settings"]
        timing = {"startup_s": max(0.0, wall - last), "step_s": sum(steps) / len(steps), "val_s": val_s,
                  "core_s": core_s, "val_every": settings["-v"], "core_every": settings.get("-cv", 0),
                  "ckpt_every": settings["-n"],
                  "tokens_per_step": log.record["batch"]["tokens_per_step"]}
        # after the last step: its checkpoint, then the final validation and CORE
        timing["ckpt_s"] = max(0.0, last - log.train[-1]["elapsed_s"] - val_s - core_s)
    except (KeyError, TypeError, StopIteration, ZeroDivisionError) as e:
        raise SweepError(f"{log.file}: the timing run's log lacks what the budget needs ({type(e).__name__} {e}); "
                         f"give --steps instead of --budget") from None
    return timing


def run_seconds(t, steps):
    """What a run of `steps` steps costs by its config's timing run."""
    vals = -(-steps // t["val_every"]) + 1 if t["val_every"] else 0
    cores = (steps - 1) // t["core_every"] + 1 if t["core_every"] else 1  # -cv, and at the end
    ckpts = -(-steps // t["ckpt_every"]) if t["ckpt_every"] else 1
    return (t["startup_s"] + steps * t["step_s"] + vals * t["val_s"] + cores * t["core_s"] +
            ckpts * t["ckpt_s"])


def time_configs(sweep_dir, plan, train, timing_steps):
    """One timing run per config; returns ({config: costs}, the seconds they took)."""
    timings, spent = {}, 0.0
    pairs = [p for p in train_et_pairs(plan["train_et_flags"]) if p[0] != "-li"]  # each step logged instead
    for config in CONFIGS:
        out = os.path.join(sweep_dir, "timing", config)
        shutil.rmtree(out, ignore_errors=True)  # a timing run cut short: start it anew
        argv = [train, *size_flags(plan, config), *CONFIGS[config][1], *[x for p in pairs for x in p],
                "-li", "1", "-sd", "1", "-x", str(timing_steps), "-o", out]
        print(f"timing {config}: {timing_steps} steps", flush=True)
        wall = run_train_et(argv, out)
        spent += wall
        log = read_run(out)
        if log is None or final(log.val, timing_steps) is None:
            raise SweepError(f"{out}: the timing run wrote no final validation (no validation data? give -j)")
        timings[config] = measure(log, wall)
        for ckpt in glob.glob(os.path.join(out, "ckpt_*.bin")):
            os.remove(ckpt)
    return timings, spent


def choose_steps(timings, seeds, budget, spent):
    """The most steps whose runs fit in the budget left after the timing runs, less the margin."""
    available = (1 - MARGIN) * (budget - spent)

    def total(steps):
        return seeds * sum(run_seconds(t, steps) for t in timings.values())

    if total(1) > available:
        raise SweepError(f"--budget {hms(budget)}: too short: the timing runs took {hms(spent)}, and "
                         f"{len(timings) * seeds} runs of even 1 step need {hms(total(1))} more (plus a "
                         f"{MARGIN:.0%} margin); give a longer --budget, or a smaller --model")
    lo, hi = 1, 2
    while total(hi) <= available:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= available else (lo, mid)
    return lo, total(lo)


def explain_budget(timings, seeds, budget, spent, steps, planned):
    lines = [f"budget {hms(budget)}: the timing runs took {hms(spent)}; a run costs start-up + steps x step + "
             f"validations (+ CORE) + checkpoints:"]
    for config, t in timings.items():
        core = ""
        if t["core_s"]:
            when = f"every {t['core_every']} steps and at the end" if t["core_every"] else "at the end"
            core = f", CORE {t['core_s']:.2f} s ({when})"
        lines.append(f"  {config:12s} start-up {t['startup_s']:.2f} s, step {t['step_s'] * 1e3:.1f} ms, validation "
                     f"{t['val_s']:.2f} s (every {t['val_every']} steps and at the end){core}, checkpoint "
                     f"{t['ckpt_s']:.2f} s (every {t['ckpt_every'] or steps} steps and at the end)")
    tokens = steps * timings["dense"]["tokens_per_step"]
    lines.append(f"chose {steps} steps ({tokens:,} tokens per run): {len(timings) * seeds} runs in about "
                 f"{hms(planned)}, the most that fit in {hms(budget - spent)} less a {MARGIN:.0%} margin")
    return "\n".join(lines)


class Progress:
    """The ETA between runs: each run's expected seconds from the fresh runs this
    sweep has finished (its config's, else any config's), else from the timing runs."""

    def __init__(self, plan):
        self.plan, self.walls = plan, {}

    def done(self, config, wall, resumed):
        if not resumed:
            self.walls.setdefault(config, []).append(wall)

    def expected(self, config, from_step):
        walls = self.walls.get(config) or [w for ws in self.walls.values() for w in ws]
        if walls:
            whole = sum(walls) / len(walls)
        elif self.plan["timing"]:
            whole = run_seconds(self.plan["timing"][config], self.plan["steps"])
        else:
            return None
        return whole * (self.plan["steps"] - from_step) / self.plan["steps"]

    def eta(self, todo):
        """'ETA 1h 20m (about 21:40)' for the runs in todo [(config, seed, from_step)], or ''."""
        left = [self.expected(config, step) for config, _, step in todo]
        if not todo or None in left:
            return ""
        return f", ETA {hms(sum(left))} (about {time.strftime('%H:%M', time.localtime(time.time() + sum(left)))})"


def run_sweep(sweep_dir, plan, train):
    steps, core = plan["steps"], "-ce" in plan["train_et_flags"][0::2]
    runs = [(config, seed) for seed in range(1, plan["seeds"] + 1) for config in CONFIGS]
    todo, done = [], 0
    for config, seed in runs:
        out = run_dir(sweep_dir, config, seed)
        if is_finished(read_run(out), steps, core):
            done += 1
        else:
            todo.append((config, seed, checkpoint_step(out) or 0))
    resumed = [f"{c} seed {s} from step {step}" for c, s, step in todo if step]
    print(f"{len(runs)} runs of {steps} steps: {done} done, {len(resumed)} to resume"
          f"{' (' + ', '.join(resumed) + ')' if resumed else ''}, {len(todo) - len(resumed)} to start", flush=True)
    progress = Progress(plan)
    for i, (config, seed, step) in enumerate(todo):
        out = run_dir(sweep_dir, config, seed)
        argv = [train, *size_flags(plan, config), *CONFIGS[config][1], *plan["train_et_flags"], "-sd", str(seed),
                "-x", str(steps), "-o", out] + (["-y", "1"] if step else [])
        what = f"resume from step {step}" if step else "start"
        print(f"[{done + i + 1}/{len(runs)}] {config} seed {seed}: {what} (console: {out}/train.log)", flush=True)
        wall = run_train_et(argv, out)
        log = read_run(out)
        if not is_finished(log, steps, core):
            missing = "CORE" if log and final(log.val, steps) else "validation (no validation data? give -j)"
            raise SweepError(f"{out}: train_et finished without a final {missing} at step {steps}")
        progress.done(config, wall, step > 0)
        val = final(log.val, steps)["val_loss"]
        print(f"[{done + i + 1}/{len(runs)}] {config} seed {seed}: done in {hms(wall)}, val loss "
              f"{plot_runs.fmt(val, '.4f')} | {len(todo) - i - 1} more to run{progress.eta(todo[i + 1:])}", flush=True)


# -----------------------------------------------------------------------------
# Gathering and judging


def spread(values):
    """(mean, half-range) of the seeds' values; None without any."""
    if not values:
        return None
    return sum(values) / len(values), (max(values) - min(values)) / 2


class Result:
    """One config's finished runs: seed -> final val CE, CORE record, train seconds."""

    def __init__(self, config):
        self.config, self.label = config, CONFIGS[config][0]
        self.ce, self.core, self.seconds, self.logs = {}, {}, {}, {}

    def ce_stats(self):
        return spread(list(self.ce.values()))

    def core_stats(self):
        return spread([r["core"] for r in self.core.values() if r["core"] is not None])

    def ce_text(self):
        mean, half = self.ce_stats()
        return f"{self.label} {mean:.4f} \u00b1 {half:.4f}"


def gather(sweep_dir, steps, seeds):
    """{config: Result} from the runs that finished (a final validation with a finite loss)."""
    results = {}
    for config in CONFIGS:
        result = results[config] = Result(config)
        for seed in range(1, seeds + 1):
            log = read_run(run_dir(sweep_dir, config, seed))
            val = final(log.val, steps) if log else None
            if val is None or val["val_loss"] is None:
                continue
            result.ce[seed], result.seconds[seed], result.logs[seed] = val["val_loss"], val["elapsed_s"], log
            core = final(log.core, steps)
            if core is not None:
                result.core[seed] = core
    return results


def too_few(claim, a, b):
    """(verdict, line) where a or b has fewer than 2 finished seeds, else None."""
    short = [r for r in (a, b) if len(r.ce) < 2]
    if not short:
        return None
    have = ", ".join(f"{r.label} has {len(r.ce)} finished seed{'' if len(r.ce) == 1 else 's'}" for r in short)
    return "cannot judge", f"{claim}: {have} (2 needed)"


def judge_worse(a, b):
    """(verdict, line) for 'a has a higher CE than b'."""
    claim = f"{a.label} worse than {b.label}"
    if too_few(claim, a, b):
        return too_few(claim, a, b)
    numbers = f"val CE {a.ce_text()} vs {b.ce_text()}"
    if min(a.ce.values()) > max(b.ce.values()):
        return "holds", f"{claim}: {numbers}: every {a.label} seed above every {b.label} seed"
    if a.ce_stats()[0] > b.ce_stats()[0]:
        return "unclear", f"{claim}: {numbers}: the means are in order, but the seed ranges overlap"
    return "fails", f"{claim}: {numbers}: {a.label}'s mean is not the higher"


def judge_level(a, b):
    """(verdict, line) for 'a and b within the seed spread of each other'."""
    claim = f"{a.label} and {b.label} level"
    if too_few(claim, a, b):
        return too_few(claim, a, b)
    (mean_a, half_a), (mean_b, half_b) = a.ce_stats(), b.ce_stats()
    gap, allowed = abs(mean_a - mean_b), half_a + half_b
    numbers = f"val CE {a.ce_text()} vs {b.ce_text()}: |difference| {gap:.4f}"
    if gap <= allowed:
        return "holds", f"{claim}: {numbers} <= {allowed:.4f}, the sum of the half-ranges: the seed ranges overlap"
    return "fails", f"{claim}: {numbers} > {allowed:.4f}, the sum of the half-ranges: the seed ranges are apart"


def judge(results):
    """[(verdict, line)] for each check of the paper's ordering, then the overall one."""
    checks = [judge_worse(results[a], results[b]) for a, b in WORSE] + [judge_level(*(results[c] for c in LEVEL))]
    verdicts = [v for v, _ in checks]
    for verdict, summary, count in [("fails", "does not hold", "fail"),
                                    ("cannot judge", "cannot be judged yet", "cannot be judged"),
                                    ("unclear", "is not settled (more seeds or longer runs would tell)",
                                     "are unclear")]:
        if verdict in verdicts:
            return checks, f"The paper's ordering {summary}: {verdicts.count(verdict)} of {len(checks)} checks {count}."
    return checks, f"The paper's ordering holds: all {len(checks)} checks hold."


def markdown(sweep_dir, plan, results, checks, overall):
    seeds = plan["seeds"]
    record = next((log.record for r in results.values() for log in r.logs.values()), None)
    size = ", ".join(f"{'--' + o.replace('_', '-')} {plan[o]}" for o in SIZE if plan[o] is not None) or "defaults"
    lines = [f"# Sweep {sweep_dir}", ""]
    tokens = f" of {record['batch']['tokens_per_step']:,} tokens" if record else ""
    lines.append(f"{size}; {plan['steps']} steps{tokens} per run; seeds 1 to {seeds}; train_et flags: "
                 f"`{shlex.join(plan['train_et_flags']) or 'none'}`. Made by `{plan['command']}`.")
    lines += ["", "Each value is the mean over the finished seeds \u00b1 half their range ((max - min) / 2): the "
              "interval spans every seed's value. CE is the final validation loss; CORE the final CORE score "
              "(- without -ce).", ""]
    lines += ["| config | flags | seeds done | val CE | CORE | val CE per seed | train time per run |",
              "|---|---|---|---|---|---|---|"]
    partial = {}
    for r in results.values():
        ce, core = r.ce_stats(), r.core_stats()
        ce_text = f"{ce[0]:.4f} \u00b1 {ce[1]:.4f}" if ce else "-"
        core_text = f"{core[0]:.4f} \u00b1 {core[1]:.4f}" if core else "-"
        scored = sum(rec["core"] is not None for rec in r.core.values())
        if 0 < scored < len(r.ce):
            core_text += f" ({scored} of {len(r.ce)} seeds)"
        missing = sorted({label for rec in r.core.values() if rec["core_partial"] for label in rec["core_missing"]})
        if core and any(rec["core_partial"] for rec in r.core.values()):
            partial[r.label] = missing
            core_text += " (partial)"
        per_seed = ", ".join(f"{r.ce[s]:.4f}" for s in sorted(r.ce)) or "-"
        hours = hms(sum(r.seconds.values()) / len(r.seconds)) if r.seconds else "-"
        lines.append(f"| {r.label} | `{' '.join(CONFIGS[r.config][1])}` | {len(r.ce)}/{seeds} | {ce_text} | "
                     f"{core_text} | {per_seed} | {hours} |")
    for label, missing in partial.items():
        lines.append("")
        lines.append(f"{label}: partial CORE, over the tasks the bundle has; missing: {', '.join(missing) or '?'}.")
    lines += ["", "## The paper's ordering", "", "Dense worse (higher CE) than TC, TC worse than EC and ET, EC and "
              "ET within the seed spread of each other.", ""]
    lines += [f"- **{verdict}**: {line}" for verdict, line in checks]
    lines += ["", f"**{overall}**", ""]
    return "\n".join(lines)


def draw_loss(sweep_dir, plan, results, ymax):
    """loss.png: each config's train loss, the mean over its finished seeds at the
    steps they all logged, and its validation loss, dashed; dev/plot_runs.py draws it."""
    curves = []
    for r in results.values():
        logs = list(r.logs.values())
        if not logs:
            continue
        train = [average(recs, "loss") for recs in zip_steps([log.train for log in logs])]
        val = [average(recs, "val_loss") for recs in zip_steps([log.val for log in logs])]
        run = plot_runs.Run(sweep_dir, None, f"{r.label} (mean of {len(logs)})", None, train, val)
        run.color = f"C{len(curves)}"
        curves.append(run)
    if not curves:
        return None
    if ymax is None:  # the end, where the configs differ, readable: cut the first tenth's high loss
        later = [rec[key] for run in curves for recs, key in ((run.train, "loss"), (run.val, "val_loss"))
                 for rec in recs if rec["step"] >= plan["steps"] / 10 and rec[key] is not None]
        ymax = max(later) if later else None
    plot_runs.load_plotting()
    return plot_runs.plot_loss(curves, sweep_dir, DPI, ymax, "step")


def zip_steps(logs):
    """The records of several runs at the steps all of them have, step by step."""
    common = set.intersection(*({rec["step"] for rec in records} for records in logs))
    by_step = [{rec["step"]: rec for rec in records} for records in logs]
    return [[records[s] for records in by_step] for s in sorted(common)]


def average(recs, key):
    """The first record (its step and routing) with the mean of key over all (None if any is not finite)."""
    values = [rec[key] for rec in recs]
    return {**recs[0], key: None if None in values else sum(values) / len(values)}


def report(sweep_dir, plan, ymax):
    results = gather(sweep_dir, plan["steps"], plan["seeds"])
    checks, overall = judge(results)
    text = markdown(sweep_dir, plan, results, checks, overall)
    with open(os.path.join(sweep_dir, "sweep.md"), "w") as f:
        f.write(text)
    print(text, end="")
    written = [os.path.join(sweep_dir, "sweep.md"), draw_loss(sweep_dir, plan, results, ymax)]
    for path in written:
        if path:
            print(f"wrote {path}")


# -----------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s SWEEP_DIR [options] [-- TRAIN_ET_FLAGS ...]")
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR",
                        help="folder of the sweep: its runs (<config>_seed<k>/), sweep.json, sweep.md, loss.png; "
                             "made if missing, continued if it holds a sweep")
    parser.add_argument("--model", metavar="NAME", help="train_et -m of every run (default: train_et's, d12)")
    parser.add_argument("--experts", type=plot_runs.positive_int, metavar="N",
                        help="train_et -e of the MoE runs; dense runs -e 0 (default: train_et's, 16)")
    parser.add_argument("--batch", type=plot_runs.positive_int, metavar="N",
                        help="train_et -b, sequences per micro-batch")
    parser.add_argument("--seq-len", type=plot_runs.positive_int, metavar="N", help="train_et -t, the sequence length")
    parser.add_argument("--total-batch", type=plot_runs.positive_int, metavar="N", help="train_et -d, tokens per step")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=plot_runs.positive_int, metavar="N",
                       help="training steps of every run (train_et -x)")
    steps.add_argument("--budget", type=duration, metavar="TIME",
                       help="wall-clock time for the whole sweep (3h, 90m, 1h30m, 45s): timing runs choose the "
                            "steps so that every run fits; the choice is printed")
    parser.add_argument("--seeds", type=plot_runs.positive_int, metavar="N",
                        help="seeds per config, 1 to N (train_et -sd), at least 2 (default: 2, or the sweep's)")
    parser.add_argument("--timing-steps", type=plot_runs.positive_int, default=20, metavar="N",
                        help="--budget: steps of each config's timing run (default: 20)")
    parser.add_argument("--train", default="./train_et", metavar="PATH",
                        help="the train_et binary (default: ./train_et; build/emu/plain/train_et on the emulated "
                             "device)")
    parser.add_argument("--report", action="store_true",
                        help="start no run: gather the finished runs into sweep.md and loss.png and judge them")
    parser.add_argument("--ymax", type=float, metavar="LOSS",
                        help="top of loss.png's y axis (default: the highest loss after the first tenth of the "
                             "steps)")
    ours, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_args(ours)
    if args.seeds is not None and args.seeds < 2:
        parser.error(f"--seeds: {args.seeds} is fewer than 2: the seed spread needs at least 2")
    if args.timing_steps < 3:
        parser.error(f"--timing-steps: {args.timing_steps} is fewer than 3: step 1 warms up and is not timed")
    return args, flags


def prepare(args, flags):
    """The plan to run: the sweep's own (checked against the options) or a new one; and train_et's path."""
    pairs = train_et_pairs(flags)
    plan = load_plan(args.sweep_dir)
    path = os.path.join(args.sweep_dir, PLAN)
    if plan is None:
        if args.steps is None and args.budget is None:
            raise SweepError(f"{args.sweep_dir} holds no sweep yet: give --steps N or --budget TIME")
        plan = new_plan(args, pairs)
    else:
        check_same_settings(plan, args, pairs, path)
        if args.budget is not None:
            print(f"{plan['steps']} steps per run, as this sweep chose at its start ({path})")
        plan["seeds"] = args.seeds or plan["seeds"]
    train = args.train if os.sep in args.train else "./" + args.train
    if not os.access(train, os.X_OK):
        raise SweepError(f"--train {args.train}: no such program (build it: make train_et, or give --train PATH)")
    return plan, train


def reported_plan(args, flags):
    """--report: the sweep's plan, as it is."""
    if flags:
        raise SweepError("--report starts no run: it takes no train_et flags")
    plan = load_plan(args.sweep_dir)
    if plan is None:
        raise SweepError(f"{args.sweep_dir}: no {PLAN}: not a sweep dir (run the sweep first)")
    return plan


def run(args, plan, train):
    """Chooses the steps (with --budget, the first time), keeps the plan, runs what is left."""
    os.makedirs(args.sweep_dir, exist_ok=True)
    if plan["steps"] is None:
        timings, spent = time_configs(args.sweep_dir, plan, train, args.timing_steps)
        plan["steps"], planned = choose_steps(timings, plan["seeds"], args.budget, spent)
        plan["timing"] = timings
        print(explain_budget(timings, plan["seeds"], args.budget, spent, plan["steps"], planned), flush=True)
    save_plan(args.sweep_dir, plan)
    run_sweep(args.sweep_dir, plan, train)


def main(argv=None):
    args, flags = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        plan, train = (reported_plan(args, flags), None) if args.report else prepare(args, flags)
        if importlib.util.find_spec("matplotlib") is None:
            raise SweepError("loss.png needs matplotlib: pip install -r dev/requirements.txt")
        if not args.report:
            run(args, plan, train)
        report(args.sweep_dir, plan, args.ymax)
    except (SweepError, plot_runs.LogError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to continue the sweep in {args.sweep_dir}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
