"""Ray Serve with `@serve.batch`: one replica, batches capped in rows via `batch_size_fn`.

`batch_size_fn` counts each request by its rows, so `max_batch_size=--max-batch-rows` is the
same cap as ctr-serve's; `batch_wait_timeout_s` is ctr-serve's queue delay. The local Ray
instance is started without the dashboard and with a small object store (nothing large goes
through it). SIGTERM shuts Ray down so none of its processes outlive the benchmark.
"""

from __future__ import annotations

import signal
import sys
import time

import numpy as np
import ray
from ray import serve
from starlette.requests import Request

from benchmarks.peer_servers.ort_session import parser, score, session


def build(model_path: str, max_rows: int, delay_s: float):
    @serve.deployment(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
    class CTRModel:
        def __init__(self) -> None:
            self.sess = session(model_path)

        @serve.batch(max_batch_size=max_rows, batch_wait_timeout_s=delay_s, batch_size_fn=lambda reqs: sum(len(r) for r in reqs))
        async def score_batch(self, requests: list[np.ndarray]) -> list[list[float]]:
            out = score(self.sess, np.concatenate(requests))
            return [part.tolist() for part in np.split(out, np.cumsum([len(r) for r in requests])[:-1])]

        async def __call__(self, request: Request) -> dict:
            body = await request.json()
            return {"scores": await self.score_batch(np.asarray(body["tokens"], dtype=np.int64))}

    return CTRModel.bind()


def main() -> None:
    args = parser(__doc__).parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"log_level": "WARNING", "enable_access_log": False})
        serve.run(build(args.model, args.max_batch_rows, args.max_delay_ms / 1000), route_prefix="/score")
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
