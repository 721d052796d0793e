import pytest
from transformers import AutoTokenizer

from qwen35.data.tokenizer import SPECIAL_TOKENS, VISIBLE_TOKENS, build_tokenizer

TEXTS = [
    "Ann has 12 apples and buys 7 more. How many apples does she have now?",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "Ünïcödé, 日本語, emoji 🙂 and math: 3 × 4 = 12",
    'def f(x):\n    return {"a": [1, 2]}',
]


def test_builds_offline_and_loads_back_with_auto_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    built = build_tokenizer(tmp_path, vocab_size=1024)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(built) <= 1024
    assert (loaded.eos_token, loaded.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert loaded.chat_template == built.chat_template
    assert loaded(TEXTS[0])["input_ids"] == built(TEXTS[0])["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_text_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_tokens_in_qwens_order_after_the_vocabulary(tokenizer):
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids)
    first = ids[0][0]
    assert [i[0] for i in ids] == list(range(first, first + len(SPECIAL_TOKENS)))
    assert first + len(SPECIAL_TOKENS) == len(tokenizer)


def test_only_control_tokens_are_skipped_when_decoding(tokenizer):
    ids = tokenizer("<|im_start|>assistant\n<think>\nx\n</think>\n\n<tool_call>y</tool_call><|im_end|>",
                    add_special_tokens=False)["input_ids"]
    kept = tokenizer.decode(ids, skip_special_tokens=True)
    assert kept == "assistant\n<think>\nx\n</think>\n\n<tool_call>y</tool_call>"
    assert "<think>" in VISIBLE_TOKENS and "<|im_end|>" not in VISIBLE_TOKENS


def test_digits_are_split_one_per_token(tokenizer):
    assert tokenizer.tokenize("1234") == ["1", "2", "3", "4"]


def test_chat_template_renders_chatml_with_a_thinking_generation_prompt(tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_chat_template_lists_tools_in_the_system_turn(tokenizer):
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {}}}]
    text = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}], tools=tools, tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:"
                           '\n\n<tools>\n{"type": "function", "function": {"name": "calc", "parameters": {}}}'
                           "\n</tools>")
    assert text.endswith("</IMPORTANT>\n\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
