/* bf16 kernels for decoding on the CPU: products of a few rows with a weight, one query's
 * attention over the cache, and a layer's small steps (RMSNorm; rotary embedding and cache writes)
 * (cogvlm/kernels.py builds and calls them; see it for why). Built for
 * AVX512-BF16 (and AMX), or, where the CPU has only AVX2 and FMA, in fp32 arithmetic on the widened
 * bf16; the attention is written once over each instruction set's helpers.
 *
 * The weight is stored packed as (O/16, K/2, 16, 2): one 64-byte chunk holds two adjacent inputs
 * (k, k+1) of 16 consecutive outputs. With `vdpbf16ps` and the pair of x broadcast, a chunk adds
 * into 16 output sums at once, no horizontal reduction needed; NB blocks of 16 outputs are read side
 * by side to keep several streams and accumulators in flight. With AMX, a block's 16 consecutive
 * chunks are one tile of 16 input pairs x 16 outputs. With AVX2, each 32-bit lane of a chunk holds
 * input k of an output in its low half and k+1 in its high half: a shift and a mask make them fp32.
 * All need K % 32 == 0 and O % 16 == 0.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* one bf16 -> fp32 (exact) */
static inline float bf16_widen(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* ---- 8 fp32 lanes with AVX2 and FMA, which every build has (an AVX512-BF16 CPU has them too) */

/* 8 fp32 -> 8 bf16 in the low halves of the lanes, rounded to nearest even. A NaN made from bf16
 * operands has its low 16 bits zero, so the increment cannot carry out of its mantissa: it stays NaN. */
static inline __m256i round_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd), 16);
}

static inline __m256 widen8(const uint16_t *p) { /* 8 bf16 -> 8 fp32 */
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* e^x for x in [-87, 88] (clamped there: 2^n built in the exponent bits, -126 <= n <= 127) as the
 * AVX-512 exp_nonpositive */
static inline __m256 exp_clamped(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504f));
  __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147181f)); /* f ln 2 */
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

/* 8 fp32 -> 8 bf16 at y, rounded to nearest even */
static inline void store8(__m256 p, uint16_t *y) {
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(round_bf16(p), _mm256_setzero_si256()), 0xd8);
  _mm_storeu_si128((__m128i *)y, _mm256_castsi256_si128(packed));
}

#if defined(__AVX512BF16__)
typedef void (*kernel_fn)(const uint16_t *, long, const uint16_t *, const uint16_t *, uint16_t *, long, long,
                          long);

/* y[m, 16b .. 16(b+NB)) for M rows of x (row stride ldx), fp32 sums, bias added, rounded to bf16 */
#define KERNEL(M, NB)                                                                                          \
  static void kernel_##M##_##NB(const uint16_t *x, long ldx, const uint16_t *w, const uint16_t *bias,          \
                                uint16_t *y, long O, long K, long b) {                                         \
    __m512 acc[NB][M];                                                                                         \
    for (int j = 0; j < NB; j++)                                                                               \
      for (int m = 0; m < M; m++) acc[j][m] = _mm512_setzero_ps();                                             \
    const uint16_t *block = w + b * 16 * K;                                                                    \
    for (long pair = 0; pair < K / 2; pair++) {                                                                \
      __m512bh xs[M];                                                                                          \
      for (int m = 0; m < M; m++)                                                                              \
        xs[m] = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + m * ldx + 2 * pair));                       \
      for (int j = 0; j < NB; j++) {                                                                           \
        const uint16_t *chunk = block + j * 16 * K + pair * 32;                                                \
        _mm_prefetch((const char *)(chunk + 1024), _MM_HINT_T0);                                               \
        __m512bh ws = (__m512bh)_mm512_loadu_si512(chunk);                                                     \
        for (int m = 0; m < M; m++) acc[j][m] = _mm512_dpbf16_ps(acc[j][m], ws, xs[m]);                         \
      }                                                                                                        \
    }                                                                                                          \
    for (int j = 0; j < NB; j++) {                                                                             \
      __m512 add = bias ? _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(bias + (b + j) * 16))) \
                        : _mm512_setzero_ps();                                                                 \
      for (int m = 0; m < M; m++)                                                                              \
        _mm256_storeu_si256((__m256i *)(y + m * O + (b + j) * 16),                                             \
                            (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[j][m], add)));                       \
    }                                                                                                          \
  }

#define KERNELS(M) KERNEL(M, 1) KERNEL(M, 2)
KERNELS(1) KERNELS(2) KERNELS(3) KERNELS(4) KERNELS(5) KERNELS(6) KERNELS(7) KERNELS(8) KERNEL(1, 4)

#define ROW(M) {kernel_##M##_1, kernel_##M##_2}
static const kernel_fn KERNELS_BY_ROWS[8][2] = {ROW(1), ROW(2), ROW(3), ROW(4), ROW(5), ROW(6), ROW(7), ROW(8)};

/* y (M, O) = x (M, K) . W^T (+ bias (O)), W packed as above, fp32 sums; any M, 8 rows at a time;
 * returns 0 (as every row function does where it cannot fail) */
int cogvlm_rows_bf16(const uint16_t *x, long M, const uint16_t *w, const uint16_t *bias, uint16_t *y, long O,
                     long K) {
  const long blocks = O / 16;
  for (long m0 = 0; m0 < M; m0 += 8) {
    const long rows = M - m0 < 8 ? M - m0 : 8;
    const long step = rows == 1 ? 4 : 2; /* blocks side by side: 4 for one row, 2 for more */
    const kernel_fn wide = rows == 1 ? kernel_1_4 : KERNELS_BY_ROWS[rows - 1][1];
#pragma omp parallel for schedule(static)
    for (long b = 0; b < blocks; b += step) {
      if (blocks - b >= step)
        wide(x + m0 * K, K, w, bias, y + m0 * O, O, K, b);
      else
        for (long t = b; t < blocks; t++) KERNELS_BY_ROWS[rows - 1][0](x + m0 * K, K, w, bias, y + m0 * O, O, K, t);
    }
  }
  return 0;
}

/* The same product with AMX (`tdpbf16ps`: a tile of up to 16 rows of x, 32 inputs each, times a tile
 * of 16 input pairs x 16 outputs), 32 rows and 32 outputs a pass: sums in tiles 0-3, x in 4-5, the
 * weight in 6-7. Where `vdpbf16ps` runs out of arithmetic from 2 rows on, this reads the weight at
 * the one-row speed up to 32 rows. */
typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

static void amx_store(int tile_rows, const float *sums, const uint16_t *bias, uint16_t *y, long O) {
  __m512 add = bias ? _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)bias)) : _mm512_setzero_ps();
  for (int r = 0; r < tile_rows; r++)
    _mm256_storeu_si256((__m256i *)(y + r * O), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(sums + 16 * r), add)));
}

int cogvlm_rows_bf16_amx(const uint16_t *x, long M, const uint16_t *w, const uint16_t *bias, uint16_t *y, long O,
                         long K) {
  const long blocks = O / 16;
  for (long m0 = 0; m0 < M; m0 += 32) {
    const int top = M - m0 < 16 ? (int)(M - m0) : 16;
    const int low = M - m0 - 16 <= 0 ? 0 : (M - m0 - 16 < 16 ? (int)(M - m0 - 16) : 16);
    const uint16_t *xs = x + m0 * K;
    uint16_t *ys = y + m0 * O;
#pragma omp parallel
    {
      tile_config cfg = {0};
      cfg.palette = 1;
      for (int t = 0; t < 8; t++) cfg.colsb[t] = 64;
      cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = top;
      cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = low;
      cfg.rows[6] = cfg.rows[7] = 16;
      if (!low) cfg.colsb[2] = cfg.colsb[3] = cfg.colsb[5] = 0;
      _tile_loadconfig(&cfg);
      float sums[4][256];
#pragma omp for schedule(static)
      for (long b = 0; b < blocks; b += 2) {
        const int pair = blocks - b >= 2;
        const uint16_t *w0 = w + b * 16 * K, *w1 = w0 + 16 * K * pair; /* a last lone block: w1 = w0, unstored */
        _tile_zero(0); _tile_zero(1);
        if (low) { _tile_zero(2); _tile_zero(3); }
        for (long k = 0; k < K; k += 32) {
          _tile_loadd(4, xs + k, 2 * K);
          _tile_loadd(6, w0 + k * 16, 64);
          _tile_loadd(7, w1 + k * 16, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (low) {
            _tile_loadd(5, xs + 16 * K + k, 2 * K);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, sums[0], 64); _tile_stored(1, sums[1], 64);
        if (low) { _tile_stored(2, sums[2], 64); _tile_stored(3, sums[3], 64); }
        for (int j = 0; j <= pair; j++) {
          const uint16_t *bj = bias ? bias + (b + j) * 16 : 0;
          amx_store(top, sums[j], bj, ys + (b + j) * 16, O);
          if (low) amx_store(low, sums[2 + j], bj, ys + 16 * O + (b + j) * 16, O);
        }
      }
      _tile_release();
    }
  }
  return 0;
}

/* exp for x <= 0 (softmax after subtracting the max): 2^(x log2 e) as 2^n times a degree-6
 * Taylor polynomial for e^(f ln 2), f in [-0.5, 0.5] (relative error about 1e-7); x clamped at -87. */
static inline __m512 exp_nonpositive(__m512 x) {
  __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(1.44269504f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147181f)); /* f ln 2 */
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

static inline __m512bh load_bh(const uint16_t *p, __mmask32 m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }

/* Dot product of two bf16 vectors of length n (any n), fp32 sums. */
static inline float dot_bf16(const uint16_t *a, const uint16_t *b, long n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  long i = 0;
  for (; i + 64 <= n; i += 64) {
    acc0 = _mm512_dpbf16_ps(acc0, load_bh(a + i, -1), load_bh(b + i, -1));
    acc1 = _mm512_dpbf16_ps(acc1, load_bh(a + i + 32, -1), load_bh(b + i + 32, -1));
  }
  for (; i < n; i += 32) {
    __mmask32 m = n - i >= 32 ? (__mmask32)-1 : (((__mmask32)1 << (n - i)) - 1);
    acc0 = _mm512_dpbf16_ps(acc0, load_bh(a + i, m), load_bh(b + i, m));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* Dot products of a with four vectors at once (four memory streams in flight), length n. */
static inline void dot4_bf16(const uint16_t *a, const uint16_t *b0, const uint16_t *b1, const uint16_t *b2,
                             const uint16_t *b3, long n, float *out) {
  __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps(), c2 = _mm512_setzero_ps(), c3 = _mm512_setzero_ps();
  for (long i = 0; i < n; i += 32) {
    __mmask32 m = n - i >= 32 ? (__mmask32)-1 : (((__mmask32)1 << (n - i)) - 1);
    __m512bh x = load_bh(a + i, m);
    c0 = _mm512_dpbf16_ps(c0, x, load_bh(b0 + i, m));
    c1 = _mm512_dpbf16_ps(c1, x, load_bh(b1 + i, m));
    c2 = _mm512_dpbf16_ps(c2, x, load_bh(b2 + i, m));
    c3 = _mm512_dpbf16_ps(c3, x, load_bh(b3 + i, m));
  }
  out[0] = _mm512_reduce_add_ps(c0), out[1] = _mm512_reduce_add_ps(c1);
  out[2] = _mm512_reduce_add_ps(c2), out[3] = _mm512_reduce_add_ps(c3);
}

/* scores[0..S) (-inf where masked) -> probabilities rounded to bf16 in probs: exp(score - top)
 * over their sum, in fp32; masked keys get exactly 0 */
static void softmax_bf16(float *scores, uint16_t *probs, long S, float top) {
  __m512 total = _mm512_setzero_ps();
  for (long s = 0; s < S; s += 16) {
    __mmask16 m = S - s >= 16 ? (__mmask16)-1 : (__mmask16)((1u << (S - s)) - 1);
    __m512 x = _mm512_maskz_loadu_ps(m, scores + s);
    m &= _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ); /* masked keys: exactly 0 */
    __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(x, _mm512_set1_ps(top))));
    _mm512_mask_storeu_ps(scores + s, S - s >= 16 ? (__mmask16)-1 : (__mmask16)((1u << (S - s)) - 1), e);
    total = _mm512_add_ps(total, e);
  }
  const __m512 norm = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (long s = 0; s < S; s += 16) {
    __mmask16 m = S - s >= 16 ? (__mmask16)-1 : (__mmask16)((1u << (S - s)) - 1);
    __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, scores + s), norm);
    _mm256_mask_storeu_epi16(probs + s, m, (__m256i)_mm512_cvtneps_pbh(p));
  }
}

/* 16 fp32 -> 16 bf16 at y */
static inline void store16f(const float *c, uint16_t *y) {
  _mm256_storeu_si256((__m256i *)y, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(c)));
}

#else /* AVX2 and FMA: fp32 arithmetic on the widened bf16 */

/* 16 sums (two halves of 8) plus bias -> 16 bf16 at y */
static inline void store16(__m256 lo, __m256 hi, const uint16_t *bias, uint16_t *y) {
  if (bias) {
    const __m256i b = _mm256_loadu_si256((const __m256i *)bias);
    lo = _mm256_add_ps(lo, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(b)), 16)));
    hi = _mm256_add_ps(hi, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(b, 1)), 16)));
  }
  const __m256i packed = _mm256_packus_epi32(round_bf16(lo), round_bf16(hi)); /* per 128-bit lane: lo 4, hi 4 */
  _mm256_storeu_si256((__m256i *)y, _mm256_permute4x64_epi64(packed, 0xd8));
}

/* M rows (fp32, row stride K) times NB blocks of 16 outputs from block b: per chunk, its two
 * halves widened to the k and k+1 weights of 8 outputs each, four FMAs a row */
#define KERNEL(M, NB)                                                                                          \
  static void kernel_##M##_##NB(const float *x, const uint16_t *w, const uint16_t *bias, uint16_t *y, long O,  \
                                long K, long b) {                                                              \
    __m256 lo[NB][M], hi[NB][M];                                                                               \
    for (int j = 0; j < NB; j++)                                                                               \
      for (int m = 0; m < M; m++) lo[j][m] = hi[j][m] = _mm256_setzero_ps();                                   \
    const __m256i high = _mm256_set1_epi32((int)0xffff0000);                                                   \
    const uint16_t *block = w + b * 16 * K;                                                                    \
    for (long pair = 0; pair < K / 2; pair++)                                                                  \
      for (int j = 0; j < NB; j++) {                                                                           \
        const uint16_t *chunk = block + j * 16 * K + pair * 32;                                                \
        _mm_prefetch((const char *)(chunk + 1024), _MM_HINT_T0);                                               \
        const __m256i a = _mm256_loadu_si256((const __m256i *)chunk), c = _mm256_loadu_si256((const __m256i *)(chunk + 16)); \
        const __m256 a0 = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), a1 = _mm256_castsi256_ps(_mm256_and_si256(a, high)); \
        const __m256 c0 = _mm256_castsi256_ps(_mm256_slli_epi32(c, 16)), c1 = _mm256_castsi256_ps(_mm256_and_si256(c, high)); \
        for (int m = 0; m < M; m++) {                                                                          \
          const __m256 x0 = _mm256_broadcast_ss(x + m * K + 2 * pair), x1 = _mm256_broadcast_ss(x + m * K + 2 * pair + 1); \
          lo[j][m] = _mm256_fmadd_ps(a1, x1, _mm256_fmadd_ps(a0, x0, lo[j][m]));                                \
          hi[j][m] = _mm256_fmadd_ps(c1, x1, _mm256_fmadd_ps(c0, x0, hi[j][m]));                                \
        }                                                                                                      \
      }                                                                                                        \
    for (int j = 0; j < NB; j++)                                                                               \
      for (int m = 0; m < M; m++) store16(lo[j][m], hi[j][m], bias ? bias + (b + j) * 16 : 0, y + m * O + (b + j) * 16); \
  }

KERNEL(1, 1) KERNEL(2, 1) KERNEL(3, 1) KERNEL(4, 1) KERNEL(1, 4)
typedef void (*kernel_fn)(const float *, const uint16_t *, const uint16_t *, uint16_t *, long, long, long);
static const kernel_fn KERNELS_BY_ROWS[4] = {kernel_1_1, kernel_2_1, kernel_3_1, kernel_4_1};

/* y (M, O) = x (M, K) . W^T (+ bias (O)), W packed as above, fp32 sums; any M. One row reads 4
 * blocks side by side; more rows go 4 at a time over each block (the block's weight, 16 K values,
 * comes from the cache after the first 4). Returns nonzero if memory ran out. */
int cogvlm_rows_bf16(const uint16_t *x, long M, const uint16_t *w, const uint16_t *bias, uint16_t *y, long O,
                     long K) {
  float *wide = malloc(sizeof(float) * M * K);
  if (!wide) return 1;
  for (long i = 0; i < M * K; i++) {
    const uint32_t bits = (uint32_t)x[i] << 16;
    memcpy(wide + i, &bits, 4);
  }
  const long blocks = O / 16;
  const long step = M == 1 ? 4 : 1;
#pragma omp parallel for schedule(static)
  for (long b = 0; b < blocks; b += step) {
    if (M == 1 && blocks - b >= 4)
      kernel_1_4(wide, w, bias, y, O, K, b);
    else
      for (long t = b; t < b + step && t < blocks; t++)
        for (long m0 = 0; m0 < M; m0 += 4) {
          const long rows = M - m0 < 4 ? M - m0 : 4;
          KERNELS_BY_ROWS[rows - 1](wide + m0 * K, w, bias, y + m0 * O, O, K, t);
        }
  }
  free(wide);
  return 0;
}
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Dot product of two bf16 vectors of length n (any n), fp32 sums. */
static inline float dot_bf16(const uint16_t *a, const uint16_t *b, long n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  long i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(widen8(a + i), widen8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(widen8(a + i + 8), widen8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(widen8(a + i), widen8(b + i), acc0);
  float sum = hsum8(_mm256_add_ps(acc0, acc1));
  for (; i < n; i++) sum += bf16_widen(a[i]) * bf16_widen(b[i]);
  return sum;
}

/* Dot products of a with four vectors at once (four memory streams in flight), length n. */
static inline void dot4_bf16(const uint16_t *a, const uint16_t *b0, const uint16_t *b1, const uint16_t *b2,
                             const uint16_t *b3, long n, float *out) {
  __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
  long i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = widen8(a + i);
    c0 = _mm256_fmadd_ps(x, widen8(b0 + i), c0);
    c1 = _mm256_fmadd_ps(x, widen8(b1 + i), c1);
    c2 = _mm256_fmadd_ps(x, widen8(b2 + i), c2);
    c3 = _mm256_fmadd_ps(x, widen8(b3 + i), c3);
  }
  out[0] = hsum8(c0), out[1] = hsum8(c1), out[2] = hsum8(c2), out[3] = hsum8(c3);
  for (; i < n; i++) {
    const float x = bf16_widen(a[i]);
    out[0] += x * bf16_widen(b0[i]), out[1] += x * bf16_widen(b1[i]), out[2] += x * bf16_widen(b2[i]), out[3] += x * bf16_widen(b3[i]);
  }
}

/* exp(score - top) of 8 scores, exactly 0 where masked (-inf) */
static inline __m256 exp8(__m256 x, float top) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
  return _mm256_and_ps(keep, exp_clamped(_mm256_sub_ps(x, _mm256_set1_ps(top))));
}

/* as the AVX-512 softmax_bf16; the last S % 8 scores go through a padded copy */
static void softmax_bf16(float *scores, uint16_t *probs, long S, float top) {
  const long whole = S / 8 * 8;
  float tail[8];
  for (int i = 0; i < 8; i++) tail[i] = whole + i < S ? scores[whole + i] : -INFINITY;
  __m256 total = _mm256_setzero_ps(), last = exp8(_mm256_loadu_ps(tail), top);
  for (long s = 0; s < whole; s += 8) {
    const __m256 e = exp8(_mm256_loadu_ps(scores + s), top);
    _mm256_storeu_ps(scores + s, e);
    total = _mm256_add_ps(total, e);
  }
  const __m256 norm = _mm256_set1_ps(1.0f / hsum8(_mm256_add_ps(total, last)));
  for (long s = 0; s < whole; s += 8) store8(_mm256_mul_ps(_mm256_loadu_ps(scores + s), norm), probs + s);
  uint16_t rest[8];
  store8(_mm256_mul_ps(last, norm), rest);
  memcpy(probs + whole, rest, sizeof(uint16_t) * (S - whole));
}

/* 16 fp32 -> 16 bf16 at y */
static inline void store16f(const float *c, uint16_t *y) { store16(_mm256_loadu_ps(c), _mm256_loadu_ps(c + 8), 0, y); }
#endif

/* One query per (row, head) of a decode step: out (B, H, D) = softmax(q . K^T * scale, masked) . V,
 * query head h reading KV head h / G (G query heads per KV head: grouped-query attention).
 * q and out (B, H, D) contiguous; key s of KV head (b, j) at k + b*ksb + j*ksh + s*D (keys by row);
 * value dimension d at v + b*vsb + j*vsh + d*vsd + s (values by column); mask NULL or (B, S) bytes with
 * row stride msb, nonzero where a key is attended. Softmax in fp32; the probabilities are rounded
 * to bf16 before the values, as `attend_one` does. Returns nonzero if memory ran out. */
int cogvlm_attend_bf16(const uint16_t *q, const uint16_t *k, long ksb, long ksh, const uint16_t *v, long vsb,
                       long vsh, long vsd, const uint8_t *mask, long msb, uint16_t *out, long B, long H, long G,
                       long S, long D, float scale) {
  int failed = 0;
#pragma omp parallel
  {
    float *scores = malloc(sizeof(float) * S);
    uint16_t *probs = malloc(sizeof(uint16_t) * (S + 16));
    if (!scores || !probs) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for collapse(2) schedule(static)
    for (long b = 0; b < B; b++)
      for (long h = 0; h < H; h++) {
        if (!scores || !probs) continue;
        const uint16_t *qh = q + (b * H + h) * D, *kh = k + b * ksb + h / G * ksh, *vh = v + b * vsb + h / G * vsh;
        const uint8_t *mb = mask ? mask + b * msb : 0;
        const long quarter = S / 4; /* keys read as four streams, a quarter of the cache each */
        for (long s = 0; s < quarter; s++) {
          float four[4];
          dot4_bf16(qh, kh + s * D, kh + (s + quarter) * D, kh + (s + 2 * quarter) * D, kh + (s + 3 * quarter) * D, D,
                    four);
          for (int i = 0; i < 4; i++) scores[s + i * quarter] = four[i];
        }
        for (long s = 4 * quarter; s < S; s++) scores[s] = dot_bf16(qh, kh + s * D, D);
        float top = -INFINITY;
        for (long s = 0; s < S; s++) {
          scores[s] = mb && !mb[s] ? -INFINITY : scores[s] * scale;
          top = scores[s] > top ? scores[s] : top;
        }
        softmax_bf16(scores, probs, S, top);
        uint16_t *oh = out + (b * H + h) * D;
        for (long d = 0; d < D; d += 16) {
          float c[16];
          for (int i = 0; i < 16; i += 4) {
            const uint16_t *row = vh + (d + i) * vsd;
            dot4_bf16(probs, row, row + vsd, row + 2 * vsd, row + 3 * vsd, S, c + i);
          }
          store16f(c, oh + d);
        }
      }
    free(scores);
    free(probs);
  }
  return failed;
}


/* ---- The small steps of a decoder layer, in plain C for both instruction sets (the compiler
 * vectorises them). Each replaces a dozen PyTorch calls of a few microseconds apiece. */

/* fp32 -> bf16, rounded to nearest even; a NaN stays NaN (quiet) */
static inline uint16_t bf16_round(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
  return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* RMSNorm of M rows of D (row stride D): y = bf16(w * (x * (1 / sqrt(mean(x^2) + eps)))), all in
 * fp32 with w widened, in `RMSNorm.forward`'s order (only the mean's summation order differs). */
void cogvlm_rmsnorm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, long M, long D, float eps) {
#pragma omp parallel for schedule(static) if (M > 1)
  for (long m = 0; m < M; m++) {
    const uint16_t *xm = x + m * D;
    float lanes[16] = {0};
    long d = 0;
    for (; d + 16 <= D; d += 16)
      for (int i = 0; i < 16; i++) {
        const float v = bf16_widen(xm[d + i]);
        lanes[i] += v * v;
      }
    float sum = 0.0f;
    for (; d < D; d++) sum += bf16_widen(xm[d]) * bf16_widen(xm[d]);
    for (int i = 0; i < 16; i++) sum += lanes[i];
    const float r = 1.0f / sqrtf(sum / (float)D + eps);
    for (long e = 0; e < D; e++) y[m * D + e] = bf16_round(bf16_widen(w[e]) * (bf16_widen(xm[e]) * r));
  }
}

/* One new token per row: rotate its query and key heads by the row's position (NeoX halves, as
 * `apply_rotary` in bf16: cos and sin rounded to bf16, then bf16(bf16(x cos) + bf16(rotate_half(x)
 * sin))), then write its key and value at the row's column of the cache.
 * qkv (B, W): Q (H x K) | K (Hkv x K) | V (Hkv x K) per row, rotated in place. inv_freq (K/2) fp32,
 * or bf16 where `inv_bf16` (the positions and frequencies then rounded to bf16 too, as PyTorch does
 * in that dtype). Element (b, h, s, k) of the keys is at keys + b*ks[0] + h*ks[1] + s*ks[2] + k*ks[3],
 * the values likewise with vs; row b writes column index[b]. */
void cogvlm_rope_store_bf16(uint16_t *qkv, long B, long W, long H, long Hkv, long K, const int64_t *positions,
                            const void *inv_freq, int inv_bf16, const int64_t *index, uint16_t *keys,
                            const long *ks, uint16_t *values, const long *vs) {
  const long half = K / 2;
  for (long b = 0; b < B; b++) {
    uint16_t *row = qkv + b * W;
    float cs[512], sn[512]; /* K <= 1024 (checked by the caller) */
    float t = (float)positions[b];
    if (inv_bf16) t = bf16_widen(bf16_round(t));
    for (long j = 0; j < half; j++) {
      float f;
      if (inv_bf16) {
        f = bf16_widen(bf16_round(t * bf16_widen(((const uint16_t *)inv_freq)[j])));
      } else {
        f = t * ((const float *)inv_freq)[j];
      }
      cs[j] = bf16_widen(bf16_round(cosf(f)));
      sn[j] = bf16_widen(bf16_round(sinf(f)));
    }
    for (long head = 0; head < H + Hkv; head++) {
      uint16_t *x = row + head * K;
      for (long j = 0; j < half; j++) {
        const float lo = bf16_widen(x[j]), hi = bf16_widen(x[j + half]);
        const float a_lo = bf16_widen(bf16_round(lo * cs[j])), b_lo = bf16_widen(bf16_round(-hi * sn[j]));
        const float a_hi = bf16_widen(bf16_round(hi * cs[j])), b_hi = bf16_widen(bf16_round(lo * sn[j]));
        x[j] = bf16_round(a_lo + b_lo);
        x[j + half] = bf16_round(a_hi + b_hi);
      }
    }
    const long column = index[b];
    for (long h = 0; h < Hkv; h++) {
      const uint16_t *key = row + (H + h) * K, *value = row + (H + Hkv + h) * K;
      uint16_t *kd = keys + b * ks[0] + h * ks[1] + column * ks[2];
      uint16_t *vd = values + b * vs[0] + h * vs[1] + column * vs[2];
      for (long k = 0; k < K; k++) {
        kd[k * ks[3]] = key[k];
        vd[k * vs[3]] = value[k];
      }
    }
  }
}

/* ---- A decoder layer's decode step in one call: what `CogVLMDecoderLayer.forward` computes for one
 * new token per row through its language expert (every decode token is language-typed), with the
 * functions above in the same order and roundings, so that a step issues 8 calls, not 8 x 15 small
 * PyTorch ops and kernel calls (about 300 us a layer of Python and dispatch on a 2-core CPU). */

/* a layer's weights: norms (D) bf16; the five language-expert products packed as above, no bias;
 * inv_freq as `cogvlm_rope_store_bf16` takes it; `scale` the attention's 1 / sqrt(head_dim) */
typedef struct {
  const uint16_t *input_norm, *post_norm, *qkv, *dense, *gate, *up, *down;
  const void *inv_freq;
  long inv_bf16, heads, kv_heads, head_dim, inter;
  float eps, scale;
} cogvlm_layer;

static inline uint16_t bf16_add(uint16_t a, uint16_t b) { return bf16_round(bf16_widen(a) + bf16_widen(b)); }

/* gate[i] = bf16(bf16(silu(gate[i])) * up[i]) for n values: PyTorch's bf16 SiLU, g / (1 + e^-g) in
 * fp32 rounded, times the up projection, rounded; e^ by `exp_clamped` (relative error about 1e-7,
 * its argument clamped to [-87, 88], where PyTorch's overflows past 88.7: SiLU of a gate under -88,
 * about 1e-36, then differs) */
static void silu_times(uint16_t *gate, const uint16_t *up, long n) {
  const long whole = n / 8 * 8;
#pragma omp parallel for schedule(static) if (n >= 16384)
  for (long i = 0; i < whole; i += 8) {
    const __m256 g = widen8(gate + i);
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_clamped(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    const __m256 rounded = _mm256_castsi256_ps(_mm256_slli_epi32(round_bf16(s), 16));
    store8(_mm256_mul_ps(rounded, widen8(up + i)), gate + i);
  }
  for (long i = whole; i < n; i++) {
    const float g = bf16_widen(gate[i]);
    gate[i] = bf16_round(bf16_widen(bf16_round(g / (1.0f + expf(-g)))) * bf16_widen(up[i]));
  }
}

/* y (M, D) = the layer applied to x (M, D), one token per row at positions[m], its key and value
 * written at column index[m] of the cache (as `cogvlm_rope_store_bf16`), attending to the S columns
 * the mask (M, S bytes, row stride msb) keeps (as `cogvlm_attend_bf16`); D = heads x head_dim. Each
 * PyTorch op's bf16 rounding is kept: the residual adds, SiLU of the rounded gate rounded, times the
 * rounded up-projection rounded. `amx`: products of several rows on AMX tiles (AVX-512 builds).
 * Returns nonzero if memory ran out. */
int cogvlm_decode_layer_bf16(const cogvlm_layer *L, const uint16_t *x, uint16_t *y, long M, long D,
                             const int64_t *positions, const int64_t *index, uint16_t *keys, const long *ks,
                             uint16_t *values, const long *vs, const uint8_t *mask, long msb, long S, int amx) {
  const long H = L->heads, Hkv = L->kv_heads, K = L->head_dim, W = (H + 2 * Hkv) * K, F = L->inter;
#if defined(__AVX512BF16__)
  int (*rows)(const uint16_t *, long, const uint16_t *, const uint16_t *, uint16_t *, long, long) =
      amx && M > 1 ? cogvlm_rows_bf16_amx : cogvlm_rows_bf16;
#else
  int (*rows)(const uint16_t *, long, const uint16_t *, const uint16_t *, uint16_t *, long, long) = cogvlm_rows_bf16;
  (void)amx;
#endif
  uint16_t *h = malloc(sizeof(uint16_t) * M * (3 * D + W + 2 * F));
  if (!h) return 1;
  uint16_t *qkv = h + M * D, *q = qkv + M * W, *ctx = q + M * D, *gate = ctx + M * D, *up = gate + M * F;
  int failed = 0;
  cogvlm_rmsnorm_bf16(x, L->input_norm, h, M, D, L->eps);
  failed |= rows(h, M, L->qkv, 0, qkv, W, D);
  cogvlm_rope_store_bf16(qkv, M, W, H, Hkv, K, positions, L->inv_freq, (int)L->inv_bf16, index, keys, ks, values, vs);
  for (long m = 0; m < M; m++) memcpy(q + m * D, qkv + m * W, sizeof(uint16_t) * D); /* (M, H, K) */
  failed |= cogvlm_attend_bf16(q, keys, ks[0], ks[1], values, vs[0], vs[1], vs[3], mask, msb, ctx, M, H, H / Hkv, S,
                               K, L->scale);
  failed |= rows(ctx, M, L->dense, 0, h, D, D);
  for (long i = 0; i < M * D; i++) y[i] = bf16_add(x[i], h[i]);
  cogvlm_rmsnorm_bf16(y, L->post_norm, h, M, D, L->eps);
  failed |= rows(h, M, L->gate, 0, gate, F, D);
  failed |= rows(h, M, L->up, 0, up, F, D);
  silu_times(gate, up, M * F);
  failed |= rows(gate, M, L->down, 0, h, D, F);
  for (long i = 0; i < M * D; i++) y[i] = bf16_add(y[i], h[i]);
  free(h);
  return failed;
}
