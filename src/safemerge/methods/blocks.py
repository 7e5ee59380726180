"""Block-wise evaluation: the methods' arithmetic, a cache-sized block at a time.

A merge touches each weight a handful of times (convert, subtract, trim, elect, average, add, cast). On
whole tensors every step is a pass through main memory; on blocks of 256K elements (1 MiB in float32)
the steps run mostly in cache and main memory is read once per input and written once. Inputs stay in their
stored dtype (bf16 checkpoints are read as bf16); each block is converted to float32, so the arithmetic
is float32 throughout, and the result is cast once into the output buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

BLOCK = 1 << 18


def spans(n: int, like: torch.Tensor | None = None) -> Iterator[tuple[int, int]]:
    """[start, end) ranges covering n elements: cache-sized blocks on the CPU, one range on a GPU (whose
    kernels stream through memory anyway and pay a launch per block)."""
    block = n if like is not None and like.device.type != "cpu" else BLOCK
    for s in range(0, n, max(block, 1)):
        yield s, min(n, s + block)


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1)


@dataclass(frozen=True)
class TaskVector:
    """τ = model − base, evaluated block by block in float32.

    Either `model` (then τ = model − base, computed per block: nothing of τ's size is allocated) or a
    precomputed `delta` (the in-memory search caches these once). Tensors are flat, any float dtype.
    """

    model: torch.Tensor | None = None
    delta: torch.Tensor | None = None

    @property
    def source(self) -> tuple[torch.Tensor, bool]:
        """(the tensor τ is read from, whether the base is subtracted from it): a precomputed delta wins."""
        return (self.delta, False) if self.delta is not None else (self.model, True)

    def block(self, base_block: torch.Tensor, s: int, e: int) -> torch.Tensor:
        if self.delta is not None:
            return self.delta[s:e].to(torch.float32, copy=True)
        m = self.model[s:e]
        if m.dtype in (torch.bfloat16, torch.float16, torch.float32) and base_block.dtype == torch.float32:
            return torch.sub(m, base_block)  # one pass: the half-precision block is widened inside the kernel, exactly
        return m.to(torch.float32, copy=True).sub_(base_block)

    def gather(self, base: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """τ at the flat positions `index` (float32); `base` is the flat base tensor."""
        if self.delta is not None:
            return self.delta[index].to(torch.float32)
        return self.model[index].to(torch.float32).sub_(base[index].to(torch.float32))


def task_vectors(deltas: Sequence[torch.Tensor | TaskVector]) -> list[TaskVector]:
    """Plain tensors are precomputed task vectors τ_i; TaskVector objects pass through (flattened)."""
    out = []
    for d in deltas:
        if isinstance(d, TaskVector):
            out.append(TaskVector(model=None if d.model is None else flat(d.model),
                                  delta=None if d.delta is None else flat(d.delta)))
        else:
            out.append(TaskVector(delta=flat(d)))
    return out


def output(like: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The buffer to write into: `out` (any dtype, same numel) or a new float32 tensor shaped like `like`."""
    if out is None:
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)
    if out.numel() != like.numel():
        raise ValueError(f"out has {out.numel()} elements, expected {like.numel()}")
    return out
