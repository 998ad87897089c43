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

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

struct Task {
  int64_t expert, r0, r1, c0, c1;  // output rows [r0, r1) and columns [c0, c1)
  double cost;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Cuts one expert's output (rows x cols, cost per element `work`) into pieces
// of about `target` cost: columns first (at most cols / 64 pieces, so the GEMM keeps
// all of its rows; each a multiple of `align` columns but the last), then rows (at
// least `min_rows` each).
void cut(std::vector<Task>& tasks, int64_t expert, int64_t r0, int64_t r1, int64_t cols,
         double work, double target, int64_t min_rows, int64_t align = 16) {
  const int64_t rows = r1 - r0;
  const double cost = static_cast<double>(rows) * cols * work;
  int64_t pieces = std::max<int64_t>(1, static_cast<int64_t>(cost / target + 0.5));
  const int64_t col_pieces = std::min(pieces, std::max<int64_t>(1, cols / 64));
  const int64_t row_pieces =
      std::min(ceil_div(pieces, col_pieces), std::max<int64_t>(1, rows / min_rows));
  const int64_t col_step = ceil_div(ceil_div(cols, col_pieces), align) * align;
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

// A 64-byte aligned float buffer of this thread's, grown to the largest request: which = 0
// and 1 swiglu_experts' row tiles, 2 sgemm_rows' packed weight blocks, 3 igemm_a8's.
float* thread_buffer(int which, int64_t n) {
  struct Free {
    void operator()(float* f) const { std::free(f); }
  };
  thread_local std::unique_ptr<float, Free> bufs[4];
  thread_local int64_t sizes[4] = {0, 0, 0, 0};
  if (sizes[which] < n) {
    const int64_t bytes = ceil_div(n * static_cast<int64_t>(sizeof(float)), 64) * 64;
    bufs[which].reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    sizes[which] = bufs[which] ? n : 0;
    TORCH_CHECK(bufs[which] != nullptr, "no memory for a ", bytes, "-byte thread buffer");
  }
  return bufs[which].get();
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

// Tasks of about equal cost over the experts' [rows, Y] output tiles, X multiply-adds per
// output element; each piece a multiple of `align` columns but the last.
std::vector<Task> expert_tiles(const std::vector<int64_t>& ends, double X, int64_t Y,
                               int64_t align = 16) {
  const auto starts = starts_of(ends);
  const double target = target_cost(ends, X * Y);
  std::vector<Task> tasks;
  for (size_t i = 0; i < ends.size(); ++i) {
    if (ends[i] > starts[i]) cut(tasks, i, starts[i], ends[i], Y, X, target, 16, align);
  }
  return tasks;
}

// ---- fp32 GEMMs of few rows: a prefill's experts ------------------------------------
//
// A 512-token prefill of 64 experts (top-8) gives each expert ~64 rows. aten's mm (MKL)
// packs each weight before it multiplies, and with a cold weight that packing waits on
// memory: one thread, 64 experts' [1024, 1024] fp32 weights in a row, 96-117 GFLOP/s
// against 140-170 with one hot weight (/tmp microbenchmarks, 2026-12-04, this Xeon).
// sgemm_rows packs the weight in blocks of KC = 96 rows x up to 1,024 columns and,
// while it multiplies one block, copies the next into a second buffer, 4 lines (one
// row's 64 columns of a panel) every few k-steps, each prefetched 16 such segments ahead:
// the read overlaps the FMAs. Copying one line per call instead cost ~5 cycles of
// bookkeeping per line, which at 32 rows is a third of the line's 16 cycles of FMAs:
// one thread, 4 experts [1024, 1024] (a /tmp script), GFLOP/s hot / cold at 32 rows
// 134 / 128 -> 154 / 144, 64 rows 167 / 159 -> 177 / 171, 96 rows 182 / 172 -> 185 /
// 183. benchmarks/bench_sgemm.py (grouped_mm_out over 64 experts x [1024, 1024], 2
// threads, medians of 9 interleaved A/B runs), time over aten's: 4 / 8 / 16 / 32 / 64 /
// 96 rows 0.74 / 0.80 / 0.81 / 0.77 / 0.83 / 0.90 (one line per call: 1.03 / 0.98 /
// 0.88 / 0.86 / 0.91 / 1.01); the fine benchmark model's 4 MoE layers on 512 random
// (balanced) tokens 0.86 (0.91-0.97). Past 96 rows: one thread, 2 experts, sgemm_rows /
// aten GFLOP/s at 128 rows 180-185 / 160-170, 256 rows 177-181 / 191-197, 512 rows
// 161-184 / 198-201; but with both threads a bench_decode fine prefill's grouped GEMMs
// (two builds, interleaved A/B) took 1.004x the time with the limit at 140 rows, 1.02x at
// 200, and at 224 up to 1.066x on a layer (one thread on that layer's 97-200-row experts,
// sgemm_rows 162-178 GFLOP/s against aten's 116-144: the two-thread loss is not
// understood). So experts of more than SGEMM_MAX_ROWS rows stay on aten.
//
// Each output element is one chain of FMAs over k in order (carried through C between
// the KC blocks), so a result does not depend on how the output is cut into tasks.
// AVX-512F only; elsewhere (and with MOEKIT_SGEMM=0) aten's mm.

// A quantized [N, K] weight as the GEMM reads it (moekit.quant's layout: an output channel
// per row; QNextBlock below packs it).
struct QMatrix {
  int bits = 8;                     // 8 or 4
  const uint8_t* data = nullptr;    // [N, row_bytes]
  int64_t row_bytes = 0;
  const float* scales = nullptr;    // int8 [N]; int4 [N, K / group]
  const float* zeros = nullptr;     // int4 [N, K / group]
  int64_t group = 0;                // int4: weights per group (a multiple of 32)
  // int4 in the 16-output order (moekit.quant.layout's "o16" order; igemm_a8 only): each
  // 16 channels' row_bytes * 16 bytes hold, per 32-input chunk c, four 64-byte vectors j
  // whose dword o is bytes 16 c + 4 j.. of channel o's NK row; their scales and zeros
  // [K / group][16]
  bool o16 = false;
};

constexpr int64_t SGEMM_MAX_ROWS = 96;
constexpr int64_t SGEMM_MIN_WEIGHT = 512 * 1024;

#if defined(__x86_64__)

#define AVX512F __attribute__((target("avx512f")))
#define ALWAYS_INLINE inline __attribute__((always_inline))
#define NOINLINE __attribute__((noinline))

constexpr int64_t SG_ROWS = 6;     // rows per register block (6 x 64 columns: 24 accumulators)
// weight rows per packed block (24 KiB per 64 columns, half of L1 with the rows of A and
// C): 96 against 128, interleaved A/B in one process, 2 threads, time 0.94 / 0.96 / 0.97
// / 0.99 at 16 / 32 / 64 / 96 rows x 64 experts [1024 -> 1024], 0.98 on the fine
// benchmark model's prefill GEMMs (a /tmp script, 21 pairs each)
constexpr int64_t SG_KC = 96;
constexpr int64_t SG_NC = 1024;  // columns per pass over K (a 384 KiB packed block)

const bool CPU_AVX512F = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}();

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
}

// The next packed block, copied while the current block is multiplied: one row's 64
// columns of one panel (4 lines) every `every` k-steps, each 4 lines prefetched LEAD
// segments before their copy. Packed layout: panels of 64 columns, [kc, 64] each, `ps`
// floats apart; zeros past the last column. The call's columns [0, split) are B0's, the
// rest B1's (rows ldb apart), so the columns of a block may come from two matrices.
struct NextBlock {
  static constexpr int64_t KC = SG_KC;
  static constexpr int64_t NC = SG_NC;
  static constexpr int64_t LEAD = 16;
  static constexpr bool BETWEEN = false;  // copies inside sg_block's k loop
  const float *B0, *B1;
  int64_t split, ldb;
  const float* src[16] = {};  // each panel's first weight row, at its first column
  float* dst = nullptr;
  int64_t nc = 0, ps = 0, np = 0;      // panels per row
  int64_t k = 0, p = 0, left = 0;      // the copy: row, panel, segments still to copy
  int64_t pk = 0, pp = 0, pleft = 0;   // the prefetch
  int64_t every = 1, cnt = 1;

  NextBlock(const float* b0, const float* b1, int64_t split_, int64_t ldb_)
      : B0(b0), B1(b1), split(split_), ldb(ldb_) {}

  // Starts packing the block of weight rows k0..k0+rows, columns c0..c0+cols into d,
  // spread over the next `steps` k-steps (0: finish() copies it all).
  AVX512F void begin(int64_t k0, int64_t c0, int64_t rows, int64_t cols, float* d,
                     int64_t stride, int64_t steps) {
    dst = d, nc = cols, ps = stride, np = (cols + 63) / 64;
    for (int64_t i = 0; i < np; ++i) {
      const int64_t c = c0 + 64 * i;
      src[i] = (c < split ? B0 + c : B1 + (c - split)) + k0 * ldb;
    }
    k = p = pk = pp = 0;
    left = pleft = rows * np;
    every = cnt = std::max<int64_t>(1, steps / (left + LEAD));
  }
  AVX512F void copy() {
    const float* s = src[p] + k * ldb;
    float* d = dst + p * ps + 64 * k;
    const int64_t c = nc - 64 * p;
    if (c >= 64) {
      const __m512 v0 = _mm512_loadu_ps(s), v1 = _mm512_loadu_ps(s + 16),
                   v2 = _mm512_loadu_ps(s + 32), v3 = _mm512_loadu_ps(s + 48);
      _mm512_store_ps(d, v0), _mm512_store_ps(d + 16, v1);
      _mm512_store_ps(d + 32, v2), _mm512_store_ps(d + 48, v3);
    } else {
      for (int i = 0; i < 4; ++i)
        _mm512_store_ps(d + 16 * i, _mm512_maskz_loadu_ps(tail_mask(c - 16 * i), s + 16 * i));
    }
    if (++p == np) p = 0, ++k;
    --left;
  }
  AVX512F void step() {
    if (pleft > 0) {
      const char* s = reinterpret_cast<const char*>(src[pp] + pk * ldb);
      _mm_prefetch(s, _MM_HINT_T1), _mm_prefetch(s + 64, _MM_HINT_T1);
      _mm_prefetch(s + 128, _MM_HINT_T1), _mm_prefetch(s + 192, _MM_HINT_T1);
      if (++pp == np) pp = 0, ++pk;
      --pleft;
    }
    if (left > 0 && (pleft == 0 || left - pleft >= LEAD)) copy();  // LEAD segments behind
  }
  AVX512F void finish() {
    while (left > 0) copy();
  }
};

// 16 x 16 floats transposed in registers: r[i][j] -> r[j][i] (64 shuffles).
AVX512F inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 4; ++i) {
      const int j = 8 * h + i;
      t[j] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0x88);
      t[j + 4] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// The same packed blocks from a quantized weight stored [N, K] (an output channel per row,
// moekit.quant's layout), dequantized and transposed on the way in, so the float weights
// are never written out. A segment is 16 channels x seg_k weight rows: each channel's 64
// bytes (64 int8 or 128 int4 weights) is one load, the 16 x 16 dwords are transposed in
// registers, and each dword (4 bytes of one channel) then gives its weights by shifts:
// (q << 24 - 8b) >> 24 for int8, (q >> 8b (+ 4)) & 15 for int4 (byte j of a 32-weight chunk
// holds weight j in its low nibble, j + 16 in its high one). A segment costs 64 shuffles;
// transposing the converted floats instead (two 16 x 16 float tiles per 32 weight rows)
// cost 4 shuffles per 16 weights, on the port the FMAs also use. The values are
// cpu_decode's dequantize's, bitwise: s * q (int8, a scale per channel), s * q + z (int4,
// per group along K), not an FMA.
struct QNextBlock {
  static constexpr int64_t KC = 128;   // weight rows per packed block (a multiple of seg_k)
  // columns per pass (two 256 KiB packed blocks): against 1024, in-process A/B, 64 experts
  // x 8 / 64 rows, int8 0.98 / 0.99x the time, int4 g64 0.93 / 0.97x (256: the same)
  static constexpr int64_t NC = 512;
  static constexpr int64_t LEAD = 2;   // segments prefetched past the next block's
  static constexpr bool BETWEEN = true;  // copies between register blocks, not in the k loop
  const QMatrix& q;
  int64_t n0, n1, split;  // call column c is channel n0 + c (c < split), else n1 + c - split
  int64_t seg_k;          // weight rows per segment: 64 (int8) or 128 (int4)
  float* dst = nullptr;
  int64_t k0 = 0, c0 = 0, kc = 0, nc = 0, ps = 0, nks = 0;
  int64_t seg = 0, nseg = 0, pseg = 0, calls = 0, done = 0;

  QNextBlock(const QMatrix& m, int64_t n0_, int64_t n1_, int64_t split_)
      : q(m), n0(n0_), n1(n1_), split(split_), seg_k(m.bits == 8 ? 64 : 128) {}

  // `steps` counts register blocks here (sgemm_blocks calls between() after each one).
  AVX512F void begin(int64_t k0_, int64_t c0_, int64_t rows, int64_t cols, float* d,
                     int64_t stride, int64_t steps) {
    dst = d, k0 = k0_, c0 = c0_, kc = rows, nc = cols, ps = stride;
    nks = (rows + seg_k - 1) / seg_k;
    seg = pseg = 0;
    nseg = nks * 4 * ((cols + 63) / 64);  // whole panels: the columns past nc get zeros
    calls = steps, done = 0;
    if (calls > 0) {  // what the first block's between() copies
      const int64_t first = std::min(nseg, nseg / calls + 1 + LEAD);
      while (pseg < first) prefetch(pseg++);
    }
  }
  // The channel of call column c (< nc).
  int64_t channel(int64_t c) const {
    const int64_t col = c0 + c;
    return col < split ? n0 + col : n1 + (col - split);
  }
  const uint8_t* at(int64_t c, int64_t k) const {
    return q.data + channel(c) * q.row_bytes + (q.bits == 8 ? k : k / 2);
  }
  AVX512F void prefetch(int64_t s) {
    const int64_t c = 16 * (s / nks), k = k0 + seg_k * (s % nks);
    for (int64_t i = 0; i < 16 && c + i < nc; ++i)
      _mm_prefetch(reinterpret_cast<const char*>(at(c + i, k)), _MM_HINT_T1);
  }
  AVX512F void copy() {
    const int64_t c = 16 * (seg / nks), kk = k0 + seg_k * (seg % nks);
    const int64_t kn = std::min(seg_k, k0 + kc - kk), bytes = q.bits == 8 ? kn : kn / 2;
    const __mmask16 dm = tail_mask(bytes / 4);  // dwords of the segment (bytes % 16 == 0)
    const __mmask16 cm = tail_mask(nc - c);
    float* d = dst + (c / 64) * ps + 64 * (kk - k0) + c % 64;  // weight row kk, column c
    __m512 r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = c + i < nc ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(dm, at(c + i, kk)))
                        : _mm512_setzero_ps();
    transpose16(r);  // r[j] lane i: bytes 4j..4j+3 of channel c + i
    if (cm == 0) {   // a panel's columns past the last: zeros
      for (int64_t k = 0; k < kn; ++k) _mm512_store_ps(d + 64 * k, _mm512_setzero_ps());
    } else if (q.bits == 8) {
      // the 16 channels' scales (c's 16 columns are consecutive channels of one part)
      const __m512 s = _mm512_maskz_loadu_ps(cm, q.scales + channel(c));
      for (int64_t j = 0; 4 * j < kn; ++j) {
        const __m512i v = _mm512_castps_si512(r[j]);
        const __m512i b0 = _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24);
        const __m512i b1 = _mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24);
        const __m512i b2 = _mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24);
        const __m512i b3 = _mm512_srai_epi32(v, 24);
        float* o = d + 64 * 4 * j;
        _mm512_store_ps(o, _mm512_mul_ps(s, _mm512_cvtepi32_ps(b0)));
        _mm512_store_ps(o + 64, _mm512_mul_ps(s, _mm512_cvtepi32_ps(b1)));
        _mm512_store_ps(o + 128, _mm512_mul_ps(s, _mm512_cvtepi32_ps(b2)));
        _mm512_store_ps(o + 192, _mm512_mul_ps(s, _mm512_cvtepi32_ps(b3)));
      }
    } else {
      const int64_t ng = q.row_bytes * 2 / q.group;  // groups per channel
      const __m512i idx = _mm512_mullo_epi32(
          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
          _mm512_set1_epi32(static_cast<int32_t>(ng)));
      const int64_t base = channel(c) * ng;
      const __m512i m15 = _mm512_set1_epi32(15);
      __m512 s = _mm512_setzero_ps(), z = s;
      int64_t g = -1;
      for (int64_t ch = 0; 32 * ch < kn; ++ch) {  // 32-weight chunks: 16 bytes, 4 dwords
        if ((kk + 32 * ch) / q.group != g) {  // a group's 16 scales and zeros
          g = (kk + 32 * ch) / q.group;
          s = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), cm, idx, q.scales + base + g, 4);
          z = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), cm, idx, q.zeros + base + g, 4);
        }
        for (int jd = 0; jd < 4; ++jd) {
          const __m512i v = _mm512_castps_si512(r[4 * ch + jd]);
          for (int b = 0; b < 4; ++b) {
            const int64_t k = 32 * ch + 4 * jd + b;  // low nibble's weight row in the segment
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * b), m15));
            const __m512 hi =
                _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * b + 4), m15));
            // s * q rounded, then + z (GCC would contract mul_ps + add_ps into an FMA;
            // the _round_ form is a builtin it leaves apart)
            _mm512_store_ps(d + 64 * k,
                            _mm512_add_ps(_mm512_mul_round_ps(s, lo, _MM_FROUND_CUR_DIRECTION), z));
            _mm512_store_ps(d + 64 * (k + 16),
                            _mm512_add_ps(_mm512_mul_round_ps(s, hi, _MM_FROUND_CUR_DIRECTION), z));
          }
        }
      }
    }
    ++seg;
  }
  // After register block `done` of `calls`: the segments due by then, and a prefetch of
  // those due after the next block, so that they arrive while it computes. (perf, one
  // thread, 64 experts x 64 rows int8: copy() ~21% of the time, three quarters of it
  // waiting on the weight bytes' load, with either prefetch; this one against 2 segments
  // ahead: 0.96-0.97x the time. T0 instead of T1: 1.01-1.05x.)
  AVX512F void between() {
    // (after the last block's begin() the calls go on past `calls`: nothing more is due)
    const int64_t due = calls > 0 ? std::min(nseg, nseg * ++done / calls) : nseg;
    while (seg < due) copy();
    const int64_t ahead = calls > 0 ? std::min(nseg, nseg * (done + 1) / calls + LEAD) : nseg;
    while (pseg < ahead) prefetch(pseg++);
  }
  AVX512F void finish() {
    while (seg < nseg) copy();
  }
};

// C[R, 64] (masked m0..m3; += C unless first) of R rows of A (row r's kc values from
// A[r] + k0) times the packed block P [kc, 64]; steps the next block's copy.
template <int R, typename Next>
AVX512F void sg_block(const float* const* A, int64_t k0, const float* P, int64_t kc, float* C,
                      int64_t ldc, const __mmask16* m, bool first, Next& next) {
  const __mmask16 m0 = m[0], m1 = m[1], m2 = m[2], m3 = m[3];
  const float* a[R];
  for (int r = 0; r < R; ++r) a[r] = A[r] + k0;
  __m512 a0[R], a1[R], a2[R], a3[R];
  for (int r = 0; r < R; ++r) {
    if (first) {
      a0[r] = a1[r] = a2[r] = a3[r] = _mm512_setzero_ps();
    } else {
      const float* c = C + r * ldc;
      a0[r] = _mm512_maskz_loadu_ps(m0, c);
      a1[r] = _mm512_maskz_loadu_ps(m1, c + 16);
      a2[r] = _mm512_maskz_loadu_ps(m2, c + 32);
      a3[r] = _mm512_maskz_loadu_ps(m3, c + 48);
    }
  }
  [[maybe_unused]] int64_t cnt = 0;  // k-steps to the next copy step (in-loop packers)
  if constexpr (!Next::BETWEEN) cnt = next.cnt;
  for (int64_t k = 0; k < kc; ++k) {
    const float* w = P + 64 * k;
    const __m512 w0 = _mm512_load_ps(w), w1 = _mm512_load_ps(w + 16),
                 w2 = _mm512_load_ps(w + 32), w3 = _mm512_load_ps(w + 48);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r][k]);
      a0[r] = _mm512_fmadd_ps(x, w0, a0[r]);
      a1[r] = _mm512_fmadd_ps(x, w1, a1[r]);
      a2[r] = _mm512_fmadd_ps(x, w2, a2[r]);
      a3[r] = _mm512_fmadd_ps(x, w3, a3[r]);
    }
    if constexpr (!Next::BETWEEN) {
      if (--cnt == 0) {
        cnt = next.every;
        next.step();
      }
    }
  }
  if constexpr (!Next::BETWEEN) next.cnt = cnt;
  for (int r = 0; r < R; ++r) {
    float* c = C + r * ldc;
    _mm512_mask_storeu_ps(c, m0, a0[r]);
    _mm512_mask_storeu_ps(c + 16, m1, a1[r]);
    _mm512_mask_storeu_ps(c + 32, m2, a2[r]);
    _mm512_mask_storeu_ps(c + 48, m3, a3[r]);
  }
}

template <typename Next>
AVX512F void sg_rows(int64_t R, const float* const* A, int64_t k0, const float* P, int64_t kc,
                     float* C, int64_t ldc, const __mmask16* m, bool first, Next& next) {
  switch (R) {
    case 6: return sg_block<6>(A, k0, P, kc, C, ldc, m, first, next);
    case 5: return sg_block<5>(A, k0, P, kc, C, ldc, m, first, next);
    case 4: return sg_block<4>(A, k0, P, kc, C, ldc, m, first, next);
    case 3: return sg_block<3>(A, k0, P, kc, C, ldc, m, first, next);
    case 2: return sg_block<2>(A, k0, P, kc, C, ldc, m, first, next);
    default: return sg_block<1>(A, k0, P, kc, C, ldc, m, first, next);
  }
}


// C [M, N] = A [M, K] @ B [K, N], row r of A at A[r], C with unit column stride; `next`
// packs B's blocks (NextBlock: float rows; QNextBlock: a quantized [N, K] weight).
// Inlined into sgemm_rows and sgemm_q, which are not inlined: GCC's register allocation of
// sg_block's loop depends on the function around it. With sgemm_rows a small wrapper (and
// so inlined into its callers' task lambdas) it kept the row pointers on the stack and
// loaded one weight vector once per row: 64 experts x 64 rows [1024 -> 1024] took 1.12x
// the time. Alone, the loop keeps its 6 row pointers and 4 weight vectors in registers.
template <typename Next>
AVX512F ALWAYS_INLINE void sgemm_blocks(const float* const* A, Next& next, float* C,
                                        int64_t ldc, int64_t M, int64_t K, int64_t N) {
  constexpr int64_t KC = Next::KC, NC = Next::NC;
  // row blocks of 5-6 rows (64 rows: 9 x 6 + 2 x 5, not 10 x 6 + 4)
  const int64_t nb = (M + SG_ROWS - 1) / SG_ROWS, base = M / nb, extra = M % nb;
  // panels 64 bytes more than a [KC, 64] block apart: 24 or 32 KiB apart, the stores of
  // one k would all meet in one L1 set
  const int64_t ps = KC * 64 + 16;
  float* const packed = thread_buffer(2, 2 * ps * (NC / 64));  // two packed blocks
  float* buf[2] = {packed, packed + ps * (NC / 64)};
  int cur = 0;
  next.begin(0, 0, std::min(KC, K), std::min(NC, N), buf[cur], ps, 0);
  next.finish();  // the first block: packed before any compute
  for (int64_t c0 = 0; c0 < N; c0 += NC) {
    const int64_t nc = std::min(NC, N - c0), np = (nc + 63) / 64;
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      // k-steps for NextBlock, register blocks for QNextBlock
      const int64_t steps = Next::BETWEEN ? np * nb : np * nb * kc;
      if (k0 + kc < K)  // this column range's next rows
        next.begin(k0 + kc, c0, std::min(KC, K - k0 - kc), nc, buf[1 - cur], ps, steps);
      else if (c0 + NC < N)  // the next column range's first rows
        next.begin(0, c0 + NC, std::min(KC, K), std::min(NC, N - c0 - NC),
                   buf[1 - cur], ps, steps);
      for (int64_t p = 0; p < np; ++p) {
        const int64_t cols = nc - 64 * p;
        const __mmask16 m[4] = {tail_mask(cols), tail_mask(cols - 16), tail_mask(cols - 32),
                                tail_mask(cols - 48)};
        const float* P = buf[cur] + p * ps;
        for (int64_t b = 0, r0 = 0; b < nb; ++b) {
          const int64_t R = base + (b < extra);
          sg_rows(R, A + r0, k0, P, kc, C + r0 * ldc + c0 + 64 * p, ldc, m, k0 == 0, next);
          if constexpr (Next::BETWEEN) next.between();
          r0 += R;
        }
      }
      next.finish();
      cur = 1 - cur;
    }
  }
}

// C [M, N] = A [M, K] @ B [K, N], every matrix with unit column stride: B's columns
// [0, split) at B0 and [split, N) at B1, both with rows ldb apart (split = N: one
// matrix; else a multiple of 64, so that no 64-column panel straddles).
NOINLINE AVX512F void sgemm_rows(const float* const* A, const float* B0, const float* B1,
                                 int64_t split, int64_t ldb, float* C, int64_t ldc, int64_t M,
                                 int64_t K, int64_t N) {
  NextBlock next(B0, B1, split, ldb);
  sgemm_blocks(A, next, C, ldc, M, K, N);
}

// The same with B [K, N] the quantized q read as [K, N]: column c is channel n0 + c for
// c < split, else n1 + c - split (split = N, or a multiple of 64). K % 32 == 0.
NOINLINE AVX512F void sgemm_q(const float* const* A, const QMatrix& q, int64_t n0, int64_t n1,
                              int64_t split, float* C, int64_t ldc, int64_t M, int64_t K,
                              int64_t N) {
  QNextBlock next(q, n0, n1, split);
  sgemm_blocks(A, next, C, ldc, M, K, N);
}


// ---- int8 activations on int8 / int4 weights: a VNNI GEMM for prefill ---------------
//
// A model quantized with activations="int8" has its decode kernels (cpu_decode.cpp,
// i4a8 / i8a8) round each input row per block of 32 inputs, xq = round(x / sx), sx =
// max|x| / 127, and compute the exact product of the dequantized weights with x' = sx *
// xq. igemm_a8 computes the same for many rows at once, so a prefill runs the function its
// decode steps run (before, past the kernels' rows, it ran the float GEMM above on the
// unrounded x), on vpdpbusd: 64 products per instruction against the FMA's 16.
//
// Each weight block of KC inputs x 32 output channels is packed once per call and used
// by every row of the tile: [KC / 4][32] dwords, dword (k4, j) = channel j's weights 4 k4
// .. 4 k4 + 3 as unsigned bytes (int8: w ^ 0x80 = w + 128; int4: the nibble q). One
// vpdpbusd per 4 inputs then adds, per lane (output channel), 4 products of a row's
// broadcast 4 inputs; a lane's int32 sum over one 32-input chunk is exact (at most 32 x
// 255 x 127) and is converted and scaled once per chunk:
//   int8: y += sx_c * (sum_c (w + 128) xq - 128 sum_c xq), times the channel's scale at
//         the end (the accumulator starts each chunk at -128 sum_c xq);
//   int4: y += (s_g sx_c) * sum_c q xq, and once per group y += z_g * zx_g, zx_g = sum of
//         sx_c sum_c xq over the group's chunks (the zero points' term), as i4a8's.
// Per 6 rows x 32 channels x 32 inputs: 96 vpdpbusd, and 12 converts, 12 FMAs (+ 12
// multiplies for int4) besides.

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

const bool CPU_VNNI = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}();

// A row's rounded inputs (one record per distinct row, 64-byte aligned):
//   xq  K int8, in order;  sx  K / 32 floats (each chunk's scale);
//   nc  K / 32 int32, -128 times each chunk's sum of xq (int8 weights);
//   zx  K / group floats, sum over the group's chunks of sx * sum(xq) (int4 weights).
struct A8Rows {
  int64_t K, group, sx_off, nc_off, zx_off, bytes;
  A8Rows(int64_t k, int64_t g) : K(k), group(g) {
    sx_off = K;
    nc_off = sx_off + 4 * (K / 32);
    zx_off = nc_off + 4 * (K / 32);
    bytes = (zx_off + 4 * (K / 32) + 63) / 64 * 64;
  }
};

// 16 inputs v / s rounded to nearest even, clamped to +-127 (a NaN quotient converts to
// INT_MIN: -127), stored as int8 at dst; returns their sum.
VNNI inline int32_t round16_a8(__m512 v, __m512 s, int8_t* dst) {
  const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, s),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512i i = _mm512_cvttps_epi32(r);
  i = _mm512_min_epi32(_mm512_max_epi32(i, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(i));
  return _mm512_reduce_add_epi32(i);
}

// Rounds row x (K inputs) into record rec as cpu_decode's quantize_a8 / quantize_q8 do,
// bitwise: amax by std::max's rule (a NaN input does not count), round to nearest even,
// a NaN or out-of-range quotient converted to INT_MIN and clamped (-127), 0 where the
// chunk's scale is not > 0.
VNNI void round_row_a8(const float* x, const A8Rows& L, char* rec) {
  int8_t* q = reinterpret_cast<int8_t*>(rec);
  float* sx = reinterpret_cast<float*>(rec + L.sx_off);
  int32_t* nc = reinterpret_cast<int32_t*>(rec + L.nc_off);
  float* zx = reinterpret_cast<float*>(rec + L.zx_off);
  const int64_t chunks = L.K / 32, per_group = L.group > 0 ? L.group / 32 : 1;
  for (int64_t g = 0; g < chunks; ++g) zx[g] = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) {
    const __m512 a = _mm512_loadu_ps(x + 32 * c), b = _mm512_loadu_ps(x + 32 * c + 16);
    __m512 m = _mm512_max_ps(_mm512_abs_ps(a), _mm512_setzero_ps());
    m = _mm512_max_ps(_mm512_abs_ps(b), m);
    const float scale = _mm512_reduce_max_ps(m) / 127.0f;
    int32_t sum = 0;
    if (scale > 0.0f) {
      const __m512 s = _mm512_set1_ps(scale);
      sum = round16_a8(a, s, q + 32 * c) + round16_a8(b, s, q + 32 * c + 16);
    } else {
      std::memset(q + 32 * c, 0, 32);
    }
    sx[c] = scale;
    nc[c] = -128 * sum;
    zx[c / per_group] += scale * static_cast<float>(sum);
  }
}

// Inputs per packed panel block: a panel of 32 channels is then (for K up to this) one
// contiguous stretch of the weight (channels are rows of [N, K]), read in order. (Blocks
// of 256 inputs across every panel of the tile, each block's 128-256 bytes of 1,024
// channels at a time, took 1.7-2x the time at 4-8 rows per expert, cold weights.)
constexpr int64_t A8_KC = 2048;
constexpr int A8_ROWS = 6;  // rows per register block (24 accumulators)

// A tile's columns: column j is channel n0 + j for j < split, else n1 + j - split.
struct TileColumns {
  int64_t n0, n1, split;
  int64_t channel(int64_t j) const { return j < split ? n0 + j : n1 + j - split; }
};

// Dwords b0 / 4 .. b0 / 4 + 15 (mask dw) of channel ch's NK row from an o16 QMatrix: dword
// d of the row lies in vector b0 / 4 + d of the channel's 16-channel block, at lane ch % 16.
VNNI inline __m512 o16_dwords(const QMatrix& q, int64_t ch, int64_t b0, __mmask16 dw) {
  const uint8_t* at = q.data + (ch - ch % 16) * q.row_bytes + 16 * b0 + 4 * (ch % 16);
  const __m512i lanes = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(64));
  return _mm512_castsi512_ps(
      _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), dw, lanes, at, 1));
}

// Packs inputs [k0, k0 + kc) of the tile's columns 32 p .. 32 p + 31 (zeros past cw) into
// P, [kc / 4][32] dwords. int4: each group's scales and zero points of the 32 columns into
// S, Z ([kc / group][32] floats).
VNNI void pack_a8(const QMatrix& q, const TileColumns& cols, int64_t cw, int64_t p,
                  int64_t k0, int64_t kc, uint8_t* P, float* S, float* Z) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), nib = _mm512_set1_epi8(0x0F);
  auto channel = [&](int64_t j) { return cols.channel(j); };
  for (int h = 0; h < 2; ++h) {
    const int64_t j0 = 32 * p + 16 * h;
    const uint8_t* src[16];
    for (int i = 0; i < 16; ++i)
      src[i] = j0 + i < cw ? q.data + channel(j0 + i) * q.row_bytes : nullptr;
    const int64_t per = q.bits == 8 ? 64 : 128;  // inputs per 64 source bytes
    for (int64_t i0 = 0; i0 < kc; i0 += per) {
      const int64_t n_in = std::min(per, kc - i0), n_bytes = q.bits == 8 ? n_in : n_in / 2;
      const __mmask16 dw = tail_mask(n_bytes / 4);
      const int64_t b0 = q.bits == 8 ? k0 + i0 : (k0 + i0) / 2;
      __m512 r[16], t[16];
      for (int i = 0; i < 16; ++i)
        r[i] = !src[i] ? _mm512_setzero_ps()
               : q.o16 ? o16_dwords(q, channel(j0 + i), b0, dw)
                       : _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(dw, src[i] + b0));
      if (q.bits == 8) {
        transpose16(r);
        for (int64_t d = 0; d < n_bytes / 4; ++d)  // dword d: inputs i0 + 4d..
          _mm512_storeu_si512(P + ((i0 / 4 + d) * 32 + 16 * h) * 4,
                              _mm512_xor_si512(_mm512_castps_si512(r[d]), flip));
      } else {
        for (int i = 0; i < 16; ++i) {
          const __m512i v = _mm512_castps_si512(r[i]);
          t[i] = _mm512_castsi512_ps(_mm512_and_si512(_mm512_srli_epi16(v, 4), nib));
          r[i] = _mm512_castsi512_ps(_mm512_and_si512(v, nib));
        }
        transpose16(r), transpose16(t);
        // byte b of a 32-input chunk (16 bytes) holds input b (low nibble) and b + 16
        // (high): dword d of the piece is chunk d / 4's inputs 4 (d % 4).. (+ 16)
        for (int64_t d = 0; d < n_bytes / 4; ++d) {
          const int64_t k4 = i0 / 4 + 8 * (d / 4) + d % 4;
          _mm512_storeu_si512(P + (k4 * 32 + 16 * h) * 4, _mm512_castps_si512(r[d]));
          _mm512_storeu_si512(P + ((k4 + 4) * 32 + 16 * h) * 4, _mm512_castps_si512(t[d]));
        }
      }
    }
  }
  if (q.bits == 4) {  // per group of the block (k0 is a multiple of the group): 2 gathers each
    const int64_t G = q.row_bytes * 2 / q.group;
    for (int h = 0; h < 2; ++h) {
      int32_t row[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t j = 32 * p + 16 * h + i;
        const int64_t ch = j < cw ? channel(j) : 0;  // its scales' first index
        row[i] = static_cast<int32_t>(q.o16 ? (ch - ch % 16) * G + ch % 16 : ch * G);
      }
      const __m512i base = _mm512_loadu_si512(row);
      const __mmask16 m = tail_mask(cw - 32 * p - 16 * h);
      for (int64_t g = 0; g < kc / q.group; ++g) {
        const __m512i idx = _mm512_add_epi32(base, _mm512_set1_epi32(static_cast<int32_t>(
                                                       (k0 / q.group + g) * (q.o16 ? 16 : 1))));
        _mm512_storeu_ps(S + 32 * g + 16 * h, _mm512_mask_i32gather_ps(
                                                  _mm512_setzero_ps(), m, idx, q.scales, 4));
        _mm512_storeu_ps(Z + 32 * g + 16 * h, _mm512_mask_i32gather_ps(
                                                  _mm512_setzero_ps(), m, idx, q.zeros, 4));
      }
    }
  }
}

// C[R, 32 columns] (masks m0, m1; += C unless first) of R row records against one packed
// panel of chunks c0.. c0 + chunks; int8: times s (32 channel scales) when given (the last
// block).
template <int R, int BITS>
VNNI void a8_panel(const char* const* rec, const A8Rows& L, int64_t c0, int64_t chunks,
                   const uint8_t* P, const float* S, const float* Z, float* C, int64_t ldc,
                   __mmask16 m0, __mmask16 m1, bool first, const float* s8) {
  __m512 f[R][2];
  for (int r = 0; r < R; ++r) {
    f[r][0] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, C + r * ldc);
    f[r][1] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, C + r * ldc + 16);
  }
  const int64_t per_group = BITS == 4 ? L.group / 32 : 1;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t c = c0 + ch;
    __m512i a[R][2];
    for (int r = 0; r < R; ++r) {
      const __m512i init = BITS == 8
          ? _mm512_set1_epi32(reinterpret_cast<const int32_t*>(rec[r] + L.nc_off)[c])
          : _mm512_setzero_si512();
      a[r][0] = init, a[r][1] = init;
    }
    const uint8_t* pk = P + ch * 8 * 128;
    for (int kk = 0; kk < 8; ++kk) {
      const __m512i b0 = _mm512_loadu_si512(pk + 128 * kk);
      const __m512i b1 = _mm512_loadu_si512(pk + 128 * kk + 64);
      for (int r = 0; r < R; ++r) {
        int32_t x4;
        std::memcpy(&x4, rec[r] + 32 * c + 4 * kk, 4);
        const __m512i xb = _mm512_set1_epi32(x4);
        a[r][0] = _mm512_dpbusd_epi32(a[r][0], b0, xb);
        a[r][1] = _mm512_dpbusd_epi32(a[r][1], b1, xb);
      }
    }
    if constexpr (BITS == 8) {
      for (int r = 0; r < R; ++r) {
        const __m512 sx = _mm512_set1_ps(reinterpret_cast<const float*>(rec[r] + L.sx_off)[c]);
        f[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][0]), sx, f[r][0]);
        f[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][1]), sx, f[r][1]);
      }
    } else {
      const float* sg = S + 32 * (ch / per_group);
      const __m512 s0 = _mm512_loadu_ps(sg), s1 = _mm512_loadu_ps(sg + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 sx = _mm512_set1_ps(reinterpret_cast<const float*>(rec[r] + L.sx_off)[c]);
        f[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][0]), _mm512_mul_ps(s0, sx), f[r][0]);
        f[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][1]), _mm512_mul_ps(s1, sx), f[r][1]);
      }
      if (c % per_group == per_group - 1) {  // the group's last chunk: its zero points
        const float* zg = Z + 32 * (ch / per_group);
        const __m512 z0 = _mm512_loadu_ps(zg), z1 = _mm512_loadu_ps(zg + 16);
        for (int r = 0; r < R; ++r) {
          const __m512 zx = _mm512_set1_ps(
              reinterpret_cast<const float*>(rec[r] + L.zx_off)[c / per_group]);
          f[r][0] = _mm512_fmadd_ps(z0, zx, f[r][0]);
          f[r][1] = _mm512_fmadd_ps(z1, zx, f[r][1]);
        }
      }
    }
  }
  if (BITS == 8 && s8) {
    const __m512 s0 = _mm512_loadu_ps(s8), s1 = _mm512_loadu_ps(s8 + 16);
    for (int r = 0; r < R; ++r) f[r][0] = _mm512_mul_ps(f[r][0], s0), f[r][1] = _mm512_mul_ps(f[r][1], s1);
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(C + r * ldc, m0, f[r][0]);
    _mm512_mask_storeu_ps(C + r * ldc + 16, m1, f[r][1]);
  }
}

template <int BITS>
VNNI void a8_rows(int R, const char* const* rec, const A8Rows& L, int64_t c0, int64_t chunks,
                  const uint8_t* P, const float* S, const float* Z, float* C, int64_t ldc,
                  __mmask16 m0, __mmask16 m1, bool first, const float* s8) {
  switch (R) {
    case 6: return a8_panel<6, BITS>(rec, L, c0, chunks, P, S, Z, C, ldc, m0, m1, first, s8);
    case 5: return a8_panel<5, BITS>(rec, L, c0, chunks, P, S, Z, C, ldc, m0, m1, first, s8);
    case 4: return a8_panel<4, BITS>(rec, L, c0, chunks, P, S, Z, C, ldc, m0, m1, first, s8);
    case 3: return a8_panel<3, BITS>(rec, L, c0, chunks, P, S, Z, C, ldc, m0, m1, first, s8);
    case 2: return a8_panel<2, BITS>(rec, L, c0, chunks, P, S, Z, C, ldc, m0, m1, first, s8);
    default: return a8_panel<1, BITS>(rec, L, c0, chunks, P, S, Z, C, ldc, m0, m1, first, s8);
  }
}

// C [M, cw] = the rows' records (rounded inputs) @ the quantized q read as [K, cw]: column
// j is channel n0 + j for j < split, else n1 + j - split. K % 32 == 0. Panel by panel: its
// weights packed once, then every row block against them; the next panel's bytes
// prefetched (into L2) while this one's rows run.
NOINLINE VNNI void igemm_a8(const char* const* rec, const A8Rows& L, const QMatrix& q,
                            int64_t n0, int64_t n1, int64_t split, float* C, int64_t ldc,
                            int64_t M, int64_t cw) {
  const int64_t K = L.K, panels = ceil_div(cw, 32), kcmax = std::min(A8_KC, K);
  // this thread's packed panel block: weights, then int4 scales and zeros, int8 scales
  float* buf = thread_buffer(3, kcmax * 8 + 2 * kcmax + 32);
  uint8_t* P = reinterpret_cast<uint8_t*>(buf);
  float* S = buf + kcmax * 8;
  float* Z = S + kcmax;
  float* s8 = Z + kcmax;
  const TileColumns cols{n0, n1, split};
  auto channel = [&](int64_t j) { return cols.channel(j); };
  const int64_t row_lines = ((q.bits == 8 ? kcmax : kcmax / 2) + 63) / 64;
  for (int64_t p = 0; p < panels; ++p) {
    const __mmask16 m0 = tail_mask(cw - 32 * p), m1 = tail_mask(cw - 32 * p - 16);
    if (q.bits == 8)
      for (int64_t j = 0; j < 32; ++j)
        s8[j] = 32 * p + j < cw ? q.scales[channel(32 * p + j)] : 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += A8_KC) {
      const int64_t kc = std::min(A8_KC, K - k0), chunks = kc / 32;
      const bool first = k0 == 0, last = k0 + kc == K;
      pack_a8(q, cols, cw, p, k0, kc, P, S, Z);
      if (last && p + 1 < panels)  // the next panel's first block
        for (int64_t j = 32 * (p + 1); j < std::min(cw, 32 * (p + 2)); ++j) {
          const char* row = reinterpret_cast<const char*>(q.data + channel(j) * q.row_bytes);
          for (int64_t l = 0; l < row_lines; ++l) _mm_prefetch(row + 64 * l, _MM_HINT_T1);
        }
      for (int64_t r0 = 0; r0 < M; r0 += A8_ROWS) {
        const int R = static_cast<int>(std::min<int64_t>(A8_ROWS, M - r0));
        float* Cp = C + r0 * ldc + 32 * p;
        if (q.bits == 8)
          a8_rows<8>(R, rec + r0, L, k0 / 32, chunks, P, nullptr, nullptr, Cp, ldc, m0, m1,
                     first, last ? s8 : nullptr);
        else
          a8_rows<4>(R, rec + r0, L, k0 / 32, chunks, P, S, Z, Cp, ldc, m0, m1, first, nullptr);
      }
    }
  }
}

#else  // not x86-64: aten's mm only

constexpr bool CPU_AVX512F = false;
constexpr bool CPU_VNNI = false;
constexpr int64_t A8_KC = 2048;
struct A8Rows {
  int64_t K = 0, group = 0, sx_off = 0, nc_off = 0, zx_off = 0, bytes = 64;
  A8Rows(int64_t, int64_t) {}
};
// never called (sgemm_enabled() is false)
void sgemm_rows(const float* const*, const float*, const float*, int64_t, int64_t, float*,
                int64_t, int64_t, int64_t, int64_t) {}
void sgemm_q(const float* const*, const QMatrix&, int64_t, int64_t, int64_t, float*, int64_t,
             int64_t, int64_t, int64_t) {}
void round_row_a8(const float*, const A8Rows&, char*) {}
void igemm_a8(const char* const*, const A8Rows&, const QMatrix&, int64_t, int64_t, int64_t,
              float*, int64_t, int64_t, int64_t) {}

#endif

std::atomic<int64_t> SGEMM_TILES{0};  // tiles sgemm_rows has run (for tests)

// Whether sgemm_rows may run this call: an AVX-512F CPU and MOEKIT_SGEMM not 0 (read per
// call, for A/B runs and tests).
bool sgemm_enabled() {
  const char* env = std::getenv("MOEKIT_SGEMM");
  return CPU_AVX512F && !(env && std::string(env) == "0");
}

// Whether it runs one tile of an expert of `rows` rows: fp32, unit column strides, few
// rows, a weight of at least SGEMM_MIN_WEIGHT elements (2 MiB: smaller ones come from
// the caches, where MKL's packing costs little; training's [512, 512] experts at 32 rows
// ran 1.04x slower on sgemm_rows).
bool sgemm_weight(const torch::Tensor& b, int64_t rows) {
  return rows <= SGEMM_MAX_ROWS && b.size(0) * b.stride(0) >= SGEMM_MIN_WEIGHT &&
         b.size(0) > 0 && b.scalar_type() == torch::kFloat && b.stride(1) == 1;
}

bool use_sgemm(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& out,
               int64_t rows) {
  return sgemm_weight(b, rows) && a.scalar_type() == torch::kFloat &&
         out.scalar_type() == torch::kFloat && a.stride(1) == 1 && out.stride(1) == 1;
}

}  // namespace

// ---- Few GEMM shapes for bf16 / fp16 --------------------------------------------------
//
// aten's bf16 and fp16 mm on CPU runs oneDNN, which builds a primitive for each new GEMM
// shape and caches it: 2.5-3.0 ms to build against 0.23-0.26 ms to run a cached one
// ([M, 128] @ [128, 512] bf16, M = 1300-1400, 1 and 2 threads, this Xeon, 2026-12-04).
// An expert's row count changes every training step, so nearly every expert GEMM built a
// primitive: `moekit train --bf16` ran at 5.3k tokens/s against 14.8k in fp32. So for
// these dtypes the data GEMMs run in two row pieces, a multiple of 64 and the rest (< 64
// shapes of the second, one first shape per 64 rows of range), and the weight gradients,
// whose reduction runs over the expert's rows, over rows zero-padded to a multiple of 1/8
// of their power of two (at least 16): at most 8 shapes per octave, < 12.5% more
// multiply-adds. (Pieces of 1024, 512, ..., 16 and < 16, 22 shapes, cost the reused-shape
// case 13-19% in calls; these two 3-9%.) fp32 runs MKL's sgemm, which builds nothing per
// shape, and is left as it was.

bool few_shapes(const torch::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// out = a @ b in the row pieces above (each row's result comes from one GEMM).
void mm_row_pieces(torch::Tensor& out, const torch::Tensor& a, const torch::Tensor& b) {
  const int64_t M = a.size(0);
  int64_t r = 0;
  auto piece = [&](int64_t m) {
    auto o = out.narrow(0, r, m);
    at::mm_out(o, a.narrow(0, r, m), b);
    r += m;
  };
  if (M >= 64) piece(M / 64 * 64);
  if (M > r) piece(M - r);
}

// The padded reduction length for n rows: a multiple of max(16, 2^floor(log2 n) / 8).
int64_t padded_rows(int64_t n) {
  int64_t top = 1;
  while (top * 2 <= n) top *= 2;
  const int64_t g = std::max<int64_t>(16, top / 8);
  return (n + g - 1) / g * g;
}

// out = a_nX^T @ b_nY over n rows zero-padded to padded_rows(n) (a, b: row slices).
void mm_weight_padded(torch::Tensor& out, const torch::Tensor& a, const torch::Tensor& b) {
  const int64_t n = a.size(0), np = padded_rows(n);
  if (np == n) {
    at::mm_out(out, a.t(), b);
    return;
  }
  auto ap = at::empty({np, a.size(1)}, a.options());
  auto bp = at::empty({np, b.size(1)}, b.options());
  ap.narrow(0, 0, n).copy_(a), ap.narrow(0, n, np - n).zero_();  // each row written once
  bp.narrow(0, 0, n).copy_(b), bp.narrow(0, n, np - n).zero_();
  at::mm_out(out, ap.t(), bp);
}

// Row pointers for sgemm_rows (const float*) and igemm_a8 (const char*: the rows' records):
// row r at `row(r)`, in this thread's array (reused).
template <typename Row>
auto row_ptrs(int64_t M, const Row& row) {
  using P = decltype(row(int64_t{0}));
  thread_local std::vector<P> rows;
  if (static_cast<int64_t>(rows.size()) < M) rows.resize(M);
  for (int64_t r = 0; r < M; ++r) rows[r] = row(r);
  return static_cast<const P*>(rows.data());
}

// Row r of the tile [rows, cols] at c (row stride ldc) times scale[r].
void scale_rows(float* c, int64_t ldc, int64_t rows, int64_t cols, const float* scale) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = c + r * ldc;
    const float w = scale[r];
    for (int64_t j = 0; j < cols; ++j) row[j] *= w;
  }
}

// Tasks of about equal cost over the experts' output tiles; each runs one tile's GEMM and,
// given `scale` (one float per row), multiplies the tile's rows by it while they are
// still in the cache. Shared by the stacked and the list form below.
template <typename B>
void grouped_mm_tiles(const torch::Tensor& a_NX, const B& b_of, int64_t Y,
                      const std::vector<int64_t>& ends, torch::Tensor& out_NY,
                      const float* scale = nullptr) {
  const auto starts = starts_of(ends);
  const bool sgemm = sgemm_enabled();
  run(expert_tiles(ends, a_NX.size(1), Y), [&](const Task& t) {
    auto out = out_NY.narrow(0, t.r0, t.r1 - t.r0).narrow(1, t.c0, t.c1 - t.c0);
    const auto a = a_NX.narrow(0, t.r0, t.r1 - t.r0);
    const auto b = b_of(t.expert).narrow(1, t.c0, t.c1 - t.c0);
    float* c = static_cast<float*>(out.data_ptr());
    if (sgemm && use_sgemm(a, b, out, ends[t.expert] - starts[t.expert])) {
      SGEMM_TILES.fetch_add(1, std::memory_order_relaxed);
      const float* a0 = static_cast<const float*>(a.data_ptr());
      const float* b0 = static_cast<const float*>(b.data_ptr());
      sgemm_rows(row_ptrs(a.size(0), [&](int64_t r) { return a0 + r * a.stride(0); }), b0, b0,
                 b.size(1), b.stride(0), c, out.stride(0), a.size(0), a.size(1), b.size(1));
    } else if (few_shapes(a)) {
      mm_row_pieces(out, a, b);
    } else {
      at::mm_out(out, a, b);
    }
    if (scale != nullptr) scale_rows(c, out.stride(0), out.size(0), out.size(1), scale + t.r0);
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
    const auto a = a_NX.narrow(0, s, n).narrow(1, t.r0, t.r1 - t.r0);
    const auto b = b_NY.narrow(0, s, n).narrow(1, t.c0, t.c1 - t.c0);
    if (few_shapes(a)) {
      mm_weight_padded(out, a, b);
    } else {
      at::mm_out(out, a.t(), b);
    }
  });
}

// ---- SwiGLU in one pass over the rows (fp32) ----------------------------------
//
// The fused path's activation, forward and backward, each one loop over h = [gate | up]
// instead of 2 (forward) and 5 (backward) aten passes: 0.65 vs 2.66 ms for the
// backward of 8192 x 128, 7.3 vs 20.7 ms for 8192 x 1024 (2 threads, an AMD VM). On the
// Intel AVX-512 VM of 2026-12-04, after the exp_poly fix below (before it in brackets),
// 2 threads, 8192 x 1024: forward 1.85 ms [12.25], backward 4.68 ms [12.79]. exp is a
// polynomial the compiler vectorizes (relative error ~2e-7, as close to fp64
// as aten's silu); target_clones builds AVX-512, AVX2 and baseline versions.

namespace {

// exp(x) = 2^n * p(r), r = x - n ln2, a degree-6 polynomial (Cephes expf);
// branch-free so that loops over it vectorize. x is clamped to [-87, 89]: from 88.4 up
// n = 128 makes 2^n +inf, so the sigmoids below are exactly 0 there, not a subnormal.
// That matters for speed: GCC's jump threading turns each clamp into a path of its own,
// and the vectorized loop computes the clamped path's result for every lane and blends.
// With the upper clamp at 88 that path was gate * 1 / (1 + e^88) = gate * 6e-39, a
// subnormal product in nearly every vector, and each one cost a microcode assist on
// Intel: 3.0 ns per element instead of 0.33 (one thread, a /tmp loop, 2026-12-04).
inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 89.0f ? 89.0f : x;
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

// The backward of one routed row of combine weight w, with that weight's gradient: from
// gu = dy[tok] @ w_out^T (the gradient of w * a), da = w gu; writes aw = w a (what
// dW_out multiplies) and dh = [da u silu'(g) | da silu(g)], returns d w = sum_j gu_j a_j.
// Sixteen partial sums (lane l holds j = l mod 16), so the loop vectorizes without
// reassociating one sum.
__attribute__((target_clones("avx512f", "avx2", "default")))
float swiglu_backward_weighted_row(const float* __restrict gate, const float* __restrict up,
                                   const float* __restrict gu, float w, float* __restrict aw,
                                   float* __restrict dgate, float* __restrict dup, int64_t F) {
  float part[16] = {};
  auto one = [&](int64_t j, float& acc) {
    const float g = gate[j], u = up[j], dg = gu[j];
    const float s = 1.0f / (1.0f + exp_poly(-g)), sg = g * s, a = sg * u, d = dg * w;
    aw[j] = a * w;
    dup[j] = d * sg;
    dgate[j] = d * u * s * (1.0f + g * (1.0f - s));
    acc += dg * a;
  };
  int64_t j0 = 0;
  for (; j0 + 16 <= F; j0 += 16)
    for (int l = 0; l < 16; ++l) one(j0 + l, part[l]);
  for (int64_t j = j0; j < F; ++j) one(j, part[j - j0]);
  float sum = 0.0f;
  for (int l = 0; l < 16; ++l) sum += part[l];
  return sum;
}

// bf16 rows (uint16_t bits) run the fp32 loops above on chunks widened into stack
// buffers and round the results to nearest even: written as one loop over bf16
// elements, GCC's code took twice fp32's time per element (2026-12-04, this Xeon).
// The rounding has no NaN case: a NaN here is a bf16 input's (low 16 bits 0) or one
// arithmetic made (0x7FC00000 or its negative), and adding 0x7FFF to those cannot carry
// into the exponent.
constexpr int64_t GLU_CHUNK = 256;

__attribute__((target_clones("avx512f", "avx2", "default")))
void widen(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = static_cast<uint32_t>(src[j]) << 16;
    std::memcpy(dst + j, &u, sizeof u);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void narrow(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u;
    std::memcpy(&u, src + j, sizeof u);
    dst[j] = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

void swiglu_rows(const uint16_t* gate, const uint16_t* up, uint16_t* a, int64_t F) {
  alignas(64) float g[GLU_CHUNK], u[GLU_CHUNK], o[GLU_CHUNK];
  for (int64_t j = 0; j < F; j += GLU_CHUNK) {
    const int64_t n = std::min(GLU_CHUNK, F - j);
    widen(gate + j, g, n), widen(up + j, u, n);
    swiglu_rows(g, u, o, n);
    narrow(o, a + j, n);
  }
}

float swiglu_backward_weighted_row(const uint16_t* gate, const uint16_t* up,
                                   const uint16_t* gu, float w, uint16_t* aw,
                                   uint16_t* dgate, uint16_t* dup, int64_t F) {
  alignas(64) float g[GLU_CHUNK], u[GLU_CHUNK], d[GLU_CHUNK], o[3][GLU_CHUNK];
  float sum = 0.0f;
  for (int64_t j = 0; j < F; j += GLU_CHUNK) {
    const int64_t n = std::min(GLU_CHUNK, F - j);
    widen(gate + j, g, n), widen(up + j, u, n), widen(gu + j, d, n);
    sum += swiglu_backward_weighted_row(g, u, d, w, o[0], o[1], o[2], n);
    narrow(o[0], aw + j, n), narrow(o[1], dgate + j, n), narrow(o[2], dup + j, n);
  }
  return sum;
}

// A float32 tensor of `dim` dimensions whose last one is contiguous.
void check_float_rows(const torch::Tensor& t, const char* name, int64_t dim) {
  check(t, name, dim);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.stride(dim - 1) == 1, name, " must have contiguous rows, got strides ",
              t.strides());
}

void check_rows(const torch::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  check_float_rows(t, name, 2);
  TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, name, " must be [", rows, ", ", cols,
              "], got ", t.sizes());
}

// As check_rows, for the one-pass SwiGLU: float32 or bfloat16, the dtype of `like`.
void check_glu_rows(const torch::Tensor& t, const char* name, int64_t rows, int64_t cols,
                    const torch::Tensor& like) {
  check(t, name, 2);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must be ", like.scalar_type(),
              " like h_NG, got ", t.scalar_type());
  TORCH_CHECK(t.stride(1) == 1, name, " must have contiguous rows, got strides ", t.strides());
  TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, name, " must be [", rows, ", ", cols,
              "], got ", t.sizes());
}

// T* of a float32 or bfloat16 tensor's data (the caller checked the dtype).
template <typename T>
T* elems(const torch::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) {
    return t.data_ptr<float>();
  } else {
    return reinterpret_cast<T*>(t.data_ptr<at::BFloat16>());
  }
}

}  // namespace

// body(T{}) with T = float, or uint16_t (bf16 bits) where t is bfloat16.
template <typename Body>
void glu_dispatch(const torch::Tensor& t, Body&& body) {
  if (t.scalar_type() == at::kBFloat16) {
    body(uint16_t{});
  } else {
    body(float{});
  }
}

// a_NF = silu(gate) * up for h_NG = [gate | up] (gate first); float32, or bfloat16
// computed in fp32 with one rounding per output.
void swiglu_out(const torch::Tensor& h_NG, torch::Tensor& a_NF) {
  const int64_t N = h_NG.size(0), F = a_NF.size(1);
  check_glu_rows(h_NG, "h_NG", N, 2 * F, h_NG);
  check_glu_rows(a_NF, "a_NF", N, F, h_NG);
  glu_dispatch(h_NG, [&](auto tag) {
    using T = decltype(tag);
    const T* h = elems<T>(h_NG);
    T* a = elems<T>(a_NF);
    at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* g = h + r * h_NG.stride(0);
        swiglu_rows(g, g + F, a + r * a_NF.stride(0), F);
      }
    });
  });
}

// The fused path's per-row backward around the activation in one pass (float32 or
// bfloat16 rows, w_N and dw_N float32): from gu_NF = dy[tok] @ w_out^T and the combine
// weights w_N, aw_NF = w * silu(gate) * up (for dW_out), dh_NG = [da up silu'(gate) |
// da silu(gate)] with da = w gu (for dW_in and dx), dw_N = rowsum(gu * silu(gate) * up)
// (the combine weights' gradient). Replaces nine aten passes (2026-12-04).
void swiglu_backward_weighted_out(const torch::Tensor& h_NG, const torch::Tensor& gu_NF,
                                  const torch::Tensor& w_N, torch::Tensor& aw_NF,
                                  torch::Tensor& dh_NG, torch::Tensor& dw_N) {
  const int64_t N = h_NG.size(0), F = gu_NF.size(1);
  check_glu_rows(h_NG, "h_NG", N, 2 * F, h_NG);
  check_glu_rows(gu_NF, "gu_NF", N, F, h_NG);
  check_glu_rows(aw_NF, "aw_NF", N, F, h_NG);
  check_glu_rows(dh_NG, "dh_NG", N, 2 * F, h_NG);
  auto check_vec = [N](const torch::Tensor& v, const char* name) {
    check(v, name, 1);
    TORCH_CHECK(v.scalar_type() == at::kFloat && v.is_contiguous() && v.size(0) == N, name,
                " must be a contiguous float32 [", N, "], got ", v.scalar_type(), " ",
                v.sizes());
  };
  check_vec(w_N, "w_N");
  check_vec(dw_N, "dw_N");
  const float* w = w_N.data_ptr<float>();
  float* dw = dw_N.data_ptr<float>();
  glu_dispatch(h_NG, [&](auto tag) {
    using T = decltype(tag);
    const T* h = elems<T>(h_NG);
    const T* gu = elems<T>(gu_NF);
    T* aw = elems<T>(aw_NF);
    T* dh = elems<T>(dh_NG);
    at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* g = h + r * h_NG.stride(0);
        T* dg = dh + r * dh_NG.stride(0);
        dw[r] = swiglu_backward_weighted_row(g, g + F, gu + r * gu_NF.stride(0), w[r],
                                                aw + r * aw_NF.stride(0), dg, dg + F, F);
      }
    });
  });
}

// From da_NF: a_NF = silu(gate) * up (the recomputed activation) and
// dh_NG = [da * up * silu'(gate) | da * silu(gate)]; float32 or bfloat16 (as swiglu_out).
// The weighted pass above with every weight 1 (a * 1 and da * 1 are exact).
void swiglu_backward_out(const torch::Tensor& h_NG, const torch::Tensor& da_NF,
                         torch::Tensor& a_NF, torch::Tensor& dh_NG) {
  const auto f32 = h_NG.options().dtype(at::kFloat);
  auto dw = at::empty({h_NG.size(0)}, f32);
  swiglu_backward_weighted_out(h_NG, da_NF, at::ones({h_NG.size(0)}, f32), a_NF, dh_NG, dw);
}

// ---- An fp32 SwiGLU expert layer's forward for inference, in three parallel passes ----
//
// moe_experts._forward_block makes four passes over the routed rows besides its two
// grouped GEMMs: it gathers x's rows (index_select), applies the activation
// (swiglu_out), multiplies by the routing weights (mul_) and adds the rows into their
// tokens (index_add_); at a 512-token prefill of bench_decode's fine model (4096 rows x
// D = 1024) they took ~2.7 ms a layer against ~42 ms of GEMMs. Where nothing is saved for
// backward, this does them inside the GEMMs' tasks, on rows still in the cache:
//  1. gate and up: a task is an expert's rows times the same columns of its gate and of
//     its up projection; sgemm_rows reads x's rows where they are (row pointers) and
//     aten's mm (experts of more rows) from a copy in this thread's buffer, at most
//     ROW_CHUNK rows at a time; the task's [rows, 2 x cols] gate|up tile stays in this
//     thread's buffer, and only its SwiGLU is written, to a_NF (h is never stored);
//  2. down: grouped_mm_tiles with each tile's rows times their routing weight;
//  3. the combine: each token's rows added into out_TD in row order, parallel over tokens.
// Each output element is computed by the same operations in the same order as on
// _forward_block's path (a token's rows summed in row order, as index_add_ does).

namespace {

// Rows per aten mm in step 1: each thread's buffers hold at most ROW_CHUNK x (D + 2 x a
// task's columns) floats (2 MiB at D = 1024, where a 507-row expert would have taken 4
// MiB); at 256 the fine prefill took the same time as in one piece (266.6 / 266.8 ms,
// 9 interleaved pairs), at 128 1.03x.
constexpr int64_t ROW_CHUNK = 256;

__attribute__((target_clones("avx512f", "avx2", "default")))
void add_row(float* __restrict out, const float* __restrict y, int64_t D) {
  for (int64_t j = 0; j < D; ++j) out[j] += y[j];
}

// The checks of the rows, routing and scratch every forward below makes; returns the rows.
int64_t check_swiglu_rows(const torch::Tensor& x_TD, const torch::Tensor& tok_N,
                          const torch::Tensor& w_N, int64_t experts,
                          const std::vector<int64_t>& ends, const torch::Tensor& a_NF,
                          const torch::Tensor& y_ND, const torch::Tensor& out_TD) {
  check_float_rows(x_TD, "x_TD", 2);
  check_float_rows(out_TD, "out_TD", 2);
  check_float_rows(a_NF, "a_NF", 2);
  check_float_rows(y_ND, "y_ND", 2);
  check(tok_N, "tok_N", 1);
  check(w_N, "w_N", 1);
  const int64_t T = x_TD.size(0), D = x_TD.size(1), N = tok_N.size(0);
  TORCH_CHECK(tok_N.scalar_type() == at::kLong && tok_N.is_contiguous(),
              "tok_N must be contiguous int64, got ", tok_N.scalar_type());
  TORCH_CHECK(w_N.scalar_type() == at::kFloat && w_N.is_contiguous() && w_N.size(0) == N,
              "w_N must be contiguous float32 of ", N, " rows, got ", w_N.scalar_type(), " ",
              w_N.sizes());
  TORCH_CHECK(out_TD.size(0) == T && out_TD.size(1) == D, "out_TD must be [", T, ", ", D,
              "], got ", out_TD.sizes());
  TORCH_CHECK(a_NF.size(0) >= N && y_ND.size(0) >= N && y_ND.size(1) == D, "a_NF ",
              a_NF.sizes(), " and y_ND ", y_ND.sizes(), " must have ", N, " rows and y_ND ",
              D, " columns");
  check_ends(ends, experts, N);
  const int64_t rows = ends.empty() ? 0 : ends.back();
  const int64_t* tok = tok_N.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(tok[r] >= 0 && tok[r] < T, "tok_N[", r, "]=", tok[r], " is not a row of x_TD (",
                T, " rows)");
  return rows;
}

// 3. of the forwards: out[t] += its rows of y, in row order, parallel over tokens.
void combine_rows(const int64_t* tok, int64_t rows, const torch::Tensor& y_ND,
                  torch::Tensor& out_TD) {
  const int64_t T = out_TD.size(0), D = out_TD.size(1);
  std::vector<int64_t> first(T + 1, 0), order(rows);
  for (int64_t r = 0; r < rows; ++r) ++first[tok[r] + 1];
  for (int64_t t = 0; t < T; ++t) first[t + 1] += first[t];
  {
    std::vector<int64_t> pos(first.begin(), first.end() - 1);
    for (int64_t r = 0; r < rows; ++r) order[pos[tok[r]]++] = r;
  }
  const float* y = y_ND.data_ptr<float>();
  float* out = out_TD.data_ptr<float>();
  const int64_t ldy = y_ND.stride(0), ldo = out_TD.stride(0);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = first[t]; i < first[t + 1]; ++i) add_row(out + t * ldo, y + order[i] * ldy, D);
  });
}

// The forward; w_in_of(i) is expert i's [D, 2F] (gate | up), w_out_of(i) its [F, D].
template <typename WI, typename WO>
void swiglu_experts(const torch::Tensor& x_TD, const torch::Tensor& tok_N,
                    const torch::Tensor& w_N, const WI& w_in_of, const WO& w_out_of,
                    int64_t experts, const std::vector<int64_t>& ends, torch::Tensor& a_NF,
                    torch::Tensor& y_ND, torch::Tensor& out_TD) {
  const int64_t rows = check_swiglu_rows(x_TD, tok_N, w_N, experts, ends, a_NF, y_ND, out_TD);
  const int64_t D = x_TD.size(1), F = a_NF.size(1);
  for (int64_t i = 0; i < experts; ++i) {
    const auto wi = w_in_of(i), wo = w_out_of(i);
    TORCH_CHECK(wi.dim() == 2 && wi.size(0) == D && wi.size(1) == 2 * F &&
                    wi.scalar_type() == at::kFloat,
                "expert ", i, "'s w_in must be float32 [", D, ", ", 2 * F, "], got ",
                wi.scalar_type(), " ", wi.sizes());
    TORCH_CHECK(wo.dim() == 2 && wo.size(0) == F && wo.size(1) == D &&
                    wo.scalar_type() == at::kFloat,
                "expert ", i, "'s w_out must be float32 [", F, ", ", D, "], got ",
                wo.scalar_type(), " ", wo.sizes());
  }
  if (rows == 0) return;

  const auto starts = starts_of(ends);
  const int64_t* tok = tok_N.data_ptr<int64_t>();
  const float* x = x_TD.data_ptr<float>();
  const int64_t ldx = x_TD.stride(0), lda = a_NF.stride(0);
  float* a = a_NF.data_ptr<float>();
  const auto opts = x_TD.options();
  const bool sgemm = sgemm_enabled();

  // 1. a = swiglu(x[tok] @ w_in)
  run(expert_tiles(ends, 2.0 * D, F, 64), [&](const Task& t) {
    const int64_t n = t.r1 - t.r0, cw = t.c1 - t.c0;
    const auto b = w_in_of(t.expert);
    const int64_t* tk = tok + t.r0;
    // a's rows r0.. of this task from its m x [gate cw | up cw] tile h
    auto act = [&](const float* h, int64_t r0, int64_t m) {
      for (int64_t r = 0; r < m; ++r)
        swiglu_rows(h + r * 2 * cw, h + r * 2 * cw + cw, a + (t.r0 + r0 + r) * lda + t.c0, cw);
    };
    if (sgemm && sgemm_weight(b, ends[t.expert] - starts[t.expert])) {
      SGEMM_TILES.fetch_add(1, std::memory_order_relaxed);
      float* h = thread_buffer(0, n * 2 * cw);
      const auto A = row_ptrs(n, [&](int64_t r) { return x + tk[r] * ldx; });
      const float* g = static_cast<const float*>(b.data_ptr()) + t.c0;
      const float* u = g + F;
      if (cw % 64 == 0) {
        sgemm_rows(A, g, u, cw, b.stride(0), h, 2 * cw, n, D, 2 * cw);
      } else {  // the last, narrow tile: each half on its own
        sgemm_rows(A, g, g, cw, b.stride(0), h, 2 * cw, n, D, cw);
        sgemm_rows(A, u, u, cw, b.stride(0), h + cw, 2 * cw, n, D, cw);
      }
      act(h, 0, n);
      return;
    }
    // aten's mm on this thread's copy of the rows, ROW_CHUNK rows at a time
    const int64_t chunk = std::min(n, ROW_CHUNK);
    float* xg = thread_buffer(1, chunk * D);
    float* h = thread_buffer(0, chunk * 2 * cw);
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t m = std::min(chunk, n - r0);
      for (int64_t r = 0; r < m; ++r)
        std::memcpy(xg + r * D, x + tk[r0 + r] * ldx, D * sizeof(float));
      const auto xt = torch::from_blob(xg, {m, D}, opts);
      auto ht = torch::from_blob(h, {m, 2 * cw}, opts);
      if (cw == F) {
        at::mm_out(ht, xt, b);
      } else {
        auto hg = ht.narrow(1, 0, cw), hu = ht.narrow(1, cw, cw);
        at::mm_out(hg, xt, b.narrow(1, t.c0, cw));
        at::mm_out(hu, xt, b.narrow(1, F + t.c0, cw));
      }
      act(h, r0, m);
    }
  });

  // 2. y = (a @ w_out) * w, row by row
  grouped_mm_tiles(a_NF.narrow(0, 0, rows), w_out_of, D, ends, y_ND, w_N.data_ptr<float>());

  // 3. out[t] += its rows of y
  combine_rows(tok, rows, y_ND, out_TD);
}

}  // namespace

// out_TD[t] += sum over the rows r of token t (tok_N[r] = t) of
// w_N[r] * (silu(x[t] @ gate) * (x[t] @ up)) @ w_out, gate | up = w_in_EDG[e] for row r's
// expert e (rows sorted by expert, ends[e] the end row of expert e). a_NF and y_ND are
// scratch rows. Nothing is kept for a backward.
void swiglu_experts_out(const torch::Tensor& x_TD, const torch::Tensor& tok_N,
                        const torch::Tensor& w_N, const torch::Tensor& w_in_EDG,
                        const torch::Tensor& w_out_EFD, const std::vector<int64_t>& ends,
                        torch::Tensor& a_NF, torch::Tensor& y_ND, torch::Tensor& out_TD) {
  check(w_in_EDG, "w_in_EDG", 3);
  check(w_out_EFD, "w_out_EFD", 3);
  TORCH_CHECK(w_in_EDG.size(0) == w_out_EFD.size(0), "w_in_EDG ", w_in_EDG.sizes(),
              " and w_out_EFD ", w_out_EFD.sizes(), " must have the same experts");
  swiglu_experts(
      x_TD, tok_N, w_N, [&](int64_t i) { return w_in_EDG.select(0, i); },
      [&](int64_t i) { return w_out_EFD.select(0, i); }, w_in_EDG.size(0), ends, a_NF, y_ND,
      out_TD);
}

// The same with the experts' matrices as lists (the expert cache's).
void swiglu_experts_list_out(const torch::Tensor& x_TD, const torch::Tensor& tok_N,
                             const torch::Tensor& w_N, const std::vector<torch::Tensor>& w_in,
                             const std::vector<torch::Tensor>& w_out,
                             const std::vector<int64_t>& ends, torch::Tensor& a_NF,
                             torch::Tensor& y_ND, torch::Tensor& out_TD) {
  TORCH_CHECK(w_in.size() == w_out.size(), "w_in has ", w_in.size(), " experts, w_out ",
              w_out.size());
  swiglu_experts(
      x_TD, tok_N, w_N, [&](int64_t i) { return w_in[i]; }, [&](int64_t i) { return w_out[i]; },
      static_cast<int64_t>(w_in.size()), ends, a_NF, y_ND, out_TD);
}

// ---- The same forward on quantized weights (int8 / int4, moekit.quant's layout) ----------
//
// A quantized model's prefill ran this layer on float weights: it dequantized each block of
// 8 experts into a float32 [8, N, K] buffer (4 bytes written and read again per weight) and
// ran aten's mm on the transposed views. Here sgemm_q dequantizes inside the GEMM's packing
// (QNextBlock): it reads 1 (int8) or 0.5 + 0.125 (int4 g64) bytes per weight, and the
// float weights exist only as the packed block in L1/L2. Every expert, however many rows,
// runs on sgemm_q (no aten fallback: that would need the float weights written out), and the
// packed values are dequantize's bitwise, so each output equals sgemm_rows' on
// dequantize's weights.

namespace {

// Expert e's weight as a QMatrix: data [N, K] int8 or [N, K / 2] uint8 (int4), scales [N]
// or [N, K / group], zeros like the int4 scales; `lead` leading dimensions (1: a stack's
// experts, 0: one expert), checked.
QMatrix q_matrix(const char* name, const torch::Tensor& data, const torch::Tensor& scales,
                 const c10::optional<torch::Tensor>& zeros, int64_t bits, int64_t group,
                 std::vector<int64_t> lead, int64_t N, int64_t K, int64_t e) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 49, name, ": bits must be 8, 4 or 49 (int4 in "
              "the 16-output order), got ", bits);
  TORCH_CHECK(bits != 49 || N % 16 == 0, name, ": int4 in the 16-output order (bits=49) needs "
              "N a multiple of 16, got N=", N);
  const bool o16 = bits == 49;
  if (o16) bits = 4;
  TORCH_CHECK(K % 32 == 0, name, ": the input width K=", K, " must be a multiple of 32");
  const int64_t kb = bits == 8 ? K : K / 2;
  auto shape = lead;
  shape.insert(shape.end(), {N, kb});
  check(data, name, static_cast<int64_t>(shape.size()));
  TORCH_CHECK(data.scalar_type() == (bits == 8 ? at::kChar : at::kByte) && data.is_contiguous() &&
                  data.sizes() == torch::IntArrayRef(shape),
              name, " data must be contiguous ", bits == 8 ? "int8" : "uint8", " ",
              torch::IntArrayRef(shape), ", got ", data.scalar_type(), " ", data.sizes());
  QMatrix q;
  q.bits = static_cast<int>(bits), q.row_bytes = kb, q.o16 = o16;
  q.data = static_cast<const uint8_t*>(data.data_ptr()) + e * N * kb;
  auto ss = lead;
  ss.push_back(N);
  if (bits == 4) {
    TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, name, ": group=", group,
                " must be a multiple of 32 that divides K=", K);
    ss.push_back(K / group);
    q.group = group;
  }
  const int64_t per = bits == 8 ? N : N * (K / group);
  auto check_f = [&](const torch::Tensor& t, const char* what) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                    t.sizes() == torch::IntArrayRef(ss),
                name, " ", what, " must be contiguous float32 ", torch::IntArrayRef(ss), ", got ",
                t.scalar_type(), " ", t.sizes());
    return t.data_ptr<float>() + e * per;
  };
  q.scales = check_f(scales, "scales");
  if (bits == 4) {
    TORCH_CHECK(zeros.has_value(), name, ": int4 needs zeros");
    q.zeros = check_f(*zeros, "zeros");
  }
  return q;
}

// igemm_a8 packs int4 scales per group of a block of A8_KC inputs: the group divides it.
// int4 in the 16-output order (bits = 49) only there: sgemm_q reads NK rows.
void check_a8_group(bool a8, int64_t bits, int64_t group) {
  TORCH_CHECK(a8 || bits != 49, "bits=49 (int4 in the 16-output order) needs a8=True: only "
              "the int8-activation GEMM reads that order");
  TORCH_CHECK(!a8 || (bits != 4 && bits != 49) || (group > 0 && A8_KC % group == 0), "group=", group,
              " is not allowed with int8 activations: it must divide ", A8_KC);
}

// M rows (row r at x + r * ldx, L.K floats) rounded into records, in parallel: a
// uint8 tensor [M, L.bytes] (64-byte aligned rows).
torch::Tensor round_rows_a8(const float* x, int64_t ldx, int64_t M, const A8Rows& L) {
  auto rec = at::empty({M, L.bytes}, at::TensorOptions().dtype(at::kByte));
  char* base = reinterpret_cast<char*>(rec.data_ptr());
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) round_row_a8(x + r * ldx, L, base + r * L.bytes);
  });
  return rec;
}

// The forward on experts wi[e] ([2F, D] channels, gate first) and wo[e] ([D, F]). With
// `a8` (activations="int8" weights) the inputs of both projections are rounded to int8 as
// the decode kernels round them, and igemm_a8 runs instead of sgemm_q.
void swiglu_experts_q(const torch::Tensor& x_TD, const torch::Tensor& tok_N,
                      const torch::Tensor& w_N, const std::vector<QMatrix>& wi,
                      const std::vector<QMatrix>& wo, const std::vector<int64_t>& ends,
                      int64_t rows, torch::Tensor& a_NF, torch::Tensor& y_ND,
                      torch::Tensor& out_TD, bool a8) {
  const int64_t D = x_TD.size(1), F = a_NF.size(1);
  if (rows == 0) return;
  const int64_t* tok = tok_N.data_ptr<int64_t>();
  const float* x = x_TD.data_ptr<float>();
  const int64_t ldx = x_TD.stride(0), lda = a_NF.stride(0);
  float* a = a_NF.data_ptr<float>();
  const A8Rows Lx(D, wi[0].group), La(F, wo[0].group);
  torch::Tensor rx, ra;
  if (a8) rx = round_rows_a8(x, ldx, x_TD.size(0), Lx);

  // 1. a = swiglu(x[tok] @ w_in): gate channels c0.. and up channels F + c0.. of one expert
  run(expert_tiles(ends, 2.0 * D, F, 64), [&](const Task& t) {
    const int64_t n = t.r1 - t.r0, cw = t.c1 - t.c0;
    const QMatrix& q = wi[t.expert];
    float* h = thread_buffer(0, n * 2 * cw);
    if (a8) {
      const char* base = reinterpret_cast<const char*>(rx.data_ptr());
      const auto R = row_ptrs(n, [&](int64_t r) { return base + tok[t.r0 + r] * Lx.bytes; });
      igemm_a8(R, Lx, q, t.c0, F + t.c0, cw, h, 2 * cw, n, 2 * cw);  // any split
    } else {
      const auto A = row_ptrs(n, [&](int64_t r) { return x + tok[t.r0 + r] * ldx; });
      if (cw % 64 == 0) {
        sgemm_q(A, q, t.c0, F + t.c0, cw, h, 2 * cw, n, D, 2 * cw);
      } else {  // the last, narrow tile: each half on its own
        sgemm_q(A, q, t.c0, t.c0, cw, h, 2 * cw, n, D, cw);
        sgemm_q(A, q, F + t.c0, F + t.c0, cw, h + cw, 2 * cw, n, D, cw);
      }
    }
    for (int64_t r = 0; r < n; ++r)
      swiglu_rows(h + r * 2 * cw, h + r * 2 * cw + cw, a + (t.r0 + r) * lda + t.c0, cw);
  });

  // 2. y = (a @ w_out) * w, tiles of an expert's rows x columns of D (grouped_mm_tiles')
  float* y = y_ND.data_ptr<float>();
  const float* wr = w_N.data_ptr<float>();
  const int64_t ldy = y_ND.stride(0);
  if (a8) ra = round_rows_a8(a, lda, rows, La);
  run(expert_tiles(ends, F, D), [&](const Task& t) {
    const int64_t n = t.r1 - t.r0, cw = t.c1 - t.c0;
    float* c = y + t.r0 * ldy + t.c0;
    if (a8) {
      const char* base = reinterpret_cast<const char*>(ra.data_ptr());
      const auto R = row_ptrs(n, [&](int64_t r) { return base + (t.r0 + r) * La.bytes; });
      igemm_a8(R, La, wo[t.expert], t.c0, t.c0, cw, c, ldy, n, cw);
    } else {
      const auto A = row_ptrs(n, [&](int64_t r) { return a + (t.r0 + r) * lda; });
      sgemm_q(A, wo[t.expert], t.c0, t.c0, cw, c, ldy, n, F, cw);
    }
    scale_rows(c, ldy, n, cw, wr + t.r0);
  });

  // 3. out[t] += its rows of y
  combine_rows(tok, rows, y_ND, out_TD);
}

}  // namespace

// swiglu_experts_out with w_in (logical [E, D, 2F]: data [E, 2F, D(/2)], gate channels
// first) and w_out (logical [E, F, D]: data [E, D, F(/2)]) quantized, both `bits` (8 or
// 4, int4 with groups of `group`): out_TD[t] += sum over token t's rows of
// w_N[r] * swiglu(x[t] @ W_in[e]) @ W_out[e], the W dequantized as
// cpu_decode's dequantize does. AVX-512F CPUs only (quantized_swiglu_experts_ok()). With
// a8 (weights quantized with activations="int8"; AVX-512 VNNI, int8_activations_gemm_ok())
// x and the activated rows are rounded to int8 first, as the decode kernels round them
// (igemm_a8).
void swiglu_experts_q_out(const torch::Tensor& x_TD, const torch::Tensor& tok_N,
                          const torch::Tensor& w_N, const torch::Tensor& wi_data,
                          const torch::Tensor& wi_scales,
                          const c10::optional<torch::Tensor>& wi_zeros,
                          const torch::Tensor& wo_data, const torch::Tensor& wo_scales,
                          const c10::optional<torch::Tensor>& wo_zeros, int64_t bits,
                          int64_t group, const std::vector<int64_t>& ends, torch::Tensor& a_NF,
                          torch::Tensor& y_ND, torch::Tensor& out_TD, bool a8) {
  TORCH_CHECK(CPU_AVX512F, "swiglu_experts_q_out needs an AVX-512F CPU");
  TORCH_CHECK(!a8 || CPU_VNNI, "swiglu_experts_q_out with int8 activations needs AVX-512 VNNI");
  check_a8_group(a8, bits, group);
  const int64_t E = static_cast<int64_t>(ends.size());
  const int64_t rows = check_swiglu_rows(x_TD, tok_N, w_N, E, ends, a_NF, y_ND, out_TD);
  const int64_t D = x_TD.size(1), F = a_NF.size(1);
  std::vector<QMatrix> wi, wo;
  for (int64_t e = 0; e < E; ++e) {
    wi.push_back(q_matrix("w_in", wi_data, wi_scales, wi_zeros, bits, group, {E}, 2 * F, D, e));
    wo.push_back(q_matrix("w_out", wo_data, wo_scales, wo_zeros, bits, group, {E}, D, F, e));
  }
  swiglu_experts_q(x_TD, tok_N, w_N, wi, wo, ends, rows, a_NF, y_ND, out_TD, a8);
}

// The same with one quantized matrix per expert in lists (the expert cache's): data [2F,
// D(/2)] and [D, F(/2)], scales [N] or [N, K / group], zeros (int4) like the scales.
// Bitwise the stacked call's output on the same experts.
void swiglu_experts_q_list_out(const torch::Tensor& x_TD, const torch::Tensor& tok_N,
                               const torch::Tensor& w_N, const std::vector<torch::Tensor>& wi_data,
                               const std::vector<torch::Tensor>& wi_scales,
                               const c10::optional<std::vector<torch::Tensor>>& wi_zeros,
                               const std::vector<torch::Tensor>& wo_data,
                               const std::vector<torch::Tensor>& wo_scales,
                               const c10::optional<std::vector<torch::Tensor>>& wo_zeros,
                               int64_t bits, int64_t group, const std::vector<int64_t>& ends,
                               torch::Tensor& a_NF, torch::Tensor& y_ND, torch::Tensor& out_TD,
                               bool a8) {
  TORCH_CHECK(CPU_AVX512F, "swiglu_experts_q_list_out needs an AVX-512F CPU");
  TORCH_CHECK(!a8 || CPU_VNNI, "swiglu_experts_q_list_out with int8 activations needs AVX-512 VNNI");
  check_a8_group(a8, bits, group);
  const int64_t E = static_cast<int64_t>(ends.size());
  const int64_t rows = check_swiglu_rows(x_TD, tok_N, w_N, E, ends, a_NF, y_ND, out_TD);
  const int64_t D = x_TD.size(1), F = a_NF.size(1);
  const auto n = static_cast<size_t>(E);
  TORCH_CHECK(wi_data.size() == n && wi_scales.size() == n && wo_data.size() == n &&
                  wo_scales.size() == n && (!wi_zeros || wi_zeros->size() == n) &&
                  (!wo_zeros || wo_zeros->size() == n),
              "the weight lists must have one entry per expert (", E, ")");
  std::vector<QMatrix> wi, wo;
  for (size_t e = 0; e < n; ++e) {
    c10::optional<torch::Tensor> zi, zo;
    if (wi_zeros) zi = (*wi_zeros)[e];
    if (wo_zeros) zo = (*wo_zeros)[e];
    wi.push_back(q_matrix("w_in", wi_data[e], wi_scales[e], zi, bits, group, {}, 2 * F, D, 0));
    wo.push_back(q_matrix("w_out", wo_data[e], wo_scales[e], zo, bits, group, {}, D, F, 0));
  }
  swiglu_experts_q(x_TD, tok_N, w_N, wi, wo, ends, rows, a_NF, y_ND, out_TD, a8);
}

// out [M, N] = x [M, K] @ the quantized q, tasks of rows x columns, each one sgemm_q or
// (a8) igemm_a8 on the rows rounded to int8.
static void linear_tiles(const float* x, int64_t ldx, int64_t M, int64_t K, const QMatrix& q,
                  int64_t N, bool a8, float* out, int64_t ldo) {
  if (M == 0) return;
  const A8Rows L(K, q.group);
  torch::Tensor rx;
  if (a8) rx = round_rows_a8(x, ldx, M, L);
  run(expert_tiles({M}, K, N, 64), [&](const Task& t) {
    const int64_t n = t.r1 - t.r0, cw = t.c1 - t.c0;
    float* c = out + t.r0 * ldo + t.c0;
    if (a8) {
      const char* base = reinterpret_cast<const char*>(rx.data_ptr());
      igemm_a8(row_ptrs(n, [&](int64_t r) { return base + (t.r0 + r) * L.bytes; }), L, q, t.c0,
               t.c0, cw, c, ldo, n, cw);
    } else {
      const auto A = row_ptrs(n, [&](int64_t r) { return x + (t.r0 + r) * ldx; });
      sgemm_q(A, q, t.c0, t.c0, cw, c, ldo, n, K, cw);
    }
  });
}

// out_MN = x_MK @ W for a quantized linear's weight (logical [1, K, N]: data [1, N, K] int8
// or [1, N, K / 2] uint8 int4, scales [1, N] or [1, N, K / group], zeros like the int4
// scales), dequantized in the GEMM's packing as swiglu_experts_q_out's weights are: the
// prefill of a quantized attention projection or LM head without the float [N, K] copy
// that dequantize-then-mm writes and reads (4 bytes a weight; 1.2 GB for a 151k x 2048
// head). Tasks are tiles of rows x columns, each one sgemm_q (with a8: x rounded to int8
// and igemm_a8, as swiglu_experts_q_out's). AVX-512F CPUs only.
void q_linear_out(const torch::Tensor& x_MK, const torch::Tensor& data,
                  const torch::Tensor& scales, const c10::optional<torch::Tensor>& zeros,
                  int64_t bits, int64_t group, torch::Tensor& out_MN, bool a8) {
  TORCH_CHECK(CPU_AVX512F, "q_linear_out needs an AVX-512F CPU");
  TORCH_CHECK(!a8 || CPU_VNNI, "q_linear_out with int8 activations needs AVX-512 VNNI");
  check_a8_group(a8, bits, group);
  check_float_rows(x_MK, "x_MK", 2);
  TORCH_CHECK(data.dim() == 3 && data.size(0) == 1,
              "weight data must be [1, N, K] (int8) or [1, N, K / 2] (int4), got ", data.sizes());
  const int64_t M = x_MK.size(0), K = x_MK.size(1), N = data.size(1);
  const QMatrix q = q_matrix("weight", data, scales, zeros, bits, group, {1}, N, K, 0);
  check_rows(out_MN, "out_MN", M, N);
  linear_tiles(x_MK.data_ptr<float>(), x_MK.stride(0), M, K, q, N, a8,
               out_MN.data_ptr<float>(), out_MN.stride(0));
}

// q_linear_out for cpu_decode's DecodeStep (another extension module, which gets these
// functions' addresses from q_linear_a8_address() / q_linear_address()): out [M, N] (rows
// ldo apart) = x [M, K] (rows ldx apart; with a8 rounded to int8) @ the quantized [N, K]
// weight data (int8, or int4 with groups of `group`), scales [N] or [N, K / group], zeros
// (int4) like them. The caller has checked every argument (K % 32 == 0; with a8 an
// AVX-512 VNNI CPU).
static void q_linear_rows(const float* x, int64_t ldx, int64_t M, int64_t K,
                          const uint8_t* data, int64_t N, int64_t bits, const float* scales,
                          const float* zeros, int64_t group, float* out, int64_t ldo, bool a8) {
  QMatrix q;
  q.bits = static_cast<int>(bits), q.data = data, q.row_bytes = bits == 8 ? K : K / 2;
  q.scales = scales, q.zeros = zeros, q.group = bits == 4 ? group : 0;
  linear_tiles(x, ldx, M, K, q, N, a8, out, ldo);
}

// (weight-only int8 / int4 projections of many rows in a decode step: DecodeStep's
// set_q_gemm; int8 activations: set_a8_gemm)
#define MOEKIT_Q_LINEAR(name, a8)                                                            \
  extern "C" void name(const float* x, int64_t ldx, int64_t M, int64_t K,                   \
                       const uint8_t* data, int64_t N, int64_t bits, const float* scales,   \
                       const float* zeros, int64_t group, float* out, int64_t ldo) {        \
    q_linear_rows(x, ldx, M, K, data, N, bits, scales, zeros, group, out, ldo, a8);         \
  }
MOEKIT_Q_LINEAR(moekit_q_linear_a8, true)
MOEKIT_Q_LINEAR(moekit_q_linear, false)
#undef MOEKIT_Q_LINEAR

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grouped_mm_out", &grouped_mm_out,
        "out[rows of i] = a[rows of i] @ b[i], parallel over experts");
  m.def("grouped_mm_list_out", &grouped_mm_list_out,
        "grouped_mm_out with the experts' matrices as a list");
  m.def("grouped_mm_weight_out", &grouped_mm_weight_out,
        "out[i] = a[rows of i]^T @ b[rows of i], parallel over experts");
  m.def("sgemm_max_rows", [] { return sgemm_enabled() ? SGEMM_MAX_ROWS : int64_t{0}; },
        "experts of up to this many fp32 rows run moekit's GEMM (0: none, aten's mm)");
  m.def("sgemm_tiles", [] { return SGEMM_TILES.load(); },
        "output tiles moekit's fp32 GEMM has run in this process");
  m.def("swiglu_out", &swiglu_out, "a = silu(gate) * up, one pass, float32 or bfloat16");
  m.def("swiglu_backward_weighted_out", &swiglu_backward_weighted_out,
        "aw, dh and d weight of routed SwiGLU rows from gu = dy[tok] @ w_out^T, one pass");
  m.def("swiglu_experts_out", &swiglu_experts_out,
        "an fp32 SwiGLU expert layer's forward into out_TD, gathers and combine fused");
  m.def("swiglu_experts_list_out", &swiglu_experts_list_out,
        "swiglu_experts_out with the experts' matrices as lists");
  m.def("swiglu_experts_q_out", &swiglu_experts_q_out,
        "swiglu_experts_out on int8 / int4 weights, dequantized in the GEMMs' packing");
  m.def("swiglu_experts_q_list_out", &swiglu_experts_q_list_out,
        "swiglu_experts_q_out with one quantized matrix per expert in lists");
  m.def("q_linear_out", &q_linear_out,
        "out = x @ W for a quantized [1, K, N] weight, dequantized in the GEMM's packing");
  m.def("quantized_swiglu_experts_ok", [] { return CPU_AVX512F; },
        "whether swiglu_experts_q_out runs on this CPU (AVX-512F)");
  m.def("q_linear_a8_address",
        [] { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(&moekit_q_linear_a8)); },
        "the address of q_linear_out's a8 GEMM as a C function, for cpu_decode's DecodeStep");
  m.def("q_linear_address",
        [] { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(&moekit_q_linear)); },
        "the address of q_linear_out's GEMM on float rows as a C function, for cpu_decode's "
        "DecodeStep");
  m.def("int8_activations_gemm_ok", [] { return CPU_VNNI; },
        "whether swiglu_experts_q_out / q_linear_out take a8 = True here (AVX-512 VNNI, BW)");
  m.def("swiglu_backward_out", &swiglu_backward_out,
        "a and dh of SwiGLU from da, one pass, float32");
}
