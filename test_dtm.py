"""Tests for dtm.py: the ViT, the teachers (CLIP loading against a reference forward) and the DTM loss."""

import math
import os
import re
import shlex
import subprocess
import sys
import tarfile
import warnings
import zipfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import dtm
import morph

torch.set_num_threads(1)

IMG, PATCH = 32, 8  # a 4x4 patch grid, N = 16
N = (IMG // PATCH) ** 2


def tiny_vit(**kw):
    torch.manual_seed(0)
    model = dtm.build_vit("vit_tiny", img_size=IMG, patch_size=PATCH, **kw)
    with torch.no_grad():  # non-zero relative position tables so that they matter in the tests
        for name, p in model.named_parameters():
            if name.endswith("rel_pos_bias.table"):
                p.normal_(0, 0.5)
    return model


def images(batch=2, seed=1, size=IMG):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_mask(batch=2, seed=2):
    return torch.rand(batch, N, generator=torch.Generator().manual_seed(seed)) < 0.5


# ---------------------------------------------------------------------------------------------------
# ViT


def test_vit_forward_backward_shapes():
    model = tiny_vit()
    x, mask = images(), random_mask()
    features = model.forward_features(x, mask, return_layers=(0, -1))
    tokens, layers = features.tokens, features.layers
    assert tokens.shape == (2, 1 + N, 192) and features.qk == {}
    assert sorted(layers) == [0, 3] and [t.shape for t in layers.values()] == [(2, 1 + N, 192)] * 2
    assert torch.allclose(model.norm(layers[3]), tokens)  # last block's output, before the final norm
    tokens.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.mask_token.grad.abs().sum() > 0


def test_drop_path_drops_whole_samples_with_probability_p():
    drop = dtm.DropPath(0.3).train()
    x = torch.ones(20000, 2, 3)
    torch.manual_seed(0)
    out = drop(x)
    kept = out[:, 0, 0] != 0
    assert torch.all(out == kept[:, None, None] / 0.7)  # a whole sample is dropped or kept, kept ones scaled by 1/0.7
    assert abs(kept.float().mean().item() - 0.7) < 0.02  # 6 standard deviations of the kept fraction
    assert drop(x.bfloat16()).dtype == torch.bfloat16
    assert drop.eval()(x) is x
    state = torch.random.get_rng_state()
    assert dtm.DropPath(0.0).train()(x) is x and torch.equal(torch.random.get_rng_state(), state)  # draws nothing
    assert "keep_prob" not in dtm.DropPath(0.3).state_dict()  # checkpoints unchanged


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_drop_path_keeps_its_rate_in_a_model_cast_to_bf16_or_fp16(dtype):
    """A model cast to bf16 / fp16 (tiny_vit().bfloat16()) cast the keep probability too: 1 - p rounded to 1.0 for
    p = 0.0002 (nothing dropped), and ViT-B's block 1 at --drop_path 0.1 dropped 0.78% in bf16, not 0.91%."""
    drop = dtm.DropPath(0.0002).to(dtype).train()
    torch.manual_seed(0)
    out = drop(torch.ones(400000, 1, dtype=dtype))
    assert out.dtype == dtype and 40 < (out == 0).sum().item() < 120  # 80 expected, 4.5 standard deviations either side
    assert dtm.DropPath(0.3).double().keep_prob.dtype == torch.float64  # a float64 model keeps float64
    assert dtm.DropPath(0.3).to("meta", torch.bfloat16).keep_prob.device.type == "meta"  # and follows the model
    block_1 = dtm.build_vit("vit_b", img_size=16, depth=2, drop_path_rate=1 / 11).bfloat16().blocks[1].drop_path
    assert block_1.keep_prob.item() == pytest.approx(1 - 1 / 11, rel=1e-7)


def test_vit_config_and_errors():
    model = dtm.build_vit("vit_tiny", img_size=IMG, patch_size=PATCH, drop_path_rate=0.3)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert torch.all(model.blocks[0].gamma_1 == 0.1)
    assert model.pos_embed is None and model.rel_pos_bias is not None  # official DTM defaults
    with pytest.raises(ValueError, match="vit_s"):
        dtm.build_vit("vit_huge")
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        dtm.build_vit("vit_tiny", img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="img_size"):
        model.forward_features(images(size=40))
    with pytest.raises(ValueError, match="mask must be bool"):
        model.forward_features(images(), random_mask().float())
    for rate in (1.0, -0.1):  # 1.0 made the last block's output NaN (x * 0 / 0)
        with pytest.raises(ValueError, match=r"--drop_path\) must be in \[0, 1\)"):
            dtm.build_vit("vit_tiny", img_size=IMG, patch_size=PATCH, drop_path_rate=rate)
        with pytest.raises(ValueError, match="drop path rate"):
            dtm.DropPath(rate)


def test_masking_replaces_masked_patch_embeddings():
    model = tiny_vit().eval()
    x, mask = images(), random_mask()
    out = model.forward_features(x, mask).tokens
    # new pixels in masked patches: identical output
    patch_is_masked = mask.view(2, 1, 4, 1, 4, 1).expand(2, 3, 4, PATCH, 4, PATCH).reshape(x.shape)
    x_masked_changed = torch.where(patch_is_masked, torch.randn_like(x), x)
    assert torch.equal(model.forward_features(x_masked_changed, mask).tokens, out)
    # new pixels in one visible patch: the output changes
    b, i = torch.nonzero(~mask)[0].tolist()
    x_visible_changed = x.clone()
    x_visible_changed[b, :, (i // 4) * PATCH:(i // 4 + 1) * PATCH, (i % 4) * PATCH:(i % 4 + 1) * PATCH] += 1.0
    assert not torch.allclose(model.forward_features(x_visible_changed, mask).tokens[b], out[b])
    # an all-False mask is no mask
    assert torch.equal(model.forward_features(x, torch.zeros(2, N, dtype=torch.bool)).tokens,
                       model.forward_features(x).tokens)


def test_sdpa_block_equals_explicit_softmax_from_the_returned_queries_keys_and_bias():
    model = tiny_vit(rel_pos_bias="both").eval()
    x, T = images(), 1 + N
    allowed = torch.rand(2, 1, T, T, generator=torch.Generator().manual_seed(3)) < 0.6
    allowed |= torch.eye(T, dtype=torch.bool)  # every query sees at least itself
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    float_mask = torch.randn(2, 1, T, T, generator=torch.Generator().manual_seed(4))
    tokens = model.embed(x)
    shared = model.rel_pos_bias()
    for attn_mask in (None, allowed, additive, float_mask):
        block = model.blocks[1]
        out, (q, k, rel_bias) = block(tokens, shared, attn_mask, return_qk=True)
        assert q.shape == k.shape == (2, 3, T, 64) and rel_bias.shape == (3, T, T)
        torch.testing.assert_close(rel_bias, shared + block.attn.rel_pos_bias())  # layout "both": shared + own
        bias = rel_bias if attn_mask is None else rel_bias + (additive if attn_mask is allowed else attn_mask)
        attn = ((q @ k.transpose(-2, -1)) / 8.0 + bias).softmax(-1)  # head_dim 64
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            assert torch.all(attn.masked_select(~allowed.expand_as(attn)) == 0)
        h = block.norm1(tokens)
        v = (h @ block.attn.qkv.weight[2 * 192:].t() + block.attn.v_bias).view(2, T, 3, 64).transpose(1, 2)
        y = block.attn.proj((attn @ v).transpose(1, 2).reshape(2, T, 192))
        y = tokens + block.gamma_1 * y
        expected = y + block.gamma_2 * block.mlp(block.norm2(y))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    same = [model.forward_features(x, attn_mask=m).tokens for m in (allowed, additive)]
    torch.testing.assert_close(same[0], same[1])
    features = model.forward_features(x, attn_mask=[allowed, None, None, float_mask], return_qk=(0, -1))
    assert sorted(features.qk) == [0, 3] and features.qk[0][2].shape == (3, T, T)


def test_every_block_gets_the_residual_stream_in_the_weights_dtype_under_autocast():
    """Under bf16 autocast the patch embedding's conv gives bf16 while the blocks return float32 (layer scale and
    residual in the weights' dtype): the embedding is cast so that block 0 sees float32 too (with bf16 it saw another
    dtype than blocks 1.., and torch.compile made a second graph). A bf16 model keeps bf16 throughout."""
    for model, autocast, expected in ((tiny_vit(), True, torch.float32),
                                       (tiny_vit().bfloat16(), False, torch.bfloat16)):
        seen = []
        for block in model.blocks:
            block.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
        for mask in (None, random_mask()):
            seen.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model.forward_features(images().to(expected), mask=mask)
            assert seen == [expected] * model.depth, (seen, mask is None)


def test_the_clip_teachers_layer_norms_and_residual_stream_are_float32_under_the_cpus_autocast_too():
    """CUDA's autocast runs layer_norm in float32 (its output float32); the CPU's runs it in its input's dtype, so the
    teacher's whole residual stream was bf16 on the CPU (a CLIP ViT-B/16 with random weights: targets 0.99% from
    float32's there, 0.53% with the stream in float32 as on a GPU). The conv's output is cast as the student's is."""
    visual = dtm.CLIPVisual(input_resolution=32, patch_size=16, width=64, layers=2, heads=1, output_dim=8)
    seen = []
    for norm in (m for m in visual.modules() if isinstance(m, torch.nn.LayerNorm)):  # ln_pre, ln_1, ln_2, ln_post
        norm.register_forward_hook(lambda module, inputs, out: seen.append((inputs[0].dtype, out.dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        targets = visual(torch.randn(2, 3, 32, 32))
    assert len(seen) == 2 + 2 * 2 and set(seen) == {(torch.float32, torch.float32)}
    assert targets.dtype == torch.bfloat16  # the projection is a matmul: autocast's dtype


def test_relative_position_index_matches_naive_loop():
    H, W = 2, 3
    index = dtm.relative_position_index((H, W))
    num_rel = (2 * H - 1) * (2 * W - 1)
    coords = [(y, x) for y in range(H) for x in range(W)]
    for qi, (qy, qx) in enumerate(coords):
        for ki, (ky, kx) in enumerate(coords):
            assert index[1 + qi, 1 + ki] == (qy - ky + H - 1) * (2 * W - 1) + (qx - kx + W - 1)
    assert index[0, 1:].eq(num_rel).all() and index[1:, 0].eq(num_rel + 1).all() and index[0, 0] == num_rel + 2


def test_output_projections_are_rescaled_by_depth():
    """BEiT's fix_init_weight: block l's attention and MLP output projections divided by sqrt(2 l), l from 1."""
    torch.manual_seed(0)
    vit = dtm.build_vit("vit_tiny", img_size=32)
    stds = [(b.attn.proj.weight.std().item(), b.mlp.fc2.weight.std().item()) for b in vit.blocks]
    for l in (1, 3):  # block l has layer_id l + 1: its stds are block 0's over sqrt(l + 1)
        for first, other in zip(stds[0], stds[l]):
            assert first / other == pytest.approx(math.sqrt(l + 1), rel=0.05)


def test_pretraining_init_is_a_normal_truncated_at_one_std():
    """dtm._trunc_normal_ (one inverse-CDF pass) against the truncated normal's CDF: Phi(x / std) rescaled to the
    bounds, at nine points, over a million draws."""
    torch.manual_seed(0)
    x = dtm._trunc_normal_(torch.empty(1_000_000), std=0.02)
    assert x.abs().max() <= 0.02 and x.abs().max() > 0.01999
    phi = lambda z: (1 + math.erf(z / math.sqrt(2))) / 2  # noqa: E731
    for z in (-0.9, -0.6, -0.3, -0.1, 0.0, 0.1, 0.3, 0.6, 0.9):
        expected = (phi(z) - phi(-1)) / (phi(1) - phi(-1))
        assert (x <= z * 0.02).double().mean().item() == pytest.approx(expected, abs=2e-3), z
    assert x.mean().abs() < 1e-4 and x.std().item() == pytest.approx(0.02 * 0.5398, rel=0.005)


def test_weight_inits_pretrain_and_downstream():
    """"pretrain" (the official modeling_dtm.py): N(0, 0.02) truncated at +-0.02, whose std is 0.54 x 0.02, the
    patch conv too; "downstream" (modeling_finetune.py, BEiT's segmentation backbone): timm's bounds +-2, std 0.02,
    the patch conv at torch's default (uniform, bias not zero); the head scaled by 0.001 in both."""
    torch.manual_seed(0)
    pre = dtm.build_vit("vit_s", img_size=32, num_classes=1000)
    down = dtm.build_vit("vit_s", img_size=32, num_classes=1000, weight_init="downstream")
    qkv_pre, qkv_down = pre.blocks[0].attn.qkv.weight, down.blocks[0].attn.qkv.weight  # 384 x 1152 values
    assert qkv_pre.abs().max() <= 0.02 and qkv_pre.std().item() == pytest.approx(0.02 * 0.5398, rel=0.02)
    assert qkv_down.abs().max() > 0.06 and qkv_down.std().item() == pytest.approx(0.02, rel=0.02)
    assert down.head.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.05)
    assert pre.patch_embed.weight.abs().max() <= 0.02 and not pre.patch_embed.bias.any()
    bound = 1 / math.sqrt(3 * 16 * 16)  # torch's Conv2d default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), ..)
    assert down.patch_embed.weight.abs().max() <= bound and down.patch_embed.weight.abs().max() > 0.9 * bound
    assert down.patch_embed.bias.any()
    with pytest.raises(ValueError, match=r"^weight_init must be one of pretrain, downstream, got 'timm'$"):
        dtm.build_vit("vit_tiny", img_size=32, weight_init="timm")


class _Float32Outputs(TorchDispatchMode):
    """Records the shapes of the float32 tensors that aten ops return inside it, autograd's backward ops included."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.shapes.append(tuple(tensor.shape))
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_attention_bias_is_summed_in_the_attention_dtype_with_the_float32_sums_values(dtype):
    """Under autocast the (B, heads, T, T) bias of a per-image mask (MTO's) is made in bf16 / fp16 (no float32 copy
    of that size, forward or backward: 238 MB per block for ViT-B at batch 128), with the values of the float32 sum
    cast, the mask being 0 / -inf; a (heads, T, T) bias or a mask alone is cast as it is."""
    g = torch.Generator().manual_seed(0)
    rel = (torch.randn(3, 10, 10, generator=g) * 4).requires_grad_()
    allowed = torch.rand(2, 1, 10, 10, generator=g) < 0.7
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    for mask in (allowed, additive):
        with _Float32Outputs() as made:
            bias = dtm._attention_bias(rel, mask, dtype)
            bias.sum().backward()  # its gradient's way back to the table
        assert bias.dtype == dtype and torch.equal(bias, (rel.detach() + additive).to(dtype))
        assert dtype == torch.float32 or (2, 3, 10, 10) not in made.shapes, made.shapes
        assert torch.equal(rel.grad, torch.full_like(rel, 2.0))
        rel.grad = None
    assert torch.equal(dtm._attention_bias(rel, None, dtype), rel.to(dtype))
    assert torch.equal(dtm._attention_bias(None, allowed, dtype), additive.to(dtype))
    assert dtm._attention_bias(None, None, dtype) is None


def test_relative_position_bias_reads_the_table_by_query_and_key():
    """forward() -> (heads, T, T) with [h, q, k] = table[index[q, k], h]: row q is the query (BEiT's layout, so
    official tables load into the right places)."""
    rpb = dtm.RelativePositionBias((2, 3), num_heads=2)
    with torch.no_grad():
        rpb.table.copy_(torch.randn_like(rpb.table))
    bias, index = rpb(), dtm.relative_position_index((2, 3))
    assert bias.shape == (2, 7, 7)
    for h in range(2):
        for q in range(7):
            for k in range(7):
                assert bias[h, q, k] == rpb.table[index[q, k], h]
    assert not torch.equal(bias, bias.transpose(1, 2))  # a transposed read would be caught


def test_rel_pos_table_resize_equals_beits_scipy_interp2d():
    """Grid 5 -> 7 (offsets 9 -> 13), as BEiT's checkpoint.py computes it with scipy's interp2d(kind="cubic") at
    scipy 1.13.1 (run outside this repo, which does not depend on scipy; values rounded to 6 decimals)."""
    offsets = torch.tensor([[((i * 5 + j) % 7) - 3.0 for j in range(9)] for i in range(9)], dtype=torch.float64)
    table = torch.cat([offsets.reshape(-1, 1), torch.tensor([[7.0], [8.0], [9.0]], dtype=torch.float64)])
    resized = dtm.resize_rel_pos_table(table, (5, 5), (7, 7))
    new = resized[:-3, 0].reshape(13, 13)
    scipy_row_dy0 = [3.0, -1.516138, -2.975749, -2.642397, -1.772983, -1.0, 0.0, 1.0, 1.772983, 2.642397,
                     2.975749, 1.516138, -3.0]
    scipy_row_dy_minus6 = [-3.0, -2.55851, -2.048361, -1.46643, -0.808822, 0.0, 1.0, 2.0, 3.148823, 1.006881,
                           -3.368407, -5.780707, -2.0]
    scipy_col_dx_minus4 = [-2.048361, 2.638819, 3.424294, 2.165106, 0.697889, -1.044033, -2.975749, 1.735706,
                           0.803704, -1.644949, -1.995596, -0.295567, 3.368407]
    torch.testing.assert_close(new[6], torch.tensor(scipy_row_dy0, dtype=torch.float64), rtol=0, atol=2e-6)
    torch.testing.assert_close(new[0], torch.tensor(scipy_row_dy_minus6, dtype=torch.float64), rtol=0, atol=2e-6)
    torch.testing.assert_close(new[:, 2], torch.tensor(scipy_col_dx_minus4, dtype=torch.float64), rtol=0, atol=2e-6)
    assert torch.equal(resized[-3:], table[-3:])  # CLS rows kept
    # grid 3 -> 5: the ratio stops at the bisection's bound 1.5, the old offsets reach +-2.5 only, and the new
    # offsets beyond take the end values (FITPACK clamps), as scipy gave
    small = torch.tensor([[((i * 5 + j) % 7) - 3.0 for j in range(5)] for i in range(5)], dtype=torch.float64)
    small = dtm.resize_rel_pos_table(torch.cat([small.reshape(-1, 1), torch.zeros(3, 1, dtype=torch.float64)]),
                                     (3, 3), (5, 5))[:-3, 0].reshape(9, 9)
    torch.testing.assert_close(small[4], torch.tensor([0, 0, 0.335238, 1, 2, 3, 0.678091, -3, -3], dtype=torch.float64),
                               rtol=0, atol=2e-6)
    torch.testing.assert_close(small[0], torch.tensor([-3, -3, -2.771429, -2, -1, 0, 0.771429, 1, 1],
                                                      dtype=torch.float64), rtol=0, atol=2e-6)


def test_rel_pos_table_resize_spacing_is_beits():
    """The bisection's ratio for 224 -> 384 and 224 -> 512 px: the constants BEiT's and the official DTM code's
    comments note (naver-ai/dtm run_class_finetuning.py "q > 1.090307", unilm checkpoint.py "q > 1.13492")."""
    for new_side, q in ((47, 1.090307), (63, 1.13492)):
        nodes = dtm._beit_offsets(27, new_side)
        assert len(nodes) == 27 and nodes[12:15] == [-1, 0, 1]
        assert abs((nodes[15] - nodes[14]) - q) < 5e-6  # the steps grow by q (the comments' constants, rounded)
        assert abs(nodes[-1] - new_side // 2) < 1e-3  # the outermost old offset lands on the new edge


def test_rel_pos_table_resize_reproduces_cubics_and_keeps_near_offsets():
    """A not-a-knot cubic spline reproduces any cubic exactly: if the old offsets hold a cubic in dy times a cubic
    in dx read at the places BEiT's spacing puts them, the new offsets get the cubics read at their own values
    (the map is separable, where each axis on its own equals the 2-D spline). Offsets 0 and +-1 keep their values
    (the geometric spacing leaves them in place)."""
    def cubic_y(d): return 0.02 * d ** 3 - 0.1 * d ** 2 + 0.5 * d - 1.0
    def cubic_x(d): return -0.01 * d ** 3 + 0.3 * d ** 2 + 0.2 * d + 2.0
    dy = torch.tensor(dtm._beit_offsets(13, 19), dtype=torch.float64)  # grid (7, 5) -> (10, 9)
    dx = torch.tensor(dtm._beit_offsets(9, 17), dtype=torch.float64)
    values = (cubic_y(dy)[:, None] * cubic_x(dx)[None]).reshape(-1, 1)
    table = torch.cat([values, torch.zeros(3, 1, dtype=torch.float64)])
    resized = dtm.resize_rel_pos_table(table, (7, 5), (10, 9))[:-3, 0].reshape(19, 17)
    ny, nx = torch.arange(-9, 10, dtype=torch.float64), torch.arange(-8, 9, dtype=torch.float64)
    expected = cubic_y(ny)[:, None] * cubic_x(nx)[None]
    # the outermost new offsets can sit a bisection step (< 1e-5) beyond the last node and take its value
    torch.testing.assert_close(resized[1:-1, 1:-1], expected[1:-1, 1:-1], rtol=0, atol=1e-10)
    torch.testing.assert_close(resized, expected, rtol=1e-5, atol=0)
    random = torch.randn((2 * 14 - 1) ** 2 + 3, 3)
    old = random[:-3].reshape(27, 27, 3)
    new = dtm.resize_rel_pos_table(random, (14, 14), (32, 32))[:-3].reshape(63, 63, 3)
    torch.testing.assert_close(new[31 - 1:31 + 2, 31 - 1:31 + 2], old[13 - 1:13 + 2, 13 - 1:13 + 2], rtol=0, atol=1e-5)


def test_rel_pos_table_resize_same_grid_and_shrinking():
    """The same grid returns the table unchanged; a smaller grid keeps the old values of its offsets (a crop)."""
    table = torch.randn((2 * 4 - 1) ** 2 + 3, 3)
    assert torch.equal(dtm.resize_rel_pos_table(table, (4, 4), (4, 4)), table)
    smaller = dtm.resize_rel_pos_table(table, (4, 4), (2, 3))
    assert smaller.shape == (3 * 5 + 3, 3)
    assert torch.equal(smaller[:-3].reshape(3, 5, 3), table[:-3].reshape(7, 7, 3)[2:5, 1:6])
    assert torch.equal(smaller[-3:], table[-3:])
    bigger = dtm.resize_rel_pos_table(table, (4, 4), (6, 6))
    assert bigger.shape == ((2 * 6 - 1) ** 2 + 3, 3) and bigger.dtype == table.dtype
    assert dtm.resize_rel_pos_table(table.to("meta"), (4, 4), (6, 6)).device.type == "meta"  # stays on its device


def test_a_half_precision_table_is_resized_to_float32_not_rounded_back():
    """resize_rel_pos_table's docstring: the result is at least float32 (a DeepSpeed fp16 table is not rounded back),
    the float64 spline's values cast once."""
    table = torch.randn((2 * 3 - 1) ** 2 + 3, 2, generator=torch.Generator().manual_seed(0)).half()
    resized = dtm.resize_rel_pos_table(table, (3, 3), (5, 5))
    assert resized.dtype == torch.float32
    assert torch.equal(resized, dtm.resize_rel_pos_table(table.double(), (3, 3), (5, 5)).float())
    assert not torch.equal(resized, resized.half().float())  # values fp16 cannot hold


def test_both_layout_names_shapes_and_the_fine_tuning_sum():
    """rel_pos_bias="both" (the official pre-training): a shared table and one per block, added together. The
    official names are rel_pos_bias.relative_position_bias_table and blocks.i.attn.relative_position_bias_table."""
    both = tiny_vit(rel_pos_bias="both").eval()
    rows = (2 * 4 - 1) ** 2 + 3  # a 4x4 grid: 49 offsets + CLS->patch, patch->CLS, CLS->CLS
    tables = {n: tuple(p.shape) for n, p in both.named_parameters() if "rel_pos_bias" in n}
    assert tables == {"rel_pos_bias.table": (rows, 3), **{f"blocks.{i}.attn.rel_pos_bias.table": (rows, 3)
                                                           for i in range(4)}}
    x = images()
    shared_only = dtm.build_vit("vit_tiny", img_size=IMG, patch_size=PATCH, rel_pos_bias="shared").eval()
    shared_only.load_state_dict({k: v for k, v in both.state_dict().items() if ".attn.rel_pos_bias" not in k})
    assert not torch.allclose(both.forward_features(x).tokens, shared_only.forward_features(x).tokens, atol=1e-3)
    # per block := per block + shared (the official fine-tuning's --init_both_rpb): the same attention bias
    per_block = dtm.build_vit("vit_tiny", img_size=IMG, patch_size=PATCH, rel_pos_bias="per_block").eval()
    sd = dtm.adapt_state_dict(both.state_dict(), per_block)
    for i in range(4):
        assert torch.equal(sd[f"blocks.{i}.attn.rel_pos_bias.table"],
                           both.blocks[i].attn.rel_pos_bias.table + both.rel_pos_bias.table)
    per_block.load_state_dict(sd)
    torch.testing.assert_close(per_block.forward_features(x).tokens, both.forward_features(x).tokens)
    checkpoint = {"model": both.state_dict(), "args": {"model": "vit_tiny"}}
    assert dtm.stored_rel_pos_bias(checkpoint["model"]) == "both"
    vit, fresh = dtm.vit_from_checkpoint(checkpoint, IMG, rel_pos_bias="per_block")
    assert vit.rel_pos_bias is None and fresh == []
    torch.testing.assert_close(vit.eval().forward_features(x).tokens, both.forward_features(x).tokens)
    vit, _ = dtm.vit_from_checkpoint(checkpoint, IMG)  # the stored layout
    assert vit.rel_pos_bias is not None and vit.blocks[0].attn.rel_pos_bias is not None


@pytest.mark.parametrize("img_size", [(16, 80), (32, 224), (32, 48)])
def test_adapt_state_dict_keeps_tables_of_the_models_non_square_grid(img_size):
    """A table of the model's own size is kept. These grids' tables, (2H-1)(2W-1) + 3 rows, once passed for a square
    grid's ((1, 5) and (2, 14): 3x3 and 5x5) and were "resized" into other values, or could not be read ((2, 3))."""
    vit = dtm.VisionTransformer(img_size=img_size, patch_size=16, embed_dim=16, depth=1, num_heads=2, abs_pos_emb=True)
    torch.nn.init.normal_(vit.rel_pos_bias.table, generator=torch.Generator().manual_seed(0))
    loaded, _ = dtm.vit_from_checkpoint({"model": vit.state_dict(), "args": {"num_heads": 2}}, img_size)
    assert torch.equal(loaded.rel_pos_bias.table, vit.rel_pos_bias.table)
    assert torch.equal(loaded.pos_embed, vit.pos_embed)  # and a position embedding of its size


def test_a_non_square_grid_resizes_from_the_source_grid_given():
    """A 2x3 grid's table and position embedding have the size of a 3x2 grid's: without source_grid they would be
    kept, read with the axes swapped; with it they are resized. A source_grid they do not fit is refused."""
    wide = dtm.VisionTransformer(img_size=(32, 48), patch_size=16, embed_dim=16, depth=1, num_heads=2, abs_pos_emb=True)
    for p in (wide.rel_pos_bias.table, wide.pos_embed):
        torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(0))
    checkpoint = {"model": wide.state_dict(), "args": {"num_heads": 2}}
    tall, _ = dtm.vit_from_checkpoint(checkpoint, (48, 32), source_grid=(2, 3))
    assert torch.equal(tall.rel_pos_bias.table, dtm.resize_rel_pos_table(wide.rel_pos_bias.table, (2, 3), (3, 2)))
    assert torch.equal(tall.pos_embed, dtm.resize_pos_embed(wide.pos_embed, (2, 3), (3, 2)))
    assert not torch.equal(tall.rel_pos_bias.table, wide.rel_pos_bias.table)
    pos64 = wide.pos_embed.detach().double()  # bicubic on the (H, W) grid, in float64 for float64 (not via float32)
    direct = F.interpolate(pos64[:, 1:].reshape(1, 2, 3, -1).permute(0, 3, 1, 2), size=(3, 2), mode="bicubic")
    assert torch.equal(dtm.resize_pos_embed(pos64, (2, 3), (3, 2))[:, 1:], direct.permute(0, 2, 3, 1).reshape(1, 6, -1))
    same, _ = dtm.vit_from_checkpoint(checkpoint, (32, 48), source_grid=(2, 3))  # the same grid: unchanged
    assert torch.equal(same.rel_pos_bias.table, wide.rel_pos_bias.table) and torch.equal(same.pos_embed, wide.pos_embed)
    with pytest.raises(ValueError, match=r"7 positions, which do not fit the source grid \(3, 3\)"):
        dtm.adapt_state_dict({"pos_embed": wide.pos_embed}, tall, source_grid=(3, 3))
    with pytest.raises(ValueError, match=r"table has 18 rows, expected 28 for grid \(3, 3\)"):
        dtm.adapt_state_dict({"rel_pos_bias.table": wide.rel_pos_bias.table}, tall, source_grid=(3, 3))


def test_adapt_state_dict_shared_to_per_block_and_other_grid():
    shared = tiny_vit().eval()
    per_block = dtm.build_vit("vit_tiny", img_size=IMG, patch_size=PATCH, rel_pos_bias="per_block").eval()
    per_block.load_state_dict(dtm.adapt_state_dict(shared.state_dict(), per_block))
    x = images()
    assert torch.allclose(per_block.forward_features(x).tokens, shared.forward_features(x).tokens, atol=1e-5)
    larger = dtm.build_vit("vit_tiny", img_size=48, patch_size=PATCH, rel_pos_bias="per_block", abs_pos_emb=True)
    sd = dtm.adapt_state_dict({**shared.state_dict(), "pos_embed": torch.randn(1, 1 + N, 192)}, larger)
    larger.load_state_dict(sd)  # strict: every table and the position embedding now fit the 6x6 grid
    assert larger.forward_features(images(size=48)).tokens.shape == (2, 37, 192)


def test_classifier_head_and_layer_ids():
    model = tiny_vit(num_classes=5, rel_pos_bias="per_block")
    assert isinstance(model.norm, nn.Identity) and model.head.weight.abs().max() <= 0.02 * 0.001 + 1e-12
    logits = model(images())
    tokens = model.forward_features(images()).tokens
    assert torch.allclose(logits, model.head(model.fc_norm(tokens[:, 1:].mean(1))))
    ids = {n: dtm.layer_id_for_param(n, model.depth) for n, _ in model.named_parameters()}
    assert ids["cls_token"] == 0 and ids["patch_embed.weight"] == 0
    assert ids["blocks.0.attn.rel_pos_bias.table"] == 1 and ids["blocks.3.mlp.fc2.weight"] == 4
    assert ids["head.weight"] == ids["fc_norm.bias"] == 5


# ---------------------------------------------------------------------------------------------------
# CLIP teacher

CLIP_W, CLIP_LAYERS, CLIP_OUT = 128, 2, 24  # heads = width // 64 = 2


def clip_visual_state_dict(seed=0):
    """Official OpenAI CLIP visual key names, random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.1: torch.randn(*shape, generator=g) * s
    w = CLIP_W
    sd = {"conv1.weight": r(w, 3, PATCH, PATCH), "class_embedding": r(w), "positional_embedding": r(N + 1, w),
          "ln_pre.weight": 1 + r(w), "ln_pre.bias": r(w)}
    for i in range(CLIP_LAYERS):
        p = f"transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": 1 + r(w), p + "ln_1.bias": r(w),
                   p + "attn.in_proj_weight": r(3 * w, w), p + "attn.in_proj_bias": r(3 * w),
                   p + "attn.out_proj.weight": r(w, w), p + "attn.out_proj.bias": r(w),
                   p + "ln_2.weight": 1 + r(w), p + "ln_2.bias": r(w),
                   p + "mlp.c_fc.weight": r(4 * w, w), p + "mlp.c_fc.bias": r(4 * w),
                   p + "mlp.c_proj.weight": r(w, 4 * w), p + "mlp.c_proj.bias": r(w)})
    sd.update({"ln_post.weight": 1 + r(w), "ln_post.bias": r(w), "proj": r(w, CLIP_OUT)})
    return sd


def full_clip_state_dict():
    """As in the full CLIP model: the image tower under "visual.", beside text-tower keys of the same names."""
    sd = {"visual." + k: v for k, v in clip_visual_state_dict().items()}
    sd.update({"positional_embedding": torch.randn(77, 64), "logit_scale": torch.tensor(4.6),
               "transformer.resblocks.0.ln_1.weight": torch.ones(64), "text_projection": torch.randn(64, 24)})
    return sd


def clip_reference(sd, x, project=True, heads=CLIP_W // 64):
    """OpenAI CLIP's visual forward in plain tensor ops (sequence-first attention as nn.MultiheadAttention).
    project=False: without the final projection (the official --no_clip_proj targets).

    For an input grid other than the 4x4 of the weights, the patch rows of the positional embedding are
    resized bicubically as an image (4, 4) -> (h, w).
    """
    w = CLIP_W
    ln = lambda t, name: F.layer_norm(t, (w,), sd[name + ".weight"], sd[name + ".bias"])
    t = F.conv2d(x, sd["conv1.weight"], stride=PATCH)
    pos = sd["positional_embedding"]
    if t.shape[-2:] != (4, 4):
        grid_pos = F.interpolate(pos[1:].t().reshape(1, w, 4, 4), size=t.shape[-2:], mode="bicubic")
        pos = torch.cat([pos[:1], grid_pos.reshape(w, -1).t()])
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["class_embedding"].expand(x.shape[0], 1, w), t], dim=1) + pos
    t = ln(t, "ln_pre").transpose(0, 1)  # (T, B, w)
    for i in range(CLIP_LAYERS):
        p = f"transformer.resblocks.{i}."
        h = ln(t, p + "ln_1")
        h, _ = F.multi_head_attention_forward(
            h, h, h, w, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], need_weights=False)
        t = t + h
        h = F.linear(ln(t, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        t = t + F.linear(h * torch.sigmoid(1.702 * h), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    t = ln(t.transpose(0, 1)[:, 1:], "ln_post")
    return t @ sd["proj"] if project else t


class _Holder(nn.Module):
    def forward(self, x):
        return x * self.logit_scale


def module_with_keys(sd):
    """A module whose state_dict has exactly the keys of sd (to trace into a TorchScript archive)."""
    root = _Holder()
    for key, value in sd.items():
        *path, name = key.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        m.register_parameter(name, nn.Parameter(value.clone(), requires_grad=False))
    return root


# torch.jit is deprecated, the released CLIP file is TorchScript
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_load_clip_plain_and_torchscript_match_reference(tmp_path):
    full = full_clip_state_dict()
    plain_path, jit_path = tmp_path / "clip_sd.pt", tmp_path / "ViT-B-16.pt"
    torch.save(full, plain_path)
    scripted = torch.jit.trace(module_with_keys({k: v.half() for k, v in full.items()}), torch.ones(1))
    assert set(scripted.state_dict()) == set(full)
    scripted.save(str(jit_path))  # fp16, like the released file
    torch.save(clip_visual_state_dict(), tmp_path / "visual_only.pt")

    x = images()
    ref = clip_reference(clip_visual_state_dict(), x)
    ref_half = clip_reference({k: v.half().float() for k, v in clip_visual_state_dict().items()}, x)
    for path, expected in ((plain_path, ref), (tmp_path / "visual_only.pt", ref), (jit_path, ref_half)):
        visual = dtm.load_clip_visual(str(path))
        assert visual.output_dim == CLIP_OUT and len(visual.transformer.resblocks) == CLIP_LAYERS
        assert torch.allclose(visual(x), expected, atol=1e-4), path

    wide = images(size=48)[..., :40]  # a 6x5 patch grid: positional embedding resized from 4x4
    assert torch.allclose(dtm.load_clip_visual(str(plain_path))(wide), clip_reference(clip_visual_state_dict(), wide),
                          atol=1e-4)

    teacher = dtm.build_teacher(f"clip:{jit_path}", img_size=IMG, patch_size=PATCH)
    assert teacher.out_dim == CLIP_OUT and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    targets = teacher(x)
    assert targets.shape == (2, N, CLIP_OUT) and not targets.requires_grad


class _ArchiveParts(nn.Module):
    """What a TorchScript archive may hold: parameters, buffers, nested submodules, multi-head attention, a
    transposed (strided) parameter, two buffers sharing one storage at different offsets, integer and bool
    tensors, a typed list attribute."""

    sizes: list[int]

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.blocks = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
        self.proj = nn.Parameter(torch.randn(4, 8).t())  # (8, 4), stride (1, 8)
        shared = torch.randn(10)
        self.register_buffer("head", shared[:4])
        self.register_buffer("tail", shared[4:])
        self.register_buffer("steps", torch.arange(3))
        self.register_buffer("flags", torch.tensor([True, False]))
        self.sizes = [1, 2]

    def forward(self, x):
        x = self.blocks(x)
        x = self.attn(x, x, x, need_weights=False)[0] @ self.proj
        return x * self.sizes[0] + self.head + self.tail[:4] + self.steps.sum() + self.flags.sum()


def torchscript_archive(path, kind: str) -> dict:
    """Writes a TorchScript archive of _ArchiveParts (traced, scripted, or scripted in bf16) and returns what
    torch.jit.load reads back as its state dict."""
    torch.manual_seed(0)
    module, x = _ArchiveParts().eval(), torch.randn(3, 1, 8)
    archive = torch.jit.trace(module, x) if kind == "traced" else torch.jit.script(module)
    if kind == "scripted_bf16":
        archive = archive.to(torch.bfloat16)
    archive.save(str(path))
    return torch.jit.load(str(path), map_location="cpu").state_dict()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("kind", ["traced", "scripted", "scripted_bf16"])
def test_a_torchscript_archive_is_read_without_torch_jit(tmp_path, monkeypatch, kind):
    """The released CLIP file is a TorchScript archive; torch.jit.load is deprecated (it warns from torch 2.13). Its
    tensors are read from data.pkl as torch.jit.load's state_dict() gives them: names, dtypes, values, strides, shared
    storage."""
    path = tmp_path / "ViT-B-16.pt"
    expected = torchscript_archive(path, kind)

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read = dtm._read_clip_state_dict(str(path))
    assert list(read) == list(expected)
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype and read[name].stride() == tensor.stride(), name
        assert read[name].storage_offset() == tensor.storage_offset(), name
        assert torch.equal(read[name], tensor), name
    assert read["proj"].stride() == (1, 8)
    shared = lambda sd: sd["head"].untyped_storage().data_ptr() == sd["tail"].untyped_storage().data_ptr()
    assert shared(read) == shared(expected) == (kind != "scripted_bf16")  # .to(bf16) casts them apart


class _ArchiveOddities(nn.Module):
    """Tensors the archive reader leaves to torch.jit.load: a float8 one (a storage type it does not list) and a
    negative view (metadata that flips its sign)."""

    def __init__(self, kind: str):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        if kind == "float8":
            self.register_buffer("odd", torch.randn(3).to(torch.float8_e4m3fn))
        else:
            self.register_buffer("odd", torch.complex(torch.randn(3), torch.randn(3)).conj().imag)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")  # torch.jit, deprecated
@pytest.mark.parametrize("kind, what", [("float8", r"torch\.Float8_e4m3fnStorage"),
                                        ("negative_view", "tensors with metadata")])
def test_a_torchscript_archive_the_reader_does_not_know_goes_to_torch_jit(tmp_path, monkeypatch, kind, what):
    path = tmp_path / "ViT-B-16.pt"
    torch.manual_seed(0)
    torch.jit.script(_ArchiveOddities(kind)).save(str(path))
    expected = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert kind == "float8" or expected["odd"].is_neg()
    calls, jit_load = [], torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: calls.append(args) or jit_load(*args, **kwargs))
    read = dtm._read_clip_state_dict(str(path))
    assert len(calls) == 1 and list(read) == list(expected)
    assert all(torch.equal(read[k].float(), v.float()) for k, v in expected.items())

    def removed(*args, **kwargs):
        raise AttributeError("module 'torch.jit' has no attribute 'load'")

    monkeypatch.setattr(torch.jit, "load", removed)
    with pytest.raises(ValueError, match=rf"is a TorchScript archive that holds {what}, which only torch\.jit\.load "
                                         rf"reads, and torch\.jit\.load failed too \(AttributeError: .*"
                                         rf"torch\.save\(torch\.jit\.load"):
        dtm._read_clip_state_dict(str(path))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_the_command_that_saves_an_archives_state_dict_runs_as_printed_for_any_path(tmp_path, monkeypatch):
    """Where torch.jit.load fails here, the error prints a command to run where it works. It put the path's repr in a
    double-quoted python -c: a shell expanded the $HOME in 'my $HOME/ViT-B-16.pt' there."""
    folder = tmp_path / "my $HOME 'q' é"
    folder.mkdir()
    expected = torchscript_archive(folder / "ViT-B-16.pt", "traced")

    def failing(*args, **kwargs):
        raise RuntimeError("torch.jit.load fails here")

    with monkeypatch.context() as m:
        m.setattr(torch.jit, "load", failing)
        m.setattr(dtm, "_tensor_attributes", failing)  # this reader fails too: the command is printed
        with pytest.raises(ValueError) as refused:
            dtm.load_clip_visual(str(folder / "ViT-B-16.pt"))
    command = re.search(r"save its state dict: python (.*) and pass that file$", str(refused.value))[1]
    subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} {command}"], cwd=tmp_path, check=True,
                   capture_output=True)
    saved = torch.load(tmp_path / "clip_state_dict.pt")
    assert list(saved) == list(expected) and all(torch.equal(saved[k], v) for k, v in expected.items())


def test_the_commands_that_make_an_unsafe_checkpoint_readable_run_as_printed_for_any_path(tmp_path):
    """The official code's checkpoints (an argparse.Namespace inside) and this repo's oldest (numpy RNG states) get a
    python -c command to run once; it put the path's repr in double quotes, where a shell expands $HOME."""
    import argparse
    import numpy as np
    folder = tmp_path / "my $HOME 'q' é"
    folder.mkdir()
    weights = {"w": torch.arange(3.0)}
    for name, content, result in (("official.pth", {"model": weights, "args": argparse.Namespace(lr=1)}, "weights.pth"),
                                  ("old.pth", {"model": weights, "rng": np.random.get_state()}, "old.pth")):
        torch.save(content, folder / name)
        with pytest.raises(ValueError) as refused:
            dtm.read_checkpoint(str(folder / name), "--init")
        command = re.search(r"once: python (-c .*?\.pth'?)( and pass weights.pth)?$", str(refused.value))[1]
        subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} {command}"], cwd=folder, check=True,
                       capture_output=True)
        assert torch.equal(dtm.read_checkpoint(str(folder / result), "--init")["model"]["w"], weights["w"])


FAKE_SAFETENSORS = '''import json, torch
def load_file(path):  # safetensors.torch.load_file of float32 tensors, for the test
    data = open(path, "rb").read()
    size = int.from_bytes(data[:8], "little")
    return {name: torch.frombuffer(bytearray(data[8 + size + entry["data_offsets"][0]:8 + size +
            entry["data_offsets"][1]]), dtype=torch.float32).view(entry["shape"])
            for name, entry in json.loads(data[8:8 + size]).items() if name != "__metadata__"}
'''


def test_a_safetensors_file_or_a_tar_archive_is_named_with_the_fix(tmp_path):
    """Weights downloaded as safetensors (timm's and open_clip's on the Hugging Face hub) or a checkpoint packed in a
    tar archive are named for what they are, with the fix (the message said only that torch.save did not write the
    file, quoting its first bytes); the safetensors command runs as printed (here with a stand-in safetensors)."""
    folder = tmp_path / "my $HOME 'q'"
    folder.mkdir()
    header = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header
                                              + torch.tensor([1.5, -2.0]).numpy().tobytes())
    (tmp_path / "w.pth").write_bytes(b"")
    with tarfile.open(folder / "weights.tar", "w") as archive:
        archive.add(tmp_path / "w.pth", arcname="w.pth")
    for flag, read in (("--init", lambda p: dtm.read_checkpoint(p, "--init")),
                       ("--teacher clip:", dtm.load_clip_visual)):
        with pytest.raises(ValueError, match=f"^{flag} .*model.safetensors. cannot be read by torch.load: it is a "
                                             f"safetensors file; make a checkpoint of it once: python -c ") as refused:
            read(str(folder / "model.safetensors"))
        with pytest.raises(ValueError, match=f"^{flag} .*weights.tar. cannot be read by torch.load: it is a tar "
                                             f"archive; extract it, tar -xf .*weights.tar', and pass the checkpoint "
                                             f"file it holds$"):
            read(str(folder / "weights.tar"))
    (tmp_path / "fake" / "safetensors").mkdir(parents=True)
    (tmp_path / "fake" / "safetensors" / "__init__.py").write_text("")
    (tmp_path / "fake" / "safetensors" / "torch.py").write_text(FAKE_SAFETENSORS)
    command = re.search(r"once: python (-c .*) and pass weights.pth$", str(refused.value))[1]
    subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} {command}"], cwd=folder, check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "fake")})
    assert torch.equal(dtm.read_checkpoint(str(folder / "weights.pth"), "--init")["model"]["w"],
                       torch.tensor([1.5, -2.0]))


def test_an_optimizers_state_is_named_and_what_to_pass_instead(tmp_path):
    """An optimizer's state_dict (saved beside the model by many codebases) holds no weights: named, with what to pass
    (the message named neither, only the keys found)."""
    vit = tiny_vit()
    torch.save(torch.optim.AdamW(vit.parameters()).state_dict(), tmp_path / "optimizer.pth")
    with pytest.raises(ValueError, match=r"^--init '.*optimizer.pth' is not a checkpoint of this repo \(expected a "
                                         r"dict with a 'model' entry, got \['param_groups', 'state'\]\): an "
                                         r"optimizer's state_dict, which holds no weights; pass a checkpoint of the "
                                         r"trainers here or a model's weights, "
                                         r"torch.save\(model.state_dict\(\), PATH\)$"):
        dtm.read_checkpoint(str(tmp_path / "optimizer.pth"), "--init")
    torch.save({"epoch": 3, "state": {}}, tmp_path / "other.pth")  # a "state" without "param_groups": no optimizer's
    with pytest.raises(ValueError, match=r"got \['epoch', 'state'\]\); pass a checkpoint of the trainers here or a "
                                         r"model's weights, torch.save\(model.state_dict\(\), PATH\)$"):
        dtm.read_checkpoint(str(tmp_path / "other.pth"), "--init")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_a_big_endian_torchscript_archive_goes_to_torch_jit(tmp_path, monkeypatch):
    path, big_endian = tmp_path / "ViT-B-16.pt", tmp_path / "big_endian.pt"
    torchscript_archive(path, "traced")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(big_endian, "w") as copy:
        for item in source.infolist():
            copy.writestr(item, b"big\n" if item.filename.endswith("/byteorder") else source.read(item))
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("torch.jit.load fails here")

    monkeypatch.setattr(torch.jit, "load", failing)
    with pytest.raises(ValueError, match=r"holds big-endian tensors, which only torch\.jit\.load reads, and "
                                         r"torch\.jit\.load failed too \(RuntimeError: torch\.jit\.load fails here"):
        dtm._read_clip_state_dict(str(big_endian))
    assert len(calls) == 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_a_damaged_torchscript_archive_is_named_damaged(tmp_path):
    path, damaged = tmp_path / "ViT-B-16.pt", tmp_path / "damaged.pt"
    torchscript_archive(path, "traced")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(damaged, "w") as copy:
        for item in source.infolist():
            if not item.filename.endswith("/data/0"):  # one tensor's bytes lost
                copy.writestr(item, source.read(item))
    with pytest.raises(ValueError, match=r"damaged.pt' is a TorchScript archive that this reader cannot read "
                                         r"\(KeyError: .*\), and torch\.jit\.load failed too .*: a damaged or "
                                         r"truncated file"):
        dtm.load_clip_visual(str(damaged))


def test_load_clip_visual_uses_the_number_of_heads_given(tmp_path):
    """heads= overrides width // 64 (a CLIP of other heads per width); a mutant that ignored it passed every test."""
    torch.save(clip_visual_state_dict(), tmp_path / "v.pt")
    visual = dtm.load_clip_visual(str(tmp_path / "v.pt"), heads=4)
    x = images()
    assert visual.transformer.resblocks[0].attn.heads == 4
    assert torch.allclose(visual(x), clip_reference(clip_visual_state_dict(), x, heads=4), atol=1e-4)
    assert not torch.allclose(visual(x), clip_reference(clip_visual_state_dict(), x), atol=1e-3)  # 2 heads: others


def test_clip_teacher_without_projection_gives_width_dim_targets(tmp_path):
    torch.save(clip_visual_state_dict(), tmp_path / "v.pt")
    x = images()
    teacher = dtm.build_teacher(f"clip:{tmp_path / 'v.pt'}", img_size=IMG, patch_size=PATCH, clip_proj=False)
    assert teacher.out_dim == CLIP_W
    assert torch.allclose(teacher(x), clip_reference(clip_visual_state_dict(), x, project=False), atol=1e-4)
    projected = dtm.build_teacher(f"clip:{tmp_path / 'v.pt'}", img_size=IMG, patch_size=PATCH)
    assert projected.out_dim == CLIP_OUT and torch.allclose(projected(x), teacher(x) @ clip_visual_state_dict()["proj"],
                                                            atol=1e-5)


def test_clip_teacher_norm_renormalizes_to_clip_statistics(tmp_path):
    torch.save(clip_visual_state_dict(), tmp_path / "v.pt")
    visual = dtm.load_clip_visual(str(tmp_path / "v.pt"))
    x = images()
    mean = lambda v: torch.tensor(v).view(1, 3, 1, 1)
    raw = x * mean(dtm.IMAGENET_STD) + mean(dtm.IMAGENET_MEAN)
    expected = visual((raw - mean(dtm.CLIP_MEAN)) / mean(dtm.CLIP_STD))
    assert torch.allclose(dtm.CLIPTeacher(visual, "clip")(x), expected, atol=1e-5)
    assert torch.equal(dtm.CLIPTeacher(visual, "imagenet")(x), visual(x))


def test_load_clip_errors_name_the_problem(tmp_path):
    sd = clip_visual_state_dict()
    del sd["ln_post.weight"]
    sd["bogus.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing keys \['ln_post.weight'\].*unexpected keys \['bogus.weight'\]; "
                                         r"pass OpenAI's ViT-B-16.pt or the encoder's own weights, "
                                         r"torch.save\(model.visual.state_dict\(\), PATH\)$"):
        dtm.load_clip_visual(str(tmp_path / "bad.pt"))
    torch.save([1, 2], tmp_path / "list.pt")  # no state dict at all
    with pytest.raises(ValueError, match=r"list.pt' does not hold a state dict \(a dict of tensors\); got list: pass "
                                         r"OpenAI's ViT-B-16.pt or torch.save\(model.visual.state_dict\(\), PATH\)"):
        dtm.load_clip_visual(str(tmp_path / "list.pt"))
    with pytest.raises(FileNotFoundError, match="not found"):
        dtm.load_clip_visual(str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match=f"is a folder; pass the weights file, e.g. {tmp_path / 'bad.pt'}$"):
        dtm.load_clip_visual(str(tmp_path))  # was "not found"
    sd = clip_visual_state_dict()
    sd["ln_pre.weight"] = torch.zeros(100)  # a torch RuntimeError inside load_state_dict before
    torch.save(sd, tmp_path / "misshapen.pt")
    with pytest.raises(ValueError, match=r"read off its weights: \['ln_pre.weight \(100,\) \(expected \("):
        dtm.load_clip_visual(str(tmp_path / "misshapen.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt' cannot be read by torch.load"):
        dtm.load_clip_visual(str(tmp_path / "junk.pt"))
    torch.save({"model": clip_visual_state_dict()}, tmp_path / "wrapped.pt")  # a state dict inside a dict
    assert isinstance(dtm.load_clip_visual(str(tmp_path / "wrapped.pt")), dtm.CLIPVisual)
    torch.save({**clip_visual_state_dict(), "epoch": 3}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"every value must be a tensor, but it holds 1 that are not \('epoch': int\)"):
        dtm.load_clip_visual(str(tmp_path / "extra.pt"))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"not a CLIP ViT visual state dict: .*; pass OpenAI's ViT-B-16.pt"):
        dtm.load_clip_visual(str(tmp_path / "other.pt"))
    torch.save({"patch_embed.weight": torch.zeros(2)}, tmp_path / "ours.pt")  # a student's weights: ckpt:, not clip:
    with pytest.raises(ValueError, match=r"not a CLIP ViT visual state dict: .*pass it as --teacher ckpt:.*ours.pt"):
        dtm.load_clip_visual(str(tmp_path / "ours.pt"))


# ---------------------------------------------------------------------------------------------------
# Other teachers


def test_pixel_teacher_matches_per_patch_loop():
    x = images()
    targets = dtm.PixelTeacher(PATCH)(x)
    assert targets.shape == (2, N, PATCH * PATCH * 3)
    for b in range(2):
        for i in range(N):
            y, xx = divmod(i, 4)
            patch = x[b, :, y * PATCH:(y + 1) * PATCH, xx * PATCH:(xx + 1) * PATCH].permute(1, 2, 0).reshape(-1)
            expected = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
            assert torch.allclose(targets[b, i], expected, atol=1e-5)


def test_ckpt_teacher_round_trip(tmp_path):
    x = images()
    pretrain = dtm.DTMPretrainModel(tiny_vit(), target_dim=24)
    with torch.no_grad():  # final norms that a new LayerNorm (ones, zeros) cannot stand in for
        pretrain.student.norm.weight.uniform_(0.5, 1.5), pretrain.student.norm.bias.normal_()
    torch.save({"model": pretrain.state_dict(), "args": {"model": "vit_tiny"}, "epoch": 3}, tmp_path / "pre.pth")
    torch.save(pretrain.student.state_dict(), tmp_path / "plain.pth")  # a plain state dict, no args
    expected = pretrain.student.eval().forward_features(x).tokens[:, 1:]
    for name in ("pre.pth", "plain.pth"):
        teacher = dtm.build_teacher(f"ckpt:{tmp_path / name}", img_size=IMG, patch_size=PATCH)
        assert teacher.out_dim == 192 and all(not p.requires_grad for p in teacher.parameters())
        assert torch.allclose(teacher(x), expected, atol=1e-6)

    finetuned = tiny_vit(num_classes=5, rel_pos_bias="per_block").eval()
    with torch.no_grad():
        finetuned.fc_norm.weight.uniform_(0.5, 1.5), finetuned.fc_norm.bias.normal_()
    torch.save({"model": finetuned.state_dict(), "args": {"model": "vit_tiny"}}, tmp_path / "ft.pth")
    teacher = dtm.build_teacher(f"ckpt:{tmp_path / 'ft.pth'}", img_size=IMG, patch_size=PATCH)
    assert torch.allclose(teacher(x), finetuned.fc_norm(finetuned.forward_features(x).tokens[:, 1:]), atol=1e-6)


def test_build_teacher_errors(tmp_path):
    with pytest.raises(ValueError, match="clip:PATH"):
        dtm.build_teacher("clip")
    with pytest.raises(ValueError, match="unknown teacher"):
        dtm.build_teacher("dino:/x.pt")
    with pytest.raises(FileNotFoundError, match="missing.pth': no such file"):
        dtm.build_teacher(f"ckpt:{tmp_path / 'missing.pth'}")
    # a CLIP with patch 8 for a patch-16 student
    torch.save(clip_visual_state_dict(), tmp_path / "v.pt")
    with pytest.raises(ValueError, match=r"token grids must match: pass a teacher of patch size 16 \(OpenAI's "
                                         r"ViT-B-16.pt\), or --teacher pixels"):
        dtm.build_teacher(f"clip:{tmp_path / 'v.pt'}", patch_size=16)


def official_names(sd: dict) -> dict:
    """This repo's ViT names -> the official code's (naver-ai/dtm models/modeling_dtm.py, as BEiT), written out."""
    def official(name):
        if name.startswith("patch_embed."):
            return "patch_embed.proj." + name[len("patch_embed."):]
        if name == "rel_pos_bias.table":  # the shared table
            return "rel_pos_bias.relative_position_bias_table"
        return name.replace("attn.rel_pos_bias.table", "attn.relative_position_bias_table")  # a block's own
    return {official(name): value for name, value in sd.items()}


def test_a_vit_of_the_official_code_is_read_by_its_names(tmp_path):
    """--init / --teacher ckpt: with a state dict saved by naver-ai/dtm or BEiT (v2): patch_embed.proj.*, *.relative_
    position_bias_table, relative_position_index buffers and pre-training heads (lm_head, BEiT v2's cls_pt_layers)."""
    vit = tiny_vit(rel_pos_bias="both")
    sd = official_names(vit.state_dict())
    assert "patch_embed.proj.weight" in sd and "rel_pos_bias.relative_position_bias_table" in sd
    assert "blocks.0.attn.relative_position_bias_table" in sd
    sd.update({"blocks.0.attn.relative_position_index": torch.zeros(17, 17, dtype=torch.long),
               "lm_head.weight": torch.zeros(512, 192), "cls_pt_layers.0.norm1.weight": torch.zeros(192),
               "cls_pt_norm.weight": torch.zeros(192), "cls_pt_lm_head.weight": torch.zeros(512, 192)})
    torch.save(sd, tmp_path / "official.pth")  # a plain state dict: the official checkpoint's "model"
    loaded, fresh = dtm.vit_from_checkpoint(dtm.read_checkpoint(str(tmp_path / "official.pth"), "--init"), IMG)
    x = images()
    vit.eval(), loaded.eval()
    assert torch.equal(loaded.forward_features(x).tokens, vit.forward_features(x).tokens) and fresh == []
    # a classifier trained on the CLS token (BEiT's --use_cls: norm and head, no fc_norm): its head starts afresh, it
    # was applied to the patch tokens' mean (logits off by about 5, found by comparing with the official models)
    torch.save({**sd, "head.weight": torch.ones(3, 192), "head.bias": torch.ones(3)}, tmp_path / "cls.pth")
    classifier, fresh = dtm.vit_from_checkpoint(dtm.read_checkpoint(str(tmp_path / "cls.pth"), "--init"), IMG, 3)
    assert fresh == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"] and not classifier.head.bias.any()
    import argparse
    import numpy as np
    torch.save({"model": sd, "optimizer": {"param_groups": [{"lr": np.float64(1e-3)}]},  # numpy lrs, as the official
                "args": argparse.Namespace(model="beit_base_patch16_224")}, tmp_path / "full.pth")  # code's save_model
    with pytest.raises(ValueError, match="holds an argparse.Namespace.*the official code .*keep its weights once: "
                                         "python -c .*torch.save\\(c\\['model'\\] if 'model' in c else "
                                         "c\\['module'\\], 'weights.pth'\\)"):
        dtm.read_checkpoint(str(tmp_path / "full.pth"), "--init")
    full = torch.load(tmp_path / "full.pth", weights_only=False)  # read in Python: its args are an argparse.Namespace
    loaded, fresh = dtm.vit_from_checkpoint(full, IMG)
    assert torch.equal(loaded.eval().forward_features(x).tokens, vit.forward_features(x).tokens) and fresh == []
    # DeepSpeed's checkpoints (the official code's --enable_deepspeed) keep the weights under "module"
    torch.save({"module": sd, "epoch": 3, "ds_version": "0.4.0"}, tmp_path / "deepspeed.pth")
    checkpoint = dtm.read_checkpoint(str(tmp_path / "deepspeed.pth"), "--init")
    assert checkpoint["model"] is not None and checkpoint["epoch"] == 3 and "module" not in checkpoint
    loaded, fresh = dtm.vit_from_checkpoint(checkpoint, IMG)
    assert torch.equal(loaded.eval().forward_features(x).tokens, vit.forward_features(x).tokens) and fresh == []
    torch.save({"module": 1, "epoch": 3}, tmp_path / "other.pth")  # not weights: refused as before
    with pytest.raises(ValueError, match="expected a dict with a 'model' entry, got \\['epoch', 'module'\\]"):
        dtm.read_checkpoint(str(tmp_path / "other.pth"), "--init")


def test_a_deepspeed_checkpoint_folder_names_its_weights_file(tmp_path):
    """The official code with --enable_deepspeed saves each checkpoint as a folder (model.save_checkpoint(tag=
    "checkpoint-N"): DeepSpeed's mp_rank_00_model_states.pt, the weights under "module", beside the optimizer's
    file). Given the folder, the message named no file ('it holds no .pth file'); it names the weights file, which
    reads."""
    folder = tmp_path / "checkpoint-799"
    folder.mkdir()
    vit = tiny_vit(rel_pos_bias="both")
    torch.save({"module": official_names(vit.state_dict()), "epoch": 799}, folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError) as refused:
        dtm.read_checkpoint(str(folder), "--init")
    assert str(refused.value) == (f"--init {str(folder)!r} is a folder; pass a checkpoint file, e.g. "
                                  f"{folder / 'mp_rank_00_model_states.pt'}")
    named = str(refused.value).rsplit("e.g. ", 1)[1]
    loaded, fresh = dtm.vit_from_checkpoint(dtm.read_checkpoint(named, "--init"), IMG)
    x = images()
    assert fresh == [] and torch.equal(loaded.eval().forward_features(x).tokens, vit.eval().forward_features(x).tokens)


def mae_state_dict(classes: int = 0, decoder: bool = False) -> dict:
    """A ViT as MAE saves it (facebookresearch/mae models_vit.py, a timm VisionTransformer with qkv_bias=True and
    global_pool: fc_norm + head; models_mae.py MaskedAutoencoderViT: norm, and the decoder_* and its own 512-wide
    mask_token beside the encoder), random values, vit_tiny's size."""
    g = torch.Generator().manual_seed(5)
    C, T = 192, 1 + N

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.3
    sd = {"cls_token": rand(1, 1, C), "pos_embed": rand(1, T, C), "patch_embed.proj.weight": rand(C, 3, PATCH, PATCH),
          "patch_embed.proj.bias": rand(C)}
    for i in range(4):
        sd.update({f"blocks.{i}.{name}": rand(*shape) for name, shape in (
            ("norm1.weight", (C,)), ("norm1.bias", (C,)), ("attn.qkv.weight", (3 * C, C)), ("attn.qkv.bias", (3 * C,)),
            ("attn.proj.weight", (C, C)), ("attn.proj.bias", (C,)), ("norm2.weight", (C,)), ("norm2.bias", (C,)),
            ("mlp.fc1.weight", (4 * C, C)), ("mlp.fc1.bias", (4 * C,)), ("mlp.fc2.weight", (C, 4 * C)),
            ("mlp.fc2.bias", (C,)))})
    final = "fc_norm" if classes else "norm"
    sd.update({f"{final}.weight": rand(C), f"{final}.bias": rand(C)})
    if classes:
        sd.update({"head.weight": rand(classes, C), "head.bias": rand(classes)})
    if decoder:
        sd.update({"mask_token": rand(1, 1, 512), "decoder_embed.weight": rand(512, C), "decoder_embed.bias": rand(512),
                   "decoder_pos_embed": rand(1, T, 512), "decoder_blocks.0.norm1.weight": rand(512),
                   "decoder_norm.weight": rand(512), "decoder_pred.weight": rand(3 * PATCH * PATCH, 512)})
    return sd


def mae_forward(sd: dict, x) -> torch.Tensor:
    """MAE's ViT written out (timm's Block and Attention: one qkv bias, no layer scale): the logits of its global-pool
    classifier, or the normalized patch tokens of its pre-trained encoder, in float64."""
    C, heads = 192, 3
    sd = {k: v.double() for k, v in sd.items()}
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], dim=1) + sd["pos_embed"]
    B, T, _ = t.shape
    for i in range(4):
        p = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(t, (C,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).view(B, T, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (C // heads) ** -0.5).softmax(dim=-1)
        t = t + F.linear((attn @ v).transpose(1, 2).reshape(B, T, C), p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(t, (C,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        t = t + F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"],
                         p["mlp.fc2.bias"])
    if "head.weight" in sd:
        pooled = F.layer_norm(t[:, 1:].mean(dim=1), (C,), sd["fc_norm.weight"], sd["fc_norm.bias"], eps=1e-6)
        return F.linear(pooled, sd["head.weight"], sd["head.bias"])
    return F.layer_norm(t, (C,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 1:]


def test_an_mae_vit_is_read_with_its_qkv_bias_split_and_its_decoder_dropped(tmp_path):
    """MAE's checkpoints (one qkv bias per block, timm's layout) load for --init and --teacher ckpt: as MAE's own
    main_finetune.py loads them (the decoder left out): q's and v's bias kept, k's dropped, which adds the same
    q . b_k to every logit of a query's row, so the softmax cancels it. They were refused, listing 36 keys."""
    x = images().double()
    finetuned = mae_state_dict(classes=5)
    torch.save({"model": finetuned}, tmp_path / "mae_finetuned.pth")
    classifier, fresh = dtm.vit_from_checkpoint(dtm.read_checkpoint(str(tmp_path / "mae_finetuned.pth"), "--init"),
                                                IMG, 5)
    assert fresh == [] and torch.equal(classifier.blocks[1].attn.v_bias, finetuned["blocks.1.attn.qkv.bias"][384:])
    torch.testing.assert_close(classifier.double().eval()(x), mae_forward(finetuned, x), rtol=1e-12, atol=1e-12)
    pretrained = mae_state_dict(decoder=True)
    torch.save({"model": pretrained}, tmp_path / "mae_pretrain.pth")
    teacher = dtm.build_teacher(f"ckpt:{tmp_path / 'mae_pretrain.pth'}", img_size=IMG, patch_size=PATCH)
    torch.testing.assert_close(teacher.double()(x), mae_forward(pretrained, x), rtol=1e-12, atol=1e-12)


def test_a_clip_file_given_as_a_vit_says_it_is_a_teacher(tmp_path):
    for name, sd in (("visual", clip_visual_state_dict()), ("full", full_clip_state_dict())):
        torch.save(sd, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match="these are CLIP weights: .*--teacher clip:PATH\\); --init"):
            dtm.vit_from_checkpoint(dtm.read_checkpoint(str(tmp_path / f"{name}.pt"), "--init"), IMG)
    torch.save({"conv1.weight": torch.zeros(2, 3, 7, 7), "fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match=r"keys like \['conv1.weight', 'fc.weight'\]; pass a checkpoint of "
                                         r"train_pretrain.py"):  # no CLIP hint for a ResNet: what to pass instead
        dtm.vit_from_checkpoint(dtm.read_checkpoint(str(tmp_path / "resnet.pt"), "--init"), IMG)
    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"holds no ViT of this repo \(no 'patch_embed.weight'\); keys like "
                                         r"\['head.weight'\]; pass a checkpoint of train_pretrain.py, "
                                         r"train_finetune.py or train_seg.py, or an official DTM / BEiT / BEiT v2 ViT "
                                         r"checkpoint$"):
        dtm.vit_from_checkpoint(dtm.read_checkpoint(str(tmp_path / "other.pt"), "--init"), IMG)
    # CLIP's text tower alone: no CLIP teacher either (--teacher clip: refuses it: no image tower), so no CLIP hint
    text = {k: v for k, v in full_clip_state_dict().items() if not k.startswith("visual.")}
    torch.save(text, tmp_path / "text.pt")
    with pytest.raises(ValueError, match=r"holds no ViT of this repo .*; pass a checkpoint of train_pretrain.py"):
        dtm.vit_from_checkpoint(dtm.read_checkpoint(str(tmp_path / "text.pt"), "--init"), IMG)
    with pytest.raises(ValueError, match=r"is not a CLIP ViT visual state dict: missing \['conv1.weight'"):
        dtm.load_clip_visual(str(tmp_path / "text.pt"))


# ---------------------------------------------------------------------------------------------------
# DTM objective


def dense_dtm_loss(pred, target, levels, mask, loss, loss_on, beta=2.0, normalize_target=False):
    """The official code's loss: S^T (S x / |S|) with dense source matrices, mean over positions and levels;
    normalize_target: each position's target standardized over channels, unbiased variance, eps 1e-6 in the sqrt."""
    total = 0.0
    for groups in levels:
        M = morph.morph_matrix(groups, int(groups.max()) + 1, pred.dtype)  # (B, G, N) row normalized
        S = (M > 0).to(pred.dtype)  # (B, G, N) source matrix
        p, t = S.transpose(1, 2) @ (M @ pred), S.transpose(1, 2) @ (M @ target)  # (B, N, D)
        if normalize_target:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        if loss == "smooth_l1":
            per_position = F.smooth_l1_loss(p, t, reduction="none", beta=beta).mean(-1)
        elif loss == "l2":
            per_position = (p - t).pow(2).mean(-1)
        else:
            per_position = 1 - F.cosine_similarity(p, t, dim=-1)
        total = total + (per_position.mean() if loss_on == "all" else per_position[mask].mean())
    return total / len(levels)


@pytest.mark.parametrize("loss", dtm.LOSSES)
@pytest.mark.parametrize("loss_on", ["all", "masked"])
def test_dtm_loss_equals_dense_morph_matrix_reference(loss, loss_on):
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(3, N, 12, generator=g) * 2, torch.randn(3, N, 12, generator=g) * 2
    mask = torch.rand(3, N, generator=g) < 0.5
    levels = morph.token_morphing_levels(target, [[3, 2], [5, 1, 1], [0]], generator=torch.Generator().manual_seed(0))
    assert [int(g.max()) + 1 for g in levels] == [N - 5, N - 7, N]
    value, per_level = dtm.dtm_loss(pred, target, levels, mask, loss=loss, loss_on=loss_on)
    assert len(per_level) == 3
    assert torch.allclose(value, dense_dtm_loss(pred, target, levels, mask, loss, loss_on), atol=1e-6)
    exact, _ = dtm.dtm_loss(pred, target, levels, mask, loss=loss, loss_on=loss_on, num_groups=[N - 5, N - 7, N])
    assert torch.equal(exact, value)  # the exact numbers of groups or the bound N: the same loss
    with pytest.raises(ValueError, match="num_groups has 2 entries for 3 levels"):  # not a silently dropped level
        dtm.dtm_loss(pred, target, levels, mask, loss=loss, loss_on=loss_on, num_groups=[N - 5, N - 7])
    normalized, _ = dtm.dtm_loss(pred, target, levels, mask, loss=loss, loss_on=loss_on, normalize_target=True)
    reference = dense_dtm_loss(pred, target, levels, mask, loss, loss_on, normalize_target=True)
    assert torch.allclose(normalized, reference, atol=1e-6) and not torch.allclose(normalized, value, atol=1e-5)


def test_smooth_l1_beta_is_used_by_the_loss_and_the_pretraining_model():
    """--beta: only the default 2.0 was ever compared with the reference, so a loss that ignored beta passed."""
    g = torch.Generator().manual_seed(9)
    pred, target = torch.randn(3, N, 12, generator=g) * 2, torch.randn(3, N, 12, generator=g) * 2
    levels = morph.token_morphing_levels(target, [[3, 2], [5, 1, 1]], generator=torch.Generator().manual_seed(0))
    mask = torch.rand(3, N, generator=g) < 0.5
    half, _ = dtm.dtm_loss(pred, target, levels, mask, beta=0.5)
    assert torch.allclose(half, dense_dtm_loss(pred, target, levels, mask, "smooth_l1", "all", beta=0.5), atol=1e-6)
    assert not torch.allclose(half, dtm.dtm_loss(pred, target, levels, mask)[0], atol=1e-3)  # beta 2.0: another value
    model = dtm.DTMPretrainModel(tiny_vit(), target_dim=PATCH * PATCH * 3, beta=0.5)
    x, mask = images(), random_mask()
    targets = dtm.PixelTeacher(PATCH)(x) * 4
    levels = morph.token_morphing_levels(targets, [[4, 4], [2]], generator=torch.Generator().manual_seed(0))
    loss, _ = model(x, mask, targets, levels)
    pred = model.head(model.student.forward_features(x, mask).tokens[:, 1:])
    assert torch.allclose(loss, dense_dtm_loss(pred, targets, levels, mask, "smooth_l1", "all", beta=0.5), atol=1e-6)


def test_dtm_loss_keeps_float64_inputs_in_float64():
    """float64 inputs (exact checks, gradcheck) are not rounded to float32 on the way (they were: about 1e-7)."""
    g = torch.Generator().manual_seed(8)
    pred, target = (torch.randn(3, N, 12, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    mask = torch.rand(3, N, generator=g) < 0.5
    levels = morph.token_morphing_levels(target, [[3, 2], [5, 1, 1]], generator=torch.Generator().manual_seed(0))
    for loss in dtm.LOSSES:
        for loss_on in ("all", "masked"):
            value, _ = dtm.dtm_loss(pred, target, levels, mask, loss=loss, loss_on=loss_on)
            assert value.dtype == torch.float64
            reference = dense_dtm_loss(pred, target, levels, mask, loss, loss_on)
            torch.testing.assert_close(value, reference, rtol=1e-13, atol=1e-13)


def test_schedule_without_merges_is_per_token_distillation():
    g = torch.Generator().manual_seed(6)
    pred, target = torch.randn(2, N, 8, generator=g) * 3, torch.randn(2, N, 8, generator=g) * 3
    mask = torch.rand(2, N, generator=g) < 0.5
    for schedules in ([[0]], [[]], [[0], [0, 0]]):
        levels = morph.token_morphing_levels(target, schedules)
        value, _ = dtm.dtm_loss(pred, target, levels, mask)
        assert torch.allclose(value, F.smooth_l1_loss(pred, target, beta=2.0), atol=1e-6)
        masked, _ = dtm.dtm_loss(pred, target, levels, mask, loss_on="masked")
        assert torch.allclose(masked, F.smooth_l1_loss(pred[mask], target[mask], beta=2.0), atol=1e-6)
    for no_levels in ([], levels[0]):  # none, or one level's tensor instead of a list of them
        with pytest.raises(ValueError, match="one \\(B, N\\) tensor per morphing level"):
            dtm.dtm_loss(pred, target, no_levels)


def test_dtm_loss_is_computed_in_float32_from_bf16_inputs():
    """Under autocast the head's predictions come in bf16: the loss equals the float32 loss of the same (bf16-rounded)
    values, not a bf16 computation, whatever the loss."""
    g = torch.Generator().manual_seed(7)
    pred, target = (torch.randn(2, N, 64, generator=g).bfloat16() for _ in range(2))
    levels = morph.token_morphing_levels(target.float(), [[5, 5], [9]])
    for loss in dtm.LOSSES:
        low, _ = dtm.dtm_loss(pred, target, levels, loss=loss)
        full, _ = dtm.dtm_loss(pred.float(), target.float(), levels, loss=loss)
        assert low.dtype == torch.float32 and torch.equal(low, full), loss


def test_pretrain_model_gradients_reach_student():
    model = dtm.DTMPretrainModel(tiny_vit(), target_dim=PATCH * PATCH * 3)
    x, mask = images(), random_mask()
    targets = dtm.PixelTeacher(PATCH)(x)
    levels = morph.token_morphing_levels(targets, [[4, 4], [2]], generator=torch.Generator().manual_seed(0))
    loss, stats = model(x, mask, targets, levels)
    assert sorted(stats) == ["loss", "loss_level0", "loss_level1"]
    assert torch.allclose(stats["loss"], (stats["loss_level0"] + stats["loss_level1"]) / 2)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.student.mask_token.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    assert not targets.requires_grad
    with pytest.raises(ValueError, match="loss"):
        dtm.DTMPretrainModel(tiny_vit(), 8, loss="l1")


def test_loss_dtm_is_the_dtm_part_of_a_features_fns_loss():
    """forward's docstring: with a features_fn, stats' "loss_dtm" is the DTM part of "loss" (without the extra loss)."""
    def features_fn(student, x, mask):
        return student.forward_features(x, mask).tokens, torch.tensor(5.0), {"loss_extra": torch.tensor(5.0)}

    model = dtm.DTMPretrainModel(tiny_vit(), target_dim=PATCH * PATCH * 3, features_fn=features_fn)
    x, mask = images(), random_mask()
    targets = dtm.PixelTeacher(PATCH)(x)
    levels = morph.token_morphing_levels(targets, [[4, 4]], generator=torch.Generator().manual_seed(0))
    loss, stats = model(x, mask, targets, levels)
    pred = model.head(model.student.forward_features(x, mask).tokens[:, 1:])
    assert torch.equal(stats["loss_dtm"], dtm.dtm_loss(pred, targets, levels)[0])
    assert torch.equal(stats["loss"], stats["loss_dtm"] + 5.0) and torch.equal(loss.detach(), stats["loss"])


def test_activation_checkpointing_gives_the_same_values_and_gradients():
    """--grad_checkpoint: blocks recomputed in the backward; drop path draws the same masks (the RNG state is restored
    for the recomputation), so values and gradients equal those of the stored-activation run."""
    import mto
    model = tiny_vit(drop_path_rate=0.3, rel_pos_bias="both").train()
    x, mask = images(), random_mask()

    def run():
        model.zero_grad()
        torch.manual_seed(5)
        tokens, losses = mto.mto_forward(model, x, mask, mto.MTOConfig())
        loss = tokens.pow(2).mean() + losses["loss_sing"] + losses["loss_ent"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *unused: calls.append(1))
    stored = run()
    assert len(calls) == 1
    model.grad_checkpointing = True
    recomputed = run()
    assert len(calls) == 3  # the block ran again in the backward
    assert torch.equal(stored[0], recomputed[0])
    for name, grad in stored[1].items():
        torch.testing.assert_close(recomputed[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in stored[1].values())
    model.eval().forward_features(x).tokens.sum().backward()  # forward_features' docstring: in training mode only
    assert len(calls) == 4


def test_block_with_every_parameter_distinct_equals_beits_block_written_out():
    """BEiT's block from the weights' own slices: q = W[:C] x + q_bias, k = W[C:2C] x (no bias), v = W[2C:] x +
    v_bias, softmax(q k^T / sqrt(d) + bias), norm1 before the attention and gamma_1 after it, norm2 / gamma_2 around the
    MLP. Every parameter is random, so that q_bias != v_bias, gamma_1 != gamma_2 and norm1 != norm2 (at init they are
    pairwise equal, and a swap of any pair, or of q and k, passed every test)."""
    torch.manual_seed(0)
    C, heads, T, B = 64, 2, 5, 3
    block = dtm.Block(C, heads, rel_pos_grid=(2, 2)).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(B, T, C)
    out, _ = block(x)
    d, W = C // heads, block.attn.qkv.weight
    split = lambda t: t.view(B, T, heads, d).transpose(1, 2)  # noqa: E731
    h = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias, eps=1e-6)
    q, k = split(h @ W[:C].t() + block.attn.q_bias), split(h @ W[C:2 * C].t())
    v = split(h @ W[2 * C:].t() + block.attn.v_bias)
    attn = (q @ k.transpose(-2, -1) / d ** 0.5 + block.attn.rel_pos_bias()).softmax(-1)
    x1 = x + block.gamma_1 * block.attn.proj((attn @ v).transpose(1, 2).reshape(B, T, C))
    h2 = F.layer_norm(x1, (C,), block.norm2.weight, block.norm2.bias, eps=1e-6)
    expected = x1 + block.gamma_2 * block.mlp.fc2(F.gelu(block.mlp.fc1(h2)))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_pretraining_head_starts_as_the_official_lm_head():
    """naver-ai/dtm models/modeling_dtm.py: lm_head.weight trunc_normal_(std 0.02, bounds +-std), bias 0 (not
    nn.Linear's default uniform(+-1/sqrt(fan_in)) = +-0.072 at width 192)."""
    torch.manual_seed(0)
    model = dtm.DTMPretrainModel(dtm.build_vit("vit_tiny", img_size=32), target_dim=512)
    w = model.head.weight
    assert w.abs().max() <= 0.02 and w.std().item() == pytest.approx(0.02 * 0.5398, rel=0.05)
    assert not model.head.bias.any()


def test_clip_renormalization_uses_openais_statistics_written_out():
    """--teacher_norm clip: the expected input is computed from OpenAI's mean/std literally (the existing test reads
    dtm.CLIP_MEAN/CLIP_STD, so a wrong constant passed it)."""
    visual = dtm.CLIPVisual(input_resolution=32, patch_size=16, width=64, layers=1, heads=1, output_dim=8)
    seen = []
    visual.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    x = torch.randn(2, 3, 32, 32)
    dtm.CLIPTeacher(visual, "clip")(x)
    col = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    raw = x * col((0.229, 0.224, 0.225)) + col((0.485, 0.456, 0.406))  # ImageNet-normalized -> [0, 1]
    expected = (raw - col((0.48145466, 0.4578275, 0.40821073))) / col((0.26862954, 0.26130258, 0.27577711))
    torch.testing.assert_close(seen[0], expected, atol=1e-6, rtol=1e-6)


def test_a_frozen_teacher_stays_in_eval_mode():
    teacher = dtm.PixelTeacher(8)
    assert teacher.train() is teacher and not teacher.training


def test_the_shared_relative_position_table_is_on_top_for_layer_decay():
    """BEiT's get_num_layer_for_vit (beit/optim_factory.py): rel_pos_bias -> num_max_layer - 1, i.e. depth + 1, the
    head's lr scale (not the embeddings' 0)."""
    vit = dtm.build_vit("vit_tiny", img_size=32, num_classes=3, rel_pos_bias="both")
    ids = {n: dtm.layer_id_for_param(n, vit.depth) for n, _ in vit.named_parameters()}
    assert ids["rel_pos_bias.table"] == ids["head.weight"] == vit.depth + 1


# ---------------------------------------------------------------------------------------------------
# Mutation review: checkpoint reading


def test_a_new_classifier_head_on_a_checkpoint_is_drawn_as_the_fine_tuning_models():
    """vit_from_checkpoint draws a new head with weight_init "downstream" (timm's bounds +-2, hardly truncated, as
    modeling_finetune.py), not pre-training's +-std: about a third of its 960 weights lie beyond 1 std."""
    checkpoint = {"model": tiny_vit().state_dict(), "args": {"model": "vit_tiny"}}
    torch.manual_seed(0)
    vit, fresh = dtm.vit_from_checkpoint(checkpoint, IMG, num_classes=5)
    assert "head.weight" in fresh
    beyond = (vit.head.weight.abs() > 0.02 * 0.001).float().mean()  # head_init_scale 0.001
    assert 0.2 < beyond < 0.45


def test_a_checkpoint_of_another_mlp_width_is_read_off_its_weights():
    """vit_from_checkpoint's docstring: the MLP width is read off the weights (a ViT of mlp_ratio 2 loads, the same
    tokens)."""
    torch.manual_seed(0)
    narrow = dtm.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)
    vit, fresh = dtm.vit_from_checkpoint({"model": narrow.state_dict(), "args": {"num_heads": 2}}, IMG)
    assert fresh == [] and vit.blocks[0].mlp.fc1.out_features == 64
    torch.testing.assert_close(vit.forward_features(images()).tokens, narrow.forward_features(images()).tokens)


def test_a_checkpoint_loads_with_the_drop_path_rate_asked_for():
    """--drop_path reaches a ViT read from a checkpoint (fine-tuning and segmentation with --init): stochastic depth
    linear in depth up to the rate, as in a ViT built afresh (not silently 0)."""
    checkpoint = {"model": tiny_vit().state_dict(), "args": {"model": "vit_tiny"}}
    for num_classes in (0, 5):
        vit, _ = dtm.vit_from_checkpoint(checkpoint, IMG, num_classes, drop_path_rate=0.3)
        assert [b.drop_path.p for b in vit.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_a_state_dict_saved_with_ddps_module_prefix_is_read(tmp_path):
    """vit_state_dict drops DDP's "module." (weights saved from the wrapped model) before the "student." of a
    pre-training model: the student's weights, exactly."""
    vit = tiny_vit().eval()
    pretrain = dtm.DTMPretrainModel(vit, target_dim=8)
    torch.save({"model": {"module." + k: v for k, v in pretrain.state_dict().items()}, "args": {"model": "vit_tiny"}},
               tmp_path / "ddp.pth")
    loaded, fresh = dtm.vit_from_checkpoint(dtm.read_checkpoint(str(tmp_path / "ddp.pth")), IMG)
    x = images()
    assert fresh == [] and torch.equal(loaded.eval().forward_features(x).tokens, vit.forward_features(x).tokens)


# torch.jit is deprecated, the released CLIP file is TorchScript
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_torchscript_file_given_as_a_checkpoint_says_it_is_a_clip_teacher(tmp_path):
    torch.jit.trace(nn.Linear(2, 2), torch.ones(1, 2)).save(str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(ValueError, match=r"--init '.*ViT-B-16.pt' is a TorchScript archive .*--teacher clip:"):
        dtm.read_checkpoint(str(tmp_path / "ViT-B-16.pt"), "--init")


def test_the_number_of_heads_in_args_wins_over_the_size_name():
    """args num_heads (what the heads error tells a user to save) is used even where the width and depth are a named
    size's: vit_tiny's 192 x 4 with 6 heads is not read with vit_tiny's 3 (without position tables no shape tells)."""
    torch.manual_seed(0)
    vit = dtm.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=192, depth=4, num_heads=6,
                                rel_pos_bias="none").eval()
    loaded, _ = dtm.vit_from_checkpoint({"model": vit.state_dict(), "args": {"model": "vit_tiny", "num_heads": 6}}, IMG)
    assert loaded.blocks[0].attn.num_heads == 6
    x = images()
    torch.testing.assert_close(loaded.eval().forward_features(x).tokens, vit.forward_features(x).tokens)


# ---------------------------------------------------------------------------------------------------
# Mutation review: model internals (second round)


def test_block_drops_each_residual_branch_with_its_own_draw():
    """Stochastic depth in BEiT's Block: x + drop_path(gamma_1 * attn(norm1(x))), then + drop_path(gamma_2 *
    mlp(norm2(x))), two fresh per-sample draws (rand(B) < keep, kept samples scaled by 1 / keep), attention's first. The
    DropPath test checks the module alone; a block that dropped one branch only (or reused one draw) passed."""
    torch.manual_seed(0)
    C, heads, T, B, p = 16, 2, 5, 32, 0.5
    block = dtm.Block(C, heads, drop_path=p).train()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.5)
    x = torch.randn(B, T, C)
    torch.manual_seed(3)
    out, _ = block(x)
    torch.manual_seed(3)
    keep_attn = (torch.rand(B, 1, 1) < 1 - p) / (1 - p)
    keep_mlp = (torch.rand(B, 1, 1) < 1 - p) / (1 - p)
    assert 0 < keep_attn.count_nonzero() < B and not torch.equal(keep_attn, keep_mlp)
    with torch.no_grad():
        x1 = x + keep_attn * block.gamma_1 * block.attn(block.norm1(x))[0]
        expected = x1 + keep_mlp * block.gamma_2 * block.mlp(block.norm2(x1))
    torch.testing.assert_close(out.detach(), expected, atol=1e-6, rtol=1e-6)


def test_embed_is_cls_then_patches_or_the_mask_token_plus_the_position_embedding():
    """VisionTransformer.embed written out: token 0 = cls_token + pos_embed[0]; token 1 + i = (the mask token if patch i
    is masked, else the patch's conv W @ pixels + b, patches row by row) + pos_embed[1 + i]. Only the identity of masked
    outputs was checked: a doubled mask token, a CLS token lost, or an absolute position embedding never added (or not
    to CLS) passed every test."""
    model = tiny_vit(abs_pos_emb=True)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in (model.cls_token, model.mask_token, model.pos_embed):
            param.copy_(torch.randn(param.shape, generator=g))
    x, mask = images(), random_mask()
    tokens = model.embed(x, mask).detach()
    weight, bias = model.patch_embed.weight.detach().reshape(192, -1), model.patch_embed.bias.detach()
    pos, cls, mask_token = model.pos_embed.detach()[0], model.cls_token.detach()[0, 0], model.mask_token.detach()[0, 0]
    for b in range(2):
        torch.testing.assert_close(tokens[b, 0], cls + pos[0])
        for i in range(N):
            y, xx = divmod(i, IMG // PATCH)
            patch = x[b, :, y * PATCH:(y + 1) * PATCH, xx * PATCH:(xx + 1) * PATCH].reshape(-1)
            content = mask_token if mask[b, i] else weight @ patch + bias
            torch.testing.assert_close(tokens[b, 1 + i], content + pos[1 + i], atol=1e-5, rtol=1e-5)


def test_cls_mask_token_position_embedding_and_relative_tables_start_as_the_officials():
    """naver-ai/dtm models/modeling_dtm.py:24-25 and 70-72: cls_token, mask_token and pos_embed drawn by
    trunc_normal_(std 0.02) truncated at +-std (weight_init "pretrain"); models/modeling_finetune.py:309-310 / BEiT's
    backbone: timm's trunc_normal_ (std 0.02, bounds +-2,
    "downstream"); relative position tables start at zero (BEiT). Left at zero (or drawn otherwise) they passed."""
    for weight_init in ("pretrain", "downstream"):
        torch.manual_seed(0)
        vit = dtm.VisionTransformer(img_size=64, patch_size=16, embed_dim=768, depth=1, num_heads=12,
                                    abs_pos_emb=True, rel_pos_bias="both", weight_init=weight_init)
        for name in ("cls_token", "mask_token", "pos_embed"):  # 768, 768 and 17 x 768 values
            values = getattr(vit, name).detach()
            if weight_init == "pretrain":
                assert values.abs().max() <= 0.02, name
                assert values.std().item() == pytest.approx(0.02 * 0.5398, rel=0.1), name
            else:
                assert values.abs().max() > 0.03, name  # not truncated at +-std
                assert values.std().item() == pytest.approx(0.02, rel=0.1), name
        assert not vit.rel_pos_bias.table.any() and not vit.blocks[0].attn.rel_pos_bias.table.any()


def test_rel_pos_table_resize_from_a_grid_of_one_or_two_patches_repeats_its_edge_offsets():
    """Fewer than 4 offsets on an axis (a grid of 1 or 2 patches): the polynomial through them (-1, 0, 1 keep their
    places), read at the new offsets clamped to the old range, i.e. every new offset beyond +-1 takes the edge's value;
    a single offset is copied everywhere. No test resized such a grid: a wrong Lagrange basis passed."""
    table = torch.randn(3 * 3 + 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    new = dtm.resize_rel_pos_table(table, (2, 2), (4, 3))
    old = table[:-3].reshape(3, 3, 2)
    edge = lambda d: min(max(d, -1), 1) + 1  # noqa: E731  offset -> index among the old offsets -1, 0, 1
    expected = torch.stack([old[edge(dy), edge(dx)] for dy in range(-3, 4) for dx in range(-2, 3)])
    assert new.shape == (7 * 5 + 3, 2)
    torch.testing.assert_close(new[:-3], expected, rtol=0, atol=1e-12)
    assert torch.equal(new[-3:], table[-3:])
    single = torch.tensor([[0.7], [1.0], [2.0], [3.0]], dtype=torch.float64)  # grid 1x1: one offset + the CLS rows
    resized = dtm.resize_rel_pos_table(single, (1, 1), (3, 2))
    torch.testing.assert_close(resized, torch.tensor([[0.7]] * 15 + [[1.0], [2.0], [3.0]], dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_block_layer_norms_use_eps_1e6_on_a_small_residual_stream():
    """BEiT's norm_layer is LayerNorm(eps=1e-6) for norm1 and norm2 (naver-ai/dtm models/modeling_dtm.py:274, 291,
    307). The written-out block test runs activations of variance ~1, where torch's default 1e-5 changes the output
    by ~1e-6 and passed; here the residual stream has variance ~1e-6, where the eps is a good part of the
    denominator."""
    torch.manual_seed(0)
    C, heads, T, B = 64, 2, 5, 3
    block = dtm.Block(C, heads).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.5)
        block.gamma_1.mul_(1e-3)  # a small attention branch: norm2 also sees a stream of variance ~1e-6
    x = torch.randn(B, T, C) * 1e-3
    with torch.no_grad():
        out, _ = block(x)
        d, W = C // heads, block.attn.qkv.weight
        split = lambda t: t.view(B, T, heads, d).transpose(1, 2)  # noqa: E731
        h = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias, eps=1e-6)
        q, k, v = split(h @ W[:C].t() + block.attn.q_bias), split(h @ W[C:2 * C].t()), split(h @ W[2 * C:].t()
                                                                                         + block.attn.v_bias)
        attn = (q @ k.transpose(-2, -1) / d ** 0.5).softmax(-1)
        x1 = x + block.gamma_1 * block.attn.proj((attn @ v).transpose(1, 2).reshape(B, T, C))
        h2 = F.layer_norm(x1, (C,), block.norm2.weight, block.norm2.bias, eps=1e-6)
        expected = x1 + block.gamma_2 * block.mlp.fc2(F.gelu(block.mlp.fc1(h2)))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_clip_layer_norms_keep_openais_eps_on_a_small_residual_stream():
    """OpenAI CLIP's LayerNorms (ln_pre, ln_1, ln_2, ln_post) are nn.LayerNorm's default eps 1e-5. With the random
    weights of the reference test the activations have variance ~1 and an eps of 1e-6 passed; scaled so that every
    LayerNorm's input has variance ~1e-6, the eps matters."""
    sd = clip_visual_state_dict()
    small = ["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias"]
    for i in range(CLIP_LAYERS):
        p = f"transformer.resblocks.{i}."
        small += [p + "attn.out_proj.weight", p + "attn.out_proj.bias", p + "mlp.c_proj.weight", p + "mlp.c_proj.bias"]
    sd.update({k: sd[k] * 1e-3 for k in small})
    visual = dtm.CLIPVisual(input_resolution=IMG, patch_size=PATCH, width=CLIP_W, layers=CLIP_LAYERS,
                            heads=CLIP_W // 64, output_dim=CLIP_OUT)
    visual.load_state_dict(sd)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(visual(x), clip_reference(sd, x), atol=1e-4, rtol=1e-3)


def test_the_pretraining_model_computes_the_loss_its_flags_name():
    """DTMPretrainModel's loss, loss_on and normalize_target reach dtm_loss in forward (train_pretrain's tests check
    only that the model holds them): the model's loss equals the dense reference of its own predictions for every
    combination. A forward that passed the defaults instead passed every test."""
    x, mask = images(), random_mask()
    targets = dtm.PixelTeacher(PATCH)(x) * 3 + 1
    levels = morph.token_morphing_levels(targets, [[4, 4], [2]], generator=torch.Generator().manual_seed(0))
    values = set()
    for loss in dtm.LOSSES:
        for loss_on in ("all", "masked"):
            for normalize_target in (False, True):
                model = dtm.DTMPretrainModel(tiny_vit().eval(), PATCH * PATCH * 3, loss=loss, loss_on=loss_on,
                                             normalize_target=normalize_target)
                with torch.no_grad():
                    value, _ = model(x, mask, targets, levels)
                    pred = model.head(model.student.forward_features(x, mask).tokens[:, 1:])
                reference = dense_dtm_loss(pred, targets, levels, mask, loss, loss_on,
                                           normalize_target=normalize_target)
                torch.testing.assert_close(value, reference, atol=1e-6, rtol=1e-5,
                                           msg=f"{loss} {loss_on} {normalize_target}")
                values.add(round(value.item(), 4))
    assert len(values) == 12  # every combination gives another value


def test_a_masked_loss_without_masked_positions_is_zero_not_nan():
    """loss_on="masked" divides by the number of masked positions, at least 1: a batch without any gives 0 (its
    positions all weigh 0), not 0 / 0 = NaN."""
    g = torch.Generator().manual_seed(4)
    pred, target = torch.randn(2, N, 8, generator=g), torch.randn(2, N, 8, generator=g)
    levels = morph.token_morphing_levels(target, [[3, 2]], generator=torch.Generator().manual_seed(0))
    value, per_level = dtm.dtm_loss(pred, target, levels, torch.zeros(2, N, dtype=torch.bool), loss_on="masked")
    assert value.item() == 0.0 and per_level[0].item() == 0.0
    # one (N,) mask for the batch broadcast over it while the divisor counted it once: B times the loss, silently
    for mask in (torch.ones(N, dtype=torch.bool), torch.ones(2, 4, 4, dtype=torch.bool), torch.ones(2, N)):
        with pytest.raises(ValueError, match=r"loss_on='masked' needs the \(B, N\) = \(2, 16\) bool mask"):
            dtm.dtm_loss(pred, target, levels, mask, loss_on="masked")


# Third mutation review of dtm.py (teachers, DTM objective, checkpoint reading)

# --- belongs in test_dtm.py (Other teachers) -------------------------------------------------------------------------

def test_pixel_teacher_eps_is_inside_the_sqrt_on_nearly_flat_patches():
    """MAE's norm_pix (models_mae.py forward_loss): (x - mean) / (var + 1e-6) ** .5. The per-patch loop test uses
    patches of variance ~1, where the eps hardly matters (1e-6 outside the sqrt, or 1e-5 inside, passed); nearly flat
    patches (sky, padding: common in real images) are where it decides the target's scale."""
    g = torch.Generator().manual_seed(3)
    x = 0.3 + 1e-3 * torch.randn(1, 3, 16, 16, generator=g)  # four 8x8 patches of std ~1e-3 (var ~ eps)
    x[..., :8, :8] = 0.5  # one exactly flat patch: all zeros, not NaN
    targets = dtm.PixelTeacher(8)(x)
    for i, (y, xx) in enumerate([(0, 0), (0, 8), (8, 0), (8, 8)]):
        patch = x[0, :, y:y + 8, xx:xx + 8].permute(1, 2, 0).reshape(-1).double()
        expected = (patch - patch.mean()) / (patch.var() + 1e-6) ** 0.5
        torch.testing.assert_close(targets[0, i].double(), expected, atol=1e-4, rtol=1e-4)
    assert not targets[0, 0].any()
    assert 0.4 < targets[0, 1:].std() < 0.9  # ~ std / sqrt(var + eps) = 1 / sqrt(2), not ~1


# --- belongs in test_dtm.py (DTM objective) --------------------------------------------------------------------------

def test_normalize_target_eps_is_the_officials_on_targets_of_small_variance():
    """The official --normalize_target: (t - mean) / (var + 1.e-6) ** .5, unbiased var (engine_for_dtm.py:157-158).
    Values written out: [0, 1e-3, 2e-3] has mean 1e-3 and unbiased var 1e-6, so it standardizes to
    [-1, 0, 1] * 1e-3 / sqrt(2e-6) = [-0.70711, 0, 0.70711] (eps 1e-5: +-0.30151). The loss tests run targets of
    variance ~4, where an eps of 1e-5 changed the loss by ~1e-6 and passed."""
    out = dtm.standardize(torch.tensor([[0.0, 1e-3, 2e-3]], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([[-0.5 ** 0.5, 0.0, 0.5 ** 0.5]], dtype=torch.float64),
                               atol=1e-9, rtol=1e-9)
    g = torch.Generator().manual_seed(12)
    pred = torch.randn(2, N, 12, generator=g, dtype=torch.float64)
    target = torch.randn(2, N, 12, generator=g, dtype=torch.float64) * 1e-3  # channel variance ~ eps
    levels = morph.token_morphing_levels(target, [[3, 2], [0]], generator=torch.Generator().manual_seed(0))
    for loss in dtm.LOSSES:
        value, _ = dtm.dtm_loss(pred, target, levels, loss=loss, normalize_target=True)
        reference = dense_dtm_loss(pred, target, levels, None, loss, "all", normalize_target=True)
        torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-10, msg=loss)


# --- belongs in test_dtm.py (ViT, beside test_classifier_head_and_layer_ids) ----------------------------------------

def beit_layer_id(name, depth):
    """The layer id BEiT's get_num_layer_for_vit gives (microsoft/unilm beit/optim_factory.py; naver-ai/dtm
    utils/optim_factory.py), written from its rule: the embeddings (cls / mask token, pos_embed, patch_embed) 0,
    block i i + 1, everything else (the shared relative position table, the final norm, the head) depth + 1."""
    first = name.split(".")[0]
    if first in ("cls_token", "mask_token", "pos_embed", "patch_embed"):
        return 0
    if first == "blocks":
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_layer_ids_of_every_parameter_are_beits_with_absolute_positions_and_a_mask_token():
    """Every parameter of a ViT with all optional parts (mask token, absolute position embedding, both table layouts,
    classifier) gets BEiT's layer id. The existing tests checked cls_token and patch_embed only, and their models had
    no pos_embed: an absolute position embedding (--abs_pos_emb) or mask token put on top (the head's lr) passed."""
    vit = dtm.build_vit("vit_tiny", img_size=IMG, patch_size=PATCH, num_classes=3, abs_pos_emb=True,
                        rel_pos_bias="both")
    names = [n for n, _ in vit.named_parameters()]
    assert {"pos_embed", "mask_token", "cls_token", "rel_pos_bias.table"} <= set(names)
    for name in names:
        assert dtm.layer_id_for_param(name, vit.depth) == beit_layer_id(name, vit.depth), name


# --- belongs in test_dtm.py (Other teachers) -------------------------------------------------------------------------

def test_pixel_teacher_computes_float32_targets_from_low_precision_images():
    """Images in bf16 (a pipeline that feeds half-precision batches) are normalized in float32: the targets equal those
    of the same (bf16-rounded) values in float32, dtype float32. Without the cast the mean/var were taken in bf16."""
    x = images().bfloat16()
    targets = dtm.PixelTeacher(PATCH)(x)
    assert targets.dtype == torch.float32
    assert torch.equal(targets, dtm.PixelTeacher(PATCH)(x.float()))


def test_pixel_teacher_keeps_float64_images_in_float64():
    """float64 images (an exact float64 check of a pre-training step, as dtm_loss keeps float64) give float64 targets
    equal to the per-patch formula in float64; they were rounded to float32 on the way (targets 2e-7 off)."""
    x = images(batch=1).double()
    targets = dtm.PixelTeacher(PATCH)(x)
    assert targets.dtype == torch.float64
    for i in range(N):
        y, xx = divmod(i, 4)
        patch = x[0, :, y * PATCH:(y + 1) * PATCH, xx * PATCH:(xx + 1) * PATCH].permute(1, 2, 0).reshape(-1)
        expected = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
        torch.testing.assert_close(targets[0, i], expected, rtol=1e-13, atol=1e-13)


# --- belongs in test_dtm.py (Mutation review: checkpoint reading) ----------------------------------------------------

def test_a_checkpoint_of_another_depth_is_not_taken_for_the_model_of_its_width():
    """A size is width AND depth: a 2-block ViT of vit_tiny's width 192 is no vit_tiny (4 blocks): --model vit_tiny is
    refused naming both, and without num_heads nor relative position tables its heads cannot be told. Matching the
    width alone passed. With tables, their columns tell the heads."""
    torch.manual_seed(0)
    vit = dtm.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=192, depth=2, num_heads=3,
                                rel_pos_bias="none")
    with pytest.raises(ValueError, match=r"width 192 and depth 2, but --model vit_tiny has width 192 and depth 4; "
                                         r"no model size of this repo fits it"):
        dtm.vit_from_checkpoint({"model": vit.state_dict()}, IMG, model="vit_tiny")
    with pytest.raises(ValueError, match=r"cannot tell the number of heads .*\(width 192, depth 2\)"):
        dtm.vit_from_checkpoint({"model": vit.state_dict(), "args": {"model": "vit_tiny"}}, IMG)
    with pytest.raises(ValueError, match=r"unknown model 'vit_t'; valid names: vit_tiny, "):  # a typo: a KeyError
        dtm.vit_from_checkpoint({"model": vit.state_dict()}, IMG, model="vit_t")


def test_the_number_of_heads_of_a_checkpoint_without_args_is_read_off_its_relative_position_tables():
    """A vit_tiny-sized ViT (192 wide, 4 blocks) with 6 heads, saved as a plain state dict: its size's 3 heads were
    assumed, which loaded silently (no tables) or failed on the tables' shapes without naming the heads."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, IMG, IMG)
    for layout in ("shared", "per_block", "both"):
        vit = dtm.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=192, depth=4, num_heads=6,
                                    rel_pos_bias=layout).eval()
        for checkpoint in ({"model": vit.state_dict()}, vit.state_dict()):  # a plain state dict in memory too
            loaded, _ = dtm.vit_from_checkpoint(checkpoint, IMG)
            assert loaded.num_heads == 6
            torch.testing.assert_close(loaded.eval().forward_features(x).tokens, vit.forward_features(x).tokens)


def test_model_sizes_are_the_official_vit_s_b_l_16_and_the_class_defaults_are_beits():
    """naver-ai/dtm models/modeling_dtm.py dtm_small/base/large_patch16_224 (and BEiT's beit_*_patch16_224): ViT-S/16
    384 wide, 12 blocks, 6 heads; ViT-B/16 768, 12, 12; ViT-L/16 1024, 24, 16; head width 64, MLP ratio 4, patch 16 at
    224 px (14 x 14 tokens). VisionTransformer's own rel_pos_bias default is "shared" (module docstring). No test read
    VIT_CONFIGS: ViT-S with 12 heads or ViT-L with 12 blocks passed."""
    expected = {"vit_s": (384, 12, 6), "vit_b": (768, 12, 12), "vit_l": (1024, 24, 16)}
    for name, (dim, depth, heads) in expected.items():
        with torch.device("meta"):  # shapes only
            vit = dtm.build_vit(name)
        block = vit.blocks[0]
        assert (vit.embed_dim, vit.depth, len(vit.blocks), vit.num_heads) == (dim, depth, depth, heads), name
        assert (block.attn.num_heads, block.attn.head_dim, block.mlp.fc1.out_features) == (heads, 64, 4 * dim), name
        assert (vit.patch_size, vit.img_size, vit.grid) == (16, (224, 224), (14, 14)), name
        assert vit.rel_pos_bias is not None and block.attn.rel_pos_bias is None, name  # default "shared"


def test_build_vit_takes_the_patch_size_the_trainers_check_images_and_build_grids_with(monkeypatch):
    """build_vit took VisionTransformer's own default 16, not dtm.PATCH_SIZE, with which train_pretrain.py builds its
    student, teacher and masks and every trainer checks image sizes: a fork setting PATCH_SIZE = 8 pre-trained at
    patch 8 while fine-tuning and segmentation from scratch (--init none, build_vit) ran at patch 16, with nothing
    said. A size's own patch_size and an override still win."""
    monkeypatch.setattr(dtm, "PATCH_SIZE", 8)
    vit = dtm.build_vit("vit_tiny", img_size=32)
    assert (vit.patch_size, vit.grid) == (8, (4, 4))
    monkeypatch.setitem(dtm.VIT_CONFIGS, "vit_tiny", {**dtm.VIT_CONFIGS["vit_tiny"], "patch_size": 4})
    assert dtm.build_vit("vit_tiny", img_size=32).patch_size == 4
    assert dtm.build_vit("vit_tiny", img_size=32, patch_size=16).patch_size == 16


def test_a_mask_of_another_patch_grid_names_the_vits_grid():
    """A mask of another grid (a fork's ViT of other patches with masks still drawn for dtm.PATCH_SIZE) named only the
    shapes, not which grid the ViT has."""
    with pytest.raises(ValueError, match=exactly(f"mask must be bool of shape (2, {N}), got torch.bool (2, 4); one "
                                                 f"entry per patch of this ViT: its 4x4 grid of 8-px patches")):
        tiny_vit().forward_features(images(), torch.zeros(2, 4, dtype=torch.bool))
    vit = dtm.build_vit("vit_tiny", img_size=(IMG, 48), patch_size=PATCH)
    with pytest.raises(ValueError, match=r"; one entry per patch of this ViT: its 4x6 grid of 8-px patches$"):  # H x W
        vit.forward_features(torch.randn(1, 3, IMG, 48), torch.zeros(1, 4, dtype=torch.bool))


def test_a_layer_scale_of_0_leaves_the_residual_branches_unscaled_as_beit():
    """BEiT's Block (naver-ai/dtm models/modeling_finetune.py Block.__init__: `if init_values > 0` gammas, else
    None) and train_pretrain.py's --layer_scale 0 ("0 disables"), also how vit_from_checkpoint builds a ViT from a
    checkpoint without gamma_1: x + attn(norm1(x)), then + mlp(norm2(.)), no layer-scale parameters. A zero-filled gamma
    (every block the identity) passed every test."""
    torch.manual_seed(0)
    C, heads, T, B = 32, 2, 5, 3
    block = dtm.Block(C, heads, layer_scale_init=0.0).eval()
    assert block.gamma_1 is None and block.gamma_2 is None
    assert not any("gamma" in name for name, _ in block.named_parameters())
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.5)
    x = torch.randn(B, T, C)
    with torch.no_grad():
        out, _ = block(x)
        x1 = x + block.attn(block.norm1(x))[0]
        expected = x1 + block.mlp(block.norm2(x1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    vit = dtm.build_vit("vit_tiny", img_size=IMG, patch_size=PATCH, layer_scale_init=0.0)
    assert not any("gamma" in name for name in vit.state_dict())
    # a checkpoint without gammas (--layer_scale 0, BEiT's) loads as such, not refused for missing gamma keys
    loaded, fresh = dtm.vit_from_checkpoint({"model": vit.state_dict(), "args": {"model": "vit_tiny"}}, IMG)
    x = torch.randn(1, 3, IMG, IMG)
    assert fresh == [] and loaded.blocks[0].gamma_1 is None
    assert torch.equal(loaded.eval().forward_features(x).tokens, vit.eval().forward_features(x).tokens)


def test_wrong_mask_shapes_block_indices_and_attn_mask_lists_are_refused():
    """A (N,) mask would broadcast over the batch and a list of the wrong length of per-block attention masks be cut
    short or ignored: refused. Block indices run -depth..depth-1 (-depth is block 0). The existing tests checked a
    float mask, positive indices, and never a wrong-length list."""
    model = tiny_vit().eval()
    x = images()
    for mask in (torch.zeros(N, dtype=torch.bool), torch.zeros(2, N + 1, dtype=torch.bool)):
        with pytest.raises(ValueError, match="mask must be bool of shape"):
            model.forward_features(x, mask)
    features = model.forward_features(x, return_layers=(-4,), return_qk=(-4,))
    assert sorted(features.layers) == [0] and sorted(features.qk) == [0]
    for bad in (4, -5):
        with pytest.raises(ValueError, match=r"valid: 0\.\.3"):
            model.forward_features(x, return_layers=(bad,))
    for length in (3, 5):
        with pytest.raises(ValueError, match=f"attn_mask list has {length} entries"):
            model.forward_features(x, attn_mask=[None] * length)
    byte_mask = torch.ones(2, 1, 1 + N, 1 + N, dtype=torch.uint8)  # 0/1, the old byte-mask habit: added as a bias
    with pytest.raises(ValueError, match=r"attn_mask must be bool .* or float .*, got torch.uint8: pass mask.bool\(\)"):
        model.forward_features(x, attn_mask=byte_mask)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\), channels first, got \(2, 32, 32, 3\); "
                                         r"channels last\? pass images.permute\(0, 3, 1, 2\)$"):
        model.forward_features(x.permute(0, 2, 3, 1))  # was "build the model with img_size=(32, 3)"
    with pytest.raises(ValueError, match=r"CLIP's width 128 does not split into 3 heads"):
        dtm.CLIPVisual(input_resolution=32, patch_size=16, width=128, layers=1, heads=3)


def test_an_attention_mask_the_attention_cannot_take_is_refused_naming_the_shapes_it_takes():
    """A mask that does not broadcast to (B, heads, T, T) failed inside the attention ("The size of tensor a (17) must
    match the size of tensor b (16)"), and a (B, T, T) one was read as one mask per head: silently so with as many
    images as heads (3 here). Refused, as a list entry too; the shapes the docstring names still work."""
    model = tiny_vit().eval()
    x, T = images(batch=3), 1 + N
    allowed = torch.rand(3, 1, T, T, generator=torch.Generator().manual_seed(5)) < 0.5
    allowed |= torch.eye(T, dtype=torch.bool)  # every query sees at least itself
    for bad in (allowed[:, 0], allowed[:2], allowed[..., 1:, 1:], allowed[None]):
        for attn_mask in (bad, [None, bad, None, None]):
            with pytest.raises(ValueError, match=re.escape(f"attn_mask {tuple(bad.shape)} does not fit the attention's "
                                                           f"(B, heads, T, T) = (3, 3, {T}, {T}): pass (B, 1, T, T)")):
                model.forward_features(x, attn_mask=attn_mask)
    per_image = model.forward_features(x, attn_mask=allowed).tokens
    for b in range(3):  # one mask per image: image b's tokens are those of image b alone with its mask
        alone = model.forward_features(x[b:b + 1], attn_mask=allowed[b:b + 1]).tokens
        torch.testing.assert_close(per_image[b:b + 1], alone, rtol=0, atol=1e-6)
    shared = allowed[0, 0]
    torch.testing.assert_close(model.forward_features(x, attn_mask=shared).tokens,
                               model.forward_features(x, attn_mask=shared.expand(1, 3, T, T)).tokens, rtol=0, atol=0)


def test_a_list_of_attention_masks_gives_each_block_its_own():
    """forward_features(attn_mask=[m0, None, m2, m3]) equals the blocks run one by one, block i with mask i (MTO's
    per-block masks). The existing test_dtm test passed such a list but checked only which .qk keys came back."""
    model = tiny_vit(rel_pos_bias="both").eval()
    x, T = images(), 1 + N
    g = torch.Generator().manual_seed(7)
    masks = [(torch.rand(2, 1, T, T, generator=g) < 0.5) | torch.eye(T, dtype=torch.bool) for _ in range(4)]
    masks[1] = None
    features = model.forward_features(x, attn_mask=masks, return_layers=(0, 1, 2, 3))
    h, shared = model.embed(x), model.rel_pos_bias()
    for i, block in enumerate(model.blocks):
        h, _ = block(h, shared, masks[i])
        torch.testing.assert_close(features.layers[i], h, rtol=0, atol=1e-6)
    torch.testing.assert_close(features.tokens, model.norm(h), rtol=0, atol=1e-6)


def test_gradients_reach_the_position_embedding_and_flow_back_through_returned_layers():
    """A loss on a returned block output (MTO's loss_sing, the segmentation pyramid) reaches exactly the parameters
    before it: embeddings (an absolute position embedding included), the shared table and blocks 0..1, nothing of
    blocks 2.. nor the final norm. The existing gradient test had no pos_embed and backpropagated the tokens only."""
    model = tiny_vit(abs_pos_emb=True, rel_pos_bias="both")
    features = model.forward_features(images(), random_mask(), return_layers=(1,))
    features.layers[1].square().mean().backward()
    before = ("cls_token", "mask_token", "pos_embed", "patch_embed", "rel_pos_bias", "blocks.0.", "blocks.1.")
    for name, p in model.named_parameters():
        reached = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert reached == name.startswith(before), name


def test_the_models_and_teachers_refuse_one_image_channels_last_and_integer_pixels():
    """One image (3, H, W) failed in CLIP's torch.cat ("Sizes of tensors must match", its conv takes unbatched input)
    and in the pixel teacher's unpacking; channels last read as an image H pixels high and 3 wide there; uint8 pixels
    failed in the student's and CLIP's conv ("Input type (unsigned char) and bias type (float) should be the same");
    a grey (B, 1, H, W) batch gave the pixel teacher targets of 64 values where its out_dim says 192. Each is refused,
    naming the fix; the pixel teacher still takes integer pixels (it works in float32)."""
    x = images()
    clip = dtm.CLIPTeacher(dtm.CLIPVisual(input_resolution=IMG, patch_size=PATCH, width=64, layers=1, heads=1,
                                          output_dim=8))
    pixels = dtm.PixelTeacher(PATCH)
    for model in (tiny_vit().forward_features, clip, pixels):
        with pytest.raises(ValueError, match=rf"^expected images \(B, 3, H, W\), channels first, got \(3, {IMG}, "
                                             rf"{IMG}\); one image\? pass images\[None\]$"):
            model(x[0])
        with pytest.raises(ValueError, match=r"channels last\? pass images.permute\(0, 3, 1, 2\)$"):
            model(x.permute(0, 2, 3, 1))
        with pytest.raises(ValueError, match=rf"got \(2, {IMG}, {IMG}\)$"):  # no channel dim: not one image
            model(x[:, 0])
    with pytest.raises(ValueError, match=rf"^expected images \(B, 3, H, W\), channels first, got \(2, 1, {IMG}, "
                                         rf"{IMG}\)$"):
        pixels(x[:, :1])
    raw = (x * 50 + 128).clamp(0, 255).to(torch.uint8)
    for model in (tiny_vit().forward_features, clip):
        with pytest.raises(TypeError, match=r"^expected float images, normalized as in training \(data.to_tensor: "
                                            r"\(pixel / 255 - mean\) / std\), got torch.uint8$"):
            model(raw)
    assert torch.equal(pixels(raw), pixels(raw.float()))
    grey = x[:, :1]  # a model built for 1 channel takes them
    assert tiny_vit(in_chans=1).forward_features(grey).tokens.shape == (2, 1 + N, 192)
    assert dtm.PixelTeacher(PATCH, in_chans=1)(grey).shape == (2, N, PATCH * PATCH)


def test_a_checkpoint_path_and_a_bare_number_of_groups_are_refused_naming_the_fix(tmp_path):
    """vit_from_checkpoint / vit_state_dict given the file's path instead of the read checkpoint said only "not a
    checkpoint of this repo ... got str"; dtm_loss given one level's number of groups as an int (not a list) failed in
    len(): "object of type 'int' has no len()"."""
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": tiny_vit().state_dict()}, path)
    for where in (str(path), path):
        for read in (lambda: dtm.vit_from_checkpoint(where, IMG), lambda: dtm.vit_state_dict(where)):
            with pytest.raises(ValueError, match=r"is a path, not a checkpoint: read the file first, "
                                                 r"dtm.read_checkpoint\(path\)$"):
                read()
    vit, _ = dtm.vit_from_checkpoint(dtm.read_checkpoint(str(path)), IMG)
    assert vit.num_patches == N
    pred, target = torch.randn(2, N, 4), torch.randn(2, N, 4)
    groups = [morph.token_morphing(target, [4], "official")]
    with pytest.raises(ValueError, match=r"^num_groups must be a list with one number of groups per level, got 12: "
                                         r"pass \[12\]$"):
        dtm.dtm_loss(pred, target, groups, num_groups=12)
    for sequence in ([12], (12,)):
        assert dtm.dtm_loss(pred, target, groups, num_groups=sequence)[0] == dtm.dtm_loss(pred, target, groups)[0]


def exactly(message: str) -> str:
    """pytest.raises' match for this whole message."""
    return f"^{re.escape(message)}$"


def test_a_vit_built_or_called_against_its_settings_names_the_fix():
    """No test made these refusals (an unknown rel_pos_bias, a width the heads do not divide, a mask for a model
    without a mask token, logits of a model without a classifier); the width's named no fix."""
    with pytest.raises(ValueError, match=exactly("rel_pos_bias must be one of both, shared, per_block, none, got "
                                                 "'all'")):
        tiny_vit(rel_pos_bias="all")
    with pytest.raises(ValueError, match=exactly("embed_dim 100 is not divisible by num_heads 3; pass an embed_dim "
                                                 "that is a multiple of num_heads (this repo's ViTs: 64 per head)")):
        dtm.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=100, depth=1, num_heads=3)
    with pytest.raises(ValueError, match=exactly("a mask was given but the model has no mask token; build it with "
                                                 "use_mask_token=True")):
        tiny_vit(use_mask_token=False).forward_features(images(), random_mask())
    with pytest.raises(RuntimeError, match=exactly("this model has no classifier (num_classes=0); use "
                                                   "forward_features for tokens")):
        tiny_vit()(images())


def test_teachers_given_a_setting_or_an_image_size_they_cannot_take_name_the_fix():
    """No test made these refusals; the image sizes off the patch grid named no fix."""
    visual = dtm.CLIPVisual(input_resolution=IMG, patch_size=PATCH, width=64, layers=1, heads=1, output_dim=8)
    with pytest.raises(ValueError, match=exactly("teacher_norm must be 'imagenet' or 'clip', got 'openai'")):
        dtm.CLIPTeacher(visual, "openai")
    odd = images(size=IMG + 4)
    with pytest.raises(ValueError, match=exactly(f"CLIP input 36x36 is not divisible by its patch size {PATCH}; "
                                                 f"resize or crop the images to multiples of {PATCH}")):
        dtm.CLIPTeacher(visual)(odd)
    with pytest.raises(ValueError, match=exactly(f"image 36x36 is not divisible by the patch size {PATCH}; resize "
                                                 f"or crop the images to multiples of {PATCH}")):
        dtm.PixelTeacher(PATCH)(odd)
    assert dtm.CLIPTeacher(visual)(images(size=IMG + PATCH)).shape == (2, (IMG // PATCH + 1) ** 2, 8)  # the fix
    assert dtm.PixelTeacher(PATCH)(images(size=IMG + PATCH)).shape == (2, (IMG // PATCH + 1) ** 2, 3 * PATCH ** 2)


def test_dtm_loss_and_the_pretraining_model_refuse_unknown_options_and_mismatched_inputs_naming_the_fix():
    """No test made these refusals; predictions and targets of different shapes, and loss_on='masked' without a
    mask, named no fix."""
    pred, target = torch.randn(2, N, 4), torch.randn(2, N, 4)
    groups = [morph.token_morphing(target, [4], "official")]
    with pytest.raises(ValueError, match=exactly("loss_on must be 'all' or 'masked', got 'visible'")):
        dtm.dtm_loss(pred, target, groups, loss_on="visible")
    with pytest.raises(ValueError, match=exactly("unknown loss 'l1'; use one of ('smooth_l1', 'l2', 'cosine')")):
        dtm.dtm_loss(pred, target, groups, loss="l1")
    with pytest.raises(ValueError, match=exactly(f"predictions (2, {N}, 5) and targets (2, {N}, 4) differ in shape; "
                                                 f"pass both (B, N, D), the predictions projected to the targets' "
                                                 f"width D")):
        dtm.dtm_loss(torch.randn(2, N, 5), target, groups)
    for extra in (1, -1):  # a teacher's CLS token kept, or a teacher of another patch grid: the width was named
        with pytest.raises(ValueError, match=exactly(f"predictions (2, {N}, 4) and targets (2, {N + extra}, 4) differ "
                                                     f"in their number of tokens; the targets need one per patch of "
                                                     f"the student, in its order, without a CLS token (a ViT "
                                                     f"teacher's tokens[:, 1:]) and from a teacher of the student's "
                                                     f"patch grid")):
            dtm.dtm_loss(pred, torch.randn(2, N + extra, 4), groups)
    for a, b in (((2, N, 4), (3, N, 4)), ((N, 4), (2, N, 4)), ((2, N, 4), (2, 1, N, 4))):  # not a number of tokens
        with pytest.raises(ValueError, match=exactly(f"predictions {a} and targets {b} differ in shape; pass both "
                                                     f"(B, N, D), the predictions projected to the targets' width D")):
            dtm.dtm_loss(torch.randn(a), torch.randn(b), groups)
    with pytest.raises(ValueError, match=exactly(f"loss_on='masked' needs the mask: pass mask=, the (B, N) = (2, {N}) "
                                                 f"bool mask of masked patches (True = masked)")):
        dtm.dtm_loss(pred, target, groups, loss_on="masked")
    assert dtm.dtm_loss(pred, target, groups, loss_on="masked", mask=random_mask())[0] > 0  # the fix
    with pytest.raises(ValueError, match=exactly("unknown loss 'l1'; use one of ('smooth_l1', 'l2', 'cosine')")):
        dtm.DTMPretrainModel(tiny_vit(), 4, loss="l1")
    with pytest.raises(ValueError, match=exactly("loss_on must be 'all' or 'masked', got 'visible'")):
        dtm.DTMPretrainModel(tiny_vit(), 4, loss_on="visible")


def test_damaged_or_foreign_weight_files_are_refused_naming_the_file(tmp_path):
    """No test made these refusals: a torch.save zip whose pickle is damaged, one that holds other Python objects,
    a CLIP state dict whose position embedding has no CLS row plus a square grid (named no fix), and a relative
    position table of no square grid given without source_grid."""
    torch.save({"model": {"a": torch.zeros(2)}}, tmp_path / "good.pth")
    with zipfile.ZipFile(tmp_path / "good.pth") as good, zipfile.ZipFile(tmp_path / "bad.pth", "w") as bad:
        for name in good.namelist():
            bad.writestr(name, b"garbage" if name.endswith("data.pkl") else good.read(name))
    with pytest.raises(ValueError, match=f"^--init '{re.escape(str(tmp_path / 'bad.pth'))}' cannot be read by "
                                         r"torch.load: it is truncated or damaged \(an interrupted save or copy\?\) "
                                         r"\(UnpicklingError: "):
        dtm.read_checkpoint(str(tmp_path / "bad.pth"), "--init")
    torch.save({"model": {}, "args": argparse_free_object()}, tmp_path / "objects.pth")
    with pytest.raises(ValueError, match=exactly(f"--init {str(tmp_path / 'objects.pth')!r} holds Python objects that "
                                                 f"torch.load does not read safely (weights_only=True): it is not a "
                                                 f"checkpoint of this repo")):
        dtm.read_checkpoint(str(tmp_path / "objects.pth"), "--init")
    state = dtm.CLIPVisual(input_resolution=IMG, patch_size=PATCH, width=64, layers=1, heads=1,
                           output_dim=8).state_dict()
    state["positional_embedding"] = state["positional_embedding"][1:]  # no CLS row: a CLIP of another kind
    torch.save(state, tmp_path / "clip.pth")
    with pytest.raises(ValueError, match=exactly(f"{str(tmp_path / 'clip.pth')!r}: positional_embedding has {N} rows, "
                                                 f"not 1 + a square grid of patches; pass OpenAI's ViT-B-16.pt or the "
                                                 f"encoder's own weights, torch.save(model.visual.state_dict(), "
                                                 f"PATH)")):
        dtm.build_teacher(f"clip:{tmp_path / 'clip.pth'}", IMG, PATCH)
    table = {"rel_pos_bias.table": torch.zeros(10, 3)}  # (2H - 1)^2 + 3 rows for no H
    with pytest.raises(ValueError, match=exactly("cannot infer a square patch grid from a relative position table of "
                                                 "10 rows: pass source_grid")):
        dtm.adapt_state_dict(table, tiny_vit())


def argparse_free_object():
    """A Python object that torch.load(weights_only=True) refuses and that is neither argparse's nor numpy's."""
    return warnings.WarningMessage("m", UserWarning, "f", 1)
