# Makefile for train_et.
#
#   make train_et              the trainer (nvcc; builds without a GPU)
#   make test                  every test this machine can run, then "N passed, N failed, N skipped"
#   make bench                 time the d12 training step, dense and MoE (ET, EC, TC), on this GPU (dev/bench.sh)
#   make test-emu              only the GPU and training tests, on the emulated device (test/emu)
#   make clean
#
# Switches:
#   GPU_ARCH=90                compute capability to build for, digits only (default: the
#                              GPU nvidia-smi reports, else 90 = H100/H200; at least 80)
#   PRECISION=BF16 | FP32      bf16 matmuls with fp32 accumulation (default), or fp32 throughout
#   NO_MULTI_GPU=1             build without NCCL (it is linked when nccl.h is found)

NVCC ?= nvcc
CXX ?= g++
PRECISION ?= BF16

GPU_ARCH ?= $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.' | grep -E '^[0-9]+$$')
ifeq ($(strip $(GPU_ARCH)),)
  override GPU_ARCH := 90
endif
# nvcc wants sm_80, nvidia-smi says 8.0: both are easy to pass by mistake
ifeq ($(shell echo '$(GPU_ARCH)' | grep -E '^[0-9]+$$'),)
  $(error GPU_ARCH=$(GPU_ARCH): give the compute capability as digits only, e.g. GPU_ARCH=80 for 8.0 (sm_80))
endif
# the bf16 tensor-core kernels (wmma) need Ampere or newer
ifeq ($(shell test $(GPU_ARCH) -ge 80 && echo ok),)
  $(error GPU_ARCH=$(GPU_ARCH): train_et needs compute capability 8.0 or newer (A100, H100, H200: GPU_ARCH=80 or 90))
endif

ifeq ($(PRECISION),BF16)
  PRECISION_FLAGS := -DENABLE_BF16
else ifeq ($(PRECISION),FP32)
  PRECISION_FLAGS := -DENABLE_FP32
else
  $(error PRECISION=$(PRECISION): use BF16 or FP32)
endif

CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(shell which $(NVCC) 2>/dev/null))
NCCL_HEADER := $(firstword $(wildcard $(CUDA_HOME)/include/nccl.h /usr/include/nccl.h /usr/local/include/nccl.h))
ifeq ($(NO_MULTI_GPU),1)
  NCCL_FLAGS :=
else ifneq ($(NCCL_HEADER),)
  NCCL_FLAGS := -DMULTI_GPU -lnccl
else
  NCCL_FLAGS :=
  $(info NCCL not found (no nccl.h): building single-GPU; NO_MULTI_GPU=1 silences this)
endif

# MPI (OpenMPI's mpicxx): with it, ranks started by mpirun get the NCCL id
# through MPI; without it, through a file (train_et -pd). NO_MPI=1 leaves it out.
MPI_INCLUDE := $(if $(filter 1,$(NO_MPI)),,$(shell mpicxx --showme:incdirs 2>/dev/null))
MPI_LIBDIR := $(if $(filter 1,$(NO_MPI)),,$(shell mpicxx --showme:libdirs 2>/dev/null))
MPI_CFLAGS := $(if $(MPI_INCLUDE),-DUSE_MPI $(addprefix -I,$(MPI_INCLUDE)))
MPI_LIBS := $(if $(MPI_INCLUDE),$(addprefix -L,$(MPI_LIBDIR)) -lmpi)
ifneq ($(NCCL_FLAGS),)
  NCCL_FLAGS += $(MPI_CFLAGS) $(MPI_LIBS)
endif

# Host code never fuses a*b + c into one rounding (-ffp-contract=off): the CPU
# references must round as they are written, so the GPU tests can compare
# the kernels that match them bit for bit (the ET cutoff EMA) on any host.
NVCC_FLAGS := -O3 -std=c++17 -arch=sm_$(GPU_ARCH) -Xcompiler -Wall,-Wextra,-ffp-contract=off
LIBS := -lcublas
CXX_FLAGS := -O2 -std=c++17 -Wall -Wextra -Werror -ffp-contract=off
HEADERS := $(wildcard *.h *.cuh data/*.h)
BUILD_FLAGS := $(NVCC_FLAGS) $(PRECISION_FLAGS) $(NCCL_FLAGS)
# The commit train_et is built from and whether the tree has changes, for the
# run record train_et writes (empty outside a git checkout).
GIT_COMMIT := $(shell git rev-parse HEAD 2>/dev/null)
GIT_DIRTY := $(if $(shell git status --porcelain 2>/dev/null),1,0)
GIT_FLAGS := -DGIT_COMMIT='"$(GIT_COMMIT)"' -DGIT_DIRTY=$(GIT_DIRTY)

.PHONY: all test test-emu bench clean FORCE
all: train_et

# Rebuild when the switches change, not only when sources do; train_et also
# when the commit or the tree's state does.
build/flags.txt: FORCE
	@mkdir -p build
	@echo '$(BUILD_FLAGS)' | cmp -s - $@ || echo '$(BUILD_FLAGS)' > $@
build/git.txt: FORCE
	@mkdir -p build
	@echo '$(GIT_COMMIT) $(GIT_DIRTY)' | cmp -s - $@ || echo '$(GIT_COMMIT) $(GIT_DIRTY)' > $@

# train_et and build/train_et_<precision> also leave, for
# test/test_kernels_compiled.py, build/kernels/<precision>.ptxas.txt (ptxas -v:
# each kernel's registers and spills) and build/kernels/<precision>.ptx (the
# PTX that nvcc kept), at no extra compile. ptxas -v's info lines go to that
# file only; the compilers' other output (warnings, errors) passes through.
KERNELS_DIR := build/kernels
# $(1): the precision in lower case; $(2): nvcc's arguments (ending with -o FILE)
nvcc_kernels = keep=$(KERNELS_DIR)/$(1).keep; mkdir -p $(KERNELS_DIR) && rm -rf $$keep && mkdir $$keep && \
	{ $(NVCC) -Xptxas -v --keep --keep-dir $$keep $(2) 2>$(KERNELS_DIR)/$(1).ptxas.txt; rc=$$?; \
	  grep -v -E '^(ptxas info +:|    [0-9]+ bytes stack frame)' $(KERNELS_DIR)/$(1).ptxas.txt >&2; \
	  if [ $$rc -eq 0 ]; then mv $$keep/train_et.ptx $(KERNELS_DIR)/$(1).ptx || rc=1; fi; \
	  rm -rf $$keep; exit $$rc; }

train_et: train_et.cu $(HEADERS) build/flags.txt build/git.txt
	$(call nvcc_kernels,$(shell echo $(PRECISION) | tr A-Z a-z),$(NVCC_FLAGS) $(PRECISION_FLAGS) $(GIT_FLAGS) $< -o $@ $(LIBS) $(NCCL_FLAGS))

# Both precisions, for the tests' compile check.
build/train_et_%: train_et.cu $(HEADERS)
	@mkdir -p build
	$(call nvcc_kernels,$*,$(NVCC_FLAGS) -DENABLE_$(shell echo $* | tr a-z A-Z) $< -o $@ $(LIBS) $(NCCL_FLAGS))

# GPU tests, in both precisions; they compile anywhere and run where a GPU is.
build/gpu_test_%.bf16: test/gpu_test_%.cu $(HEADERS) $(wildcard test/*.h)
	@mkdir -p build
	$(NVCC) $(NVCC_FLAGS) -DENABLE_BF16 $< -o $@ $(LIBS)
build/gpu_test_%.fp32: test/gpu_test_%.cu $(HEADERS) $(wildcard test/*.h)
	@mkdir -p build
	$(NVCC) $(NVCC_FLAGS) -DENABLE_FP32 $< -o $@ $(LIBS)

# The benchmark of dev/ (BF16; dev/bench.sh runs it).
build/bench_step: dev/bench_step.cu $(HEADERS)
	@mkdir -p build
	$(NVCC) $(NVCC_FLAGS) -DENABLE_BF16 $< -o $@ $(LIBS)

build/test_%: test/test_%.cpp $(HEADERS) $(wildcard test/*.h)
	@mkdir -p build
	$(CXX) $(CXX_FLAGS) $< -o $@

# ----------------------------------------------------------------------------
# The emulated device (README: "The emulated device"): the same CUDA sources,
# rewritten by test/emu/rewrite.py and compiled by g++ to run on the CPU.
#   build/emu/<variant>/gpu_test_<name>.bf16 | .fp32    a GPU test program
#   build/emu/<variant>/<program>                       train_et, bench_step, selftest, dry_run (BF16)
# variant: plain (-O2); asan (AddressSanitizer + UndefinedBehaviorSanitizer);
# tsan (ThreadSanitizer, every emulated GPU thread a fiber of its own: slow,
# for one suspect program, e.g. make build/emu/tsan/gpu_test_moe.bf16).

EMU_SOURCES := $(sort $(wildcard *.cu *.cuh *.h data/*.h test/*.h test/*.cu dev/*.cu test/emu/*.cu))
EMU_SRC := build/emu/src
EMU_HEADERS := $(wildcard test/emu/*.h test/emu/include/*.h test/emu/include/cub/*.cuh)
EMU_RUNTIME := $(patsubst test/emu/%.cpp,%,$(wildcard test/emu/*.cpp))
EMU_CXX_FLAGS := -std=c++17 -Wall -Wextra -Wno-unknown-pragmas -ffp-contract=off -Itest/emu/include \
                 -I$(CUDA_HOME)/include
EMU_FLAGS_plain := -O2
EMU_FLAGS_asan := -O1 -g1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
EMU_FLAGS_tsan := -O1 -g1 -fsanitize=thread
# the emulator's own code is not instrumented for ThreadSanitizer: it calls its fiber API instead
EMU_RUNTIME_FLAGS_plain := $(EMU_FLAGS_plain)
EMU_RUNTIME_FLAGS_asan := $(EMU_FLAGS_asan)
EMU_RUNTIME_FLAGS_tsan := -O1 -g1 -DEMU_TSAN
EMU_SOURCE_train_et := train_et.cu
EMU_SOURCE_bench_step := dev/bench_step.cu
EMU_SOURCE_selftest := test/emu/selftest.cu
EMU_SOURCE_nccl_selftest := test/emu/nccl_selftest.cu
EMU_SOURCE_dry_run := test/emu/dry_run.cu

# Every source rewritten at once (a launch may deduce a kernel template defined
# in another file); rewrite.py writes only the files whose output changed.
$(EMU_SRC)/.stamp: $(EMU_SOURCES) test/emu/rewrite.py
	@mkdir -p $(EMU_SRC)
	@python3 test/emu/rewrite.py $(EMU_SRC) $(EMU_SOURCES)
	@touch $@

# In these rules the stem $* is <variant>/<name>.
.SECONDEXPANSION:
.PRECIOUS: build/emu/%.o
emu_variant = $(firstword $(subst /, ,$*))
emu_objects = $(patsubst %,build/emu/$(1)/%.o,$(EMU_RUNTIME))
emu_link = $(CXX) $(EMU_CXX_FLAGS) $(EMU_FLAGS_$(emu_variant)) $(GIT_FLAGS) -DMULTI_GPU $(MPI_CFLAGS) \
           -include test/emu/emu.h $(1) -x c++ $(2) -x none $(call emu_objects,$(emu_variant)) $(MPI_LIBS) -o $@

build/emu/%.o: test/emu/$$(notdir $$*).cpp $(EMU_HEADERS)
	@mkdir -p $(dir $@)
	$(CXX) $(EMU_CXX_FLAGS) $(EMU_RUNTIME_FLAGS_$(emu_variant)) -c $< -o $@
build/emu/%.bf16: $(EMU_SRC)/.stamp $$(call emu_objects,$$(firstword $$(subst /, ,$$*))) $(EMU_HEADERS)
	$(call emu_link,-DENABLE_BF16,$(EMU_SRC)/test/$(notdir $*).cu)
build/emu/%.fp32: $(EMU_SRC)/.stamp $$(call emu_objects,$$(firstword $$(subst /, ,$$*))) $(EMU_HEADERS)
	$(call emu_link,-DENABLE_FP32,$(EMU_SRC)/test/$(notdir $*).cu)
build/emu/plain/train_et build/emu/asan/train_et build/emu/tsan/train_et: build/git.txt
build/emu/%: $(EMU_SRC)/.stamp $$(call emu_objects,$$(firstword $$(subst /, ,$$*))) $(EMU_HEADERS)
	$(if $(EMU_SOURCE_$(notdir $*)),,$(error $@: no such emulated program (train_et, bench_step, selftest, nccl_selftest, dry_run)))
	$(call emu_link,-DENABLE_BF16,$(EMU_SRC)/$(EMU_SOURCE_$(notdir $*)))

test:
	@bash test/run_tests.sh

test-emu:
	@bash test/run_tests.sh emu

bench:
	@bash dev/bench.sh

clean:
	rm -rf build train_et
