"""The servers `benchmarks/peers.py` compares ctr-serve with, one small module each.

Each module is what a user would write to put an exported `model.onnx` behind that server,
run as `python -m benchmarks.peer_servers.<module> --model PATH --port P ...`. They take
pre-encoded int64 tokens (a user of a generic model server encodes on the client), so they
do less work per request than ctr-serve, which fetches features and encodes raw requests.
This registry is importable without any peer installed: `extra` names the package that
`pip install '.[peers]'` brings for it, or, for PyTriton, its own virtualenv holds
(`python -m venv .venv-pytriton && .venv-pytriton/bin/pip install nvidia-pytriton onnxruntime`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Peer:
    name: str
    module: str
    path: str  # the scoring route a client POSTs to
    body: Literal["tokens", "kserve"]  # {"tokens": [[...]]} or the KServe v2 / Triton JSON
    batching: str  # how it batches, as the table says it
    extra: str | None = None  # import name that must be present (None: the project's own deps)
    # "rows": the batcher caps batches in rows, like ctr-serve (one launch per model);
    # "requests": it caps in requests, so it is relaunched per request size with the same row cap.
    batch_unit: Literal["rows", "requests", "none"] = "rows"
    # A virtualenv (relative to the repository root) the server runs from instead of the
    # project's, for a peer whose pins cannot share the project's environment.
    venv: str | None = None


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("naive", "benchmarks.peer_servers.naive_fastapi", "/score", "tokens", "none (one Session.run per request)", None, "none"),
        Peer("pytriton", "benchmarks.peer_servers.pytriton_batcher", "/v2/models/ctr/infer", "kserve", "Triton dynamic batcher", "pytriton",
             venv=".venv-pytriton"),
        Peer("litserve", "benchmarks.peer_servers.litserve_batch", "/score", "tokens", "LitServe max_batch_size", "litserve", "requests"),
        Peer("ray-serve", "benchmarks.peer_servers.ray_serve_batch", "/score", "tokens", "Ray Serve @serve.batch", "ray.serve"),
    )
}
