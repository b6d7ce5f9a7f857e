// llmserve::q4_mm: y = x @ W^T for 4-bit weights on AVX2 CPUs, the way llama.cpp multiplies its
// Q4_1 blocks: each block of 32 activations is quantized to int8 with its own scale, and the
// products of 4-bit weights and 8-bit activations are summed in integers (vpmaddubsw) before one
// float multiply-add per block. torch's int4 kernel dequantizes every weight to float instead,
// which makes a one-sequence decode step arithmetic-bound on AVX2.
//
//   x      [M, K] float32, K a multiple of 32
//   packed [N, K/2] uint8: block b of row n is bytes [16 b, 16 b + 16); byte j holds weight j of
//          the block in its low nibble and weight j + 16 in its high nibble (values 0..15)
//   scale, low  [N, K/32] float32: weight = q * scale + low
// Built at start-up by llmserve.quantize (torch.utils.cpp_extension); see there for the fallback.
// The build for the CPU at hand: with AVX-512 VNNI two blocks go through one 512-bit instruction
// (vpdpbusd), with AVX-VNNI one 256-bit instruction replaces vpmaddubsw + vpmaddwd (kernel_ms in
// benchmarks.profile_step's report times the build a machine takes).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>

// Built with -mavx512vnni etc. where the CPU has them (llmserve.quantize): two blocks an instruction
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LLMSERVE_AVX512 1
#else
#define LLMSERVE_AVX512 0
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kRowTile = 4;   // activation rows sharing one unpacking of a weight block
constexpr int64_t kColTile = 16;  // output columns whose weights every row tile takes in turn
// Each row's loop asks for the weights this far ahead (rows are contiguous): the hardware
// prefetcher stops at every 4 KiB page, and a one-row step waits on memory, not arithmetic
// (kernel_ms in benchmarks.profile_step's report times the whole model's products).
constexpr int64_t kPrefetchBytes = 4096;

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Per block of 32: int8 values, their scale (max |x| / 127) and the block's float sum.
// xscale8 (AVX-512 builds): each scale 8 times, as the 512-bit loop multiplies two blocks' lanes.
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xscale, float* xscale8, float* xsum) {
  const int64_t blocks = K / kBlock;
  for (int64_t r = 0; r < M * blocks; ++r) {
    const float* src = x + r * kBlock;
    float amax = 0.f, sum = 0.f;
    for (int64_t i = 0; i < kBlock; ++i) {
      amax = std::max(amax, std::fabs(src[i]));
      sum += src[i];
    }
    const float d = amax / 127.f;
    const float inv = d > 0.f ? 1.f / d : 0.f;
    for (int64_t i = 0; i < kBlock; ++i) xq[r * kBlock + i] = static_cast<int8_t>(std::nearbyint(src[i] * inv));
    xscale[r] = d;
    if (xscale8) std::fill(xscale8 + r * 8, xscale8 + r * 8 + 8, d);
    xsum[r] = sum;
  }
}

// sum of a[i] * b[i], i < n
inline float dot_floats(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = horizontal_sum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// 4-bit weights (0..15) times int8 activations, summed in pairs of 4 into 8 int32 lanes: one
// instruction with AVX-VNNI (built in where the CPU has it, see llmserve.quantize), two without.
// The 4-bit values never saturate vpmaddubsw's int16 sums (2 x 15 x 127), so both give the same.
inline __m256i dot_q4_q8(__m256i q, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), q, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1));
#endif
}

// Output columns [n0, n1) for ROWS activation rows: each weight block is unpacked once and used
// by every row; the block's weight scale is broadcast once for all of them, and each row's
// minimum term (sum over blocks of low x the block's activation sum) is one vector dot at the end.
// xq, xs, xsum and y point at the tile's first row.
template <int ROWS>
void dot_rows(const uint8_t* W, const float* S, const float* L, const int8_t* xq, const float* xs,
              const float* xs8, const float* xsum, float* y, int64_t n0, int64_t n1, int64_t N, int64_t K) {
  const int64_t blocks = K / kBlock;
  const __m256i nibbles = _mm256_set1_epi8(0x0F);
  const __m128i nibble = _mm256_castsi256_si128(nibbles);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = W + n * (K / 2);
    const float* srow = S + n * blocks;
    __m256 acc[ROWS];
    for (int i = 0; i < ROWS; ++i) acc[i] = _mm256_setzero_ps();
    int64_t b = 0;
#if LLMSERVE_AVX512
    // two blocks an instruction: weights [lo nibbles b | high b | lo b+1 | high b+1] against the
    // row's 64 int8 values; lanes 0-7 belong to block b, 8-15 to b+1, and so do the scales
    const __m512i pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc2[ROWS];
    for (int i = 0; i < ROWS; ++i) acc2[i] = _mm512_setzero_ps();
    for (; b + 2 <= blocks; b += 2) {
      if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(wrow + b * 16) + kPrefetchBytes, _MM_HINT_T0);
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + b * 16));
      const __m512i lo_hi = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, nibbles)),
                                               _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibbles), 1);
      const __m512i q = _mm512_shuffle_i64x2(lo_hi, lo_hi, _MM_SHUFFLE(3, 1, 2, 0));
      const __m512 wscale = _mm512_permutexvar_ps(
          pick, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(srow + b)))));
      for (int i = 0; i < ROWS; ++i) {
        const int64_t r = i * blocks + b;
        const __m512i xv = _mm512_loadu_si512(xq + r * kBlock);
        const __m512 d = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xv)),
                                       _mm512_loadu_ps(xs8 + r * 8));
        acc2[i] = _mm512_fmadd_ps(d, wscale, acc2[i]);
      }
    }
    for (int i = 0; i < ROWS; ++i)
      acc[i] = _mm256_add_ps(_mm512_castps512_ps256(acc2[i]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc2[i]), 1)));
#endif
    for (; b < blocks; ++b) {
      if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(wrow + b * 16) + kPrefetchBytes, _MM_HINT_T0);
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + b * 16));
      const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), nibble), _mm_and_si128(raw, nibble));
      const __m256 wscale = _mm256_set1_ps(srow[b]);
      for (int i = 0; i < ROWS; ++i) {
        const int64_t r = i * blocks + b;
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * kBlock));
        const __m256 d = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_q4_q8(q, xv)), _mm256_broadcast_ss(xs + r));
        acc[i] = _mm256_fmadd_ps(d, wscale, acc[i]);
      }
    }
    for (int i = 0; i < ROWS; ++i)
      y[i * N + n] = horizontal_sum(acc[i]) + dot_floats(L + n * blocks, xsum + i * blocks, blocks);
  }
}

}  // namespace

torch::Tensor q4_mm(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                    const torch::Tensor& low) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be [M, K] float32 on the CPU");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && scale.scalar_type() == torch::kFloat32 &&
              low.scalar_type() == torch::kFloat32, "packed must be uint8, scale and low float32");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), blocks = K / kBlock;
  TORCH_CHECK(K % kBlock == 0 && packed.size(1) == K / 2 && scale.size(0) == N && scale.size(1) == blocks &&
              low.sizes() == scale.sizes(), "shapes: x [M, K], packed [N, K/2], scale and low [N, K/32]");
  const auto xc = x.contiguous();
  const auto pc = packed.contiguous();
  const auto sc = scale.contiguous();
  const auto lc = low.contiguous();
  auto xq = torch::empty({M, K}, torch::kInt8);
  auto xscale = torch::empty({M, blocks}, torch::kFloat32);
  auto xsum = torch::empty({M, blocks}, torch::kFloat32);
  auto xscale8 = torch::empty({LLMSERVE_AVX512 ? M * blocks * 8 : 0}, torch::kFloat32);
  float* XS8 = LLMSERVE_AVX512 ? xscale8.data_ptr<float>() : nullptr;
  quantize_rows(xc.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), xscale.data_ptr<float>(), XS8, xsum.data_ptr<float>());
  auto y = torch::empty({M, N}, torch::kFloat32);

  const uint8_t* W = pc.data_ptr<uint8_t>();
  const float* S = sc.data_ptr<float>();
  const float* L = lc.data_ptr<float>();
  const int8_t* XQ = xq.data_ptr<int8_t>();
  const float* XS = xscale.data_ptr<float>();
  const float* XSUM = xsum.data_ptr<float>();
  float* Y = y.data_ptr<float>();

  // a thread's columns go kColTile at a time, each tile's weights (L1-sized) used by every row tile
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t c0 = n0; c0 < n1; c0 += kColTile) {
      const int64_t c1 = std::min(c0 + kColTile, n1);
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, M - m0);
        const int64_t r0 = m0 * blocks;
        switch (rows) {   // the tile's accumulators stay in registers only with a fixed row count
          case 1: dot_rows<1>(W, S, L, XQ + r0 * kBlock, XS + r0, XS8 + r0 * 8, XSUM + r0, Y + m0 * N, c0, c1, N, K); break;
          case 2: dot_rows<2>(W, S, L, XQ + r0 * kBlock, XS + r0, XS8 + r0 * 8, XSUM + r0, Y + m0 * N, c0, c1, N, K); break;
          case 3: dot_rows<3>(W, S, L, XQ + r0 * kBlock, XS + r0, XS8 + r0 * 8, XSUM + r0, Y + m0 * N, c0, c1, N, K); break;
          default: dot_rows<4>(W, S, L, XQ + r0 * kBlock, XS + r0, XS8 + r0 * 8, XSUM + r0, Y + m0 * N, c0, c1, N, K);
        }
      }
    }
  });
  return y;
}

TORCH_LIBRARY(llmserve, m) { m.def("q4_mm(Tensor x, Tensor packed, Tensor scale, Tensor low) -> Tensor"); }

TORCH_LIBRARY_IMPL(llmserve, CPU, m) { m.impl("q4_mm", &q4_mm); }
