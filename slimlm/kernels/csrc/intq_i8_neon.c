/* The int8 path of intq_i8.c on aarch64 with the dot-product extension (sdot, Armv8.2+:
 * Cortex-A55/A76 and later, Neoverse, Apple M1+). Called only when cpu.c finds it
 * (HWCAP_ASIMDDP); compiled with a target attribute, so the build needs no -march flag.
 *
 * A 64-code step of the layout is four 16-byte registers: step bytes 16h..16h+15 feed
 * lanes 4h..4h+3, whose four bytes each are exactly the operand of one sdot lane. As in
 * the 256-bit x86 kernels, the bit planes are shifted back into whole codes before the dot
 * product, so lane sums are plain (fold = 0). sdot is signed × signed: codes of up to 7 bits
 * (≤ 127) are already int8; 8-bit codes go as c − 128 (one XOR with 0x80), and 128 · Σ xi of
 * the lane, one more sdot per activation row shared by every weight row, is added back:
 * exact in int32. Per tile and lane the float work is the portable kernel's; the 16 lanes
 * are summed into one float vector (lane l into l % 4) whatever the blocking, so a row's
 * result does not depend on its neighbours or on M. One activation row runs 2 weight rows
 * side by side, more run in pairs of activation rows over one weight row.
 */
#if defined(__aarch64__)
#include <arm_neon.h>
#include <stdint.h>
#include <string.h>
#include "intq.h"

#if defined(__clang__)
#define TARGET __attribute__((target("dotprod")))
#else
#define TARGET __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#define INLINE static inline __attribute__((always_inline))

/* acc + Σ of each lane's four s8 · s8 products. Clang before 16 defines vdotq_s32 only
 * when the whole file is built for dotprod (__ARM_FEATURE_DOTPROD); its builtin, which
 * the header wraps, works under the target attribute. */
TARGET INLINE int32x4_t dot(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__clang__) && !defined(__ARM_FEATURE_DOTPROD) && defined(__LITTLE_ENDIAN__)
    return (int32x4_t)__builtin_neon_vdotq_v((int8x16_t)acc, a, b, 34);
#else
    return vdotq_s32(acc, a, b);
#endif
}

/* The 64 codes of one step, c[h] = step bytes 16h..16h+15 (see intq_i8.c's plane table);
 * 8-bit codes come out as c − 128. */
TARGET INLINE void decode_step(const uint8_t *q, const int bits, int8x16_t c[4]) {
    if (bits == 8) {
        for (int h = 0; h < 4; h++) c[h] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(q + 16 * h), vdupq_n_u8(0x80)));
        return;
    }
    uint8x16_t a[4] = {vdupq_n_u8(0), vdupq_n_u8(0), vdupq_n_u8(0), vdupq_n_u8(0)};
    int sh = 0;
    if (bits & 4) { /* byte o % 32, nibble o / 32 */
        const uint8x16_t v0 = vld1q_u8(q), v1 = vld1q_u8(q + 16), m4 = vdupq_n_u8(15);
        a[0] = vandq_u8(v0, m4), a[1] = vandq_u8(v1, m4);
        a[2] = vshrq_n_u8(v0, 4), a[3] = vshrq_n_u8(v1, 4);
        q += 32, sh = 4;
    }
    if (bits & 2) { /* byte o % 16, bits 2 · (o / 16) */
        const uint8x16_t v = vld1q_u8(q), m2 = vdupq_n_u8(3);
        const int8x16_t s = vdupq_n_s8((int8_t)sh);
        a[0] = vorrq_u8(a[0], vshlq_u8(vandq_u8(v, m2), s));
        a[1] = vorrq_u8(a[1], vshlq_u8(vandq_u8(vshrq_n_u8(v, 2), m2), s));
        a[2] = vorrq_u8(a[2], vshlq_u8(vandq_u8(vshrq_n_u8(v, 4), m2), s));
        a[3] = vorrq_u8(a[3], vshlq_u8(vshrq_n_u8(v, 6), s));
        q += 16, sh += 2;
    }
    if (bits & 1) { /* byte o % 8, bit o / 8: register h holds bits 2h (bytes 0..7) and 2h + 1 (8..15) */
        const uint8x8_t b = vld1_u8(q);
        const uint8x16_t v = vcombine_u8(b, b), m1 = vdupq_n_u8(1);
        const int8x16_t s = vdupq_n_s8((int8_t)sh);
        const int8x16_t odd = vcombine_s8(vdup_n_s8(0), vdup_n_s8(-1)); /* -1: one more right shift */
        for (int h = 0; h < 4; h++) {
            const uint8x16_t bit = vandq_u8(vshlq_u8(v, vaddq_s8(odd, vdupq_n_s8((int8_t)(-2 * h)))), m1);
            a[h] = vorrq_u8(a[h], vshlq_u8(bit, s));
        }
    }
    for (int h = 0; h < 4; h++) c[h] = vreinterpretq_s8_u8(a[h]);
}

/* The byte indices, into a table of fp16 values, of each lane's group: lanes 0..7 in b[0],
 * 8..15 in b[1] (bytes 2 · idx, 2 · idx + 1). */
TARGET INLINE void tile_bytes(const intq_tile_t *T, uint8x16_t b[2]) {
    for (int k = 0; k < 2; k++) {
        const uint16x8_t i = vcombine_u16(vmovn_u32(vreinterpretq_u32_s32(vld1q_s32(T->idx + 8 * k))),
                                          vmovn_u32(vreinterpretq_u32_s32(vld1q_s32(T->idx + 8 * k + 4))));
        b[k] = vreinterpretq_u8_u16(vmlaq_n_u16(vdupq_n_u16(256), i, 514));
    }
}

TARGET INLINE void halves(uint16x8_t h, float32x4_t *lo, float32x4_t *hi) {
    *lo = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h)));
    *hi = vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h)));
}

/* The fp16 scales (or minimums) s of a row as the tile's 16 lanes, four float vectors. */
TARGET INLINE void lane_params(const uint16_t *s, const intq_tile_t *T, int G, const uint8x16_t b[2],
                               float32x4_t v[4]) {
    if (T->ident) { /* 16 groups, all in the row */
        halves(vld1q_u16(s + T->g0), &v[0], &v[1]);
        halves(vld1q_u16(s + T->g0 + 8), &v[2], &v[3]);
        return;
    }
    if (T->ng == 1) { /* per channel, or a group of 16+ sub-blocks */
        v[0] = v[1] = v[2] = v[3] = vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(s[T->g0])));
        return;
    }
    const int wide = T->ng > 8;
    uint16_t buf[16];
    const uint16_t *src = s + T->g0;
    if (T->g0 + (wide ? 16 : 8) > G) { /* the row's last groups: do not read past them */
        memset(buf, 0, sizeof buf);
        memcpy(buf, src, (size_t)T->ng * sizeof *src);
        src = buf;
    }
    uint8x16_t g[2];
    if (wide) {
        const uint8x16x2_t tab = {{vld1q_u8((const uint8_t *)src), vld1q_u8((const uint8_t *)(src + 8))}};
        g[0] = vqtbl2q_u8(tab, b[0]), g[1] = vqtbl2q_u8(tab, b[1]);
    } else {
        const uint8x16_t tab = vld1q_u8((const uint8_t *)src);
        g[0] = vqtbl1q_u8(tab, b[0]), g[1] = vqtbl1q_u8(tab, b[1]);
    }
    halves(vreinterpretq_u16_u8(g[0]), &v[0], &v[1]);
    halves(vreinterpretq_u16_u8(g[1]), &v[2], &v[3]);
}

#define MT_MAX 2 /* activation rows per block */

/* NS steps of weight rows p + j · row_bytes (j < NR) against activation rows xq + m · rc (m < MT);
 * xs: Σ xi per lane, for 8-bit codes. */
TARGET INLINE void steps(const uint8_t *p, size_t row_bytes, const int8_t *xq, int rc, const int NS, const int NR,
                         const int MT, const int bits, int32x4_t acc[2][MT_MAX][4], int32x4_t xs[MT_MAX][4]) {
    const int8x16_t ones = vdupq_n_s8(1);
    for (int k = 0; k < NS; k++, p += 8 * bits, xq += 64) {
        int8x16_t xv[MT_MAX][4];
        for (int m = 0; m < MT; m++)
            for (int h = 0; h < 4; h++) {
                xv[m][h] = vld1q_s8(xq + (size_t)m * rc + 16 * h);
                if (bits == 8) xs[m][h] = dot(xs[m][h], ones, xv[m][h]);
            }
        for (int j = 0; j < NR; j++) {
            int8x16_t c[4];
            decode_step(p + j * row_bytes, bits, c);
            for (int m = 0; m < MT; m++)
                for (int h = 0; h < 4; h++) acc[j][m][h] = dot(acc[j][m][h], c[h], xv[m][h]);
        }
    }
}

/* Weight rows r .. r + NR - 1 against activation rows m0 .. m0 + MT - 1. */
TARGET INLINE void rows_block(const intq_t *W, const intq_x8_t *X, int r, const int NR, int m0, const int MT,
                              const int bits, float *y) {
    const int nt = X->ntiles, rc = W->row_codes, G = W->G;
    const size_t row_bytes = (size_t)rc * bits / 8;
    const uint8_t *p = W->codes + (size_t)r * row_bytes;
    const int8_t *xq = X->xq + (size_t)m0 * rc;
    const float *dv = X->dv + (size_t)m0 * nt * 16, *xsv = X->xsv + (size_t)m0 * nt * 16;
    float32x4_t acc[2][MT_MAX];
    for (int j = 0; j < NR; j++)
        for (int m = 0; m < MT; m++) acc[j][m] = vdupq_n_f32(0.f);
    for (int i = 0; i < nt; i++, dv += 16, xsv += 16) {
        const intq_tile_t *T = &X->tiles[i];
        int32x4_t is[2][MT_MAX][4], xs[MT_MAX][4];
        for (int m = 0; m < MT; m++)
            for (int h = 0; h < 4; h++) {
                xs[m][h] = vdupq_n_s32(0);
                for (int j = 0; j < NR; j++) is[j][m][h] = vdupq_n_s32(0);
            }
        if (T->nsteps == 8) /* full tiles: constant trip counts, unrolled, accumulators in registers */
            steps(p, row_bytes, xq, rc, 8, NR, MT, bits, is, xs);
        else if (T->nsteps == 4)
            steps(p, row_bytes, xq, rc, 4, NR, MT, bits, is, xs);
        else /* a row's last, partial tile */
            for (int k = 0; k < T->nsteps; k++)
                steps(p + 8 * bits * k, row_bytes, xq + 64 * k, rc, 1, NR, MT, bits, is, xs);
        p += (size_t)T->nsteps * 8 * bits;
        xq += 64 * T->nsteps;
        uint8x16_t b[2] = {vdupq_n_u8(0), vdupq_n_u8(0)};
        if (!T->ident && T->ng > 1) tile_bytes(T, b);
        for (int j = 0; j < NR; j++) {
            const uint16_t *s = W->scales + (size_t)(r + j) * G, *t = W->mins ? W->mins + (size_t)(r + j) * G : NULL;
            float32x4_t sv[4], tv[4];
            lane_params(s, T, G, b, sv);
            if (t) lane_params(t, T, G, b, tv);
            for (int m = 0; m < MT; m++)
                for (int h = 0; h < 4; h++) {
                    const int32x4_t n = bits == 8 ? vaddq_s32(is[j][m][h], vshlq_n_s32(xs[m][h], 7)) : is[j][m][h];
                    const float32x4_t f = vcvtq_f32_s32(n);
                    const float32x4_t d = vld1q_f32(dv + (size_t)m * nt * 16 + 4 * h);
                    const float32x4_t x = vld1q_f32(xsv + (size_t)m * nt * 16 + 4 * h);
                    if (t)
                        acc[j][m] = vfmaq_f32(vfmaq_f32(acc[j][m], vmulq_f32(f, d), sv[h]), tv[h], x);
                    else
                        acc[j][m] = vfmaq_f32(acc[j][m], vfmaq_f32(x, f, d), sv[h]);
                }
        }
    }
    for (int j = 0; j < NR; j++)
        for (int m = 0; m < MT; m++) y[(size_t)(m0 + m) * W->out + r + j] = vaddvq_f32(acc[j][m]);
}

/* Weight rows ahead of the current one whose codes and parameters are prefetched (as the x86 kernels). */
#define PF_ROWS 64

INLINE void prefetch_rows(const intq_t *W, int r, int n, size_t row_bytes) {
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

/* Activation rows m0 .. m0 + mt - 1 (mt <= MT_MAX) over weight rows r .. r + nr - 1 (nr <= 2). */
typedef void (*block_fn)(const intq_t *W, const intq_x8_t *X, int r, int nr, int m0, int mt, float *y);

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

/* One block function per bit width: every loop above unrolled for it, compiled once. */
#define BLOCK(b)                                                                                               \
    TARGET static void block_##b(const intq_t *W, const intq_x8_t *X, int r, int nr, int m0, int mt, float *y) { \
        block_any(W, X, r, nr, m0, mt, b, y);                                                                    \
    }
BLOCK(2)
BLOCK(3)
BLOCK(4)
BLOCK(5)
BLOCK(6)
BLOCK(7)
BLOCK(8)

/* Rows [r0, r1) for M activation rows: up to 4 stream the weights once, each pair of weight
 * rows serving every activation row while in L1; more go in blocks of 64 activation rows
 * over chunks of 4 weight rows (as intq_i8_x86_256.h). */
static void rows_any(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y, block_fn block) {
    const size_t row_bytes = (size_t)W->row_codes * W->bits / 8;
    if (M <= INTQ_MAXM_TILE) {
        for (int r = r0; r < r1; r += 2) {
            const int nr = r1 - r < 2 ? r1 - r : 2;
            if (r + PF_ROWS + nr <= r1) prefetch_rows(W, r + PF_ROWS, nr, row_bytes);
            for (int m0 = 0; m0 < M; m0 += MT_MAX) block(W, X, r, nr, m0, M - m0 < MT_MAX ? M - m0 : MT_MAX, y);
        }
        return;
    }
    for (int mb = 0; mb < M; mb += 64) {
        const int me = M < mb + 64 ? M : mb + 64;
        for (int r = r0; r < r1; r += 4) {
            const int re = r1 < r + 4 ? r1 : r + 4;
            for (int m0 = mb; m0 < me; m0 += MT_MAX)
                for (int rr = r; rr < re; rr += 2)
                    block(W, X, rr, re - rr < 2 ? re - rr : 2, m0, me - m0 < MT_MAX ? me - m0 : MT_MAX, y);
        }
    }
}

/* Per sub-block: amax, d = amax / 127, xi = round-half-even(x · (1 / d)), σ = d · Σ xi — as
 * quantize_blocks in intq_i8.c, bit for bit (fcvtns rounds to nearest even; fmaxnm, like
 * fmaxf, ignores a NaN). A short block is copied into a zeroed buffer, never read past. */
TARGET void intq_quantize_blocks_neon(const intq_t *W, const float *x, int8_t *xi, float *d, float *sig) {
    const int nq = W->B / 4;
    const int32x4_t lo = vdupq_n_s32(-127), hi = vdupq_n_s32(127);
    for (int sb = 0; sb < W->nsub; sb++) {
        const int g = sb / W->spg, c0 = g * W->group, j0 = (sb % W->spg) * W->B;
        const int glen = c0 + W->group <= W->in ? W->group : W->in - c0;
        const int n = glen - j0 < W->B ? (glen - j0 > 0 ? glen - j0 : 0) : W->B;
        float buf[32];
        const float *src = x + c0 + j0;
        if (n < W->B) {
            memset(buf, 0, sizeof buf);
            if (n) memcpy(buf, src, (size_t)n * sizeof *src);
            src = buf;
        }
        float32x4_t v[8], amax = vdupq_n_f32(0.f);
        for (int q = 0; q < nq; q++) {
            v[q] = vld1q_f32(src + 4 * q);
            amax = vmaxnmq_f32(amax, vabsq_f32(v[q]));
        }
        const float ds = vmaxnmvq_f32(amax) / 127.f, id = ds != 0.f ? 1.f / ds : 0.f;
        int32x4_t sum = vdupq_n_s32(0);
        for (int q = 0; q < nq; q += 4) { /* 16 codes at a time */
            int32x4_t r[4];
            for (int k = 0; k < 4; k++) {
                r[k] = vminq_s32(vmaxq_s32(vcvtnq_s32_f32(vmulq_n_f32(v[q + k], id)), lo), hi);
                sum = vaddq_s32(sum, r[k]);
            }
            const int16x8_t a = vcombine_s16(vmovn_s32(r[0]), vmovn_s32(r[1]));
            const int16x8_t b = vcombine_s16(vmovn_s32(r[2]), vmovn_s32(r[3]));
            vst1q_s8(xi + (size_t)sb * W->B + 4 * q, vcombine_s8(vmovn_s16(a), vmovn_s16(b)));
        }
        d[sb] = ds;
        sig[sb] = ds * (float)vaddvq_s32(sum);
    }
}

void intq_rows_i8_neon(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y) {
    static const block_fn blocks[9] = {NULL, NULL, block_2, block_3, block_4, block_5, block_6, block_7, block_8};
    rows_any(W, X, r0, r1, M, y, blocks[W->bits]);
}
#endif /* aarch64 */
