"""MCP in hutch: hutch as an MCP server (`server.py`: the sandbox tools; `endpoint.py`: the
Streamable HTTP endpoint of `hutch serve`; `hutch mcp` serves them over stdio), the sandboxes
those tools act on (`sandboxes.py`), and the example MCP server that functions run inside their
instances (`example_counter.py`, run as a script in sandboxes).

Routing MCP traffic to functions' instances is the gateway's (`hutch.gateway.mcp`).
"""
