/* Helpers shared by the portable C kernels (intq.c, intq_i8.c, lean.c): GCC target clones for
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

/* IEEE half -> float. _Float16 where the compiler has it on this target (GCC 12+ on x86-64,
 * GCC and clang on aarch64), else the bits rearranged by hand (GCC 11, older clang). */
#if defined(__FLT16_MAX__) && !defined(SLIMLM_NO_FLOAT16)
INLINE float h2f(uint16_t h) {
    _Float16 f;
    memcpy(&f, &h, 2);
    return (float)f;
}
#else
INLINE float h2f(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
    uint32_t u;
    if (e == 31) {
        u = sign | 0x7f800000u | (m << 13); /* inf, nan */
    } else if (e) {
        u = sign | ((e + 112) << 23) | (m << 13); /* normal: rebias 15 -> 127 */
    } else {
        float f = (float)m * (1.f / 16777216.f); /* subnormal (or zero): m · 2^-24, exact */
        memcpy(&u, &f, 4);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}
#endif
#endif
