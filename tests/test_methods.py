"""Adapter methods (peftkit/adapters/): each one trains, and its saved adapter loads in plain
peft with the same logits; settings that cannot work together are refused together."""

import json

import pytest
import torch

from peftkit.adapters.lora import LORA, lora_config
from peftkit.recipe import registry
from peftkit.data.batching import IGNORE
from peftkit.recipe import Lora, Model
from peftkit.recipe.overrides import apply_overrides
from peftkit.errors import ConfigError, UserError
from peftkit.export.merge import merge_run
from peftkit.training.loss import TokenLoss
from peftkit.model.loading import attach_adapter, base_path, load_model
from peftkit.model.summary import parameter_counts
from peftkit.training.loop import train

# The demo task at its smallest: no embeddings/head in full (so the method alone trains),
# a high learning rate, a few steps on a few rows.
TINY = ["model.tiny_size=xs", "data.max_samples=16", "data.eval=", "data.eval_size=8",
        "train.eval_generate=0", "train.log_every=1", "train.warmup_steps=0",
        "train.max_steps=3", "train.batch_size=4", "train.lr=1e-2", "train.save_every=0",
        "train.eval_every=0", "adapter.dropout=0.0", "adapter.modules_to_save="]

METHODS = {
    "dora": ["adapter.use_dora=true"],
    "rslora-patterns": ["adapter.use_rslora=true", "adapter.rank_pattern=q_proj=4",
                        "adapter.alpha_pattern=v_proj=64"],
    "loraplus": ["adapter.loraplus_lr_ratio=16"],
    "gaussian": ["adapter.init=gaussian"],
    "pissa": ["adapter.init=pissa"],
    "pissa-niter": ["adapter.init=pissa_niter_2", "adapter.r=4"],
    "olora": ["adapter.init=olora", "adapter.r=4"],
    "ia3": ["adapter.method=ia3"],
    "prompt-tuning": ["adapter.method=prompt_tuning", "adapter.num_virtual_tokens=4"],
}


def recipe_for(tmp_path, name, *overrides):
    entry = registry.resolve("tiny-demo")
    return apply_overrides(entry.recipe, [*TINY, f"train.output_dir={tmp_path}",
                                          f"name={name}", *overrides]), str(entry.path)


@pytest.mark.parametrize("name", METHODS)
def test_method_trains_and_its_adapter_loads_in_plain_peft(tmp_path, name):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    recipe, source = recipe_for(tmp_path, name, *METHODS[name])
    result = train(recipe, source)
    before, after = result.evals["before"]["eval_loss"], result.evals["after"]["eval_loss"]
    assert after < before, (name, before, after)
    # `peftkit show` counts the same trainable parameters on the meta device.
    assert parameter_counts(recipe)[0] == result.trainable

    adapter = result.path / "adapter"
    config = PeftConfig.from_pretrained(adapter)
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path), adapter).eval()
    ours = result.model.eval()
    ids = torch.randint(3, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(input_ids=ids).logits, plain(input_ids=ids).logits
        with ours.disable_adapter():
            base = ours(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5, rtol=0), (expected - got).abs().max()
    if expected.shape == base.shape:
        assert (expected - base).abs().max() > 1e-3  # the adapter changes the outputs

    saved = json.loads((adapter / "adapter_config.json").read_text())
    if name == "dora":
        assert saved["use_dora"] is True
    if name == "rslora-patterns":
        assert saved["use_rslora"] and saved["rank_pattern"] == {"q_proj": 4}
        assert saved["alpha_pattern"] == {"v_proj": 64}
        q = ours.get_base_model().model.layers[0].self_attn.q_proj
        assert q.lora_A["default"].weight.shape[0] == 4
        v = ours.get_base_model().model.layers[0].self_attn.v_proj
        assert v.scaling["default"] == pytest.approx(64 / 16 ** 0.5)  # alpha / sqrt(r)
    if name in ("pissa", "pissa-niter", "olora"):  # converted for the original base: rank 2r
        assert saved["r"] == 2 * recipe.adapter.r and saved["init_lora_weights"] is True
    if name == "ia3":
        assert saved["peft_type"] == "IA3"
    if name == "prompt-tuning":
        assert saved["peft_type"] == "PROMPT_TUNING" and saved["num_virtual_tokens"] == 4

    # The model card names the method; `peftkit merge` refuses what peft cannot merge.
    label = {"ia3": "IA3", "prompt-tuning": "prompt-tuning"}.get(name, "LoRA")
    assert f"\n# {name}: {label} adapter\n" in (result.path / "README.md").read_text()
    if name == "prompt-tuning":
        with pytest.raises(UserError, match="adapter.method=prompt_tuning: nothing to merge"):
            merge_run(result.path, tmp_path / "merged")


def tiny_model(arch="llama"):
    model = Model(f"tiny/{arch}", arch=arch, tiny=True)
    return load_model(base_path(model), model, torch.float32)


def batch():
    ids = torch.randint(3, 4000, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding
    labels = ids.clone()
    labels[:, :6] = IGNORE  # prompt tokens
    labels[mask == 0] = IGNORE
    return ids, mask, labels


@pytest.mark.parametrize("method", ["prompt_tuning", "ia3"])
def test_token_loss_equals_peft_loss(method):
    """Prompt tuning takes the full PeftModel forward (its virtual tokens come first, with no
    label); IA3 scales inside the layers, so the fast decoder path sees it."""
    model = attach_adapter(tiny_model(), Lora(method=method, num_virtual_tokens=5))
    with torch.no_grad():  # move the adapter off its identity start
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(1.0 if method == "ia3" else 0.0, 0.5)
    ids, mask, labels = batch()
    loss_sum, count = TokenLoss(model)(input_ids=ids, attention_mask=mask, labels=labels)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert count.item() == int((labels[:, 1:] != IGNORE).sum())
    assert torch.allclose(loss_sum / count, reference, atol=1e-5), (loss_sum / count, reference)
    (loss_sum / count).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.parameters() if p.requires_grad)


def test_loraplus_gives_b_matrices_a_larger_learning_rate():
    model = attach_adapter(tiny_model(), Lora(r=4, loraplus_lr_ratio=16))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = LORA.make_optimizer(model, params, Lora(loraplus_lr_ratio=16), 1e-3, 0.0)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        if "lora_A" in name:
            assert lr_of[id(p)] == pytest.approx(1e-3), name
        if "lora_B" in name:
            assert lr_of[id(p)] == pytest.approx(16e-3), name
    assert len(lr_of) == len(params)
    plain = LORA.make_optimizer(model, params, Lora(), 1e-3, 0.0)
    assert [g["lr"] for g in plain.param_groups] == [1e-3]


@pytest.mark.parametrize("init, expected", [("default", True), ("gaussian", "gaussian"),
                                            ("pissa", "pissa"),
                                            ("pissa_niter_16", "pissa_niter_16"),
                                            ("olora", "olora"), ("loftq", True)])
def test_init_maps_to_peft(init, expected):
    config = lora_config(Lora(init=init, rank_pattern="q_proj=8, v_proj=32",
                              alpha_pattern="^model.*o_proj$=3.5"))
    assert config.init_lora_weights == expected
    assert config.rank_pattern == {"q_proj": 8, "v_proj": 32}
    assert config.alpha_pattern == {"^model.*o_proj$": 3.5}


def test_incompatible_settings_are_reported_together():
    entry = registry.resolve("tiny-demo")
    with pytest.raises(ConfigError) as info:
        apply_overrides(entry.recipe, [
            "adapter.method=ia3", "adapter.use_dora=true", "adapter.init=pissa_niter_x",
            "adapter.rank_pattern=q_proj=8,v_proj", "adapter.loraplus_lr_ratio=-1",
            "adapter.num_virtual_tokens=0", "adapter.method=ia3"])
    problems = "\n".join(info.value.problems)
    for expected in ("adapter.use_dora=True: applies to method=lora only",
                     "adapter.init='pissa_niter_x': must be one of",
                     "adapter.rank_pattern='q_proj=8,v_proj': 'v_proj' is not name=int",
                     "adapter.loraplus_lr_ratio=-1.0: must be >= 0",
                     "adapter.num_virtual_tokens=0: must be > 0"):
        assert expected in problems, problems
    with pytest.raises(ConfigError, match="needs model.quantize=nf4"):
        apply_overrides(entry.recipe, ["adapter.init=loftq"])
    with pytest.raises(ConfigError, match="cannot convert"):
        apply_overrides(entry.recipe, ["adapter.init=pissa", "adapter.use_rslora=true",
                                       "adapter.rank_pattern=q_proj=4"])
    apply_overrides(entry.recipe, ["adapter.init=pissa_niter_16"])  # a valid form


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_loftq_without_cuda_is_a_clear_error():
    with pytest.raises(UserError, match="CUDA GPU"):
        LORA.initialise(None, Lora(init="loftq"))


def test_show_prints_each_method(capsys):
    from peftkit.cli.app import main

    counts = {}
    for method in ("lora", "ia3", "prompt_tuning"):
        assert main(["show", "tiny-demo", "model.tiny_size=xs", f"adapter.method={method}",
                     "adapter.modules_to_save="]) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("parameters")]
        counts[method] = int(line[0].split()[1].replace(",", ""))
        assert {"lora": "LoRA r16", "ia3": "IA3", "prompt_tuning": "prompt tuning"}[method] \
            in line[0]
    # xs: hidden 64, 2 layers; prompt tuning = 20 virtual tokens x hidden 64
    assert counts["prompt_tuning"] == 20 * 64
    assert counts["ia3"] < counts["lora"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="LoftQ runs on CUDA only")
def test_loftq_on_a_4bit_base_loads_in_plain_peft(tmp_path):
    from peft import PeftModel

    from peftkit.run.runs import load_run

    recipe, source = recipe_for(tmp_path, "loftq", "model.quantize=nf4", "adapter.init=loftq",
                                "adapter.r=4")
    result = train(recipe, source)
    _, plain, _ = load_run(result.path)  # the same 4-bit base, plus the saved adapter
    assert isinstance(plain, PeftModel)
    ids = torch.randint(3, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    ids = ids.to(plain.device)
    with torch.no_grad():
        expected, got = result.model.eval()(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.allclose(expected.float(), got.float(), atol=1e-3), (expected - got).abs().max()
