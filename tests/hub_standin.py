"""A small Hugging Face Hub stand-in on 127.0.0.1, speaking the Hub's real HTTP protocol.

The real ``huggingface_hub`` client talks to it through ``HF_ENDPOINT``. It serves:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (``?blobs=true``
  adds sizes and LFS sha256), as ``HfApi.model_info`` reads them;
* ``GET /api/models/{repo}/tree/{rev}[/{path}]``, as ``HfApi.list_repo_tree`` reads it;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: for LFS files a 302 to ``/lfs/{sha256}``
  on another host name (``localhost``, the CDN) with ``X-Repo-Commit``, ``X-Linked-Etag``
  and ``X-Linked-Size``, as the Hub redirects to its CDN; ``/lfs/...`` honours ``Range``.

Faults can be injected per file: a connection dropped after N bytes (once), wrong
bytes, a status code (401 gated, 404, 500), a delay per chunk. Every request is
logged with its ``Range`` header and the bytes sent, so tests can assert that a
resumed download transferred only the rest.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 1 << 16


@dataclass
class Fault:
    drop_after_bytes: int | None = None  # close the connection after this many body bytes, once
    corrupt: bool = False  # serve different bytes than the metadata promises
    status: int | None = None  # answer every request for the file with this status
    error_code: str | None = None  # X-Error-Code sent with ``status`` (GatedRepo, RepoNotFound, ...)
    delay_per_chunk_s: float = 0.0


@dataclass
class RemoteFile:
    path: str
    source: Path  # served from disk, so gigabyte files cost no memory
    size: int
    sha256: str
    listed_size: int | None = None  # a size for the API listing to claim instead (disk-space tests)


@dataclass
class Repo:
    repo_id: str
    commit: str
    files: dict[str, RemoteFile] = field(default_factory=dict)
    gated: bool = False


@dataclass
class LoggedRequest:
    method: str
    path: str
    range: str | None
    status: int
    body_bytes: int


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class HubStandIn:
    """Start with ``start()``; ``url`` is the ``HF_ENDPOINT`` to give the client."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults: dict[tuple[str, str], Fault] = {}
        self.requests: list[LoggedRequest] = []
        self.valid_tokens: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- content -------------------------------------------------------------

    def add_file(self, repo_id: str, path: str, source: Path, commit: str | None = None) -> RemoteFile:
        """Publish ``source`` as ``path`` in ``repo_id``; a new ``commit`` makes a new revision."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id, commit or hashlib.sha1(repo_id.encode()).hexdigest()))
        if commit:
            repo.commit = commit
        remote = RemoteFile(path, source, source.stat().st_size, _sha256(source))
        repo.files[path] = remote
        return remote

    def add_text(self, repo_id: str, path: str, text: str, tmp_dir: Path) -> RemoteFile:
        source = tmp_dir / f"{hashlib.sha1((repo_id + path).encode()).hexdigest()}.txt"
        source.write_text(text)
        return self.add_file(repo_id, path, source)

    def fault(self, repo_id: str, path: str, fault: Fault) -> None:
        self.faults[(repo_id, path)] = fault

    def downloads_of(self, path_suffix: str) -> list[LoggedRequest]:
        return [
            r
            for r in self.requests
            if r.method == "GET" and r.path.startswith("/lfs/") and r.path.endswith(path_suffix)
        ]

    # -- server --------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn_url(self) -> str:
        """The same server under another host name: the Hub redirects LFS downloads to a CDN host."""
        assert self._server is not None
        return f"http://localhost:{self._server.server_address[1]}"

    def start(self) -> HubStandIn:
        standin = self

        class Handler(_Handler):
            hub = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _log(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.requests.append(entry)


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API_MODEL = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
_API_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_LFS = re.compile(r"^/lfs/(?P<sha>[0-9a-f]{64})/(?P<repo>[^/]+/[^/]+)/(?P<file>.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the default stderr log
        pass

    # -- helpers -------------------------------------------------------------

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", log_path: str | None = None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.hub._log(LoggedRequest(self.command, log_path or self.path, self.headers.get("Range"), status, len(body)))

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode())

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _repo(self, repo_id: str, revision: str | None) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and self.headers.get("Authorization", "").removeprefix("Bearer ") not in self.hub.valid_tokens:
            self._error(
                401, "GatedRepo", "Access to model is restricted. You must have access to it and be authenticated."
            )
            return None
        if revision not in (None, "main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _file_fault(self, repo_id: str, path: str) -> Fault:
        return self.hub.faults.get((repo_id, path), Fault())

    # -- routes --------------------------------------------------------------

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        if match := _API_TREE.match(path):
            self._tree(match["repo"], match["rev"], match["path"] or "")
        elif match := _API_MODEL.match(path):
            self._model_info(match["repo"], match["rev"], "true" in query.get("blobs", []))
        elif match := _RESOLVE.match(path):
            self._resolve(match["repo"], match["rev"], match["file"])
        elif match := _LFS.match(path):
            self._lfs(match["sha"], match["repo"], match["file"])
        else:
            self._error(404, None, f"no route for {path}")

    def _model_info(self, repo_id: str, revision: str | None, blobs: bool) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        siblings: list[dict[str, Any]] = []
        for remote in repo.files.values():
            sibling: dict[str, Any] = {"rfilename": remote.path}
            if blobs:
                size = remote.listed_size or remote.size
                sibling.update(size=size, blobId=hashlib.sha1(remote.sha256.encode()).hexdigest())
                sibling["lfs"] = {"size": size, "sha256": remote.sha256, "pointerSize": 134}
            siblings.append(sibling)
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                         "gated": "auto" if repo.gated else False, "siblings": siblings, "tags": ["gguf"]})  # fmt: skip

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        entries = [
            {"type": "file", "oid": hashlib.sha1(remote.sha256.encode()).hexdigest(), "size": remote.size,
             "path": remote.path, "lfs": {"oid": remote.sha256, "size": remote.size, "pointerSize": 134}}
            for remote in repo.files.values()
            if remote.path.startswith(folder)
        ]  # fmt: skip
        self._json(200, entries)

    def _resolve(self, repo_id: str, revision: str, file_path: str) -> None:
        fault = self._file_fault(repo_id, file_path)
        if fault.status:
            self._error(fault.status, fault.error_code, f"injected {fault.status}")
            return
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        remote = repo.files.get(file_path)
        if remote is None:
            self._error(404, "EntryNotFound", f"{file_path} does not exist on {revision}")
            return
        headers = {
            "X-Repo-Commit": repo.commit,
            "ETag": f'"{hashlib.sha1(remote.sha256.encode()).hexdigest()}"',
            "X-Linked-Etag": f'"{remote.sha256}"',
            "X-Linked-Size": str(remote.size),
            "Location": f"{self.hub.cdn_url}/lfs/{remote.sha256}/{repo_id}/{file_path}",
        }
        self._send(302, headers)

    def _lfs(self, sha256: str, repo_id: str, file_path: str) -> None:
        repo = self.hub.repos.get(repo_id)
        remote = repo.files.get(file_path) if repo else None
        if remote is None or remote.sha256 != sha256:
            self._error(404, None, "no such blob")
            return
        fault = self._file_fault(repo_id, file_path)
        start, end = 0, remote.size - 1
        status = 200
        if (range_header := self.headers.get("Range")) and (match := re.match(r"bytes=(\d+)-(\d*)", range_header)):
            start = int(match[1])
            end = int(match[2]) if match[2] else end
            status = 206
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{remote.sha256}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{remote.size}")
        self.end_headers()
        sent = 0
        if self.command == "GET":
            sent = self._stream_body(remote, fault, start, length)
        self.hub._log(LoggedRequest(self.command, self.path, self.headers.get("Range"), status, sent))

    def _stream_body(self, remote: RemoteFile, fault: Fault, start: int, length: int) -> int:
        if fault == Fault():
            # No fault to inject: let the kernel send the file, as a CDN would, so the server
            # costs next to no CPU and benchmarks measure the client.
            self.wfile.flush()
            with open(remote.source, "rb") as stream:
                return self.connection.sendfile(stream, offset=start, count=length)
        sent = 0
        with open(remote.source, "rb") as stream:
            stream.seek(start)
            while sent < length:
                chunk = stream.read(min(CHUNK, length - sent))
                if not chunk:
                    break
                if fault.corrupt:
                    chunk = bytes(byte ^ 0xFF for byte in chunk[:16]) + chunk[16:]
                if fault.drop_after_bytes is not None and sent + len(chunk) > fault.drop_after_bytes:
                    chunk = chunk[: fault.drop_after_bytes - sent]
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    fault.drop_after_bytes = None  # once
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return sent
                if fault.delay_per_chunk_s:  # before the chunk: once the last is sent, the request is logged
                    time.sleep(fault.delay_per_chunk_s)
                self.wfile.write(chunk)
                sent += len(chunk)
        return sent
