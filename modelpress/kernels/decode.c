/* The fused decoder: every block of a Llama-family model in one call (mp_llama_decode), its
 * norms, rotary, attention over the paged cache and the output head (mp_llama_logits). */

/* One output of a linear layer for one input row: fp32 row, or affine codes (xsum: x's group sums);
 * block kinds go through mp_block_rows. */
/* Row o of a CODE4 layer (w: the whole matrix's packed codes, scale: absmax per block of g flattened
 * values, offset: the 16-value code book) times x: sum_j code[q(o k + j)] * absmax[(o k + j) / g] * x[j],
 * each block's products summed, then scaled. */
static inline float mp_code4_row(const mp_linear *l, int64_t o, const float *x) {
    const int64_t k = l->k, g = l->g, base = o * k;
    const uint8_t *q = (const uint8_t *)l->w;
    const float *code = l->offset, *absmax = l->scale;
    float acc = 0.0f;
    int64_t j = 0;
#if defined(MP_VNNI512)
    if (k % g == 0 && g % 16 == 0 && base % 2 == 0) {  /* whole blocks, 16 values (8 bytes) a step */
        const __m512 table = _mm512_loadu_ps(code);
        const __m128i low4 = _mm_set1_epi8(0xF);
        for (; j < k; j += g) {
            __m512 part = _mm512_setzero_ps();
            for (int64_t t = 0; t < g; t += 16) {
                const __m128i v = _mm_loadl_epi64((const __m128i *)(q + (base + j + t) / 2));
                const __m128i idx8 = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4));
                const __m512 w = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(idx8), table);
                part = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + j + t), part);
            }
            acc += _mm512_reduce_add_ps(part) * absmax[(base + j) / g];
        }
        return acc;
    }
#elif defined(MP_AVX2)
    if (k % g == 0 && g % 8 == 0 && base % 2 == 0) {  /* 8 values (4 bytes) a step; the code book in two halves */
        const __m256 lo_t = _mm256_loadu_ps(code), hi_t = _mm256_loadu_ps(code + 8);
        const __m128i low4 = _mm_set1_epi8(0xF);
        for (; j < k; j += g) {
            __m256 part = _mm256_setzero_ps();
            for (int64_t t = 0; t < g; t += 8) {
                int32_t four;
                memcpy(&four, q + (base + j + t) / 2, 4);
                const __m128i v = _mm_cvtsi32_si128(four);
                const __m128i idx8 = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4));
                const __m256i idx = _mm256_cvtepu8_epi32(idx8);
                const __m256 w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo_t, idx), _mm256_permutevar8x32_ps(hi_t, idx),
                                                  _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
                part = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + j + t), part);
            }
            acc += hsum8(part) * absmax[(base + j) / g];
        }
        return acc;
    }
#endif
    for (; j < k; j++) {
        const int64_t e = base + j;
        const uint8_t byte = q[e / 2];
        acc += code[e % 2 ? byte & 0xF : byte >> 4] * absmax[e / g] * x[j];
    }
    return acc;
}

/* Row o of an AFFINE4 layer times x: per group t, scale_t * sum_j q_j x_j + offset_t * xsum_t, the
 * codes read from their nibbles (code j: byte j / 2, low nibble for even j). */
static inline float mp_affine4_row(const mp_linear *l, int64_t o, const float *x, const float *xsum) {
    const int64_t k = l->k, g = l->g, ng = k / g;
    const uint8_t *qo = (const uint8_t *)l->w + o * (k / 2);
    const float *so = l->scale + o * ng, *oo = l->offset ? l->offset + o * ng : NULL;
    float acc = 0.0f;
    for (int64_t t = 0; t < ng; t++) {
        float dot = 0.0f;
        int64_t j = 0;
#if defined(MP_VNNI512)
        __m512 part = _mm512_setzero_ps();
        const __m128i low4 = _mm_set1_epi8(0xF);
        for (; j + 16 <= g; j += 16) {
            const __m128i v = _mm_loadl_epi64((const __m128i *)(qo + (t * g + j) / 2));
            const __m128i c8 = _mm_unpacklo_epi8(_mm_and_si128(v, low4), _mm_and_si128(_mm_srli_epi16(v, 4), low4));
            part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c8)), _mm512_loadu_ps(x + t * g + j), part);
        }
        dot = _mm512_reduce_add_ps(part);
#elif defined(MP_AVX2)
        __m256 part = _mm256_setzero_ps();
        const __m128i low4 = _mm_set1_epi8(0xF);
        for (; j + 8 <= g; j += 8) {
            int32_t four;
            memcpy(&four, qo + (t * g + j) / 2, 4);
            const __m128i v = _mm_cvtsi32_si128(four);
            const __m128i c8 = _mm_unpacklo_epi8(_mm_and_si128(v, low4), _mm_and_si128(_mm_srli_epi16(v, 4), low4));
            part = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c8)), _mm256_loadu_ps(x + t * g + j), part);
        }
        dot = hsum8(part);
#endif
        for (; j < g; j++) {
            const int64_t e = t * g + j;
            dot += (float)((qo[e / 2] >> (4 * (e % 2))) & 0xF) * x[e];
        }
        acc += so[t] * dot + (oo ? oo[t] : l->zero * so[t]) * xsum[t];
    }
    return acc;
}

/* AFFINE4_Q8 / AFFINE_Q8 (packed: 4-bit nibbles, code j in byte j / 2, low nibble first; else a byte a code). */
static inline int32_t mp_code_at(const uint8_t *qo, int64_t i, int packed) {
    return packed ? (qo[i / 2] >> (4 * (i % 2))) & 0xF : qo[i];
}

#if defined(MP_AVX2)
/* codes j .. j + 31 as 32 bytes, in order */
static inline __m256i mp_codes32(const uint8_t *qo, int64_t j, int packed) {
    if (!packed) return _mm256_loadu_si256((const __m256i *)(qo + j));
    const __m128i v = _mm_loadu_si128((const __m128i *)(qo + j / 2)), low4 = _mm_set1_epi8(0xF);
    const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
    return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
}

/* 32 codes c (mp_codes32) times x's 32 int8 values, int32 sums in 8 lanes (exact) */
static inline __m256i mp_codes32_dot(__m256i c, const int8_t *xq, int packed) {
    const __m256i xv = _mm256_loadu_si256((const __m256i *)xq);
#if defined(MP_VNNI512)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, xv);  /* unsigned codes times signed x */
#else
    if (packed)  /* codes <= 15: maddubs' int16 pairs cannot saturate */
        return _mm256_madd_epi16(_mm256_maddubs_epi16(c, xv), _mm256_set1_epi16(1));
    /* codes up to 255 would saturate them: widen both halves to int16, madd into int32 */
    const __m256i p0 = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(c)),
                                         _mm256_cvtepi8_epi16(_mm256_castsi256_si128(xv)));
    const __m256i p1 = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(c, 1)),
                                         _mm256_cvtepi8_epi16(_mm256_extracti128_si256(xv, 1)));
    return _mm256_add_epi32(p0, p1);
#endif
}
#endif

#if defined(MP_VNNI512)
/* codes j .. j + 63 as 64 bytes, in order (unpacking nibbles per 128-bit lane leaves 0-15, 32-47, 16-31,
 * 48-63: a qword permute puts them back) */
static inline __m512i mp_codes64(const uint8_t *qo, int64_t j, int packed) {
    if (!packed) return _mm512_loadu_si512(qo + j);
    const __m256i v = _mm256_loadu_si256((const __m256i *)(qo + j / 2)), low4 = _mm256_set1_epi8(0xF);
    const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_unpacklo_epi8(lo, hi)),
                                         _mm256_unpackhi_epi8(lo, hi), 1);
    return _mm512_permutexvar_epi64(_mm512_set_epi64(7, 6, 3, 2, 5, 4, 1, 0), c);
}
#endif

/* Row o of an AFFINE4_Q8 / AFFINE_Q8 layer against nr (1 .. 4) rows of x, into res[0 .. nr): per
 * group t, scale_t * sum over its 32-blocks b of d_b * (codes . xq_b), the integer dots exact, +
 * offset_t * xsum_t (xsum from the fp32 x); xq, xd: x rounded per 32 (mp_round_q8), row r at xq + r * k,
 * xd + r * k / 32, xsum + r * ng; xdv (AVX-512, groups of 64s): xd spread as each 64 codes' dpbusd lanes
 * read them (16 floats: 8 of its first 32's d, 8 of its second's), row r at xdv + r * k / 4. The codes are unpacked once for all nr rows; each row's sum is made
 * in the same order whatever nr is (a sequence's numbers do not depend on the batch). */
static inline __attribute__((always_inline)) void mp_affine_q8_rows(const mp_linear *l, int64_t o, const int8_t *xq,
                                                                    const float *xd, const float *xdv, const float *xsum,
                                                                    int nr, int packed, float *res) {
    const int64_t k = l->k, g = l->g, ng = k / g, nd = k / 32;
    const uint8_t *qo = (const uint8_t *)l->w + o * (packed ? k / 2 : k);
    const float *so = l->scale + o * ng, *oo = l->offset ? l->offset + o * ng : NULL;
    float off[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#if defined(MP_VNNI512)
    if (g % 64 == 0) {  /* 64 codes a step: two 32-blocks of x, one vpdpbusd a row */
        __m512 acc[8];
        for (int r = 0; r < 8; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t t = 0; t < ng; t++) {
            const __m512 st = _mm512_set1_ps(so[t]);
            for (int64_t j = t * g; j < (t + 1) * g; j += 64) {
                const __m512i c = mp_codes64(qo, j, packed);
                for (int r = 0; r < nr; r++) {
                    const __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c,
                                                             _mm512_loadu_si512(xq + r * k + j));
                    const __m512 sc = _mm512_mul_ps(st, _mm512_loadu_ps(xdv + (((uint64_t)(r * k + j)) >> 2)));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, acc[r]);
                }
            }
            for (int r = 0; r < nr; r++) off[r] += (oo ? oo[t] : l->zero * so[t]) * xsum[r * ng + t];
        }
        for (int r = 0; r < nr; r++) res[r] = off[r] + _mm512_reduce_add_ps(acc[r]);
        return;
    }
#endif
#if defined(MP_AVX2)
    __m256 acc[8];
    for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t t = 0; t < ng; t++) {
        for (int64_t j = t * g; j < (t + 1) * g; j += 32) {
            const __m256i c = mp_codes32(qo, j, packed);
            for (int r = 0; r < nr; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mp_codes32_dot(c, xq + r * k + j, packed)),
                                         _mm256_set1_ps(so[t] * xd[r * nd + j / 32]), acc[r]);
        }
        for (int r = 0; r < nr; r++) off[r] += (oo ? oo[t] : l->zero * so[t]) * xsum[r * ng + t];
    }
    for (int r = 0; r < nr; r++) res[r] = off[r] + hsum8(acc[r]);
#else
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t t = 0; t < ng; t++) {
        for (int64_t j = t * g; j < (t + 1) * g; j += 32)
            for (int r = 0; r < nr; r++) {
                int32_t dot = 0;
                for (int64_t i = j; i < j + 32; i++) dot += mp_code_at(qo, i, packed) * xq[r * k + i];
                acc[r] += (float)dot * (so[t] * xd[r * nd + j / 32]);
            }
        for (int r = 0; r < nr; r++) off[r] += (oo ? oo[t] : l->zero * so[t]) * xsum[r * ng + t];
    }
    for (int r = 0; r < nr; r++) res[r] = off[r] + acc[r];
#endif
}

/* AFFINE4_Q8 / AFFINE_Q8 rows [o0, o1) against B rows of x into ys[b][o]: x rows in groups of MP_GROUP
 * (their codes stay in L1 while the range's weight rows pass), four x rows per weight row read. */
static void mp_affine_q8_range(const mp_linear *l, int64_t o0, int64_t o1, const int8_t *xq, const float *xd,
                               const float *xdv, const float *xsum, int64_t B, float *const *ys) {
    const int64_t k = l->k, ng = k / l->g, nd = k / 32;
    const int packed = l->kind == MP_AFFINE4_Q8;
    float res[8];
    for (int64_t b0 = 0; b0 < B; b0 += MP_GROUP) {
        const int64_t b1 = B - b0 < MP_GROUP ? B : b0 + MP_GROUP;
        for (int64_t o = o0; o < o1; o++) {
            int64_t b = b0;
            for (; b + 8 <= b1; b += 8) {
                if (packed) mp_affine_q8_rows(l, o, xq + b * k, xd + b * nd, xdv ? xdv + b * k / 4 : NULL, xsum + b * ng, 8, 1, res);
                else mp_affine_q8_rows(l, o, xq + b * k, xd + b * nd, xdv ? xdv + b * k / 4 : NULL, xsum + b * ng, 8, 0, res);
                for (int r = 0; r < 8; r++) ys[b + r][o] = res[r];
            }
            for (; b + 4 <= b1; b += 4) {
                if (packed) mp_affine_q8_rows(l, o, xq + b * k, xd + b * nd, xdv ? xdv + b * k / 4 : NULL, xsum + b * ng, 4, 1, res);
                else mp_affine_q8_rows(l, o, xq + b * k, xd + b * nd, xdv ? xdv + b * k / 4 : NULL, xsum + b * ng, 4, 0, res);
                for (int r = 0; r < 4; r++) ys[b + r][o] = res[r];
            }
            for (; b < b1; b++) {
                if (packed) mp_affine_q8_rows(l, o, xq + b * k, xd + b * nd, xdv ? xdv + b * k / 4 : NULL, xsum + b * ng, 1, 1, res);
                else mp_affine_q8_rows(l, o, xq + b * k, xd + b * nd, xdv ? xdv + b * k / 4 : NULL, xsum + b * ng, 1, 0, res);
                ys[b][o] = res[0];
            }
        }
    }
}

/* x (B rows of k, k % 32 == 0) rounded per 32 as llama.cpp's quantize_row_q8_0: d = max |x| / 127,
 * q = round(x / d) (d = 0: q = 0). */
static void mp_round_q8(const float *x, int64_t B, int64_t k, int8_t *q, float *d) {
#pragma omp parallel for schedule(static) if (B >= MP_PAR_ROWS)
    for (int64_t b = 0; b < B * k / 32; b++) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            const float a = fabsf(x[b * 32 + i]);
            amax = a > amax ? a : amax;
        }
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        d[b] = db;
#if defined(MP_AVX2)
        /* roundf (halves away from zero) exactly: t = trunc(v), plus sign(v) where |v - t| >= 0.5 */
        const __m256 vid = _mm256_set1_ps(id), half = _mm256_set1_ps(0.5f), sign = _mm256_set1_ps(-0.0f);
        for (int i = 0; i < 32; i += 8) {
            const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + b * 32 + i), vid);
            const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            const __m256 up = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(v, t)), half, _CMP_GE_OQ);
            const __m256 r = _mm256_add_ps(t, _mm256_and_ps(up, _mm256_or_ps(_mm256_and_ps(v, sign), _mm256_set1_ps(1.0f))));
            const __m256i n = _mm256_cvttps_epi32(r);  /* |r| <= 127 */
            const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(n), _mm256_extracti128_si256(n, 1));
            _mm_storel_epi64((__m128i *)(q + b * 32 + i), _mm_packs_epi16(h, h));
        }
#else
        for (int i = 0; i < 32; i++) q[b * 32 + i] = (int8_t)roundf(x[b * 32 + i] * id);
#endif
    }
}

static inline float mp_linear_row(const mp_linear *l, int64_t o, const float *x, const float *xsum) {
    if (l->kind == MP_F32) return mp_dotf((const float *)l->w + o * l->k, x, l->k);
    if (l->kind >= MP_SPARSE24 && l->kind <= MP_SPARSE24_F16)  /* value type 0, 1, 2: fp32, bf16, fp16 */
        return mp_sparse24_dot(l->w, (int)(l->kind - MP_SPARSE24), l->idx, o, x, l->k);
    if (l->kind == MP_CODE4) return mp_code4_row(l, o, x);
    if (l->kind == MP_AFFINE4) return mp_affine4_row(l, o, x, xsum);
    const int64_t g = l->g, ng = l->k / g;
    const uint8_t *qo = (const uint8_t *)l->w + o * l->k;
    const float *so = l->scale + o * ng, *oo = l->offset ? l->offset + o * ng : NULL;
#ifdef MP_AVX2
    if (g % 16 == 0) return mp_affine_dot1(qo, so, oo, l->zero, x, xsum, ng, g);
#endif
    float acc = 0.0f;
    for (int64_t t = 0; t < ng; t++) {
        float dot = 0.0f;
        for (int64_t j = 0; j < g; j++) dot += (float)qo[t * g + j] * x[t * g + j];
        acc += so[t] * dot + (oo ? oo[t] : l->zero * so[t]) * xsum[t];
    }
    return acc;
}

/* y_c = x @ W_c^T for up to 3 layers reading the same x (q k v; gate up), B rows of x (B, k), in
 * one parallel loop over all their output rows (fewer thread wake-ups than a loop per layer); row b
 * of layer c goes to ys[c * B + b] (k and v straight into their cache slots). */
static void mp_linears_apply(const mp_linear *const *ls, float *const *ys, int cnt, const float *x, int64_t B) {
    float *xs[3] = {NULL, NULL, NULL}, *xp[3] = {NULL, NULL, NULL}, *xd[3] = {NULL, NULL, NULL};
    float *xdv[3] = {NULL, NULL, NULL};  /* AVX-512: xd as the 64-code steps read it (mp_affine_q8_rows) */
    int8_t *xq[3] = {NULL, NULL, NULL};  /* AFFINE4_Q8: x rounded per 32, and the 32s' scales */
    const float *xc[3] = {x, x, x};  /* each layer's input: x, or x's columns in the layer's stored order */
    mp_acts acts[3];  /* x rounded per 32 ([0], Q8_0 / Q5_0; [2] packed for kind 7) and per 256 ([1], Q4_K / Q6_K) */
    int made[3] = {0, 0, 0};
    int64_t start[4] = {0, 0, 0, 0};
    const int64_t k = ls[0]->k;
    for (int c = 0; c < cnt; c++) {
        const mp_linear *l = ls[c];
        const int r = mp_acts_slot(l->kind);
        if (MP_IS_BLOCK(l->kind) && !made[r]) {  /* the layers of one call read the same x: round it once */
            mp_acts_make(l->kind, x, B, k, &acts[r]);
            made[r] = 1;
        }
        if (l->perm && (l->kind == MP_F32 || MP_IS_AFFINE(l->kind))) {
            xp[c] = malloc(sizeof(float) * (size_t)(B * k));
            for (int64_t b = 0; b < B; b++)
                for (int64_t j = 0; j < k; j++) xp[c][b * k + j] = x[b * k + l->perm[j]];
            xc[c] = xp[c];
        }
        if (MP_ROUNDS_X(l->kind)) {
            xq[c] = malloc((size_t)(B * k));
            xd[c] = malloc(sizeof(float) * (size_t)(B * k / 32));
            mp_round_q8(xc[c], B, k, xq[c], xd[c]);
#if defined(MP_VNNI512)
            if (l->g % 64 == 0) {
                xdv[c] = malloc(sizeof(float) * (size_t)(B * k / 4));
                for (int64_t i = 0; i < B * k / 4; i++) xdv[c][i] = xd[c][i / 8];
            }
#endif
        }
        if (MP_IS_AFFINE(l->kind)) {
            const int64_t ng = k / l->g;
            xs[c] = malloc(sizeof(float) * (size_t)(B * ng));
#pragma omp parallel for schedule(static) if (B >= MP_PAR_ROWS)
            for (int64_t b = 0; b < B; b++)
                for (int64_t t = 0; t < ng; t++) {
                    float sum = 0.0f;
                    for (int64_t j = 0; j < l->g; j++) sum += xc[c][b * k + t * l->g + j];
                    xs[c][b * ng + t] = sum;
                }
        }
        start[c + 1] = start[c] + (l->n + MP_RANGE - 1) / MP_RANGE;  /* in ranges of MP_RANGE output rows */
    }
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < start[cnt]; r++) {
        int c = 0;
        while (r >= start[c + 1]) c++;
        const mp_linear *l = ls[c];
        const int64_t o0 = (r - start[c]) * MP_RANGE, o1 = o0 + MP_RANGE < l->n ? o0 + MP_RANGE : l->n;
        const int64_t ng = MP_IS_AFFINE(l->kind) ? k / l->g : 0;
        if (MP_IS_BLOCK(l->kind)) {
            mp_block_range(l->kind, (const uint8_t *)l->w, k, o0, o1, &acts[mp_acts_slot(l->kind)], B, ys + c * B);
            continue;
        }
        if (MP_ROUNDS_X(l->kind)) {
            mp_affine_q8_range(l, o0, o1, xq[c], xd[c], xdv[c], xs[c], B, ys + c * B);
            continue;
        }
        for (int64_t o = o0; o < o1; o++) {
            if (l->kind == MP_F32 && o + 2 < l->n) mp_prefetch_nta((const uint8_t *)l->w + (o + 2) * k * 4, k * 4);
            for (int64_t b = 0; b < B; b++) ys[c * B + b][o] = mp_linear_row(l, o, xc[c] + b * k, xs[c] ? xs[c] + b * ng : NULL);
        }
    }
    for (int c = 0; c < cnt; c++) {
        free(xs[c]);
        free(xp[c]);
        free(xq[c]);
        free(xd[c]);
        free(xdv[c]);
        if (ls[c]->bias)  /* after the whole product, as torch adds a bias */
            for (int64_t b = 0; b < B; b++)
                for (int64_t o = 0; o < ls[c]->n; o++) ys[c * B + b][o] += ls[c]->bias[o];
    }
    for (int r = 0; r < 3; r++)
        if (made[r]) mp_acts_free(&acts[r]);
}

/* y (B, n) = one layer applied to x (B, k), as the fused decode applies it (the tests check each kind here). */
void mp_linear_apply(const mp_linear *l, const float *x, int64_t B, float *y) {
    float **ys = malloc(sizeof(float *) * (size_t)B);
    for (int64_t b = 0; b < B; b++) ys[b] = y + b * l->n;
    mp_linears_apply(&l, ys, 1, x, B);
    free(ys);
}

static void mp_rms_norm(const float *x, const float *w, int64_t d, float eps, float *y) {
    double ss = 0.0;
    for (int64_t i = 0; i < d; i++) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / (double)d) + eps);
    for (int64_t i = 0; i < d; i++) y[i] = w[i] * (x[i] * r);
}

/* each of `heads` rows of hd floats normed in place with the same weights (per-head q / k norms) */
static void mp_rms_norm_heads(float *v, int64_t heads, int64_t hd, const float *w, float eps) {
    for (int64_t h = 0; h < heads; h++) mp_rms_norm(v + h * hd, w, hd, eps, v + h * hd);
}

/* n floats to fp16, nearest even (as torch's .half() and ggml's cache writes) */
static void mp_to_half(const float *x, int64_t n, uint16_t *y) {
    int64_t i = 0;
#ifdef MP_AVX2
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) {
        const _Float16 h = (_Float16)x[i];
        memcpy(y + i, &h, 2);
    }
}

static void mp_rope(float *v, int64_t heads, int64_t hd, const float *cos, const float *sin) {
    const int64_t h2 = hd / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *p = v + h * hd;
        for (int64_t i = 0; i < h2; i++) {
            const float a = p[i], b = p[i + h2];
            p[i] = a * cos[i] - b * sin[i];
            p[i + h2] = b * cos[i + h2] + a * sin[i + h2];
        }
    }
}

#ifdef MP_AVX2
/* e^x for 8 lanes of x <= 0 (lanes below -87 give e^-87, ~1.6e-38): Cephes' expf (range reduction
 * by n = round(x log2 e) in two parts of ln 2, degree-5 polynomial, 2^n from the exponent bits);
 * within ~2 ulp of the correctly rounded value. Written here: no vectorized expf in libm to call. */
static inline __m256 mp_exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

void mp_exp_f32(const float *x, int64_t n, float *y) {  /* for the tests: the softmax's exponential */
    for (int64_t i = 0; i < n; i++) {
#ifdef MP_AVX2
        float t[8] = {0};
        t[0] = x[i];
        _mm256_storeu_ps(t, mp_exp8(_mm256_loadu_ps(t)));
        y[i] = t[0];
#else
        y[i] = expf(x[i]);
#endif
    }
}

/* Ask for the bytes at p (the key or value row of a position some steps ahead: the paged cache's
 * rows lie where their blocks are, out of the hardware prefetcher's sight); 30 layers of 32
 * sequences x 200 positions: 50 -> 42 ms here. */
static inline void mp_prefetch_bytes(const void *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch((const char *)p + i, 0, 3);
}

/* Element i of a cache row: fp32, or fp16 (the cache half the bytes: `f16`) widened. */
static inline float mp_kv1(const void *base, int64_t i, int f16) {
    return f16 ? mp_half(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

#ifdef MP_AVX2
static inline __m256 mp_kv8(const void *base, int64_t i, int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)))
               : _mm256_loadu_ps((const float *)base + i);
}
#endif

/* One head's attention for one query over L cached positions: softmax(q . k_p * scale) . v_p, keys
 * and values at element k + slot[p] * stride (the paged cache, the head's offset added by the
 * caller; fp32, or fp16 where f16); s: L floats of scratch. With AVX2: the exponentials eight at a
 * time (mp_exp8), and for each 64 output lanes the weighted values summed in eight registers over
 * all positions, divided by the softmax sum once at the end. Inlined with f16 a constant: a copy for
 * each cache type. */
static inline __attribute__((always_inline)) void mp_attend(const float *qh, const void *k, const void *v, int64_t stride,
                                                            const int64_t *slot, int64_t L, int64_t hd, float scale,
                                                            float softcap, float *s, float *oh, int f16) {
    float mx = -INFINITY, sum = 0.0f;
    int64_t p0 = 0;
#ifdef MP_AVX2
    const int64_t es = f16 ? 2 : 4;  /* bytes an element */
    if (hd % 8 == 0) {  /* eight positions at a time: eight dot products, reduced together */
        __m256 vmx = _mm256_set1_ps(-INFINITY);
        for (; p0 + 8 <= L; p0 += 8) {
            __m256 a[8];
            if (p0 + 24 <= L)
                for (int j = 16; j < 24; j++) mp_prefetch_bytes((const char *)k + slot[p0 + j] * stride * es, hd * es);
            for (int j = 0; j < 8; j++) {
                const int64_t kp = slot[p0 + j] * stride;
                a[j] = _mm256_mul_ps(_mm256_loadu_ps(qh), mp_kv8(k, kp, f16));
                for (int64_t i = 8; i < hd; i += 8) a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), mp_kv8(k, kp + i, f16), a[j]);
            }
            const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
            const __m256 d = _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
            const __m256 sc = _mm256_mul_ps(d, _mm256_set1_ps(scale));
            _mm256_storeu_ps(s + p0, sc);
            vmx = _mm256_max_ps(vmx, sc);
        }
        float m8[8];
        _mm256_storeu_ps(m8, vmx);
        for (int j = 0; j < 8; j++) mx = fmaxf(mx, m8[j]);
    }
#endif
    for (int64_t p = p0; p < L; p++) {
        if (!f16) {
            s[p] = mp_dotf(qh, (const float *)k + slot[p] * stride, hd) * scale;
        } else {
            float dot = 0.0f;
            for (int64_t i = 0; i < hd; i++) dot += qh[i] * mp_kv1(k, slot[p] * stride + i, 1);
            s[p] = dot * scale;
        }
        if (s[p] > mx) mx = s[p];
    }
    if (softcap > 0.0f) {  /* gemma2: c * tanh(s / c), then the softmax over the capped scores */
        mx = -INFINITY;
        for (int64_t p = 0; p < L; p++) {
            s[p] = tanhf(s[p] / softcap) * softcap;
            if (s[p] > mx) mx = s[p];
        }
    }
#ifdef MP_AVX2
    {
        const __m256 vm = _mm256_set1_ps(mx);
        __m256 vs = _mm256_setzero_ps();
        int64_t p = 0;
        for (; p + 8 <= L; p += 8) {
            const __m256 e = mp_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + p), vm));
            _mm256_storeu_ps(s + p, e);
            vs = _mm256_add_ps(vs, e);
        }
        sum = hsum8(vs);
        if (p < L) {  /* the last L % 8: through the same vector exp */
            float t[8] = {0};
            for (int64_t i = p; i < L; i++) t[i - p] = s[i] - mx;
            _mm256_storeu_ps(t, mp_exp8(_mm256_loadu_ps(t)));
            for (int64_t i = p; i < L; i++) { s[i] = t[i - p]; sum += s[i]; }
        }
    }
    const float inv = 1.0f / sum;
    if (hd % 64 == 0) {
        for (int64_t c = 0; c < hd; c += 64) {
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            for (int64_t p = 0; p < L; p++) {
                if (p + 8 < L) mp_prefetch_bytes((const char *)v + (slot[p + 8] * stride + c) * es, 64 * es);
                const int64_t vp = slot[p] * stride + c;
                const __m256 w = _mm256_set1_ps(s[p]);
                for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(w, mp_kv8(v, vp + 8 * i, f16), a[i]);
            }
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(oh + c + 8 * i, _mm256_mul_ps(a[i], _mm256_set1_ps(inv)));
        }
        return;
    }
#else
    for (int64_t p = 0; p < L; p++) { s[p] = expf(s[p] - mx); sum += s[p]; }
    const float inv = 1.0f / sum;
#endif
    for (int64_t i = 0; i < hd; i++) oh[i] = 0.0f;
    for (int64_t p = 0; p < L; p++) {
        const float w = s[p];
        for (int64_t i = 0; i < hd; i++) oh[i] += w * mp_kv1(v, slot[p] * stride + i, f16);
    }
    for (int64_t i = 0; i < hd; i++) oh[i] *= inv;
}

/* Decode attention for B sequences at once, each one query token over its own cached positions,
 * read in place from the paged cache (no gathered copy):
 *   q      fp32 (B, n_heads, hd);  k_cache, v_cache fp32 (slots, n_kv, hd)
 *   slots  int64 (B, lmax): sequence b's positions 0 .. lens[b] - 1 live in slots[b, p]
 *   out    fp32 (B, n_heads, hd); query heads share kv heads in groups of n_heads / n_kv */
static void mp_attend_rows(const float *q, int64_t B, int64_t n_heads, int64_t n_kv, int64_t hd, const void *k_cache,
                           const void *v_cache, int f16, const int64_t *slots, const int64_t *lens, int64_t lmax,
                           float *sc, float *out, float attn_scale, float softcap, int64_t window) {
    const int64_t group = n_heads / n_kv, kvd = n_kv * hd;
    const float scale = attn_scale > 0.0f ? attn_scale : 1.0f / sqrtf((float)hd);
    /* one task per (sequence, kv head): the query heads that share the kv head run one after
     * another on one thread, so its keys and values come from memory once and from the core's own
     * cache for the rest of the group (one task per query head read them up to `group` times:
     * 30 layers of 32 sequences x 140 positions, 9 heads on 3 kv heads, 47-58 -> 30-36 ms here) */
#pragma omp parallel for schedule(dynamic)
    for (int64_t bg = 0; bg < B * n_kv; bg++) {
        const int64_t b = bg / n_kv, g = bg % n_kv;
        const int64_t off = g * hd * (f16 ? 2 : 4);
        const char *kg = (const char *)k_cache + off, *vg = (const char *)v_cache + off;
        /* a sliding window: the query (position lens[b] - 1) sees positions > lens[b] - 1 - window */
        const int64_t p0 = window > 0 && lens[b] > window ? lens[b] - window : 0, L = lens[b] - p0;
        const int64_t *sl = slots + b * lmax + p0;
        for (int64_t bh = b * n_heads + g * group; bh < b * n_heads + (g + 1) * group; bh++) {
            if (f16)
                mp_attend(q + bh * hd, kg, vg, kvd, sl, L, hd, scale, softcap, sc + bh * lmax, out + bh * hd, 1);
            else
                mp_attend(q + bh * hd, kg, vg, kvd, sl, L, hd, scale, softcap, sc + bh * lmax, out + bh * hd, 0);
        }
    }
}

void mp_paged_attention(const float *q, int64_t B, int64_t n_heads, int64_t n_kv, int64_t hd, const float *k_cache,
                        const float *v_cache, const int64_t *slots, const int64_t *lens, int64_t lmax, float *out) {
    float *sc = malloc(sizeof(float) * (size_t)(B * n_heads * lmax));
    mp_attend_rows(q, B, n_heads, n_kv, hd, k_cache, v_cache, 0, slots, lens, lmax, sc, out, 0.0f, 0.0f, 0);
    free(sc);
}

void mp_llama_decode(const mp_layer *layers, int64_t n_layers, float *x, int64_t B, int64_t d, int64_t d_ff,
                     int64_t n_heads, int64_t n_kv, int64_t hd, float eps, const float *cos, const float *sin,
                     const int64_t *slots, const int64_t *lens, int64_t lmax, int64_t kv_f16) {
    const int64_t kvd = n_kv * hd, qd = n_heads * hd;
    /* an fp16 cache: k and v computed into kv (B rows of k then B of v), rotated, then rounded into it */
    float *kv = kv_f16 ? malloc(sizeof(float) * (size_t)(2 * B * kvd)) : NULL;
    float *h = malloc(sizeof(float) * (size_t)(B * d)), *q = malloc(sizeof(float) * (size_t)(B * qd));
    float *att = malloc(sizeof(float) * (size_t)(B * qd)), *t = malloc(sizeof(float) * (size_t)(B * d));
    float *g = malloc(sizeof(float) * (size_t)(B * d_ff)), *u = malloc(sizeof(float) * (size_t)(B * d_ff));
    float *sc = malloc(sizeof(float) * (size_t)(B * n_heads * lmax));
    float **ys = malloc(sizeof(float *) * (size_t)(3 * B));
    for (int64_t li = 0; li < n_layers; li++) {
        const mp_layer *ly = layers + li;
        void *kc = ly->k_cache, *vc = ly->v_cache;
#pragma omp parallel for schedule(static) if (B >= MP_PAR_ROWS)
        for (int64_t b = 0; b < B; b++) mp_rms_norm(x + b * d, ly->attn_norm, d, eps, h + b * d);
        {   /* k and v straight into an fp32 cache */
            const mp_linear *ls[3] = {&ly->q, &ly->k, &ly->v};
            for (int64_t b = 0; b < B; b++) {
                const int64_t slot = slots[b * lmax + lens[b] - 1];
                ys[b] = q + b * qd;
                ys[B + b] = kv_f16 ? kv + b * kvd : (float *)kc + slot * kvd;
                ys[2 * B + b] = kv_f16 ? kv + (B + b) * kvd : (float *)vc + slot * kvd;
            }
            mp_linears_apply(ls, ys, 3, h, B);
        }
#pragma omp parallel for schedule(static) if (B >= MP_PAR_ROWS)
        for (int64_t b = 0; b < B; b++) {
            if (ly->q_norm) {  /* qwen3, gemma3: each head normed before the rotary */
                mp_rms_norm_heads(q + b * qd, n_heads, hd, ly->q_norm, eps);
                mp_rms_norm_heads(ys[B + b], n_kv, hd, ly->k_norm, eps);
            }
            const float *cb = cos + (ly->rope * B + b) * hd, *sb = sin + (ly->rope * B + b) * hd;
            mp_rope(q + b * qd, n_heads, hd, cb, sb);
            mp_rope(ys[B + b], n_kv, hd, cb, sb);
            if (kv_f16) {
                const int64_t slot = slots[b * lmax + lens[b] - 1];
                mp_to_half(ys[B + b], kvd, (uint16_t *)kc + slot * kvd);
                mp_to_half(ys[2 * B + b], kvd, (uint16_t *)vc + slot * kvd);
            }
        }
        mp_attend_rows(q, B, n_heads, n_kv, hd, kc, vc, (int)kv_f16, slots, lens, lmax, sc, att, ly->attn_scale,
                       ly->softcap, ly->window);
        {
            const mp_linear *ls[1] = {&ly->o};
            for (int64_t b = 0; b < B; b++) ys[b] = t + b * d;
            mp_linears_apply(ls, ys, 1, att, B);
        }
#pragma omp parallel for schedule(static) if (B >= MP_PAR_ROWS)
        for (int64_t b = 0; b < B; b++) {
            if (ly->post_attn_norm) mp_rms_norm(t + b * d, ly->post_attn_norm, d, eps, t + b * d);
            for (int64_t i = b * d; i < (b + 1) * d; i++) x[i] += t[i];
            mp_rms_norm(x + b * d, ly->ffn_norm, d, eps, h + b * d);
        }
        {
            const mp_linear *ls[2] = {&ly->gate, &ly->up};
            for (int64_t b = 0; b < B; b++) {
                ys[b] = g + b * d_ff;
                ys[B + b] = u + b * d_ff;
            }
            mp_linears_apply(ls, ys, 2, h, B);
        }
#pragma omp parallel for schedule(static) if (B >= MP_PAR_ROWS)
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = b * d_ff; i < (b + 1) * d_ff; i++)
                g[i] = (ly->act ? 0.5f * g[i] * (1.0f + tanhf(0.7978845608028654f * (g[i] + 0.044715f * g[i] * g[i] * g[i])))
                                : g[i] / (1.0f + expf(-g[i]))) * u[i];
        {
            const mp_linear *ls[1] = {&ly->down};
            for (int64_t b = 0; b < B; b++) ys[b] = t + b * d;
            mp_linears_apply(ls, ys, 1, g, B);
        }
#pragma omp parallel for schedule(static) if (B >= MP_PAR_ROWS)
        for (int64_t b = 0; b < B; b++) {
            if (ly->post_ffw_norm) mp_rms_norm(t + b * d, ly->post_ffw_norm, d, eps, t + b * d);
            for (int64_t i = b * d; i < (b + 1) * d; i++) x[i] += t[i];
        }
    }
    free(h); free(q); free(att); free(t); free(g); free(u); free(sc); free(ys); free(kv);
}

/* The logits after a step: the model's final norm of rows rows[0 .. n_out) of x (B, d), then the
 * head (GGUF blocks with int8 activations, as its layers multiply), into logits (n_out, head->n).
 * In C rather than torch's: the norm's handful of operations, each slow on caches the step's weights
 * have just streamed through, cost more there than the norm itself. */
void mp_llama_logits(const mp_linear *head, const float *norm, float eps, const float *x, int64_t d,
                     const int64_t *rows, int64_t n_out, float *logits) {
    float *h = malloc(sizeof(float) * (size_t)(n_out * d));
    float **ys = malloc(sizeof(float *) * (size_t)n_out);
    for (int64_t i = 0; i < n_out; i++) {
        mp_rms_norm(x + rows[i] * d, norm, d, eps, h + i * d);
        ys[i] = logits + i * head->n;
    }
    const mp_linear *ls[1] = {head};
    mp_linears_apply(ls, ys, 1, h, n_out);
    free(h);
    free(ys);
}
