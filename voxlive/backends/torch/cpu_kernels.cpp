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

#include <cmath>
#include <cstring>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

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

// ---- bf16 with AMX: a GEMM whose rows do not depend on each other -----------------------------------
// Sapphire Rapids and later: tile dot products (tdpbf16ps) of 16 weight rows x 32 inputs by 32 inputs x
// 16 activation rows, float32 sums. The product is computed transposed, Y^T = W X^T, so the weight tiles
// are plain blocks of its rows (stored blocked once at load: [N / 16, K / 32, 16, 32], each tile 1 KB
// contiguous) and only the activations are repacked per call. Every output accumulates its 32-input
// blocks in the same order from a zeroed tile whatever M is, so a row's result depends on no other row
// and not on how many there are: the encoder's frames give the same numbers in any chunking, and a decode
// step of k rows is one pass over the weights for all of them (up to 32 rows share each weight tile).

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,amx-int8,avx512bf16")))

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Eight full tiles (16 rows of 64 bytes): C in tmm0-3, weights in tmm4-5, activations in tmm6-7. A
// constant in memory: GCC 12 drops stores to a local whose only reader is ldtilecfg.
constexpr TileConfig full_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = 16;
  return c;
}
constexpr TileConfig kFullTiles = full_tiles();

AMX_TARGET void configure_tiles() { _tile_loadconfig(&kFullTiles); }
AMX_TARGET void release_tiles() { _tile_release(); }

// Linux gives a process the tile registers only on request.
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

// 16x16 float32 transpose in registers: four rounds, each swapping one bit of the row and lane indices.
inline void transpose16(__m512 r[16]) {
  for (int b = 1; b < 16; b <<= 1) {
    alignas(64) int lo[16], hi[16];
    for (int l = 0; l < 16; l++) lo[l] = (l & b) ? 16 + l - b : l, hi[l] = (l & b) ? 16 + l : l + b;
    const __m512i ilo = _mm512_load_si512(lo), ihi = _mm512_load_si512(hi);
    for (int i = 0; i < 16; i++)
      if (!(i & b)) {
        __m512 a = r[i], c = r[i + b];
        r[i] = _mm512_permutex2var_ps(a, ilo, c);
        r[i + b] = _mm512_permutex2var_ps(a, ihi, c);
      }
  }
}

// C^T tiles of NB blocks of 16 weight rows (w: their Kb tiles, one block after the other) by MB blocks
// of 16 activation rows (x: Kb tiles of 16 input pairs x 16 rows per block), input blocks kb0..kb1,
// accumulated onto c (zeros when kb0 == 0); c holds the tiles' float32 sums between calls, so splitting
// the inputs into ranges changes no rounding.
template <int NB, int MB>
AMX_TARGET void amx_bf16_tiles(const uint16_t* w, const int32_t* x, int64_t Kb, int64_t kb0, int64_t kb1, float* c) {
  if (kb0 == 0) {
    _tile_zero(0);
    if (MB > 1) _tile_zero(1);
    if (NB > 1) _tile_zero(2);
    if (NB > 1 && MB > 1) _tile_zero(3);
  } else {
    _tile_loadd(0, c, 64);
    if (MB > 1) _tile_loadd(1, c + 256, 64);
    if (NB > 1) _tile_loadd(2, c + 512, 64);
    if (NB > 1 && MB > 1) _tile_loadd(3, c + 768, 64);
  }
  for (int64_t kb = kb0; kb < kb1; kb++) {
    const uint16_t* w0 = w + kb * 512;
    // each load just before the first product that needs it (tiles are not renamed)
    _tile_loadd(6, x + kb * 256, 64);
    _tile_loadd(4, w0, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (MB > 1) {
      _tile_loadd(7, x + (Kb + kb) * 256, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (NB > 1) {
      _tile_loadd(5, w0 + Kb * 512, 64);
      _tile_dpbf16ps(2, 5, 6);
      if (MB > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 64);
  if (MB > 1) _tile_stored(1, c + 256, 64);
  if (NB > 1) _tile_stored(2, c + 512, 64);
  if (NB > 1 && MB > 1) _tile_stored(3, c + 768, 64);
}

// One C^T tile (16 outputs x 16 rows) -> `rows` rows of y from y, plus the bias.
AMX_TARGET void store_tile(const float* c, const float* bias, uint16_t* y, int64_t N, int64_t rows) {
  __m512 r[16];
  for (int i = 0; i < 16; i++) r[i] = _mm512_load_ps(c + 16 * i);
  transpose16(r);
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int64_t m = 0; m < rows; m++)
    _mm256_storeu_si256((__m256i*)(y + m * N), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(r[m], b)));
}

// w [N, K] -> the tile order the AMX kernel reads, [N / 16, K / 32, 16, 32].
at::Tensor bf16_tiles(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) % 16 == 0 && w.size(1) % 32 == 0,
              "bf16_tiles: [N, K] with N a multiple of 16 and K of 32, got ", w.sizes());
  return w.view({w.size(0) / 16, 16, w.size(1) / 32, 32}).transpose(1, 2).contiguous();
}

at::Tensor linear_bf16_amx(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 4 && w.size(2) == 16 && w.size(3) == 32 && w.is_contiguous(),
              "linear_bf16_amx: x [M, K] and a weight in tile order (bf16_tiles)");
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "linear_bf16_amx: CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "linear_bf16_amx: bfloat16 x and weight");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.size(0) * 16, Kb = K / 32, Mb = (M + 15) / 16;
  TORCH_CHECK(w.size(1) == Kb && K % 32 == 0, "linear_bf16_amx: x has ", K, " inputs, the weight ", w.size(1) * 32);
  TORCH_CHECK(amx_permitted(), "linear_bf16_amx: the kernel did not grant the AMX tile registers");
  at::Tensor b;
  if (bias) {
    TORCH_CHECK(bias->numel() == N, "linear_bf16_amx: one bias per output");
    b = bias->to(at::kFloat).contiguous();
  }
  // activations as input pairs (int32), [Mb, Kb, 16 pairs, 16 rows], zero rows past M
  at::Tensor pairs = at::zeros({Mb * 16, K / 2}, x_in.options().dtype(at::kInt));
  pairs.narrow(0, 0, M).copy_(x_in.contiguous().view(at::kInt));
  at::Tensor xp = pairs.view({Mb, 16, Kb, 16}).permute({0, 2, 3, 1}).contiguous();
  at::Tensor y = at::empty({M, N}, x_in.options());
  auto wp = (const uint16_t*)w.data_ptr();
  auto xpp = xp.data_ptr<int32_t>();
  auto yp = (uint16_t*)y.data_ptr();
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  // Blocks of activation rows whose packed inputs stay in L2 (~1 MB) while the weights stream past; and
  // within a pair of weight blocks, ranges of kKc input blocks whose weight tiles (2 x 8 KB) stay in L1
  // while the activation blocks pass by (measured here: no faster than whole rows at 744 rows, 4 to 16
  // blocks alike; kept for CPUs with less L2 bandwidth, it changes no rounding).
  constexpr int64_t kKc = 8;
  const int64_t chunk = std::max<int64_t>(2, ((int64_t(1) << 20) / (K * 2 * 16)) & ~int64_t(1));
  for (int64_t mc = 0; mc < Mb; mc += chunk) {
    const int64_t mend = std::min(Mb, mc + chunk);
    at::parallel_for(0, (N + 31) / 32, 1, [&](int64_t begin, int64_t end) {
      configure_tiles();
      at::Tensor sums = at::empty({(chunk + 1) / 2, 4 * 256}, at::kFloat);  // per pair of row blocks
      float* cs = sums.data_ptr<float>();
      for (int64_t np = begin; np < end; np++) {
        const int64_t n0 = np * 32, nb = std::min<int64_t>(2, (N - n0) / 16);
        const uint16_t* wn = wp + n0 * K;
        for (int64_t kb0 = 0; kb0 < Kb; kb0 += kKc) {
          const int64_t kb1 = std::min(Kb, kb0 + kKc);
          for (int64_t mb = mc; mb < mend; mb += 2) {
            const int64_t mbs = std::min<int64_t>(2, Mb - mb);
            const int32_t* xm = xpp + mb * Kb * 256;
            float* c = cs + (mb - mc) / 2 * 1024;
            if (nb == 2 && mbs == 2) amx_bf16_tiles<2, 2>(wn, xm, Kb, kb0, kb1, c);
            else if (nb == 2) amx_bf16_tiles<2, 1>(wn, xm, Kb, kb0, kb1, c);
            else if (mbs == 2) amx_bf16_tiles<1, 2>(wn, xm, Kb, kb0, kb1, c);
            else amx_bf16_tiles<1, 1>(wn, xm, Kb, kb0, kb1, c);
            if (kb1 < Kb) continue;
            for (int64_t i = 0; i < nb; i++)
              for (int64_t j = 0; j < mbs; j++) {
                const int64_t m0 = (mb + j) * 16;
                store_tile(c + (2 * i + j) * 256, bp ? bp + n0 + 16 * i : nullptr, yp + m0 * N + n0 + 16 * i, N,
                           std::min<int64_t>(16, M - m0));
              }
          }
        }
      }
      release_tiles();
    });
  }
  return y;
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



at::Tensor linear_bf16_amx(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "linear_bf16_amx: not in the avx2 build");
}

at::Tensor bf16_tiles(const at::Tensor&) { TORCH_CHECK(false, "bf16_tiles: not in the avx2 build"); }

bool amx_permitted() { return false; }

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


// ---- attention whose every query is computed on its own ---------------------------------------------
// Causal sliding-window attention of n new positions of one sequence over its ring cache and themselves.
// PyTorch's flash attention blocks queries and keys by the call's sizes, so a query's output depends on
// how many others the call holds. Here each of 16 lanes is one (query, head) of a kv head's group, and a
// lane's arithmetic is its own: scores summed over the head's dims in order, one exponential per key, the
// softmax sum and the weighted values accumulated over keys oldest first (keys outside a lane's window add
// exact zeros). So a stream's numbers are the same in any chunking, and a decode step (one query) computes
// a position exactly as a prompt chunk would. The lanes are GCC vectors of 16 floats (one AVX-512
// register, two AVX2 ones): one code path for every lane and every call.

constexpr int kLanes = 16;
typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));

// 16 values from p as float32.
inline f16v load16(const float* p) {
  f16v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f16v load16(const uint16_t* p) {
  h16v h;
  std::memcpy(&h, p, sizeof h);
  u16v bits = __builtin_convertvector(h, u16v) << 16;
  f16v v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline float to_float(uint16_t v) { return bf16_to_float(v); }
inline float to_float(float v) { return v; }
// a row of D values as float32 (exact), 16 at a time
template <typename T>
inline void to_floats(const T* p, int64_t D, float* out) {
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    f16v r = load16(p + d);
    std::memcpy(out + d, &r, sizeof r);
  }
  for (; d < D; d++) out[d] = to_float(p[d]);
}

inline void store_value(float f, float* out) { *out = f; }
inline void store_value(float f, uint16_t* out) {  // round to nearest even (finite values)
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  *out = uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// exp(x) for x <= 0 within ~2 ulp: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r times 2^n.
inline f16v exp_nonpositive(f16v x) {
  x = x < -87.0f ? f16v{} - 87.0f : x;
  const f16v n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest
  const f16v r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  f16v p = f16v{} + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
  f16v scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

template <typename T>
void attention_impl(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_ring,
                    const at::Tensor& v_ring, int64_t start, int64_t window, int64_t W, int64_t D, at::Tensor& out) {
  // the ring is [blocks, kv_heads, KB, D]: index i of head g at ((i / KB) * KVH + g) * KB + i % KB
  const int64_t n = q.size(0), H = q.size(1) / D, KVH = k_new.size(1) / D, KB = k_ring.size(2), G = H / KVH;
  const int64_t per_tile = kLanes / G, tiles = (n + per_tile - 1) / per_tile;  // queries per tile of 16 lanes
  const T* qp = (const T*)q.data_ptr();
  const T* knp = (const T*)k_new.data_ptr();
  const T* vnp = (const T*)v_new.data_ptr();
  const T* krp = (const T*)k_ring.data_ptr();
  const T* vrp = (const T*)v_ring.data_ptr();
  T* op = (T*)out.data_ptr();
  const int64_t qs = q.stride(0), ks = k_new.stride(0), vs = v_new.stride(0);
  const float scale = 1.0f / std::sqrt(float(D));
  at::parallel_for(0, KVH * tiles, 1, [&](int64_t begin, int64_t end) {
    // 64-byte aligned scratch: q per dim [D] and the output [D] as lanes, the row [D], scores per key
    at::Tensor scratch = at::empty({(2 * D + window + per_tile) * kLanes + 2 * D + kLanes}, at::kFloat);
    f16v* qt = (f16v*)scratch.data_ptr<float>();
    f16v* o = qt + D;
    f16v* e = o + D;
    float* row = (float*)(e + window + per_tile);
    for (int64_t job = begin; job < end; job++) {
      const int64_t g = job / tiles, i0 = job % tiles * per_tile, nq = std::min(per_tile, n - i0);
      const int64_t pos0 = start + i0, lo = std::max<int64_t>(0, pos0 - window + 1), count = pos0 + nq - lo;
      auto at = [&](int64_t p) { return ((p % W / KB * KVH + g) * KB + p % W % KB) * D; };
      auto key = [&](int64_t p) { return p < start ? krp + at(p) : knp + (p - start) * ks + g * D; };
      auto value = [&](int64_t p) { return p < start ? vrp + at(p) : vnp + (p - start) * vs + g * D; };
      // lane l: query i0 + l / G, head g * G + l % G; zeros in lanes past the last query
      i16v qpos;
      for (int l = 0; l < kLanes; l++) {
        const int64_t i = l / G, h = g * G + l % G;
        qpos[l] = i < nq ? int32_t(pos0 - lo + i) : -int32_t(window);  // relative to lo; a lane without a query sees no key
        for (int64_t d = 0; d < D; d++) qt[d][l] = i < nq ? to_float(qp[(i0 + i) * qs + h * D + d]) : 0.0f;
      }
      f16v top = f16v{} - INFINITY;
      for (int64_t j = 0; j < count; j++) {
        const T* kp = key(lo + j);
        to_floats(kp, D, row);
        f16v s0 = {}, s1 = {}, s2 = {}, s3 = {};  // four chains of dims (D is a multiple of 8)
        for (int64_t d = 0; d < D; d += 4) {
          s0 += row[d] * qt[d];
          s1 += row[d + 1] * qt[d + 1];
          s2 += row[d + 2] * qt[d + 2];
          s3 += row[d + 3] * qt[d + 3];
        }
        const f16v s = (s0 + s1) + (s2 + s3);
        const i16v age = qpos - int32_t(j);
        e[j] = (age >= 0) & (age < int32_t(window)) ? s * scale : f16v{} - INFINITY;
        top = e[j] > top ? e[j] : top;
      }
      f16v sum = {};
      for (int64_t j = 0; j < count; j++) {
        e[j] = e[j] == -INFINITY ? f16v{} : exp_nonpositive(e[j] - top);
        sum += e[j];
      }
      for (int64_t d = 0; d < D; d++) o[d] = f16v{};
      int64_t j = 0;
      for (; j + 2 <= count; j += 2) {  // two keys per pass over the output (the same sums, in order)
        to_floats(value(lo + j), D, row);
        to_floats(value(lo + j + 1), D, row + D);
        for (int64_t d = 0; d < D; d++) o[d] = (o[d] + row[d] * e[j]) + row[D + d] * e[j + 1];
      }
      for (; j < count; j++) {
        to_floats(value(lo + j), D, row);
        for (int64_t d = 0; d < D; d++) o[d] += row[d] * e[j];
      }
      const f16v inv = 1.0f / sum;
      for (int l = 0; l < kLanes; l++) {
        const int64_t i = l / G, h = g * G + l % G;
        if (i >= nq) continue;
        for (int64_t d = 0; d < D; d++) store_value(o[d][l] * inv[l], op + (i0 + i) * H * D + h * D + d);
      }
    }
  });
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_ring,
                     const at::Tensor& v_ring, int64_t start, int64_t window, int64_t head_dim, int64_t capacity) {
  for (const at::Tensor* t : {&q, &k_new, &v_new})
    TORCH_CHECK(t->dim() == 2 && t->stride(1) == 1 && t->size(1) % head_dim == 0, "attention: q, k and v are [n, heads * head_dim] rows");
  for (const at::Tensor* t : {&k_ring, &v_ring})
    TORCH_CHECK(t->dim() == 4 && t->is_contiguous() && t->size(3) == head_dim,
                "attention: the ring is [blocks, kv_heads, block, head_dim]");
  const int64_t n = q.size(0), H = q.size(1) / head_dim, KVH = k_new.size(1) / head_dim;
  TORCH_CHECK(k_new.size(0) == n && v_new.size(0) == n && v_new.size(1) == k_new.size(1) && H % KVH == 0 &&
              k_ring.size(1) == KVH && v_ring.sizes() == k_ring.sizes(), "attention: shapes do not match");
  TORCH_CHECK(capacity > 0 && capacity <= k_ring.size(0) * k_ring.size(2), "attention: the ring holds fewer than capacity slots");
  TORCH_CHECK(start == 0 || capacity >= window, "attention: the ring holds fewer slots than the window");
  TORCH_CHECK(kLanes % (H / KVH) == 0, "attention: the heads per kv head must divide ", kLanes);
  TORCH_CHECK(head_dim % 8 == 0, "attention: head_dim must be a multiple of 8");
  const auto type = q.scalar_type();
  for (const at::Tensor* t : {&k_new, &v_new, &k_ring, &v_ring})
    TORCH_CHECK(t->scalar_type() == type && t->device().is_cpu(), "attention: CPU tensors of one dtype");
  at::Tensor out = at::empty({n, H * head_dim}, q.options());
  if (type == at::kBFloat16) attention_impl<uint16_t>(q, k_new, v_new, k_ring, v_ring, start, window, capacity, head_dim, out);
  else if (type == at::kFloat) attention_impl<float>(q, k_new, v_new, k_ring, v_ring, start, window, capacity, head_dim, out);
  else TORCH_CHECK(false, "attention: bfloat16 or float32");
  return out;
}

}  // namespace

TORCH_LIBRARY(voxlive, m) {
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor q, Tensor scale, Tensor zero) -> Tensor");
  m.def("linear_bf16_amx(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("bf16_tiles(Tensor w) -> Tensor");
  m.def("amx_ready() -> bool", [] { return amx_permitted(); });
  m.def("attention(Tensor q, Tensor k_new, Tensor v_new, Tensor k_ring, Tensor v_ring, int start, int window, int head_dim, int capacity) -> Tensor");
}

TORCH_LIBRARY_IMPL(voxlive, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("linear_bf16_amx", &linear_bf16_amx);
  m.impl("attention", &attention);
  m.impl("bf16_tiles", &bf16_tiles);
}
