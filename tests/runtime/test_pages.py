"""Compressed page images of hibernations (`hutch.runtime.pages`), without CRIU: the files as a
dump leaves them, compressed and expanded again."""

from __future__ import annotations

import os
import stat

import pytest

from hutch.errors import IsolationError
from hutch.runtime.pages import PageCompression

PAGES = b"\x07" * (4 << 20) + os.urandom(1 << 20)


@pytest.fixture
def images(tmp_path):
    (tmp_path / "pages-1.img").write_bytes(PAGES)
    (tmp_path / "pages-1.img").chmod(0o644)
    (tmp_path / "inventory.img").write_bytes(b"kept as it is")
    return tmp_path


def test_pages_are_compressed_and_expanded_only_for_the_restore(images):
    PageCompression().compress(images)
    packed = images / "pages-1.img.zst"
    assert sorted(os.listdir(images)) == ["inventory.img", "pages-1.img.zst"]
    assert packed.stat().st_size < len(PAGES) // 3
    assert stat.S_IMODE(packed.stat().st_mode) == 0o644
    for _ in range(2):  # as often as restores are tried
        with PageCompression("none").expanded(images):  # whatever the setting now
            assert (images / "pages-1.img").read_bytes() == PAGES
        assert sorted(os.listdir(images)) == ["inventory.img", "pages-1.img.zst"]


def test_none_leaves_the_pages_as_they_are(images):
    PageCompression("none").compress(images)
    with PageCompression().expanded(images):
        assert (images / "pages-1.img").read_bytes() == PAGES
    assert (images / "pages-1.img").read_bytes() == PAGES


@pytest.mark.parametrize("damage", ["cut", "flipped"])
def test_a_damaged_page_image_is_refused(images, damage):
    PageCompression().compress(images)
    packed = images / "pages-1.img.zst"
    data = bytearray(packed.read_bytes())
    if damage == "cut":
        del data[len(data) // 2 :]
    else:
        data[len(data) // 2] ^= 0xFF
    packed.write_bytes(bytes(data))
    with (
        pytest.raises(IsolationError, match=r"hibernation image pages-1\.img\.zst"),
        PageCompression().expanded(images),
    ):
        pytest.fail("expanded a damaged image")
    assert sorted(os.listdir(images)) == ["inventory.img", "pages-1.img.zst"]


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown hibernation compression"):
        PageCompression("gzip")
