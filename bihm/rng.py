"""Random streams that make evaluation exact across batch sizes and process counts.

Every estimate of `bihm-math.md` is a Monte Carlo average over h_k ~ q(h | x) (or over
Gibbs proposals). To make the number reported for a data set independent of how the data
was batched and dealt to ranks, the samples of an example must depend only on
(seed, purpose, K, example index). Two tools do that:

- `make_generator(device, *parts)`: a torch.Generator seeded by a hash of integers.
- `RowStreams`: one such generator per row of a batch. The model's samplers draw the
  noise for row i from generator i, always in the same order (layer by layer, chunk by
  chunk over K), while the arithmetic runs on the whole batch at once. A row's numbers
  then do not depend on the other rows, on the batch size or on the rank.

`uniform(shape, generator, ...)` is the one place the model draws uniforms; it accepts a
plain generator (one stream for the whole tensor), a `RowStreams`, or None.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import torch
from torch import Tensor


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (stable across processes, runs and machines)."""
    data = struct.pack(f"<{len(parts)}q", *(int(p) for p in parts))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def make_generator(device: torch.device | str, *parts: int) -> torch.Generator:
    """A torch.Generator on `device` seeded by `mix_seed(*parts)`."""
    g = torch.Generator(device=device)
    g.manual_seed(mix_seed(*parts))
    return g


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


Generator = torch.Generator | RowStreams | None


def uniform(
    shape: Sequence[int], generator: Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """U[0, 1) numbers of `shape`, from one generator or one stream per row (see RowStreams)."""
    if isinstance(generator, RowStreams):
        return generator.rand(shape, device, dtype)
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype)
