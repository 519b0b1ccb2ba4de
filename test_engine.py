"""Tests of engine.py: schedules, parameter groups, checkpoints (plain torch.load, finite only, atomic), the run
folder rules (auto-resume, --fresh, logs), the seeded data pipeline (exact mid-epoch restarts, unreadable images),
and one-line user errors."""
import argparse
import ast
import json
import math
import multiprocessing
import os
import pickle
import importlib
import io
import random
import re
import signal
import socket
import subprocess
import sys
import time
import textwrap
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import dtm
import engine

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = engine.Dist()


@pytest.fixture(autouse=True)
def let_go_of_run_locks():
    """Each test lets go of the output folders its prepare_run locked, as a run's teardown does (11 tests held up to
    10 locks, and their file descriptors, until a later test happened to release them)."""
    yield
    engine.release_output_dirs()


# ---------------------------------------------------------------------------------------------------
# schedules and parameter groups

def test_cosine_schedule_values():
    f = lambda step: engine.cosine_schedule(step, total_steps=110, warmup_steps=10, base_value=1.0, final_value=0.1)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)  # end of warmup: the base value
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(85) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.75)))
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # stays at the final value
    assert engine.cosine_schedule(0, 10, 0, 2.0, 0.0) == pytest.approx(2.0)  # no warmup


# naver-ai/dtm utils/utils.py cosine_scheduler(lr, 1e-5, 3, 7, warmup_epochs=1), lr = 1.5e-3 * sqrt(1024 / 2048), as
# run_pretrain_dtm.py calls it: its 14 values after the warmup, computed with the official code (2026-12-06)
OFFICIAL_COSINE_AFTER_WARMUP = [
    0.0010606601717798214, 0.0010474890497328593, 0.001008636138649224, 0.0009460496857262771,
    0.0008628680370518426, 0.0007632622678267731, 0.0006522270272374845, 0.0005353300858899107,
    0.000418433144542337, 0.0003073979039530483, 0.00020779213472797885, 0.00012461048605354457,
    6.20240331305973e-05, 2.3171122046961925e-05]


def test_cosine_schedule_after_the_warmup_is_the_official_cosine_scheduler():
    """3 epochs x 7 steps, 1 warmup epoch: steps 7-20 equal the official values; the warmup is the documented
    difference (README, Recipe provenance): lr * s / 7 here, the official np.linspace(0, lr, 7) is lr * s / 6."""
    peak = 1.5e-3 * math.sqrt(1024 / 2048)
    ours = [engine.cosine_schedule(step, 21, 7, peak, 1e-5) for step in range(21)]
    assert ours[7:] == pytest.approx(OFFICIAL_COSINE_AFTER_WARMUP, rel=1e-12, abs=0)
    assert ours[:7] == pytest.approx([peak * step / 7 for step in range(7)], rel=1e-12, abs=0)
    # the paper's run: 300 epochs of 1251 steps (ImageNet at 8 x 128), 10 warmup epochs; official values at the first
    # step after the warmup, the middle of the cosine and the last step
    total, warmup = 300 * 1251, 10 * 1251
    assert [engine.cosine_schedule(step, total, warmup, peak, 1e-5) for step in (warmup, 193905, total - 1)] == \
        pytest.approx([0.0010606601717798214, 0.0005353300858899107, 1.0000000019696615e-05], rel=1e-12, abs=0)


def test_poly_schedule_with_warmup():
    lr = lambda s: engine.poly_schedule(s, 100, 10, 1.0, power=1.0, warmup_ratio=1e-6)  # noqa: E731
    assert lr(0) == pytest.approx(1e-6)
    assert lr(5) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert lr(10) == pytest.approx(0.9) and lr(55) == pytest.approx(0.45) and lr(100) == 0.0
    assert engine.poly_schedule(100, 100, 10, 1.0, min_value=1e-4) == pytest.approx(1e-4)
    assert engine.poly_schedule(150, 100, 10, 1.0, min_value=1e-4) == pytest.approx(1e-4)  # never below, past the end


def official_name(name):
    """Our parameter name -> the official code's (naver-ai/dtm models/modeling_dtm.py, modeling_finetune.py)."""
    name = name[len("student."):] if name.startswith("student.") else name
    name = name.replace("rel_pos_bias.table", "relative_position_bias_table")
    return "lm_head." + name[len("head."):] if name.startswith("head.") else name


def official_no_decay(name, param):
    """utils/optim_factory.py get_parameter_groups with the skip list of the models' no_weight_decay()."""
    return param.ndim <= 1 or name.endswith(".bias") or name in {"pos_embed", "cls_token"}


@pytest.mark.parametrize("size", ["vit_s", "vit_b", "vit_l"])
def test_param_groups_follow_the_official_weight_decay_rule_on_every_parameter(size):
    with torch.device("meta"):  # shapes only: ViT-L without allocating it
        pretrain = dtm.DTMPretrainModel(dtm.build_vit(size, rel_pos_bias="both", abs_pos_emb=True), 512)
        classifier = dtm.build_vit(size, num_classes=1000, rel_pos_bias="per_block", use_mask_token=False)
    for model in (pretrain, classifier):
        groups = engine.param_groups(model, 0.05)
        decay = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
        assert set(decay) == {n for n, _ in model.named_parameters()}
        for name, p in model.named_parameters():
            assert decay[name] == (0.0 if official_no_decay(official_name(name), p) else 0.05), name
    decay = {n: g["weight_decay"] for g in engine.param_groups(pretrain, 0.05) for n in g["param_names"]}
    assert decay["student.mask_token"] == decay["student.rel_pos_bias.table"] == 0.05  # decayed, as the official
    assert decay["student.blocks.3.attn.rel_pos_bias.table"] == decay["head.weight"] == 0.05
    assert decay["student.cls_token"] == decay["student.pos_embed"] == decay["student.blocks.0.gamma_1"] == 0.0
    assert decay["student.blocks.1.attn.q_bias"] == decay["head.bias"] == 0.0


# After two steps of the official optimizer (naver-ai/dtm utils/optim_factory.py create_optimizer: AdamW, betas 0.9
# 0.98, eps 1e-8, weight decay 0.05 by get_parameter_groups; utils/utils.py NativeScalerWithGradNormCount, clip_grad
# 3.0) on the official DTM with the weights and gradients of the test below, float64, computed with the official code
# (2026-12-06): name -> (sum of the tensor, its first two values)
OFFICIAL_ADAMW_WEIGHTS = {
    "student.cls_token": (-0.07984331313084878, [0.0008766970538920712, -0.006487087902781878]),
    "student.mask_token": (-0.07118822106864509, [-0.018692018015750326, -0.02114641584828937]),
    "student.patch_embed.weight": (0.05839972001902298, [0.01710625167632824, 0.013618117501868405]),
    "student.rel_pos_bias.table": (-0.017040959090043332, [0.007020466470054713, -0.000341281000176912]),
    "student.blocks.0.gamma_1": (0.027433034516211013, [0.01780256152435133, 0.01541837701836462]),
    "student.blocks.1.attn.q_bias": (0.05938992518562369, [0.01928688586905433, 0.02080505541087987]),
    "student.blocks.2.attn.rel_pos_bias.table": (0.051593999627045126, [0.007693835954245834, 0.014265200217060703]),
    "student.blocks.3.mlp.fc2.weight": (-0.02862120083821422, [-0.019645487974900372, -0.018115904230565038]),
    "student.norm.weight": (0.05803794639707751, [-0.004099203832914599, 0.0033088210525881443]),
    "head.weight": (0.07538325425734635, [0.018488727637292007, 0.021146085195632484]),
    "head.bias": (0.09691843583582303, [-0.0015126943445756037, 0.005868709898997517]),
}


def test_two_adamw_steps_with_clipping_give_the_official_optimizers_weights():
    """train_pretrain.py's optimizer (AdamW over param_groups, betas 0.9 0.98, the cosine lr of steps 7 and 8 of 3
    epochs x 7, engine.optimizer_step clipping to 3.0) moves the weights as the official one: a ViT-tiny at 32 px with
    an 8-d head, weights and gradients from sines (no RNG), gradient norms 9.8 (clipped)."""
    model = dtm.DTMPretrainModel(dtm.build_vit("vit_tiny", img_size=32, rel_pos_bias="both"), 8).double()
    params = dict(sorted(model.named_parameters()))
    with torch.no_grad():
        for k, p in enumerate(params.values()):
            p.copy_((torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.37 + k) * 0.02).view(p.shape))
    optimizer = torch.optim.AdamW(engine.param_groups(model, 0.05), lr=1.0, betas=(0.9, 0.98))
    norms = []
    for step in (7, 8):
        engine.set_lr(optimizer, engine.cosine_schedule(step, 21, 7, 1e-3, 1e-5))
        for k, p in enumerate(params.values()):
            angles = torch.arange(p.numel(), dtype=torch.float64) * 0.11 + 3 * k + step
            p.grad = (torch.cos(angles) * 0.01).view(p.shape)
        norms.append(engine.optimizer_step(optimizer, None, model.parameters(), 3.0).item())
    assert norms == pytest.approx([9.824312167610554, 9.824371864418053], rel=1e-12)
    for name, (total, first) in OFFICIAL_ADAMW_WEIGHTS.items():
        values = params[name].detach().flatten()
        assert values.sum().item() == pytest.approx(total, rel=1e-10, abs=1e-15), name
        assert values[:2].tolist() == pytest.approx(first, rel=1e-10, abs=1e-15), name


def test_param_groups_lr_scale_and_frozen_parameters():
    student = dtm.build_vit("vit_tiny", img_size=32)
    model = dtm.DTMPretrainModel(student, 8)
    groups = engine.param_groups(model, 0.05, lr_scale_fn=lambda n: 0.5 if n.startswith("student.blocks.0.") else 1.0)
    by_name = {n: g for g in groups for n in g["param_names"]}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
    assert by_name["student.blocks.0.attn.qkv.weight"]["lr_scale"] == 0.5
    assert by_name["student.blocks.1.attn.qkv.weight"]["lr_scale"] == 1.0
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    engine.set_lr(optimizer, 0.2)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [0.1, 0.2]
    student.cls_token.requires_grad_(False)  # frozen parameters are left out
    assert "student.cls_token" not in {n for g in engine.param_groups(model, 0.05) for n in g["param_names"]}


def test_set_lr_gives_a_group_without_an_lr_scale_the_lr_itself():
    """set_lr's "1 if absent": an optimizer's own groups (no param_groups) take the lr as it is."""
    plain, scaled = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [plain]}, {"params": [scaled], "lr_scale": 0.5}], lr=1.0)
    engine.set_lr(optimizer, 0.2)
    assert [g["lr"] for g in optimizer.param_groups] == [0.2, 0.1]


def test_layer_decay_with_and_without_prefix():
    scale = engine.layer_decay_fn(4, 0.5, prefix="backbone.")
    assert scale("backbone.patch_embed.weight") == 0.5 ** 5
    assert scale("backbone.blocks.0.attn.qkv.weight") == 0.5 ** 4
    assert scale("backbone.blocks.3.attn.rel_pos_bias.table") == 0.5
    assert scale("decode_head.classifier.weight") == scale("pyramid.up2.weight") == 1.0
    plain = engine.layer_decay_fn(4, 0.5)
    assert plain("cls_token") == 0.5 ** 5 and plain("blocks.1.mlp.fc1.weight") == 0.5 ** 3
    assert plain("head.weight") == plain("fc_norm.bias") == 1.0


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")  # faked GPU
def test_amp_auto_picks_bf16_only_on_gpus_with_native_bf16(monkeypatch, capability, expected):
    """V100 (7.0) and T4 (7.5): fp16 with a GradScaler, although torch.cuda.is_bf16_supported() says True on them
    (emulated bf16); A100 (8.0) and H100 (9.0): bf16 without a scaler."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    dtype, scaler = engine.resolve_amp("auto", "cuda:0")
    assert dtype == expected and (scaler is not None) == (expected == torch.float16)
    assert engine.amp_name(dtype, scaler) == ("fp16 + GradScaler" if expected == torch.float16 else "bf16")
    if expected == torch.float16:
        assert isinstance(scaler, torch.amp.GradScaler)
        with pytest.raises(ValueError, match="no native bf16; use --amp fp16"):
            engine.resolve_amp("bf16", "cuda:0")
    else:
        assert engine.resolve_amp("bf16", "cuda:0") == (torch.bfloat16, None)
    assert engine.resolve_amp("fp16", "cuda:0")[0] == torch.float16
    # the teacher: fp16 on every GPU under autocast (the official code's), fp32 with --amp fp32, forced choices checked
    assert engine.resolve_teacher_amp("auto", dtype, "cuda:0") == torch.float16
    assert engine.resolve_teacher_amp("auto", None, "cuda:0") is None
    assert engine.resolve_teacher_amp("fp32", dtype, "cuda:0") is None
    assert engine.resolve_teacher_amp("fp16", None, "cuda:0") == torch.float16
    if expected == torch.float16:
        with pytest.raises(ValueError, match="no native bf16; use --teacher_amp fp16"):
            engine.resolve_teacher_amp("bf16", dtype, "cuda:0")
    else:
        assert engine.resolve_teacher_amp("bf16", dtype, "cuda:0") == torch.bfloat16


CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]  # torch 2.11's PyPI build
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


@pytest.mark.parametrize("capability, archs, runs", [
    ((7, 0), CU130, False), ((7, 0), CU126, True), ((6, 1), CU126, True),  # V100; P100-class via sm_60
    ((8, 9), ["sm_80", "sm_86", "sm_90"], True),  # L40 / RTX 4090 run sm_86 code
    ((9, 0), ["sm_80", "sm_90a"], True), ((12, 1), CU130, True),  # 12.1 via sm_120
    ((11, 0), ["sm_100", "sm_120"], False), ((11, 0), ["sm_100", "compute_100"], True),  # PTX JIT-compiles upwards
    ((7, 0), [], True), ((9, 0), ["gfx90a", "gfx942"], True)])  # unknown (empty, ROCm): torch decides
def test_gpu_without_kernels_in_this_torch_build_is_a_clear_error(monkeypatch, capability, archs, runs):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    if runs:
        engine.check_gpu_supported("cuda:0")
        return
    with pytest.raises(ValueError, match=f"no kernels for Tesla V100-SXM2-32GB \\(compute capability "
                                         f"{capability[0]}.{capability[1]}; it has sm_"):
        engine.check_gpu_supported("cuda:0")
    if capability == (7, 0):  # setup() checks before anything runs on the GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.delenv("RANK", raising=False)
        with pytest.raises(ValueError, match="for a V100: a CUDA 12.6 build, pip install torch --index-url "
                                             "https://download.pytorch.org/whl/cu126"):
            engine.setup()


def test_setup_sets_the_backend_flags_once_for_all_trainers(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with engine.backend_flags_kept():  # this test's caller's flags, given back
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
        assert engine.setup().device == torch.device("cpu")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark


@pytest.mark.parametrize("trainer, run", [("train_pretrain", "train"), ("train_finetune", "finetune"),
                                          ("train_seg", "train")])
@pytest.mark.parametrize("raises", [False, True])
def test_main_gives_the_backend_flags_back_to_its_caller(trainer, run, raises, tmp_path, monkeypatch):
    """setup's TF32 and autotuner hold for the run only: a notebook or a sweep calling main went on with them (its own
    fp32 matmuls on TF32), whether main returned or raised."""
    module, seen = importlib.import_module(trainer), []

    def stub(*args):
        seen.append(engine.backend_flags())
        if raises:
            raise ValueError("the run failed")
        return 1.0
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(module, run, stub)
    saved = engine.backend_flags()
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, False
        torch.backends.cudnn.benchmark = False
        if raises:
            with pytest.raises(ValueError, match="the run failed"):
                module.main(["--output_dir", str(tmp_path)])
        else:
            assert module.main(["--output_dir", str(tmp_path)]) == 1.0
        assert seen == [(True, True, True)]  # the run's
        assert engine.backend_flags() == (True, False, False)  # the caller's again
    finally:  # not by backend_flags_kept, which this checks
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def test_resolve_amp_on_cpu():
    assert engine.resolve_amp("auto", "cpu") == (None, None) and engine.amp_name(None, None) == "fp32"
    assert engine.resolve_amp("fp32", torch.device("cpu")) == (None, None)
    assert engine.resolve_amp("bf16", "cpu") == (torch.bfloat16, None)
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        engine.resolve_amp("fp16", "cpu")
    assert engine.resolve_teacher_amp("auto", None, "cpu") is None  # the CPU: the student's choice
    assert engine.resolve_teacher_amp("auto", torch.bfloat16, "cpu") == torch.bfloat16
    assert engine.resolve_teacher_amp("bf16", None, "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="--teacher_amp fp16 needs a CUDA device"):
        engine.resolve_teacher_amp("fp16", None, "cpu")
    with pytest.raises(ValueError, match="unknown --amp"):
        engine.resolve_amp("fp8", "cpu")


# ---------------------------------------------------------------------------------------------------
# torch.compile

@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inside torch.compile
def test_compile_blocks_makes_one_graph_for_all_drop_path_rates():
    """--compile with stochastic depth: each block has its own drop-path rate; held as Python floats they made one
    graph per block, and past dynamo's recompile limit (8) the remaining blocks of a ViT-B ran uncompiled. Now: one
    graph for block 0 (rate 0) and one for the other 11, one more for evaluation; values equal to the eager model."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    eager = dtm.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=12, num_heads=2,
                                  drop_path_rate=0.1)
    compiled = dtm.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=12, num_heads=2,
                                     drop_path_rate=0.1)
    compiled.load_state_dict(eager.state_dict())
    engine.compile_blocks(compiled)
    torch._dynamo.reset()
    counters.clear()
    images = torch.randn(2, 3, 32, 32)
    compiled.forward_features(images).tokens.sum().backward()
    assert counters["stats"]["unique_graphs"] == 2
    assert all(p.grad is not None for p in compiled.blocks.parameters())
    out, reference = (m.eval().forward_features(images).tokens for m in (compiled, eager))
    assert counters["stats"]["unique_graphs"] == 3
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_compiled_blocks_make_one_graph_under_bf16_autocast():
    """--compile --amp bf16 (a GPU's --amp auto): block 0 once got the bf16 patch embedding and blocks 1.. float32,
    so dynamo made two graphs (test_gpu.py's compile check asserts one). Dynamo's eager backend: graphs, no codegen."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    vit = dtm.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2)
    for block in vit.blocks:
        block.compile(backend="eager")
    torch._dynamo.reset()
    counters.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vit.forward_features(torch.randn(2, 3, 32, 32)).tokens.float().sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------------------------------------------
# checkpoints

def tiny_state(model, step=3, **extra_args):
    args = argparse.Namespace(model="vit_tiny", lr=0.1, betas=(0.9, 0.98), output_dir="x", demo=False, **extra_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    return engine.checkpoint_state("dtm_pretrain", model, optimizer, None, args, step, steps_per_epoch=2)


def test_checkpoint_loads_with_plain_torch_load_and_restores_rng(tmp_path):
    model = torch.nn.Linear(3, 2)
    engine.seed_all(3)
    state = tiny_state(model)
    first = (torch.rand(3), np.random.rand(), random.random())
    path = str(tmp_path / "sub" / "ck.pth")
    (tmp_path / "sub").mkdir()  # a run's --output_dir, made by open_log: a save does not make it (again)
    engine.save_checkpoint(path, state)
    assert not [f for f in os.listdir(tmp_path / "sub") if ".tmp" in f]  # the temp file was renamed
    loaded = torch.load(path)  # torch's default: weights_only=True
    assert loaded["kind"] == "dtm_pretrain" and loaded["step"] == 3 and loaded["epoch"] == 1
    assert loaded["args"]["betas"] == (0.9, 0.98) and loaded["steps_per_epoch"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    engine.set_rng_state(loaded["rng"])
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_resume_restores_model_optimizer_and_rng():
    model = torch.nn.Linear(3, 2)
    engine.seed_all(3)
    state = tiny_state(model)
    first = torch.rand(3)
    other = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    engine.seed_all(99)
    args = argparse.Namespace(**state["args"])
    assert engine.resume(state, "ck.pth", other, optimizer, None, args, 2, CPU) == 3
    assert torch.equal(torch.rand(3), first)
    assert torch.equal(other.weight, model.weight) and optimizer.state_dict()["state"][0]["step"] == 1


def test_resume_restores_the_loss_scale():
    """fp16's GradScaler comes back at its saved scale (started afresh at 65536, the first steps overflow)."""
    model = torch.nn.Linear(3, 2)
    state = tiny_state(model)
    state["scaler"] = torch.amp.GradScaler("cpu", init_scale=8.0).state_dict()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    engine.resume(state, "ck.pth", torch.nn.Linear(3, 2), torch.optim.AdamW(model.parameters()), scaler,
                  argparse.Namespace(**state["args"]), 2, CPU)
    assert scaler.get_scale() == 8.0


def test_cuda_rng_state_is_this_device_only_and_resumes_on_fewer_gpus(monkeypatch):
    """A fake CUDA with 2 devices, current device 1: the checkpoint holds device 1's state and restores it onto the
    current device; a list of 8 devices' states (checkpoints before this was fixed, saved on 8 GPUs) restores the
    current device's entry instead of indexing devices this process does not have."""
    states = [torch.full((4,), float(i)).to(torch.uint8) for i in range(8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[1])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("indexes every saved device"))
    state = engine.rng_state()
    assert torch.equal(state["cuda"], states[1])
    engine.set_rng_state(state)
    engine.set_rng_state({**state, "cuda": states})
    engine.set_rng_state({**state, "cuda": states[:1]})  # saved on one GPU, resumed as rank 1: nothing to restore
    assert [int(t[0]) for t in restored] == [1, 1]


def test_ddp_broadcasts_buffers_only_where_ranks_can_differ():
    """The ViTs' buffers (relative position indices) are constant: no broadcast before every forward. BatchNorm's
    running statistics differ per rank unless SyncBatchNorm keeps them equal."""
    vit = dtm.build_vit("vit_tiny", img_size=32, rel_pos_bias="both")
    assert len(list(vit.buffers())) > 1 and not engine.buffers_differ_between_ranks(vit)
    head = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    assert engine.buffers_differ_between_ranks(torch.nn.ModuleList([vit, head]))
    assert not engine.buffers_differ_between_ranks(torch.nn.SyncBatchNorm.convert_sync_batchnorm(head))


def test_ddp_wraps_without_deprecation_warnings(tmp_path, monkeypatch):
    """torch 2.13 deprecates DDP's broadcast_buffers (a FutureWarning on every rank); engine.ddp passes
    forward_sync_buffers where torch has it. A one-process gloo group in this process, destroyed after."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # init_process_group wraps it, destroy leaves it so
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            vit = engine.ddp(dtm.build_vit("vit_tiny", img_size=32), engine.Dist(world_size=2))
            norm = engine.ddp(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)),
                              engine.Dist(world_size=2))
        assert not vit.broadcast_buffers and norm.broadcast_buffers  # a property of forward_sync_buffers in 2.13
    finally:
        torch.distributed.destroy_process_group()


def test_warmup_epochs_round_to_steps_and_a_warmup_of_no_step_is_refused():
    assert [engine.warmup_steps(e, 3) for e in (0, 0.2, 0.5, 0.9, 2)] == [0, 1, 2, 3, 6]  # round(0.6), round(1.5)
    for epochs in (0.1, 1 / 6):  # 0.3 and 0.5 of a step: round() gives 0
        with pytest.raises(ValueError, match="rounds to no warmup step: pass --warmup_epochs 0 for none, or at "
                                             "least 0.333 \\(one step\\)"):
            engine.warmup_steps(epochs, 3)


def test_a_warmup_as_long_as_the_run_is_reported(capsys):
    engine.warn_long_warmup(10, 11, "--warmup_epochs", CPU)
    assert capsys.readouterr().out == ""
    engine.warn_long_warmup(10, 10, "--warmup_iters", CPU)  # the last step, 9, is still warming up
    assert engine.cosine_schedule(9, 10, 10, 1.0, 0.0) < 1.0
    assert "warning: the warmup (--warmup_iters, 10 steps) lasts the whole run (10 steps)" in capsys.readouterr().out


def test_optimizer_step_unscales_then_clips_and_returns_the_unclipped_norm():
    """Gradient (3, 4, 0) (norm 5), scaled by 1024 as fp16 training scales it: the step unscales, clips to norm 1 and
    reports 5; SGD with lr 1 then moves the weights by -(0.6, 0.8, 0). Without clipping (0) it moves by the gradient."""
    for scaler, clip, expected in ((torch.amp.GradScaler("cpu", init_scale=1024.0), 1.0, [0.4, 0.2, 1.0]),
                                   (None, 1.0, [0.4, 0.2, 1.0]), (None, 0, [-2.0, -3.0, 1.0])):
        p = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.SGD([p], lr=1.0)
        loss = (p * torch.tensor([3.0, 4.0, 0.0])).sum()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        norm = engine.optimizer_step(optimizer, scaler, [p], clip)
        assert norm.item() == pytest.approx(5.0) and p.grad is None
        torch.testing.assert_close(p.detach(), torch.tensor(expected))


def test_optimizer_step_without_clipping_only_reads_the_gradients():
    """--clip_grad 0 (fine-tuning's and segmentation's default): the norm is measured for the log, the gradients are
    not rewritten (clip_grad_norm_ with an infinite max norm multiplied each by 1: one more pass over them per step)."""
    for clip, rewritten in ((0, False), (None, False), (10.0, True)):
        p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))  # the norm over both
        optimizer = torch.optim.SGD([p, q], lr=1.0)
        (p * torch.tensor([3.0, 0.0]) + q * torch.tensor([0.0, 4.0])).sum().backward()
        version = p.grad._version
        seen = []
        optimizer.register_step_pre_hook(lambda *_: seen.append(p.grad._version != version))
        norm = engine.optimizer_step(optimizer, None, [p, q], clip)
        assert seen == [rewritten] and norm.item() == pytest.approx(5.0)


def test_non_finite_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = str(tmp_path / engine.LAST)
    with pytest.raises(FloatingPointError, match="no checkpoint was written"):
        with torch.no_grad():
            model.weight[0, 0] = float("nan")
        engine.save_checkpoint(path, tiny_state(model))
    assert not os.path.exists(path)
    good = torch.nn.Linear(3, 2)
    engine.save_checkpoint(path, tiny_state(good, step=5))
    with torch.no_grad():
        good.bias[1] = float("inf")
    with pytest.raises(FloatingPointError, match=f"parameters \\['bias'\\] not finite at step 7.*{engine.LAST}"):
        engine.save_checkpoint(path, tiny_state(good, step=7))
    assert torch.load(path)["step"] == 5  # the last good checkpoint is left as it was


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's mappings from /proc")
def test_a_read_checkpoint_holds_no_mapping_of_its_file(tmp_path):
    """Read into memory, not memory-mapped: a mapped file stays held as long as any tensor read from it lives (an
    optimizer's step counter), so the checkpoint-last.pth a resumed run replaces would stay on disk for the run (on
    NFS as a .nfsXXXX file in the output folder)."""
    path = tmp_path / engine.LAST
    torch.save({"model": {"w": torch.arange(6.0)}, "step": torch.tensor(3)}, path)
    kept = dtm.read_checkpoint(str(path), "--resume")["step"]
    assert not any(str(path) in line for line in open("/proc/self/maps")) and kept == 3


def test_read_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth.*no such file"):
        dtm.read_checkpoint(str(tmp_path / "missing.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text.pth' cannot be read by torch.load: it is not a file that torch.save "
                                         r"wrote \(it starts with b'not ', not a zip archive or a pickle\)$"):
        dtm.read_checkpoint(str(tmp_path / "text.pth"))  # it said "(IndexError: pop from empty list)"
    torch.save({"model": {"w": torch.zeros(1000)}, "kind": "dtm_seg"}, tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cut.pth' cannot be read by torch.load: it is truncated or damaged \(an "
                                         r"interrupted save or copy\?\) \(RuntimeError: PytorchStreamReader failed "
                                         r"reading zip archive: failed finding central directory\)$"):
        dtm.read_checkpoint(str(tmp_path / "cut.pth"))  # the first sentence of torch's message only
    # the same size, its zip directory damaged: zipfile's BadZipFile, with its traceback (also as a CLIP teacher)
    (tmp_path / "bad_dir.pth").write_bytes((tmp_path / "full.pth").read_bytes().replace(b"PK\x01\x02", b"PK\0\0", 1))
    for read in (lambda path: dtm.read_checkpoint(path, "--init"), lambda path: dtm.build_teacher(f"clip:{path}")):
        with pytest.raises(ValueError, match=r" '.*bad_dir.pth' cannot be read by torch.load: it is truncated or "
                                             r"damaged \(an interrupted save or copy\?\) \(RuntimeError: "):
            read(str(tmp_path / "bad_dir.pth"))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"model": {}}, protocol=2))  # pickle.dump, not torch.save
    with pytest.raises(ValueError, match=r"plain.pkl' cannot be read by torch.load: it is not a file that torch.save "
                                         r"wrote \(it starts with b'\\x80\\x02}q', a pickle of something else\)$"):
        dtm.read_checkpoint(str(tmp_path / "plain.pkl"))  # it said "truncated or damaged"
    torch.save({"model": {}}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # torch < 1.6's format
    assert dtm.read_checkpoint(str(tmp_path / "legacy.pth")) == {"model": {}}
    with warnings.catch_warnings():  # torch.load notes the protocol that is not its default
        warnings.simplefilter("ignore")
        torch.save({"model": {}}, tmp_path / "legacy3.pth", _use_new_zipfile_serialization=False, pickle_protocol=3)
        assert dtm.read_checkpoint(str(tmp_path / "legacy3.pth")) == {"model": {}}  # refused by its first bytes once
    (tmp_path / "legacy_cut.pth").write_bytes((tmp_path / "legacy.pth").read_bytes()[:30])
    with pytest.raises(ValueError, match="legacy_cut.pth' cannot be read by torch.load: it is truncated or damaged"):
        dtm.read_checkpoint(str(tmp_path / "legacy_cut.pth"))
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pth' cannot be read by torch.load: it is empty \(an interrupted save "
                                         r"or copy\?\)$"):
        dtm.read_checkpoint(str(tmp_path / "empty.pth"))
    torch.save({"model": {}, "rng": np.random.get_state()}, tmp_path / "old.pth")  # the pre-engine format
    with pytest.raises(ValueError, match="older version of this repo.*re-save it once"):
        dtm.read_checkpoint(str(tmp_path / "old.pth"))
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="'model' entry"):
        dtm.read_checkpoint(str(tmp_path / "other.pth"))
    torch.save({"state": 1, 5: 2}, tmp_path / "mixed_keys.pth")  # keys that do not sort together
    with pytest.raises(ValueError, match=r"'model' entry, got \['5', 'state'\]"):
        dtm.read_checkpoint(str(tmp_path / "mixed_keys.pth"))
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pth")  # a plain state dict
    assert torch.equal(dtm.read_checkpoint(str(tmp_path / "plain.pth"))["model"]["w"], torch.ones(2))
    with pytest.raises(ValueError, match="not a checkpoint of train_finetune.py \\(kind 'dtm_seg'\\)"):
        engine.load_checkpoint(str(tmp_path / "full.pth"), "dtm_finetune")


def test_a_checkpoint_saved_with_pickle_protocol_4_or_5_is_not_called_damaged(tmp_path):
    """torch.save(..., pickle_protocol=4) (large objects) writes a whole file that torch.load's safe reader
    (weights_only=True) does not read (its FRAME opcode): it was "truncated or damaged (an interrupted save or
    copy?)", the wrong fix. Named by its protocol, with the re-save that works; zip and torch < 1.6's format alike."""
    with warnings.catch_warnings():  # torch.save and torch.load note the protocol that is not their default
        warnings.simplefilter("ignore")
        for protocol, zipped in ((4, True), (5, True), (4, False)):
            path = str(tmp_path / f"p{protocol}{zipped}.pth")
            torch.save({"model": {"w": torch.ones(2)}}, path, pickle_protocol=protocol,
                       _use_new_zipfile_serialization=zipped)
            with pytest.raises(ValueError) as error:
                dtm.read_checkpoint(path, "--init")
            assert str(error.value) == (
                f"--init {path!r} was saved with pickle protocol {protocol} (torch.save's pickle_protocol), which "
                f"torch.load does not read safely (weights_only=True): if you trust the file, re-save it once with "
                f"the default protocol: python -c \"import sys, torch; p = sys.argv[1]; torch.save(torch.load(p, "
                f"weights_only=False), p)\" {path}")
            subprocess.run([sys.executable, "-c", "import sys, torch; p = sys.argv[1]; torch.save(torch.load(p, "
                            "weights_only=False), p)", path], check=True, capture_output=True)  # the fix named works
            assert dtm.read_checkpoint(path, "--init")["model"]["w"].tolist() == [1.0, 1.0]


def test_a_flag_that_only_sets_the_starting_weights_is_not_recorded_as_applied_on_resume(capsys):
    """--layer_scale is the initial value of the layer-scale weights, which a checkpoint holds: a relaunch with
    another (non-zero) value printed "--layer_scale 0.1 -> 0.5" among the changes that apply, and recorded 0.5 in
    the next checkpoint's args, while the weights stayed the run's (a flag review)."""
    model = torch.nn.Linear(3, 2)
    state = tiny_state(model, step=4)
    state["args"]["layer_scale"] = 0.1
    args = argparse.Namespace(model="vit_tiny", lr=0.1, betas=[0.9, 0.98], output_dir="y", demo=False, layer_scale=0.5)
    engine.resume(state, "ck.pth", model, torch.optim.AdamW(model.parameters()), None, args, 2, CPU)
    out = capsys.readouterr().out
    assert "note: --layer_scale sets the weights a run starts with, which 'ck.pth' holds: the continued run keeps " \
           "--layer_scale 0.1 (not 0.5)" in out and "-> 0.5" not in out
    assert args.layer_scale == 0.1  # what the next checkpoint records


def test_resume_reports_changed_settings_and_remaps_steps_at_epoch_boundaries(tmp_path, capsys):
    model = torch.nn.Linear(3, 2)
    state = tiny_state(model, step=4)  # 2 epochs of 2 steps
    args = argparse.Namespace(model="vit_tiny", lr=0.2, betas=[0.9, 0.98], output_dir="y", demo=False)
    optimizer = torch.optim.AdamW(model.parameters())
    assert engine.resume(state, "ck.pth", model, optimizer, None, args, 2, CPU) == 4
    out = capsys.readouterr().out
    assert "--lr 0.1 -> 0.2" in out and "betas" not in out and "output_dir" not in out
    assert engine.resume(state, "ck.pth", model, optimizer, None, args, 5, CPU) == 10  # a new batch: epoch 2 of 5 steps
    state["step"] = 3  # mid-epoch
    with pytest.raises(ValueError, match="saved mid-epoch"):
        engine.resume(state, "ck.pth", model, optimizer, None, args, 5, CPU)


def test_resume_mid_epoch_needs_the_same_samples_per_step(capsys, tmp_path):
    """16 steps per epoch at batch 32 and at batch 31 (512 images): a mid-epoch restart would continue the epoch's
    order at another sample, so only the epoch boundary accepts it. Another split of the same 32 samples per step
    (batch x accumulation x processes) continues at the same sample: accepted."""
    model = torch.nn.Linear(3, 2)
    args = argparse.Namespace(model="vit_tiny", lr=0.1, betas=(0.9, 0.98), output_dir="x", demo=False, batch_size=32,
                              accum_iter=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = engine.checkpoint_state("dtm_pretrain", model, optimizer, None, args, 5, steps_per_epoch=16)
    assert state["world_size"] == 1
    same = argparse.Namespace(**vars(args))
    assert engine.resume(state, "ck.pth", model, optimizer, None, same, 16, CPU) == 5
    for flag, value, total in (("batch_size", 31, 31), ("accum_iter", 2, 64)):
        other = argparse.Namespace(**{**vars(args), flag: value})
        with pytest.raises(ValueError, match=f"saved mid-epoch \\(step 5\\); this run differs in samples per step "
                                             f"\\(--batch_size x --accum_iter x processes\\) 32 -> {total}"):
            engine.resume(state, "ck.pth", model, optimizer, None, other, 16, CPU)
    last = str(tmp_path / engine.LAST)  # the folder's epoch-end checkpoints are named (it named a pattern, none there)
    with pytest.raises(ValueError, match=f"samples per step .* 32 -> 64.*, or from a checkpoint saved at the end of "
                                         f"an epoch \\(none in '{tmp_path}' yet: pre-training keeps "
                                         f"checkpoint-{{epoch}}.pth every --keep_every epochs\\), or start the run "
                                         f"over \\(--fresh\\)$"):
        engine.resume(state, last, model, optimizer, None, same, 16, engine.Dist(world_size=2))
    for epoch in (39, 9, 19):
        (tmp_path / f"checkpoint-{epoch}.pth").touch()
    # saved in epoch 0, the run has ended no epoch: these are another run's (--fresh keeps them), not to be named
    with pytest.raises(ValueError, match=f"an epoch \\(none in '{tmp_path}' yet: pre-training keeps"):
        engine.resume(state, last, model, optimizer, None, same, 16, engine.Dist(world_size=2))
    late = {**state, "step": 1600 * 16 + 5}  # saved in epoch 1600: epochs 0..1599 ended
    with pytest.raises(ValueError, match=f"at the end of an epoch \\(--resume {tmp_path / 'checkpoint-39.pth'} or an "
                                         f"earlier one \\(checkpoint-9.pth, checkpoint-19.pth\\)\\), or start"):
        engine.resume(late, last, model, optimizer, None, same, 16, engine.Dist(world_size=2))
    in_place = argparse.Namespace(**{**vars(same), "output_dir": str(tmp_path)})  # --resume auto: the run's own folder
    with pytest.raises(ValueError, match=f"\\(checkpoint-9.pth, checkpoint-19.pth\\) with --fresh, which continues "
                                         f"it in place of {engine.LAST}\\), or start"):  # else: "holds another run"
        engine.resume(late, last, model, optimizer, None, in_place, 16, engine.Dist(world_size=2))
    for epoch in range(59, 1600, 20):  # --keep_every 20 over 1600 epochs: the last few named, the fix still in view
        (tmp_path / f"checkpoint-{epoch}.pth").touch()
    (tmp_path / "checkpoint-1619.pth").touch()  # an older run's, past the epoch saved in
    (tmp_path / "checkpoint-1600.pth").touch()  # the epoch saved in: not ended either
    with pytest.raises(ValueError, match=f"\\(--resume {tmp_path / 'checkpoint-1599.pth'} or an earlier one "
                                         f"\\(checkpoint-1539.pth, checkpoint-1559.pth, checkpoint-1579.pth, and 77 "
                                         f"before them\\) with --fresh, which continues it in place of"):
        engine.resume(late, last, model, optimizer, None, in_place, 16, engine.Dist(world_size=2))
    half = argparse.Namespace(**{**vars(args), "batch_size": 16})
    assert engine.resume(state, "ck.pth", model, optimizer, None, half, 16, engine.Dist(world_size=2)) == 5
    accumulated = argparse.Namespace(**{**vars(args), "batch_size": 16, "accum_iter": 2})
    assert engine.resume(state, "ck.pth", model, optimizer, None, accumulated, 16, CPU) == 5
    state["step"] = 16  # the epoch boundary: another batch is fine
    other = argparse.Namespace(**{**vars(args), "batch_size": 31})
    assert engine.resume(state, "ck.pth", model, optimizer, None, other, 16, CPU) == 16
    assert "--batch_size 32 -> 31" in capsys.readouterr().out


def test_resume_says_when_the_training_set_changed_size(capsys):
    """An epoch's order is a permutation of all N images: resumed mid-epoch on N - 1 (an unreadable file deleted as
    advised) with the same steps per epoch, the rest of the epoch came from another permutation, silently (about a
    quarter of a half-done epoch twice, a quarter never)."""
    model = torch.nn.Linear(3, 2)
    args = argparse.Namespace(model="vit_tiny", lr=0.1, betas=(0.9, 0.98), output_dir="x", demo=False, batch_size=32,
                              accum_iter=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = engine.checkpoint_state("dtm_pretrain", model, optimizer, None, args, 5, 16, train_images=512)
    assert state["train_images"] == 512
    assert engine.resume(state, "ck.pth", model, optimizer, None, args, 16, CPU, train_images=512) == 5
    assert "training images" not in capsys.readouterr().out
    assert engine.resume(state, "ck.pth", model, optimizer, None, args, 16, CPU, train_images=511) == 5
    assert ("note: 'ck.pth' was saved with 512 training images, this run has 511: the rest of epoch 0 is drawn in "
            "the new set's order, so in that epoch some images come twice and others not at all"
            ) in capsys.readouterr().out
    state["step"] = 16  # at an epoch boundary: only the sizes
    assert engine.resume(state, "ck.pth", model, optimizer, None, args, 16, CPU, train_images=520) == 16
    out = capsys.readouterr().out
    assert "was saved with 512 training images, this run has 520\n" in out and "rest of epoch" not in out
    del state["train_images"]  # a checkpoint from before it was recorded: nothing to compare
    engine.resume(state, "ck.pth", model, optimizer, None, args, 16, CPU, train_images=520)
    assert "training images" not in capsys.readouterr().out


def test_every_split_of_the_samples_per_step_trains_on_the_same_samples_at_each_step():
    """What lets a mid-epoch restart change --batch_size x --accum_iter x processes if their product stays: the epoch's
    order is one permutation, rank r taking entries r, r + W, ..., so step s covers entries s * T .. (s + 1) * T - 1."""
    def steps(world, batch, accum, num_items=26, seed=3, epoch=2):
        per_rank = []
        for rank in range(world):
            sampler = engine.EpochSampler(num_items, rank, world, seed)
            sampler.set_epoch(epoch)
            per_rank.append([i for _, i in sampler])
        per_step = batch * accum
        return [sorted(i for r in per_rank for i in r[s * per_step:(s + 1) * per_step])
                for s in range(min(len(r) for r in per_rank) // per_step)]
    one = steps(1, 8, 1)
    for world, batch, accum in ((2, 4, 1), (2, 2, 2), (4, 2, 1), (1, 4, 2)):
        assert steps(world, batch, accum) == one[:len(steps(world, batch, accum))], (world, batch, accum)
    assert steps(1, 7, 1)[1] != one[1]  # another number of samples per step: another sample set


def test_the_init_a_refusal_asks_for_is_quoted_for_the_shell(tmp_path):
    """A fix to copy: an --init path with a space is printed in quotes (the shell would split it)."""
    model = torch.nn.Linear(3, 2)
    spaced = tmp_path / "my runs" / "pre.pth"
    args = argparse.Namespace(model="vit_tiny", lr=0.1, output_dir="x", demo=False, init=str(spaced))
    state = engine.checkpoint_state("dtm_finetune", model, torch.optim.AdamW(model.parameters()), None, args, 2,
                                    steps_per_epoch=2)
    other = argparse.Namespace(**{**vars(args), "init": str(tmp_path / "other.pth")})
    (tmp_path / "other.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"To continue that run pass --init '{spaced}' (the file")):
        engine.resume(state, "ck.pth", model, torch.optim.AdamW(model.parameters()), None, other, 2, CPU)


def test_resume_refuses_another_init_and_records_the_one_the_run_started_from(tmp_path, monkeypatch, capsys):
    model = torch.nn.Linear(3, 2)
    args = argparse.Namespace(model="vit_tiny", lr=0.1, output_dir="x", demo=False, init="none")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = engine.checkpoint_state("dtm_finetune", model, optimizer, None, args, 2, steps_per_epoch=2)
    monkeypatch.chdir(tmp_path)
    with_pre = argparse.Namespace(**{**vars(args), "init": "pre.pth"})
    with pytest.raises(FileNotFoundError, match="--init 'pre.pth': no such file; and 'ck.pth' continues a run started "
                                                "from --init none: to continue that run pass --init none$"):
        engine.resume(state, "ck.pth", model, optimizer, None, with_pre, 2, CPU)
    (tmp_path / "pre.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"started from --init none; --init pre.pth \(from here: .*pre.pth\) would be "
                                         r"ignored .* To continue that run pass --init none; to start a new run "
                                         r"from pre.pth add --fresh"):
        engine.resume(state, "ck.pth", model, optimizer, None, with_pre, 2, CPU)
    unset = argparse.Namespace(**{**vars(args), "init": None})  # a relaunch without --init continues the run
    assert engine.resume(state, "ck.pth", model, optimizer, None, unset, 2, CPU) == 2 and unset.init == "none"
    (tmp_path / "elsewhere").mkdir()
    relative = engine.checkpoint_state("dtm_finetune", model, optimizer, None,
                                       argparse.Namespace(**{**vars(args), "init": "pre.pth"}), 2, steps_per_epoch=2)
    monkeypatch.chdir(tmp_path / "elsewhere")  # a relaunch from another folder names the same file another way
    for spelled in (str(tmp_path / "pre.pth"), "../pre.pth", str(tmp_path / "." / "pre.pth")):
        again = argparse.Namespace(**{**vars(args), "init": spelled})
        assert engine.resume(relative, "ck.pth", model, optimizer, None, again, 2, CPU) == 2
    (tmp_path / "copy.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=f"To continue that run pass --init {tmp_path / 'pre.pth'} \\(the file is not "
                                         f"read again\\); to start a new run from ../copy.pth add --fresh"):
        engine.resume(relative, "ck.pth", model, optimizer, None,
                      argparse.Namespace(**{**vars(args), "init": "../copy.pth"}), 2, CPU)
    # resumed from another folder without --init, the next checkpoint still records the file the run started from
    unset = argparse.Namespace(**{**vars(args), "init": None})
    engine.resume(relative, "ck.pth", model, optimizer, None, unset, 2, CPU)
    resaved = engine.checkpoint_state("dtm_finetune", model, optimizer, None, unset, 2, steps_per_epoch=2)
    assert resaved["init_abspath"] == str(tmp_path / "pre.pth")
    # a checkpoint from before init_abspath, with a relative --init this folder cannot resolve: the given file is
    # taken as that one, with a note, and recorded absolutely (the refusal's hint would name a file that is not there)
    old = {**relative, "init_abspath": None}
    given = argparse.Namespace(**{**vars(args), "init": str(tmp_path / "pre.pth")})
    assert engine.resume(old, "ck.pth", model, optimizer, None, given, 2, CPU) == 2
    assert given.init == str(tmp_path / "pre.pth")
    with pytest.raises(ValueError, match="to start a new run from ../copy.pth leave out --resume ck.pth"):
        engine.resume(relative, "ck.pth", model, optimizer, None,  # --fresh would not start a new run here
                      argparse.Namespace(**{**vars(args), "init": "../copy.pth", "resume": "ck.pth"}), 2, CPU)
    with pytest.raises(ValueError, match="--init none would be ignored .* pass --init with that file's path from this "
                                         "folder \\(it records pre.pth relative to another one\\)"):  # not that file
        engine.resume(old, "ck.pth", model, optimizer, None, argparse.Namespace(**{**vars(args), "init": "none"}),
                      2, CPU)
    with pytest.raises(FileNotFoundError, match="--init 'missing.pth': no such file; .* to continue that run pass "
                                                "--init with that file's path from this folder"):
        engine.resume(old, "ck.pth", model, optimizer, None,
                      argparse.Namespace(**{**vars(args), "init": "missing.pth"}), 2, CPU)
    unset = argparse.Namespace(**{**vars(args), "init": None})  # not given: no path that would be a guess
    capsys.readouterr()
    engine.resume(old, "ck.pth", model, optimizer, None, unset, 2, CPU)
    assert "records --init pre.pth relative to a folder it does not record\n" in capsys.readouterr().out
    assert engine.checkpoint_state("dtm_finetune", model, optimizer, None, unset, 2, 2)["init_abspath"] is None


def test_resume_into_another_model_names_the_differences_and_the_changed_settings():
    state = tiny_state(torch.nn.Linear(3, 2))
    other = torch.nn.Sequential(torch.nn.Linear(4, 2))
    args = argparse.Namespace(model="vit_small", lr=0.1, betas=(0.9, 0.98), output_dir="x", demo=False)
    with pytest.raises(ValueError, match=r"^'ck.pth' was saved with other settings \(--model vit_tiny -> vit_small\) "
                                         r"and does not fit this model: resume with the settings it was saved with "
                                         r"\(missing: 0.weight, 0.bias; unexpected: weight, bias\), or to start "
                                         r"a new run with these settings add --fresh \(the old log is kept as "
                                         r"log.N.jsonl\) or pass another --output_dir$"):
        engine.resume(state, "ck.pth", other, torch.optim.AdamW(other.parameters()), None, args, 2, CPU)
    wider = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"shapes: weight \(2, 3\) saved, \(2, 4\) here\)"):
        engine.resume(state, "ck.pth", wider, torch.optim.AdamW(wider.parameters()), None, args, 2, CPU)
    same = argparse.Namespace(**{**vars(args), "model": "vit_tiny"})  # nothing changed: the model code did
    with pytest.raises(ValueError, match=r"^'ck.pth' does not fit this model \(shapes: .*\); none of the settings it "
                                         r"records changed"):
        engine.resume(state, "ck.pth", wider, torch.optim.AdamW(wider.parameters()), None, same, 2, CPU)


def test_wait_for_gpu_synchronizes_cuda_only(monkeypatch):
    """The trainers read the start of a save or evaluation (left out of img_per_s) after the GPU's queued step:
    without it, the step's kernels still running counted as saving time, and img_per_s read high."""
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    engine.wait_for_gpu(CPU)
    assert synced == []
    engine.wait_for_gpu(engine.Dist(device=torch.device("cuda", 1)))
    assert synced == [torch.device("cuda", 1)]


def test_resume_says_when_the_loss_scale_comes_or_goes(capsys):
    """--amp auto picks fp16 + GradScaler on a V100 and bf16 on newer GPUs: a run resumed on the other kind changed
    its precision without a word (the saved scale dropped, or a new one starting). From a mixed-precision review."""
    model = torch.nn.Linear(3, 2)
    without = tiny_state(model)
    args = argparse.Namespace(**without["args"])
    engine.resume(without, "ck.pth", model, torch.optim.AdamW(model.parameters()), torch.amp.GradScaler("cpu"), args,
                  2, CPU)
    assert capsys.readouterr().out.startswith("note: 'ck.pth' was saved without a loss scale (bf16 or fp32); this run "
                                              "is fp16: a new scale starts at 65536, and its first steps may overflow")
    with_scale = {**without, "scaler": torch.amp.GradScaler("cpu", init_scale=8.0).state_dict()}
    engine.resume(with_scale, "ck.pth", model, torch.optim.AdamW(model.parameters()), None, args, 2, CPU)
    assert capsys.readouterr().out.startswith("note: 'ck.pth' was saved with fp16's loss scale (GradScaler); this run "
                                              "has none (bf16 or fp32), so it is not used\n")
    engine.resume(without, "ck.pth", model, torch.optim.AdamW(model.parameters()), None, args, 2, CPU)
    assert "note" not in capsys.readouterr().out  # the same precision: nothing to say


def test_resume_does_not_call_a_path_written_another_way_a_changed_setting(tmp_path, monkeypatch, capsys):
    """--data imnet relaunched as --data /abs/imnet (or ./imnet/, or through a link) is the same folder: not listed
    as changed (it was: "settings changed since: --data /abs/imnet -> imnet"); another folder and --teacher's
    clip:/ckpt: path likewise."""
    monkeypatch.chdir(tmp_path)
    for folder in ("imnet", "other"):
        os.makedirs(folder)
    os.symlink(tmp_path / "imnet", tmp_path / "link")
    open("t.pth", "wb").close()
    model = torch.nn.Linear(3, 2)
    state = tiny_state(model)
    state["args"].update(data=str(tmp_path / "imnet"), teacher="clip:t.pth")
    args = argparse.Namespace(**{**state["args"], "data": "imnet", "teacher": f"clip:{tmp_path / 't.pth'}"})
    for data_path in ("imnet", "./imnet/", "link"):
        capsys.readouterr()
        engine.resume(state, "ck.pth", model, torch.optim.AdamW(model.parameters()), None,
                      argparse.Namespace(**{**vars(args), "data": data_path}), 2, CPU)
        assert capsys.readouterr().out == "resumed from ck.pth at step 3\n"
    for changed, shown in ((dict(data="other"), f"--data {tmp_path / 'imnet'} -> other"),
                           (dict(teacher="ckpt:t.pth"), "--teacher clip:t.pth -> ckpt:t.pth"),
                           (dict(model="vit_s"), "--model vit_tiny -> vit_s")):
        engine.resume(state, "ck.pth", model, torch.optim.AdamW(model.parameters()), None,
                      argparse.Namespace(**{**vars(args), **changed}), 2, CPU)
        assert capsys.readouterr().out == f"resumed from ck.pth at step 3; settings changed since: {shown}\n"


def test_resume_says_a_relative_path_relaunched_from_another_folder_names_other_files(tmp_path, monkeypatch, capsys):
    """A run launched in a/ with --data imnet --teacher ckpt:t.pth, relaunched by the same command from b/, read
    b/imnet and b/t.pth without a word: the saved and given words were equal. The checkpoint records the folder its
    run was launched in; the same files named from b/ are no change."""
    for folder in ("a", "b"):
        os.makedirs(tmp_path / folder / "imnet")
        (tmp_path / folder / "t.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "a")
    model = torch.nn.Linear(3, 2)
    state = tiny_state(model, data="imnet", teacher="ckpt:t.pth")
    assert state["cwd"] == os.getcwd()
    monkeypatch.chdir(tmp_path / "b")

    def relaunch(**given):
        args = argparse.Namespace(**{**state["args"], **given})
        engine.resume(state, "ck.pth", model, torch.optim.AdamW(model.parameters()), None, args, 2, CPU)
        return capsys.readouterr().out

    a = os.path.join(state["cwd"], "")
    assert relaunch() == (f"resumed from ck.pth at step 3; settings changed since: --data {a}imnet -> imnet, "
                          f"--teacher ckpt:{a}t.pth -> ckpt:t.pth\n")
    assert relaunch(data="../a/imnet/", teacher=f"ckpt:{a}t.pth") == "resumed from ck.pth at step 3\n"
    monkeypatch.chdir(tmp_path / "a")
    assert relaunch() == "resumed from ck.pth at step 3\n"  # where it was launched: as before
    state["args"]["teacher"] = "pixels"  # no path: the same from any folder
    monkeypatch.chdir(tmp_path / "b")
    assert relaunch(data=f"{a}imnet") == "resumed from ck.pth at step 3\n"


def test_a_run_whose_launch_folder_was_removed_saves_and_resumes(tmp_path, monkeypatch, capsys):
    """A clean-up job removed the folder a run was launched in (its paths absolute, so it read and wrote on): since
    checkpoints record cwd, os.getcwd() failed there and every save stopped with a bare [Errno 2]. cwd is null then,
    and a resume takes the saved paths as they are."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(model="vit_tiny", lr=0.1, output_dir=str(tmp_path), data=str(tmp_path / "imnet"))
    (tmp_path / "launch").mkdir()
    monkeypatch.chdir(tmp_path / "launch")
    os.rmdir(tmp_path / "launch")
    engine.save_checkpoint(str(tmp_path / engine.LAST),
                           engine.checkpoint_state("dtm_pretrain", model, optimizer, None, args, 3, steps_per_epoch=2))
    state = torch.load(tmp_path / engine.LAST)
    assert state["cwd"] is None and state["step"] == 3
    engine.resume(state, "ck.pth", model, optimizer, None, argparse.Namespace(**state["args"]), 2, CPU)
    assert capsys.readouterr().out == "resumed from ck.pth at step 3\n"


def pasted(words: str) -> list:
    """The arguments bash makes of words pasted into a command line."""
    printed = subprocess.run(["bash", "-c", f"printf '%s\\0' {words}"], capture_output=True, check=True).stdout
    return printed.decode().split("\0")[:-1]


def test_the_paths_that_a_printed_fix_names_paste_into_a_shell_as_one_word(tmp_path, capsys):
    """Folders named as researchers name them: the fixes printed --output_dir my runs $HOME ... unquoted, which a
    shell splits into words and expands $HOME in."""
    folder = tmp_path / "my runs $HOME 'q' é日本"
    folder.mkdir()
    (folder / engine.LAST).write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as refused:
        engine.prepare_run(run_args(tmp_path / "new", resume=str(folder)), CPU)
    fixes = re.search(r"checkpoint file \((.*)\), or --output_dir (.*) without --resume", str(refused.value))
    assert pasted(fixes[1]) == [str(folder / engine.LAST)] and pasted(fixes[2]) == [str(folder)]
    (folder / engine.LAST).unlink()
    (folder / "checkpoint-19.pth").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as refused:
        engine.prepare_run(run_args(tmp_path / "new", resume=str(folder)), CPU)
    assert pasted(re.search(r"e\.g\. (.*)$", str(refused.value))[1]) == [str(folder / "checkpoint-19.pth")]
    with pytest.raises(ValueError) as refused:
        dtm.check_checkpoint_file(str(folder), "--init")
    assert pasted(re.search(r"e\.g\. (.*)$", str(refused.value))[1]) == [str(folder / "checkpoint-19.pth")]
    with pytest.raises(ValueError) as refused:
        dtm.load_clip_visual(str(folder))
    assert pasted(re.search(r"e\.g\. (.*)$", str(refused.value))[1]) == [str(folder / "checkpoint-19.pth")]
    model = torch.nn.Linear(3, 2)  # a checkpoint saved mid-epoch, resumed with other samples per step
    args = argparse.Namespace(model="vit_tiny", lr=0.1, betas=(0.9, 0.98), output_dir="x", demo=False, batch_size=32,
                              accum_iter=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = engine.checkpoint_state("dtm_pretrain", model, optimizer, None, args, 20 * 16 + 5, steps_per_epoch=16)
    with pytest.raises(ValueError) as refused:
        engine.resume(state, str(folder / engine.LAST), model, optimizer, None, args, 16, engine.Dist(world_size=2))
    fix = re.search(r"at the end of an epoch \(--resume (.*)\), or start", str(refused.value))[1]
    assert pasted(fix) == [str(folder / "checkpoint-19.pth")]


def test_resume_notes_only_a_requeued_resume_path_that_continues_its_own_folders_run(tmp_path, capsys):
    """The note "continuing <output_dir's checkpoint>, the run this command started there from --resume PATH" is for a
    requeued --resume PATH command only: not for --resume auto (which names no PATH), nor for PATH itself continued."""
    model = torch.nn.Linear(3, 2)
    state, last, start = tiny_state(model), str(tmp_path / engine.LAST), str(tmp_path / "start.pth")
    (tmp_path / "start.pth").touch()
    for path, given in ((last, "auto"), (start, start), (last, start)):
        engine.resume(state, path, model, torch.optim.AdamW(model.parameters()), None,
                      argparse.Namespace(**{**state["args"], "resume": given}), 2, CPU)
        note = (f"note: continuing {last}, the run this command started there from --resume {start} (to start again "
                f"from {start}, add --fresh)\n") if path == last and given == start else ""
        assert capsys.readouterr().out == f"{note}resumed from {path} at step 3\n"
    (tmp_path / "start.pth").unlink()  # gone since: --fresh would fail on it, so it is not the fix named
    engine.resume(state, last, model, torch.optim.AdamW(model.parameters()), None,
                  argparse.Namespace(**{**state["args"], "resume": start}), 2, CPU)
    assert capsys.readouterr().out == (f"note: continuing {last}, the run this command started there from --resume "
                                       f"{start} ({start} is gone since: --fresh cannot start again from it)\n"
                                       f"resumed from {last} at step 3\n")


def test_resume_keeps_each_parameters_moments_under_this_runs_group_settings():
    """A --layer_decay / --weight_decay changed on resume is used (not the saved groups'), also when it changes the
    number of parameter groups; each parameter keeps its own Adam moments."""
    torch.manual_seed(0)
    model = dtm.build_vit("vit_tiny", img_size=32, depth=2)
    args = argparse.Namespace(model="vit_tiny", lr=0.1, output_dir="x", demo=False)

    def adamw(weight_decay, layer_decay):
        return torch.optim.AdamW(engine.param_groups(model, weight_decay, engine.layer_decay_fn(2, layer_decay)))

    optimizer = adamw(0.05, 0.6)
    model.forward_features(torch.randn(2, 3, 32, 32)).tokens.square().mean().backward()
    optimizer.step()
    state = engine.checkpoint_state("dtm_finetune", model, optimizer, None, args, 4, steps_per_epoch=2)
    moments = {name: optimizer.state[p]["exp_avg"].clone()
               for name, p in model.named_parameters() if p in optimizer.state}
    assert len(moments) > 10
    for layer_decay in (0.75, 1.0):  # 1.0: all scales equal, fewer groups than saved
        resumed = adamw(0.1, layer_decay)
        engine.resume(state, "ck.pth", model, resumed, None, args, 2, CPU)
        fresh = adamw(0.1, layer_decay).param_groups
        assert [(g["weight_decay"], g["lr_scale"], g["param_names"]) for g in resumed.param_groups] == \
               [(g["weight_decay"], g["lr_scale"], g["param_names"]) for g in fresh]
        for name, p in model.named_parameters():
            if name in moments:
                assert torch.equal(resumed.state[p]["exp_avg"], moments[name])
            else:
                assert p not in resumed.state
    frozen = adamw(0.1, 0.6)
    frozen.param_groups[0]["param_names"][0] = "renamed"
    with pytest.raises(ValueError, match="for other parameters than this run trains"):
        engine.resume(state, "ck.pth", model, frozen, None, args, 2, CPU)


# ---------------------------------------------------------------------------------------------------
# the run folder and its log

def run_files(folder) -> list:
    """The files a run wrote in folder, without the lock its rank 0 holds while it runs (engine.RUN_LOCK)."""
    return sorted(name for name in os.listdir(folder) if name != engine.RUN_LOCK)


def run_args(out, resume="auto", fresh=False):
    return argparse.Namespace(output_dir=str(out), resume=resume, fresh=fresh)


def test_an_output_dir_that_cannot_be_written_is_refused_at_start_up(tmp_path, monkeypatch):
    """It failed at the first log line (50 steps in) or, for a folder to make under a read-only one, with a traceback.
    open_log (rank 0, once the run's data and model are ready) writes the run's files first."""
    read_only, real_open = tmp_path / "ro", open
    read_only.mkdir()

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(read_only)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    for out in (read_only, read_only / "sub"):
        with pytest.raises(ValueError, match=f"--output_dir '{out}' cannot be written to \\(Permission denied\\): "
                                             f"pass a folder you can write to"):
            engine.open_log(str(out), None, True)
    monkeypatch.undo()
    engine.open_log(str(read_only / "sub"), None, True)
    assert run_files(read_only / "sub") == [engine.LOG]  # made at start-up, empty until the first line
    engine.open_log(str(read_only / "sub"), None, True)  # a new run where one logged nothing: no log.1.jsonl
    assert run_files(read_only / "sub") == [engine.LOG]


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".run.lock"), os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if sys.argv[2:] == ["try"] else 0))
os.write(fd, b"process 4242 on node7")
print("held", flush=True)
time.sleep(60)
"""


def lock_taken_by_another_process(out) -> bool:
    """Whether a new process can lock out's run lock right now."""
    probe = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), "try"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    held = probe.stdout.readline().strip() == "held"
    probe.kill()
    probe.wait()
    return held


@pytest.mark.skipif(engine.fcntl is None, reason="lockf is POSIX")
def test_a_second_run_into_an_output_dir_in_use_is_refused_before_it_reads_anything(tmp_path):
    """Two runs launched into one folder (torchrun picks free ports on one node, so nothing else clashes): the second
    continued the first one's checkpoint and both wrote over each other's checkpoints and log, exit 0 (a cluster
    walkthrough). Rank 0 holds a POSIX lock on output_dir/.run.lock while it runs; the kernel drops it when the
    holder ends, however it ends, so a relaunch after a crash is not refused."""
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"kind": "dtm_pretrain"}, out / engine.LAST)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for call in (lambda: engine.prepare_run(run_args(out), CPU),
                     lambda: engine.open_log(str(out), None, True)):  # a folder that did not exist at prepare_run
            with pytest.raises(ValueError, match=f"^--output_dir '{out}' is in use by another run \\(process 4242 on "
                                                 f"node7\\), which writes its checkpoints and log there: wait for it "
                                                 f"to end, or pass another --output_dir \\(if no run uses it, .*"
                                                 f"remove {out / engine.RUN_LOCK}\\)$"):
                call()
        assert run_files(out) == [engine.LAST]  # nothing read or written: no log made, the checkpoint kept
    finally:
        holder.kill()
        holder.wait()
    assert engine.prepare_run(run_args(out), CPU) == (str(out / engine.LAST), True)  # the holder is gone (killed)
    assert engine.prepare_run(run_args(out), CPU)[1]  # this process holds it already: no conflict with itself
    assert not lock_taken_by_another_process(out)
    # a forked child (a DataLoader worker) does not hold it: a failed run whose workers live on (its traceback kept,
    # as a notebook keeps it) or outlive a killed trainer for a few seconds kept an flock held
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()
    try:
        engine.teardown()  # the trainers' end, however they end: lets go
        assert lock_taken_by_another_process(out)
    finally:
        child.kill()
        child.join()


@pytest.mark.skipif(engine.fcntl is None, reason="lockf is POSIX")
def test_two_processes_locking_one_output_dir_with_engines_own_lock_refuse_the_second(tmp_path):
    """Both sides run lock_output_dir (the tests above hold the lock with raw fcntl): were its lock shared, as
    for a file this user cannot write, two runs would both go ahead."""
    out = tmp_path / "run"
    out.mkdir()
    hold = (f"import sys, time; sys.path.insert(0, {HERE!r}); import engine; "
            f"print(repr(engine.lock_output_dir({str(out)!r})), flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "None"
        refusal = engine.lock_output_dir(str(out))
        assert refusal is not None and f"is in use by another run (process {holder.pid} on " in refusal
    finally:
        engine.release_output_dirs()
        holder.kill()
        holder.wait()


@pytest.mark.skipif(engine.fcntl is None, reason="lockf is POSIX")
def test_teardown_lets_go_of_the_run_lock_when_ctrl_c_stops_the_workers_join(tmp_path, monkeypatch):
    """A Ctrl-C while teardown joined the DataLoader workers (stop_loader_workers, first) skipped the rest of it: a
    process that lives on (a notebook, a sweep) held the run lock, and a relaunch from a shell was refused as "in use
    by another run" until that process ended."""
    out = tmp_path / "run"
    out.mkdir()
    assert engine.lock_output_dir(str(out)) is None

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "stop_loader_workers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.teardown()
    take = f"import sys; sys.path.insert(0, {HERE!r}); import engine; print(repr(engine.lock_output_dir({str(out)!r})))"
    other = subprocess.run([sys.executable, "-c", take], capture_output=True, text=True, timeout=120)
    assert other.stdout.strip() == "None", other.stdout + other.stderr


@pytest.mark.skipif(engine.fcntl is None, reason="lockf is POSIX")
def test_a_lock_file_this_user_cannot_write_is_locked_shared_not_skipped(tmp_path, monkeypatch):
    """In a group folder another user's .run.lock (made with the umask's mode, as the checkpoints; it was 0o644) may
    be read-only here: the check was skipped, and a second user's run wrote over the first one's. A shared lock
    through a read-only descriptor: refused by the holder's exclusive lock, and refusing another run's."""
    out = tmp_path / "run"
    out.mkdir()
    real_open = os.open

    def no_write(path, flags, *args):  # as a user without write permission on the file (root passes any check)
        if str(path).endswith(engine.RUN_LOCK) and flags & os.O_RDWR and (out / engine.RUN_LOCK).exists():
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(engine.os, "open", no_write)
        with pytest.raises(ValueError, match="is in use by another run \\(process 4242 on node7\\)"):
            engine.prepare_run(run_args(out), CPU)
    finally:
        holder.kill()
        holder.wait()
    assert engine.prepare_run(run_args(out), CPU) == (None, False)  # held shared now
    assert not lock_taken_by_another_process(out)
    engine.teardown()
    assert lock_taken_by_another_process(out)


@pytest.mark.skipif(engine.fcntl is None or not os.path.isdir("/proc/self/fd"), reason="lockf; Linux's fd list")
def test_locking_a_folder_this_process_holds_opens_nothing_and_names_this_process_alone(tmp_path):
    """prepare_run and open_log both lock the run's folder: the second call opens no second descriptor (each run of a
    sweep in one process kept one more open), and the lock file names this process alone, not the tail of a longer
    holder's line left from an earlier run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / engine.RUN_LOCK).write_text("process 123456789 on a-much-longer-host-name-of-another-node\n")
    before = len(os.listdir("/proc/self/fd"))
    assert engine.lock_output_dir(str(out)) is None and engine.lock_output_dir(str(out)) is None
    assert len(os.listdir("/proc/self/fd")) == before + 1
    assert (out / engine.RUN_LOCK).read_text() == f"process {os.getpid()} on {socket.gethostname()}\n"
    engine.release_output_dirs()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_checkpoint_another_run_wrote_after_this_new_run_started_is_not_removed(tmp_path):
    """Run B found no folder (a new run), run A made it, saved and ended before B opened its log: B removed A's
    checkpoint as if --fresh had been given (a race the run lock cannot close: the folder did not exist to lock)."""
    out = tmp_path / "run"
    assert engine.prepare_run(run_args(out), CPU) == (None, False)  # B: a new run
    out.mkdir()
    torch.save({"kind": "dtm_pretrain"}, out / engine.LAST)  # A's, meanwhile
    with pytest.raises(ValueError, match=f"holds a {engine.LAST} that another run wrote after this one started: pass "
                                         f"another --output_dir, or relaunch without --fresh to continue that run, or "
                                         f"with it to replace that run$"):
        engine.open_log(str(out), None, True)
    assert (out / engine.LAST).exists()
    engine.teardown()
    (out / engine.LAST).rename(tmp_path / "other.pth")  # B continues another folder's checkpoint: no relaunch fits
    assert engine.prepare_run(run_args(out, resume=str(tmp_path / "other.pth")), CPU) == (str(tmp_path / "other.pth"),
                                                                                            False)
    torch.save({"kind": "dtm_pretrain"}, out / engine.LAST)
    with pytest.raises(ValueError, match="another run wrote after this one started: pass another --output_dir, or "
                                         "relaunch with --fresh to replace that run$"):
        engine.open_log(str(out), None, True)
    engine.teardown()
    assert engine.prepare_run(run_args(out, fresh=True), CPU) == (None, False)  # --fresh: replaces it, as before
    engine.open_log(str(out), None, True)
    assert not (out / engine.LAST).exists()
    engine.teardown()


def test_prepare_run_rules(tmp_path):
    out = tmp_path / "run"
    assert engine.prepare_run(run_args(out), CPU) == (None, False)  # nothing there: a new run
    out.mkdir()
    (out / engine.LAST).write_bytes(b"x")
    (out / "checkpoint-last.pth.tmp4242").write_bytes(b"half a file")
    (out / f"{engine.LOG}.tmp").write_bytes(b"")  # the cut log's, when a disk was full at a relaunch
    assert engine.prepare_run(run_args(out), CPU) == (str(out / engine.LAST), True)  # relaunch: continue
    assert run_files(out) == [engine.LAST]  # an interrupted save's leftovers are removed
    assert engine.prepare_run(run_args(out, resume=str(out / engine.LAST), fresh=True), CPU) == \
        (str(out / engine.LAST), True)  # --fresh does not remove the checkpoint it is asked to continue
    # --fresh: a new run, whose log opening removes the old run's checkpoint (after the model is built, so a wrong
    # --init leaves the old run in place), so a relaunch without --fresh after a crash before the new run's first
    # save does not continue the old run
    assert engine.prepare_run(run_args(out, fresh=True), CPU) == (None, False) and (out / engine.LAST).exists()
    engine.open_log(str(out), None, False)  # ranks other than 0 remove nothing
    assert (out / engine.LAST).exists()
    engine.open_log(str(out), None, True)
    assert not (out / engine.LAST).exists() and engine.prepare_run(run_args(out), CPU) == (None, False)
    (out / engine.LAST).write_bytes(b"x")
    other = tmp_path / "other.pth"
    other.write_bytes(b"y")
    with pytest.raises(ValueError, match="holds another run.*--fresh"):
        engine.prepare_run(run_args(out, resume=str(other)), CPU)
    with pytest.raises(FileNotFoundError, match=r"^--resume '.*typo.pth': no such file; pass a checkpoint file \(a "
                                                r"run's checkpoint-last.pth in its --output_dir\), or leave --resume "
                                                r"out to continue the run in --output_dir$"):  # a typo removes nothing
        engine.prepare_run(run_args(out, resume=str(tmp_path / "typo.pth"), fresh=True), CPU)
    assert (out / engine.LAST).exists()
    with pytest.raises(FileNotFoundError, match=f"--resume '{out}' is a folder; pass a checkpoint file "
                                                f"\\({out / engine.LAST}\\), or --output_dir {out} without --resume "
                                                f"to continue"):
        engine.prepare_run(run_args(tmp_path / "new", resume=str(out)), CPU)  # the run's folder, not its file
    assert engine.prepare_run(run_args(out, resume=str(other), fresh=True), CPU) == (str(other), False)
    engine.open_log(str(out), {"step": 0}, True)  # a resumed run's log: the checkpoint stays
    assert (out / engine.LAST).exists()
    (out / engine.LOG).write_text('{"step": 1}\n')
    engine.open_log(str(out), None, True, finished=True)(step=2)  # another folder's finished run: nothing to do
    assert (out / engine.LAST).exists() and (out / engine.LOG).read_text() == '{"step": 1}\n'
    engine.open_log(str(out), None, True)  # continuing another folder's run is a new log here: it goes
    assert not (out / engine.LAST).exists()
    assert engine.prepare_run(run_args(tmp_path / "new", resume=str(other)), CPU) == (str(other), False)
    with pytest.raises(FileNotFoundError, match="--resume"):
        engine.prepare_run(run_args(out, resume=str(tmp_path / "nope.pth")), CPU)


def test_a_resume_folder_that_holds_no_run_names_a_checkpoint_it_holds(tmp_path):
    """--resume FOLDER offered FOLDER/checkpoint-last.pth and --output_dir FOLDER as fixes also where that file is not
    there (another folder than the run's): the first failed as "no such file", the second started a new run there
    without a word. Such a folder gets a checkpoint it holds, or is said to hold none; the fix as given works."""
    folder = tmp_path / "epochs"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"is a folder that holds no run \(checkpoint-last.pth\); pass a "
                                                r"checkpoint file \(it holds no .pth file\)$"):
        engine.prepare_run(run_args(tmp_path / "new", resume=str(folder)), CPU)
    for name in ("checkpoint-19.pth", "checkpoint-5.pth", "checkpoint-best.pth", "other.pth"):  # the newest epoch's
        (folder / name).write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=f"pass a checkpoint file, e.g. {folder / 'checkpoint-19.pth'}$"):
        engine.prepare_run(run_args(tmp_path / "new", resume=str(folder)), CPU)
    resume = str(folder / "checkpoint-19.pth")
    assert engine.prepare_run(run_args(tmp_path / "new", resume=resume), CPU) == (resume, False)


def test_a_resume_folder_names_a_runs_pth_file_only(tmp_path):
    """--resume FOLDER without a run names a .pth file it holds: a log is no checkpoint, and a run's
    checkpoint-best.pth comes before other .pth files (even one named like an epoch's: only the run's own names)."""
    folder = tmp_path / "epochs"
    folder.mkdir()
    (folder / "log.jsonl").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"pass a checkpoint file \(it holds no .pth file\)$"):
        engine.prepare_run(run_args(tmp_path / "new", resume=str(folder)), CPU)
    for name in ("checkpoint-best.pth", "teacher-checkpoint-800.pth"):  # one .pth file, then another beside it
        (folder / name).write_bytes(b"x")
        with pytest.raises(FileNotFoundError, match=f"pass a checkpoint file, e.g. {folder / 'checkpoint-best.pth'}$"):
            engine.prepare_run(run_args(tmp_path / "new", resume=str(folder)), CPU)


def test_a_checkpoint_that_does_not_fit_names_the_init_a_new_run_needs():
    """A fine-tuning run relaunched with a setting that changes the model is told how to start a new run; such a run
    needs --init, which a relaunch may have left out: the hint says so (as the trainers' other new-run hints)."""
    args = argparse.Namespace(model="vit_tiny", lr=0.1, output_dir="x", demo=False, init="none")
    state = engine.checkpoint_state("dtm_finetune", torch.nn.Linear(3, 2), torch.optim.AdamW(
        torch.nn.Linear(3, 2).parameters()), None, args, 2, steps_per_epoch=2)
    model, relaunch = torch.nn.Linear(4, 2), argparse.Namespace(**{**vars(args), "model": "vit_small"})
    with pytest.raises(ValueError, match=r"\(--model vit_tiny -> vit_small\) and does not fit this model: .*, or to "
                                         r"start a new run with these settings add --fresh \(.*\) or pass another "
                                         r"--output_dir \(a new run needs --init PATH or --init none\)$"):
        engine.resume(state, "ck.pth", model, torch.optim.AdamW(model.parameters()), None, relaunch, 2, CPU)


def test_a_folders_run_launched_with_the_same_resume_path_is_continued(tmp_path, monkeypatch, capsys):
    """--resume PATH into a folder whose run that same --resume PATH started (a requeued job's command): continued.
    Another PATH, a run continued with --resume auto since, or a file that is no checkpoint: refused as before."""
    out, start, other = tmp_path / "run", tmp_path / "start.pth", tmp_path / "other.pth"
    out.mkdir()
    start.write_bytes(b"y")
    other.write_bytes(b"z")
    layer = torch.nn.Linear(2, 2)
    state = engine.checkpoint_state("dtm_pretrain", layer, torch.optim.SGD(layer.parameters(), 1), None,
                                    run_args(out, resume=str(start)), 1, 1)
    assert state["resume_abspath"] == str(start)
    for recorded, continued in ((state, True), ({**state, "resume_abspath": str(other)}, False),
                                ({**state, "resume_abspath": None, "args": {"resume": "auto"}}, False)):
        torch.save(recorded, out / engine.LAST)
        if continued:
            assert engine.prepare_run(run_args(out, resume=str(start)), CPU) == (str(out / engine.LAST), True)
        else:
            with pytest.raises(ValueError, match=r"holds another run .* --fresh to replace that run \(or, to "
                                                 r"continue the run there, --resume auto\)"):
                engine.prepare_run(run_args(out, resume=str(start)), CPU)
        engine.teardown()
    torch.save(state, out / engine.LAST)
    start.unlink()  # PATH gone since (a scratch copy purged): the folder's run is what the command continues
    assert engine.prepare_run(run_args(out, resume=str(start)), CPU) == (str(out / engine.LAST), True)
    engine.teardown()
    start.write_bytes(b"y")
    assert engine.prepare_run(run_args(out, resume=str(start), fresh=True), CPU) == (str(start), False)  # again
    engine.teardown()
    monkeypatch.chdir(tmp_path)  # a checkpoint from before resume_abspath: --resume as given, from the same folder
    torch.save({**state, "resume_abspath": None, "args": {"resume": "start.pth"}}, out / engine.LAST)
    assert engine.prepare_run(run_args(out, resume="start.pth"), CPU) == (str(out / engine.LAST), True)
    engine.teardown()
    (out / engine.LAST).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="holds another run"):
        engine.prepare_run(run_args(out, resume=str(start)), CPU)
    engine.teardown()
    assert engine.prepare_run(run_args(out, resume=str(start), fresh=True), CPU) == (str(start), False)


def test_a_run_launched_with_resume_auto_is_not_one_launched_with_a_file_named_auto(tmp_path, monkeypatch):
    """--resume ./auto (a checkpoint file named auto) into a folder whose run was launched with --resume auto is
    another run's checkpoint, refused as any other PATH: not that command relaunched, whose run it would continue."""
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"args": {"resume": "auto", "output_dir": str(out)}, "resume_abspath": None}, out / engine.LAST)
    torch.save({}, tmp_path / "auto")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="holds another run"):
        engine.prepare_run(run_args(out, resume="./auto"), CPU)


def test_a_relative_resume_path_is_recorded_as_the_file_it_named(tmp_path, monkeypatch):
    """`--resume start.pth` is recorded from the folder it was given in: the requeued command, relaunched from another
    working directory (with PATH written absolute, or gone since), still continues its run. Recorded as given, it named
    a file in the relaunch's folder, and the command was refused as another run."""
    out, start = tmp_path / "run", tmp_path / "start.pth"
    out.mkdir()
    start.write_bytes(b"y")
    layer = torch.nn.Linear(2, 2)
    monkeypatch.chdir(tmp_path)
    state = engine.checkpoint_state("dtm_pretrain", layer, torch.optim.SGD(layer.parameters(), 1), None,
                                    run_args(out, resume="start.pth"), 1, 1)
    torch.save(state, out / engine.LAST)
    monkeypatch.chdir(out)
    assert engine.prepare_run(run_args(out, resume=str(start)), CPU) == (str(out / engine.LAST), True)
    engine.teardown()
    start.unlink()
    assert engine.prepare_run(run_args(out, resume=str(start)), CPU) == (str(out / engine.LAST), True)


def test_a_requeued_resume_path_continues_its_run_after_the_folders_moved(tmp_path, monkeypatch):
    """The folder of a --resume PATH and of the run it started moved together: the same command relaunched at the new
    place, relative or absolute, continues the run (it was refused as another run); another PATH still is."""
    (tmp_path / "tree" / "run").mkdir(parents=True)
    (tmp_path / "tree" / "start.pth").write_bytes(b"y")
    monkeypatch.chdir(tmp_path / "tree")
    layer = torch.nn.Linear(2, 2)
    state = engine.checkpoint_state("dtm_pretrain", layer, torch.optim.SGD(layer.parameters(), 1), None,
                                    run_args("run", resume="start.pth"), 1, 1)
    torch.save(state, tmp_path / "tree" / "run" / engine.LAST)
    (tmp_path / "tree").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    (tmp_path / "moved" / "other.pth").write_bytes(b"z")
    for out, start in (("run", "start.pth"), (str(tmp_path / "moved" / "run"), str(tmp_path / "moved" / "start.pth"))):
        assert engine.prepare_run(run_args(out, resume=start), CPU) == (os.path.join(out, engine.LAST), True)
        engine.teardown()
    with pytest.raises(ValueError, match="holds another run"):
        engine.prepare_run(run_args("run", resume="other.pth"), CPU)
    engine.teardown()


def test_a_log_window_saved_in_micro_batches_is_read_in_steps():
    """Checkpoints saved before log_window_per_step summed the micro-batches since the last log line: divided by
    their --accum_iter they are the steps' means and the count of steps, as the trainers now sum."""
    old = {"args": {"accum_iter": 3}, "log_window": {"names": ["loss"], "sums": torch.tensor([6.0]), "count": 6}}
    window = engine.log_window_per_step(old)
    assert window["names"] == ["loss"] and window["sums"].tolist() == [2.0] and window["count"] == 2
    old_seg = {"args": {"accum_iter": 2}, "log_window": torch.tensor([4.0, 3.0, 2.5, 4.0])}
    assert engine.log_window_per_step(old_seg).tolist() == [2.0, 1.5, 1.25, 2.0]
    for new in ({**old, "log_window_per_step": True}, {**old_seg, "log_window_per_step": True}):
        assert engine.log_window_per_step(new) is new["log_window"]
    assert engine.log_window_per_step({"args": {"accum_iter": 3}}) is None


def test_the_printed_way_to_start_a_new_run_is_one_prepare_run_accepts(tmp_path, capsys):
    """new_run_hint (printed by resume's --init refusal, the fine-tuning demo, a finished run): applying it starts a
    new run. --fresh alone does not while --resume PATH names a checkpoint (it once suggested just that)."""
    out, other = tmp_path / "run", tmp_path / "other.pth"
    out.mkdir()
    other.write_bytes(b"y")
    cases = {"add --fresh": run_args(out),  # a relaunch (--resume auto) of the run in out
             f"leave out --resume {out / engine.LAST} and either add --fresh":
                 run_args(out, resume=str(out / engine.LAST)),
             f"leave out --resume {other}": run_args(out, resume=str(other), fresh=True)}
    for hint, args in cases.items():
        (out / engine.LAST).write_bytes(b"x")
        resumed, _ = engine.prepare_run(args, CPU)
        assert resumed is not None and engine.new_run_hint(args, resumed).startswith(hint), hint
        fixed = argparse.Namespace(**{**vars(args), "fresh": args.fresh or "add --fresh" in hint,
                                      "resume": "auto" if "leave out --resume" in hint else args.resume})
        assert engine.prepare_run(fixed, CPU) == (None, False), hint
        engine.say_finished(args, resumed, 3, 3, "--epochs", CPU)
        where = out if args.resume == "auto" else repr(resumed)
        assert capsys.readouterr().out == (f"{where} holds a finished run (step 3 of 3): nothing to do; raise --epochs "
                                           f"to train on (the lr schedule is then stretched over the new length: the "
                                           f"lr goes back up), or {engine.new_run_hint(args, resumed)} to start "
                                           f"over\n")
    engine.say_finished(args, resumed, 18, 12, "--epochs", CPU)  # relaunched with a smaller --epochs
    assert "holds a finished run (step 18, past this run's 12): nothing to do" in capsys.readouterr().out
    engine.say_finished(argparse.Namespace(**vars(args), init="a.pth"), resumed, 3, 3, "--epochs", CPU)
    assert capsys.readouterr().out.endswith("to start over (a new run needs --init PATH or --init none)\n")
    engine.say_finished(argparse.Namespace(**vars(args), init="a.pth", demo=True), resumed, 3, 3, "--epochs", CPU)
    assert capsys.readouterr().out.endswith("to start over\n")  # the demo picks a new run's --init
    # resume's refusal of another --init that is a file this folder's runs write: a new run here would refuse it too
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    saved = argparse.Namespace(init="none", output_dir=str(out), resume="auto", fresh=False)
    state = engine.checkpoint_state("dtm_finetune", model, optimizer, None, saved, 2, steps_per_epoch=2)
    (out / engine.BEST).write_bytes(b"z")
    given = argparse.Namespace(**{**vars(saved), "init": str(out / engine.BEST)})
    with pytest.raises(ValueError, match="to start a new run from .*checkpoint-best.pth pass another --output_dir"):
        engine.resume(state, str(out / engine.LAST), model, optimizer, None, given, 2, CPU)
    # with --resume PATH: leave it out
    by_path = argparse.Namespace(**{**vars(given), "resume": str(out / engine.LAST)})
    with pytest.raises(ValueError, match=f"checkpoint-best.pth leave out --resume {out / engine.LAST} and pass another "
                                         f"--output_dir"):
        engine.resume(state, str(out / engine.LAST), model, optimizer, None, by_path, 2, CPU)
    elsewhere = argparse.Namespace(**{**vars(by_path), "resume": "auto", "output_dir": str(tmp_path / "b")})
    # that fix, applied
    assert engine.prepare_run(elsewhere, CPU, new_run_reads={"--init": given.init}) == (None, False)
    with pytest.raises(ValueError, match="is a checkpoint that this run writes"):  # where "add --fresh" would lead
        engine.prepare_run(argparse.Namespace(**{**vars(given), "fresh": True}), CPU,
                           new_run_reads={"--init": given.init})


def test_log_new_run_keeps_the_old_one_and_resume_drops_lines_after_the_checkpoint(tmp_path, capsys):
    log = engine.open_log(str(tmp_path), None, True)
    for step in (1, 2, 3, 4):
        log(step=step, loss=torch.tensor(0.5 / step))
    log(step=4, skipped_image="a.jpg")
    engine.open_log(str(tmp_path), None, False)(step=9)  # ranks other than 0 write nothing
    log = engine.open_log(str(tmp_path), {"step": 2}, True)  # resumed from a checkpoint of step 2 (no log_lines)
    assert log.lines == 2
    log(step=3, loss=0.1)
    lines = [json.loads(line) for line in open(tmp_path / engine.LOG)]
    assert [r["step"] for r in lines] == [1, 2, 3] and lines[0]["loss"] == 0.5 and lines[2]["loss"] == 0.1
    assert log.lines == 3
    # steps renumbered by another batch size (epoch 0 in steps of 3 per epoch, then 6 per epoch): the checkpoint's
    # log_lines, not its step, says where to cut; lines 4 and 5 were written after it by a run that then died
    for step in (4, 5):
        log(step=step, loss=0.2)
    log = engine.open_log(str(tmp_path), {"step": 99, "log_lines": 3}, True)
    assert [json.loads(line)["step"] for line in open(tmp_path / engine.LOG)] == [1, 2, 3] and log.lines == 3
    engine.open_log(str(tmp_path), {"step": 99, "log_lines": 3}, True)  # exactly the lines the checkpoint saw
    assert "cut short" not in capsys.readouterr().out
    assert engine.open_log(str(tmp_path), {"step": 99, "log_lines": 3}, True, finished=True).enabled  # its own run:
    # a finished run relaunched in its folder still says its summary (only another folder's trains nothing here)
    engine.open_log(str(tmp_path), None, True)(step=1)  # a new run
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.1.jsonl")] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in open(tmp_path / engine.LOG)] == [1]


# ---------------------------------------------------------------------------------------------------
# data: seeded samples, exact restarts, unreadable images

def passed_over(*pairs) -> str:
    """SeededSamples' `skipped` field for these (path, reason) pairs."""
    return json.dumps([list(pair) for pair in pairs])


class Recorder(torch.utils.data.Dataset):
    """Sample i -> (i, a torch draw, a Python draw), UnreadableImage for the indices in `bad`, FileNotFoundError for
    those in `gone` (a file deleted since the dataset was listed)."""

    def __init__(self, n, bad=(), gone=()):
        self.n, self.bad, self.gone = n, set(bad), set(gone)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.gone:
            raise FileNotFoundError(2, "No such file or directory", f"img{i}.jpg")
        if i in self.bad:
            raise data.UnreadableImage(f"cannot read img{i}.jpg", f"img{i}.jpg")
        return i, torch.rand(()).item(), random.random()


def test_seeded_samples_depend_only_on_seed_epoch_index_and_skip_unreadable_ones():
    samples = engine.SeededSamples(Recorder(10, bad={3, 4}), seed=1)
    a = samples[(0, 5)]
    torch.rand(7), random.random()  # global draws in between do not matter
    assert samples[(0, 5)] == a and a[-1] == ""
    assert samples[(1, 5)][1:3] != a[1:3]  # another epoch: another augmentation
    state, py_state = torch.get_rng_state(), random.getstate()
    replaced = samples[(0, 3)]  # 3 and 4 cannot be read: 5 takes their place, with the seed of (0, 3)
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state  # the caller's RNGs: alone
    assert replaced[0] == 5 and replaced[1:3] != a[1:3]
    assert json.loads(replaced[-1]) == [["img3.jpg", "cannot read img3.jpg"], ["img4.jpg", "cannot read img4.jpg"]]
    with pytest.raises(ValueError, match="in a row cannot be read"):
        engine.SeededSamples(Recorder(20, bad=range(20)), seed=1)[(0, 0)]


def test_images_unreadable_in_a_row_are_named_from_first_to_last_as_stopping_the_run_whatever_the_limit():
    """16 unreadable files in a row (an interrupted copy of a class folder) stop the run also where --max_unreadable
    allows more; the message named the 16th file alone ("delete or replace it": a relaunch then stopped at the
    next one) and not the flag whose limit it overrides."""
    with pytest.raises(ValueError, match=r"^16 images in a row cannot be read, img3.jpg to img18.jpg \(cannot read "
                                         r"img18.jpg\), which stops the run whatever --max_unreadable allows: is the "
                                         r"dataset intact\? Repair or remove them$"):
        engine.SeededSamples(Recorder(30, bad=range(3, 25)), seed=1)[(0, 3)]


def test_seeded_samples_seed_the_cpu_generator_alone(monkeypatch):
    """A sample's draws are those of torch.manual_seed(seed) and random.seed(seed) of its key's seed, seeding only
    the CPU's generator: torch.manual_seed also seeded every accelerator (0.35 ms a sample in a worker, with stack
    traces of the lazy seeding; in the main process, the GPU's generator reseeded by every sample)."""
    seed = engine.seed_of("data", 1, 0, 5)
    torch.manual_seed(seed), random.seed(seed)
    expected = (5, torch.rand(()).item(), random.random(), "")
    for name in ("manual_seed", "seed"):
        monkeypatch.setattr(torch, name, lambda *a: pytest.fail(f"torch.{name}: every device's generator"))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda *a: pytest.fail("the GPU's generator reseeded"))
    assert engine.SeededSamples(Recorder(10), seed=1)[(0, 5)] == expected


def test_a_training_image_deleted_during_the_run_is_skipped_like_an_unreadable_one(tmp_path):
    """The unreadable-image message says "delete or replace it"; a file deleted (or a link left dangling) after the
    dataset was listed raised FileNotFoundError in a worker and stopped every rank, hours into a run."""
    for name in ("0", "1", "2"):
        os.makedirs(tmp_path / "a", exist_ok=True)
        Image.new("RGB", (4, 4), (int(name) * 100, 0, 0)).save(tmp_path / "a" / f"{name}.png")
    samples = engine.SeededSamples(data.ImageFolder(str(tmp_path), transform=lambda img: img.getpixel((0, 0))), 1)
    gone = str(tmp_path / "a" / "1.png")
    os.remove(gone)
    pixel, label, skipped = samples[(0, 1)]
    assert pixel == (200, 0, 0) and label == 0  # the next image took its place
    (path, reason), = json.loads(skipped)
    assert path == gone and reason.startswith("file not found, deleted or moved since the dataset was listed")
    images = engine.UnreadableImages(limit=1)
    images.add([skipped])
    assert images.pending == {gone: reason}
    os.symlink(tmp_path / "nowhere.png", gone)  # a link that points at nothing: said as such
    assert json.loads(samples[(0, 1)][2])[0][1].startswith("a symbolic link to a file that does not exist")


class NamedUnreadable(torch.utils.data.Dataset):
    """Sample 0 is a file of this name that cannot be read; sample 1 reads."""

    def __init__(self, name):
        self.name = name

    def __len__(self):
        return 2

    def __getitem__(self, i):
        if i == 0:
            raise data.UnreadableImage(f"cannot read image file {self.name!r}", self.name)
        return (i,)


def test_a_skipped_file_whose_name_holds_a_tab_or_a_newline_is_named_whole_once(tmp_path):
    """Linux file names may hold tabs and newlines: "path\treason" entries joined by newlines logged 'a' as the file
    with 'b.jpg\tcannot read ...' as its reason, and a newline made one file two, counted twice against the limit."""
    name = "a\tb\nc.jpg"
    *_, skipped = engine.SeededSamples(NamedUnreadable(name), seed=0)[(0, 0)]
    images = engine.UnreadableImages(limit=1)
    images.add([skipped])
    log = engine.open_log(str(tmp_path), None, True)
    engine.report_unreadable(images, CPU, 3, log)
    assert images.seen == {name}
    assert [json.loads(line) for line in open(tmp_path / engine.LOG)] == [
        {"step": 3, "skipped_image": name, "reason": f"cannot read image file {name!r}"}]


def test_an_unreadable_last_image_is_replaced_by_the_first():
    samples = engine.SeededSamples(Recorder(3, bad={2}), seed=0)
    index, *_, skipped = samples[(0, 2)]
    assert index == 0 and skipped == passed_over(("img2.jpg", "cannot read img2.jpg"))  # wraps around: no IndexError


def test_a_relaunch_keeps_the_files_its_run_named_and_counts_them_against_the_limit(capsys):
    images = engine.unreadable_images(0.001, 1000, {"unreadable_images": ["a.jpg"]})
    assert images.seen == {"a.jpg"} and images.limit == 1  # 0.1% of 1000 images
    images.add([passed_over(("a.jpg", "cannot read image file 'a.jpg'"))])
    engine.report_unreadable(images, CPU, 5, lambda **record: pytest.fail(f"named again: {record}"))
    assert capsys.readouterr().out == ""
    images.add([passed_over(("b.jpg", "cannot read image file 'b.jpg'"))])  # the run's second: over the limit of 1
    with pytest.raises(ValueError, match="2 training images could not be read \\(more than 1"):
        engine.report_unreadable(images, CPU, 6, lambda **record: None)
    assert engine.unreadable_images(0.001, 999).limit == 0


def test_the_unreadable_limit_is_the_fraction_as_written():
    """--max_unreadable stops a run at "more than this fraction": 29 of 100 images is not more than 0.29, but
    0.29 * 100 is 28.999999999999996 in floats, so the limit was 28 (a run with 29 stopped: "more than 28"; also 0.009
    of 3000 images)."""
    assert [engine.unreadable_images(f, n).limit for f, n in ((0.29, 100), (0.009, 3000), (0.001, 1281167))] == \
        [29, 27, 1281]


def test_a_checkpoint_lists_the_unreadable_files_sorted():
    """The checkpoint's unreadable_files are sorted, not in a set's order (which changes with PYTHONHASHSEED: two runs
    alike saved checkpoints that differ)."""
    images = engine.UnreadableImages(limit=100, seen={f"img{i:03d}.jpg" for i in range(60, 0, -1)})
    assert engine.unreadable_for_checkpoint(images, CPU, 5, lambda **fields: None) == \
        [f"img{i:03d}.jpg" for i in range(1, 61)]


def test_a_relaunch_keeps_its_named_files_where_the_data_folder_is_given_by_another_path(tmp_path):
    def launch(root, checkpoint=None):  # one file unreadable; a second naming would pass the limit of 1
        images = engine.unreadable_images(0.25, 4, checkpoint, root)
        images.add([passed_over((os.path.join(root, "c", "1.jpg"), "cannot read it"))])
        named = []
        return engine.unreadable_for_checkpoint(images, CPU, 1, lambda **record: named.append(record)), named

    files, named = launch("data")
    assert files == [os.path.join("c", "1.jpg")] and named == [{"step": 1, "skipped_image": "data/c/1.jpg",
                                                                 "reason": "cannot read it"}]
    for root in ("./data", str(tmp_path / "copied" / "data")):  # spelled otherwise, or the data copied elsewhere
        assert launch(root, {"unreadable_files": files}) == (files, [])  # not named (nor counted) again
    old = {"unreadable_images": [os.path.join("data", "c", "1.jpg")], "cwd": str(tmp_path)}  # paths as read
    assert launch(str(tmp_path / "data"), old) == (files, [])


def test_micro_batches_restart_mid_epoch_exactly():
    def stream(start_step, count, world=1, rank=0):
        dataset = Recorder(23)
        args = argparse.Namespace(seed=4, batch_size=2, accum_iter=2, num_workers=0)
        loader, sampler, steps_per_epoch = engine.train_loader(dataset, args, engine.Dist(rank, world))
        batches = engine.micro_batches(loader, sampler, steps_per_epoch, 2, start_step)
        return steps_per_epoch, [next(batches)[0].tolist() for _ in range(count)]

    def draws(start_step, count):  # each sample's (index, torch draw, Python draw): its augmentation's randomness
        dataset = Recorder(23)
        args = argparse.Namespace(seed=4, batch_size=2, accum_iter=2, num_workers=0)
        loader, sampler, steps_per_epoch = engine.train_loader(dataset, args, CPU)
        batches = engine.micro_batches(loader, sampler, steps_per_epoch, 2, start_step)
        return [list(zip(*(t.tolist() for t in next(batches)[:3]))) for _ in range(count)]

    steps_per_epoch, full = stream(0, 20)
    full_draws = draws(0, 20)
    assert draws(3, 14) == full_draws[6:]  # the same augmentations too, not only the same images
    epochs = [{i: (a, b) for batch in full_draws[e * 10:(e + 1) * 10] for i, a, b in batch} for e in (0, 1)]
    assert all(epochs[0][i] != epochs[1][i] for i in set(epochs[0]) & set(epochs[1]))  # each epoch draws anew
    assert steps_per_epoch == 5  # 23 images: 11 batches of 2 -> 5 steps of 2 micro-batches, one batch dropped
    assert sorted(i for b in full[:10] for i in b) == sorted(set(i for b in full[:10] for i in b))  # no repeats
    assert full[:10] != full[10:]  # each epoch its own order
    assert stream(3, 14)[1] == full[6:]  # from step 3 (mid-epoch 0): the same micro-batches
    assert stream(7, 6)[1] == full[14:]  # mid-epoch 1
    shards = [stream(0, 4, world=2, rank=r)[1] for r in (0, 1)]
    assert not set(sum(shards[0], [])) & set(sum(shards[1], []))  # ranks see disjoint images


def test_micro_batches_are_the_same_with_any_number_of_workers():
    """engine.py's scheme: a sample's augmentation depends on (seed, epoch, index) alone, not on the DataLoader worker
    that loads it. 23 images, batch 2 x accum 2: 5 steps per epoch leave each epoch's 11th batch, which the 2
    persistent workers have loaded ahead when the next epoch starts; from step 0 and mid-epoch, over 3 epochs."""
    def stream(workers, start_step, count):
        args = argparse.Namespace(seed=4, batch_size=2, accum_iter=2, num_workers=workers)
        loader, sampler, steps_per_epoch = engine.train_loader(Recorder(23), args, CPU)
        batches = engine.micro_batches(loader, sampler, steps_per_epoch, 2, start_step)
        try:  # each sample's (index, torch draw, Python draw)
            return [[t.tolist() for t in next(batches)[:3]] for _ in range(count)]
        finally:
            engine.stop_loader_workers()

    for start_step, count in ((0, 30), (3, 24)):
        in_workers = stream(2, start_step, count)
        assert len(in_workers) == count and in_workers == stream(0, start_step, count), start_step


def test_unreadable_images_are_named_once_and_stop_the_run_past_the_limit(tmp_path, capsys):
    images = engine.UnreadableImages(limit=2)
    log = engine.open_log(str(tmp_path), None, True)
    images.add(["", passed_over(("a.jpg", "")), passed_over(("b.jpg", ""), ("a.jpg", ""))])
    engine.report_unreadable(images, CPU, 4, log)
    images.add([passed_over(("a.jpg", "")), ""])
    engine.report_unreadable(images, CPU, 5, log)
    assert [json.loads(line) for line in open(tmp_path / engine.LOG)] == [
        {"step": 4, "skipped_image": "a.jpg"}, {"step": 4, "skipped_image": "b.jpg"}]
    assert capsys.readouterr().out.count("skipped an unreadable image") == 2
    images.add([passed_over(("c.jpg", "cannot read image file 'c.jpg' (truncated)"))])  # as SeededSamples: with why
    with pytest.raises(ValueError, match="3 training images could not be read.*--max_unreadable.*reasons are printed"):
        engine.report_unreadable(images, CPU, 6, log)
    printed = capsys.readouterr().out
    assert "skipped an unreadable image (3 so far): cannot read image file 'c.jpg' (truncated)" in printed
    assert json.loads(open(tmp_path / engine.LOG).readlines()[-1]) == {
        "step": 6, "skipped_image": "c.jpg", "reason": "cannot read image file 'c.jpg' (truncated)"}
    one = engine.UnreadableImages(limit=0)
    one.add([passed_over(("d.jpg", ""))])
    with pytest.raises(ValueError, match="^1 training image could not be read"):  # not "1 training images"
        engine.report_unreadable(one, CPU, 1, log)


def test_a_message_printed_while_a_progress_bar_is_open_is_not_glued_to_the_bar(tmp_path, capsys):
    """Training's progress bar (on stderr) is open when an unreadable image is reported: the message was glued to the
    bar's text ("...15.51it/s]skipped an unreadable image"; found by a README walkthrough). The bar is cleared first
    and redrawn after the message, which is flushed before the redraw: with stdout and stderr in one file and stdout
    buffered (no PYTHONUNBUFFERED), the redrawn bar would otherwise come first (found by a review)."""
    script = tmp_path / "bar.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {HERE!r})
        from tqdm import tqdm
        import engine
        images = engine.UnreadableImages(limit=1)
        images.add([{passed_over(("a.jpg", "cannot read image file 'a.jpg'"))!r}])
        with tqdm(total=3, mininterval=0) as bar:  # stderr, as the trainers' bars
            bar.update(1)
            engine.report_unreadable(images, engine.Dist(), 1, lambda **record: None)
            bar.update(1)
    """))
    with open(tmp_path / "out.txt", "w") as out:
        subprocess.run([sys.executable, str(script)], stdout=out, stderr=subprocess.STDOUT, check=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    text = (tmp_path / "out.txt").read_text()
    message = "skipped an unreadable image (1 so far): cannot read image file 'a.jpg'"
    assert message in re.split(r"[\r\n]", text), repr(text)  # whole, not after the bar's text
    assert text.index("1/3") < text.index(message) < text.index("2/3"), repr(text)  # cleared bar, message, redraw
    CPU.print("no bar open:", 2)
    assert capsys.readouterr().out == "no bar open: 2\n"


def test_check_dataset_names_the_unreadable_files(tmp_path):
    folder = tmp_path / "val" / "cls"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    engine.check_dataset(data.ImageFolder(str(tmp_path / "val")), CPU, 0)
    (folder / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="1 of the 3 validation samples cannot be used; first: cannot read image "
                                         "file .*1.png"):
        engine.check_dataset(data.ImageFolder(str(tmp_path / "val")), CPU, 0)
    # the files are decoded, not transformed (two thirds of the time for ImageNet's validation images)
    (folder / "1.png").unlink()
    engine.check_dataset(data.ImageFolder(str(tmp_path / "val"), lambda img: pytest.fail("transformed")), CPU, 0)


def test_check_dataset_counts_the_samples_beyond_the_first_it_names():
    """Of 3 samples that cannot be used, the first is named and "2 more" (not 3) counted."""
    class OddOnesBroken(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            if i % 2:
                raise ValueError(f"sample {i} is broken")
            return i
    with pytest.raises(ValueError, match=r"^3 of the 6 validation samples cannot be used; first: sample 1 is broken "
                                         r"\(and 2 more\)$"):
        engine.check_dataset(OddOnesBroken(), CPU, 0)


def test_epoch_sampler_drops_the_tail_and_counts_what_a_skip_leaves():
    """Each image at most once per epoch over all ranks (a padded tail trains some twice, and 1 and 2 processes see
    different samples); len() is what is left after a resumed run's skip."""
    samplers = [engine.EpochSampler(5, rank, 2, 0) for rank in range(2)]
    taken = [i for sampler in samplers for _, i in sampler]
    assert len(taken) == len(set(taken)) == 4 and all(sampler.per_rank == 2 for sampler in samplers)
    sampler = engine.EpochSampler(10, 0, 1, 0)
    sampler.set_epoch(1, skip=3)
    assert len(sampler) == len(list(sampler)) == 7


def test_epoch_sampler_gives_distributed_samplers_order_without_a_python_int_per_image():
    """The order is torch's DistributedSampler's (drop_last) for every rank, epoch and skip, shuffled or not; and a
    rank's share is taken from the permutation as a tensor: DistributedSampler's list of every index cost each rank
    1.1 s, a 640 MB peak and 446 MB kept per epoch at ImageNet-22k's 14M images over 64 ranks (measured)."""
    for num_items, world, shuffle in ((26, 1, True), (1001, 4, True), (1001, 3, False)):
        for rank in range(world):
            ours = engine.EpochSampler(num_items, rank, world, seed=5, shuffle=shuffle)
            torch_order = torch.utils.data.DistributedSampler(range(num_items), num_replicas=world, rank=rank,
                                                              shuffle=shuffle, seed=ours.seed, drop_last=True)
            for epoch, skip in ((0, 0), (7, 3), (1599, num_items // world - 1)):
                ours.set_epoch(epoch, skip)
                torch_order.set_epoch(epoch)
                assert list(ours) == [(epoch, i) for i in list(torch_order)[skip:]], (num_items, world, rank, epoch)
    sampler = engine.EpochSampler(1_000_000, 63, 64, seed=0)
    sampler.set_epoch(1599, skip=15_000)
    tracemalloc.start()
    try:
        tail = list(sampler)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(tail) == 625 and peak < 2_000_000, peak  # a list of 1M indices: 36 MB


def test_a_training_set_too_small_for_the_processes_or_for_one_step_names_the_fix():
    """No test made these refusals (launched with more processes than images, or a batch larger than a process's
    share); the first named no fix, the second only a smaller batch, which segmentation refuses below 2 (BatchNorm)."""
    with pytest.raises(ValueError, match=r"^1 training images cannot be shared by 2 processes; use at least 2 images "
                                         r"or fewer processes \(torchrun --nproc_per_node\)$"):
        engine.EpochSampler(1, 0, 2, 0)
    assert engine.EpochSampler(2, 1, 2, 0).per_rank == 1  # the fix
    args = argparse.Namespace(seed=0, batch_size=2, accum_iter=2, num_workers=0)
    with pytest.raises(ValueError, match=r"^3 training images per process give no full optimizer step of --batch_size "
                                         r"2 x --accum_iter 2; use a smaller batch or more images \(with several "
                                         r"processes: or fewer processes, torchrun --nproc_per_node\)$"):
        engine.train_loader(list(range(3)), args, CPU)
    args.batch_size = 1
    assert engine.train_loader(list(range(3)), args, CPU)[2] == 1  # the fix: one step per epoch


def test_check_dataset_counts_over_every_batch():
    assert engine.check_dataset(list(range(70)), CPU, 0, count=lambda s: np.ones(2)).tolist() == [70, 70]
    assert engine.check_dataset(list(range(70)), CPU, 0) == 0


def test_epoch_orders_of_different_seeds_are_not_shifted_copies():
    def order(seed, epoch):
        sampler = engine.EpochSampler(50, 0, 1, seed)
        sampler.set_epoch(epoch)
        return [index for _, index in sampler]

    assert sorted(order(0, 1)) == list(range(50)) and order(0, 1) == order(0, 1)
    assert order(0, 1) != order(1, 0) and order(0, 2) != order(1, 1) and order(0, 0) != order(0, 1)


def test_eval_sharding_covers_every_index_exactly_once():
    for num_items in (0, 1, 7, 13, 50001):
        for world_size in (1, 2, 3, 4):
            shards = [list(engine.shard_indices(num_items, engine.Dist(r, world_size))) for r in range(world_size)]
            assert sorted(i for s in shards for i in s) == list(range(num_items))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


TEARDOWN_HELPER = """
import os, sys, time, torch
sys.path.insert(0, {repo!r})
import engine
d = engine.setup()
model = engine.ddp(torch.nn.Linear(3, 3), d)
model(torch.ones(2, 3)).sum().backward()
del model
engine.teardown()
def gloo_threads():
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{{task}}/comm").read().strip())
        except FileNotFoundError:  # a thread that ended after the listing
            pass
    return sorted(t for t in names if "gloo" in t)
deadline = time.monotonic() + 10  # a thread may take a moment to end on a loaded machine; a held group keeps it
while gloo_threads() and time.monotonic() < deadline:
    time.sleep(0.05)
with open(os.path.join({out!r}, f"threads{{os.environ['RANK']}}.txt"), "w") as f:
    f.write(" ".join(gloo_threads()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the thread names from /proc")
def test_teardown_after_ddp_ends_the_gloo_threads(tmp_path):
    """With torch.distributed.nn imported after init_process_group (DDP imports it), its functions' default
    group=WORLD arguments held the group and destroy_process_group left gloo's threads running; a rank then
    sometimes aborted at exit. engine.setup imports it first."""
    helper = tmp_path / "helper.py"
    helper.write_text(TEARDOWN_HELPER.format(repo=HERE, out=str(tmp_path)))
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(helper))
    assert result.returncode == 0, result.stderr[-6000:]
    assert [(tmp_path / f"threads{rank}.txt").read_text() for rank in (0, 1)] == ["", ""]  # gloo's threads are gone


def test_child_processes_of_the_tests_leave_their_temporary_files_in_pytests_folder(tmp_path_factory):
    """torchrun makes a log folder (torchelastic_*) in the temporary folder and never removes it: each run of the
    suite left 20 or more in /tmp. conftest.py's child_tmpdir gives child processes a TMPDIR in pytest's folder."""
    basetemp = tmp_path_factory.getbasetemp()
    before = set(basetemp.glob("*/torchelastic_*"))
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--no-python", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(set(basetemp.glob("*/torchelastic_*")) - before) == 1
    printed = run_script("-c", "import tempfile; print(tempfile.gettempdir())").stdout.strip()
    assert os.path.commonpath([printed, basetemp]) == str(basetemp)


# ---------------------------------------------------------------------------------------------------
# user errors: one line; internal errors: the traceback

def run_script(*argv):
    return subprocess.run([sys.executable, *argv], cwd=HERE, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_seeds_torch_takes_are_accepted():
    import train_pretrain
    for seed in (-1, 2 ** 63 + 5):  # runs started with them before the range check must relaunch
        assert train_pretrain.parse_args(["--seed", str(seed)]).seed == seed


def test_an_output_dir_that_is_or_is_under_a_file_is_refused(tmp_path):
    import train_finetune
    import train_pretrain
    import train_seg
    (tmp_path / "file").write_text("x")
    for output_dir, where in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "run", "is under")):
        for parse in (train_pretrain.parse_args, train_finetune.parse_args, train_seg.parse_args):
            with pytest.raises(ValueError, match=f"--output_dir .* {where}.*pass a folder"):  # an OS error before
                parse(["--output_dir", str(output_dir)] + (["--init", "none"] if parse is not train_pretrain.parse_args
                                                           else []))
    engine.check_output_dir(str(tmp_path / "new" / "run"))  # a folder that can be made: fine


def test_an_output_dir_that_is_or_is_under_a_link_to_nothing_names_the_link(tmp_path):
    """A symbolic link whose folder is gone (scratch space purged, a file system not mounted here): the run stopped at
    start-up with "cannot be written to (File exists): ... change its permissions", which no permission fixes."""
    (tmp_path / "runs").symlink_to(tmp_path / "purged")
    for output_dir, where in ((tmp_path / "runs", "is"), (tmp_path / "runs" / "dtm", "is under .*runs', which is")):
        with pytest.raises(ValueError, match=f"^--output_dir '{output_dir}' {where} a symbolic link to "
                                             f"'{tmp_path / 'purged'}', which does not exist: make that folder, or "
                                             f"pass another --output_dir$"):
            engine.check_output_dir(str(output_dir))
    (tmp_path / "purged").mkdir()
    engine.check_output_dir(str(tmp_path / "runs" / "dtm"))


@pytest.mark.parametrize("argv, message", [  # sizes of 0 or below: a misleading message or a traceback before
    (["train_pretrain.py", "--img_size", "0"], "--img_size 0 is not a positive multiple of the patch size 16"),
    (["train_pretrain.py", "--img_size", "-16"], "--img_size -16 is not a positive multiple"),
    (["train_finetune.py", "--img_size", "0", "--init", "none"], "--img_size 0 is not a positive multiple"),
    (["train_seg.py", "--crop_size", "0"], "--crop_size 0 is not a positive multiple"),
    (["train_seg.py", "--scale", "64", "0"], "--scale LONG SHORT must be positive sizes, got 64 0"),
    (["train_pretrain.py", "--min_block", "0"], "--min_block must be >= 1 (patches) and --min_crop_scale in (0, 1]"),
    (["train_pretrain.py", "--min_crop_scale", "0"], "--min_crop_scale in (0, 1] (of the image's area); got 4 and 0"),
    (["train_finetune.py", "--mixup_prob", "2", "--init", "none"], "--mixup_prob and --mixup_switch_prob are "
                                                                   "probabilities"),
])
def test_sizes_and_probabilities_out_of_range_are_refused(argv, message):
    module = importlib.import_module(argv[0][:-3])
    with pytest.raises(ValueError, match=re.escape(message)):
        module.parse_args(argv[1:])


@pytest.mark.parametrize("trainer", ["train_pretrain", "train_finetune", "train_seg"])
def test_every_float_flag_of_every_trainer_refuses_nan_and_inf(trainer, capsys):
    """float() takes "nan" and "inf", and NaN passes every range check (its comparisons are all False): --lr nan
    trained on NaN. engine.finite_float, registered for type=float, refuses them at parse time (status 2)."""
    module = importlib.import_module(trainer)
    flags = [(a.option_strings[0], a.nargs) for a in module.get_args_parser()._actions if a.type is float]
    assert len(flags) >= 10 and ("--lr", None) in flags and ("--betas", 2) in flags
    assert ("--mto_lambda_ent", None) in flags or trainer != "train_pretrain"  # mto.add_mto_args' flags too
    for flag, nargs in flags:
        for value in ("nan", "inf", "NaN", "Infinity"):  # ("-inf" reads as a flag to argparse, refused anyway)
            with pytest.raises(SystemExit) as exit:
                module.parse_args([flag, *[value] * (nargs if isinstance(nargs, int) else 1)])
            assert exit.value.code == 2
            assert f"argument {flag}: {value!r} is not a finite number" in capsys.readouterr().err
    assert module.get_args_parser().parse_args(["--lr", "1e-3"]).lr == 1e-3


@pytest.mark.parametrize("trainer", ["train_pretrain", "train_finetune", "train_seg"])
def test_every_flag_without_a_type_refuses_an_empty_value(trainer, capsys):
    """`--data "$IMAGENET"` with the variable unset gives --data "", which the code read as no --data where it tests
    the flag's truth: fine-tuning trained on the demo's images with the real run's settings, --eval "" trained
    instead of evaluating. engine.nonempty_text, registered for flags without a type, refuses it at parse time, and
    keeps any other value as given (spaces too: a folder's name may have them)."""
    module = importlib.import_module(trainer)
    flags = [a.option_strings[0] for a in module.get_args_parser()._actions
             if a.type is None and a.nargs != 0 and a.option_strings != ["-h", "--help"]]
    assert {"--output_dir", "--resume"} <= set(flags) and ("--data" in flags) and len(flags) >= 8
    for flag in flags:
        for value in ("", " "):
            with pytest.raises(SystemExit) as exit:
                module.parse_args([flag, value])
            assert exit.value.code == 2
            assert f"argument {flag}: {value!r} is empty (an unset shell variable?): give a value" in \
                capsys.readouterr().err
    assert module.get_args_parser().parse_args(["--output_dir", " out "]).output_dir == " out "  # a value as given


@pytest.mark.parametrize("trainer", ["train_pretrain", "train_finetune", "train_seg"])
def test_a_leading_tilde_the_shell_left_is_the_home_folder(trainer, monkeypatch):
    """No shell expands ~ after '=' (--output_dir=~/runs), in quotes, or after --teacher's ckpt: and clip:: the run
    wrote into a folder named '~' in the working directory, and --init=~/x.pth or --teacher ckpt:~/x.pth were 'no such
    file'. Every flag without a type takes a leading ~ as the shell would, and so does --teacher's PATH."""
    monkeypatch.setenv("HOME", "/home/someone")
    module = importlib.import_module(trainer)
    parser = module.get_args_parser()
    flags = [a for a in parser._actions if a.type is None and a.nargs != 0 and not a.choices
             and a.option_strings != ["-h", "--help"]]
    assert {"output_dir", "resume"} <= {a.dest for a in flags} and len(flags) >= 3
    for action in flags:
        flag = action.option_strings[0]
        assert getattr(parser.parse_args([f"{flag}=~/x y"]), action.dest) == "/home/someone/x y", flag
        assert getattr(parser.parse_args([flag, "./~/x"]), action.dest) == "./~/x", flag  # a folder named ~: as given
    if trainer == "train_pretrain":
        for given, taken in (("ckpt:~/t.pth", "ckpt:/home/someone/t.pth"), ("clip:~/ViT-B-16.pt",
                             "clip:/home/someone/ViT-B-16.pt"), ("pixels", "pixels"), ("ckpt:a~/t", "ckpt:a~/t")):
            assert parser.parse_args(["--teacher", given]).teacher == taken
        with pytest.raises(SystemExit):
            parser.parse_args(["--teacher", ""])  # still refused as empty (test above: its message)


TOOL_PATHS = {"plot_log": {"logs", "--out"}, "morph": {"image", "--out"}, "study": {"--out"}, "test_gpu": {"--out"},
              "bench_data": {"--data"}, "bench_mto": {"--compare_mto"}}


@pytest.mark.parametrize("script", sorted(TOOL_PATHS))
def test_the_other_scripts_paths_take_a_leading_tilde_too(script):
    """The tools' path arguments, as the trainers' (test above): study.py --out=~/study wrote into ./~/study."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{script}.py")) as f:
        calls = [node for node in ast.walk(ast.parse(f.read())) if isinstance(node, ast.Call)
                 and getattr(node.func, "attr", None) == "add_argument"]
    types = {call.args[0].value: ast.unparse(next((k.value for k in call.keywords if k.arg == "type"),
                                                  ast.Constant(None))) for call in calls}
    assert {name: types[name] for name in TOOL_PATHS[script]} == dict.fromkeys(
        TOOL_PATHS[script], "engine.nonempty_text" if script == "bench_mto" else "os.path.expanduser")

@pytest.mark.parametrize("argv, message", [
    (["train_pretrain.py", "--data", "/no/such/dir", "--teacher", "pixels"], "--data '/no/such/dir' is not a dir"),
    (["train_finetune.py", "--data_train", "/no/such/dir", "--data_val", "/no/such/dir", "--init", "none"],
     "--data_train '/no/such/dir' does not exist"),
    (["train_seg.py", "--crop_size", "100"], "--crop_size 100 is not a positive multiple of the patch size 16"),
])
def test_user_errors_print_one_line_and_exit_2(argv, message):
    result = run_script(*argv)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--clip_grad", "-1"], "--clip_grad must be >= 0, got -1.0"),
    (["--weight_decay", "-0.05"], "--weight_decay must be >= 0"),
    (["--lr", "-0.001"], "--lr must be >= 0"),
    (["--betas", "1.5", "0.9"], "--betas are AdamW's moment decays, each in \\[0, 1\\); got 1.5 0.9"),
    (["--betas", "0.9", "1.0"], "each in \\[0, 1\\); got 0.9 1.0"),  # torch raised its own error inside AdamW
    (["--seed", str(2 ** 64)], "--seed must be in -2\\*\\*63..2\\*\\*64 - 1"),  # an overflow in torch.manual_seed
    (["--lr", "0"], "--lr 0 would train nothing .*: pass a peak lr > 0"),  # silent with --min_lr 0
])
def test_every_trainer_rejects_out_of_range_shared_flags(flags, message):
    import train_finetune
    import train_pretrain
    import train_seg
    for parse in (train_pretrain.parse_args, train_finetune.parse_args, train_seg.parse_args):
        with pytest.raises(ValueError, match=message):
            parse([*flags, "--init", "none"] if parse is not train_pretrain.parse_args else flags)
    with pytest.raises(ValueError, match=r"--layer_decay must be in \(0, 1\]"):
        train_seg.parse_args(["--init", "none", "--layer_decay", "0"])
    with pytest.raises(ValueError, match="--loss_on masked with --num_masked 0 leaves no position"):
        train_pretrain.parse_args(["--loss_on", "masked", "--num_masked", "0"])


def test_ctrl_c_prints_how_to_continue_and_exits_130(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.delenv("DTM_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        engine.cli(interrupted)
    assert exit_info.value.code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: relaunch to continue")
    assert "the same command, without --fresh; before" in lines[0]
    assert lines[0].endswith("before the first save there is none: the command as it was starts over (from PATH with "
                             "--resume PATH)")
    monkeypatch.setenv("DTM_TRACEBACK", "0")  # off, as unset
    with pytest.raises(SystemExit):
        engine.cli(interrupted)
    monkeypatch.setenv("DTM_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        engine.cli(interrupted)


CTRL_C_WHILE_EXITING = """
import atexit, os, signal, sys, time
sys.path.insert(0, {repo!r})
import engine


def exiting():  # Ctrl-C while Python runs its atexit callbacks (torch's, multiprocessing's)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)


def main():
    atexit.register(exiting)
    if {interrupted}:
        raise KeyboardInterrupt


engine.cli(main)
"""


@pytest.mark.parametrize("interrupted", [True, False], ids=["second-ctrl-c", "after-the-run"])
def test_a_ctrl_c_while_exiting_ends_the_process_without_a_traceback(tmp_path, interrupted):
    """Ctrl-C pressed twice, the second while Python exits after the first's line, or once as a run ends: it raised in
    an atexit or threading callback and printed "Exception ignored in ..." with a traceback from torch or threading
    (seen in subprocess runs: pre-training, 2 of 100 with Ctrl-C twice 50-500 ms apart; fine-tuning, Ctrl-C twice
    after its last line); now it ends the process, as SIGINT's default action."""
    helper = tmp_path / "helper.py"
    helper.write_text(CTRL_C_WHILE_EXITING.format(repo=HERE, interrupted=interrupted))
    env = {k: v for k, v in os.environ.items() if k != "DTM_TRACEBACK"}
    # a terminal's process: SIGINT at its default (a pytest started as a script's background job, as CI may start it,
    # has it ignored, and so would the helper, which cli then leaves ignoring it: b37f1c8)
    proc = subprocess.run([sys.executable, str(helper)], capture_output=True, text=True, timeout=120, env=env,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the one line of Ctrl-C (after the new line that ends a bar), and nothing more
    assert proc.stderr.startswith("\ninterrupted: relaunch" if interrupted else "") and \
        proc.stderr.count("\n") == 2 * interrupted, proc.stderr
    assert proc.returncode == -signal.SIGINT  # killed by SIGINT at once: status 130 in a shell, as Ctrl-C's


@pytest.mark.parametrize("handler", [signal.SIG_IGN, lambda signum, frame: None], ids=["ignored", "own-handler"])
def test_cli_leaves_a_sigint_it_did_not_install_as_it_was(handler):
    """A process started with SIGINT ignored (a background job of a shell script, a sweep's child started so that a
    Ctrl-C meant for the sweep spares it) or with a handler of its own: cli set SIG_DFL once main had ended, so such a
    Ctrl-C killed a run that had finished (status -2 for a run that ended well, seen with a sweep's child). Only
    Python's own handler is replaced (conftest puts it back after each test)."""
    signal.signal(signal.SIGINT, handler)
    engine.cli(lambda: None)
    assert signal.getsignal(signal.SIGINT) is handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    engine.cli(lambda: None)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL


def test_conftest_leaves_a_pytest_that_ignores_sigint_ignoring_it(tmp_path):
    """conftest's fixture gave Python's handler after every test, also to a pytest started with SIGINT ignored (a
    script's background job): a Ctrl-C meant for the script then stopped it (cli's twin, fixed there before)."""
    (tmp_path / "test_sigint.py").write_text("import signal\n\n\ndef test_a():\n    pass\n\n\ndef test_b():\n"
                                             "    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n")
    child = ("import signal, sys, pytest; signal.signal(signal.SIGINT, signal.SIG_IGN); "
             "sys.exit(pytest.main(['-q', '-p', 'conftest', '-p', 'no:cacheprovider', sys.argv[1]]))")
    proc = subprocess.run([sys.executable, "-c", child, str(tmp_path / "test_sigint.py")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": HERE})
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout + proc.stderr


def test_an_error_or_ctrl_c_during_training_starts_its_own_line(capsys, monkeypatch):
    """The progress bar is closed first: `error: ...` was printed at the end of the bar's line, where a log read with
    `grep ^error:` did not find it; after Ctrl-C no empty line follows the closed bar."""
    monkeypatch.delenv("DTM_TRACEBACK", raising=False)

    def fails(error):
        def train():
            bar = tqdm(total=4)
            bar.update(1)
            raise error
        return train

    for error, code, first in ((ValueError("bad label"), 2, "error: bad label"),
                               (KeyboardInterrupt(), 130, "interrupted: relaunch")):
        with pytest.raises(SystemExit) as exit_info:
            engine.cli(fails(error))
        err = capsys.readouterr().err
        assert exit_info.value.code == code and err.endswith("\n")
        *bar_lines, message = err.rstrip("\n").split("\n")
        assert message.startswith(first) and bar_lines and "1/4" in bar_lines[-1] and not tqdm._instances
    def no_bar():
        raise ValueError("x")

    with pytest.raises(SystemExit):
        engine.cli(no_bar)
    assert capsys.readouterr().err == "error: x\n"  # no bar open: nothing before the line


def test_names_any_stdout_cannot_encode_are_printed_escaped_not_an_error(monkeypatch):
    """A name that is not UTF-8 (b'r\\xe9s', from a Latin-1 machine) reaches messages with surrogate escapes, a
    checkpoint's text any character: a stdout of a UTF-8 locale (errors 'strict' without Python's UTF-8 mode) or of
    PYTHONIOENCODING=ascii raised UnicodeEncodeError, which stopped a run at its first skipped image or its last
    line; Python's UTF-8 mode wrote the raw byte, which is not UTF-8."""
    monkeypatch.delenv("DTM_TRACEBACK", raising=False)
    name = os.fsdecode(b"out/r\xe9s") + "/\u00e9t\u00e9.png"  # a Latin-1 folder, a UTF-8 file
    for encoding, errors, printed in (("utf-8", "strict", "out/r\\udce9s/\u00e9t\u00e9.png"),
                                      ("ascii", "strict", "out/r\\udce9s/\\xe9t\\xe9.png"),
                                      ("utf-8", "surrogateescape", "out/r\\udce9s/\u00e9t\u00e9.png")):
        stdout = io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors=errors, write_through=True)
        monkeypatch.setattr(sys, "stdout", stdout)
        engine.cli(lambda: engine.Dist().print(f"checkpoint: {name}"))
        assert stdout.buffer.getvalue().decode(encoding) == f"checkpoint: {printed}\n", (encoding, errors)


def test_internal_errors_keep_their_traceback():
    def torch_value_error():  # a ValueError raised inside torch is not a user error
        F.cross_entropy(torch.randn(2, 3), torch.tensor([1]))

    with pytest.raises(ValueError, match="batch_size"):
        engine.cli(torch_value_error)
    with pytest.raises(KeyError):
        engine.cli(lambda: {}["missing"])
    worker = ValueError('Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call '
                        f'last):\n  File "{HERE}/data.py", line 1, in load\n    raise\nValueError: annotation x.png '
                        'holds label values [9]')
    assert engine.user_error_message(worker) == "annotation x.png holds label values [9]"


@pytest.mark.parametrize("script", ["train_pretrain", "train_finetune", "train_seg"])
def test_help_names_the_script_and_shows_every_default(script):
    """argparse.ArgumentParser's first argument is the program name: a description there became the usage line's
    name. ArgumentDefaultsHelpFormatter shows a default only for a flag with help text."""
    parser = __import__(script).get_args_parser()
    assert parser.format_usage().split()[1] == os.path.basename(sys.argv[0])
    assert [a.dest for a in parser._actions if a.option_strings and not a.help] == []
    assert "(default: 0)" in " ".join(parser.format_help().split("--seed SEED")[-1].split()[:20])


def test_seed_step_depends_on_seed_micro_step_and_rank():
    """Each rank draws its own drop path, Algorithm 1 split and Mixup per micro-step; the same triple repeats."""
    def draw(*args):
        engine.seed_step(*args)
        return torch.rand(4), random.random(), np.random.rand()
    first = draw(0, 5, 0)
    assert torch.equal(draw(0, 5, 0)[0], first[0]) and draw(0, 5, 0)[1:] == first[1:]
    for other in ((0, 5, 1), (0, 6, 0), (1, 5, 0)):
        drawn = draw(*other)
        assert not torch.equal(drawn[0], first[0]) and drawn[1] != first[1] and drawn[2] != first[2], other


def test_seed_of_is_a_fixed_function_of_its_parts():
    """Its values written out: a run resumed by a later version of this code draws the same samples, masks and
    orders only if they stay as they are (computed with seed_of on 2026-12-07)."""
    assert engine.seed_of("data", 0, 0, 0) == 77459579532871303
    assert engine.seed_of("step", 0, 1, 0) == 6548641458566972363
    assert engine.seed_of("order", 0) == 6301365605476385138


def test_each_trainers_help_lists_the_demo_defaults_it_runs_with():
    """--help ends with the demo's defaults (engine.demo_help), and a run without data parses to exactly those."""
    import train_finetune
    import train_pretrain
    import train_seg
    for trainer in (train_pretrain, train_finetune, train_seg):
        epilog = " ".join(trainer.get_args_parser().format_help().split())  # undo the help's line wrapping
        args = trainer.parse_args([])
        trainer.set_schedule(args)  # the run's length and warmup: a new run's (a continued run keeps its own)
        demo = vars(args)
        for key, value in trainer.DEMO_DEFAULTS.items():
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            assert f"--{key} {shown}" in epilog, (trainer.__name__, key)
            assert demo[key] == value, (trainer.__name__, key, demo[key], value)


def test_prepare_run_refuses_inputs_that_the_run_writes_over(tmp_path):
    """--init (read when a run starts) or the teacher (read at every launch) naming a checkpoint that the run writes
    in its output folder: --fresh removed checkpoint-last.pth, a save replaced it."""
    out = tmp_path / "run"
    out.mkdir()
    for name in (engine.LAST, engine.BEST, "checkpoint-20.pth"):
        (out / name).write_bytes(b"x")
    link = tmp_path / "teacher.pth"
    link.symlink_to(out / engine.BEST)
    for path in [out / name for name in (engine.LAST, engine.BEST, "checkpoint-20.pth")] + [link]:
        with pytest.raises(ValueError, match=f"--init '{path}' is a checkpoint that this run writes in --output_dir"):
            engine.prepare_run(run_args(out, fresh=True), CPU, new_run_reads={"--init": str(path)})
        with pytest.raises(ValueError, match="--teacher ckpt: .* is a checkpoint that this run writes"):
            engine.prepare_run(run_args(out), CPU, reads={"--teacher ckpt:": str(path)})
        assert (out / engine.LAST).exists()
        # a relaunch continues its run and does not read --init: nothing to refuse
        assert engine.prepare_run(run_args(out), CPU, new_run_reads={"--init": str(path)}) == (str(out / engine.LAST),
                                                                                                True)
    (out / "checkpoint-in1k.pth").write_bytes(b"x")  # names no run writes, or a checkpoint elsewhere: fine
    (tmp_path / engine.LAST).write_bytes(b"x")
    for path in (out / "checkpoint-in1k.pth", tmp_path / engine.LAST, "none", None):
        assert engine.prepare_run(run_args(out, fresh=True), CPU, new_run_reads={"--init": path and str(path)},
                                  reads={"--teacher ckpt:": path and str(path)}) == (None, False)


def test_auto_resume_of_another_trainers_run_names_the_folder(tmp_path):
    path = tmp_path / engine.LAST
    torch.save({"kind": "dtm_pretrain", "model": {}}, path)
    with pytest.raises(ValueError, match="--output_dir .* holds another trainer's run .*'dtm_pretrain'.* pass another "
                                         "--output_dir"):
        engine.load_checkpoint(str(path), "dtm_finetune", hint="; use --init", auto=True)
    with pytest.raises(ValueError, match="--resume .* is not a checkpoint of train_finetune.py .*; use --init"):
        engine.load_checkpoint(str(path), "dtm_finetune", hint="; use --init")
    torch.save({"weight": torch.zeros(2)}, path)  # not another trainer's run: no 'kind'
    with pytest.raises(ValueError, match=r"--output_dir .* holds a file that is no run of this repo \(checkpoint-last."
                                         r"pth: no 'kind' entry: weights without a run to continue, or another "
                                         r"codebase's file\), which train_finetune.py would continue"):
        engine.load_checkpoint(str(path), "dtm_finetune", hint="; use --init", auto=True)
    torch.save({"weight": torch.zeros(2), "bias": torch.zeros(1)}, tmp_path / "state_dict.pth")  # weights only
    with pytest.raises(ValueError, match=r"--resume .*state_dict.pth' is not a checkpoint of train_pretrain.py \(no "
                                         r"'kind' entry: weights without a run to continue, or another codebase's "
                                         r"file\); use --teacher"):
        engine.load_checkpoint(str(tmp_path / "state_dict.pth"), "dtm_pretrain", hint="; use --teacher")


def test_flags_that_would_do_nothing_are_refused():
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", type=int, default=1)
    parser.add_argument("--b", default=None)
    args = parser.parse_args(["--a", "1"])  # the default value, even given, changes nothing
    engine.refuse_ignored(args, parser, ["a", "b"], "here")
    with pytest.raises(ValueError, match="--a, --b would do nothing here: leave them out"):
        engine.refuse_ignored(parser.parse_args(["--a", "2", "--b", "x"]), parser, ["a", "b"], "here")


def test_eval_flags_come_from_the_checkpoint_unless_given():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(["--size", "64"])  # given, although the default: checked against the checkpoint too
    engine.from_checkpoint_unless_given(args, parser, ["--size", "64"], ["model", "size"])
    assert args.model is None and args.size == 64 and parser.get_default("size") == 64  # the defaults restored
    with pytest.raises(ValueError, match="--size 64 differs from the 32"):
        engine.take_from_checkpoint(args, {"model": "vit_s", "size": 32}, ["model", "size"], "ck.pth")
    args = parser.parse_args(["--size", "32"])
    engine.from_checkpoint_unless_given(args, parser, ["--size", "32"], ["model", "size"])
    assert args.model is None and args.size == 32
    engine.take_from_checkpoint(args, {"model": "vit_s", "size": 32}, ["model", "size"], "ck.pth")
    assert args.model == "vit_s" and args.size == 32
    args.size = 48
    with pytest.raises(ValueError, match="--size 48 differs from the 32 that 'ck.pth' was trained with"):
        engine.take_from_checkpoint(args, {"size": 32}, ["size"], "ck.pth")
    engine.take_from_checkpoint(args, {"size": 32}, ["size"], "ck.pth", must_agree=False)  # data flags: given wins
    assert args.size == 48


def test_trainer_help_shows_defaults_but_not_none():
    """A flag whose default is resolved later states it in its help text; argparse appended "(default: None)" after
    it ("default 0.1, 1e-5 for vit_l ... (default: None)"). Found by a README / --help audit."""
    import train_finetune
    import train_pretrain
    import train_seg
    for trainer in (train_pretrain, train_finetune, train_seg):
        text = trainer.get_args_parser().format_help()
        assert "(default: None)" not in text and "(default: 0)" in text.replace("\n", " ")  # --seed 0
    text = " ".join(train_pretrain.get_args_parser().format_help().split())
    assert "default 0.1, 1e-5 for vit_l (run_pretrain_dtm.py's help) --rel_pos_bias" in text


def test_a_flag_the_trainers_share_reads_the_same_where_it_means_the_same():
    """The help of the same flag, found worded three ways by a --help audit ("per process" without the micro-step,
    "micro-steps per step", "max gradient norm"); --min_lr ends each layer's schedule alike in segmentation only."""
    import train_finetune
    import train_pretrain
    import train_seg
    helps = {trainer: {a.dest: " ".join(a.help.split()) for a in trainer.get_args_parser()._actions}
             for trainer in (train_pretrain, train_finetune, train_seg)}
    for flag in ("accum_iter", "amp", "weight_decay", "betas", "max_unreadable"):
        assert len({helps[trainer][flag] for trainer in helps}) == 1, flag
    starts = {"batch_size": "per process (GPU) per micro-step; 8 GPUs x ", "clip_grad": "max global grad norm (0: no "
              "clipping", "epochs": "training epochs; default: a continued run's own, else ",
              "warmup_epochs": "linear lr warmup epochs (may be fractional); default: a continued run's own, else "}
    for flag, start in starts.items():
        for trainer in helps:
            assert flag not in helps[trainer] or helps[trainer][flag].startswith(start), (trainer.__name__, flag)
    assert "scaled by --layer_decay" in helps[train_finetune]["min_lr"]  # each layer ends at min_lr x its scale
    assert "not scaled by --layer_decay" in helps[train_seg]["min_lr"]  # every layer ends at min_lr
    for trainer, flag in ((train_pretrain, "teacher"), (train_finetune, "init"), (train_seg, "init")):
        assert "official DTM / BEiT / BEiT v2 ViT's weights" in helps[trainer][flag]  # dtm.from_official_names


def test_the_default_number_of_workers_is_at_most_the_cpus_the_process_may_use(monkeypatch):
    """10 workers per process (4 in segmentation) where the CPUs allow, else the CPUs this process may use (its
    affinity: what torch's DataLoader warns above; a launcher's per-process binding shows there, so it is not divided
    again by the node's processes); a --num_workers given is kept."""
    import train_finetune
    import train_pretrain
    import train_seg
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # not read: 8 processes pinned to 8 cores each see 8 here
    for cpus, expected, expected_seg in ((80, 10, 4), (8, 8, 4), (2, 2, 2), (1, 1, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        for trainer, preferred in ((train_pretrain, expected), (train_finetune, expected), (train_seg, expected_seg)):
            parser = trainer.get_args_parser()
            assert parser.parse_args(["--data", "x"]).num_workers == preferred, (trainer.__name__, cpus)
            assert parser.parse_args(["--data", "x", "--num_workers", "12"]).num_workers == 12


@pytest.mark.parametrize("flags, message", [(["--num_workers", "-1"], "--num_workers must be >= 0"),
                                            (["--max_unreadable", "-1"], "--max_unreadable is a fraction"),
                                            (["--max_unreadable", "2"], "--max_unreadable is a fraction")])
def test_shared_flags_are_checked_in_every_trainer(flags, message):
    import train_finetune
    import train_pretrain
    import train_seg
    for trainer in (train_pretrain, train_finetune, train_seg):
        with pytest.raises(ValueError, match=message):
            trainer.parse_args(flags)


def test_append_eval_appends_strict_json_lines_and_says_where(tmp_path, capsys):
    out = tmp_path / "new" / "folder"
    engine.append_eval(str(out), {"eval": "a.pth", "top1": float("nan"), "IoU": [0.5, None]})
    assert capsys.readouterr().out == f"result appended to {out / 'eval.jsonl'}\n"
    engine.append_eval(str(out), {"eval": "b.pth", "top1": float("inf")})
    lines = (out / "eval.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}")) for line in lines] == [
        {"eval": "a.pth", "top1": None, "IoU": [0.5, None]}, {"eval": "b.pth", "top1": None}]


def test_append_eval_after_a_result_cut_short_starts_a_line_of_its_own(tmp_path, capsys):
    """A full disk cut an --eval's result short (half a line): the next one was appended to that half, unreadable
    as well, while it said it was appended (train_finetune.py --eval, twice, into a full tmpfs and then a freed one)."""
    path = tmp_path / "eval.jsonl"
    path.write_text('{"eval": "a.pth", "top1": 1.0}\n{"eval": "b.pth", "to')
    engine.append_eval(str(tmp_path), {"eval": "c.pth", "top1": 2.0})
    assert path.read_text().splitlines() == ['{"eval": "a.pth", "top1": 1.0}', '{"eval": "b.pth", "to',
                                             '{"eval": "c.pth", "top1": 2.0}']
    assert capsys.readouterr().out == f"result appended to {path}\n"
    path.write_text("")  # an empty file (emptied by hand) holds no half line: its first line is the result
    engine.append_eval(str(tmp_path), {"eval": "d.pth"})
    assert path.read_text() == '{"eval": "d.pth"}\n'


def _checkpoints_of_rank0_only(rank: int, own: str, d) -> list:
    """The trainers' reads of a checkpoint that rank 1 cannot read (each rank in its own folder, as on node-local
    disks): missing there (--init, the teacher), or a copy of the same size with its zip directory damaged (--resume,
    which the ranks agree on by size, and --eval). Each alone stopped rank 1, and the others died at their next
    collective with gloo's traceback."""
    import train_finetune
    import train_pretrain
    import train_seg
    os.chdir(own)  # a relative path: each rank's own file
    for kind in ("pretrain", "finetune", "seg"):
        torch.save({"kind": f"dtm_{kind}", "model": {"w": torch.zeros(4)}, "args": {}}, f"{kind}.pth")
        if rank == 1:  # its central directory's first entry unreadable (zipfile.BadZipFile once: a traceback)
            damaged = open(f"{kind}.pth", "rb").read().replace(b"PK\x01\x02", b"PK\x00\x00", 1)
            open(f"{kind}.pth", "wb").write(damaged)
    if rank == 0:
        torch.save({"model": {"w": torch.zeros(4)}}, "init.pth")
        torch.save(dtm.CLIPVisual(input_resolution=32, patch_size=16, width=64, layers=1, heads=1,
                                  output_dim=24).state_dict(), "clip.pt")
    pretrain = ["--model", "vit_tiny", "--img_size", "32", "--num_masked", "2", "--min_block", "1", "--num_workers",
                "0", "--teacher", "pixels"]
    teacher = train_pretrain.parse_args(pretrain + ["--output_dir", "teacher"])
    teacher.teacher = "clip:clip.pt"  # after the parse: its check of the file is rank 1's own, before the group
    finetune = ["--img_size", "32", "--synthetic_train", "8", "--synthetic_val", "4", "--num_workers", "0"]
    seg = ["--crop_size", "32", "--scale", "64", "48", "--stride", "24", "--channels", "16", "--demo_img_size", "48",
           "--demo_train_images", "4", "--demo_val_images", "2", "--batch_size", "2", "--num_workers", "0"]
    return [lambda: train_pretrain.train(train_pretrain.parse_args(pretrain + ["--resume", "pretrain.pth"]), d),
            lambda: train_pretrain.train(teacher, d),
            lambda: train_finetune.finetune(train_finetune.parse_args(finetune + ["--resume", "finetune.pth"]), d,
                                            None, None),
            lambda: train_finetune.finetune(train_finetune.parse_args(finetune + ["--init", "init.pth"]), d, None,
                                            None),
            lambda: train_finetune.run_eval(train_finetune.parse_args(finetune + ["--eval", "finetune.pth"]), d, None),
            lambda: train_seg.train(train_seg.parse_args(seg + ["--resume", "seg.pth"]), d),
            lambda: train_seg.train(train_seg.parse_args(seg + ["--init", "init.pth"]), d),
            lambda: train_seg.run_eval(train_seg.parse_args(seg + ["--eval", "seg.pth"]), d)]


def _continue_own_nodes_run(d, folder: str, step: int, seed: int):
    """output_dir `folder` in the working folder, each rank's own: a checkpoint-last.pth on each node, of the same size
    but saved at another step or by another run (node-local disks where each node held a run's checkpoint). The ranks
    agreed on its size and each continued its own node's: at other steps they hung at the end of the shortest; at one
    step the ranks trained on other optimizer states, their weights apart by 8e-3 after 3 steps of a tiny run."""
    os.makedirs(folder)
    torch.save({"kind": "dtm_pretrain", "step": step, "args": {"seed": seed}}, os.path.join(folder, engine.LAST))
    return engine.prepare_run(argparse.Namespace(output_dir=folder, resume="auto", fresh=False), d)


def _disagreeing_ranks_worker(rank, world_size, port, out_dir):
    """Each rank sees its own output folder and data (node-local disks): every check must stop every rank."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    import train_finetune
    d, outcomes = engine.Dist(rank=rank, world_size=world_size), []
    own = os.path.join(out_dir, f"node{rank}")
    os.makedirs(own)
    if rank == 0:  # only rank 0's folder holds a run
        open(os.path.join(own, engine.LAST), "wb").write(b"x" * 10)
    args = argparse.Namespace(output_dir=own, resume="auto", fresh=False, seed=0, batch_size=1, accum_iter=1,
                              num_workers=0)
    shared_only_by_rank0 = os.path.join(out_dir, "node0", engine.LAST)
    skipped_on_rank1 = engine.UnreadableImages(limit=5)  # a file only rank 1's loader met
    skipped_on_rank1.add([passed_over(("b.jpg", "broken"))] if rank == 1 else [""])
    resume_other = argparse.Namespace(**{**vars(args), "resume": shared_only_by_rank0 if rank == 0 else "missing.pth"})

    def build(unreadable_on):  # a dataset whose folder the ranks unreadable_on cannot read
        if rank in unreadable_on:
            raise FileNotFoundError("--data 'imgs' is not a directory.")
        return ["built"]
    checks = [lambda: engine.prepare_run(args, d),
              lambda: engine.prepare_run(resume_other, d),  # rank 1's own view is an error: it still takes part
              lambda: engine.train_loader(list(range(4 + rank)), args, d),  # 4 images on rank 0, 5 on rank 1
              lambda: engine.check_ranks_agree(d, "a value", 7, "fix"),  # agreeing ranks pass
              lambda: engine.check_dataset(list(range(3 - rank)), d, 0),
              lambda: engine.check_dataset(Recorder(4, bad={3}), d, 0),  # in rank 1's shard only
              lambda: engine.check_dataset(Recorder(4, gone={3}), d, 0),
              lambda: engine.open_log(os.path.join(shared_only_by_rank0, "sub"), None, d.is_main),  # rank 0 writes
              lambda: engine.check_dataset(list(range(5)), d, 0, count=lambda s: np.ones(1)),
              lambda: engine.unreadable_for_checkpoint(skipped_on_rank1, d, 1, lambda **fields: None),
              # fine-tuning's --eval shards each rank's own listing: a node's copy with an image less was evaluated
              lambda: train_finetune.val_loader(list(range(3 + rank)), argparse.Namespace(batch_size=2, num_workers=0),
                                                d),
              # a data folder that rank 1 alone cannot read: rank 0 went on to its next collective and died there
              lambda: engine.build_on_all_ranks(d, build, {1}),
              lambda: engine.build_on_all_ranks(d, build, {0, 1}),  # each rank's own error
              lambda: engine.build_on_all_ranks(d, build, set()),
              # a checkpoint that rank 0 alone writes, and cannot: the others died at their next collective
              lambda: engine.save_checkpoint(os.path.join(own, "dir.pth"), {"model": {}, "step": 1}),
              lambda: _continue_own_nodes_run(d, "run", step=3 - rank, seed=0),
              lambda: _continue_own_nodes_run(d, "other_run", step=3, seed=rank)]
    if rank == 0:
        os.makedirs(os.path.join(own, "dir.pth"))
    for check in checks + _checkpoints_of_rank0_only(rank, own, d):
        try:
            result = check()
            result = result.tolist() if isinstance(result, np.ndarray) else result
            outcomes.append(str(result) if isinstance(result, list) else "ok")
        except (ValueError, OSError) as e:
            outcomes.append(str(e))
    json.dump(outcomes, open(os.path.join(out_dir, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()


def _read_only_on_rank0_worker(rank, world_size, port, out_dir):
    """prepare_run where rank 0 cannot remove a killed save's temp file (a read-only mount on its node)."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    if rank == 0:
        def read_only(path):
            raise OSError(30, "Read-only file system", path)
        engine.os.remove = read_only  # this process's own os module: a spawned worker
    try:
        engine.prepare_run(run_args(os.path.join(out_dir, "run")), engine.Dist(rank=rank, world_size=world_size))
        outcome = "ok"
    except (ValueError, OSError) as e:
        outcome = str(e)
    json.dump(outcome, open(os.path.join(out_dir, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()


def test_a_temp_file_rank0_cannot_remove_stops_every_rank_with_its_message(tmp_path, run_two_gloo_ranks):
    """Rank 0 alone raised; rank 1 died in prepare_run's next collective with gloo's RuntimeError (Connection reset
    by peer), which torchrun's summary may name as the first failure."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / f"{engine.LAST}.tmp42").write_bytes(b"half")
    run_two_gloo_ranks(_read_only_on_rank0_worker, tmp_path)
    refusal = (f"--output_dir '{tmp_path / 'run'}' cannot be written to (Read-only file system): pass a folder you can "
               f"write to, or change its permissions")
    stopped = f"rank 0 of 2 ({socket.gethostname()}) stopped: {refusal}"
    assert [json.load(open(tmp_path / f"rank{rank}.json")) for rank in (0, 1)] == [stopped, stopped]  # on every rank


def test_processes_that_see_different_folders_or_data_stop_with_a_message(tmp_path, run_two_gloo_ranks):
    """Ranks that disagreed on where the run starts, or on the number of images, trained out of step and hung in a
    collective (found by a review of multi-process failures)."""
    run_two_gloo_ranks(_disagreeing_ranks_worker, tmp_path)
    outcomes = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert outcomes[0] == outcomes[1]  # every rank stops, with the same message
    (starts, resumes, images, agreed, validation, unreadable, gone, unwritable, counted, skipped, evaluated,
     built_on_one, built_on_none, built, unsaved, other_step, other_run), read = outcomes[0][:17], outcomes[0][17:]
    last = tmp_path / "node0" / engine.LAST
    assert starts == (f"the processes do not agree on where the run starts (rank 0: continues {last} (10 bytes), "
                      f"rank 1: a new run): --output_dir must be one folder that every process sees (a shared file "
                      f"system), and so must a --resume PATH; on a shared file system a node may not see a file just "
                      f"written yet: relaunch in a moment")
    assert resumes.startswith(f"the processes do not agree on where the run starts (rank 0: continues {last} (10 "
                              f"bytes), rank 1: error: --resume 'missing.pth': no such file; pass a checkpoint "
                              f"file (a run's checkpoint-last.pth in its --output_dir), or leave --resume out to "
                              f"continue the run in --output_dir)")
    assert images.startswith("the processes do not agree on the number of training images (rank 0: 4, rank 1: 5): "
                             "every process must read the same files")
    assert agreed == "ok"
    assert validation.startswith("the processes do not agree on the number of validation samples "
                                 "(rank 0: 3, rank 1: 2)")
    # a bad file in one rank's shard stops every rank, named (rank 0 alone went on into training and hung)
    assert unreadable == "1 of the 4 validation samples cannot be used; first: cannot read img3.jpg"
    assert gone == ("1 of the 4 validation samples cannot be used; first: [Errno 2] No such file or directory: "
                    "'img3.jpg'")
    assert unwritable == f"--output_dir '{last / 'sub'}' cannot be written to (Not a directory): pass a folder you " \
                         f"can write to, or change its permissions"  # found by rank 0, said by every rank
    assert counted == "[5.0]"  # check_dataset's count: over both ranks' shards, on every rank
    assert evaluated.startswith("the processes do not agree on the number of validation samples (rank 0: 3, rank 1: "
                                "4): every process must read the same files")
    assert skipped == "['b.jpg']"  # a file skipped on rank 1 is the run's, on every rank (named once, by rank 0)
    assert built_on_one == (f"rank 1 of 2 ({socket.gethostname()}) stopped: --data 'imgs' is not a directory; every "
                            f"process must read the same files (one data folder that every node sees in full)")
    assert (built_on_none, built) == ("--data 'imgs' is not a directory.", "['built']")  # where all read: the data
    assert re.fullmatch(rf"rank 0 of 2 \({socket.gethostname()}\) stopped: could not write "
                        rf"{re.escape(str(tmp_path / 'node0' / 'dir.pth'))} \(disk full, or no permission to write "
                        rf"there\?\): \[Errno 21\] Is a directory: .*; nothing was written", unsaved), unsaved
    assert re.fullmatch(r"the processes do not agree on where the run starts \(rank 0: continues run/checkpoint-last"
                        r"\.pth \(step 3, (\d+) bytes, settings (\d+)\), rank 1: continues run/checkpoint-last\.pth "
                        r"\(step 2, \1 bytes, settings \2\)\): --output_dir must be one folder .*", other_step), \
        other_step  # the same size and settings: the step tells them apart
    views = re.fullmatch(r"the processes do not agree on where the run starts \(rank 0: continues other_run/checkpoint-"
                         r"last\.pth \(step 3, (\d+) bytes, settings (\d+)\), rank 1: continues other_run/checkpoint-"
                         r"last\.pth \(step 3, \1 bytes, settings (\d+)\)\): --output_dir must be one folder .*",
                         other_run)
    assert views and views[2] != views[3], other_run  # the same size and step: the settings tell them apart
    stopped = rf"rank 1 of 2 \({socket.gethostname()}\) stopped: (.*); {re.escape(engine.SAME_CHECKPOINT)}"
    causes = [m.group(1) if (m := re.fullmatch(stopped, message)) else message for message in read]
    damaged = ("cannot be read by torch.load: it is truncated or damaged (an interrupted save or copy?) (RuntimeError: "
               "PytorchStreamReader failed reading zip archive: invalid header or archive is corrupted)")
    assert causes == [f"--resume 'pretrain.pth' {damaged}",
                      "CLIP weights file not found: 'clip.pt'. Pass the local path of OpenAI's ViT-B-16.pt (the file "
                      "clip.load('ViT-B/16') downloads) or of a state dict saved with torch.save",
                      f"--resume 'finetune.pth' {damaged}", "--init 'init.pth': no such file",
                      f"--eval 'finetune.pth' {damaged}",
                      f"--resume 'seg.pth' {damaged}", "--init 'init.pth': no such file", f"--eval 'seg.pth' {damaged}"]


def test_build_on_all_ranks_names_the_first_rank_that_stopped_and_raises_a_bug_where_it_happened(monkeypatch):
    """Three ranks (all_gather_object faked: ranks 1 and 2 cannot read their data): rank 0 stops with the first one's
    message, or with its own error where it failed too. A bug (an error raised outside this repo's checks) is raised
    where it happened, before any collective; a Dist made up for a check (no process group) builds as one process."""
    import socket
    assert engine.build_on_all_ranks(engine.Dist(rank=1, world_size=2), lambda *a: list(a), 1, 2) == [1, 2]
    gathered = []

    def all_gather_object(out, obj):
        gathered.append(obj)
        out[:] = [obj, ("node-b", "--data 'd' is not a directory."), ("node-c", "no images in 'd'")]
    monkeypatch.setattr(engine.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(engine.dist, "all_gather_object", all_gather_object)
    d = engine.Dist(rank=0, world_size=3)
    with pytest.raises(ValueError, match=r"^rank 1 of 3 \(node-b\) stopped: --data 'd' is not a directory; every "):
        engine.build_on_all_ranks(d, lambda: "built")
    with pytest.raises(json.JSONDecodeError):  # raised in json's decoder: not a user error
        engine.build_on_all_ranks(d, json.loads, "not json")

    def unreadable():
        raise FileNotFoundError("--data 'd' is not a directory.")
    with pytest.raises(FileNotFoundError, match=r"^--data 'd' is not a directory\.$"):  # every rank stopped: its own
        engine.build_on_all_ranks(d, unreadable)
    assert gathered == [None, (socket.gethostname(), "--data 'd' is not a directory.")]


RANK1_ELSEWHERE = """
import os, runpy, sys
sys.path.insert(0, {repo!r})
os.chdir({rank1_dir!r} if os.environ["RANK"] == "1" else {rank0_dir!r})  # a relative data path: each rank's own
runpy.run_path(os.path.join({repo!r}, sys.argv.pop(1)), run_name="__main__")
"""
UNREADABLE_ON_RANK1 = {  # trainer: (its flags, rank 0's folders of 2 images, rank 1's empty folders, rank 1's error)
    "train_pretrain.py": (["--data", "d", "--teacher", "pixels", "--model", "vit_tiny", "--img_size", "32",
                           "--num_masked", "2", "--min_block", "1"], ["d/a", "d/b"], ["d"],
                          "image folder 'd' has no class subfolders"),
    "train_finetune.py": (["--data", "d", "--init", "none", "--model", "vit_tiny", "--img_size", "32"],
                          ["d/train/a", "d/train/b", "d/val/a", "d/val/b"], ["d"],
                          "--data 'd' must hold train/ and val/"),
    "train_seg.py": (["--img_dir", "d/a", "--ann_dir", "d/b", "--val_img_dir", "d/a", "--val_ann_dir", "d/b",
                      "--num_classes", "3", "--init", "none", "--model", "vit_tiny", "--crop_size", "32"],
                     ["d/a", "d/b"], ["d/a", "d/b"], "no '*.jpg' images in 'd/a'"),
    # --eval of a demo run's checkpoint (demo_checkpoint) on folders: the validation set alone
    "train_finetune.py --eval": (["--data", "d"], ["d/val/a", "d/val/b"], ["d"], "--data 'd' must hold val/"),
    "train_seg.py --eval": (["--val_img_dir", "d/a", "--val_ann_dir", "d/b"], ["d/a", "d/b"], ["d/a", "d/b"],
                            "no '*.jpg' images in 'd/a'")}


def demo_checkpoint(trainer, out):
    """The checkpoint of a one-step demo run of trainer (vit_tiny at 32 px) in out."""
    flags = {"train_finetune.py": ["--img_size", "32", "--synthetic_train", "16", "--synthetic_val", "4",
                                   "--batch_size", "16", "--epochs", "1"],
             "train_seg.py": ["--crop_size", "32", "--scale", "64", "48", "--channels", "16", "--batch_size", "2",
                              "--demo_img_size", "48", "--demo_train_images", "2", "--demo_val_images", "2",
                              "--iters", "1"]}[trainer]
    importlib.import_module(trainer[:-len(".py")]).main(flags + ["--init", "none", "--num_workers", "0",
                                                                 "--output_dir", str(out)])
    return str(out / engine.LAST)


@pytest.mark.parametrize("trainer", list(UNREADABLE_ON_RANK1))
def test_a_rank_that_cannot_read_its_data_stops_every_rank_with_its_message(trainer, tmp_path):
    """Two gloo processes where rank 1's data folder is empty: rank 1 stopped with its message, rank 0 at its next
    collective with gloo's traceback, and torchrun's summary named rank 0 as the first failure."""
    flags, folders, empty, refused = UNREADABLE_ON_RANK1[trainer]
    trainer, *evaluate = trainer.split()
    if evaluate:
        flags = flags + ["--eval", demo_checkpoint(trainer, tmp_path / "trained")]
    for folder in folders:  # an image and a label map each: the segmentation folders pair them by name
        os.makedirs(tmp_path / "rank0" / folder)
        for i in range(2):
            Image.new("RGB", (40, 40)).save(tmp_path / "rank0" / folder / f"{i}.jpg")
            Image.new("L", (40, 40)).save(tmp_path / "rank0" / folder / f"{i}.png")
    for folder in empty:
        os.makedirs(tmp_path / "rank1" / folder)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(RANK1_ELSEWHERE.format(repo=HERE, rank0_dir=str(tmp_path / "rank0"),
                                              rank1_dir=str(tmp_path / "rank1")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(wrapper), trainer, *flags, "--num_workers", "0", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    for rank in (0, 1):  # the ranks' lines may interleave in the one pipe
        assert re.search(rf"error \(rank {rank} of 2, [^)]*\): rank 1 of 2 \([^)]*\) stopped: {re.escape(refused)}"
                         rf".*?; every process must read the same files", proc.stderr), proc.stderr[-3000:]


def test_a_save_into_a_folder_removed_meanwhile_names_it_and_does_not_make_it_again(tmp_path, monkeypatch):
    """A colleague's rm -rf of --output_dir mid-run: the save made the folder again and the run went on to exit 0
    without a word, its log.jsonl holding only the lines written after that save (the checkpoint's log_lines
    counting them all) and its run lock gone (train_pretrain.py, the folder removed between a log line and a save)."""
    out, path = tmp_path / "run", tmp_path / "run" / engine.LAST
    out.mkdir()
    out.rmdir()
    with pytest.raises(OSError, match=rf"^could not write {re.escape(str(path))}: {re.escape(str(out))} was removed "
                                      rf"while the run wrote there; relaunch the same command") as e:
        engine.save_checkpoint(str(path), {"model": {"w": torch.ones(2)}, "step": 1})
    assert engine.user_error_message(e.value) == str(e.value)  # one line; stops every rank (build_on_all_ranks)
    assert not out.exists()

    def removed_while_saving(obj, f):
        open(f, "wb").write(b"partial")
        os.remove(f)
        out.rmdir()

    out.mkdir()
    monkeypatch.setattr(torch, "save", removed_while_saving)
    with pytest.raises(OSError, match=rf"^could not write {re.escape(str(path))}: {re.escape(str(out))} was removed "):
        engine.save_checkpoint(str(path), {"model": {"w": torch.ones(2)}, "step": 1})


def test_a_failed_save_names_the_file_removes_its_temp_file_and_keeps_the_last_good_one(tmp_path, monkeypatch):
    path = tmp_path / engine.LAST
    state = {"model": {"w": torch.ones(2)}, "step": 3}
    engine.save_checkpoint(str(path), state)

    def disk_full(obj, f):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 16736320 vs 16736212")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=rf"could not write {re.escape(str(path))} \(disk full, or no permission to "
                                      r"write there\?\): \[enforce fail .*; the last good checkpoint there "
                                      r"is left") as e:
        engine.save_checkpoint(str(path), {**state, "step": 4})
    assert engine.user_error_message(e.value).startswith("could not write")  # one line, no traceback
    assert isinstance(e.value.__cause__, RuntimeError) and "enforce fail" in str(e.value.__cause__)  # DTM_TRACEBACK
    assert sorted(os.listdir(tmp_path)) == [engine.LAST] and torch.load(path)["step"] == 3
    with pytest.raises(OSError, match="nothing was written"):
        engine.save_checkpoint(str(tmp_path / "other.pth"), state)

    def cuda_error(obj, f):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "save", cuda_error)
    with pytest.raises(RuntimeError, match="CUDA error"):  # not the file writer's: a bug, kept as it is
        engine.save_checkpoint(str(path), state)


def test_a_checkpoint_and_a_cut_log_reach_the_disk_before_their_rename(tmp_path, monkeypatch):
    """fsync of the temp file (whole), then the rename, then fsync of the folder; a failing fsync is a failed save."""
    events, opened = [], {}
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        opened[fd] = os.path.abspath(path)
        return fd

    def fsync(fd):
        path = opened[fd]
        events.append(("fsync", path, os.path.getsize(path) if os.path.isfile(path) else None))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        real_replace(src, dst)

    for name, fake in {"open": open_, "fsync": fsync, "replace": replace}.items():
        monkeypatch.setattr(engine.os, name, fake)
    log = engine.open_log(str(tmp_path), None, True)
    for step in (1, 2, 3):
        log(step=step, loss=0.1)
    engine.open_log(str(tmp_path), {"step": 2, "log_lines": 2}, True)
    log_path = str(tmp_path / engine.LOG)
    assert events == [("fsync", f"{log_path}.tmp", os.path.getsize(log_path)),
                      ("replace", f"{log_path}.tmp", log_path), ("fsync", str(tmp_path), None)]
    assert len(open(log_path).readlines()) == 2

    events.clear()
    path = str(tmp_path / engine.LAST)
    tmp = f"{path}.tmp{os.getpid()}"
    engine.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "step": 3})
    assert events == [("fsync", tmp, os.path.getsize(path)), ("replace", tmp, path), ("fsync", str(tmp_path), None)]

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(engine.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="could not write .*Input/output error; the last good checkpoint there is left"):
        engine.save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "step": 4})
    assert not os.path.exists(tmp) and torch.load(path)["step"] == 3


def test_resume_keeps_the_old_log_whole_until_the_cut_one_replaces_it_and_says_when_it_is_short(tmp_path, capsys):
    log = engine.open_log(str(tmp_path), None, True)
    for step in (1, 2, 3):
        log(step=step, loss=0.1)
    before = (tmp_path / engine.LOG).read_text()

    def killed(src, dst):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:  # killed before the cut log replaces the old one: the old one stays
        patch.setattr(engine.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            engine.open_log(str(tmp_path), {"step": 2, "log_lines": 2}, True)
    assert (tmp_path / engine.LOG).read_text() == before
    engine.open_log(str(tmp_path), {"step": 2, "log_lines": 2}, True)
    assert run_files(tmp_path) == [engine.LOG]  # no temp file left
    assert "cut short" not in capsys.readouterr().out
    engine.open_log(str(tmp_path), {"step": 3, "log_lines": 3}, True)  # the checkpoint saw 3 lines, the log has 2
    assert "holds 2 complete lines, the checkpoint was saved when it held 3: the log was cut short" in \
        capsys.readouterr().out


def test_a_short_log_drops_the_lines_a_dead_run_wrote_after_the_checkpoint(tmp_path, capsys):
    """log.jsonl deleted mid-run (a colleague's clean-up; the run logs on into a new file), then the run died after
    logging steps 7 and 8 past its checkpoint at step 6: the short log kept them and the relaunch logged 7 and 8 again
    (a run on tiny data: steps [4, 5, 6, 7, 8, 7, 8, 9], the dead run's losses among them)."""
    log = engine.open_log(str(tmp_path), None, True)
    for step in (4, 5, 6, 7, 8):
        log(step=step, loss=0.1 if step <= 6 else 9.0)
    kept = []
    engine.open_log(str(tmp_path), {"step": 6, "log_lines": 6}, True, on_kept=kept.append)
    assert [r["step"] for r in kept] == [4, 5, 6] and "the log was cut short" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(tmp_path / engine.LOG)] == [4, 5, 6]


def test_a_short_log_keeps_the_lines_before_a_renumbering_of_the_steps(tmp_path, capsys):
    """A run at 10 steps per epoch logged steps 10..100, was resumed at 5 per epoch (step 100 became 50), logged 55 and
    60 and saved (12 lines); a node crash lost the log's last 2 lines. Those of steps 70..100, logged before the
    renumbering and so before the checkpoint, were dropped as written after it (step > 60); epochs done tell."""
    log = engine.open_log(str(tmp_path), None, True)
    for step, per_epoch in [(s, 10) for s in range(10, 101, 10)] + [(55, 5), (60, 5), (65, 5)]:
        log(step=step, epochs_done=engine.epochs_done(step, per_epoch), loss=1.0)
    lines = open(tmp_path / engine.LOG).readlines()
    (tmp_path / engine.LOG).write_text("".join(lines[:10]))  # the tail lost
    checkpoint = {"step": 60, "steps_per_epoch": 5, "log_lines": 12}
    kept = []
    engine.open_log(str(tmp_path), checkpoint, True, on_kept=kept.append)
    assert [r["step"] for r in kept] == list(range(10, 101, 10)) and "cut short" in capsys.readouterr().out
    (tmp_path / engine.LOG).write_text("".join(lines[8:]))  # the head lost: step 65, the dead run's, goes
    kept = []
    engine.open_log(str(tmp_path), checkpoint, True, on_kept=kept.append)
    assert [r["step"] for r in kept] == [90, 100, 55, 60]


def test_a_resumed_run_reads_its_log_one_line_at_a_time(tmp_path, capsys):
    """A 1600-epoch run at --log_every 1 logs 2M lines (900 MB): its resume read them whole, as lines and dicts
    (5.2 GB at its peak and 76 s, measured on 2 shared cores of an AMD EPYC VM) and kept the dicts for the run. Here
    20,000 lines, a dead run's 5 after the checkpoint's and a half line: the kept lines reach on_kept in order, and
    the memory the cut takes does not grow with the log."""
    with open(tmp_path / engine.LOG, "w") as f:
        for step in range(1, 20_006):
            f.write(json.dumps(dict(step=step, epoch=step // 1251, epochs_done=engine.epochs_done(step, 1251),
                                    loss=0.25, lr=1e-3, grad_norm=0.5, img_per_s=100.0)) + "\n")
        f.write('{"step": 20006, "lo')
    last, count = {}, [0]

    def on_kept(record):
        assert record["step"] == count[0] + 1
        last.update(record)
        count[0] += 1
    tracemalloc.start()
    try:
        log = engine.open_log(str(tmp_path), {"step": 20_000, "steps_per_epoch": 1251, "log_lines": 20_000}, True,
                              on_kept=on_kept)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert log.lines == count[0] == last["step"] == 20_000 and "dropped 1 line(s)" in capsys.readouterr().out
    assert peak < 1_000_000, peak  # read whole: 22 MB
    with open(tmp_path / engine.LOG) as f:
        assert sum(1 for _ in f) == 20_000


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full: Linux's always-full device")
def test_a_log_line_or_an_eval_result_on_a_full_disk_names_the_file_and_the_fix(tmp_path):
    """It stopped with `error: [Errno 28] No space left on device` (no file, no fix), as did one for a folder removed
    meanwhile (a colleague's rm -rf) with the bare No such file or directory. /dev/full: the kernel's ENOSPC."""
    log = engine.open_log(str(tmp_path), None, True)
    log(step=1, loss=0.5)
    os.remove(tmp_path / engine.LOG)
    os.symlink("/dev/full", tmp_path / engine.LOG)
    with pytest.raises(OSError, match=rf"^could not write a line to {re.escape(str(tmp_path / engine.LOG))} \(No "
                                      rf"space left on device\): its disk is full, or your quota there is used up: "
                                      rf"free space there, or pass another --output_dir; then relaunch the same "
                                      rf"command \(it continues from the {engine.LAST} there, if any\)$") as e:
        log(step=2, loss=0.5)
    assert engine.user_error_message(e.value) == str(e.value) and log.lines == 1
    os.symlink("/dev/full", tmp_path / "eval.jsonl")
    with pytest.raises(OSError, match=rf"^could not write the result to {re.escape(str(tmp_path / 'eval.jsonl'))} "
                                      rf"\(No space left on device\): its disk is full, .*; the result is printed "
                                      rf"above$") as e:
        engine.append_eval(str(tmp_path), {"top1": 1.0})
    assert engine.user_error_message(e.value) == str(e.value)
    gone = engine.JsonLog(str(tmp_path / "gone" / engine.LOG), True)
    with pytest.raises(OSError, match=rf"^could not write a line to .* \(No such file or directory\): "
                                      rf"{re.escape(str(tmp_path / 'gone'))} was removed while the run wrote there; "
                                      rf"then relaunch"):
        gone(step=1)


def test_a_file_system_without_fsync_saves_and_says_so_once(tmp_path, monkeypatch, capsys):
    """Some FUSE, SMB and NFS mounts refuse fsync as not supported (EINVAL, ENOTSUP): every save of every run failed
    there, blamed on a full disk or permissions. The bytes are written; only the wait for the disk is skipped. An
    fsync that fails otherwise (EIO: the bytes may be lost) is still a failed save (the test above)."""
    import errno

    def unsupported(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(engine.os, "fsync", unsupported)
    path = tmp_path / engine.LAST
    for step in (1, 2):
        engine.save_checkpoint(str(path), {"model": {"w": torch.full((2,), float(step))}, "step": step})
    assert torch.load(path)["step"] == 2 and run_files(tmp_path) == [engine.LAST]
    assert capsys.readouterr().out.count(f"note: the file system of {tmp_path} cannot fsync (Invalid argument)") == 1


def test_every_errno_of_an_fsync_not_supported_saves(tmp_path, monkeypatch):
    """ENOTSUP / EOPNOTSUPP (SMB, some FUSE mounts) and ENOSYS (no such call) as EINVAL in the test above."""
    import errno
    for code in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
        def unsupported(fd, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(engine.os, "fsync", unsupported)
        (tmp_path / "x.tmp").write_bytes(b"saved")
        engine.replace_durably(str(tmp_path / "x.tmp"), str(tmp_path / "x"))
        assert (tmp_path / "x").read_bytes() == b"saved" and not (tmp_path / "x.tmp").exists()


def test_a_refused_write_names_the_fix_its_errno_calls_for(tmp_path):
    """A user's quota used up (EDQUOT: a cluster's shared disk) is a full disk as ENOSPC is; a file not found in a
    folder that is still there (a dangling link) is no folder removed."""
    import errno
    path = str(tmp_path / engine.LOG)
    for code in (errno.ENOSPC, errno.EDQUOT):
        assert engine.write_fix(OSError(code, os.strerror(code)), path).startswith("its disk is full, or your quota")
    assert "removed" not in engine.write_fix(OSError(errno.ENOENT, "No such file or directory"), path)


def test_removing_an_interrupted_saves_temp_file_in_a_folder_this_run_cannot_write_names_the_fix(tmp_path,
                                                                                                 monkeypatch):
    """A read-only file system, or another user's run folder: it stopped with the bare Read-only file system."""
    (tmp_path / f"{engine.LAST}.tmp42").write_bytes(b"half")

    def read_only(path):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(engine.os, "remove", read_only)
    with pytest.raises(ValueError, match=rf"^--output_dir '{tmp_path}' cannot be written to \(Read-only file "
                                         rf"system\): pass a folder you can write to, or change its permissions$"):
        engine.prepare_run(run_args(tmp_path), CPU)


def test_a_user_error_under_torchrun_names_its_rank_and_host(capsys, monkeypatch):
    import socket

    def bad_flag():
        engine.check_output_dir("")

    monkeypatch.delenv("DTM_TRACEBACK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        engine.cli(bad_flag)
    # a line of its own: rank 0's progress bar may stand unfinished on the terminal or log the ranks share
    assert capsys.readouterr().err.startswith(f"\nerror (rank 1 of 2, {socket.gethostname()}): --output_dir is empty")
    monkeypatch.setenv("RANK", "0")  # rank 0 closes its own bar first (test_an_error_or_ctrl_c_during_training_...)
    with pytest.raises(SystemExit):
        engine.cli(bad_flag)
    assert capsys.readouterr().err.startswith(f"error (rank 0 of 2, {socket.gethostname()}): --output_dir is empty")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit):
        engine.cli(bad_flag)
    assert capsys.readouterr().err.startswith("error: --output_dir is empty")



BAR_ON_RANK0_HELPER = """
import sys
sys.path.insert(0, {repo!r})
import torch.distributed as dist
from tqdm import tqdm
import engine
def train():
    d = engine.setup()
    bar = tqdm(total=4, disable=not d.is_main)  # the trainers' bar: rank 0's alone
    bar.update(1)
    bar.refresh()
    dist.barrier()  # rank 0's bar is drawn, its line unfinished
    engine.check_output_dir("" if d.rank == 1 else "out")
    dist.barrier()  # rank 0 waits here until rank 1 has stopped
engine.cli(train)
"""


def test_another_ranks_error_under_torchrun_starts_its_own_line(tmp_path):
    """Rank 1's user error under torchrun, while rank 0's progress bar stood on the stderr they share (a non-finite
    loss or --max_unreadable stops every rank mid-epoch): rank 1 draws no bar of its own to close, and its line was
    printed at the end of rank 0's unfinished bar, where `grep ^error` in the job's log did not find it."""
    helper = tmp_path / "helper.py"
    helper.write_text(BAR_ON_RANK0_HELPER.format(repo=HERE))
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(helper))
    assert result.returncode != 0 and "1/4" in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.split("\n") if "--output_dir is empty" in line]
    assert lines and lines[0].startswith("error (rank 1 of 2, "), lines

def test_an_unreadable_checkpoint_picked_by_resume_auto_says_what_to_do(tmp_path):
    (tmp_path / engine.LAST).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"the run's checkpoint \(--resume auto\) .* cannot be read by torch.load.*; "
                                         r"to start over pass --fresh$"):
        engine.load_checkpoint(str(tmp_path / engine.LAST), "dtm_pretrain", auto=True)
    for name in ("checkpoint-19.pth", "checkpoint-best.pth", "log.jsonl"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"; to start over pass --fresh, or to continue an older checkpoint move this "
                                         r"one away and pass --resume with one of .*checkpoint-19.pth, "
                                         r".*checkpoint-best.pth$"):
        engine.load_checkpoint(str(tmp_path / engine.LAST), "dtm_pretrain", auto=True)


def test_an_absolute_position_embedding_is_layer_0_for_layer_decay():
    """BEiT's get_num_layer_for_vit (beit/optim_factory.py, and the segmentation constructor's): pos_embed is layer 0
    with cls_token, mask_token and patch_embed. A ViT has one when its checkpoint does (dtm.vit_from_checkpoint:
    abs_pos_emb="pos_embed" in sd); as a top-layer parameter it would train at lr x1 instead of x decay^(depth + 1)."""
    vit = dtm.build_vit("vit_tiny", img_size=32, abs_pos_emb=True)
    ids = {n: dtm.layer_id_for_param(n, vit.depth) for n, _ in vit.named_parameters()}
    assert {n for n, i in ids.items() if i == 0} == {"cls_token", "mask_token", "pos_embed", "patch_embed.weight",
                                                      "patch_embed.bias"}
    for prefix in ("", "backbone."):
        scale = engine.layer_decay_fn(vit.depth, 0.5, prefix)
        assert scale(prefix + "pos_embed") == scale(prefix + "cls_token") == 0.5 ** (vit.depth + 1)


# From a second mutation review of engine.py (19 changes that passed test_engine.py; 12 of them every test)

def test_poly_warmup_starts_at_warmup_ratio_and_rises_linearly():
    """train_seg's --warmup_ratio (any value in 0..1): the warmup factor is warmup_ratio at step 0 and rises linearly
    to 1 at warmup_steps (mmcv: 1 - (1 - step / warmup) * (1 - ratio)); the default 1e-6 cannot tell this apart."""
    lr = lambda s: engine.poly_schedule(s, 100, 10, 1.0, power=1.0, warmup_ratio=0.5)  # noqa: E731
    assert lr(0) == pytest.approx(0.5)
    assert lr(5) == pytest.approx(0.95 * 0.75)  # half way: (1 + 0.5) / 2
    assert lr(10) == pytest.approx(0.9)
    assert engine.poly_schedule(0, 100, 10, 1.0, warmup_ratio=1.0) == pytest.approx(1.0)  # ratio 1: no warmup


def test_optimizer_step_with_overflowing_fp16_gradients_skips_the_step_and_lowers_the_loss_scale():
    """A step whose unscaled gradients are not finite is skipped and GradScaler's scale halves (scaler.update()):
    without the update every later step would overflow at the same scale and be skipped too."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=1.0)
    (scaler.scale((p * torch.tensor([float("inf"), 1.0, 1.0])).sum())).backward()
    norm = engine.optimizer_step(optimizer, scaler, [p], 1.0)
    assert not torch.isfinite(norm) and torch.equal(p.detach(), torch.ones(3))  # skipped
    assert scaler.get_scale() == 512.0 and engine.loss_scale_field(scaler) == {"loss_scale": 512.0}


def test_check_finite_stops_on_infinities_as_well_as_nan(tmp_path):
    """An fp16 loss that overflowed is inf, not NaN: it stops the run too, naming every non-finite value."""
    engine.check_finite(torch.tensor([1.0, 0.0, -2.5]), ["loss", "a", "b"], 3, str(tmp_path))  # finite: nothing
    with pytest.raises(FloatingPointError, match=r"^loss, b not finite at step 4; .*no checkpoint was written"):
        engine.check_finite(torch.tensor([float("inf"), 1.0, float("-inf")]), ["loss", "a", "b"], 4, str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"^a not finite at step 5"):
        engine.check_finite(torch.tensor([1.0, float("nan")]), ["loss", "a"], 5, str(tmp_path))


def test_the_non_finite_remedy_names_only_changes_the_run_can_make():
    """A diverged run is told a lower --lr, and a wider precision only where it runs a narrower one: an fp32 run with
    the pixel teacher was told --amp bf16/fp32 (what it ran, or narrower) and --teacher_amp (refused with pixels)."""
    f16, b16 = torch.float16, torch.bfloat16
    assert engine.non_finite_remedy(None) == engine.non_finite_remedy(None, None) == "a lower --lr"
    assert engine.non_finite_remedy(b16) == "a lower --lr or --amp fp32"
    assert engine.non_finite_remedy(f16, f16) == "a lower --lr, --amp bf16/fp32 or --teacher_amp bf16/fp32"
    assert engine.non_finite_remedy(None, b16) == "a lower --lr or --teacher_amp fp32"
    with pytest.raises(FloatingPointError, match=r"\(try a lower --lr or --amp fp32\)$"):
        engine.check_finite(torch.tensor([float("nan")]), ["loss"], 1, "missing", engine.non_finite_remedy(b16))


def test_epochs_done_is_rounded_to_6_decimals_and_exact_at_an_epoch_end():
    """The log's epochs_done: steps / steps per epoch to 6 decimals (0.333333, not 0.3333333333333333)."""
    assert [engine.epochs_done(step, 3) for step in (1, 2, 3, 7)] == [0.333333, 0.666667, 1.0, 2.333333]
    assert engine.epochs_done(1251 * 4, 1251) == 4.0


def test_a_checkpoint_at_an_epoch_boundary_records_the_epoch_just_done():
    """"epoch" is the epoch of the last step done: step 4 of 2 per epoch ends epoch 1 (not 2); step 0: epoch 0."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(lr=0.1, output_dir="x")
    epochs = [engine.checkpoint_state("dtm_pretrain", model, optimizer, None, args, step, 2)["epoch"]
              for step in (0, 1, 2, 3, 4, 5)]
    assert epochs == [0, 0, 0, 1, 1, 2]


def test_all_mean_is_the_mean_over_ranks_and_leaves_its_input_alone(monkeypatch):
    """Two ranks (all_reduce faked: rank 1 holds (3, 5)): the logged loss is the mean, not the sum, of the ranks'."""
    def all_reduce(tensor):  # dist.all_reduce's default op: the sum over ranks, in place
        tensor += torch.tensor([3.0, 5.0])
    monkeypatch.setattr(engine.dist, "all_reduce", all_reduce)
    values = torch.tensor([1.0, 1.0])
    assert engine.all_mean(values, engine.Dist(rank=0, world_size=2)).tolist() == [2.0, 3.0]
    assert values.tolist() == [1.0, 1.0]
    assert engine.all_mean(values, engine.Dist()).tolist() == [1.0, 1.0]  # one process: itself


def test_own_row_is_this_ranks_row_of_as_many_processes_else_the_mean():
    """A resumed rank continues its own loss sums only from a checkpoint of as many processes; of two processes
    resumed on one, the mean (its row 0 would log rank 0's losses alone as the run's)."""
    rows, mean = torch.tensor([[1.0, 10.0], [3.0, 30.0]]), torch.tensor([2.0, 20.0])
    assert engine.own_row(rows, mean, engine.Dist(rank=1, world_size=2)).tolist() == [3.0, 30.0]
    assert engine.own_row(rows, mean, engine.Dist()).tolist() == [2.0, 20.0]
    assert engine.own_row(None, mean, engine.Dist(rank=1, world_size=2)).tolist() == [2.0, 20.0]
    sums = torch.tensor([1.0, 2.0])
    rows = engine.rank_rows(sums, engine.Dist())  # one process: a copy, as with several
    sums += 1
    assert rows.tolist() == [[1.0, 2.0]]


def test_autocast_without_a_dtype_is_off_and_with_one_casts_to_it():
    """--amp fp32 (dtype None) runs in float32: torch.autocast enabled on the CPU without a dtype would run in bf16."""
    a = torch.randn(4, 4)
    with engine.autocast(CPU, None):
        assert (a @ a).dtype == torch.float32
    with engine.autocast(CPU, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16


def test_shared_flag_bounds_are_inclusive_where_documented():
    """--max_unreadable 0 and 1 (never stop) are valid, --layer_decay 1 (no decay) is valid, a negative --min_lr is
    refused like a negative --lr."""
    import train_pretrain
    import train_seg
    for value in ("0", "1"):
        assert train_pretrain.parse_args(["--max_unreadable", value, "--data", HERE, "--teacher", "pixels"]
                                         ).max_unreadable == float(value)
    assert train_seg.parse_args(["--init", "none", "--layer_decay", "1"]).layer_decay == 1.0
    with pytest.raises(ValueError, match="--min_lr must be >= 0"):
        train_pretrain.parse_args(["--min_lr", "-0.5"])


def test_min_lr_equal_to_the_peak_is_no_warning(capsys):
    engine.warn_min_lr(0.1, 0.1, " (--lr)", engine.Dist())  # a constant lr: nothing is raised
    assert capsys.readouterr().out == ""
    engine.warn_min_lr(0.2, 0.1, " (--lr)", engine.Dist())
    assert "warning: --min_lr 0.2 is above the peak lr 0.1 (--lr)" in capsys.readouterr().out


def test_resume_drops_a_half_written_last_line_and_counts_only_complete_ones(tmp_path, capsys):
    """A run killed while writing a line leaves half of it; the resumed log must not keep it (the next line would be
    appended to it, making both unreadable), neither by the step rule of checkpoints without log_lines nor by
    counting it as one of the checkpoint's log_lines."""
    for resumed in ({"step": 5}, {"step": 5, "log_lines": 4}):
        log_file = tmp_path / engine.LOG
        log_file.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
        kept = []
        log = engine.open_log(str(tmp_path), resumed, True, on_kept=kept.append)
        assert "dropped 1 line(s) that are not complete JSON" in capsys.readouterr().out
        assert log.lines == 3 and [r["step"] for r in kept] == [1, 2, 3]
        log(step=5)
        assert [json.loads(line)["step"] for line in open(log_file)] == [1, 2, 3, 5]


def test_resume_passes_over_blank_lines_without_calling_them_half_written(tmp_path, capsys):
    """An empty line (a log edited by hand) is no line of the run's, and no half line a killed run wrote."""
    (tmp_path / engine.LOG).write_text('{"step": 1}\n\n{"step": 2}\n   \n')
    assert engine.open_log(str(tmp_path), {"step": 2, "log_lines": 2}, True).lines == 2
    assert "dropped" not in capsys.readouterr().out
    assert (tmp_path / engine.LOG).read_text() == '{"step": 1}\n{"step": 2}\n'


def test_resume_drops_a_log_line_that_is_json_but_not_an_object(tmp_path, capsys):
    """A damaged or hand-edited line that is JSON but no object ([1, 2], 7, "x"): the cut read its step or epochs_done
    from it and every relaunch failed with a traceback (AttributeError, TypeError)."""
    for resumed in ({"step": 5}, {"step": 5, "log_lines": 2}):
        log_file = tmp_path / engine.LOG
        log_file.write_text('{"step": 1}\n[1, 2]\n7\n"x"\n{"step": 2}\n')
        kept = []
        log = engine.open_log(str(tmp_path), resumed, True, on_kept=kept.append)
        assert "dropped 3 line(s) that are not complete JSON" in capsys.readouterr().out
        assert log.lines == 2 and kept == [{"step": 1}, {"step": 2}]
        assert log_file.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_resume_keeps_a_whole_last_line_that_lost_its_newline_as_a_line_of_its_own(tmp_path, capsys):
    """A log cut just before its last newline (a node crash; found by cutting logs at random bytes) ends in a whole
    line, which the checkpoint counts and the resumed log keeps: the next line was appended to it, and both were
    then one unreadable line (dropped at the next resume)."""
    for resumed in ({"step": 5}, {"step": 5, "log_lines": 2}):
        log_file = tmp_path / engine.LOG
        log_file.write_text('{"step": 1}\n{"step": 2}')
        log = engine.open_log(str(tmp_path), resumed, True)
        log(step=5)
        assert log_file.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 5}\n'
        assert engine.open_log(str(tmp_path), {"step": 5, "log_lines": 3}, True).lines == 3
    assert "not complete JSON" not in capsys.readouterr().out


def test_optimizer_state_for_more_parameters_than_this_run_trains_is_refused():
    """A checkpoint whose optimizer trained parameters this run does not (frozen since, another model part): the
    names differ in the other direction than a parameter new in this run, and are refused all the same (their
    moments would be dropped without a word)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    saved = torch.optim.AdamW(engine.param_groups(model, 0.05))
    model(torch.randn(2, 3)).sum().backward()
    saved.step()
    model[1].requires_grad_(False)  # fewer trained parameters now
    fewer = torch.optim.AdamW(engine.param_groups(model, 0.05))
    with pytest.raises(ValueError, match=r"for other parameters than this run trains \(2 differ, e\.g\. \['1.bias', "
                                         r"'1.weight'\]\)"):
        engine.regrouped_optimizer_state(fewer, saved.state_dict(), "ck.pth")


def test_each_new_run_keeps_every_older_log(tmp_path):
    """Three runs started afresh in one folder: log.1.jsonl and log.2.jsonl hold the first two runs' lines."""
    for run in (1, 2, 3):
        engine.open_log(str(tmp_path), None, True)(run=run)
    assert [json.loads(line)["run"] for name in ("log.1.jsonl", "log.2.jsonl", engine.LOG)
            for line in open(tmp_path / name)] == [1, 2, 3]


def test_a_new_run_reuses_an_empty_log_and_keeps_no_empty_copy_of_it(tmp_path):
    """A run that logged nothing (stopped before its first line) leaves an empty log.jsonl: the next new run writes
    into it; log.N.jsonl copies are of logs with lines."""
    engine.open_log(str(tmp_path), None, True)
    engine.open_log(str(tmp_path), None, True)(run=2)
    assert run_files(tmp_path) == [engine.LOG] and (tmp_path / engine.LOG).read_text() == '{"run": 2}\n'


def test_log_lines_are_strict_json_with_tensors_as_numbers(tmp_path):
    log = engine.open_log(str(tmp_path), None, True)
    log(step=1, loss=torch.tensor(float("nan")), grad_norm=float("inf"), lr=torch.tensor(0.5))
    line = (tmp_path / engine.LOG).read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == {
        "step": 1, "loss": None, "grad_norm": None, "lr": 0.5}


def test_step_timer_adds_up_the_laps_of_each_part_over_the_micro_batches(monkeypatch):
    """With --accum_iter > 1 a part (data_s, step_s) is lapped once per micro-batch: the logged time is their sum."""
    clock = [0.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])
    timer = engine.StepTimer(torch.device("cpu"))
    timer.start(exact=True)
    for data_s, step_s in ((1.0, 2.0), (1.0, 3.0)):  # two micro-batches
        clock[0] += data_s
        timer.lap("data_s")
        clock[0] += step_s
        timer.lap("step_s")
    assert timer.parts == {"data_s": 2.0, "step_s": 5.0}
    timer.start(exact=False)  # a step that is not logged: not timed
    clock[0] += 1.0
    timer.lap("data_s")
    assert timer.parts == {}


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # imported by torch.compile
def test_unwrap_removes_a_torch_compile_wrapper():
    model = torch.nn.Linear(3, 2)
    assert engine.unwrap(torch.compile(model)) is model  # compiles nothing until called


def test_a_saved_path_this_locale_cannot_encode_is_another_path_not_a_traceback(tmp_path):
    """A checkpoint's --data 'été' (written under a UTF-8 locale) read where file names are ASCII (LC_ALL=C with
    PYTHONUTF8=0; 日本 under a Latin-1 locale likewise): os.path.samefile raised UnicodeEncodeError, a traceback on
    resume. The folder this process lists as 'été' ('\\udcc3\\udca9t\\udcc3\\udca9') cannot be told to be the
    same: the setting is listed as changed."""
    (tmp_path / "\u00e9t\u00e9").mkdir()
    code = ("import json, sys, engine; listed, saved = sys.argv[1], json.loads(sys.argv[2])\n"
            "print(engine.same_path(listed, listed), engine.same_path(saved, listed))")
    folder = str(tmp_path / "\u00e9t\u00e9")
    result = subprocess.run([sys.executable, "-c", code, folder, json.dumps(folder)], cwd=HERE, text=True,
                            capture_output=True, env=dict(os.environ, LC_ALL="C", PYTHONUTF8="0",
                                                          PYTHONIOENCODING="utf-8"))
    assert result.returncode == 0 and result.stdout == "True False\n", result.stderr


def test_resume_with_the_init_the_run_started_from_none_or_a_path_not_there_any_more(tmp_path, monkeypatch):
    """--init none given again on resume is the same --init (no file to compare); so is a relative path spelled
    otherwise, also when the file is gone."""
    monkeypatch.chdir(tmp_path)
    assert engine.same_path("none", "none") and engine.same_path("sub/../gone.pth", "gone.pth")
    assert not engine.same_path("none", "gone.pth")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(lr=0.1, output_dir="x", init="none", resume="auto", fresh=False)
    state = engine.checkpoint_state("dtm_finetune", model, optimizer, None, args, 2, 2)
    assert engine.resume(state, "ck.pth", model, optimizer, None, args, 2, engine.Dist()) == 2
    assert args.init == "none"


def test_resume_takes_the_init_that_moved_with_its_run_and_still_refuses_another(tmp_path, monkeypatch, capsys):
    """A folder holding the pre-training and the fine-tuning runs moved (a study's --out): the same command relaunched,
    relative or with the new absolute paths, continues (it was refused, naming the gone path as the fix); another
    file is still another --init."""
    (tmp_path / "tree" / "pre").mkdir(parents=True)
    (tmp_path / "tree" / "pre" / "ck.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "tree")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(lr=0.1, output_dir="ft", init="pre/ck.pth", resume="auto", fresh=False)
    state = engine.checkpoint_state("dtm_finetune", model, optimizer, None, args, 2, 2)
    (tmp_path / "tree").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    moved = str(tmp_path / "moved" / "pre" / "ck.pth")
    for spelled, last in (("pre/ck.pth", "ft/checkpoint-last.pth"), (moved, str(tmp_path / "moved" / "ft" / "c.pth"))):
        again = argparse.Namespace(**{**vars(args), "init": spelled})
        assert engine.resume(state, last, model, optimizer, None, again, 2, engine.Dist()) == 2
        assert again.init == moved
        assert f"{tmp_path / 'tree' / 'pre' / 'ck.pth'}, which is gone; --init lies where it lay beside the run " \
               f"(moved with it); taking --init {spelled} as that file" in capsys.readouterr().out
    (tmp_path / "moved" / "other.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="--init other.pth .* would be ignored"):
        engine.resume(state, "ft/checkpoint-last.pth", model, optimizer, None,
                      argparse.Namespace(**{**vars(args), "init": "other.pth"}), 2, engine.Dist())


def test_a_checkpoint_of_2_processes_resumes_mid_epoch_on_2_or_on_1_with_the_same_samples_per_step(monkeypatch):
    """The checkpoint records the number of processes (faked: 2), which the samples per step of a mid-epoch restart
    count: the same run on 2 processes continues, as does 1 process with twice the batch."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    args = argparse.Namespace(lr=0.1, output_dir="x", batch_size=4, accum_iter=1)
    with monkeypatch.context() as m:
        m.setattr(engine.dist, "is_initialized", lambda: True)
        m.setattr(engine.dist, "get_world_size", lambda group=None: 2)
        state = engine.checkpoint_state("dtm_finetune", model, optimizer, None, args, 5, steps_per_epoch=4)
    assert state["world_size"] == 2
    assert engine.resume(state, "ck.pth", model, optimizer, None, args, 4, engine.Dist(world_size=2)) == 5
    one = argparse.Namespace(**{**vars(args), "batch_size": 8})
    assert engine.resume(state, "ck.pth", model, optimizer, None, one, 4, engine.Dist()) == 5


# ---------------------------------------------------------------------------------------------------
# third mutation review of engine.py


def test_poly_schedule_power_and_min_lr_values_written_out():
    """mmcv's PolyLrUpdaterHook: (base - min) * (1 - step/total)^power + min, the warmup factor applied to that value;
    values written out (test_seg's lr checks call poly_schedule itself, the tests above only power 1 and min at the
    end)."""
    lr = lambda s: engine.poly_schedule(s, 100, 10, 1.0, power=2.0, min_value=0.1, warmup_ratio=0.5)  # noqa: E731
    assert lr(50) == pytest.approx(0.9 * 0.25 + 0.1)  # (1 - 0.5)^2 of the way from min to base
    assert lr(90) == pytest.approx(0.9 * 0.01 + 0.1)
    assert lr(5) == pytest.approx((0.9 * 0.95 ** 2 + 0.1) * 0.75)  # warmup factor 0.5 -> 1, half way
    assert engine.poly_schedule(75, 100, 0, 0.01, power=0.9, min_value=1e-4) == pytest.approx(
        (0.01 - 1e-4) * 0.25 ** 0.9 + 1e-4)  # mmseg's configs' power 0.9


def test_step_timer_times_a_logged_step_from_its_start_not_from_the_last_logged_step(monkeypatch):
    """_t moves only on timed (exact) steps: without the tick in start() a logged step's first part would also count
    every untimed step since the previous logged one (--log_every steps)."""
    clock = [0.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])
    timer = engine.StepTimer(torch.device("cpu"))
    timer.start(exact=True)
    clock[0] += 1.0
    timer.lap("data_s")
    for _ in range(3):  # untimed steps
        timer.start(exact=False)
        clock[0] += 10.0
        timer.lap("data_s")
    clock[0] += 100.0  # between the last untimed step's end and the next logged step's start
    timer.start(exact=True)
    clock[0] += 2.0
    timer.lap("data_s")
    clock[0] += 3.0
    timer.lap("step_s")
    assert timer.parts == {"data_s": 2.0, "step_s": 3.0}


def test_set_run_length_takes_a_continued_runs_own_length_over_a_new_runs():
    """A relaunch without --epochs / --warmup_epochs continues with the checkpoint's (a 300-epoch run relaunched with
    the defaults must not become an 800-epoch run with another cosine); given flags win; a new run gets the defaults."""
    new_run = {"epochs": 800, "warmup_epochs": 40}
    args = argparse.Namespace(epochs=None, warmup_epochs=None)
    engine.set_run_length(args, new_run, {"epochs": 300, "warmup_epochs": 10, "lr": 1.0})
    assert (args.epochs, args.warmup_epochs) == (300, 10)
    args = argparse.Namespace(epochs=400, warmup_epochs=None)
    engine.set_run_length(args, new_run, {"epochs": 300, "warmup_epochs": 10})
    assert (args.epochs, args.warmup_epochs) == (400, 10)
    args = argparse.Namespace(epochs=None, warmup_epochs=None)
    engine.set_run_length(args, new_run, None)
    assert (args.epochs, args.warmup_epochs) == (800, 40)
    args = argparse.Namespace(epochs=None, warmup_epochs=None)
    engine.set_run_length(args, new_run, {"epochs": 300})  # a checkpoint without the flag: the new run's
    assert (args.epochs, args.warmup_epochs) == (300, 40)


def test_grad_sync_skips_the_all_reduce_except_on_the_last_micro_batch(tmp_path, monkeypatch):
    """Under DDP the gradients are all-reduced on the last micro-batch of a step only (no_sync on the others):
    inverted, no step would ever average the ranks' gradients. A one-process gloo group, destroyed after."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # init_process_group wraps it, destroy leaves it so
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
        with engine.grad_sync(model, last_micro=False):
            assert not model.require_backward_grad_sync
        assert model.require_backward_grad_sync
        with engine.grad_sync(model, last_micro=True):
            assert model.require_backward_grad_sync
    finally:
        torch.distributed.destroy_process_group()
    plain = torch.nn.Linear(3, 2)
    with engine.grad_sync(plain, last_micro=False):  # no DDP: nothing to skip
        pass


def test_resume_of_a_run_that_counts_steps_keeps_the_step_under_another_batch(capsys):
    """Segmentation (counts_steps: --iters and the poly schedule count steps): another batch keeps the saved step, at
    an epoch boundary too (renumbering it as pre-training does would move the lr schedule and the run's end), and
    mid-epoch is accepted."""
    model = torch.nn.Linear(3, 2)
    args = argparse.Namespace(model="vit_tiny", lr=0.1, betas=(0.9, 0.98), output_dir="x", demo=False, batch_size=4,
                              accum_iter=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    other = argparse.Namespace(**{**vars(args), "batch_size": 8})
    for step in (10, 7):  # epoch boundary (5 steps per epoch), mid-epoch
        state = engine.checkpoint_state("dtm_seg", model, optimizer, None, args, step, steps_per_epoch=5)
        assert engine.resume(state, "ck.pth", model, optimizer, None, other, 2, CPU, counts_steps=True) == step
    assert "step 7 is kept" in capsys.readouterr().out


def test_another_training_set_size_under_another_batch_is_said_without_the_rest_of_the_epoch(capsys):
    """Segmentation resumed mid-epoch with another batch continues at its step's place in the new order already (said
    above it): a changed number of training images is then said by its sizes alone, not as the reason the rest of
    the epoch differs."""
    model = torch.nn.Linear(3, 2)
    args = argparse.Namespace(model="vit_tiny", lr=0.1, betas=(0.9, 0.98), output_dir="x", demo=False, batch_size=4,
                              accum_iter=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = engine.checkpoint_state("dtm_seg", model, optimizer, None, args, 7, 5, train_images=20)
    other = argparse.Namespace(**{**vars(args), "batch_size": 8})
    assert engine.resume(state, "ck.pth", model, optimizer, None, other, 2, CPU, counts_steps=True,
                         train_images=19) == 7
    out = capsys.readouterr().out
    assert "note: 'ck.pth' was saved with 20 training images, this run has 19\n" in out and "rest of epoch" not in out


# ---------------------------------------------------------------------------------------------------
# resume: what it calls a change, older checkpoints (tests for a mutation test's survivors)

def test_a_layer_scale_switched_on_or_off_is_a_changed_model_not_a_kept_initial_value(capsys):
    """--layer_scale 0 builds no layer-scale weights: 0.1 -> 0 (or 0 -> 0.1) is another model, which resume refuses
    naming the change; it is not 'kept' with a note (that note is for another non-zero initial value only)."""
    for saved, given in ((0.1, 0.0), (0.0, 0.1)):
        state = tiny_state(torch.nn.Linear(3, 2), layer_scale=saved)
        other = torch.nn.Linear(4, 2)  # stands for the model built with the other layer scale
        args = argparse.Namespace(model="vit_tiny", lr=0.1, betas=(0.9, 0.98), output_dir="x", demo=False,
                                  layer_scale=given)
        with pytest.raises(ValueError, match=rf"saved with other settings \(--layer_scale {saved} -> {given}\)"):
            engine.resume(state, "ck.pth", other, torch.optim.AdamW(other.parameters()), None, args, 2, CPU)
        assert "keeps --layer_scale" not in capsys.readouterr().out and args.layer_scale == given


def test_bookkeeping_flags_changed_on_a_relaunch_are_not_reported_as_changed_settings(capsys):
    """--num_workers, --log_every, --save_every, ... change nothing the run computes: not 'settings changed'."""
    model = torch.nn.Linear(3, 2)
    flags = {"num_workers": 4, "log_every": 50, "save_every": 1, "keep_every": 20, "eval_every": 1, "max_steps": None}
    state = tiny_state(model, **flags)
    for name in flags:
        args = argparse.Namespace(model="vit_tiny", lr=0.1, betas=(0.9, 0.98), output_dir="y", demo=False,
                                  **{**flags, name: 7})
        engine.resume(state, "ck.pth", model, torch.optim.AdamW(model.parameters()), None, args, 2, CPU)
        out = capsys.readouterr().out
        assert "resumed from ck.pth at step 3" in out and "settings changed" not in out, (name, out)


def test_a_path_flag_saved_as_text_and_given_as_another_type_is_a_changed_setting(capsys):
    """A flag saved as a path and now None or a number is reported as changed, not compared as a path."""
    model = torch.nn.Linear(3, 2)
    state = tiny_state(model, data="imnet", teacher="ckpt:t.pth")
    args = argparse.Namespace(model="vit_tiny", lr=0.1, betas=(0.9, 0.98), output_dir="y", demo=False, data=None,
                              teacher=7)
    engine.resume(state, "ck.pth", model, torch.optim.AdamW(model.parameters()), None, args, 2, CPU)
    assert "settings changed since: --data imnet -> None, --teacher ckpt:t.pth -> 7" in capsys.readouterr().out


def test_init_recorded_relative_and_resolved_from_another_folder_is_not_a_changed_setting(tmp_path, monkeypatch,
                                                                                              capsys):
    """A run started with --init pre.pth (relative), relaunched without --init from another folder: args.init becomes
    the recorded absolute path; that is the same --init, not a setting changed since."""
    model = torch.nn.Linear(3, 2)
    (tmp_path / "pre.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(model="vit_tiny", lr=0.1, output_dir="x", demo=False, init="pre.pth")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = engine.checkpoint_state("dtm_finetune", model, optimizer, None, args, 2, steps_per_epoch=2)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    unset = argparse.Namespace(**{**vars(args), "init": None})
    capsys.readouterr()
    assert engine.resume(state, "ck.pth", model, optimizer, None, unset, 2, CPU) == 2
    assert unset.init == str(tmp_path / "pre.pth")
    out = capsys.readouterr().out
    assert "resumed from ck.pth at step 2" in out and "settings changed" not in out, out


def test_data_moved_together_with_the_run_is_not_a_changed_setting(tmp_path, monkeypatch, capsys):
    """The data and the run's folder moved together, the same command relaunched at the new place (relative, or with
    the new absolute paths): resume listed --data and --teacher ckpt: as changed settings, naming the old paths."""
    for name in ("data", "pre"):
        (tmp_path / "tree" / name).mkdir(parents=True)
    (tmp_path / "tree" / "pre" / "t.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "tree")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    args = argparse.Namespace(lr=0.1, output_dir="run", data="data", teacher="ckpt:pre/t.pth")
    state = engine.checkpoint_state("dtm_pretrain", model, optimizer, None, args, 2, steps_per_epoch=2)
    (tmp_path / "tree").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    capsys.readouterr()
    for folder, teacher in (("data", "ckpt:pre/t.pth"), (str(tmp_path / "moved" / "data"),
                                                         f"ckpt:{tmp_path / 'moved' / 'pre' / 't.pth'}")):
        again = argparse.Namespace(**{**vars(args), "data": folder, "teacher": teacher})
        assert engine.resume(state, "run/checkpoint-last.pth", model, optimizer, None, again, 2, CPU) == 2
        out = capsys.readouterr().out
        assert "resumed from run/checkpoint-last.pth at step 2" in out and "settings changed" not in out, out


def test_a_resume_path_continues_a_run_in_an_empty_folder_and_does_not_read_init(tmp_path):
    """--resume PATH continues PATH's run (also into a new output_dir, or one with --fresh): --init is not read, so
    an --init that names a checkpoint this output_dir's runs write is not refused; train_seg's 'pass --init' check
    (continues_a_run) does not apply."""
    old, out = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    out.mkdir()
    (old / engine.LAST).write_bytes(b"x")
    (out / "checkpoint-20.pth").write_bytes(b"x")
    for fresh in (False, True):
        args = run_args(out, resume=str(old / engine.LAST), fresh=fresh)
        assert engine.continues_a_run(args)
        assert engine.prepare_run(args, CPU, new_run_reads={"--init": str(out / "checkpoint-20.pth")}) == \
            (str(old / engine.LAST), False)
        engine.release_output_dirs()


def test_a_ckpt_teacher_path_written_another_way_is_not_a_changed_setting(tmp_path, monkeypatch, capsys):
    """As test_resume_does_not_call_a_path_written_another_way_a_changed_setting does for clip:, for ckpt:."""
    monkeypatch.chdir(tmp_path)
    open("t.pth", "wb").close()
    model = torch.nn.Linear(3, 2)
    state = tiny_state(model)
    state["args"].update(teacher="ckpt:t.pth")
    args = argparse.Namespace(**{**state["args"], "teacher": f"ckpt:{tmp_path / 't.pth'}"})
    capsys.readouterr()
    engine.resume(state, "ck.pth", model, torch.optim.AdamW(model.parameters()), None, args, 2, CPU)
    assert capsys.readouterr().out == "resumed from ck.pth at step 3\n"


def test_a_damaged_zip_directory_is_named_as_damaged_whatever_zipfile_raises(tmp_path):
    """zipfile raises more than BadZipFile on a damaged checkpoint (found by flipping each bit of one): a name not in
    UTF-8 (UnicodeDecodeError), a zip64 locator of two disks (BadZipFile from is_zipfile), a zip version it does not
    know (NotImplementedError); each gave zipfile's traceback before torch.load was tried."""
    torch.save({"model": {"w": torch.zeros(1000)}, "kind": "dtm_seg"}, tmp_path / "full.pth")
    raw = (tmp_path / "full.pth").read_bytes()
    entry, locator = raw.find(b"PK\x01\x02"), raw.find(b"PK\x06\x07")

    def damaged(name, *edits):
        data = bytearray(raw)
        for at, value in edits:
            data[at] = value
        (tmp_path / name).write_bytes(bytes(data))
        return str(tmp_path / name)

    for path in (damaged("name.pth", (entry + 9, raw[entry + 9] | 0x08), (entry + 46, 0xFF)),
                 damaged("disks.pth", (locator + 16, 2))):
        with pytest.raises(ValueError, match=r"--resume '.*\.pth' cannot be read by torch.load: it is truncated or "
                                             r"damaged \(an interrupted save or copy\?\) \(RuntimeError: "):
            engine.load_checkpoint(path, "dtm_seg")
    assert engine.load_checkpoint(damaged("version.pth", (entry + 6, 128)), "dtm_seg")["kind"] == "dtm_seg"  # read


def test_a_checkpoint_whose_optimizer_groups_have_no_parameter_names_loads_as_saved():
    """A checkpoint saved before param_groups recorded param_names (or by an optimizer built without them) resumes
    into an optimizer that has them: loaded as saved (position by position), not a KeyError."""
    torch.manual_seed(0)
    model = dtm.build_vit("vit_tiny", img_size=32, depth=2)
    args = argparse.Namespace(model="vit_tiny", lr=0.1, output_dir="x", demo=False)
    optimizer = torch.optim.AdamW(engine.param_groups(model, 0.05))
    model.forward_features(torch.randn(2, 3, 32, 32)).tokens.square().mean().backward()
    optimizer.step()
    state = engine.checkpoint_state("dtm_finetune", model, optimizer, None, args, 4, steps_per_epoch=2)
    for group in state["optimizer"]["param_groups"]:
        del group["param_names"]
    resumed = torch.optim.AdamW(engine.param_groups(model, 0.05))
    assert engine.resume(state, "ck.pth", model, resumed, None, args, 2, CPU) == 4
    for p in model.parameters():
        if p in optimizer.state:
            assert torch.equal(resumed.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])


def test_setup_refuses_a_partial_torchrun_environment(monkeypatch):
    """RANK without WORLD_SIZE/MASTER_*, or WORLD_SIZE 2 without RANK, is a one-line error naming torchrun (it was a
    KeyError traceback, torch's rendezvous traceback, or silently one process); WORLD_SIZE 1 alone is one process."""
    for name in engine.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="RANK is set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not: .*torchrun"):
        engine.setup()
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE is 2 but RANK is not set.*unset WORLD_SIZE"):
        engine.setup()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert engine.setup().world_size == 1


def test_rank_with_one_torchrun_variable_missing_names_it(monkeypatch):
    """RANK set with all but one of torchrun's other variables is refused too, naming the one missing (a partial
    environment was refused only with two or more of them missing)."""
    for name in engine.TORCHRUN_ENV:
        monkeypatch.setenv(name, "1")
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(ValueError, match="^RANK is set but MASTER_PORT is not: launch with torchrun"):
        engine.check_launch_env()


def test_setup_reads_an_empty_rank_as_unset(monkeypatch):
    """An empty RANK (RANK= python ..., an exported unset variable) is unset to check_launch_env: one process, or its
    refusal of WORLD_SIZE 2 without RANK; setup read it as set and stopped with int()'s "invalid literal for int()
    with base 10: ''", naming no variable."""
    for name in engine.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("RANK", "")
    assert engine.setup() == engine.Dist()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE is 2 but RANK is not set.*unset WORLD_SIZE"):
        engine.setup()


def test_setup_reads_an_empty_local_rank_as_0_and_names_a_variable_that_is_no_number(monkeypatch, capsys):
    """LOCAL_RANK= (export LOCAL_RANK=$SLURM_LOCALID with it unset) stopped setup with int()'s "invalid literal for
    int() with base 10: ''", naming no variable, as RANK= did; now rank 0's process group starts. A value that is no
    number is named."""
    for name in engine.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    started = []
    monkeypatch.setattr(engine.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(engine.dist, "init_process_group", lambda *args, **kwargs: started.append((args, kwargs)))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("LOCAL_RANK", "")
    assert engine.setup() == engine.Dist()
    assert started == [(("gloo",), {"rank": 0, "world_size": 1})]
    monkeypatch.setenv("LOCAL_RANK", " ")  # blank: empty too
    assert engine.launch_int("LOCAL_RANK") == 0
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"^WORLD_SIZE='two' is not a whole number: torchrun sets it; unset it"):
        engine.setup()
    monkeypatch.delenv("DTM_TRACEBACK", raising=False)
    with pytest.raises(SystemExit):  # the one line, not a traceback from the rank's prefix of that line
        engine.cli(engine.setup)
    assert "WORLD_SIZE='two' is not a whole number" in capsys.readouterr().err



def test_setup_names_a_process_without_a_gpu_of_its_own(monkeypatch, capsys):
    """torchrun --nproc_per_node 8 (the README's command) on a node with fewer GPUs: the processes past the GPU count
    stopped in torch.cuda.set_device with "CUDA error: invalid device ordinal" and a traceback (torch's own error,
    raised here by a stand-in: this machine has no GPU); now one line naming --nproc_per_node."""
    for name in engine.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(engine, "check_gpu_supported", lambda device: None)
    chosen = []

    def set_device(index):
        if index >= 4:
            raise RuntimeError("CUDA error: invalid device ordinal")
        chosen.append(index)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(engine.dist, "is_initialized", lambda: True)  # no process group started
    for name, value in (("WORLD_SIZE", "8"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    for rank in (3, 4):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        if rank < 4:
            assert engine.setup().device == torch.device("cuda", 3) and chosen == [3]
            continue
        monkeypatch.delenv("DTM_TRACEBACK", raising=False)
        with pytest.raises(SystemExit):
            engine.cli(engine.setup)
        assert capsys.readouterr().err.endswith(
            "): LOCAL_RANK=4, but this node has 4 GPUs visible and each process takes one: launch at most 4 processes "
            "per node (torchrun --nproc_per_node 4), or make more GPUs visible (CUDA_VISIBLE_DEVICES)\n")

LAUNCHERS = [("srun", "SLURM_STEP_NUM_TASKS"), ("mpirun", "OMPI_COMM_WORLD_SIZE"), ("mpirun", "PMI_SIZE")]


@pytest.mark.parametrize("launcher, size", LAUNCHERS)
def test_setup_refuses_tasks_of_another_launcher_without_torchrun(monkeypatch, launcher, size):
    """Each of the N processes srun or mpirun starts without torchrun's variables trained alone, as N runs of one
    process (into one --output_dir all but one stopped, their message naming another run). One task is one process;
    torchrun started by the launcher sets RANK and WORLD_SIZE, and is not refused."""
    for name in engine.TORCHRUN_ENV + tuple(var for _, var in LAUNCHERS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["train_seg.py"])
    monkeypatch.setenv(size, "4")
    with pytest.raises(ValueError, match=rf"^this process is one of 4 that {launcher} started \({size}=4\) without "
                                         rf"torchrun's RANK and WORLD_SIZE, so each would train alone, as 4 separate "
                                         rf"runs: .*torchrun --nnodes NODES --nproc_per_node N .* train_seg.py"):
        engine.setup()
    monkeypatch.setenv(size, "1")
    assert engine.setup() == engine.Dist()
    monkeypatch.setenv(size, "4")
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *args, **kwargs: None)
    assert engine.setup() == engine.Dist()
