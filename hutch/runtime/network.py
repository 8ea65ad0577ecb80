"""Network for instances that may reach outside: a namespace, a veth, and egress only by proxy.

An instance without network has a namespace with loopback only (bwrap `--unshare-net`). One
with network gets:
- its own network namespace `hutch-<tag>-<slot>` (a bind mount under /run/netns, so a crash of
  hutch leaves something to find and clean up), whose `eth0` is one end of a veth pair; the host
  end `hv<tag><slot>` carries the first address of the slot's /30, the sandbox the second, with
  its default route via the host end;
- in the host's network namespace, one nftables table (`inet hutch_<tag>`) that sends every TCP
  connection and every DNS query arriving on one of this server's `hv<tag>*` interfaces to
  hutch's egress proxy (`redirect`), drops everything else from those interfaces before it
  reaches a host service, and never forwards their packets. The host's `ip_forward` is not
  touched. `<tag>` tells apart several hutch servers on one host (each has its own subnet).

So an instance can open TCP connections and resolve names, and nothing else; the egress proxy
(`hutch.runtime.egress`) decides per connection, with the instance's policy, whether to make it.
The sandbox's processes have no capability in a namespace the host owns, so they cannot change
any of this.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hutch.errors import BackendUnavailable, IsolationError

DEFAULT_SUBNET = "10.201.0.0/16"
NETNS_DIR = Path("/run/netns")


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    except FileNotFoundError:
        raise BackendUnavailable(f"{argv[0]} is not installed (apt install iproute2 nftables)") from None
    if result.returncode != 0:
        raise IsolationError(f"{' '.join(argv[:3])} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


@dataclass(frozen=True)
class NetworkLayout:
    """Names and addresses of one hutch server's instance networks."""

    tag: str  # 1-4 lowercase hex digits
    subnet: ipaddress.IPv4Network

    @classmethod
    def make(cls, tag: str, subnet: str = DEFAULT_SUBNET) -> NetworkLayout:
        if not (1 <= len(tag) <= 4 and all(c in "0123456789abcdef" for c in tag)):
            raise ValueError("the network tag is 1-4 lowercase hex digits")
        network = ipaddress.ip_network(subnet)
        if not isinstance(network, ipaddress.IPv4Network) or network.prefixlen > 24:
            raise ValueError("the instance subnet must be IPv4, /24 or larger")
        return cls(tag, network)

    @property
    def interface_prefix(self) -> str:
        return f"hv{self.tag}"

    @property
    def dns_address(self) -> str:
        """What sandboxes have in resolv.conf: redirected to the DNS forwarder, never assigned."""
        return str(self.subnet.broadcast_address - 1)

    def slots(self) -> int:
        return self.subnet.num_addresses // 4 - 1  # the last /30 holds the DNS address

    def addresses(self, slot: int) -> Addresses:
        if not 0 <= slot < self.slots():
            raise IsolationError(f"no network address for slot {slot}")
        base = int(self.subnet.network_address) + slot * 4
        return Addresses(
            slot=slot,
            netns=f"hutch-{self.tag}-{slot}",
            host_if=f"{self.interface_prefix}x{slot}",
            host_ip=str(ipaddress.ip_address(base + 1)),
            sandbox_ip=str(ipaddress.ip_address(base + 2)),
        )

    def slot_of_ip(self, sandbox_ip: str) -> int | None:
        try:
            address = ipaddress.ip_address(sandbox_ip)
        except ValueError:
            return None
        if address not in self.subnet:
            return None
        slot, offset = divmod(int(address) - int(self.subnet.network_address), 4)
        return slot if offset == 2 and slot < self.slots() else None

    def leftover_slots(self) -> list[int]:
        """Slots of this server's namespaces present on the host (what a crash may have left)."""
        prefix = f"hutch-{self.tag}-"
        if not NETNS_DIR.is_dir():
            return []
        return sorted(
            int(entry.name[len(prefix) :])
            for entry in NETNS_DIR.iterdir()
            if entry.name.startswith(prefix) and entry.name[len(prefix) :].isdigit()
        )


SUBNET_RECORD = "network-subnet"  # in the data dir: the /16 chosen when none is configured


def network_tag(data_dir: Path) -> str:
    """The 4 hex digits that name a data dir's namespaces, links and nftables table."""
    return hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:4]


def layout_for(data_dir: Path, subnet: str = "") -> NetworkLayout:
    """The layout of the server on `data_dir`: a tag from its path and, unless given, a /16 of
    10.64.0.0/10, so that several servers on one host (tests do that) get namespaces, interfaces
    and subnets of their own. The /16 is the first, from one derived from the tag, that no
    interface of the host uses (another server's veths, a leftover of one), and is kept in
    `<data>/network-subnet` so that a restart adopts instances on the same addresses."""
    tag = network_tag(data_dir)
    return NetworkLayout.make(tag, subnet or _free_subnet(Path(data_dir), tag))


def _free_subnet(data_dir: Path, tag: str) -> str:
    record = data_dir / SUBNET_RECORD
    try:
        saved = record.read_text().strip()
        if saved:
            return saved
    except OSError:
        pass
    used = _host_networks(exclude_prefix=f"hv{tag}")
    first = int(tag, 16) % 64
    chosen = f"10.{64 + first}.0.0/16"
    for step in range(64):
        candidate = f"10.{64 + (first + step) % 64}.0.0/16"
        network = ipaddress.ip_network(candidate)
        if not any(network.overlaps(u) for u in used):
            chosen = candidate
            break
    if data_dir.is_dir():
        tmp = record.with_suffix(".tmp")
        tmp.write_text(chosen + "\n")
        tmp.rename(record)
    return chosen


def _host_networks(exclude_prefix: str) -> list[ipaddress.IPv4Network]:
    """IPv4 networks of the host's interfaces (but ours), from `ip -o -4 addr`."""
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    found = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and not fields[1].startswith(exclude_prefix) and fields[2] == "inet":
            try:
                network = ipaddress.ip_interface(fields[3]).network
            except ValueError:
                continue
            if isinstance(network, ipaddress.IPv4Network):
                found.append(network)
    return found


@dataclass(frozen=True)
class Addresses:
    slot: int
    netns: str
    host_if: str
    host_ip: str
    sandbox_ip: str


class HostNetwork:
    """The host side shared by one server's instances: the table that funnels them to the proxy."""

    def __init__(self, layout: NetworkLayout, proxy_port: int, dns_port: int) -> None:
        self.layout = layout
        self.proxy_port = proxy_port
        self.dns_port = dns_port
        self.table = f"hutch_{layout.tag}"

    def install(self) -> None:
        """(Re)create the table atomically: one `nft -f` transaction."""
        hv = f'"{self.layout.interface_prefix}*"'
        ruleset = f"""
table inet {self.table}
delete table inet {self.table}
table inet {self.table} {{
    chain guard {{
        type filter hook prerouting priority -200; policy accept;
        # nothing from a sandbox may address the host itself, broadcast or multicast, or
        # link-local (cloud metadata) addresses; what is left goes to the proxy below
        iifname {hv} fib daddr type {{ local, broadcast, multicast }} drop
        iifname {hv} ip daddr {{ 169.254.0.0/16, 0.0.0.0/8 }} drop
        iifname {hv} meta nfproto ipv6 drop
    }}
    chain funnel {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname {hv} udp dport 53 redirect to :{self.dns_port}
        iifname {hv} meta l4proto tcp redirect to :{self.proxy_port}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {hv} ct state established,related accept
        iifname {hv} tcp dport {self.proxy_port} accept
        iifname {hv} udp dport {self.dns_port} accept
        iifname {hv} drop
        # the proxy is for sandboxes only
        tcp dport {self.proxy_port} iifname != "lo" drop
        udp dport {self.dns_port} iifname != "lo" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname {hv} drop
        oifname {hv} drop
    }}
    chain output {{
        # the host never opens a connection into a sandbox (the proxy cannot bridge two of them)
        type filter hook output priority filter; policy accept;
        oifname {hv} ct state established,related accept
        oifname {hv} drop
    }}
}}
"""
        _run(["nft", "-f", "-"], ruleset)

    def remove(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True)


class InstanceNetwork:
    """One instance's namespace and veth pair."""

    def __init__(self, addresses: Addresses) -> None:
        self.addresses = addresses

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.addresses.netns

    def create(self) -> None:
        a = self.addresses
        self.destroy()  # a leftover of a crash with the same slot
        host_side = f"""netns add {a.netns}
link add {a.host_if} type veth peer name eth0 netns {a.netns}
addr add {a.host_ip}/30 dev {a.host_if}
link set {a.host_if} up
"""
        sandbox_side = f"""addr add {a.sandbox_ip}/30 dev eth0
link set eth0 up
link set lo up
route add default via {a.host_ip}
"""
        try:
            _run(["ip", "-batch", "-"], host_side)
            _run(["ip", "-n", a.netns, "-batch", "-"], sandbox_side)
        except IsolationError:
            self.destroy()
            raise
        # Nothing should answer the sandbox's neighbours but the host end.
        _run(["sysctl", "-q", "-w", f"net.ipv4.conf.{a.host_if}.rp_filter=1"])

    def destroy(self) -> None:
        """Remove the namespace (its end of the veth goes with it, and the host end with that)."""
        a = self.addresses
        subprocess.run(["ip", "link", "delete", a.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "delete", a.netns], capture_output=True)

    def exists(self) -> bool:
        return self.netns_path.exists()


class Networking:
    """One server's instance networks: the host table, the egress proxy, and a namespace per
    networked instance (the instance's uid slot is its network slot). Shared by every backend of
    a server; created when the first instance with a network starts."""

    def __init__(self, layout: NetworkLayout, static_hosts: dict[str, str] | None = None) -> None:
        from hutch.runtime.egress import EgressProxy

        self.layout = layout
        self.proxy = EgressProxy(layout.subnet, static_hosts=static_hosts)
        self.host: HostNetwork | None = None
        self._starting: asyncio.Lock | None = None

    async def start(self) -> None:
        """Start the proxy and (re)install the host table with its ports; idempotent."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.host is not None:
                return
            await self.proxy.start()
            host = HostNetwork(self.layout, self.proxy.proxy_port, self.proxy.dns_port)
            await asyncio.to_thread(host.install)
            self.host = host

    def attach(self, slot: int, policy: dict) -> Addresses:
        """Create the slot's namespace and veth, and give its address the policy."""
        addresses = self.layout.addresses(slot)
        InstanceNetwork(addresses).create()
        self.proxy.set_policy(addresses.sandbox_ip, egress_policy(policy))
        return addresses

    def set_policy(self, slot: int, policy: dict) -> None:
        self.proxy.set_policy(self.layout.addresses(slot).sandbox_ip, egress_policy(policy))

    def detach(self, slot: int) -> None:
        addresses = self.layout.addresses(slot)
        self.proxy.remove(addresses.sandbox_ip)
        InstanceNetwork(addresses).destroy()

    def sweep(self, live_slots: set[int]) -> list[str]:
        """Destroy namespaces a crash left behind (their slot has no live instance)."""
        removed = []
        for slot in self.layout.leftover_slots():
            if slot not in live_slots:
                InstanceNetwork(self.layout.addresses(slot)).destroy()
                removed.append(f"network namespace of slot {slot}")
        return removed

    async def close(self, remove_rules: bool = False) -> None:
        """Stop the proxy; `remove_rules`: also delete the host table (which a restart would
        reinstall), for a server going away for good. The table is found by name, so one left by
        an earlier process is removed too."""
        await self.proxy.close()
        if remove_rules:
            await asyncio.to_thread(HostNetwork(self.layout, 0, 0).remove)
        self.host = None


def egress_policy(policy: dict):
    """An `EgressPolicy` from an instance's network spec (`internet`, `allow`, `deny`)."""
    from hutch.runtime.egress import EgressPolicy

    return EgressPolicy.make(
        internet=bool(policy.get("internet")), allow=policy.get("allow") or (), deny=policy.get("deny") or ()
    )
