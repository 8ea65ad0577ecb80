"""The battery: every attack, in order, against one stage; what `hutch selftest` and
`tests/security/` both run.

`run_escape` plays one `Escape` program in an attacker session on one backend; the abuse and API
attacks are functions of the stage (`hutch.selftest.abuse`, `hutch.selftest.api_abuse`). Each
returns an `Outcome`, with the bystander check done after it. `run_all` runs the whole list and
yields outcomes as they come.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hutch.selftest.escape import ESCAPES
from hutch.selftest.probes import Escape, outcomes, program
from hutch.selftest.report import Outcome
from hutch.selftest.stage import BACKENDS, ROOT, ROOT_NET, ROOTS, Stage


def escape_backends(escape: Escape, backends: tuple[str, ...] = BACKENDS) -> list[str]:
    """The casts an escape is played on: a networked attack needs a function with a network,
    which only bwrap instances can have (`net`, and `ROOT_NET` as root inside); an attack of root
    inside needs a root cast (`ROOTS`, in `backends` when the stage has a template); every other
    one runs on each."""
    if "network" in escape.needs:
        return ["net"] * ("bwrap" in backends) + [ROOT_NET] * (ROOT in backends)
    if ROOT in escape.needs:
        return [cast for cast in ROOTS if cast in backends]
    return list(backends)


def run_escape(stage: Stage, escape: Escape, backend: str) -> Outcome:
    started = time.monotonic()
    session = stage.attacker_session(backend)
    code = program(escape.body, stage.context(backend, session))
    result = session.python(code, timeout=120)
    seen = outcomes(result.text)
    contained, evidence = escape.judge(backend, seen)
    if seen is None:
        evidence.append(result.describe())
    ok, bystanders = stage.bystanders()
    return Outcome(
        escape.id,
        escape.category,
        escape.title,
        backend,
        contained,
        evidence,
        ok,
        bystanders,
        seconds=time.monotonic() - started,
    )


@dataclass(frozen=True)
class Attack:
    """A step of the battery: an id, where it runs, and how (returns one outcome)."""

    id: str
    backend: str
    run: Callable[[Stage], Outcome]


def on_backend(run: Callable[[Stage, str], Outcome], backend: str) -> Callable[[Stage], Outcome]:
    """An attack that takes its backend, bound to one."""
    return lambda stage: run(stage, backend)


def plan(backends: tuple[str, ...] = BACKENDS) -> list[Attack]:
    """Every attack of the battery, in the order it runs."""
    from hutch.selftest import abuse, api_abuse, file_api, fuzz, rootfs

    steps = [
        Attack(escape.id, backend, functools.partial(run_escape, escape=escape, backend=backend))
        for escape in ESCAPES
        for backend in escape_backends(escape, backends)
    ]
    steps += file_api.plan(backends)
    steps += rootfs.plan(backends)
    steps += abuse.plan(backends)
    steps += api_abuse.plan()
    steps += fuzz.plan()
    return steps


def run_all(stage: Stage, backends: tuple[str, ...] = BACKENDS, only: set[str] | None = None) -> Iterator[Outcome]:
    for attack in plan(backends):
        if only and attack.id not in only:
            continue
        try:
            yield attack.run(stage)
        except Exception as exc:  # the battery itself broke: that is a failure too, with its reason
            ok, bystanders = stage.bystanders()
            yield Outcome(attack.id, "error", attack.id, attack.backend, False, [f"{type(exc).__name__}: {exc}"],
                          ok, bystanders)  # fmt: skip
