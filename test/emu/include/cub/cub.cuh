// test/emu/include/cub/cub.cuh: the CUB primitives train_et uses, for the
// emulated device, to CUB's documented contracts (found before the toolkit's
// <cub/cub.cuh> on the emulator's include path).
//
//   BlockReduce<T, BLOCK_DIM_X>::Sum / Reduce: every thread of the block
//     calls it; the aggregate exists in thread 0 only (the others get NaN, or
//     0x55 bytes for integers, so code that reads it elsewhere shows).
//   BlockScan<T, BLOCK_DIM_X>::ExclusiveSum / InclusiveSum: every thread gets
//     its prefix, and the block aggregate when asked.
//   Both: the block must have exactly the threads the template names, and
//     TempStorage may be used again only after a __syncthreads() that follows
//     the previous use (CUB's rule; breaking it is a race on a GPU, and a
//     fault here whatever the schedule).
//   DeviceRadixSort::SortPairs: the temp-storage query (d_temp_storage null:
//     only the size is written), then a stable sort of (key, value) pairs by
//     bits [begin_bit, end_bit) of the keys (signed keys ordered as CUB orders
//     them); every pointer must be device memory of the right size.
// The reductions run in a fixed order (thread 0 first), so results are
// deterministic; floating-point sums match a GPU's to rounding, not bit for bit.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../../emu.h"

namespace cub {

enum BlockReduceAlgorithm { BLOCK_REDUCE_RAKING, BLOCK_REDUCE_RAKING_COMMUTATIVE_ONLY, BLOCK_REDUCE_WARP_REDUCTIONS };
enum BlockScanAlgorithm { BLOCK_SCAN_RAKING, BLOCK_SCAN_RAKING_MEMOIZE, BLOCK_SCAN_WARP_SCANS };

namespace detail {

// What a block collective shares in its TempStorage: the threads' inputs and
// the barrier count at the end of its last use.
template <class T, int THREADS>
struct CollectiveStorage {
    T values[THREADS];
    T aggregate;
    unsigned long finished_at;  // block_barriers_completed() when its last use ended
    uint32_t used;              // USED_MAGIC once it has been used in this block
};
static const uint32_t USED_MAGIC = 0x0C0B0C0B;

// The bookkeeping fields are read and written atomically: every thread
// writes the same values, which is the emulator's business, not a race of
// the kernel's for a ThreadSanitizer build to report.
template <class Storage>
unsigned collective_begin(Storage& s, const char* what, int dim_x, int dim_y, int dim_z) {
    if ((int)blockDim.x != dim_x || (int)blockDim.y != dim_y || (int)blockDim.z != dim_z)
        ::emu::device_fault("%s<%d, %d, %d> called in a block of %u x %u x %u threads: the template must name the "
                            "block's dimensions", what, dim_x, dim_y, dim_z, blockDim.x, blockDim.y, blockDim.z);
    if (__atomic_load_n(&s.used, __ATOMIC_RELAXED) == USED_MAGIC &&
        ::emu::block_barriers_completed() <= __atomic_load_n(&s.finished_at, __ATOMIC_RELAXED))
        ::emu::device_fault("%s: TempStorage used again with no __syncthreads() after its previous use (CUB requires "
                            "one before the storage is reused)", what);
    return threadIdx.x + threadIdx.y * dim_x + threadIdx.z * dim_x * dim_y;
}

template <class Storage>
void collective_end(Storage& s) {
    __atomic_store_n(&s.finished_at, ::emu::block_barriers_completed(), __ATOMIC_RELAXED);
    __atomic_store_n(&s.used, USED_MAGIC, __ATOMIC_RELAXED);
}

struct SumOp {
    template <class T>
    T operator()(const T& a, const T& b) const {
        return a + b;
    }
};

}  // namespace detail

template <class T, int BLOCK_DIM_X, BlockReduceAlgorithm ALGORITHM = BLOCK_REDUCE_WARP_REDUCTIONS,
          int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1, int LEGACY_PTX_ARCH = 0>
class BlockReduce {
    static constexpr int THREADS = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

  public:
    using TempStorage = detail::CollectiveStorage<T, THREADS>;

    explicit BlockReduce(TempStorage& storage) : s(storage) {}

    T Sum(T input) { return Reduce(input, detail::SumOp{}, THREADS); }
    T Sum(T input, int num_valid) { return Reduce(input, detail::SumOp{}, num_valid); }
    template <class Op>
    T Reduce(T input, Op op) {
        return Reduce(input, op, THREADS);
    }
    // Threads at or past num_valid contribute nothing.
    template <class Op>
    T Reduce(T input, Op op, int num_valid) {
        const unsigned t = detail::collective_begin(s, "cub::BlockReduce", BLOCK_DIM_X, BLOCK_DIM_Y, BLOCK_DIM_Z);
        s.values[t] = input;
        __syncthreads();
        T result = ::emu::unspecified_value<T>();
        if (t == 0) {
            result = s.values[0];
            for (int i = 1; i < std::min(num_valid, THREADS); i++) result = op(result, s.values[i]);
        }
        detail::collective_end(s);
        return result;
    }

  private:
    TempStorage& s;
};

template <class T, int BLOCK_DIM_X, BlockScanAlgorithm ALGORITHM = BLOCK_SCAN_RAKING, int BLOCK_DIM_Y = 1,
          int BLOCK_DIM_Z = 1, int LEGACY_PTX_ARCH = 0>
class BlockScan {
    static constexpr int THREADS = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

  public:
    using TempStorage = detail::CollectiveStorage<T, THREADS>;

    explicit BlockScan(TempStorage& storage) : s(storage) {}

    void ExclusiveSum(T input, T& output) {
        T aggregate;
        Scan(input, output, aggregate, false);
    }
    void ExclusiveSum(T input, T& output, T& block_aggregate) { Scan(input, output, block_aggregate, false); }
    void InclusiveSum(T input, T& output) {
        T aggregate;
        Scan(input, output, aggregate, true);
    }
    void InclusiveSum(T input, T& output, T& block_aggregate) { Scan(input, output, block_aggregate, true); }

  private:
    // Thread 0 turns the inputs into prefixes in place, between two barriers.
    void Scan(T input, T& output, T& aggregate, bool inclusive) {
        const unsigned t = detail::collective_begin(s, "cub::BlockScan", BLOCK_DIM_X, BLOCK_DIM_Y, BLOCK_DIM_Z);
        s.values[t] = input;
        __syncthreads();
        if (t == 0) {
            T running = T();
            for (int i = 0; i < THREADS; i++) {
                const T v = s.values[i];
                s.values[i] = inclusive ? running + v : running;
                running = running + v;
            }
            s.aggregate = running;
        }
        __syncthreads();
        output = s.values[t];
        aggregate = s.aggregate;
        detail::collective_end(s);
    }

    TempStorage& s;
};

struct DeviceRadixSort {
    // Stable: equal keys keep their input order. Bits outside [begin_bit,
    // end_bit) are ignored; a signed key's sign bit is flipped first, as CUB
    // does, so negative keys sort before positive ones when that bit counts.
    template <class KeyT, class ValueT, class NumItemsT>
    static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes, const KeyT* d_keys_in,
                                 KeyT* d_keys_out, const ValueT* d_values_in, ValueT* d_values_out, NumItemsT num_items,
                                 int begin_bit = 0, int end_bit = sizeof(KeyT) * 8, cudaStream_t stream = 0) {
        static_assert(std::is_integral_v<KeyT>, "the emulated DeviceRadixSort sorts integer keys");
        (void)stream;
        const size_t n = (size_t)num_items;
        const size_t needed = n * (sizeof(KeyT) + sizeof(ValueT)) + 256;
        if (d_temp_storage == nullptr) {
            temp_storage_bytes = needed;
            return cudaSuccess;
        }
        const char* call = "cub::DeviceRadixSort::SortPairs";
        if (begin_bit < 0 || end_bit > (int)sizeof(KeyT) * 8 || begin_bit >= end_bit || temp_storage_bytes < needed)
            return cudaErrorInvalidValue;
        ::emu::count_library_call();
        if (::emu::sticky_fault()) return cudaErrorLaunchFailure;  // after a fault nothing more runs on the device
        if (!::emu::check_library_range(d_temp_storage, temp_storage_bytes, call, "d_temp_storage") ||
            !::emu::check_library_range(d_keys_in, n * sizeof(KeyT), call, "d_keys_in") ||
            !::emu::check_library_range(d_keys_out, n * sizeof(KeyT), call, "d_keys_out") ||
            !::emu::check_library_range(d_values_in, n * sizeof(ValueT), call, "d_values_in") ||
            !::emu::check_library_range(d_values_out, n * sizeof(ValueT), call, "d_values_out"))
            return cudaErrorLaunchFailure;
        if (::emu::dry_run() || n == 0) return cudaSuccess;
        using Bits = std::make_unsigned_t<KeyT>;
        const Bits flip = std::is_signed_v<KeyT> ? (Bits)1 << (sizeof(KeyT) * 8 - 1) : 0;
        const Bits field = (end_bit - begin_bit == (int)sizeof(KeyT) * 8) ? (Bits)~(Bits)0
                                                                           : (Bits)(((Bits)1 << (end_bit - begin_bit)) - 1);
        std::vector<size_t> order(n);
        for (size_t i = 0; i < n; i++) order[i] = i;
        auto bits = [&](size_t i) { return (Bits)(((Bits)d_keys_in[i] ^ flip) >> begin_bit) & field; };
        std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return bits(a) < bits(b); });
        std::vector<KeyT> keys(n);
        std::vector<ValueT> values(n);
        for (size_t i = 0; i < n; i++) {
            keys[i] = d_keys_in[order[i]];
            values[i] = d_values_in[order[i]];
        }
        std::memset(d_temp_storage, 0xFF, temp_storage_bytes);  // scratch: its contents mean nothing afterwards
        std::copy(keys.begin(), keys.end(), d_keys_out);
        std::copy(values.begin(), values.end(), d_values_out);
        return cudaSuccess;
    }
};

}  // namespace cub
