"""Forwarding values still pickled (`procqueue/_protocol/relay.py`), the buffer a
pipeline stage cuts them from (`procqueue/_map.py` `Blocks`) and the worker's side
(`Loader`), without processes."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procqueue._errors import SerializationError
from procqueue._map import Blocks
from procqueue._protocol.pickling import dumps_body
from procqueue._protocol.relay import Body, Forwarded, Loader, Unloaded, forwarded, joined


def body_of(values: list[Any]) -> Body:
    return Body(memoryview(b"".join(bytes(p) for p in dumps_body(values))), len(values))


def load(fw: Forwarded, loader: Loader | None = None) -> list[Any]:
    """What a worker makes of a batch of these forwarded items."""
    parts, wire = fw.wire()
    items, _ = (loader or Loader()).items(memoryview(b"".join(bytes(p) for p in parts)), wire)
    return items


def test_forwarded_items_slice_and_pick_the_values_they_name() -> None:
    body = body_of([10, 11, None, 13, 14])  # 12 failed at the stage before
    fw = joined(body, [range(0, 2), range(3, 5)])
    assert len(fw) == 4 and fw.parts == ((body, (0, 1, 3, 4)),)
    part = fw[1:3]
    assert isinstance(part, Forwarded) and part.parts == ((body, (1, 3)),)
    assert load(part) == [11, 13] and part.loads() == 5 and part.loads(held=body.key) == 0
    other = joined(body_of([20, 21, 22]), [range(1, 3)])
    both = fw + other
    assert len(both) == 6 and load(both) == [10, 11, 13, 14, 21, 22]
    assert load(both[3:5]) == [14, 21]  # across two bodies
    with pytest.raises(TypeError, match="slices"):
        fw[0]  # type: ignore[index]
    assert "4 values forwarded still pickled, from 1 bodies" in repr(fw)


class _Run:
    def __init__(self, items: object) -> None:
        self.items = items


def test_a_batch_of_forwarded_items_is_its_slice_of_the_run() -> None:
    body = body_of(list(range(8)))
    fw = joined(body, [range(2, 8)])
    got = forwarded([(_Run(fw), 1, 3)])
    assert got is not None and got.parts == ((body, range(3, 6)),)
    assert forwarded([(_Run([1, 2]), 0, 2)]) is None
    with pytest.raises(ValueError, match="go alone"):
        forwarded([(_Run(fw), 0, 2), (_Run(fw), 2, 2)])


class _ExitsOnLoad:
    def __reduce__(self) -> tuple[Any, ...]:
        return (sys.exit, (3,))


def test_the_worker_unpickles_a_body_once_and_a_retry_afresh() -> None:
    loads = []
    body = body_of([[i] for i in range(6)])
    loader = Loader()
    real = loader._load

    def counted(key: int, data: memoryview) -> None:
        loads.append(key)
        real(key, data)

    loader._load = counted  # type: ignore[method-assign]
    fw = joined(body, [range(0, 6)])
    first = load(fw[0:3], loader)
    first[0].append("changed by the handler")
    assert load(fw[3:6], loader) == [[3], [4], [5]]
    assert len(loads) == 1  # cut in two, unpickled once
    assert load(fw[0:1], loader) == [[0]]  # a retry: a fresh copy, not the one the handler changed
    assert len(loads) == 2


def test_a_value_that_does_not_unpickle_fails_alone_in_the_worker() -> None:
    body = body_of([1, _ExitsOnLoad(), 3])
    items, bad = Loader().items(body.data, joined(body, [range(0, 3)]).wire()[1])
    assert bad and items[0] == 1 and items[2] == 3 and type(items[1]) is Unloaded
    err = items[1].error
    assert isinstance(err, SerializationError) and "SystemExit: 3" in str(err) and err.unforwardable  # type: ignore[attr-defined]
    items, bad = Loader().items(body.data, joined(body, [range(2, 3)]).wire()[1])
    assert items == [3] and not bad


def test_the_buffer_cuts_lists_alone_and_forwarded_runs_together() -> None:
    a = joined(body_of(list(range(100, 110))), [range(0, 10)])
    b = joined(body_of(list(range(200, 203))), [range(0, 3)])
    buf = Blocks()
    buf.extend([1, 2, 3])
    buf.extend(a)
    buf.extend(b)
    buf.extend([4])
    buf.extend([5, 6])  # joins the list before it
    assert len(buf) == 19 and len(buf.parts) == 4
    assert buf.clip(0, 100) == 3 and buf.take(0, 2) == [1, 2]
    assert buf.clip(2, 100) == 1  # the rest of the list, not into the forwarded run
    assert buf.clip(3, 4) == 4
    got = buf.take(3, 4)
    assert isinstance(got, Forwarded) and load(got) == [100, 101, 102, 103]
    del buf[:5]  # into the forwarded run
    assert len(buf) == 14 and buf.clip(0, 100) == 11  # the rest of a and all of b
    assert buf.clip(2, 100) == 9
    got = buf.take(2, 9)
    assert isinstance(got, Forwarded) and load(got) == [104, 105, 106, 107, 108, 109, 200, 201, 202]
    assert buf.take(11, 3) == [4, 5, 6]
    with pytest.raises(IndexError):
        buf.take(10, 2)  # across a forwarded run and a list: clip first
    with pytest.raises(ValueError, match="prefix"):
        del buf[1:2]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_the_buffer_gives_back_what_went_in_in_order(data: st.DataObject) -> None:
    """Any mix of lists and forwarded runs, cut in any sizes with prefixes dropped as the
    pusher does, comes out as the same items in the same order."""
    buf = Blocks()
    model: list[object] = []
    out: list[object] = []
    pos = 0

    def cut(most: int) -> None:
        nonlocal pos
        n = buf.clip(pos, most)
        got = buf.take(pos, n)
        assert len(got) == n
        pos += n
        out.extend(load(got) if isinstance(got, Forwarded) else got)

    for _ in range(data.draw(st.integers(1, 25))):
        if data.draw(st.booleans()):
            n = data.draw(st.integers(0, 6))
            if data.draw(st.booleans()):
                values = list(range(len(model), len(model) + n + 2))
                lo = data.draw(st.integers(0, 2))
                buf.extend(joined(body_of(values), [range(lo, lo + n)]))
                model.extend(values[lo : lo + n])
            else:
                items = list(range(len(model), len(model) + n))
                buf.extend(items)
                model.extend(items)
            if data.draw(st.booleans()) and pos:
                del buf[:pos]
                pos = 0
        elif pos < len(buf):
            cut(data.draw(st.integers(1, 8)))
    while pos < len(buf):
        cut(5)
    assert out == model


def test_a_body_the_worker_holds_goes_as_its_key_alone() -> None:
    body = body_of(list(range(10)))
    fw = joined(body, [range(0, 10)])
    data, wire = fw[0:4].wire()
    assert [bytes(d) for d in data] == [bytes(body.data)] and wire == ((body.key, body.data.nbytes, range(0, 4)),)
    loader = Loader()
    assert loader.items(memoryview(b"".join(bytes(d) for d in data)), wire)[0] == [0, 1, 2, 3]
    data, wire = fw[4:7].wire(held=body.key)
    assert data == [] and wire == ((body.key, 0, range(4, 7)),)
    assert loader.items(memoryview(b""), wire)[0] == [4, 5, 6]
    assert fw.last_key == body.key
    with pytest.raises(RuntimeError, match="no longer holds"):
        Loader().items(memoryview(b""), wire)  # a worker that never loaded it
