/* The int8 path: matrix-vector and small-batch products with integer dot products, as
 * llama.cpp computes Q4_1 × Q8_1.
 *
 * Activations. Each row of x is cut like a weight row: groups, and each group into
 * sub-blocks of B = 32 columns (16 when the group, padded to 16, is not a multiple of 32;
 * the last sub-block of a group may be short). Per sub-block b: d_b = max|x| / 127,
 * xi = round-half-even(x · (1 / d_b)) in [-127, 127] (0 when d_b = 0), and the sum of the
 * dequantized block σ_b = d_b · Σ xi. The product is then, with x̂ = d · xi,
 *
 *   y[r] = Σ_b s_g(b) · d_b · (Σ_{c in b} q[r,c] · xi[c]) + t_g(b) · σ_b  =  Σ_c w[r,c] · x̂[c]
 *
 * (t = min, or -2^(bits-1) · s when symmetric), i.e. dequantize() @ x̂ up to float
 * rounding: slimlm/kernels/intq.py `quantize_activations` is that x̂ in PyTorch.
 *
 * Layout (built by intq.py `repack_i8` at load time, never stored). A row's sub-blocks,
 * each padded with zero codes to B, are taken 16 at a time: one tile = 16 int32 lanes,
 * lane l summing sub-block sb0 + l of the tile over B / 4 steps of 64 codes; step k's
 * 64 codes are, at byte o = 4l + p, code 4k + p of lane l's sub-block — the operand of
 * one vpdpbusd. The last tile of a row holds the remaining sub-blocks with R lanes each
 * (R = 16 / the next power of two, at most B / 4; lane l: sub-block sb0 + l / R, codes
 * (l % R) · B / R + 4k + p), so a row of 18 sub-blocks takes 16 + 2 · 8 lanes, no pad.
 * A step of a b-bit code takes 8·b bytes, planes low bits first, each plane a broadcast
 * and one AND away from the dpbusd operand (the codes of lane l come out multiplied by
 * 2^class(l), removed per tile with one arithmetic shift):
 *
 *   4-bit plane: 32 bytes; step byte o <- byte o % 32, bits 4·(o / 32)..+3  (class 4·(l / 8))
 *   2-bit plane: 16 bytes; step byte o <- byte o % 16, bits 2·(o / 16)..+1  (class 2·(l / 4))
 *   1-bit plane:  8 bytes; step byte o <- byte o % 8,  bit o / 8            (class l / 2)
 *   8 bits: 64 plain bytes
 *
 * The x̂ sums use the same arrangement, quantized once per call. Per tile and lane the
 * int32 sum is scaled in float: acc += cvt(Σ q·xi) · d · s + t · σ; the row's output is
 * the sum of the 16 float lanes. This file: geometry, activation quantization, a
 * portable row kernel (any CPU) and dequantization; intq_i8_avx512.c: the VNNI kernel.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "intq.h"
#include "portable.h"


void intq_i8_geometry(intq_t *W) {
    W->B = (W->group + 15) / 16 * 16 % 32 == 0 ? 32 : 16;
    W->spg = (W->group + W->B - 1) / W->B;
    W->nsub = W->G * W->spg;
    W->nfull = W->nsub / 16;
    const int rem = W->nsub % 16;
    int R = 0;
    if (rem) {
        int p2 = 1;
        while (p2 < rem) p2 *= 2;
        R = 16 / p2 < W->B / 4 ? 16 / p2 : W->B / 4;
    }
    W->R = R;
    W->row_codes = W->nfull * 16 * W->B + (R ? 16 * W->B / R : 0);
}

static int ntiles(const intq_t *W) { return W->nfull + (W->R > 0); }

static void build_tiles(const intq_t *W, intq_tile_t *T) {
    for (int i = 0; i < ntiles(W); i++) {
        intq_tile_t *t = &T[i];
        t->sb0 = 16 * i;
        t->R = i < W->nfull ? 1 : W->R;
        t->nsteps = W->B / (4 * t->R);
        t->g0 = t->sb0 / W->spg;
        int ident = 1, ng = 1;
        for (int l = 0; l < 16; l++) {
            const int sb = t->sb0 + l / t->R;
            const int j = sb < W->nsub ? sb / W->spg - t->g0 : 0;
            t->idx[l] = j;
            ident &= j == l;
            ng = j + 1 > ng ? j + 1 : ng;
        }
        t->ng = ng;
        t->ident = ident;
    }
}

/* Column of code (lane l, step k, byte p) of tile t, or -1 for a pad. */
static int column(const intq_t *W, const intq_tile_t *t, int l, int k, int p) {
    const int sb = t->sb0 + l / t->R;
    if (sb >= W->nsub) return -1;
    const int g = sb / W->spg, c0 = g * W->group;
    const int glen = c0 + W->group <= W->in ? W->group : W->in - c0;
    const int off = (sb % W->spg) * W->B + (l % t->R) * (W->B / t->R) + 4 * k + p;
    return off < glen ? c0 + off : -1;
}

/* (row_codes / 4,) for each dword of a repacked row, its dword in the (nsub, B) padded
 * sub-blocks of an activation row, or nsub · B / 4 (a zero dword) for a pad lane. */
static void dword_map(const intq_t *W, const intq_tile_t *T, int32_t *map) {
    int n = 0;
    for (int i = 0; i < ntiles(W); i++)
        for (int k = 0; k < T[i].nsteps; k++)
            for (int l = 0; l < 16; l++) {
                const int sb = T[i].sb0 + l / T[i].R;
                map[n++] = sb < W->nsub ? (sb * W->B + (l % T[i].R) * (W->B / T[i].R) + 4 * k) / 4 : W->nsub * W->B / 4;
            }
}

/* Columns [c, c + n) of sub-block sb: n may be short (last sub-block of a group) or 0. */
static inline void block_span(const intq_t *W, int sb, int *c, int *n) {
    const int g = sb / W->spg, c0 = g * W->group, j0 = (sb % W->spg) * W->B;
    const int glen = c0 + W->group <= W->in ? W->group : W->in - c0;
    *c = c0 + j0;
    *n = glen - j0 < W->B ? (glen - j0 > 0 ? glen - j0 : 0) : W->B;
}

/* One activation row, per sub-block: xi (nsub, B) int8 with zero pads, scale d and σ = d · Σ xi. */
static void quantize_blocks(const intq_t *W, const float *x, int8_t *xi, float *d, float *sig) {
    for (int sb = 0; sb < W->nsub; sb++) {
        int c, n;
        block_span(W, sb, &c, &n);
        float amax = 0.f;
        for (int j = 0; j < n; j++) amax = fmaxf(amax, fabsf(x[c + j]));
        const float ds = amax / 127.f, id = ds != 0.f ? 1.f / ds : 0.f;
        int isum = 0;
        for (int j = 0; j < W->B; j++) {
            float v = j < n ? nearbyintf(x[c + j] * id) : 0.f;
            v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
            xi[sb * W->B + j] = (int8_t)v;
            isum += (int)v;
        }
        d[sb] = ds;
        sig[sb] = ds * (float)isum;
    }
}

/* Sub-blocks of one row -> xq (row_codes) in the row layout and the lane vectors dv, xsv (ntiles, 16).
 * fold: dv of lane l times 2^-class(l) for a one-plane code (2 or 4 bits), whose lane sums
 * the VNNI kernel then converts without shifting them back (exact: a power of two). */
static void layout_x(const intq_t *W, const intq_tile_t *T, const int32_t *map, const int8_t *xi, const float *d,
                     const float *sig, int fold, int8_t *xq, float *dv, float *xsv) {
    const float fac = W->mins ? 1.f : -(float)(1 << (W->bits - 1));
    const int cls = fold && W->bits == 2 ? 4 : (fold && W->bits == 4 ? 8 : 0); /* lanes per class */
    for (int i = 0; i < W->row_codes / 4; i++) memcpy(xq + 4 * i, xi + 4 * map[i], 4);
    for (int i = 0; i < ntiles(W); i++)
        for (int l = 0; l < 16; l++) {
            const int sb = T[i].sb0 + l / T[i].R, in = sb < W->nsub;
            dv[16 * i + l] = in ? (cls ? ldexpf(d[sb], -(W->bits * (l / cls))) : d[sb]) : 0.f;
            xsv[16 * i + l] = in && l % T[i].R == 0 ? fac * sig[sb] : 0.f;
        }
}

/* The 64 codes of one step, in step-byte order. `bits` is a compile-time constant at every call. */
INLINE void decode_step(const uint8_t *p, const int bits, int32_t *q) {
    for (int o = 0; o < 64; o++) {
        const uint8_t *pp = p;
        int v = 0, sh = 0;
        if (bits == 8) {
            v = pp[o];
        } else {
            if (bits & 4) v = (pp[o % 32] >> (4 * (o / 32))) & 15, pp += 32, sh = 4;
            if (bits & 2) v |= ((pp[o % 16] >> (2 * (o / 16))) & 3) << sh, pp += 16, sh += 2;
            if (bits & 1) v |= ((pp[o % 8] >> (o / 8)) & 1) << sh;
        }
        q[o] = v;
    }
}

/* Rows [r0, r1): the portable int8 kernel (one activation row at a time). */
INLINE void rows_i8_bits(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y, const int bits) {
    const size_t row_bytes = (size_t)W->row_codes * bits / 8;
    for (int r = r0; r < r1; r++) {
        const uint16_t *s = W->scales + (size_t)r * W->G, *t = W->mins ? W->mins + (size_t)r * W->G : NULL;
        for (int m = 0; m < M; m++) {
            const uint8_t *p = W->codes + (size_t)r * row_bytes;
            const int8_t *xq = X->xq + (size_t)m * W->row_codes;
            const float *dv = X->dv + (size_t)m * X->ntiles * 16, *xsv = X->xsv + (size_t)m * X->ntiles * 16;
            float acc = 0.f;
            for (int i = 0; i < X->ntiles; i++, dv += 16, xsv += 16) {
                const intq_tile_t *T = &X->tiles[i];
                int32_t isum[16] = {0}, q[64];
                for (int k = 0; k < T->nsteps; k++, p += 8 * bits, xq += 64) {
                    decode_step(p, bits, q);
                    for (int o = 0; o < 64; o++) isum[o / 4] += q[o] * xq[o];
                }
                for (int l = 0; l < 16; l++) {
                    const float sc = h2f(s[T->g0 + T->idx[l]]), f = (float)isum[l];
                    if (t)
                        acc += f * dv[l] * sc + h2f(t[T->g0 + T->idx[l]]) * xsv[l];
                    else
                        acc += (f * dv[l] + xsv[l]) * sc;
                }
            }
            y[(size_t)m * W->out + r] = acc;
        }
    }
}

CLONES void intq_rows_i8_scalar(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y) {
    INTQ_BY_BITS(W->bits, rows_i8_bits, W, X, r0, r1, M, y);
}

/* (row_codes,) column of each position of a repacked row, -1 for pads. */
static void column_map(const intq_t *W, const intq_tile_t *T, int32_t *map) {
    int n = 0;
    for (int i = 0; i < ntiles(W); i++)
        for (int k = 0; k < T[i].nsteps; k++)
            for (int l = 0; l < 16; l++)
                for (int p = 0; p < 4; p++) map[n++] = column(W, &T[i], l, k, p);
}

/* Rows [r0, r1) of the dequantized (out, in) float32 matrix; map: column of each row position;
 * st: 2 · G floats of scratch (the row's scales and additive terms). */
INLINE void dequant_i8_bits(const intq_t *W, const int32_t *map, float *st, int r0, int r1, float *w, const int bits) {
    const size_t row_bytes = (size_t)W->row_codes * bits / 8;
    const float half = (float)(1 << (bits - 1));
    for (int r = r0; r < r1; r++) {
        const uint8_t *p = W->codes + (size_t)r * row_bytes;
        for (int g = 0; g < W->G; g++) {
            st[g] = h2f(W->scales[(size_t)r * W->G + g]);
            st[W->G + g] = W->mins ? h2f(W->mins[(size_t)r * W->G + g]) : -half * st[g];
        }
        float *wr = w + (size_t)r * W->in;
        for (int n = 0; n < W->row_codes; n += 64, p += 8 * bits) {
            int32_t q[64];
            decode_step(p, bits, q);
            for (int o = 0; o < 64; o++) {
                const int c = map[n + o];
                if (c >= 0) wr[c] = (float)q[o] * st[c / W->group] + st[W->G + c / W->group];
            }
        }
    }
}

CLONES static void dequant_i8(const intq_t *W, const int32_t *map, float *st, int r0, int r1, float *w) {
    INTQ_BY_BITS(W->bits, dequant_i8_bits, W, map, st, r0, r1, w);
}

void intq_i8_release(intq_i8_prep_t *P) {
    if (!P) return;
    free(P->T);
    free(P->map);
    free(P->xi);
    free(P->xq);
    free(P->dsig);
    free(P->lanes);
    free(P);
}

intq_i8_prep_t *intq_i8_prepare(const intq_t *W, int max_m) {
    const int nt = ntiles(W), rc = W->row_codes;
    intq_i8_prep_t *P = calloc(1, sizeof *P);
    if (!P) return NULL;
    P->max_m = max_m;
    P->T = malloc(nt * sizeof *P->T);
    P->map = malloc(rc / 4 * sizeof *P->map);
    P->xi = aligned_alloc(64, ((size_t)W->nsub * W->B + 64) / 64 * 64);
    P->xq = aligned_alloc(64, ((size_t)max_m * rc + 63) / 64 * 64);
    P->dsig = malloc(2 * W->nsub * sizeof(float));
    P->lanes = malloc((size_t)2 * max_m * nt * 16 * sizeof(float));
    if (!(P->T && P->map && P->xi && P->xq && P->dsig && P->lanes)) {
        intq_i8_release(P);
        return NULL;
    }
    build_tiles(W, P->T);
    dword_map(W, P->T, P->map);
    memset(P->xi + (size_t)W->nsub * W->B, 0, 4); /* the zero dword of pad lanes */
    return P;
}

void intq_matmul_i8_prepared(const intq_t *W, const intq_i8_prep_t *P, const float *x, int M, float *y) {
    const int nt = ntiles(W), rc = W->row_codes;
    const intq_i8_kernels_t *K = intq_i8_kernels();
    const intq_quantize_fn quantize = K->quantize ? K->quantize : quantize_blocks;
    for (int m = 0; m < M; m++) {
        quantize(W, x + (size_t)m * W->in, P->xi, P->dsig, P->dsig + W->nsub);
        layout_x(W, P->T, P->map, P->xi, P->dsig, P->dsig + W->nsub, K->fold, P->xq + (size_t)m * rc,
                 P->lanes + (size_t)m * nt * 16, P->lanes + (size_t)(M + m) * nt * 16);
    }
    const intq_x8_t X = {nt, P->T, P->xq, P->lanes, P->lanes + (size_t)M * nt * 16};
#pragma omp parallel
    {
        int a, b;
        intq_thread_rows(W->out, &a, &b);
        if (a < b) K->rows(W, &X, a, b, M, y);
    }
}

int intq_matmul_i8(const intq_t *W, const float *x, int M, float *y) {
    intq_i8_prep_t *P = intq_i8_prepare(W, M);
    if (!P) return -1;
    intq_matmul_i8_prepared(W, P, x, M, y);
    intq_i8_release(P);
    return 0;
}

int intq_dequant_i8(const intq_t *W, float *w) {
    int maxth = 1;
#ifdef _OPENMP
    maxth = omp_get_max_threads();
#endif
    intq_tile_t *T = malloc(ntiles(W) * sizeof *T);
    int32_t *map = malloc(W->row_codes * sizeof *map);
    float *st = malloc((size_t)maxth * 2 * W->G * sizeof(float)); /* per thread: a row's scales, additive terms */
    const int ok = T && map && st;
    if (ok) {
        build_tiles(W, T);
        column_map(W, T, map);
#pragma omp parallel num_threads(maxth)
        {
            int a, b, th = 0;
#ifdef _OPENMP
            th = omp_get_thread_num();
#endif
            intq_thread_rows(W->out, &a, &b);
            if (a < b) dequant_i8(W, map, st + (size_t)th * 2 * W->G, a, b, w);
        }
    }
    free(T);
    free(map);
    free(st);
    return ok ? 0 : -1;
}
