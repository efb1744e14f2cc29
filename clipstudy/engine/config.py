"""Run configuration: one flat dataclass, built-in profiles, overrides by field name.

Every field can be overridden by name, from Python (``make_config("demo",
epochs=4)``), from the command line (``--epochs 4``) and from papermill
parameters; all three go through :func:`make_config`, which validates at
start and names the field and the accepted values when something is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipstudy.data.layout import DATA_PATH_FIELDS, resolve_paths
from clipstudy.errors import StartupError


class ConfigError(StartupError, ValueError):
    """An invalid configuration value; the message names the field."""


_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def safe_name(text: str) -> str:
    """A file-name-safe form of ``text`` (no separators, no leading dots, no '..')."""
    name = _SAFE.sub("_", str(text)).strip("._") or "_"
    return name.replace("..", "_")


def cell_name(label: str, loss: str, seed: int) -> str:
    """The run directory name of a cell, e.g. ``adamw-clip-s0``; always a single safe path component."""
    return safe_name(f"{label}-{loss}-s{seed}")


@dataclass
class RunConfig:
    # --- the cell
    profile: str = "paper"
    optimizer: str = "adamw"
    label: str = ""  # the optimizer's name in reports (e.g. "adam-nol2"); empty = optimizer
    loss: str = "clip"
    seed: int = 0
    out: str = ""  # run directory; empty = reports/runs/<profile>/<cell>

    # --- data (docs/protocol.md formats); `data` is the demo layout shorthand (DIR/train.json, ...)
    data: str = ""
    train_ann: str = ""
    train_images: str = ""
    retrieval_ann: str = ""
    retrieval_images: str = ""
    zeroshot_images: str = ""
    val_retrieval_ann: str = ""  # the validation split: per-epoch evaluation and every selection read it
    val_retrieval_images: str = ""
    val_zeroshot_images: str = ""
    limit_train: int = 0  # 0 = all pairs; N = the first N (quick experiments)
    max_words: int = 30
    max_length: int = 30  # tokens
    image_size: int = 256
    crop_scale_min: float = 0.5  # RandomResizedCrop scale (min, 1.0)
    hflip: bool = True
    augment: str = "torchvision"  # albef (the original's RandomAugment) | torchvision (RandAugment) | none; (2, 7)
    num_workers: int = 4
    cache_images: bool = False  # keep decoded images in memory (small data sets such as the demo)
    zeroshot_transform: str = "clip"  # clip (square resize, CLIP stats) | original (short side + crop, ImageNet stats)

    # --- model
    image_encoder: str = "resnet50"  # resnet50 | small_resnet
    text_encoder: str = "distilbert"  # distilbert | small_distilbert
    pretrained: bool = True  # False = random init ("scratch"); demo towers: see clipstudy.engine.pretrain
    image_weights: str = "torchvision"  # ResNet-50: torchvision (IMAGENET1K_V1) | timm-a1 (timm resnet50.a1_in1k)
    pretrain: dict = field(
        default_factory=dict
    )  # demo pretraining settings (clipstudy.engine.pretrain.PretrainSettings)
    text_pooling: str = "first"  # first ([CLS], the original) | mean (mean over the caption's tokens)
    embed_dim: int = 256
    tokenizer: str = ""  # tokenizer folder; empty = the encoder's own (or DATA/tokenizer)
    small_resnet_widths: list = field(default_factory=lambda: [32, 64, 128])
    small_resnet_blocks: list = field(default_factory=lambda: [1, 1, 1])
    small_resnet_norm: str = "batch"  # batch | group (group: exact multi-process equivalence on CPU)
    text_dim: int = 128
    text_layers: int = 2

    # --- loss
    temperature: float = 0.01
    loss_params: dict = field(default_factory=dict)  # e.g. {"gamma": 0.8}

    # --- optimisation
    lr: float = 0.0  # 0 = the optimizer's default learning rate
    weight_decay: float = 0.02
    optimizer_params: dict = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 128
    warmup_steps: int = -1  # -1 = one epoch of warm-up
    lr_schedule: str = "smooth"  # smooth (per-step warm-up + cosine) | original (staircase, cosine per epoch)
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    grad_clip: float = 0.0  # 0 = no clipping (the gradient norm is still logged)
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, none on CPU) | bf16 | fp16 | none
    max_steps: int = 0  # 0 = the whole run; N = stop at step N as if the whole run were cut there
    # (same schedule; rerun with a later N, or 0, to continue it)

    # --- evaluation and bookkeeping
    eval_every: int = 1  # epochs between validation evaluations (the last epoch is always evaluated)
    evaluate_test: bool = True  # score the test sets once at the end; tuning trials never read them
    eval_batch_size: int = 256
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = leave as is
    deterministic: bool = True
    keep_checkpoints: int = 2
    log_every: int = 1  # steps between history rows
    tensorboard: bool = True  # TensorBoard event files beside history.csv (clipstudy.engine.tensorboard_log)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def optimizer_label(self) -> str:
        return self.label or self.optimizer

    def cell_name(self) -> str:
        return cell_name(self.optimizer_label(), self.loss, self.seed)

    def optimizer_settings(self) -> dict:
        """What the optimizer is built with: the rate (``lr`` 0 means the optimizer's own default, resolved by
        the optimizer registry: None here), the weight decay and ``optimizer_params``; the one place that
        turns these fields into optimizer arguments."""
        return {"lr": self.lr or None, "weight_decay": self.weight_decay, **self.optimizer_params}

    def resolved_paths(self) -> dict:
        """Data paths with the `data` shorthand expanded (explicit paths win)."""
        return resolve_paths(self.to_dict(), needs_tokenizer=self.text_encoder == "small_distilbert")


# The original study's setting: the field defaults plus what its code base ran
# (docs/protocol.md, "Protocol fidelity: the options"); each correction is the field's default or a
# named option. Per-loss parameters are merged into `loss_params` for the
# run's loss (see make_config); OnlineCLR got the SogCLR gamma.
PAPER: dict[str, Any] = dict(
    augment="albef",
    zeroshot_transform="original",
    image_weights="timm-a1",
    amp="fp16",
    lr_schedule="original",
    warmup_steps=500,
)
PROFILE_LOSS_PARAMS: dict[str, dict[str, dict]] = {
    "paper": {"sogclr": {"estimator": "original"}, "onlineclr": {"gamma": 0.8}},
}

# The embedded benchmark on a CPU, in the paper's regime: small towers pretrained
# on their own disjoint data (clipstudy.engine.pretrain: supervised image classes, masked
# language modelling), then fine-tuned with ONE learning rate for every optimizer,
# the paper's weight decay (0.02) and temperature (0.01), warm-up then cosine.
# lr: the shared protocol's rate, chosen by `python -m clipstudy tune --profile demo` on the
# validation sets (the rate every optimizer tried with the best mean validation Average;
# reports/demo/tuning.csv); the tuned protocol's per-optimizer rates come from the same table.
# Text pooling: mean, because the first token of the MLM-pretrained tower starts nearly
# collapsed (docs/results.md, "Collapse at initialisation and text pooling"). 32 px, no
# flip / RandAugment (they would contradict the position and colour words of the
# captions). Small batches: on this budget the number of steps matters more than the
# negatives per step.
DEMO: dict[str, Any] = dict(
    profile="demo",
    data="data/demo",
    image_size=32,
    crop_scale_min=0.85,
    hflip=False,
    augment="none",
    num_workers=0,
    cache_images=True,
    image_encoder="small_resnet",
    text_encoder="small_distilbert",
    pretrained=True,
    text_pooling="mean",
    small_resnet_widths=[16, 32, 64],
    embed_dim=128,
    max_length=20,
    epochs=3,
    batch_size=32,
    warmup_steps=20,
    lr=1e-3,
    eval_batch_size=500,
    threads=0,
)

# Seconds (about 10 s on a laptop CPU), for tests and a first try of the notebook: tiny
# encoders, random init, at most the first 256 training pairs (32 steps on the demo set;
# the tests' tiny sets are smaller). A test that needs the pretrained towers sets
# pretrained=True and a tiny `pretrain`.
SMOKE: dict[str, Any] = dict(
    DEMO,
    profile="smoke",
    limit_train=256,
    small_resnet_widths=[8, 16, 32],
    text_dim=32,
    text_layers=1,
    embed_dim=32,
    epochs=2,
    batch_size=16,
    warmup_steps=2,
    eval_batch_size=64,
    max_length=16,
    pretrained=False,
    lr=2e-3,
)

PROFILES: dict[str, dict[str, Any]] = {"paper": PAPER, "demo": DEMO, "smoke": SMOKE}

CHOICES: dict[str, tuple] = {
    "image_encoder": ("resnet50", "small_resnet"),
    "text_encoder": ("distilbert", "small_distilbert"),
    "amp": ("auto", "bf16", "fp16", "none"),
    "small_resnet_norm": ("batch", "group"),
    "augment": ("albef", "torchvision", "none"),
    "zeroshot_transform": ("original", "clip"),
    "image_weights": ("timm-a1", "torchvision"),
    "lr_schedule": ("smooth", "original"),
    "text_pooling": ("first", "mean"),
}
# Former fields still accepted by make_config: name -> function(value) -> {new field: value}.
LEGACY_FIELDS = {"randaugment": lambda on: {"augment": "torchvision" if _coerce_bool("randaugment", on) else "none"}}

FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES = typing.get_type_hints(RunConfig)


def _coerce_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"config field {name!r}: {value!r} is not a valid bool")


def _coerce(name: str, value: Any) -> Any:
    """Convert ``value`` (possibly a command-line string) to the field's type, or fail naming the field."""
    kind = _TYPES[name]
    try:
        if kind is bool:
            return _coerce_bool(name, value)
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if kind is str:
            if value is None:
                return ""
            if not isinstance(value, (str, Path)):
                raise ValueError
            return str(value)
        if kind in (list, dict):
            parsed = json.loads(value) if isinstance(value, str) else value  # `value` stays for the message
            if not isinstance(parsed, kind):
                raise ValueError
            return parsed
    except (TypeError, ValueError, json.JSONDecodeError):
        pass
    raise ConfigError(f"config field {name!r}: {value!r} is not a valid {kind.__name__}")


def validate(config: RunConfig) -> RunConfig:
    """Check every value of the configuration's own fields; raise ConfigError naming the field and the
    accepted values. The loss, the optimizer and their parameters are checked by the components
    themselves (:func:`clipstudy.engine.preflight.check_components`), called at start-up."""

    def fail(name, msg):
        raise ConfigError(f"config field {name!r}={getattr(config, name)!r}: {msg}")

    if config.label and safe_name(config.label) != config.label:
        fail("label", "use letters, digits and . _ + = - only")
    if config.profile not in PROFILES:
        fail("profile", f"choose one of {sorted(PROFILES)}")
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            fail(name, f"choose one of {list(choices)}")
    for name in (
        "epochs",
        "batch_size",
        "image_size",
        "embed_dim",
        "max_length",
        "max_words",
        "eval_batch_size",
        "text_dim",
        "text_layers",
        "keep_checkpoints",
        "log_every",
        "eval_every",
    ):
        if getattr(config, name) < 1:
            fail(name, "must be >= 1")
    for name in ("num_workers", "limit_train", "max_steps", "threads", "seed"):
        if getattr(config, name) < 0:
            fail(name, "must be >= 0")
    for name in ("lr", "weight_decay", "warmup_lr", "min_lr", "grad_clip"):
        if getattr(config, name) < 0:
            fail(name, "must be >= 0 (a learning rate or decay cannot be negative)")
    if not config.temperature > 0:
        fail("temperature", "must be > 0")
    if not 0 < config.crop_scale_min <= 1:
        fail("crop_scale_min", "must be in (0, 1]")
    if config.warmup_steps < -1:
        fail("warmup_steps", "must be -1 (one epoch) or >= 0")
    if not (config.device in ("auto", "cpu", "cuda") or config.device.startswith("cuda:")):
        fail("device", "choose auto, cpu, cuda or cuda:N")
    if len(config.small_resnet_widths) != len(config.small_resnet_blocks) or not config.small_resnet_widths:
        fail("small_resnet_blocks", "needs one entry per entry of small_resnet_widths")
    if config.text_encoder == "small_distilbert" and not config.resolved_paths()["tokenizer"]:
        fail("tokenizer", "small_distilbert needs the data set's tokenizer folder (set `data` or `tokenizer`)")
    return config


def make_config(profile: str = "demo", **overrides: Any) -> RunConfig:
    """The profile's configuration with ``overrides`` applied and validated.

    Unknown field names and ill-typed values fail here, naming the field.
    """
    if profile not in PROFILES:
        raise ConfigError(f"config field 'profile'={profile!r}: choose one of {sorted(PROFILES)}")
    values: dict[str, Any] = {"profile": profile, **PROFILES[profile]}
    given: dict[str, Any] = {}
    for name, value in overrides.items():
        name = name.replace("-", "_")
        if name in LEGACY_FIELDS and name not in FIELDS:
            given.update(LEGACY_FIELDS[name](value))
            continue
        if name not in FIELDS:
            close = [f for f in FIELDS if name in f or f in name]
            hint = f" (did you mean {close}?)" if close else ""
            raise ConfigError(f"unknown config field {name!r}{hint}; valid fields: {sorted(FIELDS)}")
        given[name] = value
    values = {name: _coerce(name, value) for name, value in {**values, **given}.items()}
    loss_defaults = PROFILE_LOSS_PARAMS.get(profile, {}).get(values.get("loss", RunConfig.loss), {})
    values["loss_params"] = {**loss_defaults, **values.get("loss_params", {})}
    for name in PATH_FIELDS:
        if values.get(name):
            values[name] = _absolute_path(name, values[name], from_profile=name not in given)
    return validate(RunConfig(**values))


# Fields holding a file or folder; stored absolute and normalised (see _absolute_path).
PATH_FIELDS = ("out", "data", *DATA_PATH_FIELDS)


def _absolute_path(name: str, value: str, *, from_profile: bool) -> str:
    """A relative path from a profile is relative to the project root; one given by the caller, to the
    current directory (as a shell user means it). Either way it is stored absolute, once."""
    from clipstudy import paths

    if not value or Path(value).is_absolute():
        return paths.absolute(value, "/")
    if not from_profile:
        return paths.absolute(value, Path.cwd())
    try:
        return paths.absolute(value, paths.project_root())
    except paths.ProjectRootNotFound as err:
        raise ConfigError(
            f"config field {name!r}={value!r} (profile default) is relative to the project folder: {err}"
        ) from None


def config_from_dict(values: dict) -> RunConfig:
    """A configuration as :meth:`RunConfig.to_dict` wrote it (``config.json``, the training notebook's
    ``run_config``), validated again; fields of older versions are understood."""
    known = {k: v for k, v in values.items() if (k in FIELDS or k in LEGACY_FIELDS) and k != "profile"}
    return make_config(values.get("profile", "demo"), **known)


def config_from_json(path: str | Path) -> RunConfig:
    data = json.loads(Path(path).read_text())
    return config_from_dict(data.get("config", data))


def notebook_parameters(config: RunConfig, *, progress: bool = False) -> dict:
    """The training notebook's papermill parameters for a configuration that is already validated:
    the configuration itself, whole (the notebook runs it as given, with :func:`config_from_dict`)."""
    return {"run_config": config.to_dict(), "progress": progress}


def add_config_arguments(parser, profile: str | None) -> None:
    """One ``--field`` option per configuration field (values are coerced by make_config).

    Each help line says what the field is and its default in ``profile``
    (None: the defaults come from elsewhere, e.g. a run's config.json).
    """
    group = parser.add_argument_group(
        "configuration fields" + (f" (defaults of the {profile!r} profile)" if profile else "")
    )
    for name in FIELDS:
        if name == "profile":  # the command's own choice argument
            continue
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(
            *flags, dest=name, default=None, metavar=_TYPES[name].__name__.upper(), help=field_help(name, profile)
        )


def profile_named_in(argv: list[str], default: str) -> str:
    """The ``--profile`` given in ``argv`` (for the help's defaults), else ``default``."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--profile", default=default)
    name = pre.parse_known_args(argv)[0].profile
    return name if name in PROFILES else default


def fields_epilog(profile: str) -> str:
    """Every field, one line each with its default in ``profile``: the help of ``sweep --set``."""
    lines = [f"configuration fields for --set (defaults of the {profile!r} profile):"]
    lines += [f"  {name:<20} {field_help(name, profile).replace('%%', '%')}" for name in FIELDS if name != "profile"]
    return "\n".join(lines).replace("%", "%%")


def profile_default(name: str, profile: str) -> Any:
    """A field's value in ``profile`` before any override (paths as the profile writes them)."""
    spec = FIELDS[name]
    value = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
    return PROFILES[profile].get(name, value)


def field_help(name: str, profile: str | None) -> str:
    """``--help`` text of a field: what it is, then its default in ``profile``."""
    from clipstudy.engine.config_help import FIELD_HELP

    text = FIELD_HELP[name].replace("%", "%%")  # argparse formats help with %
    if profile is None:
        return text
    value = profile_default(name, profile)
    shown = json.dumps(value) if isinstance(value, (list, dict, bool)) else repr(value)
    extra = PROFILE_LOSS_PARAMS.get(profile, {}) if name == "loss_params" else {}
    suffix = f"; plus per loss {json.dumps(extra)}" if extra else ""
    return f"{text} [{profile}: {shown.replace('%', '%%')}{suffix}]"


def overrides_from_args(args) -> dict:
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None and name != "profile"}
