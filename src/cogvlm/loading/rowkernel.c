/* bf16 products of a few rows with a weight, for decoding on CPUs with AVX512-BF16 and AMX
 * (cogvlm/loading/rowkernel.py builds and calls this; see it for why).
 *
 * The weight is stored packed as (O/16, K/2, 16, 2): one 64-byte chunk holds two adjacent inputs
 * (k, k+1) of 16 consecutive outputs. With `vdpbf16ps` and the pair of x broadcast, a chunk adds
 * into 16 output sums at once, no horizontal reduction needed; NB blocks of 16 outputs are read side
 * by side to keep several streams and accumulators in flight. With AMX, a block's 16 consecutive
 * chunks are one tile of 16 input pairs x 16 outputs. Both need K % 32 == 0 and O % 16 == 0.
 */
#include <immintrin.h>
#include <stdint.h>

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

#define KERNELS(M) KERNEL(M, 1) KERNEL(M, 2) KERNEL(M, 4)
KERNELS(1) KERNELS(2) KERNELS(3) KERNELS(4) KERNELS(5) KERNELS(6) KERNELS(7) KERNELS(8)

#define ROW(M) {kernel_##M##_1, kernel_##M##_2, kernel_##M##_4}
static const kernel_fn KERNELS_BY_ROWS[8][3] = {ROW(1), ROW(2), ROW(3), ROW(4), ROW(5), ROW(6), ROW(7), ROW(8)};

/* y (M, O) = x (M, K) . W^T (+ bias (O)), W packed as above, fp32 sums; any M, 8 rows at a time */
void cogvlm_rows_bf16(const uint16_t *x, long M, const uint16_t *w, const uint16_t *bias, uint16_t *y, long O,
                      long K) {
  const long blocks = O / 16;
  for (long m0 = 0; m0 < M; m0 += 8) {
    const long rows = M - m0 < 8 ? M - m0 : 8;
    const int wide = rows == 1 ? 2 : 1; /* one row: 4 blocks side by side; more rows: 2 */
    const long step = 1L << wide;
#pragma omp parallel for schedule(static)
    for (long b = 0; b < blocks; b += step) {
      if (blocks - b >= step)
        KERNELS_BY_ROWS[rows - 1][wide](x + m0 * K, K, w, bias, y + m0 * O, O, K, b);
      else
        for (long t = b; t < blocks; t++) KERNELS_BY_ROWS[rows - 1][0](x + m0 * K, K, w, bias, y + m0 * O, O, K, t);
    }
  }
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

void cogvlm_rows_bf16_amx(const uint16_t *x, long M, const uint16_t *w, const uint16_t *bias, uint16_t *y, long O,
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
        const uint16_t *w0 = w + b * 16 * K, *w1 = w0 + 16 * K * pair;
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
}
