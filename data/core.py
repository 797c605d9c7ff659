#!/usr/bin/env python3
"""Render and tokenize the CORE evaluation bundle into one binary file for train_et.

CORE (DCLM, arXiv 2406.11794) is the paper's downstream score: the mean centered
accuracy of 22 in-context-learning tasks, computed as nanochat computes it. As
llm.c does for HellaSwag, the prompts are rendered and tokenized here, once, with
the run's tokenizer; train_et (-ce FILE) only runs the model over the tokens and
scores the spans written here.

The bundle is nanochat's eval_bundle.zip (llm-foundry's task files, core.yaml,
DCLM's eval_meta_data.csv), downloaded and unpacked into --download-dir on first
use, or a local copy given as --bundle DIR. A task whose file the bundle lacks is
still listed, with 0 examples: train_et then reports CORE as partial, naming it.

The algorithm is nanochat's (nanochat/core_eval.py, scripts/base_eval.py):
  - per task, the rows in file order are shuffled with random.Random(1337), then
    cut to the first --max-per-task; few-shot examples come from that list;
  - example idx draws its shots with random.Random(1234 + idx).sample() from the
    other rows, and renders each shot block followed by a blank line:
      multiple_choice   one prompt per choice:
                        shots(query + delim + choices[gold]) + query + delim + choice
      schema            one prompt per context option:
                        shots(context_options[gold] + delim + continuation)
                        + option + delim + continuation
      language_modeling two prompts: head = shots(strip(context) + delim + continuation)
                        + strip(context) + delim; with = head + continuation;
                        without = strip(head)
  - every prompt is tokenized whole: BOS (the tokenizer's end-of-text id), then
    encode_ordinary; the scored tokens are a span [start, end) of each sequence:
      multiple_choice   start = the token prefix common to all choices, end = length
      schema            start = length - the token suffix common to all options
      language_modeling only the 'with' sequence: [len(without), len(with)), where
                        'without' must be a prefix of 'with' (checked)
    A span may be empty (an option that is a prefix of another): it is kept as is,
    and train_et applies nanochat's rule for it. Nothing is cropped here: train_et
    keeps the last tokens of a sequence longer than the model's context and shifts
    its span, as nanochat does.

File format (little-endian):
  header   256 x int32: [0] magic 20261203, [1] version 1, [2] tasks, [3] examples
           (all tasks), [4] --max-per-task (-1: all rows), [5] BOS id, [6] vocab
           size of the tokenizer, [7] tasks missing from the bundle; the rest 0.
  tasks    one 96-byte record each, in core.yaml order: char label[64] (UTF-8,
           NUL-padded), int32 type (0 multiple_choice, 1 schema, 2
           language_modeling), int32 shots, float32 random baseline (percent),
           int32 examples (0 when the task's file is missing), int32 index of its
           first example in the file, 3 x int32 0.
  examples task by task, in task order, each: int32 task index, int32 gold (0 for
           language_modeling), int32 options (1 for language_modeling); per
           option 3 x int32: length, span start, span end; then the tokens of
           each option in order, length x uint16 each. Positions count from the
           BOS at 0; the scored tokens are start .. end-1, each predicted from the
           position before it.

Examples:
  python data/core.py                          # download the bundle, GPT-2 -> data/core_gpt2.bin
  python data/core.py --max-per-task 500       # the paper's training-time eval -> data/core_gpt2_500.bin
  python data/core.py --bundle ~/eval_bundle --encoder encoder.json --vocab vocab.bpe   # offline
  python data/core.py --tokenizer data/bpe65536.tokenizer   # the run's trained tokenizer
"""

import argparse
import csv
import dataclasses
import http.client
import json
import os
import random
import re
import shlex
import shutil
import struct
import sys
import urllib.request
import zipfile
from pathlib import Path

import prepare  # its import checks that tiktoken and tqdm are installed, naming the fix
from prepare import PrepareError, counted, tqdm

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
CORE_MAGIC, CORE_VERSION = 20261203, 1
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")  # the index is the type code in the file
LABEL_BYTES = 64
TASK_RECORD = struct.Struct("<64siifii3i")
EXAMPLE_HEAD = struct.Struct("<3i")
OPTION_RECORD = struct.Struct("<3i")
SHUFFLE_SEED, SHOTS_SEED = 1337, 1234
SHOT_SEPARATOR = "\n\n"
DEFAULT_DELIMITER = " "
# train_et's default context (-t): the summary counts the examples a model of that context must crop
DEFAULT_CONTEXT = 2048
# examples tokenized per batch: tiktoken spreads a batch's prompts over its threads
ENCODE_BATCH = 256

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DOWNLOAD_DIR = REPO_ROOT / "data" / "eval_bundle"


@dataclasses.dataclass
class TaskStats:
    """What the summary tells of a task's examples."""
    examples: int = 0
    sequences: int = 0
    longest: int = 0
    over_context: int = 0  # examples with a sequence longer than DEFAULT_CONTEXT


@dataclasses.dataclass
class Task:
    label: str
    path: Path  # its jsonl file in the bundle
    type: str
    shots: int
    delimiter: str
    baseline: float  # percent
    rows: list = None  # (line number, record) in evaluation order: shuffled, then cut; None when the file is missing
    stats: TaskStats = dataclasses.field(default_factory=TaskStats)


# ---------------------------------------------------------------------------
# core.yaml, without PyYAML: the file is a list of flat "key: value" items


def parse_core_yaml(text, path):
    """The `icl_tasks` list of core.yaml as dicts. Reads the simple YAML the bundle
    uses (block list items of "key: value" lines; values plain, quoted or [a, b]);
    a line it cannot read is an error naming that line."""
    tasks, in_tasks = [], False
    for line_number, line in enumerate(text.splitlines(), start=1):
        content = line.strip()
        if not content or content.startswith("#"):
            continue
        if not line[0].isspace() and not content.startswith("-"):
            in_tasks = content == "icl_tasks:"  # a top-level key: only icl_tasks' items are read
            continue
        if not in_tasks:
            continue
        if content.startswith("-"):
            tasks.append({})
            content = content[1:].strip()
            if not content:
                continue
        if not tasks:
            raise PrepareError(f"{path}:{line_number}: expected a list item ('-') under icl_tasks; "
                               f"pass the bundle's own core.yaml")
        key, colon, value = content.partition(":")
        if not colon or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise PrepareError(f"{path}:{line_number}: expected 'key: value', found {content[:60]!r}; "
                               f"pass the bundle's own core.yaml")
        try:
            tasks[-1][key.strip()] = yaml_value(value.strip())
        except ValueError as e:
            raise PrepareError(f"{path}:{line_number}: cannot read the value {value.strip()[:60]!r} ({e}); "
                               f"pass the bundle's own core.yaml") from None
    return tasks


def yaml_value(text):
    """One YAML scalar or flow list: "double-quoted" (JSON's escapes, which are
    YAML's for the characters core.yaml uses), 'single-quoted', [a, b], an
    integer, true/false, or a plain string."""
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        if len(text) < 2 or not text.endswith("'"):
            raise ValueError("unterminated quote")
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError("unterminated list")
        inner = text[1:-1].strip()
        return [yaml_value(item.strip()) for item in inner.split(",")] if inner else []
    text = re.sub(r"\s+#.*$", "", text)  # a trailing comment
    if re.fullmatch(r"[-+]?[0-9]+", text):
        return int(text)
    return {"true": True, "false": False}.get(text, text)


# ---------------------------------------------------------------------------
# Reading the bundle


def read_baselines(path):
    """Eval Task -> Random baseline (percent), from eval_meta_data.csv."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise PrepareError(f"{path} not found: the bundle has no eval_meta_data.csv; pass the unpacked "
                           f"eval_bundle folder as --bundle") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PrepareError(f"cannot read {path}: {e}") from None
    baselines = {}
    for line_number, row in enumerate(rows, start=2):
        try:
            baselines[row["Eval Task"]] = float(row["Random baseline"])
        except KeyError:
            raise PrepareError(f"{path} has no 'Eval Task' and 'Random baseline' columns; pass DCLM's "
                               f"eval_meta_data.csv from the bundle") from None
        except (TypeError, ValueError):
            raise PrepareError(f"{path}:{line_number}: the Random baseline {row['Random baseline']!r} is not a "
                               f"number; fix that row") from None
    return baselines


def read_task_list(bundle):
    """The tasks of core.yaml, in its order, with their baselines; rows not read yet."""
    yaml_path = bundle / "core.yaml"
    entries = parse_core_yaml(prepare.read_local_file(yaml_path, "the bundle's core.yaml"), yaml_path)
    if not entries:
        raise PrepareError(f"{yaml_path} lists no tasks under icl_tasks; pass the bundle's own core.yaml")
    baselines = read_baselines(bundle / "eval_meta_data.csv")
    tasks = []
    for number, entry in enumerate(entries, start=1):
        where = f"{yaml_path}, task {number}"
        for key in ("label", "dataset_uri", "num_fewshot", "icl_task_type"):
            if key not in entry:
                raise PrepareError(f"{where}: no {key!r}; each task needs label, dataset_uri, num_fewshot "
                                   f"and icl_task_type")
        label = str(entry["label"])
        if len(label.encode("utf-8")) >= LABEL_BYTES:
            raise PrepareError(f"{where}: the label {label!r} is longer than the {LABEL_BYTES - 1} bytes the "
                               f"file's task record holds; shorten it")
        if entry["icl_task_type"] not in TASK_TYPES:
            raise PrepareError(f"{where} ({label}): icl_task_type {entry['icl_task_type']!r} is not one of "
                               f"{', '.join(TASK_TYPES)}; CORE has no other kind")
        # nanochat takes the first of the num_fewshot list
        shots = entry["num_fewshot"][0] if isinstance(entry["num_fewshot"], list) and entry["num_fewshot"] \
            else entry["num_fewshot"]
        if type(shots) is not int or shots < 0:
            raise PrepareError(f"{where} ({label}): num_fewshot {entry['num_fewshot']!r} is not a count "
                               f"(or a list of counts) of shots")
        if label not in baselines:
            raise PrepareError(f"{where}: {label!r} has no row in {bundle / 'eval_meta_data.csv'}, so it has no "
                               f"random baseline; add one")
        delimiter = entry.get("continuation_delimiter", DEFAULT_DELIMITER)
        tasks.append(Task(label, bundle / "eval_data" / str(entry["dataset_uri"]), entry["icl_task_type"],
                          shots, str(delimiter), baselines[label]))
    return tasks


def check_record(record, task_type):
    """Why a row cannot be rendered as task_type, or None when it can."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    options_key = {"multiple_choice": "choices", "schema": "context_options"}.get(task_type)
    text_keys = {"multiple_choice": ("query",), "schema": ("continuation",),
                 "language_modeling": ("context", "continuation")}[task_type]
    for key in text_keys:
        if not isinstance(record.get(key), str):
            return f"{task_type} rows need a string {key!r}"
    if options_key is None:
        return None
    options = record.get(options_key)
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        return f"{task_type} rows need {options_key!r}, a non-empty list of strings"
    gold = record.get("gold")
    if type(gold) is not int or not 0 <= gold < len(options):
        return f"'gold' must be the index of one of the {len(options)} {options_key}, got {gold!r}"
    return None


def read_rows(task, max_per_task):
    """The task's rows in evaluation order: shuffled with Random(1337), then the first
    max_per_task (-1: all). Each row keeps its line number for error messages."""
    rows = []
    with prepare.open_utf8(task.path) as f:
        for line_number, line in enumerate(f, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{task.path}:{line_number}: not valid JSON ({e.msg} at column {e.colno}); "
                                   f"fix that line or unpack the bundle again") from None
            problem = check_record(record, task.type)
            if problem:
                raise PrepareError(f"{task.path}:{line_number} ({task.label}): {problem}; fix that line or unpack "
                                   f"the bundle again")
            rows.append((line_number, record))
    random.Random(SHUFFLE_SEED).shuffle(rows)
    if max_per_task > 0:
        rows = rows[:max_per_task]
    if not rows:
        raise PrepareError(f"{task.path} ({task.label}) holds no rows; unpack the bundle again")
    if len(rows) <= task.shots:
        fix = (f"raise --max-per-task to at least {task.shots + 1}" if max_per_task > 0 and len(rows) == max_per_task
               else "unpack the bundle again")
        raise PrepareError(f"{task.label}: {counted(len(rows), 'row')} of {task.path}, but each example needs "
                           f"{task.shots} other rows as shots; {fix}")
    return rows


def load_tasks(bundle, max_per_task):
    tasks = read_task_list(bundle)
    for task in tasks:
        if task.path.is_file():
            task.rows = read_rows(task, max_per_task)
    return tasks


# ---------------------------------------------------------------------------
# Rendering and scored spans


def shot_indices(count, idx, shots):
    """nanochat's few-shot draw for example idx of `count`: Random(1234 + idx).sample()
    of `shots` rows from the list of the other rows, in sample order. sample() picks
    by position, and position p of that list is row p + (p >= idx), so drawing from
    range(count - 1) gives the same rows without building the list for every example."""
    if shots == 0:
        return []
    return [p + (p >= idx) for p in random.Random(SHOTS_SEED + idx).sample(range(count - 1), shots)]


def render(task, idx):
    """The prompts of example idx: one per choice / context option, or the language
    modelling task's [without, with]."""
    item = task.rows[idx][1]
    shots = [task.rows[i][1] for i in shot_indices(len(task.rows), idx, task.shots)]
    d = task.delimiter
    if task.type == "multiple_choice":
        context = "".join(s["query"] + d + s["choices"][s["gold"]] + SHOT_SEPARATOR for s in shots)
        return [context + item["query"] + d + choice for choice in item["choices"]]
    if task.type == "schema":
        context = "".join(s["context_options"][s["gold"]] + d + s["continuation"] + SHOT_SEPARATOR for s in shots)
        return [context + option + d + item["continuation"] for option in item["context_options"]]
    # The contexts are stripped (some end in whitespace), the continuations never; 'without' is
    # stripped whole so that its last token is not a space the continuation would have absorbed.
    head = "".join(s["context"].strip() + d + s["continuation"] + SHOT_SEPARATOR for s in shots)
    head += item["context"].strip() + d
    return [head.strip(), head + item["continuation"]]


def common_prefix_length(sequences):
    shortest = min(map(len, sequences))
    for position in range(shortest):
        if any(seq[position] != sequences[0][position] for seq in sequences):
            return position
    return shortest


def scored_spans(task, idx, sequences):
    """[(tokens, start, end)] of example idx from the token sequences of its prompts."""
    if task.type == "multiple_choice":
        start = common_prefix_length(sequences)
        return [(seq, start, len(seq)) for seq in sequences]
    if task.type == "schema":
        suffix = common_prefix_length([seq[::-1] for seq in sequences])
        return [(seq, len(seq) - suffix, len(seq)) for seq in sequences]
    without, with_ = sequences
    if not (len(without) < len(with_) and with_[:len(without)] == without):
        line_number = task.rows[idx][0]
        raise PrepareError(f"{task.label}, {task.path}:{line_number}: the prompt without the continuation does not "
                           f"tokenize to a prefix of the prompt with it ({len(without)} and {len(with_)} tokens), "
                           f"so its scored tokens are not defined; fix or remove that row")
    return [(with_, len(without), len(with_))]


def example_bytes(task_index, gold, spans):
    parts = [EXAMPLE_HEAD.pack(task_index, gold, len(spans))]
    parts += [OPTION_RECORD.pack(len(tokens), start, end) for tokens, start, end in spans]
    parts += [prepare.tokens_to_bytes(tokens) for tokens, _, _ in spans]
    return b"".join(parts)


def tokenized_examples(tasks, tokenizer):
    """Yields (task, bytes of one example) for every example, task by task, and
    fills each task's TaskStats."""
    encoding, bos = tokenizer.encoding, tokenizer.eot
    threads = os.cpu_count() or 1
    for task_index, task in enumerate(tasks):
        for first in range(0, len(task.rows or []), ENCODE_BATCH):
            indices = range(first, min(first + ENCODE_BATCH, len(task.rows)))
            prompts = [render(task, idx) for idx in indices]
            encoded = iter(encoding.encode_ordinary_batch([p for example in prompts for p in example],
                                                          num_threads=threads))
            for idx, example in zip(indices, prompts):
                spans = scored_spans(task, idx, [[bos, *next(encoded)] for _ in example])
                gold = 0 if task.type == "language_modeling" else task.rows[idx][1]["gold"]
                longest = max(len(tokens) for tokens, _, _ in spans)
                task.stats.examples += 1
                task.stats.sequences += len(spans)
                task.stats.longest = max(task.stats.longest, longest)
                task.stats.over_context += longest > DEFAULT_CONTEXT
                yield task, example_bytes(task_index, gold, spans)


# ---------------------------------------------------------------------------
# The file


def header_and_task_records(tasks, tokenizer, max_per_task):
    missing = sum(task.rows is None for task in tasks)
    total = sum(len(task.rows or []) for task in tasks)
    header = prepare.file_header(CORE_MAGIC, CORE_VERSION, len(tasks), total, max_per_task, tokenizer.eot,
                                 tokenizer.encoding.n_vocab, missing)
    records, first = [], 0
    for task in tasks:
        examples = len(task.rows or [])
        records.append(TASK_RECORD.pack(task.label.encode("utf-8"), TASK_TYPES.index(task.type), task.shots,
                                        task.baseline, examples, first, 0, 0, 0))
        first += examples
    return header + b"".join(records), total


def write_core_file(path, tasks, tokenizer, max_per_task):
    head, total = header_and_task_records(tasks, tokenizer, max_per_task)
    examples = []
    with tqdm(total=total, unit="example", dynamic_ncols=True, desc="tokenizing") as progress:
        for task, data in tokenized_examples(tasks, tokenizer):
            progress.set_postfix_str(task.label, refresh=False)
            progress.update()
            examples.append(data)
    prepare.write_atomically(path, head, *examples)


# ---------------------------------------------------------------------------
# Getting the bundle


def bundle_root(directory):
    """The folder holding core.yaml: the directory itself, or its only subfolder
    (the zip unpacks to eval_bundle/)."""
    if (directory / "core.yaml").is_file():
        return directory
    subfolders = [p for p in directory.iterdir() if p.is_dir() and (p / "core.yaml").is_file()]
    return subfolders[0] if len(subfolders) == 1 else None


def download_bundle(url, destination):
    """Downloads the zip and unpacks it as `destination`. Everything happens in
    <destination>.partial, renamed at the end, so an interrupted download leaves
    no half bundle under the final name; the next run starts it again."""
    staging = destination.with_name(destination.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        archive = staging / "eval_bundle.zip"
        print(f"downloading the CORE bundle from {url} into {destination}")
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f, \
                tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     dynamic_ncols=True, desc="eval_bundle.zip") as progress:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                progress.update(len(chunk))
        with zipfile.ZipFile(archive) as bundle_zip:
            bundle_zip.extractall(staging / "unpacked")
        root = bundle_root(staging / "unpacked")
        if root is None:
            raise PrepareError(f"{url} holds no core.yaml: it is not the CORE bundle; pass the bundle's URL as "
                               f"--url, or a local copy as --bundle")
        os.replace(root, destination)
    except (OSError, http.client.HTTPException, zipfile.BadZipFile, ValueError) as e:  # ValueError: a bad --url
        raise PrepareError(f"could not download the CORE bundle from {url} ({prepare.first_line(e)}); offline, "
                           f"fetch {Path(url).name} elsewhere, unzip it and pass the folder as --bundle") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def find_bundle(args):
    """--bundle, else --download-dir, downloading the bundle there if it is not there yet."""
    if args.bundle is not None:
        if not args.bundle.is_dir():
            raise PrepareError(f"--bundle {args.bundle}: no such folder; pass the unpacked eval_bundle folder "
                               f"(with core.yaml, eval_meta_data.csv, eval_data/), or omit --bundle to download it")
        root = bundle_root(args.bundle)
        if root is None:
            raise PrepareError(f"--bundle {args.bundle} holds no core.yaml; pass the unpacked eval_bundle folder "
                               f"(with core.yaml, eval_meta_data.csv, eval_data/)")
        return root
    if args.download_dir.exists():
        root = bundle_root(args.download_dir) if args.download_dir.is_dir() else None
        if root is None:
            raise PrepareError(f"{args.download_dir} exists but holds no core.yaml; delete it to download the "
                               f"bundle again, or choose another --download-dir")
        return root
    return download_bundle(args.url, args.download_dir)


# ---------------------------------------------------------------------------
# Command line


def max_per_task(text):
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1 and value != -1:
        raise argparse.ArgumentTypeError(f"must be at least 1, or -1 for all rows; got {value}")
    return value


def default_out(args):
    name = "gpt2" if args.tokenizer is None else args.tokenizer.stem
    suffix = "" if args.max_per_task == -1 else f"_{args.max_per_task}"
    return REPO_ROOT / "data" / f"core_{name}{suffix}.bin"


def print_summary(tasks, path, tokenizer):
    print(f"{'task':<34}{'type':<19}{'shots':>5}{'examples':>10}{'sequences':>11}{'longest':>9}"
          f"{f'> {DEFAULT_CONTEXT}':>8}")
    for task in tasks:
        line = f"{task.label:<34}{task.type:<19}{task.shots:>5}"
        if task.rows is None:
            print(f"{line}   missing ({task.path.name} is not in the bundle)")
        else:
            s = task.stats
            print(f"{line}{s.examples:>10,}{s.sequences:>11,}{s.longest:>9,}{s.over_context:>8,}")
    total = sum(len(task.rows or []) for task in tasks)
    print(f"wrote {path}: {counted(len(tasks), 'task')}, {counted(total, 'example')}, "
          f"{path.stat().st_size / 1e6:.1f} MB; BOS {tokenizer.eot}, vocab {tokenizer.encoding.n_vocab:,}")
    print(f"(> {DEFAULT_CONTEXT}: examples with a sequence longer than train_et's default context; train_et keeps "
          f"the last tokens of each, as nanochat does)")
    missing = [task.label for task in tasks if task.rows is None]
    if missing:
        print(f"missing from the bundle: {', '.join(missing)}; train_et reports CORE over the other tasks, "
              f"marked partial")
    print(f"evaluate with train_et (a run tokenized with the same tokenizer):\n"
          f"  ./train_et ... -ce {shlex.quote(str(path))}")


def parse_args(argv):
    summary, _, details = __doc__.partition("\n\n")
    parser = prepare.ArgumentParser(prog="core.py", description=summary, epilog=details,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("the bundle")
    source.add_argument("--bundle", type=Path, metavar="DIR",
                        help="a local copy of the bundle: the unpacked eval_bundle folder, with core.yaml, "
                             "eval_meta_data.csv and eval_data/; nothing is downloaded")
    source.add_argument("--download-dir", type=Path, default=DEFAULT_DOWNLOAD_DIR, metavar="DIR",
                        help="without --bundle: where the bundle is unpacked on the first run and read from on "
                             "later ones (default: data/eval_bundle in the repository)")
    source.add_argument("--url", default=EVAL_BUNDLE_URL,
                        help="where to download the bundle's zip from (default: nanochat's, %(default)s)")
    parser.add_argument("--max-per-task", type=max_per_task, default=-1, metavar="N",
                        help="evaluate the first N rows of each task after the shuffle, -1 for all (default: "
                             "%(default)s; the paper's training-time eval used 500); few-shot examples come from "
                             "those N rows, so N must exceed the tasks' shots (10)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="the eval file to write (default: data/core_<tokenizer>[_<N>].bin in the repository, "
                             "e.g. data/core_gpt2.bin, data/core_gpt2_500.bin)")
    trained = parser.add_argument_group(
        "trained tokenizer", "The run's tokenizer, if it is not GPT-2: a file saved by prepare.py train-tokenizer.")
    trained.add_argument("--tokenizer", type=Path, metavar="FILE",
                         help="tokenize with this saved tokenizer; its end-of-text id is the BOS")
    bpe = parser.add_argument_group(
        "GPT-2 BPE", "Local GPT-2 tokenizer files, for working with no network; without them tiktoken's gpt2 "
                     "encoding is used (downloaded once, then cached). The BOS is <|endoftext|>, 50256.")
    bpe.add_argument("--encoder", type=Path, metavar="ENCODER_JSON", help="GPT-2's encoder.json")
    bpe.add_argument("--vocab", type=Path, metavar="VOCAB_BPE", help="GPT-2's vocab.bpe (the merges)")
    return parser.parse_args(argv)


def run(args):
    out = args.out or default_out(args)
    tokenizer = prepare.load_tokenizer(args)  # first: a bad tokenizer option fails before any download
    bundle = find_bundle(args)
    tasks = load_tasks(bundle, args.max_per_task)
    with prepare.output_dir(out.parent, "--out"):
        prepare.check_writable(out, "--out")
        write_core_file(out, tasks, tokenizer, args.max_per_task)
    print_summary(tasks, out, tokenizer)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
