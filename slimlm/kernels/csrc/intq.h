/* IntQuant kernels: the float-path layout is described in intq.c, the int8-path layout in intq_i8.c. */
#ifndef SLIMLM_INTQ_H
#define SLIMLM_INTQ_H
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define INTQ_MAXM_TILE 4 /* activation rows sharing one decode of the codes */

typedef struct {
    const uint8_t *codes;   /* float path: (out, nsb, 8 * bits) bit planes; int8 path: see intq_i8.c */
    const uint16_t *scales; /* (out, G) fp16 */
    const uint16_t *mins;   /* (out, G) fp16, NULL when symmetric */
    int out, in, group, bits;
    int G;    /* groups per row: ceil(in / group) */
    int gpad; /* group length padded to a multiple of 16 */
    int nsb;  /* superblocks of 64 codes per row: ceil(G * gpad / 64) */
    /* int8-path geometry (intq_i8_geometry) */
    int B;         /* activation block: codes per sub-block (32, or 16 for groups that do not pad to 32) */
    int spg;       /* sub-blocks per group: ceil(group / B) */
    int nsub;      /* sub-blocks per row: G * spg */
    int nfull;     /* full tiles of 16 sub-blocks */
    int R;         /* lanes per sub-block in the last, partial tile (0: none) */
    int row_codes; /* codes per repacked row, pads included (a multiple of 64) */
} intq_t;

/* One tile of 16 int32 lanes: the scale of lane l is scales[g0 + idx[l]]. */
typedef struct {
    int sb0, R, nsteps; /* first sub-block, lanes per sub-block, 64-code steps */
    int g0, ng, ident;  /* first group, groups it touches, idx == 0..15 */
    int32_t idx[16];
} intq_tile_t;

/* Activations quantized to int8 for the int8 path, laid out like one repacked row. */
typedef struct {
    int ntiles;
    const intq_tile_t *tiles;
    const int8_t *xq; /* (M, row_codes) */
    const float *dv;  /* (M, ntiles, 16) activation scale of each lane's sub-block, 0 on pad lanes */
    const float *xsv; /* (M, ntiles, 16) factor · Σ of the dequantized block on its first lane, else 0 */
} intq_x8_t;

int intq_matmul(const intq_t *W, const float *x, int M, float *y); /* y (M, out) = x (M, in) W^T */
int intq_dequant(const intq_t *W, float *w);                       /* w (out, in) */
const char *intq_isa(void);
int intq_has_avx512(void);
void intq_rows_avx512(const intq_t *W, int r0, int r1, const float *xp, int xstride, const float *xs, int M, float *y);

/* fn(args..., b) with b a compile-time constant equal to `bits` (2..8), so each bit width gets its own
 * unrolled copy of an always_inline kernel: `INTQ_BY_BITS(W->bits, rows_bits, W, X, r0, r1, M, y);` */
#define INTQ_BY_BITS(bits, fn, ...)                                                                                    \
    do {                                                                                                               \
        switch (bits) {                                                                                                \
        case 2: fn(__VA_ARGS__, 2); break;                                                                             \
        case 3: fn(__VA_ARGS__, 3); break;                                                                             \
        case 4: fn(__VA_ARGS__, 4); break;                                                                             \
        case 5: fn(__VA_ARGS__, 5); break;                                                                             \
        case 6: fn(__VA_ARGS__, 6); break;                                                                             \
        case 7: fn(__VA_ARGS__, 7); break;                                                                             \
        default: fn(__VA_ARGS__, 8); break;                                                                            \
        }                                                                                                              \
    } while (0)

static inline void intq_split(int n, int nt, int t, int *a, int *b) { /* rows [a, b) of thread t of nt */
    const int per = (n + nt - 1) / nt;
    *a = t * per < n ? t * per : n;
    *b = *a + per < n ? *a + per : n;
}

/* Rows [a, b) of n for the calling thread of the enclosing OpenMP parallel region (all of them without OpenMP). */
static inline void intq_thread_rows(int n, int *a, int *b) {
#ifdef _OPENMP
    intq_split(n, omp_get_num_threads(), omp_get_thread_num(), a, b);
#else
    intq_split(n, 1, 0, a, b);
#endif
}

void intq_i8_geometry(intq_t *W);

/* The per-matrix tables and activation buffers of an int8-path product for up to max_m rows,
 * built once (intq_i8_prepare) and reused by every call of a fused step. */
typedef struct {
    int max_m;
    intq_tile_t *T;
    int32_t *map;
    int8_t *xi, *xq;
    float *dsig, *lanes;
} intq_i8_prep_t;
intq_i8_prep_t *intq_i8_prepare(const intq_t *W, int max_m); /* NULL when out of memory */
void intq_i8_release(intq_i8_prep_t *P);
void intq_matmul_i8_prepared(const intq_t *W, const intq_i8_prep_t *P, const float *x, int M, float *y);
int intq_matmul_i8(const intq_t *W, const float *x, int M, float *y); /* int8 activations, see intq_i8.c */
int intq_dequant_i8(const intq_t *W, float *w);

/* One ISA's int8-path kernels; cpu.c picks the set at run time. */
typedef void (*intq_quantize_fn)(const intq_t *W, const float *x, int8_t *xi, float *d, float *sig);
typedef void (*intq_rows_i8_fn)(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y);
typedef struct {
    const char *name; /* avx512_vnni, avx_vnni, avx2, neon_dotprod, scalar */
    int needs;        /* cpu.c feature bits the CPU must have */
    int fold;         /* lane sums come out times 2^class(l) for one-plane codes: layout_x folds it into dv */
    intq_quantize_fn quantize; /* per sub-block int8 rounding of one row; NULL: the portable loop */
    intq_rows_i8_fn rows;      /* rows [r0, r1) of y (M, out) */
} intq_i8_kernels_t;
const intq_i8_kernels_t *intq_i8_kernels(void);
int intq_set_isa(const char *name); /* 0 done, -1 the CPU lacks it, -2 unknown; NULL: the best */
const char *intq_isas(void);        /* the usable kernel names, best first, comma-separated */
int intq_isa_forced(void);
int intq_has_avx2(void);            /* AVX2 + FMA + F16C, and the int8 choice is not scalar */
int intq_has_vnni(void);            /* the int8 path runs its AVX-512 VNNI kernel */

void intq_quantize_blocks_avx512(const intq_t *W, const float *x, int8_t *xi, float *d, float *sig);
void intq_rows_i8_avx512(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y);
void intq_quantize_blocks_avx2(const intq_t *W, const float *x, int8_t *xi, float *d, float *sig);
void intq_rows_i8_avx2(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y);
void intq_rows_i8_avxvnni(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y);
void intq_quantize_blocks_neon(const intq_t *W, const float *x, int8_t *xi, float *d, float *sig);
void intq_rows_i8_neon(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y);
#endif
