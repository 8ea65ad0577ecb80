"""Compression of a hibernation image's memory pages (CRIU's `pages-*.img`, nearly all of its
size) with zstd, so that a hibernated session costs less disk.

After a good dump each `pages-N.img` becomes `pages-N.img.zst` (level 1: Python heaps shrink 4-7x
at a few hundred MB/s per core); a restore expands them next to their compressed copies for CRIU
and removes the expanded ones once CRIU has read them, whether it succeeded or not, so that the
image on disk stays compressed and restorable as often as a restore fails.

Each file is one zstd frame with its content size and checksum: a truncated or corrupt page image
fails the restore (IsolationError) instead of restoring wrong memory.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import zstandard

from hutch.errors import IsolationError

log = logging.getLogger(__name__)

COMPRESSIONS = ("zstd", "none")
SUFFIX = ".zst"
_PATTERN = "pages-*.img"
_CHUNK = 1 << 20


class PageCompression:
    """How a runtime stores the page images of its hibernations (`[hibernation] compress`)."""

    def __init__(self, method: str = "zstd", level: int = 1) -> None:
        if method not in COMPRESSIONS:
            raise ValueError(f"unknown hibernation compression {method!r} (one of {', '.join(COMPRESSIONS)})")
        self.method = method
        self.level = level

    @property
    def enabled(self) -> bool:
        return self.method == "zstd"

    def compress(self, images: Path) -> None:
        """Compress every page image in `images` in place (same owner and mode), if enabled; one
        that cannot be (a full disk) stays as it is."""
        if not self.enabled:
            return
        # Single-threaded: hibernations run side by side already, and on a 2-core host two
        # workers per file were slower than one.
        compressor = zstandard.ZstdCompressor(level=self.level, write_checksum=True)
        for plain in sorted(images.glob(_PATTERN)):
            packed = plain.with_name(plain.name + SUFFIX)
            info = plain.stat()
            try:
                with open(plain, "rb") as source, _new_file(packed, info) as target:
                    compressor.copy_stream(source, target, size=info.st_size, read_size=_CHUNK, write_size=_CHUNK)
            except (zstandard.ZstdError, OSError) as exc:
                # The session's processes are gone already: its image stays as CRIU wrote it.
                log.warning("%s stays uncompressed: %s", plain, exc)
                with contextlib.suppress(FileNotFoundError):
                    packed.unlink()
                continue
            plain.unlink()

    @contextlib.contextmanager
    def expanded(self, images: Path) -> Iterator[None]:
        """The page images of `images` readable by CRIU for the `with` block: compressed ones
        expanded beside their compressed copies, and those expansions removed afterwards (the
        image stays as it was, restorable again). Works whatever the setting: an image written
        with compression on is restored after it is switched off, and the other way round."""
        packed = sorted(images.glob(_PATTERN + SUFFIX))
        made: list[Path] = []
        try:
            for each in packed:
                plain = each.with_name(each.name.removesuffix(SUFFIX))
                made.append(plain)
                _expand(each, plain)
            yield
        finally:
            for plain in made:
                with contextlib.suppress(FileNotFoundError):
                    plain.unlink()


def _expand(packed: Path, plain: Path) -> None:
    info = packed.stat()
    try:
        with open(packed, "rb") as source:
            expected = zstandard.get_frame_parameters(source.read(18)).content_size
            source.seek(0)
            with _new_file(plain, info) as target:
                _, written = zstandard.ZstdDecompressor().copy_stream(
                    source, target, read_size=_CHUNK, write_size=_CHUNK
                )
    except (zstandard.ZstdError, OSError) as exc:
        raise IsolationError(f"hibernation image {packed.name} cannot be read: {exc}") from None
    if written != expected:
        raise IsolationError(f"hibernation image {packed.name} is cut short ({written} of {expected} bytes)")


def _new_file(path: Path, like: os.stat_result) -> io.BufferedWriter:
    """`path` opened for writing, created anew with the owner and mode of `like` (page images
    are read by the restored tasks through CRIU: the namespace owner's, 0644)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.fchown(fd, like.st_uid, like.st_gid)
    os.fchmod(fd, like.st_mode & 0o777)
    return os.fdopen(fd, "wb")
