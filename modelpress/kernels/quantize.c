/* The GGUF quantizers' searches and reference quantizers (core/kquants.py calls them). */

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
