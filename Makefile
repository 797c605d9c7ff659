# Makefile for train_et.
#
#   make train_et              the trainer (nvcc; builds without a GPU)
#   make test                  every test this machine can run, then "N passed, N failed, N skipped"
#   make bench                 time the d12 training step, dense and MoE (ET, EC, TC), on this GPU (dev/bench.sh)
#   make clean
#
# Switches:
#   GPU_ARCH=90                compute capability to build for (default: the
#                              GPU nvidia-smi reports, else 90 = H100/H200)
#   PRECISION=BF16 | FP32      bf16 matmuls with fp32 accumulation (default), or fp32 throughout
#   NO_MULTI_GPU=1             build without NCCL (it is linked when nccl.h is found)

NVCC ?= nvcc
CXX ?= g++
PRECISION ?= BF16

GPU_ARCH ?= $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '.' | grep -E '^[0-9]+$$')
ifeq ($(strip $(GPU_ARCH)),)
  override GPU_ARCH := 90
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

# Host code never fuses a*b + c into one rounding (-ffp-contract=off): the CPU
# references must round as they are written, so the GPU tests can compare
# the kernels that match them bit for bit (the ET cutoff EMA) on any host.
NVCC_FLAGS := -O3 -std=c++17 -arch=sm_$(GPU_ARCH) -Xcompiler -Wall,-Wextra,-ffp-contract=off
LIBS := -lcublas
CXX_FLAGS := -O2 -std=c++17 -Wall -Wextra -Werror -ffp-contract=off
HEADERS := $(wildcard *.h *.cuh data/*.h)
BUILD_FLAGS := $(NVCC_FLAGS) $(PRECISION_FLAGS) $(NCCL_FLAGS)

.PHONY: all test bench clean FORCE
all: train_et

# Rebuild when the switches change, not only when sources do.
build/flags.txt: FORCE
	@mkdir -p build
	@echo '$(BUILD_FLAGS)' | cmp -s - $@ || echo '$(BUILD_FLAGS)' > $@

train_et: train_et.cu $(HEADERS) build/flags.txt
	$(NVCC) $(NVCC_FLAGS) $(PRECISION_FLAGS) $< -o $@ $(LIBS) $(NCCL_FLAGS)

# Both precisions, for the tests' compile check.
build/train_et_%: train_et.cu $(HEADERS)
	@mkdir -p build
	$(NVCC) $(NVCC_FLAGS) -DENABLE_$(shell echo $* | tr a-z A-Z) $< -o $@ $(LIBS) $(NCCL_FLAGS)

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

test:
	@bash test/run_tests.sh

bench:
	@bash dev/bench.sh

clean:
	rm -rf build train_et
