// model.cuh: the transformer on the GPU.
//
// It opens with the CUDA plumbing every kernel file needs: checked runtime
// calls that say what failed where, and finding the GPU this process trains
// on together with its peak dense bf16 rate (the denominator of MFU). The
// model's shapes and parameter table live in model_config.h.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "common.h"
#include "model_config.h"

inline void cuda_check(cudaError_t err, const char* call, const char* file, int line) {
    if (err != cudaSuccess) fail("CUDA: %s failed at %s:%d: %s", call, file, line, cudaGetErrorString(err));
}
#define cudaCheck(call) cuda_check((call), #call, __FILE__, __LINE__)

struct GpuInfo {
    int device = -1;
    cudaDeviceProp prop;
    double peak_bf16_flops = 0;  // dense, per second; 0 when unknown
};

// Dense bf16 tensor-core peak by architecture (datasheet figures for the
// data-centre part of each generation: A100, H100/H200).
inline double peak_bf16_flops(const cudaDeviceProp& p) {
    if (p.major == 9) return 989e12;
    if (p.major == 8 && p.minor == 0) return 312e12;
    return 0;
}

// Selects GPU `local_rank`. Returns "" or why there is no usable device.
inline std::string gpu_open(int local_rank, GpuInfo* gpu) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0)
        return std::string("no CUDA device (cudaGetDeviceCount: ") +
               (err != cudaSuccess ? cudaGetErrorString(err) : "0 devices") + ")";
    if (local_rank >= count)
        return string_format("process %d needs GPU %d but only %d are visible", local_rank, local_rank, count);
    gpu->device = local_rank;
    cudaCheck(cudaSetDevice(local_rank));
    cudaCheck(cudaGetDeviceProperties(&gpu->prop, local_rank));
    gpu->peak_bf16_flops = peak_bf16_flops(gpu->prop);
    return "";
}
