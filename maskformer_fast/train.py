"""The trainer: AdamW with a cosine schedule, the batched matcher and the set criterion,
atomic checkpoints with an exact ``--resume``, metrics in ``DIR/log.jsonl``, evaluation and
figures at the end. One process, or several with ``torchrun`` (gloo on the CPU, nccl on
GPUs); CPU by default, CUDA (with bfloat16 autocast) when present.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from maskformer_fast.data import KINDS, SyntheticDataset, collate
from maskformer_fast.losses import SetCriterion
from maskformer_fast.matcher import HungarianMatcher
from maskformer_fast.model import MaskFormer

HELD_OUT_SEED = 10_000  # the evaluation set: never trained on
# What a run writes in its folder: a fresh run with --overwrite removes them first.
RUN_FILES = ("checkpoint.pt", "log.jsonl", "metrics.json", "queries.png", "instances.png", "loss.png")
CHECKPOINT_KEYS = ("config", "model", "optimizer", "scheduler", "step", "history")


class RunError(ValueError):
    """A bad setting, checkpoint file or run folder: the command line prints the message alone."""


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

    def check(self) -> None:
        """Raises :class:`RunError` for a setting out of range, before any work is done."""
        at_least = {"steps": 1, "batch_size": 1, "queries": 1, "layers": 1, "heads": 1, "dim": 16,
                    "eval_images": 1, "checkpoint_every": 1, "max_bad_steps": 1, "warmup": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                flag = "--" + name.replace("_", "-")
                raise RunError(f"{flag} must be >= {low}, not {getattr(self, name)}")
        if self.dim % 16 or self.dim % self.heads:  # GroupNorm(8) on dim / 2; attention heads
            raise RunError(f"--dim must be a multiple of 16 and of --heads ({self.heads}), "
                           f"not {self.dim}")
        if self.data not in KINDS:
            raise RunError(f"--data must be one of {sorted(KINDS)}, not {self.data!r}")
        if self.mask_loss not in ("brier", "bce", "focal"):
            raise RunError(f"--mask-loss must be brier, bce or focal, not {self.mask_loss!r}")


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


def _file_mode() -> int:
    """The mode ``open`` gives new files (0o666 less the umask): mkstemp's files are 0o600.
    The umask is read from /proc, as setting it to read it races other threads."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _replace_atomically(path: str, prefix: str, write) -> None:
    """Calls ``write(f)`` on a temporary file in the folder of ``path``, syncs it and renames it
    to ``path``: a process killed at any moment leaves the old or the new file. Any error
    (a full disk, Ctrl-C, SIGTERM in :func:`train`) removes the temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str, state: dict) -> None:
    """Writes ``state`` atomically (see :func:`_replace_atomically`)."""
    _replace_atomically(path, ".checkpoint-", lambda f: torch.save(state, f))


def load_checkpoint(path: str, required: tuple[str, ...] = ()) -> dict:
    """Reads a checkpoint without running code from it: ``weights_only=True`` unpickles only
    tensors, numbers, strings, lists and dicts (a checkpoint holds nothing else). A file
    that is not one, or a dict without the ``required`` keys, raises :class:`RunError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise RunError(f"cannot read {path}: {e.strerror}") from None
    except Exception as e:  # pickle's and torch's errors; a text file gives a KeyError
        found = re.search(r"GLOBAL (\S+)", str(e))
        why = f"torch.load failed: {type(e).__name__}: {e}"
        if found:
            why = f"refused to load {found[1]}, which could run code"
        raise RunError(f"{path} is not a maskformer_fast checkpoint ({why})") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunError(f"{path} is not a maskformer_fast checkpoint (no {', '.join(missing)})")
    return state


def _truncate_log(path: str, step: int) -> None:
    """Keeps the records of steps <= ``step`` (atomically): a run killed after its last
    checkpoint logged steps that the resumed run does again, and may have torn a line. A
    damaged line (not JSON, not UTF-8) is dropped with a warning."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.readlines()
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            if json.loads(line.decode("utf-8"))["step"] <= step:
                keep.append(line.rstrip(b"\n") + b"\n")
        except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
            warnings.warn(f"{path}: line {number} is not a log record; dropped", RuntimeWarning, 2)
    if keep != lines:
        _replace_atomically(path, ".log-", lambda f: f.writelines(keep))


@contextlib.contextmanager
def folder_lock(folder: str):
    """Holds ``folder/.lock`` (created with ``folder``): another process gets a RunError. An
    flock is released however the process ends, so a killed run leaves no stale lock."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"{folder} is in use by another maskformer-fast process") from None
        yield
    finally:
        os.close(fd)


def held_run(folder: str) -> list[str]:
    """The files of a training run that ``folder`` holds."""
    names = ("checkpoint.pt", "log.jsonl")
    return [name for name in names if os.path.exists(os.path.join(folder, name))]


def _prepare_folder(out: str, resume: bool, overwrite: bool) -> None:
    """Under the folder's lock: ``out`` holds no other run (``overwrite`` removes it), or
    the run to resume; temporary files of a killed process are removed."""
    held = held_run(out)
    if resume and "checkpoint.pt" not in held:
        raise RunError(f"--resume: no checkpoint at {os.path.join(out, 'checkpoint.pt')}")
    if held and not resume:
        if not overwrite:
            raise RunError(f"{out} holds another run ({', '.join(held)}): --resume it, start "
                           "afresh with --overwrite, or choose another --out")
        for folder in (out, os.path.join(out, "eval")):  # eval/: what eval wrote of the old run
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
    for pattern in (".checkpoint-*.tmp", ".log-*.tmp"):  # no other process writes them now
        for tmp in glob.glob(os.path.join(glob.escape(out), pattern)):
            os.unlink(tmp)


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM (a scheduler's or torchrun's stop) raises SystemExit, as Ctrl-C raises
    KeyboardInterrupt, so that clean-up runs. Only where its handler is the default one."""
    if threading.current_thread() is not threading.main_thread() or (
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _all_finite(model, optimizer) -> bool:
    """Whether the weights, buffers and optimizer state hold only finite values."""
    tensors = list(model.state_dict().values())
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


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
          evaluate_at_end: bool = True, progress: bool = True, overwrite: bool = False) -> dict:
    """Trains, checkpoints to ``out/checkpoint.pt``, logs to ``out/log.jsonl``, and at the
    end evaluates on the held-out set and writes ``out/metrics.json``, then the figures.
    ``out`` must not hold another run (``overwrite`` removes it; ``resume`` continues it).
    Returns the metrics."""
    cfg.check()
    if resume and overwrite:
        raise RunError("--resume continues the run in the folder, --overwrite removes it: not both")
    rank, world = _distributed()
    if cfg.batch_size % world:
        raise RunError(f"batch size {cfg.batch_size} does not split over {world} processes")
    # Rank 0 alone writes in ``out``: it holds the folder for the whole run.
    with _sigterm_raises(), (folder_lock(out) if rank == 0 else contextlib.nullcontext()):
        if rank == 0:
            _prepare_folder(out, resume, overwrite)
        return _train(cfg, out, resume, device, evaluate_at_end, progress, rank, world)


def _train(cfg: Config, out: str, resume: bool, device: str | None, evaluate_at_end: bool,
           progress: bool, rank: int, world: int) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    ckpt_path, log_path = os.path.join(out, "checkpoint.pt"), os.path.join(out, "log.jsonl")

    train_set = SyntheticDataset(cfg.data, cfg.steps * cfg.batch_size, seed=cfg.seed)
    model, criterion, optimizer, scheduler = build(cfg, train_set.num_classes, dev)
    start, elapsed, history, bad_steps = 0, 0.0, [], 0
    if resume:
        state = load_checkpoint(ckpt_path, CHECKPOINT_KEYS)
        saved = Config.from_dict(state["config"])
        if asdict(saved) != asdict(cfg):
            raise RunError(f"--resume: the checkpoint was trained with {asdict(saved)}, not {asdict(cfg)}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if not _all_finite(model, optimizer):
            raise RunError(f"--resume: {ckpt_path} holds non-finite weights; start afresh with "
                           "--overwrite")
        start, elapsed, history = state["step"], state["train_seconds"], state["history"]
        bad_steps = state.get("bad_steps", 0)
        if rank == 0:
            _truncate_log(log_path, start)
    ddp = DistributedDataParallel(model) if world > 1 else model
    saved_step = start  # of the last checkpoint with finite weights; 0: none

    def last_good() -> str:
        if saved_step:
            return f"the last good checkpoint is {ckpt_path} (step {saved_step})"
        return "no checkpoint was written"

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
                    f"step {step + 1}: {reason}); {last_good()}"
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
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            # Weights that went non-finite never recover: stop rather than save them. Every
            # rank holds the same weights; deciding together keeps them in step regardless.
            if _any_rank(not _all_finite(model, optimizer), world, dev):
                raise FloatingPointError(f"the weights are not finite after step {done} (an update "
                                         f"made them so; a lower --lr may help): {last_good()}")
            if rank == 0:
                save_checkpoint(ckpt_path, {
                    "config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": done, "history": history,
                    "bad_steps": bad_steps, "train_seconds": elapsed + time.perf_counter() - began,
                })  # fmt: skip
            saved_step = done
    train_seconds = elapsed + time.perf_counter() - began
    bar.close()
    if world > 1:
        dist.barrier()
    metrics = {"steps": cfg.steps, "skipped_steps": cfg.steps - len(history), "train_seconds": train_seconds,
               "world_size": world}
    if rank == 0 and evaluate_at_end:
        metrics = evaluate_run(model, cfg, out, history, metrics)
    elif rank == 0:
        _write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def evaluate_run(model, cfg: Config, out: str, history: list[float] | None = None,
                 extra: dict | None = None) -> dict:
    """Held-out metrics of ``model`` (after ``extra``), written to ``out/metrics.json``
    before the figures are drawn there (a failing figure does not lose them)."""
    from maskformer_fast.evaluate import evaluate
    from maskformer_fast.figures import draw_all

    held_out = SyntheticDataset(cfg.data, cfg.eval_images, seed=HELD_OUT_SEED)
    metrics = {**(extra or {}), **evaluate(model, held_out, panoptic_metrics=cfg.data == "shapes")}
    _write_json(os.path.join(out, "metrics.json"), metrics)
    draw_all(model, held_out, out, history)
    return metrics
