"""E2B's control-plane API (`/sandboxes`, `/v2/sandboxes`, ...): an E2B sandbox is a hutch session."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["e2b"])
