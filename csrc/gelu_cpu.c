/*
 * GELU with DiT's tanh approximation, forward and backward, for contiguous fp32 or bf16 CPU tensors: the native
 * kernels behind mfkernels.gelu_tanh and mfkernels.gelu_tanh_backward (loaded with ctypes by mfkernels/_native.py).
 *
 *     u  = k0 (x + k1 x^3),  k0 = sqrt(2 / pi),  k1 = 0.044715
 *     y  = x (1 + tanh u) / 2
 *     dx = g ((1 + tanh u) / 2 + x (1 - tanh^2 u) k0 (1 + 3 k1 x^2) / 2)     (the backward; applied to a tangent
 *                                                                          dx it is the forward-mode tangent too)
 *
 * Why a kernel: torch's CPU tanh-GELU is not vectorised (~3x the time of its erf GELU or of tanh alone), and the MLP's
 * GELU runs five times a MeanFlow step (training and guidance forwards, the dual pass and its tangent, the backward).
 *
 * 1 + tanh u and 1 - tanh u are computed without cancellation from t = exp(-2 |u|) <= 1: they are 2 / (1 + t) and
 * 2 t / (1 + t), in the order the sign of u says. So a large negative x keeps its tiny y and derivative to full
 * relative precision, where 1 + tanh(u) would round to 0 (tests/mfkernels/test_gelu_native.py: within 1e-6 (1 + |u|)
 * of a float64 reference, everywhere). exp is Cephes' single-precision polynomial (Cody-Waite reduction, ~1 ulp)
 * written branch-free so that `omp simd` vectorises it. Past |u| = 43, t = exp(-2 |u|) < 2e-38 is below fp32's
 * normal range and is taken as 0, as are then the tiny y and derivative of x < -9.5. Spans of the tensor are split
 * across OpenMP threads when there is enough work.
 *
 * bf16 (what autocast hands the MLP): each element is widened to fp32 exactly, computed as above, and rounded back to
 * the nearest bf16 (ties to even), as torch's own bf16 GELU does; so the result is the exact GELU of the bf16 input
 * correctly rounded, except within ~1e-6 of a rounding midpoint.
 */

#include <stdint.h>
#include <string.h>

#include "mfk_common.h"

#define MFK_GELU_K0 0.7978845608028654f
#define MFK_GELU_K1 0.044715f

/* exp(x) for x in [-86, 0]. */
static inline float mfk_exp_nonpositive(float x) {
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;          /* x - n ln 2, in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, sizeof bits);
    bits += (int32_t)n << 23; /* times 2^n */
    memcpy(&p, &bits, sizeof p);
    return p;
}

/* (1 + tanh u, 1 - tanh u) of u = k0 (x + k1 x^3). */
static inline void mfk_gelu_tanh_terms(float x, float *plus, float *minus) {
    const float u = MFK_GELU_K0 * (x + MFK_GELU_K1 * x * x * x);
    const float au = u < 0.0f ? -u : u;
    /* both sides of the select run in the vector loop: the clamp keeps exp's 2^n shift in range */
    const float t = au < 43.0f ? mfk_exp_nonpositive(-2.0f * (au < 43.0f ? au : 43.0f)) : 0.0f;
    const float big = 2.0f / (1.0f + t), small = t * big;
    *plus = u >= 0.0f ? big : small;
    *minus = u >= 0.0f ? small : big;
}

MFK_MULTIVERSION static void gelu_tanh_fwd_span(const float *restrict x, float *restrict y, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        float plus, minus;
        mfk_gelu_tanh_terms(x[i], &plus, &minus);
        y[i] = 0.5f * x[i] * plus;
    }
}

MFK_MULTIVERSION static void gelu_tanh_bwd_span(const float *restrict g, const float *restrict x,
                                                float *restrict dx, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const float v = x[i];
        float plus, minus;
        mfk_gelu_tanh_terms(v, &plus, &minus);
        const float du = MFK_GELU_K0 * (1.0f + 3.0f * MFK_GELU_K1 * v * v);
        dx[i] = g[i] * 0.5f * (plus + v * plus * minus * du);
    }
}

static inline float mfk_bf16_to_f32(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest, ties to even; a NaN stays a (quiet) NaN rather than rounding up into infinity. */
static inline uint16_t mfk_f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return (bits & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((bits >> 16) | 0x40u) : (uint16_t)rounded;
}

MFK_MULTIVERSION static void gelu_tanh_fwd_span_bf16(const uint16_t *restrict x, uint16_t *restrict y, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const float v = mfk_bf16_to_f32(x[i]);
        float plus, minus;
        mfk_gelu_tanh_terms(v, &plus, &minus);
        y[i] = mfk_f32_to_bf16(0.5f * v * plus);
    }
}

MFK_MULTIVERSION static void gelu_tanh_bwd_span_bf16(const uint16_t *restrict g, const uint16_t *restrict x,
                                                     uint16_t *restrict dx, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const float v = mfk_bf16_to_f32(x[i]);
        float plus, minus;
        mfk_gelu_tanh_terms(v, &plus, &minus);
        const float du = MFK_GELU_K0 * (1.0f + 3.0f * MFK_GELU_K1 * v * v);
        dx[i] = mfk_f32_to_bf16(mfk_bf16_to_f32(g[i]) * 0.5f * (plus + v * plus * minus * du));
    }
}

/* Spans of MFK_GELU_SPAN elements, split across threads when there are enough of them: SPAN(lo, len) runs each. */
#define MFK_GELU_SPAN 16384
#define MFK_GELU_OVER_SPANS(n, num_threads, SPAN)                                                                    \
    do {                                                                                                             \
        const int64_t spans_ = ((n) + MFK_GELU_SPAN - 1) / MFK_GELU_SPAN;                                            \
        const int threads_ = (num_threads) < 1 ? 1 : (num_threads);                                                  \
        (void)threads_; /* unused without OpenMP */                                                                  \
        _Pragma("omp parallel for schedule(static) num_threads(threads_) if (threads_ > 1 && (n) >= MFK_PARALLEL_MIN_ELEMS)") \
        for (int64_t s_ = 0; s_ < spans_; ++s_) {                                                                    \
            const int64_t lo = s_ * MFK_GELU_SPAN, len = (n) - lo < MFK_GELU_SPAN ? (n) - lo : MFK_GELU_SPAN;        \
            SPAN(lo, len);                                                                                           \
        }                                                                                                            \
    } while (0)

MFK_EXPORT void mfk_gelu_tanh_fwd_f32(const float *x, float *y, int64_t n, int num_threads) {
#define SPAN(lo, len) gelu_tanh_fwd_span(x + lo, y + lo, len)
    MFK_GELU_OVER_SPANS(n, num_threads, SPAN);
#undef SPAN
}

MFK_EXPORT void mfk_gelu_tanh_bwd_f32(const float *g, const float *x, float *dx, int64_t n, int num_threads) {
#define SPAN(lo, len) gelu_tanh_bwd_span(g + lo, x + lo, dx + lo, len)
    MFK_GELU_OVER_SPANS(n, num_threads, SPAN);
#undef SPAN
}

MFK_EXPORT void mfk_gelu_tanh_fwd_bf16(const uint16_t *x, uint16_t *y, int64_t n, int num_threads) {
#define SPAN(lo, len) gelu_tanh_fwd_span_bf16(x + lo, y + lo, len)
    MFK_GELU_OVER_SPANS(n, num_threads, SPAN);
#undef SPAN
}

MFK_EXPORT void mfk_gelu_tanh_bwd_bf16(const uint16_t *g, const uint16_t *x, uint16_t *dx, int64_t n,
                                       int num_threads) {
#define SPAN(lo, len) gelu_tanh_bwd_span_bf16(g + lo, x + lo, dx + lo, len)
    MFK_GELU_OVER_SPANS(n, num_threads, SPAN);
#undef SPAN
}
