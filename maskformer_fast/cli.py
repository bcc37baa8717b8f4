"""Command line: ``maskformer-fast`` / ``python -m maskformer_fast``.

    train [--data squares|shapes] [--out DIR] [--resume | --overwrite] ...   (the default)
    eval CHECKPOINT [--out DIR] [--eval-images N]
    demo                                                        (batched matching vs scipy)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

import numpy as np
import scipy.optimize
import torch

from maskformer_fast.hungarian import batch_linear_sum_assignment


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def demo(batch: int, queries: int, max_targets: int, layers: int, seed: int) -> None:
    """Matches a Mask2Former-sized batch (every decoder layer of every image) in one call
    and compares it with the per-image scipy loop trainers use today."""
    g = torch.Generator().manual_seed(seed)
    items = batch * layers
    counts = torch.randint(1, max_targets + 1, (batch,), generator=g).repeat(layers)
    cost = torch.rand(items, queries, max_targets, generator=g)
    cost.masked_fill_(torch.arange(max_targets) >= counts[:, None, None], float("nan"))
    sizes = torch.stack([torch.full_like(counts, queries), counts], 1)

    def scipy_loop():
        out = []
        for b in range(items):  # what DETR / Mask2Former do: .cpu(), then scipy per image
            c = cost[b, :, : int(counts[b])].cpu().numpy()
            out.append(scipy.optimize.linear_sum_assignment(c))
        return out

    ours = batch_linear_sum_assignment(cost, sizes).pairs()
    ref = scipy_loop()
    same = all(
        np.array_equal(r.numpy(), rr) and np.array_equal(c.numpy(), cc)
        for (r, c), (rr, cc) in zip(ours, ref)
    )
    t_ours = _median_ms(lambda: batch_linear_sum_assignment(cost, sizes), 30)
    t_ref = _median_ms(scipy_loop, 10)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"{items} problems ({batch} images x {layers} decoder layers), {queries} queries x "
        f"1..{max_targets} targets"
    )
    print(f"  scipy loop (.cpu() + scipy per image): {t_ref:8.3f} ms")
    print(f"  maskformer_fast, one batched call:     {t_ours:8.3f} ms   ({t_ref / t_ours:.1f}x)")
    print(f"  index-identical to scipy on every problem: {same}")
    if not same:
        raise SystemExit("mismatch with scipy")


# What train and eval import beyond the library itself: the `train` extra of pyproject.toml.
TRAIN_EXTRAS = ("einops", "tqdm", "matplotlib", "pycocotools")


def _missing_train_extras() -> list[str]:
    return [name for name in TRAIN_EXTRAS if importlib.util.find_spec(name) is None]


DATA_DEFAULTS = {"squares": {}, "shapes": {"queries": 12, "steps": 1500, "batch_size": 16, "lr": 3e-3}}


def _train_args(p: argparse.ArgumentParser) -> None:
    from maskformer_fast.train import Config

    defaults = Config()
    p.add_argument("--out", default=None, help="run folder (default runs/DATA)")
    p.add_argument("--data", default="squares", choices=["squares", "shapes"])
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a folder that holds another run (removes its files)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    for field, value in vars(defaults).items():
        if field != "data":
            p.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=None,
                           help=f"default {value} (per data set: {DATA_DEFAULTS})")


def _train(args) -> None:
    from maskformer_fast.train import Config, train

    values = {**DATA_DEFAULTS[args.data], "data": args.data}
    values.update({k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__ and v is not None})
    cfg = Config(**values)
    out = args.out or f"runs/{cfg.data}"
    metrics = train(cfg, out, resume=args.resume, device=args.device, overwrite=args.overwrite)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under torchrun: gloo's worker threads must be done before the interpreter shuts
        # down (one that frees a collective's tensors then aborts the process).
        torch.distributed.destroy_process_group()
    if "AP" in metrics:
        print(json.dumps(metrics, indent=2))
        print(f"metrics, checkpoint and figures in {out}/")


def _eval(args) -> None:
    from maskformer_fast.data import KINDS
    from maskformer_fast.model import MaskFormer
    from maskformer_fast.train import (Config, RunError, evaluate_run, folder_lock, held_run,
                                       load_checkpoint)

    # Everything is checked before anything is written.
    state = load_checkpoint(args.checkpoint, required=("config", "model"))
    try:
        cfg = Config.from_dict(state["config"])
        cfg.check()
        model = MaskFormer(len(KINDS[cfg.data]), cfg.queries, cfg.dim, cfg.heads, cfg.layers)
        model.load_state_dict(state["model"])
    except (AttributeError, TypeError, ValueError, RuntimeError) as e:
        raise RunError(f"{args.checkpoint} does not hold a model of this trainer ({e})") from None
    if args.eval_images is not None:
        cfg.eval_images = args.eval_images
    # By default beside the checkpoint, in a folder of its own: the training run's metrics
    # and figures stay as they are.
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    with folder_lock(out):
        if held_run(out):
            raise RunError(f"{out} holds a training run, whose metrics.json and figures eval would "
                           "replace: choose another --out")
        metrics = evaluate_run(model, cfg, out, state.get("history"),
                               {"train_seconds": state.get("train_seconds")})
    print(json.dumps(metrics, indent=2))
    print(f"metrics and figures in {out}/")


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="maskformer-fast",
        description="Train and evaluate a small MaskFormer on synthetic data; benchmark matching.",
    )
    sub = parser.add_subparsers(dest="command")
    p_train = sub.add_parser("train", help="train (the default command), evaluate, draw figures")
    missing = _missing_train_extras()
    if not missing:  # (the options come from the trainer's Config)
        _train_args(p_train)
    p_eval = sub.add_parser("eval", help="evaluate a checkpoint on the held-out set")
    p_eval.add_argument("checkpoint")
    p_eval.add_argument("--out", default=None, help="where to write metrics.json and figures "
                        "(default: eval/ in the checkpoint's folder)")
    p_eval.add_argument("--eval-images", type=_at_least_one, default=None,
                        help="held-out images (default: the checkpoint's setting)")
    p_demo = sub.add_parser("demo", help="batched Hungarian matching vs the scipy loop")
    p_demo.add_argument("--batch", type=int, default=16)
    p_demo.add_argument("--queries", type=int, default=100)
    p_demo.add_argument("--max-targets", type=int, default=20)
    p_demo.add_argument("--layers", type=int, default=10)
    p_demo.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["train", *argv]  # train is the default command, with or without options
    if missing and argv[0] in ("train", "eval"):
        # before anything runs: evaluation and figures come at the end of a training run
        raise SystemExit(f"maskformer-fast {argv[0]}: error: needs the training extras, "
                         f"{', '.join(missing)} missing: pip install 'maskformer_fast[train]'")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.batch, args.queries, args.max_targets, args.layers, args.seed)
        return
    from maskformer_fast.train import RunError

    try:
        if args.command == "train":
            _train(args)
        else:
            _eval(args)
    except RunError as e:  # a bad setting, file or folder: the message says it all
        raise SystemExit(f"maskformer-fast {args.command}: error: {e}") from None
