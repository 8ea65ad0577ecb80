"""Paths in agent requests: resolve them against the user's home, and turn OS errors into ours.

The agent runs as the sandbox user, so the kernel already decides what may be touched; this
module only makes the answers clear (a 404 for a missing file, a 403 for a forbidden one, a 400
for a path that cannot be a path) instead of a traceback.
"""

from __future__ import annotations

import errno
import os

from hutch.errors import (
    AlreadyExists,
    FailedPrecondition,
    HutchError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)

MAX_PATH = 4096
MAX_NAME = 255


def resolve(path: str | None, home: str) -> str:
    """An absolute, normalised path; relative ones start at `home`, empty means `home`."""
    if path is None or path == "":
        return home
    if not isinstance(path, str):
        raise InvalidArgument("path must be a string")
    if "\x00" in path:
        raise InvalidArgument("path contains a NUL byte")
    if len(path) > MAX_PATH:
        raise InvalidArgument(f"path longer than {MAX_PATH} characters")
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    full = os.path.normpath(os.path.join(home, path))
    if any(len(part) > MAX_NAME for part in full.split("/")):
        raise InvalidArgument(f"a path component is longer than {MAX_NAME} characters")
    return full


def os_error(exc: OSError, path: str) -> HutchError:
    """The hutch error for an OSError raised while touching `path`."""
    code = exc.errno
    reason = exc.strerror or str(exc)
    if code == errno.ENOENT:
        return NotFound(f"path '{path}' does not exist")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDenied(f"permission denied on '{path}': {reason}")
    if code == errno.EEXIST:
        return AlreadyExists(f"path '{path}' already exists")
    if code in (errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.ELOOP, errno.EXDEV):
        return FailedPrecondition(f"'{path}': {reason}")
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.EFBIG):
        return ResourceExhausted(f"'{path}': {reason}")
    if code in (errno.ENAMETOOLONG, errno.EINVAL):
        return InvalidArgument(f"'{path}': {reason}")
    return HutchError(f"'{path}': {reason}")
