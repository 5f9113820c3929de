/* The plan of one fused decode step (lean.c), built once from Python (module.c `lean_new`). */
#ifndef SLIMLM_LEAN_H
#define SLIMLM_LEAN_H
#include "intq.h"

enum { LEAN_INTQ = 0, LEAN_DENSE = 1 };
#define LEAN_MAX_PARTS 3
#define LEAN_MAX_T 64 /* tokens per step: decoding, speculative verification, prompts in chunks */

typedef struct {
    int kind;                          /* LEAN_INTQ: W (int8-path layout, parts stacked); LEAN_DENSE: w[] */
    intq_t W;
    intq_i8_prep_t *prep;              /* LEAN_INTQ: tables and buffers for up to LEAN_MAX_T rows */
    int nparts, in, total;             /* dense: parts stacked along the output rows, total = Σ out */
    const float *w[LEAN_MAX_PARTS];    /* dense (out[p], in) float32 */
    int out[LEAN_MAX_PARTS];
    const float *bias;                 /* (total,) or NULL */
} lean_linear_t;

typedef struct {
    const float *ln1, *ln2, *q_norm, *k_norm; /* q_norm, k_norm: NULL unless qk-norm (Qwen3) */
    int nq, nkv, ffn, window;                 /* window 0: full attention */
    lean_linear_t qkv, o, gate_up, down;
} lean_layer_t;

typedef struct {
    int n_layers, dim, hd, max_cap;
    float eps;
    const float *cos, *sin, *norm; /* (max_cap, hd) rope tables; final norm (dim) */
    lean_layer_t *layers;
    int big, att;                  /* scratch sizes (floats) */
    float *scratch;                /* LEAN_MAX_T · (dim + big + att + max nq · max_cap) */
} lean_model_t;

/* y (M, total) = L applied to x (M, in), M <= LEAN_MAX_T for an IntQuant linear (its buffers). */
void lean_linear(const lean_linear_t *L, const float *x, int M, float *y);

/* All blocks for T tokens at positions pos..pos+T-1 (each attending to its own prefix) over
 * x (T, dim) in place, then the final norm (every buffer is the plan's, allocated by lean_new). */
void lean_step(const lean_model_t *M, float *x, int T, int pos, float *const *kcache, float *const *vcache, int cap);
#endif
