"""Request parsing: every accepted input shape, and errors that name the field and the index."""

from __future__ import annotations

import numpy as np
import pytest

from embedserve.http import validation as v
from embedserve.http.errors import ApiError

LIMITS = v.Limits(vocab_size=100, hidden_size=8, model_names=frozenset({"m", "/path/m"}), served_name="m")


def test_accepted_input_shapes():
    assert v.parse_inputs("hi", LIMITS).texts == ["hi"]
    assert v.parse_inputs(["a", "b"], LIMITS).count == 2
    ids = v.parse_inputs([1, 2, 3], LIMITS)
    assert ids.single and ids.token_lengths == [3]
    assert np.frombuffer(ids.token_ids, "<i4").tolist() == [1, 2, 3]
    nested = v.parse_inputs([[1], [2, 3]], LIMITS)
    assert nested.token_lengths == [1, 2] and not nested.single


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (None, "null"),
        (3, "got int"),
        ({"a": 1}, "got dict"),
        ([], "empty"),
        (["a", ""], "input[1]"),
        (["a", 1], "input[1]"),
        ([1, "a"], "input[1]"),
        ([True, 1], "got true"),
        ([1e30], "got 1e+30"),
        ([1, 100], "input[1]"),
        ([1, -1], "input[1]"),
        ([[1], []], "input[1]"),
        ([[1], 2], "input[1]"),
        ([[1, 2**70]], "input[0][1]"),
        (["x"] * 2049, "2048"),
    ],
)
def test_bad_inputs_name_the_place(value, fragment):
    with pytest.raises(ApiError) as caught:
        v.parse_inputs(value, LIMITS)
    assert caught.value.status == 400 and caught.value.param == "input"
    assert fragment in caught.value.message


def test_model_encoding_and_dimensions():
    assert v.check_model({}, LIMITS) == "m"
    assert v.check_model({"model": "/path/m"}, LIMITS) == "m"
    with pytest.raises(ApiError) as caught:
        v.check_model({"model": "other"}, LIMITS)
    assert caught.value.status == 404 and caught.value.code == "model_not_found"
    assert v.check_encoding_format({"encoding_format": "base64"}) == "base64"
    with pytest.raises(ApiError):
        v.check_encoding_format({"encoding_format": "int8"})
    assert v.check_dimensions({"dimensions": 8}, LIMITS) == 8
    for bad in (0, 9, 2.5, True, "4"):
        with pytest.raises(ApiError):
            v.check_dimensions({"dimensions": bad}, LIMITS)


def test_body_must_be_a_json_object():
    assert v.parse_json_object(b'{"input": "x"}') == {"input": "x"}
    for body in (b"", b"[1]", b"{oops", b"\xff\xfe"):
        with pytest.raises(ApiError) as caught:
            v.parse_json_object(body)
        assert caught.value.status == 400
    for not_utf8 in ('{"input": "café"}'.encode("latin-1"), '{"input": "x"}'.encode("utf-16")):
        with pytest.raises(ApiError) as caught:
            v.parse_json_object(not_utf8)
        assert "not UTF-8" in caught.value.message and "surrogates" not in caught.value.message


def test_encode_fields_name_only_the_forms_they_take():
    with pytest.raises(ApiError) as ids_only:
        v.parse_inputs(5, LIMITS, param="input_ids", allow_text=False)
    assert "string" not in ids_only.value.message and "token ids" in ids_only.value.message
    with pytest.raises(ApiError) as text_only:
        v.parse_inputs(5, LIMITS, param="text", allow_ids=False)
    assert "token ids" not in text_only.value.message and "list of strings" in text_only.value.message


def _nested(depth: int, leaf: object = 1) -> object:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize(
    "value", [_nested(300), [1, _nested(300)], [[1], [1, _nested(300)]], [{"a": _nested(300)}]]
)
def test_a_value_nested_past_what_orjson_writes_is_a_400_not_a_crash(value):
    with pytest.raises(ApiError) as caught:
        v.parse_inputs(value, LIMITS)
    assert caught.value.status == 400 and caught.value.param == "input"
    assert "nested too deeply" in caught.value.message or "[[[[" in caught.value.message


def test_error_messages_quote_at_most_the_start_of_a_bad_value():
    huge = "x" * 1_000_000
    for check in (
        lambda: v.check_encoding_format({"encoding_format": huge}),
        lambda: v.check_dimensions({"dimensions": [7] * 100_000}, LIMITS),
        lambda: v.check_model({"model": huge}, LIMITS),
        lambda: v.parse_inputs([1, huge], LIMITS),
    ):
        with pytest.raises(ApiError) as caught:
            check()
        assert len(caught.value.message) < 300 and "..." in caught.value.message
