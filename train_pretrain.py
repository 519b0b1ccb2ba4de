"""DTM pre-training: a masked ViT student learns a frozen teacher's morphed tokens (DTM, ICLR 2025, Sec. 3).

    torchrun --nproc_per_node=8 train_pretrain.py --model vit_b --data /path/imagenet/train \\
        --teacher clip:/path/ViT-B-16.pt --output_dir output/dtm_vit_b
    python train_pretrain.py            # the demo: tiny ViT, pixel targets, built-in SyntheticShapes, CPU, minutes

One training step (the official code's engines/engine_for_dtm.py, with the paper's names):
    targets = teacher(images)                                  frozen CLIP ViT-B/16 tokens (B, N, 512), no grad
    R_l = morph.sample_schedule(...) for each of L levels      the dynamic scheduler (Sec. 3.2), seeded by the step
    groups_l = morph.token_morphing_levels(targets, R)         Algorithm 1 on the teacher's tokens
    loss = mean_l  l(morphed student predictions, morphed targets)     dtm.dtm_loss, smooth-L1 beta 2

The loop below is the whole training run; the plumbing it calls by name (distributed setup, AMP, schedules,
checkpoints, resume, log, the seeding that makes resume exact) is engine.py. The morphing schedules of a micro-step
come from random.Random seeded by (seed, micro-step, rank): each process draws its own, as in the official code
(--schedules shared: by (seed, micro-step), the same on every process).
"""
import argparse
import math
import os
import random
import time

import torch
from tqdm import tqdm

import dtm
import engine
import morph
import mto
from data import (BlockMaskGenerator, ImageFolder, MaskedImageDataset, PretrainTransform, SyntheticShapes,
                  refuse_dataset_root)

DEMO_IMAGES = 512
# `python train_pretrain.py` without --data: these replace the defaults (flags given explicitly still win)
DEMO_DEFAULTS = dict(model="vit_tiny", teacher="pixels", img_size=112, batch_size=32, epochs=6, warmup_epochs=1,
                     lr=1.5e-2, drop_path=0.0, num_masked=19, min_block=4, min_crop_scale=0.3, num_workers=1,
                     log_every=4)
# --recipe: "paper" follows the paper where it states a value and the official code (naver-ai/dtm) where it is
# silent; "official" computes what the official code computes where the two differ. README: Recipe provenance.
RECIPES = {"paper": dict(split="random"),  # Algorithm 1: a random split of the tokens into A and B
           "official": dict(split="official")}  # engines/engine_for_dtm.py: ToMe's bipartite_soft_matching(..., True)
PAPER_SCHEDULE = dict(epochs=300, warmup_epochs=10)  # the paper (README: Recipe provenance); not given: a run's own
# 0.1 otherwise: run_pretrain_dtm.py --layer_scale_init_value "0.1 for base, 1e-5 for large"
LAYER_SCALE = {"vit_l": 1e-5}


def teacher_spec(text: str) -> str:
    """--teacher's type: engine.nonempty_text's, and a leading ~ of the PATH after clip: or ckpt: is the home folder
    (the shell expands no ~ there: --teacher ckpt:~/t.pth read a file named '~/t.pth' here)."""
    kind, path = engine.split_teacher(engine.nonempty_text(text))
    return f"{kind}:{os.path.expanduser(path)}" if kind else text


def get_args_parser() -> argparse.ArgumentParser:
    p = engine.trainer_parser(description="DTM pre-training. Without --data: a small demo on built-in procedural "
                              "images. Where a default comes from: README, Recipe provenance.",
                              epilog=engine.demo_help(DEMO_DEFAULTS, ", --output_dir output/pretrain_demo "
                                                      "(output/pretrain_demo_mto with --mto)"))
    a = p.add_argument
    a("--recipe", default="paper", choices=list(RECIPES), help="paper: the paper's values, the official code's where "
      "the paper is silent; official: what the official code computes (the split of Algorithm 1)")
    # model and teacher
    a("--model", default="vit_b", choices=list(dtm.VIT_CONFIGS), help="student ViT (patch 16)")
    a("--teacher", default=None, type=teacher_spec,
      help="clip:PATH (OpenAI ViT-B-16.pt, the paper) | ckpt:PATH (a ViT checkpoint of this repo, or an official DTM / "
           "BEiT / BEiT v2 ViT's weights) | pixels; required with --data")
    a("--teacher_norm", default="imagenet", choices=["imagenet", "clip"],
      help="input normalization of a CLIP teacher; imagenet: the student's crop, as the official code feeds it "
           "(engines/engine_for_dtm.py), ImageNet-normalized by the --imagenet_default_mean_and_std of the command in "
           "its docs/Training.md; clip: that crop re-normalized to CLIP's own mean and std")
    a("--no_clip_proj", action="store_true", help="CLIP targets ln_post(tokens) of the CLIP width (768) without the "
      "projection to 512 (the official --no_clip_proj); the student's head follows the teacher's dimension")
    a("--normalize_target", action="store_true", help="standardize each morphed target over its channels "
      "(the official --normalize_target: (t - mean) / sqrt(var + 1e-6))")
    a("--img_size", type=int, default=224, help="crop size (a multiple of 16)")
    a("--drop_path", type=float, default=0.1, help="stochastic depth rate of the student (run_pretrain_dtm.py default)")
    a("--layer_scale", type=float, default=None,
      help="layer scale init (0 disables); default 0.1, 1e-5 for vit_l (run_pretrain_dtm.py's help)")
    a("--rel_pos_bias", default="both", choices=list(dtm.REL_POS_BIAS),
      help="relative position bias: both = a shared table + one per block (the official code), shared, per_block, "
           "none (no position information at all: this ViT has no absolute position embedding, as the official one)")
    # data and masking
    a("--data", default=None, help="ImageFolder root (class subfolders of images); absent: the built-in demo")
    a("--min_crop_scale", type=float, default=0.08, help="RandomResizedCrop scale lower bound")
    a("--num_masked", type=int, default=75, help="masked patches per image (BEiT block-wise masking); the default is "
      "the official command's 75 of the 196 patches at 224 px, not scaled with --img_size")
    a("--min_block", type=int, default=16, help="lower bound of a masking block's drawn area, in patches (the official "
      "--min_mask_patches_per_block; the last blocks of a mask can be smaller)")
    a("--num_workers", type=int, default=engine.workers_default(10),
      help="DataLoader workers per process: 10, or the CPUs this process may use where fewer")
    a("--max_unreadable", type=float, default=0.001,
      help="stop when more than this fraction of the training images cannot be read (fewer are "
      "skipped; 16 in a row stop the run too)")
    # DTM objective
    a("--levels", type=int, default=2, help="L: morphing schedules (levels) per step, losses averaged")
    a("--max_merged", type=int, default=None, help="merged tokens n ~ U{0..max_merged}; default: all N patches")
    a("--max_iters", type=int, default=14, help="morphing iterations k ~ U{1..max_iters}")
    a("--schedule_rule", default="official", choices=["official", "spread"],
      help="official: r = ceil(n/k) per iteration, floor(n/k) where ceil(n/k) x k > --max_merged (default N) "
           "(engines/engine_for_dtm.py:111-114); spread: n split exactly over k")
    a("--fixed_schedule", type=int, nargs=2, default=None, metavar=("N", "K"),
      help="instead of the dynamic scheduler: N tokens over K rounds at every step and level, by --schedule_rule "
           "(official: ceil(N/K) per round, so up to ceil(N/K) x K tokens merge, floor(N/K) where that exceeds the "
           "patches; spread: exactly N where no round would merge more than half of the tokens left, a round's cap, "
           "else fewer, which a note gives; with --split alternate or official every level gets the same groups); an "
           "ablation: 0 1 is token-wise distillation")
    a("--schedules", default="per_rank", choices=["per_rank", "shared"],
      help="per_rank: every process draws its own schedules (the official code seeds Python's random with seed + "
           "rank); shared: one draw per micro-step for all processes (2 processes x --batch_size B then equal 1 x 2B "
           "at the same --accum_iter, given --split alternate or official and --drop_path 0: the random split's and "
           "drop path's draws are per process)")
    a("--split", default=None, choices=list(morph.SPLITS),
      help="bipartite split of Algorithm 1: random (the paper), official (ToMe with patch 0 protected, the official "
           "code), alternate (ToMe's even/odd); default: the --recipe's")
    a("--loss", default="smooth_l1", choices=list(dtm.LOSSES), help="loss between morphed tokens")
    a("--beta", type=float, default=2.0, help="smooth-L1 beta")
    a("--loss_on", default="all", choices=["all", "masked"], help="positions in the loss (official: all)")
    # optimization
    a("--batch_size", type=int, default=128, help="per process (GPU) per micro-step; 8 GPUs x 128 = 1024, the paper's "
      "batch")
    a("--accum_iter", type=int, default=1, help="gradient accumulation micro-batches per optimizer step")
    a("--epochs", type=int, default=None, help="training epochs; default: a continued run's own, else 300 (the "
      "paper; the demo: 6)")
    a("--warmup_epochs", type=float, default=None, help="linear lr warmup epochs (may be fractional); default: a "
      "continued run's own, else 10 (the demo: 1)")
    a("--lr", type=float, default=1.5e-3,
      help="base lr; the lr used is lr * sqrt(total_batch / 2048), total_batch = batch_size * accum_iter * world "
           "size (run_pretrain_dtm.py)")
    a("--min_lr", type=float, default=1e-5, help="final lr of the cosine schedule")
    a("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    a("--betas", type=float, nargs=2, default=(0.9, 0.98), help="AdamW betas")
    a("--clip_grad", type=float, default=3.0, help="max global grad norm (0: no clipping, norm still logged)")
    a("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
      help="auto: bf16 on GPUs with native bf16 (compute capability >= 8.0), else fp16 with a "
      "GradScaler (V100); fp32 on the CPU")
    a("--teacher_amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
      help="the teacher's autocast; auto: fp16 on a GPU whenever --amp is not fp32 (as the official code: more "
      "mantissa than bf16, and its forward has no gradient to scale), else --amp's")
    a("--compile", action="store_true", help="torch.compile the student's blocks (and with --mto, MTO's losses)")
    a("--grad_checkpoint", action="store_true", help="recompute each block's activations in the backward instead of "
      "storing them (less memory, about a third more compute; ViT-L at batch 128 on 32 GB GPUs)")
    # run
    g = engine.add_run_args(p, output_dir="output/pretrain")
    g.add_argument("--save_every", type=int, default=0,
                   help="also save checkpoint-last.pth every N optimizer steps (0: at the end of each epoch only)")
    g.add_argument("--keep_every", type=int, default=20,
                   help="keep checkpoint-{epoch}.pth every N epochs and after the last, epochs counted from 0 "
                        "(checkpoint-19.pth after 20 epochs, checkpoint-299.pth after 300; the official code names "
                        "them from 1, utils/model_saver.py:81); checkpoint-last.pth is written every epoch")
    g.add_argument("--max_steps", type=int, default=0,
                   help="stop (and save) once the run has made this many optimizer steps, counted from its start (a "
                        "relaunch continues to it); 0: run all epochs")
    mto.add_mto_args(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = get_args_parser()
    first = parser.parse_args(argv)
    defaults = dict(RECIPES[first.recipe])
    if first.data is None:  # the MTO demo gets its own folder, so the plain demo's run is never resumed with --mto
        defaults.update({k: v for k, v in DEMO_DEFAULTS.items() if k not in PAPER_SCHEDULE},  # set_schedule's
                        output_dir="output/pretrain_demo_mto" if first.mto else "output/pretrain_demo")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.demo = args.data is None
    if args.layer_scale is None:
        args.layer_scale = LAYER_SCALE.get(args.model, 0.1)
    check_args(args)
    if args.fixed_schedule:
        engine.refuse_ignored(args, parser, ["max_merged", "max_iters", "schedules"],
                              "with --fixed_schedule (every step merges by the same schedule, drawn from nothing)")
    no_merge = args.max_merged == 0 or (args.fixed_schedule and args.fixed_schedule[0] == 0)
    if no_merge:
        engine.refuse_ignored(args, parser, ["max_iters", "schedule_rule", "schedules", "split", "recipe"],
                              "when no token is merged (--max_merged 0 or --fixed_schedule 0 K: token-wise "
                              "distillation, every level the same)")
    elif same_rounds := rules_agree(args):  # --schedule_rule spread then ran as official without a word
        engine.refuse_ignored(args, parser, ["schedule_rule"], same_rounds)
    if (no_merge or (args.fixed_schedule and args.split != "random")) and args.levels not in (1, parser.get_default(
            "levels")):  # every level the same: 1 computes it once, the default is taken as the run's recipe
        why = ("when no token is merged" if no_merge else f"with --fixed_schedule and --split {args.split} (one "
               f"schedule, a split drawn from nothing)")
        raise ValueError(f"--levels {args.levels} would do nothing {why}: every level merges the same groups; "
                         f"--levels 1 computes that level once, with the same result")
    if no_merge:
        refuse_idle_no_merge(args)
    if args.num_masked == 0:
        engine.refuse_ignored(args, parser, ["min_block"], "with --num_masked 0 (no block is drawn)")
    engine.refuse_idle_recipe(args, parser, argv, RECIPES)
    if args.loss != "smooth_l1":
        engine.refuse_ignored(args, parser, ["beta"], f"with --loss {args.loss} (it is smooth-L1's beta)")
    if not args.mto:
        engine.refuse_ignored(args, parser, mto.MTO_FLAGS, "without --mto")
    engine.refuse_ignored_in_demo(args, parser)
    return args


def refuse_idle_no_merge(args):
    """Where no token is merged: the K of --fixed_schedule 0 K (K rounds of no merge, the same as one) and
    --normalize_target with --teacher pixels (each target is its patch standardized already) would do nothing."""
    if args.fixed_schedule and args.fixed_schedule[1] != 1:
        raise ValueError(f"--fixed_schedule 0 {args.fixed_schedule[1]}: its {args.fixed_schedule[1]} rounds would do "
                         f"nothing, each merging no token (token-wise distillation): pass --fixed_schedule 0 1")
    if args.normalize_target and args.teacher == "pixels":
        raise ValueError("--normalize_target would do nothing with --teacher pixels when no token is merged (each "
                         "target is its patch's pixels standardized already; it acts on merged groups' means): "
                         "leave it out")


def patch_count(args) -> int:
    """The patches of an image at --img_size (dtm.PATCH_SIZE), the tokens the masks and the morphing work on."""
    return (args.img_size // dtm.PATCH_SIZE) ** 2


def rules_agree(args) -> str:
    """Why --schedule_rule official and spread give the same rounds in this run, or "" where they may differ: one round
    merges n tokens by either rule, and so may a fixed schedule's K rounds (N / K each where K divides N), or rounds
    that --split official's clamp makes the same (the rounds compared and named are those the run merges)."""
    if args.fixed_schedule:
        num_patches, (n, k) = patch_count(args), args.fixed_schedule
        official, spread = (morph.clamp_schedule(num_patches, morph.make_schedule(num_patches, n, k, rule), args.split)
                            for rule in ("official", "spread"))
        return f"with --fixed_schedule {n} {k} (both rules merge the rounds {official})" if official == spread else ""
    return "with --max_iters 1 (a single round merges the drawn n tokens by either rule)" if args.max_iters == 1 else ""


def check_args(args):
    """Fail early, naming the flag and the fix."""
    if args.data is not None and not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data!r} is not a directory; pass an ImageFolder root "
                                f"(root/class_x/img.jpg), or leave --data out to run the demo")
    if args.teacher is None:
        raise ValueError("--teacher is required with --data, a relaunch of a run too (pass its --teacher again): "
                         "clip:/path/ViT-B-16.pt (the paper), ckpt:PATH or pixels")
    kind, _, path = args.teacher.partition(":")
    if not ((kind in ("clip", "ckpt") and path) or args.teacher == "pixels"):
        raise ValueError(f"bad --teacher {args.teacher!r}; use clip:PATH, ckpt:PATH or pixels")
    if kind in ("clip", "ckpt"):
        dtm.check_checkpoint_file(path, f"--teacher {kind}:")
    if kind != "clip" and (args.no_clip_proj or args.teacher_norm != "imagenet"):
        raise ValueError(f"--no_clip_proj and --teacher_norm apply to a CLIP teacher (--teacher clip:PATH) only; "
                         f"with --teacher {args.teacher} they would do nothing: leave them out")
    if args.teacher == "pixels" and args.teacher_amp != "auto":
        raise ValueError(f"--teacher_amp {args.teacher_amp} would do nothing with --teacher pixels (its targets are "
                         f"computed in float32 under any autocast): leave it out")
    if args.amp == "fp32" and args.teacher_amp == "fp32":
        raise ValueError("--teacher_amp fp32 would do nothing with --amp fp32 (--teacher_amp auto then runs the "
                         "teacher in float32 too, on every device): leave it out")
    engine.check_image_size("--img_size", args.img_size, 224)
    num_patches = patch_count(args)
    if not 0 <= args.num_masked <= num_patches:
        raise ValueError(f"--num_masked {args.num_masked} must be in 0..{num_patches} (patches at --img_size "
                         f"{args.img_size})")
    if args.max_merged is not None and not 0 <= args.max_merged <= num_patches:
        raise ValueError(f"--max_merged {args.max_merged} must be in 0..{num_patches} (patches at --img_size "
                         f"{args.img_size})")
    most = max(num_patches - 1 - (args.split == "official"), 0)  # every token in one group (official: patch 0 apart)
    if args.fixed_schedule and not (0 <= args.fixed_schedule[0] <= most and args.fixed_schedule[1] >= 1):
        apart = ", beside patch 0, which --split official never merges" if args.split == "official" else ""
        raise ValueError(f"--fixed_schedule N K needs 0 <= N <= {most} and K >= 1, got {args.fixed_schedule} (the "
                         f"{num_patches} patches at --img_size {args.img_size} merge into one group at most{apart})")
    for flag in ("batch_size", "accum_iter", "epochs", "levels", "max_iters", "log_every", "keep_every"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:  # epochs None: set_schedule's
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.min_block < 1 or not 0 < args.min_crop_scale <= 1:
        raise ValueError(f"--min_block must be >= 1 (patches) and --min_crop_scale in (0, 1] (of the image's area); "
                         f"got {args.min_block} and {args.min_crop_scale:g}")
    for flag in ("warmup_epochs", "save_every", "max_steps", "beta", "layer_scale"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag):g}")
    # the paper's share, 75 of 196 patches, at this --img_size (the demo's 19 of 49 at 112 px): a count that fits
    masked = f"--num_masked {max(1, round(num_patches * 75 / 196))}"
    if num_patches == 1 and (args.mto or args.loss_on == "masked"):  # no count masks some patches and not all
        flag = "--mto" if args.mto else "--loss_on masked"
        raise ValueError(f"{flag} needs a masked and a visible patch, and --img_size {args.img_size} has one patch: "
                         f"use --img_size 32 or more, or leave {flag} out")
    if args.mto and args.num_masked == 0:
        raise ValueError(f"--mto with --num_masked 0 would do nothing (no masked token to recalibrate, both of its "
                         f"losses 0): mask patches ({masked}) or leave --mto out")
    if args.mto and args.num_masked == num_patches:
        raise ValueError(f"--mto with every patch masked (--num_masked {num_patches}) would train nothing by its "
                         f"losses (both 0 without a visible patch): mask fewer ({masked}) or leave --mto out")
    if args.mto and args.num_masked == num_patches - 1 and args.mto_lambda_ent > 0 and args.mto_ent_layers != 0:
        raise ValueError(f"--mto's entropy loss over one visible patch (--num_masked {args.num_masked} of "
                         f"{num_patches}) is 0 at every step: mask fewer ({masked}) or pass --mto_lambda_ent 0")
    if args.loss_on == "masked" and args.num_masked == 0:
        raise ValueError(f"--loss_on masked with --num_masked 0 leaves no position in the loss; mask patches "
                         f"({masked}) or use --loss_on all")
    if args.loss_on == "masked" and args.num_masked == num_patches:
        raise ValueError(f"--loss_on masked with every patch masked (--num_masked {num_patches}) would do nothing: "
                         f"every position is in the loss, as with --loss_on all; leave it out")
    engine.check_shared_args(args)
    mto.mto_config_from_args(args, dtm.VIT_CONFIGS[args.model]["depth"])  # checks the --mto_* values


def build_dataset(args):
    """(image (3, H, W), mask (N,) bool) pairs: the ImageFolder of --data, or the demo's SyntheticShapes."""
    grid = args.img_size // dtm.PATCH_SIZE
    if args.demo:
        base = SyntheticShapes(DEMO_IMAGES, img_size=args.img_size * 8 // 7, seed=0)
    else:
        base = ImageFolder(args.data)
        refuse_dataset_root(base, "--data", "train")
    return MaskedImageDataset(base, PretrainTransform(args.img_size, args.min_crop_scale),
                              BlockMaskGenerator((grid, grid), args.num_masked, args.min_block))


def build_model(args, d: engine.Dist):
    """(DTMPretrainModel on the device, frozen teacher on the device)."""
    student = dtm.build_vit(args.model, img_size=args.img_size, drop_path_rate=args.drop_path,
                            layer_scale_init=args.layer_scale, rel_pos_bias=args.rel_pos_bias)
    teacher = engine.build_on_all_ranks(d, dtm.build_teacher, args.teacher, args.img_size, dtm.PATCH_SIZE,
                                        args.teacher_norm, clip_proj=not args.no_clip_proj,
                                        fix=engine.SAME_CHECKPOINT).to(d.device)
    mto_cfg = mto.mto_config_from_args(args)  # None without --mto: the plain DTM forward
    if mto_cfg is not None:
        mto_cfg.compile = args.compile  # --compile: MTO's losses too
    model = dtm.DTMPretrainModel(student, teacher.out_dim, args.loss, args.beta, args.loss_on, args.normalize_target,
                                 features_fn=mto.MTO(mto_cfg) if mto_cfg else None).to(d.device)
    model.student.grad_checkpointing = args.grad_checkpoint
    if args.compile:
        engine.compile_blocks(model.student)
    return model, teacher


def warn_fixed_schedule(args, d):
    """--fixed_schedule N K can merge other than N tokens: the official rule's whole r per round, ToMe's clamp."""
    num_patches, (n, k) = patch_count(args), args.fixed_schedule
    unclamped = sum(morph.make_schedule(10 ** 9, n, k, args.schedule_rule, max_merged=num_patches))
    schedule = morph.clamp_schedule(num_patches, morph.make_schedule(num_patches, n, k, args.schedule_rule), args.split)
    why = [f"--schedule_rule official merges the same whole number of tokens in each round ({unclamped // k})"
           ] if unclamped != n else []
    why += ["a round merges at most half of the tokens left (more rounds, K, reach more)"
            ] if sum(schedule) < min(unclamped, n) else []  # above N: the official rule's rounds alone
    if sum(schedule) != n:
        d.print(f"note: --fixed_schedule {n} {k} merges {sum(schedule)} of the {num_patches} tokens per level, not "
                f"{n} (rounds {schedule}): {'; '.join(why)}")


def train_micro_step(model, teacher, images, mask, args, micro_step, d: engine.Dist, amp_dtype, scaler, timer,
                     mask_sizes=None):
    """Teacher targets, L morphing levels, student forward + backward of one micro-batch -> (stats, [G per level]).
    mask_sizes: --mto's mto.mask_sizes of the mask's CPU copy (None: read from the mask, a host sync on a GPU)."""
    engine.seed_step(args.seed, micro_step, d.rank)  # drop path, the random split of Algorithm 1
    rank = (d.rank,) if args.schedules == "per_rank" else ()  # --schedules shared: the same draws on every rank
    schedule_rng = random.Random(engine.seed_of("schedule", args.seed, micro_step, *rank))
    timer.lap("data_s")
    with torch.no_grad(), engine.autocast(d, engine.resolve_teacher_amp(args.teacher_amp, amp_dtype, d.device)):
        targets = teacher(images)  # (B, N, D)
    timer.lap("teacher_s")
    num_patches = targets.shape[1]
    if args.fixed_schedule:
        schedules = [morph.make_schedule(num_patches, *args.fixed_schedule, args.schedule_rule)] * args.levels
    else:
        max_merged = num_patches if args.max_merged is None else args.max_merged
        schedules = [morph.sample_schedule(num_patches, max_merged, args.max_iters, schedule_rng, args.schedule_rule)
                     for _ in range(args.levels)]
    groups = morph.token_morphing_levels(targets, schedules, args.split)  # [(B, N)] per level
    num_groups = [morph.num_groups_after(num_patches, s, args.split) for s in schedules]
    timer.lap("morph_s")
    with engine.autocast(d, amp_dtype):
        loss, stats = model(images, mask, targets, groups, num_groups, mask_sizes=mask_sizes)
    engine.backward(loss / args.accum_iter, scaler)
    timer.lap("student_s")
    return stats, num_groups


class LoggedLosses:
    """add(record) with each log line: the first and the last logged loss (main's result) and the current epoch's
    losses (the console's epoch summary), not every line: a 1600-epoch run at --log_every 1 logs 2M (3.4 GB as dicts,
    on every rank)."""

    def __init__(self):
        self.first = self.final = self.epoch = None
        self.losses = []  # self.epoch's

    def add(self, record: dict):
        if "loss" in record and "epoch" in record:  # not a skipped image's line
            if record["epoch"] != self.epoch:
                self.epoch, self.losses = record["epoch"], []
            self.losses.append(record["loss"])
            self.first = record["loss"] if self.first is None else self.first
            self.final = record["loss"]

    def of_epoch(self, epoch: int) -> list:
        return self.losses if epoch == self.epoch else []


def main(argv=None) -> dict:
    """Run pre-training; returns {"model": the DTMPretrainModel, "first_loss", "final_loss", "step", "output_dir"}."""
    args = parse_args(argv)
    with engine.backend_flags_kept():  # setup's TF32 and autotuner: for the run only
        d = engine.setup()
        try:
            return train(args, d)
        finally:
            engine.teardown()


def set_schedule(args, saved_args: dict = None):
    """--epochs / --warmup_epochs not given: a continued run's own (saved_args), else the paper's, or the demo's."""
    engine.set_run_length(args, {k: DEMO_DEFAULTS[k] for k in PAPER_SCHEDULE} if args.demo else PAPER_SCHEDULE,
                          saved_args)


def teacher_precision_note(saved: dict, args, amp_dtype, teacher_dtype, path: str) -> str:
    """A run saved before --teacher_amp (0bf98c3) ran its teacher under the student's autocast: continued where the
    teacher's precision differs (auto: fp16 on a GPU under bf16), a note naming the flag that keeps the run's (the
    settings resume compares are only those the checkpoint records)."""
    if "teacher_amp" in saved or args.teacher == "pixels" or saved.get("amp") != args.amp or teacher_dtype == amp_dtype:
        return ""  # another --amp is said as a changed setting
    was, now = engine.amp_name(amp_dtype, None), engine.amp_name(teacher_dtype, None)
    return (f"note: {path!r} was saved by a version without --teacher_amp, which ran the teacher in the student's "
            f"precision ({was}); this run runs it in {now} (--teacher_amp {args.teacher_amp}): to keep the run's, "
            f"pass --teacher_amp {was}")


def train(args, d: engine.Dist) -> dict:
    teacher_file = args.teacher[len("ckpt:"):] if args.teacher.startswith("ckpt:") else None
    step, resume_path, own_run = 0, *engine.prepare_run(args, d, reads={"--teacher ckpt:": teacher_file})
    checkpoint = {}
    if resume_path is not None:
        checkpoint = engine.load_checkpoint(resume_path, "dtm_pretrain", hint="; pre-training continues its own runs "
                                            "only (to distil from a ViT checkpoint pass it as --teacher ckpt:PATH "
                                            "instead of --resume)", auto=resume_path != args.resume)
        engine.refuse_demo_resume(args, checkpoint["args"], resume_path, ["data"], "--data")
    set_schedule(args, checkpoint.get("args"))
    if args.demo:
        targets = "per-patch normalized pixels" if args.teacher == "pixels" else f"the features of {args.teacher}"
        d.print(f"DEMO (no --data): {args.model} learns {targets} of built-in SyntheticShapes "
                f"images at {args.img_size} px ({patch_count(args)} tokens), {args.epochs} "
                f"epoch{'s' * (args.epochs != 1)} on {d.device}. For a real run pass --data and --teacher (see "
                f"--help).")
    engine.seed_all(args.seed)  # the same initial weights on every rank
    dataset = engine.build_on_all_ranks(d, build_dataset, args)  # a node that cannot read --data stops them all
    loader, sampler, steps_per_epoch = engine.train_loader(dataset, args, d)
    model, teacher = build_model(args, d)
    amp_dtype, scaler = engine.resolve_amp(args.amp, d.device)
    teacher_dtype = (None if args.teacher == "pixels" else  # targets of pixels: no autocast to speak of
                     engine.resolve_teacher_amp(args.teacher_amp, amp_dtype, d.device))
    total_batch = args.batch_size * args.accum_iter * d.world_size
    lr = args.lr * math.sqrt(total_batch / 2048)
    lr_origin = f"--lr {args.lr:g} x sqrt({total_batch} / 2048)"
    optimizer = torch.optim.AdamW(engine.param_groups(model, args.weight_decay), lr=lr, betas=tuple(args.betas))
    total_steps, warmup_steps = args.epochs * steps_per_epoch, engine.warmup_steps(args.warmup_epochs, steps_per_epoch)
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    engine.warn_long_warmup(warmup_steps, total_steps, "--warmup_epochs", d)
    engine.warn_min_lr(args.min_lr, lr, f" ({lr_origin})", d)
    if args.fixed_schedule:
        warn_fixed_schedule(args, d)

    if resume_path is not None:
        step = engine.resume(checkpoint, resume_path, model, optimizer, scaler, args, steps_per_epoch, d,
                             train_images=len(dataset))
        if note := teacher_precision_note(checkpoint["args"], args, amp_dtype, teacher_dtype, resume_path):
            d.print(note)
    finished = step >= last_step
    # the logged losses main reports, a resumed run's kept lines included
    logged = LoggedLosses()
    log = engine.open_log(args.output_dir, checkpoint if own_run else None, d.is_main, finished, on_kept=logged.add)
    ddp_model = engine.ddp(model, d)  # the teacher stays outside: it does not train
    d.print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters (layer scale "
            f"{args.layer_scale:g}), teacher {args.teacher} "
            f"(dim {teacher.out_dim}), {len(dataset)} images, total batch {total_batch}, lr {lr:.3g} ({lr_origin}), "
            f"{steps_per_epoch} steps/epoch, amp {engine.amp_name(amp_dtype, scaler)} (teacher "
            f"{engine.amp_name(teacher_dtype, None)})")
    if finished:
        limit = "--max_steps" if last_step < total_steps else "--epochs"
        engine.say_finished(args, resume_path, step, last_step, limit, d)

    def save(name):  # with the loss sums since the last log line, so a resumed run's next line averages them too
        # (the sums of the steps' means over micro-batches and processes, the count in steps: so another split of the
        # samples per step, processes x batch x --accum_iter, after a resume weighs every step alike)
        window = None if sums is None else dict(names=loss_names, sums=engine.all_mean(sums, d).cpu(), count=count)
        rows = None if sums is None else engine.rank_rows(sums, d).cpu()  # each rank's own, for its resume
        named_files = engine.unreadable_for_checkpoint(unreadable, d, step, log)
        engine.save_checkpoint(os.path.join(args.output_dir, name), engine.checkpoint_state(
            "dtm_pretrain", model, optimizer, scaler, args, step, steps_per_epoch, train_images=len(dataset),
            log_window=window, log_window_per_step=True, log_window_of_ranks=rows, unreadable_files=named_files,
            log_lines=log.lines))

    timer = engine.StepTimer(d.device)
    unreadable = engine.unreadable_images(args.max_unreadable, len(dataset), checkpoint, args.data)
    batches = engine.micro_batches(loader, sampler, steps_per_epoch, args.accum_iter, step)
    # each log line: the means over the steps since the last one
    sums, count, images_seen = None, 0, 0
    saved_window = engine.log_window_per_step(checkpoint)
    last_log_time = time.perf_counter()
    bar = engine.progress_bar(tqdm, total=last_step, initial=step, disable=not d.is_main or finished)
    ddp_model.train()
    while step < last_step:
        epoch = step // steps_per_epoch
        is_log_step = (step + 1) % args.log_every == 0 or step + 1 == last_step
        timer.start(exact=is_log_step)
        step_lr = engine.cosine_schedule(step, total_steps, warmup_steps, lr, args.min_lr)
        engine.set_lr(optimizer, step_lr)
        for micro in range(args.accum_iter):
            images, mask, skipped = next(batches)
            unreadable.add(skipped)
            mask_sizes = mto.mask_sizes(mask) if args.mto else None  # off the CPU copy: no host sync
            images = images.to(d.device, non_blocking=True)
            mask = mask.to(d.device, non_blocking=True)
            with engine.grad_sync(ddp_model, last_micro=micro == args.accum_iter - 1):
                stats, num_groups = train_micro_step(ddp_model, teacher, images, mask, args,
                                                     step * args.accum_iter + micro, d, amp_dtype, scaler, timer,
                                                     mask_sizes)
            loss_names = [k for k in stats if k.startswith("loss")]  # loss, loss_level{i} (+ MTO's parts)
            values = torch.stack([stats[k] for k in loss_names])
            if saved_window is not None:  # resumed between two log lines: the sums of the steps before the stop
                if saved_window["names"] == loss_names:
                    sums = engine.own_row(checkpoint.get("log_window_of_ranks"), saved_window["sums"], d)
                    sums, count = sums.to(d.device), saved_window["count"]
                saved_window = None
            sums = values / args.accum_iter if sums is None else sums + values / args.accum_iter
            images_seen += images.shape[0]
        count += 1
        grad_norm = engine.optimizer_step(optimizer, scaler, model.parameters(), args.clip_grad)
        step += 1
        timer.lap("optimizer_s")
        bar.set_description(f"epoch {epoch}", refresh=False)  # the epoch of the step done, as the log and files say
        bar.update(1)

        if is_log_step:
            means = engine.all_mean(sums / count, d)
            engine.check_finite(means, loss_names, step, args.output_dir,  # fp16 teacher targets can overflow too
                                remedy=engine.non_finite_remedy(amp_dtype, teacher_dtype))
            engine.report_unreadable(unreadable, d, step, log)
            now = time.perf_counter()
            record = dict(step=step, epoch=epoch, epochs_done=engine.epochs_done(step, steps_per_epoch),
                          **dict(zip(loss_names, means.tolist())),
                          **{f"groups_level{i}": g for i, g in enumerate(num_groups)},
                          lr=step_lr, grad_norm=grad_norm.item(),
                          img_per_s=images_seen * d.world_size / (now - last_log_time), **timer.parts,
                          **engine.loss_scale_field(scaler))
            log(**record)
            logged.add(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{step_lr:.2e}")
            sums, count, images_seen, last_log_time = None, 0, 0, now
        end_of_epoch = step % steps_per_epoch == 0
        save_last = end_of_epoch or step == last_step or (args.save_every and step % args.save_every == 0)
        keep = end_of_epoch and ((epoch + 1) % args.keep_every == 0 or epoch + 1 == args.epochs)
        if save_last or keep:
            engine.wait_for_gpu(d)
            saving_from = time.perf_counter()
            if keep:  # before LAST: a run killed between the two saves retrains the epoch and keeps it again
                save(f"checkpoint-{epoch}.pth")
            if save_last:
                save(engine.LAST)
            last_log_time += time.perf_counter() - saving_from  # img_per_s: training time only
        if end_of_epoch:
            epoch_losses = logged.of_epoch(epoch)
            if epoch_losses and d.is_main:  # tqdm.write prints even where the bar is disabled
                bar.write(f"epoch {epoch}: step {step}, mean logged loss {sum(epoch_losses) / len(epoch_losses):.4f}")
    bar.close()
    engine.report_unreadable(unreadable, d, step, log)

    result = dict(model=model, step=step, output_dir=args.output_dir, first_loss=logged.first, final_loss=logged.final)
    # single log lines are noisy: the loss depends on each step's random schedule (fewer groups, lower loss)
    if logged.first is not None:
        d.print(f"done: step {step}, final loss {result['final_loss']:.4f} (first logged {result['first_loss']:.4f})")
    if log.enabled:  # rank 0, unless this is a finished run continued from elsewhere (it wrote nothing here)
        d.print(f"checkpoint: {os.path.join(args.output_dir, engine.LAST)}, "
                f"log: {os.path.join(args.output_dir, engine.LOG)}")
    return result


if __name__ == "__main__":
    engine.cli(main)
