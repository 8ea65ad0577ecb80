"""A streaming `multipart/form-data` reader (RFC 7578 over RFC 2046), and header parameters.

The body is read through a `read() -> bytes` callable (b"" at its end) and never held whole:
part data comes out as it arrives, minus a tail as long as the delimiter, which might be its start.

    reader = MultipartReader(read, boundary)
    while (headers := reader.next_part()) is not None:   # lower-case names -> values
        while chunk := reader.read():
            ...

A part not read to its end is skipped by the next `next_part()`.
"""

from __future__ import annotations

from hutch.errors import InvalidArgument

MAX_PART_HEAD = 16 * 1024
MAX_BOUNDARY = 200  # RFC 2046 allows 70; be lenient


def parse_params(value: str) -> tuple[str, dict[str, str]]:
    """`type/subtype; a=b; c="d \\" e"` -> ("type/subtype", {"a": "b", "c": 'd " e'}).

    The main value is lower-cased, as are parameter names; quoted values lose their quotes and
    backslash escapes (RFC 9110 quoted-string). The first of repeated parameters wins.
    """
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        if i >= n:
            break
        j = i
        while j < n and rest[j] not in "=;":
            j += 1
        key = rest[i:j].strip().lower()
        if j >= n or rest[j] == ";":
            i = j
            continue  # a parameter without a value: ignored
        j += 1
        while j < n and rest[j] in " \t":
            j += 1
        if j < n and rest[j] == '"':
            j += 1
            chars = []
            while j < n and rest[j] != '"':
                if rest[j] == "\\" and j + 1 < n:
                    j += 1
                chars.append(rest[j])
                j += 1
            val = "".join(chars)
            while j < n and rest[j] != ";":
                j += 1
        else:
            start = j
            while j < n and rest[j] != ";":
                j += 1
            val = rest[start:j].strip()
        if key and key not in params:
            params[key] = val
        i = j
    return main.strip().lower(), params


def filename_param(params: dict[str, str]) -> str | None:
    """The file name of a Content-Disposition: `filename*` (RFC 5987) first, then `filename`."""
    extended = params.get("filename*")
    if extended:
        charset, sep, rest = extended.partition("'")
        if sep:
            _, _, encoded = rest.partition("'")
            from urllib.parse import unquote

            try:
                return unquote(encoded, encoding=charset or "utf-8", errors="strict")
            except (LookupError, UnicodeDecodeError):
                pass
    return params.get("filename")


class MultipartReader:
    def __init__(self, read, boundary: str | None) -> None:
        if not boundary:
            raise InvalidArgument("multipart content type without a boundary")
        if len(boundary) > MAX_BOUNDARY:
            raise InvalidArgument("multipart boundary is too long")
        try:
            self._delim = b"\r\n--" + boundary.encode("ascii")
        except UnicodeEncodeError:
            raise InvalidArgument("multipart boundary is not ASCII") from None
        self._read = read
        # A leading CRLF lets a boundary at the very start match the same delimiter.
        self._buf = bytearray(b"\r\n")
        self._eof = False
        self._started = False
        self._in_part = False
        self._done = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        data = self._read()
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def next_part(self) -> dict[str, str] | None:
        """The headers of the next part, or None after the closing boundary."""
        if self._done:
            return None
        if self._in_part:
            while self.read():
                pass
        elif not self._started:
            self._skip_preamble()
        self._started = True
        while len(self._buf) < 2:
            if not self._fill():
                raise InvalidArgument("multipart body ended before its closing boundary")
        if self._buf[:2] == b"--":
            self._done = True
            return None
        headers = self._read_head()
        self._in_part = True
        return headers

    def _find_delimiter(self) -> tuple[int, bool]:
        """(index of the first delimiter in the buffer, or of where one may start, or -1; whether
        it is certain). A delimiter counts only when followed by whitespace, CRLF or "--", as
        Go's reader (envd's) decides: "--boundaryX" inside the data is data."""
        buf, delim = self._buf, self._delim
        start = 0
        while True:
            idx = buf.find(delim, start)
            if idx < 0:
                return -1, False
            after = idx + len(delim)
            if after >= len(buf):
                return idx, self._eof
            c = buf[after]
            if c in b" \t\r\n":
                return idx, True
            if c == 0x2D:  # "-"
                if after + 1 >= len(buf):
                    if not self._eof:
                        return idx, False
                elif buf[after + 1] == 0x2D:
                    return idx, True
            start = idx + 1

    def _skip_preamble(self) -> None:
        keep = len(self._delim)
        while True:
            idx, certain = self._find_delimiter()
            if certain:
                del self._buf[: idx + len(self._delim)]
                return
            drop = idx if idx >= 0 else len(self._buf) - keep
            if drop > 0:
                del self._buf[:drop]
            if not self._fill():
                raise InvalidArgument("multipart body has no boundary line")

    def _read_head(self) -> dict[str, str]:
        start = 0
        while True:
            idx = self._buf.find(b"\r\n\r\n", start)
            if idx >= 0:
                break
            if len(self._buf) > MAX_PART_HEAD:
                raise InvalidArgument("multipart part headers are too large")
            start = max(0, len(self._buf) - 3)
            if not self._fill():
                raise InvalidArgument("multipart body ended inside part headers")
        head = bytes(self._buf[:idx])
        del self._buf[: idx + 4]
        try:
            text = head.decode("utf-8")  # browsers and httpx send non-ASCII file names raw
        except UnicodeDecodeError:
            text = head.decode("latin-1")
        lines = text.split("\r\n")
        if lines[0].strip(" \t"):
            raise InvalidArgument("malformed multipart boundary line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise InvalidArgument("malformed multipart part header")
            headers.setdefault(name.strip().lower(), value.strip())
        return headers

    def read(self) -> bytes:
        """The next piece of the current part's data; b"" at its end."""
        if not self._in_part:
            return b""
        buf = self._buf
        while True:
            idx, certain = self._find_delimiter()
            if certain:
                data = bytes(buf[:idx])
                del buf[: idx + len(self._delim)]
                self._in_part = False
                return data
            # Everything before a possible delimiter is data; with none in sight, all but a
            # tail that could be the start of one.
            safe = idx if idx >= 0 else len(buf) - len(self._delim)
            if safe > 0:
                data = bytes(buf[:safe])
                del buf[:safe]
                return data
            if not self._fill():
                raise InvalidArgument("multipart body ended before its closing boundary")

    def drain(self, limit: int = 1 << 20) -> None:
        """Read what follows the closing boundary (the epilogue), up to `limit` bytes."""
        total = 0
        while total <= limit and self._fill():
            total += len(self._buf)
            self._buf.clear()
