// llmserve::q4_mm: y = x @ W^T for 4-bit weights on AVX2 CPUs, the way llama.cpp multiplies its
// Q4_1 blocks: each block of 32 activations is quantized to int8 with its own scale, and the
// products of 4-bit weights and 8-bit activations are summed in integers (vpmaddubsw) before one
// float multiply-add per block. torch's int4 kernel dequantizes every weight to float instead,
// which makes a one-sequence decode step arithmetic-bound on AVX2.
//
//   x      [M, K] float32, K a multiple of 32
//   packed [N, K/2] uint8: block b of row n is bytes [16 b, 16 b + 16); byte j holds weight j of
//          the block in its low nibble and weight j + 16 in its high nibble (values 0..15)
//   scale, low  [N, K/32] float16: weight = q * scale + low (half the bytes of float32: a one-row
//          step reads every weight, and these were a third of what it read)
// Built at start-up by llmserve.quantize (torch.utils.cpp_extension); see there for the fallback.
// The build for the CPU at hand: with AVX-512 VNNI four blocks go through two 512-bit instructions
// (vpdpbusd), with AVX-VNNI one 256-bit instruction replaces vpmaddubsw + vpmaddwd (kernel_ms in
// benchmarks.profile_step's report times the build a machine takes). With AMX (-mamx-bf16), steps of
// amx_min_rows rows or more dequantize the weights to bf16 tiles instead (q4_matmul_amx).
// llmserve::decode_layers (at the end) runs a whole decode step's layers on this kernel in one call.
#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

// Built with -mavx512vnni etc. where the CPU has them (llmserve.quantize): four blocks a step
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LLMSERVE_AVX512 1
#else
#define LLMSERVE_AVX512 0
#endif
// and with -mamx-tile -mamx-bf16 -mavx512bf16 -mavx512vbmi where the CPU has AMX: bf16 tiles for many rows
#if LLMSERVE_AVX512 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define LLMSERVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define LLMSERVE_AMX 0
#endif
// and with -mavx512bf16 where the CPU has it: vdpbf16ps for the 8-bit LM head's sampled rows (q8_mm_bf16),
// and the greedy rows' head exact at their largest (q8_mm_top: its pass is int8, built with those two)
#if LLMSERVE_AVX512 && defined(__AVX512BF16__)
#define LLMSERVE_BF16 1
#else
#define LLMSERVE_BF16 0
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kRowTile = 4;   // activation rows sharing one unpacking of a weight block
// rows sharing each widening of dot_rows_q8's 8-bit weights (12 of AVX2's 16 registers hold the
// sums): w4's LM head at 5 / 16 / 64 rows 30 / 11 / 16 % faster than in tiles of 4 (fb6e25c's message)
constexpr int64_t kQ8RowTile = 6;
constexpr int64_t kColTile = 16;  // output columns whose weights every row tile takes in turn
// Each row's loop asks for the weights this far ahead (rows are contiguous): the hardware
// prefetcher stops at every 4 KiB page, and a one-row step waits on memory, not arithmetic
// (kernel_ms in benchmarks.profile_step's report times the whole model's products).
constexpr int64_t kPrefetchBytes = 4096;
// row-wise passes (norms, rotary, residual adds, the activations' quantization) split over the threads
// in chunks of this many rows; a step of fewer stays on one thread. 32, not 64: a 64-row decode step
// 4.6 % faster, 64- and 512-token prefills 2.5-3.3 %, 16 rows the same (in process, taking turns: the
// message of the commit that made it so)
constexpr int64_t kRowGrain = 32;

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 4 (2) float16 values from p, as floats in lanes 0-3 (0-1)
inline __m128 halves4(const uint16_t* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline __m128 halves2(const uint16_t* p) {
  int32_t two;
  std::memcpy(&two, p, sizeof two);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(two));
}

#if !LLMSERVE_AVX512
// lanes j of out[i]: in[j][i], i, j < 8 (an 8x8 transpose)
inline void transpose8(const __m256* in, __m256* out) {
  __m256 a[8], b[8];
  for (int j = 0; j < 8; j += 2) {
    a[j] = _mm256_unpacklo_ps(in[j], in[j + 1]);
    a[j + 1] = _mm256_unpackhi_ps(in[j], in[j + 1]);
  }
  for (int j = 0; j < 8; j += 4) {
    b[j] = _mm256_shuffle_ps(a[j], a[j + 2], 0x44);
    b[j + 1] = _mm256_shuffle_ps(a[j], a[j + 2], 0xEE);
    b[j + 2] = _mm256_shuffle_ps(a[j + 1], a[j + 3], 0x44);
    b[j + 3] = _mm256_shuffle_ps(a[j + 1], a[j + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    out[j] = _mm256_permute2f128_ps(b[j], b[j + 4], 0x20);
    out[j + 4] = _mm256_permute2f128_ps(b[j], b[j + 4], 0x31);
  }
}

// The largest magnitude and the sum of each of the 8 blocks of 32 from x, block j in lane j: each
// sum in the scalar loop's order (value 0, then 1, ...), so the same bits, but 8 blocks' add chains
// side by side where one block's 32 dependent adds made quantize_rows wait on latency (the model's
// 4-bit products at 1 / 6 / 64 rows 10 / 7 / 6 % faster: commit message)
inline void block_stats8(const float* x, __m256& amax, __m256& sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  amax = _mm256_setzero_ps();
  sum = _mm256_setzero_ps();
  for (int i0 = 0; i0 < kBlock; i0 += 8) {
    __m256 in[8], t[8];
    for (int j = 0; j < 8; ++j) in[j] = _mm256_loadu_ps(x + j * kBlock + i0);
    transpose8(in, t);
    for (int i = 0; i < 8; ++i) {
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, t[i]));
      sum = _mm256_add_ps(sum, t[i]);
    }
  }
}
#endif

// Per block of 32: int8 values, their scale (max |x| / 127) and the block's float sum.
// AVX-512 builds: each row's blocks in groups of 4 laid out as the 512-bit loop reads them (the 4
// blocks' values 0-15, then their 16-31, matching the low and high nibbles of the 4 blocks' 64 weight
// bytes; a row's last blocks % 4 blocks stay in order), and xscale4 / xsum4: each scale, and each
// sum / 4, 4 times (expanded once here: permuting xscale and xsum inside the block loop was slower)
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xscale, float* xscale4, float* xsum4,
                   float* xsum) {
  const int64_t blocks = K / kBlock, grouped = xscale4 ? blocks / 4 * 4 : 0;
#if !LLMSERVE_AVX512
  // each block's largest magnitude (into xscale, made its scale below) and sum, 8 blocks at a time;
  // the last M x blocks % 8 one by one, in the same order
  int64_t done = 0;
  for (; done + 8 <= M * blocks; done += 8) {
    __m256 amax, sum;
    block_stats8(x + done * kBlock, amax, sum);
    _mm256_storeu_ps(xscale + done, amax);
    _mm256_storeu_ps(xsum + done, sum);
  }
  for (int64_t r = done; r < M * blocks; ++r) {
    float amax = 0.f, sum = 0.f;
    for (int64_t i = 0; i < kBlock; ++i) {
      amax = std::max(amax, std::fabs(x[r * kBlock + i]));
      sum += x[r * kBlock + i];
    }
    xscale[r] = amax;
    xsum[r] = sum;
  }
#endif
  for (int64_t r = 0; r < M * blocks; ++r) {
    const float* src = x + r * kBlock;
    const int64_t b = r % blocks;
    int8_t* dst = xq + r * kBlock;      // where the block is, in order
    int64_t half = 16;                  // where its values 16-31 go, from dst
    if (b < grouped) {                  // within a group of 4: block j's halves at 16 j and 64 + 16 j
      dst = xq + (r - b % 4) * kBlock + (b % 4) * 16;
      half = 64;
    }
#if LLMSERVE_AVX512
    const __m512 first = _mm512_loadu_ps(src), second = _mm512_loadu_ps(src + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(first), _mm512_abs_ps(second)));
    const float sum = _mm512_reduce_add_ps(_mm512_add_ps(first, second));
    const float d = amax / 127.f;
    const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
    // rounded to nearest even (the default mode), as std::nearbyint
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(first, inv))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + half),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(second, inv))));
#else
    const float amax = xscale[r], sum = xsum[r];
    const float d = amax / 127.f;
    const float inv = d > 0.f ? 1.f / d : 0.f;
    for (int64_t i = 0; i < kBlock; ++i)
      dst[i < 16 ? i : half + i - 16] = static_cast<int8_t>(std::nearbyint(src[i] * inv));
#endif
    xscale[r] = d;
    if (xscale4) std::fill(xscale4 + r * 4, xscale4 + r * 4 + 4, d);
    if (xsum4) std::fill(xsum4 + r * 4, xsum4 + r * 4 + 4, sum / 4);
    xsum[r] = sum;
  }
}

// The KV cache's values: float32, or float16 (uint16_t here) where the engine keeps it so (half the
// bytes: a 64-row step's attention read 206 MB of fp32 keys and values, a wait on memory)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return _cvtsh_ss(*p); }
inline void store_kv(const float* src, int64_t n, float* dst) { std::copy_n(src, n, dst); }
inline void store_kv(const float* src, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

// sum of a[i] * b[i], i < n (b: floats, or a float16 cache's keys)
template <typename KV>
inline float dot_floats(const float* a, const KV* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  float sum = horizontal_sum(acc);
  for (; i < n; ++i) sum += a[i] * load1(b + i);
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
// by every row; the block's weight scale is broadcast once for all of them, and so is its minimum
// ("low"), whose term is low x the block's activation sum. xq, xs, xs4, xsum4 and y point at the
// tile's first row. (A row's end costs as much as a few blocks: K = 576 has only 18.)
template <int ROWS>
void dot_rows(const uint8_t* W, const uint16_t* S, const uint16_t* L, const int8_t* xq, const float* xs,
              const float* xs4, const float* xsum4, const float* xsum, float* y, int64_t n0, int64_t n1,
              int64_t N, int64_t K) {
  const int64_t blocks = K / kBlock;
  const __m256i nibbles = _mm256_set1_epi8(0x0F);
  const __m128i nibble = _mm256_castsi256_si128(nibbles);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = W + n * (K / 2);
    const uint16_t* srow = S + n * blocks;
    const uint16_t* lrow = L + n * blocks;
    __m256 acc[ROWS];
    float lows[ROWS];      // the low terms of the blocks the vector loops do not take
    for (int i = 0; i < ROWS; ++i) acc[i] = _mm256_setzero_ps(), lows[i] = 0.f;
    int64_t b = 0;
#if LLMSERVE_AVX512
    // four blocks (64 bytes of weights) at a time: their low nibbles against the 4 blocks' values 0-15,
    // the high ones against 16-31 (quantize_rows lays them out so), summed into 16 lanes, 4 a block;
    // each lane also takes a quarter of its block's low term (xsum4: the block's sum / 4)
    const __m512i nibbles4 = _mm512_set1_epi8(0x0F);
    const __m512i pick = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc2[ROWS];
    for (int i = 0; i < ROWS; ++i) acc2[i] = _mm512_setzero_ps();
    for (; b + 4 <= blocks; b += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(wrow + b * 16) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i raw = _mm512_loadu_si512(wrow + b * 16);
      const __m512i lo = _mm512_and_si512(raw, nibbles4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibbles4);
      const __m512 wscale = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(halves4(srow + b)));
      const __m512 wlow = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(halves4(lrow + b)));
      for (int i = 0; i < ROWS; ++i) {
        const int64_t r = i * blocks + b;
        const int8_t* xg = xq + r * kBlock;
        const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xg)),
                                              hi, _mm512_loadu_si512(xg + 64));
        acc2[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(xs4 + r * 4)), wscale, acc2[i]);
        acc2[i] = _mm512_fmadd_ps(wlow, _mm512_loadu_ps(xsum4 + r * 4), acc2[i]);
      }
    }
    // two blocks left (K = 576): in order, weights [lo nibbles b | high b | lo b+1 | high b+1]
    if (b + 2 <= blocks) {
      const __m512i pick2 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + b * 16));
      const __m512i lo_hi = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, nibbles)),
                                               _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibbles), 1);
      const __m512i q = _mm512_shuffle_i64x2(lo_hi, lo_hi, _MM_SHUFFLE(3, 1, 2, 0));
      const __m512 wscale = _mm512_permutexvar_ps(pick2, _mm512_castps128_ps512(halves2(srow + b)));
      for (int i = 0; i < ROWS; ++i) {
        const int64_t r = i * blocks + b;
        const __m512 xscale = _mm512_permutexvar_ps(
            pick2, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(xs + r)))));
        const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, _mm512_loadu_si512(xq + r * kBlock));
        acc2[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), xscale), wscale, acc2[i]);
        lows[i] += _cvtsh_ss(lrow[b]) * xsum[r] + _cvtsh_ss(lrow[b + 1]) * xsum[r + 1];
      }
      b += 2;
    }
    for (int i = 0; i < ROWS; ++i)
      acc[i] = _mm256_add_ps(_mm512_castps512_ps256(acc2[i]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc2[i]), 1)));
#endif
    for (; b < blocks; ++b) {
      if ((b & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(wrow + b * 16) + kPrefetchBytes, _MM_HINT_T0);
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + b * 16));
      const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), nibble), _mm_and_si128(raw, nibble));
      const __m256 wscale = _mm256_set1_ps(_cvtsh_ss(srow[b]));
      const float wlow = _cvtsh_ss(lrow[b]);
      for (int i = 0; i < ROWS; ++i) {
        const int64_t r = i * blocks + b;
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * kBlock));
        const __m256 d = _mm256_mul_ps(_mm256_cvtepi32_ps(dot_q4_q8(q, xv)), _mm256_broadcast_ss(xs + r));
        acc[i] = _mm256_fmadd_ps(d, wscale, acc[i]);
        lows[i] += wlow * xsum[r];
      }
    }
    for (int i = 0; i < ROWS; ++i) y[i * N + n] = horizontal_sum(acc[i]) + lows[i];
  }
}

// 4-bit weights [N, K] as q4_mm takes them: w packed [N, K/2], s and l (scale, low) [N, K/32] float16
struct Q4Weight {
  const uint8_t* w;
  const uint16_t* s;
  const uint16_t* l;
  int64_t n, k;
  int columns = 0;          // 16: the AVX-512 layout (dot_columns16), 8: the AVX2 one (dot_columns8), 0: rows
};

// f(std::integral_constant<int, n>{}) for 1 <= n <= MAX: the row count as a compile-time constant
template <int MAX, typename F>
void with_rows(int64_t n, const F& f) {
  if constexpr (MAX > 1) {
    if (n < MAX) return with_rows<MAX - 1>(n, f);
  }
  f(std::integral_constant<int, MAX>{});
}

// The tiling both kernels share: a thread's output columns go kColTile at a time, each tile's
// weights (L1-sized) used by every tile of up to ROW_TILE rows; tile(rows, m0, c0, c1) gets the row
// count as a compile-time constant (std::integral_constant), so that its accumulators stay in registers
template <int ROW_TILE, typename Tile>
void for_each_tile(int64_t M, int64_t N, const Tile& tile) {
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    for (int64_t c0 = n0; c0 < n1; c0 += kColTile) {
      const int64_t c1 = std::min(c0 + kColTile, n1);
      for (int64_t m0 = 0; m0 < M; m0 += ROW_TILE)
        with_rows<ROW_TILE>(std::min<int64_t>(M - m0, ROW_TILE), [&](auto rows) { tile(rows, m0, c0, c1); });
    }
  });
}

// The AVX2 layout (quantize.pack_q4_columns, 8 columns): dot_columns16's design in 256 bits, for
// CPUs without AVX-512. Per group of 8 columns and block of 32: 128 bytes, vector m (32 bytes)
// holding in byte 4c + t weight 4(2m) + t of column c (low nibble) and 4(2m + 1) + t (high nibble);
// scale and low [N/8, K/32, 8] float16. A row's 4 activations broadcast against 4 weights of each of
// 8 columns: vpmaddubsw's int16 pairs summed over the block's 8 products in int16 (each at most
// 2 x 15 x 127, eight of them 30480 < 32767), one vpmaddwd to int32, no horizontal sums: about a
// third of the rows layout's instructions a weight, where an AVX2 CPU is short of them (a 16-row
// step's products ran at a tenth of its integer peak). GROUPS (1 or 2) column groups from g at once:
// each row's activation broadcast serves them all; their float sums wait in acc (L1) between blocks,
// the registers hold the int16 ones.
// a 32-byte vector of the 8-column layout as its low and high nibbles (the weights 0..15)
inline void split_nibbles(__m256i v, __m256i& lo, __m256i& hi) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  lo = _mm256_and_si256(v, nibble);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
}

// where unpack_columns8 puts the low nibbles of vector m of block b of the pair's group j (the high
// ones follow)
inline int64_t unpacked_at(int64_t b, int m, int j) { return ((b * 4 + m) * 2 + j) * 2; }

template <int ROWS, int GROUPS, bool UNPACKED = false>
void dot_columns8(const uint8_t* W, const uint16_t* S, const uint16_t* L, const int8_t* xq, const float* xs,
                  const float* xsum, float* y, int64_t g, int64_t N, int64_t K, const __m256i* unpacked = nullptr) {
  static_assert(!UNPACKED || GROUPS == 2, "unpack_columns8 unpacks pairs");
  const int64_t blocks = K / kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) float acc[ROWS][8 * GROUPS] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* src[GROUPS];
    __m256i sums[GROUPS][ROWS];
    for (int j = 0; j < GROUPS; ++j) {
      src[j] = W + ((g + j) * blocks + b) * 128;
      _mm_prefetch(reinterpret_cast<const char*>(src[j] + kPrefetchBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(src[j] + kPrefetchBytes + 64), _MM_HINT_T0);
      for (int r = 0; r < ROWS; ++r) sums[j][r] = _mm256_setzero_si256();
    }
    for (int m = 0; m < 4; ++m) {
      __m256i lo[GROUPS], hi[GROUPS];
      for (int j = 0; j < GROUPS; ++j) {
        if constexpr (UNPACKED) {
          lo[j] = _mm256_load_si256(unpacked + unpacked_at(b, m, j));
          hi[j] = _mm256_load_si256(unpacked + unpacked_at(b, m, j) + 1);
        } else {
          split_nibbles(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[j] + 32 * m)), lo[j], hi[j]);
        }
      }
      for (int r = 0; r < ROWS; ++r) {
        const int32_t* a = reinterpret_cast<const int32_t*>(xq + r * K + b * kBlock) + 2 * m;
        const __m256i a0 = _mm256_set1_epi32(a[0]), a1 = _mm256_set1_epi32(a[1]);
        for (int j = 0; j < GROUPS; ++j) sums[j][r] = _mm256_add_epi16(sums[j][r], _mm256_maddubs_epi16(lo[j], a0));
        for (int j = 0; j < GROUPS; ++j) sums[j][r] = _mm256_add_epi16(sums[j][r], _mm256_maddubs_epi16(hi[j], a1));
        // one chain a sum, kept in registers: left free, GCC issued every product first and spilled them
        for (int j = 0; j < GROUPS; ++j) asm("" : "+x"(sums[j][r]));
      }
    }
    for (int j = 0; j < GROUPS; ++j) {
      const int64_t sb = ((g + j) * blocks + b) * 8;
      const __m256 wscale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(S + sb)));
      const __m256 wlow = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(L + sb)));
      for (int r = 0; r < ROWS; ++r) {
        const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[j][r], ones));
        __m256 sum = _mm256_load_ps(acc[r] + 8 * j);
        sum = _mm256_fmadd_ps(d, _mm256_mul_ps(wscale, _mm256_set1_ps(xs[r * blocks + b])), sum);
        _mm256_store_ps(acc[r] + 8 * j, _mm256_fmadd_ps(wlow, _mm256_set1_ps(xsum[r * blocks + b]), sum));
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int j = 0; j < GROUPS; ++j) _mm256_storeu_ps(y + r * N + (g + j) * 8, _mm256_load_ps(acc[r] + 8 * j));
}

constexpr int kColumns16RowTile = 8;   // rows per unpacking of a block (16 registers of the 32 hold w and acc)

#if LLMSERVE_AVX512
// One block of 32 inputs of one row (int8, x) times 16 columns' weights w[8] (vector m: inputs
// 4m..4m+3 of column c in lane c, unsigned): the 16 integer sums, in two chains of vpdpbusd
__attribute__((always_inline)) inline __m512i dot_block16(const __m512i* w, const int8_t* x) {
  const int32_t* a = reinterpret_cast<const int32_t*>(x);
  __m512i even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(a[0]));
  __m512i odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_set1_epi32(a[1]));
  for (int j = 2; j < 8; j += 2) {
    even = _mm512_dpbusd_epi32(even, w[j], _mm512_set1_epi32(a[j]));
    odd = _mm512_dpbusd_epi32(odd, w[j + 1], _mm512_set1_epi32(a[j + 1]));
  }
  return _mm512_add_epi32(even, odd);
}

// The AVX-512 layout (quantize.pack_q4_columns, 16 columns): 16 output columns at a time, so that one
// vpdpbusd multiplies 4 inputs of one activation row (broadcast) by the 4 weights of each of 16
// columns, and the block's scale and minimum apply to the 16 columns' sums in one vector each: no
// horizontal sums, and a row costs 8 vpdpbusd per block. Per group of 16 columns and block of 32:
// 256 bytes, vector m (64 bytes) holds in byte 4c + t weight 4(2m) + t of column c (low nibble)
// and weight 4(2m + 1) + t (high nibble); scale and low [N/16, K/32, 16] float16.
// ROWS rows of activations (plain layout: quantize_rows without xscale4) for column group g.
template <int ROWS>
void dot_columns16(const uint8_t* W, const uint16_t* S, const uint16_t* L, const int8_t* xq, const float* xs,
                   const float* xsum, float* y, int64_t g, int64_t N, int64_t K) {
  const int64_t blocks = K / kBlock;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
  const uint8_t* wg = W + g * blocks * 256;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* src = wg + b * 256;
    for (int m = 0; m < 4; ++m) _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBytes + 64 * m), _MM_HINT_T0);
    __m512i w[8];
    for (int m = 0; m < 4; ++m) {
      const __m512i v = _mm512_loadu_si512(src + 64 * m);
      w[2 * m] = _mm512_and_si512(v, nibble);
      w[2 * m + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    }
    const int64_t sb = (g * blocks + b) * 16;
    const __m512 wscale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(S + sb)));
    const __m512 wlow = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(L + sb)));
    for (int r = 0; r < ROWS; ++r) {
      const __m512 sums = _mm512_cvtepi32_ps(dot_block16(w, xq + r * K + b * kBlock));
      acc[r] = _mm512_fmadd_ps(sums, _mm512_mul_ps(wscale, _mm512_set1_ps(xs[r * blocks + b])), acc[r]);
      acc[r] = _mm512_fmadd_ps(wlow, _mm512_set1_ps(xsum[r * blocks + b]), acc[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) _mm512_storeu_ps(y + r * N + g * 16, acc[r]);
}

// rows from which AMX's bf16 tiles beat the AVX-512 kernel: the model's 120 decoder products, AMX Xeon
// (build/exp/amx2/bench.py, scratch): 8 / 16 / 32 / 64 rows 8.2 / 14.0 / 26.6 / 47.3 ms -> 14.5 / 14.1 / 18.6 / 27.5
// (llmserve::amx_min_rows sets it: tests compare like with like)
std::atomic<int64_t> amx_min_rows_now{16};


#if LLMSERVE_AMX
// The same 16-column layout on AMX (Sapphire Rapids and later) for steps of many rows: each block
// of 32 weights of 16 columns is dequantized once to bf16 (w = q * scale + low, as the float
// weights' bf16 copy holds them) in the tile layout of tdpbf16ps, then multiplied by up to 64 rows
// of bf16 activations (4 tiles of 16 rows), the sums kept in float in the tiles over the whole
// input: no per-block epilogue and no int8 rounding of the activations. Reads a quarter of the bf16
// weights' bytes, where oneDNN's bf16 product of 64 rows waited on them.
// Linux hands tile registers only to a process that asks once (arch_prctl ARCH_REQ_XCOMP_PERM for
// XTILEDATA); a refusal leaves the AVX-512 kernel
bool amx_ready() {
  static const bool ready = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ready;
}

// tiles 0-3: sums (16 rows x 16 floats), 4: activations (16 rows x 32 bf16), 5: weights (16 rows,
// one per pair of inputs, of 16 columns x 2 bf16); a tile configuration is per thread
void configure_tiles() {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < 6; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

// block b of column group g (256 bytes, scale and low 16 float16 each) as tdpbf16ps' weight tile:
// row j holds, for each column c, weights 2j and 2j + 1 (bf16, 4 bytes). Nibble vector (m, h) has
// in bytes 4c + t the weights 8m + 4h + t of column c: rows 4m + 2h (t 0, 1) and 4m + 2h + 1 (t 2, 3).
// A nibble n that vpermb puts in bits 16-19 of a float whose high byte is 0x43 makes the float
// 128 + n exactly, so one FMA with (scale, low - 128 scale) gives the weight: two instructions for
// 16 weights where widening the bytes and converting them took three and an extraction; the same bits
// (timings in 8b3d49e's message)
inline void dequantize_bf16(const uint8_t* src, const uint16_t* S, const uint16_t* L, uint32_t* tile) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512 scale16 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(S)));
  const __m512 low16 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(L)));
  const __m512 offset16 = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), scale16, low16);   // low - 128 scale
  // lane i of half e (columns 8e .. 8e + 7, each twice): column 8e + i / 2
  const __m512i cols0 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i cols1 = _mm512_add_epi32(cols0, _mm512_set1_epi32(8));
  const __m512 scale[2] = {_mm512_permutexvar_ps(cols0, scale16), _mm512_permutexvar_ps(cols1, scale16)};
  const __m512 offset[2] = {_mm512_permutexvar_ps(cols0, offset16), _mm512_permutexvar_ps(cols1, offset16)};
  // byte 2 of lane i of half e, for tile row part u (t = 2u + i % 2): nibble byte 4 (8e + i / 2) + 2u + i % 2
  alignas(64) static const auto index = [] {
    std::array<std::array<uint8_t, 64>, 4> idx{};
    for (int e = 0; e < 2; ++e)
      for (int u = 0; u < 2; ++u)
        for (int i = 0; i < 16; ++i) idx[2 * u + e][4 * i + 2] = static_cast<uint8_t>(4 * (8 * e + i / 2) + 2 * u + i % 2);
    return idx;
  }();
  const __m512i base = _mm512_set1_epi32(0x43000000);
  const __mmask64 byte2 = 0x4444444444444444ULL;
  __m512i pick[4];
  for (int p = 0; p < 4; ++p) pick[p] = _mm512_loadu_si512(index[p].data());
  for (int m = 0; m < 4; ++m) {
    const __m512i v = _mm512_loadu_si512(src + 64 * m);
    for (int h = 0; h < 2; ++h) {
      const __m512i q = _mm512_and_si512(h ? _mm512_srli_epi16(v, 4) : v, nibble);
      for (int u = 0; u < 2; ++u) {   // tile row 4m + 2h + u: weights 2u, 2u + 1 of each column's four
        __m512 f[2];
        for (int e = 0; e < 2; ++e)
          f[e] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(base, byte2, pick[2 * u + e], q)),
                                 scale[e], offset[e]);
        _mm512_storeu_si512(tile + (4 * m + 2 * h + u) * 16, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(f[1], f[0])));
      }
    }
  }
}

// The accumulator tiles 0 .. TILES - 1 (tile 4: the activations, tile 5: the weights)
template <int TILES>
inline void zero_tiles() {
  _tile_zero(0);
  if constexpr (TILES > 1) _tile_zero(1);
  if constexpr (TILES > 2) _tile_zero(2);
  if constexpr (TILES > 3) _tile_zero(3);
}

// accumulator i += activation tile at a + i * next (rows `stride` bytes apart) x the weight tile at wt
template <int TILES>
inline void tile_products(const uint16_t* a, int64_t next, int64_t stride, const uint32_t* wt) {
  _tile_loadd(5, wt, 64);
  _tile_loadd(4, a, stride);
  _tile_dpbf16ps(0, 4, 5);
  if constexpr (TILES > 1) {
    _tile_loadd(4, a + next, stride);
    _tile_dpbf16ps(1, 4, 5);
  }
  if constexpr (TILES > 2) {
    _tile_loadd(4, a + 2 * next, stride);
    _tile_dpbf16ps(2, 4, 5);
  }
  if constexpr (TILES > 3) {
    _tile_loadd(4, a + 3 * next, stride);
    _tile_dpbf16ps(3, 4, 5);
  }
}

// The accumulators' rows m0 .. M - 1 (at most 16 x TILES) into Y's column group g, times colscale's
// 16 columns where given; through part (the tiles side by side: row r at part + 16 r)
template <int TILES>
inline void store_group(float* part, float* Y, int64_t M, int64_t m0, int64_t N, int64_t g, const float* colscale) {
  _tile_stored(0, part, 64);
  if constexpr (TILES > 1) _tile_stored(1, part + 256, 64);
  if constexpr (TILES > 2) _tile_stored(2, part + 512, 64);
  if constexpr (TILES > 3) _tile_stored(3, part + 768, 64);
  const __m512 scale = colscale ? _mm512_loadu_ps(colscale + g * 16) : _mm512_set1_ps(1.f);
  for (int64_t r = 0, rows = std::min<int64_t>(16 * TILES, M - m0); r < rows; ++r)
    _mm512_storeu_ps(Y + (m0 + r) * N + g * 16, _mm512_mul_ps(_mm512_load_ps(part + 16 * r), scale));
}

// x [M, K] in bf16 in A-tile order: [M / 64 chunks][K / 32 blocks][4 tiles][16 rows x 32], zeros past
// row M, so that a block's tiles (and a chunk's blocks) are read in one stream, not rows 2 K bytes apart
std::unique_ptr<uint16_t[]> tile_order(const float* x, int64_t M, int64_t K) {
  const int64_t blocks = K / kBlock, padded = (M + 63) / 64 * 64;
  std::unique_ptr<uint16_t[]> xt(new uint16_t[padded * K]);   // not zeroed: only the rows past M are
  at::parallel_for(0, padded, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < blocks; ++b) {
        uint16_t* dst = xt.get() + ((r / 64 * blocks + b) * 4 + r % 64 / 16) * 512 + r % 16 * 32;
        if (r >= M) {
          _mm512_storeu_si512(dst, _mm512_setzero_si512());
          continue;
        }
        _mm512_storeu_si512(dst, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + r * K + b * kBlock + 16),
                                                                               _mm512_loadu_ps(x + r * K + b * kBlock))));
      }
  });
  return xt;
}

// Column group g of the chunk xc (TILES tiles of 16 rows, from row m0) into Y; block b's weight tile
// from wtile(b)
template <int TILES, typename WTile>
inline void amx_chunk(int64_t K, int64_t N, const uint16_t* xc, float* Y, int64_t M, int64_t m0, int64_t g, float* part,
                      const float* colscale, const WTile& wtile) {
  zero_tiles<TILES>();
  for (int64_t b = 0; b < K / kBlock; ++b) tile_products<TILES>(xc + b * 2048, 512, 64, wtile(b));
  store_group<TILES>(part, Y, M, m0, N, g, colscale);
}

constexpr int64_t kPanelBlocks = 256;   // a prefill's dequantized weight tiles held at once (256 KiB)

// Y [M, N] = x [M, K] (rounded to bf16) times the weights dequant(g, b, tile) gives, block b of column
// group g as a bf16 weight tile. One chunk of 64 rows (a decode step): each block dequantized just
// before its products into a ring of two tiles. More (a prefill): a panel of groups dequantized
// at once, then every chunk's products with it, so the activations are read once per panel
template <typename Dequant>
void amx_matmul(const float* x, int64_t M, int64_t K, int64_t N, float* Y, const float* colscale, const Dequant& dequant) {
  const int64_t blocks = K / kBlock, chunks = (M + 63) / 64, tiles = (M + 15) / 16;
  const auto xt = tile_order(x, M, K);
  at::parallel_for(0, N / 16, 1, [&](int64_t g0, int64_t g1) {
    configure_tiles();
    alignas(64) float part[1024];
    if (chunks == 1) {
      alignas(64) uint32_t ring[512];
      with_rows<4>(tiles, [&](auto n) {
        for (int64_t g = g0; g < g1; ++g)
          amx_chunk<decltype(n)::value>(K, N, xt.get(), Y, M, 0, g, part, colscale, [&](int64_t b) {
            uint32_t* wt = ring + (b & 1) * 256;
            dequant(g, b, wt);
            return wt;
          });
      });
    } else {
      const int64_t width = std::max<int64_t>(1, kPanelBlocks / blocks);
      std::vector<uint32_t> panel(width * blocks * 256);
      for (int64_t p0 = g0; p0 < g1; p0 += width) {
        const int64_t p1 = std::min(g1, p0 + width);
        for (int64_t g = p0; g < p1; ++g)
          for (int64_t b = 0; b < blocks; ++b) dequant(g, b, panel.data() + ((g - p0) * blocks + b) * 256);
        for (int64_t c = 0; c < chunks; ++c)
          with_rows<4>(std::min<int64_t>(tiles - 4 * c, 4), [&](auto n) {
            for (int64_t g = p0; g < p1; ++g)
              amx_chunk<decltype(n)::value>(K, N, xt.get() + c * blocks * 2048, Y, M, 64 * c, g, part, colscale,
                                            [&](int64_t b) { return panel.data() + ((g - p0) * blocks + b) * 256; });
          });
      }
    }
    _tile_release();
  });
}

void q4_matmul_amx(const float* x, int64_t M, const Q4Weight& wt, float* Y) {
  const int64_t blocks = wt.k / kBlock;
  amx_matmul(x, M, wt.k, wt.n, Y, nullptr, [&](int64_t g, int64_t b, uint32_t* tile) {
    const int64_t at = g * blocks + b;
    for (int m = 0; m < 4; ++m)
      _mm_prefetch(reinterpret_cast<const char*>(wt.w + at * 256 + kPrefetchBytes + 64 * m), _MM_HINT_T0);
    dequantize_bf16(wt.w + at * 256, wt.s + at * 16, wt.l + at * 16, tile);
  });
}
#endif
#endif

// Column groups g and g + 1 of the 8-column layout as dot_columns8 takes them pre-unpacked
// (unpacked_at): blocks x 16 vectors
void unpack_columns8(const uint8_t* W, int64_t g, int64_t blocks, __m256i* out) {
  for (int64_t b = 0; b < blocks; ++b)
    for (int m = 0; m < 4; ++m)
      for (int j = 0; j < 2; ++j)
        split_nibbles(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + ((g + j) * blocks + b) * 128 + 32 * m)),
                      out[unpacked_at(b, m, j)], out[unpacked_at(b, m, j) + 1]);
}

// The column layouts (G = 16 with AVX-512, 8 with AVX2): each thread's column groups, row tiles of 8
// (AVX-512: 32 registers) per unpacking of a block; AVX2 (16 registers) takes two groups at once in
// tiles of 3 rows, so that each activation broadcast serves both (the model's products at 64 rows
// 16 % faster than one group in tiles of 4, at 5 rows 14 %: commit message), and a thread's odd last
// group alone in tiles of 4. From kColumns8UnpackRows rows a pair's weights are unpacked once, into
// a thread's buffer (L1/L2), for all its row tiles: 12 / 16 / 64 / 256 rows 4 / 8 / 13 / 14 % faster;
// from 4 rows, 4 to 8 rows were 8-15 % slower (commit message)
constexpr int64_t kColumns8PairRowTile = 3;
constexpr int64_t kColumns8UnpackRows = 12;

void q4_matmul_columns(const float* x, int64_t M, const Q4Weight& wt, float* Y) {
  const int64_t K = wt.k, N = wt.n, blocks = K / kBlock, G = wt.columns;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xscale(M * blocks), xsum(M * blocks);
  // each row's blocks alone: rows apart on the threads from two chunks (with chunks of 8 from 16
  // rows, and the row-wise passes' from 16, a 16-row step was 3.6 % slower)
  at::parallel_for(0, M, M >= 2 * kRowGrain ? kRowGrain : M, [&](int64_t m0, int64_t m1) {
    quantize_rows(x + m0 * K, m1 - m0, K, xq.data() + m0 * K, xscale.data() + m0 * blocks, nullptr, nullptr,
                  xsum.data() + m0 * blocks);
  });
  at::parallel_for(0, N / G, 1, [&](int64_t g0, int64_t g1) {
    // written before it is read: not zeroed
    std::unique_ptr<__m256i[]> unpacked(G == 8 && M >= kColumns8UnpackRows ? new __m256i[blocks * 16] : nullptr);
    for (int64_t g = g0; g < g1;) {
      const bool pair = G == 8 && g + 1 < g1;
      const int64_t tile = G == 16 ? kColumns16RowTile : pair ? kColumns8PairRowTile : kRowTile;
      const __m256i* un = pair ? unpacked.get() : nullptr;
      if (un) unpack_columns8(wt.w, g, blocks, unpacked.get());
      for (int64_t m0 = 0; m0 < M; m0 += tile)
        with_rows<kColumns16RowTile>(std::min<int64_t>(M - m0, tile), [&](auto rows) {
          constexpr int R = decltype(rows)::value;
          const int8_t* xr = xq.data() + m0 * K;
          const float *xs = xscale.data() + m0 * blocks, *xsm = xsum.data() + m0 * blocks;
#if LLMSERVE_AVX512
          if (G == 16) return dot_columns16<R>(wt.w, wt.s, wt.l, xr, xs, xsm, Y + m0 * N, g, N, K);
#endif
          if (un) return dot_columns8<R, 2, true>(wt.w, wt.s, wt.l, xr, xs, xsm, Y + m0 * N, g, N, K, un);
          if (pair) return dot_columns8<R, 2>(wt.w, wt.s, wt.l, xr, xs, xsm, Y + m0 * N, g, N, K);
          dot_columns8<R, 1>(wt.w, wt.s, wt.l, xr, xs, xsm, Y + m0 * N, g, N, K);
        });
      g += pair ? 2 : 1;
    }
  });
}

// y [M, N] = x [M, K] @ W^T, x and y contiguous
void q4_matmul(const float* x, int64_t M, const Q4Weight& wt, float* Y) {
#if LLMSERVE_AMX
  if (wt.columns == 16 && M >= amx_min_rows_now && amx_ready()) return q4_matmul_amx(x, M, wt, Y);
#endif
  TORCH_CHECK(wt.columns != 16 || LLMSERVE_AVX512, "the 16-column layout needs the AVX-512 build");
  if (wt.columns) return q4_matmul_columns(x, M, wt, Y);
  const int64_t K = wt.k, N = wt.n, blocks = K / kBlock;
  const uint8_t* W = wt.w;
  const uint16_t* S = wt.s;
  const uint16_t* L = wt.l;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xscale(M * blocks), xsum(M * blocks);
  std::vector<float> xscale4(LLMSERVE_AVX512 ? M * blocks * 4 : 0), xsum4(LLMSERVE_AVX512 ? M * blocks * 4 : 0);
  const int8_t* XQ = xq.data();
  const float* XS = xscale.data();
  const float* XS4 = xscale4.data();
  const float* XSUM4 = xsum4.data();
  const float* XSUM = xsum.data();
  quantize_rows(x, M, K, xq.data(), xscale.data(), LLMSERVE_AVX512 ? xscale4.data() : nullptr,
                LLMSERVE_AVX512 ? xsum4.data() : nullptr, xsum.data());
  for_each_tile<kRowTile>(M, N, [&](auto rows, int64_t m0, int64_t c0, int64_t c1) {
    const int64_t r0 = m0 * blocks;
    dot_rows<decltype(rows)::value>(W, S, L, XQ + r0 * kBlock, XS + r0, LLMSERVE_AVX512 ? XS4 + r0 * 4 : nullptr,
                                    LLMSERVE_AVX512 ? XSUM4 + r0 * 4 : nullptr, XSUM + r0, Y + m0 * N, c0, c1, N, K);
  });
}

// llmserve::q8_mm's columns [n0, n1) for ROWS rows: 8-bit weights (one scale per output column)
// times float activations, as they are: no rounding of the activations (an int8-activation kernel
// turned the first token of "What is the capital of France?" as w4's LM head). Each 16 weights are
// widened to floats once for all the tile's rows; two accumulators per row hide the FMA latency.
template <int ROWS>
void dot_rows_q8(const int8_t* W, const float* S, const float* x, float* y, int64_t n0, int64_t n1, int64_t N,
                 int64_t K) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wrow = W + n * K;
#if LLMSERVE_AVX512
    __m512 acc[2][ROWS];
    for (int i = 0; i < ROWS; ++i) acc[0][i] = acc[1][i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(wrow + k) + kPrefetchBytes, _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {
        const __m512 w = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + k + 16 * h))));
        for (int i = 0; i < ROWS; ++i) acc[h][i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + i * K + k + 16 * h), acc[h][i]);
      }
    }
    for (int i = 0; i < ROWS; ++i) y[i * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][i], acc[1][i])) * S[n];
#else
    __m256 acc[2][ROWS];
    for (int i = 0; i < ROWS; ++i) acc[0][i] = acc[1][i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(wrow + k) + kPrefetchBytes, _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {
        const __m256 w = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wrow + k + 8 * h))));
        for (int i = 0; i < ROWS; ++i) acc[h][i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i * K + k + 8 * h), acc[h][i]);
      }
    }
    for (int i = 0; i < ROWS; ++i) y[i * N + n] = horizontal_sum(_mm256_add_ps(acc[0][i], acc[1][i])) * S[n];
#endif
  }
}

#if LLMSERVE_AVX512
// The 8-bit pairs layout (quantize.pack_q8_pairs), where the CPU has AVX-512: q [N/16, K/32, 512]
// int8, block b of column group g holding in byte 32 j + 2 c + t weight 32 b + 2 j + t of column
// 16 g + c. It is tdpbf16ps' weight-tile layout in int8 (q8_matmul_amx widens it in order, exactly:
// bf16 holds every int8); here 16 bytes widen to 16 floats, two inputs of each of 8 columns, times
// the activations' pair broadcast: float activations as they are, and no horizontal sums.
inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// ROWS rows of x [*, K] times column group g: y's 16 columns of those rows
template <int ROWS>
void dot_pairs_q8(const int8_t* W, const float* S, const float* x, float* y, int64_t g, int64_t N, int64_t K) {
  const int64_t blocks = K / kBlock;
  __m512 acc[ROWS][2];   // columns 0-7 and 8-15 of the group, lane 2c + t: the sum over inputs 2j + t
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int8_t* wg = W + g * blocks * 512;
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* src = wg + b * 512;
    for (int m = 0; m < 8; ++m) _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBytes + 64 * m), _MM_HINT_T0);
    for (int j = 0; j < 16; ++j) {
      const __m512 lo = widen16(src + 32 * j), hi = widen16(src + 32 * j + 16);
      for (int r = 0; r < ROWS; ++r) {
        double pair;   // inputs 2j and 2j + 1 of row r, broadcast as one 64-bit lane
        std::memcpy(&pair, x + r * K + b * kBlock + 2 * j, sizeof pair);
        const __m512 xv = _mm512_castpd_ps(_mm512_set1_pd(pair));
        acc[r][0] = _mm512_fmadd_ps(lo, xv, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(hi, xv, acc[r][1]);
      }
    }
  }
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512 scale = _mm512_loadu_ps(S + g * 16);
  for (int r = 0; r < ROWS; ++r) {
    const __m512 sums = _mm512_add_ps(_mm512_permutex2var_ps(acc[r][0], even, acc[r][1]),
                                      _mm512_permutex2var_ps(acc[r][0], odd, acc[r][1]));
    _mm512_storeu_ps(y + r * N + g * 16, _mm512_mul_ps(sums, scale));
  }
}

#if LLMSERVE_AMX
// The pairs layout on AMX from amx_min_rows rows (bf16 activations): w4's LM head at 64 rows took
// 11.8 ms through the bf16 weights (oneDNN, then the logits widened to float), reading 56 MB
void q8_matmul_amx(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* W, const float* S, float* Y) {
  const int64_t blocks = K / kBlock;
  amx_matmul(x, M, K, N, Y, S, [&](int64_t g, int64_t b, uint32_t* tile) {
    const int8_t* src = W + (g * blocks + b) * 512;
    for (int m = 0; m < 8; ++m) _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBytes + 64 * m), _MM_HINT_T0);
    for (int j = 0; j < 16; ++j)
      _mm512_storeu_si512(tile + 16 * j, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(widen16(src + 32 * j + 16),
                                                                                       widen16(src + 32 * j))));
  });
}
#endif

// The pairs layout's tiling: column groups of 16 split over the threads, each group's rows in tiles
// of kColumns16RowTile; tile(rows, g, m0) gets the tile's row count as a compile-time constant
template <typename Tile>
void for_each_group16(int64_t M, int64_t N, const Tile& tile) {
  at::parallel_for(0, N / 16, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t m0 = 0; m0 < M; m0 += kColumns16RowTile)
        with_rows<kColumns16RowTile>(std::min<int64_t>(M - m0, kColumns16RowTile), [&](auto rows) { tile(rows, g, m0); });
  });
}

void q8_matmul_pairs(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* W, const float* S, float* Y) {
#if LLMSERVE_AMX
  if (M >= amx_min_rows_now && amx_ready()) return q8_matmul_amx(x, M, K, N, W, S, Y);
#endif
  for_each_group16(M, N, [&](auto rows, int64_t g, int64_t m0) {
    dot_pairs_q8<decltype(rows)::value>(W, S, x + m0 * K, Y + m0 * N, g, N, K);
  });
}

#if LLMSERVE_BF16
// ROWS rows of bf16 activations, xb [*, K/2] pairs (inputs 2i and 2i + 1 of a row in one 32-bit
// word), times column group g of the pairs layout: each 32 weights widened once to bf16 (exactly)
// for all rows, one vdpbf16ps a row where the float kernel takes two FMAs; lane c is column c
template <int ROWS>
void dot_pairs_bf16(const int8_t* W, const float* S, const uint32_t* xb, float* y, int64_t g, int64_t N, int64_t K) {
  const int64_t blocks = K / kBlock, pairs = K / 2;
  __m512 acc[ROWS][2];   // even and odd pairs: two chains of vdpbf16ps a row
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int8_t* wg = W + g * blocks * 512;
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* src = wg + b * 512;
    for (int m = 0; m < 8; ++m) _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchBytes + 64 * m), _MM_HINT_T0);
    for (int j = 0; j < 16; j += 2) {
      const __m512bh w0 = _mm512_cvtne2ps_pbh(widen16(src + 32 * j + 16), widen16(src + 32 * j));
      const __m512bh w1 = _mm512_cvtne2ps_pbh(widen16(src + 32 * j + 48), widen16(src + 32 * j + 32));
      for (int r = 0; r < ROWS; ++r) {
        const uint32_t* p = xb + r * pairs + b * 16 + j;
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, reinterpret_cast<__m512bh>(_mm512_set1_epi32(p[0])));
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, reinterpret_cast<__m512bh>(_mm512_set1_epi32(p[1])));
      }
    }
  }
  const __m512 scale = _mm512_loadu_ps(S + g * 16);
  for (int r = 0; r < ROWS; ++r) _mm512_storeu_ps(y + r * N + g * 16, _mm512_mul_ps(_mm512_add_ps(acc[r][0], acc[r][1]), scale));
}

// x [M, K] rounded to bf16 (to nearest even, as the instruction does), a row's inputs 2i, 2i + 1 in one 32-bit word
std::vector<uint16_t> rows_bf16(const float* x, int64_t M, int64_t K) {
  std::vector<uint16_t> xb(M * K);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t k = 0; k < K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb.data() + r * K + k),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(x + r * K + k))));
  return xb;
}

// Y [M, N]: the pairs layout's product with the activations xb (rows_bf16), every column on vdpbf16ps;
// each row's values the same in a tile of any number of rows (llmserve::q8_mm_bf16: sampled rows' LM head)
void q8_matmul_pairs_bf16(const uint16_t* xb, int64_t M, int64_t K, int64_t N, const int8_t* W, const float* S, float* Y) {
  const uint32_t* XB = reinterpret_cast<const uint32_t*>(xb);
  for_each_group16(M, N, [&](auto rows, int64_t g, int64_t m0) {
    dot_pairs_bf16<decltype(rows)::value>(W, S, XB + m0 * K / 2, Y + m0 * N, g, N, K);
  });
}

// ROWS rows of int8 activations (quantize_rows' plain layout: xq [*, K], xs and isum [*, K/32] each
// block's scale and the sum of its integers) times column group g of the pairs layout: each 64
// bytes of weights (inputs 4m..4m+3 of the 16 columns, as pairs) put in vpdpbusd's order once, by
// one word permutation, and offset by 128 to be its unsigned operand (the row's 128 x isum taken
// off each block's integer sum, exact), for all rows; a row costs 8 vpdpbusd a block, as the 4-bit
// kernel's. Lane c is column c. It takes a block in fewer instructions than the float or bf16
// kernels, so it prefetches twice as far ahead (a 2-row verify step 5.14 -> 4.81 ms: commit message).
template <int ROWS>
void dot_pairs_i8(const int8_t* W, const float* S, const int8_t* xq, const float* xs, const int32_t* isum, float* y,
                  int64_t g, int64_t N, int64_t K) {
  const int64_t blocks = K / kBlock;
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
  const int8_t* wg = W + g * blocks * 512;
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* src = wg + b * 512;
    for (int m = 0; m < 8; ++m) _mm_prefetch(reinterpret_cast<const char*>(src + 2 * kPrefetchBytes + 64 * m), _MM_HINT_T0);
    __m512i w[8];
    for (int m = 0; m < 8; ++m)
      w[m] = _mm512_xor_si512(_mm512_permutexvar_epi16(order, _mm512_loadu_si512(src + 64 * m)), flip);
    for (int r = 0; r < ROWS; ++r) {
      const __m512i sums = _mm512_sub_epi32(dot_block16(w, xq + r * K + b * kBlock), _mm512_set1_epi32(128 * isum[r * blocks + b]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(xs[r * blocks + b]), acc[r]);
    }
  }
  const __m512 scale = _mm512_loadu_ps(S + g * 16);
  for (int r = 0; r < ROWS; ++r) _mm512_storeu_ps(y + r * N + g * 16, _mm512_mul_ps(acc[r], scale));
}

// llmserve::q8_mm_top's product: Y [M, N] exactly as q8_matmul_pairs gives it (float activations,
// no AMX) at each row's largest, near enough elsewhere, at the integer kernel's speed. Every column is
// first taken with the activations rounded to int8 in blocks of 32 (x^ = quantize_rows' values times
// their block's scale: a), then each row's columns that may be its largest get the float kernel's
// values (e): |a_n - e_n| <= b_n = norms[n] (||x - x^|| + gamma (||x|| + ||x^||)), norms[n] the
// column's norm with its scale (Cauchy-Schwarz; gamma bounds the float sums' rounding: the integer
// sums are exact), so no column whose a_n + b_n falls below L = max(a - b) can be the row's largest,
// nor outranks it as it stays; every other column's group of 16 is taken again with float
// activations, the same instructions as in a one-row step. So a greedy row's argmax is a one-row
// step's, batched or not.
void q8_matmul_pairs_top(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* W, const float* S,
                         const float* norms, float* Y) {
  const int64_t blocks = K / kBlock;
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M * blocks), xsum(M * blocks);
  std::vector<int32_t> isum(M * blocks);
  quantize_rows(x, M, K, xq.data(), xs.data(), nullptr, nullptr, xsum.data());
  for (int64_t i = 0; i < M * blocks; ++i)
    isum[i] = std::accumulate(xq.begin() + i * kBlock, xq.begin() + (i + 1) * kBlock, int32_t{0});
  std::vector<double> radius(M);
  const double gamma = (K + 8) * 0x1p-24 / (1 - (K + 8) * 0x1p-24);
  for (int64_t r = 0; r < M; ++r) {
    double dd = 0, xx = 0, bb = 0;
    for (int64_t k = 0; k < K; ++k) {
      const double b = double(xq[r * K + k]) * xs[r * blocks + k / kBlock], v = x[r * K + k];
      dd += (v - b) * (v - b), xx += v * v, bb += b * b;
    }
    radius[r] = (std::sqrt(dd) + gamma * (std::sqrt(xx) + std::sqrt(bb))) * (1 + 1e-6);
  }
  for_each_group16(M, N, [&](auto rows, int64_t g, int64_t m0) {
    dot_pairs_i8<decltype(rows)::value>(W, S, xq.data() + m0 * K, xs.data() + m0 * blocks, isum.data() + m0 * blocks,
                                        Y + m0 * N, g, N, K);
  });
  at::parallel_for(0, M, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* y = Y + r * N;
      const __m512d R = _mm512_set1_pd(radius[r]), tiny = _mm512_set1_pd(1e-30);
      __m512d best = _mm512_set1_pd(-INFINITY);
      for (int64_t n = 0; n < N; n += 8) {
        const __m512d a = _mm512_cvtps_pd(_mm256_loadu_ps(y + n)), w = _mm512_cvtps_pd(_mm256_loadu_ps(norms + n));
        best = _mm512_max_pd(best, _mm512_sub_pd(_mm512_fnmadd_pd(w, R, a), tiny));
      }
      const double L = _mm512_reduce_max_pd(best);
      if (!std::isfinite(L) || !std::isfinite(radius[r])) {   // inf or NaN: the float kernel's row, all of it
        for (int64_t g = 0; g < N / 16; ++g) dot_pairs_q8<1>(W, S, x + r * K, y, g, N, K);
        continue;
      }
      const __m512d low = _mm512_set1_pd(L);
      int64_t last = -1;
      for (int64_t n = 0; n < N; n += 8) {
        const __m512d a = _mm512_cvtps_pd(_mm256_loadu_ps(y + n)), w = _mm512_cvtps_pd(_mm256_loadu_ps(norms + n));
        // not (a + b >= L): NaN counts as a candidate
        __mmask8 near = ~_mm512_cmp_pd_mask(_mm512_add_pd(_mm512_fmadd_pd(w, R, a), tiny), low, _CMP_LT_OQ);
        for (; near; near &= near - 1) {
          const int64_t g = (n + __builtin_ctz(near)) / 16;
          if (g != last) dot_pairs_q8<1>(W, S, x + r * K, y, g, N, K);
          last = g;
        }
      }
    }
  });
}
#endif
#endif

const uint16_t* halves(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

// A 4-bit weight's packed bytes and its scale and low (float16, each of shape `sizes`): rows layout
// packed [N, K/2], scale and low [N, K/32]; G-column layout (G = 16 or 8) packed [N/G, K/32, 16 G],
// scale and low [N/G, K/32, G]. Pointers only: decode_layers calls it for every projection of every step.
Q4Weight q4_weight(const torch::Tensor& packed, at::IntArrayRef sizes, const uint16_t* scale, const uint16_t* low) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "packed must be contiguous uint8");
  if (packed.dim() == 3) {
    const int columns = static_cast<int>(packed.size(2) / 16);   // 256 bytes a block: 16 columns, 128: 8
    TORCH_CHECK((columns == 16 || columns == 8) && packed.size(2) == columns * 16 && sizes.size() == 3 &&
                sizes[0] == packed.size(0) && sizes[1] == packed.size(1) && sizes[2] == columns,
                "column layouts: packed [N/G, K/32, 16 G], scale and low [N/G, K/32, G], G = 16 or 8");
    return {packed.data_ptr<uint8_t>(), scale, low, packed.size(0) * columns, packed.size(1) * kBlock, columns};
  }
  TORCH_CHECK(packed.dim() == 2 && sizes.size() == 2 && sizes[0] == packed.size(0) && sizes[1] * kBlock == packed.size(1) * 2,
              "rows layout: packed [N, K/2], scale and low [N, K/32]");
  return {packed.data_ptr<uint8_t>(), scale, low, packed.size(0), packed.size(1) * 2};
}

// A PackedLinear's packed bytes and scales [2, ...] float16 (scale, then low)
Q4Weight q4_weight(const torch::Tensor& packed, const torch::Tensor& scales) {
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && scales.dim() >= 3 && scales.size(0) == 2,
              "scales must be [2, ...] contiguous float16: scale, then low");
  const uint16_t* s = halves(scales);
  return q4_weight(packed, scales.sizes().slice(1), s, s + scales.numel() / 2);
}

// MKL's packed single-precision product, from torch's own library (its x86 builds link MKL in),
// looked up at run time: elsewhere mkl_pack returns nothing and the float weights stay as they
// are. torch's matrix product repacks the weight matrix on every call; packed once, it is not.
// The integers are MKL_INT: passed as 64 bits, which an LP64 MKL reads the low half of.
struct MklSgemm {
  using GetSize = size_t (*)(int, int64_t, int64_t, int64_t);
  using Pack = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, float*);
  using Compute = void (*)(int, int64_t, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                           int64_t, float, float*, int64_t);
  GetSize get_size = nullptr;
  Pack pack = nullptr;
  Compute compute = nullptr;
};
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPackedMatrix = 151, kBMatrix = 162;   // mkl_cblas.h

const MklSgemm& mkl_sgemm() {
  static const MklSgemm found = [] {
    MklSgemm m;
    if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) {
      m.get_size = reinterpret_cast<MklSgemm::GetSize>(dlsym(lib, "cblas_sgemm_pack_get_size"));
      m.pack = reinterpret_cast<MklSgemm::Pack>(dlsym(lib, "cblas_sgemm_pack"));
      m.compute = reinterpret_cast<MklSgemm::Compute>(dlsym(lib, "cblas_sgemm_compute"));
    }
    return m.get_size && m.pack && m.compute ? m : MklSgemm{};
  }();
  return found;
}

// y [M, N] = x [M, K] @ W^T with W [N, K] packed by mkl_pack
void mkl_packed_matmul(const float* x, int64_t M, int64_t N, int64_t K, const torch::Tensor& packed, float* y) {
  mkl_sgemm().compute(kRowMajor, kNoTrans, kPackedMatrix, M, N, K, x, K, reinterpret_cast<const float*>(packed.data_ptr()),
                      K, 0.f, y, N);
}

// One of a layer's projections, y [R, N] = x [R, K] @ W^T: our 4-bit kernel up to max_packed_rows
// rows (bound by reading the weights), else the float weight [N, K], MKL-packed (uint8 bytes from
// mkl_pack) or as it is through torch's matrix product: arithmetic-bound steps of many rows, where a
// dense product beats unpacking blocks.
struct Projection {
  Q4Weight packed;
  torch::Tensor dense;
};

void project(const float* x, int64_t R, const Projection& p, int64_t max_packed_rows, float* y) {
  if (R <= max_packed_rows) {
    q4_matmul(x, R, p.packed, y);
    return;
  }
  if (p.dense.scalar_type() == torch::kByte) {
    mkl_packed_matmul(x, R, p.packed.n, p.packed.k, p.dense, y);
    return;
  }
  const auto opts = torch::TensorOptions().dtype(torch::kFloat32);
  const auto xt = torch::from_blob(const_cast<float*>(x), {R, p.packed.k}, opts);
  auto yt = torch::from_blob(y, {R, p.packed.n}, opts);
  if (p.dense.scalar_type() == torch::kFloat32)
    at::mm_out(yt, xt, p.dense.t());
  else   // bf16 weights (AMX): the product in their dtype, the result back to float
    yt.copy_(at::mm(xt.to(p.dense.scalar_type()), p.dense.t()));
}

void rms_norm_rows(const float* x, const float* w, float* y, int64_t R, int64_t C, float eps) {
  at::parallel_for(0, R, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * C;
      const float inv = 1.f / std::sqrt(dot_floats(xr, xr, C) / C + eps);
      for (int64_t i = 0; i < C; ++i) y[r * C + i] = xr[i] * inv * w[i];
    }
  });
}

// x [R, C] += d [R, C]
void add_into(float* x, const float* d, int64_t R, int64_t C) {
  at::parallel_for(0, R, kRowGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0 * C; i < r1 * C; ++i) x[i] += d[i];
  });
}

// exp(x) of 8 floats x <= 0 (softmax's, after subtracting the largest): 2^n e^r with n = round(x
// log2 e) and |r| <= ln 2 / 2, e^r by Cephes' degree-7 polynomial (float rounding, as std::exp);
// below -87 it gives 2^-126-ish where std::exp underflows: nothing a sum of at least 1 notices
inline __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);       // x - n ln 2, in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 e = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(c));
  e = _mm256_fmadd_ps(e, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(e, _mm256_castsi256_ps(two_n));
}

// p[i] = exp(p[i] - max p), i < n; returns their sum
inline float softmax_numerators(float* p, int64_t n) {
  __m256 most = _mm256_set1_ps(-INFINITY);   // the largest, 8 lanes at a time (the same value in any order)
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) most = _mm256_max_ps(most, _mm256_loadu_ps(p + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, most);
  float top = *std::max_element(lanes, lanes + 8);
  for (; i < n; ++i) top = std::max(top, p[i]);
  const __m256 vtop = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p + i), vtop));
    _mm256_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = horizontal_sum(acc);
  for (; i < n; ++i) sum += p[i] = std::exp(p[i] - top);
  return sum;
}

// out[i] = silu(gate[i]) * up[i], i < n (SwiGLU); -gate above 88 would overflow exp_ps, where silu is 0
inline void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp_ps(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(88.f)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// attend_heads (below) in 256 bits, for builds without AVX-512: the G query heads of one KV head
// (adjacent in q, D = 8 DV values each) over positions [first, end); the values' weighted sums CH
// vectors of D at a time for all G heads (G x CH sums in registers). It rounds as the scalar loop
// in decode_layers_over (other head sizes) does, bit for bit (scores by dot_floats, each weight
// normalized before a multiply and an add): on int8 prefills the first token of "What is the
// capital of France?" is near-tied, and an FMA-and-tree order turned it from "The" to "L'". That
// loop cost ~4 us per position and KV head over a step's 30 layers (a 1-row step 4.2 ms at 40
// tokens of context, 6.5 ms at 340). p: scratch of at least G x end floats (head g's at g x end).
template <int DV, int G, typename KV>
void attend_heads8(const float* q, const KV* keys, const KV* values, int64_t first, int64_t end, float scale,
                   float* p, float* y) {
  constexpr int64_t D = 8 * DV;
  constexpr int CH = G == 1 ? DV : G == 2 ? (DV < 4 ? DV : 4) : (DV < 2 ? DV : 2);
  static_assert(DV % CH == 0, "D / 8 must be a multiple of the chunk");
  for (int g = 0; g < G; ++g)
    for (int64_t i = first; i < end; ++i) p[g * end + i] = dot_floats(q + g * D, keys + i * D, D) * scale;
  float inv_sum[G];
  for (int g = 0; g < G; ++g) inv_sum[g] = 1.f / softmax_numerators(p + g * end + first, end - first);
  for (int c = 0; c < DV; c += CH) {
    __m256 acc[G][CH];
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < CH; ++j) acc[g][j] = _mm256_setzero_ps();
    for (int64_t i = first; i < end; ++i) {
      __m256 v[CH];
      for (int j = 0; j < CH; ++j) v[j] = load8(values + i * D + 8 * (c + j));
      for (int g = 0; g < G; ++g) {
        const __m256 weight = _mm256_set1_ps(p[g * end + i] * inv_sum[g]);
        for (int j = 0; j < CH; ++j) acc[g][j] = _mm256_add_ps(acc[g][j], _mm256_mul_ps(weight, v[j]));
      }
    }
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < CH; ++j) _mm256_storeu_ps(y + g * D + 8 * (c + j), acc[g][j]);
  }
}

#if LLMSERVE_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// Attention's scores, one query head's against a key: lane l of a vector of 16 values (D = 16 DV)
// sums the products of values l, 16 + l, ... in a chain, then the lanes are summed in halves (lane l
// plus lane l + 8, then l + 4, l + 2, l + 1). Both kernels below take every score in that order, so a
// token's attention is the same bits in a decode step, a verify step and a prefill.

// 16 vectors' lane sums, in some order of lanes: halving (512 -> 256 -> 128 -> 64 -> 32 bits), each
// step adding two vectors' halves side by side; ~3 instructions a vector where _mm512_reduce_add_ps takes ~8
inline __m512 halve16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int p = 0; p < 8; ++p)
    a[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[p], v[p + 8], 0x44), _mm512_shuffle_f32x4(v[p], v[p + 8], 0xEE));
  for (int p = 0; p < 4; ++p)
    b[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[p], a[p + 4], 0x88), _mm512_shuffle_f32x4(a[p], a[p + 4], 0xDD));
  for (int p = 0; p < 2; ++p)
    c[p] = _mm512_add_ps(_mm512_shuffle_ps(b[p], b[p + 2], 0x44), _mm512_shuffle_ps(b[p], b[p + 2], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}

// lane p: the sum of vector p's lanes (halve16, then its lanes put in order: found once by halving
// vectors whose lanes all hold their own number)
inline __m512 sum_lanes16(const __m512* v) {
  static const __m512i order = [] {
    __m512 probe[16];
    for (int p = 0; p < 16; ++p) probe[p] = _mm512_set1_ps(static_cast<float>(p));
    alignas(64) float lanes[16];
    alignas(64) int32_t index[16];
    _mm512_store_ps(lanes, halve16(probe));
    for (int lane = 0; lane < 16; ++lane) index[static_cast<int>(lanes[lane]) / 16] = lane;
    return _mm512_load_si512(index);
  }();
  return _mm512_permutexvar_ps(order, halve16(v));
}

// The scores of the G query heads of one KV head (adjacent in q, D = 16 DV values each) at positions
// [first, end), times scale, into p + g ps: a key row a vector at a time, 16 positions' sums of lanes
// together (sum_lanes16), the last positions' one by one. For a lone token (a decode step's)
template <int DV, int G, typename KV>
void score_rows(const float* q, const KV* keys, int64_t first, int64_t end, float scale, float* p, int64_t ps) {
  constexpr int64_t D = 16 * DV;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int g = 0; g < G; ++g) {
    __m512 qv[DV];
    for (int j = 0; j < DV; ++j) qv[j] = _mm512_loadu_ps(q + g * D + 16 * j);
    float* pg = p + g * ps;
    int64_t i = first;
    for (; i + 16 <= end; i += 16) {
      __m512 dots[16];
      for (int k = 0; k < 16; ++k) {
        dots[k] = _mm512_mul_ps(qv[0], load16(keys + (i + k) * D));
        for (int j = 1; j < DV; ++j) dots[k] = _mm512_fmadd_ps(qv[j], load16(keys + (i + k) * D + 16 * j), dots[k]);
      }
      _mm512_storeu_ps(pg + i, _mm512_mul_ps(sum_lanes16(dots), vscale));
    }
    for (; i < end; ++i) {
      __m512 dot = _mm512_mul_ps(qv[0], load16(keys + i * D));
      for (int j = 1; j < DV; ++j) dot = _mm512_fmadd_ps(qv[j], load16(keys + i * D + 16 * j), dot);
      pg[i] = _mm512_reduce_add_ps(dot) * scale;   // halves as halve16's
    }
  }
}

inline __m512 unpacklo_pairs(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}
inline __m512 unpackhi_pairs(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}
// lane j of v[i] <- lane i of v[j] (a 16x16 transpose: single floats, pairs, then 128-bit quarters)
inline void transpose16(__m512* v) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]), t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  for (int i = 0; i < 16; i += 4) {
    v[i] = unpacklo_pairs(t[i], t[i + 2]), v[i + 1] = unpackhi_pairs(t[i], t[i + 2]);
    v[i + 2] = unpacklo_pairs(t[i + 1], t[i + 3]), v[i + 3] = unpackhi_pairs(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = h; i < h + 4; ++i)
      t[i] = _mm512_shuffle_f32x4(v[i], v[i + 4], 0x88), t[i + 4] = _mm512_shuffle_f32x4(v[i], v[i + 4], 0xDD);
  for (int i = 0; i < 8; ++i) v[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88), v[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
}

constexpr int kColumnHeads = 4;   // query heads sharing each load of kt's columns (22 registers)

// The scores of HN query heads (head h's values at q[h]) at the 16 positions from i0 whose keys kt
// holds as columns (kt[16 d + j]: value d of position i0 + j; a lane a position), times scale, into
// p[h] + i0 for the positions before end[h]. Lane l's chain (c_l) and the halving sums as score_rows
// takes them, in columns: c_l + c_{l+8} (u_l), u_l + u_{l+4} (w_l), w_l + w_{l+2} (x_l), x_0 + x_1.
template <int DV, int HN>
inline void score_columns(const float* kt, const float* const* q, const int64_t* end, int64_t i0, float scale,
                          float* const* p) {
  __m512 x[2][HN];
  for (int l2 = 0; l2 < 2; ++l2) {
    __m512 w[2][HN];
    for (int l1 = 0; l1 < 2; ++l1) {
      __m512 u[2][HN];
      for (int l0 = 0; l0 < 2; ++l0) {
        const int a = l2 + 2 * l1 + 4 * l0, b = a + 8;
        __m512 ca[HN], cb[HN];
        for (int j = 0; j < DV; ++j) {
          const __m512 ka = _mm512_loadu_ps(kt + 16 * (16 * j + a)), kb = _mm512_loadu_ps(kt + 16 * (16 * j + b));
          for (int h = 0; h < HN; ++h) {
            const __m512 qa = _mm512_set1_ps(q[h][16 * j + a]), qb = _mm512_set1_ps(q[h][16 * j + b]);
            ca[h] = j ? _mm512_fmadd_ps(qa, ka, ca[h]) : _mm512_mul_ps(qa, ka);
            cb[h] = j ? _mm512_fmadd_ps(qb, kb, cb[h]) : _mm512_mul_ps(qb, kb);
          }
        }
        for (int h = 0; h < HN; ++h) u[l0][h] = _mm512_add_ps(ca[h], cb[h]);
      }
      for (int h = 0; h < HN; ++h) w[l1][h] = _mm512_add_ps(u[0][h], u[1][h]);
    }
    for (int h = 0; h < HN; ++h) x[l2][h] = _mm512_add_ps(w[0][h], w[1][h]);
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int h = 0; h < HN; ++h) {
    const int64_t live = end[h] - i0;
    const __mmask16 mask = live >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << live) - 1);
    _mm512_mask_storeu_ps(p[h] + i0, mask, _mm512_mul_ps(_mm512_add_ps(x[0][h], x[1][h]), vscale));
  }
}

// y + g D = the values' sums over positions [first, end) weighted by p + g ps, times inv_sum[g], for
// PG heads (D = 16 DV values each): each value row converted once for them all, their PG x DV sums in
// registers (not inlined: inlined into attend_tile, GCC stored the sums to memory at every position)
template <int DV, int PG, typename KV>
__attribute__((noinline)) void sum_values(const float* p, int64_t ps, const KV* values, int64_t first, int64_t end,
                                          const float* inv_sum, float* y) {
  constexpr int64_t D = 16 * DV;
  __m512 acc[PG][DV];
  for (int g = 0; g < PG; ++g)
    for (int j = 0; j < DV; ++j) acc[g][j] = _mm512_setzero_ps();
  for (int64_t i = first; i < end; ++i) {
    __m512 v[DV];
    for (int j = 0; j < DV; ++j) v[j] = load16(values + i * D + 16 * j);
    for (int g = 0; g < PG; ++g) {
      const __m512 weight = _mm512_set1_ps(p[g * ps + i]);
      for (int j = 0; j < DV; ++j) acc[g][j] = _mm512_fmadd_ps(weight, v[j], acc[g][j]);
    }
  }
  for (int g = 0; g < PG; ++g)
    for (int j = 0; j < DV; ++j) _mm512_storeu_ps(y + g * D + 16 * j, _mm512_mul_ps(acc[g][j], _mm512_set1_ps(inv_sum[g])));
}

// The PG heads' softmax over positions [first, end) of their scores (head g's at p + g ps, made the
// numerators in place), then their weighted sums of the values into y + g D
template <int DV, int PG, typename KV>
inline void weigh_values(float* p, int64_t ps, const KV* values, int64_t first, int64_t end, float* y) {
  float inv_sum[PG];
  for (int g = 0; g < PG; ++g) inv_sum[g] = 1.f / softmax_numerators(p + g * ps + first, end - first);
  sum_values<DV, PG, KV>(p, ps, values, first, end, inv_sum, y);
}

// Attention of n consecutive new tokens of one row (their first position the same; token t sees
// [first, end0 + t)) for the G query heads of one KV head each (token t's head g at q + t qs + g D,
// D = 16 DV values), into y + t ys + g D: y = softmax(q . keys * scale) @ values. A lone token's
// scores a key row at a time (score_rows); several tokens' with each 16 positions' keys converted and
// put in columns once (kt: 16 D floats) for all n G heads (score_columns: each column's load shared by
// kColumnHeads heads, no sums across lanes, each key converted once a tile, not once a head). Then per
// token its heads' softmax and weighted sums of the values, PG heads at a time. The same bits as a token
// at a time: 128- / 512- / 1024- / 2000-token prefills 2.5 / 6.2 / 8.8 / 12.3 % faster, decode and
// verify steps the same (Zen 4, in process, taking turns: commit message).
// p: scratch of n G rows of ps >= end0 + n floats (head h = t G + g at p + h ps).
template <int DV, int G, int PG, typename KV>
void attend_tile(const float* q, int64_t qs, int64_t n, const KV* keys, const KV* values, int64_t first,
                 int64_t end0, float scale, float* p, int64_t ps, float* kt, float* y, int64_t ys) {
  constexpr int64_t D = 16 * DV;
  if (n == 1) {
    score_rows<DV, G, KV>(q, keys, first, end0, scale, p, ps);
  } else {
    const int64_t heads = n * G, end_max = end0 + n - 1;
    std::vector<const float*> qh(heads);
    std::vector<float*> ph(heads);
    std::vector<int64_t> eh(heads);
    for (int64_t h = 0; h < heads; ++h) qh[h] = q + (h / G) * qs + (h % G) * D, ph[h] = p + h * ps, eh[h] = end0 + h / G;
    for (int64_t i0 = first; i0 < end_max; i0 += 16) {
      const int64_t m = std::min<int64_t>(16, end_max - i0);
      for (int c = 0; c < DV; ++c) {
        __m512 v[16];
        for (int j = 0; j < 16; ++j) v[j] = j < m ? load16(keys + (i0 + j) * D + 16 * c) : _mm512_setzero_ps();
        transpose16(v);
        for (int d = 0; d < 16; ++d) _mm512_storeu_ps(kt + 16 * (16 * c + d), v[d]);
      }
      // tokens whose last position is before i0 are done: the live heads are the last ones
      for (int64_t h = std::max<int64_t>(0, i0 - end0 + 1) * G; h < heads; h += kColumnHeads)
        with_rows<kColumnHeads>(std::min<int64_t>(kColumnHeads, heads - h), [&](auto hn) {
          score_columns<DV, decltype(hn)::value>(kt, &qh[h], &eh[h], i0, scale, &ph[h]);
        });
    }
  }
  for (int64_t t = 0; t < n; ++t)
    for (int64_t g = 0; g < G; g += PG)
      weigh_values<DV, PG, KV>(p + (t * G + g) * ps, ps, values, first, end0 + t, y + t * ys + g * D);
}
#endif

// the model's rotary embedding (rotate_half) of one head's D values, in place
void rotate_head(float* x, const float* cos, const float* sin, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

}  // namespace

torch::Tensor q4_mm(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                    const torch::Tensor& low) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be [M, K] float32 on the CPU");
  const auto pc = packed.contiguous();
  const auto sc = scale.contiguous();
  const auto lc = low.contiguous();
  TORCH_CHECK(sc.scalar_type() == torch::kHalf && lc.scalar_type() == torch::kHalf && lc.sizes() == sc.sizes(),
              "scale and low must be float16, of one shape");
  const Q4Weight wt = q4_weight(pc, sc.sizes(), halves(sc), halves(lc));
  TORCH_CHECK(x.size(1) == wt.k && wt.k % kBlock == 0, "x [M, K] against a weight of K = ", wt.k);
  const auto xc = x.contiguous();
  auto y = torch::empty({x.size(0), wt.n}, torch::kFloat32);
  q4_matmul(xc.data_ptr<float>(), x.size(0), wt, y.data_ptr<float>());
  return y;
}

// llmserve::mkl_pack: w [N, K] float32 packed for MKL's products with it (uint8 bytes), or an empty
// tensor where torch's library has no MKL
torch::Tensor mkl_pack(const torch::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.dim() == 2 && w.device().is_cpu(), "w must be [N, K] float32");
  const auto& mkl = mkl_sgemm();
  if (!mkl.pack) return torch::empty({0}, torch::kUInt8);
  const auto wc = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto packed = torch::empty({static_cast<int64_t>(mkl.get_size(kBMatrix, 64, N, K))}, torch::kUInt8);
  mkl.pack(kRowMajor, kBMatrix, kTrans, 64, N, K, 1.f, wc.data_ptr<float>(), K, reinterpret_cast<float*>(packed.data_ptr()));
  return packed;
}

// llmserve::mkl_mm: y [M, N] = x [M, K] @ W^T, W packed by mkl_pack
torch::Tensor mkl_mm(const torch::Tensor& x, const torch::Tensor& packed, int64_t N) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && packed.scalar_type() == torch::kByte &&
              mkl_sgemm().compute && packed.numel() == static_cast<int64_t>(mkl_sgemm().get_size(kBMatrix, 64, N, x.size(1))),
              "x [M, K] float32 and a weight [N, K] from mkl_pack");
  const auto xc = x.contiguous();
  auto y = torch::empty({x.size(0), N}, torch::kFloat32);
  mkl_packed_matmul(xc.data_ptr<float>(), x.size(0), N, x.size(1), packed, y.data_ptr<float>());
  return y;
}

// llmserve::q8_mm: y [M, N] = x [M, K] @ (q * scale)^T for w8's layers (and w4's LM head):
//   x [M, K] float32, K a multiple of 32; q [N, K] int8, or in the pairs layout [N/16, K/32, 512]
//   (AVX-512 builds, q8_matmul_pairs); scale [N] float32
torch::Tensor q8_mm(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be [M, K] float32 on the CPU");
  const bool pairs = q.dim() == 3;
  const int64_t M = x.size(0), K = x.size(1), N = pairs ? q.size(0) * 16 : q.size(0);
  TORCH_CHECK(q.scalar_type() == torch::kChar && scale.scalar_type() == torch::kFloat32 && scale.numel() == N &&
              K % 32 == 0 && (pairs ? q.size(1) * kBlock == K && q.size(2) == 512 : q.dim() == 2 && q.size(1) == K),
              "q [N, K] or [N/16, K/32, 512] int8 and scale [N] float32, K a multiple of 32");
  const auto xc = x.contiguous();
  const auto qc = q.contiguous();
  const auto sc = scale.contiguous();
  auto y = torch::empty({M, N}, torch::kFloat32);
  const float* X = xc.data_ptr<float>();
  const int8_t* W = qc.data_ptr<int8_t>();
  const float* S = sc.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  if (pairs) {
#if LLMSERVE_AVX512
    q8_matmul_pairs(X, M, K, N, W, S, Y);
    return y;
#else
    TORCH_CHECK(false, "the 8-bit pairs layout needs the AVX-512 build");
#endif
  }
  for_each_tile<kQ8RowTile>(M, N, [&](auto rows, int64_t m0, int64_t c0, int64_t c1) {
    dot_rows_q8<decltype(rows)::value>(W, S, X + m0 * K, Y + m0 * N, c0, c1, N, K);
  });
  return y;
}

// x [M, K] float32 on the CPU, q [N/16, K/32, 512] int8 (the pairs layout), scale [N] float32: N
int64_t check_pairs(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x must be [M, K] float32 on the CPU");
  const int64_t N = q.dim() == 3 ? q.size(0) * 16 : 0;
  TORCH_CHECK(q.scalar_type() == torch::kChar && q.dim() == 3 && q.size(1) * kBlock == x.size(1) && q.size(2) == 512 &&
              scale.scalar_type() == torch::kFloat32 && scale.numel() == N, "q [N/16, K/32, 512] int8, scale [N] float32");
  return N;
}

// llmserve::q8_mm_bf16: q8_mm's product in the pairs layout with x rounded to bf16 (vdpbf16ps), x [M, K]
// float32, any M: a sampled row's LM head, whose logits are read whole (see PackedLinear.rounded)
torch::Tensor q8_mm_bf16(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  const int64_t M = x.size(0), K = x.size(1), N = check_pairs(x, q, scale);
  const auto xc = x.contiguous(), qc = q.contiguous(), sc = scale.contiguous();
  auto y = torch::empty({M, N}, torch::kFloat32);
#if LLMSERVE_BF16
  q8_matmul_pairs_bf16(rows_bf16(xc.data_ptr<float>(), M, K).data(), M, K, N, qc.data_ptr<int8_t>(), sc.data_ptr<float>(),
                       y.data_ptr<float>());
#else
  TORCH_CHECK(false, "q8_mm_bf16 needs the AVX-512 build with vdpbf16ps (has_bf16_dot)");
#endif
  return y;
}

// llmserve::q8_mm_top: q8_mm's product in the pairs layout, exact at each row's largest (its argmax
// is q8_mm's without AMX, the first of equal largest), near it elsewhere (q8_matmul_pairs_top);
// norms [N] float32: each column's norm with its scale, rounded up. Where the build has no
// vdpbf16ps (has_bf16_dot), an error.
torch::Tensor q8_mm_top(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& norms) {
  const int64_t M = x.size(0), K = x.size(1), N = check_pairs(x, q, scale);
  TORCH_CHECK(norms.scalar_type() == torch::kFloat32 && norms.numel() == N, "norms [N] float32");
  const auto xc = x.contiguous(), qc = q.contiguous(), sc = scale.contiguous(), nc = norms.contiguous();
  auto y = torch::empty({M, N}, torch::kFloat32);
#if LLMSERVE_BF16
  q8_matmul_pairs_top(xc.data_ptr<float>(), M, K, N, qc.data_ptr<int8_t>(), sc.data_ptr<float>(), nc.data_ptr<float>(),
                      y.data_ptr<float>());
#else
  TORCH_CHECK(false, "q8_mm_top needs the AVX-512 build with vdpbf16ps (has_bf16_dot)");
#endif
  return y;
}

// llmserve::decode_layers: every decoder layer of a Llama-style model (RMSNorm, fused q|k|v with
// rotary embedding, grouped-query attention over the KV cache, o, fused gate|up with SiLU, down)
// for W new tokens in each of B rows (or counts[b] in row b), in one call: the layers' ~60 small ops
// each (norms, rotary, softmax, residuals, cache writes) cost more than their products at a few rows
// when torch runs them one by one, or torch.compile's guards and wrappers do. Writes the new keys and
// values into the cache at positions lengths[b] .. lengths[b] + W - 1; token j of row b attends to
// positions starts[b] .. lengths[b] + j (itself alone where that is before starts[b]: a prefill's left
// padding).
//   x [R, C] the embedded tokens (row b's adjacent), R = B*W or the sum of counts; cos, sin [R, D]
//   k_cache, v_cache [L, S, Hkv, T, D] float32 or float16, each row contiguous (a prefill passes its
//   rows); starts, lengths [>= B] int64; counts: empty (W tokens a row), or [B] int64, a prefill
//   without its left padding (each row's uncached tail alone: a 64-prompt prefill of the chat
//   workload computed 2,048 rows where its tokens were 1,555)
//   weights: per layer input norm, qkv packed, qkv scales, qkv weight, o packed, o scales, o weight,
//   post-attention norm, gate|up packed, scales, weight, down packed, scales, weight (PackedLinear's)
//   max_packed_rows: steps of at most this many rows (B*W) take the packed weights, others the float
//   ones (PackedLinear.max_packed_rows, the crossover measured at start-up)
// Returns the last layer's output [R, C] (before the final norm).
template <typename KV>
torch::Tensor decode_layers_over(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                 torch::Tensor k_cache, torch::Tensor v_cache, const torch::Tensor& starts,
                                 const torch::Tensor& lengths, const torch::Tensor& counts, int64_t W,
                                 int64_t num_heads, double eps, double scale, int64_t max_packed_rows,
                                 at::TensorList weights) {
  constexpr int64_t kPerLayer = 14;
  const int64_t R = x.size(0), C = x.size(1);
  const int64_t L = k_cache.size(0), Hkv = k_cache.size(2), T = k_cache.size(3), D = k_cache.size(4);
  const int64_t H = num_heads, G = H / Hkv;
  // token r: row ROW[r], its NEW[r]-th new token
  TORCH_CHECK(counts.numel() ? counts.scalar_type() == torch::kInt64 && counts.dim() == 1 : W > 0 && R % W == 0,
              "counts: empty (W > 0 tokens a row, R a multiple of W) or [B] int64");
  const int64_t B = counts.numel() ? counts.numel() : R / W;
  std::vector<int64_t> ROW(R), NEW(R);
  {
    const auto cn = counts.contiguous();
    int64_t r = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = counts.numel() ? cn.data_ptr<int64_t>()[b] : W;
      TORCH_CHECK(n > 0 && r + n <= R, "counts: at least 1 a row, x's rows in all");
      for (int64_t j = 0; j < n; ++j, ++r) ROW[r] = b, NEW[r] = j;
    }
    TORCH_CHECK(r == R, "counts: x's rows in all");
  }
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && cos.sizes() == sin.sizes() &&
              cos.size(0) == R && cos.size(1) == D && cos.scalar_type() == torch::kFloat32 && D % 2 == 0 && H % Hkv == 0,
              "x [R, C] and cos, sin [R, D] float32");
  // a prefill passes the rows it fills (a slice of the cache's rows: only dims 2-4 need be contiguous)
  auto rows_contiguous = [](const torch::Tensor& c) {
    return c.stride(4) == 1 && c.stride(3) == c.size(4) && c.stride(2) == c.size(3) * c.size(4);
  };
  TORCH_CHECK(rows_contiguous(k_cache) && v_cache.sizes() == k_cache.sizes() && v_cache.strides() == k_cache.strides() &&
              v_cache.scalar_type() == k_cache.scalar_type() && k_cache.size(1) >= B,
              "the cache must be [L, S >= B, Hkv, T, D], each row contiguous");
  TORCH_CHECK(starts.scalar_type() == torch::kInt64 && lengths.scalar_type() == torch::kInt64 && starts.numel() >= B &&
              lengths.numel() >= B, "starts and lengths: int64, one per row");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L * kPerLayer, "weights: ", kPerLayer, " tensors per layer");
  const auto cs = cos.contiguous(), sn = sin.contiguous();
  const auto st = starts.contiguous(), ln = lengths.contiguous();
  const int64_t* START = st.data_ptr<int64_t>();
  const int64_t* LEN = ln.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(0 <= START[ROW[r]] && 0 <= LEN[ROW[r]] && LEN[ROW[r]] + NEW[r] < T, "row ", ROW[r],
                ": its new tokens do not fit the cache");
  const float* COS = cs.data_ptr<float>();
  const float* SIN = sn.data_ptr<float>();
  const int64_t QKV = (H + 2 * Hkv) * D;
  const int64_t layer_stride = k_cache.stride(0), row_stride = k_cache.stride(1), head_stride = k_cache.stride(2);
  KV* KC = static_cast<KV*>(k_cache.data_ptr());
  KV* VC = static_cast<KV*>(v_cache.data_ptr());

  auto out = x.contiguous().clone();     // the residual stream
  float* X = out.data_ptr<float>();
  // written before they are read: not zeroed (zeroing them was 2.6 % of a 64-token prefill, on one thread)
  auto alloc = [](int64_t n) { return std::unique_ptr<float[]>(new float[n]); };
  auto h_ = alloc(R * C), qkv_ = alloc(R * QKV), o_ = alloc(R * H * D), delta_ = alloc(R * C);
  float *h = h_.get(), *qkv = qkv_.get(), *o = o_.get(), *delta = delta_.get();
  // Attention's tiles (token, count): up to kQueryTile consecutive new tokens of one row that share
  // their first position (attend_tile, AVX-512 builds and D = 64 or 128; else a token each), fewer where
  // the tiles would leave a thread without a task (a one-row verify step: 6 tokens in tiles of 3, 3 KV heads)
  constexpr int64_t kQueryTile = 16;
  const bool tiled = LLMSERVE_AVX512 && (D == 64 || D == 128);
  std::vector<std::pair<int64_t, int64_t>> tiles;
  const auto make_tiles = [&](int64_t most) {
    tiles.clear();
    for (int64_t r = 0; r < R; ++r) {
      const int64_t b = ROW[r];
      const bool alone = LEN[b] + NEW[r] < START[b];   // left padding
      if (!tiles.empty()) {
        auto& [r0, n] = tiles.back();
        if (!alone && ROW[r0] == b && n < most && LEN[b] + NEW[r0] >= START[b]) {
          ++n;
          continue;
        }
      }
      tiles.emplace_back(r, 1);
    }
  };
  make_tiles(tiled ? kQueryTile : 1);
  const int64_t threads = at::get_num_threads(), least = (2 * threads + Hkv - 1) / Hkv;
  if (tiled && static_cast<int64_t>(tiles.size()) < least) make_tiles(std::max<int64_t>(1, (R + least - 1) / least));
  // each thread's scratch: the scores of a tile's heads (rows of score_stride floats), then a tile's
  // keys in columns (16 D floats)
  int64_t score_stride = 16;
  for (int64_t r = 0; r < R; ++r) score_stride = std::max(score_stride, LEN[ROW[r]] + NEW[r] + 1);
  score_stride = (score_stride + 15) / 16 * 16;
  int64_t most_tokens = 1;
  for (const auto& tile : tiles) most_tokens = std::max(most_tokens, tile.second);
  std::vector<std::unique_ptr<float[]>> scratch(threads);
  for (auto& s : scratch) s = alloc(most_tokens * G * score_stride + 16 * D + G);
  std::unique_ptr<float[]> gate_up_, act_;   // for the largest I so far (layers may differ)
  int64_t I_held = 0;
  for (int64_t layer = 0; layer < L; ++layer) {
    const auto* w = &weights[layer * kPerLayer];
    const Projection wqkv{q4_weight(w[1], w[2]), w[3]}, wo{q4_weight(w[4], w[5]), w[6]};
    const Projection wgu{q4_weight(w[8], w[9]), w[10]}, wdown{q4_weight(w[11], w[12]), w[13]};
    for (const Projection* p : {&wqkv, &wo, &wgu, &wdown})
      TORCH_CHECK(p->dense.scalar_type() == torch::kByte ? p->dense.numel() > 0 && mkl_sgemm().compute
                      : p->dense.dim() == 2 && p->dense.is_contiguous() && p->dense.size(0) == p->packed.n &&
                        p->dense.size(1) == p->packed.k, "layer ", layer, ": a float weight's shape");
    TORCH_CHECK(wqkv.packed.k == C && wqkv.packed.n == QKV && wo.packed.k == H * D && wo.packed.n == C &&
                wgu.packed.k == C && wdown.packed.n == C && wgu.packed.n == 2 * wdown.packed.k && w[0].numel() == C &&
                w[7].numel() == C, "layer ", layer, ": weight shapes");
    const int64_t I = wdown.packed.k;
    if (I > I_held) gate_up_ = alloc(R * 2 * I), act_ = alloc(R * I), I_held = I;
    float *gate_up = gate_up_.get(), *act = act_.get();

    rms_norm_rows(X, w[0].data_ptr<float>(), h, R, C, static_cast<float>(eps));
    project(h, R, wqkv, max_packed_rows, qkv);
    KV* kl = KC + layer * layer_stride;
    KV* vl = VC + layer * layer_stride;
    at::parallel_for(0, R, kRowGrain, [&](int64_t r0, int64_t r1) {   // rotary; new keys and values into the cache
      for (int64_t r = r0; r < r1; ++r) {
        float* q = qkv + r * QKV;
        for (int64_t head = 0; head < H + Hkv; ++head) rotate_head(q + head * D, COS + r * D, SIN + r * D, D);
        const int64_t b = ROW[r], pos = LEN[b] + NEW[r];
        for (int64_t kv = 0; kv < Hkv; ++kv) {
          store_kv(q + (H + kv) * D, D, kl + b * row_stride + kv * head_stride + pos * D);
          store_kv(q + (H + Hkv + kv) * D, D, vl + b * row_stride + kv * head_stride + pos * D);
        }
      }
    });
    // attention: a task per tile (above) and KV head. Tiles in the order 0, last, 1, last - 1, ...: a
    // prefill's later tokens see more positions, and a thread's share of the tasks (a range) then holds
    // as many late tokens as early ones (in order, one thread's attention took 3x the other's: commit message)
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    at::parallel_for(0, num_tiles * Hkv, 1, [&](int64_t t0, int64_t t1) {
      float* p = scratch[at::get_thread_num()].get();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i = t / Hkv, kv = t % Hkv;
        const auto [r, n] = tiles[i % 2 ? num_tiles - 1 - i / 2 : i / 2];
        const int64_t b = ROW[r];
        // positions [first, end) for token r (one more for each next one); a prefill's left padding
        // (before starts[b]) sees itself alone
        const int64_t end = LEN[b] + NEW[r] + 1, first = std::min(START[b], end - 1);
        const KV* keys = kl + b * row_stride + kv * head_stride;
        const KV* values = vl + b * row_stride + kv * head_stride;
        const float* q = qkv + r * QKV + kv * G * D;       // head kv * G + g at q + g * D
        float* y = o + r * H * D + kv * G * D;
        const float sc = static_cast<float>(scale);
#if LLMSERVE_AVX512
        if (tiled) {
          float* scores = p + 16 * D;
          const auto run = [&](auto dv, auto g, auto pg) {
            attend_tile<decltype(dv)::value, decltype(g)::value, decltype(pg)::value, KV>(
                q, QKV, n, keys, values, first, end, sc, scores, score_stride, p, y, H * D);
          };
          using std::integral_constant;
          if (D == 64 && G == 3) run(integral_constant<int, 4>{}, integral_constant<int, 3>{}, integral_constant<int, 3>{});
          else if (D == 64 && G == 2) run(integral_constant<int, 4>{}, integral_constant<int, 2>{}, integral_constant<int, 2>{});
          else if (D == 64 && G == 4) run(integral_constant<int, 4>{}, integral_constant<int, 4>{}, integral_constant<int, 4>{});
          else if (D == 128 && G == 2) run(integral_constant<int, 8>{}, integral_constant<int, 2>{}, integral_constant<int, 2>{});
          else   // a head at a time
            for (int64_t g = 0; g < G; ++g)
              (D == 64 ? attend_tile<4, 1, 1, KV> : attend_tile<8, 1, 1, KV>)(
                  q + g * D, QKV, n, keys, values, first, end, sc, scores, score_stride, p, y + g * D, H * D);
          continue;
        }
#else
        if (D == 64 || D == 128) {   // a head at a time, or G together where G <= 4 (D = 64) or 2 (D = 128)
          if (D == 64 && G == 3) attend_heads8<8, 3, KV>(q, keys, values, first, end, sc, p, y);
          else if (D == 64 && G == 2) attend_heads8<8, 2, KV>(q, keys, values, first, end, sc, p, y);
          else if (D == 64 && G == 4) attend_heads8<8, 4, KV>(q, keys, values, first, end, sc, p, y);
          else if (D == 128 && G == 2) attend_heads8<16, 2, KV>(q, keys, values, first, end, sc, p, y);
          else
            for (int64_t g = 0; g < G; ++g)
              (D == 64 ? attend_heads8<8, 1, KV> : attend_heads8<16, 1, KV>)(q + g * D, keys, values, first, end, sc,
                                                                            p, y + g * D);
          continue;
        }
#endif
        // other head sizes: scalar, as attend_heads8 rounds
        float* inv_sum = p + G * score_stride;
        for (int64_t i = first; i < end; ++i)
          for (int64_t g = 0; g < G; ++g) p[g * score_stride + i] = dot_floats(q + g * D, keys + i * D, D) * sc;
        for (int64_t g = 0; g < G; ++g) inv_sum[g] = 1.f / softmax_numerators(p + g * score_stride + first, end - first);
        std::fill_n(y, G * D, 0.f);
        for (int64_t i = first; i < end; ++i) {
          const KV* v = values + i * D;
          for (int64_t g = 0; g < G; ++g) {
            const float weight = p[g * score_stride + i] * inv_sum[g];
            for (int64_t d = 0; d < D; ++d) y[g * D + d] += weight * load1(v + d);
          }
        }
      }
    });
    project(o, R, wo, max_packed_rows, delta);
    add_into(X, delta, R, C);
    rms_norm_rows(X, w[7].data_ptr<float>(), h, R, C, static_cast<float>(eps));
    project(h, R, wgu, max_packed_rows, gate_up);
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) silu_mul(&gate_up[r * 2 * I], &gate_up[r * 2 * I + I], &act[r * I], I);
    });
    project(act, R, wdown, max_packed_rows, delta);
    add_into(X, delta, R, C);
  }
  return out;
}

torch::Tensor decode_layers(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                            torch::Tensor k_cache, torch::Tensor v_cache, const torch::Tensor& starts,
                            const torch::Tensor& lengths, const torch::Tensor& counts, int64_t W, int64_t num_heads,
                            double eps, double scale, int64_t max_packed_rows, at::TensorList weights) {
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat32 || k_cache.scalar_type() == torch::kHalf,
              "the cache must be float32 or float16");
  return (k_cache.scalar_type() == torch::kHalf ? decode_layers_over<uint16_t> : decode_layers_over<float>)(
      x, cos, sin, k_cache, v_cache, starts, lengths, counts, W, num_heads, eps, scale, max_packed_rows, weights);
}

// llmserve::amx_min_rows: the rows from which the AMX build's 4-bit and 8-bit products take AMX tiles
// (bf16 activations) where the AVX-512 kernels take int8 (4-bit) or float (8-bit) ones; rows >= 0
// sets it. Returns the value before, or 1 << 30 (never) where this build or process has no AMX.
int64_t amx_min_rows(int64_t rows) {
#if LLMSERVE_AMX
  if (!amx_ready()) return int64_t{1} << 30;
  return rows >= 0 ? amx_min_rows_now.exchange(rows) : amx_min_rows_now.load();
#else
  return int64_t{1} << 30;
#endif
}

TORCH_LIBRARY(llmserve, m) {
  m.def("amx_min_rows(int rows) -> int", &amx_min_rows);
  m.def("q4_mm(Tensor x, Tensor packed, Tensor scale, Tensor low) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("q8_mm_top(Tensor x, Tensor q, Tensor scale, Tensor norms) -> Tensor");
  m.def("q8_mm_bf16(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("has_bf16_dot() -> bool", [] { return bool(LLMSERVE_BF16); });
  m.def("mkl_pack(Tensor w) -> Tensor");
  m.def("mkl_mm(Tensor x, Tensor packed, int N) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor starts, "
        "Tensor lengths, Tensor counts, int W, int num_heads, float eps, float scale, int max_packed_rows, Tensor[] weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmserve, CPU, m) {
  m.impl("q4_mm", &q4_mm);
  m.impl("q8_mm", &q8_mm);
  m.impl("q8_mm_top", &q8_mm_top);
  m.impl("q8_mm_bf16", &q8_mm_bf16);
  m.impl("mkl_pack", &mkl_pack);
  m.impl("mkl_mm", &mkl_mm);
  m.impl("decode_layers", &decode_layers);
}
