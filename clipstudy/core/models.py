"""The dual encoder: an image tower and a text tower, each with a linear projection.

Like open_clip's models it exposes ``encode_image(images)`` and
``encode_text(input_ids, attention_mask)``, both returning the projected,
*unnormalised* embeddings; the loss decides whether to normalise.

Two builds:

* ``paper``: ResNet-50 with ImageNet weights (classifier removed, 2048-d
  pooled features) + Hugging Face ``distilbert-base-uncased`` ([CLS] hidden
  state, 768-d), as in the original study. The ResNet-50 weights are chosen by
  ``image_weights``: ``"timm-a1"`` is timm's ``resnet50.a1_in1k`` (what the
  code base's ``timm.create_model('resnet50', pretrained=True)`` loaded; about
  80% ImageNet top-1, trained with timm's A1 recipe), ``"torchvision"`` is
  torchvision's ``IMAGENET1K_V1`` (76.1%). Both towers map images to the same
  2048-d average-pooled features.
* ``demo``: a small ResNet-family CNN (torchvision's ``BasicBlock``) + a small
  DistilBERT on the demo data set's own vocabulary, built here with random
  weights; a demo run then loads their pretrained weights
  (:mod:`clipstudy.engine.pretrain`) unless ``pretrained=False``.

Pretrained weights are read from the local torch / Hugging Face caches only,
so a training run never stalls on the network. ``python -m clipstudy
fetch-weights`` fills those caches on a machine with internet; the variables
``CLIPSTUDY_RESNET50_WEIGHTS`` (a ``.pth`` or ``.safetensors`` state dict of
the chosen ResNet-50 weights) and ``CLIPSTUDY_DISTILBERT`` (a
``save_pretrained`` folder) point to local copies.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.models.resnet import BasicBlock

from clipstudy.errors import StartupError
from clipstudy.paths import DISTILBERT_ENV, RESNET50_ENV

DISTILBERT_NAME = "distilbert-base-uncased"
TIMM_RESNET50 = "resnet50.a1_in1k"  # timm's default `resnet50` weights in the code base's era
TIMM_RESNET50_REPO = f"timm/{TIMM_RESNET50}"  # where timm keeps them on the Hugging Face hub
IMAGE_WEIGHTS = ("timm-a1", "torchvision")


class WeightsUnavailable(StartupError, RuntimeError):
    """Pretrained weights are not in the local caches (and are never downloaded mid-run)."""


def _fetch_hint(what: str) -> str:
    return (
        f"{what} is not in the local cache and clipstudy does not download during a run.\n"
        "Fix: on a machine with internet run `python -m clipstudy fetch-weights [--profile P]` (it fills\n"
        "~/.cache/torch/hub and ~/.cache/huggingface; copy both folders to this machine, or set\n"
        "TORCH_HOME / HF_HOME to where they are), or point to local copies with\n"
        f"{RESNET50_ENV}=/path/resnet50.pth and {DISTILBERT_ENV}=/path/to/distilbert-folder."
    )


# ---------------------------------------------------------------- image towers
class SmallResNet(nn.Module):
    """A ResNet-family CNN for small images, built from torchvision's BasicBlock.

    Args:
        widths: channels of each stage (default (32, 64, 128)); every stage
            after the first halves the resolution.
        blocks: BasicBlocks per stage (default (1, 1, 1)).
        stem_stride: stride of the 3x3 stem (default 2: 32 px -> 16 px).
        norm: ``"batch"`` (default) or ``"group"``. Under data parallelism on
            CPU, BatchNorm statistics are per process (SyncBatchNorm needs
            CUDA), so only GroupNorm makes N processes x B/N equal 1 x B.
    """

    def __init__(self, widths=(32, 64, 128), blocks=(1, 1, 1), stem_stride: int = 2, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm={norm!r}; choose 'batch' or 'group'")
        make_norm = nn.BatchNorm2d if norm == "batch" else (lambda c: nn.GroupNorm(min(8, c), c))
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=stem_stride, padding=1, bias=False),
            make_norm(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, in_ch = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for b in range(n):
                down = None
                if b == 0 and (stride != 1 or in_ch != width):
                    down = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False), make_norm(width))
                layers.append(
                    BasicBlock(in_ch, width, stride=stride if b == 0 else 1, downsample=down, norm_layer=make_norm)
                )
                in_ch = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


def resnet50_trunk(pretrained: bool = True, weights: str = "torchvision") -> nn.Module:
    """ResNet-50 with the classifier removed: images -> 2048-d average-pooled features.

    ``weights``: ``"torchvision"`` (torchvision's model, IMAGENET1K_V1) or
    ``"timm-a1"`` (timm's model, ``resnet50.a1_in1k``, the classifier removed
    with ``reset_classifier(0)`` as the code base did). ``pretrained=False``
    gives the same architecture with random weights.
    """
    if weights not in IMAGE_WEIGHTS:
        raise ValueError(f"image_weights={weights!r}; choose one of {IMAGE_WEIGHTS}")
    if weights == "timm-a1":
        import timm

        model = timm.create_model("resnet50", pretrained=False)
        if pretrained:
            model.load_state_dict(_resnet50_state_dict(weights))
        model.reset_classifier(0)
    else:
        model = resnet50(weights=None)
        if pretrained:
            model.load_state_dict(_resnet50_state_dict(weights))
        model.fc = nn.Identity()
    model.out_dim = 2048
    return model


def _load_state_dict_file(path: str | os.PathLike) -> dict:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def resnet50_cache_path(weights: str) -> Path | None:
    """Where the cached weights are (None when they are not cached); never downloads."""
    if weights == "timm-a1":
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(TIMM_RESNET50_REPO, "model.safetensors", local_files_only=True))
        except Exception:  # noqa: BLE001  (not cached: the hub raises one of several error types)
            return None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(ResNet50_Weights.IMAGENET1K_V1.url).name
    return cached if cached.is_file() else None


def _resnet50_state_dict(weights: str) -> dict:
    name = f"ResNet-50 {TIMM_RESNET50 if weights == 'timm-a1' else 'torchvision IMAGENET1K_V1'} weights"
    local = os.environ.get(RESNET50_ENV)
    if local:
        if not Path(local).is_file():
            raise WeightsUnavailable(f"{RESNET50_ENV}={local} is not a file. " + _fetch_hint(name))
        return _load_state_dict_file(local)
    cached = resnet50_cache_path(weights)
    if cached is None:
        where = f"Hugging Face cache, {TIMM_RESNET50_REPO}" if weights == "timm-a1" else torch.hub.get_dir()
        raise WeightsUnavailable(f"{name} ({where})\n" + _fetch_hint(name))
    return _load_state_dict_file(cached)


# ----------------------------------------------------------------- text towers
TEXT_POOLINGS = ("first", "mean")


class TextTower(nn.Module):
    """A Hugging Face DistilBERT pooled to one feature per caption.

    ``pooling="first"`` takes the first ([CLS]) token's hidden state, as the
    original code did; ``"mean"`` averages the hidden states of the caption's
    tokens (padding excluded). Without a pretraining objective for [CLS]
    (DistilBERT has none, and a random tower certainly not) the first token
    barely depends on the caption, so mean pooling is the safer choice there.
    """

    def __init__(self, transformer: nn.Module, pooling: str = "first"):
        super().__init__()
        if pooling not in TEXT_POOLINGS:
            raise ValueError(f"text pooling {pooling!r}; choose one of {TEXT_POOLINGS}")
        self.transformer = transformer
        self.pooling = pooling
        self.out_dim = transformer.config.dim

    def forward(self, input_ids, attention_mask):
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "first":
            return hidden[:, 0]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def distilbert_location() -> str:
    return os.environ.get(DISTILBERT_ENV) or DISTILBERT_NAME


def pretrained_distilbert() -> nn.Module:
    from transformers import DistilBertModel

    try:
        return DistilBertModel.from_pretrained(distilbert_location(), local_files_only=True)
    except OSError as err:
        raise WeightsUnavailable(f"DistilBERT ({distilbert_location()})\n" + _fetch_hint("DistilBERT")) from err


def pretrained_tokenizer():
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(distilbert_location(), local_files_only=True)
    except OSError as err:
        raise WeightsUnavailable(
            f"DistilBERT tokenizer ({distilbert_location()})\n" + _fetch_hint("The DistilBERT tokenizer")
        ) from err


def small_distilbert(
    vocab_size: int,
    *,
    dim: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    hidden_dim: int = 256,
    max_position_embeddings: int = 64,
    pad_token_id: int = 0,
):
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        hidden_dim=hidden_dim,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return DistilBertModel(config)


def local_tokenizer(path: str | os.PathLike):
    """The demo data set's own tokenizer (a Hugging Face fast tokenizer folder)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer in {path}: expected a Hugging Face tokenizer folder "
            "(run `python -m clipstudy make-demo-data --out DIR`, which writes DIR/tokenizer)"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ---------------------------------------------------------------- dual encoder
class DualEncoder(nn.Module):
    """Image and text towers, each followed by a linear projection to ``embed_dim``."""

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, embed_dim: int = 256):
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_proj = nn.Linear(image_tower.out_dim, embed_dim)
        self.text_proj = nn.Linear(text_tower.out_dim, embed_dim)
        self.embed_dim = embed_dim

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.image_tower(images))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text_tower(input_ids, attention_mask))

    def forward(self, images, input_ids, attention_mask):
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)


IMAGE_ENCODERS = ("resnet50", "small_resnet")
TEXT_ENCODERS = ("distilbert", "small_distilbert")


def build_model(
    *,
    image_encoder: str = "resnet50",
    text_encoder: str = "distilbert",
    embed_dim: int = 256,
    tokenizer_path: str | None = None,
    pretrained: bool = True,
    image_weights: str = "torchvision",
    small_resnet_widths=(32, 64, 128),
    small_resnet_blocks=(1, 1, 1),
    small_resnet_norm="batch",
    text_dim: int = 128,
    text_layers: int = 2,
    max_length: int = 30,
    text_pooling: str = "first",
):
    """Build ``(model, tokenizer)``.

    ``resnet50`` / ``distilbert`` are the paper towers (pretrained unless
    ``pretrained=False``); ``small_resnet`` / ``small_distilbert`` are the demo
    towers (random init here; :func:`clipstudy.engine.pretrain.load_pretrained_towers`
    loads their pretrained weights). ``image_weights`` picks the ResNet-50 weights
    (``"torchvision"`` or ``"timm-a1"``). ``small_distilbert`` needs ``tokenizer_path`` (the
    demo set's tokenizer); ``distilbert`` uses DistilBERT's own tokenizer.
    """
    if image_encoder == "resnet50":
        image_tower = resnet50_trunk(pretrained, image_weights)
    elif image_encoder == "small_resnet":
        image_tower = SmallResNet(tuple(small_resnet_widths), tuple(small_resnet_blocks), norm=small_resnet_norm)
    else:
        raise ValueError(f"image_encoder={image_encoder!r}; choose one of {IMAGE_ENCODERS}")

    if text_encoder == "distilbert":
        tokenizer = local_tokenizer(tokenizer_path) if tokenizer_path else pretrained_tokenizer()
        if pretrained:
            transformer = pretrained_distilbert()
        else:
            from transformers import DistilBertConfig, DistilBertModel

            transformer = DistilBertModel(DistilBertConfig(vocab_size=len(tokenizer)))
    elif text_encoder == "small_distilbert":
        if not tokenizer_path:
            raise ValueError("text_encoder='small_distilbert' needs tokenizer_path (the demo set's tokenizer folder)")
        tokenizer = local_tokenizer(tokenizer_path)
        transformer = small_distilbert(
            len(tokenizer),
            dim=text_dim,
            n_layers=text_layers,
            max_position_embeddings=max(64, max_length),
            pad_token_id=tokenizer.pad_token_id or 0,
        )
    else:
        raise ValueError(f"text_encoder={text_encoder!r}; choose one of {TEXT_ENCODERS}")
    return DualEncoder(image_tower, TextTower(transformer, text_pooling), embed_dim), tokenizer


# --------------------------------------------------------------- fetch-weights
def weights_needed(config) -> dict:
    """What a run configuration loads: ``{"resnet50": weights or None, "distilbert": bool}``."""
    return {
        "resnet50": config.image_weights if config.image_encoder == "resnet50" and config.pretrained else None,
        "distilbert": config.text_encoder == "distilbert" and config.pretrained,
    }


def require_weights(config) -> None:
    """Raise :class:`WeightsUnavailable` (naming the field and the fix) when ``config`` loads
    pretrained weights that are not in the local caches; loads nothing."""
    needed = weights_needed(config)
    fix = (
        f"run `python -m clipstudy fetch-weights --profile {config.profile}` on a machine with internet "
        f"(it fills ~/.cache/torch/hub and ~/.cache/huggingface), point {RESNET50_ENV} / {DISTILBERT_ENV} "
        "to local copies, or set pretrained=false"
    )
    if needed["resnet50"]:
        local = os.environ.get(RESNET50_ENV)
        if local and not Path(local).is_file():
            raise WeightsUnavailable(f"{RESNET50_ENV}={local} is not a file; {fix}")
        if not local and resnet50_cache_path(needed["resnet50"]) is None:
            raise WeightsUnavailable(
                f"config field 'image_weights'={needed['resnet50']!r}: the ResNet-50 weights "
                f"are not in the local cache; {fix}"
            )
    if needed["distilbert"] and not distilbert_cached():
        raise WeightsUnavailable(
            f"config field 'text_encoder'='distilbert': DistilBERT "
            f"({distilbert_location()}) is not in the local cache; {fix}"
        )


def distilbert_cached() -> bool:
    """Whether DistilBERT's configuration is on disk (a local folder, or the Hugging Face cache)."""
    local = os.environ.get(DISTILBERT_ENV)
    if local:
        return (Path(local) / "config.json").is_file()
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(DISTILBERT_NAME, "config.json"), str)


def fetch_weights(
    dest: str | None = None, *, image_weights: str | None = "timm-a1", distilbert: bool = True
) -> list[str]:
    """Download weights into the torch / Hugging Face caches (and plain copies into ``dest``).

    ``image_weights``: the ResNet-50 weights to fetch (``"timm-a1"``,
    ``"torchvision"`` or None for none); ``distilbert``: also DistilBERT and
    its tokenizer.
    """
    done, out = [], Path(dest) if dest else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    if image_weights == "timm-a1":
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(TIMM_RESNET50_REPO, "model.safetensors"))
        done.append(str(path))
        if out:
            torch.save(_load_state_dict_file(path), out / "resnet50-timm-a1.pth")
            done.append(str(out / "resnet50-timm-a1.pth"))
    elif image_weights == "torchvision":
        weights = ResNet50_Weights.IMAGENET1K_V1
        state = weights.get_state_dict(progress=True)
        done.append(str(Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name))
        if out:
            torch.save(state, out / "resnet50-torchvision.pth")
            done.append(str(out / "resnet50-torchvision.pth"))
    elif image_weights is not None:
        raise ValueError(f"image_weights={image_weights!r}; choose one of {IMAGE_WEIGHTS}")
    if distilbert:
        from transformers import AutoTokenizer, DistilBertModel

        model = DistilBertModel.from_pretrained(DISTILBERT_NAME)
        tokenizer = AutoTokenizer.from_pretrained(DISTILBERT_NAME)
        done.append(f"Hugging Face cache: {DISTILBERT_NAME}")
        if out:
            model.save_pretrained(out / "distilbert")
            tokenizer.save_pretrained(out / "distilbert")
            done.append(str(out / "distilbert"))
    return done


# Where fetch_weights downloads from: timm's ResNet-50 and DistilBERT from the Hugging Face hub, the
# torchvision ResNet-50 from PyTorch's server.
HUB_HOST, TORCHVISION_HOST = "huggingface.co", "download.pytorch.org"


def download_hosts(image_weights: str | None, distilbert: bool) -> list[str]:
    """The hosts :func:`fetch_weights` contacts for these weights."""
    hosts = {"timm-a1": [HUB_HOST], "torchvision": [TORCHVISION_HOST]}.get(image_weights or "", [])
    return list(dict.fromkeys(hosts + ([HUB_HOST] if distilbert else [])))
