#!/usr/bin/env python3
"""Prepare training data for train_et: BPE tokens in llm.c's binary shard format.

The trainer never tokenizes: it reads shards of uint16 token ids written here,
and a small id-to-bytes table beside them that gives it the vocab size and the
text of each token (for samples).

Two tokenizers: GPT-2's BPE (the default), or the paper's: a byte-level BPE of
65,536 tokens trained on FineWeb-Edu text with rustbpe, as the authors' code
and nanochat do (their GPT-4-style split pattern, digits in runs of at most 2),
with one special token, <|endoftext|>, as the last id. train-tokenizer trains
and saves it; --tokenizer FILE writes shards (and tables) with a saved one.

Subcommands:
  fineweb          FineWeb-Edu from Hugging Face, or a local .jsonl/.txt file
                   fully offline, into shards of --shard-size tokens with EOT
                   (50256, or the --tokenizer's end-of-text id) in front of
                   every document. Shard 0 is validation, the rest training; an
                   input smaller than two shards is split instead: its first 1%
                   (at least 32,768 tokens or a tenth, whichever is fewer) to
                   validation, the rest to training. Tokenizes in parallel and
                   resumes after an interrupt with output byte-identical to an
                   uninterrupted run.
  text             one text file the way llm.c prepared tiny shakespeare: split
                   on blank lines, EOT before each part, the first --val-tokens
                   tokens to <name>_val.bin and the rest to <name>_train.bin.
  train-tokenizer  train the paper's BPE on the first --max-chars characters of
                   FineWeb-Edu (streamed) or a local file, and save it.
  tokenizer        only the id-to-bytes table.

File formats (all little-endian; shards and GPT-2's table are llm.c's, byte for byte):
  shard            256 x int32 header [20240520, 1, token count, 0, ...],
                   then the tokens as uint16.
  tokenizer table  256 x int32 header [20240328, version, vocab size, EOT, 0, ...],
                   then for each id in order: uint8 length, that many bytes.
                   gpt2_tokenizer.bin: version 1 (llm.c's; no EOT field, it is
                   50256). tokenizer.bin, of a trained tokenizer: version 2,
                   with its end-of-text id. train_et reads tokenizer.bin beside
                   the train shards if it is there, else gpt2_tokenizer.bin.
  trained tokenizer  (train-tokenizer's output; UTF-8 text, one item a line)
                   train_et-bpe 1
                   pattern <the pre-tokenization regex, as a JSON string>
                   special <the end-of-text token, as a JSON string> <its id>
                   ranks <N, the number of byte tokens>
                   then N lines: the bytes of the token of rank 0, 1, ... N-1
                   in base64 (ranks 0-255 are the single bytes). The id of a
                   token is its rank; the special token's id is N.

Each command that writes shards ends by printing the ./train_et command that
trains on what it wrote.

Examples:
  python data/prepare.py fineweb                      # sample-10BT -> data/edu_fineweb10B
  python data/prepare.py fineweb --input docs.jsonl --encoder encoder.json --vocab vocab.bpe
  python data/prepare.py text tiny_shakespeare.txt    # -> data/tiny_shakespeare/
  python data/prepare.py tokenizer data/gpt2_tokenizer.bin
  python data/prepare.py train-tokenizer              # -> data/bpe65536.tokenizer
  python data/prepare.py fineweb --tokenizer data/bpe65536.tokenizer   # its ids, tokenizer.bin beside them
"""

import argparse
import array
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import shlex
import signal
import struct
import sys
import time
from pathlib import Path

try:
    import tiktoken
    from tqdm import tqdm
except ImportError as missing:
    sys.exit(f"error: the Python package {missing.name!r} is not installed; "
             f"run: pip install -r {Path(__file__).resolve().parent / 'requirements.txt'}")

EOT = 50256
GPT2_VOCAB_SIZE = 50257
# GPT-2's pre-tokenization pattern, in the equivalent faster form tiktoken's own gpt2 encoding uses.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# The paper's tokenizer: the split pattern of the authors' code (src/tokenizer.py), which is nanochat's:
# GPT-4's, but digits in runs of at most 2 (where GPT-4 takes 3).
BPE_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"
               r"\s*[\r\n]|\s+(?!\S)|\s+")
BPE_END_OF_TEXT = "<|endoftext|>"
# 65,536 ids, the end-of-text one included: the paper's vocab, and as many as uint16 shards can hold
BPE_VOCAB_SIZE = 65536
# the authors' code trains its tokenizer on the first 2 billion characters
BPE_MAX_CHARS = 2_000_000_000
BPE_FILE_MAGIC = "train_et-bpe 1"

HEADER_INTS = 256
SHARD_MAGIC, SHARD_VERSION = 20240520, 1
# version 1: llm.c's GPT-2 table, no EOT field; version 2 adds the end-of-text id
TOKENIZER_MAGIC = 20240328

REPO_ROOT = Path(__file__).resolve().parent.parent
FINEWEB_DATASET = "HuggingFaceFW/fineweb-edu"
# config -> (default output directory under data/, nominal GPT-2 token count used for the ETA)
FINEWEB_CONFIGS = {
    "sample-10BT": ("edu_fineweb10B", 10 * 10**9),
    "sample-100BT": ("edu_fineweb100B", 100 * 10**9),
}
STATE_FILE_NAME = "prepare_state.json"
GPT2_TABLE_NAME = "gpt2_tokenizer.bin"
BPE_TABLE_NAME = "tokenizer.bin"
DOC_SPLITS = ("blank-line", "line", "none")
# llm.c's tiny-Shakespeare split: the validation tokens of a small input, at least
LLMC_VAL_TOKENS = 32768
# train_et's default batch: tokens per step, and per validation micro-batch (+1 for the targets)
TRAIN_ET_STEP_TOKENS, TRAIN_ET_VAL_BATCH_TOKENS = 524288, 16 * 2048 + 1
# the model and router of the small-corpus command (README: Quick start without FineWeb-Edu)
SMALL_CORPUS_MODEL = "-m d6 -e 8"


class PrepareError(Exception):
    """A problem the user can fix: reported as one line, without a traceback."""


class Interrupted(Exception):
    """The run was stopped before the end; every file already under its final name is complete."""


# ---------------------------------------------------------------------------
# The GPT-2 tokenizer


def gpt2_char_to_byte():
    """GPT-2's encoder.json spells every byte as a printable character.

    Printable Latin-1 bytes stand for themselves; the 68 others (controls, space,
    a few invisible ones) are shifted to chr(256), chr(257), ... in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(byte): byte for byte in printable}
    hidden = [byte for byte in range(256) if byte not in printable]
    char_to_byte.update({chr(256 + n): byte for n, byte in enumerate(hidden)})
    return char_to_byte


def read_local_file(path, what):
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PrepareError(f"{what} not found: {path}; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"cannot read {what} {path}: {e}") from None


def load_gpt2_from_files(encoder_path, vocab_path):
    """Build the GPT-2 encoding from encoder.json and vocab.bpe, with no network.

    We parse the files ourselves: tiktoken's own helper caches even local files in
    a temp directory keyed by path, so an edited file could be served stale.
    tiktoken merges by rank, so vocab.bpe's merge order must match the ids in
    encoder.json; checking that catches a mismatched pair of files.
    """
    char_to_byte = gpt2_char_to_byte()

    def spelled_to_bytes(spelled, where):
        try:
            return bytes(char_to_byte[char] for char in spelled)
        except KeyError:
            raise PrepareError(f"{where}: {spelled!r} is not a GPT-2 byte-level token; "
                               f"pass GPT-2's encoder.json and vocab.bpe") from None

    try:
        encoder = json.loads(read_local_file(encoder_path, "--encoder file"))
    except json.JSONDecodeError as e:
        raise PrepareError(f"{encoder_path} is not valid JSON ({e.msg} at line {e.lineno}); "
                           f"pass GPT-2's encoder.json as --encoder") from None
    if not isinstance(encoder, dict) or encoder.get("<|endoftext|>") != EOT or len(encoder) != GPT2_VOCAB_SIZE:
        raise PrepareError(f"{encoder_path} is not GPT-2's encoder.json ({GPT2_VOCAB_SIZE} entries, "
                           f"<|endoftext|> = {EOT}); pass GPT-2's encoder.json as --encoder")
    ranks = {spelled_to_bytes(spelled, encoder_path): token_id
             for spelled, token_id in encoder.items() if spelled != "<|endoftext|>"}

    merge_lines = read_local_file(vocab_path, "--vocab file").splitlines()
    rank = 256  # ids below 256 are the single bytes
    for line_number, line in enumerate(merge_lines, start=1):
        if line_number == 1 and line.startswith("#version"):
            continue
        if not line:
            continue
        pair = line.split()
        if len(pair) != 2 or ranks.get(spelled_to_bytes(pair[0] + pair[1], f"{vocab_path}:{line_number}")) != rank:
            raise PrepareError(f"{vocab_path}:{line_number}: merge {line[:40]!r} does not match {encoder_path}; "
                               f"pass the vocab.bpe that belongs to this encoder.json")
        rank += 1
    if rank != EOT:
        raise PrepareError(f"{vocab_path} has {rank - 256} merges, GPT-2 has {EOT - 256}; pass GPT-2's vocab.bpe")

    return tiktoken.Encoding(name="gpt2-local-files", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=GPT2_VOCAB_SIZE)


def load_gpt2(encoder_path, vocab_path):
    if encoder_path is None and vocab_path is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken downloads the files on first use; any failure means the same fix
            raise PrepareError(f"could not get tiktoken's GPT-2 encoding ({first_line(e)}); "
                               f"offline, pass --encoder encoder.json --vocab vocab.bpe") from None
    if encoder_path is None or vocab_path is None:
        raise PrepareError("--encoder and --vocab go together: pass both GPT-2 files (encoder.json and vocab.bpe)")
    return load_gpt2_from_files(encoder_path, vocab_path)


# ---------------------------------------------------------------------------
# The tokenizer the shards are written with: GPT-2's, or a trained one (the paper's)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A tiktoken encoding, the id written before every document, and the id-to-bytes
    table that goes beside the shards: GPT-2's is llm.c's gpt2_tokenizer.bin, version 1
    (its EOT, 50256, is implied); a trained one's is tokenizer.bin, version 2, which
    records the end-of-text id."""
    encoding: object
    eot: int
    table_name: str
    table_version: int


def gpt2_tokenizer(encoder_path, vocab_path):
    return Tokenizer(load_gpt2(encoder_path, vocab_path), EOT, GPT2_TABLE_NAME, 1)


def bpe_tokenizer(pattern, tokens, name):
    """A trained byte-level BPE from its tokens in rank order: a token's id is its
    rank, and the end-of-text token comes after them all."""
    longest = max(range(len(tokens)), key=lambda rank: len(tokens[rank]))
    if len(tokens[longest]) > 255:
        # a table entry's length is one byte (llm.c's format), so train_et could not read the table
        raise PrepareError(f"{name}: token {longest} is {len(tokens[longest])} bytes, more than the 255 a tokenizer "
                           f"table entry holds; train it on other text or with a smaller --vocab-size")
    eot = len(tokens)
    encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks={token: rank for rank, token in
                                                                             enumerate(tokens)},
                                 special_tokens={BPE_END_OF_TEXT: eot}, explicit_n_vocab=eot + 1)
    return Tokenizer(encoding, eot, BPE_TABLE_NAME, 2)


def load_tokenizer(args):
    """--tokenizer FILE, else GPT-2 (from --encoder and --vocab, or tiktoken's)."""
    if args.tokenizer is None:
        return gpt2_tokenizer(args.encoder, args.vocab)
    if args.encoder is not None or args.vocab is not None:
        raise PrepareError("--tokenizer and --encoder/--vocab exclude each other (they name two tokenizers); "
                           "drop --tokenizer for GPT-2, or --encoder and --vocab for the trained tokenizer")
    return load_bpe(args.tokenizer)


def save_bpe(pattern, tokens, path):
    """Writes a trained tokenizer in our text format (the module docstring): JSON
    strings for the pattern and the special token, base64 for the token bytes."""
    lines = [BPE_FILE_MAGIC, f"pattern {json.dumps(pattern)}",
             f"special {json.dumps(BPE_END_OF_TEXT)} {len(tokens)}", f"ranks {len(tokens)}"]
    lines += [base64.b64encode(token).decode("ascii") for token in tokens]
    write_atomically(path, ("\n".join(lines) + "\n").encode("ascii"))


def load_bpe(path):
    """Reads a tokenizer saved by save_bpe, checking every line: a bad one is named with the fix."""
    if Path(path).is_file() and Path(path).read_bytes()[:4] == struct.pack("<i", TOKENIZER_MAGIC):
        raise PrepareError(f"{path} is a tokenizer table, which only train_et reads; pass the tokenizer file "
                           f"prepare.py train-tokenizer saved")
    lines = read_local_file(path, "--tokenizer file").split("\n")
    if lines[-1] == "":
        lines.pop()

    def bad(line_number, what):
        return PrepareError(f"{path}:{line_number}: {what}; pass a file that prepare.py train-tokenizer wrote")

    def json_string(value):
        parsed = json.loads(value)
        if not isinstance(parsed, str):
            raise ValueError("not a JSON string")
        return parsed

    def special_token(value):
        name, _, token_id = value.rpartition(" ")
        return json_string(name), int(token_id)

    def field(line_number, key, parse):
        line = lines[line_number - 1] if line_number <= len(lines) else ""
        name, _, value = line.partition(" ")
        if name != key:
            raise bad(line_number, f"expected the {key!r} line, found {line[:40]!r}")
        try:
            return parse(value)
        except ValueError:
            raise bad(line_number, f"cannot read the {key!r} line {line[:60]!r}") from None

    first = lines[0] if lines else ""
    if first != BPE_FILE_MAGIC:
        raise bad(1, f"not a train_et tokenizer (the first line is {first[:40]!r}, not {BPE_FILE_MAGIC!r})")
    pattern = field(2, "pattern", json_string)
    special, special_id = field(3, "special", special_token)
    count = field(4, "ranks", int)
    if not 256 <= count < BPE_VOCAB_SIZE:
        raise bad(4, f"{count:,} ranks: a byte-level BPE has 256 to {BPE_VOCAB_SIZE - 1:,} (the end-of-text id "
                     f"comes after them and must fit uint16)")
    if special != BPE_END_OF_TEXT or special_id != count:
        raise bad(3, f"the special token must be {BPE_END_OF_TEXT!r} with id {count} (after the ranks), "
                     f"found {special!r} with id {special_id}")
    if len(lines) != 4 + count:
        raise bad(len(lines), f"{len(lines) - 4:,} token lines, the 'ranks' line says {count:,}")
    tokens, seen = [], {}
    for rank, line in enumerate(lines[4:]):
        try:
            token = base64.b64decode(line, validate=True)
        except binascii.Error:
            raise bad(5 + rank, f"token {rank} is not base64: {line[:40]!r}") from None
        if rank < 256 and token != bytes([rank]):
            raise bad(5 + rank, f"token {rank} is {token!r}; ranks 0-255 must be the single bytes in order")
        if not token:
            raise bad(5 + rank, f"token {rank} is empty")
        if token in seen:
            raise bad(5 + rank, f"token {rank} repeats token {seen[token]} ({token!r})")
        seen[token] = rank
        tokens.append(token)
    try:
        return bpe_tokenizer(pattern, tokens, str(path))
    except ValueError as e:  # tiktoken's regex engine refused the pattern
        raise bad(2, f"tiktoken cannot use the pattern ({first_line(e)})") from None


def train_bpe(documents, vocab_size, max_chars):
    """Trains rustbpe on the documents' first max_chars characters (the last one cut
    short) for vocab_size ids, the end-of-text one included. Returns the tokens in
    rank order; fewer than asked for when the text runs out of pairs to merge."""
    try:
        import rustbpe  # only training needs it
    except ImportError:
        raise PrepareError(f"training a tokenizer needs the 'rustbpe' package: pip install -r "
                           f"{Path(__file__).resolve().parent / 'requirements.txt'}") from None
    read = {"chars": 0, "documents": 0}

    def texts():
        with tqdm(total=max_chars, unit="char", unit_scale=True, dynamic_ncols=True, desc="text") as progress:
            for text, _ in documents:
                text = text[:max_chars - read["chars"]]
                read["chars"] += len(text)
                read["documents"] += 1
                progress.update(len(text))
                yield text
                if read["chars"] == max_chars:
                    break
            progress.total = progress.n
        if read["chars"] == 0:
            raise PrepareError("the input holds no text to train on; check the file and --doc-split / --text-field")
        # rustbpe has read everything: the merges come next, with no progress to show
        print(f"learning the merges from {counted(read['chars'], 'character')} "
              f"({counted(read['documents'], 'document')})", flush=True)

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts(), vocab_size - 1, pattern=BPE_PATTERN)
    ranked = sorted(bpe.get_mergeable_ranks(), key=lambda token_rank: token_rank[1])
    assert [rank for _, rank in ranked] == list(range(len(ranked))), "rustbpe's ranks are not 0, 1, 2, ..."
    return [bytes(token) for token, _ in ranked]


def first_line(error):
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


# ---------------------------------------------------------------------------
# Writing files


def file_header(magic, version, *fields):
    return struct.pack(f"<{2 + len(fields)}i", magic, version, *fields) + bytes(4 * (HEADER_INTS - 2 - len(fields)))


def tokens_to_bytes(tokens):
    """Token ids as uint16 little-endian bytes (every id fits: vocabs have at most 65,536)."""
    packed = array.array("H", tokens)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def bytes_to_tokens(data):
    tokens = array.array("H")
    tokens.frombytes(data)
    if sys.byteorder == "big":
        tokens.byteswap()
    return tokens.tolist()


def write_atomically(path, *parts):
    """Write under a hidden temporary name, then rename: no reader and no resumed
    run ever sees half a file under the final name, whenever the process dies."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as e:
        raise PrepareError(f"cannot write {path}: {e.strerror}; check the free space and the permissions "
                           f"of {path.parent}, or choose another output location") from None


def check_writable(path, option):
    """Fails now if write_atomically(path) would fail later for want of a place to write."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.open("wb").close()
        partial.unlink()
    except OSError as e:
        raise PrepareError(f"cannot write {path}: {e.strerror}; choose another {option}") from None
    if path.is_dir():
        raise PrepareError(f"{path} is a directory; choose another {option}")


def write_shard(path, token_bytes):
    write_atomically(path, file_header(SHARD_MAGIC, SHARD_VERSION, len(token_bytes) // 2), token_bytes)


def write_tokenizer_table(tokenizer, path):
    encoding = tokenizer.encoding
    # version 2 records the end-of-text id; llm.c's version 1 (GPT-2's) has none
    eot = (tokenizer.eot,) if tokenizer.table_version == 2 else ()
    table = bytearray(file_header(TOKENIZER_MAGIC, tokenizer.table_version, encoding.n_vocab, *eot))
    for token_id in range(encoding.n_vocab):
        token = encoding.decode_single_token_bytes(token_id)
        table.append(len(token))
        table += token
    write_atomically(path, table)


@contextlib.contextmanager
def output_dir(path, option):
    """Makes the output directory; if this run made it and stops before writing
    anything into it (a bad option, a bad input), removes it again."""
    made = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create output directory {path}: {e.strerror}; choose another {option}") from None
    try:
        yield
    except BaseException:
        if made and not any(path.iterdir()):
            path.rmdir()
        raise


def counted(n, noun):
    """1 shard, 2 shards, 12,345 tokens."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def train_command(train_glob, val_glob, train_tokens, val_tokens):
    """The train_et command that trains on these shards. When they are too small for
    train_et's default batch (ten steps of it, and one validation micro-batch), it
    takes the small-corpus model and the largest -b x -t (-t at most 256) whose
    windows fit both shards."""
    command = f"./train_et -i {shlex.quote(str(train_glob))} -j {shlex.quote(str(val_glob))}"
    if train_tokens >= 10 * TRAIN_ET_STEP_TOKENS and val_tokens >= TRAIN_ET_VAL_BATCH_TOKENS:
        return command
    for seq_len in (256, 128, 64, 32, 16, 8):
        for batch in (8, 4, 2, 1):
            if batch * seq_len + 1 <= min(train_tokens, val_tokens):
                return f"{command} {SMALL_CORPUS_MODEL} -b {batch} -t {seq_len} -d {batch * seq_len}"
    return None


def print_train_command(train_glob, val_glob, train_tokens, val_tokens):
    command = train_command(train_glob, val_glob, train_tokens, val_tokens)
    if command:
        print(f"train on it with:\n  {command}")
    else:
        print(f"too small to train on: train_et needs at least 9 tokens in the train and in the val shard "
              f"(here {train_tokens:,} and {val_tokens:,})")


# ---------------------------------------------------------------------------
# Reading documents
#
# A source yields (text, fraction): the document and how much of the input has
# been read once it is, or None where that is unknown. The fraction only feeds
# the progress bar's ETA.


def check_input_file(path):
    if not path.is_file():
        raise PrepareError(f"input file not found: {path}; check the path given to --input")
    if path.suffix.lower() not in (".jsonl", ".txt"):
        raise PrepareError(f"{path}: --input takes a .jsonl file (one JSON object per line) or a .txt file, "
                           f"not {path.suffix or 'a file without a suffix'}; rename it to the format it holds")


def input_file_documents(path, text_field, doc_split):
    if path.suffix.lower() == ".jsonl":
        return jsonl_documents(path, text_field)
    return text_file_documents(path, doc_split)


@contextlib.contextmanager
def open_utf8(path):
    try:
        with open(path, encoding="utf-8") as f:
            yield f
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8 "
                           f"(e.g. iconv -f latin1 -t utf-8)") from None
    except OSError as e:
        raise PrepareError(f"cannot read {path}: {e.strerror}") from None


def jsonl_documents(path, text_field):
    size = max(path.stat().st_size, 1)
    with open_utf8(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path}:{line_number}: not valid JSON ({e.msg} at column {e.colno}); "
                                   f"fix or remove that line") from None
            if not isinstance(record, dict):
                raise PrepareError(f"{path}:{line_number}: expected a JSON object with a {text_field!r} field, "
                                   f"got {type(record).__name__}; fix or remove that line")
            if text_field not in record:
                fields = ", ".join(map(repr, record)) or "none"
                raise PrepareError(f"{path}:{line_number}: no {text_field!r} field (fields: {fields}); "
                                   f"name the text field with --text-field")
            text = record[text_field]
            if not isinstance(text, str):
                raise PrepareError(f"{path}:{line_number}: field {text_field!r} is {type(text).__name__}, "
                                   f"not a string; fix that line or choose another --text-field")
            yield text, f.buffer.tell() / size


def text_file_documents(path, doc_split):
    """Documents of a plain text file. blank-line: runs of non-blank lines joined
    by newlines, separated by one or more blank (or whitespace-only) lines;
    line: every non-blank line; none: the whole file, exactly as it is."""
    size = max(path.stat().st_size, 1)
    with open_utf8(path) as f:
        if doc_split == "none":
            yield f.read(), 1.0
            return
        paragraph = []
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                paragraph.append(line)
                if doc_split == "line":
                    yield line, f.buffer.tell() / size
                    paragraph.clear()
            elif paragraph:
                yield "\n".join(paragraph), f.buffer.tell() / size
                paragraph.clear()
        if paragraph:
            yield "\n".join(paragraph), 1.0


def open_fineweb(config, text_field, stream, skip):
    """FineWeb-Edu's documents after the first `skip`, from Hugging Face."""
    try:
        import datasets  # only this path needs it, so offline preparation works without it
    except ImportError:
        raise PrepareError(f"downloading FineWeb-Edu needs the 'datasets' package: pip install -r "
                           f"{Path(__file__).resolve().parent / 'requirements.txt'} (or prepare a local file "
                           f"with --input)") from None
    try:
        dataset = datasets.load_dataset(FINEWEB_DATASET, name=config, split="train", streaming=stream)
    except Exception as e:  # network, disk, authentication: all end in the same advice
        raise PrepareError(f"could not load {FINEWEB_DATASET} ({config}) from Hugging Face ({first_line(e)}); "
                           f"check the network and the free disk space, or prepare a local file with --input") from None
    if dataset.column_names is not None and text_field not in dataset.column_names:
        raise PrepareError(f"{FINEWEB_DATASET} ({config}) has no {text_field!r} column "
                           f"(columns: {', '.join(dataset.column_names)}); choose another --text-field")
    total_rows = dataset_rows(dataset)
    remaining = dataset.select_columns([text_field]).skip(skip)

    def documents():
        try:
            for row_number, row in enumerate(remaining, start=skip + 1):
                yield row[text_field], row_number / total_rows if total_rows else None
        except Exception as e:  # a dropped connection mid-download: the finished shards are safe
            raise PrepareError(f"reading {FINEWEB_DATASET} ({config}) failed ({first_line(e)}); "
                               f"run the same command again to continue from the last finished shard") from None

    return documents()


def dataset_rows(dataset):
    try:
        return len(dataset)
    except TypeError:  # a streaming dataset has no length; its metadata may still know the row count
        try:
            return dataset.info.splits["train"].num_examples or None
        except (AttributeError, KeyError, TypeError):
            return None


# ---------------------------------------------------------------------------
# Tokenizing in parallel
#
# Workers get the tokenizer once, when they start; each task is then just text,
# and each result the document's tokens (EOT first) as uint16 bytes, in order.

worker_tokenizer = None


def start_worker(tokenizer):
    global worker_tokenizer
    worker_tokenizer = tokenizer
    # Ctrl-C reaches the whole process group; only the main process should react to it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The pool stops its workers with SIGTERM: they must just die, not run the main process's handler.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def tokenize_document(document):
    text, fraction = document
    return tokens_to_bytes([worker_tokenizer.eot, *worker_tokenizer.encoding.encode_ordinary(text)]), fraction


@contextlib.contextmanager
def tokenized(documents, tokenizer, workers):
    global worker_tokenizer
    if workers == 1:
        worker_tokenizer = tokenizer
        yield map(tokenize_document, documents)
        return
    # imap keeps document order; its feeder blocks once the task pipe is full, so a
    # huge dataset is never read into memory ahead of the workers.
    with multiprocessing.Pool(workers, initializer=start_worker, initargs=(tokenizer,)) as pool:
        yield pool.imap(tokenize_document, documents, chunksize=16)


# ---------------------------------------------------------------------------
# Shards and the resume state
#
# After every shard, the state file records how many documents have been
# consumed and the tokens already cut off for the next shard (the rest of the
# document that straddles the boundary). A re-run skips those documents, starts
# the next shard with those tokens, and so writes exactly the same bytes.


def shard_name(index):
    split = "val" if index == 0 else "train"
    return f"edu_fineweb_{split}_{index:06d}.bin"


def shard_glob(split):
    return f"edu_fineweb_{split}_*.bin"


def fresh_state(settings):
    return {"settings": settings, "shards_written": 0, "tokens_written": 0,
            "documents_consumed": 0, "spill_tokens": [], "complete": False}


def save_state(out_dir, state):
    write_atomically(out_dir / STATE_FILE_NAME, json.dumps(state).encode())


def load_state(out_dir, settings):
    path = out_dir / STATE_FILE_NAME
    if not path.exists():
        return fresh_state(settings)
    try:
        state = json.loads(path.read_text())
        shards_written = state["shards_written"]
        recorded_settings = state["settings"]
        if not set(fresh_state(settings)) <= set(state):
            raise KeyError("missing fields")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrepareError(f"cannot read the resume state {path} ({first_line(e)}); delete it to start over") from None
    if recorded_settings != settings:
        differing = sorted(key for key in settings.keys() | recorded_settings.keys()
                           if settings.get(key) != recorded_settings.get(key))
        raise PrepareError(f"{path} belongs to a different run (differs in: {', '.join(differing)}); "
                           f"choose another --out, or delete {path} and the shards next to it to start over")
    for index in range(shards_written):
        if not (out_dir / shard_name(index)).is_file():
            raise PrepareError(f"{path} says {shards_written} shards are done but {shard_name(index)} is missing; "
                               f"delete {path} to start over")
    return state


def small_input_val_tokens(total):
    """The validation tokens of an input smaller than two shards: its first 1%, but at
    least llm.c's tiny-Shakespeare 32,768 tokens or a tenth of it, whichever is fewer."""
    return max(-(-total // 100), min(LLMC_VAL_TOKENS, total // 10), 1)


class ShardWriter:
    """Cuts the stream of document tokens into shards of exactly shard_size tokens
    (the last one holds the remainder), saving the resume state after each.

    Shard 0 is validation. It is held back until a second shard fills: an input
    smaller than two shards is split by finish() instead (small_input_val_tokens),
    so that it gives a train shard and a val shard, not validation alone."""

    def __init__(self, out_dir, shard_size, state, stop_after_shards):
        self.out_dir = out_dir
        self.state = state
        self.stop_after_shards = stop_after_shards
        self.shards_this_run = 0
        self.buffer = bytearray(2 * shard_size)
        self.filled = 0  # in bytes
        self.held = None  # shard 0, until shard 1 fills
        self.small_split = None  # (val tokens, total tokens) when finish() split a small input

    def add_document(self, token_bytes):
        self.state["documents_consumed"] += 1
        self.add_tokens(token_bytes)

    def add_tokens(self, token_bytes):
        rest = memoryview(token_bytes)
        while rest:
            take = min(len(rest), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + take] = rest[:take]
            self.filled += take
            rest = rest[take:]
            if self.filled == len(self.buffer):
                if self.state["shards_written"] == 0 and self.held is None:
                    self.held = bytes(self.buffer)
                else:
                    if self.held is not None:
                        self.write_shard(self.held, spill=None)
                        self.held = None
                    self.write_shard(self.buffer, spill=rest)
                self.filled = 0

    def finish(self):
        rest = bytes(self.buffer[:self.filled])
        if self.state["shards_written"] == 0:
            self.split_small_input((self.held or b"") + rest)
        elif rest:
            self.write_shard(rest, spill=b"")
        self.state["complete"] = True
        save_state(self.out_dir, self.state)

    def split_small_input(self, token_bytes):
        total = len(token_bytes) // 2
        if total < 2:
            raise PrepareError(f"the input holds {counted(total, 'token')}: too few for a train and a val shard; "
                               f"give it more text")
        val = small_input_val_tokens(total)
        self.small_split = (val, total)
        shard_bytes = len(self.buffer)
        pieces = [token_bytes[:2 * val]]
        pieces += [token_bytes[start:start + shard_bytes] for start in range(2 * val, len(token_bytes), shard_bytes)]
        for piece in pieces[:-1]:
            self.write_shard(piece, spill=None)
        self.write_shard(pieces[-1], spill=b"")

    def write_shard(self, token_bytes, spill):
        """Writes the next shard and, unless spill is None (another shard follows at
        once), saves the resume state with spill, the start of the next shard."""
        index = self.state["shards_written"]
        write_shard(self.out_dir / shard_name(index), token_bytes)
        self.state["shards_written"] = index + 1
        self.state["tokens_written"] += len(token_bytes) // 2
        self.shards_this_run += 1
        if spill is None:
            return
        self.state["spill_tokens"] = bytes_to_tokens(spill)
        save_state(self.out_dir, self.state)
        if self.stop_after_shards and self.shards_this_run >= self.stop_after_shards:
            raise Interrupted(f"stopped by --stop-after-shards {self.stop_after_shards} "
                              f"({counted(index + 1, 'shard')} in {self.out_dir})")


# ---------------------------------------------------------------------------
# The subcommands


def run_settings(args):
    """What defines a run's output: a resumed run must match it exactly."""
    settings = {"shard_size": args.shard_size}
    if args.tokenizer is not None:
        settings["tokenizer_sha256"] = file_sha256(args.tokenizer, "--tokenizer file")
    if args.input is None:
        settings.update(dataset=FINEWEB_DATASET, config=args.config, text_field=args.text_field, stream=args.stream)
        return settings
    stat = args.input.stat()
    settings.update(input=str(args.input.resolve()), input_bytes=stat.st_size, input_mtime_ns=stat.st_mtime_ns)
    if args.input.suffix.lower() == ".jsonl":
        settings["text_field"] = args.text_field
    else:
        settings["doc_split"] = args.doc_split
    return settings


def file_sha256(path, what):
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        raise PrepareError(f"{what} not found: {path}; check the path") from None
    except OSError as e:
        raise PrepareError(f"cannot read {what} {path}: {e.strerror}") from None


def check_table_name(out_dir, tokenizer):
    """train_et takes tokenizer.bin over gpt2_tokenizer.bin: shards of one tokenizer must
    not go where the other's table is, or it would read their ids with the wrong one."""
    other = out_dir / (GPT2_TABLE_NAME if tokenizer.table_name == BPE_TABLE_NAME else BPE_TABLE_NAME)
    if other.exists():
        raise PrepareError(f"{out_dir} holds {other.name}, the table of shards made with another tokenizer, and "
                           f"train_et would read these shards with it; choose another --out, or delete {other} "
                           f"and the shards it belongs to")


def shard_tokens(path):
    return (path.stat().st_size - 4 * HEADER_INTS) // 2


def print_fineweb_train_command(out_dir, state):
    val_tokens = shard_tokens(out_dir / shard_name(0))
    print_train_command(out_dir / shard_glob("train"), out_dir / shard_glob("val"),
                        state["tokens_written"] - val_tokens, val_tokens)


def prepare_fineweb(args):
    out_dir = args.out or REPO_ROOT / "data" / FINEWEB_CONFIGS[args.config][0]
    if args.input is not None:
        check_input_file(args.input)
    settings = run_settings(args)
    with output_dir(out_dir, "--out"):
        state = load_state(out_dir, settings)
        if state["complete"]:
            print(f"already complete: {out_dir} holds {counted(state['shards_written'], 'shard')}, "
                  f"{counted(state['tokens_written'], 'token')} (delete {out_dir / STATE_FILE_NAME} and the shards "
                  f"to prepare them again)")
            print_fineweb_train_command(out_dir, state)
            return
        tokenizer = load_tokenizer(args)
        check_table_name(out_dir, tokenizer)
        write_fineweb_shards(args, out_dir, state, tokenizer)
        # last, so that a run stopped by a bad input leaves nothing behind
        write_tokenizer_table(tokenizer, out_dir / tokenizer.table_name)
    print_fineweb_train_command(out_dir, state)


def write_fineweb_shards(args, out_dir, state, tokenizer):
    skip = state["documents_consumed"]
    if args.input is not None:
        documents = itertools.islice(input_file_documents(args.input, args.text_field, args.doc_split), skip, None)
        source, nominal_tokens = args.input, None
    else:
        documents = open_fineweb(args.config, args.text_field, args.stream, skip)
        source, nominal_tokens = f"{FINEWEB_DATASET} ({args.config})", FINEWEB_CONFIGS[args.config][1]
    if skip:
        print(f"resuming: {counted(state['shards_written'], 'shard')} done, skipping the first "
              f"{counted(skip, 'document')}")
    print(f"tokenizing {source} into {out_dir}: shards of {args.shard_size:,} tokens, --workers {args.workers}")

    writer = ShardWriter(out_dir, args.shard_size, state, args.stop_after_shards)
    tokens_so_far = state["tokens_written"] + len(state["spill_tokens"])
    with tokenized(documents, tokenizer, args.workers) as results, \
            tqdm(total=nominal_tokens, initial=tokens_so_far, unit="tok", unit_scale=True,
                 dynamic_ncols=True, desc="tokens") as progress:
        # The tail of the document the last run stopped in; it may fill whole shards by itself.
        writer.add_tokens(tokens_to_bytes(state["spill_tokens"]))
        for token_bytes, fraction in results:
            writer.add_document(token_bytes)
            progress.update(len(token_bytes) // 2)
            if fraction:
                progress.total = round(progress.n / fraction)
        progress.total = progress.n
        if state["documents_consumed"] == 0:
            raise PrepareError(f"{source} holds no documents; check the file and --doc-split / --text-field")
        writer.finish()
    if writer.small_split:
        val, total = writer.small_split
        print(f"the input holds {counted(total, 'token')}, less than two shards of {args.shard_size:,}: its first "
              f"{counted(val, 'token')} went to the validation shard, the other {total - val:,} to training")
    print(f"wrote {counted(state['shards_written'], 'shard')}, {counted(state['tokens_written'], 'token')} "
          f"({counted(state['documents_consumed'], 'document')}) to {out_dir}")


def prepare_text(args):
    if not args.file.is_file():
        raise PrepareError(f"input file not found: {args.file}; check the path")
    name = args.name or args.file.stem
    out_dir = args.out or REPO_ROOT / "data" / name
    with output_dir(out_dir, "--out"):
        tokenizer = load_tokenizer(args)
        check_table_name(out_dir, tokenizer)
        with open_utf8(args.file) as f:
            parts = f.read().split("\n\n")
        tokens = []
        for index, part in enumerate(parts):
            tokens.append(tokenizer.eot)
            # llm.c's recipe: every part but the last gets its separating blank line back
            tokens.extend(tokenizer.encoding.encode_ordinary(part if index == len(parts) - 1 else part + "\n\n"))
        if len(tokens) <= args.val_tokens:
            raise PrepareError(f"{args.file} gives only {counted(len(tokens), 'token')}, not more than --val-tokens "
                               f"{args.val_tokens:,}; lower --val-tokens")
        val_path, train_path = out_dir / f"{name}_val.bin", out_dir / f"{name}_train.bin"
        write_shard(val_path, tokens_to_bytes(tokens[:args.val_tokens]))
        write_shard(train_path, tokens_to_bytes(tokens[args.val_tokens:]))
        write_tokenizer_table(tokenizer, out_dir / tokenizer.table_name)
    train_tokens = len(tokens) - args.val_tokens
    print(f"wrote {val_path} ({counted(args.val_tokens, 'token')}) and {train_path} ({counted(train_tokens, 'token')})")
    print_train_command(train_path, val_path, train_tokens, args.val_tokens)


def prepare_tokenizer(args):
    tokenizer = load_tokenizer(args)
    path = args.path or REPO_ROOT / "data" / tokenizer.table_name
    with output_dir(path.parent, "PATH"):
        write_tokenizer_table(tokenizer, path)
    if tokenizer.table_version == 1:
        print(f"wrote {path} ({counted(tokenizer.encoding.n_vocab, 'token')})")
    else:
        print(f"wrote {path} ({counted(tokenizer.encoding.n_vocab, 'token')}, end-of-text id {tokenizer.eot}); "
              f"train_et reads it as {BPE_TABLE_NAME} beside the train shards")


def prepare_train_tokenizer(args):
    path = args.path or REPO_ROOT / "data" / f"bpe{args.vocab_size}.tokenizer"
    if args.input is not None:
        check_input_file(args.input)
        documents, source = input_file_documents(args.input, args.text_field, args.doc_split), args.input
    else:
        # streamed: the first --max-chars characters are all it reads, no need to keep the rest
        documents = open_fineweb(args.config, args.text_field, True, 0)
        source = f"{FINEWEB_DATASET} ({args.config}, streamed)"
    with output_dir(path.parent, "PATH"):
        check_writable(path, "PATH")  # now, not after hours of training
        print(f"training a BPE of {args.vocab_size:,} tokens on the first {args.max_chars:,} characters of {source}")
        start = time.monotonic()
        tokens = train_bpe(documents, args.vocab_size, args.max_chars)
        tokenizer = bpe_tokenizer(BPE_PATTERN, tokens, str(path))
        save_bpe(BPE_PATTERN, tokens, path)
    vocab = tokenizer.encoding.n_vocab
    if vocab < args.vocab_size:
        print(f"warning: the text ran out of pairs to merge: the vocab is {vocab:,}, not --vocab-size "
              f"{args.vocab_size:,}; train on more text (--max-chars, a larger --input) for the full size")
    print(f"wrote {path} in {time.monotonic() - start:.0f} s: {counted(vocab, 'token')} ({len(tokens) - 256:,} "
          f"merges, {BPE_END_OF_TEXT} = {tokenizer.eot})")
    print(f"write shards with it:\n  python3 data/prepare.py fineweb --tokenizer {shlex.quote(str(path))}")


# ---------------------------------------------------------------------------
# Command line


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line naming the fix, like every other error here."""

    def error(self, message):
        self.exit(2, f"error: {message}; see: {self.prog} -h\n")


def positive_int(text):
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def vocab_size(text):
    value = positive_int(text)
    if not 257 <= value <= BPE_VOCAB_SIZE:
        raise argparse.ArgumentTypeError(f"must be in [257, {BPE_VOCAB_SIZE}] (the 256 bytes and the end-of-text "
                                         f"token at least; token ids must fit uint16), got {value}")
    return value


def default_workers():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv):
    summary, _, details = __doc__.partition("\n\n")
    parser = ArgumentParser(prog="prepare.py", description=summary, epilog=details,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tokenizer_files = ArgumentParser(add_help=False)
    trained = tokenizer_files.add_argument_group(
        "trained tokenizer", "The paper's BPE instead of GPT-2's: a tokenizer saved by train-tokenizer.")
    trained.add_argument("--tokenizer", type=Path, metavar="FILE",
                         help=f"tokenize with this saved tokenizer: its ids, its end-of-text id before every "
                              f"document, and its table as {BPE_TABLE_NAME} (version 2) instead of "
                              f"{GPT2_TABLE_NAME}")
    bpe = tokenizer_files.add_argument_group(
        "GPT-2 BPE", "Local GPT-2 tokenizer files, for working with no network; without them "
                     "tiktoken's gpt2 encoding is used (downloaded once, then cached).")
    bpe.add_argument("--encoder", type=Path, metavar="ENCODER_JSON", help="GPT-2's encoder.json")
    bpe.add_argument("--vocab", type=Path, metavar="VOCAB_BPE", help="GPT-2's vocab.bpe (the merges)")

    # where the documents come from: fineweb and train-tokenizer
    document_source = ArgumentParser(add_help=False)
    document_source.add_argument("--config", choices=FINEWEB_CONFIGS, default="sample-10BT",
                                 help="FineWeb-Edu sample to read from Hugging Face (default: %(default)s)")
    document_source.add_argument("--input", type=Path, metavar="FILE",
                                 help="read this local file instead of FineWeb-Edu, fully offline: .jsonl (one "
                                      "JSON object per line) or .txt")
    document_source.add_argument("--text-field", default="text", metavar="NAME",
                                 help="field holding the document text, in --input .jsonl lines or the dataset's "
                                      "rows (default: %(default)s)")
    document_source.add_argument("--doc-split", choices=DOC_SPLITS, default="blank-line",
                                 help="how a --input .txt file splits into documents: blank-line (paragraphs "
                                      "separated by blank lines), line (every non-blank line), none (the whole "
                                      "file is one document) (default: %(default)s)")

    fineweb = commands.add_parser(
        "fineweb", parents=[document_source, tokenizer_files], help="FineWeb-Edu (or a local file) -> token shards",
        description="Tokenize FineWeb-Edu (downloaded from Hugging Face, or a local --input file) into "
                    "shards <out>/edu_fineweb_{val|train}_NNNNNN.bin, EOT before every document; shard 0 is "
                    "validation. An input smaller than two shards is split instead: its first 1% (at least "
                    "32,768 tokens or a tenth, whichever is fewer) to validation, the rest to training. Documents "
                    "may straddle shards. Interrupted runs (Ctrl-C, kill) continue "
                    f"where they stopped when the same command is run again (state in <out>/{STATE_FILE_NAME}); "
                    "the result is byte-identical to an uninterrupted run.")
    fineweb.add_argument("--out", type=Path, metavar="DIR",
                         help="output directory (default: data/edu_fineweb10B or data/edu_fineweb100B in the "
                              "repository, by --config)")
    fineweb.add_argument("--shard-size", type=positive_int, default=100_000_000, metavar="TOKENS",
                         help="tokens per shard; the last shard holds the remainder (default: %(default)s)")
    fineweb.add_argument("--workers", type=positive_int, default=default_workers(), metavar="N",
                         help="tokenizer processes (default: the CPUs available, here %(default)s)")
    fineweb.add_argument("--stream", action="store_true",
                         help="stream the download instead of keeping a local copy in the Hugging Face cache; "
                              "uses no disk for the raw data, but resuming re-reads the skipped documents")
    fineweb.add_argument("--stop-after-shards", type=positive_int, metavar="N",
                         help="testing aid: stop once N shards are written in this run (shard 0 is written "
                              "together with shard 1), exactly as an interrupt would, so that resuming can be "
                              "tested")
    fineweb.set_defaults(run=prepare_fineweb)

    text = commands.add_parser(
        "text", parents=[tokenizer_files], help="one text file -> <name>_val.bin and <name>_train.bin (llm.c style)",
        description="Tokenize one text file the way llm.c prepared tiny shakespeare: split on \"\\n\\n\", EOT "
                    "before each part, each part but the last followed by \"\\n\\n\"; the first --val-tokens "
                    "tokens go to <out>/<name>_val.bin, the rest to <out>/<name>_train.bin. The whole file is "
                    "held in memory: for large corpora use `fineweb --input`.")
    text.add_argument("file", type=Path, metavar="FILE", help="UTF-8 text file")
    text.add_argument("--out", type=Path, metavar="DIR",
                      help="output directory (default: data/<name> in the repository)")
    text.add_argument("--name", help="file name prefix of the shards (default: FILE's name without suffix)")
    text.add_argument("--val-tokens", type=positive_int, default=32768, metavar="TOKENS",
                      help="tokens for the validation shard (default: %(default)s)")
    text.set_defaults(run=prepare_text)

    train_tokenizer = commands.add_parser(
        "train-tokenizer", parents=[document_source], help="train the paper's BPE (rustbpe) and save it",
        description="Train a byte-level BPE the way the paper's code does (rustbpe, nanochat's split pattern) "
                    "on the first --max-chars characters of FineWeb-Edu, streamed from Hugging Face, or of a "
                    "local --input file, and save it (the format is in prepare.py -h). The vocab counts one "
                    "special token, <|endoftext|>, whose id is the last. Write shards with it with "
                    "`fineweb --tokenizer PATH` or `text --tokenizer PATH`.")
    train_tokenizer.add_argument("path", type=Path, nargs="?", metavar="PATH",
                                 help="where to save it (default: data/bpe<vocab size>.tokenizer in the repository)")
    train_tokenizer.add_argument("--vocab-size", type=vocab_size, default=BPE_VOCAB_SIZE, metavar="N",
                                 help="token ids, the end-of-text one included, at most 65,536 (uint16 shards) "
                                      "(default: %(default)s, the paper's)")
    train_tokenizer.add_argument("--max-chars", type=positive_int, default=BPE_MAX_CHARS, metavar="N",
                                 help="train on the first N characters of the text (default: %(default)s, as the "
                                      "paper's code)")
    train_tokenizer.set_defaults(run=prepare_train_tokenizer)

    tokenizer = commands.add_parser(
        "tokenizer", parents=[tokenizer_files], help="only the id-to-bytes table the trainer uses to print samples",
        description=f"Write the id-to-bytes table: GPT-2's (llm.c's {GPT2_TABLE_NAME} format), or with --tokenizer "
                    f"that of a trained tokenizer (version 2, to go beside its shards as {BPE_TABLE_NAME}).")
    tokenizer.add_argument("path", type=Path, nargs="?", metavar="PATH",
                           help=f"where to write it (default: data/{GPT2_TABLE_NAME}, or data/{BPE_TABLE_NAME} with "
                                f"--tokenizer, in the repository)")
    tokenizer.set_defaults(run=prepare_tokenizer)

    return parser.parse_args(argv)


def stop_on_sigterm(signum, frame):
    raise Interrupted("terminated (SIGTERM)")


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        args.run(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt) as e:
        reason = str(e) if isinstance(e, Interrupted) else "interrupted (Ctrl-C)"
        if args.command == "train-tokenizer":
            print(f"{reason}; nothing was saved", file=sys.stderr)
        else:
            print(f"{reason}; finished files are kept, run the same command again to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
