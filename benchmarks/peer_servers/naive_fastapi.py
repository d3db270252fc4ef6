"""The server a user writes in thirty lines: FastAPI + onnxruntime, one Session.run per request.

A plain `def` route, as FastAPI's docs advise for blocking calls: it runs in Starlette's thread
pool, so several requests can be inside onnxruntime at once (it releases the GIL). Access
logging is off, as it is in ctr-serve.
"""

from __future__ import annotations

import numpy as np
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from benchmarks.peer_servers.ort_session import parser, score, session


class ScoreRequest(BaseModel):
    tokens: list[list[int]]


def build_app(model_path: str) -> FastAPI:
    app = FastAPI()
    sess = session(model_path)

    @app.post("/score")
    def score_route(req: ScoreRequest) -> dict:
        return {"scores": score(sess, np.asarray(req.tokens, dtype=np.int64)).tolist()}

    return app


def main() -> None:
    args = parser(__doc__).parse_args()
    uvicorn.run(build_app(args.model), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
