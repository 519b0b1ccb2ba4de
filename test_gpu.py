"""GPU verification: tests that need CUDA (skipped without it), and the one command that checks a GPU machine.

    python test_gpu.py --out gpu_report.json --watchdog_s 575   # on a GPU machine (< 10 min): checks + figures -> JSON
    python -m pytest -q test_gpu.py             # the pass/fail checks as tests, not the figures (skipped without CUDA)
    python test_gpu.py --device cpu --quick     # a dry run of the same code on the CPU, tiny sizes (CI runs it; on a
                                                # machine with a GPU: CUDA_VISIBLE_DEVICES= python test_gpu.py ...)

The checks (each an entry of the report: ok / skipped / error, seconds, details):
    amp_choice       --amp auto: bf16 on GPUs with native bf16 (compute capability >= 8.0), else fp16 + GradScaler
    autocast_fp32    PixelTeacher's targets and token morphing's groups under CUDA autocast (bf16, fp16) equal
                     those without it; the random split with a CPU generator gives the CPU's groups
    pretrain_amp     pre-training steps of vit_b in fp32, bf16 (native only) and fp16 + GradScaler: the Linear
                     layers in that dtype, a loss scale logged with fp16 only, finite losses, the first step's loss
                     and the first comparable gradient norm (unscaled) equal to fp32's within tolerance
    mto              --mto: finite, the MTO fields logged, the loss DTM's plus MTO's lambda-weighted losses
    mto_no_host_sync  MTO's losses of a group of blocks and their backward, then MTO's whole forward of a ViT and its
                     backward, under --amp auto's autocast, queue their GPU work without a host sync (torch's sync
                     debug mode), given the sizes of the mask's CPU copy as train_pretrain passes them
    torchrun         a 1-process torchrun run (nccl on a GPU, gloo on the CPU) with the model in DDP and one
                     all_reduce: finishes, checkpoint written
    ddp_two_processes  pre-training and segmentation steps with 2 processes (torchrun; needs 2 GPUs, on the CPU 2
                     gloo processes): engine.ddp's DDP over nccl, the ranks' object collectives, SyncBatchNorm,
                     equal weights on both ranks after training
    finetune         fine-tuning steps and the evaluation, each of 29 images counted once (in one process; the
                     split between processes: test_finetune.py)
    seg              segmentation steps and the sliding-window evaluation
    throughput       images/s and peak memory of a ViT-B pre-training step (CLIP ViT-B/16-sized teacher, random
                     weights) at 64 and 128 images per GPU, and at 128 with --mto; ViT-L at 128 with fp16, with and
                     without --grad_checkpoint, and with both --grad_checkpoint and --mto (out of memory, also as
                     a library's failed allocation, is a figure; a configuration that cannot start 30 s before the
                     budget's end is skipped and named)
    bench_morph      python bench_morph.py --device cuda
    bench_mto        python bench_mto.py --device cuda --amp bf16 --variants 0 1 2 3 4 5 --profile (fp16 without
                     native bf16; variant 5: MTO with its losses compiled)
    sdpa             ViT-B attention with the relative position bias, without and with MTO's recalibration mask, in
                     bf16 (native only) and fp16, equal to the math kernel: in training (forward and backward; the
                     relative position tables get their gradient only through SDPA's bias gradient) in the kernel SDPA
                     picks (named in the report; it must be the memory-efficient one) and in the memory-efficient
                     kernel (forced); without gradient (evaluation, with N(0, 1) tables: a fresh model's zeros would
                     hide a dropped bias) and the CLIP teacher's maskless attention in the kernels SDPA picks (named;
                     the teacher's may be flash's or cuDNN's)
    compile          --compile: one graph shared by all blocks, finite losses, first-step loss and first comparable
                     gradient norm equal to the eager run's
    compile_mto_grad_checkpoint  as compile, with --grad_checkpoint and --mto (ViT-L's memory lever on a V100); on a GPU
                     a second graph for the blocks recomputed on autograd's thread (thread count guard); MTO's
                     losses' graphs (--compile compiles them too) are counted apart
    bench_mto_whole_step  bench_mto's DTM and MTO's defaults, eager and with its losses compiled, with --teacher clip:
                     MTO's overhead over the whole step
"""
import time

STARTED = time.perf_counter()  # the budget counts from here, before torch's import and CUDA's start-up
WATCHDOG_S = None  # --watchdog_s when set: child processes are timed out before it, so one check fails, not the run
BUDGET_S = None  # --budget_s, once main has read it: throughput starts no configuration after it less CONFIG_RESERVE_S

import argparse
import contextlib
import faulthandler
import gc
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings

import pytest
import torch

import bench_mto
import dtm
import engine
import morph
import train_finetune
import train_pretrain
import train_seg
from data import BlockMaskGenerator

HERE = os.path.dirname(os.path.abspath(__file__))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOLERANCE = {"bf16": 3e-2, "fp16": 1e-2}  # relative difference of the first-step loss from fp32


class Skip(Exception):
    """A check that does not apply on this device."""


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


TINY_PRETRAIN = ["--model", "vit_tiny", "--img_size", "64", "--batch_size", "4", "--num_masked", "6",
                 "--min_block", "2"]


def pretrain_run(out, device, quick, *extra, linear_dtypes=None):
    """A few logged pre-training steps on the built-in images -> the log's lines. linear_dtypes: a set that collects
    the dtypes of every nn.Linear's output (autocast's, where it is on)."""
    size = TINY_PRETRAIN if quick else \
        ["--model", "vit_b", "--img_size", "224", "--batch_size", "32", "--num_masked", "75", "--min_block", "16"]
    argv = [*size, "--max_steps", "3", "--log_every", "1", "--num_workers", "2", "--output_dir", str(out),
            "--drop_path", "0", "--seed", "0", *extra]
    hook = None if linear_dtypes is None else torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: linear_dtypes.add(str(output.dtype).replace("torch.", ""))
        if isinstance(module, torch.nn.Linear) else None)
    try:
        train_pretrain.main(argv)
    finally:
        if hook is not None:
            hook.remove()
    with open(os.path.join(out, engine.LOG)) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


GRAD_NORM_TOLERANCE = 0.1  # relative; faults it caught on the CPU: 6e4 times (fp16 clipped unscaled), 30% (a compiled
# backward that lost the blocks' input gradients); honest bf16 differences of ViT-B's gradients were under 1e-2 there


def first_grad_norms(a: list, b: list):
    """Two runs' log lines -> (step, grad_norm of a, of b) at the first step where both are finite while the weights
    are still equal (each step before it at lr 0, the warmup's first: an fp16 step whose gradients overflowed is
    skipped), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if i and (a[i - 1]["lr"] or b[i - 1]["lr"]):
            return None
        if x.get("grad_norm") is not None and y.get("grad_norm") is not None:
            return i, x["grad_norm"], y["grad_norm"]
    return None


def assert_grad_norms_agree(a: list, b: list, what: str):
    found = first_grad_norms(a, b)
    if found is not None:
        step, x, y = found
        assert abs(x / y - 1) < GRAD_NORM_TOLERANCE, f"{what}: step {step}'s gradient norm {x:.6g} against {y:.6g}"
    return found


# ---------------------------------------------------------------------------------------------------
# checks: each returns a dict of details or raises (Skip: not applicable here)

def check_amp_choice(device, quick, tmp):
    if not device.startswith("cuda"):
        assert engine.resolve_amp("auto", device) == (None, None)
        raise Skip("no GPU: --amp auto is fp32 on the CPU")
    dtype, scaler = engine.resolve_amp("auto", device)
    capability = torch.cuda.get_device_capability(device)
    assert (dtype == torch.bfloat16) == (capability >= (8, 0)) and (scaler is not None) == (dtype == torch.float16)
    return {"capability": list(capability), "auto": str(dtype), "grad_scaler": scaler is not None}


def check_autocast_fp32(device, quick, tmp):
    """CUDA's autocast casts more ops than the CPU's (einsum, for one): PixelTeacher's targets and token morphing's
    matching come out as without autocast."""
    if not device.startswith("cuda"):
        raise Skip("CUDA's autocast op lists differ from the CPU's; test_morph.py checks the CPU")
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64, device=device)
    teacher = dtm.PixelTeacher(16)
    tokens = (torch.randn(2, 1, 64) * 3 + torch.randn(2, 16, 64)).to(device, torch.bfloat16)  # near-tied cosines
    schedules = [[2] * 4, [5]]
    with deterministic():  # CUDA's index_add_ / scatter_add_ add in any order: a near tie could flip between runs
        expected = teacher(images), morph.token_morphing_levels(tokens, schedules, "official")
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cuda", dtype=dtype):
                targets, groups = teacher(images), morph.token_morphing_levels(tokens, schedules, "official")
            assert targets.dtype == torch.float32 and torch.equal(targets, expected[0]), dtype
            assert all(torch.equal(a, b) for a, b in zip(groups, expected[1])), dtype
    # the random split with a CPU generator and CUDA tokens draws on the generator (its docstring: any device):
    # the CPU's groups (float64 Gaussian tokens: the devices' rounding is far below the gaps between cosines)
    x64 = torch.randn(2, 16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    draws = [morph.token_morphing_levels(x, schedules, "random", torch.Generator().manual_seed(1))
             for x in (x64, x64.to(device))]
    assert all(torch.equal(a, b.cpu()) for a, b in zip(*draws))
    return {"dtypes": ["bf16", "fp16"]}


@contextlib.contextmanager
def deterministic():
    """torch.use_deterministic_algorithms for a block, then as it was (warn_only: an op without a deterministic
    kernel, e.g. cuBLAS without CUBLAS_WORKSPACE_CONFIG, warns instead of raising)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def check_pretrain_amp(device, quick, tmp):
    """Per --amp: the student's (and head's) Linear layers compute in its dtype, a GradScaler with fp16 only (its
    logged loss_scale); finite losses; the first step's loss and the first comparable step's gradient norm
    (unscaled, before clipping) equal to fp32's within tolerance."""
    first, runs, dtypes = {}, {}, {}
    for amp in ("fp32", "bf16", "fp16"):
        if amp == "fp16" and not device.startswith("cuda"):
            continue
        if amp == "bf16" and device.startswith("cuda") and not engine.native_bf16(device):
            continue
        dtypes[amp] = set()
        runs[amp] = lines = pretrain_run(os.path.join(tmp, f"amp_{amp}"), device, quick, "--amp", amp,
                                         linear_dtypes=dtypes[amp])
        assert len(lines) == 3 and all(math.isfinite(r["loss"]) for r in lines), lines
        first[amp] = lines[0]["loss"]
        expected = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[amp]
        assert dtypes[amp] == {expected}, f"--amp {amp}: the Linear layers computed in {sorted(dtypes[amp])}"
        assert all(("loss_scale" in r) == (amp == "fp16") for r in lines), f"--amp {amp}: GradScaler or not: {lines}"
    grad_norms = {}
    for amp, loss in first.items():
        if amp != "fp32":
            assert abs(loss / first["fp32"] - 1) < TOLERANCE[amp], (amp, loss, first["fp32"])
            grad_norms[amp] = assert_grad_norms_agree(runs[amp], runs["fp32"], f"--amp {amp} against fp32")
    return {"first_loss": first, "first_grad_norm (step, amp, fp32)": grad_norms,
            "linear_dtypes": {amp: sorted(d) for amp, d in dtypes.items()}}


def check_mto(device, quick, tmp):
    """--mto: finite losses, the MTO fields logged, and each step's loss DTM's plus MTO's lambda-weighted losses (MTO
    trained on, not only logged)."""
    import mto
    lines = pretrain_run(os.path.join(tmp, "mto"), device, quick, "--mto")
    assert all(math.isfinite(r["loss"]) and {"loss_dtm", "loss_sing", "loss_ent"} <= set(r) for r in lines)
    cfg = mto.MTOConfig()  # the trainer's defaults: pretrain_run gives no --mto_lambda_*
    for r in lines:
        total = r["loss_dtm"] + cfg.lambda_sing * r["loss_sing"] + cfg.lambda_ent * r["loss_ent"]
        assert math.isclose(r["loss"], total, rel_tol=1e-5), \
            f"step {r['step']}: loss {r['loss']:.6g}, not loss_dtm + MTO's weighted losses ({total:.6g})"
    return {"last": {k: lines[-1][k] for k in ("loss", "loss_dtm", "loss_sing", "loss_ent")}}


# one process: engine.ddp would not wrap the model; this wraps it anyway, so DDP's gradient all-reduce and one
# explicit all_reduce run over the backend (nccl's communicator is only formed at the first collective)
TORCHRUN_HELPER = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {repo!r})
import engine
import train_pretrain

setup = engine.setup
wrapped = []


def recorded():
    d = setup()
    one = torch.ones(1, device=d.device)
    dist.all_reduce(one)
    open({out!r} + ".backend", "w").write(f"{{dist.get_backend()}} {{one.item()}} ")
    return d


def ddp_always(model, d):
    wrapped.append(1)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda"
                                                     else None)


engine.setup, engine.ddp = recorded, ddp_always
train_pretrain.main(sys.argv[1:])
open({out!r} + ".backend", "a").write("ddp" if wrapped else "none")
"""


def check_mto_no_host_sync(device, quick, tmp):
    """Given the sizes of the mask's CPU copy (mto.mask_sizes, as train_pretrain passes them), MTO queues its GPU work
    without a host sync (torch's sync debug mode raises at any synchronizing call), under --amp auto's autocast:
    first the losses of a group of blocks and their backward alone, then a whole MTO forward of a ViT (vit_tiny, 224
    px) and its backward. Eager losses: the compiled ones are built by the two compile checks and the last MTO
    benchmark variant. On the CPU the same code runs unwatched (reported as skipped)."""
    import mto
    cuda = device.startswith("cuda")
    dtype = engine.resolve_amp("auto", device)[0] if cuda else None  # fp16 on a GPU without native bf16
    torch.manual_seed(0)
    cpu_mask = torch.zeros(4, 196, dtype=torch.bool)
    cpu_mask[:, ::3] = True
    sizes, mask = mto.mask_sizes(cpu_mask), cpu_mask.to(device)
    hiddens = [torch.randn(4, 197, 64, device=device, requires_grad=True) for _ in range(3)]
    qks = [(torch.randn(4, 2, 197, 8, device=device, requires_grad=True),
            torch.randn(4, 2, 197, 8, device=device, requires_grad=True),
            torch.randn(2, 197, 197, device=device, requires_grad=True)) for _ in range(3)]
    vit = dtm.build_vit("vit_tiny", img_size=224).to(device)
    images = torch.randn(4, 3, 224, 224, device=device)

    def losses_alone():
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            rows = mto.patch_rows(mask, sizes)
            loss = mto.singularity_losses(hiddens, mask, rows).sum() + mto.attention_entropies(qks, mask, rows).sum()
        loss.backward()
        return loss

    def whole_forward():
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            tokens, losses = mto.mto_forward(vit, images, mask, mto.MTOConfig(), mask_sizes=sizes)
            loss = tokens.float().square().mean() + mto.mto_total_loss(losses, mto.MTOConfig())
        loss.backward()
        return loss

    results = {}
    for name, queue in (("losses_alone", losses_alone), ("whole_mto_forward", whole_forward)):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
        try:
            results[name] = queue()
        except RuntimeError as e:
            raise RuntimeError(f"{name}: {e}") from e
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    if not all(torch.isfinite(loss).item() for loss in results.values()):
        raise AssertionError(f"non-finite losses: {results}")
    if not cuda:
        raise Skip("torch's sync debug mode watches CUDA's host syncs (the code ran, unwatched)")
    return {"checked": list(results), "autocast": str(dtype)}


def check_torchrun(device, quick, tmp):
    out = os.path.join(tmp, "torchrun")
    helper = os.path.join(tmp, "torchrun_helper.py")
    with open(helper, "w") as f:
        f.write(TORCHRUN_HELPER.format(repo=HERE, out=out))
    torchrun(device, 1, helper, [*TINY_PRETRAIN, "--max_steps", "2", "--num_workers", "1", "--output_dir", out],
             "torchrun")
    backend, reduced, wrapped = open(out + ".backend").read().split()
    assert backend == ("nccl" if device.startswith("cuda") else "gloo"), backend
    assert reduced == "1.0" and wrapped == "ddp", (reduced, wrapped)
    assert torch.load(os.path.join(out, engine.LAST))["step"] == 2
    return {"backend": backend, "exercised": "an all_reduce and DDP's gradient all-reduce (1 process)"}


# two processes: DDP over the backend for real (the model wrapped by engine.ddp itself), the trainers' object
# collectives (the ranks' agreement checks), and in segmentation on GPUs SyncBatchNorm
TWO_PROCESS_HELPER = """
import json
import sys
import torch
sys.path.insert(0, {repo!r})
import engine
import {trainer}

ddp = engine.ddp
models = []


def recorded(model, d):
    wrapped = ddp(model, d)
    models.append((model, d.rank))
    if d.rank == 0:
        norms = sorted({{type(m).__name__ for m in model.modules()
                         if isinstance(m, torch.nn.modules.batchnorm._NormBase)}})
        record = {{"world_size": d.world_size, "backend": torch.distributed.get_backend(), "norms": norms,
                  "ddp": isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)}}
        open({out!r} + ".json", "w").write(json.dumps(record))
    return wrapped


engine.ddp = recorded
{trainer}.main(sys.argv[1:])
model, rank = models[-1]  # each rank's own weights after training: DDP's averaged gradients keep them equal
checksum = sum(p.detach().double().sum().item() for p in model.parameters())
open({out!r} + f".rank{{rank}}.sum", "w").write(repr(checksum))
"""


def check_ddp_two_processes(device, quick, tmp):
    cuda = device.startswith("cuda")
    if cuda and torch.cuda.device_count() < 2:
        raise Skip("one GPU visible: two processes need two GPUs (run it on a node with several)")
    runs = {"train_pretrain": [*TINY_PRETRAIN, "--max_steps", "2", "--num_workers", "1"],
            "train_seg": ["--crop_size", "64", "--scale", "128", "64", "--stride", "43", "--channels", "32",
                          "--batch_size", "2", "--iters", "2", "--warmup_iters", "1", "--eval_every", "2",
                          "--demo_train_images", "8", "--demo_val_images", "3", "--num_workers", "0"]}
    details = {}
    for trainer, argv in runs.items():
        out = os.path.join(tmp, f"two_processes_{trainer}")
        helper = out + "_helper.py"
        with open(helper, "w") as f:
            f.write(TWO_PROCESS_HELPER.format(repo=HERE, trainer=trainer, out=out))
        torchrun(device, 2, helper, [*argv, "--output_dir", out], trainer)
        with open(out + ".json") as f:
            record = json.load(f)
        norms = (["SyncBatchNorm"] if cuda else ["BatchNorm2d"]) if trainer == "train_seg" else []
        assert record == {"world_size": 2, "backend": "nccl" if cuda else "gloo", "norms": norms, "ddp": True}, \
            (trainer, record)
        assert torch.load(os.path.join(out, engine.LAST))["step"] == 2, trainer
        checksums = []
        for rank in range(2):
            with open(f"{out}.rank{rank}.sum") as f:
                checksums.append(float(f.read()))
        assert abs(checksums[0] - checksums[1]) <= 1e-9 * abs(checksums[0]), \
            f"{trainer}: the ranks' weights differ after training (parameter sums {checksums})"
        details[trainer] = {**record, "parameter_sums": checksums}
    return details


def torchrun(device, nproc, helper, argv, what):
    """helper under torchrun with nproc processes (nccl on a GPU, gloo on the CPU), killed after 180 s; a failure
    names `what` and ends with the children's output."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("NCCL_DEBUG", "WARN")  # nccl's reason in the report's stderr tail, not a bare "system error"
    if not device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = run_child([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        helper, *argv], timeout=180, env=env)
    assert result.returncode == 0, what + ": " + result.stdout[-2000:] + result.stderr[-2000:]


KILLED_PIPES_WAIT_S = 10  # after a kill: within the 15 s that run_child leaves before the watchdog


def run_child(argv, timeout, **kwargs):
    """subprocess.run that, on timeout, kills the child and all its descendants (torchrun starts its workers in
    sessions of their own, so a process group is not enough), so that a hang costs one check, not the GPU for the
    rest of the run."""
    if WATCHDOG_S is not None:  # end before the watchdog does: the check fails, the checks after it still run
        timeout = max(1.0, min(timeout, WATCHDOG_S - (time.perf_counter() - STARTED) - 15))
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(descendants(process.pid) + [process.pid])
        stdout = stderr = ""
        try:  # the pipes close once the killed processes are gone, unless a process that left the tree holds them
            stdout, stderr = process.communicate(timeout=KILLED_PIPES_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
        output = f"; its output until then:\n{stdout[-4000:]}{stderr[-2000:]}" if stdout or stderr else ""
        raise TimeoutError(f"{' '.join(argv[:4])} ... did not finish within {timeout:.0f} s (killed){output}") from None
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_watchdog(seconds: float):
    """`seconds` after the start: every thread's stack to stderr, every process this one started (and theirs, e.g. a
    hung torchrun holding the GPU) killed, exit status 1; the report keeps what ran. faulthandler's C-level timer
    ends the process 10 s later should the Python thread not get to run. Child processes end before it (run_child)."""
    global WATCHDOG_S
    WATCHDOG_S = seconds

    def fire():
        print(f"watchdog: {seconds:g} s since the start; every thread's stack, then the run ends", file=sys.stderr,
              flush=True)
        faulthandler.dump_traceback(all_threads=True)
        kill(descendants(os.getpid()))
        os._exit(1)

    left = seconds - (time.perf_counter() - STARTED)
    timer = threading.Timer(max(0.0, left), fire)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(max(1.0, left + 10), exit=True)


def descendants(pid: int) -> list:
    """The process ids below pid (Linux: read from /proc), children first."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        found.append(todo.pop(0))
        todo += children.get(found[-1], [])
    return found


def check_finetune(device, quick, tmp):
    best = train_finetune.main(["--model", "vit_tiny", "--img_size", "64", "--epochs", "1", "--batch_size", "16",
                                "--synthetic_train", "64", "--synthetic_val", "29", "--num_workers", "2", "--init",
                                "none", "--output_dir", os.path.join(tmp, "ft")])
    with open(os.path.join(tmp, "ft", engine.LOG)) as f:
        epoch = [json.loads(line) for line in f if "val_count" in line][-1]
    assert epoch["val_count"] == 29 and math.isfinite(epoch["train_loss"]) and 0 <= best <= 100
    return {"best_top1": best, "train_loss": epoch["train_loss"]}


def check_seg(device, quick, tmp):
    metrics = train_seg.main(["--crop_size", "64", "--scale", "128", "64", "--stride", "43", "--channels", "32",
                              "--batch_size", "4", "--iters", "4", "--warmup_iters", "2", "--eval_every", "4",
                              "--demo_train_images", "16", "--demo_val_images", "4", "--num_workers", "0",
                              "--output_dir", os.path.join(tmp, "seg")])
    assert 0 <= metrics["aAcc"] <= 100 and len(metrics["IoU"]) == 5
    return {"aAcc": metrics["aAcc"], "mIoU": metrics["mIoU"]}


def step_figures(device, model_name, batch, amp, grad_checkpoint, steps, quick, mto=False):
    """images/s and peak memory (GiB) of pre-training steps with train_pretrain's own step, a CLIP ViT-B/16-sized
    teacher (random weights) and random images; mto: with --mto's defaults."""
    img = 64 if quick else 224
    args = train_pretrain.parse_args(["--model", model_name, "--img_size", str(img), "--batch_size", str(batch),
                                      "--amp", amp, "--teacher", "pixels", "--num_masked", str((img // 16) ** 2 * 75
                                                                                              // 196)]
                                     + (["--mto"] if mto else []))
    args.grad_checkpoint = grad_checkpoint
    d = engine.Dist(device=torch.device(device))
    torch.manual_seed(0)
    model, _ = train_pretrain.build_model(args, d)
    teacher = dtm.CLIPTeacher(dtm.CLIPVisual(img, 16, *((64, 1, 1, 32) if quick else ())))
    teacher.to(device)
    model = dtm.DTMPretrainModel(model.student, teacher.out_dim,  # the student keeps --grad_checkpoint
                                 features_fn=model.features_fn).to(device)
    amp_dtype, scaler = engine.resolve_amp(amp, device)
    optimizer = torch.optim.AdamW(engine.param_groups(model, 0.05), lr=1e-4)
    grid = img // 16
    masks = BlockMaskGenerator((grid, grid), args.num_masked, min(16, args.num_masked))
    images = torch.randn(batch, 3, img, img, device=device)
    mask = torch.stack([masks(random.Random(i)).flatten() for i in range(batch)])
    mask_sizes = train_pretrain.mto.mask_sizes(mask) if mto else None  # as the trainer: no host sync in MTO
    mask = mask.to(device)
    timer = engine.StepTimer(d.device)
    cuda = device.startswith("cuda")
    times = []
    for step in range(2 + steps):
        if cuda and step == 2:  # the peaks of steady steps: not the warm-up's (cuDNN's autotuning workspaces), nor
            torch.cuda.empty_cache()  # memory an earlier configuration left cached
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        timer.start(exact=False)
        train_pretrain.train_micro_step(model, teacher, images, mask, args, step, d, amp_dtype, scaler, timer,
                                        mask_sizes)
        engine.optimizer_step(optimizer, scaler, model.parameters(), 3.0)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times[2:])[len(times[2:]) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
    reserved = torch.cuda.max_memory_reserved(device) / 2 ** 30 if cuda else None  # what the allocator held
    return {"model": model_name, "batch": batch, "img_size": img, "amp": engine.amp_name(amp_dtype, scaler),
            "img_per_s": batch / seconds, "s_per_step": seconds, "peak_gib": peak, "peak_reserved_gib": reserved}


def check_throughput(device, quick, tmp):
    engine.set_backend_flags()  # as the trainers (TF32, cuDNN's autotuner), also when the checks before are skipped
    cuda = device.startswith("cuda")
    amp, fp16 = ("auto", "fp16") if cuda else ("fp32", "fp32")
    steps = 1 if quick else 10
    runs = {f"vit_b_batch{b}{'_mto' if mto else ''}": ("vit_b", b, amp, False, mto)
            for b, mto in ((64, False), (128, False), (128, True))}
    if cuda or quick:  # does ViT-L at 128 per GPU fit a V100-32GB (fp16)?
        runs.update({f"vit_l_batch128_fp16{'_grad_checkpoint' if ckpt else ''}{'_mto' if mto else ''}":
                     ("vit_l", 128, fp16, ckpt, mto) for ckpt, mto in ((False, False), (True, False), (True, True))})
    figures, failed = {}, []
    for name, (model_name, batch, run_amp, checkpointing, mto) in runs.items():
        spent = time.perf_counter() - STARTED
        if BUDGET_S is not None and spent > BUDGET_S - CONFIG_RESERVE_S:  # the watchdog would lose every figure
            figures[name] = {"skipped": f"out of time: {spent:.0f} s spent, --budget_s {BUDGET_S:g}, reserve "
                                        f"{CONFIG_RESERVE_S} s per configuration"}
            continue
        try:  # one configuration that fails keeps the others' figures; out of memory (a 32 GB GPU) is a figure too
            figures[name] = step_figures(device, "vit_tiny" if quick else model_name, 4 if quick else batch,
                                         run_amp, checkpointing, steps, quick, mto)
        except Exception as e:  # noqa: BLE001 -- raised after the loop, with every configuration's figures
            if out_of_memory(e):
                figures[name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
                continue
            figures[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            failed.append(name)
        if cuda:
            torch.cuda.empty_cache()
    if failed:
        raise ThroughputFailed(f"{', '.join(failed)} failed", figures)
    return figures


def out_of_memory(e: Exception) -> bool:
    """torch's OutOfMemoryError, or a library's failed allocation that torch raises as a plain RuntimeError
    (cuBLAS's or cuDNN's ..._STATUS_ALLOC_FAILED, "CUDA error: out of memory")."""
    return isinstance(e, torch.OutOfMemoryError) or \
        (isinstance(e, RuntimeError) and ("out of memory" in str(e) or "ALLOC_FAILED" in str(e)))


class ThroughputFailed(Exception):
    """Some configurations failed: the check fails, and the report keeps every configuration's figures."""

    def __init__(self, message, figures):
        super().__init__(message)
        self.figures = figures


def run_bench(argv, timeout=240):
    result = run_child([sys.executable, *argv], timeout=timeout, cwd=HERE)
    # most of the output: a benchmark that leaves a failed variant out prints the others' figures before its profiles
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-2000:]
    return {"command": " ".join(argv), "output": result.stdout.strip().splitlines()}


def check_bench_morph(device, quick, tmp):
    return run_bench(["bench_morph.py", "--device", device] + (["--batch", "2", "--iters", "1", "--warmup", "0",
                                                                "--schedules", "2x49"] if quick else []))


def bench_mto_command(device, quick):
    amp = engine.amp_name(engine.resolve_amp("auto", device)[0], None)  # bench_mto.py's --amp choice
    quick_flags = ["--model", "vit_tiny", "--batch", "2", "--steps", "1", "--warmup", "1", "--img_size", "64"]
    return ["bench_mto.py", "--device", device, "--amp", amp,
            *(quick_flags if quick else ["--steps", "10", "--warmup", "2"])]


def check_bench_mto(device, quick, tmp):  # --profile: the GPU's busy time and top kernels of each variant's step
    every_variant = [str(i) for i in range(len(bench_mto.VARIANTS))]  # the last with MTO's losses compiled
    return run_bench([*bench_mto_command(device, quick), "--variants", *every_variant, "--profile"], timeout=300)


def with_sdpa_kernels(fn):
    """fn() -> (its result, the SDPA kernels it ran: the aten::_scaled_dot_product_* ops, forward and backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = fn()
    return result, sorted({e.key for e in profile.key_averages() if e.key.startswith("aten::_scaled_dot_product")})


def check_sdpa(device, quick, tmp):
    """Late: a kernel fault is sticky in a CUDA context and would fail every later in-process check (after this one
    only the two compile checks run in this process, and MTO's whole-step benchmark in a child process)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import mto
    cuda = device.startswith("cuda")
    name, img, grid, num_masked, min_block = ("vit_tiny", 64, 4, 6, 2) if quick else ("vit_b", 224, 14, 75, 16)
    torch.manual_seed(0)
    model = dtm.build_vit(name, img_size=img, rel_pos_bias="both").to(device).train()
    images = torch.randn(4, 3, img, img, device=device)
    masks = BlockMaskGenerator((grid, grid), num_masked, min_block)
    mask = torch.stack([masks(random.Random(i)).flatten() for i in range(4)]).to(device)
    attn_masks = {"rel_pos_bias": None, "rel_pos_bias_and_mto_mask": mto.recalibration_mask(mask)}
    # loss: tokens . a fixed random probe, whose gradients are O(1); the squared norm of LayerNorm'd tokens is
    # nearly constant, and its tiny gradients underflow in fp16 (no loss scaling here)
    probe = torch.randn(4, 1 + grid * grid, model.embed_dim, device=device)
    compared = {"qkv_weight_block0": lambda: model.blocks[0].attn.qkv.weight.grad,
                "rel_pos_table_shared": lambda: model.rel_pos_bias.table.grad,  # through SDPA's bias gradient only
                "rel_pos_table_block0": lambda: model.blocks[0].attn.rel_pos_bias.table.grad}
    # on the CPU (the dry run) the student's attention runs the math kernel itself (a bias with gradient, or a 3-D
    # one), so only the teacher's compares two kernels there (the CPU's flash kernel)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16} if cuda else {"fp32": None}
    if cuda and not engine.native_bf16(device):  # below sm80 SDPA's memory-efficient kernel takes no bf16
        del dtypes["bf16"]

    @contextlib.contextmanager
    def trained_like_tables():
        """Fixed N(0, 1) relative position tables for a block: a fresh model's are zeros, so in evaluation (no mask)
        a kernel that dropped the bias passed (in training the tables' gradients show it)."""
        tables = [m.table for m in model.modules() if isinstance(m, dtm.RelativePositionBias)]
        saved = [t.detach().clone() for t in tables]
        with torch.no_grad():
            for i, t in enumerate(tables):
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(i)))
        try:
            yield
        finally:
            with torch.no_grad():
                for t, old in zip(tables, saved):
                    t.copy_(old)

    def run(backend, dtype, attn_mask, train=True):
        """tokens (and the compared gradients in training) with SDPA restricted to `backend` (None: SDPA's choice);
        without gradient (evaluation) with trained_like_tables."""
        model.zero_grad()
        with (sdpa_kernel([backend]) if backend else contextlib.nullcontext()), torch.set_grad_enabled(train), \
                torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None), \
                (contextlib.nullcontext() if train else trained_like_tables()):
            tokens = model.forward_features(images, mask, attn_mask).tokens.float()
        if not train:
            return tokens, {}
        (tokens * probe).sum().backward()
        missing = [k for k, grad in compared.items() if grad() is None]
        assert not missing, f"no gradient for {missing} in {backend or 'the kernel SDPA picks'} ({dtype})"
        return tokens, {k: grad().clone() for k, grad in compared.items()}

    def errors(out, ref):
        (tokens, grads), (ref_tokens, ref_grads) = out, ref
        found = {"tokens": ((tokens - ref_tokens).abs().max() / ref_tokens.abs().max()).item()}
        for k, grad in grads.items():
            assert ref_grads[k].abs().max() > 0, (k, "zero gradient")
            found[k] = ((grad - ref_grads[k]).abs().max() / ref_grads[k].abs().max()).item()
        return found

    # the CLIP teacher's attention has no mask: there SDPA may pick flash's or (H100/H200) cuDNN's kernel
    teacher = dtm.CLIPTeacher(dtm.CLIPVisual(img, 16, *((64, 1, 1, 32) if quick else ()))).to(device)

    def run_teacher(backend, dtype):
        with (sdpa_kernel([backend]) if backend else contextlib.nullcontext()), \
                torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            return teacher(images).float(), {}

    def record(case, reference, picked_run, forced=None):
        """The kernels SDPA picks and every run's errors against the math kernel's; none may exceed 5% (nor be NaN)."""
        picked, kernels = with_sdpa_kernels(picked_run)
        found = {"picked": errors(picked, reference), **({"efficient_forced": errors(forced(), reference)}
                                                         if forced else {})}
        assert all(e < 5e-2 for per_kernel in found.values() for e in per_kernel.values()), (case, kernels, found)
        details[case] = {"kernels": kernels, "max_rel_error_vs_math": found}
        return kernels

    details = {}
    for (dtype_name, dtype), (mask_name, attn_mask) in itertools.product(dtypes.items(), attn_masks.items()):
        forced = (lambda: run(SDPBackend.EFFICIENT_ATTENTION, dtype, attn_mask)) if cuda else None
        kernels = record(f"{dtype_name}_{mask_name}_train", run(SDPBackend.MATH, dtype, attn_mask),
                         lambda: run(None, dtype, attn_mask), forced)
        if cuda:  # training's bias needs its gradient: neither flash's nor cuDNN's kernel takes it
            assert "aten::_scaled_dot_product_efficient_attention" in kernels, kernels
        if attn_mask is None:  # evaluation: the bias without gradient, (heads, T, T)
            record(f"{dtype_name}_{mask_name}_no_grad", run(SDPBackend.MATH, dtype, None, train=False),
                   lambda: run(None, dtype, None, train=False))
    for dtype_name, dtype in dtypes.items():
        record(f"{dtype_name}_clip_teacher_no_mask", run_teacher(SDPBackend.MATH, dtype),
               lambda: run_teacher(None, dtype))
    return details


COMPUTE_PARTS = ("teacher_s", "morph_s", "student_s", "optimizer_s")  # a logged step's time split, but data_s


def compiled_against_eager(device, quick, tmp, *flags):
    """Pre-training steps with `flags`, eager and with --compile: one graph shared by all blocks, finite losses, the
    first step's loss and the first comparable gradient norm equal to the eager run's; the figures of both."""
    from torch._dynamo.utils import counters, guard_failures
    tag = "".join(flags).replace("-", "_")
    eager = pretrain_run(os.path.join(tmp, f"eager{tag}"), device, quick, *flags)
    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    compiled = pretrain_run(os.path.join(tmp, f"compiled{tag}"), device, quick, *flags, "--compile")
    loss_graphs, loss_codes = mto_loss_graphs(), mto_loss_codes()  # with --mto, --compile compiles MTO's losses too
    graphs = counters["stats"]["unique_graphs"] - loss_graphs
    details = {"graphs": graphs, "mto_loss_graphs": loss_graphs,
               "first_loss": {"eager": eager[0]["loss"], "compiled": compiled[0]["loss"]},
               # why a block was compiled again (a guard that failed), if it was
               "recompiles": [reason.splitlines()[0] for code, reasons in guard_failures.items() for reason in reasons
                              if code not in loss_codes],
               # the last step's time but data loading: two workers may not keep up with a GPU, so img_per_s (kept
               # too) can measure the loader rather than the compiled blocks
               "compute_s_last": {run: sum(lines[-1][k] for k in COMPUTE_PARTS)
                                  for run, lines in (("eager", eager), ("compiled", compiled))},
               "img_per_s_last": {"eager": eager[-1]["img_per_s"], "compiled": compiled[-1]["img_per_s"]}}
    assert graphs_expected(graphs, details["recompiles"], flags, device), \
        f"{graphs} graphs for the blocks (expected one, shared by all blocks): {details}"
    assert all(math.isfinite(r["loss"]) for r in compiled), details
    assert abs(compiled[0]["loss"] / eager[0]["loss"] - 1) < 3e-2, details
    details["first_grad_norm (step, compiled, eager)"] = assert_grad_norms_agree(compiled, eager, "compiled, eager")
    return details


def mto_loss_codes():
    """The code objects of MTO's losses, which --compile --mto compiles (MTOConfig.compile) besides the blocks."""
    import mto
    return {fn.__code__ for fn in (mto._singularity_losses, mto._attention_entropies)}


def mto_loss_graphs() -> int:
    """The graphs compiled for MTO's losses since the last torch._dynamo.reset()."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    return sum(len(_debug_get_cache_entry_list(code)) for code in mto_loss_codes())


def graphs_expected(graphs, recompiles, flags, device) -> bool:
    """One graph for all blocks; on a GPU with --grad_checkpoint a second one is expected when the one recompile is
    for the thread count. The blocks recomputed in the backward run on autograd's GPU thread, whose intra-op thread
    count differs from the main thread's, and dynamo guards on it (seen on an H200, torch 2.11: "GLOBAL_STATE
    changed: num_threads"; setting the count once with torch.set_num_threads did not avoid it)."""
    backward_thread = "--grad_checkpoint" in flags and device.startswith("cuda")
    return graphs == 1 or (backward_thread and graphs == 2 and len(recompiles) == 1 and "num_threads" in recompiles[0])


def test_mto_check_fails_where_mtos_losses_are_logged_but_not_trained_on(tmp_path, monkeypatch):
    """check_mto passed a run whose loss was DTM's alone (MTO's losses logged, finite, not in the loss)."""
    import mto
    assert check_mto("cpu", True, str(tmp_path / "honest"))["last"]["loss_sing"] > 0
    call = mto.MTO.__call__
    monkeypatch.setattr(mto.MTO, "__call__", lambda self, *args, **kwargs: (
        lambda tokens, loss, stats: (tokens, loss * 0, stats))(*call(self, *args, **kwargs)))
    with pytest.raises(AssertionError, match=r"step 1: loss 0\.\d+, not loss_dtm \+ MTO's weighted losses"):
        check_mto("cpu", True, str(tmp_path / "not_trained_on"))


def test_throughputs_mto_step_is_the_trainers_without_a_host_sync(monkeypatch):
    """step_figures times train_pretrain's own step: with --mto, MTO gets the sizes of the CPU mask (it read them off
    the GPU's mask, a host sync the trainer no longer has)."""
    import mto
    patch_rows, given = mto.patch_rows, []
    monkeypatch.setattr(mto, "patch_rows", lambda mask, sizes=None: (given.append(sizes), patch_rows(mask, sizes))[1])
    step_figures("cpu", "vit_tiny", 2, "fp32", False, 1, True, mto=True)
    assert given == [(6, 10, 10)] * 3  # 6 of 16 patches masked in each image, the quick run's


def test_grad_norms_are_compared_at_the_first_step_both_runs_took_from_the_same_weights():
    """pretrain_amp and compile compare a gradient norm (a GradScaler that clipped scaled gradients, or a compiled
    backward that lost gradients, left the first loss as it was): step 0's, or where an fp16 step overflowed (null,
    skipped) the next one's, while every step before it had lr 0; never after the weights moved."""
    def lines(*pairs):
        return [{"lr": lr, "grad_norm": norm} for lr, norm in pairs]
    assert first_grad_norms(lines((0, 1.0), (1e-5, 2.0)), lines((0, 1.1), (1e-5, 2.0))) == (0, 1.0, 1.1)
    assert first_grad_norms(lines((0, None), (1e-5, 2.0)), lines((0, 1.1), (1e-5, 2.5))) == (1, 2.0, 2.5)
    assert first_grad_norms(lines((1e-5, None), (1e-5, 2.0)), lines((1e-5, 1.1), (1e-5, 2.5))) is None
    with pytest.raises(AssertionError, match="fp16: step 0's gradient norm 6592 against 0.1006"):
        assert_grad_norms_agree(lines((0, 6592.0)), lines((0, 0.1006)), "fp16")
    assert assert_grad_norms_agree(lines((0, 0.105)), lines((0, 0.1)), "bf16") == (0, 0.105, 0.1)


def test_graphs_expected_allow_the_backward_threads_graph_only_on_a_gpu_with_grad_checkpoint():
    thread_count = ["0/0: GLOBAL_STATE changed: num_threads "]
    assert graphs_expected(1, [], (), "cpu") and graphs_expected(1, [], ("--grad_checkpoint",), "cuda:0")
    assert graphs_expected(2, thread_count, ("--grad_checkpoint", "--mto"), "cuda:0")
    assert not graphs_expected(2, thread_count, ("--mto",), "cuda:0")  # without --grad_checkpoint
    assert not graphs_expected(2, thread_count, ("--grad_checkpoint",), "cpu")  # the CPU's backward: the same thread
    assert not graphs_expected(2, [], ("--grad_checkpoint",), "cuda:0")  # no reason recorded
    assert not graphs_expected(2, ["0/0: tensor 'x' size mismatch"], ("--grad_checkpoint",), "cuda:0")
    assert not graphs_expected(3, thread_count * 2, ("--grad_checkpoint",), "cuda:0")


def check_compile(device, quick, tmp):
    """Late: its compile time on a GPU is not known yet, and the report keeps what ran before it."""
    return compiled_against_eager(device, quick, tmp)


def check_compile_mto_grad_checkpoint(device, quick, tmp):
    """--compile with --grad_checkpoint (ViT-L's lever on a 32 GB V100) and --mto: the compiled blocks recomputed in
    the backward, with MTO's mask in and q, k out. After the plain compile check (which matters more should time run
    short, and warms the compiler), before the whole-step benchmark: its graph count is unchecked on a GPU."""
    return compiled_against_eager(device, quick, tmp, "--grad_checkpoint", "--mto")


def check_bench_mto_whole_step(device, quick, tmp):  # last: figures, where the checks before it pass or fail
    return run_bench([*bench_mto_command(device, quick), "--teacher", "clip", "--variants", "0", "1", "5"])


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}  # in this order
# seconds a check needs: it starts only this long before the end of --budget_s
RESERVE_S = {"torchrun": 60, "ddp_two_processes": 90, "throughput": 60, "bench_morph": 30, "bench_mto": 120,
             "sdpa": 30, "compile": 150, "bench_mto_whole_step": 120, "compile_mto_grad_checkpoint": 150}
CONFIG_RESERVE_S = 30  # throughput: a configuration (ViT-L at 128 on a V100: its model built, 12 steps) starts this
# long before the budget's end at the latest


# ---------------------------------------------------------------------------------------------------
# the tests (CUDA), and one on the CPU for the report itself

@needs_cuda
@pytest.mark.parametrize("name", ["amp_choice", "sdpa", "autocast_fp32", "pretrain_amp", "compile",
                                  "compile_mto_grad_checkpoint", "mto", "mto_no_host_sync", "torchrun",
                                  "ddp_two_processes", "finetune", "seg"])
def test_on_gpu(name, tmp_path):
    try:
        CHECKS[name]("cuda:0", False, str(tmp_path))
    except Skip as e:  # e.g. two processes on a one-GPU machine
        pytest.skip(str(e))


HANGING_PARENT = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open(sys.argv[1], "w").write(str(worker.pid))
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_hanging_child_is_killed_with_a_worker_in_its_own_session(tmp_path):
    """As torchrun's workers: the worker is not in the child's process group and holds its output pipes."""
    script, pid_file = tmp_path / "parent.py", tmp_path / "worker.pid"
    script.write_text(HANGING_PARENT)
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="did not finish within 3 s"):
        run_child([sys.executable, str(script), str(pid_file)], timeout=3)
    assert time.perf_counter() - start < 30
    worker = int(pid_file.read_text())
    time.sleep(0.5)
    state = process_state(worker)
    assert state in ("gone", "Z", "X"), state  # killed: reaped, or a zombie until its new parent reaps it


def process_state(pid: int) -> str:
    """The process's state letter (Linux: /proc/PID/stat; Z and X: dead), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_report_dry_run_on_cpu(tmp_path):
    """The report command itself, on the CPU at tiny sizes: every check runs (or says why it does not apply) and the
    JSON holds them all."""
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, os.path.join(HERE, "test_gpu.py"), "--device", "cpu", "--quick",
                             "--out", str(out)], cwd=HERE, capture_output=True, text=True,
                            timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["checks"]) == set(CHECKS)
    status = {name: check["status"] for name, check in report["checks"].items()}
    assert status == {**{name: "ok" for name in CHECKS}, "amp_choice": "skipped",
                      "autocast_fp32": "skipped", "mto_no_host_sync": "skipped"}, report
    assert report["checks"]["compile"]["graphs"] == 1 and report["checks"]["compile_mto_grad_checkpoint"]["graphs"] == 1
    assert all(seconds > 0 for seconds in report["checks"]["compile"]["compute_s_last"].values())
    assert report["checks"]["torchrun"]["backend"] == "gloo"
    assert report["checks"]["throughput"]["vit_b_batch64"]["img_per_s"] > 0
    assert {k: report["checks"]["throughput"]["vit_l_batch128_fp16"][k] for k in ("model", "batch", "amp")} == \
        {"model": "vit_tiny", "batch": 4, "amp": "fp32"}  # --quick: tiny sizes under the configurations' names
    assert {"vit_b_batch128_mto", "vit_l_batch128_fp16_grad_checkpoint_mto"} <= set(report["checks"]["throughput"])
    sdpa = report["checks"]["sdpa"]  # the student: math; the teacher: the CPU's flash kernel, against math
    assert sdpa["fp32_rel_pos_bias_and_mto_mask_train"]["kernels"] == ["aten::_scaled_dot_product_attention_math"]
    teacher = sdpa["fp32_clip_teacher_no_mask"]
    assert teacher["kernels"] == ["aten::_scaled_dot_product_flash_attention_for_cpu"]
    assert teacher["max_rel_error_vs_math"]["picked"]["tokens"] < 1e-5
    profiles = [line for line in report["checks"]["bench_mto"]["output"] if line.startswith("profile of ")]
    assert [line.split(": ")[0] for line in profiles] == [f"profile of {name.split(':')[0]}" for name in
                                                         bench_mto.VARIANTS], profiles
    whole_step = report["checks"]["bench_mto_whole_step"]
    assert "teacher=clip" in whole_step["output"][0]
    assert whole_step["output"][-2].startswith(list(bench_mto.VARIANTS)[5])
    assert report["checks"]["compile_mto_grad_checkpoint"]["mto_loss_graphs"] >= 2  # --compile --mto: the losses too


WATCHED_RUN = """
import subprocess, sys, time
sys.path.insert(0, {repo!r})
import test_gpu
hanging_child = [sys.executable, "-c", "import time; time.sleep(120)", {marker!r}]
test_gpu.CHECKS["autocast_fp32"] = lambda *args: subprocess.run(hanging_child)  # a check that hangs in a child
test_gpu.STARTED = time.perf_counter()  # the watchdog counts from here, however long the imports took
test_gpu.main(["--device", "cpu", "--quick", "--out", {out!r}, "--watchdog_s", "5", "--budget_s", "540",
               "--skip", *[name for name in test_gpu.CHECKS if name not in ("amp_choice", "autocast_fp32")]])
"""


def test_child_processes_end_before_the_watchdog(monkeypatch):
    """With --watchdog_s, a child gets at most the watchdog's time left less 15 s, so a slow bench fails its own check
    and the checks after it still run (the watchdog would end the whole run)."""
    monkeypatch.setattr(sys.modules[__name__], "WATCHDOG_S", 17.0)
    monkeypatch.setattr(sys.modules[__name__], "STARTED", time.perf_counter())  # 17 s left: 2 s for the child
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="did not finish within 2 s"):
        run_child([sys.executable, "-c", "import time; time.sleep(60)"], timeout=240)
    assert time.perf_counter() - start < 30


def test_budget_counts_from_the_start_and_keeps_compile_s_reserve(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "STARTED", time.perf_counter() - 20)  # 20 s since the start
    monkeypatch.setattr(sys.modules[__name__], "BUDGET_S", None)  # main sets it: restored after the test
    out = tmp_path / "report.json"
    others = [name for name in CHECKS if name not in ("amp_choice", "compile")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device cpu on a GPU machine too
    with pytest.raises(SystemExit) as exit_status:  # 20 s spent: amp_choice may start, compile (150 s) may not
        main(["--device", "cpu", "--quick", "--out", str(out), "--budget_s", "160", "--skip", *others])
    assert exit_status.value.code == 0
    checks = json.loads(out.read_text())["checks"]
    assert checks["amp_choice"]["reason"].startswith("no GPU")
    assert re.match(r"out of time: 2\d s spent, --budget_s 160, reserve 150 s", checks["compile"]["reason"])  # 20 s +
    # the time this test took until then (21 s on a loaded machine)


def test_budget_defaults_leave_child_processes_time_before_the_watchdog(capsys):
    assert budget(None, 0) == 540 and budget(None, 575) == 545 and budget(300, 575) == 300
    assert all(RESERVE_S[name] >= 30 for name in ("torchrun", "bench_morph", "bench_mto", "bench_mto_whole_step"))
    refusals = {(None, 30): "--watchdog_s 30 leaves no budget", (0, 0): "--budget_s 0: every check would be skipped",
                (-5, 575): "--budget_s -5: every check would be skipped"}
    for (given, watchdog), refusal in refusals.items():  # every check skipped, and the run "passed"
        with pytest.raises(SystemExit, match=f"^error: {re.escape(refusal)}"):  # each names the flag to change
            budget(given, watchdog)
    assert capsys.readouterr().out == ""
    assert budget(560, 575) == 560  # as given, with a note: a child started late could get 1 s
    assert "--budget_s 560 is within 30 s of --watchdog_s 575" in capsys.readouterr().out


def test_deterministic_block_restores_the_mode_it_found():
    """check_autocast_fp32 compares groups exactly, so CUDA's atomics must add in a fixed order there; the mode is
    global, so the rest of the run (and an outer choice, warn_only included) must get back what it had."""
    for before in ((False, False), (True, True), (True, False)):
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        try:
            with pytest.raises(ZeroDivisionError), deterministic():
                assert torch.are_deterministic_algorithms_enabled()
                assert torch.is_deterministic_algorithms_warn_only_enabled()
                1 / 0
            assert (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled()) == before
        finally:
            torch.use_deterministic_algorithms(False)


def test_device_is_the_one_the_trainers_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert check_device("cuda") == "cuda:0" and check_device("cuda:0") == "cuda:0"
    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES=1 python test_gpu.py --device cuda:0"):
        check_device("cuda:1")
    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES= python test_gpu.py --device cpu"):
        check_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("cpu") == "cpu"
    with pytest.raises(SystemExit, match="no CUDA device"):
        check_device("cuda")
    with pytest.raises(SystemExit, match="expected cuda, cuda:0 or cpu"):
        check_device("mps")


def test_a_check_that_exits_or_a_failed_configuration_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    """A trainer's argparse error (SystemExit) fails its check, not the run; a throughput configuration that fails
    keeps the other configurations' figures."""
    calls = []

    def figures(device, model_name, batch, amp, grad_checkpoint, steps, quick, mto=False):
        calls.append(1)
        if mto:
            raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")
        if grad_checkpoint:  # a failed allocation raised by a library as a RuntimeError: a figure, not a failure
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        if len(calls) == 4:  # vit_l_batch128_fp16
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"img_per_s": 1.0}

    monkeypatch.setitem(CHECKS, "amp_choice", lambda *args: sys.exit(2))
    monkeypatch.setattr(sys.modules[__name__], "STARTED", time.perf_counter())  # the budget: not this session's time
    monkeypatch.setattr(sys.modules[__name__], "BUDGET_S", None)  # main sets it: restored after the test
    monkeypatch.setattr(sys.modules[__name__], "step_figures", figures)
    out = tmp_path / "report.json"
    others = [name for name in CHECKS if name not in ("amp_choice", "autocast_fp32", "throughput")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device cpu on a GPU machine too
    with pytest.raises(SystemExit) as exit_status:
        main(["--device", "cpu", "--quick", "--out", str(out), "--skip", *others])
    assert exit_status.value.code == 1
    checks = json.loads(out.read_text())["checks"]
    assert checks["amp_choice"]["status"] == "error" and checks["amp_choice"]["error"] == "SystemExit: 2"
    assert checks["autocast_fp32"]["status"] == "skipped"  # the checks after it ran
    throughput = checks["throughput"]
    assert throughput["status"] == "error" and throughput["error"] == \
        "ThroughputFailed: vit_b_batch128_mto, vit_l_batch128_fp16_grad_checkpoint_mto failed"
    assert throughput["figures"]["vit_b_batch64"] == {"img_per_s": 1.0}
    assert "CUBLAS_STATUS_EXECUTION_FAILED" in throughput["figures"]["vit_b_batch128_mto"]["error"]
    assert throughput["figures"]["vit_l_batch128_fp16"] == {"error": "out of memory: CUDA out of memory. Tried to "
                                                                     "allocate 2.00 GiB"}
    assert throughput["figures"]["vit_l_batch128_fp16_grad_checkpoint"]["error"].startswith(
        "out of memory: CUDA error: CUBLAS_STATUS_ALLOC_FAILED")


def test_throughput_starts_no_configuration_the_budget_leaves_no_time_for(monkeypatch):
    """Configurations run one after another (ViT-L at 128 on a V100 may take a while): one that would start within
    CONFIG_RESERVE_S of --budget_s is skipped and named, so the watchdog does not end the run and lose them all."""
    ran = []

    def figures(device, model_name, batch, amp, grad_checkpoint, steps, quick, mto=False):
        ran.append((model_name, batch, mto))
        monkeypatch.setattr(sys.modules[__name__], "STARTED", time.perf_counter() - 75)  # each takes "25 s"
        return {"img_per_s": 1.0}

    monkeypatch.setattr(sys.modules[__name__], "step_figures", figures)
    monkeypatch.setattr(sys.modules[__name__], "STARTED", time.perf_counter() - 50)  # 50 s spent
    monkeypatch.setattr(sys.modules[__name__], "BUDGET_S", 100.0)  # so the first one may start (50 <= 100 - 30)
    found = check_throughput("cpu", True, None)
    assert ran == [("vit_tiny", 4, False)]  # then 75 s spent: past 100 - 30
    assert list(found) == ["vit_b_batch64", "vit_b_batch128", "vit_b_batch128_mto", "vit_l_batch128_fp16",
                           "vit_l_batch128_fp16_grad_checkpoint", "vit_l_batch128_fp16_grad_checkpoint_mto"]
    assert found["vit_b_batch64"] == {"img_per_s": 1.0}
    assert all(re.match(r"out of time: 7\d s spent, --budget_s 100, reserve 30 s per configuration", f["skipped"])
               for name, f in found.items() if name != "vit_b_batch64")


def processes_with(marker: str) -> list:
    """Live (not zombie) processes whose command line holds `marker` (Linux: read from /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read() and process_state(int(entry)) not in ("gone", "Z", "X"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_watchdog_ends_a_hanging_run_kills_its_children_and_the_report_names_the_check_in_flight(tmp_path):
    out, marker = tmp_path / "report.json", f"watchdog-test-{os.getpid()}-{time.time_ns()}"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", WATCHED_RUN.format(repo=HERE, out=str(out), marker=marker)],
                            capture_output=True, text=True, timeout=100, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 1 and time.perf_counter() - start < 60
    assert "watchdog: 5 s since the start" in result.stderr and "<lambda>" in result.stderr  # the hanging check's stack
    time.sleep(0.5)
    assert processes_with(marker) == []  # the hanging child was killed too
    checks = json.loads(out.read_text())["checks"]
    assert checks["amp_choice"]["status"] == "skipped" and checks["autocast_fp32"]["status"] == "running"
    assert "autocast_fp32: started at" in result.stdout


# ---------------------------------------------------------------------------------------------------
# mutation review: tests of the CPU-testable logic the tests above leave open

GRANDCHILD_CHAIN = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", '''
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a process stuck in a driver call: only SIGKILL ends it
open("/proc/self/comm", "w").write("w) Z 1 1")  # a ")" in the name, as /proc/PID/stat's comm may hold
open(sys.argv[1], "w").write("ready")
time.sleep(120)
''', sys.argv[1] + ".grandchild"], start_new_session=True)
open(sys.argv[1], "w").write(str(grandchild.pid))
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_descendants_reach_grandchildren_whatever_their_name_and_kill_ends_them(tmp_path):
    """A hung torchrun's workers are its children, the run's grandchildren (and a worker's own children further
    down): descendants() walks the whole tree, reads the parent after the last ")" (a process may put ")" in its
    name), children first; kill() SIGKILLs (a process stuck in CUDA may ignore SIGTERM) and skips a gone pid."""
    pid_file = tmp_path / "grandchild.pid"
    child = subprocess.Popen([sys.executable, "-c", GRANDCHILD_CHAIN, str(pid_file)])
    try:
        deadline = time.perf_counter() + 60
        while not (pid_file.exists() and pid_file.read_text() and
                   (tmp_path / "grandchild.pid.grandchild").exists()):
            assert time.perf_counter() < deadline, "the chain did not start"
            time.sleep(0.1)
        grandchild = int(pid_file.read_text())
        found = descendants(os.getpid())
        assert child.pid in found and grandchild in found, (child.pid, grandchild, found)
        assert found.index(child.pid) < found.index(grandchild)  # children first
        kill([grandchild, child.pid])
        child.wait(timeout=30)
        time.sleep(0.5)
        assert process_state(grandchild) in ("gone", "Z", "X"), process_state(grandchild)
        kill([child.pid])  # reaped: gone, no error
    finally:
        for pid in descendants(child.pid) + [child.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        child.wait(timeout=30)


def test_start_watchdog_caps_child_processes_and_times_from_the_start(monkeypatch):
    """The watchdog: set WATCHDOG_S (run_child's cap), a daemon timer (a run that ends in time must not wait for it)
    at `seconds` since STARTED, and faulthandler's fallback 10 s after it."""
    timers, fallback = [], []

    class Timer:
        def __init__(self, interval, function):
            self.interval, self.function, self.daemon, self.started = interval, function, None, False
            timers.append(self)

        def start(self):
            self.started = True

    monkeypatch.setattr(threading, "Timer", Timer)
    monkeypatch.setattr(faulthandler, "dump_traceback_later", lambda timeout, exit=False: fallback.append((timeout,
                                                                                                           exit)))
    monkeypatch.setattr(sys.modules[__name__], "WATCHDOG_S", None)  # restored after the test
    monkeypatch.setattr(sys.modules[__name__], "STARTED", time.perf_counter() - 100)  # 100 s since the start
    start_watchdog(575)
    assert sys.modules[__name__].WATCHDOG_S == 575
    [timer] = timers
    assert timer.started and timer.daemon is True
    assert 470 < timer.interval <= 475, timer.interval
    [(timeout, exit)] = fallback
    assert exit is True and abs(timeout - (timer.interval + 10)) < 1, (timeout, timer.interval)


def test_main_writes_each_check_running_then_its_entry_and_sets_the_budget_for_throughput(tmp_path, monkeypatch):
    """The report before a check (status running, started_at_s) and after it (status, started_at_s, seconds), the
    run's fields, and BUDGET_S set from --budget_s for check_throughput's per-configuration guard."""
    out = tmp_path / "report.json"
    seen = {}

    def first(device, quick, tmp):
        seen["report"] = json.loads(out.read_text())  # written before the check ran
        seen["budget_s"] = sys.modules[__name__].BUDGET_S
        return {"value": 1}

    def second(device, quick, tmp):
        raise Skip("not here")

    monkeypatch.setattr(sys.modules[__name__], "CHECKS", {"first": first, "second": second})
    monkeypatch.setattr(sys.modules[__name__], "STARTED", time.perf_counter() - 20)
    monkeypatch.setattr(sys.modules[__name__], "BUDGET_S", None)  # main sets it: restored after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_status:
        main(["--device", "cpu", "--quick", "--out", str(out), "--budget_s", "160"])
    assert exit_status.value.code == 0
    running = seen["report"]["checks"]["first"]
    assert running["status"] == "running" and 20 <= running["started_at_s"] < 80, running
    assert seen["budget_s"] == 160
    report = json.loads(out.read_text())
    assert {k: report[k] for k in ("device", "torch", "cuda", "quick")} == \
        {"device": "cpu", "torch": torch.__version__, "cuda": torch.version.cuda, "quick": True}
    checks = report["checks"]
    assert list(checks) == ["first", "second"]
    assert {k: checks["first"][k] for k in ("status", "value")} == {"status": "ok", "value": 1}
    assert {k: checks["second"][k] for k in ("status", "reason")} == {"status": "skipped", "reason": "not here"}
    assert all(isinstance(c["seconds"], float) and c["seconds"] >= 0 for c in checks.values()), checks
    assert 20 <= checks["first"]["started_at_s"] <= checks["second"]["started_at_s"] < 80, checks


def test_a_value_json_cannot_write_in_a_checks_details_is_written_as_text_and_the_run_goes_on(tmp_path, monkeypatch):
    """A check's tensor (or numpy float32) ended the run with json's TypeError: the report left at that check's
    "running", as if the watchdog had ended it, and the checks after it not run."""
    monkeypatch.setattr(sys.modules[__name__], "CHECKS", {"tensor": lambda *args: {"loss": torch.tensor(0.5)},
                                                          "after": lambda *args: {"value": 1}})
    monkeypatch.setattr(sys.modules[__name__], "STARTED", time.perf_counter())
    monkeypatch.setattr(sys.modules[__name__], "BUDGET_S", None)  # main sets it: restored after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exit_status:
        main(["--device", "cpu", "--quick", "--out", str(out)])
    assert exit_status.value.code == 0
    checks = json.loads(out.read_text())["checks"]
    assert {name: (c["status"], c.get("loss", c.get("value"))) for name, c in checks.items()} == \
        {"tensor": ("ok", "tensor(0.5000)"), "after": ("ok", 1)}


def test_main_with_a_watchdog_budgets_its_margin_and_caps_child_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(threading, "Timer", lambda interval, function: InertTimer())  # never fires in pytest
    monkeypatch.setattr(faulthandler, "dump_traceback_later", lambda timeout, exit=False: None)
    seen = {}

    def only(device, quick, tmp):
        seen.update(budget_s=sys.modules[__name__].BUDGET_S, watchdog_s=sys.modules[__name__].WATCHDOG_S)
        return {}

    monkeypatch.setattr(sys.modules[__name__], "CHECKS", {"only": only})
    monkeypatch.setattr(sys.modules[__name__], "STARTED", time.perf_counter())
    monkeypatch.setattr(sys.modules[__name__], "BUDGET_S", None)
    monkeypatch.setattr(sys.modules[__name__], "WATCHDOG_S", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_status:
        main(["--device", "cpu", "--quick", "--out", str(tmp_path / "report.json"), "--watchdog_s", "575"])
    assert exit_status.value.code == 0 and seen == {"budget_s": 545, "watchdog_s": 575}


class InertTimer:
    """threading.Timer's stand-in for main's watchdog inside pytest: never fires."""
    daemon = None

    def start(self):
        pass


def test_every_reserve_names_a_check_and_child_process_checks_keep_30_s():
    """A misspelt RESERVE_S key is silently a reserve of 0: the check would start with no time left."""
    assert set(RESERVE_S) <= set(CHECKS), set(RESERVE_S) - set(CHECKS)
    assert all(RESERVE_S[name] >= 30 for name in ("torchrun", "ddp_two_processes", "bench_morph", "bench_mto",
                                                  "bench_mto_whole_step", "throughput"))
    assert RESERVE_S["throughput"] >= CONFIG_RESERVE_S


def test_budget_notes_only_a_budget_within_the_watchdogs_margin(capsys):
    assert budget(545, 575) == 545 and budget(300, 0) == 300 and budget(1000, 0) == 1000
    assert capsys.readouterr().out == ""  # 30 s from the watchdog, or no watchdog: no note
    assert budget(545.5, 575) == 545.5 and "within 30 s of --watchdog_s 575" in capsys.readouterr().out


def test_run_child_passes_its_arguments_and_gives_at_least_1_s_near_the_watchdog(tmp_path, monkeypatch):
    result = run_child([sys.executable, "-c", "import os; print(os.getcwd()); print(os.environ['RGL_MARK'])"],
                       timeout=60, cwd=str(tmp_path), env=dict(os.environ, RGL_MARK="mark"))
    assert result.returncode == 0 and result.stdout.split() == [str(tmp_path), "mark"], result
    monkeypatch.setattr(sys.modules[__name__], "WATCHDOG_S", 5.0)  # 5 s left: under the 15 s margin
    monkeypatch.setattr(sys.modules[__name__], "STARTED", time.perf_counter())
    with pytest.raises(TimeoutError, match="did not finish within 1 s"):
        run_child([sys.executable, "-c", "import time; time.sleep(60)"], timeout=240)


def test_an_out_that_cannot_be_written_is_refused_before_any_check(tmp_path, monkeypatch, capsys):
    """--out "" (an unset shell variable), " ", a file in a folder that does not exist or an existing folder: refused
    at once, naming --out, not a traceback from the report's first write after the first check started; no temp file
    is left behind (the folder's: written, then not renamed onto the folder)."""
    monkeypatch.setitem(CHECKS, "amp_choice", lambda *args: pytest.fail("a check ran"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    os.mkdir("reports")
    for out, error in (("", "--out '' is empty (an unset shell variable?): give a file, e.g. gpu_report.json"),
                       (" ", "--out ' ' is empty"),
                       ("missing/r.json", "error: --out 'missing/r.json': the report cannot be written there"),
                       ("reports", "error: --out 'reports': the report cannot be written there")):
        with pytest.raises(SystemExit) as exit_status:
            main(["--device", "cpu", "--quick", "--out", out])
        assert error in str(exit_status.value.code) + capsys.readouterr().err
    assert os.listdir(tmp_path) == ["reports"] and os.listdir("reports") == []


def test_a_killed_childs_output_until_then_is_in_the_error():
    """bench_mto prints its overheads before its profiles: a child killed at its timeout keeps that in the report."""
    code = ("import sys, time; print('overheads over dtm', flush=True); print('warning', file=sys.stderr, flush=True)"
            "; time.sleep(60)")
    with pytest.raises(TimeoutError, match=r"(?s)did not finish within 3 s \(killed\); its output until then:\n"
                                           r"overheads over dtm\nwarning"):
        run_child([sys.executable, "-c", code], timeout=3)


def test_out_of_memory_is_torchs_error_or_a_runtime_errors_failed_allocation():
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not out_of_memory(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"))
    assert not out_of_memory(AssertionError("loss nan after out of memory retry"))  # a failure, not a figure


def fake_torchrun(records, sums=(5.0, 5.0)):
    """run_child for check_ddp_two_processes: writes the record `records(trainer)`, the ranks' parameter sums and a
    step-2 checkpoint."""
    def run(argv, timeout, **kwargs):
        helper, out = argv[5], argv[argv.index("--output_dir") + 1]
        source = open(helper).read()
        compile(source, helper, "exec")  # the helper as formatted is Python
        trainer = "train_seg" if "import train_seg" in source else "train_pretrain"
        assert f"{trainer}.main(sys.argv[1:])" in source and repr(out) + ' + ".json"' in source
        with open(out + ".json", "w") as f:
            json.dump(records(trainer), f)
        for rank, checksum in enumerate(sums):
            with open(f"{out}.rank{rank}.sum", "w") as f:
                f.write(repr(checksum))
        os.makedirs(out, exist_ok=True)
        torch.save({"step": 2}, os.path.join(out, engine.LAST))
        return subprocess.CompletedProcess(argv, 0, "", "")
    return run


def test_two_process_check_reads_each_trainers_record(tmp_path, monkeypatch):
    def cpu(trainer):
        return {"world_size": 2, "backend": "gloo", "norms": ["BatchNorm2d"] if trainer == "train_seg" else [],
                "ddp": True}

    def gpu(trainer):
        return {**cpu(trainer), "backend": "nccl", "norms": ["SyncBatchNorm"] if trainer == "train_seg" else []}

    def fresh(name):
        (tmp_path / name).mkdir()
        return str(tmp_path / name)

    monkeypatch.setattr(sys.modules[__name__], "run_child", fake_torchrun(cpu))
    details = check_ddp_two_processes("cpu", True, fresh("cpu"))
    assert details == {t: {**cpu(t), "parameter_sums": [5.0, 5.0]} for t in ("train_pretrain", "train_seg")}
    monkeypatch.setattr(sys.modules[__name__], "run_child", fake_torchrun(cpu, sums=(5.0, 5.0001)))
    with pytest.raises(AssertionError, match=r"train_pretrain: the ranks' weights differ after training \(parameter "
                                             r"sums \[5.0, 5.0001\]\)"):
        check_ddp_two_processes("cpu", True, fresh("ranks_differ"))
    for wrong in ({"backend": "nccl"}, {"norms": []}, {"world_size": 1}, {"ddp": False}):
        monkeypatch.setattr(sys.modules[__name__], "run_child", fake_torchrun(lambda t: {**cpu(t), **wrong}))
        with pytest.raises(AssertionError):
            check_ddp_two_processes("cpu", True, fresh(f"wrong_{sorted(wrong)[0]}"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(sys.modules[__name__], "run_child", fake_torchrun(gpu))
    assert check_ddp_two_processes("cuda:0", False, fresh("gpu"))["train_seg"]["norms"] == ["SyncBatchNorm"]
    monkeypatch.setattr(sys.modules[__name__], "run_child", fake_torchrun(cpu))  # gloo on a GPU: wrong
    with pytest.raises(AssertionError):
        check_ddp_two_processes("cuda:0", False, fresh("gpu_gloo"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(Skip, match="one GPU visible"):
        check_ddp_two_processes("cuda:0", False, fresh("one_gpu"))


def test_compiled_against_eager_counts_the_compiled_runs_graphs_only_and_bounds_the_loss(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters
    case = {}

    def run(out, device, quick, *extra):
        compiled = "--compile" in extra
        if compiled:
            counters["stats"]["unique_graphs"] += case["graphs"] + case.get("loss_graphs", 0)
        loss, norm = (case["ratio"], case.get("norm", 1.0)) if compiled else (1.0, 1.0)
        return [{"loss": loss, "grad_norm": norm, "lr": 0.0, "img_per_s": 10.0, **{k: 0.25 for k in COMPUTE_PARTS},
                 "data_s": 5.0}] * 3

    monkeypatch.setattr(sys.modules[__name__], "pretrain_run", run)
    counters["stats"]["unique_graphs"] += 4  # an earlier compile check's graphs: not this one's
    try:
        case.update(graphs=1, ratio=1.02)
        details = compiled_against_eager("cpu", True, str(tmp_path), "--mto")
        assert details["graphs"] == 1 and details["compute_s_last"] == {"eager": 1.0, "compiled": 1.0}
        assert details["first_loss"] == {"eager": 1.0, "compiled": 1.02}
        case.update(norm=0.7)  # a compiled backward that lost gradients: the first loss is the eager one's
        with pytest.raises(AssertionError, match="compiled, eager: step 0's gradient norm 0.7 against 1"):
            compiled_against_eager("cpu", True, str(tmp_path), "--mto")
        case.update(norm=1.05)
        monkeypatch.setattr(sys.modules[__name__], "mto_loss_graphs", lambda: 3)  # --mto --compile: MTO's losses
        case.update(loss_graphs=3)
        details = compiled_against_eager("cpu", True, str(tmp_path), "--mto")
        assert (details["graphs"], details["mto_loss_graphs"]) == (1, 3)
        case.update(graphs=2)  # a second graph of the blocks is still one too many
        with pytest.raises(AssertionError):
            compiled_against_eager("cpu", True, str(tmp_path), "--mto")
        for graphs, ratio in ((2, 1.0), (0, 1.0), (1, 1.05), (1, 0.95), (1, float("nan"))):
            counters["stats"]["unique_graphs"] += 4
            case.update(graphs=graphs, ratio=ratio)
            with pytest.raises(AssertionError):
                compiled_against_eager("cpu", True, str(tmp_path), "--mto")
    finally:
        counters.clear()


ESCAPED_HOLDER = """
import os, sys, time
if os.fork() == 0:  # a grandchild that forks and exits: its child, re-parented, holds the pipes and leaves the tree
    if os.fork() == 0:
        open(sys.argv[1], "w").write(str(os.getpid()))
        time.sleep(120)
    os._exit(0)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_timed_out_child_whose_pipes_an_escaped_process_holds_still_ends_in_time(tmp_path, monkeypatch):
    """After the kill, run_child waits for the pipes at most KILLED_PIPES_WAIT_S (10 s, inside the 15 s it leaves
    before the watchdog): a process that left the tree (re-parented, so descendants() cannot find it) and still holds
    stdout would otherwise keep it waiting 30 s, past the watchdog, which then ends the whole run."""
    monkeypatch.setattr(sys.modules[__name__], "KILLED_PIPES_WAIT_S", 1)
    pid_file = tmp_path / "escaped.pid"
    start = time.perf_counter()
    try:
        with pytest.raises(TimeoutError, match="did not finish within 2 s"):
            run_child([sys.executable, "-c", ESCAPED_HOLDER, str(pid_file)], timeout=2)
        assert time.perf_counter() - start < 10
    finally:
        if pid_file.exists() and pid_file.read_text():
            kill([int(pid_file.read_text())])


def release_memory():
    """Drop the last check's tensors and hand the CUDA caching allocator's free blocks back to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


DEFAULT_BUDGET_S, WATCHDOG_MARGIN_S = 540, 30


def budget(budget_s, watchdog_s) -> float:
    """--budget_s: given, or the default (540 s; with --watchdog_s, that less 30 s: a check that runs a child process
    starts at least its reserve, 30 s or more, before the budget's end, so the child gets 45 s or more before
    run_child's 15 s margin to the watchdog)."""
    if budget_s is None:
        budget_s = watchdog_s - WATCHDOG_MARGIN_S if watchdog_s > 0 else DEFAULT_BUDGET_S
        if budget_s <= 0:
            sys.exit(f"error: --watchdog_s {watchdog_s:g} leaves no budget (it less {WATCHDOG_MARGIN_S} s); give "
                     f"--watchdog_s over {WATCHDOG_MARGIN_S}, or --budget_s")
        return budget_s
    if budget_s <= 0:
        sys.exit(f"error: --budget_s {budget_s:g}: every check would be skipped; give it > 0")
    if watchdog_s > 0 and budget_s > watchdog_s - WATCHDOG_MARGIN_S:
        print(f"note: --budget_s {budget_s:g} is within {WATCHDOG_MARGIN_S} s of --watchdog_s {watchdog_s:g}: a check "
              f"that starts late gets too little time for its child processes and fails instead of being skipped",
              flush=True)
    return budget_s


def check_device(device: str) -> str:
    """'cuda' -> 'cuda:0'. The trainers checked in-process (and torchrun's worker) run on the first visible GPU, or on
    a GPU whenever there is one: another GPU, or the CPU on a GPU machine, would measure two devices in one report."""
    device = "cuda:0" if device == "cuda" else device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; for a dry run on the CPU: python test_gpu.py --device cpu --quick")
    if device.startswith("cuda") and device != "cuda:0":
        sys.exit(f"error: --device {device}: the trainers checked here use the first visible GPU; to check GPU "
                 f"{device[5:]}: CUDA_VISIBLE_DEVICES={device[5:]} python test_gpu.py --device cuda:0 ...")
    if device == "cpu" and torch.cuda.is_available():
        sys.exit("error: --device cpu on a machine with a GPU: the trainers checked here would use the GPU; for a dry "
                 "run on the CPU: CUDA_VISIBLE_DEVICES= python test_gpu.py --device cpu --quick")
    if device not in ("cpu", "cuda:0"):
        sys.exit(f"error: --device {device}: expected cuda, cuda:0 or cpu")
    return device


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_report.json", type=os.path.expanduser,
                        help="the JSON report written (default %(default)s)")
    parser.add_argument("--device", default="cuda:0", help="cuda:0 (also cuda): the first visible GPU; cpu: a dry run "
                        "on a machine without one, with --quick (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a dry run of the code paths)")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(CHECKS),
                        help="checks to leave out (each described above), reported as skipped")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="seconds from the start: a check is skipped unless it can start before the budget less "
                             f"its reserve ({', '.join(f'{k} {v} s' for k, v in RESERVE_S.items())}, others 0); "
                             f"default {DEFAULT_BUDGET_S:g}, or --watchdog_s less {WATCHDOG_MARGIN_S} s when that "
                             f"is set (a later start leaves a child process too little time before the watchdog)")
    parser.add_argument("--watchdog_s", type=float, default=0,
                        help="after this many seconds from the start, print every thread's stack, kill the child "
                             "processes and exit, before an outer time limit kills the run (the report keeps what "
                             "ran, the check in flight marked 'running'); default 0: off")
    global BUDGET_S
    args = parser.parse_args(argv)
    if not args.out.strip():
        parser.error(f"--out {args.out!r} is empty (an unset shell variable?): give a file, e.g. gpu_report.json")
    if args.watchdog_s > 0:
        start_watchdog(args.watchdog_s)
    args.budget_s = BUDGET_S = budget(args.budget_s, args.watchdog_s)
    args.device = check_device(args.device)
    report = {"device": device_name(args.device), "torch": torch.__version__, "cuda": torch.version.cuda,
              "quick": args.quick, "checks": {}}
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(args.device)
        report["gpu"] = {"name": props.name, "capability": [props.major, props.minor],
                         "memory_gib": round(props.total_memory / 2 ** 30, 1),
                         "multiprocessors": props.multi_processor_count, "arch_list": torch.cuda.get_arch_list()}
    failed = []

    def write_report():  # after every check, and before it: a run cut short keeps what it had
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f, indent=1, default=repr)  # a check's tensor or numpy value: written as text
        os.replace(args.out + ".tmp", args.out)  # whole or not at all, should the watchdog end the run meanwhile

    try:  # at once, not after the first check (a traceback): e.g. --out into a folder that does not exist
        write_report()
    except OSError as e:
        if os.path.isfile(args.out + ".tmp"):
            os.remove(args.out + ".tmp")
        sys.exit(f"error: --out {args.out!r}: the report cannot be written there ({e}); give a file in a folder that "
                 f"exists and can be written to")
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in CHECKS.items():
            start = time.perf_counter()
            try:
                if name in args.skip:
                    raise Skip("--skip")
                spent = start - STARTED
                if spent > args.budget_s - RESERVE_S.get(name, 0):
                    raise Skip(f"out of time: {spent:.0f} s spent, --budget_s {args.budget_s:g}, reserve "
                               f"{RESERVE_S.get(name, 0)} s")
                print(f"{name:>15}: started at {spent:.0f} s", flush=True)
                report["checks"][name] = {"status": "running", "started_at_s": round(spent, 1)}
                write_report()
                release_memory()  # what earlier checks left cached is not free for a child process (torchrun, benches)
                entry = {"status": "ok", **check(args.device, args.quick, tmp)}
            except Skip as e:
                entry = {"status": "skipped", "reason": str(e)}
            except (Exception, SystemExit) as e:  # noqa: BLE001 -- every failure goes into the report, the run goes
                # on (SystemExit: a trainer's argparse error, which would end the run with the report at "running")
                entry = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                         **({"figures": e.figures} if isinstance(e, ThroughputFailed) else {})}
                failed.append(name)
            entry["started_at_s"], entry["seconds"] = round(start - STARTED, 1), round(time.perf_counter() - start, 1)
            report["checks"][name] = entry  # started_at_s kept: the report alone gives the run's schedule
            print(f"{name:>15}: {entry['status']} ({entry['seconds']} s)", flush=True)
            write_report()
    print(f"report: {args.out}" + (f"; FAILED: {', '.join(failed)}" if failed else "; all checks passed or skipped"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
