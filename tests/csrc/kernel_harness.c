/* The int8-path kernels run outside Python, for CPUs this machine can only emulate
 * (tests/test_arm.py builds it for aarch64 and runs it under qemu-aarch64).
 *
 *   kernel_harness CASES OUT ISA...
 *
 * prints "default <isa>" (the kernel cpu.c picks with SLIMLM_ISA unset) and "isas <list>",
 * then for each case of CASES and each ISA named, runs intq_matmul_i8 with that ISA forced
 * and appends y (M, out) float32 to OUT. With "--quantize ISA" instead, it appends for
 * each case and activation row what that ISA's activation rounding gives: xi (nsub, B) int8,
 * d (nsub,) and σ (nsub,) float32. CASES is a sequence of cases, little-endian:
 *
 *   int32 out, in, group, bits, has_mins, M, row_bytes
 *   uint8 codes[out · row_bytes]    the int8-path layout (slimlm.kernels.intq.repack_i8)
 *   uint16 scales[out · G], mins[out · G] (when has_mins)   fp16 bits
 *   float32 x[M · in]
 *
 * Every array the kernels read sits against an unmapped page, so reading past one (the
 * scales of a row's last groups, say) is a crash rather than a silent pass. Exit status 0
 * when all ran; 2 for bad input or an ISA that cannot run here, with one line saying why.
 */
#define _DEFAULT_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "intq.h"

static void die(const char *what, const char *arg) {
    fprintf(stderr, "kernel_harness: %s%s\n", what, arg ? arg : "");
    exit(2);
}

/* n bytes ending right before a PROT_NONE page. */
static void *guarded(size_t n, void **base, size_t *len) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE), body = (n + page - 1) / page * page;
    *len = body + page;
    char *p = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) die("out of memory", NULL);
    if (mprotect(p + body, page, PROT_NONE)) die("mprotect failed", NULL);
    *base = p;
    return p + body - n;
}

typedef struct {
    void *base;
    size_t len;
    void *p;
} buf_t;

static void *read_buf(FILE *f, size_t n, buf_t *b) {
    b->p = guarded(n, &b->base, &b->len);
    if (n && fread(b->p, 1, n, f) != n) die("truncated case file", NULL);
    return b->p;
}

/* Each activation row through the ISA's own int8 rounding (the quantize field of its kernels). */
static void quantize_rows(const intq_t *W, const float *x, int M, const char *isa, FILE *out) {
    if (intq_set_isa(isa)) die("this CPU cannot run ", isa);
    const intq_quantize_fn q = intq_i8_kernels()->quantize;
    if (!q) die("no activation rounding of its own in ", isa);
    buf_t bq, bd;
    const size_t n = (size_t)W->nsub * W->B;
    int8_t *xi = guarded(n, &bq.base, &bq.len);
    float *ds = guarded(2 * W->nsub * sizeof(float), &bd.base, &bd.len);
    for (int m = 0; m < M; m++) {
        q(W, x + (size_t)m * W->in, xi, ds, ds + W->nsub);
        if (fwrite(xi, 1, n, out) != n || fwrite(ds, sizeof(float), 2 * W->nsub, out) != 2 * (size_t)W->nsub)
            die("cannot write the output", NULL);
    }
    munmap(bq.base, bq.len), munmap(bd.base, bd.len);
}

int main(int argc, char **argv) {
    if (argc < 4) die("usage: kernel_harness CASES OUT ISA...", NULL);
    printf("default %s\nisas %s\n", intq_isa(), intq_isas());
    fflush(stdout);
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) die("cannot open ", !in ? argv[1] : argv[2]);
    const int quant = !strcmp(argv[3], "--quantize");
    if (quant && argc != 5) die("usage: kernel_harness CASES OUT --quantize ISA", NULL);
    int32_t h[7];
    while (fread(h, sizeof h, 1, in) == 1) {
        intq_t W = {0};
        W.out = h[0], W.in = h[1], W.group = h[2], W.bits = h[3];
        const int has_mins = h[4], M = h[5], row_bytes = h[6];
        if (W.bits < 2 || W.bits > 8 || W.out < 1 || W.in < 1 || W.group < 1 || W.group > W.in || M < 1)
            die("bad case header", NULL);
        W.G = (W.in + W.group - 1) / W.group;
        W.gpad = (W.group + 15) / 16 * 16;
        W.nsb = (W.G * W.gpad + 63) / 64;
        intq_i8_geometry(&W);
        if ((size_t)row_bytes * 8 != (size_t)W.row_codes * W.bits) die("Python and C disagree on the row length", NULL);
        buf_t bc, bs, bm = {0}, bx, by;
        W.codes = read_buf(in, (size_t)W.out * row_bytes, &bc);
        W.scales = read_buf(in, (size_t)W.out * W.G * 2, &bs);
        W.mins = has_mins ? read_buf(in, (size_t)W.out * W.G * 2, &bm) : NULL;
        const float *x = read_buf(in, (size_t)M * W.in * sizeof(float), &bx);
        float *y = guarded((size_t)M * W.out * sizeof(float), &by.base, &by.len);
        if (quant) quantize_rows(&W, x, M, argv[4], out);
        for (int i = 3; !quant && i < argc; i++) {
            const int rc = intq_set_isa(argv[i]);
            if (rc) die(rc == -1 ? "this CPU cannot run " : "no kernels named ", argv[i]);
            memset(y, 0xff, (size_t)M * W.out * sizeof(float)); /* NaN: a row left unwritten shows */
            if (intq_matmul_i8(&W, x, M, y)) die("out of memory", NULL);
            if (fwrite(y, sizeof(float), (size_t)M * W.out, out) != (size_t)M * W.out) die("cannot write ", argv[2]);
        }
        munmap(bc.base, bc.len), munmap(bs.base, bs.len), munmap(bx.base, bx.len), munmap(by.base, by.len);
        if (bm.base) munmap(bm.base, bm.len);
    }
    if (fclose(out)) die("cannot write ", argv[2]);
    fclose(in);
    return 0;
}
