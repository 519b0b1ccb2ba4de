"""Semantic segmentation: a pre-trained ViT with UperNet on ADE20K, the evaluation of the DTM and BEiT papers.

    torchrun --nproc_per_node=8 train_seg.py --model vit_b --data /path/ADEChallengeData2016 --init pretrain.pth
    torchrun --nproc_per_node=8 train_seg.py --img_dir ... --ann_dir ... --val_img_dir ... --val_ann_dir ... \\
        --num_classes 21 --init pretrain.pth             # any image/mask folder pair
    python train_seg.py --eval_only --resume output/seg/checkpoint.pth --data /path/ADEChallengeData2016 [--flip]
    python train_seg.py            # the demo: tiny ViT on the built-in procedural shapes with masks, CPU, minutes

DTM (ICLR 2025) Sec. 4 reports ADE20K mIoU following BEiT (Bao et al., ICLR 2022, Sec. 3.2 and Appendix); the
recipe below is BEiT's mmsegmentation config for self-supervised checkpoints
(semantic_segmentation/configs/beit/upernet/upernet_beit_base_12_512_slide_160k_ade20k_pt.py), in plain torch:

    backbone    the shared ViT of dtm.py at 512x512 (32x32 patches); its relative position bias is copied into every
                block and resized to the 32x32 grid (dtm.adapt_state_dict: bicubic, where BEiT's code uses a
                geometric spacing of the offsets); stochastic depth 0.1; no final norm
    pyramid     outputs of 4 blocks (3, 5, 7, 11 of 12) at stride 16 -> strides 4, 8, 16, 32 by
                deconv-BN-GELU-deconv (4x), deconv (2x), identity, 2x2 max-pool (BEiT's fpn1..fpn4)
    UperNet     Xiao et al., ECCV 2018: pyramid pooling (scales 1, 2, 3, 6) on the coarsest level + FPN, fused at
                stride 4, dropout 0.1, 1x1 classifier; auxiliary FCN head on the third level (loss weight 0.4)
    loss        pixel-wise cross-entropy at the crop's resolution, averaged over the labeled pixels (255 = ignore;
                the mmseg 0.11 that BEiT used averages over all pixels, ignored ones included: a per-batch scale)
    optimizer   AdamW (0.9, 0.999), lr 7e-4, weight decay 0.05 (none on norms, biases, position tables),
                layer-wise lr decay 0.65 (the heads count as the top layer), batch 16 (8 GPUs x 2)
    schedule    160k iterations; linear warmup over 1500 from 1e-6 x lr, then poly decay (power 1) to 0
    eval        single scale (short side 512, long side <= 2048), sliding 512x512 windows with stride 341
                (zero-padded where the image is smaller), window logits averaged, resized to the label's size;
                optional horizontal flip; mIoU, mAcc and pixel accuracy (aAcc) from intersections and unions
                summed over the whole validation set, each image evaluated on one rank

Reproducibility: every training sample's augmentation is drawn from RNGs seeded by (seed, pass, image index) and
each micro-step's own randomness (drop path, dropout) from torch's RNG seeded by (seed, micro-step, rank), so
--resume from any checkpoint continues exactly as the uninterrupted run, with any number of DataLoader workers.
"""
import argparse
import contextlib
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from dtm import VIT_CONFIGS, VisionTransformer, adapt_state_dict, layer_id_for_param, student_state_dict
from train_pretrain import (JsonLogger, load_checkpoint, optimizer_step, param_groups, resolve_amp, save_checkpoint,
                            set_lr, setup_distributed)

IGNORE_INDEX = data.IGNORE_INDEX  # 255

# ---------------------------------------------------------------------------------------------------
# Model: ViT backbone -> feature pyramid -> UperNet + auxiliary FCN head


def default_out_indices(depth: int) -> list:
    """The 4 blocks whose outputs feed the pyramid: BEiT's (3, 5, 7, 11) for 12 blocks, (7, 11, 15, 23) for 24."""
    return [round(depth * k / 6) - 1 for k in (2, 3, 4, 6)]


class ConvBNReLU(nn.Sequential):
    """mmcv's ConvModule: conv (no bias) -> BatchNorm -> ReLU, kaiming-initialized."""

    def __init__(self, in_channels, out_channels, kernel_size):
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FeaturePyramid(nn.Module):
    """4 ViT feature maps at stride 16 (B, C, H/16, W/16) -> maps at strides 4, 8, 16, 32 (BEiT's fpn1..fpn4)."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, stride=2)

    def forward(self, features):
        f1, f2, f3, f4 = features
        return [self.up4(f1), self.up2(f2), f3, self.down2(f4)]


class UperHead(nn.Module):
    """UperNet decoder (mmseg's UPerHead): PPM on the coarsest map, FPN top-down, fuse all at the finest stride.

    features: 4 maps (B, C_in, H_i, W_i), finest first -> logits (B, num_classes, H_0, W_0).
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6), dropout=0.1):
        super().__init__()
        self.pool_scales = pool_scales
        self.ppm = nn.ModuleList([ConvBNReLU(in_channels, channels, 1) for _ in pool_scales])
        self.ppm_bottleneck = ConvBNReLU(in_channels + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvBNReLU(in_channels, channels, 1) for _ in range(3)])
        self.fpn_convs = nn.ModuleList([ConvBNReLU(channels, channels, 3) for _ in range(3)])
        self.fpn_bottleneck = ConvBNReLU(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def pyramid_pooling(self, x):
        size = x.shape[2:]
        pooled = [_resize(conv(F.adaptive_avg_pool2d(x, s)), size) for s, conv in zip(self.pool_scales, self.ppm)]
        return self.ppm_bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, features):
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features[:3])]
        laterals.append(self.pyramid_pooling(features[3]))
        for i in range(3, 0, -1):  # top-down: add the upsampled coarser map
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:3])] + [laterals[3]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head (mmseg's FCNHead, num_convs=1): 3x3 conv-BN-ReLU -> dropout -> 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout=0.1):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x):
        return self.classifier(self.dropout(self.conv(x)))


class ViTUperNet(nn.Module):
    """The segmentation model: backbone(images) -> 4 block outputs -> FeaturePyramid -> UperHead (+ FCNHead).

    forward(images (B, 3, S, S)) -> logits (B, num_classes, S, S) at the input's resolution;
    with_aux=True -> (logits, auxiliary logits), both (B, num_classes, S, S).
    """

    def __init__(self, backbone: VisionTransformer, num_classes: int, out_indices=None, channels=None,
                 aux_channels: int = 256):
        super().__init__()
        if backbone.patch_size != 16:
            raise ValueError(f"the feature pyramid (strides 4, 8, 16, 32) needs patch size 16, "
                             f"got {backbone.patch_size}")
        out_indices = list(out_indices) if out_indices else default_out_indices(backbone.depth)
        if (len(out_indices) != 4 or sorted(set(out_indices)) != out_indices
                or out_indices[0] < 0 or out_indices[-1] != backbone.depth - 1):
            raise ValueError(f"out_indices must be 4 increasing block indices ending with the last block "
                             f"({backbone.depth - 1}), got {out_indices}; e.g. {default_out_indices(backbone.depth)}")
        backbone.norm = nn.Identity()  # the pyramid reads block outputs; a final norm would get no gradient (DDP)
        dim = backbone.embed_dim
        channels = channels or dim  # BEiT: UperNet channels = the ViT width (768 for ViT-B, 1024 for ViT-L)
        self.backbone, self.out_indices, self.num_classes = backbone, out_indices, num_classes
        self.pyramid = FeaturePyramid(dim)
        self.decode_head = UperHead(dim, channels, num_classes)
        self.aux_head = FCNHead(dim, num_classes, aux_channels)

    def features(self, images):
        """images (B, 3, S, S) -> 4 maps at strides 4, 8, 16, 32, each (B, C, S/stride, S/stride)."""
        _, layers = self.backbone.forward_features(images, return_layers=self.out_indices)
        H, W = self.backbone.grid
        maps = [x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, H, W) for x in layers]  # drop CLS -> (B, C, H, W)
        return self.pyramid(maps)

    def forward(self, images, with_aux: bool = False):
        features = self.features(images)
        size = images.shape[2:]
        logits = _resize(self.decode_head(features), size)
        if not with_aux:
            return logits
        return logits, _resize(self.aux_head(features[2]), size)


def read_backbone_checkpoint(path: str) -> dict:
    """ViT weights from --init: a pre-training / fine-tuning checkpoint of this repo or a train_seg.py one."""
    sd = student_state_dict(load_checkpoint(path))
    if any(k.startswith("backbone.") for k in sd):  # a segmentation checkpoint: take its backbone
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if "patch_embed.weight" not in sd:
        raise ValueError(f"{path!r} holds no ViT of this repo (no 'patch_embed.weight'); keys like {sorted(sd)[:8]}")
    # heads, final norms and the mask token are not part of the segmentation backbone
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "norm.", "mask_token"))}


def build_backbone(model: str, crop_size: int, drop_path: float, init_sd: dict = None) -> VisionTransformer:
    """The ViT at the crop size, with BEiT's per-block relative position bias (or the checkpoint's own scheme)."""
    if model not in VIT_CONFIGS:
        raise ValueError(f"unknown model {model!r}; valid names: {', '.join(VIT_CONFIGS)}")
    config = VIT_CONFIGS[model]
    options = dict(rel_pos_bias="per_block", abs_pos_emb=False, layer_scale_init=0.1)
    if init_sd is not None:
        dim, _, patch, _ = init_sd["patch_embed.weight"].shape
        depth = 1 + max((int(k.split(".")[1]) for k in init_sd if k.startswith("blocks.")), default=-1)
        if (dim, depth, patch) != (config["embed_dim"], config["depth"], 16):
            raise ValueError(f"--init holds a ViT of width {dim}, depth {depth}, patch {patch}, but --model {model} "
                             f"is width {config['embed_dim']}, depth {config['depth']}, patch 16; "
                             f"pass the matching --model")
        has_rel_pos = any(k.endswith("rel_pos_bias.table") for k in init_sd)
        options = dict(rel_pos_bias="per_block" if has_rel_pos else "none", abs_pos_emb="pos_embed" in init_sd,
                       layer_scale_init=0.1 if "blocks.0.gamma_1" in init_sd else 0.0)
    return VisionTransformer(img_size=crop_size, patch_size=16, drop_path_rate=drop_path, use_mask_token=False,
                             **config, **options)


def load_backbone(backbone: VisionTransformer, sd: dict, path: str = "--init"):
    """Load ViT weights, position tables resized to the backbone's grid (shared table -> every block)."""
    missing, unexpected = backbone.load_state_dict(adapt_state_dict(sd, backbone), strict=False)
    missing = [k for k in missing if not k.startswith("norm.")]  # the final norm is unused (ViTUperNet drops it)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the backbone: missing keys {missing}, unexpected keys {unexpected}")


def check_labels(labels, num_classes: int):
    """Fail early on label maps that do not fit the number of classes (instead of an index error in the loss)."""
    values = labels[labels != IGNORE_INDEX]
    if values.numel() and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"training labels hold values {values.min().item()}..{values.max().item()} but there are "
                         f"{num_classes} classes (0..{num_classes - 1}, {IGNORE_INDEX} = ignore); check --num_classes "
                         f"and --reduce_zero_label")


def segmentation_loss(logits, aux_logits, labels, aux_weight: float = 0.4):
    """Cross-entropy of (B, K, H, W) logits against (B, H, W) labels, 255 ignored (mean over labeled pixels),
    plus aux_weight x the auxiliary head's. Returns (loss, main loss, auxiliary loss), float32."""
    main = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    aux = F.cross_entropy(aux_logits.float(), labels, ignore_index=IGNORE_INDEX)
    return main + aux_weight * aux, main, aux


# ---------------------------------------------------------------------------------------------------
# Evaluation: sliding-window inference and accumulated intersection / union


def window_starts(size: int, crop: int, stride: int) -> list:
    """mmseg's slide_inference: windows every `stride`, the last one moved back to end at the border."""
    num = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, size - crop), 0) for i in range(num)})


@torch.no_grad()
def slide_logits(model, image, num_classes: int, crop: int, stride: int, batch: int = 4):
    """Logits (K, H, W) of one image (3, H, W) from crop x crop windows, averaged where windows overlap.

    model maps (b, 3, crop, crop) -> (b, K, crop, crop). Windows at the border of an image smaller than the crop
    are zero-padded (the mean color after normalization) and the padding's logits dropped: the ViT takes one size.
    """
    _, H, W = image.shape
    boxes = [(y, x) for y in window_starts(H, crop, stride) for x in window_starts(W, crop, stride)]
    padded = F.pad(image, (0, max(crop - W, 0), 0, max(crop - H, 0)))  # (3, max(H, crop), max(W, crop))
    logits = image.new_zeros(num_classes, H, W, dtype=torch.float32)
    count = image.new_zeros(1, H, W, dtype=torch.float32)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        crops = torch.stack([padded[:, y:y + crop, x:x + crop] for y, x in chunk])  # (b, 3, crop, crop)
        out = model(crops).float()  # (b, K, crop, crop)
        for (y, x), o in zip(chunk, out):
            h, w = min(crop, H - y), min(crop, W - x)
            logits[:, y:y + h, x:x + w] += o[:, :h, :w]
            count[:, y:y + h, x:x + w] += 1
    return logits / count


@torch.no_grad()
def predict(model, image, out_size, num_classes: int, crop: int, stride: int, flip: bool = False, batch: int = 4):
    """Class probabilities (K, *out_size) of one normalized image (3, h, w): sliding-window logits resized
    (bilinear) to the label's size, softmax; with flip, the mirrored image's probabilities are added (mmseg)."""
    probs = _resize(slide_logits(model, image, num_classes, crop, stride, batch)[None], out_size)[0].softmax(0)
    if flip:
        flipped = slide_logits(model, image.flip(-1), num_classes, crop, stride, batch)
        probs = probs + _resize(flipped[None], out_size)[0].softmax(0).flip(-1)
    return probs


def intersect_and_union(pred, label, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """Per-class pixel counts of one image: (4, K) float64 = [intersection, union, predicted area, label area].

    pred, label: (H, W) integer maps of the same size; pixels labeled ignore_index are left out.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in size")
    valid = label != ignore_index
    pred, label = pred[valid].long(), label[valid].long()
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        raise ValueError(f"label values must be in 0..{num_classes - 1} or {ignore_index} (ignored), found "
                         f"{label.min().item()}..{label.max().item()}; check --num_classes / --reduce_zero_label")
    intersect = torch.bincount(label[pred == label], minlength=num_classes)
    area_pred = torch.bincount(pred, minlength=num_classes)
    area_label = torch.bincount(label, minlength=num_classes)
    return torch.stack([intersect, area_pred + area_label - intersect, area_pred, area_label]).double()


def segmentation_metrics(areas) -> dict:
    """aAcc, mIoU, mAcc (percent) and per-class IoU / Acc from summed (4, K) areas (see intersect_and_union).

    A class with an empty union (absent from labels and predictions) has IoU NaN, and an unlabeled class has
    Acc NaN; means skip NaNs (mmseg). A class predicted but never labeled has IoU 0 and counts.
    """
    intersect, union, _, area_label = areas.double().cpu()
    iou = intersect / union  # 0 / 0 = NaN
    acc = intersect / area_label
    return {"aAcc": 100 * (intersect.sum() / area_label.sum()).item(), "mIoU": 100 * iou.nanmean().item(),
            "mAcc": 100 * acc.nanmean().item(), "IoU": (100 * iou).tolist(), "Acc": (100 * acc).tolist()}


def shard_indices(num_items: int, rank: int, world_size: int) -> list:
    """This rank's share of the validation set: every image exactly once over all ranks (no padding)."""
    return list(range(rank, num_items, world_size))


@torch.no_grad()
def evaluate(model, dataset, num_classes: int, crop: int, stride: int, flip: bool = False, device="cpu",
             autocast_dtype=None, batch: int = 4, num_workers: int = 0, progress: bool = False) -> dict:
    """Single-scale sliding-window evaluation over `dataset` ((image (3, h, w), label (H, W)) pairs), each image
    on one rank; the (4, K) area sums are all-reduced, so every rank returns the metrics of the whole set."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    shard = torch.utils.data.Subset(dataset, shard_indices(len(dataset), rank, world))
    loader = torch.utils.data.DataLoader(shard, batch_size=None, num_workers=num_workers)
    areas = torch.zeros(4, num_classes, dtype=torch.float64, device=device)

    def run(crops):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return model(crops)

    for image, label in tqdm(loader, desc="eval", disable=not progress, leave=False):
        image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
        pred = predict(run, image, label.shape, num_classes, crop, stride, flip, batch).argmax(0)
        areas += intersect_and_union(pred, label, num_classes)
    if world > 1:
        dist.all_reduce(areas)
    model.train(was_training)
    return segmentation_metrics(areas)


# ---------------------------------------------------------------------------------------------------
# Training: poly schedule, layer-wise lr decay, seeded infinite sampler


def poly_schedule(step: int, total_steps: int, warmup_steps: int, base_value: float, power: float = 1.0,
                  min_value: float = 0.0, warmup_ratio: float = 1e-6) -> float:
    """mmcv's poly LR with linear warmup: lr = (base - min)(1 - step/total)^power + min; during the warmup
    that value times a factor rising linearly from warmup_ratio (step 0) to 1 (step warmup_steps)."""
    lr = (base_value - min_value) * (1 - min(step, total_steps) / total_steps) ** power + min_value
    if step < warmup_steps:
        lr *= 1 - (1 - step / warmup_steps) * (1 - warmup_ratio)
    return lr


def layer_decay_fn(depth: int, decay: float):
    """lr scale of a ViTUperNet parameter: decay^(depth + 1 - layer id) (BEiT); pyramid and heads scale 1."""
    def lr_scale(name: str) -> float:
        layer_id = layer_id_for_param(name[len("backbone."):], depth) if name.startswith("backbone.") else depth + 1
        return decay ** (depth + 1 - layer_id)
    return lr_scale


class SeededSegSamples(torch.utils.data.Dataset):
    """Index (dataset index, sample seed) -> base[index] with Python's random and torch seeded by sample seed, so
    a sample's augmentation depends on (seed, pass, index) only: same in any worker, after any resume."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, sample_seed = key
        random.seed(sample_seed)
        torch.manual_seed(sample_seed)
        return self.base[index]


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of (index, sample seed) for one rank: pass p is a permutation seeded by (seed, p), of which
    rank r takes every world_size-th entry from r (each image once per pass over all ranks). Starts `start`
    samples into the stream without loading anything (resume)."""

    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0):
        self.num_items, self.rank, self.world_size, self.seed = num_items, rank, world_size, seed
        self.per_pass = len(range(rank, num_items, world_size))
        if self.per_pass == 0:
            raise ValueError(f"{num_items} training images cannot feed {world_size} processes")
        self.start = start

    def __iter__(self):
        epoch, offset = divmod(self.start, self.per_pass)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_items, generator=g)[self.rank::self.world_size].tolist()
            for index in order[offset:]:
                yield index, ((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2 ** 63
            epoch, offset = epoch + 1, 0

    def pass_of(self, num_samples: int) -> int:
        """How many full passes this rank has made after num_samples samples."""
        return num_samples // self.per_pass


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    return ((seed * 1_000_003 + micro_step) * 1_009 + rank) % 2 ** 63


# ---------------------------------------------------------------------------------------------------
# Data


def build_datasets(args):
    """(train dataset, val dataset, class names) from --data (ADE20K), --img_dir/--ann_dir, or the demo shapes."""
    train_tf = data.SegTrainTransform(crop_size=args.crop_size, scale=tuple(args.scale),
                                      ratio_range=tuple(args.ratio_range), cat_max_ratio=args.cat_max_ratio)
    eval_tf = data.SegEvalTransform(scale=tuple(args.scale))
    if args.data:
        train = data.ADE20KDataset(args.data, "training", train_tf)
        val = data.ADE20KDataset(args.data, "validation", eval_tf)
        return train, val, list(data.ADE20K_CLASSES)
    if args.img_dir or args.ann_dir:
        if not (args.img_dir and args.ann_dir and args.val_img_dir and args.val_ann_dir and args.num_classes):
            raise ValueError("a generic dataset needs --img_dir, --ann_dir, --val_img_dir, --val_ann_dir and "
                             "--num_classes (label values 0..num_classes-1, 255 ignored; see --reduce_zero_label)")
        kw = dict(img_suffix=args.img_suffix, ann_suffix=args.ann_suffix, reduce_zero_label=args.reduce_zero_label)
        train = data.SegFolder(args.img_dir, args.ann_dir, train_tf, **kw)
        val = data.SegFolder(args.val_img_dir, args.val_ann_dir, eval_tf, **kw)
        return train, val, [str(c) for c in range(args.num_classes)]
    shapes = dict(img_size=args.demo_img_size, num_classes=args.demo_shape_classes)
    train = data.ShapesSegmentation(data.SyntheticShapes(args.demo_train_images, seed=0, **shapes), train_tf)
    val = data.ShapesSegmentation(data.SyntheticShapes(args.demo_val_images, seed=1, **shapes), eval_tf)
    return train, val, train.classes


# ---------------------------------------------------------------------------------------------------
# Arguments

# The demo (no dataset given): flags the user did not set take these values instead of the paper's.
DEMO_DEFAULTS = dict(model="vit_tiny", crop_size=64, scale=[384, 96], stride=43, channels=64, batch_size=8,
                     lr=3e-4, layer_decay=1.0, warmup_iters=30, iters=600, eval_every=600, save_every=600,
                     log_every=50, num_workers=0, output_dir="output/seg_demo", drop_path=0.0)  # random init: no decay


def get_args_parser():
    p = argparse.ArgumentParser("UperNet semantic segmentation with a pre-trained ViT (BEiT's ADE20K protocol)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data (none given: the built-in procedural demo)")
    g.add_argument("--data", help="ADE20K root (ADEChallengeData2016: images/{training,validation}, "
                                  "annotations/{training,validation})")
    g.add_argument("--img_dir", help="generic dataset: training images")
    g.add_argument("--ann_dir", help="generic dataset: training label maps (same base names)")
    g.add_argument("--val_img_dir", help="generic dataset: validation images")
    g.add_argument("--val_ann_dir", help="generic dataset: validation label maps")
    g.add_argument("--img_suffix", default=".jpg")
    g.add_argument("--ann_suffix", default=".png")
    g.add_argument("--num_classes", type=int, help="generic dataset: number of classes (ADE20K: 150)")
    g.add_argument("--reduce_zero_label", action="store_true",
                   help="generic dataset: label 0 means 'ignore', classes are 1..K (as ADE20K)")
    g.add_argument("--crop_size", type=int, default=512, help="training crop and sliding window (ViT input) size")
    g.add_argument("--scale", type=int, nargs=2, default=[2048, 512], help="(long, short) image scale, train and eval")
    g.add_argument("--ratio_range", type=float, nargs=2, default=[0.5, 2.0], help="training random resize ratios")
    g.add_argument("--cat_max_ratio", type=float, default=0.75, help="max share of one class in a training crop")
    g.add_argument("--num_workers", type=int, default=4)
    g.add_argument("--demo_img_size", type=int, default=96, help="demo: procedural image size")
    g.add_argument("--demo_shape_classes", type=int, default=4, help="demo: shape classes (+ background)")
    g.add_argument("--demo_train_images", type=int, default=2000)
    g.add_argument("--demo_val_images", type=int, default=32)

    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_b", choices=list(VIT_CONFIGS))
    g.add_argument("--init", help="checkpoint of this repo (pre-training or fine-tuning) to start the ViT from; "
                                  "omit for random init")
    g.add_argument("--out_indices", type=int, nargs=4, help="blocks feeding the pyramid (default: 3 5 7 11 for "
                                                            "12 blocks, 7 11 15 23 for 24)")
    g.add_argument("--channels", type=int, help="UperNet channels (default: the ViT width, as BEiT)")
    g.add_argument("--aux_weight", type=float, default=0.4, help="auxiliary FCN head loss weight")
    g.add_argument("--drop_path", type=float, default=0.1)

    g = p.add_argument_group("optimization (BEiT's ADE20K config for self-supervised checkpoints)")
    g.add_argument("--lr", type=float, default=7e-4)
    g.add_argument("--layer_decay", type=float, default=0.65)
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999])
    g.add_argument("--iters", type=int, default=160_000, help="optimizer steps")
    g.add_argument("--warmup_iters", type=int, default=1500)
    g.add_argument("--warmup_ratio", type=float, default=1e-6, help="warmup starts at this fraction of the lr")
    g.add_argument("--poly_power", type=float, default=1.0)
    g.add_argument("--min_lr", type=float, default=0.0)
    g.add_argument("--batch_size", type=int, default=2, help="per process per micro-step (8 GPUs x 2 = 16)")
    g.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation micro-steps per step")
    g.add_argument("--clip_grad", type=float, help="max gradient norm (BEiT: none)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"])

    g = p.add_argument_group("evaluation")
    g.add_argument("--stride", type=int, default=341, help="sliding window stride")
    g.add_argument("--flip", action="store_true", help="add horizontally flipped predictions")
    g.add_argument("--slide_batch", type=int, default=4, help="windows per forward pass")
    g.add_argument("--eval_only", action="store_true", help="evaluate the --resume model and exit")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="output/seg")
    g.add_argument("--resume", help="checkpoint of train_seg.py to continue from")
    g.add_argument("--eval_every", type=int, default=16_000)
    g.add_argument("--save_every", type=int, default=16_000)
    g.add_argument("--log_every", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not (args.data or args.img_dir or args.ann_dir):
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    if args.data and (args.img_dir or args.ann_dir):
        parser.error("pass either --data (ADE20K) or --img_dir/--ann_dir (a generic dataset), not both")
    if args.crop_size % 16:
        parser.error(f"--crop_size {args.crop_size} is not divisible by the patch size 16; use e.g. 512")
    if args.eval_only and not args.resume:
        parser.error("--eval_only evaluates a trained model: pass --resume (a checkpoint of train_seg.py)")
    if not 0 < args.stride <= args.crop_size:
        parser.error(f"--stride must be in 1..--crop_size ({args.crop_size}), got {args.stride}")
    for name in ("iters", "batch_size", "accum_iter", "eval_every", "save_every", "log_every", "slide_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------------
# Main


def format_metrics(metrics: dict, class_names: list) -> str:
    rows = [f"{'class':<24}{'IoU':>8}{'Acc':>8}"]
    for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
        rows.append(f"{name:<24}{iou:>8.2f}{acc:>8.2f}")
    rows.append(f"aAcc {metrics['aAcc']:.2f}  mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}")
    return "\n".join(rows)


def _json_safe(values):
    return [None if math.isnan(v) else round(v, 4) for v in values]


def main(argv=None):
    args = parse_args(argv)
    d = setup_distributed()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    autocast_dtype, scaler = resolve_amp(args.amp, d.device)

    train_set, val_set, class_names = build_datasets(args)
    num_classes = len(class_names)

    init_sd = read_backbone_checkpoint(args.init) if args.init else None
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    backbone = build_backbone(args.model, args.crop_size, args.drop_path, init_sd)
    if init_sd is not None:
        load_backbone(backbone, init_sd, repr(args.init))
    model = ViTUperNet(backbone, num_classes, args.out_indices, args.channels).to(d.device)
    if d.world_size > 1 and d.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # 2 images per GPU: BN statistics over all GPUs
    if d.is_main:
        num_params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{args.model} UperNet, {num_classes} classes, crop {args.crop_size}, pyramid from blocks "
              f"{model.out_indices}, init {args.init or 'random'}, {num_params:.1f}M params, "
              f"{d.world_size} process(es) on {d.device}, amp {autocast_dtype}")

    groups = param_groups(model, args.weight_decay, layer_decay_fn(backbone.depth, args.layer_decay))
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas))
    start_step = 0
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as e:
            raise ValueError(f"--resume {args.resume!r} does not fit this model (--model, --init, --crop_size, "
                             f"--channels and the classes must match the run that wrote it): {e}") from None
        if not args.eval_only:
            optimizer.load_state_dict(checkpoint["optimizer"])
            if scaler is not None and checkpoint.get("scaler") is not None:
                scaler.load_state_dict(checkpoint["scaler"])
        start_step = checkpoint.get("step", 0)
        if d.is_main:
            print(f"resumed from {args.resume} at step {start_step}")

    ddp_model = model
    if d.world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    logger = JsonLogger(os.path.join(args.output_dir, "log.jsonl"), enabled=d.is_main)

    def run_eval(step):
        metrics = evaluate(model, val_set, num_classes, args.crop_size, args.stride, args.flip, d.device,
                           autocast_dtype, args.slide_batch, args.num_workers, progress=d.is_main)
        if d.is_main:
            print(format_metrics(metrics, class_names))
            logger.log(step=step, mode="eval", aAcc=metrics["aAcc"], mIoU=metrics["mIoU"], mAcc=metrics["mAcc"],
                       IoU=_json_safe(metrics["IoU"]), flip=args.flip)
        return metrics

    if args.eval_only:
        return run_eval(start_step)

    samples_per_step = args.batch_size * args.accum_iter
    sampler = InfiniteSampler(len(train_set), d.rank, d.world_size, args.seed, start=start_step * samples_per_step)
    loader = torch.utils.data.DataLoader(SeededSegSamples(train_set), batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.num_workers, pin_memory=d.device.type == "cuda",
                                         drop_last=True, persistent_workers=args.num_workers > 0)
    batches = iter(loader)

    def save(step):
        save_checkpoint(os.path.join(args.output_dir, "checkpoint.pth"), {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": sampler.pass_of(step * samples_per_step), "step": step, "args": vars(args)})

    model.train()
    metrics, t0 = None, time.time()
    if start_step >= args.iters and d.is_main:
        print(f"nothing to train: the checkpoint is at step {start_step} of --iters {args.iters}")
    bar = tqdm(range(start_step, args.iters), initial=start_step, total=args.iters, disable=not d.is_main)
    for step in bar:
        lr = poly_schedule(step, args.iters, args.warmup_iters, args.lr, args.poly_power, args.min_lr,
                           args.warmup_ratio)
        set_lr(optimizer, lr)
        for micro in range(args.accum_iter):
            images, labels = next(batches)
            if step == start_step and micro == 0:
                check_labels(labels, num_classes)
            # drop path / dropout: a function of (seed, micro-step, rank), whatever the data loading did to the RNG
            torch.manual_seed(step_seed(args.seed, step * args.accum_iter + micro, d.rank))
            images = images.to(d.device, non_blocking=True)
            labels = labels.to(d.device, non_blocking=True)
            sync = micro == args.accum_iter - 1 or d.world_size == 1
            with ddp_model.no_sync() if not sync else contextlib.nullcontext():
                with torch.autocast(d.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits, aux_logits = ddp_model(images, with_aux=True)
                loss, main_loss, aux_loss = segmentation_loss(logits, aux_logits, labels, args.aux_weight)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr or use --amp bf16/fp32")
                scaled = loss / args.accum_iter
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
        grad_norm = optimizer_step(optimizer, scaler, model.parameters(), args.clip_grad)

        done = step + 1
        if done % args.log_every == 0 or done == args.iters:
            stats = torch.stack([loss.detach(), main_loss.detach(), aux_loss.detach()])  # of the last micro-step
            if d.world_size > 1:
                dist.all_reduce(stats)
                stats /= d.world_size
            if d.is_main:
                bar.set_postfix(loss=f"{stats[0].item():.4f}", lr=f"{lr:.2e}")
                logger.log(step=done, mode="train", loss=stats[0].item(), decode_loss=stats[1].item(),
                           aux_loss=stats[2].item(), lr=lr,
                           grad_norm=grad_norm.item(),
                           time=round(time.time() - t0, 2))
        if done % args.save_every == 0 or done == args.iters:
            save(done)
        if done % args.eval_every == 0 or done == args.iters:
            metrics = run_eval(done)
    bar.close()
    if d.is_main and metrics is not None:
        print(f"final mIoU {metrics['mIoU']:.2f} (aAcc {metrics['aAcc']:.2f}, mAcc {metrics['mAcc']:.2f})")
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
