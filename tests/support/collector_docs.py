"""Protocol documents built by hand for collector tests, with values known in advance."""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np

from numwatch import protocol

TENSORS = [
    {"name": "embed.weight", "shape": [10, 4], "dtype": "float32", "group": 0},
    {"name": "head.weight", "shape": [4, 4], "dtype": "float32", "group": 0},
    {"name": "head.bias", "shape": [4], "dtype": "float32", "group": 0},
]
NUMEL = [40, 16, 4]


def run_doc(
    run: str = "r1", project: str = "default", rank: int = 0, tensors: list[dict] | None = None
) -> dict[str, Any]:
    return dict(
        protocol.run_document(
            run, rank=rank, format="fp16", tensors=tensors or TENSORS, project=project, config={"lr": 0.001}
        )
    )


def array(values: list[float] | np.ndarray, dtype: str) -> str:
    """Values as the protocol's array text of ``dtype``."""
    return protocol.pack_bytes(np.asarray(values, dtype=dtype).tobytes())


def values(text: str, dtype: str, length: int | None = None) -> np.ndarray:
    """Array text back to its values (exactly ``length`` of them when given), NaN and ±Inf bit-exact."""
    return np.frombuffer(protocol.check_raw(protocol.unpack_bytes(text), dtype, length), dtype=dtype)


def step_doc(step: int, norms: list[float] | None = None, loss: float | None = 1.0, **fields: Any) -> dict[str, Any]:
    """A valid step of the three TENSORS; ``fields`` then overwrite document fields as given (bad input included)."""
    norms = norms if norms is not None else [0.5, 0.25, 0.125]
    tensors = {
        "grad_norm": array(norms, "<f4"),
        "grad_absmax": array([n / 2 for n in norms], "<f4"),
        "nan_count": array([0 if np.isfinite(n) else 3 for n in norms], "<i8"),
        "inf_count": array([0] * len(norms), "<i8"),
    }
    tensors.update(fields.pop("tensors", {}))
    global_norm = float(np.sqrt(np.sum(np.square(np.asarray(norms, dtype=np.float64)))))
    doc = dict(
        protocol.step_document(
            step,
            time=time.time(),
            step_time=0.1,
            loss=loss,
            loss_scale=1024.0,
            new_loss_scale=1024.0,
            lr=[0.001],
            global_grad_norm=global_norm,
            headroom_bits=5.0,
            tensors=tensors,
        )
    )
    doc.update(fields)
    return doc


def batch_doc(run: str = "r1", steps: list[dict] | None = None, rank: int = 0, **fields: Any) -> dict[str, Any]:
    return {**protocol.batch_document(run, rank=rank, steps=steps or []), **fields}


def post_batch(client: httpx.Client, doc: dict[str, Any], run: str = "r1") -> httpx.Response:
    """POST a batch document as the client sends it (protocol JSON)."""
    return client.post(
        f"/api/v1/runs/{run}/batches", content=protocol.dumps(doc), headers={"Content-Type": "application/json"}
    )
