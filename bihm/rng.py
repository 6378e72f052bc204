"""Random streams that make evaluation exact across batch sizes, ranks and devices.

Every estimate of `bihm-math.md` is a Monte Carlo average over h_k ~ q(h | x) (or over
Gibbs proposals). To make the number reported for a data set independent of how the data
was batched and dealt to ranks, the samples of an example must depend only on
(seed, purpose, K, example index). Two kinds of streams do that:

- `RowStreams` (eager, the default): one torch.Generator per row, seeded by a hash of
  integers; the samplers draw row i's noise from generator i, in the same order (layer
  by layer, chunk by chunk over K), while the arithmetic runs on the whole batch.
- `Streams` (compiled, `train.compile`): counter-based. A uniform is a pure function of
  its coordinates, computed for a whole tensor at once, as JAX's PRNG does (Salmon et
  al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011: Threefry-2x32 with 20
  rounds, the Random123 and JAX default):

      u = threefry2x32(key(seed, purpose, K, row, draw), counter(k, unit)) / 2^bits

  with the keys chained, one level per coordinate that is not a tensor axis:

      row key   = threefry(base, (index lo, index hi))     base = blake2b(seed, purpose, K)
      draw key  = threefry(row key, (j, DRAW))             j = the row's j-th draw
      bits      = threefry(draw key, (k0 + k, unit))       k: the sample axis, unit: the rest

  Row i's numbers depend on its own index only (not on the batch, the rank or the device:
  it is integer arithmetic), and sample k's on k, not on how K was chunked. There is no
  torch.Generator in the arithmetic, so torch.compile takes a sampler whole. Eagerly the
  20 rounds cost some 250 tensor operations per draw, so `Streams` are used where their
  draw runs compiled (`set_counter_based`): one fused kernel, compiled once for all
  shapes, that compiled callers call as the operator `bihm::threefry_uniform`.

The two kinds draw different numbers, so an estimate differs between them by Monte Carlo
noise only. `row_streams` and `step_generator` give the kind of the process's mode;
`uniform(shape, generator, ...)` is the one place the model draws uniforms, from either
kind, a plain torch.Generator (one stream for the whole tensor) or None.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
# Threefry-2x32's rotation constants and key-schedule parity (Salmon et al. 2011, Table 4).
ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
PARITY = 0x1BD11BDA
DRAW_TAG = 0xD4A3  # the second counter word of a draw key: keeps it apart from row keys


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (stable across processes, runs and machines)."""
    data = struct.pack(f"<{len(parts)}q", *(int(p) for p in parts))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def make_generator(device: torch.device | str, *parts: int) -> torch.Generator:
    """A torch.Generator on `device` seeded by `mix_seed(*parts)` (for code outside the
    model's samplers, e.g. shuffling)."""
    g = torch.Generator(device=device)
    g.manual_seed(mix_seed(*parts))
    return g


def _rotl(x: Tensor, r: int) -> Tensor:
    return ((x << r) | (x >> (32 - r))) & MASK32


def threefry2x32(
    k0: Tensor | int, k1: Tensor | int, c0: Tensor | int, c1: Tensor | int
) -> tuple[Tensor, Tensor]:
    """Threefry-2x32-20 of the counter (c0, c1) under the key (k0, k1), elementwise with
    broadcasting. Words are 32-bit values held in int64 tensors: a sum of two words and a
    word shifted left by at most 29 bits fit in 63 bits, so no operation ever overflows,
    and the result is the same bits on every device. Returns the two output words."""
    k2 = k0 ^ k1 ^ PARITY
    keys = (k0, k1, k2)
    x0 = (c0 + k0) & MASK32
    x1 = (c1 + k1) & MASK32
    for group in range(5):  # 5 x 4 rounds, a key injection after each 4
        for r in ROTATIONS[4 * (group % 2) : 4 * (group % 2) + 4]:
            x0 = (x0 + x1) & MASK32
            x1 = _rotl(x1, r) ^ x0
        x0 = (x0 + keys[(group + 1) % 3]) & MASK32
        x1 = (x1 + keys[(group + 2) % 3] + group + 1) & MASK32
    return x0, x1


def _words(value: int) -> tuple[int, int]:
    return value & MASK32, (value >> 32) & MASK32


def _draw(keys: Tensor, j: Tensor, k0: Tensor, n_k: int, per_k: int, bits: int) -> Tensor:
    """Draw j of the rows with `keys`: (rows, n_k, per_k) uniforms in [0, 1) at the
    counters (k0 + k, unit), with `bits` random bits each (float32 for bits <= 24, else
    float64 from both output words). A pure function of tensors, for torch.compile."""
    key0, key1 = threefry2x32(keys[:, 0], keys[:, 1], j, DRAW_TAG)
    k = torch.arange(n_k, device=keys.device, dtype=torch.int64) + k0
    pair = bits <= 24  # the two words of a counter serve two neighbouring units
    units = (per_k + 1) // 2 if pair else per_k
    unit = torch.arange(units, device=keys.device, dtype=torch.int64)
    x0, x1 = threefry2x32(
        key0[:, None, None], key1[:, None, None], k[None, :, None], unit[None, None, :]
    )
    if not pair:
        hi, lo = (x0 >> 5).to(torch.float64), (x1 >> 6).to(torch.float64)
        return (hi * 2.0**26 + lo) * 2.0**-53
    words = torch.stack([x0, x1], dim=-1).flatten(-2)[..., :per_k]
    return (words >> (32 - bits)).to(torch.float32) * 2.0**-bits


_compiled_draw = None
_counter_based = False
_compiled_kernel = False


def set_counter_based(enabled: bool, compiled: bool = True) -> None:
    """The process's streams, like torch.set_num_threads: with `enabled`, `row_streams`
    and `step_generator` give counter-based `Streams`, drawn through the compiled kernel
    if `compiled` (the same bits either way, only the speed differs); else (the default)
    `RowStreams` and torch.Generators. The pipeline sets it from `train.compile`
    (bihm/compiled.py)."""
    global _counter_based, _compiled_kernel
    _counter_based, _compiled_kernel = bool(enabled), bool(enabled and compiled)


def _draw_kernel():
    """`_draw` compiled (built once per process, on first use, for all shapes): eager, the
    20 rounds are some 250 tensor operations per draw; compiled, one fused kernel that
    costs about what torch.rand does."""
    global _compiled_draw
    if _compiled_draw is None:
        _compiled_draw = torch.compile(_draw, dynamic=True, fullgraph=True)
    return _compiled_draw


@torch.library.custom_op("bihm::threefry_uniform", mutates_args=())
def _draw_op(keys: Tensor, j: Tensor, k0: Tensor, n_k: int, per_k: int, bits: int) -> Tensor:
    """The compiled `_draw` as an operator that a compiled caller (a training step, an
    estimator) calls rather than inlines. Why: inlined, every draw adds two 20-round hashes
    to the caller's graph, and the code generation of some 50 of them took minutes per
    model; as an operator, the one hash kernel is compiled once for all shapes and draws."""
    # One state for every call, whatever the caller's: torch.compile guards on grad mode and
    # on the inputs' dispatch keys (tensors made in inference mode lack some), and would
    # compile the kernel again for each combination (validation runs in inference mode).
    with torch.inference_mode():
        return _draw_kernel()(keys.clone(), j.clone(), k0.clone(), n_k, per_k, bits)


@_draw_op.register_fake
def _(keys: Tensor, j: Tensor, k0: Tensor, n_k: int, per_k: int, bits: int) -> Tensor:
    dtype = torch.float32 if bits <= 24 else torch.float64
    return keys.new_empty((keys.shape[0], n_k, per_k), dtype=dtype)


class Streams:
    """One counter-based stream per row (see the module docstring).

    ``Streams.keyed(device, seed, purpose, K, keys=idx)`` gives row i the stream of
    (seed, purpose, K, idx[i]). A draw of shape (rows, k, *unit) takes row i's next
    draw key and counters (k0 + k, flat unit index); `at(k0)` views the samples from
    k0 on (a chunk of K), `[a:b]` a block of rows, both from the same next draw.
    """

    def __init__(self, keys: Tensor, k0: int | Tensor = 0, draw: int = 0) -> None:
        if keys.dim() != 2 or keys.shape[1] != 2 or keys.dtype != torch.int64:
            raise ValueError(f"keys must be an int64 tensor of shape (rows, 2), got {keys.shape}")
        self.keys, self.draw = keys, int(draw)
        # A tensor, not an int: a compiled function that draws a chunk of K then takes it as
        # an input instead of compiling again for every chunk's offset.
        self.k0 = torch.as_tensor(k0, dtype=torch.int64, device=keys.device)

    @classmethod
    def keyed(
        cls, device: torch.device | str, *parts: int, keys: Sequence[int] | Tensor
    ) -> Streams:
        """Row i's key from (parts, keys[i]): keys are the rows' 64-bit integer indices."""
        base0, base1 = _words(mix_seed(*parts))
        idx = torch.as_tensor(keys, dtype=torch.int64, device=device).reshape(-1)
        w0, w1 = threefry2x32(base0, base1, idx & MASK32, (idx >> 32) & MASK32)
        return cls(torch.stack([w0, w1], dim=1))

    def __len__(self) -> int:
        return self.keys.shape[0]

    def __getitem__(self, rows: slice) -> Streams:
        if not isinstance(rows, slice):
            raise TypeError("Streams can be sliced only (rows a:b)")
        return Streams(self.keys[rows], self.k0, self.draw)

    def at(self, k0: int) -> Streams:
        """These rows' next draws for the samples k0, k0 + 1, ... (a chunk of K)."""
        return Streams(self.keys, k0, self.draw)

    def advance(self, draws: int) -> None:
        """Skip to draw number `draws` (after chunks drawn through `at` views), so that the
        next draw does not repeat theirs."""
        self.draw = max(self.draw, int(draws))

    def rand(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
        """The next draw: U[0, 1) of `shape` (rows first, then the sample axis k if there
        are 3 or more axes) in `dtype`, with as many random bits as its significand holds,
        so every value is exact: 24 for float32 from one output word (the two words of a
        counter serve two neighbouring units, half the hashing), 53 for float64."""
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != len(self):
            raise ValueError(f"a draw of shape {shape} must have {len(self)} rows, one per stream")
        n_k = shape[1] if len(shape) >= 3 else 1
        per_k = math.prod(shape[2:]) if len(shape) >= 3 else math.prod(shape[1:])
        bits = round(-math.log2(torch.finfo(dtype).eps)) + 1
        j = torch.tensor(self.draw, dtype=torch.int64, device=self.keys.device)
        self.draw += 1
        # Sizes of at least 2 (torch.compile specializes a size of 1, and a second call
        # with 2 would compile again), at least 3 rows (2 would equal the keys' 2 columns,
        # a coincidence torch.compile also specializes on) and an even count of float32
        # units (an odd count would compile a second kernel, which drops the last word of
        # the last pair); the extra rows, samples and units are cut off.
        rows = len(self)
        keys = self.keys if rows >= 3 else self.keys[torch.arange(3) % rows]
        units = max(per_k, 2)
        units += units % 2 if bits <= 24 else 0
        draw = _draw_op if _compiled_kernel else _draw
        u = draw(keys, j, self.k0, max(n_k, 2), units, bits)
        return u[:rows, :n_k, :per_k].to(dtype).reshape(shape)


class RowStreams:
    """One random stream per row: row i of every draw comes from generator i.

    Built from integer keys, e.g. ``RowStreams.keyed(device, seed, purpose, K, keys=idx)``
    gives example idx[i] the generator of (seed, purpose, K, idx[i]). Slicing
    (``streams[a:b]``) keeps the generators, so a chunk of rows continues their streams.
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    @classmethod
    def keyed(
        cls, device: torch.device | str, *parts: int, keys: Sequence[int] | Tensor
    ) -> RowStreams:
        keys = keys.tolist() if isinstance(keys, Tensor) else keys
        return cls([make_generator(device, *parts, int(k)) for k in keys])

    def __len__(self) -> int:
        return len(self.generators)

    def __getitem__(self, rows: slice) -> RowStreams:
        if not isinstance(rows, slice):
            raise TypeError("RowStreams can be sliced only (rows a:b)")
        return RowStreams(self.generators[rows])

    def rand(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(
                f"a draw of shape {tuple(shape)} has {shape[0]} rows, the streams "
                f"{len(self.generators)}"
            )
        out = torch.empty(tuple(shape), device=device, dtype=dtype)
        for row, g in zip(out, self.generators, strict=True):
            torch.rand(row.shape, generator=g, device=device, dtype=dtype, out=row)
        return out


Generator = torch.Generator | RowStreams | Streams | None


def uniform(
    shape: Sequence[int], generator: Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """U[0, 1) numbers of `shape`: from `Streams` or `RowStreams` (row i from stream i), or
    from a plain torch.Generator (or torch's global one for None)."""
    if isinstance(generator, Streams | RowStreams):
        return generator.rand(shape, device, dtype)
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)


def counter_based() -> bool:
    """Whether this process draws counter-based `Streams` (`set_counter_based`)."""
    return _counter_based


def row_streams(
    device: torch.device | str, *parts: int, keys: Sequence[int] | Tensor
) -> Streams | RowStreams:
    """One stream per row, row i's from (parts, keys[i]): counter-based `Streams` where the
    process uses them (`set_counter_based`), else `RowStreams`."""
    if _counter_based:
        return Streams.keyed(device, *parts, keys=keys)
    return RowStreams.keyed(device, *parts, keys=keys)


def step_generator(device: torch.device | str, *parts: int, rows: int) -> Generator:
    """The random numbers of one batch of `rows` rows that need no per-row exactness (a
    training step, a set of p samples), from (parts): `Streams` where the process uses
    them, else one torch.Generator (eager, the fastest)."""
    if _counter_based:
        return Streams.keyed(device, *parts, keys=range(rows))
    return make_generator(device, *parts)
