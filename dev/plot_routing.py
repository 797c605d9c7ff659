#!/usr/bin/env python3
"""dev/plot_routing.py: pictures of how an MoE model routed a text, drawn from the routes files train_et writes.

A routes file holds, for one text, the experts each token was routed to in
each MoE layer (format below). The training logs say how many experts a
step's tokens used on average; these pictures say which tokens used them and
where they went, which is what the paper argues with (SPEC: Observability):
does ET spend its compute on the tokens that are hard to predict, and do the
experts specialise by domain? From one or more routes files this writes to
the output folder (-o):

    <label>_fanout.png   the paper's Figure 4a: the text with each token's box coloured by
                         its total fanout (its routed experts summed over the MoE layers;
                         the shared expert not counted), in wrapped lines, on a sequential
                         colour scale shared by all the files
    <label>_fanout.html  the same as a web page, one span per token, all the tokens: hover a
                         token for its id, its experts in each layer and its total
    experts_by_domain.png
                         the paper's Figure 5: per MoE layer, the share of each domain's
                         tokens that each expert takes (a row sums to the domain's mean
                         fanout in that layer), one heatmap a layer on one colour scale
    routes_summary.json  the numbers the pictures show: each token's total fanout, each
                         layer's mean fanout, each domain's token count and expert shares

The domains of Figure 5: a file with per-token domains (the synthetic corpus)
contributes its tokens under their domain names (the end-of-text token has
none and counts nowhere), a file without under its label; so give one
synthetic text, or several texts of different domains as LABEL=PATH. Figure 5
pools the files' tokens, so it is drawn only when one model routed them all
(same layers, experts, router, K and step). One summary line per file goes to
stdout.

The routes file, as train_et writes it (little-endian): a 256 x int32 header
[magic 20261204, version 1, tokens T, MoE layers L, experts E, domains D,
vocab size, training step, router (0 tc, 1 ec, 2 et), K, 0...]; D x char[32]
domain names (UTF-8, NUL-padded); T x int32 token ids; if D > 0, T x int32
domain indices (-1: none); L x int32 the model layer of each MoE layer; then
L x T x E uint8, 1 where the token was routed to the expert in that layer.

Tokens are shown as text with --tokenizer (the id-to-bytes table of
data/tokenizer.h), else as ids. Tokens are byte strings: a character split
across tokens is shown in the token that completes it, the tokens before it
as empty slivers that keep their colour and tooltip.

    python3 dev/plot_routing.py routes.bin --tokenizer data/edu_fineweb10B/gpt2_tokenizer.bin
    python3 dev/plot_routing.py code=r_code.bin prose=r_prose.bin math=r_math.bin -o figs --tokenizer tok.bin

Needs numpy and matplotlib (pip install -r dev/requirements.txt). The files
are read and checked before matplotlib is imported.
"""
import argparse
import codecs
import html
import json
import os
import re
import struct
import sys
import unicodedata
import warnings

import numpy as np

from plot_runs import expert_ticks, make_output_dir, positive_int  # the heatmaps label experts as plot_runs' usage heatmap does

ROUTES_MAGIC, ROUTES_VERSION = 20261204, 1
TOKENIZER_MAGIC = 20240328
HEADER_BYTES = 256 * 4
DOMAIN_NAME_BYTES = 32
ROUTERS = {0: "tc", 1: "ec", 2: "et"}

COLUMNS = 100  # Figure 4a's PNG wraps its lines at this many character cells
FONT_PT = 9  # its monospace font; a cell is 0.6 em wide, a line 1.75 em high
CELL_W, LINE_H = 0.602 * FONT_PT / 72, 1.75 * FONT_PT / 72  # inches
EMPTY_CELLS = 0.4  # the width of a token that shows no character (the first bytes of a split one)
FANOUT_CMAP = "YlOrRd"  # light for few experts, so the text on the boxes stays readable
NEWLINE = "\u21b5"  # a newline is shown as this, then breaks the line

plt = mpl = None  # imported by load_plotting(), once the files have been read


class RoutesError(Exception):
    """A file that cannot be used. The message is the whole error line, naming the file."""


# -----------------------------------------------------------------------------
# Reading the files


class Text:
    """One routes file: its header's fields, its tokens and their routing."""

    def __init__(self, path, label, header, domain_names, tokens, domains, layers, routing):
        self.path, self.label = path, label
        self.n_tokens, self.n_layers, self.n_experts = header[2], header[3], header[4]
        self.vocab, self.step, self.router, self.top_k = header[6], header[7], ROUTERS[header[8]], header[9]
        self.domain_names = domain_names  # [] when the file has no per-token domains
        self.tokens = tokens  # [T] ids
        self.domains = domains  # [T] indices into domain_names, -1 for none; None without domain names
        self.layers = layers  # the model layer of each MoE layer
        self.routing = routing  # [L, T, E] uint8
        self.layer_fanout = routing.sum(axis=2, dtype=np.int64)  # [L, T]: experts per token in each layer
        self.fanout = self.layer_fanout.sum(axis=0)  # [T]: over all MoE layers
        self.shown = None  # each token as text, set by show_tokens()

    def model(self):
        """What must match for two files to come from one model."""
        return (tuple(self.layers), self.n_experts, self.router, self.top_k, self.step, self.vocab)

    def describe(self):
        first, last = self.layers[0], self.layers[-1]
        return (f"{self.n_layers} MoE layers ({first}-{last}) x {self.n_experts} experts, "
                f"{self.router} K={self.top_k}, step {self.step}")


def read_ints(data, offset, count):
    """count int32 at offset; the file's length was checked, so they are there."""
    return np.frombuffer(data, dtype="<i4", count=count, offset=offset).astype(np.int64), offset + 4 * count


def check_header(h, size):
    """Returns what is wrong with the header and the file's length, or None."""
    if h[0] != ROUTES_MAGIC:
        return f"bad magic {h[0]} (expected {ROUTES_MAGIC}): not a routes file"
    if h[1] != ROUTES_VERSION:
        return f"unsupported version {h[1]} (expected {ROUTES_VERSION})"
    for i, name, low in [(2, "tokens", 1), (3, "MoE layers", 1), (4, "experts", 1), (5, "domains", 0),
                         (6, "vocab size", 1), (7, "step", 0), (9, "K", 1)]:
        if h[i] < low:
            return f"header field {i} ({name}) is {h[i]}, not >= {low}"
    if h[8] not in ROUTERS:
        return f"header field 8 (router) is {h[8]}, not 0 (tc), 1 (ec) or 2 (et)"
    T, L, E, D = h[2], h[3], h[4], h[5]
    need = HEADER_BYTES + DOMAIN_NAME_BYTES * D + 4 * T * (2 if D else 1) + 4 * L + L * T * E
    if size != need:
        return (f"{'truncated: ' if size < need else ''}{size} bytes, but the header's {T} tokens, {L} MoE layers, "
                f"{E} experts and {D} domains need {need}")
    return None


def read_headed_file(path, kind):
    """The bytes of a file that starts with a 256 x int32 header, at least that long."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RoutesError(f"{path}: cannot read: {e.strerror}") from None
    if len(data) < HEADER_BYTES:
        raise RoutesError(f"{path}: {len(data)} bytes, too short for the {HEADER_BYTES}-byte {kind} header")
    return data


def read_routes(path, label):
    data = read_headed_file(path, "routes")
    header = struct.unpack_from("<256i", data)
    problem = check_header(header, len(data))
    if problem:
        raise RoutesError(f"{path}: {problem}")
    T, L, E, D = header[2], header[3], header[4], header[5]
    offset = HEADER_BYTES
    names = []
    for d in range(D):
        raw = data[offset:offset + DOMAIN_NAME_BYTES].split(b"\0", 1)[0]
        names.append(raw.decode("utf-8", "replace") or f"domain {d}")
        offset += DOMAIN_NAME_BYTES
    tokens, offset = read_ints(data, offset, T)
    domains = None
    if D:
        domains, offset = read_ints(data, offset, T)
    layers, offset = read_ints(data, offset, L)
    routing = np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(L, T, E)

    bad = (tokens < 0) | (tokens >= header[6])
    if bad.any():
        i = int(bad.argmax())  # the first
        raise RoutesError(f"{path}: token {i} has id {tokens[i]}, outside the vocab [0, {header[6]})")
    if domains is not None:
        bad = (domains < -1) | (domains >= D)
        if bad.any():
            i = int(bad.argmax())
            raise RoutesError(f"{path}: token {i} has domain {domains[i]}, not -1 or one of the {D} domains")
    if layers[0] < 0 or (np.diff(layers) <= 0).any():
        raise RoutesError(f"{path}: the MoE layers {layers.tolist()} are not increasing layer numbers >= 0")
    if routing.max() > 1:
        l, t, e = np.unravel_index(int(routing.argmax()), routing.shape)
        raise RoutesError(f"{path}: routing of token {t} to expert {e} in MoE layer {l} is {routing[l, t, e]}, "
                          f"not 0 or 1")
    return Text(path, label, header, names, tokens, domains, layers.tolist(), routing)


def read_tokenizer(path):
    """The id-to-bytes table of data/tokenizer.h: a list of byte strings."""
    data = read_headed_file(path, "tokenizer")
    magic, version, vocab = struct.unpack_from("<3i", data)
    if magic != TOKENIZER_MAGIC:
        raise RoutesError(f"{path}: bad magic {magic} (expected {TOKENIZER_MAGIC}): not a tokenizer table")
    if version not in (1, 2):
        raise RoutesError(f"{path}: unsupported version {version} (expected 1 or 2)")
    table, offset = [], HEADER_BYTES
    for i in range(vocab):
        if offset >= len(data) or offset + 1 + data[offset] > len(data):
            raise RoutesError(f"{path}: truncated at token {i} of {vocab}")
        n = data[offset]
        table.append(data[offset + 1:offset + 1 + n])
        offset += 1 + n
    return table


def show_tokens(text, table, tokenizer_path):
    """Each token as text. The bytes are decoded as one stream, so a character
    split across tokens is shown whole, in the token that completes it."""
    if table is None:
        text.shown = [f"{t} " for t in text.tokens.tolist()]  # ids, a space apart so that lines can wrap
        return
    if len(table) != text.vocab:
        raise RoutesError(f"{tokenizer_path}: a table of {len(table)} tokens, but {text.path} was routed by a model "
                          f"of vocab {text.vocab}: not its tokenizer")
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    text.shown = [decoder.decode(table[t]) for t in text.tokens.tolist()]
    text.shown[-1] += decoder.decode(b"", final=True)  # a character cut off at the end: U+FFFD


def split_arg(arg):
    """'PATH' or 'LABEL=PATH' -> (path, label). A path that exists as given is
    taken whole; without a label, the file's name less its extension."""
    if "=" in arg and not os.path.exists(arg):
        label, path = arg.split("=", 1)
        if label:
            return path, label
    return arg, os.path.splitext(os.path.basename(arg))[0] or arg


def read_texts(args, tokenizer):
    table = read_tokenizer(tokenizer) if tokenizer else None
    texts, names = [], {}
    for arg in args:
        text = read_routes(*split_arg(arg))
        show_tokens(text, table, tokenizer)
        text.name = re.sub(r"[^A-Za-z0-9._+-]+", "_", text.label).strip("_") or "text"  # labels name files
        if text.name in names:
            raise RoutesError(f"{text.path}: its label '{text.label}' names the same files as {names[text.name]}'s: "
                              f"give the files other labels (LABEL=PATH)")
        names[text.name] = text.path
        texts.append(text)
    return texts


# -----------------------------------------------------------------------------
# The numbers


class Domains:
    """Figure 5's numbers: per domain its tokens, and per MoE layer and expert
    how many of them the expert took."""

    def __init__(self, texts):
        self.names, self.tokens, counts = [], [], []
        for text in texts:
            if text.domains is None:
                groups = [(text.label, np.ones(text.n_tokens, dtype=bool))]
            else:
                groups = [(name, text.domains == d) for d, name in enumerate(text.domain_names)]
            for name, mask in groups:
                if name not in self.names:
                    self.names.append(name)
                    self.tokens.append(0)
                    counts.append(np.zeros((text.n_layers, text.n_experts), dtype=np.int64))
                d = self.names.index(name)
                self.tokens[d] += int(mask.sum())
                counts[d] += text.routing[:, mask, :].sum(axis=1, dtype=np.int64)
        kept = [d for d, n in enumerate(self.tokens) if n > 0]  # a domain absent from the texts has no shares
        self.names = [self.names[d] for d in kept]
        self.tokens = [self.tokens[d] for d in kept]
        # [L, D, E]: the share of each domain's tokens that each expert takes
        self.fraction = np.stack([counts[d] / self.tokens[i] for i, d in enumerate(kept)], axis=1) if kept else None


def common_model(texts):
    """(the first file, None) when one model routed all the files (its header's
    fields describe that model), else (None, why they cannot be pooled)."""
    models = {text.model() for text in texts}
    if len(models) == 1:
        return texts[0], None
    differ = [what for i, what in enumerate(["MoE layers", "experts", "router", "K", "step", "vocab"])
              if len({m[i] for m in models}) > 1]
    return None, f"the files were routed by different models ({', '.join(differ)} differ)"


def summary_json(texts, domains, model):
    def text_entry(text):
        return {"label": text.label, "file": text.path, "router": text.router, "top_k": text.top_k,
                "step": text.step, "layers": text.layers, "n_experts": text.n_experts, "n_tokens": text.n_tokens,
                "fanout": text.fanout.tolist(), "fanout_mean": float(text.fanout.mean()),
                "layer_fanout_mean": text.layer_fanout.mean(axis=1).tolist()}

    out = {"texts": [text_entry(text) for text in texts], "domains": None}
    if domains is not None:
        out["domains"] = {
            "layers": model.layers,
            "what": "fraction[layer][expert]: the share of the domain's tokens routed to the expert in that MoE layer",
            "by_domain": [{"name": name, "n_tokens": n, "fraction": domains.fraction[:, d, :].tolist()}
                          for d, (name, n) in enumerate(zip(domains.names, domains.tokens))]}
    return out


def summary(text):
    per_layer = " ".join(f"{m:.2f}" for m in text.layer_fanout.mean(axis=1))
    return (f"{text.label}: {text.n_tokens} tokens, {text.describe()} | fanout mean {text.fanout.mean():.3f} "
            f"(per layer {per_layer}), min {text.fanout.min()}, max {text.fanout.max()}")


# -----------------------------------------------------------------------------
# Figure 4a: tokens coloured by fanout


def load_plotting():
    global plt, mpl
    import matplotlib as mpl

    mpl.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # and with it mpl.colors and mpl.collections


def fanout_colors(texts):
    """One colour per whole fanout from the smallest to the largest in any of
    the files, so that the pictures of several texts compare."""
    lo = min(int(text.fanout.min()) for text in texts)
    hi = max(max(int(text.fanout.max()) for text in texts), lo + 1)  # a uniform fanout still gets a scale
    cmap = plt.get_cmap(FANOUT_CMAP).resampled(hi - lo + 1)
    norm = mpl.colors.BoundaryNorm(np.arange(lo - 0.5, hi + 1), cmap.N)
    return cmap, norm


def ink(rgba):
    """Black text on a light box, white on a dark one."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def hex_color(rgba):
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgba[:3])


def display(s):
    """A token's text as drawn: tabs expanded, a newline shown as NEWLINE before it breaks the line."""
    return s.expandtabs(4).replace("\r", "").replace("\n", NEWLINE + "\n")


def cells(s):
    """Character cells s takes in a monospace font: East Asian wide characters two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def layout(shown, columns):
    """Wraps the tokens into lines of `columns` cells: [(token, line, x, width, piece)].
    A newline breaks the line; a token wider than what is left of a line
    starts a new one, and one wider than a line is split. A token that shows
    nothing gets a sliver EMPTY_CELLS wide."""
    boxes, line, x = [], 0, 0.0
    for i, s in enumerate(shown):
        for j, part in enumerate(display(s).split("\n")):
            if j:
                line, x = line + 1, 0.0
                if not part:
                    continue  # the text after the token's last newline
            if x + cells(part) > columns and x > 0:
                line, x = line + 1, 0.0
            while cells(part) > columns:  # longer than a line: a line's worth at a time
                k = 0
                while cells(part[:k + 1]) <= columns:
                    k += 1
                boxes.append((i, line, x, cells(part[:k]), part[:k]))
                part, line, x = part[k:], line + 1, 0.0
            boxes.append((i, line, x, cells(part) or EMPTY_CELLS, part))
            x += boxes[-1][3]
    return boxes


def save(fig, out_dir, name, dpi):
    path = os.path.join(out_dir, name)
    with warnings.catch_warnings():  # a character the font lacks is drawn as a box: no need to say so per glyph
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_fanout(text, cmap, norm, out_dir, dpi, max_tokens):
    """Figure 4a as a PNG: the first max_tokens tokens in wrapped lines of boxes."""
    n = min(text.n_tokens, max_tokens)
    boxes = layout(text.shown[:n], COLUMNS)
    lines = boxes[-1][1] + 1
    text_w, text_h = COLUMNS * CELL_W, lines * LINE_H
    left, right, top, bottom = 0.3, 1.3, 0.75, 0.3  # inches around the text; the colour bar on the right
    fig = plt.figure(figsize=(left + text_w + right, top + text_h + bottom))
    W, H = fig.get_size_inches()
    ax = fig.add_axes((left / W, bottom / H, text_w / W, text_h / H))  # one unit: a character cell by a line
    ax.set_xlim(0, COLUMNS)
    ax.set_ylim(lines, 0)
    ax.axis("off")
    colors = cmap(norm(text.fanout[:n]))
    rects = [plt.Rectangle((x + 0.05, line + 0.08), w - 0.1, 0.84) for _, line, x, w, _ in boxes]
    ax.add_collection(mpl.collections.PatchCollection(
        rects, facecolors=[colors[i] for i, *_ in boxes], edgecolors="none"))
    for i, line, x, _, piece in boxes:
        if piece.strip():
            ax.text(x, line + 0.5, piece, ha="left", va="center_baseline", family="monospace", fontsize=FONT_PT,
                    color=ink(colors[i]), parse_math=False)  # parse_math: a "$" is a dollar sign
    bar_h = min(text_h, 4.0)
    cax = fig.add_axes(((left + text_w + 0.3) / W, (bottom + text_h - bar_h) / H, 0.15 / W, bar_h / H))
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.set_label("total fanout (experts over all MoE layers)", fontsize=8)
    bar.ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True, nbins=min(cmap.N, 20)))
    bar.ax.tick_params(labelsize=8)
    shown = f"all {n} tokens" if n == text.n_tokens else f"the first {n} of {text.n_tokens} tokens (the HTML has all)"
    fig.text(left / W, 1 - 0.15 / H, f"{text.label}: each token coloured by its total fanout, the experts it was "
             f"routed to summed over the MoE layers (shared expert not counted)\n{text.describe()}; mean fanout "
             f"{text.fanout.mean():.2f}; {shown}", va="top", fontsize=9, parse_math=False)
    return save(fig, out_dir, f"{text.name}_fanout.png", dpi)


def experts_per_token(text):
    """[layer][token]: the experts the token was routed to in that layer."""
    out = []
    for l in range(text.n_layers):
        experts = np.nonzero(text.routing[l])[1].tolist()  # token-major: each token's experts in a run
        ends = np.cumsum(text.layer_fanout[l]).tolist()
        out.append([experts[a:b] for a, b in zip([0] + ends[:-1], ends)])
    return out


def tooltip(text, i, experts):
    """A token's id (and domain), its experts in each MoE layer, and its total fanout."""
    lines = [f"token {i}: id {text.tokens[i]}"]
    if text.domains is not None:
        d = text.domains[i]
        lines[0] += f", domain {text.domain_names[d] if d >= 0 else 'none'}"
    for l, layer in enumerate(text.layers):
        chosen = experts[l][i]
        lines.append(f"layer {layer}: {len(chosen)}" + (f" (experts {', '.join(map(str, chosen))})" if chosen else ""))
    lines.append(f"total fanout {text.fanout[i]}")
    return "\n".join(lines)


HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 72em; }}
.legend span {{ display: inline-block; min-width: 2.2em; text-align: center; }}
.text {{ font-family: monospace; font-size: 15px; line-height: 1.9; white-space: pre-wrap; overflow-wrap: anywhere; }}
.text span {{ border-radius: 2px; }}
.text span:empty {{ padding: 0 2px; }} /* the first bytes of a character split across tokens */
</style></head><body>
<h2>{title}</h2>
<p>{about}</p>
<p class="legend">total fanout: {legend}</p>
<div class="text">{spans}</div>
</body></html>
"""


def write_html(text, cmap, norm, out_dir):
    """Figure 4a as a web page: every token, one span each, its routing in the tooltip."""
    colors = cmap(norm(text.fanout))
    experts = experts_per_token(text)
    spans = "".join(f'<span style="background:{hex_color(colors[i])};color:{ink(colors[i])}" '
                    f'title="{html.escape(tooltip(text, i, experts))}">{html.escape(display(s))}</span>'
                    for i, s in enumerate(text.shown))
    lo, hi = int(norm.boundaries[0] + 0.5), int(norm.boundaries[-1] - 0.5)  # the fanouts the scale has colours for
    values = list(range(lo, hi + 1, max(1, (hi - lo) // 20)))  # about 20 swatches at most
    legend = " ".join(f'<span style="background:{hex_color(cmap(norm(v)))};color:{ink(cmap(norm(v)))}">{v}</span>'
                      for v in values)
    about = (f"{html.escape(text.describe())}; {text.n_tokens} tokens, mean fanout {text.fanout.mean():.2f}. Each "
             f"token is coloured by its total fanout, the experts it was routed to summed over the MoE layers (the "
             f"shared expert not counted); hover a token for its experts in each layer.")
    path = os.path.join(out_dir, f"{text.name}_fanout.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(HTML_PAGE.format(title=html.escape(f"{text.label}: fanout per token"), about=about, legend=legend,
                                 spans=spans))
    return path


# -----------------------------------------------------------------------------
# Figure 5: experts by domain


def plot_domains(domains, model, out_dir, dpi):
    """One heatmap per MoE layer, domains by experts, on one colour scale. A
    panel keeps a readable cell width at 64 experts; the panels wrap into
    columns to keep the figure about 18 inches wide."""
    L, D, E = domains.fraction.shape
    cell_w = 0.25 if E <= 16 else 0.1
    panel_w, panel_h = E * cell_w + 1.6, D * 0.3 + 1.0  # room for the domains' names and the ticks
    cols = max(1, min(L, int(18 // panel_w)))
    rows = -(-L // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel_w + 1.2, rows * panel_h + 0.8), squeeze=False,
                             layout="constrained")
    vmax = float(domains.fraction.max()) or 1.0
    names = [f"{name} ({n})" for name, n in zip(domains.names, domains.tokens)]
    ticks = expert_ticks(E)
    for l, layer in enumerate(model.layers):
        ax = axes.flat[l]
        im = ax.imshow(domains.fraction[l], aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_xticks(ticks, [str(e) for e in ticks], fontsize=7)
        ax.set_yticks(range(D), names if l % cols == 0 else [], fontsize=8)
        ax.set_title(f"layer {layer}", fontsize=9)
        if l + cols >= L:
            ax.set_xlabel("expert", fontsize=8)
        if E <= 16 and D <= 8:  # room to print the shares in the cells
            for d in range(D):
                for e in range(E):
                    v = domains.fraction[l, d, e]
                    ax.text(e, d, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 * vmax else "white")
    for ax in axes.flat[L:]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes, label="share of the domain's tokens", shrink=min(1.0, 6 / (rows * panel_h)))
    fig.suptitle(f"share of each domain's tokens (token count in brackets) routed to each expert, per MoE layer "
                 f"({model.router} K={model.top_k}, step {model.step}; a row sums to the domain's mean fanout in "
                 f"the layer; uniform {model.top_k / E:.3f})", fontsize=10)
    return save(fig, out_dir, "experts_by_domain.png", dpi)


# -----------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("routes", nargs="+", metavar="[LABEL=]ROUTES",
                        help="a routes file train_et wrote; LABEL names its text in the pictures and file names "
                             "(default: the file's name less its extension) and, for a file without per-token "
                             "domains, is its domain in Figure 5")
    parser.add_argument("--tokenizer", metavar="FILE",
                        help="the id-to-bytes table of the model's tokenizer (e.g. "
                             "data/edu_fineweb10B/gpt2_tokenizer.bin, or the tokenizer.bin data/prepare.py wrote) "
                             "to show tokens as text (default: as ids)")
    parser.add_argument("-o", "--out", default="plots", metavar="OUTDIR",
                        help="folder to write the pictures and routes_summary.json to, made if missing "
                             "(default: plots)")
    parser.add_argument("--png-tokens", type=positive_int, default=1200, metavar="N",
                        help="the fanout PNG shows a text's first N tokens; the HTML shows all (default: 1200)")
    parser.add_argument("--dpi", type=positive_int, default=120, help="resolution of the PNGs (default: 120)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        texts = read_texts(args.routes, args.tokenizer)
    except RoutesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    model, why_not = common_model(texts)
    domains = Domains(texts) if model else None
    if domains is not None and domains.fraction is None:
        why_not = "no token of the texts has a domain"
    for text in texts:
        print(summary(text))
    if not why_not:
        print("domains: " + ", ".join(f"{name} ({n} tokens)" for name, n in zip(domains.names, domains.tokens)))
    try:
        load_plotting()
    except ImportError as e:
        print(f"error: the pictures need matplotlib ({e}): pip install -r dev/requirements.txt", file=sys.stderr)
        return 1
    error = make_output_dir(args.out)
    if error:
        print(error, file=sys.stderr)
        return 1

    cmap, norm = fanout_colors(texts)
    written = []
    for text in texts:
        written.append(plot_fanout(text, cmap, norm, args.out, args.dpi, args.png_tokens))
        written.append(write_html(text, cmap, norm, args.out))
    if why_not:
        print(f"no experts_by_domain.png: {why_not}")
    else:
        written.append(plot_domains(domains, model, args.out, args.dpi))
    path = os.path.join(args.out, "routes_summary.json")
    with open(path, "w") as f:
        json.dump(summary_json(texts, None if why_not else domains, model), f)
    written.append(path)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
