"""Benchmark: step time of DTM pre-training with and without --mto (student forward + backward + AdamW step).

By default the teacher is left out (it is the same with and without MTO): random targets of the CLIP dimension stand
in for it. --teacher clip puts it in: a CLIP ViT-B/16-sized visual encoder with random weights (the same computation
as the real one) makes each step's targets from the images, as train_pretrain.py does, so the overhead is over the
whole step but data loading and the trainer's gradient clipping (one global norm per step, the same in every
variant, so left out here as well). Morphing uses the default dynamic schedules (L=2). The variants run interleaved, one
step of each in turn (the order rotating), so that a change of machine load hits all of them alike. Prints, for each
variant, the median and the fastest wall time per step and, on the CPU, the median CPU time per step (user + system time
of this process: on a shared virtual machine it leaves out time the CPUs were given to other guests), each with its
overhead over the first variant listed (plain DTM unless --variants says otherwise); on a GPU, instead of the CPU time
(mostly the host waiting in synchronize), the peak memory of the variant's timed steps above what was allocated before
each (all variants' weights, and their AdamW moments from their first step on: with --warmup 0 the first timed step's
peak includes its own moments).
A variant whose step raises (a compile error, say) is left out from then on, its traceback printed; the others are
timed and reported, and the exit status is 1 (the first variant, the baseline, must run).

On the CPU, glibc's malloc hands tensors of more than 32 MB back to the kernel when they are freed, so every step
page-faults its activations in afresh (zeroed by the kernel: system time, and it varies from step to step with the
allocator's state). --malloc keep makes glibc keep freed memory for reuse (mallopt: no mmap, no trimming), as
the CUDA caching allocator does on a GPU, so that the step time counts the computation.

    python bench_mto.py                              # vit_b, batch 64, CPU
    python bench_mto.py --malloc keep                # the same, freed memory kept for reuse (glibc)
    python bench_mto.py --teacher clip               # the whole step: the CLIP teacher's forward included
    python bench_mto.py --variants 0 1 5             # + MTO with its losses compiled (MTOConfig.compile)
    python bench_mto.py --variants 0 1 --compile     # blocks and MTO's losses compiled, as train_pretrain.py --compile
    python bench_mto.py --device cuda --amp bf16
    python bench_mto.py --device cuda --amp bf16 --variants 0 1 --profile   # + the GPU's busy time, the top kernels
    python bench_mto.py --batch 16 --variants 0 1 --steps 1 --warmup 0 --count_bytes  # + bytes read and written
    git show e912467:mto.py > /tmp/mto_e912467.py &&
        python bench_mto.py --variants 0 1 --compare_mto /tmp/mto_e912467.py
"""
import argparse
import contextlib
import ctypes
import dataclasses
import importlib.util
import os
import random
import re
import resource
import statistics
import sys
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import dtm
import engine
import morph
import mto
from data import BlockMaskGenerator

VARIANTS = {"dtm": None,
            "dtm + mto (defaults: recalibration, both losses, all blocks)": mto.MTOConfig(),
            "dtm + mto recalibration + singularity loss": mto.MTOConfig(lambda_ent=0),
            "dtm + mto recalibration + entropy loss": mto.MTOConfig(lambda_sing=0),
            "dtm + mto recalibration only": mto.MTOConfig(lambda_sing=0, lambda_ent=0),
            "dtm + mto (defaults), its losses compiled": mto.MTOConfig(compile=True)}
# the default: all but those whose losses compile (on the CPU that needs a C++ compiler; seconds to a minute)
EAGER_VARIANTS = [i for i, cfg in enumerate(VARIANTS.values()) if cfg is None or not cfg.compile]


def load_mto(path):
    """Another version of mto.py (e.g. `git show <commit>:mto.py > old_mto.py`), to compare with this one."""
    spec = importlib.util.spec_from_file_location("compared_mto", path)
    if spec is None or not os.path.isfile(path):
        raise SystemExit(f"--compare_mto {path}: no such Python file; pass the path of a copy of mto.py "
                         f"(git show <commit>:mto.py > old_mto.py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:  # `git show <commit> mto.py` (no colon) writes the commit's diff
        raise SystemExit(f"--compare_mto {path}: is not Python (SyntaxError at line {e.lineno}: {e.msg}); pass a copy "
                         f"of mto.py (git show <commit>:mto.py > old_mto.py)") from None
    if not all(hasattr(module, name) for name in ("MTO", "MTOConfig")):  # an AttributeError in has_compile once
        raise SystemExit(f"--compare_mto {path}: has no MTO and MTOConfig, it is not a copy of mto.py; pass one "
                         f"(git show <commit>:mto.py > old_mto.py)")
    return module


def make_teacher(args):
    """None (random targets) or a CLIP ViT-B/16-sized teacher with random weights (--teacher clip)."""
    if args.teacher == "none":
        return None
    torch.manual_seed(0)
    return dtm.CLIPTeacher(dtm.CLIPVisual(args.img_size, 16)).to(args.device)


def error_summary(e: Exception) -> str:
    """One line for an exception: its message's last 'SomeError: ...' line, where the cause is (inductor wraps a
    Triton build error as 'InductorError: SubprocException: An exception occurred in a subprocess:' followed by the
    worker's traceback, ending in 'RuntimeError: PassManager::run failed', and then dynamo's hint), else its first."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line)]
    return f"{type(e).__name__}: {(causes[-1] if causes else lines[0] if lines else '')[:300]}"


def mto_hook(mto_module, cfg, compile_losses):
    """mto_module.MTO with cfg's settings, its losses compiled or not (an mto.py from --compare_mto may be older than
    MTOConfig.compile: it runs without it; main refuses --compile for it)."""
    settings = {**vars(cfg), "compile": cfg.compile or compile_losses}
    if not has_compile(mto_module):
        if settings["compile"]:
            raise SystemExit(COMPILE_MISSING)
        del settings["compile"]
    return mto_module.MTO(mto_module.MTOConfig(**settings))


def has_compile(mto_module) -> bool:
    return "compile" in {field.name for field in dataclasses.fields(mto_module.MTOConfig)}


COMPILE_MISSING = ("--compare_mto's mto.py has no MTOConfig.compile (it predates compiled losses): run the comparison "
                   "without --compile")


def make_step(args, cfg, mto_module=mto, teacher=None):
    torch.manual_seed(0)
    student = dtm.build_vit(args.model, img_size=args.img_size, drop_path_rate=0.1, rel_pos_bias="both")
    if args.compile:
        engine.compile_blocks(student)
    hook = mto_hook(mto_module, cfg, args.compile) if cfg else None
    model = dtm.DTMPretrainModel(student, 512, features_fn=hook).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98))
    grid = args.img_size // 16
    N = grid * grid
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    masks = BlockMaskGenerator((grid, grid), round(N * 75 / 196), 16)
    mask = torch.stack([masks(random.Random(i)).flatten() for i in range(args.batch)])
    # as train_pretrain: the counts of the CPU mask, so MTO has no host sync (an older --compare_mto mto.py has one)
    mask_sizes = mto_module.mask_sizes(mask) if cfg and hasattr(mto_module, "mask_sizes") else None
    mask = mask.to(args.device)
    targets = torch.randn(args.batch, N, 512, device=args.device)
    rng = random.Random(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None

    teacher_dtype = engine.resolve_teacher_amp("auto", dtype, args.device)  # train_pretrain's default --teacher_amp

    def autocast(dtype=dtype):
        return torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None)

    def step():
        step_targets = targets
        if teacher is not None:  # as train_pretrain.train_micro_step
            with torch.no_grad(), autocast(teacher_dtype):
                step_targets = teacher(images)  # (B, N, 512)
        schedules = [morph.sample_schedule(N, N, 14, rng, "official") for _ in range(2)]
        groups = morph.token_morphing_levels(step_targets, schedules)
        with autocast():
            num_groups = [morph.num_groups_after(N, s, "random") for s in schedules]
            loss, _ = model(images, mask, step_targets, groups, num_groups, mask_sizes=mask_sizes)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize(args.device)  # the GPU of --device (cuda:1 too), not the current one
    return step


def keep_freed_memory():
    """glibc: serve every allocation from the heap (M_MMAP_MAX = 0) and never give freed memory back (M_TRIM_THRESHOLD
    = -1), so that a step reuses the pages of the step before instead of faulting in new ones."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-4, 0) and libc.mallopt(-1, -1)  # M_MMAP_MAX, M_TRIM_THRESHOLD (malloc.h)
    except (OSError, AttributeError):
        ok = False
    if not ok:
        raise SystemExit("--malloc keep needs glibc (Linux); run without it")


def profile_step(name, step, cuda, top=8, reference=None):
    """One step under torch.profiler -> prints its wall time (timed inside the profiler, whose recording slows the
    host: compare it with the unprofiled medians above), on a GPU its kernels and the GPU's busy time (their durations
    summed: where the host's launches, not the GPU, bound a step, the busy time is well below the wall time), and
    the `top` ops by self GPU time (self CPU time on the CPU); with `reference` (what this returned for another
    variant), also the `top` ops whose time grew most over it. Returns {op or kernel: (calls, ms)}."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        start = time.perf_counter()
        step()  # ends with a synchronize on a GPU
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and not annotation(e)]
    busy = f", {len(kernels)} GPU kernels, GPU busy {sum(e.device_time for e in kernels) / 1e3:.1f} ms" if cuda else ""
    print(f"profile of {name}: {1e3 * wall:.1f} ms wall{busy}", flush=True)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    times = {e.key: (e.count, getattr(e, key) / 1e3) for e in prof.key_averages() if not annotation(e)}
    print_top(times, "ms", top, reference)
    return times


def annotation(event) -> bool:
    """Whether a profiler event is kineto's copy of a record_function range on the GPU's timeline (e.g. the optimizer's
    step): not a kernel, its time the range's span, and in key_averages under the same name as the range's CPU entry.
    Left out of the kernels and the table, as torch's own profiler table leaves them out of its GPU total."""
    return bool(getattr(event, "is_user_annotation", False))


def print_top(table, unit, top=8, reference=None):
    """Prints the `top` entries of {name: (calls, amount in `unit`: "ms" or "MB")} by amount, and with `reference`
    (the same for the first variant) the `top` whose amount grew most over it, an entry that only one of the two has
    counted from zero."""
    width, digits = {"ms": (9, 2), "MB": (10, 1)}[unit]

    def show(rows, sign):
        for name, (calls, amount) in sorted(rows.items(), key=lambda item: -item[1][1])[:top]:
            print(f"    {name[:70]:70s} {calls:{sign}6d} calls {amount:{sign}{width}.{digits}f} {unit}", flush=True)
    show(table, "")
    if reference is not None:
        print(f"  grew most over the first variant (calls, {unit}):", flush=True)
        show({name: tuple(now - then for now, then in zip(table.get(name, (0, 0)), reference.get(name, (0, 0))))
              for name in {**reference, **table}}, "+")


VIEWS = {"_unsafe_view", "lift_fresh"}  # besides the ops whose schema says that they return an alias
FILLS = {"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "zeros", "ones", "full",
         "fill_", "zero_", "scalar_tensor"}
EMPTY = {"new_empty", "new_empty_strided", "empty_like", "empty", "empty_strided"}
GATHERS = {"index_select", "gather", "index", "embedding", "take"}
SCATTERS = {"index_put_", "_index_put_impl_", "index_add_", "index_copy_", "index_fill_", "scatter_", "scatter_add_",
            "index_put", "index_add", "index_copy", "scatter", "scatter_add"}


class ByteCount(TorchDispatchMode):
    """Counts each aten op's calls and the bytes of tensors it reads and writes, by (op, first result's shape, dtype):
    a device-independent figure of a step's memory traffic (on a GPU the elementwise and indexing ops that MTO adds
    are bound by it; the matmuls are not). Reads: the tensor arguments, writes: the results, except views (nothing),
    fills (their result written), empty tensors (nothing), gathers (read: the result's bytes and every integer or bool
    argument, the index; written: the result), scatters and index_put (read: the arguments but the first, the
    destination; written: as many bytes as their floating-point values, so a fill with a number counts none; out of
    place also a copy of the destination) and copy_ (its source read, its destination written); an in-place op that
    returns nothing (torch's foreach ops, AdamW's default on a GPU) writes the arguments it modifies. What a kernel
    reads twice or keeps in a cache is not seen.
    Under a dispatch mode autograd adds a tensor's gradients out of place, not into one of them: the bytes are the
    same, one more result is allocated."""

    def __init__(self):
        super().__init__()
        self.ops = {}  # (op, shape, dtype) -> [calls, bytes read, bytes written]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)]
        results = [t for t in tree_flatten(out)[0] if torch.is_tensor(t)]
        read, written = self.traffic(func, inputs, results or self.modified(func, args, kwargs or {}))
        key = (func.overloadpacket.__name__, tuple(results[0].shape), str(results[0].dtype)) if results else \
            (func.overloadpacket.__name__, (), "")
        entry = self.ops.setdefault(key, [0, 0, 0])
        entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + read, entry[2] + written
        return out

    @staticmethod
    def modified(func, args, kwargs):
        """The tensors that the schema of func marks as written in place (Tensor(a!) and Tensor(a!)[] arguments)."""
        schema = func._schema.arguments
        values = [args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(schema)]
        written = [value for a, value in zip(schema, values) if a.alias_info is not None and a.alias_info.is_write]
        return [t for t in tree_flatten(written)[0] if torch.is_tensor(t)]

    @staticmethod
    def traffic(func, inputs, results):
        """(bytes read, bytes written) of one call."""
        def size(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)
        name = func.overloadpacket.__name__
        aliases = not func._schema.is_mutable and any(r.alias_info is not None for r in func._schema.returns)
        if aliases or name in VIEWS or name in EMPTY:
            return 0, 0
        if name in FILLS:
            return 0, size(results)
        if name in GATHERS:
            return size(results) + size(t for t in inputs if not t.is_floating_point()), size(results)
        if name in SCATTERS:  # self, then the indices and values
            copied = 0 if name.endswith("_") else size(inputs[:1])
            values = size(t for t in inputs[1:] if t.is_floating_point())
            return size(inputs[1:]) + copied, values + copied
        if name == "copy_":
            return size(inputs[1:2]), size(inputs[:1])
        return size(inputs), size(results)


def count_bytes(name, step, top=8, reference=None):
    """One step under ByteCount -> prints its total bytes read + written and ops, the `top` ops by bytes, and with
    `reference` (what this returned for another variant) the `top` ops whose bytes grew most over it. Returns
    {"op shape dtype": (calls, MB)}."""
    with ByteCount() as counter:
        step()
    counts = {f"{op} {shape} {dtype.replace('torch.', '')}": (calls, (read + written) / 1e6)
              for (op, shape, dtype), (calls, read, written) in counter.ops.items()}
    total = sum(mb for _, mb in counts.values())
    over = ""
    if reference is not None:
        over = f" ({100 * (total / sum(mb for _, mb in reference.values()) - 1):+.1f}% over the first variant)"
    print(f"bytes of {name}: {total / 1e3:.3f} GB read + written in {sum(c for c, _ in counts.values())} ops{over}",
          flush=True)
    print_top(counts, "MB", top, reference)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b", choices=list(dtm.VIT_CONFIGS),
                        help="student ViT (default %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="images per step (default %(default)s)")
    parser.add_argument("--img_size", type=int, default=224, help="image size, a multiple of 16 (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N for GPU N; default %(default)s)")
    parser.add_argument("--amp", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="the steps' autocast (fp16: CUDA only, with a GradScaler; default %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (default %(default)s)")
    parser.add_argument("--variants", nargs="+", type=int, default=EAGER_VARIANTS,
                        help="variants by index (" + "; ".join(f"{i}: {name}" for i, name in enumerate(VARIANTS))
                        + "; default %(default)s); the first listed is the reference of the overheads")
    parser.add_argument("--malloc", default="default", choices=["default", "keep"],
                        help="keep: glibc keeps freed memory for reuse (CPU; see above)")
    parser.add_argument("--teacher", default="none", choices=["none", "clip"],
                        help="clip: each step runs a CLIP ViT-B/16-sized teacher (random weights) on its images")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed steps, one more step of each variant under torch.profiler: on a GPU its "
                             "kernel count and the GPU's busy time (the kernels' durations summed) against the step's "
                             "wall time, the ops that took the most GPU time (CPU time on the CPU), and those whose "
                             "time grew most over the first variant's")
    parser.add_argument("--count_bytes", action="store_true",
                        help="after the timed steps, one more step of each variant under a dispatch mode that counts "
                             "the bytes each op reads and writes (see ByteCount): the total, the largest ops and "
                             "those that grew most over the first variant")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every variant's blocks and MTO's losses, as train_pretrain.py --compile "
                             "(the first --warmup step compiles)")
    parser.add_argument("--compare_mto", metavar="PATH", type=engine.nonempty_text,
                        help="also run MTO's defaults with another version of mto.py, interleaved with the rest")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1, --warmup >= 0")
    try:
        engine.check_image_size("--img_size", args.img_size, 224)
        engine.check_bench_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    if not all(0 <= i < len(VARIANTS) for i in args.variants):
        parser.error(f"--variants are indices 0..{len(VARIANTS) - 1}, got {args.variants}")
    if twice := sorted({i for i in args.variants if args.variants.count(i) > 1}):  # each step run twice per round
        given, named = " ".join(map(str, args.variants)), ", ".join(map(str, twice))
        parser.error(f"--variants {given} names variant {named} twice; list each once")
    compiles = args.compile or not set(args.variants) <= set(EAGER_VARIANTS)
    if compiles and args.warmup < 1:
        parser.error("--compile and variant 5 need --warmup 1 or more: the first step compiles")
    if compiles and args.count_bytes:
        parser.error("--count_bytes counts aten ops one by one, compiled kernels are not seen: leave --compile and "
                     "variant 5 out")
    if args.amp == "fp16" and not args.device.startswith("cuda"):
        parser.error("--amp fp16 needs a CUDA device (its GradScaler is CUDA's); on the CPU use fp32 or bf16")
    engine.set_backend_flags()  # as the trainers (TF32, cuDNN's autotuner)
    if args.malloc == "keep":
        keep_freed_memory()
    names = [list(VARIANTS)[i] for i in args.variants]
    variants = {name: (VARIANTS[name], mto) for name in names}
    if args.compare_mto:
        names.append(f"dtm + mto from {args.compare_mto} (defaults)")
        variants[names[-1]] = (mto.MTOConfig(), load_mto(args.compare_mto))
        if args.compile and not has_compile(variants[names[-1]][1]):
            parser.error(COMPILE_MISSING)  # before anything is built
    print(f"{args.model} batch={args.batch} img={args.img_size} device={args.device} amp={args.amp} "
          f"threads={torch.get_num_threads()} malloc={args.malloc} teacher={args.teacher} compile={args.compile} "
          f"torch={torch.__version__}",
          flush=True)
    teacher = make_teacher(args)
    steps = {name: make_step(args, *variants[name], teacher=teacher) for name in names}
    wall, cpu, peak = ({name: [] for name in names} for _ in range(3))
    cuda = args.device.startswith("cuda")
    failed = {}  # a variant whose step raised (say, a compile error): left out, the others go on and are reported
    for i in range(args.warmup + args.steps):
        alive = [name for name in names if name not in failed]
        order = alive[i % len(alive):] + alive[:i % len(alive)]  # rotate who goes first
        for name in order:
            if cuda:  # the step's growth over what is allocated before it (every variant's weights, moments)
                torch.cuda.reset_peak_memory_stats(args.device)
                before = torch.cuda.memory_allocated(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                steps[name]()
            except Exception as e:  # noqa: BLE001 -- the first variant, the baseline, must run
                if name == names[0]:
                    raise
                traceback.print_exc()
                if cuda:  # the work it queued before failing is not the next variant's time (a sticky CUDA error
                    with contextlib.suppress(Exception):  # raises at the baseline's next step)
                        torch.cuda.synchronize(args.device)
                failed[name] = error_summary(e)
                print(f"{name}: failed at step {i + 1}, left out: {failed[name]}", flush=True)
                continue
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                if cuda:
                    peak[name].append((torch.cuda.max_memory_allocated(args.device) - before) / 2 ** 30)
    names = [name for name in names if name not in failed]
    figures = {name: {"median_s": statistics.median(wall[name]), "min_s": min(wall[name]),
                      "cpu_median_s": statistics.median(cpu[name])} for name in names}
    base = figures[names[0]]
    print(f"overheads over {names[0]}", flush=True)
    # on CUDA the host's CPU time is mostly its spinning in synchronize, not a figure of the step
    shown = {"median_s": "median", "min_s": "fastest", **({} if cuda else {"cpu_median_s": "cpu"})}
    for name in names:
        f = figures[name]
        overhead = ", ".join(f"{label} {f[key]:.3f} s ({100 * (f[key] / base[key] - 1):+.1f}%)"
                             for key, label in shown.items())
        memory = f"  step peak {max(peak[name]):.2f} GiB over the weights and moments" if cuda else ""
        print(f"{name}: {overhead}{memory}  [{', '.join(f'{t:.2f}' for t in wall[name])}]", flush=True)
    if args.profile:
        first = profile_step(names[0], steps[names[0]], cuda)
        for name in names[1:]:
            profile_step(name, steps[name], cuda, reference=first)
    if args.count_bytes:
        first = count_bytes(names[0], steps[names[0]])
        for name in names[1:]:
            count_bytes(name, steps[name], reference=first)
    if not cuda:  # ru_maxrss counts KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** (30 if sys.platform == "darwin" else 20)
        print(f"peak resident memory of the process (all variants): {peak:.2f} GiB", flush=True)
    if failed:
        sys.exit("error: variants left out, their steps failed (traceback above): "
                 + "; ".join(f"{name}: {error}" for name, error in failed.items()))
    return figures


if __name__ == "__main__":
    main()
