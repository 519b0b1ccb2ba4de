"""Training plumbing shared by train_pretrain.py, train_finetune.py and train_seg.py: functions and tiny dataclasses.

Each trainer keeps its own loop, readable top to bottom; this file holds what the three loops have in common:

    distributed   setup / teardown from torchrun's env vars (nccl on GPU, gloo on CPU; a clear error for a GPU
                  this torch build has no kernels for), DDP wrap, unwrap, compile_blocks
    precision     --amp: bf16, fp16 + GradScaler, or fp32
    optimization  parameter groups (weight decay, layer-wise lr decay), lr schedules, the optimizer step
    randomness    one scheme for all three (below)
    data          seeded samples, epoch sampler, micro-batches from any step on, unreadable images, eval shards
    runs          output folder (auto-resume, --fresh, run lock), checkpoints (atomic, finite only, plain torch.load),
                  resume, the JSONL log, the step timer, one-line user errors

Randomness. No random draw depends on an RNG state carried from step to step:
    the order of epoch e                                  <- (seed, e)           (torch's DistributedSampler)
    a sample's augmentation and mask                      <- (seed, e, index)    (SeededSamples)
    a micro-step's draws (drop path, dropout, Mixup, the random split of Algorithm 1)
                                                          <- (seed, micro-step, rank)   (seed_step)
So a run resumed from any checkpoint, also one taken mid-epoch, continues as the uninterrupted run, with any number
of DataLoader workers (their batches are the same bit for bit); the checkpoint's RNG states are saved and restored all
the same. Bit for bit on the CPU with one or two processes at the same thread count; on a GPU, with three processes or
more, or another thread count, in all but the last bits (README, "Runs, checkpoints and logs").
"""
import argparse
import contextlib
import errno
import fractions
import hashlib
import inspect
import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import sys
import time
import traceback
import weakref
from dataclasses import dataclass, field

try:
    import fcntl  # POSIX: the run lock of an output_dir (lock_output_dir)
except ImportError:  # Windows
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
# DDP imports torch.distributed.nn, whose functions take group.WORLD as a default argument. Imported after
# init_process_group (setup) they hold the group for good: destroy_process_group then left gloo's threads running and
# a rank could abort at exit ("terminate called without an active exception"). Imported before, they hold None.
import torch.distributed.nn  # noqa: F401
import torch.nn as nn
from tqdm import tqdm

import data
import dtm

LAST = "checkpoint-last.pth"
BEST = "checkpoint-best.pth"
LOG = "log.jsonl"
RUN_CHECKPOINT = re.compile(r"checkpoint-(last|best|\d+)\.pth")  # the files a run writes in its output_dir
REPO = os.path.dirname(os.path.abspath(__file__))
_SAME_FILES = "every process must read the same files (one data folder that every node sees in full)"
SAME_CHECKPOINT = "every process must read the same files (a checkpoint path that names the same file on every node)"

# ---------------------------------------------------------------------------------------------------
# Distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args):
        """print on rank 0 only; while a progress bar is open, with the bar cleared first and redrawn after, so that
        in a terminal the message gets a line of its own above the bar (it was glued to the bar's text). Flushed
        before the redraw: a buffered stdout (a log file of stdout and stderr together) would put it after."""
        if self.is_main:
            with tqdm.external_write_mode(file=sys.stdout):
                print(*args, flush=True)


def set_backend_flags():
    """Set once for all trainers (by setup; the benchmarks call it too): TF32 matmuls and convolutions on GPUs that
    have them (fp32 runs; no effect under bf16/fp16 autocast), and cuDNN's autotuner (the patch embedding's input
    size is fixed; the official run_pretrain_dtm.py sets it too)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def backend_flags() -> tuple:
    """(TF32 matmuls, TF32 convolutions, cuDNN's autotuner): the flags set_backend_flags sets."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark


@contextlib.contextmanager
def backend_flags_kept():
    """Around a trainer's main: the backend flags that setup sets for the run (set_backend_flags) are the caller's
    again once main returns or raises (a notebook or a sweep calling main went on with TF32 matmuls in its own fp32
    work, and cuDNN's autotuner)."""
    saved = backend_flags()
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def setup() -> Dist:
    """Process group from torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK): nccl on CUDA, gloo on CPU.
    Without torchrun: one process on cuda:0 if there is a GPU, else the CPU. Sets the backend flags
    (set_backend_flags)."""
    set_backend_flags()
    check_launch_env()
    if not os.environ.get("RANK"):  # unset or empty (RANK= ...), as check_launch_env reads it
        if not torch.cuda.is_available():
            return Dist()
        check_gpu_supported(torch.device("cuda", 0))
        return Dist(device=torch.device("cuda", 0))
    rank, world_size, local_rank = launch_int("RANK"), launch_int("WORLD_SIZE"), launch_int("LOCAL_RANK")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        check_gpu_count(local_rank)
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        check_gpu_supported(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank, device)


def launch_int(name: str) -> int:
    """torchrun's variable `name` as an int, an empty or unset one 0 (LOCAL_RANK= from an exported unset variable,
    e.g. $SLURM_LOCALID outside a step), one that is no whole number a one-line error naming it (int()'s
    "invalid literal for int() with base 10: ''" named none)."""
    value = os.environ.get(name, "").strip()
    try:
        return int(value or 0)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number: torchrun sets it; unset it, or launch with "
                         f"torchrun") from None


def check_gpu_count(local_rank: int):
    """A one-line error, naming the fix, for a process whose GPU (one per process: LOCAL_RANK) this node does not have
    (torchrun --nproc_per_node 8, the README's command, on a node with fewer GPUs, or CUDA_VISIBLE_DEVICES naming
    fewer): torch.cuda.set_device stopped it with "CUDA error: invalid device ordinal" and a traceback."""
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK={local_rank}, but this node has {count} GPU{'s' * (count != 1)} visible and each "
                         f"process takes one: launch at most {count} processes per node (torchrun --nproc_per_node "
                         f"{count}), or make more GPUs visible (CUDA_VISIBLE_DEVICES)")


TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# (launcher, its variable for the number of processes it started): srun's step (not set in an sbatch script), Open
# MPI's mpirun, MPICH's and Intel MPI's mpirun; none of them sets torchrun's variables
OTHER_LAUNCHERS = (("srun", "SLURM_STEP_NUM_TASKS"), ("mpirun", "OMPI_COMM_WORLD_SIZE"), ("mpirun", "PMI_SIZE"))


def check_launch_env():
    """A one-line error, naming the fix, where the environment holds part of torchrun's variables: RANK without
    the others (a KeyError or torch's rendezvous traceback otherwise), or WORLD_SIZE > 1 without RANK (one process
    otherwise, silently). WORLD_SIZE 1 alone is one process, as without it. Also for one of several processes that
    another launcher started without RANK (OTHER_LAUNCHERS): each trained alone, silently, as a run of its own (into
    one --output_dir, all but one stopped by its run lock, naming another run)."""
    given = [name for name in TORCHRUN_ENV if os.environ.get(name)]
    script = os.path.basename(sys.argv[0]) if sys.argv[0].endswith(".py") else "SCRIPT.py"
    fix = (f"launch with torchrun (torchrun --nproc_per_node N {script} ...), which sets them all, or unset "
           f"{' '.join(given)} to run one process")
    if "RANK" in given and len(given) < len(TORCHRUN_ENV):
        missing = [name for name in TORCHRUN_ENV if name not in given]
        raise ValueError(f"RANK is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: {fix}")
    if "RANK" not in given and "WORLD_SIZE" in given and os.environ["WORLD_SIZE"].strip() != "1":
        raise ValueError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but RANK is not set, so this would run one "
                         f"process, not {os.environ['WORLD_SIZE']}: {fix}")
    for launcher, size in OTHER_LAUNCHERS:
        tasks = os.environ.get(size, "").strip()
        if "RANK" not in given and tasks not in ("", "1"):
            raise ValueError(f"this process is one of {tasks} that {launcher} started ({size}={tasks}) without "
                             f"torchrun's RANK and WORLD_SIZE, so each would train alone, as {tasks} separate runs: "
                             f"let {launcher} start one task per node that runs torchrun (torchrun --nnodes NODES "
                             f"--nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:PORT {script} ...), or one "
                             f"task to run one process")


def _capability(arch: str) -> tuple:
    """"sm_86" -> (8, 6), "sm_90a" -> (9, 0), "compute_120" -> (12, 0)."""
    digits = re.match(r"\d+", arch.split("_", 1)[1]).group()
    return int(digits[:-1]), int(digits[-1])


def check_gpu_supported(device):
    """A clear error, before any kernel runs, when this torch build has no kernels for the GPU (otherwise: a warning
    at start-up, then "no kernel image is available for execution on the device" at the first kernel). A build runs
    on a GPU of compute capability (M, m) if it has machine code sm_Mn with n <= m, or PTX compute_ab <= (M, m)."""
    capability = torch.cuda.get_device_capability(device)
    archs = torch.cuda.get_arch_list()
    cubins = [_capability(a) for a in archs if a.startswith("sm_")]
    ptx = [_capability(a) for a in archs if a.startswith("compute_")]
    runs = any(c[0] == capability[0] and c <= capability for c in cubins) or any(c <= capability for c in ptx)
    if (cubins or ptx) and not runs:  # nothing known (an empty list, ROCm's gfx names): torch decides
        hint = (" (for a V100: a CUDA 12.6 build, pip install torch --index-url https://download.pytorch.org/whl/cu126;"
                " see the README)") if capability < (7, 5) else ""
        raise ValueError(f"this torch build ({torch.__version__}) has no kernels for "
                         f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}; "
                         f"it has {', '.join(archs)}): install a build of torch for this GPU{hint}")


def teardown():
    try:
        stop_loader_workers()
    finally:  # a Ctrl-C while the workers are joined: the run lock is let go of all the same
        release_output_dirs()
        if dist.is_initialized():
            dist.destroy_process_group()


RUN_LOCK = ".run.lock"  # in output_dir: locked (fcntl.lockf) by the rank 0 of the run writing there
_held_locks = {}  # output_dir's real path -> the open lock file of this process
# output_dir's absolute path -> (whether prepare_run found a LAST there, --resume): open_log removes only a LAST
# found there, and words its refusal of one that another run wrote since by --resume
_saw_last = {}


def lock_output_dir(output_dir: str):
    """Rank 0's hold on output_dir for the run's life -> None, or why another run holds it (a second run launched
    into the same folder would continue the first one's checkpoint and the two would write over each other's
    checkpoints and log). A POSIX record lock (lockf, the lock NFS serves): the kernel releases it when the process
    ends, however it ends (a relaunch after a crash finds it free), and forked processes (DataLoader workers) do not
    inherit it. The file is made with the umask's permissions, as the checkpoints; one this user cannot write (another
    user's in a group folder) is locked shared through a read-only descriptor, which a holder's exclusive lock
    refuses and which refuses one. Best effort: a folder not made yet is locked by open_log; a file system without
    locks goes unchecked, and one whose locks are node-local checks runs on one node only. One run per process:
    release_output_dirs (teardown) lets go of every folder this process holds."""
    if fcntl is None or not os.path.isdir(output_dir) or os.path.realpath(output_dir) in _held_locks:
        return None
    path = os.path.join(output_dir, RUN_LOCK)
    try:
        fd, mode = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), fcntl.LOCK_EX
    except PermissionError:
        try:
            fd, mode = os.open(path, os.O_RDONLY), fcntl.LOCK_SH
        except OSError:
            return None
    except OSError:
        return None  # a folder that cannot be written to: open_log's error names it
    try:
        fcntl.lockf(fd, mode | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # POSIX allows either for a lock held elsewhere
        try:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        os.close(fd)
        return (f"--output_dir {output_dir!r} is in use by another run ({holder}), which writes its checkpoints and "
                f"log there: wait for it to end, or pass another --output_dir (if no run uses it, e.g. NFS kept the "
                f"lock of a node that crashed, remove {path})")
    except OSError:
        os.close(fd)
        return None
    if mode == fcntl.LOCK_EX:
        with contextlib.suppress(OSError):  # who holds it, for another run's message: best effort (a full disk)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held_locks[os.path.realpath(output_dir)] = fd
    return None


def release_output_dirs():
    """Let go of the folders lock_output_dir holds (the file stays: removing it would race with a run locking it)."""
    while _held_locks:
        fd = _held_locks.popitem()[1]
        with contextlib.suppress(OSError):
            fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)


def ddp(model: nn.Module, d: Dist) -> nn.Module:
    """model wrapped in DistributedDataParallel when there are several processes, else model itself. Buffers are
    broadcast from rank 0 before each forward only if one can differ between ranks (buffers_differ_between_ranks)."""
    if d.world_size == 1:
        return model
    DDP = nn.parallel.DistributedDataParallel
    # torch 2.13 renamed broadcast_buffers (deprecated, a FutureWarning per rank) to forward_sync_buffers
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"
    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
               **{sync: buffers_differ_between_ranks(model)})


def _rank_local_norms(model: nn.Module) -> list:
    """BatchNorm layers other than SyncBatchNorm (which keeps its statistics equal on all ranks): their running
    statistics move with each rank's own batches."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)]


def buffers_differ_between_ranks(model: nn.Module) -> bool:
    """Whether model has buffers that training changes per rank (_rank_local_norms' statistics). The ViTs' buffers
    are constant (the relative position indices: 12 x 8.4 MB for ViT-B at 512 px), and DDP would otherwise send
    them all before every forward."""
    return bool(_rank_local_norms(model))


def share_rank0_buffers(model: nn.Module, d: Dist):
    """Before evaluating a model trained with DDP whose buffers can differ between ranks (see above): every rank takes
    rank 0's BatchNorm statistics, i.e. the checkpoint's. DDP broadcasts them before each training forward, so after
    the last step each rank's had moved by its own batch, and each rank evaluated a slightly different model. Only
    those buffers are sent, not the constant ones."""
    if d.world_size > 1:
        for norm in _rank_local_norms(model):
            for buffer in norm.buffers():
                dist.broadcast(buffer, src=0)


def grad_sync(model: nn.Module, last_micro: bool):
    """Context for one micro-batch's backward: DDP's no_sync() except on the last micro-batch of an accumulation,
    so gradients are all-reduced once per optimizer step; nothing without DDP."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not last_micro:
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_mean(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean over ranks of a tensor every rank holds (a copy; values itself is unchanged)."""
    values = values.detach().clone()
    if d.world_size > 1:
        dist.all_reduce(values)
        values /= d.world_size
    return values


def rank_rows(values: torch.Tensor, d: Dist) -> torch.Tensor:
    """(world_size, *values.shape): every rank's values (a copy), for a checkpoint each rank resumes from its own row
    (own_row)."""
    values = values.detach().contiguous()
    if d.world_size == 1:
        return values.clone().unsqueeze(0)
    rows = [torch.empty_like(values) for _ in range(d.world_size)]
    dist.all_gather(rows, values)
    return torch.stack(rows)


def own_row(rows, mean: torch.Tensor, d: Dist) -> torch.Tensor:
    """A resumed rank's loss sums since the last log line: its own row of a checkpoint saved by as many processes
    (rank_rows), so the next log line equals the uninterrupted run's bit for bit; else (another number of processes,
    a checkpoint from before rows were saved) the processes' mean, which each rank continues from (the line then
    differs in its last bits)."""
    return rows[d.rank] if rows is not None and len(rows) == d.world_size else mean


def check_ranks_agree(d: Dist, what: str, value, fix: str):
    """Every process must see the same `value` (a small picklable: a dataset's size, where the run starts); else stop
    on every rank, naming each rank's value: processes that disagree would train out of step and hang in a
    collective (or run on until nccl's watchdog, naming nothing)."""
    if d.world_size == 1 or not dist.is_initialized():  # one process (or a Dist made up for a check)
        return
    values = [None] * d.world_size
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        seen = ", ".join(f"rank {rank}: {v}" for rank, v in enumerate(values))
        raise ValueError(f"the processes do not agree on {what} ({seen}): {fix}")


def _world() -> Dist:
    """This process's rank and world size, from the process group (one process without one), for the functions every
    rank calls without being handed a Dist (load_checkpoint, save_checkpoint)."""
    return Dist(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else Dist()


def build_on_all_ranks(d: Dist, build, *args, fix: str = _SAME_FILES, **kwargs):
    """build(*args, **kwargs) (datasets: folders that each node reads for itself; checkpoints, with fix
    SAME_CHECKPOINT) on every process. A user error (user_error_message) on some ranks only stops every rank with the
    first one's message and `fix` (None: none): alone, that rank stopped and the others died at their next collective
    with the process group's traceback, which torchrun's summary named as the first failure. Where every rank fails,
    each raises its own error."""
    if d.world_size == 1 or not dist.is_initialized():
        return build(*args, **kwargs)
    try:
        result, failure = build(*args, **kwargs), None
    except (ValueError, OSError) as error:
        if user_error_message(error) is None:  # not a user error: a bug, kept with its traceback
            raise
        result, failure = None, error
    failures = [None] * d.world_size
    dist.all_gather_object(failures, None if failure is None else (socket.gethostname(), user_error_message(failure)))
    stopped = [(rank, f) for rank, f in enumerate(failures) if f is not None]
    if not stopped:
        return result
    if len(stopped) == d.world_size:
        raise failure
    rank, (host, message) = stopped[0]
    raise ValueError(f"rank {rank} of {d.world_size} ({host}) stopped: {message.rstrip('.')}"
                     + (f"; {fix}" if fix else ""))


# ---------------------------------------------------------------------------------------------------
# Precision


def native_bf16(device) -> bool:
    """Whether the GPU computes in bf16 natively: compute capability 8.0 and up (A100, H100, RTX 30xx...). Not
    torch.cuda.is_bf16_supported(), which in recent torch also says True on a V100 (7.0), where bf16 is emulated
    and slow."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_amp(mode: str, device) -> tuple:
    """--amp -> (autocast dtype or None, GradScaler or None).

    "auto": bf16 on GPUs with native bf16 (compute capability >= 8.0), fp16 + GradScaler below (V100, T4), fp32 on
    the CPU. "bf16" / "fp16" / "fp32" force a choice; fp16 needs CUDA, bf16 also works on the CPU (slowly).
    """
    device = torch.device(device)
    if mode == "auto":
        if device.type != "cuda":
            return None, None
        mode = "bf16" if native_bf16(device) else "fp16"
    dtype = _amp_dtype(mode, device, "--amp")
    return dtype, torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def resolve_teacher_amp(mode: str, amp_dtype, device):
    """--teacher_amp -> the frozen teacher's autocast dtype (None: float32).

    "auto": fp16 on a GPU whenever the student runs under autocast, as the official code (naver-ai/dtm
    engines/engine_for_dtm.py:117 computes the targets under torch.cuda.amp.autocast(), fp16): 10 mantissa bits to
    bf16's 7, and a forward without gradient needs no loss scale; otherwise the student's (fp32 or bf16 on the CPU).
    "fp16" / "bf16" / "fp32" force a choice, with --amp's device rules.
    """
    device = torch.device(device)
    if mode == "auto":
        return torch.float16 if amp_dtype is not None and device.type == "cuda" else amp_dtype
    return _amp_dtype(mode, device, "--teacher_amp")


def _amp_dtype(mode: str, device: torch.device, flag: str):
    """A forced precision choice ("bf16", "fp16", "fp32") -> autocast dtype or None, checked against the device."""
    if mode not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"unknown {flag} {mode!r}; use auto, bf16, fp16 or fp32")
    if mode == "bf16" and device.type == "cuda" and not native_bf16(device):
        raise ValueError(f"this GPU (compute capability {torch.cuda.get_device_capability(device)}) has no native "
                         f"bf16; use {flag} fp16 (or auto)")
    if mode == "fp16" and device.type != "cuda":
        raise ValueError(f"{flag} fp16 needs a CUDA device; use {flag} fp32 or bf16 on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[mode]


def amp_name(dtype, scaler) -> str:
    """What resolve_amp chose, for the start-up line: "bf16", "fp16 + GradScaler" or "fp32"."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype] + (" + GradScaler" if scaler else "")


def autocast(d: Dist, dtype):
    """torch.autocast on the run's device with dtype (None: off)."""
    return torch.autocast(d.device.type, dtype=dtype, enabled=dtype is not None)


def backward(loss: torch.Tensor, scaler):
    (scaler.scale(loss) if scaler is not None else loss).backward()


def loss_scale_field(scaler) -> dict:
    """{"loss_scale": GradScaler's current scale} for the log (fp16), {} without a scaler. The scale halves at each
    step whose gradients overflowed (the step is skipped; its logged grad_norm is null)."""
    return {"loss_scale": scaler.get_scale()} if scaler is not None else {}


# ---------------------------------------------------------------------------------------------------
# Optimization

NO_DECAY_NAMES = ("pos_embed", "cls_token")  # the ViT's no_weight_decay() in the official code


def param_groups(model: nn.Module, weight_decay: float, lr_scale_fn=None) -> list:
    """AdamW groups with the official code's weight-decay rule (naver-ai/dtm utils/optim_factory.py
    get_parameter_groups, skip list = models/modeling_dtm.py no_weight_decay(); BEiT's beit/optim_factory.py too): no
    weight decay for 1-D parameters (norms, layer scale, q/v biases), biases, and the ViT's pos_embed and cls_token;
    the mask token and the relative position tables are decayed. lr_scale_fn(name) -> float goes into group["lr_scale"]
    (layer-wise lr decay; set_lr applies it). Frozen parameters are left out; group["param_names"] lists names."""
    groups = {}
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES
        scale = 1.0 if lr_scale_fn is None else float(lr_scale_fn(name))
        group = groups.setdefault((no_decay, scale), {
            "params": [], "param_names": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale})
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


def layer_decay_fn(depth: int, decay: float, prefix: str = ""):
    """name -> lr scale decay^(depth + 1 - layer id), BEiT's LayerDecayValueAssigner
    (beit/optim_factory.py, with get_num_layer_for_vit). Parameters whose name starts
    with `prefix` are the ViT's (layer ids of dtm.layer_id_for_param: 0 embeddings, i + 1 block i, depth + 1 on top);
    any other parameter (a segmentation head) is on top, scale 1."""
    def lr_scale(name: str) -> float:
        if not name.startswith(prefix):
            return 1.0
        return decay ** (depth + 1 - dtm.layer_id_for_param(name[len(prefix):], depth))
    return lr_scale


def workers_default(preferred: int) -> int:
    """--num_workers' default: `preferred`, or the CPUs this process may use where fewer (a laptop, a CPU job of 2
    cores), the bound torch's DataLoader warns above. Not divided among a node's processes: a launcher that pins each
    process to its share of the cores (SLURM's binding) already shows it here. A --num_workers given is used as
    given."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(preferred, cpus))


def check_shared_args(args):
    """The numeric flags the three trainers share: a negative --clip_grad would flip the gradients' sign
    (clip_grad_norm_ scales by clip / norm), a negative --lr or --weight_decay would train backwards, a negative
    --max_unreadable stop the run at its first log, a negative --num_workers fail inside the DataLoader; --lr 0 would
    train nothing (with --min_lr 0, without a word)."""
    for flag in ("lr", "min_lr", "weight_decay", "clip_grad", "num_workers"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.lr == 0:
        raise ValueError("--lr 0 would train nothing (every step's lr is 0, or at most --min_lr): pass a peak lr > 0")
    if not 0 <= args.max_unreadable <= 1:
        raise ValueError(f"--max_unreadable is a fraction of the training images, in 0..1; got {args.max_unreadable}")
    if getattr(args, "layer_decay", None) is not None and not 0 < args.layer_decay <= 1:
        raise ValueError(f"--layer_decay must be in (0, 1] (1: no decay), got {args.layer_decay}")
    if not all(0 <= b < 1 for b in args.betas):  # every trainer has --betas
        raise ValueError(f"--betas are AdamW's moment decays, each in [0, 1); got {' '.join(map(str, args.betas))}")
    if not -2 ** 63 <= args.seed < 2 ** 64:  # torch.manual_seed's range
        raise ValueError(f"--seed must be in -2**63..2**64 - 1, got {args.seed}")
    check_output_dir(args.output_dir)


def check_image_size(flag: str, size: int, example: int, smallest: int = dtm.PATCH_SIZE):
    """An image size (--img_size, --crop_size) must be a positive multiple of the patch size; the error names the
    multiples beside it (the cost grows with the square of the size) from `smallest` on (the trainer's own minimum,
    a multiple of the patch size: segmentation's 2x2 patches) and `example`, the paper's."""
    if size <= 0 or size % dtm.PATCH_SIZE:
        below = size // dtm.PATCH_SIZE * dtm.PATCH_SIZE
        above = max(below + dtm.PATCH_SIZE, smallest)
        near = f"{below} or {above}" if below >= smallest else f"{above}"
        raise ValueError(f"{flag} {size} is not a positive multiple of the patch size {dtm.PATCH_SIZE}; use "
                         f"{near} (the paper's: {example})")


def check_bench_device(device: str):
    """A benchmark's --device: cpu, or a CUDA device this machine has (else a traceback once, after the set-up for
    a bad name, at the first tensor moved for a missing GPU)."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use cpu or cuda (cuda:N for GPU N)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: the benchmarks time cpu or cuda only; use one of them")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"--device {device}: no CUDA device here (torch {torch.__version__}, {build}); use --device "
                         f"cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")


def check_output_dir(output_dir: str):
    """--output_dir must be a folder or a path where one can be made: not empty, not a file, not under one, not a
    symbolic link to nothing nor under one."""
    if not output_dir:
        raise ValueError("--output_dir is empty; pass a folder for the checkpoints and log.jsonl")
    path = os.path.abspath(output_dir)
    while not os.path.lexists(path):  # the nearest path that is there, a link to nothing included
        path = os.path.dirname(path)
    where = "is" if path == os.path.abspath(output_dir) else f"is under {path!r}, which is"
    if not os.path.exists(path):  # a link whose folder is gone: makedirs failed with "File exists", at start-up
        raise ValueError(f"--output_dir {output_dir!r} {where} a symbolic link to {os.readlink(path)!r}, which "
                         f"does not exist: make that folder, or pass another --output_dir")
    if not os.path.isdir(path):
        raise ValueError(f"--output_dir {output_dir!r} {where} a file, not a folder; pass a folder")


def set_lr(optimizer, lr: float):
    """Set every group's lr to lr * group["lr_scale"] (1 if absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def cosine_schedule(step, total_steps, warmup_steps, base_value, final_value) -> float:
    """Linear warmup from 0 to base_value over warmup_steps, then cosine decay to final_value at total_steps."""
    if step < warmup_steps:
        return base_value * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_value + 0.5 * (base_value - final_value) * (1.0 + math.cos(math.pi * progress))


def poly_schedule(step: int, total_steps: int, warmup_steps: int, base_value: float, power: float = 1.0,
                  min_value: float = 0.0, warmup_ratio: float = 1e-6) -> float:
    """mmcv's poly LR with linear warmup: lr = (base - min)(1 - step/total)^power + min; during the warmup
    that value times a factor rising linearly from warmup_ratio (step 0) to 1 (step warmup_steps)."""
    lr = (base_value - min_value) * (1 - min(step, total_steps) / total_steps) ** power + min_value
    if step < warmup_steps:
        lr *= 1 - (1 - step / warmup_steps) * (1 - warmup_ratio)
    return lr


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """--warmup_epochs in optimizer steps, rounded; a warmup that rounds to no step is an error, not a run without
    one (the start-up line would still name the fraction asked for)."""
    steps = round(warmup_epochs * steps_per_epoch)
    if warmup_epochs > 0 and steps == 0:
        raise ValueError(f"--warmup_epochs {warmup_epochs:g} is {warmup_epochs * steps_per_epoch:.3g} of the "
                         f"{steps_per_epoch} optimizer steps per epoch, which rounds to no warmup step: pass "
                         f"--warmup_epochs 0 for none, or at least {1 / steps_per_epoch:.3g} (one step)")
    return steps


def warn_long_warmup(warmup_steps: int, total_steps: int, flag: str, d: "Dist"):
    """A warmup as long as the run (a shortened run that kept the default warmup) never reaches the peak lr."""
    if 0 < total_steps <= warmup_steps:
        d.print(f"warning: the warmup ({flag}, {warmup_steps} steps) lasts the whole run ({total_steps} steps), so the "
                f"lr never reaches its peak; pass a smaller {flag}")


def warn_min_lr(min_lr: float, peak_lr: float, how: str, d: "Dist"):
    """The schedule ends at --min_lr: above the peak lr it raises the lr over the run instead of decaying it (a
    mistyped --min_lr, or a small batch that scaled the lr below it)."""
    if min_lr > peak_lr:
        d.print(f"warning: --min_lr {min_lr:g} is above the peak lr {peak_lr:.3g}{how}, so the schedule raises the lr "
                f"towards it instead of decaying it; pass a --min_lr below {peak_lr:.3g}")


def optimizer_step(optimizer, scaler, parameters, clip_grad: float) -> torch.Tensor:
    """Unscale (fp16), clip the gradient norm to clip_grad (0 or None: no clipping), step, zero the gradients.

    Returns the gradient norm before clipping (measured also without clipping, for the log; then the gradients are
    only read: clip_grad_norm_ with an infinite max norm would still multiply every gradient by 1)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        grad_norm = nn.utils.clip_grad_norm_(parameters, clip_grad)
    else:
        grad_norm = nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def compile_blocks(vit: nn.Module):
    """torch.compile each transformer block (not the whole model: DTM's morphing changes shapes every step, and the
    blocks are where the time goes); parameter names and checkpoints stay the same."""
    for block in vit.blocks:
        block.compile()


# ---------------------------------------------------------------------------------------------------
# Randomness


def seed_of(*parts) -> int:
    """A 63-bit seed that is a fixed function of its parts (e.g. ("data", seed, epoch, index))."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def seed_all(seed: int):
    """Seed torch (CPU and CUDA), Python's random and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


def seed_step(seed: int, micro_step: int, rank: int):
    """The global RNGs for one micro-step: a function of (seed, micro_step, rank) only."""
    seed_all(seed_of("step", seed, micro_step, rank))


def rng_state() -> dict:
    """The global RNG states (torch CPU, this process's CUDA device, random, numpy) as tensors and plain Python
    values. Only the current CUDA device's state: a run may resume on fewer GPUs than it saved from."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "random": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    """Restore what rng_state() returned (the CUDA part only if saved and CUDA is present, onto the current
    device; from a list of every device's states, as checkpoints before 2026-12-02 hold, the current device's)."""
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["random"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


# ---------------------------------------------------------------------------------------------------
# Data


class SeededSamples(torch.utils.data.Dataset):
    """dataset[(epoch, index)] -> (*base[index], skipped), with torch's and Python's RNGs seeded by (seed, epoch,
    index) while base[index] runs; the caller's RNG states are left as they were.

    A sample's augmentation then depends on nothing else (not on the worker, the rank or what ran before), which
    makes resuming mid-epoch exact. A sample whose image cannot be read (data.UnreadableImage), or whose file is gone
    since the dataset was listed (deleted, moved, a dangling link), is replaced by the next readable one, index + 1,
    + 2, ... (with the same seed, so runs stay reproducible); `skipped` names the files passed over, a JSON list of
    [path, reason] ("" when none; a file name may hold a tab or a newline), for UnreadableImages.add."""

    def __init__(self, base, seed: int, max_tries: int = 16):
        self.base, self.seed, self.max_tries = base, seed, max_tries

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        sample_seed = seed_of("data", self.seed, epoch, index)
        skipped, error = [], None
        for attempt in range(self.max_tries):
            py_state = random.getstate()
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed)  # the CPU's alone: torch.manual_seed also queues
                # every accelerator's seeding (each with a stack trace, 0.39 ms a sample in a worker) and, in the main
                # process (--num_workers 0), would reseed the GPU's generator, which fork_rng(devices=[]) leaves
                random.seed(sample_seed)
                try:
                    return (*self.base[(index + attempt) % len(self.base)], json.dumps(skipped) if skipped else "")
                except data.UnreadableImage as e:
                    skipped.append([str(e.path), str(e)])
                    error = e
                except FileNotFoundError as e:  # listed at start-up, gone now: hours into a run, skip it as above
                    why = ("a symbolic link to a file that does not exist" if e.filename and os.path.islink(e.filename)
                           else "file not found, deleted or moved since the dataset was listed")
                    skipped.append([str(e.filename), f"{why} ({e})"])
                    error = e
                finally:
                    random.setstate(py_state)
        raise ValueError(f"{self.max_tries} images in a row cannot be read, {skipped[0][0]} to {skipped[-1][0]} "
                         f"({error}), which stops the run whatever --max_unreadable allows: is the dataset intact? "
                         f"Repair or remove them")


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of an epoch as (epoch, index) keys for SeededSamples: torch's DistributedSampler order
    (rank r takes entries r, r + W, ..., the tail that does not divide evenly dropped), shuffled by a hash of the seed
    plus the epoch: DistributedSampler shuffles by seed + epoch, so seed 1's epoch 0 would be seed 0's epoch 1.
    set_epoch(epoch, skip) starts after `skip` samples (those a resumed run already trained on) without loading them."""

    def __init__(self, num_items: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        if num_items < world_size:
            raise ValueError(f"{num_items} training images cannot be shared by {world_size} processes; use at "
                             f"least {world_size} images or fewer processes (torchrun --nproc_per_node)")
        self.num_items, self.rank, self.world_size, self.shuffle = num_items, rank, world_size, shuffle
        self.seed = seed_of("order", seed) >> 2  # DistributedSampler's seed, to which it adds the epoch
        self.per_rank, self.epoch, self.skip = num_items // world_size, 0, 0  # drop_last: the tail is dropped

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        return iter([(self.epoch, i) for i in self._indices()[self.skip:].tolist()])

    def _indices(self) -> torch.Tensor:
        """DistributedSampler's indices of this rank, taken from the permutation as a tensor: its own list of every
        index (14M Python ints for ImageNet-22k) cost each rank 1.1 s and a 640 MB peak per epoch, 446 MB kept."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_items, generator=generator) if self.shuffle else torch.arange(self.num_items)
        return order[self.rank:self.per_rank * self.world_size:self.world_size]

    def __len__(self):
        return self.per_rank - self.skip


# the training loaders of this process (train_loader), held until stop_loader_workers (teardown): a loader freed as
# the trainer's frame ended had its workers joined in its iterator's __del__, where Python swallowed a Ctrl-C (it
# printed "Exception ignored in: ... __del__" and a traceback, and main returned as if not interrupted)
_loaders = []


def train_loader(dataset, args, d: Dist):
    """(DataLoader of SeededSamples batches, its EpochSampler, optimizer steps per epoch) for a training set."""
    check_ranks_agree(d, "the number of training images", len(dataset), _SAME_FILES)
    sampler = EpochSampler(len(dataset), d.rank, d.world_size, args.seed)
    loader = torch.utils.data.DataLoader(
        SeededSamples(dataset, args.seed), batch_size=args.batch_size, sampler=sampler, drop_last=True,
        num_workers=args.num_workers, pin_memory=d.device.type == "cuda", persistent_workers=args.num_workers > 0)
    _loaders.append(loader)
    steps_per_epoch = sampler.per_rank // args.batch_size // args.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"{sampler.per_rank} training images per process give no full optimizer step of "
                         f"--batch_size {args.batch_size} x --accum_iter {args.accum_iter}; use a smaller batch or "
                         f"more images (with several processes: or fewer processes, torchrun --nproc_per_node)")
    return loader, sampler, steps_per_epoch


def stop_loader_workers():
    """Stop the persistent workers of the training loaders (teardown) and let go of the loaders. A run stopped by an
    error or Ctrl-C inside main(argv) left its --num_workers processes running for as long as the exception was kept (a
    notebook keeps the last one, a sweep may keep each): the traceback holds the trainer's frame, hence its loader and
    the workers, which torch keeps in loader._iterator and stops only when that is freed."""
    for loader in list(_loaders):
        workers = getattr(loader, "_iterator", None)  # torch's own attribute names (2.11 to 2.15): best effort
        if hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()
    _loaders.clear()


def micro_batches(loader, sampler: EpochSampler, steps_per_epoch: int, accum_iter: int, start_step: int):
    """The micro-batches of optimizer steps start_step, start_step + 1, ... epoch after epoch, without end:
    steps_per_epoch * accum_iter batches per epoch (a trailing partial step is dropped). A start mid-epoch skips the
    batches already trained on without loading them."""
    epoch, done = divmod(start_step, steps_per_epoch)
    while True:
        sampler.set_epoch(epoch, skip=done * accum_iter * loader.batch_size)
        yield from itertools.islice(loader, (steps_per_epoch - done) * accum_iter)
        epoch, done = epoch + 1, 0


def shard_indices(num_items: int, d: Dist) -> range:
    """Indices evaluated by rank d.rank: rank, rank + W, ... Every index on exactly one rank, none padded or repeated,
    given that every rank lists the same items: the counts are checked (each rank shards its own listing, so a
    node's copy of the data with a file less would skip some items and count others twice)."""
    check_ranks_agree(d, "the number of validation samples", num_items, _SAME_FILES)
    return range(d.rank, num_items, d.world_size)


@dataclass
class UnreadableImages:
    """Training images SeededSamples skipped, over all ranks. The run stops once more than `limit` distinct files
    were unreadable (a few bad files in a large dataset are skipped; a broken dataset is not trained on)."""
    limit: int
    seen: set = field(default_factory=set)  # the files named, relative to root (as checkpoints store them)
    pending: dict = field(default_factory=dict)  # path -> why it could not be read
    root: str = None  # the training data's folder (None: paths as read), so a moved or respelled one is the same run's

    def name(self, path: str) -> str:
        """A file's name in `seen`: its path relative to root."""
        return os.path.relpath(path, self.root) if self.root else path

    def add(self, skipped):
        """skipped: the batch's last field, one string per sample ("" or SeededSamples' JSON list of [path, reason])."""
        for path, reason in (pair for text in skipped if text for pair in json.loads(text)):
            self.pending[path] = reason


def unreadable_images(max_unreadable: float, num_images: int, checkpoint: dict = None,
                      root: str = None) -> UnreadableImages:
    """UnreadableImages of a run over num_images (--max_unreadable: a fraction of them) in the folder root. A resumed
    run starts with the files its checkpoint says the run already named ("unreadable_files", relative to the data's
    folder, so a relaunch with the data moved or given by another path knows them; older checkpoints' paths as read,
    "unreadable_images", from their launch's cwd), so each is named once per run and the limit counts the run's, not
    this launch's."""
    checkpoint = checkpoint or {}
    limit = int(fractions.Fraction(repr(max_unreadable)) * num_images)  # as written: 0.29 * 100 is 28.999999999999996
    images = UnreadableImages(limit=limit, seen=set(checkpoint.get("unreadable_files", [])), root=root)
    old = checkpoint.get("unreadable_images", [])  # older checkpoints: the paths as read, from the launch's cwd
    if root:
        old = [images.name(os.path.join(checkpoint.get("cwd") or "", path)) for path in old]
    images.seen.update(old)
    return images


def unreadable_for_checkpoint(images: UnreadableImages, d: Dist, step: int, log) -> list:
    """Collective: names the files skipped since the last report (report_unreadable), so the checkpoint's data
    position does not pass them unnamed, and returns all the run's, for its checkpoint ("unreadable_files")."""
    report_unreadable(images, d, step, log)
    return sorted(images.seen)


def report_unreadable(images: UnreadableImages, d: Dist, step: int, log):
    """Collective (every rank calls it at the same step): gathers the newly skipped files of all ranks, names each
    once on rank 0 with why it could not be read (printed, and logged as {"step", "skipped_image", "reason"}), stops
    when there are more than the limit."""
    new = sorted(images.pending.items())
    images.pending.clear()
    if d.world_size > 1:
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, new)
        new = sorted(dict(pair for rank in gathered for pair in rank).items())
    for path, reason in new:
        name = images.name(path)
        if name not in images.seen:
            images.seen.add(name)
            d.print(f"skipped an unreadable image ({len(images.seen)} so far): {reason or path}")
            log(step=step, skipped_image=path, **({"reason": reason} if reason else {}))
    if len(images.seen) > images.limit:
        count = f"{len(images.seen)} training image{'s' if len(images.seen) > 1 else ''}"
        examples = [os.path.join(images.root or "", name) for name in sorted(images.seen)[:3]]
        raise ValueError(f"{count} could not be read (more than {images.limit}, "
                         f"--max_unreadable), e.g. {examples}; the reasons are printed above and in "
                         f"log.jsonl: repair or remove those files, or raise --max_unreadable")


class _Probe(torch.utils.data.Dataset):
    """dataset[i] loaded and thrown away -> ("", count) if it worked, else (the error, 0) (for check_dataset). Where the
    dataset has load(i) (data.ImageFolder, data.SegFolder: the decoded files, label values checked), that, without the
    transform (the resize and crop took two thirds of the time: 2.1 ms decoding, 6.2 ms with the transform, for a
    500x375 JPEG on one CPU thread). A failure only the transform raises (an image too thin to rescale) shows at the
    first evaluation instead. count(loaded sample) -> a numpy array summed over the samples (e.g. label pixels per
    value)."""

    def __init__(self, dataset, indices, count=None):
        self.dataset, self.indices, self.count = dataset, indices, count

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        try:
            loaded = getattr(self.dataset, "load", self.dataset.__getitem__)(self.indices[i])
            return "", self.count(loaded) if self.count else 0
        except (ValueError, FileNotFoundError) as e:  # data.UnreadableImage, a bad label map, a file gone since listed
            return str(e), 0


def check_dataset(dataset, d: Dist, num_workers: int, count=None):
    """Load every sample of the validation set `dataset` once (each rank its shard, in DataLoader workers) and fail
    naming the first that cannot be used (and how many cannot), before training: evaluation must count every image.
    Returns the sum over all samples (all ranks) of count(loaded sample), or 0 without count."""
    probe = _Probe(dataset, shard_indices(len(dataset), d), count)
    loader = torch.utils.data.DataLoader(probe, batch_size=32, num_workers=num_workers, collate_fn=list)
    errors, total = [], 0
    for batch in loader:
        errors += [e for e, _ in batch if e]
        total = sum((c for _, c in batch), total)
    if d.world_size > 1:
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, (errors, total))
        errors, total = sum((e for e, _ in gathered), []), sum(t for _, t in gathered)
    if errors:
        raise ValueError(f"{len(errors)} of the {len(dataset)} validation samples cannot be used; first: {errors[0]}"
                         + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    return total


# ---------------------------------------------------------------------------------------------------
# Runs: output folder, checkpoints, resume, log


def demo_help(defaults: dict, extra: str = "") -> str:
    """--help's epilog: the defaults the demo (a trainer run without data) uses in place of the ones listed above."""
    flags = [f"--{k} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in defaults.items()]
    return f"The demo (no data given) uses instead: {', '.join(flags)}{extra}."


def given_on_command_line(parser, argv, names) -> set:
    """The flags among `names` that the command line argv sets (also to its default): argv parsed again with a marker
    as their default."""
    marker, defaults = object(), {name: parser.get_default(name) for name in names}
    parser.set_defaults(**dict.fromkeys(names, marker))
    try:
        marked = parser.parse_args(argv)
    finally:
        parser.set_defaults(**defaults)
    return {name for name in names if getattr(marked, name) is not marker}


def from_checkpoint_unless_given(args, parser, argv, names):
    """With --eval: the flags `names` that the command line argv does not set become None, to be taken from the
    checkpoint (take_from_checkpoint); given ones are kept (also one equal to its default), to be checked against it."""
    given = given_on_command_line(parser, argv, names)
    for name in names:
        if name not in given:
            setattr(args, name, None)


def refuse_idle_recipe(args, parser, argv, recipes: dict):
    """A --recipe other than the default whose every value the command line sets itself would do nothing: refused."""
    sets = list(recipes[args.recipe])
    if args.recipe != parser.get_default("recipe") and given_on_command_line(parser, argv, sets) == set(sets):
        raise ValueError(f"--recipe {args.recipe} would do nothing: it sets {' and '.join('--' + n for n in sets)}, "
                         f"which the command line sets itself: leave it out")


def _data_flags(saved: dict, flags: list) -> str:
    """A run's own data flags, as they were passed (for a message)."""
    return " ".join(f"--{f} {shlex.quote(str(saved[f]))}" for f in flags if saved.get(f) is not None) or "see its args"


def refuse_demo_eval(args, saved: dict, path: str, flags: list, how: str):
    """--eval without data evaluates on the demo's built-in images: refused for a checkpoint of a run on real data
    (it would fail on the classes, or measure nothing), quoting the run's own data flags; `how`: the flags to pass."""
    if args.demo and saved.get("demo") is False:
        raise ValueError(f"--eval {path!r} was trained on real data ({_data_flags(saved, flags)}) and no validation "
                         f"data is given, so the demo's built-in images would be evaluated: pass the validation data "
                         f"({how})")


def refuse_demo_resume(args, saved: dict, resumed: str, flags: list, how: str):
    """A launch without data is the demo: refused where it would continue a run on real data (a relaunch that forgot
    --data went on training that run on the demo's built-in images, or was told to start over: --fresh, which would
    delete its checkpoint), quoting the run's own data flags; `how`: the flags to pass. A launch with data is refused
    where it would continue a demo run (its weights, optimizer and step went on training on the real data, with only
    a note of the changed data flags)."""
    if args.demo and saved.get("demo") is False:
        raise ValueError(f"{run_name(args, resumed)} holds a run on real data ({_data_flags(saved, flags)}); without "
                         f"data this launch is the demo, which would continue that run on its built-in images: pass "
                         f"the run's data ({how}) to continue it, or another --output_dir for the demo")
    if not args.demo and saved.get("demo") is True:
        raise ValueError(f"{run_name(args, resumed)} holds a demo run (on the built-in images), which this launch "
                         f"would continue on its data: to start a new run {new_run_hint(args, resumed)}"
                         f"{init_note(args)}")


def take_from_checkpoint(args, saved: dict, names, path: str, must_agree: bool = True):
    """Fill the flags that from_checkpoint_unless_given left None from the checkpoint's args `saved`; a given flag
    that disagrees with the checkpoint is an error (must_agree: model and input flags), else it wins (data flags)."""
    for name in names:
        given = getattr(args, name)
        if given is None:
            setattr(args, name, saved[name])
        elif must_agree and _plain(given) != _plain(saved[name]):  # the caller resolves a recorded None (default)
            raise ValueError(f"--{name} {given} differs from the {saved[name]} that {path!r} was trained with, which "
                             f"--eval uses: leave --{name} out")


def set_run_length(args, new_run: dict, saved_args: dict = None):
    """The run-length flags of new_run ({flag: a new run's value}, e.g. epochs and warmup) left out (None): a continued
    run's own (saved_args, its checkpoint's), else new_run's, so that a relaunch without them continues its run as
    it was. Every trainer's set_schedule."""
    for name, value in new_run.items():
        if getattr(args, name) is None:
            setattr(args, name, (saved_args or {}).get(name, value))


def refuse_ignored(args, parser, names, why: str):
    """Flags set away from their defaults where they would do nothing (`why`) are an error, not silently ignored."""
    given = [f"--{'no-' if getattr(args, name) is False and parser.get_default(name) is None else ''}{name}"
             for name in names if getattr(args, name) != parser.get_default(name)]  # --no-X: a BooleanOptionalAction
    if given:
        raise ValueError(f"{', '.join(given)} would do nothing {why}: leave {'it' if len(given) == 1 else 'them'} out")


def refuse_ignored_in_demo(args, parser):
    """The flags every trainer's demo ignores, given away from their defaults, are an error (refuse_ignored)."""
    if args.demo:
        refuse_ignored(args, parser, ["max_unreadable"], "in the demo (its built-in images are never unreadable)")


def finite_float(text: str) -> float:
    """The trainers' type for float flags (trainer_parser registers it for type=float): float() takes "nan" and
    "inf", and NaN passes every range check (each comparison is False), so --lr nan would train on NaN."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def nonempty_text(text: str) -> str:
    """The trainers' type for flags without one (paths): an empty value, as an unset shell variable gives
    (`--data "$IMAGENET"`), read as no value where the code tests the flag's truth: the demo's images trained on, or
    --eval "" a training run. A leading ~ is the home folder, as the shell would have it: the shell leaves it as it
    is after '=' (--output_dir=~/runs) and in quotes, and the run then wrote into a folder named '~' here."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty (an unset shell variable?): give a value")
    return os.path.expanduser(text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The trainers' --help: each flag with its default, but no "(default: None)" after a flag whose default is
    resolved later (by --model, by a continued run, in the demo) and said in its own help text."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def trainer_parser(description: str, epilog: str) -> argparse.ArgumentParser:
    """The parser every trainer starts from: HelpFormatter's --help, every type=float flag read by finite_float and
    every flag without a type by nonempty_text (argparse looks its types up in the parser's registry, which argument
    groups share; None is the type of a flag given none)."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    parser.register("type", float, finite_float)
    parser.register("type", None, nonempty_text)
    return parser


def add_run_args(parser, output_dir: str):
    """The flags every trainer shares for its output folder, checkpoints and log."""
    g = parser.add_argument_group("run (see README: Runs, checkpoints and logs)")
    g.add_argument("--output_dir", default=output_dir, help="checkpoints and logs")
    g.add_argument("--resume", default="auto", help="'auto': continue output_dir/checkpoint-last.pth if it exists "
                   "(relaunching a command continues its run); or the path of a checkpoint to continue")
    g.add_argument("--fresh", action="store_true", help="start over in an output_dir that holds a run: its "
                   "checkpoint-last.pth is removed, its log.jsonl kept as log.N.jsonl; its other checkpoints stay "
                   "until the new run writes files of the same name. With --resume PATH: the folder's run is "
                   "replaced by PATH's, continued")
    g.add_argument("--log_every", type=int, default=50, help="optimizer steps per log.jsonl line")
    g.add_argument("--seed", type=int, default=0, help="seeds every random draw: new weights, data order, "
                   "augmentation, drop path (pre-training: also masks and morphing schedules)")
    return g


def prepare_run(args, d: Dist, reads: dict = None, new_run_reads: dict = None) -> tuple:
    """Decide where the run starts -> (checkpoint path to resume or None, True if that is output_dir's own).

    --resume auto continues output_dir/checkpoint-last.pth if there is one (as the official code's --auto_resume, on
    by default: naver-ai/dtm run_pretrain_dtm.py, utils/utils.py auto_load_last_model); --fresh starts over instead;
    --resume PATH continues PATH, into an output_dir that holds no other run (or one whose checkpoint-last.pth a launch
    with the same --resume PATH saved, which it continues: launched_with_resume). With --fresh, open_log removes that
    run's checkpoint-last.pth once the new run's model is built (an --init that cannot be read or does not fit fails
    first and leaves it in place). reads / new_run_reads: {flag: path} of checkpoints the run reads at every launch
    (the teacher) / when it starts (--init); refused where the run writes over them.
    Rank 0 also removes the temporary files an interrupted save left behind."""
    last = os.path.join(args.output_dir, LAST)
    for flag, path in {**(reads or {}), **({} if continues_a_run(args) else new_run_reads or {})}.items():
        if path and _written_by_runs_in(args.output_dir, path):
            raise ValueError(f"{flag} {path!r} is a checkpoint that this run writes in --output_dir "
                             f"{args.output_dir!r} (and --fresh removes {LAST} there): copy it elsewhere, or pass "
                             f"another --output_dir")
    # before anything is read: a second run into the folder would continue the first one's checkpoint; every rank
    # stops (rank 0 alone would leave the others failing in the agreement below with a bare connection error)
    held = [lock_output_dir(args.output_dir) if d.is_main else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(held, src=0)
    if held[0]:
        raise ValueError(held[0])
    # rank 0's refusal there stops every rank (alone, it left the others dying in the agreement below)
    build_on_all_ranks(d, _remove_interrupted_saves if d.is_main else lambda _: None, args.output_dir, fix=None)
    if d.is_main:  # what open_log may remove: a LAST that appears later is another run's (a folder made meanwhile)
        _saw_last[os.path.abspath(args.output_dir)] = (os.path.isfile(last), args.resume)
    try:  # every rank reaches the agreement below, also one whose own view is an error (a file on one node only)
        start, error = _run_start(args, last), None
        view = f"continues {start[0]} ({_checkpoint_identity(start[0])})" if start[0] else "a new run"
    except (ValueError, OSError) as e:
        error, view = e, f"error: {e}"
    # also the barrier --fresh needs: every rank has looked at checkpoint-last.pth before rank 0 removes it (open_log)
    check_ranks_agree(d, "where the run starts", view, "--output_dir must be one folder that every process sees (a "
                      "shared file system), and so must a --resume PATH; on a shared file system a node may not see "
                      "a file just written yet: relaunch in a moment")
    if error is not None:
        raise error
    return start


def _checkpoint_identity(path: str) -> str:
    """A checkpoint's size, step and a digest of the settings it records, read without its tensors (mmap), for
    prepare_run's agreement: copies of one checkpoint on several nodes agree; two runs' checkpoints, or one run's at two
    steps, do not, also where their sizes are equal (node-local folders that each hold one: each rank continued its
    own node's; ranks at other steps hung, ranks at one step trained on other optimizer states and their weights drifted
    apart). A file torch cannot read by mmap: its size alone (load_checkpoint names what is wrong with it)."""
    size = f"{os.path.getsize(path)} bytes"
    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return f"step {saved['step']}, {size}, settings {seed_of(sorted(saved['args'].items())) % 10 ** 6:06d}"
    except Exception:  # not a checkpoint of this repo, or not a zip file
        return size


def _remove_interrupted_saves(output_dir: str):
    """prepare_run's removal (rank 0) of the temporary files that interrupted saves left in output_dir."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if ".pth.tmp" in name or name == f"{LOG}.tmp":  # a checkpoint's or the cut log's (open_log)
            try:
                os.remove(os.path.join(output_dir, name))
            except OSError as e:  # a read-only file system, another user's folder
                raise ValueError(cannot_write_output_dir(output_dir, e)) from e
            print(f"removed {name} (left by an interrupted save)")


def _newest_last(name: str) -> tuple:
    """Sort key of a folder's .pth files: other files, then a run's checkpoint-best.pth, then its epochs' by number
    (checkpoint-19.pth after checkpoint-5.pth, which sorted as text came last)."""
    run = RUN_CHECKPOINT.fullmatch(name)
    return (2, int(run[1]), name) if run and run[1].isdigit() else (1 if run else 0, 0, name)


def _run_start(args, last: str) -> tuple:
    """prepare_run's decision on this rank -> (checkpoint path to resume or None, True if that is output_dir's own)."""
    if args.resume == "auto":
        return (None, False) if args.fresh or not os.path.isfile(last) else (last, True)
    if not args.fresh and os.path.isfile(last) and launched_with_resume(last, args.resume):
        return last, True  # the same command relaunched (a requeued job): it goes on, also where PATH is gone since
    if os.path.isdir(args.resume):
        if os.path.isfile(os.path.join(args.resume, LAST)):
            raise FileNotFoundError(f"--resume {args.resume!r} is a folder; pass a checkpoint file "
                                    f"({shlex.quote(os.path.join(args.resume, LAST))}), or --output_dir "
                                    f"{shlex.quote(args.resume)} without --resume to continue the run there")
        # no run there to continue: neither its checkpoint-last.pth nor --output_dir would continue anything
        found = sorted((name for name in os.listdir(args.resume) if name.endswith(".pth")), key=_newest_last)
        raise FileNotFoundError(f"--resume {args.resume!r} is a folder that holds no run ({LAST}); pass a checkpoint "
                                f"file" + (f", e.g. {shlex.quote(os.path.join(args.resume, found[-1]))}" if found else
                                           " (it holds no .pth file)"))
    if not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume {args.resume!r}: no such file; pass a checkpoint file (a run's {LAST} "
                                f"in its --output_dir), or leave --resume out to continue the run in --output_dir")
    resuming_last = os.path.isfile(last) and os.path.samefile(last, args.resume)
    if os.path.isfile(last) and not resuming_last and not args.fresh:
        raise ValueError(f"--output_dir {args.output_dir!r} holds another run ({LAST}); continuing {args.resume!r} "
                         f"there would overwrite it: pass another --output_dir, or --fresh to replace that run (or, "
                         f"to continue the run there, --resume auto)")
    return args.resume, resuming_last


def launched_with_resume(last: str, path: str) -> bool:
    """Whether the run that wrote last was launched with --resume path (its continuation of path's run, which the
    same command, relaunched as a requeued job is, continues). Reads the checkpoint's small entries only (mmap)."""
    try:
        saved = torch.load(last, map_location="cpu", mmap=True, weights_only=True)
        recorded = saved.get("resume_abspath") or saved["args"]["resume"]  # older checkpoints: as it was given
    except Exception:  # not a checkpoint of this repo: the refusal names the folder's file
        return False
    return recorded != "auto" and same_path(moved_with_run(saved, last, recorded), path)


def new_run_hint(args, resumed: str) -> str:
    """How to start a new run in output_dir instead of continuing the checkpoint `resumed`, as a fix to print: one
    that prepare_run accepts (--fresh does not start a new run while --resume PATH names a checkpoint, nor with an
    --init that the runs in output_dir write: then only another --output_dir is offered)."""
    last, resume = os.path.join(args.output_dir, LAST), getattr(args, "resume", "auto")
    init = getattr(args, "init", None)
    if init and _written_by_runs_in(args.output_dir, init):
        other_dir = f"pass another --output_dir (a new run in {args.output_dir} writes over --init {init})"
        return other_dir if resume == "auto" else f"leave out --resume {resume} and {other_dir}"
    fresh = "add --fresh (the old log is kept as log.N.jsonl) or pass another --output_dir"
    if resume == "auto":
        return fresh
    if os.path.isfile(last) and os.path.isfile(resumed) and os.path.samefile(last, resumed):
        return f"leave out --resume {resume} and either {fresh}"
    return f"leave out --resume {resume}"


def init_note(args) -> str:
    """Appended to a new-run hint for a trainer whose new runs need --init, which a relaunch may have left out (the
    demos choose their own)."""
    needs_init = "init" in vars(args) and not getattr(args, "demo", False)
    return " (a new run needs --init PATH or --init none)" if needs_init else ""


def run_name(args, resumed: str) -> str:
    """The run a message is about: output_dir where --resume auto found it, else the checkpoint it continues
    (`resumed`: PATH, or output_dir's checkpoint-last.pth where a requeued --resume PATH command continues that)."""
    return args.output_dir if args.resume == "auto" else repr(resumed)


STRETCHED = " (the lr schedule is then stretched over the new length: the lr goes back up)"


def say_finished(args, resumed: str, step: int, last_step: int, flag: str, d: Dist):
    """The line a relaunch of a finished run prints (it then does nothing): how to train on, or start over."""
    where = f"step {step} of {last_step}" if step <= last_step else f"step {step}, past this run's {last_step}"
    d.print(f"{run_name(args, resumed)} holds a finished run ({where}): nothing to do; raise {flag} "
            f"to train on{STRETCHED if flag != '--max_steps' else ''}, or {new_run_hint(args, resumed)} to start "
            f"over{init_note(args)}")


def continues_a_run(args) -> bool:
    """Whether prepare_run will continue a run (--resume PATH, or output_dir's checkpoint-last.pth without --fresh)."""
    return args.resume != "auto" or (not args.fresh and os.path.isfile(os.path.join(args.output_dir, LAST)))


def init_started_from(checkpoint: dict):
    """The --init a checkpoint's run started from: its absolute path where recorded (the run may relaunch elsewhere)."""
    return checkpoint.get("init_abspath") or checkpoint["args"].get("init")


def _written_by_runs_in(output_dir: str, path: str) -> bool:
    """Whether path, or the file it links to, is one that a run in output_dir writes: checkpoint-last.pth,
    checkpoint-best.pth or checkpoint-{epoch}.pth there."""
    if not (os.path.isfile(path) and os.path.isdir(output_dir)):
        return False
    return any(RUN_CHECKPOINT.fullmatch(os.path.basename(p))
               and os.path.samefile(os.path.dirname(os.path.abspath(p)), output_dir)
               for p in (path, os.path.realpath(path)))


def json_number(value):
    """NaN and infinities -> None (null): JSON has no such numbers, and strict readers (jq, JavaScript) refuse them.
    With fp16's GradScaler a step whose gradients overflowed (skipped) has a non-finite gradient norm."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def append_eval(output_dir: str, record: dict):
    """--eval's result: one JSON line appended to output_dir/eval.jsonl (a training run's log.jsonl is left alone);
    NaN/inf as null; says where. Call on rank 0."""
    path = os.path.join(output_dir, "eval.jsonl")
    try:
        os.makedirs(output_dir, exist_ok=True)
        # after half a line (a full disk cut the last result short) on a line of its own: appended to it, it was
        # unreadable too, while this said it was appended
        new_line = "\n" if _ends_in_half_a_line(path) else ""
        with open(path, "a") as f:
            f.write(new_line + json.dumps({k: json_number(v) for k, v in record.items()}) + "\n")
    except OSError as e:
        raise OSError(f"could not write the result to {path} ({e.strerror or e}): {write_fix(e, path)}; the result "
                      f"is printed above") from e
    print(f"result appended to {path}", flush=True)


def _ends_in_half_a_line(path: str) -> bool:
    """Whether the file at path ends in a line without its newline (False where it is empty, missing, or no regular
    file, e.g. a link to /dev/stdout)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # EDQUOT: a user's quota on a cluster's shared disk


def write_fix(e: OSError, path: str) -> str:
    """What to do about a refused write of path (a file in --output_dir), by its error e."""
    folder = os.path.dirname(os.path.abspath(path))
    if e.errno in DISK_FULL:
        return "its disk is full, or your quota there is used up: free space there, or pass another --output_dir"
    if e.errno == errno.ENOENT and not os.path.isdir(folder):  # a colleague's rm -rf, a clean-up job
        return f"{folder} was removed while the run wrote there"
    return "pass a folder you can write to, or change its permissions"


def cannot_write_output_dir(output_dir: str, e: OSError) -> str:
    """The start-up refusal of an --output_dir that a file cannot be written or removed in (e: the OSError)."""
    fix = write_fix(e, os.path.join(output_dir, LOG))
    return f"--output_dir {output_dir!r} cannot be written to ({e.strerror or e}): {fix}"


def open_log(output_dir: str, resumed, enabled: bool, finished: bool = False, on_kept=None) -> "JsonLog":
    """-> log(**fields), which appends one JSON line to output_dir/log.jsonl (rank 0 only; `enabled`).

    A resumed run (resumed: the checkpoint it continues, from this output_dir) keeps the lines the log held when the
    checkpoint was saved (its log_lines; older checkpoints: the lines up to its step) and drops the rest (written
    after the checkpoint by a run that then died, or half-written), so no line repeats, also where a new batch size
    renumbered the steps; a new run (resumed None) starts a new log (made now, empty) and keeps an old one with lines
    as log.N.jsonl. A new run also removes the previous run's checkpoint-last.pth (which prepare_run found and let it
    replace: --fresh), so a relaunch without --fresh after a crash before the new run's first save does not continue
    the old run. A finished run continued from another folder's checkpoint (finished, resumed None) trains nothing: it
    leaves output_dir as it is (but for the run lock, RUN_LOCK) and logs nothing. Every rank calls it (rank 0 with
    enabled): a folder rank 0 cannot write to, or one that another run took since prepare_run (its run lock, or a
    checkpoint-last.pth it wrote), stops every rank here, before training, with one ValueError. on_kept(record): called
    with each line a resumed run keeps (a dict), in order; they are not held (a long run's log can hold millions)."""
    path, last = os.path.join(output_dir, LOG), os.path.join(output_dir, LAST)
    kept, enabled, error = 0, enabled and not (finished and resumed is None), None
    if enabled:
        try:
            os.makedirs(output_dir, exist_ok=True)
            error = lock_output_dir(output_dir)  # a folder made by this run: no other run had it at prepare_run
            saw_last, resume = _saw_last.get(os.path.abspath(output_dir), (True, "auto"))
            if not error and resumed is None and os.path.isfile(last) and not saw_last:
                error = (f"--output_dir {output_dir!r} holds a {LAST} that another run wrote after this one started: "
                         f"pass another --output_dir, or relaunch " + (
                             "without --fresh to continue that run, or with it to replace that run" if resume == "auto"
                             else "with --fresh to replace that run"))
            kept = 0 if error else _open_log(output_dir, path, last, resumed, on_kept or (lambda record: None))
        except OSError as e:  # at start-up, not at the first log line or save (50 steps in by default)
            error = cannot_write_output_dir(output_dir, e)
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank stops, not rank 0 alone
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise ValueError(error)
    return JsonLog(path, enabled, kept)


def _open_log(output_dir, path, last, resumed, on_kept) -> int:
    """open_log's files on rank 0 -> how many lines a resumed run keeps."""
    kept = 0
    if resumed is None and os.path.isfile(last):
        os.remove(last)
        print(f"--fresh: removed the previous run's {last}", flush=True)
    if resumed is None:
        if os.path.isfile(path) and os.path.getsize(path):  # an empty one: a run that logged nothing, reused
            n = next(n for n in itertools.count(1) if not os.path.exists(os.path.join(output_dir, f"log.{n}.jsonl")))
            os.replace(path, os.path.join(output_dir, f"log.{n}.jsonl"))
            print(f"new run: the previous {path} is kept as log.{n}.jsonl", flush=True)
    elif os.path.isfile(path):
        with open(path) as f, open(f"{path}.tmp", "w") as out:  # a kill while rewriting leaves the old log whole
            kept = _cut_log(f, out, resumed, on_kept)
        replace_durably(f"{path}.tmp", path)
    open(path, "a").close()  # a new run's log, written at its first line: made now, so a refusal comes now
    return kept


def _cut_log(f, out, resumed: dict, on_kept) -> int:
    """Copy the lines of log f that a resumed run keeps to out, one at a time (a 1600-epoch run logging every step
    holds 2M lines; read whole, 5 GB): those the log held when the checkpoint was saved (its log_lines; older
    checkpoints: the lines up to its step). A log shorter than that (cut short) keeps its lines up to the last one
    written before the checkpoint: those after it are a dead run's. -> how many lines it kept."""
    limit, complete, torn, kept, held = resumed.get("log_lines"), 0, 0, 0, []
    for line in f:
        if not line.strip():
            continue
        record = _json_or_none(line)
        if record is None:  # a run killed while writing a line leaves half a line
            torn += 1
            continue
        complete += 1
        if limit is None and record.get("step", 0) <= resumed["step"]:
            kept += _keep(out, [(line, record)], on_kept)
        elif limit is not None and complete <= limit:  # held until a line written before the checkpoint follows
            held.append((line, record))
            if not _after_checkpoint(record, resumed):
                kept, held = kept + _keep(out, held, on_kept), []
    if torn:
        print(f"{f.name}: dropped {torn} line(s) that are not complete JSON (written when a run was killed)",
              flush=True)
    if limit is not None and complete < limit:
        print(f"{f.name} holds {complete} complete lines, the checkpoint was saved when it held {limit}: the log was "
              f"cut short; this run appends to what is left", flush=True)
    elif held:  # the lines the checkpoint saw, whatever their steps
        kept += _keep(out, held, on_kept)
    return kept


def _keep(out, lines: list, on_kept) -> int:
    """Write [(line, record)] to out, each ending in a newline (a whole last line can have lost its own, in a node
    crash: the next line would be appended to it), and pass each record to on_kept -> how many."""
    for line, record in lines:
        out.write(line if line.endswith("\n") else line + "\n")
        on_kept(record)
    return len(lines)


def _after_checkpoint(record: dict, checkpoint: dict) -> bool:
    """Whether a log line is one written after the checkpoint was saved: by its epochs done where it has them (a resume
    with another number of steps per epoch renumbers the steps, so a line before the checkpoint may hold a higher
    step), else by its step."""
    if "epochs_done" in record and "steps_per_epoch" in checkpoint:
        return record["epochs_done"] > epochs_done(checkpoint["step"], checkpoint["steps_per_epoch"])
    return record.get("step", 0) > checkpoint["step"]


class JsonLog:
    """log(**fields): one JSON line (tensors as numbers, NaN/inf as null); .lines: how many the log holds, saved in
    checkpoints as log_lines so that a resumed run knows where to cut."""

    def __init__(self, path: str, enabled: bool, lines: int = 0):
        self.path, self.enabled, self.lines = path, enabled, lines

    def __call__(self, **fields):
        if self.enabled:
            fields = {k: json_number(v.item() if torch.is_tensor(v) else v) for k, v in fields.items()}
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(fields) + "\n")
            except OSError as e:  # a half line it may leave: dropped when the run is continued (open_log)
                raise OSError(f"could not write a line to {self.path} ({e.strerror or e}): {write_fix(e, self.path)}; "
                              f"then relaunch the same command (it continues from the {LAST} there, if any)") from e
            self.lines += 1


def _json_or_none(line: str):
    """A log line's record, or None where the line is not a JSON object (half a line, or damaged: [1, 2], 7)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def epochs_done(step: int, steps_per_epoch: int) -> float:
    """The log's x that a resume cannot renumber: epochs done after `step`, with the fraction of the current one (a
    run resumed with another number of steps per epoch renumbers its steps, not its epochs)."""
    return round(step / steps_per_epoch, 6)


def checkpoint_state(kind: str, model, optimizer, scaler, args, step: int, steps_per_epoch: int,
                     train_images: int = None, **extra) -> dict:
    """The checkpoint dict: plain Python values and tensors only, so torch.load(path) reads it with its default
    weights_only=True. kind: "dtm_pretrain", "dtm_finetune" or "dtm_seg"; epoch: the epoch of the last step done;
    train_images: the size of the training set, whose epoch order a resumed run continues (resume)."""
    return {"kind": kind, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "step": step,
            "epoch": max(step - 1, 0) // steps_per_epoch, "steps_per_epoch": steps_per_epoch, "args": dict(vars(args)),
            "train_images": train_images,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1, "rng": rng_state(),
            "init_abspath": os.path.abspath(args.init) if getattr(args, "init", None) not in (None, "none")
            and (os.path.isabs(args.init) or os.path.exists(args.init)) else None,  # not a guess from this folder
            "resume_abspath": os.path.abspath(args.resume) if getattr(args, "resume", "auto") != "auto" else None,
            "cwd": launch_folder(), **extra}


def launch_folder():
    """The folder this process runs in (checkpoints' cwd), or None where it was removed since the launch (a clean-up
    job): os.getcwd() fails there, while a run that names its files by absolute paths reads and writes on."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        return None


def log_window_per_step(checkpoint: dict):
    """The checkpoint's log_window (the loss sums since the last log line, a trainer's own layout) in steps: a
    checkpoint saved before log_window_per_step summed micro-batches, so its sums and count are divided by its
    --accum_iter. None where it has none."""
    window = checkpoint.get("log_window")
    if window is None or checkpoint.get("log_window_per_step"):
        return window
    accum = checkpoint["args"].get("accum_iter", 1)
    if isinstance(window, dict):  # pre-training's: {names, sums, count}
        return {**window, "sums": window["sums"] / accum, "count": window["count"] // accum}
    return window / accum  # segmentation's: [loss, decode loss, aux loss sums, count]


# fsync refused as not supported by the file system (some FUSE, SMB and NFS mounts): the bytes are written all the same
FSYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)
_said_no_fsync = set()  # the folders whose file system refused it, said once each


def say_no_fsync(folder: str, e: OSError):
    """A note, once per folder, on a line of its own above a progress bar (as Dist.print; rank 0 saves)."""
    if folder not in _said_no_fsync:
        _said_no_fsync.add(folder)
        with tqdm.external_write_mode(file=sys.stdout):
            print(f"note: the file system of {folder} cannot fsync ({e.strerror}): its files are saved without "
                  f"waiting for the disk (a crash of the node may lose the latest)", flush=True)


def replace_durably(tmp: str, path: str):
    """os.replace(tmp, path) that a crash of the node cannot tear: tmp's bytes reach the disk before the rename, and
    the rename before this returns (fsync of the file, then of its folder). Without the first fsync, file systems
    such as XFS, NFS or Lustre may keep the rename and lose the bytes, leaving an empty file for the last good one. A
    file system that does not do fsync (FSYNC_UNSUPPORTED) gets the rename without it, said once (say_no_fsync)."""
    fd = os.open(tmp, os.O_RDWR)  # not read-only: Windows' fsync needs a writable handle
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in FSYNC_UNSUPPORTED:
            raise  # EIO: the bytes may not be on the disk, a failed save
        say_no_fsync(os.path.dirname(os.path.abspath(path)), e)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:  # the rename itself; some systems cannot open or fsync a folder, where only the data was at risk
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str, state: dict):
    """Every rank calls it; rank 0 writes, and where that fails every rank stops with its error (alone, rank 0
    stopped and the others died at their next collective with the process group's traceback). Refuses to write
    non-finite weights (FloatingPointError naming the last good checkpoint, which stays as it was); writes atomically
    (a temp file, then a rename) and durably (fsync)."""
    tensors = [t for t in state["model"].values() if t.is_floating_point()]
    if tensors and not torch.stack([t.isfinite().all() for t in tensors]).all():
        bad = [k for k, t in state["model"].items() if t.is_floating_point() and not t.isfinite().all()]
        stop_non_finite(f"parameters {bad[:3]}{' ...' if len(bad) > 3 else ''}", state["step"],
                        os.path.dirname(path))
    ranks = _world()
    build_on_all_ranks(ranks, _write_checkpoint if ranks.is_main else lambda *_: None, path, state, fix=None)


def _write_checkpoint(path: str, state: dict):
    """save_checkpoint's file, on rank 0."""
    tmp, folder = f"{path}.tmp{os.getpid()}", os.path.dirname(os.path.abspath(path))
    try:
        if not os.path.isdir(folder):  # removed meanwhile: made again, the run went on without a word (its log.jsonl
            # holding only the lines written after this save, its run lock gone)
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), folder)
        torch.save(state, tmp)
        replace_durably(tmp, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not any(s in str(e) for s in ("inline_container", "iostream", "Stream")):
            raise  # not the file writer's (a full disk, a refused write): a bug, with its traceback
        if os.path.exists(tmp):
            os.remove(tmp)
        if not os.path.isdir(folder):  # removed before the save or during it
            raise OSError(f"could not write {path}: {folder} was removed while the run wrote there; relaunch the "
                          f"same command (it continues from the {LAST} there, if any)") from e
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        kept = "the last good checkpoint there is left as it was" if os.path.isfile(path) else "nothing was written"
        raise OSError(f"could not write {path} (disk full, or no permission to write there?): {cause}; {kept}") from e


NON_FINITE_REMEDY = "a lower --lr, or a wider --amp where the run uses fp16 or bf16"  # its precision not known


def non_finite_remedy(amp_dtype, teacher_dtype=None) -> str:
    """What to relaunch a run whose loss stopped being finite with: a lower --lr, and a wider precision only where
    the run uses a narrower one (amp_dtype: the student's autocast dtype, None for fp32; teacher_dtype: the teacher's
    where it runs under autocast, None for fp32 or a teacher without weights)."""
    wider = {torch.float16: "bf16/fp32", torch.bfloat16: "fp32"}
    fixes = ["a lower --lr"] + [f"{flag} {wider[dtype]}" for flag, dtype in (("--amp", amp_dtype),
                                                                           ("--teacher_amp", teacher_dtype))
                                if dtype in wider]
    return f"{', '.join(fixes[:-1])} or {fixes[-1]}" if len(fixes) > 1 else fixes[0]


def refuse_non_finite_eval(bad: int, total: int, amp_dtype):
    """Stop an evaluation whose model gave outputs that are not finite on `bad` of `total` validation images (counted
    over all ranks, so every rank stops): NaN ranks first in torch.topk and argmax, so their predictions would be
    arbitrary classes (all-NaN segmentation logits: class 0 everywhere) in figures that look valid."""
    if not bad:
        return
    wider = {torch.float16: "--amp bf16/fp32 (fp16 overflows above 65504)", torch.bfloat16: "--amp fp32"}
    fix = (f"evaluate with {wider[amp_dtype]}, or, if its training diverged, retrain with a lower --lr"
           if amp_dtype in wider else "the model has diverged: retrain with a lower --lr")
    raise FloatingPointError(f"the model's output is not finite (NaN or inf) on {bad} of {total} validation images: "
                             f"their predictions would be arbitrary (NaN ranks first in top-k and argmax); {fix}")


def stop_non_finite(what: str, step: int, output_dir: str, remedy: str = NON_FINITE_REMEDY):
    """Stop the run: `what` is not finite at `step`; name the last good checkpoint."""
    last = os.path.join(output_dir, LAST)
    good = (f"the last good checkpoint is {last}, left as it was; relaunch to continue from it (e.g. with {remedy})"
            if os.path.isfile(last) else f"no checkpoint was written before (try {remedy})")
    raise FloatingPointError(f"{what} not finite at step {step}; stopped without saving: {good}")


def check_finite(values: torch.Tensor, names, step: int, output_dir: str, remedy: str = NON_FINITE_REMEDY):
    """Stop (stop_non_finite) if any of the logged values is not finite; values are the same on every rank."""
    bad = [n for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
    if bad:
        stop_non_finite(", ".join(bad), step, output_dir, remedy)


def load_checkpoint(path: str, kind: str, flag: str = "--resume", hint: str = "", auto: bool = False) -> dict:
    """A checkpoint of one trainer (kind); a clear error for a missing file, a foreign one or another trainer's.
    auto: path is the output_dir's checkpoint-last.pth that prepare_run picked, not a file --resume names (--resume
    auto, or a requeued --resume PATH command); the error then names the folder. Every rank calls it and reads the
    file for itself; where some cannot (a copy missing or damaged on their node), every rank stops with the first
    one's error (build_on_all_ranks)."""
    return build_on_all_ranks(_world(), _read_run_checkpoint, path, kind, flag, hint, auto, fix=SAME_CHECKPOINT)


def _read_run_checkpoint(path: str, kind: str, flag: str, hint: str, auto: bool) -> dict:
    """load_checkpoint's read and checks, on one rank."""
    try:
        checkpoint = dtm.read_checkpoint(path, flag if not auto else "the run's checkpoint (--resume auto)")
    except ValueError as e:
        if not auto:
            raise
        folder = os.path.dirname(path) or "."
        older = sorted(name for name in os.listdir(folder) if RUN_CHECKPOINT.fullmatch(name) and name != LAST)
        raise ValueError(f"{e}; to start over pass --fresh" + (
            f", or to continue an older checkpoint move this one away and pass --resume with one of "
            f"{', '.join(os.path.join(folder, name) for name in older)}" if older else "")) from None
    if checkpoint.get("kind") != kind:
        found = f"kind {checkpoint['kind']!r}" if "kind" in checkpoint else \
            "no 'kind' entry: weights without a run to continue, or another codebase's file"
        trainer = f"train_{kind.split('_')[1]}.py"
        if auto:
            what = "another trainer's run" if "kind" in checkpoint else "a file that is no run of this repo"
            raise ValueError(f"--output_dir {os.path.dirname(path)!r} holds {what} ({LAST}: {found}), which "
                             f"{trainer} would continue (--resume auto): pass another --output_dir")
        raise ValueError(f"{flag} {path!r} is not a checkpoint of {trainer} ({found}){hint}")
    return checkpoint


INITIAL_ONLY = ("layer_scale",)  # flags that only set a new run's weights (pre-training's layer scale init)
BOOKKEEPING = {"resume", "fresh", "output_dir", "num_workers", "log_every", "save_every", "keep_every", "eval_every",
               "max_steps", "eval", "demo"}
PATH_FLAGS = {"data", "data_train", "data_val", "img_dir", "ann_dir", "val_img_dir", "val_ann_dir", "teacher"}


def split_teacher(value: str) -> tuple:
    """--teacher's (kind, PATH) for clip:PATH or ckpt:PATH, else (None, value)."""
    kind, colon, path = value.partition(":")
    return (kind, path) if colon and kind in ("clip", "ckpt") else (None, value)


def _as_launched(name: str, saved, cwd: str, moved=lambda path: path):
    """A saved flag's value with a relative path made absolute from cwd, the folder its run was launched in, where
    that is not this one (None for checkpoints from before it was recorded: as saved), then moved(path) (where it lies
    now: moved_with_run). PATH_FLAGS only (--teacher: its PATH after clip: or ckpt:). The same relative --data or
    --teacher relaunched from another folder reads other files, which resume then lists among the changed settings."""
    if name not in PATH_FLAGS or not isinstance(saved, str):
        return saved
    kind, path = split_teacher(saved)
    if name == "teacher" and kind is None:  # pixels
        return saved
    if cwd not in (None, launch_folder()):
        path = os.path.join(cwd, path)  # an absolute path stays as it is
    return (f"{kind}:" if kind else "") + moved(path)


def resumed_best_dir(checkpoint: dict, path: str) -> str:
    """The folder whose checkpoint-best.pth holds the best of the run continued from the checkpoint at `path`: its
    recorded best_dir (moved_with_run), or null there: beside the checkpoint (fine-tuning, segmentation)."""
    return (moved_with_run(checkpoint, path, checkpoint["best_dir"]) if checkpoint.get("best_dir")
            else os.path.dirname(path) or ".")


def best_dir_to_save(best_dir: str, output_dir: str):
    """best_dir as a checkpoint records it: None where it is the run's own folder (also once that folder is moved),
    else its absolute path."""
    return None if same_path(best_dir, output_dir) else os.path.abspath(best_dir)


def moved_with_run(checkpoint: dict, path: str, recorded: str) -> str:
    """An absolute path the checkpoint at `path` records (its --init, --resume PATH, best_dir) where it lies now: where
    that is gone and the run's folder moved, the same place beside the folder (the folders moved together, e.g. a
    study's --out: the same command relaunched names the file at its new place); else as recorded."""
    then = os.path.join(checkpoint.get("cwd") or "", checkpoint["args"].get("output_dir") or "")  # the run's folder
    if not os.path.isabs(recorded) or os.path.exists(recorded) or not os.path.isabs(then):
        return recorded  # still there (another file is another one), or the run's folder then is not recorded
    if not os.path.isabs(path) and not launch_folder():
        return recorded  # the folder this process was launched in is gone: where `path` lies is not known
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), os.path.relpath(recorded, then)))


def resume(checkpoint: dict, path: str, model, optimizer, scaler, args, steps_per_epoch: int, d: Dist,
           counts_steps: bool = False, train_images: int = None) -> int:
    """Restore model, optimizer, scaler and RNG states from a checkpoint of this trainer; returns the step to
    continue from. Prints the settings that differ from the checkpoint's (a new --lr or --epochs applies from here).
    Another number of samples per step (batch size x accumulation x processes) or of steps per epoch is accepted at
    an epoch boundary only (the step is renumbered to keep the epochs done); another split of the same samples per
    step also mid-epoch. counts_steps: the run's length and schedule count steps (segmentation's --iters), so another
    number of samples per step is accepted at any step and the step is kept; the data continues at that step's place
    in the new order. Another number of training images (train_images; a file deleted or added) is said: an epoch's
    order is a permutation of them, so mid-epoch the rest of the epoch is not the saved run's. --init starts a new
    run: another --init than the run started from is refused, not silently ignored."""
    if getattr(args, "resume", "auto") != "auto" and not same_path(path, args.resume):  # a requeued --resume PATH
        again = (f"to start again from {args.resume}, add --fresh" if os.path.isfile(args.resume) else
                 f"{args.resume} is gone since: --fresh cannot start again from it")
        d.print(f"note: continuing {path}, the run this command started there from --resume {args.resume} ({again})")
    saved = checkpoint["args"]
    if "init" in vars(args) and saved.get("init") is not None:
        started_from = init_started_from(checkpoint)
        # a checkpoint from before init_abspath was recorded, with a relative --init that this folder cannot resolve
        unknown = not os.path.isabs(started_from) and not os.path.exists(started_from) and started_from != "none"
        if args.init is not None and not same_path(args.init, started_from):
            moved = same_path(args.init, moved_with_run(checkpoint, path, started_from))
            if not ((unknown or moved) and os.path.isfile(args.init)):
                same = ("none" if started_from == "none" else
                        f"with that file's path from this folder (it records {started_from} relative to another "
                        f"one)" if unknown else f"{shlex.quote(started_from)} (the file is not read again)")
                if args.init != "none" and not os.path.isfile(args.init):  # no new run from it either: said first
                    raise FileNotFoundError(
                        f"--init {args.init!r}: {'a folder' if os.path.isdir(args.init) else 'no such file'}; and "
                        f"{path!r} continues a run started from --init {started_from}: to continue that run pass "
                        f"--init {same}")
                given = (args.init if os.path.isabs(args.init) or args.init == "none" else
                         f"{args.init} (from here: {os.path.abspath(args.init)})")
                raise ValueError(f"{path!r} continues a run started from --init {started_from}; --init {given} would "
                                 f"be ignored (it applies to a new run only). To continue that run pass --init {same}; "
                                 f"to start a new run from {args.init} {new_run_hint(args, path)}")
            d.print(f"note: {path!r} was started from --init {started_from}, " + (
                "which is gone; --init lies where it lay beside the run (moved with it)" if moved else
                "relative to a folder it does not record") + f"; taking --init {args.init} as that file")
            started_from = os.path.abspath(args.init)
        elif args.init is None and not os.path.isabs(started_from) and started_from != "none":
            d.print(f"note: {path!r} records --init {started_from} relative to a folder it does not record"
                    + (f"; from here that is {os.path.abspath(started_from)}" if os.path.exists(started_from) else ""))
        args.init = started_from if os.path.isabs(started_from) else saved["init"]  # recorded as init_abspath again
    for k in INITIAL_ONLY:  # the checkpoint holds the weights these made: a new value would be recorded, not applied
        if k in vars(args) and k in saved and not _same_setting(saved[k], getattr(args, k)) and \
                bool(saved[k]) == bool(getattr(args, k)):  # 0 vs not: another model shape, refused below
            d.print(f"note: --{k} sets the weights a run starts with, which {path!r} holds: the continued run keeps "
                    f"--{k} {saved[k]} (not {getattr(args, k)})")
            setattr(args, k, saved[k])
    launched = {k: _as_launched(k, v, checkpoint.get("cwd"), lambda p: moved_with_run(checkpoint, path, p))
                for k, v in saved.items()}
    changed = [f"--{k} {launched[k]} -> {v}" for k, v in sorted(vars(args).items())
               if k not in BOOKKEEPING and k != "init" and k in saved and not _same_setting(launched[k], v)]
    try:
        unwrap(model).load_state_dict(checkpoint["model"])
    except RuntimeError:
        mismatch = _mismatch(unwrap(model).state_dict(), checkpoint["model"])
        if changed:  # the likely cause first: the fix, then the details
            raise ValueError(f"{path!r} was saved with other settings ({', '.join(changed)}) and does not fit this "
                             f"model: resume with the settings it was saved with ({mismatch}), or to start a new run "
                             f"with these settings {new_run_hint(args, path)}{init_note(args)}") from None
        raise ValueError(f"{path!r} does not fit this model ({mismatch}); none of the settings it records changed "
                         f"since it was saved") from None
    step = checkpoint["step"]
    whole_epochs, rest = divmod(step, checkpoint["steps_per_epoch"])
    layout = _batch_layout(saved, checkpoint.get("world_size", d.world_size), checkpoint["steps_per_epoch"])
    now = _batch_layout(vars(args), d.world_size, steps_per_epoch)
    differ = [f"{k} {layout[k]} -> {now[k]}" for k in now if layout[k] != now[k]]
    if differ and counts_steps:
        epoch, done = divmod(step, steps_per_epoch)
        d.print(f"{path!r} was saved with other batches ({', '.join(differ)}): step {step} is kept, as this run's "
                f"length and schedule count steps; the data continues at step {done} of epoch {epoch} of the new order")
    elif differ and rest:  # mid-epoch: step s of the epoch continues at sample s * (samples per step) of its order
        folder = os.path.dirname(path) or "."
        epochs = [m.group(1) for m in map(RUN_CHECKPOINT.fullmatch, os.listdir(folder))  # the epochs it has ended:
                  if m and m.group(1).isdigit() and int(m.group(1)) < whole_epochs]  # later: another run's (--fresh)
        ends = [f"checkpoint-{e}.pth" for e in sorted(epochs, key=int)]
        in_place = os.path.isdir(args.output_dir) and os.path.samefile(folder, args.output_dir)
        more = f", and {len(ends) - 4} before them" if len(ends) > 4 else ""  # 1600 epochs: not 1599 names
        earlier = f" or an earlier one ({', '.join(ends[-4:-1])}{more})" if ends[:-1] else ""
        at_ends = (f"--resume {shlex.quote(os.path.join(folder, ends[-1]))}{earlier}"
                   + (f" with --fresh, which continues it in place of {LAST}" if in_place else "") if ends else
                   f"none in {folder!r} yet: pre-training keeps checkpoint-{{epoch}}.pth every --keep_every epochs")
        raise ValueError(f"{path!r} was saved mid-epoch (step {step}); this run differs in {', '.join(differ)}: "
                         f"resume with the same data and the same samples per step (--batch_size x --accum_iter x "
                         f"processes; another split of them is fine), or from a checkpoint saved at the end of an "
                         f"epoch ({at_ends}), or start the run over (--fresh)")
    elif checkpoint["steps_per_epoch"] != steps_per_epoch:
        step = whole_epochs * steps_per_epoch
        d.print(f"{path!r} was saved with {checkpoint['steps_per_epoch']} steps per epoch, this run has "
                f"{steps_per_epoch}: step {checkpoint['step']} (end of epoch {whole_epochs - 1}) continues as step "
                f"{step}; log lines before it count steps of the old size (plot them by epochs done: plot_log.py --x "
                f"epochs_done)")
    saved_images = checkpoint.get("train_images")  # None: saved before it was recorded
    if None not in (saved_images, train_images) and saved_images != train_images:
        d.print(f"note: {path!r} was saved with {saved_images} training images, this run has {train_images}"
                + (f": the rest of epoch {whole_epochs} is drawn in the new set's order, so in that epoch some images "
                   f"come twice and others not at all (continuing exactly needs the images it was saved with)"
                   if rest and not differ else ""))
    optimizer.load_state_dict(regrouped_optimizer_state(optimizer, checkpoint["optimizer"], path))
    if scaler is not None and checkpoint.get("scaler") is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    elif (scaler is None) != (checkpoint.get("scaler") is None):  # e.g. --amp auto resumed on another kind of GPU
        d.print(f"note: {path!r} was saved " + (
            "with fp16's loss scale (GradScaler); this run has none (bf16 or fp32), so it is not used" if scaler is None
            else "without a loss scale (bf16 or fp32); this run is fp16: a new scale starts at "
                 f"{scaler.get_scale():g}, and its first steps may overflow and be skipped"))
    set_rng_state(checkpoint["rng"])
    d.print(f"resumed from {path} at step {step}"
            + (f"; settings changed since: {', '.join(changed)}" if changed else ""))
    return step


def regrouped_optimizer_state(optimizer, saved: dict, path: str = "the checkpoint") -> dict:
    """saved (an optimizer's state_dict) laid out for this optimizer's parameter groups, matched by parameter name
    (group["param_names"], as param_groups writes them): each parameter keeps its moments, and the groups' settings
    (weight decay, lr scale, betas) are this run's. A plain load_state_dict would put back the saved settings,
    so a --weight_decay or --layer_decay changed on resume would be reported but not used, and a --layer_decay
    that changes the number of groups would not load. Groups without param_names are loaded as saved."""
    if not all("param_names" in g for g in [*optimizer.param_groups, *saved["param_groups"]]):
        return saved
    saved_index = {name: i for g in saved["param_groups"] for name, i in zip(g["param_names"], g["params"])}
    current = [name for g in optimizer.param_groups for name in g["param_names"]]
    if sorted(current) != sorted(saved_index):
        differ = sorted(set(current) ^ set(saved_index))
        raise ValueError(f"the optimizer state in {path!r} is for other parameters than this run trains "
                         f"({len(differ)} differ, e.g. {differ[:3]}): resume with the settings it was saved with")
    state, groups, index = {}, [], 0
    for group in optimizer.param_groups:
        ids = list(range(index, index + len(group["params"])))
        for name, i in zip(group["param_names"], ids):
            if saved_index[name] in saved["state"]:
                state[i] = saved["state"][saved_index[name]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        index += len(ids)
    return {"state": state, "param_groups": groups}


def _mismatch(expected: dict, saved: dict) -> str:
    """The first differences between a model's state dict and a saved one, in words."""
    problems = {"shapes": [f"{k} {tuple(v.shape)} saved, {tuple(expected[k].shape)} here" for k, v in saved.items()
                           if k in expected and v.shape != expected[k].shape],
                "missing": [k for k in expected if k not in saved],
                "unexpected": [k for k in saved if k not in expected]}
    return "; ".join(f"{what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                     for what, items in problems.items() if items)


def _batch_layout(args: dict, world_size: int, steps_per_epoch: int) -> dict:
    """What a mid-epoch restart must keep: the epoch's order is one permutation whatever the number of processes (rank
    r takes its entries r, r + W, ...), so step s covers the same samples for any split of the samples per step."""
    return {"samples per step (--batch_size x --accum_iter x processes)":
            args.get("batch_size", 1) * args.get("accum_iter", 1) * world_size, "steps per epoch": steps_per_epoch}


def same_path(a: str, b: str) -> bool:
    """Two paths name the same file or folder (or two --init values are both 'none'); relative ones from this
    working directory."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, UnicodeEncodeError):  # a checkpoint's name this locale's file names cannot hold: 日本 in Latin-1
        return False


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _same_setting(saved, given) -> bool:
    """A flag's saved and given values are one setting: equal, or paths of the same file or folder written two ways
    (--data imnet and --data /data/imnet; also after --teacher's clip: or ckpt:)."""
    if _plain(saved) == _plain(given):
        return True
    if not isinstance(saved, str) or not isinstance(given, str):
        return False
    (saved_kind, saved_path), (given_kind, given_path) = split_teacher(saved), split_teacher(given)
    if saved_kind is not None and saved_kind == given_kind:
        saved, given = saved_path, given_path
    return same_path(saved, given)


def wait_for_gpu(d: Dist):
    """Block until the GPU has run the work queued so far (CUDA runs asynchronously), so that a time read next, e.g.
    where a save or evaluation starts, does not count the queued training step as part of it."""
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)


_run_bars = weakref.WeakSet()  # the trainers' progress bars (progress_bar)


def progress_bar(make, **kwargs):
    """make(dynamic_ncols=True, **kwargs): a trainer's progress bar over its steps (make: tqdm, by the trainer's
    name for it). A bar an earlier run in this process left open is closed first: a run that raised keeps its bar
    open where its traceback is kept (a notebook, a sweep that stores the error), and the next run's messages
    (Dist.print) drew that dead bar again, its own bar on a line below."""
    for bar in list(_run_bars):
        bar.close()
    bar = make(dynamic_ncols=True, **kwargs)
    _run_bars.add(bar)
    return bar


class StepTimer:
    """Seconds spent in the named parts of a step. On CUDA it synchronizes only when `exact` (log steps), so
    only the logged steps' split is exact; the others are not timed at all."""

    def __init__(self, device):
        self.cuda, self.exact, self.parts, self._t = device.type == "cuda", False, {}, 0.0

    def start(self, exact: bool):
        self.exact, self.parts = exact, {}
        self._tick()

    def _tick(self):
        if self.exact and self.cuda:
            torch.cuda.synchronize()
        now, elapsed = time.perf_counter(), time.perf_counter() - self._t
        self._t = now
        return elapsed

    def lap(self, name: str):
        if self.exact:
            self.parts[name] = self.parts.get(name, 0.0) + self._tick()


# ---------------------------------------------------------------------------------------------------
# Errors: one line for the user's, the traceback for ours


def user_error_message(error: BaseException):
    """The one-line message of a user error, or None for an internal error.

    A user error is a ValueError, OSError or FloatingPointError raised by this repo's own checks (a bad flag, path,
    checkpoint or data file, a diverged run); one re-raised from a DataLoader worker counts too. The same types
    raised inside torch or elsewhere are internal errors and keep their traceback."""
    if not isinstance(error, (ValueError, OSError, FloatingPointError)):
        return None
    text = str(error)
    if "Original Traceback (most recent call last):" in text:  # re-raised from a DataLoader worker
        lines = text.strip().splitlines()
        files = [line for line in lines if line.strip().startswith('File "')]
        origin = files[-1].strip()[len('File "'):].partition('"')[0] if files else ""
        return lines[-1].partition(": ")[2] if _in_repo(origin) else None
    frames = traceback.extract_tb(error.__traceback__)
    return text.splitlines()[0] if frames and _in_repo(frames[-1].filename) else None


def _in_repo(filename: str) -> bool:
    """A file of this repo (the repo is flat: a .venv inside it does not count)."""
    return os.path.dirname(os.path.abspath(filename)) == REPO


def show_tracebacks() -> bool:
    """DTM_TRACEBACK set to anything but empty or 0."""
    return os.environ.get("DTM_TRACEBACK", "") not in ("", "0")


def _end_progress_bars() -> bool:
    """Close the open tqdm bars (a bar's line ends), so that a message printed next starts a line of its own (a log
    read with `grep ^error:` finds it); -> whether one was open."""
    bars = list(getattr(tqdm, "_instances", ()))  # tqdm's own registry of open bars
    for bar in bars:
        bar.close()
    return bool(bars)


def escape_what_stdout_cannot_encode():
    """A character stdout cannot encode is written escaped (\\xe9, as on stderr), not an error. A name that is not
    UTF-8 (b'r\\xe9s', from a Latin-1 machine) holds surrogate escapes, which a UTF-8 locale's stdout refused
    (UnicodeEncodeError: a run in such an --output_dir failed at its last line) and Python's UTF-8 mode wrote as the
    raw byte (stdout no longer UTF-8, which study.py failed to read); an ASCII stdout (PYTHONIOENCODING=ascii) refused
    an image path with an é, at the run's first skipped image. For scripts (cli, study.py)."""
    if hasattr(sys.stdout, "reconfigure"):  # a stream of text alone (Jupyter's, for %run) encodes nothing
        sys.stdout.reconfigure(errors="backslashreplace")


def cli(main):
    """Run main() as a script: a user error (user_error_message) prints `error: ...` on one line and exits with 2;
    Ctrl-C prints one line and exits with 130; anything else keeps Python's traceback. Once main has ended, a Ctrl-C
    ends the process at once (a SIGINT the process ignores stays ignored). DTM_TRACEBACK=1 shows the traceback of user
    errors and interruptions too. Names stdout cannot encode are printed escaped (escape_what_stdout_cannot_encode)."""
    escape_what_stdout_cannot_encode()
    try:
        try:
            main()
        finally:  # a Ctrl-C (a second one, or one as a run ends) while Python exits raised in its threading or atexit
            # callbacks (torch's, multiprocessing's), which printed "Exception ignored in ..." and a traceback: now it
            # ends the process (killed by SIGINT, which a shell reports as status 130); a process that ignores SIGINT
            # (a script's background job, a sweep's child) or handles it its own way keeps doing so
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
    except KeyboardInterrupt:
        if show_tracebacks():
            raise
        after_ctrl_c = "" if _end_progress_bars() else "\n"  # a new line, unless closing a bar ended the line
        print(f"{after_ctrl_c}interrupted: relaunch to continue from the last {LAST} in its --output_dir (written "
              f"at the end of each epoch in pre-training and fine-tuning, and every --save_every steps where the "
              f"trainer has it): the same command, without --fresh; before the first save there is none: the "
              f"command as it was starts over (from PATH with --resume PATH)",
              file=sys.stderr, flush=True)
        sys.exit(130)
    except (ValueError, OSError, FloatingPointError) as e:
        message = user_error_message(e)
        if message is None or show_tracebacks():
            raise
        where = (f" (rank {os.environ.get('RANK')} of {os.environ['WORLD_SIZE']}, {socket.gethostname()})"
                 if os.environ.get("RANK") and os.environ.get("WORLD_SIZE", "").strip() not in ("", "0", "1")
                 else "")  # torchrun's summary may blame another rank
        # under torchrun only rank 0 draws the bar, on the terminal or log all ranks share: another rank's line was
        # printed at the end of that bar's unfinished line, where grep ^error missed it (rank 1 of a 2-GPU run)
        other_rank = where and os.environ["RANK"].strip() != "0"
        new_line = "\n" if not _end_progress_bars() and other_rank else ""
        print(f"{new_line}error{where}: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
