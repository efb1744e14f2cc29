"""The ``train`` and ``evaluate`` commands (``python -m clipstudy train|evaluate``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from clipstudy import records
from clipstudy.checkpoint import CellBusy, load_latest
from clipstudy.config import ConfigError, PROFILES, add_config_arguments, make_config, overrides_from_args


# ----------------------------------------------------------------------- CLI
def parse_args(argv, prog="python -m clipstudy train"):
    parser = argparse.ArgumentParser(prog=prog, description="Train and evaluate one optimizer x loss cell.")
    parser.add_argument("--profile", default="demo", choices=sorted(PROFILES))
    parser.add_argument("--no-progress", action="store_true")
    add_config_arguments(parser)
    return parser.parse_args(argv)


def train_main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = make_config(args.profile, **overrides_from_args(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from clipstudy.checkpoint import CheckpointWriteError
    from clipstudy.data import DataError
    from clipstudy.train import train

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
    return 0 if metrics["status"] == records.COMPLETED else 3


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
    from clipstudy import precision
    from clipstudy.train import build_datasets, build_model_for, choose_device

    device = choose_device(config.device)
    _, retrieval_set, zeroshot_set = build_datasets(config)
    model, tokenizer = build_model_for(config)
    model.load_state_dict(state["model"])
    model.to(device)
    from clipstudy.evaluate import evaluate_all

    metrics = evaluate_all(model, tokenizer, retrieval_set=retrieval_set, zeroshot_set=zeroshot_set,
                           batch_size=config.eval_batch_size, device=device, max_length=config.max_length,
                           progress=not args.json, num_workers=config.num_workers,
                           amp=precision.choose_amp(config.amp, device))  # the precision training evaluates with
    metrics["global_step"] = state["global_step"]
    print(json.dumps(metrics, indent=2))
    return 0
