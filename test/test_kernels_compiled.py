"""test/test_kernels_compiled.py: what nvcc made of the kernels, read without a GPU.

`make train_et` and `make build/train_et_<precision>` leave ptxas -v's report
(build/kernels/<precision>.ptxas.txt) and the PTX (build/kernels/<precision>.ptx)
of train_et.cu. Here:
  - no function spills registers to local memory (0 bytes spill stores and
    loads), in either precision;
  - in the BF16 build every instance of each flash attention kernel (model.cuh)
    and each expert matmul kernel (router.cuh) multiplies on the tensor cores: its
    PTX .entry holds mma.sync (wmma.mma.sync or mma.sync). The FP32 build's
    kernels stay on the CUDA cores (exact fp32), so it is not asked there.
The kernels asked are found in the sources (every __global__ whose name has
"flash", or starts with expert_matmul or expert_weight_grad), so a new one is
checked too, and each must be in the PTX. The checks are also run on small made-up reports that must fail.
"""
import os
import re
import shutil
import subprocess

from harness import REPO, main

KERNELS = os.path.join(REPO, "build", "kernels")
# where each precision's report comes from: the default train_et and the
# tests' build (make test builds both)
MAKE_TARGET = {"bf16": "build/train_et_bf16 (or train_et, whose default is BF16)", "fp32": "build/train_et_fp32"}
TENSOR_CORE_SOURCES = ("model.cuh", "router.cuh")
# the flash attention kernels and the expert matmuls (not the dispatch kernels)
TENSOR_CORE_NAME = re.compile(r"flash|^expert_(matmul|weight_grad)")


def read_built(precision, kind):
    """build/kernels/<precision>.<kind>, or a failure that names the make target which writes it."""
    path = os.path.join(KERNELS, f"{precision}.{kind}")
    assert os.path.exists(path), (f"{path} is missing: it is written when train_et.cu is compiled for "
                                  f"{precision.upper()}: run `rm -f {MAKE_TARGET[precision].split()[0]} && "
                                  f"make {MAKE_TARGET[precision].split()[0]}` (make test builds it)")
    with open(path) as f:
        return f.read()


def parse_ptxas(text):
    """ptxas -v's report: {function: {"spill_stores", "spill_loads", "registers" (entries only), "entry"}}."""
    functions, current, entry = {}, None, None
    for line in text.splitlines():
        m = re.match(r"ptxas info\s*: Compiling entry function '([^']+)'", line)
        if m:
            entry = m.group(1)
            functions.setdefault(entry, {})["entry"] = True
            continue
        m = re.match(r"ptxas info\s*: Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            functions.setdefault(current, {}).setdefault("entry", False)
            continue
        m = re.match(r"\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            functions[current]["spill_stores"] = int(m.group(2))
            functions[current]["spill_loads"] = int(m.group(3))
            current = None
            continue
        m = re.match(r"ptxas info\s*: Used (\d+) registers", line)
        if m and entry is not None:
            functions[entry]["registers"] = int(m.group(1))
            entry = None
    return functions


def parse_ptx_entries(text):
    """{mangled name: body} of each .entry of a PTX file (the body up to its closing brace)."""
    entries = {}
    for m in re.finditer(r"\.entry\s+([\w$.]+)\s*\(", text):
        start = text.index("{", m.end())
        depth, i = 0, start
        while i < len(text):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        entries[m.group(1)] = text[start:i + 1]
    return entries


def demangle(names):
    """{mangled: demangled} by c++filt (each name as it is where c++filt is missing)."""
    names = sorted(names)
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    r = subprocess.run(["c++filt"], input="\n".join(names) + "\n", capture_output=True, text=True, timeout=60)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if r.returncode == 0 and len(out) == len(names) else {n: n for n in names}


def base_name(demangled):
    """flash_attention_forward_kernel of 'void flash_attention_forward_kernel<64>(float*, ...)'."""
    return re.sub(r"^void\s+", "", demangled).split("<")[0].split("(")[0].split("::")[-1]


def spill_problems(precision, ptxas_text):
    """A line per function that spills (naming it and the precision), or that the report lacks."""
    functions = parse_ptxas(ptxas_text)
    if not any(f["entry"] for f in functions.values()):
        return [f"{precision.upper()}: ptxas -v reported no kernel (is it ptxas -v's output?)"]
    names = demangle(functions)
    problems = []
    for mangled, f in sorted(functions.items()):
        if "spill_stores" not in f:
            problems.append(f"{precision.upper()}: {names[mangled]}: ptxas -v gave no spill line")
        elif f["spill_stores"] or f["spill_loads"]:
            problems.append(f"{precision.upper()}: {names[mangled]} ({mangled}) spills: {f['spill_stores']} bytes "
                            f"spill stores, {f['spill_loads']} bytes spill loads")
    return problems


def tensor_core_kernels():
    """The __global__ kernels of model.cuh and router.cuh that TENSOR_CORE_NAME names."""
    names = set()
    for source in TENSOR_CORE_SOURCES:
        with open(os.path.join(REPO, source)) as f:
            text = f.read()
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(", text):
            if TENSOR_CORE_NAME.search(m.group(1)):
                names.add(m.group(1))
    return names


def tensor_core_problems(precision, ptx_text, kernels):
    """A line per kernel of `kernels` (base names) missing from the PTX, or an instance of one without mma.sync."""
    entries = parse_ptx_entries(ptx_text)
    names = demangle(entries)
    problems, seen = [], set()
    for mangled, body in sorted(entries.items()):
        base = base_name(names[mangled])
        if base not in kernels:
            continue
        seen.add(base)
        if not re.search(r"\bmma\.sync\b|\bwmma\.mma\.sync\b", body):
            problems.append(f"{precision.upper()}: {names[mangled]} ({mangled}) has no mma.sync in its PTX: "
                            f"it does not use the tensor cores")
    for base in sorted(kernels - seen):
        problems.append(f"{precision.upper()}: {base} is not in the PTX (not instantiated, or renamed)")
    return problems


def test_no_spills_bf16():
    problems = spill_problems("bf16", read_built("bf16", "ptxas.txt"))
    assert not problems, "; ".join(problems)


def test_no_spills_fp32():
    problems = spill_problems("fp32", read_built("fp32", "ptxas.txt"))
    assert not problems, "; ".join(problems)


def test_bf16_flash_and_expert_kernels_use_tensor_cores():
    kernels = tensor_core_kernels()
    assert {k for k in kernels if "flash" in k} and {k for k in kernels if "expert" in k}, \
        f"found no flash or no expert kernel in {TENSOR_CORE_SOURCES}: {sorted(kernels)}"
    ptx = read_built("bf16", "ptx")
    ptxas = parse_ptxas(read_built("bf16", "ptxas.txt"))
    missing = sorted(set(parse_ptx_entries(ptx)) - set(ptxas))
    assert not missing, f"kernels of build/kernels/bf16.ptx that ptxas -v did not report (stale files?): {missing}"
    problems = tensor_core_problems("bf16", ptx, kernels)
    assert not problems, "; ".join(problems)


# Made-up reports: the checks must catch a spill, a kernel without mma.sync
# and a missing kernel.
FAKE_PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z13good_kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z13good_kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 360 bytes cmem[0]
ptxas info    : Compile time = 1.000 ms
ptxas info    : Compiling entry function '_Z30flash_attention_forward_kernelILi64EEvPf' for 'sm_90'
ptxas info    : Function properties for _Z30flash_attention_forward_kernelILi64EEvPf
    {frame} bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 380 bytes cmem[0]
"""

FAKE_PTX = """.version 9.0
.target sm_90
	// .globl	_Z30flash_attention_forward_kernelILi64EEvPf
.visible .entry _Z30flash_attention_forward_kernelILi64EEvPf(
	.param .u64 _Z30flash_attention_forward_kernelILi64EEvPf_param_0
)
.maxntid 128, 1, 1
{
	.reg .b32 	%r<9>;
	{
	.reg .b32 %tmp;
	}
	%MMA%
	ret;
}
	// .globl	_Z13good_kernelPf
.visible .entry _Z13good_kernelPf(
	.param .u64 _Z13good_kernelPf_param_0
)
{
	wmma.mma.sync.aligned.row.col.m16n16k16.f32.bf16.bf16.f32 {%f1, %f2}, {%r1}, {%r2}, {%f1, %f2};
	ret;
}
"""

MMA = "wmma.mma.sync.aligned.row.row.m16n16k16.f32.bf16.bf16.f32 {%f1, %f2}, {%r1}, {%r2}, {%f3, %f4};"


def test_parsers_on_made_up_reports():
    functions = parse_ptxas(FAKE_PTXAS.format(frame=0, stores=0, loads=0))
    assert functions["_Z13good_kernelPf"] == {"entry": True, "spill_stores": 0, "spill_loads": 0, "registers": 40}, \
        functions
    assert functions["_Z30flash_attention_forward_kernelILi64EEvPf"]["registers"] == 255, functions
    entries = parse_ptx_entries(FAKE_PTX.replace("%MMA%", MMA))
    assert sorted(entries) == ["_Z13good_kernelPf", "_Z30flash_attention_forward_kernelILi64EEvPf"], entries
    assert MMA in entries["_Z30flash_attention_forward_kernelILi64EEvPf"] and \
        entries["_Z30flash_attention_forward_kernelILi64EEvPf"].rstrip().endswith("ret;\n}"), entries


def test_a_spill_fails():
    assert spill_problems("fp32", FAKE_PTXAS.format(frame=0, stores=0, loads=0)) == []
    for stores, loads in ((8, 8), (4, 0), (0, 4)):
        problems = spill_problems("fp32", FAKE_PTXAS.format(frame=8, stores=stores, loads=loads))
        assert len(problems) == 1, problems
        assert problems[0].startswith("FP32: ") and "flash_attention_forward_kernel" in problems[0] and \
            f"{stores} bytes spill stores" in problems[0], problems
    # a report that is not ptxas -v's, or a function without its spill line
    assert spill_problems("bf16", "nvcc warning : something\n")[0].startswith("BF16: ptxas -v reported no kernel")
    cut = "\n".join(line for line in FAKE_PTXAS.splitlines() if "bytes stack frame" not in line)
    assert len(spill_problems("bf16", cut)) == 2, spill_problems("bf16", cut)


def test_a_kernel_without_mma_fails():
    kernels = {"flash_attention_forward_kernel"}
    assert tensor_core_problems("bf16", FAKE_PTX.replace("%MMA%", MMA), kernels) == []
    # the mma.sync of another kernel does not count
    problems = tensor_core_problems("bf16", FAKE_PTX.replace("%MMA%", "fma.rn.f32 %f1, %f2, %f3, %f4;"), kernels)
    assert len(problems) == 1 and "flash_attention_forward_kernel" in problems[0] and "no mma.sync" in problems[0], \
        problems
    assert tensor_core_problems("bf16", FAKE_PTX.replace("%MMA%", "mma.sync.aligned.m16n8k16.row.col.f32.bf16."
                                                         "bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};"), kernels) == []
    problems = tensor_core_problems("bf16", FAKE_PTX.replace("%MMA%", MMA), kernels | {"expert_matmul_kernel"})
    assert problems == ["BF16: expert_matmul_kernel is not in the PTX (not instantiated, or renamed)"], problems


def test_missing_files_name_the_make_target():
    global KERNELS
    saved = KERNELS
    KERNELS = os.path.join(REPO, "build", "no such folder")
    try:
        for precision, target in (("bf16", "build/train_et_bf16"), ("fp32", "build/train_et_fp32")):
            try:
                read_built(precision, "ptxas.txt")
            except AssertionError as e:
                assert f"make {target}" in str(e) and "is missing" in str(e), str(e)
            else:
                raise AssertionError("a missing file passed")
    finally:
        KERNELS = saved


if __name__ == "__main__":
    main(globals())
