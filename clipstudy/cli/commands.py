"""The ``train``, ``evaluate``, ``list``, ``report`` and ``fetch-weights`` commands (``python -m clipstudy ...``).

Failures are raised as :mod:`clipstudy.errors` classes; the dispatcher
(``python -m clipstudy``) prints them as one line with their exit status.
Nothing here imports torch before the arguments are parsed, so ``--help`` is quick.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from clipstudy.arguments import CommandParser
from clipstudy.data.layout import DATA_PATH_FIELDS
from clipstudy.engine.config import (
    PROFILES,
    RunConfig,
    add_config_arguments,
    field_help,
    make_config,
    overrides_from_args,
    profile_named_in,
)


# ----------------------------------------------------------------------- CLI
def parse_args(argv, prog="python -m clipstudy train"):
    parser = CommandParser(prog=prog, description="Train and evaluate one optimizer x loss cell.")
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
    CommandParser(
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
    parser = CommandParser(
        prog="python -m clipstudy evaluate", description="Evaluate a saved checkpoint on the run's (or given) data."
    )
    parser.add_argument("--run", required=True, help="run directory (its config.json is used)")
    parser.add_argument("--checkpoint", help="checkpoint file (default: the newest valid one in RUN/checkpoints)")
    parser.add_argument("--json", action="store_true", help="print only the metrics as JSON")
    parser.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="the sets to score: test (as a run's final scores) or validation (as its epochs.csv); default test",
    )
    add_evaluation_arguments(parser)
    args = parser.parse_args(argv)
    config = run_config(Path(args.run), overrides_from_args(args))
    from clipstudy.engine.preflight import check_inputs

    check_inputs(config)
    state = run_checkpoint(Path(args.run), args.checkpoint)
    from clipstudy.core import precision
    from clipstudy.engine.build import build_model_for, choose_device
    from clipstudy.engine.splits import build_eval_sets, score

    device = choose_device(config.device)
    sets = build_eval_sets(config, args.split)
    model, tokenizer = build_model_for(config)
    model.load_state_dict(state["model"])
    model.to(device)
    # the precision training evaluates with; the scores named as the run names them (val_ for validation)
    amp = precision.choose_amp(config.amp, device)
    metrics = score(model, tokenizer, sets, config, device=device, amp=amp, progress=not args.json)
    metrics["global_step"] = state["global_step"]
    print(json.dumps(metrics, indent=2))
    return 0


# The fields evaluation reads; the rest of the configuration is the run's (its checkpoint fixes the model).
EVALUATION_FIELDS = (
    "data",
    *DATA_PATH_FIELDS,
    "zeroshot_transform",
    "eval_batch_size",
    "num_workers",
    "cache_images",
    "device",
    "amp",
)


def add_evaluation_arguments(parser) -> None:
    """``--FIELD`` options for :data:`EVALUATION_FIELDS` only (values are coerced by make_config)."""
    import typing

    types = typing.get_type_hints(RunConfig)
    group = parser.add_argument_group("configuration fields evaluation reads (default: the run's config.json)")
    for name in EVALUATION_FIELDS:
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(
            *flags, dest=name, default=None, metavar=types[name].__name__.upper(), help=field_help(name, None)
        )


def report_main(argv: list[str]) -> int:
    """``python -m clipstudy report``: render the analysis notebook (pandas is imported after parsing)."""
    from clipstudy import paths

    parser = CommandParser(
        prog="python -m clipstudy report", description="Render the analysis notebook to reports/<profile>/report.html."
    )
    parser.add_argument("--profile", default="demo", help="profile whose runs to report (default demo)")
    parser.add_argument("--runs", default=None, help="runs folder (default reports/runs/<profile>)")
    parser.add_argument("--out", default=None, help="output folder (default reports/<profile>)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else paths.reports_dir(args.profile)
    from clipstudy.study.report import render, runs_to_report

    runs = runs_to_report(args.profile, args.runs or "")  # refuses a folder without finished runs
    html = render(args.profile, runs, out)
    print(f"wrote {html} and {out / 'results.csv'}")
    return 0


def fetch_weights_main(argv: list[str]) -> int:
    """``python -m clipstudy fetch-weights``: download what a profile loads into the local caches."""
    from clipstudy.engine.config import CHOICES, make_config
    from clipstudy.errors import RunFailure
    from clipstudy.paths import DISTILBERT_ENV, RESNET50_ENV

    parser = CommandParser(
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
    from clipstudy.core.models import download_hosts, fetch_weights, weights_needed

    needed = weights_needed(make_config(args.profile))
    image_weights = args.image_weights or needed["resnet50"]
    if image_weights is None and not needed["distilbert"]:
        print(f"profile {args.profile!r} loads no pretrained weights; nothing to fetch")
        return 0
    if args.dest:
        Path(args.dest).mkdir(parents=True, exist_ok=True)  # a bad --dest is refused before any download
    require_connection(download_hosts(image_weights, needed["distilbert"]))  # offline: one line, in seconds
    try:
        for path in fetch_weights(args.dest, image_weights=image_weights, distilbert=needed["distilbert"]):
            print("saved", path)
    except Exception as err:  # network errors come in many types
        raise RunFailure(
            f"fetch-weights: download failed ({err}); this command needs internet access "
            "(huggingface.co, and download.pytorch.org for the torchvision weights)"
        ) from err
    return 0


def require_connection(hosts: list[str], timeout: float = 5.0) -> None:
    """One connection attempt per host (through the HTTPS proxy when one is set): offline, fail in seconds
    with one line, instead of after the downloaders' retries (half a minute)."""
    import socket
    import urllib.parse
    import urllib.request

    from clipstudy.core.models import HUB_HOST
    from clipstudy.errors import RunFailure
    from clipstudy.paths import DISTILBERT_ENV, RESNET50_ENV

    fix = (
        "fetch-weights needs internet access: run it where there is some and copy ~/.cache/huggingface and "
        f"~/.cache/torch/hub here, or point {RESNET50_ENV} / {DISTILBERT_ENV} to local copies (fetch-weights --dest)"
    )
    if HUB_HOST in hosts and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise RunFailure(f"fetch-weights: HF_HUB_OFFLINE is set, so {HUB_HOST} is not contacted; {fix}")
    proxy = urllib.request.getproxies().get("https")
    for host in hosts:
        target = urllib.parse.urlsplit(proxy) if proxy and not urllib.request.proxy_bypass(host) else None
        address = (target.hostname, target.port or 443) if target else (host, 443)
        try:
            socket.create_connection(address, timeout=timeout).close()
        except OSError as err:
            via = f" through the proxy {address[0]}:{address[1]}" if target else ""
            raise RunFailure(f"fetch-weights: cannot reach {host}{via} ({err.strerror or err}); {fix}") from None


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
