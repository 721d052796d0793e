import copy
import json
import os

import numpy as np
import pytest

from qwen35.data import tokenized
from qwen35.data.formats import MalformedRecord
from qwen35.data.task import build_task
from qwen35.data.tokenized import tokenize_file


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
