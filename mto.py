"""Masked Token Optimization (MTO) for ViT encoders that see mask tokens (SimMIM / BEiT / DTM students).

"Emerging Property of Masked Token for Effective Pre-training" (Choi et al., ECCV 2024). torch only; the ViT it
drives is any model with the interface described under "Use" at the end (dtm.VisionTransformer has it).

What the paper says, in its own words (the full equations were not available when this file was written). The
abstract (arXiv 2404.08330) names the key property of masked tokens "data singularity"; the ECCV 2024 version's
abstract (Springer, pages 272-289) names it "data distinctiveness", and both name "weight recalibration". The ECCV
abstract also names the authors' code, github.com/doihye/MTO, which could not be read offline: compare with it before
relying on anything below being the paper's method. The other
quotes below were recorded when this file was written as from the paper's project page; neither abstract contains
them, and that page could not be found again offline, so read them as unverified:
  - a masked token "should be unique", with "a low likelihood of manifesting in the training data";
  - MTO "encompasses the selective exclusion of semantically inconsequential masked tokens from the weight
    aggregation process pertaining to visible tokens, and at the same time, it enforces data singularity
    constraints based on the depth of the layer";
  - "minimizing the entropy of each row in a row-wise softmax layer forces the model to focus its attention on the
    most salient visible tokens";
  - the method is weight recalibration plus losses built on an entropy-based heterogeneity measure between masked
    and visible tokens.
Public summaries add (third-party, not the paper's words; read 2026-12-02): the losses are three, named L_spa, L_e and
L_r (sciencestack.ai's TL;DR of arXiv 2404.08330); a machine-written summary of the PDF (linnk.ai) describes them as
a loss that keeps masked tokens from affecting the visible tokens' learning, a loss that maximizes the heterogeneity
of masked and visible tokens in the early layers, and a rank loss that lets it decrease gradually in later layers.
How this file's terms relate to those names is a guess, the equations being unknown: recalibration_mask does the
first by exclusion (a hard mask, not a loss); singularity_loss and attention_entropy (L_e by its name) push the
heterogeneity up, most in the first blocks; nothing here is a rank loss (L_r): the depth weights below are a fixed
linear decay, not a loss that orders the blocks' heterogeneity.

What this file makes of it (THIS IMPLEMENTATION'S READING, not the paper's equations):
  1. Weight recalibration (recalibration_mask). In the attention of the first `layers` blocks (default: all),
     queries of visible tokens and of CLS get no weight on masked-token keys: their softmax renormalizes over
     CLS + visible patches. Queries of masked tokens still attend to every token. recalibration_mask returns it
     as a boolean (B, 1, T, T), True = may attend; mto_forward hands the blocks the same mask as an additive
     float one (0 where allowed, -inf elsewhere), which SDPA's memory-efficient kernel takes. With it in every
     block, visible tokens and CLS do not depend on the mask
     token at all (the encoder acts like MAE's on the visible set, the mask tokens read from it).
  2. Singularity (heterogeneity) loss (singularity_loss). At the output of block l (before the final norm), for
     each masked patch i of an image: s_i = max over visible patches j of the same image of cos(h_i, h_j);
     L_sing(l) = mean of s_i over the masked patches of the image. The visible side is detached (stop-gradient):
     the constraint moves the masked-token representations away from the data, not the data's representations.
     CLS is not a "visible token" here (it is not a patch of the image). Only the masked rows and visible columns
     of the similarity are computed: (B, M, V), 75 x 121 of ViT-B's 196 patches, not (B, N, N), and without
     gradient: the gradient flows through the cosine to the nearest visible patch, recomputed for it.
  3. Entropy loss (attention_entropy). In block l's attention: the row of each masked query, restricted to the
     visible patch keys and renormalized over them (CLS excluded, so putting all weight on CLS cannot game it), has
     entropy H_i; divided by log(#visible) so it lies in [0, 1] whatever the mask ratio or image size; averaged over
     heads, then over the masked queries of the image. Minimizing it makes masked tokens attend to few salient
     visible tokens. A softmax restricted to some keys and renormalized is the softmax of those keys' logits, so
     the loss needs only the masked queries' logits against the visible keys, computed from the block's queries,
     keys and bias (dtm.Features.qk): (B, heads, M, V) in float32, while the block's attention itself stays in
     fused SDPA. (An earlier version took the full (B, heads, T, T) probabilities from an explicit softmax; the
     tests check that the values are the same.)
  Depth schedule (both losses; "based on the depth of the layer"): over the first K blocks the loss is on
  (K = sing_layers / ent_layers, default all), block l (0-based) of a depth-D ViT gets weight
  w_l = (D - l) / sum_{l' < K} (D - l'): linear decay, strongest in the first block, weights summing to 1.
  Per-sample losses: each image's loss is computed on its own tokens, the batch loss is the plain mean over images
  (an image with no masked or no visible patch contributes 0), so the loss does not depend on how a batch is split
  over GPUs. Losses are computed in float32 under autocast, float64 for float64 inputs (their matmuls in TF32 where
  the trainer turns TF32 on: the singularity loss's choice of the nearest visible patch can then differ at near ties;
  the cosine to it is computed without a matmul). Their backward passes are written by hand: create_graph=True
  (double backward) through them is refused, compiled too.
  mto_forward computes each loss for a group of blocks at once (singularity_losses, attention_entropies: a group's
  rows taken into one buffer, then one set of ops), as many blocks as keep each intermediate within GROUP_ELEMENTS;
  block by block, the losses' small ops made an H200 step of ViT-B at batch 64 wait on the host's kernel launches
  (MTO +75% over DTM; in groups +38%, docs/RESULTS.md section 3).
  Total loss = base loss + lambda_sing * L_sing + lambda_ent * L_ent. The default lambdas (0.1, 0.1) are this
  implementation's choice, not tuned and not from the paper.

Use:
    cfg = MTOConfig(lambda_sing=0.1, lambda_ent=0.1)              # or mto_config_from_args(args) after add_mto_args
    tokens, losses = mto_forward(vit, images, mask, cfg, num_prefix=1)  # 1 = CLS; CLS + 4 registers: 5
    # (a timm ViT's: its num_prefix_tokens, 0 with class_token=False and no registers)
    # tokens (B, num_prefix + N, C); losses["loss_sing"], losses["loss_ent"]
    loss = base_loss(tokens) + mto_total_loss(losses, cfg)
    # on a GPU, pass the counts of the loader's CPU mask (then MTO waits for nothing queued before it):
    #   sizes = mask_sizes(cpu_mask); mask = cpu_mask.cuda(non_blocking=True); mto_forward(..., mask_sizes=sizes)
or, with DDP, inside the wrapped module's forward: tokens, mto_loss, stats = MTO(cfg, num_prefix)(vit, images, mask)
(mto_loss lambda-weighted; in this repo dtm.DTMPretrainModel(student, dim, features_fn=MTO(cfg)) does so).

The ViT (`vit` above) needs, with T = num_prefix + N tokens (num_prefix: CLS and any register tokens, default 1):
    vit.blocks: its D blocks (only len() is read);
    vit.forward_features(images, mask, attn_mask, return_layers=[...], return_qk=[...]) -> an object with
        .tokens (B, T, C), after the final norm;
        .layers {i: block i's output (B, T, C), before the final norm} for each i in return_layers;
        .qk {i: (q, k, bias)} for each i in return_qk: q, k (B, heads, T, head_dim) as they enter the attention
            (after any q/k norm), q before the 1/sqrt(head_dim) scale (the entropy's logits take SDPA's default
            scale: an attention with another scale or a temperature returns q times scale * sqrt(head_dim)); bias
            the relative position bias (heads, T, T) or None, without the attention mask (timm's Attention: the
            outputs of its q_norm and k_norm, e.g. taken by forward hooks on them, bias None);
    where mask (B, N) bool says which patches the ViT replaces by its own mask token, return_layers and return_qk
    (passed by keyword) are lists of 0-based block indices, and attn_mask is a list with one entry per block:
    None or a float32 (B, 1, T, T) added to the attention logits (SDPA's attn_mask), 0 = may attend, -inf = may not
    (an attention that adds it by hand in bf16/fp16 casts it to the logits' dtype first: timm's Block takes it as
    block(x, attn_mask=m), and its Attention with fused_attn=False adds it by hand: in a timm model cast to bf16/fp16
    pass block(x, attn_mask=m.to(x.dtype)), else "expected m1 and m2 to have the same dtype"). Every block that has one
    gets the same tensor: add to it out of place (mask + bias), never in place. nn.MultiheadAttention (torchvision's
    ViT) takes a 3-D mask, (B * heads, T, T): m.expand(B, heads, T, T).reshape(B * heads, T, T); its bool masks mean
    the opposite (True = may NOT attend: ~recalibration_mask(...), expanded alike). It returns no q and k, so the
    entropy loss needs them recomputed from its in_proj_weight (or lambda_ent=0). A check of an adapter:
    with recalibration in every block, the CLS and visible tokens' outputs do not change when the mask token does,
    and the masked tokens' outputs do (change it by a random vector: LayerNorm removes a constant shift, and an
    adapter that never puts the mask token in passes the first half alone).
    A ViT with timm's `num_prefix_tokens` attribute (dtm.VisionTransformer has it) has it checked against num_prefix;
    an adapter that wraps a timm ViT copies it (self.num_prefix_tokens = vit.num_prefix_tokens): without it, a wrong
    num_prefix shows as a size mismatch of T inside the ViT's attention. torch.compile: compile
    the blocks (for block in vit.blocks: block.compile()) or vit.forward_features = torch.compile(vit.forward_features);
    torch.compile(vit) compiles vit.forward, which mto_forward does not call, and mto_forward itself reads the mask's
    counts on the host (patch_rows) unless given mask_sizes, which breaks a compiled graph there. With mask_sizes a
    compiled caller of mto_forward (a model that calls it, dtm.DTMPretrainModel with MTO) is one graph (fullgraph=True
    too), and one more once the number of masked patches changes (then symbolic), not one per number. torch.func's
    transforms refuse the losses (autograd.Functions without setup_context), torch.jit.trace is refused (patch_rows);
    torch.utils.checkpoint: use use_reentrant=False (around mto_forward or MTO(cfg)(vit, images, mask): the same
    gradients). use_reentrant=True keeps the graph of top-level tensor outputs only: mto_forward's losses, in a dict,
    come back without one (their values right, no gradient, no error), and where no tensor input needs a gradient (a
    trainer's images and mask) nothing comes back with one: the ViT gets no gradient, with a UserWarning only.
    MTOConfig(compile=True) compiles the losses' arithmetic (one graph per loss and group size, and per mask layout:
    images with equal or different numbers of masked patches, blocks with or without a bias).
"""
import functools
import inspect
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

NUM_PREFIX = 1  # tokens before the patches (CLS) in the ViTs of this repo


@dataclass
class MTOConfig:
    """layers / sing_layers / ent_layers: the first K blocks where recalibration / each loss is on (None = all blocks,
    0 = off). A lambda of 0 switches its loss off and skips its computation. compile: torch.compile the losses'
    arithmetic (see _compiled; train_pretrain.py --compile sets it): the same values and gradients."""
    layers: Optional[int] = None
    lambda_sing: float = 0.1
    lambda_ent: float = 0.1
    sing_layers: Optional[int] = None
    ent_layers: Optional[int] = None
    compile: bool = False

    def __post_init__(self):
        # the upper bound, the ViT's depth, is checked in mto_forward
        for name in ("layers", "sing_layers", "ent_layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0):
                raise ValueError(f"MTOConfig.{name} must be a block count >= 0 or None (all blocks), got {value!r}")
        for name in ("lambda_sing", "lambda_ent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < float("inf"):
                raise ValueError(f"MTOConfig.{name} must be finite and >= 0 (0 switches the loss off), got {value!r}")


def _check_mask(mask, num_prefix: int = 0):
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.dim() != 2:
        got = f"{mask.dtype} {tuple(mask.shape)}" if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"MTO needs the (B, N) bool mask of masked patches (True = masked), got {got} (a 0/1 mask: "
                         f"mask.bool(); a (B, H, W) one: mask.flatten(1))")
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, numbers.Integral) or num_prefix < 0:
        raise ValueError(f"num_prefix must be the number of tokens before the patches, an int >= 0 (1 for CLS, 0 "
                         f"without one, CLS + registers for a ViT with registers), got {num_prefix!r}")


def recalibration_mask(mask, num_prefix: int = NUM_PREFIX):
    """mask (B, N) bool, True = masked patch -> attention mask (B, 1, T, T) bool, True = may attend, T = num_prefix + N.

    Query q may attend to key k unless q is visible (prefix or unmasked patch) and k is a masked patch.
    """
    _check_mask(mask, num_prefix)
    B = mask.shape[0]
    masked = torch.cat([mask.new_zeros(B, num_prefix), mask], dim=1)  # (B, T); prefix tokens are never masked
    return (masked[:, :, None] | ~masked[:, None, :]).unsqueeze(1)  # (B, 1, T, T): masked query or visible key


def depth_weights(depth: int, num_layers: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(depth,) float: w_l proportional to depth - l for the first num_layers blocks, 0 after; sums to 1. Made on
    `device` (a copy from the host to a GPU would wait for the GPU's queue; MTO syncs only to read the mask's sizes:
    mask_sizes, patch_rows without them), in `dtype` (the losses': float64 weights for float64 losses)."""
    if not 0 <= num_layers <= depth:
        raise ValueError(f"number of MTO loss layers must be in 0..{depth} (the ViT's depth), got {num_layers}")
    w = torch.arange(depth, 0, -1, dtype=dtype, device=device)  # D, D-1, ..., 1
    w[num_layers:] = 0
    return w / w.sum().clamp(min=1.0)


class Rows(NamedTuple):
    """Each image's masked and visible patch indices (ascending), padded to the most in the batch: masked (B, M),
    masked_valid (B, M) bool (False on padding); visible (B, V), visible_valid (B, V); visible_padded: whether any
    visible_valid is False (not with a fixed number of masked patches per image, as BlockMaskGenerator makes); mask:
    the (B, N) mask they were taken from (the losses check that they are given the same)."""
    masked: torch.Tensor
    masked_valid: torch.Tensor
    visible: torch.Tensor
    visible_valid: torch.Tensor
    visible_padded: bool
    mask: Optional[torch.Tensor] = None


class MaskSizes(NamedTuple):
    """Python ints read off a (B, N) mask: the most masked patches of an image, the most and the fewest visible."""
    most_masked: int
    most_visible: int
    fewest_visible: int


def mask_sizes(mask) -> MaskSizes:
    """(B, N) bool, True = masked -> MaskSizes. Read on the host: for a mask on a GPU a host sync (the host waits for
    all the work queued before it); for the loader's CPU copy of the mask none. A trainer passes the CPU copy's to
    mto_forward (mask_sizes=...), so MTO queues its work without waiting for the teacher's and the morphing's."""
    _check_mask(mask)
    return _sizes_of(mask.sum(dim=1), mask.shape[1])


def _sizes_of(masked_counts, N: int) -> MaskSizes:
    """(B,) masked patches per image of N -> MaskSizes (read on the host)."""
    most_masked, fewest_masked = torch.stack([masked_counts.amax(), masked_counts.amin()]).tolist()
    return MaskSizes(most_masked, N - fewest_masked, N - most_masked)


def _check_sizes(sizes, mask):
    """sizes as MaskSizes of Python ints, refused here where they cannot be those of any mask like mask."""
    N = mask.shape[1]
    if not (isinstance(sizes, (tuple, list)) and len(sizes) == 3
            and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in sizes)):
        raise ValueError(f"mask_sizes must be three ints, mto.mask_sizes(mask) of this very mask (or of its copy on "
                         f"the CPU), got {sizes!r}")
    sizes = MaskSizes(*map(int, sizes))
    if not (0 <= sizes[0] <= N and 0 <= sizes[2] <= sizes[1] <= N and sizes[0] + sizes[2] == N):
        raise ValueError(f"mask_sizes {tuple(sizes)} are not those of a mask of {N} patches: pass mto.mask_sizes(mask) "
                         f"of this very mask (or of its copy on the CPU)")
    return sizes


def patch_rows(mask, sizes: Optional[MaskSizes] = None) -> Rows:
    """(B, N) bool, True = masked -> Rows. sizes: mask_sizes(mask), given by the caller (from a copy of the mask on
    the CPU) or read here (a host sync for a mask on a GPU). Given sizes that are not the mask's (e.g. a previous
    step's) would cut patches off the rows: they fail where the mask is, without the host waiting for it (on the CPU a
    RuntimeError; on a GPU a device-side assert, which ends the process). Refused under torch.jit.trace, which would
    keep the traced mask's sizes as constants: another mask's rows cut short or padded, the losses wrong silently."""
    _check_mask(mask)
    if torch.jit.is_tracing():
        raise RuntimeError("MTO's losses cannot be traced (torch.jit.trace): the rows they read would be the traced "
                           "mask's, and another mask's losses wrong; trace the ViT alone and compute MTO eagerly, or "
                           "use torch.compile")
    masked_counts = mask.sum(dim=1)  # (B,)
    counts = torch.stack([masked_counts, mask.shape[1] - masked_counts])  # (2, B): masked, visible
    if sizes is None:
        sizes = _sizes_of(masked_counts, mask.shape[1])  # a host sync for a mask on a GPU
    else:
        sizes = _check_sizes(sizes, mask)  # the message below names no sizes: under torch.compile they can be symbolic,
        # and formatting them broke the graph
        torch._assert_async((counts[0].amax() == sizes.most_masked) & (counts[1].amax() == sizes.most_visible),
                            "mask_sizes are not this mask's (most masked, most and fewest visible patches of an "
                            "image): pass mto.mask_sizes(mask) of this very mask (or of its CPU copy)")
    M, V = max(sizes.most_masked, 1), max(sizes.most_visible, 1)
    masked = mask.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :M]  # stable: ascending indices
    visible = (~mask).to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :V]
    arange = torch.arange(max(M, V), device=mask.device)
    return Rows(masked, arange[:M] < counts[0, :, None], visible, arange[:V] < counts[1, :, None],
                sizes.fewest_visible < V, mask)


def _rows_for(mask, rows: Optional[Rows]) -> Rows:
    """rows = patch_rows(mask) if None, else rows checked to be this mask's: another mask's rows would take other
    patches without a word. Free for rows taken from this very tensor (as mto_forward's); otherwise the masks are
    compared where they are, without the host waiting (on a GPU a device-side assert, which ends the process)."""
    if rows is None:
        return patch_rows(mask)
    if not isinstance(rows, Rows):
        raise ValueError(f"rows must be mto.patch_rows(mask) of this very mask, got {type(rows).__name__}")
    if rows.mask is not mask:
        if rows.mask is None or rows.mask.shape != mask.shape or rows.mask.device != mask.device:
            raise ValueError("rows are not this mask's (taken from another mask, or none recorded): pass "
                             "mto.patch_rows(mask) of this very mask, or rows=None")
        torch._assert_async((rows.mask == mask).all(), "rows are not this mask's (taken from another mask): pass "
                            "mto.patch_rows(mask) of this very mask, or rows=None")
    return rows


def _flat_rows(index, T: int):
    """(B, K) token indices -> (B * K,) row numbers of the flattened (batch, token) rows."""
    return (index + T * torch.arange(index.shape[0], device=index.device)[:, None]).flatten()


def _take(xs, index, dim):
    """The tokens at index (B, K) along the token dim `dim` (batch dim first) of each of L tensors of one shape ->
    (L, *shape with K at dim+1), in one buffer.

    One index_select per tensor over its flattened (batch, token) rows (a view for q, k of dtm.Attention and for
    block outputs), written into the buffer. Where a gradient is needed, _TakeRows.apply(index, dim, *xs).
    """
    B, T = xs[0].shape[0], xs[0].shape[dim]
    flat = _flat_rows(index, T)
    rest = xs[0].movedim(dim, 1).shape[2:]
    taken = xs[0].new_empty(len(xs), flat.numel(), *rest)  # (L, B * K, ...)
    for x, out in zip(xs, taken):
        torch.index_select(x.movedim(dim, 1).reshape(B * T, *rest), 0, flat, out=out)
    return taken.view(len(xs), B, index.shape[1], *rest).movedim(2, dim + 1)


def _zeros_tokens_second(shape, dim: int, like):
    """Zeros of `shape` laid out in memory as (batch, token dim `dim`, the other dims): a tensor, not a view, whose
    (batch, token) rows are one dim of a view of it."""
    order = [0, dim, *(d for d in range(1, len(shape)) if d != dim)]
    strides, step = [0] * len(shape), 1
    for d in reversed(order):
        strides[d], step = step, step * shape[d]
    return like.new_empty_strided(shape, strides).zero_()


def _refuse_create_graph():
    """The backward passes below are written by hand and not differentiable again: with create_graph=True their
    gradients would carry no graph (a gradient penalty through them silently constant), so that is refused."""
    if torch.is_grad_enabled():  # grad mode is on inside backward only with create_graph=True
        raise RuntimeError("MTO's losses have hand-written backward passes that cannot be differentiated again: "
                           "compute them outside torch.autograd.grad(..., create_graph=True) / double backward")


class _TakeRows(torch.autograd.Function):
    """_take of the same rows from each of L tensors of one shape -> (L, *taken shape), written into one buffer: the
    losses below read the rows of a group of blocks at once (a few large ops per group instead of a few dozen small
    ones per block: on a fast GPU small ops wait on the host's launches, not on the arithmetic). The backward copies
    each tensor's rows' gradient into zeros of its shape, laid out (batch, token, ...) so that the rows are whole
    rows of memory (index_copy_; index_put_ at (batch, token) pairs of a (B, heads, T, head_dim) tensor was 4x
    slower on the CPU): a fresh tensor, not a view, into which autograd adds the tensor's other gradient (SDPA's for
    q and k, the next block's for a block output) in place. index_select's own backward hands back a view, which
    autograd cannot add into: one more full-size tensor per block and per input."""

    @staticmethod
    def forward(ctx, index, dim, *xs):
        ctx.save_for_backward(index)
        ctx.shape, ctx.dim = xs[0].shape, dim
        return _take(xs, index, dim)

    @staticmethod
    def backward(ctx, grad):
        _refuse_create_graph()
        (index,) = ctx.saved_tensors
        B, T, dim = ctx.shape[0], ctx.shape[ctx.dim], ctx.dim
        flat = _flat_rows(index, T)
        grads = []
        for grad_rows in grad.unbind(0):
            grad_x = _zeros_tokens_second(ctx.shape, dim, grad)
            rows = grad_x.movedim(dim, 1)  # (B, T, ...) in memory order: viewable as (B * T, ...)
            rows.view(B * T, *rows.shape[2:]).index_copy_(0, flat, grad_rows.movedim(dim, 1).flatten(0, 1))
            grads.append(grad_x)
        return None, None, *grads


def _check_alike(tensors, what: str):
    """The blocks' tensors of one loss are computed in one buffer: each must have the first one's shape and dtype."""
    for i, t in enumerate(tensors[1:], 1):
        if t.shape != tensors[0].shape or t.dtype != tensors[0].dtype:
            raise ValueError(f"{what} of block entry {i} is {t.dtype} {tuple(t.shape)}, block entry 0's is "
                             f"{tensors[0].dtype} {tuple(tensors[0].shape)}: the blocks computed together must be of "
                             f"one shape and dtype (compute blocks of different widths or dtypes in separate calls)")


def _check_tokens(hidden, mask, num_prefix):
    if hidden.dim() != 3 or hidden.shape[:2] != (mask.shape[0], num_prefix + mask.shape[1]):
        extra = hidden.shape[1] - mask.shape[1] if hidden.dim() == 3 and hidden.shape[0] == mask.shape[0] else -1
        hint = f" (if {extra} of them are prefix tokens, CLS and registers: pass num_prefix={extra}; if not, the " \
            f"mask is of another number of patches)" if extra >= 0 else ""
        raise ValueError(f"tokens {tuple(hidden.shape)} do not match the mask {tuple(mask.shape)}: they must be (B, "
                         f"{num_prefix} prefix tokens + the mask's {mask.shape[1]} patches, C), B = the mask's "
                         f"{mask.shape[0]} images{hint}")


def singularity_loss(hidden, mask, rows: Rows = None, num_prefix: int = NUM_PREFIX):
    """Per-image similarity of masked to visible tokens at one block output -> (B,) float32 (float64 for float64).

    hidden (B, num_prefix + N, C), mask (B, N) bool, rows = patch_rows(mask) (computed if None). Image b: mean over
    its masked patches i of max over its visible patches j of cos(h_i, h_j); gradient only through the masked side.
    Computed on the masked rows and visible columns only: (B, M, V), 75 x 121 for ViT-B's 196 patches.
    """
    return singularity_losses([hidden], mask, rows, num_prefix)[0]


GROUP_ELEMENTS = 2 ** 25  # blocks computed together: at most this many elements (128 MiB in float32) per intermediate


def _block_groups(count: int, elements_per_block: int):
    """Consecutive groups of `count` blocks whose largest intermediate holds at most GROUP_ELEMENTS elements (at least
    one block per group): few launches per step (on a fast GPU a step of small ops is bound by the host's launches),
    and memory for a few blocks' intermediates at a time, not all of them (ViT-L's 24 blocks at once took 8.5 GiB more
    at batch 128 with --grad_checkpoint on an H200). The size is cut to `count`: in a torch.compile'd caller whose mask
    sizes vary (elements_per_block symbolic), a graph then holds for all sizes that put every block in one group, not
    for one value of GROUP_ELEMENTS // elements_per_block (a recompile for almost every masked count)."""
    size = max(1, min(count, GROUP_ELEMENTS // max(elements_per_block, 1)))
    return [slice(start, start + size) for start in range(0, count, size)]


class _RefuseDoubleBackward(torch.autograd.Function):
    """The identity, whose backward runs outside the compiled graph and refuses create_graph=True there. Traced into a
    graph, the hand-written backward passes' check (_refuse_create_graph) runs once, at compile time, with grad mode
    off; what torch then does at a double backward depends on its version: torch 2.13 raises, torch 2.11 returned
    gradients without an error."""

    @staticmethod
    def forward(ctx, losses):
        return losses.clone()

    @staticmethod
    def backward(ctx, grad):
        _refuse_create_graph()
        return grad


@functools.cache
def _compiled(losses_fn):
    """torch.compile(losses_fn), made once per function: inductor fuses the losses' elementwise passes and gathers into
    a few kernels (their autograd.Functions' hand-written backward passes too). Measured in docs/RESULTS.md section 3.
    The first call compiles (seconds to a minute); a group of another size or a new batch size compiles again. Its
    losses' backward refuses create_graph=True as the eager one does (_RefuseDoubleBackward)."""
    compiled = torch.compile(losses_fn)
    return lambda *args: _RefuseDoubleBackward.apply(compiled(*args))


def singularity_losses(hiddens, mask, rows: Rows = None, num_prefix: int = NUM_PREFIX, compile: bool = False):
    """singularity_loss of each of L block outputs of one shape, computed a group of blocks at a time -> (L, B).
    compile: with the arithmetic torch.compile'd (_compiled)."""
    _check_mask(mask, num_prefix)
    for hidden in hiddens:
        _check_tokens(hidden, mask, num_prefix)
    _check_alike(hiddens, "the block output")
    if not hiddens:
        return mask.new_zeros((0, mask.shape[0]), dtype=torch.float32)
    rows = _rows_for(mask, rows)
    (B, _, C), M, V = hiddens[0].shape, rows.masked.shape[1], rows.visible.shape[1]
    groups = _block_groups(len(hiddens), B * max(M * C, V * C, M * V))  # rows, keys, similarities of one block
    losses_fn = _compiled(_singularity_losses) if compile else _singularity_losses
    with torch.autocast(hiddens[0].device.type, enabled=False):  # float32 matmuls, whatever the autocast dtype
        return torch.cat([losses_fn(hiddens[group], mask, rows, num_prefix) for group in groups])


class _Cosine(torch.autograd.Function):
    """cos(x, k) over the last dim of rows x (..., C) and keys k (..., C) of norms k_norm (...), the keys constant:
    the gradient, x's only, is written by hand, d cos / dx = (k / |k| - cos x / |x|) / |x|, a few passes over x
    instead of autograd through the dot product, the norm and the division. |x| is clamped to 1e-12 or more.
    Divided by |x| and |k| in turn, not by their product: compiled (MTOConfig.compile), the product, which is
    both divided by and (by AOTAutograd) kept for the backward, made a kernel that Triton 3.6 failed to build on an
    H200, and for sm_70 too (TritonGPURemoveLayoutConversions: "operand does not dominate this use"; test_triton.py,
    docs/RESULTS.md section 3)."""

    @staticmethod
    def forward(ctx, x, k, k_norm):
        x_norm = x.norm(dim=-1).clamp(min=1e-12)
        cos = torch.linalg.vecdot(x, k) / x_norm / k_norm
        ctx.save_for_backward(x, k, x_norm, k_norm, cos)
        return cos

    @staticmethod
    def backward(ctx, grad):
        _refuse_create_graph()
        x, k, x_norm, k_norm, cos = ctx.saved_tensors
        along_k = grad / x_norm / k_norm
        along_x = torch.where(x_norm > 1e-12, grad * cos / x_norm.square(), 0)  # a clamped |x| is a constant
        return (k * along_k[..., None]).addcmul_(x, along_x[..., None], value=-1), None, None


def _singularity_losses(hiddens, mask, rows: Rows, num_prefix: int):
    dtype = torch.promote_types(hiddens[0].dtype, torch.float32)  # float32, float64 for float64 input
    x_masked = _TakeRows.apply(rows.masked + num_prefix, 1, *hiddens).to(dtype)  # (L, B, M, C)
    with torch.no_grad():  # which visible patch is nearest; the cosine to it is recomputed below with the gradient
        keys = _take(hiddens, rows.visible + num_prefix, 1).to(dtype)  # (L, B, V, C)
        key_norms = keys.norm(dim=-1).clamp(min=1e-12)  # (L, B, V)
        dots = (x_masked @ keys.transpose(-2, -1)).div_(key_norms[:, :, None, :])  # (L, B, M, V): cos * |h_i|
        if rows.visible_padded:
            dots.masked_fill_(~rows.visible_valid[:, None, :], float("-inf"))
        nearest = dots.argmax(dim=-1)  # (L, B, M)
        nearest_key = keys.gather(2, nearest[..., None].expand(*nearest.shape, keys.shape[-1]))  # (L, B, M, C)
        nearest_norm = key_norms.gather(2, nearest)  # (L, B, M)
    # max_j cos(h_i, h_j) = cos(h_i, h_nearest): the max's value and gradient (amax would split it at exact ties)
    cos = _Cosine.apply(x_masked, nearest_key, nearest_norm)  # (L, B, M)
    counted = rows.masked_valid & rows.visible_valid[:, :1]  # masked patches of images that have a visible patch
    return torch.where(counted, cos, torch.zeros_like(cos)).sum(dim=-1) / mask.sum(dim=1).clamp(min=1)  # (L, B)


class _SoftmaxEntropy(torch.autograd.Function):
    """H(z) = entropy of softmax(z) over the last dim = log(sum_j e_j) - sum_j p_j z_j, e_j = exp(z_j), p_j = e_j /
    sum_k e_k, with the gradient dH/dz_j = -p_j (z_j - sum_k p_k z_k): a few passes over z instead of autograd
    through softmax, log and sum. Both are the same for z shifted by a constant per row, and z must come shifted to
    a row maximum of 0 (_visible_logits shifts it in place): else exp() can overflow, or the difference of two large
    numbers loses the entropy (logits of 1e3 gave -9e-6); and sum_j e_j >= 1. Only z and two numbers per row are kept
    for the backward (p is recomputed there)."""

    @staticmethod
    def forward(ctx, z):
        e = z.exp()
        total = e.sum(dim=-1)
        expected = e.mul_(z).sum(dim=-1) / total  # sum_j p_j z_j
        ctx.save_for_backward(z, total, expected)
        return total.log() - expected

    @staticmethod
    def backward(ctx, grad):
        _refuse_create_graph()
        z, total, expected = ctx.saved_tensors
        return (z - expected[..., None]).mul_(z.exp()).mul_((-grad / total)[..., None])


class _GatherPairs(torch.autograd.Function):
    """table (L, heads, T * T), pairs (B * M * V,) -> table[:, :, pairs] as a fresh (L * heads * B, M, V) tensor, not a
    view: the logits are computed into it in place (baddbmm_), and in-place ops on a view would have autograd copy
    the whole gradient twice per op in the backward (CopySlices). The backward: index_add_ into zeros of the table."""

    @staticmethod
    def forward(ctx, table, pairs, shape):
        ctx.save_for_backward(pairs)
        ctx.table_shape = table.shape
        out = table.new_empty(shape)
        torch.index_select(table, 2, pairs, out=out.view(*table.shape[:2], -1))
        return out

    @staticmethod
    def backward(ctx, grad):
        _refuse_create_graph()
        (pairs,) = ctx.saved_tensors
        grad_table = grad.new_zeros(ctx.table_shape)
        return grad_table.index_add_(2, pairs, grad.reshape(*ctx.table_shape[:2], -1)), None, None


def _check_qk(q, k, bias, mask, num_prefix):
    T = num_prefix + mask.shape[1]
    if q.dim() != 4 or (q.shape[0], q.shape[2]) != (mask.shape[0], T) or k.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must both be (B, heads, T, head_dim) with B = "
                         f"the mask's {mask.shape[0]} images and T = {num_prefix} prefix tokens + the mask's "
                         f"{mask.shape[1]} patches")
    H = q.shape[1]
    if bias is not None and tuple(bias.shape) != (H, T, T):
        raise ValueError(f"bias {tuple(bias.shape)} must be the relative position bias (heads, T, T) = {(H, T, T)}, "
                         f"shared by the batch, or None")


def attention_entropy(q, k, bias, mask, rows: Rows = None, num_prefix: int = NUM_PREFIX):
    """Per-image normalized entropy of masked queries' attention over visible patch keys -> (B,) float32 (float64
    for float64 q, k).

    q, k (B, heads, T, head_dim) and the relative position bias (heads, T, T) or None of one block's attention
    (dtm.Features.qk), T = num_prefix + N: q before the 1/sqrt(head_dim) scale (this function applies it, as SDPA
    does), after any q/k norm; the bias without the attention mask. mask (B, N) bool, rows = patch_rows(mask).
    The recalibration mask leaves masked queries' rows
    unchanged, so it plays no part here. Each masked query's attention row, restricted to the visible patch keys
    and renormalized, is the softmax of its logits against those keys: (B, heads, M, V), computed in float32
    (float64 for float64 q, k). Its entropy is divided by log(#visible), averaged over heads and over the image's
    masked queries. Images with no masked patch or fewer than 2 visible patches give 0.
    """
    return attention_entropies([(q, k, bias)], mask, rows, num_prefix)[0]


def attention_entropies(qks, mask, rows: Rows = None, num_prefix: int = NUM_PREFIX, compile: bool = False):
    """attention_entropy of each of L blocks' (q, k, bias) of one shape, computed a group of blocks at a time ->
    (L, B). A block whose bias is None among blocks with one counts as a zero bias. compile: as singularity_losses."""
    _check_mask(mask, num_prefix)
    for q, k, bias in qks:
        _check_qk(q, k, bias, mask, num_prefix)
    _check_alike([q for q, _, _ in qks], "q")
    _check_alike([k for _, k, _ in qks], "k")
    if not qks:
        return mask.new_zeros((0, mask.shape[0]), dtype=torch.float32)
    rows = _rows_for(mask, rows)
    (B, H, _, D), M, V = qks[0][0].shape, rows.masked.shape[1], rows.visible.shape[1]
    groups = _block_groups(len(qks), B * H * max(M * V, M * D, V * D))  # logits, q rows, k rows of one block
    losses_fn = _compiled(_attention_entropies) if compile else _attention_entropies
    with torch.autocast(qks[0][0].device.type, enabled=False):  # float32 matmuls, whatever the autocast dtype
        return torch.cat([losses_fn(qks[group], mask, rows, num_prefix) for group in groups])


def _attention_entropies(qks, mask, rows: Rows, num_prefix: int):
    dtype = torch.promote_types(qks[0][0].dtype, torch.float32)  # float32, float64 for float64 input
    entropy = _SoftmaxEntropy.apply(_visible_logits(qks, rows, num_prefix, dtype)).mean(dim=1)  # (L, B, M): heads
    num_visible = rows.visible_valid.sum(dim=1)  # (B,)
    counted = rows.masked_valid & (num_visible >= 2)[:, None]  # masked queries of images with >= 2 visible patches
    entropy = entropy / num_visible.to(dtype).clamp(min=2).log()[:, None] * counted
    return entropy.sum(dim=-1) / mask.sum(dim=1).clamp(min=1)  # (L, B)


def _contiguous(x, dtype):
    """x as a contiguous tensor of `dtype`, in one copy (x.to(dtype, memory_format=torch.contiguous_format) hands a
    transposed x already of that dtype back as it is; x.to(dtype).contiguous() copies twice)."""
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _visible_logits(qks, rows: Rows, num_prefix: int, dtype):
    """The L blocks' attention logits of the masked queries against the visible keys -> (L, heads, B, M, V).

    Heads before images: the relative position bias at each (masked query, visible key) pair, gathered from the
    (L, heads, T * T) tables, comes out in that order, and one baddbmm computes bias + scale * q k^T. Each row is
    shifted to a maximum of 0 (as _SoftmaxEntropy needs), padding keys are -1e4.
    """
    B, H, T, D = qks[0][0].shape
    queries, keys = rows.masked + num_prefix, rows.visible + num_prefix  # (B, M), (B, V) token indices
    L, M, V = len(qks), queries.shape[1], keys.shape[1]
    # q's rows (L * heads * B, M, head_dim) and k's (L * heads * B, V, head_dim), in one copy each
    q_rows, k_rows = (_contiguous(_TakeRows.apply(index, 2, *xs).transpose(1, 2), dtype).view(L * H * B, -1, D)
                      for index, xs in ((queries, [q for q, _, _ in qks]), (keys, [k for _, k, _ in qks])))
    biases = [bias for _, _, bias in qks]
    if all(bias is None for bias in biases):
        logits = torch.bmm(q_rows, k_rows.transpose(1, 2)).mul_(D ** -0.5)
    else:  # each (heads, T, T) bias at each (masked query, visible key) pair, then + scale * q k^T into it
        zero = next(bias for bias in biases if bias is not None).new_zeros(H, T, T)
        table = torch.stack([zero if bias is None else bias for bias in biases]).to(dtype).flatten(2)  # (L, H, T * T)
        pairs = (queries[:, :, None] * T + keys[:, None, :]).flatten()  # (B * M * V,) into a T x T table
        logits = _GatherPairs.apply(table, pairs, (L * H * B, M, V))
        logits.baddbmm_(q_rows, k_rows.transpose(1, 2), alpha=D ** -0.5)
    # each row shifted to a maximum of 0, in place (not on a view: see _GatherPairs), as _SoftmaxEntropy needs;
    # padding keys: -1e4 after the shift, so exp() of it is exactly 0 in float32 (a -1e4 before the shift was not,
    # beside real logits near -1e4); unlike -inf it keeps p * logit finite. An image without visible patches keeps
    # its rows of padding keys as they are (finite; its entropy is not counted)
    padding = None
    if rows.visible_padded:
        padding = ~rows.visible_valid & rows.visible_valid.any(dim=1, keepdim=True)  # (B, V)
        padding = padding[:, None, :].repeat(L * H, 1, 1)  # (L * H * B, 1, V)
        logits.masked_fill_(padding, float("-inf"))
    logits.sub_(logits.detach().amax(dim=-1, keepdim=True))
    if padding is not None:
        logits.masked_fill_(padding, -1e4)
    return logits.view(L, H, B, M, V)


def _num_layers(value, depth, name):
    if value is None:
        return depth
    if not 0 <= value <= depth:
        raise ValueError(f"{name}={value} is out of range for a ViT of depth {depth}; use 0..{depth} (or leave it "
                         "unset for all blocks)")
    return value


def _check_features(features):
    """forward_features returned an object with .tokens, .layers and .qk (the docstring's Use): a dict, a tuple or the
    tokens alone failed with an AttributeError that named no fix."""
    missing = [f".{name}" for name in ("tokens", "layers", "qk") if not hasattr(features, name)]
    if missing:
        raise ValueError(f"the ViT's forward_features(...) returned a {type(features).__name__} without "
                         f"{', '.join(missing)}: return an object with .tokens (B, T, C), .layers {{block index: "
                         f"output}} and .qk {{block index: (q, k, bias)}}, e.g. types.SimpleNamespace(tokens=..., "
                         f"layers=..., qk=...) (see mto.py's docstring, Use)")


def _check_returned(features, field: str, ids):
    """The ViT returned features.layers / .qk for every block index asked for (return_layers / return_qk)."""
    held = getattr(features, field)
    present = held.keys() if isinstance(held, dict) else range(len(held))
    missing = [i for i in ids if i not in present]
    if missing:
        asked = "return_layers" if field == "layers" else "return_qk"
        raise ValueError(f"the ViT's forward_features(...).{field} lacks blocks {missing}: it must hold an entry for "
                         f"each block index in {asked}={list(ids)} (0-based; see mto.py's docstring, Use)")


def _qk_entry(qk, i: int):
    """forward_features(...).qk[i], checked to be (q, k, bias): a (q, k) pair would fail unnamed where
    attention_entropies unpacks it."""
    entry = qk[i]
    if not isinstance(entry, (tuple, list)) or len(entry) != 3:
        got = f"{len(entry)} entries" if isinstance(entry, (tuple, list)) else type(entry).__name__
        raise ValueError(f"the ViT's forward_features(...).qk[{i}] must be (q, k, bias), bias the (heads, T, T) "
                         f"relative position bias or None; got {got}")
    return entry


def _depth_weighted(per_block, depth: int):
    """(L, B) per-image losses of the first L blocks -> the depth-weighted sum of their batch means (a product and a
    sum, not @, which autocast would run in bf16 / fp16)."""
    L = per_block.shape[0]
    return (per_block.mean(dim=1) * depth_weights(depth, L, per_block.device, per_block.dtype)[:L]).sum()


def _takes_mto_keywords(forward_features) -> bool:
    """forward_features (inspect costs about 30 us) takes return_layers and return_qk by name or through **kwargs;
    True where its signature cannot be read (left to the call). The signature read is the one called: a decorator's
    own, not that of the function it wraps (__wrapped__)."""
    try:
        params = inspect.signature(forward_features, follow_wrapped=False).parameters
    except ValueError:
        return True
    return {"return_layers", "return_qk"} <= params.keys() or any(p.kind is p.VAR_KEYWORD for p in params.values())


_class_takes_mto_keywords = functools.lru_cache(maxsize=64)(_takes_mto_keywords)  # a class's method: read once


def _check_interface(vit):
    """vit has the interface mto_forward calls (the docstring's Use): a timm or torchvision ViT as it is has not, and
    failed inside its own forward_features ("unexpected keyword argument 'return_layers'") or at vit.blocks."""
    forward_features = getattr(vit, "forward_features", None)
    missing = [] if hasattr(vit, "blocks") else ["vit.blocks"]
    function = getattr(forward_features, "__func__", None)
    if function is not None and function is getattr(type(vit), "forward_features", None):
        takes = _class_takes_mto_keywords(function)  # one cache entry per class, which keeps no model alive
    else:  # an instance's own (a partial, a compiled function, a callable object): a cache entry would keep it alive
        takes = callable(forward_features) and _takes_mto_keywords(forward_features)
    if not takes:
        missing.append("vit.forward_features(images, mask, attn_mask, return_layers=[...], return_qk=[...])")
    if not missing:
        return
    lacks = f"mto_forward needs {' and '.join(missing)}, which this {type(vit).__name__} lacks"
    if isinstance(vit, torch.nn.parallel.DistributedDataParallel):  # the ViT is inside, .module
        raise ValueError(f"{lacks}: with DDP, run MTO inside the wrapped module's forward, on the ViT itself: "
                         f"mto.MTO(cfg, num_prefix)(vit, images, mask), as dtm.DTMPretrainModel(student, dim, "
                         f"features_fn=mto.MTO(cfg))")
    raise ValueError(f"{lacks} (so do timm's and torchvision's ViTs as they are): pass an adapter that has them, see "
                     f"mto.py's docstring, Use")


def mto_forward(vit, images, mask, cfg: MTOConfig, num_prefix: int = NUM_PREFIX,
                mask_sizes: Optional[MaskSizes] = None):
    """forward_features with MTO -> (tokens (B, num_prefix + N, C), {"loss_sing": scalar, "loss_ent": scalar}).

    images (B, 3, H, W), mask (B, N) bool (True = masked); num_prefix: tokens before the patches (CLS, registers);
    mask_sizes: mask_sizes() of the mask's copy on the CPU, so that MTO needs no host sync (not given: read here);
    sizes of another mask fail (see patch_rows).
    The losses are the depth-weighted sums over blocks of the
    batch means of the per-image losses, not yet multiplied by the lambdas (see mto_total_loss); a loss whose lambda
    is 0 is a zero tensor and costs nothing.
    """
    _check_mask(mask, num_prefix)
    if torch.is_tensor(images) and images.shape[:1] != mask.shape[:1]:
        raise ValueError(f"{images.shape[0]} images but a mask for {mask.shape[0]}: the mask is (B, N), one row per "
                         f"image")
    _check_interface(vit)
    vit_prefix = getattr(vit, "num_prefix_tokens", num_prefix)  # timm's name for CLS + register tokens
    if vit_prefix != num_prefix:
        raise ValueError(f"the ViT has {vit_prefix} tokens before the patches (num_prefix_tokens), MTO was given "
                         f"num_prefix={num_prefix}: pass num_prefix={vit_prefix}")
    depth = len(vit.blocks)
    layers = _num_layers(cfg.layers, depth, "MTOConfig.layers")
    sing_layers = _num_layers(cfg.sing_layers, depth, "MTOConfig.sing_layers")
    ent_layers = _num_layers(cfg.ent_layers, depth, "MTOConfig.ent_layers")
    sing_ids = list(range(sing_layers if cfg.lambda_sing else 0))  # the blocks whose depth weight is not 0
    ent_ids = list(range(ent_layers if cfg.lambda_ent else 0))

    allowed = None
    if layers:  # one additive float mask for all blocks: -inf where a query may not attend
        T = num_prefix + mask.shape[1]
        allowed = mask.new_zeros(mask.shape[0], 1, T, T, dtype=torch.float32)
        allowed.masked_fill_(~recalibration_mask(mask, num_prefix), float("-inf"))
    rows = patch_rows(mask, mask_sizes) if sing_ids or ent_ids else None  # without mask_sizes, a host sync
    attn_mask = [allowed] * layers + [None] * (depth - layers)
    features = vit.forward_features(images, mask, attn_mask, return_layers=sing_ids, return_qk=ent_ids)

    _check_features(features)
    _check_returned(features, "layers", sing_ids)
    _check_returned(features, "qk", ent_ids)
    zero = features.tokens.new_zeros((), dtype=torch.promote_types(features.tokens.dtype, torch.float32))  # the losses
    loss_sing = _depth_weighted(singularity_losses([features.layers[i] for i in sing_ids], mask, rows, num_prefix,
                                                   cfg.compile), depth) if sing_ids else zero
    loss_ent = _depth_weighted(attention_entropies([_qk_entry(features.qk, i) for i in ent_ids], mask, rows,
                                                   num_prefix, cfg.compile), depth) if ent_ids else zero
    return features.tokens, {"loss_sing": loss_sing, "loss_ent": loss_ent}


def mto_total_loss(losses: dict, cfg: MTOConfig):
    """lambda_sing * L_sing + lambda_ent * L_ent (to add to the base loss)."""
    return cfg.lambda_sing * losses["loss_sing"] + cfg.lambda_ent * losses["loss_ent"]


class MTO:
    """The features hook for dtm.DTMPretrainModel(features_fn=MTO(cfg)), so MTO runs inside the DDP-wrapped forward:
    (student, images, mask) -> (tokens, lambda-weighted MTO loss, stats with the unweighted loss_sing, loss_ent)."""

    def __init__(self, cfg: MTOConfig, num_prefix: int = NUM_PREFIX):
        self.cfg, self.num_prefix = cfg, num_prefix

    def __call__(self, vit, images, mask, mask_sizes: Optional[MaskSizes] = None):
        tokens, losses = mto_forward(vit, images, mask, self.cfg, self.num_prefix, mask_sizes)
        return tokens, mto_total_loss(losses, self.cfg), {k: v.detach() for k, v in losses.items()}


MTO_FLAGS = ("mto_layers", "mto_lambda_sing", "mto_lambda_ent", "mto_sing_layers", "mto_ent_layers")  # besides --mto


def add_mto_args(parser):
    """Adds --mto and its options to a trainer's argparse parser."""
    group = parser.add_argument_group("MTO (Masked Token Optimization, ECCV 2024; see mto.py)")
    group.add_argument("--mto", action="store_true", help="enable MTO (off: the plain forward, bit-identical)")
    group.add_argument("--mto_layers", type=int, default=None,
                       help="weight recalibration in the first K blocks (not given: all blocks; 0: off)")
    group.add_argument("--mto_lambda_sing", type=float, default=MTOConfig.lambda_sing,
                       help="weight of the singularity loss (0: off); default %(default)s, not from the paper")
    group.add_argument("--mto_lambda_ent", type=float, default=MTOConfig.lambda_ent,
                       help="weight of the attention entropy loss (0: off); default %(default)s, not from the paper")
    group.add_argument("--mto_sing_layers", type=int, default=None,
                       help="singularity loss on the first K blocks, depth-weighted (not given: all blocks)")
    group.add_argument("--mto_ent_layers", type=int, default=None,
                       help="entropy loss on the first K blocks, depth-weighted (not given: all blocks)")
    return parser


def mto_config_from_args(args, depth: Optional[int] = None) -> Optional[MTOConfig]:
    """MTOConfig from add_mto_args' flags, or None when --mto is off (the trainer then takes the plain path).
    depth: the ViT's number of blocks, so that block counts beyond it fail before anything is built."""
    if not args.mto:
        return None
    for name in ("mto_layers", "mto_sing_layers", "mto_ent_layers"):
        value = getattr(args, name)
        if value is not None and (value < 0 or depth is not None and value > depth):
            raise ValueError(f"--{name} {value} is out of range: use 0..{depth if depth is not None else 'depth'} "
                             f"(the ViT's blocks), or leave it unset for all blocks")
    for name in ("mto_lambda_sing", "mto_lambda_ent"):
        if not 0 <= getattr(args, name) < float("inf"):  # also NaN
            raise ValueError(f"--{name} must be finite and >= 0 (0 switches the loss off), got {getattr(args, name)}")
    for loss in ("sing", "ent"):  # a loss switched off reads no block count
        if getattr(args, f"mto_lambda_{loss}") == 0 and getattr(args, f"mto_{loss}_layers") is not None:
            raise ValueError(f"--mto_{loss}_layers would do nothing with --mto_lambda_{loss} 0 (that loss is off): "
                             f"leave it out")
        weight, default = getattr(args, f"mto_lambda_{loss}"), getattr(MTOConfig, f"lambda_{loss}")
        if getattr(args, f"mto_{loss}_layers") == 0 and weight not in (0, default):  # and the other way round
            raise ValueError(f"--mto_lambda_{loss} {weight:g} would do nothing with --mto_{loss}_layers 0 (that loss "
                             f"is on no block): leave it out")
    losses_off = [f"--mto_{loss}_layers 0" if getattr(args, f"mto_{loss}_layers") == 0 else f"--mto_lambda_{loss} 0"
                  for loss in ("sing", "ent")
                  if getattr(args, f"mto_lambda_{loss}") == 0 or getattr(args, f"mto_{loss}_layers") == 0]
    if args.mto_layers == 0 and len(losses_off) == 2:
        raise ValueError(f"--mto with --mto_layers 0, {', '.join(losses_off)} switches every part of MTO off: that is "
                         f"the plain forward at MTO's cost; leave --mto and every --mto_* flag out")
    return MTOConfig(layers=args.mto_layers, lambda_sing=args.mto_lambda_sing, lambda_ent=args.mto_lambda_ent,
                     sing_layers=args.mto_sing_layers, ent_layers=args.mto_ent_layers)
