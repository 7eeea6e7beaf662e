/* W8A8: int8 activations times int8 weights, int32 sums, fp32 out (nn/w8a8_linear.py).
 *
 * Written by hand because torch's CPU int8 products either take ~2x fp32's time (torch._int_mm)
 * or quantize activations their own way (fbgemm's dynamic linear: asymmetric uint8 per tensor,
 * not SmoothQuant's symmetric per-tensor / per-token scales) and return no integer sums to test.
 *
 * Weights, once (mp_w8a8_pack):
 *   w       int8 (n, k), symmetric, -127..127
 *   packed  int8 (ceil(n / 16), ceil(k / 4), 16, 4): 16 output columns x 4 inputs per 64 bytes, the
 *           layout one vpdpbusd consumes; zero where n or k run out
 *   colsum  int32 (ceil(n / 16) * 16): 128 * sum_j w[o, j] (VNNI multiplies unsigned activations:
 *           it adds 128 to each and takes 128 * colsum back off)
 * Activations, per call (mp_w8a8_linear): scale per row s_r = xs[0] (static), max_j |x[r, j]| / 127
 * (mode 1: per token) or the max over all rows / 127 (mode 2: per tensor, dynamic); a zero max
 * gives s = 1. q = clamp(rint(x / s), -128, 127) (vLLM's and compressed-tensors' int8 range: a static
 * scale lets run-time inputs reach -128). Then
 *   acc[r, o] = sum_j q[r, j] * w[o, j]            exact in int32 (|acc| <= 128 * 127 k < 2^31)
 *   y[r, o]   = (float)acc * (s_r * ws[o]) + bias[o]
 * (-ffp-contract=off: the same roundings as the torch expression in the tests).
 */
int omp_get_max_threads(void);  /* libgomp (omp.h would clash with threads.c's weak declaration) */

/* Tile shapes (rows x 16-column blocks) the product can run, by index: the auto-tuner (kernels/tune.py) times
 * them per layer shape. VNNI: accumulators rows * blocks of 32 zmm registers, plus a weight register a block;
 * AVX2: two ymm accumulators a block, of 16 registers (wider tiles spill, sometimes to advantage). */
#if defined(MP_VNNI512)
#define MP_I8_TILES "8x2,4x4,12x2,6x4,1x8,2x4"
#elif defined(MP_AVX2)
#define MP_I8_TILES "4x2,2x2,4x1,1x4,3x2"
#else
#define MP_I8_TILES "4x2"
#endif
#define MP_I8_TMR 12  /* the largest rows and blocks of any tile above */
#define MP_I8_TNB 8

void mp_w8a8_pack(const int8_t *w, int64_t n, int64_t k, int8_t *packed, int32_t *colsum) {
    const int64_t nb = (n + 15) / 16, k4 = (k + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t c = 0; c < 16; c++) {
            const int64_t o = b * 16 + c;
            int32_t sum = 0;
            for (int64_t t = 0; t < k4 * 4; t++) {
                const int8_t v = (o < n && t < k) ? w[o * k + t] : 0;
                packed[((b * k4 + t / 4) * 16 + c) * 4 + t % 4] = v;
                sum += v;
            }
            colsum[o] = 128 * sum;
        }
    }
}

/* Row scales and int8 rows (k padded to k4 * 4 with zeros); with flip, each byte is q ^ 0x80 = q + 128
 * read unsigned (what vpdpbusd multiplies; padding 128 meets zero weights). */
static void w8a8_quantize_rows(const float *x, int64_t m, int64_t k, int64_t kp, int64_t mode,
                               const float *xs, float *s, int8_t *q, int flip) {
    float all = 0.0f;
    if (mode != 0) {
#pragma omp parallel for schedule(static) if (m >= MP_PAR_ROWS) reduction(max : all)
        for (int64_t r = 0; r < m; r++) {
            float mx = 0.0f;
            int64_t j = 0;
#if defined(MP_VNNI512)
            __m512 vm = _mm512_setzero_ps();  /* max is exact in any order */
            for (; j + 16 <= k; j += 16) vm = _mm512_max_ps(vm, _mm512_abs_ps(_mm512_loadu_ps(x + r * k + j)));
            mx = _mm512_reduce_max_ps(vm);
#endif
            for (; j < k; j++) mx = fmaxf(mx, fabsf(x[r * k + j]));
            s[r] = mx > 0.0f ? mx / 127.0f : 1.0f;
            all = fmaxf(all, mx);
        }
    }
    for (int64_t r = 0; r < m; r++) {
        if (mode == 0) s[r] = xs[0];
        else if (mode == 2) s[r] = all > 0.0f ? all / 127.0f : 1.0f;
    }
#pragma omp parallel for schedule(static) if (m >= MP_PAR_ROWS)
    for (int64_t r = 0; r < m; r++) {
        const float sr = s[r];
        const uint8_t f = flip ? 0x80 : 0;
        int64_t j = 0;
#if defined(MP_VNNI512)
        /* the same operations 16 at a time: exact division, round to nearest even, saturating
         * narrowing (= the clamp to -128..127) */
        const __m512 vs = _mm512_set1_ps(sr);
        const __m128i vf = _mm_set1_epi8((char)f);
        for (; j + 16 <= k; j += 16) {
            __m512 v = _mm512_div_ps(_mm512_loadu_ps(x + r * k + j), vs);
            v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-128.0f)), _mm512_set1_ps(127.0f));
            __m128i b = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v));
            _mm_storeu_si128((__m128i *)(q + r * kp + j), _mm_xor_si128(b, vf));
        }
#endif
        for (; j < kp; j++) {
            float v = j < k ? rintf(x[r * k + j] / sr) : 0.0f;
            v = v > 127.0f ? 127.0f : (v < -128.0f ? -128.0f : v);
            q[r * kp + j] = (int8_t)((uint8_t)(int8_t)v ^ f);
        }
    }
}

/* Rows q[0..mr) of int8 activations (VNNI: unsigned, flipped) against 16-column blocks b0 .. b0 + nb: exact
 * int32 sums (VNNI: less colsum, the 128s added), then y = sums * (s_r * ws[o]) + bias[o] (16 columns a step,
 * masked past n); acc_out, when given, receives the sums. Inlined with constant mr, nb for each tile shape (the
 * accumulators then live in registers) and with run-time ones for the edge tiles. */
static inline __attribute__((always_inline)) void w8a8_tile(
        const int8_t *q, int64_t kp, const int64_t mr, const int8_t *packed, const int32_t *colsum, int64_t b0,
        const int64_t nb, const float *s, const float *ws, const float *bias, int64_t n, float *y, int32_t *acc_out) {
    const int64_t k4 = kp / 4;
#if defined(MP_VNNI512)
    __m512i a[MP_I8_TMR][MP_I8_TNB];
    for (int64_t r = 0; r < mr; r++)
        for (int64_t c = 0; c < nb; c++) a[r][c] = _mm512_setzero_si512();
    for (int64_t t = 0; t < k4; t++) {
        __m512i wv[MP_I8_TNB];
        for (int64_t c = 0; c < nb; c++) wv[c] = _mm512_loadu_si512(packed + ((b0 + c) * k4 + t) * 64);
        for (int64_t r = 0; r < mr; r++) {
            int32_t four;
            memcpy(&four, q + r * kp + t * 4, 4);
            const __m512i xv = _mm512_set1_epi32(four);
            for (int64_t c = 0; c < nb; c++) a[r][c] = _mm512_dpbusd_epi32(a[r][c], xv, wv[c]);
        }
    }
    for (int64_t c = 0; c < nb; c++) {
        const int64_t o = (b0 + c) * 16;
        const __mmask16 keep = o + 16 <= n ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - o)) - 1u);
        const __m512i cs = _mm512_loadu_si512(colsum + o);
        const __m512 wsv = _mm512_maskz_loadu_ps(keep, ws + o);
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(keep, bias + o) : _mm512_setzero_ps();
        for (int64_t r = 0; r < mr; r++) {
            const __m512i sum = _mm512_sub_epi32(a[r][c], cs);
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(_mm512_set1_ps(s[r]), wsv));
            if (bias) v = _mm512_add_ps(v, bv);
            _mm512_mask_storeu_ps(y + r * n + o, keep, v);
            if (acc_out) _mm512_mask_storeu_epi32(acc_out + r * n + o, keep, sum);
        }
    }
#else
    int32_t acc[MP_I8_TMR][MP_I8_TNB * 16];
#if defined(MP_AVX2)
    /* maddubs multiplies unsigned by signed bytes into saturating int16 pairs: |q| (abs_epi8(-128) is
     * 0x80, read unsigned as 128) times w carrying q's sign (w in -127..127, so negating it cannot
     * overflow) stays within 2 * 128 * 127 < 2^15, so nothing saturates */
    __m256i a[MP_I8_TMR][MP_I8_TNB * 2];
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t r = 0; r < mr; r++)
        for (int64_t c = 0; c < nb * 2; c++) a[r][c] = _mm256_setzero_si256();
    for (int64_t t = 0; t < k4; t++) {
        __m256i wv[MP_I8_TNB * 2];
        for (int64_t c = 0; c < nb * 2; c++)
            wv[c] = _mm256_loadu_si256((const __m256i *)(packed + ((b0 + c / 2) * k4 + t) * 64 + (c % 2) * 32));
        for (int64_t r = 0; r < mr; r++) {
            int32_t four;
            memcpy(&four, q + r * kp + t * 4, 4);
            const __m256i xv = _mm256_set1_epi32(four), xa = _mm256_abs_epi8(xv);
            for (int64_t c = 0; c < nb * 2; c++) {
                const __m256i p = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv[c], xv));
                a[r][c] = _mm256_add_epi32(a[r][c], _mm256_madd_epi16(p, ones));
            }
        }
    }
    for (int64_t r = 0; r < mr; r++)
        for (int64_t c = 0; c < nb * 2; c++) _mm256_storeu_si256((__m256i *)(acc[r] + c * 8), a[r][c]);
#else
    for (int64_t r = 0; r < mr; r++)
        for (int64_t c = 0; c < nb * 16; c++) {
            const int8_t *wb = packed + (b0 + c / 16) * k4 * 64 + (c % 16) * 4;
            int32_t sum = 0;
            for (int64_t t = 0; t < k4; t++)
                for (int i = 0; i < 4; i++) sum += (int32_t)q[r * kp + t * 4 + i] * wb[t * 64 + i];
            acc[r][c] = sum;
        }
#endif
    (void)colsum;
    for (int64_t r = 0; r < mr; r++)
        for (int64_t c = 0; c < nb * 16; c++) {
            const int64_t o = b0 * 16 + c;
            if (o >= n) break;
            float v = (float)acc[r][c] * (s[r] * ws[o]);
            if (bias) v = v + bias[o];
            y[r * n + o] = v;
            if (acc_out) acc_out[r * n + o] = acc[r][c];
        }
#endif
}

#define W8A8_TILE_ARGS const int8_t *q, int64_t kp, const int8_t *packed, const int32_t *colsum, int64_t b0, \
    const float *s, const float *ws, const float *bias, int64_t n, float *y, int32_t *acc_out
#define W8A8_FIXED_TILE(MR, NB) \
    static void w8a8_tile_##MR##x##NB(W8A8_TILE_ARGS) { \
        w8a8_tile(q, kp, MR, packed, colsum, b0, NB, s, ws, bias, n, y, acc_out); }
#if defined(MP_VNNI512)
W8A8_FIXED_TILE(8, 2) W8A8_FIXED_TILE(4, 4) W8A8_FIXED_TILE(12, 2) W8A8_FIXED_TILE(6, 4) W8A8_FIXED_TILE(1, 8)
W8A8_FIXED_TILE(2, 4)
typedef void (*w8a8_tile_fn)(W8A8_TILE_ARGS);
static const w8a8_tile_fn W8A8_TILE_FNS[] = {w8a8_tile_8x2, w8a8_tile_4x4, w8a8_tile_12x2, w8a8_tile_6x4,
                                             w8a8_tile_1x8, w8a8_tile_2x4};
static const int W8A8_TILE_SHAPE[][2] = {{8, 2}, {4, 4}, {12, 2}, {6, 4}, {1, 8}, {2, 4}};
#elif defined(MP_AVX2)
W8A8_FIXED_TILE(4, 2) W8A8_FIXED_TILE(2, 2) W8A8_FIXED_TILE(4, 1) W8A8_FIXED_TILE(1, 4) W8A8_FIXED_TILE(3, 2)
typedef void (*w8a8_tile_fn)(W8A8_TILE_ARGS);
static const w8a8_tile_fn W8A8_TILE_FNS[] = {w8a8_tile_4x2, w8a8_tile_2x2, w8a8_tile_4x1, w8a8_tile_1x4,
                                             w8a8_tile_3x2};
static const int W8A8_TILE_SHAPE[][2] = {{4, 2}, {2, 2}, {4, 1}, {1, 4}, {3, 2}};
#else
W8A8_FIXED_TILE(4, 2)
typedef void (*w8a8_tile_fn)(W8A8_TILE_ARGS);
static const w8a8_tile_fn W8A8_TILE_FNS[] = {w8a8_tile_4x2};
static const int W8A8_TILE_SHAPE[][2] = {{4, 2}};
#endif
#define W8A8_NTILES ((int64_t)(sizeof(W8A8_TILE_SHAPE) / sizeof(W8A8_TILE_SHAPE[0])))

/* The tile shapes this build has, comma-separated in index order ("8x2,4x4,..."): kernels/tune.py's names. */
const char *mp_w8a8_tiles(void) { return MP_I8_TILES; }

/* y (m, n) = W8A8 product of x (m, k) fp32; mode 0: static scale xs[0], 1: per token, 2: per tensor.
 * variant = tile + W8A8_ROWS_OUTER * order: the tile shape's index in mp_w8a8_tiles(); order 0 runs column
 * tiles outermost (a thread keeps its weight blocks in cache across the row tiles), 1 row tiles outermost.
 * threads: the OpenMP threads to use, 0 for all. Every variant gives the same numbers (integer sums, one
 * epilogue); acc_out, when not NULL, receives the int32 sums (m, n) (the tests' exact check). */
#define W8A8_ROWS_OUTER 16
void mp_w8a8_linear(const float *x, int64_t m, int64_t k, const int8_t *packed, const int32_t *colsum,
                    const float *ws, const float *bias, int64_t n, int64_t mode, const float *xs, float *y,
                    int32_t *acc_out, int64_t variant, int64_t threads) {
    const int64_t kp = (k + 3) / 4 * 4, nb = (n + 15) / 16;
    const int64_t tile = variant % W8A8_ROWS_OUTER < W8A8_NTILES ? variant % W8A8_ROWS_OUTER : 0;
    const int rows_outer = variant / W8A8_ROWS_OUTER == 1;
    const int64_t MR = W8A8_TILE_SHAPE[tile][0], NB = W8A8_TILE_SHAPE[tile][1];
    const w8a8_tile_fn full = W8A8_TILE_FNS[tile];
    int8_t *q = (int8_t *)malloc((size_t)(m * kp + 64));
    float *s = (float *)malloc(sizeof(float) * (size_t)(m + 1));
#if defined(MP_VNNI512)
    w8a8_quantize_rows(x, m, k, kp, mode, xs, s, q, 1);
#else
    w8a8_quantize_rows(x, m, k, kp, mode, xs, s, q, 0);
#endif
    const int64_t row_tiles = (m + MR - 1) / MR, col_tiles = (nb + NB - 1) / NB, tiles = row_tiles * col_tiles;
    const int nt = threads > 0 ? (int)threads : omp_get_max_threads();
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t i = 0; i < tiles; i++) {
        const int64_t rt = rows_outer ? i / col_tiles : i % row_tiles;
        const int64_t ct = rows_outer ? i % col_tiles : i / row_tiles;
        const int64_t r0 = rt * MR, mr = m - r0 < MR ? m - r0 : MR;
        const int64_t b0 = ct * NB, nbt = nb - b0 < NB ? nb - b0 : NB;
        int32_t *acc = acc_out ? acc_out + r0 * n : NULL;
        if (mr == MR && nbt == NB)
            full(q + r0 * kp, kp, packed, colsum, b0, s + r0, ws, bias, n, y + r0 * n, acc);
        else
            w8a8_tile(q + r0 * kp, kp, mr, packed, colsum, b0, nbt, s + r0, ws, bias, n, y + r0 * n, acc);
    }
    free(q);
    free(s);
}
