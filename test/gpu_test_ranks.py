"""test/gpu_test_ranks.py: train_et on several ranks, one process per GPU.

Each case starts ranks the way a user does (OpenMPI's mpirun, or Slurm's srun
simulated by its SLURM_* variables) and holds them to what one GPU does:
  - the same global batch on 2 ranks as on 1 rank: dense and TC loss-free
    against 1 rank with twice the gradient accumulation; ET across its warm-up
    switch and EC with the global pool (-ep global) against 1 rank whose
    micro-batch is the ranks' together, and ET on 4 ranks: the same routing
    (every logged count equal) and losses within LOSS_TOLERANCE;
  - every rank's weights, cutoffs and biases the same bits (train_et checks
    it at each checkpoint and says so);
  - a 2-rank resume continues bit-exactly, and a 2-rank checkpoint goes on
    on 1 rank;
  - a rank killed or hung mid-run: the others name it and exit within a
    minute, the last checkpoint whole; ranks started with different settings, or more
    ranks on a node than it has GPUs: refused;
  - two nodes under Slurm, simulated on one machine.

On the emulated device (TRAIN_ET_EMULATED=1, how make test runs it without
GPUs) each process emulates one GPU and test/emu/nccl.cpp carries NCCL's
collectives between the processes. Natively it needs a machine with 2 GPUs
(4 for the 4-rank case).
"""
import os
import shutil
import signal
import subprocess
import tempfile
import time

from gpu_test_train import EMULATED, random_shard, records, run_records
from harness import REPO, Skip, main

TRAIN_ET = os.path.join(REPO, "build/emu/plain/train_et" if EMULATED else "train_et")
B, T = 2, 32
STEPS = 10
# Two ranks add the same fp32 gradients as one GPU in another order where the
# one GPU's micro-batch holds both ranks' sequences (cuBLAS sums all its rows
# in one product; the ranks sum their halves, then NCCL adds the two), and the
# bf16 copy of the weights turns such last-bit differences into one bf16 step
# (2^-8 relative) of a few weights. Measured on the emulated device over the
# STEPS steps: 0 for dense and TC (one GPU accumulating micro-batches adds in
# the ranks' order), up to 9e-5 for ET and EC; this bound leaves room for a
# GPU's cuBLAS, which may pick another summation order for another shape.
LOSS_TOLERANCE = 5e-4
COMMON = ["-m", "tiny", "-t", str(T), "-v", "0", "-s", "0", "-li", "1", "-x", str(STEPS), "-l", "3e-3"]
MPIRUN_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_btl_vader_single_copy_mechanism": "none"}


def gpus_needed(n):
    if EMULATED:
        return
    r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    have = r.stdout.count("GPU ") if r.returncode == 0 else 0
    if have < n:
        raise Skip(f"{n} ranks need {n} GPUs and this machine has {have}",
                   "run it on a node with more GPUs, or without GPUs (make test emulates them)")


def mpirun(n, out, *args, timeout=1200):
    """train_et on n ranks started by mpirun; returns rank 0's console."""
    gpus_needed(n)
    if not shutil.which("mpirun"):
        raise Skip("no mpirun on this machine", "apt-get install openmpi-bin libopenmpi-dev (.ci/run does)")
    env = dict(os.environ, EMU_GPUS=str(n), **MPIRUN_ENV)
    cmd = ["mpirun", "-np", str(n), "--oversubscribe", "--bind-to", "none", TRAIN_ET, *COMMON, "-o", out, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"mpirun -np {n} train_et {' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-3000:]}"
    return r.stdout


def one_rank(out, *args):
    r = subprocess.run([TRAIN_ET, *COMMON, "-o", out, *args], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"train_et {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}"
    return r.stdout


def srun(n, out, rank_args, nodes=1, job="4242", gpus=None, extra_env=None):
    """n ranks as srun starts them (its SLURM_* variables), on `nodes` simulated nodes of this
    machine with `gpus` GPUs each (default: one per rank); rank_args(r) gives rank r's flags,
    extra_env adds to the environment. Returns the processes, running."""
    per_node = n // nodes
    gpus = gpus or per_node
    gpus_needed(gpus)
    procs = []
    for r in range(n):
        env = dict(os.environ, SLURM_STEP_NUM_TASKS=str(n), SLURM_PROCID=str(r), SLURM_LOCALID=str(r % per_node),
                   SLURM_NODEID=str(r // per_node), SLURM_TASKS_PER_NODE=f"{per_node}(x{nodes})", SLURM_JOB_ID=job,
                   SLURM_STEP_ID="0", EMU_GPUS=str(gpus), **(extra_env or {}))
        procs.append(subprocess.Popen([TRAIN_ET, *COMMON, "-o", out, *rank_args(r)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=1200):
    """Waits for every rank; returns [(returncode, stdout, stderr)] by rank."""
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def compare(ranked, single, what, same_routing):
    """The ranks' run against one GPU's: losses within tolerance, and with same_routing every
    routing count equal."""
    a, b = records(ranked), records(single)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), f"{what}: steps {sorted(a)} vs {sorted(b)}"
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= LOSS_TOLERANCE, \
            f"{what}: step {step} loss {a[step]['loss']} on ranks, {b[step]['loss']} on one GPU"
        if same_routing:
            assert a[step]["routing"] == b[step]["routing"], f"{what}: step {step} {a[step]['routing']} vs {b[step]['routing']}"
            for la, lb in zip(a[step]["moe"], b[step]["moe"]):
                assert la["counts"] == lb["counts"] and la["clamped"] == lb["clamped"], \
                    f"{what}: step {step} routed {la['counts']} on ranks, {lb['counts']} on one GPU"


def agreed(console, n):
    """train_et's own check that every rank holds the same weights, cutoffs and biases."""
    line = f"step {STEPS:6d} | weights, cutoffs and biases identical on all {n} ranks"
    assert line in console, f"no '{line}' in:\n{console}"


def test_dense_two_ranks_match_accumulation():
    with tempfile.TemporaryDirectory() as d:
        shard = random_shard(d, 50000)
        both = ["-i", shard, "-e", "0", "-b", str(B), "-d", str(2 * B * T)]
        console = mpirun(2, f"{d}/ranks", *both)
        one_rank(f"{d}/one", *both)
        compare(f"{d}/ranks", f"{d}/one", "dense", False)
        agreed(console, 2)
        run = run_records(f"{d}/ranks")[0]["run"]
        assert run["batch"]["micro_steps"] == 1 and run_records(f"{d}/one")[0]["run"]["batch"]["micro_steps"] == 2, run
        assert "ranks    2 processes (mpirun)" in console, console


def accumulated_against_one(*router):
    """Four experts under the router on 2 ranks of -b B against one GPU accumulating both ranks'
    micro-batches (each rank's pools its own): the same routing and losses."""
    with tempfile.TemporaryDirectory() as d:
        both = ["-i", "synthetic", "-sv", "2048", "-e", "4", *router, "-b", str(B), "-d", str(2 * B * T)]
        console = mpirun(2, f"{d}/ranks", *both)
        one_rank(f"{d}/one", *both)
        compare(f"{d}/ranks", f"{d}/one", " ".join(router), True)
        agreed(console, 2)


def test_token_choice_lossfree_two_ranks():
    accumulated_against_one("-r", "tc", "-tb", "lossfree", "-tu", "0.01")


def val_losses(out_dir):
    return {rec["step"]: rec["val_loss"] for rec in run_records(out_dir) if "val_loss" in rec}


def pooled_against_one(d, router, ranks, *extra):
    """The router with -ep global on `ranks` ranks of -b B against one GPU of -b ranks x B (the pool
    the ranks share), validating every 5 steps on the same tokens (-vm: micro-batches in all);
    returns the ranks' output directory."""
    common = ["-i", "synthetic", "-sv", "2048", "-e", "4", "-r", router, "-ep", "global", "-ew", "4",
              "-d", str(ranks * B * T), "-v", "5", *extra]
    console = mpirun(ranks, f"{d}/ranks", *common, "-b", str(B), "-vm", str(ranks))
    one_rank(f"{d}/one", *common, "-b", str(ranks * B), "-vm", "1")
    what = f"{router} {' '.join(extra)} global, {ranks} ranks"
    compare(f"{d}/ranks", f"{d}/one", what, True)
    agreed(console, ranks)
    a, b = val_losses(f"{d}/ranks"), val_losses(f"{d}/one")
    assert sorted(a) == sorted(b) == [0, 5, STEPS], f"{what}: validated at {sorted(a)} and {sorted(b)}"
    # step 0 routes by EC (no cutoff yet) over each rank's own tokens, the one GPU over all: not compared
    for step in (5, STEPS):
        assert abs(a[step] - b[step]) <= LOSS_TOLERANCE, f"{what}: val loss at {step}: {a[step]} vs {b[step]}"
    return f"{d}/ranks"


def test_expert_threshold_global_pool_two_ranks():
    """ET over its warm-up switch (EC for 4 steps, then thresholds with the clamp) pooled over the
    ranks routes as one GPU whose micro-batch holds both ranks' sequences."""
    with tempfile.TemporaryDirectory() as d:
        recs = records(pooled_against_one(d, "et", 2))
        assert recs[4]["routing"] == "ec (et warm-up)" and recs[5]["routing"] == "et", (recs[4], recs[5])
        assert sum(recs[1]["moe"][0]["counts"]) == 2 * B * T, recs[1]["moe"]  # every rank's tokens


def test_expert_choice_global_pool_two_ranks():
    with tempfile.TemporaryDirectory() as d:
        pooled_against_one(d, "ec", 2)
    with tempfile.TemporaryDirectory() as d:  # evaluated by each rank's batch (-er batch): runs, and is finite
        mpirun(2, f"{d}/out", "-i", "synthetic", "-sv", "2048", "-e", "4", "-r", "ec", "-ep", "global", "-er", "batch",
               "-b", str(B), "-d", str(2 * B * T), "-v", "5", "-vm", "2")
        assert all(v is not None for v in val_losses(f"{d}/out").values()), val_losses(f"{d}/out")


def test_token_choice_aux_two_ranks():
    """TC's aux loss over every rank's tokens: counts and gate means summed over the ranks."""
    with tempfile.TemporaryDirectory() as d:
        pooled_against_one(d, "tc", 2, "-tb", "aux")


def test_per_rank_pools_two_ranks():
    """ET with -ep micro: each rank its own pool, the step's statistics (EC cutoffs included) summed
    over the ranks."""
    accumulated_against_one("-r", "et", "-ep", "micro", "-ew", "4")


def test_expert_threshold_four_ranks():
    with tempfile.TemporaryDirectory() as d:
        pooled_against_one(d, "et", 4)


def test_resume_on_two_ranks_and_on_one():
    """A 2-rank run resumed from its step-5 checkpoint on 2 ranks goes on bit-exactly; on 1 rank
    (the optimizer shards put back together) it goes on within the tolerance."""
    with tempfile.TemporaryDirectory() as d:
        common = ["-i", "synthetic", "-sv", "2048", "-e", "4", "-r", "et", "-ew", "3", "-b", str(B),
                  "-d", str(2 * B * T)]
        mpirun(2, f"{d}/whole", *common)
        mpirun(2, f"{d}/parts", *common, "-n", "5")
        os.remove(f"{d}/parts/ckpt_{STEPS:010d}.bin")
        shutil.copytree(f"{d}/parts", f"{d}/alone")
        console = mpirun(2, f"{d}/parts", *common, "-y", "1")
        assert "ckpt_0000000005.bin" in console, console
        whole, parts = records(f"{d}/whole"), records(f"{d}/parts")
        for step in range(6, STEPS + 1):
            assert parts[step]["loss"] == whole[step]["loss"] and parts[step]["moe"] == whole[step]["moe"], \
                f"step {step}: resumed {parts[step]} vs uninterrupted {whole[step]}"
        console = one_rank(f"{d}/alone", *common, "-y", "1")
        assert "warning: resuming with the number of processes 1 where the checkpoint's run had 2" in console, console
        alone = records(f"{d}/alone")
        for step in range(6, STEPS + 1):
            assert abs(alone[step]["loss"] - whole[step]["loss"]) <= LOSS_TOLERANCE, \
                f"step {step}: on 1 rank {alone[step]['loss']}, on 2 {whole[step]['loss']}"


def lost_rank(signal_to_rank1, extra_env=None):
    """Two ranks train with checkpoints every 2 steps; once step 4's exists, rank 1 gets the signal.
    Rank 0 must exit within a minute naming rank 1, the newest checkpoint whole. Returns its stderr."""
    with tempfile.TemporaryDirectory() as d:
        args = ["-i", "synthetic", "-sv", "2048", "-e", "4", "-r", "et", "-b", str(B), "-d", str(2 * B * T),
                "-x", "100000", "-n", "2", "-pt", "20"]
        procs = srun(2, f"{d}/out", lambda r: args, extra_env=extra_env)
        try:
            deadline = time.time() + 600
            while not os.path.exists(f"{d}/out/ckpt_0000000004.bin"):
                assert time.time() < deadline and procs[0].poll() is None, "no checkpoint at step 4"
                time.sleep(0.2)
            procs[1].send_signal(signal_to_rank1)
            if signal_to_rank1 == signal.SIGKILL:
                procs[1].wait()  # reaped: a dead process, not a zombie
            try:
                _, stderr = procs[0].communicate(timeout=60)
            except subprocess.TimeoutExpired:
                raise AssertionError("rank 0 still runs a minute after rank 1 was lost")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert procs[0].returncode == 1, f"rank 0 exited {procs[0].returncode}: {stderr}"
        assert "\nerror: rank 0: " in "\n" + stderr and "lost rank 1 (silent for" in stderr and \
            "the last complete checkpoint is" in stderr, stderr
        saved = sorted(f for f in os.listdir(f"{d}/out") if f.startswith("ckpt_"))
        assert saved and not any(f.endswith(".tmp") for f in saved), saved
        size = run_records(f"{d}/out")[0]["run"]["checkpoint_bytes"]
        assert os.path.getsize(f"{d}/out/{saved[-1]}") == size, f"{saved[-1]} is not whole"
        assert saved[-1] in stderr, stderr
        return stderr


def test_a_killed_rank_stops_the_others():
    lost_rank(signal.SIGKILL)


def test_a_hung_rank_stops_the_others():
    """Rank 1 stopped (SIGSTOP: alive, silent), rank 0 blocked in a collective waiting for it: rank
    0's watchdog thread names it from its silent heartbeat, long before any collective gives up."""
    stderr = lost_rank(signal.SIGSTOP, extra_env={"EMU_NCCL_TIMEOUT": "600"})
    assert "did not arrive" not in stderr, stderr


def test_ranks_with_other_settings_are_refused():
    with tempfile.TemporaryDirectory() as d:
        args = ["-i", "synthetic", "-sv", "2048", "-e", "0", "-b", str(B), "-d", str(2 * B * T)]
        results = finish(srun(2, f"{d}/out", lambda r: args + (["-l", "1e-3"] if r == 1 else [])))
        for rank, (code, stdout, stderr) in enumerate(results):
            assert code == 1 and "rank 1 started with other settings than rank 0" in stderr, (rank, code, stderr)
            assert "step      1" not in stdout, stdout


def test_more_ranks_than_gpus_are_refused():
    if not EMULATED:
        raise Skip("a node's GPU count is the machine's own here", "make test runs it on the emulated device")
    with tempfile.TemporaryDirectory() as d:
        args = ["-i", "synthetic", "-sv", "2048", "-e", "0", "-b", str(B), "-d", str(2 * B * T)]
        # one GPU visible: taken for the launcher's binding, and then found shared
        for rank, (code, _, stderr) in enumerate(finish(srun(2, f"{d}/out", lambda r: args, gpus=1))):
            assert code == 1 and f"error: rank {rank}: ranks 0 and 1 run on the same GPU (NVIDIA H200" in stderr, \
                (rank, code, stderr)
        args[-1] = str(4 * B * T)  # -d
        for rank, (code, _, stderr) in enumerate(finish(srun(4, f"{d}/out", lambda r: args, gpus=2))):
            assert code == 1 and f"error: rank {rank}: srun started 4 processes on this node, which has 2 GPUs: one " \
                "process per GPU" in stderr, (rank, code, stderr)


def test_two_nodes_under_slurm():
    """Two simulated nodes of one GPU each, the NCCL id through -pd's file: the same run as mpirun's."""
    with tempfile.TemporaryDirectory() as d:
        shard = random_shard(d, 50000)
        both = ["-i", shard, "-e", "0", "-b", str(B), "-d", str(2 * B * T)]
        mpirun(2, f"{d}/mpirun", *both)
        results = finish(srun(2, f"{d}/srun", lambda r: both + ["-pd", f"{d}/shared"], nodes=2))
        for rank, (code, stdout, stderr) in enumerate(results):
            assert code == 0, f"rank {rank} exited {code}: {stderr}"
        assert "ranks    2 processes (srun), 1 on this node" in results[0][1], results[0][1]
        a, b = records(f"{d}/mpirun"), records(f"{d}/srun")
        assert all(a[s]["loss"] == b[s]["loss"] for s in a), "srun and mpirun trained differently"
        assert not os.path.exists(f"{d}/shared/nccl_id.4242.0"), "the NCCL id file was left behind"


if __name__ == "__main__":
    main(globals())
