// test/gpu_test_core.cu: CORE's forwards on the GPU (core_eval.cuh) against
// the CPU reference model, and the causal protocol.
//
//   1. A tiny dense model scores examples of the three task types, short and
//      longer than its context (cropped), in two length buckets, with an
//      empty span: each option's mean span loss against test/reference.h's
//      model (RefModel<double>) run on the option alone; the greedy match of
//      language-modelling continuations made by the reference's own greedy
//      decoding (must match) and of random ones (must not); the judged CORE
//      against judging the reference's losses.
//   2. The causal protocol: an ET model scores an example alone and inside a
//      batch of others: bit-identical losses under its tracked cutoffs, and
//      different ones under EC's batch mode (-er batch), where the other
//      examples and the filler rows compete for the experts.
//
// Conventions as test/gpu_test_model.cu (test/gpu_check.h): seeded random
// weights, N(0, 0.1) in every tensor, so every path matters.
#include "../core_eval.cuh"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "check.h"
namespace ref {
#include "reference.h"
}

#include "gpu_check.h"

static const int VOCAB = 300, BOS = VOCAB - 1;

static ModelConfig tiny_config(int experts, int T) {
    ModelConfig c;
    c.preset = "gpu_test";
    c.n_layer = 2;
    c.n_embd = 64;
    c.n_head = c.n_kv_head = 2;
    c.vocab_size = VOCAB;
    c.seq_len = T;
    c.n_experts = experts;
    c.router.kind = RouterKind::ET;
    c.router.et_warmup_steps = 0;
    return c;
}

// N(0, scale) weights in every tensor (padding rows 0); returns what the
// matmuls read.
static std::vector<double> random_weights(Model& model, Rng& rng, double scale) {
    std::vector<float> master(model.num_params, 0.0f);
    for (size_t i = 0; i < model.tensors.size(); i++) {
        const ParamTensor& p = model.tensors[i];
        const size_t real = (size_t)((p.rows - p.padding_rows) * p.cols);
        for (size_t j = 0; j < real; j++) master[model.offsets[i] + j] = (float)(scale * normal(rng));
    }
    upload_to(model.master, master);
    copy_to_floatX(model.params, model.master, model.num_params);
    sync_after("copy_to_floatX");
    return to_doubles(download_from(model.params, model.num_params));
}

static std::vector<int> random_sequence(Rng& rng, int length) {
    std::vector<int> s(length);
    s[0] = BOS;
    for (int i = 1; i < length; i++) s[i] = (int)rng.below(VOCAB - 1);
    return s;
}

// The reference model on one sequence: each position's loss and greedy prediction.
struct RefRow {
    std::vector<double> losses;
    std::vector<int> predicted;
};
static RefRow reference_row(const ref::RefModel<double>& model, const std::vector<double>& params,
                            const std::vector<int>& tokens) {
    const int T = (int)tokens.size();
    std::vector<int> targets(T, 0);
    for (int t = 0; t + 1 < T; t++) targets[t] = tokens[t + 1];
    ref::RefModel<double>::Activations a;
    model.forward(params, tokens.data(), targets.data(), 1, T, &a);
    RefRow row{a.losses, std::vector<int>(T)};
    for (int t = 0; t < T; t++) row.predicted[t] = ref::softcap_argmax(&a.logits[(size_t)t * VOCAB], VOCAB);
    return row;
}

static void test_scores_match_the_reference(Test& t) {
    const int B = 2, T = 96;  // rows of 64 (two per forward) and of 96 tokens
    Model model;
    model.config = tiny_config(0, T);
    model_allocate(&model, B, T);
    Rng rng(1401);
    const std::vector<double> params = random_weights(model, rng, 0.1);
    const ref::RefModel<double> reference{model.config};

    CoreData d;
    d.bos = BOS;
    d.vocab = VOCAB;
    d.tasks = {{"mc", CoreTaskType::MultipleChoice, 0, 0.25, 0, 0},
               {"schema", CoreTaskType::Schema, 0, 0.5, 0, 0},
               {"lm", CoreTaskType::LanguageModeling, 0, 0.0, 0, 0}};
    auto add = [&](int task, int gold, std::vector<CoreSequence> options) {
        d.examples.push_back({task, gold, std::move(options)});
        if (d.tasks[task].examples++ == 0) d.tasks[task].first = (int)d.examples.size() - 1;
    };
    for (int i = 0; i < 4; i++) {  // multiple choice: a shared prefix, then the options differ
        const std::vector<int> prefix = random_sequence(rng, 20 + 30 * i);
        std::vector<CoreSequence> options;
        for (int o = 0; o < 3; o++) {
            CoreSequence s{prefix, (int)prefix.size(), 0};
            for (int k = 0; k < 3 + o; k++) s.tokens.push_back((int)rng.below(VOCAB - 1));
            s.end = (int)s.tokens.size();
            options.push_back(s);
        }
        if (i == 3) options[1].start = options[1].end;  // an empty span: never picked
        add(0, i % 3, options);
    }
    for (int i = 0; i < 2; i++) {  // schema: the options differ in the context, share the ending
        const std::vector<int> ending = random_sequence(rng, 6);
        std::vector<CoreSequence> options;
        for (int o = 0; o < 2; o++) {
            CoreSequence s{random_sequence(rng, 40 + 70 * i), 0, 0};  // 110 tokens: cropped to 96
            s.tokens.insert(s.tokens.end(), ending.begin() + 1, ending.end());
            s.end = (int)s.tokens.size();
            s.start = s.end - 5;
            options.push_back(s);
        }
        add(1, i, options);
    }
    int greedy_examples = 0;
    for (int i = 0; i < 4; i++) {  // language modelling: greedy continuations (even i) and random ones
        CoreSequence s{random_sequence(rng, 30 + 40 * i), 0, 0};
        s.start = (int)s.tokens.size();
        for (int k = 0; k < 4; k++) {
            if (i % 2 == 0) s.tokens.push_back(reference_row(reference, params, s.tokens).predicted.back());
            else s.tokens.push_back((int)rng.below(VOCAB - 1));
        }
        s.end = (int)s.tokens.size();
        greedy_examples += i % 2 == 0;
        add(2, 0, {s});
    }

    CoreRunner runner;
    runner.allocate(B, T);
    std::vector<int> all(d.examples.size());
    for (size_t i = 0; i < all.size(); i++) all[i] = (int)i;
    const CoreRun run = core_run(&model, runner, d, all);
    std::vector<double> got, want;
    CoreScore ref_score;
    ref_score.tasks.resize(d.tasks.size());
    for (size_t i = 0; i < d.examples.size(); i++) {
        const CoreExample& ex = d.examples[i];
        std::vector<double> means;
        for (size_t o = 0; o < ex.options.size(); o++) {
            const CoreSequence seq = core_crop(ex.options[o], T);
            const RefRow row = reference_row(reference, params, seq.tokens);
            std::vector<float> losses(row.losses.begin(), row.losses.end());
            const double mean = core_span_mean(losses.data(), seq);
            means.push_back(mean);
            if (std::isnan(mean)) {
                CHECK(t, std::isnan(run.mean_loss[i][o]), "example %zu option %zu: an empty span's mean is %g", i, o,
                      run.mean_loss[i][o]);
                continue;
            }
            got.push_back(run.mean_loss[i][o]);
            want.push_back(mean);
            if (ex.task == 2)
                CHECK(t, run.greedy[i][o] == core_greedy_match(row.predicted.data(), seq),
                      "example %zu: greedy match %d, the reference says %d", i, run.greedy[i][o],
                      (int)core_greedy_match(row.predicted.data(), seq));
        }
        const bool correct = ex.task == 2 ? (bool)run.greedy[i][0] : core_pick(means) == ex.gold;
        ref_score.tasks[ex.task].correct += correct;
        ref_score.tasks[ex.task].total++;
    }
    check_close(t, "mean span losses", got, want, TOL);
    int matched = 0;
    for (size_t i = 0; i < d.examples.size(); i++)
        if (d.examples[i].task == 2) matched += run.greedy[i][0];
    CHECK(t, matched == greedy_examples, "%d of %d greedy continuations matched (random ones must not)", matched,
          greedy_examples);
    const CoreScore score = core_evaluate(&model, runner, d);
    for (size_t k = 0; k < d.tasks.size(); k++)
        CHECK(t, score.tasks[k].correct == ref_score.tasks[k].correct && score.tasks[k].total == ref_score.tasks[k].total,
              "task %s: %d of %d correct, judging the same losses gives %d of %d", d.tasks[k].label.c_str(),
              score.tasks[k].correct, score.tasks[k].total, ref_score.tasks[k].correct, ref_score.tasks[k].total);
    model_free(&model);
}

static bool same_doubles(const std::vector<double>& a, const std::vector<double>& b) {
    return a.size() == b.size() && memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

static void test_causal_protocol(Test& t) {
    const int B = 4, T = 64;
    Model model;
    model.config = tiny_config(4, T);
    model_allocate(&model, B, T);
    Rng rng(1402);
    random_weights(model, rng, 0.1);
    // tracked cutoffs that route about half the tokens to each expert
    const size_t L = model.router.layers.size(), E = model.router.E;
    upload_to(model.router.raw_cutoff, std::vector<float>(L * E, 0.0f));
    model.router.updates = 1;

    CoreData d;
    d.bos = BOS;
    d.vocab = VOCAB;
    d.tasks = {{"mc", CoreTaskType::MultipleChoice, 0, 0.25, 6, 0}};
    for (int i = 0; i < 6; i++) {
        const std::vector<int> prefix = random_sequence(rng, 30 + 5 * i);
        std::vector<CoreSequence> options;
        for (int o = 0; o < 2; o++) {
            CoreSequence s{prefix, (int)prefix.size(), 0};
            for (int k = 0; k < 5; k++) s.tokens.push_back((int)rng.below(VOCAB - 1));
            s.end = (int)s.tokens.size();
            options.push_back(s);
        }
        d.examples.push_back({0, 0, options});
    }
    CoreRunner runner;
    runner.allocate(B, T);
    const std::vector<int> alone = {0}, batch = {0, 1, 2, 3, 4, 5};
    for (EvalRouting routing : {EvalRouting::Threshold, EvalRouting::Batch}) {
        model.router.config.eval_routing = routing;
        const CoreRun a = core_run(&model, runner, d, alone), b = core_run(&model, runner, d, batch);
        const bool same = same_doubles(a.mean_loss[0], b.mean_loss[0]);
        if (routing == EvalRouting::Threshold)
            CHECK(t, same, "ET's tracked cutoffs: the example scored alone (%.9g) and in a batch (%.9g) differ",
                  a.mean_loss[0][0], b.mean_loss[0][0]);
        else
            CHECK(t, !same, "EC's batch mode: the example scored alone and in a batch agree (%.9g): no leak shown",
                  a.mean_loss[0][0]);
    }
    model_free(&model);
}

int main() {
    return run_gpu_tests("gpu_core", {
        GPU_TEST(scores_match_the_reference),
        GPU_TEST(causal_protocol),
    });
}
