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


# Per recipe, the scheme each operand would be cast with.
RECIPES: dict[str, dict[protocol.GemmOperand, protocol.GemmScheme]] = {
    "fp8": {"x": "e4m3", "w": "e4m3", "dy": "e5m2"},
    **{scheme: dict.fromkeys(protocol.GEMM_OPERANDS, scheme) for scheme in protocol.BLOCK_SCHEMES},
}


def _sort_key(value: float) -> tuple[bool, float]:
    return (not math.isnan(value), value)  # NaN (a non-finite operand) first: it needs looking at


def gemm_table(session: Session, run: Run, rank: int, recipe: str, threshold: float) -> dict[str, Any]:
    """Per Linear weight, what each scheme does to its matmuls' operands at the last measured step; the
    layers with the lowest SQNR under ``recipe`` first, flagged to stay in bf16 below ``threshold`` dB."""
    key = protocol.gemm_stat("x", "e4m3", "sqnr")
    steps = step_blocks.Reader(session, run.id, rank, len(run.tensors)).before(
        wanted=protocol.GEMM_STATS, having=(key,)
    )
    try:
        row = next((step for step in steps if key in step["tensors"]), None)
    finally:
        steps.close()
    rows = (run.config or {}).get("gemm_rows")  # runs from before gemm_rows measured every row
    empty: dict[str, Any] = {
        "step": None,
        "rank": rank,
        "recipe": recipe,
        "threshold_db": threshold,
        "rows": rows if isinstance(rows, int) and rows > 0 else None,
        "layers": [],
    }
    if row is None:
        return empty
    stats = row["tensors"]

    def value(operand: protocol.GemmOperand, scheme: protocol.GemmScheme | None, measure: str, i: int) -> float:
        return float(stats[protocol.gemm_stat(operand, scheme, measure)][i])  # type: ignore[arg-type]

    fields = {"sqnr": "sqnr_db", "flushed": "flushed", "saturated": "saturated"}
    ranked = []
    for i, spec in enumerate(run.tensors):
        if all(math.isnan(float(stats[name][i])) for name in protocol.GEMM_STATS if name in stats):
            continue  # no F.linear used this tensor as its weight
        operands = {
            operand: {
                "range_bits": protocol.encode_float(value(operand, None, "range", i)),
                "schemes": {
                    scheme: {field: protocol.encode_float(value(operand, scheme, m, i)) for m, field in fields.items()}
                    for scheme in schemes
                },
            }
            for operand, schemes in protocol.GEMM_OPERAND_SCHEMES.items()
        }
        pairs = [(value(op, scheme, "sqnr", i), op, scheme) for op, scheme in RECIPES[recipe].items()]
        sqnr, operand, scheme = min(pairs, key=lambda pair: _sort_key(pair[0]))
        layer = {
            "tensor": spec["name"],
            "shape": spec["shape"],
            "worst": {"operand": operand, "scheme": scheme, "sqnr_db": protocol.encode_float(sqnr)},
            "keep_bf16": not sqnr >= threshold,
            "operands": operands,
        }
        ranked.append((_sort_key(sqnr), i, layer))
    ranked.sort(key=lambda entry: entry[:2])
    return {**empty, "step": row["step"], "layers": [layer for *_, layer in ranked]}
