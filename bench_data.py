"""Benchmark: how many training samples one DataLoader worker prepares per second, to size --num_workers against a
GPU's step rate (log.jsonl's img_per_s is images/s over all GPUs of all nodes; a node needs about img_per_s x its
GPUs / all GPUs per second from its workers).

    python bench_data.py                                 # JPEGs made here, 500x375 (ImageNet's typical size)
    python bench_data.py --data /path/imagenet/train     # the first --images files of a real image folder

Times per image on one thread, as in a worker: decoding alone; pre-training (decode + RandomResizedCrop / flip /
color jitter / normalize + a block mask, train_pretrain.py's defaults); fine-tuning (decode + crop / flip /
RandAugment / normalize / random erasing, train_finetune.py's defaults). Then a DataLoader over the pre-training
samples with --workers workers and batches of --batch (collation and transfer between processes included).
"""
import argparse
import contextlib
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import data


def make_jpegs(folder, count):
    """count photo-like 500x375 JPEGs (smooth colour waves + noise, quality 90) in folder/x/: an ImageFolder."""
    os.makedirs(os.path.join(folder, "x"))
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    waves = np.stack([128 + 100 * np.sin(x / 37 + c) * np.cos(y / 23 - c) for c in range(3)], axis=-1)
    for i in range(count):
        pixels = np.clip(waves + rng.normal(0, 20, waves.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, "x", f"{i}.jpg"), quality=90)


def per_image_ms(paths, fn, repeats):
    fn(paths[0])  # warm-up
    start = time.perf_counter()
    for i in range(repeats):
        fn(paths[i % len(paths)])
    return (time.perf_counter() - start) / repeats * 1e3


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread, as in a DataLoader worker, and back to the caller's count after (main called from Python,
    e.g. in a notebook, left the rest of the session's torch on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=os.path.expanduser,
                        help="an image folder (class subfolders); default: JPEGs made in a temporary folder")
    parser.add_argument("--images", type=int, default=50,
                        help="distinct files read (default %(default)s; at most --repeats, which a pipeline reads)")
    parser.add_argument("--repeats", type=int, default=300, help="images timed per pipeline (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers for the last figure (default %(default)s)")
    parser.add_argument("--batch", type=int, default=128,
                        help="images per batch for the last figure (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=6, help="batches per worker for the last figure (the first "
                                                              "round untimed; default %(default)s)")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first round is not timed)")
    if min(args.images, args.repeats, args.batch) < 1 or args.workers < 0:
        parser.error("--images, --repeats and --batch must be >= 1, --workers >= 0")
    if args.data is not None and not os.path.isdir(args.data):
        parser.error(f"--data {args.data!r} is not a folder")
    files = min(args.images, args.repeats)  # each pipeline reads them all, so the DataLoader reads no file unread
    with tempfile.TemporaryDirectory() as tmp, one_torch_thread():
        if args.data is None:
            make_jpegs(tmp, files)
        try:
            folder = data.ImageFolder(args.data or tmp)
        except (OSError, ValueError) as e:
            parser.error(f"--data: {e}")
        paths = [folder.samples[i][0] for i in range(min(files, len(folder)))]
        pretrain = data.PretrainTransform(224, min_crop_scale=0.08)
        masks = data.BlockMaskGenerator((14, 14), num_masked=75, min_block=16)
        finetune = data.FinetuneTransform(224)
        print(f"{len(paths)} files from {args.data or 'generated 500x375 JPEGs'}; torch {torch.__version__}, 1 thread")
        for name, fn in (("decode", data.load_image),
                         ("pre-training sample", lambda p: (pretrain(data.load_image(p)), masks())),
                         ("fine-tuning sample", lambda p: finetune(data.load_image(p)))):
            try:
                ms = per_image_ms(paths, fn, args.repeats)
            except data.UnreadableImage as e:  # its message names the file and the fix; a traceback once
                parser.error(f"--data: {e}")
            print(f"{name:>20}: {ms:5.1f} ms/image = {1e3 / ms:5.0f} images/s per worker", flush=True)

        # the workers start together and each builds one batch per round: time from the end of the first round
        # (its batches were built before any timing) to the end of the last, over whole rounds
        per_round = max(args.workers, 1)
        samples = data.MaskedImageDataset(folder, pretrain, masks)
        sampler = torch.utils.data.RandomSampler(range(len(paths)), replacement=True,  # the same files as above
                                                 num_samples=args.batch * per_round * args.rounds)
        loader = torch.utils.data.DataLoader(samples, batch_size=args.batch, sampler=sampler,
                                             num_workers=args.workers, persistent_workers=args.workers > 0)
        arrivals = [time.perf_counter() for _ in loader]
        rate = args.batch * per_round * (args.rounds - 1) / (arrivals[-1] - arrivals[per_round - 1])
        print(f"DataLoader, {args.workers} workers, batch {args.batch}, {args.rounds - 1} timed rounds: {rate:.0f} "
              f"pre-training samples/s ({rate / per_round:.0f} per worker)")


if __name__ == "__main__":
    main()
