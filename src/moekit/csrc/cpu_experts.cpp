// Grouped GEMMs for the fused CPU expert path, parallel over experts.
//
// A fine-grained MoE runs hundreds of small GEMMs (32 rows x 512 x 512 at
// T=256, E=64, K=8). Run one at a time, each is split across every thread and
// pays a parallel region per call; here every GEMM runs on one thread and the
// threads take different experts (or tiles of one expert's output), cut into
// tasks of about equal cost and handed out largest first to whichever thread
// is free. Inside the at::parallel_for region aten's mm (MKL on x86) runs
// single-threaded.
//
// Built on first use by moekit/functions/cpu_ext.py (torch.utils.cpp_extension,
// -fopenmp: at::parallel_for is an inline OpenMP region).
//
// Shape letters: N rows sorted by expert, X input width, Y output width,
// B experts of the call; ends[i] is the end row of expert i (cumulative).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

struct Task {
  int64_t expert, r0, r1, c0, c1;  // output rows [r0, r1) and columns [c0, c1)
  double cost;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Cuts one expert's output (rows x cols, cost per element `work`) into pieces
// of about `target` cost: columns first (in multiples of 64, so the GEMM keeps
// all of its rows), then rows (at least `min_rows` each).
void cut(std::vector<Task>& tasks, int64_t expert, int64_t r0, int64_t r1, int64_t cols,
         double work, double target, int64_t min_rows) {
  const int64_t rows = r1 - r0;
  const double cost = static_cast<double>(rows) * cols * work;
  int64_t pieces = std::max<int64_t>(1, static_cast<int64_t>(cost / target + 0.5));
  const int64_t col_pieces = std::min(pieces, std::max<int64_t>(1, cols / 64));
  const int64_t row_pieces =
      std::min(ceil_div(pieces, col_pieces), std::max<int64_t>(1, rows / min_rows));
  const int64_t col_step = ceil_div(ceil_div(cols, col_pieces), 16) * 16;
  const int64_t row_step = ceil_div(rows, row_pieces);
  for (int64_t r = r0; r < r1; r += row_step) {
    for (int64_t c = 0; c < cols; c += col_step) {
      const int64_t re = std::min(r1, r + row_step), ce = std::min(cols, c + col_step);
      tasks.push_back({expert, r, re, c, ce, static_cast<double>(re - r) * (ce - c) * work});
    }
  }
}

// Runs `body(task)` for every task: largest first, each thread taking the
// next task when it finishes one. Measured against contiguous runs of equal
// estimated cost per thread (one A/B median each, fwd+bwd of the MoE layer):
// 0.977x the time at T=4096/E=128/K=8, 0.976x at T=4096/E=8/K=2, 1.009x at
// T=256/E=64/K=8. Each task writes its own output tile with one
// single-threaded GEMM, so results do not depend on which thread ran it.
template <typename F>
void run(std::vector<Task> tasks, const F& body) {
  if (tasks.empty()) return;
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
  const int64_t n = static_cast<int64_t>(tasks.size());
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    // grad mode is thread-local and the pool's threads do not inherit the
    // caller's no_grad: go straight to the CPU kernels (no autograd recording)
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = next++; i < n; i = next++) body(tasks[i]);
  });
}

std::vector<int64_t> starts_of(const std::vector<int64_t>& ends) {
  std::vector<int64_t> starts(ends.size());
  for (size_t i = 0; i < ends.size(); ++i) starts[i] = i ? ends[i - 1] : 0;
  return starts;
}

void check(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.sizes());
}

// `ends` has one entry per expert and stays within `rows`.
void check_ends(const std::vector<int64_t>& ends, int64_t experts, int64_t rows) {
  TORCH_CHECK(static_cast<int64_t>(ends.size()) == experts, "ends has ", ends.size(),
              " entries for ", experts, " experts");
  TORCH_CHECK(ends.empty() || ends.back() <= rows, "ends.back()=", ends.back(),
              " exceeds the ", rows, " rows");
}

// The cost one task should have: about 4 tasks per thread, none smaller than
// 32 x 64 x 512 multiply-adds; `work_per_row` multiply-adds per routed row.
double target_cost(const std::vector<int64_t>& ends, double work_per_row) {
  const double total = ends.empty() ? 0.0 : ends.back() * work_per_row;
  return std::max(total / (4.0 * at::get_num_threads()), 32.0 * 64 * 512);
}

}  // namespace

// Tasks of about equal cost over the experts' output tiles; body(a, b_i, out) runs
// one tile's GEMM. Shared by the stacked and the list form below.
template <typename B>
void grouped_mm_tiles(const torch::Tensor& a_NX, const B& b_of, int64_t Y,
                      const std::vector<int64_t>& ends, torch::Tensor& out_NY) {
  const auto starts = starts_of(ends);
  const double target = target_cost(ends, double(a_NX.size(1)) * Y);
  std::vector<Task> tasks;
  for (size_t i = 0; i < ends.size(); ++i) {
    if (ends[i] > starts[i]) cut(tasks, i, starts[i], ends[i], Y, a_NX.size(1), target, 16);
  }
  run(std::move(tasks), [&](const Task& t) {
    auto out = out_NY.narrow(0, t.r0, t.r1 - t.r0).narrow(1, t.c0, t.c1 - t.c0);
    at::mm_out(out, a_NX.narrow(0, t.r0, t.r1 - t.r0),
               b_of(t.expert).narrow(1, t.c0, t.c1 - t.c0));
  });
}

// out_NY[rows of expert i] = a_NX[rows of expert i] @ b_BXY[i]. b_BXY may be
// any strided view (a transposed weight). Rows past ends.back() are untouched.
void grouped_mm_out(const torch::Tensor& a_NX, const torch::Tensor& b_BXY,
                    const std::vector<int64_t>& ends, torch::Tensor& out_NY) {
  check(a_NX, "a_NX", 2);
  check(b_BXY, "b_BXY", 3);
  check(out_NY, "out_NY", 2);
  check_ends(ends, b_BXY.size(0), a_NX.size(0));
  const int64_t X = a_NX.size(1), Y = b_BXY.size(2);
  TORCH_CHECK(b_BXY.size(1) == X && out_NY.size(1) == Y, "shapes a ", a_NX.sizes(), ", b ",
              b_BXY.sizes(), ", out ", out_NY.sizes(), " do not chain");
  grouped_mm_tiles(a_NX, [&](int64_t i) { return b_BXY.select(0, i); }, Y, ends, out_NY);
}

// The same with expert i's matrix as b_XY[i] (any strides): for a caller that holds
// experts apart (the expert cache), which would otherwise stack copies of them. The
// tiles and their GEMMs are those of grouped_mm_out, so the results are bitwise its.
void grouped_mm_list_out(const torch::Tensor& a_NX, const std::vector<torch::Tensor>& b_XY,
                         const std::vector<int64_t>& ends, torch::Tensor& out_NY) {
  check(a_NX, "a_NX", 2);
  check(out_NY, "out_NY", 2);
  check_ends(ends, static_cast<int64_t>(b_XY.size()), a_NX.size(0));
  const int64_t X = a_NX.size(1), Y = out_NY.size(1);
  for (const auto& b : b_XY) {
    check(b, "b_XY[i]", 2);
    TORCH_CHECK(b.size(0) == X && b.size(1) == Y && b.scalar_type() == a_NX.scalar_type(),
                "b_XY[i] must be [", X, ", ", Y, "] of ", a_NX.scalar_type(), ", got ",
                b.sizes(), " of ", b.scalar_type());
  }
  grouped_mm_tiles(a_NX, [&](int64_t i) { return b_XY[i]; }, Y, ends, out_NY);
}

// out_BXY[i] = a_NX[rows of expert i]^T @ b_NY[rows of expert i], for the
// experts with rows; the slices of experts without rows are untouched.
void grouped_mm_weight_out(const torch::Tensor& a_NX, const torch::Tensor& b_NY,
                           const std::vector<int64_t>& ends, torch::Tensor& out_BXY) {
  check(a_NX, "a_NX", 2);
  check(b_NY, "b_NY", 2);
  check(out_BXY, "out_BXY", 3);
  check_ends(ends, out_BXY.size(0), std::min(a_NX.size(0), b_NY.size(0)));
  const int64_t X = a_NX.size(1), Y = b_NY.size(1);
  TORCH_CHECK(out_BXY.size(1) == X && out_BXY.size(2) == Y, "out_BXY ", out_BXY.sizes(),
              " must be [", ends.size(), ", ", X, ", ", Y, "]");
  const auto starts = starts_of(ends);
  const double target = target_cost(ends, double(X) * Y);
  std::vector<Task> tasks;
  for (size_t i = 0; i < ends.size(); ++i) {
    const int64_t n = ends[i] - starts[i];
    if (n == 0) continue;
    // tiles of the X x Y output; the reduction over the expert's n rows stays whole
    cut(tasks, i, 0, X, Y, static_cast<double>(n), target, 64);
  }
  run(std::move(tasks), [&](const Task& t) {
    const int64_t s = starts[t.expert], n = ends[t.expert] - s;
    auto out = out_BXY.select(0, t.expert).narrow(0, t.r0, t.r1 - t.r0).narrow(1, t.c0,
                                                                               t.c1 - t.c0);
    at::mm_out(out, a_NX.narrow(0, s, n).narrow(1, t.r0, t.r1 - t.r0).t(),
               b_NY.narrow(0, s, n).narrow(1, t.c0, t.c1 - t.c0));
  });
}

// ---- SwiGLU in one pass over the rows (fp32) ----------------------------------
//
// The fused path's activation, forward and backward, each one loop over h = [gate | up]
// instead of 2 (forward) and 5 (backward) aten passes: 0.65 vs 2.66 ms for the
// backward of 8192 x 128, 7.3 vs 20.7 ms for 8192 x 1024 (2 threads). exp is a
// polynomial the compiler vectorizes (relative error ~2e-7, as close to fp64
// as aten's silu); target_clones builds AVX-512, AVX2 and baseline versions.

namespace {

// exp(x) = 2^n * p(r), r = x - n ln2, a degree-6 polynomial (Cephes expf);
// branch-free so that loops over it vectorize. x is clamped to [-87, 88].
inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void swiglu_rows(const float* __restrict gate, const float* __restrict up,
                 float* __restrict a, int64_t F) {
  for (int64_t j = 0; j < F; ++j) {
    const float s = 1.0f / (1.0f + exp_poly(-gate[j]));
    a[j] = gate[j] * s * up[j];
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void swiglu_backward_rows(const float* __restrict gate, const float* __restrict up,
                          const float* __restrict da, float* __restrict a,
                          float* __restrict dgate, float* __restrict dup, int64_t F) {
  for (int64_t j = 0; j < F; ++j) {
    const float g = gate[j], s = 1.0f / (1.0f + exp_poly(-g)), sg = g * s;
    a[j] = sg * up[j];
    dup[j] = da[j] * sg;
    dgate[j] = da[j] * up[j] * s * (1.0f + g * (1.0f - s));  // silu'(g) = s (1 + g (1 - s))
  }
}

void check_rows(const torch::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  check(t, name, 2);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, name, " must be [", rows, ", ", cols,
              "], got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, name, " must have contiguous rows, got strides ", t.strides());
}

}  // namespace

// a_NF = silu(gate) * up for h_NG = [gate | up] (gate first), float32.
void swiglu_out(const torch::Tensor& h_NG, torch::Tensor& a_NF) {
  const int64_t N = h_NG.size(0), F = a_NF.size(1);
  check_rows(h_NG, "h_NG", N, 2 * F);
  check_rows(a_NF, "a_NF", N, F);
  const float* h = h_NG.data_ptr<float>();
  float* a = a_NF.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = h + r * h_NG.stride(0);
      swiglu_rows(g, g + F, a + r * a_NF.stride(0), F);
    }
  });
}

// From da_NF: a_NF = silu(gate) * up (the recomputed activation) and
// dh_NG = [da * up * silu'(gate) | da * silu(gate)], float32.
void swiglu_backward_out(const torch::Tensor& h_NG, const torch::Tensor& da_NF,
                         torch::Tensor& a_NF, torch::Tensor& dh_NG) {
  const int64_t N = h_NG.size(0), F = da_NF.size(1);
  check_rows(h_NG, "h_NG", N, 2 * F);
  check_rows(da_NF, "da_NF", N, F);
  check_rows(a_NF, "a_NF", N, F);
  check_rows(dh_NG, "dh_NG", N, 2 * F);
  const float* h = h_NG.data_ptr<float>();
  const float* da = da_NF.data_ptr<float>();
  float* a = a_NF.data_ptr<float>();
  float* dh = dh_NG.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = h + r * h_NG.stride(0);
      float* dg = dh + r * dh_NG.stride(0);
      swiglu_backward_rows(g, g + F, da + r * da_NF.stride(0), a + r * a_NF.stride(0), dg,
                           dg + F, F);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_mm_out", &grouped_mm_out,
        "out[rows of i] = a[rows of i] @ b[i], parallel over experts");
  m.def("grouped_mm_list_out", &grouped_mm_list_out,
        "grouped_mm_out with the experts' matrices as a list");
  m.def("grouped_mm_weight_out", &grouped_mm_weight_out,
        "out[i] = a[rows of i]^T @ b[rows of i], parallel over experts");
  m.def("swiglu_out", &swiglu_out, "a = silu(gate) * up, one pass, float32");
  m.def("swiglu_backward_out", &swiglu_backward_out,
        "a and dh of SwiGLU from da, one pass, float32");
}
