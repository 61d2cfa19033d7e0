/*
 * What the native CPU kernels (the .c files here) share: export visibility, function multiversioning, threading.
 */
#ifndef MFK_COMMON_H
#define MFK_COMMON_H

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__)
#define MFK_EXPORT __attribute__((visibility("default")))
#else
#define MFK_EXPORT
#endif

/*
 * Baseline x86-64 vectors are SSE2 (2 doubles). Where the toolchain supports function multiversioning (CMake checks
 * and defines MFK_HAVE_TARGET_CLONES), the row function is also compiled for x86-64-v3 (AVX2, FMA) and v4 (AVX-512)
 * and the loader picks the best one the running CPU has: wider vectors without tying the binary to the build machine
 * (measured ~1.2-1.7x on the row loops over the SSE2 build). Other targets get the plain -O3 build.
 */
#if defined(MFK_HAVE_TARGET_CLONES)
#define MFK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MFK_MULTIVERSION
#endif

/* Below this many elements a parallel region costs more than it saves. */
#define MFK_PARALLEL_MIN_ELEMS 32768

#endif
