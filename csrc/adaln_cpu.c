/*
 * adaLN modulation with its forward-mode tangent, one pass per row: the native CPU kernel behind
 * mfkernels.adaln_modulate_jvp for contiguous fp32 / fp64 CPU tensors (loaded with ctypes by mfkernels/_native.py).
 *
 * Shapes: x, dx, y, dy (B, N, C) (a (B, C) x is the same with N = 1); shift, scale, dshift, dscale (B, C);
 * mean, rstd (B, N). All contiguous, one dtype. Math, per row x of length C (of sample b):
 *
 *     mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps),  xh = (x - mean) * rstd
 *     y    = xh * (1 + scale) + shift
 *     dxh  = (dx - mean(dx) - xh * mean(xh * dx)) * rstd
 *     dy   = dxh * (1 + scale) + xh * dscale + dshift
 *
 * with mean(xh * dx) = rstd * sum((x - mean) * dx) / C, so one pass gathers the centred variance, sum(dx) and
 * sum((x - mean) * dx) together. mean and rstd are written per row, for the backward.
 *
 * Per row: pass 1 reads x (the mean), pass 2 reads x and dx (the three sums), pass 3 reads them again and writes y
 * and dy. A row of x and dx (2 C elements) stays in L1/L2 between the passes, so memory sees one read of x and dx
 * and one write of y and dy. The mean is subtracted before squaring (rather than sum(x^2) - mean^2): rows far from
 * zero mean lose nothing to cancellation. Reductions run in double for both dtypes (for fp32 rows that is cheap and
 * accurate); the elementwise third pass runs in the storage dtype. The reductions are vectorised by `omp simd`
 * (-fopenmp or -fopenmp-simd: -O3 alone never reorders a floating-point sum); rows are split across OpenMP threads
 * when there is enough work. No -march: the library must run on any machine of the architecture it is copied to.
 * Inputs are never written.
 *
 * The kernel is written once in adaln_cpu_impl.h and instantiated below per storage type.
 */

#include <math.h>
#include <stdint.h>

#include "mfk_common.h"

#define MFK_CAT_(a, b) a##_##b
#define MFK_CAT(a, b) MFK_CAT_(a, b)

#define MFK_T float
#define MFK_SUFFIX f32
#include "adaln_cpu_impl.h"
#undef MFK_T
#undef MFK_SUFFIX

#define MFK_T double
#define MFK_SUFFIX f64
#include "adaln_cpu_impl.h"
#undef MFK_T
#undef MFK_SUFFIX

/* Lets the loader check that it opened the library it expects (bumped whenever a signature changes). */
MFK_EXPORT int mfk_abi_version(void) { return 3; }

/* 1 when built with OpenMP threads, 0 when every call runs on the calling thread. */
MFK_EXPORT int mfk_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
