// test/check.h: the tiny test harness every C++ test program uses.
//
// A test is a function taking a Test&. CHECK(t, cond, fmt, ...) records a
// failure with its line and a message; t.skip(reason, fix) marks the test
// skipped (missing optional data, never to hide a failure; the fix says what
// makes it run). run_tests() prints one line per test, "ok - name",
// "FAIL - name: ..." or "skip - name: reason; to run it: fix", which
// test/run_tests.sh counts, and returns non-zero if anything failed.
#pragma once

#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

struct Test {
    std::vector<std::string> failures;
    std::string skipped;
    void skip(const std::string& reason, const std::string& fix) { skipped = reason + "; to run it: " + fix; }
};

inline void check_fail(Test& t, int line, const char* fmt, ...) {
    char buf[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    t.failures.push_back("line " + std::to_string(line) + ": " + buf);
}

#define CHECK(t, cond, ...) \
    do { if (!(cond)) check_fail((t), __LINE__, __VA_ARGS__); } while (0)

struct TestCase {
    const char* name;
    void (*fn)(Test&);
};

inline int run_tests(const std::vector<TestCase>& tests) {
    int failed = 0;
    for (const TestCase& tc : tests) {
        Test t;
        tc.fn(t);
        if (!t.failures.empty()) {
            failed++;
            printf("FAIL - %s: %s", tc.name, t.failures[0].c_str());
            if (t.failures.size() > 1) printf(" (and %zu more)", t.failures.size() - 1);
            printf("\n");
            for (size_t i = 1; i < t.failures.size() && i < 5; i++) printf("    %s\n", t.failures[i].c_str());
        } else if (!t.skipped.empty()) {
            printf("skip - %s: %s\n", tc.name, t.skipped.c_str());
        } else {
            printf("ok - %s\n", tc.name);
        }
        fflush(stdout);
    }
    return failed ? 1 : 0;
}

// Where the optional real data lives: $TRAIN_ET_SHARED_DATA, else
// ../shared/data beside the checkout (tests run from the repo root).
inline std::string shared_data_dir() {
    const char* env = getenv("TRAIN_ET_SHARED_DATA");
    return env ? env : "../shared/data";
}
constexpr const char* SHARED_DATA_FIX = "put the shared test data there, or point TRAIN_ET_SHARED_DATA at it (README: Tests)";

// A fresh, empty scratch directory for one test program, removed when the
// program exits.
inline std::string scratch_dir(const char* name) {
    static std::string dir;
    dir = std::string("/tmp/train_et_test_") + name + "_" + std::to_string(getpid());
    std::string cmd = "rm -rf '" + dir + "' && mkdir -p '" + dir + "'";
    if (system(cmd.c_str()) != 0) { fprintf(stderr, "cannot create %s\n", dir.c_str()); exit(1); }
    atexit([] {
        std::string rm = "rm -rf '" + dir + "'";
        if (system(rm.c_str()) != 0) fprintf(stderr, "cannot remove %s\n", dir.c_str());
    });
    return dir;
}
