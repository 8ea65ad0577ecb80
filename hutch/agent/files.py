"""envd's `/files` REST endpoint: download (GET) and upload (POST) whole files.

GET  /files?path=P[&username=U]
    The file's bytes as `application/octet-stream`, streamed in chunks (a small file goes out in
    one piece with a Content-Length). `Accept-Encoding: gzip` gets them gzip-compressed, and a
    single `Range: bytes=a-b` gets 206 with that part (uncompressed), as envd does.

POST /files?path=P[&username=U]
    `application/octet-stream`: the body is the file (`path` required).
    `multipart/form-data`: every part named `file` is a file, written to `path` when given, else
    to the part's filename (a path, as E2B's SDK sends several files at once).
    `Content-Encoding: gzip` bodies are decompressed as they stream. `X-Metadata-<key>: value`
    headers become the `user.e2b.<key>` xattrs of every file written (keys lower-cased); a file
    that is replaced gets exactly the new set. Parent directories are created.
    Answer: 200 `[{"path", "name", "type": "file", "metadata"?}]`.

Bodies go to disk as they arrive, and every file is fsynced before the answer, so an
acknowledged upload survives the sandbox being killed right after. A new file is created in
place (watchers see CREATE, CHMOD, WRITE, as with envd) and removed again if the upload fails; an
existing file is replaced by writing a temporary file beside it and renaming it over the file, so
a failed upload leaves the old content whole. Files that cannot be replaced that way (in a
directory the user may not write, devices, /proc) are written in place.

Errors are envd's REST shape `{"code": <status>, "message": ...}`: 404 missing, 400 a bad path or
body or a directory where a file is needed, 403 permission denied, 507 disk full.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from hutch.agent import paths
from hutch.agent.config import AgentConfig
from hutch.agent.entries import UPLOAD_TEMP_PREFIX, read_metadata, replace_metadata
from hutch.agent.http import Request, Response, StreamResponse, error_response, json_response
from hutch.errors import FailedPrecondition, HutchError, InvalidArgument, Unauthenticated

SMALL_FILE = 1024 * 1024  # sent whole with a Content-Length; bigger files are streamed
CHUNK = 256 * 1024
GUNZIP_OUT = 256 * 1024  # most bytes one step of decompression may produce
DISCARD_LIMIT = 64 * 1024 * 1024  # body bytes read and dropped after a failed upload
STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
METADATA_HEADER = "x-metadata-"
TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 64 * 1024
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _fs_error(exc: OSError, path: str) -> HutchError:
    error = paths.os_error(exc, path)
    error.__cause__ = exc
    return error


def _status(exc: HutchError) -> int | None:
    """507 for a full disk (or a file size limit), else the error's own status."""
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno in STORAGE_FULL:
        return 507
    return None


def http_date(seconds: float) -> str:
    t = time.gmtime(seconds)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def content_disposition(name: str) -> str:
    from urllib.parse import quote

    ascii_name = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name) or "download"
    value = f'attachment; filename="{ascii_name}"'
    if ascii_name != name:
        encoded = quote(name.encode("utf-8", "surrogateescape"), safe="")
        value += f"; filename*=UTF-8''{encoded}"
    return value


def wants_gzip(accept: str) -> bool:
    """Whether an Accept-Encoding header picks gzip, by envd's rules (q values, identity, *)."""
    if not accept:
        return False
    choices = []
    for item in accept.split(","):
        name, _, params = item.partition(";")
        quality = 1.0
        for param in params.split(";"):
            param = param.strip().lower()
            if param.startswith("q="):
                try:
                    quality = float(param[2:])
                except ValueError:
                    pass
        choices.append((name.strip().lower(), quality))
    identity_refused = any(name == "identity" and q == 0 for name, q in choices)
    for name, quality in sorted(choices, key=lambda c: -c[1]):
        if quality == 0:
            continue
        if name == "identity":
            return False
        if name == "*":
            return identity_refused
        if name in ("gzip", "x-gzip"):
            return True
    return False


def parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """A single `bytes=` range as (start, end inclusive); None to send everything; False when
    it cannot be satisfied."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # other units, or several ranges: the whole file is a valid answer
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    try:
        if first == "":
            length = int(last)
            if length <= 0:
                return False
            return (max(0, size - length), size - 1) if size else False
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        return False
    if start < 0 or end < start:
        return None
    return start, min(end, size - 1)


def request_metadata(headers: dict[str, str]) -> dict[str, str]:
    """The `X-Metadata-<key>` headers as {key: value}, keys lower-case, validated as envd does."""
    metadata = {}
    for name, value in headers.items():
        if not name.startswith(METADATA_HEADER):
            continue
        key = name[len(METADATA_HEADER) :].lower()
        if not key:
            continue
        if not TOKEN_CHARS.issuperset(key):
            raise InvalidArgument(f"invalid metadata key {key!r}: use letters, digits and !#$%&'*+-.^_`|~")
        if len(key.encode()) + len("user.e2b.") > MAX_XATTR_NAME:
            raise InvalidArgument(f"metadata key {key!r} is too long")
        if any(not (" " <= c <= "~") for c in value):
            raise InvalidArgument(f"invalid metadata value for key {key!r}: use printable US-ASCII")
        if len(value) > MAX_XATTR_VALUE:
            raise InvalidArgument(f"metadata value for key {key!r} is too long")
        metadata[key] = value
    return metadata


def gunzip(read):
    """`read` for a gzip stream -> `read` for its decompressed bytes (several members allowed)."""
    import zlib

    def chunks():
        d = zlib.decompressobj(31)
        while data := read():
            while data:
                if d.eof:
                    d = zlib.decompressobj(31)  # another member follows
                try:
                    out = d.decompress(data, GUNZIP_OUT)
                    while True:
                        if out:
                            yield out
                        if d.eof:
                            data = d.unused_data
                            break
                        data = d.unconsumed_tail
                        if data or len(out) < GUNZIP_OUT:
                            break
                        out = d.decompress(b"", GUNZIP_OUT)  # output held back by the limit
                except zlib.error as exc:
                    raise InvalidArgument(f"request body is not valid gzip: {exc}") from None
        if not d.eof:
            raise InvalidArgument("gzip request body is truncated")

    it = chunks()
    return lambda: next(it, b"")


# -- writing ---------------------------------------------------------------------------------


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pump(fd: int, read, path: str) -> None:
    """Write the body to `fd` as it arrives. Errors reading the body pass through unchanged."""
    while True:
        chunk = read()
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            try:
                written = os.write(fd, view)
            except OSError as exc:
                raise _fs_error(exc, path) from exc
            view = view[written:]


def _finish(fd: int, path: str, metadata: dict[str, str]) -> None:
    try:
        replace_metadata(fd, metadata)
    except OSError as exc:
        if exc.errno == errno.E2BIG or exc.errno == errno.ERANGE:
            raise InvalidArgument(f"metadata for '{path}' is too large") from exc
        raise _fs_error(exc, path) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS):  # files that cannot be synced (/proc)
            raise _fs_error(exc, path) from exc


def write_file(path: str, read, metadata: dict[str, str]) -> None:
    """Write the body `read` yields to `path`, durably; see the module docstring."""
    target = os.path.realpath(path) if os.path.islink(path) else path  # write through a symlink
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
    except FileExistsError:
        raise FailedPrecondition(f"'{parent}' exists and is not a directory") from None
    except OSError as exc:
        raise _fs_error(exc, parent) from exc
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _fs_error(exc, path) from exc
    if st is None:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            try:
                st = os.stat(target)  # created meanwhile: replace it instead
            except OSError as exc:
                raise _fs_error(exc, path) from exc
        except OSError as exc:
            raise _fs_error(exc, path) from exc
        else:
            _write_new(fd, target, path, read, metadata)
            _fsync_dir(parent)
            return
    if stat.S_ISDIR(st.st_mode):
        raise FailedPrecondition(f"path '{path}' is a directory")
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        raise FailedPrecondition(f"path '{path}' is not a regular file")  # opening it could hang
    if stat.S_ISREG(st.st_mode):
        tmp = os.path.join(parent, UPLOAD_TEMP_PREFIX + os.urandom(6).hex())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EINVAL, errno.EOPNOTSUPP):
                raise _fs_error(exc, path) from exc
        else:
            _replace(fd, tmp, target, path, st, read, metadata)
            _fsync_dir(parent)
            return
    # A directory the user may not write, a device, a FIFO, /proc: only in place will do.
    try:
        fd = os.open(target, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as exc:
        raise _fs_error(exc, path) from exc
    try:
        _pump(fd, read, path)
        _finish(fd, path, metadata)
    finally:
        _close(fd)


def _write_new(fd: int, target: str, path: str, read, metadata: dict[str, str]) -> None:
    done = False
    try:
        try:
            # Make sure the file is the sandbox user's, as envd (running as root) does; this
            # also gives watchers envd's CREATE, CHMOD, WRITE for a new file.
            st = os.fstat(fd)
            os.fchown(fd, st.st_uid, st.st_gid)
        except OSError:
            pass
        _pump(fd, read, path)
        _finish(fd, path, metadata)
        done = True
    finally:
        _close(fd)
        if not done:
            _unlink(target)  # no partial file left behind


def _replace(fd: int, tmp: str, target: str, path: str, old: os.stat_result, read, metadata) -> None:
    done = False
    try:
        try:
            os.fchmod(fd, stat.S_IMODE(old.st_mode))  # keep the replaced file's permissions
        except OSError:
            pass
        _pump(fd, read, path)
        _finish(fd, path, metadata)
        os.close(fd)
        fd = -1
        try:
            os.rename(tmp, target)
        except OSError as exc:
            raise _fs_error(exc, path) from exc
        done = True
    finally:
        if fd >= 0:
            _close(fd)
        if not done:
            _unlink(tmp)


# -- the endpoint ----------------------------------------------------------------------------


class FilesEndpoint:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.users = {"user", "root", config.user}

    def __call__(self, req: Request):
        try:
            if req.method == "GET":
                return self.download(req)
            if req.method == "POST":
                try:
                    return self.upload(req)
                except HutchError:
                    _discard(req)
                    raise
            resp = error_response(HutchError(f"{req.method} is not allowed on /files"), status=405)
            resp.headers.append(("allow", "GET, POST"))
            return resp
        except HutchError as exc:
            return error_response(exc, _status(exc))

    def _params(self, req: Request) -> dict[str, str]:
        params = req.query_params()
        username = params.get("username")
        if username and username not in self.users:
            raise Unauthenticated(f"error looking up user '{username}': no such user in this sandbox")
        return params

    # -- GET -----------------------------------------------------------------------------------

    def download(self, req: Request):
        params = self._params(req)
        path = paths.resolve(params.get("path"), self.config.user_home())
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise _fs_error(exc, path) from exc
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise FailedPrecondition(f"path '{path}' is a directory")
            if not stat.S_ISREG(st.st_mode):
                raise FailedPrecondition(f"path '{path}' is not a regular file")
            headers = [
                ("content-type", "application/octet-stream"),
                ("content-disposition", content_disposition(os.path.basename(path))),
                ("last-modified", http_date(st.st_mtime)),
                ("accept-ranges", "bytes"),
                ("vary", "Accept-Encoding"),
            ]
            range_header = req.headers.get("range")
            if range_header and st.st_size:
                span = parse_range(range_header, st.st_size)
                if span is False:
                    _close(fd)
                    resp = error_response(InvalidArgument("requested range not satisfiable"), status=416)
                    resp.headers.append(("content-range", f"bytes */{st.st_size}"))
                    return resp
                if span is not None:
                    start, end = span  # type: ignore[misc]
                    os.lseek(fd, start, os.SEEK_SET)
                    headers.append(("content-range", f"bytes {start}-{end}/{st.st_size}"))
                    return StreamResponse(206, FileChunks(fd, end - start + 1), headers)
            gzip = wants_gzip(req.headers.get("accept-encoding", ""))
            if gzip:
                headers.append(("content-encoding", "gzip"))
            first = _read_up_to(fd, SMALL_FILE)
        except OSError as exc:
            _close(fd)
            raise _fs_error(exc, path) from exc
        except BaseException:
            _close(fd)
            raise
        if len(first) < SMALL_FILE:
            _close(fd)
            if gzip:
                first = gzip_all(first)
            return Response(200, first, headers)
        chunks = FileChunks(fd, None, first)
        return StreamResponse(200, GzipChunks(chunks) if gzip else chunks, headers)

    # -- POST ----------------------------------------------------------------------------------

    def upload(self, req: Request) -> Response:
        from hutch.agent.multipart import MultipartReader, filename_param, parse_params

        params = self._params(req)
        metadata = request_metadata(req.headers)
        read = req.body.read
        encoding = req.headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            read = gunzip(read)
        elif encoding not in ("", "identity"):
            raise InvalidArgument(f"unsupported Content-Encoding {encoding!r}; supported: gzip")
        media, ctype_params = parse_params(req.headers.get("content-type", ""))
        path_param = params.get("path")
        written: list[dict] = []
        if media == "application/octet-stream":
            if path_param is None:
                raise InvalidArgument("the path query parameter is required for an octet-stream upload")
            written.append(self._write(path_param, read, metadata))
        elif media.startswith("multipart/"):
            reader = MultipartReader(read, ctype_params.get("boundary"))
            while (headers := reader.next_part()) is not None:
                _, disposition = parse_params(headers.get("content-disposition", ""))
                if disposition.get("name") != "file":
                    continue  # envd ignores other fields
                name = path_param if path_param is not None else filename_param(disposition)
                if not name:
                    raise InvalidArgument("a file part needs a filename, or the path query parameter")
                target = paths.resolve(name, self.config.user_home())
                if any(entry["path"] == target for entry in written):
                    raise InvalidArgument(
                        f"you cannot upload multiple files to the same path '{target}' in one request"
                    )
                written.append(self._write(name, reader.read, metadata))
            reader.drain()
        else:
            raise InvalidArgument(
                f"unsupported content type {media or 'none'!r}; "
                "expected multipart/form-data or application/octet-stream"
            )
        return json_response(written)

    def _write(self, name: str, read, metadata: dict[str, str]) -> dict:
        path = paths.resolve(name, self.config.user_home())
        write_file(path, read, metadata)
        entry: dict[str, object] = {"path": path, "name": os.path.basename(path), "type": "file"}
        persisted = read_metadata(path)
        if persisted:
            entry["metadata"] = persisted
        return entry


def _discard(req: Request) -> None:
    """Read the rest of a failed upload's body (bounded), so the client gets to read the answer
    instead of a reset connection."""
    body = req.body
    total = 0
    try:
        while total < DISCARD_LIMIT:
            data = body.read()
            if not data:
                return
            total += len(data)
    except (HutchError, OSError):
        pass


def _read_up_to(fd: int, limit: int) -> bytes:
    parts = []
    total = 0
    while total < limit:
        data = os.read(fd, min(CHUNK, limit - total))
        if not data:
            break
        parts.append(data)
        total += len(data)
    return b"".join(parts)


class FileChunks:
    """The chunks of an open file, `remaining` bytes of it (None: to its end). The fd is closed
    at the end or on close(), even when iteration never started."""

    def __init__(self, fd: int, remaining: int | None, first: bytes = b"") -> None:
        self.fd = fd
        self.remaining = remaining
        self.first = first

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        if self.first:
            data, self.first = self.first, b""
            return data
        if self.fd < 0 or self.remaining == 0:
            self.close()
            raise StopIteration
        size = CHUNK if self.remaining is None else min(CHUNK, self.remaining)
        try:
            data = os.read(self.fd, size)
        except OSError:
            self.close()
            raise
        if not data:
            self.close()
            raise StopIteration
        if self.remaining is not None:
            self.remaining -= len(data)
        return data

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            _close(fd)


class GzipChunks:
    """Chunks gzip-compressed as they pass (level 1: the sandbox's CPU is the user's)."""

    def __init__(self, chunks: FileChunks) -> None:
        import zlib

        self.chunks = chunks
        self.compressor: zlib._Compress | None = zlib.compressobj(1, zlib.DEFLATED, 31)

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        if self.compressor is None:
            raise StopIteration
        for chunk in self.chunks:
            out = self.compressor.compress(chunk)
            if out:
                return out
        out, self.compressor = self.compressor.flush(), None
        return out

    def close(self) -> None:
        self.chunks.close()


def gzip_all(data: bytes) -> bytes:
    import zlib

    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()
