"""The trainer: AdamW with a cosine schedule, the batched matcher and the set criterion,
atomic checkpoints with an exact ``--resume``, metrics in ``DIR/log.jsonl``, evaluation and
figures at the end. One process, or several with ``torchrun`` (gloo on the CPU, nccl on
GPUs); CPU by default, CUDA (with bfloat16 autocast) when present.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from maskformer_fast.data import SyntheticDataset, collate
from maskformer_fast.losses import SetCriterion
from maskformer_fast.matcher import HungarianMatcher
from maskformer_fast.model import MaskFormer

HELD_OUT_SEED = 10_000  # the evaluation set: never trained on


@dataclass
class Config:
    data: str = "squares"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    queries: int = 8
    dim: int = 32
    layers: int = 3
    heads: int = 4
    mask_loss: str = "brier"  # with dice: the mask losses of the criterion
    w_class: float = 1.0
    w_mask: float = 20.0
    w_dice: float = 1.0
    eos_coef: float = 0.1
    grad_clip: float = 1.0
    eval_images: int = 300
    checkpoint_every: int = 100
    max_bad_steps: int = 10  # consecutive skipped (non-finite) steps before the run stops
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def build(cfg: Config, num_classes: int, device: torch.device):
    torch.manual_seed(cfg.seed)
    model = MaskFormer(num_classes, cfg.queries, cfg.dim, cfg.heads, cfg.layers).to(device)
    # The matching cost uses the loss weights; a Brier-trained model is matched on BCE.
    matcher = HungarianMatcher(cfg.w_class, cfg.w_mask, cfg.w_dice,
                               mask_cost="focal" if cfg.mask_loss == "focal" else "bce")
    weights = {"loss_ce": cfg.w_class, f"loss_{cfg.mask_loss}": cfg.w_mask, "loss_dice": cfg.w_dice}
    criterion = SetCriterion(num_classes, matcher, weights, cfg.eos_coef,
                             mask_losses=(cfg.mask_loss, "dice")).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return model, criterion, optimizer, scheduler


def _is_aux(name: str) -> bool:
    return name.rpartition("_")[2].isdigit()


def save_checkpoint(path: str, state: dict) -> None:
    """Writes ``state`` atomically: a temporary file in the same folder, fsync, rename.
    A process killed at any moment leaves either the old or the new checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _truncate_log(path: str, step: int) -> None:
    """Keeps the records of steps <= ``step`` (atomically): a run killed after its last
    checkpoint logged steps that the resumed run does again, and may have torn a line."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line.rstrip("\n") + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a torn line
    if keep == lines:
        return
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".log-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _distributed() -> tuple[int, int]:
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """``flag`` or'ed over the processes (all of them must call this together)."""
    if world == 1:
        return bool(flag)
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def train(cfg: Config, out: str, resume: bool = False, device: str | None = None,
          evaluate_at_end: bool = True, progress: bool = True) -> dict:
    """Trains, checkpoints to ``out/checkpoint.pt``, logs to ``out/log.jsonl``, and at the
    end evaluates on the held-out set and writes ``out/metrics.json`` and the figures.
    Returns the metrics."""
    rank, world = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} does not split over {world} processes")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    os.makedirs(out, exist_ok=True)
    ckpt_path, log_path = os.path.join(out, "checkpoint.pt"), os.path.join(out, "log.jsonl")

    train_set = SyntheticDataset(cfg.data, cfg.steps * cfg.batch_size, seed=cfg.seed)
    model, criterion, optimizer, scheduler = build(cfg, train_set.num_classes, dev)
    start, elapsed, history, bad_steps = 0, 0.0, [], 0
    if resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = load_checkpoint(ckpt_path)
        saved = Config.from_dict(state["config"])
        if asdict(saved) != asdict(cfg):
            raise ValueError(f"--resume: the checkpoint was trained with {asdict(saved)}, not {asdict(cfg)}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, elapsed, history = state["step"], state["train_seconds"], state["history"]
        bad_steps = state.get("bad_steps", 0)
        if rank == 0:
            _truncate_log(log_path, start)
    ddp = DistributedDataParallel(model) if world > 1 else model

    per_rank = cfg.batch_size // world
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress or rank != 0,
               desc=f"train {cfg.data}", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 10.0)  # a log file gets a line per 10 s
    began = time.perf_counter()
    model.train()
    for step in bar:
        # The batch of a step depends only on the step: runs resume exactly.
        first = step * cfg.batch_size + rank * per_rank
        images, targets = collate([train_set[i] for i in range(first, first + per_rank)])
        images = images.to(dev)
        targets = [{k: v.to(dev) for k, v in t.items()} for t in targets]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            outputs = ddp(images)
        # Non-finite predictions (the matcher would refuse them) or loss: the step is skipped,
        # on every rank together (one rank alone would wait in the gradient all-reduce).
        reason = None
        finite = all(torch.isfinite(o[k]).all() for o in (outputs, *outputs["aux_outputs"])
                     for k in ("pred_logits", "pred_masks"))
        if _any_rank(not finite, world, dev):
            reason = "non-finite predictions"
        else:
            losses = criterion(outputs, targets)
            loss = criterion.total(losses)
            if _any_rank(not torch.isfinite(loss), world, dev):
                reason = "non-finite loss"
        optimizer.zero_grad(set_to_none=True)
        if reason is not None:
            # Documented policy: the update is skipped (and logged); too many in a row stop.
            bad_steps += 1
            record = {"step": step + 1, "skipped": reason}
            if bad_steps >= cfg.max_bad_steps:
                raise FloatingPointError(
                    f"loss or predictions not finite for {bad_steps} consecutive steps (last at "
                    f"step {step + 1}: {reason}); the last good checkpoint is {ckpt_path}"
                )
        else:
            bad_steps = 0
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            history.append(value)
            bar.set_postfix(loss=f"{value:.4f}")
            record = {"step": step + 1, "loss": value, "lr": scheduler.get_last_lr()[0]}
            record.update({k: float(v.detach()) for k, v in losses.items() if not _is_aux(k)})
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        done = step + 1
        if rank == 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            save_checkpoint(ckpt_path, {
                "config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": done, "history": history,
                "bad_steps": bad_steps, "train_seconds": elapsed + time.perf_counter() - began,
            })  # fmt: skip
    train_seconds = elapsed + time.perf_counter() - began
    bar.close()
    if world > 1:
        dist.barrier()
    metrics = {"steps": cfg.steps, "skipped_steps": cfg.steps - len(history), "train_seconds": train_seconds,
               "world_size": world}
    if evaluate_at_end and rank == 0:
        metrics.update(evaluate_run(model, cfg, out, history))
    if rank == 0:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def evaluate_run(model, cfg: Config, out: str, history: list[float] | None = None) -> dict:
    """Held-out metrics of ``model`` and the figures, written to ``out``."""
    from maskformer_fast.evaluate import evaluate
    from maskformer_fast.figures import draw_all

    held_out = SyntheticDataset(cfg.data, cfg.eval_images, seed=HELD_OUT_SEED)
    metrics = evaluate(model, held_out, panoptic_metrics=cfg.data == "shapes")
    draw_all(model, held_out, out, history)
    return metrics
