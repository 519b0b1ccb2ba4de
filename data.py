"""Data for dtm: datasets, augmentations, block-wise masking, Mixup/CutMix. Pillow + numpy + torch only.

What each piece is, and where it comes from:

Pre-training (DTM, ICLR 2025, follows the BEiT v2 pre-training data pipeline)
  ImageFolder           the usual `root/class_x/img.jpg` layout (torchvision's ImageFolder semantics); its samples
                        in tensors (PackedSamples), so DataLoader workers do not copy them.
  PretrainTransform     RandomResizedCrop(scale=(min_crop_scale, 1), ratio 3/4..4/3, bicubic) -> horizontal flip ->
                        color jitter 0.4 -> normalize. BEiT v2 and the official DTM code (utils/datasets.py:71-73,
                        DataAugmentationForBEiT) apply the color jitter before the flip and crop; here it runs on the
                        crop (cheaper; the same up to rounding and clipping for brightness and saturation, while
                        contrast uses the crop's mean instead of the full image's; measured: PretrainTransform).
  BlockMaskGenerator    BEiT (Bao et al., ICLR 2022), Sec. 2.3 / Algorithm 1 "Blockwise Masking" (75 of 14x14
                        patches: Sec. 2.5),
                        blocks proposed with >= 16 patches (fewer where fewer remain to mask, or where a block
                        overlaps masked ones) and aspect ratio in [0.3, 1/0.3]; plus BEiT v2's exact-count fix-up.
  MaskedImageDataset    (image, mask) pairs for the pre-training loop.
  SyntheticShapes       procedural images (shapes x textures on a textured background) with per-pixel masks, for the
                        demo and the tests; no files.

Fine-tuning (BEiT v2 / MAE fine-tuning recipe, MAE Appendix A.1, Table 9; as implemented in timm)
  FinetuneTransform     RandomResizedCrop(0.08..1) + flip + RandAugment + normalize + RandomErasing.
  RandAugment           Cubuk et al. 2020, timm's 'rand-m9-mstd0.5-inc1': 2 ops, magnitude 9 +- N(0, 0.5), each op
                        applied with probability 0.5, "increasing" op variants (without inc1, timm's original ones).
  RandomErasing         Zhong et al. 2020, timm's mode 'pixel' (per-pixel N(0,1) noise in normalized space), prob 0.25.
  EvalTransform         resize shorter side to img_size / crop_ratio (224 / 0.875 = 256), bicubic, center crop.
                        train_finetune's crop_ratio: 0.875 below 384 px, else 1.0, as build_transform in BEiT v2
                        (unilm beit2/datasets.py) and naver-ai/dtm (utils/datasets.py); MAE's (util/datasets.py) is
                        1.0 from 225 px on.
  Mixup                 Mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019) per batch with label smoothing, timm's
                        `Mixup(mode='batch', correct_lam=True)`: the batch is mixed with its reverse.

Segmentation (BEiT's ADE20K protocol, the mmsegmentation UperNet 512x512 pipeline)
  SegFolder, ADE20KDataset, reduce_zero_label, SegTrainTransform (random resize 0.5-2.0 of (2048, 512), random crop 512
  with cat_max_ratio 0.75, flip, PhotoMetricDistortion, normalize, pad with 0 / 255), SegEvalTransform,
  ShapesSegmentation (SyntheticShapes with its masks).

Randomness and reproducibility: the crop/flip/jitter transforms draw from torch's global RNG (as torchvision does);
masking, RandAugment, Mixup and the segmentation transforms draw from Python's `random` (as BEiT, timm and mmseg do with
Python/numpy); RandomErasing its box from `random` and its noise from torch (as timm). The trainers seed both for every
sample from (seed, epoch, index) and for every micro-step from (seed, micro-step, rank) (engine.SeededSamples,
engine.seed_step), so a run is reproducible and resumes exactly whatever the number of DataLoader workers.
Masks (segmentation labels) are only ever resized with cv2's nearest neighbour, segmentation images with cv2's
bilinear, as mmcv (resize_cv2_nearest, resize_cv2_linear). Files that cannot be decoded raise UnreadableImage.
"""
import math
import os
import random
import re
import shlex

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")  # torchvision's
ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".zip")  # ImageNet's train set unpacks into one .tar per class
IGNORE_INDEX = 255
BICUBIC = Image.Resampling.BICUBIC


# ----------------------------------------------------------------------------------------------------------------------
# Loading

class UnreadableImage(ValueError):
    """An image or annotation file that cannot be decoded; .path names it. The trainers skip such training images
    (engine.SeededSamples) and refuse such validation images (engine.check_dataset)."""

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


def _unreadable(path, error):
    return UnreadableImage(f"cannot read image file {path!r} ({type(error).__name__}: {error}); the file is corrupt "
                           f"or not an image: delete or replace it", path)


def load_image(path):
    """Open an image file as an RGB PIL image; UnreadableImage names the file if it cannot be decoded.

    16-bit grayscale ('I;16...', and 16-bit PGM, which Pillow opens as 'I' scaled to 0..65535) is scaled to 8 bits
    (x / 257: 65535 -> 255); Pillow's convert("RGB") would clip it at 255 (torchvision's and timm's loaders do), making
    most such images white. 32-bit integer and float images ('I', 'F') have no agreed range: they are refused with a
    ValueError that says so."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode.startswith("I;16") or (mode == "I" and img.format == "PPM"):  # PGM: 'I' holding 0..65535
                # np.asarray decodes the whole file, so truncated files fail here too
                grey = np.rint(np.asarray(img, dtype=np.float64) / 257.0).astype(np.uint8)
                rgb = Image.fromarray(grey, "L").convert("RGB")
                rgb.info.update(img.info)  # its EXIF orientation, for upright (convert() below keeps it too)
                return rgb
            if mode not in ("I", "F"):
                return img.convert("RGB")  # convert() forces the full decode, so truncated files fail here
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as e:  # a valid file above Pillow's pixel limit, not a corrupt one
        raise UnreadableImage(f"image {path!r} is too large for Pillow's decompression-bomb limit ({e}); downscale "
                              f"the file, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust your data", path) from e
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from e
    kind = "integer" if mode == "I" else "float"
    raise ValueError(f"image {path!r} has mode {mode!r} (32-bit {kind} pixels), whose range this loader cannot know; "
                     f"convert it to 8-bit RGB or grayscale")


def load_label_map(path):
    """Open a segmentation annotation PNG as a (H, W) uint8 array of class indices."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            arr = np.array(img)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as e:  # as load_image's (no OSError): a label map larger than its image
        raise UnreadableImage(f"annotation {path!r} is too large for Pillow's decompression-bomb limit ({e}); a label "
                              f"map has its image's size: check the file, or raise PIL.Image.MAX_IMAGE_PIXELS if you "
                              f"trust your data", path) from e
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from e
    if arr.ndim != 2:  # a file that cannot be a label map: UnreadableImage (training skips it, validation refuses it)
        raise UnreadableImage(f"annotation {path!r} has mode {mode!r} with {arr.shape[-1]} channels; expected a "
                              "single-channel label PNG (mode 'L' or 'P') whose pixel values are class indices", path)
    if arr.dtype.kind == "f" and not (np.isfinite(arr) & (arr == np.round(arr))).all():  # mode 'F' (a TIFF)
        raise UnreadableImage(f"annotation {path!r} holds float values that are not whole numbers (mode {mode!r}); "
                              f"a label map's pixels are class indices: save it as an 8-bit PNG", path)
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise UnreadableImage(f"annotation {path!r} has label values outside 0..255 (min {arr.min()}, max "
                                  f"{arr.max()}); a label map's pixels are class indices (255: ignore): save it as an "
                                  f"8-bit PNG", path)
        arr = arr.astype(np.uint8)
    return arr


def _is_image_file(name):
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _refuse_dangling_links(folder, names):
    """Raise if one of the names in folder is a symbolic link whose target is gone (an unmounted drive, a moved
    folder): listings take it for a file, so a linked class folder or subfolder would be left out without a word.
    Hidden names are skipped; a link named as an image is listed (and skipped when it cannot be read)."""
    for name in names:
        path = os.path.join(folder, name)
        if not name.startswith(".") and not _is_image_file(name) and os.path.islink(path) and not os.path.exists(path):
            raise FileNotFoundError(f"{path!r} is a symbolic link to {os.readlink(path)!r}, which does not exist: "
                                    f"the images there would be left out; restore (mount) its target or remove the "
                                    f"link")


def _unlistable(error):
    """os.walk's onerror: a folder that cannot be listed (permissions) would be left out without a word."""
    raise OSError(f"cannot list the folder {error.filename!r} ({error.strerror or error}): its images would be left "
                  f"out; make it readable, or move it out of the dataset") from error


def _image_files(folder, split_folders=None):
    """Image files under folder, in subfolders too (symbolic links followed); hidden files and folders skipped. A
    link back to a folder above would list its files again and again: it is an error, as are a link to nothing and a
    folder that cannot be listed. Each folder found to hold a dataset's sets (dataset_sets) is appended to
    split_folders as (folder, its subfolders' names)."""
    seen = set()
    for parent, dirs, files in os.walk(folder, onerror=_unlistable, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:
            raise ValueError(f"{parent!r} is the folder {real!r} again (a symbolic link loop, or two links to one "
                             f"folder): its images would be listed more than once; remove the link")
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if split_folders is not None and dataset_sets(dirs):
            split_folders.append((parent, list(dirs)))
        _refuse_dangling_links(parent, files)
        yield from (os.path.join(parent, f) for f in files if _is_image_file(f))


class PackedSamples:
    """A read-only sequence of (path, label), sorted as given, held in three tensors (the paths' bytes, their
    offsets, the labels) instead of a list of Python objects.

    Why: a DataLoader worker (a forked process) that reads a Python list writes the reference counts of the objects it
    reads, so the pages holding them are copied into the worker, one by one over an epoch. Measured (torch 2.13 CPU,
    Linux): a worker reading ImageNet-like paths of all 1.28M samples in random order gained 256 MB of private memory
    with a list of (path, label) tuples, 10 MB with PackedSamples (its own 1.28M-entry index order); 8 processes x 10
    workers would hold about 20 GB of such copies. test_data.py checks it at 300k samples. Tensors, not numpy arrays:
    a worker started by spawn or forkserver (Python 3.14's default on Linux) gets the dataset pickled, and torch sends
    a tensor to it as shared memory, moved there once; numpy arrays were copied into every worker (89 MB each for
    ImageNet-1k), and a pickle larger than a pipe's buffer (64 KiB) held each worker's start until the one before had
    imported its modules."""

    def __init__(self, paths, labels):
        encoded = [os.fsencode(p) for p in paths]  # file-system encoding: any file name round-trips
        self.offsets = torch.from_numpy(np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64))  # (N + 1,)
        self.data = torch.from_numpy(np.frombuffer(bytearray(b"".join(encoded)), dtype=np.uint8))
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))  # (N,)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        index %= len(self)
        offsets = self.offsets.numpy()  # numpy views (4 us a sample, 8 with tensor indexing), made anew each time:
        # moving a tensor to shared memory (pickled for a spawned worker) frees the memory an older view reads
        path = os.fsdecode(self.data.numpy()[offsets[index]:offsets[index + 1]].tobytes())
        return path, int(self.labels.numpy()[index])


DATASET_SETS = ("train", "val", "validation", "valid", "test")  # a dataset's sets, in the order a val set is picked
# a folder named for a set: "val", "val2017", "ILSVRC2012_img_val", "imagenet-train" (not "training", not "test_tube")
_SET_NAME = re.compile(r"(?:^|.*[_\-. ])(" + "|".join(DATASET_SETS) + r")\d*$", re.IGNORECASE)


def dataset_sets(names):
    """{set: folder name} of the names that name a dataset's sets (see _SET_NAME), if they hold a train set and one
    more (one such name alone can be a class: "train" among vehicles); else {}."""
    found = {}
    for name in sorted(names):
        match = _SET_NAME.match(name)
        if match:
            found.setdefault(match.group(1).lower(), name)
    sets = {s: found[s] for s in DATASET_SETS if s in found}  # train first
    return sets if "train" in sets and len(sets) > 1 else {}


def refuse_dataset_root(folder, flag: str, split: str):
    """An ImageFolder whose root holds train/ and val/ (or validation/, test/, train2017/ ...), or a folder below
    it that does (the root a wrapper: ILSVRC/Data/ of ILSVRC/Data/CLS-LOC/{train,val,test}), has those sets as its
    classes or within one class, and a run on it would train or evaluate on every set's images: raise, naming the
    folder to pass as `flag` instead (split "train": the train set's; "val": the first other set's in DATASET_SETS'
    order), or, where each class folder holds its own sets (root/<class>/{train,val}/), the layout to make."""
    nested = [(os.path.relpath(parent, folder.root), names) for parent, names in folder.split_folders]
    for parent, names in [("", folder.classes)] + nested:
        sets = dataset_sets(names)
        if not sets:
            continue
        set_folders = list(sets.values())  # the train set's first
        pick = set_folders[0] if split == "train" else set_folders[1]
        listed = " and ".join(os.path.join(parent, n) + "/" for n in set_folders)
        where, read_as = (f"holds {parent}/ with", "one class") if parent else ("holds", "classes")
        fix = os.path.normpath(os.path.join(folder.root, parent, pick))
        train = os.path.join(folder.root, parent, set_folders[0])
        if parent and not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(train)):
            # root/<class>/{train,val}/<image>: each class split on its own, no folder to pass as it is
            raise ValueError(f"{flag} {folder.root!r} {where} {listed} (each class folder split into sets): the "
                             f"images of every set would be mixed in each class; move them to <set>/<class>/<image> "
                             f"(e.g. {set_folders[0]}/{parent.split(os.sep)[0]}/) and pass the set's folder as {flag}")
        raise ValueError(f"{flag} {folder.root!r} {where} {listed} (a dataset split into sets), which would be read as "
                         f"{read_as}, the images of every set mixed: pass {flag} {fix}")


def require_image_folder(root, name: str):
    """Raise unless root is a folder, naming it as `name` (e.g. the flag that gave it) and ImageFolder's layout."""
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise FileNotFoundError(f"{name} {what}; expected the layout {ImageFolder.LAYOUT}")


def archive_fix(root: str, archive: str) -> str:
    """What to do about a class archive (e.g. n01440764.tar) in an image folder's root: the commands, for one."""
    name = next(archive[:-len(end)] for end in ARCHIVE_EXTENSIONS if archive.lower().endswith(end))
    folder, path = (shlex.quote(os.path.join(root, n)) for n in (name, archive))
    unpack = f"unzip -q {path} -d {folder}" if archive.lower().endswith(".zip") else f"tar -xf {path} -C {folder}"
    return f"extract each into the class folder of its name and remove it (mkdir {folder} && {unpack} && rm {path})"


class ImageFolder(torch.utils.data.Dataset):
    """Images in `root/<class_name>/**/<file>.<ext>`; labels are class indices in sorted class-name order.

    .classes: sorted class folder names. .samples: the (path, label) pairs, by class, sorted by path within a class (a
    PackedSamples: DataLoader workers read it without copying it). .targets: the labels (N,) int64. __getitem__ ->
    (transform(img), label), the PIL RGB image itself when transform is None. As torchvision's ImageFolder for flat
    class folders (ImageNet's), with its extensions (any case); with nested ones torchvision lists a folder's own files
    before its subfolders'. Hidden names (".ipynb_checkpoints/", "._x.JPEG") are skipped, where torchvision would make
    a hidden folder a class (the first: class indices shift) and read macOS's "._" files. Images lying in root beside
    the class folders are refused, where torchvision leaves them out, and so are archives (a class left packed).
    """

    LAYOUT = "root/<class_name>/<image>.jpg (one subfolder per class, e.g. imagenet/train/n01440764/xxx.JPEG)"

    def __init__(self, root, transform=None):
        self.root, self.transform = root, transform
        require_image_folder(root, f"image folder {root!r}")
        entries = list(os.scandir(root))
        _refuse_dangling_links(root, [e.name for e in entries if not e.is_dir()])
        self.classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        loose = sorted(e.name for e in entries if not e.is_dir() and _is_image_file(e.name))  # images in root itself
        archives = sorted(e.name for e in entries if not e.is_dir() and not e.name.startswith(".")
                          and e.name.lower().endswith(ARCHIVE_EXTENSIONS))
        if not self.classes:
            hint = (f" It holds {len(loose)} images directly: move them into class subfolders." if loose else
                    f" It holds {len(archives)} archives: {archive_fix(root, archives[0])}." if archives else "")
            raise FileNotFoundError(f"image folder {root!r} has no class subfolders; expected the layout "
                                    f"{self.LAYOUT}.{hint}")
        if loose:  # torchvision's ImageFolder leaves them out without a word: a val set counted in part
            raise FileNotFoundError(f"image folder {root!r} holds {len(loose)} images directly (e.g. {loose[0]!r}) "
                                    f"beside its {len(self.classes)} class folders, which this layout does not read: "
                                    f"move them into their class folders, or out of {root!r}")
        paths, labels, empty = [], [], []
        self.split_folders = []  # folders below root that hold a dataset's sets, for refuse_dataset_root
        for label, name in enumerate(self.classes):
            files = sorted(_image_files(os.path.join(root, name), self.split_folders))
            empty += [] if files else [name]
            paths += files
            labels += [label] * len(files)
        if empty:
            raise FileNotFoundError(
                f"{len(empty)} of {len(self.classes)} class folders in {root!r} hold no images "
                f"(extensions {', '.join(IMG_EXTENSIONS)}, any case): {', '.join(empty[:5])}"
                f"{' ...' if len(empty) > 5 else ''}; expected the layout {self.LAYOUT}")
        if archives and not dataset_sets(self.classes) and not self.split_folders:  # a dataset root: named by
            # refuse_dataset_root; here a class still packed (an unpacking stopped half way) was left out without a word
            raise FileNotFoundError(f"image folder {root!r} holds {len(archives)} archives (e.g. {archives[0]!r}) "
                                    f"beside its {len(self.classes)} class folders, which this layout does not read: "
                                    f"{archive_fix(root, archives[0])}, or move them out of {root!r}")
        self.samples = PackedSamples(paths, labels)
        self.targets = self.samples.labels

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        """-> (PIL RGB image, label), not transformed."""
        path, label = self.samples[index]
        return load_image(path), label

    def __getitem__(self, index):
        img, label = self.load(index)
        return (self.transform(img) if self.transform is not None else img), label


# ----------------------------------------------------------------------------------------------------------------------
# Tensor conversion and the pre-training transform (torch global RNG, like torchvision)

def check_rgb(img):
    """The transforms take PIL RGB images (as load_image returns): a clear error for anything else, before a transform
    fails on it somewhere inside (RandAugment's fill colour on a grey image, a tensor's missing .size)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"the transforms take PIL RGB images, got {type(img).__name__}: load it with data.load_image"
                        f" (or PIL.Image.fromarray(array).convert('RGB'))")
    if img.mode != "RGB":
        raise ValueError(f"the transforms take RGB images, got a PIL image of mode {img.mode!r}: convert it first "
                         f"(data.load_image does, or img.convert('RGB'))")


def to_tensor(img, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PIL RGB image -> normalized float tensor (3, H, W): (pixel / 255 - mean) / std."""
    check_rgb(img)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _rand_uniform(low, high):
    return torch.empty(1).uniform_(low, high).item()


class RandomResizedCrop:
    """torchvision's RandomResizedCrop on PIL images: 10 tries of (area, log-aspect) samples, then a center crop
    clamped to the aspect range as the fallback; the crop is resized to (size, size). One difference: the fallback's
    side is at least 1 pixel, where torchvision's (0.28, transforms.py RandomResizedCrop.get_params,
    `int(round(w / min(ratio)))`) is 0 for a 1-pixel-wide image with ratios above 2, an empty crop."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=BICUBIC):
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"RandomResizedCrop needs 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                             f"got scale={scale}, ratio={ratio}")
        self.size, self.scale, self.ratio, self.interpolation = size, scale, ratio, interpolation

    @staticmethod
    def get_params(width, height, scale, ratio):
        """-> (top, left, h, w) of the crop, drawn from torch's global RNG exactly as torchvision draws them."""
        area = width * height
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target_area = area * _rand_uniform(scale[0], scale[1])
            aspect = math.exp(_rand_uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)).item())
                left = int(torch.randint(0, width - w + 1, (1,)).item())
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(ratio):  # at least 1 pixel (the docstring)
            w, h = width, max(1, int(round(width / min(ratio))))
        elif in_ratio > max(ratio):
            w, h = max(1, int(round(height * max(ratio)))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img):
        top, left, h, w = self.get_params(*img.size, self.scale, self.ratio)
        return img.crop((left, top, left + w, top + h)).resize((self.size, self.size), self.interpolation)


def random_hflip(img, p=0.5):
    """Mirror left-right with probability p (torch global RNG, as torchvision)."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1).item() < p else img


def adjust_hue(img, hue_factor):
    """Shift the hue by hue_factor in [-0.5, 0.5] of a full turn (torchvision's PIL adjust_hue)."""
    h, s, v = img.convert("HSV").split()
    shifted = (np.asarray(h, dtype=np.int16) + int(hue_factor * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v)).convert("RGB")


class ColorJitter:
    """torchvision's ColorJitter: brightness/contrast/saturation factors ~ U[1 - s, 1 + s], hue ~ U[-hue, hue],
    applied in a random order (torch.randperm(4)); a strength of 0 disables that adjustment."""

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0):
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {hue}")
        for name, s in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if s < 0:  # torchvision refuses it too; 0 disables the adjustment
                raise ValueError(f"{name} jitter must be >= 0 (0 disables it), got {s}")
        self.ranges = [(max(0.0, 1 - s), 1 + s) if s > 0 else None for s in (brightness, contrast, saturation)]
        self.ranges.append((-hue, hue) if hue > 0 else None)

    def __call__(self, img):
        order = torch.randperm(4).tolist()
        factors = [None if r is None else _rand_uniform(*r) for r in self.ranges]
        adjust = (lambda im, f: ImageEnhance.Brightness(im).enhance(f),
                  lambda im, f: ImageEnhance.Contrast(im).enhance(f),
                  lambda im, f: ImageEnhance.Color(im).enhance(f),
                  adjust_hue)
        for i in order:
            if factors[i] is not None:
                img = adjust[i](img, factors[i])
        return img


class PretrainTransform:
    """PIL image -> (3, img_size, img_size) tensor: RandomResizedCrop(min_crop_scale..1, bicubic), flip, color jitter,
    normalize (the BEiT v2 / DTM pre-training augmentation).

    Against the official code (naver-ai/dtm 322df2e utils/datasets.py DataAugmentationForBEiT with the flags of its
    docs/Training.md, torchvision 0.28.0, timm 0.4.12; run beside it on 2026-12-06, 2 photos and 2 synthetic images):
    each step gives the official pixels exactly given the same draws; the jitter on the crop instead of the image
    (module docstring) makes pixels differ by 0.2-0.6 grey levels on average with brightness or saturation alone and
    by 1.2-6.4 with contrast (27.6 for one crop of an image half dark, half bright; 300 draws per image). Over 1000
    draws per image an output's mean moves by 1.1-5.8 grey levels (mean absolute change), its average over the draws
    by at most 0.84, and its std is 0.03-0.7% larger (2.3-2.6% on the half-dark image). The official crop draws from
    Python's `random`, this one from torch's (as torchvision's): other crops for one seed, the same distribution (the
    official one returns an empty crop on some 1- or 2-pixel images). The mean/std are ImageNet's, as the official
    command's --imagenet_default_mean_and_std (its parser's default would be 0.5)."""

    def __init__(self, img_size=224, min_crop_scale=0.08, color_jitter=0.4, hflip=0.5,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.crop = RandomResizedCrop(img_size, scale=(min_crop_scale, 1.0))
        self.jitter = ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter != 0 else None
        self.hflip, self.mean, self.std = hflip, mean, std

    def __call__(self, img):
        check_rgb(img)
        img = random_hflip(self.crop(img), self.hflip)
        if self.jitter is not None:
            img = self.jitter(img)
        return to_tensor(img, self.mean, self.std)


# ----------------------------------------------------------------------------------------------------------------------
# BEiT block-wise masking

class BlockMaskGenerator:
    """BEiT's blockwise masking (BEiT Sec. 2.3, Algorithm 1) with BEiT v2's exact-count fix-up
    (beit2/masking_generator.py, the same in naver-ai/dtm utils/masking_generator.py).

    Repeat until num_masked patches are masked: draw a block area s = rng.uniform(min_block, remaining) (remaining =
    min(num_masked - count, max_block); Python's uniform draws from [remaining, min_block] when remaining is the
    smaller, as in BEiT), aspect r with log r ~ U[log min_aspect, log max_aspect],
    h = round(sqrt(s r)), w = round(sqrt(s / r)) (both smaller than the grid), a uniform position, and accept the
    block if it masks between 1 and `remaining` new patches (10 tries per block, BEiT's `_mask`). The loop cannot
    overshoot; it stops short when 10 tries in a row add nothing (typically when the few remaining patches cannot be
    placed as a block). The fix-up then masks uniformly chosen unmasked patches until the count is exactly
    num_masked, as BEiT v2 does (BEiT v2 would also unmask random patches on an overshoot, which cannot happen here).
    Note that rounding h and w can give a block of slightly fewer than min_block patches (e.g. 2x7 for s=16, r=0.3),
    as in BEiT.

    __call__(rng=None) -> bool tensor (H, W), True = masked, exactly num_masked True. rng: a `random.Random`;
    None uses Python's global `random` (which the trainers' engine.SeededSamples seeds for every sample). With the same
    rng state the blocks are BEiT's; the fix-up draws from rng where BEiT v2 draws from numpy's global RNG
    (np.random.choice), so a mask that needs it (32% of 2000 seeds at 75 of 196 patches, min block 16) gets other,
    equally distributed, extra patches, and later masks drawn from the same rng differ from BEiT v2's. With BEiT v2's
    fix-up drawing random.sample(range(n), k) instead, the masks equal the official generator's (naver-ai/dtm 322df2e
    utils/masking_generator.py, the same file as beit2/masking_generator.py; run beside it on 2026-12-06) for 2000
    to 5000 seeds each at 14x14 (75, 98, 118 masked; min block 4 and 16; max block 40; min aspect 0.5), 7x7, 12x12,
    10x16 and 24x24, and in one chain of 5000 masks from one rng.
    """

    def __init__(self, grid=(14, 14), num_masked=75, min_block=16, max_block=None, min_aspect=0.3, max_aspect=None):
        self.height, self.width = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if not float(num_masked).is_integer():  # a ratio, as MAE's mask ratio
            raise ValueError(f"num_masked={num_masked} is a number of patches, not a ratio: e.g. "
                             f"{round(0.4 * self.height * self.width)} for 40% of the {self.height}x{self.width} grid")
        num_masked = int(num_masked)
        if not 0 <= num_masked <= self.height * self.width:
            raise ValueError(f"num_masked={num_masked} must be between 0 and the {self.height}x{self.width} "
                             f"grid's {self.height * self.width} patches")
        if min_block < 1 or min_aspect <= 0:
            raise ValueError(f"min_block must be >= 1 and min_aspect > 0, got {min_block}, {min_aspect}")
        if max_block is not None and max_block < 1:  # 0 took no block: every patch from the fix-up, scattered
            raise ValueError(f"max_block must be >= 1 patch (None: no cap), got {max_block}")
        if max_aspect is not None and max_aspect < 0:  # failed with "math domain error"
            raise ValueError(f"max_aspect must be > 0, or None or 0 for 1 / min_aspect, got {max_aspect}")
        self.num_masked, self.min_block = num_masked, min_block
        self.max_block = num_masked if max_block is None else max_block
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def sample_block(self, rng, max_patches):
        """One proposal of BEiT's loop -> (top, left, h, w), or None when the block does not fit in the grid."""
        target_area = rng.uniform(self.min_block, max_patches)
        aspect = math.exp(rng.uniform(*self.log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < self.width and h < self.height:
            return rng.randint(0, self.height - h), rng.randint(0, self.width - w), h, w
        return None

    def _add_block(self, mask, rng, max_patches):
        for _ in range(10):
            block = self.sample_block(rng, max_patches)
            if block is not None:
                top, left, h, w = block
                region = mask[top:top + h, left:left + w]
                new = h * w - int(region.sum())
                if 0 < new <= max_patches:
                    region[...] = True
                    return new
        return 0

    def __call__(self, rng=None):
        rng = random if rng is None else rng
        if not isinstance(rng, random.Random) and rng is not random:  # numpy's randint excludes its upper bound
            raise TypeError(f"BlockMaskGenerator needs a random.Random (e.g. random.Random(seed)), got "
                            f"{type(rng).__name__}")
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masked:
            added = self._add_block(mask, rng, min(self.num_masked - count, self.max_block))
            if added == 0:
                break
            count += added
        if count < self.num_masked:  # exact-count fix-up (BEiT v2): uniformly chosen unmasked patches
            free = np.flatnonzero(~mask).tolist()
            mask.flat[rng.sample(free, self.num_masked - count)] = True
        return torch.from_numpy(mask)


class MaskedImageDataset(torch.utils.data.Dataset):
    """Pre-training samples: base[i] must give (PIL image, label) (build the base with transform=None);
    returns (transform(image) (3, H, W), mask (N,) bool with N = grid height * width), labels are dropped."""

    def __init__(self, base, transform, mask_gen):
        self.base, self.transform, self.mask_gen = base, transform, mask_gen

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, _ = self.base[index]
        if not isinstance(img, Image.Image):
            raise TypeError(f"MaskedImageDataset needs a base dataset that returns PIL images, got "
                            f"{type(img).__name__}; construct the base dataset with transform=None")
        return self.transform(img), self.mask_gen().flatten()


# ----------------------------------------------------------------------------------------------------------------------
# Procedural data: shapes x textures with per-pixel masks

SHAPES = ("circle", "square", "triangle", "ring", "cross", "ellipse", "half_disc", "star")
TEXTURES = ("solid", "stripes", "checker", "dots")


def _shape_inside(shape, u, v):
    """Boolean membership of local coordinates (u, v) (units of the shape radius, rotated) in a shape."""
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 1
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":  # equilateral, circumradius 1: three half-planes at distance 0.5
        return (v >= -0.5) & (0.866 * u + 0.5 * v <= 0.5) & (-0.866 * u + 0.5 * v <= 0.5)
    if shape == "ring":
        return (r2 <= 1) & (r2 >= 0.55 ** 2)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))
    if shape == "ellipse":
        return u * u + (v / 0.45) ** 2 <= 1
    if shape == "half_disc":
        return (r2 <= 1) & (v >= 0)
    if shape == "star":  # five-petal polar curve
        return np.sqrt(r2) <= 0.55 + 0.45 * np.cos(5 * np.arctan2(v, u))
    raise ValueError(shape)


def _texture_on(texture, u, v):
    """Where a texture shows its second color, in local coordinates (so textures scale and turn with the shape)."""
    f = 3.0
    if texture == "solid":
        return np.zeros(u.shape, dtype=bool)
    if texture == "stripes":
        return np.sin(2 * np.pi * f * u) > 0
    if texture == "checker":
        return np.sin(np.pi * f * u) * np.sin(np.pi * f * v) > 0
    if texture == "dots":
        return ((f * u) % 1 - 0.5) ** 2 + ((f * v) % 1 - 0.5) ** 2 < 0.09
    raise ValueError(texture)


def _hsv_to_rgb(h, s, v):
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]) * 255


class SyntheticShapes(torch.utils.data.Dataset):
    """Procedural classification/segmentation data, generated on the fly and deterministic per (seed, index).

    Class c is shape SHAPES[c % 8] filled with texture TEXTURES[c // 8] (up to 32 classes); its color is drawn
    around a class hue with wide jitter, so color helps a little and shape/texture decide. Each image has a
    smooth random background with a faint oriented grating and pixel noise, 0-2 small distractor shapes of random
    classes, then one large main shape on top (later shapes overwrite earlier ones in the mask).
    label = the class with the most pixels in the mask (ties: the lower class), normally the main shape's class.

    .get(i) -> (PIL RGB image, label, PIL 'L' mask: 0 background, 1 + class on shape pixels).
    __getitem__(i) -> (transform(image), label) (the PIL image when transform is None).
    """

    MAX_CLASSES, MIN_SIZE = len(SHAPES) * len(TEXTURES), 8

    def __init__(self, num_images, img_size=224, num_classes=10, seed=0, transform=None):
        if not 1 <= num_classes <= self.MAX_CLASSES:
            raise ValueError(f"SyntheticShapes supports 1..{self.MAX_CLASSES} classes, got {num_classes}")
        if img_size < self.MIN_SIZE:
            raise ValueError(f"img_size must be at least {self.MIN_SIZE} pixels, got {img_size}")
        self.num_images, self.img_size, self.num_classes = num_images, img_size, num_classes
        self.seed, self.transform = seed, transform
        self.classes = [f"{TEXTURES[c // len(SHAPES)]}_{SHAPES[c % len(SHAPES)]}" for c in range(num_classes)]
        self.num_seg_classes = num_classes + 1
        coords = np.arange(img_size, dtype=np.float32) + 0.5
        self._yy, self._xx = np.meshgrid(coords, coords, indexing="ij")

    def __len__(self):
        return self.num_images

    def _background(self, rng):
        s = self.img_size
        coarse = rng.uniform(40, 215, size=(4, 4, 3)).astype(np.uint8)
        img = np.array(Image.fromarray(coarse, "RGB").resize((s, s), BICUBIC), dtype=np.float32)
        angle, freq = rng.uniform(0, np.pi), rng.uniform(4, 12) / s
        grating = np.sin((2 * np.pi * freq) * (self._xx * np.cos(angle) + self._yy * np.sin(angle)))
        img += (rng.uniform(5, 20) * grating)[..., None]
        img += rng.standard_normal(img.shape, dtype=np.float32) * 6
        return img

    def _draw(self, img, mask, rng, cls, radius, center):
        """Paint one shape into img (S, S, 3) and mask (S, S), only inside its bounding box."""
        theta = rng.uniform(0, 2 * np.pi)
        hue = (cls * 0.618034 + rng.uniform(-0.25, 0.25)) % 1.0
        color = _hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
        second = color * rng.uniform(0.2, 0.45)
        reach = 1.2 * radius  # every shape lies within 1.2 radii of its center
        y0, y1 = (int(np.clip(c, 0, self.img_size)) for c in (center[1] - reach, center[1] + reach + 1))
        x0, x1 = (int(np.clip(c, 0, self.img_size)) for c in (center[0] - reach, center[0] + reach + 1))
        if y0 >= y1 or x0 >= x1:
            return
        dx, dy = self._xx[y0:y1, x0:x1] - center[0], self._yy[y0:y1, x0:x1] - center[1]
        u = (np.cos(theta) * dx + np.sin(theta) * dy) / radius
        v = (-np.sin(theta) * dx + np.cos(theta) * dy) / radius
        inside = _shape_inside(SHAPES[cls % len(SHAPES)], u, v)
        on = _texture_on(TEXTURES[cls // len(SHAPES)], u, v)
        img[y0:y1, x0:x1][inside] = np.where(on[inside, None], second, color)
        mask[y0:y1, x0:x1][inside] = cls + 1

    def get(self, index):
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for SyntheticShapes of {self.num_images} images")
        rng = np.random.default_rng([self.seed, index])
        s = self.img_size
        img = self._background(rng)
        mask = np.zeros((s, s), dtype=np.uint8)
        for _ in range(rng.integers(0, 3)):  # distractors
            cls = int(rng.integers(self.num_classes))
            self._draw(img, mask, rng, cls, rng.uniform(0.08, 0.16) * s, rng.uniform(0, s, size=2))
        main = int(rng.integers(self.num_classes))
        self._draw(img, mask, rng, main, rng.uniform(0.22, 0.36) * s, rng.uniform(0.3 * s, 0.7 * s, size=2))
        counts = np.bincount(mask.ravel(), minlength=self.num_classes + 1)[1:]
        label = int(np.argmax(counts))
        img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
        return img, label, Image.fromarray(mask, "L")

    def __getitem__(self, index):
        img, label, _ = self.get(index)
        return (self.transform(img) if self.transform is not None else img), label


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning: RandAugment (timm 'rand-m9-mstd0.5-inc1'), RandomErasing, train/eval transforms, Mixup/CutMix

_LEVEL_MAX = 10.0


def _negate(v):
    return -v if random.random() > 0.5 else v


def _affine(img, matrix, fill):
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=BICUBIC, fillcolor=fill)


def solarize_add(img, add, threshold=128):
    """Add `add` to every pixel value below threshold (clipped at 255), leave the others."""
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def posterize(img, bits):
    """Keep the `bits` most significant bits (timm's posterize, auto_augment.py:153 at 0.4.12): 8 or more leave the
    image as is; 0 makes it black, as ImageOps.posterize did in the Pillow of timm 0.4.12's time (mask ~(2**8 - 1));
    today's Pillow refuses 0."""
    if bits >= 8:
        return img
    return img.point([0] * 256 * len(img.getbands())) if bits <= 0 else ImageOps.posterize(img, bits)


def _enhance_level(m):  # timm's original: 0.1 (level 0) .. 1.9 (level 10)
    return m / _LEVEL_MAX * 1.8 + 0.1


def _enhance_increasing(m):  # 1 +- 0.9 * level / 10: stronger either way as the level grows
    return 1.0 + _negate(m / _LEVEL_MAX * 0.9)


# name -> (op(img, arg, fill), level -> arg). Levels in [0, 10] (timm 0.4.12 timm/data/auto_augment.py:175-257, :260);
# the "increasing" variants grow stronger with level, the others are timm's original ones.
RAND_AUGMENT_OPS = {
    "AutoContrast": (lambda img, _, fill: ImageOps.autocontrast(img), lambda m: None),
    "Equalize": (lambda img, _, fill: ImageOps.equalize(img), lambda m: None),
    "Invert": (lambda img, _, fill: ImageOps.invert(img), lambda m: None),
    "Rotate": (lambda img, deg, fill: img.rotate(deg, resample=BICUBIC, fillcolor=fill),
               lambda m: _negate(m / _LEVEL_MAX * 30.0)),
    "Posterize": (lambda img, bits, fill: posterize(img, bits), lambda m: int(m / _LEVEL_MAX * 4)),
    "PosterizeIncreasing": (lambda img, bits, fill: posterize(img, bits), lambda m: 4 - int(m / _LEVEL_MAX * 4)),
    "Solarize": (lambda img, thresh, fill: ImageOps.solarize(img, thresh), lambda m: int(m / _LEVEL_MAX * 256)),
    "SolarizeIncreasing": (lambda img, thresh, fill: ImageOps.solarize(img, thresh),
                           lambda m: 256 - int(m / _LEVEL_MAX * 256)),
    "SolarizeAdd": (lambda img, add, fill: solarize_add(img, add), lambda m: int(m / _LEVEL_MAX * 110)),
    "Color": (lambda img, f, fill: ImageEnhance.Color(img).enhance(f), _enhance_level),
    "ColorIncreasing": (lambda img, f, fill: ImageEnhance.Color(img).enhance(f), _enhance_increasing),
    "Contrast": (lambda img, f, fill: ImageEnhance.Contrast(img).enhance(f), _enhance_level),
    "ContrastIncreasing": (lambda img, f, fill: ImageEnhance.Contrast(img).enhance(f), _enhance_increasing),
    "Brightness": (lambda img, f, fill: ImageEnhance.Brightness(img).enhance(f), _enhance_level),
    "BrightnessIncreasing": (lambda img, f, fill: ImageEnhance.Brightness(img).enhance(f), _enhance_increasing),
    "Sharpness": (lambda img, f, fill: ImageEnhance.Sharpness(img).enhance(f), _enhance_level),
    "SharpnessIncreasing": (lambda img, f, fill: ImageEnhance.Sharpness(img).enhance(f), _enhance_increasing),
    "ShearX": (lambda img, f, fill: _affine(img, (1, f, 0, 0, 1, 0), fill), lambda m: _negate(m / _LEVEL_MAX * 0.3)),
    "ShearY": (lambda img, f, fill: _affine(img, (1, 0, 0, f, 1, 0), fill), lambda m: _negate(m / _LEVEL_MAX * 0.3)),
    "TranslateXRel": (lambda img, p, fill: _affine(img, (1, 0, p * img.size[0], 0, 1, 0), fill),
                      lambda m: _negate(m / _LEVEL_MAX * 0.45)),
    "TranslateYRel": (lambda img, p, fill: _affine(img, (1, 0, 0, 0, 1, p * img.size[1]), fill),
                      lambda m: _negate(m / _LEVEL_MAX * 0.45)),
}
# timm's two op lists, in its order (which the random choice of ops depends on): 'inc1' and without it
# (auto_augment.py:562 _RAND_INCREASING_TRANSFORMS, :542 _RAND_TRANSFORMS at timm 0.4.12)
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_OPS = tuple(name.replace("Increasing", "") for name in RAND_INCREASING_OPS)


class RandAugment:
    """timm's RandAugment ('rand-m{magnitude}-mstd{magnitude_std}-inc1'; ops=RAND_OPS without inc1): pick num_ops
    ops uniformly with replacement; each is applied with probability op_prob at magnitude ~ N(magnitude,
    magnitude_std) clipped to [0, 10] (magnitude_std inf: ~ U[0, magnitude], as timm 0.4.12's AugmentOp).
    Geometric ops use bicubic resampling and fill with the mean color. Python's `random` drives it; timm picks the
    ops from numpy's (np.random.choice): the same distribution from another stream, each op's draws then as timm's."""

    def __init__(self, num_ops=2, magnitude=9, magnitude_std=0.5, op_prob=0.5, ops=RAND_INCREASING_OPS,
                 fill_mean=IMAGENET_MEAN):
        unknown = [o for o in ops if o not in RAND_AUGMENT_OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {sorted(RAND_AUGMENT_OPS)}")
        self.num_ops, self.magnitude, self.magnitude_std, self.op_prob = num_ops, magnitude, magnitude_std, op_prob
        self.ops = list(ops)
        self.fill = tuple(int(round(255 * m)) for m in fill_mean)

    def apply_op(self, img, name, magnitude):
        """Apply one op at a given magnitude (the level -> argument mapping may still draw a random sign)."""
        op, level_to_arg = RAND_AUGMENT_OPS[name]
        return op(img, level_to_arg(magnitude), self.fill)

    def __call__(self, img):
        check_rgb(img)  # the ops' fill colour is RGB
        for name in random.choices(self.ops, k=self.num_ops):
            if self.op_prob < 1.0 and random.random() > self.op_prob:
                continue
            m = self.magnitude
            if self.magnitude_std == math.inf:  # timm's uniform sampling; N(m, inf) would give only 0 and 10
                m = random.uniform(0, self.magnitude)
            elif self.magnitude_std > 0:
                m = random.gauss(self.magnitude, self.magnitude_std)
            img = self.apply_op(img, name, max(0.0, min(_LEVEL_MAX, m)))
        return img


class RandomErasing:
    """timm's RandomErasing on a normalized (C, H, W) tensor: with probability `prob`, erase one rectangle of area
    U[min_area, max_area] * H * W and log-aspect U[log min_aspect, log max_aspect] (10 tries) with per-pixel N(0, 1)
    noise (mode 'pixel'), per-channel noise ('rand') or zeros ('const'). Returns a new tensor where a box is erased,
    else x itself."""

    def __init__(self, prob=0.25, mode="pixel", min_area=0.02, max_area=1 / 3, min_aspect=0.3, max_aspect=None):
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"RandomErasing mode must be 'pixel', 'rand' or 'const', got {mode!r}")
        self.prob, self.mode, self.min_area, self.max_area = prob, mode, min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))

    def get_params(self, height, width):
        """-> (top, left, h, w) of the erased box, or None (not applied / nothing fitted)."""
        if random.random() > self.prob:
            return None
        for _ in range(10):
            target_area = random.uniform(self.min_area, self.max_area) * height * width
            aspect = math.exp(random.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                return random.randint(0, height - h), random.randint(0, width - w), h, w
        return None

    def __call__(self, x):
        if x.dim() != 3:
            raise ValueError(f"RandomErasing takes one image (C, H, W), got {tuple(x.shape)}: for a batch call it on "
                             f"each image (each gets its own box)")
        box = self.get_params(*x.shape[-2:])
        if box is None:
            return x
        top, left, h, w = box
        x = x.clone()
        shape = {"pixel": (x.shape[0], h, w), "rand": (x.shape[0], 1, 1), "const": None}[self.mode]
        x[:, top:top + h, left:left + w] = 0.0 if shape is None else torch.randn(shape, dtype=x.dtype)
        return x


class FinetuneTransform:
    """Fine-tuning train augmentation (timm's create_transform as used by BEiT v2 / MAE fine-tuning):
    RandomResizedCrop(min_crop_scale..1, bicubic) -> flip -> RandAugment -> normalize -> RandomErasing. The crop draws
    from torch's RNG (as torchvision's, and pre-training's); timm's RandomResizedCropAndInterpolation draws the same
    distribution from Python's `random`."""

    def __init__(self, img_size=224, min_crop_scale=0.08, hflip=0.5, rand_magnitude=9, rand_magnitude_std=0.5,
                 rand_num_ops=2, rand_increasing=True, reprob=0.25, remode="pixel", mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        self.crop = RandomResizedCrop(img_size, scale=(min_crop_scale, 1.0))
        ops = RAND_INCREASING_OPS if rand_increasing else RAND_OPS
        self.rand_augment = (RandAugment(rand_num_ops, rand_magnitude, rand_magnitude_std, ops=ops, fill_mean=mean)
                             if rand_num_ops > 0 else None)
        self.erase = RandomErasing(reprob, remode) if reprob > 0 else None
        self.hflip, self.mean, self.std = hflip, mean, std

    def __call__(self, img):
        check_rgb(img)
        img = random_hflip(self.crop(img), self.hflip)
        if self.rand_augment is not None:
            img = self.rand_augment(img)
        x = to_tensor(img, self.mean, self.std)
        return self.erase(x) if self.erase is not None else x


def resize_shorter_side(img, size, resample=BICUBIC):
    """Resize so that the shorter side is `size`, keeping the aspect ratio (torchvision's Resize(int))."""
    w, h = img.size
    if w <= h:
        return img.resize((size, int(size * h / w)), resample)
    return img.resize((int(size * w / h), size), resample)


def center_crop(img, size):
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class EvalTransform:
    """Evaluation: resize the shorter side to int(img_size / crop_ratio) (224 / 0.875 = 256), bicubic, center crop
    img_size, normalize."""

    def __init__(self, img_size=224, crop_ratio=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1] (crop size / resize size), got {crop_ratio}")
        self.img_size, self.resize_size = img_size, int(img_size / crop_ratio)
        self.mean, self.std = mean, std

    def __call__(self, img):
        check_rgb(img)
        img = center_crop(resize_shorter_side(img, self.resize_size), self.img_size)
        return to_tensor(img, self.mean, self.std)


def smooth_one_hot(labels, num_classes, smoothing=0.0):
    """(B,) int labels -> (B, num_classes) soft targets: 1 - smoothing + smoothing/K on the label, smoothing/K off."""
    off = smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return target.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(height, width, lam):
    """timm's rand_bbox: a box of side sqrt(1 - lam) * (H, W), each side rounded down to even (cy -/+ cut_h // 2),
    centred uniformly, clipped to the image
    -> (y0, y1, x0, x1) and the corrected lam = 1 - box area / image area."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = random.randrange(height), random.randrange(width)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


class Mixup:
    """Mixup / CutMix per batch with label smoothing (timm's Mixup, mode 'batch', correct_lam=True).

    With probability `prob` the batch is mixed with its reverse (sample b with sample B-1-b): CutMix with
    probability switch_prob (lam ~ Beta(cutmix_alpha, cutmix_alpha), a box pasted from the reversed batch, lam
    corrected to the box's exact area), Mixup otherwise (lam ~ Beta(mixup_alpha, mixup_alpha), x = lam x + (1-lam)
    x_rev). Targets: lam * smooth_one_hot(y) + (1 - lam) * smooth_one_hot(y_rev). An alpha of 0 disables that mode.
    __call__(images (B, C, H, W), labels (B,)) -> (mixed images, soft targets (B, num_classes)); inputs untouched.
    """

    def __init__(self, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1,
                 num_classes=1000):
        self.mixup_alpha, self.cutmix_alpha, self.prob, self.switch_prob = mixup_alpha, cutmix_alpha, prob, switch_prob
        self.label_smoothing, self.num_classes = label_smoothing, num_classes

    @property
    def mixes(self) -> bool:
        """Whether a batch can be mixed at all (an alpha > 0 and prob > 0); then its size must be even."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    @staticmethod
    def _check(images, labels):
        """A clear error for images not (B, C, H, W) (channels last: CutMix's box would span width and channels) and for
        labels not (B,)."""
        channels_last = images.dim() == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3)
        if images.dim() != 4 or channels_last:
            raise ValueError(f"Mixup takes images (B, C, H, W), channels first, got {tuple(images.shape)}"
                             + (": pass images.permute(0, 3, 1, 2)" if channels_last else "")
                             + ("; one image? Mixup mixes the images of a batch" if images.dim() == 3 else ""))
        if labels.shape != images.shape[:1]:
            raise ValueError(f"Mixup takes labels (B,) = {tuple(images.shape[:1])}, one class index per image, got "
                             f"{tuple(labels.shape)}" + ("; one-hot labels? pass labels.argmax(1)" if labels.dim() == 2
                                                         and labels.shape[0] == images.shape[0] else ""))

    def sample_params(self):
        """-> (lam, use_cutmix) for one batch, from Python's `random`."""
        if (self.mixup_alpha <= 0 and self.cutmix_alpha <= 0) or random.random() >= self.prob:
            return 1.0, False
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or random.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return random.betavariate(alpha, alpha), use_cutmix

    def __call__(self, images, labels):
        self._check(images, labels)
        if self.mixes and images.shape[0] % 2:  # as timm's Mixup, which asserts an even batch
            raise ValueError(f"Mixup/CutMix got an odd batch of {images.shape[0]}: each image is paired with the "
                             f"reversed batch's, so the middle one would never be mixed; use an even batch size "
                             f"(or turn mixing off: mixup_alpha = cutmix_alpha = 0)")
        lam, use_cutmix = self.sample_params()
        if lam < 1.0:
            reversed_images = images.flip(0)
            if use_cutmix:
                (y0, y1, x0, x1), lam = cutmix_box(images.shape[-2], images.shape[-1], lam)
                images = images.clone()
                images[..., y0:y1, x0:x1] = reversed_images[..., y0:y1, x0:x1]
            else:
                images = images * lam + reversed_images * (1.0 - lam)
        target = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        return images, target * lam + target.flip(0) * (1.0 - lam)


# ----------------------------------------------------------------------------------------------------------------------
# Segmentation: ADE20K / image-mask folders, mmseg-style joint transforms (Python `random`)

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock",
    "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers",
    "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway",
    "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag")


def reduce_zero_label(label_map):
    """mmseg's reduce_zero_label on a uint8 (H, W) array: 0 (ADE20K's 'other') -> 255 (ignore), k -> k - 1,
    255 stays 255."""
    out = label_map.astype(np.int16) - 1
    out[(label_map == 0) | (label_map == 255)] = IGNORE_INDEX
    return out.astype(np.uint8)


def _files_by_stem(folder, suffix):
    """{stem: file name} of the files in folder ending in suffix (any case), hidden ones skipped; two files of one
    stem (a.jpg and a.JPG) are an error, since only one of them could be paired."""
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(suffix.lower()) and not f.startswith("."))
    by_stem = {}
    for f in files:
        stem = f[:-len(suffix)]
        if stem in by_stem:
            raise ValueError(f"{folder!r} holds both {by_stem[stem]!r} and {f!r}: one stem, two files; rename or "
                             f"remove one")
        by_stem[stem] = f
    return by_stem


EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a camera held the picture (1 = as stored)
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                  5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                  8: Image.Transpose.ROTATE_90}  # the EXIF standard's orientations 2..8 (as ImageOps.exif_transpose)


def upright(img):
    """The image as viewers show it: its EXIF orientation (a rotation and/or flip) applied; else the image itself.

    Segmentation only: masks are drawn on the upright photo, and mmseg's loader (mmcv, `color_type='color'`, which
    BEiT's ADE20K config uses) decodes with OpenCV's IMREAD_COLOR, which applies the tag. The classification loaders
    (here and torchvision's) keep the stored pixels."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 -- a damaged EXIF block (Pillow raises SyntaxError, struct.error, ...): the
        return img  # pixels decoded fine: used as stored
    # the pixels alone: ImageOps.exif_transpose also rewrites the EXIF block, which can fail on a file's other tags
    # (a tag of an unexpected type, test_data.py) after the orientation was read fine
    method = EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return img if method is None else img.transpose(method)


class SegFolder(torch.utils.data.Dataset):
    """Images in img_dir paired by file stem with label PNGs in ann_dir (pixel value = class index).

    __getitem__ -> transform(PIL RGB image, PIL 'L' mask) (the pair itself when transform is None); the mask has
    reduce_zero_label applied first when asked, the image its EXIF orientation (upright). Missing pairs fail at
    construction; a size mismatch, or (given num_classes) a label value outside 0..num_classes-1 and 255, fails when
    that pair is loaded, naming the file.
    """
    suffix_hint = "pass the images' suffix (train_seg.py: --img_suffix)"  # the fixes that errors name, per layout
    suffixes_hint = "pass the endings as the suffixes (train_seg.py: --img_suffix and --ann_suffix)"
    label_hint = "check --num_classes and --reduce_zero_label"

    def __init__(self, img_dir, ann_dir, transform=None, img_suffix=".jpg", ann_suffix=".png",
                 reduce_zero_label=False, classes=None, num_classes=None):
        for kind, d in (("image", img_dir), ("annotation", ann_dir)):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"{kind} folder {d!r} does not exist; expected images in img_dir/<name>"
                                        f"{img_suffix} and label maps in ann_dir/<name>{ann_suffix}")
        images, annotations = _files_by_stem(img_dir, img_suffix), _files_by_stem(ann_dir, ann_suffix)
        if not images:
            found = sorted({os.path.splitext(f)[1] for f in os.listdir(img_dir) if not f.startswith(".")} - {""})
            hint = f"; it holds {', '.join(found)} files: {self.suffix_hint}" if found else ""
            folders = sorted(e.name for e in os.scandir(img_dir) if e.is_dir() and not e.name.startswith("."))
            if folders:
                hint += (f"; it holds folders ({', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''}), which "
                         f"are not read: the images and label maps must sit directly in img_dir and ann_dir")
            raise FileNotFoundError(f"no '*{img_suffix}' images in {img_dir!r}{hint}")
        for missing, have, where in ((images.keys() - annotations.keys(), "images", ann_dir),
                                     (annotations.keys() - images.keys(), "annotations", img_dir)):
            if missing:
                names = sorted(missing)
                # no name in common: the names likely differ by an ending that belongs in the suffixes; no
                # annotation at all: a folder of other files, or of subfolders, which no suffix would pair
                endings = "" if images.keys() & annotations.keys() else (
                    f"; {ann_dir!r} holds no file ending in {ann_suffix} (the label maps must sit directly in "
                    f"it)" if not annotations else
                    f"; no name has a counterpart: if the names differ by an ending (Cityscapes' "
                    f"<name>_leftImg8bit.png and <name>_gtFine_labelTrainIds.png), {self.suffixes_hint}")
                raise FileNotFoundError(f"{len(names)} {have} have no counterpart in {where!r}: "
                                        f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; every image "
                                        f"<name>{img_suffix} needs an annotation <name>{ann_suffix} and vice "
                                        f"versa{endings}")
        self.img_dir, self.ann_dir, self.transform = img_dir, ann_dir, transform
        self.reduce_zero_label, self.classes = reduce_zero_label, classes
        self.num_classes = len(classes) if num_classes is None and classes is not None else num_classes
        self.samples = [(os.path.join(img_dir, images[n]), os.path.join(ann_dir, annotations[n]))
                        for n in sorted(images)]

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        """-> (PIL RGB image, PIL 'L' mask) with reduce_zero_label applied when asked."""
        img_path, ann_path = self.samples[index]
        img, labels = upright(load_image(img_path)), load_label_map(ann_path)
        if img.size != (labels.shape[1], labels.shape[0]):  # a pair that cannot be used: skipped in training
            raise UnreadableImage(f"image {img_path!r} is {img.size[0]}x{img.size[1]} (upright: its EXIF orientation "
                                  f"applied) but its annotation {ann_path!r} is {labels.shape[1]}x{labels.shape[0]}; "
                                  f"they must have the same size", img_path)
        if self.reduce_zero_label:
            labels = reduce_zero_label(labels)
        if self.num_classes is not None:
            bad = np.unique(labels[(labels >= self.num_classes) & (labels != IGNORE_INDEX)])
            if bad.size:  # named as the file holds them: k + 1 where reduce_zero_label made them k
                allowed = (f"1..{self.num_classes} (0 and {IGNORE_INDEX} ignored, the rest read as 0.."
                           f"{self.num_classes - 1})" if self.reduce_zero_label else
                           f"0..{self.num_classes - 1} ({self.num_classes} classes) and {IGNORE_INDEX} (ignore)")
                values = (bad[:5].astype(int) + self.reduce_zero_label).tolist()
                raise ValueError(f"annotation {ann_path!r} holds label values {values}, outside {allowed}; "
                                 f"{self.label_hint}")
        return img, Image.fromarray(labels, "L")

    def __getitem__(self, index):
        img, mask = self.load(index)
        return self.transform(img, mask) if self.transform is not None else (img, mask)


class ADE20KDataset(SegFolder):
    """ADE20K (ADEChallengeData2016): root/images/{split}/*.jpg with root/annotations/{split}/*.png, 150 classes,
    label 0 ('other') ignored via reduce_zero_label -> training labels 0..149 and 255 = ignore."""
    GENERIC = "train_seg.py's generic folders (--img_dir, --ann_dir, --val_img_dir, --val_ann_dir instead of --data)"
    suffix_hint = f"ADE20K's images are .jpg; for other files use {GENERIC} with --img_suffix"
    suffixes_hint = (f"ADE20K's files are <name>.jpg and <name>.png; for other names use {GENERIC} with the endings "
                     f"as --img_suffix and --ann_suffix")
    label_hint = (f"not an ADE20K label map (values 0..150, 0 = other); for other labels use {GENERIC} with "
                  f"--num_classes")

    def __init__(self, root, split="training", transform=None):
        if split not in ("training", "validation"):
            raise ValueError(f"ADE20K split must be 'training' or 'validation', got {split!r}")
        img_dir, ann_dir = _ade20k_dirs(root, split)
        if not os.path.isdir(img_dir) or not os.path.isdir(ann_dir):
            inside = _ade20k_folder_inside(root, split)
            raise FileNotFoundError(f"{root!r} is not an ADE20K folder: expected {img_dir!r} and {ann_dir!r} "
                                    "(the ADEChallengeData2016 layout: images/{training,validation}/*.jpg and "
                                    "annotations/{training,validation}/*.png)"
                                    + (f"; it holds one: pass --data {shlex.quote(inside)}" if inside else ""))
        super().__init__(img_dir, ann_dir, transform, ".jpg", ".png", reduce_zero_label=True, classes=ADE20K_CLASSES)


def _ade20k_dirs(root: str, split: str) -> tuple:
    """ADE20K's (images, annotations) folders of a split under root."""
    return os.path.join(root, "images", split), os.path.join(root, "annotations", split)


def _ade20k_folder_inside(root: str, split: str):
    """A folder directly in root that has ADE20K's folders of the split (--data given the folder the download was
    unpacked into), or None."""
    if not os.path.isdir(root):
        return None
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and all(map(os.path.isdir, _ade20k_dirs(entry.path, split))):
            return entry.path
    return None


CV2_LINEAR = "cv2_linear"  # image_resample: cv2.resize's INTER_LINEAR, mmcv's default for images (resize_cv2_linear)


def resize_cv2_linear(img, size):
    """PIL RGB image -> size (w, h) as cv2.resize(INTER_LINEAR) does, the resize of mmcv (imrescale) and so of mmseg:
    bilinear with pixel centers at +0.5 and no antialiasing. PIL's BILINEAR widens its filter when it shrinks, a
    blur mmseg's images do not have (on uniform uint8 noise halved, 300x200 to 640x480, its pixels differ from
    cv2's by 15 grey levels on average; these by at most 1, cv2 rounding 11-bit fixed-point weights: OpenCV 5.0.0
    and 5.1.0, 6 sizes up and down). On one torch thread: with more, F.interpolate rounds some values otherwise (by
    one grey level after rounding), and a DataLoader worker has one, so --num_workers 0 would train on other pixels."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        y = F.interpolate(x, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=False)
    finally:
        torch.set_num_threads(threads)
    return Image.fromarray(y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy(), "RGB")


CV2_NEAREST = "cv2_nearest"  # cv2.resize's INTER_NEAREST, mmcv's 'nearest': how mmseg resizes labels


def resize_cv2_nearest(img, size):
    """PIL image (any mode) -> size (w, h) as cv2.resize(INTER_NEAREST) does, mmcv's imrescale(interpolation=
    'nearest') and so mmseg's resize of the labels: output pixel x reads source pixel floor(x * (1 / (w / W))),
    in doubles, as OpenCV's resizeNN. PIL's NEAREST reads the pixel under the output pixel's center instead,
    floor((x + 0.5) * W / w): up to one source pixel apart."""
    (W, H), (w, h) = img.size, size
    cols = np.minimum(np.floor(np.arange(w) * (1.0 / (w / W))).astype(np.int64), W - 1)
    rows = np.minimum(np.floor(np.arange(h) * (1.0 / (h / H))).astype(np.int64), H - 1)
    picked = np.asarray(img)[rows[:, None], cols[None, :]]
    # the modes whose arrays fromarray reads back only by their dtype: "1" would take the bools for packed bits (a
    # mode '1' label map lost its class-1 pixels), "I;16" is refused
    return Image.fromarray(picked) if img.mode in ("1", "I;16") else Image.fromarray(picked, img.mode)


def seg_random_resize(img, mask, scale=(2048, 512), ratio_range=(0.5, 2.0), resample=CV2_LINEAR):
    """mmseg Resize(img_scale=scale, ratio_range, keep_ratio=True): target scale = scale * U[ratio_range], then
    rescale by min(long_target / long_side, short_target / short_side). The mask: resize_cv2_nearest."""
    ratio = random.uniform(*ratio_range)
    return seg_rescale(img, mask, (int(scale[0] * ratio), int(scale[1] * ratio)), resample)


def seg_rescale(img, mask, scale, resample=CV2_LINEAR):
    """mmcv imrescale: keep the aspect ratio, fit within (long edge max(scale), short edge min(scale)). The image
    with resample (CV2_LINEAR, CV2_NEAREST or a PIL filter), the mask with cv2's nearest neighbour, as mmcv's
    'nearest' (resize_cv2_nearest)."""
    w, h = img.size
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    size = (max(1, int(w * factor + 0.5)), max(1, int(h * factor + 0.5)))  # a side of 0 (a tiny --scale): 1 pixel
    resize = {CV2_LINEAR: resize_cv2_linear, CV2_NEAREST: resize_cv2_nearest}.get(resample)
    img = resize(img, size) if resize is not None else img.resize(size, resample)
    return img, (resize_cv2_nearest(mask, size) if mask is not None else None)


def crop_box_ok(mask_crop, cat_max_ratio, ignore_index=IGNORE_INDEX):
    """mmseg's cat_max_ratio test: at least 2 classes (ignore excluded) and none covering >= cat_max_ratio."""
    counts = np.bincount(np.asarray(mask_crop).ravel(), minlength=256)
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def seg_random_crop(img, mask, crop_size=(512, 512), cat_max_ratio=0.75, ignore_index=IGNORE_INDEX):
    """mmseg RandomCrop: a uniform crop (clipped to the image when it is smaller); with cat_max_ratio < 1, redraw up
    to 10 times until crop_box_ok, keeping the last draw if none passes (as mmseg)."""
    w, h = img.size

    def draw():
        top, left = random.randint(0, max(h - crop_size[0], 0)), random.randint(0, max(w - crop_size[1], 0))
        return left, top, min(left + crop_size[1], w), min(top + crop_size[0], h)

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            if crop_box_ok(mask.crop(box), cat_max_ratio, ignore_index):
                break
            box = draw()
    return img.crop(box), mask.crop(box)


def photometric_distortion(img, brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                           hue_delta=18):
    """mmseg PhotoMetricDistortion, each step with probability 1/2: brightness (add U[-32, 32]), contrast (multiply
    by U[0.5, 1.5], before or after the rest), saturation (scale S of HSV), hue (shift by an integer of
    [-18, 17] OpenCV hue units, 180 per turn; PIL's HSV has 256 per turn, so the shift is scaled by 256/180).
    [-18, 17], not [-18, 18]: mmseg (mmseg/datasets/pipelines/transforms.py, PhotoMetricDistortion.hue) draws
    numpy's randint(-hue_delta, hue_delta), whose upper bound is excluded. Saturation and hue go through PIL's HSV,
    not cv2's, which rounds otherwise: with the same draws the images differ from mmseg's by 0.5-1.1 grey levels on
    average per step (at most 11), also where a step changes nothing (factor 1, shift 0), against the 9-19 the steps
    change (factors 0.8 to 1.5, shifts -18 to 17, on 96-px images of data.SyntheticShapes); on uniform noise by up to
    14, and after both steps and a contrast by up to 19 (mmseg 1.2.2 run beside it, OpenCV 5.1.0). Brightness and
    contrast alone give mmseg's pixels exactly."""
    x = np.asarray(img, dtype=np.float32)

    def clip(a):
        return np.clip(a, 0, 255).astype(np.uint8).astype(np.float32)  # mmseg rounds to uint8 after each step

    if random.randint(0, 1):
        x = clip(x + random.uniform(-brightness_delta, brightness_delta))
    contrast_last = random.randint(0, 1) == 0
    if not contrast_last and random.randint(0, 1):
        x = clip(x * random.uniform(*contrast_range))
    if random.randint(0, 1):
        hsv = np.array(Image.fromarray(x.astype(np.uint8), "RGB").convert("HSV"), dtype=np.float32)
        hsv[..., 1] = clip(hsv[..., 1] * random.uniform(*saturation_range))
        x = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), dtype=np.float32)
    if random.randint(0, 1):
        hsv = np.array(Image.fromarray(x.astype(np.uint8), "RGB").convert("HSV"), dtype=np.int32)
        hsv[..., 0] = (hsv[..., 0] + int(round(random.randint(-hue_delta, hue_delta - 1) * 256 / 180))) % 256
        x = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), dtype=np.float32)
    if contrast_last and random.randint(0, 1):
        x = clip(x * random.uniform(*contrast_range))
    return Image.fromarray(x.astype(np.uint8), "RGB")


def check_label_map(mask):
    """The segmentation transforms take 8-bit label maps (mode 'L' or 'P'; '1' reads as 0/1): a clear error for
    anything else. One channel is not enough: 32-bit, 16-bit and float maps ('I', 'I;16', 'F') failed inside numpy
    or Pillow when cropped, and evaluation truncated float labels."""
    if not isinstance(mask, Image.Image) or mask.mode not in ("1", "L", "P"):
        got = f"a PIL image of mode {mask.mode!r}" if isinstance(mask, Image.Image) else type(mask).__name__
        raise ValueError(f"the label map must be a one-channel PIL image (mode 'L' or 'P', a class index per "
                         f"pixel: PIL.Image.fromarray(uint8_array)), got {got}")


def _mask_tensor(mask):
    return torch.from_numpy(np.array(mask, dtype=np.int64))


class SegTrainTransform:
    """mmseg ADE20K training pipeline on (PIL image, PIL 'L' mask) -> (image (3, h, w) float, mask (h, w) int64),
    (h, w) = crop_size (an int c: (c, c)):
    random resize (ratio_range of scale, keep ratio) -> random crop (cat_max_ratio) -> horizontal flip ->
    photometric distortion -> normalize -> pad bottom/right to crop_size with 0 (image, after normalization, as
    mmseg) and ignore_index (mask). `image_resample` is cv2's bilinear as mmseg's (CV2_LINEAR), cv2's nearest
    (CV2_NEAREST) or a PIL filter; masks are always resized with cv2's nearest neighbour, as mmseg's."""

    def __init__(self, crop_size=512, scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, flip_prob=0.5,
                 photometric=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, ignore_index=IGNORE_INDEX,
                 image_resample=CV2_LINEAR):
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.scale, self.ratio_range, self.cat_max_ratio = scale, ratio_range, cat_max_ratio
        self.flip_prob, self.photometric, self.mean, self.std = flip_prob, photometric, mean, std
        self.ignore_index, self.image_resample = ignore_index, image_resample

    def __call__(self, img, mask):
        check_rgb(img)
        check_label_map(mask)
        if img.size != mask.size:
            raise ValueError(f"image size {img.size} and mask size {mask.size} differ")
        img, mask = seg_random_resize(img, mask, self.scale, self.ratio_range, self.image_resample)
        img, mask = seg_random_crop(img, mask, self.crop_size, self.cat_max_ratio, self.ignore_index)
        if random.random() < self.flip_prob:
            img, mask = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.photometric:
            img = photometric_distortion(img)
        x, y = to_tensor(img, self.mean, self.std), _mask_tensor(mask)
        ch, cw = self.crop_size
        padded_x = torch.zeros(3, ch, cw)
        padded_y = torch.full((ch, cw), self.ignore_index, dtype=torch.int64)
        padded_x[:, :x.shape[1], :x.shape[2]] = x
        padded_y[:y.shape[0], :y.shape[1]] = y
        return padded_x, padded_y


class SegEvalTransform:
    """mmseg ADE20K test pipeline: the image is rescaled (keep ratio) to fit `scale` (2048, 512), cv2's bilinear, and
    normalized; the mask stays at its original size (predictions are resized back to it for mIoU).
    -> (image (3, h, w) float, mask (H, W) int64)."""

    def __init__(self, scale=(2048, 512), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.scale, self.mean, self.std = scale, mean, std

    def __call__(self, img, mask):
        check_rgb(img)
        check_label_map(mask)
        img, _ = seg_rescale(img, None, self.scale)
        return to_tensor(img, self.mean, self.std), _mask_tensor(mask)


class ShapesSegmentation(torch.utils.data.Dataset):
    """SyntheticShapes as a segmentation dataset: num_classes = shapes.num_seg_classes (0 = background is a real
    class). __getitem__ -> transform(image, mask), or (normalized image (3, S, S), mask (S, S) int64)."""

    def __init__(self, shapes, transform=None):
        self.shapes, self.transform = shapes, transform
        self.num_classes = shapes.num_seg_classes
        self.classes = ["background"] + list(shapes.classes)

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, index):
        img, _, mask = self.shapes.get(index)
        if self.transform is not None:
            return self.transform(img, mask)
        return to_tensor(img), _mask_tensor(mask)
