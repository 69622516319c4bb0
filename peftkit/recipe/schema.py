"""The recipe schema: typed, frozen sections whose fields carry their own type, default and doc.

Everything else (CLI overrides, validation messages, `peftkit show`, recipe.json) is derived
from these dataclasses, so there is exactly one list of settings to keep in sync.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from peftkit.errors import ConfigError
from peftkit.adapters.methods import adapter_problems


def _f(default: Any, doc: str, choices: tuple | None = None) -> Any:
    """A dataclass field with a one-line doc (and optional allowed values) in its metadata."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in a frozen recipe")
    return field(default=default, metadata=meta)


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Model:
    name: str = _f("", "Hub id or local path of the base model")
    arch: str = _f("", "transformers model_type (llama, qwen2, mistral, ...); inferred from the "
                       "name when empty; needed to build the tiny form offline")
    tiny: bool = _f(False, "build a tiny, random-weight model of the same architecture offline "
                           "instead of loading the named weights (tests, CI, dry runs)")
    tiny_size: str = _f("xs", "size of the tiny form: xs for tests (hidden 64, 2 layers), s for "
                              "demos (hidden 256, 4 layers), m for benchmarks (hidden 512, 8 "
                              "layers, 32k vocab)", ("xs", "s", "m"))
    dtype: str = _f("auto", "weight dtype of the frozen base; auto = bfloat16 on a bf16-capable "
                            "GPU, float32 otherwise", DTYPES)
    quantize: str | None = _f(None, "load the base quantized with bitsandbytes",
                              (None, "nf4", "fp4", "int8"))
    double_quant: bool = _f(True, "4-bit only: quantize the quantization constants too "
                                  "(QLoRA's double quantization, ~0.4 bit/param less)")
    compute_dtype: str = _f("auto", "4-bit only: dtype the quantized layers compute in; auto = "
                                    "bfloat16 on a bf16-capable GPU, float32 otherwise (CPU)",
                            DTYPES)
    quant_storage: str = _f("auto", "4-bit only: dtype the packed 4-bit weights are stored in; "
                                    "auto = uint8; FSDP needs it equal to model.dtype",
                            ("auto", "uint8", "bfloat16", "float16", "float32"))
    attn_implementation: str = _f("auto", "attention kernel; auto = transformers' default for "
                                          "the architecture (sdpa where supported)",
                                  ("auto", "sdpa", "eager", "flash_attention_2"))
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the base model")
    trust_remote_code: bool = _f(False, "run modelling code shipped with the Hub repo; off "
                                        "unless you trust its author")


@dataclass(frozen=True)
class Lora:
    r: int = _f(16, "LoRA rank")
    alpha: float = _f(32.0, "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) "
                            "with rslora)")
    dropout: float = _f(0.05, "dropout on the LoRA input")
    targets: str = _f("all-linear", "modules to adapt: 'all-linear', comma-separated module "
                                    "names (q_proj,v_proj) or a regex")
    modules_to_save: str = _f("", "comma-separated modules trained in full and saved with "
                                  "the adapter (e.g. embed_tokens,lm_head)")
    use_rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = _f(False, "weight-decomposed LoRA (DoRA)")
    init: str = _f("default", "initialisation of the LoRA weights: default (B = 0), gaussian, "
                              "pissa (exact SVD), pissa_niter_N (randomised SVD, N iterations), "
                              "olora, loftq (needs model.quantize=nf4 and a CUDA GPU)")
    bias: str = _f("none", "which biases to train", ("none", "all", "lora_only"))
    method: str = _f("lora", "adapter method (peft): lora (with the settings above), ia3 "
                             "(learned rescaling vectors on `targets`), prompt_tuning "
                             "(num_virtual_tokens learned input embeddings)",
                     ("lora", "ia3", "prompt_tuning"))
    num_virtual_tokens: int = _f(20, "prompt_tuning: learned virtual tokens prepended to "
                                     "every input")
    loraplus_lr_ratio: float = _f(0.0, "LoRA+: learning rate of the B matrices = train.lr x "
                                       "this ratio (the paper suggests 16); 0 = off")
    rank_pattern: str = _f("", "per-module ranks overriding r: comma-separated name=rank "
                               "pairs, name a module name or regex (q_proj=8,v_proj=32)")
    alpha_pattern: str = _f("", "per-module alphas overriding alpha, in the form of "
                                "rank_pattern (q_proj=16,v_proj=64)")


DATA_FORMATS = ("auto", "chat", "alpaca", "prompt_completion", "text")


@dataclass(frozen=True)
class Data:
    train: str = _f("", "training data: a .jsonl/.json/.csv/.parquet file, a Hub dataset id, "
                        "or peftkit:<asset> for data shipped with peftkit")
    eval: str = _f("", "held-out data in the same forms; empty = split eval_size rows off train")
    eval_size: int = _f(200, "rows held out from train for evaluation when `eval` is empty")
    format: str = _f("auto", "record format; auto detects it from the first record's fields",
                     DATA_FORMATS)
    max_len: int = _f(1024, "maximum tokens per sample; longer samples are truncated and counted")
    packing: bool = _f(True, "padding-free batches: each micro-batch's samples in one row, "
                             "attention kept inside each sample (same samples and loss as "
                             "padded batches, no compute on padding); padded batches where "
                             "the attention kernel cannot isolate samples (eager, gemma2)")
    loss_on: str = _f("completion", "which tokens carry loss", ("completion", "all"))
    skip_bad_rows: bool = _f(False, "skip (and count) malformed rows instead of failing")
    max_samples: int = _f(0, "use at most this many training rows (0 = all)")
    system_prompt: str = _f("", "system message prepended to every chat sample")


@dataclass(frozen=True)
class Train:
    lr: float = _f(2e-4, "peak learning rate of the adapter weights")
    batch_size: int = _f(4, "samples per micro-batch per process")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    epochs: float = _f(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = _f(0, "optimizer steps to run; 0 = derive from epochs")
    warmup_steps: int = _f(0, "linear warmup steps")
    scheduler: str = _f("cosine", "learning-rate schedule after warmup",
                        ("cosine", "linear", "constant"))
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    compile: bool = _f(False, "torch.compile each decoder layer (fuses the elementwise work "
                              "around the matmuls; the first step pays a compile of tens of "
                              "seconds)")
    seed: int = _f(42, "seed for weights init, data order and dropout")
    log_every: int = _f(10, "steps between metrics.jsonl entries")
    eval_every: int = _f(0, "steps between evaluations (0 = only at the end)")
    save_every: int = _f(0, "steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = _f(2, "newest checkpoints kept on disk")
    eval_generate: int = _f(0, "held-out prompts answered by greedy decoding before and after "
                               "training, scored by exact match (0 = off)")
    max_new_tokens: int = _f(32, "token budget per answer for eval_generate")
    output_dir: str = _f("runs", "parent directory of run directories")
    report_to: str = _f("none", "experiment tracker fed with the metrics.jsonl numbers, "
                                "through accelerate (tensorboard writes to runs/<name>/tb/)",
                        ("none", "tensorboard", "wandb", "mlflow"))


@dataclass(frozen=True)
class Launch:
    num_processes: int = _f(1, "processes per machine (one per GPU) started by `peftkit train`; "
                               "--nproc overrides it")
    strategy: str = _f("ddp", "how processes share the work: ddp replicates the model; fsdp "
                              "(FSDP2) shards it, one unit per decoder layer; deepspeed shards "
                              "by launch.zero_stage (GPUs, or 2+ CPU processes over gloo)",
                       ("ddp", "fsdp", "deepspeed"))
    zero_stage: int = _f(2, "launch.strategy=deepspeed: ZeRO stage (1 = optimizer state "
                            "sharded, 2 = + gradients, 3 = + weights)", (1, 2, 3))
    mixed_precision: str = _f("auto", "autocast precision; auto = bf16 on a bf16-capable GPU, "
                                      "no on CPU", ("auto", "no", "bf16", "fp16"))
    hardware: str = _f("any", "what the recipe is sized for, shown in `peftkit ls`")


@dataclass(frozen=True)
class Hub:
    repo_id: str = _f("", "Hugging Face Hub repository (owner/name) that `peftkit push` and "
                          "hub.push_at_end publish to")
    private: bool = _f(False, "create the repository private (an existing repository keeps "
                              "its visibility)")
    revision: str = _f("", "branch to push to, created from main when missing; empty = main")
    license: str = _f("", "license in the model card metadata (e.g. apache-2.0, llama3.1, "
                          "other); empty = not stated")
    push_at_end: bool = _f(False, "push the adapter and its model card when training ends "
                                  "(main process); a failed push exits 1, the run stays as it is")


SECTIONS = {"model": Model, "adapter": Lora, "data": Data, "train": Train, "launch": Launch,
            "hub": Hub}

# Settings that may change when a run resumes from a checkpoint: they decide how long it runs,
# what is logged, evaluated and kept, where it is written and how memory is spent, but not
# the steps already taken. Every other setting must match the checkpoint (peftkit/resume.py).
RESUME_SAFE = frozenset({
    "name", "train.max_steps", "train.epochs", "train.log_every", "train.eval_every",
    "train.save_every", "train.keep_checkpoints", "train.eval_generate", "train.max_new_tokens",
    "train.output_dir", "train.gradient_checkpointing", "data.eval", "model.attn_implementation",
    "data.packing", "train.compile",  # same samples and loss per step, only faster
    "launch.num_processes", "launch.hardware", "train.report_to",
    "hub.repo_id", "hub.private", "hub.revision", "hub.license", "hub.push_at_end",
})


@dataclass(frozen=True)
class Recipe:
    model: Model
    adapter: Lora = field(default_factory=Lora)
    data: Data = field(default_factory=Data)
    train: Train = field(default_factory=Train)
    launch: Launch = field(default_factory=Launch)
    hub: Hub = field(default_factory=Hub)
    name: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Overrides: "section.field=value" converted by the field's declared type.

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(text: str, tp: Any) -> Any:
    """Convert a command-line string to the field type `tp` (raises ValueError)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(text, inner[0])
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            # allow 1e3-style integers, but not 2.5
            number = float(text)
            if not number.is_integer():
                raise ValueError("expected an integer") from None
            return int(number)
    if tp is float:
        return float(text)
    return text


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def parse_overrides(items: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Parse `section.field=value` strings. Returns ({section: {field: value}}, problems)."""
    parsed: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    all_keys = [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)]
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            problems.append(f"override '{item}': expected section.field=value "
                            f"(e.g. train.lr=1e-4)")
            continue
        section, dot, name = key.partition(".")
        if section == "name" and not dot:
            parsed.setdefault("", {})["name"] = text
            continue
        cls = SECTIONS.get(section)
        types_ = _field_types(cls) if cls else {}
        if not dot or cls is None or name not in types_:
            problems.append(f"unknown setting '{key}'{suggest(key, all_keys)}")
            continue
        try:
            parsed.setdefault(section, {})[name] = _convert(text, types_[name])
        except ValueError:
            problems.append(f"{key}={text!r}: expected {_type_name(types_[name])}")
    return parsed, problems


def apply_overrides(recipe: Recipe, items: list[str]) -> Recipe:
    """Return a recipe with `section.field=value` overrides applied and validated; every
    problem (unknown keys, unconvertible values, out-of-range values) is reported at once."""
    parsed, problems = parse_overrides(items)
    changes: dict[str, Any] = {}
    for section, values in parsed.items():
        if section == "":
            changes.update(values)
        else:
            changes[section] = dataclasses.replace(getattr(recipe, section), **values)
    recipe = dataclasses.replace(recipe, **changes)
    problems += problems_of(recipe)
    if problems:
        raise ConfigError(problems)
    return recipe


def recipe_from_dict(data: dict) -> Recipe:
    """Rebuild a recipe from `Recipe.to_dict()` output (e.g. a run's recipe.json)."""
    sections = {s: cls(**data[s]) for s, cls in SECTIONS.items() if s in data}
    return Recipe(name=data.get("name", ""), **sections)


# ---------------------------------------------------------------------------------------------
# Validation: every problem at once, each naming its field.

def _check_types(section: str, obj: Any) -> tuple[list[str], list[str]]:
    """(type problems, choice problems) of one section. Range checks need correct types, so
    type problems stop validation early; choice problems do not."""
    problems, bad_choices = [], []
    for name, tp in _field_types(type(obj)).items():
        value = getattr(obj, name)
        allowed = tuple(a for a in typing.get_args(tp)) or (tp,)
        allowed = tuple(float if a is float else a for a in allowed)
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            problems.append(f"{section}.{name}={value!r}: expected {_type_name(tp)}")
            continue
        choices = dataclasses.fields(type(obj))[
            [f.name for f in dataclasses.fields(type(obj))].index(name)].metadata.get("choices")
        if choices and value not in choices:
            shown = ", ".join(str(c).lower() if c is None else str(c) for c in choices)
            bad_choices.append(f"{section}.{name}={value!r}: must be one of {shown}")
    return problems, bad_choices


def _positive(problems: list[str], key: str, value: float, allow_zero: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
        problems.append(f"{key}={value!r}: must be a finite number")
    elif isinstance(value, (int, float)) and (value < 0 or (value == 0 and not allow_zero)):
        need = ">= 0" if allow_zero else "> 0"
        problems.append(f"{key}={value!r}: must be {need}")


def _quantization_problems(m: Model, a: Lora) -> list[str]:
    """Settings that only mean something for (4-bit) quantization, and adapter inits that
    rewrite base weights, which a quantized base cannot hold exactly."""
    problems = []
    four_bit = m.quantize in ("nf4", "fp4")
    only = "only applies to 4-bit quantization (model.quantize=nf4 or fp4)"
    if not four_bit and m.double_quant is False:
        problems.append(f"model.double_quant=False: {only}")
    if not four_bit and m.quant_storage != "auto":
        problems.append(f"model.quant_storage={m.quant_storage!r}: {only}")
    if not four_bit and m.compute_dtype != "auto":
        problems.append(f"model.compute_dtype={m.compute_dtype!r}: {only} (8-bit layers compute "
                        "in the activation dtype; an unquantized base uses model.dtype)")
    if m.quantize and (a.init.startswith("pissa") or a.init == "olora"):
        problems.append(f"adapter.init={a.init!r}: rewrites the base weights, which a "
                        f"quantized base (model.quantize={m.quantize}) cannot hold exactly; use "
                        "default, gaussian or loftq (nf4), or drop model.quantize")
    return problems


def problems_of(recipe: Recipe) -> list[str]:
    problems: list[str] = []
    choice_problems: list[str] = []
    for section in SECTIONS:
        obj = getattr(recipe, section)
        if not isinstance(obj, SECTIONS[section]):
            problems.append(f"{section}: expected a {SECTIONS[section].__name__}(...) section")
            continue
        type_problems, bad_choices = _check_types(section, obj)
        problems += type_problems
        choice_problems += bad_choices
    if problems:
        return problems + choice_problems
    problems = choice_problems
    m, a, d, t, lch = recipe.model, recipe.adapter, recipe.data, recipe.train, recipe.launch
    if not m.name:
        problems.append("model.name: empty; name a Hub model id or a local path")
    problems += _quantization_problems(m, a)
    problems += adapter_problems(m, a)
    _positive(problems, "adapter.r", a.r)
    _positive(problems, "adapter.alpha", a.alpha)
    if not 0 <= a.dropout < 1:
        problems.append(f"adapter.dropout={a.dropout!r}: must be in [0, 1)")
    if not a.targets.strip():
        problems.append("adapter.targets: empty; use all-linear or module names")
    if not d.train:
        problems.append("data.train: empty; name a data file or Hub dataset id")
    _positive(problems, "data.max_len", d.max_len)
    _positive(problems, "data.eval_size", d.eval_size, allow_zero=True)
    _positive(problems, "data.max_samples", d.max_samples, allow_zero=True)
    _positive(problems, "train.lr", t.lr)
    _positive(problems, "train.batch_size", t.batch_size)
    _positive(problems, "train.grad_accum", t.grad_accum)
    _positive(problems, "train.epochs", t.epochs)
    for key in ("max_steps", "warmup_steps", "max_grad_norm", "weight_decay", "log_every",
                "eval_every", "save_every", "eval_generate"):
        _positive(problems, f"train.{key}", getattr(t, key), allow_zero=True)
    _positive(problems, "train.keep_checkpoints", t.keep_checkpoints)
    _positive(problems, "train.max_new_tokens", t.max_new_tokens)
    _positive(problems, "launch.num_processes", lch.num_processes)
    if t.max_steps > 0 and t.warmup_steps > t.max_steps:
        problems.append(f"train.warmup_steps={t.warmup_steps}: longer than "
                        f"train.max_steps={t.max_steps}")
    if recipe.name and not all(c.isalnum() or c in "-_." for c in recipe.name):
        problems.append(f"name={recipe.name!r}: use letters, digits, '-', '_' or '.'")
    problems += hub_problems(recipe.hub)
    return problems


def hub_problems(h: Hub) -> list[str]:
    problems = []
    if h.repo_id and (h.repo_id.count("/") != 1 or not all(
            part and all(c.isalnum() or c in "-_." for c in part)
            for part in h.repo_id.split("/"))):
        problems.append(f"hub.repo_id={h.repo_id!r}: expected owner/name (letters, digits, "
                        "'-', '_', '.')")
    if h.push_at_end and not h.repo_id:
        problems.append("hub.push_at_end=True: hub.repo_id is empty; set hub.repo_id=owner/name")
    if h.revision and (h.revision != h.revision.strip() or " " in h.revision):
        problems.append(f"hub.revision={h.revision!r}: a branch name has no spaces")
    return problems


def validate(recipe: Recipe) -> Recipe:
    problems = problems_of(recipe)
    if problems:
        raise ConfigError(problems)
    return recipe


def describe_fields() -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every setting: the source of `--help` and the docs."""
    rows = []
    for section, cls in SECTIONS.items():
        types_ = _field_types(cls)
        for f in dataclasses.fields(cls):
            default = "" if f.default is dataclasses.MISSING else repr(f.default)
            doc = f.metadata.get("doc", "")
            if f.metadata.get("choices"):
                doc += " [" + "|".join(str(c) for c in f.metadata["choices"]) + "]"
            rows.append((f"{section}.{f.name}", _type_name(types_[f.name]), default, doc))
    return rows
