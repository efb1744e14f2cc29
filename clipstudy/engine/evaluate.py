"""Evaluation of a dual encoder: MSCOCO-style retrieval and zero-shot classification.

This module runs the model: it extracts L2-normalised image and text
embeddings (:func:`extract_image_features`, :func:`extract_text_features`),
builds zero-shot classifiers from prompt templates and scores them with the
pure tensor metrics of :mod:`clipstudy.core.metrics` (ranks, recalls, top-k,
chance levels; re-exported here), where the scores and their tie rule are
defined (docs/protocol.md).

The public model interface is ``encode_image(images) -> [B, D]`` and
``encode_text(input_ids, attention_mask) -> [B, D]`` (unnormalised
embeddings); tokenizers are Hugging Face tokenizers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from clipstudy.core.metrics import (  # noqa: F401
    RECALL_KS,
    ZEROSHOT_KS,
    chance_levels,
    retrieval_metrics,
    retrieval_ranks,
    zeroshot_metrics,
)

# --------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own previous mode."""
    modules = list(model.modules()) if hasattr(model, "modules") else []
    previous = [m.training for m in modules]
    if hasattr(model, "eval"):
        model.eval()  # through .eval() so that modules overriding train() are honoured
    try:
        yield
    finally:
        for m, mode in zip(modules, previous):
            m.training = mode


def _autocast(device: torch.device, amp):
    """``amp``: the autocast dtype chosen by :func:`clipstudy.core.precision.choose_amp` (None: full precision);
    True means bf16. Only on CUDA: on a CPU autocast is slow and would change the numbers."""
    from clipstudy.core.precision import autocast

    dtype = torch.bfloat16 if amp is True else (amp or None)
    return autocast(device, dtype if device.type == "cuda" else None)


def extract_image_features(
    model,
    dataset,
    *,
    batch_size: int = 256,
    device="cpu",
    num_workers: int = 0,
    amp: bool | torch.dtype | None = False,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """L2-normalised image embeddings of every readable item of `dataset`.

    Args:
        model: has ``encode_image(images [B,3,H,W]) -> [B,D]``; must already be
            on `device`. It runs in eval mode; every submodule's previous
            training mode is restored afterwards.
        dataset: ``dataset[i] -> (image, id_or_label)`` or None when unreadable.
        batch_size: images per forward (default 256).
        device: where the forward runs (default "cpu").
        num_workers: DataLoader worker processes (default 0: in-process).
        amp: autocast dtype on CUDA (default False: none; True: bf16; ignored on CPU).
        progress: show a tqdm bar (default True).

    Returns:
        ``(features, ids)``: float32 ``[N, D]`` on CPU, rows of unit norm, and
        int64 ``[N]`` ids (or labels) of the N items actually read, in order.
        Unreadable items are skipped.
    """
    from tqdm.auto import tqdm

    from clipstudy.data.datasets import collate_skip_none

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skip_none,
        pin_memory=device.type == "cuda",
    )
    features, ids = [], []
    with _eval_mode(model), torch.inference_mode():
        for batch in tqdm(loader, desc="image features", disable=not progress, leave=False):
            images, batch_ids = batch
            if batch_ids.numel() == 0:  # every image of the batch was unreadable
                continue
            with _autocast(device, amp):
                embedded = model.encode_image(images.to(device, non_blocking=True))
            features.append(F.normalize(embedded.float(), dim=-1).cpu())
            ids.append(batch_ids)
    if not features:
        raise ValueError(f"no readable image in the dataset ({len(dataset)} items, all returned None)")
    return torch.cat(features), torch.cat(ids)


def extract_text_features(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    max_length: int = 30,
    device="cpu",
    amp: bool | torch.dtype | None = False,
) -> Tensor:
    """L2-normalised text embeddings, float32 ``[len(texts), D]`` on CPU.

    Args:
        model: has ``encode_text(input_ids, attention_mask) -> [B, D]``; run in
            eval mode, previous modes restored afterwards.
        tokenizer: Hugging Face tokenizer (called with padding="max_length",
            truncation=True, max_length, return_tensors="pt").
        texts: the strings to embed.
        batch_size: texts per forward (default 256).
        max_length: token length after padding/truncation (default 30, the study's).
        device: where the forward runs (default "cpu").
        amp: autocast dtype on CUDA (default False: none; True: bf16; ignored on CPU).
    """
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty; nothing to embed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    features = []
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(
                texts[start : start + batch_size],
                padding="max_length",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            with _autocast(device, amp):
                embedded = model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
            features.append(F.normalize(embedded.float(), dim=-1).cpu())
    return torch.cat(features)


# --------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------


def evaluate_retrieval(
    model,
    tokenizer,
    dataset,
    *,
    batch_size: int = 256,
    text_batch_size: int = 1024,
    max_length: int = 30,
    device="cpu",
    num_workers: int = 0,
    amp: bool | torch.dtype | None = False,
    progress: bool = True,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Image <-> text retrieval scores of `model` on a retrieval set.

    Unreadable images are dropped together with their captions, and the
    remaining captions' image indices are remapped to the images kept.

    Args:
        dataset: has ``.texts``, ``.txt2img``, ``len()`` and ``dataset[i] ->
            (image, i)`` or None.
        batch_size: images per forward (default 256).
        text_batch_size: captions per forward (default 1024).
        max_length, device, num_workers, amp, progress: as in
            :func:`extract_image_features` / :func:`extract_text_features`.
        chunk_size: see :func:`retrieval_metrics`.

    Returns:
        :func:`retrieval_metrics` plus ``n_images`` and ``n_texts`` (those
        scored) and ``n_skipped_images``.
    """
    texts = list(dataset.texts)
    txt2img = torch.as_tensor(list(dataset.txt2img), dtype=torch.long)
    n_total = len(dataset)
    if txt2img.numel() != len(texts):
        raise ValueError(
            f"dataset.txt2img has {txt2img.numel()} entries but dataset.texts has {len(texts)}; "
            "they must be parallel lists"
        )
    if txt2img.numel() and (int(txt2img.min()) < 0 or int(txt2img.max()) >= n_total):
        raise ValueError(
            f"dataset.txt2img values must lie in [0, {n_total}) (len(dataset)), got range "
            f"[{int(txt2img.min())}, {int(txt2img.max())}]"
        )
    image_features, image_ids = extract_image_features(
        model, dataset, batch_size=batch_size, device=device, num_workers=num_workers, amp=amp, progress=progress
    )
    if image_ids.unique().numel() != image_ids.numel() or int(image_ids.min()) < 0 or int(image_ids.max()) >= n_total:
        raise ValueError(
            "dataset[i] must return (image, i) with distinct ids in [0, len(dataset)); "
            f"got ids in [{int(image_ids.min())}, {int(image_ids.max())}] for {n_total} items"
        )
    # Position of each original image among those read (-1: unreadable).
    new_index = torch.full((n_total,), -1, dtype=torch.long)
    new_index[image_ids] = torch.arange(image_ids.numel())
    remapped = new_index[txt2img]
    kept_texts = (remapped >= 0).nonzero().flatten()
    if kept_texts.numel() == 0:
        raise ValueError("no caption belongs to a readable image; cannot score retrieval")
    text_features = extract_text_features(
        model,
        tokenizer,
        [texts[i] for i in kept_texts.tolist()],
        batch_size=text_batch_size,
        max_length=max_length,
        device=device,
        amp=amp,
    )
    device = torch.device(device)
    similarity = image_features.to(device) @ text_features.to(device).T
    metrics = retrieval_metrics(similarity, remapped[kept_texts].to(device), chunk_size=chunk_size)
    metrics.update(
        n_images=int(image_ids.numel()),
        n_texts=int(kept_texts.numel()),
        n_skipped_images=int(n_total - image_ids.numel()),
    )
    return metrics


# --------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------


def zeroshot_classifier(
    model,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    max_length: int = 30,
    batch_size: int = 1024,
    device="cpu",
    amp: bool | torch.dtype | None = False,
) -> Tensor:
    """Zero-shot classifier weights, float32 ``[D, n_classes]`` on CPU.

    Class c's weight is ``normalise(mean_t normalise(embed(template_t.format(c))))``
    (docs/protocol.md). All class x template prompts are encoded together in batches of
    `batch_size` (default 1024), not one forward per class.

    Args:
        classnames: class names, in label order.
        templates: prompt templates, each containing one ``"{}"``.
        max_length, device, amp: as in :func:`extract_text_features`.
    """
    classnames, templates = list(classnames), list(templates)
    if not classnames:
        raise ValueError("classnames is empty")
    if not templates:
        raise ValueError("templates is empty; use e.g. ['a photo of a {}.']")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template must contain exactly one '{{}}' for the class name; got {bad[:3]}")
    prompts = [template.format(name) for name in classnames for template in templates]  # class-major
    embedded = extract_text_features(
        model, tokenizer, prompts, batch_size=batch_size, max_length=max_length, device=device, amp=amp
    )
    per_class = embedded.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T.contiguous()


def evaluate_zeroshot(
    model,
    tokenizer,
    dataset,
    *,
    batch_size: int = 256,
    text_batch_size: int = 1024,
    max_length: int = 30,
    device="cpu",
    num_workers: int = 0,
    amp: bool | torch.dtype | None = False,
    progress: bool = True,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 of `model` on a labelled image set.

    Args:
        dataset: has ``.classnames``, ``.templates``, ``len()`` and
            ``dataset[i] -> (image, label)`` or None (skipped).
        other arguments: as in :func:`evaluate_retrieval`.

    Returns:
        ``top1``, ``top5`` (percent), ``n_images`` (scored) and ``n_skipped_images``.
    """
    classifier = zeroshot_classifier(
        model,
        tokenizer,
        dataset.classnames,
        dataset.templates,
        max_length=max_length,
        batch_size=text_batch_size,
        device=device,
        amp=amp,
    )
    features, labels = extract_image_features(
        model, dataset, batch_size=batch_size, device=device, num_workers=num_workers, amp=amp, progress=progress
    )
    device = torch.device(device)
    metrics = zeroshot_metrics(features.to(device), labels.to(device), classifier.to(device), chunk_size=chunk_size)
    metrics.update(n_images=int(labels.numel()), n_skipped_images=int(len(dataset) - labels.numel()))
    return metrics


def evaluate_all(model, tokenizer, retrieval_set=None, zeroshot_set=None, **kw) -> dict[str, float]:
    """Every score of the study in one flat dict.

    Keyword arguments go to :func:`evaluate_retrieval` and
    :func:`evaluate_zeroshot` (batch_size, text_batch_size, max_length, device,
    num_workers, amp, progress, chunk_size).

    Returns:
        With a retrieval set: the :func:`retrieval_metrics` keys (``txt_r1`` ...
        ``r_mean``) and ``retrieval_n_images``, ``retrieval_n_texts``,
        ``retrieval_n_skipped_images``. With a zero-shot set: ``zeroshot_top1``,
        ``zeroshot_top5``, ``zeroshot_n_images``, ``zeroshot_n_skipped_images``.
        With both: ``average`` = mean of txt_r1, img_r1 and zeroshot_top1 (the
        study's "Average").
    """
    if retrieval_set is None and zeroshot_set is None:
        raise ValueError("evaluate_all needs retrieval_set, zeroshot_set or both")
    out: dict[str, float] = {}
    if retrieval_set is not None:
        scores = evaluate_retrieval(model, tokenizer, retrieval_set, **kw)
        for key in ("n_images", "n_texts", "n_skipped_images"):
            out[f"retrieval_{key}"] = scores.pop(key)
        out.update(scores)
    if zeroshot_set is not None:
        scores = evaluate_zeroshot(model, tokenizer, zeroshot_set, **kw)
        out.update({f"zeroshot_{key}": value for key, value in scores.items()})
    if retrieval_set is not None and zeroshot_set is not None:
        out["average"] = (out["txt_r1"] + out["img_r1"] + out["zeroshot_top1"]) / 3.0
    return out
