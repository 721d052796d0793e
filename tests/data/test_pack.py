from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen35.data.pack import PackedDataset, best_fit_decreasing, collate, select_documents
from qwen35.data.tokenized import TokenizedFile
from qwen35.ops.segments import positions_in_documents

PAD = 0


def make_file(lengths, learned_from=0) -> TokenizedFile:
    """Sample i is the tokens 1000*(i+1) + 0, 1, ...; loss from position `learned_from` on."""
    ids = np.concatenate([1000 * (i + 1) + np.arange(n) for i, n in enumerate(lengths)]).astype(np.int32)
    loss = np.concatenate([np.arange(n) >= learned_from for n in lengths])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedFile(Path("mem"), ids, loss, offsets, records=len(lengths), problems=[])


def all_refs(file: TokenizedFile) -> np.ndarray:
    return np.stack([np.zeros(len(file), np.int64), np.arange(len(file))], axis=1)


def packed(lengths, seq_len=64, seed=0, overlong="truncate", learned_from=0):
    file = make_file(lengths, learned_from)
    docs, counts = select_documents([file], all_refs(file), seq_len, overlong)
    return PackedDataset([file], docs, seq_len, PAD, seed=seed), counts


LENGTHS = np.random.default_rng(0).integers(1, 64, size=200).tolist()


def test_best_fit_places_every_sample_once_within_the_row_length():
    lengths = np.array(LENGTHS)
    rows = best_fit_decreasing(lengths, 64, seed=0)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(lengths[row].sum() <= 64 for row in rows)
    assert len(rows) <= np.ceil(lengths.sum() / 64) * 1.05  # near the lower bound


def test_every_row_has_exactly_seq_len_tokens_with_consistent_boundaries():
    data, _ = packed(LENGTHS)
    for row in (data[i] for i in range(len(data))):
        cu = row["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 64
        assert (cu[1:] > cu[:-1]).all()
        for key in ("input_ids", "labels", "position_ids"):
            assert row[key].shape == (64,)


def test_positions_restart_at_zero_in_every_document_and_the_padding():
    data, _ = packed(LENGTHS)
    for i in range(len(data)):
        row = data[i]
        assert torch.equal(row["position_ids"], positions_in_documents(row["cu_seqlens"], 64))


def test_no_sample_is_split_or_lost():
    data, counts = packed(LENGTHS)
    seen = Counter()
    for i in range(len(data)):
        row = data[i]
        cu = row["cu_seqlens"].tolist()
        for lo, hi in zip(cu[:-1], cu[1:]):
            tokens = row["input_ids"][lo:hi]
            if tokens[0] != PAD:
                sample = int(tokens[0]) // 1000 - 1
                assert tokens.tolist() == (1000 * (sample + 1) + np.arange(LENGTHS[sample])).tolist()
                seen[sample] += 1
    assert seen == Counter(range(len(LENGTHS)))
    assert counts.documents == len(LENGTHS)


def test_padding_is_its_own_segment_with_no_loss():
    data, _ = packed([40, 40, 40])  # one per row: 24 tokens of padding each
    for i in range(len(data)):
        row = data[i]
        assert row["cu_seqlens"].tolist() == [0, 40, 64]
        assert (row["input_ids"][40:] == PAD).all()
        assert (row["labels"][40:] == -100).all()
        assert (row["labels"][:40] == row["input_ids"][:40]).all()


def test_labels_are_minus_100_where_a_sample_has_no_loss():
    data, _ = packed([10], learned_from=4)
    row = data[0]
    assert (row["labels"][:4] == -100).all()
    assert torch.equal(row["labels"][4:10], row["input_ids"][4:10])


def test_truncate_cuts_overlong_samples_to_seq_len():
    data, counts = packed([100, 10], seq_len=64, overlong="truncate")
    assert counts.truncated == 1 and counts.documents == 2
    lengths = sorted(np.diff(data[i]["cu_seqlens"].numpy())[0] for i in range(len(data)))
    assert lengths == [10, 64]
    long_row = next(data[i] for i in range(len(data)) if data[i]["input_ids"][0] == 1000)
    assert long_row["input_ids"].tolist() == (1000 + np.arange(64)).tolist()


def test_truncation_that_leaves_nothing_to_learn_drops_the_sample():
    _, counts = packed([100], seq_len=64, learned_from=80)
    assert (counts.truncated, counts.dropped_no_loss, counts.documents) == (0, 1, 0)


def test_drop_removes_overlong_samples():
    data, counts = packed([100, 10, 65], seq_len=64, overlong="drop")
    assert (counts.dropped_overlong, counts.documents) == (2, 1)
    assert len(data) == 1 and data[0]["cu_seqlens"].tolist() == [0, 10, 64]


def test_unknown_overlong_policy_is_an_error():
    with pytest.raises(ValueError, match="overlong must be 'truncate' or 'drop'"):
        packed([10], overlong="wrap")


def test_packing_is_determined_by_the_seed():
    def rows(seed):
        data, _ = packed(LENGTHS, seed=seed)
        return [data[i]["input_ids"].tolist() for i in range(len(data))]

    assert rows(3) == rows(3)
    assert rows(3) != rows(4)


def test_collate_flattens_rows_into_one_packed_row():
    data, _ = packed(LENGTHS)
    rows = [data[0], data[1], data[2]]
    batch = collate(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, 192)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(batch[key][0], torch.cat([r[key] for r in rows]))
    expected = [0] + [b + 64 * i for i, r in enumerate(rows) for b in r["cu_seqlens"][1:].tolist()]
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == expected
    assert torch.equal(batch["position_ids"][0], positions_in_documents(batch["cu_seqlens"], 192))
