"""Turns a request body into pipeline inputs, or into a 400 that names the field, the index and the limit.

The body is parsed as JSON whatever its Content-Type, because the seed's own curl example
(`curl -d '{...}'`) sends `application/x-www-form-urlencoded`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from embedserve.http.errors import ApiError, invalid

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
SHOWN_CHARS = 40  # of a bad value, quoted in its error message


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    hidden_size: int
    model_names: frozenset[str]
    served_name: str


@dataclass
class ParsedInputs:
    texts: list[str] | None = None
    token_ids: bytes | None = None  # int32 little-endian, inputs concatenated
    token_lengths: list[int] | None = None
    single: bool = False  # one bare input (a string, or one flat list of ids)

    @property
    def count(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.token_lengths or [])


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # NOTE: orjson names any undecodable body (Latin-1, UTF-16, gzip) "surrogates not allowed".
        reason = "it is not UTF-8" if "not valid UTF-8" in str(exc) else str(exc)
        raise invalid(
            f"The request body is not valid JSON: {reason}", param=None, code="invalid_json"
        ) from exc
    if not isinstance(data, dict):
        raise invalid("The request body must be a JSON object.", param=None)
    return data


def check_model(data: dict[str, Any], limits: Limits) -> str:
    model = data.get("model")
    if model is None:
        return limits.served_name
    if not isinstance(model, str):
        raise invalid("'model' must be a string.", param="model")
    if model not in limits.model_names:
        raise ApiError(
            404,
            f"The model '{shown(model)}' does not exist. This server serves '{limits.served_name}'.",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    return limits.served_name


def check_encoding_format(data: dict[str, Any]) -> str:
    fmt = data.get("encoding_format")
    if fmt is None:
        return "float"
    if fmt not in ("float", "base64"):
        raise invalid(
            f"'encoding_format' must be 'float' or 'base64', got {_as_json(fmt)}.", param="encoding_format"
        )
    return fmt


def check_dimensions(data: dict[str, Any], limits: Limits) -> int | None:
    dims = data.get("dimensions")
    if dims is None:
        return None
    if not _is_int(dims) or not 1 <= dims <= limits.hidden_size:
        raise invalid(
            f"'dimensions' must be an integer from 1 to {limits.hidden_size} (the model's embedding "
            f"size), got {_as_json(dims)}.",
            param="dimensions",
        )
    return dims


def check_rid(data: dict[str, Any], inputs: ParsedInputs) -> list[str] | None:
    """SGLang's `rid` on /encode, one per input: a string for one input, a list for a batch."""
    rid = data.get("rid")
    if rid is None:
        return None
    if inputs.single:
        if not isinstance(rid, str):
            raise invalid("'rid' must be a string for a single input.", param="rid")
        return [rid]
    if not isinstance(rid, list) or len(rid) != inputs.count or not all(isinstance(r, str) for r in rid):
        raise invalid(f"'rid' must be a list of {inputs.count} strings, one per input.", param="rid")
    return rid


def check_user(data: dict[str, Any]) -> None:
    if data.get("user") is not None and not isinstance(data["user"], str):
        raise invalid("'user' must be a string.", param="user")


def parse_inputs(
    value: Any, limits: Limits, param: str = "input", allow_text: bool = True, allow_ids: bool = True
) -> ParsedInputs:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if value is None:
        raise invalid(f"'{param}' is required and must not be null.", param=param)
    if isinstance(value, str):
        return _texts([value], param, allow_text, single=True)
    if not isinstance(value, list):
        forms = (["a string", "a list of strings"] if allow_text else []) + (
            ["a list of token ids", "a list of lists of token ids"] if allow_ids else []
        )
        raise invalid(
            f"'{param}' must be {_one_of(forms)}; got {type(value).__name__}.",
            param=param,
        )
    if not value:
        raise invalid(f"'{param}' must not be empty.", param=param)
    first = value[0]
    if isinstance(first, str):
        return _texts(value, param, allow_text, single=False)
    if _is_int(first):
        return _token_ids([value], limits, param, allow_ids, single=True)
    if isinstance(first, list):
        return _token_ids(value, limits, param, allow_ids, single=False)
    forms = (["a string"] if allow_text else []) + (
        ["a token id", "a list of token ids"] if allow_ids else []
    )
    raise invalid(
        f"'{param}[0]' must be {_one_of(forms)}; got {_as_json(first)}.",
        param=param,
    )


def _texts(values: list[Any], param: str, allowed: bool, single: bool) -> ParsedInputs:
    if not allowed:
        raise invalid(f"'{param}' takes token ids, not text.", param=param)
    _check_count(len(values), param)
    for i, text in enumerate(values):
        if not isinstance(text, str):
            raise invalid(
                f"'{param}[{i}]' must be a string like the other inputs; got {type(text).__name__}. "
                "Mixed input types are not allowed.",
                param=param,
            )
        if not text:
            where = param if single else f"{param}[{i}]"
            raise invalid(f"'{where}' is an empty string; every input must have text.", param=param)
    return ParsedInputs(texts=list(values), single=single)


def _token_ids(lists: list[Any], limits: Limits, param: str, allowed: bool, single: bool) -> ParsedInputs:
    if not allowed:
        raise invalid(f"'{param}' takes text, not token ids.", param=param)
    _check_count(len(lists), param)
    arrays = [_one_id_list(ids, i, limits, param, single) for i, ids in enumerate(lists)]
    return ParsedInputs(
        token_ids=np.concatenate(arrays).astype("<i4").tobytes(),
        token_lengths=[int(a.size) for a in arrays],
        single=single,
    )


def _one_id_list(ids: Any, i: int, limits: Limits, param: str, single: bool) -> np.ndarray:
    where = param if single else f"{param}[{i}]"
    if not isinstance(ids, list) or not ids:
        raise invalid(
            f"'{where}' must be a non-empty list of token ids like the other inputs. "
            "Mixed input types are not allowed.",
            param=param,
        )
    if not all(_is_int(t) for t in ids):
        bad = next(j for j, t in enumerate(ids) if not _is_int(t))
        raise invalid(
            f"'{where}[{bad}]' must be an integer token id; got {_as_json(ids[bad])}.",
            param=param,
        )
    array = np.asarray(ids, dtype=np.int64) if max(ids) < 2**63 and min(ids) >= -(2**63) else None
    if array is None or array.min() < 0 or array.max() >= limits.vocab_size:
        bad = next(j for j, t in enumerate(ids) if not 0 <= t < limits.vocab_size)
        raise invalid(
            f"'{where}[{bad}]' = {ids[bad]} is not a token id of this model (valid: 0 to "
            f"{limits.vocab_size - 1}).",
            param=param,
            code="invalid_token_id",
        )
    return array


def _check_count(n: int, param: str) -> None:
    if n > MAX_INPUTS:
        raise invalid(f"'{param}' has {n} inputs; at most {MAX_INPUTS} are allowed per request.", param=param)


def _one_of(forms: list[str]) -> str:
    """ "a, b or c" (or "a" alone)."""
    return " or ".join([", ".join(forms[:-1]), forms[-1]]) if len(forms) > 1 else forms[0]


def _as_json(x: Any) -> str:
    """The start of a value as the client wrote it (roughly: orjson reads integers past 64 bits as floats)."""
    try:
        return shown(orjson.dumps(x).decode())
    except TypeError:  # NOTE: orjson writes at most 254 levels of nesting; its parser reads deeper
        return "a value nested too deeply to show"


def shown(text: str) -> str:
    """A client's value cut for an error message: an error must not grow with the request."""
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
