// test_schedule: the learning-rate schedule's shape: warm-up, cosine and
// constant-then-warm-down, each ending at the final fraction of the peak.
#include <cmath>

#include "../schedule.h"
#include "check.h"

static bool near(double a, double b) { return std::fabs(a - b) <= 1e-6 * std::max(1.0, std::fabs(b)); }

static void test_warmup(Test& t) {
    Schedule s{LrSchedule::Cosine, 1e-3, 0.1, 0.2, 10, 100};
    for (int step = 0; step < 10; step++)
        CHECK(t, near(s.at(step), 1e-3 * (step + 1) / 10), "step %d: %g", step, s.at(step));
    CHECK(t, near(s.at(10), 1e-3), "first step after warm-up: %g", s.at(10));
}

static void test_cosine(Test& t) {
    Schedule s{LrSchedule::Cosine, 1e-3, 0.1, 0.2, 10, 101};
    CHECK(t, near(s.at(100), 1e-4), "last step %g, expected the floor 1e-4", s.at(100));
    CHECK(t, near(s.at(55), 0.5 * (1e-3 + 1e-4)), "midpoint %g", s.at(55));
    for (int step = 10; step < 100; step++) CHECK(t, s.at(step + 1) <= s.at(step), "rises at step %d", step);
}

static void test_warmdown(Test& t) {
    Schedule s{LrSchedule::Wsd, 2e-3, 0.0, 0.25, 5, 100};
    for (int step = 5; step < 75; step++) CHECK(t, s.at(step) == (float)2e-3, "step %d not constant: %g", step, s.at(step));
    CHECK(t, s.at(99) == 0.0f, "last step %g", s.at(99));
    CHECK(t, near(s.at(87), 2e-3 * (1 - 12.0 / 24)), "halfway down %g", s.at(87));
}

static void test_short_runs(Test& t) {
    CHECK(t, default_warmup_steps(19073) == 700 && default_warmup_steps(300) == 30, "default warm-up");
    Schedule one{LrSchedule::Cosine, 1e-3, 0.0, 0.2, 0, 1};
    CHECK(t, std::isfinite(one.at(0)), "a one-step run gives %g", one.at(0));
    Schedule all_warmup{LrSchedule::Wsd, 1e-3, 0.0, 1.0, 10, 10};
    CHECK(t, near(all_warmup.at(9), 1e-3), "warm-up to the last step: %g", all_warmup.at(9));
}

int main() {
    return run_tests({
        {"schedule_warmup", test_warmup},
        {"schedule_cosine", test_cosine},
        {"schedule_wsd", test_warmdown},
        {"schedule_short_runs", test_short_runs},
    });
}
