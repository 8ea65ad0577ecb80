"""Who is calling: the API key of a request, turned into its tenant."""

from __future__ import annotations

from fastapi import Request

from hutch.api.deps import control_plane
from hutch.metadb.records import Tenant


def api_key_of(headers) -> str | None:
    """`X-API-Key` (E2B's SDKs send `X-API-KEY`) or `Authorization: Bearer <key>`."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    authorization = headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


async def caller(request: Request) -> Tenant:
    """FastAPI dependency: the authenticated tenant (401 otherwise)."""
    plane = control_plane(request)
    return await plane.tenants.authenticate(api_key_of(request.headers))
