/* One decode step of a Llama-family model in C: every decoder block for one token, with no
 * Python between the operations (slimlm/runtime/lean.py builds the plan and calls it once
 * per token; prefill and multi-token verification stay in PyTorch).
 *
 * Per block, for the token at position pos over the hidden state x (dim):
 *
 *   h = rmsnorm(x) · ln1;  [q k v] = Wqkv h;  (qk-norm);  rope(q, k);  cache[pos] = k, v
 *   o = softmax(q·K / √hd) V   per query head, grouped by KV head, over [lo, pos]
 *   x += Wo o;  h = rmsnorm(x) · ln2;  [g u] = Wgu h;  x += Wdown (silu(g) · u)
 *
 * and at the end x = rmsnorm(x) · norm, the input of the output head (run by the caller).
 * lo = 0, or pos - window + 1 on a sliding-window layer. The arithmetic follows lean.py
 * operation for operation (float32 throughout; rope in the rotate-half convention); the
 * linears are IntQuant products on the int8 path (intq_i8.c) or dense float32 rows.
 * The KV cache is the caller's: (nkv, cap, hd) float32 per layer, pointers passed per call
 * because the caller grows it by reallocation.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "intq.h"
#include "lean.h"
#include "portable.h"

/* ---- dense float32 rows -------------------------------------------------------------------- */

/* a · b, 16 partial sums (vectorised by the compiler). */
static float dot(const float *a, const float *b, int n) {
    float s[16] = {0}, t = 0.f;
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) s[l] += a[j + l] * b[j + l];
    for (; j < n; j++) t += a[j] * b[j];
    for (int l = 0; l < 16; l++) t += s[l];
    return t;
}

/* y[m, r] = w[r] · x[m] for rows [r0, r1) and M activation rows (y's row stride ys); each weight
 * row is read once from memory for all M, four rows share each load of x. */
CLONES static void dense_rows(const float *w, int in, const float *x, int M, int r0, int r1, float *y, int ys) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        const float *a = w + (size_t)r * in, *b = a + in, *c = b + in, *d = c + in;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * in;
            float sa[16] = {0}, sb[16] = {0}, sc[16] = {0}, sd[16] = {0};
            int j = 0;
            for (; j + 16 <= in; j += 16)
                for (int l = 0; l < 16; l++) {
                    const float v = xm[j + l];
                    sa[l] += a[j + l] * v, sb[l] += b[j + l] * v, sc[l] += c[j + l] * v, sd[l] += d[j + l] * v;
                }
            float ta = 0.f, tb = 0.f, tc = 0.f, td = 0.f;
            for (; j < in; j++) ta += a[j] * xm[j], tb += b[j] * xm[j], tc += c[j] * xm[j], td += d[j] * xm[j];
            for (int l = 0; l < 16; l++) ta += sa[l], tb += sb[l], tc += sc[l], td += sd[l];
            float *ym = y + (size_t)m * ys + r;
            ym[0] = ta, ym[1] = tb, ym[2] = tc, ym[3] = td;
        }
    }
    for (; r < r1; r++)
        for (int m = 0; m < M; m++) y[(size_t)m * ys + r] = dot(w + (size_t)r * in, x + (size_t)m * in, in);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,fma")))

/* Four weight rows × MM activation rows: 4·MM accumulators, each weight load serves MM rows. */
AVX512 static inline __attribute__((always_inline)) void rows4_avx512(const float *w, int in, const float *x, int r,
                                                                        float *y, int ys, const int MM, int pf) {
    const int tail = in % 16, nfull = in - tail;
    const __mmask16 km = (__mmask16)((1u << tail) - 1);
    const float *row[4] = {w + (size_t)r * in, w + (size_t)(r + 1) * in, w + (size_t)(r + 2) * in,
                           w + (size_t)(r + 3) * in};
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int m = 0; m < MM; m++) acc[i][m] = _mm512_setzero_ps();
    for (int j = 0; j < nfull; j += 16) {
        __m512 v[4];
        for (int m = 0; m < MM; m++) v[m] = _mm512_loadu_ps(x + (size_t)m * in + j);
        if (pf) /* the next four rows, while later passes over these rows compute from L1 */
            for (int i = 0; i < 4; i++) _mm_prefetch((const char *)(row[i] + 4 * (size_t)in + j), _MM_HINT_T0);
        for (int i = 0; i < 4; i++) {
            const __m512 wv = _mm512_loadu_ps(row[i] + j);
            for (int m = 0; m < MM; m++) acc[i][m] = _mm512_fmadd_ps(wv, v[m], acc[i][m]);
        }
    }
    if (tail) {
        __m512 v[4];
        for (int m = 0; m < MM; m++) v[m] = _mm512_maskz_loadu_ps(km, x + (size_t)m * in + nfull);
        for (int i = 0; i < 4; i++) {
            const __m512 wv = _mm512_maskz_loadu_ps(km, row[i] + nfull);
            for (int m = 0; m < MM; m++) acc[i][m] = _mm512_fmadd_ps(wv, v[m], acc[i][m]);
        }
    }
    for (int m = 0; m < MM; m++)
        for (int i = 0; i < 4; i++) y[(size_t)m * ys + r + i] = _mm512_reduce_add_ps(acc[i][m]);
}

/* dense_rows with AVX-512: four weight rows per pass, up to four activation rows sharing each
 * weight load (the products of a verification batch are compute-bound otherwise), 16 columns
 * per load, the row tail masked. */
AVX512 static void dense_rows_avx512(const float *w, int in, const float *x, int M, int r0, int r1, float *y, int ys) {
    int r = r0;
    for (; r + 4 <= r1; r += 4)
        for (int m = 0; m < M; m += 4) {
            const float *xm = x + (size_t)m * in;
            float *ym = y + (size_t)m * ys;
            const int pf = m == 0 && M > 4 && r + 8 <= r1;
            switch (M - m < 4 ? M - m : 4) {
            case 1: rows4_avx512(w, in, xm, r, ym, ys, 1, pf); break;
            case 2: rows4_avx512(w, in, xm, r, ym, ys, 2, pf); break;
            case 3: rows4_avx512(w, in, xm, r, ym, ys, 3, pf); break;
            default: rows4_avx512(w, in, xm, r, ym, ys, 4, pf); break;
            }
        }
    if (r < r1) dense_rows(w, in, x, M, r, r1, y, ys);
}
#endif

static void dense(const float *w, int in, const float *x, int M, int r0, int r1, float *y, int ys) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (intq_has_avx512()) {
        dense_rows_avx512(w, in, x, M, r0, r1, y, ys);
        return;
    }
#endif
    dense_rows(w, in, x, M, r0, r1, y, ys);
}

/* y (M, Σ out) = the stacked linears of L applied to x (M, in). */
void lean_linear(const lean_linear_t *L, const float *x, int M, float *y) {
    if (L->kind == LEAN_INTQ) {
        intq_matmul_i8_prepared(&L->W, L->prep, x, M, y);
    } else {
#pragma omp parallel
        {
            int off = 0;
            for (int p = 0; p < L->nparts; p++) {
                int a, b;
                intq_thread_rows(L->out[p], &a, &b);
                if (a < b) dense(L->w[p], L->in, x, M, a, b, y + off, L->total);
                off += L->out[p];
            }
        }
    }
    if (L->bias)
        for (int m = 0; m < M; m++)
            for (int r = 0; r < L->total; r++) y[(size_t)m * L->total + r] += L->bias[r];
}

/* ---- elementwise ---------------------------------------------------------------------------- */

/* y = x / sqrt(mean(x²) + eps) · w, as torch's rms_norm computes it in float32. */
static void rmsnorm(const float *x, const float *w, int n, float eps, float *y) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

/* x (heads, hd) in place: x·cos + rotate_half(x)·sin, rotate_half(x) = (-x[h:], x[:h]). */
static void rope(float *x, int heads, int hd, const float *cos, const float *sin) {
    const int h = hd / 2;
    for (int n = 0; n < heads; n++, x += hd)
        for (int i = 0; i < h; i++) {
            const float a = x[i], b = x[i + h];
            x[i] = a * cos[i] - b * sin[i];
            x[i + h] = b * cos[i + h] + a * sin[i + h];
        }
}

/* The scores, softmax and weighted values of one query row over L cached positions. */
static void attend_row(const float *qn, const float *K, const float *V, int L, int hd, float scale, float *s,
                       float *on) {
    float mx = -INFINITY, z = 0.f;
    for (int t = 0; t < L; t++) {
        s[t] = dot(qn, K + (size_t)t * hd, hd) * scale;
        mx = s[t] > mx ? s[t] : mx;
    }
    for (int t = 0; t < L; t++) z += s[t] = expf(s[t] - mx);
    const float iz = 1.f / z;
    for (int i = 0; i < hd; i++) on[i] = 0.f;
    for (int t = 0; t < L; t++) {
        const float p = s[t] * iz, *v = V + (size_t)t * hd;
        for (int i = 0; i < hd; i++) on[i] += p * v[i];
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
/* e^x for the SiLU and the softmax: 2^(x·log2 e) split into 2^n · 2^f, f in [-0.5, 0.5], 2^f by a degree-6
 * polynomial (relative error about 2e-7, like expf's float rounding); x clamped to ±88. */
AVX512 static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n); /* 2^f = e^(f ln 2) */
    const __m512 g = _mm512_mul_ps(f, _mm512_set1_ps(0.693147180559945309f));
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* attend_row for hd = 64 with AVX-512: q in four registers, one key row per four FMAs and a
 * reduction, the output row in four accumulators (same operation order per lane as
 * attend_row's sums, which is not bit-identical to it: only to within rounding). */
AVX512 static void attend_row64_avx512(const float *qn, const float *K, const float *V, int L, float scale, float *s,
                                       float *on) {
    const __m512 q0 = _mm512_loadu_ps(qn), q1 = _mm512_loadu_ps(qn + 16), q2 = _mm512_loadu_ps(qn + 32),
                 q3 = _mm512_loadu_ps(qn + 48);
    float mx = -INFINITY, z = 0.f;
    for (int t = 0; t < L; t++) {
        const float *k = K + (size_t)t * 64;
        __m512 a = _mm512_mul_ps(q0, _mm512_loadu_ps(k));
        __m512 b = _mm512_mul_ps(q1, _mm512_loadu_ps(k + 16));
        a = _mm512_fmadd_ps(q2, _mm512_loadu_ps(k + 32), a);
        b = _mm512_fmadd_ps(q3, _mm512_loadu_ps(k + 48), b);
        s[t] = _mm512_reduce_add_ps(_mm512_add_ps(a, b)) * scale;
        mx = s[t] > mx ? s[t] : mx;
    }
    __m512 zs = _mm512_setzero_ps();
    const __m512 vmx = _mm512_set1_ps(mx);
    for (int t = 0; t < L; t += 16) { /* e^(s - max), 16 positions per step */
        const __mmask16 m = L - t >= 16 ? 0xFFFF : (__mmask16)((1u << (L - t)) - 1);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), vmx));
        _mm512_mask_storeu_ps(s + t, m, e);
        zs = _mm512_add_ps(zs, _mm512_maskz_mov_ps(m, e));
    }
    z = _mm512_reduce_add_ps(zs);
    const float iz = 1.f / z;
    __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
    for (int t = 0; t < L; t++) {
        const __m512 p = _mm512_set1_ps(s[t] * iz);
        const float *v = V + (size_t)t * 64;
        o0 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v), o0);
        o1 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 16), o1);
        o2 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 32), o2);
        o3 = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + 48), o3);
    }
    _mm512_storeu_ps(on, o0);
    _mm512_storeu_ps(on + 16, o1);
    _mm512_storeu_ps(on + 32, o2);
    _mm512_storeu_ps(on + 48, o3);
}

/* silu_mul for the whole vectors of 16 among the n; returns how many it did. */
AVX512 static int silu_mul_avx512(const float *g, const float *u, float *a, int n) {
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m512 gv = _mm512_loadu_ps(g + j), one = _mm512_set1_ps(1.f);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_storeu_ps(a + j, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + j)));
    }
    return j;
}

/* The same three pieces with AVX2 + FMA, 8 lanes, for x86-64 CPUs without AVX-512 (same formulas:
 * 2^n is built from the exponent bits, as _mm512_scalef_ps does for |n| <= 127). */
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 g = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147180559945309f));
    __m256 p = _mm256_set1_ps(1.f / 720.f);
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

AVX2 static void attend_row64_avx2(const float *qn, const float *K, const float *V, int L, float scale, float *s,
                                   float *on) {
    __m256 q[8];
    for (int i = 0; i < 8; i++) q[i] = _mm256_loadu_ps(qn + 8 * i);
    float mx = -INFINITY;
    for (int t = 0; t < L; t++) {
        const float *k = K + (size_t)t * 64;
        __m256 a = _mm256_mul_ps(q[0], _mm256_loadu_ps(k)), b = _mm256_mul_ps(q[1], _mm256_loadu_ps(k + 8));
        for (int i = 2; i < 8; i += 2) {
            a = _mm256_fmadd_ps(q[i], _mm256_loadu_ps(k + 8 * i), a);
            b = _mm256_fmadd_ps(q[i + 1], _mm256_loadu_ps(k + 8 * i + 8), b);
        }
        s[t] = hsum256(_mm256_add_ps(a, b)) * scale;
        mx = s[t] > mx ? s[t] : mx;
    }
    __m256 zs = _mm256_setzero_ps();
    const __m256 vmx = _mm256_set1_ps(mx);
    int t = 0;
    for (; t + 8 <= L; t += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmx));
        _mm256_storeu_ps(s + t, e);
        zs = _mm256_add_ps(zs, e);
    }
    float z = hsum256(zs);
    for (; t < L; t++) z += s[t] = expf(s[t] - mx);
    const float iz = 1.f / z;
    __m256 o[8];
    for (int i = 0; i < 8; i++) o[i] = _mm256_setzero_ps();
    for (t = 0; t < L; t++) {
        const __m256 p = _mm256_set1_ps(s[t] * iz);
        const float *v = V + (size_t)t * 64;
        for (int i = 0; i < 8; i++) o[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * i), o[i]);
    }
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(on + 8 * i, o[i]);
}

AVX2 static int silu_mul_avx2(const float *g, const float *u, float *a, int n) {
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 gv = _mm256_loadu_ps(g + j), one = _mm256_set1_ps(1.f);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(a + j, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + j)));
    }
    return j;
}
#endif

/* a[j] = silu(g[j]) · u[j] for j < n (a may be g, or lie below it: each a[j] is written after g[j] and u[j] are read). */
static void silu_mul(const float *g, const float *u, float *a, int n) {
    int j = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if (intq_has_avx512())
        j = silu_mul_avx512(g, u, a, n);
    else if (intq_has_avx2())
        j = silu_mul_avx2(g, u, a, n);
#endif
    for (; j < n; j++) {
        const float gj = g[j];
        a[j] = gj / (1.f + expf(-gj)) * u[j];
    }
}

/* o (M, nq, hd): query m of each head attends the cached positions [lo(pos + m), pos + m];
 * q rows have stride qs floats. score (M · nq, cap) is scratch. Query head n reads KV head
 * n / (nq / nkv). */
static void attention(const float *q, int qs, const float *kc, const float *vc, int M, int nq, int nkv, int hd,
                      int cap, int pos, int window, float *score, float *o) {
    const int rep = nq / nkv;
    const float scale = 1.f / sqrtf((float)hd);
#if defined(__x86_64__) && defined(__GNUC__)
    const int fast = hd != 64 ? 0 : intq_has_avx512() ? 2 : intq_has_avx2() ? 1 : 0;
#endif
#pragma omp parallel for schedule(static)
    for (int mn = 0; mn < M * nq; mn++) {
        const int m = mn / nq, n = mn % nq, hi = pos + m;
        const int lo = window > 0 && hi - window + 1 > 0 ? hi - window + 1 : 0, L = hi - lo + 1;
        const float *K = kc + ((size_t)(n / rep) * cap + lo) * hd, *V = vc + ((size_t)(n / rep) * cap + lo) * hd;
        const float *qn = q + (size_t)m * qs + (size_t)n * hd;
        float *s = score + (size_t)mn * cap, *on = o + (size_t)mn * hd;
#if defined(__x86_64__) && defined(__GNUC__)
        if (fast) {
            if (fast == 2)
                attend_row64_avx512(qn, K, V, L, scale, s, on);
            else
                attend_row64_avx2(qn, K, V, L, scale, s, on);
            continue;
        }
#endif
        attend_row(qn, K, V, L, hd, scale, s, on);
    }
}

/* ---- the step ------------------------------------------------------------------------------- */

void lean_step(const lean_model_t *M, float *x, int T, int pos, float *const *kcache, float *const *vcache, int cap) {
    const int hd = M->hd, dim = M->dim;
    float *h = M->scratch, *big = h + (size_t)LEAN_MAX_T * dim, *att = big + (size_t)LEAN_MAX_T * M->big;
    float *score = att + (size_t)LEAN_MAX_T * M->att;
    for (int i = 0; i < M->n_layers; i++) {
        const lean_layer_t *B = &M->layers[i];
        const int qo = B->nq * hd, ko = B->nkv * hd, nqkv = B->qkv.total, f = B->ffn;
        for (int m = 0; m < T; m++) rmsnorm(x + (size_t)m * dim, B->ln1, dim, M->eps, h + (size_t)m * dim);
        lean_linear(&B->qkv, h, T, big);
        for (int m = 0; m < T; m++) {
            float *q = big + (size_t)m * nqkv, *k = q + qo, *v = k + ko;
            const float *cos = M->cos + (size_t)(pos + m) * hd, *sin = M->sin + (size_t)(pos + m) * hd;
            if (B->q_norm) {
                for (int n = 0; n < B->nq; n++) rmsnorm(q + n * hd, B->q_norm, hd, M->eps, q + n * hd);
                for (int n = 0; n < B->nkv; n++) rmsnorm(k + n * hd, B->k_norm, hd, M->eps, k + n * hd);
            }
            rope(q, B->nq, hd, cos, sin);
            rope(k, B->nkv, hd, cos, sin);
            for (int n = 0; n < B->nkv; n++) {
                memcpy(kcache[i] + ((size_t)n * cap + pos + m) * hd, k + n * hd, hd * sizeof(float));
                memcpy(vcache[i] + ((size_t)n * cap + pos + m) * hd, v + n * hd, hd * sizeof(float));
            }
        }
        attention(big, nqkv, kcache[i], vcache[i], T, B->nq, B->nkv, hd, cap, pos, B->window, score, att);
        lean_linear(&B->o, att, T, big);
        for (size_t j = 0; j < (size_t)T * dim; j++) x[j] += big[j];
        for (int m = 0; m < T; m++) rmsnorm(x + (size_t)m * dim, B->ln2, dim, M->eps, h + (size_t)m * dim);
        lean_linear(&B->gate_up, h, T, big);
        for (int m = 0; m < T; m++) { /* a overwrites g in order */
            float *g = big + (size_t)m * 2 * f;
            silu_mul(g, g + f, big + (size_t)m * f, f);
        }
        lean_linear(&B->down, big, T, att);
        for (size_t j = 0; j < (size_t)T * dim; j++) x[j] += att[j];
    }
    for (int m = 0; m < T; m++) rmsnorm(x + (size_t)m * dim, M->norm, dim, M->eps, x + (size_t)m * dim);
}
