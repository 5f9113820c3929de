/* Helpers shared by the portable C kernels (intq.c, intq_i8.c): GCC target clones for
 * AVX2+FMA and baseline x86-64, forced inlining, fp16 -> float. */
#ifndef SLIMLM_PORTABLE_H
#define SLIMLM_PORTABLE_H
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define CLONES
#endif
#define INLINE static inline __attribute__((always_inline))

INLINE float h2f(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}
#endif
