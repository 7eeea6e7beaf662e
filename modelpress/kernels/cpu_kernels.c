/* modelpress CPU kernels: matrix-vector products on compressed weights, for decode (few rows).
 *
 * Written by hand because no library on PyPI offers them for a CPU: torch's own weight-only
 * kernels cover affine int4/int8 with bf16 activations only, bitsandbytes' CPU path dequantizes
 * NF4 to a dense matrix, and torch._int_mm takes ~40 ms for one token through the 120 int8
 * layers of four of the default model's shapes here (fp32 F.linear: 12 ms).
 *
 * Built at first use by modelpress/kernels/__init__.py (cc -O3 -march=native -fopenmp) and
 * called through ctypes; OpenMP resolves to the libgomp torch already loaded, so the kernels and
 * torch share one thread pool. Every function has a plain C loop beside its AVX2 one (any x86-64
 * since 2013); the tests check both against torch references.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(MP_NO_SIMD)
#include <immintrin.h>
#define MP_AVX2 1
#endif
/* AVX-512 with VNNI (Intel since Ice Lake, AMD since Zen 4): the int8 block dots 64 bytes at a time,
 * vpdpbusd / vpdpwssd fusing the multiply and the sums; the same integers as the AVX2 loops */
#if defined(MP_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512VNNI__) && !defined(MP_NO_AVX512)
#define MP_VNNI512 1
#endif

/* Hands back the calling thread's OpenMP workers (its thread pool; the next parallel region on that
 * thread starts a new one). libgomp gives every thread that starts parallel regions a pool of its
 * own, and once it manages more threads than there are CPUs it stops spinning between regions
 * (1000 spins instead of ~300000): its workers sleep and are woken by the kernel at every region.
 * An engine stepped on a thread of its own, beside the pool that loading the model made on the
 * main thread, ran a 32 x 128 batch ~20 % slower so (80000 context switches against 3). */
/* What a layer's weights are, one numbering for every kernel that takes a `kind` (mirrored once in
 * Python: kernels/__init__.py KIND):
 *   MP_F32     0  fp32 rows                           MP_Q5_0    4  GGUF Q5_0 blocks (22 bytes / 32)
 *   MP_AFFINE  1  uint8 codes + fp32 scale / offset   MP_Q4_K    5  GGUF Q4_K blocks (144 bytes / 256)
 *   MP_Q4_0    2  GGUF Q4_0 blocks (18 bytes / 32)    MP_Q6_K    6  GGUF Q6_K blocks (210 bytes / 256)
 *   MP_Q8_0    3  GGUF Q8_0 blocks (34 bytes / 32)    MP_Q8_0X16 7  Q8_0 repacked 16 rows at a time */
enum { MP_F32 = 0, MP_AFFINE = 1, MP_Q4_0 = 2, MP_Q8_0 = 3, MP_Q5_0 = 4, MP_Q4_K = 5, MP_Q6_K = 6, MP_Q8_0X16 = 7 };

extern int omp_pause_resource_all(int kind) __attribute__((weak));  /* OpenMP 5.0: libgomp since GCC 9 */
void mp_release_threads(void) {
    if (omp_pause_resource_all) omp_pause_resource_all(2);   /* omp_pause_hard */
}

#define MP_MAX_ROWS 8
/* the per-row work (rounding activations, norms, rotary, SiLU) runs in parallel from this many rows */
#define MP_PAR_ROWS 16

int mp_max_rows(void) { return MP_MAX_ROWS; }

int mp_simd(void) { /* 2: AVX2 and the AVX-512 VNNI block dots, 1: the AVX2 loops, 0: the plain C ones */
#if defined(MP_VNNI512)
    return 2;
#elif defined(MP_AVX2)
    return 1;
#else
    return 0;
#endif
}

#ifdef MP_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hsum8_max(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int32_t hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* 32 code-book floats for 32 4-bit indices (one per byte of idx) with byte shuffles only:
 * tb[b] holds byte b of each of the 16 entries, in both lanes; pshufb looks up each byte, and two
 * rounds of unpacking reassemble the floats. Unpacking works inside 128-bit lanes, so f[t] holds
 * (lane 0) the entries of idx bytes 8t/2.. of lane 0, (lane 1) the same of lane 1; the caller
 * orders its activations to match (see mp_code4_gemv). */
static inline void lut32(const __m256i tb[4], __m256i idx, __m256 f[4]) {
    __m256i b0 = _mm256_shuffle_epi8(tb[0], idx), b1 = _mm256_shuffle_epi8(tb[1], idx);
    __m256i b2 = _mm256_shuffle_epi8(tb[2], idx), b3 = _mm256_shuffle_epi8(tb[3], idx);
    __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
    __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
    f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
    f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
    f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
    f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}
#endif

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
 * GGUF quantization: the weighted grid search of make_qx_quants (ggml-quants.c, rmse_type 1),
 * per block of n <= 64 values, bit for bit: the same float operations in the same order (the
 * library is built with -ffp-contract=off, as ggml's ISO C build is, so no multiply-add fuses),
 * rounding half to even (rintf in the default rounding mode, like ggml's nearest_int).
 *   x      fp32 (B, n);  qw  fp32 (B, n) importance, or NULL: x^2
 *   scale  fp32 (B);     L   uint8 (B, n) in [0, 2 nmax)
 * core/kquants.make_qx_quants is the torch reference (tests compare both with llama.cpp).
 */
static inline int mp_qx_level(float v, int nmax) {
    int l = (int)rintf(v);  /* inlined (roundss); lrintf would call libm */
    return l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
}

void mp_make_qx_quants(const float *x, const float *qw, int64_t B, int64_t n, int64_t nmax, float *scale,
                       uint8_t *L) {
    const int nm = (int)nmax;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * n;
        const float *wb = qw ? qw + b * n : NULL;
        uint8_t *Lb = L + b * n;
        float amax = 0.0f, max = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            float ax = fabsf(xb[i]);
            if (ax > amax) { amax = ax; max = xb[i]; }
        }
        if (amax < 1e-15f) {
            memset(Lb, 0, (size_t)n);
            scale[b] = 0.0f;
            continue;
        }
        float sumlx = 0.0f, suml2 = 0.0f;
        float iscale = (float)(-nm) / max;
        for (int64_t i = 0; i < n; i++) {
            int l = mp_qx_level(iscale * xb[i], nm);
            Lb[i] = (uint8_t)(l + nm);
            float w = wb ? wb[i] : xb[i] * xb[i];
            sumlx += w * xb[i] * (float)l;
            suml2 += w * (float)l * (float)l;
        }
        float best_scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
        float best = best_scale * sumlx;
        for (int is = -9; is <= 9; is++) {
            if (is == 0) continue;
            iscale = -((float)nm + 0.1f * (float)is) / max;
            sumlx = suml2 = 0.0f;
            for (int64_t i = 0; i < n; i++) {
                int l = mp_qx_level(iscale * xb[i], nm);
                float w = wb ? wb[i] : xb[i] * xb[i];
                sumlx += w * xb[i] * (float)l;
                suml2 += w * (float)l * (float)l;
            }
            if (suml2 > 0.0f && sumlx * sumlx > best * suml2) {
                for (int64_t i = 0; i < n; i++) Lb[i] = (uint8_t)(mp_qx_level(iscale * xb[i], nm) + nm);
                best_scale = sumlx / suml2;
                best = best_scale * sumlx;
            }
        }
        scale[b] = best_scale;
    }
}

/* The min + scale search of make_qkx2_quants / make_qkx3_quants (ggml-quants.c; one search, the
 * weights given), per block of n <= 64, bit for bit as above. `min` follows the search: a better
 * candidate moves it, and the later candidates' grids start from it, as in the reference.
 *   x, w     fp32 (B, n)
 *   scale    fp32 (B);  the_min  fp32 (B) = -min (>= 0);  L  uint8 (B, n) in [0, nmax]
 */
static inline int mp_k_level(float v, int nmax) {
    int l = (int)rintf(v);  /* inlined (roundss); lrintf would call libm */
    return l < 0 ? 0 : (l > nmax ? nmax : l);
}

void mp_make_qkx2_quants(const float *x, const float *w, int64_t B, int64_t n, int64_t nmax, float rmin, float rdelta,
                         int64_t nstep, int64_t use_mad, float *scale_out, float *the_min, uint8_t *L) {
    const int nm = (int)nmax;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * n, *wb = w + b * n;
        uint8_t *Lb = L + b * n;
        uint8_t aux[64];
        float lo = xb[0], hi = xb[0], sum_w = wb[0], sum_x = sum_w * xb[0];
        for (int64_t i = 1; i < n; i++) {
            if (xb[i] < lo) lo = xb[i];
            if (xb[i] > hi) hi = xb[i];
            sum_w += wb[i];
            sum_x += wb[i] * xb[i];
        }
        if (lo > 0) lo = 0;
        if (hi == lo) {
            memset(Lb, 0, (size_t)n);
            scale_out[b] = 0.0f;
            the_min[b] = -lo;
            continue;
        }
        float mn = lo;
        float iscale = (float)nm / (hi - mn);
        float scale = 1 / iscale;
        float best = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            int l = mp_k_level(iscale * (xb[i] - mn), nm);
            Lb[i] = (uint8_t)l;
            float diff = scale * (float)l + mn - xb[i];
            diff = use_mad ? fabsf(diff) : diff * diff;
            best += wb[i] * diff;
        }
        for (int64_t is = 0; is <= nstep && nstep >= 1; is++) {
            iscale = (rmin + rdelta * (float)is + (float)nm) / (hi - mn);
            float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
            for (int64_t i = 0; i < n; i++) {
                int l = mp_k_level(iscale * (xb[i] - mn), nm);
                aux[i] = (uint8_t)l;
                float wl = wb[i] * (float)l;
                sum_l += wl;
                sum_l2 += wl * (float)l;
                sum_xl += wl * xb[i];
            }
            float D = sum_w * sum_l2 - sum_l * sum_l;
            if (D > 0) {
                float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
                float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
                if (this_min > 0) {
                    this_min = 0;
                    this_scale = sum_xl / sum_l2;
                }
                float cur = 0.0f;
                for (int64_t i = 0; i < n; i++) {
                    float diff = this_scale * (float)aux[i] + this_min - xb[i];
                    diff = use_mad ? fabsf(diff) : diff * diff;
                    cur += wb[i] * diff;
                }
                if (cur < best) {
                    memcpy(Lb, aux, (size_t)n);
                    best = cur;
                    scale = this_scale;
                    mn = this_min;
                }
            }
        }
        scale_out[b] = scale;
        the_min[b] = -mn;
    }
}

/* fp32 -> fp16 bits, round to nearest even (what ggml's GGML_FP32_TO_FP16 gives on x86). */
static inline uint16_t mp_fp16_bits(float f) {
#ifdef MP_AVX2
    return (uint16_t)_cvtss_sh(f, 0);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u)); /* inf, nan */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);     /* rounds past 65504: inf */
    if (a < 0x38800000u) {                                         /* below 2^-14: a subnormal half */
        float v;
        memcpy(&v, &a, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(v * 16777216.0f)); /* in units of 2^-24 */
    }
    uint32_t h = (a - 0x38000000u) >> 13, rest = a & 0x1fffu;     /* rebias 127 -> 15, keep 10 bits */
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
#endif
}

/* The reference quantizers of the legacy types without a search (quantize_row_q4_0_ref,
 * _q5_0_ref, _q8_0_ref in ggml-quants.c), writing the GGUF blocks directly:
 *   MP_Q4_0  d fp16 | qs[16]: code j low nibble, code j + 16 high nibble     (18 bytes)
 *   MP_Q5_0  d fp16 | qh u32: bit 4 of code j at bit j | qs[16] as Q4_0      (22 bytes)
 *   MP_Q8_0  d fp16 | qs int8[32]                                             (34 bytes)
 * x fp32 (nblocks, 32). Q4_0 / Q5_0: d = (the value of largest magnitude, first of ties) / -8
 * or -16, code = min(15 or 31, (int8) trunc(x / d + 8.5 or 16.5)); Q8_0: d = max |x| / 127,
 * code = roundf(x / d) (half away from zero).
 */
void mp_quantize_legacy(const float *x, int64_t nblocks, int64_t kind, uint8_t *out) {
    const int64_t size = kind == MP_Q4_0 ? 18 : (kind == MP_Q5_0 ? 22 : 34);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const float *xb = x + b * 32;
        uint8_t *o = out + b * size;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float ax = fabsf(xb[j]);
            if (kind == MP_Q8_0) { amax = amax > ax ? amax : ax; continue; }
            if (amax < ax) { amax = ax; max = xb[j]; }
        }
        const float d = kind == MP_Q8_0 ? amax / 127 : max / (kind == MP_Q4_0 ? -8 : -16);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t dh = mp_fp16_bits(d);
        memcpy(o, &dh, 2);
        if (kind == MP_Q8_0) {
            for (int j = 0; j < 32; j++) o[2 + j] = (uint8_t)(int8_t)(int32_t)roundf(xb[j] * id);
            continue;
        }
        const int top = kind == MP_Q4_0 ? 15 : 31;
        const float half = kind == MP_Q4_0 ? 8.5f : 16.5f;
        uint32_t qh = 0;
        uint8_t *qs = o + (kind == MP_Q4_0 ? 2 : 6);
        for (int j = 0; j < 16; j++) {
            int q0 = (int8_t)(int32_t)(xb[j] * id + half), q1 = (int8_t)(int32_t)(xb[j + 16] * id + half);
            q0 = q0 < top ? q0 : top;
            q1 = q1 < top ? q1 : top;
            qs[j] = (uint8_t)((q0 & 0x0F) | ((q1 & 0x0F) << 4));
            qh |= ((uint32_t)(q0 & 0x10) >> 4) << j;
            qh |= ((uint32_t)(q1 & 0x10) >> 4) << (j + 16);
        }
        if (kind == MP_Q5_0) memcpy(o + 2, &qh, 4);
    }
}

/* ---------------------------------------------------------------------------------------------
 * One decode step of a Llama-family model for B sequences (one new token each), every block in
 * one call (batch-1 decode spent ~40 ms of a ~58 ms token in ~1500 small torch operations; here
 * each layer is a few OpenMP loops). The caller embeds the tokens, gives the rotary cos / sin of
 * their positions (the model's own rotary module computes them), and applies the final norm and
 * the output head to the hidden states this returns in x.
 *
 *   linear: kind 0 fp32 weight (n, k); kind 1 affine codes (mp_affine_gemv's layout: uint8
 *           (n, k), scale / offset fp32 (n, k / g)); kinds 3 - 6 Q8_0 / Q5_0 / Q4_K / Q6_K blocks as
 *           stored, int8 activations (mp_block_gemv)
 *   layer:  the two RMSNorm weights, q k v o gate up down, the layer's paged caches
 *           (num_blocks * block_size slots, n_kv, head_dim), fp32
 *   x       fp32 (B, d): the tokens' embeddings in, the last block's outputs out
 *   cos, sin fp32 (B, head_dim): each token's rotary values
 *   slots   int64 (B, lmax): sequence b's positions 0 .. lens[b] - 1 live in slots[b, p]; its new
 *           token is the last (its key and value are written to slots[b, lens[b] - 1])
 *
 * Each sequence's arithmetic is the same whatever B is (every product and sum of row b is computed
 * as for B = 1), so a sequence's tokens do not depend on the others in its batch; the weights of an
 * output row are read once for all B rows.
 * Numerics as transformers' Llama in fp32 (RMSNorm: x * 1 / sqrt(mean(x^2) + eps) * weight; rotary
 * as rotate_half; softmax(q k / sqrt(head_dim)); grouped heads: head h reads kv head
 * h / (n_heads / n_kv); SiLU(gate) * up), the sums in another order.
 */
typedef struct {
    int64_t kind, n, k, g;
    const void *w;
    const float *scale, *offset;   /* offset NULL: symmetric codes, offset = zero * scale */
    float zero;
} mp_linear;

typedef struct {
    const float *attn_norm, *ffn_norm;
    mp_linear q, k, v, o, gate, up, down;
    void *k_cache, *v_cache;       /* fp32, or fp16 (mp_llama_decode's kv_f16) */
} mp_layer;

/* Decode on GGUF Q8_0 / Q5_0 / Q4_K / Q6_K blocks with int8 activations, as llama.cpp's CPU path
 * multiplies them. For Q8_0 / Q5_0, x is rounded per block of 32 to int8 with an fp16 scale (ggml's
 * quantize_row_q8_0 on x86: d = amax / 127, q = round(x * 127 / amax), halves to even); for Q4_K / Q6_K per
 * 256 with an fp32 scale and the sums of each 16 (ggml's quantize_row_q8_K: d = -max / 127 with max
 * the value of largest magnitude, q = nearest_int(x / d), halves to even), and each block's dot is an
 * exact integer sum times d_w * d_x. The blocks are read as stored: 34 (Q8_0), 22 (Q5_0), 18 (Q4_K),
 * 26.25 (Q6_K) bytes per 32 weights, against 36-48 for a code byte and fp32 scales, so decode,
 * bound by memory bandwidth here, reads less.
 *   Q8_0: d fp16 | q int8[32]                       w = d * q
 *   Q5_0: d fp16 | qh u32 | qs[16]                  w = d * ((nibble | bit << 4) - 16); code j: low nibble
 *         of qs[j] and bit j of qh, code j + 16: high nibble of qs[j] and bit j + 16 of qh */
static inline float mp_half(uint16_t h) {
#ifdef MP_AVX2
    return _cvtsh_ss(h);
#else
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
#endif
}

/* ggml's quantize_row_q8_0 as its x86 build runs it (the Q8_0 / Q5_0 activations): per 32,
 * q = round(x * (127 / amax)) with halves to even, d = amax / 127 kept in fp16. (Its portable
 * quantize_row_q8_0_ref multiplies by 1 / d and rounds halves away from zero, other integers for a
 * few values in a thousand. Int8 rounding makes a model's logits jump with such details: on the
 * Q8_0 file, 96 positions, the two roundings' logits differ by 0.18 on average, as ours and
 * llama.cpp's do (0.16), while the F32 file's differ from llama.cpp's by 0.003.) */
static void mp_quantize_x8(const float *x, int64_t k, int8_t *q, float *d) {
    for (int64_t b = 0; b < k / 32; b++) {
        const float *xb = x + b * 32;
#ifdef MP_AVX2
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
        }
        const float amax = hsum8_max(m), id = amax != 0.0f ? 127.0f / amax : 0.0f;
        __m256i r[4];
        for (int i = 0; i < 4; i++)
            r[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(id)),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        /* packs interleave the 128-bit lanes: put the 32 bytes back in order */
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
        _mm256_storeu_si256((__m256i *)(q + b * 32),
                            _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < 32; j++) q[b * 32 + j] = (int8_t)nearbyintf(xb[j] * id);
#endif
        d[b] = round_fp16(amax / 127.0f);
    }
}

/* ggml's quantize_row_q8_K_ref: per 256, the value of largest magnitude mx (the first such), iscale =
 * -127 / mx, q = min(127, nearest_int(iscale * x)), d = 1 / iscale (fp32); sum16: each 16's sum of q. */
static void mp_quantize_x8k(const float *x, int64_t k, int8_t *q, float *d, int32_t *sum16) {
    for (int64_t b = 0; b < k / 256; b++) {
        const float *xb = x + b * 256;
        int8_t *qb = q + b * 256;
        float amax = 0.0f, mx = 0.0f;
        for (int j = 0; j < 256; j++)
            if (fabsf(xb[j]) > amax) { amax = fabsf(xb[j]); mx = xb[j]; }
        if (amax == 0.0f) {
            d[b] = 0.0f;
            memset(qb, 0, 256);
            for (int g = 0; g < 16; g++) sum16[b * 16 + g] = 0;
            continue;
        }
        const float iscale = -127.0f / mx;
        for (int j = 0; j < 256; j++) {
            const int v = (int)rintf(iscale * xb[j]);
            qb[j] = (int8_t)(v > 127 ? 127 : v);
        }
        for (int g = 0; g < 16; g++) {
            int32_t sum = 0;
            for (int j = 0; j < 16; j++) sum += qb[g * 16 + j];
            sum16[b * 16 + g] = sum;
        }
        d[b] = 1.0f / iscale;
    }
}

/* activation rows are packed (AVX-512 kinds 3, 4; kind 7) and multiplied in groups of this many */
#define MP_GROUP 16

/* x (B rows of k) rounded for a block kind's dot (mp_acts_make), read by mp_block_rows */
typedef struct {
    int8_t *q;     /* the codes, row stride k */
    float *d;      /* scales per 32 (kind 3, 4; row stride k / 32) or per 256 (kind 5, 6; k / 256) */
    int32_t *s16;  /* kind 5, 6: each 16's sum of codes, row stride k / 16 */
    uint8_t *p;    /* the AVX-512 build's kind 3, 4: codes and scales packed (below) instead */
} mp_acts;

#ifdef MP_VNNI512
/* The AVX-512 Q8_0 / Q5_0 dots read two blocks a step: 64 codes + 128 as unsigned bytes (vpdpbusd
 * multiplies unsigned by signed bytes; 128 x the weights' sum is taken off again), then the two
 * scales as 16 floats (8 lanes each). Rows go in groups of MP_GROUP, and the group's rows lie side
 * by side step by step: step t of row r of group g at p + (g * steps + t) * MP_STEP + r * 128, so a
 * dot over up to MP_GROUP rows reads from one pointer at fixed offsets. An odd last block's step has
 * codes 0 and scales 0 in its upper half. */
#define MP_STEP (MP_GROUP * 128)
static inline int64_t mp_steps(int64_t k) { return (k / 32 + 1) / 2; }
static inline const uint8_t *mp_packed_row(const mp_acts *a, int64_t k, int64_t b) {
    return a->p + (b / MP_GROUP * mp_steps(k)) * MP_STEP + b % MP_GROUP * 128;
}
#endif

/* Kind 7 (Q8_0 rows packed 16 at a time, mp_pack_q8_0x16) takes the activations per 32 as kind 3,
 * packed for the broadcasts its dot makes: rows in groups of MP_GROUP, and per group and block of
 * 32, at p + (g * nb + b) * MP_X16_BLOCK: 8 x 64 bytes, the j-th holding codes 4j .. 4j + 3 of the
 * group's rows side by side (row r at 4r), then their fp32 scales, then -128 x each row's sum of
 * codes (int32). A dot over up to MP_GROUP rows reads them from one pointer at fixed offsets. */
#define MP_X16_BLOCK (MP_GROUP * 40)

static void mp_acts_make(int64_t kind, const float *x, int64_t B, int64_t k, mp_acts *a) {
    memset(a, 0, sizeof *a);
    if (kind == MP_Q8_0X16) {
        const int64_t nb = k / 32;
        a->p = calloc((size_t)((B + MP_GROUP - 1) / MP_GROUP * nb), MP_X16_BLOCK);
#pragma omp parallel for schedule(static) if (B >= MP_PAR_ROWS)
        for (int64_t i = 0; i < B; i++) {
            int8_t q[k];
            float d[nb];
            mp_quantize_x8(x + i * k, k, q, d);
            const int64_t r = i % MP_GROUP;
            for (int64_t b = 0; b < nb; b++) {
                uint8_t *blk = a->p + (i / MP_GROUP * nb + b) * MP_X16_BLOCK;
                int32_t sum = 0;
                for (int j = 0; j < 8; j++) {
                    memcpy(blk + 64 * j + 4 * r, q + 32 * b + 4 * j, 4);
                    for (int t = 0; t < 4; t++) sum += q[32 * b + 4 * j + t];
                }
                const int32_t comp = -128 * sum;
                memcpy(blk + 512 + 4 * r, &d[b], 4);
                memcpy(blk + 576 + 4 * r, &comp, 4);
            }
        }
        return;
    }
#ifdef MP_VNNI512
    if (kind <= MP_Q5_0) {
        const int64_t nb = k / 32, steps = mp_steps(k);
        a->p = malloc((size_t)((B + MP_GROUP - 1) / MP_GROUP * steps * MP_STEP));
#pragma omp parallel for schedule(static) if (B >= MP_PAR_ROWS)
        for (int64_t b = 0; b < B; b++) {
            int8_t q[2 * steps * 32];
            float d[2 * steps];
            mp_quantize_x8(x + b * k, k, q, d);
            memset(q + k, 0, (size_t)(2 * steps * 32 - k));
            if (nb % 2) d[nb] = 0.0f;
            uint8_t *row = (uint8_t *)mp_packed_row(a, k, b);
            for (int64_t t = 0; t < steps; t++) {
                _mm512_storeu_si512(row + t * MP_STEP, _mm512_xor_si512(_mm512_loadu_si512(q + 64 * t), _mm512_set1_epi8((char)0x80)));
                _mm512_storeu_ps(row + t * MP_STEP + 64, _mm512_insertf32x8(_mm512_set1_ps(d[2 * t]), _mm256_set1_ps(d[2 * t + 1]), 1));
            }
        }
        return;
    }
#endif
    const int64_t nd = kind <= MP_Q5_0 ? k / 32 : k / 256;
    a->q = malloc((size_t)(B * k));
    a->d = malloc(sizeof(float) * (size_t)(B * nd));
    if (kind >= MP_Q4_K) a->s16 = malloc(sizeof(int32_t) * (size_t)(B * (k / 16)));
#pragma omp parallel for schedule(static) if (B >= MP_PAR_ROWS)
    for (int64_t b = 0; b < B; b++) {
        if (kind <= MP_Q5_0) mp_quantize_x8(x + b * k, k, a->q + b * k, a->d + b * nd);
        else mp_quantize_x8k(x + b * k, k, a->q + b * k, a->d + b * nd, a->s16 + b * (k / 16));
    }
}

/* which of mp_linears_apply's roundings of x a block kind reads: per 32 (3, 4), per 256 (5, 6),
 * per 32 packed for kind 7 */
static inline int mp_acts_slot(int64_t kind) { return kind == MP_Q8_0X16 ? 2 : kind >= MP_Q4_K; }

static void mp_acts_free(mp_acts *a) {
    free(a->q);
    free(a->d);
    free(a->s16);
    free(a->p);
}

/* bytes per block and weights per block of the block kinds: 3 Q8_0, 4 Q5_0, 5 Q4_K, 6 Q6_K */
static inline int64_t mp_block_bytes(int64_t kind) { return kind == MP_Q8_0 ? 34 : kind == MP_Q5_0 ? 22 : kind == MP_Q4_K ? 144 : 210; }
static inline int64_t mp_block_len(int64_t kind) { return kind <= MP_Q5_0 || kind == MP_Q8_0X16 ? 32 : 256; }

/* Kind 7: Q8_0 rows (n a multiple of 16) packed 16 at a time for a dot that broadcasts 4 activation
 * bytes against 4 codes of each of 16 rows (vpdpbusd, the codes + 128 as its unsigned operand): per
 * group g of 16 rows and block b, at out + (g * nb + b) * 544: 8 x 64 bytes, the j-th holding codes
 * 4j .. 4j + 3 of the 16 rows side by side (row r at 4r), each + 128; then the 16 rows' fp16 scales.
 * As many bytes as the blocks. A block's dot for 16 rows is 8 vpdpbusd started from -128 x the
 * activations' sum (sum (w + 128) y - 128 sum y = sum w y, exactly), one conversion and one multiply-
 * add for 16 rows; the blocks as stored take ~5 operations per row and two blocks. */
#define MP_W16_BLOCK 544
void mp_pack_q8_0x16(const uint8_t *w, int64_t n, int64_t k, uint8_t *out) {
    const int64_t nb = k / 32, rowb = nb * 34;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < n / 16; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *o = out + (g * nb + b) * MP_W16_BLOCK;
            for (int r = 0; r < 16; r++) {
                const uint8_t *blk = w + (g * 16 + r) * rowb + b * 34;
                for (int j = 0; j < 8; j++)
                    for (int t = 0; t < 4; t++) o[64 * j + 4 * r + t] = blk[2 + 4 * j + t] ^ 0x80;
                o[512 + 2 * r] = blk[0];
                o[513 + 2 * r] = blk[1];
            }
        }
}

/* 16 packed weight rows (wg: their group) against R activation rows of a packed group (xp: the first
 * of them) into ys[r][0 .. 16): per row and block the exact integer dot, times dw * dx, added in
 * block order; each row the same operations whatever R is. */
static inline __attribute__((always_inline)) void mp_x16_dotn(const uint8_t *wg, const uint8_t *xp, int64_t nb, int R,
                                                              float *const *ys) {
#ifdef MP_VNNI512
    __m512 acc[MP_GROUP];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, wg += MP_W16_BLOCK, xp += MP_X16_BLOCK) {
        __m512i w[8];
        for (int j = 0; j < 8; j++) w[j] = _mm512_loadu_si512(wg + 64 * j);
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wg + 512)));
        for (int r = 0; r < R; r++) {
            int32_t v;
            memcpy(&v, xp + 576 + 4 * r, 4);
            __m512i sum = _mm512_set1_epi32(v);
            for (int j = 0; j < 8; j++) {
                memcpy(&v, xp + 64 * j + 4 * r, 4);
                sum = _mm512_dpbusd_epi32(sum, w[j], _mm512_set1_epi32(v));
            }
            float dx;
            memcpy(&dx, xp + 512 + 4 * r, 4);
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(dx)), _mm512_cvtepi32_ps(sum), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(ys[r], acc[r]);
#else
    float acc[MP_GROUP][16];
    memset(acc, 0, sizeof acc);
    for (int64_t b = 0; b < nb; b++, wg += MP_W16_BLOCK, xp += MP_X16_BLOCK)
        for (int r = 0; r < R; r++) {
            int32_t comp;
            float dx;
            memcpy(&comp, xp + 576 + 4 * r, 4);
            memcpy(&dx, xp + 512 + 4 * r, 4);
            for (int l = 0; l < 16; l++) {
                int32_t sum = comp;
                for (int j = 0; j < 8; j++)
                    for (int t = 0; t < 4; t++) sum += (int32_t)wg[64 * j + 4 * l + t] * (int8_t)xp[64 * j + 4 * r + t];
                acc[r][l] += mp_half((uint16_t)(wg[512 + 2 * l] | wg[513 + 2 * l] << 8)) * dx * (float)sum;
            }
        }
    for (int r = 0; r < R; r++) memcpy(ys[r], acc[r], sizeof acc[r]);
#endif
}

#define MP_X16_DOTN(R)                                                                                               \
    static __attribute__((noinline)) void mp_x16_dot##R(const uint8_t *wg, const uint8_t *xp, int64_t nb, float *const *ys) { \
        mp_x16_dotn(wg, xp, nb, R, ys);                                                                             \
    }
MP_X16_DOTN(1)
MP_X16_DOTN(4)
MP_X16_DOTN(8)
MP_X16_DOTN(16)

/* Q4_K: d, dmin fp16 | scales[12]: eight 6-bit (scale, min) pairs | qs[128]: 32 bytes per 64 weights,
 * low nibbles sub-block 2j, high nibbles 2j + 1;  w = d * sc * q - dmin * m.
 * Q6_K: ql[128] | qh[64] | sc int8[16] | d fp16; per 128 weights h: quarter c (32 weights) takes
 * the low (c = 0, 1) or high (c = 2, 3) nibbles of ql[64h + 32 (c & 1) + l] and bits 2c, 2c + 1 of
 * qh[32h + l]; w = d * sc[(128h + 32c + l) / 16] * (q - 32). */
static inline void mp_k4_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* A Q4_K block's header: returns d; dmin, and the eight (scale, min) pairs into sc, m */
static inline float mp_q4k_head(const uint8_t *blk, float *dmin, int sc[8], int m[8]) {
    for (int j = 0; j < 8; j++) mp_k4_scale_min(blk + 4, j, &sc[j], &m[j]);
    *dmin = mp_half((uint16_t)(blk[2] | blk[3] << 8));
    return mp_half((uint16_t)(blk[0] | blk[1] << 8));
}

/* What R rows' sums lose to a K block's offsets, from the activations' sums of 16 (row stride ns)
 * and scales dy (row stride nd): Q4_K dmin x its mins m, Q6_K d x 32 x its scales sc (int8). */
static inline void mp_k_offsets(int64_t kind, const int *m, const int8_t *sc, float d, float dmin, const int32_t *s16,
                                const float *dy, int R, int64_t nd, int64_t ns, float *acc) {
    for (int r = 0; r < R; r++) {
        int32_t mins = 0;
        if (kind == MP_Q4_K) {
            for (int j = 0; j < 8; j++) mins += m[j] * (s16[r * ns + 2 * j] + s16[r * ns + 2 * j + 1]);
            acc[r] -= dmin * dy[r * nd] * (float)mins;
        } else {
            for (int g = 0; g < 16; g++) mins += sc[g] * s16[r * ns + g];
            acc[r] -= d * dy[r * nd] * (float)(32 * mins);
        }
    }
}

/* R (1 to 4) activation rows rounded per 256 (xq, xd, xs16 with row strides k, k / 256, k / 16)
 * against one Q4_K or Q6_K weight row into out[0 .. R): as ggml's vec_dot_q4_K_q8_K / q6_K_q8_K,
 * each 256's dot an exact integer sum (scales applied as integers, the mins or the -32 from the
 * sums of 16), times d_w * d_x once; the weight codes decoded once for the R rows, each row its own
 * accumulators, so that a row's sum is the same whatever R is. */
static inline __attribute__((always_inline)) void mp_kblock_dotn(int64_t kind, const uint8_t *row, const int8_t *xq,
                                                                 const float *xd, const int32_t *xs16, int64_t nb,
                                                                 int R, int64_t k, float *out) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int64_t nd = k / 256, ns = k / 16;
#ifdef MP_AVX2
    __m256 v[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m256i low4 = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
#endif
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *y = xq + b * 256;
        const float *dy = xd + b;
        const int32_t *s16 = xs16 + b * 16;
#ifdef MP_AVX2
        __m256i is[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
#else
        int32_t is[4] = {0, 0, 0, 0};
#endif
        float d;
        if (kind == MP_Q4_K) {
            const uint8_t *blk = row + b * 144, *qs = blk + 16;
            float dmin;
            int sc[8], m[8];
            d = mp_q4k_head(blk, &dmin, sc, m);
            mp_k_offsets(kind, m, NULL, d, dmin, s16, dy, R, nd, ns, acc);
            for (int j = 0; j < 8; j++) {
#ifdef MP_AVX2
                const __m256i bytes = _mm256_loadu_si256((const __m256i *)(qs + 32 * (j / 2)));
                const __m256i q = (j & 1) ? _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4) : _mm256_and_si256(bytes, low4);
                const __m256i scv = _mm256_set1_epi16((short)sc[j]);
                for (int r = 0; r < R; r++) {
                    const __m256i yv = _mm256_loadu_si256((const __m256i *)(y + r * k + 32 * j));
                    is[r] = _mm256_add_epi32(is[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q, yv), scv));
                }
#else
                for (int r = 0; r < R; r++) {
                    int32_t sum = 0;
                    for (int l = 0; l < 32; l++)
                        sum += (int32_t)((j & 1) ? qs[32 * (j / 2) + l] >> 4 : qs[32 * (j / 2) + l] & 0xF) * y[r * k + 32 * j + l];
                    is[r] += sc[j] * sum;
                }
#endif
            }
        } else {
            const uint8_t *blk = row + b * 210, *ql = blk, *qh = blk + 128;
            const int8_t *sc = (const int8_t *)(blk + 192);
            d = mp_half((uint16_t)(blk[208] | blk[209] << 8));
            mp_k_offsets(kind, NULL, sc, d, 0.0f, s16, dy, R, nd, ns, acc);
            for (int h = 0; h < 2; h++)
                for (int c = 0; c < 4; c++) {
                    const int j = 4 * h + c;                       /* activation block of 32 */
                    const int s0 = sc[2 * j], s1 = sc[2 * j + 1];  /* scales of its two 16s */
#ifdef MP_AVX2
                    const __m256i l4 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32 * (c & 1)));
                    const __m256i lo = (c >= 2) ? _mm256_and_si256(_mm256_srli_epi16(l4, 4), low4) : _mm256_and_si256(l4, low4);
                    const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(qh + 32 * h)), 2 * c), three);
                    const __m256i q = _mm256_or_si256(lo, _mm256_slli_epi16(hb, 4));
                    const __m256i scv = _mm256_set_m128i(_mm_set1_epi16((short)s1), _mm_set1_epi16((short)s0));
                    for (int r = 0; r < R; r++) {
                        const __m256i p16 = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)(y + r * k + 32 * j)));
                        is[r] = _mm256_add_epi32(is[r], _mm256_madd_epi16(p16, scv));
                    }
#else
                    for (int r = 0; r < R; r++) {
                        int32_t sum = 0;
                        for (int l = 0; l < 32; l++) {
                            const int lo = (c >= 2) ? ql[64 * h + 32 * (c & 1) + l] >> 4 : ql[64 * h + 32 * (c & 1) + l] & 0xF;
                            const int q = lo | ((qh[32 * h + l] >> (2 * c)) & 3) << 4;
                            sum += q * y[r * k + 32 * j + l] * (l < 16 ? s0 : s1);
                        }
                        is[r] += sum;
                    }
#endif
                }
        }
        for (int r = 0; r < R; r++) {
#ifdef MP_AVX2
            v[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dy[r * nd]), _mm256_cvtepi32_ps(is[r]), v[r]);
#else
            acc[r] += d * dy[r * nd] * (float)is[r];
#endif
        }
    }
    for (int r = 0; r < R; r++) {
#ifdef MP_AVX2
        acc[r] += hsum8(v[r]);
#endif
        out[r] = acc[r];
    }
}

#ifndef MP_VNNI512
/* out of line: inlined into mp_block_rows beside the one-row path, it made that path ~10 % slower */
static __attribute__((noinline)) void mp_kblock_dot4(int64_t kind, const uint8_t *row, const int8_t *xq, const float *xd,
                                                     const int32_t *xs16, int64_t k, float *out) {
    mp_kblock_dotn(kind, row, xq, xd, xs16, k / 256, 4, k, out);
}
#endif

static inline float mp_kblock_dot1(int64_t kind, const uint8_t *row, const int8_t *xq, const float *xd,
                                   const int32_t *xs16, int64_t nb) {
    float out;
    mp_kblock_dotn(kind, row, xq, xd, xs16, nb, 1, nb * 256, &out);
    return out;
}

#ifdef MP_AVX2
/* Block b of a Q8_0 (kind 3) or Q5_0 (kind 4) row as 32 signed codes (Q5_0: code - 16); its scale in *dw. */
static inline __m256i mp_wblock(int64_t kind, const uint8_t *row, int64_t b, float *dw) {
    if (kind == MP_Q8_0) {
        const uint8_t *blk = row + b * 34;
        *dw = mp_half((uint16_t)(blk[0] | blk[1] << 8));
        return _mm256_loadu_si256((const __m256i *)(blk + 2));
    }
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i pick = _mm256_set_epi8(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                         1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ULL);
    const uint8_t *blk = row + b * 22;
    uint32_t qh;
    memcpy(&qh, blk + 2, 4);
    *dw = mp_half((uint16_t)(blk[0] | blk[1] << 8));
    const __m128i qs = _mm_loadu_si128((const __m128i *)(blk + 6));
    const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), low4);
    /* byte j of `set` is 0xFF where bit j of qh is set */
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), pick), bit), bit);
    return _mm256_or_si256(nib, _mm256_andnot_si256(set, _mm256_set1_epi8((char)0xF0)));  /* code - 16 */
}

/* The exact integer dot of a block's codes w (|w| in aw) with 32 int8 activations, as 8 fp32 lanes:
 * |w| * (y with w's sign), unsigned x signed pairs, |w| <= 128 so no i16 saturation. */
static inline __m256 mp_wdot(__m256i aw, __m256i w, const int8_t *y) {
    const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)y), w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

/* Four activation rows (xq, xd with row strides k and k / 32) against one weight row: each row's
 * sum is computed exactly as mp_block_dot1 computes it (the same products in the same order into
 * its own accumulator), the weight block decoded once for the four; four independent chains of
 * multiply-adds instead of one. */
static inline void mp_block_dot4(int64_t kind, const uint8_t *row, const int8_t *xq, const float *xd, int64_t nb,
                                 int64_t k, float *out) {
    __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps(), v2 = _mm256_setzero_ps(), v3 = _mm256_setzero_ps();
    const int64_t nx = k / 32;
    for (int64_t b = 0; b < nb; b++) {
        float dw;
        const __m256i w = mp_wblock(kind, row, b, &dw), aw = _mm256_sign_epi8(w, w);
        v0 = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[b]), mp_wdot(aw, w, xq + b * 32), v0);
        v1 = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[nx + b]), mp_wdot(aw, w, xq + k + b * 32), v1);
        v2 = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[2 * nx + b]), mp_wdot(aw, w, xq + 2 * k + b * 32), v2);
        v3 = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[3 * nx + b]), mp_wdot(aw, w, xq + 3 * k + b * 32), v3);
    }
    out[0] = hsum8(v0);
    out[1] = hsum8(v1);
    out[2] = hsum8(v2);
    out[3] = hsum8(v3);
}
#endif

#ifdef MP_VNNI512
static inline float hsum16(__m512 v) {
    return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

/* R (1 to MP_GROUP) packed activation rows from xp (mp_packed_row) against one Q8_0 / Q5_0 weight row,
 * two blocks a step: vpdpbusd of (y + 128) and w, started from -128 x the sums of w, is the exact
 * integer dot mp_wdot makes; each block's 8 lanes then times its own dw * dx. An odd last block has
 * zero weights in the upper half. Each row its own accumulator and the same operations whatever R is. */
static inline __attribute__((always_inline)) void mp_block_dotn512(int64_t kind, const uint8_t *row, const uint8_t *xp,
                                                                   int64_t nb, int R, float *out) {
    __m512 v[MP_GROUP];
    for (int r = 0; r < R; r++) v[r] = _mm512_setzero_ps();
    const __m512i off = _mm512_set1_epi8((char)0x80);
    for (int64_t b = 0; b < nb; b += 2, xp += MP_STEP) {
        float d0, d1 = 0.0f;
        const __m256i w0 = mp_wblock(kind, row, b, &d0);
        const __m256i w1 = b + 1 < nb ? mp_wblock(kind, row, b + 1, &d1) : _mm256_setzero_si256();
        const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
        const __m512i start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), off, w));
        const __m512 dw = _mm512_insertf32x8(_mm512_set1_ps(d0), _mm256_set1_ps(d1), 1);
        for (int r = 0; r < R; r++) {
            const __m512i dot = _mm512_dpbusd_epi32(start, _mm512_loadu_si512(xp + r * 128), w);
            v[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_loadu_ps(xp + r * 128 + 64)), _mm512_cvtepi32_ps(dot), v[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum16(v[r]);
}

#define MP_BLOCK_DOTN512(R)                                                                                     \
    static __attribute__((noinline)) void mp_block_dot##R##_512(int64_t kind, const uint8_t *row, const uint8_t *xp, \
                                                                int64_t nb, float *out) {                        \
        mp_block_dotn512(kind, row, xp, nb, R, out);                                                             \
    }
MP_BLOCK_DOTN512(4)
MP_BLOCK_DOTN512(8)
MP_BLOCK_DOTN512(16)

/* mp_kblock_dotn with 64 bytes a step: two 32-weight sub-blocks, the 16-bit products of maddubs
 * times their scales summed into the block's integers by vpdpwssd (= madd then add). The integer
 * sums are mp_kblock_dotn's; the lanes they are spread over, and so the final fp32 sum, differ. */
static inline __attribute__((always_inline)) void mp_kblock_dotn512(int64_t kind, const uint8_t *row, const int8_t *xq,
                                                                    const float *xd, const int32_t *xs16, int64_t nb,
                                                                    int R, int64_t k, float *out) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int64_t nd = k / 256, ns = k / 16;
    __m512 v[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const __m512i low4 = _mm512_set1_epi8(0x0F), three = _mm512_set1_epi8(3);
    /* 16-bit lane i takes scale i / 16 (Q4_K: two sub-blocks of 32) or i / 8 (Q6_K: four 16s) */
    const __m512i by16 = _mm512_srli_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,
                                                            15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 4);
    const __m512i by8 = _mm512_srli_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,
                                                           15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 3);
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *y = xq + b * 256;
        const float *dy = xd + b;
        const int32_t *s16 = xs16 + b * 16;
        __m512i is[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        float d;
        if (kind == MP_Q4_K) {
            const uint8_t *blk = row + b * 144, *qs = blk + 16;
            float dmin;
            int sc[8], m[8];
            int16_t sc16[8];
            d = mp_q4k_head(blk, &dmin, sc, m);
            for (int j = 0; j < 8; j++) sc16[j] = (int16_t)sc[j];
            mp_k_offsets(kind, m, NULL, d, dmin, s16, dy, R, nd, ns, acc);
            const __m512i scw = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)sc16));
            for (int p = 0; p < 4; p++) {  /* sub-blocks 2p (low nibbles) and 2p + 1 (high) of 32 bytes */
                const __m512i bytes = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qs + 32 * p)));
                const __m512i q = _mm512_and_si512(_mm512_mask_srli_epi16(bytes, 0xFFFF0000u, bytes, 4), low4);
                const __m512i scv = _mm512_permutexvar_epi16(_mm512_add_epi16(by16, _mm512_set1_epi16((short)(2 * p))), scw);
                for (int r = 0; r < R; r++) {
                    const __m512i yv = _mm512_loadu_si512(y + r * k + 64 * p);
                    is[r] = _mm512_dpwssd_epi32(is[r], _mm512_maddubs_epi16(q, yv), scv);
                }
            }
        } else {
            const uint8_t *blk = row + b * 210, *ql = blk, *qh = blk + 128;
            const int8_t *sc = (const int8_t *)(blk + 192);
            d = mp_half((uint16_t)(blk[208] | blk[209] << 8));
            mp_k_offsets(kind, NULL, sc, d, 0.0f, s16, dy, R, nd, ns, acc);
            const __m512i scw = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc)));
            for (int h = 0; h < 2; h++) {
                const __m512i l4 = _mm512_loadu_si512(ql + 64 * h);
                const __m512i qhb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qh + 32 * h)));
                for (int c = 0; c < 4; c += 2) {  /* quarters c (first 32 bytes of l4) and c + 1 (second) */
                    const __m512i lo = c ? _mm512_and_si512(_mm512_srli_epi16(l4, 4), low4) : _mm512_and_si512(l4, low4);
                    const __m512i sh = _mm512_mask_blend_epi16(0xFFFF0000u, _mm512_set1_epi16((short)(2 * c)),
                                                               _mm512_set1_epi16((short)(2 * c + 2)));
                    const __m512i hb = _mm512_and_si512(_mm512_srlv_epi16(qhb, sh), three);
                    const __m512i q = _mm512_or_si512(lo, _mm512_slli_epi16(hb, 4));
                    const int j = 4 * h + c;
                    const __m512i scv = _mm512_permutexvar_epi16(_mm512_add_epi16(by8, _mm512_set1_epi16((short)(2 * j))), scw);
                    for (int r = 0; r < R; r++) {
                        const __m512i yv = _mm512_loadu_si512(y + r * k + 32 * j);
                        is[r] = _mm512_dpwssd_epi32(is[r], _mm512_maddubs_epi16(q, yv), scv);
                    }
                }
            }
        }
        for (int r = 0; r < R; r++)
            v[r] = _mm512_fmadd_ps(_mm512_set1_ps(d * dy[r * nd]), _mm512_cvtepi32_ps(is[r]), v[r]);
    }
    for (int r = 0; r < R; r++) out[r] = acc[r] + hsum16(v[r]);
}

static __attribute__((noinline)) void mp_kblock_dot4_512(int64_t kind, const uint8_t *row, const int8_t *xq,
                                                         const float *xd, const int32_t *xs16, int64_t k, float *out) {
    mp_kblock_dotn512(kind, row, xq, xd, xs16, k / 256, 4, k, out);
}
#endif

static inline float mp_block_dot1(int64_t kind, const uint8_t *row, const int8_t *xq, const float *xd, int64_t nb) {
    float acc = 0.0f;
#ifdef MP_AVX2
    __m256 v = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        float dw;
        const __m256i w = mp_wblock(kind, row, b, &dw);
        v = _mm256_fmadd_ps(_mm256_set1_ps(dw * xd[b]), mp_wdot(_mm256_sign_epi8(w, w), w, xq + b * 32), v);
    }
    acc = hsum8(v);
#else
    for (int64_t b = 0; b < nb; b++) {
        int32_t sum = 0;
        float dw;
        const int8_t *y = xq + b * 32;
        if (kind == MP_Q8_0) {
            const uint8_t *blk = row + b * 34;
            dw = mp_half((uint16_t)(blk[0] | blk[1] << 8));
            /* each product narrowed to int16 (exact: |w y| <= 16384): GCC 12 compiles the plain
             * int8 x int8 sum with -march=native on AVX-VNNI CPUs (Zen 5) into vpdpbusd, which
             * reads the weights as unsigned (wrong sums; seen here with GCC 12.2) */
            const int8_t *w = (const int8_t *)(blk + 2);
            for (int j = 0; j < 32; j++) sum += (int16_t)(w[j] * y[j]);
        } else {
            const uint8_t *blk = row + b * 22;
            uint32_t qh;
            memcpy(&qh, blk + 2, 4);
            dw = mp_half((uint16_t)(blk[0] | blk[1] << 8));
            for (int j = 0; j < 16; j++) {
                const int lo = (blk[6 + j] & 0x0F) | (int)((qh >> j) & 1) << 4;
                const int hi = (blk[6 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
                sum += (lo - 16) * y[j] + (hi - 16) * y[j + 16];
            }
        }
        acc += dw * xd[b] * (float)sum;
    }
#endif
    return acc;
}

/* y (m, n) for m rows of x through blocks of kind 3 Q8_0, 4 Q5_0, 5 Q4_K or 6 Q6_K (n rows of whole
 * blocks), activations rounded to int8 as above: what the tests compare with a float64 reference. */
static inline float mp_any_block_dot1(int64_t kind, const uint8_t *row, const mp_acts *a, int64_t k, int64_t b) {
    const int64_t nb = k / mp_block_len(kind);
#ifdef MP_VNNI512
    float out;
    if (kind <= MP_Q5_0) mp_block_dotn512(kind, row, mp_packed_row(a, k, b), nb, 1, &out);
    else mp_kblock_dotn512(kind, row, a->q + b * k, a->d + b * nb, a->s16 + b * (k / 16), nb, 1, k, &out);
    return out;
#else
    return kind <= MP_Q5_0 ? mp_block_dot1(kind, row, a->q + b * k, a->d + b * nb, nb)
                     : mp_kblock_dot1(kind, row, a->q + b * k, a->d + b * nb, a->s16 + b * (k / 16), nb);
#endif
}

/* Ask for the weight row two ahead with the non-temporal hint: the weights stream through once per
 * token and should not evict from the caches what the rest of the step (Python included) uses. On
 * batch-1 decode of the Q4_K_M file, 8 alternating pairs of runs here: the step outside the kernels
 * 0.2-0.4 ms faster in every pair (3.3-3.8 against 3.7-4.2 ms), the kernels' own time within the
 * noise (median 67 against 66 tok/s). */
static inline void mp_prefetch_nta(const uint8_t *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 0);
}

/* One weight row against activation rows b0 .. b0 + B, rounded for its kind (mp_acts_make), into
 * res[0 .. B): four (AVX-512, Q8_0 / Q5_0: up to sixteen) rows at a time, each row's sum the same as
 * mp_any_block_dot1's. */
static inline void mp_block_rows(int64_t kind, const uint8_t *row, int64_t k, const mp_acts *a, int64_t b0, int64_t B,
                                 float *res) {
    const int64_t nd = kind <= MP_Q5_0 ? k / 32 : k / 256, ns = k / 16;
    int64_t b = b0;
    B += b0;
#if defined(MP_VNNI512)
    if (kind <= MP_Q5_0) {
        for (; b + 16 <= B; b += 16) mp_block_dot16_512(kind, row, mp_packed_row(a, k, b), k / 32, res + (b - b0));
        for (; b + 8 <= B; b += 8) mp_block_dot8_512(kind, row, mp_packed_row(a, k, b), k / 32, res + (b - b0));
        for (; b + 4 <= B; b += 4) mp_block_dot4_512(kind, row, mp_packed_row(a, k, b), k / 32, res + (b - b0));
    } else
        for (; b + 4 <= B; b += 4) mp_kblock_dot4_512(kind, row, a->q + b * k, a->d + b * nd, a->s16 + b * ns, k, res + (b - b0));
#else
#ifdef MP_AVX2
    if (kind <= MP_Q5_0)
        for (; b + 4 <= B; b += 4) mp_block_dot4(kind, row, a->q + b * k, a->d + b * nd, k / 32, k, res + (b - b0));
#endif
    if (kind >= MP_Q4_K)
        for (; b + 4 <= B; b += 4) mp_kblock_dot4(kind, row, a->q + b * k, a->d + b * nd, a->s16 + b * ns, k, res + (b - b0));
#endif
    for (; b < B; b++) res[b - b0] = mp_any_block_dot1(kind, row, a, k, b);
}

/* Weight rows [o0, o1) of a block layer (w: its first row) against B activation rows, into ys[b][o]:
 * the rows in groups of MP_GROUP, each group against the whole range before the next, so that the
 * group's codes stay in L1 and the range's weights in L2. (One weight row against all rows at a
 * time read the codes of a 256-row prefill chunk from L2 for every weight row: 44 GMAC/s on one
 * thread here against 116 at 32 rows.) */
#define MP_RANGE 32
static void mp_block_range(int64_t kind, const uint8_t *w, int64_t k, int64_t o0, int64_t o1, const mp_acts *a,
                           int64_t B, float *const *ys) {
    if (kind == MP_Q8_0X16) {  /* o0, o1: multiples of 16 */
        const int64_t nb = k / 32;
        for (int64_t b0 = 0; b0 < B; b0 += MP_GROUP) {
            const int64_t g = B - b0 < MP_GROUP ? B - b0 : MP_GROUP;
            const uint8_t *xp = a->p + b0 / MP_GROUP * nb * MP_X16_BLOCK;
            for (int64_t o = o0; o < o1; o += 16) {
                const uint8_t *wg = w + o / 16 * nb * MP_W16_BLOCK;
                float *out[MP_GROUP];
                for (int64_t i = 0; i < g; i++) out[i] = ys[b0 + i] + o;
                int64_t r = 0;
                for (; r + 16 <= g; r += 16) mp_x16_dot16(wg, xp + 4 * r, nb, out + r);
                for (; r + 8 <= g; r += 8) mp_x16_dot8(wg, xp + 4 * r, nb, out + r);
                for (; r + 4 <= g; r += 4) mp_x16_dot4(wg, xp + 4 * r, nb, out + r);
                for (; r < g; r++) mp_x16_dot1(wg, xp + 4 * r, nb, out + r);
            }
        }
        return;
    }
    const int64_t rowb = k / mp_block_len(kind) * mp_block_bytes(kind);
    float res[MP_GROUP];
    for (int64_t b0 = 0; b0 < B; b0 += MP_GROUP) {
        const int64_t g = B - b0 < MP_GROUP ? B - b0 : MP_GROUP;
        for (int64_t o = o0; o < o1; o++) {
            if (B <= MP_GROUP && o + 2 < o1) mp_prefetch_nta(w + (o + 2) * rowb, rowb);
            mp_block_rows(kind, w + o * rowb, k, a, b0, g, res);
            for (int64_t i = 0; i < g; i++) ys[b0 + i][o] = res[i];
        }
    }
}

void mp_block_gemv(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t kind, int64_t n, float *y) {
    mp_acts a;
    float *ys[m];
    for (int64_t r = 0; r < m; r++) ys[r] = y + r * n;
    mp_acts_make(kind, x, m, k, &a);
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < n; o += MP_RANGE) mp_block_range(kind, w, k, o, o + MP_RANGE < n ? o + MP_RANGE : n, &a, m, ys);
    mp_acts_free(&a);
}

/* One output of a linear layer for one input row: fp32 row, or affine codes (xsum: x's group sums);
 * block kinds go through mp_block_rows. */
static inline float mp_linear_row(const mp_linear *l, int64_t o, const float *x, const float *xsum) {
    if (l->kind == MP_F32) return mp_dotf((const float *)l->w + o * l->k, x, l->k);
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
    float *xs[3] = {NULL, NULL, NULL};
    mp_acts acts[3];  /* x rounded per 32 ([0], Q8_0 / Q5_0; [2] packed for kind 7) and per 256 ([1], Q4_K / Q6_K) */
    int made[3] = {0, 0, 0};
    int64_t start[4] = {0, 0, 0, 0};
    const int64_t k = ls[0]->k;
    for (int c = 0; c < cnt; c++) {
        const mp_linear *l = ls[c];
        const int r = mp_acts_slot(l->kind);
        if (l->kind >= MP_Q8_0 && !made[r]) {  /* the layers of one call read the same x: round it once */
            mp_acts_make(l->kind, x, B, k, &acts[r]);
            made[r] = 1;
        }
        if (l->kind == MP_AFFINE) {
            const int64_t ng = k / l->g;
            xs[c] = malloc(sizeof(float) * (size_t)(B * ng));
            for (int64_t b = 0; b < B; b++)
                for (int64_t t = 0; t < ng; t++) {
                    float sum = 0.0f;
                    for (int64_t j = 0; j < l->g; j++) sum += x[b * k + t * l->g + j];
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
        const int64_t ng = l->kind == MP_AFFINE ? k / l->g : 0;
        if (l->kind >= MP_Q8_0) {
            mp_block_range(l->kind, (const uint8_t *)l->w, k, o0, o1, &acts[mp_acts_slot(l->kind)], B, ys + c * B);
            continue;
        }
        for (int64_t o = o0; o < o1; o++) {
            if (l->kind == MP_F32 && o + 2 < l->n) mp_prefetch_nta((const uint8_t *)l->w + (o + 2) * k * 4, k * 4);
            for (int64_t b = 0; b < B; b++)
                ys[c * B + b][o] = mp_linear_row(l, o, x + b * k, xs[c] ? xs[c] + b * ng : NULL);
        }
    }
    for (int c = 0; c < cnt; c++) free(xs[c]);
    for (int r = 0; r < 3; r++)
        if (made[r]) mp_acts_free(&acts[r]);
}

static void mp_rms_norm(const float *x, const float *w, int64_t d, float eps, float *y) {
    double ss = 0.0;
    for (int64_t i = 0; i < d; i++) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / (double)d) + eps);
    for (int64_t i = 0; i < d; i++) y[i] = w[i] * (x[i] * r);
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
                                                            float *s, float *oh, int f16) {
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
                           float *sc, float *out) {
    const int64_t group = n_heads / n_kv, kvd = n_kv * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    /* one task per (sequence, kv head): the query heads that share the kv head run one after
     * another on one thread, so its keys and values come from memory once and from the core's own
     * cache for the rest of the group (one task per query head read them up to `group` times:
     * 30 layers of 32 sequences x 140 positions, 9 heads on 3 kv heads, 47-58 -> 30-36 ms here) */
#pragma omp parallel for schedule(dynamic)
    for (int64_t bg = 0; bg < B * n_kv; bg++) {
        const int64_t b = bg / n_kv, g = bg % n_kv;
        const int64_t off = g * hd * (f16 ? 2 : 4);
        const char *kg = (const char *)k_cache + off, *vg = (const char *)v_cache + off;
        for (int64_t bh = b * n_heads + g * group; bh < b * n_heads + (g + 1) * group; bh++) {
            if (f16)
                mp_attend(q + bh * hd, kg, vg, kvd, slots + b * lmax, lens[b], hd, scale, sc + bh * lmax, out + bh * hd, 1);
            else
                mp_attend(q + bh * hd, kg, vg, kvd, slots + b * lmax, lens[b], hd, scale, sc + bh * lmax, out + bh * hd, 0);
        }
    }
}

void mp_paged_attention(const float *q, int64_t B, int64_t n_heads, int64_t n_kv, int64_t hd, const float *k_cache,
                        const float *v_cache, const int64_t *slots, const int64_t *lens, int64_t lmax, float *out) {
    float *sc = malloc(sizeof(float) * (size_t)(B * n_heads * lmax));
    mp_attend_rows(q, B, n_heads, n_kv, hd, k_cache, v_cache, 0, slots, lens, lmax, sc, out);
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
            mp_rope(q + b * qd, n_heads, hd, cos + b * hd, sin + b * hd);
            mp_rope(ys[B + b], n_kv, hd, cos + b * hd, sin + b * hd);
            if (kv_f16) {
                const int64_t slot = slots[b * lmax + lens[b] - 1];
                mp_to_half(ys[B + b], kvd, (uint16_t *)kc + slot * kvd);
                mp_to_half(ys[2 * B + b], kvd, (uint16_t *)vc + slot * kvd);
            }
        }
        mp_attend_rows(q, B, n_heads, n_kv, hd, kc, vc, (int)kv_f16, slots, lens, lmax, sc, att);
        {
            const mp_linear *ls[1] = {&ly->o};
            for (int64_t b = 0; b < B; b++) ys[b] = t + b * d;
            mp_linears_apply(ls, ys, 1, att, B);
        }
#pragma omp parallel for schedule(static) if (B >= MP_PAR_ROWS)
        for (int64_t b = 0; b < B; b++) {
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
            for (int64_t i = b * d_ff; i < (b + 1) * d_ff; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        {
            const mp_linear *ls[1] = {&ly->down};
            for (int64_t b = 0; b < B; b++) ys[b] = t + b * d;
            mp_linears_apply(ls, ys, 1, g, B);
        }
#pragma omp parallel for schedule(static) if (B >= MP_PAR_ROWS)
        for (int64_t i = 0; i < B * d; i++) x[i] += t[i];
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
