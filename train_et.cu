// train_et.cu: the program. Flags, data, start-up report, then training.
//
//   make train_et && ./train_et -e 16      ET-routed MoE, 16 experts, d12
//   ./train_et -h                          every flag
//
// Reading order: the options and their flag table; parsing and checking
// them (every bad flag or value is one line naming the flag and what is
// allowed); choosing the data (FineWeb-Edu shards, or the built-in synthetic
// corpus when the default location is empty); the start-up report (model
// size, parameters, FLOPs per token, data, batch); then the GPU.
#include <libgen.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#ifdef MULTI_GPU
#include <nccl.h>
#endif

#include "common.h"
#include "data/dataloader.h"
#include "data/synthetic.h"
#include "data/tokenizer.h"
#include "model.cuh"
#include "model_config.h"
#include "router.cuh"

#ifdef ENABLE_FP32
static const char* PRECISION_NAME = "FP32";
#else
static const char* PRECISION_NAME = "BF16";
#endif

static const char* DEFAULT_TRAIN = "data/edu_fineweb10B/edu_fineweb_train_*.bin";
static const char* DEFAULT_VAL = "data/edu_fineweb10B/edu_fineweb_val_*.bin";
static const int GPT2_VOCAB = 50257;
// The synthetic corpus: validation is shard 0, training shards 1..1024 of
// 2^20 tokens (about 1.07B tokens, 2048 steps of the default batch).
static const size_t SYNTHETIC_SHARD_TOKENS = 1 << 20;
static const size_t SYNTHETIC_TRAIN_SHARDS = 1024;

// ----------------------------------------------------------------------------
// Options. Choice-valued options are indexes into their flag's choice list.

struct Options {
    std::string train_glob = DEFAULT_TRAIN, val_glob = DEFAULT_VAL, out_dir = "log_et";
    int resume = 0, checkpoint_every = 1000, checkpoints_kept = 2;
    std::string model = "d12";
    int experts = 16, router = 2, top_k = 1, kv_heads = 0;
    double et_beta = 0.999;
    int et_warmup = -1;
    double capacity = 0.5;
    int tc_balance = 1;
    double aux_alpha = 0.001, lossfree_rate = 0.001;
    int ec_pool = 0, eval_routing = 0;
    int batch = 16, seq_len = 2048, total_batch = 524288, max_steps = -1;
    double lr = 6e-4;
    int warmup = -1;
    double final_lr_frac = 0.0;
    int schedule = 0;
    double warmdown_frac = 0.2, weight_decay = 0.1, grad_clip = 1.0;
    int recompute = 0;
    int val_every = 250, val_batches = 20, sample_every = 1000, sample_tokens = 64, log_every = 10;
    int seed = 1337, synthetic_vocab = GPT2_VOCAB;
};

struct Flag {
    const char* name;
    const char* group;  // a heading in -h and the README
    enum Kind { Int, Real, Text, Choice } kind;
    void* target;
    double lo, hi;        // allowed range (Int, Real)
    const char* choices;  // "a|b|c" (Choice)
    const char* help;
};

static std::vector<Flag> flag_table(Options& o) {
    return {
        {"-i", "data", Flag::Text, &o.train_glob, 0, 0, nullptr,
         "train shards (glob), or 'synthetic' for the built-in corpus; the default falls back to it when empty"},
        {"-j", "data", Flag::Text, &o.val_glob, 0, 0, nullptr, "validation shards (glob)"},
        {"-o", "data", Flag::Text, &o.out_dir, 0, 0, nullptr, "output dir: logs, checkpoints"},
        {"-y", "data", Flag::Int, &o.resume, 0, 1, nullptr, "1: resume from the latest checkpoint in -o"},
        {"-n", "data", Flag::Int, &o.checkpoint_every, 0, 1e9, nullptr, "checkpoint every N steps (0: only at the end)"},
        {"-nk", "data", Flag::Int, &o.checkpoints_kept, 0, 1e6, nullptr, "keep the last N checkpoints (0: all)"},
        {"-sv", "data", Flag::Int, &o.synthetic_vocab, 1024, 65536, nullptr, "vocab size of the synthetic corpus"},
        {"-m", "model", Flag::Text, &o.model, 0, 0, nullptr, "model preset: tiny, or dN (N even; d12, d20 = paper)"},
        {"-e", "model", Flag::Int, &o.experts, 0, 1024, nullptr, "routed experts per MoE layer (0: dense model)"},
        {"-r", "model", Flag::Choice, &o.router, 0, 0, "tc|ec|et", "router: token choice, expert choice, expert threshold"},
        {"-k", "model", Flag::Int, &o.top_k, 1, 64, nullptr, "K: routed experts per token, on average"},
        {"-kv", "model", Flag::Int, &o.kv_heads, 0, 1024, nullptr, "key/value heads, grouped-query attention (0: one per head)"},
        {"-eb", "routing", Flag::Real, &o.et_beta, 0, 0.999999, nullptr, "ET: cutoff EMA beta"},
        {"-ew", "routing", Flag::Int, &o.et_warmup, -1, 1e9, nullptr, "ET: steps routed by EC while cutoffs warm up (-1: 20% of the run)"},
        {"-ec", "routing", Flag::Real, &o.capacity, -1, 100, nullptr, "ET: training capacity clamp C, tokens per expert in [k(1-C), k(1+C)] (negative: off)"},
        {"-tb", "routing", Flag::Choice, &o.tc_balance, 0, 0, "none|aux|lossfree", "TC: load balancing"},
        {"-ta", "routing", Flag::Real, &o.aux_alpha, 0, 10, nullptr, "TC: aux loss coefficient alpha"},
        {"-tu", "routing", Flag::Real, &o.lossfree_rate, 0, 1, nullptr, "TC: loss-free bias update rate u"},
        {"-ep", "routing", Flag::Choice, &o.ec_pool, 0, 0, "micro|seq|global", "EC: routing pool (micro-batch on this GPU, one sequence, global batch)"},
        {"-er", "routing", Flag::Choice, &o.eval_routing, 0, 0, "threshold|batch", "EC/ET at eval: tracked cutoffs (causal) or the batch's top-k (not causal)"},
        {"-b", "batch", Flag::Int, &o.batch, 1, 65536, nullptr, "micro-batch: sequences per GPU per micro-step"},
        {"-t", "batch", Flag::Int, &o.seq_len, 8, 65536, nullptr, "sequence length in tokens"},
        {"-d", "batch", Flag::Int, &o.total_batch, 1, 1e9, nullptr, "total batch per step in tokens (gradient accumulation reaches it)"},
        {"-x", "batch", Flag::Int, &o.max_steps, -1, 1e9, nullptr, "training steps (-1: one epoch of the train data)"},
        {"-l", "optim", Flag::Real, &o.lr, 0, 1, nullptr, "peak learning rate (AdamW)"},
        {"-u", "optim", Flag::Int, &o.warmup, -1, 1e9, nullptr, "learning-rate warm-up steps (-1: 700, or 10% of a shorter run)"},
        {"-q", "optim", Flag::Real, &o.final_lr_frac, 0, 1, nullptr, "final learning rate, as a fraction of the peak"},
        {"-a", "optim", Flag::Choice, &o.schedule, 0, 0, "cosine|wsd", "schedule after warm-up: cosine, or constant then linear warm-down"},
        {"-wd", "optim", Flag::Real, &o.warmdown_frac, 0, 1, nullptr, "wsd: fraction of the run spent in the warm-down"},
        {"-c", "optim", Flag::Real, &o.weight_decay, 0, 10, nullptr, "AdamW weight decay (matrices only)"},
        {"-gc", "optim", Flag::Real, &o.grad_clip, 0, 1e6, nullptr, "clip the global gradient norm to this (0: off)"},
        {"-rc", "optim", Flag::Int, &o.recompute, 0, 1, nullptr, "1: recompute activations in backward to save memory"},
        {"-v", "eval", Flag::Int, &o.val_every, 0, 1e9, nullptr, "validate every N steps (0: off)"},
        {"-vm", "eval", Flag::Int, &o.val_batches, 1, 1e9, nullptr, "validation micro-batches per evaluation"},
        {"-s", "eval", Flag::Int, &o.sample_every, 0, 1e9, nullptr, "print a sample every N steps (0: off)"},
        {"-g", "eval", Flag::Int, &o.sample_tokens, 1, 65536, nullptr, "tokens per sample"},
        {"-li", "eval", Flag::Int, &o.log_every, 1, 1e9, nullptr, "log loss and routing metrics every N steps"},
        {"-sd", "eval", Flag::Int, &o.seed, 0, 2147483647, nullptr, "random seed (weights, data order, sampling)"},
    };
}

static std::vector<std::string> split_choices(const char* choices) {
    std::vector<std::string> out;
    std::string s = choices;
    for (size_t start = 0, bar; ; start = bar + 1) {
        bar = s.find('|', start);
        out.push_back(s.substr(start, bar - start));
        if (bar == std::string::npos) return out;
    }
}

static std::string flag_value(const Flag& f) {
    switch (f.kind) {
        case Flag::Int: return std::to_string(*(int*)f.target);
        case Flag::Real: return string_format("%g", *(double*)f.target);
        case Flag::Text: return *(std::string*)f.target;
        case Flag::Choice: return split_choices(f.choices)[*(int*)f.target];
    }
    return "";
}

static std::string flag_allowed(const Flag& f) {
    switch (f.kind) {
        case Flag::Int: return string_format("an integer in [%.0f, %.0f]", f.lo, f.hi);
        case Flag::Real: return string_format("a number in [%g, %g]", f.lo, f.hi);
        case Flag::Text: return "a value";
        case Flag::Choice: return std::string("one of ") + f.choices;
    }
    return "";
}

static void print_help() {
    Options defaults;
    std::vector<Flag> flags = flag_table(defaults);
    printf("train_et: train Mixture-of-Experts language models with expert-threshold (ET),\n"
           "expert-choice (EC) or token-choice (TC) routing, or a dense baseline.\n\n"
           "usage: ./train_et [-flag value]...      e.g. ./train_et -e 16 -r et -m d12\n");
    const char* group = "";
    for (const Flag& f : flags) {
        if (strcmp(group, f.group) != 0) printf("\n%s:\n", group = f.group);
        std::string arg = f.kind == Flag::Choice ? f.choices : f.kind == Flag::Int ? "int" : f.kind == Flag::Real ? "float" : "str";
        printf("  %-4s %-18s %s (default %s)\n", f.name, arg.c_str(), f.help, flag_value(f).c_str());
    }
    printf("\n  -h                      this help\n");
}

// Sets one flag from its text; returns "" or what is wrong with the value.
static std::string set_flag(const Flag& f, const char* text) {
    char* end = nullptr;
    errno = 0;
    if (f.kind == Flag::Int) {
        long long v = strtoll(text, &end, 10);
        if (*text == '\0' || *end != '\0' || errno) return string_format("'%s' is not an integer", text);
        if (v < f.lo || v > f.hi) return string_format("%s is out of range", text);
        *(int*)f.target = (int)v;
    } else if (f.kind == Flag::Real) {
        double v = strtod(text, &end);
        if (*text == '\0' || *end != '\0' || errno || !std::isfinite(v)) return string_format("'%s' is not a number", text);
        if (v < f.lo || v > f.hi) return string_format("%s is out of range", text);
        *(double*)f.target = v;
    } else if (f.kind == Flag::Text) {
        if (*text == '\0') return "empty value";
        *(std::string*)f.target = text;
    } else {
        std::vector<std::string> choices = split_choices(f.choices);
        for (size_t i = 0; i < choices.size(); i++)
            if (choices[i] == text) { *(int*)f.target = (int)i; return ""; }
        return string_format("unknown value '%s'", text);
    }
    return "";
}

static Options parse_flags(int argc, char** argv) {
    Options o;
    std::vector<Flag> flags = flag_table(o);
    for (int i = 1; i < argc; i++) {
        std::string name = argv[i];
        if (name == "-h" || name == "--help") { print_help(); exit(0); }
        const Flag* flag = nullptr;
        for (const Flag& f : flags)
            if (name == f.name) flag = &f;
        if (!flag) fail("unknown flag '%s' (./train_et -h lists them)", argv[i]);
        if (i + 1 >= argc) fail("%s: missing value (expected %s)", flag->name, flag_allowed(*flag).c_str());
        std::string err = set_flag(*flag, argv[++i]);
        if (!err.empty()) fail("%s: %s (expected %s)", flag->name, err.c_str(), flag_allowed(*flag).c_str());
    }
    return o;
}

// ----------------------------------------------------------------------------
// The model from the options; checks the combinations no single flag sees.

static ModelConfig model_from_options(const Options& o) {
    ModelConfig c;
    std::string err = model_preset(o.model, &c);
    if (!err.empty()) fail("-m: %s", err.c_str());
    c.seq_len = o.seq_len;
    c.n_experts = o.experts;
    if (o.kv_heads > 0) {
        if (c.n_head % o.kv_heads != 0)
            fail("-kv: %d key/value heads do not divide the %d heads of %s", o.kv_heads, c.n_head, o.model.c_str());
        c.n_kv_head = o.kv_heads;
    }
    if (c.n_experts > 0 && c.n_layer < 2)
        fail("-e: %s has %d layer; an MoE model needs 2 or more (layer 0 stays dense)", o.model.c_str(), c.n_layer);
    if (c.n_experts > 0 && o.top_k > c.n_experts)
        fail("-k: %d experts per token is more than the %d routed experts (-e)", o.top_k, c.n_experts);
    RouterConfig& r = c.router;
    r.kind = (RouterKind)o.router;
    r.top_k = o.top_k;
    r.et_beta = o.et_beta;
    r.et_warmup_steps = o.et_warmup;
    r.capacity = o.capacity;
    r.tc_balance = (TcBalance)o.tc_balance;
    r.aux_alpha = o.aux_alpha;
    r.lossfree_rate = o.lossfree_rate;
    r.ec_pool = (EcPool)o.ec_pool;
    r.eval_routing = (EvalRouting)o.eval_routing;
    return c;
}

// ----------------------------------------------------------------------------
// Data: the train and val token sources and the vocab size they imply.

struct DataSources {
    SyntheticCorpus synthetic;
    std::unique_ptr<TokenSource> train, val;  // val is null when there is none
    int vocab_size = GPT2_VOCAB;
    std::string tokenizer_path;  // empty: samples print token ids
    bool is_synthetic = false;
};

static std::unique_ptr<TokenSource> open_shards(const std::string& pattern, int vocab, const char* flag) {
    auto files = std::make_unique<ShardFiles>();
    std::string err = files->open(pattern, vocab);
    if (!err.empty()) fail("%s: %s", flag, err.c_str());
    return files;
}

static void open_data(const Options& o, DataSources* d) {
    bool synthetic = o.train_glob == "synthetic";
    if (!synthetic && glob_sorted(o.train_glob).empty()) {
        if (o.train_glob != DEFAULT_TRAIN)
            fail("-i: no files match '%s' (make shards with data/prepare.py, or use -i synthetic)", o.train_glob.c_str());
        synthetic = true;
        printf("+----------------------------------------------------------------------------+\n"
               "| No FineWeb-Edu shards at %-49s |\n"
               "| Training on the BUILT-IN SYNTHETIC CORPUS instead. For real data run       |\n"
               "|   python3 data/prepare.py fineweb          (see README: Data)              |\n"
               "+----------------------------------------------------------------------------+\n",
               DEFAULT_TRAIN);
    }
    if (synthetic) {
        if (o.val_glob != DEFAULT_VAL)
            fail("-j: the synthetic corpus validates on its own held-out shard; drop -j, or train on shards with -i");
        d->is_synthetic = true;
        d->vocab_size = o.synthetic_vocab;
        std::string err = d->synthetic.init((uint64_t)o.seed, o.synthetic_vocab);
        if (!err.empty()) fail("-sv: %s", err.c_str());
        d->train = std::make_unique<SyntheticShards>(&d->synthetic, 1, SYNTHETIC_TRAIN_SHARDS, SYNTHETIC_SHARD_TOKENS);
        d->val = std::make_unique<SyntheticShards>(&d->synthetic, 0, 1, SYNTHETIC_SHARD_TOKENS);
        return;
    }
    // The data script writes the id-to-bytes table beside the shards; it
    // fixes the vocab size. Without it the shards are taken as GPT-2's.
    std::string first = glob_sorted(o.train_glob)[0];
    std::string table = std::string(dirname(&first[0])) + "/gpt2_tokenizer.bin";
    if (file_exists(table)) {
        Tokenizer tok;
        std::string err = tok.load(table);
        if (!err.empty()) fail("%s (delete it, or rewrite it with data/prepare.py tokenizer)", err.c_str());
        d->vocab_size = tok.vocab_size();
        d->tokenizer_path = table;
    }
    d->train = open_shards(o.train_glob, d->vocab_size, "-i");
    if (!glob_sorted(o.val_glob).empty())
        d->val = open_shards(o.val_glob, d->vocab_size, "-j");
    else if (o.val_glob != DEFAULT_VAL)
        fail("-j: no files match '%s'", o.val_glob.c_str());
}

// ----------------------------------------------------------------------------
// Start-up report.

static void print_config(const Options& o, const ModelConfig& c, const DataSources& d, int grad_accum, int steps,
                         size_t steps_per_epoch) {
    ParamCounts n = count_parameters(c);
    printf("train_et | %s build", PRECISION_NAME);
#ifdef MULTI_GPU
    int nccl = 0;
    ncclGetVersion(&nccl);
    printf(", NCCL %d.%d.%d", nccl / 10000, nccl / 100 % 100, nccl % 100);
#else
    printf(", single GPU (NO_MULTI_GPU)");
#endif
    printf("\nmodel    %s: %d layers, width %d, %d heads of %d", c.preset.c_str(), c.n_layer, c.n_embd, c.n_head, c.head_dim());
    if (c.n_kv_head != c.n_head) printf(" (%d kv heads)", c.n_kv_head);
    printf(", vocab %d (head padded to %d), sequence %d\n", c.vocab_size, c.padded_vocab(), c.seq_len);
    if (c.n_experts == 0) {
        printf("ffn      dense, width %d in every layer\n", 4 * c.n_embd);
    } else {
        const RouterConfig& r = c.router;
        printf("moe      layers 1..%d: 1 shared + %d routed experts of width %d, K = %d; layer 0 dense\n",
               c.n_layer - 1, c.n_experts, 2 * c.n_embd, r.top_k);
        int64_t pool = r.ec_pool == EcPool::Sequence ? c.seq_len : (int64_t)o.batch * c.seq_len;
        printf("router   %s", router_name(r.kind));
        if (r.kind == RouterKind::TC) {
            const char* bal[] = {"none", "aux", "lossfree"};
            printf(", balancing %s", bal[(int)r.tc_balance]);
            if (r.tc_balance == TcBalance::Aux) printf(" (alpha %g)", r.aux_alpha);
            if (r.tc_balance == TcBalance::LossFree) printf(" (u %g)", r.lossfree_rate);
        } else {
            const char* pools[] = {"micro-batch", "sequence", "global batch"};
            printf(", pool %s, k = %.1f tokens per expert", pools[(int)r.ec_pool], expert_target(pool, r.top_k, c.n_experts));
        }
        if (r.kind == RouterKind::ET) {
            printf(", EMA beta %g, EC warm-up %d steps, capacity ", r.et_beta, et_warmup_steps(r, steps));
            if (r.capacity < 0) printf("off");
            else printf("%g", r.capacity);
        }
        if (r.kind != RouterKind::TC)
            printf(", eval routing %s", r.eval_routing == EvalRouting::Threshold ? "threshold (causal)" : "batch (not causal)");
        printf("\n");
    }
    printf("params   %s total, %s active per token (embedding %s, lm_head %s)\n", human_count(n.total).c_str(),
           human_count(n.active).c_str(), human_count((double)c.vocab_size * c.n_embd).c_str(),
           human_count((double)c.vocab_size * c.n_embd).c_str());
    printf("flops    %.3f GFLOP per token, training (6 x %s active matmul weights + causal attention)\n",
           training_flops_per_token(c) / 1e9, human_count(n.active_matmul).c_str());
    printf("data     train: %s\n", d.train->describe().c_str());
    printf("         val:   %s\n", d.val ? d.val->describe().c_str() : "none (validation off)");
    if (d.is_synthetic)
        printf("         synthetic corpus, seed %d: %d domains, loss floor (entropy rate) %.4f nats/token\n", o.seed,
               (int)d.synthetic.domains().size(), d.synthetic.entropy_rate());
    else
        printf("         tokenizer: %s\n", d.tokenizer_path.empty() ? "none beside the shards (GPT-2 ids assumed; samples print ids)"
                                                                     : d.tokenizer_path.c_str());
    printf("batch    %d x %d tokens per micro-step, %d micro-steps: %d tokens per step\n", o.batch, o.seq_len, grad_accum,
           o.total_batch);
    printf("steps    %d (%.2f epochs; %zu steps per epoch)\n", steps, (double)steps / steps_per_epoch, steps_per_epoch);
    const char* sched[] = {"cosine", "wsd"};
    int warmup = o.warmup >= 0 ? o.warmup : std::min(700, steps / 10);
    printf("optim    AdamW lr %g, %s schedule, warm-up %d, final %g x peak, weight decay %g, clip %g\n", o.lr,
           sched[o.schedule], warmup, o.final_lr_frac, o.weight_decay, o.grad_clip);
    printf("output   %s (checkpoint every %d steps%s)\n", o.out_dir.c_str(), o.checkpoint_every, o.resume ? ", resuming" : "");
    fflush(stdout);
}

int main(int argc, char** argv) {
    Options o = parse_flags(argc, argv);
    ModelConfig model = model_from_options(o);
    if (o.max_steps == 0) fail("-x: 0 steps; use a positive count, or -1 for one epoch");
    const int world = 1, rank = 0;  // one process per GPU: multi-GPU arrives with NCCL training
    int micro_tokens = o.batch * o.seq_len * world;
    if (o.total_batch % micro_tokens != 0)
        fail("-d: %d tokens is not a multiple of -b x -t x processes = %d x %d x %d = %d", o.total_batch, o.batch,
             o.seq_len, world, micro_tokens);
    int grad_accum = o.total_batch / micro_tokens;
    DataSources data;
    open_data(o, &data);
    model.vocab_size = data.vocab_size;

    DataLoader train_loader;
    std::string err = train_loader.init(data.train.get(), o.batch, o.seq_len, rank, world, (uint64_t)o.seed, true);
    if (!err.empty()) fail("-i: %s", err.c_str());
    size_t steps_per_epoch = train_loader.batches_per_epoch() / grad_accum;
    if (steps_per_epoch == 0)
        fail("-d: one epoch of the train data (%zu micro-batches) is less than one step of %d; use a smaller -d",
             train_loader.batches_per_epoch(), grad_accum);
    int steps = o.max_steps > 0 ? o.max_steps : (int)steps_per_epoch;
    print_config(o, model, data, grad_accum, steps, steps_per_epoch);

    GpuInfo gpu;
    err = gpu_open(rank, &gpu);
    if (!err.empty())
        fail("%s: train_et trains on an NVIDIA GPU; this machine has none (the CPU tests run with 'make test')",
             err.c_str());
    printf("gpu      %s, %d SMs, %.0f GiB, compute capability %d.%d, peak bf16 %.0f TFLOP/s\n", gpu.prop.name,
           gpu.prop.multiProcessorCount, gpu.prop.totalGlobalMem / 1073741824.0, gpu.prop.major, gpu.prop.minor,
           gpu.peak_bf16_flops / 1e12);
    printf("stopping after start-up: the training loop arrives with the dense transformer (model.cuh)\n");
    return 0;
}
