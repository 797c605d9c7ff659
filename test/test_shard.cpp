// test_shard: the llm.c shard reader/writer and the tokenizer table.
// Every malformed-shard kind must be rejected with the file name and the
// reason; real llm.c shards (when ../shared/data exists) must read cleanly.
#include <cstring>
#include <fstream>

#include "../data/shard.h"
#include "../data/tokenizer.h"
#include "check.h"

static std::string dir;

static void write_bytes(const std::string& path, const std::vector<char>& bytes) {
    std::ofstream(path, std::ios::binary).write(bytes.data(), bytes.size());
}

// A raw shard image: header fields as given, then the tokens.
static std::vector<char> shard_bytes(int magic, int version, int count, const std::vector<uint16_t>& tokens) {
    std::vector<char> b(SHARD_HEADER_BYTES + tokens.size() * 2, 0);
    int32_t h[3] = {magic, version, count};
    memcpy(b.data(), h, sizeof(h));
    if (!tokens.empty()) memcpy(b.data() + SHARD_HEADER_BYTES, tokens.data(), tokens.size() * 2);
    return b;
}

static void test_roundtrip(Test& t) {
    std::vector<uint16_t> tokens;
    for (int i = 0; i < 1000; i++) tokens.push_back((uint16_t)((i * 7919) % 50257));
    std::string path = dir + "/ok.bin";
    std::string err = shard_write(path, tokens.data(), tokens.size());
    CHECK(t, err.empty(), "write: %s", err.c_str());
    CHECK(t, !file_exists(path + ".tmp"), "temp file left behind");
    std::vector<uint16_t> back;
    err = shard_read(path, 50257, &back);
    CHECK(t, err.empty(), "read: %s", err.c_str());
    CHECK(t, back == tokens, "tokens differ after a round trip");
}

// Each bad file must give "<path>: <reason containing want>".
static void expect_rejected(Test& t, const char* name, const std::vector<char>& bytes, const char* want) {
    std::string path = dir + "/" + name;
    write_bytes(path, bytes);
    std::vector<uint16_t> tokens;
    std::string err = shard_read(path, 50257, &tokens);
    CHECK(t, err.rfind(path + ": ", 0) == 0, "%s: message does not start with the path: '%s'", name, err.c_str());
    CHECK(t, err.find(want) != std::string::npos, "%s: expected '%s' in '%s'", name, want, err.c_str());
}

static void test_rejects_bad_shards(Test& t) {
    std::vector<uint16_t> ten(10, 42);
    expect_rejected(t, "empty.bin", {}, "empty file");
    expect_rejected(t, "short.bin", std::vector<char>(100, 1), "too short");
    expect_rejected(t, "magic.bin", shard_bytes(20240521, 1, 10, ten), "bad magic 20240521");
    expect_rejected(t, "version.bin", shard_bytes(SHARD_MAGIC, 2, 10, ten), "unsupported version 2");
    expect_rejected(t, "zero.bin", shard_bytes(SHARD_MAGIC, 1, 0, {}), "header says 0 tokens");
    expect_rejected(t, "truncated.bin", shard_bytes(SHARD_MAGIC, 1, 11, ten), "does not match the header's 11 tokens");
    expect_rejected(t, "long.bin", shard_bytes(SHARD_MAGIC, 1, 9, ten), "does not match the header's 9 tokens");
    std::vector<uint16_t> bad = ten;
    bad[7] = 50257;
    expect_rejected(t, "vocab.bin", shard_bytes(SHARD_MAGIC, 1, 10, bad), "token id 50257 at position 7");

    std::vector<uint16_t> tokens;
    std::string missing = dir + "/missing.bin";
    std::string err = shard_read(missing, 50257, &tokens);
    CHECK(t, err == missing + ": cannot open (No such file or directory)", "missing file: '%s'", err.c_str());
    err = shard_read(dir, 50257, &tokens);
    CHECK(t, err == dir + ": not a regular file", "directory: '%s'", err.c_str());
}

// shard_check reads every id through a memory map: a bad id is found in any
// block of the scan (first, middle, last position), and named with its position.
static void test_check_finds_every_bad_token(Test& t) {
    std::vector<uint16_t> tokens(200003);
    for (size_t i = 0; i < tokens.size(); i++) tokens[i] = (uint16_t)(i * 7919 % 50257);
    std::string path = dir + "/checked.bin";
    CHECK(t, shard_write(path, tokens.data(), tokens.size()).empty(), "cannot write %s", path.c_str());
    size_t n = 0;
    std::string err = shard_check(path, 50257, &n);
    CHECK(t, err.empty() && n == tokens.size(), "good shard: '%s', %zu tokens", err.c_str(), n);
    for (size_t position : {(size_t)0, (size_t)65537, tokens.size() - 1}) {
        std::vector<uint16_t> bad = tokens;
        bad[position] = 60000;
        CHECK(t, shard_write(path, bad.data(), bad.size()).empty(), "cannot write %s", path.c_str());
        err = shard_check(path, 50257, &n);
        std::string want = path + ": token id 60000 at position " + std::to_string(position) + " >= vocab 50257";
        CHECK(t, err.rfind(want, 0) == 0, "bad id at %zu: '%s'", position, err.c_str());
    }
    err = shard_check(path, 60001, &n);
    CHECK(t, err.empty(), "a vocab holding 60000: '%s'", err.c_str());
}

// A glob like 'dir/*.bin' also matches the tokenizer table beside the shards.
static void test_tokenizer_table_is_named(Test& t) {
    std::string path = dir + "/gpt2_tokenizer.bin";
    write_bytes(path, shard_bytes(TOKENIZER_MAGIC, 2, 10, std::vector<uint16_t>(10, 65)));
    size_t n = 0;
    std::string err = shard_check_header(path, &n);
    CHECK(t, err == path + ": a tokenizer table (magic 20240328), not a token shard: make the glob match only the "
                           "shards, e.g. '*_train_*.bin'", "'%s'", err.c_str());
}

static void test_real_llmc_shards(Test& t) {
    std::string train = shared_data_dir() + "/tiny_shakespeare_train.bin";
    std::string val = shared_data_dir() + "/tiny_shakespeare_val.bin";
    if (!file_exists(train) || !file_exists(val)) { t.skip("no " + shared_data_dir(), SHARED_DATA_FIX); return; }
    std::vector<uint16_t> tokens;
    std::string err = shard_read(train, 50257, &tokens);
    CHECK(t, err.empty(), "%s", err.c_str());
    CHECK(t, tokens.size() == 305260, "train tokens %zu, expected 305260", tokens.size());
    err = shard_read(val, 50257, &tokens);
    CHECK(t, err.empty(), "%s", err.c_str());
    CHECK(t, tokens.size() == 32768 && tokens[0] == 50256, "val: %zu tokens, first %d", tokens.size(), tokens[0]);
}

// Decoding the real val shard, minus its EOTs, must give back the start of
// the text it was made from.
static void test_tokenizer_decodes_real_text(Test& t) {
    std::string dd = shared_data_dir();
    if (!file_exists(dd + "/gpt2_tokenizer.bin") || !file_exists(dd + "/tiny_shakespeare.txt")) {
        t.skip("no " + dd, SHARED_DATA_FIX);
        return;
    }
    Tokenizer tok;
    std::string err = tok.load(dd + "/gpt2_tokenizer.bin");
    CHECK(t, err.empty(), "%s", err.c_str());
    CHECK(t, tok.vocab_size() == 50257, "vocab %d", tok.vocab_size());
    if (!err.empty()) return;
    std::vector<uint16_t> tokens;
    err = shard_read(dd + "/tiny_shakespeare_val.bin", 50257, &tokens);
    CHECK(t, err.empty(), "%s", err.c_str());
    std::string text;
    for (uint16_t id : tokens)
        if (id != 50256) text += tok.decode(id);
    std::ifstream in(dd + "/tiny_shakespeare.txt", std::ios::binary);
    std::string original((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(t, text.size() > 100000 && original.compare(0, text.size(), text) == 0,
          "decoded val shard (%zu bytes) is not a prefix of the text", text.size());
}

static void test_tokenizer_rejects_bad_files(Test& t) {
    Tokenizer tok;
    std::string path = dir + "/tok_magic.bin";
    write_bytes(path, shard_bytes(SHARD_MAGIC, 1, 3, {}));
    std::string err = tok.load(path);
    CHECK(t, err.find(path + ": bad magic") == 0, "'%s'", err.c_str());
    std::vector<char> b = shard_bytes(TOKENIZER_MAGIC, 1, 3, {});
    b.push_back(1); b.push_back('a');
    b.push_back(2); b.push_back('b');  // second token cut short, third missing
    path = dir + "/tok_short.bin";
    write_bytes(path, b);
    err = tok.load(path);
    CHECK(t, err == path + ": truncated at token 1 of 3", "'%s'", err.c_str());
    b.push_back('c');
    b.push_back(0);
    write_bytes(path, b);
    err = tok.load(path);
    CHECK(t, err.empty() && tok.vocab_size() == 3 && tok.decode(1) == "bc" && tok.decode(2).empty(), "'%s'",
          err.c_str());
}

// Version 2 records the end-of-text id (prepare.py's tokenizer.bin); in
// version 1, llm.c's GPT-2 table, it is the last id.
static void test_tokenizer_end_of_text(Test& t) {
    Tokenizer tok;
    std::string path = dir + "/tok_eot.bin";
    auto table = [&](int version, int32_t eot) {
        std::vector<char> b = shard_bytes(TOKENIZER_MAGIC, version, 3, {});
        memcpy(b.data() + 3 * sizeof(int32_t), &eot, sizeof(eot));
        for (std::string token : {"a", "<|endoftext|>", "b"}) {
            b.push_back((char)token.size());
            b.insert(b.end(), token.begin(), token.end());
        }
        write_bytes(path, b);
        return tok.load(path);
    };
    std::string err = table(2, 1);
    CHECK(t, err.empty() && tok.eot() == 1 && tok.decode(tok.eot()) == "<|endoftext|>", "version 2: eot %d '%s'",
          tok.eot(), err.c_str());
    err = table(1, 0);
    CHECK(t, err.empty() && tok.eot() == 2, "version 1: eot %d '%s'", tok.eot(), err.c_str());
    err = table(2, 3);
    CHECK(t, err == path + ": end-of-text id 3 is outside the vocab [0, 3)", "'%s'", err.c_str());
}

int main() {
    dir = scratch_dir("shard");
    return run_tests({
        {"shard_roundtrip", test_roundtrip},
        {"shard_rejects_bad_files", test_rejects_bad_shards},
        {"shard_check_finds_every_bad_token", test_check_finds_every_bad_token},
        {"shard_names_a_tokenizer_table", test_tokenizer_table_is_named},
        {"shard_reads_real_llmc_shards", test_real_llmc_shards},
        {"tokenizer_decodes_real_text", test_tokenizer_decodes_real_text},
        {"tokenizer_rejects_bad_files", test_tokenizer_rejects_bad_files},
        {"tokenizer_end_of_text", test_tokenizer_end_of_text},
    });
}
