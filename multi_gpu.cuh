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
//   3. the watchdog: no wait for the GPU is unbounded. A rank that dies or
//      hangs shows up as NCCL's asynchronous error or as a GPU that does not
//      finish in time; the others then name it (from the heartbeat files each
//      rank refreshes every second), abort the communicator and exit.
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
    std::string dir;         // rendezvous and heartbeat files: a directory every rank sees
    double time_limit = 60;  // seconds a rank waits for the GPU (or a peer) before it calls the run lost
    double slowest_wait = 0; // the longest a healthy wait took: the limit grows with it
#ifdef MULTI_GPU
    ncclComm_t comm = nullptr;
    cudaStream_t grad_stream = nullptr;      // the gradient buckets' reductions
    cudaEvent_t grads_ready = nullptr;       // main stream -> grad stream: a bucket's gradients are complete
    cudaEvent_t grads_reduced = nullptr;     // grad stream -> main stream: every bucket is reduced
    cudaEvent_t step_done = nullptr;         // the watchdog's: the main stream has reached this point
#endif
    std::atomic<int> heartbeat_step{0};
    std::atomic<bool> heartbeat_stop{false};
    std::thread heartbeat;

    bool active() const { return world > 1; }
};

// ----------------------------------------------------------------------------
// 3. Heartbeats: each rank's file `heartbeat.<rank>` holds its step, rewritten
// every second by a thread of its own. A survivor names the ranks whose file
// stopped changing (dead) or, if every file is fresh, the ranks furthest
// behind (hung inside a step).

inline std::string heartbeat_path(const MultiGpu& m, int rank) {
    return string_format("%s/heartbeat.%d", m.dir.c_str(), rank);
}

inline void heartbeat_start(MultiGpu& m) {
    m.heartbeat = std::thread([&m] {
        const std::string path = heartbeat_path(m, m.rank), tmp = path + ".tmp";
        while (!m.heartbeat_stop) {
            if (FILE* f = fopen(tmp.c_str(), "w")) {
                fprintf(f, "%d\n", m.heartbeat_step.load());
                fclose(f);
                rename(tmp.c_str(), path.c_str());
            }
            for (int i = 0; i < 10 && !m.heartbeat_stop; i++) std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
    });
}

inline void heartbeat_stop(MultiGpu& m) {
    if (!m.heartbeat.joinable()) return;
    m.heartbeat_stop = true;
    m.heartbeat.join();
    remove(heartbeat_path(m, m.rank).c_str());
}

// Which ranks are lost, in words. A dead rank's file stops changing at once
// and is stale STALE seconds later; this waits up to 3 x STALE for one.
inline std::string lost_ranks(const MultiGpu& m) {
    const double STALE = 4;
    std::string dead, behind;
    for (int attempt = 0; attempt <= 6 * STALE && dead.empty(); attempt++) {  // every half second
        if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(500));
        int lowest = INT32_MAX;
        std::vector<int> steps(m.world, -1);
        behind.clear();
        for (int r = 0; r < m.world; r++) {
            if (r == m.rank) continue;
            struct stat s;
            const std::string path = heartbeat_path(m, r);
            FILE* f = stat(path.c_str(), &s) == 0 ? fopen(path.c_str(), "r") : nullptr;
            const double age = f ? difftime(time(nullptr), s.st_mtime) : 1e9;
            if (f) {
                if (fscanf(f, "%d", &steps[r]) != 1) steps[r] = -1;
                fclose(f);
            }
            if (age > STALE)
                dead += string_format("%srank %d (%s)", dead.empty() ? "" : ", ", r,
                                      f ? string_format("silent for %.0f s, last at step %d", age, steps[r]).c_str()
                                        : "no heartbeat file");
            lowest = std::min(lowest, steps[r]);
        }
        for (int r = 0; r < m.world; r++)
            if (r != m.rank && steps[r] == lowest)
                behind += string_format("%srank %d (step %d)", behind.empty() ? "" : ", ", r, lowest);
    }
    if (!dead.empty()) return "lost " + dead;
    return "every rank is alive; the furthest behind, perhaps hung: " + behind;
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

// Before a rank takes its GPU: a node runs at most one rank per GPU (where
// CUDA can count them; if it cannot, opening the GPU says why).
inline void multi_gpu_check_node(const ProcessLayout& layout) {
    int gpus = 0;
    if (layout.local_world == 1 || cudaGetDeviceCount(&gpus) != cudaSuccess) {
        cudaGetLastError();  // not this check's error to keep
        return;
    }
    if (layout.local_world > gpus)
        fail("%s started %d processes on this node, which has %d GPU%s: one process per GPU (fewer ranks per node, "
             "or more nodes)", layout.launcher.c_str(), layout.local_world, gpus, gpus == 1 ? "" : "s");
}

// Joins the run's communicator (a no-op for one process) and starts the
// heartbeat.
inline void multi_gpu_init(MultiGpu* m, const ProcessLayout& layout, const std::string& dir, double time_limit) {
    m->layout = layout;
    m->rank = layout.rank;
    m->world = layout.world;
    m->dir = dir;
    m->time_limit = time_limit;
    if (!m->active()) return;
#ifndef MULTI_GPU
    fail("%s started %d processes, but this train_et was built without NCCL (NO_MULTI_GPU=1, or no nccl.h): "
         "rebuild it with NCCL, or start one process", layout.launcher.c_str(), layout.world);
#else
    const std::string err = make_dirs(dir);
    if (!err.empty()) fail("-pd: %s", err.c_str());
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
    heartbeat_start(*m);
#endif
}

// ----------------------------------------------------------------------------
// 3. The watchdog. Returns "" when the work queued so far has finished on
// this GPU with no NCCL error, else what was lost (after aborting the
// communicator, so nothing of this process waits on it any more).
inline std::string multi_gpu_wait(MultiGpu& m) {
#ifdef MULTI_GPU
    if (!m.active()) return "";
    cudaCheck(cudaEventRecord(m.step_done));
    const double limit = std::max(m.time_limit, 4 * m.slowest_wait);
    const auto start = std::chrono::steady_clock::now();
    for (int polls = 0;; polls++) {
        ncclResult_t async = ncclSuccess;
        ncclCheck(ncclCommGetAsyncError(m.comm, &async));
        const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::string why;
        if (async != ncclSuccess && async != ncclInProgress)
            why = string_format("NCCL reported %s", ncclGetErrorString(async));
        else if (waited > limit)
            why = string_format("the GPU's work, collectives included, did not finish within %.0f s (-pt)", limit);
        if (!why.empty()) {
            const std::string lost = lost_ranks(m);
            ncclCommAbort(m.comm);
            m.comm = nullptr;
            return why + "; " + lost;
        }
        const cudaError_t state = cudaEventQuery(m.step_done);
        if (state == cudaSuccess) {
            m.slowest_wait = std::max(m.slowest_wait, waited);
            return "";
        }
        if (state != cudaErrorNotReady) cudaCheck(state);
        std::this_thread::sleep_for(std::chrono::microseconds(polls < 100 ? 20 : 1000));
    }
#else
    (void)m;
    return "";
#endif
}

inline void multi_gpu_finish(MultiGpu& m) {
    heartbeat_stop(m);
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

// The ranks whose `value` is not rank 0's, as "1, 3" ("" if none), on every
// rank (a sync: start-up and checkpoints). The values meet in `scratch`:
// device memory for world of them that nothing needs now (the gradients
// between steps). A lost rank ends the run here, as anywhere.
inline std::string multi_gpu_ranks_unlike_rank0(MultiGpu& m, uint64_t value, void* scratch) {
    std::string differ;
#ifdef MULTI_GPU
    if (!m.active()) return differ;
    uint64_t* values = (uint64_t*)scratch;
    cudaCheck(cudaMemcpy(values + m.rank, &value, sizeof(uint64_t), cudaMemcpyHostToDevice));
    ncclCheck(ncclAllGather(values + m.rank, values, sizeof(uint64_t), ncclUint8, m.comm, 0));
    const std::string lost = multi_gpu_wait(m);
    if (!lost.empty()) fail("%s", lost.c_str());
    std::vector<uint64_t> all(m.world);
    cudaCheck(cudaMemcpy(all.data(), values, m.world * sizeof(uint64_t), cudaMemcpyDeviceToHost));
    for (int r = 1; r < m.world; r++)
        if (all[r] != all[0]) differ += string_format("%s%d", differ.empty() ? "" : ", ", r);
#else
    (void)m; (void)value; (void)scratch;
#endif
    return differ;
}
