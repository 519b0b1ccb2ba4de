"""Fine-tuning for image classification: ImageNet-1K and transfer (iNaturalist, fine-grained ImageFolders).

The standard MIM end-to-end fine-tuning protocol that DTM (ICLR 2025) follows for its ImageNet-1K and transfer results:
the BEiT v2 / MAE recipe (MAE's Table 9), with DTM's hyper-parameters as defaults:

    torchrun --nproc_per_node=8 train_finetune.py --model vit_b --init output/dtm_vit_b/checkpoint-last.pth \\
        --data /path/imagenet --output_dir output/ft_vit_b                          # 8 x 128 = batch 1024
    python train_finetune.py --eval output/ft_vit_b/checkpoint-best.pth --data_val /path/imagenet/val
    python train_finetune.py        # the demo: the demo pre-training checkpoint (or scratch) on SyntheticShapes, CPU

    model     the pre-trained student (dtm.VisionTransformer) with BEiT's classifier: mean of the patch tokens ->
              fc_norm -> linear head scaled by 0.001 at init; the shared relative position bias of pre-training
              is copied into every block (BEiT fine-tuning); pre-training head, final norm and mask token dropped
    optimizer AdamW (0.9, 0.999), weight decay 0.05 (none on norms, biases, layer scale, tokens, position tables),
              layer-wise lr decay: block i's lr is scaled by decay^(depth - i), the embeddings' by decay^(depth + 1)
              (0.6 for ViT-S/B, 0.8 for ViT-L in the paper)
    lr        --lr 5e-4 at a total batch of 1024, linear scaling rule: the lr used is lr * total_batch / 1024,
              total_batch = batch_size * accum_iter * world_size; linear warmup, then cosine to --min_lr, per step
    data      RandomResizedCrop + flip + RandAugment rand-m9-mstd0.5-inc1 + random erasing 0.25 (data.py),
              Mixup 0.8 / CutMix 1.0 (switch prob 0.5) with label smoothing 0.1, soft-target cross entropy;
              evaluation: resize 256 / center crop 224 (--crop_ratio 0.875), top-1 and top-5
    epochs    ViT-S/B/L: 300/100/50 epochs with 10/10/5 warmup epochs (--epochs, --warmup_epochs), drop path 0.1

Distributed evaluation counts every validation image exactly once: rank r evaluates the images r, r + W, r + 2W, ...
(no DistributedSampler padding, which would count up to W - 1 images twice); the correct counts are summed over
ranks.

Reproducibility: every epoch re-seeds torch, random and numpy from (seed, epoch, rank), so the augmentations, Mixup
and drop path of an epoch do not depend on what ran before it; a run resumed from an epoch checkpoint continues
exactly as the uninterrupted run (for a fixed number of DataLoader workers and processes).
"""
import argparse
import contextlib
import math
import os
import re
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import dtm
from train_pretrain import (PATCH_SIZE, JsonLogger, cosine_schedule, load_checkpoint, optimizer_step, param_groups,
                            resolve_amp, save_checkpoint, seed_everything, set_lr, setup_distributed, unwrap)

PAPER_LAYER_DECAY = {"vit_l": 0.8}  # 0.6 for every other size (ViT-S/B in the paper)
DEMO_PRETRAIN_CHECKPOINT = os.path.join("output", "pretrain_demo", "checkpoint-last.pth")
# Without --data / --data_train / --data_val: the demo on SyntheticShapes, with these defaults (flags still override)
DEMO_DEFAULTS = dict(model="vit_tiny", img_size=112, epochs=6, warmup_epochs=1, batch_size=64, lr=1.6e-2,
                     drop_path=0.0, num_workers=1, output_dir=os.path.join("output", "finetune_demo"), log_every=4)


# ---------------------------------------------------------------------------------------------------
# Model: the classifier, a pre-trained checkpoint in it, layer-wise lr decay

def stored_rel_pos_bias(sd: dict) -> str:
    """How a ViT state dict stores its relative position bias: "shared", "per_block" or "none"."""
    if "rel_pos_bias.table" in sd:
        return "shared"
    return "per_block" if "blocks.0.attn.rel_pos_bias.table" in sd else "none"


def build_model(name: str, num_classes: int, img_size: int, drop_path: float = 0.0, rel_pos_bias: str = "per_block",
                sd: dict = None) -> dtm.VisionTransformer:
    """The fine-tuning classifier. With sd (the ViT weights it will load), patch size, absolute position embedding
    and layer scale follow sd, and a width/depth that differs from --model is an error that names the right size."""
    layout = dict(patch_size=PATCH_SIZE, abs_pos_emb=False, layer_scale_init=0.1)
    if sd is not None:
        if "patch_embed.weight" not in sd:
            raise ValueError(f"the checkpoint holds no ViT of this repo (no 'patch_embed.weight'); keys like "
                             f"{sorted(sd)[:8]}")
        width, depth = sd["patch_embed.weight"].shape[0], 1 + max(
            (int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
        config = dtm.VIT_CONFIGS.get(name)
        if config is not None and (config["embed_dim"], config["depth"]) != (width, depth):
            fits = [n for n, c in dtm.VIT_CONFIGS.items() if (c["embed_dim"], c["depth"]) == (width, depth)]
            raise ValueError(f"the checkpoint holds a ViT of width {width} and depth {depth}, but --model {name} has "
                             f"width {config['embed_dim']} and depth {config['depth']}; "
                             f"{'pass --model ' + fits[0] if fits else 'no model size of this repo fits it'}")
        layout = dict(patch_size=sd["patch_embed.weight"].shape[-1], abs_pos_emb="pos_embed" in sd,
                      layer_scale_init=0.1 if "blocks.0.gamma_1" in sd else 0.0)
        if stored_rel_pos_bias(sd) == "none":
            rel_pos_bias = "none"
    return dtm.build_vit(name, img_size=img_size, num_classes=num_classes, drop_path_rate=drop_path,
                         rel_pos_bias=rel_pos_bias, use_mask_token=False, **layout)


def pretrained_state_dict(path: str) -> dict:
    """The ViT weights of a train_pretrain.py checkpoint (the student of DTMPretrainModel, DDP prefix removed),
    or of a fine-tuned checkpoint of this script (for intermediate fine-tuning / transfer)."""
    sd = dtm.student_state_dict(load_checkpoint(path))
    if not all(torch.is_tensor(v) for v in sd.values()) or "patch_embed.weight" not in sd:
        raise ValueError(f"{path!r} holds no ViT of this repo (no 'patch_embed.weight' in checkpoint['model']); "
                         f"pass a checkpoint written by train_pretrain.py or train_finetune.py, or --init none")
    return sd


def load_pretrained(model: dtm.VisionTransformer, sd: dict) -> list:
    """Load pre-trained ViT weights into the fine-tuning classifier; returns the names initialized afresh.

    Dropped: the mask token and the final norm of pre-training (the classifier normalizes the pooled tokens with a new
    fc_norm instead, as BEiT/MAE), and a classifier head of another number of classes. Then dtm.adapt_state_dict copies
    a shared relative position table into every block and resizes position tables to the model's patch grid.
    Any other missing, unexpected or mis-shaped tensor is an error.
    """
    expected = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("mask_token")}
    if model.fc_norm is not None and "fc_norm.weight" not in sd:
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    if "head.weight" in sd and sd["head.weight"].shape != expected["head.weight"].shape:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    sd = dtm.adapt_state_dict(sd, model)
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in sd.items() if k in expected and v.shape != expected[k].shape]
    unexpected = sorted(k for k in sd if k not in expected)
    fresh = sorted(k for k in expected if k not in sd)
    missing = [k for k in fresh if not k.startswith(("fc_norm.", "head."))]
    if mismatched or unexpected or missing:
        raise ValueError("the checkpoint does not fit the model "
                         + "; ".join(f"{what}: {items}" for what, items in (("shape mismatches", mismatched),
                                     ("unexpected keys", unexpected), ("missing keys", missing)) if items)
                         + ". Check --model and --rel_pos_bias against the pre-training run's")
    model.load_state_dict(sd, strict=False)
    return fresh


def layer_decay_fn(depth: int, decay: float):
    """name -> lr scale decay^(depth + 1 - layer_id): BEiT's LayerDecayValueAssigner, with the layer ids of
    dtm.layer_id_for_param (0 embeddings, i + 1 block i, depth + 1 the head and the norms on top)."""
    return lambda name: decay ** (depth + 1 - dtm.layer_id_for_param(name, depth))


def build_optimizer(model, lr: float, weight_decay: float, layer_decay: float):
    """AdamW (0.9, 0.999) over param_groups with layer-wise lr decay; each group's lr = lr * group["lr_scale"]."""
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay, layer_decay_fn(unwrap(model).depth, layer_decay)),
                                  lr=lr, betas=(0.9, 0.999))
    set_lr(optimizer, lr)
    return optimizer


# ---------------------------------------------------------------------------------------------------
# Loss and evaluation

def soft_target_cross_entropy(logits, target):
    """timm's SoftTargetCrossEntropy: mean over the batch of -sum_k target_k * log softmax(logits)_k, in float32.
    logits, target: (B, num_classes); target rows are the Mixup/CutMix + label smoothing distributions."""
    return torch.sum(-target.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def shard_indices(num_items: int, rank: int, world_size: int) -> range:
    """Indices evaluated by `rank`: rank, rank + W, ... Every index on exactly one rank, none padded or repeated."""
    return range(rank, num_items, world_size)


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, show_progress=False) -> dict:
    """Top-1 / top-5 accuracy (%) and cross entropy over the images of every rank's loader, summed over ranks.

    Run it on the unwrapped model: ranks may hold different numbers of batches, so no collective may run per batch.
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct top-1, correct top-5, loss sum, count
    for images, labels in tqdm(loader, desc="eval", disable=not show_progress, leave=False):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]  # (B, k)
        totals += torch.stack([hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                               F.cross_entropy(logits, labels, reduction="sum").double(),
                               torch.tensor(labels.numel(), dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    correct1, correct5, loss, count = totals.tolist()
    if count == 0:
        raise ValueError("the validation set is empty")
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss / count,
            "count": int(count)}


# ---------------------------------------------------------------------------------------------------
# Data

def parse_rand_augment(spec: str) -> dict:
    """timm-style --aa "rand-m9-mstd0.5-inc1" (also n<num_ops>) -> FinetuneTransform kwargs; "none" turns it off.
    data.RandAugment always uses the increasing ("inc1") op variants."""
    if spec == "none":
        return dict(rand_num_ops=0)
    out = dict(rand_num_ops=2, rand_magnitude=9.0, rand_magnitude_std=0.5)
    fields = {"m": ("rand_magnitude", float), "mstd": ("rand_magnitude_std", float), "n": ("rand_num_ops", int)}
    name, *parts = spec.split("-")
    matches = [re.fullmatch(r"(mstd|m)(\d+(?:\.\d*)?)|(n)(\d+)|inc1", part) for part in parts]
    if name != "rand" or not all(matches):
        raise ValueError(f"cannot read --aa {spec!r}: use 'rand-m<magnitude>-mstd<std>[-n<ops>][-inc1]' "
                         f"(e.g. rand-m9-mstd0.5-inc1) or 'none'")
    for match in matches:
        key, value = match[1] or match[3], match[2] or match[4]
        if key:
            out[fields[key][0]] = fields[key][1](value)
    return out


def build_datasets(args, train: bool = True):
    """(train set or None, val set, class names). ImageFolders from --data (train/, val/) or --data_train /
    --data_val; the built-in SyntheticShapes when none is given (the demo)."""
    train_tf = data.FinetuneTransform(args.img_size, reprob=args.reprob, **parse_rand_augment(args.aa))
    val_tf = data.EvalTransform(args.img_size, args.crop_ratio)
    train_dir, val_dir = args.data_train, args.data_val
    if args.data:
        train_dir, val_dir = train_dir or os.path.join(args.data, "train"), val_dir or os.path.join(args.data, "val")
    if train_dir is None and val_dir is None:
        # drawn at the eval resize size (128 for 112), with fixed seeds: the images do not change with --seed;
        # seed 0 are the images of the pre-training demo, seed 1 others
        size = int(args.img_size / args.crop_ratio)
        val = data.SyntheticShapes(args.synthetic_val, size, seed=1, transform=val_tf)
        train_set = data.SyntheticShapes(args.synthetic_train, size, seed=0, transform=train_tf) if train else None
        return train_set, val, val.classes
    if val_dir is None or (train and train_dir is None):
        raise ValueError("give both --data_train and --data_val, or --data ROOT with ROOT/train and ROOT/val")
    val = data.ImageFolder(val_dir, val_tf)
    if not train:
        return None, val, val.classes
    train_set = data.ImageFolder(train_dir, train_tf)
    if train_set.classes != val.classes:
        only = sorted(set(train_set.classes) ^ set(val.classes))
        raise ValueError(f"train ({train_dir!r}, {len(train_set.classes)} classes) and val ({val_dir!r}, "
                         f"{len(val.classes)} classes) have different class folders, e.g. {only[:5]}")
    return train_set, val, train_set.classes


def val_loader(val_set, args, d):
    shard = torch.utils.data.Subset(val_set, shard_indices(len(val_set), d.rank, d.world_size))
    return torch.utils.data.DataLoader(shard, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                                       pin_memory=d.device.type == "cuda")


# ---------------------------------------------------------------------------------------------------
# Training

def train_one_epoch(model, loader, optimizer, scaler, mixup, lr_at, step, epoch, args, d, amp_dtype, logger):
    """One epoch of optimizer steps (accum_iter micro-batches each); returns (step, mean training loss over ranks)."""
    model.train()
    accum = args.accum_iter
    num_micro = (len(loader) // accum) * accum  # a trailing partial accumulation is skipped
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum, t0 = 0.0, time.time()
    bar = tqdm(loader, total=num_micro, desc=f"epoch {epoch}", disable=not d.is_main, leave=False)
    optimizer.zero_grad(set_to_none=True)
    for i, (images, labels) in enumerate(bar):
        if i == num_micro:
            break
        if i % accum == 0:
            set_lr(optimizer, lr_at(step))
        images, labels = images.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
        images, targets = mixup(images, labels)
        last_micro = (i + 1) % accum == 0
        accumulating = isinstance(model, DistributedDataParallel) and not last_micro
        with model.no_sync() if accumulating else contextlib.nullcontext():  # all-reduce only on the last micro-batch
            with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            loss = soft_target_cross_entropy(logits, targets)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {step}; lower --lr or use "
                                         f"--amp fp32 / --clip_grad")
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()
        loss_sum += loss.item()
        if not last_micro:
            continue
        grad_norm = optimizer_step(optimizer, scaler, params, args.clip_grad)
        step += 1
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_at(step - 1):.2e}")
        if step % args.log_every == 0:
            logger.log(step=step, epoch=epoch, loss=loss.item(), lr=lr_at(step - 1), grad_norm=grad_norm.item(),
                       time=time.time() - t0)
    mean_loss = torch.tensor(loss_sum / max(1, num_micro), dtype=torch.float64, device=d.device)
    if dist.is_initialized():  # the mean over ranks, for the log
        dist.all_reduce(mean_loss)
        mean_loss /= d.world_size
    return step, mean_loss.item()


def get_args_parser():
    p = argparse.ArgumentParser("DTM fine-tuning", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Without --data / --data_train / --data_val: a small CPU demo on built-in "
                                "procedural images.")
    g = p.add_argument_group("model and checkpoints")
    g.add_argument("--model", default="vit_b", choices=list(dtm.VIT_CONFIGS))
    g.add_argument("--init", default=None, help="train_pretrain.py checkpoint to fine-tune, or 'none' to train from "
                   "scratch (required, except for the demo, --resume and --eval)")
    g.add_argument("--resume", default="", help="checkpoint of this script to continue (model, optimizer, scaler, "
                   "epoch, best top-1) or 'auto' = output_dir/checkpoint-last.pth if it exists")
    g.add_argument("--eval", default=None, metavar="CHECKPOINT", help="only evaluate this fine-tuned checkpoint on the "
                   "validation set (its model and input size; --data_val or --data or the demo data)")
    g.add_argument("--img_size", type=int, default=224, help="training and evaluation crop size")
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate (0.2 for ViT-L in BEiT v2)")
    g.add_argument("--rel_pos_bias", default="per_block", choices=["per_block", "shared"],
                   help="per_block: every block gets its own copy of the pre-trained shared table (BEiT fine-tuning)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=100, help="paper: 300 (ViT-S), 100 (ViT-B), 50 (ViT-L)")
    g.add_argument("--warmup_epochs", type=float, default=10, help="paper: 10 (ViT-S/B), 5 (ViT-L)")
    g.add_argument("--batch_size", type=int, default=128, help="per process")
    g.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--lr", type=float, default=5e-4, help="base lr at a total batch of 1024; the lr used is "
                   "lr * total_batch / 1024 (linear scaling), total_batch = batch_size * accum_iter * world size")
    g.add_argument("--min_lr", type=float, default=1e-6)
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--layer_decay", type=float, default=None,
                   help="layer-wise lr decay; default: the paper's 0.6 (ViT-S/B, also tiny) or 0.8 (ViT-L)")
    g.add_argument("--clip_grad", type=float, default=0.0, help="max global grad norm (0: no clipping, as BEiT/MAE; "
                   "the norm is still logged)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPUs that support it, else fp16 with a GradScaler; fp32 on the CPU")
    g = p.add_argument_group("augmentation")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment, timm notation, or 'none'")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0: off)")
    g.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixing a batch at all")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of CutMix when both are on")
    g.add_argument("--crop_ratio", type=float, default=0.875, help="eval: resize to img_size / crop_ratio, center crop")
    g = p.add_argument_group("data and run")
    g.add_argument("--data", default=None, help="ImageFolder root with train/ and val/")
    g.add_argument("--data_train", default=None, help="training ImageFolder (overrides DATA/train)")
    g.add_argument("--data_val", default=None, help="validation ImageFolder (overrides DATA/val)")
    g.add_argument("--nb_classes", type=int, default=None, help="optional check: the number of class folders")
    g.add_argument("--synthetic_train", type=int, default=1024, help="demo: SyntheticShapes training images")
    g.add_argument("--synthetic_val", type=int, default=256, help="demo: SyntheticShapes validation images")
    g.add_argument("--num_workers", type=int, default=8, help="DataLoader workers per process")
    g.add_argument("--output_dir", default=os.path.join("output", "finetune"))
    g.add_argument("--log_every", type=int, default=50, help="optimizer steps between log.jsonl lines")
    g.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.data is None and args.data_train is None and args.data_val is None:
        parser.set_defaults(**DEMO_DEFAULTS)  # the demo: its own defaults, flags given still win
        args = parser.parse_args(argv)
        args.demo = True
    else:
        args.demo = False
    check_args(args)
    return args


def check_args(args):
    """Fail early, naming the flag and the fix."""
    for flag in ("batch_size", "accum_iter", "epochs", "log_every", "synthetic_train", "synthetic_val"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.warmup_epochs < 0 or args.clip_grad < 0 or not 0 <= args.smoothing < 1 or not 0 <= args.reprob <= 1:
        raise ValueError("--warmup_epochs and --clip_grad must be >= 0, --smoothing in [0, 1), --reprob in [0, 1]")
    if args.img_size % PATCH_SIZE:
        raise ValueError(f"--img_size {args.img_size} is not divisible by the patch size {PATCH_SIZE}; use a "
                         f"multiple of {PATCH_SIZE} (e.g. 224)")
    parse_rand_augment(args.aa)


def resume_path(args):
    if args.resume != "auto":
        return args.resume or None
    path = os.path.join(args.output_dir, "checkpoint-last.pth")
    return path if os.path.isfile(path) else None


def load_finetune_checkpoint(path, flag):
    """A checkpoint written by this script (kind 'dtm_finetune'), or None for no path."""
    if path is None:
        return None
    checkpoint = load_checkpoint(path)
    if checkpoint.get("kind") != "dtm_finetune":
        raise ValueError(f"{flag} {path!r} is not a checkpoint of train_finetune.py (kind {checkpoint.get('kind')!r}); "
                         f"to start fine-tuning from pre-trained weights use --init PATH")
    return checkpoint


def run_eval(args, d, amp_dtype):
    """--eval CHECKPOINT: the model and input size come from the checkpoint."""
    checkpoint = load_finetune_checkpoint(args.eval, "--eval")
    sd, saved = checkpoint["model"], checkpoint["args"]
    args.img_size = saved["img_size"]
    _, val_set, classes = build_datasets(args, train=False)
    if classes != checkpoint["classes"]:  # same folders in the same order, or the labels would silently differ
        raise ValueError(f"the validation set's classes ({len(classes)}: {classes[:3]}...) are not the ones the "
                         f"checkpoint was trained on ({len(checkpoint['classes'])}: {checkpoint['classes'][:3]}...)")
    model = build_model(saved["model"], len(classes), args.img_size, rel_pos_bias=stored_rel_pos_bias(sd), sd=sd)
    model.load_state_dict(dtm.adapt_state_dict(sd, model))
    stats = evaluate(model.to(d.device), val_loader(val_set, args, d), d.device, amp_dtype, d.is_main)
    if d.is_main:
        print(f"{args.eval}: top-1 {stats['top1']:.2f}%  top-5 {stats['top5']:.2f}%  on {stats['count']} images")
    JsonLogger(os.path.join(args.output_dir, "log.jsonl"), d.is_main).log(
        eval=args.eval, **{f"val_{k}": v for k, v in stats.items()})
    return stats


def main(argv=None):
    args = parse_args(argv)
    d = setup_distributed()
    amp_dtype, scaler = resolve_amp(args.amp, d.device)
    seed_everything(args.seed, d.rank)
    try:
        return run_eval(args, d, amp_dtype) if args.eval else finetune(args, d, amp_dtype, scaler)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def initial_weights(args, d):
    """(checkpoint to resume or None, pre-trained ViT state dict or None): --resume > --init PATH > --init none.
    The demo fine-tunes the demo pre-training checkpoint if there is one, else trains from scratch, and says so."""
    resume = load_finetune_checkpoint(resume_path(args), "--resume")
    if resume is not None:
        return resume, None
    if args.init is None and args.demo:
        args.init = DEMO_PRETRAIN_CHECKPOINT if os.path.isfile(DEMO_PRETRAIN_CHECKPOINT) else "none"
        if d.is_main:
            print(f"demo: fine-tuning the demo pre-training checkpoint {args.init}" if args.init != "none" else
                  f"demo: no pre-training checkpoint at {DEMO_PRETRAIN_CHECKPOINT} (run `python train_pretrain.py` "
                  f"first), so this trains FROM SCRATCH")
    if args.init is None:
        raise ValueError("pass --init PATH (a train_pretrain.py checkpoint) or --init none to train from scratch")
    return None, (pretrained_state_dict(args.init) if args.init != "none" else None)


def train_loader(train_set, args, d):
    sampler = torch.utils.data.DistributedSampler(train_set, d.world_size, d.rank, shuffle=True, seed=args.seed,
                                                  drop_last=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=d.device.type == "cuda")
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images give no full step of batch {args.batch_size} x "
                         f"accum {args.accum_iter} x {d.world_size} processes; lower --batch_size")
    return loader, sampler, steps_per_epoch


def finetune(args, d, amp_dtype, scaler):
    """Train, evaluate after every epoch, save checkpoint-last.pth and checkpoint-best.pth; returns the best top-1."""
    resume, init_sd = initial_weights(args, d)
    train_set, val_set, classes = build_datasets(args)
    if args.nb_classes is not None and args.nb_classes != len(classes):
        raise ValueError(f"--nb_classes {args.nb_classes} but the data has {len(classes)} classes")
    if resume is not None:
        model = build_model(args.model, len(classes), args.img_size, args.drop_path,
                            stored_rel_pos_bias(resume["model"]), sd=resume["model"])
    else:
        model = build_model(args.model, len(classes), args.img_size, args.drop_path, args.rel_pos_bias, sd=init_sd)
    if init_sd is not None:
        fresh = load_pretrained(model, init_sd)
        if d.is_main:
            print(f"loaded {args.init}; initialized afresh: {', '.join(fresh)}")
    model.to(d.device)
    total_batch = args.batch_size * args.accum_iter * d.world_size
    lr = args.lr * total_batch / 1024  # linear scaling rule
    layer_decay = args.layer_decay if args.layer_decay is not None else PAPER_LAYER_DECAY.get(args.model, 0.6)
    optimizer = build_optimizer(model, lr, args.weight_decay, layer_decay)
    ddp_model = model if d.world_size == 1 else DistributedDataParallel(
        model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    loader, sampler, steps_per_epoch = train_loader(train_set, args, d)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)

    def lr_at(step):
        return cosine_schedule(step, total_steps, warmup_steps, lr, args.min_lr)

    start_epoch, step, best_top1 = 0, 0, -1.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume["scaler"] is not None:
            scaler.load_state_dict(resume["scaler"])
        start_epoch, step, best_top1 = resume["epoch"] + 1, resume["step"], resume["best_top1"]
        if step != start_epoch * steps_per_epoch:
            raise ValueError(f"{resume_path(args)!r} was saved after {step} steps in {start_epoch} epochs, this run has "
                             f"{steps_per_epoch} steps per epoch: resume with the same data, --batch_size, "
                             f"--accum_iter and number of processes")
    if d.is_main:
        print(f"{args.model}: {len(train_set)} training images, {len(classes)} classes, {d.world_size} process(es) on "
              f"{d.device}; total batch {total_batch}, lr {lr:.3g} (= {args.lr:g} * {total_batch} / 1024), layer "
              f"decay {layer_decay}, {args.epochs} epochs x {steps_per_epoch} steps, starting at epoch {start_epoch}")
    mixup = data.Mixup(args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.smoothing, len(classes))
    logger = JsonLogger(os.path.join(args.output_dir, "log.jsonl"), d.is_main)
    val = val_loader(val_set, args, d)
    for epoch in range(start_epoch, args.epochs):
        seed_everything(args.seed + 1_000_003 * (epoch + 1), d.rank)  # the epoch's randomness from (seed, epoch, rank)
        sampler.set_epoch(epoch)
        step, train_loss = train_one_epoch(ddp_model, loader, optimizer, scaler, mixup, lr_at, step, epoch, args, d,
                                           amp_dtype, logger)
        stats = evaluate(model, val, d.device, amp_dtype, d.is_main)
        best_top1 = max(best_top1, stats["top1"])
        logger.log(epoch=epoch, step=step, train_loss=train_loss, best_top1=best_top1,
                   **{f"val_{k}": v for k, v in stats.items()})
        if d.is_main:
            print(f"epoch {epoch}: train loss {train_loss:.4f}  val top-1 {stats['top1']:.2f}%  "
                  f"top-5 {stats['top5']:.2f}%  (best {best_top1:.2f}%)")
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch, "step": step,
                 "args": vars(args), "best_top1": best_top1, "val": stats, "classes": list(classes),
                 "kind": "dtm_finetune"}
        save_checkpoint(os.path.join(args.output_dir, "checkpoint-last.pth"), state)
        if stats["top1"] == best_top1:
            save_checkpoint(os.path.join(args.output_dir, "checkpoint-best.pth"), state)
    if d.is_main:
        print(f"done: best val top-1 {best_top1:.2f}%; checkpoints and log.jsonl in {args.output_dir}")
        if args.demo and args.epochs <= 10:
            print("demo: this is a short end-to-end check; a ViT learns these images slowly, the README's 'Evidence "
                  "on the built-in data' has 40-epoch runs from scratch and from a DTM checkpoint")
    return best_top1


if __name__ == "__main__":
    main()
