"""test/test_cli.py: train_et's flags and start-up, run as a user runs it.

Checks that -h lists every flag (and the README's table does too), that each
kind of bad flag or value gets one error line naming the flag and what is
allowed, how the data source is chosen (synthetic fallback only for the
default location), that bad shards are named, and what start-up reports.
Every run is shown no GPU (CUDA_VISIBLE_DEVICES empty), so on any machine it
stops right after start-up; test/gpu_test_train.py is where training runs.
"""
import atexit
import os
import re
import shutil
import struct
import subprocess
import tempfile

from harness import REPO, main, shared_file

TRAIN_ET = os.path.join(REPO, "train_et")
FLAGS = ["-i", "-j", "-o", "-y", "-n", "-nk", "-sv", "-m", "-e", "-r", "-k", "-kv", "-eb", "-ew", "-ec", "-tb",
         "-ta", "-tu", "-ep", "-er", "-b", "-t", "-d", "-x", "-l", "-u", "-q", "-a", "-wd", "-c", "-gc",
         "-v", "-vm", "-s", "-g", "-li", "-sd", "-h"]
SMALL = ["-m", "tiny", "-t", "64", "-b", "4", "-d", "256"]
# Runs start in an empty folder: no data/ there (so the synthetic fallback
# is what the default gives) and whatever a run writes stays out of the repo.
WORK = tempfile.mkdtemp(prefix="train_et_cli_")
atexit.register(shutil.rmtree, WORK, ignore_errors=True)
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def train_et(*args, cwd=WORK):
    if not os.path.exists(TRAIN_ET):
        raise AssertionError(f"{TRAIN_ET} is not built (make train_et)")
    return subprocess.run([TRAIN_ET, *args], capture_output=True, text=True, cwd=cwd, env=NO_GPU, timeout=120)


def assert_stopped_at_gpu(r):
    """Past start-up the run needs a GPU: without one, one clear error line."""
    assert r.returncode == 1, r.returncode
    assert r.stderr.startswith("error: no CUDA device") and r.stderr.count("\n") == 1, r.stderr


def test_help_lists_every_flag():
    r = train_et("-h")
    assert r.returncode == 0, r.stderr
    listed = re.findall(r"^  (-\w+)\s", r.stdout, re.M)
    assert listed == FLAGS, f"-h lists {listed}"
    readme = open(os.path.join(REPO, "README.md")).read()
    in_table = re.findall(r"^\| `(-\w+)", readme, re.M)
    assert sorted(in_table) == sorted(FLAGS), f"README flag table differs from -h: {sorted(set(FLAGS) ^ set(in_table))}"


def test_bad_flags_give_one_line():
    cases = [
        (["-Q", "1"], "unknown flag '-Q'"),
        (["-b"], "-b: missing value (expected an integer in [1, 65535])"),
        (["-b", "x"], "-b: 'x' is not an integer"),
        (["-b", "3.5"], "-b: '3.5' is not an integer"),
        (["-b", "0"], "-b: 0 is out of range (expected an integer in [1, 65535])"),
        (["-l", "fast"], "-l: 'fast' is not a number"),
        (["-eb", "1"], "-eb: 1 is out of range"),
        (["-r", "moe"], "-r: unknown value 'moe' (expected one of tc|ec|et)"),
        (["-tb", "Aux"], "-tb: unknown value 'Aux' (expected one of none|aux|lossfree)"),
        (["-m", "d13"], "-m: unknown model 'd13'"),
        (["-m", "gpt2"], "-m: unknown model 'gpt2'"),
        (["-i", ""], "-i: empty value"),
        (["-kv", "4"], "-kv: 4 key/value heads do not divide the 6 heads of d12"),
        (["-e", "4", "-k", "5"], "-k: 5 experts per token is more than the 4 routed experts"),
        (["-m", "tiny", "-e", "4", "-k", "8"], "-k: 8 experts per token"),
        (["-m", "tiny", "-e", "3", "-r", "ec", *SMALL[2:]],
         "-e: k = pool x K / E = 256 x 1 / 3 tokens per expert is not a whole number; choose -e dividing 256 "
         "(the pool is the micro-batch, -b x -t)"),
        (["-m", "tiny", "-e", "3", "-r", "et", *SMALL[2:]], "-e: k = pool x K / E = 256 x 1 / 3 tokens"),
        (["-m", "tiny", "-e", "6", "-k", "2", "-ep", "seq", *SMALL[2:]],
         "-e: k = pool x K / E = 64 x 2 / 6 tokens per expert is not a whole number; choose -e dividing 128 "
         "(the pool is one sequence, -t)"),
        (["-d", "1000"], "-d: 1000 tokens is not a multiple of -b x -t x processes"),
        (["-x", "0"], "-x: 0 steps"),
        (["-i", "/nonexistent/shards_*.bin"], "-i: no files match '/nonexistent/shards_*.bin'"),
    ]
    for args, want in cases:
        r = train_et(*args)
        assert r.returncode == 1, f"{args}: exit {r.returncode}"
        assert r.stdout == "", f"{args}: printed {r.stdout!r}"
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: " + want), f"{args}: {r.stderr!r}"


def test_default_data_falls_back_to_synthetic():
    with tempfile.TemporaryDirectory() as empty:  # no data/edu_fineweb10B here
        r = train_et(*SMALL, cwd=empty)
    assert "BUILT-IN SYNTHETIC CORPUS" in r.stdout, r.stdout
    assert re.search(r"loss floor \(entropy rate\) \d\.\d{4} nats/token", r.stdout), r.stdout
    assert_stopped_at_gpu(r)
    r = train_et(*SMALL, "-i", "synthetic")
    assert "BUILT-IN" not in r.stdout and "synthetic corpus, 1024 shards" in r.stdout, r.stdout


def test_explicit_val_glob_must_match():
    with tempfile.TemporaryDirectory() as d:
        write_shard(f"{d}/train_000001.bin", list(range(1000)))
        r = train_et(*SMALL, "-i", f"{d}/train_*.bin", "-j", f"{d}/val_*.bin")
        assert r.returncode == 1 and r.stderr == f"error: -j: no files match '{d}/val_*.bin'\n", r.stderr
    r = train_et(*SMALL, "-i", "synthetic", "-j", "/nonexistent/val_*.bin")
    assert r.returncode == 1 and r.stderr.startswith("error: -j: the synthetic corpus validates on its own"), r.stderr


def write_shard(path, tokens, magic=20240520):
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", magic, 1, len(tokens), *([0] * 253)))
        f.write(struct.pack(f"<{len(tokens)}H", *tokens))


def test_bad_shard_is_named():
    with tempfile.TemporaryDirectory() as d:
        write_shard(f"{d}/train_000001.bin", list(range(1000)))
        write_shard(f"{d}/train_000002.bin", list(range(1000)), magic=1234)
        r = train_et(*SMALL, "-i", f"{d}/train_*.bin")
        want = f"error: -i: {d}/train_000002.bin: bad magic 1234 (expected 20240520): not an llm.c token shard\n"
        assert r.returncode == 1 and r.stderr == want, r.stderr


def test_shards_too_small_for_a_batch():
    with tempfile.TemporaryDirectory() as d:
        write_shard(f"{d}/train_000001.bin", list(range(100)))
        r = train_et(*SMALL, "-i", f"{d}/train_*.bin")
        assert r.returncode == 1 and "no shard holds one round of 1 process x 4 sequences x 64 tokens" in r.stderr, r.stderr


def test_real_shards_and_tokenizer():
    train, val = shared_file("tiny_shakespeare_train.bin"), shared_file("tiny_shakespeare_val.bin")
    table = shared_file("gpt2_tokenizer.bin")
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(train, d)
        r = train_et(*SMALL, "-i", f"{d}/tiny_shakespeare_train.bin", "-j", val)
        assert "train: 1 shard, 305.3K tokens" in r.stdout and "val:   1 shard, 32.8K tokens" in r.stdout, r.stdout
        assert "GPT-2 ids assumed" in r.stdout, r.stdout
        assert "steps    1192 (1.00 epochs" in r.stdout, r.stdout  # (305260 - 1) // 64 // 4 micro-batches
        assert_stopped_at_gpu(r)
        shutil.copy(table, d)
        r = train_et(*SMALL, "-i", f"{d}/tiny_shakespeare_train.bin")
        assert f"tokenizer: {d}/gpt2_tokenizer.bin" in r.stdout and "vocab 50257" in r.stdout, r.stdout
        assert "val:   none (validation off)" in r.stdout, r.stdout


def test_output_dir_checkpoints_guard():
    with tempfile.TemporaryDirectory() as d:
        r = train_et(*SMALL, "-i", "synthetic", "-o", d, "-y", "1")
        assert r.returncode == 1 and r.stderr == f"error: -y 1: no checkpoint (ckpt_*.bin) in {d} to resume from\n", r.stderr
        open(f"{d}/ckpt_0000000100.bin", "wb").close()
        r = train_et(*SMALL, "-i", "synthetic", "-o", d)
        assert r.returncode == 1 and r.stderr.startswith(f"error: -o: {d} holds checkpoints of an earlier run"), r.stderr


def test_token_choice_needs_no_whole_k():
    """TC routes per token: any -e that fits -k trains (here: reaches the GPU)."""
    r = train_et(*SMALL, "-i", "synthetic", "-e", "3", "-r", "tc")
    assert "router   tc, balancing aux (alpha 0.001)" in r.stdout, r.stdout
    assert_stopped_at_gpu(r)
    r = train_et(*SMALL, "-i", "synthetic", "-e", "4", "-r", "ec")  # k = 256 / 4 = 64
    assert "router   ec, pool micro-batch, k = 64.0 tokens per expert" in r.stdout, r.stdout
    assert_stopped_at_gpu(r)


def test_startup_report_d12():
    r = train_et("-i", "synthetic", "-e", "16")
    for want in ["d12: 12 layers, width 768, 6 heads of 128, vocab 50257 (head padded to 50304)",
                 "1 shared + 16 routed experts of width 1536, K = 1; layer 0 dense",
                 "router   et, pool micro-batch, k = 2048.0 tokens per expert, EMA beta 0.999, EC warm-up 396 steps",
                 "params   551.55M total, 162.26M active per token",
                 "flops    0.855 GFLOP per token",
                 "16 micro-steps: 524288 tokens per step"]:
        assert want in r.stdout, f"missing '{want}' in:\n{r.stdout}"
    r = train_et("-i", "synthetic", "-e", "0", "-b", "1", "-t", "64", "-d", "64", "-x", "1", "-v", "0", "-s", "0")
    assert "ffn      dense, width 3072" in r.stdout and "params   162.13M total, 162.13M active" in r.stdout, r.stdout


if __name__ == "__main__":
    main(globals())
