"""EpochSharder: disjoint per-rank slices, reshuffled epochs, exact resume, world-size independence."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.data import DataPosition, EpochSharder

# (num_images, global_batch_size): divisible and not, including a remainder of B - 1.
SIZES = [(48, 12), (50, 12), (59, 12), (17, 8), (24, 24), (100, 4)]


def take(sharder: EpochSharder, count: int) -> list[np.ndarray]:
    return [next(sharder) for _ in range(count)]


# Every world size 1..4 that divides the global batch (the others are an error, tested below).
COMBOS = [(n, b, w) for (n, b) in SIZES for w in (1, 2, 3, 4) if b % w == 0]


@pytest.mark.parametrize("num_images,batch,world_size", COMBOS)
def test_ranks_are_disjoint_and_cover_the_epoch(num_images, batch, world_size):
    steps = num_images // batch
    ranks = [EpochSharder(num_images, batch, seed=11, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in range(3):
        per_rank = [take(sharder, steps) for sharder in ranks]
        for batches in per_rank:
            assert len(batches) == steps
            assert all(len(b) == batch // world_size for b in batches)
        seen = np.concatenate([np.concatenate(batches) for batches in per_rank])
        assert len(seen) == steps * batch
        assert len(np.unique(seen)) == steps * batch  # disjoint across ranks and steps
        assert seen.min() >= 0 and seen.max() < num_images
        for sharder in ranks:
            assert sharder.position == DataPosition(epoch + 1, 0)


def test_epochs_are_reshuffled_and_drop_a_different_remainder():
    sharder = EpochSharder(50, 12, seed=4)
    epochs = [np.concatenate(take(sharder, 4)) for _ in range(4)]
    orders = {tuple(e) for e in epochs}
    assert len(orders) == 4
    dropped = [frozenset(range(50)) - set(e.tolist()) for e in epochs]
    assert all(len(d) == 2 for d in dropped)
    assert len(set(dropped)) > 1  # the two images left out change between epochs


def test_same_seed_same_order_across_instances_other_seed_differs():
    a = take(EpochSharder(64, 8, seed=9), 20)
    b = take(EpochSharder(64, 8, seed=9), 20)
    c = take(EpochSharder(64, 8, seed=10), 20)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_all_ranks_share_one_permutation():
    ranks = [EpochSharder(40, 8, seed=2, rank=r, world_size=4) for r in range(4)]
    assert all(np.array_equal(ranks[0].epoch_order(e), s.epoch_order(e)) for s in ranks for e in range(3))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_union_over_ranks_equals_the_single_rank_global_batch(world_size):
    batch = 12
    single = EpochSharder(62, batch, seed=5)
    ranks = [EpochSharder(62, batch, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(3 * (62 // batch) + 2):  # across epoch boundaries
        global_batch = next(single)
        np.testing.assert_array_equal(np.concatenate([next(s) for s in ranks]), global_batch)


@pytest.mark.parametrize("consumed", [0, 1, 3, 4, 5, 9])
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_from_saved_position_continues_exactly(consumed, world_size):
    """50 images, B=12: 4 steps per epoch, so consumed 3 -> 4 / 9 resume right at / after a boundary."""
    for rank in range(world_size):
        uninterrupted = EpochSharder(50, 12, seed=8, rank=rank, world_size=world_size)
        first = EpochSharder(50, 12, seed=8, rank=rank, world_size=world_size)
        take(first, consumed)
        saved = DataPosition.from_dict(first.position.to_dict())
        resumed = EpochSharder(50, 12, seed=8, rank=rank, world_size=world_size, start=saved)
        expected = take(uninterrupted, consumed + 7)[consumed:]
        got = take(resumed, 7)
        for step, (want, have) in enumerate(zip(expected, got)):
            np.testing.assert_array_equal(have, want, err_msg=f"rank {rank}, step {consumed + step}")


def test_resume_on_a_different_world_size_keeps_the_global_batches():
    run = EpochSharder(50, 12, seed=1, world_size=2)
    take(run, 6)
    saved = run.position
    single = EpochSharder(50, 12, seed=1, start=saved)
    four = [EpochSharder(50, 12, seed=1, rank=r, world_size=4, start=saved) for r in range(4)]
    for _ in range(6):
        np.testing.assert_array_equal(np.concatenate([next(s) for s in four]), next(single))


def test_position_past_the_end_of_an_epoch_starts_the_next_one():
    # e.g. saved on a bigger dataset: step 7 does not exist when an epoch has 4 steps
    sharder = EpochSharder(50, 12, seed=3, start=DataPosition(epoch=2, step_in_epoch=7))
    fresh = EpochSharder(50, 12, seed=3, start=DataPosition(epoch=3, step_in_epoch=0))
    np.testing.assert_array_equal(next(sharder), next(fresh))
    assert sharder.position == fresh.position == DataPosition(3, 1)


def test_position_advances_through_epochs():
    sharder = EpochSharder(50, 12, seed=0)
    positions = []
    for _ in range(9):
        next(sharder)
        positions.append(sharder.position)
    assert positions == [DataPosition(0, 1), DataPosition(0, 2), DataPosition(0, 3), DataPosition(1, 0),
                         DataPosition(1, 1), DataPosition(1, 2), DataPosition(1, 3), DataPosition(2, 0),
                         DataPosition(2, 1)]  # fmt: skip


def test_sharder_is_an_iterator():
    sharder = EpochSharder(16, 4, seed=0)
    assert iter(sharder) is sharder
    assert len(list(itertools.islice(sharder, 10))) == 10


def test_data_position_round_trip():
    position = DataPosition(epoch=7, step_in_epoch=3)
    raw = position.to_dict()
    assert raw == {"epoch": 7, "step_in_epoch": 3}
    assert DataPosition.from_dict(raw) == position
    assert DataPosition.from_dict({"epoch": "2", "step_in_epoch": 1.0}) == DataPosition(2, 1)  # e.g. from JSON/YAML
    assert DataPosition() == DataPosition(0, 0)
    with pytest.raises(KeyError):
        DataPosition.from_dict({"epoch": 1})


def test_global_batch_not_divisible_by_world_size():
    with pytest.raises(ValueError) as err:
        EpochSharder(100, 10, seed=0, world_size=3)
    assert "global_batch_size=10 " in str(err.value) and "world size 3" in str(err.value)


def test_dataset_smaller_than_one_batch():
    with pytest.raises(ValueError) as err:
        EpochSharder(15, 16, seed=0)
    assert "15 images" in str(err.value) and "global_batch_size=16" in str(err.value)
    EpochSharder(16, 16, seed=0)  # exactly one batch is enough


@pytest.mark.parametrize("rank,world_size", [(2, 2), (-1, 2), (0, 0)])
def test_invalid_rank_or_world_size(rank, world_size):
    with pytest.raises(ValueError, match="rank"):
        EpochSharder(64, 8, seed=0, rank=rank, world_size=world_size)


@pytest.mark.parametrize("start", [DataPosition(0, 0), DataPosition(2, 5), DataPosition(1, 7)])
def test_position_after_matches_the_iterator(start):
    sharder = EpochSharder(100, 12, seed=1, start=start)  # 8 steps per epoch
    for consumed in range(1, 30):
        next(sharder)
        assert sharder.position_after(start, consumed) == sharder.position, consumed
