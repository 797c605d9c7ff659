#!/usr/bin/env python3
"""dev/plot_runs.py: plots of train_et runs, drawn from the train.jsonl each run writes.

train_et writes a run record first (the command and every setting), then one
JSON line per logged step (loss, speed, tokens seen, elapsed seconds and, for
an MoE model, every MoE layer's routing statistics) and per evaluation
(val_loss) to <out_dir>/train.jsonl (README: "A training run"). This script turns the
logs of several runs into the figures ET routing is judged by (SPEC:
Observability). Runs can then be compared side by side, and a routing
problem (a dead expert, fan-out collapsing to 0 or blowing up, cutoffs that
never settle) shows on a plot instead of having to be found in the log:

    loss.png             train loss (lines) and val loss (dashed, markers) of every run,
                         against steps, tokens or hours (--x)
    fanout.png           MoE runs: experts per token, the histogram over the last
                         --last logged steps and the mean over time
    <label>_usage.png    each MoE run: the share of tokens per (layer, expert) over the
                         last --last logged steps; usage min, max and cv over time
    <label>_cutoffs.png  each EC/ET run: each layer's tracked cutoffs over time: with up
                         to 8 experts one line each (the batch's own cutoff faint behind
                         it), with more their median and quantile bands

Runs are labelled from their run record (router, -e, -k; runs that share a
label get the settings they differ in), or by the label given on the command
line; a log without a run record by its output dir's name. Each figure is
laid out for 8, 16 or 64 experts alike: the heatmap keeps its width and
labels every 8th expert past 16, legends sit outside the axes.

A dotted line on the time plots marks the first logged step under a new
routing (ET's switch from its EC warm-up to thresholds). One summary line per
run goes to stdout. A resumed run (-y 1) appends to its log and re-logs the
steps after its checkpoint; the records logged later replace the earlier
ones, which is what the run did.

    python3 dev/plot_runs.py log_et log_dense:dense           # -> plots/
    python3 dev/plot_runs.py runs/et/train.jsonl:ET runs/tc:TC -o figs --last 50 --x tokens

Needs matplotlib (pip install -r dev/requirements.txt). The logs are read
and checked before matplotlib is imported, so -h and errors in a log need
no matplotlib.
"""
import argparse
import json
import math
import os
import re
import sys
import warnings

FANOUT_BINS = ["0", "1", "2", "3+"]  # fanout_hist: shares of tokens routed to 0, 1, 2, 3+ experts
LINES_UP_TO = 8  # experts drawn one line each on the cutoff plot; more are drawn as quantile bands
TICK_EVERY = 8  # past 16 experts, the heatmap labels every 8th
X_AXES = {"step": ("step", "step"), "tokens": ("tokens", "tokens seen"), "time": ("elapsed_s", "hours")}

plt = np = None  # imported by load_plotting(), once the logs have been read


class LogError(Exception):
    """A log that cannot be used. The message is the whole error line."""


# -----------------------------------------------------------------------------
# Reading the logs


class Run:
    """One run's log: its logged training steps and evaluations, in step order."""

    def __init__(self, path, file, label, record, train, val):
        self.path, self.file, self.label = path, file, label
        self.record = record  # the run record's "run" (the first, if resumed), or None
        self.train = train  # {"step", "loss", ...} per logged step
        self.val = val  # {"step", "val_loss"} per evaluation
        self.moe = [r for r in train if r.get("moe")]  # the logged steps with routing statistics
        self.layers = [m["layer"] for m in self.moe[0]["moe"]] if self.moe else []
        self.experts = len(self.moe[0]["moe"][0]["counts"]) if self.moe else 0
        self.color = "C0"


def is_number(x):
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))  # null: not finite


def is_numbers(x, n=None):
    return isinstance(x, list) and all(is_number(v) for v in x) and (n is None or len(x) == n)


def check_record(rec):
    """Returns what is wrong with one parsed line, or None. Checks what the plots read."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if "run" in rec:
        settings = rec["run"].get("settings") if isinstance(rec["run"], dict) else None
        if not isinstance(settings, dict) or not all(isinstance(settings.get(f), (int, str)) for f in ("-e", "-r", "-k")):
            return "a run record without \"settings\" (-e, -r, -k)"
        return None
    if not isinstance(rec.get("step"), int) or isinstance(rec["step"], bool) or rec["step"] < 0:
        return "no \"step\" (a whole number >= 0)"
    if "val_loss" in rec:
        return None if is_number(rec["val_loss"]) else "\"val_loss\" is not a number"
    if "core" in rec or "routes" in rec:  # CORE and routing-picture records: dev/sweep.py, dev/plot_routing.py
        return None
    if "loss" not in rec:
        return "neither \"loss\" nor \"val_loss\""
    if not is_number(rec["loss"]):
        return "\"loss\" is not a number"
    moe = rec.get("moe", [])
    if not isinstance(moe, list):
        return "\"moe\" is not a list"
    for i, m in enumerate(moe):
        where = f"moe[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("layer"), int):
            return f"{where} is not an object with a \"layer\""
        if not is_numbers(m.get("counts")) or not m["counts"]:
            return f"{where}.counts is not a list of numbers"
        for key in ("usage_min", "usage_max", "usage_cv", "fanout_mean", "cutoff_dev"):
            if not is_number(m.get(key)):
                return f"{where}.{key} is not a number"
        if "fanout_hist" in m and not is_numbers(m["fanout_hist"], len(FANOUT_BINS)):
            return f"{where}.fanout_hist is not a list of {len(FANOUT_BINS)} numbers"
        for key in ("cutoff", "batch_cutoff"):
            if key in m and not is_numbers(m[key], len(m["counts"])):
                return f"{where}.{key} is not a list of {len(m['counts'])} numbers, one per expert"
    return None


def append(records, rec):
    """Adds a record in step order. A step at or before the last one of its kind
    is a resumed run going over the steps after its checkpoint again: the new
    records replace the old from that step on."""
    while records and records[-1]["step"] >= rec["step"]:
        records.pop()
    records.append(rec)


def json_lines(file):
    """(line number, record) for each line of a train.jsonl (dev/sweep.py reads them too).
    A last line without a newline is one the run is still writing: skipped, with a warning."""
    try:
        with open(file, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise LogError(f"{file}: cannot read: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                print(f"warning: {file}:{n}: incomplete last line skipped", file=sys.stderr)
                continue
            raise LogError(f"{file}:{n}: bad JSON: {e.msg} (column {e.colno})") from None
        yield n, rec


def read_log(path, label):
    """Reads the train.jsonl at PATH, or in the output dir PATH, into a Run."""
    file = os.path.join(path, "train.jsonl") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise LogError(f"{file}: no such file" + (" (not a train_et output dir?)" if file != path else ""))
    train, val, shape, record = [], [], None, None
    for n, rec in json_lines(file):
        problem = check_record(rec)
        if problem:
            raise LogError(f"{file}:{n}: {problem}")
        if "run" in rec:
            record = record or rec["run"]  # a resumed run adds one: the first describes the run
            continue
        if "val_loss" in rec:
            append(val, rec)
            continue
        if "core" in rec or "routes" in rec:
            continue
        if rec.get("moe"):  # every step of a run has the same layers and experts
            this = [(m["layer"], len(m["counts"])) for m in rec["moe"]]
            if shape is None:
                shape = (n, this)
            elif this != shape[1]:
                raise LogError(f"{file}:{n}: \"moe\" has other layers or expert counts than line {shape[0]}")
        append(train, rec)
    if not train and not val:
        raise LogError(f"{file}: empty (no records)")
    return Run(path, file, label, record, train, val)


def record_label(settings):
    """'et -e 16 -k 1', or 'dense' for -e 0."""
    return "dense" if settings["-e"] == 0 else f"{settings['-r']} -e {settings['-e']} -k {settings['-k']}"


def dir_label(run):
    """The output dir's name."""
    path = run.path if run.file != run.path else os.path.dirname(os.path.abspath(run.file))
    return os.path.basename(os.path.normpath(path))


def label_runs(runs):
    """Runs without a label given get one from their run record, else their dir's name.
    Runs whose record labels coincide get the settings they differ in (at most two)."""
    for run in runs:
        if run.label is None:
            run.label = record_label(run.record["settings"]) if run.record else dir_label(run)
    unlabelled = [run for run in runs if run.record and run.label == record_label(run.record["settings"])]
    for label in {run.label for run in unlabelled}:
        group = [run for run in unlabelled if run.label == label]
        if len(group) < 2:
            continue
        settings = [run.record["settings"] for run in group]
        differ = [f for f in settings[0] if f not in ("-o", "-y") and len({json.dumps(s.get(f)) for s in settings}) > 1]
        for run in group:
            run.label += "".join(f", {f} {run.record['settings'].get(f)}" for f in differ[:2])


def split_run_arg(arg):
    """'PATH' or 'PATH:LABEL' -> (path, label or None). A path that exists as
    given is taken whole, so one with a ':' in its name needs no label."""
    if os.path.exists(arg) or ":" not in arg:
        return arg, None
    path, label = arg.rsplit(":", 1)
    return path, label or None


def read_runs(args):
    runs = [read_log(*split_run_arg(a)) for a in args]
    label_runs(runs)
    seen = set()
    for i, run in enumerate(runs):  # labels name files: make them safe and unique
        name = base = re.sub(r"[^A-Za-z0-9._+-]+", "_", run.label).strip("_") or "run"
        k = 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        run.name, run.color = name, f"C{i % 10}"
    return runs


# -----------------------------------------------------------------------------
# The summary


def mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def fmt(x, spec):
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def summary(run):
    """One line: last step, its loss, best val loss, and the last logged step's
    experts per token and usage cv, means over the MoE layers as on the console."""
    last = run.train[-1] if run.train else {}
    vals = [(r["val_loss"], r["step"]) for r in run.val if r["val_loss"] is not None and math.isfinite(r["val_loss"])]
    best = f"{min(vals)[0]:.4f} (step {min(vals)[1]})" if vals else "-"
    moe = run.moe[-1]["moe"] if run.moe else []
    fanout = mean(m.get("fanout_mean") for m in moe)
    cv = mean(m.get("usage_cv") for m in moe)
    kind = f"routing {run.moe[-1].get('routing', '?')}" if run.moe else "dense"
    return (f"{run.label}: last step {last.get('step', '-')} | loss {fmt(last.get('loss'), '.4f')} | best val {best} | "
            f"fanout mean {fmt(fanout, '.3f')} | usage cv {fmt(cv, '.3f')} | {kind}")


# -----------------------------------------------------------------------------
# The plots


def load_plotting():
    global plt, np
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np


def nanmean(a, axis=None):
    """np.nanmean without the warning for an all-null slice (it stays NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def floats(values, n=None):
    """A list with nulls -> float array with NaN; a missing list (None) -> n NaNs."""
    if values is None:
        return np.full(n, np.nan)
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def per_layer(run, key):
    """(steps, [logged steps, layers]) of a per-layer number."""
    steps = np.array([r["step"] for r in run.moe])
    return steps, np.array([[np.nan if m.get(key) is None else m[key] for m in r["moe"]] for r in run.moe], dtype=float)


def phase_changes(run):
    """(record, routing) for each change of routing: the first logged step under the new one."""
    changes, before = [], None
    for r in run.train:
        now = r.get("routing")
        if now is not None and before is not None and now != before:
            changes.append((r, now))
        before = now if now is not None else before
    return changes


def mark_phases(ax, run, color="0.35", text=True, x=lambda r: r["step"]):
    for rec, routing in phase_changes(run):
        ax.axvline(x(rec), color=color, ls=":", lw=1)
        if text:
            ax.annotate(f"\u2192 {routing}", xy=(x(rec), 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                        textcoords="offset points", ha="left", va="top", fontsize=7, color=color)


def spectrum(n, small="tab10"):
    """n distinct colours: a qualitative map while it has enough, else one sampled."""
    if n <= 10:
        return [plt.get_cmap(small)(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("turbo")(i / (n - 1)) for i in range(n)]


def save(fig, out_dir, name, dpi):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def x_value(axis):
    """A record's position on the --x axis: its step, tokens seen, or hours of training."""
    key = X_AXES[axis][0]
    return (lambda r: r[key] / 3600) if axis == "time" else (lambda r: r[key])


def plot_loss(runs, out_dir, dpi, ymax, axis):
    x = x_value(axis)
    fig, ax = plt.subplots(figsize=(9, 5.5), layout="constrained")
    for run in runs:
        if run.train:
            ax.plot([x(r) for r in run.train], floats([r["loss"] for r in run.train]), color=run.color, lw=1.2,
                    label=f"{run.label} train")
        if run.val:
            ax.plot([x(r) for r in run.val], floats([r["val_loss"] for r in run.val]), color=run.color, lw=1,
                    ls="--", marker="o", ms=4, label=f"{run.label} val")
        mark_phases(ax, run, color=run.color, text=False, x=x)
    ax.set(xlabel=X_AXES[axis][1], ylabel="loss",
           title="loss (train: lines, val: dashed with markers, dotted: routing changes)")
    if ymax is not None:
        ax.set_ylim(top=ymax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out_dir, "loss.png", dpi)


def expert_ticks(n_experts):
    """The experts the heatmap labels: all up to 16, else every TICK_EVERY-th."""
    return list(range(n_experts)) if n_experts <= 16 else list(range(0, n_experts, TICK_EVERY))


def plot_usage(run, last, out_dir, dpi):
    """The usage heatmap over the last logged steps, and usage over time."""
    recent = run.moe[-last:]
    counts = np.array([[floats(m["counts"]) for m in r["moe"]] for r in recent]).sum(axis=0)  # [layers, experts]
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    L, E = share.shape
    fig = plt.figure(figsize=(12, 7 + 0.3 * L), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[max(2, 0.3 * L), 3])

    ax = fig.add_subplot(grid[0, :])
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ticks = expert_ticks(E)
    ax.set_xticks(ticks, [str(e) for e in ticks])
    ax.set_yticks(range(L), [str(layer) for layer in run.layers], fontsize=9 if L <= 12 else 7)
    ax.set(xlabel="expert", ylabel="layer",
           title=f"{run.label}: share of each layer's routed tokens, steps {recent[0]['step']}-{recent[-1]['step']} "
                 f"({len(recent)} logged steps; uniform {1 / E:.3f})")
    if E <= 16 and L * E <= 256:  # room to print the shares in the cells
        for l in range(L):
            for e in range(E):
                ax.text(e, l, f"{share[l, e]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if share[l, e] > 0.6 * share.max() else "white")
    fig.colorbar(im, ax=ax, label="share", pad=0.01)

    steps, lo = per_layer(run, "usage_min")
    _, hi = per_layer(run, "usage_max")
    _, cv = per_layer(run, "usage_cv")
    colors = [plt.get_cmap("viridis")(j / max(1, L - 1) * 0.9) for j in range(L)]
    ax1, ax2 = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    for j, layer in enumerate(run.layers):
        ax1.plot(steps, hi[:, j], color=colors[j], lw=1)
        ax1.plot(steps, lo[:, j], color=colors[j], lw=1, ls="--")
        ax2.plot(steps, cv[:, j], color=colors[j], lw=1, label=f"layer {layer}")
    ax1.axhline(1 / E, color="k", lw=0.8, alpha=0.5)
    ax1.set(xlabel="step", ylabel="share", title="usage max (solid), min (dashed), uniform (black)")
    ax2.set(xlabel="step", ylabel="cv", title="usage cv (of the expert counts)")
    ax2.legend(fontsize=7, ncol=1 + L // 12, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    for a in (ax1, ax2):
        a.grid(alpha=0.3)
        mark_phases(a, run)
    return save(fig, out_dir, f"{run.name}_usage.png", dpi)


def plot_fanout(runs, last, out_dir, dpi):
    """Experts per token of every MoE run: the histogram over the last logged
    steps (mean over steps and layers) and the mean over time."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        hist = nanmean([floats(m.get("fanout_hist"), len(FANOUT_BINS)) for r in run.moe[-last:] for m in r["moe"]],
                       axis=0)
        ax1.bar(np.arange(len(FANOUT_BINS)) + (i - (len(runs) - 1) / 2) * width, hist, width, color=run.color,
                label=run.label)
        steps, fanout = per_layer(run, "fanout_mean")
        ax2.plot(steps, nanmean(fanout, axis=1), color=run.color, lw=1.2, label=run.label)
        mark_phases(ax2, run, color=run.color, text=len(runs) == 1)
    ax1.set_xticks(range(len(FANOUT_BINS)), FANOUT_BINS)
    ax1.set(xlabel="experts per token", ylabel="share of tokens",
            title=f"experts per token, last {last} logged steps (mean over layers)")
    ax2.set(xlabel="step", ylabel="experts per token", title="mean experts per token (mean over layers)")
    for a in (ax1, ax2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return save(fig, out_dir, "fanout.png", dpi)


def quantiles(values, qs):
    """Per row (step), the qs percentiles over the experts, NaN where none has a value yet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(values, qs, axis=1)


def plot_cutoffs(run, out_dir, dpi):
    """Each layer's cutoffs over time; None for a router without cutoffs (TC). Up to
    LINES_UP_TO experts: a line each; more: their median and quantile bands."""
    if not any("cutoff" in m or "batch_cutoff" in m for r in run.moe for m in r["moe"]):
        return None
    L, E = len(run.layers), run.experts
    cols = min(4, L)
    rows = -(-L // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1.4, 2.8 * rows + 0.6), squeeze=False,
                             layout="constrained")
    steps = np.array([r["step"] for r in run.moe])
    colors = spectrum(E)
    for j, layer in enumerate(run.layers):
        ax = axes.flat[j]
        cutoff = np.array([floats(r["moe"][j].get("cutoff"), E) for r in run.moe])  # NaN before the first update
        batch = np.array([floats(r["moe"][j].get("batch_cutoff"), E) for r in run.moe])
        if E <= LINES_UP_TO:
            for e in range(E):
                ax.plot(steps, batch[:, e], color=colors[e], lw=0.8, alpha=0.3)
                ax.plot(steps, cutoff[:, e], color=colors[e], lw=1.3, label=f"expert {e}")
        else:
            low, q1, median, q3, high = quantiles(cutoff, [0, 25, 50, 75, 100])
            ax.fill_between(steps, low, high, color="C0", alpha=0.15, lw=0, label="tracked: min to max")
            ax.fill_between(steps, q1, q3, color="C0", alpha=0.35, lw=0, label="tracked: middle half")
            ax.plot(steps, median, color="C0", lw=1.3, label="tracked: median")
            ax.plot(steps, quantiles(batch, [50])[0], color="C1", lw=0.9, ls="--", label="batch's: median")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.grid(alpha=0.3)
        mark_phases(ax, run)
        if j + cols >= L:
            ax.set_xlabel("step")
        if j % cols == 0:
            ax.set_ylabel("cutoff (logit)")
    for ax in axes.flat[L:]:
        ax.set_visible(False)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    what = ("solid: tracked cutoff, faint: the batch's k-th largest logit" if E <= LINES_UP_TO else
            f"over the {E} experts; dashed: the batch's k-th largest logit")
    fig.suptitle(f"{run.label}: cutoffs per layer ({what})")
    return save(fig, out_dir, f"{run.name}_cutoffs.png", dpi)


# -----------------------------------------------------------------------------


def positive_int(s):
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not >= 1")
    return n


def check_x_axis(runs, axis):
    key = X_AXES[axis][0]
    for run in runs:
        for rec in run.train + run.val:
            if not isinstance(rec.get(key), (int, float)):
                raise LogError(f"{run.file}: step {rec['step']} has no \"{key}\" (a log from before train_et wrote "
                               f"it): use --x step")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN[:LABEL]",
                        help="a train_et output dir or its train.jsonl; LABEL names the run in the plots and "
                             "file names (default: from its run record, e.g. 'et -e 16 -k 1'; without one, the "
                             "output dir's name)")
    parser.add_argument("-o", "--out", default="plots", metavar="OUTDIR",
                        help="folder to write the PNGs to, made if missing (default: plots)")
    parser.add_argument("--last", type=positive_int, default=10, metavar="N",
                        help="the usage heatmap and the fan-out histogram sum over the last N logged steps "
                             "(default: 10)")
    parser.add_argument("--ymax", type=float, default=None,
                        help="top of the loss plot's y axis, to cut off the first steps' high loss "
                             "(default: all of it)")
    parser.add_argument("--dpi", type=positive_int, default=120, help="resolution of the PNGs (default: 120)")
    parser.add_argument("--x", choices=X_AXES, default="step",
                        help="the loss plot's x axis: steps, tokens seen, or hours of training (default: step)")
    return parser.parse_args(argv)


def make_output_dir(out):
    """Makes the -o folder (dev/plot_routing.py uses it too); returns the error line, or None."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        return f"error: -o: cannot make {out}: {e.strerror}"
    return None


def main(argv=None):
    args = parse_args(argv)
    try:
        runs = read_runs(args.runs)
        check_x_axis(runs, args.x)
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for run in runs:
        print(summary(run))
    try:
        load_plotting()
    except ImportError as e:
        print(f"error: the plots need matplotlib ({e}): pip install -r dev/requirements.txt", file=sys.stderr)
        return 1
    error = make_output_dir(args.out)
    if error:
        print(error, file=sys.stderr)
        return 1

    moe = [run for run in runs if run.moe]
    written = [plot_loss(runs, args.out, args.dpi, args.ymax, args.x)]
    if moe:
        written.append(plot_fanout(moe, args.last, args.out, args.dpi))
    for run in moe:
        written.append(plot_usage(run, args.last, args.out, args.dpi))
        written.append(plot_cutoffs(run, args.out, args.dpi))
    for path in written:
        if path:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
