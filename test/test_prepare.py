#!/usr/bin/env python3
"""Tests of data/prepare.py, the data-preparation CLI.

Each test runs prepare.py as a user would (a subprocess, local GPT-2 tokenizer
files, no network) and checks its files byte for byte: against real llm.c
outputs where they exist, otherwise against tokens computed here with
tiktoken's own loader for the same files. The paper's tokenizer, trained by
prepare.py with rustbpe, is checked against rustbpe trained here on the same
text. Real data comes from the shared data directory (env TRAIN_ET_SHARED_DATA,
else ../shared/data next to the checkout); tests that need it, tiktoken or
rustbpe, are skipped when it is absent.

No pytest: run `python3 test/test_prepare.py`. It prints one line per test
(`ok - name`, `FAIL - name: reason`, `skip - name: reason`) and exits 1 if any
test failed.
"""

import array
import atexit
import base64
import functools
import importlib.util
import json
import os
import random
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import SHARED_DATA_FIX, Skip, main, shared_data_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
PREPARE = REPO_ROOT / "data" / "prepare.py"
SHARED_DATA = Path(shared_data_dir())

EOT = 50256
SHARD_MAGIC = 20240520
TOKENIZER_MAGIC = 20240328
HEADER_BYTES = 256 * 4
SMALL_SHARD = 5000
# The paper's tokenizer in small: this vocab (the end-of-text id is its last), trained on this many
# characters of the FineWeb-Edu sample, with the split pattern of the paper's code (nanochat's)
BPE_VOCAB, BPE_TRAIN_CHARS = 1024, 200_000
BPE_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"
               r"\s*[\r\n]|\s+(?!\S)|\s+")
# files that outlive one test: the trained tokenizer
WORK = Path(tempfile.mkdtemp(prefix="test_prepare_"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


# ---------------------------------------------------------------------------
# Helpers


def need_tiktoken():
    if importlib.util.find_spec("tiktoken") is None:
        raise Skip("tiktoken is not installed", "pip install -r data/requirements.txt")


def shared(name):
    """Path of a shared data file; skips the test when it is not there."""
    need_tiktoken()
    path = SHARED_DATA / name
    if not path.is_file():
        raise Skip(f"no shared data file {path}", SHARED_DATA_FIX)
    return path


def bpe_args():
    return ["--encoder", str(shared("gpt2_encoder.json")), "--vocab", str(shared("gpt2_vocab.bpe"))]


def run_prepare(*args, **popen_options):
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args)],
                          capture_output=True, text=True, timeout=120, **popen_options)


def prepare_ok(*args, **popen_options):
    result = run_prepare(*args, **popen_options)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr.strip()[-500:]}"
    return result


def expect_one_line_error(result, *must_name):
    """A failure is exit 1 and one line `error: ...` naming what the user must fix, never a traceback."""
    assert result.returncode == 1, f"exit {result.returncode}, expected 1; stderr: {result.stderr.strip()[-300:]}"
    assert "Traceback" not in result.stderr, f"traceback: {result.stderr.strip()[-300:]}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error line, got: {result.stderr.strip()[-300:]}"
    for name in must_name:
        assert str(name) in errors[0], f"error line does not name {name}: {errors[0]}"
    return errors[0]


@functools.cache
def oracle_encoding():
    """GPT-2 from the local files through tiktoken's own loader: an oracle independent of prepare.py."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local files directly, no cache copies
    ranks = data_gym_to_mergeable_bpe_ranks(str(shared("gpt2_vocab.bpe")), str(shared("gpt2_encoder.json")))
    return tiktoken.Encoding(name="gpt2-test-oracle", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


def expected_tokens(documents):
    encoding = oracle_encoding()
    tokens = array.array("H")
    for document in documents:
        tokens.append(EOT)
        tokens.extend(encoding.encode_ordinary(document))
    return tokens


def read_shard(path):
    data = path.read_bytes()
    magic, version, count = struct.unpack("<3i", data[:12])
    assert (magic, version) == (SHARD_MAGIC, 1), f"{path.name}: header starts {magic}, {version}"
    assert data[12:HEADER_BYTES] == bytes(HEADER_BYTES - 12), f"{path.name}: header padding is not zero"
    assert len(data) == HEADER_BYTES + 2 * count, f"{path.name}: {len(data)} bytes for {count} tokens"
    tokens = array.array("H")
    tokens.frombytes(data[HEADER_BYTES:])
    if sys.byteorder == "big":
        tokens.byteswap()
    return tokens


def small_input_val_tokens(total):
    """The val shard of an input smaller than two shards: 1%, at least 32,768 or a tenth, whichever is fewer."""
    return max(-(-total // 100), min(32768, total // 10), 1)


def read_fineweb_shards(out_dir, shard_size):
    """All shards' tokens in order, checking names, val-then-train, and the sizes: every shard full
    but the last; or, for an input smaller than two shards, a small val shard and the rest as train."""
    paths = sorted(out_dir.glob("edu_fineweb_*.bin"), key=lambda path: path.name[-10:])
    assert len(paths) >= 2, f"not a val and a train shard in {out_dir}: {paths}"
    shards = [read_shard(path) for path in paths]
    total = sum(map(len, shards))
    sizes = [len(shard) for shard in shards]
    if total < 2 * shard_size:
        val = small_input_val_tokens(total)
        want = [val] + [min(shard_size, total - val - start) for start in range(0, total - val, shard_size)]
    else:
        want = [shard_size] * (total // shard_size) + ([total % shard_size] if total % shard_size else [])
    assert sizes == want, f"shard sizes {sizes}, expected {want} (shard size {shard_size})"
    tokens = array.array("H")
    for index, (path, shard) in enumerate(zip(paths, shards)):
        split = "val" if index == 0 else "train"
        assert path.name == f"edu_fineweb_{split}_{index:06d}.bin", f"shard {index} is named {path.name}"
        tokens.extend(shard)
    return tokens


def sample_documents(count, seed=1):
    """Documents cut from real FineWeb-Edu text at random lengths, plus awkward ones:
    empty, the literal EOT string (must stay ordinary text), and one longer than
    several shards (it must straddle three or more)."""
    text = shared("fineweb_edu_sample.txt").read_text(encoding="utf-8")
    rng = random.Random(seed)
    documents, start = [], 0
    for _ in range(count):
        length = rng.randint(1, 3000)
        documents.append(text[start:start + length])
        start = (start + length) % (len(text) - 3000)
    documents[3:3] = [text[:60_000], "", "<|endoftext|> is plain text here", "naïve café 😀"]
    return documents


def write_jsonl(path, documents):
    with open(path, "w", encoding="utf-8") as f:
        for index, document in enumerate(documents):
            f.write(json.dumps({"id": index, "text": document}) + "\n")


# Stands in for the `datasets` package in a subprocess: the real package, with
# load_dataset answering from a local list of documents instead of the Hub.
DATASETS_STAND_IN = """
import importlib, json, os, sys

sys.path.remove(os.path.dirname(__file__))
del sys.modules["datasets"]
real = importlib.import_module("datasets")


def load_dataset(path, name=None, split=None, streaming=False):
    assert (path, name, split) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train"), (path, name, split)
    with open(os.environ["STAND_IN_DOCUMENTS"]) as f:
        documents = json.load(f)
    dataset = real.Dataset.from_dict({"id": list(range(len(documents))), "text": documents})
    return dataset.to_iterable_dataset() if streaming else dataset


real.load_dataset = load_dataset
sys.modules["datasets"] = real
"""


def offline_hub_environment(directory, documents):
    if importlib.util.find_spec("datasets") is None:
        raise Skip("the datasets package is not installed", "pip install -r data/requirements.txt")
    (directory / "datasets.py").write_text(DATASETS_STAND_IN)
    (directory / "documents.json").write_text(json.dumps(documents))
    python_path = os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": python_path, "STAND_IN_DOCUMENTS": str(directory / "documents.json"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def files_in(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def same_files(expected_dir, actual_dir):
    expected, actual = files_in(expected_dir), files_in(actual_dir)
    assert sorted(actual) == sorted(expected), f"files differ: {sorted(set(actual) ^ set(expected))}"
    differing = [name for name in expected if expected[name] != actual[name]]
    assert not differing, f"contents differ: {differing}"


# ---------------------------------------------------------------------------
# Reproducing llm.c's files


def test_tokenizer_table_matches_llmc():
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "nested" / "gpt2_tokenizer.bin"
        prepare_ok("tokenizer", table, *bpe_args())
        assert table.read_bytes() == shared("gpt2_tokenizer.bin").read_bytes(), "table differs from llm.c's"


def test_text_reproduces_tiny_shakespeare_shards():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        prepare_ok("text", shared("tiny_shakespeare.txt"), "--out", out, *bpe_args())
        for name in ("tiny_shakespeare_val.bin", "tiny_shakespeare_train.bin", "gpt2_tokenizer.bin"):
            assert (out / name).read_bytes() == shared(name).read_bytes(), f"{name} differs from llm.c's"


def test_fineweb_whole_file_as_one_document_matches_sample_bin():
    """Less than two shards: split into a val shard (its first 10%, as 1% would be under 32,768 tokens) and
    a train shard, together the sample's tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        prepare_ok("fineweb", "--input", shared("fineweb_edu_sample.txt"), "--doc-split", "none",
                   "--out", out, "--workers", 1, *bpe_args())
        names = sorted(path.name for path in out.glob("edu_fineweb_*.bin"))
        assert names == ["edu_fineweb_train_000001.bin", "edu_fineweb_val_000000.bin"], f"shards: {names}"
        sample = read_shard(shared("fineweb_edu_sample.bin"))
        assert read_fineweb_shards(out, 100_000_000) == sample, "differs from the sample"
        assert len(read_shard(out / names[1])) == len(sample) // 10, "the val shard is not a tenth"


# ---------------------------------------------------------------------------
# Offline FineWeb-style shards


def test_fineweb_jsonl_shards_hold_every_document_in_order():
    documents = sample_documents(300)
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "docs.jsonl", Path(tmp) / "out"
        write_jsonl(source, documents)
        prepare_ok("fineweb", "--input", source, "--out", out, "--shard-size", SMALL_SHARD, "--workers", 2,
                   *bpe_args())
        tokens = read_fineweb_shards(out, SMALL_SHARD)
        assert tokens == expected_tokens(documents), "shard tokens != EOT + tokens of each document"
        assert (out / "gpt2_tokenizer.bin").read_bytes() == shared("gpt2_tokenizer.bin").read_bytes()


def test_fineweb_txt_splits_documents_on_blank_lines():
    lines = [line for line in shared("fineweb_edu_sample.txt").read_text(encoding="utf-8").split("\n")
             if line.strip()][:600]
    rng = random.Random(2)
    documents, text = [], ""
    while lines:
        take = rng.randint(1, 3)
        documents.append("\n".join(lines[:take]))
        del lines[:take]
        text += documents[-1] + rng.choice(["\n\n", "\n\n\n", "\n \t\n"])
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "docs.txt", Path(tmp) / "out"
        source.write_text(text, encoding="utf-8")
        prepare_ok("fineweb", "--input", source, "--out", out, "--shard-size", SMALL_SHARD, "--workers", 1,
                   *bpe_args())
        assert read_fineweb_shards(out, SMALL_SHARD) == expected_tokens(documents), \
            "shard tokens != EOT + tokens of each paragraph"


def test_fineweb_download_path_downloaded_and_streamed():
    documents = sample_documents(120, seed=6)
    with tempfile.TemporaryDirectory() as tmp:
        downloaded, streamed = Path(tmp) / "downloaded", Path(tmp) / "streamed"
        hub = offline_hub_environment(Path(tmp), documents)
        common = ["fineweb", "--shard-size", SMALL_SHARD, "--workers", 2, *bpe_args()]
        prepare_ok(*common, "--out", downloaded, env=hub)
        assert read_fineweb_shards(downloaded, SMALL_SHARD) == expected_tokens(documents), \
            "shard tokens != EOT + tokens of each dataset row"

        stopped = run_prepare(*common, "--out", streamed, "--stream", "--stop-after-shards", 2, env=hub)
        assert stopped.returncode == 130, f"stopped run: exit {stopped.returncode}: {stopped.stderr[-300:]}"
        prepare_ok(*common, "--out", streamed, "--stream", env=hub)
        shards = sorted(path.name for path in downloaded.glob("edu_fineweb_*.bin"))
        assert sorted(path.name for path in streamed.glob("edu_fineweb_*.bin")) == shards, "shard names differ"
        differing = [name for name in shards if (downloaded / name).read_bytes() != (streamed / name).read_bytes()]
        assert not differing, f"streamed and resumed shards differ from downloaded ones: {differing}"


# ---------------------------------------------------------------------------
# Resuming


def test_resume_after_stops_is_byte_identical():
    documents = sample_documents(200, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        source, whole, resumed = Path(tmp) / "docs.jsonl", Path(tmp) / "whole", Path(tmp) / "resumed"
        write_jsonl(source, documents)
        shard_size = 2000  # the long document (about 13,000 tokens) spans several
        common = ["fineweb", "--input", source, "--shard-size", shard_size, *bpe_args()]
        prepare_ok(*common, "--out", whole, "--workers", 2)

        # The first stop (shard 0 is written with shard 1) lands inside the long document: what spills
        # over fills more than a shard.
        for stop_after, shards_so_far, workers in ((1, 2, 2), (3, 5, 1)):
            result = run_prepare(*common, "--out", resumed, "--workers", workers, "--stop-after-shards", stop_after)
            assert result.returncode == 130, f"stopped run: exit {result.returncode}: {result.stderr[-300:]}"
            shards = sorted(resumed.glob("edu_fineweb_*.bin"))
            assert len(shards) == shards_so_far, f"{len(shards)} shards after the stop, expected {shards_so_far}"
            if stop_after == 1:
                spill = json.loads((resumed / "prepare_state.json").read_text())["spill_tokens"]
                assert len(spill) > shard_size, f"the first stop spills {len(spill)} tokens, meant > a shard"

        prepare_ok(*common, "--out", resumed, "--workers", 2)
        same_files(whole, resumed)
        again = prepare_ok(*common, "--out", resumed)
        assert "already complete" in again.stdout, f"re-run of a finished run said: {again.stdout.strip()}"
        same_files(whole, resumed)


def test_resume_after_kill_is_byte_identical():
    documents = sample_documents(600, seed=4)
    with tempfile.TemporaryDirectory() as tmp:
        source, whole, killed = Path(tmp) / "docs.jsonl", Path(tmp) / "whole", Path(tmp) / "killed"
        write_jsonl(source, documents)
        common = ["fineweb", "--input", source, "--shard-size", 500, "--workers", 2, *bpe_args()]
        prepare_ok(*common, "--out", whole)

        # SIGKILL the whole process group (workers too) as soon as the first shard is recorded.
        process = subprocess.Popen([sys.executable, str(PREPARE), *map(str, common), "--out", str(killed)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while not (killed / "prepare_state.json").exists() and process.poll() is None:
            assert time.monotonic() < deadline, "no shard written within 60 s"
            time.sleep(0.002)
        assert process.poll() is None, "the run finished before it could be killed; give it more documents"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

        prepare_ok(*common, "--out", killed)
        same_files(whole, killed)


def test_resume_refuses_a_different_run():
    documents = sample_documents(50, seed=5)
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "docs.jsonl", Path(tmp) / "out"
        write_jsonl(source, documents)
        common = ["fineweb", "--input", source, "--out", out, *bpe_args()]
        result = run_prepare(*common, "--shard-size", SMALL_SHARD, "--stop-after-shards", 1)
        assert result.returncode == 130, f"stopped run: exit {result.returncode}: {result.stderr[-300:]}"
        expect_one_line_error(run_prepare(*common, "--shard-size", SMALL_SHARD + 1), "prepare_state.json",
                              "shard_size")


# ---------------------------------------------------------------------------
# Bad inputs: one line naming the file and the fix, non-zero exit


def test_missing_input_file_is_one_line_error():
    need_tiktoken()
    with tempfile.TemporaryDirectory() as tmp:
        missing = Path(tmp) / "no_such_file.jsonl"
        result = run_prepare("fineweb", "--input", missing, "--out", Path(tmp) / "out")
        expect_one_line_error(result, missing)
        assert result.stderr.strip().count("\n") == 0, f"more than one line: {result.stderr}"
        expect_one_line_error(run_prepare("text", missing), missing)


def test_broken_jsonl_line_is_one_line_error_naming_file_and_line():
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "broken.jsonl"
        source.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n')
        result = run_prepare("fineweb", "--input", source, "--out", Path(tmp) / "out", "--workers", 2, *bpe_args())
        expect_one_line_error(result, f"{source}:3")


def test_missing_text_field_is_one_line_error_naming_the_option():
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "fields.jsonl"
        source.write_text('{"text": "one"}\n{"content": "two"}\n')
        result = run_prepare("fineweb", "--input", source, "--out", Path(tmp) / "out", *bpe_args())
        expect_one_line_error(result, f"{source}:2", "'text'", "--text-field")
        assert not (Path(tmp) / "out").exists(), f"the failed run left {list((Path(tmp) / 'out').iterdir())}"

        renamed = Path(tmp) / "content.jsonl"
        renamed.write_text('{"content": "one"}\n{"content": "two"}\n')
        out = Path(tmp) / "renamed"
        prepare_ok("fineweb", "--input", renamed, "--out", out, "--text-field", "content", *bpe_args())
        assert read_fineweb_shards(out, 100_000_000) == expected_tokens(["one", "two"]), "--text-field ignored"


def test_unwritable_out_dir_is_one_line_error():
    need_tiktoken()
    with tempfile.TemporaryDirectory() as tmp:
        not_a_dir = Path(tmp) / "a_file"
        not_a_dir.write_text("")
        source = Path(tmp) / "docs.txt"
        source.write_text("hello\n")
        out = not_a_dir / "out"
        expect_one_line_error(run_prepare("fineweb", "--input", source, "--out", out), out, "--out")
        expect_one_line_error(run_prepare("text", source, "--out", out), out, "--out")


def test_encoder_without_vocab_is_one_line_error():
    need_tiktoken()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_prepare("tokenizer", Path(tmp) / "new" / "table.bin", "--encoder", Path(tmp) / "encoder.json")
        expect_one_line_error(result, "--vocab")
        source = Path(tmp) / "docs.txt"
        source.write_text("hello\n")
        for command in (["fineweb", "--input", source], ["text", source]):
            result = run_prepare(*command, "--out", Path(tmp) / "out", "--encoder", Path(tmp) / "encoder.json")
            expect_one_line_error(result, "--vocab")
        assert sorted(path.name for path in Path(tmp).iterdir()) == ["docs.txt"], \
            f"the failed runs left {sorted(path.name for path in Path(tmp).iterdir())}"


# ---------------------------------------------------------------------------
# Small inputs: a train shard and a val shard, and a train_et command that runs on them

TRAIN_ET = REPO_ROOT / "train_et"
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def train_et_start_up(command, cwd):
    """Runs a printed ./train_et command (with the built train_et) on a machine shown no GPU: its
    start-up must pass every check and stop only for the missing GPU."""
    assert TRAIN_ET.exists(), f"{TRAIN_ET} is not built (make train_et)"
    args = shlex.split(command)
    assert args[0] == "./train_et", command
    r = subprocess.run([str(TRAIN_ET), *args[1:]], capture_output=True, text=True, cwd=cwd, env=NO_GPU, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: no CUDA device"), f"{command}: {r.stderr}"
    assert "warning" not in r.stdout, r.stdout
    return r.stdout


def test_small_input_trains():
    """One shard's worth or less gives a val shard (its first 10%, as 1% is under 32,768 tokens) and a
    train shard, says so, and prints a train_et command whose -b/-t/-d fit them."""
    documents = sample_documents(40, seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "docs.jsonl", Path(tmp) / "out"
        write_jsonl(source, documents)
        result = prepare_ok("fineweb", "--input", source, "--out", out, "--workers", 1, *bpe_args())
        tokens = read_fineweb_shards(out, 100_000_000)
        assert tokens == expected_tokens(documents), "shard tokens != EOT + tokens of each document"
        val = small_input_val_tokens(len(tokens))
        assert val == len(tokens) // 10, (val, len(tokens))
        assert f"its first {val:,} tokens went to the validation shard, the other {len(tokens) - val:,} to training" \
            in result.stdout, result.stdout
        assert f"wrote 2 shards, {len(tokens):,} tokens ({len(documents)} documents) to {out}" in result.stdout, \
            result.stdout
        command = result.stdout.splitlines()[-1].strip()
        want = (f"./train_et -i '{out}/edu_fineweb_train_*.bin' -j '{out}/edu_fineweb_val_*.bin' -m d6 -e 8 "
                f"-b 8 -t 256 -d 2048")
        assert command == want, f"printed {command!r}"
        report = train_et_start_up(command, tmp)
        assert f"train: 1 shard, " in report and "val:   1 shard, " in report, report

        one, shard_size = Path(tmp) / "one.jsonl", 8000  # one document, between one and two shards
        write_jsonl(one, [documents[3]])
        result = prepare_ok("fineweb", "--input", one, "--out", Path(tmp) / "one", "--shard-size", shard_size,
                            *bpe_args())
        tokens = read_fineweb_shards(Path(tmp) / "one", shard_size)
        assert shard_size < len(tokens) < 2 * shard_size, len(tokens)
        assert f"wrote 3 shards, {len(tokens):,} tokens (1 document)" in result.stdout, result.stdout


def readme_quick_start():
    """The commands of the README's "Quick start without FineWeb-Edu" block."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Quick start without FineWeb-Edu", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_quick_start_works_as_written():
    """Its prepare command on tiny Shakespeare (the shared copy instead of the download, and the local
    GPT-2 files instead of tiktoken's download), then its train_et command, from a folder of its own."""
    download, prepare, train = readme_quick_start()
    assert download.startswith("curl ") and download.split()[2] == "tiny_shakespeare.txt", download
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tiny_shakespeare.txt").write_bytes(shared("tiny_shakespeare.txt").read_bytes())
        args = shlex.split(prepare)
        assert args[:2] == ["python3", "data/prepare.py"], prepare
        result = prepare_ok(*args[2:], *bpe_args(), cwd=tmp)
        printed = result.stdout.splitlines()[-1].strip()
        assert train.startswith(printed), f"the README's command {train!r} is not the printed {printed!r}"
        report = train_et_start_up(train, tmp)
        assert "train: 1 shard, 298.0K tokens" in report and "val:   1 shard, 32.8K tokens" in report, report


# ---------------------------------------------------------------------------
# The paper's tokenizer: trained with rustbpe, saved, loaded, and written into shards


def need_rustbpe():
    need_tiktoken()
    if importlib.util.find_spec("rustbpe") is None:
        raise Skip("rustbpe is not installed", "pip install -r data/requirements.txt")


@functools.cache
def trained_tokenizer():
    """prepare.py train-tokenizer on the start of the FineWeb-Edu sample (one document), saved once for the tests."""
    need_rustbpe()
    path = WORK / "bpe.tokenizer"
    result = prepare_ok("train-tokenizer", path, "--input", shared("fineweb_edu_sample.txt"), "--doc-split", "none",
                        "--vocab-size", BPE_VOCAB, "--max-chars", BPE_TRAIN_CHARS)
    assert f"wrote {path} in " in result.stdout and f"{BPE_VOCAB:,} tokens ({BPE_VOCAB - 257} merges, " \
        f"<|endoftext|> = {BPE_VOCAB - 1})" in result.stdout, result.stdout
    return path


@functools.cache
def rustbpe_oracle():
    """rustbpe itself, trained here on the same text the same way: what prepare.py must have saved."""
    import rustbpe

    text = shared("fineweb_edu_sample.txt").read_text(encoding="utf-8")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator([text[:BPE_TRAIN_CHARS]], BPE_VOCAB - 1, pattern=BPE_PATTERN)
    return bpe


def read_tokenizer_file(path):
    """Parses the saved format (prepare.py's docstring) on its own: (pattern, special, special id, tokens by rank)."""
    lines = path.read_text(encoding="ascii").split("\n")
    assert lines[0] == "train_et-bpe 1" and lines[-1] == "", f"{path}: starts {lines[0]!r}, ends {lines[-1]!r}"
    key, pattern = lines[1].split(" ", 1)
    assert key == "pattern", lines[1]
    key, special, special_id = lines[2].split(" ")
    assert key == "special", lines[2]
    key, count = lines[3].split(" ")
    assert key == "ranks" and len(lines) == 4 + int(count) + 1, f"{lines[3]!r}, {len(lines) - 5} token lines"
    tokens = [base64.b64decode(line, validate=True) for line in lines[4:-1]]
    return json.loads(pattern), json.loads(special), int(special_id), tokens


def oracle_bpe_encoding(path):
    """tiktoken's Encoding of a saved tokenizer, built from the file by the parser above, not by prepare.py."""
    import tiktoken

    pattern, special, special_id, tokens = read_tokenizer_file(path)
    return tiktoken.Encoding(name="bpe-test-oracle", pat_str=pattern,
                             mergeable_ranks={token: rank for rank, token in enumerate(tokens)},
                             special_tokens={special: special_id}, explicit_n_vocab=special_id + 1)


def read_table(path):
    """A tokenizer table: (header version, vocab, EOT field, the bytes of each id)."""
    data = path.read_bytes()
    magic, version, vocab, eot = struct.unpack("<4i", data[:16])
    assert magic == TOKENIZER_MAGIC and data[16:HEADER_BYTES] == bytes(HEADER_BYTES - 16), f"{path}: bad header"
    tokens, at = [], HEADER_BYTES
    for _ in range(vocab):
        tokens.append(data[at + 1:at + 1 + data[at]])
        at += 1 + data[at]
    assert at == len(data), f"{path}: {len(data) - at} bytes after the last token"
    return version, vocab, eot, tokens


def decode_documents(tokens, table, eot):
    """The texts between the EOTs, through the id-to-bytes table alone."""
    assert tokens[0] == eot, f"the first token is {tokens[0]}, not the end-of-text id {eot}"
    joined = b"".join(table[token] if token != eot else b"\0" for token in tokens)
    return [part.decode("utf-8") for part in joined.split(b"\0")[1:]]


def test_trained_tokenizer_is_rustbpes():
    """The saved file holds exactly what rustbpe learned: its pattern (the paper's code's), its tokens in rank
    order, the single bytes first; <|endoftext|> after them, so the vocab is --vocab-size."""
    pattern, special, special_id, tokens = read_tokenizer_file(trained_tokenizer())
    oracle = rustbpe_oracle()
    assert pattern == BPE_PATTERN == oracle.get_pattern(), pattern
    assert tokens == [bytes(token) for token, _ in sorted(oracle.get_mergeable_ranks(), key=lambda tr: tr[1])], \
        "saved tokens differ from rustbpe's ranks"
    assert tokens[:256] == [bytes([b]) for b in range(256)], "ranks 0-255 are not the single bytes"
    assert (special, special_id, len(tokens)) == ("<|endoftext|>", BPE_VOCAB - 1, BPE_VOCAB - 1), \
        (special, special_id, len(tokens))


def test_train_tokenizer_streams_fineweb():
    """From Hugging Face (a stand-in answering with local rows), it stops reading at --max-chars: the same
    text as the local file gives the same file, byte for byte, though a second row would change it."""
    text = shared("fineweb_edu_sample.txt").read_text(encoding="utf-8")
    local = trained_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        hub = offline_hub_environment(Path(tmp), [text[:BPE_TRAIN_CHARS], "qqqq " * 10_000])
        path = Path(tmp) / "streamed.tokenizer"
        result = prepare_ok("train-tokenizer", path, "--vocab-size", BPE_VOCAB, "--max-chars", BPE_TRAIN_CHARS,
                            env=hub)
        assert "HuggingFaceFW/fineweb-edu (sample-10BT, streamed)" in result.stdout, result.stdout
        assert path.read_bytes() == local.read_bytes(), "differs from the tokenizer trained on the local file"


def test_trained_tokenizer_round_trips_real_text():
    """Text it was not trained on (the rest of the sample, and awkward strings) encodes as rustbpe encodes it,
    decodes back to itself, and the end-of-text string stays plain text."""
    encoding = oracle_bpe_encoding(trained_tokenizer())
    text = shared("fineweb_edu_sample.txt").read_text(encoding="utf-8")
    samples = [text[BPE_TRAIN_CHARS:BPE_TRAIN_CHARS + 300_000], "naïve café 😀 — 東京 1234567 \t\n\n  x",
               "<|endoftext|> is plain text here"]
    for sample in samples:
        tokens = encoding.encode_ordinary(sample)
        assert tokens == rustbpe_oracle().encode(sample), f"differs from rustbpe's encoding: {sample[:40]!r}"
        assert encoding.decode(tokens) == sample, f"does not decode back: {sample[:40]!r}"
        assert max(tokens) < BPE_VOCAB - 1, "the end-of-text id came out of ordinary text"
    assert len(tokens) > 5, tokens  # the end-of-text string as ordinary pieces, not the special token
    # 1,024 tokens give about 2.5 bytes a token on FineWeb-Edu text; single bytes would give 1
    assert len(samples[0].encode()) / len(encoding.encode_ordinary(samples[0])) > 2, "compresses hardly at all"


def test_shards_with_trained_tokenizer():
    """fineweb and text --tokenizer: the ids rustbpe gives, its end-of-text id before every document,
    tokenizer.bin (version 2, with that id) instead of gpt2_tokenizer.bin; the table alone decodes the shards
    back to the documents, and the tokenizer command writes the same table."""
    path = trained_tokenizer()
    encoding = oracle_bpe_encoding(path)
    eot = BPE_VOCAB - 1
    documents = sample_documents(100, seed=8)
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "docs.jsonl", Path(tmp) / "out"
        write_jsonl(source, documents)
        prepare_ok("fineweb", "--input", source, "--out", out, "--shard-size", SMALL_SHARD, "--workers", 2,
                   "--tokenizer", path)
        tokens = read_fineweb_shards(out, SMALL_SHARD)
        want = array.array("H")
        for document in documents:
            want.append(eot)
            want.extend(encoding.encode_ordinary(document))
        assert tokens == want, "shard tokens != end-of-text id + tokens of each document"
        expect_one_line_error(run_prepare("fineweb", "--input", source, "--out", out, "--shard-size", SMALL_SHARD,
                                          *bpe_args()), "prepare_state.json", "tokenizer_sha256")
        assert max(tokens) < BPE_VOCAB, max(tokens)
        assert not (out / "gpt2_tokenizer.bin").exists(), "a GPT-2 table beside the trained tokenizer's shards"
        version, vocab, table_eot, table = read_table(out / "tokenizer.bin")
        assert (version, vocab, table_eot) == (2, BPE_VOCAB, eot), (version, vocab, table_eot)
        assert table == [encoding.decode_single_token_bytes(i) for i in range(BPE_VOCAB)], "table != the tokens"
        assert decode_documents(tokens, table, eot) == documents, "the table does not decode the shards"

        prepare_ok("tokenizer", Path(tmp) / "table.bin", "--tokenizer", path)
        assert (Path(tmp) / "table.bin").read_bytes() == (out / "tokenizer.bin").read_bytes(), "tables differ"

        text = Path(tmp) / "story.txt"
        text.write_text("\n\n".join(documents[:40]), encoding="utf-8")
        prepare_ok("text", text, "--out", Path(tmp) / "story", "--val-tokens", 1000, "--tokenizer", path)
        val, train = read_shard(Path(tmp) / "story" / "story_val.bin"), read_shard(Path(tmp) / "story" /
                                                                                 "story_train.bin")
        assert len(val) == 1000 and val[0] == eot, (len(val), val[0])
        parts = text.read_text(encoding="utf-8").split("\n\n")
        want = [part + "\n\n" for part in parts[:-1]] + parts[-1:]
        table = read_table(Path(tmp) / "story" / "tokenizer.bin")[3]
        assert decode_documents(val + train, table, eot) == want, "text shards do not decode to the parts"


def test_train_et_reads_the_trained_tokenizer():
    """The printed train_et command starts on those shards with the trained tokenizer's vocab and end-of-text
    id, from tokenizer.bin, which it prefers to a gpt2_tokenizer.bin beside it."""
    path = trained_tokenizer()
    documents = sample_documents(40, seed=9)
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "docs.jsonl", Path(tmp) / "out"
        write_jsonl(source, documents)
        result = prepare_ok("fineweb", "--input", source, "--out", out, "--workers", 1, "--tokenizer", path)
        command = result.stdout.splitlines()[-1].strip()
        want = (f"tokenizer: {out}/tokenizer.bin (end-of-text id {BPE_VOCAB - 1}); every token checked below "
                f"vocab {BPE_VOCAB} in ")
        report = train_et_start_up(command, tmp)
        assert want in report and f", vocab {BPE_VOCAB} (head padded to " in report, report
        shutil.copy(shared("gpt2_tokenizer.bin"), out)
        assert want in train_et_start_up(command, tmp), "train_et took gpt2_tokenizer.bin over tokenizer.bin"


def test_train_tokenizer_on_too_little_text_says_so():
    """Text that runs out of pairs gives a smaller vocab: saved, and said in a warning."""
    need_rustbpe()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "new" / "small.tokenizer"
        result = prepare_ok("train-tokenizer", path, "--input", shared("fineweb_edu_sample.txt"), "--max-chars",
                            20_000)
        _, _, special_id, tokens = read_tokenizer_file(path)
        assert 256 < len(tokens) == special_id < 65535, (len(tokens), special_id)
        assert f"warning: the text ran out of pairs to merge: the vocab is {special_id + 1:,}, not --vocab-size " \
               f"65,536" in result.stdout, result.stdout


def test_trained_tokenizer_errors_are_one_line():
    """A broken tokenizer file is named with its line; --tokenizer with GPT-2's files, or shards of another
    tokenizer's folder, name the fix; nothing is left behind."""
    path = trained_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "docs.txt"
        source.write_text("hello\n")
        broken = Path(tmp) / "broken.tokenizer"
        lines = path.read_text().split("\n")
        broken.write_text("\n".join(lines[:300] + ["not base64!"] + lines[301:]))
        expect_one_line_error(run_prepare("fineweb", "--input", source, "--out", Path(tmp) / "out", "--tokenizer",
                                          broken), f"{broken}:301", "base64", "train-tokenizer")
        broken.write_text("\n".join(lines[:-10]))
        expect_one_line_error(run_prepare("tokenizer", Path(tmp) / "out" / "t.bin", "--tokenizer", broken),
                              str(broken), "ranks")
        expect_one_line_error(run_prepare("text", source, "--out", Path(tmp) / "out", "--tokenizer", path,
                                          *bpe_args()), "--tokenizer", "--encoder")
        gpt2_dir = Path(tmp) / "gpt2"
        prepare_ok("text", source, "--out", gpt2_dir, "--val-tokens", 1, *bpe_args())
        expect_one_line_error(run_prepare("text", source, "--out", gpt2_dir, "--val-tokens", 1, "--tokenizer", path),
                              f"{gpt2_dir}/gpt2_tokenizer.bin", "--out")
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["broken.tokenizer", "docs.txt", "gpt2"], \
            sorted(p.name for p in Path(tmp).iterdir())


def test_every_command_and_option_has_help():
    need_tiktoken()
    options = {"fineweb": ["--config", "--out", "--shard-size", "--workers", "--input", "--text-field",
                           "--doc-split", "--stream", "--stop-after-shards", "--tokenizer", "--encoder", "--vocab"],
               "text": ["--out", "--name", "--val-tokens", "--tokenizer", "--encoder", "--vocab"],
               "train-tokenizer": ["--config", "--input", "--text-field", "--doc-split", "--vocab-size",
                                   "--max-chars"],
               "tokenizer": ["--tokenizer", "--encoder", "--vocab"]}
    top = prepare_ok("-h")
    for command, names in options.items():
        assert command in top.stdout, f"-h does not list {command}"
        helped = prepare_ok(command, "-h").stdout
        missing = [name for name in names if name not in helped]
        assert not missing, f"{command} -h does not document {missing}"


if __name__ == "__main__":
    main(globals())
