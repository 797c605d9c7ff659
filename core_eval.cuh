// core_eval.cuh: the forwards that score CORE (data/core_eval.h says what is
// scored and how it is judged), and the routes of one text for the routing
// pictures (dev/plot_routing.py).
//
// CORE. Every option of every example is one row: its tokens, cropped to the
// model's context. Rows are bucketed by length into fixed batch shapes, Tb
// tokens per row (64, 128, ... doubling, up to the context T) and B x T / Tb
// rows per forward (the micro-batch's token count), so padding stays small
// and no buffer grows. A batch is always full: rows a bucket lacks are
// filler (BOS only). So every forward of a bucket has the same shape, and a
// row's losses do not depend on which rows share its batch as long as the
// routing is causal (SPEC: ET's and EC's tracked cutoffs in evaluation,
// TC's top-K); EC's batch mode (-er batch) lets the batch decide, and the
// scores show the leak. One forward gives each position's loss (the fused
// cross-entropy) and greedy prediction (logits_argmax); the host reads both
// back once per batch. Evaluation is not the training step: host syncs are
// fine here.
#pragma once

#include <algorithm>
#include <map>
#include <vector>

#include "data/core_eval.h"
#include "model.cuh"

// The row length of a sequence's bucket: the smallest of 64, 128, ... that
// holds it, and at most T (a context below 64 is one bucket).
inline int core_bucket_length(int length, int T) {
    int Tb = std::min(64, T);
    while (Tb < length && Tb < T) Tb = std::min(2 * Tb, T);
    return Tb;
}

// What one evaluation of a set of examples found, per example and option.
struct CoreRun {
    std::vector<std::vector<double>> mean_loss;  // over the option's span (NaN: empty span)
    std::vector<std::vector<char>> greedy;       // every span token was the argmax
};

// The forwards' host side, sized once for the model's B x T.
struct CoreRunner {
    std::vector<int> tokens, targets, predicted;
    std::vector<float> losses;

    void allocate(int B, int T) {
        const size_t N = (size_t)B * T;
        tokens.resize(N);
        targets.resize(N);
        predicted.resize(N);
        losses.resize(N);
    }
};

// The work of evaluating `d` on a model of context T with micro-batches of B
// x T tokens: rows and the tokens the forwards process, filler included.
struct CoreWorkload {
    int64_t rows = 0, forwards = 0, tokens = 0;
};
inline CoreWorkload core_workload(const CoreData& d, int B, int T) {
    std::map<int, int64_t> rows_per_bucket;
    CoreWorkload w;
    for (const CoreExample& ex : d.examples)
        for (const CoreSequence& s : ex.options) {
            rows_per_bucket[core_bucket_length(std::min((int)s.tokens.size(), T), T)]++;
            w.rows++;
        }
    for (const auto& [Tb, rows] : rows_per_bucket) {
        const int64_t Bb = (int64_t)B * T / Tb, forwards = (rows + Bb - 1) / Bb;
        w.forwards += forwards;
        w.tokens += forwards * Bb * Tb;
    }
    return w;
}

// Scores the options of the examples `which` (indexes into d.examples).
inline CoreRun core_run(Model* model, CoreRunner& runner, const CoreData& d, const std::vector<int>& which) {
    Activations& a = model->acts;
    const int B = a.B, T = a.T, V = model->config.vocab_size, Vp = model->config.padded_vocab();
    struct Row {
        int example, option, bucket;
        CoreSequence seq;
    };
    std::vector<Row> rows;
    CoreRun out;
    out.mean_loss.resize(which.size());
    out.greedy.resize(which.size());
    for (size_t i = 0; i < which.size(); i++) {
        const CoreExample& ex = d.examples[which[i]];
        out.mean_loss[i].assign(ex.options.size(), NAN);
        out.greedy[i].assign(ex.options.size(), 0);
        for (size_t o = 0; o < ex.options.size(); o++) {
            CoreSequence seq = core_crop(ex.options[o], T);
            const int bucket = core_bucket_length((int)seq.tokens.size(), T);
            rows.push_back({(int)i, (int)o, bucket, std::move(seq)});
        }
    }
    std::stable_sort(rows.begin(), rows.end(), [](const Row& x, const Row& y) { return x.bucket < y.bucket; });
    for (size_t first = 0; first < rows.size();) {
        const int Tb = rows[first].bucket, Bb = B * T / Tb, N = Bb * Tb;
        size_t last = first;
        while (last < rows.size() && rows[last].bucket == Tb && (int)(last - first) < Bb) last++;
        std::fill(runner.tokens.begin(), runner.tokens.begin() + N, d.bos);
        std::fill(runner.targets.begin(), runner.targets.begin() + N, 0);
        for (size_t r = first; r < last; r++) {
            const std::vector<int>& seq = rows[r].seq.tokens;
            const size_t at = (r - first) * Tb;
            std::copy(seq.begin(), seq.end(), runner.tokens.begin() + at);
            std::copy(seq.begin() + 1, seq.end(), runner.targets.begin() + at);
        }
        cudaCheck(cudaMemcpy(a.tokens, runner.tokens.data(), N * sizeof(int), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(a.targets, runner.targets.data(), N * sizeof(int), cudaMemcpyHostToDevice));
        model_forward(model, Bb, Tb, true, false, 0.0f);
        logits_argmax(a.predicted, a.logits, N, V, Vp);
        cudaCheck(cudaMemcpy(runner.losses.data(), a.losses, N * sizeof(float), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(runner.predicted.data(), a.predicted, N * sizeof(int), cudaMemcpyDeviceToHost));
        for (size_t r = first; r < last; r++) {
            const size_t at = (r - first) * Tb;
            out.mean_loss[rows[r].example][rows[r].option] = core_span_mean(&runner.losses[at], rows[r].seq);
            out.greedy[rows[r].example][rows[r].option] = core_greedy_match(&runner.predicted[at], rows[r].seq);
        }
        first = last;
    }
    return out;
}

// CORE of the model on every example of d.
inline CoreScore core_evaluate(Model* model, CoreRunner& runner, const CoreData& d) {
    std::vector<int> all(d.examples.size());
    for (size_t i = 0; i < all.size(); i++) all[i] = (int)i;
    const CoreRun run = core_run(model, runner, d, all);
    CoreScore score;
    score.tasks.resize(d.tasks.size());
    for (size_t i = 0; i < all.size(); i++) {
        const CoreExample& ex = d.examples[i];
        const bool lm = d.tasks[ex.task].type == CoreTaskType::LanguageModeling;
        const bool correct = lm ? run.greedy[i][0] != 0 : core_pick(run.mean_loss[i]) == ex.gold;
        score.tasks[ex.task].correct += correct;
        score.tasks[ex.task].total++;
    }
    return score;
}

// The routes of one sequence (at most T tokens) through every MoE layer:
// (layers, tokens, E) bytes, 1 where a token went to an expert. Routed as
// evaluation routes it (the tracked cutoffs for EC and ET).
inline std::vector<uint8_t> route_sequence(Model* model, const std::vector<int>& tokens) {
    Router& r = model->router;
    const int n = (int)tokens.size();
    if (n < 1 || n > model->acts.T) fail("internal: routing %d tokens, the context holds %d", n, model->acts.T);
    cudaCheck(cudaMemcpy(model->acts.tokens, tokens.data(), n * sizeof(int), cudaMemcpyHostToDevice));
    r.record_routes = true;
    model_forward(model, 1, n, false, false, 0.0f);
    r.record_routes = false;
    const size_t L = r.layers.size(), E = r.E;
    std::vector<uint8_t> all(L * r.T * E), out(L * n * E);
    cudaCheck(cudaMemcpy(all.data(), r.route_record, all.size(), cudaMemcpyDeviceToHost));
    for (size_t l = 0; l < L; l++)
        std::copy(all.begin() + l * r.T * E, all.begin() + l * r.T * E + n * E, out.begin() + l * n * E);
    return out;
}
