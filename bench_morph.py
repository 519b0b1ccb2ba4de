"""Benchmark: DTM's morphed loss with morph.py (index maps) vs a dense source-matrix implementation.

The morph.py path is what train_pretrain.py runs (with --split official; its default random split reorders the
tokens each round too): morph.token_morphing_levels + dtm.dtm_loss.

Times, for L levels, token morphing of the teacher tokens + group means of student predictions and teacher
targets + smooth-L1 loss (beta 2, all positions, group-size weighted), forward and backward.
The dense path is written here in the style of the official code (naver-ai/dtm engines/engine_for_dtm.py): ToMe
bipartite matching with the first token protected (class_token=True), size-weighted merges and B x T x N source
matrices updated every round, then S^T (S x / |S|) for student and teacher; the morph.py path runs the same matching
(split="official"). The script first checks that both give the same loss, in float64 (in float32 a near-tie in the
similarity sort can order two merges differently, see morph.py).
Peak memory: each measurement runs in a fresh process (MALLOC_MMAP_THRESHOLD_ fixed), after at least one warm-up
step and with the student's gradient freed, so the step's own gradient counts; on CPU the figure is the growth of the
peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) over the resident set before one measured step;
on CUDA it is torch.cuda.max_memory_allocated over the memory allocated before it. The trainers' backend flags
(engine.set_backend_flags: TF32 matmuls on GPUs that have them) are set, as in training.

    python bench_morph.py                       # B=64, N=196, C=512, schedules 14x7 and 2x49, L=2
    python bench_morph.py --device cuda
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import dtm
import engine
import morph
from morph import parse_schedule


def dense_merge_sources(x, schedule):
    """ToMe-style matching (first token protected) with size-weighted merges and a dense source matrix.
    Returns S (B, G, N) 0/1."""
    B, N, _ = x.shape
    size = x.new_ones(B, N, 1)
    source = torch.eye(N, device=x.device, dtype=x.dtype).expand(B, N, N)
    for r in schedule:
        r = min(r, (x.shape[1] - 1) // 2)
        if r <= 0:
            continue
        metric = x / x.norm(dim=-1, keepdim=True)
        scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)
        scores[:, 0, :] = -float("inf")
        node_max, node_idx = scores.max(dim=-1)
        edges = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edges[:, r:].sort(dim=1).values, edges[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)

        def merge(t):
            src, dst = t[:, 0::2], t[:, 1::2]
            c = t.shape[-1]
            unm = src.gather(1, unm_idx.expand(-1, -1, c))
            src = src.gather(1, src_idx.expand(-1, -1, c))
            return torch.cat([unm, dst.scatter_reduce(1, dst_idx.expand(-1, -1, c), src, reduce="sum")], dim=1)

        x = merge(x * size)
        size = merge(size)
        x = x / size
        source = merge(source)
    return source


def loss_dense(student, teacher, schedules):
    total = 0
    for schedule in schedules:
        with torch.no_grad():
            S = dense_merge_sources(teacher, schedule)
            S_norm = S / S.sum(-1, keepdim=True)
        morphed_student = S.transpose(1, 2) @ (S_norm @ student)  # every position holds its group mean
        morphed_teacher = S.transpose(1, 2) @ (S_norm @ teacher)
        dtype = torch.promote_types(student.dtype, torch.float32)  # as dtm_loss: float32 at least
        total = total + F.smooth_l1_loss(morphed_student.to(dtype), morphed_teacher.to(dtype), beta=2.0)
    return total / len(schedules)


def loss_index(student, teacher, schedules):
    """The training code's path: morph.token_morphing_levels + dtm.dtm_loss (morph.group_mean)."""
    groups = morph.token_morphing_levels(teacher, schedules, split="official")
    num_groups = [morph.num_groups_after(teacher.shape[1], s, "official") for s in schedules]
    return dtm.dtm_loss(student, teacher, groups, loss="smooth_l1", beta=2.0, num_groups=num_groups)[0]


METHODS = {"dense": loss_dense, "morph.py": loss_index}
# glibc gives a freed block back to the OS only if it was at or above its mmap threshold (mmap'd), and the threshold
# rises at run time (up to 32 MiB) as such blocks are freed, after which smaller blocks stay in the heap: a fixed
# threshold keeps the resident set equal to live allocations, so the CPU peak is measurable.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def make_inputs(args):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(args.batch, args.tokens, args.dim, generator=gen).to(args.device).requires_grad_()
    teacher = torch.randn(args.batch, args.tokens, args.dim, generator=gen).to(args.device)
    return student, teacher


def _resident_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024  # kB -> MiB


def measure(args, method, schedule_text):
    """Runs in a child process: median seconds per fwd+bwd, or (--child_memory) peak memory growth of one step."""
    engine.set_backend_flags()  # as in training: TF32 matmuls on GPUs that have them
    torch.manual_seed(0)
    student, teacher = make_inputs(args)
    schedules = [parse_schedule(schedule_text)] * args.levels
    cuda = args.device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(args.device)) if cuda else (lambda: None)  # --device cuda:1: that GPU's

    def step():
        student.grad = None
        METHODS[method](student, teacher, schedules).backward()
        sync()

    if args.child_memory:
        for _ in range(max(args.warmup, 1)):  # first-call allocations are not the step's
            step()
        student.grad = None  # the step makes its gradient: counted in its growth, not in the baseline
        if cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
            base = torch.cuda.memory_allocated(args.device)
            step()
            return {"peak_mib": (torch.cuda.max_memory_allocated(args.device) - base) / 2**20}
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size to the current one
        base = _resident_mib("VmRSS:")
        step()
        return {"peak_mib": _resident_mib("VmHWM:") - base}
    times = []
    for i in range(args.warmup + args.iters):
        start = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times)}


def check_agreement(args):
    student, teacher = (t.double() for t in make_inputs(args))
    for text in args.schedules:
        schedules = [parse_schedule(text)] * args.levels
        a, b = loss_dense(student, teacher, schedules), loss_index(student, teacher, schedules)
        assert torch.allclose(a, b, rtol=1e-6), f"losses differ for {text}: dense {a.item()} vs morph.py {b.item()}"


def run_child(command, env=None) -> str:
    """A measurement in a fresh process -> its stdout; its error, if it fails."""
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{' '.join(command[1:])} failed:\n{result.stderr.strip()}")
    return result.stdout


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="images B (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=196, help="patch tokens N per image (default %(default)s)")
    parser.add_argument("--dim", type=int, default=512, help="teacher feature width C (default %(default)s)")
    parser.add_argument("--levels", type=int, default=2,
                        help="number of morphing levels L (schedules per step; default %(default)s)")
    parser.add_argument("--schedules", nargs="+", default=["14x7", "2x49"],
                        help="each timed alone: KxR (K rounds of R merges) or r1,r2,... (default: 14x7 2x49)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N for GPU N; default %(default)s)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default %(default)s)")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SCHEDULE"), help=argparse.SUPPRESS)
    parser.add_argument("--child_memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.iters, args.batch, args.tokens, args.dim, args.levels) < 1 or args.warmup < 0:
        parser.error("--iters, --batch, --tokens, --dim and --levels must be >= 1, --warmup >= 0")
    try:
        engine.check_bench_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    for text in args.schedules:
        try:
            parse_schedule(text)
        except ValueError as e:
            parser.error(f"--schedules {text!r}: {e}")
    if args.child:
        print(json.dumps(measure(args, *args.child)))
        return

    check_agreement(args)  # both paths compute the same loss
    for text in args.schedules:  # the rounds both paths run: the label would otherwise name more merges than timed
        given, run = parse_schedule(text), morph.clamp_schedule(args.tokens, parse_schedule(text), "official")
        if run != given:
            print(f"note: schedule {text} on {args.tokens} tokens runs as {run} ({sum(run)} merges, not {sum(given)}): "
                  f"each round merges at most (T - 1) // 2 of its T tokens (ToMe's rule, the first token kept)")
    print(f"B={args.batch} N={args.tokens} C={args.dim} L={args.levels} device={args.device} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'schedule':>9} | {'method':>8} | {'fwd+bwd ms':>10} | {'peak MiB':>8} | speed-up")
    flags = [f"--{k}={getattr(args, k)}" for k in ("batch", "tokens", "dim", "levels", "device", "iters", "warmup")]
    for text in args.schedules:
        results = {}
        for method in METHODS:
            command = [sys.executable, __file__, *flags, "--child", method, text]
            timing, memory = (run_child(command), run_child(command + ["--child_memory"], env=CHILD_ENV))
            results[method] = {**json.loads(timing), **json.loads(memory)}
        for method, r in results.items():
            speedup = results["dense"]["seconds"] / r["seconds"]
            print(f"{text:>9} | {method:>8} | {1000 * r['seconds']:10.1f} | {r['peak_mib']:8.1f} | {speedup:.1f}x")


if __name__ == "__main__":
    main()
