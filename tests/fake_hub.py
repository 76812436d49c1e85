"""A small in-memory Hugging Face Hub for upload/download tests (no network).

It implements the part of the Hub HTTP API that `huggingface_hub` 2.4 uses to push a folder and that
`from_pretrained` uses to read it back:

- `POST /api/repos/create`                        create_repo (409 when it exists: `exist_ok=True` accepts that)
- `POST /api/validate-yaml`                       the README.md front matter check done before a commit
- `POST /api/models/{repo}/preupload/{rev}`       upload modes: every file is "regular" (inline base64 in the commit)
- `POST /api/models/{repo}/commit/{rev}`          ndjson: header, file (base64), deletedFile, deletedFolder
- `GET  /api/models/{repo}[/revision/{rev}]`      model_info (sha, siblings, private)
- `GET  /api/models/{repo}/tree/{rev}[/{path}]`   list_repo_tree
- `HEAD|GET /{repo}/resolve/{rev}/{path}`         file metadata (X-Repo-Commit, ETag) and bytes

Writes need `Authorization: Bearer <token>`; private repos answer 404 without it, as the Hub does. Every other request
gets a 404 and is recorded in `FakeHub.unhandled`, so a test can see when a library starts calling something new.
Request bodies are capped (`max_body_bytes`) and the server never answers 5xx, so no client retry loop can spin on it.

The server binds 127.0.0.1 on an ephemeral port; use it as a context manager (or `start()` / `stop()`).
`hub_env(monkeypatch, hub)` points this process's `huggingface_hub` and transformers at it; `subprocess_env(hub, home)`
gives the environment for a fresh process.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

FAKE_USER = "fake-user"
DEFAULT_TOKEN = "hf_fake_write_token"


def _now() -> str:
    """UTC time in the Hub's format (huggingface_hub parses exactly `%Y-%m-%dT%H:%M:%S.%fZ`)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file, which the Hub reports as the ETag / oid of regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]  # the full tree after this commit


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    created_at: str = field(default_factory=_now)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def at(self, revision: str) -> Commit | None:
        """The commit a revision names: the branch "main" or a full commit id."""
        if revision == "main":
            return self.head
        return next((c for c in self.commits if c.oid == revision), None)


class HubError(Exception):
    """An HTTP error answer with the Hub's `X-Error-Code` header, which huggingface_hub maps to its exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None,
                 **payload):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit
        self.payload = {"error": message, **payload}


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, re.Pattern, str]] = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "model_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "tree"),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    ("HEAD", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


class FakeHub:
    """In-memory Hub state plus the HTTP server that serves it (see the module docstring)."""

    def __init__(self, token: str = DEFAULT_TOKEN, max_body_bytes: int = 64 * 2**20):
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state helpers for tests ----------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The file tree of a repo at a revision (raises KeyError for an unknown repo)."""
        return dict(self.repos[repo_id].at(revision).files)

    # -- API ------------------------------------------------------------------------------------------------------
    def _authorized(self, headers) -> bool:
        return headers.get("Authorization", "") == f"Bearer {self.token}"

    def _require_write(self, headers) -> None:
        if not self._authorized(headers):
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str, headers) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized(headers)):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.at(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def create_repo(self, headers, body, base_url):
        self._require_write(headers)
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            raise HubError(400, "this fake Hub only hosts model repos")
        name = payload.get("name") or ""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise HubError(400, f"invalid repo name {name!r}")
        repo_id = f"{payload.get('organization') or FAKE_USER}/{name}"
        with self._lock:
            if repo_id in self.repos:
                # The Hub's 409 carries the url too: `create_repo(exist_ok=True)` reads it
                raise HubError(409, "You already created this model repo", url=f"{base_url}/{repo_id}")
            repo = Repo(repo_id, private=payload.get("visibility", "public") == "private")
            gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            repo.commits.append(Commit(hashlib.sha1(repo_id.encode()).hexdigest(), "initial commit",
                                       {".gitattributes": gitattributes}))
            self.repos[repo_id] = repo
        return 200, {"url": f"{base_url}/{repo_id}", "name": repo_id}

    def validate_yaml(self, headers, body, base_url):
        content = json.loads(body)["content"]
        match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", content, re.S)
        if match is None:
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            meta = yaml.safe_load(match.group(1))
        except yaml.YAMLError as e:
            return 400, {"errors": [{"message": f"YAML parse error: {e}"}]}
        errors = []
        if not isinstance(meta, dict):
            errors.append("metadata must be a YAML mapping")
        else:
            for key in ("tags", "datasets", "language"):
                if key in meta and not isinstance(meta[key], (list, str)):
                    errors.append(f'"{key}" must be a string or a list of strings')
            if "base_model" in meta and not isinstance(meta["base_model"], (list, str)):
                errors.append('"base_model" must be a string or a list of strings')
        if errors:
            return 400, {"errors": [{"message": m} for m in errors]}
        return 200, {"errors": [], "warnings": []}

    def preupload(self, headers, body, base_url, repo, rev):
        self._require_write(headers)
        commit = self._commit(self._repo(repo, headers), rev)
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                "oid": git_blob_sha1(commit.files[f["path"]]) if f["path"] in commit.files else None}
                               for f in files]}

    def commit(self, headers, body, base_url, repo, rev):
        self._require_write(headers)
        repo_obj = self._repo(repo, headers)
        if unquote(rev) != "main":
            raise HubError(400, "this fake Hub commits to the main branch only")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first ndjson line must be the commit header")
        header = lines[0]["value"]
        with self._lock:
            parent = repo_obj.head
            if header.get("parentCommit") not in (None, parent.oid):
                raise HubError(412, "parent commit is not the head of main")
            files = dict(parent.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"unsupported encoding {value.get('encoding')!r} for {path}")
                    files[path] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for name in [n for n in files if n.startswith(prefix)]:
                        del files[name]
                else:  # lfsFile would need an LFS upload first, which preupload never asks for
                    raise HubError(400, f"unsupported commit operation {key!r}")
            digest = hashlib.sha1(parent.oid.encode() + header.get("summary", "").encode())
            for name in sorted(files):
                digest.update(name.encode() + b"\0" + git_blob_sha1(files[name]).encode())
            new = Commit(digest.hexdigest(), header.get("summary", ""), files)
            repo_obj.commits.append(new)
        return 200, {"success": True, "commitOid": new.oid, "commitUrl": f"{base_url}/{repo}/commit/{new.oid}",
                     "commitMessage": new.message}

    def model_info(self, headers, body, base_url, repo, rev=None):
        repo_obj = self._repo(repo, headers)
        commit = self._commit(repo_obj, rev or "main")
        return 200, {"id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.oid,
                     "private": repo_obj.private, "createdAt": repo_obj.created_at,
                     "lastModified": _now(), "tags": [], "downloads": 0, "likes": 0,
                     "siblings": [{"rfilename": p, "size": len(b), "blobId": git_blob_sha1(b)}
                                  for p, b in sorted(commit.files.items())]}

    def tree(self, headers, body, base_url, repo, rev, path=None):
        commit = self._commit(self._repo(repo, headers), rev)
        prefix = (path or "").strip("/")
        prefix = prefix + "/" if prefix else ""
        entries, folders = [], set()
        for name, data in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest:  # non-recursive listing: report the first-level folder once
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append({"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)})
        if prefix and not entries and not folders:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound", commit.oid)
        return 200, [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)] + entries

    def resolve(self, headers, body, base_url, repo, rev, path):
        commit = self._commit(self._repo(repo, headers), rev)
        data = commit.files.get(unquote(path))
        if data is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.oid)
        return 200, data, {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_sha1(data)}"'}


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries a Content-Length

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass  # the request log is kept in FakeHub.requests instead of stderr

    def _handle(self, method: str) -> None:
        hub = self.fake_hub
        path = urlsplit(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        if length > hub.max_body_bytes:
            self._send(413, {"error": f"body of {length} bytes exceeds {hub.max_body_bytes}"}, method=method)
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        base_url = hub.url
        for route_method, pattern, name in _ROUTES:
            match = pattern.fullmatch(path)
            if route_method != method or match is None:
                continue
            try:
                result = getattr(hub, name)(self.headers, body, base_url,
                                            **{k: v for k, v in match.groupdict().items() if v is not None})
            except HubError as e:
                extra = {"X-Error-Code": e.code} if e.code else {}
                if e.commit:
                    extra["X-Repo-Commit"] = e.commit
                extra["X-Error-Message"] = e.message
                self._send(e.status, e.payload, extra, method)
            except (ValueError, KeyError) as e:  # malformed client payloads
                self._send(400, {"error": f"bad request: {e!r}"}, {"X-Error-Message": repr(e)}, method)
            else:
                self._send(*result, method=method)
            return
        with hub._lock:
            hub.unhandled.append((method, self.path))
        self._send(404, {"error": f"fake Hub does not implement {method} {path}"}, method=method)

    def _send(self, status: int, payload, headers: dict | None = None, method: str = "GET") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes)
                         else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)
        with self.fake_hub._lock:
            self.fake_hub.requests.append((method, self.path, status))

    def do_GET(self):  # noqa: N802 - http.server naming
        self._handle("GET")

    def do_HEAD(self):  # noqa: N802
        self._handle("HEAD")

    def do_POST(self):  # noqa: N802
        self._handle("POST")


def hub_env(monkeypatch, hub: FakeHub, home) -> None:
    """Point `huggingface_hub` and transformers in THIS process at `hub`, with caches and token files under `home`.

    `huggingface_hub` reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported (tests/conftest.py sets offline
    mode), and transformers caches one `HfApi`; setting the environment alone would leave them pointing at
    huggingface.co and at the user's own cache and stored token.
    """
    import huggingface_hub.constants as constants
    import transformers.utils.hub as transformers_hub

    home = str(home)
    for key, value in subprocess_env(hub, home, base={}).items():
        monkeypatch.setenv(key, value)
    patches = {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HOME": home,
        "HF_HUB_CACHE": os.path.join(home, "hub"),
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)


def subprocess_env(hub: FakeHub, home, base: dict | None = None, token: str | None = None) -> dict[str, str]:
    """Environment for a fresh process that talks to `hub` only, with its caches (and remote code) under `home`.

    No token is visible to it unless `token` is given (then as HF_TOKEN).
    """
    env = dict(os.environ if base is None else base)
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_ETAG_TIMEOUT="5",
               HF_HUB_DOWNLOAD_TIMEOUT="10", OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    env.pop("HF_TOKEN", None)
    env.pop("HUGGING_FACE_HUB_TOKEN", None)
    if token is not None:
        env["HF_TOKEN"] = token
    return env
