"""Tests for data.py: masking, datasets, augmentations, Mixup/CutMix, segmentation transforms (CPU, seconds)."""
import math
import os
import random
import re
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

import data


# ---------------------------------------------------------------------------------------------------------------------
# Block masking

def beit_reference_mask(rng, height, width, num_masked, min_num=16, min_aspect=0.3):
    """BEiT's MaskingGenerator, literally (loops over pixels), drawing from rng; without the fix-up."""
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = np.zeros((height, width), dtype=int)

    def _mask(max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(min_num, max_mask_patches)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                num = mask[top:top + h, left:left + w].sum()
                if 0 < h * w - num <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        return delta

    count = 0
    while count < num_masked:
        delta = _mask(num_masked - count)
        if delta == 0:
            break
        count += delta
    return mask.astype(bool)


@pytest.mark.parametrize("grid,num_masked", [((14, 14), 75), ((14, 14), 0), ((14, 14), 5), ((14, 14), 16),
                                             ((14, 14), 120), ((14, 14), 196), ((7, 10), 33), ((32, 32), 400)])
def test_block_mask_exact_count(grid, num_masked):
    gen = data.BlockMaskGenerator(grid=grid, num_masked=num_masked)
    rng = random.Random(num_masked)
    for _ in range(150):
        mask = gen(rng)
        assert mask.dtype == torch.bool and tuple(mask.shape) == grid
        assert int(mask.sum()) == num_masked


def test_block_mask_refuses_a_ratio_and_other_random_generators():
    """num_masked=0.4 (MAE's --mask_ratio habit) failed with "can't multiply sequence by non-int of type 'float'";
    numpy's RandomState has uniform and randint, but its randint excludes the upper bound (other masks, silently)."""
    with pytest.raises(ValueError, match=r"^num_masked=0.4 is a number of patches, not a ratio: e.g. 78 for 40% of "
                                         r"the 14x14 grid$"):
        data.BlockMaskGenerator(grid=(14, 14), num_masked=0.4)
    for count in (np.int64(75), 75.0, np.float64(75.0)):  # whole numbers of any type, as before
        assert int(data.BlockMaskGenerator(grid=(14, 14), num_masked=count)(random.Random(0)).sum()) == 75
    for rng in (np.random.RandomState(0), torch.Generator()):
        with pytest.raises(TypeError, match=f"needs a random.Random .*got {type(rng).__name__}$"):
            data.BlockMaskGenerator(grid=(14, 14), num_masked=75)(rng)


def test_block_mask_equals_beit_reference():
    gen = data.BlockMaskGenerator(grid=(14, 14), num_masked=75, min_block=16)
    exact = 0
    for seed in range(200):
        ours = gen(random.Random(seed)).numpy()
        ref = beit_reference_mask(random.Random(seed), 14, 14, 75)
        if ref.sum() == 75:
            exact += 1
            np.testing.assert_array_equal(ours, ref)
        else:  # BEiT stopped short: the fix-up only adds patches
            assert ref.sum() < 75 and np.all(ours[ref])
    assert exact > 100  # most masks need no fix-up


def test_block_mask_max_block_caps_each_proposal(monkeypatch):
    """max_block (BEiT's max_num_patches) bounds every block's target area; None: the patches still to mask."""
    for max_block, largest in ((10, 10), (None, 75)):
        asked = []
        gen = data.BlockMaskGenerator(grid=(14, 14), num_masked=75, min_block=4, max_block=max_block)
        sample = gen.sample_block
        monkeypatch.setattr(gen, "sample_block", lambda rng, most: asked.append(most) or sample(rng, most))
        for seed in range(5):
            assert int(gen(random.Random(seed)).sum()) == 75
        assert max(asked) == largest  # None: the first block may take all 75


def test_block_mask_fixup_when_blocks_cannot_fill():
    # min_block larger than the grid allows: every proposal fails, so all patches come from the fix-up
    gen = data.BlockMaskGenerator(grid=(4, 4), num_masked=7, min_block=40)
    for seed in range(20):
        assert int(gen(random.Random(seed)).sum()) == 7
        random.seed(0)  # the fix-up draws from the rng given, not from Python's global random
        first = gen(random.Random(seed))
        random.seed(1)
        assert torch.equal(gen(random.Random(seed)), first)
    assert len({tuple(gen(random.Random(seed)).flatten().tolist()) for seed in range(20)}) > 10


def test_block_proposals_obey_size_and_aspect():
    gen = data.BlockMaskGenerator(grid=(14, 14), num_masked=75, min_block=16)
    rng = random.Random(0)
    seen = 0
    for _ in range(2000):
        block = gen.sample_block(rng, 75)
        if block is None:
            continue
        seen += 1
        top, left, h, w = block
        assert 0 <= top and top + h <= 14 and 0 <= left and left + w <= 14 and h < 14 and w < 14
        # h = round(sqrt(s r)), w = round(sqrt(s / r)) with s in [16, 75], r in [0.3, 1/0.3]
        assert (h + 0.5) * (w + 0.5) >= 16 and (h - 0.5) * (w - 0.5) <= 75
        assert (h + 0.5) / max(w - 0.5, 1e-9) >= 0.3 and (h - 0.5) / (w + 0.5) <= 1 / 0.3
    assert seen > 1500


def test_first_block_is_one_rectangle():
    # the first block BEiT accepts on an empty grid is the first proposal that fits and adds 1..75 patches
    gen = data.BlockMaskGenerator(grid=(14, 14), num_masked=75)
    for seed in range(30):
        rng = random.Random(seed)
        block = None
        while block is None or not 0 < block[2] * block[3] <= 75:
            block = gen.sample_block(rng, 75)
        top, left, h, w = block
        first = np.zeros((14, 14), dtype=bool)
        first[top:top + h, left:left + w] = True
        assert np.all(gen(random.Random(seed)).numpy()[first])


def test_block_mask_errors():
    with pytest.raises(ValueError, match="num_masked"):
        data.BlockMaskGenerator(grid=(14, 14), num_masked=197)


# ---------------------------------------------------------------------------------------------------------------------
# ImageFolder

def _save(path, size=(20, 16), color=(10, 200, 30), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)


def test_image_folder(tmp_path):
    _save(tmp_path / "cat" / "a.JPG")
    _save(tmp_path / "cat" / "nested" / "b.png")
    _save(tmp_path / "dog" / "c.Jpeg", mode="L")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = data.ImageFolder(str(tmp_path))
    assert ds.classes == ["cat", "dog"]
    assert [(os.path.relpath(p, tmp_path), y) for p, y in ds.samples] == [
        ("cat/a.JPG", 0), ("cat/nested/b.png", 0), ("dog/c.Jpeg", 1)]
    img, label = ds[2]
    assert img.mode == "RGB" and img.size == (20, 16) and label == 1
    ds = data.ImageFolder(str(tmp_path), transform=lambda im: im.size)
    assert ds[0] == ((20, 16), 0)


def test_packed_samples_round_trip_any_file_name(tmp_path):
    # \xe9: not UTF-8
    paths = ["/data/train/n01/a.JPEG", "/données/été/ü.png", os.fsdecode(b"/raw/caf\xe9.jpg"), ""]
    samples = data.PackedSamples(paths, [3, 0, 999, 1])
    assert len(samples) == 4 and list(samples) == list(zip(paths, [3, 0, 999, 1]))
    assert samples[-1] == ("", 1) and samples[-4] == samples[0] and isinstance(samples[2][1], int)
    for bad in (4, -5):
        with pytest.raises(IndexError):
            samples[bad]
    _save(tmp_path / "chat" / "été.png")
    ds = data.ImageFolder(str(tmp_path))
    assert ds.samples[0] == (str(tmp_path / "chat" / "été.png"), 0) and ds[0][0].size == (20, 16)
    assert ds.targets.dtype == torch.int64 and ds.targets.tolist() == [0]


def _private_mb():
    """This process's private memory (MB), from Linux's /proc/self/smaps_rollup."""
    with open("/proc/self/smaps_rollup") as f:
        fields = dict(line.split(":") for line in f.read().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


class _ReadAll(torch.utils.data.Dataset):
    """One item: the private memory (MB) a DataLoader worker gained by reading every entry of `samples`."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return 1

    def __getitem__(self, unused):
        before = _private_mb()
        for i in range(len(self.samples)):
            path, label = self.samples[i]  # as ImageFolder.__getitem__ does
        return _private_mb() - before


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc/self/smaps_rollup")
def test_packed_samples_are_not_copied_into_dataloader_workers():
    """A forked worker reading a Python list of (path, label) copies it page by page (reference counts are written);
    reading PackedSamples copies next to nothing."""
    n = 300_000
    paths = [f"/datasets/imagenet/train/n{i // 300:08d}/n{i // 300:08d}_{i:06d}.JPEG" for i in range(n)]
    labels = [i // 300 for i in range(n)]
    growth = {}
    for name, samples in (("list", list(zip(paths, labels))), ("packed", data.PackedSamples(paths, labels))):
        loader = torch.utils.data.DataLoader(_ReadAll(samples), batch_size=None, num_workers=1,
                                             multiprocessing_context="fork")
        growth[name] = next(iter(loader))
    assert growth["list"] > 30 and growth["packed"] < growth["list"] / 10, growth


class _WorkerMemory(torch.utils.data.Dataset):
    """One item: the DataLoader worker's private memory (MB) and, read there, the last entry of `samples`."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return 1

    def __getitem__(self, unused):
        return _private_mb(), self.samples[-1]


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc/self/smaps_rollup")
def test_packed_samples_reach_spawned_dataloader_workers_without_a_copy_each():
    """Under spawn and forkserver (Python 3.14's default on Linux) each worker gets the dataset pickled: PackedSamples
    arrives as shared memory, not as a private copy of its 300k entries (21 MB here; 89 MB for ImageNet-1k, in each
    of a node's 80 workers)."""
    n = 300_000
    paths = [f"/datasets/imagenet/train/n{i // 300:08d}/n{i // 300:08d}_{i:06d}.JPEG" for i in range(n)]
    labels = [i // 300 for i in range(n)]
    memory, last = {}, {}
    for size in (10, n):
        samples = data.PackedSamples(paths[n - size:], labels[n - size:])
        loader = torch.utils.data.DataLoader(_WorkerMemory(samples), batch_size=None, num_workers=1,
                                             multiprocessing_context="spawn")
        memory[size], last[size] = next(iter(loader))
    assert last[10] == last[n] == [paths[-1], labels[-1]]  # (path, label), made a list by the DataLoader
    assert memory[n] - memory[10] < 3, memory  # the arrays alone are 21 MB


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolder(str(tmp_path / "nope"))
    flat = tmp_path / "flat"
    _save(flat / "x.jpg")
    with pytest.raises(FileNotFoundError, match="no class subfolders.*move them into class subfolders"):
        data.ImageFolder(str(flat))
    os.makedirs(tmp_path / "bare")  # no images either: no hint to move "0 images" into class folders
    with pytest.raises(FileNotFoundError, match="no class subfolders") as info:
        data.ImageFolder(str(tmp_path / "bare"))
    assert "images directly" not in str(info.value)
    empty = tmp_path / "empty"
    _save(empty / "a" / "x.png")
    os.makedirs(empty / "b")
    with pytest.raises(FileNotFoundError, match="hold no images.*: b"):
        data.ImageFolder(str(empty))


def test_image_folder_refuses_images_beside_its_class_folders(tmp_path):
    """Images lying in the root beside class folders (a val/ half sorted by an interrupted valprep.sh) were left out
    without a word, as torchvision's ImageFolder does: top-1 on part of the val set. Refused, with the count."""
    for name in ("a", "b"):
        _save(tmp_path / "val" / name / "x.png")
    assert len(data.ImageFolder(str(tmp_path / "val"))) == 2
    for i in range(3):
        _save(tmp_path / "val" / f"ILSVRC2012_val_{i}.JPEG")
    (tmp_path / "val" / "LOC_val_solution.csv").write_text("not an image\n")  # other files are no images
    with pytest.raises(FileNotFoundError, match="holds 3 images directly \\(e.g. 'ILSVRC2012_val_0.JPEG'\\) beside "
                                                "its 2 class folders, which this layout does not read: move them"):
        data.ImageFolder(str(tmp_path / "val"))


def test_image_folder_refuses_class_archives_left_packed(tmp_path):
    """ImageNet's train set unpacks into one n*.tar per class, each to extract in turn: a class still packed (the
    unpacking stopped half way) was left out without a word, the classes after it renumbered. Refused, naming the fix;
    a dataset root keeping its downloads beside train/ and val/ is still named by refuse_dataset_root."""
    train = tmp_path / "train"
    for name in ("n01440764", "n01484850"):
        _save(train / name / "x.JPEG")
    with tarfile.open(train / "n01443537.tar", "w") as archive:
        archive.add(train / "n01440764" / "x.JPEG", arcname="y.JPEG")
    with pytest.raises(FileNotFoundError, match="holds 1 archives \\(e.g. 'n01443537.tar'\\) beside its 2 class "
                                                "folders, which this layout does not read: extract each into the class "
                                                "folder of its name and remove it \\(mkdir ") as refused:
        data.ImageFolder(str(train))
    command = re.search(r"remove it \((mkdir .*)\), or move them", str(refused.value)).group(1)
    assert command == (f"mkdir {train}/n01443537 && tar -xf {train}/n01443537.tar -C {train}/n01443537 && rm "
                       f"{train}/n01443537.tar")
    subprocess.run(command, shell=True, check=True)  # as printed: the class unpacked, the archive gone
    assert len(data.ImageFolder(str(train))) == 3 and not (train / "n01443537.tar").exists()
    with tarfile.open(train / "n01443537.tar", "w") as archive:  # packed again, for the cases below
        archive.add(train / "n01440764" / "x.JPEG", arcname="y.JPEG")
    shutil.rmtree(train / "n01443537")
    os.makedirs(tmp_path / "packed")
    os.replace(train / "n01443537.tar", tmp_path / "packed" / "n01443537.tar")
    with pytest.raises(FileNotFoundError, match="no class subfolders.*It holds 1 archives: extract each into"):
        data.ImageFolder(str(tmp_path / "packed"))
    assert len(data.ImageFolder(str(train))) == 2
    root = tmp_path / "imagenet"
    for folder in ("train", "val"):
        _save(root / folder / "n01440764" / "x.JPEG")
    (root / "ILSVRC2012_img_train.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="pass --data .*imagenet/train"):
        data.refuse_dataset_root(data.ImageFolder(str(root)), "--data", "train")


def test_dataset_sets_names_what_names_a_dataset_split():
    """A folder holding a train set and one more (any of val, validation, valid, test, with a prefix or a year) is
    a dataset split into sets; one set name alone (a class 'train' among vehicles) or a name that only begins so is
    not."""
    assert data.dataset_sets(["val", "train", "n01"]) == {"train": "train", "val": "val"}
    assert data.dataset_sets(["ILSVRC2012_img_val", "ILSVRC2012_img_train"]) == {
        "train": "ILSVRC2012_img_train", "val": "ILSVRC2012_img_val"}
    assert data.dataset_sets(["test", "Train2017", "valid"]) == {"train": "Train2017", "valid": "valid", "test": "test"}
    assert data.dataset_sets(["imagenet-train", "imagenet-validation"]) == {
        "train": "imagenet-train", "validation": "imagenet-validation"}
    for names in (["train", "bus", "car"], ["training", "testing"], ["train", "test_tube"], ["val", "test"]):
        assert data.dataset_sets(names) == {}, names


def test_dataset_sets_need_a_separator_before_the_set_name():
    """A set name after a space, a dot, a dash or an underscore names a set ("imagenet val", "coco.train2017"); glued
    to a word ("pretrain", "contest") it does not, so classes named so are not refused as a dataset's sets."""
    assert data.dataset_sets(["imagenet train", "imagenet val"]) == {"train": "imagenet train", "val": "imagenet val"}
    assert data.dataset_sets(["coco.train2017", "coco.val2017"]) == {"train": "coco.train2017", "val": "coco.val2017"}
    assert data.dataset_sets(["pretrain", "contest"]) == {}


def test_a_dataset_root_refused_as_a_val_set_names_its_val_folder_before_test(tmp_path):
    """--data_val ROOT holding train/, val/ and test/ (Kaggle's CLS-LOC): the folder named to pass is ROOT/val, the
    first set after train in DATASET_SETS' order, not test/ (which has no labels there)."""
    for split in ("train", "val", "test"):
        _save(tmp_path / split / "a" / "x.png")
    with pytest.raises(ValueError, match=f"holds train/ and val/ and test/ .*: pass --data_val {tmp_path / 'val'}$"):
        data.refuse_dataset_root(data.ImageFolder(str(tmp_path)), "--data_val", "val")


def test_a_root_whose_sets_hold_images_directly_is_refused_naming_the_train_set(tmp_path):
    """ROOT/{train,val}/<image> (sets without class folders) as --data: the refusal names ROOT/train, whose own error
    then asks for class folders; not the advice for class folders each split into sets, which has no class to name."""
    for split in ("train", "val"):
        _save(tmp_path / split / "x.png")
    with pytest.raises(ValueError, match=f"holds train/ and val/ \\(a dataset split into sets\\).*: pass --data "
                                         f"{tmp_path / 'train'}$"):
        data.refuse_dataset_root(data.ImageFolder(str(tmp_path)), "--data", "train")


def test_image_folder_reads_a_root_whose_loose_files_are_hidden(tmp_path):
    """A Mac's "._" companions of val images stay in the root after valprep.sh moves the images into their class
    folders: hidden, they are no images lying beside the class folders, and the folder reads as before."""
    _save(tmp_path / "a" / "x.JPEG")
    _save(tmp_path / "b" / "y.JPEG")
    (tmp_path / "._x.JPEG").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble, no image
    folder = data.ImageFolder(str(tmp_path))
    assert folder.classes == ["a", "b"] and len(folder) == 2


def test_image_folder_corrupt_file_is_named(tmp_path):
    _save(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    truncated = tmp_path / "a" / "cut.png"
    _save(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:60])
    ds = data.ImageFolder(str(tmp_path))
    names = [os.path.basename(p) for p, _ in ds.samples]
    for name in ("bad.jpg", "cut.png"):
        with pytest.raises(data.UnreadableImage, match=f"cannot read image file .*{name}"):
            ds[names.index(name)]


def test_image_modes_load_as_their_values_or_are_refused(tmp_path, monkeypatch):
    """16-bit grayscale scales to 8 bits (Pillow's convert would clip it at 255: a mid-grey 32768 came out white);
    32-bit integer and float images are refused by name; a file over Pillow's pixel limit is named as too large,
    not as corrupt."""
    ramp = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(ramp).save(tmp_path / "i16.png")
    with Image.open(tmp_path / "i16.png") as raw:
        assert raw.mode == "I;16"  # as Pillow 13 opens it (a Pillow that opened it as 'I' would get a clear refusal)
    assert np.asarray(data.load_image(str(tmp_path / "i16.png"))).tolist() == [[[v] * 3 for v in (0, 1, 128, 255)]]
    for mode, values in (("F", np.full((4, 4), 0.5, np.float32)), ("I", np.full((4, 4), 70000, np.int32))):
        Image.fromarray(values, mode).save(tmp_path / f"{mode}.tif")
        with pytest.raises(ValueError, match=f"mode '{mode}'.*convert it to 8-bit") as error:
            data.load_image(str(tmp_path / f"{mode}.tif"))
        assert not isinstance(error.value, data.UnreadableImage)  # not skipped as a broken file: the data needs a fix
    Image.new("RGB", (30, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 900 pixels > 2 x 400: Pillow's DecompressionBombError
    with pytest.raises(data.UnreadableImage, match="too large for Pillow's decompression-bomb limit"):
        data.load_image(str(tmp_path / "big.png"))


def test_a_label_map_over_pillows_pixel_limit_is_unreadable_and_named(tmp_path, monkeypatch):
    """As load_image: an UnreadableImage (training skips it, validation names it), not Pillow's DecompressionBombError
    (a traceback; reached where a label map is larger than its image)."""
    Image.new("L", (30, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 900 pixels > 2 x 400
    with pytest.raises(data.UnreadableImage, match="annotation '.*big.png' is too large for Pillow's "
                                                   "decompression-bomb limit .*MAX_IMAGE_PIXELS") as error:
        data.load_label_map(str(tmp_path / "big.png"))
    assert error.value.path == str(tmp_path / "big.png")


def test_image_folder_skips_hidden_folders_and_refuses_link_loops(tmp_path):
    _save(tmp_path / "ok" / "a" / "1.jpg")
    _save(tmp_path / "ok" / "a" / ".ipynb_checkpoints" / "1-checkpoint.jpg")
    _save(tmp_path / "ok" / "a" / "sub" / "2.jpg")
    _save(tmp_path / "ok" / "a" / "._3.jpg")  # macOS's resource fork beside a copied file
    _save(tmp_path / "ok" / ".ipynb_checkpoints" / "0.jpg")  # a hidden class folder would be class 0
    ds = data.ImageFolder(str(tmp_path / "ok"))
    assert sorted(os.path.relpath(p, tmp_path / "ok") for p, _ in ds.samples) == ["a/1.jpg", "a/sub/2.jpg"]
    assert ds.classes == ["a"]
    _save(tmp_path / "loop" / "a" / "1.jpg")
    os.symlink("..", tmp_path / "loop" / "a" / "up")  # a/up/a/up/... would list 1.jpg until the path gets too long
    with pytest.raises(ValueError, match="symbolic link loop"):
        data.ImageFolder(str(tmp_path / "loop"))


def test_image_folder_refuses_folders_it_cannot_list(tmp_path, monkeypatch):
    """A class folder or a subfolder linked to storage that is gone (an unmounted drive), or one that cannot be
    listed (permissions), was left out without a word: the class's images missing, the later classes' indices one
    lower."""
    root = tmp_path / "root"
    for name in ("a/1.jpg", "c/2.jpg", "c/sub/3.jpg"):
        _save(root / name)
    os.symlink(tmp_path / "gone" / "b", root / "b")  # sorts between a and c
    gone = re.escape(f"'{root / 'b'}' is a symbolic link to '{tmp_path / 'gone' / 'b'}', which does not exist:")
    with pytest.raises(FileNotFoundError, match=f"^{gone} .* remove the link$"):
        data.ImageFolder(str(root))
    os.remove(root / "b")
    os.symlink(tmp_path / "gone" / "more", root / "c" / "more")
    with pytest.raises(FileNotFoundError, match="^" + re.escape(f"'{root / 'c' / 'more'}' is a symbolic link to ")):
        data.ImageFolder(str(root))
    os.remove(root / "c" / "more")
    os.symlink(tmp_path / "gone" / "4.jpg", root / "c" / "4.jpg")  # an image file: listed, skipped when read
    os.symlink(tmp_path / "gone" / "x", root / "c" / ".x")  # hidden: skipped as hidden files are
    assert len(data.ImageFolder(str(root))) == 4
    os.remove(root / "c" / "4.jpg")
    scandir = os.scandir

    def locked(path):
        if os.fspath(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked)  # as root, chmod would not lock it
    locked_message = re.escape(f"cannot list the folder '{root / 'c' / 'sub'}' (Permission denied): ")
    with pytest.raises(OSError, match=f"^{locked_message}its images would be left out; make it readable"):
        data.ImageFolder(str(root))


# ---------------------------------------------------------------------------------------------------------------------
# Pre-training transform

def _rrc_by_hand(width, height, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, written out again."""
    area = width * height
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])).item())
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return torch.randint(0, height - h + 1, (1,)).item(), torch.randint(0, width - w + 1, (1,)).item(), h, w
    raise AssertionError("no fallback expected here")


def test_random_resized_crop_matches_reference_and_stays_inside():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    crop = data.RandomResizedCrop(32, scale=(0.08, 1.0))
    for seed in range(50):
        torch.manual_seed(seed)
        expected = _rrc_by_hand(120, 90, (0.08, 1.0), (3 / 4, 4 / 3))
        torch.manual_seed(seed)
        top, left, h, w = data.RandomResizedCrop.get_params(120, 90, (0.08, 1.0), (3 / 4, 4 / 3))
        assert (top, left, h, w) == expected
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 120
        assert 0.08 * 90 * 120 * 0.9 <= h * w  # area >= min scale, up to rounding
        torch.manual_seed(seed)
        out = crop(img)
        ref = img.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.BICUBIC)
        assert out.size == (32, 32) and np.array_equal(np.asarray(out), np.asarray(ref))


def test_random_resized_crop_fallback_is_centered():
    # a 1000x10 strip: no sampled crop fits, torchvision falls back to a center crop at the extreme aspect
    assert data.RandomResizedCrop.get_params(1000, 10, (0.08, 1.0), (3 / 4, 4 / 3)) == (0, (1000 - 13) // 2, 10, 13)
    assert data.RandomResizedCrop.get_params(10, 1000, (0.08, 1.0), (3 / 4, 4 / 3)) == ((1000 - 13) // 2, 0, 13, 10)


def test_random_resized_crop_fallback_is_never_empty():
    """A 1-pixel-wide image with an aspect range above 2 (or 1 pixel high, below 1/2): the fallback's other side,
    round(1 / 2.0) = 0, gave an empty crop, which PIL resized to an all-black image without an error (found by
    fuzzing). It is 1 pixel, the thinnest crop there is."""
    assert data.RandomResizedCrop.get_params(1, 1192, (0.5, 1.0), (2.0, 4.0)) == (595, 0, 1, 1)
    assert data.RandomResizedCrop.get_params(1192, 1, (0.5, 1.0), (0.1, 0.4)) == (0, 595, 1, 1)
    out = data.RandomResizedCrop(8, scale=(0.5, 1.0), ratio=(2.0, 4.0))(Image.new("RGB", (1, 1192), (200, 100, 50)))
    assert out.size == (8, 8) and out.getextrema() == ((200, 200), (100, 100), (50, 50))


def test_to_tensor_normalizes():
    x = data.to_tensor(Image.new("RGB", (5, 4), (255, 0, 51)))
    expected = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    assert x.shape == (3, 4, 5)
    assert torch.allclose(x, expected.view(3, 1, 1).expand(3, 4, 5), atol=1e-6)
    with pytest.raises(ValueError, match="RGB images, got a PIL image of mode 'L'.*convert"):  # a torch error before
        data.PretrainTransform(img_size=4)(Image.new("L", (5, 4)))


def test_every_transform_names_an_image_that_is_not_pil_rgb():
    """A grey image reached RandAugment's geometric ops first and failed there on their RGB fill colour ("color must
    be int or single-element tuple"), in about a third of the seeds; a tensor failed on its missing .size; a numpy
    label map was reported as a size mismatch. Found by a review that used data.py outside the trainers."""
    grey, rgb = Image.new("L", (40, 30)), Image.new("RGB", (40, 30))
    transforms = (data.PretrainTransform(img_size=16), data.FinetuneTransform(img_size=16), data.EvalTransform(16),
                  data.RandAugment(op_prob=1.0),
                  lambda img: data.SegTrainTransform(crop_size=16, scale=(40, 30))(img, grey),
                  lambda img: data.SegEvalTransform(scale=(40, 30))(img, grey))
    for transform in transforms:
        for seed in range(8):
            random.seed(seed), torch.manual_seed(seed)
            with pytest.raises(ValueError, match="^the transforms take RGB images, got a PIL image of mode 'L'"):
                transform(grey)
        with pytest.raises(TypeError, match="^the transforms take PIL RGB images, got Tensor: load it with"):
            transform(torch.zeros(3, 30, 40))
    for label_map, got in ((np.zeros((30, 40), np.uint8), "ndarray"), (rgb, "a PIL image of mode 'RGB'")):
        with pytest.raises(ValueError, match=f"^the label map must be a one-channel PIL image .*, got {got}$"):
            data.SegTrainTransform(crop_size=16, scale=(40, 30))(rgb, label_map)


def test_pretrain_transform_reproducible_by_seed():
    img = data.SyntheticShapes(1, 64).get(0)[0]
    t = data.PretrainTransform(img_size=32, min_crop_scale=0.2)
    torch.manual_seed(3)
    a = t(img)
    torch.manual_seed(3)
    b = t(img)
    c = t(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(b, c)


def seeded(fn, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return fn()


def test_pretrain_transform_flips_half_of_the_crops():
    """The flip is drawn after the crop whatever its probability, so p=1 gives the mirror of p=0's output."""
    img = data.SyntheticShapes(1, 64).get(0)[0]
    never, always, half = (data.PretrainTransform(32, 0.2, color_jitter=0, hflip=p) for p in (0.0, 1.0, 0.5))
    flipped = []
    for seed in range(16):
        plain = seeded(lambda: never(img), seed)
        assert torch.equal(seeded(lambda: always(img), seed), plain.flip(-1)) and not torch.equal(plain.flip(-1), plain)
        out = seeded(lambda: half(img), seed)
        assert torch.equal(out, plain) or torch.equal(out, plain.flip(-1))
        flipped.append(torch.equal(out, plain.flip(-1)))
    assert 4 <= sum(flipped) <= 12  # p = 0.5 (16 seeds)
    assert data.PretrainTransform().hflip == 0.5


def test_color_jitter_draws_torchvisions_ranges_and_applies_each_factor(monkeypatch):
    """Factors ~ U[1 - s, 1 + s] (brightness, contrast, saturation) and U[-h, h] (hue), as torchvision's ColorJitter;
    a factor f scales a grey image's brightness by f (contrast and saturation leave grey as it is)."""
    drawn = []
    monkeypatch.setattr(data, "_rand_uniform", lambda low, high: drawn.append((low, high)) or high)
    grey = Image.new("RGB", (6, 4), (100, 100, 100))
    out = data.ColorJitter(0.4, 0.4, 0.4, 0.1)(grey)
    assert drawn == [(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]
    assert np.asarray(out)[0, 0].tolist() == [140, 140, 140]  # brightness x 1.4; the rest leave grey alone
    drawn.clear()
    data.ColorJitter(1.5, 0, 0.2)(grey)
    assert drawn == [(0.0, 2.5), (0.8, 1.2)]  # clamped at 0, as torchvision


def test_color_jitter_gives_each_strength_to_its_own_adjustment(monkeypatch):
    """Brightness, contrast and saturation each get their own strength (a colour image, where contrast and saturation
    differ; one adjustment at a time, so the random order does not matter)."""
    monkeypatch.setattr(data, "_rand_uniform", lambda low, high: high)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for strengths, enhancer in (((0.5, 0, 0), ImageEnhance.Brightness), ((0, 0.5, 0), ImageEnhance.Contrast),
                                ((0, 0, 0.5), ImageEnhance.Color)):
        expected = np.asarray(enhancer(img).enhance(1.5))
        assert np.array_equal(np.asarray(data.ColorJitter(*strengths)(img)), expected), strengths
        others = [e for e in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color) if e is not enhancer]
        assert all(not np.array_equal(np.asarray(e(img).enhance(1.5)), expected) for e in others)  # they differ here


def test_adjust_hue_turns_red_by_the_given_fraction_of_a_turn():
    """torchvision's adjust_hue (PIL path): red shifted by a fraction of a turn, the colours torchvision 0.29.1 gives
    (+0.25: hue 63 of PIL's 256, yellow-green; -0.25: blue-violet)."""
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    for turn, rgb in ((0.25, [132, 255, 0]), (-0.25, [138, 0, 255]), (0.1, [255, 150, 0]), (-0.4, [0, 96, 255])):
        assert np.asarray(data.adjust_hue(red, turn))[0, 0].tolist() == rgb, turn


def test_color_jitter_zero_is_identity_and_jitter_changes_image():
    img = data.SyntheticShapes(1, 32).get(0)[0]
    assert np.array_equal(np.asarray(data.ColorJitter(0, 0, 0)(img)), np.asarray(img))
    torch.manual_seed(0)
    out = data.ColorJitter(0.4, 0.4, 0.4, 0.1)(img)
    assert out.size == img.size and out.mode == "RGB" and not np.array_equal(np.asarray(out), np.asarray(img))


# ---------------------------------------------------------------------------------------------------------------------
# Procedural data and the pre-training dataset

def test_synthetic_shapes_deterministic():
    a, b = data.SyntheticShapes(8, 48, seed=1), data.SyntheticShapes(8, 48, seed=1)
    for i in range(8):
        ia, la, ma = a.get(i)
        ib, lb, mb = b.get(i)
        assert la == lb and np.array_equal(np.asarray(ia), np.asarray(ib)) and np.array_equal(np.asarray(ma),
                                                                                          np.asarray(mb))
    assert not np.array_equal(np.asarray(a.get(0)[0]), np.asarray(a.get(1)[0]))
    assert not np.array_equal(np.asarray(a.get(0)[0]), np.asarray(data.SyntheticShapes(8, 48, seed=2).get(0)[0]))


def test_synthetic_shapes_label_is_largest_mask_region():
    ds = data.SyntheticShapes(60, 64, num_classes=12, seed=0)
    labels = []
    for i in range(len(ds)):
        img, label, mask = ds.get(i)
        m = np.asarray(mask)
        assert img.mode == "RGB" and img.size == (64, 64) and mask.mode == "L" and mask.size == (64, 64)
        assert m.max() <= 12
        counts = np.bincount(m.ravel(), minlength=13)[1:]
        assert counts[label] == counts.max() > 0
        labels.append(label)
    assert len(set(labels)) >= 8  # classes are spread
    assert ds.classes[:2] == ["solid_circle", "solid_square"] and ds.num_seg_classes == 13
    assert ds[0][1] == ds.get(0)[1]


def test_synthetic_shapes_pixels_follow_mask():
    # shape pixels differ from the background: the mask boundary shows in the image
    img, _, mask = data.SyntheticShapes(1, 96, seed=4).get(0)
    x, m = np.asarray(img, dtype=np.float32), np.asarray(mask)
    inside, outside = x[m > 0], x[m == 0]
    assert inside.shape[0] > 100 and outside.shape[0] > 100
    with pytest.raises(ValueError, match="classes"):
        data.SyntheticShapes(4, num_classes=33)


def test_masked_image_dataset():
    base = data.SyntheticShapes(3, 64)
    ds = data.MaskedImageDataset(base, data.PretrainTransform(img_size=64), data.BlockMaskGenerator((4, 4), 6, 2))
    x, mask = ds[1]
    assert x.shape == (3, 64, 64) and mask.shape == (16,) and mask.dtype == torch.bool and int(mask.sum()) == 6
    with pytest.raises(TypeError, match="transform=None"):
        data.MaskedImageDataset(data.SyntheticShapes(3, 64, transform=data.EvalTransform(56)), None, None)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning: Mixup / CutMix, RandomErasing, RandAugment, eval transform

def test_mixup_images_and_label_mass():
    m = data.Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=5)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    x_in = x.clone()
    random.seed(7)
    lam, use_cutmix = m.sample_params()
    random.seed(7)
    mixed, target = m(x, y)
    assert not use_cutmix and 0 < lam < 1 and torch.equal(x, x_in)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.allclose(target.sum(1), torch.ones(4))
    smooth = torch.full((4, 5), 0.1 / 5)
    smooth[torch.arange(4), y] = 0.9 + 0.1 / 5
    assert torch.allclose(target, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-6)


def test_cutmix_area_equals_corrected_lambda():
    m = data.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=4)
    x = torch.arange(1, 5, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 30, 40).contiguous()
    y = torch.arange(4)
    pasted_any = False
    for seed in range(40):
        random.seed(seed)
        mixed, target = m(x, y)
        lam = target[0, 0].item()  # label smoothing 0: the own label's weight is lam
        from_other = (mixed[0, 0] == 4).float()  # sample 0 is paired with sample 3
        assert math.isclose(from_other.mean().item(), 1 - lam, abs_tol=1e-6)
        assert math.isclose(target[0, 3].item(), 1 - lam, abs_tol=1e-6)
        assert torch.allclose(target.sum(1), torch.ones(4))
        rows, cols = from_other.nonzero(as_tuple=True)
        if len(rows):  # the pasted region is one rectangle
            pasted_any = True
            assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert pasted_any


def test_cutmix_box_follows_the_image_sides_and_switch_prob_picks_cutmix():
    """timm's rand_bbox: the box's sides are sqrt(1 - lam) times the image's own height and width; CutMix is chosen
    with probability switch_prob."""
    for seed in range(20):
        random.seed(seed)
        (y0, y1, x0, x1), _ = data.cutmix_box(10, 100, 0.75)  # sides at most 5 x 50
        assert y1 - y0 <= 5 and x1 - x0 <= 50
        assert y1 > y0 and x1 > x0  # the centre inside the image on each axis (drawn per axis: never empty)
        if 2 <= (y0 + y1) // 2 <= 7 and 25 <= (x0 + x1) // 2 <= 75:  # not clipped: exactly 2 * (5 // 2) x 50
            assert (y1 - y0, x1 - x0) == (4, 50), seed
    centres = set()
    for seed in range(200):
        random.seed(seed)
        (y0, y1, x0, x1), _ = data.cutmix_box(10, 100, 0.99)  # a 0 x 10 box: x0 = centre - 5 where unclipped
        centres.add(x0 + 5)
    assert max(centres) >= 90  # centres over the whole width, not only the height's 0..9
    random.seed(0)
    m = data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.9)
    share = sum(m.sample_params()[1] for _ in range(2000)) / 2000
    assert share == pytest.approx(0.9, abs=0.03)


def test_mixup_draws_lambda_from_each_modes_beta_and_mixes_with_prob(monkeypatch):
    """Mixup's lambda ~ Beta(mixup_alpha), CutMix's ~ Beta(cutmix_alpha) (timm's _params_per_batch); a batch is mixed
    with probability prob."""
    calls = []
    monkeypatch.setattr(random, "betavariate", lambda a, b: (calls.append((a, b)), 0.5)[1])
    for switch_prob, expected in ((1.0, (1.0, 1.0)), (0.0, (0.8, 0.8))):
        calls.clear()
        assert data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=switch_prob).sample_params()[1] == (
            switch_prob == 1.0)
        assert calls == [expected]
    monkeypatch.undo()
    random.seed(1)
    m = data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.3)
    assert sum(m.sample_params()[0] < 1.0 for _ in range(2000)) / 2000 == pytest.approx(0.3, abs=0.03)


def test_mixup_refuses_an_odd_batch_unless_off():
    """As timm's Mixup (it asserts an even batch): in an odd batch the middle image is paired with itself."""
    x, y = torch.randn(3, 3, 4, 4), torch.tensor([0, 1, 2])
    for m in (data.Mixup(mixup_alpha=0.8, cutmix_alpha=0.0), data.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0)):
        with pytest.raises(ValueError, match="odd batch of 3.*even batch size"):
            m(x, y)
    for m in (data.Mixup(mixup_alpha=0.0, cutmix_alpha=0.0, num_classes=3), data.Mixup(prob=0.0, num_classes=3)):
        assert torch.equal(m(x, y)[0], x)


def test_mixup_off_gives_smoothed_one_hot():
    m = data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0, label_smoothing=0.1, num_classes=3)
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([2, 0])
    out, target = m(x, y)
    assert torch.equal(out, x)
    assert torch.allclose(target, torch.tensor([[0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3], [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]]))


def test_random_erasing_box_area_and_noise():
    erase = data.RandomErasing(prob=1.0, mode="pixel")
    H, W = 64, 80
    slack = math.sqrt(H * W / 3) * (math.sqrt(1 / 0.3) + 1) + 1  # rounding of h and w
    for seed in range(40):
        random.seed(seed)
        torch.manual_seed(seed)
        x = torch.full((3, H, W), 100.0)
        out = erase(x)
        assert torch.equal(x, torch.full((3, H, W), 100.0))  # input untouched
        erased = out[0] != 100
        rows, cols = erased.nonzero(as_tuple=True)
        area = len(rows)
        assert area == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert 0.02 * H * W - slack <= area <= H * W / 3 + slack
        assert (out[:, erased] != 100).all() and out[:, erased].abs().max() < 7  # N(0, 1) noise
    assert torch.equal(data.RandomErasing(prob=0.0)(x), x)
    with pytest.raises(ValueError, match=r"one image \(C, H, W\), got \(2, 3, 64, 80\)"):  # it sliced (C, H) here
        data.RandomErasing(prob=1.0, mode="const")(x.expand(2, 3, H, W))


def test_rand_augment_ops_keep_size_and_mode():
    img = data.SyntheticShapes(1, 40).get(0)[0].resize((40, 30))
    ra = data.RandAugment()
    random.seed(0)
    for name in data.RAND_AUGMENT_OPS:
        for magnitude in (0.0, 5.0, 9.0, 10.0):
            out = ra.apply_op(img, name, magnitude)
            assert out.size == (40, 30) and out.mode == "RGB", name
    for _ in range(20):
        out = ra(img)
        assert out.size == (40, 30) and out.mode == "RGB"


def test_rand_augment_levels_and_ops_match_definition():
    ops = data.RAND_AUGMENT_OPS
    assert ops["PosterizeIncreasing"][1](9) == 1 and ops["SolarizeIncreasing"][1](9) == 26
    # timm 0.4.12's original (not increasing) levels, and its two lists in its order
    assert ops["Posterize"][1](9) == 3 and ops["Solarize"][1](9) == 230
    assert ops["Color"][1](9) == pytest.approx(1.72) and ops["Sharpness"][1](0) == pytest.approx(0.1)
    assert data.RAND_OPS == ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
                             "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
                             "TranslateYRel")
    assert data.RAND_INCREASING_OPS[4:11] == ("PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                                              "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                              "SharpnessIncreasing")
    # posterize to 0 bits (PosterizeIncreasing at magnitude 10) is black, as Pillow did then; 4 bits keep the top 4
    img = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(3).reshape(16, 16, 3))
    assert not np.asarray(ops["PosterizeIncreasing"][0](img, ops["PosterizeIncreasing"][1](10), None)).any()
    assert np.array_equal(np.asarray(data.posterize(img, 4)), np.asarray(img) & 0xF0)
    assert data.posterize(img, 8) is img
    assert ops["SolarizeAdd"][1](9) == 99
    random.seed(1)
    assert abs(ops["Rotate"][1](9)) == pytest.approx(27.0)
    assert ops["ColorIncreasing"][1](10) in (pytest.approx(0.1), pytest.approx(1.9))
    img = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(3).reshape(16, 16, 3))
    out = np.asarray(data.solarize_add(img, 99))[..., 0].ravel()
    v = np.arange(256)
    assert np.array_equal(out, np.where(v < 128, np.minimum(v + 99, 255), v))
    always_invert = data.RandAugment(num_ops=1, op_prob=1.0, ops=("Invert",))
    assert np.array_equal(np.asarray(always_invert(img)), np.asarray(ImageOps.invert(img)))
    with pytest.raises(ValueError, match="unknown RandAugment ops"):
        data.RandAugment(ops=("Blur",))


def test_eval_transform_sizes():
    img = data.SyntheticShapes(1, 64).get(0)[0].resize((300, 200))
    t = data.EvalTransform(img_size=224, crop_ratio=0.875)
    assert t.resize_size == 256
    x = t(img)
    assert x.shape == (3, 224, 224)
    ref = img.resize((384, 256), Image.Resampling.BICUBIC).crop((80, 16, 304, 240))
    assert torch.allclose(x, data.to_tensor(ref))
    assert data.EvalTransform(32, crop_ratio=1.0)(img.resize((50, 70))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="crop_ratio"):
        data.EvalTransform(224, crop_ratio=1.2)


def test_finetune_transform_shape_and_seed():
    img = data.SyntheticShapes(1, 64).get(0)[0]
    t = data.FinetuneTransform(img_size=48)
    random.seed(0), torch.manual_seed(0)
    a = t(img)
    random.seed(0), torch.manual_seed(0)
    b = t(img)
    assert a.shape == (3, 48, 48) and torch.equal(a, b)


def test_finetune_transform_flips_and_erases():
    """The flip (p=0.5) comes before RandAugment; random erasing (prob 0.25) after normalization changes one
    rectangle of the image and nothing else."""
    img = data.SyntheticShapes(1, 64).get(0)[0]
    plain = dict(img_size=32, rand_num_ops=0, reprob=0)
    never, always = data.FinetuneTransform(**plain, hflip=0.0), data.FinetuneTransform(**plain, hflip=1.0)
    for seed in range(4):
        assert torch.equal(seeded(lambda: always(img), seed), seeded(lambda: never(img), seed).flip(-1))
    unerased, erased = data.FinetuneTransform(32, reprob=0), data.FinetuneTransform(32, reprob=1.0)
    default = data.FinetuneTransform(32)
    assert default.hflip == 0.5 and default.erase.prob == 0.25 and default.erase.mode == "pixel"
    for seed in range(4):
        before, after = seeded(lambda: unerased(img), seed), seeded(lambda: erased(img), seed)
        rows, cols = (before != after).any(0).nonzero(as_tuple=True)
        assert len(rows) > 0
        box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
        assert (before != after)[:, box[0], box[1]].float().mean() > 0.99  # one filled rectangle of noise
        outside = torch.ones_like(before, dtype=torch.bool)
        outside[:, box[0], box[1]] = False
        assert torch.equal(before[outside], after[outside])
    erased_count = sum(not torch.equal(seeded(lambda: unerased(img), s), seeded(lambda: default(img), s))
                       for s in range(24))
    assert 2 <= erased_count <= 12  # prob 0.25 of 24


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation

def _color_of(label):
    return np.stack([(label * 37 + 11) % 256, (label * 91 + 50) % 256, (label * 53 + 7) % 256], -1).astype(np.uint8)


def test_seg_transform_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(0, 20, size=(12, 16)), np.ones((7, 5), dtype=np.int64)).astype(np.uint8)
    labels[:10, :10] = 255  # ignore region
    img, mask = Image.fromarray(_color_of(labels.astype(np.int64))), Image.fromarray(labels, "L")  # 80x84
    t = data.SegTrainTransform(crop_size=64, scale=(200, 50), photometric=False, image_resample=data.CV2_NEAREST)
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    lut = {tuple(_color_of(np.int64(v))): v for v in list(range(20)) + [255]}
    padded_seen = False
    for seed in range(30):
        random.seed(seed)
        x, y = t(img, mask)
        assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.int64
        pad = (x == 0).all(0)
        padded_seen |= bool(pad.any())
        assert (y[pad] == 255).all()
        pixels = ((x * std + mean) * 255).round().to(torch.uint8).permute(1, 2, 0)[~pad].numpy()
        decoded = np.array([lut[tuple(p)] for p in pixels])
        assert np.array_equal(decoded, y[~pad].numpy())
    assert padded_seen  # small scales make crops smaller than 64, which get padded


def test_seg_transforms_take_8_bit_label_maps_only():
    """A label map of 32-bit, 16-bit or float pixels (PIL.Image.fromarray of an int32, uint16 or float array) passed
    the one-channel check: training failed inside numpy or Pillow (-1 as ignore: "'list' argument must have no
    negative elements"), evaluation truncated float labels (0.7 -> class 0) or kept -1 and 300."""
    img, labels = Image.new("RGB", (40, 30)), np.zeros((30, 40), np.uint8)
    labels[:, 20:] = 1
    train, evaluate = data.SegTrainTransform(crop_size=16, scale=(40, 30)), data.SegEvalTransform(scale=(40, 30))
    refused = r"^the label map must be a one-channel PIL image \(mode 'L' or 'P', .*fromarray\(uint8_array\)\), got "
    for wide in (labels.astype(np.int32) - 1, labels.astype(np.float32) + 0.7, labels.astype(np.uint16) * 300):
        mask = Image.fromarray(wide)
        for transform in (train, evaluate):
            with pytest.raises(ValueError, match=f"{refused}a PIL image of mode '{mask.mode}'$"):
                random.seed(0)
                transform(img, mask)
    for transform in (train, evaluate):  # the array itself, not an image of it
        with pytest.raises(ValueError, match=f"{refused}ndarray$"):
            transform(img, labels)
    for mask in (Image.fromarray(labels, "L"), Image.fromarray(labels, "L").convert("P"), Image.fromarray(labels > 0)):
        random.seed(0)
        assert set(train(img, mask)[1].unique().tolist()) <= {0, 1, 255}
        assert torch.equal(evaluate(img, mask)[1], torch.from_numpy(labels.astype(np.int64)))


def test_a_one_bit_label_map_trains_as_its_0_1_twin():
    """check_label_map takes a mode '1' label map as 0/1, but resize_cv2_nearest ("any mode") rebuilt it with
    fromarray(bools, "1"), which reads the bools as packed bits: resized, it lost its class-1 pixels and training saw
    other labels. A mode 'I;16' image failed there ("Invalid mode for data type")."""
    labels = np.zeros((30, 40), np.uint8)
    labels[:, 20:] = 1
    img, twin, one_bit = Image.new("RGB", (40, 30)), Image.fromarray(labels, "L"), Image.fromarray(labels > 0)
    wide = Image.fromarray(labels.astype(np.uint16) * 300)
    for size in ((40, 30), (80, 60)):
        expected, resized = np.asarray(data.resize_cv2_nearest(twin, size)), data.resize_cv2_nearest(one_bit, size)
        assert resized.mode == "1" and np.array_equal(np.asarray(resized, dtype=np.uint8), expected)
        resized = data.resize_cv2_nearest(wide, size)
        assert resized.mode == wide.mode and np.array_equal(np.asarray(resized), expected.astype(np.uint16) * 300)
    train = data.SegTrainTransform(crop_size=16, scale=(40, 30))
    for seed in range(3):
        random.seed(seed)
        expected = train(img, twin)[1]
        random.seed(seed)
        assert torch.equal(train(img, one_bit)[1], expected)


def test_seg_masks_are_nearest_only():
    rng = np.random.default_rng(1)
    labels = rng.choice(np.array([0, 3, 7, 149], dtype=np.uint8), size=(60, 90))
    img = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    t = data.SegTrainTransform(crop_size=48, scale=(180, 60))
    for seed in range(10):
        random.seed(seed)
        x, y = t(img, Image.fromarray(labels, "L"))
        assert set(y.unique().tolist()) <= {0, 3, 7, 149, 255}
        assert x.dtype == torch.float32


def test_seg_random_crop_draws_every_offset():
    """mmseg's offsets are uniform over 0..(side - crop), both ends included."""
    ramp = Image.fromarray((np.arange(9)[:, None] * 16 + np.arange(12)[None, :]).astype(np.uint8), "L")
    origins = set()
    for seed in range(80):
        random.seed(seed)
        _, crop = data.seg_random_crop(ramp.convert("RGB"), ramp, (8, 8), cat_max_ratio=1.0)
        origins.add(divmod(int(np.asarray(crop)[0, 0]), 16))  # (top, left)
    assert origins == {(top, left) for top in range(2) for left in range(5)}


def test_a_non_square_crop_is_height_by_width():
    random.seed(0)
    img, mask = data.seg_random_crop(Image.new("RGB", (100, 100)), Image.new("L", (100, 100)), (20, 40), 1.0)
    assert img.size == mask.size == (40, 20)  # PIL's (width, height)
    random.seed(0)
    x, y = data.SegTrainTransform(crop_size=(20, 40), scale=(100, 100))(Image.new("RGB", (100, 100)),
                                                                       Image.new("L", (100, 100)))
    assert x.shape == (3, 20, 40) and y.shape == (20, 40)


def test_seg_random_crop_respects_cat_max_ratio():
    # class 1 on the left 50 columns, stripes of classes 2/3 on the right, an ignored band on top
    labels = np.ones((100, 100), dtype=np.uint8)
    labels[:, 50:] = np.where((np.arange(50) // 5) % 2 == 0, 2, 3)
    labels[:8] = 255
    img, mask = Image.new("RGB", (100, 100)), Image.fromarray(labels, "L")
    violations = 0
    for seed in range(40):
        random.seed(seed)
        _, crop = data.seg_random_crop(img, mask, (40, 40), cat_max_ratio=0.75)
        assert crop.size == (40, 40) and data.crop_box_ok(crop, 0.75)
        random.seed(seed)
        _, crop = data.seg_random_crop(img, mask, (40, 40), cat_max_ratio=1.0)
        violations += not data.crop_box_ok(crop, 0.75)
    assert violations >= 5  # without the constraint about a third of the crops are mostly class 1
    assert not data.crop_box_ok(Image.fromarray(np.full((4, 4), 3, np.uint8)), 0.75)  # a single class never passes
    two = np.array([[1, 1, 1, 2], [255, 255, 255, 255]], np.uint8)
    assert data.crop_box_ok(two, 0.8) and not data.crop_box_ok(two, 0.75)  # ignore pixels are not counted


def test_seg_train_transform_equals_mmsegs_pipeline_given_the_same_draws(monkeypatch):
    """What mmsegmentation 1.2.2 / mmcv-lite 2.1.0 (OpenCV 5.1.0) made of this image and label map on 2026-12-06:
    RandomResize(scale=(20, 10), ratio_range=(0.5, 2.0), keep_ratio=True), RandomCrop(crop_size=(8, 8),
    cat_max_ratio=0.75), RandomFlip(prob=0.5), SegDataPreProcessor(ImageNet mean / std, bgr_to_rgb=True, size=(8, 8),
    pad_val=0, seg_pad_val=255), with numpy's draws replaced by these: ratio 0.7015 (the image becomes 14x5), four
    crop boxes (the first three fail cat_max_ratio), a flip. Labels exact; pixels within one grey level (cv2 rounds
    its fixed-point bilinear weights)."""
    grey = (np.arange(30)[None, :] * 8 + np.arange(10)[:, None] * 5) % 256
    img = Image.fromarray(np.repeat(grey[..., None], 3, 2).astype(np.uint8), "RGB")
    labels = np.zeros((10, 30), np.uint8)
    labels[:, 22:], labels[6:, 25:], labels[:3] = 2, 3, 255  # ignored rows: a box of class 0 alone fails
    offsets = iter([0, 2, 0, 3, 0, 3, 0, 6])  # (top, left) of each box

    class Draws:
        uniform = staticmethod(lambda a, b: 0.7015463661686019)
        randint = staticmethod(lambda a, b: next(offsets))
        random = staticmethod(lambda: 0.20995480637147712)  # < 0.5: flip
    monkeypatch.setattr(data, "random", Draws)
    x, y = data.SegTrainTransform(crop_size=8, scale=(20, 10), photometric=False)(img, Image.fromarray(labels, "L"))
    ig = 255
    assert y.tolist() == [[ig] * 8, [ig] * 8, [2, 2, 2, 0, 0, 0, 0, 0], [3, 3, 2, 0, 0, 0, 0, 0],
                          [3, 3, 2, 0, 0, 0, 0, 0]] + [[ig] * 8] * 3
    mmseg = torch.tensor([[230, 213, 196, 179, 161, 144, 127, 110], [240, 223, 206, 189, 171, 154, 137, 120],
                          [195, 233, 216, 199, 181, 164, 147, 130], [77, 243, 226, 209, 191, 174, 157, 140],
                          [14, 180, 236, 219, 201, 184, 167, 150]], dtype=torch.float32)
    pixels = x[:, :5] * torch.tensor(data.IMAGENET_STD).view(3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    assert (pixels * 255 - mmseg).abs().max() <= 1 + 1e-3
    assert torch.equal(x[:, 5:], torch.zeros(3, 3, 8))  # padded after normalization, with 0


def test_seg_random_resize_follows_mmseg_rescale():
    img, mask = Image.new("RGB", (400, 300)), Image.new("L", (400, 300))
    out, out_mask = data.seg_rescale(img, mask, (2048, 512))
    assert out.size == out_mask.size == (683, 512)  # factor min(2048/400, 512/300) = 1.7067
    random.seed(0)
    ratio = random.uniform(0.5, 2.0)
    random.seed(0)
    out, _ = data.seg_random_resize(img, mask)
    factor = min(int(2048 * ratio) / 400, int(512 * ratio) / 300)
    assert out.size == (int(400 * factor + 0.5), int(300 * factor + 0.5))
    # a side that rounds to 0 pixels (--scale 1 1 on a 4:1 image) is 1 pixel: F.interpolate refused a size of 0
    out, out_mask = data.seg_rescale(Image.new("RGB", (400, 100)), Image.new("L", (400, 100)), (1, 1))
    assert out.size == out_mask.size == (1, 1)


def test_seg_rescale_keeps_a_tall_images_width_at_one_pixel():
    """As the height of a wide image: a tiny --scale on a 1:4 image rounds its width to 0 pixels, which
    F.interpolate refused; the width is kept at 1 pixel."""
    out, out_mask = data.seg_rescale(Image.new("RGB", (100, 400)), Image.new("L", (100, 400)), (1, 1))
    assert out.size == out_mask.size == (1, 1)


def _bilinear_half_pixel(a, w, h):
    """Reference: dst(x) samples src at (x + 0.5) * W / w - 0.5, clamped to the image, linear in both axes."""
    def axis(n_out, n_in):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo
    (y0, y1, fy), (x0, x1, fx) = axis(h, a.shape[0]), axis(w, a.shape[1])
    a = a.astype(np.float64)
    rows = a[y0] * (1 - fy)[:, None, None] + a[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def test_seg_images_resize_as_cv2_linear_without_antialiasing():
    a = np.random.default_rng(0).integers(0, 256, (75, 100, 3), dtype=np.uint8)
    for w, h in ((50, 38), (137, 103), (33, 25), (100, 75)):
        got = np.asarray(data.resize_cv2_linear(Image.fromarray(a), (w, h))).astype(int)
        expected = _bilinear_half_pixel(a, w, h)
        assert got.shape == (h, w, 3) and np.abs(got - expected).max() <= 0.5 + 1e-3  # rounded, float32
    # halving 2-pixel stripes: each output pixel is the mean of its 2x2 source pixels (no wider filter)
    stripes = np.repeat(np.tile([0, 0, 252, 252], (8, 2))[..., None], 3, -1).astype(np.uint8)  # (8, 8, 3)
    halved = np.asarray(data.resize_cv2_linear(Image.fromarray(stripes), (4, 4)))
    assert (halved[..., 0] == np.tile([0, 252], (4, 2))).all()
    blurred = np.asarray(Image.fromarray(stripes).resize((4, 4), Image.Resampling.BILINEAR))
    assert not (blurred[..., 0] == np.tile([0, 252], (4, 2))).all()  # PIL's BILINEAR would blur them
    img, _ = data.seg_rescale(Image.fromarray(stripes), None, (4, 4))
    assert np.array_equal(np.asarray(img), halved)  # the segmentation transforms' default


def test_seg_image_resize_does_not_depend_on_torchs_thread_count():
    """A DataLoader worker runs torch on one thread, --num_workers 0 on all: F.interpolate rounded some values
    otherwise with two threads (14 of 20 random resizes), so a run's pixels, and its weights, depended on the
    number of workers. The caller's thread count is kept."""
    rng, threads = np.random.default_rng(0), torch.get_num_threads()
    try:
        for _ in range(10):
            img = Image.fromarray(rng.integers(0, 256, (int(rng.integers(40, 300)), int(rng.integers(40, 300)), 3),
                                               dtype=np.uint8))
            size = (int(rng.integers(20, 400)), int(rng.integers(20, 400)))
            out = []
            for count in (1, 2):
                torch.set_num_threads(count)
                out.append(np.asarray(data.resize_cv2_linear(img, size)))
                assert torch.get_num_threads() == count
            assert np.array_equal(*out), (img.size, size)
    finally:
        torch.set_num_threads(threads)


def test_seg_masks_resize_as_cv2_nearest():
    """Labels as mmcv's imrescale(interpolation='nearest'), i.e. cv2.resize(INTER_NEAREST): output pixel x reads
    source pixel floor(x * W / w) (OpenCV's resizeNN), not the one under its center as PIL's NEAREST does. The
    expected columns for an 8-pixel row are that rule worked out by hand."""
    row = Image.fromarray(np.arange(8, dtype=np.uint8)[None].repeat(2, 0), "L")  # (2, 8)
    cases = {4: [0, 2, 4, 6], 12: [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7], 3: [0, 2, 5], 8: list(range(8))}
    for w, expected in cases.items():
        assert np.asarray(data.resize_cv2_nearest(row, (w, 2)))[0].tolist() == expected
    assert np.asarray(row.resize((4, 2), Image.Resampling.NEAREST))[0].tolist() == [1, 3, 5, 7]  # PIL's rule differs
    column = Image.fromarray(np.arange(5, dtype=np.uint8)[:, None].repeat(3, 1) * 10, "L")  # (5, 3): rows too
    assert np.asarray(data.resize_cv2_nearest(column, (3, 2)))[:, 0].tolist() == [0, 20]
    labels = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4), "L")
    _, mask = data.seg_rescale(Image.new("RGB", (4, 3)), labels, (6, 5))  # x1.5: the segmentation transforms' rule
    assert mask.size == (6, 5) and np.array_equal(np.asarray(mask), np.asarray(data.resize_cv2_nearest(labels, (6, 5))))
    assert not np.array_equal(np.asarray(mask), np.asarray(labels.resize((6, 5), Image.Resampling.NEAREST)))


def test_reduce_zero_label():
    out = data.reduce_zero_label(np.array([[0, 1, 2, 150, 255]], dtype=np.uint8))
    assert out.tolist() == [[255, 0, 1, 149, 255]]


class ScriptedRandom:
    """Stands in for data.random: randint and uniform return the scripted values in order."""

    def __init__(self, *values):
        self.values, self.bounds = list(values), []

    def randint(self, a, b):
        value = self.values.pop(0)
        assert a <= value <= b
        self.bounds.append((a, b))
        return value

    uniform = randint


def test_photometric_distortion_steps_as_mmseg(monkeypatch):
    """mmseg's steps with chosen draws: brightness +0.6 then contrast x1.5 round to uint8 after each step
    (11 -> 11.6 -> 11 -> 16.5 -> 16); a hue shift of -18 OpenCV units (180 per turn) is -26 of PIL's 256, drawn
    from [-18, 17] as mmseg's numpy randint(-18, 18)."""
    img = Image.new("RGB", (2, 2), (11, 11, 11))
    # brightness on (+0.6); contrast first (flag 1), on (x1.5); saturation off; hue off
    monkeypatch.setattr(data, "random", ScriptedRandom(1, 0.6, 1, 1, 1.5, 0, 0))
    assert np.asarray(data.photometric_distortion(img))[0, 0].tolist() == [16, 16, 16]
    red = Image.new("RGB", (2, 2), (200, 40, 40))
    # brightness off; contrast last (flag 0); saturation off; hue on (-18); contrast off
    draws = ScriptedRandom(0, 0, 0, 1, -18, 0)
    monkeypatch.setattr(data, "random", draws)
    hue = np.asarray(data.photometric_distortion(red).convert("HSV"))[0, 0, 0]
    assert int(hue) == (int(np.asarray(red.convert("HSV"))[0, 0, 0]) - 26) % 256
    assert draws.bounds[4] == (-18, 17)


def test_photometric_distortion_saturates_at_0_and_255(monkeypatch):
    """mmseg's convert: np.clip(img * alpha + beta, 0, 255).astype(np.uint8); without the clip, 240 + 32 wraps to 16
    (bright pixels turn dark) and 10 - 32 to 234."""
    img = Image.new("RGB", (2, 2), (240, 10, 128))
    # brightness on (+32 / -32); contrast first (flag 1), off; saturation off; hue off
    monkeypatch.setattr(data, "random", ScriptedRandom(1, 32, 1, 0, 0, 0))
    assert np.asarray(data.photometric_distortion(img))[0, 0].tolist() == [255, 42, 160]
    monkeypatch.setattr(data, "random", ScriptedRandom(1, -32, 1, 0, 0, 0))
    assert np.asarray(data.photometric_distortion(img))[0, 0].tolist() == [208, 0, 96]


def test_photometric_distortion_keeps_size_and_is_seeded():
    img = data.SyntheticShapes(1, 32).get(0)[0]
    random.seed(5)
    a = data.photometric_distortion(img)
    random.seed(5)
    b = data.photometric_distortion(img)
    assert a.size == img.size and a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))


def _seg_tree(root, names, size=(24, 16), ann_size=None):
    os.makedirs(root / "img", exist_ok=True)
    os.makedirs(root / "ann", exist_ok=True)
    for n in names:
        Image.new("RGB", size, (50, 60, 70)).save(root / "img" / f"{n}.jpg")
        Image.fromarray(np.full(ann_size or size[::-1], 3, np.uint8), "L").save(root / "ann" / f"{n}.png")


def test_seg_folder_and_errors(tmp_path):
    _seg_tree(tmp_path / "ok", ["a", "b"])
    ds = data.SegFolder(str(tmp_path / "ok" / "img"), str(tmp_path / "ok" / "ann"), reduce_zero_label=True)
    img, mask = ds[1]
    assert len(ds) == 2 and img.size == mask.size == (24, 16) and np.asarray(mask).max() == 2
    for img, ann, kind, missing in (("nope", "ok/ann", "image", "nope"), ("ok/img", "nope", "annotation", "nope")):
        with pytest.raises(FileNotFoundError, match=rf"^{kind} folder '.*{missing}' does not exist; expected images in "
                                                    rf"img_dir/<name>.jpg and label maps in ann_dir/<name>.png$"):
            data.SegFolder(str(tmp_path / img), str(tmp_path / ann))  # no test made it (train_seg checks first)
    _seg_tree(tmp_path / "miss", ["a", "b"])
    os.remove(tmp_path / "miss" / "ann" / "b.png")
    with pytest.raises(FileNotFoundError, match="1 images have no counterpart.*: b"):
        data.SegFolder(str(tmp_path / "miss" / "img"), str(tmp_path / "miss" / "ann"))
    _seg_tree(tmp_path / "size", ["a"], ann_size=(10, 10))
    with pytest.raises(ValueError, match="a.jpg.* is 24x16 \\(upright: its EXIF orientation applied\\) but its "
                                         "annotation .*a.png.* is 10x10"):
        data.SegFolder(str(tmp_path / "size" / "img"), str(tmp_path / "size" / "ann"))[0]
    _seg_tree(tmp_path / "rgb", ["a"])
    Image.new("RGB", (24, 16)).save(tmp_path / "rgb" / "ann" / "a.png")
    with pytest.raises(ValueError, match="single-channel label PNG"):
        data.SegFolder(str(tmp_path / "rgb" / "img"), str(tmp_path / "rgb" / "ann"))[0]


def test_seg_folder_applies_exif_orientation(tmp_path):
    """A photo stored sideways or upside down with an EXIF orientation tag is paired with its mask upright, as mmseg's
    OpenCV decoding does: tag 3 (180 degrees: same size, once a silent mismatch) and tag 6 (90 degrees clockwise)."""
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:16, :24] = (255, 0, 0)  # red top-left quadrant of the stored pixels
    upright_of = {3: np.rot90(stored, 2), 6: np.rot90(stored, -1)}
    for tag, want in upright_of.items():
        root = tmp_path / f"tag{tag}"
        os.makedirs(root / "img"), os.makedirs(root / "ann")
        exif = Image.Exif()
        exif[data.EXIF_ORIENTATION] = tag
        Image.fromarray(stored).save(root / "img" / "a.jpg", quality=100, exif=exif.tobytes())
        Image.fromarray((want[..., 0] > 127).astype(np.uint8), "L").save(root / "ann" / "a.png")
        img, mask = data.SegFolder(str(root / "img"), str(root / "ann"))[0]
        assert img.size == mask.size == (want.shape[1], want.shape[0])
        red = np.asarray(img)[..., 0] > 127
        assert np.array_equal(red, np.asarray(mask) == 1)
    plain = Image.new("RGB", (4, 2))
    assert data.upright(plain) is plain  # no tag: the image itself, no copy
    for tag in range(1, 9):  # every orientation as Pillow's exif_transpose turns it
        exif = Image.Exif()
        exif[data.EXIF_ORIENTATION] = tag
        Image.fromarray(stored).save(tmp_path / "o.png", exif=exif.tobytes())
        with Image.open(tmp_path / "o.png") as img:
            assert np.array_equal(np.asarray(data.upright(img)), np.asarray(ImageOps.exif_transpose(img))), tag
    exif = Image.Exif()
    exif[data.EXIF_ORIENTATION] = 6
    for name, damaged in (("garbage", b"Exif\x00\x00" + b"\xff" * 40), ("truncated", exif.tobytes()[:12])):
        path = tmp_path / f"{name}.jpg"  # Pillow's getexif raised SyntaxError / struct.error: a raw traceback
        Image.fromarray(stored).save(path, quality=100, exif=damaged)
        assert data.upright(data.load_image(str(path))).size == (48, 32)  # used as stored
    # orientation 6 read fine beside a tag of the wrong type (ASCII where Pillow expects a float), which made
    # ImageOps.exif_transpose fail as it rewrote the EXIF block: the photo was then used as stored, its mask rotated
    odd = bytes.fromhex("4578696600004d4d002a000000080004010f0002000000060000003e01120003000000010006000001"
                        "1a0005000000010000004401540002000000140000004c0000000043616e6f6e00000000480000000132"
                        "3032303a30313a30312030303a30303a303000")
    Image.fromarray(stored).save(tmp_path / "odd.jpg", quality=100, exif=odd)
    with pytest.raises(Exception):
        ImageOps.exif_transpose(data.load_image(str(tmp_path / "odd.jpg")))
    turned = np.asarray(data.upright(data.load_image(str(tmp_path / "odd.jpg"))))[..., 0] > 127
    assert np.array_equal(turned, upright_of[6][..., 0] > 127)


def test_seg_folder_turns_a_16_bit_grey_photo_upright_too(tmp_path):
    """load_image's 16-bit grey path makes a new image from the pixels, which lost the file's EXIF: a tag 3 photo was
    paired with its mask upside down, silently (same size)."""
    stored = np.zeros((32, 48), np.uint16)
    stored[:16, :24] = 65535  # white top-left quadrant of the stored pixels
    os.makedirs(tmp_path / "img"), os.makedirs(tmp_path / "ann")
    exif = Image.Exif()
    exif[data.EXIF_ORIENTATION] = 3
    Image.fromarray(stored).save(tmp_path / "img" / "a.png", exif=exif.tobytes())
    want = np.rot90(stored, 2) > 0
    Image.fromarray(want.astype(np.uint8), "L").save(tmp_path / "ann" / "a.png")
    img, mask = data.SegFolder(str(tmp_path / "img"), str(tmp_path / "ann"), img_suffix=".png")[0]
    with Image.open(tmp_path / "img" / "a.png") as opened:
        assert opened.mode.startswith("I;16")  # the 16-bit path, as a viewer turns it
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(opened)) > 0, want)
    assert np.array_equal(np.asarray(img)[..., 0] == 255, want) and np.array_equal(np.asarray(mask) == 1, want)


def test_seg_folder_file_listing(tmp_path):
    """Hidden files (macOS ._a.jpg) are skipped; a.jpg next to a.JPG is an error, not a silent pick; a folder of
    other images names the suffix to pass."""
    _seg_tree(tmp_path / "mac", ["a"])
    (tmp_path / "mac" / "img" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble metadata, not an image
    assert len(data.SegFolder(str(tmp_path / "mac" / "img"), str(tmp_path / "mac" / "ann"))) == 1
    _seg_tree(tmp_path / "twice", ["a"])
    Image.new("RGB", (24, 16)).save(tmp_path / "twice" / "img" / "a.JPG", "JPEG")
    with pytest.raises(ValueError, match="both 'a.JPG' and 'a.jpg'"):
        data.SegFolder(str(tmp_path / "twice" / "img"), str(tmp_path / "twice" / "ann"))
    _seg_tree(tmp_path / "png", ["a"])
    os.rename(tmp_path / "png" / "img" / "a.jpg", tmp_path / "png" / "img" / "a.png")
    with pytest.raises(FileNotFoundError, match="holds .png files: pass the images' suffix .*--img_suffix"):
        data.SegFolder(str(tmp_path / "png" / "img"), str(tmp_path / "png" / "ann"))
    _seg_tree(tmp_path / "nested", ["a"])  # Cityscapes-like: one subfolder per city
    os.makedirs(tmp_path / "nested" / "img" / "city1")
    os.rename(tmp_path / "nested" / "img" / "a.jpg", tmp_path / "nested" / "img" / "city1" / "a.jpg")
    with pytest.raises(FileNotFoundError, match="holds folders \\(city1\\), which are not read: the images and label "
                                                "maps must sit directly in img_dir"):
        data.SegFolder(str(tmp_path / "nested" / "img"), str(tmp_path / "nested" / "ann"))


def test_seg_folder_pairs_in_stem_order_and_reads_16_bit_labels_with_ignore(tmp_path):
    """Samples in the order of their stems ('a' before 'a-b', although 'a-b.jpg' sorts before 'a.jpg'): the index
    of a sample seeds its augmentation; a 16-bit label PNG holding 255 (ignore) is a label map, not out of range."""
    _seg_tree(tmp_path / "t", ["a-b", "a"])
    folder = data.SegFolder(str(tmp_path / "t" / "img"), str(tmp_path / "t" / "ann"))
    assert [os.path.basename(img) for img, _ in folder.samples] == ["a.jpg", "a-b.jpg"]
    wide = np.array([[0, 255], [1, 2]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    labels = data.load_label_map(str(tmp_path / "wide.png"))
    assert labels.dtype == np.uint8 and labels.tolist() == wide.tolist()


def test_a_float_label_map_with_fractions_is_refused_not_truncated(tmp_path):
    """A mode-F TIFF annotation was cast to uint8: 0.7 read as class 0 and NaN as 0, silently; whole numbers in float
    are still class indices."""
    for name, values in (("frac", [[0.7, 1.0]]), ("nan", [[np.nan, 1.0]])):
        Image.fromarray(np.array(values, np.float32), "F").save(tmp_path / f"{name}.tif")
        with pytest.raises(data.UnreadableImage, match="not whole numbers"):
            data.load_label_map(str(tmp_path / f"{name}.tif"))
    Image.fromarray(np.array([[2.0, 255.0]], np.float32), "F").save(tmp_path / "whole.tif")
    assert data.load_label_map(str(tmp_path / "whole.tif")).tolist() == [[2, 255]]


def test_ade20k_layout(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        os.makedirs(root / "images" / split)
        os.makedirs(root / "annotations" / split)
    Image.new("RGB", (8, 6)).save(root / "images" / "validation" / "ADE_val_1.jpg")
    Image.fromarray(np.array([[0, 1, 150, 0, 1, 150, 0, 1]] * 6, np.uint8), "L").save(
        root / "annotations" / "validation" / "ADE_val_1.png")
    ds = data.ADE20KDataset(str(root), "validation", transform=data.SegEvalTransform(scale=(32, 12)))
    x, y = ds[0]
    assert x.shape == (3, 12, 16) and y.shape == (6, 8) and set(y.unique().tolist()) == {255, 0, 149}
    assert len(data.ADE20K_CLASSES) == 150 and ds.classes is data.ADE20K_CLASSES
    with pytest.raises(FileNotFoundError, match="no '\\*.jpg' images"):
        data.ADE20KDataset(str(root), "training")
    Image.new("RGB", (8, 6)).save(root / "images" / "training" / "ADE_train_1.png")  # --data cannot take a suffix:
    with pytest.raises(FileNotFoundError, match="holds .png files: ADE20K's images are .jpg; for other files use "
                                                "train_seg.py's generic folders .* with --img_suffix"):
        data.ADE20KDataset(str(root), "training")
    with pytest.raises(FileNotFoundError, match=f"not an ADE20K folder: .*; it holds one: pass --data {root}$"):
        data.ADE20KDataset(str(tmp_path), "training")  # the folder the download was unpacked into: it named none
    with pytest.raises(FileNotFoundError, match="annotations/{training,validation}/\\*.png\\)$"):
        data.ADE20KDataset(str(root / "images"), "training")
    with pytest.raises(ValueError, match="split"):
        data.ADE20KDataset(str(root), "test")


def test_shapes_segmentation():
    shapes = data.SyntheticShapes(4, 64, num_classes=5)
    ds = data.ShapesSegmentation(shapes)
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and y.shape == (64, 64) and ds.num_classes == 6
    assert torch.equal(y, torch.from_numpy(np.asarray(shapes.get(0)[2]).astype(np.int64)))
    ds = data.ShapesSegmentation(shapes, data.SegTrainTransform(crop_size=48, scale=(256, 64)))
    random.seed(0)
    x, y = ds[1]
    assert x.shape == (3, 48, 48) and y.shape == (48, 48)
    assert set(y.unique().tolist()) <= set(range(6)) | {255}


# ---------------------------------------------------------------------------------------------------
# RandAugment's ops and draws, exactly (a mutation audit found them checked for size and mode only)

def stripes(width=40, height=20):
    """A non-square image whose every pixel differs: red = x * 6, green = y * 12."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x * 6, y * 12, np.full_like(x, 7)], axis=-1).astype(np.uint8))


def test_geometric_and_color_ops_transform_as_their_names_say():
    img, fill = stripes(), (0, 0, 0)
    a = np.asarray(img)
    op = lambda name, arg, image=img: np.asarray(data.RAND_AUGMENT_OPS[name][0](image, arg, fill))
    shifted = op("TranslateXRel", 0.25)  # out(x, y) = in(x + 0.25 * width, y): 10 pixels, not 0.25 * height
    assert np.array_equal(shifted[:, :30], a[:, 10:])
    shifted = op("TranslateYRel", 0.25)  # 5 rows
    assert np.array_equal(shifted[:15], a[5:])
    # Pillow samples at pixel centres: ShearX out(x, y) = in(x + f (y + 0.5), y), so at f = 0.4 row 2 moves by
    # exactly 1 pixel and row 7 by 3; ShearY likewise moves columns
    sheared = op("ShearX", 0.4)
    assert np.array_equal(sheared[2, :39], a[2, 1:]) and np.array_equal(sheared[7, :37], a[7, 3:])
    sheared = op("ShearY", 0.4)
    assert np.array_equal(sheared[:19, 2], a[1:, 2]) and np.array_equal(sheared[:17, 7], a[3:, 7])
    gray = Image.new("RGB", (8, 8), (100, 100, 100))  # brightness scales it; contrast leaves a flat image alone
    assert (op("BrightnessIncreasing", 0.5, gray) == 50).all() and (op("ContrastIncreasing", 0.5, gray) == 100).all()


def test_rand_augment_clips_the_magnitude_and_skips_ops_one_by_one(monkeypatch):
    calls = []
    monkeypatch.setattr(data.RandAugment, "apply_op", lambda self, img, name, m: calls.append((name, m)) or img)
    data.RandAugment(num_ops=3, magnitude=12, magnitude_std=0, op_prob=1.0, ops=["Rotate"])(stripes())
    assert calls == [("Rotate", 10.0)] * 3  # clipped to timm's _LEVEL_MAX
    calls.clear()
    draws = iter([0.9, 0.1, 0.9])  # op_prob 0.5: the first op skipped, the second applied, the third skipped
    monkeypatch.setattr(random, "random", lambda: next(draws))
    data.RandAugment(num_ops=3, magnitude=9, magnitude_std=0, op_prob=0.5, ops=["Rotate"])(stripes())
    assert calls == [("Rotate", 9)]


def test_rand_augment_magnitude_std_inf_draws_uniform_magnitudes_as_timm(monkeypatch):
    """timm 0.4.12's AugmentOp: magnitude_std inf samples magnitudes from U[0, magnitude] (N(9, inf) clipped gave only
    0 and 10). Expected: the magnitudes timm 0.4.12 itself applied, produced on 2026-12-06 (timm 0.4.12, Pillow 13.0.0)
    with `op = AugmentOp("Rotate", prob=0.5, magnitude=9, hparams=dict(img_mean=(124, 116, 104),
    interpolation=Image.BICUBIC, magnitude_std=inf))`, its op.level_fn replaced by one recording the magnitude,
    `random.seed(0)`, then 6 calls of `RandAugment([op], num_layers=2)` (timm.data.auto_augment). timm picks its ops
    from numpy's RNG, so with one op the pick is taken out of Python's stream here."""
    calls = []
    monkeypatch.setattr(data.RandAugment, "apply_op", lambda self, img, name, m: calls.append(m) or img)
    monkeypatch.setattr(random, "choices", lambda population, k: [population[0]] * k)
    ra = data.RandAugment(num_ops=2, magnitude=9, magnitude_std=float("inf"), op_prob=0.5, ops=["Rotate"])
    random.seed(0)
    for _ in range(6):
        ra(stripes())
    assert calls == [2.3302507526366703, 7.054187301312954, 4.2893725873712025, 6.802237837415015,
                     8.187716303714161]


def test_random_erasing_pixel_mode_draws_noise_per_channel():
    random.seed(0)
    torch.manual_seed(0)
    out = data.RandomErasing(prob=1.0, mode="pixel")(torch.zeros(3, 24, 24))
    erased = out.abs().sum(dim=0) > 0
    assert erased.any() and not torch.equal(out[0][erased], out[1][erased])


# Defaults and conventions the trainers rely on (from a mutation review of data.py: changing any of them passed every
# test): BEiT v2's / timm's / torchvision's / mmseg's values and rounding

def _seeded(fn, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return fn()


# --- Pre-training / fine-tuning transforms: the documented composition, with their defaults -------------------------

def test_pretrain_transform_is_crop_flip_jitter_normalize_with_beit_defaults():
    """PretrainTransform() = RandomResizedCrop(scale=(0.08, 1)) -> flip(0.5) -> ColorJitter(0.4, 0.4, 0.4, hue 0)
    -> normalize, drawing torch's RNG in that order."""
    img = data.SyntheticShapes(1, 64).get(0)[0]
    t = data.PretrainTransform(img_size=32)

    def by_hand():
        x = data.RandomResizedCrop(32, scale=(0.08, 1.0))(img)
        x = data.random_hflip(x, 0.5)
        return data.to_tensor(data.ColorJitter(0.4, 0.4, 0.4, 0.0)(x))
    for seed in range(8):
        assert torch.equal(_seeded(lambda: t(img), seed), _seeded(by_hand, seed)), seed


def test_finetune_transform_crop_covers_up_to_the_whole_image():
    """FinetuneTransform's crop is RandomResizedCrop(scale=(min_crop_scale, 1.0)) (timm), not capped below 1."""
    img = data.SyntheticShapes(1, 64).get(0)[0]
    t = data.FinetuneTransform(img_size=32, hflip=0.0, rand_num_ops=0, reprob=0)
    for seed in range(8):
        ref = _seeded(lambda: data.to_tensor(data.RandomResizedCrop(32, scale=(0.08, 1.0))(img)), seed)
        assert torch.equal(_seeded(lambda: t(img), seed), ref), seed


def test_color_jitter_applies_the_factors_in_torchvisions_random_order(monkeypatch):
    """torchvision's get_params: torch.randperm(4) first, then the factors; the adjustments run in that order
    (brightness and contrast do not commute on a colourful image, so the order shows)."""
    img = data.SyntheticShapes(1, 32).get(0)[0]
    adjust = (lambda im, f: data.ImageEnhance.Brightness(im).enhance(f),
              lambda im, f: data.ImageEnhance.Contrast(im).enhance(f),
              lambda im, f: data.ImageEnhance.Color(im).enhance(f), data.adjust_hue)
    outputs = set()
    for seed in range(12):
        torch.manual_seed(seed)
        order = torch.randperm(4).tolist()
        factors = [torch.empty(1).uniform_(lo, hi).item() for lo, hi in ((0.6, 1.4),) * 3 + ((-0.1, 0.1),)]
        expected = img
        for i in order:
            expected = adjust[i](expected, factors[i])
        torch.manual_seed(seed)
        out = np.asarray(data.ColorJitter(0.4, 0.4, 0.4, 0.1)(img))
        assert np.array_equal(out, np.asarray(expected)), seed
    # with fixed factors the output still depends on the drawn order
    monkeypatch.setattr(data, "_rand_uniform", lambda low, high: high)
    for seed in range(12):
        torch.manual_seed(seed)
        outputs.add(np.asarray(data.ColorJitter(0.4, 0.4, 0.4)(img)).tobytes())
    assert len(outputs) > 1


# --- RandAugment ----------------------------------------------------------------------------------------------------

def test_rand_augment_default_draws_match_timm_rand_m9_mstd05(monkeypatch):
    """timm 'rand-m9-mstd0.5-inc1': 2 ops, each applied with prob 0.5, magnitude ~ N(9, 0.5) clipped to [0, 10];
    FinetuneTransform passes its rand_* arguments through."""
    calls = []
    monkeypatch.setattr(data.RandAugment, "apply_op", lambda self, img, name, m: calls.append(m) or img)
    img = Image.new("RGB", (8, 8))
    random.seed(0)
    ra = data.FinetuneTransform(8).rand_augment
    for _ in range(1000):
        ra(img)
    m = np.array(calls)
    assert len(m) / 2000 == pytest.approx(0.5, abs=0.04)  # op_prob 0.5
    assert m.mean() == pytest.approx(9.0, abs=0.06) and m.std() == pytest.approx(0.5, abs=0.05)
    calls.clear()
    ra = data.FinetuneTransform(8, rand_magnitude=0, rand_magnitude_std=1.0).rand_augment
    for _ in range(300):
        ra(img)
    assert min(calls) == 0.0 and max(calls) > 1.0  # clipped at 0, not negative


def test_rand_augment_geometric_ops_fill_with_the_normalization_mean_colour():
    """timm's img_mean fill: round(255 * mean) = (124, 116, 104) for ImageNet's mean, where a translation uncovers
    the image."""
    black = Image.new("RGB", (40, 20))
    ra = data.RandAugment(num_ops=1, magnitude=10, magnitude_std=0, op_prob=1.0, ops=("TranslateXRel",))
    random.seed(0)
    out = np.asarray(ra(black))
    filled = (out == (124, 116, 104)).all(-1)
    assert filled.sum() == 18 * 20  # 0.45 * 40 columns
    ft = data.FinetuneTransform(8, mean=(0.5, 0.5, 0.5))
    random.seed(0)
    assert (np.asarray(ft.rand_augment.apply_op(black, "TranslateXRel", 10.0)) == 128).all(-1).sum() == 18 * 20


# --- RandomErasing --------------------------------------------------------------------------------------------------

def test_random_erasing_box_spans_timms_area_and_aspect_ranges():
    """Boxes cover 2%..1/3 of the image with aspect h/w in [0.3, 1/0.3], both orientations."""
    erase = data.RandomErasing(prob=1.0)
    H = W = 300
    random.seed(0)
    areas, aspects = [], []
    for _ in range(600):
        top, left, h, w = erase.get_params(H, W)
        areas.append(h * w / (H * W))
        aspects.append(h / w)
    assert 0.019 <= min(areas) < 0.03 and 0.30 < max(areas) <= 1 / 3 + 0.01
    assert 0.29 <= min(aspects) < 0.4 and 2.5 < max(aspects) <= 1 / 0.29
    assert np.mean(np.log(aspects)) == pytest.approx(0.0, abs=0.1)


def test_random_erasing_rand_and_const_modes_and_finetune_remode():
    x = torch.full((3, 32, 32), 5.0)
    random.seed(1)
    torch.manual_seed(1)
    out = data.RandomErasing(prob=1.0, mode="rand")(x)
    box = out[0] != 5
    assert box.any()
    per_channel = out[:, box]
    assert (per_channel == per_channel[:, :1]).all()  # one colour per channel
    assert len(set(per_channel[:, 0].tolist())) == 3
    img = data.SyntheticShapes(1, 32).get(0)[0]
    plain = data.FinetuneTransform(32, rand_num_ops=0, reprob=0)
    const = data.FinetuneTransform(32, rand_num_ops=0, reprob=1.0, remode="const")
    before, after = _seeded(lambda: plain(img), 3), _seeded(lambda: const(img), 3)
    changed = (before != after).any(0)
    assert changed.any() and (after[:, changed] == 0).all()


# --- Evaluation transform: torchvision's Resize(int) + CenterCrop ---------------------------------------------------

def test_eval_transform_truncates_sizes_and_rounds_the_crop_offset_as_torchvision():
    """torchvision Resize(int(img_size / crop_ratio)) (long side truncated) + CenterCrop (offset int(round(d / 2)))."""
    img = data.SyntheticShapes(1, 64).get(0)[0].resize((327, 222))
    t = data.EvalTransform(img_size=200, crop_ratio=0.9)
    assert t.resize_size == 222  # int(222.2); timm / BEiT: floor, not round
    left = int(round((327 - 200) / 2.0))  # round(63.5) = 64, not 63
    assert left == 64
    assert torch.equal(t(img), data.to_tensor(img.crop((left, 11, left + 200, 211))))
    # the long side is truncated, not rounded: 256 * 299 / 200 = 382.72 -> 382
    assert data.resize_shorter_side(Image.new("RGB", (299, 200)), 256).size == (382, 256)
    assert data.resize_shorter_side(Image.new("RGB", (200, 299)), 256).size == (256, 382)
    assert data.EvalTransform(32, crop_ratio=0.875).resize_size == 36  # int(36.57)


# --- CutMix box sides are int(), as timm's rand_bbox ----------------------------------------------------------------

def test_cutmix_box_side_truncates_before_halving():
    lam = 1 - 0.56 ** 2  # 10 * 0.56 = 5.6 -> int 5 -> 2 * (5 // 2) = 4 rows (round would give 6)
    for seed in range(50):
        random.seed(seed)
        (y0, y1, x0, x1), _ = data.cutmix_box(10, 100, lam)
        assert y1 - y0 <= 4


def test_mixup_defaults_are_mae_finetuning_recipe():
    m = data.Mixup()
    assert (m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob, m.label_smoothing) == (0.8, 1.0, 1.0, 0.5, 0.1)
    random.seed(0)
    assert sum(m.sample_params()[1] for _ in range(2000)) / 2000 == pytest.approx(0.5, abs=0.03)


# --- Segmentation ---------------------------------------------------------------------------------------------------

def test_seg_train_transform_flips_half_the_time_image_and_mask_together():
    labels = np.tile(np.arange(16, dtype=np.uint8), (16, 1))  # a left-to-right ramp
    img, mask = Image.fromarray(np.stack([labels * 10] * 3, -1)), Image.fromarray(labels, "L")
    t = data.SegTrainTransform(crop_size=16, scale=(16, 16), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                               photometric=False)
    assert t.flip_prob == 0.5
    flips = 0
    for seed in range(40):
        random.seed(seed)
        x, y = t(img, mask)
        flipped = bool(y[0, 0] == 15)
        assert torch.equal(y[0], torch.arange(15, -1, -1) if flipped else torch.arange(16))
        assert torch.equal(x, data.to_tensor(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else img))
        flips += flipped
    assert 10 <= flips <= 30


def test_photometric_distortion_default_ranges_are_mmsegs(monkeypatch):
    """Every step on: brightness U[-32, 32], contrast U[0.5, 1.5], saturation U[0.5, 1.5], hue randint[-18, 17]."""
    bounds = []

    class Recorder:
        @staticmethod
        def randint(a, b):
            bounds.append(("randint", a, b))
            return 1 if (a, b) == (0, 1) else a

        @staticmethod
        def uniform(a, b):
            bounds.append(("uniform", a, b))
            return a
    monkeypatch.setattr(data, "random", Recorder)
    data.photometric_distortion(Image.new("RGB", (2, 2), (100, 50, 20)))
    assert [b[1:] for b in bounds if b[0] == "uniform"] == [(-32, 32), (0.5, 1.5), (0.5, 1.5)]
    assert ("randint", -18, 17) in bounds


def test_seg_random_crop_retries_ten_times_then_keeps_the_last_draw(monkeypatch):
    """mmseg: up to 10 redraws when the crop fails cat_max_ratio; if none passes, the 11th box is kept."""
    checked = []
    monkeypatch.setattr(data, "crop_box_ok", lambda crop, *a: checked.append(crop.size) or False)
    ramp = Image.fromarray((np.arange(20)[:, None] * 10 + np.arange(10)[None, :]).astype(np.uint8), "L")  # 10x20
    random.seed(0)
    _, crop = data.seg_random_crop(ramp.convert("RGB"), ramp, (5, 5), cat_max_ratio=0.75)
    random.seed(0)
    for _ in range(11):
        top, left = random.randint(0, 15), random.randint(0, 5)
    assert len(checked) == 10 and np.asarray(crop)[0, 0] == top * 10 + left


def test_label_values_above_255_and_equal_to_num_classes_are_refused(tmp_path):
    Image.fromarray(np.array([[1, 256]], np.uint16)).save(tmp_path / "wide.png")
    with pytest.raises(data.UnreadableImage, match="outside 0..255"):
        data.load_label_map(str(tmp_path / "wide.png"))  # 256 would wrap to 0 (a real class) in uint8
    os.makedirs(tmp_path / "img")
    os.makedirs(tmp_path / "ann")
    Image.new("RGB", (4, 2)).save(tmp_path / "img" / "a.jpg")
    Image.fromarray(np.array([[0, 1, 2, 3]] * 2, np.uint8), "L").save(tmp_path / "ann" / "a.png")
    with pytest.raises(ValueError, match="holds label values \\[3\\], outside 0..2"):
        data.SegFolder(str(tmp_path / "img"), str(tmp_path / "ann"), num_classes=3)[0]
    assert data.SegFolder(str(tmp_path / "img"), str(tmp_path / "ann"), num_classes=4)[0][1].size == (4, 2)


def test_cv2_nearest_uses_opencvs_inverse_scale_rounding():
    """OpenCV's resizeNN reads floor(x * (1 / (w / W))) in doubles: 2 -> 98 pixels puts x = 49 on source 0
    (49 * (1 / 49.0) = 0.99999...), where the exact x * W / w = 1."""
    row = Image.fromarray(np.array([[0, 1]], np.uint8), "L")
    out = np.asarray(data.resize_cv2_nearest(row, (98, 1)))[0]
    assert out[49] == 0 and out[50] == 1 and out.sum() == 48


# --- ImageFolder ----------------------------------------------------------------------------------------------------

def test_image_folder_samples_are_sorted_by_path_whatever_the_listing_order(tmp_path):
    names = [f"{i:03d}.png" for i in range(40)]
    random.Random(0).shuffle(names)
    os.makedirs(tmp_path / "c")
    for n in names:  # created in shuffled order: the file system's listing is not sorted
        Image.new("RGB", (2, 2)).save(tmp_path / "c" / n)
    ds = data.ImageFolder(str(tmp_path))
    assert [os.path.basename(p) for p, _ in ds.samples] == sorted(names)


# ---------------------------------------------------------------------------------------------------------------------
# Second mutation review of data.py: each test below failed to exist while a one-token change to data.py passed every
# test (the change is named in the test's docstring)

# --- Normalization and loading --------------------------------------------------------------------------------------

def test_imagenet_normalization_constants_are_the_published_values():
    """torchvision's / timm's IMAGENET_DEFAULT_MEAN and _STD, written out (test_to_tensor_normalizes reads them from
    data, so 0.485 -> 0.486 or 0.225 -> 0.226 passed): black and white pixels normalize to these numbers."""
    assert data.IMAGENET_MEAN == (0.485, 0.456, 0.406) and data.IMAGENET_STD == (0.229, 0.224, 0.225)
    black, white = data.to_tensor(Image.new("RGB", (1, 1), (0, 0, 0))), data.to_tensor(Image.new("RGB", (1, 1),
                                                                                                  (255, 255, 255)))
    assert black.flatten().tolist() == pytest.approx([-2.1179039, -2.0357143, -1.8044444], abs=1e-6)
    assert white.flatten().tolist() == pytest.approx([2.2489083, 2.4285714, 2.64], abs=1e-6)


def test_16_bit_grey_scales_every_value_to_the_nearest_8_bit_level(tmp_path):
    """All 65536 levels: x -> round(x * 255 / 65535), computed here in integers (the 4-value ramp of
    test_image_modes_load_as_their_values_or_are_refused passed with / 256.5 instead of / 257)."""
    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(levels).save(tmp_path / "ramp.png")
    got = np.asarray(data.load_image(str(tmp_path / "ramp.png")))
    expected = (levels.astype(np.int64) * 255 + 32767) // 65535  # never a tie: x * 255 / 65535 is never k + 1/2
    assert got.shape == (256, 256, 3) and np.array_equal(got[..., 0], expected)
    assert np.array_equal(got[..., 1], got[..., 0]) and np.array_equal(got[..., 2], got[..., 0])


def test_image_folder_reads_every_listed_extension_and_names_at_most_five_empty_classes(tmp_path):
    """IMG_EXTENSIONS: torchvision's set (dropping .webp skipped WebP files without a word, so did leaving out
    .ppm/.pgm); the empty-class error names the first five, then '...'."""
    assert data.IMG_EXTENSIONS == (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
    formats = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF",
               ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM"}
    os.makedirs(tmp_path / "ok" / "c")
    for ext, fmt in formats.items():
        Image.new("RGB", (4, 3), (9, 99, 199)).save(tmp_path / "ok" / "c" / f"x{ext}", fmt)
    ds = data.ImageFolder(str(tmp_path / "ok"))
    assert sorted(os.path.splitext(p)[1] for p, _ in ds.samples) == sorted(formats)
    assert all(ds[i][0].size == (4, 3) for i in range(len(ds)))
    class_a = tmp_path / "empty" / "a"
    os.makedirs(class_a)
    Image.new("RGB", (2, 2)).save(class_a / "x.png")
    for name in "bcdefg":
        os.makedirs(tmp_path / "empty" / name)
    with pytest.raises(FileNotFoundError, match=r"6 of 7 class folders .* hold no images .*: b, c, d, e, f \.\.\."):
        data.ImageFolder(str(tmp_path / "empty"))


def test_image_folder_lists_the_images_torchvision_lists_whatever_the_extension_case(tmp_path):
    """The (path, label) list torchvision 0.28's ImageFolder gave for this tree (measured 2026-12-06, and the official
    DTM code's utils/dataset_folder.py the same): each of its nine extensions in either case, not .gif, .txt or a file
    without an extension. Before .ppm/.pgm were listed, a class's PPM and PGM images were left out without a word."""
    exts = [".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"]
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".ppm": "PPM", ".pgm": "PPM", ".tif": "TIFF", ".tiff": "TIFF"}
    for folder, name in (("lower", "x"), ("upper", "X")):
        os.makedirs(tmp_path / folder)
        for ext in exts:
            ext = ext if folder == "lower" else ext.upper()
            Image.new("RGB", (4, 3), (9, 99, 199)).save(tmp_path / folder / f"{name}{ext}",
                                                        fmt.get(ext.lower(), ext[1:].upper()))
    os.makedirs(tmp_path / "other")
    for name, fmt_name in (("x.gif", "GIF"), ("ok.JPEG", "JPEG"), ("png_no_ext", "PNG"), ("x.JpG", "JPEG")):
        Image.new("RGB", (4, 3)).save(tmp_path / "other" / name, fmt_name)
    (tmp_path / "other" / "notes.txt").write_text("x")
    ds = data.ImageFolder(str(tmp_path))
    expected = [("lower/x.bmp", 0), ("lower/x.jpeg", 0), ("lower/x.jpg", 0), ("lower/x.pgm", 0), ("lower/x.png", 0),
                ("lower/x.ppm", 0), ("lower/x.tif", 0), ("lower/x.tiff", 0), ("lower/x.webp", 0),
                ("other/ok.JPEG", 1), ("other/x.JpG", 1),
                ("upper/X.BMP", 2), ("upper/X.JPEG", 2), ("upper/X.JPG", 2), ("upper/X.PGM", 2), ("upper/X.PNG", 2),
                ("upper/X.PPM", 2), ("upper/X.TIF", 2), ("upper/X.TIFF", 2), ("upper/X.WEBP", 2)]
    assert ds.classes == ["lower", "other", "upper"]
    assert [(os.path.relpath(p, tmp_path), label) for p, label in ds.samples] == expected


def test_16_bit_pgm_scales_to_8_bits_as_16_bit_png(tmp_path):
    """Pillow opens a 16-bit PGM as mode 'I' with its values scaled to 0..65535 (maxval 1000: 1000 -> 65535); it is
    16-bit grey as 'I;16' PNG, not a 32-bit image of unknown range, so it loads as round(x / 257)."""
    (tmp_path / "a.pgm").write_bytes(b"P5 4 1 65535\n" + np.array([0, 128, 32896, 65535], ">u2").tobytes())
    (tmp_path / "b.pgm").write_bytes(b"P5 2 1 1000\n" + np.array([1000, 500], ">u2").tobytes())
    assert np.asarray(data.load_image(str(tmp_path / "a.pgm")))[0].tolist() == [[0] * 3, [0] * 3, [128] * 3, [255] * 3]
    assert np.asarray(data.load_image(str(tmp_path / "b.pgm")))[0].tolist() == [[255] * 3, [128] * 3]


# --- RandomResizedCrop / ColorJitter --------------------------------------------------------------------------------

def test_random_resized_crop_tries_ten_times_then_falls_back_and_refuses_scale_above_one(monkeypatch):
    """torchvision: 10 (area, aspect) draws before the center-crop fallback (9 passed every test: the reference test
    never needs the tenth); a crop as large as the image is taken at the first draw; scale above 1 is refused."""
    calls = []
    real = data._rand_uniform
    monkeypatch.setattr(data, "_rand_uniform", lambda low, high: calls.append((low, high)) or real(low, high))
    torch.manual_seed(0)
    assert data.RandomResizedCrop.get_params(1000, 10, (0.08, 1.0), (3 / 4, 4 / 3)) == (0, 493, 10, 13)
    assert len(calls) == 20  # 10 tries x (area, aspect)
    calls.clear()
    assert data.RandomResizedCrop.get_params(30, 30, (1.0, 1.0), (1.0, 1.0)) == (0, 0, 30, 30)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="scale"):
        data.RandomResizedCrop(8, scale=(0.5, 1.5))


def test_color_jitter_hue_goes_up_to_half_a_turn():
    """torchvision's hue bound is [0, 0.5], 0.5 included."""
    assert data.ColorJitter(0, 0, 0, hue=0.5).ranges[3] == (-0.5, 0.5)
    with pytest.raises(ValueError, match="hue"):
        data.ColorJitter(hue=0.51)


def test_color_jitter_refuses_a_negative_strength():
    """torchvision 0.28.0's ColorJitter refuses a negative strength ("must be non negative"); here -0.4 silently
    disabled that adjustment, and PretrainTransform(color_jitter=-0.4) trained without any jitter."""
    for i, name in enumerate(("brightness", "contrast", "saturation")):
        with pytest.raises(ValueError, match=f"{name} jitter must be >= 0"):
            data.ColorJitter(*[-0.4 if j == i else 0.4 for j in range(3)])
    with pytest.raises(ValueError, match="brightness jitter must be >= 0"):
        data.PretrainTransform(img_size=32, color_jitter=-0.4)
    assert data.PretrainTransform(img_size=32, color_jitter=0).jitter is None


# --- Block masking --------------------------------------------------------------------------------------------------

def test_block_mask_defaults_are_beit_v2_pretraining_ones():
    """BlockMaskGenerator() = the pre-training defaults of BEiT v2 (beit2/run_beitv2_pretraining.py:56-59) and
    naver-ai/dtm (run_pretrain_dtm.py:69-72): a 14x14 grid (224 / 16), 75 masked patches (--num_mask_patches),
    blocks of >= 16 (--min_mask_patches_per_block), max None, aspect 0.3..1/0.3: the same masks as BEiT's generator
    with those numbers (74 masked, min 15 or a 16x16 grid passed every test)."""
    gen = data.BlockMaskGenerator()
    exact = 0
    for seed in range(60):
        ours = gen(random.Random(seed)).numpy()
        ref = beit_reference_mask(random.Random(seed), 14, 14, 75, min_num=16, min_aspect=0.3)
        assert ours.shape == (14, 14) and ours.sum() == 75
        if ref.sum() == 75:
            exact += 1
            np.testing.assert_array_equal(ours, ref)
    assert exact > 30


def test_block_mask_equals_the_official_generator():
    """The masks of naver-ai/dtm 322df2e utils/masking_generator.py (= unilm beit2/masking_generator.py), run
    unmodified on 2026-12-06 (Python 3.11, numpy 2.4.6; random.seed(seed), then MaskingGenerator(grid, num,
    min_num_patches=min_block)()) for the first 3 seeds whose masks need no fix-up, as np.packbits(mask.ravel()).hex(),
    and its next random.random(): the same patches and the same number of draws."""
    official = {(14, 75, 16): [(0, "00000000003f20fc03f00ff03fc0ff03fc0fc03f00fc03f000", 0.13927370519815263),
                               (1, "00003800e003800e003800e07f8ffe3ff8ef83be0ef8380000", 0.9162698355052942),
                               (2, "3f84fe03fe0ff80fe003e00f803e00f803e00f803e00000000", 0.027444857090819008)],
                (7, 19, 4): [(0, "01d3870e1c3800", 0.13927370519815263), (1, "3062c7b060d800", 0.7431466604224978),
                             (2, "0200f1e3871e00", 0.027444857090819008)],
                (12, 54, 8): [(0, "000000000f8cf80f80fe0fe0fe0f80f80f84", 0.9021659504395827),
                              (1, "01c01c01c03c03c01c6066fe61e61e71e600", 0.36712383142708804),
                              (2, "0fc0fc0fc0fe00e00e03e03e20e00e00e00e", 0.23612340711506208)]}
    for (grid, num, min_block), masks in official.items():
        gen = data.BlockMaskGenerator((grid, grid), num, min_block)
        for seed, packed, next_draw in masks:
            rng = random.Random(seed)
            assert np.packbits(gen(rng).numpy().ravel()).tobytes().hex() == packed, (grid, seed)
            assert rng.random() == next_draw, (grid, seed)


def test_block_mask_gives_up_a_block_after_ten_proposals(monkeypatch):
    """BEiT's _mask: 10 proposals per block, then the loop stops (11 passed every test: the reference test accepts
    any mask containing BEiT's when BEiT stops short); the fix-up still makes the count exact."""
    gen = data.BlockMaskGenerator(grid=(6, 6), num_masked=9, min_block=4)
    proposals = []
    monkeypatch.setattr(gen, "sample_block", lambda rng, most: proposals.append(most))  # never fits: None
    mask = gen(random.Random(0))
    assert proposals == [9] * 10 and int(mask.sum()) == 9


def test_block_mask_max_aspect_bounds_the_block_shape():
    """An explicit max_aspect is used (it was replaced by 1 / min_aspect without a failing test): with aspect r in
    [0.3, 1], h = round(sqrt(s r)) is never more than w = round(sqrt(s / r))."""
    rng = random.Random(0)
    narrow = data.BlockMaskGenerator(grid=(14, 14), num_masked=75, min_aspect=0.3, max_aspect=1.0)
    blocks = [b for b in (narrow.sample_block(rng, 75) for _ in range(500)) if b is not None]
    assert len(blocks) > 300 and all(h <= w for _, _, h, w in blocks) and any(h < w for _, _, h, w in blocks)
    default = data.BlockMaskGenerator(grid=(14, 14), num_masked=75)
    blocks = [b for b in (default.sample_block(rng, 75) for _ in range(500)) if b is not None]
    assert any(h > w for _, _, h, w in blocks) and any(h < w for _, _, h, w in blocks)


def test_block_mask_refuses_a_negative_count_and_empty_blocks():
    """num_masked = -1 gave an all-False mask (no error); min_block 0 would propose empty blocks."""
    with pytest.raises(ValueError, match="num_masked=-1"):
        data.BlockMaskGenerator(grid=(14, 14), num_masked=-1)
    with pytest.raises(ValueError, match="min_block"):
        data.BlockMaskGenerator(grid=(14, 14), num_masked=10, min_block=0)
    with pytest.raises(ValueError, match="min_aspect"):
        data.BlockMaskGenerator(grid=(14, 14), num_masked=10, min_aspect=0)


def test_block_mask_refuses_a_max_block_below_one_patch():
    """max_block 0 accepted no block, so every mask came from the fix-up alone: 75 scattered patches, not block-wise,
    without an error; -5 failed with "math domain error" (found by fuzzing)."""
    for max_block in (0, -5):
        with pytest.raises(ValueError, match=rf"^max_block must be >= 1 patch \(None: no cap\), got {max_block}$"):
            data.BlockMaskGenerator(grid=(14, 14), num_masked=75, max_block=max_block)
    assert int(data.BlockMaskGenerator(grid=(14, 14), num_masked=75, max_block=1)(random.Random(0)).sum()) == 75
    with pytest.raises(ValueError, match=r"^max_aspect must be > 0, or None or 0 for 1 / min_aspect, got -2$"):
        data.BlockMaskGenerator(grid=(14, 14), num_masked=75, max_aspect=-2)
    zero, default = (data.BlockMaskGenerator(grid=(14, 14), num_masked=75, max_aspect=a) for a in (0, None))
    assert all(torch.equal(zero(random.Random(seed)), default(random.Random(seed))) for seed in range(20))  # 1 / 0.3


# --- RandAugment ----------------------------------------------------------------------------------------------------

def test_rand_augment_geometric_levels_are_timms():
    """timm (auto_augment.py _shear_level_to_arg, _translate_rel_level_to_arg, _rotate_level_to_arg): shear 0.3,
    translate 0.45 of the side, rotate 30 degrees at level 10, each with a random sign (0.35 / 0.4 / no negation
    passed every test)."""
    ops = data.RAND_AUGMENT_OPS
    random.seed(0)
    for name, top in (("ShearX", 0.3), ("ShearY", 0.3), ("TranslateXRel", 0.45), ("TranslateYRel", 0.45),
                      ("Rotate", 30.0)):
        args = [ops[name][1](10.0) for _ in range(200)]
        assert {round(a, 9) for a in args} == {top, -top}, name
        assert ops[name][1](5.0) in (pytest.approx(top / 2), pytest.approx(-top / 2))


def test_rand_augment_ops_are_the_pillow_operations_they_name():
    """Each op is the Pillow call timm's auto_augment.py makes (geometric ones bicubic, as timm's create_transform
    with interpolation='bicubic'); Contrast as Brightness, Sharpness as Color, Equalize as AutoContrast, Solarize at
    256 - t, or bilinear shears and rotations passed every test. The image separates every pair of operations."""
    img, fill = data.SyntheticShapes(1, 48, seed=3).get(0)[0], (124, 116, 104)
    bicubic, bilinear = Image.Resampling.BICUBIC, Image.Resampling.BILINEAR
    affine = lambda m, resample=bicubic: img.transform(img.size, Image.Transform.AFFINE, m, resample=resample,
                                                      fillcolor=fill)
    expected = {
        ("AutoContrast", None): ImageOps.autocontrast(img), ("Equalize", None): ImageOps.equalize(img),
        ("Invert", None): ImageOps.invert(img), ("Rotate", 20.0): img.rotate(20.0, resample=bicubic, fillcolor=fill),
        ("Posterize", 3): ImageOps.posterize(img, 3), ("PosterizeIncreasing", 3): ImageOps.posterize(img, 3),
        ("Solarize", 100): ImageOps.solarize(img, 100), ("SolarizeIncreasing", 100): ImageOps.solarize(img, 100),
        ("SolarizeAdd", 50): img.point(lambda v: min(255, v + 50) if v < 128 else v),
        ("ShearX", 0.2): affine((1, 0.2, 0, 0, 1, 0)), ("ShearY", 0.2): affine((1, 0, 0, 0.2, 1, 0)),
        ("TranslateXRel", 0.25): affine((1, 0, 12, 0, 1, 0)), ("TranslateYRel", 0.25): affine((1, 0, 0, 0, 1, 12)),
    }
    for enhancer in ("Color", "Contrast", "Brightness", "Sharpness"):
        for name in (enhancer, enhancer + "Increasing"):
            expected[(name, 1.7)] = getattr(ImageEnhance, enhancer)(img).enhance(1.7)
    assert {name for name, _ in expected} == set(data.RAND_AUGMENT_OPS)
    ra = data.RandAugment()
    for (name, arg), want in expected.items():
        got = data.RAND_AUGMENT_OPS[name][0](img, arg, ra.fill)
        assert np.array_equal(np.asarray(got), np.asarray(want)), name
    distinct = {np.asarray(want).tobytes() for (name, _), want in expected.items() if "Increasing" not in name}
    assert len(distinct) == 15  # the 15 original ops: no two give the same image
    assert not np.array_equal(np.asarray(img.rotate(20.0, resample=bilinear, fillcolor=fill)),
                              np.asarray(expected[("Rotate", 20.0)]))
    assert not np.array_equal(np.asarray(affine((1, 0.2, 0, 0, 1, 0), bilinear)),
                              np.asarray(expected[("ShearX", 0.2)]))


def test_fine_tuning_constructor_defaults_are_the_documented_recipe():
    """The classes' own defaults, as the module docstring states them (train_finetune passes its flags, so only a
    direct user sees these): RandAugment 'rand-m9-mstd0.5-inc1' (2 ops, prob 0.5), EvalTransform 224 / 0.875 = 256,
    Mixup over ImageNet's 1000 classes. Each changed alone passed every test."""
    ra = data.RandAugment()
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.op_prob, ra.ops) == (2, 9, 0.5, 0.5,
                                                                                  list(data.RAND_INCREASING_OPS))
    ft = data.FinetuneTransform()
    assert (ft.crop.size, ft.crop.scale, ft.rand_augment.ops) == (224, (0.08, 1.0), list(data.RAND_INCREASING_OPS))
    assert (ft.rand_augment.num_ops, ft.rand_augment.magnitude, ft.rand_augment.magnitude_std) == (2, 9, 0.5)
    ev = data.EvalTransform()
    assert (ev.img_size, ev.resize_size) == (224, 256)
    assert data.Mixup().num_classes == 1000 and data.Mixup()(torch.zeros(2, 3, 4, 4), torch.tensor([0, 999]))[
        1].shape == (2, 1000)


# --- RandomErasing --------------------------------------------------------------------------------------------------

def _timm_erase_params(height, width, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
    """timm's RandomErasing._erase box (random_erasing.py), written out: 10 attempts, h from area * aspect."""
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = random.uniform(min_area, max_area) * height * width
        aspect = math.exp(random.uniform(*log_aspect))
        h, w = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    return None


def test_random_erasing_box_is_timms_draw_for_draw():
    """With the same Python random state the box is timm's: h from area x aspect, offsets over 0..side - h both
    included (an offset range one short, or h and w swapped, passed every test)."""
    erase = data.RandomErasing(prob=1.0)
    edges = set()
    for seed in range(300):
        random.seed(seed)
        assert random.random() <= 1.0  # the prob draw get_params makes first
        expected = _timm_erase_params(12, 20)
        random.seed(seed)
        box = erase.get_params(12, 20)
        assert box == expected, seed
        top, left, h, w = box
        edges |= {"bottom"} if top + h == 12 else set()
        edges |= {"right"} if left + w == 20 else set()
    assert edges == {"bottom", "right"}  # boxes reach the last row and column


def test_random_erasing_tries_ten_boxes_and_uses_max_aspect(monkeypatch):
    """timm: 10 attempts, then no erasing (5 passed every test); an explicit max_aspect is used (it was replaced by
    1 / min_aspect without a failing test)."""
    draws = []
    monkeypatch.setattr(random, "uniform", lambda a, b: draws.append((a, b)) or b)  # the largest, tallest box
    assert data.RandomErasing(prob=1.0).get_params(10, 10) is None  # h = round(sqrt(33.3 * 3.33)) = 11 > 10
    assert len(draws) == 20
    monkeypatch.undo()
    random.seed(0)
    squat = data.RandomErasing(prob=1.0, min_aspect=0.3, max_aspect=1.0)
    boxes = [squat.get_params(100, 100) for _ in range(300)]
    assert all(h <= w for _, _, h, w in boxes) and any(h < w for _, _, h, w in boxes)


# --- CutMix ---------------------------------------------------------------------------------------------------------

def test_cutmix_box_centre_reaches_the_last_row_and_column():
    """timm's rand_bbox draws the centre over 0..H-1 and 0..W-1 (randint(0, H)), last ones included: a 2x2 box in a
    5x5 image ends at the bottom-right corner only from centre (4, 4) (randrange(H - 1) passed every test)."""
    lam = 1 - (2 / 5) ** 2  # cut 2 x 2: the box is cy - 1 .. cy + 1
    ends, starts = set(), set()
    for seed in range(300):
        random.seed(seed)
        (y0, y1, x0, x1), _ = data.cutmix_box(5, 5, lam)
        ends.add((y1, x1))
        starts.add((y0, x0))
    assert (5, 5) in ends and (0, 0) in starts
    assert {y for y, _ in ends} == {1, 2, 3, 4, 5} and {x for _, x in ends} == {1, 2, 3, 4, 5}


# --- Segmentation ---------------------------------------------------------------------------------------------------

def test_seg_folder_names_annotations_without_images(tmp_path):
    """A label PNG with no image is an error too, naming the image folder (only the other direction was tested)."""
    _seg_tree(tmp_path, ["a", "b"])
    os.remove(tmp_path / "img" / "b.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 annotations have no counterpart in .*img.*: b"):
        data.SegFolder(str(tmp_path / "img"), str(tmp_path / "ann"))


def test_seg_folder_without_a_common_name_names_the_suffix_flags(tmp_path):
    """Cityscapes-style names (x_leftImg8bit.png, x_gtFine_labelTrainIds.png) have no counterpart under the default
    suffixes; the error named no fix. It names the suffix flags, and those endings, passed, read the pairs."""
    for folder, ending in (("img", "_leftImg8bit.png"), ("ann", "_gtFine_labelTrainIds.png")):
        os.makedirs(tmp_path / folder)
        for name in ("a", "b"):
            Image.new("RGB" if folder == "img" else "L", (8, 8)).save(tmp_path / folder / f"{name}{ending}")
    with pytest.raises(FileNotFoundError, match=r"no name has a counterpart: .*pass the endings as the suffixes "
                                                r"\(train_seg.py: --img_suffix and --ann_suffix\)$"):
        data.SegFolder(str(tmp_path / "img"), str(tmp_path / "ann"), img_suffix=".png")
    assert len(data.SegFolder(str(tmp_path / "img"), str(tmp_path / "ann"), img_suffix="_leftImg8bit.png",
                              ann_suffix="_gtFine_labelTrainIds.png")) == 2
    os.rename(tmp_path / "ann" / "a_gtFine_labelTrainIds.png", tmp_path / "ann" / "a_leftImg8bit.png")
    with pytest.raises(FileNotFoundError, match=r"1 images have no counterpart.*: b_leftImg8bit; every image "
                                                r"<name>.png needs an annotation <name>.png and vice versa$"):
        data.SegFolder(str(tmp_path / "img"), str(tmp_path / "ann"), img_suffix=".png")
    # no label map at all (here: in a subfolder, as Cityscapes' per city): no ending would pair them, so none is named
    os.makedirs(tmp_path / "ann2" / "city")
    os.rename(tmp_path / "ann" / "b_gtFine_labelTrainIds.png", tmp_path / "ann2" / "city" / "b.png")
    with pytest.raises(FileNotFoundError, match=r"needs an annotation <name>.png and vice versa; '.*ann2' holds no "
                                                r"file ending in .png \(the label maps must sit directly in it\)$"):
        data.SegFolder(str(tmp_path / "img"), str(tmp_path / "ann2"), img_suffix="_leftImg8bit.png")


# --- Procedural data ------------------------------------------------------------------------------------------------

def test_ade20k_without_a_common_name_names_its_own_files_and_the_generic_folders(tmp_path):
    """ADE20K's --data takes no suffix flags: an ADE20K folder whose names differ by an ending names its own files and
    the generic folders' flags (the generic hint, --img_suffix and --ann_suffix, is refused beside --data)."""
    for folder, ending in (("images", "_img.jpg"), ("annotations", "_seg.png")):
        os.makedirs(tmp_path / folder / "training")
        Image.new("RGB" if folder == "images" else "L", (8, 8)).save(tmp_path / folder / "training" / f"a{ending}")
    with pytest.raises(FileNotFoundError, match=r"no name has a counterpart: .*ADE20K's files are <name>.jpg and "
                                                r"<name>.png; for other names use train_seg.py's generic folders"):
        data.ADE20KDataset(str(tmp_path), "training")


def test_synthetic_shapes_texture_follows_the_class_name():
    """Class c is TEXTURES[c // 8] on SHAPES[c % 8] (as .classes names it): classes 0..7 are solid (one colour),
    8..15 striped, 16..23 checkered, 24..31 dotted (two colours). TEXTURES[c % 4] passed every test (the demo
    would have drawn 'solid_square' striped)."""
    ds = data.SyntheticShapes(1, 64, num_classes=32)
    assert ds.classes[1] == "solid_square" and ds.classes[9] == "stripes_square" and ds.classes[31] == "dots_star"
    for cls in range(32):
        img, mask = np.zeros((64, 64, 3)), np.zeros((64, 64), np.uint8)
        ds._draw(img, mask, np.random.default_rng(cls), cls, 22.0, (32.0, 32.0))
        colours = np.unique(img[mask == cls + 1], axis=0)
        assert (mask == cls + 1).sum() > 200 and len(colours) == (1 if cls < 8 else 2), cls


def test_synthetic_shapes_and_shapes_segmentation_bounds_and_names():
    """ShapesSegmentation's class 0 is 'background' (its names index the per-class IoU); SyntheticShapes refuses
    images under 8 pixels and negative indices (both checks could be dropped without a failing test)."""
    shapes = data.SyntheticShapes(2, 16, num_classes=3)
    assert data.ShapesSegmentation(shapes).classes == ["background", "solid_circle", "solid_square", "solid_triangle"]
    with pytest.raises(ValueError, match="at least 8 pixels"):
        data.SyntheticShapes(2, 7)
    for bad in (-1, 2):
        with pytest.raises(IndexError, match="out of range"):
            shapes.get(bad)


def test_synthetic_shapes_takes_its_bounds():
    """8 pixels and 32 classes are the smallest image and the most classes SyntheticShapes makes (train_seg's
    --demo_img_size and --demo_shape_classes are checked against them): both are accepted."""
    image, label = data.SyntheticShapes(1, 8, num_classes=data.SyntheticShapes.MAX_CLASSES)[0]
    assert image.size == (8, 8) and data.SyntheticShapes.MAX_CLASSES == 32 and 0 <= label < 32


def test_seg_train_transform_defaults_are_mmsegs_ade20k_pipeline():
    """mmseg's ADE20K UperNet 512x512 pipeline, as the class docstring says: crop 512, scale (2048, 512) x U[0.5, 2],
    cat_max_ratio 0.75, flip 0.5, PhotoMetricDistortion on, cv2's bilinear for the image. train_seg passes the first
    four, not the last two; changing any default alone passed every test."""
    t = data.SegTrainTransform()
    assert (t.crop_size, t.scale, t.ratio_range, t.cat_max_ratio, t.flip_prob) == ((512, 512), (2048, 512),
                                                                                   (0.5, 2.0), 0.75, 0.5)
    assert t.photometric is True and t.image_resample == data.CV2_LINEAR and t.ignore_index == 255
    assert (t.mean, t.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert data.SegEvalTransform().scale == (2048, 512)


def test_seg_transforms_resize_with_cv2_bilinear_and_normalize_with_their_mean_and_std():
    """SegEvalTransform: the image rescaled to fit `scale` with cv2's bilinear (the half-pixel reference of
    test_seg_images_resize_as_cv2_linear_without_antialiasing), normalized with the given mean and std; the mask
    kept at full size. SegTrainTransform at scale 1, no crop, flip or distortion: the image normalized with its own
    mean and std. PIL's bicubic in SegEvalTransform, or the default mean/std in either, passed every test."""
    a = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    labels = np.random.default_rng(1).integers(0, 5, (30, 40), dtype=np.uint8)
    t = data.SegEvalTransform(scale=(32, 12), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x, y = t(Image.fromarray(a), Image.fromarray(labels, "L"))
    expected = (torch.from_numpy(_bilinear_half_pixel(a, 16, 12)).float().permute(2, 0, 1) / 255 - 0.5) / 0.25
    assert x.shape == (3, 12, 16) and (x - expected).abs().max() <= 0.5 / 255 / 0.25 + 1e-4  # factor min(32/40, 12/30)
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    train = data.SegTrainTransform(crop_size=(30, 40), scale=(40, 30), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                                   flip_prob=0.0, photometric=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    random.seed(0)
    x, y = train(Image.fromarray(a), Image.fromarray(labels, "L"))
    assert torch.allclose(x, (torch.from_numpy(a).float().permute(2, 0, 1) / 255 - 0.5) / 0.25, atol=1e-6)
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


def test_crop_box_ok_and_seg_random_crop_use_the_ignore_index_given(monkeypatch):
    """A custom ignore_index is the one left out of the cat_max_ratio count (255 was hard-wired without a failing
    test); seg_random_crop and SegTrainTransform pass theirs on."""
    two = np.array([[1, 1, 1, 2], [0, 0, 0, 0]], np.uint8)  # ignoring 0: 3 of 4 pixels are class 1
    assert data.crop_box_ok(two, 0.8, ignore_index=0) and not data.crop_box_ok(two, 0.75, ignore_index=0)
    assert data.crop_box_ok(two, 0.75)  # 0 counted (255 ignored): class 0 has 4 of 8
    seen = []
    monkeypatch.setattr(data, "crop_box_ok", lambda crop, ratio, ignore=data.IGNORE_INDEX: seen.append(ignore) or True)
    random.seed(0)
    data.SegTrainTransform(crop_size=8, scale=(16, 16), ignore_index=7)(Image.new("RGB", (16, 16)),
                                                                         Image.new("L", (16, 16)))
    assert seen == [7]


def test_photometric_saturation_scales_s_and_brightness_adds(monkeypatch):
    """Saturation scales HSV's S and leaves V (a red (200, 40, 40): S 204 -> 102, V 200); brightness adds a delta
    (100, 50, 20) + 20 = (120, 70, 40). Scaling V, or multiplying by 1 + delta / 255, passed every test (the
    existing step test adds 0.6 to 11, which rounds alike either way)."""
    red = Image.new("RGB", (2, 2), (200, 40, 40))
    assert np.asarray(red.convert("HSV"))[0, 0].tolist()[1:] == [204, 200]
    # brightness off; contrast last (flag 0); saturation on (x0.5); hue off; contrast off
    monkeypatch.setattr(data, "random", ScriptedRandom(0, 0, 1, 0.5, 0, 0))
    out = data.photometric_distortion(red).convert("HSV")
    assert np.asarray(out)[0, 0].tolist()[1:] == [102, 200]
    # brightness on (+20); contrast last; saturation, hue, contrast off
    monkeypatch.setattr(data, "random", ScriptedRandom(1, 20, 0, 0, 0, 0))
    out = data.photometric_distortion(Image.new("RGB", (2, 2), (100, 50, 20)))
    assert np.asarray(out)[0, 0].tolist() == [120, 70, 40]


def test_seg_folder_checks_labels_against_the_number_of_class_names(tmp_path):
    """classes without num_classes: num_classes = len(classes) (ADE20K's 150), so a label past the last class is
    refused by name; without that derivation no label was checked and every test passed."""
    _seg_tree(tmp_path, ["a"])  # labels all 3
    with pytest.raises(ValueError, match=r"holds label values \[3\], outside 0..2 \(3 classes\)"):
        data.SegFolder(str(tmp_path / "img"), str(tmp_path / "ann"), classes=("x", "y", "z"))[0]
    assert data.SegFolder(str(tmp_path / "img"), str(tmp_path / "ann"), classes=("w", "x", "y", "z")).num_classes == 4
    root = tmp_path / "ade"
    for kind in ("images", "annotations"):
        os.makedirs(root / kind / "validation")
    Image.new("RGB", (3, 1)).save(root / "images" / "validation" / "v.jpg")
    Image.fromarray(np.array([[0, 150, 151]], np.uint8), "L").save(root / "annotations" / "validation" / "v.png")
    with pytest.raises(ValueError, match=r"holds label values \[151\], outside 1..150 \(0 and 255 ignored, the rest "
                                         r"read as 0..149\); not an ADE20K label map .* use train_seg.py's generic "
                                         r"folders \(--img_dir.* with --num_classes"):  # as in the file, not reduced
        data.ADE20KDataset(str(root), "validation")[0]
    with pytest.raises(ValueError, match=r"holds label values \[3\], outside 1..2 .*check --num_classes and "
                                         r"--reduce_zero_label"):  # a generic folder: its label 3 read as 2
        data.SegFolder(str(tmp_path / "img"), str(tmp_path / "ann"), num_classes=2, reduce_zero_label=True)[0]


def test_seg_random_crop_at_ratio_one_checks_nothing_and_mismatched_pairs_are_refused(monkeypatch):
    """mmseg checks cat_max_ratio only when it is below 1: at 1.0 the first box is kept, even on a single-class mask
    (testing it, which redraws single-class crops up to 10 times, passed every test). SegTrainTransform refuses an
    image and mask of different sizes (without the check both were rescaled to the image's size, silently
    misaligned: no test failed)."""
    checked = []
    monkeypatch.setattr(data, "crop_box_ok", lambda *a: checked.append(1) or False)
    one_class = Image.new("L", (20, 20), 3)
    random.seed(0)
    data.seg_random_crop(Image.new("RGB", (20, 20)), one_class, (8, 8), cat_max_ratio=1.0)
    assert checked == []
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"image size \(20, 20\) and mask size \(20, 18\) differ"):
        data.SegTrainTransform(crop_size=8, scale=(20, 20))(Image.new("RGB", (20, 20)), Image.new("L", (20, 18)))
    with pytest.raises(ValueError, match="mode must be"):
        data.RandomErasing(mode="zero")


def test_a_big_endian_16_bit_tiff_is_scaled_to_8_bits_like_a_little_endian_one(tmp_path):
    """Pillow opens a 16-bit big-endian TIFF as mode I;16B: scaled as I;16 (x / 257), not clipped at 255 by
    convert("RGB")."""
    levels = np.array([[0, 257, 32896], [40000, 60000, 65535]], dtype=np.uint16)
    img = Image.frombytes("I;16B", (3, 2), levels.astype(">u2").tobytes())
    img.save(tmp_path / "big.tif")
    assert Image.open(tmp_path / "big.tif").mode == "I;16B"
    got = np.asarray(data.load_image(str(tmp_path / "big.tif")))[..., 0]
    expected = (levels.astype(np.int64) * 255 + 32767) // 65535
    assert np.array_equal(got, expected), got


def test_mixup_refuses_one_image_channels_last_and_labels_that_are_not_one_index_per_image():
    """Channels last (B, H, W, 3), CutMix boxed width x channels: its box was mostly empty (lam corrected to 1, no mix)
    or mixed the channels of one pixel; labels for another number of images gave targets for that number; one image
    (3, H, W) was "an odd batch of 3"; one-hot labels failed in scatter_ ("Expected index [16, 1] to be no larger than
    self [4, 4]"). Each is refused, naming the fix."""
    m = data.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=4)
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)
    with pytest.raises(ValueError, match=r"^Mixup takes images \(B, C, H, W\), channels first, got \(4, 16, 16, 3\): "
                                         r"pass images.permute\(0, 3, 1, 2\)$"):
        m(x.permute(0, 2, 3, 1), y)
    with pytest.raises(ValueError, match=r"^Mixup takes images \(B, C, H, W\), channels first, got \(3, 16, 16\); one "
                                         r"image\? Mixup mixes the images of a batch$"):
        m(x[0], y[:1])
    with pytest.raises(ValueError, match=r"^Mixup takes labels \(B,\) = \(4,\), one class index per image, got "
                                         r"\(2,\)$"):
        m(x, y[:2])
    with pytest.raises(ValueError, match=r"^Mixup takes labels \(B,\) = \(4,\), one class index per image, got "
                                         r"\(4, 4\); one-hot labels\? pass labels.argmax\(1\)$"):
        m(x, torch.nn.functional.one_hot(y, 4))
    assert m(x[:, :1], y)[0].shape == (4, 1, 16, 16)  # grey images, channels first
    # grey channels last, a clip of frames (B, T, C, H, W), one-hot labels of other images: no hint that misleads
    with pytest.raises(ValueError, match=r"got \(4, 16, 16, 1\): pass images.permute\(0, 3, 1, 2\)$"):
        m(x[:, :1].permute(0, 2, 3, 1), y)
    with pytest.raises(ValueError, match=r"^Mixup takes images \(B, C, H, W\), channels first, got "
                                         r"\(4, 1, 3, 16, 16\)$"):
        m(x[:, None], y)
    with pytest.raises(ValueError, match=r"one class index per image, got \(2, 4\)$"):
        m(x, torch.nn.functional.one_hot(y, 4)[:2])
    assert m(x[..., :3], y)[0].shape == (4, 3, 16, 3)  # 3 pixels wide, channels first: not read as channels last


def test_a_negative_label_value_is_refused_naming_it(tmp_path):
    """A 32-bit TIFF label map holding -1 (a common 'ignore') read as 255 through uint8, ignored without a word, were
    the range not checked below 0; the message names the smallest value (it named only the largest, 3: in range)."""
    Image.fromarray(np.array([[-1, 3]], np.int32)).save(tmp_path / "negative.tif")
    with pytest.raises(data.UnreadableImage, match=r"outside 0..255 \(min -1, max 3\); a label map's pixels "
                                                       r"are class indices \(255: ignore\): save it as an 8-bit PNG$"):
        data.load_label_map(str(tmp_path / "negative.tif"))


def test_dataset_sets_names_one_folder_per_set_whatever_the_listing_order():
    """Two names of one set (val/ and val2017/): the first in sorted order is named, so a refusal names the same
    folder whatever order the file system lists them in (os.walk's is unsorted)."""
    for names in (["val2017", "val", "train"], ["train", "val", "val2017"]):
        assert data.dataset_sets(names) == {"train": "train", "val": "val"}, names


def test_random_hflip_at_probability_0_and_1_whatever_the_draw(monkeypatch):
    """torchvision's `torch.rand(1) < p`: p = 0 never flips, even on a draw of 0.0; p = 1 always flips."""
    img = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8), "RGB")
    flipped = np.asarray(img)[:, ::-1]
    for draw in (0.0, 0.999):
        monkeypatch.setattr(data.torch, "rand", lambda *_, d=draw: torch.tensor([d]))
        assert np.array_equal(np.asarray(data.random_hflip(img, p=0.0)), np.asarray(img))
        assert np.array_equal(np.asarray(data.random_hflip(img, p=1.0)), flipped)


def test_block_mask_max_block_below_min_block_caps_each_block(monkeypatch):
    """BEiT's _mask caps each block at min(patches left, max_num_patches) even below min_num_patches (its area draw,
    uniform(16, 4), then lies in [4, 16]): max_block 4 with min_block 16 masks blocks of at most 4 patches."""
    gen = data.BlockMaskGenerator(grid=(14, 14), num_masked=75, min_block=16, max_block=4)
    asked, added = [], []
    sample, add = gen.sample_block, gen._add_block
    monkeypatch.setattr(gen, "sample_block", lambda rng, most: asked.append(most) or sample(rng, most))
    monkeypatch.setattr(gen, "_add_block", lambda mask, rng, most: added.append(add(mask, rng, most)) or added[-1])
    for seed in range(3):
        assert int(gen(random.Random(seed)).sum()) == 75
    assert max(asked) == 4 and 0 < max(added) <= 4


def test_synthetic_shapes_label_ties_go_to_the_lower_class(monkeypatch):
    """The docstring's tie rule: among the classes with the most mask pixels, the lower one. Each shape is painted
    as one full row here, so classes drawn once each tie."""
    def paint_a_row(self, img, mask, rng, cls, radius, center):
        mask[int((mask != 0).any(axis=1).sum())] = cls + 1
    monkeypatch.setattr(data.SyntheticShapes, "_draw", paint_a_row)
    shapes, ties = data.SyntheticShapes(40, img_size=8, num_classes=10), 0
    for i in range(len(shapes)):
        _, label, mask = shapes.get(i)
        counts = np.bincount(np.asarray(mask).ravel(), minlength=11)[1:]
        tied = [c for c in range(10) if counts[c] == counts.max()]
        assert label == tied[0]
        ties += len(tied) > 1
    assert ties >= 5


def test_synthetic_shapes_draws_the_whole_shape_in_its_class_colours():
    """_draw paints inside a box of 1.2 radii around the center: the square's corners (0.8 * sqrt(2) = 1.13 radii)
    and the cross's (1.04) must fit in it. Against a reference over the whole image, with the same draws: the angle,
    then hue = class * 0.618034 + U[-0.25, 0.25] (turns), saturation U[0.5, 1], value U[0.6, 1] (colorsys), the
    texture's second colour that one times U[0.2, 0.45], where its pattern (3 periods per radius) shows."""
    import colorsys
    shapes = data.SyntheticShapes(1, img_size=64)
    yy, xx = np.meshgrid(np.arange(64) + 0.5, np.arange(64) + 0.5, indexing="ij")
    patterns = {"solid": lambda u, v: np.zeros(u.shape, bool), "stripes": lambda u, v: np.sin(6 * np.pi * u) > 0,
                "checker": lambda u, v: np.sin(3 * np.pi * u) * np.sin(3 * np.pi * v) > 0,
                "dots": lambda u, v: (3 * u % 1 - 0.5) ** 2 + (3 * v % 1 - 0.5) ** 2 < 0.09}
    for cls in range(32):
        for seed in range(3):
            img, mask = np.zeros((64, 64, 3), np.float32), np.zeros((64, 64), np.uint8)
            shapes._draw(img, mask, np.random.default_rng(seed), cls, 20.0, (31.0, 33.0))
            ref = np.random.default_rng(seed)
            theta = ref.uniform(0, 2 * np.pi)
            hue = (cls * 0.618034 + ref.uniform(-0.25, 0.25)) % 1.0
            colour = np.array(colorsys.hsv_to_rgb(hue, ref.uniform(0.5, 1.0), ref.uniform(0.6, 1.0))) * 255
            second = colour * ref.uniform(0.2, 0.45)
            dx, dy = xx - 31.0, yy - 33.0
            u = (np.cos(theta) * dx + np.sin(theta) * dy) / 20.0
            v = (-np.sin(theta) * dx + np.cos(theta) * dy) / 20.0
            inside = data._shape_inside(data.SHAPES[cls % 8], u, v)
            on = patterns[data.TEXTURES[cls // 8]](u, v)
            assert np.array_equal(mask == cls + 1, inside), (cls, seed)
            np.testing.assert_allclose(img[inside], np.where(on[inside, None], second, colour), atol=1e-3)


def test_rand_augment_draws_only_what_timm_draws():
    """timm's AugmentOp draws its apply coin only when prob < 1 and a magnitude only when magnitude_std is not 0
    (--aa rand-m9-n2 has none): with op_prob 1 and std 0, the ops' choice is the only draw, so later draws (the
    erasing box) are timm's."""
    ops = ("AutoContrast", "Equalize")
    aug = data.RandAugment(num_ops=2, magnitude=9, magnitude_std=0, op_prob=1.0, ops=ops)
    random.seed(5)
    aug(Image.new("RGB", (4, 4), (10, 20, 30)))
    after = random.random()
    random.seed(5)
    random.choices(ops, k=2)
    assert after == random.random()


def test_seg_train_transform_pads_the_mask_with_its_ignore_index():
    """The padding below and right of a crop larger than the image: 0 in the (normalized) image, the transform's
    ignore_index in the mask (not 255 whatever was asked)."""
    img = Image.new("RGB", (4, 4), (120, 130, 140))
    mask = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4), "L")
    tf = data.SegTrainTransform(crop_size=(6, 8), scale=(4, 4), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                                flip_prob=0.0, photometric=False, ignore_index=100)
    x, y = tf(img, mask)
    assert torch.equal(y[:4, :4], torch.arange(16).view(4, 4))
    assert (y[4:] == 100).all() and (y[:, 4:] == 100).all()
    assert (x[:, 4:] == 0).all() and (x[:, :, 4:] == 0).all() and (x[:, :4, :4] != 0).all()


def test_photometric_distortion_takes_the_ranges_given(monkeypatch):
    """Each step draws from its own argument (saturation from saturation_range, not contrast_range: the defaults are
    the same, so only other ranges tell them apart)."""
    bounds = []

    class Recorder:
        @staticmethod
        def randint(a, b):
            bounds.append((a, b))
            return 1 if (a, b) == (0, 1) else a

        @staticmethod
        def uniform(a, b):
            bounds.append((a, b))
            return a
    monkeypatch.setattr(data, "random", Recorder)
    data.photometric_distortion(Image.new("RGB", (2, 2), (100, 50, 20)), brightness_delta=5,
                                contrast_range=(0.9, 1.1), saturation_range=(0.2, 0.3), hue_delta=4)
    assert [b for b in bounds if b != (0, 1)] == [(-5, 5), (0.9, 1.1), (0.2, 0.3), (-4, 3)]  # contrast first here
