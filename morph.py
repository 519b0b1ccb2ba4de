"""Token morphing: Algorithm 1 of "Morphing Tokens Draw Strong Masked Image Models" (DTM, ICLR 2025).

The token morphing function phi_R (Sec. 3, Algorithm 1) groups the N patch tokens of an image into
N - sum(R) morphed tokens by k rounds of bipartite matching, R = [r_1, ..., r_k]. In each round p:

    split the current tokens into two sets A (sources) and B (destinations)     Algorithm 1, split
    cosine similarity between every source and every destination               Algorithm 1, similarity
    the r_p most similar (source, destination) pairs merge                     Algorithm 1, top-r_p
      (here, as ToMe and the official code: each source's most similar destination, the r_p best sources)
    a merged token is the mean of the tokens merged into it                    Algorithm 1, M_p
      (here size-weighted: the exact mean of the original tokens it contains; see below)

DTM then compares student predictions and teacher targets after both are averaged over the same groups
(the morphing matrix M applied to each). This file is the morphing alone, no model code, torch only
(its picture of the groups, `python morph.py IMAGE --out groups.png`, also needs Pillow and numpy):

    token_morphing(x, R, split)  Algorithm 1 -> groups (B, N): which morphed token each original token is in;
                                 split "random" (the paper), "alternate" (ToMe) or "official" (naver-ai/dtm)
    token_morphing_levels(x, Rs) the same for DTM's L schedules on one set of tokens, sharing the Gram matrix
    group_mean(x, groups, G)     M x: each morphed token is the mean of its members     (B, G, C)
    morph_back(y, groups)        every original position gets its group's value          (B, N, C)
    group_sizes(groups, G)       member counts                                           (B, G)
    morph_matrix(groups, G)      the dense row-normalized M (B, G, N): slow path, for teaching and tests
    sample_schedule(...)         the dynamic scheduler: random merged count n and iterations k per step
    make_schedule(N, n, k)       n merged tokens over k rounds -> R
    clamp_schedule(N, R)         the clamping rule below
    num_groups_after(N, R, split) N - sum(R) after clamping: the number of morphed tokens

Use: DTM's loss at one step with the official settings (dtm.dtm_loss is this with its options; test_morph.py runs
this block). target: the teacher's patch tokens (B, N, D) without CLS and any register tokens (a timm ViT's
forward_features(images)[:, vit.num_prefix_tokens:]; [:, 1:] would morph its registers as patches without an error),
pred: the student's (B, N, D) predictions at the same positions (visible and masked), likewise without its prefix
tokens, rng: a random.Random (seed it from the step). The groups come from the
teacher alone; every position counts once, holding its group's mean (a group weighs by its size); L = 2 levels:
    import torch
    import torch.nn.functional as F
    from morph import group_mean, group_sizes, num_groups_after, sample_schedule, token_morphing_levels
    B, N, _ = target.shape
    schedules = [sample_schedule(N, N, 14, rng, rule="official") for _ in range(2)]
    levels = token_morphing_levels(target, schedules, split="official")  # [(B, N) group ids] per level
    loss = 0.0
    for groups, R in zip(levels, schedules):
        G = num_groups_after(N, R, "official")
        diff = group_mean(pred - target, groups, G)  # (B, G, D) = mean(pred) - mean(target) per morphed token
        per_group = F.smooth_l1_loss(diff, torch.zeros_like(diff), beta=2.0, reduction="none").mean(-1)  # (B, G)
        loss = loss + (per_group * group_sizes(groups, G)).sum() / (B * N) / len(levels)

Where this file deliberately differs from the paper's literal text, and why:
  * M is never built. The paper writes M = M_k ... M_1, a product of per-round row-normalized matrices.
    We keep an index map instead (original token -> current token) and compute group means with
    scatter-adds: memory O(B N C) instead of O(B N^2) per round, and the loss needs no N x N products.
  * Merges are size weighted, so a morphed token is the exact mean of the original tokens it contains
    (as the official code does with ToMe's merge_wavg). A literal product of row-normalized 2-to-1
    averages would weight a token merged late more than tokens merged early.
  * Rounds carry the *sums* of their members' features. Cosine similarity is scale invariant, so the
    cosine of two sums equals the cosine of the two means: no size tensor is needed while matching.
    When N <= C only their inner products are carried: the Gram matrix x x^T (B, N, N), computed once
    (once for all L levels in token_morphing_levels); merging token s into d adds row s to row d and column
    s to column d, and a round reads the (sources x destinations) block of the Gram matrix instead of multiplying
    features. Memory O(B N^2) <= O(B N C) then. Nothing is ever compacted: a merged token lives on in the row of its
    destination and index maps say which rows are current.
  * The random split is ToMe's alternate split applied to a random permutation of the current tokens:
    sources are permuted positions 0, 2, 4, ..., destinations 1, 3, 5, ...  (|A| = ceil(T/2)). The permutation is
    of the current tokens in a fixed order (ascending by the row that holds each, a destination's original index),
    so it does not depend on the previous round's similarity order, which rounding can change.
    split="alternate" uses the tokens in their current order, exactly as ToMe's bipartite_soft_matching
    without a protected class token, including its token order after a merge: [unmerged sources sorted by
    similarity, descending; then destinations], so results compare token for token.
    split="official" is what the official DTM code computes (naver-ai/dtm engines/engine_for_dtm.py calls
    bm/merge.py bipartite_soft_matching(metric, r, class_token=True) on the teacher's patch tokens, whose CLS
    was already dropped): the current token at position 0 (original patch 0) is never merged, r_p is clamped to
    (T_p - 1) // 2, and the unmerged sources keep their order (sorted by index, as ToMe does to keep a class
    token first) instead of the similarity order.
  * Clamping (ToMe's rule): before round p with T current tokens, r_p <- min(r_p, (T - protected) // 2), with
    protected = 1 for split="official", else 0. Rounds with r_p = 0 are skipped (and draw no random numbers).
    Negative r_p is an error.
  * Float precision: matching runs in float32 (float64 for float64 input), also when called under autocast. On
    GPUs with TF32 matmuls on (as engine.setup turns them on) the float32 products round their inputs to TF32's
    10-bit mantissa. With the Gram matrix (N <= C, e.g. 196 CLIP tokens of 512 channels) the one product is of
    the tokens themselves: exact for bf16/fp16 tokens (a teacher's output under autocast), not for float32 ones.
    With N > C every round multiplies member sums, which TF32 rounds whatever the tokens' dtype.
    ToMe normalizes merged means where this file compares member sums; the cosines agree to rounding, so in
    float32 a near-tie in the similarity sort can order two edges differently from a ToMe implementation, and
    several rounds can then diverge. The tests compare against ToMe references in float64. The official code
    matches under CUDA's fp16 autocast (engines/engine_for_dtm.py:125 opens it around the morphing loop, so
    bm/merge.py:52's `a @ b.transpose(-1, -2)` of the normalized tokens runs in fp16, and merge_wavg averages fp16
    tokens): its near ties can resolve differently from this file's float32 ones.
  * Exact ties (duplicate tokens: flat patches of one colour) go to the sources that come first (a stable sort).
    Copies of a token tie exactly only where their products are exact (small integers, zero tokens): the matrix
    product can round one copy's inner products or squared norm 1 ulp off another's by its place in the product,
    and rounding then picks among them, which can change with x's memory layout (measured, torch 2.13 CPU: 20
    copies of a float64 token, 64 channels, 40 tokens, alternate split, r = 10: the last two copies, 1 ulp apart,
    merged in place of the 9th and 10th).
    ToMe's and the official code's edge sort (bm/merge.py:60, `argsort(descending=True)`) is not stable, so their
    choice among exact ties depends on the sort torch runs (torch 2.13 on the CPU: 17 or more equal values come out
    in another order). A stable sort there does not make them agree either (measured in float64 against the official
    code with its sort made stable: with 16 to 100 duplicates per image, some schedules' groups differed from the
    second round on), likely because merged duplicates that tie exactly in ToMe's normalized means need not tie in
    this file's member sums, or the other way round.
"""
import math
import operator
import random
import shlex
import sys

import torch

SPLITS = ("random", "alternate", "official")

# ---------------------------------------------------------------------------------------------------
# Schedules


def _protected(split: str) -> int:
    """Tokens a split never merges: the official code's first patch (ToMe's class_token=True), none otherwise."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return 1 if split == "official" else 0


def clamp_schedule(num_tokens: int, schedule, split: str = "random") -> list:
    """The schedule that token_morphing really runs: r_p <- min(r_p, (T_p - protected) // 2), T_p tokens before
    round p, protected = 1 for split="official" (ToMe's clamp with a class token), else 0."""
    clamped, tokens, protected = [], num_tokens, _protected(split)
    for r in schedule:
        try:
            r = operator.index(r)  # ints (also numpy / 0-d tensor ints); a float such as 2.7 is refused, not truncated
        except TypeError:
            raise TypeError(f"schedule {list(schedule)} has a non-integer entry {r!r}; tokens removed per round are "
                            f"integers") from None
        if r < 0:
            raise ValueError(f"schedule {list(schedule)} has a negative entry {r}; tokens removed per round must be "
                             ">= 0")
        cap = max(tokens - protected, 0) // 2
        # under torch.jit.trace num_tokens is a traced size, a tensor: min() would keep r or the cap as the traced N
        # chose (a cap read at another N merged half the tokens); clamp() keeps the rule for any N
        r = cap.clamp(max=r) if torch.is_tensor(cap) else min(r, cap)
        clamped.append(r)
        tokens = tokens - r  # not -=: the traced size itself would change
    return clamped


def num_groups_after(num_tokens: int, schedule, split: str) -> int:
    """Number of morphed tokens N - sum(R) after clamping. Pass token_morphing's split: "official" clamps more
    (see clamp_schedule); a count below the real one is an index error in group_mean (a device-side assert on a
    GPU)."""
    return num_tokens - sum(clamp_schedule(num_tokens, schedule, split))


def sample_schedule(num_tokens: int, max_merged: int, max_iters: int, rng: random.Random, rule: str = "spread") -> list:
    """The dynamic scheduler (Sec. 3.2; the paper draws the count of remaining tokens, the official parser's n counts
    merged ones): merged count n ~ U{0..max_merged}, iterations k ~ U{1..max_iters}, then
    make_schedule(num_tokens, n, k, rule, max_merged). rng is a random.Random (seed it from the step for
    reproducible runs without saved state). rule: "spread" (exactly n merges before clamping, which caps each round
    at half the tokens: n = 150 of 196 in 1 round merges 98) by default; train_pretrain.py's --schedule_rule
    defaults to "official" (the official code's), so pass rule="official" to compute r as it does.
    Called once per level, it draws n1, k1, n2, k2; naver-ai/dtm engines/engine_for_dtm.py:103-106 draws n1, n2,
    k1, k2: the same distribution, other values for the same seed."""
    if not isinstance(rng, random.Random) and rng is not random:  # numpy's randint excludes its upper bound
        raise TypeError(f"sample_schedule needs a random.Random (e.g. random.Random(seed)), got {type(rng).__name__}")
    if max_iters < 1 or max_merged < 0:
        raise ValueError(f"sample_schedule needs max_iters >= 1 rounds and max_merged >= 0 tokens, got "
                         f"max_iters={max_iters}, max_merged={max_merged}")
    n = rng.randint(0, max_merged)
    k = rng.randint(1, max_iters)
    return make_schedule(num_tokens, n, k, rule, max_merged)


def make_schedule(num_tokens: int, n: int, k: int, rule: str = "spread", max_merged: int = None) -> list:
    """n merged tokens over k rounds -> R = [r_1, ..., r_k].

    rule="spread": n is spread exactly over k rounds, r_p = n // k, plus one for the first n % k rounds,
        so sum(R) = n before clamping.
    rule="official": the official code's r = ceil(n / k) in every round, or floor(n / k) when
        ceil(n / k) * k > max_merged (default num_tokens; naver-ai/dtm engines/engine_for_dtm.py compares with
        --n1, whose default 196 is N); sum(R) = r * k can then differ from n by up to k - 1.
    The result is clamped with clamp_schedule's default rule; token_morphing clamps once more for its split.
    """
    if k < 1 or n < 0:
        raise ValueError(f"a schedule needs k >= 1 rounds and n >= 0 merged tokens, got n={n}, k={k}")
    if rule == "spread":
        schedule = [n // k + (1 if p < n % k else 0) for p in range(k)]
    elif rule == "official":
        r = math.ceil(n / k)
        if r * k > (num_tokens if max_merged is None else max_merged):
            r = n // k
        schedule = [r] * k
    else:
        raise ValueError(f"unknown schedule rule {rule!r}; use 'spread' or 'official'")
    return clamp_schedule(num_tokens, schedule)


# ---------------------------------------------------------------------------------------------------
# Algorithm 1


def _match_dtype(x: torch.Tensor) -> torch.dtype:
    """Matching runs in float32, float64 for float64 tokens (fp16/bf16 sums of many members would lose the order)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _random_order(batch: int, tokens: int, generator, device) -> torch.Tensor:
    """A random permutation of range(tokens) per sample (B, T); drawn on the generator's device."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(batch, tokens, generator=generator, device=gen_device).argsort(dim=1).to(device)


def _flat_index(index: torch.Tensor, rows_per_sample: int) -> torch.Tensor:
    """(B, K) per-sample row indices -> (B * K,) indices into the rows of a (B * T, C) view."""
    offsets = torch.arange(index.shape[0], device=index.device)[:, None] * rows_per_sample
    return (index + offsets).flatten()


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, T, C), index (B, K) -> x[b, index[b]] (B, K, C). Whole-row copies (much faster than gather)."""
    B, T, C = x.shape
    return x.reshape(B * T, C).index_select(0, _flat_index(index, T)).view(B, -1, C)


def _best_cosine(inner: torch.Tensor, sq_norm_a: torch.Tensor, sq_norm_b: torch.Tensor):
    """Each source's most similar destination by cosine: inner (B, Ta, Tb) -> best cosine, index (B, Ta).

    The source's norm does not change its argmax, so it scales only the (B, Ta) maxima. The rows hold member sums,
    not means (module docstring): another similarity put here must not depend on scale, as cosine does not.
    """
    best, index = (inner * _inverse_norm(sq_norm_b)[:, None, :]).max(dim=-1)
    return best * _inverse_norm(sq_norm_a), index


def _inverse_norm(sq_norm: torch.Tensor) -> torch.Tensor:
    """1 / norm, 0 for a zero token (cosine 0 with everything). No floor such as a clamp at 1e-24: tokens of norm
    below it would be matched by scaled inner products, not by cosine."""
    return torch.where(sq_norm > 0, sq_norm.rsqrt(), 0.0)


class _FeatureSums:
    """Member sums of every token (B, N, C), stored at the row of a surviving token. Memory O(B N C)."""

    def __init__(self, x: torch.Tensor):
        # a fresh contiguous copy: merge() adds rows through a (B * N, C) view, which a permuted x's strides refuse
        self.sums = x.to(_match_dtype(x), copy=True, memory_format=torch.contiguous_format)
        self.sq_norm = self.sums.pow(2).sum(-1)  # (B, N)

    def best_match(self, rows_a: torch.Tensor, rows_b: torch.Tensor):
        a, b = _gather_rows(self.sums, rows_a), _gather_rows(self.sums, rows_b)  # (B, Ta, C), (B, Tb, C)
        inner = a @ b.transpose(1, 2)  # (B, Ta, Tb)
        return _best_cosine(inner, self.sq_norm.gather(1, rows_a), self.sq_norm.gather(1, rows_b))

    def merge(self, src: torch.Tensor, dst: torch.Tensor):
        B, N, C = self.sums.shape
        self.sums.view(B * N, C).index_add_(0, _flat_index(dst, N), _gather_rows(self.sums, src).flatten(0, 1))
        self.sq_norm.scatter_(1, dst, _gather_rows(self.sums, dst).pow(2).sum(-1))


class _GramOfSums:
    """Inner products of member sums, gram[i, j] = <s_i, s_j> (B, N, N), from one bmm of the inputs.

    Used when N <= C: memory O(B N^2) <= O(B N C), and a round reads a (B, T/2, T/2) block instead of
    multiplying (B, T, C) features. Merging token s into d adds row s to row d, then column s to column d.
    """

    def __init__(self, gram: torch.Tensor):
        self.gram = gram  # (B, N, N), updated in place

    def best_match(self, rows_a: torch.Tensor, rows_b: torch.Tensor):
        B, N, _ = self.gram.shape
        inner = _gather_rows(self.gram, rows_a).gather(2, rows_b[:, None, :].expand(-1, rows_a.shape[1], -1))
        diagonal = self.gram.view(B, N * N)[:, :: N + 1]  # squared norms (B, N)
        return _best_cosine(inner, diagonal.gather(1, rows_a), diagonal.gather(1, rows_b))

    def merge(self, src: torch.Tensor, dst: torch.Tensor):
        B, N, _ = self.gram.shape
        self.gram.view(B * N, N).index_add_(0, _flat_index(dst, N), _gather_rows(self.gram, src).flatten(0, 1))
        columns = self.gram.gather(2, src[:, None, :].expand(B, N, -1))  # (B, N, r)
        self.gram.scatter_add_(2, dst[:, None, :].expand(B, N, -1), columns)


def _match(store, rows: torch.Tensor, r: int, protect_first: bool):
    """One round of Algorithm 1 on the current tokens `rows` (B, T), already in split order.

    Sources are positions 0, 2, 4, ..., destinations 1, 3, 5, ... Returns the store rows of the r merged
    sources and of their destinations (B, r), and the surviving tokens in ToMe's order (B, T - r):
    unmerged sources by similarity (descending), then all destinations. protect_first (ToMe's class_token=True):
    the token at position 0 never merges and the unmerged sources keep their order (position 0 stays first).
    """
    rows_a, rows_b = rows[:, 0::2], rows[:, 1::2]
    best_sim, best_dst = store.best_match(rows_a, rows_b)  # each source's most similar destination (B, Ta)
    if protect_first:
        best_sim[:, 0] = -math.inf
    by_sim = best_sim.sort(dim=-1, descending=True, stable=True).indices
    src, unmerged = by_sim[:, :r], by_sim[:, r:]  # top-r_p edges
    if protect_first:
        unmerged = unmerged.sort(dim=-1).values
    src_rows, dst_rows = rows_a.gather(1, src), rows_b.gather(1, best_dst.gather(1, src))
    return src_rows, dst_rows, torch.cat([rows_a.gather(1, unmerged), rows_b], dim=1)


@torch.no_grad()
def token_morphing(x: torch.Tensor, schedule, split: str = "random", generator: torch.Generator = None) -> torch.Tensor:
    """Algorithm 1: partition the N tokens of x (B, N, C) into N - sum(schedule) groups.

    x holds patch tokens only: drop a CLS token first, as the official code does (split="official" protects the
    first *patch*, not a CLS), and any register tokens (timm: x[:, vit.num_prefix_tokens:]). Any (B, N, C) layout
    works (e.g. a transposed conv output); x is not modified.
    Returns groups (B, N) int64: groups[b, i] is the morphed token that original token i belongs to,
    taking every value in 0..G-1 (G = num_groups_after(N, schedule, split)) in the final token order.
    split is "random" (per sample, reproducible with `generator`, which may live on any device), "alternate"
    (ToMe's even/odd split) or "official" (the official code's: ToMe's with the first token protected).
    The random split draws one (B, T) tensor per round, so an image's groups depend on the batch it is in (its
    position and the batch size), not only on the seed. Without `generator` it draws from the global RNG of x's
    device (torch.rand), so the caller's later random numbers depend on the schedule: pass a generator to keep
    them apart.
    torch.compile: the schedule is part of the graph (its r_p size the tensors), so a compiled function that calls this
    compiles again for every new schedule; with sample_schedule's new one each step it runs uncompiled after dynamo's
    recompile limit (8 schedules), with a logged warning only (fullgraph=True: FailOnRecompileLimitHit). Morph
    outside the compiled function and pass the groups and their counts in (as dtm.DTMPretrainModel's forward takes
    them): group_mean compiles once more for new counts, not per schedule. split="random" with a generator breaks the
    graph at each round's draw; without one, inductor draws its own random numbers (other groups than eager's).
    torch.jit.trace keeps clamp_schedule's rule: eager's groups for any batch size and number of tokens, but the rounds
    are those the traced N ran: one clamped to 0 there is left out (at a larger N, fewer merges without an error), and
    one that clamps to 0 only at the N it runs on fails (a RuntimeError of max() over no destinations).
    """
    if not hasattr(schedule, "__iter__"):
        raise TypeError(f"token_morphing takes one schedule, a list of tokens merged per round (e.g. [7] * 14), got "
                        f"{schedule!r}; for several levels use token_morphing_levels")
    return token_morphing_levels(x, [schedule], split, generator)[0]


@torch.no_grad()
def token_morphing_levels(x: torch.Tensor, schedules, split: str = "random", generator: torch.Generator = None) -> list:
    """token_morphing of the same tokens with several schedules (DTM's L levels) -> [groups (B, N), ...].

    Equal to [token_morphing(x, s, split, generator) for s in schedules] (same random draws, in order),
    but the Gram matrix of the tokens is computed once for all levels.
    """
    with torch.autocast(x.device.type, enabled=False):  # matching in float32 even if called under autocast
        return _morphing_levels(x, schedules, split, generator)


def _morphing_levels(x, schedules, split, generator) -> list:
    if x.dim() != 3:
        raise ValueError(f"token_morphing expects x of shape (B, N, C), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"token_morphing expects floating point tokens, got {x.dtype}; pass x.float()")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), got "
                        f"{type(generator).__name__} {generator!r}")
    B, N, C = x.shape
    if C == 0:
        raise ValueError(f"token_morphing needs tokens of at least one channel, got x of shape {tuple(x.shape)}; pass "
                         f"the tokens' features, x of shape (B, N, C) with C >= 1")
    levels = [[r for r in clamp_schedule(N, schedule, split) if r > 0] for schedule in _list_of_schedules(schedules)]
    if B == 0:
        return [torch.zeros(0, N, dtype=torch.long, device=x.device) for _ in levels]
    uses_gram = [bool(rounds) and N <= C for rounds in levels]
    gram = None
    groups = []
    for level, rounds in enumerate(levels):
        if not rounds:
            store = None
        elif uses_gram[level]:
            if gram is None:
                x32 = x.to(_match_dtype(x))
                gram = x32 @ x32.transpose(1, 2)
            store = _GramOfSums(gram.clone() if any(uses_gram[level + 1:]) else gram)
        else:
            store = _FeatureSums(x)
        groups.append(_morph(store, rounds, B, N, split, generator, x.device))
    return groups


def _list_of_schedules(schedules) -> list:
    """Checks that `schedules` is a list of schedules (lists of ints), not one schedule."""
    schedules = list(schedules)
    if not all(hasattr(s, "__iter__") and getattr(s, "ndim", 1) == 1 for s in schedules):  # also numpy / tensor ints
        raise TypeError(f"token_morphing_levels takes a list of schedules, e.g. [[7] * 14, [49, 49]], got {schedules}")
    return schedules


def _morph(store, rounds: list, B: int, N: int, split: str, generator, device) -> torch.Tensor:
    """The rounds of Algorithm 1 on one store -> groups (B, N). Nothing is compacted: a merged token lives on in
    the store row of its destination, `rows` lists the store rows of the current tokens, `owner` the store row
    of every original token."""
    identity = torch.arange(N, device=device).expand(B, N)
    rows, owner = identity, identity  # (B, T), (B, N)
    for r in rounds:
        if split == "random":  # Algorithm 1's random split: the even/odd split of a random order of the current
            # tokens, taken from their ascending store rows: the split then depends on which tokens are current, not on
            # the previous round's similarity order (float32 and float64 can order near-equal cosines differently)
            rows = rows.sort(dim=1).values.gather(1, _random_order(B, rows.shape[1], generator, device))
        src_rows, dst_rows, rows = _match(store, rows, r, protect_first=split == "official")
        store.merge(src_rows, dst_rows)
        owner = identity.scatter(1, src_rows, dst_rows).gather(1, owner)  # members of a source follow it
    group_of_row = torch.zeros(B, N, dtype=torch.long, device=device)
    group_of_row.scatter_(1, rows, torch.arange(rows.shape[1], device=device).expand_as(rows))
    return group_of_row.gather(1, owner)


# ---------------------------------------------------------------------------------------------------
# Applying a partition (differentiable; the same for student predictions and teacher targets)


def group_sizes(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Number of original tokens in each group (B, G), float32."""
    sizes = torch.zeros(groups.shape[0], num_groups, device=groups.device)
    return sizes.scatter_add_(1, groups, torch.ones_like(groups, dtype=sizes.dtype))


def group_mean(x: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Morphed tokens M x: the mean of the original tokens of each group. x (B, N, C) -> (B, G, C).

    num_groups may be any bound above the largest group id (e.g. N): a group id without members gives a zero row.
    An id >= num_groups is an index error (on a GPU a device-side assert): take num_groups from num_groups_after
    with token_morphing's split, or use N.
    Accumulates in float32 (float64 for float64 x) and returns x's dtype; differentiable in x (the backward is a
    gather).
    """
    if x.dim() != 3:
        raise ValueError(f"group_mean needs x of shape (B, N, C), got {tuple(x.shape)}; for one value per token pass "
                         f"x[..., None]")
    if not x.is_floating_point():  # a mean cut to an integer in x's dtype
        raise TypeError(f"group_mean needs floating point x, got {x.dtype}: the mean of integers is no integer; pass "
                        f"x.float()")
    B, N, C = x.shape
    if groups.shape != (B, N):
        extra = N - groups.shape[1] if groups.dim() == 2 and groups.shape[0] == B else 0
        hint = f" (if x starts with {extra} CLS / register tokens: pass its patch tokens, x[:, {extra}:])" * (extra > 0)
        raise ValueError(f"groups {tuple(groups.shape)} must match the first two dims of x {tuple(x.shape)}{hint}")
    sums = torch.zeros(B * num_groups, C, device=x.device, dtype=_match_dtype(x))
    sums.index_add_(0, _flat_index(groups, num_groups), x.reshape(B * N, C).to(sums.dtype))
    sums = sums.view(B, num_groups, C)
    return (sums / group_sizes(groups, num_groups).clamp(min=1)[..., None]).to(x.dtype)


def morph_back(x_groups: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Every original token position gets its group's value: (B, G, C) -> (B, N, C). An id >= G is an index error."""
    if x_groups.dim() != 3:  # (B, G): the index error of gather named no fix
        raise ValueError(f"morph_back needs x_groups of shape (B, G, C), got {tuple(x_groups.shape)}; for one value "
                         f"per group pass x_groups[..., None] (and take [..., 0] of the result)")
    if groups.dim() != 2 or groups.shape[0] != x_groups.shape[0]:
        raise ValueError(f"groups {tuple(groups.shape)} must be (B, N) with the batch of x_groups "
                         f"{tuple(x_groups.shape)}")
    return x_groups.gather(1, groups[..., None].expand(-1, -1, x_groups.shape[-1]))  # per sample: ids bounds-checked


def morph_matrix(groups: torch.Tensor, num_groups: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense row-normalized morphing matrix M (B, G, N), M[b, g, i] = 1/|g| if token i is in g.

    Slow path (O(B G N) memory) for teaching, visualization and tests: group_mean(x) == M @ x (dtype=x.dtype).
    """
    one_hot = torch.nn.functional.one_hot(groups, num_groups).transpose(1, 2).to(dtype)  # (B, G, N)
    return one_hot / one_hot.sum(-1, keepdim=True).clamp(min=1)  # empty groups (num_groups an upper bound): 0 rows


# ---------------------------------------------------------------------------------------------------
# Visualization: python morph.py IMAGE.jpg --schedule 14x7 2x49 --out groups.png

def parse_schedule(text: str) -> list:
    """'14x7' -> fourteen rounds of r=7; '49,49' -> [49, 49]; '0' -> [0]."""
    try:
        if "x" in text:
            rounds, r = text.split("x")
            rounds, schedule = int(rounds), [int(r)] * int(rounds)
        else:
            rounds, schedule = 1, [int(r) for r in text.split(",")]
    except ValueError:
        raise ValueError(f"cannot read schedule {text!r}; write KxR (K rounds of r=R, e.g. 14x7) or r1,r2,... "
                         f"(e.g. 49,49)") from None
    if rounds < 1:
        raise ValueError(f"schedule {text!r} has {rounds} rounds; KxR needs K >= 1 (no merge: 0)")
    if min(schedule) < 0:
        raise ValueError(f"schedule {text!r} removes a negative number of tokens; each round's r must be >= 0")
    return schedule


def _load_square_image(path: str, size: int):
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as img:
            mode = img.mode
            # convert("RGB") clips more than 8 bits at 255 (a white picture): 16-bit grey scaled as data.load_image
            if mode.startswith("I;16") or (mode == "I" and img.format == "PPM"):
                img = Image.fromarray(np.rint(np.asarray(img, dtype=np.float64) / 257).astype(np.uint8), "L")
            elif mode in ("I", "F"):
                kind = "float" if mode == "F" else "integer"
                raise SystemExit(f"error: image {path!r} has mode {mode!r} (32-bit {kind} pixels), whose range is not "
                                 f"known: convert it to 8-bit RGB or grayscale")
            img = img.convert("RGB")
    except Image.DecompressionBombError as e:  # a valid file above Pillow's pixel limit (no OSError)
        raise SystemExit(f"error: image {path!r} is too large for Pillow's decompression-bomb limit ({e}); downscale "
                         f"the file, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it")
    except (FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: cannot read image {path!r}: {e}")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def _to_tensor(img) -> torch.Tensor:
    """PIL RGB image -> float tensor (H, W, 3) in 0..255."""
    import numpy as np
    return torch.from_numpy(np.array(img, dtype=np.float32))


def _patches(img, patch: int) -> torch.Tensor:
    """PIL image (S, S) -> patch pixels (1, N, 3 * patch * patch), each channel standardized over the image."""
    pixels = _to_tensor(img)
    pixels = (pixels - pixels.mean(dim=(0, 1))) / pixels.std(dim=(0, 1)).clamp(min=1e-6)
    g = img.height // patch
    return pixels.view(g, patch, g, patch, 3).permute(0, 2, 1, 3, 4).reshape(1, g * g, patch * patch * 3)


def _draw_panel(img, groups: torch.Tensor, patch: int, title: str):
    """Top: the image tinted by group with group boundaries; bottom: every patch painted as its group's mean patch
    (pixel by pixel, so a group of unlike patches shows a blend of their pixels)."""
    from PIL import Image, ImageDraw
    size, g = img.width, img.width // patch
    num_groups = int(groups.max()) + 1
    palette = torch.rand(num_groups, 3, generator=torch.Generator().manual_seed(0)) * 255
    tint = palette[groups].view(g, g, 3).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    rgb = _to_tensor(img)
    tinted = Image.fromarray((0.55 * rgb + 0.45 * tint).byte().numpy())
    draw = ImageDraw.Draw(tinted)
    grid = groups.view(g, g)
    for i in range(g):  # boundaries between patches of different groups (drawing only, not a hot path)
        for j in range(g):
            if j + 1 < g and grid[i, j] != grid[i, j + 1]:
                draw.line([((j + 1) * patch, i * patch), ((j + 1) * patch, (i + 1) * patch)], fill="white", width=2)
            if i + 1 < g and grid[i, j] != grid[i + 1, j]:
                draw.line([(j * patch, (i + 1) * patch), ((j + 1) * patch, (i + 1) * patch)], fill="white", width=2)
    rgb_patches = rgb.view(g, patch, g, patch, 3).permute(0, 2, 1, 3, 4).reshape(1, g * g, -1)
    means = morph_back(group_mean(rgb_patches, groups[None], num_groups), groups[None])
    means = means.view(g, g, patch, patch, 3).permute(0, 2, 1, 3, 4).reshape(size, size, 3)
    panel = Image.new("RGB", (size, 2 * size + 20), "white")
    panel.paste(tinted, (0, 20))
    panel.paste(Image.fromarray(means.round().byte().numpy()), (0, size + 20))
    ImageDraw.Draw(panel).text((4, 4), f"{title}: {num_groups} tokens", fill="black")
    return panel


def main(argv=None):
    import argparse
    import os
    from PIL import Image
    parser = argparse.ArgumentParser(description="Draw the token groups that morphing (Algorithm 1) makes on an "
                                     "image, matching on its patch pixels (each channel standardized over the image).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("image", type=os.path.expanduser, help="path to an image (any format Pillow reads)")
    parser.add_argument("--schedule", nargs="+", default=["2x49", "14x7", "14x13"],
                        help="schedules to draw side by side: KxR (K rounds of r=R) or r1,r2,...")
    parser.add_argument("--split", default="random", choices=SPLITS,
                        help="the split of Algorithm 1: random (the paper), alternate (ToMe's even/odd), official "
                             "(ToMe with patch 0 protected, the official code)")
    parser.add_argument("--img_size", type=int, default=224, help="shorter side resized to this, then center-cropped")
    parser.add_argument("--patch_size", type=int, default=16, help="patch side in pixels: one token per patch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split (--split random)")
    parser.add_argument("--out", default="groups.png", type=os.path.expanduser,  # --out=~/x.png: no shell expands it
                        help="the picture written (any type Pillow writes)")
    args = parser.parse_args(argv)
    if args.patch_size < 1:  # a ZeroDivisionError (0) or a reshape error (negative) once
        raise SystemExit(f"error: --patch_size {args.patch_size}: a patch is at least 1 pixel; use e.g. 16")
    if not -2 ** 63 <= args.seed < 2 ** 64:  # torch's manual_seed range (a ValueError traceback once), as the trainers'
        raise SystemExit(f"error: --seed must be in -2**63..2**64 - 1, got {args.seed}")
    if args.img_size < 1 or args.img_size % args.patch_size:  # 0 or negative: Pillow's resize error once
        below = args.img_size // args.patch_size * args.patch_size
        near = f"{below} or {below + args.patch_size}" if below > 0 else f"{args.patch_size}"
        raise SystemExit(f"error: --img_size {args.img_size} is not a positive multiple of --patch_size "
                         f"{args.patch_size}; use {near}")
    Image.init()  # --out checked before the work: a file type Pillow writes, in a folder that exists
    if Image.registered_extensions().get(os.path.splitext(args.out)[1].lower()) not in Image.SAVE:
        raise SystemExit(f"error: --out {args.out!r}: Pillow writes no file of that extension; use e.g. groups.png")
    folder = above = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(above):  # a file in the path: mkdir -p cannot get past it
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise SystemExit(f"error: --out {args.out!r}: {above!r} is a file, not a folder; give a path in a folder")
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --out {args.out!r}: {folder!r} is not a folder; create it first "
                         f"(mkdir -p {shlex.quote(folder)})")

    try:
        schedules = [parse_schedule(text) for text in args.schedule]
    except ValueError as e:
        parser.error(f"--schedule: {e}")
    img = _load_square_image(args.image, args.img_size)
    tokens = _patches(img, args.patch_size)
    panels = []
    for text, schedule in zip(args.schedule, schedules):
        groups = token_morphing(tokens, schedule, args.split, torch.Generator().manual_seed(args.seed))[0]
        panels.append(_draw_panel(img, groups, args.patch_size, text))
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), panels[0].height), "white")
    for k, panel in enumerate(panels):
        sheet.paste(panel, (k * (panel.width + 8), 0))
    try:
        sheet.save(args.out)
    except (OSError, ValueError) as e:  # an unwritable folder, a full disk, a format not for RGB: a traceback once
        if isinstance(e, OSError) and e.errno is not None:  # the file system's refusal: the format is not the cause
            raise SystemExit(f"error: --out {args.out!r}: cannot write it ({e}); give a path in a folder you can "
                             f"write to") from None
        raise SystemExit(f"error: --out {args.out!r}: Pillow could not write it ({e}); use e.g. groups.png") from None
    print(f"wrote {args.out}: {len(panels)} schedule{'s' * (len(panels) != 1)} on {tokens.shape[1]} tokens")


if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):  # an --out stdout cannot encode (not UTF-8: b'r\xe9s.png'), escaped
        sys.stdout.reconfigure(errors="backslashreplace")  # as engine.escape_what_stdout_cannot_encode
    main()
