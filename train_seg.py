"""Semantic segmentation: a pre-trained ViT with UperNet on ADE20K, the evaluation of the DTM and BEiT papers.

    torchrun --nproc_per_node=8 train_seg.py --model vit_b --data /path/ADEChallengeData2016 --init pretrain.pth
    torchrun --nproc_per_node=8 train_seg.py --img_dir ... --ann_dir ... --val_img_dir ... --val_ann_dir ... \\
        --num_classes 21 --init pretrain.pth             # any image/mask folder pair
    python train_seg.py --eval output/seg/checkpoint-best.pth --data /path/ADEChallengeData2016 [--flip]
    python train_seg.py            # the demo: tiny ViT on the built-in procedural shapes with masks, CPU, minutes

DTM (ICLR 2025) Sec. 4 reports ADE20K mIoU following BEiT (Bao et al., ICLR 2022, Sec. 3.2 and Appendix); the
recipe below is BEiT's mmsegmentation config for self-supervised checkpoints
(microsoft/unilm beit/semantic_segmentation/configs/beit/upernet/upernet_beit_base_12_512_slide_160k_ade20k_pt.py),
in plain torch:

    backbone    the shared ViT of dtm.py at 512x512 (32x32 patches); a shared relative position table is moved into
                every block (added to the block's own where there is one) and resized to the 32x32 grid as
                BEiT's code does (dtm.resize_rel_pos_table: the old offsets spaced geometrically, a cubic spline
                through them; beit/semantic_segmentation/mmcv_custom/checkpoint.py, geometric_progression);
                stochastic depth 0.1; no final norm
    pyramid     outputs of 4 blocks (3, 5, 7, 11 of 12) at stride 16 -> strides 4, 8, 16, 32 by
                deconv-BN-GELU-deconv (4x), deconv (2x), identity, 2x2 max-pool (BEiT's fpn1..fpn4)
    UperNet     Xiao et al., ECCV 2018: pyramid pooling (scales 1, 2, 3, 6) on the coarsest level + FPN, fused at
                stride 4, dropout 0.1, 1x1 classifier; auxiliary FCN head on the third level (loss weight 0.4)
    loss        pixel-wise cross-entropy at the crop's resolution, averaged over the labeled pixels (255 = ignore)
                of each micro-batch on each process, a step taking the mean of those means (the mmseg 0.11 that BEiT
                used averages over all pixels, ignored ones included: a scale per micro-batch, by which a pixel of a
                micro-batch with fewer labeled pixels weighs more here)
    optimizer   AdamW (0.9, 0.999), lr 7e-4, weight decay 0.05 (none on 1-D parameters, biases, cls_token and
                pos_embed: engine.param_groups, the official DTM code's rule; BEiT's LayerDecayOptimizerConstructor
                writes the same rule but compares 'cls_token' with the segmentor's 'backbone.cls_token', so BEiT's
                segmentation runs decay cls_token), layer-wise lr decay 0.65 (the heads count as the top layer),
                batch 16 (8 GPUs x 2)
    schedule    160k iterations; linear warmup over 1500 from 1e-6 x lr, then poly decay (power 1) to 0
    precision   --amp auto: bf16 where the GPU has it, else fp16 with a GradScaler (BEiT's config: fp16 with apex,
                IterBasedRunnerAmp, use_fp16=True)
    data        mmseg's ADE20K pipeline (data.SegTrainTransform), images resized with cv2's bilinear and labels with
                cv2's nearest neighbour, as mmcv's imrescale (data.resize_cv2_linear, data.resize_cv2_nearest)
    eval        single scale (short side 512, long side <= 2048), sliding 512x512 windows with stride 341
                (zero-padded where the image is smaller), window logits averaged, resized to the label's size;
                optional horizontal flip; mIoU, mAcc and pixel accuracy (aAcc) from intersections and unions
                summed over the whole validation set, each image evaluated on one rank

Reproducibility: engine.py's one scheme (a sample's augmentation from (seed, pass over the data, index), a
micro-step's drop path and dropout from (seed, micro-step, rank)): a run resumed from any checkpoint continues as the
uninterrupted run, with any number of DataLoader workers (bit for bit where engine.py's docstring says). A relaunch
with another number of samples per step keeps the step count (--iters and the schedule count steps) and continues the
data at that step's place in the new order.
"""
import argparse
import math
import os
import shlex
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import dtm
import engine

IGNORE_INDEX = data.IGNORE_INDEX  # 255

# ---------------------------------------------------------------------------------------------------
# Model: ViT backbone -> feature pyramid -> UperNet + auxiliary FCN head


def default_out_indices(depth: int) -> list:
    """The 4 blocks whose outputs feed the pyramid: BEiT's (3, 5, 7, 11) for 12 blocks, (7, 11, 15, 23) for 24; the
    blocks at 1/3, 1/2, 2/3 and the end of other depths, each before the next (5 blocks: 0, 1, 2, 4)."""
    indices = [round(depth * k / 6) - 1 for k in (2, 3, 4, 6)]
    for i in (2, 1, 0):  # round() can put two of them on one block (5 blocks: 1, 1, 2, 4)
        indices[i] = min(indices[i], indices[i + 1] - 1)
    return indices


def head_settings(args: dict) -> dict:
    """--channels and --out_indices as the model of args' --model uses them (None, the default: its width, and
    default_out_indices of its depth)."""
    config = dtm.VIT_CONFIGS[args["model"]]
    return {"channels": args["channels"] or config["embed_dim"],
            "out_indices": list(args["out_indices"] or default_out_indices(config["depth"]))}


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

    def __init__(self, backbone: dtm.VisionTransformer, num_classes: int, out_indices=None, channels=None,
                 aux_channels: int = 256):
        super().__init__()
        if backbone.patch_size % 4:
            raise ValueError(f"the feature pyramid (strides patch / 4, / 2, x 1, x 2) needs a patch size divisible "
                             f"by 4, got {backbone.patch_size}; use a ViT whose patch size is a multiple of 4 (this "
                             f"repo's: 16)")
        if min(backbone.grid) < 2:  # --crop_size is checked for patch 16; a checkpoint may bring another patch size
            (H, W), patch = backbone.img_size, backbone.patch_size
            raise ValueError(f"the feature pyramid pools the ViT's patch grid by 2, so it needs 2x2 patches at least; "
                             f"a {H}x{W} crop in patches of {patch} gives {H // patch}x{W // patch}: pass --crop_size "
                             f"{2 * patch} or more")
        if backbone.depth < 4:  # a checkpoint of a shallower ViT: no 4 different blocks to take
            raise ValueError(f"the feature pyramid takes the outputs of 4 different blocks, so it needs a ViT of 4 "
                             f"blocks or more; this one has {backbone.depth}: pass --init a deeper ViT's checkpoint")
        out_indices = list(out_indices) if out_indices else default_out_indices(backbone.depth)
        if (len(out_indices) != 4 or sorted(set(out_indices)) != out_indices
                or out_indices[0] < 0 or out_indices[-1] != backbone.depth - 1):
            raise ValueError(f"out_indices must be 4 increasing block indices ending with the last block "
                             f"({backbone.depth - 1}), got {out_indices}; e.g. {default_out_indices(backbone.depth)}")
        backbone.norm = nn.Identity()  # the pyramid reads block outputs; a final norm would get no gradient (DDP)
        dim = backbone.embed_dim
        channels = channels or dim  # BEiT's configs: channels=768 for ViT-B (..._ade20k_pt.py:39), 1024 for ViT-L
        self.backbone, self.out_indices, self.num_classes = backbone, out_indices, num_classes
        self.pyramid = FeaturePyramid(dim)
        self.decode_head = UperHead(dim, channels, num_classes)
        self.aux_head = FCNHead(dim, num_classes, aux_channels)

    def features(self, images):
        """images (B, 3, S, S) -> 4 maps at strides 4, 8, 16, 32 (patch 16), each (B, C, S // stride, S // stride)."""
        layers = self.backbone.forward_features(images, return_layers=self.out_indices).layers
        H, W = self.backbone.grid
        maps = [layers[i][:, 1:].transpose(1, 2).reshape(images.shape[0], -1, H, W)  # drop CLS -> (B, C, H, W)
                for i in self.out_indices]
        return self.pyramid(maps)

    def forward(self, images, with_aux: bool = False):
        features = self.features(images)
        size = images.shape[2:]
        logits = _resize(self.decode_head(features), size)
        if not with_aux:
            return logits
        return logits, _resize(self.aux_head(features[2]), size)


def build_model(args, num_classes: int, checkpoint: dict = None, path: str = None) -> "ViTUperNet":
    """ViTUperNet at --crop_size on the ViT of `checkpoint` (any checkpoint of this repo, dtm.vit_from_checkpoint; a
    shared relative position table is added to each block's own table, as the official --init_both_rpb, or copied
    into blocks without one, as BEiT; then resized to the crop's grid), or on a new ViT without a checkpoint.
    Per-block tables, no final norm, stochastic depth --drop_path."""
    if checkpoint is None:
        backbone = dtm.build_vit(args.model, img_size=args.crop_size, drop_path_rate=args.drop_path,
                                 rel_pos_bias="per_block", use_mask_token=False, weight_init="downstream")
    else:
        backbone, _ = dtm.vit_from_checkpoint(checkpoint, args.crop_size, 0, "per_block", args.drop_path, args.model,
                                              path)
    return ViTUperNet(backbone, num_classes, args.out_indices, args.channels)


def segmentation_loss(logits, aux_logits, labels, aux_weight: float = 0.4):
    """Cross-entropy of (B, K, H, W) logits against (B, H, W) labels, 255 ignored (mean over labeled pixels),
    plus aux_weight x the auxiliary head's. Returns (loss, main loss, auxiliary loss), float32. A batch with no
    labeled pixel (every crop void) gives 0, not PyTorch's 0 / 0 = NaN, which would stop the run at the next log."""
    labeled = (labels != IGNORE_INDEX).sum().clamp(min=1)
    main = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / labeled
    aux = F.cross_entropy(aux_logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / labeled
    return main + aux_weight * aux, main, aux


# ---------------------------------------------------------------------------------------------------
# Evaluation: sliding-window inference and accumulated intersection / union


def window_starts(size: int, crop: int, stride: int) -> list:
    """mmseg's slide_inference: windows every `stride`, the last one moved back to end at the border."""
    if not 0 < stride <= crop:  # a stride past the crop leaves pixels that no window covers
        raise ValueError(f"the sliding-window stride must be in 1..{crop} (the crop size), got {stride}")
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


@torch.no_grad()
def evaluate(model, dataset, num_classes: int, crop: int, stride: int, flip: bool = False, device="cpu",
             autocast_dtype=None, batch: int = 4, num_workers: int = 0, progress: bool = False) -> dict:
    """Single-scale sliding-window evaluation over `dataset` ((image (3, h, w), label (H, W)) pairs), each image
    on one rank; the (4, K) area sums are all-reduced, so every rank returns the metrics of the whole set.
    Probabilities that are not finite on any image are an error (engine.refuse_non_finite_eval), not figures; a pair
    that one rank cannot read stops every rank with its message (engine.build_on_all_ranks)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    shard = torch.utils.data.Subset(dataset, engine.shard_indices(len(dataset), engine.Dist(rank, world)))
    loader = torch.utils.data.DataLoader(shard, batch_size=None, num_workers=num_workers)

    def run(crops):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return model(crops)

    def sums():  # this rank's (4, K) areas and images with a probability that is not finite
        areas = torch.zeros(4, num_classes, dtype=torch.float64, device=device)
        non_finite = torch.zeros((), dtype=torch.float64, device=device)
        for image, label in tqdm(loader, desc="eval", disable=not progress, leave=None):
            image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
            probs = predict(run, image, label.shape, num_classes, crop, stride, flip, batch)
            non_finite += ~probs.isfinite().all()
            areas += intersect_and_union(probs.argmax(0), label, num_classes)
        return areas, non_finite

    areas, non_finite = engine.build_on_all_ranks(engine.Dist(rank, world), sums, fix=None)
    if world > 1:
        dist.all_reduce(areas)
        dist.all_reduce(non_finite)
    model.train(was_training)
    engine.refuse_non_finite_eval(int(non_finite.item()), len(dataset), autocast_dtype)
    return segmentation_metrics(areas)


# ---------------------------------------------------------------------------------------------------
# Data


def build_datasets(args, train: bool = True):
    """(train dataset or None, val dataset, class names) from --data (ADE20K), --img_dir/--ann_dir/--val_img_dir/
    --val_ann_dir, or the demo shapes. train=False (--eval): no training set, and its folders are not needed."""
    train_tf = data.SegTrainTransform(crop_size=args.crop_size, scale=tuple(args.scale),
                                      ratio_range=tuple(args.ratio_range), cat_max_ratio=args.cat_max_ratio)
    eval_tf = data.SegEvalTransform(scale=tuple(args.scale))
    if args.data:
        train_set = data.ADE20KDataset(args.data, "training", train_tf) if train else None
        return train_set, data.ADE20KDataset(args.data, "validation", eval_tf), list(data.ADE20K_CLASSES)
    if not args.demo:
        needed = {"--img_dir": args.img_dir, "--ann_dir": args.ann_dir} if train else {}
        needed.update({"--val_img_dir": args.val_img_dir, "--val_ann_dir": args.val_ann_dir})
        if train:  # --eval: the checkpoint's
            needed["--num_classes"] = args.num_classes
        missing = [flag for flag, value in needed.items() if not value]
        if missing:
            raise ValueError(f"a generic dataset {'for training ' if train else ''}needs {', '.join(needed)} "
                             f"(missing: {', '.join(missing)}; label values 0..num_classes-1, 255 ignored; see "
                             f"--reduce_zero_label)")
        kw = dict(img_suffix=args.img_suffix, ann_suffix=args.ann_suffix, reduce_zero_label=args.reduce_zero_label,
                  num_classes=args.num_classes)
        train_set = data.SegFolder(args.img_dir, args.ann_dir, train_tf, **kw) if train else None
        val = data.SegFolder(args.val_img_dir, args.val_ann_dir, eval_tf, **kw)
        return train_set, val, [str(c + bool(args.reduce_zero_label)) for c in range(args.num_classes)]  # file values
    shapes = dict(img_size=args.demo_img_size, num_classes=args.demo_shape_classes)
    train_set = data.ShapesSegmentation(data.SyntheticShapes(args.demo_train_images, seed=0, **shapes), train_tf) \
        if train else None
    val = data.ShapesSegmentation(data.SyntheticShapes(args.demo_val_images, seed=1, **shapes), eval_tf)
    return train_set, val, val.classes


def label_pixels(sample) -> np.ndarray:
    """(image, label map) as dataset.load returns it -> pixels per label value (256,), for check_dataset."""
    return np.bincount(np.asarray(sample[1]).ravel(), minlength=256)


def warn_about_labels(pixels: np.ndarray, num_classes: int, reduce_zero_label: bool, d, ade20k: bool = False):
    """Start-up warnings from the validation label maps' pixels per value (after --reduce_zero_label). ade20k: read
    with --data (1-based by definition, --reduce_zero_label fixed)."""
    if np.ndim(pixels) == 0:  # no sample
        return
    share = pixels[IGNORE_INDEX] / max(pixels.sum(), 1)
    zero_based = (f"if the label files are already 0-based (values 0..{num_classes - 1}, 0 a class), "
                  f"--reduce_zero_label makes class 0 ignore and shifts the others down: pass --no-reduce_zero_label")
    if pixels[:num_classes].sum() == 0:
        d.print(f"warning: the validation label maps hold no class pixel (all {IGNORE_INDEX} = ignore): mIoU will be "
                f"undefined; check the label values{'' if ade20k else ' and --reduce_zero_label'}")
    elif num_classes > 1 and pixels[1:num_classes].sum() == 0 and share > 0:
        # with --reduce_zero_label, files of 0 and 1 (0-based) and of 1 and 255 read alike: both fixes are named
        d.print(f"warning: the validation label maps hold no pixel of classes 1..{num_classes - 1}, only 0 and "
                f"{IGNORE_INDEX} (= ignore, {share:.0%} of the pixels): if {IGNORE_INDEX} marks your foreground "
                f"(binary masks are often saved as 0/255), map it to {1 + reduce_zero_label} in the label files"
                f"{'; ' + zero_based if reduce_zero_label and not ade20k else ''}; as they are, training and mIoU see "
                f"the background alone")
    elif reduce_zero_label and not ade20k and num_classes > 1 and pixels[num_classes - 1] == 0:
        d.print(f"warning: the validation label maps hold no pixel of the last class, {num_classes - 1} (file value "
                f"{num_classes}), with --reduce_zero_label: {zero_based}")


# ---------------------------------------------------------------------------------------------------
# Arguments

# The demo (no dataset given): flags the user did not set take these values instead of the paper's.
DEMO_DEFAULTS = dict(model="vit_tiny", crop_size=64, scale=[384, 96], stride=43, channels=64,
                     batch_size=8, lr=3e-4, layer_decay=1.0,  # random init: no layer decay
                     warmup_iters=30, iters=600, eval_every=600, save_every=600, log_every=50, num_workers=0,
                     output_dir="output/seg_demo", drop_path=0.0)
PAPER_SCHEDULE = dict(iters=160_000, warmup_iters=1500)  # BEiT's ADE20K config; not given: a continued run's own


def get_args_parser():
    p = engine.trainer_parser(description="UperNet semantic segmentation with a pre-trained ViT (BEiT's ADE20K "
                              "protocol).",
                              epilog=engine.demo_help(DEMO_DEFAULTS, ", and --init none to start a run (a relaunch "
                                                      "continues from its checkpoint's)"))
    g = p.add_argument_group("data (none given: the built-in procedural demo)")
    g.add_argument("--data", help="ADE20K root (ADEChallengeData2016: images/{training,validation}, "
                                  "annotations/{training,validation})")
    g.add_argument("--img_dir", help="generic dataset: training images")
    g.add_argument("--ann_dir", help="generic dataset: training label maps (same base names)")
    g.add_argument("--val_img_dir", help="generic dataset: validation images")
    g.add_argument("--val_ann_dir", help="generic dataset: validation label maps")
    g.add_argument("--img_suffix", default=".jpg", help="generic dataset: image file suffix")
    g.add_argument("--ann_suffix", default=".png", help="generic dataset: label file suffix")
    g.add_argument("--num_classes", type=int, help="generic dataset: number of classes (ADE20K: 150); with --eval "
                   "the checkpoint's unless given")
    g.add_argument("--reduce_zero_label", action=argparse.BooleanOptionalAction, default=None,
                   help="generic dataset: label 0 means 'ignore', classes are 1..K (as ADE20K); with --eval the "
                        "checkpoint's training data's unless given (--no-reduce_zero_label: labels 0..K-1)")
    g.add_argument("--crop_size", type=int, default=512, help="training crop and sliding window (ViT input) size")
    g.add_argument("--scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="images rescaled, aspect kept, to fit LONG x SHORT (training: times a --ratio_range draw); "
                        "default: 2048 512 (the demo: 384 96), with --eval the checkpoint's")
    g.add_argument("--ratio_range", type=float, nargs=2, default=[0.5, 2.0], metavar=("MIN", "MAX"),
                   help="training random resize ratios of --scale")
    g.add_argument("--cat_max_ratio", type=float, default=0.75,
                   help="a training crop is redrawn, up to 10 times (the last kept, as mmseg), while one class "
                        "covers this share of its labelled pixels or more, or it holds one class only (1: no redraw)")
    g.add_argument("--num_workers", type=int, default=engine.workers_default(4),
                   help="DataLoader workers per process: 4, or the CPUs this process may use where fewer")
    g.add_argument("--max_unreadable", type=float, default=0.001,
                   help="stop when more than this fraction of the training images cannot be read (fewer are "
                   "skipped; 16 in a row stop the run too)")
    g.add_argument("--demo_img_size", type=int, default=96, help="demo: procedural image size")
    g.add_argument("--demo_shape_classes", type=int, default=4, help="demo: shape classes (+ background)")
    g.add_argument("--demo_train_images", type=int, default=2000, help="demo: training images")
    g.add_argument("--demo_val_images", type=int, default=32, help="demo: validation images")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_b", choices=list(dtm.VIT_CONFIGS), help="ViT size (patch 16)")
    g.add_argument("--init", help="checkpoint of this repo (pre-training, fine-tuning or segmentation) or an official "
                                  "DTM / BEiT / BEiT v2 ViT's weights to start the ViT from, or 'none' for a random "
                                  "ViT (required to start a run, except in the demo)")
    g.add_argument("--eval", metavar="CHECKPOINT", help="only evaluate this checkpoint of train_seg.py on the "
                   "validation set and exit. Its --model, --crop_size, --channels, --out_indices (a given one must "
                   "agree), the demo's --demo_* sizes and, unless given, --scale and --stride come from it; --init, "
                   "--resume and --fresh are ignored, so a training command plus --eval works")
    pyramid = ", ".join(f"{' '.join(map(str, default_out_indices(depth)))} for {depth} blocks"
                        for depth in sorted({config["depth"] for config in dtm.VIT_CONFIGS.values()}))
    g.add_argument("--out_indices", type=int, nargs=4, help=f"blocks feeding the pyramid (default: {pyramid})")
    g.add_argument("--channels", type=int, help="UperNet channels (default: the ViT width, as BEiT)")
    g.add_argument("--aux_weight", type=float, default=0.4, help="auxiliary FCN head loss weight")
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate of the ViT")
    g.add_argument("--compile", action="store_true", help="torch.compile the ViT's blocks")
    g.add_argument("--grad_checkpoint", action="store_true", help="recompute each block's activations in the "
                   "backward instead of storing them (less memory, more compute)")

    g = p.add_argument_group("optimization (BEiT's ADE20K config for self-supervised checkpoints)")
    g.add_argument("--lr", type=float, default=7e-4, help="peak lr (not scaled with the batch)")
    g.add_argument("--layer_decay", type=float, default=0.65, help="layer-wise lr decay of the ViT")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW betas")
    g.add_argument("--iters", type=int, default=None, help="optimizer steps; default: a continued run's own, else "
                   f"{PAPER_SCHEDULE['iters']} (the demo: {DEMO_DEFAULTS['iters']})")
    g.add_argument("--warmup_iters", type=int, default=None, help="linear lr warmup steps; default: a continued "
                   f"run's own, else {PAPER_SCHEDULE['warmup_iters']} (the demo: {DEMO_DEFAULTS['warmup_iters']})")
    g.add_argument("--warmup_ratio", type=float, default=1e-6, help="warmup starts at this fraction of the lr")
    g.add_argument("--poly_power", type=float, default=1.0, help="power of the poly lr decay")
    g.add_argument("--min_lr", type=float, default=0.0,
                   help="final lr of the poly decay, the same for every layer (not scaled by --layer_decay, as mmcv)")
    g.add_argument("--batch_size", type=int, default=2, help="per process (GPU) per micro-step; 8 GPUs x 2 = 16")
    g.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation micro-batches per optimizer step")
    g.add_argument("--clip_grad", type=float, default=0.0, help="max global grad norm (0: no clipping, as BEiT's "
                   "config: grad_clip=None, upernet_beit_base_12_512_slide_160k_ade20k_pt.py:74; the norm is "
                   "still logged)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPUs with native bf16 (compute capability >= 8.0), else fp16 with a "
                   "GradScaler (V100); fp32 on the CPU")

    g = p.add_argument_group("evaluation")
    g.add_argument("--stride", type=int, default=None,
                   help="sliding window stride; default: 2/3 of --crop_size, 341 at 512 (the demo: 43 at its "
                        "--crop_size 64), with --eval the checkpoint's")
    g.add_argument("--flip", action="store_true", help="add horizontally flipped predictions")
    g.add_argument("--slide_batch", type=int, default=4, help="windows per forward pass")
    g.add_argument("--eval_every", type=int, default=16_000, help="evaluate (and keep checkpoint-best.pth by mIoU) "
                                                                  "every N steps and after the last")

    g = engine.add_run_args(p, output_dir="output/seg")
    g.add_argument("--save_every", type=int, default=16_000, help="save checkpoint-last.pth every N steps and after "
                                                                  "the last")
    return p


EVAL_FROM_CHECKPOINT = ["model", "crop_size", "channels", "out_indices"]  # --eval: the checkpoint's; given: must agree
EVAL_DEMO_DATA = ["demo_img_size", "demo_shape_classes", "demo_val_images"]  # --eval of a demo run: its, unless given


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    generic = any((args.img_dir, args.ann_dir, args.val_img_dir, args.val_ann_dir))  # an image/mask folder pair
    args.demo = not (args.data or generic)
    if args.demo:  # --eval takes the image scale and the stride from its checkpoint, not from the demo's defaults
        parser.set_defaults(**{k: v for k, v in DEMO_DEFAULTS.items()
                               if not (args.eval and k in ("scale", "stride")) and k not in PAPER_SCHEDULE})
        args = parser.parse_args(argv)
        if args.crop_size != DEMO_DEFAULTS["crop_size"]:  # the demo's stride is 2/3 of its crop: 2/3 of this one
            parser.set_defaults(stride=None)
            args = parser.parse_args(argv)
        args.demo = True
    if args.data and generic:
        raise ValueError("pass either --data (ADE20K) or --img_dir/--ann_dir/--val_img_dir/--val_ann_dir (a generic "
                         "dataset), not both")
    if args.eval is None:  # --eval takes these from the checkpoint unless given (run_eval)
        args.scale = [2048, 512] if args.scale is None else args.scale
        args.stride = args.crop_size * 2 // 3 if args.stride is None else args.stride  # BEiT: 341 at 512
    engine.check_image_size("--crop_size", args.crop_size, 512, smallest=2 * dtm.PATCH_SIZE)  # the check below's
    if args.crop_size < 2 * dtm.PATCH_SIZE:
        raise ValueError(f"--crop_size {args.crop_size} is too small: the feature pyramid pools the ViT's patch grid "
                         f"by 2, so it needs 2x2 patches at least: --crop_size {2 * dtm.PATCH_SIZE} or more")
    if args.scale is not None and min(args.scale) <= 0:
        raise ValueError(f"--scale LONG SHORT must be positive sizes, got {' '.join(map(str, args.scale))}")
    if not 0 < args.ratio_range[0] <= args.ratio_range[1]:
        raise ValueError(f"--ratio_range MIN MAX must be positive with MIN <= MAX, got "
                         f"{' '.join(f'{r:g}' for r in args.ratio_range)}")
    if not 0 < args.cat_max_ratio <= 1:
        raise ValueError(f"--cat_max_ratio is a share of the crop's labelled pixels, in (0, 1] (1: no limit), got "
                         f"{args.cat_max_ratio:g}")
    if args.eval and args.stride is not None and args.stride < 1:  # its crop size is the checkpoint's (run_eval)
        raise ValueError(f"--stride must be >= 1, got {args.stride}: leave it out (--eval takes the checkpoint's) or "
                         f"pass one up to the crop size it was trained with")
    if args.eval is None and not 1 <= args.stride <= args.crop_size:
        raise ValueError(f"--stride must be in 1..--crop_size ({args.crop_size}), got {args.stride}")
    if args.channels is not None and args.channels < 1:
        if args.eval:
            raise ValueError(f"--channels must be >= 1, got {args.channels}: leave it out (--eval takes the "
                             f"checkpoint's)")
        width = dtm.VIT_CONFIGS[args.model]["embed_dim"]
        default = f"the demo's {DEMO_DEFAULTS['channels']}" if args.demo else f"the ViT's width ({width})"
        raise ValueError(f"--channels must be >= 1, got {args.channels}: leave it out for {default}; a run started "
                         f"with --channels 0 (which then meant the ViT's width) continues with --channels {width} "
                         f"({args.model})")
    smallest, most = data.SyntheticShapes.MIN_SIZE, data.SyntheticShapes.MAX_CLASSES  # its own bounds, named by flag
    if not (args.demo_img_size >= smallest and 1 <= args.demo_shape_classes <= most):
        raise ValueError(f"--demo_img_size must be >= {smallest} and --demo_shape_classes in 1..{most}, got "
                         f"{args.demo_img_size} and {args.demo_shape_classes}")
    for name in ("iters", "batch_size", "accum_iter", "eval_every", "save_every", "log_every", "slide_batch",
                 "demo_train_images", "demo_val_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:  # iters None: set_schedule's
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name, ok, rule in (("aux_weight", args.aux_weight >= 0, ">= 0"),
                           ("poly_power", args.poly_power >= 0, ">= 0 (a negative --poly_power makes the lr grow)"),
                           ("warmup_iters", (args.warmup_iters or 0) >= 0, ">= 0 (0: no warmup)"),
                           ("warmup_ratio", 0 <= args.warmup_ratio <= 1, "in 0..1 (the lr's fraction at step 0)")):
        if not ok:  # each named with its value (one message named all four)
            default = get_args_parser().get_default(name)
            raise ValueError(f"--{name} must be {rule}, got {getattr(args, name):g}"
                             + (f" (its default: {default:g})" if default is not None else ""))
    engine.check_shared_args(args)
    if args.data or args.demo:
        where = "with --data (ADE20K: 150 classes, label 0 ignored)" if args.data else "in the demo (no data given)"
        engine.refuse_ignored(args, parser, ["img_suffix", "ann_suffix", "reduce_zero_label"],
                              f"{where}; they describe a generic dataset (--img_dir ...)")
        if args.num_classes is not None and not (args.data and args.num_classes == len(data.ADE20K_CLASSES)):
            raise ValueError(f"--num_classes {args.num_classes} would do nothing {where}: leave it out"
                             + ("" if args.data else " (the demo's classes: --demo_shape_classes + background)"))
    for flag in ("img_suffix", "ann_suffix"):  # a file ending with its dot: ".jpg", or mmseg's "_leftImg8bit.png"
        if "." not in getattr(args, flag):
            raise ValueError(f"--{flag} {getattr(args, flag)!r} is not a file ending: pass it with its dot, e.g. "
                             f"--{flag} .{getattr(args, flag) or ('jpg' if flag == 'img_suffix' else 'png')}")
    if args.num_classes is not None and not (args.data or args.demo):
        top = IGNORE_INDEX - bool(args.reduce_zero_label)  # class values 0..K-1 below 255 (ignore), after the shift
        if not 2 <= args.num_classes <= top:
            raise ValueError(f"--num_classes must be in 2..{top} (label values 0..num_classes-1"
                             f"{' after --reduce_zero_label' if args.reduce_zero_label else ''}, {IGNORE_INDEX} = "
                             f"ignore), got {args.num_classes}")
    if not args.demo:
        engine.refuse_ignored(args, parser, EVAL_DEMO_DATA + ["demo_train_images"],
                              "with real data (they size the demo's procedural images)")
    engine.refuse_ignored_in_demo(args, parser)
    if args.warmup_iters == 0:
        engine.refuse_ignored(args, parser, ["warmup_ratio"], "with --warmup_iters 0 (no warmup)")
    elif args.warmup_iters and args.warmup_ratio == 1:  # the warmup's factor: 1 at every step
        raise ValueError(f"--warmup_iters {args.warmup_iters} would do nothing with --warmup_ratio 1 (the warmup "
                         f"would start at the full lr): pass a --warmup_ratio below 1, or --warmup_iters 0 for none")
    if args.poly_power == 0:
        engine.refuse_ignored(args, parser, ["min_lr"], "with --poly_power 0 (the lr stays at its peak after the "
                              "warmup)")
    if args.eval:  # the model and its input come from the checkpoint (run_eval), and so does the demo's data
        engine.from_checkpoint_unless_given(args, parser, argv, EVAL_FROM_CHECKPOINT + EVAL_DEMO_DATA)
    if args.init is None and args.eval is None and not engine.continues_a_run(args):  # a continued run: its own
        if not args.demo:
            raise ValueError("pass --init PATH (a checkpoint of this repo, e.g. from train_pretrain.py) or --init "
                             "none for a random ViT")
        args.init = "none"  # the demo's new run
    if args.eval is None:  # --eval: as the checkpoint's training data were read, unless given (take_label_reading)
        args.reduce_zero_label = bool(args.reduce_zero_label)
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


def check_data_folders(args):
    """A mistyped folder is named as such (ADE20KDataset would call it "not an ADE20K folder", a layout problem)."""
    for flag in ("data", "img_dir", "ann_dir", "val_img_dir", "val_ann_dir"):
        path = getattr(args, flag)
        if path and not os.path.isdir(path):
            what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
            raise FileNotFoundError(f"--{flag} {path!r} {what}" + (
                "; pass the ADEChallengeData2016 folder (images/ and annotations/ in it)" if flag == "data" else ""))


def main(argv=None):
    """Train (returns the metrics of the last evaluation) or, with --eval, evaluate (returns the metrics)."""
    args = parse_args(argv)
    check_data_folders(args)
    with engine.backend_flags_kept():  # setup's TF32 and autotuner: for the run only
        d = engine.setup()
        try:
            return run_eval(args, d) if args.eval else train(args, d)
        finally:
            engine.teardown()


def run_metrics(model, val_set, class_names, args, d, amp_dtype) -> dict:
    """Sliding-window evaluation on every rank's share; prints the per-class table on rank 0."""
    metrics = evaluate(engine.unwrap(model), val_set, len(class_names), args.crop_size, args.stride, args.flip,
                       d.device, amp_dtype, args.slide_batch, args.num_workers, progress=d.is_main)
    d.print(format_metrics(metrics, class_names))
    if math.isnan(metrics["mIoU"]):
        kept = "" if args.eval else f" and no {engine.BEST} is kept"  # --eval keeps none anyway
        d.print(f"warning: the validation labels hold no class pixel (all ignored, 255): mIoU is undefined{kept}; "
                f"check the label values{'' if args.data else ' and --reduce_zero_label'}")
    return metrics


def note_vit_l_recipe(args, d):
    """The optimizer's defaults are BEiT's ViT-B recipe; say so for a ViT-L run that keeps them."""
    if args.model == "vit_l" and (args.lr, args.layer_decay, args.drop_path) == (7e-4, 0.65, 0.1):
        d.print("note: --lr 7e-4, --layer_decay 0.65 and --drop_path 0.1 are BEiT's ViT-B recipe; BEiT v2's ViT-L "
                "config uses --lr 4e-5 --layer_decay 0.9 --drop_path 0.2 (README: Semantic segmentation)")


def reads_zero_as_ignore(args_of_run: dict) -> bool:
    """Whether a run's label maps were read with reduce_zero_label (--data, ADE20K: always; the demo: never)."""
    return bool(args_of_run.get("data")) or bool(args_of_run.get("reduce_zero_label"))


def take_label_reading(args, trained: dict, d):
    """--eval on a generic dataset reads its label maps as the checkpoint's training data were read, unless
    --reduce_zero_label / --no-reduce_zero_label says otherwise (a left-out flag evaluated 1..K labels as 0..K-1)."""
    if args.data or args.demo:
        return
    as_trained = reads_zero_as_ignore(trained)
    if args.reduce_zero_label is None:
        args.reduce_zero_label = as_trained
        d.print(f"label maps read as in training: {'0 ignored, 1..K as classes' if as_trained else 'labels 0..K-1'} "
                f"({'--reduce_zero_label' if as_trained else '--no-reduce_zero_label'}, from the checkpoint)")
    elif args.reduce_zero_label != as_trained:
        d.print(f"note: --{'' if args.reduce_zero_label else 'no-'}reduce_zero_label given, but the checkpoint's "
                f"training data were read {'with' if as_trained else 'without'} it")


def other_classes_fix(args, trained: dict) -> str:
    """What to pass where --eval's validation data has other classes than the checkpoint's head: a generic dataset
    takes its classes from the checkpoint, so the demo's --demo_shape_classes or --data (ADE20K) differ."""
    if args.demo:
        return f"leave --demo_shape_classes out (its run's: {trained['demo_shape_classes']})"
    if trained.get("demo"):
        return "it was trained on the demo's images: leave --data out to evaluate it on them"
    folders = " ".join(f"--{flag} {shlex.quote(str(trained[flag]))}" for flag in ("val_img_dir", "val_ann_dir"))
    return f"pass the validation folders of its data instead of --data (its run's: {folders})"


def evaluated_folders(val_set) -> dict:
    """The validation images and label maps --eval read (a SegFolder's, ADE20K's too), absolute (null: the demo's),
    for eval.jsonl: lines of one checkpoint on two validation sets told apart."""
    folders = {"val_img_dir": getattr(val_set, "img_dir", None), "val_ann_dir": getattr(val_set, "ann_dir", None)}
    return {name: folder and os.path.abspath(folder) for name, folder in folders.items()}


def run_eval(args, d):
    """--eval CHECKPOINT: the model (ViT, crop size, UperNet width, classes) comes from the checkpoint, and so do the
    image scale and the window stride unless given; the result is appended to output_dir/eval.jsonl (a training run's
    log.jsonl is left alone)."""
    checkpoint = engine.load_checkpoint(args.eval, "dtm_seg", "--eval", hint="; to start from its weights pass it as "
                                        "--init PATH in a training command (without --eval)")
    saved = {**checkpoint["args"], **head_settings(checkpoint["args"])}  # a given value is compared with the used one
    engine.refuse_demo_eval(args, checkpoint["args"], args.eval, ["data", "val_img_dir", "val_ann_dir", "num_classes"],
                            "--data, or --val_img_dir and --val_ann_dir")
    engine.take_from_checkpoint(args, saved, EVAL_FROM_CHECKPOINT, args.eval)
    engine.take_from_checkpoint(args, checkpoint["args"], EVAL_DEMO_DATA, args.eval, must_agree=False)
    args.scale = checkpoint["args"]["scale"] if args.scale is None else args.scale
    args.stride = checkpoint["args"]["stride"] if args.stride is None else args.stride
    take_label_reading(args, checkpoint["args"], d)
    if not (args.data or args.demo):  # a generic dataset: the head's classes
        if args.num_classes is None:
            args.num_classes = checkpoint["num_classes"]
        elif args.num_classes != checkpoint["num_classes"]:
            raise ValueError(f"--num_classes {args.num_classes} differs from the {checkpoint['num_classes']} classes "
                             f"{args.eval!r} was trained on: leave --num_classes out")
    d.print(f"{args.eval}: {args.model}, crop {args.crop_size}, scale {args.scale[0]}x{args.scale[1]}, stride "
            f"{args.stride}{', flip' if args.flip else ''}")
    if args.stride > args.crop_size:
        trained_stride = checkpoint["args"].get("stride", args.crop_size * 2 // 3)
        raise ValueError(f"--stride {args.stride} is larger than the crop size {args.crop_size} that {args.eval!r} "
                         f"was trained with: the windows would leave pixels uncovered; pass --stride "
                         f"{min(trained_stride, args.crop_size)} (or any value up to {args.crop_size})")
    _, val_set, class_names = engine.build_on_all_ranks(d, build_datasets, args, False)
    if len(class_names) != checkpoint["num_classes"]:
        raise ValueError(f"the validation data has {len(class_names)} classes, {args.eval!r} was trained on "
                         f"{checkpoint['num_classes']}: {other_classes_fix(args, checkpoint['args'])}")
    model = build_model(args, len(class_names), checkpoint, args.eval)
    model.load_state_dict(checkpoint["model"])
    amp_dtype, _ = engine.resolve_amp(args.amp, d.device)
    metrics = run_metrics(model.to(d.device), val_set, class_names, args, d, amp_dtype)
    if d.is_main:
        engine.append_eval(args.output_dir, {"eval": args.eval, **evaluated_folders(val_set),
                                             "amp": engine.amp_name(amp_dtype, None),
                                             "scale": list(args.scale), "stride": args.stride,
                                             "flip": args.flip, "reduce_zero_label": reads_zero_as_ignore(vars(args)),
                                             "aAcc": metrics["aAcc"], "mIoU": metrics["mIoU"],
                                             "mAcc": metrics["mAcc"], "IoU": _json_safe(metrics["IoU"])})
    return metrics


def set_poly_lr(optimizer, step: int, args) -> float:
    """Each parameter group's lr at `step`: mmcv's poly schedule from the group's own peak (--lr x its layer-decay
    lr_scale) down to --min_lr, which is not scaled (mmcv's PolyLrUpdaterHook.get_lr decays each group's initial lr
    to min_lr). Returns the lr of the unscaled groups (UperNet's), which the log shows."""
    def poly(peak):
        return engine.poly_schedule(step, args.iters, args.warmup_iters, peak, args.poly_power, args.min_lr,
                                    args.warmup_ratio)
    for group in optimizer.param_groups:
        group["lr"] = poly(args.lr * group.get("lr_scale", 1.0))
    return poly(args.lr)


def set_schedule(args, saved_args: dict = None):
    """--iters / --warmup_iters not given: a continued run's own (saved_args), else BEiT's, or the demo's."""
    engine.set_run_length(args, {k: DEMO_DEFAULTS[k] for k in PAPER_SCHEDULE} if args.demo else PAPER_SCHEDULE,
                          saved_args)
    if args.warmup_iters == 0:  # a continued run's own 0 (a given one: parse_args refuses the same)
        engine.refuse_ignored(args, get_args_parser(), ["warmup_ratio"], "with --warmup_iters 0, the continued run's "
                              "(no warmup)")


def resumed_model(args, num_classes, checkpoint, path):
    """The model of a run continued from `checkpoint` (the run's own), which must read its label maps as before."""
    trained_reduced = reads_zero_as_ignore(checkpoint["args"])
    if not args.data and trained_reduced != reads_zero_as_ignore(vars(args)):
        how = "with" if trained_reduced else "without"
        raise ValueError(f"{path!r} continues a run that read its label maps {how} --reduce_zero_label, "
                         f"which a run cannot change (its classes would change meaning): relaunch {how} it")
    return build_model(args, num_classes, checkpoint, path)


def initial_model(args, d, num_classes):
    """The model a new run starts from: UperNet on --init's ViT, or on a random one (--init none)."""
    if args.init is None:
        raise ValueError("pass --init PATH (a checkpoint of this repo, e.g. from train_pretrain.py) or --init none "
                         "for a random ViT")
    init = None if args.init == "none" else engine.build_on_all_ranks(d, dtm.read_checkpoint, args.init, "--init",
                                                                      fix=engine.SAME_CHECKPOINT)
    model = build_model(args, num_classes, init, args.init)
    if init is not None:  # as fine-tuning's "loaded X; initialized afresh: ..."
        d.print(f"loaded the ViT of {args.init}; initialized afresh: the feature pyramid and UperNet's decode and "
                "auxiliary heads"
                + (" (--init reads a checkpoint's ViT only; to continue that run, --resume it)"
                   if init.get("kind") == "dtm_seg" else ""))
    if init is not None and model.backbone.pos_embed is None and \
            dtm.stored_rel_pos_bias(model.backbone.state_dict()) == "none":
        d.print(f"note: {args.init} has no position information (no relative position tables, no absolute "
                f"position embedding), so neither has this model")
    return model


def train(args, d):
    amp_dtype, scaler = engine.resolve_amp(args.amp, d.device)
    sync_bn = d.world_size > 1 and d.device.type == "cuda"
    if args.batch_size * (d.world_size if sync_bn else 1) < 2:
        raise ValueError("--batch_size 1 cannot train UperNet's BatchNorm (its pyramid pooling leaves one value per "
                         "channel); use --batch_size 2 or more, or several GPUs (SyncBatchNorm pools the batch)")
    resume_path, own_run = engine.prepare_run(args, d, new_run_reads={"--init": args.init})
    if resume_path is not None:
        resume = engine.load_checkpoint(resume_path, "dtm_seg", hint="; to start from its weights pass it as --init "
                                        "PATH instead of --resume", auto=resume_path != args.resume)
        engine.refuse_demo_resume(args, resume["args"], resume_path,
                                  ["data", "img_dir", "ann_dir", "val_img_dir", "val_ann_dir", "num_classes"],
                                  "--data, or --img_dir, --ann_dir, --val_img_dir and --val_ann_dir")
    set_schedule(args, resume["args"] if resume_path is not None else None)
    engine.seed_all(args.seed)  # the same initial weights on every rank
    train_set, val_set, class_names = engine.build_on_all_ranks(d, build_datasets, args)
    num_classes = len(class_names)
    if args.demo:
        d.print(f"DEMO (no --data): UperNet on a {args.model} segments {len(train_set)} built-in procedural images "
                f"({num_classes} classes incl. background) for {args.iters} iterations on {d.device}. For a real run "
                f"pass --data (ADE20K) or --img_dir/--ann_dir/--val_img_dir/--val_ann_dir, and --init (see --help).")
    else:  # a bad validation file or label is found now, not at the first evaluation
        pixels = engine.check_dataset(val_set, d, args.num_workers, label_pixels)
        warn_about_labels(pixels, num_classes, reads_zero_as_ignore(vars(args)), d, ade20k=args.data is not None)
    loader, sampler, steps_per_epoch = engine.train_loader(train_set, args, d)
    model = resumed_model(args, num_classes, resume, resume_path) if resume_path is not None else \
        initial_model(args, d, num_classes)
    model.backbone.grad_checkpointing = args.grad_checkpoint
    if args.compile:
        engine.compile_blocks(model.backbone)
    model.to(d.device)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # 2 images per GPU: BN statistics over all GPUs
    groups = engine.param_groups(model, args.weight_decay,
                                 engine.layer_decay_fn(model.backbone.depth, args.layer_decay, prefix="backbone."))
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas))
    step, best_miou, best_dir = 0, -1.0, args.output_dir  # best_dir: where checkpoint-best.pth of best_miou is
    if resume_path is not None:  # checked before the banner: a refused relaunch prints its error only
        used = head_settings(resume["args"])  # given as the values a run started without them used: no change
        for flag in ("channels", "out_indices"):
            if getattr(args, flag) is not None and getattr(args, flag) == used[flag]:
                resume["args"][flag] = getattr(args, flag)
        step = engine.resume(resume, resume_path, model, optimizer, scaler, args, steps_per_epoch, d,
                             train_images=len(train_set), counts_steps=True)  # --iters counts steps
        best_miou = resume["best_miou"]
        best_dir = engine.resumed_best_dir(resume, resume_path)
    # after engine.resume, which resolves a continued run's --init (and checks a given one against it)
    d.print(f"{args.model} UperNet, {num_classes} classes, crop {args.crop_size}, pyramid from blocks "
            f"{model.out_indices}, init {args.init}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
            f"{d.world_size} process(es) on {d.device}, amp {engine.amp_name(amp_dtype, scaler)}; "
            f"{len(train_set)} training images, total batch {args.batch_size * args.accum_iter * d.world_size}, lr "
            f"{args.lr:.3g} (--lr, not scaled by the batch), layer decay {args.layer_decay}, {args.iters} iterations "
            f"({args.warmup_iters} of warmup), starting at step {step}")
    engine.warn_long_warmup(args.warmup_iters, args.iters, "--warmup_iters", d)
    note_vit_l_recipe(args, d)
    lowest = min(group["lr_scale"] for group in groups)  # each group decays from its own peak to --min_lr
    engine.warn_min_lr(args.min_lr, args.lr * lowest, f" of the lowest layers (--lr x {lowest:.3g}, --layer_decay)"
                       if lowest < 1 else " (--lr)", d)
    finished = step >= args.iters
    log = engine.open_log(args.output_dir, resume if own_run else None, d.is_main, finished)
    ddp_model = engine.ddp(model, d)
    if finished:
        engine.say_finished(args, resume_path, step, args.iters, "--iters", d)

    def save(name, metrics=None):
        named_files = engine.unreadable_for_checkpoint(unreadable, d, step, log)
        engine.save_checkpoint(os.path.join(args.output_dir, name), engine.checkpoint_state(
            "dtm_seg", model, optimizer, scaler, args, step, steps_per_epoch, train_images=len(train_set),
            best_miou=best_miou, best_dir=engine.best_dir_to_save(best_dir, args.output_dir),
            num_classes=num_classes, metrics=metrics, log_window=engine.all_mean(window, d).cpu(),
            log_window_per_step=True, log_window_of_ranks=engine.rank_rows(window, d).cpu(),  # each rank's own
            unreadable_files=named_files, log_lines=log.lines))

    unreadable = engine.unreadable_images(args.max_unreadable, len(train_set), resume if resume_path else None,
                                          args.data or args.img_dir)
    batches = engine.micro_batches(loader, sampler, steps_per_epoch, args.accum_iter, step)
    timer = engine.StepTimer(d.device)
    # since the last log line: the sums of the steps' loss, decode loss and aux loss (each step's mean over its
    # micro-batches), and the steps; so another --accum_iter after a resume weighs every step alike
    window = torch.zeros(4, device=d.device)
    if resume_path is not None and resume.get("log_window") is not None:  # resumed between two log lines
        window = engine.own_row(resume.get("log_window_of_ranks"), engine.log_window_per_step(resume), d).to(d.device)
    # the last evaluation's metrics: a relaunch keeps its run's (saved with each checkpoint; a finished run prints them)
    metrics = resume.get("metrics") if resume_path is not None else None
    last_log_time, images_seen = time.perf_counter(), 0
    bar = engine.progress_bar(tqdm, total=args.iters, initial=step, disable=not d.is_main or finished)
    ddp_model.train()
    while step < args.iters:
        is_log_step = (step + 1) % args.log_every == 0 or step + 1 == args.iters
        timer.start(exact=is_log_step)
        lr = set_poly_lr(optimizer, step, args)
        for micro in range(args.accum_iter):
            images, labels, skipped = next(batches)
            unreadable.add(skipped)
            images, labels = images.to(d.device, non_blocking=True), labels.to(d.device, non_blocking=True)
            timer.lap("data_s")
            engine.seed_step(args.seed, step * args.accum_iter + micro, d.rank)  # drop path, dropout
            with engine.grad_sync(ddp_model, last_micro=micro == args.accum_iter - 1):
                with engine.autocast(d, amp_dtype):
                    logits, aux_logits = ddp_model(images, with_aux=True)
                losses = segmentation_loss(logits, aux_logits, labels, args.aux_weight)
                engine.backward(losses[0] / args.accum_iter, scaler)
            window += torch.stack([*(x.detach() for x in losses), torch.ones_like(losses[0])]) / args.accum_iter
            images_seen += images.shape[0]
            timer.lap("step_s")
        grad_norm = engine.optimizer_step(optimizer, scaler, ddp_model.parameters(), args.clip_grad)
        step += 1
        timer.lap("optimizer_s")
        bar.update(1)
        if is_log_step:
            means = engine.all_mean(window[:3] / window[3], d)
            engine.check_finite(means, ["loss", "decode_loss", "aux_loss"], step, args.output_dir,
                                engine.non_finite_remedy(amp_dtype))
            engine.report_unreadable(unreadable, d, step, log)
            now = time.perf_counter()
            log(step=step, epoch=(step - 1) // steps_per_epoch, loss=means[0], decode_loss=means[1], aux_loss=means[2],
                lr=lr, grad_norm=grad_norm, img_per_s=images_seen * d.world_size / (now - last_log_time),
                **timer.parts, **engine.loss_scale_field(scaler))
            bar.set_postfix(loss=f"{means[0].item():.4f}", lr=f"{lr:.2e}")
            window.zero_()
            last_log_time, images_seen = now, 0
        evaluate_now = step % args.eval_every == 0 or step == args.iters
        save_now = step % args.save_every == 0 or step == args.iters
        pausing_from = None
        if evaluate_now or save_now:  # left out of img_per_s
            engine.wait_for_gpu(d)
            pausing_from = time.perf_counter()
        if evaluate_now:
            engine.share_rank0_buffers(model, d)  # BatchNorm statistics (no SyncBatchNorm on the CPU)
            metrics = run_metrics(model, val_set, class_names, args, d, amp_dtype)
            log(step=step, mode="eval", aAcc=metrics["aAcc"], mIoU=metrics["mIoU"], mAcc=metrics["mAcc"],
                IoU=_json_safe(metrics["IoU"]), flip=args.flip)
            if metrics["mIoU"] > best_miou:
                best_miou, best_dir = metrics["mIoU"], args.output_dir
                save(engine.BEST, metrics)
            ddp_model.train()
        if save_now:
            save(engine.LAST, metrics)
        if pausing_from is not None:
            last_log_time += time.perf_counter() - pausing_from  # img_per_s: training time only
    bar.close()
    engine.report_unreadable(unreadable, d, step, log)
    if metrics is not None:  # the folder: unless this is a finished run continued from elsewhere (it wrote nothing)
        elsewhere = ""
        if best_miou >= 0 and not engine.same_path(best_dir, args.output_dir):  # continued, no better
            elsewhere = (f"; best mIoU {best_miou:.2f}, reached before this run started: it did not improve on it, so "
                         f"it wrote no {engine.BEST} here: look in {best_dir}")
        d.print(f"final mIoU {metrics['mIoU']:.2f} (aAcc {metrics['aAcc']:.2f}, mAcc {metrics['mAcc']:.2f})"
                + (f"{elsewhere}; checkpoints and log.jsonl in {args.output_dir}" if log.enabled else ""))
    return metrics


if __name__ == "__main__":
    engine.cli(main)
