"""test/gpu_test_core.py: CORE end to end, as a user runs it, on a GPU or the emulated device.

The shared miniature of the CORE bundle (18 of the 22 tasks, real rows) is
tokenized by data/core.py with a small BPE that data/prepare.py trains on the
shared FineWeb-Edu text (a vocab of 1,024: the synthetic corpus's smallest,
so a tiny model trained on it reads the same ids). train_et trains that tiny
ET model for a few steps with -ce and scores CORE halfway (-cv) and at the end: the record must
name the 4 missing tasks and mark CORE partial, hold each task's accuracy
over its examples, and CORE must be the mean of the centered accuracies.
Evaluating the saved checkpoint on its own (-eo 1) must give the same
scores, bit for bit: the fixed-shape batches make every score independent
of what else is evaluated.

run_tests.sh runs it with TRAIN_ET_EMULATED=1 where there is no GPU
(build/emu/plain/train_et, the CUDA code on the CPU); the closing line of
train_et's report is what README "Evaluation" shows.
"""
import importlib.util
import json
import os
import subprocess
import tempfile

from harness import REPO, Skip, main, shared_file

EMULATED = os.environ.get("TRAIN_ET_EMULATED") == "1"
TRAIN_ET = os.path.join(REPO, "build/emu/plain/train_et" if EMULATED else "train_et")
MISSING = ["hellaswag_zeroshot", "hellaswag", "squad", "coqa"]
RUN = ["-m", "tiny", "-e", "4", "-r", "et", "-ew", "3", "-b", "8", "-t", "32", "-d", "256", "-v", "0", "-s", "0",
       "-li", "5", "-i", "synthetic", "-sv", "1024", "-x", "10"]


def run(*args):
    r = subprocess.run([*args], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"{' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-2000:]}"
    return r.stdout


def core_file(d):
    """The miniature, tokenized with a 1,024-token BPE trained on the shared text."""
    bundle, text = shared_file("core_sample"), shared_file("fineweb_edu_sample.txt")
    if importlib.util.find_spec("rustbpe") is None or importlib.util.find_spec("tiktoken") is None:
        raise Skip("rustbpe or tiktoken is not installed", "pip install -r data/requirements.txt")
    with open(text, encoding="utf-8") as f, open(f"{d}/text.txt", "w", encoding="utf-8") as out:
        out.write(f.read(300000))
    run("python3", os.path.join(REPO, "data/prepare.py"), "train-tokenizer", "--input", f"{d}/text.txt",
        "--doc-split", "none", "--vocab-size", "1024", f"{d}/bpe.tokenizer")
    run("python3", os.path.join(REPO, "data/core.py"), "--bundle", bundle, "--tokenizer", f"{d}/bpe.tokenizer",
        "--max-per-task", "11", "--out", f"{d}/core.bin")
    return f"{d}/core.bin"


def core_records(out_dir):
    with open(os.path.join(out_dir, "train.jsonl")) as f:
        return [rec for rec in map(json.loads, f) if "core" in rec]


def test_core_of_a_tiny_model():
    with tempfile.TemporaryDirectory() as d:
        core = core_file(d)
        log = run(TRAIN_ET, *RUN, "-ce", core, "-cv", "5", "-o", f"{d}/out")
        assert "core     " + core + ": 18 of 22 tasks (partial), 198 examples" in log, log
        mid, rec = core_records(f"{d}/out")  # -cv 5: at step 5, and at the end
        assert mid["step"] == 5 and mid["core"] != rec["core"], (mid, rec)
        assert rec["step"] == 10 and rec["core_partial"] and rec["core_missing"] == MISSING, rec
        tasks = rec["core_tasks"]
        assert len(tasks) == 18 and all(t["examples"] == 11 for t in tasks.values()), tasks
        assert all(0 <= t["accuracy"] <= 1 and abs(t["accuracy"] * 11 - round(t["accuracy"] * 11)) < 1e-4
                   for t in tasks.values()), tasks
        mean = sum(t["centered"] for t in tasks.values()) / len(tasks)
        assert abs(mean - rec["core"]) < 1e-5, (mean, rec["core"])
        # a task at its random baseline scores 0 centered: arc_easy's is 25%
        assert abs(tasks["arc_easy"]["centered"] - (tasks["arc_easy"]["accuracy"] - 0.25) / 0.75) < 1e-6, tasks
        log = run(TRAIN_ET, *RUN, "-ce", core, "-cv", "5", "-o", f"{d}/out", "-eo", "1")
        assert "done: evaluated" in log, log
        again = core_records(f"{d}/out")[-1]
        assert again["core"] == rec["core"] and again["core_tasks"] == tasks, (again, rec)


if __name__ == "__main__":
    main(globals())
