// test_dataloader: windows and targets, disjoint ranks, full coverage of an
// epoch, seeded shuffling, exact save/restore, validation order, bad shards
// in a glob, and the synthetic corpus through the same interface.
#include <algorithm>
#include <map>
#include <set>

#include "../data/dataloader.h"
#include "check.h"

static std::string dir;

// Shards whose token at global position p is p % 50000, so every window
// tells where it came from: (shard, offset) -> value.
static std::string make_shards(const char* name, const std::vector<size_t>& sizes) {
    size_t start = 0;
    for (size_t s = 0; s < sizes.size(); s++) {
        std::vector<uint16_t> tokens(sizes[s]);
        for (size_t i = 0; i < sizes[s]; i++) tokens[i] = (uint16_t)((start + i) % 50000);
        start += sizes[s];
        std::string err = shard_write(string_format("%s/%s_%06zu.bin", dir.c_str(), name, s), tokens.data(), tokens.size());
        if (!err.empty()) fail("%s", err.c_str());
    }
    return dir + "/" + name + "_*.bin";
}

static void test_windows_and_targets(Test& t) {
    ShardFiles files;
    std::string err = files.open(make_shards("win", {1000, 777}), 50257);
    CHECK(t, err.empty(), "%s", err.c_str());
    DataLoader loader;
    const int B = 3, T = 16;
    err = loader.init(&files, B, T, 0, 1, 1, true);
    CHECK(t, err.empty(), "%s", err.c_str());
    // (1000-1)/16 = 62 windows -> 20 rounds of 3; (777-1)/16 = 48 -> 16 rounds
    CHECK(t, loader.batches_per_epoch() == 36, "batches per epoch %zu", loader.batches_per_epoch());
    std::vector<int> in(B * T), tg(B * T);
    for (int step = 0; step < 100; step++) {
        loader.next_batch(in.data(), tg.data());
        for (int b = 0; b < B; b++) {
            CHECK(t, in[b * T] % T == 0 || in[b * T] >= 1000, "window does not start on a multiple of T");
            for (int i = 0; i < T; i++) {
                CHECK(t, in[b * T + i] == in[b * T] + i, "inputs not contiguous");
                CHECK(t, tg[b * T + i] == in[b * T + i] + 1, "target is not the next token");
            }
        }
    }
}

// Over one epoch, world ranks together see each usable window exactly once.
static void test_ranks_disjoint_and_cover_epoch(Test& t) {
    ShardFiles files;
    CHECK(t, files.open(make_shards("rank", {2001, 1500, 999}), 50257).empty(), "open");
    const int B = 2, T = 10, world = 3;
    std::vector<DataLoader> loaders(world);
    for (int r = 0; r < world; r++) CHECK(t, loaders[r].init(&files, B, T, r, world, 42, true).empty(), "init");
    size_t batches = loaders[0].batches_per_epoch();
    CHECK(t, batches == 33 + 24 + 16, "batches per epoch %zu", batches);
    std::set<int> seen;
    std::vector<int> in(B * T), tg(B * T);
    for (size_t step = 0; step < batches; step++)
        for (int r = 0; r < world; r++) {
            loaders[r].next_batch(in.data(), tg.data());
            for (int b = 0; b < B; b++) {
                CHECK(t, seen.insert(in[b * T]).second, "window at %d read twice in one epoch", in[b * T]);
            }
        }
    CHECK(t, seen.size() == batches * world * B, "%zu windows seen", seen.size());
}

static std::vector<int> read_batches(DataLoader& loader, int n, int BT) {
    std::vector<int> all, in(BT), tg(BT);
    for (int i = 0; i < n; i++) {
        loader.next_batch(in.data(), tg.data());
        all.insert(all.end(), in.begin(), in.end());
    }
    return all;
}

static void test_shuffle_is_seeded(Test& t) {
    ShardFiles files;
    CHECK(t, files.open(make_shards("shuf", {3000, 3000, 3000}), 50257).empty(), "open");
    DataLoader a, b, c;
    a.init(&files, 4, 8, 0, 1, 5, true);
    b.init(&files, 4, 8, 0, 1, 5, true);
    c.init(&files, 4, 8, 0, 1, 6, true);
    size_t epoch = a.batches_per_epoch();
    std::vector<int> xa = read_batches(a, 2 * epoch, 32), xb = read_batches(b, 2 * epoch, 32);
    std::vector<int> xc = read_batches(c, 2 * epoch, 32);
    CHECK(t, xa == xb, "same seed, different order");
    CHECK(t, xa != xc, "different seeds, same order");
    std::vector<int> e0(xa.begin(), xa.begin() + epoch * 32), e1(xa.begin() + epoch * 32, xa.end());
    CHECK(t, e0 != e1, "epochs 0 and 1 have the same order");
    std::sort(e0.begin(), e0.end());
    std::sort(e1.begin(), e1.end());
    // each epoch reads distinct tokens; the skipped tail windows may differ
    CHECK(t, std::adjacent_find(e0.begin(), e0.end()) == e0.end(), "epoch 0 repeats a token");
    CHECK(t, std::adjacent_find(e1.begin(), e1.end()) == e1.end(), "epoch 1 repeats a token");
    DataLoader v;
    v.init(&files, 4, 8, 0, 1, 5, false);
    std::vector<int> linear = read_batches(v, epoch, 32);
    CHECK(t, std::is_sorted(linear.begin(), linear.end()), "validation loader (no shuffle) is not in file order");
}

// Saving the position mid-epoch and restoring it in a fresh loader continues
// the same stream, across shard and epoch boundaries.
static void test_restore_is_exact(Test& t) {
    ShardFiles files;
    CHECK(t, files.open(make_shards("res", {1200, 900, 1500}), 50257).empty(), "open");
    for (int stop : {1, 7, 13, 40, 71}) {
        DataLoader a;
        a.init(&files, 2, 16, 1, 2, 9, true);
        read_batches(a, stop, 32);
        LoaderPosition pos = a.position();
        std::vector<int> rest = read_batches(a, 60, 32);
        DataLoader b;
        b.init(&files, 2, 16, 1, 2, 9, true);
        b.restore(pos);
        CHECK(t, read_batches(b, 60, 32) == rest, "resume after %d batches diverged", stop);
    }
}

static void test_validation_reset(Test& t) {
    ShardFiles files;
    CHECK(t, files.open(make_shards("val", {5000}), 50257).empty(), "open");
    DataLoader v;
    v.init(&files, 4, 32, 0, 1, 0, false);
    std::vector<int> first = read_batches(v, 5, 128);
    CHECK(t, first[0] == 0 && first[128] == 4 * 32, "validation does not start at the beginning in order");
    v.reset();
    CHECK(t, read_batches(v, 5, 128) == first, "reset does not replay validation");
}

static void test_glob_errors(Test& t) {
    ShardFiles files;
    std::string err = files.open(dir + "/nothing_*.bin", 50257);
    CHECK(t, err == "no files match '" + dir + "/nothing_*.bin'", "'%s'", err.c_str());
    make_shards("mixed", {500, 500});
    std::vector<char> junk(2000, 7);
    FILE* f = fopen((dir + "/mixed_000002.bin").c_str(), "wb");
    fwrite(junk.data(), 1, junk.size(), f);
    fclose(f);
    err = files.open(dir + "/mixed_*.bin", 50257);
    CHECK(t, err.find(dir + "/mixed_000002.bin: bad magic") == 0, "'%s'", err.c_str());
    CHECK(t, files.open(make_shards("small", {50, 60}), 50257).empty(), "open");
    DataLoader loader;
    err = loader.init(&files, 4, 64, 0, 1, 0, true);
    CHECK(t, err.find("no shard holds one round") != std::string::npos, "'%s'", err.c_str());
}

static void test_synthetic_through_loader(Test& t) {
    SyntheticCorpus corpus;
    CHECK(t, corpus.init(3, 50257).empty(), "init");
    SyntheticShards train(&corpus, 1, 8, 1 << 16), val(&corpus, 0, 1, 1 << 16);
    DataLoader a, b;
    CHECK(t, a.init(&train, 4, 64, 0, 1, 1, true).empty(), "init");
    CHECK(t, b.init(&val, 4, 64, 0, 1, 1, false).empty(), "init");
    std::vector<int> in(256), tg(256);
    a.next_batch(in.data(), tg.data());
    for (int i = 0; i + 1 < 64; i++) CHECK(t, tg[i] == in[i + 1], "targets not shifted");
    std::vector<uint16_t> shard0(1 << 16);
    corpus.generate_shard(0, shard0.data(), shard0.size());
    b.next_batch(in.data(), tg.data());
    for (int i = 0; i < 64; i++) CHECK(t, in[i] == shard0[i], "validation is not synthetic shard 0 in order");
    LoaderPosition pos = a.position();
    std::vector<int> rest = read_batches(a, 50, 256);
    DataLoader c;
    c.init(&train, 4, 64, 0, 1, 1, true);
    c.restore(pos);
    CHECK(t, read_batches(c, 50, 256) == rest, "synthetic resume diverged");
}

int main() {
    dir = scratch_dir("dataloader");
    return run_tests({
        {"loader_windows_and_targets", test_windows_and_targets},
        {"loader_ranks_disjoint_cover_epoch", test_ranks_disjoint_and_cover_epoch},
        {"loader_shuffle_is_seeded", test_shuffle_is_seeded},
        {"loader_restore_is_exact", test_restore_is_exact},
        {"loader_validation_reset", test_validation_reset},
        {"loader_glob_errors", test_glob_errors},
        {"loader_synthetic_corpus", test_synthetic_through_loader},
    });
}
