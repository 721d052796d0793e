import itertools

import pytest
import torch

from qwen35.data.loader import PackedLoader

SEQ = 4


class NumberedRows(torch.utils.data.Dataset):
    """Row i is SEQ copies of i, so a batch tells which rows it holds."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.full((SEQ,), i)
        return {"input_ids": ids, "labels": ids, "position_ids": torch.arange(SEQ),
                "cu_seqlens": torch.tensor([0, SEQ], dtype=torch.int32)}


def rows_of(batch) -> list[int]:
    return batch["input_ids"][0, ::SEQ].tolist()


def take(loader, n) -> list[list[int]]:
    return [rows_of(b) for b in itertools.islice(iter(loader), n)]


def test_micro_batches_are_flattened_rows():
    batch = next(iter(PackedLoader(NumberedRows(10), micro_batch_size=3)))
    assert batch["input_ids"].shape == (1, 3 * SEQ)
    assert batch["cu_seqlens"].tolist() == [0, 4, 8, 12]


def test_an_epoch_visits_every_row_once_in_a_seeded_order():
    first = take(PackedLoader(NumberedRows(12), 2, seed=5), 12)
    assert sorted(sum(first[:6], [])) == list(range(12))
    assert sorted(sum(first[6:], [])) == list(range(12))
    assert first[:6] != first[6:]  # a new order each epoch
    assert first == take(PackedLoader(NumberedRows(12), 2, seed=5), 12)
    assert first != take(PackedLoader(NumberedRows(12), 2, seed=6), 12)


@pytest.mark.parametrize("consumed", [1, 5, 6, 9])  # mid-epoch, at and after the epoch's end
def test_a_resumed_loader_continues_with_the_exact_next_micro_batch(consumed):
    loader = PackedLoader(NumberedRows(12), 2, seed=1)
    stream = iter(loader)
    for _ in range(consumed):
        next(stream)
    state = loader.state_dict()
    expected = [rows_of(next(stream)) for _ in range(4)]

    resumed = PackedLoader(NumberedRows(12), 2, seed=1)
    resumed.load_state_dict(state)
    assert take(resumed, 4) == expected


def test_ranks_get_disjoint_rows_that_cover_the_data():
    per_rank = [sum(take(PackedLoader(NumberedRows(12), 2, seed=3, rank=r, world_size=3), 2), [])
                for r in range(3)]
    assert sum(len(rows) for rows in per_rank) == 12
    assert sorted(sum(per_rank, [])) == list(range(12))


def test_ranks_run_equally_many_batches_when_rows_do_not_divide():
    loaders = [PackedLoader(NumberedRows(10), 2, seed=3, rank=r, world_size=3) for r in range(3)]
    assert {loader.batches_per_epoch for loader in loaders} == {2}
    rows = [sum(take(loader, 2), []) for loader in loaders]
    assert sorted(set(sum(rows, []))) == list(range(10))  # all covered; 2 rows wrap around


def test_resuming_on_a_different_data_set_is_refused():
    loader = PackedLoader(NumberedRows(12), 2)
    with pytest.raises(ValueError, match="saved over 12 packed rows and the data now packs into 11"):
        PackedLoader(NumberedRows(11), 2).load_state_dict(loader.state_dict())


def test_resuming_on_more_ranks_continues_at_the_same_row_of_the_epoch():
    single = PackedLoader(NumberedRows(12), 1, seed=2)
    stream = iter(single)
    next(stream), next(stream)
    state = single.state_dict()
    remaining = sorted(sum(take(single, 10), []))
    ranks = [PackedLoader(NumberedRows(12), 1, seed=2, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    assert sorted(sum((sum(take(loader, 5), []) for loader in ranks), [])) == remaining
