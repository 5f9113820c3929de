import numpy as np
import pytest
import torch

from slimlm.compress import compress_model
from slimlm.errors import SlimlmError
from slimlm.formats import CompressedLinear, Dense, _entropy
from slimlm.formats.lossless import LosslessFloat, LosslessInt
from slimlm.formats.store import load_compressed, save_compressed
from slimlm.methods import LayerStats, get_method, make_config
from slimlm.methods.affine import quantize_rtn

DECODERS = [False] + ([True] if _entropy.kernel_available() else [])
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype])


# ---- the Huffman coder -------------------------------------------------------------------------


def _kraft(lengths) -> float:
    used = np.asarray(lengths, dtype=np.int64)
    used = used[used > 0]
    return float((2.0 ** -used).sum())


@pytest.mark.parametrize("counts", [
    [5],  # one symbol still takes one bit
    [0, 0, 7, 0],
    [1, 1],
    [int(1.618 ** k) + 1 for k in range(40)],  # Fibonacci-like: unlimited Huffman would need ~39-bit codes
    [1] * 256,
    [10 ** 9] + [1] * 255,
])
def test_code_lengths_respect_limit_and_kraft(counts):
    lengths = _entropy.code_lengths(np.array(counts))
    present = np.array(counts) > 0
    assert (lengths[present] >= 1).all() and (lengths[~present] == 0).all()
    assert lengths.max() <= _entropy.MAX_LEN
    assert _kraft(lengths) <= 1.0
    table = _entropy.decode_table(lengths)  # accepted as a prefix code
    assert table.size == 1 << _entropy.MAX_LEN


@pytest.mark.parametrize("use_kernel", DECODERS)
@pytest.mark.parametrize("n,chunk", [(1, 256), (255, 256), (256, 256), (257, 256), (5000, 16), (100_003, 256),
                                     (300_000, 1000)])
@pytest.mark.parametrize("alphabet", [2, 23, 256])
def test_coder_round_trip(n, chunk, alphabet, use_kernel):
    rng = np.random.default_rng(n + alphabet)
    p = rng.dirichlet(np.full(alphabet, 0.3))  # skewed, some symbols nearly never drawn
    sym = rng.choice(alphabet, size=n, p=p).astype(np.uint8)
    c = _entropy.encode(sym, chunk=chunk, alphabet=alphabet, use_kernel=use_kernel)
    assert np.array_equal(_entropy.decode(c, use_kernel=use_kernel), sym)
    # Huffman is within one bit per symbol of the empirical entropy
    freq = np.bincount(sym, minlength=alphabet) / n
    h = -(freq[freq > 0] * np.log2(freq[freq > 0])).sum()
    assert c.stream.size * 8 <= n * (h + 1) + 8
    assert c.nbits() == 8 * (c.lengths.size + c.stream.size) + 16 * c.chunk_bits.size


@pytest.mark.parametrize("n,chunk", [(400_000, 64), (400_007, 100)])  # whole vectors only; tails in every chunk
def test_kernel_and_reference_coders_agree(n, chunk):
    if not _entropy.kernel_available():
        pytest.skip("no C compiler: only the reference decoder exists here")
    rng = np.random.default_rng(1)
    sym = np.minimum(rng.geometric(0.3, size=n), 255).astype(np.uint8)
    c = _entropy.encode(sym, chunk=chunk)
    ref = _entropy.encode(sym, chunk=chunk, use_kernel=False)
    assert np.array_equal(c.stream, ref.stream) and np.array_equal(c.chunk_bits, ref.chunk_bits)
    for threads in (1, 2):
        assert np.array_equal(_entropy.decode(c, True, threads), _entropy.decode(c, False))
    # the fused stores: the exponent placed between the sign and mantissa of a raw byte
    raw = rng.integers(0, 256, size=sym.size).astype(np.uint8)
    for store in (_entropy.Store.BF16, _entropy.Store.BF16_AS_F32):
        fused = _entropy.decode(c, True, 2, store, raw)
        assert fused.dtype == _entropy.STORE_DTYPE[store]
        assert np.array_equal(fused, _entropy.decode(c, True, 2, store, raw, simd=False))  # AVX-512 and scalar stores
        assert np.array_equal(fused, _entropy.decode(c, False, store=store, raw=raw))
        bf16 = fused if store is _entropy.Store.BF16 else (fused >> 16).astype(np.uint16)
        assert np.array_equal(bf16 & 0x7F, raw & 0x7F) and np.array_equal(bf16 >> 15, raw >> 7)
        assert np.array_equal((bf16 >> 7) & 0xFF, sym)
        assert store is _entropy.Store.BF16 or not (fused & 0xFFFF).any()


@pytest.mark.parametrize("counts", [[5], [3, 1], [int(1.618 ** k) + 1 for k in range(40)], [1] * 256, [50, 30, 10, 5, 3, 1, 1]])
def test_multi_symbol_table_matches_single_lookups(counts):
    lengths = _entropy.code_lengths(np.array(counts))
    single = _entropy.decode_table(lengths).astype(np.int64)
    multi = _entropy.multi_table(lengths)
    for w in range(1 << _entropy.MAX_LEN):  # decode each window one code at a time and compare
        used, syms = 0, []
        while len(syms) < _entropy.MULTI:
            e = single[(w << used) & ((1 << _entropy.MAX_LEN) - 1)]
            if e >> 8 == 0 or used + (e >> 8) > _entropy.MAX_LEN:
                break
            syms.append(e & 0xFF)
            used += e >> 8
        m = int(multi[w])
        assert (m >> 48) & 15 == len(syms) and (m >> 52) & 15 == used and (m >> 56) & 15 == single[w] >> 8
        assert [(m >> (8 * j)) & 0xFF for j in range(len(syms))] == syms


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_decodes_in_place_and_across_chunk_sizes(threads):
    if not _entropy.kernel_available():
        pytest.skip("no C compiler: only the reference decoder exists here")
    rng = np.random.default_rng(threads)
    sym = np.minimum(rng.geometric(0.5, size=(1 << 16) + 77), 200).astype(np.uint8)  # ~2-bit codes, many per lookup
    for chunk in (1, 5, 6, 7, 64, 256, _entropy.MAX_CHUNK):
        dec = _entropy.Decoder(_entropy.encode(sym, chunk=chunk))
        for simd in (True, False):  # AVX-512 gathers where the CPU has them, and the scalar lookups
            out = np.full(sym.size, 0xAB, dtype=np.uint8)
            assert dec.decode(out=out, threads=threads, simd=simd) is out and np.array_equal(out, sym)
            assert np.array_equal(dec.decode(threads=threads, simd=simd), sym)  # again, with the kept tables


# ---- corrupted streams -------------------------------------------------------------------------


def _coded(n=10_000, chunk=128):
    rng = np.random.default_rng(0)
    return _entropy.encode(np.minimum(rng.geometric(0.4, size=n), 40).astype(np.uint8), chunk=chunk)


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("use_kernel", DECODERS)
@pytest.mark.parametrize("damage", ["flip_chunk_bits", "truncate", "bad_table", "long_code", "chunk_count", "flip_stream",
                                    "flip_last_chunk"])
def test_damaged_stream_raises(damage, use_kernel, simd):
    c = _coded()
    if damage == "flip_chunk_bits":  # one chunk said to be a bit longer, the next a bit shorter
        cb = c.chunk_bits.copy()
        cb[3] += 1
        cb[4] -= 1
        c = _entropy.Coded(c.n, c.chunk, c.lengths, c.stream, cb)
    elif damage == "truncate":
        c = _entropy.Coded(c.n, c.chunk, c.lengths, c.stream[:-1], c.chunk_bits)
    elif damage == "bad_table":  # every code one bit shorter breaks Kraft's inequality
        lengths = np.where(c.lengths > 1, c.lengths - 1, c.lengths).astype(np.uint8)
        c = _entropy.Coded(c.n, c.chunk, lengths, c.stream, c.chunk_bits)
    elif damage == "long_code":
        lengths = c.lengths.copy()
        lengths[0] = _entropy.MAX_LEN + 1
        c = _entropy.Coded(c.n, c.chunk, lengths, c.stream, c.chunk_bits)
    elif damage == "chunk_count":
        c = _entropy.Coded(c.n, c.chunk, c.lengths, c.stream, c.chunk_bits[:-1])
    else:  # a flipped stream bit shifts code boundaries; some chunk then ends elsewhere (in the
        # middle: a chunk of the interleaved lookups; near the end: one decoded with checked reads)
        stream = c.stream.copy()
        stream[len(stream) // 2 if damage == "flip_stream" else -3] ^= 0x10
        c = _entropy.Coded(c.n, c.chunk, c.lengths, stream, c.chunk_bits)
    with pytest.raises(SlimlmError, match="corrupt"):
        _entropy.decode(c, use_kernel=use_kernel, simd=simd)


@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("use_kernel", DECODERS)
def test_window_starting_no_code_raises(use_kernel, simd):
    # one symbol: its code is "0" and a 1 bit starts no code (Kraft sum 1/2); the chunk table
    # still adds up, so only the decoder's lookups can tell
    c = _entropy.encode(np.zeros(4096, np.uint8), chunk=64)
    stream = c.stream.copy()
    stream[100] = 0xFF
    with pytest.raises(SlimlmError, match="corrupt"):
        _entropy.decode(_entropy.Coded(c.n, c.chunk, c.lengths, stream, c.chunk_bits), use_kernel=use_kernel, simd=simd)


@pytest.mark.parametrize("field", ["stream", "raw", "lengths", "chunk_bits"])
def test_damaged_float_file_raises(field):
    p = LosslessFloat.encode(torch.randn(32, 48).to(torch.bfloat16))
    meta, tensors = p.to_state()
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors[field].view(-1)[-1] += 1  # the last element of the field changes by one
    with pytest.raises(SlimlmError, match="corrupt"):
        LosslessFloat.from_state(meta, tensors)
    with pytest.raises(SlimlmError, match="corrupt"):
        LosslessFloat.from_state(meta, {k: v for k, v in p.to_state()[1].items() if k != "raw"})


def test_damaged_int_file_raises():
    p = LosslessInt.encode(quantize_rtn(torch.randn(16, 64), 3, 32))
    meta, tensors = p.to_state()
    scales = tensors["scales"].clone()
    scales[0, 0] = 7.0
    with pytest.raises(SlimlmError, match="corrupt"):
        LosslessInt.from_state(meta, dict(tensors, scales=scales))


# ---- the float format: bit-exact round trips -----------------------------------------------------


def _adversarial(kind: str, dtype: torch.dtype, shape=(24, 40)) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    n = shape[0] * shape[1]
    if kind == "normal":
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)
    if kind == "all_equal":
        return torch.full(shape, 0.0123).to(dtype)
    if kind == "signed_zeros":
        return (torch.randint(0, 2, shape, generator=g) * 2 - 1).float().mul(0.0).to(dtype)
    ints = torch.randint(-(1 << 31), (1 << 31) - 1, (n,), generator=g, dtype=torch.int64)
    width = 32 if dtype == torch.float32 else 16
    ints = ints & ((1 << width) - 1)
    m = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    e = {torch.bfloat16: 8, torch.float16: 5, torch.float32: 8}[dtype]
    if kind == "subnormal":
        ints = ints & ~(((1 << e) - 1) << m)  # exponent 0: zeros and subnormals
    elif kind == "nan_inf":
        ints = ints | (((1 << e) - 1) << m)  # exponent all ones: ±Inf and NaNs with any payload
    ints = torch.where(ints >= 1 << (width - 1), ints - (1 << width), ints)  # to the signed view
    return ints.to(INT_VIEW[dtype]).view(dtype).view(shape)  # kind "random_bits": every pattern


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["normal", "all_equal", "signed_zeros", "subnormal", "nan_inf", "random_bits"])
@pytest.mark.parametrize("chunk", [16, 256])
@pytest.mark.parametrize("use_kernel", DECODERS)
def test_float_round_trip_is_bit_exact(dtype, kind, chunk, use_kernel, monkeypatch):
    if not use_kernel:
        monkeypatch.setattr(_entropy, "_kernel", lambda: None)
    w = _adversarial(kind, dtype)
    p = LosslessFloat.encode(w, chunk=chunk)
    assert torch.equal(_bits(p.decode_native()), _bits(w))
    meta, tensors = p.to_state()
    q = LosslessFloat.from_state(meta, tensors)
    assert torch.equal(_bits(q.decode_native()), _bits(w))
    assert torch.equal(_bits(q.dequantize()), _bits(w.float()))  # widened exactly, NaN payloads too
    # nbits counts every stored tensor plus the 32-bit checksum
    assert p.nbits() == sum(t.numel() * t.element_size() * 8 for t in tensors.values()) + 32


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 11.2), (torch.float16, 14.5), (torch.float32, 27.2)])
def test_float_size_on_gaussian_weights(dtype, bound):
    # Gaussian weights: the exponent carries ~2.6-3 bits, the rest is raw
    w = (torch.randn(256, 512, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    p = LosslessFloat.encode(w)
    assert p.nbits() / w.numel() < bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float_dequantize_as_and_bf16_forward(dtype):
    w = _adversarial("random_bits", dtype, shape=(40, 300))
    p = LosslessFloat.encode(w)
    for as_dtype in (torch.bfloat16, torch.float16, torch.float32):
        got = p.dequantize_as(as_dtype)
        # the format's own dtype: its exact bits, NaN payloads too (a cast of the float32
        # weights would make NaNs canonical); another dtype: the cast of the float32 weights
        want = w if as_dtype == dtype else p.dequantize().to(as_dtype)
        assert got.dtype == as_dtype and torch.equal(_bits(got), _bits(want))
    lin = CompressedLinear(LosslessFloat.encode(_adversarial("normal", dtype, shape=(40, 300))))
    x = torch.randn(3, 300).to(dtype)
    ref = torch.nn.functional.linear(x, lin.packed.dequantize().to(dtype))
    assert torch.equal(lin(x), ref)  # a forward in the format's dtype decodes straight to it


def test_float_format_is_decoded_at_each_use():
    p = LosslessFloat.encode(torch.randn(8, 16).to(torch.bfloat16))
    lin = CompressedLinear(p)
    x = torch.randn(3, 16)
    assert torch.equal(lin(x), lin(x)) and lin._weight is None  # nothing cached between forwards


# ---- the integer format -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,sym", [(32, False), (0, False), (64, True), (40, False)])
def test_int_codes_round_trip(bits, group, sym):
    w = torch.randn(20, 160, generator=torch.Generator().manual_seed(bits))
    q = quantize_rtn(w, bits, group, sym)
    p = LosslessInt.encode(q, chunk=64)
    assert torch.equal(p.int_codes(), q.int_codes())
    assert torch.equal(p.dequantize(), q.dequantize())
    meta, tensors = p.to_state()
    assert torch.equal(LosslessInt.from_state(meta, tensors).dequantize(), q.dequantize())
    assert p.nbits() == sum(t.numel() * t.element_size() * 8 for t in tensors.values()) + 32


def test_int_codes_of_a_peaked_distribution_shrink():
    # Cauchy weights, symmetric, one group per row: the extremes set the range, most codes land
    # in the few levels around zero, so the codes carry far less than 4 bits
    torch.manual_seed(0)
    w = torch.distributions.Cauchy(0.0, 1.0).sample((64, 512))
    q = quantize_rtn(w, 4, 0, True)
    p = LosslessInt.encode(q)
    assert p.nbits() < 0.6 * q.nbits()


# ---- the method, through the engine -------------------------------------------------------------


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(ids).logits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_lossless_model_logits_are_bit_exact(tiny, dtype, tmp_path):
    # parameters only: LoadedModel.cast also casts the rotary inv_freq buffers, which a
    # reloaded model keeps in float32, so its logits would differ for reasons not ours
    for prm in tiny.model.parameters():
        prm.data = prm.data.to(getattr(torch, dtype))
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(tiny, ids)
    compress_model(tiny, "lossless", progress=False)
    layers = [m for m in tiny.model.modules() if isinstance(m, CompressedLinear)]
    assert layers and all(isinstance(m.packed, LosslessFloat) and m.packed.dtype == dtype for m in layers)
    assert torch.equal(_logits(tiny, ids), ref)
    save_compressed(tiny, tmp_path / "m")
    assert torch.equal(_logits(load_compressed(tmp_path / "m"), ids), ref)


def test_lossless_after_rtn_keeps_rtn_weights(tiny, tmp_path):
    from slimlm.models.tiny import tiny_model

    ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(1))
    plain = compress_model(tiny_model("llama", seed=0), "rtn:bits=3,group=32", progress=False)
    coded = compress_model(tiny, "rtn:bits=3,group=32+lossless", progress=False)
    for name, mod in coded.model.named_modules():
        if isinstance(mod, CompressedLinear):
            assert isinstance(mod.packed, LosslessInt) and mod.method == "rtn+lossless"
            assert torch.equal(mod.packed.dequantize(), plain.model.get_submodule(name).packed.dequantize())
    # (logits are compared coded-to-coded: a fast kernel may serve the plain int format)
    ref = _logits(coded, ids)
    save_compressed(coded, tmp_path / "m")
    assert torch.equal(_logits(load_compressed(tmp_path / "m"), ids), ref)


def test_lossless_refuses_other_formats_and_bad_options():
    spec = get_method("lossless")
    stats = LayerStats(name="layer", prev=Dense(torch.zeros(4, 4)))
    with pytest.raises(SlimlmError, match="integer codes"):
        spec.fn(torch.zeros(4, 4), stats, make_config(spec, {}))
    with pytest.raises(SlimlmError, match="chunk"):
        make_config(spec, {"chunk": "8"})
    with pytest.raises(SlimlmError, match="representable"):
        spec.fn(torch.full((2, 2), 1.0001), LayerStats(name="layer", dtype=torch.bfloat16), make_config(spec, {}))


@pytest.mark.slow
def test_embedded_model_lossless_is_bit_exact(real):
    """FP32 and a BF16 copy of the embedded model: identical logits, BF16 block linears <= 70 % of BF16."""
    import copy

    from slimlm.models.loaded import LoadedModel

    ids = real.tokenizer("Lossless coding keeps every bit of every weight.", return_tensors="pt").input_ids
    for dtype in ("bfloat16", "float32"):
        lm = LoadedModel(model=copy.deepcopy(real.model), tokenizer=real.tokenizer, source="smollm2-135m",
                         kind="builtin").cast(dtype)
        ref = _logits(lm, ids)
        compress_model(lm, "lossless", progress=False)
        assert torch.equal(_logits(lm, ids), ref)
        layers = [m.packed for m in lm.model.modules() if isinstance(m, CompressedLinear)]
        ratio = sum(p.nbits() for p in layers) / sum(16 * p.shape[0] * p.shape[1] for p in layers)
        if dtype == "bfloat16":
            assert ratio <= 0.70
        del lm
