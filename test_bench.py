"""The benchmark scripts refuse arguments that would crash late (a traceback after the set-up) or measure nothing."""
import argparse
import json
import os
import subprocess
import sys

import pytest

import bench_data
import bench_morph
import bench_mto

HERE = os.path.dirname(os.path.abspath(__file__))


def ran_past_the_checks(*args, **kwargs):
    pytest.fail("ran past the argument checks: the benchmark itself would run")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps and --batch must be >= 1"),  # a StatisticsError after the set-up
    (["--batch", "0"], "--steps and --batch must be >= 1"), (["--warmup", "-1"], "--warmup >= 0"),
    (["--variants", "-1"], "--variants are indices 0..4, got [-1]"),  # -1 silently took the last
    (["--variants", "0", "5"], "--variants are indices 0..4, got [0, 5]"),  # an IndexError after the set-up
    (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),  # ran with a disabled GradScaler
])
def test_bench_mto_refuses(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(bench_mto, "make_teacher", ran_past_the_checks)  # a missing check fails here, not in minutes
    with pytest.raises(SystemExit) as exit_status:
        bench_mto.main(argv)
    assert exit_status.value.code == 2
    assert len(bench_mto.VARIANTS) == 5 and message in capsys.readouterr().err


@pytest.mark.parametrize("script, argv, message", [
    ("bench_morph.py", ["--levels", "0"], "--levels must be >= 1"),  # a division by zero
    ("bench_data.py", ["--images", "0"], "--images, --repeats and --batch must be >= 1"),
])
def test_bench_scripts_refuse(script, argv, message):
    result = subprocess.run([sys.executable, os.path.join(HERE, script), *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr


class FakeClock:
    """time.perf_counter / process_time that advance only when a fake step says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def process_time(self):  # half the wall time: the CPU time of a step that waited half the time
        return self.now / 2


def test_bench_mto_times_the_chosen_variants_and_reports_overheads_over_the_first(tmp_path, monkeypatch, capsys):
    """Each variant gets its own config (and --compare_mto its module), the teacher and --malloc reach where they
    should, warm-up steps are not timed, and the overheads are over the first variant listed."""
    clock, made, kept = FakeClock(), [], []
    durations = {None: [9.0, 2.0, 1.0, 3.0], "recal": [9.0, 2.5, 1.5, 4.0], "other": [9.0, 4.0, 4.0, 4.0]}

    def fake_make_step(args, cfg, mto_module=bench_mto.mto, teacher=None):
        made.append((cfg, mto_module, teacher))
        key = None if cfg is None else "recal" if mto_module is bench_mto.mto else "other"
        times = iter(durations[key])
        return lambda: setattr(clock, "now", clock.now + next(times))

    monkeypatch.setattr(bench_mto, "time", clock)
    monkeypatch.setattr(bench_mto, "make_step", fake_make_step)
    monkeypatch.setattr(bench_mto, "make_teacher", lambda args: ("teacher", args.teacher))
    monkeypatch.setattr(bench_mto, "keep_freed_memory", lambda: kept.append(True))
    other = tmp_path / "old_mto.py"
    other.write_text("MARK = 'old'\n")
    figures = bench_mto.main(["--variants", "0", "4", "--steps", "3", "--warmup", "1", "--teacher", "clip",
                              "--malloc", "keep", "--compare_mto", str(other)])
    names = list(bench_mto.VARIANTS)
    assert [cfg for cfg, _, _ in made] == [None, bench_mto.VARIANTS[names[4]], bench_mto.mto.MTOConfig()]
    assert made[2][1].MARK == "old" and all(teacher == ("teacher", "clip") for _, _, teacher in made)
    assert kept == [True]
    assert figures[names[0]] == {"median_s": 2.0, "min_s": 1.0, "cpu_median_s": 1.0}
    assert figures[names[4]] == {"median_s": 2.5, "min_s": 1.5, "cpu_median_s": 1.25}
    out = capsys.readouterr().out
    assert f"overheads over {names[0]}" in out
    assert f"{names[4]}: median 2.500 s (+25.0%), fastest 1.500 s (+50.0%), cpu 1.250 s (+25.0%)" in out
    assert f"dtm + mto from {other} (defaults): median 4.000 s (+100.0%), fastest 4.000 s (+300.0%)" in out


@pytest.mark.parametrize("argv", [["--iters", "0"], ["--batch", "0"], ["--tokens", "0"], ["--dim", "0"],
                                  ["--levels", "0"], ["--warmup", "-1"]])
def test_bench_morph_refuses(argv, monkeypatch, capsys):
    for name in ("check_agreement", "run_child", "measure"):
        monkeypatch.setattr(bench_morph, name, ran_past_the_checks)
    monkeypatch.setattr("sys.argv", ["bench_morph.py", *argv])
    with pytest.raises(SystemExit) as exit_status:
        bench_morph.main()
    assert exit_status.value.code == 2 and "must be >= 1, --warmup >= 0" in capsys.readouterr().err


def test_bench_morph_passes_every_setting_to_its_children_and_reports_the_speed_up(monkeypatch, capsys):
    commands = []

    def fake_run_child(command, env=None):
        commands.append((command, env))
        method = command[command.index("--child") + 1]
        if "--child_memory" in command:
            return json.dumps({"peak_mib": {"dense": 40.0, "morph.py": 5.0}[method]})
        return json.dumps({"seconds": {"dense": 0.008, "morph.py": 0.002}[method]})

    monkeypatch.setattr(bench_morph, "run_child", fake_run_child)
    monkeypatch.setattr("sys.argv", ["bench_morph.py", "--batch", "2", "--tokens", "9", "--dim", "4", "--levels", "3",
                                     "--iters", "5", "--warmup", "0", "--schedules", "2x2"])
    bench_morph.main()
    assert len(commands) == 4  # (timing, memory) x (dense, morph.py)
    for command, env in commands:
        assert command[2:9] == ["--batch=2", "--tokens=9", "--dim=4", "--levels=3", "--device=cpu", "--iters=5",
                                "--warmup=0"]
        assert command[command.index("--child") + 2] == "2x2"
        assert (env is not None and env["MALLOC_MMAP_THRESHOLD_"] == "65536") == ("--child_memory" in command)
    out = capsys.readouterr().out
    assert "B=2 N=9 C=4 L=3 device=cpu" in out
    assert "      2x2 |    dense |        8.0 |     40.0 | 1.0x" in out
    assert "      2x2 | morph.py |        2.0 |      5.0 | 4.0x" in out


def test_bench_morph_measure_times_the_steps_after_the_warm_up(monkeypatch):
    clock, calls = FakeClock(), []

    def fake_loss(student, teacher, schedules):
        calls.append(len(schedules))
        clock.now += len(calls) ** 2  # the i-th step takes i * i seconds
        return student.sum()

    monkeypatch.setattr(bench_morph, "time", clock)
    monkeypatch.setitem(bench_morph.METHODS, "fake", fake_loss)
    args = argparse.Namespace(batch=2, tokens=4, dim=3, levels=3, device="cpu", iters=3, warmup=2, child_memory=False)
    assert bench_morph.measure(args, "fake", "1x1") == {"seconds": 16.0}  # the median of steps 3, 4, 5: 9, 16, 25 s
    assert calls == [3] * 5  # --levels schedules per step


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "1"], "--rounds must be at least 2"), (["--repeats", "0"], "--images, --repeats and --batch"),
    (["--batch", "0"], "--images, --repeats and --batch"), (["--workers", "-1"], "--workers >= 0"),
    (["--data", "/nonexistent/folder"], "--data '/nonexistent/folder' is not a folder"),
])
def test_bench_data_refuses(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(bench_data, "make_jpegs", ran_past_the_checks)
    monkeypatch.setattr(bench_data.data, "ImageFolder", ran_past_the_checks)
    monkeypatch.setattr(bench_data.torch, "set_num_threads", lambda n: None)  # not for the rest of the session
    monkeypatch.setattr("sys.argv", ["bench_data.py", *argv])
    with pytest.raises(SystemExit) as exit_status:
        bench_data.main()
    assert exit_status.value.code == 2 and message in capsys.readouterr().err
