"""The probe harness that escape attacks run inside a sandbox, and how their outcomes are judged.

An escape attack is a short Python program run as the sandbox user in a real session. It calls
`probe(name, fn)` for each thing it tries; a probe's outcome is the errno name of the failure
(`ENOENT`, `EPERM`...), the exception's class name, `ok` when the attempt succeeded, or a word
the attempt returns (`clean`, `own`, `LEAK: ...`). The program prints every outcome as one JSON
line, which `outcomes` finds again in the command's output.

An attack is contained when every probe's outcome is one its expectation allows, and the host
and the other sessions are unaffected afterwards (checked by the battery, not here). `CTX` gives
the program what an attacker would guess or learn: host paths, the victim session's workspace,
socket and pids, the server's port and addresses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

MARKER = "HUTCH-PROBES "

PRELUDE = r"""
import ctypes, errno, json, os, signal, socket, struct, sys, time
CTX = json.loads(__CTX__)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
RESULTS = {}

def outcome_of(exc):
    if isinstance(exc, socket.gaierror):
        return "gaierror"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__

def probe(name, fn):
    try:
        value = fn()
    except BaseException as exc:
        RESULTS[name] = outcome_of(exc)
    else:
        RESULTS[name] = "ok" if value is None or value is True else str(value)

def call(nr, *args):
    res = libc.syscall(nr, *args)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))

def probe_each(name, fn, items):
    # One outcome for trying fn on every item: the distinct outcomes, joined by "|".
    seen = set()
    for item in items:
        try:
            value = fn(item)
        except BaseException as exc:
            seen.add(outcome_of(exc))
        else:
            seen.add("ok" if value is None or value is True else str(value))
    RESULTS[name] = "|".join(sorted(seen)) or "nothing to try"

def read(path, size=65536):
    with open(path, "rb") as f:
        return f.read(size)

def write(path, data=b"hutch-selftest"):
    with open(path, "wb") as f:
        f.write(data)

def touch(path):
    # Open for writing and change nothing: where root inside may write (its own copy of a
    # template's file), the session's system stays whole for the attacks after this one.
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))

ROOT = CTX.get("root")  # the root cast's extra knowledge (None elsewhere)

def leak_check(data, *tokens):
    found = [t for t in tokens if t and t.encode() in data]
    return "LEAK: " + ", ".join(found) if found else "clean"

def connect(address, family=socket.AF_INET, kind=socket.SOCK_STREAM, timeout=3.0):
    s = socket.socket(family, kind)
    s.settimeout(timeout)
    try:
        s.connect(address)
        if kind == socket.SOCK_STREAM and family != socket.AF_UNIX:
            s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            try:
                data = s.recv(64)
            except OSError as exc:
                return "connected, then " + outcome_of(exc)
            return "ANSWERED: " + data[:40].decode(errors="replace") if data else "connected, then closed"
        return "ok"
    finally:
        s.close()
"""

EPILOGUE = r"""
print(__MARKER__ + json.dumps(RESULTS), flush=True)
"""


def program(body: str, ctx: Mapping[str, object]) -> str:
    """The full program of an attack: the prelude with `CTX`, the attack's body, the report."""
    prelude = PRELUDE.replace("__CTX__", repr(json.dumps(ctx)))
    return prelude + "\n" + body + "\n" + EPILOGUE.replace("__MARKER__", repr(MARKER))


def outcomes(stdout: str) -> dict[str, str] | None:
    """The probe outcomes an attack printed, or None when it printed none (it died first)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARKER):
            try:
                return json.loads(line[len(MARKER) :])
            except ValueError:
                return None
    return None


# A cast whose expectations are those of others, in order, then its own: root inside a gVisor
# instance meets gVisor's kernel as the gVisor cast does, and has what root has on bwrap.
CAST_LAYERS = {"root-gvisor": ("gvisor", "root", "root-gvisor")}

Expectation = frozenset[str]
# An override saying a probe is not played on that cast: it means nothing there (`setuid(0)` by
# root inside is root being root); another probe of the cast tests what it stood for.
NOT_PLAYED: Expectation = frozenset({"(not played)"})


def allowed(*outcomes: str) -> Expectation:
    return frozenset(outcomes)


@dataclass(frozen=True)
class Escape:
    """An escape attempt: a program run inside a session, and what each of its probes must end in."""

    id: str
    category: str
    title: str
    body: str
    expect: Mapping[str, Expectation]
    # Per backend, expectations that differ (gVisor's kernel answers some calls differently).
    overrides: Mapping[str, Mapping[str, Expectation]] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # what the attack needs from the context ("network", "root")

    def expectations(self, backend: str) -> dict[str, Expectation]:
        merged = dict(self.expect)
        for layer in CAST_LAYERS.get(backend, (backend,)):
            merged.update(self.overrides.get(layer, {}))
        return {name: expected for name, expected in merged.items() if expected is not NOT_PLAYED}

    def judge(self, backend: str, seen: Mapping[str, str] | None) -> tuple[bool, list[str]]:
        """(contained, evidence lines): every expected probe ran and ended as allowed."""
        if seen is None:
            return False, ["the attack printed no outcomes (it died before reporting)"]
        evidence = []
        contained = True
        for name, expected in self.expectations(backend).items():
            outcome = seen.get(name, "missing")
            ok = outcome in expected
            contained &= ok
            evidence.append(f"{name}: {outcome}" + ("" if ok else f" (expected {'|'.join(sorted(expected))})"))
        for name in sorted(set(seen) - set(self.expectations(backend))):
            evidence.append(f"{name}: {seen[name]} (not judged)")
        return contained, evidence
