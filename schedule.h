// schedule.h: the learning-rate schedule, step by step.
//
// Each parameter group has a peak rate (optimizer_config.h); the schedule
// gives the factor of that peak at each step. A linear warm-up over the first
// `warmup` steps, then one of:
//   cosine  a cosine decay,
//   wsd     a constant stretch, then a linear warm-down over the last
//           warmdown_frac of the run (the authors' code: no warm-up, the
//           last 20%, to 0),
//   linear  a linear decay (the paper's text: to 0.1 x the peak),
// each ending exactly at final_frac x the peak on the last step, given at
// least one step after the warm-up to decay over (a warm-down of two steps or
// more, for wsd). A group that never warms up (Muon's, in the paper and its
// code) follows the same shape from step 0. Plain C++ so it is unit-tested
// alone.
#pragma once

#include <algorithm>
#include <cmath>

enum class LrSchedule { Cosine, Wsd, Linear };  // the order of the -a flag's choices

// The default warm-up (-u -1): 700 steps, or 10% of a shorter run.
inline int default_warmup_steps(int steps) { return std::min(700, steps / 10); }

struct Schedule {
    LrSchedule kind = LrSchedule::Cosine;
    double final_frac = 0, warmdown_frac = 0;
    int warmup = 0, steps = 1;

    // The factor of a group's peak rate at a 0-based step.
    double factor(int step, bool with_warmup = true) const {
        const int w = with_warmup ? warmup : 0, last = steps - 1;
        if (step < w) return (double)(step + 1) / w;
        const double progress = (double)(step - w) / std::max(1, last - w);
        switch (kind) {
            case LrSchedule::Cosine: return final_frac + 0.5 * (1.0 + std::cos(M_PI * progress)) * (1.0 - final_frac);
            case LrSchedule::Linear: return 1.0 + (final_frac - 1.0) * progress;
            case LrSchedule::Wsd: break;
        }
        const int warmdown_start = std::max(w, steps - (int)(warmdown_frac * steps));
        if (step < warmdown_start) return 1.0;
        return 1.0 + (final_frac - 1.0) * (double)(step - warmdown_start) / std::max(1, last - warmdown_start);
    }
};
