"""Outcomes of the battery, and how they are shown: a terminal table and a Markdown report.

An `Outcome` is one attack on one backend: contained or not, the evidence (each probe's exact
result, the HTTP statuses, the limits that held), whether the bystanders (another tenant's
sessions, `/health`, a host canary file, hutch itself) were fine afterwards, and any
measurements taken during the attack (response times, memory), reported and never judged.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Outcome:
    attack: str  # the attack's id
    category: str
    title: str
    backend: str  # bwrap, gvisor, or "server" for attacks on hutch's own API
    contained: bool
    evidence: list[str] = field(default_factory=list)
    bystanders_ok: bool = True
    bystanders: list[str] = field(default_factory=list)
    measurements: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.contained and self.bystanders_ok

    @property
    def verdict(self) -> str:
        if not self.contained:
            return "FAILED"
        return "contained" if self.bystanders_ok else "FAILED (bystanders)"

    def failure(self) -> str:
        """The evidence that matters when it failed (for an assertion message)."""
        lines = [f"{self.attack} [{self.backend}]: {self.verdict}", *self.evidence]
        if not self.bystanders_ok:
            lines += ["bystanders:", *self.bystanders]
        return "\n".join(lines)


def table(outcomes: Iterable[Outcome]) -> str:
    """A plain-text table, one line per outcome, with its evidence indented below a failure."""
    rows = [("attack", "backend", "verdict", "evidence")]
    details: dict[int, list[str]] = {}
    for outcome in outcomes:
        summary = "; ".join(outcome.evidence[:3])
        if len(outcome.evidence) > 3:
            summary += f"; (+{len(outcome.evidence) - 3} more)"
        rows.append((outcome.attack, outcome.backend, outcome.verdict, summary[:110]))
        if not outcome.passed:
            details[len(rows) - 1] = outcome.evidence + (outcome.bystanders if not outcome.bystanders_ok else [])
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
        if index == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 8)
        for detail in details.get(index, []):
            lines.append("      " + detail)
    return "\n".join(lines)


# What the battery found when it was first run, and where each defect was fixed (with its test).
DEFECTS = (
    (
        "Template builds: host root copied each step's upper layer (`cp -a`) while the step's sandbox "
        "still ran; a process the step left behind, swapping a directory for a link to a host "
        "directory, had cp copy a root-only host file into the template's layer (2 of 400 copies in a "
        "tight loop), which the tenant's sessions could then read",
        "`templates/builder.py`: the step's instance is halted (`Runtime.halt`: every process killed "
        "through its cgroup, the workspace kept) before its layer is copied",
        "`tests/runtime/test_templates.py::"
        "test_halt_ends_every_process_and_leaves_the_upper_layer_still_for_its_reader`, "
        "`tests/e2e/test_templates.py` (builds still work)",
    ),
    (
        "Templates: bwrap sets a sandbox up with the host's root reachable at `/oldroot` and follows "
        "links in mount destinations; a template (a tenant's build or image) with `/run` linked to "
        "`/oldroot/var/tmp` had bwrap create `run/hutch` there, and `/usr/bin/sudo` linked likewise an "
        "empty file, on the host, as the instance's host uid (root inside could plant the same at "
        "`/etc/resolv.conf` for a later instance with a network)",
        "`runtime/local.py` `_check_mount_points` with `runtime/rootfs.py` `linked_mount_points`: a link "
        "at or above any mount point, in the template's layers or the session's upper layer, refuses the "
        "start (400 failed_precondition)",
        "`tests/runtime/test_templates.py::"
        "test_a_template_with_a_link_where_hutch_mounts_is_refused_and_the_host_is_untouched`, "
        "`::test_a_link_planted_by_root_for_a_later_instance_with_a_network_is_refused`, "
        "`rootfs-mount-point-links`",
    ),
    (
        "gVisor: user code could replace its agent's socket (`/run/hutch/agent.sock`, on a tmpfs the "
        "sandbox user owned) with a symlink to another instance's; hutch connects by path, so one "
        "tenant's requests reached another tenant's sandbox",
        "`runtime/gvisor.py` `_ready`: the run directory becomes root's once the agent answers",
        "`tests/runtime/test_isolation.py::test_a_sandbox_cannot_point_hutch_at_another_instances_socket`, "
        "`agent-sockets`",
    ),
    (
        "Directory workspaces: hutch's disk-usage walk (`os.walk`) followed a directory the sandbox "
        "swapped for a symlink to a host directory; `chown_tree` could chown host files the same way, and "
        "a swapped-in FIFO could block the walk",
        "`storage/base.py` `walk_no_follow` (directory fds opened with `O_NOFOLLOW`, `O_DIRECTORY`, "
        "`O_NONBLOCK`), used by `chown_tree` and `tree_bytes`",
        "`tests/runtime/test_storage.py` (two race tests), `host-walks-workspace`",
    ),
    (
        "hutch's MCP tools (in `hutch serve`) kept a sandbox's whole output: 50 MB of `yes` through "
        "`run_command` took hutch to 3.5 GB of RSS and a minute of its event loop; `read_file` of a big "
        "file likewise (httpx's ASGI transport buffers whole answers)",
        "`mcp/transport.py` (streaming in-process transport), `mcp/sandboxes.py` (caps: 1 MiB per stream, "
        "16 MiB per file; a command past the cap is stopped)",
        "`mcp-output-flood`",
    ),
    (
        "The control plane read any request body whole: 200 MB took hutch from 88 to 417 MB of RSS",
        "`api/app.py` `BodyLimit`: at most 1 MiB (413), within `request_timeout` (408)",
        "`oversized-bodies`, `slow-loris`",
    ),
    (
        "uvicorn/httptools puts no limit on a request head: a 300 MB header held hutch's event loop for "
        "two minutes and 500 MB of memory; a head that never ends held its connection forever",
        "`gateway/wire.py` `GuardedHttpProtocol`: heads of at most 64 KiB (431), within "
        "`request_timeout` (408); `cli/serve.py` takes the whole open-files hard limit",
        "`oversized-headers`, `slow-loris`, "
        "`tests/security/test_api_abuse.py::test_a_kept_alive_connection_whose_next_head_never_ends_is_cut`",
    ),
    (
        "`GET /v1/usage/series?step=10**30` (and `from`/`to` of `1e308`, `inf`, `nan`) was a 500 "
        "(OverflowError in SQLite), found by schemathesis",
        "`api/usage.py`: times between 1970 and 9999, bounded `step` (400)",
        "`tests/security/test_api_abuse.py::test_usage_ranges_beyond_any_calendar_are_refused_with_a_400`",
    ),
    (
        "A tenant could create functions with warm pools of any total size: instances held ready on "
        "the host's capacity, outside its quotas, enough to starve every other tenant",
        "`functions.check_warm_pools`, called by `api/native.py` on create and update (429)",
        "`tests/security/test_api_abuse.py::test_a_tenant_cannot_hold_warm_instances_beyond_its_quotas`, "
        "`warm-pool-hoarding`",
    ),
    (
        "After a restart of hutch with instances of both backends alive, each backend's sweep "
        "unmounted the other's live workspace images (it counted only its own instances as live)",
        "`runtime/local.py` `sweep_orphans`: live workspaces of every backend, from their records",
        "`tests/runtime/test_multi.py::test_a_successor_adopting_both_backends_unmounts_no_live_workspace`",
    ),
)

# Where an item of the list does not apply as written, and what is played instead.
ADAPTED = (
    "A networked session exists only under bwrap (this runsc cannot join a network namespace), so "
    "`networked-host-services` runs on bwrap; under gVisor `no-network` covers every network attack.",
    "`/proc/1` inside a sandbox is the sandbox's own reaper (both backends), never the host's init: "
    "the attacks check that it is, and that the host's pids cannot be signalled.",
    "gVisor has devices of its own: a node made on its tmpfs opens nothing (ENXIO), its `/dev/fuse` and "
    "`/dev/net/tun` are user-space (making an interface needs CAP_NET_ADMIN, refused), the OOM score "
    "it lets a process lower is its own.",
    "The agent's parsing (Connect envelopes, JSON) is the same code under both backends: those attacks "
    "run once, through the gateway, against a bwrap session.",
    "The root casts (`[root]` on bwrap, `[root-gvisor]` on gVisor): sessions of a template, every "
    "command and file call as root "
    'inside (E2B\'s `user="root"`). Root owns its `/`, `/etc` and `/usr` there (copies in the '
    "session's overlay upper layer), so writing them is no escape: those probes check instead that "
    "what root reads is the template's file and not the host's (by digest), and `rootfs-lower-layer` "
    "that a write lands in the session's upper layer only, with the template's layer unchanged on the "
    "host and other sessions of the template seeing the template's files. `setuid-binary` is not "
    "played as root (root is root): `root-kernel` makes setuid-root and file-capability binaries and "
    "runs them as the user.",
    "Under gVisor root meets gVisor's kernel, which answers with objects of its own (a node made on "
    "its `/dev` opens nothing, its `/proc/sys`, `/sys`, uid maps and OOM scores are its own, file "
    "capabilities are refused; the host's uids are judged from the host), and root's `kill -9 1` "
    "would end its own instance (gVisor's pid 1 takes the signal): not played. The networked escape "
    "as root is played on bwrap only (`root-net`): gVisor's instances have no network.",
    "Image workspaces (the default store) are measured with `statvfs`: the host-side walk attack runs "
    "against a directory workspace, the store whose usage and chown walk the tree.",
)


def _measured_rows(outcomes: list[Outcome]) -> list[str]:
    rows = [
        "| attack | backend | another tenant's command | `/health` | host `/bin/true` | hutch RSS peak |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        m = o.measurements
        if "neighbour ms" not in m and "health ms" not in m:
            continue
        cells = [m.get(k, "-").replace(" (n=", " ms (n=") for k in ("neighbour ms", "health ms", "host ms")]
        rows.append(f"| `{o.attack}` | {o.backend} | {' | '.join(cells)} | {m.get('hutch RSS peak', '-')} |")
    return rows


def markdown(outcomes: list[Outcome], duration_s: float, root_cast: str = "") -> str:
    """The report's security section: every attack, its verdict and its evidence; `root_cast`
    says what the root cast booted, or why it did not play."""
    failed = [o for o in outcomes if not o.passed]
    uname = platform.uname()
    lines = [
        "# Reliability report: escape and abuse",
        "",
        "Generated by `hutch selftest --report docs/reliability-security.md` (the same battery as "
        "`tests/security/`): untrusted code inside real sessions of a throwaway `hutch serve`, on both "
        "isolation backends (and as root inside a template's root file system: the root casts, "
        "`root` on bwrap and `root-gvisor` on gVisor), tries each attack below and must meet the "
        "exact failure listed; after "
        "each attack another tenant's sessions must still answer with their own data, `/health` must "
        "answer and a canary file on the host must be unchanged. Response times and memory measured "
        "during the abuse are reported, never judged.",
        "",
        f"- When: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; host: {uname.system} {uname.release}, "
        f"{uname.machine}; battery run time {duration_s:.0f} s",
        *([f"- Root cast: {root_cast}"] if root_cast else []),
        f"- Result: **{len(outcomes) - len(failed)} of {len(outcomes)} attacks contained**"
        + (f", **{len(failed)} FAILED**" if failed else ""),
        "",
        "| attack | backend | verdict | what was tried |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(f"| `{o.attack}` | {o.backend} | {o.verdict} | {o.title} |")
    lines += [
        "",
        "## Responsiveness during the abuse",
        "",
        "Sampled every 0.2 s while each abuse ran (p50 / max, milliseconds): another tenant's session "
        "running `true` through the gateway, `GET /health`, and the host spawning `/bin/true`.",
        "",
        *_measured_rows(outcomes),
        "",
        "## Defects the battery found, and their fixes",
        "",
        "| defect | fixed in | test |",
        "|---|---|---|",
        *[f"| {what} | {where} | {test} |" for what, where, test in DEFECTS],
        "",
        "## Adapted where an item does not apply as written",
        "",
        *[f"- {note}" for note in ADAPTED],
        "",
        "## Evidence",
        "",
    ]
    for o in outcomes:
        lines.append(f"### `{o.attack}` on {o.backend}: {o.verdict}")
        lines.append("")
        lines.append(o.title[0].upper() + o.title[1:] + ".")
        lines.append("")
        lines += [f"- {line}" for line in o.evidence]
        if o.measurements:
            lines.append("- measured: " + "; ".join(f"{k} {v}" for k, v in o.measurements.items()))
        if o.bystanders:
            lines.append("- bystanders: " + "; ".join(o.bystanders))
        lines.append("")
    return "\n".join(lines)
