// test/emu/dry_run.cu: whole training steps at the paper's sizes, without a
// GPU, on the emulated device's dry run (EMU_DRY_RUN=1: every launch and
// library call is checked as an H200 checks it, no kernel body runs, no
// memory is taken).
//
//   EMU_DRY_RUN=1 build/emu/plain/dry_run -m d12 -e 16 -r et
//   EMU_DRY_RUN=1 build/emu/plain/dry_run -preset d12-et        a row of the paper (presets.h)
//   EMU_DRY_RUN=1 build/emu/plain/dry_run -m d20 -np 8 -ep global   rank 0 of 8 (multi_gpu.cuh)
//
// It runs the host side exactly as train_et does: model_allocate, then two
// training steps of -d tokens each (gradient accumulation over micro-batches
// of -b x -t), the first routed by ET's EC warm-up and the second by its
// thresholds, each ending with model_update and the routing statistics of a
// logging step; then an evaluation pass and a generation pass as
// train_et's evaluate() and sample() make them, a forward of every batch
// shape CORE uses (core_eval.cuh: rows of 64, 128, ... tokens up to T, B x T
// tokens each, with the greedy predictions) and the routes of one sequence
// (-rf). With -np N it is rank 0 of N ranks: the optimizer state of its
// shard only, every rank's router logits for -ep global, and each
// collective checked and counted (the emulated NCCL joins no one in a dry
// run). What it prints: the
// estimate train_et prints before it touches the GPU (model_plan), the memory
// model_allocate then took, and what the device reports in use after all of
// it; test/emu/test_dry_run.py checks that the three agree with each other
// and with the emulator's own report (at exit) of the peak memory.
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../../core_eval.cuh"
#include "../../presets.h"

static const int VOCAB = 50257;  // GPT-2's, as in the FineWeb-Edu shards; a -preset: the paper's 65,536
static const int STEPS = 2;
static const int SAMPLE_TOKENS = 4;

// The flags of a train_et preset that change nothing the dry run checks
// (launches, shapes, memory): rates, schedule, decay, clipping, statistics.
static const char* VALUES_ONLY[] = {"-om", "-lm", "-le", "-lh", "-b1", "-b2", "-ae", "-c", "-gc", "-a", "-u",
                                    "-wd", "-q", "-x", "-eb", "-ew", "-ta", "-tu", "-v", "-vm", "-me"};

int main(int argc, char** argv) {
    std::string preset = "d12", router = "et", optimizer = "adamw", pool = "micro", router_group = "adamw";
    std::string balance = "aux";
    int experts = 16, B = 16, T = 2048, total_batch = 524288, top_k = 1, vocab = VOCAB, ranks = 1;
    double capacity = 0.5;
    std::vector<std::string> args(argv + 1, argv + argc);
    for (size_t i = 0; i + 1 < args.size(); i += 2) {  // -preset NAME: its flags first, the others win
        if (args[i] != "-preset") continue;
        const Preset* p = find_preset(args[i + 1]);
        if (!p) fail("-preset: unknown preset '%s' (the presets: %s)", args[i + 1].c_str(), preset_names().c_str());
        std::vector<std::string> words = preset_words(*p);
        words.insert(words.end(), args.begin(), args.end());
        args = words;
        vocab = PAPER_VOCAB;  // the paper's tokenizer
        break;
    }
    if (args.size() % 2 != 0) fail("%s: missing value", args.back().c_str());
    for (size_t i = 0; i < args.size(); i += 2) {
        const std::string& f = args[i];
        const char* v = args[i + 1].c_str();
        if (f == "-m") preset = v;
        else if (f == "-e") experts = atoi(v);
        else if (f == "-r") router = v;
        else if (f == "-b") B = atoi(v);
        else if (f == "-t") T = atoi(v);
        else if (f == "-d") total_batch = atoi(v);
        else if (f == "-k") top_k = atoi(v);
        else if (f == "-ec") capacity = atof(v);
        else if (f == "-ep") pool = v;
        else if (f == "-tb") balance = v;
        else if (f == "-opt") optimizer = v;
        else if (f == "-og") router_group = v;
        else if (f == "-np") ranks = atoi(v);
        else if (f == "-preset") continue;
        else if (std::find_if(std::begin(VALUES_ONLY), std::end(VALUES_ONLY), [&](const char* x) { return f == x; }) ==
                 std::end(VALUES_ONLY))
            fail("unknown flag '%s' (usage: dry_run [-preset name] [-m model] [-e experts] [-r tc|ec|et] [-k K] "
                 "[-b B] [-t T] [-d tokens] [-ec C] [-ep micro|seq|global] [-tb none|aux|lossfree] [-opt adamw|muon] "
                 "[-og adamw|muon] [-np ranks])", f.c_str());
    }
    const char* dry = getenv("EMU_DRY_RUN");
    if (!dry || !*dry || strcmp(dry, "0") == 0)
        fail("dry_run needs EMU_DRY_RUN=1: without it the emulated device would run %s's kernels on the CPU",
             preset.c_str());
    ModelConfig c;
    std::string err = model_preset(preset, &c);
    if (!err.empty()) fail("-m: %s", err.c_str());
    c.vocab_size = vocab;
    c.seq_len = T;
    c.n_experts = experts;
    if (router != "tc" && router != "ec" && router != "et") fail("-r: '%s' is not tc, ec or et", router.c_str());
    c.router.kind = router == "tc" ? RouterKind::TC : router == "ec" ? RouterKind::EC : RouterKind::ET;
    c.router.et_warmup_steps = 1;  // step 0 routes by EC, step 1 by the thresholds
    c.router.top_k = top_k;
    c.router.capacity = capacity;
    if (pool != "micro" && pool != "seq" && pool != "global")
        fail("-ep: '%s' is not micro, seq or global", pool.c_str());
    c.router.ec_pool = pool == "seq" ? EcPool::Sequence : pool == "global" ? EcPool::Global : EcPool::MicroBatch;
    if (ranks < 1) fail("-np: %d ranks", ranks);
    if (balance != "none" && balance != "aux" && balance != "lossfree")
        fail("-tb: '%s' is not none, aux or lossfree", balance.c_str());
    c.router.tc_balance = balance == "none" ? TcBalance::None : balance == "aux" ? TcBalance::Aux : TcBalance::LossFree;
    if (total_batch % (B * T * ranks) != 0)
        fail("-d %d is not a multiple of -b x -t x -np = %d", total_batch, B * T * ranks);
    const int grad_accum = total_batch / (B * T * ranks);

    GpuInfo gpu;
    err = gpu_open(0, &gpu);
    if (!err.empty()) fail("%s", err.c_str());
    printf("dry run  %s, %s, %s, B=%d x T=%d, %d micro-steps per step, %d steps, an eval and a generation pass, on %s%s\n",
           preset.c_str(), experts > 0 ? string_format("%d experts, %s router", experts, router.c_str()).c_str() : "dense",
           optimizer.c_str(), B, T, grad_accum, STEPS, gpu.prop.name,
           ranks > 1 ? string_format(", rank 0 of %d", ranks).c_str() : "");
    // rank 0 of -np ranks: the rendezvous (a dry run joins no one) and the heartbeat in a scratch directory
    char rendezvous[] = "/tmp/dry_run_XXXXXX";
    if (ranks > 1 && !mkdtemp(rendezvous)) fail("cannot make a scratch directory in /tmp");
    ProcessLayout layout;
    layout.world = ranks;
    layout.launcher = "dry run";
    MultiGpu multi;
    multi_gpu_init(&multi, layout, rendezvous, 60, "");
    Model model;
    model.config = c;
    if (optimizer != "adamw" && optimizer != "muon") fail("-opt: '%s' is not adamw or muon", optimizer.c_str());
    model.optim.kind = optimizer == "muon" ? OptimizerKind::Muon : OptimizerKind::AdamW;
    if (router_group != "adamw" && router_group != "muon") fail("-og: '%s' is not adamw or muon", router_group.c_str());
    model.optim.router = router_group == "muon" ? RouterGroup::Muon : RouterGroup::AdamW;
    const Schedule schedule{LrSchedule::Wsd, 0.0, 0.0, 0, INT_MAX};  // constant, as train_et's wsd before its warm-down
    model.world = ranks;
    model.multi = multi.active() ? &multi : nullptr;
    printf("memory   estimate %zu bytes (model_plan, before the GPU)\n",
           model_plan(c, model.optim, B, T, ranks, 0).memory.total());
    model_allocate(&model, B, T);
    printf("memory   plan %zu bytes: %s\n", model.memory.total(), model.memory.describe().c_str());

    const float dloss = 1.0f / total_batch;
    for (int step = 0; step < STEPS; step++) {
        router_step_begin(model.router, step);
        cudaCheck(cudaMemsetAsync(model.grads, 0, model.num_params * sizeof(float)));
        cudaCheck(cudaMemsetAsync(model.loss_total, 0, sizeof(float)));
        for (int micro = 0; micro < grad_accum; micro++) {
            model_forward(&model, B, T, true, true, dloss);
            model.reduce_grads = micro == grad_accum - 1;
            model_backward(&model, B, T);
        }
        model.reduce_grads = false;
        router_share_stats(model.router);
        model_update(&model, schedule, 1.0f, step);
        multi_gpu_sum(multi, model.loss_total, 1);
        multi_gpu_wait(multi);
        float loss = 0;
        cudaCheck(cudaMemcpy(&loss, model.loss_total, sizeof(float), cudaMemcpyDeviceToHost));
        router_read_stats(model.router);
        const char* routed = c.n_experts > 0 ? router_routing_now(model.router) : "dense";
        router_step_end(model.router);
        printf("step     %d: %d micro-steps, routed by %s\n", step, grad_accum, routed);
    }
    model_forward(&model, B, T, true, false, 0.0f);  // evaluate()
    for (int t = 1; t <= SAMPLE_TOKENS; t++) model_forward(&model, 1, t, false, false, 0.0f);  // sample()
    int shapes = 0;
    for (int Tb = core_bucket_length(1, T);; Tb = core_bucket_length(Tb + 1, T)) {  // core_run's batches
        model_forward(&model, B * T / Tb, Tb, true, false, 0.0f);
        logits_argmax(model.acts.predicted, model.acts.logits, B * T, c.vocab_size, c.padded_vocab());
        shapes++;
        if (Tb == T) break;
    }
    if (c.n_experts > 0) route_sequence(&model, std::vector<int>(T, 0));  // -rf
    printf("core     %d batch shapes, from %d rows of %d tokens to %d of %d\n", shapes, B * T / core_bucket_length(1, T),
           core_bucket_length(1, T), B, T);
    cudaCheck(cudaDeviceSynchronize());
    size_t free_bytes = 0, total_bytes = 0;
    cudaCheck(cudaMemGetInfo(&free_bytes, &total_bytes));
    printf("memory   in use after the steps: %zu bytes (%.2f GiB of %.2f GiB)\n", total_bytes - free_bytes,
           (total_bytes - free_bytes) / 1073741824.0, total_bytes / 1073741824.0);
    model_free(&model);
    multi_gpu_finish(multi);
    if (ranks > 1) rmdir(rendezvous);
    return 0;
}
