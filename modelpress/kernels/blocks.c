/* Products on GGUF blocks as stored with int8 activations (mp_block_gemv), and the structures
 * of the fused decoder that reads them. */

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
 *   cos, sin fp32 (tables, B, head_dim): each token's rotary values in each table (the layer's `rope` picks one)
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
    const float *bias;             /* (n) added to every output row, or NULL (qwen2's q / k / v) */
    const int64_t *perm;           /* (k) AFFINE / F32: stored column j multiplies x[perm[j]] (GPTQ's act order
                                    * without static groups), or NULL */
    const uint8_t *idx;            /* SPARSE24: (n, k / 8) the kept values' 2-bit positions (w: the values) */
} mp_linear;

typedef struct {
    const float *attn_norm, *ffn_norm;
    mp_linear q, k, v, o, gate, up, down;
    void *k_cache, *v_cache;       /* fp32, or fp16 (mp_llama_decode's kv_f16) */
    const float *q_norm, *k_norm;  /* (head_dim) RMSNorm weights of each query / key head, or NULL (qwen3) */
    /* gemma: the attention's and the MLP's outputs normed before their residual adds (or NULL), the
     * MLP's activation (0 SiLU, 1 GELU with tanh), scores scaled by attn_scale (0: 1 / sqrt(head_dim))
     * and soft-capped (softcap > 0: c * tanh(s / c)), keys within `window` positions (0: all), and
     * which rotary table of cos / sin the layer reads */
    const float *post_attn_norm, *post_ffw_norm;
    int64_t act, window, rope;
    float attn_scale, softcap;
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
