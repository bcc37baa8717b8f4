"""MaskFormer (Cheng et al. 2021), small: a backbone gives a low- and a high-resolution
feature; learned queries attend to the low-resolution one through pre-norm transformer
decoder blocks; each query's mask is the per-pixel dot product of its mask embedding with
the high-resolution feature, and its class comes from an MLP (K classes + no-object, the
last). Every decoder layer also gives an auxiliary output.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat
from torch import nn

from maskformer_fast import kernels


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class SmallUNet(nn.Module):
    """The default backbone: ``[B, C_in, H, W]`` -> (low ``[B, dim, H/4, W/4]``, high
    ``[B, dim, H, W]``). Pixel coordinates are appended to the input so that the features
    can say where they are."""

    def __init__(self, in_channels: int = 1, dim: int = 64):
        super().__init__()
        self.enc1 = _block(in_channels + 2, dim // 2)
        self.enc2 = _block(dim // 2, dim, stride=2)
        self.enc3 = _block(dim, dim, stride=2)
        self.up3 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.dec2 = _block(2 * dim, dim)
        self.up2 = nn.ConvTranspose2d(dim, dim // 2, 2, 2)
        self.dec1 = _block(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, H, W = x.shape
        ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(B, -1, -1, -1)
        e1 = self.enc1(torch.cat([x, grid], 1))
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([self.up3(e3), e2], 1))
        d1 = self.dec1(torch.cat([self.up2(d2), e1], 1))
        return e3, d1


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cout))


def sine_position(h: int, w: int, dim: int, device) -> torch.Tensor:
    """2-D sinusoidal position encoding ``[h * w, dim]`` (DETR's, normalised)."""
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=device) / quarter))
    ys = (torch.arange(h, device=device) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device) + 0.5) / w * 2 * math.pi
    py, px = ys[:, None] * freq, xs[:, None] * freq  # [h, q], [w, q]
    pos_y = torch.cat([py.sin(), py.cos()], 1)[:, None, :].expand(h, w, -1)
    pos_x = torch.cat([px.sin(), px.cos()], 1)[None, :, :].expand(h, w, -1)
    return torch.cat([pos_y, pos_x], -1).reshape(h * w, 4 * quarter)


class DecoderBlock(nn.Module):
    """Pre-norm: self-attention, cross-attention to the memory, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, query_pos, memory, memory_pos):
        h = self.ln1(x)
        x = x + self.self_attn(h + query_pos, h + query_pos, h, need_weights=False)[0]
        h = self.ln2(x)
        x = x + self.cross_attn(h + query_pos, memory + memory_pos, memory, need_weights=False)[0]
        return x + self.mlp(self.ln3(x))


class MaskFormer(nn.Module):
    """``forward(images [B, C, H, W])`` -> ``{"pred_logits": [B, Q, K+1], "pred_masks":
    [B, Q, H, W], "aux_outputs": [{...} per earlier decoder layer]}``.

    Args:
        num_classes: K (the no-object class is added as the last logit).
        num_queries: Q.
        dim, heads, layers: width, attention heads and decoder depth.
        backbone: any module mapping images to (low [B, dim, h, w], high [B, dim, H, W]);
            default :class:`SmallUNet`.
    """

    def __init__(self, num_classes: int = 1, num_queries: int = 8, dim: int = 64, heads: int = 4,
                 layers: int = 3, in_channels: int = 1, backbone: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone if backbone is not None else SmallUNet(in_channels, dim)
        self.query_feat = nn.Parameter(torch.zeros(num_queries, dim))
        self.query_pos = nn.Parameter(torch.randn(num_queries, dim))
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(layers))
        self.memory_ln = nn.LayerNorm(dim)
        self.ln = nn.LayerNorm(dim)
        self.class_head = _mlp(dim, dim, num_classes + 1)
        self.mask_embed = _mlp(dim, dim, dim)

    def forward(self, images: torch.Tensor) -> dict:
        low, high = self.backbone(images)
        h, w = low.shape[-2:]
        memory = self.memory_ln(rearrange(low, "b c h w -> b (h w) c"))
        memory_pos = sine_position(h, w, memory.shape[-1], images.device).to(memory.dtype)
        queries = repeat(self.query_feat, "t c -> b t c", b=len(images))
        outputs = []
        for block in self.blocks:
            queries = block(queries, self.query_pos, memory, memory_pos)
            outputs.append(self._heads(queries, high))
        final = outputs[-1]
        final["aux_outputs"] = outputs[:-1]
        return final

    def _heads(self, queries: torch.Tensor, high: torch.Tensor) -> dict:
        q = self.ln(queries)
        masks = kernels.mask_einsum(self.mask_embed(q), high)  # "b t c, b c h w -> b t h w"
        return {"pred_logits": self.class_head(q), "pred_masks": masks}
