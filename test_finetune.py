"""Tests for train_finetune.py: layer decay, checkpoint loading, loss, exact-once distributed evaluation, training,
resume and --eval (CPU, tiny ViT at 32x32 pixels, SyntheticShapes)."""
import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import data
import dtm
import engine
import train_finetune as tf

HERE = os.path.dirname(os.path.abspath(__file__))
IMG, NUM_CLASSES = 32, 5
# the demo path (no --data flags) on small SyntheticShapes sets; 13 validation images: odd, and uneven over 2 ranks
TINY_RUN = ["--img_size", str(IMG), "--synthetic_train", "48", "--synthetic_val", "13", "--batch_size", "16",
            "--num_workers", "0", "--log_every", "1", "--warmup_epochs", "1", "--lr", "0.05", "--init", "none"]


def last_line(path):
    with open(path) as f:
        return json.loads(f.read().splitlines()[-1])


def tiny_pretrain_checkpoint(path, img_size=IMG):
    """A train_pretrain.py-style checkpoint: DTMPretrainModel (student with a shared, non-zero relative position
    bias and a mask token, plus the pre-training head) under "model"."""
    torch.manual_seed(0)
    student = dtm.build_vit("vit_tiny", img_size=img_size, rel_pos_bias="shared")
    with torch.no_grad():
        student.rel_pos_bias.table.normal_(0, 0.5)
        student.mask_token.normal_()
    pretrain = dtm.DTMPretrainModel(student, target_dim=8)
    torch.save({"kind": "dtm_pretrain", "model": pretrain.state_dict(), "optimizer": {}, "scaler": None, "epoch": 0,
                "args": {"model": "vit_tiny", "img_size": img_size}}, path)
    return student.eval()


def classifier(img_size=IMG, **overrides):
    return dtm.build_vit("vit_tiny", img_size=img_size, num_classes=NUM_CLASSES, use_mask_token=False,
                         **{"rel_pos_bias": "per_block", **overrides})


def from_checkpoint(path, img_size=IMG, num_classes=NUM_CLASSES, **kw):
    return dtm.vit_from_checkpoint(dtm.read_checkpoint(str(path)), img_size, num_classes, path=str(path), **kw)


def naive_layer_id(name, depth):
    if name.split(".")[0] in ("patch_embed", "cls_token", "pos_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_layer_decay_and_weight_decay_of_every_parameter_group():
    model = classifier()
    depth, decay, lr, wd = model.depth, 0.6, 1e-3, 0.05
    optimizer = tf.build_optimizer(model, lr, wd, decay)
    seen = []
    for group in optimizer.param_groups:
        for name, p in zip(group["param_names"], group["params"]):
            seen.append(name)
            scale = decay ** (depth + 1 - naive_layer_id(name, depth))
            assert group["lr"] == pytest.approx(lr * scale, rel=1e-12), name
            # the official rule (utils/optim_factory.py:73) for this model: no pos_embed, no 0-d params
            no_decay = p.ndim == 1 or name.endswith(".bias") or name == "cls_token"
            assert group["weight_decay"] == (0.0 if no_decay else wd), name
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())
    lrs = {n: g["lr"] for g in optimizer.param_groups for n in g["param_names"]}
    assert lrs["head.weight"] == pytest.approx(lr) and lrs["fc_norm.weight"] == pytest.approx(lr)
    assert lrs["patch_embed.weight"] == pytest.approx(lr * decay ** (depth + 1))
    assert lrs["blocks.0.attn.rel_pos_bias.table"] == pytest.approx(lr * decay ** depth)
    wds = {n: g["weight_decay"] for g in optimizer.param_groups for n in g["param_names"]}
    for name in ("cls_token", "blocks.0.norm1.weight", "blocks.0.gamma_1", "blocks.0.attn.q_bias", "fc_norm.bias",
                 "head.bias"):
        assert wds[name] == 0.0, name
    for name in ("patch_embed.weight", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight", "head.weight",
                 "blocks.3.attn.rel_pos_bias.table"):  # position tables are decayed, as in the official code
        assert wds[name] == wd, name
    assert tf.PAPER_LAYER_DECAY["vit_l"] == 0.8


def test_pretrain_checkpoint_gives_the_students_features(tmp_path):
    student = tiny_pretrain_checkpoint(tmp_path / "pre.pth")
    model, fresh = from_checkpoint(tmp_path / "pre.pth", rel_pos_bias="per_block")
    model.eval()
    assert fresh == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert model.mask_token is None and isinstance(model.norm, torch.nn.Identity)  # dropped: pre-training only
    for block in model.blocks:  # the shared table, copied into every block
        assert torch.equal(block.attn.rel_pos_bias.table, student.rel_pos_bias.table)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        last = student.forward_features(x, return_layers=[-1]).layers[3]  # last block, before the pre-training norm
        torch.testing.assert_close(model.forward_features(x).tokens, last, rtol=1e-5, atol=1e-5)
        # the classifier: fc_norm(mean of patch tokens) -> head
        torch.testing.assert_close(model(x), model.head(model.fc_norm(last[:, 1:].mean(1))))
    # another input size: position tables resized, loads and runs
    bigger, _ = from_checkpoint(tmp_path / "pre.pth", img_size=48, rel_pos_bias="per_block")
    assert bigger.blocks[0].attn.rel_pos_bias.table.shape[0] == (2 * 3 - 1) ** 2 + 3
    assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, NUM_CLASSES)
    # a fine-tuned classifier: fc_norm and a head of the same classes are loaded, another number of classes is not
    torch.save({"kind": "dtm_finetune", "model": model.state_dict(), "args": {"model": "vit_tiny"}},
               tmp_path / "ft.pth")
    again, fresh = from_checkpoint(tmp_path / "ft.pth")
    assert fresh == [] and torch.equal(again.eval()(x), model(x))
    _, fresh = from_checkpoint(tmp_path / "ft.pth", num_classes=3)
    assert fresh == ["head.bias", "head.weight"]


def test_rel_pos_bias_reaches_the_model_built_on_init(tmp_path):
    """--rel_pos_bias shared keeps --init's shared table, per_block moves it into the blocks (build_model passing
    per_block whatever was asked passed every test)."""
    tiny_pretrain_checkpoint(tmp_path / "pre.pth")
    checkpoint = dtm.read_checkpoint(str(tmp_path / "pre.pth"))
    for layout in ("shared", "per_block"):
        args = argparse.Namespace(model="vit_tiny", img_size=IMG, drop_path=0.0, rel_pos_bias=layout)
        model, _ = tf.build_model(args, NUM_CLASSES, checkpoint, str(tmp_path / "pre.pth"))
        assert dtm.stored_rel_pos_bias(model.state_dict()) == layout


def test_new_weights_start_as_the_official_fine_tuning_models(tmp_path):
    """From scratch (--init none) and a new head on a checkpoint: timm's trunc_normal_ (std 0.02, bounds +-2), as
    modeling_finetune.py, not the pre-training model's truncation at +-std (no weight beyond 0.02 there)."""
    args = tf.get_args_parser().parse_args(["--model", "vit_tiny", "--img_size", str(IMG)])
    torch.manual_seed(0)
    scratch, _ = tf.build_model(args, NUM_CLASSES)
    assert scratch.blocks[0].attn.qkv.weight.abs().max() > 0.04
    assert scratch.head.weight.abs().max() > 0.02 * 0.001  # scaled by --init_scale's 0.001 after the draw
    tiny_pretrain_checkpoint(tmp_path / "pre.pth")
    model, fresh = from_checkpoint(tmp_path / "pre.pth", rel_pos_bias="per_block")
    assert "head.weight" in fresh and model.head.weight.abs().max() > 0.02 * 0.001


def test_checkpoint_errors_name_the_problem(tmp_path):
    tiny_pretrain_checkpoint(tmp_path / "pre.pth")
    with pytest.raises(ValueError, match="pass --model vit_tiny"):
        from_checkpoint(tmp_path / "pre.pth", model="vit_s")
    other = dtm.VisionTransformer(img_size=IMG, embed_dim=96, depth=4, num_heads=3, rel_pos_bias="none")
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")  # tables would tell the heads
    with pytest.raises(ValueError, match="cannot tell the number of heads.*torch.save\\({'model': sd, 'args': "
                                         "{'num_heads': H}}, path\\)"):
        from_checkpoint(tmp_path / "other.pth")
    torch.save({"model": other.state_dict(), "args": {"num_heads": 3}}, tmp_path / "other.pth")  # as it says
    assert from_checkpoint(tmp_path / "other.pth")[0].blocks[0].attn.num_heads == 3
    sd = dtm.vit_state_dict(dtm.read_checkpoint(str(tmp_path / "pre.pth")))
    per_block = dtm.adapt_state_dict(sd, classifier())
    torch.save({"model": per_block, "args": {"model": "vit_tiny"}}, tmp_path / "per_block.pth")
    with pytest.raises(ValueError, match="laid out 'per_block'; they convert to per-block tables only"):
        from_checkpoint(tmp_path / "per_block.pth", rel_pos_bias="shared")
    truncated = {k: v for k, v in sd.items() if not k.startswith("blocks.2.mlp")}
    torch.save({"model": truncated, "args": {"model": "vit_tiny"}}, tmp_path / "truncated.pth")
    with pytest.raises(ValueError, match="missing keys.*blocks.2.mlp.fc1.weight"):
        from_checkpoint(tmp_path / "truncated.pth")
    torch.save({"model": {**sd, "blocks.0.extra": torch.zeros(2)}, "args": {"model": "vit_tiny"}}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="unexpected keys.*blocks.0.extra"):
        from_checkpoint(tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError, match="no such file"):
        tf.main(TINY_RUN[:-1] + [str(tmp_path / "missing.pth"), "--output_dir", str(tmp_path / "m")])
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="holds no ViT"):
        tf.main(TINY_RUN[:-1] + [str(tmp_path / "foreign.pth"), "--output_dir", str(tmp_path / "f")])
    with pytest.raises(ValueError, match="--init none"):
        tf.main(["--data_train", str(tmp_path), "--data_val", str(tmp_path)])
    for flag in ("--resume", "--eval"):  # a pre-training checkpoint is for --init only
        with pytest.raises(ValueError, match=f"{flag} .* is not a checkpoint of train_finetune.py.*--init"):
            tf.main(TINY_RUN + [flag, str(tmp_path / "pre.pth"), "--output_dir", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="--img_size 40 is not a positive multiple of the patch size 16"):
        tf.main(TINY_RUN + ["--img_size", "40"])
    with pytest.raises(ValueError, match="--batch_size 15 is odd.*--mixup 0 --cutmix 0"):
        tf.main(TINY_RUN + ["--batch_size", "15"])
    assert tf.parse_args(TINY_RUN + ["--batch_size", "15", "--mixup", "0", "--cutmix", "0"]).batch_size == 15
    assert tf.parse_args(["--eval", "ckpt.pth", "--batch_size", "15"]).batch_size == 15  # evaluation mixes nothing


def test_the_demo_fine_tunes_on_the_pretraining_demos_images():
    """The fine-tuning demo (no data flags) trains on the very images the pre-training demo pre-trained on (seed 0,
    drawn at 112 * 8 // 7 = 128 px; --crop_ratio 0.875 gives the same size) and validates on others (seed 1)."""
    import train_pretrain
    ft_train, ft_val, _ = tf.build_datasets(tf.parse_args([]))
    pt_train = train_pretrain.build_dataset(train_pretrain.parse_args([])).base
    assert ft_train.img_size == pt_train.img_size == ft_val.img_size == 128
    first = [dataset.get(0)[0] for dataset in (ft_train, pt_train, ft_val)]
    assert np.array_equal(np.asarray(first[0]), np.asarray(first[1]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[2]))


def test_a_checkpoint_without_position_tables_is_noted(tmp_path, capsys):
    """--rel_pos_bias per_block (the default) converts the tables a checkpoint has; one without gets none, and says
    so; --rel_pos_bias shared, which would do nothing there, is refused."""
    vit = dtm.build_vit("vit_tiny", img_size=IMG, rel_pos_bias="none")
    torch.save({"model": vit.state_dict(), "args": {"model": "vit_tiny"}}, tmp_path / "plain.pth")
    tf.main(TINY_RUN[:-1] + [str(tmp_path / "plain.pth"), "--epochs", "1", "--output_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "plain.pth has no relative position tables, so neither has this model" in out
    assert "nor an absolute position embedding: it has no position information" in out
    # --rel_pos_bias shared ran bit for bit as per_block there (found by combining flags at random): refused
    with pytest.raises(ValueError, match=r"^--rel_pos_bias shared would do nothing with --init .*plain.pth: it has no "
                                         r"relative position tables, so neither has this model: leave it out$"):
        tf.main(TINY_RUN[:-1] + [str(tmp_path / "plain.pth"), "--rel_pos_bias", "shared", "--epochs", "1",
                                 "--output_dir", str(tmp_path / "shared")])


def test_soft_target_cross_entropy_matches_definition():
    torch.manual_seed(0)
    logits = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    target = torch.distributions.Dirichlet(torch.ones(7)).sample((6,)).double()
    loss = tf.soft_target_cross_entropy(logits, target)
    log_p = logits - logits.exp().sum(1, keepdim=True).log()
    reference = -(target * log_p).sum(1).mean()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-6)
    loss.backward()  # d loss / d logits = (softmax - target) / B
    torch.testing.assert_close(logits.grad, (logits.softmax(1) - target).detach() / 6, rtol=1e-5, atol=1e-6)
    labels = torch.tensor([0, 3, 6, 2, 2, 1])
    z = logits.detach().float()
    one_hot = F.one_hot(labels, 7).float()
    torch.testing.assert_close(tf.soft_target_cross_entropy(z, one_hot), F.cross_entropy(z, labels))
    torch.testing.assert_close(tf.soft_target_cross_entropy(z, data.smooth_one_hot(labels, 7, 0.1)),
                               F.cross_entropy(z, labels, label_smoothing=0.1))


class FixedLogits(torch.nn.Module):
    """Image i (a (1,) tensor holding i) -> logits[i]; records whether it was called in training mode."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.modes = logits, []

    def forward(self, images):
        self.modes.append(self.training)
        return self.logits[images[:, 0].long()]


def test_evaluate_counts_top1_top5_and_runs_in_eval_mode():
    """6 classes; the labels rank 1st, 1st, 5th and 6th in their images' logits: top-1 50%, top-5 75%."""
    order = torch.tensor([5, 4, 3, 2, 1, 0], dtype=torch.float32)  # class 0 scores highest, then 1, ...
    logits = order.expand(4, 6).clone()
    labels = torch.tensor([0, 0, 4, 5])
    model = FixedLogits(logits).train()
    loader = [(torch.tensor([[0.0], [1.0]]), labels[:2]), (torch.tensor([[2.0], [3.0]]), labels[2:])]
    stats = tf.evaluate(model, loader, torch.device("cpu"))
    assert stats["top1"] == 50.0 and stats["top5"] == 75.0 and stats["count"] == 4
    assert stats["loss"] == pytest.approx(F.cross_entropy(logits, labels).item())
    assert model.modes == [False, False]  # drop path and dropout off
    five = FixedLogits(logits[:, :5])  # 5 classes: top-5 is every class, 100% whatever the rank of the label
    assert tf.evaluate(five, [(torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([0, 1, 4, 3]))],
                       torch.device("cpu"))["top5"] == 100.0


def test_each_rank_draws_its_own_mixing_and_drop_path():
    """seed_step takes the rank: with one seed every rank mixed its batch with the same lambda and box."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 1])
    args = argparse.Namespace(seed=0, accum_iter=1)
    losses = [tf.train_micro_step(model, images, labels, data.Mixup(num_classes=3), args, 0,
                                  engine.Dist(rank=rank, world_size=2), None, None) for rank in (0, 1)]
    assert losses[0] != losses[1]


def test_micro_step_gradient_is_divided_by_accum_iter():
    """With --accum_iter 2 each micro-batch contributes half its gradient, so two of them sum to the mean."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 1])
    mixup = data.Mixup(prob=0.0, num_classes=3)
    grads = {}
    for accum in (1, 2):
        model.zero_grad()
        args = argparse.Namespace(seed=0, accum_iter=accum)
        tf.train_micro_step(model, images, labels, mixup, args, 0, engine.Dist(), None, None)
        grads[accum] = model[1].weight.grad.clone()
    torch.testing.assert_close(grads[2], grads[1] / 2)


def test_eval_crop_ratio_follows_the_image_size_unless_given():
    assert tf.parse_args(["--init", "none"]).crop_ratio == 0.875  # the demo's 112 px
    assert tf.parse_args(["--init", "none", "--img_size", "384"]).crop_ratio == 1.0  # BEiT v2 at 384 px
    assert tf.parse_args(["--init", "none", "--img_size", "384", "--crop_ratio", "0.9"]).crop_ratio == 0.9


def test_eval_takes_the_crop_ratio_the_checkpoint_was_trained_with(tmp_path, capsys):
    tf.main(TINY_RUN + ["--epochs", "1", "--crop_ratio", "0.5", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "the warmup (--warmup_epochs, 3 steps) lasts the whole run (3 steps)" in out
    assert out.startswith("DEMO (no --data): vit_tiny learns 10 classes of built-in SyntheticShapes images at 32 px "
                          "(48 for training, 13 for validation), 1 epoch on cpu.")  # as the other demos say
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl") if "val_top1" in line][-1]
    eval_run = ["--eval", str(tmp_path / "checkpoint-last.pth"), "--synthetic_val", "13", "--batch_size", "16",
                "--num_workers", "0", "--output_dir", str(tmp_path / "eval")]
    stats = tf.main(eval_run)
    record = last_line(tmp_path / "eval" / "eval.jsonl")
    assert record["crop_ratio"] == 0.5 and record["img_size"] == IMG
    assert record["data_val"] is None and record["amp"] == "fp32"  # the demo's images; the precision evaluated in
    assert stats["top1"] == logged["val_top1"] and stats["loss"] == pytest.approx(logged["val_loss"], rel=1e-6)
    other = tf.main(eval_run + ["--crop_ratio", "0.875"])  # given, it wins; the default crop sees other pixels
    assert last_line(tmp_path / "eval" / "eval.jsonl")["crop_ratio"] == 0.875
    assert other["loss"] != pytest.approx(logged["val_loss"], rel=1e-6)


def test_a_demo_folder_started_from_scratch_is_not_continued_once_a_pretrain_checkpoint_exists(tmp_path, monkeypatch,
                                                                                                capsys):
    """The demo fine-tunes output/pretrain_demo's checkpoint if there is one: a relaunch after pre-training must not
    silently finish the from-scratch run in the same folder (engine.resume refuses another --init)."""
    monkeypatch.chdir(tmp_path)
    demo_run = TINY_RUN[:-2] + ["--epochs", "1", "--output_dir", "ft"]  # without --init: the demo chooses
    tf.main(demo_run)
    assert torch.load("ft/checkpoint-last.pth")["args"]["init"] == "none"
    os.makedirs("output/pretrain_demo")
    tiny_pretrain_checkpoint(tf.DEMO_PRETRAIN_CHECKPOINT)
    with pytest.raises(ValueError, match="ft holds a demo run started from --init none; the demo now finds the "
                                         "pre-training checkpoint .* add --fresh .* or pass --init none to continue"):
        tf.main(demo_run)
    capsys.readouterr()
    tf.main(demo_run + ["--init", "none"])  # continues the run from scratch, which is finished: nothing to do
    out_text = capsys.readouterr().out
    assert "holds a finished run" in out_text and "short end-to-end check" not in out_text
    tf.main(demo_run + ["--fresh"])
    saved = torch.load("ft/checkpoint-last.pth")
    assert saved["args"]["init"] == tf.DEMO_PRETRAIN_CHECKPOINT  # as given: relative
    # from another folder the demo finds no pre-training checkpoint; the fix it names continues the run
    os.makedirs("elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    elsewhere = demo_run[:-1] + ["../ft", "--epochs", "2"]
    with pytest.raises(ValueError, match=f"started from --init {saved['init_abspath']}; the demo now no longer finds"
                                         f".* pass --init {saved['init_abspath']} to continue that run"):
        tf.main(elsewhere)
    tf.main(elsewhere + ["--init", saved["init_abspath"]])
    monkeypatch.chdir(tmp_path)
    tf.main(demo_run + ["--epochs", "3"])  # and back here the demo's own choice continues it
    saved = torch.load("ft/checkpoint-last.pth")
    assert saved["epoch"] == 2 and saved["init_abspath"] == os.path.abspath(tf.DEMO_PRETRAIN_CHECKPOINT)


def test_rand_augment_flag():
    assert tf.parse_rand_augment("rand-m9-mstd0.5-inc1") == dict(rand_num_ops=2, rand_magnitude=9.0,
                                                                 rand_magnitude_std=0.5, rand_increasing=True)
    # fields left out take timm's defaults (rand_augment_transform): magnitude 10, 2 ops, std 0, the original ops
    assert tf.parse_rand_augment("rand-m7-n3") == dict(rand_num_ops=3, rand_magnitude=7.0, rand_magnitude_std=0.0,
                                                       rand_increasing=False)
    assert tf.parse_rand_augment("rand-mstd1") == dict(rand_num_ops=2, rand_magnitude=10.0, rand_magnitude_std=1.0,
                                                       rand_increasing=False)
    assert tf.parse_rand_augment("none") == dict(rand_num_ops=0)
    for empty in (["--aa", ""], ["--aa= "]):  # timm's way to turn it off; not the generic empty-value refusal, whose
        with pytest.raises(ValueError, match="an empty --aa .* pass --aa none to turn it off"):  # fix was the default
            tf.parse_args(empty)
    unreadable = "cannot read --aa .*: use 'rand-m<magnitude>-mstd<std>"
    for bad, message in (("auto", unreadable), ("rand-x9", unreadable), ("rand-mnine", unreadable),
                         ("rand-m9-inc2", unreadable), ("rand-m9-inc0", "inc0 is ambiguous .*; write inc1"),
                         ("rand-m9-mstd101", "mstd > 100 .* is not supported; use a Gaussian std")):
        with pytest.raises(ValueError, match=message):  # each its own refusal, not the one before it in the code
            tf.parse_rand_augment(bad)
    original = data.FinetuneTransform(32, **tf.parse_rand_augment("rand-m9-mstd0.5")).rand_augment.ops
    increasing = data.FinetuneTransform(32, **tf.parse_rand_augment("rand-m9-mstd0.5-inc1")).rand_augment.ops
    assert original == list(data.RAND_OPS) and increasing == list(data.RAND_INCREASING_OPS)
    assert tf.parse_rand_augment("rand-m10")["rand_magnitude"] == 10.0
    assert tf.parse_rand_augment("rand-m9-mstd100")["rand_magnitude_std"] == 100.0  # the largest accepted
    assert tf.parse_args(["--reprob", "1"]).reprob == 1.0  # [0, 1], both ends
    with pytest.raises(ValueError, match="magnitude 99 is above 10, the strongest level .* use m0..m10"):
        tf.parse_rand_augment("rand-m99")  # accepted before: clipped to 10 without a word


def test_a_few_steps_reduce_the_loss_on_builtin_data():
    torch.manual_seed(0)
    shapes = data.SyntheticShapes(32, IMG, num_classes=NUM_CLASSES, seed=0, transform=data.EvalTransform(IMG, 1.0))
    images = torch.stack([shapes[i][0] for i in range(32)])
    labels = torch.tensor([shapes[i][1] for i in range(32)])
    model = classifier(rel_pos_bias="per_block")
    optimizer = tf.build_optimizer(model, 1e-3, 0.05, 0.75)
    no_mix = data.Mixup(0.0, 0.0, label_smoothing=0.0, num_classes=NUM_CLASSES)

    def loss_now():
        with torch.no_grad():
            return F.cross_entropy(model.eval()(images), labels).item()

    before = loss_now()
    args = type("Args", (), dict(accum_iter=2, seed=0))
    model.train()
    for step in range(10):
        for micro, half in enumerate((slice(0, 16), slice(16, 32))):
            loss = tf.train_micro_step(model, images[half], labels[half], no_mix, args, 2 * step + micro,
                                       engine.Dist(), None, None)
            assert loss.shape == () and not loss.requires_grad
        engine.optimizer_step(optimizer, None, model.parameters(), 1.0)
    after = loss_now()
    assert after < before - 0.3, (before, after)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """Two epochs of the tiny run, keeping a copy of the checkpoint after each epoch."""
    out = tmp_path_factory.mktemp("ft")
    original = engine.save_checkpoint

    def keep_each_epoch(path, state):
        original(path, state)
        if path.endswith(engine.LAST):
            shutil.copy(path, f"{path}.epoch{state['epoch']}")

    engine.save_checkpoint = keep_each_epoch
    try:
        best = tf.main(TINY_RUN + ["--epochs", "2", "--output_dir", str(out)])
    finally:
        engine.save_checkpoint = original
    return out, best


def test_the_epoch_lines_carry_their_epoch_and_its_mean_training_loss(finetuned):
    lines = [json.loads(line) for line in open(finetuned[0] / "log.jsonl")]
    steps, epochs = [r for r in lines if "loss" in r], [r for r in lines if "train_loss" in r]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(0, 3), (1, 6)]
    assert [r["epochs_done"] for r in epochs] == [1.0, 2.0]  # 3 steps per epoch
    assert [r["epochs_done"] for r in steps] == [round(s / 3, 6) for s in range(1, 7)]
    for record in epochs:  # --log_every 1: the epoch's loss is the mean of its logged steps'
        losses = [r["loss"] for r in steps if r["epoch"] == record["epoch"]]
        assert len(losses) == 3 and record["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)


def test_the_progress_bar_names_the_epoch_of_each_step_done(tmp_path, monkeypatch, recording_bar):
    """3 steps per epoch, a log line every 2: step 4's bar says epoch 1, as the log does (it said epoch 0 until the
    next log line)."""
    monkeypatch.setattr(tf, "tqdm", recording_bar)
    tf.main(TINY_RUN + ["--epochs", "2", "--log_every", "2", "--output_dir", str(tmp_path)])
    assert recording_bar.updates == [(1, "epoch 0"), (2, "epoch 0"), (3, "epoch 0"), (4, "epoch 1"), (5, "epoch 1"),
                                    (6, "epoch 1")]


def test_a_fractional_warmup_is_rounded_to_steps(tmp_path):
    """--warmup_epochs 0.5 of 3 steps per epoch: 2 warmup steps (round(1.5)), from lr 0 (it was truncated to none)."""
    tf.main(TINY_RUN + ["--epochs", "1", "--warmup_epochs", "0.5", "--lr", "0.05", "--output_dir", str(tmp_path)])
    lrs = [r["lr"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "lr" in r]
    assert len(lrs) == 3 and lrs[0] == 0.0 and lrs[2] > 0 and lrs[1] == pytest.approx(lrs[2] / 2)  # 0, half, peak


def test_a_warmup_that_rounds_to_no_step_is_refused(tmp_path):
    """--warmup_epochs 0.1 of 3 steps per epoch rounds to no warmup step: it ran as --warmup_epochs 0, bit for bit,
    while the start-up line said '0.1 of warmup' (found by combining flags at random); now refused, naming the fix."""
    with pytest.raises(ValueError, match=r"--warmup_epochs 0.1 is 0.3 of the 3 optimizer steps per epoch, which rounds "
                                         r"to no warmup step: pass --warmup_epochs 0 for none, or at least 0.333"):
        tf.main(TINY_RUN + ["--epochs", "1", "--warmup_epochs", "0.1", "--output_dir", str(tmp_path)])


def test_fine_tuning_from_a_fine_tuned_classifier_keeps_its_head(finetuned, tmp_path, capsys):
    """--init of a classifier with the same classes: everything loads, and the line says so (no empty list); with as
    many classes of other names, a new head (it was kept: found by the fine-tuning options review)."""
    out, _ = finetuned
    init = out / "checkpoint-last.pth"
    tf.main(TINY_RUN + ["--epochs", "1", "--init", str(init), "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"loaded {init}\n" in out and f"\nvit_tiny (init {init}): " in out
    tf.main(TINY_RUN + ["--epochs", "1", "--output_dir", str(tmp_path / "scratch")])  # TINY_RUN: --init none
    assert "\nvit_tiny (init none: from scratch): " in capsys.readouterr().out
    # the same number of classes, other names: the head's rows would stand for other classes; a new head
    checkpoint = torch.load(init)
    first = checkpoint["classes"][0]
    checkpoint["classes"] = ["zebra"] + checkpoint["classes"][1:]
    torch.save(checkpoint, tmp_path / "other.pth")
    tf.main(TINY_RUN + ["--epochs", "1", "--init", str(tmp_path / "other.pth"), "--output_dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert (f"other.pth's classifier was trained on other classes (only in the data: ['{first}']; only in the "
            f"checkpoint: ['zebra']): its head is not loaded") in out
    assert f"loaded {tmp_path / 'other.pth'}; initialized afresh: head.bias, head.weight" in out


def test_an_error_during_eval_starts_its_own_line(finetuned, tmp_path, monkeypatch, capsys):
    """--eval's progress bar is the only one: it stays when the evaluation fails (leave=None), so its line ends and
    `error: ...` starts one (a bar that cleared itself left the message after its carriage returns, where
    `grep ^error:` in a log did not find it). Found by a review of the change."""
    out, _ = finetuned

    def unreadable(self, index):
        raise ValueError(f"image {index} cannot be read")

    monkeypatch.setattr(data.SyntheticShapes, "__getitem__", unreadable)
    monkeypatch.delenv("DTM_TRACEBACK", raising=False)
    with pytest.raises(SystemExit):
        engine.cli(lambda: tf.main(["--eval", str(out / "checkpoint-last.pth"), "--batch_size", "16",
                                    "--num_workers", "0", "--output_dir", str(tmp_path)]))
    assert "\nerror: image 0 cannot be read\n" in capsys.readouterr().err


def test_fine_tuned_classifier_as_features_keeps_its_fc_norm(finetuned):
    """Without a head (a teacher or a backbone), a fine-tuned classifier's last LayerNorm, fc_norm, becomes the
    feature ViT's norm: loaded, not fresh."""
    out, _ = finetuned
    checkpoint = torch.load(out / "checkpoint-last.pth")
    vit, fresh = dtm.vit_from_checkpoint(checkpoint, 32, num_classes=0)
    assert torch.equal(vit.norm.weight, checkpoint["model"]["fc_norm.weight"]) and fresh == []
    assert not torch.equal(vit.norm.weight, torch.ones_like(vit.norm.weight))  # trained, not a fresh LayerNorm


def test_resume_continues_exactly(finetuned, tmp_path, monkeypatch):
    out, best = finetuned
    resume, compared = engine.resume, []
    monkeypatch.setattr(engine, "resume", lambda *a, **k: compared.append(k["train_images"]) or resume(*a, **k))
    unreadable, given = engine.unreadable_images, []  # the run's named files come back with it
    monkeypatch.setattr(engine, "unreadable_images", lambda *a: given.append(a[2]) or unreadable(*a))
    resumed_best = tf.main(TINY_RUN + ["--epochs", "2", "--output_dir", str(tmp_path),
                                       "--resume", str(out / "checkpoint-last.pth.epoch0")])
    full, resumed = torch.load(out / "checkpoint-last.pth"), torch.load(tmp_path / "checkpoint-last.pth")
    assert resumed["epoch"] == full["epoch"] == 1 and resumed["step"] == full["step"] == 6
    assert compared == [48] and resumed["train_images"] == 48  # what resume compares (a changed set is said)
    assert len(given) == 1 and given[0]["step"] == 3  # the checkpoint continued, for the files it named
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    for a, b in zip(full["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert resumed_best == best and last_line(tmp_path / "log.jsonl") == last_line(out / "log.jsonl")


def test_a_run_continued_in_another_folder_says_where_its_best_checkpoint_is(finetuned, tmp_path, monkeypatch, capsys):
    """Continued from another folder's checkpoint without improving, the summary named this folder, which has no
    checkpoint-best.pth."""
    out, _ = finetuned
    evaluate = tf.evaluate
    monkeypatch.setattr(tf, "evaluate", lambda *a, **k: {**evaluate(*a, **k), "top1": 0.0})  # no better epoch
    best = torch.load(out / "checkpoint-last.pth.epoch0")["best_top1"]
    tf.main(TINY_RUN + ["--epochs", "2", "--output_dir", str(tmp_path / "b"),
                        "--resume", str(out / "checkpoint-last.pth.epoch0")])
    done = (f"done: best val top-1 {best:.2f}% (reached before this run started; it did not improve on it, so it "
            f"wrote no checkpoint-best.pth here: look in {out}); checkpoints and log.jsonl in {tmp_path / 'b'}")
    assert done in capsys.readouterr().out
    assert not (tmp_path / "b" / engine.BEST).exists()
    # relaunched (here to train on; a requeued --resume PATH command too): the best is still in the first folder
    tf.main(TINY_RUN + ["--epochs", "3", "--output_dir", str(tmp_path / "b")])
    assert done in capsys.readouterr().out and not (tmp_path / "b" / engine.BEST).exists()
    monkeypatch.setattr(tf, "evaluate", lambda *a, **k: {**evaluate(*a, **k), "top1": 100.0})  # this run improves
    tf.main(TINY_RUN + ["--epochs", "2", "--output_dir", str(tmp_path / "c"),
                        "--resume", str(out / "checkpoint-last.pth.epoch0")])
    assert "reached before" not in capsys.readouterr().out and (tmp_path / "c" / engine.BEST).exists()
    assert torch.load(tmp_path / "c" / engine.LAST)["best_dir"] is None  # beside it: where a relaunch looks


def test_a_run_folder_moved_elsewhere_finds_its_best_checkpoint_in_it(finetuned, tmp_path, capsys):
    """A run's folder moved (or copied) and relaunched there: the summary sent the user to the old folder, which a
    checkpoint recorded as best_dir, though checkpoint-best.pth is in this one."""
    out, best = finetuned
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    tf.main(TINY_RUN + ["--epochs", "2", "--output_dir", str(moved)])  # finished: it only says where things are
    printed = capsys.readouterr().out
    assert f"done: best val top-1 {best:.2f}%; checkpoints and log.jsonl in {moved}" in printed, printed
    assert (moved / engine.BEST).exists()


def test_runs_moved_together_find_the_best_checkpoint_in_the_moved_first_folder(finetuned, tmp_path, monkeypatch,
                                                                               capsys):
    """A run continued from another folder's checkpoint without improving, both folders then moved together: the
    summary sent the user to the first folder's old place (best_dir, absolute), where nothing is any more."""
    out, _ = finetuned
    shutil.copytree(out, tmp_path / "tree" / "a")
    evaluate = tf.evaluate
    monkeypatch.setattr(tf, "evaluate", lambda *a, **k: {**evaluate(*a, **k), "top1": 0.0})  # no better epoch
    tf.main(TINY_RUN + ["--epochs", "2", "--output_dir", str(tmp_path / "tree" / "b"),
                        "--resume", str(tmp_path / "tree" / "a" / "checkpoint-last.pth.epoch0")])
    (tmp_path / "tree").rename(tmp_path / "moved")
    capsys.readouterr()
    tf.main(TINY_RUN + ["--epochs", "2", "--output_dir", str(tmp_path / "moved" / "b")])  # finished: says where
    assert f"look in {tmp_path / 'moved' / 'a'});" in capsys.readouterr().out


def test_another_trainers_checkpoint_is_named_as_the_folders_run_or_as_the_resume_path(tmp_path):
    """A pre-training checkpoint-last.pth in --output_dir, picked by --resume auto or by a requeued --resume PATH that
    it records: the error names the folder (not a --resume value the command does not have); the same file given as
    --resume is named as that flag's file, with --init as the way to fine-tune from it."""
    out, start = tmp_path / "out", str(tmp_path / "start.pth")
    out.mkdir()
    torch.save({"kind": "dtm_pretrain", "model": {}, "args": {"resume": start}, "resume_abspath": start},
               out / engine.LAST)
    folders = (f"--output_dir '{out}' holds another trainer's run ({engine.LAST}: kind 'dtm_pretrain'), which "
               f"train_finetune.py would continue (--resume auto): pass another --output_dir")
    for resume in ([], ["--resume", start]):
        with pytest.raises(ValueError) as e:
            tf.main(TINY_RUN + ["--output_dir", str(out)] + resume)
        assert str(e.value) == folders
    with pytest.raises(ValueError) as e:
        tf.main(TINY_RUN + ["--output_dir", str(tmp_path / "new"), "--resume", str(out / engine.LAST)])
    assert str(e.value) == (f"--resume '{out / engine.LAST}' is not a checkpoint of train_finetune.py (kind "
                            f"'dtm_pretrain'); to start fine-tuning from its weights pass it as --init PATH instead of "
                            f"--resume")


def test_a_wrong_num_classes_names_the_count_to_pass(tmp_path):
    """--num_classes is only a check of the class folders; its refusal named no fix. It names the data's count, and
    that count, passed, trains."""
    run = TINY_RUN + ["--epochs", "1", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"^--num_classes 3 but the data has 10 classes: check its class folders, or "
                                         r"pass --num_classes 10 \(or leave it out: it is only a check\)$"):
        tf.main(run + ["--num_classes", "3"])
    tf.main(run + ["--num_classes", "10"])
    assert len(torch.load(tmp_path / "checkpoint-last.pth", weights_only=False)["classes"]) == 10


def test_eval_of_a_pretraining_checkpoint_names_init_in_a_training_command(tmp_path):
    """--eval of a pre-training checkpoint named "use --init PATH"; passed beside --eval, --init met the same refusal
    (--eval is read first). It says: in a training command, without --eval."""
    tiny_pretrain_checkpoint(tmp_path / "pre.pth")
    evaluate = ["--eval", str(tmp_path / "pre.pth"), "--output_dir", str(tmp_path / "eval")]
    with pytest.raises(ValueError, match=r"kind 'dtm_pretrain'\); to start fine-tuning from its weights pass it as "
                                         r"--init PATH in a training command \(without --eval\)$"):
        tf.main(evaluate + ["--init", str(tmp_path / "pre.pth")])


def test_an_epoch_shorter_than_log_every_still_logs_its_loss(tmp_path):
    """The end of an epoch is a log step: with --log_every 50 and 3 steps per epoch, train_loss was null."""
    tf.main(TINY_RUN + ["--epochs", "1", "--log_every", "2", "--output_dir", str(tmp_path / "a")])
    tf.main(TINY_RUN + ["--epochs", "1", "--log_every", "50", "--output_dir", str(tmp_path / "b")])
    lines = {run: [json.loads(line) for line in open(tmp_path / run / engine.LOG)] for run in "ab"}
    steps = [r for r in lines["a"] if "loss" in r]
    assert [r["step"] for r in steps] == [2, 3]  # step 3 ends the epoch
    epoch = [r for r in lines["b"] if "train_loss" in r]
    assert len(epoch) == 1 and epoch[0]["train_loss"] is not None
    assert epoch[0]["train_loss"] == pytest.approx([r for r in lines["a"] if "train_loss" in r][0]["train_loss"])


def test_a_relaunch_without_epochs_keeps_the_runs_own(finetuned, tmp_path, capsys):
    out, _ = finetuned  # --epochs 2; relaunched without it: finished (not extended to the demo's 6)
    tf.main(TINY_RUN + ["--output_dir", str(tmp_path), "--resume", str(out / "checkpoint-last.pth")])
    printed = capsys.readouterr()
    assert "holds a finished run (step 6 of 6): nothing to do" in printed.out
    assert "6/6" not in printed.err  # no progress bar for a run that does nothing
    assert os.listdir(tmp_path) in ([], [engine.RUN_LOCK])  # another folder's finished run: only the run lock here
    files = {name: (out / name).read_bytes() for name in os.listdir(out)}
    tf.main(TINY_RUN + ["--output_dir", str(out)])  # relaunched in its own folder: its summary, nothing changed
    assert "done: best val top-1" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == files


def test_resume_and_eval_refuse_another_model_or_table_layout(finetuned, tmp_path):
    """Resuming with another --model or --rel_pos_bias once trained the stored ViT and recorded the new flags."""
    out, _ = finetuned
    resume = TINY_RUN + ["--epochs", "3", "--output_dir", str(tmp_path), "--resume", str(out / "checkpoint-last.pth")]
    with pytest.raises(ValueError, match="--model vit_s has width 384 .*pass --model vit_tiny"):
        tf.main(resume + ["--model", "vit_s"])
    with pytest.raises(ValueError, match="continues a run with --rel_pos_bias per_block, which a run cannot change"):
        tf.main(resume + ["--rel_pos_bias", "shared"])
    evaluate = ["--eval", str(out / "checkpoint-last.pth"), "--num_workers", "0", "--output_dir", str(tmp_path)]
    for flags, message in ((["--model", "vit_s"], "--model vit_s differs from the vit_tiny"),
                           (["--img_size", "64"], "--img_size 64 differs from the 32")):
        with pytest.raises(ValueError, match=message):
            tf.main(evaluate + flags)
    with pytest.raises(ValueError, match="--synthetic_val would do nothing with real data"):
        tf.parse_args(["--data_train", "a", "--data_val", "b", "--init", "none", "--synthetic_val", "5"])
    with pytest.raises(ValueError, match="--max_unreadable would do nothing in the demo"):  # its images are made here
        tf.parse_args(TINY_RUN + ["--max_unreadable", "0.5"])
    trained = torch.load(out / "checkpoint-last.pth")["classes"]  # --eval on folders of other classes names them
    for name in trained[1:] + ["zebra"]:
        os.makedirs(tmp_path / "other" / name)
        data.SyntheticShapes(1, 40)[0][0].save(tmp_path / "other" / name / "a.png")
    with pytest.raises(ValueError, match=rf"only in the validation set: \['zebra'\]; only in the checkpoint: "
                                         rf"\['{trained[0]}'\]"):
        tf.main(evaluate + ["--data_val", str(tmp_path / "other")])
    with pytest.raises(ValueError, match=r"ft0/checkpoint-last.pth' holds a demo run \(on the built-in images\), "
                                         r"which this launch would continue on its data: to start a new run leave "
                                         r"out --resume .*ft0/checkpoint-last.pth \(a new run needs --init"):
        tf.main(["--data_train", str(tmp_path / "other"), "--data_val", str(tmp_path / "other"), "--model", "vit_tiny",
                 "--img_size", str(IMG), "--batch_size", "2", "--num_workers", "0", "--epochs", "3",
                 "--output_dir", str(tmp_path / "resumed"), "--resume", str(out / "checkpoint-last.pth")])
    for real in (["--data", "d"], ["--data_val", "v"]):  # --eval on real data (once refused for --synthetic_val)
        args = tf.parse_args(real + ["--eval", "ck.pth"])
        assert args.model is None and args.img_size is None  # to come from the checkpoint


def test_best_checkpoint_and_eval_reproduce_the_logged_top1(finetuned, tmp_path):
    out, best = finetuned
    logged = [json.loads(line) for line in open(out / "log.jsonl") if "val_top1" in line]
    assert [r["val_count"] for r in logged] == [13, 13] and best == max(r["val_top1"] for r in logged)
    best_ckpt = torch.load(out / "checkpoint-best.pth")  # plain torch.load: weights_only=True
    assert best_ckpt["val"]["top1"] == best and set(best_ckpt) >= {"model", "optimizer", "scaler", "epoch", "args"}
    assert best_ckpt["kind"] == "dtm_finetune"
    stats = tf.main(["--eval", str(out / "checkpoint-last.pth"), "--batch_size", "16",  # its 13 demo images
                     "--num_workers", "0", "--output_dir", str(tmp_path)])
    assert stats["top1"] == logged[-1]["val_top1"] and stats["count"] == 13
    assert last_line(tmp_path / "eval.jsonl")["val_top1"] == stats["top1"]
    assert not (tmp_path / "log.jsonl").exists()


def test_two_process_eval_counts_each_image_once(finetuned, tmp_path):
    out, _ = finetuned
    ckpt = str(out / "checkpoint-last.pth")
    single = tf.main(["--eval", ckpt, "--synthetic_val", "13", "--batch_size", "4", "--num_workers", "0",
                      "--output_dir", str(tmp_path / "one")])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "train_finetune.py"), "--eval", ckpt, "--synthetic_val", "13", "--batch_size", "4",
           "--num_workers", "0", "--output_dir", str(tmp_path / "two")]
    result = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    two = last_line(tmp_path / "two" / "eval.jsonl")
    assert two["val_count"] == 13
    assert two["val_top1"] == pytest.approx(single["top1"]) and two["val_top5"] == pytest.approx(single["top5"])
    assert two["val_loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_bf16_autocast_matches_fp32(tmp_path, monkeypatch):
    """--amp bf16 (the autocast path of bf16 GPUs, here on the CPU): the first step's gradient norm, taken before any
    update on the same images, and evaluation agree with fp32 to bf16 precision, and are not bit-identical to it
    (autocast is on). The epochs' evaluations run in the run's precision (fp32 for a bf16 run passed every test)."""
    logs, evaluated_in, evaluate = {}, [], tf.evaluate
    monkeypatch.setattr(tf, "evaluate", lambda *a, **kw: evaluated_in.append(a[3]) or evaluate(*a, **kw))
    for amp in ("fp32", "bf16"):
        tf.main(TINY_RUN + ["--epochs", "1", "--amp", amp, "--output_dir", str(tmp_path / amp)])
        logs[amp] = [json.loads(line) for line in open(tmp_path / amp / "log.jsonl")]
    first = {amp: next(r["grad_norm"] for r in lines if "grad_norm" in r) for amp, lines in logs.items()}
    assert first["bf16"] == pytest.approx(first["fp32"], rel=5e-2) and first["bf16"] != first["fp32"]
    assert all(math.isfinite(logs["bf16"][-1][k]) for k in ("train_loss", "val_loss"))
    assert evaluated_in == [None, torch.bfloat16]
    torch.manual_seed(0)
    model = classifier()
    with torch.no_grad():
        model.head.weight.mul_(1000)  # undo the 0.001 head init, so that the logits are not all near 0
    val = data.SyntheticShapes(13, IMG, num_classes=NUM_CLASSES, seed=1, transform=data.EvalTransform(IMG, 1.0))
    loader = torch.utils.data.DataLoader(val, batch_size=8)
    fp32, bf16 = (tf.evaluate(model, loader, torch.device("cpu"), dtype) for dtype in (None, torch.bfloat16))
    assert bf16["count"] == fp32["count"] == 13
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2) and bf16["loss"] != fp32["loss"]


def test_mixing_flags_reach_the_mixer(tmp_path, monkeypatch):
    """--mixup, --cutmix, --mixup_prob, --mixup_switch_prob and --smoothing, each to its place (swapped alphas or a
    constant smoothing changed the recipe silently and passed every test)."""
    made, real = [], data.Mixup
    monkeypatch.setattr(data, "Mixup", lambda *a, **k: made.append(a) or real(*a, **k))
    tf.main(TINY_RUN + ["--epochs", "1", "--mixup", "0.3", "--cutmix", "0.7", "--mixup_prob", "0.6",
                        "--mixup_switch_prob", "0.2", "--smoothing", "0.05", "--output_dir", str(tmp_path)])
    assert (0.3, 0.7, 0.6, 0.2, 0.05, 10) in made  # the demo's 10 classes


def test_a_run_resumed_on_other_classes_names_how_to_start_a_new_run(tmp_path):
    """A folder's run relaunched on data of other classes was refused with no fix named; it names both (the run's
    data, or a new run), and the new run's flags as given start one."""
    for folder, names in (("data", ("cat", "dog")), ("other", ("cat", "emu"))):
        for split in ("train", "val"):
            for name in names:
                os.makedirs(tmp_path / folder / split / name)
                data.SyntheticShapes(1, 40)[0][0].save(tmp_path / folder / split / name / "a.png")
    real = ["--model", "vit_tiny", "--img_size", str(IMG), "--batch_size", "2", "--num_workers", "0", "--epochs", "1",
            "--output_dir", str(tmp_path / "run")]
    tf.main(real + ["--data", str(tmp_path / "data"), "--init", "none"])
    other = real + ["--data", str(tmp_path / "other")]
    with pytest.raises(ValueError, match=r"only in the data: \['emu'\]; only in the checkpoint: \['dog'\]; resume with "
                                         r"the data it was trained on, or to start a new run on this data add --fresh "
                                         r"\(.*\) or pass another --output_dir \(a new run needs --init PATH or --init "
                                         r"none\)$"):
        tf.main(other)
    tf.main(other + ["--fresh", "--init", "none"])
    assert torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=False)["classes"] == ["cat", "emu"]


def test_a_launch_with_data_does_not_continue_a_demo_run(tmp_path):
    """Real data into a demo run's folder went on training the demo's weights, optimizer and step on it where the
    class names happened to match (here: a folder of the demo's own classes). Refused, naming how to start anew."""
    out = str(tmp_path / "run")
    tf.main(TINY_RUN + ["--epochs", "1", "--output_dir", out])
    for name in data.SyntheticShapes(1, 40).classes:  # the demo's 10
        for split in ("train", "val"):
            os.makedirs(tmp_path / "data" / split / name)
            data.SyntheticShapes(1, 40)[0][0].save(tmp_path / "data" / split / name / "a.png")
    with pytest.raises(ValueError, match=r"run holds a demo run \(on the built-in images\), which this launch would "
                                         r"continue on its data: to start a new run add --fresh \(.*\) or pass another "
                                         r"--output_dir \(a new run needs --init PATH or --init none\)$"):
        tf.main(["--data", str(tmp_path / "data"), "--model", "vit_tiny", "--img_size", str(IMG), "--batch_size", "2",
                 "--num_workers", "0", "--epochs", "2", "--output_dir", out])


def test_a_diverging_run_stops_naming_only_changes_it_can_make(tmp_path):
    """An fp32 run whose loss is not finite stops, told a lower --lr (it was told --amp bf16/fp32: fp32 is its own);
    a bf16 run is told --amp fp32 besides."""
    with pytest.raises(FloatingPointError, match=r"^loss not finite at step \d; .*\(try a lower --lr\)$"):
        tf.main(TINY_RUN + ["--lr", "1e30", "--warmup_epochs", "0", "--log_every", "1", "--output_dir", str(tmp_path)])
    with pytest.raises(FloatingPointError, match=r"^loss not finite at step \d; .*\(try a lower --lr or --amp fp32\)$"):
        tf.main(TINY_RUN + ["--lr", "1e30", "--warmup_epochs", "0", "--log_every", "1", "--amp", "bf16",
                            "--output_dir", str(tmp_path / "bf16")])


def test_image_folder_data_flags(tmp_path):
    for split, names in (("train", ["cat", "dog"]), ("val", ["cat", "dog"]), ("val_other", ["cat", "emu"])):
        for name in names:
            os.makedirs(tmp_path / split / name)
            data.SyntheticShapes(1, 40)[0][0].save(tmp_path / split / name / "a.png")
    args = tf.parse_args(["--data", str(tmp_path), "--img_size", str(IMG), "--init", "none"])
    assert not args.demo and args.model == "vit_b"  # the demo defaults apply only without data flags
    train_set, val_set, classes = tf.build_datasets(args)
    assert classes == ["cat", "dog"] and len(train_set) == len(val_set) == 2
    assert train_set[0][0].shape == val_set[0][0].shape == (3, IMG, IMG)
    args = tf.parse_args(["--data_train", str(tmp_path / "train"), "--data_val", str(tmp_path / "val_other"),
                          "--init", "none"])
    with pytest.raises(ValueError, match=r"different class folders: only in val: \['emu'\]; only in train: \['dog'\]"):
        tf.build_datasets(args)
    composed, decomposed = "caf\u00e9", "cafe\u0301"  # "café" as most systems and as macOS write it
    message = tf.class_difference([decomposed, "dog"], [composed, "dog"], "val", "train")
    assert message.startswith(f"only in val: {[decomposed]}; only in train: {[composed]}; 1 of them only look the "
                              f"same: their Unicode characters differ (e.g. val 'cafe\\u0301', train 'caf\\xe9': "
                              f"composed and decomposed accents); rename the folders of one set")
    args = tf.parse_args(["--data", str(tmp_path / "train"), "--init", "none"])  # an ImageFolder, not its parent
    with pytest.raises(ValueError, match=r"--data '.*train' must hold train/ and val/ .*'.*train/train' and "
                                         r"'.*train/val' not found. For other layouts pass --data_train and --data_val "
                                         r"instead of --data$"):
        tf.build_datasets(args)
    with pytest.raises(ValueError, match=r"--data '.*val' must hold val/ \(root/val/<class>/<image>\), which --eval "
                                         r"reads; '.*val/val' not found. For another layout pass --data_val FOLDER "
                                         r"instead of --data$"):
        tf.build_datasets(tf.parse_args(["--data", str(tmp_path / "val"), "--eval", "ck.pth", "--img_size", "32",
                                         "--crop_ratio", "1"]), train=False)
    # the fixes as named: passed beside --data, --data_val (and --data_train) are refused (--data would do nothing)
    evaluate = ["--eval", "ck.pth", "--img_size", "32", "--crop_ratio", "1", "--data_val", str(tmp_path / "val")]
    with pytest.raises(ValueError, match=r"^--data would do nothing with --eval and --data_val given"):
        tf.parse_args(["--data", str(tmp_path / "val"), *evaluate])
    assert tf.build_datasets(tf.parse_args(evaluate), train=False)[2] == ["cat", "dog"]
    with pytest.raises(ValueError, match=r"^--data would do nothing with --data_train and --data_val given"):
        tf.parse_args(["--data", str(tmp_path / "train"), "--data_train", str(tmp_path / "train"), "--data_val",
                       str(tmp_path / "val"), "--init", "none"])
    with pytest.raises(FileNotFoundError, match=r"--data '.*tpyo' is not a directory \(a dataset root"):  # mistyped
        tf.build_datasets(tf.parse_args(["--data", str(tmp_path / "tpyo"), "--init", "none"]))
    with pytest.raises(ValueError, match="--num_classes 1000 but the data has 2 classes"):
        tf.main(["--data", str(tmp_path), "--init", "none", "--num_classes", "1000", "--output_dir", str(tmp_path)])
    # transfer in one command: a pre-trained checkpoint onto an ImageFolder with its own number of classes
    tiny_pretrain_checkpoint(tmp_path / "pre.pth")
    out = tmp_path / "transfer"
    tf.main(["--data", str(tmp_path), "--model", "vit_tiny", "--img_size", str(IMG),
             "--init", str(tmp_path / "pre.pth"), "--epochs", "1", "--batch_size", "2", "--num_workers", "0",
             "--num_classes", "2", "--output_dir", str(out)])
    checkpoint = torch.load(out / "checkpoint-best.pth")
    assert checkpoint["classes"] == ["cat", "dog"] and checkpoint["model"]["head.weight"].shape == (2, 192)
    assert checkpoint["step"] == 1 and checkpoint["val"]["count"] == 2
    # --eval without data would evaluate the demo's images (and then blamed the classes): refused, naming the run's
    with pytest.raises(ValueError, match=f"was trained on real data \\(--data {tmp_path}\\) and no validation data "
                                         f"is given.*pass the validation data \\(--data or --data_val\\)"):
        tf.main(["--eval", str(out / "checkpoint-best.pth"), "--output_dir", str(tmp_path / "eval")])
    assert tf.main(["--eval", str(out / "checkpoint-best.pth"), "--data", str(tmp_path), "--num_workers", "0",
                    "--output_dir", str(tmp_path / "eval")])["count"] == 2
    assert last_line(tmp_path / "eval" / "eval.jsonl")["data_val"] == str(tmp_path / "val")  # the folder evaluated
    # a relaunch that forgot --data was the demo: it called the run a demo run and offered --fresh, which deleted it
    with pytest.raises(ValueError, match=f"transfer holds a run on real data \\(--data {tmp_path}\\); without data "
                                         f"this launch is the demo.*\\(--data, or --data_train and --data_val\\) "
                                         f"to continue it, or another --output_dir for the demo$"):
        tf.main(["--output_dir", str(out)])
    assert torch.load(out / "checkpoint-last.pth", weights_only=False)["classes"] == ["cat", "dog"]
    split = torch.load(out / "checkpoint-last.pth", weights_only=False)  # a run on --data_train and --data_val
    split["args"].update(data_train=str(tmp_path / "train"), data_val=str(tmp_path / "val"))  # --data too: quoted,
    # it was refused by the relaunch the message asked for (a run of before it was refused with both folders)
    os.makedirs(tmp_path / "split")
    torch.save(split, tmp_path / "split" / "checkpoint-last.pth")
    with pytest.raises(ValueError, match=f"holds a run on real data \\(--data_train {tmp_path}/train --data_val "
                                         f"{tmp_path}/val\\); without data"):
        tf.main(["--output_dir", str(tmp_path / "split")])
    best = torch.load(out / "checkpoint-best.pth", weights_only=False)  # --data and --data_val: its val/ not read
    best["args"].update(data_val=str(tmp_path / "val"))
    torch.save(best, tmp_path / "split" / "best-with-val.pth")
    with pytest.raises(ValueError, match=f"was trained on real data \\(--data_val {tmp_path}/val\\) and no "):
        tf.main(["--eval", str(tmp_path / "split" / "best-with-val.pth"), "--output_dir", str(tmp_path / "eval")])
    # --eval reads no training folder: a machine that holds only the validation set evaluates with the training command
    assert tf.main(["--eval", str(out / "checkpoint-best.pth"), "--data_train", str(tmp_path / "gone"), "--data_val",
                    str(tmp_path / "val"), "--num_workers", "0", "--output_dir", str(tmp_path / "eval")])["count"] == 2
    with pytest.raises(ValueError, match="--num_classes 3 but the data has 2 classes"):  # ignored by --eval before
        tf.main(["--eval", str(out / "checkpoint-best.pth"), "--data", str(tmp_path), "--num_classes", "3",
                 "--output_dir", str(tmp_path / "eval")])
    # one class folder: a perfect score that means nothing, refused
    for split in ("train", "val"):
        os.makedirs(tmp_path / "one" / split / "cat")
        shutil.copy(tmp_path / "train" / "cat" / "a.png", tmp_path / "one" / split / "cat")
    with pytest.raises(ValueError, match="has 1 class folder \\('cat'\\): classification needs 2 or more"):
        tf.build_datasets(tf.parse_args(["--data", str(tmp_path / "one"), "--init", "none"]))
    # a relaunch on real data with another --rel_pos_bias: the printed way to a new run names the --init it needs
    relaunch = ["--data", str(tmp_path), "--model", "vit_tiny", "--img_size", str(IMG), "--epochs", "1",
                "--batch_size", "2", "--num_workers", "0", "--output_dir", str(out), "--rel_pos_bias", "shared"]
    with pytest.raises(ValueError, match=r"which a run cannot change: resume with --rel_pos_bias per_block, or to start"
                                         r" a new run add --fresh .* \(a new run needs --init PATH or --init none\)$"):
        tf.main(relaunch)
    shutil.copy(tmp_path / "pre.pth", out / "checkpoint-7.pth")  # an --init that a run in out would write over
    with pytest.raises(ValueError, match=r"or to start a new run pass another --output_dir \(a new run in .*transfer "
                                         r"writes over --init .*checkpoint-7.pth\) \(a new run needs"):
        tf.main(relaunch + ["--init", str(out / "checkpoint-7.pth")])  # (--fresh would be refused: it is out's)
    tf.main(relaunch + ["--fresh", "--init", "none"])
    assert torch.load(out / engine.LAST)["args"]["rel_pos_bias"] == "shared"


DDP_HELPER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import data, train_finetune as tf
# deterministic training images (no crop, flip, RandAugment or erasing), so that the one-process run and the
# two-process run see the same pixels and only the sharding differs
data.FinetuneTransform = lambda img_size, **unused: data.EvalTransform(img_size, 0.875)
class Clock:  # train_finetune's clock, one second per read: img_per_s is the images per log window
    t = -1.0
    def perf_counter(self):
        Clock.t += 1.0
        return Clock.t
tf.time = Clock()
tf.main(sys.argv[1:])
"""


def test_a_dataset_root_given_as_a_split_is_refused(tmp_path):
    """--data_train / --data_val ROOT holding train/ and val/ was read as an ImageFolder of two classes, 'train' and
    'val': a run trained and validated on every image with the sets as labels, without a word. Refused, naming the
    folder to pass; --eval with such a --data_val too."""
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            os.makedirs(tmp_path / "root" / split / name)
            data.SyntheticShapes(1, 40)[0][0].save(tmp_path / "root" / split / name / "a.png")
    root = str(tmp_path / "root")
    cases = (([root, root], "--data_val", "val"), ([os.path.join(root, "train"), root], "--data_val", "val"),
             ([root, os.path.join(root, "val")], "--data_train", "train"))
    for (train_dir, val_dir), flag, split in cases:
        args = tf.parse_args(["--data_train", train_dir, "--data_val", val_dir, "--init", "none"])
        with pytest.raises(ValueError, match=f"^{flag} '{root}' holds train/ and val/ \\(a dataset split into sets\\)"
                                             f".*: pass {flag} {os.path.join(root, split)}$"):
            tf.build_datasets(args)
    args = tf.parse_args(["--data_train", os.path.join(root, "train"), "--data_val", os.path.join(root, "val"),
                          "--init", "none"])
    assert tf.build_datasets(args)[2] == ["cat", "dog"]  # the fix works
    with pytest.raises(ValueError, match=f"^--data_val '{root}' holds train/ and val/"):  # as --eval reads it
        tf.build_datasets(tf.parse_args(["--data_val", root, "--init", "none"]), train=False)
    os.rename(os.path.join(root, "val"), os.path.join(root, "validation"))  # the subfolder named is one that exists
    with pytest.raises(ValueError, match=f"holds train/ and validation/ .*: pass --data_val "
                                         f"{os.path.join(root, 'validation')}$"):
        tf.build_datasets(tf.parse_args(["--data_val", root, "--init", "none"]), train=False)


def test_one_set_folder_without_the_other_and_a_count_below_1_are_refused(tmp_path):
    """No test made these refusals: training given --data_train without --data_val (or the reverse), and a count
    flag of 0."""
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            os.makedirs(tmp_path / split / name)
            data.SyntheticShapes(1, 40)[0][0].save(tmp_path / split / name / "a.png")
    for flag, split in (("--data_train", "train"), ("--data_val", "val")):
        with pytest.raises(ValueError, match=r"^give both --data_train and --data_val, or --data ROOT with ROOT/train "
                                             r"and ROOT/val$"):
            tf.build_datasets(tf.parse_args([flag, str(tmp_path / split), "--init", "none"]))
    with pytest.raises(ValueError, match=r"^--eval reads --data_val FOLDER \(or --data ROOT with ROOT/val\); "
                                         r"--data_train is not read$"):  # it was told to give both
        tf.build_datasets(tf.parse_args(["--data_train", str(tmp_path / "train"), "--eval", "x.pth", "--img_size", "32",
                                         "--crop_ratio", "1"]), train=False)
    for flag in ("batch_size", "accum_iter", "epochs", "log_every", "synthetic_train", "synthetic_val"):
        with pytest.raises(ValueError, match=f"^--{flag} must be >= 1, got 0$"):
            tf.parse_args([f"--{flag}", "0", "--init", "none"])


def test_a_missing_split_folder_names_its_flag(tmp_path):
    """As segmentation's --img_dir: the error named only 'image folder X', not which flag gave it."""
    (tmp_path / "file").write_text("x")
    for flag, other in (("--data_train", "--data_val"), ("--data_val", "--data_train")):
        for path, what in ((tmp_path / "missing", "does not exist"), (tmp_path / "file", "is a file, not a folder")):
            args = tf.parse_args([flag, str(path), other, str(tmp_path), "--init", "none"])
            with pytest.raises(FileNotFoundError, match=f"^{flag} '{path}' {what}; expected the layout root/"):
                tf.build_datasets(args)
    with pytest.raises(FileNotFoundError, match="^--data_val .* does not exist"):  # as --eval reads it
        tf.build_datasets(tf.parse_args(["--data_val", str(tmp_path / "missing"), "--init", "none"]), train=False)
    for split in ("train", "val"):  # beside a --data that holds both: the flag was named as --data's missing split
        (tmp_path / "root" / split).mkdir(parents=True)
    for flag in ("--data_train", "--data_val"):
        args = tf.parse_args(["--data", str(tmp_path / "root"), flag, str(tmp_path / "missing"), "--init", "none"])
        with pytest.raises(FileNotFoundError, match=f"^{flag} '{tmp_path / 'missing'}' does not exist; expected"):
            tf.build_datasets(args)


def test_two_process_training_equals_one_process_with_the_same_total_batch(tmp_path):
    """DDP equivalence: 2 processes x batch 4 x accum 2 take the same optimizer steps as 1 process x batch 8 x accum
    2: the DistributedSampler gives rank r the samples r, r + 2, ... of the same permutation, so each step sees the
    same 16 images, and the all-reduced gradient (over ranks, with no_sync on the first micro-batch) is the mean."""
    helper = tmp_path / "helper.py"
    helper.write_text(DDP_HELPER.format(repo=HERE))
    common = TINY_RUN + ["--epochs", "2", "--accum_iter", "2", "--mixup", "0", "--cutmix", "0", "--drop_path", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {"one": [sys.executable, str(helper), *common, "--batch_size", "8"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(helper), *common, "--batch_size", "4"]}
    for name, cmd in runs.items():
        result = subprocess.run(cmd + ["--output_dir", str(tmp_path / name)], cwd=HERE, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = (torch.load(tmp_path / name / "checkpoint-last.pth") for name in runs)
    assert one["step"] == two["step"] == 6  # 48 images / 16 per step = 3 steps per epoch, 2 epochs
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    moments = [[s["exp_avg"] for s in c["optimizer"]["state"].values()] for c in (one, two)]
    assert all(m.abs().sum() > 0 for m in moments[0])  # every parameter received gradients
    for a, b in zip(*moments):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-7)
    logs = [[json.loads(line) for line in open(tmp_path / name / "log.jsonl") if "train_loss" in line]
            for name in runs]
    assert [len(log) for log in logs] == [2, 2]  # one line per epoch in each run: none left uncompared
    for a, b in zip(*logs):  # train loss is the mean over ranks; validation counts each of the 13 images once
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_count"] == a["val_count"] == 13 and b["val_top1"] == a["val_top1"]
    rates = [[json.loads(line)["img_per_s"] for line in open(tmp_path / name / "log.jsonl") if "img_per_s" in line]
             for name in runs]
    assert rates[0] == rates[1] and rates[0][0] == 16.0  # every process's images: 16 per step, one step per line


def test_img_per_s_leaves_out_the_evaluation_and_the_checkpoints(tmp_path, monkeypatch):
    """A clock that ticks one second per read, and an evaluation that takes 100 s more: 16 images per step and per
    log line in 1 s, and after each epoch's evaluation and saves (2 reads, 101 s left out) in 2 s: 8/s, not 16/103."""
    from test_pretrain import OneSecondClock
    clock = OneSecondClock()

    def slow_evaluate(*args, **kwargs):
        clock.t += 100.0
        return evaluate(*args, **kwargs)

    evaluate = tf.evaluate
    monkeypatch.setattr(tf, "time", clock)
    monkeypatch.setattr(tf, "evaluate", slow_evaluate)
    waits = []  # on a GPU: its queued step finished before the evaluation's start is read
    monkeypatch.setattr(engine, "wait_for_gpu", lambda d: waits.append(clock.t))
    tf.main(TINY_RUN + ["--epochs", "2", "--output_dir", str(tmp_path)])  # 3 steps per epoch
    rates = [json.loads(line)["img_per_s"] for line in open(tmp_path / "log.jsonl") if "img_per_s" in line]
    assert rates == [16.0, 16.0, 16.0, 8.0, 16.0, 16.0] and len(waits) == 2
    parts = [set(json.loads(line)) for line in open(tmp_path / "log.jsonl") if "img_per_s" in line]
    assert all({"data_s", "step_s", "optimizer_s"} <= p for p in parts)  # the step's parts, as pre-training's


def test_unreadable_validation_image_stops_the_run_before_training(tmp_path):
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            os.makedirs(tmp_path / split / name)
            for i in range(2):
                data.SyntheticShapes(1, 40, seed=i)[0][0].save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "val" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="1 of the 4 validation samples cannot be used; first: cannot read image "
                                         "file .*dog/1.png"):
        tf.main(["--data", str(tmp_path), "--model", "vit_tiny", "--img_size", str(IMG), "--init", "none",
                 "--batch_size", "2", "--num_workers", "0", "--output_dir", str(out)])
    assert not out.exists()  # nothing trained, nothing written


def test_recipes_and_lr_scaling():
    args = tf.parse_args(["--data", "x", "--init", "none"])
    assert (args.recipe, args.layer_decay, args.lr_scaling) == ("paper", None, "linear")
    official = tf.parse_args(["--data", "x", "--init", "none", "--recipe", "official"])
    assert (official.layer_decay, official.lr_scaling) == (0.65, "none")
    given = tf.parse_args(["--data", "x", "--init", "none", "--recipe", "official", "--layer_decay", "0.7"])
    assert given.layer_decay == 0.7
    demo = tf.parse_args(["--recipe", "official"])  # the demo's defaults and the recipe's together
    assert demo.demo and demo.model == "vit_tiny" and demo.layer_decay == 0.65
    # the demo's lr is the same whatever the scaling rule: 1.6e-2 per 1024 images, scaled, or 1e-3 itself unscaled
    assert tf.parse_args([]).lr * 64 / 1024 == pytest.approx(demo.lr) == pytest.approx(1e-3)
    assert tf.parse_args(["--lr_scaling", "none"]).lr == pytest.approx(1e-3)
    assert tf.parse_args(["--recipe", "official", "--lr", "0.5"]).lr == 0.5  # a given --lr stays
    assert tf.parse_args(["--data", "x", "--init", "none", "--recipe", "official"]).lr == 5e-4  # not the demo
    # the paper's epochs and warmup by model, as its layer decay (--model vit_l ran ViT-B's 100 epochs); a continued
    # run keeps its own unless they are given
    for model, expected in (("vit_s", (300, 10)), ("vit_b", (100, 10)), ("vit_l", (50, 5)), ("vit_tiny", (100, 10))):
        args = tf.parse_args(["--data", "x", "--init", "none", "--model", model])
        tf.set_schedule(args)
        assert (args.epochs, args.warmup_epochs) == expected, model
        args = tf.parse_args(["--data", "x", "--model", model])
        tf.set_schedule(args, {"epochs": 100, "warmup_epochs": 10, "model": model})
        assert (args.epochs, args.warmup_epochs) == (100, 10), model
    args = tf.parse_args(["--data", "x", "--init", "none", "--model", "vit_l", "--epochs", "7", "--warmup_epochs", "0"])
    tf.set_schedule(args, {"epochs": 100, "warmup_epochs": 10})
    assert (args.epochs, args.warmup_epochs) == (7, 0)
    tf.set_schedule(demo)
    assert (demo.epochs, demo.warmup_epochs) == (6, 1)  # the demo's


def test_both_layout_pretraining_checkpoint_fine_tunes_with_the_summed_tables(tmp_path):
    torch.manual_seed(0)
    student = dtm.build_vit("vit_tiny", img_size=IMG, rel_pos_bias="both")
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("rel_pos_bias.table"):
                p.normal_(0, 0.5)
    torch.save({"kind": "dtm_pretrain", "model": dtm.DTMPretrainModel(student, 8).state_dict(),
                "args": {"model": "vit_tiny"}}, tmp_path / "pre.pth")
    model, fresh = from_checkpoint(tmp_path / "pre.pth", rel_pos_bias="per_block")
    assert fresh == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    for block, source in zip(model.blocks, student.blocks):
        assert torch.equal(block.attn.rel_pos_bias.table, source.attn.rel_pos_bias.table + student.rel_pos_bias.table)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        last = student.eval().forward_features(x, return_layers=[-1]).layers[3]
        torch.testing.assert_close(model.eval().forward_features(x).tokens, last, rtol=1e-5, atol=1e-5)


def test_half_precision_tables_resized_to_another_size_are_not_rounded_to_half(tmp_path):
    """A DeepSpeed checkpoint (the official code with --enable_deepspeed and fp16: weights in float16 under "module")
    at another --img_size: the resized tables are the spline of its values in float32, as the official code keeps
    them (torch.Tensor of scipy's result), not rounded back to float16 (up to 1e-3 off)."""
    torch.manual_seed(0)
    vit = classifier(img_size=3 * 16)  # 3 x 3 patches -> 4 x 4: offsets +-2 are spline values between old ones
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.rel_pos_bias.table.normal_(0, 1.0)
    torch.save({"module": {k: v.half() for k, v in vit.state_dict().items()}, "args": {"model": "vit_tiny"}},
               tmp_path / "ds.pth")
    model, _ = from_checkpoint(tmp_path / "ds.pth", img_size=4 * 16)
    table = vit.blocks[0].attn.rel_pos_bias.table.half().double()
    expected = dtm.resize_rel_pos_table(table, (3, 3), (4, 4)).float()
    assert torch.equal(model.blocks[0].attn.rel_pos_bias.table, expected)


def test_a_beit_v2_pretraining_checkpoint_loads_as_the_official_fine_tuning_does(tmp_path):
    """BEiT v2's pre-training state dict (unilm beit2/modeling_pretrain.py VisionTransformerForMaskedImageModelingCLS
    with run_beitv2_pretraining.py's defaults: a shared table only, no pos_embed, cls_pt_layers, shared lm_head), as
    its run_class_finetuning.py loads it by default (compared side by side on 2026-12-06): the shared table copied
    into every block; mask_token, norm, lm_head and cls_pt_layers not used; fc_norm and head new."""
    torch.manual_seed(0)
    vit = dtm.build_vit("vit_tiny", img_size=IMG, rel_pos_bias="shared", use_mask_token=True)
    with torch.no_grad():
        vit.rel_pos_bias.table.normal_(0, 0.5)
    sd = {k.replace("patch_embed.", "patch_embed.proj.").replace("rel_pos_bias.table",
                                                                 "rel_pos_bias.relative_position_bias_table"): v
          for k, v in vit.state_dict().items()}
    for i in range(2):  # the CLS pre-training head's blocks (head_layers 2): the names of blocks.0's, other values
        sd.update({f"cls_pt_layers.{i}.{k[len('blocks.0.'):]}": torch.randn_like(v)
                   for k, v in sd.items() if k.startswith("blocks.0.")})
    sd.update({"lm_head.weight": torch.randn(8, 192), "lm_head.bias": torch.randn(8),
               "rel_pos_bias.relative_position_index": torch.zeros(17, 17, dtype=torch.long)})
    torch.save(sd, tmp_path / "beitv2.pth")  # the official checkpoint's "model", kept once as the error says
    args = tf.parse_args(["--init", str(tmp_path / "beitv2.pth"), "--model", "vit_tiny", "--img_size", str(IMG)])
    model, fresh = tf.build_model(args, NUM_CLASSES, *tf.init_checkpoint(args))
    assert fresh == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert model.rel_pos_bias is None and model.mask_token is None
    loaded = model.state_dict()
    for name, value in vit.state_dict().items():
        if name.startswith("blocks.") or name in ("cls_token", "patch_embed.weight", "patch_embed.bias"):
            assert torch.equal(loaded[name], value), name
    for block in model.blocks:
        assert torch.equal(block.attn.rel_pos_bias.table, vit.rel_pos_bias.table)
    assert not any(k.startswith(("cls_pt", "lm_head", "norm.", "mask_token", "rel_pos_bias.")) for k in loaded)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x, return_layers=[-1]).layers[3],
                                   vit.eval().forward_features(x, return_layers=[-1]).layers[3], rtol=0, atol=1e-6)


def official_format_checkpoint(width=16, heads=2, depth=2, grid=2):
    """A DTM pre-training state dict with the official code's names (models/modeling_dtm.py: patch_embed.proj,
    relative_position_bias_table shared and per block, their relative_position_index buffers, mask_token, norm,
    lm_head), its values fixed functions of position (no RNG)."""
    rows, hidden = (2 * grid - 1) ** 2 + 3, 4 * width
    shapes = {"cls_token": (1, 1, width), "mask_token": (1, 1, width), "patch_embed.proj.weight": (width, 3, 16, 16),
              "patch_embed.proj.bias": (width,), "rel_pos_bias.relative_position_bias_table": (rows, heads)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "gamma_1": (width,), b + "gamma_2": (width,), b + "norm1.weight": (width,),
                       b + "norm1.bias": (width,), b + "attn.q_bias": (width,), b + "attn.v_bias": (width,),
                       b + "attn.relative_position_bias_table": (rows, heads),
                       b + "attn.qkv.weight": (3 * width, width), b + "attn.proj.weight": (width, width),
                       b + "attn.proj.bias": (width,), b + "norm2.weight": (width,), b + "norm2.bias": (width,),
                       b + "mlp.fc1.weight": (hidden, width), b + "mlp.fc1.bias": (hidden,),
                       b + "mlp.fc2.weight": (width, hidden), b + "mlp.fc2.bias": (width,)})
    shapes.update({"norm.weight": (width,), "norm.bias": (width,), "lm_head.weight": (8, width), "lm_head.bias": (8,)})
    sd = {}
    for k, (name, shape) in enumerate(shapes.items()):
        wave = torch.sin(0.37 * (1 + 0.13 * k) * torch.arange(1, 1 + math.prod(shape), dtype=torch.float64))
        base, scale = ((1.0, 0.1) if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else
                       (0.1, 0.05) if "gamma" in name else (0.0, 0.5) if "table" in name else
                       (0.0, 0.02) if len(shape) > 1 or name.endswith("_token") else (0.0, 0.05))
        sd[name] = (base + scale * wave).float().reshape(shape)
    index = torch.zeros((grid * grid + 1,) * 2, dtype=torch.long)  # dropped by both loaders
    sd["rel_pos_bias.relative_position_index"] = index
    for i in range(depth):
        sd[f"blocks.{i}.attn.relative_position_index"] = index.clone()
    return sd


def test_an_official_checkpoint_fine_tunes_as_the_official_code(tmp_path):
    """Reference values of the official fine-tuning code (naver-ai/dtm 322df2e, timm 0.4.12, torch 2.13, float64; run
    side by side on 2026-12-06): run_class_finetuning.py main() with --init_both_rpb --layer_decay 0.65 --weight_decay
    0.05 --lr 1e-3 --drop_path 0 --mixup 0 --cutmix 0 (label smoothing 0.1) loading this state dict, the same head,
    then engines/engine_for_finetuning.py train_one_epoch for one step: the logits in eval mode, the loss, the
    gradient norm of each layer-decay layer (0: embeddings, 1-2: blocks, 3: fc_norm and head) and the sum of each
    layer's AdamW update. Here the loss is taken in float32 (soft_target_cross_entropy), hence the tolerances."""
    torch.save(official_format_checkpoint(), tmp_path / "official.pth")
    model, fresh = dtm.vit_from_checkpoint(dtm.read_checkpoint(str(tmp_path / "official.pth")), 32, 4, "per_block")
    assert fresh == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    model = model.double()
    images = torch.cos(0.011 * torch.arange(2 * 3 * 32 * 32, dtype=torch.float64)).reshape(2, 3, 32, 32)
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        model.head.weight.copy_(0.3 * torch.sin(0.7 * torch.arange(4 * 16, dtype=torch.float64)).reshape(4, 16))
        model.head.bias.copy_(torch.tensor([0.01, -0.02, 0.03, 0.0], dtype=torch.float64))
        logits = model.eval()(images)
    official_logits = [[1.1915275225695743, 1.351940596501227, -0.5945062946492792, -1.6254962270996882],
                       [0.9946652060855529, 1.5481534143432816, -0.31797966543421896, -1.7094365435296206]]
    torch.testing.assert_close(logits, torch.tensor(official_logits, dtype=torch.float64), rtol=0, atol=1e-12)
    optimizer = tf.build_optimizer(model.train(), 1e-3, 0.05, 0.65)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = tf.train_micro_step(model, images, labels, data.Mixup(0.0, 0.0, label_smoothing=0.1, num_classes=4),
                               argparse.Namespace(seed=0, accum_iter=1), 0, engine.Dist(), None, None)
    assert loss.item() == pytest.approx(2.243219185505, rel=1e-6)
    layer = {n: dtm.layer_id_for_param(n, model.depth) for n in before}
    grad_norms = [torch.cat([p.grad.flatten() for n, p in model.named_parameters() if layer[n] == i]).norm().item()
                  for i in range(4)]
    assert grad_norms == pytest.approx([312.9502729900944, 2.2694598491917617, 2.1264107668858356,
                                        2.5150913041843945], rel=1e-6)
    assert engine.optimizer_step(optimizer, None, list(model.parameters()), 0.0).item() == pytest.approx(
        312.975831526333, rel=1e-6)
    updates = [sum((p.detach() - before[n]).sum().item() for n, p in model.named_parameters() if layer[n] == i)
               for i in range(4)]
    assert updates == pytest.approx([-0.005492966497641839, 0.008358464725050304, -0.004420657028137109,
                                     -0.008001026697234289], rel=0, abs=1e-7)


def test_logged_lr_seeds_groups_and_best_checkpoint(tmp_path, monkeypatch):
    """48 images, batch 8 x accum 2: 3 steps per epoch, 3 epochs, warmup 1 epoch = 3 steps; lr = --lr * 16 / 1024
    (linear scaling), cosine to --min_lr; each group's lr carries its layer decay (0.6 for vit_tiny, the paper's
    ViT-S/B value); every micro-step seeds its own RNGs; checkpoint-best.pth is the epoch with the best top-1, the
    first of equal ones (naver-ai/dtm run_class_finetuning.py: `if max_accuracy < test_stats["acc1"]`)."""
    scores = iter([50.0, 70.0, 70.0])
    monkeypatch.setattr(tf, "evaluate", lambda *a, **k: dict(top1=next(scores), top5=100.0, loss=1.0, count=13))
    seeds = []
    original_seed_step = engine.seed_step
    monkeypatch.setattr(engine, "seed_step", lambda *a: (seeds.append(a), original_seed_step(*a)))
    optimizers = []
    original_step = engine.optimizer_step
    monkeypatch.setattr(engine, "optimizer_step", lambda opt, *a: (optimizers.append(opt), original_step(opt, *a))[1])
    tf.main(TINY_RUN + ["--model", "vit_tiny", "--batch_size", "8", "--accum_iter", "2", "--epochs", "3",
                        "--min_lr", "1e-4", "--output_dir", str(tmp_path)])
    peak = 0.05 * 16 / 1024
    expected = [engine.cosine_schedule(s, 9, 3, peak, 1e-4) for s in range(9)]
    logged = [r["lr"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "lr" in r]
    assert logged == pytest.approx(expected, rel=1e-9) and logged[0] == 0 < logged[1] < logged[2] < peak
    assert [a[1] for a in seeds] == list(range(18)) and {a[2] for a in seeds} == {0}
    scales = {name: g["lr_scale"] for g in optimizers[-1].param_groups for name in g["param_names"]}
    assert all(g["lr"] == pytest.approx(expected[-1] * g["lr_scale"]) for g in optimizers[-1].param_groups)
    assert scales["head.weight"] == 1.0  # block 0 is layer 1 of depth + 1: decay ** depth
    assert scales["blocks.0.attn.qkv.weight"] == pytest.approx(0.6 ** scales_depth(scales))
    best, last = torch.load(tmp_path / "checkpoint-best.pth"), torch.load(tmp_path / "checkpoint-last.pth")
    assert best["step"] == 6 and best["best_top1"] == 70.0 and last["step"] == 9 and last["val"]["top1"] == 70.0


def scales_depth(scales):
    """The ViT's depth from the names of its blocks' parameters."""
    return 1 + max(int(name.split(".")[1]) for name in scales if name.startswith("blocks."))


def test_class_difference_names_the_folders_that_differ():
    assert (tf.class_difference(["a", "b", "c"], ["a", "c", "d"], "val", "train")
            == "only in val: ['b']; only in train: ['d']")
    assert tf.class_difference(["b", "a"], ["a", "b"], "x", "y") == "the same names in another order"
    many = [f"n{i}" for i in range(8)]
    assert tf.class_difference(many, [], "x", "y") == "only in x: ['n0', 'n1', 'n2', 'n3', 'n4'] and 3 more"


def test_class_folders_read_under_another_locale_name_the_setting_to_run_with():
    """Class folders named by a Latin-1 machine (b'caf\\xe9'): a checkpoint written under a Latin-1 locale holds
    'caf\\xe9', this process (UTF-8) lists 'caf\\udce9'; the refusal named no cause, and as the fix the data the run
    was trained on. Also a UTF-8 locale's checkpoint read where names are Latin-1 or ASCII (PYTHONUTF8=0)."""
    listed = [os.fsdecode(b"caf\xe9"), "dog"]  # the bytes' reading here, UTF-8 with surrogate escapes
    message = tf.class_difference(listed, ["caf\u00e9", "dog"], "the data", "the checkpoint")
    assert message == (f"only in the data: {[listed[0]]}; only in the checkpoint: ['caf\u00e9']; 1 of them are the "
                       f"same file names read under another locale: here as utf-8, in the checkpoint as latin-1 (e.g. "
                       f"the data 'caf\\udce9', the checkpoint 'caf\\xe9'); run as the checkpoint's run did (a "
                       f"Latin-1 locale, e.g. LANG=en_US.ISO-8859-1)")
    here = os.fsdecode("caf\u00e9".encode())  # a UTF-8 name, as a UTF-8 locale or Python's UTF-8 mode reads it
    assert "1 of them" not in tf.class_difference([here], ["cafe"], "the data", "the checkpoint")


def test_a_kill_between_the_epochs_two_saves_cannot_leave_an_older_best(tmp_path, monkeypatch):
    """checkpoint-best.pth is written before checkpoint-last.pth: killed between them, the relaunch retrains the
    epoch from the previous LAST and writes BEST again. The other order left BEST at an older epoch than the one
    LAST (and the log) called best (found by the fine-tuning options review)."""
    saved = []
    original = engine.save_checkpoint
    monkeypatch.setattr(engine, "save_checkpoint", lambda path, state: (saved.append(os.path.basename(path)),
                                                                          original(path, state)))
    tf.main(TINY_RUN + ["--epochs", "1", "--output_dir", str(tmp_path)])
    assert saved == [engine.BEST, engine.LAST]  # the first epoch always improves (on best_top1 = -1)


@pytest.mark.parametrize("flags, message", [
    (["--reprob", "1.5"], "--reprob must be a probability, in \\[0, 1\\], got 1.5"),
    (["--smoothing", "1"], "--smoothing must be in \\[0, 1\\), got 1"),
    (["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0, got -1"),
    (["--mixup", "-1"], "--mixup must be an alpha >= 0 \\(0: off\\), got -1"),
    (["--cutmix", "-0.5", "--mixup", "0"], "--cutmix must be an alpha >= 0"),
    (["--mixup", "0", "--cutmix", "0", "--mixup_prob", "0.5"],
     "--mixup_prob would do nothing with --mixup 0 --cutmix 0"),
    (["--cutmix", "0", "--mixup_switch_prob", "0.3"], "--mixup_switch_prob would do nothing with only one of --mixup "
                                                      "and --cutmix on"),
    (["--mixup_prob", "0", "--mixup_switch_prob", "0.9"], "--mixup_switch_prob would do nothing with --mixup_prob 0"),
])
def test_mixing_and_regularization_flags_name_the_one_that_is_wrong_or_does_nothing(flags, message):
    """One message named all three of --warmup_epochs/--smoothing/--reprob, and mixing flags that did nothing (or a
    negative alpha, which acted as 0) were taken without a word (found by the fine-tuning options review)."""
    with pytest.raises(ValueError, match=message):
        tf.parse_args(TINY_RUN + flags)
    assert tf.parse_args(TINY_RUN + ["--cutmix", "0", "--mixup_prob", "0.5"]).mixup_prob == 0.5  # Mixup alone: used
    assert tf.parse_args(TINY_RUN + ["--mixup_prob", "0"]).mixup_prob == 0  # mixing off, the alphas as they were


@pytest.mark.parametrize("value", ["0", "1.5", "-0.875"])
def test_a_crop_ratio_out_of_range_is_named_before_the_run_is_set_up(value):
    """--crop_ratio 0 or 1.5 failed after the data and model were set up, with data.EvalTransform's message, which
    named no flag (found by the --help review); --eval takes it too (given, it overrides the checkpoint's)."""
    for eval_flags in ([], ["--eval", "ckpt.pth"]):
        with pytest.raises(ValueError, match=f"--crop_ratio must be in \\(0, 1\\], .*got {float(value):g}"):
            tf.parse_args(TINY_RUN + ["--crop_ratio", value] + eval_flags)
    assert tf.parse_args(TINY_RUN + ["--crop_ratio", "1"]).crop_ratio == 1.0


def test_data_root_beside_both_folders_and_a_recipe_whose_values_are_all_given_are_refused(tmp_path):
    """--data with --data_train and --data_val (or with --eval and --data_val) read nothing of the root; --recipe
    official with --layer_decay and --lr_scaling both given changed nothing: both were accepted without a word."""
    for name in ("train/a", "val/a"):
        os.makedirs(tmp_path / name)
    root, train, val = str(tmp_path), str(tmp_path / "train"), str(tmp_path / "val")
    with pytest.raises(ValueError, match="--data would do nothing with --data_train and --data_val given \\(its "
                                         "train/ and val/ would not be read\\): leave it out"):
        tf.parse_args(["--data", root, "--data_train", train, "--data_val", val])
    with pytest.raises(ValueError, match="--data would do nothing with --eval and --data_val given \\(its val/"):
        tf.parse_args(["--eval", "x.pth", "--data", root, "--data_val", val])
    assert tf.parse_args(["--data", root, "--data_val", val]).data == root  # its train/ is read
    with pytest.raises(ValueError, match="--recipe official would do nothing: it sets --layer_decay and --lr_scaling, "
                                         "which the command line sets itself: leave it out"):
        tf.parse_args(TINY_RUN + ["--recipe", "official", "--layer_decay", "0.7", "--lr_scaling", "linear"])
    args = tf.parse_args(TINY_RUN + ["--recipe", "official", "--layer_decay", "0.7"])
    assert (args.layer_decay, args.lr_scaling) == (0.7, "none")  # the recipe sets the other


def test_evaluate_runs_without_autograd_and_refuses_an_empty_set():
    """evaluate is under no_grad (without it every validation batch kept the whole forward graph: ImageNet's
    validation at batch 128 held activations for the backward that never comes), and an empty validation set is a
    ValueError naming it, not a ZeroDivisionError."""
    grad_modes = []

    class Recording(FixedLogits):
        def forward(self, images):
            grad_modes.append(torch.is_grad_enabled())
            return super().forward(images)

    logits = torch.randn(2, 3, requires_grad=True)
    model = Recording(logits)
    tf.evaluate(model, [(torch.tensor([[0.0], [1.0]]), torch.tensor([0, 1]))], torch.device("cpu"))
    assert grad_modes == [False]
    with pytest.raises(ValueError, match="the validation set is empty"):
        tf.evaluate(model, [], torch.device("cpu"))


def test_soft_target_cross_entropy_of_bf16_logits_is_taken_in_float32():
    """Under bf16 autocast the logits are bf16: the log-softmax and the sum over classes are taken in float32; in
    bf16 this loss of 1000 classes came out 13.0 for 13.019, and its gradient coarser."""
    torch.manual_seed(0)
    logits = torch.randn(8, 1000) * 3
    target = data.Mixup(num_classes=1000)(torch.zeros(8, 3, 4, 4), torch.randint(0, 1000, (8,)))[1]
    half = logits.bfloat16()
    loss = tf.soft_target_cross_entropy(half, target.bfloat16())
    assert loss.dtype == torch.float32
    reference = -(target.bfloat16().double() * F.log_softmax(half.double(), dim=-1)).sum(-1).mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def run_and_capture(monkeypatch, argv):
    """tf.main(argv), returning what the run trained: the model (as given to engine.ddp), its optimizer and each
    step's --clip_grad (as given to engine.optimizer_step)."""
    seen = {"models": [], "optimizers": [], "clips": []}
    ddp, step = engine.ddp, engine.optimizer_step
    monkeypatch.setattr(engine, "ddp", lambda model, d: seen["models"].append(model) or ddp(model, d))
    monkeypatch.setattr(engine, "optimizer_step", lambda opt, scaler, params, clip: (
        seen["optimizers"].append(opt), seen["clips"].append(clip), step(opt, scaler, params, clip))[-1])
    tf.main(argv)
    return seen


def test_optimizer_flags_reach_the_optimizer(tmp_path, monkeypatch):
    """--weight_decay, --betas, --layer_decay (and --recipe official's 0.65) and --clip_grad each reach the run's
    AdamW and its steps: replaced by their defaults in finetune(), every test still passed."""
    seen = run_and_capture(monkeypatch, TINY_RUN + [
        "--epochs", "1", "--weight_decay", "0.3", "--betas", "0.8", "0.95", "--layer_decay", "0.5",
        "--clip_grad", "2.5", "--output_dir", str(tmp_path / "a")])
    optimizer, depth = seen["optimizers"][-1], seen["models"][0].depth
    assert seen["clips"] == [2.5] * 3
    for group in optimizer.param_groups:
        assert group["betas"] == (0.8, 0.95)
        assert group["weight_decay"] in (0.0, 0.3)
    scales = {n: g["lr_scale"] for g in optimizer.param_groups for n in g["param_names"]}
    wds = {n: g["weight_decay"] for g in optimizer.param_groups for n in g["param_names"]}
    assert wds["blocks.0.attn.qkv.weight"] == 0.3 and wds["blocks.0.norm1.weight"] == 0.0
    assert scales["blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** depth)
    assert scales["patch_embed.weight"] == pytest.approx(0.5 ** (depth + 1)) and scales["head.weight"] == 1.0
    seen = run_and_capture(monkeypatch, TINY_RUN + ["--epochs", "1", "--recipe", "official",
                                                    "--output_dir", str(tmp_path / "b")])
    scales = {n: g["lr_scale"] for g in seen["optimizers"][-1].param_groups for n in g["param_names"]}
    assert scales["blocks.0.attn.qkv.weight"] == pytest.approx(0.65 ** depth)  # the official command's decay
    assert seen["clips"] == [0.0] * 3  # the default: no clipping, as BEiT / MAE


def drop_rates(model):
    return [block.drop_path.p for block in model.blocks]


def test_drop_path_reaches_the_model_from_scratch_from_init_and_on_resume(finetuned, tmp_path, monkeypatch):
    """--drop_path 0.3 gives the blocks 0 .. 0.3 linearly (BEiT's stochastic depth rule) whether the classifier is
    new (--init none), read from a pre-training checkpoint (--init PATH) or continued (--resume): each of the three
    silently trained without stochastic depth when the flag was not passed on, and every test passed (the demo's
    default is 0)."""
    expected = torch.linspace(0, 0.3, 4).tolist()
    scratch = run_and_capture(monkeypatch, TINY_RUN + ["--epochs", "1", "--drop_path", "0.3",
                                                       "--output_dir", str(tmp_path / "scratch")])
    assert drop_rates(scratch["models"][0]) == pytest.approx(expected)
    tiny_pretrain_checkpoint(tmp_path / "pre.pth")
    init = run_and_capture(monkeypatch, TINY_RUN[:-1] + [str(tmp_path / "pre.pth"), "--epochs", "1", "--drop_path",
                                                         "0.3", "--output_dir", str(tmp_path / "init")])
    assert drop_rates(init["models"][0]) == pytest.approx(expected)
    out, _ = finetuned
    resumed = run_and_capture(monkeypatch, TINY_RUN + ["--epochs", "2", "--drop_path", "0.3",
                                                       "--output_dir", str(tmp_path / "resumed"),
                                                       "--resume", str(out / "checkpoint-last.pth.epoch0")])
    assert drop_rates(resumed["models"][0]) == pytest.approx(expected)


def test_training_after_an_evaluation_is_in_train_mode(tmp_path, monkeypatch):
    """evaluate() puts the model in eval mode; the next epoch must train with drop path on again. Without the
    ddp_model.train() after each epoch's evaluation every epoch after the first trained without stochastic depth,
    which no test saw (the demo's --drop_path is 0)."""
    modes, step = [], tf.train_micro_step
    monkeypatch.setattr(tf, "train_micro_step", lambda model, *a: (
        modes.append((model.training, all(b.drop_path.training for b in engine.unwrap(model).blocks))),
        step(model, *a))[-1])
    tf.main(TINY_RUN + ["--epochs", "2", "--drop_path", "0.2", "--output_dir", str(tmp_path)])
    assert modes == [(True, True)] * 6  # 2 epochs x 3 steps


def test_augmentation_and_crop_flags_reach_the_transforms():
    """--reprob and --aa reach the training transform and --crop_ratio the evaluation's resize (224 / 0.875 = 256
    for ImageNet): with constants in build_datasets every test still passed (the demo drew its validation images at
    img_size / crop_ratio, so the crop ratio showed there anyway)."""
    args = tf.parse_args(TINY_RUN + ["--reprob", "0.6", "--aa", "rand-m5-mstd0.2-n3", "--crop_ratio", "0.5"])
    train_set, val_set, _ = tf.build_datasets(args)
    train_tf, val_tf = train_set.transform, val_set.transform
    assert train_tf.erase.prob == 0.6
    ra = train_tf.rand_augment
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.ops) == (3, 5.0, 0.2, list(data.RAND_OPS))
    assert (val_tf.img_size, val_tf.resize_size) == (IMG, 64)
    off = tf.build_datasets(tf.parse_args(TINY_RUN + ["--reprob", "0", "--aa", "none"]))[0].transform
    assert off.erase is None and off.rand_augment is None


def test_the_crop_ratio_leaves_the_demos_images_as_they_are():
    """--crop_ratio is evaluation's (--help: "eval: resize to img_size / crop_ratio, center crop"): the demo drew its
    training and validation images at img_size / crop_ratio, so another crop ratio trained on other images (the first
    step's loss differed) and evaluated newly drawn ones instead of cropping the same ones otherwise."""
    default, half = (tf.build_datasets(tf.parse_args(TINY_RUN + flags)) for flags in ([], ["--crop_ratio", "0.5"]))
    for a, b in zip(default[:2], half[:2]):  # training, validation
        assert a.img_size == b.img_size == 36  # 32 / 0.875
        assert np.array_equal(np.asarray(a.get(0)[0]), np.asarray(b.get(0)[0]))
    assert (default[1].transform.resize_size, half[1].transform.resize_size) == (36, 64)


def test_recipe_defaults_are_the_cited_ones():
    """The defaults on real data (not the demo's), each as README's Recipe provenance cites it: naver-ai/dtm
    run_class_finetuning.py's parser (drop path 0.1 :74, no clipping :93, weight decay 0.05 :97, lr 5e-4 :103, min lr
    1e-6 :109, rand-m9-mstd0.5-inc1 :120, smoothing 0.1 :122, reprob 0.25 :131, Mixup prob 1 :147 / switch 0.5 :149;
    --opt_betas None :91: AdamW's (0.9, 0.999)) and its docs/Evaluation.md command (Mixup 0.8, CutMix 1.0: the
    parser's are 0). Changed one at a time, each passed every test."""
    args = tf.parse_args(["--data", "x", "--init", "none"])
    assert (args.smoothing, args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob) == (0.1, 0.8, 1.0, 1.0,
                                                                                                  0.5)
    assert (args.aa, args.reprob, args.drop_path) == ("rand-m9-mstd0.5-inc1", 0.25, 0.1)
    assert (args.weight_decay, args.min_lr, tuple(args.betas), args.clip_grad) == (0.05, 1e-6, (0.9, 0.999), 0.0)
    assert (args.lr, args.lr_scaling, args.layer_decay, args.crop_ratio) == (5e-4, "linear", None, 0.875)


def test_a_worse_epoch_keeps_the_best_top1_in_its_log_line_checkpoint_and_result(tmp_path, monkeypatch):
    """Top-1 50, 70, 60: the last epoch's log line, checkpoint-last.pth (which a resume continues from) and the
    return value carry the best so far, 70, not the epoch's own 60; checkpoint-best.pth stays the second epoch's."""
    scores = iter([50.0, 70.0, 60.0])
    monkeypatch.setattr(tf, "evaluate", lambda *a, **k: dict(top1=next(scores), top5=100.0, loss=1.0, count=13))
    best = tf.main(TINY_RUN + ["--epochs", "3", "--output_dir", str(tmp_path)])
    epochs = [r for r in map(json.loads, open(tmp_path / engine.LOG)) if "val_top1" in r]
    assert [(r["val_top1"], r["best_top1"]) for r in epochs] == [(50.0, 50.0), (70.0, 70.0), (60.0, 70.0)]
    last, best_ckpt = torch.load(tmp_path / engine.LAST), torch.load(tmp_path / engine.BEST)
    assert best == 70.0 and last["best_top1"] == 70.0 and last["val"]["top1"] == 60.0
    assert best_ckpt["step"] == 6 and best_ckpt["val"]["top1"] == 70.0


def test_eval_uses_the_amp_flag(finetuned, tmp_path):
    """--eval --amp bf16 evaluates under bf16 autocast (the GPU path, here on the CPU): close to fp32, not the same;
    it evaluated in fp32 whatever --amp said."""
    out, _ = finetuned
    run = ["--eval", str(out / "checkpoint-last.pth"), "--synthetic_val", "13", "--batch_size", "16",
           "--num_workers", "0", "--output_dir", str(tmp_path)]
    fp32, bf16 = tf.main(run + ["--amp", "fp32"]), tf.main(run + ["--amp", "bf16"])
    assert bf16["count"] == fp32["count"] == 13
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2) and bf16["loss"] != fp32["loss"]


def test_evaluate_sums_the_loss_of_bf16_logits_in_float32():
    """Under bf16 autocast the model's logits are bf16: the cross entropy is summed in float32 (logits.float()), not
    in bf16, whose 8-bit mantissa rounds a batch's sum of 64 losses (234.85 here) to 235."""
    torch.manual_seed(0)
    logits = (torch.randn(64, 10) * 2).bfloat16()
    labels = torch.randint(0, 10, (64,))
    stats = tf.evaluate(FixedLogits(logits), [(torch.arange(64.0)[:, None], labels)], torch.device("cpu"))
    assert stats["loss"] == pytest.approx(F.cross_entropy(logits.float(), labels).item(), rel=1e-6)


def test_evaluate_refuses_logits_that_are_not_finite():
    """A model whose logits are NaN (fp16 autocast overflowing where the weights are finite) got figures that look
    valid: NaN ranks first in torch.topk, which then picks arbitrary classes (for 10 classes 8, 6, 7, 5, 9), so images
    of class 8 all counted as right (top-1 100%). It is an error naming the images and the fix, in every precision."""
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[nan] * 10, [nan] * 10, [0.0] * 9 + [inf], [0.0] * 10])
    images, labels = torch.arange(4.0)[:, None], torch.tensor([8, 8, 9, 1])
    for amp_dtype, fix in ((None, r"the model has diverged: retrain with a lower --lr$"),
                           (torch.float16, r"evaluate with --amp bf16/fp32 \(fp16 overflows above 65504\), or, if its "
                                           r"training diverged, retrain with a lower --lr$")):
        with pytest.raises(FloatingPointError, match=r"^the model's output is not finite \(NaN or inf\) on 3 of 4 "
                                                     r"validation images: .*; " + fix):
            tf.evaluate(FixedLogits(logits), [(images[:2], labels[:2]), (images[2:], labels[2:])],
                        torch.device("cpu"), amp_dtype)


def _unreadable_on_rank1_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    val = data.ImageFolder(os.path.join(out_dir, "val"), data.EvalTransform(8, 1.0))
    loader = tf.val_loader(val, argparse.Namespace(batch_size=2, num_workers=0), engine.Dist(rank, world_size))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    try:
        tf.evaluate(model, loader, torch.device("cpu"))
        stopped = "evaluated"
    except ValueError as e:
        stopped = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(stopped, f)
    dist.destroy_process_group()


def test_an_image_one_rank_cannot_read_in_evaluation_stops_every_rank_with_its_message(tmp_path, run_two_gloo_ranks):
    """--eval does not load the validation set beforehand: rank 1 stopped on its unreadable image, rank 0 died in the
    all_reduce with gloo's traceback (Connection closed by peer), which torchrun's summary named as the first
    failure."""
    for i, name in enumerate(["a/0.png", "a/1.png", "b/0.png"]):  # a/1.png, rank 1's, is no image
        os.makedirs(tmp_path / "val" / os.path.dirname(name), exist_ok=True)
        if i == 1:
            (tmp_path / "val" / name).write_text("not an image")
        else:
            Image.new("RGB", (10, 10)).save(tmp_path / "val" / name)
    run_two_gloo_ranks(_unreadable_on_rank1_worker, tmp_path)
    bad = str(tmp_path / "val" / "a" / "1.png")
    refusal = (f"rank 1 of 2 ({socket.gethostname()}) stopped: cannot read image file {bad!r} (UnidentifiedImageError: "
               f"cannot identify image file {bad!r}); the file is corrupt or not an image: delete or replace it")
    assert [json.load(open(tmp_path / f"rank{rank}.json")) for rank in (0, 1)] == [refusal, refusal]
