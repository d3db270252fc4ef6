"""Helpers for tests and benchmarks: small real ONNX models and an in-thread uvicorn server.

`tiny_package` writes a genuine model package (embedding-gather + sum + sigmoid graph,
executed by a real onnxruntime session), so service tests do not need torch or a training
run. `ServerThread` runs the real app under real uvicorn on a loopback port.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from model.spec import FeatureSpec


def load_script(path: str | Path, name: str) -> Any:
    """A script that is not a package module (benchmarks/*.py, deploy/grafana/dashboard.py),
    imported by path. It is registered in sys.modules first, as an import would be, so that
    dataclasses and typing in it can resolve their own module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_onnx(spec: FeatureSpec, path: str | Path, seed: int = 0, scale: float = 0.5) -> dict[str, np.ndarray]:
    """probability = sigmoid(bias + sum_f w_f[token_f]); returns the weights for reference."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sizes = np.array(spec.vocab_sizes, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal(int(sizes.sum())) * scale).astype(np.float32)
    bias = np.array([-1.0], dtype=np.float32)
    nodes = [
        helper.make_node("Add", ["tokens", "offsets"], ["flat_ids"]),
        helper.make_node("Gather", ["table", "flat_ids"], ["w"], axis=0),
        helper.make_node("ReduceSum", ["w", "axis1"], ["logit0"], keepdims=0),
        helper.make_node("Add", ["logit0", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_ctr",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", spec.num_fields])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch"])],
        initializer=[
            numpy_helper.from_array(offsets, "offsets"),
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(bias, "bias"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {"offsets": offsets, "table": table, "bias": bias}


def tiny_reference(weights: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    logit = weights["table"][tokens + weights["offsets"]].sum(axis=1) + weights["bias"][0]
    return (1.0 / (1.0 + np.exp(-logit.astype(np.float64)))).astype(np.float32)


def _io_metadata(num_fields: int) -> dict[str, Any]:
    return {
        "inputs": [{"name": "tokens", "dtype": "int64", "shape": ["batch", num_fields]}],
        "outputs": [{"name": "probability", "dtype": "float32", "shape": ["batch"]}],
    }


def publish(repo: str | Path, name: str, version: int, spec: FeatureSpec, onnx_file: str | Path, model_type: str) -> Path:
    """Publish an ONNX file as MODELS_DIR/NAME/VERSION through the exporter's own writer."""
    meta = {"model_type": model_type, "opset": 17, "io": _io_metadata(spec.num_fields)}
    try:
        from export.package import write_package
    except ImportError:  # the export package is not installed: same layout, written here
        final = Path(repo) / name / str(version)
        tmp = Path(repo) / name / f".tmp-{version}-{time.monotonic_ns()}"
        tmp.mkdir(parents=True)
        import shutil

        shutil.copy(onnx_file, tmp / "model.onnx")
        spec.save(tmp / "feature_spec.json")
        meta["onnx_sha256"] = hashlib.sha256((tmp / "model.onnx").read_bytes()).hexdigest()
        meta["num_fields"] = spec.num_fields
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=1))
        tmp.rename(final)
        return final
    return Path(write_package(repo, name, onnx_file, spec, meta, version=version).path)


def tiny_package(repo: str | Path, name: str, version: int, spec: FeatureSpec, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """Publish a tiny real model as MODELS_DIR/NAME/VERSION; returns its path and weights."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        weights = tiny_onnx(spec, Path(d) / "model.onnx", seed=seed)
        path = publish(repo, name, version, spec, Path(d) / "model.onnx", "tiny_linear")
    return path, weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """Real uvicorn on 127.0.0.1:<free port>, in a thread; a context manager that always stops."""

    def __init__(self, app: Any, port: int | None = None, start_timeout_s: float = 60.0) -> None:
        import uvicorn

        self.app = app
        self.port = port or free_port()
        self.config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.start_timeout_s = start_timeout_s

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError("uvicorn did not start (see the log for the lifespan error)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def dnn_onnx(spec: FeatureSpec, path: str | Path, emb_dim: int = 10, hidden: tuple[int, ...] = (400, 400, 400), seed: int = 0) -> None:
    """A DNN-shaped scorer (embeddings -> MLP -> sigmoid) with random weights.

    It has the compute cost of the reference DNN (10 fields, 400-400-400) without a training
    run, so serving benchmarks can run before, or independently of, the training pipeline.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    sizes = np.array(spec.vocab_sizes, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    f = spec.num_fields
    inits = [
        numpy_helper.from_array(offsets, "offsets"),
        numpy_helper.from_array((rng.standard_normal((int(sizes.sum()), emb_dim)) * 0.1).astype(np.float32), "emb"),
        numpy_helper.from_array(np.array([-1, f * emb_dim], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "out_shape"),
    ]
    nodes = [
        helper.make_node("Add", ["tokens", "offsets"], ["ids"]),
        helper.make_node("Gather", ["emb", "ids"], ["e"], axis=0),
        helper.make_node("Reshape", ["e", "flat_shape"], ["h0"]),
    ]
    width, x = f * emb_dim, "h0"
    for i, h in enumerate((*hidden, 1)):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, h)) / np.sqrt(width)).astype(np.float32), f"W{i}"))
        inits.append(numpy_helper.from_array(np.zeros(h, np.float32), f"b{i}"))
        nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"b{i}"], [f"z{i}"]))
        if h != 1:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [f"a{i}"]))
            x = f"a{i}"
        width = h
    nodes.append(helper.make_node("Reshape", [f"z{len(hidden)}", "out_shape"], ["logit"]))
    nodes.append(helper.make_node("Sigmoid", ["logit"], ["probability"]))
    graph = helper.make_graph(
        nodes,
        "dnn_ctr",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", f])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))

