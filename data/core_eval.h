// data/core_eval.h: CORE, the paper's second column (DCLM's 22 in-context
// tasks as nanochat scores them), on the host: the eval file data/core.py
// writes, the cropping of a sequence to the model's context, how an example
// is judged from its per-token losses and greedy predictions, and the scores.
// train_et runs the forwards (train_et.cu: core_evaluate); everything that
// decides a score is here, plain C++, so test/test_core_eval.cpp checks it
// alone. ../shared/data/core_sample/README.md (not part of the project)
// gives the algorithm; README "Evaluation" says how to run it.
//
// The eval file (little-endian; data/core.py writes it, atomically):
//   header    256 x int32: magic 20261203, version 1, tasks, examples,
//             max_per_task (-1: all), BOS id, vocab size, tasks missing
//   tasks     96 bytes each: label char[64], int32 type (0 multiple choice,
//             1 schema, 2 language modelling), int32 shots, float32 random
//             baseline in percent, int32 examples (0: its file is missing in
//             the bundle), int32 first example, 3 x int32 0
//   examples  task by task: int32 task, int32 gold, int32 options; per
//             option int32 length, span start, span end; then each option's
//             tokens as uint16
// A span [start, end) holds the scored tokens, each predicted from the token
// before it; position 0 is BOS.
//
// Judging (per example):
//   multiple choice and schema: each option's mean loss over its span; the
//     lowest wins, the first on ties; an empty span's mean is NaN, so option
//     0 with one always wins and any other never does (a plain
//     "best = 0; if (m[i] < m[best]) best = i" loop);
//   language modelling: correct iff the greedy prediction matches every
//     token of the span.
// Scores: accuracy per task; centered = (acc - b) / (1 - b) with b the random
// baseline; CORE = the mean of the centered accuracies of all 22 tasks,
// marked partial (naming the missing tasks) when the file lacks some.
#pragma once

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../common.h"

constexpr int CORE_MAGIC = 20261203;
constexpr int CORE_VERSION = 1;
constexpr int CORE_TASK_BYTES = 96;

enum class CoreTaskType { MultipleChoice = 0, Schema = 1, LanguageModeling = 2 };

struct CoreTask {
    std::string label;
    CoreTaskType type = CoreTaskType::MultipleChoice;
    int shots = 0;
    double baseline = 0;  // random-guess accuracy, as a fraction
    int examples = 0;     // 0: missing from the bundle
    int first = 0;        // its first example
};

struct CoreSequence {
    std::vector<int> tokens;
    int start = 0, end = 0;  // scored positions [start, end)
};

struct CoreExample {
    int task = 0, gold = 0;
    std::vector<CoreSequence> options;  // one for language modelling
};

struct CoreData {
    std::vector<CoreTask> tasks;
    std::vector<CoreExample> examples;
    int max_per_task = -1, bos = 0, vocab = 0;

    // Returns "" or "<path>: <reason>".
    std::string load(const std::string& path) {
        FILE* f = fopen(path.c_str(), "rb");
        if (!f) return path + ": cannot open (" + strerror(errno) + ")";
        std::string err = read(f, path);
        fclose(f);
        if (!err.empty()) {
            tasks.clear();
            examples.clear();
        }
        return err;
    }

    bool partial() const { return !missing().empty(); }
    std::vector<std::string> missing() const {
        std::vector<std::string> out;
        for (const CoreTask& t : tasks)
            if (t.examples == 0) out.push_back(t.label);
        return out;
    }

  private:
    std::string read(FILE* f, const std::string& path) {
        int32_t h[256];
        if (fread(h, sizeof(int32_t), 256, f) != 256) return path + ": too short for the 1024-byte CORE header";
        if (h[0] != CORE_MAGIC)
            return string_format("%s: bad magic %d (expected %d): not a CORE eval file (write one with data/core.py)",
                                 path.c_str(), h[0], CORE_MAGIC);
        if (h[1] != CORE_VERSION)
            return string_format("%s: version %d, this train_et reads version %d: rewrite it with data/core.py",
                                 path.c_str(), h[1], CORE_VERSION);
        if (h[2] <= 0 || h[2] > 1000 || h[3] < 0 || h[6] <= 0 || h[6] > 65536 || h[5] < 0 || h[5] >= h[6])
            return string_format("%s: implausible header (tasks %d, examples %d, BOS %d, vocab %d)", path.c_str(),
                                 h[2], h[3], h[5], h[6]);
        max_per_task = h[4];
        bos = h[5];
        vocab = h[6];
        for (int i = 0; i < h[2]; i++) {
            unsigned char rec[CORE_TASK_BYTES];
            if (fread(rec, 1, CORE_TASK_BYTES, f) != CORE_TASK_BYTES)
                return string_format("%s: truncated in task record %d", path.c_str(), i);
            CoreTask t;
            t.label.assign((const char*)rec, strnlen((const char*)rec, 64));
            int32_t type, shots, examples, first;
            float baseline;
            memcpy(&type, rec + 64, 4);
            memcpy(&shots, rec + 68, 4);
            memcpy(&baseline, rec + 72, 4);
            memcpy(&examples, rec + 76, 4);
            memcpy(&first, rec + 80, 4);
            if (type < 0 || type > 2 || examples < 0 || !(baseline >= 0 && baseline < 100))
                return string_format("%s: task %d (%s) has type %d, %d examples, baseline %g", path.c_str(), i,
                                     t.label.c_str(), type, examples, baseline);
            t.type = (CoreTaskType)type;
            t.shots = shots;
            t.baseline = baseline / 100.0;
            t.examples = examples;
            t.first = first;
            tasks.push_back(t);
        }
        examples.resize(h[3]);
        for (int i = 0; i < h[3]; i++) {
            CoreExample& ex = examples[i];
            int32_t head[3];
            if (fread(head, sizeof(int32_t), 3, f) != 3)
                return string_format("%s: truncated at example %d of %d", path.c_str(), i, h[3]);
            ex.task = head[0];
            ex.gold = head[1];
            if (head[0] < 0 || head[0] >= (int)tasks.size() || head[2] < 1 || head[2] > 64 || head[1] < 0 ||
                head[1] >= head[2])
                return string_format("%s: example %d has task %d, gold %d, %d options", path.c_str(), i, head[0],
                                     head[1], head[2]);
            std::vector<int32_t> spans(3 * (size_t)head[2]);
            if (fread(spans.data(), sizeof(int32_t), spans.size(), f) != spans.size())
                return string_format("%s: truncated at example %d of %d", path.c_str(), i, h[3]);
            ex.options.resize(head[2]);
            for (int o = 0; o < head[2]; o++) {
                CoreSequence& s = ex.options[o];
                const int length = spans[3 * o], start = spans[3 * o + 1], end = spans[3 * o + 2];
                if (length < 1 || length > (1 << 24) || start < 1 || start > end || end > length)
                    return string_format("%s: example %d option %d has length %d and span [%d, %d)", path.c_str(),
                                         i, o, length, start, end);
                s.start = start;
                s.end = end;
                s.tokens.resize(length);
            }
            for (CoreSequence& s : ex.options) {
                std::vector<uint16_t> ids(s.tokens.size());
                if (fread(ids.data(), sizeof(uint16_t), ids.size(), f) != ids.size())
                    return string_format("%s: truncated in the tokens of example %d", path.c_str(), i);
                for (size_t j = 0; j < ids.size(); j++) {
                    if (ids[j] >= vocab)
                        return string_format("%s: example %d has token %d, outside the vocab %d", path.c_str(), i,
                                             ids[j], vocab);
                    s.tokens[j] = ids[j];
                }
            }
        }
        for (const CoreTask& t : tasks) {
            if (t.first < 0 || t.first + t.examples > (int)examples.size())
                return string_format("%s: task %s claims examples [%d, %d) of %zu", path.c_str(), t.label.c_str(),
                                     t.first, t.first + t.examples, examples.size());
            for (int i = t.first; i < t.first + t.examples; i++)
                if (examples[i].task != (int)(&t - &tasks[0]))
                    return string_format("%s: example %d is not task %s's", path.c_str(), i, t.label.c_str());
        }
        if (fgetc(f) != EOF) return path + ": data after the last example";
        return "";
    }
};

// A sequence longer than the model's context keeps its last `context` tokens,
// its span shifted down with it (BOS is lost, as nanochat crops). A span that
// would start at position 0 starts at 1: position 0 has nothing before it to
// predict it from.
inline CoreSequence core_crop(const CoreSequence& s, int context) {
    if ((int)s.tokens.size() <= context) return s;
    const int cut = (int)s.tokens.size() - context;
    CoreSequence out;
    out.tokens.assign(s.tokens.begin() + cut, s.tokens.end());
    out.end = s.end - cut;
    out.start = std::max(1, s.start - cut);
    if (out.start > out.end) out.start = out.end;
    return out;
}

// The mean loss over a sequence's span: losses[t] is the loss of predicting
// token t + 1 from position t, so the span's tokens are losses[start - 1 ..
// end - 2]. NaN for an empty span. Summed in double, in order.
inline double core_span_mean(const float* losses, const CoreSequence& s) {
    if (s.end <= s.start) return NAN;
    double sum = 0;
    for (int t = s.start; t < s.end; t++) sum += losses[t - 1];
    return sum / (s.end - s.start);
}

// Whether the greedy prediction matches every token of the span: predicted[t]
// is the argmax at position t, the model's guess for token t + 1.
inline bool core_greedy_match(const int* predicted, const CoreSequence& s) {
    for (int t = s.start; t < s.end; t++)
        if (predicted[t - 1] != s.tokens[t]) return false;
    return true;
}

// The option a multiple-choice or schema example picks from its options'
// mean span losses: the lowest, the first on ties; NaN never compares lower.
inline int core_pick(const std::vector<double>& means) {
    int best = 0;
    for (int i = 1; i < (int)means.size(); i++)
        if (means[i] < means[best]) best = i;
    return best;
}

struct CoreTaskScore {
    int correct = 0, total = 0;
    double accuracy() const { return total > 0 ? (double)correct / total : NAN; }
};

struct CoreScore {
    std::vector<CoreTaskScore> tasks;  // as CoreData::tasks
    // The centered accuracy of task i: 0 at the random baseline, 1 at perfect.
    double centered(const CoreData& d, int i) const {
        return (tasks[i].accuracy() - d.tasks[i].baseline) / (1.0 - d.tasks[i].baseline);
    }
    // CORE: the mean centered accuracy over the tasks present (all of them
    // unless the data is partial).
    double core(const CoreData& d) const {
        double sum = 0;
        int n = 0;
        for (size_t i = 0; i < tasks.size(); i++)
            if (tasks[i].total > 0) {
                sum += centered(d, (int)i);
                n++;
            }
        return n > 0 ? sum / n : NAN;
    }
};
