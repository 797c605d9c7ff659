// common.h: small host-side utilities every part of train_et shares.
//
// - fail(): print one error line and exit non-zero. train_et never throws and
//   never crashes on bad input; it names what was wrong and how to fix it.
//   Once a run has its log open (fail_log), the line goes there too.
// - Rng: a counter-seeded xoshiro256** generator. Training must be bit-exact
//   from a seed on every machine, so we never use std:: distributions (their
//   output is implementation-defined).
// - glob_sorted(): expand a shell pattern into a sorted file list;
//   make_dirs(): mkdir -p, with the reason when it cannot.
#pragma once

#include <glob.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

inline FILE* fail_log = nullptr;  // a run's train.log, once open: it ends with the error that stopped the run
inline std::string fail_prefix;   // "rank N: " when several processes share the console

[[noreturn]] inline void fail(const char* fmt, ...) {
    char line[4096];
    va_list args;
    va_start(args, fmt);
    vsnprintf(line, sizeof(line), fmt, args);
    va_end(args);
    fprintf(stderr, "error: %s%s\n", fail_prefix.c_str(), line);
    if (fail_log) fprintf(fail_log, "error: %s%s\n", fail_prefix.c_str(), line);
    exit(1);
}

inline std::string string_format(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    char buf[4096];
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    return buf;
}

// 1234567 -> "1.23M", 4.2e9 -> "4.20B": counts of tokens and parameters.
inline std::string human_count(double n) {
    if (n >= 1e9) return string_format("%.2fB", n / 1e9);
    if (n >= 1e6) return string_format("%.2fM", n / 1e6);
    if (n >= 1e3) return string_format("%.1fK", n / 1e3);
    return string_format("%.0f", n);
}

inline double wall_seconds() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// 5025 -> "1h23m45s"; for ETAs.
inline std::string format_duration(double seconds) {
    long s = (long)(seconds + 0.5);
    if (s >= 3600) return string_format("%ldh%02ldm%02lds", s / 3600, s / 60 % 60, s % 60);
    if (s >= 60) return string_format("%ldm%02lds", s / 60, s % 60);
    return string_format("%lds", s);
}

// splitmix64: turns any 64-bit value (a seed, a seed mixed with an index) into a
// well-spread state word. Used to seed Rng and to derive independent streams.
inline uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Mix several integers into one seed: each stream (an epoch's shard order, a
// synthetic shard) gets its own generator, so it can be rebuilt on resume
// without replaying everything drawn before it.
inline uint64_t seed_mix(uint64_t a, uint64_t b, uint64_t c = 0) {
    return splitmix64(splitmix64(splitmix64(a) ^ b) ^ c);
}

struct Rng {
    uint64_t s[4];

    explicit Rng(uint64_t seed) {
        for (int i = 0; i < 4; i++) { seed = splitmix64(seed); s[i] = seed; }
    }
    static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
    uint64_t next_u64() {
        uint64_t result = rotl(s[1] * 5, 7) * 9;
        uint64_t t = s[1] << 17;
        s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
        s[2] ^= t;
        s[3] = rotl(s[3], 45);
        return result;
    }
    // uniform in [0, 1) with 53 random bits
    double uniform() { return (next_u64() >> 11) * (1.0 / 9007199254740992.0); }
    // uniform integer in [0, n), unbiased (rejection of the short last bucket)
    uint64_t below(uint64_t n) {
        uint64_t limit = UINT64_MAX - UINT64_MAX % n;
        uint64_t x;
        do { x = next_u64(); } while (x >= limit);
        return x % n;
    }
    template <typename T>
    void shuffle(std::vector<T>& v) {
        for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[below(i)]);
    }
};

inline bool file_exists(const std::string& path) {
    FILE* f = fopen(path.c_str(), "rb");
    if (f) fclose(f);
    return f != nullptr;
}

// Files matching a shell pattern, sorted by name (so shard order never depends
// on the file system). Empty when nothing matches.
inline std::vector<std::string> glob_sorted(const std::string& pattern) {
    std::vector<std::string> files;
    glob_t g;
    if (glob(pattern.c_str(), 0, nullptr, &g) == 0) {
        for (size_t i = 0; i < g.gl_pathc; i++) files.push_back(g.gl_pathv[i]);
    }
    globfree(&g);  // glob() sorts by name already
    return files;
}

// Creates a directory and any missing parents, like mkdir -p, and checks that
// files can be written in it. Returns "" or "<path>: <reason>".
inline std::string make_dirs(const std::string& path) {
    for (size_t slash = path.find('/', 1);; slash = path.find('/', slash + 1)) {
        const std::string part = path.substr(0, slash);
        if (mkdir(part.c_str(), 0777) != 0 && errno != EEXIST)
            return part + ": cannot create the directory (" + strerror(errno) + ")";
        if (slash == std::string::npos) break;
    }
    struct stat st;
    if (stat(path.c_str(), &st) != 0) return path + ": " + strerror(errno);
    if (!S_ISDIR(st.st_mode)) return path + ": is a file, not a directory";
    if (access(path.c_str(), W_OK) != 0) return path + ": cannot write in it (" + strerror(errno) + ")";
    return "";
}
