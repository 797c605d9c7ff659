// test/gradcheck.h: what the CPU reference tests share: random vectors,
// small vector arithmetic, NaN-filled outputs, and the central-difference
// gradient check every backward is held to.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "../common.h"
#include "check.h"

using Vec = std::vector<double>;

static Vec random_vector(Rng& rng, size_t n, double lo = -1, double hi = 1) {
    Vec v(n);
    for (double& x : v) x = lo + (hi - lo) * rng.uniform();
    return v;
}

static double dot(const Vec& a, const Vec& b) {
    double sum = 0;
    for (size_t i = 0; i < a.size(); i++) sum += a[i] * b[i];
    return sum;
}

static Vec minus(const Vec& a, const Vec& b) {
    Vec d(a.size());
    for (size_t i = 0; i < a.size(); i++) d[i] = a[i] - b[i];
    return d;
}

// Outputs a function overwrites start as NaN, so any element it leaves
// unwritten shows up.
static Vec nans(size_t n) { return Vec(n, NAN); }

// Compares analytic[i] with the central difference (L(x+h) - L(x-h)) / 2h of
// objective() for each i in indices, perturbing (*x)[i] in place. The error is
// relative, with a floor so gradients that should be zero compare absolutely.
static void check_gradient(Test& t, const std::string& what, Vec* x, const Vec& analytic,
                           const std::function<double()>& objective, const std::vector<size_t>& indices) {
    const double h = 1e-6, tolerance = 1e-6, floor = 1e-2;
    double worst = 0, worst_analytic = 0, worst_numeric = 0;
    size_t worst_i = 0;
    for (size_t i : indices) {
        double saved = (*x)[i];
        (*x)[i] = saved + h;
        double plus = objective();
        (*x)[i] = saved - h;
        double minus = objective();
        (*x)[i] = saved;
        double numeric = (plus - minus) / (2 * h);
        double error = std::fabs(analytic[i] - numeric) / std::max(std::fabs(analytic[i]) + std::fabs(numeric), floor);
        if (!(error <= worst)) {  // also catches NaN
            worst = error;
            worst_i = i;
            worst_analytic = analytic[i];
            worst_numeric = numeric;
        }
    }
    CHECK(t, worst < tolerance, "%s: relative error %.2e at element %zu (analytic %.12g, numeric %.12g)",
          what.c_str(), worst, worst_i, worst_analytic, worst_numeric);
}

static std::vector<size_t> all_indices(size_t n) {
    std::vector<size_t> indices(n);
    for (size_t i = 0; i < n; i++) indices[i] = i;
    return indices;
}

static void check_gradient(Test& t, const std::string& what, Vec* x, const Vec& analytic,
                           const std::function<double()>& objective) {
    check_gradient(t, what, x, analytic, objective, all_indices(x->size()));
}
