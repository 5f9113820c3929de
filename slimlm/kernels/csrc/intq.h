/* IntQuant kernels: the repacked layout is described in intq.c. */
#ifndef SLIMLM_INTQ_H
#define SLIMLM_INTQ_H
#include <stdint.h>

#define INTQ_MAXM_TILE 4 /* activation rows sharing one decode of the codes */

typedef struct {
    const uint8_t *codes;   /* (out, nsb, 8 * bits) bit planes */
    const uint16_t *scales; /* (out, G) fp16 */
    const uint16_t *mins;   /* (out, G) fp16, NULL when symmetric */
    int out, in, group, bits;
    int G;    /* groups per row: ceil(in / group) */
    int gpad; /* group length padded to a multiple of 16 */
    int nsb;  /* superblocks of 64 codes per row: ceil(G * gpad / 64) */
} intq_t;

int intq_matmul(const intq_t *W, const float *x, int M, float *y); /* y (M, out) = x (M, in) W^T */
int intq_dequant(const intq_t *W, float *w);                       /* w (out, in) */
const char *intq_isa(void);
int intq_has_avx512(void);
void intq_rows_avx512(const intq_t *W, int r0, int r1, const float *xp, int xstride, const float *xs, int M, float *y);
#endif
