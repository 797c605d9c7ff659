// data/dataloader.h: hands out B x T token windows (plus the next-token
// targets) from token shards, for training and validation.
//
// A source is a list of shards: llm.c files on disk (ShardFiles) or the
// built-in synthetic corpus (SyntheticShards), which makes each shard on
// demand from its seed. The loader sees only the TokenSource interface, so
// the synthetic corpus goes through exactly the same windowing, shuffling,
// rank split and resume logic as real data.
//
// Windows. A shard of n tokens holds (n - 1) / T windows; window w covers
// tokens [w*T, w*T + T] (T inputs, and the same shifted by one as targets).
// A "round" is world x B windows: rank r takes windows r*B .. r*B + B - 1 of
// the round, so ranks read disjoint windows and together consume whole rounds.
// The tail of a shard that does not fill a round is skipped for this epoch.
//
// Shuffling. With shuffle on, epoch e visits the shards in an order drawn
// from (seed, e) and each shard's windows in an order drawn from (seed, e,
// shard); with it off (validation) both orders are the identity. The orders
// are recomputed from the seed, so the position (epoch, shard, round) is all
// a checkpoint needs to restore the stream exactly.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "../common.h"
#include "shard.h"
#include "synthetic.h"

class TokenSource {
  public:
    virtual ~TokenSource() = default;
    virtual size_t num_shards() const = 0;
    virtual size_t shard_tokens(size_t shard) const = 0;
    // Loads a whole shard; fails the run with "<file>: <reason>" on bad data.
    virtual void load(size_t shard, std::vector<uint16_t>* tokens) const = 0;
    virtual std::string describe() const = 0;
};

// llm.c shards on disk. Opening checks every file whole, header, size and
// every token id against the vocab, before anything starts (a bad id would
// index past the embedding on the GPU); loading a shard checks it again, so
// a file changed during the run is caught too.
class ShardFiles : public TokenSource {
  public:
    // Returns "" or the first problem ("<file>: <reason>", or no match).
    std::string open(const std::string& pattern, int vocab_size) {
        pattern_ = pattern;
        vocab_size_ = vocab_size;
        files_ = glob_sorted(pattern);
        if (files_.empty()) return "no files match '" + pattern + "'";
        tokens_.clear();
        for (const std::string& f : files_) {
            size_t n = 0;
            std::string err = shard_check(f, vocab_size, &n);
            if (!err.empty()) return err;
            tokens_.push_back(n);
        }
        return "";
    }
    const std::vector<std::string>& files() const { return files_; }
    size_t num_shards() const override { return files_.size(); }
    size_t shard_tokens(size_t shard) const override { return tokens_[shard]; }
    void load(size_t shard, std::vector<uint16_t>* tokens) const override {
        std::string err = shard_read(files_[shard], vocab_size_, tokens);
        if (!err.empty()) fail("%s", err.c_str());
    }
    std::string describe() const override {
        size_t total = std::accumulate(tokens_.begin(), tokens_.end(), (size_t)0);
        return string_format("%zu shard%s, %s tokens (%s)", files_.size(), files_.size() == 1 ? "" : "s",
                             human_count((double)total).c_str(), pattern_.c_str());
    }

  private:
    std::string pattern_;
    int vocab_size_ = 0;
    std::vector<std::string> files_;
    std::vector<size_t> tokens_;
};

// Shards [first, first + count) of the synthetic corpus, each `tokens` long.
// Training uses shards 1.., validation shard 0, so the two never overlap.
class SyntheticShards : public TokenSource {
  public:
    SyntheticShards(const SyntheticCorpus* corpus, size_t first, size_t count, size_t tokens)
        : corpus_(corpus), first_(first), count_(count), tokens_(tokens) {}
    size_t num_shards() const override { return count_; }
    size_t shard_tokens(size_t) const override { return tokens_; }
    void load(size_t shard, std::vector<uint16_t>* tokens) const override {
        tokens->resize(tokens_);
        corpus_->generate_shard(first_ + shard, tokens->data(), tokens_);
    }
    std::string describe() const override {
        return string_format("synthetic corpus, %zu shard%s of %zu tokens (%s tokens)", count_,
                             count_ == 1 ? "" : "s", tokens_, human_count((double)count_ * tokens_).c_str());
    }

  private:
    const SyntheticCorpus* corpus_;
    size_t first_, count_, tokens_;
};

// Where a loader is in its stream; with the loader's settings (checked on
// restore) this is everything a resumed run needs.
struct LoaderPosition {
    uint64_t epoch = 0, shard_pos = 0, round = 0;
};

class DataLoader {
  public:
    // B windows of T tokens per call, for `rank` of `world` processes.
    // Returns "" or why the source cannot feed even one round.
    std::string init(const TokenSource* source, int B, int T, int rank, int world, uint64_t seed, bool shuffle) {
        source_ = source;
        B_ = B; T_ = T; rank_ = rank; world_ = world;
        seed_ = seed;
        shuffle_ = shuffle;
        rounds_per_epoch_ = 0;
        for (size_t s = 0; s < source->num_shards(); s++) rounds_per_epoch_ += rounds_in(s);
        if (rounds_per_epoch_ == 0)
            return string_format("%s: no shard holds one round of %d process%s x %d sequences x %d tokens "
                                 "(+1); use a smaller -b or -t",
                                 source->describe().c_str(), world, world == 1 ? "" : "es", B, T);
        loaded_shard_ = SIZE_MAX;
        restore(LoaderPosition());
        return "";
    }

    // Fills inputs[B*T] and targets[B*T] (targets = inputs shifted by one).
    void next_batch(int* inputs, int* targets) {
        while (pos_.round >= rounds_in(shard_order_[pos_.shard_pos])) {
            pos_.round = 0;
            if (++pos_.shard_pos == shard_order_.size()) {
                pos_.shard_pos = 0;
                pos_.epoch++;
                order_shards();
            }
        }
        size_t shard = shard_order_[pos_.shard_pos];
        if (shard != loaded_shard_ || pos_.epoch != loaded_epoch_) load_shard(shard);
        size_t first = pos_.round * (size_t)world_ * B_ + (size_t)rank_ * B_;
        for (int b = 0; b < B_; b++) {
            const uint16_t* w = tokens_.data() + window_order_[first + b] * (size_t)T_;
            for (int t = 0; t < T_; t++) {
                inputs[b * T_ + t] = w[t];
                targets[b * T_ + t] = w[t + 1];
            }
        }
        pos_.round++;
    }

    LoaderPosition position() const { return pos_; }
    // The loaded shard stays valid across restore: its window order depends
    // only on (seed, epoch, shard), so re-reading it would be wasted I/O.
    void restore(const LoaderPosition& p) {
        if (p.shard_pos >= source_->num_shards())
            fail("data position (shard %llu) is past the %zu shards of %s: the data changed since the checkpoint",
                 (unsigned long long)p.shard_pos, source_->num_shards(), source_->describe().c_str());
        pos_ = p;
        order_shards();
    }
    void reset() { restore(LoaderPosition()); }

    // Batches (calls of next_batch) in one pass over the data.
    size_t batches_per_epoch() const { return rounds_per_epoch_; }

  private:
    const TokenSource* source_ = nullptr;
    int B_ = 0, T_ = 0, rank_ = 0, world_ = 1;
    uint64_t seed_ = 0;
    bool shuffle_ = false;
    size_t rounds_per_epoch_ = 0;
    LoaderPosition pos_;
    std::vector<size_t> shard_order_;
    std::vector<size_t> window_order_;
    std::vector<uint16_t> tokens_;
    size_t loaded_shard_ = SIZE_MAX;
    uint64_t loaded_epoch_ = 0;

    size_t windows_in(size_t shard) const { return (source_->shard_tokens(shard) - 1) / T_; }
    size_t rounds_in(size_t shard) const { return windows_in(shard) / ((size_t)world_ * B_); }

    void order_shards() {
        shard_order_.resize(source_->num_shards());
        std::iota(shard_order_.begin(), shard_order_.end(), 0);
        if (shuffle_) {
            Rng rng(seed_mix(seed_, pos_.epoch));
            rng.shuffle(shard_order_);
        }
    }

    void load_shard(size_t shard) {
        source_->load(shard, &tokens_);
        window_order_.resize(windows_in(shard));
        std::iota(window_order_.begin(), window_order_.end(), 0);
        if (shuffle_) {
            Rng rng(seed_mix(seed_, pos_.epoch, shard + 1));
            rng.shuffle(window_order_);
        }
        loaded_shard_ = shard;
        loaded_epoch_ = pos_.epoch;
    }
};
