"""test/test_cli.py: train_et's flags and start-up, run as a user runs it.

Checks that -h lists every flag (and the README's table does too), that each
kind of bad flag or value gets one error line naming the flag and what is
allowed (an unquoted glob, a -d the batch does not divide: with the fix), how
the data source is chosen (synthetic fallback only for the default location),
that bad shards are named (a token id outside the vocab in any shard, a
tokenizer table the glob caught), that a bad -o stops start-up, which
settings warn, and what start-up reports: the device memory and checkpoint
size before the GPU, and the refusal of a run too big for an H200.
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
FLAGS = ["-i", "-j", "-o", "-eo", "-y", "-n", "-nk", "-sv", "-preset", "-m", "-e", "-r", "-k", "-kv", "-eb", "-ew", "-ec",
         "-tb", "-ta", "-tu", "-ep", "-er", "-b", "-t", "-d", "-x", "-opt", "-l", "-le", "-lh", "-lm", "-og", "-om",
         "-me", "-b1", "-b2", "-ae", "-u", "-q", "-a", "-wd", "-c", "-gc", "-v", "-vm", "-s", "-g", "-ce", "-cv", "-rf",
         "-ro", "-li", "-sd", "-pd", "-pt", "-h"]
PRESETS = ["d12-dense", "d12-tc", "d12-tc-aux", "d12-tc-lossfree", "d12-ec-2k", "d12-ec-8k", "d12-ec-64k",
           "d12-ec-512k", "d12-et", "d20-dense", "d20-tc-aux", "d20-ec-256k", "d20-et"]
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
    assert r.stdout.startswith(("train_et |", "+---", "warning: ")), r.stdout


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
        (["-b", "3"], "-d: 524288 tokens is not a multiple of -b x -t x processes = 3 x 2048 x 1 = 6144; the nearest "
                      "-d that are: 522240 or 528384"),
        (["-b", "8", "-t", "1024", "-d", "4000"], "-d: 4000 tokens is not a multiple of -b x -t x processes = 8 x 1024 "
                                                  "x 1 = 8192; the nearest -d that are: 8192"),
        (["-i", "data/x/train_000001.bin", "data/x/train_000002.bin"],
         "'data/x/train_000002.bin' is not a flag: it follows -i data/x/train_000001.bin as if the shell had "
         "expanded an unquoted glob into several files; quote the glob: -i 'data/x/train_*.bin'"),
        (["-b", "4", "8"], "'8' is not a flag: -b takes one value (here '4')"),
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


def test_every_token_checked_before_the_gpu():
    """No tokenizer table: GPT-2's vocab is assumed, and every id of every
    train and val shard is checked against it at start-up."""
    with tempfile.TemporaryDirectory() as d:
        good = [i % 50257 for i in range(20000)]
        write_shard(f"{d}/train_000001.bin", good)
        write_shard(f"{d}/train_000002.bin", good[:1234] + [50257] + good[1235:])
        r = train_et(*SMALL, "-i", f"{d}/train_*.bin")
        want = f"error: -i: {d}/train_000002.bin: token id 50257 at position 1234 >= vocab 50257"
        assert r.returncode == 1 and r.stderr.startswith(want) and r.stderr.count("\n") == 1, r.stderr
        write_shard(f"{d}/train_000002.bin", good)
        write_shard(f"{d}/val_000000.bin", good[:19999] + [65535])
        r = train_et(*SMALL, "-i", f"{d}/train_*.bin", "-j", f"{d}/val_*.bin")
        want = f"error: -j: {d}/val_000000.bin: token id 65535 at position 19999 >= vocab 50257"
        assert r.returncode == 1 and r.stderr.startswith(want), r.stderr
        write_shard(f"{d}/val_000000.bin", good)
        r = train_et(*SMALL, "-i", f"{d}/train_*.bin", "-j", f"{d}/val_*.bin")
        assert re.search(r"GPT-2 ids assumed; samples print ids\); every token checked below vocab 50257 in "
                         r"\d+\.\d\d s", r.stdout), r.stdout
        assert_stopped_at_gpu(r)


def test_tokenizer_table_in_a_glob_is_named():
    with tempfile.TemporaryDirectory() as d:
        write_shard(f"{d}/edu_fineweb_train_000001.bin", [i % 3 for i in range(1000)])
        with open(f"{d}/gpt2_tokenizer.bin", "wb") as f:  # a table of 3 tokens
            f.write(struct.pack("<256i", 20240328, 2, 3, 2, *([0] * 252)) + b"\x01a\x01b\x01c")
        r = train_et(*SMALL, "-i", f"{d}/*.bin")
        want = (f"error: -i: {d}/gpt2_tokenizer.bin: a tokenizer table (magic 20240328), not a token shard: make the "
                f"glob match only the shards, e.g. '*_train_*.bin'\n")
        assert r.returncode == 1 and r.stderr == want, r.stderr


def test_default_location_with_val_shards_only():
    """A val shard alone in the default folder is no reason to fall back to the synthetic corpus."""
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(f"{d}/data/edu_fineweb10B")
        write_shard(f"{d}/data/edu_fineweb10B/edu_fineweb_val_000000.bin", list(range(1000)))
        r = train_et(*SMALL, cwd=d)
        assert r.returncode == 1 and "BUILT-IN" not in r.stdout, r.stdout
        assert r.stderr.startswith("error: -i: data/edu_fineweb10B/edu_fineweb_val_*.bin holds validation shards but "
                                   "no train shards"), r.stderr


def test_bad_output_dir_stops_start_up():
    with tempfile.TemporaryDirectory() as d:
        open(f"{d}/a_file", "w").close()
        r = train_et(*SMALL, "-i", "synthetic", "-o", f"{d}/a_file")
        assert r.returncode == 1 and r.stderr == f"error: -o: {d}/a_file: is a file, not a directory\n", r.stderr
        r = train_et(*SMALL, "-i", "synthetic", "-o", f"{d}/a_file/run")
        want = f"error: -o: {d}/a_file/run: cannot create the directory (Not a directory)\n"
        assert r.returncode == 1 and r.stderr == want and r.stdout == "", r.stderr
        r = train_et(*SMALL, "-i", "synthetic", "-o", f"{d}/new/nested/run")
        assert os.path.isdir(f"{d}/new/nested/run"), "-o with missing parents was not made"
        assert_stopped_at_gpu(r)
        assert os.listdir(f"{d}/new/nested/run") == [], "a start-up that stopped left files behind"


# Settings that cannot do what the user meant: (flags, the warning), and the run still starts.
WARNINGS = [
    (["-x", "10", "-ew", "10"], "-ew 10: the ET warm-up lasts the whole run (10 steps), so it never routes by "
                                "thresholds; use -ew below 10"),
    (["-x", "10", "-u", "20"], "-u 20: the learning-rate warm-up does not end before the run does (10 steps), so the "
                               "schedule never decays; use -u below 10"),
    (["-l", "0"], "-l 0: the learning rate is 0, so the weights never change"),
    (["-ec", "1.5"], "-ec 1.5: above 1 the clamp's lower bound k(1 - C) is below 0, so only its upper bound k(1 + C) "
                     "acts"),
    (["-tb", "none"], "-tb: ignored: it is read by token choice (-r tc), and the router is et"),
    (["-r", "ec", "-ew", "5"], "-ew: ignored: it is read by expert threshold (-r et), and the router is ec"),
    (["-r", "tc", "-ep", "seq"], "-ep: ignored: it is read by expert choice and expert threshold (-r ec, et), and the "
                                 "router is tc"),
    (["-r", "tc", "-tb", "lossfree", "-ta", "0.01"], "-ta: ignored: it weighs the aux loss of -tb aux, and -tb is not aux"),
    (["-e", "0", "-r", "tc"], "-r: ignored: -e 0 is a dense model, which has no router"),
    (["-e", "0", "-eb", "0.99"], "-eb: ignored: -e 0 is a dense model, which has no router"),
    (["-ep", "global"], "-ep global: with one process the global batch is this GPU's micro-batch: it routes as -ep "
                        "micro"),
    (["-sd", "1", "-sd", "2"], "-sd given 2 times: the last value, 2, is used"),
    (["-lm", "0.01"], "-lm: ignored: it sets a group of -opt muon, and this run trains with -opt adamw"),
    (["-cv", "100"], "-cv: ignored: it sets how often CORE is scored, and there is no -ce file to score"),
    (["-ro", "5"], "-ro: ignored: it places the -rf text, and there is no -rf"),
    (["-opt", "muon", "-l", "1e-3"], "-l: ignored: -opt muon trains at its groups' rates (-le, -lh, -lm)"),
]


def test_settings_that_cannot_work_warn():
    for flags, want in WARNINGS:
        r = train_et("-m", "tiny", "-i", "synthetic", "-t", "64", "-b", "4", "-d", "256", *flags)
        warnings = [line for line in r.stdout.splitlines() if line.startswith("warning: ")]
        assert warnings == [f"warning: {want}"], f"{flags}: warned {warnings}"
        assert_stopped_at_gpu(r)
    with tempfile.TemporaryDirectory() as d:
        write_shard(f"{d}/train_000001.bin", list(range(1000)))
        r = train_et(*SMALL, "-i", f"{d}/train_*.bin", "-sv", "2048")
        assert "warning: -sv: ignored: it sets the synthetic corpus's vocab, and this run trains on shards (-i)" in \
            r.stdout, r.stdout
    r = train_et(*SMALL, "-i", "synthetic")
    assert "warning" not in r.stdout, r.stdout


def test_memory_and_checkpoint_size_before_the_gpu():
    r = train_et("-i", "synthetic", "-m", "d12", "-e", "16")
    memory = re.search(r"^memory   ([\d.]+) GiB on the GPU: parameters ([\d.]+) .*activations ([\d.]+), routing "
                       r"buffers ([\d.]+)", r.stdout, re.M)
    assert memory and 5 < float(memory.group(1)) < 141, r.stdout
    # 551.55M parameters (+ the head's padding) x 4 bytes x 3 arrays, and the router state
    assert re.search(r"^output   log_et \(checkpoints every 1000 steps and at the end, 6\.1\d GiB each, the last 2 kept\)",
                     r.stdout, re.M), r.stdout
    assert_stopped_at_gpu(r)
    r = train_et("-i", "synthetic", "-m", "d20", "-e", "64")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: memory: this run needs ") and "of an H200 (no GPU here to ask); use a smaller " \
        "-m, or fewer experts (-e): even at -b 1 it does not fit" in r.stderr, r.stderr
    r = train_et("-i", "synthetic", "-m", "d20", "-e", "16", "-b", "128")
    assert "; use -b 64, the largest micro-batch that fits" in r.stderr, r.stderr


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


def test_muon_groups_in_the_report():
    r = train_et("-i", "synthetic", "-e", "16", "-opt", "muon")
    assert re.search(r"^optim    muon: cosine schedule, .*muP factor 1\.0000 on the AdamW groups$", r.stdout, re.M), r.stdout
    groups = re.findall(r"^         (\w+) +(AdamW|Muon) +peak lr (\S+) +(\S+) params(, no warm-up)?$", r.stdout, re.M)
    assert groups == [("embedding", "AdamW", "0.2", "38.60M", ""), ("matrices", "Muon", "0.02", "474.22M", ", no warm-up"),
                      ("router", "AdamW", "0.004", "135.2K", ""), ("head", "AdamW", "0.004", "38.60M", "")], groups
    assert re.search(r"Muon scratch [\d.]+", r.stdout), r.stdout
    # the paper's text: the router under Muon, the muP factor on every group (d20: width 1280)
    r = train_et("-i", "synthetic", "-m", "d20", "-e", "16", "-opt", "muon", "-og", "muon", "-om", "all")
    groups = re.findall(r"^         (\w+) +(AdamW|Muon) +peak lr (\S+)", r.stdout, re.M)
    assert groups == [("embedding", "AdamW", "0.1549"), ("matrices", "Muon", "0.01549"), ("head", "AdamW", "0.003098")], \
        groups
    assert_stopped_at_gpu(r)


def test_presets():
    r = train_et("-h")
    assert re.findall(r"^  (d\d+-[\w-]+) +Table", r.stdout, re.M) == PRESETS, r.stdout
    for name in PRESETS:  # each starts, fits an H200, and stops only for want of a GPU
        r = train_et("-preset", name, "-i", "synthetic")
        assert f"preset   {name}: Table" in r.stdout and "muon: wsd schedule, warm-up 0 steps" in r.stdout, r.stdout
        assert "AdamW betas 0.8/0.95, eps 1e-10" in r.stdout and "weight decay 0, clip 1;" in r.stdout, r.stdout
        assert_stopped_at_gpu(r)
    r = train_et("-preset", "d12-et", "-i", "synthetic")
    for want in ["steps    19073", "128 x 2048 tokens per micro-step, 2 micro-steps: 524288 tokens per step",
                 "et, pool micro-batch, k = 16384.0 tokens per expert, EMA beta 0.999, EC warm-up 4000 steps, capacity 0.5",
                 "warning: -preset d12-et: the paper's routing pool is 524288 tokens and this run pools 262144 (-b 128 "
                 "-ep micro, 1 process), the most one H200 holds in a micro-batch. The paper's pool needs 2 ranks of "
                 "-b 128 with -ep global"]:
        assert want in r.stdout, f"missing '{want}' in:\n{r.stdout}"
    r = train_et("-preset", "d12-ec-512k", "-i", "synthetic", "-b", "64")  # a smaller GPU's micro-batch
    assert "this run pools 131072 (-b 64 -ep micro, 1 process). The paper's pool needs 4 ranks of -b 64" in r.stdout, \
        r.stdout
    record = train_et("-preset", "d20-dense", "-i", "synthetic", "-x", "50", "-b", "8")
    assert "the command line overrides -x -b" in record.stdout and "steps    50 " in record.stdout, record.stdout
    assert "8 x 2048 tokens per micro-step" in record.stdout and "d20: 20 layers" in record.stdout, record.stdout
    r = train_et("-preset", "d13-et")
    assert r.returncode == 1 and r.stderr.startswith("error: -preset: unknown preset 'd13-et' (the presets: d12-dense, "), \
        r.stderr
    with tempfile.TemporaryDirectory() as d:  # GPT-2 shards: not the paper's tokenizer
        write_shard(f"{d}/train_000001.bin", list(range(1000)) * 600)
        r = train_et("-preset", "d12-dense", "-i", f"{d}/train_*.bin", "-x", "1")
        assert "warning: -preset d12-dense: the paper's tokenizer is a 65536-token BPE and these shards have a vocab " \
            "of 50257" in r.stdout, r.stdout


def write_core_file(path, vocab):
    """A CORE eval file (data/core_eval.h) of one multiple-choice task with one example."""
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20261203, 1, 1, 1, -1, vocab - 1, vocab, 0, *([0] * 248)))
        f.write(b"arc_easy".ljust(64, b"\0") + struct.pack("<iifii3i", 0, 10, 25.0, 1, 0, 0, 0, 0))
        f.write(struct.pack("<3i", 0, 0, 2) + struct.pack("<6i", 3, 2, 3, 3, 2, 3))
        f.write(struct.pack("<6H", vocab - 1, 5, 6, vocab - 1, 5, 7))


def test_evaluation_flags_are_checked_before_the_gpu():
    with tempfile.TemporaryDirectory() as d:
        write_core_file(f"{d}/core.bin", 1024)
        r = train_et(*SMALL, "-i", "synthetic", "-sv", "1024", "-ce", f"{d}/core.bin")
        assert re.search(r"^core     .*core\.bin: 1 of 1 tasks, 1 examples in 2 rows; 1 forwards of 4 x 64 tokens",
                         r.stdout, re.M), r.stdout
        assert_stopped_at_gpu(r)
        r = train_et(*SMALL, "-i", "synthetic", "-ce", f"{d}/core.bin")  # the synthetic vocab is GPT-2's by default
        assert r.returncode == 1 and r.stderr.startswith(f"error: -ce: {d}/core.bin was tokenized for a vocab of "
                                                         "1024 and the training data has 50257"), r.stderr
        for args, want in [(["-ce", f"{d}/none.bin"], f"error: -ce: {d}/none.bin: cannot open"),
                           (["-e", "0", "-rf", "synthetic"], "error: -rf: a dense model (-e 0) routes nothing"),
                           (["-e", "4", "-rf", f"{d}/none.bin"], "error: -rf: no files match"),
                           (["-o", f"{d}/empty", "-eo", "1"], f"error: -eo 1: no checkpoint (ckpt_*.bin) in {d}/empty "
                                                              "to evaluate")]:
            r = train_et(*SMALL, "-i", "synthetic", *args)
            assert r.returncode == 1 and r.stderr.startswith(want) and r.stderr.count("\n") == 1, (args, r.stderr)
        write_shard(f"{d}/train_000001.bin", list(range(1000)) * 10)
        r = train_et(*SMALL, "-i", f"{d}/train_*.bin", "-e", "4", "-rf", "synthetic")
        assert r.stderr.startswith("error: -rf synthetic: the synthetic corpus's text needs -i synthetic"), r.stderr
        r = train_et(*SMALL, "-i", "synthetic", "-e", "4", "-rf", f"{d}/train_000001.bin", "-ro", "100")
        assert "routes   64 tokens of " in r.stdout and "from token 100, through 1 MoE layers" in r.stdout, r.stdout



def test_launcher_settings_are_checked_before_the_gpu():
    """A rank reads its place from the launcher; a half-set environment, or a -d the ranks do not
    divide, stops it with the reason before anything else."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(NO_GPU, OMPI_COMM_WORLD_SIZE="2")
        r = subprocess.run([TRAIN_ET, "-i", "synthetic", *SMALL, "-o", f"{d}/out"], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith("error: OMPI_COMM_WORLD_SIZE is set but not"), r.stderr
        env.update(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_LOCAL_RANK="1", OMPI_COMM_WORLD_LOCAL_SIZE="2")
        r = subprocess.run([TRAIN_ET, "-i", "synthetic", *SMALL, "-o", f"{d}/out"], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 1 and r.stderr == (
            "error: rank 1: -d: 256 tokens is not a multiple of -b x -t x processes = 4 x 64 x 2 = 512; the nearest -d "
            "that are: 512\n"), r.stderr
        assert r.stdout == "", "a rank other than 0 printed the start-up report"


if __name__ == "__main__":
    main(globals())
