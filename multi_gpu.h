// multi_gpu.h: what data-parallel training over several processes decides
// before any GPU or NCCL call, in plain C++ so the CPU tests check it:
//   - the process layout: which rank this process is, of how many, and its
//     place on its node, from the launcher's environment (OpenMPI's mpirun,
//     MPICH's, or Slurm's srun);
//   - the ZeRO-1 shards: the contiguous slice of the flat parameter vector
//     whose optimizer state (and update) each rank owns;
//   - a hash of a run's settings, which every rank must agree on.
// multi_gpu.cuh does the communication with NCCL.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "common.h"
#include "optimizer_config.h"

// ----------------------------------------------------------------------------
// The process layout. One process per GPU: the GPU is the process's rank on
// its node (local_rank), so a node runs at most as many ranks as it has GPUs.

struct ProcessLayout {
    int rank = 0, world = 1;              // this process among all of the run's
    int local_rank = 0, local_world = 1;  // this process among those on its node
    int node = 0;                         // the node's index (Slurm; 0 elsewhere)
    std::string launcher = "none";        // who started the processes: none, mpirun, srun
    std::string job;                      // an id the launcher gives the whole job ("" if none)
};

// The tasks on node `node` from Slurm's SLURM_TASKS_PER_NODE, e.g. "4(x2),3"
// (two nodes of 4, then one of 3). Returns -1 if the text is malformed.
inline int slurm_tasks_on_node(const std::string& text, int node) {
    int first = 0;  // the index of the first node the current entry covers
    size_t i = 0;
    while (i < text.size()) {
        char* end = nullptr;
        const long tasks = strtol(text.c_str() + i, &end, 10);
        if (end == text.c_str() + i || tasks <= 0) return -1;
        i = end - text.c_str();
        long repeat = 1;
        if (text.compare(i, 2, "(x") == 0) {
            repeat = strtol(text.c_str() + i + 2, &end, 10);
            if (end == text.c_str() + i + 2 || *end != ')' || repeat <= 0) return -1;
            i = end - text.c_str() + 1;
        }
        if (node < first + repeat) return (int)tasks;
        first += (int)repeat;
        if (i < text.size() && text[i++] != ',') return -1;
    }
    return -1;
}

// The layout from the environment `env` (getenv, or a test's table). Returns
// "" or what is wrong with what the launcher set. OpenMPI's variables first,
// then a Slurm step's (srun --mpi=pmi2 also sets PMI_*, without the local
// rank), then MPICH's; a Slurm batch script run without srun is one process.
template <typename Env>
std::string process_layout(Env env, ProcessLayout* p) {
    *p = ProcessLayout();
    auto number = [&](const char* name, int* out) -> bool {
        const char* v = env(name);
        if (!v || !*v) return false;
        char* end = nullptr;
        const long x = strtol(v, &end, 10);
        if (*end != '\0' || x < 0 || x > 1 << 20) fail("%s=%s: expected a count or index", name, v);
        *out = (int)x;
        return true;
    };
    auto text = [&](const char* name) { const char* v = env(name); return std::string(v ? v : ""); };
    if (number("OMPI_COMM_WORLD_SIZE", &p->world)) {  // OpenMPI's mpirun
        p->launcher = "mpirun";
        if (!number("OMPI_COMM_WORLD_RANK", &p->rank) || !number("OMPI_COMM_WORLD_LOCAL_RANK", &p->local_rank) ||
            !number("OMPI_COMM_WORLD_LOCAL_SIZE", &p->local_world))
            return "OMPI_COMM_WORLD_SIZE is set but not OMPI_COMM_WORLD_RANK, _LOCAL_RANK and _LOCAL_SIZE: start "
                   "train_et with OpenMPI's mpirun, or unset it";
        p->job = text("OMPI_MCA_orte_ess_jobid") + text("PMIX_NAMESPACE");
    } else if (number("SLURM_STEP_NUM_TASKS", &p->world)) {  // srun (a batch script alone is one process)
        p->launcher = "srun";
        if (!number("SLURM_PROCID", &p->rank) || !number("SLURM_LOCALID", &p->local_rank) ||
            !number("SLURM_NODEID", &p->node))
            return "SLURM_STEP_NUM_TASKS is set but not SLURM_PROCID, SLURM_LOCALID and SLURM_NODEID: start "
                   "train_et with srun";
        const char* name = env("SLURM_STEP_TASKS_PER_NODE") ? "SLURM_STEP_TASKS_PER_NODE" : "SLURM_TASKS_PER_NODE";
        const std::string per_node = text(name);
        p->local_world = slurm_tasks_on_node(per_node, p->node);
        if (p->local_world < 0)
            return string_format("%s=%s: expected counts like 4(x2),3 covering node %d", name, per_node.c_str(),
                                 p->node);
        p->job = text("SLURM_JOB_ID") + "." + text("SLURM_STEP_ID");
    } else if (number("PMI_SIZE", &p->world)) {  // MPICH's hydra
        p->launcher = "mpirun";
        if (!number("PMI_RANK", &p->rank)) return "PMI_SIZE is set but not PMI_RANK";
        if (!number("MPI_LOCALRANKID", &p->local_rank) || !number("MPI_LOCALNRANKS", &p->local_world))
            return "PMI_SIZE is set but not MPI_LOCALRANKID and MPI_LOCALNRANKS: train_et needs each process's "
                   "place on its node to pick its GPU";
        p->job = text("PMI_KVS") + text("PMIX_NAMESPACE");
    } else {
        return "";
    }
    if (p->world < 1 || p->rank >= p->world)
        return string_format("%s: rank %d of %d processes is not a rank", p->launcher.c_str(), p->rank, p->world);
    if (p->local_world < 1 || p->local_rank >= p->local_world)
        return string_format("%s: local rank %d of %d on this node is not a rank", p->launcher.c_str(), p->local_rank,
                             p->local_world);
    return "";
}

inline std::string process_layout_from_environment(ProcessLayout* p) {
    return process_layout([](const char* name) { return getenv(name); }, p);
}

// ----------------------------------------------------------------------------
// ZeRO-1 shards. Rank r owns [begin[r], begin[r + 1]) of the flat parameter
// vector: it keeps the optimizer state of that slice, updates it, and sends
// the new weights to the others. AdamW works element by element, so its
// tensors may be cut anywhere; Muon orthogonalises whole matrices, so a cut
// never falls inside one (a batch of experts may be cut between two
// experts). Each cut starts at an even split of the elements, rounded to a
// multiple of SHARD_ALIGN elements, and moves to the nearer edge of the Muon
// matrix it falls in; the shards are contiguous, in rank order, and may be
// uneven (or empty, for a model with fewer matrices than ranks).

static const size_t SHARD_ALIGN = 64;  // 256 bytes of fp32: aligned transfers and vector loads

struct ShardPlan {
    std::vector<size_t> begin;  // world + 1 cuts: begin[0] = 0, begin[world] = all parameters
    size_t size(int r) const { return begin[r + 1] - begin[r]; }
    size_t largest() const {
        size_t m = 0;
        for (size_t r = 0; r + 1 < begin.size(); r++) m = std::max(m, begin[r + 1] - begin[r]);
        return m;
    }
    // The part of [lo, hi) that rank r owns, as [*a, *b) (empty: *a == *b).
    void overlap(int r, size_t lo, size_t hi, size_t* a, size_t* b) const {
        *a = std::max(lo, begin[r]);
        *b = std::max(*a, std::min(hi, begin[r + 1]));
    }
};

// offsets: each tensor's first element in the flat vector; total: its size.
inline ShardPlan shard_plan(const std::vector<size_t>& offsets, size_t total, const std::vector<MuonMatrix>& muon,
                            int world) {
    struct Span { size_t lo, hi; };  // one matrix Muon must see whole
    std::vector<Span> whole;
    for (const MuonMatrix& m : muon)
        for (int b = 0; b < m.batch; b++) {
            const size_t lo = offsets[m.first_tensor] + (size_t)b * m.rows * m.cols;
            whole.push_back({lo, lo + (size_t)m.rows * m.cols});
        }
    ShardPlan plan;
    plan.begin.push_back(0);
    for (int r = 1; r < world; r++) {
        size_t cut = (size_t)((double)total * r / world) / SHARD_ALIGN * SHARD_ALIGN;
        for (const Span& s : whole)
            if (cut > s.lo && cut < s.hi) cut = cut - s.lo <= s.hi - cut ? s.lo : s.hi;
        plan.begin.push_back(std::max(cut, plan.begin.back()));
    }
    plan.begin.push_back(total);
    return plan;
}

// ----------------------------------------------------------------------------
// The settings hash: FNV-1a over the bytes of every setting that changes
// what a rank computes. Ranks compare it at start-up, so a rank started with
// another flag, another data set or another binary is refused before step 1.
inline uint64_t settings_hash(const void* data, size_t bytes, uint64_t h = 1469598103934665603ull) {
    const unsigned char* p = (const unsigned char*)data;
    for (size_t i = 0; i < bytes; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}
