"""Quantization readiness of a run's latest measured weights: which layers must stay in higher precision."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy.orm import Session

from numwatch import protocol
from numwatch.monitor.store import blocks as step_blocks
from numwatch.monitor.store.models import Run


def quantization_table(session: Session, run: Run, rank: int, sort: protocol.QuantScheme) -> dict[str, Any]:
    """Per weight tensor, the SQNR (dB) of each scheme at the last quantization step, worst ``sort`` first.

    Tensors the schemes do not quantize (fewer than two dimensions: NaN everywhere) are left out.
    """
    stat = protocol.QUANT_SQNR_STATS[sort]
    steps = step_blocks.Reader(session, run.id, rank, len(run.tensors)).before(
        wanted=tuple(protocol.QUANT_SQNR_STATS.values()), having=(stat,)
    )
    try:
        row = next((step for step in steps if stat in step["tensors"]), None)
    finally:
        steps.close()
    if row is None:
        return {"step": None, "rank": rank, "sort": sort, "tensors": []}
    stats = row["tensors"]
    columns = {scheme: stats[stat] for scheme, stat in protocol.QUANT_SQNR_STATS.items() if stat in stats}
    measured = [i for i in range(len(run.tensors)) if not all(math.isnan(values[i]) for values in columns.values())]
    measured.sort(key=lambda i: (math.isnan(columns[sort][i]), columns[sort][i]))
    tensors = [
        {
            "tensor": run.tensors[i]["name"],
            "shape": run.tensors[i]["shape"],
            "sqnr_db": {scheme: protocol.encode_float(float(values[i])) for scheme, values in columns.items()},
        }
        for i in measured
    ]
    return {"step": row["step"], "rank": rank, "sort": sort, "tensors": tensors}
