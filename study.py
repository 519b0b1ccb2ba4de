"""A small-scale study of the papers' central claims, on the CPU: DTM's morphed targets against token-wise
distillation from the same teacher (DTM, ICLR 2025), and MTO's fewer pre-training epochs (MTO, ECCV 2024).

    apt-get install dataset-fashion-mnist        # real images that install offline: Fashion-MNIST (Debian)
    python study.py --out output/study           # about 1.5 hours on 2 CPU cores; docs/RESULTS.md

Time measured on 2 cores: the teacher 6 min, a pre-training run 2-3 min (9 of them), a fine-tuning run 84-142 s
(30 of them), so 70-100 min; more when the machine does anything else. Every run is a subprocess of this
repo's own scripts; all arms get the same data, budget, masks and seeds, and no arm gets a setting the others do
not. Runs whose output folder holds a finished run are not run again (the scripts continue
or skip), so a study cut short continues where it stopped.

    data       Fashion-MNIST (28 px grayscale, as RGB; the scripts resize to 112 px: 7 x 7 = 49 tokens):
               3000 training images (unlabeled for pre-training, labeled for the teacher), 1000 of them with labels
               for fine-tuning, 500 test images for validation
    teacher    vit_tiny trained supervised on the 3000 labeled images (train_finetune.py, the recipe below), frozen,
               distilled through --teacher ckpt: (targets: its final normalized patch tokens)
    pre-train  vit_tiny students, 2 seeds each: token-wise distillation (--fixed_schedule 0 1: no merges), DTM (the
               dynamic scheduler), DTM + MTO (--mto), DTM + MTO for half the epochs, DTM with a fixed schedule
               (--fixed_schedule 24 3, 1 seed: to isolate "dynamic")
    fine-tune  on the 1000 labeled images, 3 seeds for each student and for a from-scratch ViT (6 runs per arm of 2
               pre-training seeds, 3 for the fixed schedule and from scratch; 30 runs); one recipe for all: no
               RandAugment, random erasing, Mixup or CutMix, no layer decay
    measures   best and last validation top-1 per run, and top-1 per epoch; for each pre-trained student on 256
               validation images of every class: the mean cosine of horizontally and vertically adjacent predicted
               tokens (how spatially consistent its predictions are; the teacher's targets for reference), and its
               token-wise and DTM (fixed schedule 24 x 3) losses against the teacher's targets with the training masks
Writes OUT/results.json, OUT/curves.png (mean top-1 per epoch of each arm) and prints the tables.
"""
import argparse
import gzip
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
import dtm
import engine
import morph
import mto

HERE = os.path.dirname(os.path.abspath(__file__))
FASHION = "/usr/share/datasets/fashion-mnist"
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
IMG, GRID = 112, 7
PRETRAIN = ["--model", "vit_tiny", "--img_size", str(IMG), "--batch_size", "32", "--warmup_epochs", "1",
            "--lr", "1.5e-2", "--drop_path", "0", "--num_masked", "19", "--min_block", "4", "--min_crop_scale", "0.3",
            "--num_workers", "1", "--log_every", "10"]
# one light fine-tuning recipe for the teacher and every arm: RandAugment, random erasing, Mixup and CutMix off
# (ImageNet's defaults keep a ViT far from fitting 1000 28-pixel images in 10 epochs), no layer decay
FINETUNE = ["--model", "vit_tiny", "--img_size", str(IMG), "--batch_size", "64", "--lr", "1.6e-2", "--warmup_epochs",
            "1", "--drop_path", "0", "--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0",
            "--layer_decay", "1.0", "--num_workers", "1", "--log_every", "10"]
ARMS = {  # name: (extra pre-training flags, pre-training seeds, share of the pre-training epochs)
    "token-wise": (["--fixed_schedule", "0", "1"], 2, 1.0),
    "DTM": ([], 2, 1.0),
    "DTM + MTO": (["--mto"], 2, 1.0),
    "DTM + MTO, half the epochs": (["--mto"], 2, 0.5),
    "DTM, fixed schedule 24x3": (["--fixed_schedule", "24", "3"], 1, 1.0),
}
FT_SEEDS = (0, 1, 2)  # fine-tuning seeds of every student


def read_idx(name):
    with gzip.open(os.path.join(FASHION, name)) as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_folder(root, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = os.path.join(root, CLASSES[label])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).convert("RGB").save(os.path.join(folder, f"{i:05d}.png"))


def make_data(out):
    """ImageFolders train3000 (3000 training images in a random order), train1000 (its first 1000: a random
    subset, not balanced by class) and val500 (the first 500 test images). Written into data.partial and renamed
    when complete, so a study cut short while writing them writes them again."""
    if not os.path.isdir(FASHION):
        sys.exit(f"error: {FASHION} not found; install the real images first: apt-get install dataset-fashion-mnist")
    missing = [name for name in IDX_FILES if not os.path.isfile(os.path.join(FASHION, name))]
    if missing:  # before anything is written
        sys.exit(f"error: {FASHION} lacks {', '.join(missing)}; install the real images again: apt-get install "
                 f"--reinstall dataset-fashion-mnist")
    root = os.path.join(out, "data")
    if os.path.isdir(root):
        check_data_complete(root)
        return root
    partial = root + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    images, labels, test_images, test_labels = (read_idx(name) for name in IDX_FILES)
    order = np.random.default_rng(0).permutation(len(images))[:3000]
    write_folder(os.path.join(partial, "train3000"), images[order], labels[order])
    write_folder(os.path.join(partial, "train1000"), images[order[:1000]], labels[order[:1000]])
    write_folder(os.path.join(partial, "val500"), test_images[:500], test_labels[:500])
    os.replace(partial, root)
    return root


def check_data_complete(root):
    """A study folder's data/ from before data.partial (a study cut short while writing it left it incomplete, and
    the code of then wrote it again only where val500/ was missing): refuse one with fewer images than its sets."""
    train, test = (len(read_idx(name)) for name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    sets = (("train3000", min(3000, train)), ("train1000", min(1000, train)), ("val500", min(500, test)))
    for name, expected in sets:
        found = sum(len(files) for _, _, files in os.walk(os.path.join(root, name)))
        if found < expected:
            sys.exit(f"error: {root} is incomplete ({name} holds {found} of {expected} images: a study cut short "
                     f"while writing it); remove it (rm -r {shlex.quote(root)}) and the study writes it again")


def run(script, argv, log):
    """One run of a script of this repo (it continues or skips a finished run in its --output_dir)."""
    start = time.time()
    command = [sys.executable, os.path.join(HERE, script), *argv]
    result = subprocess.run(command, cwd=HERE, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    with open(log, "a", errors="backslashreplace") as f:  # a folder that is not UTF-8 (b'r\\xe9s'), as printed
        f.write(f"$ {' '.join(command)}\n{result.stdout[-4000:]}{result.stderr[-4000:]}\n")
    if result.returncode < 0:  # its last line is a progress bar's: name the signal (the out-of-memory killer's: 9)
        number = -result.returncode
        sys.exit(f"error: {script} was killed by signal {number} ({signal.strsignal(number)}"
                 f"{', out of memory?' if number == signal.SIGKILL else ''}; see {log}); relaunch the same command: "
                 f"the study continues where it stopped")
    if result.returncode != 0:
        sys.exit(f"error: {script} failed (see {log}): {result.stderr.strip().splitlines()[-1:]}")
    print(f"  {script} {argv[argv.index('--output_dir') + 1]}: {time.time() - start:.0f} s", flush=True)
    for line in (result.stdout + result.stderr).splitlines():  # the trainers' warnings, not only in the log
        if line.startswith("warning:"):
            print(f"    {line}", flush=True)


def finetune_log(folder):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f if "val_top1" in line]


@torch.no_grad()
def consistency(checkpoint_path, teacher, images, masks):
    """(mean cosine of adjacent predicted tokens, token-wise loss, DTM loss at 24 x 3) of a pre-trained student,
    with the forward it was trained with: MTO's recalibration mask for a student pre-trained with --mto."""
    checkpoint = dtm.read_checkpoint(checkpoint_path)
    student = dtm.build_vit("vit_tiny", img_size=IMG, rel_pos_bias=checkpoint["args"]["rel_pos_bias"])
    student.load_state_dict(dtm.vit_state_dict(checkpoint))
    head = torch.nn.Linear(student.embed_dim, teacher.out_dim)
    head.load_state_dict({k[len("head."):]: v for k, v in checkpoint["model"].items() if k.startswith("head.")})
    student.eval()
    saved = checkpoint["args"]
    if saved.get("mto"):  # the recalibrated attention; no MTO loss (lambdas 0)
        cfg = mto.MTOConfig(layers=saved.get("mto_layers"), lambda_sing=0, lambda_ent=0)
        tokens = mto.mto_forward(student, images, masks, cfg)[0]
    else:
        tokens = student.forward_features(images, masks).tokens
    pred = head(tokens[:, 1:])  # (B, N, D)
    targets = teacher(images)
    schedule = morph.make_schedule(GRID * GRID, 24, 3, "official")
    groups = morph.token_morphing(targets, schedule, "random", torch.Generator().manual_seed(0))
    G = morph.num_groups_after(GRID * GRID, schedule, "random")
    token_loss = dtm.dtm_loss(pred, targets, [groups.new_tensor(range(GRID * GRID)).expand_as(groups)])[0]
    dtm_loss = dtm.dtm_loss(pred, targets, [groups], num_groups=[G])[0]
    return adjacent_cosine(pred), token_loss.item(), dtm_loss.item()


def adjacent_cosine(tokens):
    """Mean cosine similarity of horizontally and vertically adjacent tokens (B, GRID * GRID, D)."""
    grid = tokens.reshape(tokens.shape[0], GRID, GRID, -1)
    pairs = [F.cosine_similarity(grid[:, :, 1:], grid[:, :, :-1], dim=-1).flatten(),
             F.cosine_similarity(grid[:, 1:], grid[:, :-1], dim=-1).flatten()]
    return torch.cat(pairs).mean().item()


def mean_std(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def check_same_epochs(args, record: bool = False):
    """A relaunch in the same --out continues its runs, and a finished run is skipped whatever its epochs: other epoch
    counts there would mix old and new runs in one table (or fine-tune students of an older teacher). record: write
    them down for later launches (once the data is there, so a launch that could not make it binds no epochs)."""
    path, epochs = os.path.join(args.out, "epochs.json"), {k: getattr(args, k) for k in EPOCH_FLAGS}
    if os.path.exists(path):
        try:
            with open(path) as f:
                before = json.load(f)
            if not isinstance(before, dict):  # [], null, a number: no epochs to compare (a traceback once)
                raise ValueError(f"a JSON {type(before).__name__}, not an object")
        except ValueError as e:  # torn or not UTF-8 (written whole since: os.replace); a traceback once
            sys.exit(f"error: {path} is not JSON of the epochs ({e}): write into it the epochs the study there ran "
                     f"with, e.g. echo {shlex.quote(json.dumps(epochs))} > {shlex.quote(path)}, or give another --out")
        if before != epochs:
            changed = ", ".join(f"--{k} {before.get(k)} -> {v}" for k, v in epochs.items() if before.get(k) != v)
            sys.exit(f"error: the study in {args.out} ran with other epochs ({changed}); its finished runs would be "
                     f"kept and mixed with new ones: give another --out, or the same epochs "
                     f"({' '.join(f'--{k} {v}' for k, v in before.items())})")
    elif record:
        with open(path + ".tmp", "w") as f:
            json.dump(epochs, f)
        os.replace(path + ".tmp", path)  # whole or not at all: a launch killed meanwhile leaves no half-written file


EPOCH_FLAGS = ("teacher_epochs", "pretrain_epochs", "finetune_epochs")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the docstring as written, each flag with its default."""


def main():
    engine.escape_what_stdout_cannot_encode()  # the table's ± on an ASCII stdout, an --out that is not UTF-8
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", default="output/study", type=os.path.expanduser, help="every run, the data and the "
                        "results; a relaunch with the same folder continues (finished runs are skipped)")
    parser.add_argument("--teacher_epochs", type=int, default=10, help="the teacher's training epochs")
    parser.add_argument("--pretrain_epochs", type=int, default=4, help="each pre-training arm's epochs (the 'half "
                        "the epochs' arm: half as many, rounded down)")
    parser.add_argument("--finetune_epochs", type=int, default=10, help="each fine-tuning run's epochs")
    args = parser.parse_args()
    if min(args.teacher_epochs, args.finetune_epochs) < 2 or args.pretrain_epochs < 4:
        parser.error("--teacher_epochs and --finetune_epochs must be >= 2, --pretrain_epochs >= 4: every run warms "
                     "up for 1 epoch, and a run of 1 epoch (the half arm's at 2 or 3) would end inside its warmup, "
                     "its lr never decaying, unlike the other arms'")
    if not args.out.strip():  # abspath("") is the current folder: the runs and data would land there
        parser.error(f"--out {args.out!r} is empty (an unset shell variable?): give a folder")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is a file, not a folder")
    args.out = os.path.abspath(args.out)  # the runs start in this folder (cwd=HERE), not in the caller's
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:  # a file further up (--out FILE/sub), no permission: a traceback once
        parser.error(f"--out {args.out!r}: cannot make the folder ({e.strerror}); give a path in a folder you can "
                     f"write to")
    check_same_epochs(args)
    log = os.path.join(args.out, "runs.log")
    root = make_data(args.out)
    check_same_epochs(args, record=True)
    train3000, train1000, val = (os.path.join(root, n) for n in ("train3000", "train1000", "val500"))
    started = time.time()

    print("teacher", flush=True)
    teacher_dir = os.path.join(args.out, "teacher")
    run("train_finetune.py", [*FINETUNE, "--data_train", train3000, "--data_val", val, "--init", "none", "--epochs",
                              str(args.teacher_epochs), "--seed", "100", "--output_dir", teacher_dir], log)
    teacher_ckpt = os.path.join(teacher_dir, "checkpoint-last.pth")

    print("pre-training", flush=True)
    pretrained = {}
    for arm, (flags, seeds, share) in ARMS.items():
        epochs = max(1, int(args.pretrain_epochs * share))  # half of an odd count rounded down (5 -> 2, 7 -> 3)
        for seed in range(seeds):
            folder = os.path.join(args.out, "pretrain", arm.replace(" ", "_").replace(",", ""), f"seed{seed}")
            run("train_pretrain.py", [*PRETRAIN, *flags, "--data", train3000, "--teacher", f"ckpt:{teacher_ckpt}",
                                      "--epochs", str(epochs), "--seed", str(seed), "--output_dir", folder], log)
            pretrained.setdefault(arm, []).append(os.path.join(folder, "checkpoint-last.pth"))

    print("fine-tuning", flush=True)
    finetuned = {}
    for arm, inits in {"from scratch": ["none"], **pretrained}.items():
        for p, init in enumerate(inits):
            for seed in FT_SEEDS:
                folder = os.path.join(args.out, "finetune", arm.replace(" ", "_").replace(",", ""), f"p{p}_s{seed}")
                run("train_finetune.py", [*FINETUNE, "--data_train", train1000, "--data_val", val, "--init", init,
                                          "--epochs", str(args.finetune_epochs), "--seed", str(seed),
                                          "--output_dir", folder], log)
                finetuned.setdefault(arm, []).append(finetune_log(folder))

    print("spatial consistency", flush=True)
    teacher = dtm.build_teacher(f"ckpt:{teacher_ckpt}", IMG, dtm.PATCH_SIZE)
    val_set = data.ImageFolder(val, data.EvalTransform(IMG))
    spread = [i * len(val_set) // 256 for i in range(256)]  # every class (the first 256: about half)
    images = torch.stack([val_set[i][0] for i in spread])
    mask_gen = data.BlockMaskGenerator((GRID, GRID), 19, 4)
    masks = torch.stack([mask_gen(random.Random(i)).flatten() for i in range(256)])
    measures = {arm: [consistency(path, teacher, images, masks) for path in paths] for arm, paths in pretrained.items()}
    teacher_cosine = adjacent_cosine(teacher(images))

    teacher_log = finetune_log(teacher_dir)
    results = {"minutes_this_launch": round((time.time() - started) / 60, 1),  # a relaunch skips finished runs
               "teacher_best_top1": max(r["val_top1"] for r in teacher_log),
               "teacher_last_top1": teacher_log[-1]["val_top1"],
               "teacher_adjacent_cosine": teacher_cosine, "args": vars(args), "arms": {}}
    print(f"\nteacher: val top-1 {results['teacher_best_top1']:.1f}% best, {results['teacher_last_top1']:.1f}% last; "
          f"adjacent cosine of its targets {teacher_cosine:.3f}")
    print(f"{'arm':>28} | {'best top-1':>14} | {'last top-1':>14} | runs | adjacent cos | token loss | DTM loss")
    for arm, logs in finetuned.items():
        best = [max(r["val_top1"] for r in lines) for lines in logs]
        last = [lines[-1]["val_top1"] for lines in logs]
        curve = [statistics.mean(lines[e]["val_top1"] for lines in logs) for e in range(len(logs[0]))]
        entry = {"best": best, "last": last, "mean_curve": curve}
        line = (f"{arm:>28} | {'%.1f ± %.1f' % mean_std(best):>14} | {'%.1f ± %.1f' % mean_std(last):>14} | "
                f"{len(logs):>4}")
        if arm in measures:
            entry["adjacent_cosine"], entry["token_loss"], entry["dtm_loss"] = (list(v) for v in zip(*measures[arm]))
            line += " | " + " | ".join(f"{statistics.mean(entry[k]):.4f}"
                                       for k in ("adjacent_cosine", "token_loss", "dtm_loss"))
        results["arms"][arm] = entry
        print(line)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    curves = []
    for arm, entry in results["arms"].items():
        path = os.path.join(args.out, f"curve_{arm.replace(' ', '_').replace(',', '')}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps({"epoch": e, "val_top1": v}) + "\n" for e, v in enumerate(entry["mean_curve"]))
        curves.append(path)
    subprocess.run([sys.executable, os.path.join(HERE, "plot_log.py"), *curves, "--labels", *results["arms"],
                    "--x", "epoch", "--field", "val_top1", "--out", os.path.join(args.out, "curves.png"),
                    "--title", "validation top-1 (%) per fine-tuning epoch (0-based), mean over each arm's runs"],
                   check=True)
    print(f"results: {os.path.join(args.out, 'results.json')}, {os.path.join(args.out, 'curves.png')}")


if __name__ == "__main__":
    main()
