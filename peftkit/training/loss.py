"""Next-token loss that spends no compute on positions without a label.

Prompt tokens (and padding) need hidden states, but not logits: the LM head, the largest
single matmul of a small model and a vocab-sized fp32 tensor per position, runs only where a
label exists. The module wraps the PeftModel so that `accelerate.prepare` (DDP) sees one
forward that produces the loss, and gradient sync hooks fire as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.data.batching import IGNORE
from peftkit.model.head_loss import head_loss
from peftkit.model.offload import OffloadActivations

# Architectures whose logits are exactly lm_head(final hidden state), optionally soft-capped.
# Others (e.g. with logit scaling) take the full forward; tests pin the equality for each.
HEAD_ONLY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3")


class TokenLoss(nn.Module):
    """forward(batch) -> (summed cross-entropy over labelled positions, number of them).

    `offload`: keep what the forward saves for backward in CPU memory (train.offload_activations,
    model/offload.py); `offloaded_bytes` then says how much the last forward moved."""

    def __init__(self, model: nn.Module, offload: bool = False):
        super().__init__()
        self.model = model  # the PeftModel
        self.offload = offload
        self.offloaded_bytes = 0
        # FSDP's transformer-based auto-wrap looks for the decoder layer classes here.
        self._no_split_modules = getattr(model.get_base_model(), "_no_split_modules", None)

    def tie_weights(self):
        """Tie the base's embeddings again (a tied model's): accelerate calls this where FSDP2
        moves the model to the meta device and back (main-process loading), which unties them.
        """
        self.model.get_base_model().tie_weights()

    def forward(self, input_ids, attention_mask, labels, **packed):
        """`packed`: position_ids and cu_seq_lens_* of a packed row (peftkit/packing.py)."""
        # Only a forward that builds a graph saves anything (evaluation runs under no_grad).
        if not (self.offload and torch.is_grad_enabled()):
            return self._loss(input_ids, attention_mask, labels, **packed)
        hooks = OffloadActivations(self, input_ids.device.type)
        with hooks:
            out = self._loss(input_ids, attention_mask, labels, **packed)
        self.offloaded_bytes = hooks.offloaded_bytes
        return out

    def _loss(self, input_ids, attention_mask, labels, **packed):
        targets = labels[:, 1:]
        keep = targets != IGNORE
        base = self.model.get_base_model()
        # Prompt tuning prepends its virtual tokens inside the PeftModel forward: calling the
        # decoder directly would skip them, so it takes the full forward (below).
        prompt_learning = self.model.active_peft_config.is_prompt_learning
        if prompt_learning and packed:
            raise ValueError("prompt tuning needs padded batches (virtual tokens are "
                             "prepended once per row, not per packed sample)")
        if base.config.model_type in HEAD_ONLY_ARCHS and not prompt_learning:
            hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                        use_cache=False, **packed).last_hidden_state
            # Chunked: the full [labelled positions x vocab] logits never exist at once.
            loss = head_loss(base.get_output_embeddings(), hidden[:, :-1][keep], targets[keep],
                             softcap=getattr(base.config, "final_logit_softcapping", None))
            return loss, keep.sum()
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            use_cache=False, **packed).logits
        # Virtual tokens (if any) come first and carry no label: drop their positions.
        logits = logits[:, logits.shape[1] - input_ids.shape[1]:][:, :-1][keep]
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss, keep.sum()
