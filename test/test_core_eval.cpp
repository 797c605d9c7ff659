// test_core_eval: CORE's host side (data/core_eval.h): the eval file's
// reader and its errors, cropping to the context, the judging rules (mean
// span loss, lowest first on ties, the empty span's NaN, the exact greedy
// match) and the scores (centered accuracy, CORE, partial data).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <unistd.h>
#include <vector>

#include "../data/core_eval.h"
#include "check.h"

// An eval file as data/core.py writes it, assembled field by field.
struct FileWriter {
    std::vector<unsigned char> bytes;
    void i32(int32_t v) { put(&v, 4); }
    void f32(float v) { put(&v, 4); }
    void u16(uint16_t v) { put(&v, 2); }
    void put(const void* p, size_t n) { bytes.insert(bytes.end(), (const unsigned char*)p, (const unsigned char*)p + n); }
    void header(int tasks, int examples, int missing) {
        const int32_t h[8] = {CORE_MAGIC, CORE_VERSION, tasks, examples, -1, 99, 100, missing};
        put(h, sizeof(h));
        for (int i = 8; i < 256; i++) i32(0);
    }
    void task(const char* label, int type, float baseline, int examples, int first) {
        char name[64] = {};
        strncpy(name, label, 63);
        put(name, 64);
        i32(type);
        i32(0);
        f32(baseline);
        i32(examples);
        i32(first);
        for (int i = 0; i < 3; i++) i32(0);
    }
    std::string save(const char* name) const {
        const std::string path = std::string("/tmp/test_core_eval_") + std::to_string(getpid()) + "_" + name;
        FILE* f = fopen(path.c_str(), "wb");
        fwrite(bytes.data(), 1, bytes.size(), f);
        fclose(f);
        return path;
    }
};

// Two tasks: a multiple-choice one with one example of two options and a
// missing language-modelling one.
static FileWriter small_file() {
    FileWriter w;
    w.header(2, 1, 1);
    w.task("arc_easy", 0, 25.0f, 1, 0);
    w.task("squad", 2, 0.0f, 0, 1);
    w.i32(0); w.i32(1); w.i32(2);               // task 0, gold 1, two options
    w.i32(4); w.i32(2); w.i32(4);               // option 0: 4 tokens, span [2, 4)
    w.i32(5); w.i32(2); w.i32(5);               // option 1: 5 tokens, span [2, 5)
    for (int t : {99, 7, 8, 9}) w.u16((uint16_t)t);
    for (int t : {99, 7, 10, 11, 12}) w.u16((uint16_t)t);
    return w;
}

static void test_reads_the_file(Test& t) {
    const std::string path = small_file().save("ok.bin");
    CoreData d;
    const std::string err = d.load(path);
    CHECK(t, err.empty(), "%s", err.c_str());
    CHECK(t, d.tasks.size() == 2 && d.tasks[0].label == "arc_easy" && d.tasks[0].baseline == 0.25 &&
                 d.tasks[1].type == CoreTaskType::LanguageModeling && d.tasks[1].examples == 0,
          "tasks read wrong");
    CHECK(t, d.bos == 99 && d.vocab == 100 && d.examples.size() == 1 && d.examples[0].gold == 1, "header or example");
    const CoreExample& ex = d.examples[0];
    CHECK(t, ex.options.size() == 2 && ex.options[1].tokens == std::vector<int>({99, 7, 10, 11, 12}) &&
                 ex.options[1].start == 2 && ex.options[1].end == 5,
          "options read wrong");
    CHECK(t, d.partial() && d.missing() == std::vector<std::string>({"squad"}), "missing tasks not named");
    remove(path.c_str());
}

static void test_bad_files_are_named(Test& t) {
    struct Case {
        const char* what;
        size_t at;        // byte to change (or the size to cut to, when cut)
        bool cut;
        unsigned char value;
        const char* want;  // in the error
    };
    const size_t example = 1024 + 2 * CORE_TASK_BYTES;
    const Case cases[] = {
        {"magic", 0, false, 0x11, "not a CORE eval file"},
        {"version", 4, false, 9, "rewrite it with data/core.py"},
        {"truncated", example + 20, true, 0, "truncated"},
        {"token past the vocab", example + 36 + 2, false, 200, "outside the vocab"},
        {"span past the end", example + 12 + 8, false, 9, "span"},
        {"gold past the options", example + 4, false, 5, "gold"},
    };
    for (const Case& c : cases) {
        FileWriter w = small_file();
        if (c.cut) w.bytes.resize(c.at);
        else w.bytes[c.at] = c.value;
        const std::string path = w.save("bad.bin");
        CoreData d;
        const std::string err = d.load(path);
        CHECK(t, err.find(path) == 0 && err.find(c.want) != std::string::npos, "%s: error '%s'", c.what, err.c_str());
        CHECK(t, d.examples.empty() && d.tasks.empty(), "%s: data kept after an error", c.what);
        remove(path.c_str());
    }
    FileWriter w = small_file();
    w.u16(5);
    const std::string path = w.save("long.bin");
    CoreData d;
    CHECK(t, d.load(path).find("data after the last example") != std::string::npos, "trailing data accepted");
    remove(path.c_str());
    CHECK(t, d.load("/nonexistent/core.bin").find("cannot open") != std::string::npos, "a missing file");
}

static void test_crop(Test& t) {
    CoreSequence s{{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 6, 10};
    const CoreSequence same = core_crop(s, 10);
    CHECK(t, same.tokens.size() == 10 && same.start == 6 && same.end == 10, "a sequence that fits is changed");
    const CoreSequence c = core_crop(s, 6);  // drops 4 tokens from the front
    CHECK(t, c.tokens == std::vector<int>({5, 6, 7, 8, 9, 10}) && c.start == 2 && c.end == 6,
          "cropped to [%d, %d) of %zu", c.start, c.end, c.tokens.size());
    const CoreSequence edge = core_crop(CoreSequence{{1, 2, 3, 4, 5, 6}, 2, 6}, 4);  // the span started at 0: 1
    CHECK(t, edge.start == 1 && edge.end == 4, "span [%d, %d)", edge.start, edge.end);
}

static void test_judging(Test& t) {
    // losses[t] predicts token t + 1: the span [2, 4) averages losses[1] and losses[2]
    const float losses[] = {9.0f, 1.0f, 3.0f, 100.0f};
    CHECK(t, core_span_mean(losses, CoreSequence{{0, 0, 0, 0}, 2, 4}) == 2.0, "mean span loss");
    CHECK(t, std::isnan(core_span_mean(losses, CoreSequence{{0, 0, 0, 0}, 4, 4})), "an empty span is not NaN");
    CHECK(t, core_pick({3.0, 1.0, 1.0, 2.0}) == 1, "ties: the first lowest wins");
    CHECK(t, core_pick({NAN, 1.0, 0.5}) == 0, "an empty span as option 0 always wins");
    CHECK(t, core_pick({2.0, NAN, 0.5}) == 2 && core_pick({0.5, NAN}) == 0, "an empty span elsewhere never wins");
    const CoreSequence s{{5, 6, 7, 8}, 2, 4};  // tokens 7, 8, predicted at positions 1, 2
    const int right[] = {0, 7, 8, 0}, wrong[] = {6, 7, 9, 8};
    CHECK(t, core_greedy_match(right, s) && !core_greedy_match(wrong, s), "greedy match");
}

static void test_scores(Test& t) {
    CoreData d;
    d.tasks = {{"a", CoreTaskType::MultipleChoice, 0, 0.25, 4, 0},
               {"b", CoreTaskType::LanguageModeling, 0, 0.0, 2, 4},
               {"c", CoreTaskType::Schema, 0, 0.5, 0, 6}};
    CoreScore s;
    s.tasks = {{3, 4}, {1, 2}, {0, 0}};
    CHECK(t, s.tasks[0].accuracy() == 0.75 && std::fabs(s.centered(d, 0) - 2.0 / 3) < 1e-12, "centered accuracy");
    CHECK(t, std::fabs(s.core(d) - (2.0 / 3 + 0.5) / 2) < 1e-12, "CORE over the present tasks: %g", s.core(d));
    CHECK(t, d.missing() == std::vector<std::string>({"c"}), "the missing task");
}

int main() {
    return run_tests({
        {"core_reads_the_file", test_reads_the_file},
        {"core_bad_files_are_named", test_bad_files_are_named},
        {"core_crop", test_crop},
        {"core_judging", test_judging},
        {"core_scores", test_scores},
    });
}
