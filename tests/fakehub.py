"""A Hugging Face hub on 127.0.0.1 for download tests: the endpoints huggingface_hub calls.

``doppelbot model download`` runs the real huggingface_hub code (``HfApi.model_info``,
``hf_hub_url``, ``http_get``) against this server through ``HF_ENDPOINT``; only the network is
fake. It serves, like huggingface.co:

- ``GET /api/models/{repo}[/revision/{rev}]`` — the repository's metadata with ``siblings``
  (``rfilename``, ``size``, ``blobId`` and, for LFS files, ``lfs.sha256``) and the commit ``sha``;
- ``GET|HEAD /{repo}/resolve/{rev}/{path}`` — a small file directly (``ETag`` = its git blob
  id), an LFS file as a 302 to ``/cdn/{sha256}`` (the hub's redirect to its CDN), with
  ``X-Repo-Commit`` / ``X-Linked-Etag`` / ``X-Linked-Size``;
- ``GET /cdn/{sha256}`` with ``Range: bytes=N-`` (206) as a CDN does.

Test controls: ``corrupt[path] = bytes`` serves other bytes than the metadata promises;
``stall[path] = n`` sends the first ``n`` bytes of the file and then holds the connection open
until ``release`` is set (so a test can kill the client mid-file); ``requests`` records every
request as ``(method, path, range header)``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LFS_FROM = 1024  # files at least this big are stored in LFS (the hub's rule is by type/size)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    _sha256: dict[str, str] = field(default_factory=dict, repr=False)

    def is_lfs(self, path: str) -> bool:
        return len(self.files[path]) >= LFS_FROM

    def sha256(self, path: str) -> str:
        if path not in self._sha256:
            self._sha256[path] = hashlib.sha256(self.files[path]).hexdigest()
        return self._sha256[path]

    def siblings(self) -> list[dict[str, Any]]:
        out = []
        for path, data in sorted(self.files.items()):
            entry: dict[str, Any] = {"rfilename": path, "size": len(data)}
            if self.is_lfs(path):
                sha = self.sha256(path)
                pointer = (
                    f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\n"
                    f"size {len(data)}\n"
                )
                entry["blobId"] = git_blob_sha1(pointer.encode())
                entry["lfs"] = {
                    "sha256": sha,
                    "size": len(data),
                    "pointerSize": len(pointer),
                }
            else:
                entry["blobId"] = git_blob_sha1(data)
            out.append(entry)
        return out


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    corrupt: dict[str, bytes] = field(default_factory=dict)
    stall: dict[str, int] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # --- serving --------------------------------------------------------------------------------
    def _find(self, sha: str) -> tuple[str, bytes] | None:
        for repo in self.repos.values():
            for path, data in repo.files.items():
                if repo.is_lfs(path) and repo.sha256(path) == sha:
                    return path, data
        return None

    def _handle(self, req: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = req.path.split("?", 1)[0]
        self.requests.append((req.command, path, req.headers.get("Range")))
        api = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
        if api:
            repo = self.repos.get(api.group(1))
            if repo is None:
                return self._send(
                    req,
                    404,
                    b'{"error":"Repository not found"}',
                    head=head,
                    headers={"X-Error-Code": "RepoNotFound"},
                )
            body = json.dumps(
                {"id": api.group(1), "sha": repo.commit, "siblings": repo.siblings()}
            ).encode()
            return self._send(req, 200, body, head=head, content_type="application/json")
        resolve = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        if resolve:
            repo = self.repos.get(resolve.group(1))
            name = resolve.group(3)
            if repo is None or name not in repo.files:
                return self._send(
                    req, 404, b"not found", head=head, headers={"X-Error-Code": "EntryNotFound"}
                )
            data = repo.files[name]
            common = {"X-Repo-Commit": repo.commit}
            if repo.is_lfs(name):
                sha = repo.sha256(name)
                return self._send(
                    req,
                    302,
                    b"",
                    head=True,
                    headers={
                        **common,
                        "Location": f"{self.url}/cdn/{sha}",
                        "X-Linked-Etag": f'"{sha}"',
                        "X-Linked-Size": str(len(data)),
                        "ETag": f'"{git_blob_sha1(data)}"',
                    },
                )
            return self._content(
                req, name, data, head=head, headers={**common, "ETag": f'"{git_blob_sha1(data)}"'}
            )
        cdn = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
        if cdn:
            found = self._find(cdn.group(1))
            if found is None:
                return self._send(req, 404, b"not found", head=head)
            return self._content(req, found[0], found[1], head=head, headers={})
        return self._send(req, 404, b"not found", head=head)

    def _content(
        self,
        req: BaseHTTPRequestHandler,
        name: str,
        data: bytes,
        *,
        head: bool,
        headers: dict[str, str],
    ) -> None:
        data = self.corrupt.get(name, data)
        start = 0
        wanted = req.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if match:
            start = int(match.group(1))
        body = data[start:]
        status = 206 if match else 200
        extra = dict(headers)
        if match:
            extra["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        req.send_response(status)
        for key, value in extra.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Accept-Ranges", "bytes")
        req.end_headers()
        if head:
            return
        stall_at = self.stall.get(name)
        try:
            if stall_at is not None and start < stall_at:
                req.wfile.write(body[: stall_at - start])
                req.wfile.flush()
                self.stalled.set()
                self.release.wait(60)
                return
            req.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(
        self,
        req: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        *,
        head: bool,
        headers: dict[str, str] | None = None,
        content_type: str = "text/plain",
    ) -> None:
        req.send_response(status)
        for key, value in (headers or {}).items():
            req.send_header(key, value)
        req.send_header("Content-Type", content_type)
        req.send_header("Content-Length", str(0 if status == 302 else len(body)))
        req.end_headers()
        if not head and status != 302:
            req.wfile.write(body)
