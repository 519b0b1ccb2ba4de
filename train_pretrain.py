"""DTM pre-training: a masked ViT student learns a frozen teacher's morphed tokens (DTM, ICLR 2025, Sec. 3).

    torchrun --nproc_per_node=8 train_pretrain.py --model vit_b --data /path/imagenet/train \\
        --teacher clip:/path/ViT-B-16.pt --output_dir output/dtm_vit_b
    python train_pretrain.py            # the demo: tiny ViT, pixel targets, built-in SyntheticShapes, CPU, minutes

One training step (the official code's engine_for_dtm.py, with the paper's names):
    targets = teacher(images)                                  frozen CLIP ViT-B/16 tokens (B, N, 512), no grad
    R_l = sample_schedule(...) for each of L levels            the dynamic scheduler (Sec. 3.2), seeded by the step
    groups_l = token_morphing(targets, R_l)                    Algorithm 1 on the teacher's tokens (morph.py)
    loss = mean_l  l(morphed student predictions, morphed targets)     dtm.dtm_loss, smooth-L1 beta 2

The first part of this file is the training plumbing shared with train_finetune.py and train_seg.py
(distributed setup, AMP, LR schedule, optimizer groups, RNG, checkpoints, JSONL log); the rest is the DTM loop.

Reproducibility and exact resume. Everything random is a function of (seed, position), not of a running state:
every sample's crop/flip/jitter/mask is drawn from RNGs seeded by (seed, epoch, dataset index) (SeededSamples),
the morphing schedules from random.Random(seed * 1_000_003 + micro_step), and the step's own randomness (drop path,
the random split of Algorithm 1) from torch's RNG re-seeded by (seed, micro_step, rank). So a run resumed from any
checkpoint (including --save_every ones taken mid-epoch, which skip the epoch's finished batches without loading
them) continues exactly as the uninterrupted run, with any number of DataLoader workers.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import dtm
import morph
import mto
from data import BlockMaskGenerator, ImageFolder, MaskedImageDataset, PretrainTransform, SyntheticShapes

# ---------------------------------------------------------------------------------------------------
# Shared training plumbing (imported by train_finetune.py and train_seg.py)


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def setup_distributed() -> Dist:
    """Process group from torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK): nccl on CUDA, gloo on CPU.

    Without torchrun: a single process on cuda:0 if available, else the CPU.
    """
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return Dist(0, 1, 0, device, True)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank, device, rank == 0)


def resolve_amp(mode: str, device) -> tuple:
    """--amp -> (autocast dtype or None, GradScaler or None).

    "auto": bf16 on GPUs that support it, fp16 + GradScaler otherwise (V100), fp32 on the CPU.
    "bf16" / "fp16" / "fp32" force a choice; fp16 needs CUDA, bf16 also works on the CPU (slowly).
    """
    device = torch.device(device)
    if mode not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"unknown --amp {mode!r}; use auto, bf16, fp16 or fp32")
    if mode == "auto":
        if device.type != "cuda":
            return None, None
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "fp32":
        return None, None
    if mode == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bf16; use --amp fp16 (or auto)")
        return torch.bfloat16, None
    if device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp fp32 or bf16 on the CPU")
    return torch.float16, torch.amp.GradScaler("cuda")


def cosine_schedule(step, total_steps, warmup_steps, base_value, final_value) -> float:
    """Linear warmup from 0 to base_value over warmup_steps, then cosine decay to final_value at total_steps."""
    if step < warmup_steps:
        return base_value * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_value + 0.5 * (base_value - final_value) * (1.0 + math.cos(math.pi * progress))


NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "rel_pos_bias", "positional_embedding", "class_embedding")


def param_groups(model: nn.Module, weight_decay: float, lr_scale_fn=None) -> list:
    """AdamW groups: no weight decay for 1-D parameters (norms, biases, layer scale), position tables and
    cls/mask tokens (BEiT's get_parameter_groups). lr_scale_fn(name) -> float goes into group["lr_scale"]
    (layer-wise lr decay; set_lr applies it). Frozen parameters are left out; group["param_names"] lists names."""
    groups = {}
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or any(key in name for key in NO_DECAY_NAMES)
        scale = 1.0 if lr_scale_fn is None else float(lr_scale_fn(name))
        group = groups.setdefault((no_decay, scale), {
            "params": [], "param_names": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale})
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


def set_lr(optimizer, lr: float):
    """Set every group's lr to lr * group["lr_scale"] (1 if absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def seed_everything(seed: int, rank: int = 0):
    """Seed torch (CPU and CUDA), Python's random and numpy with seed + rank."""
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2 ** 32)


def rng_state() -> dict:
    """The global RNG states: torch CPU (+ every CUDA device), random, numpy."""
    state = {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    """Restore what rng_state() returned (the CUDA part only if saved and CUDA is present)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, state: dict):
    """torch.save on rank 0 only, atomically (write a temp file, then rename): a crash never leaves half a file."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """A checkpoint dict written by save_checkpoint (CPU tensors); clear errors for a missing or foreign file.

    Checkpoints hold plain Python args and RNG states next to tensors, so this unpickles: load only files you trust.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path!r} is not a checkpoint torch.load can read: {e}") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path!r} is not a checkpoint of this repo (expected a dict with a 'model' entry, got "
                         f"{sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__})")
    return checkpoint


class JsonLogger:
    """Appends one JSON object per log() call to path (rank 0 passes enabled=True, the others False)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, **fields):
        if not self.enabled:
            return
        fields = {k: (v.item() if torch.is_tensor(v) else v) for k, v in fields.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(fields) + "\n")
            f.flush()


def optimizer_step(optimizer, scaler, parameters, clip_grad: float) -> torch.Tensor:
    """Unscale (fp16), clip the gradient norm to clip_grad (0 or None: no clipping), step, zero the gradients.

    Returns the gradient norm before clipping (measured also without clipping, for the log)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(parameters, clip_grad or float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------------
# DTM pre-training

PATCH_SIZE = 16
DEMO_IMAGES = 512
# `python train_pretrain.py` without --data: these replace the defaults (flags given explicitly still win)
DEMO_DEFAULTS = dict(model="vit_tiny", teacher="pixels", img_size=112, batch_size=32, epochs=6, warmup_epochs=1,
                     lr=1.5e-2, drop_path=0.0, num_masked=19, min_block=4, min_crop_scale=0.3, num_workers=1,
                     output_dir="output/pretrain_demo", log_every=4)


def seed_of(*parts) -> int:
    """A 63-bit seed that is a fixed function of its parts (e.g. ("data", seed, epoch, index))."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class SeededSamples(torch.utils.data.Dataset):
    """dataset[(epoch, index)] = base[index] with torch's and Python's RNGs seeded by (seed, epoch, index).

    The augmentation and mask of a sample then depend on nothing else (not on the worker, the rank or what was
    drawn before), which makes resuming mid-epoch exact. The caller's RNG states are left untouched."""

    def __init__(self, base, seed: int):
        self.base, self.seed = base, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, epoch_index):
        epoch, index = epoch_index
        sample_seed = seed_of("data", self.seed, epoch, index)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            try:
                return self.base[index]
            finally:
                random.setstate(py_state)


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler's shuffled share of this rank, yielding (epoch, index); set_epoch(epoch, skip) starts
    after `skip` samples (the batches a resumed run already trained on) without loading them."""

    def __init__(self, sampler: torch.utils.data.DistributedSampler):
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.sampler.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(self.sampler)[self.skip:]])

    def __len__(self):
        return len(self.sampler) - self.skip


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DTM pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Without --data: a small CPU demo on built-in procedural images.")
    a = p.add_argument
    # model and teacher
    a("--model", default="vit_b", choices=list(dtm.VIT_CONFIGS), help="student ViT (patch 16)")
    a("--teacher", default=None,
      help="clip:PATH (OpenAI ViT-B-16.pt, the paper) | ckpt:PATH (a checkpoint of this repo) | pixels; required with --data")
    a("--teacher_norm", default="imagenet", choices=["imagenet", "clip"],
      help="input normalization of a CLIP teacher; the official code feeds it the ImageNet-normalized crop")
    a("--img_size", type=int, default=224)
    a("--drop_path", type=float, default=0.1, help="stochastic depth rate of the student (BEiT v2 pre-training)")
    a("--layer_scale", type=float, default=0.1, help="layer scale init (0 disables)")
    a("--rel_pos_bias", default="shared", choices=["shared", "per_block", "none"])
    # data and masking
    a("--data", default=None, help="ImageFolder root (class subfolders of images); absent: the built-in demo")
    a("--min_crop_scale", type=float, default=0.08, help="RandomResizedCrop scale lower bound")
    a("--num_masked", type=int, default=75, help="masked patches per image (BEiT block-wise masking)")
    a("--min_block", type=int, default=16, help="minimum patches per masking block")
    a("--num_workers", type=int, default=10, help="DataLoader workers per process")
    # DTM objective
    a("--levels", type=int, default=2, help="L: morphing schedules (levels) per step, losses averaged")
    a("--max_merged", type=int, default=None, help="merged tokens n ~ U{0..max_merged}; default: all N patches")
    a("--max_iters", type=int, default=14, help="morphing iterations k ~ U{1..max_iters}")
    a("--schedule_rule", default="official", choices=["official", "spread"],
      help="official: r = ceil(n/k) per iteration (naver-ai/dtm); spread: n split exactly over k iterations")
    a("--split", default="random", choices=["random", "alternate"],
      help="bipartite split of Algorithm 1: random (paper) or ToMe's even/odd (official code)")
    a("--loss", default="smooth_l1", choices=list(dtm.LOSSES))
    a("--beta", type=float, default=2.0, help="smooth-L1 beta")
    a("--loss_on", default="all", choices=["all", "masked"], help="positions in the loss (official: all)")
    # optimization
    a("--batch_size", type=int, default=256, help="per process (GPU); 8 GPUs x 256 = 2048 as the paper")
    a("--accum_iter", type=int, default=1, help="gradient accumulation micro-batches per optimizer step")
    a("--epochs", type=int, default=300)
    a("--warmup_epochs", type=int, default=10)
    a("--lr", type=float, default=1.5e-3,
      help="base lr; the lr used is lr * sqrt(total_batch / 2048), total_batch = batch_size * accum_iter * world size")
    a("--min_lr", type=float, default=1e-5, help="final lr of the cosine schedule")
    a("--weight_decay", type=float, default=0.05)
    a("--betas", type=float, nargs=2, default=(0.9, 0.98), help="AdamW betas")
    a("--clip_grad", type=float, default=3.0, help="max global grad norm (0: no clipping, norm still logged)")
    a("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
      help="auto: bf16 where the GPU supports it, else fp16 with GradScaler; fp32 on the CPU")
    a("--compile", action="store_true", help="torch.compile the student's blocks")
    # bookkeeping
    a("--output_dir", default="output/pretrain")
    a("--resume", default="", help="checkpoint path, or 'auto' = output_dir/checkpoint-last.pth if it exists")
    a("--save_every", type=int, default=0, help="also save checkpoint-last.pth every N optimizer steps (0: off)")
    a("--keep_every", type=int, default=20,
      help="keep checkpoint-{epoch}.pth every N epochs and after the last; checkpoint-last.pth is written every epoch")
    a("--log_every", type=int, default=50, help="optimizer steps per log line")
    a("--seed", type=int, default=0)
    a("--max_steps", type=int, default=0, help="stop (and save) after this many optimizer steps; 0: run all epochs")
    mto.add_mto_args(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.demo = args.data is None
    if args.demo:
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
        args.demo = True
    check_args(args)
    return args


def check_args(args):
    """Fail early, naming the flag and the fix."""
    if args.data is not None and not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data!r} is not a directory; pass an ImageFolder root "
                                f"(root/class_x/img.jpg), or leave --data out to run the demo")
    if args.teacher is None:
        raise ValueError("--teacher is required with --data: clip:/path/ViT-B-16.pt (the paper), ckpt:PATH or pixels")
    kind, _, path = args.teacher.partition(":")
    if not ((kind in ("clip", "ckpt") and path) or args.teacher == "pixels"):
        raise ValueError(f"bad --teacher {args.teacher!r}; use clip:PATH, ckpt:PATH or pixels")
    if kind in ("clip", "ckpt") and not os.path.isfile(path):
        raise FileNotFoundError(f"--teacher {args.teacher!r}: no file at {path!r}")
    if args.img_size % PATCH_SIZE:
        raise ValueError(f"--img_size {args.img_size} is not divisible by the patch size {PATCH_SIZE}; "
                         f"use a multiple of {PATCH_SIZE} (e.g. 224)")
    num_patches = (args.img_size // PATCH_SIZE) ** 2
    if not 0 <= args.num_masked <= num_patches:
        raise ValueError(f"--num_masked {args.num_masked} must be in 0..{num_patches} (patches at --img_size "
                         f"{args.img_size})")
    if args.max_merged is not None and not 0 <= args.max_merged <= num_patches:
        raise ValueError(f"--max_merged {args.max_merged} must be in 0..{num_patches}")
    for flag in ("batch_size", "accum_iter", "epochs", "levels", "max_iters", "log_every", "keep_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.warmup_epochs < 0 or args.save_every < 0 or args.max_steps < 0:
        raise ValueError("--warmup_epochs, --save_every and --max_steps must be >= 0")
    mto.mto_config_from_args(args)  # checks the --mto_* values


def build_loader(args, d: Dist):
    """(DataLoader of (images (B, 3, H, W), mask (B, N) bool), EpochSampler)."""
    grid = args.img_size // PATCH_SIZE
    if args.demo:
        base = SyntheticShapes(DEMO_IMAGES, img_size=args.img_size * 8 // 7, seed=0)
    else:
        base = ImageFolder(args.data)
    samples = MaskedImageDataset(base, PretrainTransform(args.img_size, args.min_crop_scale),
                                 BlockMaskGenerator((grid, grid), args.num_masked, args.min_block))
    sampler = EpochSampler(torch.utils.data.DistributedSampler(
        samples, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=args.seed, drop_last=True))
    loader = torch.utils.data.DataLoader(
        SeededSamples(samples, args.seed), batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
        pin_memory=d.device.type == "cuda", drop_last=True)
    return loader, sampler


def build_model(args, d: Dist):
    """(DTMPretrainModel on the device, frozen teacher on the device)."""
    student = dtm.build_vit(args.model, img_size=args.img_size, patch_size=PATCH_SIZE, drop_path_rate=args.drop_path,
                            layer_scale_init=args.layer_scale, rel_pos_bias=args.rel_pos_bias)
    teacher = dtm.build_teacher(args.teacher, args.img_size, PATCH_SIZE, args.teacher_norm).to(d.device)
    mto_cfg = mto.mto_config_from_args(args)  # None without --mto: the plain DTM forward
    model = dtm.DTMPretrainModel(student, teacher.out_dim, args.loss, args.beta, args.loss_on,
                                 features_fn=mto.MTO(mto_cfg) if mto_cfg else None).to(d.device)
    if args.compile:  # per block: the morphing in between changes shapes every step; state-dict keys stay the same
        for block in model.student.blocks:
            block.compile()
    return model, teacher


def resume_path(args):
    if args.resume != "auto":
        return args.resume or None
    path = os.path.join(args.output_dir, "checkpoint-last.pth")
    return path if os.path.isfile(path) else None


def load_pretrain_checkpoint(path, model, optimizer, scaler, steps_per_epoch) -> int:
    """Restore model/optimizer/scaler/RNG from a checkpoint of this script; returns the optimizer steps done."""
    checkpoint = load_checkpoint(path)
    if checkpoint.get("kind") != "dtm_pretrain":
        raise ValueError(f"{path!r} is not a checkpoint of train_pretrain.py (no kind='dtm_pretrain'); to start "
                         f"from other weights use them as a teacher (--teacher ckpt:PATH) instead of --resume")
    try:
        unwrap(model).load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise ValueError(f"{path!r} does not fit this model (saved with --model {checkpoint['args'].get('model')}, "
                         f"--teacher {checkpoint['args'].get('teacher')}): {e}") from None
    if checkpoint["steps_per_epoch"] != steps_per_epoch:
        raise ValueError(f"{path!r} was saved with {checkpoint['steps_per_epoch']} steps per epoch, this run has "
                         f"{steps_per_epoch}: resume with the same data, --batch_size, --accum_iter and world size")
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint.get("scaler") is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    return checkpoint["step"]


class StepTimer:
    """Seconds spent in the named parts of a step. On CUDA it synchronizes only when `exact` (log steps), so
    only the logged steps' split is exact; the others are not timed at all."""

    def __init__(self, device):
        self.cuda, self.exact, self.parts, self._t = device.type == "cuda", False, {}, 0.0

    def start(self, exact: bool):
        self.exact, self.parts = exact, {}
        self._tick()

    def _tick(self):
        if self.exact and self.cuda:
            torch.cuda.synchronize()
        now, elapsed = time.perf_counter(), time.perf_counter() - self._t
        self._t = now
        return elapsed

    def lap(self, name: str):
        if self.exact:
            self.parts[name] = self.parts.get(name, 0.0) + self._tick()


def train_micro_step(model, teacher, images, mask, args, micro_step, d: Dist, amp_dtype, scaler, timer, sync):
    """Teacher targets, L morphing levels, student forward + backward of one micro-batch -> stats."""
    torch.manual_seed(seed_of("step", args.seed, micro_step, d.rank))  # drop path, the random split of Algorithm 1
    schedule_rng = random.Random(args.seed * 1_000_003 + micro_step)  # the same on every rank
    autocast = torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    timer.lap("data_s")
    with torch.no_grad(), autocast:
        targets = teacher(images)  # (B, N, D)
    timer.lap("teacher_s")
    num_patches = targets.shape[1]
    max_merged = num_patches if args.max_merged is None else args.max_merged
    schedules = [morph.sample_schedule(num_patches, max_merged, args.max_iters, schedule_rng, args.schedule_rule)
                 for _ in range(args.levels)]
    levels = dtm.morph_levels(targets, schedules, args.split)  # [(groups (B, N), G)] per level
    timer.lap("morph_s")
    with sync:
        with autocast:
            loss, stats = model(images, mask, targets, levels)
        loss = loss / args.accum_iter
        (scaler.scale(loss) if scaler is not None else loss).backward()
    timer.lap("student_s")
    return stats


def main(argv=None) -> dict:
    """Run pre-training; returns {"model": the DTMPretrainModel, "first_loss", "final_loss", "step", "output_dir"}."""
    args = parse_args(argv)
    d = setup_distributed()
    try:
        return train(args, d)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, d: Dist) -> dict:
    say = print if d.is_main else (lambda *a, **k: None)
    if args.demo:
        say(f"DEMO (no --data): {args.model} learns per-patch normalized pixels of built-in SyntheticShapes images at "
            f"{args.img_size} px ({(args.img_size // PATCH_SIZE) ** 2} tokens), {args.epochs} epochs on {d.device}. "
            f"For a real run pass --data and --teacher (see --help).")
    seed_everything(args.seed, 0)  # the same initial weights on every rank
    loader, sampler = build_loader(args, d)
    model, teacher = build_model(args, d)
    amp_dtype, scaler = resolve_amp(args.amp, d.device)
    total_batch = args.batch_size * args.accum_iter * d.world_size
    lr = args.lr * math.sqrt(total_batch / 2048)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=tuple(args.betas))
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"{len(sampler)} images per process are fewer than one optimizer step "
                         f"(--batch_size {args.batch_size} x --accum_iter {args.accum_iter}); use a smaller batch")
    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps

    step = 0
    path = resume_path(args)
    if path is not None:
        step = load_pretrain_checkpoint(path, model, optimizer, scaler, steps_per_epoch)
        say(f"resumed from {path} at step {step} (epoch {step // steps_per_epoch})")
    elif args.resume == "auto":
        say(f"--resume auto: no checkpoint-last.pth in {args.output_dir}, starting from scratch")
    ddp_model = model
    if d.world_size > 1:  # the teacher stays outside: it does not train
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    say(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, teacher {args.teacher} "
        f"(dim {teacher.out_dim}), {len(loader.dataset)} images, total batch {total_batch}, lr {lr:.3g}, "
        f"{steps_per_epoch} steps/epoch, amp {amp_dtype or 'fp32'}")
    os.makedirs(args.output_dir, exist_ok=True)
    logger = JsonLogger(os.path.join(args.output_dir, "log.jsonl"), d.is_main)
    timer = StepTimer(d.device)

    def checkpoint(name, epoch):  # epoch: that of the last step done (0-based); step: where a resume continues
        save_checkpoint(os.path.join(args.output_dir, name), {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch, "step": step,
            "steps_per_epoch": steps_per_epoch, "args": vars(args), "rng": rng_state(), "kind": "dtm_pretrain"})

    sums, count, images_seen, logged = None, 0, 0, []
    last_log_time = time.perf_counter()
    ddp_model.train()
    for epoch in range(step // steps_per_epoch, args.epochs):
        if step >= last_step:
            break
        done = step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
        sampler.set_epoch(epoch, skip=done * args.accum_iter * args.batch_size)
        batches = iter(loader)
        bar = tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {epoch}", disable=not d.is_main, leave=False)
        for _ in range(done, steps_per_epoch):
            if step >= last_step:
                break
            is_log_step = (step + 1) % args.log_every == 0 or step + 1 == last_step
            timer.start(exact=is_log_step)
            step_lr = cosine_schedule(step, total_steps, warmup_steps, lr, args.min_lr)
            set_lr(optimizer, step_lr)
            for micro in range(args.accum_iter):
                images, mask = next(batches)
                images = images.to(d.device, non_blocking=True)
                mask = mask.to(d.device, non_blocking=True)
                last = micro == args.accum_iter - 1
                sync = ddp_model.no_sync() if d.world_size > 1 and not last else contextlib.nullcontext()
                stats = train_micro_step(ddp_model, teacher, images, mask, args, step * args.accum_iter + micro, d,
                                         amp_dtype, scaler, timer, sync)
                loss_names = [k for k in stats if k.startswith("loss")]  # loss, loss_level{i} (+ MTO's parts)
                values = torch.stack([stats[k] for k in loss_names])
                sums = values if sums is None else sums + values
                count += 1
                images_seen += images.shape[0]
            grad_norm = optimizer_step(optimizer, scaler, model.parameters(), args.clip_grad)
            step += 1
            timer.lap("optimizer_s")
            bar.update(1)

            if is_log_step:
                if d.world_size > 1:
                    dist.all_reduce(sums)
                means = (sums / (count * d.world_size)).tolist()
                if not all(map(math.isfinite, means)):
                    raise FloatingPointError(f"loss is {means[0]} at step {step}; lower --lr or use --amp bf16/fp32")
                now = time.perf_counter()
                record = dict(step=step, epoch=epoch, **dict(zip(loss_names, means)),
                              **{k: v for k, v in stats.items() if k.startswith("groups_level")},
                              lr=step_lr,
                              grad_norm=grad_norm.item(),
                              img_per_s=images_seen * d.world_size / (now - last_log_time),
                              **timer.parts)
                if scaler is not None:
                    record["loss_scale"] = scaler.get_scale()
                logger.log(**record)
                logged.append(record)
                bar.set_postfix(loss=f"{means[0]:.4f}", lr=f"{record['lr']:.2e}")
                sums, count, images_seen, last_log_time = None, 0, 0, now
            if args.save_every and step % args.save_every == 0:
                checkpoint("checkpoint-last.pth", epoch)
        bar.close()
        if step == (epoch + 1) * steps_per_epoch:  # the epoch is complete
            checkpoint("checkpoint-last.pth", epoch)
            if (epoch + 1) % args.keep_every == 0 or epoch + 1 == args.epochs:
                checkpoint(f"checkpoint-{epoch}.pth", epoch)
            epoch_losses = [r["loss"] for r in logged if r["epoch"] == epoch]
            if epoch_losses:
                say(f"epoch {epoch}: step {step}, mean logged loss {sum(epoch_losses) / len(epoch_losses):.4f}")
    if step == last_step and step % steps_per_epoch:  # stopped by --max_steps inside an epoch
        checkpoint("checkpoint-last.pth", step // steps_per_epoch)

    result = dict(model=model, step=step, output_dir=args.output_dir,
                  first_loss=logged[0]["loss"] if logged else None, final_loss=logged[-1]["loss"] if logged else None)
    if logged:  # single log lines are noisy: the loss depends on each step's random schedule (fewer groups, lower loss)
        say(f"done: step {step}, final loss {result['final_loss']:.4f} (first logged {result['first_loss']:.4f})")
    say(f"checkpoint: {os.path.join(args.output_dir, 'checkpoint-last.pth')}, log: {logger.path}")
    return result


if __name__ == "__main__":
    main()
