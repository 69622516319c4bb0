"""Whether the sides of `peftkit bench` did the same work: what every side records the same way
(a digest of each sample's tokens; the loss and adapter gradients on an identical batch), and
`equal_work`, which compares them and refuses only different computation."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
from array import array

import torch

from peftkit.errors import RunError


def fingerprint(input_ids: list[int]) -> str:
    """A short, process-independent digest of a sample's tokens."""
    return hashlib.blake2b(array("q", input_ids).tobytes(), digest_size=8).hexdigest()


def sequences(sample) -> list:
    """The sequences a sample runs as: itself, or a preference pair's chosen and rejected."""
    return [sample.chosen, sample.rejected] if hasattr(sample, "chosen") else [sample]


def identical_batch(model, loss) -> dict:
    """What a side computes on the identical batch, for `bench.equal_work` to compare across
    sides: `loss()` is the side's own loss code on it (a scalar tensor).

    Training order does not enter: the sides' trained adapters differ by the order they saw
    the samples in, so this runs after training (and after memory was measured) on states
    both sides reproduce exactly. `adapter_loss` and `adapter_grad_norms` (per adapter
    tensor): every adapter tensor set to seeded values from its name (overwriting the trained
    adapter), in training mode (so gradient checkpointing applies as in a step) with dropout
    off (so it is deterministic). `reference_loss`: the adapter off, i.e. the base model.
    """
    params = {name.replace("._orig_mod", ""): p for name, p in model.named_parameters()
              if p.requires_grad}  # compiled layers add `_orig_mod` to the names
    with torch.no_grad():
        for name, p in params.items():
            seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=7).digest(), "big")
            values = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
            # Small, so the adapter's update stays a perturbation of the base, as in training.
            p.copy_(values * 0.1 / max(p.shape[-1], 1) ** 0.5)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    model.zero_grad(set_to_none=True)
    adapter = loss()
    adapter.backward()
    norms = {name: p.grad.float().norm().item() if p.grad is not None else 0.0
             for name, p in sorted(params.items())}
    model.zero_grad(set_to_none=True)
    # Last: the Trainer side's bitsandbytes repacks 4-bit weights on CPU for inference the
    # first time a layer runs in eval mode without gradients, and backward through them then
    # loses gradient (quantize.keep_cpu_layout_trainable; peftkit's side has it off).
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        reference = loss().item()
    return {"reference_loss": reference, "adapter_loss": adapter.item(),
            "adapter_grad_norms": norms}


# ---------------------------------------------------------------------------------------------
# Comparing the sides (bench.harness calls equal_work after every side ran).

# The objective and its adapter gradients on an identical batch (bench_run.identical_batch):
# both sides compute the same masked next-token mean from the same weights; only float
# summation order (padded vs packed rows, fused vs peft LoRA) differs.
REFERENCE_RTOL = {"fp32": 1e-4, "mixed": 2e-2}
GRADIENT_RTOL = {"fp32": 1e-3, "mixed": 5e-2}


class UnequalWork(RunError):
    """The two sides did not do the same work: the comparison is refused (exit 1)."""


@dataclasses.dataclass
class EqualWork:
    """The verdict of `equal_work`. `problems`: each a difference in what the sides compute
    (any refuses the comparison). `info`: per baseline, what the training order changes,
    reported and never refused: its mean and final training loss, and their difference from
    peftkit's relative to peftkit's."""

    problems: list[str]
    info: dict[str, dict[str, float]]
    mixed: bool  # mixed precision: the looser tolerances apply

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def rtol(self) -> float:
        """The tolerance on identical-batch losses (relative)."""
        return REFERENCE_RTOL["mixed" if self.mixed else "fp32"]

    @property
    def gradient_rtol(self) -> float:
        """The tolerance on identical-batch adapter gradients (relative, as one vector)."""
        return GRADIENT_RTOL["mixed" if self.mixed else "fp32"]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "info": self.info,
                "rtol": self.rtol, "gradient_rtol": self.gradient_rtol,
                "reference_rtol": REFERENCE_RTOL}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def equal_work(work: dict, sides: dict[str, dict], steps: int, mixed: bool) -> EqualWork:
    """Whether every side computed the same thing as peftkit (see EqualWork)."""
    verdict = EqualWork([], {}, mixed)
    problems, info = verdict.problems, verdict.info
    ref = sides["peftkit"]
    for name, side in sides.items():
        mine = len(problems)
        if len(side["step_tokens"]) != steps or len(side["step_loss"]) != steps:
            problems.append(f"{name}: {len(side['step_tokens'])} steps logged, expected {steps}")
        if sum(side["step_tokens"]) != work["tokens"]:
            problems.append(f"{name}: trained {sum(side['step_tokens'])} tokens, the samples "
                            f"hold {work['tokens']}")
        if side["samples"] != work["fingerprints"]:
            problems.append(f"{name}: did not train each of the {work['samples']} samples "
                            "exactly once")
        if not all(math.isfinite(x) for x in side["step_loss"]):
            problems.append(f"{name}: non-finite training loss")
        if name == "peftkit" or len(problems) > mine:
            continue
        problems += _identical_batch(name, side, ref, verdict.rtol, verdict.gradient_rtol)
        info[name] = _order_effect(side, ref)
    return verdict


def _identical_batch(name: str, side: dict, ref: dict, tol: float, grad_tol: float) -> list[str]:
    """Differences from peftkit on the identical batch (bench_run.identical_batch)."""
    problems = []
    for key, what in (("reference_loss", "adapter off"), ("adapter_loss", "adapter on")):
        if _rel(side[key], ref[key]) > tol:
            problems.append(f"{name}: loss on the identical first batch ({what}) "
                            f"{side[key]:.6f} vs peftkit {ref[key]:.6f}, beyond {tol:g} "
                            "relative")
    if "reference_logps" in ref or "reference_logps" in side:  # DPO: the reference policy
        mine, theirs = ref.get("reference_logps") or [], side.get("reference_logps") or []
        if len(mine) != len(theirs) or any(_rel(a, b) > tol for a, b in zip(theirs, mine)):
            problems.append(f"{name}: reference log-probabilities on the identical first batch "
                            f"differ from peftkit's beyond {tol:g} relative ({theirs[:2]} vs "
                            f"{mine[:2]}, ...)")
    mine, theirs = ref["adapter_grad_norms"], side["adapter_grad_norms"]
    if mine.keys() != theirs.keys():
        problems.append(f"{name}: trains other adapter tensors than peftkit "
                        f"({len(theirs)} vs {len(mine)}; e.g. "
                        f"{sorted(mine.keys() ^ theirs.keys())[0]})")
        return problems
    # The per-tensor gradient norms as one vector: its relative distance to peftkit's.
    names = sorted(mine)
    distance = math.dist([mine[k] for k in names], [theirs[k] for k in names])
    scale = math.hypot(*(mine[k] for k in names))
    if distance > grad_tol * max(scale, 1e-12):
        worst = max(mine, key=lambda k: abs(mine[k] - theirs[k]))
        problems.append(f"{name}: adapter gradients on the identical first batch differ from "
                        f"peftkit's by {distance / max(scale, 1e-12):.2g} relative, beyond "
                        f"{grad_tol:g} (most in {worst}: {theirs[worst]:.6g} vs "
                        f"{mine[worst]:.6g})")
    return problems


def _order_effect(side: dict, ref: dict) -> dict[str, float]:
    """The side's mean and final training loss against peftkit's: the samples are the same,
    the orders differ, and so do the trajectories (information, not a check)."""
    mean, final = statistics.fmean(side["step_loss"]), side["step_loss"][-1]
    ref_mean, ref_final = statistics.fmean(ref["step_loss"]), ref["step_loss"][-1]
    return {"mean_loss": mean, "final_loss": final,
            "mean_loss_vs_peftkit": (mean - ref_mean) / abs(ref_mean),
            "final_loss_vs_peftkit": (final - ref_final) / abs(ref_final)}
