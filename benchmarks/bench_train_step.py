"""Overhead of a full training step over the bare encoders, for every loss.

For the demo configuration (small CNN + small DistilBERT at 32 px, a real
``Run`` from ``clipstudy.engine.train.build_run`` on a generated demo set and a batch
from the real loader) and the paper configuration (random-init ResNet-50 +
DistilBERT-base at 256 px; on a CPU at a reduced batch), it times side by side:

* ``bare``: the encoders' forward and backward on the batch with a trivial
  loss, ``(0 * (image_emb.sum() + text_emb.sum())).backward()`` (same cost, no update);
* ``step``: ``clipstudy.engine.train.train_step`` (model, loss, optimizer, gradient
  clipping, scheduler, GradScaler, the loss value read back);

and, in the same repeats, the pieces of the difference: the loss's forward and
backward on the batch's embeddings, and the optimizer part (unscale, gradient
norm, optimizer step, scheduler step). Overhead = (step - bare) / bare, from
step - bare differences paired within each round.

The optimizer runs in two implementations side by side: torch's fused kernel
(what ``clipstudy.core.optim.build_optimizer`` picks where it applies) and torch's
default (``foreach=None``: a loop over the tensors on a CPU). On a CPU the paper
configuration runs full steps for AdamW (both implementations), SGD and Adam
on the CLIP loss; the other losses' rows are derived from the CLIP row and each
loss's own measured forward + backward (marked ``derived``).

Usage: ``python benchmarks/bench_train_step.py [--quick] [--threads N] [--paper-batch B]``;
writes ``reports/benchmarks/train_step.json``. ``run(quick)`` does the same from Python.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, machine, median, table, timed, torch_threads, write_json  # noqa: E402

from clipstudy.core.losses import available_losses, make_loss  # noqa: E402
from clipstudy.core.optim import build_optimizer, make_scheduler  # noqa: E402
from clipstudy.core.precision import autocast, choose_amp  # noqa: E402
from clipstudy.engine.build import Run, build_run, choose_device, planned_steps  # noqa: E402
from clipstudy.engine.config import make_config  # noqa: E402
from clipstudy.engine.splits import TEST, VALIDATION, EvalSets  # noqa: E402
from clipstudy.engine.train import train_step  # noqa: E402

DEFAULT_OUT = OUT_DIR / "train_step.json"
GOAL_PERCENT = 10.0
# A small demo set: enough pairs for one batch of the demo profile.
DEMO_DATA = dict(seed=0, image_size=32, train_size=256, retrieval_size=8, zeroshot_per_class=1, zeroshot_classes=2)


# ---------------------------------------------------------------- the runs
def demo_run(
    data_dir: Path, out: Path, loss: str, optimizer: str, device: str, optimizer_params: dict | None = None
) -> tuple[Run, dict]:
    """A real demo-profile ``Run`` (``build_run``) and its first training batch from the real loader."""
    from torch.utils.data import DataLoader

    from clipstudy.data.datasets import make_collate
    from clipstudy.data.sampling import EpochBatches, SeededSamples

    # speed only: random towers, so the benchmark does not pretrain the demo towers first
    config = make_config(
        "demo",
        pretrained=False,
        data=str(data_dir),
        out=str(out),
        loss=loss,
        optimizer=optimizer,
        device=device,
        optimizer_params=optimizer_params or {},
    )
    run = build_run(config, out)
    loader = DataLoader(
        SeededSamples(run.train_set, config.seed),
        batch_sampler=EpochBatches(len(run.train_set), config.batch_size, config.seed, 0),
        collate_fn=make_collate(run.tokenizer, config.max_length),
    )
    return run, next(iter(loader))


def paper_model(device: torch.device) -> torch.nn.Module:
    """Random-init ResNet-50 + DistilBERT-base (vocabulary 30522), projected to 256-d: the paper towers."""
    from transformers import DistilBertConfig, DistilBertModel

    from clipstudy.core.models import DualEncoder, TextTower, resnet50_trunk

    torch.manual_seed(0)
    model = DualEncoder(resnet50_trunk(pretrained=False), TextTower(DistilBertModel(DistilBertConfig())), 256)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def paper_batch(
    batch_size: int, image_size: int = 256, length: int = 30, vocab: int = 30522, num_samples: int = 100_000
) -> dict:
    """A synthetic batch shaped like the paper's: images, padded token ids of caption-like lengths, indices."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, length + 1, (batch_size,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, vocab, (batch_size, length), generator=g) * mask
    return {
        "images": torch.randn(batch_size, 3, image_size, image_size, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "index": torch.randperm(num_samples, generator=g)[:batch_size],
        "skipped": 0,
    }


def paper_run(
    model,
    loss: str,
    optimizer: str,
    batch_size: int,
    device: torch.device,
    num_samples: int = 100_000,
    optimizer_params: dict | None = None,
) -> Run:
    """A paper-profile ``Run`` assembled as ``build_run`` does, around an existing model."""
    config = make_config(
        "paper",
        loss=loss,
        optimizer=optimizer,
        pretrained=False,
        batch_size=batch_size,
        device=str(device),
        optimizer_params=optimizer_params or {},
    )
    loss_fn = make_loss(config.loss, temperature=config.temperature, num_samples=num_samples, **config.loss_params).to(
        device
    )
    opt = build_optimizer(
        config.optimizer,
        model,
        loss_fn,
        lr=config.lr or None,
        weight_decay=config.weight_decay,
        **config.optimizer_params,
    )
    steps, stop = planned_steps(config, num_samples // batch_size)
    scheduler = make_scheduler(
        opt, total_steps=steps, warmup_steps=num_samples // batch_size, warmup_lr=config.warmup_lr, min_lr=config.min_lr
    )
    amp_dtype = choose_amp(config.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return Run(
        config=config,
        out=Path("."),
        device=device,
        model=model,
        tokenizer=None,
        loss=loss_fn,
        optimizer=opt,
        scheduler=scheduler,
        scaler=scaler,
        train_set=None,
        validation=EvalSets(VALIDATION),
        test=EvalSets(TEST),
        steps_per_epoch=num_samples // batch_size,
        total_steps=steps,
        stop_step=stop,
        amp_dtype=amp_dtype,
    )


# ---------------------------------------------------------------- the pieces
def _inputs(run: Run, batch: dict):
    device = run.device
    images = batch["images"].to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return (images, batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["index"].to(device))


def bare_forward_backward(run: Run, inputs) -> None:
    """The encoders alone: forward, trivial loss, backward (gradients are left for the optimizer part).

    The trivial loss is multiplied by zero: the backward pass costs the same (dense kernels do
    not skip zeros), but the optimizer part then leaves the weights where the real steps put
    them. Without it the gradient of a plain sum pushes every weight the same way on every
    round until SGD's momentum blows the model up and the timed steps turn non-finite.
    """
    images, ids, mask, _ = inputs
    with autocast(run.device, run.amp_dtype):
        image_emb, text_emb = run.model(images, ids, mask)
    (0.0 * (image_emb.float().sum() + text_emb.float().sum())).backward()


def optimizer_part(run: Run) -> None:
    """What train_step does after backward: unscale, gradient norm, optimizer and scheduler step."""
    run.scaler.unscale_(run.optimizer)
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, float("inf"))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def loss_part(run: Run, image_emb: torch.Tensor, text_emb: torch.Tensor, index: torch.Tensor) -> None:
    """The loss's forward and backward on fixed embeddings of the batch's size."""
    image = image_emb.detach().requires_grad_(True)
    text = text_emb.detach().requires_grad_(True)
    run.loss(image, text, index).backward()


def time_run(run: Run, batch: dict, repeats: int, warmup: int) -> dict:
    """Interleaved medians (ms) of bare, step, loss and optimizer parts for one Run."""
    device = run.device
    run.model.train()
    inputs = _inputs(run, batch)
    with torch.no_grad(), autocast(run.device, run.amp_dtype):
        image_emb, text_emb = (e.float() for e in run.model(*inputs[:3]))
    times = {"bare": [], "optimizer": [], "step": [], "loss": []}
    losses = []
    for r in range(warmup + repeats):
        order = ["bare", "step"] if r % 2 == 0 else ["step", "bare"]
        record = {}
        for kind in order:
            if kind == "bare":
                run.optimizer.zero_grad(set_to_none=True)
                record["bare"] = timed(lambda: bare_forward_backward(run, inputs), device)
                record["optimizer"] = timed(lambda: optimizer_part(run), device)
            else:
                record["step"] = timed(lambda: losses.append(train_step(run, batch)[0]), device)
        record["loss"] = timed(lambda: loss_part(run, image_emb, text_emb, inputs[3]), device)  # noqa: B023 (called at once)
        if r >= warmup:
            for key, value in record.items():
                times[key].append(value)
    ms = {key: 1e3 * median(values) for key, values in times.items()}
    # the overhead from differences paired within a round: robust to load drifting between rounds
    overhead = 1e3 * median([s - b for s, b in zip(times["step"], times["bare"])])
    return {
        "bare_ms": ms["bare"],
        "step_ms": ms["step"],
        "overhead_ms": overhead,
        "overhead_percent": 100.0 * overhead / ms["bare"],
        "loss_ms": ms["loss"],
        "optimizer_ms": ms["optimizer"],
        "other_ms": overhead - ms["loss"] - ms["optimizer"],
        "loss_finite": all(v == v and abs(v) != float("inf") for v in losses),
        "repeats": repeats,
    }


# ---------------------------------------------------------------- the benchmark
# Optimizer implementations compared: torch's fused kernel (clipstudy's choice where it applies)
# and torch's own default (``foreach=None``: a per-tensor loop on CPU, multi-tensor ops on CUDA).
IMPLEMENTATIONS = {"fused": {}, "torch default": {"foreach": None}}


def _cases(config: str, quick: bool) -> list[tuple[str, str, str]]:
    """(optimizer, loss, implementation) rows of full steps.

    Demo: every loss with AdamW, then each optimizer on CLIP in both implementations.
    Paper: AdamW on CLIP in both implementations, SGD and Adam fused; the other losses
    are derived from the CLIP row (see :func:`bench_paper`), since a step there costs seconds
    on a CPU while a loss at its batch costs milliseconds.
    """
    if config == "paper":
        rows = [("adamw", "clip", "fused"), ("adamw", "clip", "torch default")]
        return rows if quick else rows + [("sgd", "clip", "fused"), ("adam", "clip", "fused")]
    losses = ["clip", "sogclr"] if quick else available_losses()
    optimizers = ["adamw"] if quick else ["adamw", "sgd", "adam"]
    rows = [("adamw", loss, "fused") for loss in losses]
    return rows + [
        (opt, "clip", impl) for opt in optimizers for impl in IMPLEMENTATIONS if (opt, "clip", impl) not in rows
    ]


def bench_demo(quick: bool, device: torch.device) -> list[dict]:
    from clipstudy.data.demo import make_demo_data

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_data(Path(tmp) / "data", **DEMO_DATA)
        for optimizer, loss, impl in _cases("demo", quick):
            run, batch = demo_run(
                Path(tmp) / "data", Path(tmp) / "run", loss, optimizer, str(device), IMPLEMENTATIONS[impl]
            )
            result = time_run(run, batch, repeats=5 if quick else 15, warmup=2)
            rows.append(
                {
                    "config": "demo",
                    "optimizer": optimizer,
                    "implementation": impl,
                    "loss": loss,
                    "derived": False,
                    "batch": int(batch["index"].numel()),
                    "image_size": run.config.image_size,
                    **result,
                }
            )
            del run
    return rows


def bench_paper(quick: bool, device: torch.device, batch_size: int) -> list[dict]:
    """Full steps for :func:`_cases`, then one derived row per other loss.

    A derived row times only that loss's forward + backward on the batch's embeddings
    and takes the rest of the overhead (optimizer, bookkeeping) from the measured
    AdamW + CLIP row: ``overhead = clip overhead - clip loss + this loss``.
    """
    model = paper_model(device)
    batch = paper_batch(batch_size)
    rows = []
    for optimizer, loss, impl in _cases("paper", quick):
        run = paper_run(model, loss, optimizer, batch_size, device, optimizer_params=IMPLEMENTATIONS[impl])
        result = time_run(run, batch, repeats=2, warmup=1)
        rows.append(
            {
                "config": "paper",
                "optimizer": optimizer,
                "implementation": impl,
                "loss": loss,
                "batch": batch_size,
                "image_size": 256,
                "derived": False,
                **result,
            }
        )
        del run
        gc.collect()
    clip = rows[0]
    inputs = _inputs(paper_run(model, "clip", "adamw", batch_size, device), batch)
    with torch.no_grad():
        image_emb, text_emb = (e.float() for e in model(*inputs[:3]))
    for loss in [] if quick else [name for name in available_losses() if name != "clip"]:
        run = paper_run(model, loss, "adamw", batch_size, device)
        times = [timed(lambda: loss_part(run, image_emb, text_emb, inputs[3]), device) for _ in range(6)]  # noqa: B023 (called at once)
        loss_ms = 1e3 * median(times[1:])
        overhead = clip["overhead_ms"] - clip["loss_ms"] + loss_ms
        rows.append(
            {
                "config": "paper",
                "optimizer": "adamw",
                "implementation": "fused",
                "loss": loss,
                "batch": batch_size,
                "image_size": 256,
                "derived": True,
                "bare_ms": clip["bare_ms"],
                "step_ms": clip["bare_ms"] + overhead,
                "overhead_ms": overhead,
                "overhead_percent": 100.0 * overhead / clip["bare_ms"],
                "loss_ms": loss_ms,
                "optimizer_ms": clip["optimizer_ms"],
                "other_ms": clip["other_ms"],
                "loss_finite": True,
            }
        )
    n_params = sum(p.numel() for p in model.parameters())
    for row in rows:
        row["parameters"] = n_params
    return rows


def run(
    quick: bool = False,
    out: str | Path | None = DEFAULT_OUT,
    threads: int | None = 1,
    paper_batch_size: int | None = None,
    device: str = "auto",
) -> dict:
    """Time both configurations; returns (and writes to ``out``) the results.

    Args:
        quick: two losses on the demo configuration and the CLIP loss on the
            paper one, fewer repeats.
        threads: torch threads while timing (default 1; None keeps torch's setting).
        paper_batch_size: batch of the paper configuration (default 4 on CPU, 128 on CUDA).
    """
    dev = choose_device(device)
    batch_size = paper_batch_size or (128 if dev.type == "cuda" else (2 if quick else 4))
    with torch_threads(threads):
        rows = bench_demo(quick, dev) + bench_paper(quick, dev, batch_size)
        info = machine()
    worst = {
        cfg: max(r["overhead_percent"] for r in rows if r["config"] == cfg and r["implementation"] == "fused")
        for cfg in ("demo", "paper")
    }
    results = {
        "benchmark": "train_step",
        "quick": quick,
        "device": str(dev),
        **info,
        "goal_overhead_percent": GOAL_PERCENT,
        "worst_overhead_percent": worst,
        "rows": rows,
    }
    write_json(results, out)
    return results


def print_results(results: dict) -> None:
    print(
        f"training step vs bare encoders ({results['device']}, {results['torch_threads']} thread(s)); "
        f"overhead = (step - bare) / bare, goal <= {results['goal_overhead_percent']:.0f}%"
    )
    print(
        table(
            results["rows"],
            [
                ("config", "config", "{}"),
                ("optimizer", "optimizer", "{}"),
                ("implementation", "implementation", "{}"),
                ("loss", "loss", "{}"),
                ("derived", "derived", "{}"),
                ("batch", "batch", "{}"),
                ("bare_ms", "bare ms", "{:.1f}"),
                ("step_ms", "step ms", "{:.1f}"),
                ("overhead_percent", "overhead %", "{:+.1f}"),
                ("loss_ms", "loss ms", "{:.2f}"),
                ("optimizer_ms", "optim ms", "{:.2f}"),
                ("other_ms", "other ms", "{:+.2f}"),
            ],
        )
    )
    for cfg in ("demo", "paper"):
        for opt in ("adamw", "sgd", "adam"):
            pair = {
                r["implementation"]: r
                for r in results["rows"]
                if r["config"] == cfg and r["optimizer"] == opt and r["loss"] == "clip"
            }
            if len(pair) == 2:
                print(
                    f"{cfg} {opt}: optimizer part torch default / fused = "
                    f"{pair['torch default']['optimizer_ms'] / pair['fused']['optimizer_ms']:.1f} x; overhead "
                    f"{pair['torch default']['overhead_percent']:+.1f}% -> {pair['fused']['overhead_percent']:+.1f}%"
                )
    print(
        "worst overhead with the fused optimizers: "
        + ", ".join(f"{k} {v:+.1f}%" for k, v in results["worst_overhead_percent"].items())
    )
    if not all(r["loss_finite"] for r in results["rows"]):
        print("WARNING: a loss was not finite during timing (its step skipped backward); numbers are off")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two losses, paper batch 2, fewer repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 keeps torch's)")
    parser.add_argument("--paper-batch", type=int, default=None, help="paper batch (default 4 on CPU, 128 on CUDA)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    results = run(args.quick, args.out, args.threads or None, args.paper_batch, args.device)
    print_results(results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
