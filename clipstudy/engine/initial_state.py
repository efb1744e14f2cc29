"""Diagnostics of a run's model at initialisation, before any training step.

Used to measure how collapsed the towers' embeddings start out (the initialisation
table of docs/results.md, "Collapse at initialisation and text pooling"): the model is
built exactly as a run builds it.
"""

from __future__ import annotations

import torch

from clipstudy.core import diagnostics
from clipstudy.data.datasets import eval_transform, make_collate
from clipstudy.engine.build import build_model_for, build_train_set
from clipstudy.engine.pretrain import load_pretrained_towers
from clipstudy.engine.runstate import seed_everything


@torch.no_grad()
def init_diagnostics(config, n: int = 64, progress: bool = False) -> dict[str, float]:
    """The diagnostics of a run's initial model on its first ``n`` training pairs (no training).

    Builds the model exactly as a run would (seed, towers, pretrained weights)
    and embeds the pairs with the evaluation transform.
    """
    train_set = build_train_set(config)
    seed_everything(config.seed)
    model, tokenizer = build_model_for(config)
    load_pretrained_towers(model, config, progress=progress)
    model.eval()
    base = train_set.dataset if isinstance(train_set, torch.utils.data.Subset) else train_set
    base.transform = eval_transform(config.image_size)
    items = [base[i] for i in range(min(n, len(base)))]
    batch = make_collate(tokenizer, max_length=config.max_length)(items)
    image_emb, text_emb = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    return {**diagnostics.embedding_diagnostics(image_emb, text_emb), "weight_norm": diagnostics.weight_norm(model)}
