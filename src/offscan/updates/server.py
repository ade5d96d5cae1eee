"""The update server: a directory of ``.osb`` bundles over HTTP, with a ``latest`` index.

:class:`UpdateServer` serves every valid bundle in one directory by name and a small JSON
index of them with an ETag, so an idle poll is a 304 of a few hundred bytes; it counts every
byte it sends and receives, headers included. It only reads the directory (publish by renaming
a complete file into it) and touches nothing else. :class:`BundleEntry` is the index's row,
shared with the client.
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import shutil
import sys
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._common import FILE_NAME, HEX64, UpdateError, is_int, sha256_hex
from .bundle import BUNDLE_SUFFIX, Bundle, Kind, bundle_bytes

log = logging.getLogger(__name__)

INDEX_FORMAT = "offscan-updates"
INDEX_FORMAT_VERSION = 1
INDEX_PATH = "latest"
MAX_INDEX_SIZE = 4 << 20  # bytes
DEFAULT_PORT = 8474
SERVER_POLL_INTERVAL = 0.1  # seconds; how fast a background server notices close()


@dataclass(frozen=True, slots=True)
class BundleEntry:
    """One bundle the server offers, as listed in its ``latest`` index."""

    name: str
    kind: Kind
    version: int
    parent: int | None
    size: int  # bytes
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "version": self.version,
            "parent": self.parent,
            "size": self.size,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, obj: object) -> BundleEntry:
        if not isinstance(obj, dict):
            raise UpdateError("update index: bundle entry is not an object")
        name, kind, version, parent = (
            obj.get("name"),
            obj.get("kind"),
            obj.get("version"),
            obj.get("parent"),
        )
        size, sha = obj.get("size"), obj.get("sha256")
        if not isinstance(name, str) or not FILE_NAME.match(name):
            raise UpdateError(f"update index: bad bundle name {name!r}")
        if kind not in ("full", "delta") or not is_int(version) or not is_int(size) or size < 0:
            raise UpdateError(f"update index: bad entry for {name}")
        if not (parent is None if kind == "full" else is_int(parent)):
            raise UpdateError(f"update index: bad parent for {name}")
        if not isinstance(sha, str) or not HEX64.match(sha):
            raise UpdateError(f"update index: bad sha256 for {name}")
        return cls(name, kind, version, parent, size, sha)


class _Catalog:
    """The bundles in a directory, re-read when a file's (size, mtime, inode) changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int, int], BundleEntry | None]] = {}
        self._index: tuple[bytes, str] = (b"", "")
        self._index_key: tuple[Any, ...] | None = None

    def refresh(self) -> tuple[bytes, str, dict[str, BundleEntry]]:
        with self._lock:
            seen: dict[str, BundleEntry] = {}
            keys = []
            try:
                names = sorted(os.listdir(self.directory))
            except OSError as exc:
                log.warning("%s: cannot list: %s", self.directory, exc)
                names = []
            for name in names:
                if not name.endswith(BUNDLE_SUFFIX) or not FILE_NAME.match(name):
                    continue
                path = self.directory / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                key = (st.st_size, st.st_mtime_ns, st.st_ino)
                cached = self._cache.get(name)
                if cached is None or cached[0] != key:
                    cached = (key, self._read_entry(path))
                    self._cache[name] = cached
                if cached[1] is not None:
                    seen[name] = cached[1]
                    keys.append((name, key))
            for gone in set(self._cache) - {n for n in names}:
                del self._cache[gone]
            if tuple(keys) != self._index_key:
                entries = sorted(
                    seen.values(),
                    key=lambda e: (e.version, e.kind != "full", e.parent or 0, e.name),
                )
                doc = {
                    "format": INDEX_FORMAT,
                    "format_version": INDEX_FORMAT_VERSION,
                    "latest": max((e.version for e in entries), default=None),
                    "bundles": [e.to_json() for e in entries],
                }
                body = (json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n").encode()
                self._index = (body, f'"{sha256_hex(body)[:32]}"')
                self._index_key = tuple(keys)
            return self._index[0], self._index[1], seen

    def _read_entry(self, path: Path) -> BundleEntry | None:
        try:
            data = bundle_bytes(path)
            b = Bundle.from_bytes(data)
            b.check_digests()
        except UpdateError as exc:
            log.warning("%s: not served: %s", path, exc)
            return None
        if b.signature is None:
            log.warning("%s: unsigned; clients will reject it", path)
        m = b.manifest
        return BundleEntry(path.name, m.kind, m.version, m.parent, len(data), sha256_hex(data))


class _CountingWriter:
    """Counts bytes written to the handler's ``wfile`` into the server's stats."""

    def __init__(self, raw: io.BufferedIOBase, server: _HTTPServer) -> None:
        self._raw, self._server = raw, server

    def write(self, data: bytes) -> int:
        n = self._raw.write(data)
        self._server.count(sent=len(data))
        return n if n is not None else len(data)

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)


class CountingReader:
    """Counts bytes consumed from a buffered reader (for both the server and the client)."""

    def __init__(self, raw: io.BufferedIOBase, add: Callable[[int], None]) -> None:
        self._raw, self._add = raw, add

    def _counted(self, data: bytes) -> bytes:
        self._add(len(data))
        return data

    def readline(self, *args: Any) -> bytes:
        return self._counted(self._raw.readline(*args))

    def read(self, *args: Any) -> bytes:
        return self._counted(self._raw.read(*args))

    def read1(self, *args: Any) -> bytes:
        return self._counted(self._raw.read1(*args))

    def readinto(self, b: Any) -> int:
        n = self._raw.readinto(b)
        self._add(n or 0)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a fleet of agents polls at once; socketserver's default is 5

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            return  # a client that went away mid-reply is not a server error
        super().handle_error(request, client_address)

    def __init__(self, address: tuple[str, int], catalog: _Catalog) -> None:
        self.catalog = catalog
        self.stats = {"requests": 0, "not_modified": 0, "bytes_sent": 0, "bytes_received": 0}
        self._stats_lock = threading.Lock()
        super().__init__(address, _UpdateHandler)

    def count(
        self, *, sent: int = 0, received: int = 0, requests: int = 0, not_modified: int = 0
    ) -> None:
        with self._stats_lock:
            self.stats["bytes_sent"] += sent
            self.stats["bytes_received"] += received
            self.stats["requests"] += requests
            self.stats["not_modified"] += not_modified


class _UpdateHandler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "offscan-updates"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        # Duck-typed stand-ins for the buffered files (not io subclasses, whose close() and
        # __del__ would change how the handler shuts a connection down).
        self.wfile = _CountingWriter(self.wfile, self.server)  # type: ignore[assignment]
        self.rfile = CountingReader(self.rfile, self._count_received)  # type: ignore[assignment]

    def _count_received(self, n: int) -> None:
        self.server.count(received=n)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        self.server.count(requests=1)
        path = urllib.parse.urlsplit(self.path).path.lstrip("/")
        index, etag, entries = self.server.catalog.refresh()
        if path in (INDEX_PATH, INDEX_PATH + ".json"):
            if self._not_modified(etag):
                return
            self._headers(200, len(index), etag, "application/json", cache="no-cache")
            if not head:
                self.wfile.write(index)
            return
        entry = entries.get(urllib.parse.unquote(path))
        if entry is None:
            body = b"not found\n"
            self._headers(404, len(body), None, "text/plain")
            if not head:
                self.wfile.write(body)
            return
        etag = f'"{entry.sha256}"'
        if self._not_modified(etag):
            return
        try:
            f = open(self.server.catalog.directory / entry.name, "rb")  # closed by the with below
        except OSError:
            self._headers(404, 0, None, "text/plain")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            self._headers(
                200, size, etag, "application/octet-stream", cache="max-age=31536000, immutable"
            )
            if not head:
                shutil.copyfileobj(f, self.wfile)

    def _not_modified(self, etag: str) -> bool:
        header = self.headers.get("If-None-Match")
        if not header:
            return False
        tags = [t.strip().removeprefix("W/") for t in header.split(",")]
        if etag not in tags and "*" not in tags:
            return False
        self.server.count(not_modified=1)
        self.send_response(304)
        self.send_header("ETag", etag)
        self.end_headers()
        return True

    def _headers(
        self, code: int, length: int, etag: str | None, ctype: str, *, cache: str | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        if etag:
            self.send_header("ETag", etag)
        if cache:
            self.send_header("Cache-Control", cache)
        self.end_headers()


class UpdateServer:
    """A static HTTP server for a directory of ``.osb`` bundles plus a ``latest`` index.

    ``GET /latest`` returns JSON (``latest`` version and every bundle's kind, version, parent,
    size and sha256) with an ETag, so an idle poll with ``If-None-Match`` is a 304 of a few
    hundred bytes. ``GET /NAME`` returns a bundle. Publish by renaming a complete file into
    the directory; the index follows on the next request. Use as a context manager in tests.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
    ) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UpdateError(f"{self.directory}: not a directory")
        self._httpd = _HTTPServer((host, port), _Catalog(self.directory))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        if isinstance(host, bytes):
            host = host.decode()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    @property
    def stats(self) -> dict[str, int]:
        """Requests served, 304s, and exact bytes sent and received (headers included)."""
        with self._httpd._stats_lock:
            return dict(self._httpd.stats)

    def index(self) -> dict[str, Any]:
        body, _, _ = self._httpd.catalog.refresh()
        return json.loads(body)

    def start(self) -> UpdateServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            args=(SERVER_POLL_INTERVAL,),
            name="offscan-update-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> UpdateServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
