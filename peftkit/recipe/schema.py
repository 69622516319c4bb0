"""The recipe schema: typed, frozen sections whose fields carry their own type, default and doc.

Everything else (CLI overrides in overrides.py, validation messages in validate.py, `peftkit
show`, recipe.json) is derived from these dataclasses, so there is exactly one list of settings
to keep in sync.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from peftkit.adapters.registry import method_names



def _f(default: Any, doc: str, choices: tuple | None = None) -> Any:
    """A dataclass field with a one-line doc (and optional allowed values) in its metadata."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in a frozen recipe")
    return field(default=default, metadata=meta)


DTYPES = ("auto", "float32", "bfloat16", "float16")
OBJECTIVES = ("sft", "dpo", "orpo")


@dataclass(frozen=True)
class Model:
    name: str = _f("", "Hub id or local path of the base model, or a .gguf file (converted "
                       "once to a transformers checkpoint in peftkit's cache)")
    gguf_file: str = _f("", "take the weights of model.name from this GGUF file: a file in the "
                            "Hub repo or local directory model.name, or a path")
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
    upcast_unquantized: bool = _f(False, "quantized base: upcast its unquantized weights "
                                         "(embeddings, norms, LM head) to float32, as peft's "
                                         "prepare_model_for_kbit_training does; false keeps them "
                                         "in model.dtype (half their memory, 16-bit activations)")
    attn_implementation: str = _f("auto", "attention kernel; auto = transformers' default for "
                                          "the architecture (sdpa where supported)",
                                  ("auto", "sdpa", "eager", "flash_attention_2"))
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the base model")
    trust_remote_code: bool = _f(False, "run modelling code shipped with the Hub repo; off "
                                        "unless you trust its author")
    adapter_init: str = _f("", "start from an existing adapter: a run directory (runs/sft-run) "
                               "or an adapter folder; with a preference objective it is also "
                               "the reference policy (SFT, then DPO)")


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
                     method_names())
    num_virtual_tokens: int = _f(20, "prompt_tuning: learned virtual tokens prepended to "
                                     "every input")
    loraplus_lr_ratio: float = _f(0.0, "LoRA+: learning rate of the B matrices = train.lr x "
                                       "this ratio (the paper suggests 16); 0 = off")
    rank_pattern: str = _f("", "per-module ranks overriding r: comma-separated name=rank "
                               "pairs, name a module name or regex (q_proj=8,v_proj=32)")
    alpha_pattern: str = _f("", "per-module alphas overriding alpha, in the form of "
                                "rank_pattern (q_proj=16,v_proj=64)")


DATA_FORMATS = ("auto", "chat", "sharegpt", "alpaca", "prompt_completion", "text")


@dataclass(frozen=True)
class Data:
    train: str = _f("", "training data: a .jsonl/.json/.csv/.parquet file, a Hub dataset id, "
                        "or peftkit:<asset> for data shipped with peftkit; several, mixed: "
                        "'a.jsonl=0.7, owner/name=0.3' (shares of the mix, sum 1) or "
                        "'a.jsonl=2x, b.jsonl' (passes over each; 1x without a weight)")
    eval: str = _f("", "held-out data in the same forms; empty = split eval_size rows off train")
    eval_size: int = _f(200, "rows held out from train for evaluation when `eval` is empty")
    format: str = _f("auto", "record format; auto detects it from the fields of each source's "
                             "first record", DATA_FORMATS)
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
    offload_activations: bool = _f(False, "CUDA, train.objective=sft: keep the activations "
                                          "saved for backward (with gradient checkpointing: "
                                          "each layer's input) in pinned CPU memory, copied "
                                          "back in backward; for long sequences")
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
    forgetting: bool | None = _f(None, "measure the loss on a small general-English sample "
                                       "with the adapter disabled and enabled after training "
                                       "(result.json, model card); none = on for a real "
                                       "base, off for a tiny one")
    forgetting_warn: float = _f(0.05, "warn when that loss rises by more than this fraction "
                                      "(0.05 = 5%)")
    output_dir: str = _f("runs", "parent directory of run directories")
    objective: str = _f("sft", "what training optimises: sft (next-token loss), dpo (direct "
                               "preference optimisation) or orpo (odds-ratio preference) on "
                               "prompt/chosen/rejected pairs (docs/preference.md)", OBJECTIVES)
    beta: float = _f(0.1, "dpo: strength of the pull towards the reference policy (the "
                          "reward scale); ipo: its regulariser tau")
    dpo_loss: str = _f("sigmoid", "dpo loss variant: sigmoid (DPO paper) or ipo (squared, "
                                  "length-normalised log-ratio margin)", ("sigmoid", "ipo"))
    label_smoothing: float = _f(0.0, "dpo sigmoid: assumed share of pairs whose preference is "
                                     "flipped (conservative DPO), in [0, 0.5)")
    orpo_lambda: float = _f(0.1, "orpo: weight of the odds-ratio term next to the chosen "
                                 "responses' next-token loss")
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
    efficient_loading: bool = _f(True, "launch.strategy=fsdp: only the main process reads the "
                                       "base weights, the others build it empty and receive "
                                       "their shards from it (false: every process loads the "
                                       "whole base before it is sharded)")
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
    "train.output_dir", "train.gradient_checkpointing", "train.forgetting",
    "train.forgetting_warn", "data.eval", "model.attn_implementation",
    "train.offload_activations",  # same values back in backward, only where they wait
    "data.packing", "train.compile",  # same samples and loss per step, only faster
    "launch.num_processes", "launch.hardware", "train.report_to",
    "launch.efficient_loading",  # the same weights, only read by fewer processes
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
# Introspection: types, defaults and docs read from the sections.

def field_types(cls: type) -> dict[str, Any]:
    """{field name: declared type} of a recipe section."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_name(tp: Any) -> str:
    """How a field type reads in messages and --help: int, str or none, ..."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def recipe_from_dict(data: dict) -> Recipe:
    """Rebuild a recipe from `Recipe.to_dict()` output (e.g. a run's recipe.json)."""
    sections = {s: cls(**data[s]) for s, cls in SECTIONS.items() if s in data}
    return Recipe(name=data.get("name", ""), **sections)


def describe_fields() -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every setting: the source of `--help` and the docs."""
    rows = []
    for section, cls in SECTIONS.items():
        types_ = field_types(cls)
        for f in dataclasses.fields(cls):
            default = "" if f.default is dataclasses.MISSING else repr(f.default)
            doc = f.metadata.get("doc", "")
            if f.metadata.get("choices"):
                doc += " [" + "|".join(str(c) for c in f.metadata["choices"]) + "]"
            rows.append((f"{section}.{f.name}", type_name(types_[f.name]), default, doc))
    return rows
