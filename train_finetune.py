"""Fine-tuning for image classification: ImageNet-1K and transfer (iNaturalist, fine-grained ImageFolders).

The standard MIM end-to-end fine-tuning protocol that DTM (ICLR 2025) follows for its ImageNet-1K and transfer results,
the BEiT v2 recipe as in the official code (naver-ai/dtm run_class_finetuning.py, docs/Evaluation.md). Where each
default comes from, paper or official code, is the README's "Recipe provenance" table; --recipe official switches to
the official command's values where they differ from the paper's (layer decay, lr scaling).

    torchrun --nproc_per_node=8 train_finetune.py --model vit_b --init output/dtm_vit_b/checkpoint-last.pth \\
        --data /path/imagenet --output_dir output/ft_vit_b                          # 8 x 128 = batch 1024
    python train_finetune.py --eval output/ft_vit_b/checkpoint-best.pth --data_val /path/imagenet/val
    python train_finetune.py        # the demo: the demo pre-training checkpoint (or scratch) on SyntheticShapes, CPU

    model     the pre-trained student (dtm.VisionTransformer) with BEiT's classifier: mean of the patch tokens ->
              fc_norm -> linear head scaled by 0.001 at init; pre-training's shared relative position table is
              moved into every block (added to the block's own table, the official --init_both_rpb); pre-training
              head, final norm and mask token dropped
    optimizer AdamW (0.9, 0.999), weight decay 0.05 with the official rule (engine.param_groups: none on 1-D
              parameters, biases, cls_token, pos_embed), layer-wise lr decay: block i's lr is scaled by
              decay^(depth - i), the embeddings' by decay^(depth + 1) (paper: 0.6 for ViT-S/B, 0.8 for ViT-L;
              official command: 0.65)
    lr        --lr 5e-4 at a total batch of 1024; --lr_scaling linear (default): lr * total_batch / 1024,
              total_batch = batch_size * accum_iter * world_size; linear warmup, then cosine to --min_lr, per step
    data      RandomResizedCrop + flip + RandAugment rand-m9-mstd0.5-inc1 + random erasing 0.25 (data.py),
              Mixup 0.8 / CutMix 1.0 (switch prob 0.5) with label smoothing 0.1, soft-target cross entropy;
              evaluation: resize 256 / center crop 224 (--crop_ratio 0.875; 1.0 from 384 px), top-1 and top-5
    epochs    paper: ViT-S/B/L 300/100/50 epochs with 10/10/5 warmup epochs (--epochs, --warmup_epochs); drop path 0.1
              (the official command also passes --drop_block 0.1, which run_class_finetuning.py parses and never uses)

Distributed evaluation counts every validation image exactly once: rank r evaluates the images r, r + W, r + 2W, ...
(no DistributedSampler padding, which would count up to W - 1 images twice); the correct counts are summed over
ranks.

Reproducibility: engine.py's one scheme (a sample's augmentation from (seed, epoch, index), a micro-step's Mixup /
CutMix and drop path from (seed, micro-step, rank)): a run resumed from a checkpoint continues as the uninterrupted
run, with any number of DataLoader workers (bit for bit where engine.py's docstring says).
"""
import os
import re
import shlex
import sys
import time
import unicodedata

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import dtm
import engine

PAPER_LAYER_DECAY = {"vit_l": 0.8}  # 0.6 for every other size (ViT-S/B in the paper)
PAPER_EPOCHS = {"vit_s": (300, 10), "vit_l": (50, 5)}  # (epochs, warmup epochs); ViT-B's (100, 10) for the others
# --recipe: "paper" follows the paper where it states a value and the official code (naver-ai/dtm) where it is
# silent; "official" uses the official command's values where they differ (docs/Evaluation.md: --layer_decay 0.65,
# --lr 5e-4 at a total batch of 1024, not scaled by run_class_finetuning.py). README: Recipe provenance.
RECIPES = {"paper": dict(), "official": dict(layer_decay=0.65, lr_scaling="none")}
DEMO_PRETRAIN_CHECKPOINT = os.path.join("output", "pretrain_demo", engine.LAST)
# Without --data / --data_train / --data_val: the demo on SyntheticShapes, with these defaults (flags still override)
DEMO_DEFAULTS = dict(model="vit_tiny", img_size=112, epochs=6, warmup_epochs=1, batch_size=64, lr=1.6e-2,
                     drop_path=0.0, num_workers=1, output_dir=os.path.join("output", "finetune_demo"), log_every=4)


# ---------------------------------------------------------------------------------------------------
# Model: the classifier, from a checkpoint or afresh; layer-wise lr decay

def build_model(args, num_classes: int, checkpoint: dict = None, path: str = None) -> tuple:
    """(classifier, names initialized afresh): BEiT's classifier on the ViT of `checkpoint` (any checkpoint of this
    repo, dtm.vit_from_checkpoint: with --rel_pos_bias per_block a shared relative position table is added to each
    block's own table, as the official --init_both_rpb, or copied into blocks without one; pre-training's head, final
    norm and mask token are dropped), or a new one without a checkpoint."""
    if checkpoint is None:
        return dtm.build_vit(args.model, img_size=args.img_size, num_classes=num_classes, drop_path_rate=args.drop_path,
                             rel_pos_bias=args.rel_pos_bias, use_mask_token=False, weight_init="downstream"), None
    return dtm.vit_from_checkpoint(checkpoint, args.img_size, num_classes, args.rel_pos_bias, args.drop_path,
                                   args.model, path)


def build_optimizer(model, lr: float, weight_decay: float, layer_decay: float, betas=(0.9, 0.999)):
    """AdamW over engine.param_groups with layer-wise lr decay; each group's lr = lr * group["lr_scale"]."""
    groups = engine.param_groups(model, weight_decay, engine.layer_decay_fn(engine.unwrap(model).depth, layer_decay))
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    engine.set_lr(optimizer, lr)
    return optimizer


# ---------------------------------------------------------------------------------------------------
# Loss and evaluation

def soft_target_cross_entropy(logits, target):
    """timm's SoftTargetCrossEntropy: mean over the batch of -sum_k target_k * log softmax(logits)_k, in float32.
    logits, target: (B, num_classes); target rows are the Mixup/CutMix + label smoothing distributions."""
    return torch.sum(-target.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None, show_progress=False) -> dict:
    """Top-1 / top-5 accuracy (%) and cross entropy over the images of every rank's loader, summed over ranks.
    With 5 classes or fewer, "top-5" is top-K over all K classes: always 100%. Tied logits (more frequent under bf16)
    are ranked in torch.topk's order, which torch leaves unspecified (as timm's accuracy does: timm/utils/metrics.py,
    accuracy). Logits that are not finite on any image are an error (engine.refuse_non_finite_eval), not figures.

    Run it on the unwrapped model: ranks may hold different numbers of batches, so no collective may run per batch.
    An image that one rank cannot read stops every rank with its message (engine.build_on_all_ranks).
    """
    model.eval()
    ranks = engine.Dist(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else engine.Dist()
    totals = engine.build_on_all_ranks(ranks, _eval_totals, model, loader, device, amp_dtype, show_progress, fix=None)
    if dist.is_initialized():
        dist.all_reduce(totals)
    correct1, correct5, loss, count, non_finite = totals.tolist()
    if count == 0:
        raise ValueError("the validation set is empty")
    engine.refuse_non_finite_eval(int(non_finite), int(count), amp_dtype)
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss / count,
            "count": int(count)}


def _eval_totals(model, loader, device, amp_dtype, show_progress) -> torch.Tensor:
    """This rank's sums for evaluate: correct top-1, correct top-5, loss sum, count, images with a logit that is not
    finite."""
    totals = torch.zeros(5, dtype=torch.float64, device=device)
    for images, labels in tqdm(loader, desc="eval", disable=not show_progress, leave=None):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]  # (B, k)
        totals += torch.stack([hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                               F.cross_entropy(logits, labels, reduction="sum").double(),
                               torch.tensor(labels.numel(), dtype=torch.float64, device=device),
                               (~logits.isfinite().all(dim=1)).sum().double()])
    return totals


# ---------------------------------------------------------------------------------------------------
# Data

def parse_rand_augment(spec: str) -> dict:
    """timm-style --aa "rand-m9-mstd0.5-inc1" (also n<num_ops>) -> FinetuneTransform kwargs; "none" turns it off.
    Fields left out take timm's defaults (timm/data/auto_augment.py at commit aa4b585, :792-794 rand_augment_transform:
    magnitude 10, 2 ops; magnitude std 0, :377 AugmentOp's hparams.get('magnitude_std', 0); the same defaults in timm
    0.4.12, the version the official code's README pins, at :654-655 and :336); without inc1, timm's original op
    list (_RAND_TRANSFORMS, data.RAND_OPS). inc0 is refused: timm 0.4.12 tests the string "0" with bool() (:670),
    which is True, so its inc0 means inc1. An empty spec, which turns RandAugment off in timm
    (timm/data/transforms_factory.py, transforms_imagenet_train: `if auto_augment:`), is refused, naming "none"."""
    if spec == "none":
        return dict(rand_num_ops=0)
    if not spec.strip():
        raise ValueError(f"--aa {spec!r}: an empty --aa (timm's way to turn RandAugment off) is not read here: pass "
                         f"--aa none to turn it off")
    out = dict(rand_num_ops=2, rand_magnitude=10.0, rand_magnitude_std=0.0, rand_increasing=False)
    fields = {"m": ("rand_magnitude", float), "mstd": ("rand_magnitude_std", float), "n": ("rand_num_ops", int)}
    name, *parts = spec.split("-")
    if "inc0" in parts:
        raise ValueError(f"--aa {spec!r}: inc0 is ambiguous (timm 0.4.12 reads it as inc1); write inc1 for the "
                         f"increasing ops or leave it out for timm's original ones")
    matches = [re.fullmatch(r"(mstd|m)(\d+(?:\.\d*)?)|(n)(\d+)|inc1", part) for part in parts]
    if name != "rand" or not all(matches):
        raise ValueError(f"cannot read --aa {spec!r}: use 'rand-m<magnitude>-mstd<std>[-n<ops>][-inc1]' "
                         f"(e.g. rand-m9-mstd0.5-inc1) or 'none'")
    for match in matches:
        key, value = match[1] or match[3], match[2] or match[4]
        if key:
            out[fields[key][0]] = fields[key][1](value)
        else:
            out["rand_increasing"] = True
    if out["rand_magnitude"] > 10:  # data.RandAugment clips each drawn magnitude to 0..10
        raise ValueError(f"--aa {spec!r}: magnitude {out['rand_magnitude']:g} is above 10, the strongest level (each "
                         f"op's magnitude is clipped to 0..10, so it would act as m10); use m0..m10")
    if out["rand_magnitude_std"] > 100:  # timm: uniform magnitudes in [0, m] (data.RandAugment's std math.inf)
        raise ValueError(f"--aa {spec!r}: mstd > 100 (timm's uniform magnitude sampling) is not supported; use a "
                         f"Gaussian std such as mstd0.5")
    return out


def class_difference(found: list, expected: list, found_in: str, expected_in: str) -> str:
    """Which class folders differ between two lists, by name (up to 5 each), for an error message."""
    def names(classes):
        return f"{classes[:5]}{f' and {len(classes) - 5} more' if len(classes) > 5 else ''}"
    found_set, expected_set = set(found), set(expected)
    only_found, only_expected = [c for c in found if c not in expected_set], [c for c in expected if c not in found_set]
    parts = [f"only in {found_in}: {names(only_found)}"] if only_found else []
    parts += [f"only in {expected_in}: {names(only_expected)}"] if only_expected else []
    nfc = {unicodedata.normalize("NFC", c): c for c in only_expected}
    lookalikes = [(c, nfc[unicodedata.normalize("NFC", c)]) for c in only_found
                  if unicodedata.normalize("NFC", c) in nfc]
    if lookalikes:  # e.g. "café" written composed on one machine, decomposed (as macOS writes names) on another
        found_name, expected_name = lookalikes[0]
        parts += [f"{len(lookalikes)} of them only look the same: their Unicode characters differ (e.g. {found_in} "
                  f"{ascii(found_name)}, {expected_in} {ascii(expected_name)}: composed and decomposed accents); "
                  f"rename the folders of one set"]
    parts += _read_under_another_locale(only_found, only_expected, found_in, expected_in)
    return "; ".join(parts) or "the same names in another order"


LOCALE_OF = {"utf-8": "PYTHONUTF8=1, Python's UTF-8 mode", "latin-1": "a Latin-1 locale, e.g. LANG=en_US.ISO-8859-1",
             "ascii": "LC_ALL=C PYTHONUTF8=0"}  # a file-system encoding -> the setting that makes Python read names so


def _read_under_another_locale(only_found, only_expected, found_in, expected_in) -> list:
    """[a note] where names listed here (found) are other names' bytes read under another file-system encoding: a
    checkpoint of a run under another locale (b'caf\\xe9' is 'caf\\udce9' in UTF-8, 'caf\\xe9' in Latin-1)."""
    expected, pairs = set(only_expected), []
    for name in only_found:
        readings = [(os.fsencode(name).decode(encoding, "surrogateescape"), encoding) for encoding in LOCALE_OF]
        pairs += [(name, other, encoding) for other, encoding in readings if other != name and other in expected][:1]
    if not pairs:
        return []
    found_name, expected_name, encoding = pairs[0]
    return [f"{len(pairs)} of them are the same file names read under another locale: here as "
            f"{sys.getfilesystemencoding()}, in {expected_in} as {encoding} (e.g. {found_in} {ascii(found_name)}, "
            f"{expected_in} {ascii(expected_name)}); run as {expected_in}'s run did ({LOCALE_OF[encoding]})"]


def build_datasets(args, train: bool = True):
    """(train set or None, val set, class names). ImageFolders from --data (train/, val/) or --data_train /
    --data_val; the built-in SyntheticShapes when none is given (the demo)."""
    train_tf = data.FinetuneTransform(args.img_size, reprob=args.reprob, **parse_rand_augment(args.aa))
    val_tf = data.EvalTransform(args.img_size, args.crop_ratio)
    train_dir, val_dir = args.data_train, args.data_val
    if args.data:
        train_dir, val_dir = train_dir or os.path.join(args.data, "train"), val_dir or os.path.join(args.data, "val")
        if not os.path.isdir(args.data):
            raise FileNotFoundError(f"--data {args.data!r} is not a directory (a dataset root holding train/ and "
                                    f"val/)")
        from_data = ([train_dir] if train and not args.data_train else []) + ([] if args.data_val else [val_dir])
        missing = [d for d in from_data if not os.path.isdir(d)]  # a --data_train / --data_val given: checked below
        if missing and train:
            raise ValueError(f"--data {args.data!r} must hold train/ and val/ (root/train/<class>/<image>, "
                             f"root/val/<class>/<image>); {' and '.join(map(repr, missing))} not found. For other "
                             f"layouts pass --data_train and --data_val instead of --data")
        if missing:  # --eval reads the validation set only
            raise ValueError(f"--data {args.data!r} must hold val/ (root/val/<class>/<image>), which --eval reads; "
                             f"{missing[0]!r} not found. For another layout pass --data_val FOLDER instead of --data")
    for flag, path in (("--data_train", args.data_train if train else None), ("--data_val", args.data_val)):
        if path is not None:
            data.require_image_folder(path, f"{flag} {path!r}")
    if train_dir is None and val_dir is None:
        # drawn at the default eval resize size (128 for 112; not --crop_ratio's, which resizes and crops them), with
        # fixed seeds: the images do not change with --seed; seed 0 are the images of the pre-training demo, seed 1
        # others
        size = int(args.img_size / default_crop_ratio(args.img_size))
        val = data.SyntheticShapes(args.synthetic_val, size, seed=1, transform=val_tf)
        train_set = data.SyntheticShapes(args.synthetic_train, size, seed=0, transform=train_tf) if train else None
        return train_set, val, val.classes
    if val_dir is None or (train and train_dir is None):
        raise ValueError("give both --data_train and --data_val, or --data ROOT with ROOT/train and ROOT/val" if train
                         else "--eval reads --data_val FOLDER (or --data ROOT with ROOT/val); --data_train is not read")
    val = data.ImageFolder(val_dir, val_tf)
    data.refuse_dataset_root(val, "--data_val", "val")
    if len(val.classes) < 2:
        raise ValueError(f"{val_dir!r} has {len(val.classes)} class folder ({val.classes[0]!r}): classification needs "
                         f"2 or more (root/<class>/<image>)")
    if not train:
        return None, val, val.classes
    train_set = data.ImageFolder(train_dir, train_tf)
    data.refuse_dataset_root(train_set, "--data_train", "train")
    if train_set.classes != val.classes:
        raise ValueError(f"train ({train_dir!r}, {len(train_set.classes)} classes) and val ({val_dir!r}, "
                         f"{len(val.classes)} classes) have different class folders: "
                         f"{class_difference(val.classes, train_set.classes, 'val', 'train')}")
    return train_set, val, train_set.classes


def val_loader(val_set, args, d):
    shard = torch.utils.data.Subset(val_set, engine.shard_indices(len(val_set), d))
    return torch.utils.data.DataLoader(shard, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                                       pin_memory=d.device.type == "cuda")


# ---------------------------------------------------------------------------------------------------
# Arguments

def get_args_parser():
    p = engine.trainer_parser(description="DTM fine-tuning. Without --data / --data_train / --data_val: a small "
                              "demo on built-in procedural images.",
                              epilog=engine.demo_help(DEMO_DEFAULTS, " (--lr 0.001 with --lr_scaling none)"))
    p.add_argument("--recipe", default="paper", choices=list(RECIPES), help="paper: the paper's values, the official "
                   "code's where the paper is silent; official: the official command's layer decay (0.65) and lr, not "
                   "scaled by the batch (--lr_scaling none)")
    g = p.add_argument_group("model and checkpoints")
    g.add_argument("--model", default="vit_b", choices=list(dtm.VIT_CONFIGS), help="ViT size (patch 16)")
    g.add_argument("--init", default=None, help="checkpoint of this repo to fine-tune (pre-training, or fine-tuning "
                   "for intermediate / transfer fine-tuning) or an official DTM / BEiT / BEiT v2 ViT's weights, or "
                   "'none' to train from scratch (required to start a run, except in the demo)")
    g.add_argument("--eval", default=None, metavar="CHECKPOINT", help="only evaluate this fine-tuned checkpoint on the "
                   "validation set (--data_val or --data or the demo data). Its --model, --img_size, --rel_pos_bias "
                   "(a given one must agree) and the demo's --synthetic_val come from it; --init, --resume and "
                   "--fresh are ignored, so a training command plus --eval works")
    g.add_argument("--img_size", type=int, default=224, help="training and evaluation crop size (a multiple of 16)")
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate (BEiT v2 uses 0.2 for ViT-L: "
                   "microsoft/unilm beit2/get_started_for_image_classification.md:91)")
    g.add_argument("--rel_pos_bias", default="per_block", choices=["per_block", "shared"],
                   help="per_block: a pre-trained shared table moves into every block, added to the block's own table "
                        "where it has one (the official --init_both_rpb); shared: keep a shared-only checkpoint's")
    g.add_argument("--compile", action="store_true", help="torch.compile the ViT's blocks")
    g.add_argument("--grad_checkpoint", action="store_true", help="recompute each block's activations in the "
                   "backward instead of storing them (less memory, more compute)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=None, help="training epochs; default: a continued run's own, else by "
                   "--model, the paper's: 300 (ViT-S), 100 (ViT-B and others), 50 (ViT-L) (the demo: 6)")
    g.add_argument("--warmup_epochs", type=float, default=None, help="linear lr warmup epochs (may be fractional); "
                   "default: a continued run's own, else by --model, the paper's: 10 (ViT-S/B and others), 5 (ViT-L) "
                   "(the demo: 1)")
    g.add_argument("--batch_size", type=int, default=128, help="per process (GPU) per micro-step; 8 GPUs x 128 = 1024")
    g.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=5e-4, help="base lr at a total batch of 1024 (see --lr_scaling)")
    g.add_argument("--lr_scaling", default="linear", choices=["linear", "none"], help="linear: the lr used is lr * "
                   "total_batch / 1024, total_batch = batch_size * accum_iter * world size; none: lr as given (the "
                   "official code)")
    g.add_argument("--min_lr", type=float, default=1e-6, help="final lr of the cosine schedule, the top layer's (each "
                   "layer's is scaled by --layer_decay, as its peak lr)")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    g.add_argument("--layer_decay", type=float, default=None,
                   help="layer-wise lr decay; default: the paper's 0.6 (ViT-S/B, also tiny) or 0.8 (ViT-L); "
                        "--recipe official: 0.65")
    g.add_argument("--clip_grad", type=float, default=0.0, help="max global grad norm (0: no clipping, as BEiT/MAE: "
                   "--clip_grad default None in beit/run_class_finetuning.py:78 and mae main_finetune.py:61; "
                   "the norm is still logged)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPUs with native bf16 (compute capability >= 8.0), else fp16 "
                   "with a GradScaler (V100); fp32 on the CPU")
    g = p.add_argument_group("augmentation")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", help="RandAugment, timm notation, or 'none' (then "
                   "no colour jitter either, as MAE: main_finetune.py --color_jitter None; the official code passes "
                   "--color_jitter 0.4 to timm's create_transform, run_class_finetuning.py:118 and "
                   "utils/datasets.py:611, which adds ColorJitter 0.4 in its place)")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup", type=float, default=0.8, help="Mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0: off)")
    g.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixing a batch at all")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of CutMix when both are on")
    g.add_argument("--crop_ratio", type=float, default=None,
                   help="eval: resize to img_size / crop_ratio, center crop (default: 0.875 below 384 px, 1.0 from "
                        "384 px, as the official code: naver-ai/dtm utils/datasets.py:629-638, build_transform; with "
                        "--eval: the checkpoint's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="ImageFolder root with train/ and val/")
    g.add_argument("--data_train", default=None, help="training ImageFolder (overrides DATA/train)")
    g.add_argument("--data_val", default=None, help="validation ImageFolder (overrides DATA/val)")
    g.add_argument("--num_classes", type=int, default=None, help="optional check: the number of class folders")
    g.add_argument("--synthetic_train", type=int, default=1024, help="demo: SyntheticShapes training images")
    g.add_argument("--synthetic_val", type=int, default=256, help="demo: SyntheticShapes validation images")
    g.add_argument("--num_workers", type=int, default=engine.workers_default(10),
                   help="DataLoader workers per process: 10 (the official run_class_finetuning.py's default), or the "
                        "CPUs this process may use where fewer")
    g.add_argument("--max_unreadable", type=float, default=0.001,
                   help="stop when more than this fraction of the training images cannot be read (fewer are "
                   "skipped; 16 in a row stop the run too)")
    engine.add_run_args(p, output_dir=os.path.join("output", "finetune"))
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    first = parser.parse_args(argv)
    demo = first.data is None and first.data_train is None and first.data_val is None
    demo_defaults = {k: v for k, v in DEMO_DEFAULTS.items() if k not in ("epochs", "warmup_epochs")}  # set_schedule's
    parser.set_defaults(**RECIPES[first.recipe], **(demo_defaults if demo else {}))  # flags given still win
    args = parser.parse_args(argv)
    if demo and args.lr_scaling == "none":  # the demo's --lr is per 1024 images; used unscaled, it is the lr itself
        parser.set_defaults(lr=DEMO_DEFAULTS["lr"] * DEMO_DEFAULTS["batch_size"] / 1024)
        args = parser.parse_args(argv)
    args.demo = demo
    if args.crop_ratio is None and not args.eval:  # --eval: the checkpoint's (run_eval)
        args.crop_ratio = default_crop_ratio(args.img_size)
    check_args(args, parser)
    engine.refuse_idle_recipe(args, parser, argv, RECIPES)
    if not demo:
        engine.refuse_ignored(args, parser, ["synthetic_train", "synthetic_val"], "with real data (they size the "
                              "demo's procedural images)")
    engine.refuse_ignored_in_demo(args, parser)
    if args.eval:  # the model and its input come from the checkpoint (run_eval), and so does the demo's data
        engine.from_checkpoint_unless_given(args, parser, argv, EVAL_FROM_CHECKPOINT + EVAL_DEMO_DATA)
    return args


EVAL_FROM_CHECKPOINT = ["model", "img_size", "rel_pos_bias"]  # --eval: the checkpoint's; a given one must agree
EVAL_DEMO_DATA = ["synthetic_val"]  # --eval of a demo run: the checkpoint's unless given


def default_crop_ratio(img_size: int) -> float:
    return 0.875 if img_size < 384 else 1.0


def check_args(args, parser):
    """Fail early, naming the flag and the fix."""
    for flag in ("batch_size", "accum_iter", "epochs", "log_every", "synthetic_train", "synthetic_val"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:  # epochs None: by --model (set_schedule)
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag, ok, allowed in (("warmup_epochs", args.warmup_epochs is None or args.warmup_epochs >= 0, ">= 0"),
                              ("smoothing", 0 <= args.smoothing < 1, "in [0, 1)"),
                              ("reprob", 0 <= args.reprob <= 1, "a probability, in [0, 1]"),
                              ("mixup", args.mixup >= 0, "an alpha >= 0 (0: off)"),
                              ("cutmix", args.cutmix >= 0, "an alpha >= 0 (0: off)"),
                              ("crop_ratio", args.crop_ratio is None or 0 < args.crop_ratio <= 1,
                               "in (0, 1], the crop's share of the resized image (0.875: resize 256, crop 224)")):
        if not ok:
            raise ValueError(f"--{flag} must be {allowed}, got {getattr(args, flag):g}")
    engine.check_image_size("--img_size", args.img_size, 224)
    if not (0 <= args.mixup_prob <= 1 and 0 <= args.mixup_switch_prob <= 1):
        raise ValueError(f"--mixup_prob and --mixup_switch_prob are probabilities, in [0, 1]; got "
                         f"{args.mixup_prob:g} and {args.mixup_switch_prob:g}")
    if args.mixup == 0 and args.cutmix == 0:
        engine.refuse_ignored(args, parser, ["mixup_prob", "mixup_switch_prob"], "with --mixup 0 --cutmix 0")
    elif args.mixup == 0 or args.cutmix == 0:
        engine.refuse_ignored(args, parser, ["mixup_switch_prob"], "with only one of --mixup and --cutmix on (it "
                              "chooses between the two)")
    if args.mixup_prob == 0:
        engine.refuse_ignored(args, parser, ["mixup", "cutmix", "mixup_switch_prob"], "with --mixup_prob 0 (no batch "
                              "is mixed)")
    mixing = data.Mixup(args.mixup, args.cutmix, args.mixup_prob).mixes
    if mixing and args.batch_size % 2 and args.eval is None:
        raise ValueError(f"--batch_size {args.batch_size} is odd: Mixup/CutMix pair each image with the reversed "
                         f"batch's, which leaves the middle image unmixed (timm's Mixup refuses odd batches too); use "
                         f"an even --batch_size, or --mixup 0 --cutmix 0")
    if args.data is not None and args.data_val is not None and (args.data_train is not None or args.eval):
        given, unread = ("--eval and --data_val", "val/") if args.eval else ("--data_train and --data_val",
                                                                           "train/ and val/")
        raise ValueError(f"--data would do nothing with {given} given (its {unread} would not be read): leave it out")
    engine.check_shared_args(args)
    parse_rand_augment(args.aa)


# ---------------------------------------------------------------------------------------------------
# Training

def train_micro_step(model, images, labels, mixup, args, micro_step, d, amp_dtype, scaler):
    """Mixup/CutMix, forward, soft-target cross entropy, backward of one micro-batch -> the loss (detached)."""
    engine.seed_step(args.seed, micro_step, d.rank)  # Mixup/CutMix, drop path
    images, targets = mixup(images, labels)
    with engine.autocast(d, amp_dtype):
        logits = model(images)
    loss = soft_target_cross_entropy(logits, targets)
    engine.backward(loss / args.accum_iter, scaler)
    return loss.detach()


def main(argv=None):
    """Fine-tune (returns the best validation top-1) or, with --eval, evaluate (returns the stats)."""
    args = parse_args(argv)
    with engine.backend_flags_kept():  # setup's TF32 and autotuner: for the run only
        d = engine.setup()
        try:
            amp_dtype, scaler = engine.resolve_amp(args.amp, d.device)
            return run_eval(args, d, amp_dtype) if args.eval else finetune(args, d, amp_dtype, scaler)
        finally:
            engine.teardown()


def run_eval(args, d, amp_dtype):
    """--eval CHECKPOINT: the model and input size come from the checkpoint, and so does the crop ratio unless given;
    the result is appended to output_dir/eval.jsonl (a training run's log.jsonl is left alone)."""
    checkpoint = engine.load_checkpoint(args.eval, "dtm_finetune", "--eval", hint="; to start fine-tuning from its "
                                        "weights pass it as --init PATH in a training command (without --eval)")
    quoted = ["data_val"] if checkpoint["args"].get("data_val") else ["data"]  # --data beside it: not read
    engine.refuse_demo_eval(args, checkpoint["args"], args.eval, quoted, "--data or --data_val")
    engine.take_from_checkpoint(args, checkpoint["args"], EVAL_FROM_CHECKPOINT, args.eval)
    engine.take_from_checkpoint(args, checkpoint["args"], EVAL_DEMO_DATA, args.eval, must_agree=False)
    if args.crop_ratio is None:
        args.crop_ratio = checkpoint["args"].get("crop_ratio") or default_crop_ratio(args.img_size)
    _, val_set, classes = engine.build_on_all_ranks(d, build_datasets, args, False)
    check_num_classes(args, classes)
    if classes != checkpoint["classes"]:  # same folders in the same order, or the labels would silently differ
        raise ValueError(f"the validation set's classes ({len(classes)}) are not the ones the checkpoint was trained "
                         f"on ({len(checkpoint['classes'])}): "
                         f"{class_difference(classes, checkpoint['classes'], 'the validation set', 'the checkpoint')}")
    model, _ = dtm.vit_from_checkpoint(checkpoint, args.img_size, len(classes), model=args.model, path=args.eval)
    stats = evaluate(model.to(d.device), val_loader(val_set, args, d), d.device, amp_dtype, d.is_main)
    d.print(f"{args.eval}: top-1 {stats['top1']:.2f}%  top-5 {stats['top5']:.2f}%  on {stats['count']} images "
            f"({args.img_size} px, crop ratio {args.crop_ratio})")
    if d.is_main:
        folder = getattr(val_set, "root", None)  # the ImageFolder read (null: the demo's images)
        record = {"eval": args.eval, "data_val": folder and os.path.abspath(folder),
                  "amp": engine.amp_name(amp_dtype, None), "img_size": args.img_size, "crop_ratio": args.crop_ratio}
        engine.append_eval(args.output_dir, {**record, **{f"val_{k}": v for k, v in stats.items()}})
    return stats


def check_num_classes(args, classes):
    """--num_classes, a check of the number of class folders, against the data's."""
    if args.num_classes is not None and args.num_classes != len(classes):
        raise ValueError(f"--num_classes {args.num_classes} but the data has {len(classes)} classes: check its class "
                         f"folders, or pass --num_classes {len(classes)} (or leave it out: it is only a check)")


def demo_init(args, d):
    """The demo fine-tunes the demo pre-training checkpoint if there is one, else trains from scratch, and says so.
    Decided before resuming, so that a demo folder started from scratch is not silently continued once a pre-training
    checkpoint exists (finetune refuses it, as engine.resume refuses another --init)."""
    args.init = DEMO_PRETRAIN_CHECKPOINT if os.path.isfile(DEMO_PRETRAIN_CHECKPOINT) else "none"
    d.print(f"demo: fine-tuning the demo pre-training checkpoint {args.init}" if args.init != "none" else
            f"demo: no pre-training checkpoint at {DEMO_PRETRAIN_CHECKPOINT} (run `python train_pretrain.py` first), "
            f"so this trains FROM SCRATCH")


def init_checkpoint(args):
    """(checkpoint dict or None, its path): --init PATH, or None for --init none."""
    if args.init is None:
        raise ValueError("pass --init PATH (a checkpoint of this repo, e.g. from train_pretrain.py) or --init none to "
                         "train from scratch")
    return (None, None) if args.init == "none" else (dtm.read_checkpoint(args.init, "--init"), args.init)


def set_schedule(args, saved_args: dict = None):
    """--epochs / --warmup_epochs not given: a continued run's own (saved_args), else the paper's for --model
    (PAPER_EPOCHS), or the demo's."""
    default = (DEMO_DEFAULTS["epochs"], DEMO_DEFAULTS["warmup_epochs"]) if args.demo else \
        PAPER_EPOCHS.get(args.model, (100, 10))
    engine.set_run_length(args, dict(zip(("epochs", "warmup_epochs"), default)), saved_args)


def resumed_model(args, classes, checkpoint, path):
    """The classifier of a run continued from `checkpoint` (the run's own), checked against the data's classes and
    --rel_pos_bias."""
    if checkpoint["classes"] != list(classes):
        raise ValueError(f"{path!r} was trained on other classes ({len(checkpoint['classes'])}) than the "
                         f"data's ({len(classes)}): "
                         f"{class_difference(classes, checkpoint['classes'], 'the data', 'the checkpoint')}; resume "
                         f"with the data it was trained on, or to start a new run on this data "
                         f"{engine.new_run_hint(args, path)}{engine.init_note(args)}")
    saved_layout = checkpoint["args"].get("rel_pos_bias", args.rel_pos_bias)
    if args.rel_pos_bias != saved_layout:  # the optimizer state holds the run's tables
        raise ValueError(f"{path!r} continues a run with --rel_pos_bias {saved_layout}, which a run cannot "
                         f"change: resume with --rel_pos_bias {saved_layout}, or to start a new run "
                         f"{engine.new_run_hint(args, path)}{engine.init_note(args)}")
    model, _ = dtm.vit_from_checkpoint(checkpoint, args.img_size, len(classes), drop_path_rate=args.drop_path,
                                       model=args.model, path=path)
    return model


def initial_model(args, d, classes, init, path):
    """The classifier a new run starts from: built on --init's checkpoint `init` (None: from scratch)."""
    if init is not None and init.get("classes") not in (None, list(classes)):  # a classifier of other classes
        d.print(f"note: {path}'s classifier was trained on other classes "
                f"({class_difference(classes, init['classes'], 'the data', 'the checkpoint')}): its head is not "
                f"loaded")
        init = {**init, "model": {k: v for k, v in init["model"].items() if not k.startswith("head.")}}
    model, fresh = build_model(args, len(classes), init, path)
    if init is not None:
        d.print(f"loaded {path}" + (f"; initialized afresh: {', '.join(fresh)}" if fresh else ""))
    if init is not None and dtm.stored_rel_pos_bias(model.state_dict()) == "none":
        if args.rel_pos_bias != get_args_parser().get_default("rel_pos_bias"):
            raise ValueError(f"--rel_pos_bias {args.rel_pos_bias} would do nothing with --init {path}: it has no "
                             f"relative position tables, so neither has this model: leave it out")
        d.print(f"note: {path} has no relative position tables, so neither has this model (--rel_pos_bias "
                f"{args.rel_pos_bias} applies to the tables a checkpoint has)"
                + ("; nor an absolute position embedding: it has no position information" if model.pos_embed is None
                   else ""))
    return model


def finetune(args, d, amp_dtype, scaler):
    """Train, evaluate after every epoch, save checkpoint-last.pth and checkpoint-best.pth; returns the best top-1."""
    chosen_by_demo = args.init is None and args.demo
    if chosen_by_demo:
        demo_init(args, d)
    resume_path, own_run = engine.prepare_run(args, d, new_run_reads={"--init": args.init})
    if resume_path is not None:
        resume = engine.load_checkpoint(resume_path, "dtm_finetune", hint="; to start fine-tuning from its weights "
                                        "pass it as --init PATH instead of --resume", auto=resume_path != args.resume)
        both = resume["args"].get("data_train") and resume["args"].get("data_val")  # then its --data was not read
        engine.refuse_demo_resume(args, resume["args"], resume_path, ["data_train", "data_val"] if both else
                                  ["data", "data_train", "data_val"], "--data, or --data_train and --data_val")
        started_from = engine.init_started_from(resume)
        if chosen_by_demo and started_from is not None and not engine.same_path(started_from, args.init):
            found = "finds" if args.init != "none" else "no longer finds"
            raise ValueError(f"{engine.run_name(args, resume_path)} holds a demo run started from --init "
                             f"{started_from}; the demo now {found} the pre-training checkpoint "
                             f"{DEMO_PRETRAIN_CHECKPOINT}: to start over from {args.init} "
                             f"{engine.new_run_hint(args, resume_path)}, or pass --init {shlex.quote(started_from)} "
                             f"to continue that run")
    else:
        init, init_path = engine.build_on_all_ranks(d, init_checkpoint, args, fix=engine.SAME_CHECKPOINT)
    set_schedule(args, resume["args"] if resume_path is not None else None)
    train_set, val_set, classes = engine.build_on_all_ranks(d, build_datasets, args)
    check_num_classes(args, classes)
    if args.demo:
        d.print(f"DEMO (no --data): {args.model} learns {len(classes)} classes of built-in SyntheticShapes images at "
                f"{args.img_size} px ({len(train_set)} for training, {len(val_set)} for validation), {args.epochs} "
                f"epoch{'s' * (args.epochs != 1)} on {d.device}. For a real run pass --data and --init (see --help).")
    else:  # evaluation must count every image: find unreadable ones now, not after the first epoch
        engine.check_dataset(val_set, d, args.num_workers)
    loader, sampler, steps_per_epoch = engine.train_loader(train_set, args, d)
    engine.seed_all(args.seed)  # the same new head on every rank
    model = resumed_model(args, classes, resume, resume_path) if resume_path is not None else \
        initial_model(args, d, classes, init, init_path)
    model.grad_checkpointing = args.grad_checkpoint
    if args.compile:
        engine.compile_blocks(model)
    model.to(d.device)
    total_batch = args.batch_size * args.accum_iter * d.world_size
    lr = args.lr * total_batch / 1024 if args.lr_scaling == "linear" else args.lr
    layer_decay = args.layer_decay if args.layer_decay is not None else PAPER_LAYER_DECAY.get(args.model, 0.6)
    optimizer = build_optimizer(model, lr, args.weight_decay, layer_decay, args.betas)
    step, best_top1, best_dir = 0, -1.0, args.output_dir  # best_dir: where checkpoint-best.pth of best_top1 is
    if resume_path is not None:
        step = engine.resume(resume, resume_path, model, optimizer, scaler, args, steps_per_epoch, d,
                             train_images=len(train_set))
        best_top1 = resume["best_top1"]
        best_dir = engine.resumed_best_dir(resume, resume_path)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, engine.warmup_steps(args.warmup_epochs, steps_per_epoch)
    finished = step >= total_steps
    log = engine.open_log(args.output_dir, resume if own_run else None, d.is_main, finished)
    ddp_model = engine.ddp(model, d)
    engine.warn_long_warmup(warmup_steps, total_steps, "--warmup_epochs", d)
    engine.warn_min_lr(args.min_lr, lr, f" (--lr {args.lr:g} x {total_batch} / 1024)" if lr != args.lr else " (--lr)",
                       d)
    started_from = {None: "", "none": " (init none: from scratch)"}.get(args.init, f" (init {args.init})")
    d.print(f"{args.model}{started_from}: {len(train_set)} training images, {len(classes)} classes, {d.world_size} "
            f"process(es) on {d.device}, amp {engine.amp_name(amp_dtype, scaler)}; total batch {total_batch}, lr "
            f"{lr:.3g} (--lr {args.lr:g}, {'no' if args.lr_scaling == 'none' else args.lr_scaling} scaling), layer "
            f"decay {layer_decay}, {args.epochs} epoch{'s' * (args.epochs != 1)} x {steps_per_epoch} steps "
            f"({args.warmup_epochs:g} of warmup), starting at step {step}")
    if finished:
        engine.say_finished(args, resume_path, step, total_steps, "--epochs", d)

    mixup = data.Mixup(args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.smoothing, len(classes))
    val = val_loader(val_set, args, d)
    unreadable = engine.unreadable_images(args.max_unreadable, len(train_set), resume if resume_path else None,
                                          args.data_train or args.data)
    batches = engine.micro_batches(loader, sampler, steps_per_epoch, args.accum_iter, step)
    timer = engine.StepTimer(d.device)
    window, epoch_loss = torch.zeros(2, device=d.device), torch.zeros(2, device=d.device)  # (loss sum, count)
    last_log_time, images_seen = time.perf_counter(), 0
    bar = engine.progress_bar(tqdm, total=total_steps, initial=step, disable=not d.is_main or finished)
    ddp_model.train()
    while step < total_steps:
        epoch = step // steps_per_epoch
        is_log_step = (step + 1) % args.log_every == 0 or (step + 1) % steps_per_epoch == 0
        timer.start(exact=is_log_step)
        step_lr = engine.cosine_schedule(step, total_steps, warmup_steps, lr, args.min_lr)
        engine.set_lr(optimizer, step_lr)
        for micro in range(args.accum_iter):
            images, labels, skipped = next(batches)
            unreadable.add(skipped)
            images, labels = images.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
            timer.lap("data_s")
            with engine.grad_sync(ddp_model, last_micro=micro == args.accum_iter - 1):
                loss = train_micro_step(ddp_model, images, labels, mixup, args, step * args.accum_iter + micro, d,
                                        amp_dtype, scaler)
            window += torch.stack([loss, torch.ones_like(loss)])
            images_seen += images.shape[0]
            timer.lap("step_s")
        grad_norm = engine.optimizer_step(optimizer, scaler, ddp_model.parameters(), args.clip_grad)
        step += 1
        timer.lap("optimizer_s")
        bar.set_description(f"epoch {epoch}", refresh=False)  # the epoch of the step done, as the log and files say
        bar.update(1)
        if is_log_step:
            loss_now = engine.all_mean(window[0] / window[1], d)
            engine.check_finite(loss_now[None], ["loss"], step, args.output_dir, engine.non_finite_remedy(amp_dtype))
            engine.report_unreadable(unreadable, d, step, log)
            now = time.perf_counter()
            log(step=step, epoch=epoch, epochs_done=engine.epochs_done(step, steps_per_epoch), loss=loss_now,
                lr=step_lr, grad_norm=grad_norm,
                img_per_s=images_seen * d.world_size / (now - last_log_time), **timer.parts,
                **engine.loss_scale_field(scaler))
            bar.set_postfix(loss=f"{loss_now.item():.4f}", lr=f"{step_lr:.2e}")
            epoch_loss, window = epoch_loss + window, torch.zeros_like(window)
            last_log_time, images_seen = now, 0
        if step % steps_per_epoch:
            continue
        # the end of an epoch: evaluate, save
        engine.wait_for_gpu(d)
        evaluating_from = time.perf_counter()
        train_loss = engine.all_mean(epoch_loss[0] / epoch_loss[1], d).item()
        epoch_loss.zero_()
        stats = evaluate(engine.unwrap(model), val, d.device, amp_dtype, d.is_main)
        improved = stats["top1"] > best_top1  # a tie keeps the earlier epoch (run_class_finetuning.py:614)
        best_top1 = max(best_top1, stats["top1"])
        log(epoch=epoch, step=step, epochs_done=engine.epochs_done(step, steps_per_epoch), train_loss=train_loss,
            best_top1=best_top1, **{f"val_{k}": v for k, v in stats.items()})
        if d.is_main:
            bar.write(f"epoch {epoch}: train loss {train_loss:.4f}  val top-1 {stats['top1']:.2f}%  "
                      f"top-5 {stats['top5']:.2f}%  (best {best_top1:.2f}%)")
        named_files = engine.unreadable_for_checkpoint(unreadable, d, step, log)
        best_dir = args.output_dir if improved else best_dir
        state = engine.checkpoint_state("dtm_finetune", model, optimizer, scaler, args, step, steps_per_epoch,
                                        train_images=len(train_set), best_top1=best_top1, val=stats,
                                        best_dir=engine.best_dir_to_save(best_dir, args.output_dir),
                                        classes=list(classes), unreadable_files=named_files, log_lines=log.lines)
        if improved:  # before LAST: a run killed between the two saves retrains the epoch and writes BEST again
            engine.save_checkpoint(os.path.join(args.output_dir, engine.BEST), state)
        engine.save_checkpoint(os.path.join(args.output_dir, engine.LAST), state)
        ddp_model.train()
        last_log_time += time.perf_counter() - evaluating_from  # img_per_s: training time only
    bar.close()
    if log.enabled:  # rank 0, unless this is a finished run continued from elsewhere (it wrote nothing here)
        elsewhere = ""
        if not engine.same_path(best_dir, args.output_dir):  # continued from another folder, no better
            elsewhere = (f" (reached before this run started; it did not improve on it, so it wrote no "
                         f"{engine.BEST} here: look in {best_dir})")
        d.print(f"done: best val top-1 {best_top1:.2f}%{elsewhere}; checkpoints and log.jsonl in {args.output_dir}")
    if args.demo and args.epochs <= 10 and not finished:  # a finished run checked nothing
        d.print("demo: this is a short end-to-end check; a ViT learns these images slowly; docs/RESULTS.md has "
                "longer runs from scratch and from DTM checkpoints")
    return best_top1


if __name__ == "__main__":
    engine.cli(main)
