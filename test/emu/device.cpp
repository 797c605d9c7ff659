// test/emu/device.cpp: how the emulated GPU runs a kernel.
//
// A launch is checked as an H200 checks it (block and grid limits, shared
// memory with and without the opt-in, __launch_bounds__), then its blocks run
// one after another: in grid order, reversed, or in a seeded random order
// (EMU_SCHEDULE). A block's threads are fibers on stacks kept from launch to
// launch; a switch saves and restores six registers (a few ns).
//
// A thread runs until it waits at a barrier or a warp operation, or ends.
// Which ready thread runs next is the schedule. Natural: warp by warp, lanes
// in order, each thread handing over directly to the next ready lane of its
// warp; a warp runs until none of its lanes can move, then the next warp,
// and each time a barrier opens the order starts again from warp 0.
// Reversed: the same, last warp and last lane first. Random: every ready
// thread once per round, in a fresh random order, so warps interleave
// anywhere. A data race between two threads of a block (one writes what the
// other reads, no barrier between) gives results that depend on the
// schedule; make test compares them.
//
// A barrier opens when every live thread of the block waits at it, at the
// same source line. A warp operation completes when every lane its mask
// names has arrived at the same operation with the same mask at the same
// line; the last one to arrive computes every lane's result. What a GPU would
// hang on or refuse is a fault naming the kernel, the block and the thread:
// threads waiting at different barriers, a thread that exits while others
// wait for it at a barrier or warp operation, a mask naming lanes that are
// absent, no thread able to move. The launch stops there, and the fault is
// sticky, as after a kernel fault on a GPU.
//
// Shared memory: each __shared__ variable is allocated (and poisoned: 0xFF
// bytes, NaN as floats) when the block first reaches its declaration, and
// freed at the block's end; dynamic shared memory is a buffer of the
// launch's size, allocated and poisoned at each block's start. Separate
// allocations let AddressSanitizer see an access past any of them.
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(EMU_TSAN)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_ignore_thread_begin();  // in the runtime, not in GCC 12's header
extern "C" void __tsan_ignore_thread_end();
#endif

// The fiber switch and a fresh fiber's first code (assembly, below).
extern "C" void* emu_switch_stack(void** save_sp, void* load_sp, void* arg);
extern "C" void emu_fiber_start();
extern "C" [[noreturn]] void emu_fiber_main(void* from);

namespace emu {

Thread* current_thread = nullptr;
uint3 current_block;
dim3 current_block_dim, current_grid_dim;

namespace {

#if defined(__SANITIZE_ADDRESS__)
const size_t STACK_BYTES = 1 << 20;  // AddressSanitizer grows every frame
#else
const size_t STACK_BYTES = 256 << 10;
#endif

// One emulated thread's fiber. Its stack keeps a guard page below it.
struct Fiber {
    enum Status { Ready, AtBarrier, AtWarp, Done };
    void* sp = nullptr;                  // its stack pointer while it does not run
    char* stack = nullptr;               // lowest usable byte
    size_t color = 0;                    // bytes left free at the top, different per fiber (see new_fiber)
    bool parked = true;                  // between two threads: no kernel frames on its stack
    Thread thread;
    Status status = Done;
    WarpCall* call = nullptr;            // AtWarp: the operation it waits at
    void* fake_stack = nullptr;          // AddressSanitizer's bookkeeping across switches
    void* tsan_fiber = nullptr;          // ThreadSanitizer's thread: the same for thread t of every block
};

// The launch now running, and its block.
struct Launch {
    const char* name = nullptr;
    Site site{};
    LaunchConfig config{};
    void (*body)(void*) = nullptr;
    void* closure = nullptr;
    unsigned threads = 0;
    char* dynamic_shared = nullptr;
    bool faulted = false;
};
struct SharedVar {
    const void* tag;
    void* ptr;
};
struct Block {
    unsigned live = 0, at_barrier = 0;
    Site barrier_site{};
    unsigned long barriers = 0;        // barriers completed
    bool barrier_opened = false;       // since the scheduler last looked: it starts the block's order again
    std::vector<unsigned> arrived;     // per warp: the lanes waiting at a warp operation
    std::vector<unsigned> exited;      // per warp: the lanes that have exited
    std::vector<unsigned> present;     // per warp: the lanes that exist (a block's last warp may be partial)
    std::vector<SharedVar> shared;
    size_t static_bytes = 0;
};

std::vector<std::unique_ptr<Fiber>> fibers;
Fiber* running = nullptr;
void* scheduler_sp = nullptr;
[[maybe_unused]] const void* scheduler_stack_bottom = nullptr;  // AddressSanitizer: where the fibers return to
[[maybe_unused]] size_t scheduler_stack_size = 0;
[[maybe_unused]] void* scheduler_tsan_fiber = nullptr;
[[maybe_unused]] void* scheduler_fake_stack = nullptr;
Launch launch_now;
Block block_now;
Settings::Order order_now = Settings::Natural;  // settings().order, read once per launch
struct KernelTime {
    uint64_t launches = 0, blocks = 0;
    double seconds = 0;
};
std::map<std::string, KernelTime>& kernel_times = *new std::map<std::string, KernelTime>;  // read at exit

// kernel name -> __launch_bounds__, filled by static initialisers of the program
std::map<std::string, int>& launch_bounds() {
    static std::map<std::string, int>* bounds = new std::map<std::string, int>;
    return *bounds;
}
std::mt19937_64 schedule_rng;
bool schedule_rng_seeded = false;
std::vector<unsigned> round_order;

// ThreadSanitizer (the tsan build, EMU_TSAN): the kernels are instrumented,
// this file is not (its own bookkeeping is no GPU thread's memory access).
// Each fiber is a thread of the race detector's, switched to without
// synchronising; these are the happens-before edges a GPU has: the host's
// work before a launch, its threads' ends before the host goes on, barriers,
// and __syncwarp among its lanes. It finds races between the threads of a
// block and, in global memory, between blocks, except between threads of the
// same index in different blocks: they share a fiber, so one comes before
// the other. (Races between blocks also change results when the blocks run
// in another order, which the schedules show.)
char tsan_launch_start, tsan_launch_end, tsan_barrier, tsan_syncwarp[32];
// Allocating and poisoning shared memory happens inside a kernel's threads
// but is none of their accesses (EmulatorWork).
void poison(void* p, size_t bytes) {
    EmulatorWork work;
    memset(p, 0xFF, bytes);
}
inline void tsan_release(void* p) {
#if defined(EMU_TSAN)
    __tsan_release(p);
#else
    (void)p;
#endif
}
inline void tsan_acquire(void* p) {
#if defined(EMU_TSAN)
    __tsan_acquire(p);
#else
    (void)p;
#endif
}

// ---------------------------------------------------------------------------
// Fibers
//
// A switch saves the callee-saved registers on the current stack, stores the
// stack pointer, loads the other one's and returns there: what the x86-64
// System V ABI asks a call to preserve, and nothing more (boost.context also
// saves the FPU control words, which no kernel changes, at 3x the cost).

#if !defined(__x86_64__)
#error "the emulated device switches fibers with x86-64 assembly (test/emu/device.cpp)"
#endif
asm(R"(
    .text
    .p2align 4
    .globl emu_switch_stack
    .hidden emu_switch_stack
    .type emu_switch_stack, @function
emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    movq %rdx, %rax
    ret
    .size emu_switch_stack, .-emu_switch_stack

    .p2align 4
    .globl emu_fiber_start
    .hidden emu_fiber_start
    .type emu_fiber_start, @function
emu_fiber_start:
    movq %rax, %rdi
    call emu_fiber_main
    ud2
    .size emu_fiber_start, .-emu_fiber_start
)");
// A fresh stack, as emu_switch_stack leaves one: six zero registers (rbp = 0
// ends the frame chain for unwinders), then emu_fiber_start as the return
// address, placed so that its call finds the stack 16-byte aligned.
void make_context(Fiber* f) {
#if defined(__SANITIZE_ADDRESS__)
    __asan_unpoison_memory_region(f->stack, STACK_BYTES);  // frames abandoned at a fault
#endif
    uintptr_t top = ((uintptr_t)f->stack + STACK_BYTES - f->color) & ~(uintptr_t)15;
    void** sp = (void**)(top - 72);  // sp + 56, where emu_fiber_start calls, is 16-byte aligned
    for (int i = 0; i < 6; i++) sp[i] = nullptr;
    sp[6] = (void*)emu_fiber_start;
    f->sp = sp;
    f->fake_stack = nullptr;
    f->parked = true;
}

Fiber* new_fiber() {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void* mem = mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (mem == MAP_FAILED) {
        fprintf(stderr, "emu: error: cannot map a %zu-byte fiber stack\n", STACK_BYTES);
        exit(1);
    }
    if (mprotect(mem, page, PROT_NONE) != 0) {
        fprintf(stderr, "emu: error: cannot protect a fiber stack's guard page\n");
        exit(1);
    }
    Fiber* f = new Fiber;
    f->stack = (char*)mem + page;
#if defined(EMU_TSAN)
    f->tsan_fiber = __tsan_create_fiber(0);
#endif
    // Stacks start at different offsets within a page: otherwise the hot top frames of all 32
    // lanes of a warp fall into the same few L1 cache sets and evict each other at every switch.
    f->color = fibers.size() * 320 % page;
    make_context(f);
    return f;
}

// A switch hands the CPU from the scheduler or a fiber (null: the scheduler)
// to another; the one arriving learns who jumped. Fibers hand over to each
// other directly (the next lane of their warp), returning to the scheduler
// only when their warp cannot move on: one switch per thread per wait.
void arrive(void* from, Fiber* self) {
#if defined(__SANITIZE_ADDRESS__)
    const void* bottom = nullptr;
    size_t size = 0;
    __sanitizer_finish_switch_fiber(self ? self->fake_stack : scheduler_fake_stack, &bottom, &size);
    if (!from) {
        scheduler_stack_bottom = bottom;
        scheduler_stack_size = size;
    }
#else
    (void)from;
    (void)self;
#endif
}

// Leaves `self` for `to`; returns when something switches back to `self`.
void jump(Fiber* self, Fiber* to) {
    running = to;
    current_thread = to ? &to->thread : nullptr;
    if (to) to->parked = false;
#if defined(EMU_TSAN)
    __tsan_switch_to_fiber(to ? to->tsan_fiber : scheduler_tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(self ? &self->fake_stack : &scheduler_fake_stack, to ? to->stack : scheduler_stack_bottom,
                                   to ? STACK_BYTES : scheduler_stack_size);
#endif
    void* from = emu_switch_stack(self ? &self->sp : &scheduler_sp, to ? to->sp : scheduler_sp, self);
    arrive(from, self);
}

Fiber* next_in_warp(const Fiber* self);

// A thread waits (or has ended): the next ready lane of its warp runs, or
// the scheduler.
void yield(Fiber* self) { jump(self, next_in_warp(self)); }

void thread_exit(Fiber* f);

}  // namespace
}  // namespace emu

// Every fiber runs threads, one after another, for as long as the process lives.
extern "C" void emu_fiber_main(void* from) {
    using namespace emu;
    Fiber* self = running;
    arrive(from, self);
    for (;;) {
        tsan_acquire(&tsan_launch_start);
        launch_now.body(launch_now.closure);
        thread_exit(self);
        tsan_release(&tsan_launch_end);
        self->parked = true;
        yield(self);
    }
}

namespace emu {
namespace {

// ---------------------------------------------------------------------------
// Reports

// "0-15, 32, 40-47"
std::string ranges(const std::vector<unsigned>& ids) {
    std::string out;
    for (size_t i = 0; i < ids.size();) {
        size_t j = i;
        while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) j++;
        if (!out.empty()) out += ", ";
        out += j == i ? string_format("%u", ids[i]) : string_format("%u-%u", ids[i], ids[j]);
        i = j + 1;
    }
    return out;
}

std::string where_launched() {
    const LaunchConfig& c = launch_now.config;
    return string_format("%s<<<(%u,%u,%u), (%u,%u,%u), %zu>>> launched at %s:%d", launch_now.name, c.grid.x, c.grid.y,
                  c.grid.z, c.block.x, c.block.y, c.block.z, c.shared_bytes, launch_now.site.file,
                  launch_now.site.line);
}

std::string which_block() {
    return string_format("block (%u,%u,%u)", current_block.x, current_block.y, current_block.z);
}

std::string which_thread(const Thread& t) {
    return string_format("thread (%u,%u,%u) (warp %u, lane %u)", t.idx.x, t.idx.y, t.idx.z, t.warp, t.lane);
}

std::string at(Site s) { return string_format("%s:%d", s.file, s.line); }

// A fault of the launch now running, found by the scheduler (no thread of
// it is running).
void block_fault(const std::string& what) {
    launch_now.faulted = true;
    fault(cudaErrorLaunchFailure, "%s, %s: %s", where_launched().c_str(), which_block().c_str(), what.c_str());
}

// A fault of the thread now running: reported, and the thread never runs again.
[[noreturn]] void thread_fault(const std::string& what) {
    Fiber* self = running;
    launch_now.faulted = true;
    fault(cudaErrorLaunchFailure, "%s, %s, %s: %s", where_launched().c_str(), which_block().c_str(),
          which_thread(self->thread).c_str(), what.c_str());
    for (;;) jump(self, nullptr);  // the scheduler abandons the block and never comes back
}

// ---------------------------------------------------------------------------
// Barriers, warp operations, thread exit

const char* status_name(Fiber::Status s) {
    return s == Fiber::Ready ? "running" : s == Fiber::AtBarrier ? "at a barrier"
                                        : s == Fiber::AtWarp   ? "at a warp operation"
                                                               : "exited";
}

bool same_site(Site a, Site b) { return a.line == b.line && (a.file == b.file || strcmp(a.file, b.file) == 0); }

Fiber* fiber_of(unsigned warp, unsigned lane) {
    unsigned t = warp * 32 + lane;
    return t < launch_now.threads ? fibers[t].get() : nullptr;
}

// What the lanes of `mask` (in `warp`) are doing, grouped: "lanes 0-15 exited; lanes 16-31 at ..."
std::string describe_lanes(unsigned warp, unsigned mask) {
    std::map<std::string, std::vector<unsigned>> groups;
    for (unsigned l = 0; l < 32; l++) {
        if (!(mask >> l & 1)) continue;
        Fiber* f = fiber_of(warp, l);
        std::string what;
        if (!f) what = "do not exist (the block ends before them)";
        else if (f->status == Fiber::AtWarp)
            what = string_format("wait at %s (%s, mask 0x%08x)", f->call->op, at(f->call->site).c_str(), f->call->mask);
        else if (f->status == Fiber::AtBarrier) what = "wait at __syncthreads (" + at(block_now.barrier_site) + ")";
        else what = status_name(f->status);
        groups[what].push_back(l);
    }
    std::string out;
    for (auto& [what, lanes] : groups) out += (out.empty() ? "" : "; ") + ("lanes " + ranges(lanes) + " " + what);
    return out;
}

void release_barrier() {
    for (unsigned t = 0; t < launch_now.threads; t++)
        if (fibers[t]->status == Fiber::AtBarrier) fibers[t]->status = Fiber::Ready;
    block_now.at_barrier = 0;
    block_now.barriers++;
    block_now.barrier_opened = true;
}

void thread_exit(Fiber* f) {
    size_t copies = f->thread.async_open.size();
    for (const auto& batch : f->thread.async_committed) copies += batch.size();
    if (copies > 0)
        thread_fault(string_format("exits with %zu cp.async copies that no __pipeline_wait_prior made visible: their "
                                   "data never lands where the kernel can read it", copies));
    f->status = Fiber::Done;
    block_now.live--;
    block_now.exited[f->thread.warp] |= 1u << f->thread.lane;
    if (block_now.at_barrier > 0)
        thread_fault(string_format("exits while %u other threads of the block wait at __syncthreads (%s): every thread of "
                            "the block must reach a barrier, or none",
                            block_now.at_barrier, at(block_now.barrier_site).c_str()));
    const unsigned warp = f->thread.warp, lane = f->thread.lane, waiting = block_now.arrived[warp];
    if (waiting == 0) return;
    for (unsigned l = 0; l < 32; l++) {
        if (!(waiting >> l & 1)) continue;
        Fiber* g = fiber_of(warp, l);
        if (g->call->mask >> lane & 1)
            thread_fault(string_format("exits while lane %u waits for it at %s (%s, mask 0x%08x)", l, g->call->op,
                                at(g->call->site).c_str(), g->call->mask));
    }
}

// Every lane of the mask has arrived: check they agree, compute, release.
void complete_warp_operation(unsigned warp, WarpCall& c) {
    WarpCall* lanes[32] = {};
    for (unsigned l = 0; l < 32; l++) {
        if (!(c.mask >> l & 1)) continue;
        WarpCall* other = fiber_of(warp, l)->call;
        if ((other->op != c.op && strcmp(other->op, c.op) != 0) || other->mask != c.mask ||
            !same_site(other->site, c.site))
            thread_fault(string_format("%s (%s, mask 0x%08x) meets lane %u at %s (%s, mask 0x%08x): the lanes of a warp "
                                "operation must call the same operation with the same mask at the same place",
                                c.op, at(c.site).c_str(), c.mask, l, other->op, at(other->site).c_str(),
                                other->mask));
        lanes[l] = other;
    }
    c.resolve(lanes);
    for (unsigned l = 0; l < 32; l++)
        if (c.mask >> l & 1) fiber_of(warp, l)->status = Fiber::Ready;
    block_now.arrived[warp] &= ~c.mask;
}

}  // namespace

#if defined(EMU_TSAN)
EmulatorWork::EmulatorWork() { __tsan_ignore_thread_begin(); }
EmulatorWork::~EmulatorWork() { __tsan_ignore_thread_end(); }
#else
EmulatorWork::EmulatorWork() {}
EmulatorWork::~EmulatorWork() {}
#endif

void block_barrier(Site site) {
    Fiber* self = running;
    Block& b = block_now;
    if (b.live < launch_now.threads)
        thread_fault(string_format("reaches __syncthreads (%s) after %u threads of the block exited: every thread of the "
                            "block must reach a barrier, or none",
                            at(site).c_str(), launch_now.threads - b.live));
    if (b.at_barrier == 0) b.barrier_site = site;
    else if (!same_site(b.barrier_site, site))
        thread_fault(string_format("waits at __syncthreads (%s) while %u threads wait at __syncthreads (%s): divergent "
                            "barriers (a hang or undefined behaviour on a GPU)",
                            at(site).c_str(), b.at_barrier, at(b.barrier_site).c_str()));
    self->status = Fiber::AtBarrier;
    tsan_release(&tsan_barrier);
    if (++b.at_barrier == b.live) release_barrier();
    yield(self);
    tsan_acquire(&tsan_barrier);
}

unsigned long block_barriers_completed() { return block_now.barriers; }

void warp_rendezvous(WarpCall& c) {
    Fiber* self = running;
    const unsigned lane = self->thread.lane, warp = self->thread.warp;
    if (!(c.mask >> lane & 1))
        thread_fault(string_format("calls %s (%s) with mask 0x%08x, which does not name its own lane %u", c.op,
                            at(c.site).c_str(), c.mask, lane));
    const unsigned absent = (c.mask & ~block_now.present[warp]) | (c.mask & block_now.exited[warp]);
    if (absent) {
        const unsigned l = __builtin_ctz(absent);
        thread_fault(string_format("calls %s (%s) with mask 0x%08x, but lane %u %s: every lane of the mask must call it",
                            c.op, at(c.site).c_str(), c.mask, l,
                            fiber_of(warp, l) ? "has exited" : "does not exist (the block ends before it)"));
    }
    self->status = Fiber::AtWarp;
    self->call = &c;
    const bool syncwarp = c.resolve == resolve_nothing;  // the one warp operation that orders memory
    if (syncwarp) tsan_release(&tsan_syncwarp[warp]);
    unsigned& arrived = block_now.arrived[warp];
    arrived |= 1u << lane;
    if ((arrived & c.mask) == c.mask) complete_warp_operation(warp, c);
    yield(self);
    if (syncwarp) tsan_acquire(&tsan_syncwarp[warp]);
}

// ---------------------------------------------------------------------------
// Shuffles and votes: each lane's result from the lanes' operands.

namespace {
int checked_width(const WarpCall& c) {
    if (c.width < 1 || c.width > 32 || (c.width & (c.width - 1)) != 0)
        thread_fault(string_format("%s (%s) with width %d: the width must be a power of two in [1, 32]", c.op,
                            at(c.site).c_str(), c.width));
    return c.width;
}
// Each lane l in the mask reads the value of lane source(l, call).
template <class Source>
void resolve_from(WarpCall* const* lanes, Source source) {
    for (int l = 0; l < 32; l++) {
        if (!lanes[l]) continue;
        WarpCall& c = *lanes[l];
        const int w = checked_width(c), s = source(l, c, w);
        if (s < 0 || s >= 32 || !lanes[s])
            thread_fault(string_format("%s (%s): lane %d reads lane %d, which is not in the mask 0x%08x (undefined on a GPU)",
                                c.op, at(c.site).c_str(), l, s, c.mask));
        c.result = lanes[s]->value;
    }
}
}  // namespace

void resolve_shfl(WarpCall* const* lanes) {
    resolve_from(lanes, [](int l, const WarpCall& c, int w) { return (l & ~(w - 1)) + (c.arg & (w - 1)); });
}
void resolve_shfl_up(WarpCall* const* lanes) {
    resolve_from(lanes, [](int l, const WarpCall& c, int w) { return l % w >= c.arg ? l - c.arg : l; });
}
void resolve_shfl_down(WarpCall* const* lanes) {
    resolve_from(lanes, [](int l, const WarpCall& c, int w) { return l % w + c.arg < w ? l + c.arg : l; });
}
void resolve_shfl_xor(WarpCall* const* lanes) {
    // a lane may read an earlier segment of `width` lanes; a later one gives its own value
    resolve_from(lanes, [](int l, const WarpCall& c, int w) {
        const int s = l ^ c.arg;
        return s >= (l / w + 1) * w ? l : s;
    });
}
void resolve_ballot(WarpCall* const* lanes) {
    uint64_t ballot = 0;
    for (int l = 0; l < 32; l++)
        if (lanes[l] && lanes[l]->value) ballot |= 1ull << l;
    for (int l = 0; l < 32; l++)
        if (lanes[l]) lanes[l]->result = ballot;
}
void resolve_nothing(WarpCall* const*) {}

void device_fault(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    char what[1024];
    vsnprintf(what, sizeof(what), fmt, args);
    va_end(args);
    if (!running) {
        fprintf(stderr, "emu: error: internal: device_fault outside a kernel: %s\n", what);
        abort();
    }
    thread_fault(what);
}

// ---------------------------------------------------------------------------
// Shared memory

void* shared_storage(const void* tag, size_t bytes, size_t align, const char* name, Site site) {
    Block& b = block_now;
    for (const SharedVar& v : b.shared)
        if (v.tag == tag) return v.ptr;
    b.static_bytes = (b.static_bytes + align - 1) / align * align + bytes;
    if (b.static_bytes > STATIC_SHARED_LIMIT)
        thread_fault(string_format("__shared__ %s (%s) brings the block's static shared memory to %zu bytes: a kernel may "
                            "declare at most %zu (use dynamic shared memory beyond that)",
                            name, at(site).c_str(), b.static_bytes, STATIC_SHARED_LIMIT));
    if (b.static_bytes + launch_now.config.shared_bytes > SHARED_PER_BLOCK_OPTIN)
        thread_fault(string_format("__shared__ %s (%s): %zu bytes of static and %zu of dynamic shared memory, more than "
                            "the %zu a block can have",
                            name, at(site).c_str(), b.static_bytes, launch_now.config.shared_bytes,
                            SHARED_PER_BLOCK_OPTIN));
    void* p = nullptr;
    int err;
    {
        EmulatorWork work;
        err = posix_memalign(&p, std::max<size_t>(align, sizeof(void*)), bytes ? bytes : 1);
    }
    if (err != 0) thread_fault(string_format("cannot allocate __shared__ %s (%zu bytes)", name, bytes));
    poison(p, bytes);
    b.shared.push_back({tag, p});
    return p;
}

void* dynamic_shared_storage() { return launch_now.dynamic_shared; }

#if defined(__SANITIZE_ADDRESS__)
namespace {
// A sanitizer's report names the host frames; this names the emulated thread.
void name_thread_on_sanitizer_death() {
    if (running)
        fprintf(stderr, "emu: error: the sanitizer's report above happened in %s, %s, %s\n", where_launched().c_str(),
                which_block().c_str(), which_thread(running->thread).c_str());
}
const bool death_callback_set = (__sanitizer_set_death_callback(name_thread_on_sanitizer_death), true);
}  // namespace
#endif

bool register_launch_bounds(const char* kernel, const char* file, int line, int max_threads, int, int) {
    auto [it, fresh] = launch_bounds().emplace(kernel, max_threads);
    if (!fresh && it->second != max_threads) {
        fprintf(stderr, "emu: error: %s:%d: two kernels named %s with different __launch_bounds__ (%d, %d)\n", file,
                line, kernel, it->second, max_threads);
        exit(1);
    }
    return true;
}

// ---------------------------------------------------------------------------
// A launch

namespace {

double now_seconds() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// "ns::kernel<float, 4>" -> "kernel": how __launch_bounds__ are registered.
std::string base_name(const char* name) {
    std::string s = name;
    s = s.substr(0, s.find('<'));
    size_t colon = s.rfind("::");
    if (colon != std::string::npos) s = s.substr(colon + 2);
    while (!s.empty() && s.back() == ' ') s.pop_back();
    return s;
}

// What an H200 refuses at launch: cudaSuccess, or the error and why.
cudaError_t check_launch(const void* kernel, const LaunchConfig& c, std::string* why) {
    const dim3 b = c.block, g = c.grid;
    const uint64_t threads = (uint64_t)b.x * b.y * b.z;
    if (b.x == 0 || b.y == 0 || b.z == 0 || g.x == 0 || g.y == 0 || g.z == 0) {
        *why = "a grid or block dimension is 0";
        return cudaErrorInvalidConfiguration;
    }
    if (b.x > 1024 || b.y > 1024 || b.z > 64 || threads > (uint64_t)MAX_THREADS) {
        *why = string_format("a block of %u x %u x %u = %" PRIu64 " threads: at most 1024 x 1024 x 64, and %d in all", b.x,
                      b.y, b.z, threads, MAX_THREADS);
        return cudaErrorInvalidConfiguration;
    }
    if (g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
        *why = string_format("a grid of %u x %u x %u blocks: at most 2147483647 x 65535 x 65535", g.x, g.y, g.z);
        return cudaErrorInvalidConfiguration;
    }
    if (c.shared_bytes > SHARED_PER_BLOCK_OPTIN) {
        *why = string_format("%zu bytes of dynamic shared memory: a block can have at most %zu", c.shared_bytes,
                      SHARED_PER_BLOCK_OPTIN);
        return cudaErrorInvalidValue;
    }
    if (c.shared_bytes > max_dynamic_shared(kernel)) {
        *why = string_format("%zu bytes of dynamic shared memory, more than the kernel's limit of %zu: above %zu bytes a "
                      "kernel needs cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) "
                      "first",
                      c.shared_bytes, max_dynamic_shared(kernel), DEFAULT_DYNAMIC_SHARED);
        return cudaErrorInvalidValue;
    }
    auto bound = launch_bounds().find(base_name(launch_now.name));
    if (bound != launch_bounds().end() && threads > (uint64_t)bound->second) {
        *why = string_format("%" PRIu64 " threads per block, more than the kernel's __launch_bounds__(%d)", threads,
                      bound->second);
        return cudaErrorInvalidValue;
    }
    if (!stream_valid(c.stream)) {
        *why = "the stream is not one cudaStreamCreate made (or it was destroyed)";
        return cudaErrorInvalidResourceHandle;
    }
    return cudaSuccess;
}

void seed_schedule() {
    if (schedule_rng_seeded) return;
    schedule_rng.seed(settings().seed);
    schedule_rng_seeded = true;
}

void shuffle_order(std::vector<unsigned>& order) {
    for (size_t i = order.size(); i > 1; i--) std::swap(order[i - 1], order[schedule_rng() % i]);
}

// A block's dynamic shared memory: its own buffer, poisoned (as every block's
// shared memory is a fresh one on a GPU, not the last block's).
void allocate_dynamic_shared() {
    const size_t bytes = launch_now.config.shared_bytes;
    void* p = nullptr;
    int err;
    {
        EmulatorWork work;
        err = posix_memalign(&p, 128, bytes ? bytes : 1);
    }
    if (err != 0) {
        fprintf(stderr, "emu: error: cannot allocate %zu bytes of dynamic shared memory\n", bytes);
        exit(1);
    }
    poison(p, bytes);
    launch_now.dynamic_shared = (char*)p;
}

void free_shared() {
    for (const SharedVar& v : block_now.shared) free(v.ptr);
    block_now.shared.clear();
    block_now.static_bytes = 0;
    free(launch_now.dynamic_shared);
    launch_now.dynamic_shared = nullptr;
}

// After a fault the block's threads are left mid-kernel: their fibers start afresh.
void abandon_block() {
    for (unsigned t = 0; t < launch_now.threads; t++)
        if (!fibers[t]->parked) make_context(fibers[t].get());
    free_shared();
}

std::string deadlock_report() {
    std::map<std::string, std::vector<unsigned>> groups;
    for (unsigned t = 0; t < launch_now.threads; t++) {
        Fiber* f = fibers[t].get();
        std::string what;
        if (f->status == Fiber::AtBarrier) what = "wait at __syncthreads (" + at(block_now.barrier_site) + ")";
        else if (f->status == Fiber::AtWarp)
            what = string_format("wait at %s (%s, mask 0x%08x) for: %s", f->call->op, at(f->call->site).c_str(),
                          f->call->mask, describe_lanes(f->thread.warp, f->call->mask).c_str());
        else what = status_name(f->status);
        groups[what].push_back(t);
    }
    std::string out = "no thread can move (a hang on a GPU):";
    for (auto& [what, threads] : groups) out += " threads " + ranges(threads) + " " + what + ".";
    return out;
}

// The lanes of warp w in schedule order: 0..31, or 31..0 when reversed.
unsigned warp_lanes(unsigned w) { return std::min(32u, launch_now.threads - w * 32); }
Fiber* lane_in_order(unsigned w, unsigned j, unsigned lanes) {
    return fibers[w * 32 + (order_now == Settings::Reversed ? lanes - 1 - j : j)].get();
}

Fiber* first_ready_lane(unsigned w) {
    const unsigned lanes = warp_lanes(w);
    for (unsigned j = 0; j < lanes; j++)
        if (Fiber* f = lane_in_order(w, j, lanes); f->status == Fiber::Ready) return f;
    return nullptr;
}

// The lane after `self` in its warp's schedule order that is ready to run, or
// null: back to the scheduler (always so in the random schedule).
Fiber* next_in_warp(const Fiber* self) {
    if (order_now == Settings::Random || launch_now.faulted || block_now.barrier_opened) return nullptr;
    const unsigned w = self->thread.warp, lanes = warp_lanes(w);
    const unsigned at = order_now == Settings::Reversed ? lanes - 1 - self->thread.lane : self->thread.lane;
    for (unsigned j = at + 1; j < lanes; j++)
        if (Fiber* f = lane_in_order(w, j, lanes); f->status == Fiber::Ready) return f;
    return nullptr;
}

// Runs the block current_block; false if it faulted.
bool run_block() {
    const unsigned n = launch_now.threads;
    const dim3 bd = launch_now.config.block;
    Block& b = block_now;
    b.live = n;
    b.at_barrier = 0;
    b.barriers = 0;
    b.arrived.assign((n + 31) / 32, 0u);
    b.exited.assign((n + 31) / 32, 0u);
    b.present.assign((n + 31) / 32, ~0u);
    if (n % 32) b.present.back() = (1u << (n % 32)) - 1;
    allocate_dynamic_shared();
    uint3 idx = make_uint3(0, 0, 0);
    for (unsigned t = 0; t < n; t++) {
        Fiber* f = fibers[t].get();
        f->status = Fiber::Ready;
        f->call = nullptr;
        f->thread.async_committed.clear();
        f->thread.async_open.clear();
        f->thread.idx = idx;
        f->thread.lane = t % 32;
        f->thread.warp = t / 32;
        if (++idx.x == bd.x) {
            idx.x = 0;
            if (++idx.y == bd.y) {
                idx.y = 0;
                idx.z++;
            }
        }

    }
    const Settings::Order order = order_now;
    const unsigned warps = (n + 31) / 32;
    round_order.resize(n);
    for (;;) {
        bool ran = false;
        if (order == Settings::Random) {
            // every ready thread once, in a fresh random order: warps interleave anywhere
            for (unsigned i = 0; i < n; i++) round_order[i] = i;
            shuffle_order(round_order);
            for (unsigned t : round_order) {
                if (fibers[t]->status != Fiber::Ready) continue;
                jump(nullptr, fibers[t].get());
                ran = true;
                if (launch_now.faulted) {
                    abandon_block();
                    return false;
                }
            }
        } else {
            // warp by warp (the last first when reversed): a warp runs until none of its lanes can
            // move, so 32 fiber stacks are hot at a time, not the block's. Each jump starts at the
            // warp's first ready lane, which hands over to the next (next_in_warp). When a barrier
            // opens, the order starts again from the first warp, so that after every barrier the
            // reversed schedule runs the block exactly backwards from the natural one.
            b.barrier_opened = false;
            for (unsigned i = 0; i < warps && !b.barrier_opened; i++) {
                const unsigned w = order == Settings::Reversed ? warps - 1 - i : i;
                while (!b.barrier_opened) {
                    Fiber* f = first_ready_lane(w);
                    if (!f) break;
                    jump(nullptr, f);
                    ran = true;
                    if (launch_now.faulted) {
                        abandon_block();
                        return false;
                    }
                }
            }
        }
        if (b.live == 0) break;
        if (!ran) {
            block_fault(deadlock_report());
            abandon_block();
            return false;
        }
    }
    tsan_acquire(&tsan_launch_end);  // the block's threads are done before the host frees or reuses anything
    free_shared();
    return true;
}

}  // namespace

void run_kernel(const char* name, const void* kernel, const LaunchConfig& config, Site site,
                void (*thread_body)(void*), void* closure) {
    if (running) {
        fprintf(stderr, "emu: error: %s:%d: a kernel launched %s from inside a kernel (dynamic parallelism is not "
                        "emulated)\n", site.file, site.line, name);
        abort();
    }
    Counters& count = counters();
    count.launches++;
    note_kernel(name);
    if (has_fault()) return;  // as on a GPU after a fault: nothing more runs
    launch_now = Launch{};
    launch_now.name = name;
    launch_now.site = site;
    launch_now.config = config;
    std::string why;
    cudaError_t err = check_launch(kernel, config, &why);
    if (err != cudaSuccess) {
        launch_error(err, "%s: %s", where_launched().c_str(), why.c_str());
        return;
    }
    if (settings().trace) fprintf(stderr, "emu: launch %s\n", where_launched().c_str());
    if (settings().dry_run) return;

    const double started = settings().profile ? now_seconds() : 0;
    launch_now.body = thread_body;
    launch_now.closure = closure;
    launch_now.threads = config.block.x * config.block.y * config.block.z;
    current_block_dim = config.block;
    current_grid_dim = config.grid;
    while (fibers.size() < launch_now.threads) fibers.emplace_back(new_fiber());
#if defined(EMU_TSAN)
    if (!scheduler_tsan_fiber) scheduler_tsan_fiber = __tsan_get_current_fiber();
#endif
    tsan_release(&tsan_launch_start);

    const dim3 g = config.grid;
    const uint64_t blocks = (uint64_t)g.x * g.y * g.z;
    const Settings::Order order = order_now = settings().order;
    std::vector<unsigned> block_order;  // random: a permutation of the blocks (a larger grid goes in reverse)
    if (order == Settings::Random) seed_schedule();
    if (order == Settings::Random && blocks <= (1u << 24)) {
        block_order.resize(blocks);
        for (unsigned i = 0; i < blocks; i++) block_order[i] = i;
        shuffle_order(block_order);
    }
    for (uint64_t i = 0; i < blocks; i++) {
        const uint64_t id = !block_order.empty() ? block_order[i] : order == Settings::Natural ? i : blocks - 1 - i;
        current_block = make_uint3((unsigned)(id % g.x), (unsigned)(id / g.x % g.y), (unsigned)(id / ((uint64_t)g.x * g.y)));
        count.blocks++;
        count.threads += launch_now.threads;
        if (!run_block()) break;
    }
    tsan_acquire(&tsan_launch_end);
    if (settings().profile) {
        KernelTime& k = kernel_times[base_name(name)];
        k.launches++;
        k.blocks += blocks;
        k.seconds += now_seconds() - started;
    }
}

std::string profile_report() {
    std::vector<std::pair<std::string, KernelTime>> rows(kernel_times.begin(), kernel_times.end());
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.seconds > b.second.seconds; });
    double total = 0;
    for (const auto& r : rows) total += r.second.seconds;
    std::string out = string_format("emu: profile: %.3f s in kernels (%s schedule)\n", total, order_name());
    for (const auto& [name, k] : rows)
        out += string_format("emu: profile: %8.3f s %5.1f%%  %-36s %8" PRIu64 " launches %10" PRIu64 " blocks\n", k.seconds,
                      total > 0 ? 100 * k.seconds / total : 0.0, name.c_str(), k.launches, k.blocks);
    return out;
}

}  // namespace emu
