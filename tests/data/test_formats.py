import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen35.data.formats import MalformedRecord, parse_sources, read_file, to_sample


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_openai_messages_keep_reasoning_and_parse_tool_call_arguments():
    record = {"id": "a", "source": "tulu", "messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "", "reasoning_content": "add",
         "tool_calls": [{"type": "function",
                         "function": {"name": "calc", "arguments": '{"expr": "2+2"}'}}]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "text", "text": "4."}]},
    ]}
    sample = to_sample(record, "f.jsonl:1")
    assert [m["role"] for m in sample.messages] == ["user", "assistant", "tool", "assistant"]
    assert sample.messages[1]["reasoning_content"] == "add"
    assert sample.messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "calc", "arguments": {"expr": "2+2"}}}]
    assert sample.messages[3]["content"] == "It is 4."


def test_sharegpt_speakers_map_to_chat_roles():
    record = {"system": "Be brief.", "tools": '[{"name": "calc"}]', "conversations": [
        {"from": "human", "value": "2+2?"},
        {"from": "function_call", "value": '{"name": "calc", "arguments": {"expr": "2+2"}}'},
        {"from": "observation", "value": "4"},
        {"from": "gpt", "value": "4"},
    ]}
    sample = to_sample(record, "f.jsonl:1")
    assert [(m["role"], m["content"]) for m in sample.messages] == [
        ("system", "Be brief."), ("user", "2+2?"), ("assistant", ""), ("tool", "4"), ("assistant", "4")]
    assert sample.messages[2]["tool_calls"][0]["function"] == {"name": "calc", "arguments": {"expr": "2+2"}}
    assert sample.tools == [{"name": "calc"}]


def test_prompt_completion_strings_stay_plain_and_lists_become_a_chat():
    plain = to_sample({"prompt": "1+1=", "completion": "2"}, "w")
    assert (plain.prompt, plain.completion, plain.messages) == ("1+1=", "2", None)
    chat = to_sample({"prompt": [{"role": "user", "content": "1+1?"}],
                      "completion": [{"role": "assistant", "content": "2"}]}, "w")
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]


def test_text_record_is_pretraining_text():
    assert to_sample({"text": "Once upon a time."}, "w").text == "Once upon a time."


@pytest.mark.parametrize("record, reason", [
    ({"foo": 1}, "no messages, conversations, prompt/completion or text field (keys: foo)"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message to learn from"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "message 0 has role 'robot'"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]},
                   {"role": "assistant", "content": "a cat"}]}, "only text content is supported"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "conversation turn 0 is from 'alien'"),
])
def test_broken_records_are_malformed_with_a_reason(record, reason):
    with pytest.raises(MalformedRecord, match="^data.jsonl:7: ") as info:
        to_sample(record, "data.jsonl:7")
    assert reason in str(info.value)


def test_malformed_line_is_reported_with_file_and_line_and_skipped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "one"}, "{not json", {"text": "three"}, {"messages": []}, {"text": "five"}])
    result = read_file(path)
    assert [s.text for s in result.samples] == ["one", "three", "five"]
    assert result.records == 5
    assert len(result.problems) == 2
    assert result.problems[0].startswith(f"{path}:2: invalid JSON")
    assert result.problems[1].startswith(f"{path}:4: messages must be a non-empty list")


def test_malformed_line_stops_the_run_when_asked(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": ""}])
    with pytest.raises(MalformedRecord, match=f"^{path}:2: text must be a non-empty string"):
        read_file(path, on_malformed="error")


def test_parquet_rows_parse_and_problems_name_the_row(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "messages": [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "only a question"}],
        [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}],
    ]}), path)
    result = read_file(path)
    assert [s.messages[-1]["content"] for s in result.samples] == ["hello", "see you"]
    assert result.problems == [f"{path} row 1: no assistant message to learn from"]


def test_json_file_holds_a_list_or_is_read_as_jsonl(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    lined = write_jsonl(tmp_path / "lines.json", [{"text": "c"}, {"text": "d"}])
    assert [s.text for s in read_file(listed).samples] == ["a", "b"]
    assert [s.text for s in read_file(lined).samples] == ["c", "d"]


def test_sources_expand_globs_directories_and_weights(tmp_path):
    for name in ("a1.jsonl", "a2.jsonl", "b.parquet"):
        (tmp_path / name).write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text("")
    sources = parse_sources(f"{tmp_path}/a*.jsonl:0.7,{tmp_path}/b.parquet:0.3")
    assert [s.files for s in sources] == [(tmp_path / "a1.jsonl", tmp_path / "a2.jsonl"),
                                          (tmp_path / "b.parquet",)]
    assert [s.weight for s in sources] == [0.7, 0.3]
    listed = parse_sources([{"path": str(tmp_path / "sub"), "weight": 2}, str(tmp_path / "b.parquet:1")])
    assert [(s.files, s.weight) for s in listed] == [((tmp_path / "sub" / "c.jsonl",), 2.0),
                                                     ((tmp_path / "b.parquet",), 1.0)]
    assert parse_sources(str(tmp_path / "a1.jsonl"))[0].weight is None


def test_sources_must_exist_and_be_all_weighted_or_none(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="nope"):
        parse_sources(str(tmp_path / "nope*.jsonl"))
    with pytest.raises(ValueError, match="every source a weight, or none"):
        parse_sources(f"{tmp_path}/a.jsonl:1,{tmp_path}/a.jsonl")
