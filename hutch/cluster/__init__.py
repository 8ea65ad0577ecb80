"""Many machines: stateless gateways (`hutch gateway`) and sandbox hosts (`hutch node`) on one
PostgreSQL MetaDB.

- `wire.py`: what passes between them (headers, the node key, records as JSON);
- `node.py`: a node's ASGI app (`NodeApp`: the data plane by `x-hutch-session`, control calls
  under `/_node/v1/`) and its lease on MetaDB (`Lease`);
- `gateway.py`: the gateway's side, `ClusterSessions`, the `hutch.scheduler.interface.Sessions`
  of a gateway (route cache, node choice, calls to nodes, moving a dead node's sessions).

This package sits beside `hutch.gateway` and `hutch.api`: it uses the gateway's proxy and the
scheduler's `SessionManager`; nothing below it imports it.
"""
