// dev/bench_step.cu: how fast train_et's training step runs on the GPU, whole
// and split by phase, for the dense model or the MoE model with any router.
// SPEC "Performance" asks for tokens/s, MFU, peak memory and the step by
// phase (attention, router and selection, dispatch, experts, combine,
// optimizer), measured and never assumed; this program is where those
// numbers come from (dev/bench.sh builds and runs it).
//
//   build/bench_step -m d12 -b 16 -t 2048 -r 20            dense
//   build/bench_step -m d12 -e 16 -rt et                    ET, 16 experts
//
// Method. The weights are random, the
// zero-initialised wo, proj and lm_head included, and so are the tokens:
// zeros can run faster than real data. A few real training steps warm up
// first. Every number is the median of -r runs, each between two CUDA
// events, all queued back to back with no host sync between them.
//   - micro-step: model_forward + model_backward exactly as train_et runs
//     them; update: model_update (grad_norm + AdamW, or -opt muon's Muon
//     for the matrices); zero: the per-step
//     gradient memset. From them: tokens/s and MFU for the micro-step alone,
//     and for a train_et step of -d 524288 tokens (its default).
//   - phases: each phase's launchers (the calls, buffers and shapes of
//     model_forward / model_backward, all layers) in a timed loop of their
//     own. What they compute doesn't matter, but their inputs are the
//     model's own non-zero buffers. The sum of the phases next to the
//     measured micro-step shows what the split misses (gaps between launches).
//   - attention: achieved TFLOP/s (forward 4*B*H*(T(T+1)/2)*hd FLOPs per
//     layer, backward 2.5x that), against the time the same FLOPs take at
//     the cuBLAS bf16 rate measured here on one 8192^3 product (-g) of random
//     data; the SPEC target is attention within 2x of that.
//   - MoE: the grouped expert matmuls next to cuBLAS on the same shapes (the
//     shared expert's products, one pair per token, times K). The routers
//     run as in training after warm-up: ET's EC warm-up is
//     one step, so the timed steps route by the tracked thresholds (with the
//     capacity clamp); TC balances with the aux loss. Expert FLOPs count the
//     nominal N*K routed tokens (what MFU counts); ET's real count varies.
//   - memory: cudaMemGetInfo before model_allocate and after all the step's
//     work; nothing is freed in between, so the difference is the peak.
#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../model.cuh"

#ifdef ENABLE_FP32
static const char* PRECISION_NAME = "fp32";
#else
static const char* PRECISION_NAME = "bf16";
#endif

static const int VOCAB = 50257;         // GPT-2's, as in the FineWeb-Edu shards
static const int TOTAL_BATCH = 524288;  // train_et's -d default: tokens per optimizer step
static const float LR = 1e-5f;          // every group's: small, the repeated updates must keep the weights sane
static const float WEIGHT_DECAY = 0.1f, GRAD_CLIP = 1.0f;  // train_et's defaults
static const int WARMUP_STEPS = 2;
static const int GEMM_WARMUP = 3;       // cuBLAS picks and loads its kernel on the first calls
static const uint64_t SEED = 1337;

// ----------------------------------------------------------------------------
// Flags

struct Options {
    std::string model = "d12";
    int batch = 16, seq_len = 2048, repeats = 20, experts = 0, router = (int)RouterKind::ET;
    int gemm_size = 8192;  // the cuBLAS rate probe: M = N = K
    OptimizerKind optimizer = OptimizerKind::AdamW;
};

static const char* USAGE =
    "usage: bench_step [-m preset] [-b batch] [-t seq_len] [-r repeats] [-e experts] [-rt tc|ec|et] [-g size]\n"
    "                  [-opt adamw|muon]\n"
    "  -m  model preset (default d12; tiny, or dN with N even)\n"
    "  -b  sequences per micro-step (default 16)\n"
    "  -t  sequence length (default 2048)\n"
    "  -r  timed runs per measurement; each number is their median (default 20)\n"
    "  -e  routed experts per MoE layer (default 0: the dense model)\n"
    "  -rt router of the MoE layers: tc, ec or et (default et)\n"
    "  -g  size of the cuBLAS rate probe, a g x g x g product (default 8192)\n"
    "  -opt optimizer of the update: adamw, or muon for the matrices (default adamw)\n";

static int int_flag(const char* flag, const char* text, int lo, int hi) {
    char* end = nullptr;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || errno != 0 || v < lo || v > hi)
        fail("%s: '%s' is not an integer in [%d, %d]", flag, text, lo, hi);
    return (int)v;
}

static Options parse_flags(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; i++) {
        std::string f = argv[i];
        if (f == "-h" || f == "--help") {
            fputs(USAGE, stdout);
            exit(0);
        }
        if (f != "-m" && f != "-b" && f != "-t" && f != "-r" && f != "-e" && f != "-rt" && f != "-g" && f != "-opt")
            fail("unknown flag '%s'\n%s", argv[i], USAGE);
        if (i + 1 >= argc) fail("%s: missing value\n%s", argv[i], USAGE);
        const char* v = argv[++i];
        if (f == "-m") o.model = v;
        if (f == "-b") o.batch = int_flag("-b", v, 1, 65535);
        if (f == "-t") o.seq_len = int_flag("-t", v, 8, 65536);  // train_et's ranges
        if (f == "-r") o.repeats = int_flag("-r", v, 1, 100000);
        if (f == "-g") o.gemm_size = int_flag("-g", v, 16, 65536);
        if (f == "-e") o.experts = int_flag("-e", v, 0, 1024);
        if (f == "-opt") {
            std::string opt = v;
            if (opt != "adamw" && opt != "muon") fail("-opt: '%s' is not adamw or muon\n%s", v, USAGE);
            o.optimizer = opt == "muon" ? OptimizerKind::Muon : OptimizerKind::AdamW;
        }
        if (f == "-rt") {
            std::string r = v;
            if (r != "tc" && r != "ec" && r != "et") fail("-rt: '%s' is not a router (tc, ec or et)\n%s", v, USAGE);
            o.router = (int)(r == "tc" ? RouterKind::TC : r == "ec" ? RouterKind::EC : RouterKind::ET);
        }
    }
    return o;
}

// ----------------------------------------------------------------------------
// Random buffers on the device

// A 64-bit finaliser (the splitmix64 mixing steps): turns an index into
// well-spread bits, so each element draws its own deviate independently.
__device__ __forceinline__ uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// out[i] ~ N(0, std^2) by Box-Muller on two 24-bit uniforms of hash(seed, i):
// one parallel pass over any buffer, no generator state to carry.
template <typename T>
__global__ void fill_normal_kernel(T* out, size_t n, uint64_t seed, float std) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint64_t h = mix64(seed ^ mix64(i));
    float u1 = (float)((h >> 40) + 1) * 0x1p-24f;  // in (0, 1]: the log stays finite
    float u2 = (float)(h & 0xFFFFFF) * 0x1p-24f;
    out[i] = from_float<T>(std * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
}

template <typename T>
static void fill_normal(T* out, size_t n, uint64_t seed, float std) {
    fill_normal_kernel<<<ceil_div(n, THREADS), THREADS>>>(out, n, seed, std);
    launchCheck();
}

// ----------------------------------------------------------------------------
// Timing

struct Timing {
    double median = 0, min = 0, max = 0;  // ms
};

// Times `work`: `warmup` untimed runs, then one run per event pair. Each run
// is preceded by `prepare` (when given), outside the timed span. Everything
// is queued first and read after one sync, so the host never stalls the GPU.
struct EventTimer {
    std::vector<cudaEvent_t> start, stop;

    explicit EventTimer(int repeats) : start(repeats), stop(repeats) {
        for (int r = 0; r < repeats; r++) {
            cudaCheck(cudaEventCreate(&start[r]));
            cudaCheck(cudaEventCreate(&stop[r]));
        }
    }
    ~EventTimer() {
        for (size_t r = 0; r < start.size(); r++) {
            cudaCheck(cudaEventDestroy(start[r]));
            cudaCheck(cudaEventDestroy(stop[r]));
        }
    }
    Timing time(const std::function<void()>& work, const std::function<void()>& prepare = nullptr, int warmup = 1) {
        for (int w = 0; w < warmup; w++) {
            if (prepare) prepare();
            work();
        }
        for (size_t r = 0; r < start.size(); r++) {
            if (prepare) prepare();
            cudaCheck(cudaEventRecord(start[r]));
            work();
            cudaCheck(cudaEventRecord(stop[r]));
        }
        cudaCheck(cudaEventSynchronize(stop.back()));  // one stream: the last event closes everything
        std::vector<double> ms(start.size());
        for (size_t r = 0; r < start.size(); r++) {
            float t = 0;
            cudaCheck(cudaEventElapsedTime(&t, start[r], stop[r]));
            ms[r] = t;
        }
        std::sort(ms.begin(), ms.end());
        size_t n = ms.size();
        Timing result;
        result.median = (ms[(n - 1) / 2] + ms[n / 2]) / 2;
        result.min = ms.front();
        result.max = ms.back();
        return result;
    }
};

static void print_timing(const char* what, const Timing& t, int repeats) {
    printf("timed    %-38s median %9.3f ms (min %.3f, max %.3f, %d runs)\n", what, t.median, t.min, t.max, repeats);
}

// One row of the phase split: its launchers, what must be restored before
// each run (untimed), and its FLOPs where a rate means something (0: none).
struct Phase {
    const char* name;
    double flops;
    std::function<void()> work, prepare;
    Timing t;
};

// ----------------------------------------------------------------------------

int main(int argc, char** argv) {
    Options o = parse_flags(argc, argv);
    ModelConfig c;
    std::string err = model_preset(o.model, &c);
    if (!err.empty()) fail("-m: %s", err.c_str());
    c.vocab_size = VOCAB;
    c.seq_len = o.seq_len;
    c.n_experts = o.experts;
    c.router.kind = (RouterKind)o.router;
    c.router.et_warmup_steps = 1;  // the timed steps route by thresholds
    const bool moe = c.n_experts > 0;
    if (moe && c.n_layer < 2) fail("-e: %s has one layer; an MoE model needs 2 or more", o.model.c_str());
    if (moe && (int64_t)o.batch * o.seq_len % c.n_experts != 0)
        fail("-e: %d experts do not divide the %d tokens of a micro-batch", c.n_experts, o.batch * o.seq_len);
    const std::string model_name = moe ? string_format("%s, %d experts, %s router", o.model.c_str(), c.n_experts,
                                                       router_name(c.router.kind))
                                       : o.model + " dense";

    printf("command ");
    for (int i = 0; i < argc; i++) printf(" %s", argv[i]);
    printf("\n");
    GpuInfo gpu;
    err = gpu_open(0, &gpu);
    if (!err.empty()) fail("%s: bench_step times the training step on an NVIDIA GPU", err.c_str());
    printf("gpu      %s, %d SMs, %.0f GiB, compute capability %d.%d, peak bf16 %.0f TFLOP/s (the MFU denominator)\n",
           gpu.prop.name, gpu.prop.multiProcessorCount, gpu.prop.totalGlobalMem / 1073741824.0, gpu.prop.major,
           gpu.prop.minor, gpu.peak_bf16_flops / 1e12);

    const int B = o.batch, T = o.seq_len, N = B * T, L = c.n_layer, C = c.n_embd;
    const int H = c.n_head, KVH = c.n_kv_head, hd = c.head_dim(), Vp = c.padded_vocab();
    const int qkv_width = (H + 2 * KVH) * hd, ffn = 4 * C;
    const double flops_per_token = training_flops_per_token(c);
    printf("model    %s, %s: %d layers, width %d, %d heads of %d, vocab %d (padded %d), %s parameters, "
           "%.3f GFLOP/token for training\n",
           model_name.c_str(), PRECISION_NAME, L, C, H, hd, VOCAB, Vp, human_count(count_parameters(c).total).c_str(),
           flops_per_token / 1e9);
    printf("batch    B=%d x T=%d = %d tokens per micro-step\n", B, T, N);

    size_t free_before = 0, total_mem = 0;
    cudaCheck(cudaMemGetInfo(&free_before, &total_mem));
    Model model;
    model.config = c;
    model.optim.kind = o.optimizer;
    model.optim.lr = model.optim.lr_embedding = model.optim.lr_head = model.optim.lr_matrix = LR;
    model.optim.weight_decay = WEIGHT_DECAY;
    const Schedule schedule{LrSchedule::Wsd, 0.0, 0.0, 0, INT_MAX};  // constant
    size_t allocated = model_allocate(&model, B, T);
    Activations& a = model.acts;
    cublasHandle_t cublas = model.cublas;

    // SPEC init, then random values where the init has zeros (wo, proj, the
    // lm_head's real rows): a step on zero matrices would time the wrong thing.
    model_init_parameters(&model, SEED);
    for (size_t i = 0; i < model.tensors.size(); i++) {
        const ParamTensor& p = model.tensors[i];
        if (p.is_matmul && p.init_std == 0.0)
            fill_normal(model.master + model.offsets[i], (size_t)((p.rows - p.padding_rows) * p.cols), SEED + i, 0.02f);
    }
    copy_to_floatX(model.params, model.master, model.num_params);
    {
        std::vector<int> tokens(N), targets(N);
        Rng rng(seed_mix(SEED, 0xBE7C));
        for (int i = 0; i < N; i++) {
            tokens[i] = (int)rng.below(VOCAB);
            targets[i] = (int)rng.below(VOCAB);
        }
        cudaCheck(cudaMemcpy(a.tokens, tokens.data(), N * sizeof(int), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(a.targets, targets.data(), N * sizeof(int), cudaMemcpyHostToDevice));
    }

    // The step's pieces, exactly as train_et's loop calls them.
    const float dloss = 1.0f / TOTAL_BATCH;
    int step = 0;
    auto zero_grads = [&] { cudaCheck(cudaMemsetAsync(model.grads, 0, model.num_params * sizeof(float))); };
    auto micro_step = [&] {
        model_forward(&model, B, T, true, true, dloss);
        model_backward(&model, B, T);
    };
    // the router's per-step work (statistics reset, cutoff EMA) goes with the update
    auto update = [&] {
        model_update(&model, schedule, GRAD_CLIP, step);
        router_step_end(model.router);
        router_step_begin(model.router, ++step);
    };
    router_step_begin(model.router, step);

    // Warm-up: real steps (module load, cuBLAS heuristics, non-zero AdamW
    // state), then one look at the loss: a non-finite one would make every
    // time below meaningless.
    for (int s = 0; s < WARMUP_STEPS; s++) {
        zero_grads();
        cudaCheck(cudaMemsetAsync(model.loss_total, 0, sizeof(float)));
        micro_step();
        update();
    }
    float loss_total = 0, norm = 0;
    cudaCheck(cudaMemcpy(&loss_total, model.loss_total, sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(&norm, model.grad_norm_value, sizeof(float), cudaMemcpyDeviceToHost));
    if (!std::isfinite(loss_total) || !std::isfinite(norm))
        fail("warm-up: loss %f, grad norm %f: not finite, so the step cannot be timed", loss_total / N, norm);
    printf("warm-up  %d steps: loss %.3f (a uniform guess: ln %d = %.3f), grad norm %.3f\n", WARMUP_STEPS,
           loss_total / N, VOCAB, std::log((double)VOCAB), norm);
    if (moe) printf("routing  %s\n", router_routing_now(model.router));

    // Whole pieces. Zero first, so the micro-steps after it leave non-zero
    // gradients for the timed updates.
    EventTimer timer(o.repeats);
    Timing t_zero = timer.time(zero_grads);
    print_timing("zero grads (memset)", t_zero, o.repeats);
    Timing t_micro = timer.time(micro_step);
    print_timing("micro-step (forward + backward)", t_micro, o.repeats);
    Timing t_update = timer.time(update);
    const std::string update_name = std::string("update (grad_norm + ") + optimizer_name(o.optimizer) + ")";
    print_timing(update_name.c_str(), t_update, o.repeats);

    // The phases. Per layer, the parameter tensors by name (robust to the
    // storage order); the calls below mirror model_forward / model_backward.
    // In an MoE layer fc and proj are the shared expert's (width 2C), and
    // router is the first of its five tensors.
    struct LayerTensors {
        int wq, wo, fc, proj, width, router;
    };
    std::vector<LayerTensors> lt(L);
    for (int l = 0; l < L; l++) {
        std::string p = "h" + std::to_string(l) + ".";
        if (c.is_moe_layer(l))
            lt[l] = {model.tensor_index(p + "attn.wq"), model.tensor_index(p + "attn.wo"),
                     model.tensor_index(p + "moe.shared.fc"), model.tensor_index(p + "moe.shared.proj"), 2 * C,
                     model.tensor_index(p + "moe.router")};
        else
            lt[l] = {model.tensor_index(p + "attn.wq"), model.tensor_index(p + "attn.wo"),
                     model.tensor_index(p + "mlp.fc"), model.tensor_index(p + "mlp.proj"), ffn, -1};
    }
    const int wte = model.tensor_index("wte"), lm_head = model.tensor_index("lm_head");
    const size_t NC = (size_t)N * C;
    // The backward kernels accumulate into (rmsnorm) or rewrite in place
    // (rope_qknorm) these gradient buffers; run after run that would drift
    // towards inf or zero, so the phases using them restore them first.
    auto restore_grad_scratch = [&] {
        fill_normal(a.dresidual, NC, SEED + 101, 1.0f);
        fill_normal(a.scratch_narrow, NC, SEED + 102, 1.0f);
        fill_normal(a.scratch_wide, (size_t)N * std::max(ffn, qkv_width), SEED + 103, 1.0f);
    };
    const double att_fwd_flops = 4.0 * B * H * (T * (T + 1.0) / 2) * hd * L;
    double mm_fwd_flops = 2.0 * N * (double)C * Vp;
    for (int l = 0; l < L; l++) mm_fwd_flops += 2.0 * N * ((double)C * qkv_width + (double)C * C + 2.0 * C * lt[l].width);

    std::vector<Phase> phases;
    phases.push_back({"attention forward", att_fwd_flops, [&] {
        for (int l = 0; l < L; l++) {
            Activations::Layer& Ly = a.layers[l];
            attention_forward(Ly.atty, Ly.lse, Ly.qkv, B, T, H, KVH, hd);
        }
    }, nullptr, {}});
    phases.push_back({"attention backward", 2.5 * att_fwd_flops, [&] {
        for (int l = 0; l < L; l++) {
            Activations::Layer& Ly = a.layers[l];
            attention_backward(a.scratch_wide, a.scratch_narrow, Ly.atty, Ly.lse, Ly.qkv, a.att_delta, B, T, H, KVH, hd);
        }
    }, nullptr, {}});
    phases.push_back({"matmul forward (cuBLAS, + lm_head)", mm_fwd_flops, [&] {
        for (int l = 0; l < L; l++) {
            Activations::Layer& Ly = a.layers[l];
            matmul_forward(cublas, Ly.qkv, Ly.ln1, model.param(lt[l].wq), N, C, qkv_width);
            matmul_forward(cublas, a.scratch_narrow, Ly.atty, model.param(lt[l].wo), N, C, C);
            matmul_forward(cublas, Ly.fc_pre, Ly.ln2, model.param(lt[l].fc), N, C, lt[l].width);
            matmul_forward(cublas, a.scratch_narrow, a.ffn_act, model.param(lt[l].proj), N, lt[l].width, C);
        }
        matmul_forward(cublas, a.logits, a.lnf, model.param(lm_head), N, C, Vp);
    }, nullptr, {}});
    phases.push_back({"matmul backward (cuBLAS, + lm_head)", 2.0 * mm_fwd_flops, [&] {
        matmul_backward(cublas, a.scratch_narrow, model.grad(lm_head), a.logits, a.lnf, model.param(lm_head), N, C, Vp);
        for (int l = L - 1; l >= 0; l--) {
            Activations::Layer& Ly = a.layers[l];
            matmul_backward(cublas, a.scratch_wide, model.grad(lt[l].proj), a.dresidual, a.ffn_act, model.param(lt[l].proj),
                            N, lt[l].width, C);
            matmul_backward(cublas, a.scratch_narrow, model.grad(lt[l].fc), a.scratch_wide, Ly.ln2, model.param(lt[l].fc), N,
                            C, lt[l].width);
            matmul_backward(cublas, a.scratch_narrow, model.grad(lt[l].wo), a.dresidual, Ly.atty, model.param(lt[l].wo), N, C,
                            C);
            matmul_backward(cublas, a.scratch_narrow, model.grad(lt[l].wq), a.scratch_wide, Ly.ln1, model.param(lt[l].wq), N, C,
                            qkv_width);
        }
    }, nullptr, {}});
    phases.push_back({"norms (rmsnorm, rope_qknorm; fwd+bwd)", 0, [&] {
        rmsnorm_forward(a.x0, a.x0_rstd, a.residual, N, C);
        for (int l = 0; l < L; l++) {
            Activations::Layer& Ly = a.layers[l];
            rmsnorm_forward(Ly.ln1, Ly.ln1_rstd, a.residual, N, C);
            rope_qknorm_forward(Ly.qkv, Ly.qk_rstd, model.rope, B, T, H, KVH, hd);
            rmsnorm_forward(Ly.ln2, Ly.ln2_rstd, a.residual, N, C);
        }
        rmsnorm_forward(a.lnf, a.lnf_rstd, a.residual, N, C);
        rmsnorm_backward(a.dresidual, a.scratch_narrow, a.lnf, a.lnf_rstd, N, C);
        for (int l = L - 1; l >= 0; l--) {
            Activations::Layer& Ly = a.layers[l];
            rmsnorm_backward(a.dresidual, a.scratch_narrow, Ly.ln2, Ly.ln2_rstd, N, C);
            rope_qknorm_backward(a.scratch_wide, Ly.qkv, Ly.qk_rstd, model.rope, B, T, H, KVH, hd);
            rmsnorm_backward(a.dresidual, a.scratch_narrow, Ly.ln1, Ly.ln1_rstd, N, C);
        }
        rmsnorm_backward(a.scratch_narrow, a.dresidual, a.x0, a.x0_rstd, N, C);
    }, restore_grad_scratch, {}});
    // relu2_backward runs in place in the model (scratch_wide *= 2 relu(fc_pre));
    // repeated, that would underflow, so here it reads ffn_act instead: the
    // same bytes moved, a fixed non-zero input.
    phases.push_back({"elementwise (relu2, residual, copies)", 0, [&] {
        cudaCheck(cudaMemcpyAsync(a.residual, a.x0, NC * sizeof(floatX), cudaMemcpyDeviceToDevice));
        for (int l = 0; l < L; l++) {
            residual_forward(a.residual, a.scratch_narrow, NC);
            relu2_forward(a.ffn_act, a.layers[l].fc_pre, (size_t)N * lt[l].width);
            residual_forward(a.residual, a.scratch_narrow, NC);
        }
        cudaCheck(cudaMemsetAsync(a.dresidual, 0, NC * sizeof(floatX)));
        for (int l = L - 1; l >= 0; l--) {
            relu2_forward(a.ffn_act, a.layers[l].fc_pre, (size_t)N * lt[l].width);
            relu2_backward(a.scratch_wide, a.ffn_act, a.layers[l].fc_pre, (size_t)N * lt[l].width);
        }
        cudaCheck(cudaMemsetAsync(a.scratch_narrow, 0, NC * sizeof(floatX)));
    }, restore_grad_scratch, {}});
    phases.push_back({"embedding (fwd + sort + bwd)", 0, [&] {
        embedding_forward(a.residual, a.tokens, model.param(wte), N, C);
        embedding_backward(model.grad(wte), a.tokens, a.scratch_narrow, N, C, model.embedding_sort);
    }, restore_grad_scratch, {}});
    // The loss kernel turns the logits into dlogits in place: each run gets
    // fresh logits from the lm_head product, untimed.
    phases.push_back({"loss (softcap CE + sum)", 0, [&] {
        softcap_cross_entropy(a.losses, a.logits, a.targets, N, VOCAB, Vp, dloss, true);
        loss_sum(model.loss_total, a.losses, N);
    }, [&] { matmul_forward(cublas, a.logits, a.lnf, model.param(lm_head), N, C, Vp); }, {}});

    // The MoE phases (SPEC: router and selection, dispatch, experts, combine),
    // each over all MoE layers with the calls of moe_forward / moe_backward.
    const double expert_fwd_flops = 8.0 * N * c.router.top_k * (double)C * C * (L - 1);  // 2 x (C x 2C + 2C x C) per pair
    const RoutingPass train = RoutingPass::Train;
    Router& router = model.router;
    if (moe) {
        phases.push_back({"moe router + selection (fwd + bwd)", 0, [&] {
            for (int l = 1; l < L; l++)
                moe_route(router, l - 1, a.layers[l].ln2, moe_weights(&model, lt[l].router).router, B, T, train);
            for (int l = L - 1; l >= 1; l--)
                moe_router_backward(router, l - 1, cublas, a.scratch_narrow, a.layers[l].ln2,
                                    moe_weights(&model, lt[l].router).router, model.grad(lt[l].router), N);
        }, restore_grad_scratch, {}});
        phases.push_back({"moe dispatch", 0, [&] {
            for (int l = 1; l < L; l++) moe_dispatch(router, l - 1, 0, N, train);
        }, nullptr, {}});
        phases.push_back({"moe experts forward (grouped)", expert_fwd_flops, [&] {
            for (int l = 1; l < L; l++)
                moe_experts_forward(router, l - 1, a.layers[l].ln2, moe_weights(&model, lt[l].router), train);
        }, nullptr, {}});
        phases.push_back({"moe experts backward (grouped, + gates)", 2.0 * expert_fwd_flops, [&] {
            for (int l = L - 1; l >= 1; l--)
                moe_experts_backward(router, l - 1, a.dresidual, a.layers[l].ln2, moe_weights(&model, lt[l].router),
                                     moe_grads(&model, lt[l].router), N);
        }, nullptr, {}});
        phases.push_back({"moe combine (fwd + bwd)", 0, [&] {
            for (int l = 1; l < L; l++) moe_combine(router, l - 1, a.scratch_narrow, N, train);
            for (int l = L - 1; l >= 1; l--) moe_combine_backward(router, l - 1, a.scratch_narrow, N);
        }, restore_grad_scratch, {}});
    }

    double phase_sum = 0;
    for (Phase& p : phases) {
        p.t = timer.time(p.work, p.prepare);
        print_timing(p.name, p.t, o.repeats);
        phase_sum += p.t.median;
    }

    size_t free_after = 0;
    cudaCheck(cudaMemGetInfo(&free_after, &total_mem));
    const double GiB = 1073741824.0;
    const double run_bytes = (double)free_before - (double)free_after;

    // The cuBLAS bf16 ceiling on this GPU, measured: the attention target
    // and the matmul phases are read against it.
    const int G = o.gemm_size;
    const size_t gemm_n = (size_t)G * G;
    floatX *gemm_a = nullptr, *gemm_b = nullptr, *gemm_out = nullptr;
    cudaCheck(cudaMalloc(&gemm_a, gemm_n * sizeof(floatX)));
    cudaCheck(cudaMalloc(&gemm_b, gemm_n * sizeof(floatX)));
    cudaCheck(cudaMalloc(&gemm_out, gemm_n * sizeof(floatX)));
    fill_normal(gemm_a, gemm_n, SEED + 201, 1.0f);
    fill_normal(gemm_b, gemm_n, SEED + 202, 1.0f);
    Timing t_gemm = timer.time(
        [&] { matmul_forward(cublas, gemm_out, gemm_a, gemm_b, G, G, G); }, nullptr,
        GEMM_WARMUP);
    print_timing(string_format("cuBLAS %d^3 matmul_forward", G).c_str(), t_gemm, o.repeats);
    const double gemm_rate = 2.0 * G * (double)G * G / (t_gemm.median * 1e-3);
    cudaCheck(cudaFree(gemm_a));
    cudaCheck(cudaFree(gemm_b));
    cudaCheck(cudaFree(gemm_out));
    // The routed experts' yardstick: cuBLAS on the same shapes. The shared
    // expert's products are exactly one routed pair per token (N x C -> 2C ->
    // C), forward and backward, over the MoE layers; K of them take what
    // cuBLAS would for the routed experts' nominal N x K pairs.
    Timing t_shared;
    if (moe)
        t_shared = timer.time([&] {
            for (int l = 1; l < L; l++) {
                Activations::Layer& Ly = a.layers[l];
                matmul_forward(cublas, Ly.fc_pre, Ly.ln2, model.param(lt[l].fc), N, C, 2 * C);
                matmul_forward(cublas, a.scratch_narrow, a.ffn_act, model.param(lt[l].proj), N, 2 * C, C);
                matmul_backward(cublas, a.scratch_wide, model.grad(lt[l].proj), a.dresidual, a.ffn_act,
                                model.param(lt[l].proj), N, 2 * C, C);
                matmul_backward(cublas, a.scratch_narrow, model.grad(lt[l].fc), a.scratch_wide, Ly.ln2,
                                model.param(lt[l].fc), N, C, 2 * C);
            }
        }, restore_grad_scratch);

    // ---- the table
    const double peak = gpu.peak_bf16_flops;
    auto mfu_text = [&](double tokens_per_s) {
        return peak > 0 ? string_format("%.1f%%", 100.0 * flops_per_token * tokens_per_s / peak) : std::string("n/a");
    };
    printf("\n== bench_step: %s, %s, B=%d T=%d (%d tokens/micro-step), %s, median of %d runs ==\n",
           model_name.c_str(), PRECISION_NAME, B, T, N, gpu.prop.name, o.repeats);
    printf("%-40s %12s %9s %10s\n", "phase (all layers)", "ms/micro", "% micro", "TFLOP/s");
    for (const Phase& p : phases) {
        std::string rate = p.flops > 0 ? string_format("%.1f", p.flops / (p.t.median * 1e-3) / 1e12) : "";
        printf("%-40s %12.3f %8.1f%% %10s\n", p.name, p.t.median, 100.0 * p.t.median / t_micro.median, rate.c_str());
    }
    printf("%-40s %12.3f %8.1f%%\n", "sum of phases", phase_sum, 100.0 * phase_sum / t_micro.median);
    printf("%-40s %12.3f %8.1f%%   (min %.3f, max %.3f)\n", "measured micro-step (fwd + bwd)", t_micro.median, 100.0,
           t_micro.min, t_micro.max);
    printf("%-40s %12.3f %8.1f%%\n", "in no phase (measured - sum)", t_micro.median - phase_sum,
           100.0 * (t_micro.median - phase_sum) / t_micro.median);
    printf("%-40s %12.3f ms per optimizer step\n", ("optimizer " + update_name.substr(7)).c_str(), t_update.median);
    printf("%-40s %12.3f ms per optimizer step\n", "zero grads", t_zero.median);

    const double micro_tps = N / (t_micro.median * 1e-3);
    printf("\nmicro-step        %.3f ms, %.0f tokens/s, MFU %s\n", t_micro.median, micro_tps, mfu_text(micro_tps).c_str());
    if (TOTAL_BATCH % N == 0) {
        int accum = TOTAL_BATCH / N;
        double step_ms = accum * t_micro.median + t_zero.median + t_update.median;
        double step_tps = TOTAL_BATCH / (step_ms * 1e-3);
        printf("train_et step     -d %d = %d micro-steps + zero + update: %.1f ms, %.0f tokens/s, MFU %s\n",
               TOTAL_BATCH, accum, step_ms, step_tps, mfu_text(step_tps).c_str());
    } else {
        printf("train_et step     n/a: B x T = %d does not divide -d %d\n", N, TOTAL_BATCH);
    }

    if (moe) {
        double routing_ms = 0;  // SPEC target: routing + dispatch + combine under 10% of the step
        for (const Phase& p : phases)
            if (strncmp(p.name, "moe router", 10) == 0 || strncmp(p.name, "moe dispatch", 12) == 0 ||
                strncmp(p.name, "moe combine", 11) == 0)
                routing_ms += p.t.median;
        printf("moe routing       router + selection, dispatch and combine: %.3f ms, %.1f%% of the micro-step "
               "(SPEC target < 10%%)\n", routing_ms, 100.0 * routing_ms / t_micro.median);
        double experts_ms = 0;
        for (const Phase& p : phases)
            if (strncmp(p.name, "moe experts", 11) == 0) experts_ms += p.t.median;
        const double cublas_ms = c.router.top_k * t_shared.median;
        printf("moe experts       fwd+bwd %.3f ms at %.1f TFLOP/s; the same shapes in cuBLAS (the shared expert's "
               "products, x K): %.3f ms at %.1f TFLOP/s; ratio %.2fx\n", experts_ms,
               3.0 * expert_fwd_flops / (experts_ms * 1e-3) / 1e12, cublas_ms,
               3.0 * expert_fwd_flops / (cublas_ms * 1e-3) / 1e12, experts_ms / cublas_ms);
    }
    // phases[0] and [1]: attention forward and backward (pushed first).
    const double att_ms = phases[0].t.median + phases[1].t.median, att_flops = 3.5 * att_fwd_flops;
    const double att_bound_ms = att_flops / gemm_rate * 1e3;
    printf("cuBLAS bf16       %.1f TFLOP/s (%d^3, random data)\n", gemm_rate / 1e12, G);
    printf("attention         fwd+bwd %.3f ms at %.1f TFLOP/s; the same FLOPs at the cuBLAS rate: %.3f ms; "
           "ratio %.2fx (SPEC target <= 2x)\n",
           att_ms, att_flops / (att_ms * 1e-3) / 1e12, att_bound_ms, att_ms / att_bound_ms);
    printf("memory            %.2f GiB used by this run (peak: nothing freed), model_allocate counted %.2f GiB; "
           "%.2f of %.2f GiB in use on the GPU\n",
           run_bytes / GiB, allocated / GiB, (total_mem - free_after) / GiB, total_mem / GiB);

    model_free(&model);
    return 0;
}
