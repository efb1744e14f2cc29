"""What one run is made of, built once: its data, model, loss, optimizer, schedule and evaluation sets.

:func:`build_run` returns a :class:`Run`, which :mod:`clipstudy.engine.train` trains
top to bottom; :func:`build_model_for` and :func:`build_train_set` are also what
``evaluate`` and the initialisation diagnostics use.
"""

from __future__ import annotations

import contextlib
import os
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from clipstudy import paths
from clipstudy.core import precision
from clipstudy.engine.config import ConfigError, RunConfig
from clipstudy.engine.pretrain import load_pretrained_towers
from clipstudy.engine.runstate import seed_everything
from clipstudy.engine.splits import TEST, VALIDATION, EvalSets, build_eval_sets


@dataclass(kw_only=True)
class Run:
    """Everything a training run holds (built once by :func:`build_run`)."""

    config: RunConfig
    out: Path
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    train_set: Dataset
    validation: EvalSets  # every evaluation during training
    test: EvalSets  # once, at the end (empty when the configuration does not evaluate the test sets)
    steps_per_epoch: int
    total_steps: int  # optimizer steps of the whole run (the schedule's length)
    stop_step: int  # where this session stops: total_steps, or max_steps if earlier
    amp_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1
    last_embeddings: tuple | None = None  # the last step's (image, text) embeddings, for the diagnostics


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config field 'device'={name!r}: CUDA is not available on this machine; use auto or cpu")
    return torch.device(name)


def run_directory(config: RunConfig) -> Path:
    """The cell's run directory: ``out``, or ``<project>/reports/runs/<profile>/<cell>``."""
    if config.out:
        return Path(config.out)
    try:
        return paths.runs_dir(config.profile) / config.cell_name()
    except paths.ProjectRootNotFound as err:
        raise ConfigError(f"config field 'out' is empty: {err}") from None


def planned_steps(config: RunConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps of the whole run, the step it stops at).

    ``max_steps`` cuts the run as if the whole run had been stopped there: the
    schedule (warm-up, decay) is the whole run's, and a rerun with a later stop
    (or none) continues from the cut.
    """
    total = steps_per_epoch * config.epochs
    return total, (min(total, config.max_steps) if config.max_steps else total)


def build_train_set(config: RunConfig):
    from clipstudy.data.datasets import TrainPairs, require_readable_image, transforms_for

    paths = config.resolved_paths()
    train_set = TrainPairs(
        paths["train_ann"],
        paths["train_images"],
        transforms_for(config)["train"],
        max_words=config.max_words,
        cache_images=config.cache_images,
    )
    # fail in seconds, not after the first epoch, when the whole set is unreadable
    require_readable_image(train_set, "training", paths["train_ann"])
    if config.limit_train:
        train_set = torch.utils.data.Subset(train_set, range(min(config.limit_train, len(train_set))))
    return train_set


def build_model_for(config: RunConfig):
    from clipstudy.core.models import build_model

    return build_model(
        image_encoder=config.image_encoder,
        text_encoder=config.text_encoder,
        embed_dim=config.embed_dim,
        tokenizer_path=config.resolved_paths()["tokenizer"] or None,
        pretrained=config.pretrained,
        image_weights=config.image_weights,
        small_resnet_widths=config.small_resnet_widths,
        small_resnet_blocks=config.small_resnet_blocks,
        small_resnet_norm=config.small_resnet_norm,
        text_dim=config.text_dim,
        text_layers=config.text_layers,
        max_length=config.max_length,
        text_pooling=config.text_pooling,
    )


@contextlib.contextmanager
def params_named(field: str, value: dict):
    """A loss or optimizer refusing its parameters (TypeError / ValueError) becomes a ConfigError naming
    ``field``; a safety net behind the configuration's own checks."""
    try:
        yield
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"config field {field!r}={value!r}: {err} (check each key and the type of its "
            "value against what the loss or optimizer accepts)"
        ) from err


def build_run(config: RunConfig, out: Path, rank: int = 0, world_size: int = 1) -> Run:
    from clipstudy.core.losses import make_loss
    from clipstudy.core.optim import build_optimizer, make_scheduler

    device = choose_device(config.device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    train_set = build_train_set(config)
    validation = build_eval_sets(config, VALIDATION)
    test = build_eval_sets(config, TEST) if config.evaluate_test else EvalSets(TEST)
    if config.batch_size % world_size:
        raise ConfigError(
            f"config field 'batch_size'={config.batch_size}: must be divisible by the "
            f"number of processes ({world_size})"
        )
    steps_per_epoch = len(train_set) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"config field 'batch_size'={config.batch_size} is larger than the training set "
            f"({len(train_set)} pairs in {config.resolved_paths()['train_ann']}); lower batch_size"
        )
    seed_everything(config.seed)  # same initial weights for every cell of a seed
    model, tokenizer = build_model_for(config)
    load_pretrained_towers(model, config)  # the demo towers' pretrained weights, built on first use
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    with params_named("loss_params", config.loss_params):
        loss = make_loss(
            config.loss, temperature=config.temperature, num_samples=len(train_set), **config.loss_params
        ).to(device)
    with params_named("optimizer_params", config.optimizer_params):
        optimizer = build_optimizer(config.optimizer, model, loss, **config.optimizer_settings())
    total_steps, stop_step = planned_steps(config, steps_per_epoch)
    warmup = steps_per_epoch if config.warmup_steps < 0 else config.warmup_steps
    scheduler = make_scheduler(
        optimizer,
        total_steps=total_steps,
        warmup_steps=min(warmup, total_steps),
        warmup_lr=config.warmup_lr,
        min_lr=config.min_lr,
        kind=config.lr_schedule,
        steps_per_epoch=steps_per_epoch,
        epochs=config.epochs,
    )
    amp_dtype = precision.choose_amp(config.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return Run(
        config=config,
        out=out,
        device=device,
        model=model,
        tokenizer=tokenizer,
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        train_set=train_set,
        validation=validation,
        test=test,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        stop_step=stop_step,
        amp_dtype=amp_dtype,
        rank=rank,
        world_size=world_size,
    )


def wrap_distributed(run: Run) -> None:
    """Under several processes: synchronised batch norm on CUDA, and the model in DDP."""
    if run.world_size == 1:
        return
    if run.device.type == "cuda":
        run.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
    run.model = torch.nn.parallel.DistributedDataParallel(
        run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None
    )


# ------------------------------------------------------------- bookkeeping
def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
