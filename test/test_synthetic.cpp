// test_synthetic: the built-in synthetic corpus is deterministic, has the
// documented structure, and its computed entropy rate is what a long sample
// actually shows, measured two ways: the average surprisal under the exact
// conditional probabilities, and a model-free plug-in estimate from counts.
#include <cmath>
#include <map>
#include <numeric>
#include <unordered_map>

#include "../data/synthetic.h"
#include "check.h"

static void test_deterministic(Test& t) {
    SyntheticCorpus a, b, c;
    CHECK(t, a.init(7, 50257).empty() && b.init(7, 50257).empty() && c.init(8, 50257).empty(), "init");
    std::vector<uint16_t> x(100000), y(100000), z(100000);
    a.generate_shard(3, x.data(), x.size());
    b.generate_shard(3, y.data(), y.size());
    CHECK(t, x == y, "same seed and shard gave different streams");
    c.generate_shard(3, z.data(), z.size());
    CHECK(t, x != z, "different seeds gave the same stream");
    a.generate_shard(4, z.data(), z.size());
    CHECK(t, x != z, "different shards gave the same stream");
    CHECK(t, a.entropy_rate() == b.entropy_rate(), "entropy rate not deterministic");
}

static void test_structure(Test& t) {
    SyntheticCorpus corpus;
    CHECK(t, corpus.init(1, 50257).empty(), "init");
    CHECK(t, corpus.eot() == 50256, "eot %d", corpus.eot());
    std::vector<uint16_t> x(1 << 20);
    corpus.generate_shard(0, x.data(), x.size());
    CHECK(t, x[0] == corpus.eot(), "a shard must start with EOT");
    std::vector<size_t> docs(corpus.domains().size(), 0);
    int doc_domain = -1;
    size_t bad = 0;
    for (size_t i = 1; i < x.size(); i++) {
        CHECK(t, x[i] < 50257, "token %d out of range", x[i]);
        if (x[i] == corpus.eot()) {
            bad += x[i - 1] == corpus.eot();  // every document has at least one token
            doc_domain = -1;
            continue;
        }
        int d = corpus.domain_of(x[i]);
        if (doc_domain < 0) { doc_domain = d; docs[d]++; }
        bad += d != doc_domain;  // a document stays in its domain
    }
    CHECK(t, bad == 0, "%zu tokens break the document structure", bad);
    for (size_t d = 0; d < docs.size(); d++) {
        double share = (double)docs[d] / std::accumulate(docs.begin(), docs.end(), (size_t)0);
        CHECK(t, std::fabs(share - corpus.domains()[d].spec.share) < 0.03, "domain %s: %.3f of documents, expected %.3f",
              corpus.domains()[d].spec.name, share, corpus.domains()[d].spec.share);
    }
}

// The exact conditional probabilities sum to one in every context.
static void test_probabilities_normalised(Test& t) {
    SyntheticCorpus corpus;
    CHECK(t, corpus.init(3, 600).empty(), "init");
    std::vector<uint16_t> x(20000);
    corpus.generate_shard(1, x.data(), x.size());
    for (size_t i = 2; i < x.size(); i += 97) {
        double sum = 0;
        for (int next = 0; next < 600; next++) sum += corpus.prob_next(x[i - 1], x[i], next);
        CHECK(t, std::fabs(sum - 1) < 1e-12, "context at %zu sums to %.15f", i, sum);
    }
}

// Mean surprisal of a long sample under the process's own probabilities.
static void test_entropy_rate_matches_surprisal(Test& t) {
    SyntheticCorpus corpus;
    CHECK(t, corpus.init(11, 50257).empty(), "init");
    double nll = 0;
    size_t count = 0;
    std::vector<uint16_t> x(1 << 20);
    for (int shard = 0; shard < 4; shard++) {
        corpus.generate_shard(shard, x.data(), x.size());
        for (size_t i = 1; i < x.size(); i++) {
            double p = corpus.prob_next(i >= 2 ? x[i - 2] : -1, x[i - 1], x[i]);
            CHECK(t, p > 0, "zero probability for a generated token at %zu", i);
            nll -= std::log(p);
            count++;
        }
    }
    nll /= count;
    double rate = corpus.entropy_rate();
    CHECK(t, std::fabs(nll - rate) < 0.01, "surprisal %.4f vs entropy rate %.4f nats", nll, rate);
    CHECK(t, rate > 1.0 && rate < 6.0, "rate %.3f outside the intended range", rate);
}

// Plug-in conditional entropy from counts, with each token's context being
// what its domain depends on (one or two tokens). No use of the generator's
// probabilities: this checks the closed form against the data alone.
static void test_entropy_rate_matches_counts(Test& t) {
    SyntheticCorpus corpus;
    CHECK(t, corpus.init(5, 256).empty(), "init");
    std::unordered_map<uint64_t, std::map<int, double>> counts;
    std::vector<uint16_t> x(1 << 20);
    size_t total = 0;
    for (int shard = 0; shard < 6; shard++) {
        corpus.generate_shard(shard, x.data(), x.size());
        for (size_t i = 2; i < x.size(); i++) {
            int d = corpus.domain_of(x[i - 1]);
            bool two = d >= 0 && corpus.domains()[d].spec.order == 2;
            uint64_t ctx = x[i - 1] + (two ? (uint64_t)(x[i - 2] + 1) << 16 : 0);
            counts[ctx][x[i]] += 1;
            total++;
        }
    }
    double h = 0;
    for (auto& [ctx, next] : counts) {
        double n = 0;
        for (auto& [tok, c] : next) n += c;
        for (auto& [tok, c] : next) h -= c / total * std::log(c / n);
    }
    double rate = corpus.entropy_rate();
    CHECK(t, std::fabs(h - rate) < 0.01, "plug-in entropy %.4f vs entropy rate %.4f nats", h, rate);
}

static void test_rejects_tiny_vocab(Test& t) {
    SyntheticCorpus corpus;
    std::string err = corpus.init(1, 10);
    CHECK(t, err.find("vocab size 10 is outside") != std::string::npos, "'%s'", err.c_str());
}

int main() {
    return run_tests({
        {"synthetic_deterministic", test_deterministic},
        {"synthetic_structure", test_structure},
        {"synthetic_probabilities_normalised", test_probabilities_normalised},
        {"synthetic_entropy_rate_matches_surprisal", test_entropy_rate_matches_surprisal},
        {"synthetic_entropy_rate_matches_counts", test_entropy_rate_matches_counts},
        {"synthetic_rejects_tiny_vocab", test_rejects_tiny_vocab},
    });
}
