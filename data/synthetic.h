// data/synthetic.h: the built-in synthetic corpus, for machines without
// FineWeb-Edu.
//
// A document stream generated from a seed, with several "domains" of
// different statistics and difficulty, so that MoE experts have something to
// specialise on and ET routing has tokens of different difficulty to spend
// compute on. Its entropy rate is known exactly, so a run can print the loss
// floor it is approaching.
//
// The process. Every document starts with EOT (id vocab_size - 1). Its domain
// d is drawn with probability share_d; domain d owns the token ids
// [base_d, base_d + V_d). The first token is uniform over the domain. After
// every token the document ends with probability q_d = 1 / mean_doc_len_d
// (the next token is EOT), else it continues by the domain's rule:
//   order 0: uniform over V_d (pure noise, the hardest domain);
//   order 1: next = perm_j(last) with probability w_j, j < branches;
//   order 2: next = perm_{j,last}(second_last) with probability w_j (the
//            second token of a document, which has no second-last, is uniform).
// w_j is proportional to (j + 1)^-zipf. Each perm is a random permutation, so
// the transition is a mixture of permutations of the state space (for order 2
// the state is the pair (second_last, last), and (a, b) -> (b, perm_{j,b}(a))
// is a bijection). Such a chain is doubly stochastic: the uniform distribution
// over states is invariant, and since a document starts uniform, every step
// of every document sees a uniform state. That makes the entropy rate a
// closed form (see entropy_rate()) instead of a numerical estimate.
//
// The process is second-order Markov over tokens: p(next | all history) =
// prob_next(second_last, last, next), which the tests use.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "../common.h"

struct SyntheticDomain {
    const char* name;
    int order;           // 0, 1 or 2 tokens of context
    int vocab;           // ids the domain owns at the full GPT-2 vocab size
    int branches;        // continuations per context
    double zipf;         // skew of the continuation weights
    double mean_doc_len; // documents end with probability 1 / mean_doc_len per token
    double share;        // fraction of documents
};

// The domains, from easy to hard. Vocab sizes shrink proportionally when the
// corpus is built for a small vocabulary (tests, tiny models).
static const SyntheticDomain SYNTHETIC_DOMAINS[] = {
    {"steady",    1,  512,  2, 4.3, 512, 0.20},  // nearly deterministic chains
    {"syntax",    2,   64,  4, 1.5, 256, 0.20},  // needs two tokens of context
    {"lexicon",   2,  256,  8, 1.2, 192, 0.20},
    {"branching", 1, 4096, 16, 1.0, 128, 0.25},
    {"noise",     0, 1024,  1, 0.0,  64, 0.15},  // incompressible
};
static const int SYNTHETIC_NUM_DOMAINS = sizeof(SYNTHETIC_DOMAINS) / sizeof(SYNTHETIC_DOMAINS[0]);
static const int SYNTHETIC_MIN_DOMAIN_VOCAB = 4;

class SyntheticCorpus {
  public:
    struct Domain {
        SyntheticDomain spec;
        int base, vocab;
        double end_prob;
        std::vector<double> weights;   // w_j, normalised
        std::vector<double> cum;       // cumulative w_j, for sampling
        std::vector<uint16_t> perm;    // order 1: [j][last]; order 2: [j][last][second_last]
    };

    // Builds the domain tables from the seed. vocab_size includes EOT (the
    // last id). Returns "" or the reason the vocab cannot hold the domains.
    std::string init(uint64_t seed, int vocab_size) {
        seed_ = seed;
        vocab_size_ = vocab_size;
        eot_ = vocab_size - 1;
        int full = 0;
        for (int d = 0; d < SYNTHETIC_NUM_DOMAINS; d++) full += SYNTHETIC_DOMAINS[d].vocab;
        double scale = std::min(1.0, (double)(vocab_size - 1) / full);
        domains_.clear();
        int base = 0;
        for (int d = 0; d < SYNTHETIC_NUM_DOMAINS; d++) {
            Domain dom;
            dom.spec = SYNTHETIC_DOMAINS[d];
            dom.base = base;
            dom.vocab = std::max(SYNTHETIC_MIN_DOMAIN_VOCAB, (int)(dom.spec.vocab * scale));
            dom.end_prob = 1.0 / dom.spec.mean_doc_len;
            base += dom.vocab;
            double total = 0;
            for (int j = 0; j < dom.spec.branches; j++) {
                dom.weights.push_back(std::pow(j + 1.0, -dom.spec.zipf));
                total += dom.weights.back();
            }
            double acc = 0;
            for (double& w : dom.weights) { w /= total; acc += w; dom.cum.push_back(acc); }
            dom.cum.back() = 1.0;
            Rng rng(seed_mix(seed, 0x5EED7AB1E, d));
            int tables = dom.spec.order == 0 ? 0
                       : dom.spec.order == 1 ? dom.spec.branches
                                             : dom.spec.branches * dom.vocab;
            std::vector<uint16_t> p(dom.vocab);
            for (int t = 0; t < tables; t++) {
                for (int i = 0; i < dom.vocab; i++) p[i] = (uint16_t)i;
                rng.shuffle(p);
                dom.perm.insert(dom.perm.end(), p.begin(), p.end());
            }
            domains_.push_back(dom);
        }
        if (base > eot_ || vocab_size > 65536)
            return string_format("synthetic corpus: vocab size %d is outside [%d, 65536]", vocab_size, base + 1);
        return "";
    }

    int eot() const { return eot_; }
    int vocab_size() const { return vocab_size_; }
    const std::vector<Domain>& domains() const { return domains_; }

    // Index of the domain owning token id t, or -1 for EOT / unused ids.
    int domain_of(int t) const {
        for (int d = 0; d < (int)domains_.size(); d++)
            if (t >= domains_[d].base && t < domains_[d].base + domains_[d].vocab) return d;
        return -1;
    }

    // Fills out[0..n) with the stream of shard `index`: each shard is its own
    // stream (seeded by seed and index) starting with EOT, so any shard can be
    // made on demand, in any order, on any rank.
    void generate_shard(uint64_t index, uint16_t* out, size_t n) const {
        Rng rng(seed_mix(seed_, 0xC0FFEE, index));
        int d = -1;                   // current domain; -1 right after EOT
        int last = -1, second_last = -1;  // local ids within the domain; -1 = none
        for (size_t i = 0; i < n; i++) {
            if (i == 0 || (d >= 0 && rng.uniform() < domains_[d].end_prob)) {
                out[i] = (uint16_t)eot_;
                d = -1;
                continue;
            }
            int local;
            if (d < 0) {
                d = pick_domain(rng.uniform());
                local = (int)rng.below(domains_[d].vocab);
                second_last = -1;
            } else {
                local = continuation(domains_[d], second_last, last, rng);
                second_last = last;
            }
            last = local;
            out[i] = (uint16_t)(domains_[d].base + local);
        }
    }

    // p(next | second_last, last): the exact conditional probability of the
    // process (-1 for a missing second_last at the start of a stream).
    double prob_next(int second_last, int last, int next) const {
        if (last == eot_) {
            int d = domain_of(next);
            return d < 0 ? 0.0 : domains_[d].spec.share / domains_[d].vocab;
        }
        int d = domain_of(last);
        const Domain& dom = domains_[d];
        if (next == eot_) return dom.end_prob;
        if (domain_of(next) != d) return 0.0;
        int b = last - dom.base, c = next - dom.base;
        double p = 0;
        if (dom.spec.order == 0 || (dom.spec.order == 2 && second_last == eot_)) {
            p = 1.0 / dom.vocab;
        } else {
            int a = second_last - dom.base;
            for (int j = 0; j < dom.spec.branches; j++)
                if (successor(dom, j, a, b) == c) p += dom.weights[j];
        }
        return (1 - dom.end_prob) * p;
    }

    // The mean entropy of a domain's continuation over (uniform) states, in
    // nats: H(w) when all branches lead to different tokens, less where two
    // permutations happen to agree.
    double continuation_entropy(const Domain& dom) const {
        if (dom.spec.order == 0) return std::log((double)dom.vocab);
        int states = dom.spec.order == 1 ? dom.vocab : dom.vocab * dom.vocab;
        std::vector<double> mass(dom.vocab, 0.0);
        double total = 0;
        for (int s = 0; s < states; s++) {
            int a = s / dom.vocab, b = s % dom.vocab;
            for (int j = 0; j < dom.spec.branches; j++) mass[successor(dom, j, a, b)] += dom.weights[j];
            for (int j = 0; j < dom.spec.branches; j++) {
                int c = successor(dom, j, a, b);
                if (mass[c] > 0) { total -= mass[c] * std::log(mass[c]); mass[c] = 0; }
            }
        }
        return total / states;
    }

    // Entropy rate in nats per token: the best loss any model can reach.
    // A document is a renewal cycle of 1 + L tokens (EOT, then L ~ Geometric(q)
    // tokens, E[L] = 1/q). The cycle's predictions: the first token (domain and
    // uniform id), then after each of the L tokens "end or continue" (entropy
    // h(q)) and, if continuing, the continuation. Every state is uniform, so
    // each continuation has the domain's mean continuation entropy, except the
    // second token of an order-2 document (uniform). Rate = E[cycle entropy] /
    // E[cycle length].
    double entropy_rate() const {
        double first = 0, cycle_entropy = 0, cycle_len = 1;
        for (const Domain& dom : domains_) {
            double pi = dom.spec.share, q = dom.end_prob;
            first += -pi * std::log(pi) + pi * std::log((double)dom.vocab);
            double h_end = -q * std::log(q) - (1 - q) * std::log(1 - q);
            double cont = continuation_entropy(dom);
            double continuing = (1 - q) / q;  // expected continuations per doc
            double doc = h_end / q;
            if (dom.spec.order == 2)
                doc += (1 - q) * std::log((double)dom.vocab) + (continuing - (1 - q)) * cont;
            else
                doc += continuing * cont;
            cycle_entropy += pi * doc;
            cycle_len += pi / q;
        }
        return (first + cycle_entropy) / cycle_len;
    }

  private:
    uint64_t seed_ = 0;
    int vocab_size_ = 0, eot_ = 0;
    std::vector<Domain> domains_;

    int pick_domain(double u) const {
        double acc = 0;
        for (int d = 0; d < (int)domains_.size(); d++) {
            acc += domains_[d].spec.share;
            if (u < acc) return d;
        }
        return (int)domains_.size() - 1;
    }

    // The token branch j leads to from state (a = second_last, b = last).
    static int successor(const Domain& dom, int j, int a, int b) {
        if (dom.spec.order == 1) return dom.perm[(size_t)j * dom.vocab + b];
        return dom.perm[((size_t)j * dom.vocab + b) * dom.vocab + a];
    }

    static int continuation(const Domain& dom, int second_last, int last, Rng& rng) {
        if (dom.spec.order == 0 || (dom.spec.order == 2 && second_last < 0)) return (int)rng.below(dom.vocab);
        double u = rng.uniform();
        int j = 0;
        while (j + 1 < dom.spec.branches && u >= dom.cum[j]) j++;
        return successor(dom, j, second_last, last);
    }
};
