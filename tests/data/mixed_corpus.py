"""A deterministic JSONL corpus with every record shape the tokeniser handles: chats of one or
many turns, system prompts, tools and tool calls, tool results, thinking (as reasoning_content
and inline <think>), ShareGPT, prompt/completion, plain text, text that NFC normalisation changes,
control-token look-alikes in user text, and malformed lines."""

from __future__ import annotations

import json
import random

WORDS = ("the cat sat on a mat 12 + 7 = 19 naïve café 東京 emoji 🙂 tab\there\n new\r\nline "
         "  spaces  <|im_start|> </think> '<tool_call>' don't it's x" + "e\u0301").split(" ")
TOOLS = [{"type": "function", "function": {"name": "calc", "description": "adds",
                                           "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}}}}]


def phrase(rng: random.Random, lo: int = 1, hi: int = 40) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def chat(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": phrase(rng)}] if rng.random() < 0.4 else []
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": phrase(rng)})
        answer = {"role": "assistant", "content": phrase(rng, 0)}
        kind = rng.random()
        if kind < 0.25:
            answer["reasoning_content"] = phrase(rng)
        elif kind < 0.4:
            answer["content"] = f"<think>\n{phrase(rng)}\n</think>\n\n{phrase(rng)}"
        elif kind < 0.6:
            answer["tool_calls"] = [{"type": "function", "function": {
                "name": "calc", "arguments": json.dumps({"expr": phrase(rng, 1, 3), "n": rng.randint(0, 9)})}}]
            messages.append(answer)
            messages += [{"role": "tool", "content": phrase(rng)} for _ in range(rng.randint(1, 2))]
            answer = {"role": "assistant", "content": phrase(rng)}
        messages.append(answer)
    record = {"messages": messages}
    if rng.random() < 0.3:
        record["tools"] = TOOLS
    return record


def record(rng: random.Random, i: int) -> str:
    kind = i % 10
    if kind == 7:
        return json.dumps({"prompt": phrase(rng), "completion": " " + phrase(rng)})
    if kind == 8:
        return json.dumps({"text": phrase(rng, 1, 200)})
    if kind == 9:
        return json.dumps({"conversations": [{"from": "human", "value": phrase(rng)},
                                             {"from": "gpt", "value": phrase(rng)}],
                           "system": phrase(rng)})
    if i % 37 == 5:
        return rng.choice(["not json", json.dumps({"messages": [{"role": "user", "content": "q"}]}),
                           json.dumps({"text": ""}), json.dumps([1, 2])])
    return json.dumps(chat(rng), ensure_ascii=rng.random() < 0.5)


def write_mixed_corpus(path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.writelines(record(rng, i) + "\n" for i in range(n))
