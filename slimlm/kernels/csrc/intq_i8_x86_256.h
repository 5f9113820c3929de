/* The int8 path of intq_i8.c on 256-bit x86 vectors: a template, included once per ISA by
 * intq_i8_avx2.c (vpmaddubsw + vpmaddwd, as llama.cpp's AVX2 dot products) and
 * intq_i8_avxvnni.c (vpdpbusd on ymm), which define before including it:
 *
 *   I8_TARGET   the target attribute string          I8_SUFFIX  the suffix of the entry point
 *   I8_VNNI     1 when the dot product is vpdpbusd
 *
 * A 64-code step of the layout (intq_i8.c) is two ymm halves: step bytes 0..31 feed lanes
 * 0..7, bytes 32..63 lanes 8..15. Unlike the AVX-512 kernel, the bit planes are shifted
 * back into whole codes before the dot product (vpmaddubsw saturates its 16-bit pair sums:
 * codes below 128 against |x| ≤ 127 stay under 2 · 127 · 127 < 2^15), so lane sums need no
 * class shift (fold = 0). 8-bit codes on AVX2 go as two nibbles, the high one weighted 16
 * by vpmaddwd. Per tile and lane the float work is the portable kernel's, so results equal
 * it to float rounding. One activation row runs 2 weight rows side by side, more run in
 * pairs of activation rows over one weight row.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include "intq.h"

#define TARGET __attribute__((target(I8_TARGET)))
#define INLINE static inline __attribute__((always_inline))
#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)

/* acc + Σ of each lane's four u8 · s8 products */
TARGET INLINE __m256i dot(__m256i acc, __m256i u, __m256i s) {
#if I8_VNNI
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* acc + Σ of each lane's four products, for full 8-bit codes */
TARGET INLINE __m256i dot8(__m256i acc, __m256i u, __m256i s) {
#if I8_VNNI
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(u, m4), s);
    const __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(u, 4), m4), s);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_set1_epi16(1)),
                                                  _mm256_madd_epi16(hi, _mm256_set1_epi16(16))));
#endif
}

/* The 64 codes of one step: c[0] step bytes 0..31, c[1] bytes 32..63 (see intq_i8.c's plane table). */
TARGET INLINE void decode_step(const uint8_t *q, const int bits, __m256i c[2]) {
    if (bits == 8) {
        c[0] = _mm256_loadu_si256((const __m256i *)q);
        c[1] = _mm256_loadu_si256((const __m256i *)(q + 32));
        return;
    }
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    int sh = 0;
    if (bits & 4) { /* byte o % 32, nibble o / 32 */
        const __m256i v = _mm256_loadu_si256((const __m256i *)q), m4 = _mm256_set1_epi8(15);
        a = _mm256_and_si256(v, m4);
        b = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        q += 32, sh = 4;
    }
    if (bits & 2) { /* byte o % 16, bits 2 · (o / 16) */
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q)), m2 = _mm256_set1_epi8(3);
        const __m256i p0 = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_set_epi64x(2, 2, 0, 0)), m2);
        const __m256i p1 = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_set_epi64x(6, 6, 4, 4)), m2);
        a = _mm256_or_si256(a, _mm256_slli_epi16(p0, sh));
        b = _mm256_or_si256(b, _mm256_slli_epi16(p1, sh));
        q += 16, sh += 2;
    }
    if (bits & 1) { /* byte o % 8, bit o / 8 */
        long long b8;
        memcpy(&b8, q, 8);
        const __m256i v = _mm256_set1_epi64x(b8), m1 = _mm256_set1_epi8(1);
        const __m256i p0 = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_set_epi64x(3, 2, 1, 0)), m1);
        const __m256i p1 = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_set_epi64x(7, 6, 5, 4)), m1);
        a = _mm256_or_si256(a, _mm256_slli_epi16(p0, sh));
        b = _mm256_or_si256(b, _mm256_slli_epi16(p1, sh));
    }
    c[0] = a, c[1] = b;
}

/* The fp16 scales (or minimums) of a tile's 16 lanes as two float vectors (lanes 0..7, 8..15).
 * Lane l takes group g0 + idx[l] of the row's G. The 8 (or 16) values are loaded from the row
 * itself, shifted back from its end when g0 is among its last groups, so nothing past the row is
 * read and nothing is copied (a copy made every row stalls on store forwarding). */
TARGET INLINE void lane_params(const uint16_t *s, const intq_tile_t *T, int G, __m256 v[2]) {
    if (T->ident) {
        v[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + T->g0)));
        v[1] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + T->g0 + 8)));
        return;
    }
    const int span = T->ng > 8 ? 16 : 8;
    if (G < span) { /* a row shorter than one load: the portable conversion */
        float f[16];
        for (int l = 0; l < 16; l++) f[l] = _cvtsh_ss(s[T->g0 + T->idx[l]]);
        v[0] = _mm256_loadu_ps(f), v[1] = _mm256_loadu_ps(f + 8);
        return;
    }
    const int start = T->g0 + span <= G ? T->g0 : G - span;
    const __m256i off = _mm256_set1_epi32(T->g0 - start);
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + start)));
    const __m256 b = span == 16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + start + 8))) : a;
    for (int h = 0; h < 2; h++) {
        const __m256i i = _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(T->idx + 8 * h)), off);
        const __m256 lo = _mm256_permutevar8x32_ps(a, i);
        v[h] = span == 16 ? _mm256_blendv_ps(lo, _mm256_permutevar8x32_ps(b, i),
                                             _mm256_castsi256_ps(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(7))))
                          : lo;
    }
}

/* Σ of the 16 lanes in a and b, one fixed order (a row's result must not depend on its neighbours). */
TARGET INLINE float hsum(__m256 a, __m256 b) {
    const __m256 s = _mm256_add_ps(a, b);
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
}

#define MT_MAX 2 /* activation rows per block */
#define NR_MAX 4 /* weight rows per block */

/* Without VNNI, codes of up to 4 bits keep vpmaddubsw's pair sums in 16 bits for a whole tile and
 * widen them once: a tile is at most 8 steps, 8 · 2 · 15 · 127 = 30480 < 2^15. */
#define PAIRS16(bits) (!I8_VNNI && (bits) <= 4)

/* NS steps of weight rows p + j · row_bytes (j < NR) against activation rows xq + m · rc (m < MT). */
TARGET INLINE void steps(const uint8_t *p, size_t row_bytes, const int8_t *xq, int rc, const int NS, const int NR,
                         const int MT, const int bits, __m256i acc[NR_MAX][MT_MAX][2]) {
    for (int k = 0; k < NS; k++, p += 8 * bits, xq += 64) {
        __m256i xv[MT_MAX][2];
        for (int m = 0; m < MT; m++) {
            xv[m][0] = _mm256_loadu_si256((const __m256i *)(xq + (size_t)m * rc));
            xv[m][1] = _mm256_loadu_si256((const __m256i *)(xq + (size_t)m * rc + 32));
        }
        for (int j = 0; j < NR; j++) {
            __m256i c[2];
            decode_step(p + j * row_bytes, bits, c);
            for (int m = 0; m < MT; m++)
                for (int h = 0; h < 2; h++)
                    acc[j][m][h] = bits == 8   ? dot8(acc[j][m][h], c[h], xv[m][h])
                                   : PAIRS16(bits) ? _mm256_add_epi16(acc[j][m][h], _mm256_maddubs_epi16(c[h], xv[m][h]))
                                                  : dot(acc[j][m][h], c[h], xv[m][h]);
        }
    }
    if (PAIRS16(bits)) /* the 16-bit pair sums of the tile into 32-bit lane sums */
        for (int j = 0; j < NR; j++)
            for (int m = 0; m < MT; m++)
                for (int h = 0; h < 2; h++) acc[j][m][h] = _mm256_madd_epi16(acc[j][m][h], _mm256_set1_epi16(1));
}

/* Weight rows r .. r + NR - 1 against activation rows m0 .. m0 + MT - 1. */
TARGET INLINE void rows_block(const intq_t *W, const intq_x8_t *X, int r, const int NR, int m0, const int MT,
                              const int bits, float *y) {
    const int nt = X->ntiles, rc = W->row_codes, G = W->G;
    const size_t row_bytes = (size_t)rc * bits / 8;
    const uint8_t *p = W->codes + (size_t)r * row_bytes;
    const int8_t *xq = X->xq + (size_t)m0 * rc;
    const float *dv = X->dv + (size_t)m0 * nt * 16, *xs = X->xsv + (size_t)m0 * nt * 16;
    __m256 acc[NR_MAX][MT_MAX]; /* both halves of a row's lanes, in one fixed order */
    for (int j = 0; j < NR; j++)
        for (int m = 0; m < MT; m++) acc[j][m] = _mm256_setzero_ps();
    for (int i = 0; i < nt; i++, dv += 16, xs += 16) {
        const intq_tile_t *T = &X->tiles[i];
        __m256i is[NR_MAX][MT_MAX][2];
        for (int j = 0; j < NR; j++)
            for (int m = 0; m < MT; m++) is[j][m][0] = is[j][m][1] = _mm256_setzero_si256();
        switch (T->nsteps) { /* constant trip counts: unrolled, accumulators stay in registers */
        case 8: steps(p, row_bytes, xq, rc, 8, NR, MT, bits, is); break;
        case 4: steps(p, row_bytes, xq, rc, 4, NR, MT, bits, is); break;
        case 2: steps(p, row_bytes, xq, rc, 2, NR, MT, bits, is); break;
        default: steps(p, row_bytes, xq, rc, 1, NR, MT, bits, is); break;
        }
        p += (size_t)T->nsteps * 8 * bits;
        xq += 64 * T->nsteps;
        for (int j = 0; j < NR; j++) {
            const uint16_t *s = W->scales + (size_t)(r + j) * G, *t = W->mins ? W->mins + (size_t)(r + j) * G : NULL;
            __m256 sv[2], tv[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            lane_params(s, T, G, sv);
            if (t) lane_params(t, T, G, tv);
            for (int m = 0; m < MT; m++)
                for (int h = 0; h < 2; h++) {
                    const __m256 f = _mm256_cvtepi32_ps(is[j][m][h]);
                    const __m256 d = _mm256_loadu_ps(dv + (size_t)m * nt * 16 + 8 * h);
                    const __m256 x = _mm256_loadu_ps(xs + (size_t)m * nt * 16 + 8 * h);
                    if (t)
                        acc[j][m] = _mm256_fmadd_ps(tv[h], x, _mm256_fmadd_ps(_mm256_mul_ps(f, d), sv[h], acc[j][m]));
                    else
                        acc[j][m] = _mm256_fmadd_ps(_mm256_fmadd_ps(f, d, x), sv[h], acc[j][m]);
                }
        }
    }
    for (int j = 0; j < NR; j++)
        for (int m = 0; m < MT; m++) y[(size_t)(m0 + m) * W->out + r + j] = hsum(acc[j][m], _mm256_setzero_ps());
}

/* Weight rows ahead of the current one whose codes and parameters are prefetched (as intq_i8_avx512.c). */
#define PF_ROWS 64

TARGET INLINE void prefetch_rows(const intq_t *W, int r, int n, size_t row_bytes) {
    const char *c = (const char *)(W->codes + (size_t)r * row_bytes);
    for (size_t b = 0; b < n * row_bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T1);
    const size_t pb = (size_t)n * W->G * sizeof(uint16_t);
    const char *sc = (const char *)(W->scales + (size_t)r * W->G);
    const char *mn = W->mins ? (const char *)(W->mins + (size_t)r * W->G) : NULL;
    for (size_t b = 0; b < pb; b += 64) {
        _mm_prefetch(sc + b, _MM_HINT_T1);
        if (mn) _mm_prefetch(mn + b, _MM_HINT_T1);
    }
}

/* Activation rows m0 .. m0 + mt - 1 (mt <= MT_MAX) over weight rows r .. r + nr - 1 (nr <= 2). */
TARGET INLINE void block_any(const intq_t *W, const intq_x8_t *X, int r, int nr, int m0, int mt, const int bits,
                             float *y) {
    if (mt == 1 && nr == 2) {
        rows_block(W, X, r, 2, m0, 1, bits, y);
        return;
    }
    for (int j = 0; j < nr; j++) {
        if (mt == 2)
            rows_block(W, X, r + j, 1, m0, 2, bits, y);
        else
            rows_block(W, X, r + j, 1, m0, 1, bits, y);
    }
}

/* Rows [r0, r1) for M activation rows: up to 4 (decoding, verification) stream the weights once,
 * each pair of weight rows serving every activation row while in L1; more go in blocks of 64
 * activation rows (their int8 copies stay in L2) over chunks of 4 weight rows. */
TARGET INLINE void rows_bits(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y, const int bits) {
    const size_t row_bytes = (size_t)W->row_codes * bits / 8;
    if (M <= INTQ_MAXM_TILE) {
        for (int r = r0; r < r1; r += 2) {
            const int nr = r1 - r < 2 ? r1 - r : 2;
            if (r + PF_ROWS + nr <= r1) prefetch_rows(W, r + PF_ROWS, nr, row_bytes);
            for (int m0 = 0; m0 < M; m0 += MT_MAX) block_any(W, X, r, nr, m0, M - m0 < MT_MAX ? M - m0 : MT_MAX, bits, y);
        }
        return;
    }
    for (int mb = 0; mb < M; mb += 64) {
        const int me = M < mb + 64 ? M : mb + 64;
        for (int r = r0; r < r1; r += 4) {
            const int re = r1 < r + 4 ? r1 : r + 4;
            for (int m0 = mb; m0 < me; m0 += MT_MAX)
                for (int rr = r; rr < re; rr += 2)
                    block_any(W, X, rr, re - rr < 2 ? re - rr : 2, m0, me - m0 < MT_MAX ? me - m0 : MT_MAX, bits, y);
        }
    }
}

TARGET void CAT(intq_rows_i8, I8_SUFFIX)(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y) {
    INTQ_BY_BITS(W->bits, rows_bits, W, X, r0, r1, M, y);
}
