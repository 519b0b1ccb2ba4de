"""Tests for study.py's own pieces: the Fashion-MNIST reader, the ImageFolders it writes, the adjacency measure."""
import gzip
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dtm
import mto
import study


def write_idx(path, array):
    """The IDX format of (Fashion-)MNIST: 0, 0, dtype 0x08 (uint8), ndims, big-endian dims, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (40, 28, 28)),
              "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 40),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 12)}
    root = tmp_path / "fashion"
    root.mkdir()
    for name, array in arrays.items():
        write_idx(root / name, array)
    monkeypatch.setattr(study, "FASHION", str(root))
    return arrays


def test_read_idx_returns_the_written_array(fake_fashion):
    for name, array in fake_fashion.items():
        np.testing.assert_array_equal(study.read_idx(name), array)


def test_make_data_writes_each_image_under_its_label(fake_fashion, tmp_path):
    root = study.make_data(str(tmp_path / "out"))
    images = fake_fashion["t10k-images-idx3-ubyte.gz"]
    labels = fake_fashion["t10k-labels-idx1-ubyte.gz"]
    files = sorted((c, f) for c in os.listdir(os.path.join(root, "val500"))
                   for f in os.listdir(os.path.join(root, "val500", c)))
    assert len(files) == len(images)
    for label_name, file in files:
        i = int(file.split(".")[0])
        assert study.CLASSES[labels[i]] == label_name
        pixels = np.asarray(Image.open(os.path.join(root, "val500", label_name, file)))
        assert pixels.shape == (28, 28, 3)
        np.testing.assert_array_equal(pixels[..., 0], images[i])  # grayscale as RGB, lossless
    count = lambda name: sum(len(fs) for _, _, fs in os.walk(os.path.join(root, name)))
    assert count("train3000") == 40 and count("train1000") == 40  # all 40 fake images, fewer than 3000 / 1000


def test_make_data_cut_short_is_written_again(fake_fashion, tmp_path, monkeypatch):
    write_folder = study.write_folder

    def dies_in_val500(root, images, labels):
        if root.endswith("val500"):
            write_folder(root, images[:3], labels[:3])
            raise KeyboardInterrupt
        write_folder(root, images, labels)

    monkeypatch.setattr(study, "write_folder", dies_in_val500)
    with pytest.raises(KeyboardInterrupt):
        study.make_data(str(tmp_path / "out"))
    monkeypatch.setattr(study, "write_folder", write_folder)
    root = study.make_data(str(tmp_path / "out"))
    assert sum(len(fs) for _, _, fs in os.walk(os.path.join(root, "val500"))) == 12  # all, not the 3 of the cut run
    assert not os.path.exists(root + ".partial")


def test_make_data_without_the_package_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "FASHION", str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        study.make_data(str(tmp_path / "out"))


def test_adjacent_cosine_equals_a_loop_over_neighbour_pairs():
    tokens = torch.randn(2, study.GRID * study.GRID, 5)
    grid = tokens.reshape(2, study.GRID, study.GRID, 5)
    pairs = []
    for b in range(2):
        for i in range(study.GRID):
            for j in range(study.GRID):
                for di, dj in ((0, 1), (1, 0)):
                    if i + di < study.GRID and j + dj < study.GRID:
                        pairs.append(F.cosine_similarity(grid[b, i, j], grid[b, i + di, j + dj], dim=0))
    assert len(pairs) == 2 * 2 * study.GRID * (study.GRID - 1)
    assert study.adjacent_cosine(tokens) == pytest.approx(torch.stack(pairs).mean().item(), abs=1e-6)
    assert study.adjacent_cosine(torch.ones(1, study.GRID * study.GRID, 3)) == pytest.approx(1.0)


def test_consistency_reads_a_pretraining_checkpoint_and_measures_its_predictions(tmp_path):
    torch.manual_seed(0)
    student = dtm.build_vit("vit_tiny", img_size=study.IMG, rel_pos_bias="both")
    teacher = dtm.build_teacher("pixels", study.IMG, dtm.PATCH_SIZE)
    head = torch.nn.Linear(student.embed_dim, teacher.out_dim)
    model = {**{f"student.{k}": v for k, v in student.state_dict().items()},
             **{f"head.{k}": v for k, v in head.state_dict().items()}}
    path = str(tmp_path / "checkpoint-last.pth")
    torch.save({"model": model, "args": {"rel_pos_bias": "both"}}, path)
    images = torch.randn(3, 3, study.IMG, study.IMG)
    masks = torch.rand(3, study.GRID * study.GRID) < 0.4

    cosine, token_loss, dtm_loss = study.consistency(path, teacher, images, masks)

    student.eval()
    with torch.no_grad():
        pred = head(student.forward_features(images, masks).tokens[:, 1:])
        target = teacher(images)
    assert cosine == pytest.approx(study.adjacent_cosine(pred), abs=1e-6)
    assert token_loss == pytest.approx(F.smooth_l1_loss(pred, target, beta=2.0).item(), rel=1e-5)
    assert dtm_loss != pytest.approx(token_loss)  # 24 x 3 merges change the loss
    # a student pre-trained with --mto is scored with its training forward: the recalibrated attention
    torch.save({"model": model, "args": {"rel_pos_bias": "both", "mto": True, "mto_layers": None}}, path)
    mto_cosine, mto_token_loss, _ = study.consistency(path, teacher, images, masks)
    with torch.no_grad():
        recalibrated = head(mto.mto_forward(student, images, masks, mto.MTOConfig(lambda_sing=0, lambda_ent=0))[0][:, 1:])
    assert mto_token_loss == pytest.approx(F.smooth_l1_loss(recalibrated, target, beta=2.0).item(), rel=1e-5)
    assert mto_cosine == pytest.approx(study.adjacent_cosine(recalibrated), abs=1e-6) and mto_cosine != cosine


def test_a_relative_out_folder_is_the_callers_not_the_repos(tmp_path, monkeypatch):
    """The runs start in the repo (cwd=HERE): a relative --out given elsewhere named another folder there."""
    calls = []

    def first_run(script, argv, log):
        calls.append(argv)
        raise SystemExit("stop after the first command")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study, "make_data", lambda out: os.path.join(out, "data"))
    monkeypatch.setattr(study, "run", first_run)
    monkeypatch.setattr("sys.argv", ["study.py", "--out", "rel"])
    with pytest.raises(SystemExit):
        study.main()
    argv = calls[0]
    assert argv[argv.index("--output_dir") + 1] == str(tmp_path / "rel" / "teacher")
    assert argv[argv.index("--data_train") + 1] == str(tmp_path / "rel" / "data" / "train3000")


def test_a_relaunch_with_other_epochs_is_refused(tmp_path, monkeypatch):
    """Finished runs are skipped whatever their epochs: a relaunch in the same --out with other epoch counts would mix
    old runs (or an older teacher's students) with new ones in one table."""
    monkeypatch.setattr(study, "make_data", lambda out: os.path.join(out, "data"))
    monkeypatch.setattr(study, "run", lambda script, argv, log: (_ for _ in ()).throw(SystemExit("stop")))
    out = str(tmp_path / "s")
    for epochs, message in (("3", "stop"), ("3", "stop"),  # the first run, then the same epochs: on to the runs
                            ("2", "ran with other epochs \\(--finetune_epochs 3 -> 2\\)")):
        monkeypatch.setattr("sys.argv", ["study.py", "--out", out, "--finetune_epochs", epochs])
        with pytest.raises(SystemExit, match=message):
            study.main()
    monkeypatch.setattr("sys.argv", ["study.py", "--out", out, "--pretrain_epochs", "1"])  # its half arm: 1 epoch too
    with pytest.raises(SystemExit) as exit_status:
        study.main()
    assert exit_status.value.code == 2
