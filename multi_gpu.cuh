// multi_gpu.cuh: data-parallel training over several GPUs with NCCL, one
// process per GPU (SPEC: Training, "Multi-GPU"). multi_gpu.h decides the
// layout and the shards; this file moves the bytes:
//   1. start-up: the NCCL unique id travels from rank 0 to the others through
//      MPI (a build with MPI, started by mpirun) or through a file in a
//      directory every rank sees; then every rank checks that the others run
//      the same settings;
//   2. the step's traffic: the gradient buckets reduced to the rank that owns
//      them (on a stream of their own, overlapping the rest of the backward
//      pass), the gradient norm's partial sums, the new weights from their
//      owners, the router logits of a global routing pool, loss sums;
//   3. the watchdog, a thread of its own: a rank that dies or hangs shows up
//      as NCCL's asynchronous error, as a heartbeat file that stops changing,
//      or as a GPU that does not finish in time; the others then name it,
//      abort the communicator and exit.
// Everything here is a no-op with one process, so a single-GPU run takes the
// same code path; a build without NCCL refuses more than one process.
#pragma once

#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <thread>

#ifdef MULTI_GPU
#include <nccl.h>
#ifdef USE_MPI
#define OMPI_SKIP_MPICXX 1  // the C API only: MPI's C++ bindings do not compile warning-free
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif
#endif

#include "multi_gpu.h"

#ifdef MULTI_GPU
inline void nccl_check(ncclResult_t r, const char* call, const char* file, int line) {
    if (r != ncclSuccess)
        fail("NCCL: %s failed at %s:%d: %s (%s)", call, file, line, ncclGetErrorString(r), ncclGetLastError(nullptr));
}
#define ncclCheck(call) nccl_check((call), #call, __FILE__, __LINE__)

template <typename T> ncclDataType_t nccl_type();
template <> inline ncclDataType_t nccl_type<float>() { return ncclFloat32; }
template <> inline ncclDataType_t nccl_type<int>() { return ncclInt32; }
template <> inline ncclDataType_t nccl_type<__nv_bfloat16>() { return ncclBfloat16; }
#endif

struct MultiGpu {
    ProcessLayout layout;
    int rank = 0, world = 1;
    std::string dir;          // rendezvous and heartbeat files: a directory every rank sees
    std::string checkpoints;  // the run's checkpoints (a glob), named when a lost rank ends the run
    double time_limit = 45;   // -pt: seconds without progress before a rank calls the run lost
#ifdef MULTI_GPU
    ncclComm_t comm = nullptr;               // set before `joined`
    cudaStream_t grad_stream = nullptr;      // the gradient buckets' reductions
    cudaEvent_t grads_ready = nullptr;       // main stream -> grad stream: a bucket's gradients are complete
    cudaEvent_t grads_reduced = nullptr;     // grad stream -> main stream: every bucket is reduced
    cudaEvent_t step_done = nullptr;         // multi_gpu_wait's: the main stream has reached this point
#endif
    // shared between the main thread and the watchdog's
    std::atomic<bool> joined{false};   // every rank is in the communicator
    std::atomic<int> step{0};          // the steps done, for the heartbeat
    std::atomic<bool> busy{false};     // long work of this rank alone (a checkpoint, CORE): no progress expected
    std::atomic<double> progress{0};   // when the GPU last finished what was queued (steady clock, s)
    std::atomic<double> slowest{0};    // the longest healthy interval between two of those
    std::atomic<bool> stop{false}, ending{false};
    std::thread watchdog;

    bool active() const { return world > 1; }
};

inline double steady_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ----------------------------------------------------------------------------
// 3. The watchdog: a thread of each rank's own, so that nothing the main
// thread blocks in (a full launch queue behind a collective that never
// ends, NCCL's init) can hide a lost rank. Every second it rewrites the
// rank's heartbeat file, `heartbeat.<rank>` in -pd: its step and whether it
// is busy. Twice a second it looks for a lost rank:
//   - NCCL's asynchronous error on the communicator (a peer's connection
//     broke);
//   - a peer's heartbeat file that stopped changing for STALE seconds (the
//     process died, or was stopped: alive but silent);
//   - no progress of this rank's GPU work for max(-pt, 3 x the slowest step
//     so far), while no rank is busy (a hang inside a collective or a
//     kernel: the ranks furthest behind are named);
//   - before every rank joined, no join within -pt (plus a margin, so the
//     rendezvous's own, more precise, messages come first).
// The verdict prints one error line (console and train.log) naming the lost
// ranks and the last complete checkpoint, aborts the communicator (which
// NCCL allows from another thread, and which ends any collective this rank
// is stuck in) and ends the process at once, with status 1. The main thread
// also reads NCCL's error whenever it waits for the GPU (multi_gpu_wait), so
// it never goes on past a failed collective (to rename a checkpoint, say).

static const double STALE = 4;  // seconds a heartbeat may be old

inline std::string heartbeat_path(const MultiGpu& m, int rank) {
    return string_format("%s/heartbeat.%d", m.dir.c_str(), rank);
}

// This rank's heartbeat: its step and whether it is busy, written whole
// (a temp file of the writing thread's own, then rename).
inline void heartbeat_write(const MultiGpu& m) {
    const std::string path = heartbeat_path(m, m.rank);
    const std::string tmp = path + string_format(".%zu", std::hash<std::thread::id>()(std::this_thread::get_id()));
    if (FILE* f = fopen(tmp.c_str(), "w")) {
        fprintf(f, "%d %d\n", m.step.load(), m.busy ? 1 : 0);
        fclose(f);
        rename(tmp.c_str(), path.c_str());
    }
}

struct Heartbeat {
    bool seen = false, busy = false;
    int step = -1;
    double age = 0;  // seconds the file is older than this rank's own
};
// A peer's heartbeat, its age measured against this rank's own file (which
// this rank rewrites every second): both times come from the file system's
// clock, so nodes whose clocks disagree do not make a live rank look stale.
inline Heartbeat read_heartbeat(const MultiGpu& m, int rank) {
    Heartbeat h;
    struct stat s, own;
    const std::string path = heartbeat_path(m, rank);
    if (stat(path.c_str(), &s) != 0) return h;  // not started yet: a rank writes it before it joins
    h.seen = true;
    const time_t now = stat(heartbeat_path(m, m.rank).c_str(), &own) == 0 ? own.st_mtime : time(nullptr);
    h.age = difftime(now, s.st_mtime);
    if (FILE* f = fopen(path.c_str(), "r")) {
        int busy = 0;
        if (fscanf(f, "%d %d", &h.step, &busy) == 2) h.busy = busy != 0;
        fclose(f);
    }
    return h;
}

// The peers whose heartbeat is stale, in words ("" if none).
inline std::string silent_ranks(const MultiGpu& m) {
    std::string out;
    for (int r = 0; r < m.world; r++) {
        if (r == m.rank) continue;
        const Heartbeat h = read_heartbeat(m, r);
        if (h.seen && h.age > STALE)
            out += string_format("%srank %d (silent for %.0f s, last at step %d)", out.empty() ? "" : ", ", r, h.age,
                                 h.step);
    }
    return out;
}

// Who is lost, when NCCL says a peer is: the ranks whose heartbeat goes
// stale within 3 x STALE seconds, or else the ranks furthest behind. Its own
// heartbeat goes on meanwhile: the peers' age is measured against it.
inline std::string lost_ranks(const MultiGpu& m) {
    for (double waited = 0; waited <= 3 * STALE; waited += 0.5) {
        const std::string silent = silent_ranks(m);
        if (!silent.empty()) return "lost " + silent;
        std::this_thread::sleep_for(std::chrono::milliseconds(500));
        heartbeat_write(m);
    }
    int lowest = INT32_MAX;
    std::vector<int> steps(m.world, -1);
    for (int r = 0; r < m.world; r++)
        if (r != m.rank) lowest = std::min(lowest, steps[r] = read_heartbeat(m, r).step);
    std::string behind;
    for (int r = 0; r < m.world; r++)
        if (r != m.rank && steps[r] == lowest)
            behind += string_format("%srank %d (step %d)", behind.empty() ? "" : ", ", r, lowest);
    return "every rank is alive; the furthest behind, perhaps hung: " + behind;
}

// Ends the run on this rank: one error line, the communicator aborted, exit
// status 1. The first thread to get here speaks; another waits for the end.
[[noreturn]] inline void multi_gpu_lost(MultiGpu& m, const std::string& what) {
    if (m.ending.exchange(true))
        for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
    const std::vector<std::string> saved = glob_sorted(m.checkpoints);
    const std::string line =
        string_format("error: %s%s. The run stops; the last complete checkpoint is %s (resume with -y 1)\n",
                      fail_prefix.c_str(), what.c_str(), saved.empty() ? "none" : saved.back().c_str());
    fputs(line.c_str(), stderr);
    fflush(stderr);
    if (fail_log) {
        fputs(line.c_str(), fail_log);
        fflush(fail_log);
    }
    if (m.rank == 0)  // a checkpoint being written when the rank was lost is not one
        for (const std::string& partial : glob_sorted(m.checkpoints + ".tmp")) remove(partial.c_str());
#ifdef MULTI_GPU
    if (m.joined) ncclCommAbort(m.comm);
#endif
    _exit(1);
}

inline void watchdog_check(MultiGpu& m) {
    const double now = steady_seconds(), stuck = now - m.progress;
    if (!m.joined) {
        if (stuck > m.time_limit + 10)
            multi_gpu_lost(m, string_format("not every rank joined within %.0f s (-pt): a rank did not start, or "
                                             "failed before joining (see its own error)", stuck));
        return;
    }
#ifdef MULTI_GPU
    ncclResult_t async = ncclSuccess;
    if (ncclCommGetAsyncError(m.comm, &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress)
        multi_gpu_lost(m, string_format("NCCL reported %s; %s", ncclGetErrorString(async), lost_ranks(m).c_str()));
#endif
    const std::string silent = silent_ranks(m);
    if (!silent.empty()) multi_gpu_lost(m, "lost " + silent);
    bool busy = m.busy;
    for (int r = 0; r < m.world && !busy; r++) busy = r != m.rank && read_heartbeat(m, r).busy;
    const double limit = std::max(m.time_limit, 3 * m.slowest.load());
    if (!busy && stuck > limit)
        multi_gpu_lost(m, string_format("this rank's GPU work has not finished for %.0f s (-pt %.0f, or 3 x the "
                                        "slowest step); %s", stuck, m.time_limit, lost_ranks(m).c_str()));
}

inline void watchdog_start(MultiGpu& m) {
    m.progress = steady_seconds();
    m.watchdog = std::thread([&m] {
        for (int tick = 0; !m.stop; tick++) {
            if (tick % 10 == 0) heartbeat_write(m);
            if (tick % 5 == 0) watchdog_check(m);
            std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
    });
}

// Long work of this rank alone begins (busy) or ends: the other ranks wait
// for it without calling it a hang.
inline void multi_gpu_busy(MultiGpu& m, bool busy) {
    if (!busy) m.progress = steady_seconds();
    m.busy = busy;
}

// ----------------------------------------------------------------------------
// 1. Start-up.

#ifdef MULTI_GPU
// The unique id through a file: rank 0 writes it (atomically: a temp file,
// then rename), the others poll for it. The name carries the launcher's job
// id where there is one; otherwise a file older than this process by more
// than the time limit is a previous run's and is not read. Rank 0 removes it
// once every rank has joined.
inline std::string id_file_path(const MultiGpu& m) {
    std::string job;
    for (char c : m.layout.job) job += isalnum((unsigned char)c) || c == '.' ? c : '_';
    return m.dir + "/nccl_id" + (job.empty() ? "" : "." + job);
}

inline ncclUniqueId exchange_id_by_file(MultiGpu& m) {
    ncclUniqueId id;
    const std::string path = id_file_path(m);
    if (m.rank == 0) {
        ncclCheck(ncclGetUniqueId(&id));
        const std::string tmp = path + ".tmp";
        FILE* f = fopen(tmp.c_str(), "wb");
        if (!f || fwrite(&id, sizeof(id), 1, f) != 1 || fclose(f) != 0 || rename(tmp.c_str(), path.c_str()) != 0)
            fail("-pd %s: rank 0 cannot write %s (%s): the rendezvous directory must be writable by every rank",
                 m.dir.c_str(), path.c_str(), strerror(errno));
        return id;
    }
    const time_t started = time(nullptr);
    for (;;) {
        struct stat s;
        if (stat(path.c_str(), &s) == 0 && difftime(s.st_mtime, started) > -m.time_limit) {
            FILE* f = fopen(path.c_str(), "rb");
            const bool read = f && fread(&id, sizeof(id), 1, f) == 1;
            if (f) fclose(f);
            if (read) return id;
        }
        if (difftime(time(nullptr), started) > m.time_limit)
            fail("-pd %s: rank %d waited %.0f s for rank 0's %s: rank 0 did not start, or it sees another directory "
                 "(with several nodes, -pd must be on a file system every node shares)",
                 m.dir.c_str(), m.rank, m.time_limit, path.c_str());
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
}
#endif

// Before a rank takes its GPU: which one. A node runs at most one rank per
// GPU: with as many GPUs visible as ranks on the node, rank r takes GPU r;
// where the launcher gives each rank a GPU of its own (one visible), that
// one. Where CUDA cannot count them, GPU local_rank (opening it says why).
inline int multi_gpu_device(const ProcessLayout& layout) {
    int gpus = 0;
    if (layout.local_world == 1 || cudaGetDeviceCount(&gpus) != cudaSuccess) {
        cudaGetLastError();  // not this check's error to keep
        return layout.local_rank;
    }
    if (gpus == 1) return 0;
    if (layout.local_world > gpus)
        fail("%s started %d processes on this node, which has %d GPUs: one process per GPU (fewer ranks per node, "
             "or more nodes)", layout.launcher.c_str(), layout.local_world, gpus);
    return layout.local_rank;
}

// Joins the run's communicator (a no-op for one process) under the watchdog.
// checkpoints: the run's checkpoint files (a glob), for a lost rank's message.
inline void multi_gpu_init(MultiGpu* m, const ProcessLayout& layout, const std::string& dir, double time_limit,
                           const std::string& checkpoints) {
    m->layout = layout;
    m->rank = layout.rank;
    m->world = layout.world;
    m->dir = dir;
    m->time_limit = time_limit;
    m->checkpoints = checkpoints;
    if (!m->active()) return;
#ifndef MULTI_GPU
    fail("%s started %d processes, but this train_et was built without NCCL (NO_MULTI_GPU=1, or no nccl.h): "
         "rebuild it with NCCL, or start one process", layout.launcher.c_str(), layout.world);
#else
    const std::string err = make_dirs(dir);
    if (!err.empty()) fail("-pd: %s", err.c_str());
    watchdog_start(*m);
    ncclUniqueId id;
#ifdef USE_MPI
    if (layout.launcher == "mpirun") {
        MPI_Init(nullptr, nullptr);
        if (m->rank == 0) ncclCheck(ncclGetUniqueId(&id));
        if (MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD) != MPI_SUCCESS)
            fail("MPI: MPI_Bcast of the NCCL id failed on rank %d", m->rank);
    } else {
        id = exchange_id_by_file(*m);
    }
#else
    id = exchange_id_by_file(*m);
#endif
    ncclCheck(ncclCommInitRank(&m->comm, m->world, id, m->rank));
    if (m->rank == 0) remove(id_file_path(*m).c_str());
    cudaCheck(cudaStreamCreateWithFlags(&m->grad_stream, cudaStreamNonBlocking));
    cudaCheck(cudaEventCreateWithFlags(&m->grads_ready, cudaEventDisableTiming));
    cudaCheck(cudaEventCreateWithFlags(&m->grads_reduced, cudaEventDisableTiming));
    cudaCheck(cudaEventCreateWithFlags(&m->step_done, cudaEventDisableTiming));
    m->progress = steady_seconds();
    m->joined = true;
#endif
}

// Waits for the work queued so far on this GPU, reading NCCL's error while
// it waits: a lost rank ends the run here (multi_gpu_lost), so nothing after
// a failed collective happens. The watchdog times the wait.
inline void multi_gpu_wait(MultiGpu& m) {
#ifdef MULTI_GPU
    if (!m.active()) return;
    cudaCheck(cudaEventRecord(m.step_done));
    for (int polls = 0;; polls++) {
        ncclResult_t async = ncclSuccess;
        ncclCheck(ncclCommGetAsyncError(m.comm, &async));
        if (async != ncclSuccess && async != ncclInProgress)
            multi_gpu_lost(m, string_format("NCCL reported %s; %s", ncclGetErrorString(async), lost_ranks(m).c_str()));
        const cudaError_t state = cudaEventQuery(m.step_done);
        if (state == cudaSuccess) break;
        if (state != cudaErrorNotReady) cudaCheck(state);
        std::this_thread::sleep_for(std::chrono::microseconds(polls < 100 ? 20 : 1000));
    }
    const double now = steady_seconds();
    m.slowest = std::max(m.slowest.load(), now - m.progress);
    m.progress = now;
#else
    (void)m;
#endif
}

inline void multi_gpu_finish(MultiGpu& m) {
    if (m.watchdog.joinable()) {
        m.stop = true;
        m.watchdog.join();
        remove(heartbeat_path(m, m.rank).c_str());
    }
#ifdef MULTI_GPU
    if (!m.comm) return;
    ncclCheck(ncclCommDestroy(m.comm));
    m.comm = nullptr;
#ifdef USE_MPI
    if (m.layout.launcher == "mpirun") MPI_Finalize();
#endif
#endif
}

// ----------------------------------------------------------------------------
// 2. The collectives of a step. Each is a no-op with one process.

// Every rank's copy of x[0..count) replaced by the sum over ranks (the same
// bits on every rank), on the main stream.
template <typename T>
void multi_gpu_sum(MultiGpu& m, T* x, size_t count) {
#ifdef MULTI_GPU
    if (!m.active()) return;
    ncclCheck(ncclAllReduce(x, x, count, nccl_type<T>(), ncclSum, m.comm, 0));
#else
    (void)m; (void)x; (void)count;
#endif
}

// x holds world blocks of `count` floats, this rank's at block `rank`; after
// the call every rank holds every block (an all-gather in place).
inline void multi_gpu_gather(MultiGpu& m, float* x, size_t count) {
#ifdef MULTI_GPU
    if (!m.active()) return;
    ncclCheck(ncclAllGather(x + (size_t)m.rank * count, x, count, ncclFloat32, m.comm, 0));
#else
    (void)m; (void)x; (void)count;
#endif
}

// A gradient bucket [lo, hi) of the flat fp32 gradients is complete on the
// main stream: reduce (sum) each rank's part of it to that rank, on the
// gradient stream, while the main stream goes on with the backward pass.
// fp32, the gradients' own precision: the sum over ranks is then exactly
// what one GPU accumulating all the micro-batches would add up, up to order.
inline void multi_gpu_reduce_bucket(MultiGpu& m, const ShardPlan& shards, float* grads, size_t lo, size_t hi) {
#ifdef MULTI_GPU
    if (!m.active() || lo == hi) return;
    cudaCheck(cudaEventRecord(m.grads_ready, 0));
    cudaCheck(cudaStreamWaitEvent(m.grad_stream, m.grads_ready, 0));
    ncclCheck(ncclGroupStart());
    for (int r = 0; r < m.world; r++) {
        size_t a, b;
        shards.overlap(r, lo, hi, &a, &b);
        if (a < b) ncclCheck(ncclReduce(grads + a, grads + a, b - a, ncclFloat32, ncclSum, r, m.comm, m.grad_stream));
    }
    ncclCheck(ncclGroupEnd());
#else
    (void)m; (void)shards; (void)grads; (void)lo; (void)hi;
#endif
}

// The main stream waits for every bucket reduced so far.
inline void multi_gpu_buckets_done(MultiGpu& m) {
#ifdef MULTI_GPU
    if (!m.active()) return;
    cudaCheck(cudaEventRecord(m.grads_reduced, m.grad_stream));
    cudaCheck(cudaStreamWaitEvent(0, m.grads_reduced, 0));
#else
    (void)m;
#endif
}

// Each rank's slice [begin[r], begin[r + 1]) of x, sent by rank r to all
// (a broadcast per owner, in place, grouped: an all-gather of uneven parts).
template <typename T>
void multi_gpu_share_shards(MultiGpu& m, const ShardPlan& shards, T* x) {
#ifdef MULTI_GPU
    if (!m.active()) return;
    ncclCheck(ncclGroupStart());
    for (int r = 0; r < m.world; r++)
        if (shards.size(r) > 0)
            ncclCheck(ncclBroadcast(x + shards.begin[r], x + shards.begin[r], shards.size(r), nccl_type<T>(), r, m.comm,
                                    0));
    ncclCheck(ncclGroupEnd());
#else
    (void)m; (void)shards; (void)x;
#endif
}

// Parameters [lo, hi) into every rank's `out` (out[0] is parameter lo),
// each part from the rank that owns it, read from that rank's shard values
// (`shard`: element i is parameter begin[rank] + i).
inline void multi_gpu_share_range(MultiGpu& m, const ShardPlan& shards, const float* shard, float* out, size_t lo,
                                  size_t hi) {
#ifdef MULTI_GPU
    if (!m.active()) return;
    ncclCheck(ncclGroupStart());
    for (int r = 0; r < m.world; r++) {
        size_t a, b;
        shards.overlap(r, lo, hi, &a, &b);
        if (a == b) continue;
        // only the owner's send buffer is read; the others name their own receive buffer
        const float* send = r == m.rank ? shard + (a - shards.begin[r]) : out + (a - lo);
        ncclCheck(ncclBroadcast(send, out + (a - lo), b - a, ncclFloat32, r, m.comm, 0));
    }
    ncclCheck(ncclGroupEnd());
#else
    (void)m; (void)shards; (void)shard; (void)out; (void)lo; (void)hi;
#endif
}

// Each rank's shard state (shard[0..size(rank)), the slice it owns) into
// every rank's full-size `out`: for checkpoints, which hold the whole
// optimizer state whatever the number of ranks.
inline void multi_gpu_collect_shards(MultiGpu& m, const ShardPlan& shards, const float* shard, float* out) {
    cudaCheck(cudaMemcpyAsync(out + shards.begin[m.rank], shard, shards.size(m.rank) * sizeof(float),
                              cudaMemcpyDeviceToDevice));
    multi_gpu_share_shards(m, shards, out);
}

// Every rank's `value`, in rank order, on every rank (a sync: start-up and
// checkpoints). The values meet in `scratch`: device memory for world of
// them that nothing needs now (the gradients between steps).
inline std::vector<uint64_t> multi_gpu_all_values(MultiGpu& m, uint64_t value, void* scratch) {
    std::vector<uint64_t> all(m.world, value);
#ifdef MULTI_GPU
    if (!m.active()) return all;
    uint64_t* values = (uint64_t*)scratch;
    cudaCheck(cudaMemcpy(values + m.rank, &value, sizeof(uint64_t), cudaMemcpyHostToDevice));
    ncclCheck(ncclAllGather(values + m.rank, values, sizeof(uint64_t), ncclUint8, m.comm, 0));
    multi_gpu_wait(m);
    cudaCheck(cudaMemcpy(all.data(), values, m.world * sizeof(uint64_t), cudaMemcpyDeviceToHost));
#else
    (void)scratch;
#endif
    return all;
}

// The ranks whose `value` is not rank 0's, as "1, 3" ("" if none).
inline std::string multi_gpu_ranks_unlike_rank0(MultiGpu& m, uint64_t value, void* scratch) {
    const std::vector<uint64_t> all = multi_gpu_all_values(m, value, scratch);
    std::string differ;
    for (int r = 1; r < m.world; r++)
        if (all[r] != all[0]) differ += string_format("%s%d", differ.empty() ? "" : ", ", r);
    return differ;
}

// No two ranks on one GPU: each rank's host and GPU (its UUID and PCI
// address) compared with every other's, since one visible GPU per rank may
// be the launcher's binding (a GPU of its own) or several ranks on one.
inline void multi_gpu_check_devices(MultiGpu& m, const cudaDeviceProp& prop, void* scratch) {
    if (!m.active()) return;
    char host[256] = {};
    gethostname(host, sizeof(host) - 1);
    uint64_t key = settings_hash(host, strlen(host));
    key = settings_hash(&m.layout.node, sizeof(m.layout.node), key);  // Slurm's node index too: nodes simulated on one host
    key = settings_hash(&prop.uuid, sizeof(prop.uuid), key);
    const int address[3] = {prop.pciDomainID, prop.pciBusID, prop.pciDeviceID};
    key = settings_hash(address, sizeof(address), key);
    const std::vector<uint64_t> all = multi_gpu_all_values(m, key, scratch);
    for (int r = 0; r < m.world; r++)
        if (r != m.rank && all[r] == key)
            fail("ranks %d and %d run on the same GPU (%s, PCI bus %d) of %s: one process per GPU (fewer ranks per "
                 "node, or a GPU for each: CUDA_VISIBLE_DEVICES, srun --gpus-per-task=1)", std::min(r, m.rank),
                 std::max(r, m.rank), prop.name, prop.pciBusID, host);
}
