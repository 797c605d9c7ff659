#!/usr/bin/env python3
"""dev/gpu_check_summary.py OUTDIR: the summary of a dev/gpu_check.sh run, from its logs.

Writes OUTDIR/summary.md (and prints it): the machine; each part's exit status
and time; the GPU tests' and training tests' results with every failure; for
each d12 bench configuration tok/s, MFU, the phase split, the routing share,
attention and the routed experts against cuBLAS, and the peak memory next to model_allocate's plan
(the plan the emulator's dry run checks); the synthetic-corpus runs' losses;
on several GPUs, the step time on one GPU and on all of them (the same
micro-batch per GPU) and the communication share it implies.
A part that has not run (yet) shows as such, so the summary can be rewritten
after every part. Reads bench_step's output format (dev/bench_step.cu).
"""
import glob
import os
import re
import sys

PARTS = [("build", "build"), ("gpu_tests", "GPU tests (both precisions)"), ("train_tests", "training tests"),
         ("bench", "make bench (d12)"), ("synthetic_runs", "synthetic-corpus runs (d6, 300 steps)"),
         ("ranks", "several GPUs (d6 ET, -ep global)")]
BENCH_CONFIGS = ["dense", "et", "ec", "tc"]


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def part_status(out, name):
    """'ok', 'exit N', 'timed out' or 'not run', and the seconds."""
    text = read(os.path.join(out, name + ".status"))
    if text is None:
        return "not run", ""
    rc, seconds = text.split()
    state = "ok" if rc == "0" else "timed out" if rc in ("124", "137") else f"exit {rc}"
    return state, f"{seconds} s"


def test_results(text):
    """(passed, failed, skipped, the FAIL lines) of a test log."""
    if text is None:
        return None
    lines = text.splitlines()
    count = lambda prefix: sum(line.startswith(prefix) for line in lines)
    return count("ok - "), count("FAIL - "), count("skip - "), [line for line in lines if line.startswith("FAIL - ")]


def parse_bench(text):
    """What one bench_step run printed: its headline numbers and phase table."""
    b = {"phases": {}}
    m = re.search(r"^micro-step\s+([\d.]+) ms, (\d+) tokens/s, MFU (\S+)", text, re.M)
    if m:
        b["micro_ms"], b["micro_tok_s"], b["micro_mfu"] = float(m.group(1)), int(m.group(2)), m.group(3)
    m = re.search(r"^train_et step\s+.*: ([\d.]+) ms, (\d+) tokens/s, MFU (\S+)", text, re.M)
    if m:
        b["step_ms"], b["tok_s"], b["mfu"] = float(m.group(1)), int(m.group(2)), m.group(3)
    m = re.search(r"^memory\s+([\d.]+) GiB used by this run .*model_allocate counted ([\d.]+) GiB", text, re.M)
    if m:
        b["peak_gib"], b["plan_gib"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"^moe routing\s+.*: ([\d.]+) ms, ([\d.]+)% of the micro-step", text, re.M)
    if m:
        b["routing_pct"] = float(m.group(2))
    m = re.search(r"^moe experts\s+fwd\+bwd .*ratio ([\d.]+)x", text, re.M)
    if m:
        b["experts_ratio"] = float(m.group(1))
    m = re.search(r"^attention\s+fwd\+bwd ([\d.]+) ms at ([\d.]+) TFLOP/s;.*ratio ([\d.]+)x", text, re.M)
    if m:
        b["attention_ms"], b["attention_tflops"], b["attention_ratio"] = map(float, m.groups())
    m = re.search(r"^cuBLAS bf16\s+([\d.]+) TFLOP/s", text, re.M)
    if m:
        b["cublas_tflops"] = float(m.group(1))
    table = re.search(r"^phase \(all layers\).*\n((?:.*\n)*?)sum of phases", text, re.M)
    if table:
        for line in table.group(1).splitlines():
            m = re.match(r"^(.+?)\s+([\d.]+)\s+([\d.]+)%", line)
            if m:
                b["phases"][m.group(1).strip()] = (float(m.group(2)), float(m.group(3)))
    return b


def parse_run(text):
    """(first loss, last loss, last val loss, last routing line) of a train_et log."""
    losses = re.findall(r"^step\s+\d+/\d+ \| loss ([\d.]+|nan|inf)", text, re.M)
    vals = re.findall(r"val loss ([\d.]+)", text)
    routing = re.findall(r"^\s+moe (.+)$", text, re.M)
    return (losses[0] if losses else "-", losses[-1] if losses else "-", vals[-1] if vals else "-",
            routing[-1].split("|")[0].strip() if routing else "")


def step_ms(text):
    """The mean of a train_et log's step times, the first window (start-up, warm-up) left out."""
    ms = [float(x) for x in re.findall(r"^step\s+\d+/\d+ \|.*\| ([\d.]+) ms \|", text, re.M)][1:]
    return sum(ms) / len(ms) if ms else None


def summary(out):
    lines = []
    machine = read(os.path.join(out, "machine.log")) or ""
    gpu = re.search(r"^(NVIDIA[^,\n]*), ([\d.]+),", machine, re.M)
    lines.append(f"# gpu_check: {gpu.group(1)} (driver {gpu.group(2)})" if gpu else "# gpu_check")
    lines += ["", "| part | result | time |", "|---|---|---|"]
    for name, title in PARTS:
        state, seconds = part_status(out, name)
        lines.append(f"| {title} | {state} | {seconds} |")
    for name, title in (("gpu_tests", "GPU tests"), ("train_tests", "Training tests")):
        r = test_results(read(os.path.join(out, name + ".log")))
        if r is None:
            continue
        lines += ["", f"## {title}: {r[0]} passed, {r[1]} failed, {r[2]} skipped"]
        lines += [f"    {fail[:300]}" for fail in r[3]]
    benches = {c: parse_bench(read(path)) for c in BENCH_CONFIGS
               for path in [os.path.join(out, f"bench_d12_{c}.txt")] if read(path) is not None}
    if benches:
        lines += ["", "## make bench: d12, B = 16, T = 2048 (16 experts for the routers)", "",
                  "| config | tok/s (train_et step) | MFU | micro-step ms | attention vs cuBLAS | experts vs cuBLAS | "
                  "routing share | peak / plan GiB |", "|---|---|---|---|---|---|---|---|"]
        for c, b in benches.items():
            ratio = f"{b['attention_ratio']:.2f}x" if "attention_ratio" in b else "-"
            experts = f"{b['experts_ratio']:.2f}x" if "experts_ratio" in b else "-"
            routing = f"{b['routing_pct']:.1f}%" if "routing_pct" in b else "-"
            memory = f"{b['peak_gib']:.2f} / {b['plan_gib']:.2f}" if "peak_gib" in b else "-"
            lines.append(f"| {c} | {b.get('tok_s', '-')} | {b.get('mfu', '-')} | {b.get('micro_ms', '-')} | {ratio} | "
                         f"{experts} | {routing} | {memory} |")
        phases = []
        for b in benches.values():
            phases += [p for p in b["phases"] if p not in phases]
        lines += ["", "Phase split, ms per micro-step (% of it):", "",
                  "| phase | " + " | ".join(benches) + " |", "|---" * (len(benches) + 1) + "|"]
        for p in phases:
            cells = [f"{b['phases'][p][0]:.1f} ({b['phases'][p][1]:.0f}%)" if p in b["phases"] else ""
                     for b in benches.values()]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    runs = {os.path.basename(path)[4:-4]: parse_run(read(path)) for path in sorted(glob.glob(os.path.join(out, "run_*.log")))}
    if runs:
        lines += ["", "## Synthetic corpus, d6, 300 steps", "", "| run | first loss | last loss | val loss | routing |",
                  "|---|---|---|---|---|"]
        for name, (first, last, val, routing) in runs.items():
            lines.append(f"| {name} | {first} | {last} | {val} | {routing} |")
    ranks = {}
    for path in glob.glob(os.path.join(out, "ranks_*.log")):
        n, ms = os.path.basename(path)[6:-4], step_ms(read(path))
        if n.isdigit() and ms:
            ranks[int(n)] = ms
    if 1 in ranks and len(ranks) > 1:
        n = max(ranks)
        lines += ["", f"## Several GPUs: d6 ET, -ep global, -b 8 x -t 512 per GPU", "",
                  f"one GPU {ranks[1]:.1f} ms per step, {n} GPUs {ranks[n]:.1f} ms: communication share "
                  f"{1 - ranks[1] / ranks[n]:.1%} of the step (dev/comm_model.py predicts the paper's sizes)"]
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) != 2 or not os.path.isdir(argv[1]):
        print("usage: dev/gpu_check_summary.py OUTDIR (the folder dev/gpu_check.sh wrote)", file=sys.stderr)
        return 2
    text = summary(argv[1])
    with open(os.path.join(argv[1], "summary.md"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
