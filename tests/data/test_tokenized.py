import copy
import json
import os

import numpy as np
import pytest

from qwen35.data import tokenized
from qwen35.data.formats import MalformedRecord, iter_records, parse_record, to_sample
from qwen35.data.render import ChatRenderer
from qwen35.data.task import build_task
from qwen35.data.tokenized import tokenize_file
from mixed_corpus import write_mixed_corpus  # tests/data, on the path as the test directory


@pytest.fixture
def task_file(tmp_path):
    return build_task(tmp_path / "task", n_train=300, n_val=10).train


def same_tokens(a, b) -> bool:
    return (np.array_equal(a.ids, b.ids) and np.array_equal(a.loss, b.loss)
            and np.array_equal(a.offsets, b.offsets))


def test_second_build_of_the_same_data_comes_from_the_cache(tokenizer, task_file, tmp_path, monkeypatch):
    first = tokenize_file(task_file, tokenizer, cache_dir=tmp_path / "cache", progress=False)
    assert not first.from_cache and len(first) == 300

    def no_reading(*args, **kwargs):
        raise AssertionError("a cache hit must not read the data file")

    monkeypatch.setattr(tokenized, "iter_records", no_reading)
    second = tokenize_file(task_file, tokenizer, cache_dir=tmp_path / "cache", progress=False)
    assert second.from_cache
    assert same_tokens(first, second)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_a_changed_chat_template_misses_the_cache(tokenizer, task_file, tmp_path):
    tokenize_file(task_file, tokenizer, cache_dir=tmp_path / "cache", progress=False)
    changed = copy.deepcopy(tokenizer)
    changed.chat_template = tokenizer.chat_template.replace("<think>\\n", "<think>")
    result = tokenize_file(task_file, changed, cache_dir=tmp_path / "cache", progress=False)
    assert not result.from_cache
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_changed_template_arguments_miss_the_cache(tokenizer, task_file, tmp_path):
    tokenize_file(task_file, tokenizer, cache_dir=tmp_path / "cache", progress=False)
    result = tokenize_file(task_file, tokenizer, cache_dir=tmp_path / "cache", progress=False,
                           template_kwargs={"enable_thinking": False})
    assert not result.from_cache


def test_a_changed_data_file_misses_the_cache(tokenizer, task_file, tmp_path):
    tokenize_file(task_file, tokenizer, cache_dir=tmp_path / "cache", progress=False)
    lines = task_file.read_text().splitlines()
    task_file.write_text("\n".join(lines[:-1]) + "\n")
    os.utime(task_file, ns=(1, 1))  # a new mtime even on coarse file systems
    result = tokenize_file(task_file, tokenizer, cache_dir=tmp_path / "cache", progress=False)
    assert not result.from_cache and len(result) == 299


def test_workers_tokenise_exactly_as_the_main_process(tokenizer, task_file, monkeypatch):
    serial = tokenize_file(task_file, tokenizer, num_workers=0, progress=False)
    monkeypatch.setattr(tokenized, "MIN_SAMPLES_FOR_WORKERS", 0)
    parallel = tokenize_file(task_file, tokenizer, num_workers=2, progress=False)
    assert same_tokens(serial, parallel)


def test_malformed_records_are_remembered_by_the_cache(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\nnot json\n")
    first = tokenize_file(path, tokenizer, cache_dir=tmp_path / "cache", progress=False)
    assert first.problems == [f"{path}:2: invalid JSON: Expecting value"]
    second = tokenize_file(path, tokenizer, cache_dir=tmp_path / "cache", progress=False)
    assert second.from_cache and second.problems == first.problems
    with pytest.raises(MalformedRecord, match=f"^{path}:2: "):
        tokenize_file(path, tokenizer, cache_dir=tmp_path / "cache", on_malformed="error", progress=False)


def per_record_reference(path, tokenizer):
    """The store's arrays as a plain per-record encoder makes them: transformers' tokenizer call
    on each rendered text, loss where a token starts inside a learned span."""
    renderer = ChatRenderer(tokenizer)
    ids, loss, ends, learned = [], [], [0], []
    for where, record in iter_records(path):
        try:
            text, spans, add_eos = renderer.text_and_spans(to_sample(parse_record(where, record), where))
        except MalformedRecord:
            continue
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in enc["offset_mapping"]]
        sample_ids = enc["input_ids"] + ([tokenizer.eos_token_id] if add_eos else [])
        mask += [True] if add_eos else []
        ids += sample_ids
        loss += mask
        ends.append(ends[-1] + len(sample_ids))
        learned.append(sum(mask))
    return {"ids.bin": np.array(ids, np.uint16), "loss.bin": np.array(loss, bool),
            "offsets.bin": np.array(ends, np.int64), "learned.bin": np.array(learned, np.int64)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batched_store_equals_the_per_record_encoding_byte_for_byte(tokenizer, tmp_path, monkeypatch,
                                                                   num_workers):
    path = tmp_path / "mixed.jsonl"
    write_mixed_corpus(path, 400)
    monkeypatch.setattr(tokenized, "MIN_SAMPLES_FOR_WORKERS", 0)
    monkeypatch.setattr(tokenized, "BATCH", 64)  # several batches, some with malformed records
    store = tmp_path / "store"
    tokenized.build_store(path, store, tokenizer, num_workers=num_workers, progress=False)
    reference = per_record_reference(path, tokenizer)
    meta = json.loads((store / "meta.json").read_text())
    assert meta["records"] == 400 and 0 < meta["malformed"] < 40
    assert meta["samples"] == len(reference["learned.bin"]) == 400 - meta["malformed"]
    for name, array in reference.items():
        assert (store / name).read_bytes() == array.tobytes(), name
