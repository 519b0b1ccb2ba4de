"""Tests for mto.py: the recalibration mask against attention that drops masked keys, both losses against
per-sample loops, the depth schedule, gradients, autocast, batch-split invariance and the off switch."""
import argparse
import dataclasses
import functools
import gc
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import types
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dtm
import engine
import morph
import mto

torch.set_num_threads(1)

IMG, PATCH = 32, 8  # a 4x4 patch grid, N = 16
N, DEPTH = (IMG // PATCH) ** 2, 4  # vit_tiny: depth 4, 3 heads, width 192


def tiny_vit(**kw):
    torch.manual_seed(0)
    model = dtm.build_vit("vit_tiny", img_size=IMG, patch_size=PATCH, **kw).eval()
    with torch.no_grad():  # non-zero relative position table and mask token so that they matter
        if model.rel_pos_bias is not None:
            model.rel_pos_bias.table.normal_(0, 0.5)
        model.mask_token.normal_(0, 1.0)
    return model


def images(batch=2, seed=1):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def random_mask(batch=2, seed=2, ratio=0.5):
    return torch.rand(batch, N, generator=torch.Generator().manual_seed(seed)) < ratio


# ---------------------------------------------------------------------------------------------------
# Weight recalibration


def test_recalibration_mask_matches_definition():
    mask = random_mask(3)
    allowed = mto.recalibration_mask(mask)
    assert allowed.shape == (3, 1, 1 + N, 1 + N) and allowed.dtype == torch.bool
    for b in range(3):
        masked = [False] + mask[b].tolist()  # CLS first, never masked
        for q in range(1 + N):
            for k in range(1 + N):
                assert allowed[b, 0, q, k].item() == (masked[q] or not masked[k])


def reference_attention(attn, x, rel_bias, masked):
    """Hand-written attention of one Attention module: visible queries softmax over non-masked keys only."""
    B, T, C = x.shape
    H, d = attn.num_heads, attn.head_dim
    out = torch.zeros(B, T, C)
    for b in range(B):
        q = (x[b] @ attn.qkv.weight[:C].t() + attn.q_bias).view(T, H, d)
        k = (x[b] @ attn.qkv.weight[C:2 * C].t()).view(T, H, d)
        v = (x[b] @ attn.qkv.weight[2 * C:].t() + attn.v_bias).view(T, H, d)
        for h in range(H):
            for t in range(T):
                keys = list(range(T)) if masked[b, t] else [j for j in range(T) if not masked[b, j]]
                scores = torch.stack([q[t, h] @ k[j, h] / math.sqrt(d) + rel_bias[h, t, j] for j in keys])
                p = scores.softmax(0)
                out[b, t, h * d:(h + 1) * d] = sum(p[i] * v[j, h] for i, j in enumerate(keys))
    return attn.proj(out)


def test_recalibrated_block_equals_reference_that_drops_masked_keys():
    model = tiny_vit()
    block, mask = model.blocks[0], random_mask()
    x = torch.randn(2, 1 + N, 192, generator=torch.Generator().manual_seed(5))
    rel_bias = model.rel_pos_bias()
    masked = torch.cat([torch.zeros(2, 1, dtype=torch.bool), mask], dim=1)  # (B, T)
    allowed = mto.recalibration_mask(mask)
    with torch.no_grad():
        attn_ref = reference_attention(block.attn, block.norm1(x), rel_bias, masked)
        y = x + block.gamma_1 * attn_ref
        block_ref = y + block.gamma_2 * block.mlp(block.norm2(y))
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))  # the form mto_forward passes
        for attn_mask in (allowed, additive):
            out, _ = block(x, rel_bias, attn_mask)
            assert torch.allclose(out, block_ref, atol=1e-5)
        plain, _ = block(x, rel_bias)
    # masked queries are unchanged, visible queries (and CLS) differ from the plain block
    assert torch.allclose(out[masked], plain[masked], atol=1e-6)
    assert (out[~masked] - plain[~masked]).abs().amax() > 1e-3


def test_full_recalibration_makes_visible_tokens_independent_of_mask_token():
    model, x, mask = tiny_vit(), images(), random_mask()
    cfg = mto.MTOConfig(lambda_sing=0.0, lambda_ent=0.0)
    visible = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~mask], dim=1)
    with torch.no_grad():
        before, _ = mto.mto_forward(model, x, mask, cfg)
        partial, _ = mto.mto_forward(model, x, mask, mto.MTOConfig(layers=2, lambda_sing=0.0, lambda_ent=0.0))
        model.mask_token.add_(torch.randn(192, generator=torch.Generator().manual_seed(6)))
        after, _ = mto.mto_forward(model, x, mask, cfg)
        partial_after, _ = mto.mto_forward(model, x, mask, mto.MTOConfig(layers=2, lambda_sing=0.0, lambda_ent=0.0))
    assert torch.equal(before[visible], after[visible])
    assert (before[~visible] - after[~visible]).abs().amax() > 1e-3
    # recalibration in the first 2 of 4 blocks only: visible tokens see the mask tokens from block 3 on
    assert (partial[visible] - partial_after[visible]).abs().amax() > 1e-4


def host_reads(monkeypatch) -> list:
    """Records every read of a tensor's value by the host (on a GPU each waits for all the work queued before it)."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: (
            reads.append(_name), _real(self, *a))[1])
    return reads


def test_with_the_cpu_masks_sizes_mto_reads_no_tensor_on_the_host(monkeypatch):
    """A trainer passes mask_sizes of the loader's CPU mask (train_pretrain, bench_mto): MTO's forward and backward then
    read no tensor value on the host. Without them patch_rows read the counts off the GPU's mask, so the host waited
    for the teacher and the morphing before it could queue the student. Same tokens, losses and gradients."""
    model, x = tiny_vit(), images(4)
    for mask in (masks_with_edge_cases(), random_mask(4, seed=3)):
        counts = mask.sum(dim=1).tolist()
        sizes = mto.mask_sizes(mask)
        assert sizes == (max(counts), N - min(counts), N - max(counts))
        results = []
        for given in (sizes, None):
            model.zero_grad()
            reads = host_reads(monkeypatch)
            tokens, losses = mto.mto_forward(model, x, mask, mto.MTOConfig(), mask_sizes=given)
            (tokens.square().mean() + mto.mto_total_loss(losses, mto.MTOConfig())).backward()
            monkeypatch.undo()
            assert reads == ([] if given else ["tolist"])
            results.append([tokens, *losses.values(), *(p.grad for p in model.parameters())])
        for a, b in zip(*results):
            assert torch.equal(a, b)
    for wrong in ((5, 11, 12), (17, 0, -1)):  # not those of any mask of 16 patches
        with pytest.raises(ValueError, match="are not those of a mask of 16 patches: pass mto.mask_sizes"):
            mto.patch_rows(random_mask(), wrong)
    for wrong in ((6.0, 10, 10), (True, 15, 15), (6, 10), "abc"):
        with pytest.raises(ValueError, match="mask_sizes must be three ints, mto.mask_sizes\\(mask\\) of this very"):
            mto.patch_rows(random_mask(), wrong)


def test_mask_sizes_of_another_mask_fail_and_any_three_ints_are_taken():
    """Sizes of another mask (a previous step's, another micro-batch's) cut patches off the rows: a silent wrong loss
    once; now they fail, checked on the mask's device without a host read. The same counts as a list or numpy ints
    give the rows of MaskSizes."""
    mask = masks_with_edge_cases()
    sizes = mto.mask_sizes(mask)
    want = mto.patch_rows(mask)
    for same in (list(sizes), tuple(np.int64(n) for n in sizes)):
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b
                   for a, b in zip(mto.patch_rows(mask, same), want))
    other = random_mask(mask.shape[0], seed=11)
    assert sizes == (15, 16, 1) and mto.mask_sizes(other) == (11, 10, 5)
    for wrong in (mto.mask_sizes(other), (14, 16, 2), (15, 15, 1)):  # the most masked, the most visible too few
        with pytest.raises(RuntimeError, match=r"^mask_sizes are not this mask's .*: pass mto.mask_sizes"):
            mto.patch_rows(mask, wrong)
    with pytest.raises(ValueError, match="are not those of a mask of 16 patches"):  # the fewest visible off by one
        mto.patch_rows(mask, (15, 16, 2))
    with pytest.raises(RuntimeError, match="are not this mask's"):  # through mto_forward, as a trainer calls it
        mto.mto_forward(tiny_vit(), images(mask.shape[0]), mask, mto.MTOConfig(), mask_sizes=mto.mask_sizes(other))


# ---------------------------------------------------------------------------------------------------
# MTO off / no-op configurations are the plain forward


def test_mto_off_is_bit_identical_to_plain_forward():
    model, x, mask = tiny_vit(), images(), random_mask()
    plain = model.forward_features(x, mask).tokens
    tokens, losses = mto.mto_forward(model, x, mask, mto.MTOConfig(layers=0, lambda_sing=0.0, lambda_ent=0.0))
    assert torch.equal(tokens, plain) and losses["loss_sing"] == 0 and losses["loss_ent"] == 0
    # the singularity loss only reads block outputs: the tokens stay bit-identical
    tokens, losses = mto.mto_forward(model, x, mask, mto.MTOConfig(layers=0, lambda_ent=0.0))
    assert torch.equal(tokens, plain) and losses["loss_sing"] != 0

    parser = mto.add_mto_args(argparse.ArgumentParser())
    assert mto.mto_config_from_args(parser.parse_args([])) is None
    assert mto.mto_config_from_args(parser.parse_args(["--mto"])) == mto.MTOConfig()
    cfg = mto.mto_config_from_args(parser.parse_args(["--mto", "--mto_layers", "2", "--mto_lambda_ent", "0",
                                                      "--mto_sing_layers", "3"]))
    assert cfg == mto.MTOConfig(layers=2, lambda_sing=0.1, lambda_ent=0.0, sing_layers=3)
    cfg = mto.mto_config_from_args(parser.parse_args(["--mto", "--mto_lambda_sing", "0.5", "--mto_ent_layers", "4"]))
    assert cfg == mto.MTOConfig(lambda_sing=0.5, ent_layers=4)
    for flag in ("--mto_lambda_sing", "--mto_lambda_ent"):
        for value in ("-1", "nan", "inf"):  # a plain argparse parser (the trainers' refuse nan / inf themselves)
            with pytest.raises(ValueError, match=f"{flag} must be finite and >= 0 .*, got {float(value)}"):
                mto.mto_config_from_args(parser.parse_args(["--mto", flag, value]))
    for value in (None, "0.1", "1e-1", True):  # None failed with a TypeError from its comparison
        # a string is shown quoted: "got 1e-1" (PyYAML reads 1e-1 as a str) read as a valid weight
        with pytest.raises(ValueError, match=f"MTOConfig.lambda_sing must be finite and >= 0 .*, got "
                                             f"{re.escape(repr(value))}$"):
            mto.MTOConfig(lambda_sing=value)
    for flag in ("--mto_layers", "--mto_sing_layers", "--mto_ent_layers"):  # block counts: 0..depth
        with pytest.raises(ValueError, match=f"{flag} -1 is out of range: use 0..depth"):
            mto.mto_config_from_args(parser.parse_args(["--mto", flag, "-1"]))
        with pytest.raises(ValueError, match=f"{flag} 5 is out of range: use 0..4 "):
            mto.mto_config_from_args(parser.parse_args(["--mto", flag, "5"]), depth=4)
        assert mto.mto_config_from_args(parser.parse_args(["--mto", flag, "4"]), depth=4)
    assert mto.mto_config_from_args(parser.parse_args(["--mto", "--mto_layers", "0", "--mto_lambda_sing", "0"]))
    # a costly no-op; the fix names the --mto_* flags too (without --mto they are refused as doing nothing)
    with pytest.raises(ValueError, match="switches every part of MTO off.*leave --mto and every --mto_\\* flag out"):
        mto.mto_config_from_args(parser.parse_args(["--mto", "--mto_layers", "0", "--mto_sing_layers", "0",
                                                    "--mto_lambda_ent", "0"]))
    for loss in ("sing", "ent"):  # a block count for a loss that is off
        with pytest.raises(ValueError, match=f"--mto_{loss}_layers would do nothing with --mto_lambda_{loss} 0"):
            mto.mto_config_from_args(parser.parse_args(["--mto", f"--mto_lambda_{loss}", "0", f"--mto_{loss}_layers",
                                                        "2"]))
        # and the other way round: a weight for a loss on no block (at its default: as --mto_{loss}_layers 0 alone)
        with pytest.raises(ValueError, match=f"--mto_lambda_{loss} 0.7 would do nothing with --mto_{loss}_layers 0"):
            mto.mto_config_from_args(parser.parse_args(["--mto", f"--mto_lambda_{loss}", "0.7", f"--mto_{loss}_layers",
                                                        "0"]))
        assert mto.mto_config_from_args(parser.parse_args(["--mto", f"--mto_{loss}_layers", "0"]))


def test_pretrain_model_without_hook_is_bit_identical_and_with_mto_adds_weighted_losses():
    x, mask = images(), random_mask()
    targets = dtm.PixelTeacher(PATCH)(x)
    levels = morph.token_morphing_levels(targets, [[4, 4], [2]], generator=torch.Generator().manual_seed(0))
    model = dtm.DTMPretrainModel(tiny_vit(), target_dim=PATCH * PATCH * 3)
    loss, stats = model(x, mask, targets, levels)
    manual, _ = dtm.dtm_loss(model.head(model.student.forward_features(x, mask).tokens[:, 1:]), targets, levels, mask)
    assert torch.equal(loss, manual) and "loss_dtm" not in stats

    cfg = mto.MTOConfig(lambda_sing=0.3, lambda_ent=0.7)
    model.features_fn = mto.MTO(cfg)
    loss, stats = model(x, mask, targets, levels)
    tokens, losses = mto.mto_forward(model.student, x, mask, cfg)
    dtm_part, _ = dtm.dtm_loss(model.head(tokens[:, 1:]), targets, levels, mask)
    assert torch.allclose(stats["loss_dtm"], dtm_part) and torch.allclose(stats["loss_sing"], losses["loss_sing"])
    assert torch.allclose(loss, dtm_part + 0.3 * losses["loss_sing"] + 0.7 * losses["loss_ent"])
    assert torch.equal(stats["loss"], loss.detach())


# ---------------------------------------------------------------------------------------------------
# Losses against per-sample loops


def masks_with_edge_cases():
    mask = random_mask(4, seed=7)
    mask[2] = False  # no masked patch -> 0
    mask[3] = True  # no visible patch -> 0
    mask[3, 5] = False  # ... one visible patch: singularity defined, entropy 0 (log 1)
    return mask


def test_singularity_loss_matches_loop():
    mask = masks_with_edge_cases()
    hidden = torch.randn(4, 1 + N, 12, generator=torch.Generator().manual_seed(8)).requires_grad_()
    value = mto.singularity_loss(hidden, mask)
    (grad,) = torch.autograd.grad(value.sum(), hidden)
    assert torch.all(grad[:, 1:][~mask] == 0) and torch.all(grad[:, 0] == 0)  # visible side detached, CLS unused
    assert torch.all(grad[:2, 1:][mask[:2]].abs().sum(-1) > 0)
    patches = hidden[:, 1:]  # the gradient against autograd through the full cosine matrix and its row max
    cos = F.cosine_similarity(patches[:, :, None], patches[:, None, :].detach(), dim=-1)  # (B, N, N)
    nearest = cos.masked_fill(mask[:, None, :], float("-inf")).amax(dim=-1)  # (B, N) max over visible patches
    counted = mask & (~mask).any(dim=1, keepdim=True)
    reference = torch.where(counted, nearest, 0.0).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    torch.testing.assert_close(grad, torch.autograd.grad(reference.sum(), hidden)[0], rtol=1e-5, atol=1e-7)
    hidden = hidden.detach()
    for b in range(4):
        masked = [i for i in range(N) if mask[b, i]]
        visible = [j for j in range(N) if not mask[b, j]]
        if not masked or not visible:
            expected = 0.0
        else:
            expected = sum(max(F.cosine_similarity(hidden[b, 1 + i], hidden[b, 1 + j], dim=0).item() for j in visible)
                           for i in masked) / len(masked)
        assert value[b].item() == pytest.approx(expected, abs=1e-5), b
    all_masked = torch.ones(1, N, dtype=torch.bool)  # no visible patch: 0, with a zero (finite) gradient
    hidden = hidden[:1].clone().requires_grad_()
    value = mto.singularity_loss(hidden, all_masked)
    (grad,) = torch.autograd.grad(value.sum(), hidden)
    assert value.item() == 0 and torch.all(grad == 0)
    hidden = torch.randn(1, 1 + N, 12).requires_grad_()  # a masked token at exactly 0: cosine 0, finite gradient
    one = mask[:1].clone()
    with torch.no_grad():
        hidden[0, 1 + one[0].nonzero()[0, 0]] = 0
    (grad,) = torch.autograd.grad(mto.singularity_loss(hidden, one).sum(), hidden)
    assert grad.isfinite().all()


def explicit_entropy(q, k, bias, mask, num_prefix=1, dtype=torch.float32):
    """The earlier implementation, kept as the reference: full attention probabilities from an explicit softmax
    (B, heads, T, T), each masked query's row restricted to the visible patch keys and renormalized."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    attn = (scores if bias is None else scores + bias).to(dtype).softmax(dim=-1)
    tiny = torch.finfo(dtype).tiny
    visible = ~mask
    p = attn[:, :, num_prefix:, num_prefix:] * visible[:, None, None, :]
    q = p / p.sum(dim=-1, keepdim=True).clamp(min=tiny)
    entropy = -(q * q.clamp(min=tiny).log()).sum(dim=-1).mean(dim=1)
    num_visible = visible.sum(dim=1)
    counted = mask & (num_visible >= 2)[:, None]
    entropy = entropy / num_visible.to(dtype).clamp(min=2).log()[:, None] * counted
    return entropy.sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def test_attention_entropy_matches_loop_and_the_explicit_softmax():
    mask = masks_with_edge_cases()
    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(4, 3, 1 + N, 8, generator=g), torch.randn(4, 3, 1 + N, 8, generator=g)
    bias = torch.randn(3, 1 + N, 1 + N, generator=g)
    value = mto.attention_entropy(q, k, bias, mask)
    attn = ((q @ k.transpose(-2, -1)) / math.sqrt(8) + bias).softmax(-1)
    for b in range(4):
        masked = [i for i in range(N) if mask[b, i]]
        visible = [j for j in range(N) if not mask[b, j]]
        total = 0.0
        for i in masked:
            for h in range(3):
                row = torch.tensor([attn[b, h, 1 + i, 1 + j].item() for j in visible], dtype=torch.float64)
                row = row / row.sum()
                entropy = -(row * row.log()).sum().item()
                total += entropy / math.log(len(visible)) / 3 if len(visible) >= 2 else 0.0
        expected = total / len(masked) if masked else 0.0
        assert value[b].item() == pytest.approx(expected, abs=1e-5), b
    torch.testing.assert_close(value, explicit_entropy(q, k, bias, mask), rtol=1e-5, atol=1e-6)
    inputs = [t.clone().requires_grad_() for t in (q, k, bias)]  # the hand-written backward against autograd's
    got = torch.autograd.grad(mto.attention_entropy(*inputs, mask).sum(), inputs)
    expected = torch.autograd.grad(explicit_entropy(*inputs, mask).sum(), inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    z = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert torch.autograd.gradcheck(mto._SoftmaxEntropy.apply, (z,))
    recalibrated = bias + torch.zeros(4, 1, 1 + N, 1 + N).masked_fill(~mto.recalibration_mask(mask), float("-inf"))
    torch.testing.assert_close(value, explicit_entropy(q, k, recalibrated, mask), rtol=1e-5, atol=1e-6)  # same rows
    # a uniform row over visible keys has entropy 1, a one-hot one 0 (weight on CLS is ignored)
    mask1 = torch.zeros(1, N, dtype=torch.bool)
    mask1[0, :4] = True
    zeros = torch.zeros(1, 1, 1 + N, 8)
    assert mto.attention_entropy(zeros, zeros, None, mask1).item() == pytest.approx(1.0, abs=1e-6)
    onehot = torch.zeros(1, 1 + N, 1 + N)  # (heads, T, T)
    onehot[..., 0] = onehot[..., 1 + 7] = 100.0
    assert mto.attention_entropy(zeros, zeros, onehot, mask1).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_entropy_is_shift_invariant_and_independent_of_the_batch():
    """A bias constant over the keys changes no softmax: the entropy stays that of no bias, whatever images share the
    batch (their differing visible counts pad the keys) and however large the logits. A fixed -1e4 fill of padding
    keys once took weight beside real logits near -1e4 (normalized entropy 1.31), and logsumexp - E[z] of unshifted
    logits of about 1e3 came out negative."""
    mask = masks_with_edge_cases()
    assert mto.patch_rows(mask).visible_padded
    g = torch.Generator().manual_seed(12)
    q, k = torch.randn(4, 2, 1 + N, 8, generator=g), torch.randn(4, 2, 1 + N, 8, generator=g)
    plain = mto.attention_entropy(q, k, None, mask)
    alone = torch.cat([mto.attention_entropy(q[b:b + 1], k[b:b + 1], None, mask[b:b + 1]) for b in range(4)])
    torch.testing.assert_close(plain, alone)
    for shift in (-3e4, -1e4, 1e4):
        shifted = mto.attention_entropy(q, k, torch.full((2, 1 + N, 1 + N), shift), mask)
        torch.testing.assert_close(shifted, plain, rtol=0, atol=2e-3)  # a logit of 1e4 in float32 keeps ~1e-3
    for size in (1e2, 1e3):  # logits of about 1e2 and 1e3: rows almost one-hot, entropies near 0 but not below
        scale = size ** 0.5 / 8 ** 0.25
        large = mto.attention_entropy(q * scale, k * scale, None, mask)
        reference = explicit_entropy((q * scale).double(), (k * scale).double(), None, mask, dtype=torch.float64)
        assert (large >= 0).all() and (large <= 1).all()
        if size == 1e2:  # unshifted: relative error 7e-5
            torch.testing.assert_close(large.double(), reference, rtol=1e-5, atol=0)


def test_an_image_without_visible_patches_gives_zero_beside_others():
    """All patches masked: no visible key. Beside an image with visible patches (its keys then padded), both losses
    of that image are 0 and the other's are as alone (the entropy once counted it: 3.0, outside [0, 1])."""
    mask = random_mask(2, seed=3)
    mask[1] = True
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 2, 1 + N, 8, generator=g), torch.randn(2, 2, 1 + N, 8, generator=g)
    bias = torch.randn(2, 1 + N, 1 + N, generator=g)
    entropy = mto.attention_entropy(q, k, bias, mask)
    assert entropy[1] == 0 and 0 < entropy[0] < 1
    torch.testing.assert_close(entropy[:1], mto.attention_entropy(q[:1], k[:1], bias, mask[:1]))
    hidden = torch.randn(2, 1 + N, 12, generator=g)
    singularity = mto.singularity_loss(hidden, mask)
    assert singularity[1] == 0  # the other image's sum runs over the batch's padded rows: equal up to rounding
    torch.testing.assert_close(singularity[:1], mto.singularity_loss(hidden[:1], mask[:1]))


def test_masks_must_be_bool():
    mask = random_mask()
    hidden, q = torch.randn(2, 1 + N, 12), torch.randn(2, 2, 1 + N, 8)
    for call in (lambda m: mto.recalibration_mask(m), lambda m: mto.singularity_loss(hidden, m),
                 lambda m: mto.attention_entropy(q, q, None, m), lambda m: mto.patch_rows(m)):
        with pytest.raises(ValueError, match=re.escape(f"MTO needs the (B, N) bool mask of masked patches (True = "
                                                       f"masked), got torch.uint8 (2, {N}) (a 0/1 mask: mask.bool(); "
                                                       f"a (B, H, W) one: mask.flatten(1))")):
            call(mask.to(torch.uint8))  # a uint8 mask once gave a bias of 254/255: no masking
        call(mask)


def test_a_switched_off_loss_has_the_dtype_of_the_other():
    """A loss with lambda 0 is a zero of the losses' dtype: it was float32 for a float64 ViT, whose losses are
    float64 (mto.py's docstring: float64 for float64 inputs). A bfloat16 ViT's losses are float32, and so is the
    zero."""
    mask = random_mask()
    for dtype, loss_dtype in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32)):
        vit = tiny_vit().to(dtype)
        for cfg in (mto.MTOConfig(lambda_sing=0.0), mto.MTOConfig(lambda_ent=0.0)):
            _, losses = mto.mto_forward(vit, images(2).to(dtype), mask, cfg)
            assert [v.dtype for v in losses.values()] == [loss_dtype] * 2, dtype
            assert 0 in [v.item() for v in losses.values()]


def test_a_negative_num_prefix_is_refused_naming_what_it_counts():
    """num_prefix=-1 with tokens of N - 1 rows passed the tokens' shape check and failed inside torch ("index out of
    range in self", recalibration_mask: "Trying to create tensor with negative dimension -1")."""
    mask = random_mask()
    hidden, q = torch.randn(2, N - 1, 12), torch.randn(2, 2, N - 1, 8)
    message = ("num_prefix must be the number of tokens before the patches, an int >= 0 (1 for CLS, 0 without one, "
               "CLS + registers for a ViT with registers), got ")
    for bad in (-1, 1.0, True):
        for call in (lambda p: mto.recalibration_mask(mask, p), lambda p: mto.singularity_loss(hidden, mask, None, p),
                     lambda p: mto.attention_entropy(q, q, None, mask, None, p),
                     lambda p: mto.mto_forward(tiny_vit(), images(2), mask, mto.MTOConfig(), p)):
            with pytest.raises(ValueError, match=re.escape(message + repr(bad)) + "$"):
                call(bad)
    with pytest.raises(ValueError, match="^3 images but a mask for 2: the mask is"):  # failed inside the ViT
        mto.mto_forward(tiny_vit(), images(3), mask, mto.MTOConfig())


def test_losses_with_a_fixed_number_of_masked_patches_skip_padding_and_agree_with_references():
    """BlockMaskGenerator masks the same number of patches in every image: no padding rows, so the padding fills
    are skipped. q and k come as dtm.Attention makes them (views of one qkv tensor)."""
    g = torch.Generator().manual_seed(11)
    mask = torch.rand(3, N, generator=g).argsort(dim=1) < 6  # 6 masked patches in each image
    rows = mto.patch_rows(mask)
    assert not rows.visible_padded and mto.patch_rows(masks_with_edge_cases()).visible_padded
    assert rows.masked.shape == (3, 6) and rows.visible.shape == (3, N - 6)
    qkv = torch.randn(3, 1 + N, 3, 2, 8, generator=g, requires_grad=True)  # (B, T, 3, heads, head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    bias = torch.randn(2, 1 + N, 1 + N, generator=g, requires_grad=True)
    value = mto.attention_entropy(q, k, bias, mask, rows)
    torch.testing.assert_close(value, explicit_entropy(q, k, bias, mask), rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(value.sum(), (qkv, bias))
    expected = torch.autograd.grad(explicit_entropy(q, k, bias, mask).sum(), (qkv, bias))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    hidden = torch.randn(3, 1 + N, 12, generator=g)
    value = mto.singularity_loss(hidden, mask, rows)
    for b in range(3):
        masked, visible = mask[b].nonzero()[:, 0] + 1, (~mask[b]).nonzero()[:, 0] + 1
        cos = F.cosine_similarity(hidden[b, masked, None], hidden[b, None, visible], dim=-1)  # (6, N - 6)
        assert value[b].item() == pytest.approx(cos.amax(dim=1).mean().item(), abs=1e-5)


def index_select_rows(x, index, dim):
    """x's tokens at index (B, K) along dim, by autograd's index_select (batch dim first): _take's reference."""
    B, T = x.shape[0], x.shape[dim]
    rows = x.movedim(dim, 1)
    flat = (index + T * torch.arange(B)[:, None]).flatten()
    taken = rows.reshape(B * T, *rows.shape[2:]).index_select(0, flat)
    return taken.view(B, index.shape[1], *rows.shape[2:]).movedim(1, dim)


def test_take_of_several_tensors_equals_index_select_of_each():
    g = torch.Generator().manual_seed(13)
    qkvs = [torch.randn(2, 7, 3, 2, 4, generator=g).permute(2, 0, 3, 1, 4) for _ in range(3)]  # [0]: q (B, heads, T, D)
    hiddens = [torch.randn(2, 7, 5, generator=g) for _ in range(3)]
    index = torch.tensor([[0, 3, 6], [1, 2, 5]])
    for xs, dim in (([qkv[0] for qkv in qkvs], 2), (hiddens, 1)):
        taken = mto._take(xs, index, dim)
        assert torch.equal(taken, torch.stack([index_select_rows(x, index, dim) for x in xs]))
        assert torch.equal(mto._TakeRows.apply(index, dim, *xs), taken)


def test_take_rows_gradient_is_a_fresh_dense_tensor_equal_to_index_select_backward():
    """_TakeRows (the rows the losses read from q, k and block outputs) hands back a tensor that is not a view, laid
    out (batch, token, ...) without gaps, so autograd adds the other gradient of q / k / the block output into it in
    place (next test); the values are those of index_select's backward, along the token dim of a (B, heads, T,
    head_dim) view and of a (B, T, C) tensor."""
    g = torch.Generator().manual_seed(12)
    qkv = torch.randn(2, 7, 3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    q = (qkv * 1).permute(2, 0, 3, 1, 4)[0]  # (B, heads, T, head_dim), not a leaf: its gradient is not copied
    hidden = torch.randn(2, 7, 5, generator=g, dtype=torch.float64, requires_grad=True) * 1
    index = torch.tensor([[0, 3, 6], [1, 2, 5]])
    for x, dim in ((q, 2), (hidden, 1)):
        weight = torch.randn(index_select_rows(x, index, dim).shape, generator=g, dtype=torch.float64)
        (got,) = torch.autograd.grad((mto._TakeRows.apply(index, dim, x)[0] * weight).sum(), x)
        (expected,) = torch.autograd.grad((index_select_rows(x, index, dim) * weight).sum(), x)
        assert torch.equal(got, expected) and expected._is_view()
        assert got.movedim(dim, 1).is_contiguous() and not got._is_view()
        assert got.untyped_storage().nbytes() == got.nbytes
        assert torch.autograd.gradcheck(lambda t: mto._TakeRows.apply(index, dim, t), (x.detach().requires_grad_(),))


def test_autograd_adds_a_tensors_other_gradient_into_take_rows_gradient_in_place():
    """No full-size sum of the two gradients of q (the rows' and another op's): one add_ into _TakeRows' tensor."""
    from torch.profiler import profile
    qkv = torch.randn(2, 7, 3, 2, 4, requires_grad=True)
    q = (qkv * 1).permute(2, 0, 3, 1, 4)[0]  # (B, heads, T, head_dim)
    index = torch.tensor([[0, 3, 6], [1, 2, 5]])
    loss = mto._TakeRows.apply(index, 2, q).square().sum() + (q * torch.randn(q.shape)).sum()
    with profile(record_shapes=True) as prof:
        loss.backward()
    adds = [(e.name, e.input_shapes[0]) for e in prof.events() if e.name in ("aten::add", "aten::add_")]
    assert adds.count(("aten::add_", list(q.shape))) == 1 and ("aten::add", list(q.shape)) not in adds


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inside torch.compile
@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_mto_with_compiled_blocks_equals_eager(grad_checkpoint):
    """--compile --mto: the blocks compiled (engine.compile_blocks) return the q, k and outputs the losses read, and
    autograd adds the losses' gradients to the ones of the compiled backward. One graph for all blocks (with the mask
    and q, k returned), and the losses and every parameter's gradient equal the eager model's; also with
    --grad_checkpoint (ViT-L's memory lever), where the compiled blocks run again in the backward."""
    from torch._dynamo.utils import counters
    x, mask = images(), random_mask()
    eager, compiled = tiny_vit(), tiny_vit()
    if grad_checkpoint:  # recomputes in training mode only (no drop path: the ViT's default rate is 0)
        for model in (eager, compiled):
            model.grad_checkpointing = True
            model.train()
    engine.compile_blocks(compiled)
    torch._dynamo.reset()
    counters.clear()
    results = []
    for model in (eager, compiled):
        tokens, losses = mto.mto_forward(model, x, mask, mto.MTOConfig())
        loss = tokens.pow(2).mean() + losses["loss_sing"] + losses["loss_ent"]
        results.append((torch.stack([loss, losses["loss_sing"], losses["loss_ent"]]).detach(), grads(loss, model)))
    assert counters["stats"]["unique_graphs"] == 1
    (values, reference), (compiled_values, compiled_grads) = results
    torch.testing.assert_close(compiled_values, values, rtol=1e-5, atol=1e-6)
    for name, g in reference.items():
        torch.testing.assert_close(compiled_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inside torch.compile
def test_a_compiled_caller_keeps_one_graph_when_the_number_of_masked_patches_changes():
    """A user's torch.compile around mto_forward with mask_sizes (its docstring's way to avoid the host sync): masks
    with another number of masked patches each step (a drawn masking ratio) make one more graph, the sizes then
    symbolic, and no graph break; the losses equal the eager ones. Once, each count made a graph of its own
    (_block_groups' group size GROUP_ELEMENTS // elements was guarded to its exact value) and the mask_sizes check
    broke the graph (its message formatted the symbolic sizes): past dynamo's recompile limit (8) it ran eager."""
    from torch._dynamo.utils import counters
    model, x = tiny_vit(depth=2), images()  # 2 blocks: a group of both for each loss
    forward = torch.compile(lambda x, mask, sizes: mto.mto_forward(model, x, mask, mto.MTOConfig(), mask_sizes=sizes),
                            backend="eager")  # dynamo's graphs run as they are: the graph count is dynamo's
    torch._dynamo.reset()
    counters.clear()
    for masked in (4, 6, 9):
        mask = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(i)) < masked for i in range(2)])
        _, losses = forward(x, mask, mto.mask_sizes(mask))
        _, expected = mto.mto_forward(model, x, mask, mto.MTOConfig())
        torch.testing.assert_close(losses, expected, rtol=1e-6, atol=0)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inside torch.compile
def test_compiled_losses_equal_eager_values_and_gradients():
    """MTOConfig(compile=True) (train_pretrain.py --compile --mto): the losses' arithmetic torch.compile'd, one graph
    per loss (the 4 blocks in one group), with padded rows and images without masked or visible patches: the losses
    and every gradient equal the eager ones. A backward with create_graph=True through the compiled losses is refused
    with the eager losses' error, not left to torch (whose 2.11 ran a double backward through them without one)."""
    from torch._dynamo.utils import counters
    x, mask = images(4), masks_with_edge_cases()
    model = tiny_vit()
    torch._dynamo.reset()
    counters.clear()
    results = []
    for cfg in (mto.MTOConfig(), mto.MTOConfig(compile=True)):
        tokens, losses = mto.mto_forward(model, x, mask, cfg)
        loss = tokens.pow(2).mean() + losses["loss_sing"] + losses["loss_ent"]
        results.append((torch.stack([losses["loss_sing"], losses["loss_ent"]]).detach(), grads(loss, model)))
    assert counters["stats"]["unique_graphs"] == 2
    (values, reference), (compiled_values, compiled_grads) = results
    assert torch.all(values > 0)
    torch.testing.assert_close(compiled_values, values, rtol=1e-6, atol=0)
    for name, g in reference.items():
        torch.testing.assert_close(compiled_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    _, losses = mto.mto_forward(model, x, mask, mto.MTOConfig(compile=True))
    _, eager = mto.mto_forward(model, x, mask, mto.MTOConfig())
    for name, loss in losses.items():  # refused as the eager losses' (torch 2.11 let a compiled double backward run)
        with pytest.raises(RuntimeError, match="cannot be differentiated again"):
            torch.autograd.grad(loss, model.mask_token, create_graph=True, retain_graph=True)
        (grad,) = torch.autograd.grad(loss, model.mask_token, retain_graph=True)  # the same graph, no create_graph
        (expected,) = torch.autograd.grad(eager[name], model.mask_token, retain_graph=True)
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_depth_weights():
    assert torch.allclose(mto.depth_weights(4, 4), torch.tensor([4., 3., 2., 1.]) / 10)
    assert torch.allclose(mto.depth_weights(4, 2), torch.tensor([4., 3., 0., 0.]) / 7)
    assert torch.equal(mto.depth_weights(4, 0), torch.zeros(4))
    with pytest.raises(ValueError, match="0..4"):
        mto.depth_weights(4, 5)
    float64 = mto.depth_weights(4, 3, dtype=torch.float64)  # float64 losses are weighted in float64, not float32's
    assert float64.dtype == torch.float64 and float64.tolist() == [4 / 9, 3 / 9, 2 / 9, 0.0]
    per_block = torch.rand(3, 5, dtype=torch.float64)
    assert mto._depth_weighted(per_block, 4).item() == (per_block.mean(1) * float64[:3]).sum().item()


def test_mto_forward_losses_are_depth_weighted_sums_of_per_layer_losses():
    model, x, mask = tiny_vit(), images(3), random_mask(3)
    cfg = mto.MTOConfig(layers=3, sing_layers=3, ent_layers=2)
    tokens, losses = mto.mto_forward(model, x, mask, cfg)
    allowed = mto.recalibration_mask(mask)
    ref = model.forward_features(x, mask, [allowed] * 3 + [None], return_layers=(0, 1, 2, 3), return_qk=(0, 1))
    assert torch.allclose(tokens, ref.tokens, atol=1e-5)
    sing = sum(w * mto.singularity_loss(ref.layers[i], mask).mean() for i, w in enumerate([4 / 9, 3 / 9, 2 / 9]))
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    ent = sum(w * explicit_entropy(*ref.qk[i][:2], ref.qk[i][2] + additive, mask).mean()  # as the attention saw it
              for i, w in enumerate([4 / 7, 3 / 7]))
    assert torch.allclose(losses["loss_sing"], sing, atol=1e-6) and torch.allclose(losses["loss_ent"], ent, atol=1e-6)
    assert 0 < losses["loss_ent"] < 1 and -1 < losses["loss_sing"] < 1
    with pytest.raises(ValueError, match="MTOConfig.layers=5 is out of range for a ViT of depth 4"):
        mto.mto_forward(model, x, mask, mto.MTOConfig(layers=5))
    with pytest.raises(ValueError, match="MTOConfig.sing_layers=9 is out of range"):  # checked with its loss off too
        mto.mto_forward(model, x, mask, mto.MTOConfig(lambda_sing=0, sing_layers=9))
    assert mto.MTOConfig(layers=np.int64(3)).layers == 3  # numpy ints are block counts too
    for bad in ({"lambda_ent": -0.1}, {"lambda_sing": float("nan")}, {"lambda_ent": float("inf")}, {"layers": -1},
                {"ent_layers": 2.5},
                {"sing_layers": True}):
        with pytest.raises(ValueError, match=f"MTOConfig.{next(iter(bad))} must be"):
            mto.MTOConfig(**bad)
    with pytest.raises(ValueError, match="mask"):
        mto.mto_forward(model, x, None, cfg)


def test_losses_are_per_sample_so_batch_splits_agree():
    model, x, mask = tiny_vit(), images(4), random_mask(4, ratio=0.4)
    cfg = mto.MTOConfig()
    with torch.no_grad():
        _, full = mto.mto_forward(model, x, mask, cfg)
        _, first = mto.mto_forward(model, x[:2], mask[:2], cfg)
        _, second = mto.mto_forward(model, x[2:], mask[2:], cfg)
    for name in ("loss_sing", "loss_ent"):
        assert torch.allclose(full[name], (first[name] + second[name]) / 2, atol=1e-6), name


# ---------------------------------------------------------------------------------------------------
# Gradients and autocast


def grads(loss, model):
    params = dict(model.named_parameters())
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)))


def nonzero(g):
    return g is not None and g.abs().sum() > 0


def test_gradients_reach_the_mask_token_where_expected():
    model, x, mask = tiny_vit(), images(), random_mask()
    # entropy of block 0 only: reaches the mask token and block 0's q/k, not block 0's values/MLP or later blocks
    _, losses = mto.mto_forward(model, x, mask, mto.MTOConfig(lambda_sing=0.0, ent_layers=1))
    g = grads(losses["loss_ent"], model)
    assert nonzero(g["mask_token"]) and nonzero(g["blocks.0.attn.qkv.weight"]) and nonzero(g["patch_embed.weight"])
    assert not nonzero(g["blocks.0.attn.v_bias"]) and not nonzero(g["blocks.0.mlp.fc1.weight"])
    assert not any(nonzero(v) for k, v in g.items() if k.startswith(("blocks.1.", "blocks.2.", "blocks.3.", "norm.")))
    # singularity of block 0 only (visible side detached): mask token and block 0, nothing later
    _, losses = mto.mto_forward(model, x, mask, mto.MTOConfig(lambda_ent=0.0, sing_layers=1))
    g = grads(losses["loss_sing"], model)
    assert nonzero(g["mask_token"]) and nonzero(g["blocks.0.mlp.fc2.weight"])
    assert not any(nonzero(v) for k, v in g.items() if k.startswith(("blocks.1.", "norm.")))
    # with recalibration in every block nothing computed from CLS and visible tokens depends on the mask token
    tokens, _ = mto.mto_forward(model, x, mask, mto.MTOConfig(lambda_sing=0.0, lambda_ent=0.0))
    visible = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~mask], dim=1)
    g = grads(tokens[visible].pow(2).sum(), model)
    assert not nonzero(g["mask_token"]) and nonzero(g["patch_embed.weight"])
    g = grads(tokens[~visible].pow(2).sum(), model)
    assert nonzero(g["mask_token"])
    # an all-visible batch has nothing to optimize
    _, losses = mto.mto_forward(model, x, torch.zeros(2, N, dtype=torch.bool), mto.MTOConfig())
    assert losses["loss_sing"] == 0 and losses["loss_ent"] == 0


def test_losses_are_float32_under_autocast():
    """The losses' own matmuls are not lowered by autocast: float32 inputs give the values of a float32 run."""
    mask = random_mask(4, ratio=0.4)
    g = torch.Generator().manual_seed(5)
    q, k, hidden = torch.randn(4, 3, 1 + N, 8, generator=g), torch.randn(4, 3, 1 + N, 8, generator=g), \
        torch.randn(4, 1 + N, 12, generator=g)
    bias = torch.randn(3, 1 + N, 1 + N, generator=g)
    entropy, singularity = mto.attention_entropy(q, k, bias, mask), mto.singularity_loss(hidden, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(mto.attention_entropy(q, k, bias, mask), entropy)
        assert torch.equal(mto.singularity_loss(hidden, mask), singularity)


def test_autocast_bfloat16():
    model, x, mask = tiny_vit(), images(), random_mask()
    cfg = mto.MTOConfig()
    ref_tokens, ref = mto.mto_forward(model, x, mask, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, losses = mto.mto_forward(model, x, mask, cfg)
        total = tokens.float().pow(2).mean() + mto.mto_total_loss(losses, cfg)
    assert not torch.equal(tokens, ref_tokens)  # the blocks ran in bfloat16 (the final LayerNorm returns float32)
    for name in ("loss_sing", "loss_ent"):
        assert losses[name].dtype == torch.float32
        assert torch.allclose(losses[name], ref[name], atol=0.03), (name, losses[name], ref[name])
    total.backward()
    assert torch.isfinite(model.mask_token.grad).all() and model.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# The interface for other ViTs (mto.py copied alone): prefix tokens and the checks on q, k and the bias


class RegisterViT(torch.nn.Module):
    """dtm's tiny ViT (no relative position bias) with one register token after CLS: 2 prefix tokens, written only
    against the interface that mto.py's docstring names."""

    def __init__(self):
        super().__init__()
        self.vit = tiny_vit(rel_pos_bias="none")
        self.blocks = self.vit.blocks
        self.register = torch.nn.Parameter(torch.randn(1, 1, 192, generator=torch.Generator().manual_seed(7)))

    def forward_features(self, images, mask, attn_mask, return_layers, return_qk):
        x = self.vit.embed(images, mask)  # (B, 1 + N, C)
        x = torch.cat([x[:, :1], self.register.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)  # (B, 2 + N, C)
        layers, qks = {}, {}
        for i, block in enumerate(self.blocks):
            x, qk = block(x, None, attn_mask[i], i in return_qk)
            if i in return_layers:
                layers[i] = x
            if qk is not None:
                qks[i] = qk
        return dtm.Features(self.vit.norm(x), layers, qks)


def test_mto_forward_with_two_prefix_tokens():
    model, x, mask = RegisterViT(), images(), random_mask()
    cfg = mto.MTOConfig()
    with torch.no_grad():
        tokens, losses = mto.mto_forward(model, x, mask, cfg, num_prefix=2)
        allowed = mto.recalibration_mask(mask, num_prefix=2)
        ref = model.forward_features(x, mask, [allowed] * DEPTH, range(DEPTH), range(DEPTH))
        model.vit.mask_token.add_(1.0)
        after, _ = mto.mto_forward(model, x, mask, cfg, num_prefix=2)
    assert tokens.shape == (2, 2 + N, 192) and torch.allclose(tokens, ref.tokens, atol=1e-5)
    visible = torch.cat([torch.ones(2, 2, dtype=torch.bool), ~mask], dim=1)  # CLS, register, visible patches
    assert torch.equal(tokens[visible], after[visible]) and not torch.equal(tokens[~visible], after[~visible])
    weights = mto.depth_weights(DEPTH, DEPTH)
    sing = sum(weights[i] * mto.singularity_loss(ref.layers[i], mask, num_prefix=2).mean() for i in range(DEPTH))
    ent = sum(weights[i] * explicit_entropy(*ref.qk[i][:2], None, mask, num_prefix=2).mean() for i in range(DEPTH))
    torch.testing.assert_close(losses["loss_sing"], sing)
    torch.testing.assert_close(losses["loss_ent"], ent)


def test_attention_entropy_refuses_misshapen_inputs():
    model, mask = tiny_vit(), random_mask()
    q, k, bias = model.forward_features(images(), mask, return_qk=[0]).qk[0]
    mto.attention_entropy(q, k, bias, mask)  # the shapes dtm's ViT returns
    with pytest.raises(ValueError, match="relative position bias"):  # a per-image bias, e.g. with a mask folded in
        mto.attention_entropy(q, k, bias[None].expand(2, -1, -1, -1), mask)
    with pytest.raises(ValueError, match="2 prefix tokens"):  # T = 17 is not 2 + 16
        mto.attention_entropy(q, k, None, mask, num_prefix=2)
    with pytest.raises(ValueError, match="prefix tokens"):
        mto.attention_entropy(q, k[:, :, 1:], None, mask)
    with pytest.raises(ValueError, match="the mask's 1 images"):  # broadcast in the forward, a crash in the backward
        mto.attention_entropy(q, k, bias, mask[:1])
    tokens = q.transpose(1, 2).flatten(2)  # (B, T, C): heads not split ("not enough values to unpack")
    with pytest.raises(ValueError, match=r"must both be \(B, heads, T, head_dim\)"):
        mto.attention_entropy(tokens, tokens, None, mask)


def test_a_vit_that_returns_q_k_without_the_bias_is_named():
    """An adapter returning qk[i] = (q, k): the mask moved into bias's place and the error blamed the mask ("MTO
    needs the (B, N) bool mask ..., got Rows"). Found by a copy-the-file review."""
    model, x, mask = tiny_vit(), images(), random_mask()
    forward_features = model.forward_features

    def without_bias(*args, **kwargs):
        features = forward_features(*args, **kwargs)
        return features._replace(qk={i: qkb[:2] for i, qkb in features.qk.items()})

    model.forward_features = without_bias
    with pytest.raises(ValueError, match=r"forward_features\(...\).qk\[0\] must be \(q, k, bias\), bias the "
                                         r"\(heads, T, T\) relative position bias or None; got 2 entries"):
        mto.mto_forward(model, x, mask, mto.MTOConfig())


def test_a_vit_that_leaves_out_blocks_asked_for_is_named():
    """An adapter whose forward_features ignores return_layers / return_qk gave a bare KeyError: 0 (found by a
    review)."""
    model, x, mask = tiny_vit(), images(), random_mask()
    forward_features = model.forward_features
    for field, asked in (("layers", "return_layers"), ("qk", "return_qk")):
        def leaving_out_block_1(*args, **kwargs):
            features = forward_features(*args, **kwargs)
            return features._replace(**{field: {i: v for i, v in getattr(features, field).items() if i != 1}})

        model.forward_features = leaving_out_block_1
        with pytest.raises(ValueError, match=re.escape(f"forward_features(...).{field} lacks blocks [1]: it must hold "
                                                       f"an entry for each block index in {asked}=[0, 1, 2, 3]")):
            mto.mto_forward(model, x, mask, mto.MTOConfig())


def test_a_vit_that_returns_no_features_object_is_named_with_the_fix():
    """An adapter whose forward_features returns a dict, a plain tuple or the tokens alone failed with "AttributeError:
    'dict' object has no attribute 'layers'", naming no fix (found by a copy-the-file review)."""
    model, x, mask = tiny_vit(), images(), random_mask()
    forward_features = model.forward_features
    for kind, to_return in (("dict", lambda f: f._asdict()), ("tuple", tuple), ("Tensor", lambda f: f.tokens)):
        def returning(*args, to_return=to_return, **kwargs):
            return to_return(forward_features(*args, **kwargs))

        model.forward_features = returning
        with pytest.raises(ValueError, match=re.escape(f"forward_features(...) returned a {kind} without .tokens, "
                                                       f".layers, .qk: return an object with .tokens (B, T, C)")):
            mto.mto_forward(model, x, mask, mto.MTOConfig())


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_around_mto_gives_its_gradients_where_the_docstring_says(reentrant):
    """torch.utils.checkpoint: the docstring said mto_forward inside it gives the same gradients with either
    use_reentrant, but use_reentrant=True keeps the graph of top-level tensor outputs only: the losses dict came back
    without one, their values right, and the MTO losses trained nothing, without an error. use_reentrant=False around
    mto_forward and either around the MTO hook give the plain gradients; the docstring says which."""
    from torch.utils.checkpoint import checkpoint
    model, mask, cfg = tiny_vit(), random_mask(), mto.MTOConfig()
    x = images().requires_grad_()  # use_reentrant=True gives the weights gradients only with an input that needs one

    def gradients(tokens, loss):  # by backward(): use_reentrant=True does not take torch.autograd.grad
        model.zero_grad()
        (tokens.pow(2).mean() + loss).backward()
        return [p.grad for p in model.parameters()]

    tokens, losses = mto.mto_forward(model, x, mask, cfg)
    reference = gradients(tokens, mto.mto_total_loss(losses, cfg))
    tokens, loss, _ = checkpoint(mto.MTO(cfg), model, x, mask, use_reentrant=reentrant)
    for g, expected in zip(gradients(tokens, loss), reference, strict=True):
        torch.testing.assert_close(g, expected)  # use_reentrant=True: up to 2e-8 apart (measured)
    tokens, losses = checkpoint(mto.mto_forward, model, x, mask, cfg, use_reentrant=reentrant)
    assert [loss.requires_grad for loss in losses.values()] == [not reentrant] * 2
    assert "use_reentrant=True keeps the graph of top-level tensor outputs only" in " ".join(mto.__doc__.split())


def test_a_reentrant_checkpoint_around_the_mto_hook_gives_no_gradient_where_no_input_needs_one():
    """use_reentrant=True around MTO(cfg): with images that need no gradient, as a trainer's, the checkpoint's outputs
    need none and the ViT gets no gradient, torch warning only; the docstring said the same gradients with either."""
    from torch.utils.checkpoint import checkpoint
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        tokens, loss, _ = checkpoint(mto.MTO(mto.MTOConfig()), tiny_vit(), images(), random_mask(), use_reentrant=True)
    assert not tokens.requires_grad and not loss.requires_grad
    assert ("where no tensor input needs a gradient (a trainer's images and mask) nothing comes back with one: the ViT "
            "gets no gradient, with a UserWarning only") in " ".join(mto.__doc__.split())


def test_blocks_of_different_shapes_or_dtypes_are_refused_with_a_clear_error():
    """A group of blocks is computed in one buffer: blocks of other widths, head counts or dtypes failed inside
    index_select / view with torch's own message (found by a review)."""
    mask = random_mask()
    hidden = torch.randn(2, 1 + N, 8)
    for other in (torch.randn(2, 1 + N, 16), hidden.double()):
        with pytest.raises(ValueError, match=r"the block output of block entry 1 is .*: the blocks computed together "
                                             r"must be of one shape and dtype"):
            mto.singularity_losses([hidden, other], mask)
    q = torch.randn(2, 2, 1 + N, 4)
    for other in (torch.randn(2, 4, 1 + N, 4), torch.randn(2, 2, 1 + N, 8), q.bfloat16()):
        with pytest.raises(ValueError, match="q of block entry 1 is .*: the blocks computed together"):
            mto.attention_entropies([(q, q, None), (other, other, None)], mask)
    with pytest.raises(ValueError, match="k of block entry 1 is torch.float64"):
        mto.attention_entropies([(q, q, None), (q, q.double(), None)], mask)
    mto.attention_entropies([(q, q.double(), None), (q, q.double(), None)], mask)  # q and k apart: each its own copy


def test_singularity_loss_refuses_tokens_that_do_not_match_the_mask():
    mask = random_mask()
    hidden = torch.randn(2, 1 + N, 8)
    mto.singularity_loss(hidden, mask)
    for bad_hidden, bad_mask in ((hidden, mask[:1]), (hidden[:, 1:], mask), (hidden[0], mask)):
        with pytest.raises(ValueError, match="do not match the mask") as error:
            mto.singularity_loss(bad_hidden, bad_mask)
        assert ("pass num_prefix=" in str(error.value)) == (bad_hidden.shape == (2, N, 8))  # none for another B
    with pytest.raises(ValueError, match=r"images \(if 4 of them are prefix tokens, CLS and registers: pass "
                                         r"num_prefix=4; if not, the mask is of another number of patches\)$"):
        mto.singularity_loss(torch.randn(2, 4 + N, 8), mask)  # a timm ViT with 4 registers, given the default
    with pytest.raises(ValueError, match=r"if 49 of them are prefix tokens.*if not, the mask is of another number"):
        mto.singularity_loss(torch.randn(2, 1 + 4 * N, 8), mask)  # CLS + 64 patches: "pass num_prefix=49" was false
    with pytest.raises(ValueError, match=r"^tokens \(\) do not match the mask \(2, 16\): they must be .* 2 images$"):
        mto.singularity_loss(torch.tensor(1.0), mask)  # not an IndexError from the hint


def test_a_vit_naming_its_prefix_tokens_is_checked_against_num_prefix():
    model, x, mask = RegisterViT(), images(), random_mask()
    model.num_prefix_tokens = 2  # timm's attribute: CLS + one register
    with torch.no_grad():
        mto.mto_forward(model, x, mask, mto.MTOConfig(), num_prefix=2)
        with pytest.raises(ValueError, match="pass num_prefix=2"):
            mto.mto_forward(model, x, mask, mto.MTOConfig())  # the default, 1
        with pytest.raises(ValueError, match="pass num_prefix=2"):
            mto.MTO(mto.MTOConfig())(model, x, mask)


def test_float64_losses_stay_float64_and_pass_gradcheck():
    mask = masks_with_edge_cases()
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(4, 2, 1 + N, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    bias = torch.randn(2, 1 + N, 1 + N, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(mto.attention_entropy(q, k, bias, mask),  # float64 throughout: to 1e-12
                               explicit_entropy(q, k, bias, mask, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda *t: mto.attention_entropy(*t, mask), (q, k, bias))
    # the singularity loss: gradient through the masked tokens only (the visible side is detached by design)
    hidden = torch.randn(4, 1 + N, 5, generator=g, dtype=torch.float64)
    token_is_masked = torch.cat([torch.zeros(4, 1, dtype=torch.bool), mask], dim=1)[..., None]  # (B, T, 1)

    def loss_of_masked_tokens(masked_tokens):
        return mto.singularity_loss(torch.where(token_is_masked, masked_tokens, hidden), mask)

    assert loss_of_masked_tokens(hidden).dtype == torch.float64
    assert torch.autograd.gradcheck(loss_of_masked_tokens, (hidden.clone().requires_grad_(),))


def test_cosine_and_its_hand_written_gradient_equal_autograd_through_the_formula():
    """The singularity loss's cos(x, k) with the keys constant, a zero row of x included (there |x| is clamped to
    1e-12, a constant, as autograd through clamp sees it)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 7, 16, generator=g, dtype=torch.float64)
    x[1, 2, 3] = 0
    k = torch.randn(2, 3, 7, 16, generator=g, dtype=torch.float64)
    k_norm = k.norm(dim=-1)
    weight = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    x_ = x.clone().requires_grad_()
    reference = torch.linalg.vecdot(x_, k) / (x_.norm(dim=-1).clamp(min=1e-12) * k_norm)
    (expected,) = torch.autograd.grad((reference * weight).sum(), x_)
    x_ = x.clone().requires_grad_()
    cos = mto._Cosine.apply(x_, k, k_norm)
    (got,) = torch.autograd.grad((cos * weight).sum(), x_)
    torch.testing.assert_close(cos, reference.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got[1, 2, 3].abs().sum() > 0  # the zero row's gradient: k / (1e-12 |k|), not 0
    assert torch.autograd.gradcheck(lambda t: mto._Cosine.apply(t, k[0], k_norm[0]),  # away from the zero row
                                    (x[0].clone().requires_grad_(),))


def test_hand_written_backwards_refuse_create_graph():
    """Their gradients would carry no graph (a penalty on them silently constant) or a wrong one: refused."""
    mask = random_mask()
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 2, 1 + N, 3, generator=g, requires_grad=True) for _ in range(2))
    hidden = torch.randn(2, 1 + N, 5, generator=g, requires_grad=True)
    z = torch.randn(3, 5, generator=g, requires_grad=True)
    for loss, inputs in [(mto._SoftmaxEntropy.apply(z).sum(), z), (mto.attention_entropy(q, k, None, mask).sum(), q),
                         (mto.singularity_loss(hidden, mask).sum(), hidden)]:
        torch.autograd.grad(loss, inputs, retain_graph=True)  # a plain backward works
        with pytest.raises(RuntimeError, match="cannot be differentiated again"):
            torch.autograd.grad(loss, inputs, create_graph=True)



class MTOLosses(torch.nn.Module):
    """mto_forward's two losses as a module's output (torch.jit.trace takes the ViT's weights as the module's)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, images, mask):
        return tuple(mto.mto_forward(self.vit, images, mask, mto.MTOConfig())[1].values())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace.*` is deprecated")
def test_a_jit_trace_of_the_losses_is_refused_naming_the_fix():
    """torch.jit.trace kept the traced mask's sizes as constants: for another mask the losses were wrong without an
    error (a masked patch equal to the last of 15 visible ones, cosine 1, gave 0.90 and 0.67, the traced 13 visible
    patches taken); mto_forward's trace failed with "unordered_map::at"."""
    traced_mask = torch.zeros(2, N, dtype=torch.bool)
    traced_mask[0, :3] = True  # 13 visible patches, and none
    traced_mask[1] = True
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[:, 0] = True  # 15 visible patches each
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 1 + N, 5, generator=g)
    hidden[:, 1] = hidden[:, N]  # masked patch 0 equals visible patch N - 1
    q, k = torch.randn(2, 2, 1 + N, 4, generator=g), torch.randn(2, 2, 1 + N, 4, generator=g)
    for fn, inputs in [(lambda h, m: mto.singularity_loss(h, m), (hidden, traced_mask)),
                       (lambda q, k, m: mto.attention_entropy(q, k, None, m), (q, k, traced_mask)),
                       (lambda m: mto.patch_rows(m).visible, (traced_mask,)),
                       (MTOLosses(tiny_vit()), (images(), random_mask()))]:
        with pytest.raises(RuntimeError, match=r"cannot be traced \(torch.jit.trace\).*compute MTO eagerly, or use "
                                               r"torch.compile$"):
            torch.jit.trace(fn, inputs)
    assert mto.singularity_loss(hidden, mask).tolist() == [1.0, 1.0]  # eager, as before


# From a mutation review of mto.py

def test_block_counts_equal_to_the_depth_mean_all_blocks():
    """layers = sing_layers = ent_layers = depth is the same as None (all blocks), not out of range."""
    model, x, mask = tiny_vit(), images(), random_mask()
    with torch.no_grad():
        tokens, losses = mto.mto_forward(model, x, mask, mto.MTOConfig())
        tokens_d, losses_d = mto.mto_forward(model, x, mask, mto.MTOConfig(layers=DEPTH, sing_layers=DEPTH,
                                                                           ent_layers=DEPTH))
    assert torch.equal(tokens, tokens_d)
    assert all(torch.equal(losses[k], losses_d[k]) for k in ("loss_sing", "loss_ent"))


def test_mto_hook_returns_detached_stats():
    """The stats are for logging: they must not hold the graph (only the returned loss does)."""
    model, x, mask = tiny_vit(), images(), random_mask()
    tokens, loss, stats = mto.MTO(mto.MTOConfig(lambda_sing=0.3, lambda_ent=0.7))(model, x, mask)
    assert loss.requires_grad and set(stats) == {"loss_sing", "loss_ent"}
    assert not any(v.requires_grad for v in stats.values())
    torch.testing.assert_close(loss, 0.3 * stats["loss_sing"] + 0.7 * stats["loss_ent"])


def test_entropy_of_large_logits_is_accurate_with_and_without_padding():
    """_SoftmaxEntropy takes rows shifted to a maximum of 0 (exp() would overflow otherwise), which _visible_logits
    makes in place, padded or not: a constant bias far from 0 changes nothing but float32's rounding of it."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 7, generator=g, dtype=torch.float64)
    z = (z - z.amax(dim=-1, keepdim=True)).float()
    reference = -(z.double().softmax(-1) * z.double().log_softmax(-1)).sum(-1)
    torch.testing.assert_close(mto._SoftmaxEntropy.apply(z).double(), reference, rtol=0, atol=1e-6)
    unpadded = torch.rand(2, N, generator=g).argsort(dim=1) < 6  # 6 masked in each: no padding
    padded = masks_with_edge_cases()  # different counts, an image with one visible patch, one without masked ones
    no_visible = padded.clone()
    no_visible[1] = True  # an image without visible patches: its rows are left unpadded (not counted)
    assert not mto.patch_rows(unpadded).visible_padded and mto.patch_rows(padded).visible_padded
    for mask in (unpadded, padded, no_visible):
        B = mask.shape[0]
        q, k = torch.randn(B, 2, 1 + N, 8, generator=g), torch.randn(B, 2, 1 + N, 8, generator=g)
        rows = mto.patch_rows(mask)
        plain = mto.attention_entropy(q, k, None, mask)
        for offset in (1e4, -1e4, 1e5):
            bias = torch.full((2, 1 + N, 1 + N), offset)  # the same for every pair: the same rows
            logits = mto._visible_logits([(q, k, bias)], rows, 1, torch.float32)  # (1, heads, B, M, V)
            assert (logits.amax(dim=-1) == 0).all() and logits.isfinite().all()
            torch.testing.assert_close(mto.attention_entropy(q, k, bias, mask), plain, rtol=0, atol=2e-3)


def test_entropy_backward_copies_no_gradient_for_in_place_ops():
    """The logits are shifted (and padded) in place: on a view of another tensor, autograd's backward would copy
    the whole gradient twice per in-place op (CopySlices); _GatherPairs hands back a tensor, not a view."""
    g = torch.Generator().manual_seed(1)
    for mask, with_bias in itertools.product((random_mask(4, seed=5), masks_with_edge_cases()), (True, False)):
        B = mask.shape[0]
        q, k = (torch.randn(B, 2, 1 + N, 8, generator=g, requires_grad=True) for _ in range(2))
        bias = torch.randn(2, 1 + N, 1 + N, generator=g, requires_grad=True) if with_bias else None
        nodes, stack = set(), [mto.attention_entropy(q, k, bias, mask).sum().grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in nodes:
                nodes.add(node)
                stack.extend(next_node for next_node, _ in node.next_functions)
        names = {type(node).__name__ for node in nodes}
        assert ("_GatherPairsBackward" in names) == with_bias and not any("CopySlices" in n for n in names), names


def test_gather_pairs_equals_index_select_and_its_gradient():
    """_GatherPairs: index_select's values in a tensor of its own (not a view), its gradient summed over repeated
    pairs (gradcheck), also for a gradient that is not contiguous."""
    table = torch.randn(2, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    pairs = torch.tensor([3, 3, 0, 15, 7, 3])  # repeated pairs add up
    out = mto._GatherPairs.apply(table, pairs, (2 * 3 * 2, 1, 3))
    assert out._base is None
    torch.testing.assert_close(out, table.index_select(2, pairs).view(12, 1, 3), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: mto._GatherPairs.apply(t, pairs, (12, 1, 3)), (table,))
    assert torch.autograd.gradcheck(lambda t: mto._GatherPairs.apply(t, pairs, (6, 2, 3)).transpose(0, 2), (table,))


def test_mto_py_copied_alone_imports_nothing_of_this_repo_and_computes_the_same(tmp_path):
    """Users copy mto.py into their own code: alone in a folder, it runs and gives this repo's losses and gradients."""
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mto.py"), tmp_path)
    compute = ("import sys, torch, mto\n"
               "torch.manual_seed(0); mask = torch.rand(2, 16) < 0.5\n"
               "hidden, q, k = (torch.randn(2, 17, 8, requires_grad=True),\n"
               "                torch.randn(2, 3, 17, 4, requires_grad=True),\n"
               "                torch.randn(2, 3, 17, 4, requires_grad=True))\n"
               "sing, ent = mto.singularity_loss(hidden, mask), mto.attention_entropy(q, k, None, mask)\n"
               "(sing.sum() + ent.sum()).backward()\n"
               "values = [mto.recalibration_mask(mask), sing, ent, hidden.grad, q.grad, k.grad]\n")
    code = compute + ("torch.save(values, 'values.pt')\n"
                      "print(sorted(m for m in sys.modules if m in ('dtm', 'data', 'engine', 'morph')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]"]
    here = {}
    exec(compute, here)
    for alone, expected in zip(torch.load(tmp_path / "values.pt"), here["values"]):
        assert torch.equal(alone, expected)


def test_losses_of_bf16_inputs_are_computed_and_returned_in_float32():
    """bf16 block outputs and q, k (a ViT run under autocast or in bf16) are promoted to float32, as documented:
    the (B,) losses are float32 and equal those of the same values given in float32 (bf16 -> float32 is exact).
    Computed in bf16, the cosines and logits would keep 8 bits."""
    mask = masks_with_edge_cases()
    g = torch.Generator().manual_seed(21)
    hidden = torch.randn(4, 1 + N, 12, generator=g).bfloat16()
    q, k = (torch.randn(4, 3, 1 + N, 8, generator=g).bfloat16() for _ in range(2))
    bias = torch.randn(3, 1 + N, 1 + N, generator=g).bfloat16()
    sing = mto.singularity_loss(hidden, mask)
    ent = mto.attention_entropy(q, k, bias, mask)
    assert sing.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(sing, mto.singularity_loss(hidden.float(), mask), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ent, mto.attention_entropy(q.float(), k.float(), bias.float(), mask), rtol=1e-6,
                               atol=1e-7)
    torch.testing.assert_close(ent, explicit_entropy(q.float(), k.float(), bias.float(), mask), rtol=1e-5, atol=1e-6)


def test_attention_entropy_with_exactly_two_visible_patches():
    """Two visible patches is the smallest count with an entropy (normalized by log 2): counted, and equal to the
    binary entropy of the two renormalized weights; one visible patch gives 0."""
    g = torch.Generator().manual_seed(22)
    mask = torch.ones(3, N, dtype=torch.bool)
    mask[0, [3, 11]] = False  # two visible patches
    mask[1, ::2] = False
    mask[2, 5] = False  # one visible patch
    q, k = torch.randn(3, 2, 1 + N, 8, generator=g), torch.randn(3, 2, 1 + N, 8, generator=g)
    value = mto.attention_entropy(q, k, None, mask)
    logits = (q[0, :, 1:] @ k[0, :, 1 + torch.tensor([3, 11])].transpose(-2, -1)) / math.sqrt(8)  # (heads, N, 2)
    p = logits.double().softmax(-1)
    binary = -(p * p.log()).sum(-1) / math.log(2)  # (heads, N)
    expected = binary.mean(0)[mask[0]].mean()
    assert 0 < value[0] < 1 and value[0].item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(value, explicit_entropy(q, k, None, mask), rtol=1e-5, atol=1e-6)
    assert value[2] == 0


def test_attention_entropy_ignores_masked_keys_however_large_their_logits():
    """Only visible keys count. An image with few visible patches has its key list padded (here with its masked
    patches 0..5); logits of those masked keys 2e4 above the visible ones must not move the visible keys' shifted
    logits below the -1e4 padding fill (they would take all the weight: entropy log 6 / log 3 = 1.63)."""
    g = torch.Generator().manual_seed(23)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 13:] = False  # 3 visible patches: keys padded to 9 with masked patches 0..5
    mask[1, 7:] = False  # 9 visible patches; 0..5 masked here too
    assert mto.patch_rows(mask).visible_padded
    q, k = torch.randn(2, 2, 1 + N, 8, generator=g), torch.randn(2, 2, 1 + N, 8, generator=g)
    bias = torch.randn(2, 1 + N, 1 + N, generator=g)
    plain = mto.attention_entropy(q, k, bias, mask)
    torch.testing.assert_close(plain, explicit_entropy(q, k, bias, mask), rtol=1e-5, atol=1e-6)
    large = bias.clone()
    large[:, :, 1:7] += 2e4  # every query's logit on keys of patches 0..5, masked in both images
    torch.testing.assert_close(mto.attention_entropy(q, k, large, mask), plain, rtol=0, atol=1e-6)


def groups_of(size):
    """A stand-in for mto._block_groups: groups of `size` blocks (the last one smaller)."""
    return lambda count, elements: [slice(start, start + size) for start in range(0, count, size)]


@pytest.mark.parametrize("group_size", [1, 2, 3])  # one block per group; 2 + 1; all blocks in one group
def test_losses_of_several_blocks_equal_each_blocks_own_values_and_gradients(monkeypatch, group_size):
    """singularity_losses / attention_entropies (what mto_forward calls, a group of blocks at a time) give each
    block's singularity_loss / attention_entropy, and the same gradients, whatever the grouping; a block without
    a bias among blocks with one counts as a zero bias."""
    monkeypatch.setattr(mto, "_block_groups", groups_of(group_size))
    g = torch.Generator().manual_seed(21)
    B, N, C, H, D, L = 3, 9, 8, 2, 4, 3
    mask = torch.rand(B, N, generator=g) < 0.5
    mask[0, :] = False  # an image without a masked patch, and visible counts that differ: padded rows
    hiddens = [torch.randn(B, 1 + N, C, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(L)]
    qkv = [torch.randn(2, B, H, 1 + N, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(L)]
    biases = [torch.randn(H, 1 + N, 1 + N, generator=g, dtype=torch.float64, requires_grad=True), None,
              torch.randn(H, 1 + N, 1 + N, generator=g, dtype=torch.float64, requires_grad=True)]
    weights = torch.randn(2, L, B, generator=g, dtype=torch.float64)
    together = [mto.singularity_losses(hiddens, mask), mto.attention_entropies(
        [(x[0], x[1], bias) for x, bias in zip(qkv, biases)], mask)]
    each = [torch.stack([mto.singularity_loss(h, mask) for h in hiddens]), torch.stack(
        [mto.attention_entropy(x[0], x[1], bias, mask) for x, bias in zip(qkv, biases)])]
    inputs = [*hiddens, *qkv, biases[0], biases[2]]
    for got, expected, weight in zip(together, each, weights):
        assert got.shape == (L, B)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad((got * weight).sum(), inputs, allow_unused=True)
        expected_grads = torch.autograd.grad((expected * weight).sum(), inputs, allow_unused=True)
        for a, b in zip(grads, expected_grads):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_mto_forward_in_groups_of_blocks_equals_block_by_block_under_bf16_autocast(monkeypatch):
    """mto_forward's losses and gradients are the same whether the blocks' losses are computed one block at a time
    or in groups (here 3 + 1 of a depth-4 ViT), under autocast too (the losses in float32)."""
    torch.manual_seed(0)
    vit = dtm.build_vit("vit_tiny", img_size=32, rel_pos_bias="both")
    images = torch.randn(3, 3, 32, 32)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, :2], mask[1, 1:], mask[2, 3] = True, True, True  # 2, 3 and 1 masked patches: padded rows
    cfg = mto.MTOConfig()
    results = []
    for size in (1, 3):
        monkeypatch.setattr(mto, "_block_groups", groups_of(size))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens, losses = mto.mto_forward(vit, images, mask, cfg)
            total = mto.mto_total_loss(losses, cfg)
        assert all(loss.dtype == torch.float32 for loss in losses.values())
        results.append((losses, torch.autograd.grad(total, [p for p in vit.parameters() if p.requires_grad],
                                                    allow_unused=True)))
    (one, grads_one), (groups, grads_groups) = results
    for name in ("loss_sing", "loss_ent"):
        torch.testing.assert_close(groups[name], one[name], rtol=1e-6, atol=0)
    for a, b in zip(grads_groups, grads_one):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_the_losses_group_blocks_by_their_largest_intermediate(monkeypatch):
    """The elements per block that each loss hands _block_groups: the singularity loss's largest of masked rows (B, M,
    C), visible keys (B, V, C) and similarities (B, M, V); the entropy's largest of logits (B, heads, M, V) and q, k
    rows (B, heads, M or V, head_dim). No blocks: (0, B)."""
    seen = []
    monkeypatch.setattr(mto, "_block_groups", lambda count, elements: seen.append((count, elements)) or
                        [slice(0, count)])
    B, N, H, D = 2, 16, 3, 4
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, :5] = True  # M = 5, V = 11
    for C in (4, 32):  # C below M and V: the similarities (B, M, V) are the largest
        mto.singularity_losses([torch.randn(B, 1 + N, C)] * 2, mask)
    mto.attention_entropies([(torch.randn(B, H, 1 + N, D), torch.randn(B, H, 1 + N, D), None)] * 3, mask)
    mask[:, :] = False
    mask[:, 0] = True  # M = 1: the k rows (B, heads, V, head_dim) are the largest
    mto.attention_entropies([(torch.randn(B, H, 1 + N, D), torch.randn(B, H, 1 + N, D), None)], mask)
    assert seen == [(2, B * 5 * 11), (2, B * 11 * 32), (3, B * H * 5 * 11), (1, B * H * 15 * D)]
    for empty in (mto.singularity_losses([], mask), mto.attention_entropies([], mask)):
        assert empty.shape == (0, B) and empty.dtype == torch.float32


def test_block_groups_bound_each_groups_elements():
    assert mto._block_groups(12, 7_000_000) == [slice(0, 4), slice(4, 8), slice(8, 12)]  # ViT-B entropy, batch 64
    assert mto._block_groups(24, 16 * 128 * 75 * 121) == [slice(i, i + 1) for i in range(24)]  # ViT-L, batch 128
    assert mto._block_groups(5, 1) == [slice(0, 5)]  # small blocks: all in one group
    assert mto._block_groups(0, 10) == []


class TimmLikeViT(torch.nn.Module):
    """A ViT as timm's VisionTransformer is, without an adapter: blocks, a forward_features(x, attn_mask=None,
    is_causal=False) (timm 1.0's signature) and num_prefix_tokens."""
    num_prefix_tokens = 1

    def __init__(self):
        super().__init__()
        self.vit = tiny_vit()
        self.blocks = self.vit.blocks

    def forward_features(self, x, attn_mask=None, is_causal=False):
        return self.vit.forward_features(x).tokens


def test_a_vit_without_mtos_interface_is_named_with_the_fix():
    """A timm ViT passed as it is failed in timm with "forward_features() got an unexpected keyword argument
    'return_layers'", a torchvision one with "no attribute 'blocks'": neither named the adapter that MTO needs (found
    by a review as a timm user)."""
    x, mask = images(), random_mask()
    needs = r"mto_forward needs vit.forward_features\(images, mask, attn_mask, return_layers=\[...\], return_qk="
    with pytest.raises(ValueError, match=rf"^{needs}\[...\]\), which this TimmLikeViT lacks .*adapter"):
        mto.mto_forward(TimmLikeViT(), x, mask, mto.MTOConfig())
    with pytest.raises(ValueError, match=r"^mto_forward needs vit.blocks and vit.forward_features\(.*, which this "
                                         r"Linear lacks"):  # torchvision's ViT has neither
        mto.mto_forward(torch.nn.Linear(2, 2), x, mask, mto.MTOConfig())
    model = tiny_vit()  # an interface read through **kwargs, or from a compiled forward_features, is taken
    forward_features = model.forward_features
    model.forward_features = lambda *args, **kwargs: forward_features(*args, **kwargs)
    mto.mto_forward(model, x, mask, mto.MTOConfig())
    model.forward_features = torch.compile(forward_features)
    with pytest.raises(ValueError, match="^the ViT has 1 tokens"):  # checked before anything is compiled
        mto.mto_forward(model, x, mask, mto.MTOConfig(), num_prefix=2)


@dataclasses.dataclass
class DataclassAdapter:
    """A forward_features that is a dataclass instance: unhashable (eq=True sets __hash__ to None)."""
    vit: torch.nn.Module

    def __call__(self, images, mask, attn_mask, return_layers=(), return_qk=()):
        return dtm.VisionTransformer.forward_features(self.vit, images, mask, attn_mask, return_layers=return_layers,
                                                      return_qk=return_qk)


def adds_mto_keywords(forward_features):
    """A decorator that makes an adapter of a forward_features(images), keeping its name (functools.wraps)."""
    @functools.wraps(forward_features)
    def adapter(self, images, mask, attn_mask, return_layers=(), return_qk=()):
        return dtm.VisionTransformer.forward_features(self, images, mask, attn_mask, return_layers=return_layers,
                                                      return_qk=return_qk)
    return adapter


class DecoratedViT(dtm.VisionTransformer):
    @adds_mto_keywords
    def forward_features(self, images):
        raise AssertionError("the adapter calls the ViT's own forward_features")


def own_method(model):
    """A forward_features of the instance, not its class (types.MethodType): a closure over the model."""
    def forward_features(self, *args, **kwargs):
        return dtm.VisionTransformer.forward_features(model, *args, **kwargs)
    return types.MethodType(forward_features, model)


def test_the_interface_check_takes_the_vits_that_ran_before_it_and_keeps_none_alive():
    """The check refused two ViTs that ran before it: a forward_features that is a dataclass instance ("unhashable
    type" from its cache) and a method decorated with functools.wraps that adds MTO's keywords (the check read the
    wrapped function's signature, not the one called); its cache kept a ViT whose forward_features is an instance's
    own (a functools.partial or an instance's method here; torch.compile's function alike) alive after the last
    reference to it went."""
    x, mask, cfg = images(), random_mask(), mto.MTOConfig()
    expected, _ = mto.mto_forward(tiny_vit(), x, mask, cfg)
    model = tiny_vit()
    model.forward_features = DataclassAdapter(model)
    torch.testing.assert_close(mto.mto_forward(model, x, mask, cfg)[0], expected, rtol=0, atol=0)
    model = tiny_vit()
    model.__class__ = DecoratedViT
    torch.testing.assert_close(mto.mto_forward(model, x, mask, cfg)[0], expected, rtol=0, atol=0)
    for own in (lambda model: functools.partial(dtm.VisionTransformer.forward_features, model), own_method):
        model = tiny_vit()
        model.forward_features = own(model)
        mto.mto_forward(model, x, mask, cfg)
        alive = weakref.ref(model)
        del model
        gc.collect()
        assert alive() is None


def test_the_interface_check_reads_each_keyword_and_reads_a_classs_method_once():
    """An instance's forward_features is read too: both keywords or a **kwargs, not *args alone; a signature that
    cannot be read (a builtin's) is left to the call; a class's method is read once (30 us a call otherwise)."""
    x, mask, cfg = images(), random_mask(), mto.MTOConfig()
    model = tiny_vit()
    forward_features = model.forward_features
    model.forward_features = lambda images, mask, attn_mask, **kwargs: forward_features(images, mask, attn_mask,
                                                                                          **kwargs)
    mto.mto_forward(model, x, mask, cfg)
    for lacking in (lambda *args: forward_features(*args), lambda images, mask, attn_mask, return_layers=(): None):
        model.forward_features = lacking
        with pytest.raises(ValueError, match=r"^mto_forward needs vit.forward_features\(.*, which this "
                                             r"VisionTransformer lacks"):
            mto.mto_forward(model, x, mask, cfg)
    assert mto._takes_mto_keywords(max)  # inspect: "no signature found for builtin"
    mto.mto_forward(tiny_vit(), x, mask, cfg)
    before = mto._class_takes_mto_keywords.cache_info()
    mto.mto_forward(tiny_vit(), x, mask, cfg)
    after = mto._class_takes_mto_keywords.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 0)


def test_a_ddp_wrapped_vit_is_told_to_run_mto_inside_the_wrapped_forward(tmp_path, monkeypatch):
    """mto_forward(ddp_model, ...) said "pass an adapter", which a DDP-wrapped ViT of this repo does not need: MTO
    belongs inside the wrapped forward (dtm.DTMPretrainModel's features_fn), where DDP sees it. A one-process gloo
    group, destroyed after."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # init_process_group wraps it, destroy leaves it so
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x, mask = images(), random_mask()
        with pytest.raises(ValueError, match=r"^mto_forward needs vit.blocks and vit.forward_features\(.*\), which "
                                             r"this DistributedDataParallel lacks: with DDP, run MTO inside the "
                                             r"wrapped module's forward, on the ViT itself: mto.MTO\(cfg, num_prefix\)"
                                             r"\(vit, images, mask\), as dtm.DTMPretrainModel\(student, dim, "
                                             r"features_fn=mto.MTO\(cfg\)\)$"):
            mto.mto_forward(torch.nn.parallel.DistributedDataParallel(tiny_vit()), x, mask, mto.MTOConfig())
        model = torch.nn.parallel.DistributedDataParallel(dtm.DTMPretrainModel(tiny_vit(), 8,
                                                                               features_fn=mto.MTO(mto.MTOConfig())))
        targets = torch.randn(2, N, 8, generator=torch.Generator().manual_seed(3))
        loss, stats = model(x, mask, targets, [torch.arange(N).expand(2, N)])  # the fix
        assert loss.isfinite() and stats["loss_sing"] > 0
    finally:
        torch.distributed.destroy_process_group()


def test_the_docstring_tells_a_timm_user_what_an_adapter_needs():
    """Found by a review as a timm user (timm 1.0.31), each a gap in the text: timm's q and k are the outputs of
    q_norm / k_norm; an adapter that wraps the model lost num_prefix_tokens, and a wrong num_prefix then failed in
    torch ("The size of tensor a (201) must match the size of tensor b (197)"); a model cast to bf16 with
    fused_attn=False failed with "expected m1 and m2 to have the same dtype"; the adapter check passed an adapter
    that never put the mask token in, and a constant change of the mask token moved its outputs by 1e-5 only."""
    doc = " ".join(mto.__doc__.split())
    for advice in ("a timm ViT's: its num_prefix_tokens", "the outputs of its q_norm and k_norm",
                   "pass block(x, attn_mask=m.to(x.dtype))", "self.num_prefix_tokens = vit.num_prefix_tokens",
                   "and the masked tokens' outputs do (change it by a random vector",
                   "MTO(cfg, num_prefix)(vit, images, mask)"):
        assert advice in doc


def test_a_wrong_num_prefix_for_dtms_vit_names_the_right_one():
    """dtm's ViT has one token (CLS) before the patches: num_prefix=0 or 2 failed inside its attention with "The size
    of tensor a (17) must match the size of tensor b (16) at non-singleton dimension 3"."""
    model, x, mask = tiny_vit(), images(), random_mask()
    assert model.num_prefix_tokens == mto.NUM_PREFIX == 1
    for wrong in (0, 2):
        with pytest.raises(ValueError, match=rf"^the ViT has 1 tokens before the patches \(num_prefix_tokens\), MTO "
                                             rf"was given num_prefix={wrong}: pass num_prefix=1$"):
            mto.mto_forward(model, x, mask, mto.MTOConfig(), num_prefix=wrong)


def test_rows_of_another_mask_are_refused_where_the_rows_of_this_mask_are_taken():
    """rows=patch_rows(other_mask) gave a loss of other patches without a word (0.2385 for 0.3155, found by the
    modules-as-a-library review): refused, by identity where the rows were taken from this tensor (mto_forward's,
    free), else by comparing the masks where they are (no host sync; on the CPU a RuntimeError)."""
    torch.manual_seed(0)
    mask, other = random_mask(seed=2), random_mask(seed=3)
    assert not torch.equal(mask, other)
    hidden = torch.randn(mask.shape[0], 1 + mask.shape[1], 8)
    q = k = torch.randn(mask.shape[0], 2, 1 + mask.shape[1], 4)
    expected = mto.singularity_loss(hidden, mask), mto.attention_entropy(q, k, None, mask)
    assert mto.patch_rows(mask).mask is mask  # the losses' check is then free: no comparison
    for rows in (mto.patch_rows(mask), mto.patch_rows(mask.clone())):  # this very mask, or an equal one
        assert torch.equal(mto.singularity_loss(hidden, mask, rows), expected[0])
        assert torch.equal(mto.attention_entropy(q, k, None, mask, rows), expected[1])
    for loss in (lambda rows: mto.singularity_loss(hidden, mask, rows),
                 lambda rows: mto.attention_entropy(q, k, None, mask, rows)):
        with pytest.raises(RuntimeError, match="rows are not this mask's"):
            loss(mto.patch_rows(other))
        for recorded in (None, mask[:1], mask.to("meta")):  # none, another shape, another device
            with pytest.raises(ValueError, match="rows are not this mask's .*none recorded"):
                loss(mto.patch_rows(mask)._replace(mask=recorded))
        with pytest.raises(ValueError, match="rows must be mto.patch_rows\\(mask\\) of this very mask, got tuple"):
            loss(tuple(mto.patch_rows(mask)))


# From a second mutation review of mto.py

def test_a_mask_of_another_rank_is_refused_naming_the_fix():
    """A (B, H, W) bool mask passed the rank check only if the check was there: without it, recalibration_mask failed
    in torch.cat ("Tensors must have same number of dimensions") and the losses inside their shape checks."""
    mask = random_mask()
    hidden, q = torch.randn(2, 1 + N, 12), torch.randn(2, 2, 1 + N, 8)
    for bad in (mask.view(2, 4, 4), mask[0]):
        for call in (lambda m: mto.recalibration_mask(m), lambda m: mto.singularity_loss(hidden, m),
                     lambda m: mto.attention_entropy(q, q, None, m), lambda m: mto.patch_rows(m)):
            with pytest.raises(ValueError, match=re.escape(f"got torch.bool {tuple(bad.shape)} (a 0/1 mask: "
                                                           f"mask.bool(); a (B, H, W) one: mask.flatten(1))")):
                call(bad)


def test_rows_of_a_mask_with_equal_counts_take_its_sizes_and_list_patches_in_ascending_order():
    """BlockMaskGenerator masks as many patches in every image, so the trainer's mask_sizes have most_visible ==
    fewest_visible: they are taken. Rows list each image's patches in ascending order (Rows' docstring), also at ViT-B's
    196 patches, where an unstable argsort on the CPU reorders them."""
    g = torch.Generator().manual_seed(5)
    for n, count in ((N, 6), (196, 75)):
        mask = torch.rand(3, n, generator=g).argsort(dim=1) < count
        sizes = mto.mask_sizes(mask)
        assert sizes == (count, n - count, n - count)
        rows = mto.patch_rows(mask, sizes)
        for b in range(3):
            assert rows.masked[b].tolist() == mask[b].nonzero()[:, 0].tolist()
            assert rows.visible[b].tolist() == (~mask[b]).nonzero()[:, 0].tolist()


def test_cosine_gradient_of_a_row_shorter_than_the_clamp_treats_its_norm_as_constant():
    """A row of x with 0 < |x| < 1e-12: |x| is clamped there, a constant, so d cos / dx = k / (1e-12 |k|), as autograd
    through the clamped formula has it; a zero row alone (cos 0) cannot tell that from the unclamped gradient's
    extra term, -cos x / |x|^2."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    x[1] *= 1e-14  # |x| about 4e-14
    k = torch.randn(3, 16, generator=g, dtype=torch.float64)
    k_norm = k.norm(dim=-1)
    x_ = x.clone().requires_grad_()
    reference = torch.linalg.vecdot(x_, k) / (x_.norm(dim=-1).clamp(min=1e-12) * k_norm)
    (expected,) = torch.autograd.grad(reference.sum(), x_)
    x_ = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(mto._Cosine.apply(x_, k, k_norm).sum(), x_)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(got[1], k[1] / (1e-12 * k_norm[1]), rtol=1e-12, atol=0)


def test_a_visible_token_at_exactly_zero_has_cosine_zero_and_the_loss_stays_finite():
    """The visible side's norms are clamped as the masked side's: a zero visible token is at cosine 0 from every
    masked one (as F.cosine_similarity has it), not 0 / 0, which argmax took as the nearest and the loss as NaN."""
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[:, :5] = True
    mask[1, 5] = True
    hidden = torch.randn(2, 1 + N, 12, generator=torch.Generator().manual_seed(7))
    hidden[:, 1 + 9] = 0  # a visible patch of each image
    hidden = hidden.requires_grad_()
    value = mto.singularity_loss(hidden, mask)
    with torch.no_grad():
        patches = hidden[:, 1:]
        cos = F.cosine_similarity(patches[:, :, None], patches[:, None, :], dim=-1).masked_fill(mask[:, None, :], -2)
        expected = torch.where(mask, cos.amax(dim=-1), 0.0).sum(dim=1) / mask.sum(dim=1)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert torch.autograd.grad(value.sum(), hidden)[0].isfinite().all()


def test_recalibration_alone_is_a_config_both_losses_off_is_not_refused_while_it_is_on():
    """--mto with both losses off (their weights or block counts 0) keeps weight recalibration: it is refused as a
    no-op only with --mto_layers 0 too."""
    parser = mto.add_mto_args(argparse.ArgumentParser())
    for flags in (["--mto_lambda_sing", "0", "--mto_lambda_ent", "0"],
                  ["--mto_sing_layers", "0", "--mto_ent_layers", "0"],
                  ["--mto_layers", "2", "--mto_lambda_sing", "0", "--mto_ent_layers", "0"]):
        cfg = mto.mto_config_from_args(parser.parse_args(["--mto", *flags]), depth=4)
        assert cfg.layers in (None, 2), flags


def test_the_mto_hook_hands_its_num_prefix_to_mto_forward():
    """MTO(cfg, num_prefix=2) on a ViT with a register token: the tokens and the loss of mto_forward(..., num_prefix=2),
    not of the default 1."""
    model, x, mask = RegisterViT(), images(), random_mask()
    cfg = mto.MTOConfig(lambda_sing=0.3, lambda_ent=0.7)
    with torch.no_grad():
        tokens, loss, stats = mto.MTO(cfg, num_prefix=2)(model, x, mask)
        expected_tokens, losses = mto.mto_forward(model, x, mask, cfg, num_prefix=2)
    assert torch.equal(tokens, expected_tokens) and tokens.shape == (2, 2 + N, 192)
    assert torch.equal(loss, mto.mto_total_loss(losses, cfg)) and all(torch.equal(stats[k], losses[k]) for k in losses)


def test_tokens_of_another_rank_are_refused_naming_the_shape():
    """Block outputs (B, T) or (B, T, C, 1) whose first two dims match the mask: refused by the shape check, not
    failed later in an unpacking of their shape or a matmul."""
    mask = random_mask()
    hidden = torch.randn(2, 1 + N, 12)
    for bad in (hidden[..., 0], hidden[..., None]):
        with pytest.raises(ValueError, match=re.escape(f"tokens {tuple(bad.shape)} do not match the mask (2, {N})")):
            mto.singularity_loss(bad, mask)
