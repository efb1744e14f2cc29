"""The ``train`` and ``evaluate`` commands (``python -m clipstudy train|evaluate``).

Failures are raised as :mod:`clipstudy.errors` classes; the dispatcher
(``python -m clipstudy``) prints them as one line with their exit status.
Nothing here imports torch before the arguments are parsed, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from clipstudy.engine.config import PROFILES, add_config_arguments, make_config, overrides_from_args, profile_named_in


# ----------------------------------------------------------------------- CLI
def parse_args(argv, prog="python -m clipstudy train"):
    parser = argparse.ArgumentParser(prog=prog, description="Train and evaluate one optimizer x loss cell.")
    parser.add_argument(
        "--profile",
        default="demo",
        choices=sorted(PROFILES),
        help="built-in setting the fields start from; the defaults below are this profile's (default demo)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(parser, profile_named_in(argv, "demo"))
    return parser.parse_args(argv)


def train_main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = make_config(args.profile, **overrides_from_args(args))
    from clipstudy.engine import records
    from clipstudy.engine.train import train

    metrics = train(config, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one copy of the result
        print(json.dumps(metrics, indent=2))
    return 0 if metrics["status"] == records.COMPLETED else 3


def list_main(argv: list[str]) -> int:
    """``python -m clipstudy list``: the registered losses and optimizers, read from their registries."""
    argparse.ArgumentParser(
        prog="python -m clipstudy list",
        description="List the registered losses and optimizers: name, display name, default grid, what each is.",
    ).parse_args(argv)
    from clipstudy.core.losses import LOSSES, loss_help, losses_in_order
    from clipstudy.core.optim import OPTIMIZERS, optimizers_in_order

    print("losses (train --loss NAME; * = in the default grid of `sweep`):")
    for name in losses_in_order():
        mark = "*" if LOSSES[name].in_default_grid else " "
        print(f"  {mark} {name:<10} {LOSSES[name].display_name:<10} {loss_help(name)}")
    print("optimizers (train --optimizer NAME; default learning rate when --lr is 0):")
    for name in optimizers_in_order():
        spec = OPTIMIZERS[name]
        mark = "*" if spec.in_default_grid else " "
        print(f"  {mark} {name:<10} {spec.display_name:<10} lr {spec.default_lr:g}  {spec.description.splitlines()[0]}")
    from clipstudy.study.variants import VARIANTS

    print("optimizer variants (sweep --optimizers NAME; more with sweep --variant):")
    for name, variant in VARIANTS.items():
        fields = ", ".join(f"{key}={value}" for key, value in variant.fields.items())
        print(f"    {name:<14} {variant.display_name:<18} {fields}")
    return 0


def evaluate_main(argv: list[str]) -> int:
    """``python -m clipstudy evaluate --run DIR [--checkpoint PATH] [--FIELD VALUE ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m clipstudy evaluate", description="Evaluate a saved checkpoint on the run's (or given) data."
    )
    parser.add_argument("--run", required=True, help="run directory (its config.json is used)")
    parser.add_argument("--checkpoint", help="checkpoint file (default: the newest valid one in RUN/checkpoints)")
    parser.add_argument("--json", action="store_true", help="print only the metrics as JSON")
    add_config_arguments(parser, None)
    args = parser.parse_args(argv)
    config = run_config(Path(args.run), overrides_from_args(args))
    from clipstudy.engine.preflight import check_inputs

    check_inputs(config)
    state = run_checkpoint(Path(args.run), args.checkpoint)
    from clipstudy.core import precision
    from clipstudy.engine.train import build_datasets, build_model_for, choose_device

    device = choose_device(config.device)
    _, retrieval_set, zeroshot_set = build_datasets(config)
    model, tokenizer = build_model_for(config)
    model.load_state_dict(state["model"])
    model.to(device)
    from clipstudy.engine.evaluate import evaluate_all

    metrics = evaluate_all(
        model,
        tokenizer,
        retrieval_set=retrieval_set,
        zeroshot_set=zeroshot_set,
        batch_size=config.eval_batch_size,
        device=device,
        max_length=config.max_length,
        progress=not args.json,
        num_workers=config.num_workers,
        amp=precision.choose_amp(config.amp, device),
    )  # the precision training evaluates with
    metrics["global_step"] = state["global_step"]
    print(json.dumps(metrics, indent=2))
    return 0


def report_main(argv: list[str]) -> int:
    """``python -m clipstudy report``: render the analysis notebook (pandas is imported after parsing)."""
    from clipstudy import paths
    from clipstudy.errors import StartupError

    parser = argparse.ArgumentParser(
        prog="python -m clipstudy report", description="Render the analysis notebook to reports/<profile>/report.html."
    )
    parser.add_argument("--profile", default="demo", help="profile whose runs to report (default demo)")
    parser.add_argument("--runs", default=None, help="runs folder (default reports/runs/<profile>)")
    parser.add_argument("--out", default=None, help="output folder (default reports/<profile>)")
    args = parser.parse_args(argv)
    runs = Path(args.runs) if args.runs else paths.runs_dir(args.profile)
    out = Path(args.out) if args.out else paths.reports_dir(args.profile)
    if not runs.is_dir() or not any(runs.glob("*/metrics.json")):
        raise StartupError(
            f"--runs {runs}: no finished runs there; run `make sweep PROFILE={args.profile}` "
            "(or `make demo`) first, or pass --runs DIR"
        )
    from clipstudy.study.report import render

    html = render(args.profile, runs, out)
    print(f"wrote {html} and {out / 'results.csv'}")
    return 0


def fetch_weights_main(argv: list[str]) -> int:
    """``python -m clipstudy fetch-weights``: download what a profile loads into the local caches."""
    from clipstudy.engine.config import CHOICES, make_config
    from clipstudy.errors import RunFailure
    from clipstudy.paths import DISTILBERT_ENV, RESNET50_ENV

    parser = argparse.ArgumentParser(
        prog="python -m clipstudy fetch-weights",
        description="Download the pretrained weights a profile loads "
        "(paper: timm ResNet-50 resnet50.a1_in1k and DistilBERT).",
    )
    parser.add_argument(
        "--profile", default="paper", choices=sorted(PROFILES), help="fetch what this profile loads (default paper)"
    )
    parser.add_argument(
        "--image-weights",
        choices=CHOICES["image_weights"],
        default=None,
        help="ResNet-50 weights to fetch instead of the profile's",
    )
    parser.add_argument(
        "--dest",
        help="also save plain copies here; then set "
        f"{RESNET50_ENV}=DEST/resnet50-<weights>.pth and {DISTILBERT_ENV}=DEST/distilbert",
    )
    args = parser.parse_args(argv)
    from clipstudy.core.models import fetch_weights, weights_needed

    needed = weights_needed(make_config(args.profile))
    image_weights = args.image_weights or needed["resnet50"]
    if image_weights is None and not needed["distilbert"]:
        print(f"profile {args.profile!r} loads no pretrained weights; nothing to fetch")
        return 0
    try:
        for path in fetch_weights(args.dest, image_weights=image_weights, distilbert=needed["distilbert"]):
            print("saved", path)
    except Exception as err:  # network errors come in many types
        raise RunFailure(
            f"fetch-weights: download failed ({err}); this command needs internet access "
            "(huggingface.co, and download.pytorch.org for the torchvision weights)"
        ) from err
    return 0


def run_config(run_dir: Path, overrides: dict):
    """The configuration a run was trained with (its config.json), with ``overrides``."""
    from clipstudy.engine.config import ConfigError, config_from_json

    record = run_dir / "config.json"
    try:
        base = config_from_json(record)
    except FileNotFoundError:
        raise ConfigError(
            f"--run {run_dir}: no config.json there; pass the folder of a training run "
            f"(e.g. reports/runs/<profile>/<cell>)"
        ) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{record}: not valid JSON ({err}); the run's record is damaged") from None
    return make_config(base.profile, **{**{k: v for k, v in base.to_dict().items() if k != "profile"}, **overrides})


def run_checkpoint(run_dir: Path, checkpoint: str | None) -> dict:
    """The checkpoint to evaluate: ``checkpoint``, else the newest valid one of the run."""
    import sys

    from clipstudy.engine.checkpoint import CheckpointError, load_latest, load_verified

    if checkpoint:
        return load_verified(checkpoint)
    state, _, warnings = load_latest(run_dir / "checkpoints")
    for msg in warnings:
        print("WARNING:", msg, file=sys.stderr)
    if state is None:
        raise CheckpointError(
            f"--run {run_dir}: no valid checkpoint in {run_dir / 'checkpoints'}; "
            "train the run first (rerun its train command)"
        )
    return state
