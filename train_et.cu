// train_et.cu: the program. Flags, data, start-up report, then training.
//
//   make train_et && ./train_et -e 16      ET-routed MoE, 16 experts, d12
//   ./train_et -h                          every flag
//
// Reading order: the options and their flag table; parsing and checking
// them (every bad flag or value is one line naming the flag and what is
// allowed); the run's log (console, train.log and train.jsonl); the output
// dir; choosing the data (FineWeb-Edu shards, every token checked, or the
// built-in synthetic corpus when the default location is empty); warnings
// about settings that cannot do what was meant; the start-up report (model
// size, parameters, FLOPs per token, data, batch, and the device memory and
// checkpoint size, both worked out before the GPU is touched); checkpoints;
// the run record that opens train.jsonl; evaluation, sampling and the
// routing statistics of the logs; then the GPU and the training loop.
#include <libgen.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "data/dataloader.h"
#include "data/synthetic.h"
#include "data/tokenizer.h"
#include "model.cuh"  // and router.cuh, which builds on its kernels
#include "model_config.h"
#include "core_eval.cuh"
#include "presets.h"
#include "schedule.h"

#ifdef ENABLE_FP32
static const char* PRECISION_NAME = "FP32";
#else
static const char* PRECISION_NAME = "BF16";
#endif

static const char* DEFAULT_TRAIN = "data/edu_fineweb10B/edu_fineweb_train_*.bin";
static const char* DEFAULT_VAL = "data/edu_fineweb10B/edu_fineweb_val_*.bin";
static const int GPT2_VOCAB = 50257;
// The synthetic corpus: validation is shard 0, training shards 1..1024 of
// 2^20 tokens (about 1.07B tokens: 1984 steps of the default batch, as each
// shard's tail that does not fill a batch is skipped).
static const size_t SYNTHETIC_SHARD_TOKENS = 1 << 20;
static const size_t SYNTHETIC_TRAIN_SHARDS = 1024;
// The device memory a run's plan is held to where no GPU says otherwise: an
// H200's (143,771 MiB, as nvidia-smi shows it; the paper's GPU).
static const size_t H200_MEMORY = 143771ull << 20;
// The commit train_et was built from and whether the tree had changes
// (Makefile; empty outside a git checkout), for the run record.
#ifndef GIT_COMMIT
#define GIT_COMMIT ""
#define GIT_DIRTY 0
#endif

// ----------------------------------------------------------------------------
// Options. Choice-valued options are indexes into their flag's choice list,
// which lists the values in the order of their enum (RouterKind, ...).

struct Options {
    std::string train_glob = DEFAULT_TRAIN, val_glob = DEFAULT_VAL, out_dir = "log_et";
    int resume = 0, checkpoint_every = 1000, checkpoints_kept = 2;
    std::string preset = "none", model = "d12";
    int experts = 16, router = (int)RouterKind::ET, top_k = 1, kv_heads = 0;
    double et_beta = 0.999;
    int et_warmup = -1;
    double capacity = 0.5;
    int tc_balance = (int)TcBalance::Aux;
    double aux_alpha = 0.001, lossfree_rate = 0.001;
    int ec_pool = (int)EcPool::MicroBatch, eval_routing = (int)EvalRouting::Threshold;
    int batch = 16, seq_len = 2048, total_batch = 524288, max_steps = -1;
    int optimizer = (int)OptimizerKind::AdamW;
    double lr = 6e-4, lr_embedding = 0.2, lr_head = 0.004, lr_matrix = 0.02;
    int router_optimizer = (int)RouterGroup::AdamW, mup_scope = (int)MupScope::AdamW;
    double beta1 = 0.9, beta2 = 0.95, adam_eps = 1e-8;
    int expert_momentum_warmup = 1;
    int warmup = -1;
    double final_lr_frac = 0.0;
    int schedule = (int)LrSchedule::Cosine;
    double warmdown_frac = 0.2, weight_decay = -1, grad_clip = 1.0;
    int val_every = 250, val_batches = 20, sample_every = 1000, sample_tokens = 64, log_every = 10;
    std::string core_path = "none", routes_path = "none";
    int core_every = 0, routes_offset = 0, eval_only = 0;
    int seed = 1337, synthetic_vocab = GPT2_VOCAB;
    std::string rendezvous_dir = "";  // -pd: "" = -o
    double rank_time_limit = 45;
    std::vector<std::string> given;  // the flags on the command line, in order (twice if given twice)

    bool was_given(const std::string& flag) const { return std::find(given.begin(), given.end(), flag) != given.end(); }
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
        {"-eo", "data", Flag::Int, &o.eval_only, 0, 1, nullptr, "1: evaluate the latest checkpoint in -o (validation, -ce, -rf) and exit without training"},
        {"-y", "data", Flag::Int, &o.resume, 0, 1, nullptr, "1: resume from the latest checkpoint in -o (-l, -le, -lh, -lm, -om, -u, -q, -a, -wd, -gc may change)"},
        {"-n", "data", Flag::Int, &o.checkpoint_every, 0, 1e9, nullptr, "checkpoint every N steps (0: only at the end)"},
        {"-nk", "data", Flag::Int, &o.checkpoints_kept, 0, 1e6, nullptr, "keep the last N checkpoints (0: all)"},
        {"-sv", "data", Flag::Int, &o.synthetic_vocab, 1024, 65536, nullptr, "vocab size of the synthetic corpus (-i synthetic only)"},
        {"-preset", "model", Flag::Text, &o.preset, 0, 0, nullptr, "a row of the paper's Tables 1 and 2 (listed below): sets its flags; flags given on the command line win"},
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
        {"-ep", "routing", Flag::Choice, &o.ec_pool, 0, 0, "micro|seq|global", "EC, and ET's cutoff statistic: routing pool (micro-batch on this GPU, one sequence, every rank's micro-batches)"},
        {"-er", "routing", Flag::Choice, &o.eval_routing, 0, 0, "threshold|batch", "EC/ET at eval: tracked cutoffs (causal) or the batch's top-k (not causal)"},
        {"-b", "batch", Flag::Int, &o.batch, 1, 65535, nullptr, "micro-batch: sequences per GPU per micro-step"},
        {"-t", "batch", Flag::Int, &o.seq_len, 8, 65536, nullptr, "sequence length in tokens"},
        {"-d", "batch", Flag::Int, &o.total_batch, 1, 1e9, nullptr, "total batch per step in tokens (gradient accumulation reaches it)"},
        {"-x", "batch", Flag::Int, &o.max_steps, -1, 1e9, nullptr, "training steps (-1: one epoch of the train data)"},
        {"-opt", "optim", Flag::Choice, &o.optimizer, 0, 0, "adamw|muon", "optimizer: AdamW for every tensor, or the paper's Muon for the matrices and AdamW for wte and lm_head"},
        {"-l", "optim", Flag::Real, &o.lr, 0, 1, nullptr, "-opt adamw: peak learning rate of every tensor"},
        {"-le", "optim", Flag::Real, &o.lr_embedding, 0, 10, nullptr, "-opt muon: peak learning rate of wte (AdamW), before the muP factor"},
        {"-lh", "optim", Flag::Real, &o.lr_head, 0, 10, nullptr, "-opt muon: peak learning rate of lm_head (AdamW), before the muP factor"},
        {"-lm", "optim", Flag::Real, &o.lr_matrix, 0, 10, nullptr, "-opt muon: peak learning rate of the matrices (Muon)"},
        {"-og", "optim", Flag::Choice, &o.router_optimizer, 0, 0, "adamw|muon", "-opt muon: the router's optimizer (adamw at -lh: the authors' code; muon at -lm: the paper's Table 7)"},
        {"-om", "optim", Flag::Choice, &o.mup_scope, 0, 0, "adamw|all", "-opt muon: groups the muP factor (n_embd/768)^-1/2 scales (adamw: the code; all: the paper)"},
        {"-me", "optim", Flag::Int, &o.expert_momentum_warmup, 0, 1, nullptr, "-opt muon: 1: EC's and ET's routed experts warm their Muon momentum up too; 0: constant 0.95 (the authors' expert-parallel runs)"},
        {"-b1", "optim", Flag::Real, &o.beta1, 0, 0.999999, nullptr, "AdamW beta1"},
        {"-b2", "optim", Flag::Real, &o.beta2, 0, 0.999999, nullptr, "AdamW beta2"},
        {"-ae", "optim", Flag::Real, &o.adam_eps, 1e-30, 1, nullptr, "AdamW epsilon"},
        {"-u", "optim", Flag::Int, &o.warmup, -1, 1e9, nullptr, "learning-rate warm-up steps of the AdamW groups; Muon never warms up (-1: 700, or 10% of a shorter run)"},
        {"-q", "optim", Flag::Real, &o.final_lr_frac, 0, 1, nullptr, "final learning rate, as a fraction of the peak"},
        {"-a", "optim", Flag::Choice, &o.schedule, 0, 0, "cosine|wsd|linear", "schedule after warm-up: cosine, constant then linear warm-down (the code's), or linear decay (the paper's)"},
        {"-wd", "optim", Flag::Real, &o.warmdown_frac, 0, 1, nullptr, "wsd: fraction of the run spent in the warm-down"},
        {"-c", "optim", Flag::Real, &o.weight_decay, -1, 10, nullptr, "weight decay of the matrices (AdamW: decoupled; Muon: w *= 1 - lr c; -1: 0.1 with -opt adamw, 0 with -opt muon as the paper)"},
        {"-gc", "optim", Flag::Real, &o.grad_clip, 0, 1e6, nullptr, "clip the global gradient norm to this (0: off)"},
        {"-v", "eval", Flag::Int, &o.val_every, 0, 1e9, nullptr, "validate every N steps (0: off)"},
        {"-vm", "eval", Flag::Int, &o.val_batches, 1, 1e9, nullptr, "validation micro-batches per evaluation"},
        {"-s", "eval", Flag::Int, &o.sample_every, 0, 1e9, nullptr, "print a sample every N steps (0: off)"},
        {"-g", "eval", Flag::Int, &o.sample_tokens, 1, 65536, nullptr, "tokens per sample"},
        {"-ce", "eval", Flag::Text, &o.core_path, 0, 0, nullptr, "CORE eval file (data/core.py writes it): score it at the end (none: off)"},
        {"-cv", "eval", Flag::Int, &o.core_every, 0, 1e9, nullptr, "-ce: score CORE every N steps too (0: only at the end)"},
        {"-rf", "eval", Flag::Text, &o.routes_path, 0, 0, nullptr, "at the end, write each token's experts in every MoE layer for a text: a shard file, or 'synthetic' (none: off)"},
        {"-ro", "eval", Flag::Int, &o.routes_offset, 0, 2147483647, nullptr, "-rf: the text's first token in the shard (it takes up to -t tokens)"},
        {"-li", "eval", Flag::Int, &o.log_every, 1, 1e9, nullptr, "log the loss, speed and gradient norm every N steps"},
        {"-sd", "eval", Flag::Int, &o.seed, 0, 2147483647, nullptr, "random seed (weights, data order, sampling)"},
        {"-pd", "ranks", Flag::Text, &o.rendezvous_dir, 0, 0, nullptr, "several processes (mpirun, srun): a directory every rank sees, for the NCCL id without MPI and the heartbeats (default: -o)"},
        {"-pt", "ranks", Flag::Real, &o.rank_time_limit, 1, 1e6, nullptr, "several processes: seconds without progress (or 3 x the slowest step) before a rank names the lost ranks and exits"},
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
    printf("\npresets (-preset NAME; docs/settings.md: how each follows the paper and its code):\n");
    for (const Preset& p : PRESETS) printf("  %-16s %s\n", p.name, p.row);
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

// A pattern the shell expanded into `first` and `second` (two of its files),
// guessed back: their common start without its trailing digits, '*', their
// common end. data/x/train_000001.bin, data/x/train_000002.bin -> data/x/train_*.bin
static std::string guess_glob(const std::string& first, const std::string& second) {
    size_t start = 0, end = 0;
    while (start < first.size() && start < second.size() && first[start] == second[start]) start++;
    while (end < first.size() - start && end < second.size() - start &&
           first[first.size() - 1 - end] == second[second.size() - 1 - end])
        end++;
    while (start > 0 && isdigit((unsigned char)first[start - 1])) start--;
    return first.substr(0, start) + "*" + first.substr(first.size() - end);
}

// Sets the flags of `args` (flag, value, flag, value, ...) in o; `given`
// records them as the command line's.
static void set_flags(Options& o, const std::vector<Flag>& flags, const std::vector<std::string>& args, bool given) {
    for (size_t i = 0; i < args.size(); i++) {
        const std::string& name = args[i];
        if (name == "-h" || name == "--help") { print_help(); exit(0); }
        const Flag* flag = nullptr;
        for (const Flag& f : flags)
            if (name == f.name) flag = &f;
        if (!flag && name[0] != '-' && i >= 2 && args[i - 2][0] == '-') {
            const Flag* before = nullptr;
            for (const Flag& f : flags)
                if (f.name == args[i - 2]) before = &f;
            if (before && before->kind == Flag::Text)
                fail("'%s' is not a flag: it follows %s %s as if the shell had expanded an unquoted glob into "
                     "several files; quote the glob: %s '%s'", name.c_str(), args[i - 2].c_str(), args[i - 1].c_str(),
                     args[i - 2].c_str(), guess_glob(args[i - 1], name).c_str());
            if (before)
                fail("'%s' is not a flag: %s takes one value (here '%s')", name.c_str(), args[i - 2].c_str(),
                     args[i - 1].c_str());
        }
        if (!flag) fail("unknown flag '%s' (./train_et -h lists them)", name.c_str());
        if (i + 1 >= args.size()) fail("%s: missing value (expected %s)", flag->name, flag_allowed(*flag).c_str());
        std::string err = set_flag(*flag, args[++i].c_str());
        if (!err.empty()) fail("%s: %s (expected %s)", flag->name, err.c_str(), flag_allowed(*flag).c_str());
        if (given) o.given.push_back(flag->name);
    }
}

// A -preset's flags first, wherever it stands; then the command line's, which win.
static Options parse_flags(int argc, char** argv) {
    Options o;
    std::vector<Flag> flags = flag_table(o);
    const std::vector<std::string> args(argv + 1, argv + argc);
    for (size_t i = 0; i + 1 < args.size(); i++) {
        if (args[i] != "-preset") continue;
        if (args[i + 1] == "none") continue;
        const Preset* p = find_preset(args[i + 1]);
        if (!p) fail("-preset: unknown preset '%s' (the presets: %s)", args[i + 1].c_str(), preset_names().c_str());
        set_flags(o, flags, preset_words(*p), false);
    }
    set_flags(o, flags, args, true);
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
    // EC picks, and ET's statistic and clamp track, each expert's k-th best
    // token of a pool, so k = pool x K / E must be a whole number; as pool and
    // K are positive, a whole k is also at least 1.
    int64_t pool = routing_pool_tokens(r.ec_pool, o.batch, o.seq_len);
    if (c.n_experts > 0 && r.kind != RouterKind::TC && pool * r.top_k % c.n_experts != 0)
        fail("-e: k = pool x K / E = %lld x %d / %d tokens per expert is not a whole number; choose -e dividing %lld "
             "(the pool is %s)", (long long)pool, r.top_k, c.n_experts, (long long)pool * r.top_k,
             r.ec_pool == EcPool::Sequence ? "one sequence, -t" : "the micro-batch, -b x -t");
    return c;
}

// -c -1: llm.c's 0.1 for AdamW everywhere; none for the paper's recipe,
// whose text and code both train without weight decay.
static double weight_decay(const Options& o) {
    return o.weight_decay >= 0 ? o.weight_decay : o.optimizer == (int)OptimizerKind::Muon ? 0.0 : 0.1;
}

static OptimizerConfig optimizer_from_options(const Options& o) {
    OptimizerConfig opt;
    opt.kind = (OptimizerKind)o.optimizer;
    opt.lr = o.lr;
    opt.lr_embedding = o.lr_embedding;
    opt.lr_head = o.lr_head;
    opt.lr_matrix = o.lr_matrix;
    opt.router = (RouterGroup)o.router_optimizer;
    opt.mup = (MupScope)o.mup_scope;
    opt.beta1 = o.beta1;
    opt.beta2 = o.beta2;
    opt.eps = o.adam_eps;
    opt.expert_momentum_warmup = o.expert_momentum_warmup != 0;
    opt.weight_decay = weight_decay(o);
    return opt;
}

// Micro-steps per step: -d over the tokens of one micro-step of every
// process. A -d that is no multiple of them names the nearest that are.
static int gradient_accumulation(const Options& o, int world) {
    const int64_t micro = (int64_t)o.batch * o.seq_len * world;
    if (micro > INT_MAX)
        fail("-b x -t: %lld tokens per micro-step is more than %d; use a smaller -b or -t", (long long)micro, INT_MAX);
    if (o.total_batch % micro == 0) return (int)(o.total_batch / micro);
    const int64_t below = o.total_batch / micro * micro, above = below + micro;
    const std::string nearest = below > 0 ? string_format("%lld or %lld", (long long)below, (long long)above)
                                          : string_format("%lld", (long long)above);
    fail("-d: %d tokens is not a multiple of -b x -t x processes = %d x %d x %d = %lld; the nearest -d that are: %s",
         o.total_batch, o.batch, o.seq_len, world, (long long)micro, nearest.c_str());
}

// ----------------------------------------------------------------------------
// The run's log. Everything the run prints goes through print(): to the
// console and to <out>/train.log, so the log holds what the console showed.
// Until open() (start-up done, the GPU found) the text is kept and then
// written first: the start-up report is in the log, and a start-up that
// fails leaves no log behind. record() writes one JSON line to train.jsonl.

struct RunLog {
    FILE *text = nullptr, *json = nullptr;
    std::string kept;  // printed before open()
    bool quiet = false;  // every rank but 0 of several: rank 0 speaks for the run

    // A fresh run starts new logs; a resumed one appends to its own.
    void open(const std::string& dir, bool append) {
        if (quiet) return;
        text = fopen((dir + "/train.log").c_str(), append ? "a" : "w");
        json = fopen((dir + "/train.jsonl").c_str(), append ? "a" : "w");
        if (!text || !json) fail("-o: cannot write logs in %s (%s)", dir.c_str(), strerror(errno));
        fputs(kept.c_str(), text);
        fflush(text);
        kept.clear();
        fail_log = text;
    }
    void print(const char* fmt, ...) __attribute__((format(printf, 2, 3))) {
        if (quiet) return;
        char buf[4096];
        va_list args;
        va_start(args, fmt);
        vsnprintf(buf, sizeof(buf), fmt, args);
        va_end(args);
        fputs(buf, stdout);
        fflush(stdout);
        if (!text) { kept += buf; return; }
        fputs(buf, text);
        fflush(text);
    }
    void warn(const std::string& what) { print("warning: %s\n", what.c_str()); }
    void record(const std::string& line) {
        if (quiet) return;
        fprintf(json, "%s\n", line.c_str());
        fflush(json);
    }
};

static std::string json_string(const std::string& text) {
    std::string out = "\"";
    for (unsigned char c : text) {
        if (c == '"' || c == '\\') out += '\\';
        if (c < 0x20) out += string_format("\\u%04x", c);
        else out += (char)c;
    }
    return out + "\"";
}

// JSON has no NaN or infinity: a number that is not finite is written null.
static std::string json_number(double x, const char* fmt = "%.6g") {
    return std::isfinite(x) ? string_format(fmt, x) : "null";
}

// Counts are written whole (%.6g would round a count past a million).
template <typename T>
static std::string json_array(const std::vector<T>& values) {
    std::string out = "[";
    for (size_t i = 0; i < values.size(); i++) {
        if (i) out += ", ";
        if constexpr (std::is_integral_v<T>) out += std::to_string(values[i]);
        else if constexpr (std::is_same_v<T, std::string>) out += json_string(values[i]);
        else out += json_number(values[i]);
    }
    return out + "]";
}

// ----------------------------------------------------------------------------
// The output dir: made (with its parents) and checked writable at start-up,
// and it must hold checkpoints exactly when the run resumes.

static void prepare_output_dir(const Options& o) {
    std::string err = make_dirs(o.out_dir);
    if (!err.empty()) fail("-o: %s", err.c_str());
    bool has_checkpoints = !glob_sorted(o.out_dir + "/ckpt_*.bin").empty();
    const bool from_checkpoint = o.resume || o.eval_only;
    if (!from_checkpoint && has_checkpoints)
        fail("-o: %s holds checkpoints of an earlier run: resume it with -y 1 (or evaluate it with -eo 1), or choose "
             "another -o", o.out_dir.c_str());
    if (from_checkpoint && !has_checkpoints)
        fail("%s: no checkpoint (ckpt_*.bin) in %s to %s", o.eval_only ? "-eo 1" : "-y 1", o.out_dir.c_str(),
             o.eval_only ? "evaluate" : "resume from");
}

// ----------------------------------------------------------------------------
// Data: the train and val token sources and the vocab size they imply.

struct DataSources {
    SyntheticCorpus synthetic;
    std::unique_ptr<TokenSource> train, val;  // val is null when there is none
    std::vector<std::string> train_files, val_files;  // the shards the globs matched
    int vocab_size = GPT2_VOCAB;
    int eot = GPT2_VOCAB - 1;  // the end-of-text id, where samples start
    std::string tokenizer_path;  // empty: samples print token ids
    bool is_synthetic = false;
    double check_seconds = 0;  // checking every token of every shard
};

static std::unique_ptr<TokenSource> open_shards(const std::string& pattern, int vocab, const char* flag,
                                                std::vector<std::string>* matched) {
    auto files = std::make_unique<ShardFiles>();
    std::string err = files->open(pattern, vocab);
    if (!err.empty()) fail("%s: %s", flag, err.c_str());
    *matched = files->files();
    return files;
}

static void open_data(const Options& o, DataSources* d, RunLog& log) {
    bool synthetic = o.train_glob == "synthetic";
    if (!synthetic && glob_sorted(o.train_glob).empty()) {
        if (o.train_glob != DEFAULT_TRAIN)
            fail("-i: no files match '%s' (make shards with data/prepare.py, or use -i synthetic)", o.train_glob.c_str());
        if (!glob_sorted(o.val_glob).empty())
            fail("-i: %s holds validation shards but no train shards (%s): prepare the data again with "
                 "data/prepare.py fineweb, which splits a small input into both, or use -i synthetic",
                 DEFAULT_VAL, DEFAULT_TRAIN);
        synthetic = true;
        log.print("+----------------------------------------------------------------------------+\n"
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
        d->eot = d->synthetic.eot();
        d->train = std::make_unique<SyntheticShards>(&d->synthetic, 1, SYNTHETIC_TRAIN_SHARDS, SYNTHETIC_SHARD_TOKENS);
        d->val = std::make_unique<SyntheticShards>(&d->synthetic, 0, 1, SYNTHETIC_SHARD_TOKENS);
        return;
    }
    // The data script writes the id-to-bytes table beside the shards; it
    // fixes the vocab size and the EOT: tokenizer.bin for a tokenizer it
    // trained, gpt2_tokenizer.bin for GPT-2. Without one the shards are taken
    // as GPT-2's.
    std::string first = glob_sorted(o.train_glob)[0];
    std::string dir = dirname(&first[0]);
    for (const char* name : {"tokenizer.bin", "gpt2_tokenizer.bin"}) {
        std::string table = dir + "/" + name;
        if (!file_exists(table)) continue;
        Tokenizer tok;
        std::string err = tok.load(table);
        if (!err.empty()) fail("%s (delete it, or rewrite it with data/prepare.py tokenizer)", err.c_str());
        d->vocab_size = tok.vocab_size();
        d->eot = tok.eot();
        d->tokenizer_path = table;
        break;
    }
    const double start = wall_seconds();
    d->train = open_shards(o.train_glob, d->vocab_size, "-i", &d->train_files);
    // the default validation shards belong to the default training shards
    bool default_pair = o.train_glob == DEFAULT_TRAIN || o.val_glob != DEFAULT_VAL;
    if (default_pair && !glob_sorted(o.val_glob).empty())
        d->val = open_shards(o.val_glob, d->vocab_size, "-j", &d->val_files);
    else if (o.val_glob != DEFAULT_VAL)
        fail("-j: no files match '%s'", o.val_glob.c_str());
    d->check_seconds = wall_seconds() - start;
}

// ----------------------------------------------------------------------------
// Settings that cannot do what the user wants: the run still starts, with a
// one-line warning each (see settings_warnings).

// The router flags, and the routers that read them.
static const struct { const char* flag; bool tc, ec, et; } ROUTER_FLAGS[] = {
    {"-r", true, true, true},     {"-k", true, true, true},     {"-eb", false, true, true},
    {"-ew", false, false, true},  {"-ec", false, false, true},  {"-tb", true, false, false},
    {"-ta", true, false, false},  {"-tu", true, false, false},  {"-ep", false, true, true},
    {"-er", false, true, true},
};

static std::vector<std::string> settings_warnings(const Options& o, const ModelConfig& c, const DataSources& d,
                                                  int steps, int lr_warmup, int world) {
    std::vector<std::string> out;
    std::map<std::string, int> times;
    for (const std::string& flag : o.given) times[flag]++;
    Options values = o;
    for (const Flag& f : flag_table(values))
        if (times[f.name] > 1)
            out.push_back(string_format("%s given %d times: the last value, %s, is used", f.name, times[f.name],
                                        flag_value(f).c_str()));
    const RouterConfig& r = c.router;
    const char* router = router_name(r.kind);
    for (const auto& rf : ROUTER_FLAGS) {
        if (!o.was_given(rf.flag)) continue;
        bool used = r.kind == RouterKind::TC ? rf.tc : r.kind == RouterKind::EC ? rf.ec : rf.et;
        const char* users = rf.tc && rf.ec ? "every router" : rf.tc ? "token choice (-r tc)"
                            : rf.ec ? "expert choice and expert threshold (-r ec, et)" : "expert threshold (-r et)";
        if (c.n_experts == 0)
            out.push_back(string_format("%s: ignored: -e 0 is a dense model, which has no router", rf.flag));
        else if (!used)
            out.push_back(string_format("%s: ignored: it is read by %s, and the router is %s", rf.flag, users, router));
    }
    if (c.n_experts > 0 && r.kind == RouterKind::TC) {
        if (o.was_given("-ta") && r.tc_balance != TcBalance::Aux)
            out.push_back("-ta: ignored: it weighs the aux loss of -tb aux, and -tb is not aux");
        if (o.was_given("-tu") && r.tc_balance != TcBalance::LossFree)
            out.push_back("-tu: ignored: it is the bias step of -tb lossfree, and -tb is not lossfree");
    }
    if (c.n_experts > 0 && r.kind == RouterKind::ET) {
        if (r.et_warmup_steps >= steps)
            out.push_back(string_format("-ew %d: the ET warm-up lasts the whole run (%d steps), so it never routes by "
                                        "thresholds; use -ew below %d", r.et_warmup_steps, steps, steps));
        if (r.capacity > 1)
            out.push_back(string_format("-ec %g: above 1 the clamp's lower bound k(1 - C) is below 0, so only its "
                                        "upper bound k(1 + C) acts", r.capacity));
    }
    if (c.n_experts > 0 && r.kind != RouterKind::TC && r.ec_pool == EcPool::Global && world == 1)
        out.push_back("-ep global: with one process the global batch is this GPU's micro-batch: it routes as -ep micro");
    if (lr_warmup >= steps)
        out.push_back(string_format("-u %d: the learning-rate warm-up does not end before the run does (%d steps), "
                                    "so the schedule never decays; use -u below %d", lr_warmup, steps, steps));
    if (const Preset* p = find_preset(o.preset)) {
        const long long pool = routing_pool_tokens(r.ec_pool, o.batch, o.seq_len, world);
        const long long micro = routing_pool_tokens(EcPool::MicroBatch, o.batch, o.seq_len);
        const char* pools[] = {"micro", "seq", "global"};
        if (c.n_experts > 0 && r.kind != RouterKind::TC && p->paper_pool_tokens > pool)
            out.push_back(string_format(
                "-preset %s: the paper's routing pool is %lld tokens and this run pools %lld (-b %d -ep %s, %d "
                "process%s)%s. The paper's pool needs %lld ranks of -b %d with -ep global (mpirun -np N or srun: "
                "README, Many GPUs)", p->name, p->paper_pool_tokens, pool, o.batch, pools[(int)r.ec_pool], world,
                world == 1 ? "" : "es", pool == p->pool_tokens ? ", the most one H200 holds in a micro-batch" : "",
                (p->paper_pool_tokens + micro - 1) / micro, o.batch));
        if (!d.is_synthetic && d.vocab_size != PAPER_VOCAB)
            out.push_back(string_format(
                "-preset %s: the paper's tokenizer is a %d-token BPE and these shards have a vocab of %d; "
                "data/prepare.py trains the paper's (README: Data)", p->name, PAPER_VOCAB, d.vocab_size));
    }
    const bool muon = o.optimizer == (int)OptimizerKind::Muon;
    for (const char* flag : {"-le", "-lh", "-lm", "-og", "-om", "-me"})
        if (o.was_given(flag) && !muon)
            out.push_back(string_format("%s: ignored: it sets a group of -opt muon, and this run trains with -opt adamw",
                                        flag));
    if (o.was_given("-l") && muon)
        out.push_back("-l: ignored: -opt muon trains at its groups' rates (-le, -lh, -lm)");
    if (!muon && o.lr == 0) out.push_back("-l 0: the learning rate is 0, so the weights never change");
    if (o.was_given("-cv") && o.core_path == "none")
        out.push_back("-cv: ignored: it sets how often CORE is scored, and there is no -ce file to score");
    if (o.was_given("-ro") && o.routes_path == "none")
        out.push_back("-ro: ignored: it places the -rf text, and there is no -rf");
    if (o.was_given("-sv") && !d.is_synthetic)
        out.push_back("-sv: ignored: it sets the synthetic corpus's vocab, and this run trains on shards (-i)");
    return out;
}

// ----------------------------------------------------------------------------
// Start-up report.

static Schedule lr_schedule(const Options& o, int steps) {
    Schedule s;
    s.kind = (LrSchedule)o.schedule;
    s.final_frac = o.final_lr_frac;
    s.warmdown_frac = o.warmdown_frac;
    s.warmup = o.warmup >= 0 ? o.warmup : default_warmup_steps(steps);
    s.steps = steps;
    return s;
}

// `planned` is the model model_allocate will make (model_plan): its memory
// and checkpoint size are printed before the GPU is touched.
static void print_config(RunLog& log, const Options& o, const ModelConfig& c, const DataSources& d, int grad_accum,
                         int steps, size_t steps_per_epoch, const Model& planned, size_t checkpoint_size) {
    const int world = planned.world;
    ParamCounts n = count_parameters(c);
    log.print("train_et | %s build", PRECISION_NAME);
#ifdef MULTI_GPU
    int nccl = 0;
    if (ncclGetVersion(&nccl) != ncclSuccess) fail("NCCL: ncclGetVersion failed: the NCCL library is unusable");
    log.print(", NCCL %d.%d.%d (several GPUs: mpirun or srun, one process each)", nccl / 10000, nccl / 100 % 100,
              nccl % 100);
#ifdef USE_MPI
    log.print(", MPI");
#endif
#else
    log.print(", single GPU (NO_MULTI_GPU)");
#endif
    log.print("\n");
    if (const Preset* p = find_preset(o.preset)) {
        std::string overridden;
        for (const std::string& word : preset_words(*p))
            if (word[0] == '-' && !isdigit((unsigned char)word[1]) && o.was_given(word)) overridden += " " + word;
        log.print("preset   %s: %s\n         sets %s%s\n", p->name, p->row, p->flags,
                  overridden.empty() ? "" : ("; the command line overrides" + overridden).c_str());
    }
    log.print("model    %s: %d layers, width %d, %d heads of %d", c.preset.c_str(), c.n_layer, c.n_embd, c.n_head, c.head_dim());
    if (c.n_kv_head != c.n_head) log.print(" (%d kv heads)", c.n_kv_head);
    log.print(", vocab %d (head padded to %d), sequence %d\n", c.vocab_size, c.padded_vocab(), c.seq_len);
    if (c.n_experts == 0) {
        log.print("ffn      dense, width %d in every layer\n", 4 * c.n_embd);
    } else {
        const RouterConfig& r = c.router;
        log.print("moe      layers 1..%d: 1 shared + %d routed experts of width %d, K = %d; layer 0 dense\n",
               c.n_layer - 1, c.n_experts, 2 * c.n_embd, r.top_k);
        int64_t pool = routing_pool_tokens(r.ec_pool, o.batch, c.seq_len, world);
        log.print("router   %s", router_name(r.kind));
        if (r.kind == RouterKind::TC) {
            const char* bal[] = {"none", "aux", "lossfree"};
            log.print(", balancing %s", bal[(int)r.tc_balance]);
            if (r.tc_balance == TcBalance::Aux) log.print(" (alpha %g)", r.aux_alpha);
            if (r.tc_balance == TcBalance::LossFree) log.print(" (u %g)", r.lossfree_rate);
        } else {
            const char* pools[] = {"micro-batch", "sequence", "global batch"};
            log.print(", pool %s, k = %.1f tokens per expert", pools[(int)r.ec_pool], expert_target(pool, r.top_k, c.n_experts));
        }
        if (r.kind == RouterKind::ET) {
            log.print(", EMA beta %g, EC warm-up %d steps, capacity ", r.et_beta, et_warmup_steps(r, steps));
            if (r.capacity < 0) log.print("off");
            else log.print("%g", r.capacity);
        }
        if (r.kind != RouterKind::TC)
            log.print(", eval routing %s", r.eval_routing == EvalRouting::Threshold ? "threshold (causal)" : "batch (not causal)");
        log.print("\n");
    }
    log.print("params   %s total, %s active per token (embedding %s, lm_head %s)\n", human_count(n.total).c_str(),
           human_count(n.active).c_str(), human_count((double)c.vocab_size * c.n_embd).c_str(),
           human_count((double)c.vocab_size * c.n_embd).c_str());
    log.print("flops    %.3f GFLOP per token, training (6 x %s active matmul weights + causal attention)\n",
           training_flops_per_token(c) / 1e9, human_count(n.active_matmul).c_str());
    log.print("data     train: %s\n", d.train->describe().c_str());
    log.print("         val:   %s\n", d.val ? d.val->describe().c_str() : "none (validation off)");
    if (d.is_synthetic)
        log.print("         synthetic corpus, seed %d: %d domains, loss floor (entropy rate) %.4f nats/token\n", o.seed,
               (int)d.synthetic.domains().size(), d.synthetic.entropy_rate());
    else
        log.print("         tokenizer: %s; every token checked below vocab %d in %.2f s\n",
                  d.tokenizer_path.empty() ? "none beside the shards (GPT-2 ids assumed; samples print ids)"
                                           : (d.tokenizer_path + string_format(" (end-of-text id %d)", d.eot)).c_str(),
                  d.vocab_size, d.check_seconds);
    log.print("batch    %d x %d tokens per micro-step, %d micro-step%s: %d tokens per step\n", o.batch, o.seq_len,
              grad_accum, grad_accum == 1 ? "" : "s", o.total_batch);
    log.print("steps    %d (%.2f epochs; %zu steps per epoch)\n", steps, (double)steps / steps_per_epoch, steps_per_epoch);
    const char* sched[] = {"cosine", "wsd", "linear"};
    const OptimizerConfig& opt = planned.optim;
    log.print("optim    %s: %s schedule, warm-up %d steps (AdamW groups), final %g x peak, weight decay %g, clip %s; "
              "AdamW betas %g/%g, eps %g", opt.kind == OptimizerKind::Muon ? "muon" : "adamw", sched[o.schedule],
              lr_schedule(o, steps).warmup, o.final_lr_frac, opt.weight_decay,
              o.grad_clip > 0 ? string_format("%g", o.grad_clip).c_str() : "off", opt.beta1, opt.beta2, opt.eps);
    if (opt.kind == OptimizerKind::Muon)
        log.print("; Muon momentum %g -> %g over %d steps, %d Newton-Schulz steps, muP factor %.4f on %s",
                  opt.momentum_start, opt.momentum_end, opt.momentum_warmup, opt.ns_steps, mup_factor(c.n_embd),
                  opt.mup == MupScope::All ? "every group" : "the AdamW groups");
    log.print("\n");
    for (const ParamGroup& g : planned.groups)
        log.print("         %-10s %-6s peak lr %-9.4g %s params%s\n", g.name.c_str(), g.muon ? "Muon" : "AdamW", g.lr,
                  human_count(g.params).c_str(), g.warmup ? "" : ", no warm-up");
    log.print("memory   %s\n", planned.memory.describe().c_str());
    if (c.n_experts > 0) {
        const int capacity = planned.router.train[0].capacity, chunk = capacity / c.n_experts;
        log.print("routing  room for %d (token, expert) pairs per MoE layer and micro-batch (the most training can "
                  "pick: no sync, no drops)", capacity);
        if (c.router.kind != RouterKind::TC && chunk < planned.router.B * planned.router.T)
            log.print("; evaluation by thresholds runs the experts in sub-batches of %d tokens", chunk);
        log.print("\n");
    }
    const std::string when = o.checkpoint_every > 0 ? string_format("every %d steps and at the end", o.checkpoint_every)
                                                    : std::string("at the end");
    const std::string kept = o.checkpoints_kept > 0 ? string_format("the last %d kept", o.checkpoints_kept)
                                                    : std::string("all kept");
    log.print("output   %s (checkpoints %s, %.2f GiB each, %s%s)\n", o.out_dir.c_str(), when.c_str(),
              checkpoint_size / 1073741824.0, kept.c_str(), o.resume ? "; resuming" : "");
}

// Refuses a run whose memory plan does not fit `capacity` (the GPU's, or an
// H200's where no GPU answers), before anything is allocated, naming the
// setting to change: the largest micro-batch -b whose plan fits (a valid one:
// it divides -d, and gives EC and ET a whole k), or, when not even -b 1
// fits, a smaller model.
static void check_memory_fits(const Options& o, const ModelConfig& c, const OptimizerConfig& optim,
                              const Model& planned, size_t capacity, const char* gpu) {
    const MemoryPlan& plan = planned.memory;
    if (plan.total() <= capacity) return;
    const double GiB = 1073741824.0;
    std::string advice = string_format("a smaller -m, or fewer experts (-e): even at -b 1 it does not fit (the "
                                       "parameters, fp32 master weights, gradients and AdamW take %.1f GiB)",
                                       plan.parameters() / GiB);
    for (int b = o.batch - 1; b >= 1; b--) {
        const int64_t pool = routing_pool_tokens(c.router.ec_pool, b, o.seq_len, planned.world);
        const bool whole_k = c.n_experts == 0 || c.router.kind == RouterKind::TC || pool * c.router.top_k % c.n_experts == 0;
        if (o.total_batch % ((int64_t)b * o.seq_len * planned.world) != 0 || !whole_k) continue;
        if (model_plan(c, optim, b, o.seq_len, planned.world, planned.rank).memory.total() > capacity) continue;
        advice = string_format("-b %d, the largest micro-batch that fits (-d stays: more micro-steps), or a smaller -t, "
                               "-m or -e", b);
        break;
    }
    fail("memory: this run needs %.1f GiB on the GPU (parameters %.1f, activations %.1f, routing buffers %.1f), more "
         "than the %.1f GiB of %s; use %s", plan.total() / GiB, plan.parameters() / GiB, plan.activations / GiB,
         plan.routing / GiB, capacity / GiB, gpu, advice.c_str());
}

// ----------------------------------------------------------------------------
// Checkpoints: everything a bit-exact resume needs. A header of int64
// fields, then the fp32 master weights and both AdamW moments (the bf16
// weights are re-derived from the master copy), then the router state of an
// MoE model (router_state_floats: every MoE layer's raw ET/EC cutoffs and TC
// biases; its update count is in the header). Written to a temp file and
// renamed, so a crash mid-write never damages the last good checkpoint. A
// resume reads the header at start-up, before the GPU, and stops if the run's
// settings differ from the checkpoint's (the schedule's may change).

static const int64_t CHECKPOINT_MAGIC = 0x7472616E5F65745FLL;  // "train_et_"
static const int64_t CHECKPOINT_VERSION = 4;  // 2: the router settings and state; 3: the training time so far;
                                              // 4: the optimizer settings
enum CheckpointField {
    CK_MAGIC, CK_VERSION, CK_STEP, CK_NUM_PARAMS, CK_LAYERS, CK_EMBD, CK_HEADS, CK_KV_HEADS, CK_VOCAB, CK_EXPERTS,
    CK_BATCH, CK_SEQ_LEN, CK_TOTAL_BATCH, CK_WORLD, CK_SEED, CK_DATA, CK_STEPS, CK_WARMUP, CK_SCHEDULE,
    // the router (all 0 for a dense model)
    CK_ROUTER, CK_TOP_K, CK_ET_WARMUP, CK_TC_BALANCE, CK_EC_POOL,
    // doubles, stored bit for bit
    CK_LR, CK_FINAL_LR, CK_WARMDOWN, CK_WEIGHT_DECAY, CK_GRAD_CLIP, CK_ET_BETA, CK_CAPACITY, CK_AUX_ALPHA,
    CK_LOSSFREE_RATE,
    // where the run is
    CK_EPOCH, CK_SHARD_POS, CK_ROUND, CK_RNG0, CK_RNG3 = CK_RNG0 + 3, CK_ROUTER_UPDATES, CK_ELAPSED_MS,
    // the optimizer (the doubles bit for bit)
    CK_OPTIMIZER, CK_ROUTER_OPTIMIZER, CK_MUP_SCOPE, CK_LR_EMBEDDING, CK_LR_HEAD, CK_LR_MATRIX, CK_BETA1, CK_BETA2,
    CK_ADAM_EPS, CK_EXPERT_MOMENTUM_WARMUP,
    CK_HEADER_FIELDS = 64  // room to grow
};
static_assert(CK_EXPERT_MOMENTUM_WARMUP < CK_HEADER_FIELDS, "the checkpoint header has no room for its fields");

static int64_t double_bits(double x) {
    int64_t bits;
    memcpy(&bits, &x, sizeof(bits));
    return bits;
}

// Identifies the training data by its shape (shard count and sizes), so a
// resume on other shards is caught; the synthetic corpus is fixed by -sd, -sv.
static int64_t data_fingerprint(const TokenSource& source) {
    uint64_t h = seed_mix(source.num_shards(), 0xDA7A);
    for (size_t i = 0; i < source.num_shards(); i++) h = seed_mix(h, source.shard_tokens(i));
    return (int64_t)h;
}

// The settings a resumed run must share with the run it continues: they
// shape the model, the data stream or the update of every remaining step.
static void checkpoint_settings(const Options& o, const ModelConfig& c, size_t num_params, int world, int steps,
                                int64_t data, int64_t* h) {
    h[CK_NUM_PARAMS] = (int64_t)num_params;
    h[CK_LAYERS] = c.n_layer; h[CK_EMBD] = c.n_embd; h[CK_HEADS] = c.n_head; h[CK_KV_HEADS] = c.n_kv_head;
    h[CK_VOCAB] = c.vocab_size; h[CK_EXPERTS] = c.n_experts; h[CK_BATCH] = o.batch; h[CK_SEQ_LEN] = o.seq_len;
    h[CK_TOTAL_BATCH] = o.total_batch; h[CK_WORLD] = world; h[CK_SEED] = o.seed; h[CK_DATA] = data;
    h[CK_STEPS] = steps; h[CK_WARMUP] = lr_schedule(o, steps).warmup; h[CK_SCHEDULE] = o.schedule;
    h[CK_LR] = double_bits(o.lr); h[CK_FINAL_LR] = double_bits(o.final_lr_frac);
    h[CK_WARMDOWN] = double_bits(o.warmdown_frac); h[CK_WEIGHT_DECAY] = double_bits(weight_decay(o));
    h[CK_GRAD_CLIP] = double_bits(o.grad_clip);
    h[CK_OPTIMIZER] = o.optimizer; h[CK_BETA1] = double_bits(o.beta1); h[CK_BETA2] = double_bits(o.beta2);
    h[CK_ADAM_EPS] = double_bits(o.adam_eps);
    if (o.optimizer == (int)OptimizerKind::Muon) {  // the group settings change nothing under -opt adamw
        h[CK_ROUTER_OPTIMIZER] = o.router_optimizer; h[CK_MUP_SCOPE] = o.mup_scope;
        h[CK_LR_EMBEDDING] = double_bits(o.lr_embedding); h[CK_LR_HEAD] = double_bits(o.lr_head);
        h[CK_LR_MATRIX] = double_bits(o.lr_matrix); h[CK_EXPERT_MOMENTUM_WARMUP] = o.expert_momentum_warmup;
    }
    if (c.n_experts == 0) return;  // a dense model has no router: its flags change nothing
    const RouterConfig& r = c.router;
    h[CK_ROUTER] = (int64_t)r.kind; h[CK_TOP_K] = r.top_k; h[CK_ET_WARMUP] = r.et_warmup_steps;
    h[CK_TC_BALANCE] = (int64_t)r.tc_balance; h[CK_EC_POOL] = (int64_t)r.ec_pool;
    h[CK_ET_BETA] = double_bits(r.et_beta); h[CK_CAPACITY] = double_bits(r.capacity);
    h[CK_AUX_ALPHA] = double_bits(r.aux_alpha); h[CK_LOSSFREE_RATE] = double_bits(r.lossfree_rate);
}

// A checkpoint's size on disk: the header, the fp32 master weights and both
// AdamW moments (Muon's momentum in the first), and the router state.
static size_t checkpoint_bytes(const Model& model) {
    return CK_HEADER_FIELDS * sizeof(int64_t) + (3 * model.num_params + router_state_floats(model.router)) * sizeof(float);
}

// How a resumed run's settings are held to its checkpoint's. Most must match,
// or the run would not be the one the checkpoint belongs to. The schedule's
// (-l, -le, -lh, -lm, -om, -u, -q, -a, -wd, -gc) may change, with a warning: resuming from the
// last good checkpoint with a lower -l is the usual remedy for a divergence,
// and the one train_et advises.
enum class SettingKind { Whole, Real, Choice, Opaque };
static const struct {
    CheckpointField field;
    const char* what;
    SettingKind kind;
    bool may_change;
    const char* choices = nullptr;  // SettingKind::Choice: the flag's choices, in the order of its values
} CHECKPOINT_CHECKS[] = {
    {CK_LAYERS, "-m (layers)", SettingKind::Whole, false}, {CK_EMBD, "-m (width)", SettingKind::Whole, false},
    {CK_HEADS, "-m (heads)", SettingKind::Whole, false}, {CK_KV_HEADS, "-kv", SettingKind::Whole, false},
    {CK_VOCAB, "the data's vocab size", SettingKind::Whole, false}, {CK_EXPERTS, "-e", SettingKind::Whole, false},
    {CK_NUM_PARAMS, "the parameter count", SettingKind::Whole, false}, {CK_BATCH, "-b", SettingKind::Whole, false},
    {CK_SEQ_LEN, "-t", SettingKind::Whole, false}, {CK_TOTAL_BATCH, "-d", SettingKind::Whole, false},
    {CK_WORLD, "the number of processes", SettingKind::Whole, true}, {CK_SEED, "-sd", SettingKind::Whole, false},
    {CK_DATA, "the training data (-i: shard count and sizes)", SettingKind::Opaque, false},
    {CK_STEPS, "the step count (-x)", SettingKind::Whole, false}, {CK_WARMUP, "-u", SettingKind::Whole, true},
    {CK_SCHEDULE, "-a", SettingKind::Choice, true, "cosine|wsd|linear"}, {CK_LR, "-l", SettingKind::Real, true},
    {CK_FINAL_LR, "-q", SettingKind::Real, true}, {CK_WARMDOWN, "-wd", SettingKind::Real, true},
    {CK_WEIGHT_DECAY, "-c", SettingKind::Real, false}, {CK_GRAD_CLIP, "-gc", SettingKind::Real, true},
    {CK_ROUTER, "-r", SettingKind::Whole, false}, {CK_TOP_K, "-k", SettingKind::Whole, false},
    {CK_ET_WARMUP, "ET warm-up (-ew, or 20% of -x)", SettingKind::Whole, false},
    {CK_TC_BALANCE, "-tb", SettingKind::Whole, false}, {CK_EC_POOL, "-ep", SettingKind::Whole, false},
    {CK_ET_BETA, "-eb", SettingKind::Real, false}, {CK_CAPACITY, "-ec", SettingKind::Real, false},
    {CK_AUX_ALPHA, "-ta", SettingKind::Real, false}, {CK_LOSSFREE_RATE, "-tu", SettingKind::Real, false},
    {CK_OPTIMIZER, "-opt", SettingKind::Choice, false, "adamw|muon"},
    {CK_ROUTER_OPTIMIZER, "-og", SettingKind::Choice, false, "adamw|muon"},
    {CK_MUP_SCOPE, "-om", SettingKind::Choice, true, "adamw|all"}, {CK_LR_EMBEDDING, "-le", SettingKind::Real, true},
    {CK_LR_HEAD, "-lh", SettingKind::Real, true}, {CK_LR_MATRIX, "-lm", SettingKind::Real, true},
    {CK_BETA1, "-b1", SettingKind::Real, false}, {CK_BETA2, "-b2", SettingKind::Real, false},
    {CK_ADAM_EPS, "-ae", SettingKind::Real, false}, {CK_EXPERT_MOMENTUM_WARMUP, "-me", SettingKind::Whole, true}};

static std::string setting_text(int64_t value, SettingKind kind, const char* choices) {
    double real;
    memcpy(&real, &value, sizeof(real));
    switch (kind) {
        case SettingKind::Whole: return std::to_string(value);
        case SettingKind::Real: return string_format("%g", real);
        case SettingKind::Choice: {
            const std::vector<std::string> names = split_choices(choices);
            return value >= 0 && value < (int64_t)names.size() ? names[value] : std::to_string(value);
        }
        case SettingKind::Opaque: break;
    }
    return "";
}

static void read_all(FILE* f, void* data, size_t bytes, const std::string& path) {
    if (fread(data, 1, bytes, f) != bytes) fail("%s: truncated checkpoint", path.c_str());
}

// Reads and checks a checkpoint's header; returns the open file, at its arrays.
static FILE* open_checkpoint(const std::string& path, int64_t* h) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) fail("%s: cannot open (%s)", path.c_str(), strerror(errno));
    read_all(f, h, CK_HEADER_FIELDS * sizeof(int64_t), path);
    if (h[CK_MAGIC] != CHECKPOINT_MAGIC) fail("%s: not a train_et checkpoint", path.c_str());
    if (h[CK_VERSION] != CHECKPOINT_VERSION)
        fail("%s: checkpoint version %lld, this train_et reads version %lld: resume with the train_et that wrote it",
             path.c_str(), (long long)h[CK_VERSION], (long long)CHECKPOINT_VERSION);
    return f;
}

// At start-up, before the GPU: the newest checkpoint of -o (prepare_output_dir
// made sure there is one) must belong to this run (CHECKPOINT_CHECKS); a
// changed schedule setting is a warning. Returns the checkpoint's path.
static std::string check_resume(const Options& o, const int64_t* settings, RunLog& log) {
    const std::string path = glob_sorted(o.out_dir + "/ckpt_*.bin").back();
    int64_t h[CK_HEADER_FIELDS];
    fclose(open_checkpoint(path, h));
    for (const auto& k : CHECKPOINT_CHECKS) {
        if (h[k.field] == settings[k.field]) continue;
        const std::string was = setting_text(h[k.field], k.kind, k.choices),
                          now = setting_text(settings[k.field], k.kind, k.choices);
        if (!k.may_change && was.empty())
            fail("%s: its run had other %s; resume with the settings of the run it belongs to", path.c_str(), k.what);
        if (!k.may_change)
            fail("%s: its run had %s %s, this one %s; resume with the settings of the run it belongs to", path.c_str(),
                 k.what, was.c_str(), now.c_str());
        log.warn(string_format("resuming with %s %s where the checkpoint's run had %s: the run goes on with %s from "
                               "step %lld", k.what, now.c_str(), was.c_str(), now.c_str(), (long long)h[CK_STEP]));
    }
    return path;
}

struct TrainState {
    int step = 0;  // steps completed
    double elapsed = 0;  // seconds the run has trained (a resumed run's earlier processes included)
    LoaderPosition data;
    Rng sample_rng{0};
};

static std::string checkpoint_path(const std::string& dir, int step) {
    return string_format("%s/ckpt_%010d.bin", dir.c_str(), step);
}

static void write_all(FILE* f, const void* data, size_t bytes, const std::string& path) {
    if (fwrite(data, 1, bytes, f) != bytes) fail("%s: write failed (disk full?)", path.c_str());
}

// Every rank calls it: the master weights and moments come from the ranks
// that own them (gathered into the gradient buffer, free between steps), so
// the file is the same whatever the number of ranks; rank 0 writes it (busy:
// the others wait for it without calling it a hang). A rank lost meanwhile
// ends the run before anything is renamed into place: the last complete
// checkpoint stays the newest.
static void save_checkpoint(const Options& o, Model& model, MultiGpu& multi, const TrainState& st,
                            const int64_t* settings, float* host_buffer) {
    int64_t h[CK_HEADER_FIELDS];
    memcpy(h, settings, sizeof(h));
    h[CK_MAGIC] = CHECKPOINT_MAGIC; h[CK_VERSION] = CHECKPOINT_VERSION; h[CK_STEP] = st.step;
    h[CK_EPOCH] = (int64_t)st.data.epoch; h[CK_SHARD_POS] = (int64_t)st.data.shard_pos; h[CK_ROUND] = (int64_t)st.data.round;
    for (int i = 0; i < 4; i++) h[CK_RNG0 + i] = (int64_t)st.sample_rng.s[i];
    h[CK_ROUTER_UPDATES] = model.router.updates;
    h[CK_ELAPSED_MS] = (int64_t)(st.elapsed * 1e3);
    std::string path = checkpoint_path(o.out_dir, st.step), tmp = path + ".tmp";
    FILE* f = nullptr;
    if (multi.rank == 0) {
        f = fopen(tmp.c_str(), "wb");
        if (!f) fail("%s: cannot create (%s)", tmp.c_str(), strerror(errno));
        write_all(f, h, sizeof(h), tmp);
    }
    const struct { const float* values; bool shard; } arrays[] = {
        {model.master, model.master_sharded()}, {model.adam_m, multi.active()}, {model.adam_v, multi.active()}};
    for (const auto& array : arrays) {
        const float* buf = array.values;
        if (array.shard) {
            multi_gpu_collect_shards(multi, model.shards, buf, model.grads);
            buf = model.grads;
        }
        multi_gpu_wait(multi);
        if (!f) continue;
        multi_gpu_busy(multi, true);
        cudaCheck(cudaMemcpy(host_buffer, buf, model.num_params * sizeof(float), cudaMemcpyDeviceToHost));
        write_all(f, host_buffer, model.num_params * sizeof(float), tmp);
        multi_gpu_busy(multi, false);
    }
    if (!f) return;
    multi_gpu_busy(multi, true);
    size_t router_floats = router_state_floats(model.router);  // fewer than num_params: the buffer holds them
    router_save_state(model.router, host_buffer);
    write_all(f, host_buffer, router_floats * sizeof(float), tmp);
    // on disk before the rename, so even a power cut leaves the old or the new checkpoint whole
    if (fflush(f) != 0 || fsync(fileno(f)) != 0 || fclose(f) != 0) fail("%s: write failed (disk full?)", tmp.c_str());
    if (rename(tmp.c_str(), path.c_str()) != 0) fail("%s: rename failed (%s)", path.c_str(), strerror(errno));
    if (o.checkpoints_kept > 0) {
        std::vector<std::string> all = glob_sorted(o.out_dir + "/ckpt_*.bin");
        for (size_t i = 0; i + o.checkpoints_kept < all.size(); i++) remove(all[i].c_str());
    }
    multi_gpu_busy(multi, false);
}

// Loads the checkpoint check_resume chose into the model: the weights, and
// this rank's shard of the moments (any number of ranks may have written it).
static TrainState load_checkpoint(RunLog& log, const std::string& path, Model* model, float* host_buffer) {
    int64_t h[CK_HEADER_FIELDS];
    FILE* f = open_checkpoint(path, h);
    read_all(f, host_buffer, model->num_params * sizeof(float), path);
    cudaCheck(cudaMemcpy(model->grads, host_buffer, model->num_params * sizeof(float), cudaMemcpyHostToDevice));
    model_set_weights(model, model->grads);  // the gradients as staging: the first step zeroes them
    for (float* buf : {model->adam_m, model->adam_v}) {
        read_all(f, host_buffer, model->num_params * sizeof(float), path);
        cudaCheck(cudaMemcpy(buf, host_buffer + model->shard_begin(), model->shard_size() * sizeof(float),
                             cudaMemcpyHostToDevice));
    }
    read_all(f, host_buffer, router_state_floats(model->router) * sizeof(float), path);
    router_load_state(model->router, host_buffer);
    model->router.updates = (int)h[CK_ROUTER_UPDATES];
    char extra;
    bool trailing = fread(&extra, 1, 1, f) == 1;
    fclose(f);
    if (trailing) fail("%s: longer than its header says: not a checkpoint of this run", path.c_str());
    TrainState st;
    st.step = (int)h[CK_STEP];
    st.elapsed = h[CK_ELAPSED_MS] / 1e3;
    st.data.epoch = (uint64_t)h[CK_EPOCH];
    st.data.shard_pos = (uint64_t)h[CK_SHARD_POS];
    st.data.round = (uint64_t)h[CK_ROUND];
    // a round is world x B windows: another number of ranks goes on from the
    // same window of the shard (rounded down to a whole round)
    st.data.round = st.data.round * (uint64_t)h[CK_WORLD] / (uint64_t)model->world;
    for (int i = 0; i < 4; i++) st.sample_rng.s[i] = (uint64_t)h[CK_RNG0 + i];
    log.print("resumed  %s (step %d)\n", path.c_str(), st.step);
    return st;
}

// ----------------------------------------------------------------------------
// The run record: the first line of train.jsonl, and a new one at each
// resume. It says what ran: the command, every setting with its defaults
// resolved (-x, -u and -ew as the step counts they became), the files the
// globs matched, the model's size, the build (precision, git commit, whether
// the tree had changes), the GPU and the start time. dev/plot_runs.py labels
// runs from it.

static std::string utc_now() {
    char buf[32];
    time_t now = time(nullptr);
    strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    return buf;
}

// An argument as a shell would need it typed.
static std::string shell_quoted(const std::string& arg) {
    const char* plain = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-+=.,/:@%";
    if (!arg.empty() && arg.find_first_not_of(plain) == std::string::npos) return arg;
    std::string out = "'";
    for (char c : arg) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return out + "'";
}

static std::string run_record(int argc, char** argv, const Options& o, const ModelConfig& c, const DataSources& d,
                              int steps, int lr_warmup, int grad_accum, const Model& planned, size_t checkpoint_size,
                              const char* gpu, const std::string& start_time, int resumed_from_step) {
    std::vector<std::string> args(argv, argv + argc);
    std::string command;
    for (const std::string& a : args) command += (command.empty() ? "" : " ") + shell_quoted(a);
    Options resolved = o;
    resolved.max_steps = steps;
    resolved.warmup = lr_warmup;
    resolved.weight_decay = weight_decay(o);
    resolved.et_warmup = c.router.et_warmup_steps;
    std::string settings;
    for (const Flag& f : flag_table(resolved)) {
        const bool number = f.kind == Flag::Int || f.kind == Flag::Real;
        settings += string_format("%s%s: %s", settings.empty() ? "" : ", ", json_string(f.name).c_str(),
                                  number ? flag_value(f).c_str() : json_string(flag_value(f)).c_str());
    }
    const ParamCounts n = count_parameters(c);
    auto shards = [](const TokenSource* source, const std::vector<std::string>& files) {
        if (!source) return std::string("null");
        size_t tokens = 0;
        for (size_t i = 0; i < source->num_shards(); i++) tokens += source->shard_tokens(i);
        return string_format("{\"source\": %s, \"files\": %s, \"tokens\": %zu}", json_string(source->describe()).c_str(),
                             json_array(files).c_str(), tokens);
    };
    const std::string git = *GIT_COMMIT ? string_format("{\"commit\": \"%s\", \"dirty\": %s}", GIT_COMMIT,
                                                        GIT_DIRTY ? "true" : "false")
                                        : "null";
    std::string r = "{\"run\": {";
    r += "\"command\": " + json_string(command) + ", \"argv\": " + json_array(args);
    r += ", \"start_time\": " + json_string(start_time);
    r += ", \"resumed_from_step\": " + (resumed_from_step >= 0 ? std::to_string(resumed_from_step) : "null");
    r += ", \"settings\": {" + settings + "}";
    r += string_format(", \"model\": {\"layers\": %d, \"width\": %d, \"heads\": %d, \"kv_heads\": %d, \"head_dim\": %d, "
                       "\"vocab\": %d, \"padded_vocab\": %d, \"experts\": %d, \"moe_layers\": %zu}",
                       c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim(), c.vocab_size, c.padded_vocab(),
                       c.n_experts, planned.router.layers.size());
    std::string groups;
    for (const ParamGroup& g : planned.groups)
        groups += string_format("%s{\"name\": %s, \"optimizer\": \"%s\", \"peak_lr\": %.9g, \"warmup\": %s, "
                                "\"params\": %.0f}", groups.empty() ? "" : ", ", json_string(g.name).c_str(),
                                g.muon ? "muon" : "adamw", g.lr, g.warmup ? "true" : "false", g.params);
    r += ", \"optimizer_groups\": [" + groups + "]";
    r += string_format(", \"batch\": {\"tokens_per_step\": %d, \"micro_steps\": %d, \"steps\": %d}", o.total_batch,
                       grad_accum, steps);
    r += ", \"data\": {\"train\": " + shards(d.train.get(), d.train_files) + ", \"val\": " +
         shards(d.val.get(), d.val_files) + ", \"synthetic\": " + (d.is_synthetic ? "true" : "false") +
         ", \"tokenizer\": " + (d.tokenizer_path.empty() ? "null" : json_string(d.tokenizer_path)) + "}";
    r += string_format(", \"params\": {\"total\": %.0f, \"active\": %.0f, \"active_matmul\": %.0f}", n.total,
                       n.active, n.active_matmul);
    r += string_format(", \"flops_per_token\": %.6g, \"memory_bytes\": %zu, \"checkpoint_bytes\": %zu",
                       training_flops_per_token(c), planned.memory.total(), checkpoint_size);
    r += string_format(", \"precision\": \"%s\", \"git\": %s, \"gpu\": %s", PRECISION_NAME, git.c_str(),
                       json_string(gpu).c_str());
    return r + "}}";
}

// ----------------------------------------------------------------------------
// The training run.

// Feeds micro-batches to the GPU without a device sync: a ring of pinned
// host buffers; before refilling one, the host waits only for the copy that
// last read it, which was queued FEED_BUFFERS micro-batches ago, so the GPU
// keeps that much work queued while the host reads data.
static const int FEED_BUFFERS = 4;
struct BatchFeeder {
    int* inputs[FEED_BUFFERS] = {};
    int* targets[FEED_BUFFERS] = {};
    cudaEvent_t copied[FEED_BUFFERS];
    int next = 0;
    size_t count = 0;

    void allocate(size_t tokens) {
        count = tokens;
        for (int b = 0; b < FEED_BUFFERS; b++) {
            cudaCheck(cudaMallocHost(&inputs[b], tokens * sizeof(int)));
            cudaCheck(cudaMallocHost(&targets[b], tokens * sizeof(int)));
            cudaCheck(cudaEventCreateWithFlags(&copied[b], cudaEventDisableTiming));
            cudaCheck(cudaEventRecord(copied[b]));
        }
    }
    void feed(DataLoader& loader, Activations& acts) {
        cudaCheck(cudaEventSynchronize(copied[next]));
        loader.next_batch(inputs[next], targets[next]);
        cudaCheck(cudaMemcpyAsync(acts.tokens, inputs[next], count * sizeof(int), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpyAsync(acts.targets, targets[next], count * sizeof(int), cudaMemcpyHostToDevice));
        cudaCheck(cudaEventRecord(copied[next]));
        next = (next + 1) % FEED_BUFFERS;
    }
};

// Mean loss over `batches` validation micro-batches per rank (from the
// start of the validation data each time, so every evaluation sees the same
// tokens; the ranks read disjoint ones): the loss sums of all ranks over all
// their tokens.
static float evaluate(Model* model, MultiGpu& multi, DataLoader& val, BatchFeeder& feeder, int batches) {
    val.reset();
    cudaCheck(cudaMemset(model->loss_total, 0, sizeof(float)));
    for (int i = 0; i < batches; i++) {
        feeder.feed(val, model->acts);
        model_forward(model, model->acts.B, model->acts.T, true, false, 0.0f);
    }
    multi_gpu_sum(multi, model->loss_total, 1);
    multi_gpu_wait(multi);
    float total = 0;
    cudaCheck(cudaMemcpy(&total, model->loss_total, sizeof(float), cudaMemcpyDeviceToHost));
    return total / ((float)batches * model->acts.B * model->acts.T * multi.world);
}

// Samples `length` tokens after an EOT, recomputing the whole prefix for
// each new token (simple; sampling is rare). Softmax over the soft-capped
// logits of the real vocab, temperature 1.
static std::vector<int> sample(Model* model, int length, int eot, Rng& rng, std::vector<floatX>& logits_row) {
    const ModelConfig& c = model->config;
    std::vector<int> seq = {eot};
    std::vector<double> p(c.vocab_size);
    while ((int)seq.size() <= length && (int)seq.size() <= model->acts.T) {
        int T = (int)seq.size();
        cudaCheck(cudaMemcpy(model->acts.tokens, seq.data(), T * sizeof(int), cudaMemcpyHostToDevice));
        model_forward(model, 1, T, false, false, 0.0f);
        cudaCheck(cudaMemcpy(logits_row.data(), model->acts.logits + (size_t)(T - 1) * c.padded_vocab(),
                             c.padded_vocab() * sizeof(floatX), cudaMemcpyDeviceToHost));
        double max = -1e30, sum = 0;
        for (int j = 0; j < c.vocab_size; j++) {
            p[j] = 15.0 * std::tanh((double)(float)logits_row[j] / 15.0);
            max = std::max(max, p[j]);
        }
        for (int j = 0; j < c.vocab_size; j++) sum += (p[j] = std::exp(p[j] - max));
        double u = rng.uniform() * sum;
        int next = 0;
        for (double acc = p[0]; acc < u && next + 1 < c.vocab_size; acc += p[++next]) {}
        seq.push_back(next);
    }
    return std::vector<int>(seq.begin() + 1, seq.end());
}

// ----------------------------------------------------------------------------
// Evaluation beyond the validation loss: CORE (core_eval.cuh) and the routes
// of one text for the routing pictures.

// CORE on the model, into train.log and train.jsonl (README: Evaluation).
static void log_core(RunLog& log, Model* model, CoreRunner& runner, const CoreData& core, int step,
                     const std::string& progress) {
    const double start = wall_seconds();
    const CoreScore score = core_evaluate(model, runner, core);
    const double seconds = wall_seconds() - start, value = score.core(core);
    const std::vector<std::string> missing = core.missing();
    std::string tasks, line;
    for (size_t i = 0; i < core.tasks.size(); i++) {
        if (score.tasks[i].total == 0) continue;
        const double acc = score.tasks[i].accuracy(), centered = score.centered(core, (int)i);
        tasks += string_format("%s%s: {\"accuracy\": %.6f, \"centered\": %.6f, \"examples\": %d}",
                               tasks.empty() ? "" : ", ", json_string(core.tasks[i].label).c_str(), acc, centered,
                               score.tasks[i].total);
        line += string_format("%s%s %.3f", line.empty() ? "" : " | ", core.tasks[i].label.c_str(), acc);
    }
    log.print("step %6d | CORE %.4f%s (%zu tasks, %.1f s)\n", step, value,
              missing.empty() ? "" : string_format(", partial: missing %zu", missing.size()).c_str(),
              core.tasks.size() - missing.size(), seconds);
    log.print("         accuracy: %s\n", line.c_str());
    if (!missing.empty()) {
        std::string names;
        for (const std::string& m : missing) names += (names.empty() ? "" : ", ") + m;
        log.print("         missing from the eval file (CORE is their mean without them): %s\n", names.c_str());
    }
    log.record(string_format("{\"step\": %d, \"core\": %s, \"core_partial\": %s, \"core_missing\": %s, "
                             "\"core_tasks\": {%s}, \"core_seconds\": %.3f, %s}", step,
                             json_number(value, "%.6f").c_str(), missing.empty() ? "false" : "true",
                             json_array(missing).c_str(), tasks.c_str(), seconds, progress.c_str()));
}

// The text of -rf: up to T tokens of a shard from -ro, or of the synthetic
// corpus's validation text (with each token's domain).
struct RouteText {
    std::vector<int> tokens, domains;  // domains: the synthetic corpus's only
};
static RouteText route_text(const Options& o, const DataSources& d, const ModelConfig& c) {
    RouteText text;
    if (c.n_experts == 0) fail("-rf: a dense model (-e 0) routes nothing; use -e with an MoE model");
    std::vector<uint16_t> shard;
    if (o.routes_path == "synthetic") {
        if (!d.is_synthetic) fail("-rf synthetic: the synthetic corpus's text needs -i synthetic; give a shard file");
        d.val->load(0, &shard);
    } else {
        ShardFiles file;
        const std::string err = file.open(o.routes_path, d.vocab_size);
        if (!err.empty()) fail("-rf: %s", err.c_str());
        file.load(0, &shard);
    }
    if ((size_t)o.routes_offset >= shard.size())
        fail("-ro %d: %s has %zu tokens", o.routes_offset, o.routes_path.c_str(), shard.size());
    const size_t n = std::min<size_t>(c.seq_len, shard.size() - o.routes_offset);
    for (size_t i = 0; i < n; i++) {
        const int id = shard[o.routes_offset + i];
        text.tokens.push_back(id);
        if (d.is_synthetic) text.domains.push_back(d.synthetic.domain_of(id));
    }
    return text;
}

// Writes <out>/routes_<step>.bin (the format dev/plot_routing.py reads,
// README: Evaluation): a 256 x int32 header (magic 20261204, version 1,
// tokens, MoE layers, experts, domains, vocab, step, router, K), the domain
// names (char[32] each), the token ids, their domains (if any), the MoE
// layers' numbers, then (layers, tokens, experts) bytes, 1 = routed.
static void log_routes(RunLog& log, Model* model, const DataSources& d, const RouteText& text,
                       const std::string& out_dir, int step, const std::string& progress) {
    const Router& r = model->router;
    const std::vector<uint8_t> routes = route_sequence(model, text.tokens);
    const int n = (int)text.tokens.size(), L = (int)r.layers.size(), E = r.E;
    const int domains = text.domains.empty() ? 0 : (int)d.synthetic.domains().size();
    std::vector<int32_t> header(256, 0);
    header[0] = 20261204; header[1] = 1; header[2] = n; header[3] = L; header[4] = E; header[5] = domains;
    header[6] = model->config.vocab_size; header[7] = step; header[8] = (int)r.config.kind; header[9] = r.config.top_k;
    const std::string path = string_format("%s/routes_%06d.bin", out_dir.c_str(), step), tmp = path + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    if (!f) fail("%s: cannot create (%s)", tmp.c_str(), strerror(errno));
    write_all(f, header.data(), header.size() * sizeof(int32_t), tmp);
    for (int i = 0; i < domains; i++) {
        char name[32] = {};
        strncpy(name, d.synthetic.domains()[i].spec.name, sizeof(name) - 1);
        write_all(f, name, sizeof(name), tmp);
    }
    const std::vector<int32_t> ids(text.tokens.begin(), text.tokens.end());
    write_all(f, ids.data(), ids.size() * sizeof(int32_t), tmp);
    if (domains > 0) {
        const std::vector<int32_t> dom(text.domains.begin(), text.domains.end());
        write_all(f, dom.data(), dom.size() * sizeof(int32_t), tmp);
    }
    const std::vector<int32_t> layers(r.layers.begin(), r.layers.end());
    write_all(f, layers.data(), layers.size() * sizeof(int32_t), tmp);
    write_all(f, routes.data(), routes.size(), tmp);
    if (fclose(f) != 0) fail("%s: write failed (disk full?)", tmp.c_str());
    if (rename(tmp.c_str(), path.c_str()) != 0) fail("%s: rename failed (%s)", path.c_str(), strerror(errno));
    std::vector<double> fanout(L, 0.0);
    for (int l = 0; l < L; l++) {
        size_t routed = 0;
        for (size_t i = (size_t)l * n * E; i < (size_t)(l + 1) * n * E; i++) routed += routes[i];
        fanout[l] = (double)routed / n;
    }
    std::string means;
    for (double f_l : fanout) means += string_format("%s%.3f", means.empty() ? "" : " ", f_l);
    log.print("step %6d | routes of %d tokens in %s: experts per token by MoE layer %s\n", step, n, path.c_str(),
              means.c_str());
    log.record(string_format("{\"step\": %d, \"routes\": %s, \"routes_tokens\": %d, \"routes_fanout\": %s, %s}",
                             step, json_string(path).c_str(), n, json_array(fanout).c_str(), progress.c_str()));
}

// The "moe" value of a logged step: one object per MoE layer with its
// routing statistics (SPEC: Observability); "cutoff" and "batch_cutoff" only
// when the router tracks them.
static std::string routing_json(const std::vector<LayerRoutingStats>& layers) {
    std::string out = "[";
    for (size_t l = 0; l < layers.size(); l++) {
        const LayerRoutingStats& s = layers[l];
        RoutingSummary r = summarize_routing(s);
        out += string_format("%s{\"layer\": %d, \"usage_min\": %s, \"usage_max\": %s, \"usage_cv\": %s, "
                             "\"fanout_mean\": %s, \"fanout_hist\": %s, \"clamped\": %lld, \"aux_loss\": %s, "
                             "\"cutoff_dev\": %s",
                             l ? ", " : "", s.layer, json_number(r.usage_min).c_str(), json_number(r.usage_max).c_str(),
                             json_number(r.usage_cv).c_str(), json_number(r.fanout_mean).c_str(),
                             json_array(std::vector<double>(r.fanout_frac, r.fanout_frac + 4)).c_str(),
                             (long long)s.clamped, json_number(s.aux_loss).c_str(), json_number(r.cutoff_dev).c_str());
        if (!s.cutoff.empty()) out += ", \"cutoff\": " + json_array(s.cutoff);
        if (!s.batch_cutoff.empty()) out += ", \"batch_cutoff\": " + json_array(s.batch_cutoff);
        out += ", \"counts\": " + json_array(s.counts) + "}";
    }
    return out + "]";
}

// The console line under a logged step: rates are means over the MoE
// layers; the clamp count and the aux loss are sums over them (the SPEC's
// aux loss is the sum of the layers'). Parts a router does not have are
// left out.
static std::string routing_line(const char* routing_now, const RouterConfig& router,
                                const std::vector<LayerRoutingStats>& layers) {
    double cv = 0, lo = 0, hi = 0, fanout = 0, frac[4] = {0, 0, 0, 0}, dev = 0, aux = 0;
    long long clamped = 0;
    int devs = 0;
    for (const LayerRoutingStats& s : layers) {
        RoutingSummary r = summarize_routing(s);
        cv += r.usage_cv; lo += r.usage_min; hi += r.usage_max; fanout += r.fanout_mean;
        for (int b = 0; b < 4; b++) frac[b] += r.fanout_frac[b];
        if (!std::isnan(r.cutoff_dev)) { dev += r.cutoff_dev; devs++; }
        clamped += s.clamped;
        aux += s.aux_loss;
    }
    const double n = (double)layers.size();
    std::string line = string_format("        moe %s | usage cv %.3f, min %.3f, max %.3f | experts/token %.2f "
                                     "(0: %.0f%% 1: %.0f%% 2: %.0f%% 3+: %.0f%%)", routing_now, cv / n, lo / n, hi / n,
                                     fanout / n, 100 * frac[0] / n, 100 * frac[1] / n, 100 * frac[2] / n, 100 * frac[3] / n);
    if (devs > 0) line += string_format(" | cutoff dev %.4f", dev / devs);
    if (router.kind == RouterKind::ET && router.capacity >= 0) line += string_format(" | clamped %lld", clamped);
    if (router.kind == RouterKind::TC && router.tc_balance == TcBalance::Aux) line += string_format(" | aux %.4g", aux);
    return line;
}

// Several ranks must run one configuration: the same flags, data, build and
// checkpoint. Each hashes its own (every flag's value, the checkpoint's
// settings, which hold the data's fingerprint, the precision, the commit and
// the checkpoint it resumes from) and every rank
// compares them before the first step (through the gradients, still unused).
static void check_same_settings(MultiGpu& multi, const Model& model, Options& o, const int64_t* settings,
                                const std::string& resume_from) {
    if (!multi.active()) return;
    std::string text = string_format("%s %s %d %s\n", PRECISION_NAME, GIT_COMMIT, GIT_DIRTY, resume_from.c_str());
    for (const Flag& f : flag_table(o)) text += string_format("%s=%s\n", f.name, flag_value(f).c_str());
    const uint64_t hash = settings_hash(settings, CK_HEADER_FIELDS * sizeof(int64_t),
                                        settings_hash(text.data(), text.size()));
    const std::string differ = multi_gpu_ranks_unlike_rank0(multi, hash, model.grads);
    if (!differ.empty())
        fail("rank%s %s started with other settings than rank 0 (flags, data, build or checkpoint): start every "
             "rank with the same command, files and train_et", differ.find(',') == std::string::npos ? "" : "s",
             differ.c_str());
}

// Several ranks must also stay one model: after the same steps every rank's
// weights (the matmuls' copy and the routers' fp32 ones), cutoffs and biases
// must be the same bits (the owners sent their shards, and the routers saw
// the same statistics). Checked at every checkpoint and at the end: a hash
// of each rank's, compared on every rank (through the gradients: free
// between steps). Returns the log line, or fails naming the ranks that drifted.
static std::string check_ranks_agree(MultiGpu& multi, const Model& model, float* host_buffer, int step) {
    cudaCheck(cudaMemcpy(host_buffer, model.params, model.num_params * sizeof(floatX), cudaMemcpyDeviceToHost));
    uint64_t hash = settings_hash(host_buffer, model.num_params * sizeof(floatX));
    for (int t : model.router_tensors) {
        const size_t n = (size_t)model.tensors[t].numel();
        cudaCheck(cudaMemcpy(host_buffer, model.master_of(t), n * sizeof(float), cudaMemcpyDeviceToHost));
        hash = settings_hash(host_buffer, n * sizeof(float), hash);
    }
    const size_t router_floats = router_state_floats(model.router);
    router_save_state(model.router, host_buffer);
    hash = settings_hash(host_buffer, router_floats * sizeof(float), hash);
    const std::string differ = multi_gpu_ranks_unlike_rank0(multi, hash, model.grads);
    if (!differ.empty())
        fail("step %d: rank(s) %s hold other weights, cutoffs or biases than rank 0: the ranks have drifted apart "
             "(a bug: please report it with the command)", step, differ.c_str());
    return string_format("step %6d | weights, cutoffs and biases identical on all %d ranks (hash %016llx)\n", step,
                         multi.world, (unsigned long long)hash);
}

int main(int argc, char** argv) {
    const std::string start_time = utc_now();
    Options o = parse_flags(argc, argv);
    ProcessLayout layout;  // one process per GPU, started by mpirun or srun (or one alone)
    const std::string layout_err = process_layout_from_environment(&layout);
    if (!layout_err.empty()) fail("%s", layout_err.c_str());
    const int world = layout.world, rank = layout.rank;
    if (world > 1) fail_prefix = string_format("rank %d: ", rank);
    ModelConfig config = model_from_options(o);
    if (o.max_steps == 0) fail("-x: 0 steps; use a positive count, or -1 for one epoch");
    const int grad_accum = gradient_accumulation(o, world);
    prepare_output_dir(o);
    RunLog log;
    log.quiet = rank != 0;
    DataSources data;
    open_data(o, &data, log);
    config.vocab_size = data.vocab_size;

    DataLoader train_loader, val_loader;
    std::string err = train_loader.init(data.train.get(), o.batch, o.seq_len, rank, world, (uint64_t)o.seed, true);
    if (!err.empty()) fail("-i: %s", err.c_str());
    if (data.val) {
        err = val_loader.init(data.val.get(), o.batch, o.seq_len, rank, world, (uint64_t)o.seed, false);
        if (!err.empty()) {
            log.warn("validation off: " + err);
            data.val.reset();
        }
    }
    size_t steps_per_epoch = train_loader.batches_per_epoch() / grad_accum;
    if (steps_per_epoch == 0)
        fail("-d: one epoch of the train data (%zu micro-batches) is less than one step of %d; use a smaller -d",
             train_loader.batches_per_epoch(), grad_accum);
    int steps = o.max_steps > 0 ? o.max_steps : (int)steps_per_epoch;
    config.router.et_warmup_steps = et_warmup_steps(config.router, steps);  // -1 (20% of the run) made a count
    const Schedule schedule = lr_schedule(o, steps);

    // The model as model_allocate will make it, worked out without the GPU.
    const OptimizerConfig optim = optimizer_from_options(o);
    const Model planned = model_plan(config, optim, o.batch, o.seq_len, world, rank);
    print_config(log, o, config, data, grad_accum, steps, steps_per_epoch, planned, checkpoint_bytes(planned));
    if (world > 1)
        log.print("ranks    %d processes (%s), %d on this node; each trains -b %d x -t %d per micro-step and keeps "
                  "the optimizer state of its shard (rank 0: %.1fM of %.1fM parameters); memory above is rank 0's\n",
                  world, layout.launcher.c_str(), layout.local_world, o.batch, o.seq_len, planned.shard_size() / 1e6,
                  planned.num_params / 1e6);
    CoreData core;  // -ce: CORE's examples, read before the GPU
    if (o.core_path != "none") {
        err = core.load(o.core_path);
        if (!err.empty()) fail("-ce: %s", err.c_str());
        if (core.vocab != data.vocab_size)
            fail("-ce: %s was tokenized for a vocab of %d and the training data has %d: write it with the data's "
                 "tokenizer (data/core.py --tokenizer, or GPT-2's by default)", o.core_path.c_str(), core.vocab,
                 data.vocab_size);
        const CoreWorkload w = core_workload(core, o.batch, o.seq_len);
        const double flops = w.tokens * training_flops_per_token(config) / 3;  // a forward is a third of training
        const std::vector<std::string> missing = core.missing();
        log.print("core     %s: %zu of %zu tasks%s, %zu examples in %lld rows; %lld forwards of %d x %d tokens "
                  "(%s tokens with the filler): %.3g TFLOP, %.2g s at 40%% of an H200's peak\n", o.core_path.c_str(),
                  core.tasks.size() - missing.size(), core.tasks.size(), missing.empty() ? "" : " (partial)",
                  core.examples.size(), (long long)w.rows, (long long)w.forwards, o.batch, o.seq_len,
                  human_count((double)w.tokens).c_str(), flops / 1e12, flops / (0.4 * 989e12));
    }
    const RouteText route = o.routes_path != "none" ? route_text(o, data, config) : RouteText{};
    if (!route.tokens.empty())
        log.print("routes   %zu tokens of %s from token %d, through %zu MoE layers, written at the end\n",
                  route.tokens.size(), o.routes_path.c_str(), o.routes_offset, planned.router.layers.size());
    for (const std::string& w : settings_warnings(o, config, data, steps, schedule.warmup, world)) log.warn(w);
    int64_t settings[CK_HEADER_FIELDS] = {};
    checkpoint_settings(o, config, planned.num_params, world, steps, data_fingerprint(*data.train), settings);
    const bool from_checkpoint = o.resume || o.eval_only;
    const std::string resume_from = from_checkpoint ? check_resume(o, settings, log) : "";

    GpuInfo gpu;
    bool no_device = false;
    err = gpu_open(multi_gpu_device(layout), &gpu, &no_device);
    // a setting too big for the GPU is named even where no GPU answers
    check_memory_fits(o, config, optim, planned, err.empty() ? gpu.prop.totalGlobalMem : H200_MEMORY,
                      err.empty() ? gpu.prop.name : "an H200 (no GPU here to ask)");
    if (!err.empty() && no_device)
        fail("%s: train_et trains on an NVIDIA GPU; this machine has none (the CPU tests run with 'make test')",
             err.c_str());
    if (!err.empty()) fail("%s", err.c_str());
    MultiGpu multi;
    multi_gpu_init(&multi, layout, o.rendezvous_dir.empty() ? o.out_dir : o.rendezvous_dir, o.rank_time_limit,
                   o.out_dir + "/ckpt_*.bin");
    log.open(o.out_dir, from_checkpoint);
    log.print("gpu      %s, %d SMs, %.0f GiB, compute capability %d.%d, peak bf16 %.0f TFLOP/s\n", gpu.prop.name,
              gpu.prop.multiProcessorCount, gpu.prop.totalGlobalMem / 1073741824.0, gpu.prop.major, gpu.prop.minor,
              gpu.peak_bf16_flops / 1e12);
    Model model;
    model.config = config;
    model.optim = optim;
    model.world = world;
    model.rank = rank;
    model.multi = multi.active() ? &multi : nullptr;
    model_allocate(&model, o.batch, o.seq_len);
    if (model.memory.total() != planned.memory.total())
        fail("internal: model_allocate took %zu bytes, its plan (model_plan) said %zu", model.memory.total(),
             planned.memory.total());
    multi_gpu_check_devices(multi, gpu.prop, model.grads);
    check_same_settings(multi, model, o, settings, resume_from);
    // -vm micro-batches in all, shared out over the ranks
    const int val_batches = data.val ? (int)std::min<size_t>(std::max(1, o.val_batches / world),
                                                             val_loader.batches_per_epoch()) : 0;
    BatchFeeder feeder;
    feeder.allocate((size_t)o.batch * o.seq_len);
    float* host_buffer = nullptr;  // for checkpoints: one array at a time
    cudaCheck(cudaMallocHost(&host_buffer, model.num_params * sizeof(float)));
    std::vector<floatX> logits_row(config.padded_vocab());
    Tokenizer tokenizer;
    if (!data.tokenizer_path.empty()) tokenizer.load(data.tokenizer_path);

    TrainState st;
    st.sample_rng = Rng(seed_mix((uint64_t)o.seed, 0x5A3E));
    CoreRunner core_runner;
    core_runner.allocate(o.batch, o.seq_len);
    if (from_checkpoint) {
        st = load_checkpoint(log, resume_from, &model, host_buffer);
        train_loader.restore(st.data);
    } else {
        model_init_parameters(&model, (uint64_t)o.seed);
    }
    log.record(run_record(argc, argv, o, config, data, steps, schedule.warmup, grad_accum, planned,
                          checkpoint_bytes(planned), gpu.prop.name, start_time, from_checkpoint ? st.step : -1));

    const double flops_per_token = training_flops_per_token(config);
    size_t logged_group = 0;
    for (size_t g = 1; g < model.groups.size(); g++)
        if (model.groups[g].params > model.groups[logged_group].params) logged_group = g;
    const float dloss = 1.0f / ((float)o.total_batch);
    const double elapsed_before = st.elapsed;  // a resumed run's earlier processes
    double window_start = wall_seconds(), run_start = window_start;
    int window_steps = 0;
    // what every record of step s carries: the tokens trained on so far and the run's seconds
    auto progress = [&](int s) {
        return string_format("\"tokens\": %lld, \"elapsed_s\": %.3f", (long long)s * o.total_batch,
                             elapsed_before + wall_seconds() - run_start);
    };
    // everything an evaluation of the weights at step s writes: validation, CORE, routes
    auto evaluate_all = [&](int s, bool final, bool validate, bool with_core, bool with_routes) {
        if (data.val && validate) {
            float val_loss = evaluate(&model, multi, val_loader, feeder, val_batches);
            log.print("step %6d | val loss %.4f%s\n", s, val_loss, final ? " (final)" : "");
            log.record(string_format("{\"step\": %d, \"val_loss\": %s, %s}", s, json_number(val_loss, "%.6f").c_str(),
                                     progress(s).c_str()));
        }
        // CORE on every rank (the same work, no collectives), the routes on rank 0: long work without
        // progress of the step's kind, so busy for the watchdog
        multi_gpu_busy(multi, true);
        if (with_core && !core.examples.empty()) log_core(log, &model, core_runner, core, s, progress(s));
        if (with_routes && !route.tokens.empty() && rank == 0) log_routes(log, &model, data, route, o.out_dir, s, progress(s));
        multi_gpu_busy(multi, false);
    };
    if (o.eval_only) {
        evaluate_all(st.step, false, true, true, true);
        log.print("done: evaluated %s (step %d)\n", resume_from.c_str(), st.step);
        model_free(&model);
        multi_gpu_finish(multi);
        return 0;
    }
    for (; st.step < steps; ) {
        int step = st.step;
        bool last = step == steps - 1;
        const bool validate = data.val && o.val_every > 0 && step % o.val_every == 0;
        const bool score_core = !core.examples.empty() && o.core_every > 0 && step > 0 && step % o.core_every == 0;
        if (validate || score_core) {
            evaluate_all(step, false, validate, score_core, false);
            window_start = wall_seconds();
            window_steps = 0;
        }
        if (rank == 0 && o.sample_every > 0 && step > 0 && step % o.sample_every == 0) {
            multi_gpu_busy(multi, true);
            std::vector<int> ids = sample(&model, o.sample_tokens, data.eot, st.sample_rng, logits_row);
            multi_gpu_busy(multi, false);
            std::string text;
            for (int id : ids) text += tokenizer.vocab_size() > id ? tokenizer.decode(id) : " " + std::to_string(id);
            log.print("step %6d | sample:%s%s\n", step, tokenizer.vocab_size() ? "\n" : "", text.c_str());
            window_start = wall_seconds();
            window_steps = 0;
        }

        router_step_begin(model.router, step);
        cudaCheck(cudaMemsetAsync(model.grads, 0, model.num_params * sizeof(float)));
        cudaCheck(cudaMemsetAsync(model.loss_total, 0, sizeof(float)));
        for (int micro = 0; micro < grad_accum; micro++) {
            feeder.feed(train_loader, model.acts);
            model_forward(&model, o.batch, o.seq_len, true, true, dloss);
            model.reduce_grads = micro == grad_accum - 1;  // the gradients are final in this backward pass
            model_backward(&model, o.batch, o.seq_len);
        }
        model.reduce_grads = false;
        multi_gpu_buckets_done(multi);  // one communicator's collectives in one order on the main stream
        router_share_stats(model.router);
        model_update(&model, schedule, (float)o.grad_clip, step);
        // the log's lr: the largest group's (-opt muon: the matrices')
        const ParamGroup& logged = model.groups[logged_group];
        const double lr = logged.lr * schedule.factor(step, logged.warmup);
        st.step++;
        st.data = train_loader.position();
        st.elapsed = elapsed_before + wall_seconds() - run_start;
        window_steps++;

        bool checkpoint = last || (o.checkpoint_every > 0 && st.step % o.checkpoint_every == 0);
        const bool log_step = st.step % o.log_every == 0 || st.step == 1 || last || checkpoint;
        multi.step = st.step;
        if (log_step) multi_gpu_sum(multi, model.loss_total, 1);
        multi_gpu_wait(multi);  // with several ranks, once a step: the watchdog's measure of progress
        if (log_step) {
            float loss_total = 0, norm = 0;
            cudaCheck(cudaMemcpy(&loss_total, model.loss_total, sizeof(float), cudaMemcpyDeviceToHost));
            cudaCheck(cudaMemcpy(&norm, model.grad_norm_value, sizeof(float), cudaMemcpyDeviceToHost));
            float loss = loss_total / o.total_batch;
            double now = wall_seconds(), dt = (now - window_start) / window_steps;
            double tokens_per_s = o.total_batch / dt;
            double mfu = gpu.peak_bf16_flops > 0 ? flops_per_token * tokens_per_s / gpu.peak_bf16_flops : 0;
            double eta = dt * (steps - st.step);
            log.print("step %6d/%d | loss %.4f | lr %.2e | norm %.3f | %.0f ms | %.0f tok/s | MFU %.1f%% | ETA %s\n",
                      st.step, steps, loss, lr, norm, dt * 1e3, tokens_per_s, 100 * mfu, format_duration(eta).c_str());
            std::string record = string_format("{\"step\": %d, \"loss\": %s, \"lr\": %.6e, \"grad_norm\": %s, "
                                               "\"step_ms\": %.3f, \"tokens_per_s\": %.1f, \"mfu\": %.5f, %s", st.step,
                                               json_number(loss, "%.6f").c_str(), lr, json_number(norm, "%.6f").c_str(),
                                               dt * 1e3, tokens_per_s, mfu, progress(st.step).c_str());
            // read before router_step_end, so the cutoffs are the ones this step routed with
            std::vector<LayerRoutingStats> routing = router_read_stats(model.router);
            if (!routing.empty()) {
                const char* routed_by = router_routing_now(model.router);
                log.print("%s\n", routing_line(routed_by, config.router, routing).c_str());
                record += string_format(", \"routing\": \"%s\", \"moe\": ", routed_by) + routing_json(routing);
            }
            log.record(record + "}");
            if (!std::isfinite(loss) || !std::isfinite(norm)) {
                std::vector<std::string> saved = glob_sorted(o.out_dir + "/ckpt_*.bin");
                fail("loss %.4f, gradient norm %.4f at step %d: training diverged. The last good checkpoint is %s "
                     "(resume with -y 1, perhaps with a lower -l)", loss, norm, st.step,
                     saved.empty() ? "none" : saved.back().c_str());
            }
            window_start = wall_seconds();
            window_steps = 0;
        }
        router_step_end(model.router);
        if (checkpoint) {
            save_checkpoint(o, model, multi, st, settings, host_buffer);
            if (multi.active()) log.print("%s", check_ranks_agree(multi, model, host_buffer, st.step).c_str());
            window_start = wall_seconds();
            window_steps = 0;
        }
    }
    evaluate_all(steps, true, o.val_every > 0, true, true);
    log.print("done: %d steps in %s\n", steps, format_duration(wall_seconds() - run_start).c_str());
    model_free(&model);
    multi_gpu_finish(multi);
    return 0;
}
