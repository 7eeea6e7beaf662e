/* mp_kernels.h: what every kernel file shares (cpu_kernels.c includes them all into one
 * translation unit, so the compiler inlines across them as before the split): the SIMD
 * switches, the one numbering of weight kinds, the row limits and the vector helpers. */
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

/* An fp16 value widened to fp32 (exact). */
static inline float mp_half(uint16_t h) {
#ifdef MP_AVX2
    return _cvtsh_ss(h);
#else
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
#endif
}

/* What a layer's weights are, one numbering for every kernel that takes a `kind` (mirrored once in
 * Python: kernels/__init__.py KIND):
 *   MP_F32     0  fp32 rows                           MP_Q5_0    4  GGUF Q5_0 blocks (22 bytes / 32)
 *   MP_AFFINE  1  uint8 codes + fp32 scale / offset   MP_Q4_K    5  GGUF Q4_K blocks (144 bytes / 256)
 *   MP_Q4_0    2  GGUF Q4_0 blocks (18 bytes / 32)    MP_Q6_K    6  GGUF Q6_K blocks (210 bytes / 256)
 *   MP_Q8_0    3  GGUF Q8_0 blocks (34 bytes / 32)    MP_Q8_0X16 7  Q8_0 repacked 16 rows at a time
 *   MP_CODE4   8  NF4 / FP4: 4-bit indices into a 16-value code book, high nibble first, times an fp32
 *                 absmax per block of g flattened values (bitsandbytes' layout; the fused decode only)
 *   MP_AFFINE4 9  AFFINE with 4-bit codes packed two a byte, low nibble first (k / 2 bytes a row:
 *                 IntxLinear's layout; the fused decode only)
 *   MP_AFFINE4_Q8 10  AFFINE4 multiplied with the activations rounded to int8 per 32 (llama.cpp's Q8_0
 *                 rounding of x, as its Q4_0 / Q4_1 dots; g a multiple of 32; the fused decode only)
 *   MP_AFFINE_Q8 11  AFFINE (a byte a code) multiplied with x rounded to int8 per 32, as AFFINE4_Q8
 *   MP_SPARSE24 12  2:4-sparse fp32: the kept values (n, k / 2) and their 2-bit positions (gemv.c)
 *   MP_SPARSE24_BF16 13, MP_SPARSE24_F16 14  the same with bf16 / fp16 values */
enum { MP_F32 = 0, MP_AFFINE = 1, MP_Q4_0 = 2, MP_Q8_0 = 3, MP_Q5_0 = 4, MP_Q4_K = 5, MP_Q6_K = 6, MP_Q8_0X16 = 7,
       MP_CODE4 = 8, MP_AFFINE4 = 9, MP_AFFINE4_Q8 = 10, MP_AFFINE_Q8 = 11, MP_SPARSE24 = 12,
       MP_SPARSE24_BF16 = 13, MP_SPARSE24_F16 = 14 };
/* codes * scale + offset per group of g inputs */
#define MP_IS_AFFINE(kind) ((kind) == MP_AFFINE || (kind) == MP_AFFINE4 || (kind) == MP_AFFINE4_Q8 || \
                            (kind) == MP_AFFINE_Q8)
#define MP_ROUNDS_X(kind) ((kind) == MP_AFFINE4_Q8 || (kind) == MP_AFFINE_Q8)  /* x rounded per 32 first */
#define MP_IS_BLOCK(kind) ((kind) >= MP_Q8_0 && (kind) <= MP_Q8_0X16)  /* multiplied on GGUF blocks, int8 x */


#define MP_MAX_ROWS 8
/* the per-row work (rounding activations, norms, rotary, SiLU) runs in parallel from this many rows */
#define MP_PAR_ROWS 16



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
