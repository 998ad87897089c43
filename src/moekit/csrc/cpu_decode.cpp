// Decode expert kernels: few routed rows, so every step is memory-bound.
//
// At decode a layer has S = T*K routed rows (8 at batch 1, top-8) spread over
// the few experts they touch, and the time is the bytes of those experts'
// weights read once. Two calls per layer, each one parallel region over tasks:
//
//   gate_up       tasks (touched expert, tile of output columns): x rows of the
//                 expert times w_in[e][:, tile], + b_in, then the activation
//                 (SwiGLU / GeGLU / GPT-OSS SwiGLU on the matching gate and up
//                 columns; ReLU^2 / GELU; or none: the caller applies it).
//   down_combine  tasks (tile of D): for every touched expert, a rows times
//                 w_out[e][:, tile] (+ b_out), times the row's combine weight,
//                 added into out[token, tile]. A task owns its columns of every
//                 token, so the combine has no races and sums in expert order.
//                 (NK weights, up to DOWN_BY_EXPERT_ROWS rows: (expert, tile) tasks
//                 into a row buffer first, then the same combine by tiles of D.)
//
// Weights (fp32 accumulation throughout):
//   plain fp32 / bf16, any stride layout of the logical [E, K, N] (input K,
//     output N) with unit stride along N ("KN", moekit's own w_in / w_out) or
//     along K ("NK", transformers' non-transposed gate_up_proj / down_proj);
//   int8 [E, N, K] symmetric, one fp32 scale per output channel: w = s * q;
//   int4 [E, N, K/2] affine per group of g (32, 64, 128) along K:
//     w = s[g] * q + z[g], q in 0..15; each 32-element block packs element j in
//     the low nibble and element j + 16 in the high nibble of byte j (unpacking
//     is a mask and a shift on 16 bytes, no shuffles). A group's dot product is
//     s * sum(x * q) + z * sum(x): the zero point costs one multiply-add per
//     group, not per weight.
// int8 weight-only experts run on AVX-512 VNNI where the CPU has it: each fp32 row split
// into four exact int8 terms, a vpdpbusd per term (i8t_tile).
// The inner loops are intrinsics where the CPU has AVX-512 (F + BW) or AVX2 + FMA
// (checked at load time; MOEKIT_CPU_ISA caps it); elsewhere plain loops over 16
// independent fp32 lanes, built by target_clones (any compiler-vectorizable ISA
// for non-x86 builds is up to the compiler). bf16 is widened by a 16-bit shift: at a few rows
// per expert the step is memory-bound, so AVX-512 BF16 dot products (which
// would also round the activations to bf16) would not read the bytes faster.
//
// Built on first use by moekit/functions/cpu_ext.py (-fopenmp: at::parallel_for
// is an inline OpenMP region).
//
// Shape letters: T tokens, D hidden, E experts, S routed rows sorted by expert
// (kept rows first; offsets_E[e] is the end of expert e's rows), K input width,
// N output width of one projection, F = N / 2 for the GLU activations.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <tuple>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define MEMBER inline __attribute__((always_inline))
#define INLINE static MEMBER

enum class Kind { F32, BF16, I8, I4 };

struct Weights {
  Kind kind;
  bool n_unit;         // plain weights: unit stride along N (else along K)
  const void* data;
  int64_t s_e, s_k, s_n;  // element strides of the logical [E, K, N] (plain);
                          // I8/I4: s_n = bytes per output row, s_e = per expert
  const float* scales;    // I8 [E, N]; I4 [E, N, K/g]
  const float* zeros;     // I4 [E, N, K/g]
  int64_t group;          // I4 group size
  int64_t E, K, N;
  bool a8 = false;        // int8 activations: I4 bits = 48 (i4a8_tile), I8 88 (i8a8_tile)
  bool o16 = false;       // I4 with int8 activations in the 16-output order (bits = 49)
};

INLINE float bf16(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

INLINE float load(float v) { return v; }
INLINE float load(uint16_t v) { return bf16(v); }
INLINE float load(int8_t v) { return static_cast<float>(v); }

// fp32 -> bf16, round to nearest even (as torch's .to(torch.bfloat16)); NaN stays NaN.
INLINE uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
INLINE void store(float* p, float v) { *p = v; }
INLINE void store(uint16_t* p, float v) { *p = to_bf16(v); }

// ---- KN layout (unit stride along outputs): acc[r, j] += x[r, k] * w[k, c0 + j]

// Software prefetch PF rows ahead. (A first version cut tiles of columns, so a
// task's rows lay 4 KiB apart and the hardware prefetchers, which stop at page
// boundaries, left it at 3.1x the roofline: fp32, T=1, D=1024, E=64, K=8, F=512,
// 1 thread. Tasks now read whole contiguous rows, 1.2x-1.7x; see gate_up.)
constexpr int64_t PF = 4;

template <typename T>
INLINE void kn_tile(const T* w, int64_t ldk, int64_t K, const float* const* x, int64_t n,
                    int64_t W, float* acc) {
  std::fill(acc, acc + n * W, 0.0f);
  constexpr int64_t line = 64 / sizeof(T);
  int64_t k = 0;
  // four weight rows per pass: one load and store of the accumulators per 4 FMAs
  for (; k + 4 <= K; k += 4) {
    const T* w0 = w + k * ldk;
    const T *w1 = w0 + ldk, *w2 = w1 + ldk, *w3 = w2 + ldk;
    if (k + 4 + PF < K) {
      for (int64_t j = 0; j < W; j += line) __builtin_prefetch(w0 + PF * ldk + j);
    }
    for (int64_t r = 0; r < n; ++r) {
      const float x0 = x[r][k], x1 = x[r][k + 1], x2 = x[r][k + 2], x3 = x[r][k + 3];
      float* __restrict a = acc + r * W;
      for (int64_t j = 0; j < W; ++j)
        a[j] += x0 * load(w0[j]) + x1 * load(w1[j]) + x2 * load(w2[j]) + x3 * load(w3[j]);
    }
  }
  for (; k < K; ++k) {
    const T* wk = w + k * ldk;
    for (int64_t r = 0; r < n; ++r) {
      const float xv = x[r][k];
      float* __restrict a = acc + r * W;
      for (int64_t j = 0; j < W; ++j) a[j] += xv * load(wk[j]);
    }
  }
}

CLONES void kn_tile_f32(const float* w, int64_t ldk, int64_t K, const float* const* x,
                        int64_t n, int64_t W, float* acc) {
  kn_tile(w, ldk, K, x, n, W, acc);
}

CLONES void kn_tile_bf16(const uint16_t* w, int64_t ldk, int64_t K, const float* const* x,
                         int64_t n, int64_t W, float* acc) {
  kn_tile(w, ldk, K, x, n, W, acc);
}

// ---- NK layout (unit stride along inputs): one output row at a time, dot products
// with up to R rows of x per pass over the weight row, 16 lanes each.

struct DecF32 {
  const float* p;
  MEMBER void block(int64_t k, float* wf) const { for (int l = 0; l < 32; ++l) wf[l] = p[k + l]; }
  MEMBER float one(int64_t k) const { return p[k]; }
};
struct DecBF16 {
  const uint16_t* p;
  MEMBER void block(int64_t k, float* wf) const {
    for (int l = 0; l < 32; ++l) wf[l] = bf16(p[k + l]);
  }
  MEMBER float one(int64_t k) const { return bf16(p[k]); }
};
struct DecI8 {
  const int8_t* p;
  MEMBER void block(int64_t k, float* wf) const {
    for (int l = 0; l < 32; ++l) wf[l] = static_cast<float>(p[k + l]);
  }
  MEMBER float one(int64_t k) const { return static_cast<float>(p[k]); }
};
struct DecI4 {
  const uint8_t* p;  // the output row's packed bytes
  MEMBER void block(int64_t k, float* wf) const {
    const uint8_t* b = p + k / 2;
    for (int l = 0; l < 16; ++l) {
      wf[l] = static_cast<float>(b[l] & 15);
      wf[16 + l] = static_cast<float>(b[l] >> 4);
    }
  }
  MEMBER float one(int64_t) const { return 0.0f; }  // K is a multiple of the group
};

// out[r] = sum_k x[r][k] * w[k] for one output row; I4 adds the group scales
// (gs) and zero points (gz, with xsum[r][g] = sum of x[r] over group g).
template <typename Dec>
INLINE void nk_row(const Dec& dec, int64_t K, int64_t group, const float* gs, const float* gz,
                   const float* const* x, const float* xsum, int64_t n, float* out,
                   int64_t ostride) {
  constexpr int L = 16, R = 4;
  const int64_t K32 = K / 32 * 32;
  const int64_t ngroups = gs ? K / group : 1;
  const int64_t glen = gs ? group : K32;
  alignas(64) float wf[32];
  for (int64_t r0 = 0; r0 < n; r0 += R) {
    const int64_t m = std::min<int64_t>(R, n - r0);
    alignas(64) float tot[R][L] = {};
    for (int64_t g = 0; g < ngroups; ++g) {
      alignas(64) float acc[R][L] = {};
      for (int64_t k = g * glen; k < (g + 1) * glen; k += 32) {
        dec.block(k, wf);
        for (int64_t r = 0; r < m; ++r) {
          const float* xr = x[r0 + r] + k;
          for (int l = 0; l < L; ++l) acc[r][l] += xr[l] * wf[l] + xr[L + l] * wf[L + l];
        }
      }
      const float s = gs ? gs[g] : 1.0f;
      for (int64_t r = 0; r < m; ++r)
        for (int l = 0; l < L; ++l) tot[r][l] += s * acc[r][l];
    }
    for (int64_t r = 0; r < m; ++r) {
      float v = 0.0f;
      for (int l = 0; l < L; ++l) v += tot[r][l];
      if (gz) {
        for (int64_t g = 0; g < ngroups; ++g) v += gz[g] * xsum[(r0 + r) * ngroups + g];
      }
      for (int64_t k = K32; k < K; ++k) v += x[r0 + r][k] * dec.one(k);
      out[(r0 + r) * ostride] = v;
    }
  }
}

CLONES void nk_tile_f32(const float* w, int64_t ldn, int64_t K, const float* const* x,
                        int64_t n, int64_t W, float* acc) {
  for (int64_t j = 0; j < W; ++j)
    nk_row(DecF32{w + j * ldn}, K, K, nullptr, nullptr, x, nullptr, n, acc + j, W);
}

CLONES void nk_tile_bf16(const uint16_t* w, int64_t ldn, int64_t K, const float* const* x,
                         int64_t n, int64_t W, float* acc) {
  for (int64_t j = 0; j < W; ++j)
    nk_row(DecBF16{w + j * ldn}, K, K, nullptr, nullptr, x, nullptr, n, acc + j, W);
}

CLONES void nk_tile_i8(const int8_t* w, int64_t ldn, const float* scale, int64_t K,
                       const float* const* x, int64_t n, int64_t W, float* acc) {
  for (int64_t j = 0; j < W; ++j) {
    nk_row(DecI8{w + j * ldn}, K, K, nullptr, nullptr, x, nullptr, n, acc + j, W);
    for (int64_t r = 0; r < n; ++r) acc[r * W + j] *= scale[j];
  }
}

CLONES void nk_tile_i4(const uint8_t* w, int64_t ldn, const float* scales, const float* zeros,
                       int64_t group, int64_t K, const float* const* x, const float* xsum,
                       int64_t n, int64_t W, float* acc) {
  const int64_t ng = K / group;
  for (int64_t j = 0; j < W; ++j)
    nk_row(DecI4{w + j * ldn}, K, group, scales + j * ng, zeros + j * ng, x, xsum, n, acc + j,
           W);
}

// ---- NK with AVX-512 intrinsics (the compiler's vectorization of nk_row for the
// integer kinds scalarized the 32-wide decode: int8 measured 11x the roofline) --

#define AVX512 __attribute__((target("avx512f,avx512bw")))
#ifndef MOEKIT_NK_PF
#define MOEKIT_NK_PF 4096
#endif
// The hint: T1 (into L2). NTA, tried to keep a step's streamed experts from evicting the
// attention weights from L3, left fp32 steps as they were and made int8 ones ~2x slower
// (fine model, engine steps, 2 threads, 3 alternating processes each: batch 1 2.7-3.3 ->
// 6.4-6.7 ms, batch 8 15.2-17.1 -> 24.9-26.2 ms; Intel Xeon VM, 2026-12-04).
#ifndef MOEKIT_NK_HINT
#define MOEKIT_NK_HINT _MM_HINT_T1
#endif

template <Kind KIND>
AVX512 inline void load32(const void* p, int64_t k, __m512& lo, __m512& hi) {
  if constexpr (KIND == Kind::F32) {
    const float* f = static_cast<const float*>(p) + k;
    lo = _mm512_loadu_ps(f), hi = _mm512_loadu_ps(f + 16);
  } else if constexpr (KIND == Kind::BF16) {
    const uint16_t* b = static_cast<const uint16_t*>(p) + k;
    const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    const __m512i c =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)));
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16));
    hi = _mm512_castsi512_ps(_mm512_slli_epi32(c, 16));
  } else if constexpr (KIND == Kind::I8) {
    const int8_t* q = static_cast<const int8_t*>(p) + k;
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
    hi = _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
  } else {
    const __m128i b =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(p) + k / 2));
    const __m128i m = _mm_set1_epi8(15);
    lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, m)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m)));
  }
}

// R rows (1..8) of x against one output row p, K32 = K rounded down to 32 inputs.
// int4: each group's 16 possible weights s * q + z go in one register and the
// nibbles index it (vpermps reads the low 4 bits of each index): no integer to
// float conversion, no per-group rescaling. Converting the nibbles and scaling
// each group measured 2.9x / 3.4x / 3.9x the roofline at T = 1 / 4 / 16, this
// 1.7x / 1.5x / 2.2x (1 thread, D=1024, E=64, K=8, F=512, thread CPU time, loaded box).
// One row alternates two pairs of accumulators over 32-input chunks: with one pair
// each FMA waits on the last one's latency (4 cycles for 16 weights). Up to 8 rows
// per pass: each decoded weight vector serves R rows (4 rows per pass decoded a
// batch-16 projection's weights 4 times).
AVX512 inline __m512 i4_table(const float* gs, const float* gz, int64_t g) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_fmadd_ps(iota, _mm512_set1_ps(gs[g]), _mm512_set1_ps(gz[g]));
}

template <Kind KIND>
AVX512 inline void decode32(const void* p, int64_t k, __m512 table, __m512& lo, __m512& hi) {
  if constexpr (KIND == Kind::I4) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(p) + k / 2)));
    lo = _mm512_permutexvar_ps(idx, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table);
  } else {
    load32<KIND>(p, k, lo, hi);
  }
}

// Bytes of one 32-input chunk, and the software prefetch distance: the next output
// row's bytes (a tile's rows are contiguous) are requested while this one is read.
template <Kind KIND>
constexpr int64_t chunk_bytes() {
  return KIND == Kind::F32 ? 128 : KIND == Kind::BF16 ? 64 : KIND == Kind::I8 ? 32 : 16;
}
constexpr int64_t NK_PREFETCH = MOEKIT_NK_PF;

// The block kernels' prefetch: the bytes NK_PREFETCH past `at` (a weight row's block).
inline void prefetch_ahead(const void* at) {
  if (NK_PREFETCH) _mm_prefetch(static_cast<const char*>(at) + NK_PREFETCH, MOEKIT_NK_HINT);
}

template <Kind KIND>
AVX512 inline void nk_prefetch(const void* p, int64_t c) {
  constexpr int64_t B = chunk_bytes<KIND>();
  const char* at = static_cast<const char*>(p) + B * c + NK_PREFETCH;
  if constexpr (B >= 64) {
    for (int64_t i = 0; i < B; i += 64) _mm_prefetch(at + i, MOEKIT_NK_HINT);
  } else {
    if ((B * c) % 64 == 0) _mm_prefetch(at, MOEKIT_NK_HINT);
  }
}

// One 32-input chunk c of R rows into accumulator pair U (int4: the group's table,
// renewed when the last group's chunks are used up).
template <Kind KIND, int R, int U, int A>
AVX512 inline void nk_chunk(const void* p, int64_t c, const float* gs, const float* gz,
                            int64_t cpg, __m512& table, int64_t& g, int64_t& left,
                            const float* const* x, __m512 (&a)[R][A]) {
  const int64_t k = 32 * c;
  if constexpr (KIND == Kind::I4) {
    if (left == 0) table = i4_table(gs, gz, g++), left = cpg;
    --left;
  }
  if (NK_PREFETCH) nk_prefetch<KIND>(p, c);
  __m512 lo, hi;
  decode32<KIND>(p, k, table, lo, hi);
  for (int r = 0; r < R; ++r) {
    a[r][2 * U] = _mm512_fmadd_ps(_mm512_loadu_ps(x[r] + k), lo, a[r][2 * U]);
    a[r][2 * U + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(x[r] + k + 16), hi, a[r][2 * U + 1]);
  }
}

template <Kind KIND, int R>
AVX512 void nk_rows_avx512(const void* p, int64_t K32, int64_t glen, const float* gs,
                           const float* gz, const float* const* x, float* v) {
  constexpr int P = R == 1 ? 2 : 1;  // accumulator pairs per row
  __m512 a[R][2 * P];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 2 * P; ++i) a[r][i] = _mm512_setzero_ps();
  const int64_t nc = K32 / 32, cpg = glen / 32;  // chunks, chunks per int4 group
  __m512 table = _mm512_setzero_ps();
  int64_t c = 0, g = 0, left = 0;  // int4: the group's table, chunks left in the group
  for (; c + P <= nc; c += P) {
    nk_chunk<KIND, R, 0>(p, c, gs, gz, cpg, table, g, left, x, a);
    if constexpr (P == 2) nk_chunk<KIND, R, 1>(p, c + 1, gs, gz, cpg, table, g, left, x, a);
  }
  if (c < nc) nk_chunk<KIND, R, 0>(p, c, gs, gz, cpg, table, g, left, x, a);  // odd count
  for (int r = 0; r < R; ++r) {
    __m512 t = _mm512_add_ps(a[r][0], a[r][1]);
    if constexpr (P == 2) t = _mm512_add_ps(t, _mm512_add_ps(a[r][2], a[r][3]));
    v[r] = _mm512_reduce_add_ps(t);
  }
}

// KN layout with AVX-512.
// bf16: 32 weights per 512-bit load, widened without shuffles: a lane holds
// (w[2i], w[2i+1]); a 16-bit left shift gives w[2i] as fp32, masking the low half
// gives w[2i+1]. The accumulators of a 32-column block hold the even columns,
// then the odd ones, until kn_unpermute puts them back in order (half = 16; the
// AVX2 path does the same with 16-column blocks, half = 8). (Widening with
// vpmovzxwd, a cross-lane shuffle, left bf16 at 1.2x fp32's speed: 3.3x the roofline.)
inline void kn_unpermute(float* acc, int64_t n, int64_t W, int half) {
  float tmp[32];
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j + 2 * half <= W; j += 2 * half) {
      float* a = acc + r * W + j;
      std::memcpy(tmp, a, 2 * half * sizeof(float));
      for (int i = 0; i < half; ++i) a[2 * i] = tmp[i], a[2 * i + 1] = tmp[half + i];
    }
}

// Rows blocked in registers: a block of KB weight rows is read one column block
// (C vectors) at a time, each weight vector loaded once for up to R rows of x
// whose accumulators stay in registers over the block's rows. (Row by row with
// the accumulators in memory, 4 weight rows per pass, cost 2 memory ops per FMA
// and reloaded each weight vector per row: hot-L2 one expert D=256 2F=512,
// 1 thread, 4 rows took 25.4 us, 8 rows 44.5 us; blocked: see the commit.)
// The first row group prefetches the next block's rows at the same columns, so
// the block (KB x 4 KiB for fp32 N = 1024) streams in while this one is used.
// The hint: T1 (into L2, as the NK path's). T0 (into L1) held one thread's stream to
// 18 GB/s fp32 / 13 bf16 against 25 / 21 with T1 or T2 (gate_up of 8 of 64 cold
// experts D=1024 2F=1024, AMD EPYC Zen 4 VM, 2026-12-04); 2 threads 33 / 26.5 -> 34.6 /
// 33 GB/s, the read bandwidth. Prefetching 16 or 32 rows ahead, or blocks of 4 or 16
// rows, measured no better.
constexpr int64_t KB = 8;
constexpr auto KN_HINT = _MM_HINT_T1;

// The accumulators stay in registers over the block's rows: the loop has one path (the
// prefetch of the row KB rows below, or with pf_rows 0 of the row itself, in L1
// already; below an expert's last row that is the next expert's row or, past the
// tensor, an address computed as an integer, as rows_ahead's: a prefetch does not
// fault) and runs at least once. A prefetch under a branch (q < pf_rows) had the
// compiler split the loop in two and keep the accumulators on the stack around it: 3
// stores and 2 loads more of each per block. (gate_up, 2 of L3-resident experts D=1024
// 2F=2048, 2 threads, Zen 4 VM: 4 rows per expert 31-42 -> 40-50 G FMA/s; the
// Mixtral-like batch-16 experts, cold, 4 layers: 33.1 -> 29.5 ms with this and
// KN_RMAX's passes together.)
template <Kind KIND, int R, int C>
AVX512 inline void kn_block(const void* w, int64_t ldk, int64_t kb, const float* const* x,
                            int64_t k0, int64_t j, int64_t W, float* acc, int64_t pf_rows) {
  using T = std::conditional_t<KIND == Kind::F32, float, uint16_t>;
  const T* base = static_cast<const T*>(w) + j;
  const __m512i odd = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m512 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = _mm512_loadu_ps(acc + r * W + j + 16 * c);
  const uintptr_t pf_step = pf_rows > 0 ? KB * ldk * sizeof(T) : 0;
  int64_t q = 0;
  do {
    const T* wr = base + q * ldk;
    __m512 wv[C];
    if constexpr (KIND == Kind::F32) {
      for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_ps(wr + 16 * c);
    } else {  // C even: 32 bf16 per load, even columns then odd ones (kn_unpermute)
      for (int c = 0; c < C; c += 2) {
        const __m512i v = _mm512_loadu_si512(wr + 16 * c);
        wv[c] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        wv[c + 1] = _mm512_castsi512_ps(_mm512_and_si512(v, odd));
      }
    }
    const char* pf = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(wr) + pf_step);
    for (int c = 0; c < C * static_cast<int>(sizeof(T)) / 4; ++c)
      _mm_prefetch(pf + 64 * c, KN_HINT);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r][k0 + q]);
      for (int c = 0; c < C; ++c) a[r][c] = _mm512_fmadd_ps(xb, wv[c], a[r][c]);
    }
  } while (++q < kb);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + r * W + j + 16 * c, a[r][c]);
}

// R rows of x against weight rows [k0, k0 + kb), all W columns.
template <Kind KIND, int R>
AVX512 void kn_rows(const void* w, int64_t ldk, int64_t kb, const float* const* x, int64_t k0,
                    int64_t W, float* acc, int64_t pf_rows) {
  using T = std::conditional_t<KIND == Kind::F32, float, uint16_t>;
  constexpr int64_t step = 64, unit = KIND == Kind::F32 ? 16 : 32;
  int64_t j = 0;
  for (; j + step <= W; j += step) kn_block<KIND, R, 4>(w, ldk, kb, x, k0, j, W, acc, pf_rows);
  for (; j + unit <= W; j += unit)
    kn_block<KIND, R, unit / 16>(w, ldk, kb, x, k0, j, W, acc, pf_rows);
  const T* base = static_cast<const T*>(w);
  for (; j < W; ++j)
    for (int64_t q = 0; q < kb; ++q)
      for (int r = 0; r < R; ++r) acc[r * W + j] += x[r][k0 + q] * load(base[q * ldk + j]);
}

// NK layout, fp32, several output columns at once: R rows of x against C weight
// rows (output columns), R*C accumulators, so each x and weight vector loaded
// serves C or R FMAs (one weight row at a time costs 2 loads per FMA, and at 8-16
// rows, e.g. a batch's attention projections, the step is bound by those loads).
// `pf` (the first pass of x rows over these weight rows) prefetches the rows NK_RC_AHEAD
// further on at the same inputs, into L2: a cold 1024 x 1024 fp32 projection at one row
// read 15.6 GB/s on one thread without, 22.8 with (2 threads 29.5 -> 33.4; 4 rows ahead
// 21.3 / 32.3, 16 32.3 at 2 threads; AMD EPYC Zen 4 VM, 2026-12-04). Past the last row
// of a tile it reads the next tile's rows or, past the tensor, nothing: a prefetch does
// not fault.
constexpr int64_t NK_RC_AHEAD = 8;

// The address NK_RC_AHEAD rows of ldn floats past p, computed as an integer (it may lie
// past the tensor, where a pointer would be undefined; the prefetch only hints at it).
inline const char* rows_ahead(const float* p, int64_t ldn) {
  return reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) +
                                       NK_RC_AHEAD * ldn * sizeof(float));
}

template <int R, int C>
AVX512 inline void nk_rc_f32(const float* w, int64_t ldn, int64_t K, const float* const* x,
                             int64_t j, int64_t W, float* acc, bool pf) {
  const int64_t K16 = K / 16 * 16;
  __m512 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) {
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_ps(w + c * ldn + k);
    if (pf)
      for (int c = 0; c < C; ++c) _mm_prefetch(rows_ahead(w + c * ldn + k, ldn), _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x[r] + k);
      for (int c = 0; c < C; ++c) a[r][c] = _mm512_fmadd_ps(xv, wv[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float t = _mm512_reduce_add_ps(a[r][c]);
      for (int64_t k = K16; k < K; ++k) t += x[r][k] * w[c * ldn + k];
      acc[r * W + j + c] = t;
    }
}

// ---- AVX2 + FMA intrinsics, for CPUs without AVX-512 (AMD Zen 1-3, Intel client
// parts): the same kernels as above with 8 lanes and 16 registers. target_clones'
// avx2 clone of the plain loops measured 0.96x / 1.68x / 3.27x / 12.7x the roofline
// for fp32 / bf16 / int8 / int4-g64 at T = 1 (Zen 3, 1 thread, D=1024, E=64, K=8,
// F=512, thread CPU time, loaded box): the compiler turned the integer widening
// into scalar code, so int4 ran slower than fp32.

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

AVX2 inline __m128i load8_bytes(const void* p) {
  return _mm_loadl_epi64(static_cast<const __m128i*>(p));
}

// Weights k..k+31 of one NK row as four vectors of 8, in order. bf16 is widened
// from memory (vpmovzxwd); int4 gives the nibbles q as floats
// (the caller applies s * q + z): bytes 0-7 hold elements 0-7 in their low nibbles
// and 16-23 in their high ones, bytes 8-15 elements 8-15 and 24-31.
template <Kind KIND>
AVX2 inline void load32_avx2(const void* p, int64_t k, __m256* w) {
  if constexpr (KIND == Kind::F32) {
    const float* f = static_cast<const float*>(p) + k;
    for (int i = 0; i < 4; ++i) w[i] = _mm256_loadu_ps(f + 8 * i);
  } else if constexpr (KIND == Kind::BF16) {
    const uint16_t* b = static_cast<const uint16_t*>(p) + k;
    for (int i = 0; i < 4; ++i) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 8 * i));
      w[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  } else {
    static_assert(KIND == Kind::I4, "int8 runs nk_rows_i8_avx2");
    const uint8_t* b = static_cast<const uint8_t*>(p) + k / 2;
    const __m256i lo = _mm256_cvtepu8_epi32(load8_bytes(b));
    const __m256i hi = _mm256_cvtepu8_epi32(load8_bytes(b + 8));
    const __m256i m = _mm256_set1_epi32(15);
    w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo, m));
    w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(hi, m));
    w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));
    w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));
  }
}

// R rows (1..4) of x against one output row p, as nk_rows_avx512. int4: each
// weight becomes s * q + z with one FMA (AVX2's 8-entry vpermps cannot index a
// 16-entry table). A accumulators per row: with one or two rows, 2 would leave
// the FMAs waiting on their latency.
template <Kind KIND, int R>
AVX2 void nk_rows_avx2(const void* p, int64_t K32, int64_t glen, const float* gs,
                       const float* gz, const float* const* x, float* v) {
  constexpr int A = R <= 2 ? 4 : 2;
  __m256 a[R][A];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < A; ++i) a[r][i] = _mm256_setzero_ps();
  for (int64_t g0 = 0, g = 0; g0 < K32; g0 += glen, ++g) {
    __m256 s = _mm256_setzero_ps(), z = s;
    if constexpr (KIND == Kind::I4) s = _mm256_set1_ps(gs[g]), z = _mm256_set1_ps(gz[g]);
    for (int64_t k = g0; k < g0 + glen; k += 32) {
      __m256 w[4];
      load32_avx2<KIND>(p, k, w);
      if constexpr (KIND == Kind::I4)
        for (int i = 0; i < 4; ++i) w[i] = _mm256_fmadd_ps(w[i], s, z);
      for (int r = 0; r < R; ++r)
        for (int i = 0; i < 4; ++i)
          a[r][i % A] = _mm256_fmadd_ps(_mm256_loadu_ps(x[r] + k + 8 * i), w[i], a[r][i % A]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m256 t = a[r][0];
    for (int i = 1; i < A; ++i) t = _mm256_add_ps(t, a[r][i]);
    v[r] = hsum(t);
  }
}

// int8 on AVX2: one 32-byte load and four vpshufb put weight bytes at the top of
// 32-bit lanes (q * 2^24, exact, scaled back by 2^-24 at the end), where widening
// 8 bytes at a time (vpmovsxbd) ran out of shuffle throughput: 12 -> 17 GB/s from
// L2 and 13-15 -> 18 GB/s from memory on 2 threads (Zen 3, microbenchmark; the
// 1 GiB sum read 21.6 GB/s). vpshufb stays within 128-bit lanes, so vector i holds
// bytes 4i..4i+3 and 16+4i..16+4i+3 of the 32: x rows come permuted to match
// (permute_x32), 8 accumulators at one row (two FMA pipes, 4 cycles latency).
constexpr float I8_SHUF_SCALE = 1.0f / 16777216.0f;  // 2^-24

// Vector i's vpshufb control: in each 128-bit lane, dword d takes byte 4i + d of the
// lane into its top byte (-128 zeroes the other three).
#define I8_LANE(i)                                                                     \
  -128, -128, -128, 4 * (i), -128, -128, -128, 4 * (i) + 1, -128, -128, -128, 4 * (i) + 2, \
      -128, -128, -128, 4 * (i) + 3
alignas(32) constexpr int8_t I8_SHUF[4][32] = {{I8_LANE(0), I8_LANE(0)}, {I8_LANE(1), I8_LANE(1)},
                                               {I8_LANE(2), I8_LANE(2)}, {I8_LANE(3), I8_LANE(3)}};
#undef I8_LANE

AVX2 inline __m256i i8_shuf_mask(int i) {
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(I8_SHUF[i]));
}

// x[k + 8i + 4l + d] = src[k + 16l + 4i + d] in every whole block of 32; the tail
// past K / 32 * 32 is copied as it is.
inline void permute_x32(const float* src, int64_t K, float* dst) {
  const int64_t K32 = K / 32 * 32;
  for (int64_t k = 0; k < K32; k += 32)
    for (int i = 0; i < 4; ++i)
      for (int l = 0; l < 2; ++l)
        for (int d = 0; d < 4; ++d) dst[k + 8 * i + 4 * l + d] = src[k + 16 * l + 4 * i + d];
  std::copy(src + K32, src + K, dst + K32);
}

// Weights k..k+31 of p times R rows of permuted x, into accumulators OFF..OFF+3
// (mod A) of each row.
template <int R, int A, int OFF>
AVX2 inline void i8_block_avx2(const int8_t* p, int64_t k, const float* const* x,
                               __m256 (&a)[R][A]) {
  _mm_prefetch(reinterpret_cast<const char*>(p + k) + 1024, _MM_HINT_T0);
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k));
  __m256 w[4];
  for (int i = 0; i < 4; ++i)
    w[i] = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(b, i8_shuf_mask(i)));
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i)
      a[r][(OFF + i) % A] =
          _mm256_fmadd_ps(_mm256_loadu_ps(x[r] + k + 8 * i), w[i], a[r][(OFF + i) % A]);
}

// R rows (1..4) of permuted x against one int8 output row p (K32 of its weights);
// v[r] = sum of x * q (unscaled).
template <int R>
AVX2 void nk_rows_i8_avx2(const int8_t* p, int64_t K32, const float* const* x, float* v) {
  constexpr int A = R == 1 ? 8 : R == 2 ? 4 : 2;  // accumulators per row
  __m256 a[R][A];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < A; ++i) a[r][i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K32; k += 64) {
    i8_block_avx2<R, A, 0>(p, k, x, a);
    i8_block_avx2<R, A, 4>(p, k + 32, x, a);
  }
  if (k < K32) i8_block_avx2<R, A, 0>(p, k, x, a);
  for (int r = 0; r < R; ++r) {
    __m256 t = a[r][0];
    for (int i = 1; i < A; ++i) t = _mm256_add_ps(t, a[r][i]);
    v[r] = hsum(t) * I8_SHUF_SCALE;
  }
}

// KN layout: as kn_block, 8 columns per vector; bf16 loads 16 weights, even columns
// then odd ones (kn_unpermute with half = 8).
template <Kind KIND, int R, int C>
AVX2 inline void kn_block_avx2(const void* w, int64_t ldk, int64_t kb, const float* const* x,
                               int64_t k0, int64_t j, int64_t W, float* acc, int64_t pf_rows) {
  using T = std::conditional_t<KIND == Kind::F32, float, uint16_t>;
  constexpr int bytes = C * 8 * static_cast<int>(sizeof(T));
  const T* base = static_cast<const T*>(w) + j;
  const __m256i odd = _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  __m256 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = _mm256_loadu_ps(acc + r * W + j + 8 * c);
  const uintptr_t pf_step = pf_rows > 0 ? KB * ldk * sizeof(T) : 0;  // as kn_block's
  int64_t q = 0;
  do {
    const T* wr = base + q * ldk;
    __m256 wv[C];
    if constexpr (KIND == Kind::F32) {
      for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_ps(wr + 8 * c);
    } else {
      for (int c = 0; c < C; c += 2) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 8 * c));
        wv[c] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        wv[c + 1] = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
      }
    }
    for (int b = 0; b < bytes; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(wr) + pf_step) + b,
                   KN_HINT);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_set1_ps(x[r][k0 + q]);
      for (int c = 0; c < C; ++c) a[r][c] = _mm256_fmadd_ps(xb, wv[c], a[r][c]);
    }
  } while (++q < kb);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(acc + r * W + j + 8 * c, a[r][c]);
}

// As kn_rows: 32 columns per block for up to 2 rows of x, 16 for 3-4 (R * C
// accumulators + C weight vectors within 16 registers).
template <Kind KIND, int R>
AVX2 void kn_rows_avx2(const void* w, int64_t ldk, int64_t kb, const float* const* x,
                       int64_t k0, int64_t W, float* acc, int64_t pf_rows) {
  using T = std::conditional_t<KIND == Kind::F32, float, uint16_t>;
  constexpr int C = R <= 2 ? 4 : 2;
  constexpr int64_t step = 8 * C, unit = KIND == Kind::F32 ? 8 : 16;
  int64_t j = 0;
  for (; j + step <= W; j += step) kn_block_avx2<KIND, R, C>(w, ldk, kb, x, k0, j, W, acc, pf_rows);
  for (; j + unit <= W; j += unit)
    kn_block_avx2<KIND, R, unit / 8>(w, ldk, kb, x, k0, j, W, acc, pf_rows);
  const T* base = static_cast<const T*>(w);
  for (; j < W; ++j)
    for (int64_t q = 0; q < kb; ++q)
      for (int r = 0; r < R; ++r) acc[r * W + j] += x[r][k0 + q] * load(base[q * ldk + j]);
}

// NK fp32, R rows x C output columns, as nk_rc_f32.
template <int R, int C>
AVX2 inline void nk_rc_f32_avx2(const float* w, int64_t ldn, int64_t K, const float* const* x,
                                int64_t j, int64_t W, float* acc, bool pf) {
  const int64_t K8 = K / 8 * 8;
  __m256 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm256_loadu_ps(w + c * ldn + k);
    if (pf && k % 16 == 0)  // one prefetch per 64-byte line
      for (int c = 0; c < C; ++c) _mm_prefetch(rows_ahead(w + c * ldn + k, ldn), _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x[r] + k);
      for (int c = 0; c < C; ++c) a[r][c] = _mm256_fmadd_ps(xv, wv[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float t = hsum(a[r][c]);
      for (int64_t k = K8; k < K; ++k) t += x[r][k] * w[c * ldn + k];
      acc[r * W + j + c] = t;
    }
}

// ---- the intrinsics path this CPU runs: the widest it has, or a narrower one named
// by MOEKIT_CPU_ISA (avx2 or generic; checked by moekit/functions/cpu_ext.py), so
// that an AVX-512 machine's tests also cover the AVX2 and plain-loop kernels.

enum class Isa { Generic, Avx2, Avx512 };

const Isa CPU_ISA = [] {
  __builtin_cpu_init();
  const char* cap = std::getenv("MOEKIT_CPU_ISA");
  const std::string want = cap ? cap : "";
  if (want != "avx2" && want != "generic" && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw"))
    return Isa::Avx512;
  if (want != "generic" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Isa::Avx2;
  return Isa::Generic;
}();

// f(std::integral_constant<int, m>{}) for m in 1..MAX: a pass's count of x rows is the
// row kernels' template argument.
template <int MAX, typename F>
inline void with_rows(int64_t m, const F& f) {
  if constexpr (MAX > 1) {
    if (m < MAX) return with_rows<MAX - 1>(m, f);
  }
  f(std::integral_constant<int, MAX>{});
}

template <Kind KIND, Isa ISA, int R>
inline void nk_rows(const void* p, int64_t K32, int64_t glen, const float* gs, const float* gz,
                    const float* const* x, float* v) {
  if constexpr (ISA == Isa::Avx512) nk_rows_avx512<KIND, R>(p, K32, glen, gs, gz, x, v);
  else if constexpr (KIND == Kind::I8) nk_rows_i8_avx2<R>(static_cast<const int8_t*>(p), K32, x, v);
  else nk_rows_avx2<KIND, R>(p, K32, glen, gs, gz, x, v);
}

template <Kind KIND, Isa ISA, int R>
inline void kn_rows_isa(const void* w, int64_t ldk, int64_t kb, const float* const* x,
                        int64_t k0, int64_t W, float* acc, int64_t pf_rows) {
  if constexpr (ISA == Isa::Avx512) kn_rows<KIND, R>(w, ldk, kb, x, k0, W, acc, pf_rows);
  else kn_rows_avx2<KIND, R>(w, ldk, kb, x, k0, W, acc, pf_rows);
}

template <Kind KIND, Isa ISA>
void nk_tile_vec(const void* base, int64_t ldn_bytes, int64_t K, int64_t group,
                 const float* scales, const float* zeros, const float* const* x,
                 int64_t n, int64_t W, float* acc) {
  const int64_t K32 = K / 32 * 32;
  const int64_t ngroups = KIND == Kind::I4 ? K / group : 1;
  const int64_t glen = KIND == Kind::I4 ? group : std::max<int64_t>(K32, 32);
  // Passes of RMAX rows (as many as the registers hold), each over every output row
  // of the tile: a pass's x rows (32 KiB at 8 rows of K = 1024) stay in L1. (Output
  // rows outside, all 16 rows of a batch-16 projection per output row, read x from L2
  // and took 1.5x two passes' time.)
  constexpr int64_t RMAX = ISA == Isa::Avx512 ? 8 : 4;
  for (int64_t r0 = 0; r0 < n; r0 += RMAX) {
    const int64_t m = std::min<int64_t>(RMAX, n - r0);
    for (int64_t j = 0; j < W; ++j) {
      const void* p = static_cast<const char*>(base) + j * ldn_bytes;
      const float* gs = KIND == Kind::I4 ? scales + j * ngroups : nullptr;
      const float* gz = KIND == Kind::I4 ? zeros + j * ngroups : nullptr;
      float v[RMAX];
      with_rows<RMAX>(m, [&](auto R) {
        nk_rows<KIND, ISA, decltype(R)::value>(p, K32, glen, gs, gz, x + r0, v);
      });
      for (int64_t r = 0; r < m; ++r) {
        float t = v[r];
        if constexpr (KIND == Kind::I8) {
          for (int64_t k = K32; k < K; ++k)
            t += x[r0 + r][k] * static_cast<float>(static_cast<const int8_t*>(p)[k]);
          t *= scales[j];
        } else if constexpr (KIND == Kind::BF16) {
          for (int64_t k = K32; k < K; ++k)
            t += x[r0 + r][k] * bf16(static_cast<const uint16_t*>(p)[k]);
        } else if constexpr (KIND == Kind::F32) {
          for (int64_t k = K32; k < K; ++k) t += x[r0 + r][k] * static_cast<const float*>(p)[k];
        }
        acc[(r0 + r) * W + j] = t;
      }
    }
  }
}

// Rows of x per pass over a weight block: up to 6 with AVX-512 (24 accumulators + 4
// weight vectors + 1 broadcast of its 32 registers), 4 with AVX2; an expert's rows are
// split evenly into passes (7 rows: 4 + 3, not 6 + 1), each pass reading the block
// again. (Mixtral-like batch 16, ~4 rows per expert, passes of 4: 5 rows took 4 + 1,
// the 1-row pass as long as a 4-row one; 0.97x the time, cold, 4 layers.)
template <Isa ISA>
constexpr int KN_RMAX = ISA == Isa::Avx512 ? 6 : 4;

template <Kind KIND, Isa ISA>
void kn_tile_vec(const void* w, int64_t ldk, int64_t K, const float* const* x,
                 int64_t n, int64_t W, float* acc) {
  using T = std::conditional_t<KIND == Kind::F32, float, uint16_t>;
  const T* base = static_cast<const T*>(w);
  std::fill(acc, acc + n * W, 0.0f);
  constexpr int RMAX = KN_RMAX<ISA>;
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    const int64_t kb = std::min(KB, K - k0);
    const int64_t pf_rows = std::max<int64_t>(0, std::min(KB, K - k0 - KB));
    const T* wk = base + k0 * ldk;
    for (int64_t r0 = 0, left = n; left > 0;) {
      const int64_t passes = (left + RMAX - 1) / RMAX, m = (left + passes - 1) / passes;
      const int64_t pf = r0 == 0 ? pf_rows : 0;
      float* a = acc + r0 * W;
      with_rows<RMAX>(m, [&](auto R) {
        kn_rows_isa<KIND, ISA, decltype(R)::value>(wk, ldk, kb, x + r0, k0, W, a, pf);
      });
      r0 += m, left -= m;
    }
  }
  if constexpr (KIND == Kind::BF16) kn_unpermute(acc, n, W, ISA == Isa::Avx512 ? 16 : 8);
}

// C weight rows (16 KiB at K = 1024 and C = 4) stay in L1 while every group of 4
// rows of x passes over them.
template <Isa ISA, int R, int C>
inline void nk_rc(const float* w, int64_t ldn, int64_t K, const float* const* x, int64_t j,
                  int64_t W, float* acc, bool pf) {
  if constexpr (ISA == Isa::Avx512) nk_rc_f32<R, C>(w, ldn, K, x, j, W, acc, pf);
  else nk_rc_f32_avx2<R, C>(w, ldn, K, x, j, W, acc, pf);
}

template <Isa ISA, int C>
void nk_block_f32(const float* w, int64_t ldn, int64_t K, const float* const* x, int64_t n,
                  int64_t j, int64_t W, float* acc) {
  for (int64_t r0 = 0; r0 < n; r0 += 4) {
    const int64_t m = std::min<int64_t>(4, n - r0);
    float* a = acc + r0 * W;
    const bool pf = r0 == 0;
    with_rows<4>(m, [&](auto R) {
      nk_rc<ISA, decltype(R)::value, C>(w, ldn, K, x + r0, j, W, a, pf);
    });
  }
}

// C output columns at a time: with AVX-512 6 (4 rows x 6 columns = 24 of 32 registers;
// 6 weight rows, 24 KiB at K = 1024, stay in L1 over the passes of 4 x rows) or, for 2-4
// rows, 4; with AVX2 2 (8 of 16). A cold [3072, 1024] projection, 2 threads, Zen 4 VM,
// C = 4 / 6 alternating in one process (3 runs): 1 row 1.03-1.05x faster with 6, 4 rows
// 0.96-0.98x, 8 rows 1.05-1.09x, 16 and 32 rows 1.04-1.06x. Each output's sum is the same
// either way (one column's k order does not depend on C).
template <Isa ISA>
void nk_tile_f32_vec(const float* w, int64_t ldn, int64_t K, const float* const* x, int64_t n,
                     int64_t W, float* acc) {
  int64_t j = 0;
  auto columns = [&](auto c) {
    constexpr int C = decltype(c)::value;
    for (; j + C <= W; j += C) nk_block_f32<ISA, C>(w + j * ldn, ldn, K, x, n, j, W, acc);
  };
  if constexpr (ISA == Isa::Avx512) {
    if (n == 1 || n > 4) columns(std::integral_constant<int, 6>{});
    columns(std::integral_constant<int, 4>{});
  } else {
    columns(std::integral_constant<int, 2>{});
  }
  for (; j < W; ++j) nk_block_f32<ISA, 1>(w + j * ldn, ldn, K, x, n, j, W, acc);
}

// The NK layout and quantized weights on the intrinsics path.
template <Isa ISA>
void nk_tile_isa(const Weights& w, int64_t e, const float* const* x, int64_t n, int64_t c0,
                 int64_t W, float* acc) {
  const int64_t es = w.kind == Kind::F32 ? 4 : w.kind == Kind::BF16 ? 2 : 1;
  const char* p = static_cast<const char*>(w.data) + (e * w.s_e + c0 * w.s_n) * es;
  const int64_t ldn = w.s_n * es, ng = w.kind == Kind::I4 ? w.K / w.group : 1;
  const float* sc = w.kind == Kind::I8 ? w.scales + e * w.N + c0
                    : w.kind == Kind::I4 ? w.scales + (e * w.N + c0) * ng : nullptr;
  const float* z = w.kind == Kind::I4 ? w.zeros + (e * w.N + c0) * ng : nullptr;
  switch (w.kind) {
    case Kind::F32:
      return nk_tile_f32_vec<ISA>(reinterpret_cast<const float*>(p), w.s_n, w.K, x, n, W, acc);
    case Kind::BF16: return nk_tile_vec<Kind::BF16, ISA>(p, ldn, w.K, 0, sc, z, x, n, W, acc);
    case Kind::I8: return nk_tile_vec<Kind::I8, ISA>(p, ldn, w.K, 0, sc, z, x, n, W, acc);
    case Kind::I4:
      return nk_tile_vec<Kind::I4, ISA>(p, ldn, w.K, w.group, sc, z, x, n, W, acc);
  }
}

// ---- int4 weights, int8 activations (bits = 48, "W4A8") ----------------------------
//
// A weight-only int4 dot product spends per 16 weights one lookup (vpermps) and one
// FMA besides the nibble unpacking: at batch 1 it is bound by those instructions
// (~20 GB/s of int4 on 2 threads, under the read bandwidth). With the activations
// rounded to int8 one vpdpbusd multiplies 64 nibbles by 64 int8 inputs and sums
// them in fours; a block of 128 inputs (64 weight bytes) costs 2 of them, a mask
// and a shift per unpacked half, and one convert, scale and FMA. A /tmp
// microbenchmark (1 row, 2 threads, K = 1024, g = 64) read 57 GB/s against the
// lookup's 28 from a 256 MiB pool, 30 against 18 from 2 GiB.
//
// Activations: each input row is rounded once per call, per block of 32 inputs,
// to xq = round(x / sx) with sx = max|x| / 127 (0 for an all-zero block), and the
// kernels compute the exact product of the dequantized weights (s * q + z) with
// x' = sx * xq: sum over groups of s * sum(q * xq * sx) + z * sum(x'). Prefill past
// the kernels' rows rounds the inputs the same way on AVX-512 VNNI CPUs (cpu_experts.cpp's
// igemm_a8) and elsewhere runs dequantized weights on float activations (the row limits:
// experts/backends.py quant_kernel_max_rows, functions/decode.py QUANT_LINEAR_MAX_ROWS).
//
// A row record (one per distinct input row, 64-byte aligned):
//   xq   K int8, per block of 128 inputs the low halves of its four 32-input
//        chunks (inputs 0-15 of each), then the high halves (16-31): byte i of the
//        weights' 64 block bytes holds the nibbles these two halves meet at byte i
//        of each. A tail of K % 128 inputs: per chunk its low 16, then its high 16.
//   sx   4 floats per chunk (its scale, repeated: a block's 16 lanes, in the order
//        vpdpbusd sums them: lanes 4c..4c+3 hold chunk c).
//   zx   K / g floats: sum of x' over each weight group (the zero points' term).
struct A8Layout {
  int64_t K, group, sx_off, zx_off, bytes;
  A8Layout(int64_t k, int64_t g) : K(k), group(g) {
    sx_off = K;
    zx_off = sx_off + 4 * (K / 32) * 4;
    bytes = (zx_off + 4 * (K / g) + 63) / 64 * 64;
  }
  // byte offsets of chunk c's low and high 16 inputs in xq
  int64_t lo(int64_t c) const {
    const int64_t nb = K / 128;
    return c < 4 * nb ? 128 * (c / 4) + 16 * (c % 4) : 128 * nb + 32 * (c - 4 * nb);
  }
  int64_t hi(int64_t c) const { return lo(c) + (c < 4 * (K / 128) ? 64 : 16); }
};

// One half (16 inputs) of a chunk: q = round(x / scale), clamped; returns their sum.
// Loops the compiler vectorizes (target_clones): the division and rounding are IEEE
// operations, so every clone gives the same q.
CLONES int32_t round_half(const float* x, float scale, int8_t* q) {
  int32_t v[16], sum = 0;
  for (int j = 0; j < 16; ++j)
    v[j] = scale > 0.0f ? static_cast<int32_t>(std::nearbyint(x[j] / scale)) : 0;
  for (int j = 0; j < 16; ++j) {
    v[j] = std::min(127, std::max(-127, v[j]));
    q[j] = static_cast<int8_t>(v[j]);
    sum += v[j];
  }
  return sum;
}

void quantize_a8(const float* x, const A8Layout& L, char* rec) {
  int8_t* q = reinterpret_cast<int8_t*>(rec);
  float* sx = reinterpret_cast<float*>(rec + L.sx_off);
  float* zx = reinterpret_cast<float*>(rec + L.zx_off);
  const int64_t chunks = L.K / 32, per_group = L.group / 32;
  for (int64_t g = 0; g < L.K / L.group; ++g) zx[g] = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) {
    const float* xc = x + 32 * c;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xc[j]));
    const float scale = amax / 127.0f;
    const int32_t sum = round_half(xc, scale, q + L.lo(c)) + round_half(xc + 16, scale, q + L.hi(c));
    for (int i = 0; i < 4; ++i) sx[4 * c + i] = scale;
    zx[c / per_group] += scale * static_cast<float>(sum);
  }
}

// Chunks c0.. of output row p (int4, K / 2 bytes; group scales gs) against record xr,
// one chunk at a time: the plain loops' whole row, the intrinsics' tail past K / 128
// blocks. With `zeros`, the zero points' term (gz against the record's zx) too.
INLINE float i4a8_chunks(const uint8_t* p, const A8Layout& L, const float* gs,
                         const float* gz, const char* xr, int64_t c0, bool zeros) {
  const int8_t* q = reinterpret_cast<const int8_t*>(xr);
  const float* sx = reinterpret_cast<const float*>(xr + L.sx_off);
  const float* zx = reinterpret_cast<const float*>(xr + L.zx_off);
  float t = 0.0f;
  for (int64_t c = c0; c < L.K / 32; ++c) {
    const uint8_t* b = p + 16 * c;
    const int8_t *ql = q + L.lo(c), *qh = q + L.hi(c);
    int32_t sum = 0;
    for (int j = 0; j < 16; ++j) sum += (b[j] & 15) * ql[j] + (b[j] >> 4) * qh[j];
    t += static_cast<float>(sum) * (gs[32 * c / L.group] * sx[4 * c]);
  }
  if (zeros)
    for (int64_t g = 0; g < L.K / L.group; ++g) t += gz[g] * zx[g];
  return t;
}

// One output row p (its group scales gs and zeros gz) against R row records: v[r] =
// the dot product. Plain loops, for CPUs without AVX2 (or MOEKIT_CPU_ISA=generic).
CLONES void i4a8_rows_generic(const uint8_t* p, const A8Layout& L, const float* gs,
                              const float* gz, const char* const* xr, int64_t R, float* v) {
  for (int64_t r = 0; r < R; ++r) v[r] = i4a8_chunks(p, L, gs, gz, xr[r], 0, true);
}

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

// What the kernels of 128-input blocks (i4a8_rows_vnni, i4f_rows) need of the int4
// layout, computed once per tile (per output row, the lane table's integer divisions
// cost more than the row's 8 blocks at K = 1024).
struct BlockGroups {
  __m512i idx;        // lane -> weight group within a block
  __mmask16 gmask;    // the block's group scales (128 / g of them)
  int64_t nb, gpb, ng;
};

AVX512 BlockGroups block_groups(int64_t K, int64_t group) {
  alignas(64) int32_t lane_group[16];
  for (int l = 0; l < 16; ++l) lane_group[l] = static_cast<int32_t>((l / 4) * 32 / group);
  const int64_t gpb = 128 / group;
  return {_mm512_load_si512(lane_group), static_cast<__mmask16>((1u << gpb) - 1), K / 128,
          gpb, K / group};
}

// sum of a[i] * b[i], i < n, 16 lanes at a time
AVX512 inline __m512 dot_acc(const float* a, const float* b, int64_t n, __m512 acc) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return acc;
}

// The same with AVX-512 VNNI, R (1..8) records per pass over C (1..2) output rows p,
// p + ldn (group scales gs, gs + ng; zeros gz, gz + ng): two rows share each record
// load, as in i8a8_rows_vnni.
template <int R, int C>
VNNI void i4a8_rows_vnni(const uint8_t* p, int64_t ldn, const A8Layout& L, const BlockGroups& V,
                         const float* gs, const float* gz, const char* const* xr, float* v) {
  const __m512i m = _mm512_set1_epi8(15);
  __m512 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < V.nb; ++b) {
    __m512i lo[C], hi[C];
    __m512 sw[C];
    for (int c = 0; c < C; ++c) {
      const uint8_t* at = p + c * ldn + 64 * b;
      prefetch_ahead(at);
      const __m512i w = _mm512_loadu_si512(at);
      lo[c] = _mm512_and_si512(w, m), hi[c] = _mm512_and_si512(_mm512_srli_epi16(w, 4), m);
      sw[c] = _mm512_permutexvar_ps(
          V.idx, _mm512_maskz_loadu_ps(V.gmask, gs + c * V.ng + b * V.gpb));
    }
    for (int r = 0; r < R; ++r) {
      const char* q = xr[r] + 128 * b;
      const __m512i ql = _mm512_loadu_si512(q), qh = _mm512_loadu_si512(q + 64);
      const __m512 sx = _mm512_loadu_ps(reinterpret_cast<const float*>(xr[r] + L.sx_off) + 16 * b);
      for (int c = 0; c < C; ++c) {
        __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[c], ql);
        i = _mm512_dpbusd_epi32(i, hi[c], qh);
        acc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(sw[c], sx), acc[c][r]);
      }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) {
      const float* zx = reinterpret_cast<const float*>(xr[r] + L.zx_off);
      float t = _mm512_reduce_add_ps(dot_acc(gz + c * V.ng, zx, V.ng, acc[c][r]));
      if (L.K % 128)  // past the blocks
        t += i4a8_chunks(p + c * ldn, L, gs + c * V.ng, gz + c * V.ng, xr[r], 4 * V.nb, false);
      v[c * 8 + r] = t;
    }
}

// AVX2 (no VNNI): vpmaddubsw multiplies nibbles by int8 inputs into pairwise int16
// sums (at most 2 x 15 x 127 each, so a low and a high half add without overflow),
// vpmaddwd by ones sums those into int32 lanes; each 32-byte half of a block covers
// two chunks (lanes 0-3 and 4-7).
struct A8Avx2 {
  int32_t lane_group[2][8];  // lane of each half -> weight group within the block
  int32_t mask[8];           // the block's group scales (128 / g of them)
  A8Avx2(const A8Layout& L) {
    for (int h = 0; h < 2; ++h)
      for (int l = 0; l < 8; ++l)
        lane_group[h][l] = static_cast<int32_t>((2 * h + l / 4) * 32 / L.group);
    for (int l = 0; l < 8; ++l) mask[l] = l < 128 / L.group ? -1 : 0;
  }
};

template <int R>
AVX2 void i4a8_rows_avx2(const uint8_t* p, const A8Layout& L, const A8Avx2& V,
                         const float* gs, const float* gz, const char* const* xr, float* v) {
  const int64_t nb = L.K / 128, gpb = 128 / L.group;
  const __m256i idx0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(V.lane_group[0]));
  const __m256i idx1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(V.lane_group[1]));
  const __m256i gm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(V.mask));
  const __m256i m = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 g = _mm256_maskload_ps(gs + b * gpb, gm);
    const __m256 sw[2] = {_mm256_permutevar8x32_ps(g, idx0), _mm256_permutevar8x32_ps(g, idx1)};
    for (int h = 0; h < 2; ++h) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * b + 32 * h));
      const __m256i lo = _mm256_and_si256(w, m), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m);
      for (int r = 0; r < R; ++r) {
        const char* q = xr[r] + 128 * b + 32 * h;
        const __m256i s16 = _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))),
            _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64))));
        const __m256 sx = _mm256_loadu_ps(
            reinterpret_cast<const float*>(xr[r] + L.sx_off) + 16 * b + 8 * h);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones)),
                                 _mm256_mul_ps(sw[h], sx), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc[r]);
    float t = 0.0f;
    for (float f : lanes) t += f;
    v[r] = t + i4a8_chunks(p, L, gs, gz, xr[r], 4 * nb, true);  // past the blocks; zeros
  }
}

const bool CPU_VNNI = [] {
  __builtin_cpu_init();
  return CPU_ISA == Isa::Avx512 && __builtin_cpu_supports("avx512vnni");
}();

// int8 activations: x rows per pass up to 8 (4 on AVX2 without VNNI: 16 registers),
// output rows two at a time with VNNI.
const int64_t A8_RMAX = CPU_VNNI || CPU_ISA == Isa::Generic ? 8 : 4;
inline int64_t a8_cols(int64_t) { return CPU_VNNI ? 2 : 1; }

// The passes over a tile of row records: x rows in groups of up to rmax, output rows
// cmax(m) at a time (1, 2 or 4; one at a time for the tile's last ones, fewer than
// that); pass(r0, m, j, cols, v) leaves output row j + c of x row r0 + r in v[8 * c + r].
template <typename Cols, typename Pass>
void record_tile(int64_t n, int64_t W, int64_t rmax, const Cols& cmax, const Pass& pass,
                 float* acc) {
  for (int64_t r0 = 0; r0 < n; r0 += rmax) {
    const int64_t m = std::min<int64_t>(rmax, n - r0), cm = cmax(m);
    for (int64_t j = 0; j < W;) {
      const int64_t cols = W - j >= cm ? cm : 1;
      float v[32];
      pass(r0, m, j, cols, v);
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t r = 0; r < m; ++r) acc[(r0 + r) * W + j + c] = v[8 * c + r];
      j += cols;
    }
  }
}

// ---- W4A8 in the 16-output order (bits = 49; moekit.quant.layout's "o16" order) ------
//
// The NK kernel above lays one output's inputs along the vector: per 128 weights of an
// output and activation row it spends two vpdpbusd, a convert, a scale product, an FMA,
// and per output and row a horizontal sum. Here each 16 outputs' weights are stored as
// vpdpbusd sums them: per 32-input chunk c, four 64-byte vectors j whose byte 4 o + t
// holds the nibbles of inputs 32 c + 4 j + t (low) and 32 c + 16 + 4 j + t (high) of
// output o (the same bytes as the NK rows of those outputs, permuted within the 16 rows'
// span); scales and zeros [ng][16] per 16 outputs. A row's 4 activation bytes are
// broadcast against 16 outputs at once, and the convert, scale and FMA are per chunk and
// 16 outputs. benchmarks/bench_int4_order.py measured the prototype of this kernel.

// The 16 outputs from `blk` (scales bs, zeros bz: [ng][16]) against R row records: out[r].
template <int R>
VNNI void i4a8_o16_rows(const uint8_t* blk, const float* bs, const float* bz,
                        const A8Layout& L, const char* const* xr, __m512* out) {
  const __m512i m = _mm512_set1_epi8(15);
  const int64_t chunks = L.K / 32, cpg = L.group / 32;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = L.lo(c), hi = L.hi(c);
    __m512i ia[R];
    for (int r = 0; r < R; ++r) ia[r] = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
      const uint8_t* at = blk + (4 * c + j) * 64;
      prefetch_ahead(at);
      const __m512i wv = _mm512_loadu_si512(at);
      const __m512i wl = _mm512_and_si512(wv, m);
      const __m512i wh = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m);
      for (int r = 0; r < R; ++r) {
        int32_t ql, qh;
        std::memcpy(&ql, xr[r] + lo + 4 * j, 4);
        std::memcpy(&qh, xr[r] + hi + 4 * j, 4);
        ia[r] = _mm512_dpbusd_epi32(ia[r], wl, _mm512_set1_epi32(ql));
        ia[r] = _mm512_dpbusd_epi32(ia[r], wh, _mm512_set1_epi32(qh));
      }
    }
    const __m512 sg = _mm512_loadu_ps(bs + (c / cpg) * 16);
    for (int r = 0; r < R; ++r) {
      const float sx = reinterpret_cast<const float*>(xr[r] + L.sx_off)[4 * c];
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r]), _mm512_mul_ps(sg, _mm512_set1_ps(sx)),
                               acc[r]);
    }
  }
  for (int64_t g = 0; g < L.K / L.group; ++g) {
    const __m512 zg = _mm512_loadu_ps(bz + 16 * g);
    for (int r = 0; r < R; ++r) {
      const float zx = reinterpret_cast<const float*>(xr[r] + L.zx_off)[g];
      acc[r] = _mm512_fmadd_ps(zg, _mm512_set1_ps(zx), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

// v[r] = the 16 outputs from `blk` against records xr[r], r < m <= 8.
VNNI void i4a8_o16_pass(const uint8_t* blk, const float* bs, const float* bz,
                        const A8Layout& L, const char* const* xr, int64_t m, float (*v)[16]) {
  __m512 out[8];
  with_rows<8>(m, [&](auto R) { i4a8_o16_rows<decltype(R)::value>(blk, bs, bz, L, xr, out); });
  for (int64_t r = 0; r < m; ++r) _mm512_store_ps(v[r], out[r]);
}

// Output o of the 16 from `blk` against one record, plain loops (CPUs without VNNI, or
// MOEKIT_CPU_ISA below avx512): the sums i4a8_chunks forms on the NK bytes, read where
// the 16-output order keeps them.
CLONES float i4a8_o16_one(const uint8_t* blk, const float* bs, const float* bz,
                          const A8Layout& L, const char* xr, int o) {
  const int8_t* q = reinterpret_cast<const int8_t*>(xr);
  const float* sx = reinterpret_cast<const float*>(xr + L.sx_off);
  const float* zx = reinterpret_cast<const float*>(xr + L.zx_off);
  float t = 0.0f;
  for (int64_t c = 0; c < L.K / 32; ++c) {
    const int8_t *ql = q + L.lo(c), *qh = q + L.hi(c);
    int32_t sum = 0;
    for (int i = 0; i < 16; ++i) {
      const uint8_t b = blk[(4 * c + i / 4) * 64 + 4 * o + i % 4];
      sum += (b & 15) * ql[i] + (b >> 4) * qh[i];
    }
    t += static_cast<float>(sum) * (bs[32 * c / L.group * 16 + o] * sx[4 * c]);
  }
  for (int64_t g = 0; g < L.K / L.group; ++g) t += bz[16 * g + o] * zx[g];
  return t;
}

// acc [n, W] = n row records @ int4 weights w[e][:, c0 : c0 + W] in the 16-output order
// (bits = 49): every 16-output block the columns touch, 8 rows a pass (a block's K / 2 *
// 16 bytes stay in L1 for the next pass), only the columns asked for stored.
void i4a8_o16_tile(const Weights& w, int64_t e, const float* const* x, int64_t n, int64_t c0,
                   int64_t W, float* acc) {
  const A8Layout L(w.K, w.group);
  const int64_t ng = w.K / w.group;
  const char* const* xr = reinterpret_cast<const char* const*>(x);
  for (int64_t b = c0 / 16; 16 * b < c0 + W; ++b) {
    const uint8_t* blk = static_cast<const uint8_t*>(w.data) + e * w.s_e + 16 * b * w.s_n;
    const float* bs = w.scales + (e * w.N + 16 * b) * ng;
    const float* bz = w.zeros + (e * w.N + 16 * b) * ng;
    const int64_t j0 = std::max(c0, 16 * b), j1 = std::min(c0 + W, 16 * b + 16);
    for (int64_t r0 = 0; r0 < n; r0 += 8) {
      const int64_t m = std::min<int64_t>(8, n - r0);
      alignas(64) float v[8][16];
      if (CPU_VNNI) {
        i4a8_o16_pass(blk, bs, bz, L, xr + r0, m, v);
      } else {
        for (int64_t r = 0; r < m; ++r)
          for (int64_t j = j0; j < j1; ++j)
            v[r][j - 16 * b] = i4a8_o16_one(blk, bs, bz, L, xr[r0 + r], static_cast<int>(j - 16 * b));
      }
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = j0; j < j1; ++j) acc[(r0 + r) * W + j - c0] = v[r][j - 16 * b];
    }
  }
}

// acc [n, W] = n row records @ int4 weights w[e][:, c0 : c0 + W] (bits = 48).
void i4a8_tile(const Weights& w, int64_t e, const float* const* x, int64_t n, int64_t c0,
               int64_t W, float* acc) {
  if (w.o16) return i4a8_o16_tile(w, e, x, n, c0, W, acc);
  const A8Layout L(w.K, w.group);
  const int64_t ng = w.K / w.group;
  const uint8_t* base = static_cast<const uint8_t*>(w.data) + e * w.s_e + c0 * w.s_n;
  const float* sc = w.scales + (e * w.N + c0) * ng;
  const float* z = w.zeros + (e * w.N + c0) * ng;
  const char* const* xr = reinterpret_cast<const char* const*>(x);
  const BlockGroups V = CPU_VNNI ? block_groups(L.K, L.group) : BlockGroups{};
  const A8Avx2 V2(L);
  auto pass = [&](int64_t r0, int64_t m, int64_t j, int64_t cols, float* v) {
    const uint8_t* p = base + j * w.s_n;
    const float *gs = sc + j * ng, *gz = z + j * ng;
    if (CPU_VNNI)
      with_rows<8>(m, [&](auto R) {
        if (cols == 2) i4a8_rows_vnni<decltype(R)::value, 2>(p, w.s_n, L, V, gs, gz, xr + r0, v);
        else i4a8_rows_vnni<decltype(R)::value, 1>(p, w.s_n, L, V, gs, gz, xr + r0, v);
      });
    else if (CPU_ISA == Isa::Generic)
      i4a8_rows_generic(p, L, gs, gz, xr + r0, m, v);
    else  // AVX2, or AVX-512 without VNNI
      with_rows<4>(m, [&](auto R) {
        i4a8_rows_avx2<decltype(R)::value>(p, L, V2, gs, gz, xr + r0, v);
      });
  };
  record_tile(n, W, A8_RMAX, a8_cols, pass, acc);
}

// ---- int4 weights, float activations, 128-input blocks ("i4f"; AVX-512, AVX2) -----
//
// The per-chunk kernel (nk_rows_avx512) spends per 32 weights a widening, two vpermps
// lookups and a shift (on the shuffle units, 1 per cycle each on Zen 4) and two
// FMAs: at batch 1 it read ~17 GB/s of int4 on 2 threads, half the read bandwidth.
// Here a block's 64 bytes are one load of 16 dwords, each holding 8 nibbles; nibble j
// (bits 4j..4j+3) of every dword is one AND with 0xF << 4j and one unsigned convert:
// q * 2^4j exactly (4 significant bits), times an input prescaled by 2^-4j (exact), so
// each product is x * q as fp32 computes it. An AND (any of the 4 vector pipes), a
// convert and an FMA per 16 weights (nibble 0: one vpermps from a table of 0..15, which
// reads an index's low 4 bits only), no other shuffles; an input vector serves the
// pass's C output rows. The group scale is one FMA per block, the zero point
// z * sum(x) one per group. gate_up of 64 experts D=1024 2F=2048 g64, 2 threads, Zen 4
// VM, against the per-chunk kernel in one process: 8 touched at 1 row, cold, 21.9 ->
// 27.8 GB/s of int4; 1-16 rows 1.15-1.29x, L3-warm 1.14-1.28x. (A /tmp microbenchmark, one thread
// from L2: one output row per pass ran slower than the per-chunk kernel; `vdpbf16ps`
// with each input split into two bf16 terms 1.2x faster than this, but it keeps 16 of
// an input's 24 significant bits; with three terms, exact, no faster than this.)
//
// Nibble j of dword d of block b is input 128 b + 32 (d / 4) + 4 (d % 4) + j / 2 +
// 16 (j % 2) (the chunk layout at the top of this file: byte i of a 16-byte chunk
// holds inputs i and 16 + i); lane d belongs to chunk d / 4 (block_groups' lanes).
//
// A row record (one per distinct input row, 64-byte aligned; K % 128 == 0):
//   xs   per block of 128 inputs, for j = 0..7, 16 floats: lane d the input of
//        nibble j of dword d, times 2^-4j (j = 7: 2^-f4_top())
//   zx   K / g floats: sum of x over each weight group
struct F4Layout {
  int64_t K, group, zx_off, bytes;
  F4Layout(int64_t k, int64_t g) : K(k), group(g) {
    zx_off = 4 * K;
    bytes = (zx_off + 4 * (K / g) + 63) / 64 * 64;
  }
};

// int4 weights of the NK layout whose tiles run i4f_tile, for experts of up to `rows`
// rows each. AVX2 only for 1-2 (2 threads, Zen 4 VM capped to AVX2, against the
// per-chunk kernel: batch-1 int4 steps 1.17x faster, prefill-sized calls 0.90-0.95x).
bool i4f(const Weights& w, int64_t rows) {
  return (CPU_ISA == Isa::Avx512 || (CPU_ISA == Isa::Avx2 && rows <= 2)) &&
         w.kind == Kind::I4 && !w.a8 && !w.n_unit &&
         w.K % 128 == 0 && (w.group == 32 || w.group == 64 || w.group == 128);
}

// Nibble 7 of a dword: unsigned q << 28 with AVX-512; AVX2 has no unsigned convert and
// takes (w >> 4) & (0xF << 24) = q << 24, so its records prescale input 7 by 2^-24.
int f4_top() { return CPU_ISA == Isa::Avx512 ? 28 : 24; }

// The prescale of nibble j's inputs: 2^-4j, 2^-f4_top() for j = 7.
float f4_scale(int j) { return std::ldexp(1.0f, j == 7 ? -f4_top() : -4 * j); }

// zx: each group's sum, 8 lanes per group then one horizontal sum (g a multiple of 8)
AVX2 void f4_group_sums(const float* x, const F4Layout& L, float* zx) {
  for (int64_t g = 0; g < L.K / L.group; ++g) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = g * L.group; k < (g + 1) * L.group; k += 8)
      acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + k));
    zx[g] = hsum(acc);
  }
}

// Inputs 32 q + 16 s + 4 m + i of a block (chunk q, half s) are nibble j = 2 i + s of
// dword 4 q + m: a 4 x 4 transpose of 16 inputs gives nibble 2 i + s's four values for
// dwords 4 q..4 q + 3 in row i. No gathers: with 16 of them per 128 inputs, a scalar
// ldexp per nibble position and block, and the group sums chained through memory, the
// records of the down projection's 8 rows (K = 512) took 4.5 us per layer of the fine
// model while the other thread waited.
AVX2 void f4_record(const float* x, const F4Layout& L, char* rec) {
  float* xs = reinterpret_cast<float*>(rec);
  __m128 scale[8];
  for (int j = 0; j < 8; ++j) scale[j] = _mm_set1_ps(f4_scale(j));
  for (int64_t b = 0; b < L.K / 128; ++b)
    for (int q = 0; q < 4; ++q)
      for (int s = 0; s < 2; ++s) {
        const float* in = x + 128 * b + 32 * q + 16 * s;
        __m128 r0 = _mm_loadu_ps(in), r1 = _mm_loadu_ps(in + 4), r2 = _mm_loadu_ps(in + 8),
               r3 = _mm_loadu_ps(in + 12);
        _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
        float* at = xs + 128 * b + 16 * s + 4 * q;  // nibble s, dword 4 q; then + 32 per i
        _mm_storeu_ps(at, _mm_mul_ps(r0, scale[s]));
        _mm_storeu_ps(at + 32, _mm_mul_ps(r1, scale[2 + s]));
        _mm_storeu_ps(at + 64, _mm_mul_ps(r2, scale[4 + s]));
        _mm_storeu_ps(at + 96, _mm_mul_ps(r3, scale[6 + s]));
      }
  f4_group_sums(x, L, reinterpret_cast<float*>(rec + L.zx_off));
}

// R (1..8) records per pass over C (1, 2 or 4) output rows p, p + ldn, ..: each
// nibble vector of a row is converted once for the R records.
template <int R, int C>
AVX512 void i4f_rows(const uint8_t* p, int64_t ldn, const F4Layout& L, const BlockGroups& V,
                     const float* gs, const float* gz, const char* const* xr, float* v) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < V.nb; ++b) {
    __m512i w[C];
    for (int c = 0; c < C; ++c) {
      const uint8_t* at = p + c * ldn + 64 * b;
      prefetch_ahead(at);
      w[c] = _mm512_loadu_si512(at);
    }
    __m512 e[C][R];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m512 xj[R];
      for (int r = 0; r < R; ++r)
        xj[r] = _mm512_loadu_ps(reinterpret_cast<const float*>(xr[r]) + 128 * b + 16 * j);
      for (int c = 0; c < C; ++c) {
        const __m512 q =
            j == 0 ? _mm512_permutexvar_ps(w[c], iota)
                   : _mm512_cvtepu32_ps(_mm512_and_si512(w[c], _mm512_set1_epi32(0xFu << (4 * j))));
        for (int r = 0; r < R; ++r)
          e[c][r] = j == 0 ? _mm512_mul_ps(xj[r], q) : _mm512_fmadd_ps(xj[r], q, e[c][r]);
      }
    }
    for (int c = 0; c < C; ++c) {
      const __m512 sw = _mm512_permutexvar_ps(
          V.idx, _mm512_maskz_loadu_ps(V.gmask, gs + c * V.ng + b * V.gpb));
      for (int r = 0; r < R; ++r) acc[c][r] = _mm512_fmadd_ps(sw, e[c][r], acc[c][r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) {
      const float* zx = reinterpret_cast<const float*>(xr[r] + L.zx_off);
      v[c * 8 + r] = _mm512_reduce_add_ps(dot_acc(gz + c * V.ng, zx, V.ng, acc[c][r]));
    }
}

// Output rows per pass: 4 for 1-2 records, 2 for 3-4, else 1 (at most 8 accumulators).
constexpr int64_t i4f_cols(int64_t m) { return m <= 2 ? 4 : m <= 4 ? 2 : 1; }

// The same with AVX2 (16 registers): half-blocks of 64 inputs, 8 lanes; R (1..4) records
// over C (4 for one record, 2 for two, else 1) output rows.
template <int R, int C>
AVX2 void i4f_rows_avx2(const uint8_t* p, int64_t ldn, const F4Layout& L, const float* gs,
                        const float* gz, const char* const* xr, float* v) {
  const int64_t ng = L.K / L.group;
  __m256 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm256_setzero_ps();
  for (int64_t hb = 0; hb < L.K / 64; ++hb) {  // half-block hb: block hb / 2, half hb % 2
    const int64_t b = hb / 2, h = hb % 2, g0 = 64 * hb / L.group;
    __m256i w[C];
    for (int c = 0; c < C; ++c) {
      const uint8_t* at = p + c * ldn + 32 * hb;
      if (h == 0) prefetch_ahead(at);
      w[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
    }
    __m256 e[C][R];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      __m256 xj[R];
      for (int r = 0; r < R; ++r)
        xj[r] = _mm256_loadu_ps(reinterpret_cast<const float*>(xr[r]) + 128 * b + 16 * j + 8 * h);
      for (int c = 0; c < C; ++c) {
        const __m256i n = j == 7 ? _mm256_and_si256(_mm256_srli_epi32(w[c], 4),
                                                    _mm256_set1_epi32(0xF << 24))
                                 : _mm256_and_si256(w[c], _mm256_set1_epi32(0xF << (4 * j)));
        const __m256 q = _mm256_cvtepi32_ps(n);
        for (int r = 0; r < R; ++r)
          e[c][r] = j == 0 ? _mm256_mul_ps(xj[r], q) : _mm256_fmadd_ps(xj[r], q, e[c][r]);
      }
    }
    for (int c = 0; c < C; ++c) {  // g = 32: chunks 2h, 2h + 1 of the block, 4 lanes each
      const float* s = gs + c * ng + g0;
      const __m256 sw = L.group == 32 ? _mm256_setr_m128(_mm_set1_ps(s[0]), _mm_set1_ps(s[1]))
                                      : _mm256_set1_ps(s[0]);
      for (int r = 0; r < R; ++r) acc[c][r] = _mm256_fmadd_ps(sw, e[c][r], acc[c][r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) {
      const float* zx = reinterpret_cast<const float*>(xr[r] + L.zx_off);
      float t = hsum(acc[c][r]);
      for (int64_t g = 0; g < ng; ++g) t += gz[c * ng + g] * zx[g];
      v[c * 8 + r] = t;
    }
}

constexpr int64_t i4f_cols_avx2(int64_t m) { return m == 1 ? 4 : m == 2 ? 2 : 1; }

// acc [n, W] = n row records (f4_record) @ int4 weights w[e][:, c0 : c0 + W].
void i4f_tile(const Weights& w, int64_t e, const float* const* x, int64_t n, int64_t c0,
              int64_t W, float* acc) {
  const F4Layout L(w.K, w.group);
  const int64_t ng = w.K / w.group;
  const uint8_t* base = static_cast<const uint8_t*>(w.data) + e * w.s_e + c0 * w.s_n;
  const float* sc = w.scales + (e * w.N + c0) * ng;
  const float* z = w.zeros + (e * w.N + c0) * ng;
  const char* const* xr = reinterpret_cast<const char* const*>(x);
  if (CPU_ISA == Isa::Avx2) {
    record_tile(n, W, 4, i4f_cols_avx2, [&](int64_t r0, int64_t m, int64_t j, int64_t cols,
                                            float* v) {
      const uint8_t* p = base + j * w.s_n;
      const float *gs = sc + j * ng, *gz = z + j * ng;
      with_rows<4>(m, [&](auto R) {
        constexpr int RR = decltype(R)::value, C = static_cast<int>(i4f_cols_avx2(RR));
        if (cols == C) i4f_rows_avx2<RR, C>(p, w.s_n, L, gs, gz, xr + r0, v);
        else i4f_rows_avx2<RR, 1>(p, w.s_n, L, gs, gz, xr + r0, v);
      });
    }, acc);
    return;
  }
  const BlockGroups V = block_groups(w.K, w.group);
  record_tile(n, W, 8, i4f_cols, [&](int64_t r0, int64_t m, int64_t j, int64_t cols, float* v) {
    const uint8_t* p = base + j * w.s_n;
    const float *gs = sc + j * ng, *gz = z + j * ng;
    with_rows<8>(m, [&](auto R) {
      constexpr int RR = decltype(R)::value, C = static_cast<int>(i4f_cols(RR));
      if (cols == C) i4f_rows<RR, C>(p, w.s_n, L, V, gs, gz, xr + r0, v);
      else i4f_rows<RR, 1>(p, w.s_n, L, V, gs, gz, xr + r0, v);
    });
  }, acc);
}

// ---- int8 weights, int8 activations (bits = 88, "W8A8") ----------------------------
//
// The weight-only int8 dot product widens every weight to fp32 (a sign extension and
// a convert per 16) before its FMA per row. With the activations rounded to int8 as
// W4A8's are (per block of 32 inputs, xq = round(x / sx), sx = max|x| / 127; the last
// block of a row may be shorter), one vpdpbusd multiplies 64 weights by 64 inputs and
// sums them in fours into exact int32 lanes; a convert and one FMA by the blocks'
// scales per row follow, the output channel's scale once per dot product.
//
// vpdpbusd multiplies unsigned by signed bytes: the weights go in as w ^ 0x80 = w + 128
// (unsigned), and each lane's accumulator starts at -128 * (its four inputs' sum), so
// the lane ends at the exact sum of w * xq. AVX2 (no VNNI) uses vpmaddubsw on |w| and
// xq with w's sign (|w|, |xq| <= 127: pairwise sums within int16), then vpmaddwd by ones.
//
// A row record (one per distinct input row, 64-byte aligned), per block b of 64 inputs
// (ceil(K / 64) of them; the last one's missing inputs are zeros), 192 bytes:
//   xq  64 int8     the block's inputs, in order
//   nc  16 int32    lane l: -128 * (xq[4l] + .. + xq[4l + 3])
//   sx  16 float    lane l: the scale of the 32-input block holding inputs 4l..4l+3
struct Q8Layout {
  static constexpr int64_t BLOCK = 192;
  int64_t K, nb, bytes;
  explicit Q8Layout(int64_t k) : K(k), nb((k + 63) / 64), bytes(BLOCK * nb) {}
};

void quantize_q8(const float* x, const Q8Layout& L, char* rec) {
  std::memset(rec, 0, L.bytes);
  for (int64_t c = 0; 32 * c < L.K; ++c) {
    const int64_t k0 = 32 * c, n = std::min<int64_t>(32, L.K - k0);
    float amax = 0.0f, xc[32] = {};
    for (int64_t j = 0; j < n; ++j) {
      xc[j] = x[k0 + j];
      amax = std::max(amax, std::fabs(xc[j]));
    }
    const float scale = amax / 127.0f;
    char* blk = rec + Q8Layout::BLOCK * (c / 2);
    int8_t* q = reinterpret_cast<int8_t*>(blk) + 32 * (c % 2);
    round_half(xc, scale, q);
    round_half(xc + 16, scale, q + 16);
    int32_t* nc = reinterpret_cast<int32_t*>(blk + 64) + 8 * (c % 2);
    float* sx = reinterpret_cast<float*>(blk + 128) + 8 * (c % 2);
    for (int l = 0; l < 8; ++l) {
      nc[l] = -128 * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
      sx[l] = scale;
    }
  }
}

// Blocks b0.. of int8 output row p (K weights) against record xr, one 32-input block
// at a time: the plain loops' whole row, AVX2's last (partial) block. Unscaled by the
// output channel's scale.
INLINE float i8a8_blocks(const int8_t* p, const Q8Layout& L, const char* xr, int64_t b0) {
  float t = 0.0f;
  for (int64_t c = 2 * b0; 32 * c < L.K; ++c) {
    const char* blk = xr + Q8Layout::BLOCK * (c / 2);
    const int8_t* q = reinterpret_cast<const int8_t*>(blk) + 32 * (c % 2);
    const int64_t n = std::min<int64_t>(32, L.K - 32 * c);
    int32_t sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += p[32 * c + j] * q[j];
    t += static_cast<float>(sum) * reinterpret_cast<const float*>(blk + 128)[8 * (c % 2)];
  }
  return t;
}

CLONES void i8a8_rows_generic(const int8_t* p, const Q8Layout& L, const char* const* xr,
                              int64_t R, float* v) {
  for (int64_t r = 0; r < R; ++r) v[r] = i8a8_blocks(p, L, xr[r], 0);
}

// R (1..8) records per pass over C (1..2) output rows p, p + ldn: 64 weights per
// vpdpbusd. Two rows share each record load (a record block is three loads per row
// of x; with one output row at a time the loads, not the arithmetic, bound it when
// several rows of x meet an expert).
template <int R, int C>
VNNI void i8a8_rows_vnni(const int8_t* p, int64_t ldn, const Q8Layout& L, const char* const* xr,
                         float* v) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __mmask64 tail = L.K % 64 ? (~0ull >> (64 - L.K % 64)) : ~0ull;
  __m512 acc[C][R];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < L.nb; ++b) {
    __m512i w[C];
    for (int c = 0; c < C; ++c) {
      const int8_t* at = p + c * ldn + 64 * b;
      prefetch_ahead(at);
      // past K (the last block's missing weights): 0 ^ 0x80 = 128, times xq = 0
      w[c] = _mm512_xor_si512(
          b + 1 < L.nb ? _mm512_loadu_si512(at) : _mm512_maskz_loadu_epi8(tail, at), flip);
    }
    for (int r = 0; r < R; ++r) {
      const char* blk = xr[r] + Q8Layout::BLOCK * b;
      const __m512i q = _mm512_load_si512(blk), nc = _mm512_load_si512(blk + 64);
      const __m512 sx = _mm512_load_ps(reinterpret_cast<const float*>(blk + 128));
      for (int c = 0; c < C; ++c)
        acc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(nc, w[c], q)), sx,
                                    acc[c][r]);
    }
  }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) v[c * 8 + r] = _mm512_reduce_add_ps(acc[c][r]);
}

// AVX2: per 32-byte half of a block, |w| times xq with w's sign (vpsignb; xq = 0 where
// w = 0, as the product), pairwise into int16, by ones into 8 int32 lanes.
template <int R>
AVX2 void i8a8_rows_avx2(const int8_t* p, const Q8Layout& L, const char* const* xr, float* v) {
  const int64_t full = L.K / 64;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < full; ++b) {
    for (int h = 0; h < 2; ++h) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * b + 32 * h));
      const __m256i aw = _mm256_abs_epi8(w);
      for (int r = 0; r < R; ++r) {
        const char* blk = xr[r] + Q8Layout::BLOCK * b;
        const __m256i q = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + 32 * h));
        const __m256i i = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(q, w)), ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i),
                                 _mm256_load_ps(reinterpret_cast<const float*>(blk + 128) + 8 * h),
                                 acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc[r]);
    float t = 0.0f;
    for (float f : lanes) t += f;
    v[r] = t + i8a8_blocks(p, L, xr[r], full);  // the last, partial block
  }
}

// acc [n, W] = n row records @ int8 weights w[e][:, c0 : c0 + W]: rows(p, xr, m, cols, v)
// leaves output row c of p (rows s_n bytes apart) for record r of xr in v[8 c + r], then
// scaled here by the output channels' scales (i8a8_tile, i8t_tile).
template <typename Cols, typename Rows>
void int8_record_tile(const Weights& w, int64_t e, const float* const* x, int64_t n, int64_t c0,
                      int64_t W, float* acc, int64_t rmax, const Cols& cmax, const Rows& rows) {
  const int8_t* base = static_cast<const int8_t*>(w.data) + e * w.s_e + c0 * w.s_n;
  const float* sc = w.scales + e * w.N + c0;
  const char* const* xr = reinterpret_cast<const char* const*>(x);
  auto pass = [&](int64_t r0, int64_t m, int64_t j, int64_t cols, float* v) {
    rows(base + j * w.s_n, xr + r0, m, cols, v);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t r = 0; r < m; ++r) v[8 * c + r] *= sc[j + c];
  };
  record_tile(n, W, rmax, cmax, pass, acc);
}

// acc [n, W] = n row records @ int8 weights w[e][:, c0 : c0 + W] (bits = 88).
void i8a8_tile(const Weights& w, int64_t e, const float* const* x, int64_t n, int64_t c0,
               int64_t W, float* acc) {
  const Q8Layout L(w.K);
  const auto rows = [&](const int8_t* p, const char* const* xr, int64_t m, int64_t cols,
                        float* v) {
    if (CPU_VNNI)
      with_rows<8>(m, [&](auto R) {
        if (cols == 2) i8a8_rows_vnni<decltype(R)::value, 2>(p, w.s_n, L, xr, v);
        else i8a8_rows_vnni<decltype(R)::value, 1>(p, w.s_n, L, xr, v);
      });
    else if (CPU_ISA == Isa::Generic)
      i8a8_rows_generic(p, L, xr, m, v);
    else  // AVX2, or AVX-512 without VNNI
      with_rows<4>(m, [&](auto R) { i8a8_rows_avx2<decltype(R)::value>(p, L, xr, v); });
  };
  int8_record_tile(w, e, x, n, c0, W, acc, A8_RMAX, a8_cols, rows);
}

// ---- fp32 rows as int8 terms (i8t_tile below; AMX-INT8's kernels in the AMX section)
//
// Each row, scaled by a power of two 2^e (max |x| / 2^e in (63.5, 127]), is split into
// four int8 terms, x / 2^e = t0 + t1 / 128 + t2 / 128^2 + t3 / 128^3 + rest with |rest| <=
// 2^-22, so the terms hold each x to within 2^-28 of the row's largest magnitude. The
// scaling, the rounding (to nearest even, as nearbyint) and the remainders are exact, so
// every ISA would give the same terms.

// Row xr's 2^e (1 for a zero row), or 0 where a value is not finite (NaN or inf: the FMA
// kernel runs then and propagates it) or the row's largest magnitude is below 2^-100 (its
// 2^-e would overflow fp32 from ~2^-121 on; the FMA kernel runs such rows too). K a
// multiple of 16.
AVX512 float terms_scale(const float* xr, int64_t K) {
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 mx = _mm512_setzero_ps();
  __mmask16 bad = 0;  // (max_ps would drop a NaN)
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(xr + k));
    bad |= _mm512_cmp_ps_mask(a, inf, _CMP_NLT_UQ);
    mx = _mm512_max_ps(mx, a);
  }
  const float amax = _mm512_reduce_max_ps(mx);
  if (bad || (amax > 0.0f && amax < 0x1p-100f)) return 0.0f;
  int e = 0;
  if (amax > 0.0f) std::frexp(amax / 127.0f, &e);  // amax / 2^e <= 127
  return std::ldexp(1.0f, e);
}

// The four terms of 16 inputs v (x / 2^e), q[i] term i's 16 bytes
AVX512 inline void split_terms(__m512 v, __m128i (&q)[4]) {
  const __m512 m128 = _mm512_set1_ps(128.0f);
  for (int i = 0; i < 4; ++i) {
    const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q[i] = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t));
    v = _mm512_mul_ps(_mm512_sub_ps(v, t), m128);  // exact: |v - t| <= 1/2
  }
}

// The four terms' int32 sums (lane by lane) as one value: ((C3 / 128 + C2) / 128 + C1) /
// 128 + C0, in fp32
AVX512 inline __m512 terms_value(__m512i c0, __m512i c1, __m512i c2, __m512i c3) {
  const __m512 inv = _mm512_set1_ps(1.0f / 128.0f);
  __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c3), inv, _mm512_cvtepi32_ps(c2));
  v = _mm512_fmadd_ps(v, inv, _mm512_cvtepi32_ps(c1));
  return _mm512_fmadd_ps(v, inv, _mm512_cvtepi32_ps(c0));
}

// The same for four terms in the four lanes of each 128-bit lane of f (C0 lowest, as an
// AMX C tile holds a row's terms): lane 4 q gets ((f3 / 128 + f2) / 128 + f1) / 128 + f0
// of its lanes 4 q .. 4 q + 3 (the other lanes: partial sums, not read)
AVX512 inline __m512 terms_in_lanes(__m512 f) {
  const __m512 inv = _mm512_set1_ps(1.0f / 128.0f);
  __m512 h = _mm512_fmadd_ps(_mm512_permute_ps(f, 0xFF), inv, _mm512_permute_ps(f, 0xAA));
  h = _mm512_fmadd_ps(h, inv, _mm512_permute_ps(f, 0x55));
  return _mm512_fmadd_ps(h, inv, f);
}

// ---- int8 weights, fp32 rows as four int8 terms on vpdpbusd (weight-only, exact) ----
//
// The weight-only int8 FMA kernel spends per 16 weights a widening, a convert and an FMA
// per row: at the 2-3 rows of a batch's experts it is bound by them (64 experts D=1024
// 2F=1024, 16 tokens top-8, 2 threads: 28.8 GB/s with the experts in L3). Each row split
// into its four int8 terms (terms_scale, split_terms: to 2^-28 of its largest magnitude),
// one vpdpbusd multiplies 64 weights by 64 inputs of a term and sums them in fours into
// exact int32 lanes, as the W8A8 kernel does with its one rounded term: per 64 weights a
// flip and 4 per row, against the FMA kernel's 4 widenings and 4 converts and 4 FMAs per
// row: 5 against 12 at one row, 17 against 24 at four (where the two measured level).
// The lanes stay int32 over the whole row (no per-block scale), recombined once per
// output: (((C3 / 128 + C2) / 128 + C1) / 128 + C0) lane by lane in fp32, summed, times
// 2^e and the output channel's scale.
//
// A row record (one per distinct input row, 64-byte aligned):
//   per block b of 64 inputs, 256 bytes: term t's 64 inputs at 64 t
//   nc   4 x 16 int32 at 256 nb: lane l of term t, -128 * (the term's inputs 4l..4l+3 of
//        every block): vpdpbusd takes the weights unsigned (w ^ 0x80 = w + 128)
//   e2   the row's 2^e (a float) at 256 nb + 256
struct T8Layout {
  int64_t K, nb, nc_off, e2_off, bytes;
  explicit T8Layout(int64_t k)
      : K(k), nb(k / 64), nc_off(256 * nb), e2_off(nc_off + 256), bytes(e2_off + 64) {}
};

// This CPU's vendor: "intel", "amd" or "other" (the thresholds measured on one vendor's
// CPUs go by it).
const char* cpu_vendor() {
  __builtin_cpu_init();
  return __builtin_cpu_is("intel") ? "intel" : __builtin_cpu_is("amd") ? "amd" : "other";
}

// The most rows an expert may have to run on terms (the call's larger ones run the FMA
// kernel), by CPU. Intel: one. On an Ice Lake Xeon VM (AVX-512 VNNI, no AMX; 2 threads,
// a [1024 -> 3072] int8 projection over 16 cold copies, medians of 9 paired in one
// process, 2026-12-07), terms / FMA kernel at 1, 2, 3, 4, 8, 16 rows: 0.96, 1.04, 1.06,
// 1.17, 1.29, 1.39 ([512 -> 1024]: 0.88, 1.18, 1.13, 1.24, 1.40, 1.41); on Sapphire
// Rapids AMX-INT8 takes 2 rows and more.
// AMD (the Zen 4 VM the terms were built on): any number (4-row passes), as measured there.
int64_t t8_default_rows() {
  return cpu_vendor() == std::string("amd") ? std::numeric_limits<int64_t>::max() : 1;
}
std::atomic<int64_t> t8_rows{t8_default_rows()};  // set_int8_terms_max_rows

// Whether int8 weight-only experts of `rows` rows may run on terms (i8t_tile):
// AVX-512 VNNI, K a multiple of 64 up to 2^15 (|lane| <= 255 * 127 * K / 16 + 128 * 127 * K
// / 16 < 2^31), rows <= t8_rows.
std::atomic<bool> t8_on{true};     // set_int8_terms (tests compare both kernels)
std::atomic<int64_t> t8_calls{0};  // calls whose rows ran on terms (int8_terms_runs)
bool t8(const Weights& w, int64_t rows) {
  return t8_on.load(std::memory_order_relaxed) && CPU_VNNI && w.kind == Kind::I8 && !w.a8 &&
         !w.n_unit && w.K % 64 == 0 && w.K <= (1 << 15) &&
         rows <= t8_rows.load(std::memory_order_relaxed);
}

VNNI void t8_record(const float* x, const T8Layout& L, float e2, char* rec) {
  const __m512 down = _mm512_set1_ps(1.0f / e2);  // (exact: a power of two)
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i nc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                   _mm512_setzero_si512()};
  for (int64_t b = 0; b < L.nb; ++b) {
    char* blk = rec + 256 * b;
    for (int i = 0; i < 4; ++i) {
      __m128i q[4];
      split_terms(_mm512_mul_ps(_mm512_loadu_ps(x + 64 * b + 16 * i), down), q);
      for (int t = 0; t < 4; ++t)
        _mm_store_si128(reinterpret_cast<__m128i*>(blk + 64 * t + 16 * i), q[t]);
    }
    for (int t = 0; t < 4; ++t)  // lane l += the term's inputs 4l..4l+3 (ones * signed)
      nc[t] = _mm512_dpbusd_epi32(nc[t], ones, _mm512_load_si512(blk + 64 * t));
  }
  for (int t = 0; t < 4; ++t)
    _mm512_store_si512(rec + L.nc_off + 64 * t,
                       _mm512_mullo_epi32(nc[t], _mm512_set1_epi32(-128)));
  std::memcpy(rec + L.e2_off, &e2, sizeof e2);
}

// R (1..4) records against output row p (K weights): v[r], unscaled by the channel's
// scale. (Two output rows a pass, sharing each term's load, measured no faster.)
template <int R>
VNNI void i8t_rows(const int8_t* p, const T8Layout& L, const char* const* xr, float* v) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_load_si512(xr[r] + L.nc_off + 64 * t);
  for (int64_t b = 0; b < L.nb; ++b) {
    const int8_t* at = p + 64 * b;
    prefetch_ahead(at);
    const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(at), flip);
    for (int r = 0; r < R; ++r) {
      const char* blk = xr[r] + 256 * b;
      for (int t = 0; t < 4; ++t)
        acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], w, _mm512_load_si512(blk + 64 * t));
    }
  }
  for (int r = 0; r < R; ++r) {
    float e2;
    std::memcpy(&e2, xr[r] + L.e2_off, sizeof e2);
    v[r] = _mm512_reduce_add_ps(terms_value(acc[r][0], acc[r][1], acc[r][2], acc[r][3])) * e2;
  }
}

// acc [n, W] = n row records (t8_record) @ int8 weights w[e][:, c0 : c0 + W].
void i8t_tile(const Weights& w, int64_t e, const float* const* x, int64_t n, int64_t c0,
              int64_t W, float* acc) {
  const T8Layout L(w.K);
  const auto rows = [&](const int8_t* p, const char* const* xr, int64_t m, int64_t, float* v) {
    with_rows<4>(m, [&](auto R) { i8t_rows<decltype(R)::value>(p, L, xr, v); });
  };
  int8_record_tile(w, e, x, n, c0, W, acc, 4, [](int64_t) { return int64_t{1}; }, rows);
}

// acc [n, W] = x rows (n of them) @ w[e][:, c0 : c0 + W]
void tile(const Weights& w, int64_t e, const float* const* x, const float* xsum, int64_t n,
          int64_t c0, int64_t W, float* acc, bool f4, bool x_t8) {
  if (w.a8) {  // x: row records (Plan::quantize_rows)
    if (w.kind == Kind::I8) return i8a8_tile(w, e, x, n, c0, W, acc);
    return i4a8_tile(w, e, x, n, c0, W, acc);
  }
  if (f4) return i4f_tile(w, e, x, n, c0, W, acc);  // x: row records too (Plan::f4)
  if (x_t8) return i8t_tile(w, e, x, n, c0, W, acc);  // x: t8_records (Plan::t8rec)
  if (CPU_ISA != Isa::Generic && !w.n_unit) {
    if (CPU_ISA == Isa::Avx512) return nk_tile_isa<Isa::Avx512>(w, e, x, n, c0, W, acc);
    return nk_tile_isa<Isa::Avx2>(w, e, x, n, c0, W, acc);
  }
  switch (w.kind) {
    case Kind::F32: {
      const float* p = static_cast<const float*>(w.data) + e * w.s_e;
      if (w.n_unit) kn_tile_f32(p + c0, w.s_k, w.K, x, n, W, acc);
      else nk_tile_f32(p + c0 * w.s_n, w.s_n, w.K, x, n, W, acc);
      return;
    }
    case Kind::BF16: {
      const uint16_t* p = static_cast<const uint16_t*>(w.data) + e * w.s_e;
      if (w.n_unit) kn_tile_bf16(p + c0, w.s_k, w.K, x, n, W, acc);
      else nk_tile_bf16(p + c0 * w.s_n, w.s_n, w.K, x, n, W, acc);
      return;
    }
    case Kind::I8: {
      const int8_t* p = static_cast<const int8_t*>(w.data) + e * w.s_e + c0 * w.s_n;
      nk_tile_i8(p, w.s_n, w.scales + e * w.N + c0, w.K, x, n, W, acc);
      return;
    }
    case Kind::I4: {
      const uint8_t* p = static_cast<const uint8_t*>(w.data) + e * w.s_e + c0 * w.s_n;
      const int64_t off = (e * w.N + c0) * (w.K / w.group);
      nk_tile_i4(p, w.s_n, w.scales + off, w.zeros + off, w.group, w.K, x, xsum, n, W, acc);
      return;
    }
  }
}

// Per-group sums of each row of x, for the int4 zero points; empty otherwise.
std::vector<float> group_sums(const Weights& w, const float* const* x, int64_t n) {
  if (w.kind != Kind::I4 || w.a8 || CPU_ISA != Isa::Generic) return {};  // the rest need none
  const int64_t ng = w.K / w.group;
  std::vector<float> s(n * ng, 0.0f);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t g = 0; g < ng; ++g) {
      float v = 0.0f;
      for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k) v += x[r][k];
      s[r * ng + g] = v;
    }
  return s;
}

// ---- activations (epilogue: O(rows x F), the weights are O(F x D)) ------------

enum Act : int64_t { NONE = 0, SWIGLU = 1, GEGLU = 2, SWIGLU_OAI = 3, RELU2 = 4, GELU = 5 };

bool is_glu(int64_t act) { return act == SWIGLU || act == GEGLU || act == SWIGLU_OAI; }

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }
inline float gelu(float v) { return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f)); }

inline float activate(int64_t act, float g, float u, float limit, float alpha) {
  switch (act) {
    case SWIGLU: return g * sigmoid(g) * u;
    case GEGLU: return gelu(g) * u;
    case SWIGLU_OAI: {
      g = std::min(g, limit);
      u = std::max(-limit, std::min(u, limit));
      return g * sigmoid(alpha * g) * (u + 1.0f);
    }
    case RELU2: { const float r = std::max(g, 0.0f); return r * r; }
    case GELU: return gelu(g);
    default: return g;
  }
}

// The constants exp16 and exp8 share: clamp, log2(e), ln2 in two parts, the polynomial
// (highest degree first; then r^2 p + r + 1).
constexpr float EXP_LO = -104.0f, EXP_HI = 89.0f, EXP_LOG2E = 1.44269504088896341f;
constexpr float EXP_LN2_HI = 0.693359375f, EXP_LN2_LO = -2.12194440e-4f;
constexpr float EXP_POLY[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp(x) on 16 lanes: x = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts), Cephes' expf
// polynomial for e^r, then scalef by 2^n (overflow to inf, underflow to 0); NaN stays
// NaN. Against glibc's expf on every 7th float in [-110, 110] (a standalone sweep,
// 2026-12-05): at most 1 ulp apart, 3.5% of them by 1 ulp; exp8 below gives the same.
AVX512 inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(EXP_LO), _mm512_min_ps(_mm512_set1_ps(EXP_HI), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
  __m512 p = _mm512_set1_ps(EXP_POLY[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_POLY[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// dst[j] = activate(act, g[j] + bg[j], u[j] + bu[j]) for j < n (biases optional) and act
// SWIGLU or (OAI) SWIGLU_OAI, 16 at a time: the scalar formula's operations in its order
// (min / max as std::min / std::max, NaN included), exp16 for std::exp. A decode step's
// gate_up calls ran 16K of these one std::exp call each (fine-grained model, batch 1:
// ~4% of the step's CPU time).
template <bool OAI>
AVX512 void swiglu_avx512(const float* g, const float* u, const float* bg, const float* bu,
                          float* dst, int64_t n, float limit, float alpha) {
  const __m512 one = _mm512_set1_ps(1.0f), lim = _mm512_set1_ps(limit);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    __m512 gv = _mm512_maskz_loadu_ps(m, g + j), uv = _mm512_maskz_loadu_ps(m, u + j);
    if (bg) gv = _mm512_add_ps(gv, _mm512_maskz_loadu_ps(m, bg + j));
    if (bu) uv = _mm512_add_ps(uv, _mm512_maskz_loadu_ps(m, bu + j));
    __m512 v = gv;
    if constexpr (OAI) {
      gv = _mm512_min_ps(lim, gv);
      uv = _mm512_add_ps(_mm512_max_ps(_mm512_min_ps(lim, uv), _mm512_set1_ps(-limit)), one);
      v = _mm512_mul_ps(_mm512_set1_ps(alpha), gv);
    }
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), v));
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, e));
    _mm512_mask_storeu_ps(dst + j, m, _mm512_mul_ps(_mm512_mul_ps(gv, sig), uv));
  }
}

// The same on 8 lanes with AVX2 (no scalef): 2^n as two factors 2^a 2^(n - a), a = n / 2,
// each a normal float built in its exponent bits, so a result that overflows is inf
// and one in the subnormal range is rounded once.
AVX2 inline __m256 pow2_8(__m256i e) {  // 2^e, e in -126..127
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
}

AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(EXP_LO), _mm256_min_ps(_mm256_set1_ps(EXP_HI), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
  __m256 p = _mm256_set1_ps(EXP_POLY[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_POLY[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i a = _mm256_srai_epi32(ni, 1), b = _mm256_sub_epi32(ni, a);
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2_8(a)), pow2_8(b));
}

template <bool OAI>
AVX2 void swiglu_avx2(const float* g, const float* u, const float* bg, const float* bu,
                      float* dst, int64_t n, float limit, float alpha) {
  const __m256 one = _mm256_set1_ps(1.0f), lim = _mm256_set1_ps(limit);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 gv = _mm256_loadu_ps(g + j), uv = _mm256_loadu_ps(u + j);
    if (bg) gv = _mm256_add_ps(gv, _mm256_loadu_ps(bg + j));
    if (bu) uv = _mm256_add_ps(uv, _mm256_loadu_ps(bu + j));
    __m256 v = gv;
    if constexpr (OAI) {
      gv = _mm256_min_ps(lim, gv);
      uv = _mm256_add_ps(_mm256_max_ps(_mm256_min_ps(lim, uv), _mm256_set1_ps(-limit)), one);
      v = _mm256_mul_ps(_mm256_set1_ps(alpha), gv);
    }
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, e));
    _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_mul_ps(gv, sig), uv));
  }
  for (; j < n; ++j)
    dst[j] = activate(OAI ? SWIGLU_OAI : SWIGLU, g[j] + (bg ? bg[j] : 0.0f),
                      u[j] + (bu ? bu[j] : 0.0f), limit, alpha);
}

// swiglu_avx512 / swiglu_avx2 for act (SWIGLU or SWIGLU_OAI) on this CPU's ISA
void swiglu_rows(int64_t act, const float* g, const float* u, const float* bg, const float* bu,
                 float* dst, int64_t n, float limit, float alpha) {
  const bool oai = act == SWIGLU_OAI;
  if (CPU_ISA == Isa::Avx512) {
    if (oai) swiglu_avx512<true>(g, u, bg, bu, dst, n, limit, alpha);
    else swiglu_avx512<false>(g, u, bg, bu, dst, n, limit, alpha);
  } else if (oai) {
    swiglu_avx2<true>(g, u, bg, bu, dst, n, limit, alpha);
  } else {
    swiglu_avx2<false>(g, u, bg, bu, dst, n, limit, alpha);
  }
}

// ---- tasks ------------------------------------------------------------------------

struct Task { int64_t expert, c0, c1; };

// Tile width: about 4 tasks per thread over `units` tiles-worth of `cols` columns,
// a multiple of 16, between 16 and 256 (256 fp32 = 1 KiB per weight row read).
int64_t tile_width(int64_t cols, int64_t experts) {
  const int64_t want = 4 * std::max<int64_t>(1, at::get_num_threads());
  int64_t w = (cols * experts + want - 1) / want;
  w = (w + 15) / 16 * 16;
  return std::max<int64_t>(16, std::min<int64_t>({w, 256, cols}));
}

struct Rows {
  std::vector<int64_t> starts, ends;  // per touched expert
  std::vector<int64_t> experts;
  int64_t kept = 0;
};

template <typename I>
Rows touched_from(const I* o, int64_t n) {
  Rows rows;
  int64_t start = 0;
  for (int64_t e = 0; e < n; ++e) {
    const int64_t end = o[e];
    if (end > start) {
      rows.experts.push_back(e);
      rows.starts.push_back(start);
      rows.ends.push_back(end);
    }
    start = std::max(start, end);
  }
  rows.kept = start;
  return rows;
}

// t itself where it is already a contiguous `dtype` tensor: Tensor::to into the tensor's
// own dtype returns it too, but through the dispatcher, an aten op per call (4 of a
// patched transformers experts module's topk_experts call at batch 1)
torch::Tensor as_contiguous(const torch::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return t.to(dtype).contiguous();
}

// int32 offsets (route_sort's, the dense rows') are read as they are: a conversion to
// int64 was an aten op per kernel call, 17 per batch-1 step of the fine model.
Rows touched(const torch::Tensor& offsets_E) {
  if (offsets_E.scalar_type() == at::kInt && offsets_E.is_contiguous())
    return touched_from(offsets_E.data_ptr<int32_t>(), offsets_E.numel());
  auto off = offsets_E.to(at::kLong).contiguous();
  return touched_from(off.data_ptr<int64_t>(), off.numel());
}

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
}

void check_f32(const torch::Tensor& t, const char* name, int64_t dim) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim, name,
              " must be a contiguous float32 tensor with ", dim, " dimensions, got ",
              t.scalar_type(), " ", t.sizes(), " strides ", t.strides());
}

Weights weights(const torch::Tensor& data, const c10::optional<torch::Tensor>& scales,
                const c10::optional<torch::Tensor>& zeros, int64_t bits, int64_t group) {
  check_cpu(data, "w");
  TORCH_CHECK(data.dim() == 3, "w must have 3 dimensions, got ", data.sizes());
  Weights w{};
  w.data = data.data_ptr();
  w.E = data.size(0);
  if (bits == 0) {
    TORCH_CHECK(data.scalar_type() == at::kFloat || data.scalar_type() == at::kBFloat16,
                "plain w must be float32 or bfloat16, got ", data.scalar_type());
    w.kind = data.scalar_type() == at::kFloat ? Kind::F32 : Kind::BF16;
    w.K = data.size(1), w.N = data.size(2);
    w.s_e = data.stride(0), w.s_k = data.stride(1), w.s_n = data.stride(2);
    w.n_unit = w.s_n == 1 || w.N == 1;
    TORCH_CHECK(w.n_unit || w.s_k == 1, "w [E, K, N] needs unit stride along K or N, got "
                "strides ", data.strides());
    if (!w.n_unit) w.s_n = data.stride(2);
    return w;
  }
  TORCH_CHECK(data.is_contiguous(), "quantized w data must be contiguous");
  TORCH_CHECK(scales.has_value(), "quantized w needs scales");
  const auto& s = *scales;
  check_cpu(s, "scales");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous(), "scales must be contiguous "
              "float32");
  w.N = data.size(1);
  w.s_n = data.size(2), w.s_e = data.size(1) * data.size(2);
  w.scales = s.data_ptr<float>();
  if (bits == 8 || bits == 88) {
    w.a8 = bits == 88;
    TORCH_CHECK(data.scalar_type() == at::kChar, "int8 w must be int8, got ", data.scalar_type());
    w.kind = Kind::I8;
    w.K = data.size(2);
    TORCH_CHECK(s.numel() == w.E * w.N, "int8 scales must be [E, N] = [", w.E, ", ", w.N,
                "], got ", s.sizes());
    return w;
  }
  TORCH_CHECK(bits == 4 || bits == 48 || bits == 49, "bits must be 0 (plain), 8, 4, 88, 48 "
              "or 49 (int8 / int4 weights, int8 activations; 49: int4 in the 16-output "
              "order), got ", bits);
  w.a8 = bits == 48 || bits == 49;
  w.o16 = bits == 49;
  TORCH_CHECK(!w.o16 || w.N % 16 == 0, "int4 w in the 16-output order (bits=49) needs N a "
              "multiple of 16, got N=", w.N);
  TORCH_CHECK(data.scalar_type() == at::kByte, "int4 w must be uint8, got ", data.scalar_type());
  TORCH_CHECK(zeros.has_value(), "int4 w needs zeros");
  const auto& z = *zeros;
  check_cpu(z, "zeros");
  TORCH_CHECK(z.scalar_type() == at::kFloat && z.is_contiguous(), "zeros must be contiguous "
              "float32");
  w.kind = Kind::I4;
  w.K = 2 * data.size(2);
  w.group = group;
  TORCH_CHECK(group > 0 && group % 32 == 0 && w.K % group == 0, "group=", group,
              " must be a multiple of 32 dividing K=", w.K);
  const int64_t ng = w.E * w.N * (w.K / group);
  TORCH_CHECK(s.numel() == ng && z.numel() == ng, "int4 scales and zeros must be [E, N, K/g] = [",
              w.E, ", ", w.N, ", ", w.K / group, "], got ", s.sizes(), " and ", z.sizes());
  w.zeros = z.data_ptr<float>();
  return w;
}

const float* bias_row(const c10::optional<torch::Tensor>& b, int64_t e, int64_t width) {
  return b.has_value() ? b->data_ptr<float>() + e * width : nullptr;
}

void check_bias(const c10::optional<torch::Tensor>& b, const char* name, int64_t E, int64_t N) {
  if (!b.has_value()) return;
  check_f32(*b, name, 2);
  TORCH_CHECK(b->size(0) == E && b->size(1) == N, name, " must be [", E, ", ", N, "], got ",
              b->sizes());
}

}  // namespace

namespace {

// kn_part on the intrinsics path (xs already offset to k0).
template <Isa ISA>
void kn_part_isa(const Weights& w, int64_t e, const float* const* xs, int64_t n, int64_t k0,
                 int64_t k1, float* part) {
  const int64_t es = w.kind == Kind::F32 ? 4 : 2;
  const char* p = static_cast<const char*>(w.data) + (e * w.s_e + k0 * w.s_k) * es;
  if (w.kind == Kind::F32) kn_tile_vec<Kind::F32, ISA>(p, w.s_k, k1 - k0, xs, n, w.N, part);
  else kn_tile_vec<Kind::BF16, ISA>(p, w.s_k, k1 - k0, xs, n, w.N, part);
}

// KN layout, phase 1: rows [k0, k1) of expert e's weights (contiguous memory, all N
// columns) times the matching inputs of the expert's n rows, into part [n, N].
void kn_part(const Weights& w, int64_t e, const float* const* x, int64_t n, int64_t k0,
             int64_t k1, float* part) {
  std::vector<const float*> xs(n);
  for (int64_t r = 0; r < n; ++r) xs[r] = x[r] + k0;
  if (CPU_ISA == Isa::Avx512) {
    kn_part_isa<Isa::Avx512>(w, e, xs.data(), n, k0, k1, part);
  } else if (CPU_ISA == Isa::Avx2) {
    kn_part_isa<Isa::Avx2>(w, e, xs.data(), n, k0, k1, part);
  } else if (w.kind == Kind::F32) {
    const float* p = static_cast<const float*>(w.data) + e * w.s_e + k0 * w.s_k;
    kn_tile_f32(p, w.s_k, k1 - k0, xs.data(), n, w.N, part);
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(w.data) + e * w.s_e + k0 * w.s_k;
    kn_tile_bf16(p, w.s_k, k1 - k0, xs.data(), n, w.N, part);
  }
}

// Splits of K per expert for the KN layout: enough tasks for about 4 per thread,
// each at least 64 inputs deep.
int64_t k_chunks(int64_t K, int64_t experts) {
  const int64_t want = 4 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t c = (want + experts - 1) / std::max<int64_t>(1, experts);
  return std::max<int64_t>(1, std::min<int64_t>(c, K / 64));
}

// Expert weights as the kernels read them: one stacked [E, K, N] tensor (expert e is
// entry e of it) or a list of one-expert tensors (expert e is entry 0 of list[e]) of
// one dtype, shape and layout. of(e) gives the weights holding expert e, entry(e) its
// index there; front() the dtype, shape and layout every expert shares.
struct Stacked {
  Weights w;
  const Weights& front() const { return w; }
  const Weights& of(int64_t) const { return w; }
  int64_t entry(int64_t e) const { return e; }
  int64_t experts() const { return w.E; }
};

struct PerExpert {
  std::vector<Weights> list;
  const Weights& front() const { return list.front(); }
  const Weights& of(int64_t e) const { return list[e]; }
  int64_t entry(int64_t) const { return 0; }
  int64_t experts() const { return static_cast<int64_t>(list.size()); }
};

// The terms of R rows packed four rows to a B tile (int8 projections, amx_q8_pass): row
// r's term t in column 4 (r % 4) + t of its group's tile, so one tdpbssd multiplies 16
// outputs by up to four rows, every term, and 64 inputs. (A tile per term, R columns
// each, as int4's i8_terms lays them out, costs four tdpbssd per A tile whatever R.)
struct AmxTerms {
  int64_t R = 0, K = 0;
  std::vector<int8_t> b;  // group j (rows 4j..) at 16 K j: [K / 4][rows(j)][4 terms][4 inputs]
  std::vector<float> e2;  // each row's 2^e
  int64_t groups() const { return (R + 3) / 4; }
  int64_t rows(int64_t j) const { return std::min<int64_t>(4, R - 4 * j); }
  int64_t stride(int64_t j) const { return 16 * rows(j); }  // bytes per 4 inputs
  const int8_t* tile(int64_t j, int64_t k0) const {
    return b.data() + 16 * K * j + k0 / 4 * stride(j);
  }
};

AVX512 bool amx_terms_build(AmxTerms& t, const float* const* x, int64_t R, int64_t K,
                            bool nibbles);

// An int4 expert's rows on AMX-INT8 (a4_tile): their terms (the inputs of each 64 in the
// order of the unpacked nibbles) and sums over each weight group.
struct A4Rows {
  AmxTerms t;
  std::vector<float> zr;  // [R][G]: row q's sum over weight group gi / 2^e
};
std::atomic<bool> amx_on{true};     // set_amx (tests compare both paths)
std::atomic<int64_t> amx_calls{0};  // projections run on AMX (amx_runs: tests check it)
// Whether int4 weight-only experts of up to `rows` rows each run on AMX-INT8 (a4_tile);
// a4_build: r = the R rows x[r] (false where a4_tile cannot take them: a value not
// finite, a row below 2^-100)
bool a4_applies(const Weights& w, int64_t rows);
bool a4_build(A4Rows& r, const float* const* x, int64_t R, int64_t K, int64_t g);
void a4_tile(const Weights& w, int64_t e, const A4Rows& r, int64_t c0, int64_t W, float* acc);
// Whether int8 weight-only experts of up to `rows` rows each run on AMX-INT8 (q8_tile:
// each expert's rows' terms, AmxTerms, by amx_q8_outputs); experts of one row stay on
// the terms' VNNI kernel (i8t_tile), or the FMA kernel where that is off.
bool q8_applies(const Weights& w, int64_t rows);
void q8_tile(const Weights& w, int64_t e, const AmxTerms& t, int64_t c0, int64_t W, float* acc);

// The routed rows of the touched experts and, for the KN layout, their phase-1
// partial sums: part(i, c) is [rows of expert i, N] for K chunk c. The K chunks are
// planned for `plan_experts` experts where that is > 0, else for the touched ones.
struct Plan {
  Rows rows;
  std::vector<std::vector<const float*>> x;  // per touched expert, its input rows
  int64_t chunks = 0, K = 0, N = 0;
  std::vector<int64_t> part_off;  // per touched expert, its offset into parts
  std::vector<float> parts;
  std::vector<float> permuted;  // int8 on AVX2: each distinct input row, permute_x32'd
  std::vector<float> records;   // int8 activations, int4 blocks: each distinct row's record
  bool f4 = false;              // int4 blocks (i4f_tile): x's rows are f4_records
  bool t8rec = false;           // int8 on terms (i8t_tile): x's rows are t8_records
  std::vector<bool> t8x;        // (there, per touched expert: whether its rows are)
  std::vector<A4Rows> a4;       // int4 on AMX-INT8 (a4_tile): each touched expert's rows
  std::vector<AmxTerms> q8;     // int8 on AMX-INT8 (q8_tile): each touched expert's terms

  Plan(const Rows& r, const Weights& w, const float* x0, int64_t ldx, const int64_t* token,
       int64_t plan_experts)
      : rows(r), K(w.K), N(w.N) {
    const size_t m = rows.experts.size();
    x.resize(m);
    for (size_t i = 0; i < m; ++i)
      for (int64_t s = rows.starts[i]; s < rows.ends[i]; ++s)
        x[i].push_back(x0 + (token ? token[s] : s) * ldx);
    if (w.kind == Kind::I8 && !w.a8 && CPU_ISA == Isa::Avx2) permute_rows();
    if (w.a8 && w.kind == Kind::I8) {
      const Q8Layout L(w.K);
      quantize_rows(L.bytes, [&](const float* row, char* rec) { quantize_q8(row, L, rec); });
    } else if (w.a8) {
      const A8Layout L(w.K, w.group);
      quantize_rows(L.bytes, [&](const float* row, char* rec) { quantize_a8(row, L, rec); });
    } else if (a4_applies(w, max_rows()) && build_a4(w)) {
      // (x's rows stay as they are: a4 holds their terms)
    } else if ((f4 = i4f(w, max_rows()))) {
      const F4Layout L(w.K, w.group);
      quantize_rows(L.bytes, [&](const float* row, char* rec) { f4_record(row, L, rec); });
    } else if (q8_applies(w, max_rows()) && build_q8() && (q8_all() || !t8(w, 1))) {
      // (experts of one row, if any: t8's records below, else the FMA kernel)
    } else if (t8(w, 1)) {
      // the experts of up to t8_rows rows (with AMX: those of one row; the others run q8)
      const int64_t most = q8.empty() ? t8_rows.load(std::memory_order_relaxed) : 1;
      t8x.resize(m);
      for (size_t i = 0; i < m; ++i) t8x[i] = n(i) <= most;
      // their distinct rows' 2^e first: a row that is not finite (or below 2^-100) keeps
      // the whole call on the FMA kernel
      const auto distinct = distinct_rows(t8x);
      std::vector<float> e2(distinct.size());
      bool ok = !distinct.empty();
      for (size_t i = 0; i < distinct.size() && ok; ++i)
        ok = (e2[i] = terms_scale(distinct[i], K)) != 0.0f;
      if (ok) {
        const T8Layout L(w.K);
        quantize_rows(L.bytes, [&](const float* row, char* rec) {  // (distinct is sorted)
          const auto at = std::lower_bound(distinct.begin(), distinct.end(), row);
          t8_record(row, L, e2[at - distinct.begin()], rec);
        }, t8x);
        t8rec = true;
        t8_calls.fetch_add(1, std::memory_order_relaxed);
      }
    }
    if (!w.n_unit) return;
    chunks = k_chunks(w.K, plan_experts > 0 ? plan_experts : static_cast<int64_t>(m));
    int64_t off = 0;
    for (size_t i = 0; i < m; ++i) {
      part_off.push_back(off);
      off += chunks * static_cast<int64_t>(x[i].size()) * w.N;
    }
    parts.resize(off);
  }
  // v[i] = build(v[i], i) for every touched expert i, in parallel (an AMX call counted), or
  // v left empty (false) where one fails
  template <typename T, typename Build>
  bool build_amx(std::vector<T>& v, const Build& build) {
    v.resize(x.size());
    std::atomic<bool> ok{true};
    at::parallel_for(0, static_cast<int64_t>(x.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1 && ok; ++i)
        if (!build(v[i], i)) ok = false;
    });
    if (!ok) v.clear();
    else amx_calls.fetch_add(1, std::memory_order_relaxed);
    return ok;
  }
  // a4 built for every touched expert
  bool build_a4(const Weights& w) {
    return build_amx(a4, [&](A4Rows& r, int64_t i) {
      return a4_build(r, x[i].data(), n(i), K, w.group);
    });
  }
  // q8 built for the touched experts of 2 rows or more (the others' left with R = 0)
  bool build_q8() {
    return build_amx(q8, [&](AmxTerms& t, int64_t i) {
      return n(i) < 2 || amx_terms_build(t, x[i].data(), n(i), K, false);
    });
  }
  bool q8_all() const {
    return std::all_of(q8.begin(), q8.end(), [](const AmxTerms& t) { return t.R > 0; });
  }
  // x's rows replaced by permuted copies, one per distinct row (a token routed to
  // k experts is permuted once): O(rows x K) against the O(experts x N x K) weights.
  void permute_rows() {
    const auto distinct = distinct_rows();
    permuted.resize(distinct.size() * K);
    for (size_t i = 0; i < distinct.size(); ++i) permute_x32(distinct[i], K, &permuted[i * K]);
    repoint(distinct, permuted.data(), K);
  }
  // x's rows replaced by their records (quantize_a8 / quantize_q8 / f4_record: `bytes`,
  // a multiple of 64), one per distinct row; the pointers stay const float* on their
  // way to i4a8_tile / i8a8_tile / i4f_tile.
  // (only: the experts i with only[i], where given; the others keep their rows)
  template <typename Q>
  void quantize_rows(int64_t bytes, const Q& quantize, const std::vector<bool>& only = {}) {
    const auto distinct = distinct_rows(only);
    const int64_t fl = bytes / 4;  // floats per record (a multiple of 16: 64-byte aligned)
    records.resize(distinct.size() * fl + 16);
    float* first = records.data();
    first += (16 - (reinterpret_cast<uintptr_t>(first) / 4) % 16) % 16;
    // prefill's hundreds of rows in parallel (a row: ~0.5-1 us)
    at::parallel_for(0, static_cast<int64_t>(distinct.size()), 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        quantize(distinct[i], reinterpret_cast<char*>(first + i * fl));
    });
    repoint(distinct, first, fl, only);
  }
  // the distinct rows of the experts i with only[i] (every expert where only is empty)
  std::vector<const float*> distinct_rows(const std::vector<bool>& only = {}) const {
    std::vector<const float*> distinct;
    for (size_t i = 0; i < x.size(); ++i)
      if (only.empty() || only[i]) distinct.insert(distinct.end(), x[i].begin(), x[i].end());
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    return distinct;
  }
  // every row pointer to its distinct row's copy: base + (its index) * stride
  void repoint(const std::vector<const float*>& distinct, const float* base, int64_t stride,
               const std::vector<bool>& only = {}) {
    for (size_t i = 0; i < x.size(); ++i)
      for (const float*& row : x[i]) {
        if (!only.empty() && !only[i]) continue;
        const auto at = std::lower_bound(distinct.begin(), distinct.end(), row) - distinct.begin();
        row = base + at * stride;
      }
  }
  int64_t n(size_t i) const { return static_cast<int64_t>(x[i].size()); }
  int64_t max_rows() const {
    int64_t m = 0;
    for (size_t i = 0; i < x.size(); ++i) m = std::max(m, n(i));
    return m;
  }
  float* part(size_t i, int64_t c) { return parts.data() + part_off[i] + c * n(i) * N; }
  std::vector<Task> phase1() const {
    std::vector<Task> t;
    for (size_t i = 0; i < x.size(); ++i)
      for (int64_t c = 0; c < chunks; ++c) t.push_back({int64_t(i), c, c + 1});
    return t;
  }
  template <typename Ws>
  void run_phase1(const Ws& ws, const Task& t) {
    const int64_t k0 = K * t.c0 / chunks, k1 = K * t.c1 / chunks;
    const int64_t e = rows.experts[t.expert];
    kn_part(ws.of(e), ws.entry(e), x[t.expert].data(), n(t.expert), k0, k1,
            part(t.expert, t.c0));
  }
  // acc [n, W] = columns c0.. of expert i: the sum of its partials (KN) or a tile (NK)
  template <typename Ws>
  void columns(const Ws& ws, size_t i, const float* xsum, int64_t c0, int64_t W,
               float* acc) {
    const int64_t rows_i = n(i), e = rows.experts[i];
    if (!a4.empty()) return a4_tile(ws.of(e), ws.entry(e), a4[i], c0, W, acc);
    if (!q8.empty() && q8[i].R) return q8_tile(ws.of(e), ws.entry(e), q8[i], c0, W, acc);
    if (!ws.of(e).n_unit) {
      tile(ws.of(e), ws.entry(e), x[i].data(), xsum, rows_i, c0, W, acc, f4,
           t8rec && t8x[i]);
      return;
    }
    std::fill(acc, acc + rows_i * W, 0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* p = part(i, c);
      for (int64_t r = 0; r < rows_i; ++r)
        for (int64_t j = 0; j < W; ++j) acc[r * W + j] += p[r * N + c0 + j];
    }
  }
};

// Phase 1 tasks, a barrier, phase 2 tasks: one OpenMP region, each thread taking
// the next task of a phase when it finishes one.
template <typename F1, typename F2>
void run_phases(const std::vector<Task>& t1, const F1& b1, const std::vector<Task>& t2,
                const F2& b2) {
  const int64_t n1 = static_cast<int64_t>(t1.size()), n2 = static_cast<int64_t>(t2.size());
  const int64_t threads = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), std::max(n1, n2)));
  std::atomic<int64_t> next1{0}, next2{0};
#pragma omp parallel num_threads(threads)
  {
    for (int64_t i = next1++; i < n1; i = next1++) b1(t1[i]);
#pragma omp barrier
    for (int64_t i = next2++; i < n2; i = next2++) b2(t2[i]);
  }
}

void check_tokens(const int64_t* token, int64_t rows, int64_t T) {
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(token[r] >= 0 && token[r] < T, "token_S[", r, "]=", token[r], " out of range");
}

// gate_up on either kind of weights, after the entry checked x_TD and built `ws`.
template <typename Ws>
torch::Tensor gate_up_rows(const torch::Tensor& x_TD, const torch::Tensor& token_S,
                           const torch::Tensor& offsets_E, const Ws& ws,
                           const c10::optional<torch::Tensor>& b_in, int64_t act, double limit,
                           double alpha, int64_t plan_experts) {
  const Weights& w = ws.front();
  TORCH_CHECK(w.K == x_TD.size(1), "w_in input width ", w.K, " != x_TD width ", x_TD.size(1));
  TORCH_CHECK(offsets_E.numel() == ws.experts(), "offsets_E has ", offsets_E.numel(),
              " entries for ", ws.experts(), " experts");
  TORCH_CHECK(act >= NONE && act <= GELU, "act=", act, " must be 0..5");
  TORCH_CHECK(!is_glu(act) || w.N % 2 == 0, "GLU activations need an even output width");
  check_bias(b_in, "b_in", ws.experts(), w.N);
  const Rows rows = touched(offsets_E);
  auto tok = as_contiguous(token_S, at::kLong);
  TORCH_CHECK(tok.numel() >= rows.kept, "token_S has fewer rows than offsets_E says");
  check_tokens(tok.data_ptr<int64_t>(), rows.kept, x_TD.size(0));
  Plan plan(rows, w, x_TD.data_ptr<float>(), x_TD.size(1), tok.data_ptr<int64_t>(),
            plan_experts);
  const int64_t out_w = is_glu(act) ? w.N / 2 : w.N;
  auto out = torch::empty({rows.kept, out_w}, x_TD.options());
  float* o = out.data_ptr<float>();
  const int64_t W = tile_width(out_w, static_cast<int64_t>(rows.experts.size()));
  std::vector<Task> tasks;
  for (size_t i = 0; i < rows.experts.size(); ++i)
    for (int64_t c = 0; c < out_w; c += W) tasks.push_back({int64_t(i), c, std::min(out_w, c + W)});
  const float lim = static_cast<float>(limit), al = static_cast<float>(alpha);
  auto epilogue = [&](const Task& t) {
    const int64_t e = rows.experts[t.expert], s0 = rows.starts[t.expert];
    const int64_t n = plan.n(t.expert), cw = t.c1 - t.c0;
    const std::vector<float> xsum = group_sums(ws.of(e), plan.x[t.expert].data(), n);
    std::vector<float> g(n * cw), u;
    plan.columns(ws, t.expert, xsum.data(), t.c0, cw, g.data());
    const float* bg = bias_row(b_in, e, w.N);
    const float* bu = bg ? bg + out_w : nullptr;
    if (is_glu(act)) {
      u.resize(n * cw);
      plan.columns(ws, t.expert, xsum.data(), out_w + t.c0, cw, u.data());
    }
    for (int64_t r = 0; r < n; ++r) {
      float* dst = o + (s0 + r) * out_w + t.c0;
      if ((act == SWIGLU || act == SWIGLU_OAI) && CPU_ISA != Isa::Generic) {
        swiglu_rows(act, &g[r * cw], &u[r * cw], bg ? bg + t.c0 : nullptr,
                    bu ? bu + t.c0 : nullptr, dst, cw, lim, al);
        continue;
      }
      for (int64_t j = 0; j < cw; ++j) {
        const float gv = g[r * cw + j] + (bg ? bg[t.c0 + j] : 0.0f);
        const float uv = is_glu(act) ? u[r * cw + j] + (bu ? bu[t.c0 + j] : 0.0f) : 0.0f;
        dst[j] = activate(act, gv, uv, lim, al);
      }
    }
  };
  run_phases(plan.phase1(), [&](const Task& t) { plan.run_phase1(ws, t); }, tasks, epilogue);
  return out;
}

// down_combine of NK weights runs expert tiles, then the combine, up to this many rows
// (y's [rows, D] floats stay in L2); above, column tiles over every expert (prefill).
constexpr int64_t DOWN_BY_EXPERT_ROWS = 256;

// down_combine on either kind of weights, after the entry checked a_SF, weight_S and
// out_TD and built `ws`; `accumulate` adds into out_TD instead of overwriting it.
template <typename Ws>
void down_combine_rows(const torch::Tensor& a_SF, const torch::Tensor& token_S,
                       const torch::Tensor& weight_S, const torch::Tensor& offsets_E,
                       const Ws& ws, const c10::optional<torch::Tensor>& b_out,
                       torch::Tensor& out_TD, bool accumulate, int64_t plan_experts) {
  const Weights& w = ws.front();
  TORCH_CHECK(w.K == a_SF.size(1), "w_out input width ", w.K, " != a_SF width ", a_SF.size(1));
  TORCH_CHECK(w.N == out_TD.size(1), "w_out output width ", w.N, " != out_TD width ",
              out_TD.size(1));
  TORCH_CHECK(offsets_E.numel() == ws.experts(), "offsets_E has ", offsets_E.numel(),
              " entries for ", ws.experts(), " experts");
  check_bias(b_out, "b_out", ws.experts(), w.N);
  const Rows rows = touched(offsets_E);
  TORCH_CHECK(a_SF.size(0) >= rows.kept && weight_S.numel() >= rows.kept,
              "a_SF / weight_S have fewer rows than offsets_E says");
  auto tok = as_contiguous(token_S, at::kLong);
  const int64_t* token = tok.data_ptr<int64_t>();
  const int64_t T = out_TD.size(0), D = w.N;
  check_tokens(token, rows.kept, T);
  Plan plan(rows, w, a_SF.data_ptr<float>(), a_SF.size(1), nullptr, plan_experts);
  const float* wts = weight_S.data_ptr<float>();
  float* o = out_TD.data_ptr<float>();
  const int64_t W = tile_width(D, 1);
  std::vector<Task> tasks;
  for (int64_t c = 0; c < D; c += W) tasks.push_back({0, c, std::min(D, c + W)});
  if (!w.n_unit && rows.kept <= DOWN_BY_EXPERT_ROWS) {
    // NK weights, few rows: phase 1 runs (expert, tile) tasks, each one contiguous slab of
    // one expert's weight rows, into y [kept rows, D]; phase 2 combines y by column tiles,
    // in expert order as below. (A column tile over every expert read a short slab of each
    // in turn: 8 streams of 32 KB a task at batch 1, int4, K = 512. One int4 g64 layer,
    // D=1024 F=512, 12 weight sets cycled, 2 threads, 15 interleaved rounds in one process,
    // this Xeon: 0.99x / 0.97x / 0.95x the time at 1 / 4 / 16 tokens; the same bits.)
    std::vector<float> y(rows.kept * D);
    const int64_t W1 = tile_width(D, static_cast<int64_t>(rows.experts.size()));
    std::vector<Task> t1;
    for (size_t i = 0; i < rows.experts.size(); ++i)
      for (int64_t c = 0; c < D; c += W1) t1.push_back({int64_t(i), c, std::min(D, c + W1)});
    auto expert_tile = [&](const Task& t) {
      const int64_t e = rows.experts[t.expert], s0 = rows.starts[t.expert];
      const int64_t n = plan.n(t.expert), cw = t.c1 - t.c0;
      const std::vector<float> xsum = group_sums(ws.of(e), plan.x[t.expert].data(), n);
      std::vector<float> acc(n * cw);
      plan.columns(ws, t.expert, xsum.data(), t.c0, cw, acc.data());
      for (int64_t r = 0; r < n; ++r)
        std::copy(&acc[r * cw], &acc[r * cw] + cw, &y[(s0 + r) * D + t.c0]);
    };
    auto combine_y = [&](const Task& t) {
      if (!accumulate)
        for (int64_t tt = 0; tt < T; ++tt) std::fill(o + tt * D + t.c0, o + tt * D + t.c1, 0.0f);
      for (size_t i = 0; i < rows.experts.size(); ++i) {
        const float* b = bias_row(b_out, rows.experts[i], D);
        for (int64_t s = rows.starts[i]; s < rows.ends[i]; ++s) {
          float* dst = o + token[s] * D;
          const float* src = &y[s * D];
          const float wr = wts[s];
          for (int64_t j = t.c0; j < t.c1; ++j) dst[j] += wr * (src[j] + (b ? b[j] : 0.0f));
        }
      }
    };
    run_phases(t1, expert_tile, tasks, combine_y);
    return;
  }
  auto combine = [&](const Task& t) {
    const int64_t cw = t.c1 - t.c0;
    if (!accumulate)
      for (int64_t tt = 0; tt < T; ++tt) std::fill(o + tt * D + t.c0, o + tt * D + t.c1, 0.0f);
    std::vector<float> acc;
    for (size_t i = 0; i < rows.experts.size(); ++i) {
      const int64_t e = rows.experts[i], s0 = rows.starts[i], n = plan.n(i);
      const std::vector<float> xsum = group_sums(ws.of(e), plan.x[i].data(), n);
      acc.resize(n * cw);
      plan.columns(ws, i, xsum.data(), t.c0, cw, acc.data());
      const float* b = bias_row(b_out, e, D);
      for (int64_t r = 0; r < n; ++r) {
        float* dst = o + token[s0 + r] * D + t.c0;
        const float wr = wts[s0 + r];
        for (int64_t j = 0; j < cw; ++j) dst[j] += wr * (acc[r * cw + j] + (b ? b[t.c0 + j] : 0.0f));
      }
    }
  };
  run_phases(plan.phase1(), [&](const Task& t) { plan.run_phase1(ws, t); }, tasks, combine);
}

// t = the terms of the R rows x[r] (K inputs each, a multiple of 16; of 64 with
// `nibbles`); false where a value is not finite or a row is below 2^-100 (terms_scale).
// With `nibbles` the inputs of each 64 lie in the order an int4 A tile holds its
// unpacked nibbles (a4_rows): 0-15, 32-47, 16-31, 48-63.
AVX512 bool amx_terms_build(AmxTerms& t, const float* const* x, int64_t R, int64_t K,
                            bool nibbles) {
  t.R = R, t.K = K;
  t.b.resize(4 * K * R + 64);  // (+64: a B tile's row loads read 64 bytes, past the last rows)
  t.e2.resize(R);
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x[r];
    if (!(t.e2[r] = terms_scale(xr, K))) return false;
    const __m512 down = _mm512_set1_ps(1.0f / t.e2[r]);  // (exact: a power of two)
    const int64_t s = t.stride(r / 4);
    int8_t* row = t.b.data() + 16 * K * (r / 4) + 16 * (r % 4);
    for (int64_t k = 0; k < K; k += 16) {
      __m128i q[4];
      split_terms(_mm512_mul_ps(_mm512_loadu_ps(xr + k), down), q);
      // 4 x 4 transpose of 4-byte words: word j of every term -> the 16 bytes of inputs
      // k + 4j.. (terms 0-3 in order)
      const __m128i a = _mm_unpacklo_epi32(q[0], q[1]), b = _mm_unpacklo_epi32(q[2], q[3]);
      const __m128i c = _mm_unpackhi_epi32(q[0], q[1]), d = _mm_unpackhi_epi32(q[2], q[3]);
      const int64_t quarter = (k >> 4) & 3;  // (nibbles: quarters 1 and 2 swap places)
      int8_t* at = row + (nibbles && (quarter == 1 || quarter == 2) ? k ^ 48 : k) / 4 * s;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(at), _mm_unpacklo_epi64(a, b));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(at + s), _mm_unpackhi_epi64(a, b));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(at + 2 * s), _mm_unpacklo_epi64(c, d));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(at + 3 * s), _mm_unpackhi_epi64(c, d));
    }
  }
  return true;
}

// ---- bf16 projections on AMX tiles (NK layout: unit stride along K)
//
// y[R, N] = x[R, K] @ w for a bf16 weight whose output rows are contiguous along K (an
// nn.Linear weight: attention projections, dense FFNs, the LM head), on CPUs with AMX-BF16
// (Sapphire Rapids and later). Such a weight is an AMX A operand as it lies: a tile of 16
// output rows x 32 inputs is one strided tile load, nothing repacked. The rows of x go in
// the B tile as (k, k + 1) pairs ([K / 2][R][2], built once per call), so one tdpbf16ps
// multiplies 16 outputs x R rows x 32 inputs; four C tiles hold 64 outputs. The products
// are exact in fp32 and summed in fp32 (in another order than the FMA kernels: results
// agree to fp32 rounding; AMX reads bf16 subnormals as zero). It runs only where every x
// value is a bf16 (a bf16 model's activations, widened to fp32 for these kernels), so
// nothing is rounded that the FMA kernels would not round.
//
// Why: the FMA kernels widen each bf16 weight and spend an FMA per row on it, so at 8-16
// rows they are bound by instructions, not bytes. One [1024 -> 3072] / [1024 -> 1024]
// projection, cold weights in huge pages, 2 threads, this Xeon (a /tmp script; medians of
// 5), FMA kernel / aten (oneDNN) / AMX in us: 1 row 271 / 386 / 243 and 108 / 156 / 86;
// 8 rows 389 / 421 / 271 and 146 / 165 / 98; 16 rows 646 / 424 / 277 and 245 / 161 / 108.
#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define MOEKIT_AMX 1
#define AMX_FN __attribute__((target("avx512f,avx512bw,amx-tile,amx-bf16")))
// GCC's tile intrinsics are asm statements that declare no memory access: the barrier keeps
// the C tiles' stores before the loads that read them, and the config before ldtilecfg.
#define TILE_BARRIER() asm volatile("" : : : "memory")

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The CPU has AMX tiles (CPUID 7.0 EDX bit 24) and `kind` (bit 22 AMX-BF16, 25 AMX-INT8),
// and Linux lets this process use the tiles (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA;
// torch's oneDNN asks the same).
bool amx_cpu(int kind) {
  if (CPU_ISA != Isa::Avx512) return false;  // (MOEKIT_CPU_ISA caps it too)
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  if (!((d >> kind) & 1) || !((d >> 24) & 1)) return false;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}
bool amx_here() {
  static const bool ok = amx_cpu(22);
  return ok;
}
bool amx_int8_here() {
  static const bool ok = amx_cpu(25);
  return ok;
}

// The tiles of both kinds of projection: C tiles 0-3, 16 outputs x R rows (fp32 sums for
// bf16, int32 for int8); A tiles 4, 5, 16 outputs x 64 bytes (32 bf16 or 64 int8 inputs);
// B tiles 6, 7, 16 input pairs (bf16) or quads (int8) x R rows. (Only tile instructions:
// the int8 path calls it too.)
AMX_FN void amx_configure(int64_t R) {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i)
    cfg.rows[i] = 16, cfg.colsb[i] = static_cast<uint16_t>(i == 4 || i == 5 ? 64 : R * 4);
  TILE_BARRIER();
  _tile_loadconfig(&cfg);
}

AMX_FN void amx_release() { _tile_release(); }

// 16 * NC outputs from w (the block's first output row, rows ld elements apart) into
// c [16 NC][R]
template <int NC>
AMX_FN void amx_nk_block(const uint16_t* w, int64_t ld, int64_t K, const uint16_t* xv,
                         int64_t R, float* c) {
  _tile_zero(0);
  if constexpr (NC > 1) _tile_zero(1);
  if constexpr (NC > 2) _tile_zero(2);
  if constexpr (NC > 3) _tile_zero(3);
  const int64_t stride = ld * 2;
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    _tile_loadd(6, xv + k0 * R, R * 4);
    _tile_loadd(4, w + k0, stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NC > 1) {
      _tile_loadd(5, w + 16 * ld + k0, stride);
      _tile_dpbf16ps(1, 5, 6);
    }
    if constexpr (NC > 2) {
      _tile_loadd(4, w + 32 * ld + k0, stride);
      _tile_dpbf16ps(2, 4, 6);
    }
    if constexpr (NC > 3) {
      _tile_loadd(5, w + 48 * ld + k0, stride);
      _tile_dpbf16ps(3, 5, 6);
    }
  }
  _tile_stored(0, c, R * 4);
  if constexpr (NC > 1) _tile_stored(1, c + 16 * R, R * 4);
  if constexpr (NC > 2) _tile_stored(2, c + 32 * R, R * 4);
  if constexpr (NC > 3) _tile_stored(3, c + 48 * R, R * 4);
  TILE_BARRIER();
}

// ---- int8 and int4 projections on AMX-INT8 (weight-only: NK; int8 with a scale per output
// row, int4 below, amx_i4_rows)
//
// y[R, N] = x[R, K] @ (q * s)^T for fp32 rows x, split into four int8 terms each (above,
// terms_scale / split_terms). The int8 weight rows are a tdpbssd A operand as they lie (16
// outputs x 64 inputs, one strided tile load); the terms of four rows are one B tile
// (AmxTerms), so a tdpbssd gives exact int32 sums of 16 outputs x 4 rows x 4 terms. They
// are recombined in fp32: y = (((C3 / 128 + C2) / 128 + C1) / 128 + C0) * 2^e * s. The
// result is within fp32's rounding of the exact product, as the FMA kernel's is, but not
// bitwise the same. int4 (amx_i4_group) keeps a B tile per term: its C tiles are scaled
// per group, and a term per tile scales 16 rows per pass over a C tile.
//
// Why: the FMA kernel spends a convert per weight and an FMA per weight and row, bound by
// those instructions from a few rows on (a batch-16 int8 step's attention projections:
// 2.9 ms for 16 MiB, 0.56 ms of bytes at 30 GB/s, `bench_decode.py --step-calls`).
#define AMX_I8_FN __attribute__((target("avx512f,avx512bw,amx-tile,amx-int8")))
// int4: each A tile's 16 rows are prefetched 256 bytes (4 tile steps) ahead: a cold [1024
// -> 3072] projection at one row 278 -> 211 us (2 threads); 128 bytes the same, 512 and
// 1,024 slower (/tmp timings, this Xeon). int8's passes read up to 64 rows at a time and
// prefetch the next pass's rows into L2 instead, in address order (amx_q8_pass): the same
// per-row prefetch measured as fast to 17% slower at 8-16 rows.
constexpr int64_t AMX_I8_PF = 256;

// The four terms' C tiles (0-3, amx_configure's) zeroed; one A tile (4) against each term's
// B tile (6, 7 in turn; term i's rows at b + i * tb) into them, with the A values signed
// (tdpbssd) or unsigned (tdpbusd); the C tiles stored into c [4][16][R].
AMX_I8_FN inline void amx_terms_zero() {
  TILE_BARRIER();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

template <bool UNSIGNED_A>
AMX_I8_FN inline void amx_terms_dp(const int8_t* b, int64_t tb, int64_t R) {
  _tile_loadd(6, b, R * 4);
  if constexpr (UNSIGNED_A) _tile_dpbusd(0, 4, 6); else _tile_dpbssd(0, 4, 6);
  _tile_loadd(7, b + tb, R * 4);
  if constexpr (UNSIGNED_A) _tile_dpbusd(1, 4, 7); else _tile_dpbssd(1, 4, 7);
  _tile_loadd(6, b + 2 * tb, R * 4);
  if constexpr (UNSIGNED_A) _tile_dpbusd(2, 4, 6); else _tile_dpbssd(2, 4, 6);
  _tile_loadd(7, b + 3 * tb, R * 4);
  if constexpr (UNSIGNED_A) _tile_dpbusd(3, 4, 7); else _tile_dpbssd(3, 4, 7);
}

AMX_I8_FN inline void amx_terms_store(int32_t* c, int64_t R) {
  _tile_stored(0, c, R * 4);
  _tile_stored(1, c + 16 * R, R * 4);
  _tile_stored(2, c + 32 * R, R * 4);
  _tile_stored(3, c + 48 * R, R * 4);
  TILE_BARRIER();
}

// The int32 sums of 16 NA outputs of w (from its first row, rows ld bytes apart) by the
// terms' groups j0 .. j0 + NB (AmxTerms: NB B tiles), over K inputs, into c [NA NB][16][16]
// (C tile a NB + j: outputs 16 a.., group j0 + j). NA NB <= 4 C tiles, NB <= 2; tiles configured
// with 64-byte rows (amx_configure(16)): a group of fewer than 4 rows loads the next
// rows' bytes into its spare columns, whose sums nothing reads.
template <int NA, int NB>
AMX_I8_FN void amx_q8_pass(const int8_t* w, int64_t ld, int64_t K, const AmxTerms& t,
                           int64_t j0, const int8_t* next, int32_t* c) {
  static_assert(NA * NB <= 4 && NB <= 2, "four C tiles, two A and two B");
  TILE_BARRIER();
  _tile_zero(0);
  if constexpr (NA * NB > 1) _tile_zero(1);
  if constexpr (NA * NB > 2) _tile_zero(2);
  if constexpr (NA * NB > 3) _tile_zero(3);
  const int64_t s0 = t.stride(j0), s1 = NB > 1 ? t.stride(j0 + 1) : 0;
  int64_t pf_row = 0, pf_col = 0;  // the next pass's prefetch: its row, byte in the row
  for (int64_t k0 = 0; k0 < K; k0 += 64) {
    const int8_t* wk = w + k0;
    // the next pass's rows into L2, 16 NA lines per step in address order (the line's row
    // and column by a division, first, cost more than the tiles' sums)
    if (next)
      for (int i = 0; i < 16 * NA; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(next + pf_row * ld + pf_col), _MM_HINT_T1);
        if ((pf_col += 64) == K) pf_col = 0, ++pf_row;
      }
    if constexpr (NB == 1) {  // one B tile, up to four A tiles in turn
      _tile_loadd(6, t.tile(j0, k0), s0);
      _tile_loadd(4, wk, ld);
      _tile_dpbssd(0, 4, 6);
      if constexpr (NA > 1) {
        _tile_loadd(5, wk + 16 * ld, ld);
        _tile_dpbssd(1, 5, 6);
      }
      if constexpr (NA > 2) {
        _tile_loadd(4, wk + 32 * ld, ld);
        _tile_dpbssd(2, 4, 6);
      }
      if constexpr (NA > 3) {
        _tile_loadd(5, wk + 48 * ld, ld);
        _tile_dpbssd(3, 5, 6);
      }
    } else {  // two B tiles, up to two A tiles
      _tile_loadd(6, t.tile(j0, k0), s0);
      _tile_loadd(7, t.tile(j0 + 1, k0), s1);
      _tile_loadd(4, wk, ld);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      if constexpr (NA > 1) {
        _tile_loadd(5, wk + 16 * ld, ld);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
    }
  }
  _tile_stored(0, c, 64);
  if constexpr (NA * NB > 1) _tile_stored(1, c + 256, 64);
  if constexpr (NA * NB > 2) _tile_stored(2, c + 512, 64);
  if constexpr (NA * NB > 3) _tile_stored(3, c + 768, 64);
  TILE_BARRIER();
}

// int4 weights (q in 0..15, w = s * q + z per group of g inputs, g a multiple of 64): the
// nibbles of 16 output rows x 64 inputs unpacked into u (int8, [16][64]) for a tdpbusd A
// tile (unsigned), four terms as for int8; C tiles zeroed at each group's start, stored
// at its end into c [4][16][R] for the caller to scale by the group's s.
AMX_I8_FN void amx_i4_group(const uint8_t* w, int64_t ld, int64_t k0, int64_t g,
                            const int8_t* xt, int64_t tb, int64_t R, int8_t* u, int32_t* c) {
  amx_terms_zero();
  const __m256i m15 = _mm256_set1_epi8(15);
  for (int64_t k = k0; k < k0 + g; k += 64) {
    for (int m = 0; m < 16; ++m) {  // 32 bytes: inputs k..k+15 and k+16..k+31 in the
      const uint8_t* p = w + m * ld + k / 2;  // first 16, k+32.. in the second
      _mm_prefetch(reinterpret_cast<const char*>(
                       reinterpret_cast<uintptr_t>(p) + AMX_I8_PF / 2), _MM_HINT_T0);
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i lo = _mm256_and_si256(b, m15);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m15);
      // [lo 0-15 | lo 32-47] and [hi 16-31 | hi 48-63] -> 0-15, 16-31, 32-47, 48-63
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + 64 * m),
                          _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + 64 * m + 32),
                          _mm256_permute2x128_si256(lo, hi, 0x31));
    }
    TILE_BARRIER();
    _tile_loadd(4, u, 64);
    amx_terms_dp<true>(xt + k * R, tb, R);
    TILE_BARRIER();
  }
  amx_terms_store(c, R);
}
#else
bool amx_here() { return false; }
bool amx_int8_here() { return false; }
#endif

constexpr int64_t AMX_MAX_ROWS = 16;  // one B tile's columns

// y = x @ w on AMX where it applies (returns false, y untouched, where not): AMX here and
// on, 1 <= R <= AMX_MAX_ROWS, K a multiple of 32, N of 16, every x value a bf16.
bool amx_nk_rows(const float* x, int64_t R, int64_t K, const uint16_t* w, int64_t ld,
                 int64_t N, float* y) {
#ifdef MOEKIT_AMX
  if (!amx_on.load(std::memory_order_relaxed) || R < 1 || R > AMX_MAX_ROWS || K % 32 ||
      N % 16 || !amx_here())
    return false;
  std::vector<uint16_t> xv(K * R);  // [K / 2][R][2]
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k) {
      uint32_t u;
      std::memcpy(&u, x + r * K + k, sizeof u);
      if (u & 0xFFFFu) return false;  // not a bf16
      xv[(k / 2) * R * 2 + r * 2 + k % 2] = static_cast<uint16_t>(u >> 16);
    }
  at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t lo, int64_t hi) {
    amx_configure(R);
    float c[64 * AMX_MAX_ROWS];
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t n0 = b * 64, nc = std::min<int64_t>(64, N - n0) / 16;
      const uint16_t* wb = w + n0 * ld;
      switch (nc) {
        case 4: amx_nk_block<4>(wb, ld, K, xv.data(), R, c); break;
        case 3: amx_nk_block<3>(wb, ld, K, xv.data(), R, c); break;
        case 2: amx_nk_block<2>(wb, ld, K, xv.data(), R, c); break;
        default: amx_nk_block<1>(wb, ld, K, xv.data(), R, c); break;
      }
      for (int64_t r = 0; r < R; ++r)  // c is [outputs][R]: y's rows, each contiguous
        for (int64_t m = 0; m < 16 * nc; ++m) y[r * N + n0 + m] = c[m * R + r];
    }
    amx_release();
  });
  amx_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
#else
  (void)x, (void)R, (void)K, (void)w, (void)ld, (void)N, (void)y;
  return false;
#endif
}

// The terms of R rows of x (rows K apart), one tile per term (int4's amx_i4_group): term i
// at xt + i * K * R, each [K / 4][R][4]; each row's 2^e into e2[r]. False where a value is
// not finite.
AVX512 bool i8_terms(const float* x, int64_t R, int64_t K, int8_t* xt, float* e2) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * K;
    if (!(e2[r] = terms_scale(xr, K))) return false;
    const __m512 down = _mm512_set1_ps(1.0f / e2[r]);
    for (int64_t k = 0; k < K; k += 16) {
      __m128i q[4];
      split_terms(_mm512_mul_ps(_mm512_loadu_ps(xr + k), down), q);
      int8_t* at = xt + k * R + r * 4;  // quads k / 4 .. k / 4 + 3 of row r
      for (int i = 0; i < 4; ++i) {
        alignas(16) int8_t b[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(b), q[i]);
        for (int j = 0; j < 4; ++j) std::memcpy(at + i * K * R + j * R * 4, b + 4 * j, 4);
      }
    }
  }
  return true;
}

// y[r][16 a + m] (a < na, m < 16, r the rows of groups j0 .. j0 + nb; rows of y ldy
// apart) = (((C3 / 128 + C2) / 128 + C1) / 128 + C0) * 2^e_r * scale[16 a + m] for the
// C tiles c [na nb][16][16] of amx_q8_pass: each C row's four lanes of a row reduced in
// their 128-bit lane, then one gather per row takes its 16 outputs.
AVX512 void amx_q8_combine(const int32_t* c, int64_t na, int64_t nb, const AmxTerms& t,
                           int64_t j0, const float* scale, float* y, int64_t ldy) {
  const __m512i col = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(16));
  alignas(64) float v[16][16];
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t g = j0 + j, nr = t.rows(g);
    alignas(64) float e2[16] = {};
    for (int64_t q = 0; q < nr; ++q) std::fill(e2 + 4 * q, e2 + 4 * q + 4, t.e2[4 * g + q]);
    const __m512 e2v = _mm512_load_ps(e2);
    for (int64_t a = 0; a < na; ++a) {
      const int32_t* ct = c + (a * nb + j) * 256;
      for (int m = 0; m < 16; ++m) {
        // lane 4q: row q's value
        const __m512 h = terms_in_lanes(_mm512_cvtepi32_ps(_mm512_loadu_si512(ct + 16 * m)));
        _mm512_store_ps(v[m], _mm512_mul_ps(_mm512_mul_ps(h, e2v),
                                            _mm512_set1_ps(scale[16 * a + m])));
      }
      for (int64_t q = 0; q < nr; ++q)
        _mm512_storeu_ps(y + (4 * g + q) * ldy + 16 * a,
                         _mm512_i32gather_ps(_mm512_add_epi32(col, _mm512_set1_epi32(4 * q)),
                                             &v[0][0], 4));
    }
  }
}

#ifdef MOEKIT_AMX
// y[r][0 .. 16 nblocks) for t's rows from the int8 weight rows w (the first output's, ld
// bytes apart) and their scales, rows of y ldy apart; the thread's tiles configured with
// 64-byte rows. A pass takes four 16-output blocks for one group of rows, else two, for
// two groups at a time (the weights read again from L1 / L2 for the next two). One A tile
// against three or four B tiles (four C tiles, 9-16 rows), as before, loaded 4 KB of
// terms per 1 KB of weights: one cold int8 projection, 2 threads, medians of 5, us,
// [1024 -> 3072] and [1024 -> 1024], that / two A against two B: 12 rows 225-237 / 189-190
// and 94 / 76-81, 16 rows 270-297 / 204-217 and 100-107 / 87-91, 24 rows 305-311 / 297-315
// and 150-151 / 112-114, 32 rows 323-394 / 335-336 and 167-168 / 127-132 (/tmp script
// over decode.dense_rows, this Xeon, 2026-12-06).
inline int64_t q8_pass_blocks(int64_t groups) { return groups == 1 ? 4 : 2; }

AMX_I8_FN void amx_q8_outputs(const int8_t* w, int64_t ld, int64_t nblocks, const AmxTerms& t,
                              const float* scale, float* y, int64_t ldy) {
  alignas(64) int32_t c[4 * 256];
  const int64_t G = t.groups(), per_pass = q8_pass_blocks(G), K = t.K;
  for (int64_t b = 0; b < nblocks;) {
    const int64_t na = std::min(per_pass, nblocks - b);
    const int8_t* wb = w + 16 * b * ld;
    for (int64_t j0 = 0; j0 < G; j0 += 2) {
      const int64_t nb = std::min<int64_t>(2, G - j0);
      // the next pass's weights, prefetched while the last row groups run on these
      const int8_t* next = j0 + 2 >= G && b + 2 * na <= nblocks ? wb + 16 * na * ld : nullptr;
      switch (na * 8 + nb) {
        case 8 + 1: amx_q8_pass<1, 1>(wb, ld, K, t, j0, next, c); break;
        case 16 + 1: amx_q8_pass<2, 1>(wb, ld, K, t, j0, next, c); break;
        case 24 + 1: amx_q8_pass<3, 1>(wb, ld, K, t, j0, next, c); break;
        case 32 + 1: amx_q8_pass<4, 1>(wb, ld, K, t, j0, next, c); break;
        case 8 + 2: amx_q8_pass<1, 2>(wb, ld, K, t, j0, next, c); break;
        default: amx_q8_pass<2, 2>(wb, ld, K, t, j0, next, c); break;
      }
      amx_q8_combine(c, na, nb, t, j0, scale + 16 * b, y + 16 * b, ldy);
    }
    b += na;
  }
}
#endif

// From 2 rows (at 1 row the two are level). One cold projection, 2 threads, medians of 5,
// [1024 -> 3072] and [1024 -> 1024], in us (/tmp script, this Xeon, 2026-12-06, two runs
// alternating with the code before): FMA kernel 146-155 and 58-59 at 1 row; 180-192 and
// 67-68 at 2; 206-227 and 77-80 at 4; 270-299 and 100-106 at 8; 512-514 and 171-184 at 16.
// AMX 137-147 and 55-56 at 2 rows, 141-149 and 57 at 4, 155-161 and 62 at 8, 253-254 and
// 100-101 at 16, 314-318 and 131-173 at 32. (A B tile per term, before, from 8 rows:
// 218-228 and 87, 270-302 and 114-115 at 16, 376-478 and 159-195 at 32.)
constexpr int64_t AMX_I8_MIN_ROWS = 2;
// The int32 sums: |C| <= 127 * 127 * K < 2^31.
constexpr int64_t AMX_I8_MAX_K = 1 << 16;

// The rows of an int4 projection on AMX-INT8 (a B tile per term): up to AMX_MAX_ROWS (one
// B tile's columns) in one chunk, up to AMX_I8_MAX_ROWS in chunks of Rc rows each (x padded
// with zero rows to a whole number of chunks), every 16-output block run once per chunk
// while its weights are still in L1 / L2. Chunk ch's terms at xt + ch * 4 * K * Rc, its
// rows' 2^e at e2 + ch * Rc.
struct AmxRows {
  int64_t R, K, chunks, Rc;
  std::vector<float> padded;  // x with the zero rows, where R is not a multiple of Rc
  const float* x;
  std::vector<int8_t> xt;
  std::vector<float> e2;
  bool ok = true;  // false: a value is not finite
  AmxRows(const float* x0, int64_t r, int64_t k)
      : R(r), K(k), chunks((r + AMX_MAX_ROWS - 1) / AMX_MAX_ROWS),
        Rc((r + chunks - 1) / chunks), x(x0), xt(4 * k * chunks * Rc), e2(chunks * Rc) {
    if (chunks * Rc != R) {
      padded.assign(chunks * Rc * K, 0.0f);
      std::copy(x0, x0 + R * K, padded.begin());
      x = padded.data();
    }
    for (int64_t ch = 0; ch < chunks && ok; ++ch)
      ok = i8_terms(x + ch * Rc * K, Rc, K, terms(ch), e2.data() + ch * Rc);
  }
  int8_t* terms(int64_t ch) { return xt.data() + ch * 4 * K * Rc; }
  int64_t rows(int64_t ch) const { return std::min(Rc, R - ch * Rc); }  // chunk ch's real rows
};

// Rows a quantized projection takes on the decode kernels (decode.QUANT_LINEAR_MAX_ROWS)
constexpr int64_t AMX_I8_MAX_ROWS = 32;

// y = x @ dequantized w for an int8 weight-only NK weight (scales per output row) on
// AMX-INT8 where it applies (false, y untouched, where not): AMX-INT8 here and on,
// AMX_I8_MIN_ROWS <= R <= AMX_I8_MAX_ROWS, K a multiple of 64 up to AMX_I8_MAX_K, N of 16,
// x finite.
bool amx_i8_rows(const float* x, int64_t R, int64_t K, const int8_t* w, int64_t ld,
                 const float* scale, int64_t N, float* y) {
#ifdef MOEKIT_AMX
  if (!amx_on.load(std::memory_order_relaxed) || R < AMX_I8_MIN_ROWS || R > AMX_I8_MAX_ROWS ||
      K % 64 || K > AMX_I8_MAX_K || N % 16 ||
      !amx_int8_here())  // (AMX: the CPU runs AVX-512, amx_terms_build's ISA)
    return false;
  std::vector<const float*> xr(R);
  for (int64_t r = 0; r < R; ++r) xr[r] = x + r * K;
  AmxTerms t;
  if (!amx_terms_build(t, xr.data(), R, K, false)) return false;
  const int64_t unit = q8_pass_blocks(t.groups());  // blocks per pass
  const int64_t blocks = N / 16;
  at::parallel_for(0, (blocks + unit - 1) / unit, 1, [&](int64_t lo, int64_t hi) {
    amx_configure(16);
    const int64_t b0 = lo * unit, b1 = std::min(blocks, hi * unit);
    amx_q8_outputs(w + 16 * b0 * ld, ld, b1 - b0, t, scale + 16 * b0, y + 16 * b0, N);
    amx_release();
  });
  amx_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
#else
  (void)x, (void)R, (void)K, (void)w, (void)ld, (void)scale, (void)N, (void)y;
  return false;
#endif
}

// acc[m] (R lanes, m < 16) += s[m] * (((C3 / 128 + C2) / 128 + C1) / 128 + C0)[m] * e2:
// one int4 group's C tiles c [4][16][R] of amx_i4_group (s: the 16 outputs' scales of
// the group, sg apart; e2: the rows' 2^e, R lanes)
AVX512 void amx_i4_scale(const int32_t* c, int64_t R, __m512 e2, const float* s, int64_t sg,
                         __m512* acc) {
  const __mmask16 mask = static_cast<__mmask16>((1u << R) - 1);
  for (int m = 0; m < 16; ++m) {
    const int32_t* cm = c + m * R;
    const __m512 v = terms_value(
        _mm512_maskz_loadu_epi32(mask, cm), _mm512_maskz_loadu_epi32(mask, cm + 16 * R),
        _mm512_maskz_loadu_epi32(mask, cm + 32 * R), _mm512_maskz_loadu_epi32(mask, cm + 48 * R));
    acc[m] = _mm512_fmadd_ps(_mm512_mul_ps(v, e2), _mm512_set1_ps(s[m * sg]), acc[m]);
  }
}

// y[r][0..16) = acc[m][r] + sum over groups of z[m][g] * xs[g][r], r < R (acc:
// amx_i4_scale's; xs [G][16]: the rows' sums over each group; z: the 16 outputs' zeros, G
// apart)
AVX512 void amx_i4_finish(const __m512* acc, int64_t R, int64_t G, const float* xs,
                          const float* z, float* y, int64_t ld) {
  alignas(64) float t[16][16];
  for (int m = 0; m < 16; ++m) {
    __m512 v = acc[m];
    for (int64_t g = 0; g < G; ++g)
      v = _mm512_fmadd_ps(_mm512_set1_ps(z[m * G + g]), _mm512_load_ps(xs + 16 * g), v);
    _mm512_store_ps(t[m], v);
  }
  for (int64_t r = 0; r < R; ++r)
    for (int m = 0; m < 16; ++m) y[r * ld + m] = t[m][r];
}

#ifdef MOEKIT_AMX
// 16 outputs of amx_i4_rows: y[r][0..16), r < rows <= R, for the rows' terms xt (w,
// scales and zeros at the first of the 16 output rows; e2: the R rows' 2^e)
AVX512 void amx_i4_outputs(const uint8_t* w, int64_t ld, int64_t g, int64_t G, const int8_t* xt,
                           int64_t tb, int64_t R, int64_t rows, const float* e2,
                           const float* scales, const float* zeros, const float* xs, float* y,
                           int64_t N) {
  alignas(64) int32_t c[4 * 16 * AMX_MAX_ROWS];
  alignas(64) int8_t u[16 * 64];
  const __m512 e2r = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << R) - 1), e2);
  __m512 acc[16];
  for (int m = 0; m < 16; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < G; ++gi) {
    amx_i4_group(w, ld, gi * g, g, xt, tb, R, u, c);
    amx_i4_scale(c, R, e2r, scales + gi, G, acc);
  }
  amx_i4_finish(acc, rows, G, xs, zeros, y, N);
}
#endif

// From 12 rows for int4: each group's four C tiles are stored and scaled by the group's s
// in fp32 (per 16 outputs x 64 inputs with groups of 64), a cost that does not shrink with
// the rows. One cold projection, int4 g64, 2 threads, medians of 5, FMA kernel / AMX in
// us, [1024 -> 3072] and [1024 -> 1024]: 1 row 109 / 109 and 46 / 45, 8 rows 296-302 /
// 276-279 and 111-113 / 105-108, 12 rows 416-459 / 308-332 and 161-166 / 121-130, 16 rows
// 535-574 / 312-346 and 205 / 135-137. (Scaling group g - 1 after group g's tiles, in the
// other buffer, measured the same as in order.) Below 12 rows a dense int4 projection runs
// on a4_rows (C tiles as wide as the rows: dense_amx declines, gate_up_rows' Plan takes it);
// from 12 both were measured (2026-12-06, evening): this one faster at 16 and 32 rows
// (309 against 376 us, 523 against 697 for [1024 -> 3072]), a4_rows at 12 and 24 (295
// against 327, 536 against 544).
constexpr int64_t AMX_I4_MIN_ROWS = 12;

// y = x @ dequantized w for an int4 NK weight (w = s * q + z per group of g inputs) on
// AMX-INT8 where it applies (false, y untouched, where not): as amx_i8_rows, with
// AMX_I4_MIN_ROWS <= R and g a multiple of 64. The terms' products per group are exact
// int32 sums, scaled by the group's s in fp32; the zero points' part is z times the
// group's sum of x in fp32.
bool amx_i4_rows(const float* x, int64_t R, int64_t K, const uint8_t* w, int64_t ld,
                 const float* scales, const float* zeros, int64_t g, int64_t N, float* y) {
#ifdef MOEKIT_AMX
  if (!amx_on.load(std::memory_order_relaxed) || R < AMX_I4_MIN_ROWS || R > AMX_I8_MAX_ROWS ||
      g % 64 || K % g || K > AMX_I8_MAX_K || N % 16 || !amx_int8_here())
    return false;
  AmxRows rows(x, R, K);
  if (!rows.ok) return false;
  const int64_t G = K / g, Rc = rows.Rc, chunks = rows.chunks;
  // per chunk: xs [G][16], the rows' sums over each group (64-byte aligned)
  std::vector<float> buf(chunks * 16 * G + 16, 0.0f);
  float* xs = buf.data() + (16 - (reinterpret_cast<uintptr_t>(buf.data()) / 4) % 16) % 16;
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int64_t r = 0; r < Rc; ++r) {
      const float* xr = rows.x + (ch * Rc + r) * K;
      for (int64_t gi = 0; gi < G; ++gi) {
        float sum = 0.0f;
        for (int64_t k = gi * g; k < (gi + 1) * g; ++k) sum += xr[k];
        xs[ch * 16 * G + 16 * gi + r] = sum;
      }
    }
  at::parallel_for(0, N / 16, 1, [&](int64_t lo, int64_t hi) {
    amx_configure(Rc);
    for (int64_t b = lo; b < hi; ++b)
      for (int64_t ch = 0; ch < chunks; ++ch)
        amx_i4_outputs(w + b * 16 * ld, ld, g, G, rows.terms(ch), K * Rc, Rc, rows.rows(ch),
                       rows.e2.data() + ch * Rc, scales + b * 16 * G, zeros + b * 16 * G,
                       xs + ch * 16 * G, y + ch * Rc * N + b * 16, N);
    amx_release();
  });
  amx_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
#else
  (void)x, (void)R, (void)K, (void)w, (void)ld, (void)scales, (void)zeros, (void)g, (void)N,
      (void)y;
  return false;
#endif
}

// ---- int4 weight-only experts and projections on AMX-INT8: four rows' terms to a B tile
//
// The int4 FMA kernel (i4f_rows) spends per 16 weights an AND, a convert and an FMA per
// row: from 2 rows on it is bound by them, not by the bytes. Here the rows are split into
// their four int8 terms, up to four rows to a B tile (AmxTerms, as int8's projections, the
// inputs of each 64 in the order of the unpacked nibbles), and 16 output rows' nibbles
// into an A tile (a mask, a shift, a mask and a shuffle per 64 weight bytes and half A
// tile), so one tdpbusd gives the exact int32 sums of 16 outputs x up to four rows x four
// terms x 64 inputs. Each weight group's C tile is stored and scaled in fp32 lane by lane
// (the group's s per output); the zero points are z times the rows' sums over the group;
// the terms are recombined once per output at the end, ((A3 / 128 + A2) / 128 + A1) / 128
// + A0, times the row's 2^e. The group scaling is the cost that does not shrink with the
// rows (16 outputs x 4 lanes a row per 64 inputs at g = 64), hence C tiles as wide as the
// rows (a4_configure) and more than four rows in passes of four over each 16-output block
// (the next passes read it from L1 / L2).
//
// gate_up of 64 experts D=1024 2F=1024 g64, every expert R rows, 12 weight sets cycled
// (cold), 2 threads, GB/s of int4, FMA kernel / here: R=1 19.1-19.2 / 19.6-19.7 (a version
// before the last three changes: level, hence from 2 rows), 2 17.2-17.3 / 19.4-19.7, 3
// 13.6-14.8 / 17.3-18.8, 4 12.6-12.8 / 17.5-17.8, 8 7.1 / 9.6-9.7, 16 3.6 / 5.0-5.1;
// down_combine (K = 512) 2 15.9-16.5 / 16.8-17.3, 3 11.7-12.1 / 15.4-15.9, 4 10.4-10.9 /
// 14.2-14.6 (/tmp scripts over ext.gate_up and ext.down_combine, this Xeon). One pass
// over the block for every row group (sharing the unpacked nibbles) measured 15-20% faster
// at 5-16 rows and was not kept: ~150 more lines for experts that rarely have them. Dense
// projections from 12 rows keep amx_i4_rows.
#ifdef MOEKIT_AMX
// Tiles of a4_rows<RP>: C 0, 1 and B 6 of 16 RP bytes a row (RP rows' four terms), A 4, 5
// of 64 bytes.
AMX_FN void a4_configure(int64_t rp) {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i)
    cfg.rows[i] = 16, cfg.colsb[i] = static_cast<uint16_t>(i == 4 || i == 5 ? 64 : 16 * rp);
  TILE_BARRIER();
  _tile_loadconfig(&cfg);
}

// acc[i] += the C tile's vector i (cb) times its lanes' outputs' s, and zp[q] (lane m:
// output m) += the outputs' z times row q's sum over the group / 2^e (zr[q G]), for
// weight group gi (s, z at the 16 outputs' first; sidx: the outputs' distance; out[i]:
// vector i's lanes -> their outputs)
template <int RP>
AVX512 inline void a4_rows_scale(const int32_t* cb, const float* s, const float* z,
                                 const float* zr, int64_t G, int64_t gi, int64_t R,
                                 __m512i sidx, const __m512i (&out)[4 * RP],
                                 __m512 (&acc)[4 * RP], __m512 (&zp)[RP]) {
  const __m512 sg = RP < 4 ? _mm512_i32gather_ps(sidx, s + gi, 4) : _mm512_setzero_ps();
  for (int i = 0; i < 4 * RP; ++i) {
    const __m512 c = _mm512_cvtepi32_ps(_mm512_load_si512(cb + 16 * i));
    if constexpr (RP == 4)  // vector i is output i's (a broadcast from memory: no shuffle)
      acc[i] = _mm512_fmadd_ps(c, _mm512_set1_ps(s[i * G + gi]), acc[i]);
    else
      acc[i] = _mm512_fmadd_ps(c, _mm512_permutexvar_ps(out[i], sg), acc[i]);
  }
  const __m512 zg = _mm512_i32gather_ps(sidx, z + gi, 4);
  for (int q = 0; q < RP; ++q)
    if (q < R) zp[q] = _mm512_fmadd_ps(zg, _mm512_set1_ps(zr[q * G + gi]), zp[q]);
}

// 16 outputs (w: the first one's row, rows ld bytes apart; s, z: their scales and zeros,
// G apart) for row group j of r (R <= RP rows; RP 1, 2 or 4, tiles by a4_configure(RP))
// into y[q][m] (rows ldy apart); `next`: the next block's bytes (16 ld, prefetched into L2
// while this one runs) or null. A C tile holds 16 outputs x 4 RP lanes: a group's sums
// are 4 RP vectors to scale (4 at one row, 16 at four). Two C tiles in turn: a group's
// are stored while the next group's sums run, and scaled after them (a tile store read
// back at once waited on it: ~30% of a chunk's time in a /tmp microbenchmark).
template <int RP>
AMX_I8_FN void a4_rows(const uint8_t* w, int64_t ld, int64_t K, int64_t g, const A4Rows& r,
                       int64_t j, const float* s, const float* z, const uint8_t* next,
                       float* y, int64_t ldy) {
  constexpr int L = 4 * RP;  // lanes per output; a C tile is L vectors
  const AmxTerms& t = r.t;
  const int64_t G = K / g, R = t.rows(j);
  const float* zr = r.zr.data() + 4 * j * G;
  const float* e2 = t.e2.data() + 4 * j;
  const int64_t lines = 16 * ld / 64, per_pair = (lines + K / 128) / (K / 128 + 1);
  alignas(64) int8_t u[2][2][16 * 64];  // the unpacked nibbles of two chunks, two sets in turn
  alignas(64) int32_t c[2][16 * L];
  __m512 acc[L], zp[RP];
  __m512i out[L];  // vector i's lanes -> their outputs
  for (int q = 0; q < RP; ++q) zp[q] = _mm512_setzero_ps();
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int i = 0; i < L; ++i) {
    acc[i] = _mm512_setzero_ps();
    out[i] = _mm512_srli_epi32(_mm512_add_epi32(iota, _mm512_set1_epi32(16 * i)), 2 + (RP / 2));
  }
  const __m512i sidx = _mm512_mullo_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(G)));
  const __m512i m15 = _mm512_set1_epi8(15);
  const __m256i m15h = _mm256_set1_epi8(15);
  int64_t pf = 0, turn = 0;
  for (int64_t k0 = 0; k0 < K; k0 += 128, turn ^= 1) {
    int8_t(&ub)[2][16 * 64] = u[turn];
    if (k0 + 128 <= K) {  // two chunks: 64 bytes a row, [lo | hi] of each into its buffer
      for (int m = 0; m < 16; ++m) {
        const __m512i b = _mm512_loadu_si512(w + m * ld + k0 / 2);
        const __m512i lo = _mm512_and_si512(b, m15);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m15);
        _mm512_store_si512(ub[0] + 64 * m, _mm512_shuffle_i64x2(lo, hi, 0x44));
        _mm512_store_si512(ub[1] + 64 * m, _mm512_shuffle_i64x2(lo, hi, 0xEE));
      }
    } else {
      for (int m = 0; m < 16; ++m) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + m * ld + k0 / 2));
        _mm256_store_si256(reinterpret_cast<__m256i*>(ub[0] + 64 * m), _mm256_and_si256(b, m15h));
        _mm256_store_si256(reinterpret_cast<__m256i*>(ub[0] + 64 * m + 32),
                           _mm256_and_si256(_mm256_srli_epi16(b, 4), m15h));
      }
    }
    if (next)
      for (int64_t i = 0; i < per_pair && pf < lines; ++i, ++pf)
        _mm_prefetch(reinterpret_cast<const char*>(next) + 64 * pf, _MM_HINT_T1);
    for (int h = 0; h < 2 && k0 + 64 * h < K; ++h) {
      const int64_t k = k0 + 64 * h, gi = k / g;
      const int set = static_cast<int>(gi & 1);
      TILE_BARRIER();
      if (k % g == 0) {
        if (set) _tile_zero(1); else _tile_zero(0);
      }
      if (h) _tile_loadd(5, ub[1], 64); else _tile_loadd(4, ub[0], 64);
      _tile_loadd(6, t.tile(j, k), t.stride(j));
      if (set && h) _tile_dpbusd(1, 5, 6);
      else if (set) _tile_dpbusd(1, 4, 6);
      else if (h) _tile_dpbusd(0, 5, 6);
      else _tile_dpbusd(0, 4, 6);
      if ((k + 64) % g) continue;
      if (set) _tile_stored(1, c[1], 16 * RP); else _tile_stored(0, c[0], 16 * RP);
      TILE_BARRIER();
      if (gi > 0)  // the group before, stored one group ago
        a4_rows_scale<RP>(c[!set], s, z, zr, G, gi - 1, R, sidx, out, acc, zp);
    }
  }
  TILE_BARRIER();
  a4_rows_scale<RP>(c[(G - 1) & 1], s, z, zr, G, G - 1, R, sidx, out, acc, zp);
  // recombined lane by lane (lane 4 u: output u / RP, row u % RP), plus the zero points
  alignas(64) float v[16 * L];
  for (int i = 0; i < L; ++i) _mm512_store_ps(v + 16 * i, terms_in_lanes(acc[i]));
  alignas(64) float zv[RP][16];
  for (int q = 0; q < RP; ++q) _mm512_store_ps(zv[q], zp[q]);
  for (int64_t q = 0; q < R; ++q)
    for (int m = 0; m < 16; ++m) y[q * ldy + m] = (v[4 * (m * RP + q)] + zv[q][m]) * e2[q];
}
#endif

// From 2 rows an expert (at one row level with the FMA kernel) to 32 (the decode kernels'
// rows, as int8's AMX path); K and g multiples of 64 (a C tile's sums are one group's:
// |C| <= 15 * 128 * g, whatever K); output widths multiples of 32 (gate_up's GLU halves in
// whole 16-output blocks).
constexpr int64_t A4_MIN_ROWS = 2, A4_MAX_ROWS = 32;

// What a4_applies and q8_applies share: AMX-INT8 here and on, a weight-only NK weight of
// `kind`, lo <= rows <= hi, K a multiple of 64, output widths multiples of 32.
bool amx_experts(const Weights& w, Kind kind, int64_t rows, int64_t lo, int64_t hi) {
  return amx_on.load(std::memory_order_relaxed) && w.kind == kind && !w.a8 && !w.n_unit &&
         rows >= lo && rows <= hi && w.K % 64 == 0 && w.N % 32 == 0 && amx_int8_here();
}

bool a4_applies(const Weights& w, int64_t rows) {
  return amx_experts(w, Kind::I4, rows, A4_MIN_ROWS, A4_MAX_ROWS) && w.group % 64 == 0;
}

// L2 prefetches of the `bytes` from p (a tile's first weights; the kernels prefetch the
// rest while the ones before run)
inline void prefetch_l2(const void* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64)
    _mm_prefetch(static_cast<const char*>(p) + i, _MM_HINT_T1);
}

AVX512 bool a4_build(A4Rows& r, const float* const* x, int64_t R, int64_t K, int64_t g) {
  if (!amx_terms_build(r.t, x, R, K, true)) return false;
  const int64_t G = K / g;
  r.zr.resize(R * G);
  for (int64_t q = 0; q < R; ++q)
    for (int64_t gi = 0; gi < G; ++gi) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = gi * g; k < (gi + 1) * g; k += 16)
        sum = _mm512_add_ps(sum, _mm512_loadu_ps(x[q] + k));
      r.zr[q * G + gi] = _mm512_reduce_add_ps(sum) / r.t.e2[q];
    }
  return true;
}

// acc [rows of r, W] = r's rows @ int4 weights w[e][:, c0 : c0 + W] (W a multiple of 16)
void a4_tile(const Weights& w, int64_t e, const A4Rows& r, int64_t c0, int64_t W, float* acc) {
#ifdef MOEKIT_AMX
  const int64_t G = w.K / w.group;
  const uint8_t* base = static_cast<const uint8_t*>(w.data) + e * w.s_e + c0 * w.s_n;
  const float* sc = w.scales + (e * w.N + c0) * G;
  const float* z = w.zeros + (e * w.N + c0) * G;
  const int64_t blocks = W / 16, ld = w.s_n, R = r.t.R, rp = R <= 2 ? R : 4;
  prefetch_l2(base, 16 * ld);  // the first block (the rest: a4_rows' `next`)
  a4_configure(rp);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* p = base + 16 * b * ld;
    const uint8_t* next = b + 1 < blocks ? p + 16 * ld : nullptr;
    const float *s = sc + 16 * b * G, *zb = z + 16 * b * G;
    for (int64_t j = 0; j < r.t.groups(); ++j) {  // (groups after the first: from L1 / L2)
      const uint8_t* pf = j == 0 ? next : nullptr;
      float* y = acc + 4 * j * W + 16 * b;
      if (rp == 1) a4_rows<1>(p, ld, w.K, w.group, r, j, s, zb, pf, y, W);
      else if (rp == 2) a4_rows<2>(p, ld, w.K, w.group, r, j, s, zb, pf, y, W);
      else a4_rows<4>(p, ld, w.K, w.group, r, j, s, zb, pf, y, W);
    }
  }
  amx_release();
#else
  (void)w, (void)e, (void)r, (void)c0, (void)W, (void)acc;
#endif
}

// From 2 rows an expert (AMX_I8_MIN_ROWS; one-row experts of the same call stay on
// i8t_tile: at one row it streams faster). Steps of the fine model (64 experts top-8) at
// batch 16, int8, `--step-calls`, ms (gate_up, down_combine): i8t_tile for every expert 9.7-9.8,
// 6.6-6.7; AMX from 3 rows 8.8-8.9, 5.7-5.8; from 2 rows 8.8, 5.4-5.6; every expert
// (one-row ones too) 9.3, 5.4. gate_up of 64 experts (D=1024, 2F=1024), every expert R
// rows, cold, 2 threads, GB/s, i8t_tile / here: R=2 24-25 / 22-23, 3 21 / 21-22, 4 17-18 /
// 20-21, 8 9.7 / 18.5, 16 5.0 / 11; down_combine (K = 512) R=2 19 / 21, 4 14 / 20, 8 7.3 /
// 16 (/tmp scripts over ext.gate_up and ext.down_combine, this Xeon, 2026-12-06).
bool q8_applies(const Weights& w, int64_t rows) {
  return amx_experts(w, Kind::I8, rows, AMX_I8_MIN_ROWS, AMX_I8_MAX_ROWS) &&
         w.K <= AMX_I8_MAX_K;
}

// acc [rows of t, W] = t's rows @ int8 weights w[e][:, c0 : c0 + W] (W a multiple of 16)
void q8_tile(const Weights& w, int64_t e, const AmxTerms& t, int64_t c0, int64_t W, float* acc) {
#ifdef MOEKIT_AMX
  const int8_t* base = static_cast<const int8_t*>(w.data) + e * w.s_e + c0 * w.s_n;
  // the first pass's weights (amx_q8_outputs prefetches the next passes'): gate_up of the
  // 64 experts above at 2 rows 20.5 -> 22.5 GB/s
  prefetch_l2(base, 16 * std::min(W / 16, q8_pass_blocks(t.groups())) * w.s_n);
  amx_configure(16);
  amx_q8_outputs(base, w.s_n, W / 16, t, w.scales + e * w.N + c0, acc, W);
  amx_release();
#else
  (void)w, (void)e, (void)t, (void)c0, (void)W, (void)acc;
#endif
}

// gate_up of a dense projection (one expert that every row goes to, in order; no
// activation; a bias added after the sums, as gate_up_rows adds it) of a bf16 NK weight on
// AMX (amx_nk_rows), or of an int8 / int4 one on AMX-INT8 (amx_i8_rows, amx_i4_rows), or
// nullopt where that does not apply: then gate_up_rows runs it.
c10::optional<torch::Tensor> dense_amx(const torch::Tensor& x_TD, const torch::Tensor& token_S,
                                       const torch::Tensor& offsets_E, const Weights& w,
                                       const c10::optional<torch::Tensor>& b_in, int64_t act) {
  const int64_t R = x_TD.size(0);
  const bool i8 = w.kind == Kind::I8 && !w.a8, i4 = w.kind == Kind::I4 && !w.a8;
  if ((w.kind != Kind::BF16 && !i8 && !i4) || w.n_unit || w.E != 1 || act != NONE ||
      R > (i8 || i4 ? AMX_I8_MAX_ROWS : AMX_MAX_ROWS) || w.K != x_TD.size(1) ||
      offsets_E.numel() != 1 || token_S.numel() != R || offsets_E.item<int64_t>() != R)
    return c10::nullopt;
  const auto tok = as_contiguous(token_S, at::kLong);
  for (int64_t r = 0; r < R; ++r)
    if (tok.data_ptr<int64_t>()[r] != r) return c10::nullopt;
  auto y = torch::empty({R, w.N}, x_TD.options());
  const bool ran =
      i4 ? amx_i4_rows(x_TD.data_ptr<float>(), R, w.K, static_cast<const uint8_t*>(w.data),
                       w.s_n, w.scales, w.zeros, w.group, w.N, y.data_ptr<float>())
      : i8 ? amx_i8_rows(x_TD.data_ptr<float>(), R, w.K, static_cast<const int8_t*>(w.data), w.s_n,
                       w.scales, w.N, y.data_ptr<float>())
         : amx_nk_rows(x_TD.data_ptr<float>(), R, w.K, static_cast<const uint16_t*>(w.data),
                       w.s_n, w.N, y.data_ptr<float>());
  if (!ran) return c10::nullopt;
  if (const float* b = bias_row(b_in, 0, w.N)) {
    float* o = y.data_ptr<float>();
    for (int64_t r = 0; r < R; ++r)
      for (int64_t n = 0; n < w.N; ++n) o[r * w.N + n] += b[n];
  }
  return y;
}

}  // namespace

// h rows of the touched experts: act(x[token] @ w_in[e] + b_in[e]) for the kept
// rows in sorted order; [kept, N / 2] for GLU activations, else [kept, N].
// NK layout and quantized weights: tasks (expert, output tile), epilogue in the
// task. KN layout: tasks (expert, K chunk) over whole contiguous weight rows into
// partial sums, then tasks (expert, output tile) sum them and run the epilogue.
torch::Tensor gate_up(const torch::Tensor& x_TD, const torch::Tensor& token_S,
                      const torch::Tensor& offsets_E, const torch::Tensor& w_data,
                      const c10::optional<torch::Tensor>& w_scales,
                      const c10::optional<torch::Tensor>& w_zeros, int64_t bits, int64_t group,
                      const c10::optional<torch::Tensor>& b_in, int64_t act, double limit,
                      double alpha) {
  check_f32(x_TD, "x_TD", 2);
  const Stacked ws{weights(w_data, w_scales, w_zeros, bits, group)};
  check_bias(b_in, "b_in", ws.experts(), ws.front().N);
  if (auto y = dense_amx(x_TD, token_S, offsets_E, ws.front(), b_in, act)) return *y;
  return gate_up_rows(x_TD, token_S, offsets_E, ws, b_in, act, limit, alpha, 0);
}

// out_TD = sum over kept rows r of weight_S[r] * (a[r] @ w_out[e(r)] + b_out[e(r)]),
// written row by row into out_TD[token_S[r]] (tokens without rows get 0). Phase 2
// tasks own tiles of D for every token, so the combine has no races.
void down_combine(const torch::Tensor& a_SF, const torch::Tensor& token_S,
                  const torch::Tensor& weight_S, const torch::Tensor& offsets_E,
                  const torch::Tensor& w_data, const c10::optional<torch::Tensor>& w_scales,
                  const c10::optional<torch::Tensor>& w_zeros, int64_t bits, int64_t group,
                  const c10::optional<torch::Tensor>& b_out, torch::Tensor& out_TD) {
  check_f32(a_SF, "a_SF", 2);
  check_f32(weight_S, "weight_S", 1);
  check_f32(out_TD, "out_TD", 2);
  const Stacked ws{weights(w_data, w_scales, w_zeros, bits, group)};
  down_combine_rows(a_SF, token_S, weight_S, offsets_E, ws, b_out, out_TD, false, 0);
}

// to_bf16 over a row: 16 lanes at a time where the CPU has AVX-512 (the scalar loop
// does not vectorize for the baseline ISA: bf16 dequantization took 2.3x float32's time).
AVX512 void round_bf16_avx512(const float* src, uint16_t* dst, int64_t n) {
  const __m512i low = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
  const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(src + k));
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(low, _mm512_and_si512(hi, one))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs), inf);
    const __m512i r = _mm512_mask_or_epi32(rounded, nan, hi, quiet);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm512_cvtepi32_epi16(r));
  }
  for (; k < n; ++k) dst[k] = to_bf16(src[k]);
}

// The same with 8 lanes: AVX2 has no unsigned compare, but both sides of the NaN test are
// below 2^31, and no 32 -> 16 narrowing without saturation, but every lane fits 16 bits.
AVX2 void round_bf16_avx2(const float* src, uint16_t* dst, int64_t n) {
  const __m256i low = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  const __m256i abs = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(0x7F800000);
  const __m256i quiet = _mm256_set1_epi32(0x40);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    __m256i r[2];
    for (int h = 0; h < 2; ++h) {
      const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(src + k + 8 * h));
      const __m256i hi = _mm256_srli_epi32(u, 16);
      const __m256i rounded = _mm256_srli_epi32(
          _mm256_add_epi32(u, _mm256_add_epi32(low, _mm256_and_si256(hi, one))), 16);
      const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs), inf);
      r[h] = _mm256_blendv_epi8(rounded, _mm256_or_si256(hi, quiet), nan);
    }
    // packus works per 128-bit lane: [r0 lo, r1 lo, r0 hi, r1 hi] -> reorder the quarters
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), packed);
  }
  for (; k < n; ++k) dst[k] = to_bf16(src[k]);
}

void round_bf16_row(const float* src, uint16_t* dst, int64_t n) {
  if (CPU_ISA == Isa::Avx512) return round_bf16_avx512(src, dst, n);
  if (CPU_ISA == Isa::Avx2) return round_bf16_avx2(src, dst, n);
  for (int64_t k = 0; k < n; ++k) dst[k] = to_bf16(src[k]);
}

// Global output row `row` of int8 / int4 weights w (expert row / N, channel row % N) as
// float32 into row i of out [., K] (float32 or bfloat16: there the float32 row rounded
// once): s * q, or s * q + z per group.
void dequantize_row(const Weights& w, int64_t row, torch::Tensor& out, int64_t i) {
  const int64_t K = w.K;
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  thread_local std::vector<float> row_f32;  // bf16: the row in float32 first
  if (bf16 && static_cast<int64_t>(row_f32.size()) < K) row_f32.resize(K);
  float* dst = bf16 ? row_f32.data() : out.data_ptr<float>() + i * K;
  if (w.kind == Kind::I8) {
    const int8_t* q = static_cast<const int8_t*>(w.data) + row * K;
    const float s = w.scales[row];
    for (int64_t k = 0; k < K; ++k) dst[k] = s * static_cast<float>(q[k]);
  } else {
    const uint8_t* q = static_cast<const uint8_t*>(w.data) + row * (K / 2);
    const int64_t ng = K / w.group;
    for (int64_t k = 0; k < K; k += 32) {
      const float s = w.scales[row * ng + k / w.group], z = w.zeros[row * ng + k / w.group];
      for (int l = 0; l < 16; ++l) {
        dst[k + l] = s * static_cast<float>(q[k / 2 + l] & 15) + z;
        dst[k + 16 + l] = s * static_cast<float>(q[k / 2 + l] >> 4) + z;
      }
    }
  }
  if (bf16) round_bf16_row(dst, reinterpret_cast<uint16_t*>(out.data_ptr()) + i * K, K);
}

// Experts e0..e1-1 of a quantized tensor as float32 [e1 - e0, N, K], into `out` where
// given (a reused buffer: a fresh 32 MiB tensor spent ~3/4 of a dequantization in
// first-touch page faults). `out` may be bfloat16: each value rounded as torch's
// .to(torch.bfloat16) rounds the float32 one (bf16 activations' prefill, without the
// float32 copy written and read again).
torch::Tensor dequantize(const torch::Tensor& w_data, const torch::Tensor& w_scales,
                         const c10::optional<torch::Tensor>& w_zeros, int64_t bits,
                         int64_t group, int64_t e0, int64_t e1,
                         const c10::optional<torch::Tensor>& into) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4, got ", bits);
  const Weights w = weights(w_data, w_scales, w_zeros, bits, group);
  TORCH_CHECK(0 <= e0 && e0 <= e1 && e1 <= w.E, "experts ", e0, "..", e1, " out of range");
  if (into) {
    const auto& t = *into;
    TORCH_CHECK(t.device().is_cpu() &&
                    (t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16) &&
                    t.is_contiguous() && t.sizes() == torch::IntArrayRef({e1 - e0, w.N, w.K}),
                "out must be a contiguous float32 or bfloat16 CPU tensor of shape [", e1 - e0,
                ", ", w.N, ", ", w.K, "], got ", t.scalar_type(), " ", t.sizes());
  }
  auto out = into ? *into : torch::empty({e1 - e0, w.N, w.K}, w_scales.options());
  at::parallel_for(0, (e1 - e0) * w.N, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dequantize_row(w, e0 * w.N + i, out, i);
  });
  return out;
}

// The kernels' path on this CPU: "avx512" or "avx2" (intrinsics), else "generic"
// (loops vectorized by the compiler, target_clones picking the clone at load time).
std::string isa() {
  return CPU_ISA == Isa::Avx512 ? "avx512" : CPU_ISA == Isa::Avx2 ? "avx2" : "generic";
}


// ---- per-expert weights: one tensor (or quantized triple) per expert -------------
//
// The expert cache (moekit/offload) holds every expert in its own buffer; stacking
// the touched ones into an [E', K, N] tensor per step copied them all outside the
// cache's byte budget (+427 MiB peak RSS at the OLMoE-shaped benchmark). These
// entries take the list and run the same code as gate_up / down_combine
// (gate_up_rows / down_combine_rows on PerExpert instead of Stacked): the same
// tasks, K chunks and summation order, so the outputs are bitwise equal. `plan_experts` > 0 plans the K chunks for that many experts: a
// step split into several calls (chunks of experts; down_combine_list with
// `accumulate`) then sums exactly as one call over all of them would.

namespace {

PerExpert list_weights(const std::vector<torch::Tensor>& data,
                       const c10::optional<std::vector<torch::Tensor>>& scales,
                       const c10::optional<std::vector<torch::Tensor>>& zeros, int64_t bits,
                       int64_t group, int64_t experts) {
  TORCH_CHECK(static_cast<int64_t>(data.size()) == experts, "w lists ", data.size(),
              " experts, offsets_E has ", experts);
  TORCH_CHECK(!scales || scales->size() == data.size(), "w_scales must list one per expert");
  TORCH_CHECK(!zeros || zeros->size() == data.size(), "w_zeros must list one per expert");
  PerExpert ws;
  for (size_t i = 0; i < data.size(); ++i) {
    TORCH_CHECK(data[i].dim() == 2, "w[", i, "] must have 2 dimensions, got ", data[i].sizes());
    c10::optional<torch::Tensor> s, z;
    if (scales) s = (*scales)[i].unsqueeze(0);
    if (zeros) z = (*zeros)[i].unsqueeze(0);
    ws.list.push_back(weights(data[i].unsqueeze(0), s, z, bits, group));
    const Weights& a = ws.list.front();
    const Weights& b = ws.list.back();
    TORCH_CHECK(b.kind == a.kind && b.K == a.K && b.N == a.N && b.n_unit == a.n_unit,
                "w[", i, "] differs from w[0] in dtype, shape or layout");
  }
  return ws;
}

}  // namespace

// gate_up with w_in as a list (one [K, N] tensor, or int8/int4 data + scales + zeros,
// per entry of offsets_E); b_in stacked [E, N] or None.
torch::Tensor gate_up_list(const torch::Tensor& x_TD, const torch::Tensor& token_S,
                           const torch::Tensor& offsets_E, const std::vector<torch::Tensor>& w_data,
                           const c10::optional<std::vector<torch::Tensor>>& w_scales,
                           const c10::optional<std::vector<torch::Tensor>>& w_zeros,
                           int64_t bits, int64_t group, const c10::optional<torch::Tensor>& b_in,
                           int64_t act, double limit, double alpha, int64_t plan_experts) {
  check_f32(x_TD, "x_TD", 2);
  const PerExpert ws = list_weights(w_data, w_scales, w_zeros, bits, group, offsets_E.numel());
  return gate_up_rows(x_TD, token_S, offsets_E, ws, b_in, act, limit, alpha, plan_experts);
}

// down_combine with w_out as a list; `accumulate` adds into out_TD instead of
// overwriting it (the next chunk of a step's experts, in expert order).
void down_combine_list(const torch::Tensor& a_SF, const torch::Tensor& token_S,
                       const torch::Tensor& weight_S, const torch::Tensor& offsets_E,
                       const std::vector<torch::Tensor>& w_data,
                       const c10::optional<std::vector<torch::Tensor>>& w_scales,
                       const c10::optional<std::vector<torch::Tensor>>& w_zeros, int64_t bits,
                       int64_t group, const c10::optional<torch::Tensor>& b_out,
                       torch::Tensor& out_TD, bool accumulate, int64_t plan_experts) {
  check_f32(a_SF, "a_SF", 2);
  check_f32(weight_S, "weight_S", 1);
  check_f32(out_TD, "out_TD", 2);
  const PerExpert ws = list_weights(w_data, w_scales, w_zeros, bits, group, offsets_E.numel());
  down_combine_rows(a_SF, token_S, weight_S, offsets_E, ws, b_out, out_TD, accumulate,
                    plan_experts);
}

// ---- the rest of a decode step: routing and attention for one new token per row ----
//
// A decode step's small ops (router top-k, sort by expert, rotary, KV cache write,
// attention over the cache) each ran as several aten ops, ~260 per step at batch 1
// for four layers; each pays dispatch and, right after a weight stream has evicted
// the caches, cold code and data. These two entries do a layer's share in one call
// each. Both are row-independent: a row computes the same bits alone or in a batch.

namespace {

// Router modes: softmax (probs over all experts; renormalised weights are the softmax
// of the chosen logits) or sigmoid (DeepSeek-V3: weights sigmoid(l), renormalised as
// the softmax of logsigmoid(l); selection on sigmoid(l) + bias in fp64 with a bias).
enum RouteMode : int64_t { ROUTE_SOFTMAX = 0, ROUTE_SIGMOID = 1 };

inline double logsigmoid(double v) { return std::min(v, 0.0) - std::log1p(std::exp(-std::abs(v))); }

// S = T * K token-major choices (expert id[s], weight s of `weights`, elements of
// weight_S's size) sorted by expert with a counting sort, stable in token order: (token_S,
// weight_S, counts_E, offsets_E int32), route_sort's and sort_topk's result.
std::vector<torch::Tensor> sorted_by_expert(const int64_t* id, int64_t S, int64_t K, int64_t E,
                                            const void* weights, torch::Tensor weight_S) {
  auto counts = torch::zeros({E}, torch::dtype(at::kLong));
  auto offsets = torch::empty({E}, torch::dtype(at::kInt));
  auto token = torch::empty({S}, torch::dtype(at::kLong));
  int64_t* cnt = counts.data_ptr<int64_t>();
  int32_t* off = offsets.data_ptr<int32_t>();
  for (int64_t s = 0; s < S; ++s) ++cnt[id[s]];
  std::vector<int64_t> next(E);
  for (int64_t e = 0, end = 0; e < E; ++e)
    next[e] = end, end += cnt[e], off[e] = static_cast<int32_t>(end);
  int64_t* tok = token.data_ptr<int64_t>();
  const auto* src = static_cast<const char*>(weights);
  auto* dst = static_cast<char*>(weight_S.data_ptr());
  const int64_t es = weight_S.element_size();
  for (int64_t s = 0; s < S; ++s) {  // token-major pairs, so a stable sort
    const int64_t r = next[id[s]]++;
    tok[r] = s / K;
    std::memcpy(dst + r * es, src + s * es, es);
  }
  return {token, weight_S, counts, offsets};
}

}  // namespace

// Top-k routing and the sort by expert in one pass: logits [T, E] fp32 ->
// (token_S int64 [T*K], weight_S fp32 [T*K], counts_E int64 [E], offsets_E int32 [E]),
// rows sorted by expert and by token within an expert (a stable sort of the
// token-major pairs), dropless. Selection is on the logits (softmax and sigmoid are
// monotone), or on sigmoid(logit) + bias in fp64; ties go to the lower expert index.
std::vector<torch::Tensor> route_sort(const torch::Tensor& logits_TE, int64_t k, int64_t mode,
                                      bool renormalize, double scale,
                                      const c10::optional<torch::Tensor>& bias_E) {
  check_f32(logits_TE, "logits_TE", 2);
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "k=", k, " is not allowed: it must be in [1, ", E, "]");
  TORCH_CHECK(mode == ROUTE_SOFTMAX || mode == ROUTE_SIGMOID, "mode=", mode,
              " is not allowed: 0 (softmax) or 1 (sigmoid)");
  const float* bias = nullptr;
  torch::Tensor b;
  if (bias_E) {
    TORCH_CHECK(mode == ROUTE_SIGMOID, "bias_E is only taken with mode 1 (sigmoid)");
    b = bias_E->detach().to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == E, "bias_E must hold ", E, " values, got ", b.numel());
    bias = b.data_ptr<float>();
  }
  TORCH_CHECK(!(mode == ROUTE_SIGMOID && renormalize) || k <= 64, "k=", k,
              " is not allowed with mode 1 here: at most 64");
  const float* l = logits_TE.data_ptr<float>();
  std::vector<int64_t> chosen(T * k);
  std::vector<float> wk(T * k);
  // each token's choice on its own (a prefill's thousands of tokens over the threads),
  // then the counting sort in token order
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    std::vector<double> key(E), top(k);
    for (int64_t t = t0; t < t1; ++t) {
      const float* lt = l + t * E;
      for (int64_t e = 0; e < E; ++e)
        key[e] = bias ? 1.0 / (1.0 + std::exp(-static_cast<double>(lt[e]))) + bias[e] : lt[e];
      // insertion into the k best so far, descending; a tie keeps the earlier expert first
      int64_t n = 0, * c = chosen.data() + t * k;
      for (int64_t e = 0; e < E; ++e) {
        if (n == k && !(key[e] > top[k - 1])) continue;
        int64_t i = n < k ? n++ : k - 1;
        while (i > 0 && key[e] > top[i - 1]) top[i] = top[i - 1], c[i] = c[i - 1], --i;
        top[i] = key[e], c[i] = e;
      }
      float* w = wk.data() + t * k;
      if (mode == ROUTE_SOFTMAX && renormalize) {  // softmax over the chosen logits
        float m = lt[c[0]], sum = 0.0f;
        for (int64_t j = 1; j < k; ++j) m = std::max(m, lt[c[j]]);
        for (int64_t j = 0; j < k; ++j) sum += (w[j] = std::exp(lt[c[j]] - m));
        for (int64_t j = 0; j < k; ++j) w[j] /= sum;
      } else if (mode == ROUTE_SOFTMAX) {  // the chosen experts' probabilities over all E
        float m = lt[0], sum = 0.0f;
        for (int64_t e = 1; e < E; ++e) m = std::max(m, lt[e]);
        for (int64_t e = 0; e < E; ++e) sum += std::exp(lt[e] - m);
        for (int64_t j = 0; j < k; ++j) w[j] = std::exp(lt[c[j]] - m) / sum;
      } else if (renormalize) {  // s_k / sum_j s_j as the softmax of log s: no 0/0
        double ls[64];  // k <= 64: checked above
        double m = -INFINITY, sum = 0.0;
        for (int64_t j = 0; j < k; ++j) m = std::max(m, ls[j] = logsigmoid(lt[c[j]]));
        for (int64_t j = 0; j < k; ++j) sum += (ls[j] = std::exp(ls[j] - m));
        for (int64_t j = 0; j < k; ++j) w[j] = static_cast<float>(ls[j] / sum);
      } else {
        for (int64_t j = 0; j < k; ++j) w[j] = 1.0f / (1.0f + std::exp(-lt[c[j]]));
      }
      if (scale != 1.0)
        for (int64_t j = 0; j < k; ++j) w[j] *= static_cast<float>(scale);
    }
  });
  return sorted_by_expert(chosen.data(), T * k, k, E, wk.data(),
                          torch::empty({T * k}, torch::dtype(at::kFloat)));
}

// A router's top-k choice [T, K] (expert ids, and their weights in any float dtype) sorted
// by expert, stable in token order: (token_S, weight_S in the weights' dtype, counts_E,
// offsets_E int32), as the torch ops of moekit.integrations.hf.experts.dispatch_from_topk
// compute it. Their ten ops took ~160 us per MoE layer of a patched transformers model at
// batch 1 (each ~5-15 us right after the layer's experts streamed their weights), this call
// with its Python ~40; a step of the fine OLMoE-class model patched and quantized to int4,
// 9.47 -> 8.91 ms, fp32 28.1 -> 27.7 ms (Ice Lake VM, 2 threads, 6 alternated pairs,
// 2026-12-07).
std::vector<torch::Tensor> sort_topk(const torch::Tensor& experts_TK,
                                     const torch::Tensor& weights_TK, int64_t E) {
  TORCH_CHECK(experts_TK.dim() == 2 && experts_TK.scalar_type() == at::kLong,
              "experts_TK must be int64 [T, K], got ", experts_TK.scalar_type(), " ",
              experts_TK.sizes());
  TORCH_CHECK(weights_TK.sizes() == experts_TK.sizes() && weights_TK.is_floating_point(),
              "weights_TK must be a float tensor of experts_TK's shape ", experts_TK.sizes(),
              ", got ", weights_TK.scalar_type(), " ", weights_TK.sizes());
  TORCH_CHECK(E >= 1, "E=", E, " is not allowed: at least one expert");
  const auto ids = experts_TK.contiguous();
  const auto w = weights_TK.contiguous();
  const int64_t S = ids.numel(), K = ids.size(1);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK(id[s] >= 0 && id[s] < E, "experts_TK[", s / K, ", ", s % K, "]=", id[s],
                " is not allowed: expert ids are 0..", E - 1);
  return sorted_by_expert(id, S, K, E, w.data_ptr(), torch::empty({S}, w.options()));
}

// An MoE layer's experts on a router's top-k choice in one call: sort_topk, gate_up with
// the activation `act` (not NONE: that one runs in Python between the two), down_combine;
// x in fp32 or bf16, the output in x's dtype. What decode.decode_rows does after
// dispatch_from_topk, the same calls in the same order, so the same bits: for a patched
// transformers experts module at batch 1, where each torch op between the kernels costs
// ~5-15 us after the weights stream.
torch::Tensor topk_experts(const torch::Tensor& x_TD, const torch::Tensor& experts_TK,
                           const torch::Tensor& weights_TK, int64_t E,
                           const torch::Tensor& in_data,
                           const c10::optional<torch::Tensor>& in_scales,
                           const c10::optional<torch::Tensor>& in_zeros, int64_t in_bits,
                           int64_t in_group, const c10::optional<torch::Tensor>& b_in,
                           int64_t act, double limit, double alpha, const torch::Tensor& out_data,
                           const c10::optional<torch::Tensor>& out_scales,
                           const c10::optional<torch::Tensor>& out_zeros, int64_t out_bits,
                           int64_t out_group, const c10::optional<torch::Tensor>& b_out) {
  TORCH_CHECK(act > NONE && act <= GELU, "act=", act, " is not allowed here: 1..5 (an "
              "activation the kernels run; 0 runs in Python between gate_up and down_combine)");
  TORCH_CHECK(x_TD.dim() == 2 && (x_TD.scalar_type() == at::kFloat ||
                                  x_TD.scalar_type() == at::kBFloat16),
              "x_TD must be float32 or bfloat16 [T, D], got ", x_TD.scalar_type(), " ",
              x_TD.sizes());
  TORCH_CHECK(experts_TK.dim() == 2 && experts_TK.size(0) == x_TD.size(0), "experts_TK ",
              experts_TK.sizes(), " must hold one row per row of x_TD ", x_TD.sizes());
  const auto f32 = [](const torch::Tensor& t) { return as_contiguous(t, at::kFloat); };
  const auto f32o = [&](const c10::optional<torch::Tensor>& t) {
    return t ? c10::optional<torch::Tensor>(f32(*t)) : c10::nullopt;
  };
  const auto x = f32(x_TD);
  const auto r = sort_topk(experts_TK, weights_TK, E);
  const auto h = gate_up(x, r[0], r[3], in_data, in_scales, in_zeros, in_bits, in_group,
                         f32o(b_in), act, limit, alpha);
  auto out = torch::empty_like(x);
  down_combine(h, r[0], f32(r[1]), r[3], out_data, out_scales, out_zeros, out_bits, out_group,
               f32o(b_out), out);
  return x_TD.scalar_type() == at::kFloat ? out : out.to(x_TD.scalar_type());
}

// out = x * cos + [x2 | x1] * [-sin | sin] (apply_rotary's half-split layout) for one head
// of Dh into O (floats: q, or the new key before store_row puts it in the cache's form)
template <typename T, typename O>
INLINE void rotate(const T* x, const float* c, const float* s, int64_t Dh, O* out) {
  const int64_t half = Dh / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = load(x[i]), x2 = load(x[i + half]);
    store(out + i, x1 * c[i] + x2 * s[i]);
    store(out + i + half, x2 * c[i + half] + x1 * s[i + half]);
  }
}


// A KV cache row (one slot of one key/value head): Dh values of C; for int8 then a float
// scale in its 4 bytes (unaligned): value = scale * q.
template <typename C>
constexpr int64_t row_extra() {
  return std::is_same_v<C, int8_t> ? 4 : 0;
}

template <typename C>
INLINE float row_scale(const C* row, int64_t Dh) {
  if constexpr (std::is_same_v<C, int8_t>) {
    float scale;
    std::memcpy(&scale, row + Dh, sizeof scale);
    return scale;
  } else {
    return 1.0f;
  }
}

// x (Dh floats) as the cache holds it: fp32 as is, bf16 rounded to nearest even, int8
// quantized by the row's largest magnitude: scale = amax / 127, q = x / scale rounded half
// to even (a zero row: scale 0, q 0; a NaN: scale NaN), as quantize_kv in
// moekit/models/kv_cache.py quantizes a prefill's rows.
template <typename C>
INLINE void store_row(C* dst, const float* x, int64_t Dh) {
  if constexpr (std::is_same_v<C, int8_t>) {
    float amax = 0.0f;
    for (int64_t i = 0; i < Dh; ++i) {
      const float a = std::fabs(x[i]);
      amax = a > amax || std::isnan(a) ? a : amax;
      if (std::isnan(amax)) break;
    }
    const float scale = amax / 127.0f, div = scale > 0.0f ? scale : 1.0f;
    for (int64_t i = 0; i < Dh; ++i) {
      const float v = std::nearbyint(x[i] / div);
      dst[i] = static_cast<int8_t>(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v == v ? v : 0.0f);
    }
    std::memcpy(dst + Dh, &scale, sizeof scale);
  } else {
    for (int64_t i = 0; i < Dh; ++i) store(dst + i, x[i]);
  }
}

// p[t] = exp(p[t] - m) for t < n: exp16 / exp8 where the CPU has them (within 1 ulp of
// std::exp), else std::exp.
AVX512 void exp_shift_avx512(float* p, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 k = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
    _mm512_mask_storeu_ps(p + t, k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + t), mv)));
  }
}

AVX2 void exp_shift_avx2(float* p, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) _mm256_storeu_ps(p + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), mv)));
  for (; t < n; ++t) p[t] = std::exp(p[t] - m);
}

void exp_shift(float* p, int64_t n, float m) {
  if (CPU_ISA == Isa::Avx512) return exp_shift_avx512(p, n, m);
  if (CPU_ISA == Isa::Avx2) return exp_shift_avx2(p, n, m);
  for (int64_t t = 0; t < n; ++t) p[t] = std::exp(p[t] - m);
}

// Query heads [g0, g1) of one key/value head of one row, for attend_one: rotary on each q
// and on the new key, attention over the valid slots 0..P, every key and value row read
// once for the heads together (a head's sums in the order one head alone takes them, so
// the result does not depend on how a group is split). The new key and value (slot P) are
// taken from the projection (kt: the rotated key, rounded to T as the cache holds it), so
// the items of one group read nothing another item writes; the item of g0 = 0 stores slot
// P. T: fp32 or bf16 (qkv, cache and output; bf16 rounds the cache writes and the output
// once, q stays fp32). Built three times (ATTEND_HEADS below): through target_clones for
// any head size, for AVX-512 where the head size is a multiple of 16 (dot4<16>) and for
// AVX2 where it is a multiple of 8 (dot4<8>). Buffers:
// q and o n Dh floats, p n (P + 1), kt Dh; sq / out the first head's, Dh apart.
//
// Keys 4 at a time (4 independent sums: one dot product at a time was a chain of
// dependent FMAs, ~19 G FMA/s on 2 threads at 4,000 positions), values 4 rows per pass
// over the output (each output element's sum still in slot order), the exponentials
// vectorized (exp_shift). Prefetched: the keys ATT_AHEAD slots ahead; the values along
// with the keys (value rows t..t + 3 at key slot t) where a head's values are at most
// ATT_ALONG_BYTES, else ATT_AHEAD slots ahead in their own pass. A step's caches are cold
// (the experts' weights streamed through in between), and with the values read along the
// keys the item reads two streams at once. The fine model at batch 16 after 32-token
// prompts, the engine's steps, attend_one ms a step before / after (Intel VM, processes
// alternating): fp32 cache 1.83-1.84 / 1.45-1.49, bf16 0.84-0.85 / 0.73-0.75. Cold
// layers (a /tmp loop, 8 heads of 128, 4 layers), at 2,000 fp32 slots (1 MB of values a
// head) the values along the keys measured 1.06x slower than in their own pass, at 960
// 1.08x faster.
#ifndef MOEKIT_ATT_AHEAD
#define MOEKIT_ATT_AHEAD 16
#endif
constexpr int64_t ATT_AHEAD = MOEKIT_ATT_AHEAD, ATT_ALONG_BYTES = 512 << 10;

typedef float F16 __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef float F8 __attribute__((vector_size(32)));
typedef uint16_t U16x8 __attribute__((vector_size(16)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));

// 16 / 8 int8 values as floats, for load_lanes (inlined once it is inside the AVX-512 /
// AVX2 callers, attend_heads_*_i8_v16 / _v8)
AVX512 inline void i8_floats16(const int8_t* p, float* out) {
  _mm512_storeu_ps(out, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
}
AVX2 inline void i8_floats8(const int8_t* p, float* out) {
  _mm256_storeu_ps(out, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
}

// 16 (F16) or 8 (F8) inputs as floats into v (bf16: shifted into the high half; int8:
// converted); v by reference, as a vector return would change the ABI outside AVX code
template <typename T, typename V>
INLINE void load_lanes(const T* p, V& v) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<T, int8_t>) {
    // by intrinsics (vpmovsxbd, vcvtdq2ps): GCC built int8 vectors' conversions from
    // scalar moves and inserts, 2x the time of bf16's loads
    float f[sizeof v / sizeof(float)];
    if constexpr (std::is_same_v<V, F16>) i8_floats16(p, f);
    else i8_floats8(p, f);
    std::memcpy(&v, f, sizeof v);
  } else if constexpr (std::is_same_v<V, F16>) {
    U16x16 h;
    std::memcpy(&h, p, sizeof h);
    v = reinterpret_cast<F16>(__builtin_convertvector(h, U32x16) << 16);
  } else {
    U16x8 h;
    std::memcpy(&h, p, sizeof h);
    v = reinterpret_cast<F8>(__builtin_convertvector(h, U32x8) << 16);
  }
}

// a[u] += q * k_u over Dh (a multiple of the vector's L lanes), lane by lane
template <typename V, int L, typename T>
INLINE void lane_sums(const float* q, const T* k0, const T* k1, const T* k2, const T* k3,
                      int64_t Dh, V (&a)[4]) {
  for (int64_t i = 0; i < Dh; i += L) {
    V x, y0, y1, y2, y3;
    load_lanes(q + i, x), load_lanes(k0 + i, y0), load_lanes(k1 + i, y1);
    load_lanes(k2 + i, y2), load_lanes(k3 + i, y3);
    a[0] += x * y0, a[1] += x * y1, a[2] += x * y2, a[3] += x * y3;
  }
}

// d[u] = q . k_u for 4 key rows. W = 16 (Dh a multiple of 16, compiled for AVX-512 by
// attend_heads_*_v16) or 8 (AVX2, _v8): W-lane sums, the four reduced together by one
// shuffle tree (the loop below reduced each through the stack: ~1/5 of attend_one's
// samples at 4,000 slots); W = 0: any Dh, whatever the compiler makes of the loop.
template <int W, typename T>
INLINE void dot4(const float* q, const T* k0, const T* k1, const T* k2, const T* k3,
                 int64_t Dh, float* d) {
  if constexpr (W == 16) {
    F16 a[4] = {};
    lane_sums<F16, 16>(q, k0, k1, k2, k3, Dh, a);
    // [a0 | a1] by halves, [a2 | a3], then quarters, pairs and neighbours
    const F16 s01 = __builtin_shufflevector(a[0], a[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19,
                                            20, 21, 22, 23) +
                    __builtin_shufflevector(a[0], a[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26,
                                            27, 28, 29, 30, 31);
    const F16 s23 = __builtin_shufflevector(a[2], a[3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19,
                                            20, 21, 22, 23) +
                    __builtin_shufflevector(a[2], a[3], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26,
                                            27, 28, 29, 30, 31);
    const F16 t = __builtin_shufflevector(s01, s23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24,
                                          25, 26, 27) +
                  __builtin_shufflevector(s01, s23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23,
                                          28, 29, 30, 31);
    const F16 u = t + __builtin_shufflevector(t, t, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15,
                                              12, 13);
    const F16 w = u + __builtin_shufflevector(u, u, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12,
                                              15, 14);
    d[0] = w[0], d[1] = w[4], d[2] = w[8], d[3] = w[12];
  } else if constexpr (W == 8) {  // the same on 8 lanes (AVX2)
    F8 a[4] = {};
    lane_sums<F8, 8>(q, k0, k1, k2, k3, Dh, a);
    const F8 s01 = __builtin_shufflevector(a[0], a[1], 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(a[0], a[1], 4, 5, 6, 7, 12, 13, 14, 15);
    const F8 s23 = __builtin_shufflevector(a[2], a[3], 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(a[2], a[3], 4, 5, 6, 7, 12, 13, 14, 15);
    const F8 t = __builtin_shufflevector(s01, s23, 0, 1, 4, 5, 8, 9, 12, 13) +
                 __builtin_shufflevector(s01, s23, 2, 3, 6, 7, 10, 11, 14, 15);
    const F8 u = t + __builtin_shufflevector(t, t, 1, 0, 3, 2, 5, 4, 7, 6);
    d[0] = u[0], d[1] = u[2], d[2] = u[4], d[3] = u[6];
  } else {
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t i = 0; i < Dh; ++i) {
      const float x = q[i];
      a0 += x * load(k0[i]);
      a1 += x * load(k1[i]);
      a2 += x * load(k2[i]);
      a3 += x * load(k3[i]);
    }
    d[0] = a0, d[1] = a1, d[2] = a2, d[3] = a3;
  }
}

template <int W, typename A, typename C>
INLINE void attend_heads(const A* sq, const A* sk, const A* sv, const float* c, const float* s,
                         C* kr, C* vr, int64_t P, int64_t Dh, const bool* ok, float scale,
                         int64_t g0, int64_t g1, float* q, float* p, float* o, float* f, C* kt,
                         C* vt, A* out) {
  const int64_t n = g1 - g0, S = P + 1, rs = Dh + row_extra<C>();  // rs: a cache row's elements
  for (int64_t g = 0; g < n; ++g) rotate(sq + g * Dh, c, s, Dh, q + g * Dh);
  rotate(sk, c, s, Dh, f);
  store_row(kt, f, Dh);
  for (int64_t i = 0; i < Dh; ++i) f[i] = load(sv[i]);
  store_row(vt, f, Dh);
  if (g0 == 0) {
    std::copy(kt, kt + rs, kr + P * rs);
    std::copy(vt, vt + rs, vr + P * rs);
  }
  const auto key = [&](int64_t t) { return t < P ? kr + t * rs : kt; };
  const auto value = [&](int64_t t) { return t < P ? vr + t * rs : vt; };
  // rows t..t + 3 of the cache into L1, a line at a time, where they are all before slot
  // P (4 rows read side by side: Zen 4's prefetchers left cold fp32 keys at ~0.6x the
  // speed of one row at a time)
  const auto fetch = [&](const C* base, int64_t t) {
    if (t + 4 > P) return;
    const char* b = reinterpret_cast<const char*>(base + t * rs);
    for (int64_t l = 0; l < 4 * rs * static_cast<int64_t>(sizeof(C)); l += 64)
      __builtin_prefetch(b + l, 0, 3);
  };
  const bool along = P * rs * static_cast<int64_t>(sizeof(C)) <= ATT_ALONG_BYTES;
  // scores (masked slots -inf: no weight in the max, zeroed after the exponential)
  for (int64_t t = 0; t < S; t += 4) {
    float d[4];
    const int64_t w = std::min<int64_t>(4, S - t);
    fetch(kr, t + ATT_AHEAD);
    if (along) fetch(vr, t);
    for (int64_t g = 0; g < n; ++g) {
      const float* qg = q + g * Dh;
      if (w == 4) {
        dot4<W>(qg, key(t), key(t + 1), key(t + 2), key(t + 3), Dh, d);
      } else {  // the last 1-3 slots: the same sums, the missing keys repeated
        dot4<W>(qg, key(t), key(t + std::min<int64_t>(1, w - 1)),
             key(t + std::min<int64_t>(2, w - 1)), key(t + w - 1), Dh, d);
      }
      for (int64_t u = 0; u < w; ++u)
        p[g * S + t + u] = ok && !ok[t + u] ? -INFINITY
                                            : d[u] * row_scale(key(t + u), Dh) * scale;
    }
  }
  for (int64_t g = 0; g < n; ++g) {
    float* pg = p + g * S;
    float m = -INFINITY;
    for (int64_t t = 0; t < S; ++t) m = std::max(m, pg[t]);
    exp_shift(pg, S, m);
    float sum = 0.0f;
    if (ok) {
      for (int64_t t = 0; t < S; ++t) pg[t] = ok[t] ? pg[t] : 0.0f;
    }
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < S; ++t) sum += pg[t];
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t t = 0; t < S; ++t) pg[t] *= inv;
  }
  std::fill(o, o + n * Dh, 0.0f);
  for (int64_t t = 0; t < S;) {
    if (t + 4 <= S && (!ok || (ok[t] && ok[t + 1] && ok[t + 2] && ok[t + 3]))) {
      if (!along) fetch(vr, t + ATT_AHEAD);
      const C *v0 = value(t), *v1 = value(t + 1), *v2 = value(t + 2), *v3 = value(t + 3);
      const float s0 = row_scale(v0, Dh), s1 = row_scale(v1, Dh), s2 = row_scale(v2, Dh),
                  s3 = row_scale(v3, Dh);
      for (int64_t g = 0; g < n; ++g) {
        const float* pg = p + g * S + t;
        const float a0 = pg[0] * s0, a1 = pg[1] * s1, a2 = pg[2] * s2, a3 = pg[3] * s3;
        float* og = o + g * Dh;
#pragma omp simd
        for (int64_t i = 0; i < Dh; ++i)
          og[i] = (((og[i] + a0 * load(v0[i])) + a1 * load(v1[i])) + a2 * load(v2[i])) +
                  a3 * load(v3[i]);
      }
      t += 4;
      continue;
    }
    if (!ok || ok[t]) {
      const C* v = value(t);
      const float sv_t = row_scale(v, Dh);
      for (int64_t g = 0; g < n; ++g) {
        const float a = p[g * S + t] * sv_t;
        float* og = o + g * Dh;
#pragma omp simd
        for (int64_t i = 0; i < Dh; ++i) og[i] += a * load(v[i]);
      }
    }
    ++t;
  }
  for (int64_t i = 0; i < n * Dh; ++i) store(out + i, o[i]);
}

// attend_heads for activations / cache fp32 / fp32, bf16 / bf16, fp32 / bf16, fp32 / int8
// and bf16 / int8: any head size (_any, through target_clones), a multiple of 16 on AVX-512
// (_v16) or of 8 on AVX2 (_v8).
#define ATTEND_HEADS(NAME, ATTR, W, A, C)                                                     \
  ATTR void NAME(const A* sq, const A* sk, const A* sv, const float* c, const float* s, C* kr, \
                 C* vr, int64_t P, int64_t Dh, const bool* ok, float scale, int64_t g0,        \
                 int64_t g1, float* q, float* p, float* o, float* f, C* kt, C* vt, A* out) {   \
    attend_heads<W>(sq, sk, sv, c, s, kr, vr, P, Dh, ok, scale, g0, g1, q, p, o, f, kt, vt,   \
                    out);                                                                      \
  }
#define ATTEND_HEADS_ISAS(NAME, A, C)    \
  ATTEND_HEADS(NAME##_any, CLONES, 0, A, C) \
  ATTEND_HEADS(NAME##_v16, AVX512, 16, A, C) \
  ATTEND_HEADS(NAME##_v8, AVX2, 8, A, C)
ATTEND_HEADS_ISAS(attend_heads_f32, float, float)
ATTEND_HEADS_ISAS(attend_heads_bf16, uint16_t, uint16_t)
ATTEND_HEADS_ISAS(attend_heads_f32_bf16, float, uint16_t)
ATTEND_HEADS_ISAS(attend_heads_f32_i8, float, int8_t)
ATTEND_HEADS_ISAS(attend_heads_bf16_i8, uint16_t, int8_t)
#undef ATTEND_HEADS_ISAS
#undef ATTEND_HEADS

// A tensor's fp32 or bf16 data as the kernels' element type.
template <typename T>
T* elems(const torch::Tensor& t) {
  if constexpr (std::is_same_v<T, float>) return t.data_ptr<float>();
  else if constexpr (std::is_same_v<T, int8_t>) return t.data_ptr<int8_t>();
  else return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

// fp32 or bf16, 2-D (or `dim`-D), contiguous, on the CPU; the dtype must be `like`'s.
void check_f32_or_bf16(const torch::Tensor& t, const char* name, int64_t dim,
                       const torch::Tensor& like) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " is ", t.scalar_type(),
              ": it must match the other inputs' ", like.scalar_type());
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), name, " must be a contiguous ", dim,
              "-D tensor, got ", t.sizes());
}

// One new token per row: rotary on q and k, k and v written to the cache at slot P,
// attention of q over the row's slots [0, P] (those ``valid_BM`` marks, when given),
// fp32 or bf16 (qkv and output alike; the cache of their dtype, bf16 under fp32, or int8
// under either: the new key and value rounded / quantized as it holds them, from the fp32
// rotation; the scores and sums fp32, a bf16 output rounded once).
// An int8 cache is [B, J, M, Dh + 4]: a slot's Dh values, then their float scale
// (store_row). qkv_RC [R, (H + 2 J) Dh] as the qkv
// projection gives it ([q | k | v]: H query heads, then J key and J value heads of Dh,
// rotary in the half-split layout; query head h reads key/value head h / (H / J));
// cos_XDh / sin_XDh [1 or R, Dh] from ``rotary_table`` (R rows: per-row positions);
// k_BJMD / v_BJMD the layer's cache. Returns y_RC [R, H Dh], the heads side by side (what
// the out projection reads).
torch::Tensor attend_one(const torch::Tensor& qkv_RC, const torch::Tensor& cos_XDh,
                         const torch::Tensor& sin_XDh, torch::Tensor& k_BJMD,
                         torch::Tensor& v_BJMD, int64_t P,
                         const c10::optional<torch::Tensor>& valid_BM) {
  check_f32_or_bf16(qkv_RC, "qkv_RC", 2, qkv_RC);
  check_f32(cos_XDh, "cos_XDh", 2);
  check_f32(sin_XDh, "sin_XDh", 2);
  // the cache: the activations' dtype, bf16 under fp32 activations, or int8 under either
  const bool f32 = qkv_RC.scalar_type() == at::kFloat;
  const bool mixed = f32 && k_BJMD.scalar_type() == at::kBFloat16;
  const bool i8 = k_BJMD.scalar_type() == at::kChar;  // under fp32 or bf16 activations
  if (i8) {
    for (const auto* t : {&k_BJMD, &v_BJMD}) {
      check_cpu(*t, "k_BJMD / v_BJMD");
      TORCH_CHECK(t->scalar_type() == at::kChar && t->dim() == 4 && t->is_contiguous() &&
                      t->size(3) > 4,
                  "an int8 cache must be contiguous int8 [B, J, M, Dh + 4], got ",
                  t->scalar_type(), " ", t->sizes());
    }
  } else {
    check_f32_or_bf16(k_BJMD, "k_BJMD", 4, mixed ? k_BJMD : qkv_RC);
    check_f32_or_bf16(v_BJMD, "v_BJMD", 4, k_BJMD);
  }
  const int64_t R = qkv_RC.size(0), width = qkv_RC.size(1), B = k_BJMD.size(0),
                J = k_BJMD.size(1), M = k_BJMD.size(2), Dh = k_BJMD.size(3) - (i8 ? 4 : 0);
  const int64_t rs = k_BJMD.size(3);  // a cache row's elements
  TORCH_CHECK(v_BJMD.sizes() == k_BJMD.sizes(), "v_BJMD must match k_BJMD ", k_BJMD.sizes());
  const int64_t H = Dh > 0 ? width / Dh - 2 * J : 0;
  TORCH_CHECK(Dh > 0 && Dh % 2 == 0 && width % Dh == 0 && H >= J && H % J == 0 && R <= B,
              "qkv_RC ", qkv_RC.sizes(), " does not fit a cache of ", k_BJMD.sizes(),
              ": its width must be (H + 2 J) Dh with J key/value heads dividing H");
  TORCH_CHECK(P >= 0 && P < M, "P=", P, " is not allowed: the cache holds ", M, " slots");
  const int64_t X = cos_XDh.size(0);
  TORCH_CHECK((X == 1 || X == R) && cos_XDh.size(1) == Dh && sin_XDh.sizes() == cos_XDh.sizes(),
              "cos_XDh / sin_XDh must be [1 or ", R, ", ", Dh, "], got ", cos_XDh.sizes());
  const bool* valid = nullptr;
  torch::Tensor vb;
  if (valid_BM) {
    vb = valid_BM->contiguous();
    TORCH_CHECK(vb.scalar_type() == at::kBool && vb.dim() == 2 && vb.size(0) >= R &&
                vb.size(1) == M, "valid_BM must be bool [>= ", R, ", ", M, "], got ",
                vb.scalar_type(), " ", vb.sizes());
    valid = vb.data_ptr<bool>();
  }
  auto y = torch::empty({R, H * Dh}, qkv_RC.options());
  const float* cs = cos_XDh.data_ptr<float>();
  const float* sn = sin_XDh.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  // Items of a row's key/value head and `per` of its G query heads, which read its keys
  // and values once together, 4 slots per pass (attend_heads); a group is split only where
  // there are fewer groups than threads. Every cache takes them, whatever J. A bf16 or int8
  // cache's one-row loop (the kernel of J = H before) was bound by its instructions, not
  // its bytes (8 rows x 8 heads of 128 at 960 slots, one layer, 2 threads, Intel VM: bf16
  // 0.93-1.00 -> 0.91-0.94 ms, int8 1.28-1.35 -> 0.59 ms); fp32 kept it, as it read cold
  // caches 1.2-1.3x faster on the Zen 4 VM, until the values read along the keys (above)
  // made the passes faster here at 52 to 2,000 slots.
  const int64_t G = H / J, groups = R * J;
  const auto up = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t per = up(G, std::min(G, up(at::get_num_threads(), groups)));
  const int64_t parts = up(G, per);
  auto run = [&](auto* qkv, auto* kc, auto* vc, auto* out, auto heads) {
    using A = std::remove_pointer_t<decltype(qkv)>;
    using C = std::remove_pointer_t<decltype(kc)>;
    at::parallel_for(0, groups * parts, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> q(per * Dh), p(per * (P + 1)), o(per * Dh), f(Dh);
      std::vector<C> kt(rs), vt(rs);
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t r = item / (J * parts), j = item / parts % J, g0 = item % parts * per;
        const int64_t h = j * G + g0;  // the item's first query head
        const A* row = qkv + r * width;
        const float *c = cs + (X == 1 ? 0 : r) * Dh, *s = sn + (X == 1 ? 0 : r) * Dh;
        C *kr = kc + ((r * J + j) * M) * rs, *vr = vc + ((r * J + j) * M) * rs;
        const bool* ok = valid ? valid + r * M : nullptr;
        heads(row + h * Dh, row + (H + j) * Dh, row + (H + J + j) * Dh, c, s, kr, vr, P, Dh,
              ok, scale, g0, std::min(G, g0 + per), q.data(), p.data(), o.data(), f.data(),
              kt.data(), vt.data(), out + r * H * Dh + h * Dh);
      }
    });
  };
  const int lanes = CPU_ISA == Isa::Avx512 && Dh % 16 == 0 ? 16
                    : CPU_ISA != Isa::Generic && Dh % 8 == 0 ? 8 : 0;
  // attend_heads' build for the head size: NAME_v16 / _v8 / _any
#define BY_LANES(NAME) (lanes == 16 ? NAME##_v16 : lanes == 8 ? NAME##_v8 : NAME##_any)
  if (i8 && f32)
    run(elems<float>(qkv_RC), elems<int8_t>(k_BJMD), elems<int8_t>(v_BJMD), elems<float>(y),
        BY_LANES(attend_heads_f32_i8));
  else if (i8)
    run(elems<uint16_t>(qkv_RC), elems<int8_t>(k_BJMD), elems<int8_t>(v_BJMD),
        elems<uint16_t>(y), BY_LANES(attend_heads_bf16_i8));
  else if (mixed)
    run(elems<float>(qkv_RC), elems<uint16_t>(k_BJMD), elems<uint16_t>(v_BJMD),
        elems<float>(y), BY_LANES(attend_heads_f32_bf16));
  else if (qkv_RC.scalar_type() == at::kFloat)
    run(elems<float>(qkv_RC), elems<float>(k_BJMD), elems<float>(v_BJMD), elems<float>(y),
        BY_LANES(attend_heads_f32));
  else
    run(elems<uint16_t>(qkv_RC), elems<uint16_t>(k_BJMD), elems<uint16_t>(v_BJMD),
        elems<uint16_t>(y), BY_LANES(attend_heads_bf16));
#undef BY_LANES
  return y;
}

// One token per row of logits_RV (fp32 or bf16), drawn as sample_next's torch ops draw it
// (moekit/models/generate.py): in float64, the row's largest logit taken off and the rest
// divided by the temperature; top_k: scores under the k-th largest masked; top_p: in
// descending order, a score masked once the probability mass before it reaches top_p;
// softmax; then torch.multinomial's draw of one sample, argmax(p / q) with q ~ Exp(1) from
// one exponential_ over [R, V] float64 (the same generator stream: torch's CPU
// multinomial draws one sample so since 1.x; test_engine's sampler test would catch a
// change). A row loop of V, no host syncs (sample_next's torch ops took 27-90 us a call
// at V = 256). top_k <= 0 or >= V: no top-k; top_p >= 1: no top-p. Ties in the top-p
// order go by index (a stable sort).
torch::Tensor sample_rows(const torch::Tensor& logits_RV, double temperature, int64_t top_k,
                          double top_p, c10::optional<at::Generator> generator) {
  check_cpu(logits_RV, "logits_RV");
  TORCH_CHECK((logits_RV.scalar_type() == at::kFloat ||
               logits_RV.scalar_type() == at::kBFloat16) && logits_RV.dim() == 2,
              "logits_RV must be a float32 or bfloat16 [R, V] tensor, got ",
              logits_RV.scalar_type(), " ", logits_RV.sizes());
  TORCH_CHECK(temperature > 0 && top_p > 0, "temperature=", temperature, " / top_p=", top_p,
              " is not allowed: both must be > 0");
  const auto logits = logits_RV.contiguous();
  const int64_t R = logits.size(0), V = logits.size(1);
  auto q = torch::empty({R, V}, torch::dtype(at::kDouble));
  q.exponential_(1, generator);  // torch.multinomial's draw
  auto ids = torch::empty({R}, torch::dtype(at::kLong));
  std::vector<double> sc(V), e(V);
  std::vector<int64_t> order(V);
  for (int64_t r = 0; r < R; ++r) {
    if (logits.scalar_type() == at::kFloat)
      for (int64_t v = 0; v < V; ++v) sc[v] = logits.data_ptr<float>()[r * V + v];
    else
      for (int64_t v = 0; v < V; ++v)
        sc[v] = load(reinterpret_cast<const uint16_t*>(logits.data_ptr())[r * V + v]);
    double m = -INFINITY;
    for (int64_t v = 0; v < V; ++v)  // NaN wins, as torch's amax
      m = std::isnan(sc[v]) || std::isnan(m) ? NAN : std::max(m, sc[v]);
    TORCH_CHECK_VALUE(std::isfinite(m), "logits_BV=rows with a largest logit of ", m,
                      " is not allowed: each row's largest logit must be finite");
    for (int64_t v = 0; v < V; ++v) sc[v] = (sc[v] - m) / temperature;
    if (top_k > 0 && top_k < V) {
      e = sc;
      std::nth_element(e.begin(), e.begin() + (top_k - 1), e.end(), std::greater<double>());
      const double kth = e[top_k - 1];
      for (int64_t v = 0; v < V; ++v)
        if (sc[v] < kth) sc[v] = -INFINITY;
    }
    if (top_p < 1) {
      for (int64_t v = 0; v < V; ++v) order[v] = v;
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return sc[a] > sc[b]; });
      const double top = sc[order[0]];
      double sum = 0;
      for (int64_t i = 0; i < V; ++i) sum += (e[i] = std::exp(sc[order[i]] - top));
      double cum = 0;
      for (int64_t i = 0; i < V; ++i) {
        const double p = e[i] / sum;
        cum += p;
        if (cum - p >= top_p) sc[order[i]] = -INFINITY;
      }
    }
    double top = -INFINITY, sum = 0;
    for (int64_t v = 0; v < V; ++v) top = std::max(top, sc[v]);
    for (int64_t v = 0; v < V; ++v) sum += (e[v] = std::exp(sc[v] - top));
    const double* qr = q.data_ptr<double>() + r * V;
    int64_t best = 0;
    double best_ratio = -INFINITY;
    for (int64_t v = 0; v < V; ++v) {
      const double ratio = e[v] / sum / qr[v];
      if (ratio > best_ratio) best_ratio = ratio, best = v;
    }
    ids.data_ptr<int64_t>()[r] = best;
  }
  return ids;
}

// The residual add and the next RMSNorm in one pass: (x + y, rms_norm(x + y) * w), each
// [R, D] fp32 or bf16 (x, y and w alike), new tensors; the norm as torch's:
// s * rsqrt(mean(s^2) + eps) * w. bf16 rounds the sum once (as torch's bf16 add) and
// normalizes the rounded sum in fp32 (as moekit's RMSNorm does for bf16), rounding h once.
// Without y (ADD false): the norm of x alone, s not written.
template <bool ADD, typename T>
void add_rms_norm_rows(const T* x, const T* y, const T* w, T* s, T* h, int64_t R, int64_t D,
                       float eps) {
  std::vector<float> sr(D);
  for (int64_t r = 0; r < R; ++r) {
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < D; ++i) {
      if constexpr (ADD) {
        store(s + r * D + i, load(x[r * D + i]) + load(y[r * D + i]));
        sr[i] = load(s[r * D + i]);
      } else {
        sr[i] = load(x[r * D + i]);
      }
      sq += sr[i] * sr[i];
    }
    const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) store(h + r * D + i, sr[i] * rstd * load(w[i]));
  }
}

// Both entries below check their inputs, then run add_rms_norm_rows<ADD> on x's type.
template <bool ADD>
void norm_rows(const torch::Tensor& x_RD, const torch::Tensor* y_RD, const torch::Tensor& w_D,
               double eps, torch::Tensor* sum, torch::Tensor& norm) {
  check_f32_or_bf16(x_RD, "x_RD", 2, x_RD);
  if (y_RD) check_f32_or_bf16(*y_RD, "y_RD", 2, x_RD);
  check_f32_or_bf16(w_D, "w_D", 1, x_RD);
  const int64_t R = x_RD.size(0), D = x_RD.size(1);
  if (y_RD) {
    TORCH_CHECK(y_RD->sizes() == x_RD.sizes() && w_D.size(0) == D, "y_RD ", y_RD->sizes(),
                " and w_D ", w_D.sizes(), " must match x_RD ", x_RD.sizes());
  } else {  // rms_norm: there is no y to name
    TORCH_CHECK(w_D.size(0) == D, "w_D ", w_D.sizes(), " must match x_RD ", x_RD.sizes());
  }
  norm = torch::empty_like(x_RD);
  if (sum) *sum = torch::empty_like(x_RD);
  const float e = static_cast<float>(eps);
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    add_rms_norm_rows<ADD>(elems<T>(x_RD), y_RD ? elems<T>(*y_RD) : nullptr, elems<T>(w_D),
                           sum ? elems<T>(*sum) : nullptr, elems<T>(norm), R, D, e);
  };
  if (x_RD.scalar_type() == at::kFloat) run(static_cast<float*>(nullptr));
  else run(static_cast<uint16_t*>(nullptr));
}

std::vector<torch::Tensor> add_rms_norm(const torch::Tensor& x_RD, const torch::Tensor& y_RD,
                                        const torch::Tensor& w_D, double eps) {
  torch::Tensor sum, norm;
  norm_rows<true>(x_RD, &y_RD, w_D, eps, &sum, norm);
  return {sum, norm};
}

// rms_norm(x) * w, as add_rms_norm's second result with y = 0 (a step's first norm).
torch::Tensor rms_norm(const torch::Tensor& x_RD, const torch::Tensor& w_D, double eps) {
  torch::Tensor norm;
  norm_rows<false>(x_RD, nullptr, w_D, eps, nullptr, norm);
  return norm;
}

// The q / k RMSNorms of a decode step (LMConfig.qk_norm), in place on the qkv
// projection's rows qkv_RC [R, C] = [q | k | v]: q = columns [0, q_width) in pieces of
// q_w's size (Dh: each head, Qwen3-MoE; q_width: all heads, OLMoE), k = the next k_width
// columns in pieces of k_w's size, each piece as rms_norm normalizes a row (fp32, or bf16
// normalized in fp32 and rounded once, as moekit's RMSNorm). Before attend_one's rotary.
void qk_norm_(torch::Tensor& qkv_RC, const torch::Tensor& q_w, const torch::Tensor& k_w,
              double eps, int64_t q_width, int64_t k_width) {
  check_f32_or_bf16(qkv_RC, "qkv_RC", 2, qkv_RC);
  check_f32_or_bf16(q_w, "q_w", 1, qkv_RC);
  check_f32_or_bf16(k_w, "k_w", 1, qkv_RC);
  const int64_t R = qkv_RC.size(0), C = qkv_RC.size(1), nq = q_w.size(0), nk = k_w.size(0);
  TORCH_CHECK(q_width > 0 && k_width > 0 && q_width + k_width <= C && nq > 0 && nk > 0 &&
              q_width % nq == 0 && k_width % nk == 0,
              "q_width=", q_width, " / k_width=", k_width, " do not fit qkv_RC ",
              qkv_RC.sizes(), " in pieces of q_w ", q_w.sizes(), " / k_w ", k_w.sizes());
  const float e = static_cast<float>(eps);
  auto run = [&](auto* x) {
    using T = std::remove_pointer_t<decltype(x)>;
    const T *wq = elems<T>(q_w), *wk = elems<T>(k_w);
    for (int64_t r = 0; r < R; ++r) {
      T* q = x + r * C;  // in place: each piece is read whole before it is written
      add_rms_norm_rows<false>(q, static_cast<const T*>(nullptr), wq, static_cast<T*>(nullptr),
                               q, q_width / nq, nq, e);
      add_rms_norm_rows<false>(q + q_width, static_cast<const T*>(nullptr), wk,
                               static_cast<T*>(nullptr), q + q_width, k_width / nk, nk, e);
    }
  };
  if (qkv_RC.scalar_type() == at::kFloat) run(elems<float>(qkv_RC));
  else run(elems<uint16_t>(qkv_RC));
}

// -- a whole decode step in one call ----------------------------------------------------

// cpu_experts.cpp's moekit_q_linear_a8 (the prefill GEMM on int8 rows), whose address
// DecodeStep::set_a8_gemm receives: out [M, N] = rounded x [M, K] @ an int8 / int4 [N, K]
// weight (x, ldx, M, K, data, N, bits, scales, zeros, group, out, ldo); moekit_q_linear
// (set_q_gemm) the same on the float rows, for weight-only int8 / int4.
using A8Gemm = void (*)(const float*, int64_t, int64_t, int64_t, const uint8_t*, int64_t,
                        int64_t, const float*, const float*, int64_t, float*, int64_t);

// One projection's kernel arguments (decode._wargs in Python): float weights as data
// alone, quantized ones with their scales, zero points, format code and group.
struct Proj {
  torch::Tensor data;
  c10::optional<torch::Tensor> scales, zeros;
  int64_t bits = 0, group = 0;
  A8Gemm gemm = nullptr;  // quantized weights: the prefill GEMM from gemm_rows rows
  int64_t gemm_rows = 0, gemm_k = 0;  // (gemm_k: the weight's input width K)

  explicit Proj(const py::tuple& t)
      : data(t[0].cast<torch::Tensor>()),
        scales(t[1].cast<c10::optional<torch::Tensor>>()),
        zeros(t[2].cast<c10::optional<torch::Tensor>>()),
        bits(t[3].cast<int64_t>()),
        group(t[4].cast<int64_t>()) {}

  // The GEMM for this projection's rows from `rows` on, where its weight is quantized with
  // int8 activations (88 / 48; a8 true) or weight-only (8 / 4; a8 false) and lies in the
  // GEMM's layout ([1, N, K(/2)] contiguous, K % 32 == 0).
  void set_gemm(A8Gemm fn, int64_t rows, bool a8) {
    const bool int4 = bits == (a8 ? 48 : 4);
    if (!(int4 || bits == (a8 ? 88 : 8)) || data.dim() != 3) return;
    const int64_t K = data.size(2) * (int4 ? 2 : 1);
    // (int4 with int8 rows: the GEMM's blocks of 2048 inputs hold whole groups; on float
    // rows: groups of a multiple of 32 that divide K, as q_matrix checks)
    const bool groups = !int4 || (group > 0 && (a8 ? 2048 % group == 0
                                                   : group % 32 == 0 && K % group == 0));
    if (data.size(0) == 1 && data.is_contiguous() && K % 32 == 0 && groups && scales &&
        scales->is_contiguous() && (!int4 || (zeros && zeros->is_contiguous())))
      gemm = fn, gemm_rows = rows, gemm_k = K;
  }

  // x_RK @ w for every row (rows_R / ends_1: all rows on the one "expert")
  torch::Tensor apply(const torch::Tensor& x, const torch::Tensor& rows_R,
                      const torch::Tensor& ends_1) const {
    if (gemm && x.size(0) >= gemm_rows && x.scalar_type() == at::kFloat && x.stride(1) == 1 &&
        x.size(1) == gemm_k) {
      const int64_t R = x.size(0), N = data.size(1);
      auto y = torch::empty({R, N}, x.options());
      gemm(x.data_ptr<float>(), x.stride(0), R, gemm_k,
           static_cast<const uint8_t*>(data.data_ptr()), N, bits == 88 || bits == 8 ? 8 : 4,
           scales->data_ptr<float>(), zeros ? zeros->data_ptr<float>() : nullptr, group,
           y.data_ptr<float>(), N);
      return y;
    }
    return gate_up(x, rows_R, ends_1, data, scales, zeros, bits, group, c10::nullopt, 0, 0.0,
                   1.0);
  }
};

struct StepLayer {
  Proj qkv, out, router, w_in, w_out;
  torch::Tensor ffn_norm, next_norm;
  double ffn_eps, next_eps;
  int64_t top_k, mode;
  bool renormalize;
  double scale;
  c10::optional<torch::Tensor> bias_E, b_in, b_out;
  int64_t act;
  double limit, alpha;
  // the q / k norms (qk_norm_'s arguments), absent where the model has none
  c10::optional<torch::Tensor> q_norm, k_norm;
  double qk_eps = 0.0;
  int64_t q_width = 0, k_width = 0;
  c10::optional<torch::Tensor> qkv_bias;  // in the activations' dtype, added after qkv
  // shared experts (decode.shared_rows' arguments), absent where the layer has none:
  // [1, D, G] / [1, F, D] weights, biases [1, G] / [1, D], the gate [D, 1] fp32
  c10::optional<Proj> sh_in, sh_out;
  c10::optional<torch::Tensor> sh_b_in, sh_b_out, sh_gate;
};

// A decode step of a model whose every part takes the kernels (DecodePlan in
// moekit/inference/decode_plan.py builds it once per generation): the embedding, the
// first norm, each layer's calls and the LM head, as MoETransformer.infer makes them on
// the kernel path, in the same order with the same arguments, so the logits are bitwise
// the same (tests/test_decode_plan.py). One call instead of ~40 Python lines, each of
// which ran with cold caches after the weights' stream. Activations are the model's
// dtype (float32 or bfloat16); the weight kernels read float32 rows and their outputs
// are rounded to bfloat16 as the modules round them.
class DecodeStep {
 public:
  // layers: one dict per layer (DecodePlan's _Layer fields by name); head: the LM
  // head's projection; embed: ("float", table [V, D]) or ("quant", data, scales, zeros,
  // bits, group) of a quantized [V, D] table (QuantizedEmbedding's, expert 0); first_norm:
  // (weight, eps) of the first block's attention norm.
  DecodeStep(const py::list& layers, const py::tuple& head, const py::tuple& embed,
             const py::tuple& first_norm)
      : head_(head),
        quant_embed_(embed[0].cast<std::string>() == "quant"),
        table_(embed[1].cast<torch::Tensor>()),
        first_norm_(first_norm[0].cast<torch::Tensor>()),
        first_eps_(first_norm[1].cast<double>()) {
    if (quant_embed_) {
      table_scales_ = embed[2].cast<torch::Tensor>();
      table_zeros_ = embed[3].cast<c10::optional<torch::Tensor>>();
      table_bits_ = embed[4].cast<int64_t>();
      table_group_ = embed[5].cast<int64_t>();
      table_w_ = weights(table_.unsqueeze(0), table_scales_.unsqueeze(0),
                         table_zeros_ ? c10::optional<torch::Tensor>(table_zeros_->unsqueeze(0))
                                      : c10::nullopt,
                         table_bits_, table_group_);
    }
    for (const auto& item : layers) {
      const auto d = item.cast<py::dict>();
      const auto at = [&](const char* key) { return py::object(d[key]); };
      const auto tuple = [&](const char* key) { return at(key).cast<py::tuple>(); };
      const auto ffn = tuple("ffn_norm"), nxt = tuple("next_norm");
      const auto route = tuple("route"), act = tuple("act");
      layers_.push_back(StepLayer{
          Proj(tuple("qkv")), Proj(tuple("out")), Proj(tuple("router")), Proj(tuple("w_in")),
          Proj(tuple("w_out")), ffn[0].cast<torch::Tensor>(), nxt[0].cast<torch::Tensor>(),
          ffn[1].cast<double>(), nxt[1].cast<double>(), route[0].cast<int64_t>(),
          route[1].cast<int64_t>(), route[2].cast<bool>(), route[3].cast<double>(),
          route[4].cast<c10::optional<torch::Tensor>>(),
          at("b_in").cast<c10::optional<torch::Tensor>>(),
          at("b_out").cast<c10::optional<torch::Tensor>>(), act[0].cast<int64_t>(),
          act[1].cast<double>(), act[2].cast<double>()});
      if (!at("qk_norm").is_none()) {  // (q_w, k_w, eps, q_width, k_width)
        const auto qk = tuple("qk_norm");
        StepLayer& ly = layers_.back();
        ly.q_norm = qk[0].cast<torch::Tensor>(), ly.k_norm = qk[1].cast<torch::Tensor>();
        ly.qk_eps = qk[2].cast<double>();
        ly.q_width = qk[3].cast<int64_t>(), ly.k_width = qk[4].cast<int64_t>();
      }
      StepLayer& ly = layers_.back();
      ly.qkv_bias = at("qkv_bias").cast<c10::optional<torch::Tensor>>();
      if (!at("shared").is_none()) {  // (w_in, w_out, b_in, b_out, gate)
        const auto sh = tuple("shared");
        ly.sh_in.emplace(sh[0].cast<py::tuple>()), ly.sh_out.emplace(sh[1].cast<py::tuple>());
        ly.sh_b_in = sh[2].cast<c10::optional<torch::Tensor>>();
        ly.sh_b_out = sh[3].cast<c10::optional<torch::Tensor>>();
        ly.sh_gate = sh[4].cast<c10::optional<torch::Tensor>>();
      }
    }
  }

  // Logits [R, V] of one new token per row (ids_R), in the first norm's dtype, writing
  // each layer's k and v at slot P of k_L[i] / v_L[i].
  torch::Tensor run(const torch::Tensor& ids_R, const torch::Tensor& rows_R,
                    const torch::Tensor& ends_1, const torch::Tensor& cos_XDh,
                    const torch::Tensor& sin_XDh, std::vector<torch::Tensor> k_L,
                    std::vector<torch::Tensor> v_L, int64_t P,
                    const c10::optional<torch::Tensor>& valid_BM) const {
    const auto n = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(static_cast<int64_t>(k_L.size()) == n && static_cast<int64_t>(v_L.size()) == n,
                "k_L / v_L must hold one tensor per layer (", n, "), got ", k_L.size(), " / ",
                v_L.size());
    TORCH_CHECK(ids_R.dim() == 1 && ids_R.scalar_type() == at::kLong,
                "ids_R must be int64 [R], got ", ids_R.scalar_type(), " ", ids_R.sizes());
    const auto dt = first_norm_.scalar_type();
    const auto in = [&](const torch::Tensor& t) {
      return t.scalar_type() == at::kFloat ? t : timed(CONVERT, [&] { return t.to(at::kFloat); });
    };
    const auto out = [&](const torch::Tensor& t) {
      return dt == at::kFloat ? t : timed(CONVERT, [&] { return t.to(dt); });
    };
    // the embedding and the first norm as the modules compute them (nn.Embedding /
    // QuantizedEmbedding, transformer.first_norm)
    torch::Tensor x = timed(EMBED, [&] {
      if (!quant_embed_) return at::embedding(table_, ids_R);
      // the table's rows as dequantize makes them (QuantizedEmbedding's lookup)
      const int64_t R = ids_R.size(0), V = table_w_.N;
      auto rows = torch::empty({R, table_w_.K}, first_norm_.options());
      const auto ids = ids_R.contiguous();
      const int64_t* id = ids.data_ptr<int64_t>();
      for (int64_t r = 0; r < R; ++r) {
        TORCH_CHECK(id[r] >= 0 && id[r] < V, "ids_R[", r, "]=", id[r], " is not allowed: ",
                    "the embedding table holds ", V, " rows");
        dequantize_row(table_w_, id[r], rows, r);
      }
      return rows;
    });
    torch::Tensor h = timed(NORMS, [&] { return rms_norm(x, first_norm_, first_eps_); });
    for (int64_t i = 0; i < n; ++i) {
      const StepLayer& ly = layers_[i];
      const auto hq = in(h);
      auto qkv = out(timed(PROJ, [&] { return ly.qkv.apply(hq, rows_R, ends_1); }));
      if (ly.qkv_bias) qkv = timed(PROJ, [&] { return qkv + *ly.qkv_bias; });
      const auto y = timed(ATTEND, [&] {
        if (ly.q_norm) qk_norm_(qkv, *ly.q_norm, *ly.k_norm, ly.qk_eps, ly.q_width, ly.k_width);
        return attend_one(qkv, cos_XDh, sin_XDh, k_L[i], v_L[i], P, valid_BM);
      });
      const auto y32 = in(y);
      const auto a = out(timed(PROJ, [&] { return ly.out.apply(y32, rows_R, ends_1); }));
      auto s = timed(NORMS, [&] { return add_rms_norm(x, a, ly.ffn_norm, ly.ffn_eps); });
      const auto h32 = in(s[1]);
      x = s[0];
      const auto r = timed(ROUTE, [&] {
        const auto logits = ly.router.apply(h32, rows_R, ends_1);
        return route_sort(logits, ly.top_k, ly.mode, ly.renormalize, ly.scale, ly.bias_E);
      });
      const auto g = timed(EXPERTS_IN, [&] {
        return gate_up(h32, r[0], r[3], ly.w_in.data, ly.w_in.scales, ly.w_in.zeros,
                       ly.w_in.bits, ly.w_in.group, ly.b_in, ly.act, ly.limit, ly.alpha);
      });
      const auto o = timed(EXPERTS_OUT, [&] {
        auto o = torch::empty_like(h32);
        down_combine(g, r[0], r[1], r[3], ly.w_out.data, ly.w_out.scales, ly.w_out.zeros,
                     ly.w_out.bits, ly.w_out.group, ly.b_out, o);
        return o;
      });
      auto o_dt = out(o);
      if (ly.sh_in) {  // decode.shared_rows, then added as MoE.infer adds it
        const auto sh = timed(SHARED, [&] {
          const int64_t R = h32.size(0);
          const auto g = gate_up(h32, rows_R, ends_1, ly.sh_in->data, ly.sh_in->scales,
                                 ly.sh_in->zeros, ly.sh_in->bits, ly.sh_in->group, ly.sh_b_in,
                                 ly.act, ly.limit, ly.alpha);
          const auto w = ly.sh_gate ? at::sigmoid(at::mm(h32, *ly.sh_gate)).view(-1)
                                    : torch::ones({R}, h32.options());
          auto o = torch::empty_like(h32);
          down_combine(g, rows_R, w, ends_1, ly.sh_out->data, ly.sh_out->scales,
                       ly.sh_out->zeros, ly.sh_out->bits, ly.sh_out->group, ly.sh_b_out, o);
          return o;
        });
        o_dt = o_dt + out(sh);
      }
      s = timed(NORMS, [&] { return add_rms_norm(x, o_dt, ly.next_norm, ly.next_eps); });
      x = s[0];
      h = s[1];
    }
    const auto h_last = in(h);
    return out(timed(HEAD, [&] { return head_.apply(h_last, rows_R, ends_1); }));
  }

  // Projections with int8 activations (attention and LM head) of `rows8` rows or more
  // (int8 weights; int4: `rows4`) run the prefill GEMM at `address` (cpu_experts'
  // q_linear_a8_address()).
  void set_a8_gemm(int64_t address, int64_t rows8, int64_t rows4) {
    set_gemms(address, rows8, rows4, true);
  }

  // Weight-only int8 (int4) projections (attention and LM head) of `rows8` (`rows4`) rows
  // or more run the prefill GEMM on their float rows at `address` (cpu_experts'
  // q_linear_address()).
  void set_q_gemm(int64_t address, int64_t rows8, int64_t rows4) {
    set_gemms(address, rows8, rows4, false);
  }

  // The generation's KV cache (k_L / v_L as run takes them), the model's rotary tables
  // cos_MDh / sin_MDh (fp32, a row per position) and the cache's left padding pad_B
  // (int64) and valid slots valid_BM (bool [B, M]), bound for the steps that follow
  // (DecodePlan binds its cache once): step() then takes only the new ids and the slot.
  // The cache updates these tensors in place (reset, keep_rows), so they stay bound.
  void bind(std::vector<torch::Tensor> k_L, std::vector<torch::Tensor> v_L,
            const torch::Tensor& cos_MDh, const torch::Tensor& sin_MDh,
            const torch::Tensor& pad_B, const torch::Tensor& valid_BM) {
    const auto n = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(static_cast<int64_t>(k_L.size()) == n && static_cast<int64_t>(v_L.size()) == n,
                "k_L / v_L must hold one tensor per layer (", n, "), got ", k_L.size(), " / ",
                v_L.size());
    check_f32(cos_MDh, "cos_MDh", 2);
    TORCH_CHECK(sin_MDh.sizes() == cos_MDh.sizes(), "sin_MDh must match cos_MDh ",
                cos_MDh.sizes(), ", got ", sin_MDh.sizes());
    check_f32(sin_MDh, "sin_MDh", 2);
    check_cpu(pad_B, "pad_B");
    TORCH_CHECK(pad_B.scalar_type() == at::kLong && pad_B.dim() == 1 && pad_B.is_contiguous(),
                "pad_B must be a contiguous int64 [B] tensor, got ", pad_B.scalar_type(), " ",
                pad_B.sizes());
    TORCH_CHECK(valid_BM.scalar_type() == at::kBool && valid_BM.dim() == 2 &&
                valid_BM.size(0) == pad_B.size(0),
                "valid_BM must be bool [", pad_B.size(0), ", M], got ", valid_BM.scalar_type(),
                " ", valid_BM.sizes());
    k_L_ = std::move(k_L), v_L_ = std::move(v_L);
    cos_ = cos_MDh, sin_ = sin_MDh, pad_ = pad_B, valid_ = valid_BM;
  }

  // run() for the first R rows of the bound cache at slot P: each row's rotary row of
  // the tables (row r at position max(P - pad_B[r], 0) where the rows are padded, P
  // otherwise, as StaticKVCache.begin computes it). Returns the logits [R, V]; with
  // greedy each row's argmax [R] int64 instead (as torch's: the first largest, a NaN
  // first); with sample = (temperature, top_k, top_p, generator) the token sample_rows
  // draws from the logits (as sample_next draws it).
  using Sample = std::tuple<double, int64_t, double, c10::optional<at::Generator>>;
  torch::Tensor step(const torch::Tensor& ids_R, int64_t P, bool padded, bool greedy,
                     const c10::optional<Sample>& sample) const {
    TORCH_CHECK(cos_.defined(), "step needs a bound cache: call bind first");
    const int64_t B = pad_.size(0), M = cos_.size(0), Dh = cos_.size(1);
    TORCH_CHECK(ids_R.dim() == 1 && ids_R.size(0) >= 1 && ids_R.size(0) <= B,
                "ids_R must be [R] with 1 <= R <= ", B, " (the bound cache's rows), got ",
                ids_R.sizes());
    const int64_t R = ids_R.size(0);
    // slot P is position P unless padded: then row r's position P - pad_B[r] (a shared
    // cache's slots may outnumber the positions: Batcher)
    TORCH_CHECK(P >= 0 && (padded || P < M), "P=", P, " is not allowed: the rotary tables "
                "hold ", M, " positions");
    auto [cos, sin] = timed(ROTARY, [&] {
      const auto row = [&](const torch::Tensor& t) {  // row P as a view (narrow: ~5 us cold)
        return torch::from_blob(t.data_ptr<float>() + P * Dh, {1, Dh}, t.options());
      };
      if (!padded) return std::make_pair(row(cos_), row(sin_));
      auto c = torch::empty({R, Dh}, cos_.options()), s = torch::empty({R, Dh}, cos_.options());
      const int64_t* pad = pad_.data_ptr<int64_t>();
      for (int64_t r = 0; r < R; ++r) {
        const int64_t pos = std::max<int64_t>(P - pad[r], 0);
        TORCH_CHECK(pos < M, "row ", r, "'s position ", pos, " is not allowed: the rotary "
                    "tables hold ", M, " positions");
        std::memcpy(c.data_ptr<float>() + r * Dh, cos_.data_ptr<float>() + pos * Dh,
                    Dh * sizeof(float));
        std::memcpy(s.data_ptr<float>() + r * Dh, sin_.data_ptr<float>() + pos * Dh,
                    Dh * sizeof(float));
      }
      return std::make_pair(c, s);
    });
    const auto& [rows_R, ends_1] = all_rows(R);
    auto logits = run(ids_R, rows_R, ends_1, cos, sin, k_L_, v_L_, P,
                      padded ? c10::optional<torch::Tensor>(valid_) : c10::nullopt);
    if (sample)
      return timed(PICK, [&] {
        return sample_rows(logits, std::get<0>(*sample), std::get<1>(*sample),
                           std::get<2>(*sample), std::get<3>(*sample));
      });
    if (!greedy) return logits;
    return timed(PICK, [&] {
      auto ids = torch::empty({R}, torch::dtype(at::kLong));
      const int64_t V = logits.size(1);
      if (logits.scalar_type() == at::kFloat)
        argmax_rows(elems<float>(logits), R, V, ids.data_ptr<int64_t>());
      else
        argmax_rows(elems<uint16_t>(logits), R, V, ids.data_ptr<int64_t>());
      return ids;
    });
  }

  // Wall time of each part of the steps run while timing is on, in ns by part (bench_decode
  // --step-calls); set_timing(true) starts again from zero, set_timing(false) keeps the
  // sums for times(). Off, a part costs a branch.
  void set_timing(bool on) {
    if (on && !timing_) spent_.fill(0);
    timing_ = on;
  }

  std::vector<std::pair<std::string, int64_t>> times() const {
    std::vector<std::pair<std::string, int64_t>> t;
    for (int p = 0; p < NPARTS; ++p) t.emplace_back(PART_NAMES[p], spent_[p]);
    return t;
  }

 private:
  void set_gemms(int64_t address, int64_t rows8, int64_t rows4, bool a8) {
    const auto fn = reinterpret_cast<A8Gemm>(static_cast<uintptr_t>(address));
    const auto set = [&](Proj& p) {
      p.set_gemm(fn, p.bits == 88 || p.bits == 8 ? rows8 : rows4, a8);
    };
    for (auto& ly : layers_) set(ly.qkv), set(ly.out);
    set(head_);
  }

  enum Part {
    EMBED, NORMS, PROJ, ATTEND, ROUTE, EXPERTS_IN, EXPERTS_OUT, SHARED, HEAD, CONVERT, ROTARY,
    PICK, NPARTS
  };
  static constexpr const char* PART_NAMES[NPARTS] = {
      "embedding", "norms", "attention projections", "attend_one",
      "router + route_sort", "experts gate_up", "experts down_combine", "shared experts",
      "LM head",
      "bf16 conversions", "rotary rows", "argmax / sampling"};

  // (arange(R), [R] as int32): every row on the one "expert" of a dense projection, made
  // once per R (decode._all_rows' pair); the kernels only read them.
  const std::pair<torch::Tensor, torch::Tensor>& all_rows(int64_t R) const {
    auto& entry = all_rows_[R];
    if (!entry.first.defined())
      entry = {torch::arange(R, torch::dtype(at::kLong)),
               torch::full({1}, R, torch::dtype(at::kInt))};
    return entry;
  }

  template <typename T>
  static void argmax_rows(const T* logits, int64_t R, int64_t V, int64_t* out) {
    for (int64_t r = 0; r < R; ++r) {
      const T* row = logits + r * V;
      int64_t best = 0;
      float top = load(row[0]);
      for (int64_t v = 1; v < V && !std::isnan(top); ++v) {
        const float x = load(row[v]);
        if (x > top || std::isnan(x)) top = x, best = v;
      }
      out[r] = best;
    }
  }

  template <typename F>
  auto timed(Part part, const F& f) const -> decltype(f()) {
    if (!timing_) return f();
    const auto t0 = std::chrono::steady_clock::now();
    auto result = f();
    spent_[part] += std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now() - t0).count();
    return result;
  }

  bool timing_ = false;
  mutable std::array<int64_t, NPARTS> spent_{};
  std::vector<StepLayer> layers_;
  Proj head_;
  bool quant_embed_;
  torch::Tensor table_, first_norm_;
  double first_eps_;
  torch::Tensor table_scales_;
  c10::optional<torch::Tensor> table_zeros_;
  int64_t table_bits_ = 0, table_group_ = 0;
  Weights table_w_{};  // the quantized table as one expert of V rows (its tensors above)
  // bind()'s tensors
  std::vector<torch::Tensor> k_L_, v_L_;
  torch::Tensor cos_, sin_, pad_, valid_;
  mutable std::map<int64_t, std::pair<torch::Tensor, torch::Tensor>> all_rows_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels' entries run without the GIL: a Python thread (a server's, the expert
  // cache's prefetch) runs while they read the weights.
  m.def("gate_up", &gate_up, "act(x[token] @ w_in[e] + b_in[e]) for the touched experts' rows",
        py::call_guard<py::gil_scoped_release>());
  m.def("down_combine", &down_combine,
        "out[token] = sum of weight * (a @ w_out[e] + b_out[e]) over the touched experts",
        py::call_guard<py::gil_scoped_release>());
  m.def("dequantize", &dequantize, "float32 [e1-e0, N, K] weights of a quantized tensor",
        py::arg("data"), py::arg("scales"), py::arg("zeros"), py::arg("bits"), py::arg("group"),
        py::arg("e0"), py::arg("e1"), py::arg("out") = py::none());
  m.def("gate_up_list", &gate_up_list, "gate_up with w_in as a list of per-expert tensors",
        py::call_guard<py::gil_scoped_release>());
  m.def("down_combine_list", &down_combine_list,
        "down_combine with w_out as a list of per-expert tensors (optionally accumulating)",
        py::call_guard<py::gil_scoped_release>());
  m.def("route_sort", &route_sort,
        "top-k routing and the sort by expert: (token_S, weight_S, counts_E, offsets_E)");
  m.def("sort_topk", &sort_topk,
        "a top-k choice sorted by expert: (token_S, weight_S, counts_E, offsets_E)");
  m.def("topk_experts", &topk_experts,
        "an MoE layer's experts on a top-k choice: sort_topk, gate_up, down_combine",
        py::call_guard<py::gil_scoped_release>());
  m.def("attend_one", &attend_one,
        "rotary, KV cache write and attention for one new token per row");
  m.def("add_rms_norm", &add_rms_norm, "(x + y, rms_norm(x + y) * w) in one pass");
  m.def("sample_rows", &sample_rows,
        "a token per row: temperature, top-k, top-p and torch.multinomial's draw",
        py::arg("logits_RV"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
        py::arg("generator"));
  m.def("rms_norm", &rms_norm, "rms_norm(x) * w");
  m.def("qk_norm_", &qk_norm_, "the q / k RMSNorms of a decode step, in place on qkv");
  py::class_<DecodeStep>(m, "DecodeStep", "a decode step, embedding to LM head, in one call")
      .def(py::init<const py::list&, const py::tuple&, const py::tuple&, const py::tuple&>(),
           py::arg("layers"), py::arg("head"), py::arg("embed"), py::arg("first_norm"))
      .def("run", &DecodeStep::run, py::call_guard<py::gil_scoped_release>())
      .def("bind", &DecodeStep::bind, "the generation's KV cache and rotary tables for step()",
           py::arg("k_L"), py::arg("v_L"), py::arg("cos_MDh"), py::arg("sin_MDh"),
           py::arg("pad_B"), py::arg("valid_BM"))
      .def("step", &DecodeStep::step,
           "run() on the bound cache at slot P: logits [R, V], or the argmax ids with greedy, "
           "or sampled ids with sample = (temperature, top_k, top_p, generator)",
           py::arg("ids_R"), py::arg("P"), py::arg("padded"), py::arg("greedy"),
           py::arg("sample") = py::none(), py::call_guard<py::gil_scoped_release>())
      .def("set_a8_gemm", &DecodeStep::set_a8_gemm,
           "int8-activation projections of at least rows8 (int8) / rows4 (int4) rows on the "
           "GEMM at `address`", py::arg("address"), py::arg("rows8"), py::arg("rows4"))
      .def("set_q_gemm", &DecodeStep::set_q_gemm,
           "weight-only int8 / int4 projections of at least rows8 / rows4 rows on the GEMM "
           "at `address` (float rows)", py::arg("address"), py::arg("rows8"), py::arg("rows4"))
      .def("set_timing", &DecodeStep::set_timing,
           "time the parts of the next runs (on: from 0; off: keeps the sums)")
      .def("times", &DecodeStep::times, "(part, ns) summed over the timed runs");
  m.def("isa", &isa, "the kernels' path on this CPU: avx512, avx2 or generic");
  m.def("amx", [] { return amx_on.load() && amx_here(); },
        "whether bf16 NK projections of up to 16 rows run on AMX tiles (the CPU has AMX-BF16, "
        "Linux allows it, and set_amx left it on)");
  m.def("amx_int8", [] { return amx_on.load() && amx_int8_here(); },
        "whether int8 / int4 weight-only NK projections and experts of 2 to 32 rows run on "
        "AMX-INT8 tiles (the CPU has AMX-INT8, Linux allows it, and set_amx left it on)");
  m.def("amx_int8_min_rows", [](int64_t bits) {
          TORCH_CHECK(bits == 8 || bits == 4, "bits=", bits, " must be 8 or 4");
          return bits == 8 ? AMX_I8_MIN_ROWS : A4_MIN_ROWS;
        },
        "the fewest rows an int8 (bits 8) or int4 (bits 4) weight-only projection runs on "
        "AMX-INT8 with");
  m.def("int4_o16_vnni", [] { return CPU_VNNI; },
        "whether int4 experts with int8 activations in the 16-output order (bits 49) run on "
        "AVX-512 VNNI here (elsewhere plain loops read that order)");
  m.def("int8_terms", [] { return t8_on.load() && CPU_VNNI; },
        "whether int8 weight-only NK experts run on the rows' four int8 terms with VNNI "
        "(i8t_tile: AVX-512 VNNI, and set_int8_terms left it on)");
  m.def("set_int8_terms", [](bool on) { t8_on.store(on); },
        "run int8 weight-only NK experts on the rows' int8 terms where it applies (default "
        "on; off: the FMA kernel)");
  m.def("cpu_vendor", [] { return std::string(cpu_vendor()); },
        "this CPU's vendor: intel, amd or other (thresholds measured on one vendor's CPUs)");
  m.def("int8_terms_max_rows", [] { return t8_rows.load(); },
        "the most rows an int8 weight-only expert may have to run on int8 terms (the larger "
        "ones of a call run the FMA kernel; this CPU's default: 1 on Intel, no limit on AMD)");
  m.def("set_int8_terms_max_rows", [](int64_t rows) {
          TORCH_CHECK(rows >= 1 || rows == -1, "rows=", rows, " is not allowed: it must be >= 1, "
                      "or -1 for this CPU's default");
          t8_rows.store(rows == -1 ? t8_default_rows() : rows);
        },
        "set int8_terms_max_rows (-1: this CPU's default)");
  m.def("int8_terms_runs", [] { return t8_calls.load(); },
        "how many gate_up / down_combine calls have run their rows on int8 terms");
  m.def("set_amx", [](bool on) { amx_on.store(on); },
        "use AMX for bf16, int8 and int4 NK projections where it applies (default on)");
  m.def("amx_runs", [] { return amx_calls.load(); },
        "how many projections have run on AMX tiles in this process");
}
