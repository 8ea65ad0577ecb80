"""The cluster's wire format between gateways and nodes: headers, the node key, records as JSON.

A gateway forwards a client's request to a node unchanged but for two headers: `x-hutch-node-key`
(the node key: a keyed hash of the cluster's secret, which lives in MetaDB) and `x-hutch-session`
(the session's row id). Control calls are JSON POSTs under `/_node/v1/`. A node that does not
hold a session answers 421 with `x-hutch-misdirected` (`hutch.gateway.upstream.MISDIRECTED_HEADER`:
the gateway's proxy knows that answer).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import asdict
from typing import Any

from hutch.gateway.upstream import MISDIRECTED_HEADER
from hutch.metadb.records import SessionRecord, SessionStatus, Tenant

__all__ = [
    "CONTROL_PREFIX",
    "HOP_HEADERS",
    "MISDIRECTED_HEADER",
    "MISDIRECTED_STATUS",
    "NODE_KEY_HEADER",
    "PORT_HEADER",
    "SESSION_HEADER",
    "node_key",
    "session_from_wire",
    "session_to_wire",
    "tenant_from_wire",
]

NODE_KEY_HEADER = b"x-hutch-node-key"
SESSION_HEADER = b"x-hutch-session"
PORT_HEADER = b"e2b-sandbox-port"
# What only the gateway-node hop carries: never forwarded to an instance.
HOP_HEADERS = frozenset({NODE_KEY_HEADER, SESSION_HEADER})
CONTROL_PREFIX = "/_node/v1/"
MISDIRECTED_STATUS = 421


def node_key(secret: bytes) -> str:
    """The credential gateways present to nodes: derived from the cluster secret, so that every
    process with MetaDB access has it and nothing else needs distributing."""
    return hmac.new(secret, b"hutch node access v1", hashlib.sha256).hexdigest()


def session_to_wire(record: SessionRecord) -> dict[str, Any]:
    values = asdict(record)
    values["status"] = record.status.value
    return values


def session_from_wire(values: dict[str, Any]) -> SessionRecord:
    return SessionRecord(**{**values, "status": SessionStatus(values["status"])})


def tenant_from_wire(values: dict[str, Any]) -> Tenant:
    return Tenant(**values)
