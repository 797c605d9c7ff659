// test/gpu_test_optimizer.cu: GPU parity of Muon (optimizer.cuh) against the
// CPU reference (test/reference.h: muon_update), and the Newton-Schulz map
// on demand for the property test.
//
//   gpu_test_optimizer.bf16                 the parity tests
//   gpu_test_optimizer.bf16 --newton-schulz IN OUT BATCH ROWS COLS
//        reads BATCH matrices of ROWS x COLS fp32 values from IN, runs Muon's
//        normalisation and five Newton-Schulz steps on the device (the wide
//        orientation, as muon_step does), writes the results to OUT as fp32;
//        test/gpu_test_muon.py checks their singular values with numpy.
//
// Conventions as test/gpu_test_model.cu (test/gpu_check.h): seeded random
// inputs, never zeros; the reference in double on exactly the values the GPU
// reads; errors as ||gpu - ref|| / ||ref||. Muon's update is compared as the
// step of the weights (the weights barely move), and the momentum as is.
// Why the BF16 tolerance holds: the Newton-Schulz products run on bf16
// operands (each rounding 2^-9 relative), and five steps of the map, which
// is contracting near the orthogonal matrices it converges to, keep the
// error of its output near a few of those roundings: measured here 1.3 to
// 1.7% of the step; 3e-2 is the bound.
#include "../model.cuh"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "../model_config.h"
#include "check.h"
namespace ref {
#include "reference.h"
}

#include "../optimizer.cuh"
#include "gpu_check.h"

#ifdef ENABLE_FP32
static const double TOL_MUON = 1e-4;
#else
static const double TOL_MUON = 3e-2;
#endif

struct MuonShape {
    int rows, cols, batch;
    std::string name() const { return string_format("%d x %d x %d", batch, rows, cols); }
};
static const MuonShape muon_shapes[] = {
    {48, 64, 1},  // wide
    {96, 32, 1},  // tall: iterated transposed
    {64, 64, 1},  // square
    {40, 24, 4},  // a batch of tall matrices (an EC/ET layer's experts)
    {24, 40, 3},  // a batch of wide ones
};

// Two Muon steps (the second on the momentum the first left), with the clip
// factor and weight decay active, against the reference matrix by matrix.
static void test_muon_step(Test& t) {
    Rng rng(901);
    const float lr = 0.02f, weight_decay = 0.1f, clip = 0.7f;
    for (const MuonShape& s : muon_shapes) {
        const size_t n = (size_t)s.batch * s.rows * s.cols;
        const std::vector<float> master = random_float(rng, n, -0.5, 0.5), m = random_float(rng, n, -0.1, 0.1);
        const std::vector<float> grads1 = random_float(rng, n, -1, 1), grads2 = random_float(rng, n, -1, 1);
        std::vector<MuonMatrix> shape = {{"test", 0, 1, s.rows, s.cols, s.batch}};
        MuonWorkspace ws;
        ws.allocate(shape);
        DeviceBuffer<float> d_master(master), d_m(m), d_grads(grads1), d_clip(std::vector<float>{clip});
        DeviceBuffer<floatX> d_params(n);
        d_params.poison();
        std::vector<double> w = to_doubles(master), mom = to_doubles(m);
        for (int step = 0; step < 2; step++) {
            const std::vector<float>& grads = step == 0 ? grads1 : grads2;
            const float mu = step == 0 ? 0.85f : 0.9f;
            d_grads.upload(grads);
            const std::vector<float> before = d_master.download();
            muon_step(g_cublas, ws, d_master.ptr, d_params.ptr, d_m.ptr, d_grads.ptr, s.rows, s.cols, s.batch, lr, mu,
                      weight_decay, 5, d_clip.ptr);
            sync_after("muon_step");
            const std::vector<double> w_before = w;
            const std::vector<double> g = to_doubles(grads);
            const size_t per = (size_t)s.rows * s.cols;
            for (int b = 0; b < s.batch; b++)
                ref::muon_update<double>(&w[b * per], &mom[b * per], &g[b * per], s.rows, s.cols, lr, mu, weight_decay,
                                         clip, 5, NS_A, NS_B, NS_C, NS_EPS);
            const std::vector<float> got = d_master.download();
            std::vector<double> step_gpu(n), step_ref(n);
            for (size_t i = 0; i < n; i++) {
                step_gpu[i] = (double)got[i] - before[i];
                step_ref[i] = w[i] - w_before[i];
            }
            const std::string what = s.name() + string_format(" step %d", step + 1);
            check_close(t, what + " weight step", step_gpu, step_ref, TOL_MUON);
            check_close(t, what + " momentum", to_doubles(d_m.download()), mom, TOL_FP32);
            std::vector<floatX> rounded(n);
            for (size_t i = 0; i < n; i++) rounded[i] = to_floatX(got[i]);
            CHECK(t, same_bits(d_params.download(), rounded), "%s: params are not the rounded master weights",
                  what.c_str());
            // the reference continues from the GPU's weights, so the steps stay comparable
            w = to_doubles(got);
        }
        ws.release();
    }
}

// The same inputs twice: the same bits.
static void test_muon_determinism(Test& t) {
    Rng rng(902);
    const MuonShape s = {40, 24, 4};
    const size_t n = (size_t)s.batch * s.rows * s.cols;
    const std::vector<float> master = random_float(rng, n, -0.5, 0.5), grads = random_float(rng, n, -1, 1);
    std::vector<MuonMatrix> shape = {{"test", 0, 1, s.rows, s.cols, s.batch}};
    MuonWorkspace ws;
    ws.allocate(shape);
    std::vector<float> results[2];
    for (int run = 0; run < 2; run++) {
        DeviceBuffer<float> d_master(master), d_m(std::vector<float>(n, 0.0f)), d_grads(grads);
        DeviceBuffer<float> d_clip(std::vector<float>{1.0f});
        DeviceBuffer<floatX> d_params(n);
        muon_step(g_cublas, ws, d_master.ptr, d_params.ptr, d_m.ptr, d_grads.ptr, s.rows, s.cols, s.batch, 0.02f, 0.95f,
                  0.0f, 5, d_clip.ptr);
        sync_after("muon_step");
        results[run] = d_master.download();
    }
    ws.release();
    CHECK(t, same_bits(results[0], results[1]), "two runs of the same Muon step differ");
}

// model_update under -opt muon, two steps apart: every group at its rate (the
// muP factor, the schedule's factor with or without the warm-up, the momentum
// warm-up), AdamW tensor by tensor and
// Muon matrix by matrix (q, k and v fused; EC's experts one by one, TC's
// stacked), with the clip factor from the global norm, against the reference.
struct GroupCase {
    const char* name;
    int experts;
    RouterKind router;
    RouterGroup router_group;
    MupScope mup;
    bool expert_momentum_warmup;
};
static void test_model_update_groups(Test& t) {
    const GroupCase cases[] = {
        {"dense", 0, RouterKind::ET, RouterGroup::AdamW, MupScope::AdamW, true},
        {"ec, router under muon, mup on all", 4, RouterKind::EC, RouterGroup::Muon, MupScope::All, true},
        {"tc, router under adamw", 4, RouterKind::TC, RouterGroup::AdamW, MupScope::AdamW, true},
        {"et, experts at constant momentum", 4, RouterKind::ET, RouterGroup::AdamW, MupScope::AdamW, false},
    };
    Rng rng(903);
    for (const GroupCase& k : cases) {
        ModelConfig c;
        c.preset = "gpu_test";
        c.n_layer = 2;
        c.n_embd = 64;
        c.n_head = 2;
        c.n_kv_head = 2;
        c.vocab_size = 100;
        c.seq_len = 16;
        c.n_experts = k.experts;
        c.router.kind = k.router;
        c.router.et_warmup_steps = 0;
        Model model;
        model.config = c;
        model.optim.kind = OptimizerKind::Muon;
        model.optim.router = k.router_group;
        model.optim.mup = k.mup;
        model.optim.expert_momentum_warmup = k.expert_momentum_warmup;
        model.optim.weight_decay = 0.1;
        model_allocate(&model, 2, 16);
        const size_t P = model.num_params;
        upload_to(model.master, random_float(rng, P, -0.5, 0.5));
        // step 0 (AdamW at half its peak in its warm-up, Muon at its peak and momentum 0.85), then step 150 of
        // 300 (both decaying, the momentum 0.9, AdamW's moments and Muon's momentum carried over)
        const Schedule schedule{LrSchedule::Linear, 0.1, 0.0, 2, 300};
        const OptimizerConfig& o = model.optim;
        std::vector<double> m(P, 0.0), v(P, 0.0);
        int muon_count = 0, adamw_count = 0;
        for (int step : {0, 150}) {
            const std::vector<float> master = download_from(model.master, P), grads = random_float(rng, P, -1, 1);
            upload_to(model.grads, grads);
            const std::vector<double> g = to_doubles(grads);
            const double norm = ref::global_norm(g.data(), P), max_norm = 0.5 * norm, clip = max_norm / norm;
            model_update(&model, schedule, (float)max_norm, step);
            sync_after("model_update");

            std::vector<double> w = to_doubles(master);  // the reference steps from the GPU's weights
            std::vector<int> muon_tensor(model.tensors.size(), 0);
            for (const MuonMatrix& mm : model.muon_matrices) {
                const size_t off = model.offsets[mm.first_tensor], per = (size_t)mm.rows * mm.cols;
                const double peak = o.lr_matrix * (k.mup == MupScope::All ? mup_factor(64) : 1.0);
                const double mu = mm.routed_experts && !k.expert_momentum_warmup ? o.momentum_end
                                                                                 : muon_momentum(o, step);
                for (int b = 0; b < mm.batch; b++)
                    ref::muon_update<double>(&w[off + b * per], &m[off + b * per], &g[off + b * per], (int)mm.rows,
                                             (int)mm.cols, (double)(float)(peak * schedule.factor(step, false)),
                                             (double)(float)mu, (double)(float)o.weight_decay, clip, o.ns_steps, NS_A,
                                             NS_B, NS_C, NS_EPS);
                for (int i = 0; i < mm.tensor_count; i++) muon_tensor[mm.first_tensor + i] = 1;
            }
            for (size_t i = 0; i < model.tensors.size(); i++) {
                if (muon_tensor[i]) continue;
                const ParamRole role = param_role(model.tensors[i]);
                const double peak = (role == ParamRole::Embedding ? o.lr_embedding : o.lr_head) * mup_factor(64);
                const size_t off = model.offsets[i];
                const double wd = model.tensors[i].decays() ? (double)(float)o.weight_decay : 0.0;
                ref::adamw_update(&w[off], &m[off], &v[off], &g[off], (size_t)model.tensors[i].numel(),
                                  (double)(float)(peak * schedule.factor(step, true)), (double)(float)o.beta1,
                                  (double)(float)o.beta2, (double)(float)o.eps, wd, step + 1, clip);
            }
            const std::vector<float> got = download_from(model.master, P);
            for (size_t i = 0; i < model.tensors.size(); i++) {
                const size_t off = model.offsets[i], n = (size_t)model.tensors[i].numel();
                std::vector<double> step_gpu(n), step_ref(n);
                for (size_t j = 0; j < n; j++) {
                    step_gpu[j] = (double)got[off + j] - master[off + j];
                    step_ref[j] = w[off + j] - master[off + j];
                }
                const std::string what = string_format("%s, step %d: %s (%s) weight step", k.name, step,
                                                       model.tensors[i].name.c_str(), muon_tensor[i] ? "muon" : "adamw");
                check_close(t, what, step_gpu, step_ref, muon_tensor[i] ? TOL_MUON : TOL_FP32);
                if (step == 0) (muon_tensor[i] ? muon_count : adamw_count)++;
            }
        }
        const bool router_adamw = k.experts > 0 && k.router_group == RouterGroup::AdamW;
        const int want_adamw = 2 + (router_adamw ? c.n_layer - 1 : 0);
        CHECK(t, adamw_count == want_adamw, "%s: %d tensors trained by AdamW, expected %d", k.name, adamw_count,
              want_adamw);
        CHECK(t, muon_count > 0, "%s: no tensor trained by Muon", k.name);
        model_free(&model);
    }
}

// --newton-schulz IN OUT BATCH ROWS COLS: X / ||X||_F, then five steps, as
// muon_step computes them (a momentum of 0 makes its X the gradient itself),
// read back from the workspace in the matrix's own orientation.
static int newton_schulz_on_files(const char* in, const char* out, int batch, int rows, int cols) {
    const size_t n = (size_t)batch * rows * cols;
    std::vector<float> host(n);
    FILE* f = fopen(in, "rb");
    if (!f || fread(host.data(), sizeof(float), n, f) != n) fail("%s: cannot read %zu fp32 values", in, n);
    fclose(f);
    GpuInfo gpu;
    const std::string err = gpu_open(0, &gpu);
    if (!err.empty()) fail("%s", err.c_str());
    cublasCheck(cublasCreate(&g_cublas));
    std::vector<MuonMatrix> shape = {{"test", 0, 1, rows, cols, batch}};
    MuonWorkspace ws;
    ws.allocate(shape);
    DeviceBuffer<float> d_master(std::vector<float>(n, 0.0f)), d_m(std::vector<float>(n, 0.0f)), d_grads(host);
    DeviceBuffer<float> d_clip(std::vector<float>{1.0f});
    DeviceBuffer<floatX> d_params(n);
    // mu = 0: x = g; lr = -1, scale divided out below: master = scale * X
    muon_step(g_cublas, ws, d_master.ptr, d_params.ptr, d_m.ptr, d_grads.ptr, rows, cols, batch, -1.0f, 0.0f, 0.0f, 5,
              d_clip.ptr);
    std::vector<float> result = d_master.download();
    const float scale = (float)muon_scale(rows, cols);
    for (float& x : result) x /= scale;
    f = fopen(out, "wb");
    if (!f || fwrite(result.data(), sizeof(float), n, f) != n || fclose(f) != 0) fail("%s: cannot write", out);
    ws.release();
    return 0;
}

int main(int argc, char** argv) {
    if (argc == 7 && std::string(argv[1]) == "--newton-schulz")
        return newton_schulz_on_files(argv[2], argv[3], atoi(argv[4]), atoi(argv[5]), atoi(argv[6]));
    if (argc != 1) fail("usage: %s [--newton-schulz IN OUT BATCH ROWS COLS]", argv[0]);
    return run_gpu_tests("gpu_optimizer", {
        GPU_TEST(muon_step),
        GPU_TEST(muon_determinism),
        GPU_TEST(model_update_groups),
    });
}
