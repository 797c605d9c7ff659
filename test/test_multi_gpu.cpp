// test_multi_gpu: what multi_gpu.h decides before any GPU: the process
// layout from each launcher's environment (and its errors), Slurm's
// tasks-per-node text, the ZeRO-1 shards (contiguous, covering, balanced,
// never cutting a matrix Muon orthogonalises) and the settings hash.
#include <map>

#include "../multi_gpu.h"
#include "check.h"

using Env = std::map<std::string, std::string>;

static std::string layout_of(const Env& env, ProcessLayout* p) {
    return process_layout([&](const char* name) -> const char* {
        auto it = env.find(name);
        return it == env.end() ? nullptr : it->second.c_str();
    }, p);
}

static void test_no_launcher(Test& t) {
    ProcessLayout p;
    const std::string err = layout_of({{"HOME", "/root"}}, &p);
    CHECK(t, err.empty() && p.world == 1 && p.rank == 0 && p.local_world == 1 && p.launcher == "none",
          "alone: '%s', rank %d of %d, launcher %s", err.c_str(), p.rank, p.world, p.launcher.c_str());
}

static void test_openmpi(Test& t) {
    ProcessLayout p;
    std::string err = layout_of({{"OMPI_COMM_WORLD_SIZE", "8"}, {"OMPI_COMM_WORLD_RANK", "5"},
                                 {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"},
                                 {"PMIX_NAMESPACE", "prterun-host-123@1"}}, &p);
    CHECK(t, err.empty() && p.world == 8 && p.rank == 5 && p.local_rank == 1 && p.local_world == 4 &&
          p.launcher == "mpirun" && p.job == "prterun-host-123@1",
          "mpirun: '%s', rank %d of %d, local %d of %d, job '%s'", err.c_str(), p.rank, p.world, p.local_rank,
          p.local_world, p.job.c_str());
    err = layout_of({{"OMPI_COMM_WORLD_SIZE", "2"}}, &p);
    CHECK(t, err.find("OMPI_COMM_WORLD_RANK") != std::string::npos, "half an OpenMPI environment: '%s'", err.c_str());
    err = layout_of({{"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "0"},
                     {"OMPI_COMM_WORLD_LOCAL_SIZE", "1"}}, &p);
    CHECK(t, err.find("rank 2 of 2") != std::string::npos, "rank past the world: '%s'", err.c_str());
}

static void test_mpich(Test& t) {
    ProcessLayout p;
    std::string err = layout_of({{"PMI_SIZE", "4"}, {"PMI_RANK", "3"}, {"MPI_LOCALRANKID", "1"},
                                 {"MPI_LOCALNRANKS", "2"}}, &p);
    CHECK(t, err.empty() && p.world == 4 && p.rank == 3 && p.local_rank == 1 && p.local_world == 2,
          "hydra: '%s', rank %d of %d, local %d of %d", err.c_str(), p.rank, p.world, p.local_rank, p.local_world);
    err = layout_of({{"PMI_SIZE", "4"}, {"PMI_RANK", "3"}}, &p);
    CHECK(t, err.find("MPI_LOCALRANKID") != std::string::npos, "no local rank: '%s'", err.c_str());
}

static void test_slurm(Test& t) {
    CHECK(t, slurm_tasks_on_node("4(x2),3", 0) == 4 && slurm_tasks_on_node("4(x2),3", 1) == 4 &&
          slurm_tasks_on_node("4(x2),3", 2) == 3 && slurm_tasks_on_node("8", 0) == 8,
          "4(x2),3 -> %d %d %d", slurm_tasks_on_node("4(x2),3", 0), slurm_tasks_on_node("4(x2),3", 1),
          slurm_tasks_on_node("4(x2),3", 2));
    CHECK(t, slurm_tasks_on_node("4(x2),3", 3) == -1 && slurm_tasks_on_node("4(x", 0) == -1 &&
          slurm_tasks_on_node("", 0) == -1 && slurm_tasks_on_node("a", 0) == -1, "malformed or past the nodes");
    ProcessLayout p;
    std::string err = layout_of({{"SLURM_NTASKS", "8"}, {"SLURM_STEP_NUM_TASKS", "4"}, {"SLURM_PROCID", "3"},
                                 {"SLURM_LOCALID", "1"}, {"SLURM_NODEID", "1"}, {"SLURM_TASKS_PER_NODE", "4(x2)"},
                                 {"SLURM_STEP_TASKS_PER_NODE", "2(x2)"}, {"SLURM_JOB_ID", "77"},
                                 {"SLURM_STEP_ID", "0"}, {"PMI_SIZE", "4"}, {"PMI_RANK", "3"}}, &p);
    CHECK(t, err.empty() && p.world == 4 && p.rank == 3 && p.local_rank == 1 && p.local_world == 2 && p.node == 1 &&
          p.launcher == "srun" && p.job == "77.0",
          "srun --mpi=pmi2, a step of two nodes of two: '%s', rank %d of %d, local %d of %d, node %d, job '%s'",
          err.c_str(), p.rank, p.world, p.local_rank, p.local_world, p.node, p.job.c_str());
    err = layout_of({{"SLURM_STEP_NUM_TASKS", "4"}, {"SLURM_PROCID", "3"}, {"SLURM_LOCALID", "1"},
                     {"SLURM_NODEID", "1"}, {"SLURM_TASKS_PER_NODE", "x"}}, &p);
    CHECK(t, err.find("SLURM_TASKS_PER_NODE=x") != std::string::npos, "bad tasks per node: '%s'", err.c_str());
    err = layout_of({{"SLURM_STEP_NUM_TASKS", "4"}}, &p);
    CHECK(t, err.find("start train_et with srun") != std::string::npos, "half a step's variables: '%s'", err.c_str());
    // a batch script's own variables, no srun: one process
    err = layout_of({{"SLURM_NTASKS", "16"}, {"SLURM_PROCID", "0"}, {"SLURM_LOCALID", "0"}, {"SLURM_NODEID", "0"},
                     {"SLURM_TASKS_PER_NODE", "8(x2)"}, {"SLURM_JOB_ID", "77"}}, &p);
    CHECK(t, err.empty() && p.world == 1 && p.launcher == "none", "the batch script: '%s', %d processes by %s",
          err.c_str(), p.world, p.launcher.c_str());
}

// A d12 MoE model under Muon: the shards cover the parameters in order, the
// largest is near an even split, and no matrix Muon orthogonalises (qkv,
// each routed expert) is cut.
static void check_shards(Test& t, const ModelConfig& c, const OptimizerConfig& o, int world) {
    const std::vector<ParamTensor> tensors = parameter_tensors(c);
    std::vector<size_t> offsets;
    size_t total = 0;
    for (const ParamTensor& p : tensors) {
        offsets.push_back(total);
        total += p.numel();
    }
    const std::vector<MuonMatrix> muon = muon_matrices(c, tensors, o);
    const ShardPlan plan = shard_plan(offsets, total, muon, world);
    CHECK(t, (int)plan.begin.size() == world + 1 && plan.begin[0] == 0 && plan.begin[world] == total,
          "%d ranks: %zu cuts from %zu to %zu of %zu", world, plan.begin.size(), plan.begin[0], plan.begin.back(), total);
    size_t largest_matrix = 0;
    for (const MuonMatrix& m : muon) largest_matrix = std::max(largest_matrix, (size_t)(m.rows * m.cols));
    for (int r = 0; r < world; r++) CHECK(t, plan.begin[r] <= plan.begin[r + 1], "%d ranks: shard %d reversed", world, r);
    // each of a shard's two cuts moves by at most half a matrix
    CHECK(t, plan.largest() <= total / world + largest_matrix + SHARD_ALIGN,
          "%d ranks: largest shard %zu, an even split %zu, largest matrix %zu", world, plan.largest(), total / world,
          largest_matrix);
    for (const MuonMatrix& m : muon)
        for (int b = 0; b < m.batch; b++) {
            const size_t lo = offsets[m.first_tensor] + (size_t)b * m.rows * m.cols, hi = lo + m.rows * m.cols;
            for (int r = 1; r < world; r++)
                CHECK(t, plan.begin[r] <= lo || plan.begin[r] >= hi, "%d ranks: cut %zu inside %s [%d]", world,
                      plan.begin[r], m.name.c_str(), b);
        }
    size_t covered = 0;  // overlap() hands every element of a range to exactly one rank
    for (int r = 0; r < world; r++) {
        size_t a, b;
        plan.overlap(r, 1000, total - 1000, &a, &b);
        covered += b - a;
    }
    CHECK(t, covered == total - 2000, "%d ranks: the overlaps of a range cover %zu of %zu", world, covered, total - 2000);
}

static void test_shards(Test& t) {
    ModelConfig c;
    CHECK(t, model_preset("d12", &c).empty(), "d12 preset");
    c.vocab_size = 50257;
    c.n_experts = 16;
    c.router.kind = RouterKind::ET;
    OptimizerConfig muon;
    muon.kind = OptimizerKind::Muon;
    for (int world : {1, 2, 3, 8, 64}) check_shards(t, c, muon, world);
    check_shards(t, c, OptimizerConfig(), 8);  // AdamW: cuts anywhere, aligned
    ModelConfig tc = c;
    tc.router.kind = RouterKind::TC;  // TC's experts are one stacked matrix per layer
    check_shards(t, tc, muon, 8);
}

static void test_settings_hash(Test& t) {
    const std::string a = "-e=16\n-r=et\n", b = "-e=16\n-r=ec\n";
    CHECK(t, settings_hash(a.data(), a.size()) == settings_hash(a.data(), a.size()), "not a function of its input");
    CHECK(t, settings_hash(a.data(), a.size()) != settings_hash(b.data(), b.size()), "-r et and -r ec hash alike");
    const uint64_t h = settings_hash(a.data(), a.size());
    CHECK(t, settings_hash(b.data(), b.size(), h) != settings_hash(a.data(), a.size(), h), "chained hashes agree");
}

int main() {
    return run_tests({{"process_layout_alone", test_no_launcher},
                      {"process_layout_openmpi", test_openmpi},
                      {"process_layout_mpich", test_mpich},
                      {"process_layout_slurm", test_slurm},
                      {"zero1_shards", test_shards},
                      {"settings_hash", test_settings_hash}});
}
