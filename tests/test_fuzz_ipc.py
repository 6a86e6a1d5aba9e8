"""Randomized tests of everything that reads input from another process: the shm ring and the decoders.

(a) random write/release interleavings agree with a naive model of the ring;
(b) hostile handles and sizes only ever raise RingCorruptRef/ValueError and never disturb live blocks;
(c) arbitrary bytes fed to the message decoders only raise msgspec errors; valid messages round-trip.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import typing
from pathlib import Path

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from embedserve import messages as m
from embedserve.ipc.shm_ring import RingCorruptRef, RingFullTimeout, ShmRing

_CAP = 1024  # small, so a few writes fill it and every run wraps


def _payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# ---- (a) the ring against a naive model ----------------------------------------------------------


class RingAgainstModel(RuleBasedStateMachine):
    """The model keeps blocks in a list; the tail is simply the start of the oldest live block."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.ring = ShmRing.create(str(Path(self.dir) / "ring"), _CAP)
        self.head = 0
        self.live: dict[int, bytes] = {}  # handle -> payload, in write order

    def _model_alloc(self, nbytes: int) -> int | None:
        """Where the model places a block: after a pad to the lap's end if it would straddle it."""
        span = 64 + -(-nbytes // 64) * 64
        if self.head % _CAP + span > _CAP:
            pad = _CAP - self.head % _CAP
            if _CAP - self.used() < pad:
                return None
            self.head += pad  # the ring pads eagerly, even when the block itself does not fit yet
        if _CAP - self.used() < span:
            return None
        self.head += span
        return self.head - span

    def used(self) -> int:
        return self.head - min(self.live, default=self.head)

    @rule(nbytes=st.integers(0, _CAP), seed=st.integers(0, 2**32), in_place=st.booleans())
    def write(self, nbytes: int, seed: int, in_place: bool) -> None:
        data = _payload(seed, nbytes)
        if nbytes > self.ring.max_block_bytes:
            with pytest.raises(ValueError):
                self.ring.write(data, timeout=0)
            return
        expected = self._model_alloc(nbytes)
        try:
            if in_place:
                handle, view = self.ring.reserve(nbytes, timeout=0)
                view[:] = data
            else:
                handle = self.ring.write(data, timeout=0)
        except RingFullTimeout:
            handle = None
        assert handle == expected
        if handle is not None:
            self.live[handle] = data

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(sorted(self.live)))
        self.ring.release(handle)
        del self.live[handle]
        with pytest.raises(RingCorruptRef):
            self.ring.release(handle)

    @invariant()
    def agrees_with_model(self) -> None:
        assert self.ring.used_bytes() == self.used()
        for handle, data in self.live.items():
            assert self.ring.view(handle, len(data)).tobytes() == data
        self.ring.check_integrity()

    def teardown(self) -> None:
        self.ring.close()
        shutil.rmtree(self.dir)


TestRingAgainstModel = RingAgainstModel.TestCase
TestRingAgainstModel.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


# ---- (b) hostile handles and sizes ----------------------------------------------------------------

_junk = st.one_of(st.none(), st.floats(), st.text(max_size=4), st.binary(max_size=4), st.booleans())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=st.lists(st.integers(0, 400), min_size=1, max_size=12), data=st.data())
def test_hostile_handles_only_raise_corrupt_ref(setup: list[int], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ring = ShmRing.create(str(Path(tmp) / "ring"), _CAP)
        live = _fill_and_wrap(ring, setup)
        near = st.builds(lambda h, d: h + d, st.sampled_from(sorted(live) or [0]), st.integers(-256, 256))
        handles = st.one_of(st.integers(-(2**70), 2**70), st.integers(-64, 4 * _CAP), near, _junk)
        sizes = st.one_of(st.integers(-(2**70), 2**70), st.integers(-1, 512), _junk)
        for _ in range(20):
            handle, nbytes, op = data.draw(handles), data.draw(sizes), data.draw(st.sampled_from("vr"))
            _poke(ring, live, op, handle, nbytes)
            ring.check_integrity()
            for h, payload in live.items():
                assert ring.view(h, len(payload)).tobytes() == payload
        ring.close()


def _fill_and_wrap(ring: ShmRing, sizes: list[int]) -> dict[int, bytes]:
    """Write blocks of `sizes`, freeing the oldest when full, so the ring has wrapped and has stale handles."""
    live: dict[int, bytes] = {}
    for i, size in enumerate(sizes * 3):
        data = _payload(i, size)
        while True:
            try:
                live[ring.write(data, timeout=0)] = data
                break
            except RingFullTimeout:
                ring.release(min(live))
                del live[min(live)]
    return live


def _poke(ring: ShmRing, live: dict[int, bytes], op: str, handle: object, nbytes: object) -> None:
    """One hostile view or release: it succeeds only on a real live block, else raises RingCorruptRef."""
    genuine = type(handle) is int and handle in live
    right_size = genuine and type(nbytes) is int and nbytes == len(live[handle])  # type: ignore[index]
    should_pass = genuine and (op == "r" or right_size)
    try:
        if op == "v":
            ring.view(handle, nbytes)  # type: ignore[arg-type]
        else:
            ring.release(handle)  # type: ignore[arg-type]
            del live[handle]  # type: ignore[arg-type]
    except RingCorruptRef:
        assert not should_pass
    else:
        assert should_pass


@settings(max_examples=100, deadline=None)
@given(nbytes=st.one_of(st.integers(-(2**70), -1), st.integers(_CAP - 63, 2**70)))
def test_impossible_sizes_raise_value_error(nbytes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ring = ShmRing.create(str(Path(tmp) / "ring"), _CAP)
        with pytest.raises(ValueError):
            ring.reserve(nbytes, timeout=0)
        assert ring.used_bytes() == 0
        ring.close()


# ---- (c) message decoders -------------------------------------------------------------------------

_LEAVES = {
    mi.StrType: st.text(max_size=12),
    mi.BytesType: st.binary(max_size=16),
    mi.BoolType: st.booleans(),
    mi.NoneType: st.none(),
    mi.FloatType: st.floats(allow_nan=False),  # NaN != NaN would fail the round trip for no reason
}


def _strategy(t: mi.Type) -> st.SearchStrategy:
    """Valid values of a msgspec type, derived from messages.py itself so new fields are covered."""
    if isinstance(t, mi.StructType):
        return st.builds(t.cls, **{f.name: _strategy(f.type) for f in t.fields})
    if isinstance(t, mi.UnionType):
        return st.one_of(*map(_strategy, t.types))
    if isinstance(t, mi.ListType):
        return st.lists(_strategy(t.item_type), max_size=3)
    if isinstance(t, mi.TupleType):
        return st.tuples(*map(_strategy, t.item_types))
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.IntType):  # msgpack ints span [-2**63, 2**64)
        lo = -(2**63) if t.ge is None and t.gt is None else (t.ge if t.ge is not None else t.gt + 1)
        hi = 2**64 - 1 if t.le is None and t.lt is None else (t.le if t.le is not None else t.lt - 1)
        return st.integers(lo, hi)
    return _LEAVES[type(t)]  # a KeyError here means messages.py uses a type to add above


_UNIONS = {
    name: getattr(m, name)
    for name in ("TokenizerInput", "SchedulerInput", "ExecutorInput", "DetokenizerInput", "HttpInput")
}
_VALID = {name: _strategy(mi.type_info(union)) for name, union in _UNIONS.items()}
_TAGS = sorted({t.tag for u in _UNIONS.values() for t in mi.type_info(u).types} | {"", "Nope"})
_ENCODE = msgspec.msgpack.Encoder().encode
# NOTE: msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 in a str
# (msgspec/msgspec#714, still so in 0.22): receivers must catch it too. All three are ValueErrors.
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


# Arbitrary msgpack values, and arrays that start with a real type tag so decoding reaches the fields.
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
_tagged = st.builds(lambda tag, rest: [tag, *rest], st.sampled_from(_TAGS), st.lists(_values, max_size=8))


def _mutate(raw: bytes, edits: list[tuple[int, int]]) -> bytes:
    """Overwrite, truncate or extend an encoding at a few places."""
    buf = bytearray(raw)
    for where, byte in edits:
        if byte == 256:
            del buf[where % (len(buf) + 1) :]
        elif buf:
            buf[where % len(buf)] = byte
        else:
            buf.append(byte)
    return bytes(buf)


def _decode_or_reject(union: object, raw: bytes) -> None:
    try:
        msg = msgspec.msgpack.Decoder(union).decode(raw)
    except DECODE_ERRORS:
        return
    assert isinstance(msg, typing.get_args(union))


@pytest.mark.parametrize("name", sorted(_UNIONS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_valid_messages_round_trip(name: str, data: st.DataObject) -> None:
    union = _UNIONS[name]
    msg = data.draw(_VALID[name])
    assert msgspec.msgpack.Decoder(union).decode(_ENCODE(msg)) == msg


@pytest.mark.parametrize("name", sorted(_UNIONS))
@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=64))
def test_arbitrary_bytes_only_raise_decode_errors(name: str, raw: bytes) -> None:
    _decode_or_reject(_UNIONS[name], raw)


@pytest.mark.parametrize("name", sorted(_UNIONS))
@settings(max_examples=60, deadline=None)
@given(value=_values | _tagged)
def test_wrong_shaped_msgpack_only_raises_decode_errors(name: str, value: object) -> None:
    _decode_or_reject(_UNIONS[name], _ENCODE(value))


@pytest.mark.parametrize("name", sorted(_UNIONS))
@settings(max_examples=60, deadline=None)
@given(data=st.data(), edits=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 256)), max_size=3))
def test_corrupted_messages_only_raise_decode_errors(name: str, data: st.DataObject, edits) -> None:
    union = _UNIONS[name]
    raw = _ENCODE(data.draw(_VALID[name]))
    _decode_or_reject(union, _mutate(raw, edits))
