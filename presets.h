// presets.h: one preset per row of the paper's Tables 1 and 2 (-preset NAME).
//
// A preset is a list of train_et flags: everything the paper fixes (model,
// experts, router and its settings, optimizer and its groups, schedule,
// batch, steps). Flags given on the command line after it win. Where the
// paper's text and the authors' code part, a preset follows the code, which
// produced the tables (docs/settings.md says row by row); the text's choice
// stays one flag away.
//
// The authors ran the rows with a global pool (EC 512k and 256k, ET) with
// expert parallelism, where the routed experts' Muon keeps a constant
// momentum of 0.95 (-me 0); the others warm it up from 0.85 like every matrix.
//
// The recipe every preset shares (the authors' code, docs/settings.md):
// Muon for the matrices at 0.02, AdamW for wte (0.2) and lm_head and the
// router (0.004), the muP factor on the AdamW groups only, AdamW betas
// 0.8/0.95 and eps 1e-10, no weight decay, clipping at 1.0, a constant rate
// then a linear warm-down over the last 20% to 0 with no warm-up; 524,288
// tokens per step of 2048-token sequences; validation every 250 steps on
// 10,485,760 tokens (-vm micro-batches of the preset's -b).
//
// The routing pool is given in tokens: EC's, and the one ET's cutoff
// statistic is taken over (the authors gather every rank's logits: the
// global batch of 8 GPUs). A pool of one sequence is -ep seq; a larger one is
// a micro-batch of pool / 2048 sequences (-b, -ep micro). Where one H200
// cannot hold that micro-batch (the dry run's memory plans), the preset
// trains with the largest pool one H200 forms and says at start-up what the
// paper's pool needs (ranks of the same micro-batch pooled with -ep global).
// The other presets take the authors' micro-batch per GPU (d12: 32
// sequences, d20: 16), which is also TC's aux-loss pool.

// Plain C++: train_et, the dry run (test/emu/dry_run.cu) and the tests read
// the same table.
#pragma once

#include <cstring>
#include <string>
#include <vector>

static const int PAPER_VOCAB = 65536;  // the paper's BPE (rustbpe), trained on FineWeb-Edu

struct Preset {
    const char* name;
    const char* row;    // the paper's table row it reproduces
    const char* flags;  // train_et flags, space-separated
    long long paper_pool_tokens;  // EC and ET: the paper's routing pool; 0: no pool
    long long pool_tokens;        // the pool the flags form (smaller where one H200 cannot form the paper's)
};

#define RECIPE "-opt muon -og adamw -om adamw -lm 0.02 -le 0.2 -lh 0.004 -b1 0.8 -b2 0.95 -ae 1e-10 -c 0 -gc 1 " \
               "-a wsd -u 0 -wd 0.2 -q 0 -d 524288 -t 2048 -v 250"
#define D12 RECIPE " -m d12 -x 19073"
#define D20 RECIPE " -m d20 -x 21362"
#define MOE " -e 16 -k 1"

static const Preset PRESETS[] = {
    {"d12-dense", "Table 1, d12: dense", D12 " -e 0 -b 32 -vm 160", 0, 0},
    {"d12-tc", "Table 1, d12: TC, no balancing", D12 MOE " -r tc -tb none -b 32 -vm 160", 0, 0},
    {"d12-tc-aux", "Table 1, d12: TC, aux loss 0.001", D12 MOE " -r tc -tb aux -ta 0.001 -b 32 -vm 160", 0, 0},
    {"d12-tc-lossfree", "Table 1, d12: TC, loss-free balancing (u 0.001 as the code; the text says 0.005)",
     D12 MOE " -r tc -tb lossfree -tu 0.001 -b 32 -vm 160", 0, 0},
    {"d12-ec-2k", "Table 1, d12: EC, pool 2k tokens (one sequence)",
     D12 MOE " -r ec -eb 0.999 -ep seq -b 32 -vm 160", 2048, 2048},
    {"d12-ec-8k", "Table 1, d12: EC, pool 8k tokens", D12 MOE " -r ec -eb 0.999 -ep micro -b 4 -vm 1280", 8192, 8192},
    {"d12-ec-64k", "Table 1, d12: EC, pool 64k tokens", D12 MOE " -r ec -eb 0.999 -ep micro -b 32 -vm 160", 65536,
     65536},
    {"d12-ec-512k", "Table 1, d12: EC, pool 512k tokens (the global batch)",
     D12 MOE " -r ec -eb 0.999 -me 0 -ep micro -b 128 -vm 40", 524288, 262144},
    {"d12-et", "Table 1, d12: ET (EMA 0.999, EC warm-up 4000 steps, clamp 0.5)",
     D12 MOE " -r et -eb 0.999 -ew 4000 -ec 0.5 -me 0 -ep micro -b 128 -vm 40", 524288, 262144},
    {"d20-dense", "Table 2, d20: dense", D20 " -e 0 -b 16 -vm 320", 0, 0},
    {"d20-tc-aux", "Table 2, d20: TC, aux loss 0.001", D20 MOE " -r tc -tb aux -ta 0.001 -b 16 -vm 320", 0, 0},
    {"d20-ec-256k", "Table 2, d20: EC, pool 256k tokens (the global batch)",
     D20 MOE " -r ec -eb 0.999 -me 0 -ep micro -b 32 -vm 160", 262144, 65536},
    {"d20-et", "Table 2, d20: ET (EMA 0.999, EC warm-up 4000 steps, clamp 0.5)",
     D20 MOE " -r et -eb 0.999 -ew 4000 -ec 0.5 -me 0 -ep micro -b 32 -vm 160", 262144, 65536},
};

#undef RECIPE
#undef D12
#undef D20
#undef MOE

inline const Preset* find_preset(const std::string& name) {
    for (const Preset& p : PRESETS)
        if (name == p.name) return &p;
    return nullptr;
}

inline std::string preset_names() {
    std::string out;
    for (const Preset& p : PRESETS) out += (out.empty() ? "" : ", ") + std::string(p.name);
    return out;
}

// The preset's flags as argv-style words.
inline std::vector<std::string> preset_words(const Preset& p) {
    std::vector<std::string> words;
    std::string word;
    for (const char* c = p.flags;; c++) {
        if (*c == ' ' || *c == '\0') {
            if (!word.empty()) words.push_back(word);
            word.clear();
            if (*c == '\0') return words;
        } else {
            word += *c;
        }
    }
}

