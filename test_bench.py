"""The benchmark scripts refuse arguments that would crash late (a traceback after the set-up) or measure nothing."""
import os
import subprocess
import sys

import pytest

import bench_mto

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps and --batch must be >= 1"),  # a StatisticsError after the set-up
    (["--variants", "-1"], "--variants are indices 0..4, got [-1]"),  # -1 silently took the last
    (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),  # ran with a disabled GradScaler
])
def test_bench_mto_refuses(argv, message, capsys):
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
