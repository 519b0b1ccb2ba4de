"""MTO's compiled losses (MTOConfig.compile, train_pretrain.py --compile --mto) and the compiled ViT blocks (--compile)
build for the users' GPUs, checked on a machine without one: inductor writes the Triton kernels of their forward and
backward passes, and the installed Triton compiles each, through all of triton.compile's stages (TTIR, TTGIR, LLVM IR,
PTX, and a cubin from ptxas) and with inductor's compile options, for a V100 (sm_70) in fp16 and an A100 (sm_80) and
an H100/H200 (sm_90) in bf16 (what --amp auto picks), with the configurations (block sizes, warps) inductor's
heuristics return for that GPU (its own functions, given the GPU's properties; the same for these three). ptxas: for
sm_80 and sm_90 the one inductor takes, torch's own where the installed torch is a CUDA build that has one, else the
one in Triton's wheel; for sm_70 always Triton's (a CUDA 13 build's cannot target it; a V100 runs a CUDA 12 build).
Nothing runs: kernel launches are no-ops, so values are not checked here (test_mto.py checks them, on the CPU).

Why: on an H200, Triton 3.6 failed to build one kernel of the singularity loss (a product both divided by and kept for
the backward: TritonGPURemoveLayoutConversions, "operand does not dominate this use"), so --compile --mto stopped at its
first step (docs/RESULTS.md section 3). Here torch 2.13's inductor writes that kernel, and with the mto.py of then the
first test fails on it (8 warps, one row per program; sm_70 and sm_80); with torch 2.11.0+cu130 and Triton 3.6.0, the
versions of that GPU run, it fails for sm_90 with that run's error. Kernels are built for ViT-B's sizes at batch 2:
the losses for groups of 2 and 3 blocks, then padded rows; the blocks of pre-training with MTO and of fine-tuning, with
the trainers' relative position biases. Other batch sizes make other graphs: build_kernels(..., batch=128) builds them
(by hand, once, for 64 and 128: docs/RESULTS.md section 3).

What it does not show: the kernels are the ones inductor writes for the CPU's Triton backend, which differ from a GPU's
beyond the attention (on the CPU an explicit softmax, on a GPU a fused SDPA kernel): the layer norms' variance by the
CPU's rule (two-step sums or Welford by other thresholds), no mix-order reductions (a GPU's for large layer-norm
backwards), split reductions sized by the CPU's core count. The extra configurations inductor builds on a GPU after
measuring registers (_dynamic_scale_rblock) and the launch-time limits (shared memory, threads) are not checked.

Skipped without triton (the CPU wheel of torch does not install it): pip install triton==3.6.0 (the version that
failed, with torch 2.11 on that GPU; here it runs with the installed torch's inductor), then python -m pytest -q
test_triton.py. Each test builds in two child processes, one per precision (sm_70's fp16; sm_80's and sm_90's bf16).
On 2 cores of an AMD EPYC machine (2026-12-05) the losses took 51 s and the blocks 197 s, against 78 s and 292 s when
one child built all three targets. The builds of the tests pytest has collected start before the first test runs
(conftest.py calls start_ahead), all four children at the lowest CPU priority: in a run of the whole suite they build
on the core its tests leave idle (most tests run on one thread) and each test here waits for its own.
"""
import atexit
import ctypes
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import types

import pytest

try:
    import triton  # noqa: F401
except ImportError:
    triton = None

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = (70, 80, 90)  # compute capabilities: V100, A100, H100/H200

# run in a child process: it patches inductor's compile and launch for the whole process
CHILD = r"""
import copy, json, os, sys, unittest.mock
import torch
import torch._inductor.config as inductor_config
import triton
from torch._inductor.runtime import triton_heuristics
from torch._inductor.runtime.hints import DeviceProperties
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
import mto

class NoGPU:  # the Triton driver inductor asks for the current target and stream; none is launched on
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_current_stream(self, *args): return 0
    def get_active_torch_device(self): return torch.device("cpu")
    def get_benchmarker(self): return lambda *args, **kwargs: 1.0

SMS = {70: 80, 80: 108, 90: 132}  # streaming multiprocessors: V100, A100, H100/H200

def gpu(cc):  # what inductor's heuristics read of a GPU (torch.cuda.get_device_properties there)
    return DeviceProperties(type="cuda", index=0, multi_processor_count=SMS[cc], cc=cc, major=cc // 10,
                            regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                            max_threads_per_block=1024, warp_size=32)

def remembered(heuristic):  # a kernel's decorator (pointwise, reduction, ...) keeps its arguments on the kernel
    def decorator(*args, **kwargs):
        make = heuristic(*copy.deepcopy(args), **copy.deepcopy(kwargs))
        def apply(fn):
            autotuner = make(fn)
            autotuner.heuristic = heuristic, args, kwargs
            return autotuner
        return apply
    return decorator

def gpu_configs(autotuner, cc):  # the block sizes and warps inductor would try for this kernel on that GPU
    if not hasattr(autotuner, "heuristic"):
        raise RuntimeError(f"{autotuner.inductor_meta.get('kernel_name')}: made by a triton_heuristics function "
                           "that is not wrapped in remembered(): add its name to those wrapped below")
    heuristic, args, kwargs = copy.deepcopy(autotuner.heuristic)
    kwargs["triton_meta"] = {**kwargs["triton_meta"], "device": gpu(cc)}
    with unittest.mock.patch("torch.cuda.is_available", lambda: True):  # a branch of persistent reductions asks
        configs = heuristic(*args, **kwargs, return_configs=True)
    return triton_heuristics.unique_configs(configs)  # as cached_autotune does with them

failures, kernels, cubins = [], [], []

def build(autotuner, *args, **kwargs):  # in place of inductor's compile: build for each GPU, load nothing
    name = autotuner.inductor_meta.get("kernel_name", "?")
    kernels.append([name, TARGETS])
    for cc in TARGETS:
        for cfg in gpu_configs(autotuner, cc):
            meta = autotuner._create_compile_meta(cfg)
            source = triton.compiler.ASTSource(autotuner.fn, meta["signature"], meta["constants"], meta["configs"][0])
            options = autotuner._create_compile_options(cfg, meta)  # inductor's (sanitize_overflow off, ...)
            try:
                cubin = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options).asm["cubin"]
                cubins.append([name, cc, cubin[:4] == b"\x7fELF"])
            except Exception as e:
                failures.append(f"{name} sm_{cc} {cfg.kwargs} {cfg.num_warps} warps: "
                                f"{type(e).__name__}: {str(e)[:300]}")
                return

for name in ("pointwise", "reduction", "persistent_reduction"):
    setattr(triton_heuristics, name, remembered(getattr(triton_heuristics, name)))
TARGETS = json.loads(sys.argv[1])  # one precision's: [70], or some of [80, 90]
driver.set_active(NoGPU())
inductor_config.cpu_backend = "triton"
inductor_config.compile_threads = 1
triton_heuristics.CachingAutotuner.precompile = build
triton_heuristics.CachingAutotuner.run = lambda self, *args, **kwargs: None

B, N, T, C, H, D = int(sys.argv[3]), 196, 197, 768, 12, 64  # ViT-B at 224 px, batch B


def random_mask(padded=False):  # 75 masked patches in each image, or counts that differ (padded rows)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        mask[b, torch.randperm(N)[:75 + (5 * (b % 8) if padded else 0)]] = True
    return mask


def losses(blocks, padded, dtype):  # both losses and their backward, for `blocks` blocks in one group
    mask = random_mask(padded)
    rows = mto.patch_rows(mask)
    hiddens = [torch.randn(B, T, C, requires_grad=True) for _ in range(blocks)]
    qks = [(torch.randn(B, H, T, D, dtype=dtype, requires_grad=True),
            torch.randn(B, H, T, D, dtype=dtype, requires_grad=True),
            torch.randn(H, T, T, requires_grad=True)) for _ in range(blocks)]
    loss = (mto.singularity_losses(hiddens, mask, rows, compile=True).sum()
            + mto.attention_entropies(qks, mask, rows, compile=True).sum())
    loss.backward()


def afresh():  # dynamo's graphs and mto's compiled losses dropped: the next call compiles (and builds) again
    torch._dynamo.reset()
    mto._compiled.cache_clear()


TRITON_PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
TORCH_PTXAS = os.path.join(os.path.dirname(torch.__file__), "bin", "ptxas")  # a CUDA build's own, if it has one


# ptxas: inductor's choice, torch's own where the build has one (which a CUDA 13 build's cannot do for sm_70), else
# Triton's; for sm_70 Triton's (a V100 runs a CUDA 12 build, whose ptxas takes sm_70)
own = os.access(TORCH_PTXAS, os.X_OK) and 70 not in TARGETS
os.environ["TRITON_PTXAS_PATH"] = TORCH_PTXAS if own else TRITON_PTXAS


def mto_losses(dtype):  # as in training: a group of 2 blocks, then one of 3 (dynamo recompiles with dynamic sizes);
    losses(2, padded=False, dtype=dtype)  # then afresh, padded rows
    losses(3, padded=False, dtype=dtype)
    afresh()
    losses(2, padded=True, dtype=dtype)


def vit_blocks(dtype):  # train_pretrain.py --compile --mto's student, train_finetune.py --compile's ViT (their
    import dtm, engine  # relative position biases); forward + backward
    images = torch.randn(B, 3, 224, 224)
    vit = dtm.build_vit("vit_b", drop_path_rate=0.1, rel_pos_bias="both")
    engine.compile_blocks(vit)
    cfg = mto.MTOConfig(compile=True)  # recalibration in all 12 blocks, both losses compiled
    with torch.autocast("cpu", dtype=dtype):
        tokens, parts = mto.mto_forward(vit, images, random_mask(), cfg)
        loss = tokens.float().square().mean() + mto.mto_total_loss(parts, cfg)
    loss.backward()
    afresh()
    vit = dtm.build_vit("vit_b", drop_path_rate=0.1, num_classes=1000, rel_pos_bias="per_block")
    engine.compile_blocks(vit)
    with torch.autocast("cpu", dtype=dtype):
        logits = vit(images)
    logits.float().logsumexp(-1).mean().backward()


torch.manual_seed(0)
{"mto_losses": mto_losses, "vit_blocks": vit_blocks}[sys.argv[2]](getattr(torch, sys.argv[4]))
print("RESULT " + json.dumps({"kernels": kernels, "cubins": cubins, "failures": failures}))
"""


PRECISIONS = (("float16", (70,)), ("bfloat16", (80, 90)))  # --amp auto: fp16 on a V100, bf16 on an A100 / H100


def build_kernels(tmp_path, case, targets=TARGETS, mto_dir=HERE, batch=2):
    """Build case's kernels ("mto_losses" or "vit_blocks") for the targets: one result per precision, {"kernels":
    [[name, targets], ...], "cubins": [[name, target, is ELF], ...], "failures": [...], "generated": [...],
    "stderr_tail": ...}."""
    return wait_for(start_builds(tmp_path, case, targets, mto_dir, batch))


def start_builds(tmp_path, case, targets=TARGETS, mto_dir=HERE, batch=2, low_priority=False):
    """Start case's builds, one child process per precision, all at once: [(folder, child), ...]. Each writes its
    kernels afresh and builds them, which is about one core's work (Triton's passes and ptxas). low_priority: the
    children (and their ptxas) yield the CPU to any other process."""
    groups = [(dtype, [cc for cc in group if cc in targets]) for dtype, group in PRECISIONS]
    return [_start_child(tmp_path / dtype, case, dtype, group, mto_dir, batch, low_priority)
            for dtype, group in groups if group]


def wait_for(children):
    """Wait for the children and read their results; a failure kills the others (none is left running)."""
    try:
        return [_child_result(folder, child) for folder, child in children]
    finally:
        stop(children)


def stop(children):
    for _, child in children:
        child.kill()  # a no-op where it has ended
        child.wait()


CASE_OF_TEST = {"test_mto_compiled_losses_kernels_build_for_sm70_sm80_sm90": "mto_losses",
                "test_compiled_vit_blocks_kernels_build_for_sm70_sm80_sm90": "vit_blocks"}
STARTED = {}  # case: its children, started by start_ahead


def start_ahead(items):
    """Start the builds of this file's tests among the session's items now, at the lowest CPU priority (conftest.py
    calls this once pytest has collected the session's tests): they run beside the rest of the suite, on the core its
    tests leave idle (most run on one thread), instead of after them. A test takes its case's results from here."""
    cases = sorted({CASE_OF_TEST[item.name] for item in items if item.name in CASE_OF_TEST})
    if triton is None or not cases:
        return
    folder = pathlib.Path(tempfile.mkdtemp(prefix="test_triton_"))
    atexit.register(shutil.rmtree, folder, True)  # atexit runs last in first: the children are stopped before
    for case in cases:
        STARTED[case] = start_builds(folder / case, case, low_priority=True)
        atexit.register(stop, STARTED[case])  # pytest -x, or Ctrl-C, before the test that waits for them


def built(tmp_path, case):
    """case's build results: of the builds started ahead, else of builds started now."""
    return wait_for(STARTED.pop(case, None) or start_builds(tmp_path, case))


def _start_child(folder, case, dtype, targets, mto_dir, batch, low_priority):
    folder.mkdir(parents=True)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(folder / "inductor"), TRITON_CACHE_DIR=str(folder / "triton"),
               PYTHONPATH=mto_dir, TORCHINDUCTOR_COMPILE_THREADS="1")
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:  # files: no pipe fills and blocks
        child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(targets), case, str(batch), dtype],
                                 stdout=out, stderr=err, env=env, cwd=str(folder),
                                 preexec_fn=_yield_and_follow_pytest if low_priority else None)
    return folder, child


def _yield_and_follow_pytest():
    """A build started ahead (in the child, before it runs): nice 19, and on Linux killed when pytest ends, also by a
    SIGTERM (a CI's cancel, `timeout`), which skips the atexit stop."""
    os.nice(19)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: atexit alone
        pass


def _child_result(folder, child):
    child.wait(timeout=1800)
    stderr = (folder / "stderr").read_text()
    lines = [line for line in (folder / "stdout").read_text().splitlines() if line.startswith("RESULT ")]
    assert child.returncode == 0 and lines, stderr[-3000:]
    generated = set()  # the kernels inductor wrote, read from its cache (each is defined in one file or more)
    for path in (folder / "inductor").rglob("*.py"):
        generated.update(re.findall(r"^def (triton_\w+)\(", path.read_text(), flags=re.M))
    return {**json.loads(lines[-1][len("RESULT "):]), "generated": sorted(generated), "stderr_tail": stderr[-3000:]}


def check_built(results):
    """For each child: no kernel failed; every kernel inductor wrote was built; each got a cubin (an ELF file, from
    ptxas)."""
    for result in results:
        assert not result["failures"], "\n".join([*result["failures"], result["stderr_tail"]])
        assert result["generated"] and set(result["generated"]) == {name for name, _ in result["kernels"]}
        assert {(name, cc) for name, cc, _ in result["cubins"]} == {(name, cc) for name, ccs in result["kernels"]
                                                                      for cc in ccs} != set()
        assert all(elf for _, _, elf in result["cubins"])


def kernel_counts(results):
    """{target: number of kernels built for it}"""
    targets = [cc for result in results for _, ccs in result["kernels"] for cc in ccs]
    return {cc: targets.count(cc) for cc in sorted(set(targets))}


@pytest.mark.skipif(triton is None, reason="needs triton (pip install triton==3.6.0)")
def test_mto_compiled_losses_kernels_build_for_sm70_sm80_sm90(tmp_path):
    results = built(tmp_path, "mto_losses")
    counts = kernel_counts(results)
    # both losses forward and backward, 3 compilations, in fp16 for sm_70 and bf16 for sm_80 and sm_90 (94 kernels
    # each: torch 2.13, triton 3.6)
    assert sorted(counts) == [70, 80, 90] and min(counts.values()) >= 90, counts
    # the kernel that failed on the H200: the cosine after the gather of each masked row's nearest visible key
    for result in results:
        names = [name for name, _ in result["kernels"]]
        assert any("gather" in name and "linalg_vector_norm" in name for name in names), names
    check_built(results)


@pytest.mark.skipif(triton is None, reason="needs triton (pip install triton==3.6.0)")
def test_compiled_vit_blocks_kernels_build_for_sm70_sm80_sm90(tmp_path):
    """--compile's blocks, pre-training with MTO and fine-tuning: fp16 for sm_70, bf16 for sm_80 and sm_90."""
    results = built(tmp_path, "vit_blocks")
    counts = kernel_counts(results)
    # forward and backward of the pre-training blocks (and MTO's losses), then the fine-tuning ones (224 each here)
    assert sorted(counts) == [70, 80, 90] and min(counts.values()) >= 200, counts
    check_built(results)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_start_ahead_starts_the_collected_tests_builds_at_the_lowest_priority(monkeypatch):
    """conftest.py's early start: the builds of this file's collected tests only, each child at nice 19 and killed
    when pytest ends; the test takes their results (children here that report their niceness and death signal)."""
    monkeypatch.setitem(globals(), "triton", triton or object())
    monkeypatch.setitem(globals(), "STARTED", {})
    monkeypatch.setitem(globals(), "CHILD", "import ctypes, json, os; death = ctypes.c_int(); "
                        "ctypes.CDLL(None).prctl(2, ctypes.byref(death)); "  # PR_GET_PDEATHSIG
                        "print('RESULT ' + json.dumps({'nice': os.nice(0), 'death': death.value}))")
    start_ahead([types.SimpleNamespace(name=name) for name in (
        "test_mto_compiled_losses_kernels_build_for_sm70_sm80_sm90", "test_start_ahead_starts_the_collected_tests")])
    assert list(STARTED) == ["mto_losses"] and len(STARTED["mto_losses"]) == len(PRECISIONS)
    results = built(None, "mto_losses")
    assert [(result["nice"], result["death"]) for result in results] == [(19, signal.SIGKILL)] * len(PRECISIONS)
    assert STARTED == {}


@pytest.mark.skipif(os.name != "posix", reason="a killed child's return code is -SIGKILL on POSIX")
def test_builds_started_ahead_are_stopped_at_exit_before_their_folder_is_removed(monkeypatch):
    """pytest -x or Ctrl-C before the test that waits for them: pytest's exit (atexit, last in first) kills the builds
    started ahead, then removes their folder; they are not left building for minutes after pytest."""
    monkeypatch.setitem(globals(), "triton", triton or object())
    monkeypatch.setitem(globals(), "STARTED", {})
    monkeypatch.setitem(globals(), "CHILD", "import time; time.sleep(60)")
    at_exit = []
    monkeypatch.setattr(atexit, "register", lambda function, *args: at_exit.append((function, args)))
    start_ahead([types.SimpleNamespace(name="test_compiled_vit_blocks_kernels_build_for_sm70_sm80_sm90")])
    children = STARTED["vit_blocks"]
    try:
        for function, args in reversed(at_exit):
            function(*args)
        assert [child.returncode for _, child in children] == [-signal.SIGKILL] * len(PRECISIONS)
        assert not children[0][0].parent.parent.exists()  # the temporary folder of all the builds
    finally:
        stop(children)


@pytest.mark.skipif(os.name != "posix", reason="a killed child's return code is -SIGKILL on POSIX")
def test_a_failed_build_kills_its_sibling(tmp_path, monkeypatch):
    """The fp16 child fails: the test fails at once, and the bf16 child still building is killed (not left running
    beside the next tests)."""
    monkeypatch.setitem(globals(), "CHILD", "import sys, time\n"  # argv: targets, case, batch, dtype
                        "sys.exit(3) if sys.argv[4] == 'float16' else time.sleep(60)")
    children = start_builds(tmp_path, "mto_losses")
    try:
        with pytest.raises(AssertionError):
            wait_for(children)
        assert [child.returncode for _, child in children] == [3, -signal.SIGKILL]
    finally:
        stop(children)


@pytest.mark.skipif(os.name != "posix", reason="preexec_fn is POSIX's")
def test_a_build_started_ahead_where_prctl_is_missing_still_starts_at_the_lowest_priority(tmp_path, monkeypatch):
    """Not Linux (macOS's C library has no prctl; or no C library loads: OSError): the child starts anyway, at nice
    19, and the atexit stop alone ends it early. Either error, raised in the child before it runs, fails the build."""
    monkeypatch.setitem(globals(), "CHILD", "import json, os; print('RESULT ' + json.dumps({'nice': os.nice(0)}))")

    def no_c_library(*args, **kwargs):
        raise OSError("no C library")

    for i, cdll in enumerate((lambda *args, **kwargs: types.SimpleNamespace(), no_c_library)):
        monkeypatch.setattr(ctypes, "CDLL", cdll)  # the child is forked from this process: it has these too
        results = wait_for(start_builds(tmp_path / str(i), "mto_losses", low_priority=True))
        assert [result["nice"] for result in results] == [19] * len(PRECISIONS)


def test_conftest_starts_ahead_once_per_collected_module_that_has_it_and_not_when_only_collecting():
    import conftest
    calls, other = [], types.ModuleType("test_other")
    module = types.ModuleType("test_triton")
    module.start_ahead = calls.append
    items = [types.SimpleNamespace(module=m) for m in (module, other, module)]
    for collect_only, expected in ((True, []), (False, [items])):
        config = types.SimpleNamespace(option=types.SimpleNamespace(collectonly=collect_only))
        conftest.pytest_collection_finish(types.SimpleNamespace(items=items, config=config))
        assert calls == expected
