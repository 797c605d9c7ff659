// data/shard.h: llm.c's token-shard format, read with full validation and
// written atomically.
//
// A shard is a 256 x int32 little-endian header (magic 20240520, version 1,
// token count, then zeros) followed by the tokens as uint16. The reader checks
// everything before a single token is used and reports the first problem as
// "<file>: <reason>", so a bad shard stops a run with a line a user can act on
// instead of a crash or silently wrong data. shard_check checks a whole
// shard, its ids against the vocab without reading it into memory (it maps the
// file), fast enough for train_et to check every shard at start-up.
#pragma once

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../common.h"
#include "tokenizer.h"

constexpr int SHARD_MAGIC = 20240520;
constexpr int SHARD_VERSION = 1;
constexpr int SHARD_HEADER_INTS = 256;
constexpr size_t SHARD_HEADER_BYTES = SHARD_HEADER_INTS * sizeof(int32_t);

// Reads the header and checks it against the file size. Returns "" and sets
// *num_tokens when the shard is well formed, else "<path>: <reason>".
inline std::string shard_check_header(const std::string& path, size_t* num_tokens) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return path + ": cannot open (" + strerror(errno) + ")";
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        return path + ": not a regular file";
    }
    size_t file_bytes = (size_t)st.st_size;
    if (file_bytes == 0) { fclose(f); return path + ": empty file (0 bytes)"; }
    if (file_bytes < SHARD_HEADER_BYTES) {
        fclose(f);
        return string_format("%s: too short for the %zu-byte shard header (%zu bytes)",
                             path.c_str(), SHARD_HEADER_BYTES, file_bytes);
    }
    int32_t header[SHARD_HEADER_INTS];
    size_t got = fread(header, sizeof(int32_t), SHARD_HEADER_INTS, f);
    fclose(f);
    if (got != SHARD_HEADER_INTS) return path + ": read error in the header";
    if (header[0] == TOKENIZER_MAGIC)
        return string_format("%s: a tokenizer table (magic %d), not a token shard: make the glob match only the "
                             "shards, e.g. '*_train_*.bin'", path.c_str(), TOKENIZER_MAGIC);
    if (header[0] != SHARD_MAGIC)
        return string_format("%s: bad magic %d (expected %d): not an llm.c token shard",
                             path.c_str(), header[0], SHARD_MAGIC);
    if (header[1] != SHARD_VERSION)
        return string_format("%s: unsupported version %d (expected %d)",
                             path.c_str(), header[1], SHARD_VERSION);
    if (header[2] <= 0)
        return string_format("%s: header says %d tokens: an empty shard", path.c_str(), header[2]);
    size_t expect_bytes = SHARD_HEADER_BYTES + (size_t)header[2] * sizeof(uint16_t);
    if (file_bytes != expect_bytes)
        return string_format("%s: size %zu bytes does not match the header's %d tokens "
                             "(expected %zu bytes): truncated or corrupt",
                             path.c_str(), file_bytes, header[2], expect_bytes);
    *num_tokens = (size_t)header[2];
    return "";
}

// The position of the first id >= vocab_size, or n when there is none. Each
// block is checked by its largest id (a loop compilers vectorise); only a
// block that fails is searched for the position.
inline size_t first_token_outside_vocab(const uint16_t* tokens, size_t n, int vocab_size) {
    const size_t BLOCK = 1 << 16;
    for (size_t start = 0; start < n; start += BLOCK) {
        const size_t end = std::min(n, start + BLOCK);
        uint16_t largest = 0;
        for (size_t i = start; i < end; i++) largest = std::max(largest, tokens[i]);
        if (largest < vocab_size) continue;
        for (size_t i = start; i < end; i++)
            if (tokens[i] >= vocab_size) return i;
    }
    return n;
}

inline std::string token_outside_vocab(const std::string& path, uint16_t id, size_t position, int vocab_size) {
    return string_format("%s: token id %d at position %zu >= vocab %d (a shard of another tokenizer?)", path.c_str(),
                         id, position, vocab_size);
}

// Checks the header, the size and every token id of a shard against
// vocab_size, reading the ids through a memory map. Returns "" and sets
// *num_tokens, or "<path>: <reason>".
inline std::string shard_check(const std::string& path, int vocab_size, size_t* num_tokens) {
    size_t n = 0;
    std::string err = shard_check_header(path, &n);
    if (!err.empty()) return err;
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return path + ": cannot open (" + strerror(errno) + ")";
    const size_t bytes = SHARD_HEADER_BYTES + n * sizeof(uint16_t);
    void* map = mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, fileno(f), 0);
    fclose(f);  // the mapping stays valid without the descriptor
    if (map == MAP_FAILED) return path + ": cannot map (" + strerror(errno) + ")";
    const uint16_t* tokens = (const uint16_t*)((const char*)map + SHARD_HEADER_BYTES);
    const size_t bad = first_token_outside_vocab(tokens, n, vocab_size);
    if (bad < n) err = token_outside_vocab(path, tokens[bad], bad, vocab_size);
    munmap(map, bytes);
    *num_tokens = n;
    return err;
}

// Reads a whole shard into *tokens after checking the header, the size and
// that every token id is < vocab_size. Returns "" or "<path>: <reason>".
inline std::string shard_read(const std::string& path, int vocab_size, std::vector<uint16_t>* tokens) {
    size_t n = 0;
    std::string err = shard_check_header(path, &n);
    if (!err.empty()) return err;
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return path + ": cannot open (" + strerror(errno) + ")";
    tokens->resize(n);
    bool ok = fseek(f, (long)SHARD_HEADER_BYTES, SEEK_SET) == 0 &&
              fread(tokens->data(), sizeof(uint16_t), n, f) == n;
    fclose(f);
    if (!ok) return path + ": read error in the token data";
    const size_t bad = first_token_outside_vocab(tokens->data(), n, vocab_size);
    return bad < n ? token_outside_vocab(path, (*tokens)[bad], bad, vocab_size) : "";
}

// Writes a shard to "<path>.tmp" and renames it into place, so a crash never
// leaves a half-written file under the real name. Returns "" or the reason.
inline std::string shard_write(const std::string& path, const uint16_t* tokens, size_t n) {
    if (n == 0 || n > (size_t)INT32_MAX) return string_format("%s: cannot write a shard of %zu tokens", path.c_str(), n);
    int32_t header[SHARD_HEADER_INTS] = {SHARD_MAGIC, SHARD_VERSION, (int32_t)n};
    std::string tmp = path + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    if (!f) return tmp + ": cannot create (" + strerror(errno) + ")";
    bool ok = fwrite(header, sizeof(int32_t), SHARD_HEADER_INTS, f) == SHARD_HEADER_INTS &&
              fwrite(tokens, sizeof(uint16_t), n, f) == n;
    ok = (fclose(f) == 0) && ok;
    if (!ok) { remove(tmp.c_str()); return tmp + ": write failed (disk full?)"; }
    if (rename(tmp.c_str(), path.c_str()) != 0) return path + ": rename failed (" + strerror(errno) + ")";
    return "";
}
