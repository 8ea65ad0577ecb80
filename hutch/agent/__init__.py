"""The daemon inside every sandbox: E2B's envd protocol and code interpreter on one Unix socket.

**Boundary**: this package runs inside the sandbox, with the sandbox user's rights, under a
start-up budget of a few milliseconds. It imports nothing from hutch but `hutch.errors` and
itself, never a third-party package at boot, and treats the host as its only client.
"""
