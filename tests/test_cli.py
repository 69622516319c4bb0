"""The `peftkit` command line, called in-process: ls, show, cp, train, errors and exit codes."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit import __version__
from peftkit.recipe import registry
from peftkit.cli.app import build_parser, main
from peftkit.recipe.schema import SECTIONS
from peftkit.recipe.overrides import apply_overrides

# the tests build models outside `main`, whose warning filters do not apply there
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")

PARAMS = re.compile(r"parameters: ([\d,]+) trainable of ([\d,]+)")

# Published totals of the real models (safetensors metadata on the Hub), and their shapes:
# (hidden, intermediate, layers, kv_dim) with q/o projections hidden x hidden.
REAL = {
    "llama3-8b-lora": (8_030_261_248, (4096, 14336, 32, 1024)),
    "qwen2.5-7b-lora": (7_615_616_512, (3584, 18944, 28, 512)),
    "mistral-7b-lora": (7_248_023_552, (4096, 14336, 32, 1024)),
}


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def counts(out: str) -> tuple[int, int]:
    found = PARAMS.findall(out)
    assert len(found) == 1, out
    return tuple(int(x.replace(",", "")) for x in found[0])


def field_value(out: str, key: str) -> str:
    """The printed value of `key` in `peftkit show` output (with any override marker): the
    text between the key and the start of the field's doc."""
    section, name = key.split(".")
    doc = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name).metadata["doc"]
    match = re.search(rf"^\s*{re.escape(key)}\s+(\S.*?)\s+{re.escape(doc[:12])}", out, re.M)
    assert match, (key, out)
    return match.group(1)


def subcommands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, torch's spinning
    worker threads make the tiny model 3-6x slower than one thread (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# ls, show

def test_ls_lists_every_recipe_with_its_base_model(capsys):
    rc, out, err = cli(capsys, "ls")
    assert rc == 0 and err == ""
    entries = registry.shipped()
    assert len(entries) >= 4
    for name, entry in entries.items():
        line = next((ln for ln in out.splitlines() if re.search(rf"[│|]\s*{re.escape(name)}\s",
                                                                 ln)), None)
        assert line is not None, (name, out)
        assert entry.recipe.model.name in line, (name, line)
        assert f"r{entry.recipe.adapter.r}" in line


@pytest.fixture(scope="module")
def demo_counts():
    """{r: (trainable, total)} of the demo's tiny model with a rank-r adapter, built by hand
    (no `peftkit show`), and the LoRA-able width of the model."""
    import dataclasses

    import torch

    from peftkit.model.loading import attach_adapter, base_path, count_parameters, load_model

    recipe = registry.resolve("tiny-demo").recipe
    found = {}
    for r in (4, 8, 16):
        model = load_model(base_path(recipe.model), recipe.model, torch.float32)
        # every nn.Linear but the output head is adapted by targets=all-linear (A: r x in,
        # B: out x r); embed_tokens and lm_head are modules_to_save, trained in full
        width = sum(m.in_features + m.out_features for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
        full = model.get_input_embeddings().weight.numel() + \
            model.get_output_embeddings().weight.numel()
        trainable, total = count_parameters(attach_adapter(
            model, dataclasses.replace(recipe.adapter, r=r)))
        assert trainable == r * width + full  # peft's count agrees with the shapes
        found[r] = (trainable, total)
    assert found[16][1] - found[8][1] == 8 * width
    return found


def test_show_demo_prints_fields_validation_and_counts(capsys, demo_counts):
    rc, out, err = cli(capsys, "show", "tiny-demo")
    assert rc == 0 and err == ""
    recipe = registry.resolve("tiny-demo").recipe
    for section in SECTIONS:
        for key, value in recipe.to_dict()[section].items():
            shown = field_value(out, f"{section}.{key}")
            assert shown == repr(value), (section, key, shown)
    assert "(override)" not in out
    assert re.search(r"^validation: ok$", out, re.M)
    assert counts(out) == demo_counts[16]


def test_show_with_override_marks_it_and_counts_fewer(capsys, demo_counts):
    rc, out, err = cli(capsys, "show", "tiny-demo", "adapter.r=8", "train.lr=1e-4")
    assert rc == 0 and err == ""
    assert field_value(out, "adapter.r") == "8  (override)"
    assert field_value(out, "train.lr") == "0.0001  (override)"
    assert out.count("(override)") == 2
    assert counts(out) == demo_counts[8]
    assert demo_counts[8][0] < demo_counts[16][0]


@pytest.mark.parametrize("name", sorted(REAL))
def test_show_real_recipe_offline_counts_the_real_model(capsys, name):
    real_total, (hidden, inter, layers, kv) = REAL[name]
    rc, out, err = cli(capsys, "show", name)
    assert rc == 0 and err == ""
    assert "validation: ok" in out and "table of published shapes" in out
    trainable, total = counts(out)
    r = registry.resolve(name).recipe.adapter.r
    # LoRA on q, k, v, o, gate, up, down of every layer: r x (in + out) each
    lora = r * layers * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + inter))
    assert trainable == lora
    assert abs(total - real_total) / real_total < 0.01
    assert total - trainable == real_total  # the base model, exactly


def test_show_llama_total_is_about_8b(capsys):
    rc, out, _ = cli(capsys, "show", "llama3-8b-lora")
    assert rc == 0
    _, total = counts(out)
    assert math.isclose(total, 8_030_261_248, rel_tol=0.01)


# ---------------------------------------------------------------------------------------------
# cp

def test_cp_then_show_and_edit(capsys, tmp_path, demo_counts):
    rc, out, err = cli(capsys, "cp", "tiny-demo", "mine.py")
    assert rc == 0 and err == ""
    mine = tmp_path / "mine.py"
    demo_source = (registry.recipes_dir() / "tiny_demo.py").read_text()
    assert mine.read_text() == demo_source
    assert "mine.py" in out

    rc, out, err = cli(capsys, "show", "mine.py")
    assert rc == 0 and err == ""
    assert re.search(r"^mine\b", out, re.M)
    assert field_value(out, "adapter.r") == "16"
    assert counts(out) == demo_counts[16]

    assert demo_source.count("r=16") == 1
    mine.write_text(demo_source.replace("r=16", "r=4"))
    rc, out, err = cli(capsys, "show", str(mine))
    assert rc == 0 and err == ""
    assert field_value(out, "adapter.r") == "4"
    assert "(override)" not in out
    assert counts(out) == demo_counts[4]


def test_cp_creates_parent_directories(capsys, tmp_path):
    rc, _, _ = cli(capsys, "cp", "llama3-8b-lora", "sub/dir/llama.py")
    assert rc == 0
    assert (tmp_path / "sub/dir/llama.py").read_bytes() == \
        registry.resolve("llama3-8b-lora").path.read_bytes()


def test_cp_refuses_to_overwrite_unless_forced(capsys, tmp_path):
    mine = tmp_path / "mine.py"
    mine.write_text("# my own work\n")
    rc, out, err = cli(capsys, "cp", "tiny-demo", "mine.py")
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "--force" in err
    assert mine.read_text() == "# my own work\n"

    rc, _, err = cli(capsys, "cp", "tiny-demo", "mine.py", "--force")
    assert rc == 0 and err == ""
    assert mine.read_text() == (registry.recipes_dir() / "tiny_demo.py").read_text()


# ---------------------------------------------------------------------------------------------
# Errors: exit 2, one line on stderr, no traceback, nothing written

def assert_one_line_error(capsys, tmp_path, argv, *fragments):
    before = snapshot(tmp_path)
    rc, out, err = cli(capsys, *argv)
    assert rc == 2, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and lines[0][len("error: "):].strip(), err
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(tmp_path) == before
    return lines[0]


@pytest.mark.parametrize("command", ["show", "train"])
@pytest.mark.parametrize("args, fragments", [
    (["dmeo"], ["unknown recipe 'dmeo'", "did you mean demo"]),
    (["tiny-demo", "adapter.rr=2"], ["unknown setting 'adapter.rr'", "did you mean adapter.r"]),
    (["tiny-demo", "adapter.r=x"], ["adapter.r='x'", "expected int"]),
    (["tiny-demo", "model.tiny=perhaps"], ["model.tiny='perhaps'", "expected bool"]),
    (["tiny-demo", "adapter.dropout=2"], ["adapter.dropout=2.0", "[0, 1)"]),
    (["tiny-demo", "train.lr=-1"], ["train.lr=-1.0", "> 0"]),
    (["tiny-demo", "train.scheduler=foo"], ["train.scheduler='foo'", "cosine"]),
    (["tiny-demo", "train.lr"], ["section.field=value"]),
    (["missing.py"], ["missing.py", "not found"]),
    (["sub/missing_recipe.py"], ["sub/missing_recipe.py", "not found"]),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, command, args, fragments):
    argv = [command, *args, f"train.output_dir={tmp_path / 'runs'}"]
    assert_one_line_error(capsys, tmp_path, argv, *fragments)


def test_several_problems_are_reported_together(capsys, tmp_path):
    line = assert_one_line_error(capsys, tmp_path, [
        "show", "tiny-demo", "adapter.rr=2", "adapter.r=x", "train.lr=-1", "adapter.dropout=2"],
        "4 problems")
    for key in ("adapter.rr", "adapter.r=", "train.lr", "adapter.dropout"):
        assert key in line


def test_resume_on_a_fresh_directory(capsys, tmp_path):
    assert_one_line_error(capsys, tmp_path, [
        "train", "tiny-demo", f"train.output_dir={tmp_path / 'runs'}", "--resume"],
        "--resume", "no complete checkpoint")


def test_resume_before_overrides_still_reads_them(capsys, tmp_path):
    # --resume takes an optional CHECKPOINT: an override after it must stay an override
    assert_one_line_error(capsys, tmp_path, [
        "train", "tiny-demo", "--resume", f"train.output_dir={tmp_path / 'runs'}"],
        "--resume", "no complete checkpoint")


def test_train_refuses_a_directory_holding_files(capsys, tmp_path):
    keep = tmp_path / "runs" / "tiny-demo" / "keep.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("precious")
    argv = ["train", "tiny-demo", "train.max_steps=3", "train.warmup_steps=1",
            f"train.output_dir={tmp_path / 'runs'}"]
    assert_one_line_error(capsys, tmp_path, argv, str(keep.parent), "--overwrite")
    # not a peftkit run: --overwrite must not delete it either
    assert_one_line_error(capsys, tmp_path, [*argv, "--overwrite"], "not a peftkit run")
    assert keep.read_text() == "precious"
    assert sorted(p.name for p in keep.parent.iterdir()) == ["keep.txt"]


def test_broken_user_recipe_is_one_line(capsys, tmp_path):
    (tmp_path / "multi.py").write_text('raise ValueError("first line\\nsecond line")\n')
    assert_one_line_error(capsys, tmp_path, ["show", "multi.py"], "multi.py:1:",
                          "ValueError: first line", "second line")
    (tmp_path / "syntax.py").write_text("x = (\n")
    assert_one_line_error(capsys, tmp_path, ["show", "syntax.py"], "syntax.py:1:", "SyntaxError")
    (tmp_path / "norecipe.py").write_text("X = 1\n")
    assert_one_line_error(capsys, tmp_path, ["show", "norecipe.py"], "norecipe.py", "RECIPE")


def test_cp_bad_destination_and_unknown_recipe(capsys, tmp_path):
    assert_one_line_error(capsys, tmp_path, ["cp", "tiny-demo", "mine.txt"], "mine.txt", ".py")
    assert_one_line_error(capsys, tmp_path, ["cp", "dmeo", "mine.py"], "did you mean demo")


@pytest.mark.parametrize("argv", [["--debug", "show", "dmeo"], ["show", "dmeo", "--debug"]])
def test_debug_shows_the_traceback(capsys, argv):
    rc, out, err = cli(capsys, *argv)
    assert rc == 2
    assert "Traceback (most recent call last)" in err
    assert "UserError" in err
    assert err.splitlines()[-1].startswith("error: unknown recipe 'dmeo'")


def test_no_command_prints_help_and_exits_2(capsys):
    rc, out, err = cli(capsys)
    assert rc == 2
    assert out.startswith("usage: peftkit")
    for name in ("ls", "show", "cp", "train"):
        assert re.search(rf"^\s+{name}\s", out, re.M), name


@pytest.mark.parametrize("command", [None, *subcommands()])
def test_help_has_examples(capsys, command):
    rc, out, err = cli(capsys, *([command] if command else []), "--help")
    assert rc == 0 and err == ""
    assert "examples:" in out
    assert f"peftkit {command or ''}".strip() in out


def test_version(capsys):
    rc, out, _ = cli(capsys, "--version")
    assert rc == 0 and out.strip() == f"peftkit {__version__}"


def test_subcommands_include_the_contract():
    assert {"ls", "show", "cp", "train"} <= set(subcommands())


def test_start_up_imports_no_heavy_library():
    """`peftkit ls` and every command's parser must not import torch or the libraries on top
    of it (seconds each): the command modules import them inside their handlers."""
    code = ("import sys\n"
            "from peftkit.cli.app import main\n"
            f"for command in {subcommands()!r}:\n"
            "    main([command, '--help'])\n"
            "main(['ls'])\n"
            "heavy = ('torch', 'transformers', 'peft', 'accelerate', 'datasets', 'bitsandbytes',\n"
            "         'matplotlib', 'peftkit.training.loop')\n"
            "print('HEAVY', [m for m in heavy if m in sys.modules])\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=root, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "HEAVY []"


# ---------------------------------------------------------------------------------------------
# One real run of the tiny demo, end to end, in-process

# The demo warms up for 20 steps; warmup longer than max_steps is a config error, hence
# warmup_steps=1. Speed: evaluate on 8 rows held out of 256 training rows, not on the 200-row
# test file (the held-out loss runs twice per run and dominates a 3-step run on 2 CPU cores).
TRAIN = ["train", "tiny-demo", "train.max_steps=3", "train.warmup_steps=1", "train.batch_size=4",
         "train.eval_generate=4", "train.log_every=1", "train.save_every=2",
         "data.eval=", "data.eval_size=8", "data.max_samples=256"]


def loss_records(run: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train the demo once for 3 steps; tests below read (or copy) its run directory."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        rc = main([*TRAIN, f"train.output_dir={root / 'runs'}"])
    return rc, root / "runs" / "tiny-demo"


def test_train_writes_the_run_directory(trained):
    rc, run = trained
    assert rc == 0
    assert sorted(p.name for p in run.parent.iterdir()) == ["tiny-demo"]  # nothing else

    doc = json.loads((run / "recipe.json").read_text())
    for lib in ("torch", "transformers", "peft", "peftkit"):
        assert doc["versions"][lib], lib
    from peftkit.recipe.schema import recipe_from_dict
    expected = apply_overrides(registry.resolve("tiny-demo").recipe,
                               [*TRAIN[2:], f"train.output_dir={run.parent}"])
    assert recipe_from_dict(doc["recipe"]) == expected

    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (16, 32)
    from safetensors import safe_open
    with safe_open(run / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)

    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step-2", "step-3"]
    for n in (2, 3):
        manifest = json.loads((run / "checkpoints" / f"step-{n}" / "manifest.json").read_text())
        assert manifest["step"] == n
        for name, meta in manifest["files"].items():
            assert (run / "checkpoints" / f"step-{n}" / name).stat().st_size == meta["bytes"]

    records = loss_records(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)

    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    card = (run / "README.md").read_text()
    assert card.startswith("---\n")
    assert "library_name: peft" in card.split("\n#", 1)[0]


def test_train_model_card_front_matter_is_valid_yaml(trained):
    import yaml

    _, run = trained
    lines = (run / "README.md").read_text().splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    meta = yaml.safe_load("\n".join(lines[1:end]))
    assert meta["library_name"] == "peft"
    assert "tiny-random" in meta["tags"] and "peftkit" in meta["tags"]


def test_train_again_overwrite_and_resume(trained, tmp_path, capsys):
    rc, first = trained
    assert rc == 0
    runs = tmp_path / "runs"
    shutil.copytree(first, runs / "tiny-demo")
    run = runs / "tiny-demo"
    first_losses = [r["loss"] for r in loss_records(first)]
    capsys.readouterr()

    # the same command again: the run exists
    before = snapshot(run)
    rc, _, err = cli(capsys, *TRAIN, f"train.output_dir={runs}")
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "--overwrite" in err and "--resume" in err
    assert snapshot(run) == before

    # --overwrite: a fresh run with the same seed gives the same losses
    rc, _, _ = cli(capsys, *TRAIN, f"train.output_dir={runs}", "--overwrite")
    assert rc == 0
    records = loss_records(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["loss"] for r in records] == pytest.approx(first_losses, rel=1e-5)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-3"]

    # --resume with a longer schedule: continues at step 4, ends at step 5
    longer = [a if a != "train.max_steps=3" else "train.max_steps=5" for a in TRAIN]
    rc, _, _ = cli(capsys, *longer, f"train.output_dir={runs}", "--resume")
    assert rc == 0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5
    records = [r for r in rows if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in records[:3]] == pytest.approx(first_losses, rel=1e-5)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-5"]


def test_busy_cores_make_torch_threads_wait_passively(monkeypatch):
    """On cores other work keeps busy the CLI asks OpenMP to sleep, not spin (run/busy_cores.py);
    never over the user's own choice, never once torch is loaded, never on a quiet machine."""
    from peftkit.run import busy_cores

    assert busy_cores.busy_cores(load=1.6, busy_now=0.9, cores=2)
    assert not busy_cores.busy_cores(load=1.6, busy_now=0.1, cores=2)  # a run that just ended
    assert not busy_cores.busy_cores(load=1.0, busy_now=1.0, cores=2)  # a spike, not a minute
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(busy_cores.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr(busy_cores, "_cpu_busy_share", lambda seconds: 1.0)
    assert busy_cores.wait_passively_on_busy_cores() is None  # torch is loaded in this process
    monkeypatch.delitem(sys.modules, "torch")
    note = busy_cores.wait_passively_on_busy_cores()
    assert note.startswith("note: the CPU is busy") and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert busy_cores.wait_passively_on_busy_cores() is None
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(busy_cores.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert busy_cores.wait_passively_on_busy_cores() is None and "OMP_WAIT_POLICY" not in os.environ
