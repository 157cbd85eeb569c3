"""A local endpoint speaking the part of the Hugging Face Hub's HTTP API that `huggingface_hub` uses to create a
model repo, commit files (inline "regular" files and Git LFS basic transfers) and resolve/download them by branch
or commit. Files are kept on disk under ``root``: content-addressed blobs and one JSON tree per commit.

Point a client at it with ``HF_ENDPOINT=http://127.0.0.1:<port>`` (and ``HF_HUB_DISABLE_XET=1``: Xet storage is
not spoken here). Writes need ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml


LFS_SUFFIXES = (".safetensors", ".bin", ".gz")
USER = "user"
"""The namespace of the token's owner: repos created without one land there, as on the Hub."""


class HubStore:
    """Repos, branches and commits on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def _repo(self, repo_id: str) -> Path:
        return self.root / "repos" / repo_id

    def exists(self, repo_id: str) -> bool:
        return (self._repo(repo_id) / "refs.json").is_file()

    def create(self, repo_id: str) -> None:
        self._repo(repo_id).mkdir(parents=True, exist_ok=True)
        (self._repo(repo_id) / "refs.json").write_text(json.dumps({}))

    def put_blob(self, data: bytes) -> str:
        oid = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / oid).write_bytes(data)
        return oid

    def has_blob(self, oid: str) -> bool:
        return (self.root / "blobs" / oid).is_file()

    def blob(self, oid: str) -> bytes:
        return (self.root / "blobs" / oid).read_bytes()

    def resolve(self, repo_id: str, revision: str) -> tuple[str, dict] | None:
        """(commit id, tree {path: {"oid", "size", "lfs"}}) of a branch or commit id."""
        refs = json.loads((self._repo(repo_id) / "refs.json").read_text())
        commit = refs.get(revision, revision)
        path = self._repo(repo_id) / "commits" / f"{commit}.json"
        return (commit, json.loads(path.read_text())) if path.is_file() else None

    def commit(self, repo_id: str, branch: str, changes: dict[str, dict | None], summary: str) -> str:
        with self.lock:
            refs = json.loads((self._repo(repo_id) / "refs.json").read_text())
            parent = self.resolve(repo_id, branch) if branch in refs else None
            tree = dict(parent[1]) if parent else {}
            for path, entry in changes.items():
                if entry is None:
                    tree.pop(path, None)
                else:
                    tree[path] = entry
            commit = hashlib.sha1(
                json.dumps([parent and parent[0], summary, tree], sort_keys=True).encode()
            ).hexdigest()
            (self._repo(repo_id) / "commits").mkdir(exist_ok=True)
            (self._repo(repo_id) / "commits" / f"{commit}.json").write_text(json.dumps(tree))
            refs[branch] = commit
            (self._repo(repo_id) / "refs.json").write_text(json.dumps(refs))
            return commit


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    store: HubStore
    token: str
    requests: list[str]

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        self.requests.append(f"{self.command} {self.path}")

    # Plumbing -------------------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        self.rfile.readline()
        return b"".join(chunks)

    def _reply(
        self, status: int, payload: object = None, headers: dict[str, str] | None = None, raw: bytes | None = None
    ) -> None:
        data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._reply(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.token}":
            return True
        self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        return False

    def _endpoint(self) -> str:
        return f"http://{self.headers['Host']}"

    # Routes ---------------------------------------------------------------------------------------------------------

    def do_POST(self):
        path = unquote(urlparse(self.path).path)
        if path == "/api/repos/create":
            return self._create_repo()
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(self._body())["content"])
        if match := re.fullmatch(r"/(.+?)\.git/info/lfs/objects/batch", path):
            return self._lfs_batch(json.loads(self._body()))
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
            return self._preupload(match[1], json.loads(self._body()))
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
            return self._commit(match[1], match[2], self._body())
        self._error(404, "EntryNotFound", f"no route {path}")

    def do_PUT(self):
        path = unquote(urlparse(self.path).path)
        if match := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path):
            data = self._body()
            if hashlib.sha256(data).hexdigest() != match[1]:
                return self._error(400, "BadRequest", "content does not match its oid")
            self.store.put_blob(data)
            return self._reply(200)
        self._error(404, "EntryNotFound", f"no route {path}")

    def do_GET(self):
        path = unquote(urlparse(self.path).path)
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path):
            return self._model_info(match[1], match[2])
        if match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(match[1], match[2], match[3])
        self._error(404, "EntryNotFound", f"no route {path}")

    do_HEAD = do_GET

    def _create_repo(self):
        if not self._authorized():
            return
        body = json.loads(self._body())
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        if self.store.exists(repo_id):
            message = "You already created this model repo"
            return self._reply(
                409, {"error": message, "url": f"{self._endpoint()}/{repo_id}"}, {"X-Error-Message": message}
            )
        self.store.create(repo_id)
        self._reply(200, {"url": f"{self._endpoint()}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, content: str):
        """The card's front matter must parse as a mapping, as the Hub checks before a commit that changes README.md."""
        front = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        metadata = yaml.safe_load(front[1]) if front else {}
        if not isinstance(metadata, dict):
            return self._reply(400, {"errors": [{"message": "metadata is not a YAML mapping"}]})
        self._reply(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, body: dict):
        if not self._authorized():
            return
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                "shouldIgnore": False,
            }
            for f in body["files"]
        ]
        self._reply(200, {"files": files, "commitOid": None})

    def _lfs_batch(self, body: dict):
        if not self._authorized():
            return
        objects = []
        for item in body["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if not self.store.has_blob(item["oid"]):
                entry["actions"] = {"upload": {"href": f"{self._endpoint()}/lfs-upload/{item['oid']}"}}
            objects.append(entry)
        self._reply(200, {"transfer": "basic", "objects": objects})

    def _commit(self, repo_id: str, revision: str, body: bytes):
        if not self._authorized():
            return
        if not self.store.exists(repo_id):
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        changes, summary = {}, ""
        for line in body.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value["summary"]
            elif item["key"] == "file":
                data = base64.b64decode(value["content"])
                changes[value["path"]] = {"oid": self.store.put_blob(data), "size": len(data), "lfs": False}
            elif item["key"] == "lfsFile":
                if not self.store.has_blob(value["oid"]):
                    return self._error(400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                changes[value["path"]] = {"oid": value["oid"], "size": value["size"], "lfs": True}
            elif item["key"] == "deletedFile":
                changes[value["path"]] = None
        commit = self.store.commit(repo_id, revision, changes, summary)
        self._reply(200, {"commitUrl": f"{self._endpoint()}/{repo_id}/commit/{commit}", "commitOid": commit})

    def _model_info(self, repo_id: str, revision: str):
        found = self.store.resolve(repo_id, revision) if self.store.exists(repo_id) else None
        if found is None:
            return self._error(
                404, "RepoNotFound" if not self.store.exists(repo_id) else "RevisionNotFound", "not found"
            )
        commit, tree = found
        self._reply(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": False,
                "siblings": [{"rfilename": p} for p in sorted(tree)],
            },
        )

    def _resolve(self, repo_id: str, revision: str, filename: str):
        if not self.store.exists(repo_id):
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        found = self.store.resolve(repo_id, revision)
        if found is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        commit, tree = found
        if filename not in tree:
            return self._error(
                404,
                "EntryNotFound",
                f"{filename} does not exist at {revision}",
            )
        entry = tree[filename]
        data = self.store.blob(entry["oid"])
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_id(data)}"'}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["oid"]}"', "X-Linked-Size": str(entry["size"])})
        self._reply(200, headers=headers, raw=data)


class LocalHub:
    """The endpoint on a free local port, served from a thread: ``with LocalHub(root, token) as hub: hub.url``."""

    def __init__(self, root: Path, token: str) -> None:
        self.store = HubStore(root)
        handler = type("Handler", (HubHandler,), {"store": self.store, "token": token, "requests": []})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.requests = handler.requests
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
