/* The AVX-512 row kernel of intq.c, written with intrinsics (the portable C loops there do
 * not vectorise well enough). Same layout, same arithmetic order per 16-lane chunk:
 * tot += (q · s_g) ⊙ x, then the additive term Σ_g t_g · Σx_g. Compiled for AVX-512F/BW +
 * F16C and only called when the CPU reports AVX-512F (see intq_matmul). */
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include "intq.h"

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c,avx2")))
#define INLINE static inline __attribute__((always_inline))

TARGET INLINE float h2f(uint16_t h) { return _cvtsh_ss(h); }

/* The 4 chunks (16 int32 codes each) of one 64-code superblock. */
TARGET INLINE void decode4(const uint8_t *p, const int bits, __m512i q[4]) {
    if (bits == 8) {
        for (int c = 0; c < 4; c++) q[c] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16 * c)));
        return;
    }
    const __m512i m15 = _mm512_set1_epi32(15), m3 = _mm512_set1_epi32(3), m1 = _mm512_set1_epi32(1);
    int sh = 0;
    for (int c = 0; c < 4; c++) q[c] = _mm512_setzero_si512();
    if (bits & 4) {
        for (int j = 0; j < 2; j++) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16 * j)));
            q[2 * j] = _mm512_and_si512(v, m15);
            q[2 * j + 1] = _mm512_srli_epi32(v, 4);
        }
        p += 32;
        sh = 4;
    }
    if (bits & 2) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
        if (sh == 0) {
            q[0] = _mm512_and_si512(v, m3);
            q[1] = _mm512_and_si512(_mm512_srli_epi32(v, 2), m3);
            q[2] = _mm512_and_si512(_mm512_srli_epi32(v, 4), m3);
            q[3] = _mm512_srli_epi32(v, 6);
        } else {
            __m512i s = _mm512_set1_epi32(sh);
            q[0] = _mm512_or_si512(q[0], _mm512_sllv_epi32(_mm512_and_si512(v, m3), s));
            q[1] = _mm512_or_si512(q[1], _mm512_sllv_epi32(_mm512_and_si512(_mm512_srli_epi32(v, 2), m3), s));
            q[2] = _mm512_or_si512(q[2], _mm512_sllv_epi32(_mm512_and_si512(_mm512_srli_epi32(v, 4), m3), s));
            q[3] = _mm512_or_si512(q[3], _mm512_sllv_epi32(_mm512_srli_epi32(v, 6), s));
        }
        p += 16;
        sh += 2;
    }
    if (bits & 1) {
        /* byte i, bit k holds code 8k+i: lane l of chunk c reads byte l%8, bit 2c + l/8 */
        uint64_t b8;
        memcpy(&b8, p, 8);
        __m512i v = _mm512_cvtepu8_epi32(_mm_set1_epi64x((long long)b8));
        const __m512i hi = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        __m512i s = _mm512_set1_epi32(sh);
        for (int c = 0; c < 4; c++) {
            __m512i k = _mm512_add_epi32(hi, _mm512_set1_epi32(2 * c));
            q[c] = _mm512_or_si512(q[c], _mm512_sllv_epi32(_mm512_and_si512(_mm512_srlv_epi32(v, k), m1), s));
        }
    }
}

/* One row, one activation vector, groups of 2 chunks (32 codes) or a multiple of 4 chunks:
 * the per-chunk products are summed per group and scaled once per group. */
TARGET INLINE float row1_fast(const uint8_t *p, const uint16_t *s, const uint16_t *t, const float *x, const float *xs,
                              int G, int cpg, const int bits) {
    __m512 tot0 = _mm512_setzero_ps(), tot1 = _mm512_setzero_ps();
    __m512i q[4];
    if (cpg == 2) {
        for (int g = 0; g < G; g += 2, p += 8 * bits, x += 64) {
            decode4(p, bits, q);
            __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(q[0]), _mm512_loadu_ps(x));
            __m512 b = _mm512_mul_ps(_mm512_cvtepi32_ps(q[2]), _mm512_loadu_ps(x + 32));
            a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[1]), _mm512_loadu_ps(x + 16), a);
            b = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[3]), _mm512_loadu_ps(x + 48), b);
            tot0 = _mm512_fmadd_ps(a, _mm512_set1_ps(h2f(s[g])), tot0);
            tot1 = _mm512_fmadd_ps(b, _mm512_set1_ps(h2f(s[g + 1])), tot1);
        }
    } else {
        for (int g = 0; g < G; g++) {
            __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
            for (int k = 0; k < cpg; k += 4, p += 8 * bits, x += 64) {
                decode4(p, bits, q);
                a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[0]), _mm512_loadu_ps(x), a);
                b = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[1]), _mm512_loadu_ps(x + 16), b);
                a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[2]), _mm512_loadu_ps(x + 32), a);
                b = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q[3]), _mm512_loadu_ps(x + 48), b);
            }
            tot0 = _mm512_fmadd_ps(_mm512_add_ps(a, b), _mm512_set1_ps(h2f(s[g])), tot0);
        }
    }
    float v = _mm512_reduce_add_ps(_mm512_add_ps(tot0, tot1));
    if (t)
        for (int g = 0; g < G; g++) v += h2f(t[g]) * xs[g];
    else
        for (int g = 0; g < G; g++) v -= (float)(1 << (bits - 1)) * h2f(s[g]) * xs[g];
    return v;
}

TARGET INLINE void rows_bits(const intq_t *W, int r0, int r1, const float *xp, int xstride, const float *xs, int M,
                             float *y, const int bits) {
    const int G = W->G, cpg = W->gpad / 16, nch = G * cpg;
    const size_t row_bytes = (size_t)W->nsb * 8 * bits;
    const float half = (float)(1 << (bits - 1));
    const int fast = M == 1 && (cpg == 2 ? G % 2 == 0 : cpg % 4 == 0);
    for (int r = r0; r < r1; r++) {
        const uint8_t *p = W->codes + (size_t)r * row_bytes;
        const uint16_t *s = W->scales + (size_t)r * G;
        const uint16_t *t = W->mins ? W->mins + (size_t)r * G : NULL;
        if (fast) {
            y[r] = row1_fast(p, s, t, xp, xs, G, cpg, bits);
            continue;
        }
        for (int m0 = 0; m0 < M; m0 += INTQ_MAXM_TILE) {
            const int mt = M - m0 < INTQ_MAXM_TILE ? M - m0 : INTQ_MAXM_TILE;
            const float *x0 = xp + (size_t)m0 * xstride;
            __m512 acc[INTQ_MAXM_TILE][2];
            for (int m = 0; m < INTQ_MAXM_TILE; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
            int c = 0, g = 0, kg = 0;
            __m512 sc = _mm512_set1_ps(h2f(s[0]));
            for (int sb = 0; sb < W->nsb; sb++) {
                __m512i q[4];
                decode4(p + (size_t)sb * 8 * bits, bits, q);
                for (int k = 0; k < 4 && c < nch; k++, c++) {
                    __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(q[k]), sc);
                    if (mt == 1) {
                        acc[0][k & 1] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x0 + 16 * c), acc[0][k & 1]);
                    } else {
                        for (int m = 0; m < mt; m++)
                            acc[m][k & 1] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x0 + (size_t)m * xstride + 16 * c),
                                                            acc[m][k & 1]);
                    }
                    if (++kg == cpg) {
                        kg = 0;
                        if (++g < G) sc = _mm512_set1_ps(h2f(s[g]));
                    }
                }
            }
            for (int m = 0; m < mt; m++) {
                float v = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
                const float *xsm = xs + (size_t)(m0 + m) * G;
                if (t)
                    for (int gg = 0; gg < G; gg++) v += h2f(t[gg]) * xsm[gg];
                else
                    for (int gg = 0; gg < G; gg++) v -= half * h2f(s[gg]) * xsm[gg];
                y[(size_t)(m0 + m) * W->out + r] = v;
            }
        }
    }
}

TARGET void intq_rows_avx512(const intq_t *W, int r0, int r1, const float *xp, int xstride, const float *xs, int M,
                             float *y) {
    INTQ_BY_BITS(W->bits, rows_bits, W, r0, r1, xp, xstride, xs, M, y);
}
#endif /* x86-64 */
