"""Canonical, length-limited Huffman coding of byte symbols, chunked for parallel decoding.

Layout of one coded sequence of n symbols (each in 0..255):

    lengths     uint8[A]       code length of symbol s (0 = absent), A = alphabet size;
                               the canonical code follows from the lengths alone
    stream      uint8[B]       the codes, concatenated most significant bit first, zero
                               padded to a whole byte (B = ceil(total_bits / 8))
    chunk_bits  uint16[C]      bits taken by each run of `chunk` consecutive symbols
                               (C = ceil(n / chunk), the last run possibly shorter)

The chunk lengths give every chunk's start bit (a prefix sum), so chunks decode
independently. Codes are at most `MAX_LEN` = 12 bits, so one lookup in a 4096-entry table
decodes a symbol: the reference decoder advances all chunks one symbol per step (a
vectorised lookup over C lanes). The C kernel looks the next 12 bits up in a table of
*every* code lying wholly inside them (`multi_table`; exponent codes average ~2.7 bits, so
one lookup emits ~4 symbols), decodes 8 chunks interleaved per thread so their lookups
overlap, fuses the output store (e.g. the exponent placed into a bfloat16 word, `Store`),
and splits the chunks over OpenMP threads. Decoding checks that every chunk ends exactly
where the next begins and the last one at the stream's end, and that no lookup met a
window that starts no code, so a damaged stream raises instead of returning symbols.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import heapq
import os
import subprocess
import tempfile
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from slimlm.errors import SlimlmError

MAX_LEN = 12  # longest code; the decode table has 2^MAX_LEN entries
MAX_CHUNK = 65535 // MAX_LEN  # a chunk's bit count must fit uint16


@dataclass(frozen=True)
class Coded:
    """One Huffman-coded symbol sequence (numpy arrays; see the module docstring)."""

    n: int
    chunk: int
    lengths: np.ndarray  # uint8 (A,)
    stream: np.ndarray  # uint8 (B,)
    chunk_bits: np.ndarray  # uint16 (C,)

    def nbits(self) -> int:
        return 8 * (self.lengths.size + self.stream.size) + 16 * self.chunk_bits.size


# ---- code construction -------------------------------------------------------------------------


def code_lengths(counts: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Huffman code lengths (uint8, one per symbol, 0 where the count is 0), no code
    longer than `max_len`: over-long codes are cut to `max_len`, then the rarest codes
    shorter than that are lengthened one bit at a time until Kraft's inequality holds."""
    counts = np.asarray(counts, dtype=np.int64)
    present = np.nonzero(counts)[0]
    lengths = np.zeros(counts.size, dtype=np.int64)
    if present.size == 0:
        return lengths.astype(np.uint8)
    if present.size == 1:
        lengths[present[0]] = 1  # a lone symbol still needs one bit per occurrence
        return lengths.astype(np.uint8)
    if present.size > 1 << max_len:
        raise ValueError(f"{present.size} symbols cannot have codes of at most {max_len} bits")
    heap = [(int(counts[s]), i, [int(s)]) for i, s in enumerate(present)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:  # classic Huffman merge; each merge adds a bit to its members
        c1, _, m1 = heapq.heappop(heap)
        c2, _, m2 = heapq.heappop(heap)
        lengths[m1 + m2] += 1
        heapq.heappush(heap, (c1 + c2, tie, m1 + m2))
        tie += 1
    lengths = np.minimum(lengths, max_len)
    kraft = lambda: int((1 << (max_len - lengths[present])).sum())  # noqa: E731 (scaled by 2^max_len)
    while kraft() > 1 << max_len:
        short = present[lengths[present] < max_len]
        lengths[short[np.argmin(counts[short])]] += 1
    return lengths.astype(np.uint8)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes (int64 per symbol) from lengths: shorter codes first, then by symbol."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    order = np.lexsort((np.arange(lengths.size), lengths))
    order = order[lengths[order] > 0]
    code, prev = 0, 0
    for i, s in enumerate(order):
        ln = int(lengths[s])
        code = 0 if i == 0 else (code + 1) << (ln - prev)
        codes[s], prev = code, ln
    return codes


def decode_table(lengths: np.ndarray) -> np.ndarray:
    """(2^MAX_LEN,) uint16 table: the next MAX_LEN stream bits -> symbol | length << 8.
    Windows that start no code (an incomplete code) map to 0, length 0. Refuses lengths
    that break Kraft's inequality or the length limit — a damaged table."""
    lengths = np.asarray(lengths).astype(np.int64)
    if lengths.size > 256 or (lengths > MAX_LEN).any() or (lengths < 0).any():
        raise SlimlmError("a Huffman code table has lengths out of range; the coded weights are corrupt")
    used = lengths[lengths > 0]
    if used.size == 0 or int((1 << (MAX_LEN - used)).sum()) > 1 << MAX_LEN:
        raise SlimlmError("a Huffman code table is not a prefix code; the coded weights are corrupt")
    table = np.zeros(1 << MAX_LEN, dtype=np.uint16)
    codes = canonical_codes(lengths)
    for s in np.nonzero(lengths)[0]:
        ln = int(lengths[s])
        lo = int(codes[s]) << (MAX_LEN - ln)
        table[lo: lo + (1 << (MAX_LEN - ln))] = s | (ln << 8)
    return table


# ---- encode ------------------------------------------------------------------------------------


def _pack_numpy(code: np.ndarray, ln: np.ndarray, nbytes: int) -> np.ndarray:
    """Reference bit writer: codes (n,) of lengths ln (n,), MSB first, into nbytes bytes."""
    end = np.cumsum(ln)
    start = end - ln
    # A code of <= 12 bits starting at bit offset start & 7 lies inside 3 bytes: place it
    # left-aligned in a 24-bit window and add each window byte into its stream byte (codes
    # never overlap, so the sums are ORs). bincount sums in float64, exact for bytes.
    win = code << (24 - ln - (start & 7))
    byte = start >> 3
    stream = np.zeros(nbytes + 2, dtype=np.int64)
    for k, shift in enumerate((16, 8, 0)):
        stream += np.bincount(byte + k, weights=(win >> shift) & 0xFF, minlength=nbytes + 2).astype(np.int64)[: nbytes + 2]
    return stream[:nbytes].astype(np.uint8)


def encode(symbols: np.ndarray, chunk: int = 256, alphabet: int = 256, use_kernel: bool = True) -> Coded:
    """Huffman-code a 1-D sequence of symbols in [0, alphabet) with its own code table."""
    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"chunk must be in 1..{MAX_CHUNK}, got {chunk}")
    sym = np.ascontiguousarray(symbols).reshape(-1)
    if sym.dtype != np.uint8:
        if sym.size and (sym.min() < 0 or sym.max() >= alphabet):
            raise ValueError(f"symbols exceed the alphabet of {alphabet}")
        sym = sym.astype(np.uint8)
    n = sym.size
    counts = np.bincount(sym, minlength=alphabet)
    if counts.size > alphabet:
        raise ValueError(f"symbols exceed the alphabet of {alphabet}")
    lengths = code_lengths(counts)
    codes = canonical_codes(lengths)
    ln = lengths[sym]  # (n,) uint8 bits per symbol
    starts = np.arange(0, n, chunk)
    chunk_bits = np.add.reduceat(ln, starts, dtype=np.int64) if n else np.zeros(0, np.int64)
    nbytes = (int(chunk_bits.sum()) + 7) // 8
    k = _kernel() if use_kernel else None
    if k is not None:
        stream = np.zeros(nbytes + 8, dtype=np.uint8)
        table = np.ascontiguousarray(codes, dtype=np.uint32)
        k.encode(sym.ctypes.data, n, table.ctypes.data, lengths.ctypes.data, stream.ctypes.data)
        stream = stream[:nbytes]
    else:
        stream = _pack_numpy(codes[sym], ln.astype(np.int64), nbytes)
    return Coded(n=n, chunk=chunk, lengths=lengths[: int(np.nonzero(counts)[0].max()) + 1] if n else lengths[:0],
                 stream=stream, chunk_bits=chunk_bits.astype(np.uint16))


# ---- decode ------------------------------------------------------------------------------------


class Store(IntEnum):
    """What the decoder writes for symbol i (the kernel fuses it into its store):
    SYMBOLS: the symbol byte; BF16: the bfloat16 bit pattern (uint16) whose exponent is the
    symbol and whose sign+mantissa come from raw[i] (sign in bit 7, mantissa in bits 0-6);
    BF16_AS_F32: that bfloat16 widened to float32 bits (uint32, the same << 16)."""

    SYMBOLS = 0
    BF16 = 1
    BF16_AS_F32 = 2

    def apply(self, symbols: np.ndarray, raw: np.ndarray | None) -> np.ndarray:
        """The reference of the kernel's fused store."""
        if self is Store.SYMBOLS:
            return symbols
        r = raw.astype(np.uint32)
        bits = ((r & 0x80) << 8) | (symbols.astype(np.uint32) << 7) | (r & 0x7F)
        return bits.astype(np.uint16) if self is Store.BF16 else bits << 16


STORE_DTYPE = {Store.SYMBOLS: np.uint8, Store.BF16: np.uint16, Store.BF16_AS_F32: np.uint32}
MULTI = 6  # most symbols one entry of the kernel's multi-symbol table emits


def multi_table(lengths: np.ndarray) -> np.ndarray:
    """(2^MAX_LEN,) uint64 table of the C kernel: the next MAX_LEN stream bits -> every code
    that lies wholly inside them (at most MULTI), so one lookup emits several short codes:
    bits 0-47 the symbols (first in the low byte), 48-51 how many (0: the window starts no
    code), 52-55 the bits they take, 56-59 the first code's length alone."""
    single = decode_table(lengths).astype(np.uint64)
    w = np.arange(1 << MAX_LEN, dtype=np.uint64)
    mask = np.uint64((1 << MAX_LEN) - 1)
    used = np.zeros_like(w)
    count = np.zeros_like(w)
    syms = np.zeros_like(w)
    alive = np.ones(w.size, dtype=bool)
    for j in range(MULTI):
        e = single[(w << used) & mask]  # the bits after the codes taken so far, zero padded
        ln = e >> np.uint64(8)
        # a code found in the zero-padded window is the real next code iff it ends inside the
        # real bits (prefix-free)
        alive &= (ln > 0) & (used + ln <= MAX_LEN)
        syms |= np.where(alive, (e & np.uint64(0xFF)) << np.uint64(8 * j), np.uint64(0))
        used += np.where(alive, ln, np.uint64(0))
        count += alive
    first = single >> np.uint64(8)
    return syms | (count << np.uint64(48)) | (used << np.uint64(52)) | (first << np.uint64(56))


def _chunk_starts(c: Coded) -> np.ndarray:
    """Start bit of every chunk, checked against the stream size."""
    want = -(-c.n // c.chunk) if c.chunk > 0 else -1
    if c.chunk_bits.size != want:
        raise SlimlmError(f"a coded stream lists {c.chunk_bits.size} chunks for {c.n} symbols, {want} expected; "
                          "the coded weights are corrupt")
    ends = np.cumsum(c.chunk_bits.astype(np.int64))
    total = int(ends[-1]) if ends.size else 0
    if (total + 7) // 8 != c.stream.size:
        raise SlimlmError(f"a coded stream holds {c.stream.size} bytes where its chunk table says {(total + 7) // 8}; "
                          "the coded weights are corrupt")
    return np.concatenate([[0], ends]).astype(np.int64)  # (C + 1,), the last entry is the stream's bit count


def _decode_numpy(c: Coded, table: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference decoder: every chunk is a lane; all lanes take one symbol per step."""
    n_chunks, k_steps = bounds.size - 1, c.chunk
    b = np.concatenate([c.stream, np.zeros(4 + (k_steps * MAX_LEN) // 8, np.uint8)]).astype(np.uint32)
    words = (b[:-3] << 24) | (b[1:-2] << 16) | (b[2:-1] << 8) | b[3:]  # big-endian 32 bits at each byte
    pos = bounds[:-1].astype(np.int64)
    out = np.empty((k_steps, n_chunks), dtype=np.uint8)
    last = c.n - (n_chunks - 1) * k_steps  # symbols in the last chunk
    last_end = 0
    shift = np.uint32(32 - MAX_LEN)
    for k in range(k_steps):
        w = (words[pos >> 3] << (pos & 7).astype(np.uint32)) >> shift  # next MAX_LEN bits of each lane
        entry = table[w]
        out[k] = entry  # the low byte: the symbol
        pos += entry >> 8
        if k == last - 1:
            last_end = int(pos[-1])
    ends = pos.copy()
    ends[-1] = last_end
    return out.T.reshape(-1)[: c.n], ends


_KERNEL_SRC = r"""
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
PARALLEL_MIN = 1 << 16  # symbols below which one thread decodes (waking threads costs more)


@functools.lru_cache(maxsize=1)
def _kernel():
    """The C coder (decode, encode), compiled once per machine into the user cache (with OpenMP
    where the compiler has it); None where no C compiler is found (the numpy reference then)."""
    if os.environ.get("SLIMLM_ENTROPY_KERNEL", "1") == "0":
        return None
    import torch  # noqa: F401  (loads torch's libgomp first, so the kernel shares torch's OpenMP threads)

    src = _KERNEL_SRC % {"L": MAX_LEN, "MULTI": MULTI, "MAX_CHUNK": MAX_CHUNK}
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


def kernel_available() -> bool:
    return _kernel() is not None


def _corrupt_chunk(bad: int) -> SlimlmError:
    return SlimlmError(f"coded chunk {bad} does not end where the chunk table says; the coded weights are corrupt")


class Decoder:
    """A checked coded sequence, ready to decode many times (block-level decompression decodes
    the same weights at every forward): the tables and chunk starts are built once, and a
    decode is one call into the C kernel, writing into a buffer the caller may supply."""

    def __init__(self, c: Coded):
        if c.n and not 1 <= c.chunk <= MAX_CHUNK:
            raise SlimlmError(f"a coded stream's chunk size {c.chunk} is outside 1..{MAX_CHUNK}; the coded weights are corrupt")
        self.n, self.chunk = c.n, c.chunk
        self.bounds = _chunk_starts(c) if c.n else np.zeros(1, np.int64)  # (C + 1,) int64
        self.table = decode_table(c.lengths) if c.n else None  # (2^MAX_LEN,) uint16, validates the table
        self._coded = c
        self._multi = None
        self._call = None  # the kernel call's fixed leading arguments, built on the first kernel decode

    def decode(self, store: Store = Store.SYMBOLS, raw: np.ndarray | None = None, *, out: np.ndarray | None = None,
               threads: int | None = None, use_kernel: bool = True, simd: bool = True) -> np.ndarray:
        """The n decoded elements (`store` says which) in `out` or a new array; raises
        SlimlmError when a chunk does not end where the chunk table says. `threads`
        (default: torch's intra-op thread count) split the chunks of the C kernel; `simd`
        False keeps it on its scalar lookups where it would use AVX-512 gathers."""
        dtype = STORE_DTYPE[store]
        if store is not Store.SYMBOLS and (raw is None or raw.size != self.n or raw.dtype != np.uint8):
            raise ValueError(f"storing {store.name} needs {self.n} raw uint8 bytes")
        if out is None:
            out = np.empty(self.n, dtype=dtype)
        elif out.dtype != dtype or out.size != self.n or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous {np.dtype(dtype).name} array of {self.n} elements")
        if self.n == 0:
            return out
        k = _kernel() if use_kernel else None
        if k is None:
            sym, ends = _decode_numpy(self._coded, self.table, self.bounds)
            if not np.array_equal(ends, self.bounds[1:]):
                raise _corrupt_chunk(int(np.nonzero(ends != self.bounds[1:])[0][0]))
            out[...] = store.apply(sym, raw)
            return out
        self.decode_into(store, out.ctypes.data, None if raw is None else raw.ctypes.data, threads, simd)
        return out

    def decode_into(self, store: Store, out_ptr: int, raw_ptr: int | None, threads: int | None = None,
                    simd: bool = True) -> None:
        """The C kernel's decode into memory the caller owns and has checked (`out_ptr`: n
        elements of `store`'s dtype; `raw_ptr`: n bytes, or None for SYMBOLS): `decode`
        without its checks and array handling, which cost more than decoding a small layer."""
        if self._call is None:
            k = _kernel()
            if k is None:
                raise RuntimeError("decode_into needs the C kernel")
            self._multi = multi_table(self._coded.lengths) if self._multi is None else self._multi
            stream = self._coded.stream
            self._call = (k.decode, stream.ctypes.data, stream.size, self.bounds.ctypes.data, self.bounds.size - 1,
                          self.chunk, self.n, self._multi.ctypes.data)
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        threads = max(1, threads) if self.n >= PARALLEL_MIN else 1
        fn, *fixed = self._call
        bad = fn(int(store), *fixed, out_ptr, raw_ptr, threads, int(simd))
        if bad >= 0:
            raise _corrupt_chunk(int(bad))


def decode(c: Coded, use_kernel: bool = True, threads: int | None = None, store: Store = Store.SYMBOLS,
           raw: np.ndarray | None = None, simd: bool = True) -> np.ndarray:
    """The n symbols (uint8) of `c`, or with `store` the words it describes; raises
    SlimlmError when the stream is inconsistent (see `Decoder.decode`)."""
    return Decoder(c).decode(store, raw, threads=threads, use_kernel=use_kernel, simd=simd)
