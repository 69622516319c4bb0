"""`peftkit push` and hub.push_at_end, against a small local stand-in for the Hub's HTTP API.

The stand-in serves what huggingface_hub 2.4's `create_repo`, `create_branch` and
`upload_folder` call when hf_xet is not used (HF_HUB_DISABLE_XET; the Xet protocol needs a
content-addressed storage server): repos/create, branch, validate-yaml, preupload (binary files
go to LFS, as on the Hub), the LFS batch API with upload + verify, and the NDJSON commit. It
records every request and the files each commit delivers.
"""

import base64
import hashlib
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import pytest
import yaml

from peftkit.recipe import registry
from peftkit.run.card import metadata
from peftkit.cli.app import main
from peftkit.recipe.overrides import apply_overrides

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")

TOKEN = f"hf_peftkitTestToken{uuid.uuid4().hex}"  # a marker to look for everywhere
QUICK = ["model.tiny_size=xs", "data.max_samples=64", "data.eval=", "data.eval_size=8",
         "train.eval_generate=0", "train.warmup_steps=0", "train.max_steps=2",
         "train.batch_size=16", "train.save_every=0", "train.eval_every=0",
         "hub.license=apache-2.0"]


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fail_with: int = 0):
        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.fail_with = fail_with  # answer every request with this status (0 = serve)
        self.requests, self.repos, self.branches = [], {}, set()
        self.blobs, self.commits = {}, []  # LFS objects by sha256; (repo, revision, files)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        # Bounded: stops by itself even if a test never reaches its teardown.
        self.watchdog = threading.Timer(300, self.shutdown)
        self.watchdog.daemon = True
        self.watchdog.start()

    def stop(self):
        self.watchdog.cancel()
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        self._serve()

    def do_PUT(self):
        self._serve()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(self.rfile.readline().strip(), 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, obj=None):
        body = json.dumps(obj if obj is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _serve(self):
        hub, body = self.server, self._body()
        path = urlsplit(self.path).path
        hub.requests.append({"method": self.command, "path": path,
                             "authorization": self.headers.get("Authorization"), "body": body})
        if hub.fail_with:
            return self._reply(hub.fail_with, {"error": "the stand-in Hub is down"})
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}" if req.get("organization") \
                else req["name"]
            if repo in hub.repos:
                return self._reply(409, {"error": "repo exists", "url": f"{hub.url}/{repo}"})
            hub.repos[repo] = req
            hub.branches.add((repo, "main"))
            return self._reply(200, {"url": f"{hub.url}/{repo}"})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) == 6:
            repo, action, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            if repo not in hub.repos:
                return self._reply(404, {"error": "Repository not found"})
            if action == "branch":
                hub.branches.add((repo, rev))
                return self._reply(200)
            if (repo, rev) not in hub.branches:
                return self._reply(404, {"error": f"Revision not found: {rev}"})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._reply(200, {"files": [
                    {"path": f["path"], "shouldIgnore": False, "oid": None,
                     "uploadMode": "lfs" if b"\0" in base64.b64decode(f["sample"])
                     else "regular"} for f in files]})
            if action == "commit":
                return self._commit(repo, rev, body)
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs",
                                                                           "objects", "batch"]:
            objects = json.loads(body)["objects"]
            return self._reply(200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "authenticated": True, "actions": {
                    "upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"},
                    "verify": {"href": f"{hub.url}/lfs-verify", "header": {}}}}
                for o in objects]})
        if parts[0] == "lfs-upload" and self.command == "PUT":
            if hashlib.sha256(body).hexdigest() != parts[1]:
                return self._reply(400, {"error": "sha256 mismatch"})
            hub.blobs[parts[1]] = body
            return self._reply(200)
        if parts == ["lfs-verify"]:
            known = json.loads(body)["oid"] in hub.blobs
            return self._reply(200 if known else 404)
        return self._reply(404, {"error": f"no such endpoint: {self.command} {path}"})

    def _commit(self, repo: str, rev: str, body: bytes):
        hub, files = self.server, {}
        for line in body.decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in hub.blobs:
                    return self._reply(400, {"error": f"LFS object missing: {value['path']}"})
                files[value["path"]] = hub.blobs[value["oid"]]
        hub.commits.append((repo, rev, files))
        oid = hashlib.sha1(body).hexdigest()
        return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}",
                                 "commitOid": oid, "pullRequestUrl": None})


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub as configured by HF_ENDPOINT and HF_TOKEN, aimed at a stand-in Hub.
    (It reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET once, at import: set them
    where it keeps them.)"""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    servers = []

    def start(fail_with: int = 0, endpoint: str | None = None) -> FakeHub:
        hub = FakeHub(fail_with)
        servers.append(hub)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint or hub.url)
        return hub

    yield start
    for hub in servers:
        hub.stop()


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def files_under(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def failed_push_run(tmp_path_factory):
    """A run trained with hub.push_at_end against a Hub that answers 500: training finishes,
    the push fails. (Its outcome is checked in the first test; the run serves all tests.)"""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_TOKEN", TOKEN)
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub = FakeHub(fail_with=500)
    mp.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    root = tmp_path_factory.mktemp("runs")
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(["train", "tiny-demo", *QUICK, f"train.output_dir={root}",
                       "hub.repo_id=me/demo-lora", "hub.push_at_end=true"])
    finally:
        hub.stop()
        mp.undo()
    return root / "tiny-demo", rc, err.getvalue(), hub.requests


def test_push_at_end_failure_exits_1_and_keeps_the_run(failed_push_run):
    run, rc, err, requests = failed_push_run
    assert rc == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: push to me/demo-lora failed") and "500" in last
    assert "Traceback" not in err and TOKEN not in err
    assert requests and requests[0]["path"] == "/api/repos/create"  # it did try
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                 "result.json", "README.md", "loss.png", "recipe.json"):
        assert (run / name).is_file(), name
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text()
              .splitlines() if "event" in line]
    assert "push" not in events


def test_push_to_an_unreachable_hub_fails_cleanly(failed_push_run, online, capsys):
    run = failed_push_run[0]
    before = files_under(run)
    online(endpoint="http://127.0.0.1:9")  # the discard port: connection refused
    rc, out, err = cli(capsys, "push", run, "--repo-id", "me/demo-lora")
    assert rc == 1 and "error: push to me/demo-lora failed" in err and "Traceback" not in err
    assert files_under(run) == before  # nothing written, nothing changed


def test_push_uploads_adapter_and_card_with_private_and_revision(failed_push_run, online,
                                                                 capsys):
    run = failed_push_run[0]
    hub = online()
    rc, out, err = cli(capsys, "push", run, "--repo-id", "me/demo-lora", "--private",
                       "--revision", "v1")
    assert rc == 0, err
    assert hub.repos["me/demo-lora"]["visibility"] == "private"
    assert ("me/demo-lora", "v1") in hub.branches
    (repo, rev, files), = hub.commits
    assert (repo, rev) == ("me/demo-lora", "v1")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "loss.png",
            "result.json"} <= set(files)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert files[name] == (run / "adapter" / name).read_bytes()
    assert files["loss.png"] == (run / "loss.png").read_bytes()
    assert "lfs-upload" in {r["path"].split("/")[1] for r in hub.requests}  # binaries via LFS

    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and "peftkit" in meta["tags"]
    assert 'adapter = "me/demo-lora"' in card and "PeftModel.from_pretrained" in card
    assert "![loss](loss.png)" in card and '"push_at_end": true' in card  # the recipe

    # The token travels only in the Authorization header.
    assert {r["authorization"] for r in hub.requests if "lfs-upload" not in r["path"]} \
        == {f"Bearer {TOKEN}"}
    assert all(TOKEN.encode() not in r["body"] for r in hub.requests)
    assert TOKEN not in out + err
    assert all(TOKEN.encode() not in data for data in files_under(run.parent).values())
    event = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert event["event"] == "push" and event["revision"] == "v1" and event["private"]


def test_push_merged_model_gets_a_transformers_card(failed_push_run, online, tmp_path,
                                                    capsys):
    run = failed_push_run[0]
    assert cli(capsys, "merge", run, "--out", tmp_path / "merged")[0] == 0
    hub = online()
    rc, _, err = cli(capsys, "push", run, "--repo-id", "me/demo-merged", "--merged",
                     tmp_path / "merged")
    assert rc == 0, err
    (_, rev, files), = hub.commits
    assert rev == "main" and "private" not in hub.repos["me/demo-merged"].get("visibility", "")
    assert {"model.safetensors", "config.json", "tokenizer.json", "merge_report.json",
            "README.md", "loss.png"} <= set(files)
    assert "adapter_config.json" not in files
    card = files["README.md"].decode()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "transformers"
    assert "## Merge" in card and 'from_pretrained("me/demo-merged")' in card


def test_dry_run_writes_the_folder_without_token_or_network(failed_push_run, monkeypatch,
                                                            capsys):
    run = failed_push_run[0]
    monkeypatch.delenv("HF_TOKEN", raising=False)  # and HF_HUB_OFFLINE stays on
    rc, out, err = cli(capsys, "push", run, "--repo-id", "me/demo-lora", "--dry-run")
    assert rc == 0, err
    folder = run / "push"
    names = sorted(p.name for p in folder.iterdir())
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md",
            "loss.png"} <= set(names)
    assert all(name in out for name in names) and str(folder) in out
    assert 'adapter = "me/demo-lora"' in (folder / "README.md").read_text()


def test_push_without_a_token_is_a_one_line_input_error(failed_push_run, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    rc, _, err = cli(capsys, "push", failed_push_run[0], "--repo-id", "me/demo-lora")
    assert rc == 2 and err.startswith("error: no Hugging Face token")


def test_push_at_end_without_a_token_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    rc, _, err = cli(capsys, "train", "tiny-demo", *QUICK, f"train.output_dir={tmp_path}",
                     "hub.repo_id=me/demo-lora", "hub.push_at_end=true")
    assert rc == 2 and err.startswith("error: no Hugging Face token")
    assert not (tmp_path / "tiny-demo").exists()  # nothing trained, nothing written


def test_card_metadata_of_a_real_recipe_names_base_model_and_dataset():
    recipe = apply_overrides(registry.resolve("llama3-8b-lora").recipe, ["hub.license=llama3.1"])
    meta = yaml.safe_load(metadata(recipe))
    assert meta["base_model"] == recipe.model.name and meta["license"] == "llama3.1"
    assert meta["datasets"] == [recipe.data.train] and meta["library_name"] == "peft"
