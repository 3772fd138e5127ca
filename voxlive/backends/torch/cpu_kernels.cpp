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
// These kernels' cost grows with the rows (the vector units do every row's products). On CPUs with AMX
// (Sapphire Rapids on) tile kernels take bf16, int8 and int4 weights instead, one pass over the weights
// for up to 16 rows at nearly one row's cost (below: "bf16 with AMX", "int8 and int4 weights with AMX");
// int4 passes of up to 4 rows there take vector products of the same tile order (int4_block_vnni).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

namespace {

constexpr int64_t kPrefetch = 512;  // bytes ahead of the current position in a weight row (measured best)
constexpr int kRows = 4;            // activation rows per pass over a weight row (accumulators held in registers)
constexpr float kInt16Max = 16383;  // activations as int16: see kMaxInputs
constexpr int64_t kGroup = 64;      // int4 group size this kernel reads (the decoder's default)
constexpr int64_t kMaxGroups = 512; // int4: at most 32768 inputs
constexpr int kInt4VnniRows = 4;         // int4 with AMX: passes of up to this many rows take vector products
constexpr int64_t kInt4VnniAhead = 4096;  // ... prefetching this far ahead into L2 (measured best: ~25 % faster)

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

// Each row x / scale rounded half to even, scale = max |x| / kInt16Max (at least 1e-30 / kInt16Max), in
// one pass over the rows instead of a tensor op per step (which cost more than a decode pass's products).
Int16Rows quantize_rows(const at::Tensor& x) {
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1);
  at::Tensor q = at::empty({M, K}, xf.options().dtype(at::kShort)), scale = at::empty({M}, xf.options());
  const float* xp = xf.data_ptr<float>();
  int16_t* qp = q.data_ptr<int16_t>();
  float* sp = scale.data_ptr<float>();
  for (int64_t m = 0; m < M; m++) {
    const float* row = xp + m * K;
    float top = 0;
#pragma omp simd reduction(max : top)
    for (int64_t k = 0; k < K; k++) top = std::max(top, std::fabs(row[k]));
    const float s = std::max(top, 1e-30f) / kInt16Max;
    sp[m] = s;
#pragma omp simd
    for (int64_t k = 0; k < K; k++) qp[m * K + k] = int16_t(std::rint(row[k] / s));
  }
  return {q, scale};
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

// Calls f.template operator()<R>() with R = rows, a compile-time constant in 1..Max (Max for more rows).
template <int Max = kRows, int R = 1, typename F>
void with_rows(int64_t rows, const F& f) {
  if constexpr (R < Max) {
    if (rows != R) return with_rows<Max, R + 1>(rows, f);
  }
  f.template operator()<R>();
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
struct alignas(64) TransposeIndex {
  int lo[4][16], hi[4][16];  // per round (bit b = 1 << round): the lanes each pair of rows takes
};
constexpr TransposeIndex transpose_index() {
  TransposeIndex t{};
  for (int round = 0; round < 4; round++)
    for (int l = 0, b = 1 << round; l < 16; l++) t.lo[round][l] = (l & b) ? 16 + l - b : l, t.hi[round][l] = (l & b) ? 16 + l : l + b;
  return t;
}
constexpr TransposeIndex kTransposeIndex = transpose_index();  // a constant: built once, not per call
inline void transpose16(__m512 r[16]) {
  for (int round = 0, b = 1; b < 16; b <<= 1, round++) {
    const __m512i ilo = _mm512_load_si512(kTransposeIndex.lo[round]), ihi = _mm512_load_si512(kTransposeIndex.hi[round]);
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

// ---- int8 and int4 weights with AMX: exact integer sums for any number of rows ----------------------
// The activations are quantized per row to int16 as for the VNNI kernels, then split exactly into two
// int8 halves, x = 256 hi + lo (hi = (x + 128) >> 8 in [-64, 64], lo in [-128, 127]). Tile dot products
// of the weights with each half (tdpbssd for int8 weights, tdpbusd for int4 nibbles, which are unsigned)
// give int32 sums that are exact, so 256 hi-sum + lo-sum is exactly the int16 kernels' integer dot
// product, and no blocking of the inputs or rows can change it: a row's result depends on that row alone.
// One tile of weights (16 rows x 64 inputs) meets up to 16 activation rows at once, so a pass of 1 to 16
// rows reads the weights once at nearly the same cost.

// hi of x = 256 hi + lo: the floor of (x + 128) / 256, so that lo is in [-128, 127].
inline int high_half(int x) { return (x + 128) >> 8; }

// x [M, K] -> its int16 quantization split into halves, packed as the tiles' B operand:
// [Mb, K / 64, 2 (hi, lo), 16 input quads, 16 rows, 4], zero rows past M; and the per-row scales.
struct Int8Halves {
  at::Tensor tiles;  // int8
  at::Tensor q;      // [M, K] int16
  at::Tensor scale;  // [M] float32
};

Int8Halves int8_halves(const at::Tensor& x_in) {
  Int16Rows x = quantize_rows(x_in);
  const int64_t M = x_in.size(0), K = x_in.size(1), Mb = (M + 15) / 16, Kb = K / 64;
  at::Tensor tiles = at::zeros({Mb, Kb, 2, 1024}, x_in.options().dtype(at::kChar));
  const int16_t* q = x.q.data_ptr<int16_t>();
  int8_t* t = tiles.data_ptr<int8_t>();
  for (int64_t m = 0; m < M; m++)
    for (int64_t k = 0; k < K; k++) {
      const int v = q[m * K + k], hi = high_half(v);
      int8_t* at = t + ((m / 16 * Kb + k / 64) * 2) * 1024 + (k % 64 / 4) * 64 + (m % 16) * 4 + k % 4;
      at[0] = int8_t(hi);
      at[1024] = int8_t(v - 256 * hi);
    }
  return {tiles, x.q, x.scale};
}

// w [N, K] int8 -> the tile order the AMX kernel reads, [N / 16, K / 64, 16, 64].
at::Tensor int8_tiles(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.size(0) % 16 == 0 && w.size(1) % 64 == 0,
              "int8_tiles: int8 [N, K] with N a multiple of 16 and K of 64, got ", w.sizes());
  return w.view({w.size(0) / 16, 16, w.size(1) / 64, 64}).transpose(1, 2).contiguous();
}

// The int32 sums (hi and lo halves) of NB blocks of 16 weight rows (w: their Kb tiles, one block after
// the other) by one block of 16 activation rows (x: Kb pairs of hi and lo tiles), input blocks kb0..kb1,
// accumulated onto c (4 tiles: block 0 hi, lo, block 1 hi, lo; zeros when kb0 == 0).
template <int NB>
AMX_TARGET void amx_int8_tiles(const int8_t* w, const int8_t* x, int64_t Kb, int64_t kb0, int64_t kb1, int32_t* c) {
  if (kb0 == 0) {
    _tile_zero(0);
    _tile_zero(1);
    if (NB > 1) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, c, 64);
    _tile_loadd(1, c + 256, 64);
    if (NB > 1) {
      _tile_loadd(2, c + 512, 64);
      _tile_loadd(3, c + 768, 64);
    }
  }
  for (int64_t kb = kb0; kb < kb1; kb++) {
    _tile_loadd(6, x + kb * 2048, 64);
    _tile_loadd(7, x + kb * 2048 + 1024, 64);
    _tile_loadd(4, w + kb * 1024, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    if (NB > 1) {
      _tile_loadd(5, w + (Kb + kb) * 1024, 64);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  if (NB > 1) {
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
  }
}

// 256 hi + lo of 16 int32 sums, exactly (in float64), rounded once to float32.
AMX_TARGET inline __m512 combine_halves(const int32_t* hi, const int32_t* lo) {
  const __m512d k256 = _mm512_set1_pd(256.0);
  const __m256i h0 = _mm256_loadu_si256((const __m256i*)hi), h1 = _mm256_loadu_si256((const __m256i*)(hi + 8));
  const __m256i l0 = _mm256_loadu_si256((const __m256i*)lo), l1 = _mm256_loadu_si256((const __m256i*)(lo + 8));
  const __m256 a = _mm512_cvtpd_ps(_mm512_fmadd_pd(_mm512_cvtepi32_pd(h0), k256, _mm512_cvtepi32_pd(l0)));
  const __m256 b = _mm512_cvtpd_ps(_mm512_fmadd_pd(_mm512_cvtepi32_pd(h1), k256, _mm512_cvtepi32_pd(l1)));
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(a)), _mm256_castps_pd(b), 1));
}

at::Tensor linear_int8_amx(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 4 && w.size(2) == 16 && w.size(3) == 64 && w.is_contiguous() &&
              w.scalar_type() == at::kChar, "linear_int8_amx: x [M, K] and an int8 weight in tile order (int8_tiles)");
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "linear_int8_amx: CPU tensors only");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w.size(0) * 16, Kb = K / 64;
  TORCH_CHECK(w.size(1) == Kb && K % 64 == 0, "linear_int8_amx: x has ", K, " inputs, the weight ", w.size(1) * 64);
  TORCH_CHECK(K <= kMaxInputs, "linear_int8_amx: at most ", kMaxInputs, " inputs");
  TORCH_CHECK(scale.numel() == N && scale.is_contiguous(), "linear_int8_amx: one scale per output");
  TORCH_CHECK(amx_permitted(), "linear_int8_amx: the kernel did not grant the AMX tile registers");
  const Int8Halves x = int8_halves(x_in);
  const int64_t Mb = (M + 15) / 16;
  at::Tensor y = at::empty({M, N}, x.scale.options());
  auto wp = w.data_ptr<int8_t>();
  auto xp = x.tiles.data_ptr<int8_t>();
  auto xs = x.scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const Scales ws = scales_of(scale);
  // As for bf16: ranges of kKc input blocks whose weight tiles stay in L1 while the activation blocks pass.
  constexpr int64_t kKc = 8;
  at::parallel_for(0, (N + 31) / 32, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    std::vector<int32_t> sums(Mb * 1024);
    for (int64_t np = begin; np < end; np++) {
      const int64_t n0 = np * 32, nb = std::min<int64_t>(2, (N - n0) / 16);
      const int8_t* wn = wp + n0 * K;
      for (int64_t kb0 = 0; kb0 < Kb; kb0 += kKc) {
        const int64_t kb1 = std::min(Kb, kb0 + kKc);
        for (int64_t mb = 0; mb < Mb; mb++) {
          int32_t* c = sums.data() + mb * 1024;
          if (nb == 2) amx_int8_tiles<2>(wn, xp + mb * Kb * 2048, Kb, kb0, kb1, c);
          else amx_int8_tiles<1>(wn, xp + mb * Kb * 2048, Kb, kb0, kb1, c);
          if (kb1 < Kb) continue;
          const int64_t rows = std::min<int64_t>(16, M - mb * 16);
          for (int64_t i = 0; i < nb; i++) {
            __m512 r[16];
            alignas(64) float s[16];
            for (int j = 0; j < 16; j++) r[j] = combine_halves(c + i * 512 + 16 * j, c + i * 512 + 256 + 16 * j);
            for (int j = 0; j < 16; j++) s[j] = ws[n0 + 16 * i + j];
            transpose16(r);
            const __m512 sv = _mm512_load_ps(s);
            for (int64_t m = 0; m < rows; m++)
              _mm512_storeu_ps(yp + (mb * 16 + m) * N + n0 + 16 * i,
                               _mm512_mul_ps(_mm512_mul_ps(r[m], sv), _mm512_set1_ps(xs[mb * 16 + m])));
          }
        }
      }
    }
    release_tiles();
  });
  return y.to(x_in.scalar_type());
}

// int4 (groups of 64 inputs, asymmetric). Each tile product is one group: the activations' hi or lo
// halves of 16 rows (the A operand, [16 rows, 64 inputs], read in place) by the group's nibbles of 16
// weight rows (the B operand, [16 input quads, 16 weight rows x 4], unsigned), tdpbsud. The result's rows
// are activation rows and its lanes weight rows, so each activation row's 16 outputs are scaled with
// vectors of the 16 rows' scales and zeros, and a pass of one row costs one row's scaling, not 16.

// The packed nibbles [N, K / 2] (byte j of a group: input 2j in the high nibble, 2j + 1 in the low one)
// -> per block of 16 rows and group, one B tile in 512 bytes [N / 16, G, 8, 64]: byte p of row j holds
// B[j][p] in its low nibble and B[j + 8][p] in its high one, B[k4][4 i + t] = weight row i's input 4 k4 + t.
at::Tensor int4_tiles(const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() && q.size(0) % 16 == 0 &&
              q.size(1) % 32 == 0, "int4_tiles: packed uint8 [N, K / 2] with N a multiple of 16 and K of 64, got ", q.sizes());
  const int64_t N = q.size(0), half = q.size(1), G = half / 32;
  at::Tensor t = at::empty({N / 16, G, 8, 64}, q.options());
  const uint8_t* src = q.data_ptr<uint8_t>();
  uint8_t* dst = t.data_ptr<uint8_t>();
  auto nibble = [&](int64_t row, int64_t k) { return (src[row * half + k / 2] >> (k % 2 ? 0 : 4)) & 15; };
  at::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b++)
      for (int64_t g = 0; g < G; g++)
        for (int64_t j = 0; j < 8; j++)
          for (int64_t p = 0; p < 64; p++) {
            const int64_t row = b * 16 + p / 4, k = g * kGroup + 4 * j + p % 4;
            dst[((b * G + g) * 8 + j) * 64 + p] = uint8_t(nibble(row, k) | (nibble(row, k + 32) << 4));
          }
  });
  return t;
}

// scale and zero [N, G] bfloat16 -> per block of 16 rows and group, the 16 scales then the 16 zeros.
at::Tensor int4_tile_scales(const at::Tensor& scale, const at::Tensor& zero) {
  TORCH_CHECK(scale.dim() == 2 && scale.sizes() == zero.sizes() && scale.size(0) % 16 == 0 &&
              scale.scalar_type() == at::kBFloat16 && zero.scalar_type() == at::kBFloat16,
              "int4_tile_scales: bfloat16 scales and zeros [N, G], N a multiple of 16");
  const int64_t N = scale.size(0), G = scale.size(1);
  return at::stack({scale.view({N / 16, 16, G}), zero.view({N / 16, 16, G})}, 1).permute({0, 3, 1, 2}).contiguous();
}

// Tiles of R rows for the C and A operands of the int4 kernel (C: tmm0-3, B: tmm4-5, A: tmm6-7), so that a
// pass of few rows spends few cycles in the tile unit. Constants in memory, as kFullTiles.
constexpr TileConfig int4_tiles_config(int R) {
  TileConfig c;
  for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = t == 4 || t == 5 ? 16 : R;
  return c;
}
template <int... R>
constexpr std::array<TileConfig, sizeof...(R)> int4_tile_configs(std::integer_sequence<int, R...>) {
  return {int4_tiles_config(R + 1)...};
}
constexpr auto kInt4Tiles = int4_tile_configs(std::make_integer_sequence<int, 16>());  // [R - 1]: R rows

// One group: the nibbles unpacked into buf (a B tile), its products with the hi and lo halves of the
// activations (x_hi, x_lo: the group's first input of the block's first row, rows `stride` bytes apart)
// stored in c (hi, then lo). T picks the tile registers (0: C in tmm0-1, B in tmm4; 1: tmm2-3, tmm5) so
// that consecutive groups overlap.
template <int T>
AMX_TARGET __attribute__((always_inline)) inline void int4_group_tiles(const uint8_t* w, const int8_t* x_hi,
                                                                       const int8_t* x_lo, int64_t stride,
                                                                       uint8_t* buf, int32_t* c) {
  const __m512i low = _mm512_set1_epi8(15);
  for (int j = 0; j < 8; j++) {
    const __m512i v = _mm512_loadu_si512(w + 64 * j);
    _mm512_store_si512(buf + 64 * j, _mm512_and_si512(v, low));
    _mm512_store_si512(buf + 64 * (j + 8), _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
  }
  _tile_loadd(6, x_hi, stride);
  _tile_loadd(7, x_lo, stride);
  // (the intrinsics take the tile numbers as literals)
#define VOXLIVE_INT4_TILES(hi, lo, b) \
  _tile_loadd(b, buf, 64);            \
  _tile_zero(hi);                     \
  _tile_zero(lo);                     \
  _tile_dpbsud(hi, 6, b);             \
  _tile_dpbsud(lo, 7, b);             \
  _tile_stored(hi, c, 64);            \
  _tile_stored(lo, c + 256, 64);
  if constexpr (T == 0) {
    VOXLIVE_INT4_TILES(0, 1, 4)
  } else {
    VOXLIVE_INT4_TILES(2, 3, 5)
  }
#undef VOXLIVE_INT4_TILES
}

// acc (one activation row; lanes: the 16 weight rows) += scale * d + (zero - 8 scale) * xsum, d the group's
// exact integer sums 256 hi + lo (below 2^24: exact in float32) and xsum the row's sum of the group's
// activations: two float32 multiply-adds, the same whichever kernel summed d. sz: the group's 16 scales,
// then its 16 zeros.
struct Int4GroupScales {
  __m512 s, offset;
  explicit Int4GroupScales(const uint16_t* sz)
      : s(load_bf16x16(sz, 0xFFFF)), offset(_mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, load_bf16x16(sz + 16, 0xFFFF))) {}
  __m512 add(__m512 acc, __m512i d, float xsum) const {
    return _mm512_fmadd_ps(offset, _mm512_set1_ps(xsum), _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(d), acc));
  }
};

// The group's C tiles (hi, then lo) added onto acc for R rows.
template <int R>
AMX_TARGET __attribute__((always_inline)) inline void int4_group_sums(const int32_t* c, const uint16_t* sz,
                                                                      const float* xsum, int64_t G, __m512 acc[R]) {
  const Int4GroupScales scales(sz);
  for (int r = 0; r < R; r++) {
    const __m512i d = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(c + 16 * r), 8), _mm512_load_si512(c + 256 + 16 * r));
    acc[r] = scales.add(acc[r], d, xsum[r * G]);
  }
}

// 16 weight rows (w: their G B tiles, sz: their scales and zeros) by R activation rows (x_hi, x_lo: their
// halves, rows K bytes apart; xsum: their groups' sums [R, G]; xs: their scales), of which the first
// `rows` are stored in y (rows of N floats).
template <int R>
AMX_TARGET void int4_block(const uint8_t* w, const uint16_t* sz, const int8_t* x_hi, const int8_t* x_lo, int64_t K,
                           const float* xsum, const float* xs, int64_t G, int64_t rows, float* y, int64_t N) {
  alignas(64) uint8_t buf[2][1024];
  alignas(64) int32_t c[2][512];
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  // group g + 1's tiles are issued before group g's sums, so the tile unit and the vector units overlap
  int4_group_tiles<0>(w, x_hi, x_lo, K, buf[0], c[0]);
  for (int64_t g = 0; g < G; g += 2) {
    if (g + 1 < G)
      int4_group_tiles<1>(w + (g + 1) * 512, x_hi + (g + 1) * kGroup, x_lo + (g + 1) * kGroup, K, buf[1], c[1]);
    int4_group_sums<R>(c[0], sz + g * 32, xsum + g, G, acc);
    if (g + 2 < G)
      int4_group_tiles<0>(w + (g + 2) * 512, x_hi + (g + 2) * kGroup, x_lo + (g + 2) * kGroup, K, buf[0], c[0]);
    if (g + 1 < G) int4_group_sums<R>(c[1], sz + (g + 1) * 32, xsum + g + 1, G, acc);
  }
  for (int64_t r = 0; r < rows; r++) _mm512_storeu_ps(y + r * N, _mm512_mul_ps(acc[r], _mm512_set1_ps(xs[r])));
}

// What int4_block computes, for a pass of few rows, with vector products instead of tiles: there the tile
// unit's fixed cost per group (the nibbles unpacked into a B tile, C stored and reloaded) exceeds the products,
// while vpdpbusd reads the tile order as it is. Row j of a group's tile holds in 32-bit lane i weight row i's
// inputs 4j..4j+3 (low nibbles) and 32+4j..35+4j (high nibbles), so vpdpbusd by those 4 activation bytes,
// broadcast, adds to each lane its weight row's products: the same exact integer sums as the tiles.
template <int R>
void int4_block_vnni(const uint8_t* w, const uint16_t* sz, const int8_t* x_hi, const int8_t* x_lo, int64_t K,
                     const float* xsum, const float* xs, int64_t G, int64_t rows, float* y, int64_t N) {
  const __m512i low = _mm512_set1_epi8(15);
  auto quad = [](const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
  };
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++, w += 512) {
    __m512i hi[R][2], lo[R][2];  // per row: the sums over the low and the high nibbles
    for (int r = 0; r < R; r++) hi[r][0] = hi[r][1] = lo[r][0] = lo[r][1] = _mm512_setzero_si512();
    for (int j = 0; j < 8; j++) {
      _mm_prefetch((const char*)(w + 64 * j + kInt4VnniAhead), _MM_HINT_T2);
      const __m512i v = _mm512_loadu_si512(w + 64 * j);
      const __m512i n0 = _mm512_and_si512(v, low), n1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int r = 0; r < R; r++) {
        const int8_t *h = x_hi + r * K + g * kGroup + 4 * j, *l = x_lo + r * K + g * kGroup + 4 * j;
        hi[r][0] = _mm512_dpbusd_epi32(hi[r][0], n0, quad(h));
        hi[r][1] = _mm512_dpbusd_epi32(hi[r][1], n1, quad(h + 32));
        lo[r][0] = _mm512_dpbusd_epi32(lo[r][0], n0, quad(l));
        lo[r][1] = _mm512_dpbusd_epi32(lo[r][1], n1, quad(l + 32));
      }
    }
    const Int4GroupScales scales(sz + g * 32);
    for (int r = 0; r < R; r++) {
      const __m512i d = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(hi[r][0], hi[r][1]), 8),
                                         _mm512_add_epi32(lo[r][0], lo[r][1]));
      acc[r] = scales.add(acc[r], d, xsum[r * G + g]);
    }
  }
  for (int64_t r = 0; r < rows; r++) _mm512_storeu_ps(y + r * N, _mm512_mul_ps(acc[r], _mm512_set1_ps(xs[r])));
}

AMX_TARGET void configure_int4_tiles(int64_t rows) { _tile_loadconfig(&kInt4Tiles[rows - 1]); }

at::Tensor linear_int4_amx(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& sz) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 4 && w.size(2) == 8 && w.size(3) == 64 && w.is_contiguous() &&
              w.scalar_type() == at::kByte, "linear_int4_amx: x [M, K] and a weight in tile order (int4_tiles)");
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "linear_int4_amx: CPU tensors only");
  const int64_t M = x_in.size(0), K = x_in.size(1), Nb = w.size(0), N = Nb * 16, G = w.size(1);
  TORCH_CHECK(K == G * kGroup, "linear_int4_amx: x has ", K, " inputs, the weight ", G * kGroup);
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 4 && sz.size(0) == Nb &&
              sz.size(1) == G && sz.size(2) == 2 && sz.size(3) == 16, "linear_int4_amx: scales in tile order (int4_tile_scales)");
  TORCH_CHECK(amx_permitted(), "linear_int4_amx: the kernel did not grant the AMX tile registers");
  Int16Rows x = quantize_rows(x_in);
  const int64_t Mb = (M + 15) / 16;
  // the halves x = 256 hi + lo (high_half), [2, Mb * 16, K] with zero rows past M, and each group's sum
  // of activations (exact: below 2^24), in one pass: as tensor ops they cost more than a pass of a few
  // rows' products (measured: ~0.2 ms a call at 9 rows)
  at::Tensor halves = at::zeros({2, Mb * 16, K}, x_in.options().dtype(at::kChar));
  at::Tensor xsum = at::zeros({Mb * 16, G}, x.scale.options());
  {
    const int16_t* q = x.q.data_ptr<int16_t>();
    int8_t *hi = halves.data_ptr<int8_t>(), *lo = hi + Mb * 16 * K;
    float* sums = xsum.data_ptr<float>();
    for (int64_t i = 0; i < M * G; i++) {
      int32_t sum = 0;
      for (int64_t k = i * kGroup; k < (i + 1) * kGroup; k++) {
        const int v = q[k], h = high_half(v);
        hi[k] = int8_t(h);
        lo[k] = int8_t(v - 256 * h);
        sum += v;
      }
      sums[i] = float(sum);
    }
  }
  at::Tensor y = at::empty({M, N}, x.scale.options());
  auto wp = w.data_ptr<uint8_t>();
  auto szp = (const uint16_t*)sz.data_ptr();
  auto hp = halves.data_ptr<int8_t>();
  auto xsp = xsum.data_ptr<float>();
  auto xs = x.scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, Nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t mb = 0; mb < Mb; mb++) {
      // tiles of exactly the block's rows, and a code path for each count
      const int64_t rows = std::min<int64_t>(16, M - mb * 16);
      const int8_t* xh = hp + mb * 16 * K;
      if (rows > kInt4VnniRows) configure_int4_tiles(rows);
      with_rows<16>(rows, [&]<int R>() {
        // few rows: vector products; more: tiles (only the one taken is instantiated)
        constexpr auto block = [] {
          if constexpr (R <= kInt4VnniRows) return &int4_block_vnni<R>;
          else return &int4_block<R>;
        }();
        for (int64_t nb = begin; nb < end; nb++)
          block(wp + nb * G * 512, szp + nb * G * 32, xh, xh + Mb * 16 * K, K, xsp + mb * 16 * G, xs + mb * 16,
                G, rows, yp + mb * 16 * N + nb * 16, N);
      });
    }
    release_tiles();
  });
  return y.to(x_in.scalar_type());
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

at::Tensor int8_tiles(const at::Tensor&) { TORCH_CHECK(false, "int8_tiles: not in the avx2 build"); }
at::Tensor int4_tiles(const at::Tensor&) { TORCH_CHECK(false, "int4_tiles: not in the avx2 build"); }
at::Tensor int4_tile_scales(const at::Tensor&, const at::Tensor&) { TORCH_CHECK(false, "int4_tile_scales: not in the avx2 build"); }
at::Tensor linear_int8_amx(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "linear_int8_amx: not in the avx2 build");
}
at::Tensor linear_int4_amx(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "linear_int4_amx: not in the avx2 build");
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


// ---- attention, every query computed on its own ----------------------------------------------------
// Causal sliding-window attention of a batch of streams, each feeding n >= 1 new positions, over its
// slot of a KV pool (the keys and values before the pass) and its new rows. One call per layer for the
// whole batch; the work is split into jobs of (stream, kv head, up to kJobRows query rows), each reading
// its slot's keys and values once for all the query heads and positions it holds (GQA heads together).
//
// Vector lanes run along the head dimension, so they are full for any number of queries: a key row is
// loaded once (dequantized to float32 for int8 pools) and dotted with every query row of the job, 16 keys
// at a time; the 16 partial-sum vectors are reduced by one 16x16 transpose-add to 16 scores. Every number
// is computed in a fixed order that depends on the query and its keys alone, never on the call's sizes:
// a score is its row's dims summed in one tree; the softmax's max is exact and its sum runs over keys in
// groups aligned to the stream's positions (lane = position mod 16), keys outside the window adding exact
// zeros; the output sums the weighted values key by key, oldest first. So a stream's numbers are the same
// in any chunking and any batch, and a decode step computes a position exactly as a prompt chunk would.
// The lanes are GCC vectors of 16 floats (one AVX-512 register, two AVX2 ones): one code path for both.

constexpr int kLanes = 16;
constexpr int64_t kJobRows = 64;   // query rows (positions x heads of a kv head) per job, at most
constexpr int64_t kAmxJobRows = 256;  // with AMX (below): the keys are packed once for all of them
constexpr int64_t kMinThreadWork = int64_t(1) << 18;  // multiply-adds a thread's share of a call, at least
constexpr int64_t kValueChunk = 64;  // value rows converted to float32 at a time (32 KB at head dim 128)
constexpr int kMaxSlabs = 4;         // 32 head dims a slab: head_dim up to 128
typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));

inline f16v load16(const float* p) {
  f16v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store16(float* p, f16v v) { std::memcpy(p, &v, sizeof v); }

inline float to_float(uint16_t v) { return bf16_to_float(v); }
inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return float(v); }

// A row's values as float32, 32 at a time (a slab, two vectors) in an order of the stored type's
// choosing: bfloat16 as the even elements, then the odd ones (a shift and a mask, no conversion);
// float32 and int8 in order. Queries are laid out in the keys' order; outputs are put back in place.
template <typename T>
struct Slab {
  static int at(int j) { return j; }  // where element j of a slab goes
};
template <>
struct Slab<uint16_t> {
  static int at(int j) { return (j & 1) * kLanes + j / 2; }
};
inline void load_slab(const uint16_t* p, float* out) {
  u16v x;
  std::memcpy(&x, p, sizeof x);
  const u16v even = x << 16, odd = x & 0xFFFF0000u;
  std::memcpy(out, &even, sizeof even);
  std::memcpy(out + kLanes, &odd, sizeof odd);
}
inline void load_slab(const float* p, float* out) { std::memcpy(out, p, 2 * kLanes * sizeof(float)); }
inline void load_slab(const int8_t* p, float* out) {  // GCC's generic widening of int8 vectors is scalar code
#if defined(__AVX512F__)
  for (int h = 0; h < 2; h++)
    _mm512_storeu_ps(out + h * kLanes, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + h * kLanes)))));
#else
  for (int h = 0; h < 4; h++)
    _mm256_storeu_ps(out + h * 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + h * 8)))));
#endif
}

// D values of a stored row as S slabs (zeros past D)
template <int S, typename T>
inline void load_row(const T* p, int64_t D, float* out) {
  int64_t d = 0;
  for (; d + 2 * kLanes <= D; d += 2 * kLanes) load_slab(p + d, out + d);
  if (d < S * 2 * kLanes) {  // a last part slab (head dims not a multiple of 32)
    T part[2 * kLanes] = {};
    std::memcpy(part, p + d, (D - d) * sizeof(T));
    load_slab(part, out + d);
  }
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

// out[l] = the sum of v[l]'s 16 lanes, for 16 vectors given in bit-reversed order (v[bitrev(l)] is key
// l's): four rounds, each adding lanes i and i + half of every vector's partial sums (pairs of vectors
// share a register), the same tree for every key.
template <int N>
inline void add_halves(f16v v[], i16v lo, i16v hi) {
  for (int i = 0; i < N; i++) v[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo) + __builtin_shuffle(v[2 * i], v[2 * i + 1], hi);
}
inline f16v transpose_add(f16v v[16]) {
  add_halves<8>(v, i16v{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                i16v{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  add_halves<4>(v, i16v{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                i16v{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  add_halves<2>(v, i16v{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                i16v{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  add_halves<1>(v, i16v{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                i16v{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
  return v[0];
}
constexpr int kBitReversed[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

inline float sum_lanes(f16v v) {  // a fixed tree
  float s[kLanes];
  std::memcpy(s, &v, sizeof s);
  for (int n = kLanes / 2; n >= 1; n /= 2)
    for (int l = 0; l < n; l++) s[l] += s[l + n];
  return s[0];
}
inline float max_lanes(f16v v) {
  float m = v[0];
  for (int l = 1; l < kLanes; l++) m = v[l] > m ? v[l] : m;
  return m;
}

// Where a stream's keys and values are: position p (relative to the stream's first) below `start` at
// index p % capacity of its pool slot [blocks, kv_heads, block, D] (scales [blocks, kv_heads, block]),
// from `start` on in the new rows (scales [rows, kv_heads]). A job looks rows up by `index` (Rows).
template <typename T>
struct Source {
  const T* pool;
  const float* pool_scale;
  const T* fresh;
  const float* fresh_scale;
  int64_t fresh_stride;
};

// The rows of kv head g at positions lo .. hi: pool rows by their index in the slot (>= 0), new rows
// as -1 - their row. Computed once per job, so the key loops do no division.
struct Rows {
  std::vector<int64_t> index;
  int64_t lo, start, KVH, g, D;
  void fill(int64_t lo_, int64_t hi, int64_t start_, int64_t capacity, int64_t KVH_, int64_t KB, int64_t g_, int64_t D_) {
    lo = lo_, start = start_, KVH = KVH_, g = g_, D = D_;
    index.resize(hi - lo);
    int64_t i = lo % capacity;
    for (int64_t p = lo; p < hi; p++) {
      index[p - lo] = p >= start ? -1 - (p - start) : (i / KB * KVH + g) * KB + i % KB;
      if (++i == capacity) i = 0;
    }
  }
  template <typename T>
  const T* row(const Source<T>& s, int64_t p) const {
    const int64_t i = index[p - lo];
    return i >= 0 ? s.pool + i * D : s.fresh + (-1 - i) * s.fresh_stride + g * D;
  }
  template <typename T>
  float scale(const Source<T>& s, int64_t p) const {
    if (!s.pool_scale) return 1.0f;
    const int64_t i = index[p - lo];
    return i >= 0 ? s.pool_scale[i] : s.fresh_scale[(-1 - i) * KVH + g];
  }
};

// A query's scores s[0 .. span) (the dots with keys a0 .., a0 a multiple of 16) -> its weights
// exp(score * scale - max), keys outside its window (`age`: its position - a0) weighing 0; returns 1 / their
// sum. The max is exact and the sum runs over groups of 16 keys aligned to the stream's positions, so
// neither depends on the span (keys outside the window add exact zeros).
inline float weigh_row(float* s, int64_t span, int64_t age, int64_t window, float scale) {
  const i16v lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  f16v top = f16v{} - INFINITY;
  for (int64_t a = 0; a < span; a += 16) {
    const i16v d = int32_t(age - a) - lane;  // query position - key position
    const f16v sc = load16(s + a) * scale, masked = (d >= 0) & (d < int32_t(window)) ? sc : f16v{} - INFINITY;
    store16(s + a, masked);
    top = masked > top ? masked : top;
  }
  const float m = max_lanes(top);
  f16v sum = {};
  for (int64_t a = 0; a < span; a += 16) {
    // below e^-87 (next to the row's largest weight, 1) a weight is 0: no denormals in the sums
    const f16v x = load16(s + a) - m, e = x < -87.0f ? f16v{} : exp_nonpositive(x);
    store16(s + a, e);
    sum += e;
  }
  return 1.0f / sum_lanes(sum);
}

struct Job {
  int64_t b, g, i0, i1;  // stream, kv head, its queries i0 .. i1 (positions start + i)
};

struct Scratch {  // one job's float32 buffers, and where its rows are
  std::vector<float> buf;
  Rows rows;
  float *q, *keys, *scores, *values, *out, *weights;
  void size(int64_t rows, int64_t span, int64_t Dp) {
    const int64_t need = rows * Dp + 16 * Dp + rows * span + kValueChunk * Dp + rows * Dp + rows * kValueChunk + kLanes;
    if (int64_t(buf.size()) < need) buf.resize(need);
    float* p = (float*)(((uintptr_t)buf.data() + 63) & ~uintptr_t(63));
    q = p, keys = q + rows * Dp, scores = keys + 16 * Dp, values = scores + rows * span, out = values + kValueChunk * Dp;
    weights = out + rows * Dp;
  }
};

// out[i] += the sum over keys p = c0 .. c1 of w[i][p - c0] * value p (rows of Dp floats from c0), for RT rows
template <int RT, int NV>
inline void weigh_values(const float* values, int64_t keys, const float* w, int64_t span, float* out) {
  constexpr int64_t Dp = NV * kLanes;
  f16v acc[RT][NV];
  for (int i = 0; i < RT; i++)
    for (int v = 0; v < NV; v++) acc[i][v] = load16(out + i * Dp + v * kLanes);
  for (int64_t p = 0; p < keys; p++) {
    const float* val = values + p * Dp;
    for (int i = 0; i < RT; i++) {
      const float wi = w[i * span + p];
      for (int v = 0; v < NV; v++) acc[i][v] += wi * load16(val + v * kLanes);
    }
  }
  for (int i = 0; i < RT; i++)
    for (int v = 0; v < NV; v++) store16(out + i * Dp + v * kLanes, acc[i][v]);
}

inline void prefetch_row(const void* p, int64_t bytes) {
  for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch((const char*)p + c, 0, 2);
}
constexpr int64_t kPrefetchRows = 128;  // rows ahead, into L2 (32 KB at head dim 128 in bf16): of 16, 32, 64 and
                                        // 128 rows, and L1 or L2, the fastest here (a loaded machine); none: half the speed

template <typename Q, typename T, int S>
void attend_job(const Job& job, const Q* qp, int64_t qs, const Source<T>& keys, const Source<T>& values, int64_t G,
                int64_t window, int64_t start, int64_t capacity, int64_t KVH, int64_t KB, int64_t D, Q* op, int64_t H,
                Scratch& s) {
  constexpr int NV = 2 * S;
  constexpr int64_t Dp = NV * kLanes;
  constexpr bool scaled = std::is_same_v<T, int8_t>;
  const int64_t n = job.i1 - job.i0, R = n * G, row_bytes = D * sizeof(T);
  const int64_t lo = std::max<int64_t>(0, start + job.i0 - window + 1), hi = start + job.i1, a0 = lo & ~int64_t(15);
  const int64_t span = (hi - a0 + 15) & ~int64_t(15);
  s.size(R, span, Dp);
  s.rows.fill(lo, hi, start, capacity, KVH, KB, job.g, D);
  const Rows& where = s.rows;
  const float scale = 1.0f / std::sqrt(float(D));
  // row r: query i0 + r / G, head g * G + r % G, in the keys' slab order
  for (int64_t r = 0; r < R; r++) {
    const Q* src = qp + (job.i0 + r / G) * qs + (job.g * G + r % G) * D;
    float* dst = s.q + r * Dp;
    std::memset(dst, 0, Dp * sizeof(float));
    for (int64_t d = 0; d < D; d++) dst[d / 32 * 32 + Slab<T>::at(d % 32)] = to_float(src[d]);
  }
  // scores, 16 keys at a time
  for (int64_t a = a0; a < hi; a += 16) {
    alignas(64) float key_scale[16];
    for (int t = 0; t < 16; t++) {
      const int64_t p = a + t;
      float* dst = s.keys + kBitReversed[t] * Dp;
      key_scale[t] = 0.0f;
      if (p < lo || p >= hi) {
        std::memset(dst, 0, Dp * sizeof(float));
        continue;
      }
      if (p + kPrefetchRows < hi) prefetch_row(where.row(keys, p + kPrefetchRows), row_bytes);
      load_row<S>(where.row(keys, p), D, dst);
      if (scaled) key_scale[t] = where.scale(keys, p);
    }
    for (int64_t r = 0; r < R; r++) {
      f16v qv[NV], part[16];
      for (int v = 0; v < NV; v++) qv[v] = load16(s.q + r * Dp + v * kLanes);
      for (int t = 0; t < 16; t++) {
        const float* k = s.keys + t * Dp;
        f16v acc = qv[0] * load16(k);
        for (int v = 1; v < NV; v++) acc += qv[v] * load16(k + v * kLanes);
        part[t] = acc;
      }
      f16v sc = transpose_add(part);
      if (scaled) sc *= load16(key_scale);
      store16(s.scores + r * span + (a - a0), sc);
    }
  }
  std::vector<float> inv(R);
  for (int64_t r = 0; r < R; r++) inv[r] = weigh_row(s.scores + r * span, span, start + job.i0 + r / G - a0, window, scale);
  // the weighted values, key by key, oldest first; rows RT at a time over chunks of loaded values
  constexpr int RT = NV >= 8 ? 2 : NV >= 4 ? 4 : 8;
  std::memset(s.out, 0, R * Dp * sizeof(float));
  for (int64_t c0 = lo; c0 < hi; c0 += kValueChunk) {
    const int64_t c1 = std::min(hi, c0 + kValueChunk), count = c1 - c0;
    for (int64_t p = c0; p < c1; p++) {
      if (p + kPrefetchRows < hi) prefetch_row(where.row(values, p + kPrefetchRows), row_bytes);
      load_row<S>(where.row(values, p), D, s.values + (p - c0) * Dp);
    }
    const float* w = s.scores + (c0 - a0);
    if (scaled) {  // int8: the weights times the values' scales, for this chunk
      for (int64_t r = 0; r < R; r++)
        for (int64_t p = c0; p < c1; p++) s.weights[r * kValueChunk + (p - c0)] = w[r * span + (p - c0)] * where.scale(values, p);
    }
    const float* wc = scaled ? s.weights : w;
    const int64_t ws = scaled ? kValueChunk : span;
    int64_t r0 = 0;
    for (; r0 + RT <= R; r0 += RT) weigh_values<RT, NV>(s.values, count, wc + r0 * ws, ws, s.out + r0 * Dp);
    for (; r0 < R; r0++) weigh_values<1, NV>(s.values, count, wc + r0 * ws, ws, s.out + r0 * Dp);
  }
  for (int64_t r = 0; r < R; r++) {
    Q* o = op + (job.i0 + r / G) * H * D + (job.g * G + r % G) * D;
    const float* res = s.out + r * Dp;
    for (int64_t d = 0; d < D; d++) store_value(res[d / 32 * 32 + Slab<T>::at(d % 32)] * inv[r], o + d);
  }
}

#if defined(__AVX512F__)  // the avx512 build only, as the other AMX kernels
// ---- attention with AMX: the same jobs, window and softmax, the two products on tiles ---------------
// bf16 queries, keys and values on CPUs with AMX (where the FMA loops above run at ~30 GFLOPS: the
// encoder, 32 heads of 64 dims over 750 keys for every frame, is compute-bound there). Float32 sums:
//   scores = Q K^T: tdpbf16ps of 16 query rows x 32 dims by 32 dims x 16 keys, the keys packed as pairs of
//            dims (a 16x16 transpose of 32-bit pairs); each score sums its 32-dim slabs in turn;
//   out = P V: 16 query rows x 32 keys by 32 keys x 16 dims, the values packed as pairs of keys and the
//            weights rounded to bfloat16 (as PyTorch's flash attention rounds them); each output sums tiles
//            of 32 keys aligned to the stream's positions (position mod 32), oldest first.
// Within a tile each product has a fixed place and a fixed order, keys outside a query's window weigh
// exact zeros, and the softmax is weigh_row's: nothing depends on the job's or the call's sizes, so a
// stream's numbers are the same in any chunking and any batch (they are not the FMA kernel's numbers).

constexpr int64_t kTileKeys = 32;  // keys per P V tile: the alignment of a job's keys
constexpr int64_t kKeyChunk = 128;  // keys packed at a time (K^T: 32 KB at head dim 128), used while in L1

struct AmxScratch {
  std::vector<float> buf;
  Rows rows;
  uint16_t *q, *p;  // A tiles: queries [QT][Dc][16 rows][32 dims]; weights of a chunk [chunk / 32][16][32 keys]
  int32_t *kt, *vt;  // B tiles: keys of a chunk [chunk / 16][Dc][16 dim pairs][16 keys]; values [chunk / 32][Dt][16 key pairs][16 dims]
  float *scores, *acc, *inv;  // [QT * 16][span]; the outputs' sums [QT][Dt][16 rows][16 dims]; 1 / weights' sums
  void size(int64_t QT, int64_t span, int64_t Dc) {
    const int64_t tiles = QT * Dc + kKeyChunk / 16 * Dc + kKeyChunk / 32 * 2 * Dc + kKeyChunk / 32 + QT * 2 * Dc;
    const int64_t need = tiles * 256 + QT * 16 * (span + 1) + 16;
    if (int64_t(buf.size()) < need) buf.resize(need);
    float* f = (float*)(((uintptr_t)buf.data() + 63) & ~uintptr_t(63));
    q = (uint16_t*)f, f += QT * Dc * 256;
    kt = (int32_t*)f, f += kKeyChunk / 16 * Dc * 256;
    vt = (int32_t*)f, f += kKeyChunk / 32 * 2 * Dc * 256;
    p = (uint16_t*)f, f += kKeyChunk / 32 * 256;
    acc = f, f += QT * 2 * Dc * 256;
    inv = f, f += QT * 16;
    scores = f;
  }
};

// Elements d0 .. d0 + 32 of a row of D (zeros past D, or for no row).
AMX_TARGET inline __m512i load_pairs(const uint16_t* row, int64_t d0, int64_t D) {
  if (!row) return _mm512_setzero_si512();
  if (D - d0 >= 32) return _mm512_loadu_si512(row + d0);
  return _mm512_maskz_loadu_epi16((__mmask32(1) << (D - d0)) - 1, row + d0);
}

// 16 keys (rows, null for none) as B tiles of 16 dim pairs x 16 keys, one per 32 dims: kt + dc * 256.
AMX_TARGET void pack_keys(const uint16_t* const rows[16], int64_t D, int64_t Dc, int32_t* kt) {
  for (int64_t dc = 0; dc < Dc; dc++) {
    __m512 r[16];
    for (int t = 0; t < 16; t++) r[t] = _mm512_castsi512_ps(load_pairs(rows[t], dc * 32, D));
    transpose16(r);  // r[i] lane t: key t's dims 2i, 2i + 1
    for (int i = 0; i < 16; i++) _mm512_store_ps((float*)kt + (dc * 16 + i) * 16, r[i]);
  }
}

// 32 keys' values (rows, null for none) as B tiles of 16 key pairs x 16 dims, one per 16 dims: vt + dt * 256.
AMX_TARGET void pack_values(const uint16_t* const rows[32], int64_t D, int64_t Dc, int32_t* vt) {
  alignas(64) static const uint16_t lo_index[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(lo_index), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int i = 0; i < 16; i++)
    for (int64_t dc = 0; dc < Dc; dc++) {
      const __m512i a = load_pairs(rows[2 * i], dc * 32, D), b = load_pairs(rows[2 * i + 1], dc * 32, D);
      _mm512_store_si512(vt + (2 * dc * 16 + i) * 16, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_store_si512(vt + ((2 * dc + 1) * 16 + i) * 16, _mm512_permutex2var_epi16(a, hi, b));
    }
}

// Scores of 16 query rows (q: Dc tiles) with J (2 or 4) blocks of 16 keys (kt: Dc tiles each), into
// out + 16 j (rows `stride` floats apart).
template <int J>
AMX_TARGET void amx_scores(const uint16_t* q, const int32_t* kt, int64_t Dc, float* out, int64_t stride) {
  static_assert(J == 2 || J == 4);
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (J > 2) _tile_zero(2);
  if constexpr (J > 2) _tile_zero(3);
  for (int64_t dc = 0; dc < Dc; dc++) {
    _tile_loadd(4, q + dc * 512, 64);
    _tile_loadd(5, kt + dc * 256, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, kt + (Dc + dc) * 256, 64);
    _tile_dpbf16ps(1, 4, 6);
    if constexpr (J > 2) {
      _tile_loadd(7, kt + (2 * Dc + dc) * 256, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, kt + (3 * Dc + dc) * 256, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, out, stride * 4);
  _tile_stored(1, out + 16, stride * 4);
  if constexpr (J > 2) _tile_stored(2, out + 32, stride * 4);
  if constexpr (J > 2) _tile_stored(3, out + 48, stride * 4);
}

// acc + 256 j (16 rows x 16 dims, float32) += the weights p (nk tiles of 16 rows x 32 keys) times the
// values' tiles j of each of them (vt + (kc * Dt + j) * 256), for J dim tiles.
template <int J>
AMX_TARGET void amx_weigh(const uint16_t* p, const int32_t* vt, int64_t nk, int64_t Dt, float* acc) {
  static_assert(J == 2 || J == 4);
  _tile_loadd(0, acc, 64);
  _tile_loadd(1, acc + 256, 64);
  if constexpr (J > 2) _tile_loadd(2, acc + 512, 64);
  if constexpr (J > 2) _tile_loadd(3, acc + 768, 64);
  for (int64_t kc = 0; kc < nk; kc++) {
    const int32_t* v = vt + kc * Dt * 256;
    _tile_loadd(4, p + kc * 512, 64);
    _tile_loadd(5, v, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, v + 256, 64);
    _tile_dpbf16ps(1, 4, 6);
    if constexpr (J > 2) {
      _tile_loadd(7, v + 512, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, v + 768, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, acc, 64);
  _tile_stored(1, acc + 256, 64);
  if constexpr (J > 2) _tile_stored(2, acc + 512, 64);
  if constexpr (J > 2) _tile_stored(3, acc + 768, 64);
}

AMX_TARGET void attend_job_amx(const Job& job, const uint16_t* qp, int64_t qs, const Source<uint16_t>& keys,
                               const Source<uint16_t>& values, int64_t G, int64_t window, int64_t start,
                               int64_t capacity, int64_t KVH, int64_t KB, int64_t D, uint16_t* op, int64_t H,
                               AmxScratch& s) {
  const int64_t n = job.i1 - job.i0, R = n * G, QT = (R + 15) / 16, Dc = (D + 31) / 32, Dt = 2 * Dc;
  const int64_t lo = std::max<int64_t>(0, start + job.i0 - window + 1), hi = start + job.i1;
  const int64_t a0 = lo & ~(kTileKeys - 1), span = (hi - a0 + kTileKeys - 1) & ~(kTileKeys - 1);
  s.size(QT, span, Dc);
  s.rows.fill(lo, hi, start, capacity, KVH, KB, job.g, D);
  const Rows& where = s.rows;
  auto row = [&](const Source<uint16_t>& src, int64_t p) { return p >= lo && p < hi ? where.row(src, p) : nullptr; };
  // Each tile of 16 query rows works on the keys its rows' windows cover, [from, to) relative to a0 in
  // whole tiles of keys: the keys it skips would weigh exact zeros, so skipping them changes no number.
  int64_t from[kAmxJobRows / 16], to[kAmxJobRows / 16];
  for (int64_t qt = 0; qt < QT; qt++) {
    const int64_t first = start + job.i0 + qt * 16 / G, last = start + job.i0 + (std::min(R, qt * 16 + 16) - 1) / G;
    from[qt] = (std::max<int64_t>(lo, first - window + 1) - a0) & ~(kTileKeys - 1);
    to[qt] = (last + 1 - a0 + kTileKeys - 1) & ~(kTileKeys - 1);
  }
  // queries as A tiles; rows past R zero (their weights are never stored)
  std::memset(s.q, 0, QT * Dc * 512 * sizeof(uint16_t));
  for (int64_t r = 0; r < R; r++) {
    const uint16_t* src = qp + (job.i0 + r / G) * qs + (job.g * G + r % G) * D;
    for (int64_t dc = 0; dc < Dc; dc++)
      _mm512_store_si512(s.q + ((r / 16) * Dc + dc) * 512 + (r % 16) * 32, load_pairs(src, dc * 32, D));
  }
  // scores, a chunk of keys at a time
  for (int64_t c0 = 0; c0 < span; c0 += kKeyChunk) {
    const int64_t c1 = std::min(span, c0 + kKeyChunk);
    for (int64_t kb = 0; kb < (c1 - c0) / 16; kb++) {
      const uint16_t* rows[16];
      for (int t = 0; t < 16; t++) rows[t] = row(keys, a0 + c0 + kb * 16 + t);
      pack_keys(rows, D, Dc, s.kt + kb * Dc * 256);
    }
    for (int64_t qt = 0; qt < QT; qt++) {
      const int64_t b0 = std::max(c0, from[qt]), b1 = std::min(c1, to[qt]);
      for (int64_t b = b0; b < b1; b += 64) {
        const uint16_t* q = s.q + qt * Dc * 512;
        const int32_t* kt = s.kt + (b - c0) / 16 * Dc * 256;
        float* out = s.scores + qt * 16 * span + b;
        if (b1 - b >= 64) amx_scores<4>(q, kt, Dc, out, span);  // else 32 keys (ranges are whole tiles of keys)
        else amx_scores<2>(q, kt, Dc, out, span);
      }
    }
  }
  const float scale = 1.0f / std::sqrt(float(D));
  float* inv = s.inv;
  for (int64_t r = 0; r < R; r++) {
    const int64_t f = from[r / 16];
    inv[r] = weigh_row(s.scores + r * span + f, to[r / 16] - f, start + job.i0 + r / G - a0 - f, window, scale);
  }
  // the weighted values, a chunk of keys at a time
  std::memset(s.acc, 0, QT * Dt * 256 * sizeof(float));
  for (int64_t c0 = 0; c0 < span; c0 += kKeyChunk) {
    const int64_t c1 = std::min(span, c0 + kKeyChunk);
    for (int64_t kc = 0; kc < (c1 - c0) / kTileKeys; kc++) {
      const uint16_t* rows[32];
      for (int t = 0; t < 32; t++) rows[t] = row(values, a0 + c0 + kc * kTileKeys + t);
      pack_values(rows, D, Dc, s.vt + kc * Dt * 256);
    }
    for (int64_t qt = 0; qt < QT; qt++) {
      const int64_t b0 = std::max(c0, from[qt]), b1 = std::min(c1, to[qt]), tiles = (b1 - b0) / kTileKeys;
      if (tiles <= 0) continue;
      for (int64_t kc = 0; kc < tiles; kc++)
        for (int64_t i = 0; i < 16; i++) {
          const float* w = s.scores + (qt * 16 + i) * span + b0 + kc * kTileKeys;
          const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(w + 16), _mm512_loadu_ps(w));
          _mm512_store_si512(s.p + kc * 512 + i * 32, (__m512i)pair);
        }
      const int32_t* vt = s.vt + (b0 - c0) / kTileKeys * Dt * 256;
      for (int64_t dt = 0; dt < Dt; dt += 4) {
        float* acc = s.acc + (qt * Dt + dt) * 256;
        if (Dt - dt >= 4) amx_weigh<4>(s.p, vt + dt * 256, tiles, Dt, acc);
        else amx_weigh<2>(s.p, vt + dt * 256, tiles, Dt, acc);
      }
    }
  }
  // out = sums / weights' sum, rounded to bfloat16 (to nearest even, as store_value)
  for (int64_t r = 0; r < R; r++) {
    uint16_t* o = op + (job.i0 + r / G) * H * D + (job.g * G + r % G) * D;
    const float* res = s.acc + (r / 16) * Dt * 256 + (r % 16) * 16;
    const __m512 f = _mm512_set1_ps(inv[r]);
    for (int64_t d = 0; d < D; d += 16) {
      const __m256i y = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(res + d / 16 * 256), f));
      _mm256_mask_storeu_epi16(o + d, D - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1), y);
    }
  }
}
#endif

template <typename Q, typename T, int S>
void attention_impl(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const float* kns,
                    const float* vns, const at::Tensor& k_pool, const at::Tensor& v_pool, const float* kps,
                    const float* vps, at::IntArrayRef slots, at::IntArrayRef starts, at::IntArrayRef counts,
                    int64_t window, int64_t capacity, int64_t D, bool amx, at::Tensor& out) {
  const int64_t H = q.size(1) / D, KVH = k_new.size(1) / D, G = H / KVH, KB = k_pool.size(3);
  const int64_t slot_size = k_pool.stride(0), scale_size = slot_size / D;
  const int64_t per_job = std::max<int64_t>(1, (amx ? kAmxJobRows : kJobRows) / G);
  std::vector<Job> jobs;
  std::vector<int64_t> row0(counts.size());
  for (int64_t b = 0, row = 0; b < int64_t(counts.size()); row += counts[b], b++) {
    row0[b] = row;
    for (int64_t g = 0; g < KVH; g++)
      for (int64_t i = 0; i < counts[b]; i += per_job) jobs.push_back({b, g, i, std::min(counts[b], i + per_job)});
  }
  // Threads only for work that pays for them: a parallel region costs more than a small call's
  // maths (waking the pool, the join, and its threads spinning after it), so each thread gets at
  // least kMinThreadWork multiply-adds (keys x query rows x head dim) on average.
  int64_t work = 0;
  for (const Job& job : jobs) work += (job.i1 - job.i0) * G * std::min(window, starts[job.b] + job.i1) * D;
  const int64_t grain = std::max<int64_t>(1, int64_t(jobs.size()) * kMinThreadWork / std::max<int64_t>(1, work));
  auto qp = (const Q*)q.data_ptr();
  auto op = (Q*)out.data_ptr();
  at::parallel_for(0, jobs.size(), grain, [&](int64_t begin, int64_t end) {
    // denormals flushed to zero (products of tiny weights and int8 scales would take microcode assists)
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
    Scratch s;
#if defined(__AVX512F__)
    AmxScratch tiles;
    if (amx) configure_tiles();
#endif
    for (int64_t j = begin; j < end; j++) {
      const int64_t b = jobs[j].b, r = row0[b], slot = slots[b];
      const Source<T> ks{(const T*)k_pool.data_ptr() + slot * slot_size, kps ? kps + slot * scale_size : nullptr,
                         (const T*)k_new.data_ptr() + r * k_new.stride(0), kns ? kns + r * KVH : nullptr, k_new.stride(0)};
      const Source<T> vs{(const T*)v_pool.data_ptr() + slot * slot_size, vps ? vps + slot * scale_size : nullptr,
                         (const T*)v_new.data_ptr() + r * v_new.stride(0), vns ? vns + r * KVH : nullptr, v_new.stride(0)};
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<Q, uint16_t> && std::is_same_v<T, uint16_t>) {
        if (amx) {
          attend_job_amx(jobs[j], qp + r * q.stride(0), q.stride(0), ks, vs, G, window, starts[b], capacity, KVH, KB, D,
                         op + r * H * D, H, tiles);
          continue;
        }
      }
#endif
      attend_job<Q, T, S>(jobs[j], qp + r * q.stride(0), q.stride(0), ks, vs, G, window, starts[b], capacity, KVH, KB, D,
                           op + r * H * D, H, s);
    }
#if defined(__AVX512F__)
    if (amx) release_tiles();
#endif
    _mm_setcsr(csr);
  });
}

template <typename Q, typename T>
void attention_typed(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const float* kns,
                     const float* vns, const at::Tensor& k_pool, const at::Tensor& v_pool, const float* kps,
                     const float* vps, at::IntArrayRef slots, at::IntArrayRef starts, at::IntArrayRef counts,
                     int64_t window, int64_t capacity, int64_t D, bool amx, at::Tensor& out) {
  switch ((D + 31) / 32) {
#define VOXLIVE_SLABS(n) \
    case n: return attention_impl<Q, T, n>(q, k_new, v_new, kns, vns, k_pool, v_pool, kps, vps, slots, starts, counts, window, capacity, D, amx, out);
    VOXLIVE_SLABS(1) VOXLIVE_SLABS(2) VOXLIVE_SLABS(3) VOXLIVE_SLABS(4)
#undef VOXLIVE_SLABS
  }
}

const float* scale_data(const c10::optional<at::Tensor>& s, int64_t numel, const char* what) {
  TORCH_CHECK(s && s->scalar_type() == at::kFloat && s->is_contiguous() && s->numel() == numel,
              "attention: int8 keys and values need float32 scales: ", what, " of ", numel, " values");
  return s->data_ptr<float>();
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                     const c10::optional<at::Tensor>& k_new_scale, const c10::optional<at::Tensor>& v_new_scale,
                     const at::Tensor& k_pool, const at::Tensor& v_pool, const c10::optional<at::Tensor>& k_pool_scale,
                     const c10::optional<at::Tensor>& v_pool_scale, at::IntArrayRef slots, at::IntArrayRef starts,
                     at::IntArrayRef counts, int64_t window, int64_t head_dim, int64_t capacity, bool amx) {
  const int64_t D = head_dim;
  for (const at::Tensor* t : {&q, &k_new, &v_new})
    TORCH_CHECK(t->dim() == 2 && t->stride(1) == 1 && D > 0 && t->size(1) % D == 0,
                "attention: q, k and v are [rows, heads * head_dim] rows");
  for (const at::Tensor* t : {&k_pool, &v_pool})
    TORCH_CHECK(t->dim() == 5 && t->is_contiguous() && t->size(4) == D,
                "attention: the pool is [slots, blocks, kv_heads, block, head_dim]");
  const int64_t rows = q.size(0), H = q.size(1) / D, KVH = k_new.size(1) / D, B = slots.size();
  TORCH_CHECK(k_new.size(0) == rows && v_new.size(0) == rows && v_new.size(1) == k_new.size(1) && H % KVH == 0 &&
              k_pool.size(2) == KVH && v_pool.sizes() == k_pool.sizes(), "attention: shapes do not match");
  TORCH_CHECK(D % 8 == 0 && D <= kMaxSlabs * 32, "attention: head_dim must be a multiple of 8, at most ", kMaxSlabs * 32);
  TORCH_CHECK(int64_t(starts.size()) == B && int64_t(counts.size()) == B, "attention: one slot, start and count per stream");
  TORCH_CHECK(capacity > 0 && capacity <= k_pool.size(1) * k_pool.size(3), "attention: the slots hold fewer than capacity indices");
  int64_t total = 0;
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(slots[b] >= 0 && slots[b] < k_pool.size(0), "attention: slot ", slots[b], " is not in the pool");
    TORCH_CHECK(starts[b] >= 0 && counts[b] > 0, "attention: a stream's start is >= 0 and its count > 0");
    TORCH_CHECK(starts[b] == 0 || capacity >= window, "attention: the slots hold fewer indices than the window");
    total += counts[b];
  }
  TORCH_CHECK(total == rows, "attention: the counts add up to ", total, ", not the ", rows, " rows");
  const auto type = q.scalar_type(), stored = k_new.scalar_type();
  TORCH_CHECK(type == at::kBFloat16 || type == at::kFloat, "attention: bfloat16 or float32 queries");
  for (const at::Tensor* t : {&q, &k_new, &v_new, &k_pool, &v_pool}) TORCH_CHECK(t->device().is_cpu(), "attention: CPU tensors");
  for (const at::Tensor* t : {&v_new, &k_pool, &v_pool})
    TORCH_CHECK(t->scalar_type() == stored && (stored == type || stored == at::kChar),
                "attention: keys and values of one dtype, the queries' or int8");
  TORCH_CHECK(!amx || (type == at::kBFloat16 && stored == at::kBFloat16), "attention: AMX takes bfloat16 queries, keys and values");
#if defined(__AVX512F__)
  TORCH_CHECK(!amx || amx_permitted(), "attention: the kernel did not grant the AMX tile registers");
  TORCH_CHECK(!amx || H / KVH <= kAmxJobRows, "attention: AMX takes at most ", kAmxJobRows, " query heads a KV head");
#else
  TORCH_CHECK(!amx, "attention: AMX needs the avx512 build");
#endif
  at::Tensor out = at::empty({rows, H * D}, q.options());
  if (stored == at::kChar) {
    TORCH_CHECK(k_new.is_contiguous() && v_new.is_contiguous(), "attention: contiguous int8 rows");
    const float* kns = scale_data(k_new_scale, rows * KVH, "k_new_scale");
    const float* vns = scale_data(v_new_scale, rows * KVH, "v_new_scale");
    const float* kps = scale_data(k_pool_scale, k_pool.numel() / D, "k_pool_scale");
    const float* vps = scale_data(v_pool_scale, k_pool.numel() / D, "v_pool_scale");
    if (type == at::kBFloat16)
      attention_typed<uint16_t, int8_t>(q, k_new, v_new, kns, vns, k_pool, v_pool, kps, vps, slots, starts, counts, window, capacity, D, false, out);
    else
      attention_typed<float, int8_t>(q, k_new, v_new, kns, vns, k_pool, v_pool, kps, vps, slots, starts, counts, window, capacity, D, false, out);
  } else if (type == at::kBFloat16) {
    attention_typed<uint16_t, uint16_t>(q, k_new, v_new, nullptr, nullptr, k_pool, v_pool, nullptr, nullptr, slots, starts, counts, window, capacity, D, amx, out);
  } else {
    attention_typed<float, float>(q, k_new, v_new, nullptr, nullptr, k_pool, v_pool, nullptr, nullptr, slots, starts, counts, window, capacity, D, false, out);
  }
  return out;
}
}  // namespace

TORCH_LIBRARY(voxlive, m) {
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor q, Tensor scale, Tensor zero) -> Tensor");
  m.def("linear_bf16_amx(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("bf16_tiles(Tensor w) -> Tensor");
  m.def("linear_int8_amx(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int8_tiles(Tensor w) -> Tensor");
  m.def("linear_int4_amx(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("int4_tiles(Tensor q) -> Tensor");
  m.def("int4_tile_scales(Tensor scale, Tensor zero) -> Tensor");
  m.def("amx_ready() -> bool", [] { return amx_permitted(); });
  m.def("attention(Tensor q, Tensor k_new, Tensor v_new, Tensor? k_new_scale, Tensor? v_new_scale, Tensor k_pool, "
        "Tensor v_pool, Tensor? k_pool_scale, Tensor? v_pool_scale, int[] slots, int[] starts, int[] counts, int window, "
        "int head_dim, int capacity, bool amx) -> Tensor");
}

TORCH_LIBRARY_IMPL(voxlive, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("linear_bf16_amx", &linear_bf16_amx);
  m.impl("attention", &attention);
  m.impl("bf16_tiles", &bf16_tiles);
  m.impl("linear_int8_amx", &linear_int8_amx);
  m.impl("int8_tiles", &int8_tiles);
  m.impl("linear_int4_amx", &linear_int4_amx);
  m.impl("int4_tiles", &int4_tiles);
  m.impl("int4_tile_scales", &int4_tile_scales);
}
