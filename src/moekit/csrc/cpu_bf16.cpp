// bf16 grouped GEMMs for the fused CPU expert path on AVX-512 BF16 (vdpbf16ps).
//
// Same contract as grouped_mm_out / grouped_mm_weight_out in cpu_experts.cpp
// (bf16 in, bf16 out), but the GEMMs are a hand micro-kernel instead of aten's
// bf16 mm, whose per-call cost dominates the small GEMMs of a fine-grained MoE:
// single-threaded, 32 x 512 @ 512 x 512 took 211 us in aten (79 GFLOP/s)
// against ~200 GFLOP/s for 512-row GEMMs (2-core AMD EPYC, torch 2.13). This
// kernel reaches 180-210 GFLOP/s from 32 rows on (1 thread, CPU time): 1.5-3x
// aten at 32-64 rows, 1.0-1.3x at 512 rows, for x @ W, x @ W^T and a^T @ b.
// No AMX here (lscpu: avx512_bf16, no amx_tile), so no AMX tiles.
//
// vdpbf16ps multiplies pairs of bf16 along the reduction (k, k+1) and adds both
// products into one fp32 lane. So B is packed into "pair rows":
// Bp[p][n] = (B[2p][n], B[2p+1][n]) as one 32-bit word, 16 columns per vector,
// and A is read as 32-bit pairs broadcast to every lane. Accumulation is fp32;
// a product is rounded to bf16 once, when it is stored.
//
// Every function carries a target attribute, so this file builds with the
// default flags and runs nowhere it should not: available() checks the CPU
// at run time, and the Python side keeps aten's mm as the fallback.
//
// Shape letters: N rows sorted by expert, X input width, Y output width,
// B experts of the call; ends[i] is the end row of expert i (cumulative);
// P pairs of the reduction dimension (ceil(K / 2)).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#define MOEKIT_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

using bf16_t = uint16_t;

constexpr int kMaxRows = 6;   // MR: rows of the micro-kernel
constexpr int kVectors = 4;   // NV: 16-column vectors of the micro-kernel (64 columns)
constexpr int64_t kCols = 16 * kVectors;
constexpr int64_t kPairChunk = 256;  // pairs of the reduction per packed panel (512 k)

// ---- the micro-kernel ----------------------------------------------------------
//
// C[MR x 16 NV] (fp32, row stride ldc) (+)= sum over p of A(m, p) . Bp[p][16 NV]
// A(m, p) is the 32-bit pair at a[m * sam + p * sap]. 6 x 64: 24 accumulators,
// 4 B vectors and a broadcast stay in the 32 zmm registers.

template <int MR, int NV>
MOEKIT_BF16 void micro(const int32_t* a, int64_t sam, int64_t sap, const int32_t* bp,
                       int64_t P, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = accumulate ? _mm512_loadu_ps(c + m * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(bp + p * 16 * NV + 16 * v);
    for (int m = 0; m < MR; ++m) {
      const __m512i am = _mm512_set1_epi32(a[m * sam + p * sap]);
      for (int v = 0; v < NV; ++v)
        acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)am, (__m512bh)b[v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + m * ldc + 16 * v, acc[m][v]);
}

using MicroFn = void (*)(const int32_t*, int64_t, int64_t, const int32_t*, int64_t, float*,
                         int64_t, bool);

template <int MR>
MicroFn pick_nv(int nv) {
  switch (nv) {
    case 1: return micro<MR, 1>;
    case 2: return micro<MR, 2>;
    case 3: return micro<MR, 3>;
    default: return micro<MR, 4>;
  }
}

MicroFn pick(int mr, int nv) {
  switch (mr) {
    case 1: return pick_nv<1>(nv);
    case 2: return pick_nv<2>(nv);
    case 3: return pick_nv<3>(nv);
    case 4: return pick_nv<4>(nv);
    case 5: return pick_nv<5>(nv);
    default: return pick_nv<6>(nv);
  }
}

// C[rows x 16 nv] (+)= A(rows, P pairs) . Bp panel (P x 16 nv), MR rows at a time.
void panel_gemm(const int32_t* a, int64_t sam, int64_t sap, const int32_t* bp, int64_t P,
                int64_t rows, int nv, float* c, int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < rows; m += kMaxRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, rows - m));
    pick(mr, nv)(a + m * sam, sam, sap, bp, P, c + m * ldc, ldc, accumulate);
  }
}

// ---- packing -------------------------------------------------------------------

inline int32_t pair(bf16_t lo, bf16_t hi) {
  return static_cast<int32_t>(static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16));
}

// dst[p][j] = (src[k0 + 2p][j], src[k0 + 2p + 1][j]) for j < cols, 0 past cols up to
// width (a multiple of 16); k past k1 reads as 0. src is [k][j] with strides (sk, sj).
MOEKIT_BF16 void pack_pairs(const bf16_t* src, int64_t sk, int64_t sj, int64_t k0, int64_t k1,
                            int64_t cols, int64_t width, int32_t* dst) {
  const int64_t P = (k1 - k0 + 1) / 2;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t k = k0 + 2 * p;
    const bf16_t* lo = src + k * sk;
    const bf16_t* hi = k + 1 < k1 ? lo + sk : nullptr;
    int32_t* out = dst + p * width;
    if (sj == 1) {
      for (int64_t j = 0; j < width; j += 16) {
        const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, cols - j));
        const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
        const __m512i l = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, lo + j));
        const __m512i h = hi ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, hi + j))
                             : _mm512_setzero_si512();
        _mm512_storeu_si512(out + j, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) out[j] = pair(lo[j * sj], hi ? hi[j * sj] : 0);
      for (int64_t j = cols; j < width; ++j) out[j] = 0;
    }
  }
}

// dst[k][i] = r[i][k] for a 16 x 16 block of 32-bit words (row i at src + i * ss,
// dst rows ds apart): unpack 32-bit, unpack 64-bit, then two 128-bit lane shuffles.
MOEKIT_BF16 void transpose16(const int32_t* src, int64_t ss, int32_t* dst, int64_t ds) {
  __m512i r[16], t[16], u[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * ss);
  for (int q = 0; q < 8; ++q) {
    t[2 * q] = _mm512_unpacklo_epi32(r[2 * q], r[2 * q + 1]);
    t[2 * q + 1] = _mm512_unpackhi_epi32(r[2 * q], r[2 * q + 1]);
  }
  // u[4g + c], 128-bit lane l: column 4l + c of rows 4g .. 4g + 3
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    _mm512_storeu_si512(dst + (0 + c) * ds, _mm512_shuffle_i32x4(x0, y0, 0x88));
    _mm512_storeu_si512(dst + (4 + c) * ds, _mm512_shuffle_i32x4(x0, y0, 0xDD));
    _mm512_storeu_si512(dst + (8 + c) * ds, _mm512_shuffle_i32x4(x1, y1, 0x88));
    _mm512_storeu_si512(dst + (12 + c) * ds, _mm512_shuffle_i32x4(x1, y1, 0xDD));
  }
}

// The same panel from a source whose reduction dimension is contiguous
// (sk == 1, a transposed weight): pair p of column j is the 32-bit word p of
// row j, so the panel is a 32-bit transpose, 16 x 16 blocks at a time. One
// 32-bit copy per pair instead made 32 x 512 @ (1024 x 512)^T 0.89x as fast as
// aten's mm; blocked, 1.53x (single thread, CPU time, median of 15 A/B pairs).
void pack_pairs_kmajor(const bf16_t* src, int64_t sj, int64_t k0, int64_t k1, int64_t cols,
                       int64_t width, int32_t* dst) {
  const int64_t P = (k1 - k0 + 1) / 2, full = (k1 - k0) / 2;
  const bool words = sj % 2 == 0 && (reinterpret_cast<uintptr_t>(src + k0) % 4) == 0;
  const int64_t jb = words ? cols / 16 * 16 : 0, pb = words ? full / 16 * 16 : 0;
  for (int64_t j = 0; j < jb; j += 16)
    for (int64_t p = 0; p < pb; p += 16)
      transpose16(reinterpret_cast<const int32_t*>(src + j * sj + k0) + p, sj / 2,
                  dst + p * width + j, width);
  for (int64_t j = 0; j < cols; ++j) {
    const bf16_t* col = src + j * sj + k0;
    for (int64_t p = j < jb ? pb : 0; p < full; ++p)
      std::memcpy(dst + p * width + j, col + 2 * p, 4);
    if (full < P) dst[full * width + j] = pair(col[2 * full], 0);
  }
  for (int64_t p = 0; p < P; ++p)
    for (int64_t j = cols; j < width; ++j) dst[p * width + j] = 0;
}

void pack_b(const bf16_t* src, int64_t sk, int64_t sj, int64_t k0, int64_t k1, int64_t cols,
            int64_t width, int32_t* dst) {
  if (sk == 1 && sj != 1) pack_pairs_kmajor(src, sj, k0, k1, cols, width, dst);
  else pack_pairs(src, sk, sj, k0, k1, cols, width, dst);
}

// ---- fp32 -> bf16 --------------------------------------------------------------

inline bf16_t to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((u >> 16) | 0x40);
  return static_cast<bf16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// dst[r][j] = bf16(c[r][j]) for a rows x cols tile; dst strides (sr, sj).
MOEKIT_BF16 void store_bf16(const float* c, int64_t ldc, int64_t rows, int64_t cols,
                            bf16_t* dst, int64_t sr, int64_t sj) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* cr = c + r * ldc;
    bf16_t* d = dst + r * sr;
    if (sj == 1) {
      for (int64_t j = 0; j < cols; j += 16) {
        const int64_t n = std::min<int64_t>(16, cols - j);
        const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
        const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, cr + j));
        _mm256_mask_storeu_epi16(d + j, mask, (__m256i)v);
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) d[j * sj] = to_bf16(cr[j]);
    }
  }
}

// ---- tasks ---------------------------------------------------------------------

struct Task {
  int64_t expert, r0, r1, c0, c1;  // output rows [r0, r1) and columns [c0, c1)
  double cost;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One expert's output cut into pieces of about `target` cost: columns first
// (multiples of 64, the panel width), then rows (at least `min_rows` each).
void cut(std::vector<Task>& tasks, int64_t expert, int64_t r0, int64_t r1, int64_t cols,
         double work, double target, int64_t min_rows) {
  const int64_t rows = r1 - r0;
  const double cost = static_cast<double>(rows) * cols * work;
  const int64_t pieces = std::max<int64_t>(1, static_cast<int64_t>(cost / target + 0.5));
  const int64_t col_pieces = std::min(pieces, std::max<int64_t>(1, cols / kCols));
  const int64_t row_pieces =
      std::min(ceil_div(pieces, col_pieces), std::max<int64_t>(1, rows / min_rows));
  const int64_t col_step = ceil_div(ceil_div(cols, col_pieces), kCols) * kCols;
  const int64_t row_step = ceil_div(rows, row_pieces);
  for (int64_t r = r0; r < r1; r += row_step) {
    for (int64_t c = 0; c < cols; c += col_step) {
      const int64_t re = std::min(r1, r + row_step), ce = std::min(cols, c + col_step);
      tasks.push_back({expert, r, re, c, ce, static_cast<double>(re - r) * (ce - c) * work});
    }
  }
}

double target_cost(const std::vector<int64_t>& ends, double work_per_row) {
  const double total = ends.empty() ? 0.0 : ends.back() * work_per_row;
  return std::max(total / (4.0 * at::get_num_threads()), 32.0 * 64 * 512);
}

// Per-thread scratch: packed panels and the fp32 tile, grown on demand and kept
// (a fresh buffer per task page-faults on every call).
struct Scratch {
  std::vector<int32_t> a, b;
  std::vector<float> c;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// Largest task first, each thread taking the next when it finishes one (as in
// cpu_experts.cpp). Each task writes its own output tile.
template <typename F>
void run(std::vector<Task> tasks, const F& body) {
  if (tasks.empty()) return;
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
  const int64_t n = static_cast<int64_t>(tasks.size());
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
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
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16, got ",
              t.scalar_type());
}

void check_ends(const std::vector<int64_t>& ends, int64_t experts, int64_t rows) {
  TORCH_CHECK(static_cast<int64_t>(ends.size()) == experts, "ends has ", ends.size(),
              " entries for ", experts, " experts");
  TORCH_CHECK(ends.empty() || ends.back() <= rows, "ends.back()=", ends.back(),
              " exceeds the ", rows, " rows");
}

const bf16_t* ptr(const torch::Tensor& t) {
  return reinterpret_cast<const bf16_t*>(t.data_ptr<at::BFloat16>());
}

// A rows [r0, r1) of a [N, X] as 32-bit pairs: the tensor itself where rows are
// contiguous with an even width and stride, else packed into `buf`.
const int32_t* a_pairs(const torch::Tensor& a, int64_t r0, int64_t r1, std::vector<int32_t>& buf,
                       int64_t* sam) {
  const int64_t X = a.size(1), P = (X + 1) / 2;
  const bf16_t* base = ptr(a) + r0 * a.stride(0);
  if (a.stride(1) == 1 && X % 2 == 0 && a.stride(0) % 2 == 0 &&
      reinterpret_cast<uintptr_t>(base) % 4 == 0) {
    *sam = a.stride(0) / 2;
    return reinterpret_cast<const int32_t*>(base);
  }
  int32_t* out = grow(buf, (r1 - r0) * P);
  for (int64_t r = 0; r < r1 - r0; ++r)
    for (int64_t p = 0; p < P; ++p) {
      const bf16_t* row = base + r * a.stride(0);
      out[r * P + p] = pair(row[2 * p * a.stride(1)],
                            2 * p + 1 < X ? row[(2 * p + 1) * a.stride(1)] : 0);
    }
  *sam = P;
  return out;
}

}  // namespace

// True where the CPU (and the OS) run AVX-512 BF16.
bool bf16_available() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

// out_NY[rows of expert i] = a_NX[rows of expert i] @ b_BXY[i], bf16, fp32
// accumulation. b_BXY may be any strided view (a transposed weight). Rows past
// ends.back() are untouched.
void bf16_grouped_mm_out(const torch::Tensor& a_NX, const torch::Tensor& b_BXY,
                         const std::vector<int64_t>& ends, torch::Tensor& out_NY) {
  check(a_NX, "a_NX", 2);
  check(b_BXY, "b_BXY", 3);
  check(out_NY, "out_NY", 2);
  TORCH_CHECK(bf16_available(), "this CPU has no AVX-512 BF16");
  check_ends(ends, b_BXY.size(0), a_NX.size(0));
  const int64_t X = a_NX.size(1), Y = b_BXY.size(2), P = (X + 1) / 2;
  TORCH_CHECK(b_BXY.size(1) == X && out_NY.size(1) == Y, "shapes a ", a_NX.sizes(), ", b ",
              b_BXY.sizes(), ", out ", out_NY.sizes(), " do not chain");
  const auto starts = starts_of(ends);
  const double target = target_cost(ends, double(X) * Y);
  std::vector<Task> tasks;
  for (size_t i = 0; i < ends.size(); ++i)
    if (ends[i] > starts[i]) cut(tasks, i, starts[i], ends[i], Y, X, target, 16);
  const bf16_t* b = ptr(b_BXY);
  bf16_t* out = reinterpret_cast<bf16_t*>(out_NY.data_ptr<at::BFloat16>());
  run(std::move(tasks), [&](const Task& t) {
    Scratch& s = scratch();
    const int64_t rows = t.r1 - t.r0;
    int64_t sam;
    const int32_t* a = a_pairs(a_NX, t.r0, t.r1, s.a, &sam);
    int32_t* bp = grow(s.b, P * kCols);
    float* c = grow(s.c, rows * kCols);
    const bf16_t* be = b + t.expert * b_BXY.stride(0);
    for (int64_t c0 = t.c0; c0 < t.c1; c0 += kCols) {
      const int64_t cols = std::min(kCols, t.c1 - c0);
      const int nv = static_cast<int>(ceil_div(cols, 16));
      pack_b(be + c0 * b_BXY.stride(2), b_BXY.stride(1), b_BXY.stride(2), 0, X, cols, 16 * nv,
             bp);
      panel_gemm(a, sam, 1, bp, P, rows, nv, c, 16 * nv, false);
      store_bf16(c, 16 * nv, rows, cols, out + t.r0 * out_NY.stride(0) + c0 * out_NY.stride(1),
                 out_NY.stride(0), out_NY.stride(1));
    }
  });
}

// out_BXY[i] = a_NX[rows of expert i]^T @ b_NY[rows of expert i], bf16 with the
// whole reduction over the expert's rows in fp32; the slices of experts without
// rows are untouched. out_BXY may be any strided view.
void bf16_grouped_mm_weight_out(const torch::Tensor& a_NX, const torch::Tensor& b_NY,
                                const std::vector<int64_t>& ends, torch::Tensor& out_BXY) {
  check(a_NX, "a_NX", 2);
  check(b_NY, "b_NY", 2);
  check(out_BXY, "out_BXY", 3);
  TORCH_CHECK(bf16_available(), "this CPU has no AVX-512 BF16");
  check_ends(ends, out_BXY.size(0), std::min(a_NX.size(0), b_NY.size(0)));
  const int64_t X = a_NX.size(1), Y = b_NY.size(1);
  TORCH_CHECK(out_BXY.size(1) == X && out_BXY.size(2) == Y, "out_BXY ", out_BXY.sizes(),
              " must be [", ends.size(), ", ", X, ", ", Y, "]");
  const auto starts = starts_of(ends);
  const double target = target_cost(ends, double(X) * Y);
  std::vector<Task> tasks;
  for (size_t i = 0; i < ends.size(); ++i) {
    const int64_t n = ends[i] - starts[i];
    if (n > 0) cut(tasks, i, 0, X, Y, static_cast<double>(n), target, 64);
  }
  const bf16_t *a = ptr(a_NX), *b = ptr(b_NY);
  bf16_t* out = reinterpret_cast<bf16_t*>(out_BXY.data_ptr<at::BFloat16>());
  run(std::move(tasks), [&](const Task& t) {
    Scratch& s = scratch();
    const int64_t s0 = starts[t.expert], n = ends[t.expert] - s0;
    const int64_t rows = t.r1 - t.r0, width = t.c1 - t.c0;
    const int64_t ldc = ceil_div(width, kCols) * kCols;
    float* c = grow(s.c, rows * ldc);
    const int64_t lda = ceil_div(rows, 16) * 16;  // pack_pairs writes whole vectors
    int32_t* ap = grow(s.a, kPairChunk * lda);
    int32_t* bp = grow(s.b, kPairChunk * kCols);
    // the reduction (the expert's rows) in chunks of 2 * kPairChunk rows, A^T packed once
    // per chunk as ap[p][x] and reused by every column panel
    for (int64_t k0 = 0; k0 < n; k0 += 2 * kPairChunk) {
      const int64_t k1 = std::min(n, k0 + 2 * kPairChunk), P = (k1 - k0 + 1) / 2;
      const bf16_t* ak = a + s0 * a_NX.stride(0) + t.r0 * a_NX.stride(1);
      pack_pairs(ak, a_NX.stride(0), a_NX.stride(1), k0, k1, rows, lda, ap);
      for (int64_t c0 = 0; c0 < width; c0 += kCols) {
        const int64_t cols = std::min(kCols, width - c0);
        const int nv = static_cast<int>(ceil_div(cols, 16));
        const bf16_t* bk = b + s0 * b_NY.stride(0) + (t.c0 + c0) * b_NY.stride(1);
        pack_pairs(bk, b_NY.stride(0), b_NY.stride(1), k0, k1, cols, 16 * nv, bp);
        panel_gemm(ap, 1, lda, bp, P, rows, nv, c + c0, ldc, k0 > 0);
      }
    }
    bf16_t* o = out + t.expert * out_BXY.stride(0) + t.r0 * out_BXY.stride(1) +
                t.c0 * out_BXY.stride(2);
    store_bf16(c, ldc, rows, width, o, out_BXY.stride(1), out_BXY.stride(2));
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &bf16_available, "True where the CPU runs AVX-512 BF16");
  m.def("grouped_mm_out", &bf16_grouped_mm_out,
        "out[rows of i] = a[rows of i] @ b[i], bf16 on AVX-512 BF16, parallel over experts");
  m.def("grouped_mm_weight_out", &bf16_grouped_mm_weight_out,
        "out[i] = a[rows of i]^T @ b[rows of i], bf16 on AVX-512 BF16, fp32 reduction");
}
