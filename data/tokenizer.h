// data/tokenizer.h: the id-to-bytes table of the shards' tokenizer, for
// printing samples and for learning the vocab size and end-of-text id of a
// shard set.
//
// The file (written by data/prepare.py, same layout as llm.c's
// gpt2_tokenizer.bin) is a 256 x int32 header (magic 20240328, version 1 or
// 2, vocab size, and in version 2 the EOT id) and then, for each id, one
// length byte followed by that many bytes. Version 1 is llm.c's GPT-2 table,
// whose EOT (50256) is its last id; prepare.py writes version 2 for a
// tokenizer it trained (tokenizer.bin). Tokens are byte strings, not
// characters: a multi-byte UTF-8 character may be split across tokens, so
// decode() output must be concatenated before it is shown.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../common.h"

constexpr int TOKENIZER_MAGIC = 20240328;

class Tokenizer {
  public:
    // Returns "" or "<path>: <reason>".
    std::string load(const std::string& path) {
        FILE* f = fopen(path.c_str(), "rb");
        if (!f) return path + ": cannot open (" + strerror(errno) + ")";
        int32_t header[256];
        std::string err;
        if (fread(header, sizeof(int32_t), 256, f) != 256) {
            err = path + ": too short for the 1024-byte tokenizer header";
        } else if (header[0] != TOKENIZER_MAGIC) {
            err = string_format("%s: bad magic %d (expected %d): not a tokenizer table", path.c_str(), header[0],
                                TOKENIZER_MAGIC);
        } else if (header[1] != 1 && header[1] != 2) {
            err = string_format("%s: unsupported version %d (expected 1 or 2)", path.c_str(), header[1]);
        } else if (header[2] <= 0 || header[2] > 65536) {
            err = string_format("%s: vocab size %d is outside [1, 65536]", path.c_str(), header[2]);
        } else if (header[1] == 2 && (header[3] < 0 || header[3] >= header[2])) {
            err = string_format("%s: end-of-text id %d is outside the vocab [0, %d)", path.c_str(), header[3],
                                header[2]);
        } else {
            eot_ = header[1] == 2 ? header[3] : header[2] - 1;
            tokens_.assign(header[2], std::string());
            for (int i = 0; i < header[2] && err.empty(); i++) {
                unsigned char len;
                char buf[256];
                if (fread(&len, 1, 1, f) != 1 || fread(buf, 1, len, f) != len)
                    err = string_format("%s: truncated at token %d of %d", path.c_str(), i, header[2]);
                else
                    tokens_[i].assign(buf, len);
            }
        }
        fclose(f);
        if (!err.empty()) tokens_.clear();
        return err;
    }

    int vocab_size() const { return (int)tokens_.size(); }
    int eot() const { return eot_; }  // the id written before every document
    const std::string& decode(int id) const { return tokens_[id]; }

  private:
    std::vector<std::string> tokens_;
    int eot_ = -1;
};
