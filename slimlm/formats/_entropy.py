"""Canonical, length-limited Huffman coding of byte symbols, chunked for parallel decoding.

Layout of one coded sequence of n symbols (each in 0..255):

    lengths     uint8[A]       code length of symbol s (0 = absent), A = alphabet size;
                               the canonical code follows from the lengths alone
    stream      uint8[B]       the codes, concatenated most significant bit first, zero
                               padded to a whole byte (B = ceil(total_bits / 8))
    chunk_bits  uint16[C]      bits taken by each run of `chunk` consecutive symbols
                               (C = ceil(n / chunk), the last run possibly shorter)

The chunk lengths give every chunk's start bit (a prefix sum), so chunks decode
independently: the reference decoder advances all chunks one symbol per step (a
vectorised table lookup over C lanes); the C kernel gives each thread whole chunks.
Codes are at most `MAX_LEN` = 12 bits, so one lookup in a 4096-entry table decodes a
symbol. Decoding checks that every chunk ends exactly where the next begins and the
last one at the stream's end, so a damaged stream raises instead of returning symbols.
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
    return np.concatenate([[0], ends])  # (C + 1,), the last entry is the stream's bit count


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
#define L %(L)d
#define LANES 8

/* Next L bits at bit `pos` of the stream (read as big-endian 64 bits). */
static inline uint32_t peek(const uint8_t *stream, uint64_t pos) {
    uint64_t w;
    memcpy(&w, stream + (pos >> 3), 8);
    return (uint32_t)((__builtin_bswap64(w) << (pos & 7)) >> (64 - L));
}

/* Store decoded symbol `sym` at index i: as a byte (mode 0), or placed into a 16-bit
   (mode 1) or 32-bit (mode 2) word as (sym << shift) | lut[raw[i]]. */
static inline __attribute__((always_inline)) void emit(int mode, void *out, int64_t i, uint32_t sym,
                                                       const uint8_t *raw, const uint32_t *lut, int shift) {
    if (mode == 0) ((uint8_t *)out)[i] = (uint8_t)sym;
    else if (mode == 1) ((uint16_t *)out)[i] = (uint16_t)((sym << shift) | lut[raw[i]]);
    else ((uint32_t *)out)[i] = (sym << shift) | lut[raw[i]];
}

/* Decode chunks [c0, c1) of a canonical Huffman stream (layout in _entropy.py); ends[c]
   gets the bit where chunk c stopped, or -1 where it would read past the stream. Full
   chunks go LANES at a time, interleaved, so their table lookups overlap in the CPU. */
static inline __attribute__((always_inline)) void decode_chunks(
        int mode, const uint8_t *stream, int64_t nbytes, const int64_t *starts, int64_t c0, int64_t c1,
        int64_t n_chunks, int64_t chunk, int64_t n, const uint16_t *table, void *out, int64_t *ends,
        const uint8_t *raw, const uint32_t *lut, int shift) {
    uint64_t limit = (uint64_t)(nbytes - 8) * 8;  /* last bit position an 8-byte read may start at */
    int64_t full_end = (c1 == n_chunks && n %% chunk) ? c1 - 1 : c1;
    int64_t c = c0;
    for (; c + LANES <= full_end; c += LANES) {
        uint64_t pos[LANES];
        int ok = 1;
        for (int j = 0; j < LANES; j++) {
            pos[j] = (uint64_t)starts[c + j];
            ok &= pos[j] + (uint64_t)chunk * L <= limit;
        }
        if (!ok) break;  /* near the stream's end: the checked loop below */
        for (int64_t k = 0; k < chunk; k++) {
            for (int j = 0; j < LANES; j++) {
                uint16_t e = table[peek(stream, pos[j])];
                emit(mode, out, (c + j) * chunk + k, e & 0xFF, raw, lut, shift);
                pos[j] += e >> 8;
            }
        }
        for (int j = 0; j < LANES; j++) ends[c + j] = (int64_t)pos[j];
    }
    for (; c < c1; c++) {
        uint64_t pos = (uint64_t)starts[c];
        int64_t count = (c == n_chunks - 1) ? n - c * chunk : chunk;
        int64_t k = 0;
        for (; k < count && pos <= limit; k++) {
            uint16_t e = table[peek(stream, pos)];
            emit(mode, out, c * chunk + k, e & 0xFF, raw, lut, shift);
            pos += e >> 8;
        }
        ends[c] = (k == count) ? (int64_t)pos : -1;
    }
}

void slimlm_huffman_decode(int mode, const uint8_t *stream, int64_t nbytes, const int64_t *starts, int64_t c0,
                           int64_t c1, int64_t n_chunks, int64_t chunk, int64_t n, const uint16_t *table,
                           void *out, int64_t *ends, const uint8_t *raw, const uint32_t *lut, int shift) {
    /* one specialised copy of the loop per output mode */
    if (mode == 0) decode_chunks(0, stream, nbytes, starts, c0, c1, n_chunks, chunk, n, table, out, ends, raw, lut, shift);
    else if (mode == 1) decode_chunks(1, stream, nbytes, starts, c0, c1, n_chunks, chunk, n, table, out, ends, raw, lut, shift);
    else decode_chunks(2, stream, nbytes, starts, c0, c1, n_chunks, chunk, n, table, out, ends, raw, lut, shift);
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
PARALLEL_MIN = 1 << 18  # symbols below which one thread decodes (starting threads costs more)


@functools.lru_cache(maxsize=1)
def _kernel():
    """The C coder (decode, encode), compiled once per machine into the user cache; None where no C
    compiler is found (the numpy reference decoder is used then)."""
    if os.environ.get("SLIMLM_ENTROPY_KERNEL", "1") == "0":
        return None
    src = _KERNEL_SRC % {"L": MAX_LEN}
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
                subprocess.run([cc, "-O3", "-shared", "-fPIC", str(c_file), "-o", str(so)],
                               check=True, capture_output=True, timeout=120)
                os.replace(so, lib)
        so = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError):
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    so.slimlm_huffman_decode.argtypes = [ctypes.c_int, p, i64, p, i64, i64, i64, i64, i64, p, p, p, p, p, ctypes.c_int]
    so.slimlm_huffman_encode.argtypes = [p, i64, p, p, p]
    so.slimlm_huffman_decode.restype = so.slimlm_huffman_encode.restype = None
    return SimpleNamespace(decode=so.slimlm_huffman_decode, encode=so.slimlm_huffman_encode)


@functools.lru_cache(maxsize=1)
def _pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="slimlm-entropy")


def kernel_available() -> bool:
    return _kernel() is not None


@dataclass(frozen=True)
class Place:
    """Decode into words instead of bytes: out[i] = (symbol[i] << shift) | lut[raw[i]], e.g. an
    exponent put between the sign and mantissa bits that `lut` spreads from one raw byte."""

    raw: np.ndarray  # uint8 (n,)
    lut: np.ndarray  # uint32 (256,)
    shift: int
    dtype: type  # np.uint16 or np.uint32

    def apply(self, symbols: np.ndarray) -> np.ndarray:  # the reference of the kernel's fused store
        out = symbols.astype(self.dtype)
        out <<= self.shift
        out |= self.lut.astype(self.dtype)[self.raw]
        return out


def _decode_kernel(fn, c: Coded, table: np.ndarray, bounds: np.ndarray, threads: int,
                   place: Place | None) -> tuple[np.ndarray, np.ndarray]:
    stream = np.concatenate([c.stream, np.zeros(8, np.uint8)])  # every 8-byte read stays inside
    starts = np.ascontiguousarray(bounds[:-1], dtype=np.int64)
    ends = np.empty(starts.size, dtype=np.int64)
    n_chunks = starts.size
    if place is None:
        mode, out, raw, lut = 0, np.empty(c.n, dtype=np.uint8), None, None
    else:
        mode = 1 if place.dtype == np.uint16 else 2
        out = np.empty(c.n, dtype=place.dtype)
        raw = np.ascontiguousarray(place.raw, dtype=np.uint8)
        lut = np.ascontiguousarray(place.lut, dtype=np.uint32)
        if raw.size != c.n:
            raise ValueError(f"{raw.size} raw bytes for {c.n} symbols")

    def run(c0, c1):  # ctypes releases the GIL, so threads decode their chunks in parallel
        fn(mode, stream.ctypes.data, stream.size, starts.ctypes.data, c0, c1, n_chunks, c.chunk, c.n,
           table.ctypes.data, out.ctypes.data, ends.ctypes.data, None if raw is None else raw.ctypes.data,
           None if lut is None else lut.ctypes.data, 0 if place is None else place.shift)

    threads = min(threads, n_chunks) if c.n >= PARALLEL_MIN else 1
    cuts = np.linspace(0, n_chunks, threads + 1).astype(np.int64)
    if threads == 1:
        run(0, n_chunks)
    else:
        list(_pool().map(run, cuts[:-1], cuts[1:]))
    return out, ends


def decode(c: Coded, use_kernel: bool = True, threads: int | None = None, place: Place | None = None) -> np.ndarray:
    """The n symbols (uint8) of `c`, or with `place` the words it describes (fused into the
    kernel's store); raises SlimlmError when the stream is inconsistent. `threads`
    (default: torch's intra-op thread count) split the chunks of the C kernel."""
    if c.n == 0:
        return np.zeros(0, dtype=np.uint8 if place is None else place.dtype)
    table = decode_table(c.lengths)
    bounds = _chunk_starts(c)
    k = _kernel() if use_kernel else None
    if k is None:
        out, ends = _decode_numpy(c, table, bounds)
        out = out if place is None else place.apply(out)
    else:
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        out, ends = _decode_kernel(k.decode, c, table, bounds, max(1, threads), place)
    if not np.array_equal(ends, bounds[1:]):
        bad = int(np.nonzero(ends != bounds[1:])[0][0])
        raise SlimlmError(f"coded chunk {bad} does not end where the chunk table says; the coded weights are corrupt")
    return out
