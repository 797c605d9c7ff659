// test_routing_stats: summarize_routing, the arithmetic behind the routing
// metrics train_et logs (expert usage, experts per token, cutoff deviation),
// against sums done by hand, and its edge cases: a layer that saw no tokens,
// experts that got none, cutoffs not tracked yet.
#include <cmath>

#include "../router_config.h"
#include "check.h"

static bool near(double a, double b) { return std::fabs(a - b) <= 1e-12 * std::max(1.0, std::fabs(b)); }

// 4 experts got 10, 20, 30, 40 of 100 routed (token, expert) pairs.
static LayerRoutingStats four_experts() {
    LayerRoutingStats s;
    s.layer = 3;
    s.counts = {10, 20, 30, 40};
    s.tokens = 50;
    s.fanout[0] = 5; s.fanout[1] = 10; s.fanout[2] = 15; s.fanout[3] = 20;
    return s;
}

// usage = count / 100; mean count 25, variance (15^2 + 5^2 + 5^2 + 15^2) / 4 = 125
static void test_usage(Test& t) {
    RoutingSummary r = summarize_routing(four_experts());
    CHECK(t, near(r.usage_min, 0.1) && near(r.usage_max, 0.4), "usage [%g, %g], expected [0.1, 0.4]", r.usage_min,
          r.usage_max);
    CHECK(t, near(r.usage_cv, std::sqrt(125.0) / 25), "cv %g, expected %g", r.usage_cv, std::sqrt(125.0) / 25);
    LayerRoutingStats even = four_experts();
    even.counts = {25, 25, 25, 25};
    r = summarize_routing(even);
    CHECK(t, r.usage_cv == 0 && near(r.usage_min, 0.25) && near(r.usage_max, 0.25), "even usage: cv %g [%g, %g]",
          r.usage_cv, r.usage_min, r.usage_max);
}

// 100 pairs over 50 tokens: 2 experts per token; the histogram as shares
static void test_fanout(Test& t) {
    RoutingSummary r = summarize_routing(four_experts());
    CHECK(t, near(r.fanout_mean, 2.0), "fanout mean %g, expected 2", r.fanout_mean);
    const double want[4] = {0.1, 0.2, 0.3, 0.4};
    for (int b = 0; b < 4; b++) CHECK(t, near(r.fanout_frac[b], want[b]), "fanout[%d] %g, expected %g", b, r.fanout_frac[b], want[b]);
}

// |1.5 - 1| + |1 - 2| + |3 - 3| + |3.5 - 4| = 2 over 4 experts
static void test_cutoff_deviation(Test& t) {
    LayerRoutingStats s = four_experts();
    s.cutoff = {1, 2, 3, 4};
    s.batch_cutoff = {1.5f, 1, 3, 3.5f};
    RoutingSummary r = summarize_routing(s);
    CHECK(t, near(r.cutoff_dev, 0.5), "cutoff dev %g, expected 0.5", r.cutoff_dev);
    s.cutoff.clear();  // before the first EMA update there is no tracked cutoff
    CHECK(t, std::isnan(summarize_routing(s).cutoff_dev), "no tracked cutoff gives %g, expected NaN",
          summarize_routing(s).cutoff_dev);
    s.batch_cutoff.clear();  // TC: neither
    CHECK(t, std::isnan(summarize_routing(s).cutoff_dev), "TC gives cutoff dev %g", summarize_routing(s).cutoff_dev);
}

// An expert with no tokens is normal; a layer with no tokens at all (or no
// experts: a dense model's empty stats) must give zeros, never NaN.
static void test_empty(Test& t) {
    LayerRoutingStats s = four_experts();
    s.counts = {0, 0, 60, 40};
    RoutingSummary r = summarize_routing(s);
    CHECK(t, r.usage_min == 0 && near(r.usage_max, 0.6), "idle experts: usage [%g, %g]", r.usage_min, r.usage_max);
    CHECK(t, near(r.usage_cv, std::sqrt((25.0 * 25 * 2 + 35.0 * 35 + 15.0 * 15) / 4) / 25), "idle experts: cv %g",
          r.usage_cv);
    LayerRoutingStats none;
    none.counts = {0, 0, 0, 0};
    for (const LayerRoutingStats& z : {none, LayerRoutingStats()}) {
        r = summarize_routing(z);
        bool zeros = r.usage_min == 0 && r.usage_max == 0 && r.usage_cv == 0 && r.fanout_mean == 0;
        for (double f : r.fanout_frac) zeros = zeros && f == 0;
        CHECK(t, zeros, "%zu experts, no tokens: usage [%g, %g] cv %g fanout %g", z.counts.size(), r.usage_min,
              r.usage_max, r.usage_cv, r.fanout_mean);
    }
}

int main() {
    return run_tests({
        {"routing_stats_usage", test_usage},
        {"routing_stats_fanout", test_fanout},
        {"routing_stats_cutoff_deviation", test_cutoff_deviation},
        {"routing_stats_empty", test_empty},
    });
}
