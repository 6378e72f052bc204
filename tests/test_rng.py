"""Counter-based random streams (bihm/rng.py): the Threefry-2x32 hash against Random123's
known answers, the statistics of its uniforms, and the independence of a row's numbers from
the batch, the chunking of K, the device and the compiled kernel."""

from __future__ import annotations

import math

import pytest
import torch

from bihm import rng
from bihm.rng import Streams, threefry2x32

# Random123's kat_vectors for threefry2x32_20: (counter, key) -> output words.
KAT = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_threefry_gives_random123s_known_answers(counter, key, expected):
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    x0, x1 = threefry2x32(t(key[0]), t(key[1]), t(counter[0]), t(counter[1]))
    assert (int(x0), int(x1)) == expected


def _chi2_bound(df: int) -> float:
    """The chi-square statistic's mean plus 6 of its standard deviations: a correct
    generator exceeds it with probability below 1e-6 (Wilson-Hilferty), a test run by
    run, not a tolerance fitted to one draw."""
    return df + 6 * math.sqrt(2 * df)


def test_uniforms_are_uniform_and_use_every_bit():
    streams = Streams.keyed("cpu", 0, 1, keys=range(64))
    u = streams.rand((64, 128, 128), "cpu", torch.float32).flatten().double()  # 2^20 draws
    assert float(u.min()) >= 0 and float(u.max()) < 1
    counts = torch.bincount((u * 256).long(), minlength=256).double()
    expected = u.numel() / 256
    assert float(((counts - expected) ** 2 / expected).sum()) < _chi2_bound(255)
    # The 24 bits of a float32 draw: each is 1 half of the time (binomial, 6 sigma).
    words = (u * 2**24).long()
    assert torch.equal(words.double(), u * 2**24)  # exactly 24-bit fractions
    ones = torch.stack([(words >> b) & 1 for b in range(24)]).double().mean(1)
    assert float((ones - 0.5).abs().max()) < 6 * 0.5 / math.sqrt(u.numel())


@pytest.mark.parametrize("axis", ["unit", "sample", "row", "draw"])
def test_neighbouring_counters_are_independent(axis):
    """Pairs of uniforms whose coordinates differ by one (the next unit, the next sample
    k, the next row index, the next draw): an 8 x 8 contingency table of the pairs is
    uniform (chi-square) and they are uncorrelated (6 standard errors)."""
    streams = Streams.keyed("cpu", 3, 2, 10, keys=range(256))
    a = streams.rand((256, 64, 64), "cpu", torch.float32)
    if axis == "unit":
        u, v = a[..., :-1:2], a[..., 1::2]  # the two words of one counter, too
    elif axis == "sample":
        u, v = a[:, :-1], a[:, 1:]
    elif axis == "row":
        u, v = a[:-1], a[1:]
    else:
        u, v = a, streams.rand((256, 64, 64), "cpu", torch.float32)
    u, v = u.flatten().double(), v.flatten().double()
    n = u.numel()
    cells = (u * 8).long() * 8 + (v * 8).long()
    counts = torch.bincount(cells, minlength=64).double()
    assert float(((counts - n / 64) ** 2 / (n / 64)).sum()) < _chi2_bound(63)
    corr = float(torch.corrcoef(torch.stack([u, v]))[0, 1])
    assert abs(corr) < 6 / math.sqrt(n)


def test_a_rows_numbers_do_not_depend_on_the_batch_or_the_chunking_of_k():
    idx = torch.tensor([5, 17, 2, 40, 41])
    whole = Streams.keyed("cpu", 9, 2, 100, keys=idx)
    first, second = (
        whole.rand((5, 100, 30), "cpu", torch.float32),
        whole.rand((5, 100, 7), "cpu", torch.float32),
    )
    # Row by row, in another order, and K in chunks of 30 (at(k0) views of one draw).
    for i in [3, 0, 4]:
        alone = Streams.keyed("cpu", 9, 2, 100, keys=idx[i : i + 1])
        chunks = [
            alone.at(k0).rand((1, min(30, 100 - k0), 30), "cpu", torch.float32)
            for k0 in (0, 30, 60, 90)
        ]
        assert torch.equal(torch.cat(chunks, 1)[0], first[i])
        alone.advance(1)
        assert torch.equal(alone.rand((1, 100, 7), "cpu", torch.float32)[0], second[i])
    # Slices of rows continue from the same draw.
    again = Streams.keyed("cpu", 9, 2, 100, keys=idx)
    assert torch.equal(again[1:4].rand((3, 100, 30), "cpu", torch.float32), first[1:4])
    # Another purpose, K or seed: other numbers.
    for parts in [(9, 3, 100), (9, 2, 99), (8, 2, 100)]:
        other = Streams.keyed("cpu", *parts, keys=idx).rand((5, 100, 30), "cpu", torch.float32)
        assert float((other == first).double().mean()) < 1e-3


def test_float64_draws_carry_53_bits_and_lower_precisions_their_significand():
    streams = Streams.keyed("cpu", 1, keys=range(4096))
    u = streams.rand((4096, 16), "cpu", torch.float64)
    scaled = u * 2.0**53
    assert torch.equal(scaled, scaled.floor())
    assert float(((scaled.long() & 0xFFFF) != 0).double().mean()) > 0.99  # the low bits vary
    for dtype, bits in [(torch.bfloat16, 8), (torch.float16, 11)]:
        v = streams.rand((4096, 16), "cpu", dtype)
        assert v.dtype == dtype and float(v.max()) < 1
        assert torch.equal((v.double() * 2**bits).floor(), v.double() * 2**bits)


def test_a_draw_of_the_wrong_number_of_rows_is_refused():
    streams = Streams.keyed("cpu", 1, keys=range(3))
    with pytest.raises(ValueError, match="must have 3 rows"):
        streams.rand((4, 2), "cpu", torch.float32)


@pytest.mark.compiled  # minutes of compilation on a 2-core CPU: make test-compiled
@pytest.mark.timeout(1800)
def test_the_compiled_kernel_draws_the_same_bits_as_the_eager_one():
    """torch.compile of the draw (one fused kernel) against the eager tensor operations:
    integer arithmetic, so the same bits, for float32 and float64, any shape, no recompile
    for another draw number, chunk offset or width."""
    shapes = [(7, 10, 301), (7, 3), (7, 4, 5, 2), (7, 1, 1)]
    draws = {}
    for compiled in (False, True):
        rng.set_counter_based(True, compiled=compiled)
        try:
            streams = Streams.keyed("cpu", 2, 2, 10, keys=range(100, 107))
            out = [streams.rand(s, "cpu", torch.float32) for s in shapes]
            out.append(streams.at(5).rand((7, 5, 64), "cpu", torch.float64))
            draws[compiled] = out
        finally:
            rng.set_counter_based(False)
    for eager, fused in zip(draws[False], draws[True], strict=True):
        assert torch.equal(eager, fused)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_the_same_bits_as_the_cpu():
    idx = torch.arange(1000, 1040)
    cpu = Streams.keyed("cpu", 4, 2, 10, keys=idx).rand((40, 10, 300), "cpu", torch.float32)
    gpu = Streams.keyed("cuda", 4, 2, 10, keys=idx.cuda()).rand(
        (40, 10, 300), "cuda", torch.float32
    )
    assert torch.equal(gpu.cpu(), cpu)
