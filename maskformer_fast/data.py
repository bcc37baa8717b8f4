"""Synthetic instance-segmentation data, generated on the fly from a seed (no download).

- ``"squares"`` (the default, as in the original implementation): 32x32 images with 2-3
  white squares of side 5 on black, one class. Squares do not overlap.
- ``"shapes"``: 64x64 images with 0-5 objects of three classes (0 square, 1 circle,
  2 triangle) of varying size and grey level, which may occlude each other (a mask is the
  visible part), on a noisy background.

Item ``i`` of a data set depends only on ``(seed, i)``: a held-out set is a different seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

KINDS = {"squares": ("square",), "shapes": ("square", "circle", "triangle")}


def _shape_mask(kind: str, size: int, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if kind == "square":
        return (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    if kind == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    # triangle: the points inside three half-planes around the centre
    inside = np.ones((size, size), dtype=bool)
    for k in range(3):
        a = angle + 2 * np.pi * k / 3
        inside &= (yy - cy) * np.sin(a) + (xx - cx) * np.cos(a) <= r * 0.5
    return inside


def make_squares(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 32x32 image with 2-3 non-overlapping squares of side 5: image [1, 32, 32],
    masks [T, 32, 32] bool, labels [T]."""
    size, side = 32, 5
    masks = []
    while len(masks) < rng.integers(2, 4):
        y, x = rng.integers(0, size - side + 1, 2)
        m = np.zeros((size, size), dtype=bool)
        m[y : y + side, x : x + side] = True
        if not any((m & other).any() for other in masks):
            masks.append(m)
    masks = np.stack(masks)
    image = masks.any(0).astype(np.float32)[None]
    return image, masks, np.zeros(len(masks), dtype=np.int64)


def make_shapes(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 64x64 noisy image with 0-5 possibly occluding shapes of 3 classes."""
    size = 64
    image = rng.normal(0.0, 0.05, (size, size)).astype(np.float32)
    masks, labels = [], []
    for _ in range(rng.integers(0, 6)):
        label = int(rng.integers(0, 3))
        r = rng.uniform(4, 12)
        cy, cx = rng.uniform(r, size - r, 2)
        m = _shape_mask(KINDS["shapes"][label], size, cy, cx, r, rng.uniform(0, 2 * np.pi))
        masks = [old & ~m for old in masks]  # the new shape is in front
        masks.append(m)
        labels.append(label)
        image[m] = rng.uniform(0.4, 1.0)
    keep = [k for k, m in enumerate(masks) if m.sum() >= 12]  # drop the (almost) hidden
    masks = np.stack([masks[k] for k in keep]) if keep else np.zeros((0, size, size), dtype=bool)
    return image[None], masks, np.array([labels[k] for k in keep], dtype=np.int64)


GENERATORS = {"squares": make_squares, "shapes": make_shapes}


class SyntheticDataset(Dataset):
    """``n`` images of ``kind`` ("squares" or "shapes"); item i is determined by (seed, i).

    Returns ``(image [1, H, W] float32, {"labels": [T] int64, "masks": [T, H, W] float32})``.
    """

    def __init__(self, kind: str = "squares", n: int = 1000, seed: int = 0):
        if kind not in GENERATORS:
            raise ValueError(f"unknown data set {kind!r}; choose from {sorted(GENERATORS)}")
        self.kind, self.n, self.seed = kind, n, seed
        self.num_classes = len(KINDS[kind])
        self.class_names = KINDS[kind]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        image, masks, labels = GENERATORS[self.kind](np.random.default_rng([self.seed, i]))
        return torch.from_numpy(image), {
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(masks.astype(np.float32)),
        }


def collate(batch):
    """Stacks images ``[B, 1, H, W]``; targets stay a list of dicts."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)
