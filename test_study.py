"""Tests for study.py's own pieces: the Fashion-MNIST reader, the ImageFolders it writes, the adjacency measure."""
import collections
import gzip
import io
import json
import os
import random
import statistics
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import dtm
import morph
import mto
import plot_log
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


def pretrained_student(path, **args):
    """A random vit_tiny student and head saved as a pre-training checkpoint with args -> (student, pixel teacher,
    head, the checkpoint's model dict)."""
    torch.manual_seed(0)
    student = dtm.build_vit("vit_tiny", img_size=study.IMG, rel_pos_bias="both")
    teacher = dtm.build_teacher("pixels", study.IMG, dtm.PATCH_SIZE)
    head = torch.nn.Linear(student.embed_dim, teacher.out_dim)
    model = {**{f"student.{k}": v for k, v in student.state_dict().items()},
             **{f"head.{k}": v for k, v in head.state_dict().items()}}
    torch.save({"model": model, "args": {"rel_pos_bias": "both", **args}}, path)
    return student, teacher, head, model


def test_consistency_reads_a_pretraining_checkpoint_and_measures_its_predictions(tmp_path):
    path = str(tmp_path / "checkpoint-last.pth")
    student, teacher, head, model = pretrained_student(path)
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
        hidden = mto.mto_forward(student, images, masks, mto.MTOConfig(lambda_sing=0, lambda_ent=0))[0]
        recalibrated = head(hidden[:, 1:])
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
    monkeypatch.setattr("sys.argv", ["study.py", "--out", out, "--pretrain_epochs", "3"])  # its half arm: 1 epoch
    with pytest.raises(SystemExit) as exit_status:
        study.main()
    assert exit_status.value.code == 2


TEACHER_TOKENS = torch.arange(256 * 49 * 4.0).reshape(256, 49, 4).sin()


def fake_study(tmp_path, monkeypatch, argv=(), extras=(0, 5, 2)):
    """study.main with every run faked: each fine-tuning run's log.jsonl holds val_top1 = 10 * arm + 3 * p + seed +
    extras over its 3 epochs (by default (0, 5, 2): best +5, last +2), arm the index in the table (0: from scratch);
    each pre-trained student's measures are (arm + seed / 10, 2 * arm + seed, 3 * arm + seed). -> (the runs' (script,
    argv), results.json, the command that plots the curves)."""
    out, calls, plots = tmp_path / "study", [], []
    arm_index = {name.replace(" ", "_").replace(",", ""): a for a, name in enumerate(["from scratch", *study.ARMS])}

    def fake_run(script, argv, log):
        calls.append((script, list(argv)))
        folder = argv[argv.index("--output_dir") + 1]
        os.makedirs(folder, exist_ok=True)
        if script == "train_finetune.py":
            arm, run = folder.split(os.sep)[-2:]
            base = 1.5 if run == "teacher" else 10 * arm_index[arm] + 3 * int(run[1]) + int(run[-1])
            with open(os.path.join(folder, "log.jsonl"), "w") as f:
                for epoch, extra in enumerate(extras):
                    f.write(json.dumps({"step": epoch, "epoch": epoch, "loss": 9.0}) + "\n")  # a step line
                    f.write(json.dumps({"epoch": epoch, "step": epoch, "val_top1": base + extra}) + "\n")

    def fake_consistency(path, teacher, images, masks):
        arm, seed = path.split(os.sep)[-3:-1]
        a, s = arm_index[arm], int(seed[len("seed"):])
        return a + s / 10, 2 * a + s, 3 * a + s

    monkeypatch.setattr(study, "make_data", lambda out: os.path.join(out, "data"))
    monkeypatch.setattr(study, "run", fake_run)
    monkeypatch.setattr(study, "consistency", fake_consistency)
    monkeypatch.setattr(study.dtm, "build_teacher", lambda *a: (lambda images: TEACHER_TOKENS[:len(images)]))
    monkeypatch.setattr(study.data, "ImageFolder", lambda root, transform: [(torch.zeros(3, 2, 2), 0)] * 256)
    monkeypatch.setattr(study.subprocess, "run", lambda command, check: plots.append(command))
    monkeypatch.setattr("sys.argv", ["study.py", "--out", str(out), "--finetune_epochs", "3", *argv])
    study.main()
    with open(out / "results.json") as f:
        return calls, json.load(f), plots[0]


def test_the_study_aggregates_each_arms_runs_and_seeds(tmp_path, monkeypatch, capsys):
    calls, results, plot_command = fake_study(tmp_path, monkeypatch)
    arms = ["from scratch", *study.ARMS]
    assert list(results["arms"]) == arms
    assert results["teacher_best_top1"] == 6.5 and results["teacher_last_top1"] == 3.5
    assert results["teacher_adjacent_cosine"] == study.adjacent_cosine(TEACHER_TOKENS) != pytest.approx(1.0)
    for a, arm in enumerate(arms):
        entry = results["arms"][arm]
        runs = [10 * a + 3 * p + s for p in range(1 if a in (0, 5) else 2) for s in (0, 1, 2)]  # p-major, seeds 0 1 2
        assert entry["best"] == [r + 5 for r in runs] and entry["last"] == [r + 2 for r in runs]
        assert entry["mean_curve"] == pytest.approx([statistics.mean(runs) + e for e in (0, 5, 2)])
        if a:
            seeds = range(1 if a == 5 else 2)
            assert entry["adjacent_cosine"] == pytest.approx([a + s / 10 for s in seeds])
            assert entry["token_loss"] == [2 * a + s for s in seeds] and entry["dtm_loss"] == [3 * a + s for s in seeds]
        else:
            assert "adjacent_cosine" not in entry
    table = capsys.readouterr().out
    assert f"adjacent cosine of its targets {study.adjacent_cosine(TEACHER_TOKENS):.3f}" in table
    # DTM (arm 2): best 25..30, mean 27.5, sample standard deviation sqrt(3.5) = 1.87; last 22..27
    assert "DTM |     27.5 ± 1.9 |     24.5 ± 1.9 |    6 | 2.0500 | 4.5000 | 6.5000" in table
    assert "from scratch |      6.0 ± 1.0 |      3.0 ± 1.0 |    3\n" in table
    assert "DTM, fixed schedule 24x3 |     56.0 ± 1.0 |     53.0 ± 1.0 |    3 | 5.0000 | 10.0000 | 15.0000" in table
    # the curves: one file per arm, in the table's order, with its mean per epoch
    files = plot_command[2:2 + len(arms)]
    assert plot_command[plot_command.index("--labels") + 1:][:len(arms)] == arms
    with open(files[2]) as f:
        assert [json.loads(line) for line in f] == [{"epoch": 0, "val_top1": 22.5}, {"epoch": 1, "val_top1": 27.5},
                                                    {"epoch": 2, "val_top1": 24.5}]


def test_the_best_top1_of_a_run_may_be_its_first_epochs_and_the_minutes_are_minutes(tmp_path, monkeypatch):
    clock = iter(range(0, 10 ** 6, 750))  # time.time(): the study's start, then 750 s later its end
    monkeypatch.setattr(study, "time", types.SimpleNamespace(time=lambda: next(clock)))
    _, results, _ = fake_study(tmp_path, monkeypatch, extras=(5, 0, 2))
    assert results["arms"]["DTM"]["best"] == [25, 26, 27, 28, 29, 30] and results["minutes_this_launch"] == 12.5


def test_the_table_on_an_ascii_stdout_is_printed_escaped_and_the_results_written(tmp_path, monkeypatch):
    """The table's ± on an ASCII stdout (PYTHONIOENCODING=ascii; LANG=C with PYTHONUTF8=0) raised
    UnicodeEncodeError after every run had finished, before results.json was written."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii", write_through=True)  # errors "strict", as Python's
    monkeypatch.setattr(sys, "stdout", stdout)
    _, results, _ = fake_study(tmp_path, monkeypatch)
    assert results["arms"]["DTM, fixed schedule 24x3"]["best"] == [55.0, 56.0, 57.0]
    assert ("DTM, fixed schedule 24x3 |     56.0 \\xb1 1.0 |     53.0 \\xb1 1.0 |    3 |"
            in stdout.buffer.getvalue().decode("ascii"))


def test_run_logs_a_command_whose_folder_is_not_utf8(tmp_path, monkeypatch):
    """A folder named by a Latin-1 machine (b'r\\xe9s': 'r\\udce9s' here) in the command: writing it to runs.log
    raised UnicodeEncodeError. It is written escaped, as the scripts print it."""
    monkeypatch.setattr(study, "HERE", str(tmp_path))
    (tmp_path / "ok.py").write_text("import sys; print('trained', sys.argv[1:])\n")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    monkeypatch.setattr(sys, "stdout", stdout)  # as study.main leaves it
    folder = os.fsdecode(b"out/r\xe9s")
    study.run("ok.py", ["--output_dir", folder], str(tmp_path / "runs.log"))
    with open(tmp_path / "runs.log") as f:
        assert "ok.py --output_dir out/r\\udce9s\ntrained ['--output_dir', 'out/r\\udce9s']" in f.read()
    assert stdout.buffer.getvalue().decode().startswith("  ok.py out/r\\udce9s: ")


def test_the_study_runs_each_arm_with_its_flags_seeds_and_data(tmp_path, monkeypatch):
    calls, *_ = fake_study(tmp_path, monkeypatch, ["--pretrain_epochs", "6", "--teacher_epochs", "4"])
    out = str(tmp_path / "study")
    value = lambda argv, flag: argv[argv.index(flag) + 1]
    script, teacher = calls[0]
    assert script == "train_finetune.py" and value(teacher, "--epochs") == "4" and value(teacher, "--init") == "none"
    assert value(teacher, "--data_train") == os.path.join(out, "data", "train3000")
    assert value(teacher, "--seed") == "100"
    assert value(teacher, "--data_val") == os.path.join(out, "data", "val500")
    ckpt = os.path.join(out, "teacher", "checkpoint-last.pth")
    pretrain = [argv for script, argv in calls if script == "train_pretrain.py"]
    expected = {"token-wise": (["--fixed_schedule", "0", "1"], 2, "6"), "DTM": ([], 2, "6"),
                "DTM_+_MTO": (["--mto"], 2, "6"),
                "DTM_+_MTO_half_the_epochs": (["--mto"], 2, "3"),
                "DTM_fixed_schedule_24x3": (["--fixed_schedule", "24", "3"], 1, "6")}
    assert len(pretrain) == 9
    for folder, (flags, seeds, epochs) in expected.items():
        for seed in range(seeds):
            run = os.path.join(out, "pretrain", folder, f"seed{seed}")
            argv = next(a for a in pretrain if value(a, "--output_dir") == run)
            assert argv[len(study.PRETRAIN):len(study.PRETRAIN) + len(flags)] == flags
            assert ("--mto" in argv) == ("--mto" in flags)
            assert ("--fixed_schedule" in argv) == bool(flags[:1] == ["--fixed_schedule"])
            assert value(argv, "--seed") == str(seed) and value(argv, "--epochs") == epochs
            assert value(argv, "--teacher") == f"ckpt:{ckpt}"
            assert value(argv, "--data") == os.path.join(out, "data", "train3000")
    finetune = [argv for script, argv in calls[1:] if script == "train_finetune.py"]
    assert len(finetune) == 30
    runs = {(value(a, "--output_dir"), value(a, "--init"), value(a, "--seed")) for a in finetune}
    assert len(runs) == 30 and all(value(a, "--epochs") == "3" for a in finetune)
    assert all(value(a, "--data_train") == os.path.join(out, "data", "train1000") for a in finetune)
    for folder, (_, seeds, _) in {"from_scratch": (None, 1, None), **expected}.items():
        for p in range(seeds):
            init = ("none" if folder == "from_scratch"
                    else os.path.join(out, "pretrain", folder, f"seed{p}", "checkpoint-last.pth"))
            for s in study.FT_SEEDS:
                assert (os.path.join(out, "finetune", folder, f"p{p}_s{s}"), init, str(s)) in runs
    assert study.FT_SEEDS == (0, 1, 2)


def test_mean_std_is_the_sample_standard_deviation():
    assert study.mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, (5 / 3) ** 0.5))
    assert study.mean_std([7.0]) == (7.0, 0.0)


@pytest.mark.parametrize("flag, message", [("--teacher_epochs", "--teacher_epochs 10 -> 5"),
                                           ("--pretrain_epochs", "--pretrain_epochs 4 -> 5")])
def test_a_relaunch_with_other_teacher_or_pretraining_epochs_is_refused(tmp_path, monkeypatch, flag, message):
    monkeypatch.setattr(study, "make_data", lambda out: os.path.join(out, "data"))
    monkeypatch.setattr(study, "run", lambda script, argv, log: (_ for _ in ()).throw(SystemExit("stop")))
    out = str(tmp_path / "s")
    for argv, expected in (([], "stop"), ([flag, "5"], f"ran with other epochs \\({message}\\)")):
        monkeypatch.setattr("sys.argv", ["study.py", "--out", out, *argv])
        with pytest.raises(SystemExit, match=expected):
            study.main()


def test_a_launch_without_the_data_binds_no_epochs(tmp_path, monkeypatch):
    """Fashion-MNIST missing: the launch stops before any run, so a relaunch (the package installed) may choose other
    epochs in the same --out."""
    out = str(tmp_path / "s")
    monkeypatch.setattr(study, "FASHION", str(tmp_path / "missing"))
    monkeypatch.setattr("sys.argv", ["study.py", "--out", out, "--finetune_epochs", "3"])
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        study.main()
    monkeypatch.setattr(study, "make_data", lambda out: os.path.join(out, "data"))
    monkeypatch.setattr(study, "run", lambda script, argv, log: (_ for _ in ()).throw(SystemExit("stop")))
    monkeypatch.setattr("sys.argv", ["study.py", "--out", out, "--finetune_epochs", "2"])
    with pytest.raises(SystemExit, match="stop"):
        study.main()


def test_run_stops_the_study_when_a_script_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "HERE", str(tmp_path))
    (tmp_path / "ok.py").write_text("import sys; print('trained', sys.argv[1:])\n")
    (tmp_path / "fails.py").write_text("import sys; print('loading'); sys.exit('boom: out of memory')\n")
    log = str(tmp_path / "runs.log")
    study.run("ok.py", ["--output_dir", "out/a"], log)
    assert "ok.py out/a:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"error: fails.py failed \(see .*runs.log\): \['boom: out of memory'\]"):
        study.run("fails.py", ["--output_dir", "out/b"], log)
    text = open(log).read()
    assert "ok.py --output_dir out/a\ntrained ['--output_dir', 'out/a']" in text
    assert "loading\nboom: out of memory" in text
    (tmp_path / "raises.py").write_text("raise ValueError('--data: no images')\n")
    with pytest.raises(SystemExit, match=r"failed \(see .*runs.log\): \['ValueError: --data: no images'\]$"):
        study.run("raises.py", ["--output_dir", "out/c"], log)  # a traceback: its last line, not 'Traceback ...'


def test_run_names_the_signal_that_killed_a_script_not_its_last_progress_bar(tmp_path, monkeypatch):
    """A run the out-of-memory killer ended (SIGKILL) read 'failed (see runs.log): ['epoch 0:  40%|...']'."""
    monkeypatch.setattr(study, "HERE", str(tmp_path))
    (tmp_path / "killed.py").write_text("import os, sys; print('epoch 0:  40%|', file=sys.stderr, flush=True); "
                                        "os.kill(os.getpid(), 9)\n")
    with pytest.raises(SystemExit, match=r"^error: killed.py was killed by signal 9 \(Killed, out of memory\?; see "
                                         r".*runs.log\); relaunch the same command: the study continues where it "):
        study.run("killed.py", ["--output_dir", "out/a"], str(tmp_path / "runs.log"))
    assert "epoch 0:  40%|" in open(tmp_path / "runs.log").read()
    (tmp_path / "hangup.py").write_text("import os; os.kill(os.getpid(), 1)\n")  # SIGHUP: a closed terminal
    with pytest.raises(SystemExit, match=r"^error: hangup.py was killed by signal 1 \(Hangup; see "):
        study.run("hangup.py", ["--output_dir", "out/b"], str(tmp_path / "runs.log"))


def test_run_echoes_the_scripts_warnings_which_the_log_alone_would_hide(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "HERE", str(tmp_path))
    (tmp_path / "warns.py").write_text("import sys; print('step 1'); print('warning: the warmup lasts the whole run');"
                                       "print('warning: on stderr', file=sys.stderr); print('not a warning: x')\n")
    study.run("warns.py", ["--output_dir", "out/a"], str(tmp_path / "runs.log"))
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == ["    warning: the warmup lasts the whole run", "    warning: on stderr"]


def test_train1000_is_the_first_images_of_train3000(fake_fashion, tmp_path):
    root = study.make_data(str(tmp_path / "out"))
    files = lambda name: sorted((c, f) for c in os.listdir(os.path.join(root, name))
                                for f in os.listdir(os.path.join(root, name, c)))
    assert files("train1000") == files("train3000")  # 40 images: all of them, under the same names
    for label_name, file in files("train1000"):
        a, b = (np.asarray(Image.open(os.path.join(root, n, label_name, file))) for n in ("train1000", "train3000"))
        np.testing.assert_array_equal(a, b)
    order = np.random.default_rng(0).permutation(40)
    first_class = study.CLASSES[fake_fashion["train-labels-idx1-ubyte.gz"][order[0]]]
    first = np.asarray(Image.open(os.path.join(root, "train3000", first_class, "00000.png")))
    np.testing.assert_array_equal(first[..., 0], fake_fashion["train-images-idx3-ubyte.gz"][order[0]])  # a random order


@pytest.mark.parametrize("argv", [["--teacher_epochs", "1"], ["--finetune_epochs", "1"], ["--pretrain_epochs", "3"]])
def test_epochs_the_study_cannot_run_are_refused(tmp_path, monkeypatch, argv, capsys):
    """Every run warms up for 1 epoch (PRETRAIN, FINETUNE): a run of 1 epoch, also the half arm's at 2 or 3 pre-training
    epochs, would end inside its warmup, its lr never decaying."""
    monkeypatch.setattr(study, "make_data", lambda out: pytest.fail("ran"))
    monkeypatch.setattr("sys.argv", ["study.py", "--out", str(tmp_path / "s"), *argv])
    with pytest.raises(SystemExit) as exit_status:
        study.main()
    assert exit_status.value.code == 2 and not os.path.exists(tmp_path / "s")
    assert "--teacher_epochs and --finetune_epochs must be >= 2, --pretrain_epochs >= 4: every run warms up for 1 " \
        "epoch" in capsys.readouterr().err  # this refusal, not argparse's for another reason (also exit 2)


def test_an_out_that_is_a_file_or_empty_is_refused(tmp_path, monkeypatch, capsys):
    """A file: os.makedirs' FileExistsError traceback once. Empty (`--out "$OUT"`, the variable unset): abspath made it
    the current folder, where the study's data and runs then landed without a word."""
    (tmp_path / "s").write_text("a file")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study, "make_data", lambda out: pytest.fail("ran"))
    for out, error in ((str(tmp_path / "s"), "is a file, not a folder"),
                       ("", "is empty (an unset shell variable?): give a folder"), (" ", "is empty")):
        monkeypatch.setattr("sys.argv", ["study.py", "--out", out])
        with pytest.raises(SystemExit) as exit_status:
            study.main()
        assert exit_status.value.code == 2
        assert f"--out {out!r} {error}" in capsys.readouterr().err


def test_an_out_below_a_file_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """A file further up the path (--out FILE/sub): os.makedirs' NotADirectoryError traceback once."""
    (tmp_path / "s").write_text("a file")
    monkeypatch.setattr(study, "make_data", lambda out: pytest.fail("ran"))
    monkeypatch.setattr("sys.argv", ["study.py", "--out", str(tmp_path / "s" / "sub")])
    with pytest.raises(SystemExit) as exit_status:
        study.main()
    assert exit_status.value.code == 2 and (tmp_path / "s").read_text() == "a file"
    assert f"--out {str(tmp_path / 's' / 'sub')!r}: cannot make the folder (Not a directory); give a path in a " \
        f"folder you can write to" in capsys.readouterr().err


@pytest.fixture
def big_fashion(tmp_path, monkeypatch):
    """More images than the study takes (3000 + 1000 training, 500 test): 1-pixel images whose value is the index mod
    256."""
    root = tmp_path / "fashion"
    root.mkdir()
    train, test = np.arange(3002) % 256, np.arange(501) % 256
    for name, array in {"train-images-idx3-ubyte.gz": train.reshape(-1, 1, 1),
                        "train-labels-idx1-ubyte.gz": train % 10,
                        "t10k-images-idx3-ubyte.gz": test.reshape(-1, 1, 1),
                        "t10k-labels-idx1-ubyte.gz": test % 10}.items():
        write_idx(root / name, array)
    monkeypatch.setattr(study, "FASHION", str(root))


def test_make_data_takes_3000_training_images_their_first_1000_and_500_test_images(big_fashion, tmp_path):
    root = study.make_data(str(tmp_path / "out"))
    files = lambda name: sorted(os.path.join(c, f) for c in os.listdir(os.path.join(root, name))
                                for f in os.listdir(os.path.join(root, name, c)))
    train3000, train1000, val = files("train3000"), files("train1000"), files("val500")
    assert len(train3000) == 3000 and len(val) == 500
    names = lambda fs: sorted(os.path.basename(f) for f in fs)
    assert names(train1000) == [f"{i:05d}.png" for i in range(1000)]
    assert set(train1000) <= set(train3000)  # the same images under the same names: the first 1000 of train3000
    assert names(val) == [f"{i:05d}.png" for i in range(500)]
    pixel = lambda f: np.asarray(Image.open(os.path.join(root, "val500", f)))[0, 0, 0]
    pixels = [pixel(f) for f in sorted(val, key=os.path.basename)]
    assert pixels == [i % 256 for i in range(500)]  # the first 500 test images (of 501), in order


def test_make_data_keeps_finished_data_and_drops_a_stale_partial(fake_fashion_small, tmp_path):
    out = str(tmp_path / "out")
    stale = os.path.join(out, "data.partial", "val500", "tshirt", "99999.png")  # left by a run cut short before
    os.makedirs(os.path.dirname(stale))
    open(stale, "wb").close()
    root = study.make_data(out)
    assert not os.path.exists(os.path.join(root, "val500", "tshirt", "99999.png"))
    marker = os.path.join(root, "val500", "kept")
    open(marker, "w").close()
    assert study.make_data(out) == root and os.path.exists(marker)  # a relaunch: the data is not written again


def test_make_data_refuses_an_incomplete_data_folder_of_an_older_study(fake_fashion, tmp_path):
    """Before data.partial a study cut short while writing train3000 left data/ with part of it (the code of then
    wrote it again as val500/ was missing): data/ is not taken as complete, and the error names the fix."""
    root = tmp_path / "out" / "data"
    study.write_folder(str(root / "train3000"), study.read_idx("train-images-idx3-ubyte.gz")[:3], [0, 1, 2])
    with pytest.raises(SystemExit, match=r"train3000 holds 3 of 40 images.*remove it \(rm -r "):
        study.make_data(str(tmp_path / "out"))


def test_make_data_refuses_a_train1000_one_image_short(fake_fashion, tmp_path):
    """train1000 holds as many images as there are training images up to 1000 (40 here; the test images are 12)."""
    root = study.make_data(str(tmp_path / "out"))
    folder = os.path.join(root, "train1000")
    label = min(os.listdir(folder))
    os.remove(os.path.join(folder, label, min(os.listdir(os.path.join(folder, label)))))
    with pytest.raises(SystemExit, match=r"train1000 holds 39 of 40 images"):
        study.make_data(str(tmp_path / "out"))


@pytest.fixture
def fake_fashion_small(tmp_path, monkeypatch):
    root = tmp_path / "fashion"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, array in {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (6, 2, 2)),
                        "train-labels-idx1-ubyte.gz": np.arange(6),
                        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (4, 2, 2)),
                        "t10k-labels-idx1-ubyte.gz": np.arange(4)}.items():
        write_idx(root / name, array)
    monkeypatch.setattr(study, "FASHION", str(root))


class SpyConsistency:
    """A monkeypatch that lets fake_study install its fake consistency, wrapped to record the masks it gets."""

    def __init__(self, monkeypatch, masks):
        self.monkeypatch, self.masks = monkeypatch, masks

    def setattr(self, *args, **kwargs):
        if len(args) == 3 and args[0] is study and args[1] == "consistency":
            inner = args[2]
            args = (study, "consistency",
                    lambda p, t, images, masks: self.masks.append(masks) or inner(p, t, images, masks))
        return self.monkeypatch.setattr(*args, **kwargs)


class SortedVal500:
    """A monkeypatch that gives fake_study a validation set of 500 images in class-folder order, as data.ImageFolder
    lists val500 (50 per class, each image filled with its class), and records the images consistency gets."""

    def __init__(self, monkeypatch, images):
        self.monkeypatch, self.images = monkeypatch, images

    def setattr(self, *args, **kwargs):
        if args[:2] == (study.data, "ImageFolder"):
            val500 = [(torch.full((3, 2, 2), i // 50.0), i // 50) for i in range(500)]
            args = (*args[:2], lambda root, transform: val500)
        elif args[:2] == (study, "consistency"):
            inner = args[2]
            args = (*args[:2], lambda p, t, images, masks: self.images.append(images) or inner(p, t, images, masks))
        return self.monkeypatch.setattr(*args, **kwargs)


def test_the_students_are_measured_on_validation_images_of_every_class(tmp_path, monkeypatch):
    """The first 256 of val500 in class-folder order are 5 of its 10 classes (bag, boot, coat, dress, pullover and a
    few sandals with about 50 images each): the students' consistency and losses never saw a shirt or a sneaker."""
    images = []
    fake_study(tmp_path, SortedVal500(monkeypatch, images))
    assert len(images) == 9 and all(torch.equal(batch, images[0]) for batch in images)
    per_class = collections.Counter(images[0][:, 0, 0, 0].int().tolist())
    assert sorted(per_class) == list(range(10)) and set(per_class.values()) == {25, 26}, per_class


def test_the_study_reports_the_teacher_scores_with_the_training_masks_and_plots_its_curves(tmp_path, monkeypatch,
                                                                                           capsys):
    masks = []
    calls, results, plot_command = fake_study(tmp_path, SpyConsistency(monkeypatch, masks))
    out = capsys.readouterr().out
    assert "teacher: val top-1 6.5% best, 3.5% last;" in out
    assert results["args"]["finetune_epochs"] == 3 and results["args"]["pretrain_epochs"] == 4
    # the students are measured with the training masks: PRETRAIN's --num_masked and --min_block, one mask per image
    value = lambda argv, flag: argv[argv.index(flag) + 1]
    generator = data.BlockMaskGenerator((study.GRID, study.GRID), int(value(study.PRETRAIN, "--num_masked")),
                                        int(value(study.PRETRAIN, "--min_block")))
    expected = torch.stack([generator(random.Random(i)).flatten() for i in range(256)])
    assert len(masks) == 9 and all(torch.equal(m, expected) for m in masks)
    assert expected.sum(1).eq(19).all() and not torch.equal(expected[0], expected[1])
    # the curves command is one plot_log.py can run: epochs on x, val_top1 on y, one curve per arm
    assert os.path.basename(plot_command[1]) == "plot_log.py"
    drawn = []
    monkeypatch.setattr(plot_log, "plot",
                        lambda *args, **kwargs: drawn.append(args) or plot_log.Image.new("RGB", (4, 4)))
    plot_log.main(plot_command[2:])
    series, labels, _, x_label, y_label = drawn[0]
    assert labels == ["from scratch", *study.ARMS] and (x_label, y_label) == ("epoch", "val_top1")
    assert series[2] == [(0.0, 22.5), (1.0, 27.5), (2.0, 24.5)]


def test_the_default_epochs_are_those_of_docs_results(tmp_path, monkeypatch, capsys):
    """docs/RESULTS.md: the teacher 10 epochs, pre-training 4 (the half arm 2), fine-tuning 10."""
    monkeypatch.setattr(study, "make_data", lambda out: os.path.join(out, "data"))
    monkeypatch.setattr(study, "run", lambda script, argv, log: (_ for _ in ()).throw(SystemExit("stop")))
    monkeypatch.setattr("sys.argv", ["study.py", "--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit, match="stop"):
        study.main()
    with open(tmp_path / "s" / "epochs.json") as f:
        assert json.load(f) == {"teacher_epochs": 10, "pretrain_epochs": 4, "finetune_epochs": 10}
    monkeypatch.setattr("sys.argv", ["study.py", "--help"])  # and --help says them (found by a walkthrough)
    with pytest.raises(SystemExit):
        study.main()
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: output/study)", "training epochs (default: 10)", "rounded down) (default: 4)",
                    "fine-tuning run's epochs (default: 10)"):
        assert default in text


def test_the_half_epochs_arm_takes_half_an_odd_count_rounded_down(tmp_path, monkeypatch):
    """round() took halves to the even number: 5 epochs gave the half arm 2, 7 gave it 4 (more than half)."""
    for given, half in ((5, 2), (7, 3), (4, 2)):
        calls, *_ = fake_study(tmp_path / str(given), monkeypatch, ["--pretrain_epochs", str(given)])
        epochs = {argv[argv.index("--epochs") + 1] for script, argv in calls if script == "train_pretrain.py"
                  and argv[argv.index("--output_dir") + 1].split(os.sep)[-2] == "DTM_+_MTO_half_the_epochs"}
        assert epochs == {str(half)}


def test_one_light_fine_tuning_recipe_for_the_teacher_and_every_arm(tmp_path, monkeypatch):
    """The docstring: no RandAugment, random erasing, Mixup or CutMix, no layer decay, for every fine-tuning run."""
    calls, *_ = fake_study(tmp_path, monkeypatch)
    value = lambda argv, flag: argv[argv.index(flag) + 1]
    finetune = [argv for script, argv in calls if script == "train_finetune.py"]
    assert len(finetune) == 31 and all(argv[:len(study.FINETUNE)] == study.FINETUNE for argv in finetune)
    assert [value(study.FINETUNE, f) for f in ("--aa", "--reprob", "--mixup", "--cutmix", "--layer_decay")] == \
        ["none", "0", "0", "0", "1.0"]
    pretrain = [argv for script, argv in calls if script == "train_pretrain.py"]
    assert all(argv[:len(study.PRETRAIN)] == study.PRETRAIN for argv in pretrain)


def test_consistency_uses_the_saved_mto_layers_and_the_24x3_schedule(tmp_path):
    path = str(tmp_path / "checkpoint-last.pth")
    student, teacher, head, _ = pretrained_student(path, mto=True, mto_layers=2)
    images = torch.randn(2, 3, study.IMG, study.IMG)
    masks = torch.rand(2, study.GRID * study.GRID) < 0.4
    cosine, _, dtm_loss = study.consistency(path, teacher, images, masks)
    student.eval()
    with torch.no_grad():
        cfg = mto.MTOConfig(layers=2, lambda_sing=0, lambda_ent=0)
        pred = head(mto.mto_forward(student, images, masks, cfg)[0][:, 1:])
        target = teacher(images)
    assert cosine == pytest.approx(study.adjacent_cosine(pred), abs=1e-6)  # the first 2 blocks recalibrated, not all
    groups = morph.token_morphing(target, morph.make_schedule(49, 24, 3, "official"), "random",
                                  torch.Generator().manual_seed(0))
    assert dtm_loss == pytest.approx(dtm.dtm_loss(pred, target, [groups])[0].item(), rel=1e-5)


def test_an_epochs_file_cut_short_is_one_line_naming_the_fix_and_is_written_whole(tmp_path, monkeypatch):
    """An empty or torn OUT/epochs.json (a launch killed while writing it) was json's traceback; it is now written
    through a temporary file and os.replace, and a torn one is refused naming the line to write into it."""
    out = tmp_path / "s"
    out.mkdir()
    (out / "epochs.json").write_text('{"teacher_epochs": 1')
    monkeypatch.setattr("sys.argv", ["study.py", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"^error: .*epochs.json is not JSON of the epochs \(.*\): write into it "
                                         r"the epochs the study there ran with, e.g. echo "
                                         r"'\{\"teacher_epochs\": 10, .*\}' > .*epochs.json"):
        study.main()
    (out / "epochs.json").unlink()
    monkeypatch.setattr(study, "make_data", lambda out: os.path.join(out, "data"))
    monkeypatch.setattr(study, "run", lambda script, argv, log: (_ for _ in ()).throw(SystemExit("stop")))
    monkeypatch.setattr(study.os, "replace", lambda src, dst: (_ for _ in ()).throw(SystemExit("replaced")))
    with pytest.raises(SystemExit, match="replaced"):
        study.main()
    assert not (out / "epochs.json").exists() and (out / "epochs.json.tmp").exists()  # not written in place


@pytest.mark.parametrize("content", [b"[]", b"null", b"10", b"\xff\xfe"])
def test_an_epochs_file_of_no_object_is_one_line_naming_the_fix(tmp_path, monkeypatch, content):
    """An OUT/epochs.json that is JSON but no object (a list, null, a number) was an AttributeError traceback at
    before.get, and one not in UTF-8 a UnicodeDecodeError traceback: both are refused as a torn one is."""
    out = tmp_path / "s"
    out.mkdir()
    (out / "epochs.json").write_bytes(content)
    monkeypatch.setattr("sys.argv", ["study.py", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"^error: .*epochs.json is not JSON of the epochs \(.+\): write into it "
                                         r"the epochs the study there ran with, e.g. echo '\{\"teacher_epochs\": 10, "):
        study.main()


def test_make_data_with_a_file_missing_names_it_and_the_fix(fake_fashion, tmp_path):
    """The folder there but a file of it missing (an install cut short) was gzip's FileNotFoundError traceback."""
    os.remove(os.path.join(study.FASHION, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(SystemExit, match=r"^error: .*fashion lacks t10k-labels-idx1-ubyte.gz; install the real images "
                                         r"again: apt-get install --reinstall dataset-fashion-mnist$"):
        study.make_data(str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "data.partial")  # refused before writing anything
