"""test/test_plot_routing.py: dev/plot_routing.py, the routing pictures (Figures 4a and 5), run as a user runs it.

Writes routes files in train_et's format with routing the test chooses (3
MoE layers at 16 experts and 11 at 64, with and without per-token domains,
a few hundred tokens each), and a byte-level tokenizer table, so that
multi-byte characters are split across tokens. Checks that the PNGs and the
HTML are written and of sane size; that the HTML has one span per token,
with the token's experts per layer and total fanout in its tooltip, and the
text (split characters whole, markup escaped) in its spans; that
routes_summary.json's per-token fanout, per-layer mean fanout and
per-domain expert shares equal those computed here from the routing
written; that files of different models get no Figure 5; and that a bad
file (wrong magic or version, truncated, ids outside the vocab, another
tokenizer) stops the script with one error line naming the file. The
picture tests skip without matplotlib.
"""
import atexit
import html
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

from harness import REPO, Skip, main, png_size

SCRIPT = os.path.join(REPO, "dev", "plot_routing.py")
WORK = tempfile.mkdtemp(prefix="train_et_routing_")
atexit.register(shutil.rmtree, WORK, ignore_errors=True)
EOT = 256  # the byte-level tokenizer's end-of-text id: ids 0-255 are the bytes
SYNTHETIC_DOMAINS = ["steady", "syntax", "lexicon", "branching", "noise"]
TEXT = ("Routing <b>&</b> fan-out: the café's crème brûlée \u2603 costs 5$ \U0001F600!\n"
        "Hard tokens should get more experts, easy ones fewer.\n\n\tIndented line.")


def plot_routing(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=WORK, timeout=120)


def need(module):
    if importlib.util.find_spec(module) is None:
        raise Skip(f"{module} is not installed", "pip install -r dev/requirements.txt")


# -----------------------------------------------------------------------------
# Files in train_et's formats


def routes_file(name, tokens, routing, layers, experts, domains=None, vocab=EOT + 1, step=500, router=2, top_k=1,
                magic=20261204, version=1):
    """Writes a routes file. routing[l][t]: the experts token t went to in MoE
    layer l; domains: (names, index per token) or None."""
    names, index = domains or ([], None)
    header = [magic, version, len(tokens), len(layers), experts, len(names), vocab, step, router, top_k]
    data = struct.pack("<256i", *header, *[0] * (256 - len(header)))
    data += b"".join(n.encode().ljust(32, b"\0") for n in names)
    data += struct.pack(f"<{len(tokens)}i", *tokens)
    if index is not None:
        data += struct.pack(f"<{len(index)}i", *index)
    data += struct.pack(f"<{len(layers)}i", *layers)
    for layer in routing:
        for chosen in layer:
            data += bytes(1 if e in chosen else 0 for e in range(experts))
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def byte_tokenizer():
    """A version 2 table: ids 0-255 the single bytes, 256 the end-of-text."""
    path = os.path.join(WORK, "bytes_tokenizer.bin")
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240328, 2, EOT + 1, EOT, *[0] * 252))
        f.write(b"".join(bytes([1, b]) for b in range(256)) + bytes([13]) + b"<|endoftext|>")
    return path


def choose_routing(n_tokens, n_layers, experts, seed, domains=None):
    """Known routing: 0 to 3 experts a token and layer (about 1.5), from a
    domain's own block of experts where there are domains."""
    rng = random.Random(seed)
    routing = []
    for _ in range(n_layers):
        layer = []
        for t in range(n_tokens):
            d = domains[t] if domains else -1
            pool = range(experts) if d < 0 else [(d * experts // 5 + j) % experts for j in range(experts // 2)]
            layer.append(sorted(rng.sample(list(pool), rng.choice([0, 1, 1, 2, 2, 3]))))
        routing.append(layer)
    return routing


def fanouts(routing):
    return [sum(len(layer[t]) for layer in routing) for t in range(len(routing[0]))]


def shares(routing, members, experts):
    """[layer][expert]: the share of the member tokens routed to the expert."""
    return [[sum(e in layer[t] for t in members) / len(members) for e in range(experts)] for layer in routing]


# -----------------------------------------------------------------------------
# Reading what the script wrote


def check_png(path, max_width=2400):
    width, height, size = png_size(path)
    assert 600 <= width <= max_width and 200 <= height <= 8000, f"{path}: {width} x {height} pixels"
    assert size > 20_000, f"{path}: {size} bytes, too small for a picture"


def html_tokens(path):
    """[(tooltip, text)] of the token spans of a fanout page, unescaped."""
    with open(path, encoding="utf-8") as f:
        page = f.read()
    body = re.search(r'<div class="text">(.*)</div>', page, re.S)
    assert body, f"{path}: no text div"
    spans = re.findall(r'<span style="[^"]*" title="([^"]*)">([^<]*)</span>', body.group(1))
    assert len(spans) == body.group(1).count("<span"), f"{path}: a span of another form"
    return [(html.unescape(title), html.unescape(text)) for title, text in spans]


def check_tooltips(path, routing, layers, tokens):
    spans = html_tokens(path)
    assert len(spans) == len(tokens), f"{path}: {len(spans)} spans for {len(tokens)} tokens"
    for t, ((title, _), total) in enumerate(zip(spans, fanouts(routing))):
        lines = title.split("\n")
        assert lines[0].startswith(f"token {t}: id {tokens[t]}"), f"token {t}: tooltip {title!r}"
        for line, layer, chosen in zip(lines[1:], layers, (layer[t] for layer in routing)):
            want = f"layer {layer}: {len(chosen)}" + (f" (experts {', '.join(map(str, chosen))})" if chosen else "")
            assert line == want, f"token {t}: {line!r}, want {want!r}"
        assert lines[-1] == f"total fanout {total}", f"token {t}: {lines[-1]!r}, want total {total}"
    return spans


def read_summary(out):
    with open(os.path.join(out, "routes_summary.json")) as f:
        return json.load(f)


def check_text_summary(entry, routing):
    total = fanouts(routing)
    assert entry["fanout"] == total, f"{entry['label']}: per-token fanout {entry['fanout'][:8]}... != {total[:8]}..."
    per_layer = [sum(len(chosen) for chosen in layer) / len(total) for layer in routing]
    assert entry["layer_fanout_mean"] == per_layer, f"{entry['label']}: {entry['layer_fanout_mean']} != {per_layer}"
    assert entry["fanout_mean"] == sum(total) / len(total)


def check_domain(entry, name, routing, members, experts):
    assert entry["name"] == name and entry["n_tokens"] == len(members), f"{entry['name']}: {entry['n_tokens']} tokens"
    assert entry["fraction"] == shares(routing, members, experts), f"{name}: the expert shares differ"


def run_ok(*args):
    r = plot_routing(*args)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return r


# -----------------------------------------------------------------------------


def test_text_with_a_tokenizer_16_experts():
    """Figure 4a of a text at 16 experts, shown as text: split characters whole,
    markup escaped, newlines kept; one heatmap row, the text's label."""
    need("matplotlib")
    tokens = [EOT] + list(TEXT.encode())
    layers, experts = [1, 2, 3], 16
    routing = choose_routing(len(tokens), len(layers), experts, seed=1)
    path = routes_file("prose.routes", tokens, routing, layers, experts)
    out = os.path.join(WORK, "prose")
    r = run_ok(path, "--tokenizer", byte_tokenizer(), "-o", out)
    assert r.stdout.startswith(f"prose: {len(tokens)} tokens, 3 MoE layers (1-3) x 16 experts, et K=1, step 500 |"), \
        r.stdout
    files = ["prose_fanout.png", "prose_fanout.html", "experts_by_domain.png", "routes_summary.json"]
    assert sorted(os.listdir(out)) == sorted(files), os.listdir(out)
    assert r.stdout.splitlines()[-4:] == [f"wrote {os.path.join(out, f)}" for f in files], r.stdout
    check_png(os.path.join(out, "prose_fanout.png"))
    check_png(os.path.join(out, "experts_by_domain.png"))
    spans = check_tooltips(os.path.join(out, "prose_fanout.html"), routing, layers, tokens)
    shown = "".join(text for _, text in spans)
    assert shown == "<|endoftext|>" + TEXT.replace("\n", "\u21b5\n").expandtabs(4), f"the page shows {shown!r}"
    e_acute = TEXT.encode().index("é".encode()) + 1  # é's two bytes: its first token shows nothing, its second é
    assert [text for _, text in spans[e_acute:e_acute + 2]] == ["", "é"], spans[e_acute:e_acute + 2]
    summary = read_summary(out)
    check_text_summary(summary["texts"][0], routing)
    (domain,) = summary["domains"]["by_domain"]
    check_domain(domain, "prose", routing, range(len(tokens)), experts)


def test_synthetic_domains_64_experts():
    """Figure 5 from one file with per-token domains, at 64 experts and d12's 11
    MoE layers: the end-of-text tokens count in no domain, an absent domain
    gets no row, tokens show as ids."""
    need("matplotlib")
    rng = random.Random(2)
    domains, tokens = [], []
    while len(domains) < 400:  # documents of 10 to 40 tokens, each after an end-of-text, none of "noise"
        d = rng.randrange(4)
        domains += [-1] + [d] * rng.randrange(10, 40)
    tokens = [8191 if d < 0 else 1000 * d + rng.randrange(1000) for d in domains]
    layers, experts = list(range(1, 12)), 64
    routing = choose_routing(len(tokens), len(layers), experts, seed=3, domains=domains)
    path = routes_file("synthetic.bin", tokens, routing, layers, experts, (SYNTHETIC_DOMAINS, domains), vocab=8192,
                       step=20, router=1, top_k=2)
    out = os.path.join(WORK, "synthetic")
    r = run_ok(f"synth={path}", "-o", out)
    assert r.stdout.splitlines()[1] == "domains: " + ", ".join(
        f"{SYNTHETIC_DOMAINS[d]} ({domains.count(d)} tokens)" for d in range(4)), r.stdout
    check_png(os.path.join(out, "synth_fanout.png"))
    check_png(os.path.join(out, "experts_by_domain.png"))
    spans = check_tooltips(os.path.join(out, "synth_fanout.html"), routing, layers, tokens)
    assert spans[0][0].startswith("token 0: id 8191, domain none") and spans[0][1] == "8191 ", spans[0]
    assert spans[1][0].startswith(f"token 1: id {tokens[1]}, domain {SYNTHETIC_DOMAINS[domains[1]]}"), spans[1]
    summary = read_summary(out)
    check_text_summary(summary["texts"][0], routing)
    assert summary["domains"]["layers"] == layers
    by_domain = summary["domains"]["by_domain"]
    assert len(by_domain) == 4, [d["name"] for d in by_domain]
    for d, entry in enumerate(by_domain):
        check_domain(entry, SYNTHETIC_DOMAINS[d], routing, [t for t, x in enumerate(domains) if x == d], experts)


def test_texts_of_several_domains():
    """Figure 5 from three files labelled with their domains (LABEL=PATH); a
    long text's PNG shows its first --png-tokens tokens, its page all."""
    need("matplotlib")
    layers, experts, args, routings = [1, 2, 3], 16, [], {}
    for i, label in enumerate(["code", "prose", "math"]):
        n = 300 + 100 * i
        tokens = [random.Random(i).randrange(256) for _ in range(n)]
        routings[label] = choose_routing(n, len(layers), experts, seed=10 + i, domains=[i] * n)
        args.append(f"{label}=" + routes_file(f"text{i}.bin", tokens, routings[label], layers, experts))
    out = os.path.join(WORK, "several")
    run_ok(*args, "-o", out, "--png-tokens", "150")
    summary = read_summary(out)
    for entry, (label, routing) in zip(summary["domains"]["by_domain"], routings.items()):
        check_domain(entry, label, routing, range(len(routing[0])), experts)
    for entry, routing in zip(summary["texts"], routings.values()):
        check_text_summary(entry, routing)
    assert len(html_tokens(os.path.join(out, "math_fanout.html"))) == 500
    for label in routings:
        check_png(os.path.join(out, f"{label}_fanout.png"))


def test_files_of_different_models():
    """An ET text and a TC one (every token 1 expert a layer): both get Figure
    4a, on one colour scale; no Figure 5, and a line says why."""
    need("matplotlib")
    tokens = list(range(200))
    et = routes_file("et.bin", tokens, choose_routing(200, 3, 16, seed=4), [1, 2, 3], 16)
    tc = routes_file("tc.bin", tokens, [[[t % 16] for t in tokens]] * 3, [1, 2, 3], 16, router=0)
    out = os.path.join(WORK, "two_models")
    r = run_ok(et, tc, "-o", out)
    assert "tc: 200 tokens, 3 MoE layers (1-3) x 16 experts, tc K=1, step 500 | fanout mean 3.000 " \
           "(per layer 1.00 1.00 1.00), min 3, max 3" in r.stdout, r.stdout
    assert "no experts_by_domain.png: the files were routed by different models (router differ)" in r.stdout, r.stdout
    assert sorted(os.listdir(out)) == ["et_fanout.html", "et_fanout.png", "routes_summary.json", "tc_fanout.html",
                                       "tc_fanout.png"], os.listdir(out)
    assert read_summary(out)["domains"] is None


def assert_one_error(r, want):
    assert r.returncode == 1, f"exit {r.returncode}"
    assert r.stdout == "", f"printed {r.stdout!r}"
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: " + want), f"stderr {r.stderr!r}, want {want!r}"


def test_bad_files():
    need("numpy")
    tokens, routing = [1, 2, 3], choose_routing(3, 2, 4, seed=5)
    good = routes_file("good.bin", tokens, routing, [1, 2], 4)
    bad = routes_file("magic.bin", tokens, routing, [1, 2], 4, magic=20240328)
    assert_one_error(plot_routing(bad), f"{bad}: bad magic 20240328 (expected 20261204): not a routes file")
    bad = routes_file("version.bin", tokens, routing, [1, 2], 4, version=2)
    assert_one_error(plot_routing(bad), f"{bad}: unsupported version 2 (expected 1)")
    with open(good, "rb") as f:
        data = f.read()
    bad = os.path.join(WORK, "truncated.bin")
    with open(bad, "wb") as f:
        f.write(data[:-5])
    need_bytes = len(data)
    assert_one_error(plot_routing(good, bad), f"{bad}: truncated: {need_bytes - 5} bytes, but the header's 3 tokens, "
                                              f"2 MoE layers, 4 experts and 0 domains need {need_bytes}")
    with open(bad, "wb") as f:
        f.write(data[:1000])
    assert_one_error(plot_routing(bad), f"{bad}: 1000 bytes, too short for the 1024-byte routes header")
    bad = routes_file("ids.bin", [1, 2, 300], routing, [1, 2], 4)
    assert_one_error(plot_routing(bad), f"{bad}: token 2 has id 300, outside the vocab [0, 257)")
    bad = routes_file("router.bin", tokens, routing, [1, 2], 4, router=3)
    assert_one_error(plot_routing(bad), f"{bad}: header field 8 (router) is 3, not 0 (tc), 1 (ec) or 2 (et)")
    missing = os.path.join(WORK, "missing.bin")
    assert_one_error(plot_routing(missing), f"{missing}: cannot read: No such file or directory")
    other = routes_file("vocab.bin", tokens, routing, [1, 2], 4, vocab=50257)
    tokenizer = byte_tokenizer()
    assert_one_error(plot_routing(other, "--tokenizer", tokenizer),
                     f"{tokenizer}: a table of 257 tokens, but {other} was routed by a model of vocab 50257: not its "
                     f"tokenizer")
    assert_one_error(plot_routing(good, "--tokenizer", good), f"{good}: bad magic 20261204 (expected 20240328): not "
                                                              f"a tokenizer table")
    assert_one_error(plot_routing(f"a={good}", f"a={other}"),
                     f"{other}: its label 'a' names the same files as {good}'s: give the files other labels")


def test_help_describes_every_option():
    need("numpy")
    r = plot_routing("-h")
    assert r.returncode == 0, r.stderr
    for option in ["[LABEL=]ROUTES", "--tokenizer FILE", "-o OUTDIR, --out OUTDIR", "--png-tokens N", "--dpi DPI"]:
        assert option in r.stdout, f"-h does not list {option}"
    r = plot_routing("x", "--png-tokens", "0")
    assert r.returncode == 2 and "--png-tokens: 0 is not >= 1" in r.stderr, r.stderr


if __name__ == "__main__":
    main(globals())
