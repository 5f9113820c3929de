/* The int8 path of intq_i8.c with AVX-512 VNNI. Per 64-code step and bit plane of a weight
 * row: one broadcast load and one AND (8-bit codes: the load alone), then one vpdpbusd per
 * activation row; up to INTQ_MAXM_TILE activation rows share each unpacked step, and 4
 * weight rows (2 with several activation rows) run side by side so that independent dpbusd
 * chains hide the instruction's latency. Per tile and row the float work is one conversion,
 * the scales (and minimums) converted from fp16, two or three multiply-adds. Measured on a
 * 2-vCPU Sapphire Rapids VM, that work and the per-step pair are about equal shares of the
 * time, so 2- and 4-bit codes cost the same compute and 2 bits win by reading fewer bytes.
 * Compiled for AVX-512F/BW/VL + VNNI, called only when the CPU reports them (intq_has_vnni). */
#if defined(__x86_64__) || defined(_M_X64)
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

/* Plane masks: the bits of step byte o (see intq_i8.c). */
#define K4                                                                                                             \
    _mm512_set_epi64(-0x0f0f0f0f0f0f0f10LL, -0x0f0f0f0f0f0f0f10LL, -0x0f0f0f0f0f0f0f10LL, -0x0f0f0f0f0f0f0f10LL,       \
                     0x0f0f0f0f0f0f0f0fLL, 0x0f0f0f0f0f0f0f0fLL, 0x0f0f0f0f0f0f0f0fLL, 0x0f0f0f0f0f0f0f0fLL)
#define K2                                                                                                             \
    _mm512_set_epi64(-0x3f3f3f3f3f3f3f40LL, -0x3f3f3f3f3f3f3f40LL, 0x3030303030303030LL, 0x3030303030303030LL,        \
                     0x0c0c0c0c0c0c0c0cLL, 0x0c0c0c0c0c0c0c0cLL, 0x0303030303030303LL, 0x0303030303030303LL)
#define K1                                                                                                             \
    _mm512_set_epi64(-0x7f7f7f7f7f7f7f80LL, 0x4040404040404040LL, 0x2020202020202020LL, 0x1010101010101010LL,         \
                     0x0808080808080808LL, 0x0404040404040404LL, 0x0202020202020202LL, 0x0101010101010101LL)

/* The 16 fp16 scales (or minimums) of a tile's lanes as floats. */
TARGET INLINE __m512 lane_params(const uint16_t *s, const intq_tile_t *T) {
    if (T->ident) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + T->g0)));
    const __mmask16 m = (__mmask16)((1u << T->ng) - 1);
    const __m512 v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + T->g0));
    return _mm512_permutexvar_ps(_mm512_loadu_si512(T->idx), v);
}

/* The lane sums of four vectors, (Σ a0, Σ a1, Σ a2, Σ a3): one fixed addition order for every
 * row, so a row's result does not depend on which rows share its block. */
TARGET INLINE __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512 v01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
    const __m512 v23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
    __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, 0x88), _mm512_shuffle_f32x4(v01, v23, 0xDD));
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));
    v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), v));
}

/* NS steps of 64 codes of rows p + j · row_bytes (j < NR) into the plane accumulators. */
TARGET INLINE void steps(const uint8_t *p, size_t row_bytes, const int8_t *xq, int rc, const int NS, const int NR,
                         const int MT, const int bits, __m512i a4[4][INTQ_MAXM_TILE], __m512i a2[4][INTQ_MAXM_TILE],
                         __m512i a1[4][INTQ_MAXM_TILE]) {
    const __m512i k4 = K4, k2 = K2, k1 = K1;
    for (int k = 0; k < NS; k++) {
        __m512i xv[INTQ_MAXM_TILE];
        for (int m = 0; m < MT; m++) xv[m] = _mm512_loadu_si512(xq + (size_t)m * rc);
        xq += 64;
        for (int j = 0; j < NR; j++) {
            const uint8_t *q = p + j * row_bytes;
            if (bits == 8) {
                const __m512i v = _mm512_loadu_si512(q);
                for (int m = 0; m < MT; m++) a4[j][m] = _mm512_dpbusd_epi32(a4[j][m], v, xv[m]);
                continue;
            }
            if (bits & 4) {
                const __m512i v = _mm512_and_si512(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)q)), k4);
                for (int m = 0; m < MT; m++) a4[j][m] = _mm512_dpbusd_epi32(a4[j][m], v, xv[m]);
                q += 32;
            }
            if (bits & 2) {
                const __m512i v = _mm512_and_si512(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)q)), k2);
                for (int m = 0; m < MT; m++) a2[j][m] = _mm512_dpbusd_epi32(a2[j][m], v, xv[m]);
                q += 16;
            }
            if (bits & 1) {
                long long b8;
                memcpy(&b8, q, 8);
                const __m512i v = _mm512_and_si512(_mm512_set1_epi64(b8), k1);
                for (int m = 0; m < MT; m++) a1[j][m] = _mm512_dpbusd_epi32(a1[j][m], v, xv[m]);
            }
        }
        p += 8 * bits;
    }
}

/* Weight rows r .. r + NR - 1 against activation rows m0 .. m0 + MT - 1: NR · MT independent
 * dpbusd chains per plane (the instruction's latency would otherwise bound a single row). */
TARGET INLINE void rows_block(const intq_t *W, const intq_x8_t *X, int r, const int NR, int m0, const int MT,
                              const int bits, float *y) {
    const int nt = X->ntiles, rc = W->row_codes, G = W->G;
    const size_t row_bytes = (size_t)rc * bits / 8;
    /* the class shift of each lane */
    const __m512i c4 = _mm512_set_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i c2 = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
    const __m512i c1 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const int sh2 = bits & 4 ? 4 : 0, sh1 = sh2 + (bits & 2 ? 2 : 0);
    const uint8_t *p = W->codes + (size_t)r * row_bytes;
    const int8_t *xq = X->xq + (size_t)m0 * rc;
    const float *dv = X->dv + (size_t)m0 * nt * 16, *xs = X->xsv + (size_t)m0 * nt * 16;
    __m512 acc[4][INTQ_MAXM_TILE]; /* fixed sizes: registers, not stack arrays */
    for (int j = 0; j < NR; j++)
        for (int m = 0; m < MT; m++) acc[j][m] = _mm512_setzero_ps();
    for (int i = 0; i < nt; i++) {
        const intq_tile_t *T = &X->tiles[i];
        __m512i a4[4][INTQ_MAXM_TILE], a2[4][INTQ_MAXM_TILE], a1[4][INTQ_MAXM_TILE];
        for (int j = 0; j < NR; j++)
            for (int m = 0; m < MT; m++) a4[j][m] = a2[j][m] = a1[j][m] = _mm512_setzero_si512();
        switch (T->nsteps) { /* constant trip counts: unrolled, accumulators stay in registers */
        case 8: steps(p, row_bytes, xq, rc, 8, NR, MT, bits, a4, a2, a1); break;
        case 4: steps(p, row_bytes, xq, rc, 4, NR, MT, bits, a4, a2, a1); break;
        case 2: steps(p, row_bytes, xq, rc, 2, NR, MT, bits, a4, a2, a1); break;
        default: steps(p, row_bytes, xq, rc, 1, NR, MT, bits, a4, a2, a1); break;
        }
        p += (size_t)T->nsteps * 8 * bits;
        xq += 64 * T->nsteps;
        __m512 d[INTQ_MAXM_TILE], x[INTQ_MAXM_TILE];
        for (int m = 0; m < MT; m++) {
            d[m] = _mm512_loadu_ps(dv + (size_t)m * nt * 16);
            x[m] = _mm512_loadu_ps(xs + (size_t)m * nt * 16);
        }
        dv += 16;
        xs += 16;
        for (int j = 0; j < NR; j++) {
            const uint16_t *s = W->scales + (size_t)(r + j) * G, *t = W->mins ? W->mins + (size_t)(r + j) * G : NULL;
            const __m512 sv = lane_params(s, T), tv = t ? lane_params(t, T) : _mm512_setzero_ps();
            for (int m = 0; m < MT; m++) {
                __m512i is = a4[j][m];
                if (bits == 2) is = a2[j][m]; /* one plane: its class is folded into dv (intq_i8.c) */
                if (bits != 8 && bits != 4 && bits != 2) {
                    is = bits & 4 ? _mm512_srav_epi32(a4[j][m], c4) : _mm512_setzero_si512();
                    if (bits & 2) is = _mm512_add_epi32(is, _mm512_slli_epi32(_mm512_srav_epi32(a2[j][m], c2), sh2));
                    if (bits & 1) is = _mm512_add_epi32(is, _mm512_slli_epi32(_mm512_srav_epi32(a1[j][m], c1), sh1));
                }
                const __m512 f = _mm512_cvtepi32_ps(is);
                if (t)
                    acc[j][m] = _mm512_fmadd_ps(tv, x[m], _mm512_fmadd_ps(_mm512_mul_ps(f, d[m]), sv, acc[j][m]));
                else
                    acc[j][m] = _mm512_fmadd_ps(_mm512_fmadd_ps(f, d[m], x[m]), sv, acc[j][m]);
            }
        }
    }
    for (int m = 0; m < MT; m++) {
        const __m512 z = _mm512_setzero_ps();
        const __m128 v = reduce4(acc[0][m], NR > 1 ? acc[1][m] : z, NR > 2 ? acc[2][m] : z, NR > 3 ? acc[3][m] : z);
        float *ym = y + (size_t)(m0 + m) * W->out + r;
        if (NR == 4) {
            _mm_storeu_ps(ym, v);
        } else {
            float t4[4];
            _mm_storeu_ps(t4, v);
            for (int j = 0; j < NR; j++) ym[j] = t4[j];
        }
    }
}

/* Rows r .. r + nr - 1 (nr <= 4) against activation rows m0 .. m0 + MT - 1: blocks of 4 rows for one
 * activation row, of 2 for more. */
TARGET INLINE void chunk(const intq_t *W, const intq_x8_t *X, int r, int nr, int m0, const int MT, const int bits,
                         float *y) {
    int j = 0;
    if (MT == 1 && nr == 4) {
        rows_block(W, X, r, 4, m0, 1, bits, y);
        return;
    }
    if (MT > 1)
        for (; j + 2 <= nr; j += 2) rows_block(W, X, r + j, 2, m0, MT, bits, y);
    for (; j < nr; j++) rows_block(W, X, r + j, 1, m0, MT, bits, y);
}

/* Rows ahead of the current block whose codes, scales and minimums are prefetched into L2: the
 * hardware prefetcher alone leaves a decode step's product short of the memory bandwidth (a
 * whole step is a stream of weights read once). 64 rows measured best or within noise of it
 * for 2-, 4- and 8-bit models (32 to 256 tried; +20-29 % tokens/s at 2 and 4 bits, +8 % at 8). */
#define PF_ROWS 64

/* Prefetch the codes, scales and minimums of rows [r, r + n). */
TARGET INLINE void prefetch_rows(const intq_t *W, int r, int n, size_t row_bytes) {
    const char *c = (const char *)(W->codes + (size_t)r * row_bytes);
    for (size_t b = 0; b < n * row_bytes; b += 64) __builtin_prefetch(c + b, 0, 2);
    const size_t pb = (size_t)n * W->G * sizeof(uint16_t);
    const char *sc = (const char *)(W->scales + (size_t)r * W->G);
    const char *mn = W->mins ? (const char *)(W->mins + (size_t)r * W->G) : NULL;
    for (size_t b = 0; b < pb; b += 64) {
        __builtin_prefetch(sc + b, 0, 2);
        if (mn) __builtin_prefetch(mn + b, 0, 2);
    }
}

/* Rows [r0, r1) against one tile of activation rows (M <= 4): a tight loop over blocks of rows,
 * each prefetching the block PF_ROWS rows ahead. */
TARGET INLINE void rows_mt(const intq_t *W, const intq_x8_t *X, int r0, int r1, const int MT, const int bits,
                           float *y) {
    const int NR = MT == 1 ? 4 : 2;
    const size_t row_bytes = (size_t)W->row_codes * bits / 8;
    int r = r0;
    for (; r + NR <= r1; r += NR) {
        if (r + PF_ROWS + NR <= r1) prefetch_rows(W, r + PF_ROWS, NR, row_bytes);
        rows_block(W, X, r, NR, 0, MT, bits, y);
    }
    for (; r < r1; r++) rows_block(W, X, r, 1, 0, MT, bits, y);
}

/* Rows [r0, r1). More than 4 activation rows: blocks of 64 of them (their int8 copies stay in L2),
 * within a block chunks of 4 weight rows (in L1 while every activation row of the block passes),
 * so the weights are read once per 64 activation rows. */
TARGET INLINE void rows_bits(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y, const int bits) {
    switch (M) {
    case 1: rows_mt(W, X, r0, r1, 1, bits, y); return;
    case 2: rows_mt(W, X, r0, r1, 2, bits, y); return;
    case 3: rows_mt(W, X, r0, r1, 3, bits, y); return;
    case 4: rows_mt(W, X, r0, r1, 4, bits, y); return;
    }
    for (int mb = 0; mb < M; mb += 64) {
        const int me = M < mb + 64 ? M : mb + 64;
        for (int r = r0; r < r1; r += 4) {
            const int nr = r1 - r < 4 ? r1 - r : 4;
            for (int m0 = mb; m0 < me; m0 += INTQ_MAXM_TILE) {
                switch (me - m0) {
                case 1: chunk(W, X, r, nr, m0, 1, bits, y); break;
                case 2: chunk(W, X, r, nr, m0, 2, bits, y); break;
                case 3: chunk(W, X, r, nr, m0, 3, bits, y); break;
                default: chunk(W, X, r, nr, m0, 4, bits, y); break;
                }
            }
        }
    }
}

TARGET void intq_rows_i8_avx512(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y) {
    INTQ_BY_BITS(W->bits, rows_bits, W, X, r0, r1, M, y);
}
#endif /* x86-64 */
