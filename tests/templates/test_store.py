"""The template store, recipes and build steps, without sandboxes (no root needed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hutch.errors import FailedPrecondition, InvalidArgument, NotFound
from hutch.templates import debian, oci
from hutch.templates.builder import State, Step, layer_key
from hutch.templates.model import Template, check_name
from hutch.templates.store import TemplateStore

LAYER = "a" * 64


@pytest.fixture
def store(tmp_path: Path) -> TemplateStore:
    return TemplateStore(tmp_path / "templates")


def _layer(store: TemplateStore, layer: str = LAYER) -> str:
    scratch = store.scratch()
    (scratch / "etc").mkdir()
    (scratch / "etc/os-release").write_text("ID=test\n")
    store.commit(scratch, layer)
    return layer


def test_a_template_is_registered_only_once_its_layers_exist_and_comes_back_whole(store):
    with pytest.raises(FailedPrecondition, match="missing layers"):
        store.put(Template(name="t", layers=(LAYER,)))
    _layer(store)
    store.put(Template(name="t", layers=(LAYER,), env={"A": "1"}, user="dev", workdir="/srv", owner="tenant-1"))
    got = store.get("t")
    assert got.layers == (LAYER,) and got.env == {"A": "1"} and got.user == "dev" and got.owner == "tenant-1"
    assert [t.name for t in store.templates()] == ["t"]
    rootfs = store.rootfs("t")
    assert rootfs.layer_paths == (str(store.layers_dir / LAYER),) and rootfs.workdir == "/srv"


def test_deleting_a_template_frees_only_the_layers_no_other_template_uses(store):
    shared, own = _layer(store, "a" * 64), _layer(store, "b" * 64)
    store.put(Template(name="one", layers=(shared, own)))
    store.put(Template(name="two", layers=(shared,)))
    store.delete("one")
    assert not store.has_layer(own) and store.has_layer(shared)
    with pytest.raises(NotFound):
        store.get("one")


def test_a_memory_snapshot_keeps_its_checkpoint_beside_its_top_layer_and_loses_it_with_it(store):
    base, top = _layer(store, "a" * 64), _layer(store, "b" * 64)
    with pytest.raises(FailedPrecondition, match="without its checkpoint"):
        store.put(Template(name="snap", layers=(base, top), memory=True))
    checkpoint = store.tmp_dir / "scratch.memory"
    checkpoint.mkdir()
    (checkpoint / "pages-1.img").write_bytes(b"\0" * 4096)
    store.commit_memory(checkpoint, top)
    store.put(Template(name="snap", layers=(base, top), memory=True))
    store.put(Template(name="files", layers=(base, top)))  # the same files, booted afresh
    assert store.rootfs("snap").memory_image == str(store.memory_path(top))
    assert store.rootfs("files").memory_image is None
    assert store.memory_bytes(top) == 4096
    assert (store.root.stat().st_mode & 0o777) == 0o700  # a session's memory: root's alone
    store.delete("snap")
    assert store.memory_path(top).is_dir()  # `files` still holds the layer
    store.delete("files")
    assert not store.memory_path(top).exists() and not store.has_layer(top)


def test_a_template_in_use_is_not_deleted(store):
    store.put(Template(name="busy", layers=(_layer(store),)))
    with pytest.raises(FailedPrecondition, match="in use"):
        store.delete("busy", in_use={"busy"})
    assert store.exists("busy")


def test_tags_name_builds_that_outlive_newer_builds_and_keep_their_layers(store):
    v1, v2 = _layer(store, "a" * 64), _layer(store, "b" * 64)
    store.put(Template(name="app", layers=(v1,), env={"V": "1"}), tags=("default", "v1", "stable"))
    store.put(Template(name="app", layers=(v2,), env={"V": "2"}))  # a newer build: the default tag only
    assert store.get("app").env == {"V": "2"} and store.get("app:default").env == {"V": "2"}
    assert store.get("app:v1").env == {"V": "1"} and store.get("app:v1").name == "app:v1"
    assert store.rootfs("app:stable").layer_paths == (str(store.layers_dir / v1),)
    assert sorted(store.tags("app")) == ["default", "stable", "v1"]
    assert [t.name for t in store.templates()] == ["app"]  # tags are not templates of their own
    with pytest.raises(NotFound, match="no tag 'v9'"):
        store.get("app:v9")
    with pytest.raises(InvalidArgument):
        store.get("app:Bad Tag")

    # A build registered under a tag only leaves the default alone (but a first build is the default).
    store.put(Template(name="app", layers=(v2,), env={"V": "3"}), tags=("canary",))
    assert store.get("app").env == {"V": "2"} and store.get("app:canary").env == {"V": "3"}
    store.put(Template(name="fresh", layers=(v2,)), tags=("v1",))
    assert store.get("fresh").layers == (v2,)

    store.untag("app", ["stable", "v1"])
    assert sorted(store.tags("app")) == ["canary", "default"]
    with pytest.raises(NotFound):
        store.untag("app", ["v1"])
    with pytest.raises(FailedPrecondition):
        store.untag("app", ["default"])
    # A running instance of one tag holds the whole template; deleting frees every tag's layers
    # no other template uses.
    store.put(Template(name="app", layers=(v1,)), tags=("old",))
    with pytest.raises(FailedPrecondition, match="in use"):
        store.delete("app", in_use={"app:old"})
    store.delete("fresh")
    store.delete("app")
    assert not store.has_layer(v1) and not store.has_layer(v2)
    assert not (store.tags_dir / "app.json").exists()


def test_a_layer_built_twice_at_once_keeps_the_first_and_scraps_are_swept(store):
    _layer(store)
    second = store.scratch()
    (second / "other").write_text("x")
    store.commit(second, LAYER)  # someone else's build of the same recipe won
    assert not (store.layer_path(LAYER) / "other").exists() and not second.exists()
    store.scratch()
    assert store.sweep() and not list(store.tmp_dir.iterdir())


def test_names_and_layer_ids_are_checked(store):
    for bad in ("", "Upper", "a/b", "../x", "x" * 64):
        with pytest.raises(InvalidArgument):
            check_name(bad)
    with pytest.raises(NotFound):
        store.layer_path("../../etc")


def test_a_debian_recipe_names_its_layer_and_every_input_changes_it(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n")
    first = debian.layer_id("bookworm", ["python3", "git"], "", [ca])
    assert first == debian.layer_id("bookworm", ["git", "python3"], "", [ca])  # order does not matter
    assert first != debian.layer_id("trixie", ["python3", "git"], "", [ca])
    assert first != debian.layer_id("bookworm", ["python3"], "", [ca])
    assert first != debian.layer_id("bookworm", ["python3", "git"], "http://mirror.internal/debian", [ca])
    setup = debian.layer_id("bookworm", ["python3", "git"], "", [ca], "pip install bash_kernel")
    assert setup not in (first, debian.layer_id("bookworm", ["python3", "git"], "", [ca], "pip install e2b-charts"))
    assert first == debian.layer_id("bookworm", ["python3", "git"], "", [ca], "")  # no setup: the old ids
    ca.write_text("-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n")
    assert first != debian.layer_id("bookworm", ["python3", "git"], "", [ca])


def test_a_bundle_of_certificates_is_split_one_per_file(tmp_path):
    bundle = tmp_path / "bundle.crt"
    one = "-----BEGIN CERTIFICATE-----\nONE\n-----END CERTIFICATE-----"
    two = "-----BEGIN CERTIFICATE-----\nTWO\n-----END CERTIFICATE-----"
    bundle.write_text(f"# comment\n{one}\n\n{two}\n{one}\n")
    assert debian.split_certificates([bundle]) == [one, two]
    assert "hutch-extra-1.crt" in debian.customize_script([bundle])


def test_build_steps_are_parsed_strictly_and_keyed_by_everything_they_depend_on():
    run = Step.parse({"type": "RUN", "args": ["apt-get install -y jq", "root"]})
    assert run.kind == "RUN" and run.args == ("apt-get install -y jq", "root")
    for bad in (
        {"type": "FROM", "args": ["x"]},
        {"type": "RUN", "args": []},
        {"type": "ENV", "args": ["A"]},
        {"type": "COPY", "args": ["a", "/b"]},  # no filesHash
        {"type": "RUN", "args": [1]},
    ):
        with pytest.raises(InvalidArgument):
            Step.parse(bad)
    state = State(layers=[LAYER])
    key = layer_key(state, run)
    assert key == layer_key(State(layers=[LAYER]), run)
    assert key != layer_key(State(layers=["b" * 64]), run)
    assert key != layer_key(State(layers=[LAYER], env={"A": "1"}), run)
    assert key != layer_key(State(layers=[LAYER], user="root"), run)


def test_image_references_name_their_registry_and_image_config_gives_defaults():
    assert oci.registry_of("127.0.0.1:5000/test/mini:1") == "127.0.0.1:5000"
    assert oci.registry_of("registry.example.com/a/b") == "registry.example.com"
    assert oci.registry_of("ubuntu:22.04") == "docker.io" and oci.registry_of("library/ubuntu") == "docker.io"
    config = {"Env": ["PATH=/x", "A=1"], "WorkingDir": "/srv", "User": "app:app"}
    assert oci.defaults(config) == {"env": {"A": "1"}, "workdir": "/srv", "user": "app"}
    assert oci.defaults({"User": "1000"})["user"] == "user"


@pytest.mark.parametrize("linked", ["run", "usr", "usr/bin/sudo", "etc/resolv.conf", "tmp", "opt"])
def test_a_layer_with_a_link_at_or_above_a_mount_point_is_refused(tmp_path, linked):
    from hutch.runtime.rootfs import refuse_linked_mount_points

    tree = tmp_path / "layer"
    for directory in ("etc", "usr/bin", "opt", "run"):
        (tree / directory).mkdir(parents=True)
    refuse_linked_mount_points(tree, "a clean layer")  # directories where sandboxes mount: fine
    target = tree / linked
    if target.is_dir():
        shutil.rmtree(target)
    os.symlink("/oldroot/var/tmp", target)
    with pytest.raises(FailedPrecondition, match=f"step 3 left a symbolic link .*/{linked} -> /oldroot/var/tmp"):
        refuse_linked_mount_points(tree, "step 3")
