"""`hutch selftest`: the escape-and-abuse battery against this host, for an operator (needs root).

It starts a throwaway `hutch serve` on a temporary data directory (its own port and uid range),
plays every attack of `hutch.selftest` against it on each isolation backend installed here,
prints one line per attack as it goes and a table at the end, optionally writes the Markdown
report, removes everything it made, and exits 1 if any attack was not contained.

The root casts (attacks as root inside a template's root file system, bwrap and gVisor) boot the built-in
template `base` from the operator's template store when it is prepared there (`--templates`,
`--template`); without it those attacks are skipped, and the output says so.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import typer


def selftest(
    backends: str = typer.Option("bwrap,gvisor", help="Isolation backends to attack (gvisor: skipped without runsc)."),
    only: str = typer.Option("", help="Comma-separated attack ids to run (default: all)."),
    report: Path = typer.Option(None, "--report", help="Also write the Markdown report here."),
    log_level: str = typer.Option("warning", help="Log level of the throwaway server."),
    templates: Path = typer.Option(
        Path("/var/lib/hutch/templates"), help="The template store the root cast boots from ([templates] dir)."
    ),
    template: str = typer.Option("base", help="The template the root cast boots (attacks as root inside)."),
) -> None:
    """Attack a throwaway hutch on this host from inside its sandboxes; exit 1 if anything escaped."""
    from hutch.selftest.battery import plan, run_all
    from hutch.selftest.report import markdown, table
    from hutch.selftest.stage import ROOTS, Stage, root_casts
    from hutch.selftest.target import Target

    if os.geteuid() != 0:
        typer.echo("error: the battery starts sandboxes: run it as root", err=True)
        raise typer.Exit(2)
    chosen = tuple(b for b in backends.split(",") if b)
    if "gvisor" in chosen and shutil.which("runsc") is None:
        typer.echo("note: gVisor (runsc) is not installed here: its attacks are skipped", err=True)
        chosen = tuple(b for b in chosen if b != "gvisor")
    root_template: str | None = None
    root_cast = "not played (neither bwrap nor gvisor chosen)"
    if root_casts(chosen):
        # Only look: the operator's store is never created or changed from here.
        record = templates / "templates" / f"{template}.json"
        if record.is_file():
            root_template = template
            on = " and ".join(b for b in ("bwrap", "gvisor") if b in chosen)
            chosen = (*chosen, *root_casts(chosen))
            root_cast = f"template `{template}` on {on} ({_describe(record)}), as root inside"
        else:
            root_cast = f"skipped: template `{template}` is not prepared"
            typer.echo(f"note: template {template!r} is not prepared in {templates} (hutch serve prepares 'base'): "
                       "the root cast (attacks as root inside a template) is skipped", err=True)  # fmt: skip
    wanted = {a for a in only.split(",") if a} or None
    known = {attack.id for attack in plan(chosen)}
    if wanted and wanted - known:
        typer.echo(f"error: unknown attacks {sorted(wanted - known)}; known: {', '.join(sorted(known))}", err=True)
        raise typer.Exit(2)
    began = time.monotonic()
    target = Target(log_level=log_level, templates_dir=templates if root_template else None)
    stage = Stage(target)
    outcomes = []
    try:
        target.start()
        stage.setup(
            backends=tuple(b for b in chosen if b not in ROOTS), network="bwrap" in chosen, template=root_template
        )
        for outcome in run_all(stage, chosen, wanted):
            outcomes.append(outcome)
            typer.echo(f"{outcome.verdict:<20} {outcome.attack} [{outcome.backend}] ({outcome.seconds:.1f} s)")
            sys.stdout.flush()
    finally:
        stage.close()
        target.close()
    duration = time.monotonic() - began
    typer.echo("")
    typer.echo(table(outcomes))
    failed = [o for o in outcomes if not o.passed]
    typer.echo(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} attacks contained in {duration:.0f} s")
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(markdown(outcomes, duration, root_cast))
        typer.echo(f"report written to {report}")
    raise typer.Exit(1 if failed or not outcomes else 0)


def _describe(record: Path) -> str:
    """A template's source and layer count, from its record."""
    import json

    try:
        raw = json.loads(record.read_text())
        return f"{raw.get('source', '?')}, {len(raw.get('layers', []))} layer(s)"
    except (OSError, ValueError):
        return "unreadable record"
