"""Setups numwatch cannot measure correctly are refused with a clear message, not misreported."""

from __future__ import annotations

import pytest
import torch

import numwatch
from tests.support.watch_helpers import small_model


class _Engine(torch.nn.Module):
    """Stands in for a DeepSpeed engine: what matters is the class's home module."""

    def __init__(self) -> None:
        super().__init__()
        self.module = small_model()


_Engine.__module__ = "deepspeed.runtime.engine"


def test_deepspeed_engine_is_refused(tmp_path):
    with pytest.raises(numwatch.UnsupportedConfiguration, match="DeepSpeed"):
        numwatch.watch(_Engine(), spool_dir=tmp_path)


def test_zero3_partitioned_parameters_are_refused(tmp_path):
    model = small_model()
    model[0].weight.ds_id = 0  # ZeRO-3 tags the parameters it partitions
    with pytest.raises(numwatch.UnsupportedConfiguration, match="ZeRO"):
        numwatch.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), spool_dir=tmp_path)


def test_a_refused_watch_leaves_the_model_watchable(tmp_path):
    model = small_model()
    model[0].weight.ds_id = 0
    with pytest.raises(numwatch.UnsupportedConfiguration):
        numwatch.watch(model, spool_dir=tmp_path)
    del model[0].weight.ds_id
    with numwatch.watch(model, run="after", spool_dir=tmp_path) as watcher:
        model(torch.ones(2, 6)).sum().backward()
        watcher.step()
    assert watcher.steps == 1
