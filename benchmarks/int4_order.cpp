// int4 weights x int8 activations for R rows at once: moekit's weight layout against a
// layout in the order vpdpbusd sums (bench_int4_order.py builds and runs this).
//
// rows (moekit's kernel, i4a8_rows_vnni in src/moekit/csrc/cpu_decode.cpp, here with its
//   record layout and two output rows per pass): moekit's NK layout, an output's inputs
//   along the vector. Per 128 weights of one output: a load, two ANDs and a shift for the
//   nibbles and a group-scale permute; per activation row two vpdpbusd, a convert, the
//   scale product and an FMA, then per output and row a horizontal sum and the zero points.
// order (a prototype): 16 outputs across the vector, 4 inputs per lane. Per 16 outputs and
//   32-input chunk, four 64-byte loads (each: the nibbles of inputs 4j..4j+3 and
//   16+4j..16+4j+3 of the 16 outputs) split into 8 byte vectors; per row 8 vpdpbusd, each
//   with 4 activation bytes broadcast, then one convert, scale product and FMA per chunk;
//   no horizontal sums. The same number of products; the per-row converts and scales are
//   per 16 outputs instead of per output.
//
// Both compute sum_k (s q + z) x' over the int8 activations x' = xq * sx (per 32-input
// chunk scale sx), in fp32 with int32 chunk sums: the same values up to fp32 summation
// order. Built with -march=native; the caller checks for AVX-512 VNNI.

#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

namespace {

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

struct Shape {
  int64_t N, K, g, ng;
};

// ---- rows: moekit's record (per 128-input block the low halves of its 4 chunks, then
// the high halves; a chunk's scale per vpdpbusd lane; each group's sum of x')
struct Record {
  std::vector<int8_t> xq;
  std::vector<float> sx, zx;
};

Record record(const int8_t* xq, const float* sx, const Shape& S) {
  Record r;
  r.xq.resize(S.K), r.sx.resize(4 * (S.K / 32)), r.zx.assign(S.ng, 0.0f);
  for (int64_t c = 0; c < S.K / 32; ++c) {
    const int64_t b = c / 4, cc = c % 4;
    for (int i = 0; i < 16; ++i) {
      r.xq[128 * b + 16 * cc + i] = xq[32 * c + i];
      r.xq[128 * b + 64 + 16 * cc + i] = xq[32 * c + 16 + i];
    }
    for (int i = 0; i < 4; ++i) r.sx[4 * c + i] = sx[c];
  }
  for (int64_t k = 0; k < S.K; ++k) r.zx[k / S.g] += sx[k / 32] * xq[k];
  return r;
}

template <int R>
VNNI void rows_pair(const uint8_t* p, int64_t ldn, const float* gs, const float* gz,
                    const Shape& S, __m512i idx, __mmask16 gmask, int64_t gpb,
                    const Record* const* xr, float* v) {
  const __m512i m = _mm512_set1_epi8(15);
  __m512 acc[2][R];
#pragma GCC unroll 2
  for (int c = 0; c < 2; ++c)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < S.K / 128; ++b) {
    __m512i lo[2], hi[2];
    __m512 sw[2];
#pragma GCC unroll 2
    for (int c = 0; c < 2; ++c) {
      const __m512i w = _mm512_loadu_si512(p + c * ldn + 64 * b);
      lo[c] = _mm512_and_si512(w, m), hi[c] = _mm512_and_si512(_mm512_srli_epi16(w, 4), m);
      sw[c] = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(gmask, gs + c * S.ng + b * gpb));
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int8_t* q = xr[r]->xq.data() + 128 * b;
      const __m512i ql = _mm512_loadu_si512(q), qh = _mm512_loadu_si512(q + 64);
      const __m512 sx = _mm512_loadu_ps(xr[r]->sx.data() + 16 * b);
#pragma GCC unroll 2
      for (int c = 0; c < 2; ++c) {
        __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[c], ql);
        i = _mm512_dpbusd_epi32(i, hi[c], qh);
        acc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(sw[c], sx), acc[c][r]);
      }
    }
  }
  for (int c = 0; c < 2; ++c)
    for (int r = 0; r < R; ++r) {
      __m512 a = acc[c][r];
      const float* zx = xr[r]->zx.data();
      for (int64_t i = 0; i < S.ng; i += 16) {
        const __mmask16 mk =
            S.ng - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (S.ng - i)) - 1);
        a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, gz + c * S.ng + i),
                            _mm512_maskz_loadu_ps(mk, zx + i), a);
      }
      v[c * 8 + r] = _mm512_reduce_add_ps(a);
    }
}

// y [R, N] for output pairs n0..n1 (even)
template <int R>
VNNI void rows_kernel(const uint8_t* w, const float* s, const float* z, const Shape& S,
                      const Record* const* xr, float* y, int64_t n0, int64_t n1) {
  alignas(64) int32_t lane_group[16];
  for (int l = 0; l < 16; ++l) lane_group[l] = static_cast<int32_t>((l / 4) * 32 / S.g);
  const __m512i idx = _mm512_load_si512(lane_group);
  const int64_t gpb = 128 / S.g;
  const __mmask16 gmask = static_cast<__mmask16>((1u << gpb) - 1);
  float v[16];
  for (int64_t n = n0; n < n1; n += 2) {
    rows_pair<R>(w + n * S.K / 2, S.K / 2, s + n * S.ng, z + n * S.ng, S, idx, gmask, gpb, xr, v);
    for (int c = 0; c < 2; ++c)
      for (int r = 0; r < R; ++r) y[r * S.N + n + c] = v[c * 8 + r];
  }
}

// ---- order: per 16 outputs, per chunk c, 4 vectors j: byte 4 o + t holds the nibbles of
// inputs 32 c + 4 j + t (low) and 32 c + 16 + 4 j + t (high) of output o. Scales and zero
// points per 16 outputs: [K / g][16].
void repack(const uint8_t* nk, const float* s, const float* z, const Shape& S, uint8_t* out,
            float* os, float* oz) {
  for (int64_t nb = 0; nb < S.N / 16; ++nb) {
    uint8_t* blk = out + nb * 16 * S.K / 2;
    for (int64_t c = 0; c < S.K / 32; ++c)
      for (int j = 0; j < 4; ++j)
        for (int o = 0; o < 16; ++o)
          for (int t = 0; t < 4; ++t)  // moekit's chunk byte i: inputs i and 16 + i
            blk[(c * 4 + j) * 64 + 4 * o + t] = nk[(nb * 16 + o) * S.K / 2 + 16 * c + 4 * j + t];
    for (int64_t g = 0; g < S.ng; ++g)
      for (int o = 0; o < 16; ++o) {
        os[(nb * S.ng + g) * 16 + o] = s[(nb * 16 + o) * S.ng + g];
        oz[(nb * S.ng + g) * 16 + o] = z[(nb * 16 + o) * S.ng + g];
      }
  }
}

template <int R>
VNNI void order_kernel(const uint8_t* w, const float* s, const float* z, const Shape& S,
                       const int8_t* xq, const float* sx, const float* zx, float* y,
                       int64_t nb0, int64_t nb1) {
  const __m512i m = _mm512_set1_epi8(15);
  const int64_t cpg = S.g / 32;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const uint8_t* blk = w + nb * 16 * S.K / 2;
    const float *bs = s + nb * S.ng * 16, *bz = z + nb * S.ng * 16;
    __m512 acc[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < S.K / 32; ++c) {
      __m512i ia[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) ia[r] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m512i wv = _mm512_loadu_si512(blk + (c * 4 + j) * 64);
        const __m512i lo = _mm512_and_si512(wv, m);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const int32_t* q = reinterpret_cast<const int32_t*>(xq + r * S.K + 32 * c);
          ia[r] = _mm512_dpbusd_epi32(ia[r], lo, _mm512_set1_epi32(q[j]));
          ia[r] = _mm512_dpbusd_epi32(ia[r], hi, _mm512_set1_epi32(q[4 + j]));
        }
      }
      const __m512 sg = _mm512_loadu_ps(bs + (c / cpg) * 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r]),
                                 _mm512_mul_ps(sg, _mm512_set1_ps(sx[r * (S.K / 32) + c])), acc[r]);
    }
    for (int64_t g = 0; g < S.ng; ++g) {
      const __m512 zg = _mm512_loadu_ps(bz + g * 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(zg, _mm512_set1_ps(zx[r * S.ng + g]), acc[r]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * S.N + nb * 16, acc[r]);
  }
}

template <typename F>
void with_rows(int64_t R, const F& f) {
  switch (R) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{});
  }
}

}  // namespace

// variant 0 rows, 1 order. data [P, N, K / 2] uint8 (moekit's layout), scales / zeros
// [P, N, K / g]; xq [R, K] int8, sx [R, K / 32]. Each pass runs every one of the P
// weight sets once (2 threads: halves of N); returns (y of weight set 0 [R, N], the best
// pass's seconds per weight set).
std::tuple<at::Tensor, double> run(int64_t variant, const at::Tensor& data,
                                   const at::Tensor& scales, const at::Tensor& zeros,
                                   int64_t group, const at::Tensor& xq, const at::Tensor& sx,
                                   int64_t threads, int64_t reps) {
  const int64_t P = data.size(0), R = xq.size(0);
  const Shape S{data.size(1), data.size(2) * 2, group, data.size(2) * 2 / group};
  TORCH_CHECK(S.K % 128 == 0 && S.N % 32 == 0 && R >= 1 && R <= 8, "shape not supported");
  const uint8_t* d = data.data_ptr<uint8_t>();
  const float *s = scales.data_ptr<float>(), *z = zeros.data_ptr<float>();
  const int8_t* q = xq.data_ptr<int8_t>();
  const float* sxp = sx.data_ptr<float>();
  const int64_t wb = S.N * S.K / 2, sb = S.N * S.ng;
  std::vector<uint8_t> od;
  std::vector<float> os, oz;
  if (variant == 1) {
    od.resize(P * wb), os.resize(P * sb), oz.resize(P * sb);
    for (int64_t p = 0; p < P; ++p)
      repack(d + p * wb, s + p * sb, z + p * sb, S, od.data() + p * wb, os.data() + p * sb,
             oz.data() + p * sb);
  }
  std::vector<Record> recs;
  std::vector<const Record*> rp;
  std::vector<float> zx(R * S.ng, 0.0f);
  for (int64_t r = 0; r < R; ++r) recs.push_back(record(q + r * S.K, sxp + r * (S.K / 32), S));
  for (int64_t r = 0; r < R; ++r) {
    rp.push_back(&recs[r]);
    std::copy(recs[r].zx.begin(), recs[r].zx.end(), zx.begin() + r * S.ng);
  }
  at::Tensor y = at::zeros({R, S.N});
  std::vector<float> scratch(R * S.N);
  double best = 1e30;
  for (int64_t rep = 0; rep < reps; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t p = 0; p < P; ++p) {
      float* out = p == 0 ? y.data_ptr<float>() : scratch.data();
#pragma omp parallel num_threads(threads)
      {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t blocks = S.N / 16, b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
        with_rows(R, [&](auto RR) {
          constexpr int RV = decltype(RR)::value;
          if (variant == 0)
            rows_kernel<RV>(d + p * wb, s + p * sb, z + p * sb, S, rp.data(), out, 16 * b0, 16 * b1);
          else
            order_kernel<RV>(od.data() + p * wb, os.data() + p * sb, oz.data() + p * sb, S, q,
                             sxp, zx.data(), out, b0, b1);
        });
      }
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, secs / P);
  }
  return {y, best};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("run", &run); }
