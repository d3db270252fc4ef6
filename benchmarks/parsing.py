"""Request parsing cost: msgspec (the service's parser) against pydantic `model_validate_json`.

    python benchmarks/parsing.py [--repeat 2000]

Prints microseconds per parse of a POST /score body with 10, 100 and 500 items (string ids,
a small context, every tenth item with feature overrides), best of five timed rounds. The
pydantic model is the schema the service used before msgspec, kept here as the baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.schemas import parse_request

Scalar = str | int | float | bool | None
Id = Annotated[str, StringConstraints(min_length=1, max_length=256)] | int


class PydItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: Id
    features: dict[str, Scalar] | None = None


class PydRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: Annotated[str, StringConstraints(max_length=128)] | None = None
    user_id: Id
    context: dict[str, Scalar] = Field(default_factory=dict)
    items: list[PydItem] = Field(min_length=1)
    variant: Annotated[str, StringConstraints(max_length=64)] | None = None


def body(n: int) -> bytes:
    items = [{"item_id": f"i{i:05d}"} | ({"features": {"item_price": 3.5, "item_category": "c1"}} if i % 10 == 0 else {}) for i in range(n)]
    return json.dumps({"request_id": "r1", "user_id": "u00042", "context": {"device": "ios", "hour": 9}, "items": items}).encode()


def per_parse_us(fn, data: bytes, repeat: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn(data)
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2000)
    args = ap.parse_args()
    print(f"{'items':>6} {'bytes':>7} {'pydantic µs':>12} {'msgspec µs':>11} {'speed-up':>9}")
    for n in (10, 100, 500):
        data = body(n)
        reps = max(50, args.repeat * 10 // n)
        assert len(parse_request(data, 1000).items) == len(PydRequest.model_validate_json(data).items) == n
        pyd = per_parse_us(PydRequest.model_validate_json, data, reps)
        ms = per_parse_us(lambda b: parse_request(b, 1000), data, reps)
        print(f"{n:>6} {len(data):>7} {pyd:>12.1f} {ms:>11.1f} {pyd / ms:>8.1f}x")


if __name__ == "__main__":
    main()
