"""The matching cost of every query against every target, for a whole batch, in one Triton
launch: class + (sigmoid-BCE or focal) + dice, from mask logits ``[B, Q, P]`` or straight from
mask embeddings ``[B, Q, C]`` and a pixel feature ``[B, C, P]`` (the logits tile is then made
in registers by a dot over C and consumed at once: no ``[B, Q, P]`` tensor ever exists).

One program owns a tile of queries x targets of one image and walks the pixels:

    for each block of pixels:
        x = logits tile [BQ, BP]           (loaded, or embed @ feat)
        e = exp(-|x|), l = log(1 + e)      (once per logit: softplus, sigmoid, BCE share them)
        p = sigmoid(x), BCE(x,1) = max(-x,0) + l, BCE(x,0) = max(x,0) + l
        acc_w += w @ y^T, acc_p += p @ y^T (fp32 accumulation)
        sum_b += rowsum(bias), sum_p += rowsum(p), sum_y += rowsum(y)

with (bce)   w = -x,                          bias = BCE(x, 0)
     (focal) w = pos - neg, bias = neg,  pos = alpha (1-p)^2 BCE(x, 1), neg = (1-alpha) p^2 BCE(x, 0)
since sum_P [pos y + neg (1 - y)] = (pos - neg) . y + sum neg, and BCE(x, 1) - BCE(x, 0) = -x.
At the end: mask = (acc_w + sum_b) / P, dice = 1 - (2 acc_p + 1) / (sum_p + sum_y + 1), and the
class term -softmax(class_logits)[q, label_t] by an online softmax over the K+1 logits.

Targets beyond an image's count are never read (padding may hold NaN) and get +inf; a label
outside [0, K] of a valid target gives NaN, as in the torch reference.

Dots use ``input_precision="tf32x3"`` on the GPU (about fp32 accuracy on tensor cores: plain
TF32 would round the logits to 10 bits and move near-ties); the interpreter computes them
exactly in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Tiles: 64 queries x up to 32 targets per program, 8 warps, 16 pixels per step (32 on sm_90
# and newer), 4 programs per SM when a tile's pixels are split. Chosen so that no variant
# spills registers on sm_80 or sm_90 (tests/test_triton_compile.py checks it without a GPU),
# then the fastest such choice on an H200 (scripts/gpu_cost_sweep.py). Activations are
# computed once per logit for T <= 32 targets, once per tile of 32 targets beyond that
# (64-target tiles spill on sm_80).
BLOCK_Q = 64  # queries per program
BLOCK_P = 16  # pixels per step of the loop (sm_80 spills at 32)
BLOCK_P_SM90 = 32  # fewer, longer steps: the loop is latency-bound
BLOCK_C = 16  # channels per step of the embedding dot
BLOCK_K = 64  # class logits per step of the online softmax
MAX_BLOCK_T = 32  # targets per program
NUM_WARPS = 8
MIN_SPLIT_BLOCKS = 16  # pixel blocks per program at least, when a tile's pixels are split
PROGRAMS_PER_SM = 4  # how many programs the split aims at per SM
INTERPRETER_SPLIT = 2  # the interpreter splits in two, so that tests run both paths


@triton.jit
def _finish(acc_w, acc_p, sum_b, sum_p, sum_y, b, qs, ts, q_ok, t_ok, T, K1,
            cl_ptr, scb, scq, sck, lab_ptr, slb, slt, out_ptr, sob, soq, sot,
            n_pix, w_class, w_mask, w_dice,
            HAS_CLASS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """The cost tile from its pixel sums (mask, dice, class terms), stored."""
    mask_cost = (acc_w + sum_b[:, None]) / n_pix
    dice = 1.0 - (2.0 * acc_p + 1.0) / (sum_p[:, None] + sum_y[None, :] + 1.0)
    cost = w_mask * mask_cost + w_dice * dice
    if HAS_CLASS:
        # softmax over the K+1 logits of each query (online: running max and sum)
        row_max = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        for k0 in range(0, K1, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K1
            logit = tl.load(cl_ptr + b * scb + qs[:, None] * scq + ks[None, :] * sck,
                            mask=q_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            logit = tl.where(k_ok[None, :], logit, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logit, axis=1))
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logit - new_max[:, None]), axis=1)
            row_max = new_max
        label = tl.load(lab_ptr + b * slb + ts * slt, mask=t_ok, other=0)
        label_ok = (label >= 0) & (label < K1)
        picked = tl.load(cl_ptr + b * scb + qs[:, None] * scq + label[None, :] * sck,
                         mask=q_ok[:, None] & (t_ok & label_ok)[None, :], other=0.0).to(tl.float32)
        prob = tl.exp(picked - row_max[:, None]) / row_sum[:, None]
        cost -= w_class * tl.where(label_ok[None, :], prob, float("nan"))
    cost = tl.where(t_ok[None, :], cost, float("inf"))
    tl.store(out_ptr + b * sob + qs[:, None] * soq + ts[None, :] * sot, cost, mask=q_ok[:, None] & (ts < T)[None, :])


@triton.jit
def _cost_kernel(
    x_ptr, sxb, sxq, sxk,  # logits [B, Q, P], or embeddings [B, Q, C] when EMBED
    f_ptr, sfb, sfc, sfp,  # pixel feature [B, C, P] (EMBED only)
    y_ptr, syb, syt, syp,  # targets [B, T, P]
    count_ptr,  # [B] targets per image
    cl_ptr, scb, scq, sck,  # class logits [B, Q, K1] (HAS_CLASS only)
    lab_ptr, slb, slt,  # labels [B, T] (HAS_CLASS only)
    out_ptr, sob, soq, sot,  # cost [B, Q, T] fp32
    ws_ptr, arrived_ptr,  # split > 1: partial sums [split, tiles, WS], arrivals per tile [tiles]
    Q, T, P, C, K1, split, chunk,  # the pixels are cut into `split` ranges of `chunk`
    n_pix, w_class, w_mask, w_dice, alpha,  # n_pix = max(P, 1) as a float
    EMBED: tl.constexpr, FOCAL: tl.constexpr, HAS_CLASS: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = (tl.program_id(0) // split).to(tl.int64)
    part = tl.program_id(0) % split
    qs = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ts = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    count = tl.minimum(tl.load(count_ptr + b), T)
    q_ok = qs < Q
    t_ok = ts < count

    acc_w = tl.zeros((BLOCK_Q, BLOCK_T), dtype=tl.float32)
    acc_p = tl.zeros((BLOCK_Q, BLOCK_T), dtype=tl.float32)
    sum_b = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    sum_p = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    sum_y = tl.zeros((BLOCK_T,), dtype=tl.float32)
    p_end = tl.minimum(part * chunk + chunk, P)
    for p0 in range(part * chunk, p_end, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        p_ok = ps < p_end
        if EMBED:  # the logits tile, in registers: embed [BQ, C] @ feat [C, BP]
            x = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                c_ok = cs < C
                e = tl.load(x_ptr + b * sxb + qs[:, None] * sxq + cs[None, :] * sxk,
                            mask=q_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                f = tl.load(f_ptr + b * sfb + cs[:, None] * sfc + ps[None, :] * sfp,
                            mask=c_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
                x += tl.dot(e, f, input_precision=PRECISION)
        else:
            x = tl.load(x_ptr + b * sxb + qs[:, None] * sxq + ps[None, :] * sxk,
                        mask=q_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
        y = tl.load(y_ptr + b * syb + ts[:, None] * syt + ps[None, :] * syp,
                    mask=t_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)

        e = tl.exp(-tl.abs(x))
        log1pe = tl.log(1.0 + e)
        r = 1.0 / (1.0 + e)
        pos_x = x >= 0
        p = tl.where(pos_x, r, e * r)  # sigmoid(x), and 1 - p below, without cancellation
        live = p_ok[None, :]  # pixels past P count for nothing
        bce0 = tl.where(live, tl.maximum(x, 0.0) + log1pe, 0.0)  # BCE(x, 0) = softplus(x)
        p = tl.where(live, p, 0.0)
        if FOCAL:
            one_minus_p = tl.where(pos_x, e * r, r)
            bce1 = tl.maximum(-x, 0.0) + log1pe  # BCE(x, 1) = softplus(-x)
            neg = (1.0 - alpha) * p * p * bce0
            w = alpha * one_minus_p * one_minus_p * bce1 * tl.where(live, 1.0, 0.0) - neg
            bias = neg
        else:
            w = -x
            bias = bce0
        yt = tl.trans(y)
        acc_w += tl.dot(w, yt, input_precision=PRECISION)
        acc_p += tl.dot(p, yt, input_precision=PRECISION)
        sum_b += tl.sum(bias, axis=1)
        sum_p += tl.sum(p, axis=1)
        sum_y += tl.sum(y, axis=1)

    if SPLIT:
        # Split-P: every program stores its partial sums; the last of a tile's `split`
        # programs to arrive adds them up in the order of the pixels (not of arrival, so the
        # result is deterministic) and alone computes and stores the cost.
        tile = (b * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        WS: tl.constexpr = 2 * BLOCK_Q * BLOCK_T + 2 * BLOCK_Q + BLOCK_T
        n_tiles = (tl.num_programs(0) // split) * tl.num_programs(1) * tl.num_programs(2)
        qt = tl.arange(0, BLOCK_Q)[:, None] * BLOCK_T + tl.arange(0, BLOCK_T)[None, :]
        rq, rt = tl.arange(0, BLOCK_Q), tl.arange(0, BLOCK_T)
        ws = ws_ptr + (part * n_tiles + tile) * WS
        tl.store(ws + qt, acc_w)
        tl.store(ws + BLOCK_Q * BLOCK_T + qt, acc_p)
        tl.store(ws + 2 * BLOCK_Q * BLOCK_T + rq, sum_b)
        tl.store(ws + 2 * BLOCK_Q * BLOCK_T + BLOCK_Q + rq, sum_p)
        tl.store(ws + 2 * BLOCK_Q * BLOCK_T + 2 * BLOCK_Q + rt, sum_y)
        # The atomic runs on one thread: bar.sync orders every warp's stores before its release,
        # and its acquire before every warp's loads (PTX causality is transitive through it).
        tl.debug_barrier()
        arrived = tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel")
        tl.debug_barrier()
        if arrived == split - 1:
            ws = ws_ptr + tile * WS
            acc_w = tl.load(ws + qt)
            acc_p = tl.load(ws + BLOCK_Q * BLOCK_T + qt)
            sum_b = tl.load(ws + 2 * BLOCK_Q * BLOCK_T + rq)
            sum_p = tl.load(ws + 2 * BLOCK_Q * BLOCK_T + BLOCK_Q + rq)
            sum_y = tl.load(ws + 2 * BLOCK_Q * BLOCK_T + 2 * BLOCK_Q + rt)
            for k in range(1, split):
                ws = ws_ptr + (k * n_tiles + tile) * WS
                acc_w += tl.load(ws + qt)
                acc_p += tl.load(ws + BLOCK_Q * BLOCK_T + qt)
                sum_b += tl.load(ws + 2 * BLOCK_Q * BLOCK_T + rq)
                sum_p += tl.load(ws + 2 * BLOCK_Q * BLOCK_T + BLOCK_Q + rq)
                sum_y += tl.load(ws + 2 * BLOCK_Q * BLOCK_T + 2 * BLOCK_Q + rt)
            _finish(acc_w, acc_p, sum_b, sum_p, sum_y, b, qs, ts, q_ok, t_ok, T, K1,
                    cl_ptr, scb, scq, sck, lab_ptr, slb, slt, out_ptr, sob, soq, sot,
                    n_pix, w_class, w_mask, w_dice, HAS_CLASS, BLOCK_Q, BLOCK_K)
    else:
        _finish(acc_w, acc_p, sum_b, sum_p, sum_y, b, qs, ts, q_ok, t_ok, T, K1,
                cl_ptr, scb, scq, sck, lab_ptr, slb, slt, out_ptr, sob, soq, sot,
                n_pix, w_class, w_mask, w_dice, HAS_CLASS, BLOCK_Q, BLOCK_K)


# Whether the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 when it was defined).
INTERPRETED = isinstance(_cost_kernel, InterpretedFunction)

def _block_p(device: torch.device) -> int:
    """Pixels per step: BLOCK_P_SM90 on sm_90 and newer (and in the interpreter, so that tests
    run it), else BLOCK_P."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9:
        return BLOCK_P_SM90
    return BLOCK_P


def _split(P: int, tiles: int, device: torch.device, block_p: int = BLOCK_P) -> tuple[int, int]:
    """(split, chunk): the pixels of each tile are shared by `split` programs, `chunk` each
    (a multiple of block_p). On a GPU, PROGRAMS_PER_SM programs per SM, as long as each
    keeps MIN_SPLIT_BLOCKS pixel blocks: B * Q / BLOCK_Q tiles alone would leave most SMs idle
    on a typical batch (8 x 100 queries: 32 programs)."""
    blocks = triton.cdiv(P, block_p)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        split = min(triton.cdiv(PROGRAMS_PER_SM * sms, tiles), blocks // MIN_SPLIT_BLOCKS)
    else:
        split = INTERPRETER_SPLIT
    split = max(1, min(split, blocks))
    chunk = max(1, triton.cdiv(blocks, split)) * block_p
    return max(1, triton.cdiv(P, chunk)), chunk


def _launch(x, feat, tgt_masks, tgt_counts, class_logits, tgt_labels, *, embed, w_class, w_mask, w_dice,
            mask_cost, alpha=0.25):
    B, Q = x.shape[:2]
    T, P = tgt_masks.shape[1], tgt_masks.shape[2]
    out = torch.empty(B, Q, T, device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    if tgt_masks.dtype == torch.bool:
        tgt_masks = tgt_masks.view(torch.uint8)  # same bytes; Triton loads bools as int1
    counts = torch.full((B,), T, device=x.device, dtype=torch.int64) if tgt_counts is None \
        else tgt_counts.to(device=x.device, dtype=torch.int64)
    has_class = class_logits is not None and w_class != 0
    if not has_class:  # never read: any tensor gives valid pointers
        class_logits, tgt_labels = out.new_zeros(1, 1, 1), counts.new_zeros(1, 1)
    if not embed:
        feat = x.new_zeros(1, 1, 1)
    block_t = min(max(16, triton.next_power_of_2(T)), MAX_BLOCK_T)
    block_p = _block_p(x.device)
    tiles = B * triton.cdiv(Q, BLOCK_Q) * triton.cdiv(T, block_t)
    split, chunk = _split(P, tiles, x.device, block_p)
    block_size = 2 * BLOCK_Q * block_t + 2 * BLOCK_Q + block_t
    ws = torch.empty(split * tiles * block_size if split > 1 else 1, device=x.device, dtype=torch.float32)
    arrived = torch.zeros(tiles if split > 1 else 1, device=x.device, dtype=torch.int32)
    grid = (B * split, triton.cdiv(Q, BLOCK_Q), triton.cdiv(T, block_t))
    # Triton launches on the current device: make it the tensors' (a no-op on the CPU)
    with torch.cuda.device_of(x):
        _cost_kernel[grid](
            x, *x.stride(),
            feat, *feat.stride(),
            tgt_masks, *tgt_masks.stride(),
            counts,
            class_logits, *class_logits.stride(),
            tgt_labels, *tgt_labels.stride(),
            out, *out.stride(),
            ws, arrived,
            Q, T, P, feat.shape[1] if embed else 0, class_logits.shape[-1], split, chunk,
            float(max(P, 1)), float(w_class), float(w_mask), float(w_dice), float(alpha),
            EMBED=embed, FOCAL=mask_cost == "focal", HAS_CLASS=has_class, SPLIT=split > 1,
            PRECISION="ieee" if x.device.type == "cpu" else "tf32x3",
            BLOCK_Q=BLOCK_Q, BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K,
            num_warps=NUM_WARPS,
        )
    return out


def pairwise_mask_cost_triton(mask_logits, tgt_masks, tgt_counts=None, class_logits=None, tgt_labels=None, *,
                              w_class=1.0, w_mask=1.0, w_dice=1.0, mask_cost="bce"):
    """``[B, Q, P]`` logits against ``[B, T, P]`` targets -> float32 ``[B, Q, T]``."""
    return _launch(mask_logits, None, tgt_masks, tgt_counts, class_logits, tgt_labels, embed=False,
                   w_class=w_class, w_mask=w_mask, w_dice=w_dice, mask_cost=mask_cost)


def mask_cost_from_embeddings_triton(mask_embed, pixel_feat, tgt_masks, tgt_counts=None, class_logits=None,
                                     tgt_labels=None, *, w_class=1.0, w_mask=1.0, w_dice=1.0, mask_cost="bce"):
    """The cost of the logits ``einsum("bqc,bchw->bqhw")`` against ``[B, T, H, W]`` targets,
    the logits made tile by tile in registers."""
    return _launch(mask_embed, pixel_feat.flatten(2), tgt_masks.flatten(2), tgt_counts, class_logits,
                   tgt_labels, embed=True, w_class=w_class, w_mask=w_mask, w_dice=w_dice, mask_cost=mask_cost)
