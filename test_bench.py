"""The benchmark scripts: the figures they print (with fake clocks and memory readings), their defaults, the agreement
checks behind them, and their refusal of arguments that would crash late (a traceback after the set-up) or measure
nothing."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import bench_data
import bench_morph
import bench_mto
import train_pretrain

HERE = os.path.dirname(os.path.abspath(__file__))


def ran_past_the_checks(*args, **kwargs):
    pytest.fail("ran past the argument checks: the benchmark itself would run")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps and --batch must be >= 1"),  # a StatisticsError after the set-up
    (["--batch", "0"], "--steps and --batch must be >= 1"), (["--warmup", "-1"], "--warmup >= 0"),
    (["--variants", "-1"], "--variants are indices 0..5, got [-1]"),  # -1 silently took the last
    (["--variants", "0", "6"], "--variants are indices 0..5, got [0, 6]"),  # an IndexError after the set-up
    (["--variants", "0", "1", "1"], "--variants 0 1 1 names variant 1 twice; list each once"),  # its steps twice
    (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),  # ran with a disabled GradScaler
    (["--compile", "--warmup", "0"], "the first step compiles"),  # a timed step would include the compilation
    (["--variants", "0", "5", "--warmup", "0"], "the first step compiles"),
    (["--variants", "0", "5", "--count_bytes"], "compiled kernels are not seen"),
    (["--img_size", "17"], "--img_size 17 is not a positive multiple of the patch size 16; use 16 or 32 (the "
                           "paper's: 224)\n"),  # a traceback once; "e.g. 224" once, 196 times the tokens of 16
    (["--img_size", "0"], "--img_size 0 is not a positive multiple of the patch size 16; use 16 (the paper's"),
    (["--compare_mto", ""], "argument --compare_mto: '' is empty"),  # ran without the comparison, exit 0
    (["--device", "gpu"], "--device 'gpu' is not a device; use cpu or cuda"),  # torch's traceback, after the set-up
    (["--device", "mps"], "error: --device mps: the benchmarks time cpu or cuda only; use one of them\n"),
])
def test_bench_mto_refuses(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(bench_mto, "make_teacher", ran_past_the_checks)  # a missing check fails here, not in minutes
    with pytest.raises(SystemExit) as exit_status:
        bench_mto.main(argv)
    assert exit_status.value.code == 2
    assert len(bench_mto.VARIANTS) == 6 and message in capsys.readouterr().err


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
    other.write_text("MARK = 'old'\nMTO = MTOConfig = None\n")  # a copy of mto.py has both
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


def test_bench_mto_fastest_step_and_step_peak_on_a_gpu_are_over_every_timed_step(monkeypatch, capsys):
    """On a GPU the step peak is the largest growth of the allocated memory over what each timed step started with
    (faked here: 1 GiB held, steps growing it by 2, 3 and 1 GiB after a warm-up step of 5), not the median nor the
    peak with the held memory; the fastest step may be the first timed one."""
    clock, growth, gib = FakeClock(), iter([5, 2, 3, 1]), 2 ** 30
    peak = {}

    def step():
        clock.now += {5: 9.0, 2: 1.0, 3: 2.0, 1: 3.0}[peak.setdefault("now", next(growth))]
        peak["max"] = gib + peak.pop("now") * gib

    monkeypatch.setattr(bench_mto.engine, "check_bench_device", lambda device: None)
    monkeypatch.setattr(bench_mto, "time", clock)
    monkeypatch.setattr(bench_mto, "make_step", lambda *args, **kwargs: step)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: peak.pop("max", None))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: peak["max"])
    figures = bench_mto.main(["--device", "cuda", "--variants", "0", "--steps", "3", "--warmup", "1"])
    assert figures[next(iter(bench_mto.VARIANTS))]["min_s"] == 1.0
    assert "fastest 1.000 s (+0.0%)  step peak 3.00 GiB over the weights and moments" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    *[(argv, "must be >= 1, --warmup >= 0") for argv in (["--iters", "0"], ["--batch", "0"], ["--tokens", "0"],
                                                         ["--dim", "0"], ["--levels", "0"], ["--warmup", "-1"])],
    (["--schedules", "abc"], "--schedules 'abc': cannot read schedule 'abc'"),  # tracebacks, after the set-up
    (["--schedules", "14x7", "0x5"], "--schedules '0x5': schedule '0x5' has 0 rounds"),
    (["--schedules=1x-1"], "--schedules '1x-1': schedule '1x-1' removes a negative number of tokens"),
])
def test_bench_morph_refuses(argv, message, monkeypatch, capsys):
    for name in ("check_agreement", "run_child", "measure"):
        monkeypatch.setattr(bench_morph, name, ran_past_the_checks)
    monkeypatch.setattr("sys.argv", ["bench_morph.py", *argv])
    with pytest.raises(SystemExit) as exit_status:
        bench_morph.main()
    assert exit_status.value.code == 2 and message in capsys.readouterr().err


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
    assert "B=2 N=9 C=4 L=3 device=cpu" in out and "note:" not in out  # 9 tokens: 2 merges, then 2 of 7
    assert "      2x2 |    dense |        8.0 |     40.0 | 1.0x" in out
    assert "      2x2 | morph.py |        2.0 |      5.0 | 4.0x" in out
    monkeypatch.setattr("sys.argv", ["bench_morph.py", "--tokens", "9", "--dim", "4", "--schedules", "2x4", "1x4"])
    bench_morph.main()  # a schedule clamped is said: its label would name merges that did not run
    assert capsys.readouterr().out.splitlines()[0] == ("note: schedule 2x4 on 9 tokens runs as [4, 2] (6 merges, not "
                                                       "8): each round merges at most (T - 1) // 2 of its T tokens "
                                                       "(ToMe's rule, the first token kept)")


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


def test_bench_data_names_what_is_wrong_with_an_image_folder(tmp_path, monkeypatch, capsys):
    """A --data folder without class subfolders ended in ImageFolder's traceback; now its message, after --data."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    monkeypatch.setattr(bench_data.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr("sys.argv", ["bench_data.py", "--data", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_status:
        bench_data.main()
    assert exit_status.value.code == 2
    assert f"--data: image folder '{tmp_path}' has no class subfolders" in capsys.readouterr().err


def test_the_benchmarks_called_from_python_take_argv_and_leave_torch_threads_as_they_were(monkeypatch, capsys):
    """bench_data.main and bench_morph.main take their flags as argv, as the other scripts' main(argv): called from a
    notebook they parsed the kernel's sys.argv ("unrecognized arguments: -f"). bench_data times on one thread and sets
    torch's thread count back after (it left the rest of the session on one thread)."""
    monkeypatch.setattr("sys.argv", ["ipykernel_launcher.py", "-f", "kernel.json"])
    threads, seen, per_image_ms = torch.get_num_threads(), [], bench_data.per_image_ms
    monkeypatch.setattr(bench_data, "per_image_ms", lambda *args: seen.append(torch.get_num_threads()) or
                        per_image_ms(*args))
    torch.set_num_threads(threads + 1)
    try:
        bench_data.main(["--images", "2", "--repeats", "1", "--workers", "0", "--batch", "1", "--rounds", "2"])
        assert seen == [1, 1, 1] and torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(bench_morph, "run_child", lambda command, env=None: '{"seconds": 1.0, "peak_mib": 1.0}')
    bench_morph.main(["--batch", "2", "--tokens", "9", "--dim", "4", "--schedules", "2x2"])
    assert "B=2 N=9 C=4 L=2 device=cpu" in capsys.readouterr().out


# ---------------------------------------------------------------- bench_morph

def test_bench_morph_check_agreement_compares_every_schedule_in_float64_and_fails_on_a_difference(monkeypatch):
    args = argparse.Namespace(batch=2, tokens=8, dim=3, levels=2, device="cpu", schedules=["4", "1x2"])
    bench_morph.check_agreement(args)  # 8 tokens, 4 merges: the first token is protected, so only 3 can happen
    seen, loss_dense = [], bench_morph.loss_dense
    monkeypatch.setattr(bench_morph, "loss_dense", lambda s, t, schedules: seen.append((s.dtype, t.dtype, schedules))
                        or loss_dense(s, t, schedules))
    bench_morph.check_agreement(args)
    assert seen == [(torch.float64, torch.float64, [[4]] * 2), (torch.float64, torch.float64, [[2]] * 2)]
    loss_index = bench_morph.loss_index
    monkeypatch.setattr(bench_morph, "loss_index", lambda *a: loss_index(*a) * (1 + 1e-4))
    with pytest.raises(AssertionError, match="losses differ for 4: dense"):
        bench_morph.check_agreement(args)


def test_bench_morph_dense_path_merges_size_weighted_as_morph_py():
    """Several rounds that merge already merged tokens: the dense matrices group the tokens exactly as morph.py's
    official split (the same partition, up to the numbering of the groups)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, 3, generator=gen, dtype=torch.float64)
    schedule = [3, 3, 2, 2, 1]
    S = bench_morph.dense_merge_sources(x, schedule)  # (B, G, N)
    groups = bench_morph.morph.token_morphing(x, schedule, "official")
    for b in range(4):
        dense = {tuple(torch.nonzero(row).flatten().tolist()) for row in S[b]}
        index = {tuple(torch.nonzero(groups[b] == g).flatten().tolist()) for g in groups[b].unique()}
        assert dense == index


def test_bench_morph_index_path_passes_the_group_counts_as_training_does(monkeypatch):
    """The morph.py path times training's loss: dtm_loss with each level's num_groups (without them it takes N, an
    upper bound: the same loss, more work than training does)."""
    passed, dtm_loss = [], bench_morph.dtm.dtm_loss
    monkeypatch.setattr(bench_morph.dtm, "dtm_loss",
                        lambda *args, **kwargs: passed.append(kwargs.get("num_groups")) or dtm_loss(*args, **kwargs))
    x, schedules = torch.randn(2, 9, 4), [[2, 2], [4, 1]]
    bench_morph.loss_index(x, x.flip(1), schedules)
    assert passed == [[bench_morph.morph.num_groups_after(9, s, "official") for s in schedules]] == [[5, 4]]


def test_bench_morph_memory_is_the_peak_growth_of_one_step_after_a_warm_up(monkeypatch):
    """--child_memory on the CPU: at least one warm-up step, the peak resident set reset (clear_refs 5), the baseline
    read with the gradient freed, and VmHWM - VmRSS in MiB (the status file's kB / 1024)."""
    mem = {"rss": 100 * 1024, "hwm": 100 * 1024, "steps": 0}
    student_ref, writes, grad_at_base = [], [], []

    def fake_loss(student, teacher, schedules):
        student_ref.append(student)
        mem["steps"] += 1
        mem["hwm"] = max(mem["hwm"], mem["rss"] + (8192 if mem["steps"] == 1 else 2048))  # the first step: more
        return student.sum()

    class File:
        def __init__(self, path):
            self.path = path

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            writes.append((self.path, text))
            if text == "5":
                mem["hwm"] = mem["rss"]

        def __iter__(self):
            grad_at_base.append(student_ref[-1].grad is None)
            return iter([f"VmHWM:\t{mem['hwm']} kB\n", f"VmRSS:\t{mem['rss']} kB\n"])

    monkeypatch.setattr(bench_morph, "open", lambda path, mode="r": File(path), raising=False)
    monkeypatch.setitem(bench_morph.METHODS, "fake", fake_loss)
    args = argparse.Namespace(batch=2, tokens=4, dim=3, levels=1, device="cpu", iters=3, warmup=0, child_memory=True)
    assert bench_morph.measure(args, "fake", "1x1") == {"peak_mib": 2.0}
    assert mem["steps"] == 2 and writes == [("/proc/self/clear_refs", "5")]
    assert grad_at_base[0]  # the baseline is read with no gradient left from the warm-up


def test_bench_morph_run_child_returns_stdout_or_stops_with_the_childs_error():
    assert bench_morph.run_child([sys.executable, "-c", "print('{\"seconds\": 1}')"]) == '{"seconds": 1}\n'
    with pytest.raises(SystemExit, match="-c import sys; sys.exit\\('boom'\\) failed:\nboom"):
        bench_morph.run_child([sys.executable, "-c", "import sys; sys.exit('boom')"])


def test_bench_morph_defaults_are_the_documented_ones(monkeypatch, capsys):
    """The docstring and README: B=64, N=196, C=512, schedules 14x7 and 2x49, L=2."""
    commands = []
    monkeypatch.setattr(bench_morph, "check_agreement", lambda args: None)
    monkeypatch.setattr(bench_morph, "run_child", lambda command, env=None: commands.append(command)
                        or json.dumps({"seconds": 1.0, "peak_mib": 1.0}))
    monkeypatch.setattr("sys.argv", ["bench_morph.py"])
    bench_morph.main()
    assert commands[0][2:9] == ["--batch=64", "--tokens=196", "--dim=512", "--levels=2", "--device=cpu", "--iters=10",
                                "--warmup=2"]
    assert [c[c.index("--child") + 2] for c in commands[::4]] == ["14x7", "2x49"]
    assert "B=64 N=196 C=512 L=2 device=cpu" in capsys.readouterr().out


# ---------------------------------------------------------------- bench_mto

def test_bench_mto_help_names_every_variant_by_its_index(capsys):
    """--variants takes indices: --help named only 0 (plain DTM), so 1 to 5 could be read in the code alone."""
    with pytest.raises(SystemExit):
        bench_mto.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for index, name in enumerate(bench_mto.VARIANTS):
        assert f"{index}: {name}" in text


def test_bench_mto_rotates_which_variant_goes_first(monkeypatch, capsys):
    clock, calls = FakeClock(), []

    def fake_make_step(args, cfg, mto_module=bench_mto.mto, teacher=None):
        def step():
            calls.append(cfg)
            clock.now += 1.0
        return step

    monkeypatch.setattr(bench_mto, "time", clock)
    monkeypatch.setattr(bench_mto, "make_step", fake_make_step)
    monkeypatch.setattr(bench_mto, "make_teacher", lambda args: None)
    bench_mto.main(["--variants", "0", "2", "4", "--steps", "2", "--warmup", "1"])
    v = list(bench_mto.VARIANTS.values())
    assert calls == [v[0], v[2], v[4], v[2], v[4], v[0], v[4], v[0], v[2]]


RUN4_ERROR = ("SubprocException: An exception occurred in a subprocess:\n\nName=triton_per_fused_4\nTraceback (most "
              "recent call last):\n  File \"compiler.py\", line 316, in make_ttgir\n    pm.run(mod, 'make_ttgir')\n"
              "RuntimeError: PassManager::run failed\n\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace")


def test_bench_mto_leaves_a_failing_variant_out_reports_the_others_and_exits_1(monkeypatch, capsys):
    """As on the H200, where variant 5's compiled losses did not build (here at its first timed step): the others are
    timed, rotated, profiled and reported (overheads over the first), the failed one is named by its error's cause
    and not profiled, the exit status is 1; a failing baseline stops the run."""
    clock, calls, profiled = FakeClock(), [], []
    v = list(bench_mto.VARIANTS.values())

    class InductorError(Exception):
        pass

    def fake_make_step(args, cfg, mto_module=bench_mto.mto, teacher=None):
        def step():
            calls.append(cfg)
            if (cfg is v[5] and calls.count(v[5]) == 2) or (cfg is v[0] and fail_baseline):
                raise InductorError(RUN4_ERROR)
            clock.now += 2.0 if cfg is v[1] else 1.0
        return step

    monkeypatch.setattr(bench_mto, "time", clock)
    monkeypatch.setattr(bench_mto, "make_step", fake_make_step)
    monkeypatch.setattr(bench_mto, "make_teacher", lambda args: None)
    monkeypatch.setattr(bench_mto, "profile_step", lambda name, step, cuda, reference=None: profiled.append(name))
    fail_baseline = False
    with pytest.raises(SystemExit, match="variants left out.*its losses compiled: InductorError: RuntimeError: "
                                         "PassManager::run failed$"):
        bench_mto.main(["--variants", "0", "1", "5", "--steps", "3", "--warmup", "1", "--profile"])
    # warm-up: 0 1 5; first timed step: 1 5 (fails) 0; then 0 and 1 alone, in turn first
    assert calls == [v[0], v[1], v[5], v[1], v[5], v[0], v[0], v[1], v[1], v[0]]
    out = capsys.readouterr().out
    assert ("its losses compiled: failed at step 2, left out: InductorError: RuntimeError: PassManager::run failed"
            in out)
    assert "dtm + mto (defaults: recalibration, both losses, all blocks): median 2.000 s (+100.0%)" in out
    assert "its losses compiled: median" not in out and len(profiled) == 2 and "compiled" not in profiled[1]
    fail_baseline = True
    with pytest.raises(InductorError):
        bench_mto.main(["--variants", "0", "1", "--steps", "1", "--warmup", "0"])


def test_bench_mto_defaults_and_the_peak_resident_memory_in_gib(monkeypatch, capsys):
    """Defaults (docstring: vit_b, batch 64, CPU; 1 warm-up and 3 timed steps of every eager variant, 0 to 4) and
    ru_maxrss (kB on Linux) printed in GiB."""
    clock, made, calls = FakeClock(), [], []

    def fake_make_step(args, cfg, mto_module=bench_mto.mto, teacher=None):
        made.append((args.model, args.batch, args.img_size, args.device, args.amp, args.teacher))
        return lambda: calls.append(cfg) or setattr(clock, "now", clock.now + 1.0)

    monkeypatch.setattr(bench_mto, "time", clock)
    monkeypatch.setattr(bench_mto, "make_step", fake_make_step)
    monkeypatch.setattr(bench_mto.resource, "getrusage", lambda who: argparse.Namespace(ru_maxrss=3 * 2 ** 20))
    bench_mto.main([])
    assert made == [("vit_b", 64, 224, "cpu", "fp32", "none")] * 5
    eager = list(bench_mto.VARIANTS.values())[:5]  # not the last, whose losses compile
    assert len(calls) == 5 * 4 and all(calls.count(cfg) == 4 for cfg in eager)
    assert not any(c and c.compile for c in calls)
    out = capsys.readouterr().out
    assert "peak resident memory of the process (all variants): 3.00 GiB" in out
    assert bench_mto.make_teacher(argparse.Namespace(teacher="none")) is None  # random targets, no CLIP teacher


def test_bench_mto_peak_resident_memory_in_gib_on_macos(monkeypatch, capsys):
    """macOS's ru_maxrss counts bytes, not kB: 3 GiB printed as 3.00 GiB (it was 3072.00)."""
    clock = FakeClock()
    monkeypatch.setattr(bench_mto, "time", clock)
    monkeypatch.setattr(bench_mto, "make_step", lambda *a, **k: lambda: setattr(clock, "now", clock.now + 1.0))
    monkeypatch.setattr(bench_mto.resource, "getrusage", lambda who: argparse.Namespace(ru_maxrss=3 * 2 ** 30))
    monkeypatch.setattr(sys, "platform", "darwin")
    bench_mto.main(["--variants", "0", "--steps", "1", "--warmup", "0"])
    assert "peak resident memory of the process (all variants): 3.00 GiB\n" in capsys.readouterr().out


def test_bench_mto_profile_prints_each_variants_profiled_step_and_its_top_ops(capsys):
    """--profile: after the timed steps, one step of each variant under torch.profiler, its wall time and the ops
    with the most self time (on the CPU: CPU time), 8 at most, with their calls."""
    bench_mto.main(["--model", "vit_tiny", "--img_size", "32", "--batch", "2", "--variants", "0", "1", "--steps", "1",
                    "--warmup", "0", "--profile"])
    out = capsys.readouterr().out.splitlines()
    names = list(bench_mto.VARIANTS)[:2]
    heads = [i for i, line in enumerate(out) if line.startswith("profile of ")]
    assert len(heads) == 2 and all(re.fullmatch(rf"profile of {re.escape(name)}: \d+\.\d ms wall", out[i])
                                   for i, name in zip(heads, names))
    ops = out[heads[1] + 1:heads[1] + 9]
    assert all(re.fullmatch(r"    \S.* +\d+ calls +\d+\.\d\d ms", line) for line in ops), ops
    times = [float(line.split()[-2]) for line in ops]
    assert times == sorted(times, reverse=True) and len(ops) == 8
    assert "grew most over the first variant" not in "\n".join(out[heads[0]:heads[1]])  # the first: nothing to compare
    assert out[heads[1] + 9] == "  grew most over the first variant (calls, ms):"
    grown = out[heads[1] + 10:heads[1] + 18]
    assert all(re.fullmatch(r"    \S.* +[+-]\d+ calls +[+-]\d+\.\d\d ms", line) for line in grown), grown
    increases = [float(line.split()[-2]) for line in grown]
    assert increases == sorted(increases, reverse=True)


def fake_profile(events, averages):
    """A stand-in for torch.profiler.profile whose run recorded `events` and `averages` (key_averages)."""
    class FakeProfile:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return events

        def key_averages(self):
            return averages
    return FakeProfile


def test_bench_mto_profile_step_reports_the_growth_over_the_reference(capsys, monkeypatch):
    """The ops whose time grew most: this variant's calls and time less the reference's, an op the reference did not
    run counted from zero."""
    averages = [argparse.Namespace(key=k, count=c, self_cpu_time_total=us) for k, c, us in
                (("aten::mm", 10, 5000.0), ("aten::softmax", 4, 3000.0), ("aten::add", 2, 1000.0))]
    monkeypatch.setattr("torch.profiler.profile", fake_profile([], averages))
    clock = FakeClock()
    monkeypatch.setattr(bench_mto, "time", clock)
    reference = {"aten::mm": (10, 4.0), "aten::add": (3, 1.5), "aten::div": (1, 0.25)}  # div: the reference's only
    times = bench_mto.profile_step("v", lambda: setattr(clock, "now", clock.now + 0.25), cuda=False, top=3,
                                   reference=reference)
    assert times == {"aten::mm": (10, 5.0), "aten::softmax": (4, 3.0), "aten::add": (2, 1.0)}
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "profile of v: 250.0 ms wall"  # a step of 0.25 s
    grown = out[out.index("  grew most over the first variant (calls, ms):") + 1:]
    assert [line.split() for line in grown] == [["aten::softmax", "+4", "calls", "+3.00", "ms"],
                                                 ["aten::mm", "+0", "calls", "+1.00", "ms"],
                                                 ["aten::div", "-1", "calls", "-0.25", "ms"]]


def test_bench_mto_profile_step_on_a_gpu_leaves_out_the_gpu_copies_of_record_function_ranges(capsys, monkeypatch):
    """On a GPU kineto also puts each record_function range (the optimizer's step) on the GPU's timeline: not a
    kernel, and under the same name as the range's CPU entry, which it must not replace in the table."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [argparse.Namespace(device_type=cuda, device_time=2000.0, is_user_annotation=False),  # a kernel
              argparse.Namespace(device_type=cuda, device_time=5270.0, is_user_annotation=True),  # the range
              argparse.Namespace(device_type=cpu, device_time=0.0, is_user_annotation=False)]
    rows = (("Optimizer.step#AdamW.step", 1, 0.0, False), ("Optimizer.step#AdamW.step", 1, 5270.0, True),
            ("aten::mm", 10, 2000.0, False))
    averages = [argparse.Namespace(key=k, count=c, self_device_time_total=us, is_user_annotation=a)
                for k, c, us, a in rows]
    monkeypatch.setattr("torch.profiler.profile", fake_profile(events, averages))
    times = bench_mto.profile_step("v", lambda: None, cuda=True, top=3)
    assert times == {"Optimizer.step#AdamW.step": (1, 0.0), "aten::mm": (10, 2.0)}
    assert ", 1 GPU kernels, GPU busy 2.0 ms" in capsys.readouterr().out


def test_byte_count_counts_reads_and_writes_by_the_rules_of_each_kind_of_op():
    """Elementwise ops: inputs read, results written; views and empty tensors: nothing; fills: written only; gathers:
    the rows taken and the index; index_put_: the values and index read, the values' bytes written; copy_: the
    source read, the destination written."""
    index, values = torch.arange(10), torch.ones(10)  # 80 bytes, 40 bytes
    with bench_mto.ByteCount() as counter:
        ones = torch.ones(1000)  # 4000 bytes
        total = ones + ones
        total.view(10, 100)
        total.index_select(0, index)
        torch.zeros(1000).index_put_((index,), torch.ones(10))  # ones(10): 40 bytes written
        total.index_put((index,), values)  # out of place: also a copy of total, read and written
        torch.empty(1000).copy_(total)
    ops = {}
    for (op, _, _), entry in counter.ops.items():  # summed over shapes
        ops[op] = tuple(map(sum, zip(ops.get(op, (0, 0, 0)), entry)))
    assert ops["ones"] == (2, 0, 4040) and ops["add"] == (1, 8000, 4000)
    assert ops.get("view", (1, 0, 0)) == (1, 0, 0) and ops.get("empty", (1, 0, 0)) == (1, 0, 0)
    assert ops["index_select"] == (1, 40 + 80, 40) and ops["zeros"] == (1, 0, 4000)
    assert ops["index_put_"] == (1, 80 + 40, 40) and ops["copy_"] == (1, 4000, 4000)
    assert ops["index_put"] == (1, 80 + 40 + 4000, 40 + 4000)


def test_byte_count_counts_what_in_place_ops_that_return_nothing_write():
    """torch's foreach ops (AdamW's default on a GPU) return nothing: what they write in place was counted as 0 bytes,
    so a GPU's optimizer step counted its reads only."""
    tensors = [torch.zeros(100), torch.zeros(50)]  # 600 bytes
    with bench_mto.ByteCount() as counter:
        torch._foreach_add_(tensors, [torch.ones(100), torch.ones(50)])
        torch._foreach_mul_(tensors, 2.0)
    ops = {op: entry for (op, _, _), entry in counter.ops.items()}
    assert ops["_foreach_add_"] == [1, 1200, 600] and ops["_foreach_mul_"] == [1, 600, 600]


def test_bench_mto_count_bytes_counts_megabytes_of_a_million_bytes(capsys):
    counts = bench_mto.count_bytes("v", lambda: torch.ones(250_000) * 2)  # 1e6 bytes written, then read and written
    assert counts == {"ones (250000,) float32": (1, 1.0), "mul (250000,) float32": (1, 2.0)}
    assert capsys.readouterr().out.startswith("bytes of v: 0.003 GB read + written in 2 ops\n")


def test_bench_mto_count_bytes_prints_each_variants_bytes_and_the_ops_that_grew(capsys):
    """--count_bytes: one more step of each variant under ByteCount; MTO reads and writes more than plain DTM, by the
    percentage printed, and its ops that grew most are listed largest first."""
    bench_mto.main(["--model", "vit_tiny", "--img_size", "32", "--batch", "2", "--variants", "0", "1", "--steps", "1",
                    "--warmup", "0", "--count_bytes"])
    out = capsys.readouterr().out.splitlines()
    heads = [i for i, line in enumerate(out) if line.startswith("bytes of ")]
    assert len(heads) == 2
    totals = [float(re.search(r": (\d+\.\d+) GB read \+ written in \d+ ops", out[i]).group(1)) for i in heads]
    percent = float(re.search(r"\(([+-]\d+\.\d)% over the first variant\)", out[heads[1]]).group(1))
    assert totals[1] > totals[0] and percent > 0
    rounding = 0.05 + 0.05 * (1 + totals[1] / totals[0]) / totals[0]  # the percentage's and the totals' (to MB)
    assert abs(percent - 100 * (totals[1] / totals[0] - 1)) <= rounding * 1.01
    grown = out[out.index("  grew most over the first variant (calls, MB):") + 1:][:8]
    assert all(re.fullmatch(r"    \S.* +[+-]\d+ calls +[+-]\d+\.\d MB", line) for line in grown), grown
    increases = [float(line.split()[-2]) for line in grown]
    assert increases == sorted(increases, reverse=True) and increases[0] > 0


def test_bench_mto_compare_mto_names_a_missing_file(tmp_path):
    for path in (tmp_path / "missing.py", tmp_path):  # a missing file, a folder
        with pytest.raises(SystemExit, match="no such Python file"):
            bench_mto.load_mto(str(path))


def test_bench_mto_compile_reaches_the_blocks_and_the_losses_and_refuses_an_older_mto(tmp_path, monkeypatch, capsys):
    """--compile: every variant's blocks (engine.compile_blocks) and MTO's losses, as train_pretrain.py --compile;
    variant 5: the losses only. An mto.py from --compare_mto without MTOConfig.compile runs eager, and refuses to
    stand in for a compiled one."""
    compiled_blocks = []
    monkeypatch.setattr(bench_mto.engine, "compile_blocks", lambda vit: compiled_blocks.append(vit))
    hooks = []
    monkeypatch.setattr(bench_mto.dtm, "DTMPretrainModel", lambda student, dim, features_fn: hooks.append(features_fn)
                        or bench_mto.dtm.nn.Linear(1, 1))
    args = argparse.Namespace(model="vit_tiny", img_size=64, batch=2, device="cpu", amp="fp32", compile=True)
    configs = list(bench_mto.VARIANTS.values())
    bench_mto.make_step(args, None)
    bench_mto.make_step(args, configs[1])
    assert len(compiled_blocks) == 2 and hooks[0] is None and hooks[1].cfg.compile
    assert bench_mto.EAGER_VARIANTS == [0, 1, 2, 3, 4]
    assert [bench_mto.mto_hook(bench_mto.mto, configs[1], compile_losses).cfg.compile
            for compile_losses in (False, True)] == [False, True]
    assert bench_mto.mto_hook(bench_mto.mto, configs[5], False).cfg.compile and not configs[1].compile
    source = open(os.path.join(HERE, "mto.py")).read().replace("    compile: bool = False\n", "")
    (tmp_path / "old_mto.py").write_text(source)
    old = bench_mto.load_mto(str(tmp_path / "old_mto.py"))
    assert not hasattr(old.MTOConfig(), "compile")
    assert bench_mto.mto_hook(old, configs[1], False).cfg == old.MTOConfig()
    with pytest.raises(SystemExit, match="has no MTOConfig.compile"):
        bench_mto.mto_hook(old, configs[1], True)
    monkeypatch.setattr(bench_mto, "make_teacher", ran_past_the_checks)  # refused before anything is built
    with pytest.raises(SystemExit) as exit_status:
        bench_mto.main(["--compile", "--compare_mto", str(tmp_path / "old_mto.py")])
    assert exit_status.value.code == 2 and bench_mto.COMPILE_MISSING in capsys.readouterr().err


def test_bench_mto_step_trains_with_the_trainers_masks_and_two_levels_of_groups(monkeypatch):
    """One step: masks with the trainer's share of masked patches (75 of 196, here 6 of 16), L=2 levels of groups
    from a schedule drawn anew every step, and num_groups that count the groups (the random split's cap on a round's
    merges, not the official one's). With MTO, the sizes of the CPU mask go with it, as in train_pretrain (no host
    sync on a GPU)."""
    seen, sizes, forward = [], [], bench_mto.dtm.DTMPretrainModel.forward
    monkeypatch.setattr(bench_mto.dtm.DTMPretrainModel, "forward",
                        lambda self, images, mask, targets, groups, num_groups, mask_sizes=None: (
                            seen.append((mask, groups, num_groups)), sizes.append(mask_sizes),
                            forward(self, images, mask, targets, groups, num_groups, mask_sizes))[-1])
    args = argparse.Namespace(model="vit_tiny", img_size=64, batch=2, device="cpu", amp="fp32", compile=False)
    step = bench_mto.make_step(args, None)
    for _ in range(3):
        step()
    bench_mto.make_step(args, bench_mto.mto.MTOConfig())()
    assert sizes == [None] * 3 + [(6, 10, 10)]
    assert all(mask.shape == (2, 16) and mask.sum(1).tolist() == [6, 6] for mask, _, _ in seen)
    assert not torch.equal(seen[0][0][0], seen[0][0][1])  # each image its own mask
    assert all(len(groups) == len(num_groups) == 2 for _, groups, num_groups in seen)
    assert all(int(g.max()) + 1 == n for _, groups, num_groups in seen for g, n in zip(groups, num_groups))  # exact
    assert len({tuple(n) for _, _, n in seen}) > 1  # a new schedule every step


def test_bench_mto_step_with_a_teacher_trains_on_its_targets_and_frees_the_gradients(monkeypatch):
    """--teacher clip: every step's targets are the teacher's for the step's images (not the random stand-ins);
    each step ends with the gradients freed, as the trainer's; at 112 px 19 of 49 patches are masked (75 / 196)."""
    seen, forward = [], bench_mto.dtm.DTMPretrainModel.forward
    monkeypatch.setattr(bench_mto.dtm.DTMPretrainModel, "forward",
                        lambda self, images, mask, targets, groups, num_groups, mask_sizes=None: (
                            seen.append((self, images, mask, targets)),
                            forward(self, images, mask, targets, groups, num_groups, mask_sizes))[-1])
    made = []

    def teacher(images):
        made.append((images, torch.randn(images.shape[0], 49, 512)))
        return made[-1][1]

    args = argparse.Namespace(model="vit_tiny", img_size=112, batch=2, device="cpu", amp="fp32", compile=False)
    step = bench_mto.make_step(args, None, teacher=teacher)
    step()
    model, images, mask, targets = seen[0]
    assert len(made) == 1 and made[0][0] is images and targets is made[0][1]
    assert mask.sum(1).tolist() == [19, 19]
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- bench_data

def test_bench_data_make_jpegs_writes_500x375_jpegs(tmp_path):
    bench_data.make_jpegs(str(tmp_path / "f"), 2)
    files = sorted(os.listdir(tmp_path / "f" / "x"))
    assert files == ["0.jpg", "1.jpg"]
    with bench_data.Image.open(tmp_path / "f" / "x" / "0.jpg") as image:
        assert image.size == (500, 375) and image.format == "JPEG" and image.mode == "RGB"
        quality_90 = tmp_path / "q90.jpg"
        bench_data.Image.new("RGB", (8, 8)).save(quality_90, quality=90)
        with bench_data.Image.open(quality_90) as reference:
            assert image.quantization == reference.quantization  # the docstring's quality 90


def test_bench_data_figures(tmp_path, monkeypatch, capsys):
    """Each pipeline's ms/image (warm-up untimed, the first --images files in turn), images/s, and the DataLoader's
    samples/s over the rounds after the first, with the trainer's transform and masks."""
    clock, decoded, made, loaders = FakeClock(), [], {}, []

    class FakeFolder:
        def __init__(self, root):
            self.samples = [(f"img{i}.jpg", 0) for i in range(5)]

        def __len__(self):
            return len(self.samples)

    def load_image(path):
        decoded.append(path)
        clock.now += 0.001
        return path

    def pretrain(image):
        clock.now += 0.002
        return torch.zeros(1)

    def finetune(image):
        clock.now += 0.005
        return torch.zeros(1)

    class FakeLoader:
        """Workers start together: the first round's batches arrive at 10 s and 10.5 s, each later round 1 s after."""

        def __init__(self, dataset, batch_size, sampler, num_workers, persistent_workers):
            loaders.append((batch_size, sampler.num_samples, num_workers, persistent_workers, set(sampler.data_source)))
            self.batches, self.workers = len(sampler) // batch_size, max(num_workers, 1)

        def __iter__(self):
            for b in range(self.batches):
                r, k = divmod(b, self.workers)
                clock.now = 10.0 + r + 0.5 * k
                yield b

    monkeypatch.setattr(bench_data, "time", clock)
    monkeypatch.setattr(bench_data.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(bench_data.data, "ImageFolder", FakeFolder)
    monkeypatch.setattr(bench_data.data, "load_image", load_image)
    monkeypatch.setattr(bench_data.data, "PretrainTransform",
                        lambda *a, **k: made.setdefault("pretrain", (a, k)) and pretrain)
    mask = lambda: setattr(clock, "now", clock.now + 0.0005)
    monkeypatch.setattr(bench_data.data, "BlockMaskGenerator",
                        lambda *a, **k: made.setdefault("masks", (a, k)) and mask)
    monkeypatch.setattr(bench_data.data, "FinetuneTransform", lambda *a, **k: finetune)
    monkeypatch.setattr(bench_data.data, "MaskedImageDataset", lambda *a: None)
    monkeypatch.setattr(bench_data.torch.utils.data, "DataLoader", FakeLoader)
    monkeypatch.setattr("sys.argv", ["bench_data.py", "--data", str(tmp_path), "--images", "3", "--repeats", "4",
                                     "--workers", "2", "--batch", "4", "--rounds", "3"])
    bench_data.main()
    assert decoded[:5] == ["img0.jpg", "img0.jpg", "img1.jpg", "img2.jpg", "img0.jpg"]  # warm-up, then files in turn
    defaults = train_pretrain.get_args_parser().parse_args([])
    assert made["pretrain"] == ((224,), {"min_crop_scale": defaults.min_crop_scale})
    assert made["masks"] == (((14, 14),), {"num_masked": defaults.num_masked, "min_block": defaults.min_block})
    assert loaders == [(4, 4 * 2 * 3, 2, True, {0, 1, 2})]  # 2 batches per round for 3 rounds, over the 3 files
    out = capsys.readouterr().out
    assert out.startswith(f"3 files from {tmp_path};")
    assert "              decode:   1.0 ms/image =  1000 images/s per worker" in out
    assert " pre-training sample:   3.5 ms/image =   286 images/s per worker" in out  # its mask's time too
    assert "  fine-tuning sample:   6.0 ms/image =   167 images/s per worker" in out
    # rounds 2 and 3 (16 samples) from the end of round 1 (10.5 s) to the end of round 3 (12.5 s)
    assert "DataLoader, 2 workers, batch 4, 2 timed rounds: 8 pre-training samples/s (4 per worker)" in out


def test_bench_data_reads_in_its_dataloader_only_the_files_its_pipelines_timed(tmp_path, monkeypatch, capsys):
    """--repeats below --images: the pipelines read the first --repeats files, the DataLoader drew from all --images,
    and one that none had read ended in a DataLoader traceback (here the corrupt third file)."""
    (tmp_path / "a").mkdir()
    for name in ("0.jpg", "1.jpg"):
        Image.new("RGB", (32, 24), "red").save(tmp_path / "a" / name)
    (tmp_path / "a" / "z.jpg").write_text("not a jpeg")
    monkeypatch.setattr(bench_data.torch, "set_num_threads", lambda n: None)
    torch.manual_seed(0)
    bench_data.main(["--data", str(tmp_path), "--images", "3", "--repeats", "2", "--workers", "0", "--batch", "8",
                     "--rounds", "2"])
    assert capsys.readouterr().out.startswith(f"2 files from {tmp_path};")


@pytest.mark.parametrize("script", ["bench_mto", "bench_morph"])
def test_bench_device_without_cuda_is_refused_before_the_set_up(script, monkeypatch, capsys):
    """--device cuda on a machine without a GPU was torch's "not compiled with CUDA" traceback after the set-up."""
    module = {"bench_mto": bench_mto, "bench_morph": bench_morph}[script]
    for name in ("make_teacher", "check_agreement", "run_child", "measure"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, ran_past_the_checks)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", [f"{script}.py", "--device", "cuda"])
    with pytest.raises(SystemExit) as exit_status:
        module.main(["--device", "cuda"]) if script == "bench_mto" else module.main()
    assert exit_status.value.code == 2
    assert "error: --device cuda: no CUDA device here" in capsys.readouterr().err


def test_bench_device_beyond_this_machines_gpus_is_refused_naming_those_there_are(monkeypatch, capsys):
    """--device cuda:2 on a machine with 2 GPUs: no test made this refusal."""
    monkeypatch.setattr(bench_mto, "make_teacher", ran_past_the_checks)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit) as exit_status:
        bench_mto.main(["--device", "cuda:2"])
    assert exit_status.value.code == 2
    assert "error: --device cuda:2: this machine has 2 GPU(s); use cuda:0 to cuda:1\n" in capsys.readouterr().err


def test_bench_mto_malloc_keep_without_glibc_names_the_fix(monkeypatch):
    """--malloc keep where there is no glibc (macOS): no test made this refusal."""
    def no_glibc(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(bench_mto, "make_teacher", ran_past_the_checks)
    monkeypatch.setattr(bench_mto.ctypes, "CDLL", no_glibc)
    with pytest.raises(SystemExit, match=r"^--malloc keep needs glibc \(Linux\); run without it$"):
        bench_mto.main(["--malloc", "keep"])


def test_bench_mto_compare_mto_that_is_not_a_copy_of_mto_py_is_one_line(tmp_path, monkeypatch):
    """A Python file without MTO / MTOConfig was an AttributeError traceback from has_compile."""
    (tmp_path / "other.py").write_text("x = 1\n")
    monkeypatch.setattr(bench_mto, "make_teacher", ran_past_the_checks)
    with pytest.raises(SystemExit, match=r"other.py: has no MTO and MTOConfig, it is not a copy of mto.py; pass one"):
        bench_mto.main(["--compare_mto", str(tmp_path / "other.py")])


def test_bench_mto_compare_mto_that_is_not_python_is_one_line(tmp_path, monkeypatch):
    """`git show <commit> mto.py` (a space for the colon) writes the commit's diff: it was a SyntaxError traceback."""
    (tmp_path / "old_mto.py").write_text("commit edfbde7\nAuthor: someone\n\ndiff --git a/mto.py b/mto.py\n")
    monkeypatch.setattr(bench_mto, "make_teacher", ran_past_the_checks)
    with pytest.raises(SystemExit, match=r"old_mto.py: is not Python \(SyntaxError at line 1: invalid syntax\); pass "
                                         r"a copy of mto.py \(git show <commit>:mto.py > old_mto.py\)$"):
        bench_mto.main(["--compare_mto", str(tmp_path / "old_mto.py")])


def test_bench_data_an_unreadable_image_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """A corrupt image in --data was data.UnreadableImage's traceback (its message right, but under a traceback)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_text("not a jpeg")
    monkeypatch.setattr(bench_data.torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr("sys.argv", ["bench_data.py", "--data", str(tmp_path), "--repeats", "1"])
    with pytest.raises(SystemExit) as exit_status:
        bench_data.main()
    assert exit_status.value.code == 2
    assert "--data: cannot read image file" in capsys.readouterr().err
