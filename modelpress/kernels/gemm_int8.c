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

#define MP_I8_MR 4   /* rows per tile (AVX2 and plain loops) */
#define MP_I8_NB 2   /* 16-column blocks per tile */
#define MP_I8_MR512 8  /* rows per tile of the VNNI loop: 16 accumulators + 2 weight registers of 32 */

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

#if defined(MP_VNNI512)
/* Rows q[0..mr) (unsigned, flipped) against column blocks b0.. (nb <= MP_I8_NB): the sums less
 * colsum (the 128s added), scaled and biased straight from the registers into y (16 columns a store, masked
 * past n); acc_out, when given, receives the integer sums. */
static void w8a8_tile_vnni(const int8_t *q, int64_t kp, int64_t mr, const int8_t *packed, const int32_t *colsum,
                           int64_t b0, int64_t nb, const float *s, const float *ws, const float *bias, int64_t n,
                           float *y, int32_t *acc_out) {
    const int64_t k4 = kp / 4;
    __m512i a[MP_I8_MR512][MP_I8_NB];
    for (int r = 0; r < MP_I8_MR512; r++)
        for (int c = 0; c < MP_I8_NB; c++) a[r][c] = _mm512_setzero_si512();
    if (nb == MP_I8_NB && mr == MP_I8_MR512) {  /* the full tile, unrolled by the compiler */
        for (int64_t t = 0; t < k4; t++) {
            const __m512i w0 = _mm512_loadu_si512(packed + (b0 * k4 + t) * 64);
            const __m512i w1 = _mm512_loadu_si512(packed + ((b0 + 1) * k4 + t) * 64);
            for (int r = 0; r < MP_I8_MR512; r++) {
                int32_t four;
                memcpy(&four, q + r * kp + t * 4, 4);
                const __m512i xv = _mm512_set1_epi32(four);
                a[r][0] = _mm512_dpbusd_epi32(a[r][0], xv, w0);
                a[r][1] = _mm512_dpbusd_epi32(a[r][1], xv, w1);
            }
        }
    } else {
        for (int64_t t = 0; t < k4; t++) {
            __m512i wv[MP_I8_NB];
            for (int c = 0; c < nb; c++) wv[c] = _mm512_loadu_si512(packed + ((b0 + c) * k4 + t) * 64);
            for (int64_t r = 0; r < mr; r++) {
                int32_t four;
                memcpy(&four, q + r * kp + t * 4, 4);
                const __m512i xv = _mm512_set1_epi32(four);
                for (int c = 0; c < nb; c++) a[r][c] = _mm512_dpbusd_epi32(a[r][c], xv, wv[c]);
            }
        }
    }
    for (int c = 0; c < nb; c++) {
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
}
#endif

#if !defined(MP_VNNI512)
/* acc (mr x 16 * nb) of rows q[0..mr) against column blocks b0.. (nb of them): exact int32 sums. */
static void w8a8_tile(const int8_t *q, int64_t kp, int64_t mr, const int8_t *packed, const int32_t *colsum,
                      int64_t b0, int64_t nb, int32_t acc[MP_I8_MR][MP_I8_NB * 16]) {
    const int64_t k4 = kp / 4;
#if defined(MP_AVX2)
    /* maddubs multiplies unsigned by signed bytes into saturating int16 pairs: |q| (abs_epi8(-128) is
     * 0x80, read unsigned as 128) times w carrying q's sign (w in -127..127, so negating it cannot
     * overflow) stays within 2 * 128 * 127 < 2^15, so nothing saturates */
    __m256i a[MP_I8_MR][MP_I8_NB * 2];
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < MP_I8_MR; r++)
        for (int c = 0; c < MP_I8_NB * 2; c++) a[r][c] = _mm256_setzero_si256();
    for (int64_t t = 0; t < k4; t++) {
        __m256i wv[MP_I8_NB * 2];
        for (int c = 0; c < nb * 2; c++)
            wv[c] = _mm256_loadu_si256((const __m256i *)(packed + ((b0 + c / 2) * k4 + t) * 64 + (c % 2) * 32));
        for (int64_t r = 0; r < mr; r++) {
            int32_t four;
            memcpy(&four, q + r * kp + t * 4, 4);
            const __m256i xv = _mm256_set1_epi32(four), xa = _mm256_abs_epi8(xv);
            for (int c = 0; c < nb * 2; c++) {
                const __m256i p = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(wv[c], xv));
                a[r][c] = _mm256_add_epi32(a[r][c], _mm256_madd_epi16(p, ones));
            }
        }
    }
    for (int64_t r = 0; r < mr; r++)
        for (int c = 0; c < nb * 2; c++) _mm256_storeu_si256((__m256i *)(acc[r] + c * 8), a[r][c]);
    (void)colsum;
#else
    for (int64_t r = 0; r < mr; r++)
        for (int64_t c = 0; c < nb * 16; c++) {
            const int8_t *wb = packed + (b0 + c / 16) * k4 * 64 + (c % 16) * 4;
            int32_t sum = 0;
            for (int64_t t = 0; t < k4; t++)
                for (int i = 0; i < 4; i++) sum += (int32_t)q[r * kp + t * 4 + i] * wb[t * 64 + i];
            acc[r][c] = sum;
        }
    (void)colsum;
#endif
}
#endif

/* y (m, n) = W8A8 product of x (m, k) fp32; mode 0: static scale xs[0], 1: per token, 2: per tensor.
 * acc_out, when not NULL, receives the int32 sums (m, n) (the tests' exact check). */
void mp_w8a8_linear(const float *x, int64_t m, int64_t k, const int8_t *packed, const int32_t *colsum,
                    const float *ws, const float *bias, int64_t n, int64_t mode, const float *xs, float *y,
                    int32_t *acc_out) {
    const int64_t kp = (k + 3) / 4 * 4, nb = (n + 15) / 16;
    int8_t *q = (int8_t *)malloc((size_t)(m * kp + 64));
    float *s = (float *)malloc(sizeof(float) * (size_t)(m + 1));
#if defined(MP_VNNI512)
    w8a8_quantize_rows(x, m, k, kp, mode, xs, s, q, 1);
    const int64_t row_tiles = (m + MP_I8_MR512 - 1) / MP_I8_MR512, col_tiles = (nb + MP_I8_NB - 1) / MP_I8_NB;
#pragma omp parallel for schedule(static) collapse(2)
    for (int64_t ct = 0; ct < col_tiles; ct++)
        for (int64_t rt = 0; rt < row_tiles; rt++) {
            const int64_t r0 = rt * MP_I8_MR512, mr = m - r0 < MP_I8_MR512 ? m - r0 : MP_I8_MR512;
            const int64_t b0 = ct * MP_I8_NB, nbt = nb - b0 < MP_I8_NB ? nb - b0 : MP_I8_NB;
            w8a8_tile_vnni(q + r0 * kp, kp, mr, packed, colsum, b0, nbt, s + r0, ws, bias, n, y + r0 * n,
                           acc_out ? acc_out + r0 * n : NULL);
        }
#else
    w8a8_quantize_rows(x, m, k, kp, mode, xs, s, q, 0);
    const int64_t row_tiles = (m + MP_I8_MR - 1) / MP_I8_MR, col_tiles = (nb + MP_I8_NB - 1) / MP_I8_NB;
    /* column tiles outermost: a thread keeps its weight blocks in cache across the row tiles */
#pragma omp parallel for schedule(static) collapse(2)
    for (int64_t ct = 0; ct < col_tiles; ct++)
        for (int64_t rt = 0; rt < row_tiles; rt++) {
            int32_t acc[MP_I8_MR][MP_I8_NB * 16];
            const int64_t r0 = rt * MP_I8_MR, mr = m - r0 < MP_I8_MR ? m - r0 : MP_I8_MR;
            const int64_t b0 = ct * MP_I8_NB, nbt = nb - b0 < MP_I8_NB ? nb - b0 : MP_I8_NB;
            w8a8_tile(q + r0 * kp, kp, mr, packed, colsum, b0, nbt, acc);
            for (int64_t r = 0; r < mr; r++) {
                const float sr = s[r0 + r];
                for (int64_t c = 0; c < nbt * 16; c++) {
                    const int64_t o = b0 * 16 + c;
                    if (o >= n) break;
                    float v = (float)acc[r][c] * (sr * ws[o]);
                    if (bias) v = v + bias[o];
                    y[(r0 + r) * n + o] = v;
                    if (acc_out) acc_out[(r0 + r) * n + o] = acc[r][c];
                }
            }
        }
#endif
    free(q);
    free(s);
}
