"""Train and evaluate one optimizer x loss cell.

Read top to bottom: :func:`train` takes the run directory's lock,
:func:`build_run` makes the data, model, loss, optimizer and schedule,
:func:`clipstudy.engine.runstate.resume` continues from the newest valid checkpoint
if there is one, then :func:`train_epochs` loops: training steps
(:func:`train_step`, with a divergence guard), an evaluation at each epoch
end, a checkpoint at every epoch end and on SIGTERM / SIGINT. The run
directory's files (see docs/reference.md, "Run directory"): ``config.json``,
``metrics.json``, ``history.csv``, ``epochs.csv`` and ``checkpoints/``; what
they hold is defined in :mod:`clipstudy.engine.records`.

The data order and augmentation are reproducible across resumes
(:mod:`clipstudy.data.sampling`); the command line is in :mod:`clipstudy.cli.commands`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from clipstudy.core.diagnostics import start_end_summary, step_diagnostics
from clipstudy.core.distributed import unwrap_model
from clipstudy.core.precision import autocast
from clipstudy.data.sampling import SeededSamples, batches_keeping_rng, train_loader
from clipstudy.engine import records
from clipstudy.engine.build import (
    Run,
    build_run,
    peak_memory_mb,
    run_directory,
    wrap_distributed,
)
from clipstudy.engine.checkpoint import remove_stale_temporaries, save_checkpoint
from clipstudy.engine.config import ConfigError, RunConfig
from clipstudy.engine.fingerprint import fingerprint as fingerprint_of
from clipstudy.engine.preflight import check_inputs
from clipstudy.engine.runstate import StopRequest, already_complete, capture_state, resume
from clipstudy.engine.splits import EvalSets, score
from clipstudy.engine.tensorboard_log import TensorBoardLog
from clipstudy.fileio import CellBusy, cell_lock

log = logging.getLogger("clipstudy.engine.train")


def evaluate_run(run: Run, sets: EvalSets) -> dict:
    """The scores of ``sets`` (validation or test) for the model as it is now, named with the split's prefix."""
    return score(unwrap_model(run.model), run.tokenizer, sets, run.config, device=run.device, amp=run.amp_dtype)


@dataclass
class LoopState:
    """Where the run stands; checkpointed with the model so a resume continues from it."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    elapsed: float = 0.0  # seconds trained by earlier sessions
    status: str = records.COMPLETED
    diverged_at: int | None = None
    skipped_images: int = 0
    samples_seen: int = 0  # this session
    train_time: float = 0.0  # this session: step + data time
    session_start: float = 0.0


# ------------------------------------------------------------------ training
def train(config: RunConfig, *, progress: bool = True) -> dict:
    """Train one cell to completion (or resume it); return ``metrics.json``'s content.

    An exception other than an interruption or a refused configuration is
    recorded as status ``failed`` in ``metrics.json`` (with the error) and raised again.
    Missing data or weights are refused first, with nothing written.
    """
    check_inputs(config)
    try:
        return _train(config, progress=progress)
    except (KeyboardInterrupt, ConfigError, CellBusy):
        raise
    except Exception as err:
        out = run_directory(config)
        if int(os.environ.get("RANK", "0")) == 0 and out.is_dir():
            try:
                records.write_metrics(
                    out, records.failure_metrics(**records.cell_fields(config), error=f"{type(err).__name__}: {err}")
                )
            except OSError:  # e.g. the disk that made the run fail is still full
                pass
        raise


def _train(config: RunConfig, *, progress: bool = True) -> dict:
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
            raise ConfigError(
                f"config field 'out'={str(out)!r}: cannot create the run directory "
                f"({err.strerror or err}); choose a folder you can write to"
            ) from err
    with cell_lock(out) if rank == 0 else contextlib.nullcontext():
        return _train_locked(config, out, rank, world_size, progress)


def _train_locked(config: RunConfig, out: Path, rank: int, world_size: int, progress: bool) -> dict:
    is_main = rank == 0
    fingerprint = fingerprint_of(config)
    done = already_complete(out, config, fingerprint, announce=is_main)  # refuses other settings or data
    if done is not None:
        return done
    run = build_run(config, out, rank, world_size)
    wrap_distributed(run)
    point = resume(run, out, announce=is_main)  # refuses another format or configuration, writing nothing
    state = LoopState(session_start=time.perf_counter())
    history, epochs = [], []
    if point is not None:
        state.epoch, state.batch_in_epoch, state.global_step = point.epoch, point.batch_in_epoch, point.global_step
        state.elapsed = point.elapsed
        history, epochs = point.history, point.epochs
    board = TensorBoardLog(out, enabled=is_main and config.tensorboard, resume_step=state.global_step)
    log_rows = records.RunLog(out, history, epochs, board=board)
    if is_main:  # the checks passed: now the run may change its directory
        for stale in remove_stale_temporaries(out / "checkpoints") + remove_stale_temporaries(out):
            print(f"removed {stale.name}, left by an interrupted write", file=sys.stderr)
        if point is None:
            records.write_run_config(
                out, config, device=run.device, world_size=world_size, command=sys.argv, fingerprint=fingerprint
            )
        else:
            records.record_resume(
                out,
                config,
                device=run.device,
                world_size=world_size,
                command=sys.argv,
                when=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                fingerprint=fingerprint,
            )
    try:
        train_epochs(run, state, log_rows, progress)
    finally:
        log_rows.close()
    if state.status == records.INTERRUPTED:
        if world_size > 1:
            torch.distributed.destroy_process_group()
        raise KeyboardInterrupt(
            f"interrupted; checkpoint saved in {out / 'checkpoints'}: rerun the same command to resume"
        )
    return finish(run, state, log_rows, fingerprint["digest"])


def save(run: Run, state: LoopState, log_rows: records.RunLog) -> None:
    """Checkpoint at the current position and write the CSV logs (rank 0 only)."""
    if run.rank != 0:
        return
    elapsed = state.elapsed + time.perf_counter() - state.session_start
    save_checkpoint(
        run.out / "checkpoints",
        state.global_step,
        capture_state(
            run, state.epoch, state.batch_in_epoch, state.global_step, log_rows.history, log_rows.epochs, elapsed
        ),
        keep=run.config.keep_checkpoints,
    )
    log_rows.flush()


def train_epochs(run: Run, state: LoopState, log_rows: records.RunLog, progress: bool) -> None:
    """Epochs from ``state`` until the last, ``max_steps``, divergence or a stop signal."""
    from tqdm.auto import tqdm

    from clipstudy.data.datasets import DataError, make_collate

    config = run.config
    items = SeededSamples(run.train_set, config.seed)
    collate = make_collate(run.tokenizer, max_length=config.max_length)
    bar = tqdm(
        total=run.stop_step,
        initial=state.global_step,
        desc=config.cell_name(),
        unit="step",
        disable=not (progress and run.rank == 0),
        dynamic_ncols=True,
        mininterval=1.0,
    )
    with StopRequest() as stop:
        while state.epoch < config.epochs and state.global_step < run.stop_step and state.status == records.COMPLETED:
            loader = train_loader(run, items, collate, state.epoch, start=state.batch_in_epoch)
            steps = train_one_epoch(run, state, log_rows, loader, stop, bar)
            if state.status != records.COMPLETED:
                break
            if steps == 0 and len(loader.batch_sampler) > 0:
                paths_ = config.resolved_paths()
                raise DataError(
                    f"epoch {state.epoch + 1} had no usable batch: every image read failed (see the warnings "
                    f"above). Run `python -m clipstudy check-data --train-ann {paths_['train_ann']} "
                    f"--train-images {paths_['train_images']}` to list the unreadable files"
                )
            if state.batch_in_epoch >= run.steps_per_epoch:  # else max_steps cut the epoch: resume mid-epoch
                state.epoch += 1
                state.batch_in_epoch = 0
            end_of_epoch(run, state, log_rows, progress)
    bar.close()


def train_one_epoch(run: Run, state: LoopState, log_rows: records.RunLog, loader, stop, bar) -> int:
    """The steps of one epoch from ``state.batch_in_epoch``; returns how many steps ran."""
    run.model.train()
    steps = 0
    t_data = time.perf_counter()
    for batch in batches_keeping_rng(loader):
        data_time = time.perf_counter() - t_data
        t_step = time.perf_counter()
        state.skipped_images += batch["skipped"]
        if batch["index"].numel() < 2 and run.world_size == 1:
            state.batch_in_epoch += 1  # nothing readable in this batch: counted, logged, skipped
            log.warning("skipping a batch with %d readable images", batch["index"].numel())
            continue
        loss_value, grad_norm = train_step(run, batch)
        steps += 1
        state.global_step += 1
        state.batch_in_epoch += 1
        step_time = time.perf_counter() - t_step
        n = batch["index"].numel() * run.world_size
        state.samples_seen += n
        state.train_time += step_time + data_time
        if not math.isfinite(loss_value):
            state.status, state.diverged_at = records.DIVERGED, state.global_step
            print(f"loss is {loss_value} at step {state.global_step}: stopping as diverged", file=sys.stderr)
            break
        lr = run.optimizer.param_groups[0]["lr"]
        samples_per_s = n / max(step_time + data_time, 1e-9)
        if state.global_step % run.config.log_every == 0 or state.global_step == run.stop_step:
            row = {
                "step": state.global_step,
                "epoch": state.epoch + state.batch_in_epoch / run.steps_per_epoch,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "samples_per_s": samples_per_s,
                "data_time": data_time,
                "step_time": step_time,
            }
            row.update({k: float(v) for k, v in run.loss.extra_metrics().items()})
            row.update(step_diagnostics(run))  # collapse figures of this step (clipstudy.core.diagnostics)
            log_rows.log_step(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.0f}", refresh=False)
        if stop.signal is not None:
            save(run, state, log_rows)
            state.status = records.INTERRUPTED
            break
        if state.global_step >= run.stop_step:
            break
        t_data = time.perf_counter()
    return steps


def end_of_epoch(run: Run, state: LoopState, log_rows: records.RunLog, progress: bool) -> None:
    """Evaluate (every ``eval_every`` epochs, at the end and where ``max_steps`` cuts), then checkpoint.

    The ``epoch`` of an evaluation is fractional where ``max_steps`` cut an epoch.
    """
    from tqdm.auto import tqdm

    config = run.config
    last = state.epoch == config.epochs or state.global_step >= run.stop_step
    if run.rank == 0 and run.validation and (state.epoch % config.eval_every == 0 or last):
        t_eval = time.perf_counter()
        metrics = evaluate_run(run, run.validation)
        epoch = state.epoch + state.batch_in_epoch / run.steps_per_epoch if state.batch_in_epoch else state.epoch
        log_rows.log_epoch(
            {"epoch": epoch, "step": state.global_step, **metrics, "eval_time": time.perf_counter() - t_eval}
        )
        if progress:
            tqdm.write(
                f"epoch {epoch:g}: "
                + ", ".join(f"{k}={metrics[k]:.2f}" for k in records.VALIDATION_HEADLINE if k in metrics),
                file=sys.stderr,
            )
    if run.world_size > 1:
        torch.distributed.barrier()
    save(run, state, log_rows)


def finish(run: Run, state: LoopState, log_rows: records.RunLog, fingerprint: str) -> dict:
    """Write ``metrics.json`` of a run that completed (maybe cut by ``max_steps``) or diverged; return it."""
    epochs = log_rows.epochs
    final_scores = {}
    if state.status == records.COMPLETED:
        final_scores = dict(epochs[-1]) if epochs else {}  # the last validation scores
        if run.rank == 0 and run.test:  # the test sets, scored once, here
            final_scores.update(evaluate_run(run, run.test))
    metrics = records.run_metrics(
        run.config,
        status=state.status,
        final_scores=final_scores,
        diverged_at_step=state.diverged_at,
        global_step=state.global_step,
        steps_total=run.total_steps,
        truncated=state.epoch < run.config.epochs,
        epochs_completed=state.epoch,
        fingerprint=fingerprint,
        wall_time_s=state.elapsed + time.perf_counter() - state.session_start,
        train_samples_per_s=state.samples_seen / state.train_time if state.train_time else None,
        peak_memory_mb=peak_memory_mb(run.device),
        skipped_images=state.skipped_images,
    )
    metrics.update(start_end_summary(log_rows.history))  # collapse figures at the start and the end
    if run.rank == 0:
        if state.status == records.DIVERGED:
            save(run, state, log_rows)
        records.write_metrics(run.out, metrics)
    if run.world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def train_step(run: Run, batch: dict) -> tuple[float, float]:
    """One optimizer step; returns (loss, gradient norm before clipping)."""
    device = run.device
    images = batch["images"].to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    attention_mask = batch["attention_mask"].to(device, non_blocking=True)
    index = batch["index"].to(device, non_blocking=True)
    with autocast(device, run.amp_dtype):
        image_emb, text_emb = run.model(images, input_ids, attention_mask)
    run.last_embeddings = (image_emb.detach(), text_emb.detach())  # read by step_diagnostics when logging
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
