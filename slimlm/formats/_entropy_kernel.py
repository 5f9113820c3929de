"""The C kernel of the Huffman coder in `_entropy.py`: its source, and its build and load.

The source is a template over the coder's constants (longest code, symbols per table entry,
longest chunk); `load` compiles it once per machine into the user cache (with OpenMP where
the compiler has it, sharing torch's libgomp) and returns its two entry points, or None
where no C compiler is found or `SLIMLM_ENTROPY_KERNEL=0` (the numpy reference then).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

SRC = r"""
#include <stdint.h>
#include <string.h>
#define L %(L)d          /* longest code: one table index is the next L bits */
#define MULTI %(MULTI)d  /* most symbols one table entry emits */
#define MAX_CHUNK %(MAX_CHUNK)d
#define LANES 32         /* chunks decoded as one group by one thread (at most 32: a lane mask is 32 bits) */
#define SUB 8            /* lanes interleaved by the scalar lookups */

/* Next L bits at bit `pos` of the stream (read as big-endian 64 bits; 8 bytes must exist). */
static inline uint32_t peek(const uint8_t *s, uint64_t pos) {
    uint64_t w;
    memcpy(&w, s + (pos >> 3), 8);
    return (uint32_t)((__builtin_bswap64(w) << (pos & 7)) >> (64 - L));
}

/* The same near the stream's end: bytes past it read as zero. */
static inline uint32_t peek_safe(const uint8_t *s, int64_t nbytes, uint64_t pos) {
    uint64_t w = 0;
    int64_t b = (int64_t)(pos >> 3);
    for (int i = 0; i < 8; i++) w = (w << 8) | (b + i < nbytes ? s[b + i] : 0);
    return (uint32_t)((w << (pos & 7)) >> (64 - L));
}

/* One decoded element: the exponent between the raw byte's sign (bit 7) and mantissa (bits 0-6). */
#define BF16_BITS(sym, r) ((((uint32_t)(r) & 0x80u) << 8) | ((uint32_t)(sym) << 7) | ((uint32_t)(r) & 0x7Fu))

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
static int has_avx512(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    }
    return known;
}

/* The bfloat16 (mode 1) or widened float32 (mode 2) stores of store(), 32 elements a step;
   returns how many elements it wrote (a multiple of 32; the caller finishes the rest). */
AVX512 static int64_t store_avx512(int mode, void *restrict out, const uint8_t *restrict sym, int64_t count,
                                   const uint8_t *restrict r) {
    const __m512i sign = _mm512_set1_epi16(0x80), mant = _mm512_set1_epi16(0x7F);
    int64_t k = 0;
    for (; k + 32 <= count; k += 32) {
        const __m512i e = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(sym + k)));
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(r + k)));
        const __m512i w = _mm512_or_si512(_mm512_slli_epi16(_mm512_and_si512(b, sign), 8),
                                          _mm512_or_si512(_mm512_slli_epi16(e, 7), _mm512_and_si512(b, mant)));
        if (mode == 1) {
            _mm512_storeu_si512((uint16_t *)out + k, w);
        } else {  /* float32 bits: each bfloat16 word in the high half */
            uint32_t *o = (uint32_t *)out + k;
            _mm512_storeu_si512(o, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
            _mm512_storeu_si512(o + 16, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
        }
    }
    return k;
}
#else
static int has_avx512(void) { return 0; }
#endif

/* Write `count` decoded symbols as output elements i0.. (the Store modes of _entropy.py). */
static inline void store(int mode, void *restrict out, int64_t i0, const uint8_t *restrict sym, int64_t count,
                         const uint8_t *restrict raw, int simd) {
    if (mode == 0) {
        memcpy((uint8_t *)out + i0, sym, (size_t)count);
        return;
    }
    const uint8_t *restrict r = raw + i0;
    int64_t k = 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if (simd && has_avx512())
        k = store_avx512(mode, mode == 1 ? (void *)((uint16_t *)out + i0) : (void *)((uint32_t *)out + i0), sym, count, r);
#endif
    if (mode == 1) {
        uint16_t *restrict o = (uint16_t *)out + i0;
        for (; k < count; k++) o[k] = (uint16_t)BF16_BITS(sym[k], r[k]);
    } else {
        uint32_t *restrict o = (uint32_t *)out + i0;
        for (; k < count; k++) o[k] = BF16_BITS(sym[k], r[k]) << 16;
    }
}

/* Whole-entry lookups of SUB lanes, one lookup per lane per round (SUB independent dependency
   chains): a lane takes an entry while its symbols fit in the chunk (k[j] + count <= chunk),
   its symbol bytes landing at buf + j * stride + k[j] (all 8 bytes are written; the buffer has
   room). Lanes meeting a window that starts no code stop and set their bit in *err. */
static void lookups(const uint8_t *s, const uint64_t *tab, uint64_t *pos, int64_t *k, uint8_t *buf, int64_t stride,
                    int64_t chunk, uint32_t live, uint32_t *err) {
    uint32_t alive = live & ((1u << SUB) - 1), e_bits = 0;
    while (alive) {
        for (int j = 0; j < SUB; j++) {
            uint64_t e = tab[peek(s, pos[j])];
            memcpy(buf + j * stride + k[j], &e, 8);  /* all MULTI symbol bytes (and 2 more) */
            uint32_t cnt = (uint32_t)(e >> 48) & 15, nb = (uint32_t)(e >> 52) & 15;
            uint32_t act = (alive >> j) & 1;
            uint32_t bad = act & (uint32_t)(cnt == 0);
            uint32_t fits = act & (uint32_t)(cnt != 0) & (uint32_t)(k[j] + cnt <= chunk);
            e_bits |= bad << j;
            alive &= ~((act & ~fits) << j);
            k[j] += fits ? cnt : 0;
            pos[j] += fits ? nb : 0;
        }
    }
    *err |= e_bits;
}

#if defined(__x86_64__) && defined(__GNUC__)
/* lookups() for all LANES lanes with AVX-512: 8 lanes per vector, LANES / 8 vectors in flight
   so that the gathers (stream words, table entries) overlap across vectors. */
AVX512 static void lookups_avx512(const uint8_t *s, const uint64_t *tab, uint64_t *pos, int64_t *k, uint8_t *buf,
                                  int64_t stride, int64_t chunk, uint32_t live, uint32_t *err, const uint8_t *pf,
                                  const uint8_t *pf_end) {
    enum { V = LANES / 8 };
    const __m512i bswap = _mm512_set_epi8(8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7,
                                          8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7,
                                          8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7,
                                          8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i seven = _mm512_set1_epi64(7), fifteen = _mm512_set1_epi64(15), chunkv = _mm512_set1_epi64(chunk);
    const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    __m512i p[V], kk[V], base[V];
    __mmask8 alive[V], bad_all[V];
    for (int v = 0; v < V; v++) {
        p[v] = _mm512_loadu_si512(pos + 8 * v);
        kk[v] = _mm512_loadu_si512(k + 8 * v);
        base[v] = _mm512_mullo_epi64(_mm512_add_epi64(lane, _mm512_set1_epi64(8 * v)), _mm512_set1_epi64(stride));
        alive[v] = (__mmask8)(live >> (8 * v));
        bad_all[v] = 0;
    }
    for (;;) {
        __mmask8 any = 0;
        if (pf < pf_end) {  /* spread over the rounds: the raw bytes the store pass will read */
            for (int b = 0; b < 256; b += 64) __builtin_prefetch(pf + b, 0, 3);
            pf += 256;
        }
        /* one stream gather serves two lookups: 64 bits from byte pos / 8, shifted by pos mod 8,
           hold at least 57 valid bits, and two entries take at most 2 * L = 24 of them */
        __m512i bits[V];
        for (int v = 0; v < V; v++) {
            any |= alive[v];
            __m512i w = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), alive[v], _mm512_srli_epi64(p[v], 3), s, 1);
            bits[v] = _mm512_sllv_epi64(_mm512_shuffle_epi8(w, bswap), _mm512_and_si512(p[v], seven));
        }
        if (!any) break;
        for (int r = 0; r < 2; r++) {
            for (int v = 0; v < V; v++) {
                const __mmask8 act = alive[v];
                if (!act) continue;
                const __m512i e = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), act,
                                                              _mm512_srli_epi64(bits[v], 64 - L), tab, 8);
                _mm512_mask_i64scatter_epi64(buf, act, _mm512_add_epi64(base[v], kk[v]), e, 1);
                const __m512i cnt = _mm512_and_si512(_mm512_srli_epi64(e, 48), fifteen);
                const __m512i nb = _mm512_and_si512(_mm512_srli_epi64(e, 52), fifteen);
                const __mmask8 bad = act & _mm512_cmpeq_epi64_mask(cnt, _mm512_setzero_si512());
                const __mmask8 ok = act & (__mmask8)~bad & _mm512_cmple_epi64_mask(_mm512_add_epi64(kk[v], cnt), chunkv);
                bad_all[v] |= bad;
                alive[v] = ok;  /* a lane whose next entry overflows its chunk is done */
                kk[v] = _mm512_mask_add_epi64(kk[v], ok, kk[v], cnt);
                p[v] = _mm512_mask_add_epi64(p[v], ok, p[v], nb);
                bits[v] = _mm512_sllv_epi64(bits[v], nb);
            }
        }
    }
    for (int v = 0; v < V; v++) {
        _mm512_storeu_si512(pos + 8 * v, p[v]);
        _mm512_storeu_si512(k + 8 * v, kk[v]);
        *err |= (uint32_t)bad_all[v] << (8 * v);
    }
}
#endif

/* Decode one chunk whose reads could pass the stream's end (or a short last chunk) into b (room
   for count + 8 bytes), whole table entries while they fit and then symbol by symbol, reading
   past the end only through peek_safe; returns its end bit, or UINT64_MAX when a window
   started no code or a code ran past the stream. */
static uint64_t decode_checked(const uint8_t *s, int64_t nbytes, const uint64_t *tab, uint64_t p, int64_t count,
                               uint8_t *b) {
    for (int64_t kk = 0; kk < count;) {
        const uint64_t e = tab[(int64_t)(p >> 3) + 8 <= nbytes ? peek(s, p) : peek_safe(s, nbytes, p)];
        const uint32_t cnt = (uint32_t)(e >> 48) & 15, len = (uint32_t)(e >> 56) & 15;
        if (cnt == 0) return UINT64_MAX;
        if (kk + cnt <= count) {  /* the entry's codes are the chunk's next ones */
            memcpy(b + kk, &e, 8);
            kk += cnt;
            p += (e >> 52) & 15;
        } else {
            b[kk++] = (uint8_t)e;
            p += len;
        }
        if (p > (uint64_t)nbytes * 8) return UINT64_MAX;
    }
    return p;
}

/* Decode chunks [c0, c0 + lanes); returns the first chunk that does not end where bounds[]
   says (or that met a window starting no code), or -1. Full chunks whose reads stay inside
   the stream (all but the last few of a stream) take the interleaved lookups; the rest, and
   the lanes missing from a short last group, are decoded one symbol at a time, checked. */
static int64_t decode_group(int mode, const uint8_t *s, int64_t nbytes, const int64_t *bounds, int64_t c0,
                            int lanes, int64_t n_chunks, int64_t chunk, int64_t n, const uint64_t *tab,
                            void *out, const uint8_t *raw, int simd) {
    uint8_t buf[LANES * (chunk + 8)];  /* each lane's symbols, then stored in one pass (chunk <= MAX_CHUNK) */
    const int64_t stride = chunk + 8;
    int fast = lanes;  /* lanes [0, fast) are full chunks that read at most chunk * L bits inside the stream */
    if (c0 + lanes == n_chunks && n %% chunk) fast = lanes - 1;
    while (fast > 0 && (int64_t)(((uint64_t)bounds[c0 + fast - 1] + (uint64_t)chunk * L) >> 3) + 8 > nbytes) fast--;
    uint64_t pos[LANES];
    int64_t k[LANES];
    uint32_t err = 0;
    if (fast > 0) {
        const uint8_t *pf = mode != 0 ? raw + c0 * chunk : NULL, *pf_end = pf ? pf + fast * chunk : NULL;
        const uint32_t live = fast == 32 ? ~0u : (1u << fast) - 1;  /* lanes past `fast` sit idle */
        for (int j = 0; j < LANES; j++) {
            pos[j] = (uint64_t)bounds[c0 + (j < fast ? j : 0)];
            k[j] = 0;
        }
#if defined(__x86_64__) && defined(__GNUC__)
        if (simd && has_avx512())
            lookups_avx512(s, tab, pos, k, buf, stride, chunk, live, &err, pf, pf_end);
        else
#endif
        {
            for (int64_t b = 0; pf && b < fast * chunk; b += 64) __builtin_prefetch(pf + b, 0, 3);
            for (int j0 = 0; j0 < LANES; j0 += SUB) {
                uint32_t e = 0;
                lookups(s, tab, pos + j0, k + j0, buf + j0 * stride, stride, chunk, live >> j0, &e);
                err |= e << j0;
            }
        }
    }
    int64_t first_bad = -1;
    for (int j = 0; j < lanes; j++) {
        const int64_t c = c0 + j, count = (c == n_chunks - 1) ? n - c * chunk : chunk;
        uint8_t *b = buf + j * stride;
        uint64_t p;
        if (j < fast) {
            p = pos[j];
            for (int64_t kk = k[j]; kk < chunk; kk++) {  /* the symbols of an entry that overflowed the chunk */
                uint64_t e = tab[peek(s, p)];
                uint32_t len = (uint32_t)(e >> 56) & 15;
                err |= (uint32_t)(len == 0) << j;
                b[kk] = (uint8_t)e;
                p += len;
            }
            if ((err >> j) & 1) p = UINT64_MAX;
        } else {
            p = decode_checked(s, nbytes, tab, (uint64_t)bounds[c], count, b);
        }
        if (first_bad < 0 && p != (uint64_t)bounds[c + 1]) first_bad = c;
        store(mode, out, c * chunk, b, count, raw, simd);
    }
    return first_bad;
}

/* Decode n symbols in chunks of `chunk` (bounds[0..n_chunks]: every chunk's start bit and the
   stream's end) with the multi-symbol table `tab`, on `threads` OpenMP threads. Returns -1,
   or the first chunk that does not end where bounds[] says (a damaged stream). */
int64_t slimlm_huffman_decode(int mode, const uint8_t *s, int64_t nbytes, const int64_t *bounds, int64_t n_chunks,
                              int64_t chunk, int64_t n, const uint64_t *tab, void *out, const uint8_t *raw,
                              int threads, int simd) {
    int64_t groups = (n_chunks + LANES - 1) / LANES, first = INT64_MAX;
    (void)threads;
    #pragma omp parallel for schedule(static) num_threads(threads) reduction(min: first) if (threads > 1)
    for (int64_t g = 0; g < groups; g++) {
        int64_t c0 = g * LANES, lanes = n_chunks - c0 < LANES ? n_chunks - c0 : LANES;
        int64_t bad = decode_group(mode, s, nbytes, bounds, c0, (int)lanes, n_chunks, chunk, n, tab, out, raw, simd);
        if (bad >= 0 && bad < first) first = bad;
    }
    return first == INT64_MAX ? -1 : first;
}

/* Write the codes of n symbols MSB first into out (zeroed, room for every byte plus 8). */
void slimlm_huffman_encode(const uint8_t *sym, int64_t n, const uint32_t *codes, const uint8_t *lengths,
                           uint8_t *out) {
    uint64_t acc = 0;  /* pending bits, the oldest highest */
    int bits = 0;
    for (int64_t i = 0; i < n; i++) {
        acc = (acc << lengths[sym[i]]) | codes[sym[i]];
        bits += lengths[sym[i]];
        while (bits >= 8) {
            bits -= 8;
            *out++ = (uint8_t)(acc >> bits);
        }
    }
    if (bits) *out = (uint8_t)(acc << (8 - bits));
}
"""


@functools.lru_cache(maxsize=None)
def load(max_len: int, multi: int, max_chunk: int) -> SimpleNamespace | None:
    """The C coder (decode, encode), compiled once per machine into the user cache (with OpenMP
    where the compiler has it); None where no C compiler is found (the numpy reference then)."""
    if os.environ.get("SLIMLM_ENTROPY_KERNEL", "1") == "0":
        return None
    import torch  # noqa: F401  (loads torch's libgomp first, so the kernel shares torch's OpenMP threads)

    src = SRC % {"L": max_len, "MULTI": multi, "MAX_CHUNK": max_chunk}
    tag = hashlib.sha256(src.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slimlm"
    lib = cache / f"entropy-{tag}.so"
    try:
        if not lib.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                c_file, so = Path(tmp) / "entropy.c", Path(tmp) / "entropy.so"
                c_file.write_text(src)
                cc = os.environ.get("CC", "cc")
                base = [cc, "-O3", "-std=gnu11", "-shared", "-fPIC", str(c_file), "-o", str(so)]
                try:
                    subprocess.run(base + ["-fopenmp"], check=True, capture_output=True, timeout=120)
                except subprocess.CalledProcessError:  # no OpenMP: one thread
                    subprocess.run(base, check=True, capture_output=True, timeout=120)
                os.replace(so, lib)
        so = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError):
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    so.slimlm_huffman_decode.argtypes = [ctypes.c_int, p, i64, p, i64, i64, i64, p, p, p, ctypes.c_int, ctypes.c_int]
    so.slimlm_huffman_decode.restype = i64
    so.slimlm_huffman_encode.argtypes = [p, i64, p, p, p]
    so.slimlm_huffman_encode.restype = None
    return SimpleNamespace(decode=so.slimlm_huffman_decode, encode=so.slimlm_huffman_encode)
