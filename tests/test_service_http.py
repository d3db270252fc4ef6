"""The HTTP contract of the request path: strict input, typed errors, request ids, health
routes, offline docs, slow and vanishing clients. Real uvicorn on loopback, real onnxruntime
sessions of tiny real models, the embedded feature store."""

from __future__ import annotations

import logging
import re
import socket
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.app import create_app
from tests.service_support import config, metric_value, offline_scores, request_body
from tests.testing import ServerThread, publish, tiny_package

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def repo(synth_spec, tmp_path_factory):
    root = tmp_path_factory.mktemp("http") / "models"
    _, weights = tiny_package(root, "synth", 1, synth_spec, seed=1)
    return root, weights


@pytest.fixture(scope="module")
def server(repo, synth_dir):
    cfg = config(repo[0], synth_dir, limits={"body_timeout_s": 0.5})
    with ServerThread(create_app(cfg)) as srv:
        yield srv


def post(srv, body: bytes, headers=JSON, **kw):
    return httpx.post(srv.url + "/score", content=body, headers=headers, **kw)


# ---------------------------------------------------------------- media type
@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "text/plain"},
        {},
        {"content-type": "application/x-www-form-urlencoded"},
        {"content-type": "application/json; charset=latin-1"},
        {"content-type": "application/json", "content-encoding": "gzip"},
        {"content-type": "application/json", "content-encoding": "br"},
    ],
)
def test_not_plain_json_is_415(server, headers):
    r = post(server, b'{"user_id": "u1", "items": [{"item_id": "i1"}]}', headers=headers)
    assert r.status_code == 415, r.text
    assert "detail" in r.json() and r.headers["x-request-id"]


@pytest.mark.parametrize("headers", [{"content-type": "application/json; charset=utf-8"}, {"content-type": "Application/JSON"},
                                     {"content-type": "application/json", "content-encoding": "identity"}])
def test_json_variants_are_accepted(server, headers):
    assert post(server, b'{"user_id": "u1", "items": [{"item_id": "i1"}]}', headers=headers).status_code == 200


# ---------------------------------------------------------------- strict values
@pytest.mark.parametrize(
    "body, loc",
    [
        (b'{"user_id": true, "items": [{"item_id": "i1"}]}', ["body", "user_id"]),
        (b'{"user_id": "u1", "items": [{"item_id": "i1"}, {"item_id": false}]}', ["body", "items", 1, "item_id"]),
        (b'{"user_id": "", "items": [{"item_id": "i1"}]}', ["body", "user_id"]),
        (b'{"user_id": "u1", "context": {"hour": NaN}, "items": [{"item_id": "i1"}]}', ["body", "context", "hour"]),
        (b'{"user_id": "u1", "context": {"hour": -Infinity}, "items": [{"item_id": "i1"}]}', ["body", "context", "hour"]),
        (b'{"user_id": "u1", "context": {"hour": 1e999}, "items": [{"item_id": "i1"}]}', ["body", "context", "hour"]),
        (b'{"user_id": "u1", "context": {"hour": 9223372036854775808}, "items": [{"item_id": "i1"}]}', ["body", "context", "hour"]),
        (b'{"user_id": "u1", "context": {"device": "ios", "hour": -9223372036854775809}, "items": [{"item_id": "i1"}]}', ["body", "context", "hour"]),
        (b'{"user_id": "u1", "items": [{"item_id": "i1"}, {"item_id": "i2", "features": {"item_price": 1, "x": 18446744073709551616}}]}',
         ["body", "items", 1, "features", "x"]),
        (b'{"user_id": "u1", "items": [{"item_id": "i1", "features": {"item_price": Infinity}}]}', ["body", "items", 0, "features", "item_price"]),
        (b'{"user_id": "u1", "items": [{"item_id": "i1", "zz": 1}]}', ["body", "items", 0, "zz"]),
    ],
)
def test_bad_values_are_422_with_the_field_path(server, body, loc):
    r = post(server, body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == loc, r.json()


def test_integer_ids_are_opaque_even_beyond_int64(server, repo, synth_dir, synth_spec):
    """uint64 and larger integer ids score like the same ids sent as strings."""
    big = [2**64 - 1, 2**63, -(2**63) - 1, 10**30, 7]
    as_int = {"user_id": 2**64 - 1, "context": {"device": "ios"}, "items": [{"item_id": i} for i in big]}
    as_str = {"user_id": str(2**64 - 1), "context": {"device": "ios"}, "items": [{"item_id": str(i)} for i in big]}
    r1, r2 = httpx.post(server.url + "/score", json=as_int), httpx.post(server.url + "/score", json=as_str)
    assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
    assert r1.json()["scores"] == r2.json()["scores"]
    np.testing.assert_allclose(r1.json()["scores"], offline_scores(synth_spec, repo[1], synth_dir, as_str), atol=1e-6)


def test_valid_values_still_score(server, repo, synth_dir, synth_spec):
    body = request_body(synth_dir, n_items=5, seed=3)
    body["items"][0]["features"] = {"item_price": 1.7976931348623157e308, "item_category": None, "flag": True}
    body["items"][1]["features"] = {"item_price": -(2**63), "item_brand": 2**63 - 1}
    r = httpx.post(server.url + "/score", json=body)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["scores"], offline_scores(synth_spec, repo[1], synth_dir, body), atol=1e-6)


# ---------------------------------------------------------------- request id
def test_request_id_from_header_body_or_made(server, synth_dir):
    body = request_body(synth_dir, n_items=3)
    r = httpx.post(server.url + "/score", json=body | {"request_id": None}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and r.json()["request_id"] == "abc-123"
    r = httpx.post(server.url + "/score", json=body | {"request_id": "from-body"})
    assert r.headers["x-request-id"] == "from-body" and r.json()["request_id"] == "from-body"
    r = httpx.post(server.url + "/score", json=body | {"request_id": None})
    made = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made) and r.json()["request_id"] == made
    r = httpx.post(server.url + "/score", json=body | {"request_id": None}, headers={"X-Request-ID": "bad id with spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    # errors and the other routes carry it too
    assert post(server, b"{", headers={**JSON, "X-Request-ID": "e1"}).headers["x-request-id"] == "e1"
    assert httpx.post(server.url + "/score", json=body | {"variant": "nope"}, headers={"X-Request-ID": "e2"}).headers["x-request-id"] == "e2"
    assert httpx.get(server.url + "/healthz", headers={"X-Request-ID": "h1"}).headers["x-request-id"] == "h1"
    assert httpx.get(server.url + "/no-such-route").headers["x-request-id"]


# ---------------------------------------------------------------- health
def test_open_inference_protocol_health(repo, synth_dir):
    with ServerThread(create_app(config(repo[0], synth_dir))) as srv:
        assert httpx.get(srv.url + "/v2/health/live").json() == {"live": True}
        r = httpx.get(srv.url + "/v2/health/ready")
        assert r.status_code == 200 and r.json() == {"ready": True}
        srv.app.state.service.lifecycle.begin_drain()
        r = httpx.get(srv.url + "/v2/health/ready")
        assert r.status_code == 400 and r.json() == {"ready": False}
        assert httpx.get(srv.url + "/readyz").status_code == 503
        assert httpx.get(srv.url + "/v2/health/live").status_code == 200


def test_readiness_check_that_raises_means_not_ready(repo, synth_dir):
    with ServerThread(create_app(config(repo[0], synth_dir))) as srv:
        async def broken() -> bool:
            raise ConnectionError("store gone")

        srv.app.state.service.checks["store"] = broken
        r = httpx.get(srv.url + "/readyz")
        assert r.status_code == 503 and r.json()["store"] is False


# ---------------------------------------------------------------- docs
def test_docs_are_served_from_local_assets(server):
    for page in ("/docs", "/redoc"):
        html = httpx.get(server.url + page).text
        refs = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
        assert refs, html
        assert not [u for u in refs if re.match(r"(https?:)?//", u)], refs
        assert not re.search(r"https?://", html), "the page names an external host"
        for u in refs:
            if u.startswith("/docs/assets/"):
                assert httpx.get(server.url + u).status_code == 200, u


def test_openapi_documents_the_score_contract(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    comps = spec["components"]["schemas"]
    assert {"ScoreRequest", "Item", "ScoreResponse"} <= set(comps)
    assert comps["ScoreRequest"]["properties"]["items"]["items"] == {"$ref": "#/components/schemas/Item"}
    score = spec["paths"]["/score"]["post"]
    assert score["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ScoreRequest"}
    assert {"200", "404", "413", "415", "422", "500", "503"} <= set(score["responses"])
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics", "/admin/reload"):
        assert path in spec["paths"], path


# ---------------------------------------------------------------- slow and vanishing clients
def _raw(port: int, head: bytes, body_part: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head + body_part)
    return s


def _head(length: int) -> bytes:
    return b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length


def test_slow_body_is_408_and_closed(server):
    s = _raw(server.port, _head(200), b'{"user_id": "u1", ')
    try:
        data = b""
        while True:  # read until the server closes the connection
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"x-request-id" in data.lower()
    m = httpx.get(server.url + "/metrics").text
    assert metric_value(m, "ctr_request_seconds_count", status="408") >= 1


def test_client_leaving_mid_body_is_counted_not_logged(server):
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                seen.append(record)

    handler = Keep()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "uvicorn", "service", "")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        before = metric_value(httpx.get(server.url + "/metrics").text, "ctr_client_disconnects_total")
        for _ in range(3):
            s = _raw(server.port, _head(5000), b'{"user_id": "u1", "items": [')
            time.sleep(0.05)
            s.close()
        deadline = time.monotonic() + 10
        while metric_value(httpx.get(server.url + "/metrics").text, "ctr_client_disconnects_total") - before < 3:
            assert time.monotonic() < deadline, "disconnects not counted"
            time.sleep(0.05)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert not seen, [r.getMessage() for r in seen]
    m = httpx.get(server.url + "/metrics").text
    assert metric_value(m, "ctr_request_seconds_count", status="500") == 0


def test_declared_oversized_body_is_413_before_reading(repo, synth_dir):
    cfg = config(repo[0], synth_dir, limits={"max_body_bytes": 4096})
    with ServerThread(create_app(cfg)) as srv:
        s = _raw(srv.port, _head(10_000_000), b"{")  # the body never comes; the answer must not wait for it
        try:
            data = s.recv(65536)
        finally:
            s.close()
        assert data.startswith(b"HTTP/1.1 413"), data[:200]


# ---------------------------------------------------------------- unexpected errors
def _failing_onnx(num_fields: int, trigger: int, path: Path) -> None:
    """A real graph that scores 0.5 but fails at run time (a Reshape to twice the batch) when
    the first row's first token is `trigger`: the package verifier's smoke run and the
    warm-up pass, and a request from the trigger user hits an onnxruntime error."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = numpy_helper.from_array
    nodes = [
        helper.make_node("Cast", ["tokens"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "zero"], ["x0"]),
        helper.make_node("ReduceSum", ["x0", "axis1"], ["logit"], keepdims=0),
        helper.make_node("Sigmoid", ["logit"], ["p"]),
        helper.make_node("Shape", ["p"], ["n"]),
        helper.make_node("Slice", ["tokens", "start", "end"], ["first2d"]),
        helper.make_node("Reshape", ["first2d", "one"], ["first"]),
        helper.make_node("Equal", ["first", "trigger"], ["hit"]),
        helper.make_node("Cast", ["hit"], ["hit64"], to=TensorProto.INT64),
        helper.make_node("Add", ["hit64", "one"], ["factor"]),
        helper.make_node("Mul", ["n", "factor"], ["shape"]),
        helper.make_node("Reshape", ["p", "shape"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes, "fails_for_one_user",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", num_fields])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch"])],
        initializer=[
            c(np.zeros(1, np.float32), "zero"), c(np.array([1], np.int64), "axis1"), c(np.array([1], np.int64), "one"),
            c(np.array([0, 0], np.int64), "start"), c(np.array([1, 1], np.int64), "end"), c(np.array([trigger], np.int64), "trigger"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_unexpected_error_is_json_500_with_request_id_and_counted(synth_spec, synth_dir, tmp_path):
    from export.package import random_valid_tokens

    body = request_body(synth_dir, n_items=4, user_index=3)
    trigger = int(synth_spec.encode({"user_id": [body["user_id"]]}, strict=False)[0, 0])
    assert trigger != random_valid_tokens(synth_spec, 4, np.random.default_rng(0))[0, 0]  # the verifier's smoke rows pass
    root = tmp_path / "models"
    tiny_package(root, "good", 1, synth_spec, seed=1)
    with tempfile.TemporaryDirectory() as d:
        _failing_onnx(synth_spec.num_fields, trigger, Path(d) / "model.onnx")
        publish(root, "fragile", 1, synth_spec, Path(d) / "model.onnx", "fragile")
    cfg = config(root, synth_dir, variants=[{"name": "main", "model": "good", "weight": 1}, {"name": "fragile", "model": "fragile", "weight": 0}])
    with ServerThread(create_app(cfg)) as srv, httpx.Client(base_url=srv.url) as client:
        other = request_body(synth_dir, n_items=4, user_index=5) | {"variant": "fragile"}
        assert client.post("/score", json=other).json()["scores"] == [0.5] * 4  # the model works for others
        r = client.post("/score", json=body | {"variant": "fragile"}, headers={"X-Request-ID": "boom-1"})
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        assert r.json()["request_id"] == "boom-1" and r.headers["x-request-id"] == "boom-1"
        # the same keep-alive connection still serves
        assert client.post("/score", json=body).status_code == 200
        m = client.get("/metrics").text
        assert metric_value(m, "ctr_request_seconds_count", variant="fragile", status="500") == 1
