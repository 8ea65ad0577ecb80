"""The egress proxy: every TCP connection and DNS query a sandbox makes arrives here, and is made
on its behalf only if that sandbox's policy allows it.

`hutch.runtime.network` redirects a sandbox's traffic to this proxy, so it sees the connection's
original destination (`SO_ORIGINAL_DST`) and, where a rule names domains, the name the client
asked for (TLS SNI or the HTTP Host header, read from the first bytes without consuming them).

Policy (E2B's semantics): `allow` entries (CIDRs, addresses, domains, `*.domain` wildcards) take
precedence over `deny` entries (CIDRs, addresses); what neither names is allowed only with
`internet`. Never allowed, whatever the policy: the host's own addresses, loopback, link-local
(cloud metadata), the sandboxes' subnet (other sessions), multicast.

Policies change live: `set_policy` applies to new connections at once and closes the open ones
the new policy no longer allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass, field

from hutch.errors import InvalidArgument

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80
SNIFF_TIMEOUT = 3.0
CONNECT_TIMEOUT = 10.0
ALWAYS_DENIED = [
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "169.254.0.0/16", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32")
]


def _is_domain(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
        return False
    except ValueError:
        return True


def _check_domain(entry: str) -> str:
    name = entry.lower().rstrip(".")
    body = name[2:] if name.startswith("*.") else name
    labels = body.split(".")
    if not body or len(body) > 253 or any(not label or len(label) > 63 for label in labels):
        raise InvalidArgument(f"invalid domain {entry!r}")
    if not all(c.isalnum() or c == "-" for label in labels for c in label):
        raise InvalidArgument(f"invalid domain {entry!r}")
    return name


@dataclass(frozen=True)
class EgressPolicy:
    internet: bool = False
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    _allow_nets: tuple = field(default=(), compare=False, repr=False)
    _allow_domains: tuple = field(default=(), compare=False, repr=False)
    _deny_nets: tuple = field(default=(), compare=False, repr=False)

    @classmethod
    def make(cls, internet: bool = False, allow=(), deny=()) -> EgressPolicy:
        """A validated policy. Raises InvalidArgument for a malformed entry or a denied domain."""
        allow_nets, allow_domains, deny_nets = [], [], []
        for entry in allow:
            if _is_domain(entry):
                allow_domains.append(_check_domain(entry))
            else:
                allow_nets.append(ipaddress.ip_network(entry, strict=False))
        for entry in deny:
            if _is_domain(entry):
                raise InvalidArgument(f"deny rules take CIDRs or addresses, not domains ({entry!r})")
            deny_nets.append(ipaddress.ip_network(entry, strict=False))
        return cls(internet, tuple(allow), tuple(deny), tuple(allow_nets), tuple(allow_domains), tuple(deny_nets))

    @property
    def any_egress(self) -> bool:
        return self.internet or bool(self.allow)

    @property
    def names_domains(self) -> bool:
        return bool(self._allow_domains)

    def domain_allowed(self, name: str | None) -> bool:
        if not name:
            return False
        name = name.lower().rstrip(".")
        for rule in self._allow_domains:
            if rule.startswith("*."):
                if name.endswith(rule[1:]):  # subdomains at any depth, not the apex
                    return True
            elif name == rule:
                return True
        return False

    def allows(self, address: ipaddress.IPv4Address, name: str | None = None) -> bool:
        if self.domain_allowed(name):
            return True
        if any(address in net for net in self._allow_nets):
            return True
        if any(address in net for net in self._deny_nets):
            return False
        return self.internet

    def resolves(self, name: str) -> bool:
        """Whether DNS answers this name for the sandbox."""
        return self.internet or self.domain_allowed(name) or bool(self._allow_nets)


def server_name(data: bytes) -> str | None:
    """The host a client asks for in its first bytes: TLS SNI, or an HTTP/1 Host header."""
    if data[:1] == b"\x16":
        return _sni(data)
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host":
            host = value.strip().decode("latin-1")
            if host.startswith("["):
                return None
            return host.rsplit(":", 1)[0] if ":" in host else host
    return None


def _sni(data: bytes) -> str | None:
    try:
        # record header (5) + handshake header (4) + version (2) + random (32)
        pos = 5 + 4 + 2 + 32
        pos += 1 + data[pos]  # session id
        pos += 2 + struct.unpack(">H", data[pos : pos + 2])[0]  # cipher suites
        pos += 1 + data[pos]  # compression methods
        end = pos + 2 + struct.unpack(">H", data[pos : pos + 2])[0]
        pos += 2
        while pos + 4 <= end:
            kind, length = struct.unpack(">HH", data[pos : pos + 4])
            pos += 4
            if kind == 0:  # server_name
                name_length = struct.unpack(">H", data[pos + 3 : pos + 5])[0]
                return data[pos + 5 : pos + 5 + name_length].decode("ascii")
            pos += length
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


class EgressProxy:
    def __init__(
        self,
        subnet: ipaddress.IPv4Network,
        upstream_dns: list[str] | None = None,
        static_hosts: dict[str, str] | None = None,
    ) -> None:
        self.subnet = subnet
        self.upstream_dns = upstream_dns if upstream_dns is not None else _host_nameservers()
        # Names the operator pins to addresses (internal mirrors), used before DNS; like /etc/hosts.
        self.static_hosts = {k.lower(): v for k, v in (static_hosts or {}).items()}
        self._policies: dict[str, EgressPolicy] = {}
        self._open: dict[str, set] = {}  # sandbox ip -> {(writer, dst ip, name)}
        self._tcp: asyncio.Server | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self.proxy_port = 0
        self.dns_port = 0
        self.stats = {"allowed": 0, "denied": 0}

    async def start(self, proxy_port: int = 0, dns_port: int = 0) -> None:
        self._tcp = await asyncio.start_server(self._handle, "0.0.0.0", proxy_port, reuse_address=True)
        self.proxy_port = self._tcp.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _DNSForwarder(self), local_addr=("0.0.0.0", dns_port)
        )
        self.dns_port = self._udp.get_extra_info("sockname")[1]

    async def close(self) -> None:
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()
        if self._udp is not None:
            self._udp.close()
        for connections in self._open.values():
            for writer, _, _ in list(connections):
                writer.close()

    def set_policy(self, sandbox_ip: str, policy: EgressPolicy) -> None:
        self._policies[sandbox_ip] = policy
        for entry in list(self._open.get(sandbox_ip, ())):
            writer, dst, name = entry
            if not policy.allows(dst, name):
                writer.close()  # no longer allowed: end it now

    def remove(self, sandbox_ip: str) -> None:
        self._policies.pop(sandbox_ip, None)
        for writer, _, _ in self._open.pop(sandbox_ip, set()):
            writer.close()

    def policy(self, sandbox_ip: str) -> EgressPolicy | None:
        return self._policies.get(sandbox_ip)

    def _never(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return address in self.subnet or any(address in net for net in ALWAYS_DENIED)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")[0]
        policy = self._policies.get(peer)
        upstream_writer = None
        entry = None
        try:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack(">H", raw[2:4])[0]
            dst = ipaddress.IPv4Address(raw[4:8])
            if policy is None or self._never(dst):
                self._deny(peer, dst, port, None)
                return
            name = None
            first = b""
            if policy.names_domains:
                with contextlib.suppress(TimeoutError):
                    first = await asyncio.wait_for(reader.read(16384), SNIFF_TIMEOUT)
                name = server_name(first)
            if not policy.allows(dst, name):
                self._deny(peer, dst, port, name)
                return
            targets = [dst]
            if name is not None and policy.domain_allowed(name):
                # Allowed for its name: go where the name leads, not where the client aimed, so a
                # forged SNI or Host header cannot open the way to any address.
                targets = [a for a in await self._resolve(name) if not self._never(a)]
                if not targets:
                    self._deny(peer, dst, port, name)
                    return
            upstream_reader = upstream_writer = None
            for target in targets:
                try:
                    upstream_reader, upstream_writer = await asyncio.wait_for(
                        asyncio.open_connection(str(target), port), CONNECT_TIMEOUT
                    )
                    break
                except (OSError, TimeoutError):
                    continue
            if upstream_reader is None or upstream_writer is None:
                return
            self.stats["allowed"] += 1
            entry = (writer, dst, name)
            self._open.setdefault(peer, set()).add(entry)
            if first:
                upstream_writer.write(first)
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        except (OSError, struct.error, ValueError):
            pass
        finally:
            if entry is not None:
                self._open.get(peer, set()).discard(entry)
            for w in (writer, upstream_writer):
                if w is not None:
                    w.close()

    async def _resolve(self, name: str) -> list:
        pinned = self.static_hosts.get(name.lower().rstrip("."))
        if pinned is not None:
            return [ipaddress.ip_address(pinned)]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(name, None, family=socket.AF_INET)
        except OSError:
            return []
        return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))

    def _deny(self, peer: str, dst, port: int, name: str | None) -> None:
        self.stats["denied"] += 1
        log.info("egress denied: %s -> %s:%s%s", peer, dst, port, f" ({name})" if name else "")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        writer.close()


def _host_nameservers() -> list[str]:
    servers = []
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    servers.append(parts[1])
    except OSError:
        pass
    return servers


def _qname(packet: bytes) -> str | None:
    """The first question's name of a DNS query."""
    try:
        pos, labels = 12, []
        while True:
            length = packet[pos]
            if length == 0:
                break
            if length & 0xC0:
                return None
            labels.append(packet[pos + 1 : pos + 1 + length].decode("ascii"))
            pos += 1 + length
        return ".".join(labels)
    except (IndexError, UnicodeDecodeError):
        return None


def _refused(packet: bytes) -> bytes:
    """The query answered with REFUSED (rcode 5), its question echoed."""
    flags = struct.unpack(">H", packet[2:4])[0]
    flags = 0x8000 | (flags & 0x7900) | 0x0080 | 5  # QR, opcode+RD kept, RA, REFUSED
    return packet[:2] + struct.pack(">HHHHH", flags, 1 if len(packet) > 12 else 0, 0, 0, 0) + packet[12:]


def _answer(packet: bytes, address: str) -> bytes:
    """The query answered with one A record (the operator's pinned address for the name)."""
    question_end = 12
    while packet[question_end] != 0:
        question_end += 1 + packet[question_end]
    question_end += 5  # the root label, QTYPE, QCLASS
    qtype = struct.unpack(">H", packet[question_end - 4 : question_end - 2])[0]
    flags = 0x8000 | (struct.unpack(">H", packet[2:4])[0] & 0x0100) | 0x0080
    if qtype != 1:  # only an IPv4 address is pinned: other types get an empty answer
        return packet[:2] + struct.pack(">HHHHH", flags, 1, 0, 0, 0) + packet[12:question_end]
    header = packet[:2] + struct.pack(">HHHHH", flags, 1, 1, 0, 0)
    record = struct.pack(">HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(address)
    return header + packet[12:question_end] + record


class _DNSForwarder(asyncio.DatagramProtocol):
    def __init__(self, proxy: EgressProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def _send(self, data: bytes, addr) -> None:
        if self.transport is not None:  # set before any datagram arrives
            self.transport.sendto(data, addr)

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) < 12:
            return
        policy = self.proxy.policy(addr[0])
        name = _qname(data)
        if policy is None or name is None or not policy.resolves(name):
            self._send(_refused(data), addr)
            return
        pinned = self.proxy.static_hosts.get(name.lower().rstrip("."))
        if pinned is not None:
            self._send(_answer(data, pinned), addr)
            return
        if not self.proxy.upstream_dns:
            self._send(_refused(data), addr)
            return
        asyncio.get_running_loop().create_task(self._forward(data, addr))

    async def _forward(self, data: bytes, addr) -> None:
        loop = asyncio.get_running_loop()
        for server in self.proxy.upstream_dns:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (server, 53))
                await loop.sock_sendall(sock, data)
                answer = await asyncio.wait_for(loop.sock_recv(sock, 4096), 3)
                self._send(answer, addr)
                return
            except (OSError, TimeoutError):
                continue
            finally:
                sock.close()
        self._send(_refused(data), addr)
