"""Pretrained demo towers: the embedded benchmark's analogue of ImageNet and BookCorpus weights.

The original study fine-tuned an ImageNet-pretrained ResNet-50 and a
corpus-pretrained DistilBERT. The demo does the same at its own scale:

* the image tower (:class:`~clipstudy.core.models.SmallResNet`) is pretrained by
  supervised classification of single-shape scenes drawn by the demo
  generator (one softmax head per attribute: colour, shape, size, row,
  column, background tone);
* the text tower (the small DistilBERT on the demo tokenizer) is pretrained
  by masked-language modelling (``DistilBertForMaskedLM``) on captions of the
  demo grammar.

Both sets come from their own random streams (seed sequence
``[seed, NAMESPACE, k]``, which make-demo-data never uses) and show only the
seen colour x shape combinations: the zero-shot classes (``demo_scenes.HELD_OUT``)
never appear in a pretraining image, label or caption. :func:`check_disjoint`
counts the zero-shot scenes (validation and test) that share a combination or
a whole configuration (colour, shape, size, grid cell, background tone) with a
pretraining scene, records the counts with the towers, and refuses to pretrain
if a combination is shared. A caption equal (after the study's cleaning) to any
training or retrieval caption or zero-shot prompt is dropped and counted.

The towers are cached by content in ``DATA/pretrained/<key>/`` where the key
digests the generator version, the pretraining settings, the tower
architecture and the digest of the data set they must be disjoint from; a
file lock makes concurrent runs wait for one producer, and the files are
written atomically. A run with ``pretrained=True`` and the demo towers calls
:func:`load_pretrained_towers`, which builds them on first use (with a
progress bar) and reuses them afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PRETRAIN_VERSION = 2  # 2: the disjointness check at the level of scenes (zero-shot classes held out)
NAMESPACE = 0x70726574  # "pret": separates these random streams from make-demo-data's


@dataclass(frozen=True)
class PretrainSettings:
    """How the demo towers are pretrained (config field ``pretrain`` overrides any of these)."""

    images: int = 6000  # single-shape scenes for the image classifier (10 % held out)
    image_epochs: int = 10
    image_batch_size: int = 64
    image_lr: float = 2e-3
    captions: int = 12000  # captions for masked-language modelling (10 % held out)
    text_epochs: int = 4
    text_batch_size: int = 64
    text_lr: float = 1e-3
    mlm_probability: float = 0.15
    weight_decay: float = 0.01
    seed: int = 0
    # torch threads while pretraining, fixed: how a reduction is split over threads changes the towers' bits
    # (measured: 1 and 2 threads give different towers, and runs on them differ by up to 1.6 Average points);
    # 2 is what the committed demo study's towers were built with
    threads: int = 2


def settings_from(config) -> PretrainSettings:
    from clipstudy.engine.config import ConfigError

    names = {f.name for f in dataclasses.fields(PretrainSettings)}
    unknown = sorted(set(config.pretrain) - names)
    if unknown:
        raise ConfigError(f"config field 'pretrain': unknown key(s) {unknown}; valid keys: {sorted(names)}")
    try:
        return PretrainSettings(**{k: type(getattr(PretrainSettings, k))(v) for k, v in config.pretrain.items()})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config field 'pretrain'={config.pretrain!r}: {err}") from None


# ------------------------------------------------------------------ the data
def zeroshot_scenes(config) -> list[dict] | None:
    """The scenes of the data set's zero-shot images, validation and test (``scenes.json`` of a demo set),
    or None for a data set without scene records."""
    from clipstudy.data.layout import layout

    if not config.data:
        return None
    try:
        scenes = json.loads(layout(config.data)["scenes"].read_text())
    except (OSError, ValueError):
        return None
    return [scene for split in ("zeroshot", "val_zeroshot") for scene in scenes.get(split, [])]


def check_disjoint(evaluation: list[dict] | None, seen: list[dict]) -> dict[str, int] | None:
    """Count the evaluation scenes that share a colour x shape combination (or a whole configuration)
    with a pretraining scene; raise when any does: the towers would have seen a zero-shot class."""
    from clipstudy.data.demo_scenes import overlap_counts
    from clipstudy.engine.config import ConfigError

    if evaluation is None:
        return None
    counts = overlap_counts(evaluation, seen)
    if counts["combination"]:
        raise ConfigError(
            f"pretraining data would show {counts['combination']} zero-shot scene(s)' colour x shape class to the "
            "towers before evaluation; the demo generator's held-out classes (demo_scenes.HELD_OUT) must not reach "
            "pretraining: regenerate the data set with this version (make demo-data)"
        )
    return counts


def study_captions(config) -> set[str]:
    """Every training and retrieval caption and zero-shot prompt of the run's data (validation and test),
    as the study cleans them."""
    from clipstudy.data.datasets import clean_caption

    paths = config.resolved_paths()
    texts = [e["caption"] for e in json.loads(Path(paths["train_ann"]).read_text())]
    for ann in ("retrieval_ann", "val_retrieval_ann"):
        if paths[ann] and Path(paths[ann]).is_file():
            texts += [c for e in json.loads(Path(paths[ann]).read_text()) for c in e["caption"]]
    for folder in ("zeroshot_images", "val_zeroshot_images"):
        classnames = Path(paths[folder]) / "classnames.json" if paths[folder] else None
        if classnames and classnames.is_file():
            spec = json.loads(classnames.read_text())
            texts += [t.format(name) for name in spec["classnames"].values() for t in spec["templates"]]
    return {clean_caption(t, config.max_words) for t in texts}


def _stream(settings: PretrainSettings, k: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([settings.seed, NAMESPACE, k]))


HEADS = ("colour", "shape", "size", "row", "col", "tone")


def head_sizes() -> list[int]:
    from clipstudy.data.demo_scenes import COLOURS, SHAPES, SIZES, TONES

    return [len(COLOURS), len(SHAPES), len(SIZES), 3, 3, len(TONES)]


def scene_labels(scene: dict) -> list[int]:
    from clipstudy.data.demo_scenes import COLOURS, SHAPES, SIZES, TONES

    shape = scene["shapes"][0]
    return [
        list(COLOURS).index(shape["colour"]),
        list(SHAPES).index(shape["shape"]),
        list(SIZES).index(shape["size"]),
        shape["row"],
        shape["col"],
        list(TONES).index(scene["background"]["tone"]),
    ]


def pretraining_images(settings: PretrainSettings, image_size: int):
    """(images uint8 N x H x W x 3, labels N x 6, scenes): labelled single-shape scenes of the seen colour x
    shape combinations only (``random_scene`` never draws a held-out one; :func:`check_disjoint` counts)."""
    from clipstudy.data.demo_scenes import random_scene, render_scene

    rng = _stream(settings, 0)
    scenes = [random_scene(rng, 1) for _ in range(settings.images)]
    images = [np.asarray(render_scene(scene, image_size)) for scene in scenes]
    labels = [scene_labels(scene) for scene in scenes]
    return np.stack(images), np.array(labels, dtype=np.int64), scenes


def pretraining_captions(settings: PretrainSettings, exclude: set[str], max_words: int = 30):
    """(captions, dropped, scenes): captions of the demo grammar (seen combinations only), cleaned as the
    study does, none in ``exclude``; ``scenes`` are the scenes they describe."""
    from clipstudy.data.datasets import clean_caption
    from clipstudy.data.demo_scenes import PAIR_P, captions_for, random_scene

    rng = _stream(settings, 1)
    captions, dropped, scenes = [], 0, []
    while len(captions) < settings.captions:
        if dropped > 10 * settings.captions:
            raise RuntimeError("pretraining captions: too many coincide with the study's captions")
        scene = random_scene(rng, 2 if rng.random() < PAIR_P else 1)
        caption = clean_caption(captions_for(rng, scene, 1)[0], max_words)
        if caption in exclude:
            dropped += 1
            continue
        captions.append(caption)
        scenes.append(scene)
    return captions, dropped, scenes


# ------------------------------------------------------------------ training
def _batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def _fit(
    batch_loss, modules, n: int, batch_size: int, epochs: int, lr: float, settings: PretrainSettings, bar, stage: str
) -> None:
    """AdamW with warm-up (first 5 %) then cosine decay over ``epochs`` passes of shuffled batches."""
    generator = torch.Generator().manual_seed(settings.seed)
    params = [p for module in modules for p in module.parameters()]
    total = epochs * (n // batch_size)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    for _ in range(epochs):
        for module in modules:
            module.train()
        for rows in _batches(n, batch_size, generator):
            loss = batch_loss(rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(stage=stage, loss=f"{loss.item():.3f}", refresh=False)


def train_image_tower(config, settings: PretrainSettings, images: np.ndarray, labels: np.ndarray, bar) -> tuple:
    """Supervised multi-head classification; returns (tower state dict, held-out accuracy per head)."""
    from clipstudy.core.models import SmallResNet
    from clipstudy.data.datasets import CLIP_MEAN, CLIP_STD

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    y = torch.from_numpy(labels)
    n_val = len(x) // 10
    x_train, y_train, x_val, y_val = x[n_val:], y[n_val:], x[:n_val], y[:n_val]
    tower = SmallResNet(
        tuple(config.small_resnet_widths), tuple(config.small_resnet_blocks), norm=config.small_resnet_norm
    )
    sizes = head_sizes()
    head = nn.Linear(tower.out_dim, sum(sizes))

    def batch_loss(rows):
        logits = head(tower(x_train[rows])).split(sizes, dim=1)
        return sum(F.cross_entropy(z, y_train[rows, k]) for k, z in enumerate(logits))

    _fit(
        batch_loss,
        [tower, head],
        len(x_train),
        settings.image_batch_size,
        settings.image_epochs,
        settings.image_lr,
        settings,
        bar,
        "image",
    )
    tower.eval()
    with torch.no_grad():
        logits = head(tower(x_val)).split(sizes, dim=1)
    accuracy = {
        name: float((z.argmax(1) == y_val[:, k]).float().mean()) for k, (name, z) in enumerate(zip(HEADS, logits))
    }
    return tower.state_dict(), accuracy


def train_text_tower(config, settings: PretrainSettings, captions: list[str], tokenizer, bar) -> tuple:
    """Masked-language modelling; returns (DistilBERT state dict, held-out masked-token accuracy)."""
    from transformers import DataCollatorForLanguageModeling, DistilBertForMaskedLM

    from clipstudy.core.models import small_distilbert

    body = small_distilbert(
        len(tokenizer),
        dim=config.text_dim,
        n_layers=config.text_layers,
        max_position_embeddings=max(64, config.max_length),
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    model = DistilBertForMaskedLM(body.config)
    encoded = tokenizer(captions, truncation=True, max_length=config.max_length)["input_ids"]
    n_val = len(encoded) // 10
    train_ids, val_ids = encoded[n_val:], encoded[:n_val]
    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=settings.mlm_probability, seed=settings.seed)

    def forward(ids):
        batch = collate([{"input_ids": i} for i in ids])
        mask = (batch["input_ids"] != tokenizer.pad_token_id).long()
        return model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"]), batch["labels"]

    _fit(
        lambda rows: forward([train_ids[i] for i in rows])[0].loss,
        [model],
        len(train_ids),
        settings.text_batch_size,
        settings.text_epochs,
        settings.text_lr,
        settings,
        bar,
        "text",
    )
    model.eval()
    with torch.no_grad():
        out, labels = forward(val_ids)
    masked = labels != -100
    accuracy = float((out.logits.argmax(-1)[masked] == labels[masked]).float().mean())
    return model.distilbert.state_dict(), accuracy


# ------------------------------------------------------------------ the cache
def cache_key(config, settings: PretrainSettings, data_digest: str) -> str:
    from clipstudy.data.demo import GENERATOR_VERSION

    payload = {
        "pretrain_version": PRETRAIN_VERSION,
        "generator_version": GENERATOR_VERSION,
        "settings": dataclasses.asdict(settings),
        "data_digest": data_digest,
        "image": [
            config.image_size,
            list(config.small_resnet_widths),
            list(config.small_resnet_blocks),
            config.small_resnet_norm,
        ],
        "text": [config.text_dim, config.text_layers, config.max_length, config.max_words],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _data_digest(config) -> str:
    from clipstudy.engine.config import ConfigError
    from clipstudy.engine.fingerprint import demo_manifest

    manifest = demo_manifest(config.data) if config.data else None
    if manifest is None or not manifest.get("digest"):
        raise ConfigError(
            f"config field 'pretrained'=True with the demo towers needs a data folder made by "
            f"`python -m clipstudy make-demo-data` (no readable manifest.json in "
            f"{config.data or 'data'!r}); set `data` to such a folder, or pretrained=false to start "
            "from random weights"
        )
    return manifest["digest"]


def _valid(folder: Path) -> tuple[dict, bytes] | None:
    """The metadata and towers.pt bytes of a complete cache entry in ``folder`` (the bytes match the
    metadata's digest), else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        data = (folder / "towers.pt").read_bytes()
    except (OSError, ValueError):
        return None
    return (meta, data) if hashlib.sha256(data).hexdigest() == meta.get("sha256") else None


def ensure_pretrained(config, progress: bool = True) -> tuple[Path, dict]:
    """The cached towers for ``config`` (built now if missing); returns (towers.pt path, metadata)."""
    path, meta, _ = _cached_towers(config, progress)
    return path, meta


def _cached_towers(config, progress: bool) -> tuple[Path, dict, bytes]:
    """(towers.pt path, metadata, its verified bytes): one read serves the digest check and the load."""
    from clipstudy.fileio import atomic_write_bytes, cell_lock, write_json

    settings = settings_from(config)
    key = cache_key(config, settings, _data_digest(config))
    folder = Path(config.data) / "pretrained" / key
    entry = _valid(folder)
    if entry is not None:
        return (folder / "towers.pt", *entry)
    folder.mkdir(parents=True, exist_ok=True)
    with cell_lock(folder, wait=True):  # concurrent runs wait here for the one that builds
        entry = _valid(folder)
        if entry is None:
            try:
                state, meta = build_towers(config, settings, progress)
            except KeyboardInterrupt:  # no checkpoint inside pretraining: say what an interruption costs
                raise KeyboardInterrupt(
                    "interrupted while pretraining the demo towers, which keeps no checkpoint: the next run "
                    f"pretrains them again from step 0 (once done, they are cached in {folder})"
                ) from None
            buffer = io.BytesIO()
            torch.save(state, buffer)
            meta["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
            meta["key"] = key
            atomic_write_bytes(folder / "towers.pt", buffer.getvalue())
            write_json(folder / "meta.json", meta)  # last: with a matching digest it marks the entry complete
            entry = (meta, buffer.getvalue())
    return (folder / "towers.pt", *entry)


def build_towers(config, settings: PretrainSettings, progress: bool = True) -> tuple[dict, dict]:
    """Generate the disjoint pretraining sets and train both towers; returns (state, metadata).

    Seeded by ``settings.seed`` alone and run on ``settings.threads`` torch threads whatever the caller uses
    (a run on one thread of a sweep, a notebook on all cores: the same towers); the caller's random state and
    thread count are restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            return _build_towers(config, settings, progress)
    finally:
        torch.set_num_threads(threads)


def _build_towers(config, settings: PretrainSettings, progress: bool) -> tuple[dict, dict]:
    import time

    from tqdm.auto import tqdm

    from clipstudy.core.models import local_tokenizer

    started = time.perf_counter()
    images, labels, image_scenes = pretraining_images(settings, config.image_size)
    captions, dropped_captions, caption_scenes = pretraining_captions(
        settings, study_captions(config), config.max_words
    )
    overlap = check_disjoint(zeroshot_scenes(config), image_scenes + caption_scenes)
    tokenizer = local_tokenizer(config.resolved_paths()["tokenizer"])
    n_image_train, n_text_train = len(images) - len(images) // 10, len(captions) - len(captions) // 10
    total = settings.image_epochs * (n_image_train // settings.image_batch_size) + settings.text_epochs * (
        n_text_train // settings.text_batch_size
    )
    with tqdm(
        total=total,
        desc="pretraining demo towers",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,
    ) as bar:
        image_state, image_accuracy = train_image_tower(config, settings, images, labels, bar)
        text_state, text_accuracy = train_text_tower(config, settings, captions, tokenizer, bar)
    meta = {
        "settings": dataclasses.asdict(settings),
        "images": len(images),
        "captions": len(captions),
        "zeroshot_overlap": overlap,  # zero-shot scenes sharing a class / a configuration with pretraining
        "dropped_captions": dropped_captions,
        "image_val_accuracy": image_accuracy,
        "text_val_masked_accuracy": text_accuracy,
        "seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return {"image_tower": image_state, "text_tower": text_state}, meta


def uses_pretrained_towers(config) -> tuple[bool, bool]:
    """(image, text): which of the run's towers take the demo pretrained weights."""
    return (
        config.pretrained and config.image_encoder == "small_resnet",
        config.pretrained and config.text_encoder == "small_distilbert",
    )


def load_pretrained_towers(model, config, progress: bool = True) -> dict | None:
    """Load the demo pretrained weights into ``model``'s small towers (building them if needed).

    A no-op (None) unless ``config.pretrained`` and a demo tower is used; the
    projections keep their random initialisation, as in the paper.
    """
    image, text = uses_pretrained_towers(config)
    if not (image or text):
        return None
    _, meta, data = _cached_towers(config, progress)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if image:
        model.image_tower.load_state_dict(state["image_tower"])
    if text:
        model.text_tower.transformer.load_state_dict(state["text_tower"])
    return meta
