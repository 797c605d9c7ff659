"""test/gpu_test_train.py: whole training runs of train_et on a GPU, or on the emulated device.

A tiny dense model must overfit one batch, the same seed must give
bit-identical losses twice, a resumed run must continue bit-exactly where
the uninterrupted one went (dense, ET across its warm-up switch, and Muon), and a
run on the synthetic corpus must learn, dense and with each router, with
routing statistics that obey the router's rules, and with -opt muon; the routes
of a text (-rf) must draw into pictures whose fanout is the logged one. A run must describe itself
(train.log is the console, train.jsonl opens with the run record, every
record carries tokens and seconds, a checkpoint is the size start-up said);
a resume may change the schedule (with a warning) but nothing else; and on
the emulated device, a CUDA that cannot start is named as what it is.

run_tests.sh runs it with ./train_et where a CUDA device exists, and else with
TRAIN_ET_EMULATED=1: build/emu/plain/train_et on the emulated device (test/emu),
which runs the same program about a million times slower, so at a quarter of
the tokens per step and fewer steps; the assertions are the same. There the
second run of the same seed also runs its threads in a random order: the
losses must not change by a bit.
"""
import json
import os
import random
import re
import struct
import subprocess
import tempfile

from harness import REPO, Skip, main

EMULATED = os.environ.get("TRAIN_ET_EMULATED") == "1"
TRAIN_ET = os.path.join(REPO, "build/emu/plain/train_et" if EMULATED else "train_et")
B, T = (2, 32) if EMULATED else (4, 64)
TOKENS = B * T  # per step: one micro-batch
OVERFIT_STEPS = 200 if EMULATED else 1000
LEARN_STEPS = 150 if EMULATED else 300  # the synthetic-corpus runs
VOCAB = 1024  # of the random shards: their tokenizer table says so
TINY = ["-m", "tiny", "-e", "0", "-b", str(B), "-t", str(T), "-d", str(TOKENS), "-v", "0", "-s", "0", "-li", "1"]


def write_shard(path, tokens):
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240520, 1, len(tokens), *([0] * 253)))
        f.write(struct.pack(f"<{len(tokens)}H", *tokens))


def write_tokenizer_table(path, vocab):
    """A gpt2_tokenizer.bin (magic 20240328, version 2, vocab, EOT) of `vocab` made-up tokens."""
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240328, 2, vocab, vocab - 1, *([0] * 252)))
        for i in range(vocab):
            text = f" t{i}".encode()
            f.write(bytes([len(text)]) + text)


def train(out_dir, *args, schedule=None):
    env = dict(os.environ, EMU_SCHEDULE=schedule) if schedule else None
    r = subprocess.run([TRAIN_ET, *TINY, "-o", out_dir, *args], capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, f"train_et {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}"
    return r.stdout


def run_records(out_dir):
    with open(os.path.join(out_dir, "train.jsonl")) as f:
        return [json.loads(line) for line in f]


def records(out_dir):
    """step (1-based, steps done) -> its training record in the JSON log; later lines win (a resume appends)."""
    out = {}
    with open(os.path.join(out_dir, "train.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec
    return out


def losses(out_dir):
    """step -> (loss, grad_norm)"""
    return {step: (rec["loss"], rec["grad_norm"]) for step, rec in records(out_dir).items()}


def random_shard(directory, n_tokens, seed=0):
    """A train shard of random ids below 1000, with a tokenizer table of VOCAB beside it."""
    rng = random.Random(seed)
    path = os.path.join(directory, "train_000001.bin")
    write_shard(path, [rng.randrange(1000) for _ in range(n_tokens)])
    write_tokenizer_table(os.path.join(directory, "gpt2_tokenizer.bin"), VOCAB)
    return path


def test_tiny_model_overfits_one_batch():
    with tempfile.TemporaryDirectory() as d:
        shard = random_shard(d, TOKENS + 1)  # exactly one batch: every step sees it
        train(f"{d}/out", "-i", shard, "-x", str(OVERFIT_STEPS), "-l", "3e-3", "-u", "20", "-q", "0.1", "-c", "0",
              "-li", "100")
        final = losses(f"{d}/out")[OVERFIT_STEPS][0]
        assert final < 0.1, f"loss after {OVERFIT_STEPS} steps on one batch: {final}"


def test_same_seed_same_losses():
    with tempfile.TemporaryDirectory() as d:
        shard = random_shard(d, 50000)
        train(f"{d}/a", "-i", shard, "-x", "30")
        train(f"{d}/b", "-i", shard, "-x", "30", schedule="random:5" if EMULATED else None)
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
        out = train(f"{d}/out", "-i", "synthetic", "-sv", "2048", "-x", str(LEARN_STEPS), "-l", "3e-3", "-v", "100",
                    "-vm", "4", "-s", "100", "-g", "16")
        log = losses(f"{d}/out")
        assert log[LEARN_STEPS][0] < log[1][0] - 2.0, f"loss {log[1][0]} -> {log[LEARN_STEPS][0]}"
        assert "val loss" in out and "sample:" in out, out
        assert re.search(r"^memory +[\d.]+ GiB on the GPU: parameters .*, activations [\d.]+", out, re.M), \
            f"no memory plan in the start-up report: {out}"
        assert not any("moe" in rec for rec in records(f"{d}/out").values()), "a dense run logged routing"


def test_run_describes_itself():
    with tempfile.TemporaryDirectory() as d:
        args = ["-i", "synthetic", "-sv", "2048", "-x", "6", "-e", "4", "-v", "3", "-vm", "1", "-n", "3"]
        r = subprocess.run([TRAIN_ET, *TINY, "-o", f"{d}/out", *args], capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stderr
        with open(f"{d}/out/train.log") as f:
            assert f.read() == r.stdout, "train.log is not what the console showed"
        lines = run_records(f"{d}/out")
        run = lines[0]["run"]
        assert run["argv"] == [TRAIN_ET, *TINY, "-o", f"{d}/out", *args], run["argv"]
        settings = run["settings"]
        assert settings["-x"] == 6 and settings["-u"] == 0 and settings["-ew"] == 1, settings  # -u, -ew resolved
        assert (settings["-e"], settings["-r"], settings["-k"], settings["-b"], settings["-sd"]) == (4, "et", 1, B, 1337)
        assert run["data"]["synthetic"] and run["data"]["train"]["tokens"] == 1024 * 2**20, run["data"]
        assert run["params"]["total"] > run["params"]["active"] > 0 and run["flops_per_token"] > 0, run
        assert run["batch"] == {"tokens_per_step": TOKENS, "micro_steps": 1, "steps": 6}, run["batch"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", run["start_time"]) and run["gpu"], run
        assert run["resumed_from_step"] is None and run["precision"] == "BF16", run
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        if head:  # built from a git checkout
            assert run["git"]["commit"] == head and isinstance(run["git"]["dirty"], bool), run["git"]
        elapsed = [rec["elapsed_s"] for rec in lines[1:]]
        assert elapsed == sorted(elapsed) and elapsed[0] >= 0, elapsed
        assert all(rec["tokens"] == rec["step"] * TOKENS for rec in lines[1:]), lines[1:]
        assert [rec["step"] for rec in lines[1:] if "val_loss" in rec] == [0, 3, 6], lines
        checkpoint = os.path.getsize(f"{d}/out/ckpt_0000000006.bin")
        assert checkpoint == run["checkpoint_bytes"], f"checkpoint {checkpoint} bytes, start-up said {run['checkpoint_bytes']}"
        assert f"{checkpoint / 2**30:.2f} GiB each" in r.stdout and str(run["memory_bytes"]) != "0", r.stdout


def test_resume_may_change_the_schedule_only():
    """After a divergence train_et advises a resume with a lower -l: that resume must work (with a
    warning), and go on at the new rate; a resume that changes the run itself stops before the GPU."""
    with tempfile.TemporaryDirectory() as d:
        shard = random_shard(d, 50000)
        train(f"{d}/run", "-i", shard, "-x", "20", "-n", "10")
        os.remove(f"{d}/run/ckpt_0000000020.bin")
        whole = records(f"{d}/run")
        r = subprocess.run([TRAIN_ET, *TINY, "-o", f"{d}/run", "-i", shard, "-x", "30", "-y", "1"], capture_output=True,
                           text=True, timeout=1200)
        assert r.returncode == 1 and "gpu " not in r.stdout and r.stderr.startswith(
            f"error: {d}/run/ckpt_0000000010.bin: its run had the step count (-x) 20, this one 30; resume with"), r.stderr
        out = train(f"{d}/run", "-i", shard, "-x", "20", "-y", "1", "-l", "3e-4")
        want = "warning: resuming with -l 0.0003 where the checkpoint's run had 0.0006: the run goes on with 0.0003 from step 10"
        assert want in out.splitlines(), out
        resumed = records(f"{d}/run")
        assert resumed[11]["lr"] < whole[11]["lr"] and resumed[11]["loss"] == whole[11]["loss"], (resumed[11], whole[11])
        assert resumed[11]["elapsed_s"] >= whole[10]["elapsed_s"], "the resumed run's clock started again from 0"
        starts = [line["run"] for line in run_records(f"{d}/run") if "run" in line]
        assert [s["resumed_from_step"] for s in starts] == [None, 10], starts


def test_cuda_start_failures_are_named():
    """No driver at all is 'no CUDA device'; a driver too old for this CUDA is named as that, with both versions."""
    if not EMULATED:
        raise Skip("the emulated device stands in for the machines without a working driver",
                   "TRAIN_ET_EMULATED=1 python3 test/gpu_test_train.py test_cuda_start_failures_are_named")
    with tempfile.TemporaryDirectory() as d:
        for driver, want in (("0", "error: no CUDA device (cudaGetDeviceCount: CUDA driver version is insufficient for "
                                   "CUDA runtime version, no NVIDIA driver): train_et trains on an NVIDIA GPU; this "
                                   "machine has none"),
                             ("12040", "error: CUDA cannot start: cudaGetDeviceCount: cudaErrorInsufficientDriver (CUDA "
                                       "driver version is insufficient for CUDA runtime version); the driver supports "
                                       "CUDA 12.4, this program was built with CUDA ")):
            r = subprocess.run([TRAIN_ET, *TINY, "-i", "synthetic", "-o", f"{d}/out"], capture_output=True, text=True,
                               timeout=120, env=dict(os.environ, EMU_CUDA_DRIVER=driver))
            assert r.returncode == 1 and r.stderr.startswith(want) and r.stderr.count("\n") == 1, r.stderr
            assert driver == "0" or re.fullmatch(r".* CUDA \d+\.\d\n", r.stderr), r.stderr


# The MoE runs: tiny has one MoE layer (layer 1); 4 experts and a pool of
# one micro-batch of B x T tokens (one micro-step per step), so each
# expert's target is k = B x T / 4 tokens, and ET's clamp (C = 0.5) keeps
# every expert within [k/2, 3k/2].
MOE_STEPS, MOE_TOKENS, MOE_K = LEARN_STEPS, TOKENS, TOKENS // 4


def moe_run(d, router):
    """Trains tiny with 4 experts on the synthetic corpus; checks that it learns and the
    routing statistics add up; returns the training records."""
    train(f"{d}/out", "-i", "synthetic", "-sv", "2048", "-x", str(MOE_STEPS), "-l", "3e-3", "-e", "4", "-r", router)
    recs = records(f"{d}/out")
    first, last = recs[1]["loss"], recs[MOE_STEPS]["loss"]
    assert last < first - 1.5, f"{router}: loss {first} -> {last}"
    for step, rec in recs.items():
        assert len(rec["moe"]) == 1 and rec["moe"][0]["layer"] == 1, f"{router} step {step}: {rec['moe']}"
        m = rec["moe"][0]
        assert len(m["counts"]) == 4 and len(m["fanout_hist"]) == 4, f"{router} step {step}: {m}"
        assert abs(sum(m["counts"]) / MOE_TOKENS - m["fanout_mean"]) < 1e-5, f"{router} step {step}: {m}"
        assert abs(sum(m["fanout_hist"]) - 1) < 1e-5, f"{router} step {step}: {m}"
    return recs


def test_expert_choice_routes_k_tokens_per_expert():
    with tempfile.TemporaryDirectory() as d:
        for step, rec in moe_run(d, "ec").items():
            m = rec["moe"][0]
            assert rec["routing"] == "ec" and m["counts"] == [MOE_K] * 4, f"step {step}: {rec['routing']} {m}"
            assert m["fanout_mean"] == 1 and m["usage_cv"] == 0 and len(m["batch_cutoff"]) == 4, f"step {step}: {m}"


def test_expert_threshold_switches_after_warmup():
    with tempfile.TemporaryDirectory() as d:
        warmup = MOE_STEPS // 5  # the default: 20% of the run
        for step, rec in moe_run(d, "et").items():
            m = rec["moe"][0]
            if step <= warmup:  # steps 0 .. warmup-1 (logged as 1 .. warmup) route with EC
                assert rec["routing"] == "ec (et warm-up)", f"step {step}: routing {rec['routing']}"
                assert m["counts"] == [MOE_K] * 4, f"step {step}: {m['counts']}"
                continue
            assert rec["routing"] == "et", f"step {step}: routing {rec['routing']}"
            assert all(MOE_K // 2 <= c <= MOE_K * 3 // 2 for c in m["counts"]), f"step {step}: clamp broken {m['counts']}"
            assert 0.5 <= m["fanout_mean"] <= 1.5, f"step {step}: {m['fanout_mean']} experts per token"
            assert len(m["cutoff"]) == 4 and None not in m["cutoff"] and m["cutoff_dev"] is not None, f"step {step}: {m}"


def test_token_choice_takes_k_experts_per_token():
    with tempfile.TemporaryDirectory() as d:
        for step, rec in moe_run(d, "tc").items():
            m = rec["moe"][0]
            assert rec["routing"] == "tc" and m["fanout_mean"] == 1 and m["fanout_hist"][1] == 1, f"step {step}: {m}"
            assert m["aux_loss"] is not None and m["aux_loss"] > 0 and "cutoff" not in m, f"step {step}: {m}"


def test_expert_threshold_resume_is_bit_exact():
    """Resumed from a checkpoint inside the EC warm-up, the run crosses the switch to
    thresholds exactly as the uninterrupted one: losses, gradient norms, routing."""
    et = ["-e", "4", "-r", "et", "-ew", "10"]
    with tempfile.TemporaryDirectory() as d:
        shard = random_shard(d, 50000)
        train(f"{d}/whole", "-i", shard, "-x", "30", *et)
        train(f"{d}/parts", "-i", shard, "-x", "30", *et, "-n", "8", "-nk", "0")
        for step in (16, 24, 30):  # as if the run had died after step 8's checkpoint
            os.remove(f"{d}/parts/ckpt_{step:010d}.bin")
        out = train(f"{d}/parts", "-i", shard, "-x", "30", *et, "-y", "1")
        assert "resumed" in out and "ckpt_0000000008.bin" in out, out
        whole, parts = records(f"{d}/whole"), records(f"{d}/parts")
        assert whole[30]["routing"] == "et", whole[30]["routing"]
        for step in range(9, 31):
            for key in ("loss", "grad_norm", "routing", "moe"):
                assert parts[step][key] == whole[step][key], f"step {step} {key}: resumed {parts[step][key]} vs {whole[step][key]}"


MUON = ["-e", "4", "-r", "et", "-opt", "muon"]


def test_muon_learns():
    """-opt muon (the paper's recipe: Muon for the matrices, AdamW for wte, lm_head and the
    router) learns the synthetic corpus, and the run record lists its groups."""
    with tempfile.TemporaryDirectory() as d:
        train(f"{d}/out", "-i", "synthetic", "-sv", "2048", "-x", str(LEARN_STEPS), *MUON, "-v", str(LEARN_STEPS // 2),
              "-vm", "4")
        val = [rec["val_loss"] for rec in run_records(f"{d}/out") if "val_loss" in rec]
        assert len(val) == 3 and val[2] < val[0] - 3.0, f"validation loss {val}"
        groups = {g["name"]: g for g in run_records(f"{d}/out")[0]["run"]["optimizer_groups"]}
        assert sorted(groups) == ["embedding", "head", "matrices", "router"], groups
        assert groups["matrices"]["optimizer"] == "muon" and not groups["matrices"]["warmup"], groups
        assert all(groups[g]["optimizer"] == "adamw" and groups[g]["warmup"] for g in ("embedding", "head", "router"))
        assert abs(groups["matrices"]["peak_lr"] - 0.02) < 1e-12, groups  # the code's: no muP factor on Muon
        assert abs(groups["head"]["peak_lr"] - 0.004 * (768 / 64) ** 0.5) < 1e-9, groups


def test_muon_resume_is_bit_exact():
    """Muon's momentum (and its warm-up, which the step drives) survives a checkpoint."""
    with tempfile.TemporaryDirectory() as d:
        shard = random_shard(d, 50000)
        train(f"{d}/whole", "-i", shard, "-x", "30", *MUON, "-ew", "10")
        train(f"{d}/parts", "-i", shard, "-x", "30", *MUON, "-ew", "10", "-n", "12", "-nk", "0")
        for step in (24, 30):
            os.remove(f"{d}/parts/ckpt_{step:010d}.bin")
        out = train(f"{d}/parts", "-i", shard, "-x", "30", *MUON, "-ew", "10", "-y", "1")
        assert "resumed" in out and "ckpt_0000000012.bin" in out, out
        whole, parts = records(f"{d}/whole"), records(f"{d}/parts")
        for step in range(13, 31):
            for key in ("loss", "grad_norm", "moe"):
                assert parts[step][key] == whole[step][key], f"step {step} {key}: resumed {parts[step][key]} vs {whole[step][key]}"


def test_routing_pictures_match_the_log():
    """-rf writes the routes of a text at the end; dev/plot_routing.py draws them, and the
    fanout in its pictures is the fanout train_et logged for the same tokens."""
    with tempfile.TemporaryDirectory() as d:
        train(f"{d}/out", "-i", "synthetic", "-sv", "1024", "-x", "20", "-e", "4", "-r", "et", "-ew", "5",
              "-rf", "synthetic", "-ro", "100")
        logged = [rec for rec in run_records(f"{d}/out") if "routes" in rec]
        assert len(logged) == 1 and logged[0]["step"] == 20 and logged[0]["routes_tokens"] == T, logged
        r = subprocess.run(["python3", os.path.join(REPO, "dev/plot_routing.py"), logged[0]["routes"], "-o",
                            f"{d}/plots"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        with open(f"{d}/plots/routes_summary.json") as f:
            summary = json.load(f)
        text = summary["texts"][0]
        assert text["n_tokens"] == T and text["router"] == "et" and text["layers"] == [1], text
        assert all(abs(a - b) < 1e-5 for a, b in zip(text["layer_fanout_mean"], logged[0]["routes_fanout"])), \
            (text["layer_fanout_mean"], logged[0]["routes_fanout"])
        assert abs(sum(text["fanout"]) / T - logged[0]["routes_fanout"][0]) < 1e-5, text["fanout"]
        names = [dom["name"] for dom in summary["domains"]["by_domain"]]
        assert set(names) <= {"steady", "syntax", "lexicon", "branching", "noise"} and names, names
        for picture in ("experts_by_domain.png", "routes_000020_fanout.png", "routes_000020_fanout.html"):
            assert os.path.getsize(f"{d}/plots/{picture}") > 1000, picture


if __name__ == "__main__":
    main(globals())
