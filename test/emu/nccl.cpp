// test/emu/nccl.cpp: the NCCL calls of the emulated device, across processes.
//
// Multi-GPU training runs one process per GPU; on the emulated device one
// process per emulated GPU, all on one machine. This file defines the NCCL
// calls train_et uses, with the declarations of NCCL's own nccl.h (libnccl
// is not linked): the unique id, communicators (init, destroy, abort, count,
// rank, device, async error), AllReduce, Reduce, Broadcast, AllGather and
// ReduceScatter on int8, uint8, int32, int64, fp32 and bf16 with sum, max
// and min, and groups.
//
// Transport. ncclGetUniqueId names a POSIX shared-memory segment (random
// bytes, pid and time). ncclCommInitRank opens it, or creates it if it comes
// first (O_EXCL decides the race); it holds a header, one record per rank
// (its pid, its state: active, aborted or destroyed, and a phase counter)
// and one data slot of SLOT_BYTES per rank. Init is a barrier: it returns
// once all nranks processes have joined, and the last to join unlinks the
// name, so the segment disappears with the last process that maps it
// whatever way the processes end. Device memory is host memory here, so a
// collective moves the buffers through the slots in chunks with two barriers
// per chunk: write my part to my slot, barrier, read every slot and compute
// my output, barrier (no one overwrites a slot still being read). A barrier
// is each rank bumping its phase and waiting for every peer's to reach it.
// Kernels run at their launch in the emulator, so a collective runs whole
// inside its call, in stream order by construction, and calls inside a
// group run at their call too (every rank issues the same collectives in
// the same order).
//
// Reductions are deterministic: every rank sums (maxes, mins) the ranks'
// values in rank order 0, 1, ..., R-1 in the datatype's arithmetic (bf16
// rounds after each add, as a ring would; integers wrap), so every rank gets
// bit-identical results. NCCL's own algorithms order and round differently.
//
// Failures. The waits poll and never block forever. A peer that no longer
// exists (or is a zombie), that aborted or destroyed its communicator, or
// that does not arrive within EMU_NCCL_TIMEOUT seconds (default 600) makes a
// collective give up: it prints "emu: nccl: rank R: <call>: rank J <died |
// aborted | destroyed its communicator | did not arrive within S s>", sets
// the communicator's async error (ncclRemoteError for a dead or departed
// peer, ncclSystemError for the timeout), leaves the outputs unspecified and
// returns ncclSuccess, as real NCCL, which only enqueues: the program learns
// of it from ncclCommGetAsyncError. Every later collective on it returns at
// once. This is no CUDA fault: the program may exit cleanly after it. Init
// obeys the same limit and returns ncclSystemError itself, with the reason
// in ncclGetLastError: ranks that did not arrive in time, a joined rank that
// died, or one that gave up waiting (the join can no longer complete).
// A collective on a range outside device memory, or after a CUDA fault, is a
// fault of the device (sticky, as in runtime.cpp) and returns
// ncclUnhandledCudaError; it marks this rank aborted so that the peers stop
// waiting for it. A call the program gets wrong returns at once, before any
// exchange: ncclInvalidArgument (a null comm, a datatype or op not emulated,
// a root outside the ranks, a stream that is not live), ncclInvalidUsage (a
// ncclGroupEnd without its ncclGroupStart). EMU_DRY_RUN=1: init joins no
// one, collectives check their arguments, count and do nothing.
#include <errno.h>
#include <fcntl.h>
#include <nccl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "internal.h"

using namespace emu;

namespace {

const size_t SLOT_BYTES = 4 << 20;  // per rank: a collective moves at most this much per rank per chunk
// A unique id: this magic, 16 random bytes, the pid and the time in ns; the
// segment's name is the hex of all but the magic.
const char ID_MAGIC[8] = {'e', 'm', 'u', 'n', 'c', 'c', 'l', '1'};
const int ID_END = sizeof(ID_MAGIC) + 16 + 4 + 8;
enum State : int32_t { ACTIVE = 0, ABORTED = 1, DESTROYED = 2 };

// The segment: a Header, nranks RankRecords, then the slots (page-aligned).
// Shared between processes, so only plain integers, used with __atomic builtins.
struct Header {
    int32_t ready;   // the creator set the rest up
    int32_t nranks;
    int32_t joined;  // ranks that joined; init's barrier
};
struct alignas(64) RankRecord {
    int32_t pid;
    int32_t state;
    uint64_t phase;  // barriers passed
};

const size_t RECORDS_OFFSET = 64;  // the records start a cache line after the header
static_assert(sizeof(Header) <= RECORDS_OFFSET, "the header overlaps the records");
size_t slots_offset(int nranks) { return (RECORDS_OFFSET + nranks * sizeof(RankRecord) + 4095) / 4096 * 4096; }
size_t segment_bytes(int nranks) { return slots_offset(nranks) + nranks * SLOT_BYTES; }

std::string& last_error = *new std::string;  // ncclGetLastError's; outlives the program's statics
int group_depth = 0;

// EMU_NCCL_TIMEOUT, read at the first init: a bad value stops the program, as
// the emulator's other settings do.
double timeout_seconds() {
    static const double timeout = [] {
        const char* v = getenv("EMU_NCCL_TIMEOUT");
        if (!v) return 600.0;
        char* end = nullptr;
        double s = strtod(v, &end);
        if (*v == '\0' || *end != '\0' || !(s > 0)) {
            fprintf(stderr, "emu: error: EMU_NCCL_TIMEOUT=%s: give the seconds a wait for a peer may take (> 0)\n", v);
            exit(2);
        }
        return s;
    }();
    return timeout;
}

// A call that fails: its result, and why for ncclGetLastError.
template <class... Args>
ncclResult_t failure(ncclResult_t r, const char* fmt, Args... args) {
    last_error = string_format(fmt, args...);
    return r;
}

// A process that is gone, or a zombie no one has reaped yet (kill() still
// finds those, and a launcher may reap late).
bool process_dead(int pid) {
    if (kill(pid, 0) != 0) return errno == ESRCH;
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE* f = fopen(path, "r");
    if (!f) return true;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char* paren = strrchr(buf, ')');
    return !paren || paren[1] != ' ' || paren[2] == 'Z' || paren[2] == 'X';
}

// Polls: yield first (a peer is usually a moment behind), then sleep a
// little longer each time, up to a millisecond, so waiting ranks leave the
// few cores to the ones still computing.
struct Backoff {
    int spins = 0;
    void pause() {
        if (spins++ < 64) {
            sched_yield();
            return;
        }
        timespec ts = {0, std::min<long>(1000000, 1000L * (spins - 64))};
        nanosleep(&ts, nullptr);
    }
};

}  // namespace

struct ncclComm {
    int rank = 0, nranks = 1;
    char* segment = nullptr;  // null in a dry run
    size_t bytes = 0;
    uint64_t phase = 0;       // this rank's barriers passed
    std::atomic<ncclResult_t> async_error{ncclSuccess};  // read by other threads (a program's watchdog)

    Header* header() const { return (Header*)segment; }
    RankRecord* record(int r) const { return (RankRecord*)(segment + RECORDS_OFFSET) + r; }
    char* slot(int r) const { return segment + slots_offset(nranks) + r * SLOT_BYTES; }

    void set_state(State s) const {
        if (segment) __atomic_store_n(&record(rank)->state, (int32_t)s, __ATOMIC_RELEASE);
    }

    // Why peer j will not reach `target`, or "" once it has. Its phase is read
    // again after its state and liveness: a peer that passed the barrier and
    // then left is not a failure.
    std::string peer_gone(int j, uint64_t target) const {
        RankRecord* p = record(j);
        const char* why = nullptr;
        int32_t state = __atomic_load_n(&p->state, __ATOMIC_ACQUIRE);
        if (state == ABORTED) why = "aborted";
        else if (state == DESTROYED) why = "destroyed its communicator";
        else if (process_dead(__atomic_load_n(&p->pid, __ATOMIC_ACQUIRE))) why = "died";
        if (!why || __atomic_load_n(&p->phase, __ATOMIC_ACQUIRE) >= target) return "";
        return string_format("rank %d %s", j, why);
    }

    // A barrier: bump my phase, wait for every peer's. False (and the async
    // error set, the line printed) if a peer will not come.
    bool barrier(const char* call) {
        phase++;
        __atomic_store_n(&record(rank)->phase, phase, __ATOMIC_RELEASE);
        const double start = wall_seconds(), limit = timeout_seconds();
        for (int j = 0; j < nranks; j++) {
            Backoff backoff;
            double last_check = start;
            while (__atomic_load_n(&record(j)->phase, __ATOMIC_ACQUIRE) < phase) {
                backoff.pause();
                const double now = wall_seconds();
                if (now - last_check < 0.01) continue;  // look at the peer's health a hundred times a second
                last_check = now;
                std::string why = peer_gone(j, phase);
                ncclResult_t error = ncclRemoteError;
                if (why.empty() && now - start > limit) {
                    why = string_format("rank %d did not arrive within %g s", j, limit);
                    error = ncclSystemError;
                }
                if (why.empty()) continue;
                fprintf(stderr, "emu: nccl: rank %d: %s: %s\n", rank, call, why.c_str());
                fflush(stderr);
                async_error = error;
                failure(error, "%s: %s", call, why.c_str());
                return false;
            }
        }
        return true;
    }
};

namespace {

size_t type_bytes(ncclDataType_t t) {
    switch (t) {
        case ncclInt8:
        case ncclUint8: return 1;
        case ncclBfloat16: return 2;
        case ncclInt32:
        case ncclFloat32: return 4;
        case ncclInt64: return 8;
        default: return 0;
    }
}

template <class T>
T combine(T a, T b, ncclRedOp_t op) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        const float x = __bfloat162float(a), y = __bfloat162float(b);
        return op == ncclSum ? __float2bfloat16(x + y) : (op == ncclMax ? (x < y ? b : a) : (y < x ? b : a));
    } else {
        // integers wrap, as NCCL's do (unsigned arithmetic: no overflow in C++)
        if constexpr (std::is_integral_v<T>)
            if (op == ncclSum) return (T)((std::make_unsigned_t<T>)a + (std::make_unsigned_t<T>)b);
        return op == ncclSum ? a + b : (op == ncclMax ? (a < b ? b : a) : (b < a ? b : a));
    }
}

// out[i] = in[0][i] op in[1][i] op ... in rank order; in[r] = slots[r] + offset.
template <class T>
void reduce_slots(const ncclComm* c, size_t offset, size_t n, ncclRedOp_t op, void* out) {
    T* o = (T*)out;
    const T* first = (const T*)(c->slot(0) + offset);
    std::copy(first, first + n, o);
    for (int r = 1; r < c->nranks; r++) {
        const T* in = (const T*)(c->slot(r) + offset);
        for (size_t i = 0; i < n; i++) o[i] = combine(o[i], in[i], op);
    }
}

void reduce_slots(const ncclComm* c, ncclDataType_t t, size_t offset, size_t n, ncclRedOp_t op, void* out) {
    switch (t) {
        case ncclInt8: return reduce_slots<int8_t>(c, offset, n, op, out);
        case ncclUint8: return reduce_slots<uint8_t>(c, offset, n, op, out);
        case ncclInt32: return reduce_slots<int32_t>(c, offset, n, op, out);
        case ncclInt64: return reduce_slots<int64_t>(c, offset, n, op, out);
        case ncclFloat32: return reduce_slots<float>(c, offset, n, op, out);
        case ncclBfloat16: return reduce_slots<__nv_bfloat16>(c, offset, n, op, out);
        default: return;
    }
}

// What every collective checks before it moves anything. ncclSuccess to go
// on; `skip` true when there is nothing to do (dry run, an earlier failure,
// nothing to move) and the call returns ncclSuccess.
struct Range {
    const void* p;
    size_t bytes;
    const char* what;
};
ncclResult_t start(const char* call, ncclComm* comm, ncclDataType_t type, const ncclRedOp_t* op, int root,
                   cudaStream_t stream, std::initializer_list<Range> ranges, size_t count, bool& skip) {
    skip = true;
    if (!comm) return failure(ncclInvalidArgument, "%s: comm is null", call);
    if (type_bytes(type) == 0)
        return failure(ncclInvalidArgument, "%s: datatype %d is not emulated (int8, uint8, int32, int64, fp32, bf16)",
                       call, (int)type);
    if (op && *op != ncclSum && *op != ncclMax && *op != ncclMin)
        return failure(ncclInvalidArgument, "%s: reduction %d is not emulated (sum, max, min)", call, (int)*op);
    if (root < 0 || root >= comm->nranks)
        return failure(ncclInvalidArgument, "%s: root %d of %d ranks", call, root, comm->nranks);
    if (!stream_valid(stream)) return failure(ncclInvalidArgument, "%s: not a live stream", call);
    count_library_call();
    if (comm->async_error != ncclSuccess) return ncclSuccess;
    bool ranges_ok = !sticky_fault();
    for (const Range& r : ranges)
        if (ranges_ok && r.bytes > 0) ranges_ok = check_library_range(r.p, r.bytes, call, r.what);
    if (!ranges_ok) {
        // the device faulted: this rank will not take part, so its peers must not wait for it
        comm->set_state(ABORTED);
        comm->async_error = ncclUnhandledCudaError;
        return failure(ncclUnhandledCudaError, "%s: the emulated device faulted (emu: error above)", call);
    }
    skip = dry_run() || count == 0;
    return ncclSuccess;
}

// The chunked exchange every collective is: `elements` per rank, at most
// `per_chunk` per chunk; put(offset, n) fills my slot, take(offset, n) reads
// the slots once every rank has put.
template <class Put, class Take>
void exchange(ncclComm* c, const char* call, size_t elements, size_t per_chunk, Put put, Take take) {
    for (size_t offset = 0; offset < elements; offset += per_chunk) {
        const size_t n = std::min(per_chunk, elements - offset);
        put(offset, n);
        if (!c->barrier(call)) return;
        take(offset, n);
        if (!c->barrier(call)) return;
    }
}

void detach(ncclComm* comm, State state) {
    comm->set_state(state);
    if (comm->segment) munmap(comm->segment, comm->bytes);
    delete comm;
}

std::string segment_name(const ncclUniqueId& id) {
    std::string name = "/emu_nccl_";
    for (int i = sizeof(ID_MAGIC); i < ID_END; i++) name += string_format("%02x", (unsigned char)id.internal[i]);
    return name;
}

// Opens the segment of `name`, creating it if this rank comes first.
// Returns the mapping, or null with last_error set.
char* open_segment(const std::string& name, int nranks, const double deadline) {
    const size_t bytes = segment_bytes(nranks);
    Backoff backoff;
    while (true) {
        int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
        const bool created = fd >= 0;
        if (!created && errno == EEXIST) fd = shm_open(name.c_str(), O_RDWR, 0600);
        if (fd < 0 && errno != ENOENT) {
            failure(ncclSystemError, "ncclCommInitRank: shm_open(%s): %s", name.c_str(), strerror(errno));
            return nullptr;
        }
        if (fd >= 0) {
            if (created && ftruncate(fd, (off_t)bytes) != 0) {
                failure(ncclSystemError, "ncclCommInitRank: %zu bytes of /dev/shm%s: %s", bytes, name.c_str(),
                        strerror(errno));
                close(fd);
                shm_unlink(name.c_str());
                return nullptr;
            }
            struct stat st = {};
            while (fstat(fd, &st) == 0 && st.st_size == 0 && wall_seconds() < deadline) backoff.pause();
            if (st.st_size != (off_t)bytes) {
                close(fd);
                failure(st.st_size == 0 ? ncclSystemError : ncclInvalidArgument,
                        "ncclCommInitRank: the communicator's segment %s has %lld bytes, %zu expected for %d ranks "
                        "(did every rank pass the same nranks?)",
                        name.c_str(), (long long)st.st_size, bytes, nranks);
                return nullptr;
            }
            void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            close(fd);
            if (p == MAP_FAILED) {
                failure(ncclSystemError, "ncclCommInitRank: mmap: %s", strerror(errno));
                return nullptr;
            }
            Header* h = (Header*)p;
            if (created) {
                h->nranks = nranks;
                __atomic_store_n(&h->ready, 1, __ATOMIC_RELEASE);
            }
            return (char*)p;
        }
        // the name vanished between the two opens (its ranks gave up): try again
        if (wall_seconds() > deadline) {
            failure(ncclSystemError, "ncclCommInitRank: cannot open %s", name.c_str());
            return nullptr;
        }
        backoff.pause();
    }
}

}  // namespace

extern "C" {

ncclResult_t ncclGetVersion(int* version) {
    if (!version) return failure(ncclInvalidArgument, "ncclGetVersion: version is null");
    *version = NCCL_VERSION_CODE;
    return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t result) {
    switch (result) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error (ncclGetLastError says why)";
        case ncclSystemError: return "unhandled system error (ncclGetLastError says why)";
        case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
        case ncclInvalidArgument: return "invalid argument (ncclGetLastError says why)";
        case ncclInvalidUsage: return "invalid usage (ncclGetLastError says why)";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        default: return "unknown result code";
    }
}

const char* ncclGetLastError(ncclComm_t) { return last_error.c_str(); }

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return failure(ncclInvalidArgument, "ncclGetUniqueId: uniqueId is null");
    memset(id, 0, sizeof(*id));
    memcpy(id->internal, ID_MAGIC, sizeof(ID_MAGIC));
    char* p = id->internal + sizeof(ID_MAGIC);
    if (getrandom(p, 16, 0) != 16) return failure(ncclSystemError, "ncclGetUniqueId: getrandom: %s", strerror(errno));
    const int32_t pid = getpid();
    timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    const int64_t ns = ts.tv_sec * 1000000000ll + ts.tv_nsec;
    memcpy(p + 16, &pid, 4);
    memcpy(p + 20, &ns, 8);
    return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    if (!comm) return failure(ncclInvalidArgument, "ncclCommInitRank: comm is null");
    *comm = nullptr;
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return failure(ncclInvalidArgument, "ncclCommInitRank: rank %d of %d ranks", rank, nranks);
    if (memcmp(id.internal, ID_MAGIC, sizeof(ID_MAGIC)) != 0)
        return failure(ncclInvalidArgument, "ncclCommInitRank: the id is not one ncclGetUniqueId made");
    ncclComm* c = new ncclComm;
    c->rank = rank;
    c->nranks = nranks;
    if (dry_run()) {
        *comm = c;
        return ncclSuccess;
    }
    const double limit = timeout_seconds(), deadline = wall_seconds() + limit;
    const std::string name = segment_name(id);
    c->segment = open_segment(name, nranks, deadline);
    if (!c->segment) {
        delete c;
        return ncclSystemError;
    }
    c->bytes = segment_bytes(nranks);
    Header* h = c->header();
    Backoff backoff;
    while (!__atomic_load_n(&h->ready, __ATOMIC_ACQUIRE) && wall_seconds() < deadline) backoff.pause();
    if (!__atomic_load_n(&h->ready, __ATOMIC_ACQUIRE)) {
        munmap(c->segment, c->bytes);
        delete c;
        return failure(ncclSystemError, "ncclCommInitRank: the process that created %s never set it up", name.c_str());
    }
    if (__atomic_load_n(&h->nranks, __ATOMIC_ACQUIRE) != nranks) {
        munmap(c->segment, c->bytes);
        delete c;
        return failure(ncclInvalidArgument, "ncclCommInitRank: the ranks disagree on nranks (%d here)", nranks);
    }
    int32_t nobody = 0;
    if (!__atomic_compare_exchange_n(&c->record(rank)->pid, &nobody, (int32_t)getpid(), false, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE)) {
        munmap(c->segment, c->bytes);
        delete c;
        return failure(ncclInvalidArgument, "ncclCommInitRank: rank %d joined twice (also pid %d)", rank, nobody);
    }
    if (__atomic_add_fetch(&h->joined, 1, __ATOMIC_ACQ_REL) == nranks) shm_unlink(name.c_str());
    std::string why;
    double last_check = wall_seconds();
    while (__atomic_load_n(&h->joined, __ATOMIC_ACQUIRE) < nranks) {
        backoff.pause();
        const double now = wall_seconds();
        if (now - last_check < 0.01) continue;
        last_check = now;
        for (int j = 0; j < nranks && why.empty(); j++) {
            const int32_t pid = __atomic_load_n(&c->record(j)->pid, __ATOMIC_ACQUIRE);
            const int32_t state = __atomic_load_n(&c->record(j)->state, __ATOMIC_ACQUIRE);
            // a rank still in init is only ever aborted by giving up on the same wait
            if (pid != 0 && state != ACTIVE)
                why = string_format("rank %d gave up: ranks did not arrive within %g s", j, limit);
            else if (pid != 0 && process_dead(pid))
                why = string_format("rank %d died", j);
        }
        if (why.empty() && now > deadline) {
            int missing = 0;
            for (int j = 0; j < nranks; j++) missing += __atomic_load_n(&c->record(j)->pid, __ATOMIC_ACQUIRE) == 0;
            why = string_format("%d of %d ranks did not arrive within %g s", missing, nranks, limit);
        }
        if (why.empty()) continue;
        // Leave, unless the last rank joined meanwhile; the last to leave removes the name.
        int32_t joined = __atomic_load_n(&h->joined, __ATOMIC_ACQUIRE);
        while (joined < nranks && !__atomic_compare_exchange_n(&h->joined, &joined, joined - 1, false,
                                                               __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        }
        if (joined == nranks) break;
        if (joined == 1) shm_unlink(name.c_str());
        fprintf(stderr, "emu: nccl: rank %d: ncclCommInitRank: %s\n", rank, why.c_str());
        fflush(stderr);
        detach(c, ABORTED);
        return failure(ncclSystemError, "ncclCommInitRank: %s", why.c_str());
    }
    *comm = c;
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return failure(ncclInvalidArgument, "ncclCommDestroy: comm is null");
    detach(comm, DESTROYED);
    return ncclSuccess;
}

// Abort only marks the rank aborted, so the peers stop waiting for it: the
// mapping and the communicator stay until the process ends, because abort is
// what another thread calls (a watchdog) while this one may be inside a
// collective on the same communicator, as NCCL allows.
ncclResult_t ncclCommAbort(ncclComm_t comm) {
    if (comm) comm->set_state(ABORTED);
    return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
    if (!comm || !count) return failure(ncclInvalidArgument, "ncclCommCount: a null argument");
    *count = comm->nranks;
    return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
    if (!comm || !rank) return failure(ncclInvalidArgument, "ncclCommUserRank: a null argument");
    *rank = comm->rank;
    return ncclSuccess;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device) {
    if (!comm || !device) return failure(ncclInvalidArgument, "ncclCommCuDevice: a null argument");
    *device = 0;  // each process has its own emulated device 0
    return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* asyncError) {
    if (!comm || !asyncError) return failure(ncclInvalidArgument, "ncclCommGetAsyncError: a null argument");
    *asyncError = comm->async_error;
    return ncclSuccess;
}

ncclResult_t ncclGroupStart() {
    group_depth++;
    return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
    if (group_depth == 0) return failure(ncclInvalidUsage, "ncclGroupEnd: no ncclGroupStart to end");
    group_depth--;
    return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream) {
    const char* call = "ncclAllReduce";
    const size_t bytes = count * type_bytes(datatype);
    bool skip;
    ncclResult_t r = start(call, comm, datatype, &op, 0, stream,
                           {{sendbuff, bytes, "sendbuff"}, {recvbuff, bytes, "recvbuff"}}, count, skip);
    if (r != ncclSuccess || skip) return r;
    const size_t size = type_bytes(datatype);
    exchange(
        comm, call, count, SLOT_BYTES / size,
        [&](size_t off, size_t n) { memcpy(comm->slot(comm->rank), (const char*)sendbuff + off * size, n * size); },
        [&](size_t off, size_t n) { reduce_slots(comm, datatype, 0, n, op, (char*)recvbuff + off * size); });
    return ncclSuccess;
}

ncclResult_t ncclReduce(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, ncclRedOp_t op,
                        int root, ncclComm_t comm, cudaStream_t stream) {
    const char* call = "ncclReduce";
    const size_t bytes = count * type_bytes(datatype);
    const bool is_root = comm && comm->rank == root;
    bool skip;
    ncclResult_t r = start(call, comm, datatype, &op, root, stream,
                           {{sendbuff, bytes, "sendbuff"}, {recvbuff, is_root ? bytes : 0, "recvbuff"}}, count, skip);
    if (r != ncclSuccess || skip) return r;
    const size_t size = type_bytes(datatype);
    exchange(
        comm, call, count, SLOT_BYTES / size,
        [&](size_t off, size_t n) { memcpy(comm->slot(comm->rank), (const char*)sendbuff + off * size, n * size); },
        [&](size_t off, size_t n) {
            if (is_root) reduce_slots(comm, datatype, 0, n, op, (char*)recvbuff + off * size);
        });
    return ncclSuccess;
}

ncclResult_t ncclBroadcast(const void* sendbuff, void* recvbuff, size_t count, ncclDataType_t datatype, int root,
                           ncclComm_t comm, cudaStream_t stream) {
    const char* call = "ncclBroadcast";
    const size_t bytes = count * type_bytes(datatype);
    const bool is_root = comm && comm->rank == root;
    bool skip;
    ncclResult_t r = start(call, comm, datatype, nullptr, root, stream,
                           {{sendbuff, is_root ? bytes : 0, "sendbuff"}, {recvbuff, bytes, "recvbuff"}}, count, skip);
    if (r != ncclSuccess || skip) return r;
    const size_t size = type_bytes(datatype);
    exchange(
        comm, call, count, SLOT_BYTES / size,
        [&](size_t off, size_t n) {
            if (is_root) memcpy(comm->slot(root), (const char*)sendbuff + off * size, n * size);
        },
        [&](size_t off, size_t n) { memmove((char*)recvbuff + off * size, comm->slot(root), n * size); });
    return ncclSuccess;
}

ncclResult_t ncclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount, ncclDataType_t datatype,
                           ncclComm_t comm, cudaStream_t stream) {
    const char* call = "ncclAllGather";
    const size_t size = type_bytes(datatype), bytes = sendcount * size;
    const int nranks = comm ? comm->nranks : 1;
    bool skip;
    ncclResult_t r = start(call, comm, datatype, nullptr, 0, stream,
                           {{sendbuff, bytes, "sendbuff"}, {recvbuff, bytes * nranks, "recvbuff"}}, sendcount, skip);
    if (r != ncclSuccess || skip) return r;
    // In place (sendbuff == recvbuff + rank * sendcount), my part is in my slot before anything is written.
    exchange(
        comm, call, sendcount, SLOT_BYTES / size,
        [&](size_t off, size_t n) { memcpy(comm->slot(comm->rank), (const char*)sendbuff + off * size, n * size); },
        [&](size_t off, size_t n) {
            for (int j = 0; j < nranks; j++) memcpy((char*)recvbuff + j * bytes + off * size, comm->slot(j), n * size);
        });
    return ncclSuccess;
}

ncclResult_t ncclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount, ncclDataType_t datatype,
                               ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
    const char* call = "ncclReduceScatter";
    const size_t size = type_bytes(datatype), bytes = recvcount * size;
    const int nranks = comm ? comm->nranks : 1;
    bool skip;
    ncclResult_t r = start(call, comm, datatype, &op, 0, stream,
                           {{sendbuff, bytes * nranks, "sendbuff"}, {recvbuff, bytes, "recvbuff"}}, recvcount, skip);
    if (r != ncclSuccess || skip) return r;
    // A chunk of n elements puts n of each rank's part into my slot: part j at j * n.
    const size_t per_chunk = SLOT_BYTES / size / nranks;
    exchange(
        comm, call, recvcount, per_chunk,
        [&](size_t off, size_t n) {
            for (int j = 0; j < nranks; j++)
                memcpy(comm->slot(comm->rank) + j * n * size, (const char*)sendbuff + j * bytes + off * size, n * size);
        },
        [&](size_t off, size_t n) {
            reduce_slots(comm, datatype, comm->rank * n * size, n, op, (char*)recvbuff + off * size);
        });
    return ncclSuccess;
}

}  // extern "C"
