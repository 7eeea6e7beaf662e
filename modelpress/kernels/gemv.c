/* The nn/ modules' products on compressed weights, few rows at a time (decode): 4-bit code books,
 * LLM.int8, fp32 and affine uint8 codes. */

/* ---------------------------------------------------------------------------------------------
 * 4-bit code book (NF4 / FP4, bitsandbytes' layout), fp32 activations.
 *   x      fp32 (m, k), m <= MP_MAX_ROWS
 *   q      uint8 (n * k / 2): the (n, k) weight flattened, two codes a byte, FIRST in HIGH nibble
 *   absmax fp32 (ceil(n * k / bs)): one per block of bs consecutive flattened values
 *   code   fp32 (16)
 *   y      fp32 (m, n) = x @ W^T, W[o, j] = code[q(o*k + j)] * absmax[(o*k + j) / bs]
 * Requires k % 32 == 0 and bs % 32 == 0, so that each 32-value chunk (16 bytes) lies in one block.
 */
void mp_code4_gemv(const float *x, int64_t m, int64_t k, const uint8_t *q, const float *absmax,
                   const float *code, int64_t n, int64_t bs, float *y) {
    const int64_t half = k / 2;
    /* Reorder x once per call to match the order lut32 yields for a 16-byte chunk: the chunk's
     * idx vector holds the high nibbles (even values) in lane 0 and the low nibbles (odd values)
     * in lane 1, so f[t] covers values 8t + {0, 2, 4, 6} then 8t + {1, 3, 5, 7}. */
    float *xp = (float *)malloc(sizeof(float) * (size_t)(m * k + 8));
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < k; g += 8)
            for (int64_t i = 0; i < 4; i++) {
                xp[r * k + g + i] = x[r * k + g + 2 * i];
                xp[r * k + g + 4 + i] = x[r * k + g + 2 * i + 1];
            }
#ifdef MP_AVX2
    __m256i tb[4];
    for (int b = 0; b < 4; b++) {
        uint8_t t[16];
        for (int i = 0; i < 16; i++) t[i] = ((const uint8_t *)&code[i])[b];
        tb[b] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t));
    }
#endif
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < n; o++) {
        const uint8_t *qo = q + o * half;
        const int64_t base = o * k;
#ifdef MP_AVX2
        const __m128i low4 = _mm_set1_epi8(0xF);
        __m256 acc[MP_MAX_ROWS], part[MP_MAX_ROWS], f[4];
        for (int64_t r = 0; r < m; r++) acc[r] = part[r] = _mm256_setzero_ps();
        int64_t b = base / bs, left = bs - base % bs;  /* block of the next chunk, values left in it */
        for (int64_t c = 0; c < half; c += 16) {  /* 16 bytes = 32 values, all in block b */
            __m128i v = _mm_loadu_si128((const __m128i *)(qo + c));
            __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4), lo = _mm_and_si128(v, low4);
            lut32(tb, _mm256_set_m128i(lo, hi), f);
            for (int64_t r = 0; r < m; r++) {
                const float *xr = xp + r * k + 2 * c;
                part[r] = _mm256_fmadd_ps(f[0], _mm256_loadu_ps(xr), part[r]);
                part[r] = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xr + 8), part[r]);
                part[r] = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xr + 16), part[r]);
                part[r] = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xr + 24), part[r]);
            }
            left -= 32;
            if (left == 0 || c + 16 == half) {  /* close the block: scale its partial sums once */
                __m256 s = _mm256_set1_ps(absmax[b]);
                for (int64_t r = 0; r < m; r++) {
                    acc[r] = _mm256_fmadd_ps(part[r], s, acc[r]);
                    part[r] = _mm256_setzero_ps();
                }
                b++;
                left = bs;
            }
        }
        for (int64_t r = 0; r < m; r++) y[r * n + o] = hsum8(acc[r]);
#else
        for (int64_t r = 0; r < m; r++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < k; j++) {
                uint8_t byte = qo[j / 2];
                acc += code[j % 2 ? byte & 0xF : byte >> 4] * absmax[(base + j) / bs] * x[r * k + j];
            }
            y[r * n + o] = acc;
        }
#endif
    }
    free(xp);
}

/* ---------------------------------------------------------------------------------------------
 * LLM.int8() (arXiv:2208.07339) as bitsandbytes 0.50 computes it, for a few rows:
 *   1. a = fp16(x); columns where any row has |a| >= threshold are outliers (threshold > 0)
 *   2. per row: SCA = max |a| over the non-outlier values; CA = round(a * (127 / SCA)) in int8,
 *      with every outlier column set to 0
 *   3. y = (CA @ CB^T as int32) * (SCA * SCB) * (1/127^2)  (+ bias)
 *   4. y += x[:, outliers] @ (CB[:, outliers] * SCB / 127)^T, in fp32
 *   x fp32 (m, k); CB int8 (n, k), values in -127..127; SCB fp32 (n); bias fp32 (n) or NULL;
 *   y fp32 (m, n). The int8 dot products are exact (int32); the vector loop needs k % 32 == 0.
 */
static inline float round_fp16(float v) {
#ifdef MP_AVX2
    return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    return (float)(_Float16)v;
#endif
}

void mp_int8_linear(const float *x, int64_t m, int64_t k, const int8_t *cb, const float *scb,
                    const float *bias, int64_t n, float threshold, float *y) {
    float *a = (float *)malloc(sizeof(float) * (size_t)(m * k));
    uint8_t *outlier = (uint8_t *)calloc((size_t)k, 1);
    int8_t *ca = (int8_t *)malloc((size_t)(m * k + 64));
    float sca[MP_MAX_ROWS];
    int64_t *cols = (int64_t *)malloc(sizeof(int64_t) * (size_t)(k + 1));
    int64_t ncols = 0;
    for (int64_t i = 0; i < m * k; i++) a[i] = round_fp16(x[i]);
    if (threshold > 0.0f)
        for (int64_t i = 0; i < m * k; i++)
            if (fabsf(a[i]) >= threshold) outlier[i % k] = 1;
    for (int64_t j = 0; j < k; j++)
        if (outlier[j]) cols[ncols++] = j;
    for (int64_t r = 0; r < m; r++) {
        float mx = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            float v = fabsf(a[r * k + j]);
            if (!(threshold > 0.0f && v >= threshold) && v > mx) mx = v;
        }
        sca[r] = mx;
        /* (1 / SCA) * 127, not 127 / SCA: torch computes a scalar over a tensor as a reciprocal
         * times the scalar, and the two differ in the last bit for some values */
        float inv = mx > 0.0f ? (1.0f / mx) * 127.0f : 0.0f;  /* an all-zero row stays zero */
        for (int64_t j = 0; j < k; j++) {
            float v = a[r * k + j];
            if (threshold > 0.0f && fabsf(v) >= threshold) v = 0.0f;
            ca[r * k + j] = outlier[j] ? 0 : (int8_t)nearbyintf(v * inv);
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < n; o++) {
        const int8_t *w = cb + o * k;
        for (int64_t r = 0; r < m; r++) {
            const int8_t *xr = ca + r * k;
            int32_t dot = 0;
#ifdef MP_AVX2
            if (k % 32 == 0) {  /* |x| * sign(w, x): u8 x s8 pairs that cannot saturate (|v| <= 127) */
                const __m256i ones = _mm256_set1_epi16(1);
                __m256i acc = _mm256_setzero_si256();
                for (int64_t j = 0; j < k; j += 32) {
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(xr + j));
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(w + j));
                    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(xv, xv), _mm256_sign_epi8(wv, xv));
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
                }
                dot = hsum8i(acc);
            } else
#endif
            {
                for (int64_t j = 0; j < k; j++) dot += (int32_t)xr[j] * (int32_t)w[j];
            }
            float v = (float)dot * (sca[r] * scb[o]) * 6.200124e-05f;
            if (bias) v += bias[o];
            float extra = 0.0f;
            for (int64_t c = 0; c < ncols; c++) {
                int64_t j = cols[c];
                extra += x[r * k + j] * ((float)w[j] * scb[o] * 7.874015718698502e-3f);
            }
            y[r * n + o] = v + extra;
        }
    }
    free(a);
    free(outlier);
    free(ca);
    free(cols);
}

/* ---------------------------------------------------------------------------------------------
 * Dense fp32: y (m, n) = x (m, k) @ W (n, k)^T, for decode, where MKL's GEMV reaches ~6.6 GB/s
 * on this class of machine and a plain streaming loop ~16 GB/s (the tied 49152 x 576 output head
 * of the default model: 17 ms with F.linear). Any k; the vector loop takes 8 columns at a time.
 */
/* a . b over n floats */
static inline float mp_dotf(const float *a, const float *b, int64_t n) {
    int64_t j = 0;
    float acc = 0.0f;
#ifdef MP_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), a1);
    }
    for (; j + 8 <= n; j += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), a0);
    acc = hsum8(_mm256_add_ps(a0, a1));
#endif
    for (; j < n; j++) acc += a[j] * b[j];
    return acc;
}

void mp_f32_gemv(const float *x, int64_t m, int64_t k, const float *w, int64_t n, float *y) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < n; o++)
        for (int64_t r = 0; r < m; r++) y[r * n + o] = mp_dotf(w + o * k, x + r * k, k);
}

#ifdef MP_AVX2
/* One output of an affine layer for one input row (g % 16 == 0): scale * (x . q) summed as vectors
 * across the groups in two register chains, one horizontal sum at the end; offset * sum(x) apart.
 * oo NULL: a symmetric type, offset = zero * scale (exact: zero is -8, -16 or -128). */
static inline float mp_affine_dot1(const uint8_t *qo, const float *so, const float *oo, float zero,
                                   const float *x, const float *xsum, int64_t ng, int64_t g) {
    __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps();
    float off = 0.0f;
    for (int64_t t = 0; t < ng; t++) {
        const uint8_t *qg = qo + t * g;
        const float *xg = x + t * g;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (int64_t j = 0; j < g; j += 16) {
            __m128i b = _mm_loadu_si128((const __m128i *)(qg + j));
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_loadu_ps(xg + j), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))),
                                 _mm256_loadu_ps(xg + j + 8), a1);
        }
        if (t & 1) v1 = _mm256_fmadd_ps(_mm256_set1_ps(so[t]), _mm256_add_ps(a0, a1), v1);
        else v0 = _mm256_fmadd_ps(_mm256_set1_ps(so[t]), _mm256_add_ps(a0, a1), v0);
        off += (oo ? oo[t] : zero * so[t]) * xsum[t];
    }
    return off + hsum8(_mm256_add_ps(v0, v1));
}
#endif

/* The fp32 weight (n, k) of affine codes: out = scale * q + offset per group of g columns, a
 * multiply then an add (no fused multiply-add: -ffp-contract=off), the rounding of
 * kquants.dequantize, so the result is bit-identical; for many-row products (prefill, batched
 * decode), which then call the BLAS. */
/* ---------------------------------------------------------------------------------------------
 * 4-bit code book (NF4 / FP4, bitsandbytes' layout) to a dense weight, for products of many rows
 * (prefill, training): w[i] = code[q(i)] * absmax[i / bs] for the n values, written as fp32, or as
 * bf16 (round to nearest even: torch's .to(torch.bfloat16) of the fp32 product) when bf16 != 0, so
 * that no fp32 copy and no index tensor are made on the way (a QLoRA step dequantizes every frozen
 * layer two or three times). Requires bs % 2 == 0 (every block starts on a byte).
 */
static inline uint16_t mp_bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

void mp_code4_dequant(const uint8_t *q, const float *absmax, const float *code, int64_t n, int64_t bs,
                      void *out, int64_t bf16) {
    const int64_t blocks = (n + bs - 1) / bs;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const float s = absmax[b];
        float pair[32];  /* the block's code book scaled once: code[c] * s, high nibble then low */
        for (int c = 0; c < 16; c++) pair[c] = code[c] * s;
        const int64_t lo = b * bs, hi = lo + bs < n ? lo + bs : n;
        for (int64_t i = lo; i < hi; i++) {
            const uint8_t byte = q[i >> 1];
            const float v = pair[(i & 1) ? (byte & 0xF) : (byte >> 4)];
            if (bf16) ((uint16_t *)out)[i] = mp_bf16_rne(v);
            else ((float *)out)[i] = v;
        }
    }
}

void mp_affine_dequant(const uint8_t *q, const float *scale, const float *offset, int64_t n, int64_t k,
                       int64_t g, float *out) {
    const int64_t ng = k / g;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < n; o++)
        for (int64_t t = 0; t < ng; t++) {
            const float s = scale[o * ng + t], f = offset[o * ng + t];
            const uint8_t *qo = q + o * k + t * g;
            float *w = out + o * k + t * g;
            for (int64_t j = 0; j < g; j++) w[j] = (float)qo[j] * s + f;
        }
}

/* ---------------------------------------------------------------------------------------------
 * Affine codes (every GGUF block type, decoded once by core/kquants.affine), fp32 activations.
 *   x      fp32 (m, k), m <= MP_MAX_ROWS
 *   q      uint8 (n, k): one code per weight
 *   scale, offset  fp32 (n, k / g): weight = scale * q + offset in each group of g columns
 *   y      fp32 (m, n) = x @ W^T = sum over groups of scale * (x . q) + offset * sum(x)
 * Requires g % 16 == 0 and k % g == 0 (GGUF rows are whole blocks).
 */
void mp_affine_gemv(const float *x, int64_t m, int64_t k, const uint8_t *q, const float *scale,
                    const float *offset, int64_t n, int64_t g, float *y) {
    const int64_t ng = k / g;
    float *xsum = malloc(sizeof(float) * (size_t)(m * ng));
    for (int64_t r = 0; r < m; r++)
        for (int64_t t = 0; t < ng; t++) {
            float s = 0.0f;
            for (int64_t j = 0; j < g; j++) s += x[r * k + t * g + j];
            xsum[r * ng + t] = s;
        }
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < n; o++) {
        const uint8_t *qo = q + o * k;
        float acc[MP_MAX_ROWS] = {0};
#ifdef MP_AVX2
        /* scale * (x . q) summed as vectors across the row's groups: one horizontal sum per row */
        __m256 vacc[MP_MAX_ROWS];
        for (int64_t r = 0; r < m; r++) vacc[r] = _mm256_setzero_ps();
        if (g % 16 == 0 && m == 1) {  /* decode */
            y[o] = mp_affine_dot1(qo, scale + o * ng, offset + o * ng, 0.0f, x, xsum, ng, g);
            continue;
        }
        if (g % 16 == 0) {
            for (int64_t t = 0; t < ng; t++) {
                const uint8_t *qg = qo + t * g;
                const float so = scale[o * ng + t], oo = offset[o * ng + t];
                const __m256 vs = _mm256_set1_ps(so);
                for (int64_t r = 0; r < m; r++) {
                    const float *xg = x + r * k + t * g;
                    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                    for (int64_t j = 0; j < g; j += 16) {
                        __m128i b = _mm_loadu_si128((const __m128i *)(qg + j));
                        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
                        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
                        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xg + j), a0);
                        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + j + 8), a1);
                    }
                    vacc[r] = _mm256_fmadd_ps(vs, _mm256_add_ps(a0, a1), vacc[r]);
                    acc[r] += oo * xsum[r * ng + t];
                }
            }
            for (int64_t r = 0; r < m; r++) y[r * n + o] = acc[r] + hsum8(vacc[r]);
            continue;
        }
#endif
        for (int64_t t = 0; t < ng; t++) {
            const uint8_t *qg = qo + t * g;
            const float so = scale[o * ng + t], oo = offset[o * ng + t];
            for (int64_t r = 0; r < m; r++) {
                const float *xg = x + r * k + t * g;
                float dot = 0.0f;
                for (int64_t j = 0; j < g; j++) dot += (float)qg[j] * xg[j];
                acc[r] += so * dot + oo * xsum[r * ng + t];
            }
        }
        for (int64_t r = 0; r < m; r++) y[r * n + o] = acc[r];
    }
    free(xsum);
}

/* ---------------------------------------------------------------------------------------------
 * 2:4-sparse: y (m, n) = x (m, k) @ W (n, k)^T with W stored as core/sparsity.py's pack_24 writes it:
 * values (n, k / 2), the kept two of every four inputs, fp32, bf16 or fp16 (vt 0, 1, 2: a model whose
 * dtype is bf16 / fp16 keeps them so), and meta (n, k / 8) bytes, a 2-bit position per value (group t's two in
 * bits 4t .. 4t + 3 of its row's bit stream). Written by hand: torch's semi-structured sparse tensors
 * run on CUDA only. Half the values plus 1/16 of a bit a weight in positions: 17/32 of the dense fp32
 * rows' traffic, 9/32 with half values. k a multiple of 8. Half values widen exactly to fp32 (bf16:
 * a shift; fp16: F16C's conversion), so every storage gives the same sums for the same numbers.
 * AVX-512: 32 inputs a step, their 16 kept values multiply x picked by one two-register permute
 * (lane l's position: bits 2l, 2l + 1 of the step's 32 meta bits, plus 4 * (l / 2)); AVX2: 16 inputs
 * a step through a gather of x; the plain loop everywhere else.
 */
static inline float mp_sp_at(const void *v, int64_t i, int vt) {
    if (vt == 0) return ((const float *)v)[i];
    if (vt == 2) return mp_half(((const uint16_t *)v)[i]);
    const uint32_t u = (uint32_t)((const uint16_t *)v)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline __attribute__((always_inline)) float mp_sparse24_dot_t(const void *v, int vt, const uint8_t *meta,
                                                                       const float *x, int64_t k) {
    int64_t j = 0;  /* input column */
    float acc = 0.0f;
#if defined(MP_VNNI512)
#define MP_SP_HALF16(i) _mm256_loadu_si256((const __m256i *)((const uint16_t *)v + (i)))
#define MP_SP_LOAD16(i) (vt == 1 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(MP_SP_HALF16(i)), 16)) \
                         : vt == 2 ? _mm512_cvtph_ps(MP_SP_HALF16(i)) : _mm512_loadu_ps((const float *)v + (i)))
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i base = _mm512_slli_epi32(_mm512_srli_epi32(lane, 1), 2), shift = _mm512_slli_epi32(lane, 1);
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; j + 64 <= k; j += 64) {
        uint32_t m0, m1;
        memcpy(&m0, meta + j / 8, 4);
        memcpy(&m1, meta + j / 8 + 4, 4);
        const __m512i i0 = _mm512_add_epi32(base, _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)m0), shift),
                                                                    _mm512_set1_epi32(3)));
        const __m512i i1 = _mm512_add_epi32(base, _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)m1), shift),
                                                                    _mm512_set1_epi32(3)));
        const __m512 x0 = _mm512_permutex2var_ps(_mm512_loadu_ps(x + j), i0, _mm512_loadu_ps(x + j + 16));
        const __m512 x1 = _mm512_permutex2var_ps(_mm512_loadu_ps(x + j + 32), i1, _mm512_loadu_ps(x + j + 48));
        a0 = _mm512_fmadd_ps(MP_SP_LOAD16(j / 2), x0, a0);
        a1 = _mm512_fmadd_ps(MP_SP_LOAD16(j / 2 + 16), x1, a1);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#undef MP_SP_LOAD16
#undef MP_SP_HALF16
#elif defined(MP_AVX2)
    const __m256i lane = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i base = _mm256_slli_epi32(_mm256_srli_epi32(lane, 1), 2), shift = _mm256_slli_epi32(lane, 1);
    __m256 a0 = _mm256_setzero_ps();
    for (; j + 16 <= k; j += 16) {
        uint16_t m0;
        memcpy(&m0, meta + j / 8, 2);
        const __m256i idx = _mm256_add_epi32(base, _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(m0), shift),
                                                                     _mm256_set1_epi32(3)));
#define MP_SP_HALF8 _mm_loadu_si128((const __m128i *)((const uint16_t *)v + j / 2))
        const __m256 vv = vt == 1 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(MP_SP_HALF8), 16))
                          : vt == 2 ? _mm256_cvtph_ps(MP_SP_HALF8) : _mm256_loadu_ps((const float *)v + j / 2);
#undef MP_SP_HALF8
        a0 = _mm256_fmadd_ps(vv, _mm256_i32gather_ps(x + j, idx, 4), a0);
    }
    acc = hsum8(a0);
#endif
    for (; j < k; j += 8) {  /* 8 inputs: 4 values, one meta byte */
        const uint8_t b = meta[j / 8];
        const int64_t i = j / 2;
        acc += mp_sp_at(v, i, vt) * x[j + (b & 3)] + mp_sp_at(v, i + 1, vt) * x[j + ((b >> 2) & 3)];
        acc += mp_sp_at(v, i + 2, vt) * x[j + 4 + ((b >> 4) & 3)] + mp_sp_at(v, i + 3, vt) * x[j + 4 + (b >> 6)];
    }
    return acc;
}

/* Row o's dot product: v points at the layer's values (vt: 0 fp32, 1 bf16, 2 fp16), the branch taken once
 * a row, each value type a copy of the loop with vt a constant. */
static inline float mp_sparse24_dot(const void *v, int vt, const uint8_t *meta, int64_t o, const float *x, int64_t k) {
    if (vt == 1) return mp_sparse24_dot_t((const uint16_t *)v + o * (k / 2), 1, meta + o * (k / 8), x, k);
    if (vt == 2) return mp_sparse24_dot_t((const uint16_t *)v + o * (k / 2), 2, meta + o * (k / 8), x, k);
    return mp_sparse24_dot_t((const float *)v + o * (k / 2), 0, meta + o * (k / 8), x, k);
}

void mp_sparse24_gemv(const float *x, int64_t m, int64_t k, const void *v, const uint8_t *meta, int64_t n, float *y,
                      int64_t vt) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < n; o++)
        for (int64_t r = 0; r < m; r++) y[r * n + o] = mp_sparse24_dot(v, (int)vt, meta, o, x + r * k, k);
}
