"""PyTriton: the Triton Inference Server with its dynamic batcher, the model a Python callable.

Triton concatenates requests along the first (row) axis up to `max_batch_size` rows, waiting
at most `max_queue_delay_microseconds`: the same row cap and delay as ctr-serve's batcher.
Clients send the KServe v2 JSON body (`POST /v2/models/ctr/infer`).

It runs from its own virtualenv (`.venv-pytriton`: nvidia-pytriton and onnxruntime): the
Python backend stub that Triton ships is built against the NumPy 1 ABI, so nvidia-pytriton
pins numpy<2, which the project's pandas 3 cannot share an environment with. Under NumPy 2
every response fails with "output tensor shape does not match size of output". This module
needs nothing from the project but numpy and onnxruntime.
"""

from __future__ import annotations

import os
import signal
import sys
import sysconfig

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from benchmarks.peer_servers.ort_session import parser, score, session


def use_this_libpython() -> None:
    """Triton's Python stub links libpython3.X.so from the loader path; where the system holds
    an older patch release (Debian's 3.11.2) than the interpreter running this (whose stdlib
    the stub imports), the model fails to load. Put this interpreter's library first."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))


def main() -> None:
    args = parser(__doc__).parse_args()
    use_this_libpython()
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
