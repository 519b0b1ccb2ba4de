"""Tests for morph.py (Algorithm 1 of DTM) against references written here, independent of morph.py."""
import math
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import morph
from morph import (clamp_schedule, group_mean, group_sizes, make_schedule, morph_back, morph_matrix,
                   num_groups_after, parse_schedule, sample_schedule, token_morphing, token_morphing_levels)


# --------------------------------------------------------------------------------------------------
# References


def naive_algorithm1(x, schedule, split, seed=0):
    """Algorithm 1 per sample with Python lists of member indices, float64 means recomputed from scratch.

    Consumes random numbers exactly as documented in morph.py: one torch.rand(B, T) per non-empty round, permuting
    the current groups taken in ascending order of their first member.
    """
    B, N, _ = x.shape
    x = x.double()
    gen = torch.Generator().manual_seed(seed)
    tokens = [[[i] for i in range(N)] for _ in range(B)]  # per sample: list of groups, in current order
    T = N
    for r in schedule:
        r = min(r, T // 2)
        if r == 0:
            continue
        orders = torch.rand(B, T, generator=gen).argsort(dim=1) if split == "random" else None
        for b in range(B):
            by_row = sorted(tokens[b], key=lambda g: g[0])  # a group's row: its first member, a destination's index
            cur = tokens[b] if orders is None else [by_row[i] for i in orders[b].tolist()]
            A, D = cur[0::2], [list(g) for g in cur[1::2]]
            mean = lambda g: x[b, g].mean(0)
            best = []
            for g in A:
                sims = [torch.nn.functional.cosine_similarity(mean(g), mean(d), dim=0).item() for d in D]
                j = max(range(len(D)), key=lambda j: (sims[j], -j))  # first maximum
                best.append((sims[j], j))
            by_sim = sorted(range(len(A)), key=lambda i: -best[i][0])  # stable, descending
            for i in by_sim[:r]:
                D[best[i][1]] += A[i]
            tokens[b] = [A[i] for i in by_sim[r:]] + D
        T -= r
    groups = torch.empty(B, N, dtype=torch.long)
    for b in range(B):
        for g, members in enumerate(tokens[b]):
            groups[b, members] = g
    return groups


def tome_dense(x, schedule, class_token=False):
    """ToMe-style bipartite soft matching with size-weighted merges and a dense source matrix (B, T, N).

    class_token=True: the official DTM code's call on CLS-less tokens: the token at position 0 never merges
    (its scores are -inf), r <= (T - 1) // 2, and the unmerged sources are re-sorted by their index."""
    B, N, C = x.shape
    size = torch.ones(B, N, 1, dtype=x.dtype)
    source = torch.eye(N, dtype=x.dtype).expand(B, N, N)
    for r in schedule:
        T = x.shape[1]
        r = min(r, (T - class_token) // 2)
        if r <= 0:
            continue
        metric = x / x.norm(dim=-1, keepdim=True)
        scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)
        if class_token:
            scores[:, 0, :] = -float("inf")
        node_max, node_idx = scores.max(dim=-1)
        edges = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edges[:, r:], edges[:, :r]
        if class_token:
            unm_idx = unm_idx.sort(dim=1).values
        dst_idx = node_idx[..., None].gather(1, src_idx)

        def merge(t, mode):
            src, dst = t[:, 0::2], t[:, 1::2]
            c = t.shape[-1]
            unm = src.gather(1, unm_idx.expand(-1, -1, c))
            src = src.gather(1, src_idx.expand(-1, -1, c))
            return torch.cat([unm, dst.scatter_reduce(1, dst_idx.expand(-1, -1, c), src, reduce=mode)], dim=1)

        x = merge(x * size, "sum")
        size = merge(size, "sum")
        x = x / size
        source = merge(source, "amax")
    return source.argmax(dim=1), x  # groups (B, N), merged tokens (B, G, C)


def is_partition(groups, num_groups):
    return all(sorted(set(g.tolist())) == list(range(num_groups)) for g in groups)


SCHEDULES = [[7] * 5, [12, 6], [1], [3, 0, 5, 2], [20, 20, 20]]


# --------------------------------------------------------------------------------------------------
# Algorithm 1


@pytest.mark.parametrize("dim", [8, 40])
@pytest.mark.parametrize("split", ["random", "alternate"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_partition_with_expected_group_count(split, schedule, dim):
    x = torch.randn(3, 37, dim)
    groups = token_morphing(x, schedule, split, torch.Generator().manual_seed(1))
    G = num_groups_after(37, schedule, split)
    assert G == 37 - sum(clamp_schedule(37, schedule))
    assert groups.shape == (3, 37) and groups.dtype == torch.long
    assert is_partition(groups, G)


@pytest.mark.parametrize("split", ["random", "alternate"])
def test_each_round_merges_exactly_r_and_coarsens(split):
    x = torch.randn(4, 49, 16)
    schedule = [5, 9, 3, 7]
    previous = torch.arange(49).expand(4, 49)
    for p in range(1, len(schedule) + 1):
        groups = token_morphing(x, schedule[:p], split, torch.Generator().manual_seed(3))
        for b in range(4):
            assert len(set(groups[b].tolist())) == len(set(previous[b].tolist())) - schedule[p - 1]
            for g in set(previous[b].tolist()):  # the previous groups are never split
                assert len(set(groups[b, previous[b] == g].tolist())) == 1
        previous = groups


# C < N matches on carried feature sums, C >= N on their Gram matrix: both must be exact
@pytest.mark.parametrize("dim", [16, 48])
@pytest.mark.parametrize("split", ["random", "alternate"])
@pytest.mark.parametrize("schedule", SCHEDULES + [[60]])
def test_equals_naive_per_sample_algorithm1(split, schedule, dim):
    x = torch.randn(3, 37, dim, generator=torch.Generator().manual_seed(7))
    expected = naive_algorithm1(x, schedule, split, seed=5)
    got = token_morphing(x, schedule, split, torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dim", [12, 64])
@pytest.mark.parametrize("schedule", [[7] * 5, [13, 13], [2, 9, 1, 4], [100]])
def test_alternate_split_matches_tome_dense(schedule, dim):
    x = torch.randn(4, 50, dim, generator=torch.Generator().manual_seed(11))
    expected_groups, expected_tokens = tome_dense(x, schedule)
    groups = token_morphing(x, schedule, "alternate")
    assert torch.equal(groups, expected_groups)
    G = num_groups_after(50, schedule, "alternate")
    torch.testing.assert_close(group_mean(x, groups, G), expected_tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [12, 64])  # feature sums / Gram matrix
@pytest.mark.parametrize("schedule", [[7] * 5, [13, 13], [2, 9, 1, 4], [100], [24, 12, 6, 3, 2, 1]])
def test_official_split_matches_tome_with_class_token(schedule, dim):
    """The official code's matching, token for token, in float64; [100] and [24, ...] hit the (T - 1) // 2 clamp."""
    x = torch.randn(4, 49, dim, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    expected_groups, expected_tokens = tome_dense(x, schedule, class_token=True)
    groups = token_morphing(x, schedule, "official")
    assert torch.equal(groups, expected_groups)
    G = num_groups_after(49, schedule, "official")
    assert G == expected_tokens.shape[1] and G == 49 - sum(clamp_schedule(49, schedule, "official"))
    torch.testing.assert_close(group_mean(x, groups, G), expected_tokens)
    assert (groups[:, 1:] != groups[:, :1]).all()  # patch 0 is never merged
    if schedule == [100]:
        assert clamp_schedule(49, schedule, "official") == [24] and clamp_schedule(49, schedule) == [24]
        assert clamp_schedule(50, schedule, "official") == [24] and clamp_schedule(50, schedule) == [25]
    alternate = token_morphing(x, schedule, "alternate")  # without the protection: another partition
    assert not torch.equal(alternate, groups)


@pytest.mark.parametrize("dim", [8, 64])  # feature sums / shared Gram matrix
@pytest.mark.parametrize("split", ["random", "alternate", "official"])
def test_levels_equal_separate_calls(split, dim):
    x = torch.randn(3, 40, dim)
    schedules = [[4] * 6, [], [15, 15], [0], [3, 1, 9]]
    gen = torch.Generator().manual_seed(4)
    expected = [token_morphing(x, s, split, gen) for s in schedules]
    got = token_morphing_levels(x, schedules, split, torch.Generator().manual_seed(4))
    assert len(got) == len(schedules) and all(torch.equal(a, b) for a, b in zip(got, expected))
    for one_schedule in ([7, 7], [np.int64(7), np.int64(7)], [torch.tensor(7), 7]):  # a flat list is one schedule
        with pytest.raises(TypeError, match="list of schedules"):
            token_morphing_levels(x, one_schedule)
    assert torch.equal(token_morphing_levels(x, [np.array([15, 15])], split, torch.Generator().manual_seed(4))[0],
                       token_morphing(x, [15, 15], split, torch.Generator().manual_seed(4)))
    with pytest.raises(TypeError, match="torch.Generator"):  # a seed is not a generator
        token_morphing(x, [4], split, 4)
    empty = token_morphing_levels(x[:0], schedules, split)  # an empty batch: no groups to find, no error
    assert [g.shape for g in empty] == [(0, 40)] * len(schedules) and empty[0].dtype == torch.long


def test_random_split_reproducible_and_per_sample():
    x = torch.randn(1, 64, 8).expand(6, 64, 8)  # the same tokens in every sample
    a = token_morphing(x, [8, 8], "random", torch.Generator().manual_seed(0))
    b = token_morphing(x, [8, 8], "random", torch.Generator().manual_seed(0))
    c = token_morphing(x, [8, 8], "random", torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(g.tolist()) for g in a}) > 1  # samples get different splits
    alt = token_morphing(x, [8, 8], "alternate")
    assert all(torch.equal(g, alt[0]) for g in alt)  # ... while the alternate split is deterministic


def same_partition(a, b):
    """Whether group ids a, b (B, N) make the same groups in every sample (labels may differ)."""
    return torch.equal(a[:, :, None] == a[:, None, :], b[:, :, None] == b[:, None, :])


def test_random_split_does_not_depend_on_the_previous_rounds_token_order():
    # near-equal cosines: float32 and float64 order the unmerged sources differently after a round; the random split
    # permutes the current tokens from a fixed order, so the same seed gives the same groups in both
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64) + 0.1 * torch.randn(8, 196, 64)
    for schedule in ([7] * 14, [20] * 5):
        single = token_morphing(x, schedule, "random", torch.Generator().manual_seed(0))
        double = token_morphing(x.double(), schedule, "random", torch.Generator().manual_seed(0))
        assert same_partition(single, double)


def test_random_split_draws_from_the_generator_or_else_the_global_rng():
    x = torch.randn(2, 20, 8)
    state = torch.get_rng_state()
    token_morphing(x, [5, 5], "random", torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # a generator leaves the caller's draws alone
    token_morphing(x, [5, 5], "random")
    assert not torch.equal(torch.get_rng_state(), state)  # documented: without one, torch.rand's global RNG


def test_identity_for_empty_or_zero_schedules():
    x = torch.randn(2, 10, 4)
    for schedule in ([], [0], [0, 0, 0]):
        for split in ("random", "alternate"):
            assert torch.equal(token_morphing(x, schedule, split), torch.arange(10).expand(2, 10))


def test_schedule_clamping():
    assert clamp_schedule(10, [100]) == [5]
    assert clamp_schedule(10, [3, 3, 3, 3]) == [3, 3, 2, 1]  # T: 10 -> 7 -> 4 -> 2 -> 1
    assert clamp_schedule(196, [196]) == [98]
    assert clamp_schedule(1, [1]) == [0]
    with pytest.raises(ValueError, match="negative"):
        clamp_schedule(10, [2, -1])
    groups = token_morphing(torch.randn(2, 10, 4), [100, 100], "random")
    assert num_groups_after(10, [100, 100], "random") == 3 and is_partition(groups, 3)


def test_single_sample_odd_count_and_bad_input():
    groups = token_morphing(torch.randn(1, 3, 5), [1, 1], "alternate")
    assert is_partition(groups, 1)
    with pytest.raises(ValueError, match="B, N, C"):
        token_morphing(torch.randn(3, 5), [1])
    with pytest.raises(ValueError, match="split"):
        token_morphing(torch.randn(1, 3, 5), [1], "odd")


@pytest.mark.parametrize("split", ["random", "alternate", "official"])
@pytest.mark.parametrize("dim", [12, 40])  # feature sums (N > C) / Gram matrix (N <= C)
def test_any_memory_layout(split, dim):
    """Tokens laid out as a transposed conv output (B, C, N) -> (B, N, C), or CLIP's (N, B, C), merge as when
    contiguous. The feature sums' copy once kept such strides and could not be viewed as (B * N, C)."""
    tokens = torch.randn(3, dim, 20).transpose(1, 2)  # (B, N, C), channels contiguous per token: not viewable
    lnd = torch.randn(20, 3, dim).permute(1, 0, 2)
    for x in (tokens, lnd):
        assert not x.is_contiguous()
        got = token_morphing(x, [3, 3, 3], split, torch.Generator().manual_seed(4))
        expected = token_morphing(x.contiguous(), [3, 3, 3], split, torch.Generator().manual_seed(4))
        assert torch.equal(got, expected)


def test_schedules_must_be_lists_of_integers():
    x = torch.randn(2, 10, 4)
    with pytest.raises(TypeError, match="token_morphing takes one schedule"):
        token_morphing(x, 3)
    with pytest.raises(TypeError, match="non-integer entry 2.7"):  # not truncated to 2
        token_morphing(x, [2.7])
    with pytest.raises(TypeError, match="non-integer"):
        clamp_schedule(10, [1, 2.0])
    assert clamp_schedule(10, [torch.tensor(2), True + 1]) == [2, 2]  # integer types other than int are fine


def test_group_helpers_check_the_batch():
    groups = token_morphing(torch.randn(2, 10, 4), [3], "random")
    with pytest.raises(ValueError, match="batch"):
        morph_back(torch.randn(3, 7, 5), groups)
    with pytest.raises(ValueError, match="first two dims"):
        group_mean(torch.randn(3, 10, 5), groups, 7)
    ids = torch.tensor([[0, 2], [0, 1]])  # sample 0 names a group 2 that a (2, 2, C) input does not have
    for bad in (lambda: morph_back(torch.randn(2, 2, 3), ids), lambda: group_mean(torch.randn(2, 2, 3), ids, 2)):
        with pytest.raises(RuntimeError, match="out of bounds|out of range"):  # not sample 1's row 0
            bad()
    assert clamp_schedule(0, [1], "official") == [0] and num_groups_after(0, [1], "official") == 0


def test_group_helpers_name_the_fix_for_a_cls_token_and_for_one_value_per_group():
    """A student's output with its CLS token (B, 1 + N, D) failed group_mean naming only the shapes, and per-group
    values (B, G) spread back with morph_back failed inside gather ("Index tensor must have the same number of
    dimensions as input tensor"); both name the fix now, which gives the values (found by a copy-the-file review)."""
    x = torch.randn(2, 10, 4)
    groups = token_morphing(x, [3], "alternate")
    with_cls = torch.cat([torch.randn(2, 1, 4), x], dim=1)
    with pytest.raises(ValueError, match=re.escape("groups (2, 10) must match the first two dims of x (2, 11, 4) (if x "
                                                   "starts with 1 CLS / register tokens: pass its patch tokens, x[:, "
                                                   "1:])")):
        group_mean(with_cls, groups, 7)
    assert torch.equal(group_mean(with_cls[:, 1:], groups, 7), group_mean(x, groups, 7))
    per_group = group_mean(x, groups, 7).pow(2).sum(-1)  # (B, G)
    with pytest.raises(ValueError, match=re.escape("morph_back needs x_groups of shape (B, G, C), got (2, 7); for one "
                                                   "value per group pass x_groups[..., None]")):
        morph_back(per_group, groups)
    assert torch.equal(morph_back(per_group[..., None], groups)[..., 0], per_group.gather(1, groups))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    x = torch.randn(2, 40, 16).to(dtype)
    groups = token_morphing(x, [6, 6], "random", torch.Generator().manual_seed(2))
    assert torch.equal(groups, token_morphing(x.float(), [6, 6], "random", torch.Generator().manual_seed(2)))
    means = group_mean(x, groups, 28)
    assert means.dtype == dtype
    torch.testing.assert_close(means.float(), morph_matrix(groups, 28) @ x.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dim", [2, 4])  # feature sums (N > C) / Gram matrix (N <= C)
def test_float64_tokens_are_matched_in_float64(dim):
    """Two edges whose cosines differ only past float32's precision (1 - 2e-12 and 1 - 1e-12 both round to 1.0 there):
    in float32 the tie goes to the first source (stable sort), in float64 the second source's edge is the better."""
    x = torch.zeros(1, 4, dim, dtype=torch.float64)  # alternate split: sources 0, 2; destinations 1, 3
    x[0, 0, :2] = torch.tensor([1.0, 2e-6])  # cos to token 1 = 1 - 2e-12
    x[0, 1, 0] = 1.0
    x[0, 2, :2] = torch.tensor([2e-12 ** 0.5, 1.0])  # cos to token 3 = 1 - 1e-12
    x[0, 3, 1] = 1.0
    assert token_morphing(x, [1], "alternate").tolist() == [[0, 1, 2, 2]]  # source 2 merged into 3
    assert token_morphing(x.float(), [1], "alternate").tolist() == [[1, 1, 0, 2]]  # the float32 tie: source 0 into 1


def test_dynamic_schedule_draws_n_from_zero_and_k_from_one():
    """Sec. 3.2: n ~ U{0..max_merged} (n = 0: plain per-token distillation) and k ~ U{1..max_iters}."""
    calls = []

    class Recording(random.Random):
        def randint(self, a, b):
            calls.append((a, b))
            return a

    assert sample_schedule(196, 196, 14, Recording(0)) == [0]  # n = 0, k = 1: no merge
    assert calls == [(0, 196), (1, 14)]


def test_official_schedule_rule_at_its_boundary():
    """r = ceil(n / k) unless r * k exceeds max_merged (strictly), then floor(n / k)."""
    assert make_schedule(196, 27, 2, "official", max_merged=28) == [14, 14]  # 28 does not exceed 28
    assert make_schedule(196, 27, 2, "official", max_merged=27) == [13, 13]
    assert make_schedule(196, 27, 2, "spread") == [14, 13]


@pytest.mark.parametrize("dim", [8, 64])  # feature sums / shared Gram matrix
def test_matching_does_not_depend_on_the_tokens_scale(dim):
    """Cosine similarity is scale invariant, so is the partition (down to tokens of norm ~1e-4)."""
    x = torch.randn(2, 40, dim, dtype=torch.float64)
    expected = token_morphing(x, [6, 6, 3], "alternate")
    for scale in (1e-4, 1e4):
        assert torch.equal(token_morphing(x * scale, [6, 6, 3], "alternate"), expected), scale


@pytest.mark.parametrize("dim", [8, 64])  # feature sums / Gram matrix
def test_tiny_tokens_are_matched_by_their_cosine(dim):
    """Found by fuzzing: squared norms were clamped at 1e-24, so tokens of norm below 1e-12 (all of them, or one among
    others) were matched by inner products scaled by 1e12 instead of by cosine, into other groups. Power-of-two scales
    keep every product's rounding: the groups must be the same bit for bit."""
    x = torch.randn(2, 40, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for dtype, scale in ((torch.float64, 2.0 ** -45), (torch.float64, 2.0 ** -330), (torch.float32, 2.0 ** -45)):
        expected = token_morphing(x.to(dtype), [6, 6, 3], "alternate")
        assert torch.equal(token_morphing(x.to(dtype) * scale, [6, 6, 3], "alternate"), expected), (dtype, scale)
    one_tiny = x.clone()
    one_tiny[:, [4, 5]] *= 2.0 ** -45  # a source and a destination: one round, their cosines unchanged
    assert torch.equal(token_morphing(one_tiny, [10], "alternate"), token_morphing(x, [10], "alternate"))


def test_group_without_members_gives_a_zero_row():
    x = torch.randn(2, 6, 3)
    groups = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 0, 1, 2]])
    means = group_mean(x, groups, 4)  # group 3 has no members
    assert torch.equal(means[:, 3], torch.zeros(2, 3))
    torch.testing.assert_close(means[0, 0], x[0, :2].mean(0))


@pytest.mark.parametrize("dim", [8, 64])  # feature sums / shared Gram matrix
def test_matching_is_float32_under_autocast(dim):
    """Called under autocast (as a teacher's targets might be), matching still computes its products in float32:
    tokens with a large shared component, whose cosines are near ties, merge as without autocast."""
    x = (torch.randn(2, 1, dim) * 3 + torch.randn(2, 40, dim)).to(torch.bfloat16)
    schedules = [[3] * 6, [10, 10]]
    expected = token_morphing_levels(x, schedules, "official")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_morphing_levels(x, schedules, "official")
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


# --------------------------------------------------------------------------------------------------
# Applying a partition


def test_group_ops_match_dense_morph_matrix():
    x = torch.randn(3, 30, 7, dtype=torch.float64)
    groups = token_morphing(x, [5, 5, 5], "random")
    M = morph_matrix(groups, 15).double()  # (B, G, N)
    assert torch.allclose(M.sum(-1), torch.ones(3, 15, dtype=torch.float64))
    means = group_mean(x.float(), groups, 15).double()
    torch.testing.assert_close(means, M @ x, rtol=1e-5, atol=1e-6)
    membership = (M > 0).double()
    torch.testing.assert_close(morph_back(means, groups), membership.transpose(1, 2) @ M @ x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(group_sizes(groups, 15).double(), membership.sum(-1))
    # num_groups may be an upper bound: the empty groups are zero rows in both
    torch.testing.assert_close(group_mean(x, groups, 17), morph_matrix(groups, 17).double() @ x, rtol=1e-5, atol=1e-6)
    assert morph_matrix(groups, 15, torch.float64).dtype == torch.float64
    assert torch.equal(morph_matrix(groups, 15), M.float())


def test_gradients_flow_through_group_mean():
    x = torch.randn(2, 20, 6, requires_grad=True)
    groups = token_morphing(x, [4, 4], "random")
    weights = torch.randn(2, 12, 6)
    (group_mean(x, groups, 12) * weights).sum().backward()
    expected = morph_matrix(groups, 12).transpose(1, 2) @ weights  # d/dx sum(w * M x) = M^T w
    torch.testing.assert_close(x.grad, expected)


# --------------------------------------------------------------------------------------------------
# Dynamic scheduler


@pytest.mark.parametrize("rule", ["spread", "official"])
def test_sample_schedule_is_feasible_and_reproducible(rule):
    rng, again = random.Random(0), random.Random(0)
    schedules = [sample_schedule(196, 196, 14, rng, rule) for _ in range(500)]
    assert schedules == [sample_schedule(196, 196, 14, again, rule) for _ in range(500)]
    assert len({tuple(s) for s in schedules}) > 100
    for s in schedules:
        assert 1 <= len(s) <= 14 and s == clamp_schedule(196, s)
    assert max(sum(s) for s in schedules) > 150 and min(sum(s) for s in schedules) < 20


def test_sample_schedule_refuses_other_random_generators():
    """numpy's RandomState.randint excludes its upper bound: n never reached max_merged nor k max_iters (max_iters 1
    failed deep in numpy); a torch.Generator failed with a bare AttributeError. Found by a copy-the-file review."""
    import numpy as np
    for rng in (np.random.RandomState(0), np.random.default_rng(0), torch.Generator()):
        with pytest.raises(TypeError, match=f"sample_schedule needs a random.Random .*got {type(rng).__name__}"):
            sample_schedule(196, 196, 14, rng)
    assert len(sample_schedule(196, 196, 14, random)) >= 1  # the random module itself (its randint includes the end)
    with pytest.raises(ValueError, match="needs max_iters >= 1 rounds and max_merged >= 0 tokens, got max_iters=0"):
        sample_schedule(196, 196, 0, random.Random(0))  # was randrange's "empty range for randrange() (1, 1, 0)"
    with pytest.raises(ValueError, match="max_merged >= 0 tokens, got max_iters=14, max_merged=-1"):
        sample_schedule(196, -1, 14, random.Random(0))


def test_sample_schedule_rules_against_hand_computed_values():
    class FixedRng(random.Random):  # returns n, then k
        def __new__(cls, n, k): return super().__new__(cls)  # Python 3.10: Random.__new__ takes at most a seed
        def __init__(self, n, k): super().__init__(0); self.values = [n, k]
        def randint(self, a, b): return self.values.pop(0)
    assert sample_schedule(196, 196, 14, FixedRng(23, 5), "spread") == [5, 5, 5, 4, 4]
    assert sample_schedule(196, 196, 14, FixedRng(23, 5), "official") == [5, 5, 5, 5, 5]  # ceil(23/5) = 5
    # 14 * 14 = 196; last round: 14 tokens left -> 7
    assert sample_schedule(196, 196, 14, FixedRng(196, 14), "official") == [14] * 13 + [7]
    # 66*3 > 196 -> floor 65; clamped
    assert sample_schedule(196, 196, 14, FixedRng(196, 3), "official") == [65, 65, 33]
    # --max_merged below N: the floor fallback compares r * k with it, not with N (ceil 14 * 2 = 28 > 27 -> 13)
    assert sample_schedule(196, 27, 14, FixedRng(27, 2), "official") == [13, 13]
    assert make_schedule(196, 21, 5, "official") == [5] * 5  # ceil(4.2), not round: 25 merged
    assert make_schedule(196, 1, 3, "official") == [1] * 3  # ceil(1/3) = 1 (round: no merge at all)
    assert sample_schedule(196, 196, 14, FixedRng(0, 3), "spread") == [0, 0, 0]


# --------------------------------------------------------------------------------------------------
# Visualization CLI


def test_visualization_writes_side_by_side_panels(tmp_path, capsys):
    from PIL import Image
    import morph
    image = Image.new("RGB", (96, 80), "red")
    image.paste((0, 0, 255), (0, 0, 48, 80))
    image.save(tmp_path / "img.png")
    morph.main([str(tmp_path / "img.png"), "--schedule", "2x4", "8,8", "--img_size", "64",
                "--out", str(tmp_path / "g.png")])
    out = Image.open(tmp_path / "g.png")
    assert out.size == (2 * 64 + 8, 2 * 64 + 20)
    assert parse_schedule("14x7") == [7] * 14 and parse_schedule("49,49") == [49, 49]
    assert parse_schedule("0") == [0] and parse_schedule("2x0") == [0, 0]  # no merge (r=0): a schedule, not an error
    with pytest.raises(ValueError, match="KxR"):
        parse_schedule("seven")
    for text in ("0x5", "-3x7"):  # no rounds: an empty schedule, a picture of no merges
        with pytest.raises(ValueError, match=f"schedule '{text}' has -?\\d+ rounds; KxR needs K >= 1"):
            parse_schedule(text)
    for text in ("2x-1", "-3", "4,-1", "-1,4"):  # a traceback deep in morph.py once; any round's r, not the last
        with pytest.raises(ValueError, match=f"schedule '{text}' removes a negative number of tokens"):
            parse_schedule(text)
    for out, message in (("g.pngx", "Pillow writes no file of that extension"), ("g.psd", "Pillow writes no file"),
                         ("none/g.png", "none' is not a folder")):  # each a traceback after the work before
        with pytest.raises(SystemExit, match=message):
            morph.main([str(tmp_path / "img.png"), "--out", str(tmp_path / out)])
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error (exit 2) before the image is read
        morph.main([str(tmp_path / "missing.png"), "--schedule", "abc"])
    assert exit_info.value.code == 2 and "error: --schedule: cannot read schedule 'abc'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^error: cannot read image '.*missing.png'"):  # "error:" as the trainers'
        morph.main([str(tmp_path / "missing.png")])


def test_visualization_panel_draws_every_boundary_and_paints_group_means():
    """_draw_panel's picture of groups [[0, 0], [1, 2]] on a 2x2 grid of one-colour 8-px patches: white lines between
    the rows and between the two bottom patches only; the bottom half paints each patch as its group's mean."""
    from PIL import Image
    img = Image.new("RGB", (16, 16))
    for k, colour in enumerate([(200, 0, 0), (0, 100, 0), (0, 0, 60), (40, 40, 40)]):
        img.paste(colour, ((k % 2) * 8, (k // 2) * 8, (k % 2) * 8 + 8, (k // 2) * 8 + 8))
    panel = morph._draw_panel(img, torch.tensor([0, 0, 1, 2]), 8, "t")
    white = (255, 255, 255)
    assert panel.size == (16, 2 * 16 + 20)
    assert all(panel.getpixel((x, 20 + 8)) == white for x in (1, 4, 12, 15))  # between the rows
    assert panel.getpixel((8, 20 + 12)) == white and panel.getpixel((8, 20 + 3)) != white  # bottom pair; top: a group
    palette = torch.rand(3, 3, generator=torch.Generator().manual_seed(0)) * 255  # group 0: its first colour
    tint = (0.55 * torch.tensor([200.0, 0, 0]) + 0.45 * palette[0]).byte().tolist()  # as docs/morph_chelsea.png
    assert list(panel.getpixel((3, 20 + 3))) == tint
    assert panel.getpixel((3, 36 + 3)) == panel.getpixel((12, 36 + 3)) == (100, 50, 0)  # mean of the top two
    assert panel.getpixel((3, 36 + 12)) == (0, 0, 60) and panel.getpixel((12, 36 + 12)) == (40, 40, 40)


def test_visualization_crops_the_center_of_a_wide_image(tmp_path):
    """--img_size's help: the shorter side resized to it, then center-cropped (a 40x20 image at 20: columns 10..29)."""
    from PIL import Image
    wide = Image.new("RGB", (40, 20))
    for x in range(40):
        wide.paste((6 * x, 0, 0), (x, 0, x + 1, 20))
    wide.save(tmp_path / "wide.png")
    square = morph._load_square_image(str(tmp_path / "wide.png"), 20)
    assert square.size == (20, 20)
    assert [square.getpixel((x, 5))[0] for x in range(20)] == [6 * x for x in range(10, 30)]


def test_group_sizes_are_float32_counts_past_fp16s_exact_integers():
    """group_sizes' docstring: float32. A group of 2049 members (a 1024-px image's 64x64 grid has 4096 tokens) is
    counted exactly; in float16 it would be 2048 and its mean 1/2048 too large."""
    groups = torch.zeros(1, 2050, dtype=torch.long)
    groups[0, -1] = 1
    sizes = group_sizes(groups, 2)
    assert sizes.dtype == torch.float32 and sizes.tolist() == [[2049.0, 1.0]]
    assert group_mean(torch.ones(1, 2050, 1), groups, 2).tolist() == [[[1.0], [1.0]]]


def test_visualization_draws_the_groups_of_its_split_and_seed(tmp_path):
    """--split and --seed reach the morphing: the picture is the panel of token_morphing's groups with that split and
    a generator seeded with --seed (the random split's groups differ between seeds 3 and 0 here)."""
    from PIL import Image
    noise = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(noise.numpy()).save(tmp_path / "noise.png")
    img = morph._load_square_image(str(tmp_path / "noise.png"), 32)
    tokens = morph._patches(img, 8)
    for split, seed in (("random", 3), ("official", 0)):
        morph.main([str(tmp_path / "noise.png"), "--schedule", "2x4", "--img_size", "32", "--patch_size", "8",
                    "--split", split, "--seed", str(seed), "--out", str(tmp_path / "g.png")])
        groups = token_morphing(tokens, [4, 4], split, torch.Generator().manual_seed(seed))[0]
        other = token_morphing(tokens, [4, 4], "random" if split == "official" else split,
                               torch.Generator().manual_seed(0))[0]
        assert not torch.equal(groups, other)
        with Image.open(tmp_path / "g.png") as drawn:
            assert drawn.convert("RGB").tobytes() == morph._draw_panel(img, groups, 8, "2x4").tobytes()


def test_the_docstrings_use_block_computes_dtm_loss():
    """The 'Use' block of morph.py's docstring, run as written, gives dtm.dtm_loss with its defaults; it imports what
    it uses (pasted into other code it needed B, N and morph's functions, a copy-the-file review found)."""
    import textwrap

    import dtm
    import morph
    doc = morph.__doc__
    start = doc.index("    import torch\n")
    block = textwrap.dedent(doc[start:doc.index("\n\n", start)])
    B, N, D = 3, 16, 8
    gen = torch.Generator().manual_seed(0)
    target, pred = torch.randn(B, N, D, generator=gen), torch.randn(B, N, D, generator=gen) * 3  # some |diff| > beta
    scope = {"target": target, "pred": pred, "rng": random.Random(5)}  # what the text says the block is given
    exec(block, scope)
    rng = random.Random(5)
    schedules = [sample_schedule(N, N, 14, rng, rule="official") for _ in range(2)]
    assert schedules == [list(s) for s in scope["schedules"]] and any(sum(s) for s in schedules)
    groups = token_morphing_levels(target, schedules, split="official")
    num_groups = [num_groups_after(N, s, "official") for s in schedules]
    expected, _ = dtm.dtm_loss(pred, target, groups, num_groups=num_groups)
    assert torch.allclose(scope["loss"], expected, rtol=1e-6, atol=0)


def test_the_docstrings_say_to_drop_register_tokens_as_well_as_cls():
    """A timm teacher and student with 4 registers, their tokens taken "without CLS" as [:, 1:]: the registers were
    morphed as 4 more patches (split="official" protecting a register as its first patch), without an error (found
    by a review as a timm user)."""
    assert "without CLS and any register tokens (a timm ViT's forward_features(images)[:, vit.num_prefix_tokens:]" \
        in " ".join(morph.__doc__.split())
    token_morphing_doc = " ".join(morph.token_morphing.__doc__.split())
    assert "and any register tokens (timm: x[:, vit.num_prefix_tokens:])" in token_morphing_doc


# From a mutation review of morph.py: zero tokens, fp16 accumulation, the Gram-matrix contract

@pytest.mark.parametrize("dim", [8, 64])  # feature sums / Gram matrix
@pytest.mark.parametrize("split", ["random", "alternate"])
def test_zero_tokens_have_cosine_zero(split, dim):
    """Flat patches give all-zero targets (PixelTeacher's normalized pixels): cosine 0 with everything, as
    F.cosine_similarity, not NaN."""
    x = torch.randn(2, 24, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[0, [1, 4, 5]] = 0
    x[1, [0, 2, 9, 10]] = 0
    schedule = [5, 4, 3]
    got = token_morphing(x, schedule, split, torch.Generator().manual_seed(1))
    assert torch.equal(got, naive_algorithm1(x, schedule, split, seed=1))


def test_group_mean_accumulates_low_precision_inputs_in_float32():
    """fp16 tokens of 300 in one group of 256: their sum 76800 is past fp16's max (65504); accumulated in float32
    the mean is 300, an fp16 sum gives inf. (On CUDA a bf16/fp16 index_add_ also rounds every partial sum.)"""
    x = torch.full((2, 256, 3), 300.0, dtype=torch.float16)
    means = group_mean(x, torch.zeros(2, 256, dtype=torch.long), 1)
    assert means.dtype == torch.float16 and torch.equal(means, torch.full((2, 1, 3), 300.0, dtype=torch.float16))


def test_gram_matrix_is_used_exactly_when_n_le_c(monkeypatch):
    """The documented memory contract: the (B, N, N) Gram path when N <= C, feature sums when N > C."""
    used = []
    for cls in (morph._GramOfSums, morph._FeatureSums):
        monkeypatch.setattr(cls, "best_match", (lambda f, name: lambda self, *a: used.append(name) or f(self, *a))(
            cls.best_match, cls.__name__))
    for C, expected in ((15, "_FeatureSums"), (16, "_GramOfSums"), (17, "_GramOfSums")):
        used.clear()
        token_morphing(torch.randn(2, 16, C), [3], "alternate")
        assert used == [expected], C


def test_the_visualizations_out_that_stdout_cannot_encode_is_printed_escaped(tmp_path):
    """An --out named by a Latin-1 machine (b'r\\xe9s.png': 'r\\udce9s.png' here): a UTF-8 locale's stdout (errors
    'strict' without Python's UTF-8 mode; PYTHONIOENCODING=utf-8 here) raised UnicodeEncodeError after the picture
    was written, a traceback and exit status 1."""
    from PIL import Image
    Image.new("RGB", (16, 16), "red").save(tmp_path / "img.png")
    out = tmp_path / os.fsdecode(b"r\xe9s.png")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "morph.py")
    result = subprocess.run([sys.executable, script, str(tmp_path / "img.png"), "--schedule", "2x2", "--img_size", "16",
                             "--patch_size", "4", "--out", str(out)], capture_output=True,
                            env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {tmp_path}/r\\udce9s.png: 1 schedule on 16 tokens\n".encode() and out.is_file()


def test_morph_py_copied_alone_imports_nothing_of_this_repo_and_computes_the_same(tmp_path):
    """Users copy morph.py into their own code: alone in a folder, it runs and gives this repo's groups."""
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "morph.py"), tmp_path)
    code = ("import sys, torch, morph; torch.manual_seed(0); x = torch.randn(2, 16, 8)\n"
            "print(morph.token_morphing(x, [4, 2], 'random', torch.Generator().manual_seed(1)).tolist())\n"
            "print(sorted(m for m in sys.modules if m in ('dtm', 'data', 'engine', 'mto')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    torch.manual_seed(0)
    groups = token_morphing(torch.randn(2, 16, 8), [4, 2], "random", torch.Generator().manual_seed(1))
    assert out.stdout.splitlines() == [str(groups.tolist()), "[]"]


@pytest.mark.parametrize("dim", [8, 64])  # feature sums (N > C) / Gram matrix (N <= C)
@pytest.mark.parametrize("split", ["random", "alternate"])
def test_tied_similarities_merge_the_first_sources(split, dim):
    """Exact ties in the sources' best cosines (duplicate tokens: flat patches of one colour) go to the source that
    comes first, as the naive loop's stable sort: 30 identical sources (integer-valued, so every product is exact)
    and their r best edges. An unstable sort, as ToMe's and the official bm/merge.py:60's argsort (torch 2.13's CPU
    sort of 17 or more equal values is not stable), takes any r of the tied sources."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (2, 60, dim), generator=g).double()
    x[0, 0::2] = x[0, 0]  # alternate split: every source of sample 0 the same token
    x[1, 0::4] = x[1, 0]  # sample 1: every other source the same
    for schedule in ([10], [10, 7, 5]):
        got = token_morphing(x, schedule, split, torch.Generator().manual_seed(1))
        assert torch.equal(got, naive_algorithm1(x, schedule, split, seed=1)), schedule


@pytest.mark.parametrize("dim", [1, 64])  # feature sums (N > C) / Gram matrix (N <= C)
def test_official_split_protects_the_first_patch_even_at_cosine_minus_one(dim):
    """The protected first patch is out of the running whatever the other sources' best cosines: with every source
    opposite every destination (all best cosines exactly -1) it still stays alone, its score below any cosine."""
    x = torch.zeros(2, 21, dim)
    x[:, 0::2, 0] = 1.0  # sources (even positions) +e0, destinations -e0: every cosine -1
    x[:, 1::2, 0] = -1.0
    for schedule in ([10], [3, 3, 3]):
        groups = token_morphing(x, schedule, "official")
        G = num_groups_after(21, schedule, "official")
        assert is_partition(groups, G) and G == 21 - sum(clamp_schedule(21, schedule, "official"))
        assert (groups[:, 1:] != groups[:, :1]).all(), schedule  # patch 0 never merged


def test_levels_that_follow_each_other_on_the_gram_matrix_do_not_share_it():
    """The Gram matrix is computed once and copied for a level when a later one also reads it; two consecutive levels
    on it (N <= C) must each see the tokens' own Gram matrix, not the one the previous level merged."""
    x = torch.randn(3, 30, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    schedules = [[4, 4], [3, 3, 3], [6]]
    for split in ("alternate", "official", "random"):
        got = token_morphing_levels(x, schedules, split, torch.Generator().manual_seed(3))
        gen = torch.Generator().manual_seed(3)
        expected = [token_morphing(x, s, split, gen) for s in schedules]
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), split
        if split != "official":  # and against the naive loop
            assert all(torch.equal(a, naive_algorithm1(x, s, split, seed=3)) for a, s in zip(got[:1], schedules[:1]))


def test_official_schedule_rule_against_the_official_formula():
    """make_schedule(rule="official") is the r of naver-ai/dtm engines/engine_for_dtm.py:111-114: ceil(n / k) unless
    ceil(n / k) * k > n1 (max_merged), then floor(n / k), in every round, then clamped. Checked for all n, k where
    clamping does not bite, including n above max_merged (floor of a multiple of k is n / k itself, not one less)."""
    for max_merged in (20, 30):
        for n in range(0, 41):
            for k in range(1, 8):
                r = math.floor(n / k) if math.ceil(n / k) * k > max_merged else math.ceil(n / k)
                expected = clamp_schedule(400, [r] * k)
                assert make_schedule(400, n, k, "official", max_merged=max_merged) == expected, (n, k, max_merged)


def test_visualization_refuses_sizes_that_are_no_image_and_names_the_fix(tmp_path):
    """--patch_size 0 was a ZeroDivisionError, --img_size 0 Pillow's resize error; a size off the patch grid named
    no size to use; an --out folder that does not exist named no fix."""
    import morph
    from PIL import Image
    Image.new("RGB", (40, 40), "red").save(tmp_path / "img.png")
    image = str(tmp_path / "img.png")
    for argv, message in ((["--patch_size", "0"], "^error: --patch_size 0: a patch is at least 1 pixel; use e.g. 16$"),
                          (["--img_size", "0"], "^error: --img_size 0 is not a positive multiple of --patch_size 16; "
                                                "use 16$"),
                          (["--img_size", "40"], "--img_size 40 is not a positive multiple of --patch_size 16; use 32 "
                                                 "or 48$"),
                          (["--out", str(tmp_path / "new" / "g.png")], r"create it first \(mkdir -p .*new'?\)$")):
        with pytest.raises(SystemExit, match=message):
            morph.main([image, *argv])
    new = tmp_path / "it's $HOME" / "new"  # the fix as printed, pasted into a shell: this folder, not "it's /root"
    with pytest.raises(SystemExit) as e:
        morph.main([image, "--out", str(new / "g.png")])
    subprocess.run(["bash", "-c", str(e.value).split("create it first (")[1][:-1]], check=True)
    assert new.is_dir()


def test_the_readmes_morph_figure_is_what_its_command_draws(tmp_path):
    """docs/morph_chelsea.png is README's `python morph.py chelsea.png --out docs/morph_chelsea.png` on scikit-image's
    chelsea() as it draws now. It had been drawn before 7d80331 changed the random split's order and was kept: the
    command grouped 595, 540 and 2449 of the 19110 token pairs otherwise in its three panels. Runs only where
    scikit-image is installed (not a dependency; its chelsea.png, sha256 596aa1e7..., is read, no download)."""
    from PIL import Image
    skimage_data = pytest.importorskip("skimage.data")
    Image.fromarray(skimage_data.chelsea()).save(tmp_path / "chelsea.png")
    morph.main([str(tmp_path / "chelsea.png"), "--out", str(tmp_path / "groups.png")])
    with Image.open(tmp_path / "groups.png") as drawn, \
            Image.open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "morph_chelsea.png")) as shown:
        assert np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(shown.convert("RGB")))


def test_visualization_refuses_a_seed_torch_cannot_take_and_names_the_range(tmp_path):
    """--seed 2**64 was torch.Generator.manual_seed's ValueError traceback ('Overflow when unpacking long long'), after
    the image was read; the trainers' --seed names this range (engine.check_shared_args). Its ends are taken."""
    from PIL import Image
    Image.new("RGB", (32, 32), "red").save(tmp_path / "img.png")
    image, out = str(tmp_path / "img.png"), ["--img_size", "32", "--out", str(tmp_path / "g.png")]
    for seed in (2 ** 64, -2 ** 63 - 1):
        with pytest.raises(SystemExit, match=rf"^error: --seed must be in -2\*\*63..2\*\*64 - 1, got {seed}$"):
            morph.main([image, f"--seed={seed}", *out])
    for seed in (2 ** 64 - 1, -2 ** 63):
        morph.main([image, f"--seed={seed}", *out])
    assert (tmp_path / "g.png").is_file()


def test_visualization_takes_an_out_the_shell_left_a_tilde_in_and_names_a_file_in_its_path(tmp_path, monkeypatch):
    """--out=~/g.png (no shell expands ~ after '=') was refused with mkdir -p 'CWD/~', which made a folder named '~';
    an --out under a file named mkdir -p of it, which fails (File exists)."""
    import morph
    from PIL import Image
    image = str(tmp_path / "img.png")
    Image.new("RGB", (32, 32), "red").save(image)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    morph.main([image, "--img_size", "32", "--schedule", "1x1", "--out=~/g.png"])
    assert (tmp_path / "g.png").is_file() and not os.path.exists(tmp_path / "~")
    for out in ("img.png/g.png", "img.png/a/b/g.png"):
        with pytest.raises(SystemExit, match=rf"^error: --out '{out}': '.*img.png' is a file, not a folder; "
                                             r"give a path in a folder$"):
            morph.main([image, "--out", out])


def test_visualization_matches_patches_standardized_per_channel_over_the_image():
    """The picture CLI matches on patch pixels with each channel standardized over the image (its --help says so):
    red spread over rows, green over columns, blue constant (0 after its std's clamp); no test failed without it."""
    from PIL import Image
    image = Image.fromarray(np.array([[[10, 100, 7], [10, 200, 7]], [[30, 100, 7], [30, 200, 7]]], dtype=np.uint8))
    s = math.sqrt(3) / 2  # (x - mean) / std of [a - d, a - d, a + d, a + d], std unbiased: 2d / sqrt(3)
    one_pixel = torch.tensor([[[-s, -s, 0.0], [-s, s, 0.0], [s, -s, 0.0], [s, s, 0.0]]])
    torch.testing.assert_close(morph._patches(image, 1), one_pixel, rtol=0, atol=1e-6)
    torch.testing.assert_close(morph._patches(image, 2), one_pixel.reshape(1, 1, 12), rtol=0, atol=1e-6)


def test_schedules_and_tokens_morphing_cannot_take_are_refused_naming_the_fix():
    """No test made these refusals (make_schedule's rounds, merges and rule; integer tokens); integer tokens named no
    fix."""
    for n, k in ((7, 0), (-1, 2)):
        with pytest.raises(ValueError, match=rf"^a schedule needs k >= 1 rounds and n >= 0 merged tokens, got n={n}, "
                                             rf"k={k}$"):
            make_schedule(196, n, k)
    with pytest.raises(ValueError, match=r"^unknown schedule rule 'ceil'; use 'spread' or 'official'$"):
        sample_schedule(196, 98, 14, random.Random(0), "ceil")
    tokens = torch.arange(8).view(1, 4, 2)
    with pytest.raises(TypeError, match=r"^token_morphing expects floating point tokens, got torch.int64; pass "
                                        r"x.float\(\)$"):
        token_morphing(tokens, [1])
    assert token_morphing(tokens.float(), [1]).shape == (1, 4)  # the fix
    for batch, schedule in ((2, [2]), (2, []), (0, [2])):  # tokens without channels (e.g. x[..., :0]) have no cosine:
        # torch's reshape error once; an empty batch of them is refused too
        with pytest.raises(ValueError, match=rf"^token_morphing needs tokens of at least one channel, got x of shape "
                                             rf"\({batch}, 5, 0\); pass the tokens' features, x of shape \(B, N, C\) "
                                             rf"with C >= 1$"):
            token_morphing(torch.randn(batch, 5, 0), schedule)


def test_visualization_out_that_cannot_be_written_names_the_fix(tmp_path, monkeypatch):
    """A file system's refusal to write --out (a read-only folder, a full disk): no test made it."""
    from PIL import Image
    Image.new("RGB", (32, 32), "red").save(tmp_path / "img.png")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Image.Image, "save", refuse)
    with pytest.raises(SystemExit, match=r"^error: --out '.*g.png': cannot write it \(\[Errno 13\] Permission "
                                         r"denied\); give a path in a folder you can write to$"):
        morph.main([str(tmp_path / "img.png"), "--img_size", "32", "--schedule", "1", "--out", str(tmp_path / "g.png")])


def test_visualization_out_of_a_format_pillow_cannot_write_from_rgb_names_the_format(tmp_path):
    """An extension Pillow lists but writes for other modes only (.xbm: 1-bit) is no file-system refusal: it was
    told to give a path in a folder it can write to (the folder could be written), like plot_log's twin says."""
    from PIL import Image
    Image.new("RGB", (32, 32), "red").save(tmp_path / "img.png")
    with pytest.raises(SystemExit, match=r"^error: --out '.*g.xbm': Pillow could not write it \(cannot write mode RGB "
                                         r"as XBM\); use e.g. groups.png$"):
        morph.main([str(tmp_path / "img.png"), "--img_size", "32", "--schedule", "1", "--out", str(tmp_path / "g.xbm")])
    assert not (tmp_path / "g.xbm").exists()


def test_group_mean_refuses_integer_tokens_and_tokens_without_channels():
    """Integer tokens (uint8 pixel patches) gave means cut to integers in their dtype without a word (2 and 3 -> 2, not
    2.5); tokens (B, N) without a channel dim failed unpacking x.shape. Both are refused, naming the fix."""
    groups = torch.zeros(1, 2, dtype=torch.long)
    pixels = torch.tensor([[[2], [3]]], dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"^group_mean needs floating point x, got torch.uint8: the mean of integers is "
                                        r"no integer; pass x.float\(\)$"):
        group_mean(pixels, groups, 1)
    with pytest.raises(TypeError, match=r"^group_mean needs floating point x, got torch.int64"):
        group_mean(pixels.long(), groups, 1)
    assert group_mean(pixels.float(), groups, 1).item() == 2.5
    with pytest.raises(ValueError, match=r"^group_mean needs x of shape \(B, N, C\), got \(1, 2\); for one value per "
                                         r"token pass x\[\.\.\., None\]$"):
        group_mean(torch.randn(1, 2), groups, 1)
    with pytest.raises(ValueError, match=r"^group_mean needs x of shape \(B, N, C\), got \(1, 2, 1, 1\)"):
        group_mean(torch.randn(1, 2, 1, 1), groups, 1)  # (B, N, C) with a channel dim too many


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace` is deprecated")
@pytest.mark.parametrize("dim", [12, 40])  # feature sums (N > C) / Gram matrix (N <= C)
def test_a_jit_trace_gives_the_groups_of_the_traced_schedule(dim):
    """torch.jit.trace (deployment) of token_morphing with one schedule gives eager's groups, for the traced shape and
    for another batch size and number of tokens whose schedule is not clamped. The tracer hands x.shape over as
    tensors, and clamp_schedule's `tokens -= r` once subtracted the merges from N itself: the trace then gave groups
    of N - sum(R) tokens, (2, 10) for (2, 16) tokens, on the traced tokens too."""
    trace = torch.jit.trace(lambda x: token_morphing(x, [4, 2], "official"), torch.randn(2, 16, dim), check_trace=False)
    for shape in ((2, 16, dim), (3, 20, dim)):
        x = torch.randn(shape)
        assert torch.equal(trace(x), token_morphing(x, [4, 2], "official"))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace` is deprecated")
@pytest.mark.parametrize("split", ["alternate", "official"])
def test_a_jit_trace_clamps_at_the_number_of_tokens_it_runs_on(split):
    """A round that clamp_schedule clamps at the traced N: min(r, cap) kept whichever the traced N chose, so the cap
    (half the current tokens) ran at every N: traced at 10 tokens ([4, 3]), [4, 4] on 20 tokens merged 4 + 8, not
    4 + 4; and a round not clamped there kept its r at an N that clamps it. The trace now clamps as eager does."""
    trace = torch.jit.trace(lambda x: token_morphing(x, [4, 4], split), torch.randn(2, 10, 16), check_trace=False)
    for shape in ((2, 10, 16), (3, 20, 16), (2, 20, 8), (2, 7, 16)):
        x = torch.randn(shape)
        assert torch.equal(trace(x), token_morphing(x, [4, 4], split)), shape


def test_visualization_reads_16_bit_grey_as_its_levels(tmp_path):
    """A 16-bit grey image (a scan, a microscope photo) is drawn at its grey levels (x / 257, as data.load_image):
    Pillow's convert("RGB") clips it at 255, so the picture showed the groups of a white image. A 32-bit one, whose
    range is unknown, is refused by name."""
    import numpy as np
    from PIL import Image
    levels = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.frombytes("I;16", (4, 4), levels.astype("<u2").tobytes()).save(tmp_path / "grey16.png")
    img = morph._load_square_image(str(tmp_path / "grey16.png"), 4)
    assert img.mode == "RGB" and np.asarray(img)[0].tolist() == [[v] * 3 for v in (0, 1, 128, 255)]
    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(tmp_path / "float.tif")
    with pytest.raises(SystemExit, match=r"^error: image '.*float.tif' has mode 'F' \(32-bit float pixels\), whose "
                                         r"range is not known: convert it to 8-bit RGB or grayscale$"):
        morph._load_square_image(str(tmp_path / "float.tif"), 4)


def test_visualization_names_an_image_above_pillows_pixel_limit(tmp_path, monkeypatch):
    """Pillow refuses an image of more than twice MAX_IMAGE_PIXELS (DecompressionBombError, no OSError): a traceback
    before; now the one-line error naming the limit and the fixes, as data.load_image."""
    from PIL import Image
    Image.new("RGB", (30, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 900 pixels > 2 x 400
    with pytest.raises(SystemExit, match=r"^error: image '.*big.png' is too large for Pillow's decompression-bomb "
                                         r"limit \(.*\); downscale the file, or raise PIL.Image.MAX_IMAGE_PIXELS"):
        morph._load_square_image(str(tmp_path / "big.png"), 16)
