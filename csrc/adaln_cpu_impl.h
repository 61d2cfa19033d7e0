/*
 * The adaLN dual forward for one storage type, included by adaln_cpu.c once per type with
 * MFK_T (float or double) and MFK_SUFFIX (f32 or f64) defined. The math is in adaln_cpu.c's header comment.
 * No include guard on purpose.
 */

/* One row: x, dx, y, dy point at the row (C elements); shift..dscale at its sample's (C,) vectors. */
MFK_MULTIVERSION static void MFK_CAT(adaln_dual_row, MFK_SUFFIX)(
    const MFK_T *restrict x, const MFK_T *restrict dx, const MFK_T *restrict shift, const MFK_T *restrict scale,
    const MFK_T *restrict dshift, const MFK_T *restrict dscale, MFK_T *restrict y, MFK_T *restrict dy,
    MFK_T *restrict mean_out, MFK_T *restrict rstd_out, int64_t C, double eps) {
    double sum_x = 0.0;
#pragma omp simd reduction(+ : sum_x)
    for (int64_t c = 0; c < C; ++c) sum_x += (double)x[c];
    const double mean = sum_x / (double)C;

    double sum_xc2 = 0.0, sum_dx = 0.0, sum_xc_dx = 0.0;
#pragma omp simd reduction(+ : sum_xc2, sum_dx, sum_xc_dx)
    for (int64_t c = 0; c < C; ++c) {
        const double xc = (double)x[c] - mean;
        const double d = (double)dx[c];
        sum_xc2 += xc * xc;
        sum_dx += d;
        sum_xc_dx += xc * d;
    }
    const double rstd = 1.0 / sqrt(sum_xc2 / (double)C + eps);
    *mean_out = (MFK_T)mean;
    *rstd_out = (MFK_T)rstd;

    const MFK_T m = (MFK_T)mean, r = (MFK_T)rstd;
    const MFK_T dx_mean = (MFK_T)(sum_dx / (double)C);
    const MFK_T xh_dx_mean = (MFK_T)(rstd * sum_xc_dx / (double)C);  /* mean(xh * dx) */
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
        const MFK_T xh = (x[c] - m) * r;
        const MFK_T scale1 = (MFK_T)1 + scale[c];
        y[c] = xh * scale1 + shift[c];
        dy[c] = (dx[c] - dx_mean - xh * xh_dx_mean) * r * scale1 + xh * dscale[c] + dshift[c];
    }
}

/*
 * All B * N rows; row i belongs to sample i / N. num_threads: the caller's thread budget (torch's intra-op
 * threads); 1 (or a small problem) runs on the calling thread.
 */
MFK_EXPORT void MFK_CAT(mfk_adaln_dual_fwd, MFK_SUFFIX)(
    const MFK_T *x, const MFK_T *shift, const MFK_T *scale, const MFK_T *dx, const MFK_T *dshift,
    const MFK_T *dscale, MFK_T *y, MFK_T *dy, MFK_T *mean, MFK_T *rstd, int64_t B, int64_t N, int64_t C, double eps,
    int num_threads) {
    const int64_t rows = B * N;
    if (num_threads < 1) num_threads = 1;
    (void)num_threads; /* unused without OpenMP */
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if (num_threads > 1 && rows * C >= MFK_PARALLEL_MIN_ELEMS)
    for (int64_t i = 0; i < rows; ++i) {
        const int64_t b = i / N;
        MFK_CAT(adaln_dual_row, MFK_SUFFIX)(x + i * C, dx + i * C, shift + b * C, scale + b * C, dshift + b * C,
                                            dscale + b * C, y + i * C, dy + i * C, mean + i, rstd + i, C, eps);
    }
}
