"""Every way a user can get it wrong: one line on stderr naming the problem, exit code 2, no
traceback, and nothing written (docs/reliability.md). The table calls the CLI in-process;
nearly every case fails before any weights load. Basic CLI error paths are in test_cli.py."""

import errno
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from peftkit.training import checkpoint
from peftkit.cli.app import main
from peftkit.recipe import Model
from peftkit.recipe.schema import RESUME_SAFE, SECTIONS
from peftkit.data.sources import resolve_source

TRAIN = ["train", "tiny-demo", "model.tiny_size=xs", "data.train=data.jsonl", "data.eval=",
         "data.eval_size=0", "train.eval_generate=0", "train.output_dir=runs",
         "train.max_steps=3", "train.warmup_steps=0", "train.save_every=1", "train.log_every=1",
         "train.batch_size=4"]
ROWS = "".join(Path(resolve_source("peftkit:data/sort_reverse/train.jsonl"))
               .read_text().splitlines(keepends=True)[:40])
CHAT = json.loads(ROWS.splitlines()[0])
# Library progress bars (e.g. transformers' "Loading weights") are not messages.
PROGRESS = re.compile(r"\|\s*\d+/\d+ \[")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A completed 3-step run of TRAIN (checkpoints step-2 and step-3), to copy and damage."""
    root = tmp_path_factory.mktemp("finished")
    (root / "data.jsonl").write_text(ROWS)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(TRAIN) == 0
    return root / "runs" / "tiny-demo"


# ---------------------------------------------------------------------------------------------
# Case setups: each gets the case's directory (the working directory) and may use the run.

def files(**contents):
    """Write files (name=str or bytes; '__' in a name stands for '/')."""
    def setup(tmp, run):
        for name, content in contents.items():
            path = tmp / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
    return setup


def rows(*records, name="bad.jsonl"):
    return files(**{name: "".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                  for r in records)})


def reseal(ckpt: Path) -> None:
    """Rewrite the manifest to match the files, as if the damage had been written by peftkit:
    what remains to catch it is the loading itself."""
    files_ = {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size,
                                         "sha256": checkpoint._sha256(p)}
              for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != checkpoint.MANIFEST}
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps({"step": 3, "files": files_}))


def with_run(damage=None):
    """Copy the finished run here; `damage(step-3 checkpoint dir, case dir)` then spoils it."""
    def setup(tmp, run):
        shutil.copytree(run(), tmp / "runs" / "tiny-demo")
        if damage:
            damage(tmp / "runs" / "tiny-demo" / "checkpoints" / "step-3", tmp)
    return setup


def truncate(name):
    def damage(ckpt, tmp):
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 2])
    return damage


def flip_byte(name):
    def damage(ckpt, tmp):
        data = bytearray((ckpt / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ckpt / name).write_bytes(bytes(data))
    return damage


def resealed(change):
    def damage(ckpt, tmp):
        change(ckpt, tmp)
        reseal(ckpt)
    return damage


def delete(name):
    return lambda ckpt, tmp: (ckpt / name).unlink()


def edit_state(**changes):
    def change(ckpt, tmp):
        state = json.loads((ckpt / "state.json").read_text())
        state.update(changes)
        (ckpt / "state.json").write_text(json.dumps(state))
    return resealed(change)


def zero_partitions(ckpt, tmp):
    """As DeepSpeed ZeRO writes it on 2 processes: one optimizer partition each."""
    shutil.copy(ckpt / "optimizer.pt", ckpt / "optimizer-rank1.pt")
    (ckpt / "optimizer.pt").rename(ckpt / "optimizer-rank0.pt")
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "world_size": 2}))


class Evil:
    """A pickle that runs a command when unpickled: torch.load(weights_only=True) refuses it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_optimizer(ckpt, tmp):
    torch.save({"state": Evil(tmp / "pwned")}, ckpt / "optimizer.pt")


def template(text):
    """A local copy of the tiny model whose tokenizer carries chat template `text`."""
    def setup(tmp, run):
        from peftkit.model.loading import base_path

        source = base_path(Model("peftkit/tiny-llama-demo", arch="llama", tiny=True,
                                 tiny_size="xs"))
        shutil.copytree(source, tmp / "model")
        (tmp / "model" / "chat_template.jinja").write_text(text)
    return setup


RECIPE_HEAD = '"""A user recipe."""\nfrom peftkit.recipe import Data, Lora, Model, Recipe, Train\n'
VALID_BODY = 'RECIPE = Recipe(model=Model("org/m"), data=Data("d.jsonl"){})\n'
DIFFERENT = "the checkpoint was trained with a different recipe"

# (id, setup, argv, fragments every one of which the error line must contain)
CASES = [
    # --- recipes by name or file -----------------------------------------------------------
    ("unknown recipe", None, ["train", "dmeo"], ["unknown recipe 'dmeo'", "did you mean demo"]),
    ("unknown recipe in show", None, ["show", "lama3-8b-lora"], ["did you mean llama3-8b-lora"]),
    ("recipe file missing", None, ["train", "nothere.py"], ["nothere.py", "not found"]),
    ("recipe path is a directory", files(**{"adir__x.txt": "x"}), ["train", "adir/"],
     ["adir", "not found"]),
    ("recipe syntax error", files(**{"mine.py": RECIPE_HEAD + "RECIPE = Recipe(\n"}),
     ["train", "mine.py"], ["mine.py:3", "SyntaxError"]),
    ("recipe raises", files(**{"mine.py": RECIPE_HEAD + "raise RuntimeError('boom')\n"}),
     ["train", "mine.py"], ["mine.py:3", "recipe failed to load", "boom"]),
    ("recipe without RECIPE", files(**{"mine.py": RECIPE_HEAD + "X = 1\n"}),
     ["show", "mine.py"], ["mine.py", "defines no RECIPE"]),
    ("recipe with r=0", files(**{"mine.py": RECIPE_HEAD + VALID_BODY.format(
        ", adapter=Lora(r=0)")}), ["train", "mine.py"], ["adapter.r=0", "> 0"]),
    ("recipe with a mistyped value", files(**{"mine.py": RECIPE_HEAD + VALID_BODY.format(
        ", train=Train(lr='fast')")}), ["train", "mine.py"], ["train.lr='fast'", "float"]),
    # --- overrides: keys --------------------------------------------------------------------
    ("override without =", None, [*TRAIN, "train.lr"], ["'train.lr'", "section.field=value"]),
    ("unknown section", None, [*TRAIN, "trian.lr=1e-4"],
     ["unknown setting 'trian.lr'", "did you mean train.lr"]),
    ("unknown field", None, [*TRAIN, "adapter.rnak=8"],
     ["unknown setting 'adapter.rnak'", "did you mean"]),
    ("key without section", None, [*TRAIN, "lr=1e-4"], ["unknown setting 'lr'"]),
    # --- overrides: values that do not convert ----------------------------------------------
    ("int from text", None, [*TRAIN, "adapter.r=eight"], ["adapter.r='eight'", "expected int"]),
    ("int from a fraction", None, [*TRAIN, "adapter.r=2.5"], ["adapter.r='2.5'", "int"]),
    ("float from text", None, [*TRAIN, "train.lr=fast"], ["train.lr='fast'", "expected float"]),
    ("bool from text", None, [*TRAIN, "model.tiny=perhaps"], ["model.tiny='perhaps'", "bool"]),
    ("choice", None, [*TRAIN, "train.scheduler=exponential"],
     ["train.scheduler='exponential'", "must be one of", "cosine"]),
    ("tiny size", None, [*TRAIN, "model.tiny_size=xl"], ["model.tiny_size='xl'", "xs"]),
    ("quantization", None, [*TRAIN, "model.quantize=nf8"], ["model.quantize='nf8'", "nf4"]),
    ("data format", None, [*TRAIN, "data.format=yaml"], ["data.format='yaml'", "alpaca"]),
    # --- overrides: values out of range -----------------------------------------------------
    ("negative lr", None, [*TRAIN, "train.lr=-1e-4"], ["train.lr=-0.0001", "> 0"]),
    ("zero lr", None, [*TRAIN, "train.lr=0"], ["train.lr=0.0", "> 0"]),
    ("nan lr", None, [*TRAIN, "train.lr=nan"], ["train.lr=nan", "finite"]),
    ("infinite epochs", None, [*TRAIN, "train.epochs=inf"], ["train.epochs=inf", "finite"]),
    ("rank 0", None, [*TRAIN, "adapter.r=0"], ["adapter.r=0", "> 0"]),
    ("negative rank", None, [*TRAIN, "adapter.r=-4"], ["adapter.r=-4", "> 0"]),
    ("alpha 0", None, [*TRAIN, "adapter.alpha=0"], ["adapter.alpha=0.0", "> 0"]),
    ("dropout 1", None, [*TRAIN, "adapter.dropout=1"], ["adapter.dropout=1.0", "[0, 1)"]),
    ("negative dropout", None, [*TRAIN, "adapter.dropout=-0.1"], ["adapter.dropout=-0.1"]),
    ("batch 0", None, [*TRAIN, "train.batch_size=0"], ["train.batch_size=0", "> 0"]),
    ("accumulation 0", None, [*TRAIN, "train.grad_accum=0"], ["train.grad_accum=0", "> 0"]),
    ("negative max_steps", None, [*TRAIN, "train.max_steps=-1"], ["train.max_steps=-1", ">= 0"]),
    ("warmup longer than run", None, [*TRAIN, "train.warmup_steps=10"],
     ["train.warmup_steps=10", "longer than train.max_steps=3"]),
    ("keep no checkpoints", None, [*TRAIN, "train.keep_checkpoints=0"],
     ["train.keep_checkpoints=0"]),
    ("max_len 0", None, [*TRAIN, "data.max_len=0"], ["data.max_len=0", "> 0"]),
    ("no processes", None, [*TRAIN, "launch.num_processes=0"], ["launch.num_processes=0"]),
    ("run name with a slash", None, [*TRAIN, "name=a/b"], ["name='a/b'", "letters, digits"]),
    ("empty model name", None, [*TRAIN, "model.name="], ["model.name: empty"]),
    ("empty data", None, [*TRAIN, "data.train="], ["data.train: empty"]),
    ("empty targets", None, [*TRAIN, "adapter.targets="], ["adapter.targets: empty"]),
    ("two problems together", None, [*TRAIN, "adapter.r=0", "train.lr=-1"],
     ["2 problems", "adapter.r=0", "train.lr=-1.0"]),
    ("architecture without a tiny form", None, [*TRAIN, "model.arch=gpt9"],
     ["model.arch='gpt9'", "no tiny form", "llama"]),
    ("targets matching no module", None, [*TRAIN, "adapter.targets=no_such_proj"],
     ["adapter.targets='no_such_proj'"]),
    # --- distribution strategy (refused before any worker starts) ----------------------------
    ("fsdp on one CPU process", None, [*TRAIN, "launch.strategy=fsdp"],
     ["launch.strategy=fsdp", "--nproc 2", "launch.strategy=ddp"]),
    ("fsdp with uint8 4-bit storage", None,
     ["train", "llama3-8b-qlora", "model.tiny=true", "launch.strategy=fsdp", "--nproc", "2"],
     ["FSDP with a quantized base", "model.quant_storage"]),
    ("fsdp with compile", None, [*TRAIN, "launch.strategy=fsdp", "train.compile=true",
                                 "--nproc", "2"], ["train.compile=true", "train.compile=false"]),
    ("deepspeed on one CPU process", None, [*TRAIN, "launch.strategy=deepspeed"],
     ["launch.strategy=deepspeed", "--nproc 2"]),
    ("zero-3 with a 4-bit base", None,
     ["train", "llama3-8b-qlora", "model.tiny=true", "launch.strategy=deepspeed",
      "launch.zero_stage=3", "--nproc", "2"], ["ZeRO-3", "launch.zero_stage=2"]),
    ("zero stage 4", None, [*TRAIN, "launch.strategy=deepspeed", "launch.zero_stage=4"],
     ["launch.zero_stage=4", "must be one of 1, 2, 3"]),
    # --- command-line arguments -------------------------------------------------------------
    ("unknown command", None, ["trian", "tiny-demo"], ["invalid choice: 'trian'", "--help"]),
    ("train without recipe", None, ["train"], ["required: recipe"]),
    ("unknown flag", None, [*TRAIN, "--force"], ["unrecognized arguments: --force"]),
    ("flag value not an int", None, [*TRAIN, "--nproc", "two"], ["--nproc", "'two'"]),
    ("copy over an existing file", files(**{"mine.py": "# mine\n"}), ["cp", "tiny-demo", "mine.py"],
     ["mine.py already exists", "--force"]),
    ("resume and overwrite", None, [*TRAIN, "--resume", "--overwrite"],
     ["--resume and --overwrite", "pass one"]),
    ("resume a missing path", None, [*TRAIN, "--resume", "runs/tiny-demo/checkpoints/step-9"],
     ["--resume runs/tiny-demo/checkpoints/step-9", "no such checkpoint directory"]),
    ("resume a file", files(**{"notes.txt": "x"}), [*TRAIN, "--resume", "notes.txt"],
     ["--resume notes.txt", "no such checkpoint directory"]),
    # --- data files -------------------------------------------------------------------------
    ("data file missing", None, [*TRAIN, "data.train=nope.jsonl"], ["nope.jsonl", "not found"]),
    ("data file empty", files(**{"bad.jsonl": ""}), [*TRAIN, "data.train=bad.jsonl"],
     ["bad.jsonl", "empty"]),
    ("only blank lines", files(**{"bad.jsonl": "\n\n"}), [*TRAIN, "data.train=bad.jsonl"],
     ["bad.jsonl", "no records"]),
    ("data path is a directory", files(**{"bad.jsonl__x": "x"}), [*TRAIN, "data.train=bad.jsonl"],
     ["bad.jsonl", "not a data file"]),
    ("unsupported file type", files(**{"rows.txt": ROWS}), [*TRAIN, "data.train=rows.txt"],
     ["rows.txt", "not a data file", "jsonl"]),
    ("not UTF-8", files(**{"bad.jsonl": b'{"text": "\xff\xfe"}\n'}),
     [*TRAIN, "data.train=bad.jsonl"], ["bad.jsonl", "cannot read the file", "UTF-8"]),
    ("malformed JSON line", rows(CHAT, CHAT, '{"messages": [}'), [*TRAIN, "data.train=bad.jsonl"],
     ["bad.jsonl:3", "malformed JSON"]),
    ("a JSON list, not an object", rows(CHAT, "[1, 2]"), [*TRAIN, "data.train=bad.jsonl"],
     ["bad.jsonl:2", "not an object"]),
    ("record of no known format", rows({"question": "q", "answer": "a"}),
     [*TRAIN, "data.train=bad.jsonl", "data.format=auto"],
     ["bad.jsonl:1", "cannot tell the data format"]),
    ("mix with a bad weight", None,
     [*TRAIN, "data.train=data.jsonl=0.7, b.jsonl=0.2, c.jsonl=lots"],
     ["invalid recipe", "data.train: 'c.jsonl=lots': the weight 'lots' is neither"]),
    ("mix whose shares miss 1", None, [*TRAIN, "data.train=data.jsonl=0.7, b.jsonl=0.2"],
     ["data.train: the shares sum to 0.9, not 1"]),
    ("alpaca file read as chat", rows({"instruction": "i", "output": "o"}),
     [*TRAIN, "data.train=bad.jsonl", "data.format=chat"],
     ["bad.jsonl:1: data.format=chat, but the data looks like alpaca", "data.format=alpaca"]),
    ("chat row without messages", rows(CHAT, {"text": "x"}),
     [*TRAIN, "data.train=bad.jsonl", "data.format=chat"], ["bad.jsonl:2", "'messages'"]),
    ("chat message with a bad role", rows(CHAT, {"messages": [
        {"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
     [*TRAIN, "data.train=bad.jsonl"], ["bad.jsonl:2", "messages[0]"]),
    ("chat content not a string", rows(CHAT, {"messages": [
        {"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}),
     [*TRAIN, "data.train=bad.jsonl"], ["bad.jsonl:2", "not a valid message"]),
    ("chat without an answer", rows(CHAT, {"messages": [{"role": "user", "content": "hi"}]}),
     [*TRAIN, "data.train=bad.jsonl"], ["bad.jsonl:2", "no assistant turn"]),
    ("alpaca row missing output", rows({"instruction": "a", "output": "b"}, {"instruction": "c"}),
     [*TRAIN, "data.train=bad.jsonl", "data.format=alpaca"], ["bad.jsonl:2", "missing 'output'"]),
    ("alpaca output a number", rows({"instruction": "a", "output": "b"},
                                    {"instruction": "c", "output": 7}),
     [*TRAIN, "data.train=bad.jsonl", "data.format=auto"],
     ["bad.jsonl:2", "'output' is a int, not a string"]),
    ("completion a list", rows({"prompt": "a", "completion": ["b"]}),
     [*TRAIN, "data.train=bad.jsonl", "data.format=auto"], ["bad.jsonl:1", "'completion' is a list"]),
    ("parquet that is not parquet", files(**{"bad.parquet": b"not parquet at all"}),
     [*TRAIN, "data.train=bad.parquet"], ["bad.parquet", "cannot parse it as parquet"]),
    ("eval file missing", None, [*TRAIN, "data.eval=held_out.jsonl"],
     ["held_out.jsonl", "not found"]),
    ("hold-out larger than the data", None, [*TRAIN, "data.eval_size=40"],
     ["data.eval_size=40", "no training rows"]),
    ("fewer rows than a batch", None, [*TRAIN, "data.max_samples=3"],
     ["3 usable rows, fewer than one batch", "train.batch_size"]),
    ("truncation leaves no label", None, [*TRAIN, "data.max_len=1"],
     ["no training example left", "data.max_len=1"]),
    ("no such shipped data", None, [*TRAIN, "data.train=peftkit:data/nope.jsonl"],
     ["peftkit:data/nope.jsonl", "no such data file ships with peftkit"]),
    ("hub dataset while offline", None, [*TRAIN, "data.train=someone/some-dataset"],
     ["someone/some-dataset", "unreachable"]),
    # --- chat templates that cannot render --------------------------------------------------
    ("template raises", template("{{ raise_exception('roles must alternate') }}"),
     [*TRAIN, "model.tiny=false", "model.name=model"],
     ["data.jsonl:1", "chat template", "roles must alternate"]),
    ("template syntax error", template("{% for m in messages %}{{ m.content }}"),
     [*TRAIN, "model.tiny=false", "model.name=model"], ["data.jsonl:1", "chat template"]),
    ("template undefined name", template("{{ messages[0].content | no_such_filter }}"),
     [*TRAIN, "model.tiny=false", "model.name=model"], ["chat template"]),
    # --- run directories --------------------------------------------------------------------
    ("run directory holds a run", with_run(), TRAIN,
     ["runs/tiny-demo already holds a run", "--resume", "--overwrite"]),
    ("directory that is not a run", files(**{"runs__tiny-demo__mine.txt": "precious"}),
     [*TRAIN, "--overwrite"], ["not a peftkit run", "refusing to delete"]),
    ("resume with no checkpoint", files(**{"runs__tiny-demo__recipe.json": "{}"}),
     [*TRAIN, "--resume"], ["no complete checkpoint under runs/tiny-demo/checkpoints",
                            "start it over with --overwrite"]),
    # --- checkpoints: damaged ---------------------------------------------------------------
    ("manifest missing", with_run(delete("manifest.json")),
     [*TRAIN, "--resume", "runs/tiny-demo/checkpoints/step-3"], ["incomplete checkpoint"]),
    ("manifest not JSON", with_run(lambda c, t: (c / "manifest.json").write_text("{")),
     [*TRAIN, "--resume"], ["step-3", "unreadable checkpoint metadata"]),
    ("file missing from the manifest", with_run(resealed(lambda c, t: (c / "scheduler.pt")
                                                         .unlink())),
     [*TRAIN, "--resume"], ["incomplete checkpoint", "scheduler.pt"]),
    ("optimizer truncated", with_run(truncate("optimizer.pt")), [*TRAIN, "--resume"],
     ["optimizer.pt", "corrupt or truncated"]),
    ("adapter byte flipped", with_run(flip_byte("adapter/adapter_model.safetensors")),
     [*TRAIN, "--resume"], ["adapter_model.safetensors", "corrupt or truncated"]),
    ("rng state deleted", with_run(delete("rng-rank0.pt")), [*TRAIN, "--resume"],
     ["rng-rank0.pt", "corrupt or truncated"]),
    ("state.json without step", with_run(resealed(lambda c, t: (c / "state.json")
                                                  .write_text('{"epoch": 0}'))),
     [*TRAIN, "--resume"], ["unreadable checkpoint metadata", "step"]),
    ("adapter not safetensors", with_run(resealed(
        lambda c, t: (c / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64))),
     [*TRAIN, "--resume"], ["cannot restore the checkpoint", "SafetensorError"]),
    ("optimizer a malicious pickle", with_run(resealed(evil_optimizer)), [*TRAIN, "--resume"],
     ["step-3/optimizer.pt: holds a pickled object that refers to posix.system",
      "never unpickles", "--resume runs/tiny-demo/checkpoints/step-2"]),
    ("another run's checkpoint into this run", with_run(lambda c, t: shutil.copytree(
        c, t / "elsewhere" / "step-3")), [*TRAIN, "--resume", "elsewhere/step-3"],
     ["belongs to another run directory", "runs/tiny-demo already holds a run", "name=NEW"]),
    ("another process count and global batch", with_run(edit_state(world_size=2)),
     [*TRAIN, "train.grad_accum=3", "--resume"],
     [DIFFERENT, "train.grad_accum: 1 -> 3 (the global batch",
      "4 x 1 x 2 = 8 rows, now 4 x 3 x 1 = 12"]),
    ("ZeRO partitions of 2 processes", with_run(resealed(zero_partitions)),
     [*TRAIN, "--resume"], ["optimizer state is partitioned over 2 processes",
                            "resume with 2 processes"]),
    # --- the final adapter of a run, as eval and generate load it --------------------------
    ("final adapter truncated", with_run(lambda c, t: truncate("adapter_model.safetensors")(
        t / "runs" / "tiny-demo" / "adapter", t)), ["eval", "runs/tiny-demo", "--limit", "2"],
     ["runs/tiny-demo/adapter", "cannot load the adapter", "SafetensorError"]),
    ("final adapter config not JSON", with_run(
        lambda c, t: (t / "runs" / "tiny-demo" / "adapter" / "adapter_config.json").write_text("{")),
     ["generate", "runs/tiny-demo", "Sort: 3 1 2"], ["runs/tiny-demo/adapter", "cannot load the adapter"]),
    # --- checkpoints: another recipe, or other data -----------------------------------------
    ("resume with another rank", with_run(), [*TRAIN, "adapter.r=8", "--resume"],
     [DIFFERENT, "adapter.r: 16 -> 8"]),
    ("resume with another seed", with_run(), [*TRAIN, "train.seed=1", "--resume"],
     [DIFFERENT, "train.seed: 0 -> 1"]),
    ("resume with another batch geometry", with_run(),
     [*TRAIN, "train.batch_size=2", "train.grad_accum=2", "--resume"],
     [DIFFERENT, "train.batch_size: 4 -> 2", "train.grad_accum: 1 -> 2"]),
    ("resume with another model", with_run(), [*TRAIN, "model.tiny_size=s", "--resume"],
     [DIFFERENT, "model.tiny_size: 'xs' -> 's'"]),
    ("resume with another learning rate", with_run(), [*TRAIN, "train.lr=1e-4", "--resume"],
     [DIFFERENT, "train.lr: 0.001 -> 0.0001"]),
    ("resume with other data", with_run(lambda c, t: (t / "data.jsonl").write_text(
        ROWS.replace("Sort: ", "Sort these: "))), [*TRAIN, "--resume"],
     ["training data differ"]),
]
assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


def snapshot(root: Path) -> dict:
    """Every path under `root` with its mtime and content hash (None for directories)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(
        p.read_bytes()).hexdigest() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("setup, argv, fragments", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input(request, tmp_path, monkeypatch, capsys, setup, argv, fragments):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # a recipe import must not write
    (tmp_path / "data.jsonl").write_text(ROWS)
    if setup:
        setup(tmp_path, lambda: request.getfixturevalue("finished_run"))
    capsys.readouterr()
    before = snapshot(tmp_path)

    rc = main(list(argv))
    out, err = capsys.readouterr()

    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(tmp_path) == before  # nothing written, changed or removed
    assert not (tmp_path / "pwned").exists()  # the malicious pickle never ran


@pytest.mark.parametrize("write", ["torch.save", "pickle.dumps"])
def test_a_planted_pickle_is_refused_and_never_runs(request, tmp_path, monkeypatch, capsys,
                                                    write):
    """scheduler.pt replaced by a pickle that runs a command, the manifest forged to match:
    one line naming the file and what it refers to, with advice that keeps the check on. A
    raw pickle (protocol 4+) makes torch warn about the protocol; that stays off stderr."""
    import pickle
    import warnings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text(ROWS)
    ckpt = tmp_path / "runs" / "tiny-demo" / "checkpoints" / "step-3"

    def plant(ckpt, tmp):
        evil = {"last_epoch": Evil(tmp / "pwned")}
        if write == "torch.save":
            torch.save(evil, ckpt / "scheduler.pt")
        else:
            (ckpt / "scheduler.pt").write_bytes(pickle.dumps(evil, protocol=4))

    with_run(resealed(plant))(tmp_path, lambda: request.getfixturevalue("finished_run"))
    checkpoint.verify(ckpt)  # the forged manifest passes: only the loading can catch it
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main([*TRAIN, "--resume"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert rc == 2 and lines == [
        "error: runs/tiny-demo/checkpoints/step-3/scheduler.pt: holds a pickled object that refers "
        "to posix.system, not the tensors and plain containers peftkit writes; peftkit never "
        "unpickles arbitrary objects (that can run any code), so step-3 cannot be restored: "
        "resume from an earlier checkpoint with --resume runs/tiny-demo/checkpoints/step-2, or "
        "retrain"], err
    assert not [w for w in caught if "pickle" in str(w.message)], [str(w.message) for w in caught]
    assert "weights_only" not in err and not (tmp_path / "pwned").exists()


def test_disk_full_while_saving_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    """Not bad input (exit 1), but still one line, and the previous checkpoint survives."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text(ROWS)
    save = torch.save

    def full_at_step_2(obj, path, *args, **kwargs):
        if ".tmp-step-2" in str(path) and "optimizer" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_at_step_2)
    rc = main(TRAIN)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: cannot write checkpoint step-2 in runs/tiny-demo/checkpoints: no "
                           "space left on device; the partial checkpoint was removed and the "
                           "newest complete checkpoint runs/tiny-demo/checkpoints/step-1 is intact")
    assert last.endswith("Resume with: peftkit train " + " ".join(TRAIN[1:]) + " --resume")
    checkpoints = tmp_path / "runs" / "tiny-demo" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-1"]
    checkpoint.verify(checkpoints / "step-1")
    assert not (tmp_path / "runs" / "tiny-demo" / "adapter").exists()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)

    # Full again while writing the final adapter: one line too (the CLI's last resort).
    from peftkit.training import loop as train

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / "adapter"))

    monkeypatch.setattr(train, "_save_outputs", full)
    assert main([*TRAIN, "--resume"]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: no space left on device (runs/tiny-demo/adapter); free disk "
                           "space, then continue from the newest complete checkpoint"), last
    assert [p.name for p in checkpoint.step_dirs(checkpoints)] == ["step-2", "step-3"]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main([*TRAIN, "--resume"]) == 0  # space again: the run completes
    assert (tmp_path / "runs" / "tiny-demo" / "adapter" / "adapter_model.safetensors").is_file()


def test_every_resume_safe_setting_exists():
    keys = {"name"} | {f"{s}.{f}" for s, cls in SECTIONS.items()
                       for f in cls.__dataclass_fields__}
    assert RESUME_SAFE <= keys, RESUME_SAFE - keys
    # what defines a trajectory is never among them
    for key in ("model.name", "adapter.r", "data.train", "train.seed", "train.lr",
                "train.batch_size", "train.grad_accum", "data.max_samples"):
        assert key not in RESUME_SAFE


def test_trust_remote_code_is_off_unless_asked_and_then_said(tmp_path, monkeypatch, capsys):
    from peftkit.recipe import registry

    assert not any(e.recipe.model.trust_remote_code for e in registry.shipped().values())
    monkeypatch.chdir(tmp_path)
    for flag, said in (([], False), (["model.trust_remote_code=true"], True)):
        assert main([*TRAIN, *flag, "data.train=missing.jsonl"]) == 2
        err = capsys.readouterr().err
        assert ("note: model.trust_remote_code=true: running the modelling code shipped with "
                "peftkit/tiny-llama-demo" in err) is said, err
        assert err.splitlines()[-1].startswith("error: missing.jsonl: file not found")


def test_deepspeed_missing_is_one_line_before_any_worker(tmp_path, monkeypatch, capsys):
    import importlib.util

    from peftkit.training import launcher

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setattr(launcher, "run", lambda *a, **k: pytest.fail("workers started"))
    monkeypatch.chdir(tmp_path)
    assert main([*TRAIN, "launch.strategy=deepspeed", "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: launch.strategy=deepspeed needs DeepSpeed: pip install " \
                  "'peftkit[deepspeed]'"
