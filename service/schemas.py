"""Request and response bodies of POST /score, decoded by msgspec straight from bytes.

msgspec validates while it decodes, in one pass with no intermediate dicts: 8 µs for a
100-item body against 210 µs for pydantic's `model_validate_json` on the same schema
(benchmarks/parsing.py; 19-26x at 10 to 500 items).
The structs also give the OpenAPI schema (`openapi_components`), so the docs and the parser
cannot disagree.

Ids are opaque: any JSON string (1..256 chars) or integer, uint64 and beyond included. They
are looked up and hashed as strings, so an integer id outside int64 is kept as its decimal
string (the spec treats 77 and "77" as one category already). A boolean is not an id.

Feature and context values are JSON scalars (str, int, float, bool or null): the FeatureSpec
normalises them, so "77", 77 and 77.0 are one category. Integers outside int64 and
non-finite numbers (`NaN`, `Infinity`, `1e999`) could not be encoded and are refused here with
their field path, as are nested objects.

Errors are 422s with FastAPI's field paths (`["body", "items", 3, "item_id"]`); msgspec
reports `$.items[3].item_id` and `[...]` for a map value, so the path is converted, and a
map key is found again in the body (only on the error path).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta, Struct

from service.errors import BadRequest

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_FLOAT_MAX = 1.7976931348623157e308  # a finite bound also refuses NaN (every comparison fails)

Int64 = Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)]
Finite = Annotated[float, Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]
Scalar = Union[str, Int64, Finite, bool, None]
IdText = Annotated[str, Meta(min_length=1, max_length=256)]
# The hot path decodes ids as str | int64 (an int64 id needs no conversion); a body that fails
# is decoded again with unbounded integer ids, which are then made strings.
Id = Union[IdText, int]
_Id64 = Union[IdText, Int64]
RequestId = Annotated[str, Meta(max_length=128)]
Variant = Annotated[str, Meta(max_length=64)]
Features = dict[str, Scalar]


class Item(Struct, forbid_unknown_fields=True):
    """One candidate: its id and, optionally, features that override the stored ones."""

    item_id: Id
    features: Union[Features, None] = None


class ScoreRequest(Struct, forbid_unknown_fields=True):
    """One ranking call: a user, its context and the candidate items to score."""

    user_id: Id
    items: Annotated[list[Item], Meta(min_length=1)]
    context: Features = {}
    request_id: Union[RequestId, None] = None
    variant: Union[Variant, None] = None


class _Item64(Struct, forbid_unknown_fields=True):
    item_id: _Id64
    features: Union[Features, None] = None


class _Request64(Struct, forbid_unknown_fields=True):
    user_id: _Id64
    items: Annotated[list[_Item64], Meta(min_length=1)]
    context: Features = {}
    request_id: Union[RequestId, None] = None
    variant: Union[Variant, None] = None


class ScoreResponse(Struct):
    request_id: str
    model: str
    version: int
    variant: str
    scores: list[float]
    degraded: bool = False


_fast = msgspec.json.Decoder(_Request64)
_wide = msgspec.json.Decoder(ScoreRequest)


def parse_request(body: bytes, max_items: int) -> ScoreRequest | _Request64:
    """The request in `body`, or BadRequest (422) naming the first bad field."""
    try:
        req = _fast.decode(body)
    except msgspec.ValidationError:
        req = _parse_wide(body)
    except msgspec.DecodeError as exc:
        raise _malformed(body, exc) from None
    if len(req.items) > max_items:
        raise BadRequest.at(["body", "items"], f"at most {max_items} items", "too_long")
    return req


def _parse_wide(body: bytes) -> ScoreRequest:
    """Second pass for a body the fast decoder refused: integer ids beyond int64 are valid."""
    try:
        req = _wide.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid(body, exc) from None
    req.user_id = _opaque(req.user_id)
    for it in req.items:
        it.item_id = _opaque(it.item_id)
    return req


def _opaque(value: Any) -> Any:
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        return str(value)
    return value


# ---------------------------------------------------------------- error paths (cold)
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.S)
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[\.\.\.\]")
_FIELD = re.compile(r"(unknown|missing required) field `([^`]*)`")


_UNREAD = object()


def _invalid(body: bytes, exc: msgspec.ValidationError, doc: Any = _UNREAD) -> BadRequest:
    m = _AT.match(str(exc))
    msg, path = (m.group("msg"), m.group("path") or "$") if m else (str(exc), "$")
    loc: list[Any] = ["body"]
    node = None if doc is _UNREAD else doc
    for step in _STEP.finditer(path[1:]):
        name, index = step.group(1), step.group(2)
        if name is not None:
            loc.append(name)
            node = node.get(name) if isinstance(node, dict) else None
        elif index is not None:
            loc.append(int(index))
            node = node[int(index)] if isinstance(node, list) and int(index) < len(node) else None
        else:  # a map value: msgspec does not say which key, so find the first bad one
            if doc is _UNREAD:
                return _invalid(body, exc, _lenient(body))
            key = _bad_key(node)
            if key is None:
                break
            loc.append(key)
            node = node[key]
    field = _FIELD.search(msg)
    if field:
        loc.append(field.group(2))
    if "out of range" in msg or "`float` >=" in msg or "`float` <=" in msg:
        msg = "expected a finite number (NaN, Infinity and overflowing values cannot be encoded)"
    kind = "extra_forbidden" if "unknown field" in msg else "missing" if "missing required" in msg else "value_error"
    return BadRequest.at(loc, msg, kind)


def _bad_key(node: Any) -> str | None:
    if not isinstance(node, dict):
        return None
    for key, value in node.items():
        try:
            msgspec.convert(value, Scalar, strict=True)
        except msgspec.ValidationError:
            return key
    return None


def _lenient(body: bytes) -> Any:
    """The body as plain Python values, NaN/Infinity literals and big integers allowed."""
    from pydantic_core import from_json

    try:
        return from_json(body, allow_inf_nan=True)
    except ValueError:
        return None


def _malformed(body: bytes, exc: msgspec.DecodeError) -> BadRequest:
    """Not JSON. If only non-standard number literals (NaN, Infinity) broke it, the field that
    holds one is named, as for any other non-finite number."""
    doc = _lenient(body)
    if doc is not None:
        try:
            msgspec.convert(doc, ScoreRequest, strict=True)
        except msgspec.ValidationError as inner:
            return _invalid(body, inner, doc)
    text = str(exc)
    at = re.search(r"\(byte (\d+)\)", text)
    return BadRequest.at(["body", int(at.group(1))] if at else ["body"], text, "json_invalid")


def openapi_components(ref_template: str = "#/components/schemas/{name}") -> dict[str, Any]:
    """JSON schemas of ScoreRequest (and its Item) and ScoreResponse for the OpenAPI document."""
    _, components = msgspec.json.schema_components([ScoreRequest, ScoreResponse], ref_template=ref_template)
    return components
