"""Every data error names the file and the line (or row), and says per source what was lost."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen35.data.dataset import build_datasets
from qwen35.data.formats import DataError, MalformedRecord, read_file


def build(tokenizer, train_path, **settings):
    return build_datasets({"train_path": str(train_path), "seq_len": 64, **settings}, tokenizer,
                          progress=False)


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def text_line(text: str) -> bytes:
    return json.dumps({"text": text}).encode()


def test_an_empty_file_is_an_error_naming_it(tokenizer, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=f"^{path}: the file holds no records"):
        build(tokenizer, path)


def test_invalid_utf8_names_the_file_and_line(tokenizer, tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [text_line("one"), b'{"text": "caf\xe9"}', text_line("three")])
    result = read_file(path)
    assert [s.text for s in result.samples] == ["one", "three"]
    assert result.problems == [f"{path}:2: invalid UTF-8 (invalid continuation byte at byte 13 of the line)"]
    with pytest.raises(MalformedRecord, match=f"^{path}:2: invalid UTF-8"):
        build(tokenizer, path, on_malformed="error")
    listed = tmp_path / "d.json"
    listed.write_bytes(b'[{"text": "a"},\n {"text": "caf\xe9"}]')
    with pytest.raises(DataError, match=f"^{listed}:2: invalid UTF-8"):
        read_file(listed)


def test_a_truncated_parquet_file_is_an_error_naming_it(tokenizer, tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"sample {i}" for i in range(50)]}), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=f"^{path}: cannot read this parquet file"):
        build(tokenizer, path)


def test_wrong_parquet_columns_are_reported_per_source(tokenizer, tmp_path):
    good = tmp_path / "good.jsonl"
    write_lines(good, [text_line("x " * 100)])  # longer than seq_len: dropped
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2", "q3"], "answer": ["a1", "a2", "a3"]}), wrong)
    with pytest.raises(DataError, match=f"^{wrong}: 3 of 3 records are malformed") as info:
        build(tokenizer, f"{good},{wrong}")
    assert f"{wrong} row 0: no messages, conversations, prompt/completion or text field " \
           "(keys: question, answer)" in str(info.value)
    with pytest.raises(DataError, match="no training sample is left") as info:
        build(tokenizer, f"{good},{wrong}", max_malformed_fraction=1.0)
    message = str(info.value)
    assert (f"{good}: 1 records read, 0 malformed, 1 dropped as longer than seq_len 64, 0 truncated, "
            "0 dropped with nothing to learn, 0 kept") in message
    assert f"{wrong}: 3 records read, 3 malformed, 0 dropped as longer than seq_len 64" in message
    assert f"first problem: {wrong} row 0: no messages" in message


def test_a_file_of_mostly_malformed_lines_is_an_error(tokenizer, tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [b"{not json"] * 99 + [text_line("the one good line")])
    with pytest.raises(DataError, match=f"^{path}: 99 of 100 records are malformed, more than "
                                        r"data.max_malformed_fraction \(0.5\)"):
        build(tokenizer, path)
    assert build(tokenizer, path, max_malformed_fraction=1.0).stats.train.documents == 1


def test_overlong_samples_are_dropped_by_default_and_counted_per_source(tokenizer, tmp_path):
    short = write_lines(tmp_path / "short.jsonl", [text_line(f"short {i}") for i in range(4)])
    long = write_lines(tmp_path / "long.jsonl", [text_line("long " * 100), text_line("fine")])
    data = build(tokenizer, f"{short},{long}")
    by_source = {s.entry: s.counts for s in data.stats.sources}
    assert (by_source[str(short)].dropped_overlong, by_source[str(short)].documents) == (0, 4)
    assert (by_source[str(long)].dropped_overlong, by_source[str(long)].documents) == (1, 1)
    assert (data.stats.train.dropped_overlong, data.stats.train.documents) == (1, 5)
    assert f"source {long}: 2 records read, 0 malformed, 1 dropped as longer" in data.stats.summary()
