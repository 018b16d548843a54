"""An exact checksum of replicated weights: the sum of their elements' bit patterns.

Each element's bits are read as a signed integer of its width (``Tensor.view``, no copy) and
summed in int64, wrapping modulo 2**64, so the result is exact and the same on every device
and in any summation order: ranks holding bit-identical weights get equal sums, and one
flipped bit changes the sum (by a power of two). Differences that cancel exactly (two
elements changed by opposite amounts) go unseen, which silent corruption does not arrange.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The signed integer type of each element width in bytes.
_BITS_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 scalar on the tensors' device: the sum of every element's bit pattern (wrapping)."""
    if not tensors:
        return torch.zeros((), dtype=torch.int64)
    sums = [t.detach().view(_BITS_OF_WIDTH[t.element_size()]).sum(dtype=torch.int64) for t in tensors]
    return torch.stack(sums).sum() if len(sums) > 1 else sums[0]
