/* Matrix-vector and small-batch products that read IntQuant codes directly.
 *
 * Layout (built by slimlm/kernels/intq.py at load time, never stored): each row of the
 * (out, in) matrix is cut into its groups; a group of `group` weights is padded with zero
 * codes to gpad = ceil(group / 16) * 16 weights, so every 16-weight chunk (one 512-bit
 * float vector) lies inside one group. The padded row is cut into superblocks of SB = 64
 * codes, each stored as bit planes, low bits first:
 *
 *   4-bit plane (bits & 4): 32 bytes; byte 16j+i holds code 32j+i (low nibble) and 32j+16+i
 *   2-bit plane (bits & 2): 16 bytes; byte i, bits 2k..2k+1, hold code 16k+i
 *   1-bit plane (bits & 1):  8 bytes; byte i, bit k, holds code 8k+i
 *   8 bits: 64 plain bytes
 *
 * so a superblock of b bits takes exactly 8·b bytes. Scales and the additive term stay
 * fp16 (out, G) as the format stores them. With x padded the same way (zeros in the pads),
 *
 *   y[r] = sum_g s[r,g] · (sum_{c in g} q[r,c] · x[c]) + t[r,g] · (sum_{c in g} x[c])
 *
 * where t = min (asymmetric) or -2^(bits-1) · s (symmetric): the same value as
 * dequantize() up to the order of float additions.
 *
 * The row kernel is compiled three times (AVX-512, AVX2+FMA, portable) with GCC's
 * target_clones and the loader picks one for the CPU it runs on; rows are shared
 * among OpenMP threads (the libgomp that torch already loaded).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "intq.h"
#include "portable.h"

#define SB 64 /* codes per superblock */
#define CH 16 /* codes per chunk: one group never splits a chunk */


/* The 64 codes of one superblock as floats. `bits` is a compile-time constant at every call. */
INLINE void decode_sb(const uint8_t *p, const int bits, float *qf) {
    int32_t q[SB];
    if (bits == 8) {
        for (int i = 0; i < SB; i++) q[i] = p[i];
    } else {
        int sh = 0;
        for (int i = 0; i < SB; i++) q[i] = 0;
        if (bits & 4) {
            for (int j = 0; j < 2; j++)
                for (int i = 0; i < 16; i++) {
                    int b = p[16 * j + i];
                    q[32 * j + i] = b & 15;
                    q[32 * j + 16 + i] = b >> 4;
                }
            p += 32;
            sh = 4;
        }
        if (bits & 2) {
            for (int k = 0; k < 4; k++)
                for (int i = 0; i < 16; i++) q[16 * k + i] |= ((p[i] >> (2 * k)) & 3) << sh;
            p += 16;
            sh += 2;
        }
        if (bits & 1) {
            for (int k = 0; k < 8; k++)
                for (int i = 0; i < 8; i++) q[8 * k + i] |= ((p[i] >> k) & 1) << sh;
        }
    }
    for (int i = 0; i < SB; i++) qf[i] = (float)q[i];
}

/* Rows [r0, r1) of y (M, out) = x (M, in) @ W^T, x given padded (M, xstride) with group sums xs (M, G). */
INLINE void rows_bits(const intq_t *W, int r0, int r1, const float *xp, int xstride, const float *xs,
                      int M, float *y, const int bits) {
    const int G = W->G, cpg = W->gpad / CH, nch = G * cpg;
    const size_t row_bytes = (size_t)W->nsb * 8 * bits;
    const float half = (float)(1 << (bits - 1));
    for (int r = r0; r < r1; r++) {
        const uint8_t *p = W->codes + (size_t)r * row_bytes;
        const uint16_t *s = W->scales + (size_t)r * G;
        const uint16_t *t = W->mins ? W->mins + (size_t)r * G : NULL;
        for (int m0 = 0; m0 < M; m0 += INTQ_MAXM_TILE) {
            const int mt = M - m0 < INTQ_MAXM_TILE ? M - m0 : INTQ_MAXM_TILE;
            float tot[INTQ_MAXM_TILE][CH], part[INTQ_MAXM_TILE][CH];
            memset(tot, 0, sizeof tot);
            memset(part, 0, sizeof part);
            int c = 0, g = 0, kg = 0;
            const uint8_t *pp = p;
            for (int sb = 0; sb < W->nsb; sb++, pp += 8 * bits) {
                float qf[SB];
                decode_sb(pp, bits, qf);
                for (int k = 0; k < SB / CH && c < nch; k++, c++) {
                    for (int m = 0; m < mt; m++) {
                        const float *xv = xp + (size_t)(m0 + m) * xstride + CH * c;
                        for (int i = 0; i < CH; i++) part[m][i] += qf[CH * k + i] * xv[i];
                    }
                    if (++kg == cpg) {
                        const float sc = h2f(s[g]);
                        for (int m = 0; m < mt; m++)
                            for (int i = 0; i < CH; i++) {
                                tot[m][i] += sc * part[m][i];
                                part[m][i] = 0.f;
                            }
                        kg = 0;
                        g++;
                    }
                }
            }
            for (int m = 0; m < mt; m++) {
                float acc = 0.f;
                for (int i = 0; i < CH; i++) acc += tot[m][i];
                const float *xsm = xs + (size_t)(m0 + m) * G;
                for (int gg = 0; gg < G; gg++) acc += (t ? h2f(t[gg]) : -half * h2f(s[gg])) * xsm[gg];
                y[(size_t)(m0 + m) * W->out + r] = acc;
            }
        }
    }
}

CLONES static void rows_kernel(const intq_t *W, int r0, int r1, const float *xp, int xstride, const float *xs,
                               int M, float *y) {
    INTQ_BY_BITS(W->bits, rows_bits, W, r0, r1, xp, xstride, xs, M, y);
}

/* Rows [r0, r1) of the dequantized (out, in) float32 matrix. */
INLINE void dequant_bits(const intq_t *W, int r0, int r1, float *w, const int bits) {
    const int G = W->G;
    const size_t row_bytes = (size_t)W->nsb * 8 * bits;
    const float half = (float)(1 << (bits - 1));
    for (int r = r0; r < r1; r++) {
        const uint8_t *p = W->codes + (size_t)r * row_bytes;
        float qf[SB];
        int loaded = -1;
        for (int g = 0; g < G; g++) {
            const float sc = h2f(W->scales[(size_t)r * G + g]);
            const float t = W->mins ? h2f(W->mins[(size_t)r * G + g]) : -half * sc;
            const int c0 = g * W->group, n = (c0 + W->group <= W->in ? W->group : W->in - c0);
            for (int j = 0; j < n; j++) {
                const int pc = g * W->gpad + j, sb = pc / SB;
                if (sb != loaded) {
                    decode_sb(p + (size_t)sb * 8 * bits, bits, qf);
                    loaded = sb;
                }
                w[(size_t)r * W->in + c0 + j] = qf[pc % SB] * sc + t;
            }
        }
    }
}

CLONES static void dequant_kernel(const intq_t *W, int r0, int r1, float *w) {
    INTQ_BY_BITS(W->bits, dequant_bits, W, r0, r1, w);
}

int intq_matmul(const intq_t *W, const float *x, int M, float *y) {
    const int G = W->G, xstride = G * W->gpad;
    const int aligned = (W->gpad == W->group) && (G * W->group == W->in);
    float *xp = aligned ? NULL : calloc((size_t)M * xstride, sizeof(float));
    float *xs = malloc((size_t)M * G * sizeof(float));
    if ((!aligned && !xp) || !xs) {
        free(xp);
        free(xs);
        return -1;
    }
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            const int c0 = g * W->group, n = (c0 + W->group <= W->in ? W->group : W->in - c0);
            const float *src = x + (size_t)m * W->in + c0;
            float acc = 0.f;
            for (int j = 0; j < n; j++) acc += src[j];
            xs[(size_t)m * G + g] = acc;
            if (xp) memcpy(xp + (size_t)m * xstride + (size_t)g * W->gpad, src, n * sizeof(float));
        }
    const float *xv = xp ? xp : x;
#if defined(__x86_64__) || defined(_M_X64)
    const int use512 = intq_has_avx512();
#endif
#pragma omp parallel
    {
        int a, b;
        intq_thread_rows(W->out, &a, &b);
        if (a < b) {
#if defined(__x86_64__) || defined(_M_X64)
            if (use512)
                intq_rows_avx512(W, a, b, xv, xstride, xs, M, y);
            else
#endif
                rows_kernel(W, a, b, xv, xstride, xs, M, y);
        }
    }
    free(xp);
    free(xs);
    return 0;
}

int intq_dequant(const intq_t *W, float *w) {
#pragma omp parallel
    {
        int a, b;
        intq_thread_rows(W->out, &a, &b);
        if (a < b) dequant_kernel(W, a, b, w);
    }
    return 0;
}
