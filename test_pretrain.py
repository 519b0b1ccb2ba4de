"""Tests of train_pretrain.py: the shared plumbing, one DTM step, exact resume, and 2-process DDP (gloo, CPU)."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import dtm
import train_pretrain as tp

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """12 random 40x40 PNGs in 2 class folders: with --batch_size 4 one process has 3 steps per epoch."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        folder = root / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(root)


def tiny_argv(data, out, *extra):
    return ["--data", data, "--teacher", "pixels", "--model", "vit_tiny", "--img_size", "32", "--batch_size", "4",
            "--num_masked", "2", "--min_block", "1", "--epochs", "3", "--warmup_epochs", "1", "--lr", "0.05",
            "--drop_path", "0.1", "--num_workers", "0", "--amp", "fp32", "--log_every", "1",
            "--output_dir", str(out), *extra]


# ---------------------------------------------------------------------------------------------------
# plumbing

def test_cosine_schedule_values():
    f = lambda step: tp.cosine_schedule(step, total_steps=110, warmup_steps=10, base_value=1.0, final_value=0.1)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)  # end of warmup: the base value
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(85) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.75)))
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # stays at the final value
    assert tp.cosine_schedule(0, 10, 0, 2.0, 0.0) == pytest.approx(2.0)  # no warmup


def test_param_groups_no_decay_membership_and_lr_scale():
    student = dtm.build_vit("vit_tiny", img_size=32)
    model = dtm.DTMPretrainModel(student, 8)
    groups = tp.param_groups(model, 0.05, lr_scale_fn=lambda n: 0.5 if n.startswith("student.blocks.0.") else 1.0)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
    no_decay = {n for n, g in by_name.items() if g["weight_decay"] == 0.0}
    for name in ["student.cls_token", "student.mask_token", "student.rel_pos_bias.table", "student.patch_embed.bias",
                 "student.blocks.0.norm1.weight", "student.blocks.1.attn.q_bias", "student.blocks.1.gamma_1",
                 "student.norm.bias", "head.bias"]:
        assert name in no_decay, name
    for name in ["student.patch_embed.weight", "student.blocks.0.attn.qkv.weight", "student.blocks.1.mlp.fc1.weight",
                 "head.weight"]:
        assert by_name[name]["weight_decay"] == 0.05, name
    assert by_name["student.blocks.0.attn.qkv.weight"]["lr_scale"] == 0.5
    assert by_name["student.blocks.1.attn.qkv.weight"]["lr_scale"] == 1.0
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    tp.set_lr(optimizer, 0.2)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [0.1, 0.2]
    student.cls_token.requires_grad_(False)  # frozen parameters are left out
    assert "student.cls_token" not in {n for g in tp.param_groups(model, 0.05) for n in g["param_names"]}


def test_resolve_amp_on_cpu():
    assert tp.resolve_amp("auto", "cpu") == (None, None)
    assert tp.resolve_amp("fp32", torch.device("cpu")) == (None, None)
    assert tp.resolve_amp("bf16", "cpu") == (torch.bfloat16, None)
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        tp.resolve_amp("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown --amp"):
        tp.resolve_amp("fp8", "cpu")


def test_checkpoint_and_rng_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    tp.seed_everything(3)
    state = tp.rng_state()
    path = str(tmp_path / "sub" / "ck.pth")
    tp.save_checkpoint(path, {"model": model.state_dict(), "epoch": 2, "rng": state})
    assert not [f for f in os.listdir(tmp_path / "sub") if ".tmp" in f]  # the temp file was renamed
    first = (torch.rand(3), np.random.rand(), __import__("random").random())
    loaded = tp.load_checkpoint(path)
    assert loaded["epoch"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    tp.set_rng_state(loaded["rng"])
    again = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]

    with pytest.raises(FileNotFoundError, match="not found"):
        tp.load_checkpoint(str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint"):
        tp.load_checkpoint(str(tmp_path / "junk.pth"))
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="'model' entry"):
        tp.load_checkpoint(str(tmp_path / "other.pth"))


def test_json_logger_and_unwrap(tmp_path):
    logger = tp.JsonLogger(str(tmp_path / "log.jsonl"))
    logger.log(step=1, loss=torch.tensor(0.5))
    logger.log(step=2, loss=0.25)
    tp.JsonLogger(str(tmp_path / "log.jsonl"), enabled=False).log(step=3)
    lines = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert lines == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    inner = torch.nn.Linear(2, 2)
    assert tp.unwrap(torch.compile(inner)) is inner and tp.unwrap(inner) is inner


# ---------------------------------------------------------------------------------------------------
# the DTM step, data determinism, argument handling

def test_train_steps_decrease_loss_on_fixed_batch():
    args = tp.parse_args(["--teacher", "pixels", "--model", "vit_tiny", "--img_size", "32", "--drop_path", "0",
                          "--num_masked", "2", "--min_block", "1", "--amp", "fp32"])
    d = tp.Dist(0, 1, 0, torch.device("cpu"), True)
    torch.manual_seed(0)
    model, teacher = tp.build_model(args, d)
    optimizer = torch.optim.AdamW(tp.param_groups(model, 0.05), lr=2e-3, betas=(0.9, 0.98))
    images = torch.randn(4, 3, 32, 32)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, 1] = True
    timer = tp.StepTimer(d.device)
    losses = []
    for _ in range(4):  # the same micro_step: the same schedules on the same batch
        timer.start(exact=True)
        stats = tp.train_micro_step(model, teacher, images, mask, args, 7, d, None, None, timer,
                                    __import__("contextlib").nullcontext())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(stats["loss"].item())
    assert set(timer.parts) >= {"teacher_s", "morph_s", "student_s"}
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_samples_depend_only_on_seed_epoch_index(image_folder):
    args = tp.parse_args(tiny_argv(image_folder, "unused"))
    d = tp.Dist(0, 1, 0, torch.device("cpu"), True)
    loader, _ = tp.build_loader(args, d)
    dataset = loader.dataset
    img, mask = dataset[(0, 5)]
    torch.rand(7)  # global RNG draws in between do not matter
    img2, mask2 = dataset[(0, 5)]
    assert torch.equal(img, img2) and torch.equal(mask, mask2) and int(mask.sum()) == 2
    assert not torch.equal(img, dataset[(1, 5)][0])  # a new epoch: a new augmentation


def test_demo_defaults_and_explicit_flags():
    args = tp.parse_args([])
    assert args.demo and args.model == "vit_tiny" and args.teacher == "pixels" and args.img_size == 112
    args = tp.parse_args(["--epochs", "1", "--model", "vit_s"])
    assert args.demo and args.epochs == 1 and args.model == "vit_s"
    args = tp.parse_args(["--data", HERE, "--teacher", "pixels"])
    assert not args.demo and args.model == "vit_b" and args.img_size == 224 and args.num_masked == 75
    assert tuple(args.betas) == (0.9, 0.98) and args.lr == 1.5e-3 and args.clip_grad == 3.0 and args.max_merged is None


@pytest.mark.parametrize("argv, error, match", [
    (["--data", "/no/such/dir", "--teacher", "pixels"], FileNotFoundError, "not a directory"),
    (["--data", HERE], ValueError, "--teacher is required"),
    (["--teacher", "dino:x"], ValueError, "bad --teacher"),
    (["--teacher", "clip:/no/such/ViT-B-16.pt"], FileNotFoundError, "no file"),
    (["--img_size", "100"], ValueError, "not divisible"),
    (["--num_masked", "60"], ValueError, "--num_masked"),
])
def test_bad_arguments(argv, error, match):
    with pytest.raises(error, match=match):
        tp.parse_args(argv)


def test_resume_rejects_foreign_checkpoint(image_folder, tmp_path):
    torch.save({"model": {}, "epoch": 0}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="not a checkpoint of train_pretrain.py"):
        tp.main(tiny_argv(image_folder, tmp_path / "out", "--resume", str(tmp_path / "foreign.pth")))


# ---------------------------------------------------------------------------------------------------
# exact resume and DDP

def test_resume_mid_epoch_is_bit_identical(image_folder, tmp_path):
    """3 steps per epoch: stop at step 2 (mid-epoch), resume to step 5 == 5 steps in one go."""
    full = tp.main(tiny_argv(image_folder, tmp_path / "full", "--max_steps", "5"))
    tp.main(tiny_argv(image_folder, tmp_path / "split", "--max_steps", "2"))
    checkpoint = tp.load_checkpoint(str(tmp_path / "split" / "checkpoint-last.pth"))
    assert checkpoint["step"] == 2 and checkpoint["kind"] == "dtm_pretrain" and checkpoint["args"]["max_steps"] == 2
    assert set(checkpoint) >= {"model", "optimizer", "scaler", "epoch", "step", "args", "rng"}
    resumed = tp.main(tiny_argv(image_folder, tmp_path / "split", "--max_steps", "5", "--resume", "auto"))
    assert resumed["step"] == 5
    full_params, resumed_params = full["model"].state_dict(), resumed["model"].state_dict()
    for name, value in full_params.items():
        assert torch.equal(value, resumed_params[name]), name
    assert os.path.isfile(tmp_path / "full" / "checkpoint-last.pth")
    logs = [[json.loads(l) for l in open(tmp_path / run / "log.jsonl")] for run in ("full", "split")]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]


HELPER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import train_pretrain as tp
result = tp.main(sys.argv[1:])
torch.save(result["model"].state_dict(), os.path.join(result["output_dir"], f"rank{{os.environ['RANK']}}.pt"))
"""


@pytest.mark.parametrize("mto_flags", [(), ("--mto", "--mto_layers", "2")], ids=["dtm", "dtm+mto"])
def test_torchrun_two_processes_identical_parameters(image_folder, tmp_path, mto_flags):
    helper = tmp_path / "helper.py"
    helper.write_text(textwrap.dedent(HELPER.format(repo=HERE)))
    out = tmp_path / "ddp"
    # 12 images / 2 ranks / batch 2 / accum 2 -> 1 step per epoch: 3 epochs, 3 steps, no_sync on micro-batch 0
    argv = tiny_argv(image_folder, out, "--batch_size", "2", "--accum_iter", "2", "--log_every", "2", *mto_flags)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(helper), *argv], cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    checkpoint = tp.load_checkpoint(str(out / "checkpoint-last.pth"))
    assert checkpoint["step"] == 3 and checkpoint["steps_per_epoch"] == 1
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
        assert torch.equal(value, checkpoint["model"][name]), name
    lines = [json.loads(l) for l in open(out / "log.jsonl")]
    assert [r["step"] for r in lines] == [2, 3]  # every --log_every steps and the last step
    fields = {"step", "epoch", "loss", "loss_level0", "loss_level1", "lr", "grad_norm", "img_per_s",
              "teacher_s", "morph_s", "student_s"}
    if mto_flags:
        fields |= {"loss_dtm", "loss_sing", "loss_ent"}
    for r in lines:
        assert fields <= set(r), fields - set(r)
        dtm_part = r["loss_dtm"] if mto_flags else r["loss"]
        assert math.isfinite(r["loss"]) and dtm_part == pytest.approx((r["loss_level0"] + r["loss_level1"]) / 2)
        if mto_flags:  # default lambdas 0.1 and 0.1
            assert r["loss"] == pytest.approx(r["loss_dtm"] + 0.1 * r["loss_sing"] + 0.1 * r["loss_ent"])
            assert r["loss_sing"] != 0 and 0 < r["loss_ent"] <= 1  # a max cosine (can be < 0); a normalized entropy
