"""The output logits' log partition function: log Z = logsumexp over the vocabulary, per token.

A language model's z-loss exists to hold log Z near 0; its drift (and the largest |logit|)
shows output-logit divergence before the loss does. Computed in float32 (or the logits'
wider dtype) in chunks of tokens, so at most ``chunk_elements`` converted values exist at a
time, and kept on the device: the statistics join the step's single host copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from numwatch.capture.attention import LOGIT_CHUNK_ELEMENTS


def find_logits(output: Any) -> torch.Tensor | None:
    """The logits in a model's output: the output itself, a tuple's first element, or ``.logits``
    (a Hugging Face ``ModelOutput``); None unless it is a floating tensor ``(..., vocabulary)``."""
    if isinstance(output, (tuple, list)) and output:
        candidate = output[0]
    elif isinstance(output, Mapping) and "logits" in output:
        candidate = output["logits"]
    else:
        candidate = getattr(output, "logits", output)
    if (
        isinstance(candidate, torch.Tensor)
        and candidate.is_floating_point()
        and candidate.dim() >= 2
        and candidate.size(-1) >= 2
    ):
        return candidate
    return None


class LogZ:
    """Running log Z statistics over the tokens of one step's forwards (micro-batches add up)."""

    def __init__(self, chunk_elements: int = LOGIT_CHUNK_ELEMENTS) -> None:
        self.chunk_elements = chunk_elements
        self._sum: torch.Tensor | None = None  # sum of log Z over tokens
        self._tokens = 0
        self._max: torch.Tensor | None = None  # [2]: max log Z, max |logit|

    def add(self, logits: torch.Tensor) -> None:
        """Take one forward's logits (the vocabulary is the last dimension)."""
        vocabulary = logits.size(-1)
        if logits.numel() == 0:
            return
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.no_grad():
            flat = logits.detach().reshape(-1, vocabulary)
            rows = max(1, self.chunk_elements // vocabulary)
            total = torch.zeros((), dtype=torch.float64 if flat.device.type != "mps" else dtype, device=flat.device)
            largest = torch.full((2,), -math.inf, dtype=dtype, device=flat.device)
            for start in range(0, flat.size(0), rows):
                chunk = flat[start : start + rows].to(dtype)
                log_z = torch.logsumexp(chunk, dim=-1)
                total = total + log_z.sum(dtype=total.dtype)
                # max |logit| from one aminmax: vector_norm(inf) materialises |x| on the CPU. NaN
                # propagates through aminmax and every maximum.
                low, high = torch.aminmax(chunk)
                largest = torch.maximum(largest, torch.stack([log_z.amax(), torch.maximum(high, low.neg())]))
        self._sum = total if self._sum is None else self._sum + total
        self._max = largest if self._max is None else torch.maximum(self._max, largest)
        self._tokens += flat.size(0)

    def take_step(self) -> torch.Tensor | None:
        """float [3]: mean log Z, max log Z, max |logit| of this step's tokens (None if none); resets."""
        if self._sum is None or self._max is None:
            return None
        result = torch.cat([(self._sum / self._tokens).to(self._max.dtype).reshape(1), self._max])
        self._sum, self._max, self._tokens = None, None, 0
        return result
