"""The LM head runs only on labelled positions: the loss must equal transformers' own."""

import pytest
import torch

from peftkit.data.batching import IGNORE
from peftkit.recipe import Lora, Model
from peftkit.training.loss import TokenLoss
from peftkit.model.loading import attach_adapter, base_path, load_model
from peftkit.model.tiny import SUPPORTED_ARCHS


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_token_loss_matches_transformers(arch):
    model_cfg = Model(f"tiny/{arch}", arch=arch, tiny=True)
    model = attach_adapter(load_model(base_path(model_cfg), model_cfg, torch.float32),
                           Lora(r=4, dropout=0.0))
    with torch.no_grad():  # B starts at zero; make the adapter change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 4000, (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a right-padded row
    mask[2, 9:] = 0
    labels = ids.clone()
    labels[:, :6] = IGNORE  # prompt tokens
    labels[mask == 0] = IGNORE
    loss_sum, count = TokenLoss(model)(input_ids=ids, attention_mask=mask, labels=labels)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert count.item() == int((labels[:, 1:] != IGNORE).sum())
    assert torch.allclose(loss_sum / count, reference, atol=1e-5), (arch, loss_sum / count,
                                                                      reference)
    (loss_sum / count).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
