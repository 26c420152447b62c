"""Epoch-plan semantics (sat_train/loader/plan.py), without reading any data."""
from collections import Counter

import pytest

from sat_train.loader.plan import Layout, LoaderError, epoch_plan, stripe_batches

SIZES = (16, 16, 16, 7)  # 55 samples in 4 shards, last one short


def flat(plan):
    return [(seg.shard, o) for seg in plan for o in seg.ordinals]


def layout(rank=0, world=1, shuffle=True, drop_last=False, batch=8, sizes=SIZES):
    return Layout(sizes, batch, rank, world, shuffle=shuffle, drop_last=drop_last)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_disjoint_equal_and_cover_all_but_the_tail(world):
    for epoch in range(3):
        per_rank = [flat(epoch_plan(layout(r, world), seed=5, epoch=epoch)) for r in range(world)]
        everything = [t for part in per_rank for t in part]
        assert len(everything) == len(set(everything))  # disjoint, nothing twice
        assert {len(p) for p in per_rank} == {55 // world}  # equal counts: DDP needs the same number of steps
        assert len(everything) == 55 - 55 % world  # only the tail n % W is skipped
        assert all(0 <= o < SIZES[s] for s, o in everything)


def test_skipped_tail_changes_with_the_epoch():
    universe = {(s, o) for s, n in enumerate(SIZES) for o in range(n)}
    skipped = [universe - set(flat(epoch_plan(layout(0, 2), 0, e))) - set(flat(epoch_plan(layout(1, 2), 0, e)))
               for e in range(8)]
    assert all(len(s) == 1 for s in skipped)
    assert len({frozenset(s) for s in skipped}) > 1


def test_shuffle_depends_on_seed_epoch_and_rank_and_reproduces():
    a = flat(epoch_plan(layout(), seed=0, epoch=0))
    assert a == flat(epoch_plan(layout(), seed=0, epoch=0))
    assert sorted(a) == [(s, o) for s, n in enumerate(SIZES) for o in range(n)]  # world 1: every sample once
    assert a != flat(epoch_plan(layout(), seed=1, epoch=0))
    assert a != flat(epoch_plan(layout(), seed=0, epoch=1))
    r0 = [o for s, o in flat(epoch_plan(layout(0, 2, sizes=(32, 32)), 0, 0))]
    r1 = [o for s, o in flat(epoch_plan(layout(1, 2, sizes=(32, 32)), 0, 0))]
    assert sorted(r0) == sorted(r1) == list(range(32)) and r0 != r1  # same shard pattern, rank-specific order


def test_eval_is_in_order_near_even_and_complete():
    world = 3
    parts = [flat(epoch_plan(layout(r, world, shuffle=False), seed=9, epoch=4)) for r in range(world)]
    assert [len(p) for p in parts] == [19, 18, 18]
    assert [t for p in parts for t in p] == [(s, o) for s, n in enumerate(SIZES) for o in range(n)]
    assert layout(0, world, shuffle=False).num_batches == 3  # ceil(19 / 8): partial batch kept


def test_drop_last_trims_to_full_batches():
    lay = layout(0, 2, drop_last=True)  # 27 per rank -> 3 batches of 8
    plan = flat(epoch_plan(lay, 0, 0))
    assert len(plan) == lay.num_samples == 24 and lay.num_batches == 3
    full = flat(epoch_plan(layout(0, 2), 0, 0))
    assert plan == full[:24]  # the dropped ones are the last of the shuffled order


def test_too_small_layouts_are_refused_for_every_rank():
    with pytest.raises(LoaderError, match="too few for 8 rank"):
        layout(0, 8, sizes=(5,), batch=1).check("set")  # rank 5..7 would be empty
    with pytest.raises(LoaderError, match="no batch"):
        layout(1, 2, drop_last=True, batch=40).check("set")  # 27 per rank < 40
    layout(1, 2, drop_last=False, batch=40).check("set")  # a partial batch is fine without drop_last
    with pytest.raises(LoaderError, match="outside world size"):
        layout(2, 2).check("set")


def test_striping_keeps_plan_order_under_round_robin():
    plan = epoch_plan(layout(), 3, 0)
    parts = stripe_batches(plan, 8, 3)
    rounds = max(len(p) for p in parts)
    merged = [b for i in range(rounds) for p in parts if i < len(p) for b in p[i]]  # DataLoader's round robin
    assert merged == flat(plan)
    assert Counter(len(b) for p in parts for b in p) == Counter({8: 6, 7: 1})
