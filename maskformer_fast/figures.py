"""Figures (PNG): each query's mask beside the ground truth, the final instances over the
input, the loss curve. Drawn on Agg canvases of their own: matplotlib's global backend (the
user's choice) and pyplot's figures are left alone."""

from __future__ import annotations

import os

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from maskformer_fast.evaluate import instances


def _figure(rows: int = 1, cols: int = 1, **kwargs):
    """A figure on an Agg canvas of its own and its axes ``[rows, cols]``."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _ground_truth(target: dict) -> np.ndarray:
    masks = target["masks"].numpy()
    out = np.zeros(masks.shape[-2:])
    for k, m in enumerate(masks):
        out[m > 0] = 0.35 + 0.65 * (k + 1) / max(len(masks), 1)
    return out


@torch.no_grad()
def query_grid(model, dataset, path: str, rows: int = 6) -> None:
    """As the original figure: input | ground truth | every query's mask probability, with
    its most likely class and probability above it."""
    model.eval()
    rows = min(rows, len(dataset))  # a held-out set may be smaller than the figure
    images = torch.stack([dataset[i][0] for i in range(rows)])
    out = model(images.to(next(model.parameters()).device))
    probs = out["pred_logits"].float().softmax(-1).cpu()
    masks = out["pred_masks"].float().sigmoid().cpu()
    Q = masks.shape[1]
    fig, axes = _figure(rows, Q + 2, figsize=(1.3 * (Q + 2), 1.4 * rows))
    for r in range(rows):
        panels = [images[r, 0].numpy(), _ground_truth(dataset[r][1])] + [masks[r, q].numpy() for q in range(Q)]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c >= 2:
                p, k = probs[r, c - 2].max(-1)
                name = "none" if int(k) == probs.shape[-1] - 1 else dataset.class_names[int(k)]
                ax.set_title(f"{name} {float(p):.2f}", fontsize=7)
        axes[r, 0].set_ylabel(f"image {r}", fontsize=7)
    axes[0, 0].set_title("input", fontsize=7)
    axes[0, 1].set_title("ground truth", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@torch.no_grad()
def overlay(model, dataset, path: str, count: int = 8, min_score: float = 0.5) -> None:
    """The final instances (score >= ``min_score``) in colour over the input image."""
    model.eval()
    count = min(count, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(count)])
    out = model(images.to(next(model.parameters()).device))
    colours = matplotlib.colormaps["tab10"]
    fig, axes = _figure(1, count, figsize=(2.0 * count, 2.3))
    for i in range(count):
        ax = axes[0, i]
        canvas = np.repeat(images[i, 0].numpy()[..., None], 3, -1).clip(0, 1) * 0.5
        found = [p for p in instances(out["pred_logits"][i], out["pred_masks"][i]) if p["score"] >= min_score]
        for k, p in enumerate(found):
            canvas[p["mask"]] = 0.4 * canvas[p["mask"]] + 0.6 * np.array(colours(k % 10)[:3])
        ax.imshow(canvas, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(", ".join(f"{dataset.class_names[p['label']]} {p['score']:.2f}" for p in found[:3]),
                     fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def loss_curve(history: list[float], path: str) -> None:
    fig, axes = _figure(figsize=(5, 3))
    ax = axes[0, 0]
    ax.plot(np.arange(1, len(history) + 1), history, lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (weighted, all layers)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def draw_all(model, dataset, out: str, history: list[float] | None) -> None:
    query_grid(model, dataset, os.path.join(out, "queries.png"))
    overlay(model, dataset, os.path.join(out, "instances.png"))
    if history:
        loss_curve(history, os.path.join(out, "loss.png"))
