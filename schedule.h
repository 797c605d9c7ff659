// schedule.h: the learning-rate schedule, step by step.
//
// A linear warm-up to the peak over the first `warmup` steps, then either a
// cosine decay or a constant stretch followed by a linear warm-down ("wsd")
// over the last warmdown_frac of the run, both ending exactly at
// final_frac x peak on the last step. Plain C++ so it is unit-tested alone.
#pragma once

#include <algorithm>
#include <cmath>

enum class LrSchedule { Cosine, Wsd };  // the order of the -a flag's choices

// The default warm-up (-u -1): 700 steps, or 10% of a shorter run.
inline int default_warmup_steps(int steps) { return std::min(700, steps / 10); }

struct Schedule {
    LrSchedule kind = LrSchedule::Cosine;
    double peak = 0, final_frac = 0, warmdown_frac = 0;
    int warmup = 0, steps = 1;

    float at(int step) const {
        double floor = peak * final_frac;
        if (step < warmup) return (float)(peak * (step + 1) / warmup);
        int last = steps - 1;
        if (kind == LrSchedule::Cosine) {
            double progress = (double)(step - warmup) / std::max(1, last - warmup);
            return (float)(floor + 0.5 * (1.0 + std::cos(M_PI * progress)) * (peak - floor));
        }
        int warmdown_start = std::max(warmup, steps - (int)(warmdown_frac * steps));
        if (step < warmdown_start) return (float)peak;
        return (float)(peak + (floor - peak) * (double)(step - warmdown_start) / std::max(1, last - warmdown_start));
    }
};
