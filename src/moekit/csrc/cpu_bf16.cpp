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
MOEKIT_BF16 void micro(const int32_t* const* a, int64_t sap, const int32_t* bp, int64_t ldb,
                       int64_t P, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
  const int32_t* am_[MR];
  for (int m = 0; m < MR; ++m) am_[m] = a[m];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = accumulate ? _mm512_loadu_ps(c + m * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(bp + p * ldb + 16 * v);
    for (int m = 0; m < MR; ++m) {
      const __m512i am = _mm512_set1_epi32(am_[m][p * sap]);
      for (int v = 0; v < NV; ++v)
        acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)am, (__m512bh)b[v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + m * ldc + 16 * v, acc[m][v]);
}

using MicroFn = void (*)(const int32_t* const*, int64_t, const int32_t*, int64_t, int64_t,
                         float*, int64_t, bool);

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

// C[rows x 16 nv] (+)= A(rows, P pairs) . Bp panel (P x 16 nv, pair rows ldb apart), MR
// rows at a time; row m of A is the pairs at a[m][p * sap] (row pointers: a gather costs
// nothing here).
void panel_gemm(const int32_t* const* a, int64_t sap, const int32_t* bp, int64_t ldb,
                int64_t P, int64_t rows, int nv, float* c, int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < rows; m += kMaxRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, rows - m));
    pick(mr, nv)(a + m, sap, bp, ldb, P, c + m * ldc, ldc, accumulate);
  }
}

// ---- packing -------------------------------------------------------------------

inline int32_t pair(bf16_t lo, bf16_t hi) {
  return static_cast<int32_t>(static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16));
}

// dst[p][j] = (src[k0 + 2p][j], src[k0 + 2p + 1][j]) for j < cols, 0 past cols up to
// width (a multiple of 16); k past k1 reads as 0. src is [k][j] with strides (sk, sj);
// with `idx`, reduction row k is src row idx[k] (a gather of token rows).
MOEKIT_BF16 void pack_pairs(const bf16_t* src, int64_t sk, int64_t sj, int64_t k0, int64_t k1,
                            int64_t cols, int64_t width, int32_t* dst,
                            const int64_t* idx = nullptr) {
  const int64_t P = (k1 - k0 + 1) / 2;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t k = k0 + 2 * p;
    const bf16_t* lo = src + (idx ? idx[k] : k) * sk;
    const bf16_t* hi = k + 1 < k1 ? src + (idx ? idx[k + 1] : k + 1) * sk : nullptr;
    int32_t* out = dst + p * width;
    if (sj == 1) {
      // weight rows 64 ahead, to the cache: a fine-grained MoE's weights come from memory
      // on every call (32 MiB of w_in at E=64, F=256); 0.90-0.95x the time of the gate+up
      // and down kernels at T=256, unchanged at T=4096 (1 thread, 9 interleaved pairs)
      const int64_t ka = k + 64;
      if (ka + 1 < k1)
        for (int64_t j = 0; j < cols; j += 32) {
          _mm_prefetch(reinterpret_cast<const char*>(src + (idx ? idx[ka] : ka) * sk + j),
                       _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(src + (idx ? idx[ka + 1] : ka + 1) * sk + j),
                       _MM_HINT_T0);
        }
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
  std::vector<float> c, c2;
  std::vector<const int32_t*> rows;
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

// Tasks over every expert's rows (expert i: rows [ends[i-1], ends[i])) and `cols` output
// columns, `work` per output element, cut to about target_cost each.
std::vector<Task> row_tasks(const std::vector<int64_t>& ends, int64_t cols, double work) {
  const auto starts = starts_of(ends);
  const double target = target_cost(ends, cols * work);
  std::vector<Task> tasks;
  for (size_t i = 0; i < ends.size(); ++i)
    if (ends[i] > starts[i]) cut(tasks, i, starts[i], ends[i], cols, work, target, 16);
  return tasks;
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

// Row pointers (32-bit pairs, pair p at ptr[p]) to rows [r0, r1) of a [*, X] bf16,
// row r being a[idx[r]] with `idx` (a gather fused into the A load), else a[r]: the
// tensor itself where rows are contiguous with an even width and stride, else rows
// packed into `buf` (an odd width gets a zero pair at its end).
const int32_t* const* a_rows(const torch::Tensor& a, const int64_t* idx, int64_t r0, int64_t r1,
                             Scratch& s) {
  const int64_t X = a.size(1), P = (X + 1) / 2, n = r1 - r0;
  const int32_t** out = grow(s.rows, n);
  const bf16_t* base = ptr(a);
  const bool direct = a.stride(1) == 1 && X % 2 == 0 && a.stride(0) % 2 == 0 &&
                      reinterpret_cast<uintptr_t>(base) % 4 == 0;
  int32_t* buf = direct ? nullptr : grow(s.a, n * P);
  for (int64_t r = 0; r < n; ++r) {
    const bf16_t* row = base + (idx ? idx[r0 + r] : r0 + r) * a.stride(0);
    if (direct) {
      out[r] = reinterpret_cast<const int32_t*>(row);
      continue;
    }
    for (int64_t p = 0; p < P; ++p)
      buf[r * P + p] = pair(row[2 * p * a.stride(1)],
                            2 * p + 1 < X ? row[(2 * p + 1) * a.stride(1)] : 0);
    out[r] = buf + r * P;
  }
  return out;
}

// The int64 row index of a gather (nullptr without one); every entry must be < rows.
const int64_t* index_ptr(const std::optional<torch::Tensor>& idx, const char* name,
                         int64_t rows) {
  if (!idx.has_value()) return nullptr;
  const torch::Tensor& t = *idx;
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.scalar_type() == at::kLong &&
                  t.is_contiguous(), name, " must be a contiguous 1-d int64 CPU tensor, got ",
              t.scalar_type(), " ", t.sizes());
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.size(0); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < rows, name, "[", i, "]=", p[i], " is outside [0, ", rows,
                ")");
  return p;
}

// Task t's output columns kCols at a time: c [rows of t, kCols apart] = rows [t.r0, t.r1)
// of a (row r being a[idx[r]] with `idx`) @ columns c0.. of the expert's [X, *] weight
// b_e (strides sx, sc), then epilogue(c, c0, cols) for each panel.
template <typename F>
void panels(const Task& t, const torch::Tensor& a, const int64_t* idx, const bf16_t* b_e,
            int64_t sx, int64_t sc, const F& epilogue) {
  Scratch& s = scratch();
  const int64_t rows = t.r1 - t.r0, X = a.size(1), P = (X + 1) / 2;
  const int32_t* const* ar = a_rows(a, idx, t.r0, t.r1, s);
  int32_t* bp = grow(s.b, P * kCols);
  float* c = grow(s.c, rows * kCols);
  for (int64_t c0 = t.c0; c0 < t.c1; c0 += kCols) {
    const int64_t cols = std::min(kCols, t.c1 - c0);
    const int nv = static_cast<int>(ceil_div(cols, 16));
    pack_b(b_e + c0 * sc, sx, sc, 0, X, cols, 16 * nv, bp);
    panel_gemm(ar, 1, bp, 16 * nv, P, rows, nv, c, kCols, false);
    epilogue(c, c0, cols);
  }
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
  const int64_t X = a_NX.size(1), Y = b_BXY.size(2);
  TORCH_CHECK(b_BXY.size(1) == X && out_NY.size(1) == Y, "shapes a ", a_NX.sizes(), ", b ",
              b_BXY.sizes(), ", out ", out_NY.sizes(), " do not chain");
  std::vector<Task> tasks = row_tasks(ends, Y, X);
  const bf16_t* b = ptr(b_BXY);
  bf16_t* out = reinterpret_cast<bf16_t*>(out_NY.data_ptr<at::BFloat16>());
  run(std::move(tasks), [&](const Task& t) {
    panels(t, a_NX, nullptr, b + t.expert * b_BXY.stride(0), b_BXY.stride(1), b_BXY.stride(2),
           [&](const float* c, int64_t c0, int64_t cols) {
             store_bf16(c, kCols, t.r1 - t.r0, cols,
                        out + t.r0 * out_NY.stride(0) + c0 * out_NY.stride(1), out_NY.stride(0),
                        out_NY.stride(1));
           });
  });
}

// out_BXY[i] = a_NX[rows of expert i]^T @ b_NY[rows of expert i], bf16 with the
// whole reduction over the expert's rows in fp32; the slices of experts without
// rows are untouched. out_BXY may be any strided view. With a_idx (int64), row r
// of a is a_NX[a_idx[r]] (a gather of token rows fused into the packing); b_idx
// likewise for b.
void bf16_grouped_mm_weight_out(const torch::Tensor& a_NX, const torch::Tensor& b_NY,
                                const std::vector<int64_t>& ends, torch::Tensor& out_BXY,
                                const std::optional<torch::Tensor>& a_idx,
                                const std::optional<torch::Tensor>& b_idx) {
  check(a_NX, "a_NX", 2);
  check(b_NY, "b_NY", 2);
  check(out_BXY, "out_BXY", 3);
  TORCH_CHECK(bf16_available(), "this CPU has no AVX-512 BF16");
  const int64_t* ai = index_ptr(a_idx, "a_idx", a_NX.size(0));
  const int64_t* bi = index_ptr(b_idx, "b_idx", b_NY.size(0));
  check_ends(ends, out_BXY.size(0), std::min(ai ? a_idx->size(0) : a_NX.size(0),
                                             bi ? b_idx->size(0) : b_NY.size(0)));
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
    const int32_t** arow = grow(s.rows, rows);  // row m of A^T: ap[p][m], pairs lda apart
    for (int64_t m = 0; m < rows; ++m) arow[m] = ap + m;
    int32_t* bp = grow(s.b, kPairChunk * kCols);
    // the reduction (the expert's rows) in chunks of 2 * kPairChunk rows, A^T packed once
    // per chunk as ap[p][x] and reused by every column panel
    for (int64_t k0 = 0; k0 < n; k0 += 2 * kPairChunk) {
      const int64_t k1 = std::min(n, k0 + 2 * kPairChunk), P = (k1 - k0 + 1) / 2;
      const bf16_t* ak = a + (ai ? 0 : s0) * a_NX.stride(0) + t.r0 * a_NX.stride(1);
      pack_pairs(ak, a_NX.stride(0), a_NX.stride(1), k0, k1, rows, lda, ap, ai ? ai + s0 : ai);
      for (int64_t c0 = 0; c0 < width; c0 += kCols) {
        const int64_t cols = std::min(kCols, width - c0);
        const int nv = static_cast<int>(ceil_div(cols, 16));
        const bf16_t* bk = b + (bi ? 0 : s0) * b_NY.stride(0) + (t.c0 + c0) * b_NY.stride(1);
        pack_pairs(bk, b_NY.stride(0), b_NY.stride(1), k0, k1, cols, 16 * nv, bp,
                   bi ? bi + s0 : bi);
        panel_gemm(arow, lda, bp, 16 * nv, P, rows, nv, c + c0, ldc, k0 > 0);
      }
    }
    bf16_t* o = out + t.expert * out_BXY.stride(0) + t.r0 * out_BXY.stride(1) +
                t.c0 * out_BXY.stride(2);
    store_bf16(c, ldc, rows, width, o, out_BXY.stride(1), out_BXY.stride(2));
  });
}

// ---- fused GLU and combine ---------------------------------------------------------
//
// The layer around the GEMMs, fused into them: the gather of token rows is the A
// load (row pointers), the GLU (SwiGLU or GeGLU) is the epilogue of the gate+up
// GEMM, the routing weight and the combine are the epilogue of the down GEMM, and
// in backward the GLU derivative, d weight and weight * act(h) are the epilogue of
// dy @ W_out^T. Each was a separate aten pass over S rows before.

namespace {

constexpr int kSwiGLU = 0, kGeGLU = 1;

MOEKIT_BF16 inline __m512 load_bf16(const bf16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

MOEKIT_BF16 inline void store_bf16v(bf16_t* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

MOEKIT_BF16 inline __m512 round_bf16(__m512 v) {  // v rounded to bf16 and back
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __mmask16 tail(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}

// exp(x) = 2^n p(r), r = x - n ln2, the Cephes expf polynomial as in cpu_experts.cpp
// (relative error ~2e-7); x clamped to [-87, 88].
MOEKIT_BF16 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, far below bf16's 2^-9).
MOEKIT_BF16 inline __m512 erf512(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                 _mm512_fmadd_ps(ax, _mm512_set1_ps(0.3275911f),
                                                 _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  const __m512 e = exp512(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), ax), ax));
  const __m512 y = _mm512_fnmadd_ps(_mm512_mul_ps(p, t), e, _mm512_set1_ps(1.0f));
  // copy x's sign onto y
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
}

// act(g) and, with d, act'(g): silu (SwiGLU) or the exact, erf gelu (GeGLU).
template <int KIND>
MOEKIT_BF16 inline __m512 act512(__m512 g, __m512* d) {
  const __m512 one = _mm512_set1_ps(1.0f);
  if (KIND == kSwiGLU) {
    const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(
                                                             _mm512_setzero_ps(), g))));
    const __m512 a = _mm512_mul_ps(g, s);
    // silu'(g) = s (1 + g (1 - s))
    if (d) *d = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
    return a;
  }
  const __m512 cdf = _mm512_mul_ps(
      _mm512_set1_ps(0.5f),
      _mm512_add_ps(one, erf512(_mm512_mul_ps(g, _mm512_set1_ps(0.70710678118654752f)))));
  // gelu'(g) = Phi(g) + g phi(g), phi(g) = exp(-g^2 / 2) / sqrt(2 pi)
  if (d) {
    const __m512 pdf = _mm512_mul_ps(
        _mm512_set1_ps(0.39894228040143268f),
        exp512(_mm512_mul_ps(_mm512_set1_ps(-0.5f), _mm512_mul_ps(g, g))));
    *d = _mm512_fmadd_ps(g, pdf, cdf);
  }
  return _mm512_mul_ps(g, cdf);
}

void check_rows(const torch::Tensor& t, const char* name, int64_t rows, int64_t cols,
                at::ScalarType type) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.scalar_type() == type, name,
              " must be a 2-d ", type, " CPU tensor, got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.size(0) >= rows && t.size(1) == cols && t.stride(1) == 1, name,
              " must have at least ", rows, " rows of ", cols, " contiguous entries, got ",
              t.sizes(), " strides ", t.strides());
}

const float* weights_ptr(const std::optional<torch::Tensor>& w, int64_t rows) {
  if (!w.has_value()) return nullptr;
  TORCH_CHECK(w->device().is_cpu() && w->dim() == 1 && w->scalar_type() == at::kFloat &&
                  w->is_contiguous() && w->size(0) >= rows,
              "w_N must be a contiguous float32 CPU vector of at least ", rows,
              " entries, got ", w->scalar_type(), " ", w->sizes());
  return w->data_ptr<float>();
}

// The gate+up epilogue of rows x cols: h = bf16(gate + b | up + b), a = act(h_gate) h_up
// (from the rounded h, as backward recomputes it). cg, cu: fp32 tiles, kCols apart.
template <int KIND>
MOEKIT_BF16 void glu_epilogue(const float* cg, const float* cu, int64_t rows, int64_t cols,
                              const bf16_t* bias_g, const bf16_t* bias_u, bf16_t* h,
                              int64_t sh, int64_t F, bf16_t* a, int64_t sa) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = tail(cols - j);
      __m512 g = _mm512_loadu_ps(cg + r * kCols + j), u = _mm512_loadu_ps(cu + r * kCols + j);
      if (bias_g) {
        g = _mm512_add_ps(g, load_bf16(bias_g + j, m));
        u = _mm512_add_ps(u, load_bf16(bias_u + j, m));
      }
      g = round_bf16(g);
      u = round_bf16(u);
      store_bf16v(h + r * sh + j, m, g);
      store_bf16v(h + r * sh + F + j, m, u);
      store_bf16v(a + r * sa + j, m, _mm512_mul_ps(act512<KIND>(g, nullptr), u));
    }
  }
}

// dy @ W_out^T's epilogue of rows x cols at column c0 of F, from gu = dy W_out^T (fp32,
// kCols apart), the saved h and the combine weights w: dh = [w gu up act'(gate) |
// w gu act(gate)], aw = w act(h), and dwp[r] = sum over these columns of gu act(h)
// (this tile's share of d weight).
template <int KIND>
MOEKIT_BF16 void glu_backward_epilogue(const float* gu, int64_t rows, int64_t cols,
                                       const bf16_t* h, int64_t sh, int64_t F,
                                       const float* w, bf16_t* dh, int64_t sdh, bf16_t* aw,
                                       int64_t saw, float* dwp, int64_t sdw) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 wr = _mm512_set1_ps(w[r]);
    __m512 dw = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = tail(cols - j);
      const __m512 g = load_bf16(h + r * sh + j, m), u = load_bf16(h + r * sh + F + j, m);
      const __m512 d = _mm512_maskz_loadu_ps(m, gu + r * kCols + j);
      __m512 dact;
      const __m512 act = act512<KIND>(g, &dact);
      const __m512 a = _mm512_mul_ps(act, u), da = _mm512_mul_ps(d, wr);
      dw = _mm512_fmadd_ps(d, a, dw);
      store_bf16v(dh + r * sdh + j, m, _mm512_mul_ps(_mm512_mul_ps(da, u), dact));
      store_bf16v(dh + r * sdh + F + j, m, _mm512_mul_ps(da, act));
      store_bf16v(aw + r * saw + j, m, _mm512_mul_ps(a, wr));
    }
    dwp[r * sdw] = _mm512_reduce_add_ps(dw);
  }
}

// Columns of a weight packed at once (whole 64-column panels, at most 256): a weight
// row is then read in runs of up to 512 contiguous bytes instead of 128, and the packed
// chunk (P pairs x columns, 32-bit) stays within 256 KiB.
int64_t chunk_cols(int64_t P) {
  return kCols * std::clamp<int64_t>(262144 / (P * kCols * 4), 1, 4);
}

inline float from_bf16(bf16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// out[tok[q]][j] += w[q] * (c[q][j] + bias[j]) for q < mr rows, j < cols; c rows are
// 16 * ceil(cols / 16) apart; w = 1 where null.
MOEKIT_BF16 void scatter_rows(const float* c, int mr, int64_t cols, const float* bias,
                              const int64_t* tok, const float* w, float* out, int64_t so) {
  const int64_t ldc = ceil_div(cols, 16) * 16;
  for (int q = 0; q < mr; ++q) {
    const __m512 wr = _mm512_set1_ps(w ? w[q] : 1.0f);
    float* o = out + tok[q] * so;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 mk = tail(cols - j);
      const __m512 y = _mm512_add_ps(_mm512_loadu_ps(c + q * ldc + j), _mm512_loadu_ps(bias + j));
      _mm512_mask_storeu_ps(o + j, mk, _mm512_fmadd_ps(wr, y, _mm512_maskz_loadu_ps(mk, o + j)));
    }
  }
}

}  // namespace

// Gate+up with the GLU fused: for the rows of expert i (row r is token tok_N[r]),
// h_NG[r] = x_TX[tok_N[r]] @ w_BXG[i] (+ b_BG[i]) rounded to bf16 (gate: the first F
// columns, up: the last F), and a_NF[r] = act(gate) * up; kind 0 SwiGLU, 1 GeGLU.
// w_BXG may be any strided view. Tasks: (expert, 64-column tiles of F), each task
// computing the gate and the up tile of the same columns.
void bf16_glu_up_out(const torch::Tensor& x_TX, const torch::Tensor& tok_N,
                     const torch::Tensor& w_BXG, const std::optional<torch::Tensor>& b_BG,
                     const std::vector<int64_t>& ends, int64_t kind, torch::Tensor& h_NG,
                     torch::Tensor& a_NF) {
  check(x_TX, "x_TX", 2);
  check(w_BXG, "w_BXG", 3);
  TORCH_CHECK(bf16_available(), "this CPU has no AVX-512 BF16");
  TORCH_CHECK(kind == kSwiGLU || kind == kGeGLU, "kind=", kind, " must be 0 (swiglu) or 1 (geglu)");
  const int64_t* tok = index_ptr(tok_N, "tok_N", x_TX.size(0));
  const int64_t X = x_TX.size(1), G = w_BXG.size(2), F = G / 2, P = (X + 1) / 2;
  TORCH_CHECK(w_BXG.size(1) == X && G % 2 == 0, "w_BXG ", w_BXG.sizes(), " must be [B, ", X,
              ", 2F]");
  check_ends(ends, w_BXG.size(0), tok_N.size(0));
  const int64_t N = ends.empty() ? 0 : ends.back();
  check_rows(h_NG, "h_NG", N, G, at::kBFloat16);
  check_rows(a_NF, "a_NF", N, F, at::kBFloat16);
  if (b_BG.has_value()) {
    check(*b_BG, "b_BG", 2);
    TORCH_CHECK(b_BG->size(0) == w_BXG.size(0) && b_BG->size(1) == G && b_BG->stride(1) == 1,
                "b_BG ", b_BG->sizes(), " must be [", w_BXG.size(0), ", ", G, "], rows contiguous");
  }
  std::vector<Task> tasks = row_tasks(ends, F, 2.0 * X);
  const bf16_t* w = ptr(w_BXG);
  bf16_t* h = reinterpret_cast<bf16_t*>(h_NG.data_ptr<at::BFloat16>());
  bf16_t* a = reinterpret_cast<bf16_t*>(a_NF.data_ptr<at::BFloat16>());
  const int64_t sx = w_BXG.stride(1), sg = w_BXG.stride(2);
  run(std::move(tasks), [&](const Task& t) {
    Scratch& s = scratch();
    const int64_t rows = t.r1 - t.r0;
    const int32_t* const* ar = a_rows(x_TX, tok, t.r0, t.r1, s);
    const int64_t chunk = chunk_cols(P);
    int32_t* bg = grow(s.b, 2 * P * chunk);
    int32_t* bu = bg + P * chunk;
    float* cg = grow(s.c, rows * kCols);
    float* cu = grow(s.c2, rows * kCols);
    const bf16_t* we = w + t.expert * w_BXG.stride(0);
    const bf16_t* bias = b_BG.has_value() ? ptr(*b_BG) + t.expert * b_BG->stride(0) : nullptr;
    for (int64_t k0 = t.c0; k0 < t.c1; k0 += chunk) {
      const int64_t width = std::min(chunk, t.c1 - k0), padded = ceil_div(width, 16) * 16;
      pack_b(we + k0 * sg, sx, sg, 0, X, width, padded, bg);
      pack_b(we + (F + k0) * sg, sx, sg, 0, X, width, padded, bu);
      for (int64_t c0 = k0; c0 < k0 + width; c0 += kCols) {
        const int64_t cols = std::min(kCols, k0 + width - c0);
        const int nv = static_cast<int>(ceil_div(cols, 16));
        panel_gemm(ar, 1, bg + (c0 - k0), padded, P, rows, nv, cg, kCols, false);
        panel_gemm(ar, 1, bu + (c0 - k0), padded, P, rows, nv, cu, kCols, false);
        const bf16_t* b0 = bias ? bias + c0 : nullptr;
        bf16_t* hr = h + t.r0 * h_NG.stride(0) + c0;
        bf16_t* arow = a + t.r0 * a_NF.stride(0) + c0;
        (kind == kSwiGLU ? glu_epilogue<kSwiGLU> : glu_epilogue<kGeGLU>)(
            cg, cu, rows, cols, b0, b0 ? b0 + F : nullptr, hr, h_NG.stride(0), F, arow,
            a_NF.stride(0));
      }
    }
  });
}

// The down projection with the combine fused: out_TY[tok_N[r]] += w_N[r] *
// (a_NX[r] @ b_BXY[i] (+ bias_BY[i])) for the rows r of expert i, fp32 accumulation
// into out_TY (float32). No weights: w = 1 (the input gradient's scatter). Each task
// owns a column tile of out for every expert, so no two tasks write the same entry.
void bf16_scatter_mm(const torch::Tensor& a_NX, const torch::Tensor& b_BXY,
                     const std::optional<torch::Tensor>& bias_BY,
                     const std::optional<torch::Tensor>& w_N, const torch::Tensor& tok_N,
                     const std::vector<int64_t>& ends, torch::Tensor& out_TY) {
  check(a_NX, "a_NX", 2);
  check(b_BXY, "b_BXY", 3);
  TORCH_CHECK(bf16_available(), "this CPU has no AVX-512 BF16");
  const int64_t X = a_NX.size(1), Y = b_BXY.size(2), P = (X + 1) / 2, T = out_TY.size(0);
  TORCH_CHECK(b_BXY.size(1) == X, "b_BXY ", b_BXY.sizes(), " must be [B, ", X, ", Y]");
  check_rows(out_TY, "out_TY", T, Y, at::kFloat);
  const int64_t* tok = index_ptr(tok_N, "tok_N", T);
  check_ends(ends, b_BXY.size(0), std::min(a_NX.size(0), tok_N.size(0)));
  const float* w = weights_ptr(w_N, ends.empty() ? 0 : ends.back());
  if (bias_BY.has_value()) {
    check(*bias_BY, "bias_BY", 2);
    TORCH_CHECK(bias_BY->size(0) == b_BXY.size(0) && bias_BY->size(1) == Y &&
                    bias_BY->stride(1) == 1,
                "bias_BY ", bias_BY->sizes(), " must be [", b_BXY.size(0), ", ", Y, "]");
  }
  // Each task owns a range of columns for every expert of the call: 2 ranges per
  // thread, in whole 64-column panels (narrower, down to 16, only where Y is too narrow
  // for that). An expert's rows stay in cache while the panels of the range pass over
  // them, and the weight is packed chunk_cols() at a time. One 64-column panel per task
  // instead (the other experts evict the rows between two passes) took 1.15-1.22x the
  // time of the down projection and 1.12-1.13x of dx's at T=4096, E=64 and 128, K=8
  // (1 thread, CPU time, median of 9 interleaved pairs, loaded 2-core box).
  const int64_t threads = at::get_num_threads();
  int64_t tw = kCols;
  while (tw > 16 && ceil_div(Y, tw) < 2 * threads) tw /= 2;
  const int64_t range = std::max<int64_t>(1, ceil_div(ceil_div(Y, tw), 2 * threads)) * tw;
  const double rows_all = ends.empty() ? 0.0 : static_cast<double>(ends.back());
  std::vector<Task> tasks;
  for (int64_t c0 = 0; c0 < Y; c0 += range) {
    const int64_t c1 = std::min(Y, c0 + range);
    tasks.push_back({0, 0, 0, c0, c1, rows_all * X * (c1 - c0)});
  }
  const auto starts = starts_of(ends);
  const bf16_t* b = ptr(b_BXY);
  float* out = out_TY.data_ptr<float>();
  const int64_t so = out_TY.stride(0);
  run(std::move(tasks), [&](const Task& t) {
    Scratch& s = scratch();
    const int64_t chunk = std::max(tw, chunk_cols(P));
    int32_t* bp = grow(s.b, P * chunk);
    float* c = grow(s.c, kMaxRows * tw);
    float bias[kCols];
    for (size_t i = 0; i < ends.size(); ++i) {
      if (ends[i] == starts[i]) continue;
      const int32_t* const* ar = a_rows(a_NX, nullptr, starts[i], ends[i], s);
      const int64_t n = ends[i] - starts[i];
      for (int64_t k0 = t.c0; k0 < t.c1; k0 += chunk) {
        const int64_t width = std::min(chunk, t.c1 - k0), padded = ceil_div(width, 16) * 16;
        pack_b(b + i * b_BXY.stride(0) + k0 * b_BXY.stride(2), b_BXY.stride(1),
               b_BXY.stride(2), 0, X, width, padded, bp);
        for (int64_t c0 = k0; c0 < k0 + width; c0 += tw) {
          const int64_t cols = std::min(tw, k0 + width - c0);
          const int nv = static_cast<int>(ceil_div(cols, 16));
          for (int64_t j = 0; j < tw; ++j)
            bias[j] = bias_BY.has_value() && j < cols
                          ? from_bf16(ptr(*bias_BY)[i * bias_BY->stride(0) + c0 + j]) : 0.0f;
          for (int64_t m = 0; m < n; m += kMaxRows) {
            const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, n - m));
            pick(mr, nv)(ar + m, 1, bp + (c0 - k0), padded, P, c, 16 * nv, false);
            const int64_t r = starts[i] + m;
            scatter_rows(c, mr, cols, bias, tok + r, w ? w + r : nullptr, out + c0, so);
          }
        }
      }
    }
  });
}

// Backward of the down projection and the GLU, fused: for the rows r of expert i,
// gu = dy_TY[tok_N[r]] @ wt_BYF[i] (W_out^T, any strided view) and, from the saved
// h_NG and the combine weights w_N (float32): dh_NG = [w gu up act'(gate) | w gu act(gate)],
// aw_NF = w act(h) (for W_out's gradient), dw_NC[r][c] = sum over F columns 64c..64c+63
// of gu act(h) (d weight[r] is the sum over c).
void bf16_glu_backward_out(const torch::Tensor& dy_TY, const torch::Tensor& tok_N,
                           const torch::Tensor& wt_BYF, const torch::Tensor& h_NG,
                           const torch::Tensor& w_N, const std::vector<int64_t>& ends,
                           int64_t kind, torch::Tensor& dh_NG, torch::Tensor& aw_NF,
                           torch::Tensor& dw_NC) {
  check(dy_TY, "dy_TY", 2);
  check(wt_BYF, "wt_BYF", 3);
  TORCH_CHECK(bf16_available(), "this CPU has no AVX-512 BF16");
  TORCH_CHECK(kind == kSwiGLU || kind == kGeGLU, "kind=", kind, " must be 0 (swiglu) or 1 (geglu)");
  const int64_t Y = dy_TY.size(1), F = wt_BYF.size(2);
  TORCH_CHECK(wt_BYF.size(1) == Y, "wt_BYF ", wt_BYF.sizes(), " must be [B, ", Y, ", F]");
  const int64_t* tok = index_ptr(tok_N, "tok_N", dy_TY.size(0));
  check_ends(ends, wt_BYF.size(0), tok_N.size(0));
  const int64_t N = ends.empty() ? 0 : ends.back();
  check_rows(h_NG, "h_NG", N, 2 * F, at::kBFloat16);
  check_rows(dh_NG, "dh_NG", N, 2 * F, at::kBFloat16);
  check_rows(aw_NF, "aw_NF", N, F, at::kBFloat16);
  check_rows(dw_NC, "dw_NC", N, ceil_div(F, kCols), at::kFloat);
  const float* w = weights_ptr(w_N, N);
  std::vector<Task> tasks = row_tasks(ends, F, Y);
  const bf16_t* wt = ptr(wt_BYF);
  const bf16_t* h = ptr(h_NG);
  bf16_t* dh = reinterpret_cast<bf16_t*>(dh_NG.data_ptr<at::BFloat16>());
  bf16_t* aw = reinterpret_cast<bf16_t*>(aw_NF.data_ptr<at::BFloat16>());
  float* dw = dw_NC.data_ptr<float>();
  const int64_t sy = wt_BYF.stride(1), sf = wt_BYF.stride(2);
  run(std::move(tasks), [&](const Task& t) {
    panels(t, dy_TY, tok, wt + t.expert * wt_BYF.stride(0), sy, sf,
           [&](const float* c, int64_t c0, int64_t cols) {
             (kind == kSwiGLU ? glu_backward_epilogue<kSwiGLU> : glu_backward_epilogue<kGeGLU>)(
                 c, t.r1 - t.r0, cols, h + t.r0 * h_NG.stride(0) + c0, h_NG.stride(0), F,
                 w + t.r0, dh + t.r0 * dh_NG.stride(0) + c0, dh_NG.stride(0),
                 aw + t.r0 * aw_NF.stride(0) + c0, aw_NF.stride(0),
                 dw + t.r0 * dw_NC.stride(0) + c0 / kCols, dw_NC.stride(0));
           });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &bf16_available, "True where the CPU runs AVX-512 BF16");
  m.def("grouped_mm_out", &bf16_grouped_mm_out,
        "out[rows of i] = a[rows of i] @ b[i], bf16 on AVX-512 BF16, parallel over experts");
  m.def("grouped_mm_weight_out", &bf16_grouped_mm_weight_out,
        "out[i] = a[rows of i]^T @ b[rows of i], bf16 on AVX-512 BF16, fp32 reduction",
        py::arg("a_NX"), py::arg("b_NY"), py::arg("ends"), py::arg("out_BXY"),
        py::arg("a_idx") = py::none(), py::arg("b_idx") = py::none());
  m.def("glu_up_out", &bf16_glu_up_out,
        "h = x[tok] @ w_in[e] (+ b), a = act(gate) * up, gather and GLU fused");
  m.def("scatter_mm", &bf16_scatter_mm,
        "out[tok] += w * (a @ b[e] (+ bias)), fp32 accumulation, combine fused");
  m.def("glu_backward_out", &bf16_glu_backward_out,
        "dh, w * act(h) and d weight partials from dy[tok] @ w_out[e]^T, GLU backward fused");
}
