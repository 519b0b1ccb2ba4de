"""Benchmark: step time of DTM pre-training with and without --mto (student forward + backward + AdamW step).

The teacher is left out (it is the same with and without MTO): random targets of the CLIP dimension stand in
for it; morphing uses the default dynamic schedules (L=2). Prints the median time per step of each variant.

    python bench_mto.py                              # vit_b, batch 64, CPU
    python bench_mto.py --device cuda --amp bf16
"""
import argparse
import random
import statistics
import time

import torch

import dtm
import morph
import mto
from data import BlockMaskGenerator


def make_step(args, cfg):
    torch.manual_seed(0)
    student = dtm.build_vit(args.model, img_size=args.img_size, drop_path_rate=0.1)
    model = dtm.DTMPretrainModel(student, 512, features_fn=mto.MTO(cfg) if cfg else None).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98))
    grid = args.img_size // 16
    N = grid * grid
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    masks = BlockMaskGenerator((grid, grid), round(N * 75 / 196), 16)
    mask = torch.stack([masks(random.Random(i)).flatten() for i in range(args.batch)]).to(args.device)
    targets = torch.randn(args.batch, N, 512, device=args.device)
    rng = random.Random(0)
    amp = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.amp == "bf16")

    def step():
        schedules = [morph.sample_schedule(N, N, 14, rng, "official") for _ in range(2)]
        groups = morph.token_morphing_levels(targets, schedules)
        with amp:
            loss, _ = model(images, mask, targets, groups, [morph.num_groups_after(N, s) for s in schedules])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b", choices=list(dtm.VIT_CONFIGS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    variants = {"dtm": None,
                "dtm + mto (all parts, all blocks)": mto.MTOConfig(),
                "dtm + mto recalibration only": mto.MTOConfig(lambda_sing=0, lambda_ent=0)}
    print(f"{args.model} batch={args.batch} img={args.img_size} device={args.device} amp={args.amp} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    base = None
    for name, cfg in variants.items():
        step = make_step(args, cfg)
        times = []
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        base = base or seconds
        print(f"{name:>36}: {seconds:8.3f} s/step  ({100 * (seconds / base - 1):+.1f}%)")


if __name__ == "__main__":
    main()
