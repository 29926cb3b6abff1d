"""Forwarding values still pickled (`procqueue/_protocol/relay.py`) and the buffer a
pipeline stage cuts them from (`procqueue/_map.py` `Blocks`), without processes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procqueue._map import Blocks
from procqueue._protocol.pickling import dumps_body, loads_body
from procqueue._protocol.relay import Forwarded, forwarded, joined, pick


def body_of(values: list[object]) -> memoryview:
    return memoryview(b"".join(bytes(p) for p in dumps_body(values)))


def test_forwarded_items_slice_and_pick_the_values_they_name() -> None:
    body = body_of([10, 11, None, 13, 14])  # 12 failed at the stage before
    fw = joined(body, [range(0, 2), range(3, 5)])
    assert len(fw) == 4 and fw.picks == (0, 1, 3, 4)
    part = fw[1:3]
    assert isinstance(part, Forwarded) and part.picks == (1, 3) and part.body is body
    assert pick(loads_body(body), part.picks) == [11, 13]
    assert pick(loads_body(body), range(1, 4)) == [11, None, 13]
    with pytest.raises(TypeError, match="slices"):
        fw[0]  # type: ignore[index]
    assert "4 values forwarded still pickled" in repr(fw)


class _Run:
    def __init__(self, items: object) -> None:
        self.items = items


def test_a_batch_of_forwarded_items_names_its_body_and_picks() -> None:
    body = body_of(list(range(8)))
    fw = Forwarded(body, range(2, 8))
    assert forwarded([(_Run(fw), 1, 3)]) == (body, range(3, 6))
    assert forwarded([(_Run([1, 2]), 0, 2)]) is None
    with pytest.raises(ValueError, match="go alone"):
        forwarded([(_Run(fw), 0, 2), (_Run(fw), 2, 2)])


def test_the_buffer_cuts_within_each_part_and_drops_a_prefix() -> None:
    body = body_of(list(range(100, 110)))
    b = Blocks()
    b.extend([1, 2, 3])
    b.extend(Forwarded(body, range(0, 10)))
    b.extend([4])
    b.extend([5, 6])  # joins the list before it
    assert len(b) == 16 and len(b.parts) == 3
    assert b.clip(0, 100) == 3 and b.take(0, 2) == [1, 2]
    assert b.clip(2, 100) == 1  # the rest of the list, not into the forwarded run
    assert b.clip(3, 4) == 4
    fw = b.take(3, 4)
    assert isinstance(fw, Forwarded) and fw.picks == range(0, 4)
    del b[:5]  # into the forwarded run
    assert len(b) == 11 and b.clip(0, 100) == 8
    assert b.clip(2, 100) == 6
    fw = b.take(2, 6)
    assert isinstance(fw, Forwarded) and fw.picks == range(4, 10)
    assert b.take(8, 3) == [4, 5, 6]
    with pytest.raises(IndexError):
        b.take(7, 2)  # across two parts: clip first
    with pytest.raises(ValueError, match="prefix"):
        del b[1:2]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_the_buffer_gives_back_what_went_in_in_order(data: st.DataObject) -> None:
    """Any mix of lists and forwarded runs, cut in any sizes with prefixes dropped as the
    pusher does, comes out as the same items in the same order."""
    b = Blocks()
    model: list[object] = []  # every item pushed, a forwarded one as (body id, value)
    out: list[object] = []
    pos = 0
    for _ in range(data.draw(st.integers(1, 25))):
        if data.draw(st.booleans()):
            n = data.draw(st.integers(0, 6))
            if data.draw(st.booleans()):
                values = list(range(len(model), len(model) + n + 2))
                body = body_of(values)
                lo = data.draw(st.integers(0, 2))
                b.extend(Forwarded(body, range(lo, lo + n)))
                model.extend(values[lo : lo + n])
            else:
                items = list(range(len(model), len(model) + n))
                b.extend(items)
                model.extend(items)
            if data.draw(st.booleans()) and pos:
                del b[:pos]
                pos = 0
        elif pos < len(b):
            n = b.clip(pos, data.draw(st.integers(1, 8)))
            got = b.take(pos, n)
            pos += n
            out.extend(pick(loads_body(got.body), got.picks) if isinstance(got, Forwarded) else got)
    while pos < len(b):
        n = b.clip(pos, 5)
        got = b.take(pos, n)
        pos += n
        out.extend(pick(loads_body(got.body), got.picks) if isinstance(got, Forwarded) else got)
    assert out == model
