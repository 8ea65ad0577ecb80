"""`hutch template list|get|build|delete`: the root file systems sandboxes boot from."""

from __future__ import annotations

import time

import typer

from hutch.cli.remote import JSON_OPTION, connected, fields, pairs, print_json, table, when

app = typer.Typer(no_args_is_help=True, help="Templates: root file systems of sandboxes (root inside, installs work).")

PACKAGES = typer.Option(None, "--package", "-p", help="A Debian package to install (repeatable).")
USER = typer.Option("user", "--user", help="Who runs commands by default.")
WORKDIR = typer.Option("/home/user", "--workdir", help="Where commands start by default.")
ENV = typer.Option(None, "--env", "-e", help="KEY=VALUE in every instance (repeatable).")
DETACH = typer.Option(False, "--detach", "-d", help="Start the build and return its id without following it.")


@app.command("list")
def list_(as_json: bool = JSON_OPTION) -> None:
    """The templates instances can boot from."""
    with connected() as client:
        templates = client.list_templates()
    if as_json:
        print_json(templates)
        return
    table(
        ["NAME", "SOURCE", "LAYERS", "USER", "CREATED"],
        [
            (t["name"], t["source"], len(t.get("layers", [])), t.get("user"), when(t.get("createdTime")))
            for t in templates
        ],
        wrap=("SOURCE",),
    )


@app.command()
def get(name: str = typer.Argument(..., help="Template name."), as_json: bool = JSON_OPTION) -> None:
    """A template."""
    with connected() as client:
        template = client.get_template(name)
    if as_json:
        print_json(template)
        return
    fields(template.items())


@app.command()
def build(
    name: str = typer.Argument(..., help="Template name."),
    packages: list[str] = PACKAGES,
    user: str = USER,
    workdir: str = WORKDIR,
    env: list[str] = ENV,
    detach: bool = DETACH,
    as_json: bool = JSON_OPTION,
) -> None:
    """Build a template from the configured Debian suite, following its log until it is ready."""
    spec = {"name": name, "debian": {"packages": packages or []}, "user": user, "workdir": workdir,
            "environmentVariables": pairs(env, "--env")}  # fmt: skip
    with connected() as client:
        started = client.build_template(spec)
        if detach:
            print_json(started) if as_json else typer.echo(started["buildId"])
            return
        offset, status = 0, started
        while True:
            status = client.get_build(started["buildId"], offset)
            for entry in status["logs"]:
                typer.echo(entry["line"], err=True)
            offset = status["nextOffset"]
            if status["status"] != "building":
                break
            time.sleep(1.0)
    if as_json:
        print_json(status)
    if status["status"] != "ready":
        typer.echo(f"error: the build of {name} failed: {status.get('error')}", err=True)
        raise typer.Exit(1)
    if not as_json:
        typer.echo(f"template {name} is ready")


@app.command()
def delete(name: str = typer.Argument(..., help="Template name.")) -> None:
    """Delete a template (refused while sandboxes use it)."""
    with connected() as client:
        client.delete_template(name)
    typer.echo(f"deleted template {name}")
