// test/emu/include/mma.h: nvcuda::wmma for the emulated device, to the CUDA
// programming guide's contract (found before the toolkit's <mma.h> on the
// emulator's include path).
//
// load_matrix_sync, store_matrix_sync and mma_sync are warp-wide: all 32
// lanes call them with the same arguments, and they meet as one warp
// operation (test/emu/device.cpp). A fragment's element layout across lanes
// is unspecified on a GPU; here every lane holds the whole tile, so
// element-wise code on x[] behaves the same in every lane, and a store or mma
// checks that every lane's fragments are still the same. The checks the
// guide states: ldm a multiple of 8 elements for 16-bit types and of 4 for
// float, and pointers 256-bit (32-byte) aligned.
//
// mma_sync computes d = a b + c with fp32 accumulation in k order from the
// operands' exact values (a bf16 product is exact in fp32), so it matches
// the tensor cores to fp32 rounding, not their internal rounding.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

// A fragment's tile: matrix_a is M x K, matrix_b K x N, the accumulator M x N.
template <class Use, int M, int N, int K>
struct Shape;
template <int M, int N, int K>
struct Shape<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct Shape<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct Shape<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};

}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static_assert((M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) || (M == 8 && N == 32 && K == 16),
                  "wmma shapes: 16x16x16, 32x8x16, 8x32x16");
    static constexpr int rows = detail::Shape<Use, M, N, K>::rows, cols = detail::Shape<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols;
    T x[num_elements];  // element (r, c) at x[r * cols + c], in every lane
};

namespace detail {

template <class T>
void check_pointer_and_ldm(const emu::WarpCall& c, const T* p) {
    const unsigned multiple = sizeof(T) == 2 ? 8 : 4;
    if (c.ldm % multiple != 0)
        emu::device_fault("%s (%s:%d): ldm %u is not a multiple of %u elements", c.op, c.site.file, c.site.line, c.ldm,
                          multiple);
    if ((uintptr_t)p % 32 != 0)
        emu::device_fault("%s (%s:%d): pointer %p is not 256-bit (32-byte) aligned", c.op, c.site.file, c.site.line,
                          (const void*)p);
}

// Every lane passed what lane 0 passed.
inline void check_same_arguments(emu::WarpCall* const* lanes) {
    const emu::WarpCall& first = *lanes[0];
    for (int l = 1; l < 32; l++) {
        const emu::WarpCall& c = *lanes[l];
        if (c.ptr[1] != first.ptr[1] || c.ldm != first.ldm || c.layout != first.layout)
            emu::device_fault("%s (%s:%d): lane %d passes pointer %p, ldm %u, layout %d, lane 0 %p, %u, %d: every lane "
                              "must pass the same", first.op, first.site.file, first.site.line, l, c.ptr[1], c.ldm,
                              c.layout, first.ptr[1], first.ldm, first.layout);
    }
}

// Every lane holds the whole tile, so every lane's copy must be the same: a
// lane that changed its fragment alone (code that assumed some mapping of
// elements to lanes) is a bug, which would go unseen if lane 0's were used.
template <class Frag>
void check_same_fragments(emu::WarpCall* const* lanes, int slot) {
    for (int l = 1; l < 32; l++)
        if (std::memcmp(lanes[l]->ptr[slot], lanes[0]->ptr[slot], sizeof(Frag)) != 0)
            emu::device_fault("%s (%s:%d): lane %d's fragment differs from lane 0's: element-wise code must treat "
                              "every element of a fragment alike (their mapping to lanes is unspecified)",
                              lanes[0]->op, lanes[0]->site.file, lanes[0]->site.line, l);
}

// The last lane to arrive runs a resolver. Its reads and writes of the
// tile's memory are that lane's accesses; reading the other lanes' calls and
// moving fragments between lanes is the emulator's (EmulatorWork).

template <class Frag, class T>
void resolve_load(emu::WarpCall* const* lanes) {
    emu::WarpCall c;
    {
        emu::EmulatorWork work;
        check_same_arguments(lanes);
        c = *lanes[0];
    }
    const T* p = static_cast<const T*>(c.ptr[1]);
    check_pointer_and_ldm(c, p);
    Frag tile;
    for (int r = 0; r < Frag::rows; r++)
        for (int k = 0; k < Frag::cols; k++)
            tile.x[r * Frag::cols + k] = c.layout == mem_row_major ? p[(size_t)r * c.ldm + k] : p[(size_t)k * c.ldm + r];
    emu::EmulatorWork work;
    for (int l = 0; l < 32; l++) std::memcpy(lanes[l]->ptr[0], &tile, sizeof(Frag));
}

template <class Frag, class T>
void resolve_store(emu::WarpCall* const* lanes) {
    emu::WarpCall c;
    Frag tile;
    {
        emu::EmulatorWork work;
        check_same_arguments(lanes);
        check_same_fragments<Frag>(lanes, 0);
        c = *lanes[0];
        std::memcpy(&tile, c.ptr[0], sizeof(Frag));
    }
    T* p = static_cast<T*>(c.ptr[1]);
    check_pointer_and_ldm(c, p);
    for (int r = 0; r < Frag::rows; r++)
        for (int k = 0; k < Frag::cols; k++)
            (c.layout == mem_row_major ? p[(size_t)r * c.ldm + k] : p[(size_t)k * c.ldm + r]) = tile.x[r * Frag::cols + k];
}

// Fragments only: all of it the emulator's work.
template <class D, class A, class B, class C>
void resolve_mma(emu::WarpCall* const* lanes) {
    emu::EmulatorWork work;
    check_same_fragments<A>(lanes, 1);
    check_same_fragments<B>(lanes, 2);
    check_same_fragments<C>(lanes, 3);
    const emu::WarpCall& c0 = *lanes[0];
    const A& a = *static_cast<const A*>(c0.ptr[1]);
    const B& b = *static_cast<const B*>(c0.ptr[2]);
    const C& c = *static_cast<const C*>(c0.ptr[3]);
    D d;  // d may be c: computed aside first
    for (int i = 0; i < D::rows; i++)
        for (int j = 0; j < D::cols; j++) {
            float acc = (float)c.x[i * C::cols + j];
            for (int k = 0; k < A::cols; k++) acc += (float)a.x[i * A::cols + k] * (float)b.x[k * B::cols + j];
            d.x[i * D::cols + j] = acc;
        }
    for (int l = 0; l < 32; l++) std::memcpy(lanes[l]->ptr[0], &d, sizeof(D));
}

template <class Frag, class T>
void load(Frag& f, const T* p, unsigned ldm, layout_t layout, emu::Site site) {
    emu::WarpCall call{"wmma::load_matrix_sync", 0xffffffffu, site, resolve_load<Frag, T>};
    call.ptr[0] = &f;
    call.ptr[1] = const_cast<T*>(p);
    call.ldm = ldm;
    call.layout = layout;
    emu::warp_rendezvous(call);
}

template <class Layout>
constexpr layout_t layout_of() {
    static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>,
                  "a matrix_a or matrix_b fragment needs a row_major or col_major layout");
    return std::is_same_v<Layout, row_major> ? mem_row_major : mem_col_major;
}

}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm, EMU_CALL_SITE) {
    static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout_t");
    detail::load(f, p, ldm, detail::layout_of<Layout>(), {emu_file, emu_line});
}

template <int M, int N, int K, class T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout, EMU_CALL_SITE) {
    detail::load(f, p, ldm, layout, {emu_file, emu_line});
}

template <int M, int N, int K, class T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout,
                       EMU_CALL_SITE) {
    using Frag = fragment<accumulator, M, N, K, T>;
    emu::WarpCall call{"wmma::store_matrix_sync", 0xffffffffu, {emu_file, emu_line}, detail::resolve_store<Frag, T>};
    call.ptr[0] = const_cast<Frag*>(&f);
    call.ptr[1] = p;
    call.ldm = ldm;
    call.layout = layout;
    emu::warp_rendezvous(call);
}

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const T& v) {
    for (int i = 0; i < f.num_elements; i++) f.x[i] = v;
}

template <int M, int N, int K, class TAB, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TAB, LA>& a,
              const fragment<matrix_b, M, N, K, TAB, LB>& b, const fragment<accumulator, M, N, K, float>& c,
              EMU_CALL_SITE) {
    using D = fragment<accumulator, M, N, K, float>;
    using A = fragment<matrix_a, M, N, K, TAB, LA>;
    using B = fragment<matrix_b, M, N, K, TAB, LB>;
    emu::WarpCall call{"wmma::mma_sync", 0xffffffffu, {emu_file, emu_line}, detail::resolve_mma<D, A, B, D>};
    call.ptr[0] = &d;
    call.ptr[1] = const_cast<A*>(&a);
    call.ptr[2] = const_cast<B*>(&b);
    call.ptr[3] = const_cast<D*>(&c);
    emu::warp_rendezvous(call);
}

}  // namespace wmma
}  // namespace nvcuda
