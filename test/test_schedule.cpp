// test_schedule: the learning-rate schedule's shape: warm-up, cosine,
// constant-then-warm-down and linear decay, each ending at the final fraction
// of the peak, and the groups that skip the warm-up.
#include <cmath>

#include "../schedule.h"
#include "check.h"

static bool near(double a, double b) { return std::fabs(a - b) <= 1e-9 * std::max(1.0, std::fabs(b)); }

static void test_warmup(Test& t) {
    Schedule s{LrSchedule::Cosine, 0.1, 0.2, 10, 100};
    for (int step = 0; step < 10; step++)
        CHECK(t, near(s.factor(step), (step + 1) / 10.0), "step %d: %g", step, s.factor(step));
    CHECK(t, near(s.factor(10), 1.0), "first step after warm-up: %g", s.factor(10));
}

static void test_cosine(Test& t) {
    Schedule s{LrSchedule::Cosine, 0.1, 0.2, 10, 101};
    CHECK(t, near(s.factor(100), 0.1), "last step %g, expected the floor 0.1", s.factor(100));
    CHECK(t, near(s.factor(55), 0.55), "midpoint %g", s.factor(55));
    for (int step = 10; step < 100; step++) CHECK(t, s.factor(step + 1) <= s.factor(step), "rises at step %d", step);
}

static void test_warmdown(Test& t) {
    Schedule s{LrSchedule::Wsd, 0.0, 0.25, 5, 100};
    for (int step = 5; step < 75; step++) CHECK(t, s.factor(step) == 1.0, "step %d not constant: %g", step, s.factor(step));
    CHECK(t, s.factor(99) == 0.0, "last step %g", s.factor(99));
    CHECK(t, near(s.factor(87), 1 - 12.0 / 24), "halfway down %g", s.factor(87));
}

// The paper's schedule: AdamW warms up over 250 steps, Muon starts at its
// peak; both decay linearly to 0.1 x on the last step.
static void test_linear_and_no_warmup(Test& t) {
    Schedule s{LrSchedule::Linear, 0.1, 0.2, 250, 1251};
    CHECK(t, near(s.factor(0), 1.0 / 250) && near(s.factor(249), 1.0), "AdamW warm-up %g .. %g", s.factor(0),
          s.factor(249));
    CHECK(t, near(s.factor(750), 0.55) && near(s.factor(1250), 0.1), "AdamW decay %g, last %g", s.factor(750),
          s.factor(1250));
    CHECK(t, near(s.factor(0, false), 1.0), "Muon's first step %g, expected the peak", s.factor(0, false));
    CHECK(t, near(s.factor(625, false), 0.55) && near(s.factor(1250, false), 0.1), "Muon decay %g, last %g",
          s.factor(625, false), s.factor(1250, false));
    // the authors' code: constant, then the last 20% down to 0, no warm-up
    Schedule code{LrSchedule::Wsd, 0.0, 0.2, 0, 100};
    CHECK(t, code.factor(0) == 1.0 && code.factor(79) == 1.0 && code.factor(99) == 0.0, "code schedule %g %g %g",
          code.factor(0), code.factor(79), code.factor(99));
}

static void test_short_runs(Test& t) {
    CHECK(t, default_warmup_steps(19073) == 700 && default_warmup_steps(300) == 30, "default warm-up");
    Schedule one{LrSchedule::Cosine, 0.0, 0.2, 0, 1};
    CHECK(t, std::isfinite(one.factor(0)), "a one-step run gives %g", one.factor(0));
    Schedule all_warmup{LrSchedule::Wsd, 0.0, 1.0, 10, 10};
    CHECK(t, near(all_warmup.factor(9), 1.0), "warm-up to the last step: %g", all_warmup.factor(9));
}

int main() {
    return run_tests({
        {"schedule_warmup", test_warmup},
        {"schedule_cosine", test_cosine},
        {"schedule_wsd", test_warmdown},
        {"schedule_linear_and_no_warmup", test_linear_and_no_warmup},
        {"schedule_short_runs", test_short_runs},
    });
}
