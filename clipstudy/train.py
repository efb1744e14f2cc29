"""Train and evaluate one optimizer x loss cell.

Read top to bottom: ``train(config)`` sets up the run directory, data, model,
loss, optimizer and schedule, resumes from the newest valid checkpoint if
there is one, then loops over epochs: training steps (with a divergence
guard), per-epoch evaluation, and a checkpoint at every epoch end and on
SIGTERM / SIGINT. It writes the run directory's files (see README, "Run
directory"): ``config.json``, ``metrics.json``, ``history.csv``,
``epochs.csv`` and ``checkpoints/``.

Reproducibility: the data order of epoch ``e`` is a permutation drawn from
``(seed, e)`` and each sample's augmentation is seeded by ``(seed, e,
index)``, so a run resumed mid-epoch sees exactly the batches and crops of an
uninterrupted one, whatever the number of loader workers.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from clipstudy import __version__
from clipstudy.checkpoint import (CellBusy, atomic_write_text, cell_lock, load_latest, remove_stale_temporaries,
                                  save_checkpoint, write_json)
from clipstudy.config import (ConfigError, RunConfig, add_config_arguments, make_config,
                              overrides_from_args, PROFILES)
from clipstudy.diagnostics import start_end_summary, step_diagnostics
from clipstudy.pretrain import load_pretrained_towers

log = logging.getLogger("clipstudy.train")

STATUS_COMPLETED, STATUS_DIVERGED, STATUS_FAILED, STATUS_INTERRUPTED = "completed", "diverged", "failed", "interrupted"


# ------------------------------------------------------------------ provenance
def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict:
    import importlib.metadata as md

    names = ["torch", "torchvision", "transformers", "tokenizers", "numpy", "pillow", "pandas", "papermill"]
    versions = {"python": platform.python_version(), "clipstudy": __version__}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def device_description(device: torch.device) -> dict:
    info = {"device": str(device), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------- determinism
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(obj):
    return tuple(_tuplify(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def sample_seed(seed: int, epoch: int, index: int) -> int:
    # A fixed mix (not Python's salted hash) so workers and resumed runs agree.
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**63 - 1)


class SeededSamples(Dataset):
    """Wraps a dataset so item ``(index, epoch)`` is augmented with its own seed.

    It reseeds the CPU generator of the process that loads the item (torchvision
    transforms draw from it). In loader workers that generator is the
    worker's own; in the main process :func:`batches_keeping_rng` restores it
    after each batch, which costs one state copy per batch instead of one per
    sample.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        torch.random.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
        return self.dataset[index]


def batches_keeping_rng(loader):
    """Iterate ``loader`` leaving the global CPU generator as if no batch had been loaded."""
    iterator = iter(loader)
    while True:
        state = torch.get_rng_state()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        finally:
            torch.set_rng_state(state)
        yield batch


class EpochBatches(Sampler):
    """Batches of ``(index, epoch)`` keys for one epoch, starting at batch ``start``.

    The permutation depends only on (seed, epoch). Under data parallelism rank
    ``r`` of ``w`` takes rows ``[r*B/w, (r+1)*B/w)`` of every global batch, so
    the gathered batch is exactly the single-process batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.world_size = rank, world_size
        self.local = batch_size // world_size

    def __len__(self):
        return self.n // self.batch_size - self.start

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        for b in range(self.start, self.n // self.batch_size):
            rows = order[b * self.batch_size:(b + 1) * self.batch_size]
            rows = rows[self.rank * self.local:(self.rank + 1) * self.local]
            yield [(i, self.epoch) for i in rows]


# ------------------------------------------------------------------ the setup
@dataclass
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
    retrieval_set: Dataset | None
    zeroshot_set: Dataset | None
    steps_per_epoch: int
    amp_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config field 'device'={name!r}: CUDA is not available on this machine; use auto or cpu")
    return torch.device(name)


def choose_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def run_directory(config: RunConfig) -> Path:
    """The cell's run directory: ``out``, or ``reports/runs/<profile>/<cell>``."""
    return Path(config.out) if config.out else Path("reports") / "runs" / config.profile / config.cell_name()


def build_datasets(config: RunConfig):
    from clipstudy.data import (RetrievalSet, TrainPairs, ZeroShotSet, eval_transform, require_readable_image,
                                train_transform)

    paths = config.resolved_paths()
    if not paths["train_ann"] or not paths["train_images"]:
        raise ConfigError("config fields 'train_ann'/'train_images' are empty: set `data` (demo layout) "
                          "or both paths (STUDY.md formats)")
    randaugment = (2, 7) if config.randaugment else None
    train_set = TrainPairs(paths["train_ann"], paths["train_images"],
                           train_transform(config.image_size, crop_scale=(config.crop_scale_min, 1.0),
                                           hflip=config.hflip, randaugment=randaugment),
                           max_words=config.max_words, cache_images=config.cache_images)
    if config.limit_train:
        train_set = torch.utils.data.Subset(train_set, range(min(config.limit_train, len(train_set))))
    evaluation = eval_transform(config.image_size)
    retrieval_set = zeroshot_set = None
    if paths["retrieval_ann"]:
        retrieval_set = RetrievalSet(paths["retrieval_ann"], paths["retrieval_images"], evaluation,
                                     max_words=config.max_words, cache_images=config.cache_images)
    if paths["zeroshot_images"]:
        zeroshot_set = ZeroShotSet(paths["zeroshot_images"], evaluation, cache_images=config.cache_images)
    # fail in seconds, not after the first epoch, when a whole set is unreadable
    require_readable_image(train_set.dataset if isinstance(train_set, torch.utils.data.Subset) else train_set,
                           "training", paths["train_ann"])
    if retrieval_set is not None:
        require_readable_image(retrieval_set, "retrieval", paths["retrieval_ann"])
    if zeroshot_set is not None:
        require_readable_image(zeroshot_set, "zero-shot", paths["zeroshot_images"])
    return train_set, retrieval_set, zeroshot_set


def build_model_for(config: RunConfig):
    from clipstudy.models import build_model

    return build_model(image_encoder=config.image_encoder, text_encoder=config.text_encoder,
                       embed_dim=config.embed_dim, tokenizer_path=config.resolved_paths()["tokenizer"] or None,
                       pretrained=config.pretrained, small_resnet_widths=config.small_resnet_widths,
                       small_resnet_blocks=config.small_resnet_blocks,
                       small_resnet_norm=config.small_resnet_norm, text_dim=config.text_dim,
                       text_layers=config.text_layers, max_length=config.max_length,
                       text_pooling=config.text_pooling)


def build_run(config: RunConfig, out: Path, rank: int = 0, world_size: int = 1) -> Run:
    from clipstudy.losses import make_loss
    from clipstudy.optim import build_optimizer, make_scheduler

    device = choose_device(config.device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    train_set, retrieval_set, zeroshot_set = build_datasets(config)
    if config.batch_size % world_size:
        raise ConfigError(f"config field 'batch_size'={config.batch_size}: must be divisible by the "
                          f"number of processes ({world_size})")
    steps_per_epoch = len(train_set) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"config field 'batch_size'={config.batch_size} is larger than the training set "
                          f"({len(train_set)} pairs in {config.resolved_paths()['train_ann']}); lower batch_size")
    seed_everything(config.seed)  # same initial weights for every cell of a seed
    model, tokenizer = build_model_for(config)
    load_pretrained_towers(model, config)  # hook (pretrain.py): demo towers' pretrained weights, built on first use
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    loss = make_loss(config.loss, temperature=config.temperature, num_samples=len(train_set),
                     **config.loss_params).to(device)
    optimizer = build_optimizer(config.optimizer, model, loss, lr=config.lr or None,
                                weight_decay=config.weight_decay, **config.optimizer_params)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    warmup = steps_per_epoch if config.warmup_steps < 0 else config.warmup_steps
    scheduler = make_scheduler(optimizer, total_steps=total_steps, warmup_steps=min(warmup, total_steps),
                               warmup_lr=config.warmup_lr, min_lr=config.min_lr)
    amp_dtype = choose_amp(config.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return Run(config, out, device, model, tokenizer, loss, optimizer, scheduler, scaler, train_set,
               retrieval_set, zeroshot_set, steps_per_epoch, amp_dtype, rank, world_size)


# ------------------------------------------------------------- bookkeeping
class StopRequest:
    """Turns SIGTERM / SIGINT into a flag checked between steps (then a checkpoint is written)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received signal %s: checkpointing after this step", signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        atomic_write_text(path, "")
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def capture_state(run: Run, epoch: int, batch_in_epoch: int, global_step: int, history, epochs, elapsed) -> dict:
    model = run.model.module if hasattr(run.model, "module") else run.model
    return {
        "format": 1,
        "model": model.state_dict(),
        "loss": run.loss.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_state(),
        "epoch": epoch, "batch_in_epoch": batch_in_epoch, "global_step": global_step,
        "history": history, "epochs": epochs, "elapsed": elapsed,
        "config": json.dumps(run.config.to_dict()),
    }


def restore_state(run: Run, state: dict) -> None:
    model = run.model.module if hasattr(run.model, "module") else run.model
    model.load_state_dict(state["model"])
    run.loss.load_state_dict(state["loss"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


TRAINING_FIELDS_THAT_MAY_CHANGE_ON_RESUME = {"out", "num_workers", "threads", "device", "log_every", "cache_images"}


def check_resume_compatible(config: RunConfig, saved_json: str, path: Path) -> None:
    saved = json.loads(saved_json)
    changed = {k: (saved.get(k), v) for k, v in config.to_dict().items()
               if k not in TRAINING_FIELDS_THAT_MAY_CHANGE_ON_RESUME and saved.get(k) != v}
    if changed:
        raise ConfigError(f"{path} was written with a different configuration ({changed}); "
                          "resume with the same settings or use a new output directory")


# ---------------------------------------------------------------- evaluation
def evaluate_run(run: Run) -> dict:
    from clipstudy.evaluate import evaluate_all

    model = run.model.module if hasattr(run.model, "module") else run.model
    # Image reading uses the training loader's worker count: one process would bound every
    # evaluation (MSCOCO 5k + ImageNet 50k images in the paper setting) by one core's decoding.
    return evaluate_all(model, run.tokenizer, retrieval_set=run.retrieval_set, zeroshot_set=run.zeroshot_set,
                        batch_size=run.config.eval_batch_size, device=run.device,
                        max_length=run.config.max_length, amp=run.amp_dtype is not None, progress=False,
                        num_workers=run.config.num_workers)


# ------------------------------------------------------------------ training
def train(config: RunConfig, *, progress: bool = True) -> dict:
    """Train one cell to completion (or resume it); return ``metrics.json``'s content.

    An exception other than an interruption is recorded as status ``failed``
    in ``metrics.json`` (with the error) and raised again.
    """
    try:
        return _train(config, progress=progress)
    except (KeyboardInterrupt, ConfigError, CellBusy):
        raise
    except Exception as err:
        out = run_directory(config)
        if int(os.environ.get("RANK", "0")) == 0 and out.is_dir():
            try:
                write_json(out / "metrics.json", {
                    "status": STATUS_FAILED, "cell": config.cell_name(), "profile": config.profile,
                    "optimizer": config.optimizer_label(), "base_optimizer": config.optimizer, "loss": config.loss,
                    "seed": config.seed,
                    "error": f"{type(err).__name__}: {err}", "git_commit": git_commit()})
            except OSError:  # e.g. the disk that made the run fail is still full
                pass
        raise


def _train(config: RunConfig, *, progress: bool = True) -> dict:
    from clipstudy import distributed as dist_utils

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo"
        torch.distributed.init_process_group(backend)
    out = run_directory(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "checkpoints").mkdir(exist_ok=True)
        except OSError as err:
            raise ConfigError(f"config field 'out'={str(out)!r}: cannot create the run directory "
                              f"({err.strerror or err}); choose a folder you can write to") from err
    with (cell_lock(out) if rank == 0 else contextlib.nullcontext()):
        return _train_locked(config, out, rank, world_size, progress)


def _train_locked(config: RunConfig, out: Path, rank: int, world_size: int, progress: bool) -> dict:
    run = build_run(config, out, rank, world_size)
    if world_size > 1:
        if run.device.type == "cuda":
            run.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
        run.model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    is_main = rank == 0
    if is_main:
        write_json(out / "config.json", {
            "config": config.to_dict(), "out": str(out), "git_commit": git_commit(),
            "versions": package_versions(), "device": device_description(run.device),
            "world_size": world_size, "command": sys.argv,
        })

    # ---- resume
    history, epochs, elapsed = [], [], 0.0
    start_epoch, start_batch, global_step = 0, 0, 0
    if is_main:  # we hold the cell lock: no live writer owns these
        for stale in remove_stale_temporaries(out / "checkpoints") + remove_stale_temporaries(out):
            print(f"removed {stale.name}, left by an interrupted write", file=sys.stderr)
    state, path, warnings = load_latest(out / "checkpoints")
    for msg in warnings:
        print("WARNING:", msg, file=sys.stderr)
    if state is not None:
        check_resume_compatible(config, state["config"], path)
        restore_state(run, state)
        history, epochs, elapsed = state["history"], state["epochs"], state["elapsed"]
        start_epoch, start_batch, global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        if is_main:
            print(f"resumed from {path} (epoch {start_epoch + 1}, batch {start_batch}, step {global_step})",
                  file=sys.stderr)
        if (out / "metrics.json").is_file():
            done = json.loads((out / "metrics.json").read_text())
            if done.get("status") in (STATUS_COMPLETED, STATUS_DIVERGED) and done.get("global_step") == global_step:
                return done

    from clipstudy.data import DataError, make_collate

    train_items = SeededSamples(run.train_set, config.seed)
    collate = make_collate(run.tokenizer, max_length=config.max_length)
    total_steps = run.steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    status, diverged_at, skipped_images = STATUS_COMPLETED, None, 0
    samples_seen_this_session, session_train_time = 0, 0.0
    t_session = time.perf_counter()

    def save(epoch, batch_in_epoch):
        if is_main:
            save_checkpoint(out / "checkpoints", global_step,
                            capture_state(run, epoch, batch_in_epoch, global_step, history, epochs,
                                          elapsed + time.perf_counter() - t_session),
                            keep=config.keep_checkpoints)
            write_csv(out / "history.csv", history)
            write_csv(out / "epochs.csv", epochs)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=global_step, desc=config.cell_name(), unit="step",
               disable=not (progress and is_main), dynamic_ncols=True, mininterval=1.0)
    with StopRequest() as stop:
        epoch = start_epoch
        while epoch < config.epochs and global_step < total_steps and status == STATUS_COMPLETED:
            loader = train_loader(run, train_items, collate, epoch, start=start_batch)
            sampler = loader.batch_sampler
            run.model.train()
            batch_in_epoch = start_batch
            steps_this_epoch = 0
            t_data = time.perf_counter()
            for batch in batches_keeping_rng(loader):
                data_time = time.perf_counter() - t_data
                t_step = time.perf_counter()
                skipped_images += batch["skipped"]
                if batch["index"].numel() < 2 and world_size == 1:
                    batch_in_epoch += 1  # nothing readable in this batch: counted, logged, skipped
                    log.warning("skipping a batch with %d readable images", batch["index"].numel())
                    continue
                loss_value, grad_norm = train_step(run, batch)
                steps_this_epoch += 1
                global_step += 1
                batch_in_epoch += 1
                step_time = time.perf_counter() - t_step
                n = batch["index"].numel() * world_size
                samples_seen_this_session += n
                session_train_time += step_time + data_time
                if not math.isfinite(loss_value):
                    status, diverged_at = STATUS_DIVERGED, global_step
                    print(f"loss is {loss_value} at step {global_step}: stopping as diverged", file=sys.stderr)
                    break
                if global_step % config.log_every == 0 or global_step == total_steps:
                    row = {"step": global_step, "epoch": epoch + batch_in_epoch / run.steps_per_epoch,
                           "loss": loss_value, "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                           "samples_per_s": n / max(step_time + data_time, 1e-9), "data_time": data_time,
                           "step_time": step_time}
                    row.update({k: float(v) for k, v in run.loss.extra_metrics().items()})
                    row.update(step_diagnostics(run))  # hook (diagnostics.py): collapse figures of this step
                    history.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                                sps=f"{n / max(step_time + data_time, 1e-9):.0f}", refresh=False)
                if stop.signal is not None:
                    save(epoch, batch_in_epoch)
                    status = STATUS_INTERRUPTED
                    break
                if global_step >= total_steps:
                    break
                t_data = time.perf_counter()
            if status != STATUS_COMPLETED:
                break
            if steps_this_epoch == 0 and len(sampler) > 0:
                raise DataError(
                    f"epoch {epoch + 1} had no usable batch: every image read failed (see the warnings above). "
                    f"Run `python -m clipstudy check-data --train-ann {config.resolved_paths()['train_ann']} "
                    f"--train-images {config.resolved_paths()['train_images']}` to list the unreadable files")
            epoch += 1
            start_batch = 0
            last = epoch == config.epochs or global_step >= total_steps
            if is_main and (epoch % config.eval_every == 0 or last):
                t_eval = time.perf_counter()
                metrics = evaluate_run(run)
                epochs.append({"epoch": epoch, "step": global_step, **metrics,
                               "eval_time": time.perf_counter() - t_eval})
                tqdm.write(f"epoch {epoch}: " + ", ".join(
                    f"{k}={metrics[k]:.2f}" for k in ("txt_r1", "img_r1", "zeroshot_top1", "average") if k in metrics),
                    file=sys.stderr) if progress else None
            if world_size > 1:
                torch.distributed.barrier()
            save(epoch, 0)
    bar.close()
    if status == STATUS_INTERRUPTED:
        if world_size > 1:
            torch.distributed.destroy_process_group()
        raise KeyboardInterrupt(f"interrupted by signal; checkpoint saved in {out / 'checkpoints'}")

    elapsed += time.perf_counter() - t_session
    final = epochs[-1] if epochs and status == STATUS_COMPLETED else {}
    metrics = {
        "status": status,
        "cell": config.cell_name(), "profile": config.profile, "optimizer": config.optimizer_label(),
        "base_optimizer": config.optimizer, "loss": config.loss, "seed": config.seed,
        **{k: v for k, v in final.items() if k not in ("epoch", "step")},
        "diverged_at_step": diverged_at,
        "global_step": global_step, "epochs_completed": len(epochs) and epochs[-1]["epoch"],
        "wall_time_s": elapsed,
        "train_samples_per_s": samples_seen_this_session / session_train_time if session_train_time else None,
        "peak_memory_mb": peak_memory_mb(run.device),
        "skipped_images": skipped_images,
        **start_end_summary(history),  # hook (diagnostics.py): collapse figures at the start and the end
        "git_commit": git_commit(),
    }
    if is_main:
        if status == STATUS_DIVERGED:
            save(epoch, batch_in_epoch)
        write_json(out / "metrics.json", metrics)
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def train_loader(run: Run, items: Dataset, collate, epoch: int, start: int = 0) -> DataLoader:
    """The training DataLoader of ``epoch`` from batch ``start``; its ``batch_sampler`` is an :class:`EpochBatches`.

    ``items`` is the :class:`SeededSamples` view of the training set. Shared by
    the training loop and the throughput benchmarks, so both load alike.
    """
    config = run.config
    sampler = EpochBatches(len(run.train_set), config.batch_size, config.seed, epoch, start=start,
                           rank=run.rank, world_size=run.world_size)
    return DataLoader(items, batch_sampler=sampler, collate_fn=collate,
                      num_workers=config.num_workers, pin_memory=run.device.type == "cuda",
                      # its own generator, so creating a loader leaves the global RNG untouched
                      generator=torch.Generator().manual_seed(config.seed + epoch))


def train_step(run: Run, batch: dict) -> tuple[float, float]:
    """One optimizer step; returns (loss, gradient norm before clipping)."""
    device = run.device
    images = batch["images"].to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    attention_mask = batch["attention_mask"].to(device, non_blocking=True)
    index = batch["index"].to(device, non_blocking=True)
    autocast = (torch.autocast(device.type, dtype=run.amp_dtype) if run.amp_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        image_emb, text_emb = run.model(images, input_ids, attention_mask)
    run.last_embeddings = (image_emb.detach(), text_emb.detach())  # hook (diagnostics.py): read when logging
    loss = run.loss(image_emb.float(), text_emb.float(), index)
    loss_value = loss.item()
    run.optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(loss_value):
        return loss_value, float("nan")
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    max_norm = run.config.grad_clip if run.config.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return loss_value, grad_norm


# ----------------------------------------------------------------------- CLI
def parse_args(argv, prog="python -m clipstudy train"):
    parser = argparse.ArgumentParser(prog=prog, description="Train and evaluate one optimizer x loss cell.")
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--no-progress", action="store_true")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = make_config(args.profile, **overrides_from_args(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from clipstudy.checkpoint import CheckpointWriteError
    from clipstudy.data import DataError

    try:
        metrics = train(config, progress=not args.no_progress)
    except (ConfigError, FileNotFoundError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (CheckpointWriteError, CellBusy) as err:  # the run directory keeps its older checkpoints
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 130
    print(json.dumps(metrics, indent=2))
    return 0 if metrics["status"] == STATUS_COMPLETED else 3


def evaluate_main(argv: list[str]) -> int:
    """``python -m clipstudy evaluate --run DIR [--checkpoint PATH] [--FIELD VALUE ...]``."""
    from clipstudy.checkpoint import CheckpointError, load_verified
    from clipstudy.config import config_from_json

    parser = argparse.ArgumentParser(prog="python -m clipstudy evaluate",
                                     description="Evaluate a saved checkpoint on the run's (or given) data.")
    parser.add_argument("--run", required=True, help="run directory (its config.json is used)")
    parser.add_argument("--checkpoint", help="checkpoint file (default: the newest valid one in RUN/checkpoints)")
    parser.add_argument("--json", action="store_true", help="print only the metrics as JSON")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    run_dir = Path(args.run)
    try:
        base = config_from_json(run_dir / "config.json")
        config = make_config(base.profile, **{**{k: v for k, v in base.to_dict().items() if k != "profile"},
                                              **overrides_from_args(args)})
        if args.checkpoint:
            state = load_verified(args.checkpoint)
        else:
            state, path, warnings = load_latest(run_dir / "checkpoints")
            for msg in warnings:
                print("WARNING:", msg, file=sys.stderr)
            if state is None:
                raise CheckpointError(f"no valid checkpoint in {run_dir / 'checkpoints'}")
    except (ConfigError, CheckpointError, FileNotFoundError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = choose_device(config.device)
    _, retrieval_set, zeroshot_set = build_datasets(config)
    model, tokenizer = build_model_for(config)
    model.load_state_dict(state["model"])
    model.to(device)
    from clipstudy.evaluate import evaluate_all

    metrics = evaluate_all(model, tokenizer, retrieval_set=retrieval_set, zeroshot_set=zeroshot_set,
                           batch_size=config.eval_batch_size, device=device, max_length=config.max_length,
                           progress=not args.json, num_workers=config.num_workers)
    metrics["global_step"] = state["global_step"]
    print(json.dumps(metrics, indent=2))
    return 0
