/* Which kernels this CPU runs, decided once at run time (never by build flags alone).
 *
 * Features are read from the CPU and the OS: cpuid and xgetbv on x86-64 (a feature counts
 * only when the OS saves its registers), getauxval(AT_HWCAP) on Linux/aarch64, sysctl on
 * Apple silicon. The int8 path (intq_i8.c) then takes the best kernel the CPU has:
 *
 *   avx512_vnni   AVX-512 F/BW/VL + VNNI: 512-bit vpdpbusd          (intq_i8_avx512.c)
 *   avx_vnni      AVX2 + AVX-VNNI: 256-bit vpdpbusd                  (intq_i8_avxvnni.c)
 *   avx2          AVX2 + FMA + F16C: vpmaddubsw / vpmaddwd           (intq_i8_avx2.c)
 *   neon_dotprod  aarch64 with the dot-product extension: sdot       (intq_i8_neon.c)
 *   scalar        portable C, any CPU                                 (intq_i8.c)
 *
 * SLIMLM_ISA=<name> (or intq_set_isa) picks a lower one the CPU also has, for tests and
 * comparisons; the AVX-512 float loops (intq.c, lean.c) run only while the int8 choice is
 * avx512_vnni or nothing was forced, so a forced avx2 runs as an AVX2-only CPU would.
 */
#include <stdlib.h>
#include <string.h>
#include "intq.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SLIMLM_X86 1
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#if defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

enum { F_AVX2 = 1, F_AVX512 = 2, F_AVX512VNNI = 4, F_AVXVNNI = 8, F_NEONDOT = 16 };

#ifdef SLIMLM_X86
static unsigned long long xgetbv0(void) {
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

static int detect(void) {
    int f = 0;
#ifdef SLIMLM_X86
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, f16c = (c >> 29) & 1;
    if (!osxsave) return 0;
    const unsigned long long xcr0 = xgetbv0();
    const int os_avx = (xcr0 & 6) == 6, os_avx512 = (xcr0 & 0xe6) == 0xe6;
    if (!os_avx || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    const int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1, avx512vl = (b >> 31) & 1;
    const int avx512vnni = (c >> 11) & 1;
    if (avx2 && fma && f16c) f |= F_AVX2;
    if (os_avx512 && avx512f && avx512bw && avx512vl && f16c && fma) f |= F_AVX512;
    if ((f & F_AVX512) && avx512vnni) f |= F_AVX512VNNI;
    if ((f & F_AVX2) && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1)) f |= F_AVXVNNI;
#elif defined(__aarch64__) && defined(__linux__)
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) f |= F_NEONDOT;
#elif defined(__aarch64__) && defined(__APPLE__)
    int v = 0;
    size_t n = sizeof v;
    if (sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &n, NULL, 0) == 0 && v) f |= F_NEONDOT;
#endif
    return f;
}

static int features(void) {
    static int known = -1;
    if (known < 0) known = detect();
    return known;
}

void intq_rows_i8_scalar(const intq_t *W, const intq_x8_t *X, int r0, int r1, int M, float *y);

/* Best first. */
static const intq_i8_kernels_t KERNELS[] = {
#ifdef SLIMLM_X86
    {"avx512_vnni", F_AVX512VNNI, 1, intq_quantize_blocks_avx512, intq_rows_i8_avx512},
    {"avx_vnni", F_AVXVNNI, 0, intq_quantize_blocks_avx2, intq_rows_i8_avxvnni},
    {"avx2", F_AVX2, 0, intq_quantize_blocks_avx2, intq_rows_i8_avx2},
#endif
#if defined(__aarch64__)
    {"neon_dotprod", F_NEONDOT, 0, intq_quantize_blocks_neon, intq_rows_i8_neon},
#endif
    {"scalar", 0, 0, NULL, intq_rows_i8_scalar},
};
#define NKERNELS ((int)(sizeof KERNELS / sizeof KERNELS[0]))

static const intq_i8_kernels_t *chosen;
static int forced;

static int usable(const intq_i8_kernels_t *k) { return (features() & k->needs) == k->needs; }

/* 0: done; -1: the CPU lacks it; -2: no kernel of that name. NULL or "": the best one. */
int intq_set_isa(const char *name) {
    if (!name || !*name) {
        for (int i = 0; i < NKERNELS; i++)
            if (usable(&KERNELS[i])) {
                chosen = &KERNELS[i], forced = 0;
                return 0;
            }
    }
    for (int i = 0; name && i < NKERNELS; i++)
        if (!strcmp(KERNELS[i].name, name)) {
            if (!usable(&KERNELS[i])) return -1;
            chosen = &KERNELS[i], forced = 1;
            return 0;
        }
    static const char *const known[] = {"avx512_vnni", "avx_vnni", "avx2", "neon_dotprod", "scalar"};
    for (int i = 0; name && i < (int)(sizeof known / sizeof *known); i++)
        if (!strcmp(known[i], name)) return -1; /* another architecture's */
    return -2;
}

/* The kernels in use: $SLIMLM_ISA's when set and usable (the Python loader reports a bad
 * value), else the best this CPU has. */
const intq_i8_kernels_t *intq_i8_kernels(void) {
    if (!chosen && (intq_set_isa(getenv("SLIMLM_ISA")) != 0)) intq_set_isa(NULL);
    return chosen;
}

const char *intq_isa(void) { return intq_i8_kernels()->name; }

/* The names of the kernels this CPU can run, best first, separated by commas. */
const char *intq_isas(void) {
    static char buf[128];
    buf[0] = 0;
    for (int i = 0; i < NKERNELS; i++)
        if (usable(&KERNELS[i])) {
            if (buf[0]) strcat(buf, ",");
            strcat(buf, KERNELS[i].name);
        }
    return buf;
}

int intq_isa_forced(void) {
    intq_i8_kernels();
    return forced;
}

int intq_has_avx512(void) {
    const intq_i8_kernels_t *k = intq_i8_kernels();
    return (features() & F_AVX512) && (!forced || !strcmp(k->name, "avx512_vnni"));
}

int intq_has_avx2(void) {
    const intq_i8_kernels_t *k = intq_i8_kernels();
    return (features() & F_AVX2) && strcmp(k->name, "scalar");
}

int intq_has_vnni(void) { return !strcmp(intq_i8_kernels()->name, "avx512_vnni"); }
