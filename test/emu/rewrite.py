#!/usr/bin/env python3
"""test/emu/rewrite.py: train_et's CUDA sources as host C++, for the emulated device.

g++ can compile the kernels as they are (test/emu/emu.h supplies what nvcc
supplies), except for these constructs, which this rewrites:

  kernel<<<grid, block, smem, stream>>>(args)
      -> ::emu::launch("kernel", kernel, __FILE__, __LINE__, grid, block, smem, stream)(args)
  __shared__ __align__(32) float a[4][8], b;
      -> static char emu_tag_a_L; auto& a = ::emu::shared_var<float[4][8], 32>(&emu_tag_a_L, "a", __FILE__, __LINE__); ...
     (one variable per declaration and block, allocated and poisoned by the emulator)
  extern __shared__ float smem[];
      -> float* const smem = ::emu::dynamic_shared<float>();
  __global__ void __launch_bounds__(256) k(...) { ... }
      -> __global__ void k(...) { ... } [[maybe_unused]] static const bool emu_launch_bounds_k = ...;
     (the emulator refuses launches of more threads, as the GPU does)

Why a rewrite rather than macros: <<< >>> is not C++ at all, and a __shared__
variable must be one per block, not one per thread, which no macro can make
of a local declaration. Comments, strings and character literals are left
alone; every other character stays where it was, line for line, and each
output starts with #line naming the original file, so compiler messages and
__FILE__/__LINE__ point at the real source. Anything it cannot parse stops it
with the file and line, never a silent skip.

usage: rewrite.py OUT_DIR FILE...   writes OUT_DIR/FILE for each FILE (a path
relative to the repository root), only where the content changes. Give it
every source at once: a launch of a kernel template that deduces the
template's arguments (no <...> at the launch) becomes a generic lambda call,
and the template may be defined in another file.
"""
import os
import re
import sys

IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


class RewriteError(Exception):
    pass


def code_mask(text):
    """is_code[i]: text[i] is outside comments, string and character literals."""
    mask = [True] * len(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c == '"' or c == "'":
            if c == "'" and i > 0 and text[i - 1].isalnum():  # a digit separator: 1'000
                i += 1
                continue
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            mask[k] = False
        i = j
    return mask


# A kernel template, as it is defined: its launches may deduce its arguments.
TEMPLATE_KERNEL = re.compile(r"template\s*<[^;{]*?>\s*__global__\s+void\s+(?:__launch_bounds__\s*\([^()]*\)\s*)?([A-Za-z_]\w*)\s*\(")


class Source:
    def __init__(self, path, text, deduced_kernels=()):
        self.path, self.text = path, text
        self.deduced_kernels = set(deduced_kernels)
        self.code = code_mask(text)
        self.edits = []  # (start, end, replacement)

    def line_of(self, pos):
        return self.text.count("\n", 0, pos) + 1

    def fail(self, pos, what):
        raise RewriteError(f"{self.path}:{self.line_of(pos)}: rewrite.py: {what}")

    def find_code(self, needle, start=0):
        """Next occurrence of needle at a code position, or -1."""
        while True:
            i = self.text.find(needle, start)
            if i < 0 or self.code[i]:
                return i
            start = i + 1

    def find_word(self, word, start=0):
        while True:
            i = self.find_code(word, start)
            if i < 0:
                return -1
            before = self.text[i - 1] if i > 0 else " "
            after = self.text[i + len(word)] if i + len(word) < len(self.text) else " "
            if not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_"):
                return i
            start = i + 1

    def match_forward(self, pos):
        """pos at an opening (, [ or {: the index of its closing bracket."""
        opens, closes = "([{", ")]}"
        depth = 0
        for i in range(pos, len(self.text)):
            c = self.text[i]
            if not self.code[i]:
                continue
            if c in opens:
                depth += 1
            elif c in closes:
                depth -= 1
                if depth == 0:
                    return i
        self.fail(pos, f"no closing bracket for '{self.text[pos]}'")

    def skip_space(self, pos):
        while pos < len(self.text) and (self.text[pos].isspace() or not self.code[pos]):
            pos += 1
        return pos

    def check_not_directive(self, pos, what):
        line_start = self.text.rfind("\n", 0, pos) + 1
        if self.text[line_start:pos].lstrip().startswith("#"):
            self.fail(pos, f"{what} inside a preprocessor directive cannot be rewritten")

    # -- kernel<<<...>>>(...)
    def launches(self):
        pos = 0
        while (i := self.find_code("<<<", pos)) >= 0:
            self.check_not_directive(i, "a launch")
            start = self.callee_start(i)
            callee = self.text[start:i]
            end = self.find_config_end(i + 3)
            after = self.skip_space(end + 3)
            if after >= len(self.text) or self.text[after] != "(":
                self.fail(i, f"expected the kernel's arguments '(' after {callee}<<<...>>>")
            config = self.text[i + 3:end]
            if not config.strip():
                self.fail(i, "a launch needs at least <<<grid, block>>>")
            name = " ".join(callee.split())
            if name in self.deduced_kernels:
                replacement = (f'::emu::launch_deduced("{name}", [](auto&... emu_args) {{ {callee}(emu_args...); }}, '
                               f"__FILE__, __LINE__, {config})")
            else:
                replacement = f'::emu::launch("{name}", {callee}, __FILE__, __LINE__, {config})'
            self.edits.append((start, end + 3, replacement))
            pos = end + 3

    def callee_start(self, pos):
        j = pos - 1
        while j >= 0 and self.text[j] in " \t":
            j -= 1
        if j >= 0 and self.text[j] == ">":  # template arguments: back to the matching <
            depth = 0
            while j >= 0:
                c = self.text[j]
                if self.code[j] and c == ">":
                    depth += 1
                elif self.code[j] and c == "<":
                    depth -= 1
                    if depth == 0:
                        break
                j -= 1
            if j < 0:
                self.fail(pos, "no '<' matches the template arguments of the launched kernel")
            j -= 1
        end = j + 1
        while j >= 0 and (self.text[j].isalnum() or self.text[j] in "_:"):
            j -= 1
        start = j + 1
        if start == end or not IDENT.match(self.text[start:end].lstrip(":")):
            self.fail(pos, "cannot find the kernel's name before <<<")
        return start

    def find_config_end(self, pos):
        depth = 0
        for i in range(pos, len(self.text)):
            if not self.code[i]:
                continue
            c = self.text[i]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
                if depth < 0:
                    break
            elif depth == 0 and self.text.startswith(">>>", i):
                return i
            elif c == ";":
                break
        self.fail(pos, "no '>>>' closes this launch configuration")

    # -- __shared__ declarations
    def shared(self):
        pos = 0
        while (i := self.find_word("__shared__", pos)) >= 0:
            self.check_not_directive(i, "__shared__")
            semi = self.find_code(";", i)
            if semi < 0:
                self.fail(i, "no ';' ends this __shared__ declaration")
            line = self.line_of(i)
            start, body = i, self.text[i + len("__shared__"):semi]
            k = i - 1
            while k >= 0 and self.text[k].isspace():
                k -= 1
            is_extern = self.text[max(0, k - 5):k + 1] == "extern" and (k < 6 or not self.text[k - 6].isalnum())
            if is_extern:
                start = k - 5
            align = None
            m = re.search(r"__align__\s*\(([^()]*)\)", body)
            if m:
                align = m.group(1).strip()
                body = body[:m.start()] + body[m.end():]
            if "=" in body or "(" in body:
                self.fail(i, "a __shared__ declaration with an initializer or parentheses is not supported")
            newlines = "\n" * self.text.count("\n", start, semi + 1)
            if is_extern:
                decl = " ".join(body.split())
                m = re.fullmatch(r"(.+?)\s*\b([A-Za-z_]\w*)\s*\[\s*\]", decl)
                if not m:
                    self.fail(i, "expected 'extern __shared__ TYPE NAME[];'")
                type_, name = m.group(1), m.group(2)
                replacement = f"{type_}* const {name} = ::emu::dynamic_shared<{type_}>();"
            else:
                parts = [p.strip() for p in body.split(",")]
                base_type, out = None, []
                for n, part in enumerate(parts):
                    m = re.fullmatch(r"(.*?)(\**)\s*\b([A-Za-z_]\w*)\s*((?:\[[^\[\]]*\]\s*)*)", " ".join(part.split()))
                    if not m or (n == 0 and not m.group(1).strip()) or (n > 0 and m.group(1).strip()):
                        self.fail(i, f"cannot parse the __shared__ declarator '{part}'")
                    if n == 0:
                        base_type = m.group(1).strip()
                    stars, name, dims = m.group(2), m.group(3), m.group(4).replace(" ", "")
                    type_ = f"{base_type}{stars}{dims}"
                    tag = f"emu_tag_{name}_{line}"
                    args = f"{type_}, {align}" if align else type_
                    out.append(f'static char {tag}; auto& {name} = ::emu::shared_var<{args}>(&{tag}, "{name}", '
                               f"__FILE__, __LINE__);")
                replacement = " ".join(out)
            self.edits.append((start, semi + 1, replacement + newlines))
            pos = semi + 1

    # -- __launch_bounds__
    def launch_bounds(self):
        pos = 0
        while (i := self.find_word("__launch_bounds__", pos)) >= 0:
            self.check_not_directive(i, "__launch_bounds__")
            open_ = self.skip_space(i + len("__launch_bounds__"))
            if self.text[open_] != "(":
                self.fail(i, "expected '(' after __launch_bounds__")
            close = self.match_forward(open_)
            args = " ".join(self.text[open_ + 1:close].split())
            m = IDENT.match(self.text, self.skip_space(close + 1))
            if not m:
                self.fail(i, "expected the kernel's name after __launch_bounds__(...)")
            name = m.group(0)
            params = self.skip_space(m.end())
            if self.text[params] != "(":
                self.fail(i, f"expected the parameters of {name}")
            body = self.skip_space(self.match_forward(params) + 1)
            if self.text[body] != "{":
                self.fail(i, f"expected the body of {name} (a declaration alone cannot carry __launch_bounds__ here)")
            body_end = self.match_forward(body)
            self.edits.append((i, close + 1, "\n" * self.text.count("\n", i, close + 1)))
            self.edits.append((body_end + 1, body_end + 1,
                               f" [[maybe_unused]] static const bool emu_launch_bounds_{name} = "
                               f'::emu::register_launch_bounds("{name}", __FILE__, {self.line_of(i)}, {args});'))
            pos = close + 1

    def rewritten(self):
        self.launch_bounds()
        self.shared()
        self.launches()
        out = self.text
        last = len(out) + 1
        for start, end, replacement in sorted(self.edits, key=lambda e: (e[0], e[1]), reverse=True):
            if end > last:
                self.fail(start, "overlapping rewrites (a launch inside a __shared__ declaration?)")
            out = out[:start] + replacement + out[end:]
            last = start
        return f'#line 1 "{self.path}"\n' + out


def main(argv):
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[-2], file=sys.stderr)
        return 2
    out_dir = argv[1]
    texts = {}
    for path in argv[2:]:
        if os.path.isabs(path) or ".." in path.split(os.sep):
            print(f"rewrite.py: {path}: give paths relative to the repository root, inside it", file=sys.stderr)
            return 2
        with open(path) as f:
            texts[path] = f.read()
    # a launch of a kernel template without <...> deduces its arguments: no function pointer to take
    deduced = {name for text in texts.values() for name in TEMPLATE_KERNEL.findall(text)}
    for path, text in texts.items():
        try:
            result = Source(path, text, deduced).rewritten()
        except RewriteError as e:
            print(e, file=sys.stderr)
            return 1
        target = os.path.join(out_dir, path)
        if os.path.exists(target):
            with open(target) as f:
                if f.read() == result:
                    continue
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        with open(target, "w") as f:
            f.write(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
