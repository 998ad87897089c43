// What an int4 dot product costs on AVX-512 with each kind of activation: the
// microbenchmark behind the README's "int4 >= 5x fp32" finding (bench_int4_dot.py
// builds and runs it). One weight row per dot product, moekit's int4 layout
// (moekit.quant: per 32-weight chunk 16 bytes, byte j holding weight j in its low
// nibble and weight j + 16 in its high one; an affine scale s and zero z per group of g
// weights, w = s q + z), against one activation row x, for every row of a weight pool.
//
// Variants (the activation's form, and the instruction that multiplies):
//   0 table  fp32 x; the group's 16 values s q + z in a register, looked up by the
//            nibbles (vpermps) and multiplied by FMA: moekit's weight-only kernel (now
//            where K is not a multiple of 128)
//   1 bf16   x rounded to bf16; nibbles become bf16(128 + q) by OR-ing in an exponent,
//            vdpbf16ps multiplies 32 pairs; the 128 is taken off per group at the end
//   2 bf16x2 x as a pair of bf16 (hi + lo, 16 significant bits), two vdpbf16ps
//   3 int16  x rounded to int16 per 32-input chunk (a scale each), nibbles widened to
//            words by shifts and masks, vpdpwssd multiplies 32 pairs
//   4 int8   x rounded to int8 per chunk, vpdpbusd multiplies 64 pairs: moekit's W4A8
//   5 amx    x as bf16 hi + lo (as 2) in two columns of an AMX B tile; 16 weight rows
//            at a time as an A tile of bf16(128 + q) (a per-word shift and an OR per
//            32 weights), tdpbf16ps; g >= 64 (an A row must lie in one group)
//   6 mant   fp32 x (exact); each nibble shifted into the top of an fp32 mantissa and
//            OR-ed with the exponent of 1.0 (one shift, one vpternlogd): 1 + q / 16,
//            an FMA per 16 weights, no shuffles; the 1 is taken off per group at the end
//   7 blocks fp32 x (exact), prescaled by 2^-4j in nibble order; nibble j of each dword
//            by an AND with 0xF << 4j and an unsigned convert (q 2^4j exactly; nibble 0 a
//            vpermps from 0..15), an FMA per 16 weights; 4 weight rows per pass share
//            each activation load: moekit's int4 kernel since 2026-12-05 (i4f_rows),
//            with its software prefetch 4 KiB ahead (the only variant with one: without
//            it, 4 rows read in 64-byte steps ran 0.64x table from a 256 MiB pool)
//
// Every variant but the table computes a block of 128 weights (64 bytes) per step:
// lane l of its 16 int32 / fp32 sums covers chunk l / 4 of the block, scaled per lane
// by the chunk's group scale (and activation scale). Built with -march=native; the
// caller checks that the CPU has AVX-512 BF16 and VNNI.

#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct Row {  // one weight row: K / 2 bytes, K / g scales and zeros
  const uint8_t* q;
  const float* s;
  const float* z;
};

struct Shape {
  int64_t K, g;
  __m512i lane_group;  // lane -> group within a 128-weight block
  __mmask16 gmask;     // the block's groups (128 / g of them)
  int64_t gpb;         // groups per block
};

// acc + a[i] * b[i] over i < n, 16 lanes at a time (the zero points' term: a row's
// zeros against the activation's group sums)
inline __m512 dot_acc(const float* a, const float* b, int64_t n, __m512 acc) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return acc;
}

inline __m512 block_scales(const Shape& S, const float* s, int64_t b) {
  return _mm512_permutexvar_ps(S.lane_group, _mm512_maskz_loadu_ps(S.gmask, s + b * S.gpb));
}

// tot + block b's 16 integer sums, each lane scaled by its group's weight scale and its
// chunk's activation scale
inline __m512 add_block(__m512 tot, __m512i sums, const Shape& S, const Row& r, int64_t b,
                        const float* sx) {
  const __m512 scale = _mm512_mul_ps(block_scales(S, r.s, b), _mm512_loadu_ps(sx + 16 * b));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, tot);
}

#define NOINLINE __attribute__((noinline))  // one call per row, as moekit's kernels

// 0: table lookup, fp32 activations (as moekit's nk_rows_avx512 at one row)
NOINLINE float dot_table(const Row& r, const Shape& S, const float* x) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                 _mm512_setzero_ps()};
  for (int64_t g = 0; g < S.K / S.g; ++g) {
    const __m512 t = _mm512_fmadd_ps(iota, _mm512_set1_ps(r.s[g]), _mm512_set1_ps(r.z[g]));
    for (int64_t k = g * S.g; k < (g + 1) * S.g; k += 64) {
      for (int u = 0; u < 2; ++u) {
        const int64_t kk = k + 32 * u;
        const __m512i idx = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(r.q + kk / 2)));
        a[2 * u] = _mm512_fmadd_ps(_mm512_loadu_ps(x + kk), _mm512_permutexvar_ps(idx, t),
                                   a[2 * u]);
        a[2 * u + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + kk + 16),
                                       _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), t),
                                       a[2 * u + 1]);
      }
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
}

// Word-level view of a 64-byte block: word i holds bytes 2i, 2i + 1 of chunk c = i / 8,
// so its four nibbles (vectors v = 0..3 below) are weights 32c + b + {0, 16, 1, 17}
// (b = 2 (i % 8)); the activation records follow that order.

// 1, 2: bf16 activations (one or two parts), weights bf16(128 + q)
template <int PARTS>
NOINLINE float dot_bf16(const Row& r, const Shape& S, const uint16_t* xr, const float* gsum) {
  const __m512i m = _mm512_set1_epi16(0x000F), e = _mm512_set1_epi16(0x4300);
  __m512 tot = _mm512_setzero_ps();
  for (int64_t b = 0; b < S.K / 128; ++b) {
    const __m512i w = _mm512_loadu_si512(r.q + 64 * b);
    const __m512i n[4] = {_mm512_ternarylogic_epi32(w, m, e, 0xEA),  // (w & m) | e
                          _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), m, e, 0xEA),
                          _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), m, e, 0xEA),
                          _mm512_or_si512(_mm512_srli_epi16(w, 12), e)};
    const uint16_t* xb = xr + 128 * PARTS * b;
    __m512 s[4];
    for (int v = 0; v < 4; ++v) {
      s[v] = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)n[v],
                              (__m512bh)_mm512_loadu_si512(xb + 32 * v));
      if constexpr (PARTS == 2)
        s[v] = _mm512_dpbf16_ps(s[v], (__m512bh)n[v],
                                (__m512bh)_mm512_loadu_si512(xb + 128 + 32 * v));
    }
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]));
    tot = _mm512_fmadd_ps(sum, block_scales(S, r.s, b), tot);
  }
  // minus 128 s per group: gsum holds the group sums times -128 after the plain ones
  tot = dot_acc(r.s, gsum + S.K / S.g, S.K / S.g, dot_acc(r.z, gsum, S.K / S.g, tot));
  return _mm512_reduce_add_ps(tot);
}

// 3: int16 activations (scale per 32-input chunk), vpdpwssd
NOINLINE float dot_i16(const Row& r, const Shape& S, const int16_t* xr, const float* sx,
                       const float* gsum) {
  const __m512i m = _mm512_set1_epi16(0x000F);
  __m512 tot = _mm512_setzero_ps();
  for (int64_t b = 0; b < S.K / 128; ++b) {
    const __m512i w = _mm512_loadu_si512(r.q + 64 * b);
    const int16_t* xb = xr + 128 * b;
    __m512i i0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w, m),
                                     _mm512_loadu_si512(xb));
    __m512i i1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(),
                                     _mm512_and_si512(_mm512_srli_epi16(w, 4), m),
                                     _mm512_loadu_si512(xb + 32));
    i0 = _mm512_dpwssd_epi32(i0, _mm512_and_si512(_mm512_srli_epi16(w, 8), m),
                             _mm512_loadu_si512(xb + 64));
    i1 = _mm512_dpwssd_epi32(i1, _mm512_srli_epi16(w, 12), _mm512_loadu_si512(xb + 96));
    tot = add_block(tot, _mm512_add_epi32(i0, i1), S, r, b, sx);
  }
  return _mm512_reduce_add_ps(dot_acc(r.z, gsum, S.K / S.g, tot));
}

// 4: int8 activations, vpdpbusd (moekit's i4a8_rows_vnni at one row)
NOINLINE float dot_i8(const Row& r, const Shape& S, const int8_t* xr, const float* sx,
                      const float* gsum) {
  const __m512i m = _mm512_set1_epi8(15);
  __m512 tot = _mm512_setzero_ps();
  for (int64_t b = 0; b < S.K / 128; ++b) {
    const __m512i w = _mm512_loadu_si512(r.q + 64 * b);
    __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w, m),
                                    _mm512_loadu_si512(xr + 128 * b));
    i = _mm512_dpbusd_epi32(i, _mm512_and_si512(_mm512_srli_epi16(w, 4), m),
                            _mm512_loadu_si512(xr + 128 * b + 64));
    tot = add_block(tot, i, S, r, b, sx);
  }
  return _mm512_reduce_add_ps(dot_acc(r.z, gsum, S.K / S.g, tot));
}

// 6: fp32 activations, weights made fp32 (1 + q / 16) in place: lane l of a 64-byte
// block holds bytes 4l..4l + 3, its nibble v (bits 4v..4v + 3) is shifted to bits 19..22
// and OR-ed with 1.0's exponent. The activation record holds x in that (v, l) order; per
// group, 16 s (sum x (1 + q / 16)) - 16 s sum x + z sum x = s sum q x + z sum x.
template <int V>
inline __m512 mant(__m512i w) {
  constexpr int sh = 19 - 4 * V;
  const __m512i v = sh >= 0 ? _mm512_slli_epi32(w, sh) : _mm512_srli_epi32(w, -sh);
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(v, _mm512_set1_epi32(0x00780000),
                                                       _mm512_set1_epi32(0x3F800000), 0xEA));
}

NOINLINE float dot_mant(const Row& r, const Shape& S, const float* xr, const float* gsum) {
  __m512 tot = _mm512_setzero_ps();
  const __m512 sixteen = _mm512_set1_ps(16.0f);
  for (int64_t b = 0; b < S.K / 128; ++b) {
    const __m512i w = _mm512_loadu_si512(r.q + 64 * b);
    const float* xb = xr + 128 * b;
    __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(xb), mant<0>(w));
    __m512 a1 = _mm512_mul_ps(_mm512_loadu_ps(xb + 16), mant<1>(w));
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 32), mant<2>(w), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 48), mant<3>(w), a1);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 64), mant<4>(w), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 80), mant<5>(w), a1);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 96), mant<6>(w), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 112), mant<7>(w), a1);
    tot = _mm512_fmadd_ps(_mm512_add_ps(a0, a1),
                          _mm512_mul_ps(sixteen, block_scales(S, r.s, b)), tot);
  }
  // gsum holds the group sums, then -16 times them (this variant's)
  tot = dot_acc(r.s, gsum + S.K / S.g, S.K / S.g, dot_acc(r.z, gsum, S.K / S.g, tot));
  return _mm512_reduce_add_ps(tot);
}

// 7: rows n0..n0 + 3 at once. xs: block b's 8 vectors, lane d of vector j the input of
// nibble j of dword d, times 2^-4j.
NOINLINE void dot_blocks4(const Row* r, const Shape& S, const float* xs, const float* gsum,
                          float* out) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 tot[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  for (int64_t b = 0; b < S.K / 128; ++b) {
    __m512i w[4];
    for (int c = 0; c < 4; ++c) {  // with moekit's prefetch 4 KiB ahead (alone here)
      _mm_prefetch(reinterpret_cast<const char*>(r[c].q + 64 * b) + 4096, _MM_HINT_T1);
      w[c] = _mm512_loadu_si512(r[c].q + 64 * b);
    }
    __m512 e[4];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m512 xj = _mm512_loadu_ps(xs + 128 * b + 16 * j);
      for (int c = 0; c < 4; ++c) {
        const __m512 q =
            j == 0 ? _mm512_permutexvar_ps(w[c], iota)
                   : _mm512_cvtepu32_ps(_mm512_and_si512(w[c], _mm512_set1_epi32(0xFu << (4 * j))));
        e[c] = j == 0 ? _mm512_mul_ps(xj, q) : _mm512_fmadd_ps(xj, q, e[c]);
      }
    }
    for (int c = 0; c < 4; ++c) tot[c] = _mm512_fmadd_ps(block_scales(S, r[c].s, b), e[c], tot[c]);
  }
  for (int c = 0; c < 4; ++c)
    out[c] = _mm512_reduce_add_ps(dot_acc(r[c].z, gsum, S.K / S.g, tot[c]));
}

// 5: AMX (rows n0..n0 + 63 at once). Per group of 64 weights a row's 32 bytes, broadcast
// to both halves of a vector and shifted per word by 0 / 4 (then 8 / 12) bits, give two
// A-tile rows of bf16(128 + q): 32 weights each, in the word order of the records above
// (v = 0, 1 then 2, 3). The B tiles (prepare) hold group u's activations in column u % 8
// (hi) and 8 + u % 8 (lo), zeros elsewhere, so one C tile of 16 rows sums 8 groups apart;
// it is stored, and each row's 8 group sums scaled, every 8 groups. The A tiles go
// through memory (a tile loads from memory only).
#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-bf16")))
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

AMX inline void amx_a_rows(const uint8_t* q, uint16_t* a0, uint16_t* a1) {
  const __m512i sh0 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const __m512i sh1 = _mm512_add_epi16(sh0, _mm512_set1_epi16(8));
  const __m512i m = _mm512_set1_epi16(0x000F), e = _mm512_set1_epi16(0x4300);
  const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  _mm512_store_si512(a0, _mm512_ternarylogic_epi32(_mm512_srlv_epi16(v, sh0), m, e, 0xEA));
  _mm512_store_si512(a1, _mm512_ternarylogic_epi32(_mm512_srlv_epi16(v, sh1), m, e, 0xEA));
}

// GCC's tile intrinsics are asm statements that declare no memory access: BARRIER keeps
// the A rows' stores before the tile loads that read them (-O3 dropped them as dead),
// and the C tiles' stores before the reads of c.
#define BARRIER() asm volatile("" : : : "memory")
#define AMX_BLOCK(C)                                                                     \
  for (int r = 0; r < 16; ++r)                                                           \
    amx_a_rows(q + (n0 + 16 * C + r) * (S.K / 2) + 32 * u, a + 1024 * (C % 2) + 32 * r,  \
               a + 1024 * (C % 2) + 512 + 32 * r);                                       \
  BARRIER();                                                                             \
  _tile_loadd(4, a + 1024 * (C % 2), 64);                                                \
  _tile_dpbf16ps(C, 4, 6);                                                               \
  _tile_loadd(5, a + 1024 * (C % 2) + 512, 64);                                          \
  _tile_dpbf16ps(C, 5, 7);

AMX NOINLINE void dot_amx(const uint8_t* q, const float* s, const float* z, const Shape& S,
                          const uint16_t* bt, const float* gsum, int64_t n0, float* out) {
  alignas(64) uint16_t a[2048];
  alignas(64) float c[4][256];
  const int64_t G = S.K / S.g, upg = S.g / 64, units = S.K / 64;  // 64-weight units
  float acc[64] = {};
  for (int64_t u0 = 0; u0 < units; u0 += 8 * upg) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t u = u0; u < std::min(units, u0 + 8 * upg); ++u) {
      _tile_loadd(6, bt + 1024 * u, 64);
      _tile_loadd(7, bt + 1024 * u + 512, 64);
      AMX_BLOCK(0) AMX_BLOCK(1) AMX_BLOCK(2) AMX_BLOCK(3)
    }
    _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
    BARRIER();
    const int64_t g0 = u0 / upg, ng = std::min<int64_t>(8, G - g0);
    const __mmask8 km = static_cast<__mmask8>((1u << ng) - 1);
    const __m256 sx = _mm256_maskz_loadu_ps(km, gsum + g0);
    for (int r = 0; r < 64; ++r) {  // s (hi + lo) + (z - 128 s) sum(x), per group
      const int64_t n = n0 + r;
      const __m256 sg = _mm256_maskz_loadu_ps(km, s + n * G + g0);
      const __m256 zg = _mm256_maskz_loadu_ps(km, z + n * G + g0);
      const float* cr = c[r / 16] + 16 * (r % 16);
      __m256 t = _mm256_mul_ps(sg, _mm256_add_ps(_mm256_load_ps(cr), _mm256_load_ps(cr + 8)));
      t = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(128.0f), sg, zg), sx, t);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      acc[r] += _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    }
  }
  std::copy(acc, acc + 64, out + n0);
}

AMX void amx_start() {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  BARRIER();  // (ldtilecfg's asm declares only the first byte of cfg as read)
  _tile_loadconfig(&cfg);
}

AMX void amx_end() { _tile_release(); }

uint16_t to_bf16(float f) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The activation row in each variant's form: records laid out as the kernels read them,
// and the per-group sums of the activation values they represent.
struct Acts {
  std::vector<uint16_t> bf;   // variants 1, 2
  std::vector<int16_t> i16;   // 3
  std::vector<int8_t> i8;     // 4
  std::vector<float> sx;      // 3, 4: per lane (4 lanes per chunk)
  std::vector<float> gsum;    // per weight group
  std::vector<float> xrep;    // the represented activations (for the reference)
  std::vector<uint16_t> bt;   // 5: B tiles, two per 64 inputs
  std::vector<float> f;       // 6: x in the record order
  std::vector<float> xs;      // 7: x prescaled, in nibble order
};

Acts prepare(int variant, const float* x, int64_t K, int64_t g) {
  Acts A;
  A.xrep.assign(x, x + K);
  if (variant == 1 || variant == 2) {
    const int parts = variant;
    A.bf.resize(parts * K);
    for (int64_t k = 0; k < K; ++k) {
      const uint16_t hi = to_bf16(x[k]);
      const uint16_t lo = to_bf16(x[k] - from_bf16(hi));
      A.xrep[k] = parts == 1 ? from_bf16(hi) : from_bf16(hi) + from_bf16(lo);
      // element k sits in block k / 128, chunk c, at vector v's word i
      const int64_t b = k / 128, c = (k % 128) / 32, j = k % 32;
      const int v = (j >= 16 ? 1 : 0) + 2 * (j % 2);
      const int64_t i = 8 * c + (j % 16) / 2;
      A.bf[128 * parts * b + 32 * v + i] = hi;
      if (parts == 2) A.bf[128 * parts * b + 128 + 32 * v + i] = lo;
    }
  } else if (variant == 3 || variant == 4) {
    const float top = variant == 3 ? 32767.0f : 127.0f;
    if (variant == 3) A.i16.resize(K); else A.i8.resize(K);
    A.sx.resize(4 * (K / 32));
    for (int64_t c = 0; c < K / 32; ++c) {
      float amax = 0.0f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[32 * c + j]));
      const float sc = amax / top;
      for (int l = 0; l < 4; ++l) A.sx[4 * c + l] = sc;
      for (int j = 0; j < 32; ++j) {
        const int64_t k = 32 * c + j;
        const float q = sc > 0 ? std::nearbyint(x[k] / sc) : 0.0f;
        A.xrep[k] = sc * q;
        const int64_t b = k / 128, cc = (k % 128) / 32;
        if (variant == 3) {
          const int v = (j >= 16 ? 1 : 0) + 2 * (j % 2);
          A.i16[128 * b + 32 * v + 8 * cc + (j % 16) / 2] = static_cast<int16_t>(q);
        } else {  // low nibbles (weights j < 16 of each chunk) then high ones
          A.i8[128 * b + (j >= 16 ? 64 : 0) + 16 * cc + j % 16] = static_cast<int8_t>(q);
        }
      }
    }
  }
  if (variant == 6) {  // element k: block k / 128, its byte B and nibble half
    A.f.resize(K);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t b = k / 128, c = (k % 128) / 32, j = k % 32;
      const int64_t byte = 16 * c + j % 16;  // within the block
      const int64_t l = byte / 4, v = 2 * (byte % 4) + (j >= 16 ? 1 : 0);
      A.f[128 * b + 16 * v + l] = x[k];
    }
  }
  if (variant == 7) {  // block b, nibble j, dword d
    A.xs.resize(K);
    for (int64_t b = 0; b < K / 128; ++b)
      for (int j = 0; j < 8; ++j)
        for (int d = 0; d < 16; ++d)
          A.xs[128 * b + 16 * j + d] =
              std::ldexp(x[128 * b + 32 * (d / 4) + 4 * (d % 4) + j / 2 + 16 * (j % 2)], -4 * j);
  }
  if (variant == 5) {  // per 64 inputs two B tiles [16 pairs][16 columns][2]
    A.bt.assign(1024 * (K / 64), 0);
    for (int64_t k = 0; k < K; ++k) {
      const uint16_t hi = to_bf16(x[k]);
      const uint16_t lo = to_bf16(x[k] - from_bf16(hi));
      A.xrep[k] = from_bf16(hi) + from_bf16(lo);
      // weight k of unit u: chunk c, j; its word i and nibble v as in the records above
      const int64_t u = k / 64, c = (k % 64) / 32, j = k % 32;
      const int v = (j >= 16 ? 1 : 0) + 2 * (j % 2);
      const int64_t i = 8 * c + (j % 16) / 2;
      const int64_t w = 16 * (v % 2) + i;  // element of A row v / 2
      const int64_t col = (k / g) % 8;
      uint16_t* tile = A.bt.data() + 1024 * u + 512 * (v / 2) + 32 * (w / 2) + w % 2;
      tile[2 * col] = hi;
      tile[2 * (8 + col)] = lo;
    }
  }
  A.gsum.assign(2 * (K / g), 0.0f);  // the sums, then -128 (bf16) or -16 (mant) x them
  for (int64_t k = 0; k < K; ++k) A.gsum[k / g] += A.xrep[k];
  const float off = variant == 6 ? -16.0f : -128.0f;  // the weights' offset x their scale
  for (int64_t i = 0; i < K / g; ++i) A.gsum[K / g + i] = off * A.gsum[i];
  return A;
}

}  // namespace

// out [N] = each weight row . x in variant's form; returns (out, the represented x,
// the best of `reps` passes over all rows in seconds). K a multiple of 128, g of 32.
std::tuple<at::Tensor, at::Tensor, double> dot(int64_t variant, const at::Tensor& data,
                                               const at::Tensor& scales, const at::Tensor& zeros,
                                               int64_t g, const at::Tensor& x, int64_t threads,
                                               int64_t reps) {
  TORCH_CHECK(variant >= 0 && variant <= 7, "variant must be 0..7, got ", variant);
  const int64_t N = data.size(0), K = 2 * data.size(1);
  TORCH_CHECK(K % 128 == 0 && (g == 32 || g == 64 || g == 128),
              "K must be a multiple of 128 and g one of 32, 64, 128, got K=", K, ", g=", g);
  TORCH_CHECK(data.is_contiguous() && scales.is_contiguous() && zeros.is_contiguous() &&
              x.is_contiguous() && x.numel() == K, "contiguous inputs, x of K values");
  Shape S{K, g, {}, 0, 0};
  alignas(64) int32_t lane_group[16];
  for (int l = 0; l < 16; ++l) lane_group[l] = static_cast<int32_t>((l / 4) * 32 / g);
  S.lane_group = _mm512_load_si512(lane_group);
  S.gpb = 128 / g;
  S.gmask = static_cast<__mmask16>((1u << S.gpb) - 1);
  const Acts A = prepare(static_cast<int>(variant), x.data_ptr<float>(), K, g);
  const uint8_t* q = data.data_ptr<uint8_t>();
  const float *s = scales.data_ptr<float>(), *z = zeros.data_ptr<float>();
  const float* xf = x.data_ptr<float>();
  at::Tensor out = at::empty({N});
  float* o = out.data_ptr<float>();
  omp_set_num_threads(static_cast<int>(threads));
  auto rows = [&](auto row_dot) {  // one parallel pass over the rows
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n)
      o[n] = row_dot(Row{q + n * (K / 2), s + n * (K / g), z + n * (K / g)});
  };
  const uint16_t* bf = A.bf.data();
  const float *sx = A.sx.data(), *gsum = A.gsum.data();
  if (variant == 5) {
    TORCH_CHECK(g >= 64 && N % 64 == 0, "amx: g >= 64 and rows a multiple of 64");
    TORCH_CHECK(syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                        18 /* XFEATURE_XTILEDATA */) == 0, "amx: no permission for AMX tiles");
  }
  if (variant == 7) TORCH_CHECK(N % 4 == 0, "blocks: rows a multiple of 4");
  auto pass = [&] {
    if (variant == 7) {
#pragma omp parallel for schedule(static)
      for (int64_t n0 = 0; n0 < N; n0 += 4) {
        Row r4[4];
        for (int c = 0; c < 4; ++c) {
          const int64_t n = n0 + c;
          r4[c] = Row{q + n * (K / 2), s + n * (K / g), z + n * (K / g)};
        }
        dot_blocks4(r4, S, A.xs.data(), A.gsum.data(), o + n0);
      }
      return;
    }
    if (variant == 5) {
#pragma omp parallel
      {
        amx_start();
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += 64) dot_amx(q, s, z, S, A.bt.data(), A.gsum.data(), n0, o);
        amx_end();
      }
      return;
    }
    switch (variant) {
      case 0: return rows([&](const Row& r) { return dot_table(r, S, xf); });
      case 1: return rows([&](const Row& r) { return dot_bf16<1>(r, S, bf, gsum); });
      case 2: return rows([&](const Row& r) { return dot_bf16<2>(r, S, bf, gsum); });
      case 3: return rows([&](const Row& r) { return dot_i16(r, S, A.i16.data(), sx, gsum); });
      case 4: return rows([&](const Row& r) { return dot_i8(r, S, A.i8.data(), sx, gsum); });
      default: return rows([&](const Row& r) { return dot_mant(r, S, A.f.data(), gsum); });
    }
  };
  double best = 1e30;
  for (int64_t it = 0; it < reps; ++it) {
    const auto t0 = std::chrono::steady_clock::now();
    pass();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
                              .count());
  }
  at::Tensor xrep = at::empty({K});
  std::copy(A.xrep.begin(), A.xrep.end(), xrep.data_ptr<float>());
  return {out, xrep, best};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("dot", &dot); }
