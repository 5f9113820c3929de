/* The int8 path with AVX2 (vpmaddubsw + vpmaddwd), for x86-64 CPUs without VNNI (Zen 1-3,
 * Haswell to Skylake client): the 256-bit template intq_i8_x86_256.h, and the activation
 * rounding that it and the AVX-VNNI kernel share. Called only when cpu.c finds AVX2, FMA
 * and F16C. */
#if defined(__x86_64__) || defined(_M_X64)
#define I8_TARGET "avx2,fma,f16c"
#define I8_SUFFIX avx2
#define I8_VNNI 0
#include "intq_i8_x86_256.h"

/* Per sub-block: amax, d = amax / 127, xi = round-half-even(x · (1 / d)), σ = d · Σ xi — as
 * quantize_blocks in intq_i8.c, bit for bit (vcvtps2dq rounds to nearest even). */
TARGET void intq_quantize_blocks_avx2(const intq_t *W, const float *x, int8_t *xi, float *d, float *sig) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    const __m256 sign = _mm256_set1_ps(-0.f);
    const int nq = W->B / 8;
    for (int sb = 0; sb < W->nsub; sb++) {
        const int g = sb / W->spg, c0 = g * W->group, j0 = (sb % W->spg) * W->B;
        const int glen = c0 + W->group <= W->in ? W->group : W->in - c0;
        const int n = glen - j0 < W->B ? (glen - j0 > 0 ? glen - j0 : 0) : W->B;
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int q = 0; q < 4; q++) {
            const int cnt = q < nq ? (n - 8 * q < 0 ? 0 : (n - 8 * q > 8 ? 8 : n - 8 * q)) : 0;
            const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), lane);
            v[q] = cnt ? _mm256_maskload_ps(x + c0 + j0 + 8 * q, mask) : _mm256_setzero_ps();
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[q]));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float ds = _mm_cvtss_f32(m) / 127.f, id = ds != 0.f ? 1.f / ds : 0.f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i iv[4], sum = _mm256_setzero_si256();
        for (int q = 0; q < 4; q++) {
            iv[q] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[q], vid)), lo), hi);
            sum = _mm256_add_epi32(sum, iv[q]);
        }
        const __m256i b = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3])), order);
        if (W->B == 32)
            _mm256_storeu_si256((__m256i *)(xi + (size_t)sb * W->B), b);
        else
            _mm_storeu_si128((__m128i *)(xi + (size_t)sb * W->B), _mm256_castsi256_si128(b));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        d[sb] = ds;
        sig[sb] = ds * (float)_mm_cvtsi128_si32(s4);
    }
}
#endif /* x86-64 */
