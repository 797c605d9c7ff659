// test/emu/include/cuda_pipeline.h: the cp.async primitives of CUDA's
// <cuda_pipeline.h> for the emulated device (found before the toolkit's
// header on the emulator's include path).
//
// The contract (CUDA programming guide, "Asynchronous Data Copies", the
// pipeline primitives interface), per thread:
//   __pipeline_memcpy_async(dst, src, size, zfill = 0) starts copying `size`
//     bytes (4, 8 or 16; dst and src aligned to it) from global src to shared
//     dst; the last `zfill` of them are zeros instead (src-size = size - zfill);
//   __pipeline_commit() closes the batch of the copies this thread started
//     since its last commit;
//   __pipeline_wait_prior(n) waits until every batch of this thread but the
//     n most recently committed has landed.
// Other threads see the data only after a barrier that follows the wait.
//
// On a GPU a copy lands at some moment between its start and the wait that
// covers it. Here it lands exactly at that wait, and from its start until
// then the destination holds poison (0xFF bytes, NaN as floats): a kernel
// that reads a staged tile before waiting for it, or starts copying into a
// buffer other threads still read, computes with NaN. The source is read
// when the copy starts, so an out-of-bounds source is reported at that line
// by the AddressSanitizer build. A thread that exits with copies no wait
// covered is a fault (test/emu/device.cpp): their data could never be used.
// Not checked: that dst is shared and src global memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../emu.h"

inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global, size_t size_and_align, size_t zfill = 0,
                                    EMU_CALL_SITE) {
    const size_t size = size_and_align;
    if (size != 4 && size != 8 && size != 16)
        emu::device_fault("__pipeline_memcpy_async (%s:%d): size %zu: it copies 4, 8 or 16 bytes", emu_file, emu_line,
                          size);
    if ((uintptr_t)dst_shared % size != 0 || (uintptr_t)src_global % size != 0)
        emu::device_fault("__pipeline_memcpy_async (%s:%d): dst %p and src %p must be aligned to the %zu bytes it copies",
                          emu_file, emu_line, dst_shared, src_global, size);
    if (zfill > size)
        emu::device_fault("__pipeline_memcpy_async (%s:%d): zfill %zu is more than the %zu bytes it copies", emu_file,
                          emu_line, zfill, size);
    emu::AsyncCopy copy{(unsigned char*)dst_shared, std::vector<unsigned char>(size, 0)};
    if (size > zfill) memcpy(copy.bytes.data(), src_global, size - zfill);
    memset(dst_shared, 0xFF, size);
    emu::current_thread->async_open.push_back(std::move(copy));
}

inline void __pipeline_commit() {
    emu::Thread& t = *emu::current_thread;
    t.async_committed.push_back(std::move(t.async_open));
    t.async_open.clear();
}

inline void __pipeline_wait_prior(size_t prior) {
    emu::Thread& t = *emu::current_thread;
    while (t.async_committed.size() > prior) {
        for (const emu::AsyncCopy& c : t.async_committed.front()) memcpy(c.dst, c.bytes.data(), c.bytes.size());
        t.async_committed.pop_front();
    }
}
