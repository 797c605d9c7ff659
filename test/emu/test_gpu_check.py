"""test/emu/test_gpu_check.py: what of dev/gpu_check.sh a machine without a GPU can check.

It must stop at once without a GPU, touching nothing. Its summary
(dev/gpu_check_summary.py) must read what the real programs print: here the
emulated bench_step and train_et (test/emu) write the bench and run logs, in
the very format the GPU run will, at a tiny size.
"""
import os
import re
import stat
import subprocess
import tempfile

from harness import REPO, main

EMU = os.path.join(REPO, "build/emu/plain")


def no_gpu_path(directory):
    """A PATH whose nvidia-smi lists no GPU, whatever this machine has."""
    fake = os.path.join(directory, "nvidia-smi")
    with open(fake, "w") as f:
        f.write("#!/bin/sh\necho 'NVIDIA-SMI has failed: no devices' >&2\nexit 9\n")
    os.chmod(fake, os.stat(fake).st_mode | stat.S_IEXEC)
    return directory + os.pathsep + os.environ["PATH"]


def test_stops_cleanly_without_a_gpu():
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, PATH=no_gpu_path(d))
        r = subprocess.run(["bash", os.path.join(REPO, "dev/gpu_check.sh"), f"{d}/out"], capture_output=True,
                           text=True, env=env, timeout=60)
        assert r.returncode == 2 and "no GPU here" in r.stderr, f"exit {r.returncode}: {r.stderr}"
        assert not os.path.exists(f"{d}/out"), "it made its output folder without a GPU"


def run(*args, **kw):
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{' '.join(args)}: exit {r.returncode}: {r.stderr[-800:]}"
    return r.stdout


def test_summary_reads_real_bench_and_run_output():
    with tempfile.TemporaryDirectory() as out:
        benches = {}
        for config, flags in (("dense", []), ("et", ["-e", "4", "-rt", "et"])):
            text = run(f"{EMU}/bench_step", "-m", "tiny", "-b", "2", "-t", "32", "-r", "1", "-g", "64", *flags)
            benches[config] = text
            with open(f"{out}/bench_d12_{config}.txt", "w") as f:
                f.write(text)
        run(f"{EMU}/train_et", "-m", "tiny", "-e", "4", "-r", "et", "-i", "synthetic", "-sv", "1024", "-b", "2",
            "-t", "32", "-d", "64", "-x", "6", "-v", "3", "-vm", "1", "-s", "0", "-li", "3", "-o", f"{out}/run_et")
        with open(f"{out}/run_et/train.log") as src, open(f"{out}/run_et.log", "w") as dst:
            dst.write(src.read())
        for part, status in (("build", "0 85"), ("gpu_tests", "1 14"), ("bench", "124 150")):
            with open(f"{out}/{part}.status", "w") as f:
                f.write(status + "\n")
        with open(f"{out}/gpu_tests.log", "w") as f:
            f.write("ok - gpu_bf16_a\nok - gpu_bf16_b\nFAIL - gpu_bf16_c: relative error 1e+00\nskip - gpu_bf16_d: x\n")
        with open(f"{out}/machine.log", "w") as f:
            f.write("NVIDIA H200, 580.65.06, 1980 MHz, 2619 MHz, 35, 120.5 W\n")
        for n, ms in ((1, (900, 100, 100)), (2, (950, 120, 130))):  # train_et's step lines; the first window is start-up
            with open(f"{out}/ranks_{n}.log", "w") as f:
                for i, t in enumerate(ms):
                    f.write(f"step {10 * i + 10:6d}/60 | loss 5.0000 | lr 1.00e-03 | norm 1.000 | {t} ms | 40000 tok/s | "
                            f"MFU 1.0% | ETA 5s\n")
        summary = run("python3", os.path.join(REPO, "dev/gpu_check_summary.py"), out)
        assert "one GPU 100.0 ms per step, 2 GPUs 125.0 ms: communication share 20.0% of the step" in summary, summary
        assert summary == open(f"{out}/summary.md").read()
        for want in ("# gpu_check: NVIDIA H200 (driver 580.65.06)", "| build | ok | 85 s |", "| GPU tests (both "
                     "precisions) | exit 1 | 14 s |", "| make bench (d12) | timed out | 150 s |",
                     "| training tests | not run |", "## GPU tests: 2 passed, 1 failed, 1 skipped",
                     "FAIL - gpu_bf16_c: relative error 1e+00"):
            assert want in summary, f"'{want}' missing from the summary:\n{summary}"
        for config, text in benches.items():
            tok_s = re.search(r"^train_et step .*, (\d+) tokens/s, MFU (\S+)", text, re.M)
            micro = re.search(r"^micro-step\s+([\d.]+) ms", text, re.M).group(1)
            row = re.search(rf"^\| {config} \| (\d+) \| (\S+) \| ([\d.]+) \| (\S+) \| (\S+) \| (\S+) \| (.+) \|$", summary,
                            re.M)
            assert row, f"no bench row for {config}:\n{summary}"
            # the summary writes the micro-step's ms as a float ("443.4"), bench_step with three decimals ("443.400")
            assert row.group(1) == tok_s.group(1) and row.group(2) == tok_s.group(2) and \
                float(row.group(3)) == float(micro), row.group(0)
            assert re.match(r"[\d.]+ / [\d.]+", row.group(7)), row.group(0)
            assert (row.group(5) != "-") == (row.group(6) != "-") == (config == "et"), \
                f"experts vs cuBLAS and routing share: {row.group(0)}"
        for phase in ("attention forward", "loss (softcap CE + sum)", "moe dispatch"):
            assert re.search(rf"^\| {re.escape(phase)} \| ", summary, re.M), f"phase '{phase}' missing:\n{summary}"
        run_row = re.search(r"^\| et \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (.+) \|$", summary, re.M)
        assert run_row and "moe et" not in run_row.group(4) and run_row.group(4).startswith("et"), \
            f"the ET run's row:\n{summary}"


if __name__ == "__main__":
    main(globals())
