"""`peftkit push RUN`: publish a run's adapter (or a merged model directory) to the Hugging
Face Hub, with a generated model card.

huggingface_hub does the work (`create_repo`, `create_branch`, `upload_folder`) and its own
configuration decides where and as whom: HF_ENDPOINT, and HF_TOKEN or `hf auth login`.
peftkit checks that a token exists but never passes it on, prints, logs or writes it.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

from peftkit.run import rundir
from peftkit.errors import RunError, UserError
from peftkit.run.rundir import RunDir, MergeDir

# Run files published next to the adapter: the loss curve the card shows, the figures.
RUN_FILES = ("loss.png", "result.json", "eval.json")


class PushFailed(RunError):
    """The Hub refused or could not be reached; nothing local was changed."""


def require_token() -> None:
    from huggingface_hub import get_token

    if not get_token():
        raise UserError("no Hugging Face token: set HF_TOKEN to a write token, or run "
                        "`hf auth login`")


def stage(run: Path, folder: Path, recipe, repo_id: str, merged: Path | None = None,
          link: bool = False) -> list[str]:
    """Write into `folder` exactly what is uploaded: the adapter files (or the merged model
    directory), the run's tokenizer when training changed it, loss.png, result.json,
    eval.json, and README.md, the model card. Returns the file names."""
    from peftkit.run import card

    folder.mkdir(parents=True, exist_ok=True)
    report = None
    if merged is not None:
        if MergeDir(merged).failed_marker.is_file():
            raise UserError(f"--merged {merged}: this merge failed verification "
                            "(MERGE_FAILED.txt); publish the adapter, or merge again")
        if not MergeDir(merged).report_file.is_file():
            raise UserError(f"--merged {merged}: not written by `peftkit merge` (no "
                            "merge_report.json)")
        report = json.loads(MergeDir(merged).report_file.read_text())
        sources = [merged]
    else:
        sources = [RunDir(run).adapter, RunDir(run).tokenizer]
    for source in sources:
        for file in sorted(source.glob("*")) if source.is_dir() else []:
            if file.is_file() and file.name != "README.md":  # peft's placeholder card
                _place(file, folder / file.name, link)
    for name in RUN_FILES:
        if (run / name).is_file():
            _place(run / name, folder / name, link)
    (folder / "README.md").write_text(card.model_card(
        recipe, _result(run), rundir.read_metrics(run), evals=_json(RunDir(run).eval_file),
        repo_id=repo_id, merge=report))
    return sorted(p.name for p in folder.iterdir())


def push(run: str | Path, repo_id: str = "", private: bool | None = None,
         merged: str | Path | None = None, revision: str | None = None,
         dry_run: bool = False, endpoint: str | None = None, say=print) -> dict:
    """Upload (or, with `dry_run`, only stage into RUN/push/) the adapter or merged model.
    Settings left None/empty come from the run's recipe (hub.*). `endpoint` defaults to
    huggingface_hub's (HF_ENDPOINT)."""
    from peftkit.recipe.schema import Hub
    from peftkit.recipe.validate import hub_problems
    from peftkit.run.runs import read_recipe

    run = Path(run)
    recipe, _ = read_recipe(run)
    if not RunDir(run).adapter_config.is_file():
        raise UserError(f"{run}: the run has no adapter/ (did training finish?)")
    h = recipe.hub
    repo_id = repo_id or h.repo_id
    private = h.private if private is None else private
    revision = revision or h.revision or None
    problems = hub_problems(Hub(repo_id=repo_id, revision=revision or ""))
    if not repo_id:
        problems.append("no repository: pass --repo-id owner/name (or set hub.repo_id)")
    if problems:
        raise UserError("; ".join(p.replace("hub.repo_id", "--repo-id") for p in problems))
    merged = Path(merged) if merged else None
    if merged is not None and not merged.is_dir():
        raise UserError(f"--merged {merged}: no such directory (write one with "
                        "`peftkit merge RUN --out DIR`)")
    where = f"{repo_id}{' (private)' if private else ''}" + (f", branch {revision}"
                                                             if revision else "")
    if dry_run:
        folder = RunDir(run).push_folder
        shutil.rmtree(folder, ignore_errors=True)
        files = stage(run, folder, recipe, repo_id, merged)
        say(f"dry run: would upload {len(files)} files to {where}, from {folder}:")
        for name in files:
            say(f"  {name}  ({(folder / name).stat().st_size:,} bytes)")
        return {"repo_id": repo_id, "folder": str(folder), "files": files, "dry_run": True}

    require_token()
    with tempfile.TemporaryDirectory(prefix="peftkit-push-") as tmp:
        files = stage(run, Path(tmp), recipe, repo_id, merged, link=True)
        say(f"pushing {len(files)} files to {where}")
        commit = _upload(Path(tmp), repo_id, private, revision, endpoint, recipe.name, run)
    result = {"repo_id": repo_id, "revision": revision or "main", "private": private,
              "merged": str(merged) if merged else None, "commit": commit.oid,
              "url": commit.commit_url, "files": files}
    rundir.MetricsLog(run, enabled=True).write(event="push", **result)
    say(f"pushed: {commit.commit_url}")
    return result


def _upload(folder: Path, repo_id: str, private: bool, revision: str | None,
            endpoint: str | None, name: str, run: Path):
    from huggingface_hub import HfApi, get_token

    api = HfApi(endpoint=endpoint)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 commit_message=f"peftkit push: {name}")
    # The boundary with a remote service: HTTP errors, refused connections, offline mode,
    # metadata the Hub rejects. Each becomes one line; the run directory is untouched.
    except Exception as exc:  # noqa: BLE001
        message = " ".join(str(exc).split()) or type(exc).__name__
        token = get_token()
        if token:  # no server message may echo it back onto the terminal
            message = message.replace(token, "***")
        raise PushFailed(f"push to {repo_id} failed: {type(exc).__name__}: {message[:300]}; "
                         f"the run in {run} is unchanged, retry with `peftkit push {run} "
                         f"--repo-id {repo_id}`") from None


def _place(src: Path, dest: Path, link: bool) -> None:
    """A symbolic link (staging for an upload: merged models are large, and upload_folder
    reads through links), or a copy (the dry-run folder, which users may edit)."""
    if link:
        dest.symlink_to(src.resolve())
    else:
        shutil.copy2(src, dest)


def _json(file: Path) -> dict:
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _result(run: Path) -> SimpleNamespace:
    """result.json as the card reads it (training's final numbers)."""
    saved = _json(RunDir(run).result_file)
    if not saved:
        raise UserError(f"{run}: no result.json (did training finish?); the model card "
                        "needs training's numbers")
    fields = {"steps": 0, "trainable": 0, "total": 0, "train_loss": math.nan,
              "tokens_per_s": 0.0, "evals": {}, "forgetting": None, "memory": {}}
    return SimpleNamespace(**{k: saved.get(k, v) for k, v in fields.items()})
