/* The int8 path of intq_i8.c with AVX-512 VNNI: per 64-code step and bit plane one
 * broadcast load, one AND and one vpdpbusd per activation row (8-bit codes: the load
 * only). Up to INTQ_MAXM_TILE activation rows share each unpacked step. Compiled for
 * AVX-512F/BW/VL + VNNI and called only when the CPU reports them (intq_has_vnni). */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include "intq.h"

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c,avx2")))
#define INLINE static inline __attribute__((always_inline))

/* Per sub-block: amax, d = amax / 127, xi = round-half-even(x · (1 / d)) — as quantize_blocks in intq_i8.c. */
TARGET void intq_quantize_blocks_avx512(const intq_t *W, const float *x, int8_t *xi, float *d, float *sig) {
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int sb = 0; sb < W->nsub; sb++) {
        const int g = sb / W->spg, c0 = g * W->group, j0 = (sb % W->spg) * W->B;
        const int glen = c0 + W->group <= W->in ? W->group : W->in - c0;
        const int n = glen - j0 < W->B ? (glen - j0 > 0 ? glen - j0 : 0) : W->B;
        const __mmask16 m0 = n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
        const __mmask16 m1 = n >= 32 ? 0xFFFF : (n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0);
        const __m512 a = _mm512_maskz_loadu_ps(m0, x + c0 + j0), b = _mm512_maskz_loadu_ps(m1, x + c0 + j0 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const float ds = amax / 127.f, id = ds != 0.f ? 1.f / ds : 0.f;
        const __m512 vid = _mm512_set1_ps(id);
        __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, vid)), ib = _mm512_cvtps_epi32(_mm512_mul_ps(b, vid));
        ia = _mm512_min_epi32(_mm512_max_epi32(ia, lo), hi);
        ib = _mm512_min_epi32(_mm512_max_epi32(ib, lo), hi);
        _mm_storeu_si128((__m128i *)(xi + (size_t)sb * W->B), _mm512_cvtepi32_epi8(ia));
        if (W->B == 32) _mm_storeu_si128((__m128i *)(xi + (size_t)sb * W->B + 16), _mm512_cvtepi32_epi8(ib));
        d[sb] = ds;
        sig[sb] = ds * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(ia, ib));
    }
}

/* The 16 fp16 scales (or minimums) of a tile's lanes as floats. */
TARGET INLINE __m512 lane_params(const uint16_t *s, const intq_tile_t *T) {
    const __mmask16 m = (__mmask16)((1u << T->ng) - 1);
    const __m512 v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + T->g0));
    return T->ident ? v : _mm512_permutexvar_ps(_mm512_loadu_si512(T->idx), v);
}

/* One weight row against activation rows m0 .. m0 + MT - 1. */
TARGET INLINE void row_i8(const intq_t *W, const intq_x8_t *X, const uint8_t *p, const uint16_t *s,
                          const uint16_t *t, int r, int m0, const int MT, const int bits, float *y) {
    const int nt = X->ntiles, rc = W->row_codes;
    /* plane masks: the bits of step byte o (see intq_i8.c), and the class shift of each lane */
    const __m512i k4 = _mm512_set_epi64(-0x0f0f0f0f0f0f0f10LL, -0x0f0f0f0f0f0f0f10LL, -0x0f0f0f0f0f0f0f10LL,
                                        -0x0f0f0f0f0f0f0f10LL, 0x0f0f0f0f0f0f0f0fLL, 0x0f0f0f0f0f0f0f0fLL,
                                        0x0f0f0f0f0f0f0f0fLL, 0x0f0f0f0f0f0f0f0fLL);
    const __m512i k2 = _mm512_set_epi64(-0x3f3f3f3f3f3f3f40LL, -0x3f3f3f3f3f3f3f40LL, 0x3030303030303030LL,
                                        0x3030303030303030LL, 0x0c0c0c0c0c0c0c0cLL, 0x0c0c0c0c0c0c0c0cLL,
                                        0x0303030303030303LL, 0x0303030303030303LL);
    const __m512i k1 = _mm512_set_epi64(-0x7f7f7f7f7f7f7f80LL, 0x4040404040404040LL, 0x2020202020202020LL,
                                        0x1010101010101010LL, 0x0808080808080808LL, 0x0404040404040404LL,
                                        0x0202020202020202LL, 0x0101010101010101LL);
    const __m512i c4 = _mm512_set_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i c2 = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
    const __m512i c1 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const int sh2 = bits & 4 ? 4 : 0, sh1 = sh2 + (bits & 2 ? 2 : 0);
    const int8_t *xq[INTQ_MAXM_TILE];
    const float *dv[INTQ_MAXM_TILE], *xs[INTQ_MAXM_TILE];
    __m512 acc[INTQ_MAXM_TILE];
    for (int m = 0; m < MT; m++) {
        xq[m] = X->xq + (size_t)(m0 + m) * rc;
        dv[m] = X->dv + (size_t)(m0 + m) * nt * 16;
        xs[m] = X->xsv + (size_t)(m0 + m) * nt * 16;
        acc[m] = _mm512_setzero_ps();
    }
    for (int i = 0; i < nt; i++) {
        const intq_tile_t *T = &X->tiles[i];
        __m512i a4[INTQ_MAXM_TILE], a2[INTQ_MAXM_TILE], a1[INTQ_MAXM_TILE];
        for (int m = 0; m < MT; m++) a4[m] = a2[m] = a1[m] = _mm512_setzero_si512();
        for (int k = 0; k < T->nsteps; k++) {
            __m512i xv[INTQ_MAXM_TILE];
            for (int m = 0; m < MT; m++) {
                xv[m] = _mm512_loadu_si512(xq[m]);
                xq[m] += 64;
            }
            const uint8_t *q = p;
            if (bits == 8) {
                const __m512i v = _mm512_loadu_si512(q);
                for (int m = 0; m < MT; m++) a4[m] = _mm512_dpbusd_epi32(a4[m], v, xv[m]);
            } else {
                if (bits & 4) {
                    const __m512i v = _mm512_and_si512(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)q)), k4);
                    for (int m = 0; m < MT; m++) a4[m] = _mm512_dpbusd_epi32(a4[m], v, xv[m]);
                    q += 32;
                }
                if (bits & 2) {
                    const __m512i v = _mm512_and_si512(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)q)), k2);
                    for (int m = 0; m < MT; m++) a2[m] = _mm512_dpbusd_epi32(a2[m], v, xv[m]);
                    q += 16;
                }
                if (bits & 1) {
                    long long b8;
                    memcpy(&b8, q, 8);
                    const __m512i v = _mm512_and_si512(_mm512_set1_epi64(b8), k1);
                    for (int m = 0; m < MT; m++) a1[m] = _mm512_dpbusd_epi32(a1[m], v, xv[m]);
                }
            }
            p += 8 * bits;
        }
        const __m512 sv = lane_params(s, T), tv = t ? lane_params(t, T) : _mm512_setzero_ps();
        for (int m = 0; m < MT; m++) {
            __m512i is = a4[m];
            if (bits != 8) {
                is = bits & 4 ? _mm512_srav_epi32(a4[m], c4) : _mm512_setzero_si512();
                if (bits & 2) is = _mm512_add_epi32(is, _mm512_slli_epi32(_mm512_srav_epi32(a2[m], c2), sh2));
                if (bits & 1) is = _mm512_add_epi32(is, _mm512_slli_epi32(_mm512_srav_epi32(a1[m], c1), sh1));
            }
            const __m512 f = _mm512_cvtepi32_ps(is), d = _mm512_loadu_ps(dv[m]), x = _mm512_loadu_ps(xs[m]);
            if (t)
                acc[m] = _mm512_fmadd_ps(tv, x, _mm512_fmadd_ps(_mm512_mul_ps(f, d), sv, acc[m]));
            else
                acc[m] = _mm512_fmadd_ps(_mm512_fmadd_ps(f, d, x), sv, acc[m]);
            dv[m] += 16;
            xs[m] += 16;
        }
    }
    for (int m = 0; m < MT; m++) y[(size_t)(m0 + m) * W->out + r] = _mm512_reduce_add_ps(acc[m]);
}

TARGET INLINE void rows_bits(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y, const int bits) {
    const size_t row_bytes = (size_t)W->row_codes * bits / 8;
    for (int r = r0; r < r1; r++) {
        const uint8_t *p = W->codes + (size_t)r * row_bytes;
        const uint16_t *s = W->scales + (size_t)r * W->G, *t = W->mins ? W->mins + (size_t)r * W->G : NULL;
        for (int m0 = 0; m0 < M; m0 += INTQ_MAXM_TILE) {
            switch (M - m0) {
            case 1: row_i8(W, X, p, s, t, r, m0, 1, bits, y); break;
            case 2: row_i8(W, X, p, s, t, r, m0, 2, bits, y); break;
            case 3: row_i8(W, X, p, s, t, r, m0, 3, bits, y); break;
            default: row_i8(W, X, p, s, t, r, m0, 4, bits, y); break;
            }
        }
    }
}

TARGET void intq_rows_i8_avx512(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y) {
    switch (W->bits) {
    case 2: rows_bits(W, X, r0, r1, M, y, 2); break;
    case 3: rows_bits(W, X, r0, r1, M, y, 3); break;
    case 4: rows_bits(W, X, r0, r1, M, y, 4); break;
    case 5: rows_bits(W, X, r0, r1, M, y, 5); break;
    case 6: rows_bits(W, X, r0, r1, M, y, 6); break;
    case 7: rows_bits(W, X, r0, r1, M, y, 7); break;
    default: rows_bits(W, X, r0, r1, M, y, 8); break;
    }
}
