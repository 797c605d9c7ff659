#!/usr/bin/env python3
"""Tests of data/core.py, which renders and tokenizes the CORE bundle into train_et's eval file.

core.py runs as a user would run it (a subprocess, the GPT-2 files offline) on
the shared miniature of the real bundle (../shared/data/core_sample: core.yaml
and eval_meta_data.csv verbatim, the first 30 rows of 18 of the 20 task files).
The file it writes is read back with a reader written here from the format in
core.py's docstring, and the prompts and scored spans of chosen examples are
compared with ones written out by hand from the rows of the task files: the
prompt formats, the delimiters, the stripping and the shot order are spelled out
below, independently of core.py. The shuffle and few-shot seeds are nanochat's,
and the expected orders were derived with Python's random module, as nanochat
draws them (test_shuffle_and_shots_are_pythons_random checks the literals).

No pytest: run `python3 test/test_core_data.py [test_name ...]`.
"""

import atexit
import csv
import functools
import http.server
import importlib.util
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

from harness import Skip, main, shared_file

REPO_ROOT = Path(__file__).resolve().parent.parent
CORE = REPO_ROOT / "data" / "core.py"
sys.path.insert(0, str(CORE.parent))  # core.py and prepare.py, imported for the tokenizers

EOT = 50256
GPT2_VOCAB = 50257
# The 22 tasks in core.yaml's order; these four have no file in the miniature
MISSING = ("hellaswag_zeroshot", "hellaswag", "squad", "coqa")
SAMPLE_ROWS = 30
# The miniature's 30 rows of every task, in evaluation order: the file line of
# each after random.Random(1337).shuffle()
SHUFFLED_LINES = [5, 8, 29, 1, 3, 25, 4, 16, 28, 9, 15, 14, 22, 17, 2, 30, 7, 21, 10, 27, 13, 11, 6, 24, 26, 19, 12,
                  23, 18, 20]
# The 10 shots of example 0 of a 30-row task: random.Random(1234 + 0).sample() of positions in the other
# 29 rows' list, as file lines (position p of that list is shuffled row p + 1, as p >= 0 = idx)
SHOTS_OF_EXAMPLE_0 = [19, 30, 3, 8, 1, 27, 29, 6, 20, 23]

WORK = Path(tempfile.mkdtemp(prefix="test_core_data_"))
atexit.register(shutil.rmtree, WORK, ignore_errors=True)


# ---------------------------------------------------------------------------
# Helpers


def need_tiktoken():
    if importlib.util.find_spec("tiktoken") is None:
        raise Skip("tiktoken is not installed", "pip install -r data/requirements.txt")


def sample_bundle():
    need_tiktoken()
    return Path(shared_file("core_sample"))


def gpt2_files():
    return ["--encoder", shared_file("gpt2_encoder.json"), "--vocab", shared_file("gpt2_vocab.bpe")]


@functools.cache
def gpt2():
    import prepare
    return prepare.load_gpt2_from_files(*gpt2_files()[1::2])


def run_core(*args, env=None):
    return subprocess.run([sys.executable, str(CORE), *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def core_ok(*args, env=None):
    result = run_core(*args, env=env)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr.strip()[-500:]}"
    return result


def expect_error(result, *must_name):
    """A failure is one line `error: ...` naming what to fix, never a traceback."""
    assert result.returncode in (1, 2), f"exit {result.returncode}; stderr: {result.stderr.strip()[-300:]}"
    assert "Traceback" not in result.stderr, result.stderr.strip()[-300:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"expected one error line: {result.stderr.strip()[-300:]}"
    for name in must_name:
        assert str(name) in lines[0], f"the error does not name {name!r}: {lines[0]}"


def write_sample_file(path, *args):
    core_ok("--bundle", sample_bundle(), *gpt2_files(), "--out", path, *args)
    return path


@functools.cache
def sample_file():
    """The miniature, all rows, GPT-2: written once, read by several tests."""
    return write_sample_file(WORK / "core_sample.bin")


def read_core_file(path):
    """The eval file as {header, tasks, examples}, checking its layout on the way."""
    data = Path(path).read_bytes()
    header = struct.unpack_from("<256i", data, 0)
    offset = 1024
    tasks = []
    for _ in range(header[2]):
        label, kind, shots, baseline, examples, first, *zeros = struct.unpack_from("<64siifii3i", data, offset)
        assert zeros == [0, 0, 0], f"task record padding {zeros}"
        assert label.count(b"\0") > 0 and label.rstrip(b"\0").count(b"\0") == 0, f"label not NUL-padded: {label}"
        tasks.append(dict(label=label.rstrip(b"\0").decode(), type=kind, shots=shots, baseline=baseline,
                          examples=examples, first=first))
        offset += 96
    examples = []
    for _ in range(header[3]):
        task, gold, n_options = struct.unpack_from("<3i", data, offset)
        offset += 12
        records = [struct.unpack_from("<3i", data, offset + 12 * i) for i in range(n_options)]
        offset += 12 * n_options
        options = []
        for length, start, end in records:
            options.append((list(struct.unpack_from(f"<{length}H", data, offset)), start, end))
            offset += 2 * length
        examples.append(dict(task=task, gold=gold, options=options))
    assert offset == len(data), f"{len(data) - offset} bytes after the last example"
    return dict(header=header, tasks=tasks, examples=examples)


def example(core_file, label, idx):
    """Example idx (in evaluation order) of a task, with each option as (prompt text, scored text)."""
    task = next(t for t in core_file["tasks"] if t["label"] == label)
    found = core_file["examples"][task["first"] + idx]
    for tokens, _, _ in found["options"]:
        assert tokens[0] == EOT, f"{label} example {idx} does not start with BOS"
    texts = [(gpt2().decode(tokens[1:]), gpt2().decode(tokens[start:end])) for tokens, start, end in found["options"]]
    return found, texts


def task_rows(relative_path):
    """A miniature task file's rows by line number (1-based)."""
    lines = (sample_bundle() / "eval_data" / relative_path).read_text(encoding="utf-8").splitlines()
    return {number: json.loads(line) for number, line in enumerate(lines, start=1)}


def common_length(sequences):
    """How many leading tokens all the sequences share."""
    length = 0
    while all(len(s) > length and s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def make_bundle(directory, tasks):
    """A bundle of our own: tasks = [(label, type, shots, delimiter or None, rows)]."""
    items = []
    for label, kind, shots, delimiter, rows in tasks:
        items.append(f"-\n  label: {label}\n  dataset_uri: test/{label}.jsonl\n  num_fewshot: [{shots}]\n"
                     f"  icl_task_type: {kind}\n" + (f"  continuation_delimiter: {json.dumps(delimiter)}\n"
                                                     if delimiter is not None else ""))
        (directory / "eval_data" / "test").mkdir(parents=True, exist_ok=True)
        (directory / "eval_data" / "test" / f"{label}.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (directory / "core.yaml").write_text("icl_tasks:\n" + "".join(items), encoding="utf-8")
    (directory / "eval_meta_data.csv").write_text(
        "Eval Task,Random baseline\n" + "".join(f"{task[0]},25\n" for task in tasks), encoding="utf-8")
    return directory


# ---------------------------------------------------------------------------
# The renderer, against prompts and spans written out by hand


def test_shuffle_and_shots_are_pythons_random():
    lines = list(range(1, SAMPLE_ROWS + 1))
    random.Random(1337).shuffle(lines)
    assert lines == SHUFFLED_LINES, lines
    others = [i for i in range(SAMPLE_ROWS) if i != 0]
    shots = random.Random(1234 + 0).sample(others, 10)
    assert [SHUFFLED_LINES[i] for i in shots] == SHOTS_OF_EXAMPLE_0


def test_piqa_ten_shots_and_a_span_that_starts_inside_the_choice():
    rows = task_rows("commonsense_reasoning/piqa.jsonl")
    item = rows[SHUFFLED_LINES[0]]
    assert item["query"] == "Question: ice box\n" and item["gold"] == 0
    # every shot: its query, the "\nAnswer: " delimiter, its gold choice, a blank line
    shots = "".join(rows[line]["query"] + "\nAnswer: " + rows[line]["choices"][rows[line]["gold"]] + "\n\n"
                    for line in SHOTS_OF_EXAMPLE_0)
    found, texts = example(read_core_file(sample_file()), "piqa", 0)
    assert found["gold"] == 0 and len(texts) == 2
    assert texts[0][0] == shots + "Question: ice box\n\nAnswer: will turn into a cooler if you add water to it"
    assert texts[1][0] == shots + "Question: ice box\n\nAnswer: will turn into a cooler if you add soda to it"
    # the choices share "will turn into a cooler if you add": only what differs is scored
    assert [scored for _, scored in texts] == [" water to it", " soda to it"]


def test_winograd_span_reaches_into_the_context_option():
    line = SHUFFLED_LINES[8]
    assert task_rows("language_understanding/winograd_wsc.jsonl")[line] == {
        "context_options": ["Sam's drawing was hung just above Tina's and Sam's drawing",
                            "Sam's drawing was hung just above Tina's and Tina's drawing"],
        "continuation": "did look much better with another one above it.", "gold": 1}
    found, texts = example(read_core_file(sample_file()), "winograd", 8)
    assert [prompt for prompt, _ in texts] == [
        "Sam's drawing was hung just above Tina's and Sam's drawing did look much better with another one above it.",
        "Sam's drawing was hung just above Tina's and Tina's drawing did look much better with another one above it."]
    # GPT-2 splits "...and Sam's drawing did ..." as " Sam", "'s", " drawing", " did": the options end alike
    # from "'s" on, so the scored suffix takes "'s drawing" from the context options
    tokens = [gpt2().decode([token]) for token in found["options"][0][0]]
    assert tokens[10:14] == [" and", " Sam", "'s", " drawing"], tokens
    assert [(len(tokens), start, end) for tokens, start, end in found["options"]] == [(24, 12, 24), (24, 12, 24)]
    assert {scored for _, scored in texts} == {"'s drawing did look much better with another one above it."}


def test_language_identification_query_already_ends_in_answer():
    rows = task_rows("language_understanding/bigbench_language_identification.jsonl")
    item = rows[SHUFFLED_LINES[0]]
    assert item["query"].endswith("\nAnswer: ") and item["choices"] == ["A", "B", "C", "D"] and item["gold"] == 1
    shots = "".join(rows[line]["query"] + " " + rows[line]["choices"][rows[line]["gold"]] + "\n\n"
                    for line in SHOTS_OF_EXAMPLE_0)
    found, texts = example(read_core_file(sample_file()), "bigbench_language_identification", 0)
    assert found["gold"] == 1
    # the " " delimiter after the query's own "Answer: ": two spaces before the letter
    assert [prompt for prompt, _ in texts] == [shots + item["query"] + " " + letter for letter in "ABCD"]
    assert all(prompt.endswith(f"\nAnswer:  {letter}") for (prompt, _), letter in zip(texts, "ABCD"))
    assert [scored for _, scored in texts] == [" A", " B", " C", " D"]
    assert all(end - start == 1 for _, start, end in found["options"])


def test_jeopardy_answer_delimiter_and_the_prompt_without_the_answer():
    rows = task_rows("world_knowledge/jeopardy_all.jsonl")
    item = rows[SHUFFLED_LINES[0]]
    assert item["continuation"] == "Vasco da Gama"
    shots = "".join(rows[line]["context"].strip() + "\nAnswer: " + rows[line]["continuation"] + "\n\n"
                    for line in SHOTS_OF_EXAMPLE_0)
    found, texts = example(read_core_file(sample_file()), "jeopardy", 0)
    assert found["gold"] == 0 and len(texts) == 1, "a language-modelling example is one sequence, gold 0"
    head = shots + "WORLD HISTORY: This Portuguese Admiral of the Indian Seas discovered & named the Amirante Islands"
    assert texts[0] == (head + "\nAnswer: Vasco da Gama", " Vasco da Gama")
    # the span starts where the stripped prompt without the answer ends: "...\nAnswer:", no trailing space
    tokens, start, _ = found["options"][0]
    assert gpt2().decode(tokens[1:start]) == head + "\nAnswer:"


def test_zero_shot_multiple_choice_and_lambada():
    core_file = read_core_file(sample_file())
    found, texts = example(core_file, "copa", 0)
    assert task_rows("commonsense_reasoning/copa.jsonl")[SHUFFLED_LINES[0]]["query"] == \
        "The hamburger meat browned, because"
    assert found["gold"] == 1
    assert texts == [("The hamburger meat browned, because the cook froze it.", " froze it."),
                     ("The hamburger meat browned, because the cook grilled it.", " grilled it.")]
    item = task_rows("language_understanding/lambada_openai.jsonl")[SHUFFLED_LINES[0]]
    assert item["context"].endswith("he put down the") and item["continuation"] == "chains"
    _, texts = example(core_file, "lambada_openai", 0)
    assert texts == [(item["context"].strip() + " chains", " chains")]


# ---------------------------------------------------------------------------
# The file


def test_header_and_task_records():
    bundle = sample_bundle()
    core_file = read_core_file(sample_file())
    header, tasks = core_file["header"], core_file["tasks"]
    present = 22 - len(MISSING)
    assert header[:8] == (20261203, 1, 22, present * SAMPLE_ROWS, -1, EOT, GPT2_VOCAB, len(MISSING)), header[:8]
    assert not any(header[8:]), "header fields past [7] must be 0"
    yaml_text = (bundle / "core.yaml").read_text()
    assert [t["label"] for t in tasks] == re.findall(r"label: (\S+)", yaml_text)
    types = {"multiple_choice": 0, "schema": 1, "language_modeling": 2}
    assert [t["type"] for t in tasks] == [types[kind] for kind in re.findall(r"icl_task_type: (\S+)", yaml_text)]
    assert [t["shots"] for t in tasks] == [int(n) for n in re.findall(r"num_fewshot: \[(\d+)\]", yaml_text)]
    with open(bundle / "eval_meta_data.csv", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    assert all(t["baseline"] == struct.unpack("<f", struct.pack("<f", baselines[t["label"]]))[0] for t in tasks)
    assert next(t for t in tasks if t["label"] == "bigbench_language_identification")["baseline"] == \
        struct.unpack("<f", struct.pack("<f", 9.1))[0]
    first = 0
    for task in tasks:
        assert task["examples"] == (0 if task["label"] in MISSING else SAMPLE_ROWS), task
        assert task["first"] == first, task
        first += task["examples"]


def test_every_example_is_well_formed():
    core_file = read_core_file(sample_file())
    tasks = core_file["tasks"]
    for number, found in enumerate(core_file["examples"]):
        task = tasks[found["task"]]
        assert task["first"] <= number < task["first"] + task["examples"], f"example {number} in the wrong task"
        options = found["options"]
        where = f"{task['label']} example {number - task['first']}"
        if task["type"] == 2:
            assert found["gold"] == 0 and len(options) == 1, where
        else:
            assert 0 <= found["gold"] < len(options) and len(options) >= 2, where
        for tokens, start, end in options:
            assert tokens[0] == EOT and max(tokens) < GPT2_VOCAB, where
            assert 1 <= start <= end == len(tokens), f"{where}: span [{start}, {end}) of {len(tokens)} tokens"
        sequences = [tokens for tokens, _, _ in options]
        if task["type"] == 0:  # from the first token where the options differ
            assert all(start == common_length(sequences) for _, start, _ in options), where
        if task["type"] == 1:  # the longest token suffix common to all options
            suffix = common_length([tokens[::-1] for tokens in sequences])
            assert all(len(tokens) - start == suffix for tokens, start, _ in options), where


def test_max_per_task_cuts_after_the_shuffle():
    all_rows = read_core_file(sample_file())
    cut = read_core_file(write_sample_file(WORK / "core_12.bin", "--max-per-task", "12"))
    assert cut["header"][3] == 12 * (22 - len(MISSING)) and cut["header"][4] == 12
    assert all(t["examples"] == (0 if t["label"] in MISSING else 12) for t in cut["tasks"])
    # a 0-shot example depends only on its row: the cut file holds the first 12 of the full one
    for label in ("copa", "openbook_qa", "lambada_openai", "winograd", "winogrande"):
        full = [example(all_rows, label, idx)[0] for idx in range(12)]
        assert [example(cut, label, idx)[0] for idx in range(12)] == full, label
    # shots come from the 12 rows left: example 0's are Random(1234).sample() of positions 1..11
    shots = [SHUFFLED_LINES[i] for i in random.Random(1234).sample(range(1, 12), 10)]
    assert set(shots) <= set(SHUFFLED_LINES[:12])
    rows = task_rows("world_knowledge/arc_easy.jsonl")
    item = rows[SHUFFLED_LINES[0]]
    context = "".join(rows[line]["query"] + "\nAnswer: " + rows[line]["choices"][rows[line]["gold"]] + "\n\n"
                      for line in shots)
    _, texts = example(cut, "arc_easy", 0)
    assert [prompt for prompt, _ in texts] == [context + item["query"] + "\nAnswer: " + c for c in item["choices"]]


def test_a_trained_tokenizer_gives_the_same_prompts():
    import prepare
    need_tiktoken()
    # a small byte-level BPE in the trained tokenizer's format: the 256 bytes and a few merges
    ranks = [bytes([byte]) for byte in range(256)] + [b"th", b"the", b" the", b"an", b" an", b"in", b"er"]
    bos = len(ranks)  # its end-of-text id comes after the ranks
    tokenizer_path = WORK / "small.tokenizer"
    prepare.save_bpe(prepare.BPE_PATTERN, ranks, tokenizer_path)
    core_ok("--bundle", sample_bundle(), "--tokenizer", tokenizer_path, "--out", WORK / "core_small.bin")
    core_file = read_core_file(WORK / "core_small.bin")
    assert core_file["header"][5:7] == (bos, bos + 1), core_file["header"][5:7]
    encoding = prepare.load_bpe(tokenizer_path).encoding
    gpt2_file = read_core_file(sample_file())
    for mine, theirs in zip(core_file["examples"], gpt2_file["examples"], strict=True):
        assert all(tokens[0] == bos for tokens, _, _ in mine["options"])
        assert [encoding.decode(tokens[1:]) for tokens, _, _ in mine["options"]] == \
            [gpt2().decode(tokens[1:]) for tokens, _, _ in theirs["options"]]


# ---------------------------------------------------------------------------
# Getting the bundle, and the command line


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass  # keep the test's output to its ok / FAIL lines


def test_download_from_a_server_then_reuse():
    """The download path, served from this machine: the zip unpacks to eval_bundle/, as nanochat's does."""
    bundle = sample_bundle()
    served = WORK / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "eval_bundle.zip", "w") as archive:
        for path in sorted(bundle.rglob("*")):
            if path.is_file():
                archive.write(path, Path("eval_bundle") / path.relative_to(bundle))
    handler = functools.partial(QuietFileHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/eval_bundle.zip"
    env = {**os.environ, "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
    download_dir = WORK / "downloaded" / "eval_bundle"
    try:
        result = core_ok("--url", url, "--download-dir", download_dir, *gpt2_files(), "--out", WORK / "dl.bin",
                         env=env)
    finally:
        server.shutdown()
        server.server_close()
    assert "downloading the CORE bundle" in result.stdout
    assert (download_dir / "core.yaml").is_file() and sorted(p.name for p in download_dir.parent.iterdir()) == \
        ["eval_bundle"], "the bundle is unpacked, the zip and the staging folder gone"
    assert (WORK / "dl.bin").read_bytes() == sample_file().read_bytes()
    # the server is gone: a second run reads the unpacked bundle
    result = core_ok("--url", url, "--download-dir", download_dir, *gpt2_files(), "--out", WORK / "dl2.bin", env=env)
    assert "downloading" not in result.stdout and (WORK / "dl2.bin").read_bytes() == sample_file().read_bytes()
    # nothing listens there now: a failed download names the offline way
    expect_error(run_core("--url", url, "--download-dir", WORK / "nowhere", *gpt2_files(), env=env), url, "--bundle")
    assert not (WORK / "nowhere").exists() and not (WORK / "nowhere.partial").exists()


def test_errors_name_the_file_or_flag_and_the_fix():
    bundle = sample_bundle()
    out = ["--out", WORK / "error.bin"]
    expect_error(run_core("--bundle", WORK / "no_such_bundle", *gpt2_files(), *out), "no_such_bundle", "--bundle")
    (WORK / "empty_bundle").mkdir()
    expect_error(run_core("--bundle", WORK / "empty_bundle", *gpt2_files(), *out), "core.yaml")
    for bad in ("0", "-2", "ten"):
        expect_error(run_core("--bundle", bundle, *gpt2_files(), "--max-per-task", bad, *out), "--max-per-task")
    # jeopardy takes 10 shots from the rows left after the cut: 5 are not enough
    expect_error(run_core("--bundle", bundle, *gpt2_files(), "--max-per-task", "5", *out),
                 "jeopardy", "--max-per-task to at least 11")
    expect_error(run_core("--bundle", bundle, *gpt2_files(), "--tokenizer", WORK / "x.tokenizer", *out),
                 "--tokenizer", "--encoder")
    expect_error(run_core("--bundle", bundle, "--no-such-flag"), "--no-such-flag")
    # no delimiter: "hel" + "lo" tokenizes as one word, so the prompt without is no prefix of the one with it
    lm_rows = [{"context": "a b c", "continuation": " d"}, {"context": "hel", "continuation": "lo"}]
    make_bundle(WORK / "not_prefix", [("glued", "language_modeling", 0, "", lm_rows)])
    expect_error(run_core("--bundle", WORK / "not_prefix", *gpt2_files(), *out), "glued", "glued.jsonl:2", "prefix")
    make_bundle(WORK / "bad_gold", [("bad_gold", "multiple_choice", 0, None,
                                     [{"query": "q", "choices": ["a", "b"], "gold": 2}])])
    expect_error(run_core("--bundle", WORK / "bad_gold", *gpt2_files(), *out), "bad_gold.jsonl:1", "'gold'")
    assert not (WORK / "error.bin").exists(), "a failed run writes no file"


def test_core_yaml_reader_agrees_with_pyyaml():
    if importlib.util.find_spec("yaml") is None:
        raise Skip("PyYAML is not installed (core.py does not need it; this test compares with it)",
                   "pip install pyyaml")
    import core
    import yaml
    path = sample_bundle() / "core.yaml"
    variants = [path.read_text(),
                "# a comment\nicl_tasks:\n- label: x  # inline\n  num_fewshot: [3, 5]\n"
                "  continuation_delimiter: 'it''s'\n-\n  label: \"y\\tz\"\n  has_categories: true\n"]
    for text in variants:
        assert core.parse_core_yaml(text, path) == yaml.safe_load(text)["icl_tasks"], text[:60]


def test_every_option_has_help():
    need_tiktoken()
    helped = core_ok("-h").stdout
    missing = [option for option in ("--bundle", "--download-dir", "--url", "--max-per-task", "--out",
                                      "--tokenizer", "--encoder", "--vocab") if option not in helped]
    assert not missing, f"-h does not document {missing}"
    assert "20261203" in helped, "-h describes the file format"


if __name__ == "__main__":
    main(globals())
