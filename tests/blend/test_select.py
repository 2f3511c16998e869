"""Selectors: HKVD budget, first-k, unions, deviation measures."""

from __future__ import annotations

import torch

from cacheblend.blend.select import (
    Candidates,
    FirstKSelector,
    HKVDSelector,
    UnionSelector,
    first_k_mask,
    kv_deviation,
)

SPANS = [(10, 20), (20, 40)]


def candidates(deviation):
    positions = torch.arange(10, 40)
    return Candidates(positions, torch.tensor(deviation, dtype=torch.float32), SPANS, 30)


def test_hkvd_keeps_the_top_ratio_by_deviation():
    deviation = [0.0] * 30
    deviation[5], deviation[17], deviation[29] = 3.0, 2.0, 1.0
    keep = HKVDSelector(0.1).keep(candidates(deviation))  # ceil(0.1 x 30) = 3
    assert keep.nonzero().squeeze(1).tolist() == [5, 17, 29]


def test_hkvd_ratio_zero_keeps_nothing_and_one_keeps_all():
    assert not HKVDSelector(0.0).keep(candidates([1.0] * 30)).any()
    assert HKVDSelector(1.0).keep(candidates([1.0] * 30)).all()


def test_first_k_per_chunk():
    keep = FirstKSelector(3).keep(candidates([0.0] * 30))
    assert (torch.arange(10, 40)[keep]).tolist() == [10, 11, 12, 20, 21, 22]
    assert first_k_mask(torch.tensor([5, 10, 19, 20, 39]), SPANS, 1).tolist() == [
        False, True, False, True, False]


def test_union_of_hkvd_and_first_k():
    deviation = [0.0] * 30
    deviation[29] = 5.0
    keep = UnionSelector(HKVDSelector(1 / 30), FirstKSelector(1)).keep(candidates(deviation))
    assert (torch.arange(10, 40)[keep]).tolist() == [10, 20, 39]


def test_deviation_measures():
    torch.manual_seed(0)
    k, v = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    k2, v2 = k.clone(), v.clone()
    k2[:, 1] += 1.0
    v2[:, 3] += 2.0
    assert kv_deviation(k2, k, v2, v, "k").argmax().item() == 1
    assert kv_deviation(k2, k, v2, v, "v").argmax().item() == 3
    both = kv_deviation(k2, k, v2, v, "kv")
    assert both[1] > 0 and both[3] > 0 and both[0] == 0
