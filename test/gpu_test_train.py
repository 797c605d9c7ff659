"""test/gpu_test_train.py: whole training runs of train_et on a GPU.

A tiny dense model must overfit one batch, the same seed must give
bit-identical losses twice, a resumed run must continue bit-exactly where
the uninterrupted one went, and a run on the synthetic corpus must learn.
run_tests.sh runs this file only where a CUDA device exists.
"""
import json
import os
import random
import struct
import subprocess
import tempfile

from harness import REPO, main

TRAIN_ET = os.path.join(REPO, "train_et")
TINY = ["-m", "tiny", "-e", "0", "-b", "4", "-t", "64", "-d", "256", "-v", "0", "-s", "0", "-li", "1"]


def write_shard(path, tokens):
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240520, 1, len(tokens), *([0] * 253)))
        f.write(struct.pack(f"<{len(tokens)}H", *tokens))


def train(out_dir, *args):
    r = subprocess.run([TRAIN_ET, *TINY, "-o", out_dir, *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"train_et {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}"
    return r.stdout


def losses(out_dir):
    """step (1-based, steps done) -> (loss, grad_norm) from the JSON log; later lines win (a resume appends)."""
    out = {}
    with open(os.path.join(out_dir, "train.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = (rec["loss"], rec["grad_norm"])
    return out


def random_shard(directory, n_tokens, vocab=1000, seed=0):
    rng = random.Random(seed)
    path = os.path.join(directory, "train_000001.bin")
    write_shard(path, [rng.randrange(vocab) for _ in range(n_tokens)])
    return path


def test_tiny_model_overfits_one_batch():
    with tempfile.TemporaryDirectory() as d:
        shard = random_shard(d, 4 * 64 + 1)  # exactly one batch: every step sees it
        train(f"{d}/out", "-i", shard, "-x", "1000", "-l", "3e-3", "-u", "20", "-q", "0.1", "-c", "0", "-li", "100")
        final = losses(f"{d}/out")[1000][0]
        assert final < 0.1, f"loss after 1000 steps on one batch: {final}"


def test_same_seed_same_losses():
    with tempfile.TemporaryDirectory() as d:
        shard = random_shard(d, 50000)
        train(f"{d}/a", "-i", shard, "-x", "30")
        train(f"{d}/b", "-i", shard, "-x", "30")
        a, b = losses(f"{d}/a"), losses(f"{d}/b")
        assert len(a) == 30 and a == b, "two runs with the same seed differ"
        train(f"{d}/c", "-i", shard, "-x", "30", "-sd", "7")
        assert losses(f"{d}/c") != a, "a different seed gave the same losses"


def test_resume_is_bit_exact():
    with tempfile.TemporaryDirectory() as d:
        shard = random_shard(d, 50000)
        train(f"{d}/whole", "-i", shard, "-x", "30")
        train(f"{d}/parts", "-i", shard, "-x", "30", "-n", "15")
        os.remove(f"{d}/parts/ckpt_0000000030.bin")  # as if the run had died after step 15's checkpoint
        out = train(f"{d}/parts", "-i", shard, "-x", "30", "-y", "1")
        assert "resumed" in out and "ckpt_0000000015.bin" in out, out
        whole, parts = losses(f"{d}/whole"), losses(f"{d}/parts")
        for step in range(16, 31):
            assert parts[step] == whole[step], f"step {step}: resumed {parts[step]} vs uninterrupted {whole[step]}"


def test_synthetic_corpus_learns():
    with tempfile.TemporaryDirectory() as d:
        out = train(f"{d}/out", "-i", "synthetic", "-sv", "2048", "-x", "300", "-l", "3e-3", "-v", "100",
                    "-vm", "4", "-s", "100", "-g", "16")
        log = losses(f"{d}/out")
        assert log[300][0] < log[1][0] - 2.0, f"loss {log[1][0]} -> {log[300][0]}"
        assert "val loss" in out and "sample:" in out, out


if __name__ == "__main__":
    main(globals())
