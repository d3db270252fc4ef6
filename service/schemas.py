"""Request and response bodies for POST /score.

Raw feature values are JSON scalars (str, int, float, bool or null): the FeatureSpec
normalises them, so "77", 77 and 77.0 are one category. Nested objects are refused with
the field path, because the spec could not encode them anyway.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Scalar = str | int | float | bool | None
Id = Annotated[str, StringConstraints(min_length=1, max_length=256)] | int


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: Id
    features: dict[str, Scalar] | None = None


class ScoreRequest(BaseModel):
    """One ranking call: a user, its context and the candidate items to score."""

    model_config = ConfigDict(extra="forbid")

    request_id: Annotated[str, StringConstraints(max_length=128)] | None = None
    user_id: Id
    context: dict[str, Scalar] = Field(default_factory=dict)
    items: list[Item] = Field(min_length=1)
    variant: Annotated[str, StringConstraints(max_length=64)] | None = None


class ScoreResponse(BaseModel):
    request_id: str
    model: str
    version: int
    variant: str
    scores: list[float]
    degraded: bool = False


class ErrorBody(BaseModel):
    detail: str | list[dict]
