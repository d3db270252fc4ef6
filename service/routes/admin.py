"""Administration: hot reload, behind a bearer token read from the environment."""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.errors import BadRequest, NotFound, Unauthorized, json_response
from service.registry import UnknownModel

router = APIRouter(tags=["admin"])


class ReloadRequest(msgspec.Struct, forbid_unknown_fields=True):
    variant: str | None = None
    version: int | None = None


_reload_decoder = msgspec.json.Decoder(ReloadRequest)


@router.post(
    "/admin/reload",
    responses={
        200: {"description": "every target loaded or unchanged"},
        401: {"description": "missing or invalid bearer token"},
        404: {"description": "unknown variant"},
        409: {"description": "a version failed to load; the old one keeps serving"},
        422: {"description": "invalid body"},
    },
)
async def admin_reload(request: Request) -> Response:
    """Load the newest (or a given) version; needs `Authorization: Bearer $CTR_ADMIN_TOKEN`."""
    svc = request.app.state.service
    token = svc.cfg.admin_token
    given = request.headers.get("authorization", "")
    if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Unauthorized()
    body = await request.body()
    args: Any = ReloadRequest()
    if body.strip():
        try:
            args = _reload_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise BadRequest.at(["body"], str(exc), "json_invalid") from None
        except msgspec.ValidationError as exc:
            raise BadRequest.at(["body"], f"expected {{variant?, version?}}: {exc}") from None
    try:
        results = await svc.registry.reload(args.variant, args.version)
    except UnknownModel as exc:
        raise NotFound(f"unknown variant '{exc}'") from None
    failed = any(r.get("result") == "failed" for r in results)
    return json_response(409 if failed else 200, {"results": results, "models": svc.registry.describe()})
