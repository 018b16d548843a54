"""Flat fragments of tensors (DeepSpeed ZeRO's partitions) shaped for the quantization schemes."""

from __future__ import annotations

import torch

from numwatch.kernels.fragments import Fragment


def test_a_fragment_of_whole_rows_is_measured_as_its_rows() -> None:
    whole = torch.arange(24.0).reshape(4, 6)
    fragment = Fragment((4, 6), start=6, numel=12)
    assert fragment.whole_rows
    rows = fragment.rows(whole.reshape(-1)[6:18])
    assert torch.equal(rows, whole[1:3])


def test_a_fragment_that_cuts_a_row_is_one_flat_row() -> None:
    for start, numel in ((3, 12), (6, 9), (0, 5)):
        fragment = Fragment((4, 6), start, numel)
        assert not fragment.whole_rows
        assert fragment.rows(torch.zeros(numel)).shape == (1, numel)


def test_vectors_stay_flat_and_empty_fragments_keep_their_rows() -> None:
    assert Fragment((4,), 1, 2).rows(torch.zeros(2)).shape == (2,)  # the schemes skip tensors below 2-D
    empty = Fragment((4, 6), 0, 0)
    assert empty.whole_rows and empty.rows(torch.zeros(0)).shape == (0, 6)
    assert Fragment((2, 3, 4), 12, 12).rows(torch.zeros(12)).shape == (1, 12)  # rows of 12 elements
