"""LitServe with its request batching: `max_batch_size` requests or `batch_timeout`, whichever first.

LitServe counts a batch in requests, so `max_batch_size` is set to the requests that make
`--max-batch-rows` rows at `--items` rows each: the same row cap as ctr-serve's batcher.
Requests of many rows each are concatenated (not stacked) and split back by length.
One inference worker (one onnxruntime session) and one API server process, like ctr-serve's
one process.
"""

from __future__ import annotations

import litserve as ls
import numpy as np

from benchmarks.peer_servers.ort_session import parser, score, session


class CTRAPI(ls.LitAPI):
    def __init__(self, model_path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_path = model_path

    def setup(self, device: str) -> None:
        self.sess = session(self.model_path)

    def decode_request(self, request: dict) -> np.ndarray:
        return np.asarray(request["tokens"], dtype=np.int64)

    def batch(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        return np.concatenate(inputs), [len(x) for x in inputs]

    def predict(self, x):
        if isinstance(x, tuple):
            tokens, sizes = x
            return np.split(score(self.sess, tokens), np.cumsum(sizes)[:-1])
        return score(self.sess, x)

    def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
        return output

    def encode_response(self, output: np.ndarray) -> dict:
        return {"scores": output.tolist()}


def main() -> None:
    args = parser(__doc__).parse_args()
    per_batch = max(1, args.max_batch_rows // args.items)
    api = CTRAPI(args.model, max_batch_size=per_batch, batch_timeout=args.max_delay_ms / 1000, api_path="/score")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
