"""The stage the attacks play on: a target server, an attacker and a victim tenant with sessions
on every backend, and the host-side things an attack must never reach.

What it owns:
- the cast: tenants `attacker` and `victim`, the same functions in both (`sec-bwrap`,
  `sec-gvisor`: no network, small limits; `sec-net`: bwrap with the internet allowed; `sec-root`
  and `sec-root-gvisor`: bwrap and gVisor booting a template, whose sessions act as root inside,
  when the stage is given one, and `sec-root-net`, bwrap's with the internet allowed), one
  victim session per function holding a secret file, a marked background process and a user
  server on port 8080, and attacker sessions made on demand;
- the host's side: a canary file (readable by anyone on the host), a TCP service on the host's
  loopback and an abstract Unix socket, each counting whoever reaches it;
- the context an attack program gets (`context`), and the bystander check run after every
  attack (`bystanders`): each victim still answers with its own secret, `/health` answers, the
  canary is unchanged, hutch runs, and nothing reached the host's services.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hutch.selftest.target import Session, Target, Tenant

BACKENDS = ("bwrap", "gvisor")
# The root casts: instances of a template (a root file system of their own), every command and
# file call of theirs acting as root inside, as E2B's `user="root"` does; on bwrap (`ROOT`) and
# on gVisor (`ROOT_GVISOR`).
ROOT = "root"
ROOT_GVISOR = "root-gvisor"
ROOTS = (ROOT, ROOT_GVISOR)
ROOT_NET = "root-net"  # the root cast with a network: the networked attacks as root inside
# The backend of each cast that is not one itself.
_RUNTIMES = {"net": "bwrap", ROOT: "bwrap", ROOT_GVISOR: "gvisor", ROOT_NET: "bwrap"}
LIMITS = {"cpu": 1.0, "memoryMB": 256, "pids": 128, "diskMB": 64, "tmpMB": 16}
SERVER_PORT = 8080


def runtime_of(cast: str) -> str:
    """The isolation backend a cast's sessions run on."""
    return _RUNTIMES.get(cast, cast)


def root_casts(backends: tuple[str, ...]) -> tuple[str, ...]:
    """The root casts of the chosen backends."""
    return tuple(cast for cast in ROOTS if runtime_of(cast) in backends)


def functions(template: str | None = None, roots: tuple[str, ...] = (ROOT,)) -> list[dict]:
    """The functions both tenants get (`roots`' with a template only)."""
    specs = [
        {"name": f"sec-{backend}", "runtime": backend, "resources": LIMITS, "warmPoolSize": 0} for backend in BACKENDS
    ]
    specs.append({"name": "sec-net", "runtime": "bwrap", "resources": LIMITS, "network": {"allowInternetAccess": True}})
    if template is not None:
        specs += [
            {"name": f"sec-{cast}", "runtime": runtime_of(cast), "template": template, "resources": LIMITS,
             "warmPoolSize": 0}
            for cast in roots
        ]  # fmt: skip
        specs.append(
            {"name": f"sec-{ROOT_NET}", "runtime": "bwrap", "template": template, "resources": LIMITS,
             "warmPoolSize": 0, "network": {"allowInternetAccess": True}}
        )  # fmt: skip
    return specs


def user_of(backend: str) -> str | None:
    """Who a cast's sessions act as inside (None: the sandbox's default user)."""
    return "root" if backend in (*ROOTS, ROOT_NET) else None


def host_addresses() -> list[str]:
    """The host's global IPv4 addresses, but those of hutch servers' sandbox veths (`hv*`), which
    come and go with the sandboxes of any hutch on this host."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
    except FileNotFoundError:
        return []
    fields = [line.split() for line in out.stdout.splitlines()]
    return [f[3].split("/")[0] for f in fields if len(f) > 3 and not f[1].startswith("hv")]


class Listener:
    """A listening socket on the host that counts every connection it accepts."""

    def __init__(self, family: int, address) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(16)
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nHOST-SERVICE")
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self.sock.close()


@dataclass
class Victim:
    backend: str  # bwrap, gvisor, "net" (bwrap with a network), root, root-net
    session: Session
    secret: str
    marker: str  # in the command line of a background process of the session
    record: dict  # the instance's host record (pid, workspace, slot, ...)


class Stage:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.root = target.root
        canary_dir = self.root / "host-canary"
        canary_dir.mkdir(mode=0o755, exist_ok=True)
        self.canary_token = "hutch-canary-" + uuid.uuid4().hex
        self.canary_path = canary_dir / "secret.txt"
        self.canary_path.write_text(self.canary_token)
        self.canary_path.chmod(0o644)
        self.canary_digest = _digest(self.canary_path)
        self.host_service = Listener(socket.AF_INET, ("127.0.0.1", 0))
        self.abstract_name = "hutch-selftest-" + uuid.uuid4().hex[:12]
        self.abstract = Listener(socket.AF_UNIX, "\0" + self.abstract_name)
        self.host_ips = host_addresses()
        self.request_timeout = target.request_timeout
        self.attacker: Tenant | None = None
        self.victim_tenant: Tenant | None = None
        self.victims: dict[str, Victim] = {}
        self._sessions: dict[str, Session] = {}
        self.template: str | None = None  # the root cast's template, when it plays

    # -- setting up ----------------------------------------------------------------------------

    def setup(self, backends: tuple[str, ...] = BACKENDS, network: bool = True, template: str | None = None) -> None:
        """Tenants, functions and victims; `template`: the template the root cast boots (None:
        no root cast)."""
        self.template = template
        self.attacker = self.target.tenant("attacker")
        self.victim_tenant = self.target.tenant("victim")
        for tenant in (self.attacker, self.victim_tenant):
            for spec in functions(template, root_casts(backends)):
                tenant.function(spec)
        casts = (*backends, *(("net",) if network else ()), *(root_casts(backends) if template is not None else ()))
        casts += (ROOT_NET,) if network and template is not None else ()
        for backend in casts:
            self.victims[backend] = self._victim(backend)

    @staticmethod
    def function_of(backend: str) -> str:
        return f"sec-{backend}"

    def _victim(self, backend: str) -> Victim:
        assert self.victim_tenant is not None
        session = self.victim_tenant.session(self.function_of(backend), f"victim-{backend}", user=user_of(backend))
        secret = "victim-secret-" + uuid.uuid4().hex
        marker = "hutch-victim-" + uuid.uuid4().hex[:12]
        put = session.upload("/home/user/victim-secret.txt", secret.encode())
        if put.status_code != 200:
            raise RuntimeError(f"victim {backend}: upload failed: {put.status_code} {put.text}")
        started = session.sh(
            f"(exec -a {marker} sleep 100000 >/dev/null 2>&1 &); "
            f"(python3 -m http.server {SERVER_PORT} >/dev/null 2>&1 &); echo started"
        )
        if "started" not in started.text:
            raise RuntimeError(f"victim {backend}: {started.describe()}")
        return Victim(backend, session, secret, marker, session.instance())

    def attacker_session(self, backend: str, fresh: bool = False) -> Session:
        """The attacker's shared session on a backend, or a fresh one (for attacks that spoil it)."""
        assert self.attacker is not None
        if fresh:
            return self.attacker.session(self.function_of(backend), user=user_of(backend))
        if backend not in self._sessions:
            self._sessions[backend] = self.attacker.session(
                self.function_of(backend), f"attacker-{backend}", user=user_of(backend)
            )
        return self._sessions[backend]

    # -- what attacks get ----------------------------------------------------------------------

    def context(self, backend: str, attacker: Session | None = None) -> dict:
        """What an attack program on `backend` knows (`CTX`)."""
        victim = self.victims.get(backend) or next(iter(self.victims.values()))
        data_dir = self.target.data_dir
        ctx = {
            "canary_path": str(self.canary_path),
            "canary_dir": str(self.canary_path.parent),
            "env_canary": self.target.env_canary,
            "admin_key": self.target.admin_key,
            "data_dir": str(data_dir),
            "metadb_path": str(data_dir / "metadb.sqlite3"),
            "hutch_port": self.target.port,
            "hutch_pid": self.target.pid,
            "host_ips": self.host_ips,
            "host_service_port": self.host_service.sock.getsockname()[1],
            "abstract_socket": self.abstract_name,
            "runtime": runtime_of(backend),
            "victim": {
                "workspace_path": victim.record["workspace_path"],
                "socket_path": victim.record["socket_path"],
                "pid": victim.record["pid"],
                "host_pids": cgroup_procs(victim.record),
                "marker": victim.marker,
                "server_port": SERVER_PORT,
            },
        }
        if backend in ROOTS:
            # Where the template's shared layers are on the host (an attacker may guess them: the
            # data directory's layout is public), and the host's own files of the same names.
            layers = victim.record["spec"]["rootfs"]["layer_paths"]
            ctx["root"] = {
                "layers": list(layers),
                "host_digests": digests(Path("/")),
                "template_digests": template_digests(layers),
                "template_top": listing(layers, ""),
                "template_root_home": listing(layers, "root"),
            }
        if backend in ("net", ROOT_NET) and attacker is not None:
            from hutch.runtime.network import layout_for

            layout = layout_for(data_dir)
            own = layout.addresses(attacker.instance()["detail"]["slot"])
            ctx["network"] = {
                "gateway_ip": own.host_ip,
                "proxy_port": _proxy_port(layout.tag),
                "victim_ip": layout.addresses(victim.record["detail"]["slot"]).sandbox_ip,
            }
        return ctx

    # -- afterwards ----------------------------------------------------------------------------

    def bystanders(self) -> tuple[bool, list[str]]:
        """Whether everyone else is fine, and the evidence (with response times)."""
        ok = True
        evidence = []
        for name, victim in self.victims.items():
            started = time.perf_counter()
            try:
                result = victim.session.run(["cat", "/home/user/victim-secret.txt"], timeout=60)
                fine = result.text == victim.secret
                detail = "own secret" if fine else result.describe()
            except Exception as exc:
                fine, detail = False, f"{type(exc).__name__}: {exc}"
            ok &= fine
            evidence.append(f"victim {name} {detail} in {(time.perf_counter() - started) * 1000:.1f} ms")
        try:
            evidence.append(f"/health 200 in {self.target.health_ms():.1f} ms")
        except Exception as exc:
            ok = False
            evidence.append(f"/health failed: {type(exc).__name__}: {exc}")
        intact = self.canary_path.exists() and _digest(self.canary_path) == self.canary_digest
        ok &= intact
        evidence.append("host canary unchanged" if intact else "HOST CANARY CHANGED")
        if not self.target.alive():
            ok = False
            evidence.append("HUTCH SERVE DIED")
        reached = self.host_service.accepted + self.abstract.accepted
        if reached:
            ok = False
            evidence.append(f"HOST SERVICES REACHED {reached} times")
        return ok, evidence

    def close(self) -> None:
        self.host_service.close()
        self.abstract.close()
        shutil.rmtree(self.canary_path.parent, ignore_errors=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Files a template has too: root inside reads its own copies, never the host's.
SYSTEM_FILES = ("/etc/passwd", "/etc/shadow")


def digests(root: Path) -> dict[str, str]:
    """SHA-256 of the copies of `SYSTEM_FILES` under `root` (a digest, never the content)."""
    found = {}
    for name in SYSTEM_FILES:
        try:
            found[name] = _digest(root / name.lstrip("/"))
        except OSError:
            pass
    return found


def listing(layers: list[str], directory: str) -> list[str]:
    """The names in a directory of a template, over all its layers."""
    names: set[str] = set()
    for layer in layers:
        with contextlib.suppress(OSError):
            names |= set(os.listdir(Path(layer) / directory))
    return sorted(names)


def template_digests(layers: list[str]) -> dict[str, str]:
    """The digests of `SYSTEM_FILES` as a template's layers hold them (the upper layers win)."""
    found: dict[str, str] = {}
    for layer in layers:  # lowest first, as bwrap's --overlay-src takes them
        found.update(digests(Path(layer)))
    return found


def cgroup_procs(record: dict) -> list[int]:
    """Host pids in an instance's cgroups."""
    pids: set[int] = set()
    for directory in record["detail"]["cgroup"].get("dirs", {}).values():
        try:
            pids |= {int(p) for p in (Path(directory) / "cgroup.procs").read_text().split()}
        except OSError:
            pass
    return sorted(pids)


def _proxy_port(tag: str) -> int:
    out = subprocess.run(["nft", "list", "table", "inet", f"hutch_{tag}"], capture_output=True, text=True).stdout
    found = re.search(r"redirect to :(\d+)", out)
    return int(found.group(1)) if found else 0
