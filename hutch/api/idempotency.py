"""`Idempotency-Key` on session creates (E2B's `POST /sandboxes` and the native
`POST /v1/functions/{name}/sessions`): a retried create gets the session the first one made.

The key lives in MetaDB (`claim_idempotency_key`), not in one process, so a retry that goes
through another `hutch gateway`, or comes after a restart, gets the same answer. Rules:

- A key belongs to a tenant and is kept `KEEP_S` (24 h) from its first use; the answer is the
  first create's session as it is now (ended, if it has ended since), never a second session.
- The same key with another request (another route or another body) is a 409.
- A retry that arrives while the first create is still running waits for it (up to `WAIT_S`,
  then a 409 that says so). A create that fails gives its key back, so a retry runs it again; a
  claim whose process died before settling is taken over after `ABANDONED_S`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hutch.errors import AlreadyExists
from hutch.metadb.base import MetaDB
from hutch.metadb.records import IdempotencyRecord, SessionRecord

KEEP_S = 24 * 3600.0
ABANDONED_S = 120.0  # longer than any create takes (a cold start with a network: well under a second)
WAIT_S = 30.0
POLL_S = 0.05


def request_hash(route: str, body: dict[str, Any]) -> str:
    """What a key was first used for: the route and the body, canonical JSON, hashed."""
    canonical = json.dumps([route, body], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def create_once(
    metadb: MetaDB,
    tenant_id: str,
    key: str | None,
    fingerprint: str,
    create: Callable[[], Awaitable[SessionRecord]],
) -> SessionRecord:
    """`create()` once per `(tenant, key)`; without a key, every time.

    Raises:
        AlreadyExists: the key was used for another request, or its first create is still
            running after `WAIT_S`.
    """
    if not key:
        return await create()
    deadline = time.monotonic() + WAIT_S
    while True:
        claim = IdempotencyRecord(tenant_id, key, fingerprint, time.time())
        held = await metadb.claim_idempotency_key(claim, KEEP_S, ABANDONED_S)
        if held is None:
            break
        if held.request_hash != fingerprint:
            raise AlreadyExists("this Idempotency-Key was used for a different request; use a new key")
        if held.session_row_id is not None:
            return await metadb.get_session(held.session_row_id)
        if time.monotonic() >= deadline:
            raise AlreadyExists("a create with this Idempotency-Key is still running; retry later")
        await asyncio.sleep(POLL_S)
    try:
        session = await create()
    except BaseException:
        # Shielded: a cancelled request must still give its key back.
        await asyncio.shield(metadb.release_idempotency_key(tenant_id, key))
        raise
    await metadb.settle_idempotency_key(tenant_id, key, session.row_id)
    return session
