"""What one step contributes to a batch: its protocol documents (no torch, so the transport and
``numwatch sync`` load none)."""

from __future__ import annotations

from dataclasses import dataclass, field

from numwatch import protocol


@dataclass
class StepDocuments:
    """What one step contributes to a batch."""

    step: protocol.StepDocument
    histograms: list[protocol.HistogramDocument] = field(default_factory=list)
    events: list[protocol.EventDocument] = field(default_factory=list)
