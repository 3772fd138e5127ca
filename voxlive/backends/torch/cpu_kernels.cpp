// Matrix-vector products for decode steps on x86-64 CPUs, built for AVX-512 (F, BW, VL, VNNI; BF16
// for bf16 weights) or, where that is missing, for AVX2 and FMA (the same products, 256 bits wide).
//
// A decode step multiplies a few activation rows (one per stream) by every weight matrix, so its
// time is the time it takes to stream the weights from memory. These kernels read each weight row
// once for all activation rows, prefetch ahead of it, and keep the arithmetic per weight byte small
// enough to run at the memory's speed on two cores:
//   bf16 weights: vdpbf16ps on the bf16 activations, float32 sums;
//   int8 weights: widened to int16; activations quantized per row to int16 (|q| <= 16383, so every
//                 element within 2^-7 of the row's largest keeps all its bfloat16 bits); vpdpwssd,
//                 exact int32 sums, scaled once per output;
//   int4 weights: (q - 8) * scale + zero per group of 64 inputs; nibbles widened to int16, the same
//                 int16 activations, one exact int32 sum per group, scaled in float32.
// Every output is computed from its own activation row and weight row in a fixed order, so a row's
// result does not depend on the other rows of the batch (batching changes no stream's numbers).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstring>

namespace {

constexpr int64_t kPrefetch = 512;  // bytes ahead of the current position in a weight row (measured best)
constexpr int kRows = 4;            // activation rows per pass over a weight row (accumulators held in registers)
constexpr float kInt16Max = 16383;  // activations as int16: see kMaxInputs
constexpr int64_t kGroup = 64;      // int4 group size this kernel reads (the decoder's default)
constexpr int64_t kMaxGroups = 512; // int4: at most 32768 inputs

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Weights are read once per step: non-temporal prefetch keeps them from evicting the activations
// and caches (measured: 20-40 % faster than a T0 prefetch here).
inline void prefetch(const void* p) { _mm_prefetch((const char*)p, _MM_HINT_NTA); }

// A per-row scale read as float whether it is stored as float32, bfloat16 or float16 (the
// activation dtype of the model).
struct Scales {
  const void* data;
  at::ScalarType type;
  float operator[](int64_t i) const {
    switch (type) {
      case at::kBFloat16: return bf16_to_float(((const uint16_t*)data)[i]);
      case at::kHalf: return float(((const at::Half*)data)[i]);
      default: return ((const float*)data)[i];
    }
  }
};

Scales scales_of(const at::Tensor& s) {
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16 || s.scalar_type() == at::kHalf,
              "scales must be float32, bfloat16 or float16");
  return {s.data_ptr(), s.scalar_type()};
}

// Activations as int16 rows: x[m] ~= q[m] * scale[m].
struct Int16Rows {
  at::Tensor q;      // [M, K] int16
  at::Tensor scale;  // [M] float32
};

Int16Rows quantize_rows(const at::Tensor& x) {
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor scale = xf.abs().amax(1).clamp_min(1e-30f) / kInt16Max;
  return {(xf / scale.unsqueeze(1)).round_().to(at::kShort).contiguous(), scale.contiguous()};
}

// Runs body(n, m0, rows) for every weight row n and every block of at most kRows activation rows,
// weight rows split across threads, so each weight row is read from memory once.
template <typename Body>
void for_each_row(int64_t n_rows, int64_t m_rows, const Body& body) {
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++)
      for (int64_t m0 = 0; m0 < m_rows; m0 += kRows) body(n, m0, std::min<int64_t>(kRows, m_rows - m0));
  });
}

// Calls f.template operator()<R>() with R = rows, a compile-time constant in 1..kRows.
template <typename F>
void with_rows(int64_t rows, const F& f) {
  switch (rows) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    default: f.template operator()<4>(); break;
  }
}

void check_matrix(const at::Tensor& x, const at::Tensor& w, int64_t k_per_row, int64_t k_multiple, const char* what) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, what, ": x and the weight must be 2-d");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(w.is_contiguous(), what, ": the weight must be contiguous");
  TORCH_CHECK(w.size(1) * k_per_row == x.size(1), what, ": x has ", x.size(1), " inputs, the weight ", w.size(1) * k_per_row);
  TORCH_CHECK(x.size(1) % k_multiple == 0, what, ": the input size must be a multiple of ", k_multiple, ", got ", x.size(1));
}

// ---- the inner loops, per instruction set -----------------------------------------------------------
// Each *_row<R> multiplies one weight row by R activation rows. Activations: int16 rows for int8 and
// int4 (int4: per group of 64 the 32 even inputs, then the 32 odd ones), Bf16Input rows for bf16.

#if defined(__AVX512F__)

constexpr int64_t kMaxInputs = 32768;  // int32 lanes hold K/32 products of at most 2 * 16383 * 127
using Bf16Input = uint16_t;             // vdpbf16ps takes the bf16 activations as they are

at::Tensor bf16_input(const at::Tensor& x) { return x.contiguous(); }

// Up to 16 bfloat16 values (those of mask m, zeros elsewhere) as float32.
inline __m512 load_bf16x16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// The only function that needs AVX-512 BF16 (the file is built for F/BW/VL/VNNI): the caller only
// runs it on CPUs that have it.
template <int R>
__attribute__((target("avx512bf16"))) void bf16_row(const uint16_t* x, int64_t K, const uint16_t* w, float* y, int64_t N) {
  __m512 acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    prefetch(w + k + kPrefetch / 2);
    prefetch(w + k + 32 + kPrefetch / 2);
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k), w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
    for (int r = 0; r < R; r++) {
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, (__m512bh)_mm512_loadu_si512(x + r * K + k));
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, (__m512bh)_mm512_loadu_si512(x + r * K + k + 32));
    }
  }
  if (k < K) {  // the last 32 inputs when K is an odd multiple of 32
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k);
    for (int r = 0; r < R; r++) acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, (__m512bh)_mm512_loadu_si512(x + r * K + k));
  }
  for (int r = 0; r < R; r++) y[r * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

template <int R>
void int8_row(const int16_t* x, int64_t K, const int8_t* w, float* dots) {
  __m512i acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    prefetch(w + k + kPrefetch);
    __m512i raw = _mm512_loadu_si512(w + k);
    __m512i w0 = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(raw));
    __m512i w1 = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(raw, 1));
    for (int r = 0; r < R; r++) {
      acc[r][0] = _mm512_dpwssd_epi32(acc[r][0], w0, _mm512_loadu_si512(x + r * K + k));
      acc[r][1] = _mm512_dpwssd_epi32(acc[r][1], w1, _mm512_loadu_si512(x + r * K + k + 32));
    }
  }
  if (k < K) {  // the last 32 inputs when K is an odd multiple of 32
    __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + k)));
    for (int r = 0; r < R; r++) acc[r][0] = _mm512_dpwssd_epi32(acc[r][0], w0, _mm512_loadu_si512(x + r * K + k));
  }
  for (int r = 0; r < R; r++)
    dots[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_cvtepi32_ps(acc[r][0]), _mm512_cvtepi32_ps(acc[r][1])));
}

// Byte j of a group's 32 holds input 2j in its high nibble and input 2j+1 in its low one; the
// activations are given per group as the 32 even inputs, then the 32 odd ones, to match.
template <int R>
void int4_row(const int16_t* x, const float* xsum, int64_t K, const uint8_t* w, const uint16_t* scale,
              const uint16_t* zero, float* dots) {
  const int64_t G = K / kGroup;
  // the row's scales as float32, so each group's is one broadcast load; and the offset term,
  // sum over groups of (zero - 8 * scale) * (sum of the group's activations)
  alignas(64) float s[kMaxGroups + 16];
  float offset[R] = {};
  for (int64_t g = 0; g < G; g += 16) {
    __mmask16 m = G - g >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (G - g)) - 1);
    __m512 sg = load_bf16x16(scale + g, m), zg = load_bf16x16(zero + g, m);
    _mm512_store_ps(s + g, sg);
    __m512 c = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sg, zg);
    for (int r = 0; r < R; r++) offset[r] += _mm512_reduce_add_ps(_mm512_mul_ps(c, _mm512_maskz_loadu_ps(m, xsum + r * G + g)));
  }
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi16(15);
  for (int64_t g = 0; g < G; g++) {
    if (!(g & 1)) prefetch(w + g * 32 + kPrefetch);
    __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + g * 32)));
    __m512i even = _mm512_srli_epi16(bytes, 4), odd = _mm512_and_si512(bytes, low);
    __m512 sg = _mm512_set1_ps(s[g]);
    for (int r = 0; r < R; r++) {
      const int16_t* xg = x + r * K + g * kGroup;
      __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(xg));
      d = _mm512_dpwssd_epi32(d, odd, _mm512_loadu_si512(xg + 32));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sg, acc[r]);
    }
  }
  for (int r = 0; r < R; r++) dots[r] = _mm512_reduce_add_ps(acc[r]) + offset[r];
}

#else  // AVX2 and FMA: the same products with 256-bit vectors, vpmaddwd for vpdpwssd, FMA for vdpbf16ps

constexpr int64_t kMaxInputs = 16384;  // int32 lanes hold K/16 products of at most 2 * 16383 * 127
using Bf16Input = float;                // bf16 weights widened to float32 meet float32 activations

at::Tensor bf16_input(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256 load_bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

template <int R>
void bf16_row(const float* x, int64_t K, const uint16_t* w, float* y, int64_t N) {
  __m256 acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    prefetch(w + k + kPrefetch / 2);
    for (int64_t i = 0; i < 32; i += 16) {
      __m256 w0 = load_bf16x8(w + k + i), w1 = load_bf16x8(w + k + i + 8);
      for (int r = 0; r < R; r++) {
        acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * K + k + i), acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * K + k + i + 8), acc[r][1]);
      }
    }
  }
  for (int r = 0; r < R; r++) y[r * N] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
}

template <int R>
void int8_row(const int16_t* x, int64_t K, const int8_t* w, float* dots) {
  __m256i acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K; k += 32) {
    prefetch(w + k + kPrefetch);
    __m256i raw = _mm256_loadu_si256((const __m256i*)(w + k));
    __m256i w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(raw)), w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(raw, 1));
    for (int r = 0; r < R; r++) {
      const __m256i* xr = (const __m256i*)(x + r * K + k);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w0, _mm256_loadu_si256(xr)));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w1, _mm256_loadu_si256(xr + 1)));
    }
  }
  for (int r = 0; r < R; r++)
    dots[r] = hsum(_mm256_add_ps(_mm256_cvtepi32_ps(acc[r][0]), _mm256_cvtepi32_ps(acc[r][1])));
}

template <int R>
void int4_row(const int16_t* x, const float* xsum, int64_t K, const uint8_t* w, const uint16_t* scale,
              const uint16_t* zero, float* dots) {
  const int64_t G = K / kGroup;
  // the offset term: sum over groups of (zero - 8 * scale) * (sum of the group's activations)
  float offset[R] = {};
  for (int64_t g = 0; g < G; g++) {
    float c = bf16_to_float(zero[g]) - 8.0f * bf16_to_float(scale[g]);
    for (int r = 0; r < R; r++) offset[r] += c * xsum[r * G + g];
  }
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi16(15);
  for (int64_t g = 0; g < G; g++) {
    if (!(g & 1)) prefetch(w + g * 32 + kPrefetch);
    __m256i raw = _mm256_loadu_si256((const __m256i*)(w + g * 32));
    __m256i b0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(raw)), b1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(raw, 1));
    __m256i e0 = _mm256_srli_epi16(b0, 4), o0 = _mm256_and_si256(b0, low);
    __m256i e1 = _mm256_srli_epi16(b1, 4), o1 = _mm256_and_si256(b1, low);
    __m256 sg = _mm256_set1_ps(bf16_to_float(scale[g]));
    for (int r = 0; r < R; r++) {
      const __m256i* xg = (const __m256i*)(x + r * K + g * kGroup);  // even 0-15, even 16-31, odd 0-15, odd 16-31
      __m256i d = _mm256_add_epi32(_mm256_madd_epi16(e0, _mm256_loadu_si256(xg)), _mm256_madd_epi16(e1, _mm256_loadu_si256(xg + 1)));
      d = _mm256_add_epi32(d, _mm256_add_epi32(_mm256_madd_epi16(o0, _mm256_loadu_si256(xg + 2)),
                                               _mm256_madd_epi16(o1, _mm256_loadu_si256(xg + 3))));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sg, acc[r]);
    }
  }
  for (int r = 0; r < R; r++) dots[r] = hsum(acc[r]) + offset[r];
}

#endif

// ---- bf16 ------------------------------------------------------------------------------------------

at::Tensor linear_bf16(const at::Tensor& x_in, const at::Tensor& w) {
  check_matrix(x_in, w, 1, 32, "linear_bf16");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "linear_bf16: bfloat16 x and weight");
  at::Tensor x = bf16_input(x_in);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  auto xp = (const Bf16Input*)x.data_ptr();
  auto wp = (const uint16_t*)w.data_ptr();
  float* yp = y.data_ptr<float>();
  for_each_row(N, M, [&](int64_t n, int64_t m0, int64_t rows) {
    with_rows(rows, [&]<int R>() { bf16_row<R>(xp + m0 * K, K, wp + n * K, yp + m0 * N + n, N); });
  });
  return y.to(at::kBFloat16);
}

// ---- int8 ------------------------------------------------------------------------------------------

at::Tensor linear_int8(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scale) {
  check_matrix(x_in, q, 1, 32, "linear_int8");
  TORCH_CHECK(q.scalar_type() == at::kChar, "linear_int8: int8 weight");
  TORCH_CHECK(x_in.size(1) <= kMaxInputs, "linear_int8: at most ", kMaxInputs, " inputs");
  TORCH_CHECK(scale.numel() == q.size(0) && scale.is_contiguous(), "linear_int8: one scale per output");
  Int16Rows x = quantize_rows(x_in);
  const int64_t M = x_in.size(0), K = x_in.size(1), N = q.size(0);
  at::Tensor y = at::empty({M, N}, x.scale.options());
  auto xp = x.q.data_ptr<int16_t>();
  auto xs = x.scale.data_ptr<float>();
  auto wp = q.data_ptr<int8_t>();
  Scales ws = scales_of(scale);
  float* yp = y.data_ptr<float>();
  for_each_row(N, M, [&](int64_t n, int64_t m0, int64_t rows) {
    float dots[kRows];
    with_rows(rows, [&]<int R>() { int8_row<R>(xp + m0 * K, K, wp + n * K, dots); });
    for (int64_t r = 0; r < rows; r++) yp[(m0 + r) * N + n] = dots[r] * ws[n] * xs[m0 + r];
  });
  return y.to(x_in.scalar_type());
}

// ---- int4 ------------------------------------------------------------------------------------------

at::Tensor linear_int4(const at::Tensor& x_in, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero) {
  check_matrix(x_in, q, 2, kGroup, "linear_int4");
  TORCH_CHECK(q.scalar_type() == at::kByte, "linear_int4: uint8 packed weight");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = q.size(0), G = K / kGroup;
  TORCH_CHECK(G <= kMaxGroups, "linear_int4: at most ", kMaxGroups * kGroup, " inputs");
  for (const at::Tensor* t : {&scale, &zero})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->size(0) == N && t->size(1) == G,
                "linear_int4: bfloat16 scales and zeros [", N, ", ", G, "] (groups of 64)");
  Int16Rows x = quantize_rows(x_in);
  // [M, G, 64] -> per group the even inputs, then the odd ones; and each group's sum
  at::Tensor xq = x.q.view({M, G, 32, 2}).transpose(2, 3).contiguous();
  at::Tensor xsum = x.q.view({M, G, kGroup}).sum(-1, false, at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.scale.options());
  auto xp = xq.data_ptr<int16_t>();
  auto xsp = xsum.data_ptr<float>();
  auto xs = x.scale.data_ptr<float>();
  auto wp = q.data_ptr<uint8_t>();
  auto sp = (const uint16_t*)scale.data_ptr();
  auto zp = (const uint16_t*)zero.data_ptr();
  float* yp = y.data_ptr<float>();
  for_each_row(N, M, [&](int64_t n, int64_t m0, int64_t rows) {
    float dots[kRows];
    with_rows(rows, [&]<int R>() {
      int4_row<R>(xp + m0 * K, xsp + m0 * G, K, wp + n * (K / 2), sp + n * G, zp + n * G, dots);
    });
    for (int64_t r = 0; r < rows; r++) yp[(m0 + r) * N + n] = dots[r] * xs[m0 + r];
  });
  return y.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY(voxlive, m) {
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor q, Tensor scale, Tensor zero) -> Tensor");
}

TORCH_LIBRARY_IMPL(voxlive, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
}
