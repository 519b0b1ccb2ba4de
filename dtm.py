"""DTM pre-training model: ViT student, frozen teachers and the DTM objective.

"Morphing Tokens Draw Strong Masked Image Models" (DTM, ICLR 2025) distils a frozen teacher (OpenAI CLIP
ViT-B/16) into a masked ViT student. Instead of matching every patch token on its own, both the student's
predictions and the teacher's targets are averaged over groups of similar tokens ("morphed tokens") found
on the teacher's tokens by token morphing (Algorithm 1, morph.py), with a new random schedule per step
(the dynamic scheduler). This file holds everything around morph.py, torch only:

    VisionTransformer      the student (and the fine-tuning / segmentation backbone), BEiT-style:
                           patch embed, CLS, learned mask token, blocks with q/v bias, layer scale,
                           stochastic depth, relative position bias, fused SDPA attention, final LayerNorm
    Features               what forward_features returns: tokens, chosen blocks' outputs and attention
    VIT_CONFIGS, build_vit vit_tiny (tests, demo) / vit_s / vit_b / vit_l
    read_checkpoint        a checkpoint file of this repo (torch.load with weights_only=True, clear errors)
    vit_from_checkpoint    the ViT of any checkpoint of this repo, for the ckpt teacher, fine-tuning, segmentation
    CLIPVisual             OpenAI CLIP's visual encoder with the official parameter names
    load_clip_visual       reads the official ViT-B-16.pt (TorchScript archive, without torch.jit) or a state dict file
    CLIPTeacher            targets ln_post(patch tokens) @ proj, (B, N, 512)        -- DTM's targets
    CkptTeacher            a checkpoint of this repo as a frozen teacher (MaskDistill-style)
    PixelTeacher           per-patch normalized pixels (MAE norm_pix) -- no weights needed
    build_teacher          "clip:PATH" | "ckpt:PATH" | "pixels"
    dtm_loss               the DTM objective on morphed predictions and targets
    DTMPretrainModel       student + linear head; forward(images, mask, targets, groups) -> loss, stats

The DTM objective (as in the official code, naver-ai/dtm engines/engine_for_dtm.py): for each of L levels
with partition g (B, N) into G groups, every patch position i holds the mean of its group,
    loss_level = mean_i  l(mean_{j in g(i)} pred_j,  mean_{j in g(i)} target_j)
              = sum_groups |group| * l(group means) / N,
and the loss is the average over levels. l is smooth-L1 (beta 2.0, mean over channels) by default; the official
--normalize_target (each morphed target standardized over its channels) is normalize_target here. A schedule with no
merges gives the identity partition, i.e. plain per-token feature distillation.

The ViT is BEiT's (Bao et al. 2022) as the official code builds it (models/modeling_dtm.py, modeling_finetune.py,
run_pretrain_dtm.py): no absolute position embedding (--abs_pos_emb off), relative position bias both shared and
per block (train_pretrain.py's --rel_pos_bias both; VisionTransformer's own default is "shared", see REL_POS_BIAS),
layer scale 0.1 (1e-5 for ViT-L in run_pretrain_dtm.py's help), q and v bias but no k bias (a k bias would be
cancelled by the softmax anyway), LayerNorm eps 1e-6, truncated-normal init (std 0.02, truncated at +-std,
modeling_dtm.py's trunc_normal_ wrapper; for fine-tuning and segmentation, weight_init="downstream": timm's, whose
bounds are +-2 absolute, i.e. hardly truncated, as modeling_finetune.py) and the rescaling of each block's output
projections by 1 / sqrt(2 * layer_id) (fix_init_weight).
"""
import argparse
import math
import os
import pickle
import shlex
import tarfile
import zipfile
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import morph
from data import IMAGENET_MEAN, IMAGENET_STD

PATCH_SIZE = 16  # every model of the papers: ViT-S/B/L with 16x16 patches, 14x14 tokens at 224 px
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# ---------------------------------------------------------------------------------------------------
# Vision Transformer (BEiT-style)

REL_POS_BIAS = ("both", "shared", "per_block", "none")
VIT_CONFIGS = {
    "vit_tiny": dict(embed_dim=192, depth=4, num_heads=3),  # tests and the CPU demo
    "vit_s": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16),  # pre-training passes layer scale 1e-5 (see build_vit)
}


def build_vit(name: str, **overrides) -> "VisionTransformer":
    """VisionTransformer of a named size; overrides are passed on (img_size, drop_path_rate, num_classes...). The
    layer scale starts at VisionTransformer's 0.1 for every size; the official code pre-trains ViT-L with 1e-5
    (run_pretrain_dtm.py:66-67, the help: "0.1 for base, 1e-5 for large"), so pass layer_scale_init=1e-5 for it, as
    train_pretrain.py does (train_pretrain.LAYER_SCALE); a loaded checkpoint brings its own values. The patch size is
    PATCH_SIZE, which the trainers check image sizes and build patch grids with, unless the size or overrides give
    one."""
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(VIT_CONFIGS)}")
    return VisionTransformer(**{"patch_size": PATCH_SIZE, **VIT_CONFIGS[name], **overrides})


def _check_images(images, channels: int = 3, floats: bool = True):
    """A clear error for images that are not a batch (B, channels, H, W) (one image, channels last) or, with floats,
    hold integer pixels instead of the normalized floats the models take (data.to_tensor)."""
    if images.dim() != 4 or images.shape[1] != channels:
        hint = ("; channels last? pass images.permute(0, 3, 1, 2)" if images.dim() == 4 and images.shape[-1] == channels
                else "; one image? pass images[None]" if images.dim() == 3 and images.shape[0] == channels else "")
        raise ValueError(f"expected images (B, {channels}, H, W), channels first, got {tuple(images.shape)}{hint}")
    if floats and not images.is_floating_point():
        raise TypeError(f"expected float images, normalized as in training (data.to_tensor: (pixel / 255 - mean) / "
                        f"std), got {images.dtype}")


def _pair(size) -> tuple:
    return (size, size) if isinstance(size, int) else tuple(size)


def _trunc_normal_(t: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """N(0, std) truncated at +-std, in place: BEiT's wrapper truncates at +-std (beit/modeling_pretrain.py
    trunc_normal_; timm's default bounds are +-2 absolute: +-100 std at std 0.02).

    Drawn in one pass by the inverse CDF, as timm's trunc_normal_: uniform over the bounds' CDF values, then erfinv.
    torch 2.13's nn.init.trunc_normal_ redraws every value outside the bounds until none is left, which at +-1 std
    (68% kept) takes 11-15 passes over a tensor: 13.8 s instead of 0.76 s for 86M values (ViT-B's count) in one
    tensor on 2 CPU cores; building ViT-B took 9.4 s instead of 1.1 s, ViT-L 33 s instead of 3.4 s."""
    low, high = ((1.0 + math.erf(bound / math.sqrt(2.0))) / 2.0 for bound in (-1.0, 1.0))  # CDF at -+1 std
    with torch.no_grad():
        return t.uniform_(2 * low - 1, 2 * high - 1).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-std, std)


WEIGHT_INITS = ("pretrain", "downstream")


def relative_position_index(grid) -> torch.Tensor:
    """BEiT's index (1 + H*W, 1 + H*W) into a table of (2H-1)(2W-1) + 3 rows.

    Patch pairs index their offset (dy, dx); the last three rows are CLS->patch, patch->CLS and CLS->CLS.
    """
    H, W = grid
    coords = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")).flatten(1)  # (2, HW)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, HW, HW) query minus key
    num_rel = (2 * H - 1) * (2 * W - 1)
    index = torch.empty(H * W + 1, H * W + 1, dtype=torch.long)
    index[1:, 1:] = (rel[0] + H - 1) * (2 * W - 1) + (rel[1] + W - 1)
    index[0, :] = num_rel  # CLS query -> any key
    index[:, 0] = num_rel + 1  # patch query -> CLS key
    index[0, 0] = num_rel + 2
    return index


def _beit_offsets(n_old: int, n_new: int) -> list:
    """Where BEiT places the n_old offsets -n_old//2 .. n_old//2 to stretch them over -n_new//2 .. n_new//2.

    Geometric spacing: 0, then steps 1, q, q^2, ... outwards, q found by bisection in [1.01, 1.5] so that the
    outermost offset lands at n_new // 2 (microsoft/unilm beit/semantic_segmentation/mmcv_custom/checkpoint.py:395-414
    and naver-ai/dtm run_class_finetuning.py:429-448, geometric_progression; the same float steps). Offsets 0 and +-1
    stay.
    """
    half_old, half_new = n_old // 2, n_new // 2
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** half_old) / (1.0 - q) > half_new:
            right = q
        else:
            left = q
    dis, cur = [], 1
    for i in range(half_old):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0] + dis


def _spline_weights(nodes, points) -> torch.Tensor:
    """W (len(points), len(nodes)) float64 with W @ y = the cubic spline through (nodes, y) at points.

    Not-a-knot end conditions, which is what FITPACK's interpolating (s=0) cubic spline is (scipy's interp2d
    kind="cubic", as BEiT calls it: beit/semantic_segmentation/mmcv_custom/checkpoint.py:432,
    beit/run_class_finetuning.py:404; naver-ai/dtm run_class_finetuning.py:466 likewise); points outside the nodes take
    the end value, as FITPACK clamps them. Fewer than 4 nodes: the polynomial through them, as scipy's CubicSpline
    does.
    """
    x = torch.tensor(nodes, dtype=torch.float64)
    t = torch.tensor(points, dtype=torch.float64).clamp(x[0], x[-1])
    m = len(x)
    if m < 4:  # Lagrange basis of degree m - 1
        W = torch.ones(len(t), m, dtype=torch.float64)
        for j in range(m):
            for i in range(m):
                if i != j:
                    W[:, j] *= (t - x[i]) / (x[j] - x[i])
        return W
    # slopes s = A^-1 B y: C2 continuity at the inner nodes, equal third derivatives across nodes 1 and m-2
    h = x[1:] - x[:-1]
    A = torch.zeros(m, m, dtype=torch.float64)
    B = torch.zeros(m, m, dtype=torch.float64)
    for i in range(1, m - 1):
        A[i, i - 1], A[i, i], A[i, i + 1] = 1 / h[i - 1], 2 / h[i - 1] + 2 / h[i], 1 / h[i]
        B[i, i - 1], B[i, i + 1] = -3 / h[i - 1] ** 2, 3 / h[i] ** 2
        B[i, i] = 3 / h[i - 1] ** 2 - 3 / h[i] ** 2
    for row, i in ((0, 0), (m - 1, m - 3)):  # third derivative of piece i equals that of piece i + 1
        a, b = h[i], h[i + 1]
        A[row, i], A[row, i + 1], A[row, i + 2] = 1 / a ** 2, 1 / a ** 2 - 1 / b ** 2, -1 / b ** 2
        B[row, i], B[row, i + 1], B[row, i + 2] = -2 / a ** 3, 2 / a ** 3 + 2 / b ** 3, -2 / b ** 3
    slopes = torch.linalg.solve(A, B)  # (m, m)
    piece = (torch.searchsorted(x, t, right=True) - 1).clamp(0, m - 2)
    u = (t - x[piece]) / h[piece]
    hermite_y0, hermite_y1 = 2 * u ** 3 - 3 * u ** 2 + 1, 3 * u ** 2 - 2 * u ** 3
    hermite_s0, hermite_s1 = (u ** 3 - 2 * u ** 2 + u) * h[piece], (u ** 3 - u ** 2) * h[piece]
    rows = torch.arange(len(t))
    W = hermite_s0[:, None] * slopes[piece] + hermite_s1[:, None] * slopes[piece + 1]
    W[rows, piece] += hermite_y0
    W[rows, piece + 1] += hermite_y1
    return W


def _offset_weights(n_old: int, n_new: int) -> torch.Tensor:
    """(n_new, n_old) map of one axis's offsets: a crop if the axis shrinks, BEiT's stretch if it grows."""
    if n_new <= n_old:
        return torch.eye(n_old, dtype=torch.float64)[(n_old - n_new) // 2:(n_old + n_new) // 2]
    half_new = n_new // 2
    return _spline_weights(_beit_offsets(n_old, n_new), [float(d) for d in range(-half_new, half_new + 1)])


def resize_rel_pos_table(table: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """Relative position bias table for another patch grid: ((2H-1)(2W-1) + 3, heads) -> new grid's size.

    As BEiT and the official DTM code do for fine-tuning and segmentation at a higher resolution
    (microsoft/unilm beit/semantic_segmentation/mmcv_custom/checkpoint.py, naver-ai/dtm run_class_finetuning.py):
    the old offsets are placed geometrically over the new range (offsets 0 and +-1 keep their place, the far ones
    spread out) and a cubic spline through them is read at every new offset. Each axis on its own, which for the
    square grids BEiT handles is the same as its 2-D spline. An axis that shrinks keeps its old values of the
    offsets the new grid has (a crop); BEiT's code is not meant for that case. The 3 CLS rows are kept; the same
    grid returns the table unchanged. The result is at least float32: a half-precision table (a DeepSpeed fp16
    checkpoint) is not rounded back to it, as the official code keeps scipy's values in float32 (torch.Tensor(f(dx,
    dy)), naver-ai/dtm run_class_finetuning.py:465-468).
    """
    (H, W), (H2, W2) = _pair(old_grid), _pair(new_grid)
    num_rel, heads = (2 * H - 1) * (2 * W - 1), table.shape[1]
    if table.shape[0] != num_rel + 3:
        raise ValueError(f"relative position table has {table.shape[0]} rows, expected {num_rel + 3} for grid {(H, W)}")
    offsets = table[:num_rel].double().t().reshape(heads, 2 * H - 1, 2 * W - 1)  # (heads, dy, dx)
    rows = _offset_weights(2 * H - 1, 2 * H2 - 1).to(table.device)
    cols = _offset_weights(2 * W - 1, 2 * W2 - 1).to(table.device)
    offsets = torch.einsum("yi,hij,xj->hyx", rows, offsets, cols)
    dtype = torch.promote_types(table.dtype, torch.float32)
    return torch.cat([offsets.reshape(heads, -1).t(), table[num_rel:].double()]).to(dtype)


def resize_pos_embed(pos: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """Absolute position embedding (1 + H*W, C) or (1, 1 + H*W, C) -> the same with 1 + H2*W2, bicubic on the patch
    grid."""
    (H, W), (H2, W2) = _pair(old_grid), _pair(new_grid)
    if (H, W) == (H2, W2):
        return pos
    cls_pos, grid_pos = pos[..., :1, :], pos[..., 1:, :]
    C = pos.shape[-1]
    grid_pos = grid_pos.reshape(1, H, W, C).permute(0, 3, 1, 2)  # (1, C, H, W)
    grid_pos = grid_pos.to(torch.promote_types(grid_pos.dtype, torch.float32))
    grid_pos = F.interpolate(grid_pos, size=(H2, W2), mode="bicubic", align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(*pos.shape[:-2], H2 * W2, C).to(pos.dtype)
    return torch.cat([cls_pos, grid_pos], dim=-2)


class RelativePositionBias(nn.Module):
    """Learned bias per head and relative offset; forward() -> (heads, 1 + N, 1 + N)."""

    def __init__(self, grid, num_heads: int):
        super().__init__()
        self.grid = _pair(grid)
        H, W = self.grid
        self.table = nn.Parameter(torch.zeros((2 * H - 1) * (2 * W - 1) + 3, num_heads))  # zeros as BEiT
        self.register_buffer("index", relative_position_index(self.grid), persistent=False)

    def forward(self) -> torch.Tensor:
        T = self.index.shape[0]
        return self.table[self.index.view(-1)].view(T, T, -1).permute(2, 0, 1).contiguous()


def _attention_bias(rel_pos_bias, attn_mask, dtype):
    """Additive bias for SDPA in the attention's dtype: rel_pos_bias (heads, T, T) plus attn_mask (bool: True = may
    attend, or float). Each is cast before the sum, so a (B, heads, T, T) sum (MTO's per-image mask) is made once, in
    bf16 / fp16 under autocast, not in float32 and then copied; with a 0 / -inf mask (MTO's, or a bool one) its values
    are those of the float32 sum cast, and its gradient reaches the tables summed over the batch in that dtype, as
    the gradient of a (heads, T, T) bias alone does."""
    bias = None if rel_pos_bias is None else rel_pos_bias.to(dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
                ~attn_mask, float("-inf"))
        bias = attn_mask.to(dtype) if bias is None else bias + attn_mask.to(dtype)
    return bias


def _check_attn_mask(attn_mask, shape):
    """A clear error for an attention mask that is neither bool nor float (a 0/1 byte mask would be added as a bias),
    or neither (T, T) nor 4-D broadcastable to shape (B, heads, T, T): a 3-D one would be read as (heads, T, T),
    silently so for a (B, T, T) mask with as many images as heads."""
    if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        raise ValueError(f"attn_mask must be bool (True = may attend) or float (added to the logits), got "
                         f"{attn_mask.dtype}: pass mask.bool() for a 0/1 mask")
    if attn_mask.dim() not in (2, 4) or any(m not in (1, s) for m, s in zip(attn_mask.shape[::-1], shape[::-1])):
        raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not fit the attention's (B, heads, T, T) = "
                         f"{shape}: pass (B, 1, T, T) for one mask per image (a (B, T, T) mask: mask[:, None]), "
                         f"(1, heads, T, T) for one per head, or (T, T) for all")


class Attention(nn.Module):
    """Multi-head self-attention with BEiT's q/v bias and an optional own relative position bias.

    Always fused SDPA. With a relative position bias (or a mask) the additive float bias (heads or B x heads, T, T),
    in the autocast dtype, rules out the flash kernel: on CUDA the memory-efficient kernel runs it (bf16, fp16 and
    fp32; test_gpu.py forces that kernel to check), on the CPU SDPA's own. return_qk also returns (q, k, relative
    position bias (heads, T, T) or None) as SDPA used them (attn_mask not included; the bias before its cast to the
    autocast dtype), for losses on chosen rows of the attention (mto.py) without materializing all of it.
    """

    def __init__(self, dim: int, num_heads: int, rel_pos_grid=None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_bias = RelativePositionBias(rel_pos_grid, num_heads) if rel_pos_grid is not None else None

    def forward(self, x, rel_pos_bias=None, attn_mask=None, return_qk=False):
        B, T, C = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_bias).view(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        if self.rel_pos_bias is not None:  # the block's own table, added to a shared one (layout "both")
            own = self.rel_pos_bias()
            rel_pos_bias = own if rel_pos_bias is None else rel_pos_bias + own
        if attn_mask is not None:
            _check_attn_mask(attn_mask, (B, self.num_heads, T, T))
        bias = _attention_bias(rel_pos_bias, attn_mask, q.dtype)  # broadcastable to (B, heads, T, T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(B, T, C)), ((q, k, rel_pos_bias) if return_qk else None)


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch of a whole sample with probability p.

    The keep probability is also held as a tensor (a buffer, not saved in checkpoints) for the arithmetic: a Python
    float there would be a constant to torch.compile, one graph per rate, i.e. per block, and past
    torch._dynamo.config.recompile_limit (8) the remaining blocks would silently run uncompiled."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:  # p = 1 would divide by keep_prob = 0
            raise ValueError(f"drop path rate {p} must be in [0, 1)")
        self.p = p
        self.register_buffer("keep_prob", torch.tensor(1.0 - p), persistent=False)

    def _apply(self, fn, recurse=True):
        """keep_prob at least float32 when the module is cast (.bfloat16(), .half(), .to(dtype)): in bf16 1 - p
        rounded to 1 for p < 2**-9 = 0.00195 (nothing dropped) and to 0.992 for ViT-B's block 1 at 0.1 (0.78%
        dropped, not 0.91%)."""
        super()._apply(fn, recurse)
        dtype = torch.promote_types(self.keep_prob.dtype, torch.float32)
        self.keep_prob = torch.tensor(1.0 - self.p, dtype=dtype, device=self.keep_prob.device)
        return self

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], *(1,) * (x.dim() - 1), device=x.device) < self.keep_prob  # (B, 1, ..., 1)
        return x * keep / self.keep_prob  # a 0-dim tensor: x's dtype is kept (bf16/fp16 under autocast)


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (gamma_1, gamma_2) and stochastic depth."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, layer_scale_init=0.1, rel_pos_grid=None):
        super().__init__()
        hidden = round(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, rel_pos_grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))
        self.drop_path = DropPath(drop_path)
        self.gamma_1 = nn.Parameter(layer_scale_init * torch.ones(dim)) if layer_scale_init else None
        self.gamma_2 = nn.Parameter(layer_scale_init * torch.ones(dim)) if layer_scale_init else None

    def forward(self, x, rel_pos_bias=None, attn_mask=None, return_qk=False):
        """x (B, T, C); rel_pos_bias (heads, T, T) if shared; attn_mask bool/float broadcastable to (B, heads, T, T).

        Returns (x, None), or (x, (q, k, bias) of the attention) if return_qk.
        """
        y, qk = self.attn(self.norm1(x), rel_pos_bias, attn_mask, return_qk)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        x = x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)
        return x, qk


class Features(NamedTuple):
    """What VisionTransformer.forward_features returns."""
    tokens: torch.Tensor  # (B, 1 + N, C) after the final norm, CLS first
    layers: dict  # {block index: its output (B, 1 + N, C), before the final norm}, for return_layers
    qk: dict  # {block index: (q, k (B, heads, 1 + N, head_dim), relative position bias (heads, 1 + N, 1 + N) or None)}


class VisionTransformer(nn.Module):
    """One ViT for pre-training (forward_features with a mask), fine-tuning (num_classes > 0) and segmentation.

    rel_pos_bias (REL_POS_BIAS): "both" (a table shared by all blocks plus one per block, added together: the
    official DTM pre-training, naver-ai/dtm run_pretrain_dtm.py --rel_pos_bias and --shared_rel_pos_bias both on by
    default, models/modeling_finetune.py Attention), "shared" (one table for all blocks, BEiT v2 pre-training:
    beit2/run_beitv2_pretraining.py passes use_shared_rel_pos_bias, no per-block tables),
    "per_block" (BEiT / DTM fine-tuning) or "none". Tables start at zero (BEiT). With num_classes > 0 the model is
    BEiT's fine-tuning classifier: the final `norm` becomes Identity and `fc_norm` + `head` act on the mean of the
    patch tokens (head scaled by head_init_scale).
    weight_init (WEIGHT_INITS): "pretrain", the official pre-training model's (models/modeling_dtm.py:25, :111:
    normals of std 0.02 truncated at +-std, the patch embedding's conv too), or "downstream", the official
    fine-tuning model's and BEiT's segmentation backbone's (models/modeling_finetune.py:20, :331,
    beit/semantic_segmentation/backbone/beit.py: timm's trunc_normal_, whose bounds +-2 hardly truncate, and the
    conv left at torch's default), which is what a fine-tuning or segmentation run from scratch (--init none) and a
    new classifier head start from. (BEiT's mmseg backbone built without a checkpoint then redraws every Linear in
    init_weights(None), beit.py:385-407, which undoes fix_init_weight's rescaling of the output projections, :366;
    that is not repeated here.)
    Parameter names for layer-wise lr decay: see layer_id_for_param.
    """
    num_prefix_tokens = 1  # CLS before the patch tokens (timm's name, which mto.mto_forward checks num_prefix against)

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path_rate=0.0, layer_scale_init=0.1, rel_pos_bias="shared",
                 abs_pos_emb=False, use_mask_token=True, num_classes=0, head_init_scale=0.001, weight_init="pretrain"):
        super().__init__()
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {', '.join(WEIGHT_INITS)}, got {weight_init!r}")
        self.img_size, self.patch_size = _pair(img_size), patch_size
        if self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(f"image size {self.img_size} is not divisible by the patch size {patch_size}; "
                             f"use an image size that is a multiple of {patch_size} (e.g. 224 for patch 16)")
        if rel_pos_bias not in REL_POS_BIAS:
            raise ValueError(f"rel_pos_bias must be one of {', '.join(REL_POS_BIAS)}, got {rel_pos_bias!r}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; pass an embed_dim "
                             f"that is a multiple of num_heads (this repo's ViTs: 64 per head)")
        if not 0.0 <= drop_path_rate < 1.0:  # the last block's rate is drop_path_rate itself
            raise ValueError(f"drop_path_rate (--drop_path) must be in [0, 1), got {drop_path_rate}")
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.embed_dim, self.depth, self.num_heads, self.num_classes = embed_dim, depth, num_heads, num_classes

        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim)) if abs_pos_emb else None
        self.rel_pos_bias = RelativePositionBias(self.grid, num_heads) if rel_pos_bias in ("shared", "both") else None
        drop_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth linear in depth
        block_grid = self.grid if rel_pos_bias in ("per_block", "both") else None
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, drop_rates[i], layer_scale_init, block_grid) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if num_classes == 0 else nn.Identity()
        self.grad_checkpointing = False  # activation checkpointing per block (--grad_checkpoint), see forward_features
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if num_classes > 0 else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None
        self._init_weights(head_init_scale, weight_init)

    @torch.no_grad()
    def _init_weights(self, head_init_scale, weight_init):
        pretrain = weight_init == "pretrain"
        normal = _trunc_normal_ if pretrain else (lambda t: nn.init.trunc_normal_(t, std=0.02))  # timm's +-2 bounds
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                normal(p)
        for m in self.modules():
            if isinstance(m, nn.Linear) or (pretrain and isinstance(m, nn.Conv2d)):
                normal(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for layer_id, block in enumerate(self.blocks, start=1):  # BEiT's fix_init_weight
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))
        if self.head is not None:
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def embed(self, images, mask=None):
        """images (B, 3, H, W), mask (B, N) bool (True = masked) -> tokens (B, 1 + N, C) with CLS first."""
        channels = self.patch_embed.in_channels
        _check_images(images, channels)
        if tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(f"expected images (B, {channels}, {self.img_size[0]}, {self.img_size[1]}), got "
                             f"{tuple(images.shape)}; build the model with img_size={tuple(images.shape[-2:])} and "
                             f"adapt the checkpoint with adapt_state_dict to run at another size")
        # (B, N, C) in the weights' dtype: under autocast the conv gives bf16/fp16, the residual stream stays fp32 (as
        # the blocks' outputs are), so every block sees one dtype (one compiled graph for all of them)
        x = self.patch_embed(images).flatten(2).transpose(1, 2).to(self.cls_token.dtype)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("a mask was given but the model has no mask token; build it with use_mask_token=True")
            if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool of shape {tuple(x.shape[:2])}, got {mask.dtype} "
                                 f"{tuple(mask.shape)}; one entry per patch of this ViT: its "
                                 f"{self.grid[0]}x{self.grid[1]} grid of {self.patch_size}-px patches")
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x if self.pos_embed is None else x + self.pos_embed

    def _block_indices(self, indices, what):
        out = []
        for i in indices:
            if not -self.depth <= i < self.depth:
                raise ValueError(f"{what} has block index {i}, valid: 0..{self.depth - 1} (or negative from the end)")
            out.append(i % self.depth)
        return out

    def forward_features(self, images, mask=None, attn_mask=None, return_layers=(), return_qk=()) -> Features:
        """Features(tokens after the final norm (B, 1 + N, C) CLS first, {block: output}, {block: (q, k, bias)}).

        mask: (B, N) bool, True = masked patch, replaced by the learned mask token.
        attn_mask: one bool (True = may attend) / float mask, (1+N, 1+N) or 4-D broadcastable to (B, heads, 1+N, 1+N),
            for every block, or a list with one such mask or None per block. Each query must be allowed at least one
            key.
        return_layers: block indices whose outputs (B, 1 + N, C), before the final norm, go into .layers.
        return_qk: block indices whose attention inputs go into .qk: queries and keys (B, heads, 1 + N, head_dim)
            and the relative position bias (heads, 1 + N, 1 + N) as the fused attention used them (the block's
            attn_mask is added to that bias, and not returned).
        With grad_checkpointing set, in training mode and with gradients on, each block's activations are recomputed
        in the backward instead of stored (torch.utils.checkpoint; the same values and gradients, drop path
        included).
        """
        layer_ids = self._block_indices(return_layers, "return_layers")
        qk_ids = self._block_indices(return_qk, "return_qk")
        if attn_mask is None or torch.is_tensor(attn_mask):
            attn_mask = [attn_mask] * self.depth
        elif len(attn_mask) != self.depth:
            raise ValueError(f"attn_mask list has {len(attn_mask)} entries, expected one per block ({self.depth})")
        x = self.embed(images, mask)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        layers, qks = {}, {}
        for i, block in enumerate(self.blocks):
            if recompute:
                x, qk = checkpoint(block, x, rel_pos_bias, attn_mask[i], i in qk_ids, use_reentrant=False)
            else:
                x, qk = block(x, rel_pos_bias, attn_mask[i], i in qk_ids)
            if i in layer_ids:
                layers[i] = x
            if qk is not None:
                qks[i] = qk
        return Features(self.norm(x), layers, qks)

    def forward(self, images):
        """Classification logits (B, num_classes): head(fc_norm(mean of patch tokens)), BEiT's fine-tuning head."""
        if self.head is None:
            raise RuntimeError("this model has no classifier (num_classes=0); use forward_features for tokens")
        tokens = self.forward_features(images).tokens
        return self.head(self.fc_norm(tokens[:, 1:].mean(dim=1)))


def layer_id_for_param(name: str, depth: int) -> int:
    """BEiT's layer id for layer-wise lr decay: 0 embeddings, i + 1 block i, depth + 1 everything on top."""
    if name.startswith(("cls_token", "mask_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1  # shared rel_pos_bias (as BEiT), norm, fc_norm, head


def _table_grid(rows: int) -> tuple:
    """Square grid of a relative position table with `rows` rows, (2H-1)^2 + 3 = rows."""
    side = math.isqrt(rows - 3)
    if side * side != rows - 3 or side % 2 == 0:
        raise ValueError(f"cannot infer a square patch grid from a relative position table of {rows} rows: pass "
                         f"source_grid")
    return ((side + 1) // 2,) * 2


def adapt_state_dict(state_dict: dict, model: VisionTransformer, source_grid=None) -> dict:
    """A ViT state dict made to fit `model`: relative position tables and position embeddings resized to the
    model's patch grid (for another image size), and a shared table moved into every block when the model has
    per-block tables only: added to the block's own table where the checkpoint has one (layout "both", the
    official fine-tuning's --init_both_rpb, naver-ai/dtm run_class_finetuning.py), else copied (BEiT). Other keys
    pass unchanged; load the result with load_state_dict.
    source_grid: the patch grid (H, W) the weights were trained at, where known. Without it, a table or position
    embedding of the model's size is kept as it is, and the grid of one of another size is inferred assuming a square
    grid. (Their sizes do not say the grid: a non-square model grid's transpose, 4x6 for 6x4, or a square grid with
    as many offsets, 5x5 for 2x14, would be kept, read wrongly. The trainers use square sizes; with non-square ones,
    pass source_grid.) Take the ViT keys of a checkpoint with vit_state_dict.
    """
    sd = dict(state_dict)
    if "rel_pos_bias.table" in sd and model.rel_pos_bias is None and model.blocks[0].attn.rel_pos_bias is not None:
        shared = sd.pop("rel_pos_bias.table")
        for i in range(model.depth):  # the attention bias stays the same: per-block + shared (official
            key = f"blocks.{i}.attn.rel_pos_bias.table"  # --init_both_rpb), or a copy of the shared (BEiT)
            sd[key] = sd[key] + shared if key in sd else shared.clone()
    rows = (2 * model.grid[0] - 1) * (2 * model.grid[1] - 1) + 3  # the model's table: (2H-1)(2W-1) offsets + 3
    for key, value in list(sd.items()):
        if key.endswith("rel_pos_bias.table") and (source_grid or value.shape[0] != rows):  # else kept: model's size
            sd[key] = resize_rel_pos_table(value, source_grid or _table_grid(value.shape[0]), model.grid)
        elif key == "pos_embed" and (source_grid or value.shape[1] != 1 + model.num_patches):
            grid = _pair(source_grid) if source_grid else (math.isqrt(value.shape[1] - 1),) * 2
            if value.shape[1] != 1 + grid[0] * grid[1]:
                raise ValueError(f"pos_embed has {value.shape[1]} positions, which do not fit " + (
                    f"the source grid {grid} (1 + {grid[0] * grid[1]})" if source_grid else
                    "CLS + a square patch grid: pass source_grid"))
            sd[key] = resize_pos_embed(value, grid, model.grid)
    return sd


# ---------------------------------------------------------------------------------------------------
# Checkpoints of this repo -> ViT (used by the ckpt teacher, fine-tuning and segmentation)


def check_checkpoint_file(path: str, flag: str):
    """A clear error for a checkpoint path that is missing or a folder (naming a checkpoint in it), or a file that
    torch.save did not write (its first bytes: cheap, so a run checks its files before it reads its data)."""
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".pth"))
        deepspeed = "mp_rank_00_model_states.pt"  # DeepSpeed's weights in its checkpoint folder (official code)
        example = ("checkpoint-last.pth" if "checkpoint-last.pth" in found else
                   deepspeed if os.path.isfile(os.path.join(path, deepspeed)) else found[-1] if found else None)
        hint = f", e.g. {shlex.quote(os.path.join(path, example))}" if example else " (it holds no .pth file)"
        raise ValueError(f"{flag} {path!r} is a folder; pass a checkpoint file{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such file")
    problem = _not_a_torch_save_file(path, flag)
    if problem:
        raise ValueError(problem)


def _holds_argparse_namespace(path: str) -> bool:
    """Whether the pickle in a torch.save file names argparse.Namespace (read without running it)."""
    try:
        return "argparse.Namespace" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip file torch.save wrote: no answer
        return False


def _torch_load(path: str, flag: str):
    """torch.load(path, weights_only=True) on the CPU (no code runs while loading), errors naming the file."""
    check_checkpoint_file(path, flag)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle of plain values and tensors at all
            raise ValueError(_unreadable_checkpoint(path, flag, e)) from None
        if _holds_argparse_namespace(path):  # the official code saves its args so, after numpy-valued lrs
            raise ValueError(
                f"{flag} {path!r} holds an argparse.Namespace, which torch.load does not read safely (weights_only="
                f"True): a checkpoint of the official code (naver-ai/dtm, BEiT)? If you trust the file, keep its "
                f"weights once: python -c \"import sys, torch; c = torch.load(sys.argv[1], weights_only=False); "
                f"torch.save(c['model'] if 'model' in c else c['module'], 'weights.pth')\" {shlex.quote(path)} and "
                f"pass weights.pth"
            ) from None
        if "numpy" in str(e):
            raise ValueError(
                f"{flag} {path!r} was written by an older version of this repo (it holds numpy arrays, which "
                f"torch.load refuses by default); if you trust the file, re-save it once: python -c \"import sys, "
                f"torch; p = sys.argv[1]; c = torch.load(p, weights_only=False); c.pop('rng', None); "
                f"torch.save(c, p)\" {shlex.quote(path)}") from None
        raise ValueError(f"{flag} {path!r} holds Python objects that torch.load does not read safely "
                         f"(weights_only=True): it is not a checkpoint of this repo") from None
    except Exception as e:
        raise ValueError(_unreadable_checkpoint(path, flag, e)) from None


_LEGACY_TORCH_SAVE = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's pickled magic number (before 1.6)


def _not_a_torch_save_file(path: str, flag: str):
    """Why path, by its first bytes, cannot be a file torch.save wrote (unreadable, empty, another format), or None.
    torch.save writes a zip archive, or (before torch 1.6, or _use_new_zipfile_serialization=False) a pickle whose
    first value is its magic number, after a protocol header that depends on pickle_protocol."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as e:
        return f"{flag} {path!r} cannot be read ({e.strerror})"
    if not head:
        return f"{flag} {path!r} cannot be read by torch.load: it is empty (an interrupted save or copy?)"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" and _LEGACY_TORCH_SAVE[2:] in head:
        return None
    if head[8:10] == b'{"':  # safetensors: the length of its JSON header (8 bytes), then the header
        return (f"{flag} {path!r} cannot be read by torch.load: it is a safetensors file; make a checkpoint of it "
                f"once: python -c \"import sys, torch; from safetensors.torch import load_file; "
                f"torch.save(load_file(sys.argv[1]), 'weights.pth')\" {shlex.quote(path)} and pass weights.pth")
    if tarfile.is_tarfile(path):
        return (f"{flag} {path!r} cannot be read by torch.load: it is a tar archive; extract it, tar -xf "
                f"{shlex.quote(path)}, and pass the checkpoint file it holds")
    return (f"{flag} {path!r} cannot be read by torch.load: it is not a file that torch.save wrote (it starts "
            f"with {head[:4]!r}" + (", a pickle of something else)" if head[:1] == b"\x80" else
                                   ", not a zip archive or a pickle)"))


def _pickle_protocol(path: str):
    """The protocol of the pickle in a torch.save file (its zip archive's data.pkl, or the file itself before torch
    1.6) by its PROTO header, or None where it has none or cannot be read."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
                head = archive.read(name)[:2] if name else b""
        else:
            with open(path, "rb") as f:
                head = f.read(2)
    except Exception:  # noqa: BLE001 -- a damaged archive: zipfile raises more than BadZipFile (UnicodeDecodeError)
        return None
    return head[1] if len(head) == 2 and head[:1] == b"\x80" else None


def _unreadable_checkpoint(path: str, flag: str, error: Exception) -> str:
    """Why torch.load failed on path, in words: not a torch.save file at all, one of a pickle protocol (4, 5) that its
    weights_only reader does not read, or a damaged one (torch's reason)."""
    problem = _not_a_torch_save_file(path, flag)
    if problem:
        return problem
    protocol = _pickle_protocol(path)
    if protocol is not None and protocol > 3 and "Unsupported operand" in str(error):  # a whole file: FRAME opcodes
        return (f"{flag} {path!r} was saved with pickle protocol {protocol} (torch.save's pickle_protocol), which "
                f"torch.load does not read safely (weights_only=True): if you trust the file, re-save it once with the "
                f"default protocol: python -c \"import sys, torch; p = sys.argv[1]; torch.save(torch.load(p, "
                f"weights_only=False), p)\" {shlex.quote(path)}")
    first_sentence = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else ""
    return (f"{flag} {path!r} cannot be read by torch.load: it is truncated or damaged (an interrupted save or "
            f"copy?) ({type(error).__name__}: {first_sentence})")


def read_checkpoint(path: str, flag: str = "checkpoint") -> dict:
    """The dict in a checkpoint file, read on the CPU with torch.load(weights_only=True). A plain state dict (a dict
    of tensors) comes back as {"model": it}, and so do DeepSpeed's weights under "module". Errors name the file and
    what is wrong with it."""
    if os.path.isfile(path) and _is_torchscript_archive(path):
        raise ValueError(f"{flag} {path!r} is a TorchScript archive (OpenAI's CLIP ViT-B-16.pt?), not a checkpoint "
                         f"of this repo; a CLIP file is used as a teacher: --teacher clip:{path}")
    return as_checkpoint(_torch_load(path, flag), f"{flag} {path!r}")


def as_checkpoint(obj, name: str) -> dict:
    """obj as a checkpoint dict with its weights under "model": a plain state dict (a dict of tensors) becomes
    {"model": it}, and so do DeepSpeed's weights under "module"; anything else without a "model" dict is refused,
    naming it as `name`."""
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return {"model": obj}
    if isinstance(obj, dict) and "model" not in obj and isinstance(obj.get("module"), dict):
        # DeepSpeed's checkpoints (the official code with --enable_deepspeed) keep the weights under "module"; its
        # run_class_finetuning.py:157,358-361 reads either (--model_key model|module)
        obj = {"model": obj["module"], **{k: v for k, v in obj.items() if k != "module"}}
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        found = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        optimizer = isinstance(obj, dict) and {"state", "param_groups"} <= set(obj)
        raise ValueError(f"{name} is not a checkpoint of this repo (expected a dict with a 'model' entry, got {found})"
                         + (": an optimizer's state_dict, which holds no weights" if optimizer else "")
                         + "; pass a checkpoint of the trainers here or a model's weights, "
                           "torch.save(model.state_dict(), PATH)")
    return obj


def stored_rel_pos_bias(sd: dict) -> str:
    """The relative position bias layout of a ViT state dict (REL_POS_BIAS)."""
    shared, per_block = "rel_pos_bias.table" in sd, "blocks.0.attn.rel_pos_bias.table" in sd
    return "both" if shared and per_block else "shared" if shared else "per_block" if per_block else "none"


# the official code's parameter names (naver-ai/dtm models/modeling_dtm.py, modeling_finetune.py; BEiT's) -> ours
OFFICIAL_NAMES = (("patch_embed.proj.", "patch_embed."),
                  ("attn.relative_position_bias_table", "attn.rel_pos_bias.table"),
                  ("rel_pos_bias.relative_position_bias_table", "rel_pos_bias.table"))
# naver-ai/dtm's, BEiT v2's (beit2/modeling_pretrain.py), MAE's decoder (models_mae.py): not the ViT
OFFICIAL_PRETRAINING_HEADS = ("lm_head.", "cls_pt_", "decoder_")


def from_official_names(sd: dict) -> dict:
    """A ViT state dict of the official code (naver-ai/dtm, BEiT, BEiT v2, MAE) with this repo's names: three renames;
    the relative_position_index buffers (computed here) and the pre-training heads dropped. With the same random
    weights the official models (naver-ai/dtm's modeling_dtm.DTM and modeling_finetune.VisionTransformer; unilm's BEiT
    and BEiT v2 pre-training and fine-tuning models) and this VisionTransformer loaded from their state dicts agreed to
    8e-7 in tokens or logits of size 1-3 (comparisons run on 2026-12-03). MAE's (timm's) one qkv bias becomes q_bias
    and v_bias: k's bias adds the same q . b_k to every logit of a query's row, which the softmax cancels."""
    renamed = {}
    for name, value in sd.items():
        if name.endswith("relative_position_index") or name.startswith(OFFICIAL_PRETRAINING_HEADS):
            continue
        if name.endswith("attn.qkv.bias"):  # MAE's (timm's): q's, k's and v's
            attn = name[:-len("qkv.bias")]
            renamed[attn + "q_bias"], _, renamed[attn + "v_bias"] = value.chunk(3)
            continue
        for old, new in OFFICIAL_NAMES:
            name = name.replace(old, new)
        renamed[name] = value
    return renamed


def vit_state_dict(checkpoint: dict, path: str = "checkpoint") -> dict:
    """The ViT weights of a checkpoint of any trainer here (or of a plain state dict): checkpoint["model"] without
    DDP's "module." prefix, and
    only the "student." part of a pre-training checkpoint or the "backbone." part of a segmentation one. The official
    code's names (patch_embed.proj.weight, ...) are read too (from_official_names)."""
    if isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(f"{os.fspath(checkpoint)!r} is a path, not a checkpoint: read the file first, "
                         f"dtm.read_checkpoint(path)")
    weights = as_checkpoint(checkpoint, repr(path))["model"]  # a state dict in memory too, as read_checkpoint's
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
    for prefix in ("student.", "backbone."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    if "patch_embed.proj.weight" in sd:
        sd = from_official_names(sd)
    if "patch_embed.weight" not in sd:
        clip = any(k.endswith("class_embedding") for k in sd)  # CLIP's image tower (not its text tower alone)
        raise ValueError(f"{path!r} holds no ViT of this repo (no 'patch_embed.weight'); keys like {sorted(sd)[:8]}"
                         + ("; these are CLIP weights: pass them as a CLIP teacher (train_pretrain.py --teacher "
                            "clip:PATH); --init, --eval and --teacher ckpt: take ViT checkpoints of this repo or "
                            "the official code's" if clip else
                            "; pass a checkpoint of train_pretrain.py, train_finetune.py or train_seg.py, or an "
                            "official DTM / BEiT / BEiT v2 ViT checkpoint"))
    return sd


def _config_of(checkpoint: dict, sd: dict, width: int, depth: int, model: str, path: str) -> dict:
    """A checkpoint's ViT size (embed_dim, depth, num_heads), checked against --model if given. The number of heads:
    the checkpoint's args' num_heads, else its relative position tables' (heads columns), else its size's in
    VIT_CONFIGS (by args' model, or by width and depth)."""
    args = checkpoint.get("args") or {}
    args = vars(args) if isinstance(args, argparse.Namespace) else args  # the official code's, read weights_only=False
    if model is not None and model not in VIT_CONFIGS:
        raise ValueError(f"unknown model {model!r}; valid names: {', '.join(VIT_CONFIGS)}")
    fits = [n for n, c in VIT_CONFIGS.items() if (c["embed_dim"], c["depth"]) == (width, depth)]
    if model is not None and model not in fits:
        config = VIT_CONFIGS[model]
        raise ValueError(f"{path!r} holds a ViT of width {width} and depth {depth}, but --model {model} has width "
                         f"{config['embed_dim']} and depth {config['depth']}; "
                         + (f"pass --model {fits[0]}" if fits else "no model size of this repo fits it"))
    name = args.get("model") if args.get("model") in fits else (fits[0] if fits else None)
    tables = [v for k, v in sd.items() if k.endswith("rel_pos_bias.table")]  # (offsets, heads)
    if args.get("num_heads"):
        return dict(embed_dim=width, depth=depth, num_heads=int(args["num_heads"]))
    if tables:
        return dict(embed_dim=width, depth=depth, num_heads=int(tables[0].shape[-1]))
    if name is None:
        raise ValueError(f"cannot tell the number of heads of the ViT in {path!r} (width {width}, depth {depth}); "
                         f"save args with 'model' (one of {', '.join(VIT_CONFIGS)}) or 'num_heads' in the checkpoint "
                         f"(a plain state dict sd: torch.save({{'model': sd, 'args': {{'num_heads': H}}}}, path))")
    return dict(VIT_CONFIGS[name])


def vit_from_checkpoint(checkpoint: dict, img_size, num_classes: int = 0, rel_pos_bias: str = None,
                        drop_path_rate: float = 0.0, model: str = None, path: str = "checkpoint",
                        source_grid=None) -> tuple:
    """The ViT in a checkpoint of this repo (pre-training, fine-tuning or segmentation) at img_size, weights loaded.

    Its shape (width, depth, patch size, MLP width, position tables, layer scale) is read off the weights, its number
    of heads from the checkpoint's args, else from its relative position tables, else from its size (VIT_CONFIGS: a
    checkpoint with neither and other heads than its size's needs args={"num_heads": H}); `model` (a --model name)
    must agree. Position tables are resized to the
    patch grid of img_size (adapt_state_dict; source_grid: the grid the checkpoint was trained at, needed where it is
    not square). The mask token is dropped.
      num_classes == 0: a feature extractor whose final norm is the checkpoint's `norm` (pre-training) or `fc_norm`
          (a fine-tuned classifier's last LayerNorm); a segmentation backbone has neither (a new LayerNorm).
      num_classes > 0: BEiT's classifier; `head` comes from the checkpoint when it has one for this number of
          classes, else starts afresh; `fc_norm` whenever the checkpoint has one (pre-training's final norm is not
          used, as in BEiT; nor is a head on the CLS token, an official classifier trained with --use_cls).
      rel_pos_bias: None keeps the stored layout; "per_block" moves a shared table into every block (adapt_state_dict).
          A checkpoint without relative position tables gives a model without them, whatever rel_pos_bias asks.
    Any other missing, unexpected or mis-shaped tensor is an error. Returns (vit, names initialized afresh).
    """
    sd = {k: v for k, v in vit_state_dict(checkpoint, path).items() if not k.startswith("mask_token")}
    width, _, patch_size, _ = sd["patch_embed.weight"].shape
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    config = _config_of(checkpoint, sd, width, depth, model, path)
    stored = stored_rel_pos_bias(sd)
    if rel_pos_bias is None or stored == "none":
        rel_pos_bias = stored
    elif rel_pos_bias != stored and rel_pos_bias != "per_block":
        raise ValueError(f"{path!r} has relative position tables laid out {stored!r}; they convert to per-block tables "
                         f"only (--rel_pos_bias per_block), not to {rel_pos_bias!r}")
    if num_classes == 0:
        if "norm.weight" not in sd and "fc_norm.weight" in sd:  # a fine-tuned classifier: its last LayerNorm
            sd["norm.weight"], sd["norm.bias"] = sd.pop("fc_norm.weight"), sd.pop("fc_norm.bias")
        sd = {k: v for k, v in sd.items() if not k.startswith(("fc_norm.", "head."))}
    else:
        # a head for other classes, or on the CLS token (BEiT's --use_cls: a final norm, no fc_norm) where this
        # classifier pools the patch tokens' mean: a new one
        if "head.weight" in sd and (sd["head.weight"].shape[0] != num_classes or "fc_norm.weight" not in sd):
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    vit = VisionTransformer(img_size=img_size, patch_size=patch_size, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0]
                            / width, drop_path_rate=drop_path_rate, layer_scale_init=0.1 if "blocks.0.gamma_1" in sd
                            else 0.0, rel_pos_bias=rel_pos_bias, abs_pos_emb="pos_embed" in sd, use_mask_token=False,
                            num_classes=num_classes, **config,
                            # only a new head is drawn; without one, the RNG draws stay as they were before 4ef51a2
                            weight_init="downstream" if num_classes > 0 else "pretrain")
    sd = adapt_state_dict(sd, vit, source_grid)
    expected = vit.state_dict()
    fresh = sorted(k for k in expected if k not in sd)
    problems = {"shape mismatches": [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                                     for k, v in sd.items() if k in expected and v.shape != expected[k].shape],
                "unexpected keys": sorted(k for k in sd if k not in expected),
                "missing keys": [k for k in fresh if not k.startswith(("norm.", "fc_norm.", "head."))]}
    if any(problems.values()):
        raise ValueError(f"{path!r} does not fit the ViT read off its weights: "
                         + "; ".join(f"{what}: {items}" for what, items in problems.items() if items))
    vit.load_state_dict(sd, strict=False)
    return vit, fresh


# ---------------------------------------------------------------------------------------------------
# Teachers: frozen modules with forward(images (B, 3, H, W)) -> targets (B, N, out_dim) and .out_dim


class FrozenTeacher(nn.Module):
    """Base of the teachers: no parameter trains, always in eval mode, forward under no_grad."""

    def freeze(self):
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):
        return super().train(False)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight, in_proj_bias, out_proj), batch first, fused SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x):
        B, T, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, T, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, C))


class CLIPResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CLIPAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CLIPVisual(nn.Module):
    """OpenAI CLIP's VisionTransformer with the official parameter names; forward returns DTM's targets.

    forward(images (B, 3, H, W)) -> ln_post(patch tokens) @ proj (B, N, output_dim): the CLS token is dropped, as
    in the official DTM code (vqkd_teacher/clip/model.py VisionTransformer.forward with return_all_tokens, then
    @ proj in engines/engine_for_dtm.py); project=False leaves out the projection (B, N, width). The positional
    embedding is resized bicubically (resize_pos_embed: F.interpolate to the new grid's size) if the input's patch
    grid differs from the checkpoint's. The official code resizes it with DINO's scale_factor (grid + 0.1) / 14
    instead (vqkd_teacher/clip/model.py VisionTransformer.interpolate_pos_encoding), which samples slightly other
    points: for CLIPVisual() built after torch.manual_seed(0), (1), (2), at 96 px the two differ by up to
    0.045-0.059 in entries of up to 0.13-0.14, so targets at sizes other than the checkpoint's are not the official
    code's; at 224 px neither resizes. Under autocast the residual stream and the LayerNorms stay in the weights'
    dtype, attention and MLP compute in autocast's (the official teacher's stream is fp16: README, "Recipe provenance").
    Random CLIP-like init; load real weights with load_clip_visual.
    """

    def __init__(self, input_resolution=224, patch_size=16, width=768, layers=12, heads=12, output_dim=512):
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"CLIP's width {width} does not split into {heads} heads (OpenAI's CLIP: width // 64)")
        self.patch_size, self.output_dim = patch_size, output_dim
        self.grid = (input_resolution // patch_size,) * 2
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid[0] * self.grid[1] + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        resblocks = nn.ModuleList([CLIPResidualBlock(width, heads) for _ in range(layers)])
        self.transformer = nn.ModuleDict(dict(resblocks=resblocks))  # keys transformer.resblocks.{i}.*
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, images, project: bool = True):
        _check_images(images, self.conv1.in_channels)
        H, W = images.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"CLIP input {H}x{W} is not divisible by its patch size {self.patch_size}; resize or "
                             f"crop the images to multiples of {self.patch_size}")
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, N, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        grid = (H // self.patch_size, W // self.patch_size)
        x = x + resize_pos_embed(self.positional_embedding, self.grid, grid).to(x.dtype)
        # the residual stream in the weights' dtype, as the student's: under CUDA's autocast layer_norm returns
        # float32 anyway; the CPU's ran the whole stream in bf16/fp16 (OpenAI's LayerNorm casts back to fp16: the
        # official teacher's stream is fp16 under autocast, vqkd_teacher/clip/model.py:168-174)
        x = self.ln_pre(x.to(self.class_embedding.dtype))
        for block in self.transformer.resblocks:
            x = block(x)
        x = self.ln_post(x[:, 1:])
        return x @ self.proj.to(x.dtype) if project else x


def _is_torchscript_archive(path: str) -> bool:
    # both torch.save and torch.jit.save write zip files; only TorchScript archives hold constants.pkl
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except Exception:  # a damaged file (BadZipFile, a name not in UTF-8, a zip version...): torch.load's error names it
        return False


_STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _ScriptObject:
    """A module object of a TorchScript archive as its data.pkl holds it: a dict of attributes, no code."""

    attributes: dict = {}

    def __setstate__(self, attributes: dict):
        if not isinstance(attributes, dict):
            raise _NotPlainWeights(f"an object whose state is a {type(attributes).__name__}")
        self.attributes = attributes


class _NotPlainWeights(Exception):
    pass


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if metadata:  # a conjugate or negative view's bits (torch._utils.set_tensor_metadata)
        raise _NotPlainWeights("tensors with metadata")
    return storage.as_strided(size, stride, offset)  # torch._utils._rebuild_tensor_v2's arguments


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl building only tensors, plain values and module objects: any other
    global is refused, and nothing in the archive is compiled or run."""

    def __init__(self, archive: zipfile.ZipFile, folder: str):
        super().__init__(archive.open(f"{folder}/data.pkl"))
        self.archive, self.folder, self.storages = archive, folder, {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch.jit._pickle" and (name.startswith("build_") or name == "restore_type_tag"):
            return lambda value, *type_tag: value  # typed lists of plain values or tensors: the list itself
        raise _NotPlainWeights(f"{module}.{name}")

    def persistent_load(self, pid):
        # ("storage", dtype, "0", "cpu" or "cuda:0", number of elements); data/0 holds its bytes
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise _NotPlainWeights(f"a persistent id {pid!r}")
        _, dtype, key, _, _ = pid
        if key not in self.storages:  # read once (the pickle's memo shares it too)
            data = bytearray(self.archive.read(f"{self.folder}/data/{key}"))
            self.storages[key] = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return self.storages[key]


def _tensor_attributes(obj: _ScriptObject, prefix: str = ""):
    for name, value in obj.attributes.items():
        if torch.is_tensor(value):
            yield prefix + name, value
        elif isinstance(value, _ScriptObject):  # a submodule
            yield from _tensor_attributes(value, f"{prefix}{name}.")


def _read_torchscript_tensors(path: str) -> dict:
    """The tensors of a TorchScript archive's modules by their state-dict names, read without torch.jit.load (which
    is deprecated and compiles the archive's code): every tensor attribute, which for a traced module (parameters,
    buffers and submodules only) is its state dict; a scripted module's other tensor attributes come too. An archive
    that holds other objects than tensors, plain values and modules, or that this reader cannot read, goes to
    torch.jit.load."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            pickles = [n for n in sorted(names) if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pickles:
                raise _NotPlainWeights("no data.pkl")
            folder = pickles[0][:-len("/data.pkl")]
            if f"{folder}/byteorder" in names and archive.read(f"{folder}/byteorder").strip() != b"little":
                raise _NotPlainWeights("big-endian tensors")
            root = _ArchiveUnpickler(archive, folder).load()
        if not isinstance(root, _ScriptObject):
            raise _NotPlainWeights(f"a {type(root).__name__} at its root")
        return dict(_tensor_attributes(root))
    except _NotPlainWeights as e:
        why = f"holds {e}, which only torch.jit.load reads"
    except Exception as e:
        why = f"this reader cannot read ({type(e).__name__}: {str(e).strip()[:200]})"
    try:
        return torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as e:
        raise ValueError(f"{path!r} is a TorchScript archive that {why}, and torch.jit.load failed too "
                         f"({type(e).__name__}: {str(e).strip()[:200]}): a damaged or truncated file (an interrupted "
                         f"copy?), or one that only another torch's torch.jit.load reads; there, save its state dict: "
                         f"python -c \"import sys, torch; torch.save(torch.jit.load(sys.argv[1], map_location='cpu')"
                         f".state_dict(), 'clip_state_dict.pt')\" {shlex.quote(path)} and pass that file") from None


def _read_clip_state_dict(path: str) -> dict:
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith((".pt", ".pth")))
        raise ValueError(f"CLIP weights {path!r} is a folder; pass the weights file"
                         + (f", e.g. {shlex.quote(os.path.join(path, found[0]))}" if found else
                            " (it holds no .pt or .pth file)"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP weights file not found: {path!r}. Pass the local path of OpenAI's ViT-B-16.pt "
                                f"(the file clip.load('ViT-B/16') downloads) or of a state dict saved with torch.save")
    if _is_torchscript_archive(path):
        return _read_torchscript_tensors(path)
    obj = _torch_load(path, "--teacher clip:")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and ("kind" in obj or "args" in obj):
        raise ValueError(f"{path!r} is a checkpoint of this repo ({obj.get('kind', 'no kind')}), not CLIP weights; "
                         f"to use it as the teacher pass --teacher ckpt:{path}")
    for wrapper in ("state_dict", "model"):  # a state dict saved inside a dict under one of these keys
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} does not hold a state dict (a dict of tensors); got {type(obj).__name__}: pass "
                         f"OpenAI's ViT-B-16.pt or torch.save(model.visual.state_dict(), PATH) of a CLIP model")
    not_tensors = {str(k): type(v).__name__ for k, v in obj.items() if not torch.is_tensor(v)}
    if not_tensors or not obj:
        shown = ", ".join(f"{k!r}: {t}" for k, t in list(not_tensors.items())[:8]) or "it is empty"
        raise ValueError(f"{path!r} does not hold a CLIP state dict: every value must be a tensor, but it holds "
                         f"{len(not_tensors)} that are not ({shown}); pass OpenAI's ViT-B-16.pt or a state dict "
                         f"saved with torch.save(model.state_dict(), path)")
    return obj


def load_clip_visual(path: str, heads: int = None) -> CLIPVisual:
    """CLIPVisual with the weights of the file `path`: the official TorchScript file or a (full-model or visual) state
    dict saved with torch.save (a state dict in memory: CLIPVisual(...).load_state_dict(sd)).

    width, layers, patch size, resolution and output dim are read off the tensor shapes; heads = width // 64
    as in OpenAI's build_model unless given. Weights are cast to float32.
    """
    sd = _read_clip_state_dict(path)
    if any(k.startswith("visual.") for k in sd):  # a full CLIP model: keep the image tower
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    needed = ["conv1.weight", "positional_embedding", "proj", "transformer.resblocks.0.attn.in_proj_weight"]
    absent = [k for k in needed if k not in sd]
    if absent:
        ours = "patch_embed.weight" in sd or "patch_embed.proj.weight" in sd  # a ViT of this repo (or timm's names)
        raise ValueError(f"{path!r} is not a CLIP ViT visual state dict: missing {absent}; "
                         f"found keys like {sorted(sd)[:8]}; "
                         + (f"it holds a ViT of this repo: pass it as --teacher ckpt:{path}" if ours else
                            "pass OpenAI's ViT-B-16.pt (the file clip.load('ViT-B/16') downloads) or a state dict "
                            "of a CLIP model or of its visual encoder, saved with torch.save"))
    width, _, patch_size, _ = sd["conv1.weight"].shape
    grid = math.isqrt(sd["positional_embedding"].shape[0] - 1)
    if grid * grid + 1 != sd["positional_embedding"].shape[0]:
        raise ValueError(f"{path!r}: positional_embedding has {sd['positional_embedding'].shape[0]} rows, "
                         f"not 1 + a square grid of patches; pass OpenAI's ViT-B-16.pt or the encoder's own weights, "
                         f"torch.save(model.visual.state_dict(), PATH)")
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    model = CLIPVisual(grid * patch_size, patch_size, width, layers, heads or width // 64, sd["proj"].shape[1])
    expected = model.state_dict().keys()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path!r} does not match OpenAI CLIP's visual encoder: missing keys {missing}, "
                         f"unexpected keys {unexpected}; pass OpenAI's ViT-B-16.pt or the encoder's own weights, "
                         f"torch.save(model.visual.state_dict(), PATH)")
    shapes = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(shapes[k].shape)})" for k, v in sd.items()
             if v.shape != shapes[k].shape]
    if wrong:
        raise ValueError(f"{path!r} does not match OpenAI CLIP's visual encoder read off its weights: {wrong[:3]}")
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model


class CLIPTeacher(FrozenTeacher):
    """Frozen CLIP visual encoder. teacher_norm "imagenet" (official DTM: the teacher gets the student's crop,
    engines/engine_for_dtm.py:120-126, ImageNet-normalized by the flag --imagenet_default_mean_and_std that the command
    in docs/Training.md passes; run_pretrain_dtm.py's own default is the 0.5 mean/std) or "clip"
    (re-normalize to CLIP's own mean/std first). project=False: targets ln_post(tokens) of the CLIP width without
    the projection (the official --no_clip_proj, engines/engine_for_dtm.py)."""

    def __init__(self, visual: CLIPVisual, teacher_norm: str = "imagenet", project: bool = True):
        super().__init__()
        if teacher_norm not in ("imagenet", "clip"):
            raise ValueError(f"teacher_norm must be 'imagenet' or 'clip', got {teacher_norm!r}")
        self.visual, self.teacher_norm, self.project = visual, teacher_norm, project
        self.out_dim = visual.output_dim if project else visual.ln_post.normalized_shape[0]
        self.patch_size = visual.patch_size
        # x_clip = (x * std_in + mean_in - mean_clip) / std_clip = x * scale + shift
        imnet_mean, imnet_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        self.register_buffer("scale", (imnet_std / clip_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((imnet_mean - clip_mean) / clip_std).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @torch.no_grad()
    def forward(self, images):
        if self.teacher_norm == "clip":
            images = images * self.scale + self.shift
        return self.visual(images, self.project)


class PixelTeacher(FrozenTeacher):
    """Per-patch normalized pixels (MAE's norm_pix): each patch's p*p*3 values minus their mean, over their std."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, eps: float = 1e-6):
        super().__init__()
        self.patch_size, self.eps, self.out_dim = patch_size, eps, patch_size * patch_size * in_chans
        self.in_chans = in_chans

    @torch.no_grad()
    def forward(self, images):
        _check_images(images, self.in_chans, floats=False)  # integer pixels: standardized per patch in float32
        B, C, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image {H}x{W} is not divisible by the patch size {p}; resize or crop the images to "
                             f"multiples of {p}")
        x = images.to(torch.promote_types(images.dtype, torch.float32))  # float64 stays float64, as in dtm_loss
        x = x.reshape(B, C, H // p, p, W // p, p)
        # MAE's patchify order (models_mae.py patchify); a permute, not einsum, which CUDA's autocast would run in
        # bf16/fp16
        x = x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)
        mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)  # unbiased var, as MAE's forward_loss
        return (x - mean) / (var + self.eps).sqrt()


class CkptTeacher(FrozenTeacher):
    """A checkpoint of this repo (pre-training, fine-tuning or segmentation) as a frozen teacher (MaskDistill-style).

    Targets are the final normalized patch tokens (B, N, embed_dim) of the ViT that vit_from_checkpoint builds: its
    `norm` for a pre-trained model, the `fc_norm` it was trained with for a fine-tuned classifier (applied per token),
    a plain LayerNorm for a segmentation backbone (which has none of its own).
    """

    def __init__(self, path: str, img_size=224):
        super().__init__()
        self.vit, _ = vit_from_checkpoint(read_checkpoint(path, "--teacher ckpt:"), img_size, path=path)
        self.out_dim, self.patch_size = self.vit.embed_dim, self.vit.patch_size
        self.freeze()

    @torch.no_grad()
    def forward(self, images):
        return self.vit.forward_features(images).tokens[:, 1:]


def build_teacher(spec: str, img_size=224, patch_size: int = 16, teacher_norm: str = "imagenet",
                  clip_proj: bool = True) -> FrozenTeacher:
    """Teacher from --teacher: "clip:PATH" | "ckpt:PATH" | "pixels". Its patch grid must match the student's.
    teacher_norm and clip_proj apply to a CLIP teacher (see CLIPTeacher)."""
    kind, _, path = spec.partition(":")
    if kind == "pixels" and not path:
        teacher = PixelTeacher(patch_size)
    elif kind == "clip" and path:
        teacher = CLIPTeacher(load_clip_visual(path), teacher_norm, clip_proj)
    elif kind == "ckpt" and path:
        teacher = CkptTeacher(path, img_size)
    else:
        raise ValueError(f"unknown teacher {spec!r}; use 'clip:PATH' (OpenAI CLIP ViT-B-16.pt), "
                         f"'ckpt:PATH' (a checkpoint of this repo) or 'pixels'")
    if teacher.patch_size != patch_size:
        raise ValueError(f"teacher {spec!r} has patch size {teacher.patch_size} but the student {patch_size}: "
                         f"their token grids must match: "
                         f"pass a teacher of patch size {patch_size}"
                         + (" (OpenAI's ViT-B-16.pt)" if kind == "clip" and patch_size == 16 else "")
                         + ", or --teacher pixels")
    return teacher


# ---------------------------------------------------------------------------------------------------
# The DTM objective

LOSSES = ("smooth_l1", "l2", "cosine")


def standardize(x, eps: float = 1e-6):
    """Each token standardized over its channels: (x - mean) / sqrt(var + eps), var unbiased (the official
    --normalize_target, engines/engine_for_dtm.py)."""
    return (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, keepdim=True) + eps).sqrt()


def _per_group_loss(pred, target, residual, groups, num_groups: int, loss: str, beta: float, normalize_target: bool):
    """Loss of every morphed token (B, num_groups), averaged over channels (for a group id without members: 0, or 1
    with the cosine loss; dtm_loss never reads those).

    Group means are linear, mean(pred) - mean(target) = mean(pred - target), so the smooth-L1 and l2 losses
    need one scatter of the residual per level instead of two; the cosine loss and standardized targets need both.
    """
    if loss == "cosine" or normalize_target:
        pred, target = morph.group_mean(pred, groups, num_groups), morph.group_mean(target, groups, num_groups)
        target = standardize(target) if normalize_target else target
        if loss == "cosine":  # 1 - cosine similarity: 0 for a perfect prediction
            return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)
        residual = pred - target
    else:
        residual = morph.group_mean(residual, groups, num_groups)  # (B, G, D)
    if loss == "smooth_l1":
        zero = residual.new_zeros(()).expand_as(residual)
        return F.smooth_l1_loss(residual, zero, reduction="none", beta=beta).mean(-1)
    if loss == "l2":
        return residual.pow(2).mean(dim=-1)
    raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}")


def dtm_loss(pred, target, groups, mask=None, loss: str = "smooth_l1", beta: float = 2.0, loss_on: str = "all",
             num_groups=None, normalize_target: bool = False):
    """The DTM loss averaged over levels; returns (loss, [loss of each level]).

    pred: student predictions (B, N, D); target: teacher targets (B, N, D); groups: one partition (B, N) per level,
    from morph.token_morphing_levels; num_groups: the number of groups of each level (morph.num_groups_after of its
    schedule), or None to use N, an upper bound (same loss, more work); mask: (B, N) bool, True = masked (needed by
    loss_on="masked"). Every patch position holds its group's mean prediction and target, so a level's loss is sum
    over positions i of w_i * l(group g(i)) / max(sum_i w_i, 1), with w_i = 1 (loss_on="all", the official code:
    groups weighted by their size) or w_i = mask_i (loss_on="masked": a group is weighted by its number of
    masked members, its means still taken over all members, visible ones included; no masked patch: 0).
    normalize_target: each morphed target standardized over its channels first (standardize).
    Computed in float32 whatever the autocast dtype (float64 inputs in float64). (The official code divides a group's
    sum by its size + 1e-6, a relative difference of at most 1e-6 that this exact mean leaves out.)
    """
    if loss_on not in ("all", "masked"):
        raise ValueError(f"loss_on must be 'all' or 'masked', got {loss_on!r}")
    if pred.dim() == target.dim() == 3 and pred.shape[1] != target.shape[1]:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in their number of "
                         f"tokens; the targets need one per patch of the student, in its order, without a CLS token "
                         f"(a ViT teacher's tokens[:, 1:]) and from a teacher of the student's patch grid")
    if pred.shape != target.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape; pass "
                         f"both (B, N, D), the predictions projected to the targets' width D")
    if torch.is_tensor(groups) or not groups:
        raise ValueError("groups must be a list with one (B, N) tensor per morphing level (at least one; "
                         "[torch.arange(N).expand(B, N)] for no morphing)")
    if num_groups is not None and not hasattr(num_groups, "__len__"):
        raise ValueError(f"num_groups must be a list with one number of groups per level, got {num_groups!r}: pass "
                         f"[{num_groups!r}]")
    if num_groups is not None and len(num_groups) != len(groups):
        raise ValueError(f"num_groups has {len(num_groups)} entries for {len(groups)} levels of groups")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    if loss_on == "masked":
        if mask is None:
            raise ValueError(f"loss_on='masked' needs the mask: pass mask=, the (B, N) = {tuple(pred.shape[:2])} bool "
                             f"mask of masked patches (True = masked)")
        if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.shape != pred.shape[:2]:
            got = f"{mask.dtype} {tuple(mask.shape)}" if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(f"loss_on='masked' needs the (B, N) = {tuple(pred.shape[:2])} bool mask of masked patches "
                             f"(True = masked; a (B, H, W) mask: mask.flatten(1)), got {got}")
        weight = mask.to(dtype)
    else:
        weight = torch.ones(pred.shape[:2], device=pred.device, dtype=dtype)
    pred, target = pred.to(dtype), target.to(dtype)
    residual = pred - target if loss != "cosine" and not normalize_target else None
    level_losses = []
    for level_groups, G in zip(groups, num_groups or [pred.shape[1]] * len(groups)):
        per_group = _per_group_loss(pred, target, residual, level_groups, G, loss, beta, normalize_target)  # (B, G)
        per_position = per_group.gather(1, level_groups)  # (B, N): each position holds its group's loss
        level_losses.append((per_position * weight).sum() / weight.sum().clamp(min=1.0))
    return torch.stack(level_losses).mean(), level_losses


class DTMPretrainModel(nn.Module):
    """Student ViT + linear head to the teacher's dimension, trained with dtm_loss.

    The teacher and the morphing stay outside (so DDP wraps only what trains); per step:
        targets = teacher(images)                                                   # (B, N, D), no grad
        schedules = [morph.sample_schedule(...) for _ in range(L)]
        groups = morph.token_morphing_levels(targets, schedules, split)             # [(B, N)] per level
        loss, stats = model(images, mask, targets, groups, [morph.num_groups_after(N, s, split) for s in schedules])
    """

    def __init__(self, student: VisionTransformer, target_dim: int, loss: str = "smooth_l1", beta: float = 2.0,
                 loss_on: str = "all", normalize_target: bool = False, features_fn=None):
        """features_fn: None (student.forward_features(images, mask).tokens) or a callable (student, images, mask) ->
        (tokens (B, 1 + N, C), extra loss added to the DTM loss, stats dict), e.g. mto.MTO(cfg); it runs inside
        forward so that DDP sees it."""
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}")
        if loss_on not in ("all", "masked"):
            raise ValueError(f"loss_on must be 'all' or 'masked', got {loss_on!r}")
        self.student, self.loss, self.beta, self.loss_on = student, loss, beta, loss_on
        self.normalize_target, self.features_fn = normalize_target, features_fn
        self.head = nn.Linear(student.embed_dim, target_dim)
        _trunc_normal_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images, mask, targets, groups, num_groups=None, mask_sizes=None):
        """images (B, 3, H, W), mask (B, N) bool, targets (B, N, D), groups [(B, N)] per level and their numbers of
        groups (see dtm_loss) -> (loss, stats). mask_sizes (mto.mask_sizes of the mask's CPU copy), where given, is
        handed on to features_fn as its keyword mask_sizes (MTO's, to skip a host sync).

        stats: "loss" and "loss_level{i}" as detached tensors; with a features_fn also "loss_dtm" (the DTM part of
        "loss") and the features_fn's stats.
        """
        if self.features_fn is None:
            tokens, extra_loss, extra_stats = self.student.forward_features(images, mask).tokens, None, {}
        else:
            sizes = {} if mask_sizes is None else {"mask_sizes": mask_sizes}
            tokens, extra_loss, extra_stats = self.features_fn(self.student, images, mask, **sizes)
        pred = self.head(tokens[:, 1:])  # (B, N, D)
        loss, level_losses = dtm_loss(pred, targets, groups, mask, self.loss, self.beta, self.loss_on, num_groups,
                                      self.normalize_target)
        if extra_loss is not None:
            extra_stats = {"loss_dtm": loss.detach(), **extra_stats}
            loss = loss + extra_loss
        stats = {"loss": loss.detach(), **extra_stats}
        for i, level_loss in enumerate(level_losses):
            stats[f"loss_level{i}"] = level_loss.detach()
        return loss, stats
