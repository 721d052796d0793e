import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qwen35.data.tokenizer import build_tokenizer
from qwen35.rl.data import load_prompts
from qwen35.rl.rewards import check_prompts


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(texts=["What is 2 + 3? Answer: 5"], vocab_size=300)


def test_string_and_message_prompts_are_rendered_for_generation(tmp_path, tok):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "What is 2 + 3?", "label": "5"},
            {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "label": 5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = load_prompts(path, tok)
    assert first.prompt_text == second.prompt_text  # a string is one user turn
    assert first.prompt_text.endswith("<|im_start|>assistant\n<think>\n")
    assert first.prompt_ids == tok(first.prompt_text, add_special_tokens=False)["input_ids"]
    assert (first.label, second.label) == ("5", "5")


def test_renamed_keys_parquet_and_thinking_off(tmp_path, tok):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["What is 2 + 3?"] * 2, "answer": ["5", "6"]}), path)
    examples = load_prompts(path, tok, input_key="question", label_key="answer", enable_thinking=False)
    assert [e.label for e in examples] == ["5", "6"]
    assert examples[0].prompt_text.endswith("<think>\n\n</think>\n\n")
    with pytest.raises(ValueError, match="enable_thinking"):  # the deepscaler trap, caught
        check_prompts("deepscaler", [e.prompt_text for e in examples])


def test_a_record_without_the_keys_names_file_line_and_option(tmp_path, tok):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "x", "label": "1"}) + "\n" + json.dumps({"question": "y", "label": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: no 'prompt' \(data.input_key\); the record has \['label', 'question'\]"):
        load_prompts(path, tok)
