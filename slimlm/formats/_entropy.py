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
one lookup emits ~4 symbols), decodes 32 chunks interleaved per thread so their lookups
overlap (AVX-512 gathers where the CPU has them), fuses the output store (e.g. the exponent
placed into a bfloat16 word, `Store`), and splits the chunks over OpenMP threads; its source
and build are in `_entropy_kernel.py`. Decoding checks that every chunk ends exactly where
the next begins and the last one at the stream's end, and that no lookup met a window that
starts no code, so a damaged stream raises instead of returning symbols.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.formats import _entropy_kernel

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


PARALLEL_MIN = 1 << 16  # symbols below which one thread decodes (waking threads costs more)


def _kernel():
    """The C coder (decode, encode) for this module's constants, or None (see `_entropy_kernel`)."""
    return _entropy_kernel.load(MAX_LEN, MULTI, MAX_CHUNK)


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
