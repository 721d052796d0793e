import pytest

from qwen35.data.formats import MalformedRecord, Sample
from qwen35.data.render import ChatRenderer, labels_from_mask

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
    {"role": "user", "content": "What is 3*7?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the calculator.",
     "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": {"expr": "3*7"}}}]},
    {"role": "tool", "content": "21"},
    {"role": "assistant", "content": "It is 21.", "reasoning_content": "The tool said 21."},
]

# Qwen3.5's render, written out by hand: the first answer comes before the last user query, so
# its thinking is dropped; the two turns after that query keep theirs.
EXPECTED_RENDER = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\nWhat is 3*7?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nNeed the calculator.\n</think>\n\n"
    "<tool_call>\n<function=calc>\n<parameter=expr>\n3*7\n</parameter>\n</function>\n</tool_call>"
    "<|im_end|>\n"
    "<|im_start|>user\n<tool_response>\n21\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n<think>\nThe tool said 21.\n</think>\n\nIt is 21.<|im_end|>\n"
)
EXPECTED_LEARNED = [
    "Hello!<|im_end|>",
    "<think>\nNeed the calculator.\n</think>\n\n<tool_call>\n<function=calc>\n<parameter=expr>\n"
    "3*7\n</parameter>\n</function>\n</tool_call><|im_end|>",
    "<think>\nThe tool said 21.\n</think>\n\nIt is 21.<|im_end|>",
]


def learned_runs(tokenizer, ids, mask) -> list[str]:
    """The decoded stretches of consecutive loss tokens."""
    runs, current = [], []
    for token, learned in zip(ids.tolist(), mask.tolist()):
        if learned:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_template_renders_the_conversation_as_written_by_hand(tokenizer):
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_RENDER


def test_tokens_are_the_tokenisation_of_the_full_render(tokenizer):
    ids, _ = ChatRenderer(tokenizer).encode(Sample("t", messages=CONVERSATION))
    assert ids.tolist() == tokenizer(EXPECTED_RENDER, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]


def test_loss_falls_exactly_on_the_assistant_spans(tokenizer):
    ids, mask = ChatRenderer(tokenizer).encode(Sample("t", messages=CONVERSATION))
    assert learned_runs(tokenizer, ids, mask) == EXPECTED_LEARNED
    # The same, token by token: a token is learned iff it starts inside a hand-written span.
    spans, at = [], 0
    for text in EXPECTED_LEARNED:
        at = EXPECTED_RENDER.index(text, at)
        spans.append((at, at + len(text)))
    offsets = tokenizer(EXPECTED_RENDER, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    expected = [any(lo <= start < hi for lo, hi in spans) for start, _ in offsets]
    assert mask.tolist() == expected


def test_thinking_written_inside_the_content_is_handled_like_reasoning_content(tokenizer):
    inline = [{"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"}]
    ids, mask = ChatRenderer(tokenizer).encode(Sample("t", messages=inline))
    assert learned_runs(tokenizer, ids, mask) == ["<think>\nGreet back.\n</think>\n\nHello!<|im_end|>"]


def test_labels_are_token_ids_on_learned_tokens_and_minus_100_elsewhere(tokenizer):
    ids, mask = ChatRenderer(tokenizer).encode(Sample("t", messages=CONVERSATION))
    labels = labels_from_mask(ids, mask)
    assert len(labels) == len(ids)
    assert (labels[mask] == ids[mask]).all() and (labels[~mask] == -100).all()


def test_plain_text_learns_every_token_and_ends_with_eos(tokenizer):
    ids, mask = ChatRenderer(tokenizer).encode(Sample("t", text="Counting is old."))
    assert ids[:-1].tolist() == tokenizer("Counting is old.", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert mask.all()


def test_prompt_completion_learns_only_the_completion_and_eos(tokenizer):
    ids, mask = ChatRenderer(tokenizer).encode(Sample("t", prompt="12 + 7 =", completion=" 19"))
    assert tokenizer.decode(ids[mask]) == " 19<|im_end|>"
    assert tokenizer.decode(ids[~mask]) == "12 + 7 ="


def test_a_conversation_the_template_rejects_is_malformed_with_its_location(tokenizer):
    late_system = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"},
                   {"role": "assistant", "content": "Hello"}]
    with pytest.raises(MalformedRecord, match=r"^chat\.jsonl:3: System message must be at the beginning"):
        ChatRenderer(tokenizer).encode(Sample("chat.jsonl:3", messages=late_system))

