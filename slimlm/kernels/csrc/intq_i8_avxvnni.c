/* The int8 path with AVX-VNNI (256-bit vpdpbusd, VEX-encoded), for x86-64 CPUs that have it
 * with AVX2 (Alder Lake and later client cores, Sapphire Rapids, Zen 5): the template
 * intq_i8_x86_256.h with the dot product in one instruction; 8-bit codes need no split.
 * Activations are rounded by intq_i8_avx2.c's loop. Called only when cpu.c finds AVX-VNNI. */
#if defined(__x86_64__) || defined(_M_X64)
#define I8_TARGET "avx2,fma,f16c,avxvnni"
#define I8_SUFFIX avxvnni
#define I8_VNNI 1
#include "intq_i8_x86_256.h"
#endif /* x86-64 */
