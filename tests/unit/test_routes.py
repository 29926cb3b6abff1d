"""The pipeline's bookkeeping (`procqueue/_pipeline/routes.py`), without processes: items
pushed through stages in random batches, finishing in random order, failing at random
stages, come out once each, in input order when asked."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procqueue._pipeline.routes import Outbox, Positions


def test_positions_are_ranges_until_an_item_drops_out() -> None:
    p = Positions()
    p.add(range(0, 10))
    p.add(range(10, 20))
    assert p.take(0, 4) == range(0, 4)
    assert list(p.take(8, 4)) == [8, 9, 10, 11]  # across two pushes
    p.add([20, 22, 25])  # 21, 23, 24 failed before this stage
    assert list(p.take(20, 3)) == [20, 22, 25]
    assert p.pending == 12  # 23 pushed, 11 taken
    assert p.take(4, 4) == range(4, 8)  # the first push is all taken now
    with pytest.raises(ValueError, match="taken twice"):
        p.take(0, 1)
    with pytest.raises(ValueError, match="never pushed"):
        p.take(22, 2)


def test_outbox_ordered_interleaves_errors_at_their_places() -> None:
    o = Outbox(ordered=True)
    assert o.take() is None
    boom = ValueError("x")
    o.fail(1, boom)  # an earlier stage's error is recorded before later items move on
    o.put(range(0, 1), ["a"])
    o.put([2, 3], ["c", "d"])
    assert o.take() == (["a"], None)
    assert o.take() == ([boom], {0: boom})
    assert o.take() == (["c", "d"], None)
    assert o.take() is None
    assert o.held == 0
    late = Outbox(ordered=True)
    late.put([1], ["b"])  # item 0 is not here yet (nor recorded as failed): wait for it
    assert late.take() is None


def test_outbox_splits_a_piece_at_its_gaps() -> None:
    o = Outbox(ordered=True)
    errs = {2: KeyError(2), 5: KeyError(5)}
    o.fail(2, errs[2])
    o.fail(5, errs[5])
    o.put([0, 1, 3, 4, 6], list("abdeg"))
    out: list[object] = []
    while (got := o.take()) is not None:
        out += got[0]
    assert out == ["a", "b", errs[2], "d", "e", errs[5], "g"]
    assert o.held == 0


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 120),
    stages=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    ordered=st.booleans(),
    fail_rate=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_every_item_comes_out_once(n: int, stages: int, seed: int, ordered: bool, fail_rate: float) -> None:
    rng = random.Random(seed)
    out = Outbox(ordered)
    lanes = [Positions() for _ in range(stages)]
    values: list[list[int]] = [[] for _ in range(stages)]  # what each stage was pushed, by position
    failed_at: dict[int, int] = {}
    lanes[0].add(range(n))
    values[0] = list(range(n))
    # Each stage cuts its input into chunks; an ordered stage finishes them in order, an
    # unordered one in any order. Runs stage by stage over what the previous one passed on.
    for k in range(stages):
        total = lanes[k].end
        cuts: list[tuple[int, int]] = []
        pos = 0
        while pos < total:
            size = rng.randint(1, 9)
            cuts.append((pos, min(size, total - pos)))
            pos += size
        if not ordered:
            rng.shuffle(cuts)
        for start, size in cuts:
            idx = lanes[k].take(start, size)
            vals = values[k][start : start + size]
            keep_i, keep_v = [], []
            for i, v in zip(idx, vals, strict=True):
                if rng.random() < fail_rate:
                    failed_at[i] = k
                    out.fail(i, KeyError(i))
                else:
                    keep_i.append(i)
                    keep_v.append(v)
            if k + 1 < stages:
                lanes[k + 1].add(keep_i)
                values[k + 1] += [v * 10 for v in keep_v]
            else:
                out.put(keep_i, keep_v)
    got: list[object] = []
    while (piece := out.take()) is not None:
        got += piece[0]
    assert out.held == 0
    assert len(got) == n
    as_ints = [g.args[0] if isinstance(g, KeyError) else g for g in got]
    if ordered:
        for i, g in enumerate(got):
            if i in failed_at:
                assert isinstance(g, KeyError) and g.args[0] == i
            else:
                assert g == i * 10 ** (stages - 1)
    else:
        assert len(as_ints) == n
        assert sum(isinstance(g, KeyError) for g in got) == len(failed_at)
