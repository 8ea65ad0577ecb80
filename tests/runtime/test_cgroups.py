"""The cgroup layer's path and file logic, on a directory tree shaped like cgroupfs (v1 and v2).

The real v1 hierarchy of this machine is exercised by every sandbox test; these cover the layouts
this machine does not have (pure v2), and the parsing both share.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hutch.errors import BackendUnavailable
from hutch.runtime.base import Resources
from hutch.runtime.cgroups import CgroupManager, parse_mountinfo, parse_proc_cgroup

V1_MOUNTINFO = """\
25 20 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs ro,mode=755
27 25 0:24 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
30 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
32 25 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
33 25 0:30 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
"""
V1_PROC = "6:freezer:/\n5:pids:/\n4:memory:/box/7\n3:cpu,cpuacct:/\n0::/box/7\n"

V2_MOUNTINFO = "25 20 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
V2_PROC = "0::/system.slice/hutch.service\n"


def _fake_v2(root: Path) -> Path:
    top = root / "sys/fs/cgroup"
    own = top / "system.slice/hutch.service"
    own.mkdir(parents=True)
    (top / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (top / "cgroup.procs").write_text("")
    return own


def test_mountinfo_and_proc_cgroup_are_parsed_for_v1_and_hybrid_hosts():
    mounts, unified = parse_mountinfo(V1_MOUNTINFO)
    assert mounts["memory"] == Path("/sys/fs/cgroup/memory")
    assert mounts["cpu"] == mounts["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert unified == Path("/sys/fs/cgroup/unified")
    paths, v2 = parse_proc_cgroup(V1_PROC)
    assert paths["memory"] == "/box/7" and paths["cpu"] == "/" and v2 == "/box/7"


def test_v1_instance_cgroups_nest_under_hutchs_own_and_get_their_limits(tmp_path):
    for controller in ("memory", "cpu,cpuacct", "pids", "freezer", "unified"):
        (tmp_path / "sys/fs/cgroup" / controller).mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/unified/cgroup.procs").write_text("")
    (tmp_path / "sys/fs/cgroup/memory/box/7").mkdir(parents=True)
    (tmp_path / "sys/fs/cgroup/unified/box/7").mkdir(parents=True)
    manager = CgroupManager("hutch", root=tmp_path, mountinfo=V1_MOUNTINFO, proc_cgroup=V1_PROC)
    cgroup = manager.create("i1", Resources(cpu=0.5, memory_mb=256, pids=64))
    memory = tmp_path / "sys/fs/cgroup/memory/box/7/hutch/i1"
    assert cgroup.dirs["memory"] == memory
    assert (memory / "memory.limit_in_bytes").read_text() == str(256 << 20)
    cpu = tmp_path / "sys/fs/cgroup/cpu,cpuacct/hutch/i1"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "50000"
    assert (tmp_path / "sys/fs/cgroup/pids/hutch/i1/pids.max").read_text() == "64"
    assert cgroup.kill_dir == tmp_path / "sys/fs/cgroup/unified/box/7/hutch/i1"


def test_v2_enables_the_controllers_below_hutchs_own_cgroup(tmp_path):
    own = _fake_v2(tmp_path)
    manager = CgroupManager("hutch", root=tmp_path, mountinfo=V2_MOUNTINFO, proc_cgroup=V2_PROC)
    assert manager.version == 2
    assert (own / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (own / "hutch/cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    cgroup = manager.create("i2", Resources(cpu=2, memory_mb=1024, pids=100))
    unified = own / "hutch/i2"
    assert cgroup.dirs == {"unified": unified}
    assert (unified / "memory.max").read_text() == str(1024 << 20)
    assert (unified / "cpu.max").read_text() == "200000 100000"
    assert (unified / "pids.max").read_text() == "100"


def test_v2_without_the_needed_controllers_is_refused_clearly(tmp_path):
    _fake_v2(tmp_path)
    (tmp_path / "sys/fs/cgroup/cgroup.controllers").write_text("hugetlb\n")
    with pytest.raises(BackendUnavailable, match="memory"):
        CgroupManager("hutch", root=tmp_path, mountinfo=V2_MOUNTINFO, proc_cgroup=V2_PROC)


def test_a_host_without_cgroups_is_refused_clearly(tmp_path):
    with pytest.raises(BackendUnavailable):
        CgroupManager("hutch", root=tmp_path, mountinfo="", proc_cgroup="")
