// test/emu/nccl_selftest.cu: the emulated NCCL (test/emu/nccl.cpp) across
// processes, one per emulated GPU as multi-GPU training runs.
//
//   nccl_selftest -n NRANKS
//
// The parent makes a unique id and forks NRANKS children per case; it checks
// their exit codes, that the communicator's shared-memory segment is gone
// afterwards, and prints one "ok/FAIL - emu-nccl: ..." line per case:
//   - every collective x datatype x op against a plain CPU computation of
//     what each rank must hold, bit for bit (rank-order reduction in the
//     datatype's arithmetic), in place and out of place, 1, an odd count
//     and more than one 4 MiB chunk, Reduce and Broadcast from every root,
//     grouped calls, the group and argument errors;
//   - a rank that exits before a collective: the others' async error is
//     ncclRemoteError within seconds, later collectives return at once,
//     ncclCommAbort returns;
//   - a rank that sleeps past EMU_NCCL_TIMEOUT=1: ncclSystemError after ~1 s;
//   - a collective on memory that is not the device's: a fault in that rank
//     (which exits non-zero, as after any fault), ncclRemoteError in the others;
//   - ncclCommInitRank with a rank missing: ncclSystemError after ~1 s.
// Under EMU_DRY_RUN=1 it checks the dry run's calls instead, in one process.
// test/emu/test_emulator.py runs it with 2 and 3 ranks, and as a dry run.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <dirent.h>
#include <nccl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "../../common.h"

namespace {

int nranks = 2;
int errors = 0;  // this child's failed checks

template <class... Args>
void fail_check(int line, const char* fmt, Args... args) {
    if (errors++ < 10)
        fprintf(stderr, "nccl_selftest: pid %d: line %d: %s\n", (int)getpid(), line,
                string_format(fmt, args...).c_str());
}
#define EXPECT(cond, ...) \
    do { if (!(cond)) fail_check(__LINE__, __VA_ARGS__); } while (0)
#define NCCL_EXPECT(call)                                                                                      \
    do {                                                                                                       \
        ncclResult_t r_ = (call);                                                                              \
        EXPECT(r_ == ncclSuccess, "%s: %s (%s)", #call, ncclGetErrorString(r_), ncclGetLastError(nullptr));  \
    } while (0)
#define CUDA_EXPECT(call)                                                                   \
    do {                                                                                    \
        cudaError_t e_ = (call);                                                            \
        EXPECT(e_ == cudaSuccess, "%s: %s", #call, cudaGetErrorString(e_));               \
    } while (0)

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

enum Collective { ALL_REDUCE, REDUCE, BROADCAST, ALL_GATHER, REDUCE_SCATTER };
const char* collective_name(Collective c) {
    const char* names[] = {"AllReduce", "Reduce", "Broadcast", "AllGather", "ReduceScatter"};
    return names[c];
}
struct Type {
    ncclDataType_t t;
    size_t bytes;
};
const Type TYPES[] = {{ncclInt8, 1},    {ncclUint8, 1},   {ncclInt32, 4},
                      {ncclInt64, 8},   {ncclFloat32, 4}, {ncclBfloat16, 2}};
const ncclRedOp_t OPS[] = {ncclSum, ncclMax, ncclMin};
size_t type_size(ncclDataType_t t) {
    for (const Type& type : TYPES)
        if (type.t == t) return type.bytes;
    return 0;
}

// Rank j's input element i of a case: random, non-zero, finite; floats with
// random mantissas so that a different summation order shows in the bits.
void fill(std::vector<unsigned char>& v, ncclDataType_t t, uint64_t seed) {
    const size_t size = type_size(t), n = v.size() / size;
    for (size_t i = 0; i < n; i++) {
        uint64_t r = splitmix(seed);
        unsigned char* p = v.data() + i * size;
        if (t == ncclFloat32) {
            const float sign = (r >> 40) & 1 ? -1 : 1;
            float f = (1.0f + (float)(r & 0xffffff) / 16777216.0f) * (float)(1 << ((r >> 24) % 8)) * sign;
            memcpy(p, &f, 4);
        } else if (t == ncclBfloat16) {
            float f = (1.0f + (float)(r & 0x7f) / 128.0f) * (float)(1 << ((r >> 8) % 8)) * ((r >> 40) & 1 ? -1 : 1);
            __nv_bfloat16 b = __float2bfloat16(f);  // exact: 7 mantissa bits
            memcpy(p, &b, 2);
        } else {
            if ((r & ((1ull << (8 * size - 1)) * 2 - 1)) == 0) r |= 1;  // non-zero in its width
            memcpy(p, &r, size);
        }
    }
}

// The reference: a op b in the datatype's arithmetic (bf16: an fp32 add
// rounded to bf16; integers wrap).
template <class T>
T apply(T a, T b, ncclRedOp_t op) {
    if (op == ncclMax) return a < b ? b : a;
    if (op == ncclMin) return b < a ? b : a;
    if constexpr (std::is_integral_v<T>) return (T)((std::make_unsigned_t<T>)a + (std::make_unsigned_t<T>)b);
    return a + b;
}
void apply(unsigned char* acc, const unsigned char* in, ncclDataType_t t, ncclRedOp_t op) {
    switch (t) {
        case ncclInt8: *(int8_t*)acc = apply(*(int8_t*)acc, *(const int8_t*)in, op); break;
        case ncclUint8: *acc = apply(*acc, *in, op); break;
        case ncclInt32: *(int32_t*)acc = apply(*(int32_t*)acc, *(const int32_t*)in, op); break;
        case ncclInt64: *(int64_t*)acc = apply(*(int64_t*)acc, *(const int64_t*)in, op); break;
        case ncclFloat32: *(float*)acc = apply(*(float*)acc, *(const float*)in, op); break;
        default: {
            const float a = __bfloat162float(*(__nv_bfloat16*)acc), b = __bfloat162float(*(const __nv_bfloat16*)in);
            *(__nv_bfloat16*)acc = __float2bfloat16(apply(a, b, op));
        }
    }
}

struct Case {
    Collective c;
    ncclDataType_t t;
    ncclRedOp_t op;
    size_t count;  // per rank: AllGather's sendcount, ReduceScatter's recvcount
    int root;
    bool in_place;
};

std::string describe(const Case& k) {
    char buf[160];
    snprintf(buf, sizeof(buf), "%s type %d op %d count %zu root %d %s", collective_name(k.c), (int)k.t, (int)k.op,
             k.count, k.root, k.in_place ? "in place" : "out of place");
    return buf;
}

// Runs one case on this rank and compares what it holds with the CPU's answer.
void run_case(ncclComm_t comm, int rank, const Case& k, uint64_t seed, cudaStream_t stream) {
    const size_t size = type_size(k.t), n = k.count;
    const bool reduces = k.c == ALL_REDUCE || k.c == REDUCE || k.c == REDUCE_SCATTER;
    const size_t send_n = k.c == REDUCE_SCATTER ? n * nranks : n;
    const size_t recv_n = k.c == ALL_GATHER ? n * nranks : n;
    std::vector<std::vector<unsigned char>> in(nranks, std::vector<unsigned char>(send_n * size));
    for (int j = 0; j < nranks; j++) fill(in[j], k.t, seed * 131 + j);
    // what this rank must hold in recvbuff
    std::vector<unsigned char> want(recv_n * size);
    switch (k.c) {
        case ALL_REDUCE:
        case REDUCE:
        case REDUCE_SCATTER: {
            const size_t part = k.c == REDUCE_SCATTER ? rank * n * size : 0;
            memcpy(want.data(), in[0].data() + part, n * size);
            for (int j = 1; j < nranks; j++)
                for (size_t i = 0; i < n; i++) apply(&want[i * size], &in[j][part + i * size], k.t, k.op);
            break;
        }
        case BROADCAST: want = in[k.root]; break;
        case ALL_GATHER:
            for (int j = 0; j < nranks; j++) memcpy(want.data() + j * n * size, in[j].data(), n * size);
            break;
    }
    // Reduce leaves a non-root's recvbuff alone: its poison, or its input in place.
    const bool untouched = k.c == REDUCE && rank != k.root;
    void *send = nullptr, *recv = nullptr;
    CUDA_EXPECT(cudaMalloc(&recv, std::max(send_n, recv_n) * size));
    if (!k.in_place) CUDA_EXPECT(cudaMalloc(&send, send_n * size));
    if (k.in_place) {
        if (k.c == ALL_GATHER) send = (char*)recv + rank * n * size;
        else send = recv;
    }
    CUDA_EXPECT(cudaMemcpy(send, in[rank].data(), send_n * size, cudaMemcpyHostToDevice));
    if (k.c == REDUCE_SCATTER && k.in_place) recv = (char*)send + rank * n * size;
    if (untouched) {
        if (k.in_place) want.assign(in[rank].begin(), in[rank].end());
        else want.assign(recv_n * size, 0xFF);
    }
    ncclResult_t r = ncclSuccess;
    switch (k.c) {
        case ALL_REDUCE: r = ncclAllReduce(send, recv, n, k.t, k.op, comm, stream); break;
        case REDUCE: r = ncclReduce(send, recv, n, k.t, k.op, k.root, comm, stream); break;
        case BROADCAST: r = ncclBroadcast(send, recv, n, k.t, k.root, comm, stream); break;
        case ALL_GATHER: r = ncclAllGather(send, recv, n, k.t, comm, stream); break;
        case REDUCE_SCATTER: r = ncclReduceScatter(send, recv, n, k.t, k.op, comm, stream); break;
    }
    EXPECT(r == ncclSuccess, "%s: %s", describe(k).c_str(), ncclGetErrorString(r));
    std::vector<unsigned char> got(want.size());
    CUDA_EXPECT(cudaMemcpy(got.data(), recv, got.size(), cudaMemcpyDeviceToHost));
    size_t bad = 0;
    for (size_t i = 0; i < got.size() / size && bad == 0; i++)
        if (memcmp(&got[i * size], &want[i * size], size) != 0) bad = i + 1;
    EXPECT(bad == 0, "rank %d: %s: element %zu differs from the CPU's%s", rank, describe(k).c_str(), bad - 1,
           reduces ? " (rank-order reduction)" : "");
    if (k.c == REDUCE_SCATTER && k.in_place) recv = send;
    CUDA_EXPECT(cudaFree(recv));
    if (!k.in_place) CUDA_EXPECT(cudaFree(send));
}

ncclComm_t join(const ncclUniqueId& id, int rank) {
    ncclComm_t comm = nullptr;
    ncclResult_t r = ncclCommInitRank(&comm, nranks, id, rank);
    if (r != ncclSuccess) {
        fprintf(stderr, "nccl_selftest: rank %d: ncclCommInitRank: %s: %s\n", rank, ncclGetErrorString(r),
                ncclGetLastError(nullptr));
        exit(1);
    }
    return comm;
}

int collectives(const ncclUniqueId& id, int rank) {
    setenv("EMU_NCCL_TIMEOUT", "120", 0);  // a bug here fails in minutes, not the default 10
    ncclComm_t comm = join(id, rank);
    int count = -1, me = -1, device = -1, version = 0;
    NCCL_EXPECT(ncclCommCount(comm, &count));
    NCCL_EXPECT(ncclCommUserRank(comm, &me));
    NCCL_EXPECT(ncclCommCuDevice(comm, &device));
    NCCL_EXPECT(ncclGetVersion(&version));
    EXPECT(count == nranks && me == rank && device == 0 && version == NCCL_VERSION_CODE,
           "count %d, rank %d, device %d, version %d", count, me, device, version);
    cudaStream_t stream;
    CUDA_EXPECT(cudaStreamCreate(&stream));
    // Every rank builds the same list, so the collectives match.
    std::vector<Case> cases;
    for (const Type& type : TYPES) {
        const ncclDataType_t t = type.t;
        const size_t big = (4u << 20) * 9 / 8 / type.bytes + 3;  // more than one 4 MiB chunk, odd
        for (size_t n : {(size_t)1, (size_t)37, big}) {
            for (bool in_place : {false, true}) {
                for (ncclRedOp_t op : OPS) {
                    if (n == big && op != ncclSum) continue;  // big sizes test the chunking; small ones the ops
                    cases.push_back({ALL_REDUCE, t, op, n, 0, in_place});
                    cases.push_back({REDUCE_SCATTER, t, op, n, 0, in_place});
                    for (int root = 0; root < nranks; root++)
                        if (n != big || root == nranks - 1) cases.push_back({REDUCE, t, op, n, root, in_place});
                }
                cases.push_back({ALL_GATHER, t, ncclSum, n, 0, in_place});
                for (int root = 0; root < nranks; root++)
                    if (n != big || root == nranks - 1) cases.push_back({BROADCAST, t, ncclSum, n, root, in_place});
            }
        }
    }
    for (size_t i = 0; i < cases.size(); i++) run_case(comm, rank, cases[i], i + 1, i % 2 ? stream : nullptr);

    // Grouped (and nested) calls run as they are issued; the group calls must balance.
    const size_t n = 1001;
    std::vector<std::vector<float>> in(nranks, std::vector<float>(n)), want(3, std::vector<float>(n, 0));
    float *d[3];
    for (int b = 0; b < 3; b++) CUDA_EXPECT(cudaMalloc(&d[b], n * sizeof(float)));
    for (int b = 0; b < 3; b++) {
        for (int j = 0; j < nranks; j++)
            for (size_t i = 0; i < n; i++) in[j][i] = (float)((b + 1) * (j + 1)) + (float)i / 1024.0f;
        for (int j = 0; j < nranks; j++)
            for (size_t i = 0; i < n; i++) want[b][i] += in[j][i];
        CUDA_EXPECT(cudaMemcpy(d[b], in[rank].data(), n * sizeof(float), cudaMemcpyHostToDevice));
    }
    NCCL_EXPECT(ncclGroupStart());
    NCCL_EXPECT(ncclAllReduce(d[0], d[0], n, ncclFloat32, ncclSum, comm, stream));
    NCCL_EXPECT(ncclGroupStart());
    NCCL_EXPECT(ncclAllReduce(d[1], d[1], n, ncclFloat32, ncclSum, comm, stream));
    NCCL_EXPECT(ncclGroupEnd());
    NCCL_EXPECT(ncclAllReduce(d[2], d[2], n, ncclFloat32, ncclSum, comm, stream));
    NCCL_EXPECT(ncclGroupEnd());
    for (int b = 0; b < 3; b++) {
        std::vector<float> got(n);
        CUDA_EXPECT(cudaMemcpy(got.data(), d[b], n * sizeof(float), cudaMemcpyDeviceToHost));
        EXPECT(memcmp(got.data(), want[b].data(), n * sizeof(float)) == 0, "grouped AllReduce %d differs", b);
        CUDA_EXPECT(cudaFree(d[b]));
    }
    EXPECT(ncclGroupEnd() == ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart must be ncclInvalidUsage");
    EXPECT(ncclAllReduce(nullptr, nullptr, 1, ncclFloat64, ncclSum, comm, stream) == ncclInvalidArgument,
           "an unemulated datatype must be ncclInvalidArgument");
    EXPECT(ncclBroadcast(nullptr, nullptr, 1, ncclFloat32, nranks, comm, stream) == ncclInvalidArgument,
           "a root past the last rank must be ncclInvalidArgument");
    ncclResult_t async = ncclInternalError;
    NCCL_EXPECT(ncclCommGetAsyncError(comm, &async));
    EXPECT(async == ncclSuccess, "async error %s", ncclGetErrorString(async));
    CUDA_EXPECT(cudaStreamDestroy(stream));
    NCCL_EXPECT(ncclCommDestroy(comm));
    return errors ? 1 : 0;
}

// One AllReduce that a peer will not complete: it must return ncclSuccess,
// with `want` as the async error, after about `seconds_min` and within
// `seconds_max` seconds; then a later collective returns at once, and
// ncclCommAbort returns.
void expect_failed_all_reduce(ncclComm_t comm, ncclResult_t want, double seconds_min, double seconds_max) {
    float* x;
    CUDA_EXPECT(cudaMalloc(&x, 1000 * sizeof(float)));
    CUDA_EXPECT(cudaMemset(x, 0, 1000 * sizeof(float)));
    const double start = wall_seconds();
    NCCL_EXPECT(ncclAllReduce(x, x, 1000, ncclFloat32, ncclSum, comm, nullptr));
    const double took = wall_seconds() - start;
    ncclResult_t async = ncclSuccess;
    NCCL_EXPECT(ncclCommGetAsyncError(comm, &async));
    EXPECT(async == want, "async error %s, expected %s", ncclGetErrorString(async), ncclGetErrorString(want));
    EXPECT(took >= seconds_min && took <= seconds_max, "the AllReduce gave up after %.2f s, expected %.1f to %.1f s",
           took, seconds_min, seconds_max);
    const double again = wall_seconds();
    NCCL_EXPECT(ncclAllReduce(x, x, 1000, ncclFloat32, ncclSum, comm, nullptr));
    EXPECT(wall_seconds() - again < 0.5, "a collective after the failure took %.2f s", wall_seconds() - again);
    NCCL_EXPECT(ncclCommAbort(comm));
    CUDA_EXPECT(cudaFree(x));
}

int peer_exits(const ncclUniqueId& id, int rank) {
    ncclComm_t comm = join(id, rank);
    if (rank == nranks - 1) _exit(7);
    expect_failed_all_reduce(comm, ncclRemoteError, 0, 5);
    return errors ? 1 : 0;
}

int peer_sleeps(const ncclUniqueId& id, int rank) {
    setenv("EMU_NCCL_TIMEOUT", "1", 1);
    ncclComm_t comm = join(id, rank);
    if (rank == nranks - 1) {
        sleep(6);  // past the peers' 1 s with a margin for a loaded machine
        // by now the peers gave up and aborted (or exited): this rank learns it at once
        expect_failed_all_reduce(comm, ncclRemoteError, 0, 1);
    } else {
        expect_failed_all_reduce(comm, ncclSystemError, 0.9, 5);
    }
    return errors ? 1 : 0;
}

int bad_pointer(const ncclUniqueId& id, int rank) {
    ncclComm_t comm = join(id, rank);
    if (rank == nranks - 1) {
        std::vector<float> host(1000);
        ncclResult_t r = ncclAllReduce(host.data(), host.data(), 1000, ncclFloat32, ncclSum, comm, nullptr);
        EXPECT(r == ncclUnhandledCudaError, "an AllReduce on host memory returned %s", ncclGetErrorString(r));
        NCCL_EXPECT(ncclCommAbort(comm));
        return errors ? 1 : 3;  // the emulator turns the fault into exit status 1 at exit
    }
    expect_failed_all_reduce(comm, ncclRemoteError, 0, 5);
    return errors ? 1 : 0;
}

int missing_peer(const ncclUniqueId& id, int rank) {
    setenv("EMU_NCCL_TIMEOUT", "1", 1);
    ncclComm_t comm = nullptr;
    const double start = wall_seconds();
    ncclResult_t r = ncclCommInitRank(&comm, nranks, id, rank);
    const double took = wall_seconds() - start;
    EXPECT(r == ncclSystemError && comm == nullptr, "ncclCommInitRank returned %s", ncclGetErrorString(r));
    EXPECT(strstr(ncclGetLastError(nullptr), "did not arrive within 1 s"), "ncclGetLastError: %s",
           ncclGetLastError(nullptr));
    EXPECT(took >= 0.9 && took <= 5, "init gave up after %.2f s", took);
    return errors ? 1 : 0;
}

// Forks `children` ranks running `body`; true if each exits with its
// expected status (0, or `last_status` for the last rank) and the
// communicator's segment is gone.
bool run_ranks(const char* name, int children, int (*body)(const ncclUniqueId&, int), int last_status = 0) {
    ncclUniqueId id;
    if (ncclGetUniqueId(&id) != ncclSuccess) {
        printf("FAIL - emu-nccl: %d ranks: %s: ncclGetUniqueId: %s\n", nranks, name, ncclGetLastError(nullptr));
        return false;
    }
    fflush(stdout);
    fflush(stderr);
    std::vector<pid_t> pids;
    for (int rank = 0; rank < children; rank++) {
        pid_t pid = fork();
        if (pid == 0) exit(body(id, rank));
        pids.push_back(pid);
    }
    std::string why;
    for (int done = 0; done < children; done++) {
        int status = 0;
        pid_t pid = waitpid(-1, &status, 0);  // any child: a dead rank is reaped at once
        int rank = 0;
        while (rank < children && pids[rank] != pid) rank++;
        const int want = rank == nranks - 1 ? last_status : 0;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != want)
            why += string_format(" rank %d exited with status %d, expected %d;", rank,
                                 WIFEXITED(status) ? WEXITSTATUS(status) : -1, want);
    }
    // the segment's name is the id's bytes 8 to 35 in hex (nccl.cpp's segment_name)
    std::string segment = "/dev/shm/emu_nccl_";
    for (int i = 8; i < 36; i++) segment += string_format("%02x", (unsigned char)id.internal[i]);
    if (access(segment.c_str(), F_OK) == 0) {
        why += " " + segment + " was left behind;";
        unlink(segment.c_str());
    }
    printf("%s - emu-nccl: %d ranks: %s%s\n", why.empty() ? "ok" : "FAIL", nranks, name, why.c_str());
    fflush(stdout);
    return why.empty();
}

// EMU_DRY_RUN=1: init joins no one, and the collectives check their
// arguments and return without moving anything.
bool dry_run_calls() {
    ncclUniqueId id;
    ncclComm_t comm = nullptr;
    NCCL_EXPECT(ncclGetUniqueId(&id));
    const double start = wall_seconds();
    NCCL_EXPECT(ncclCommInitRank(&comm, nranks, id, nranks - 1));
    EXPECT(wall_seconds() - start < 0.5, "a dry run's init waited %.2f s", wall_seconds() - start);
    int count = 0, rank = -1;
    NCCL_EXPECT(ncclCommCount(comm, &count));
    NCCL_EXPECT(ncclCommUserRank(comm, &rank));
    EXPECT(count == nranks && rank == nranks - 1, "count %d, rank %d", count, rank);
    float *send, *recv;
    CUDA_EXPECT(cudaMalloc(&send, 1000 * nranks * sizeof(float)));
    CUDA_EXPECT(cudaMalloc(&recv, 1000 * nranks * sizeof(float)));
    NCCL_EXPECT(ncclAllReduce(send, recv, 1000, ncclFloat32, ncclSum, comm, nullptr));
    NCCL_EXPECT(ncclReduce(send, recv, 1000, ncclFloat32, ncclSum, 0, comm, nullptr));
    NCCL_EXPECT(ncclBroadcast(send, recv, 1000, ncclFloat32, 0, comm, nullptr));
    NCCL_EXPECT(ncclAllGather(send, recv, 1000, ncclFloat32, comm, nullptr));
    NCCL_EXPECT(ncclReduceScatter(send, recv, 1000, ncclFloat32, ncclSum, comm, nullptr));
    EXPECT(ncclAllReduce(send, recv, 1000, ncclFloat64, ncclSum, comm, nullptr) == ncclInvalidArgument,
           "a dry run must still check the datatype");
    NCCL_EXPECT(ncclCommDestroy(comm));
    printf("%s - emu-nccl: dry run: init of rank %d of %d returns at once, collectives check and return\n",
           errors ? "FAIL" : "ok", nranks - 1, nranks);
    return errors == 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc == 3 && std::string(argv[1]) == "-n") nranks = atoi(argv[2]);
    if (argc != 3 || std::string(argv[1]) != "-n" || nranks < 2) {
        fprintf(stderr, "usage: nccl_selftest -n NRANKS (2 or more)\n");
        return 2;
    }
    if (emu::dry_run()) return dry_run_calls() ? 0 : 1;
    bool ok = run_ranks("every collective x datatype x op, bit-identical to the CPU's rank-order result, in place and "
                        "out of place, every root, beyond one chunk, groups, argument errors",
                        nranks, collectives);
    ok &= run_ranks("a rank exits before a collective: ncclRemoteError in the others within seconds, abort returns",
                    nranks, peer_exits, 7);
    ok &= run_ranks("a rank sleeps past EMU_NCCL_TIMEOUT=1: ncclSystemError after about 1 s", nranks, peer_sleeps);
    ok &= run_ranks("a collective on host memory faults in that rank, ncclRemoteError in the others", nranks,
                    bad_pointer, 1);
    ok &= run_ranks("ncclCommInitRank with a rank missing: ncclSystemError after EMU_NCCL_TIMEOUT=1", nranks - 1,
                    missing_peer);
    return ok ? 0 : 1;
}
