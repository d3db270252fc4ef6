"""PyTriton: the Triton Inference Server with its dynamic batcher, the model a Python callable.

Triton concatenates requests along the first (row) axis up to `max_batch_size` rows, waiting
at most `max_queue_delay_microseconds`: the same row cap and delay as ctr-serve's batcher.
Clients send the KServe v2 JSON body (`POST /v2/models/ctr/infer`).
"""

from __future__ import annotations

import signal
import sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from benchmarks.peer_servers.ort_session import parser, score, session


def main() -> None:
    args = parser(__doc__).parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sess = session(args.model)

    @batch
    def infer(tokens: np.ndarray) -> dict[str, np.ndarray]:
        return {"probability": score(sess, tokens.astype(np.int64, copy=False)).reshape(-1, 1)}

    cfg = TritonConfig(http_address="127.0.0.1", http_port=args.port, grpc_address="127.0.0.1", grpc_port=args.port + 1,
                       metrics_port=args.port + 2, allow_metrics=False, log_verbose=0)
    with Triton(config=cfg) as triton:
        triton.bind(
            model_name="ctr",
            infer_func=infer,
            inputs=[Tensor(name="tokens", dtype=np.int64, shape=(-1,))],
            outputs=[Tensor(name="probability", dtype=np.float32, shape=(1,))],
            config=ModelConfig(max_batch_size=args.max_batch_rows,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=int(args.max_delay_ms * 1000))),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
