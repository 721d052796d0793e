"""Prompt data for GRPO: records with a prompt and a label, dapo-math-17k's layout.

A record's prompt (key `input_key`, default `prompt`) is a string or a list of chat messages; it
is rendered with the model's chat template and the generation prompt (`enable_thinking` passed to
the template when set). The label (key `label_key`, default `label`) is what the reward checks
the completion against. JSONL, JSON and parquet files are read as for SFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qwen35.data.formats import DataError, iter_records, parse_record


@dataclass(frozen=True)
class PromptExample:
    prompt_ids: list[int]  # rendered with the chat template and the generation prompt
    prompt_text: str
    label: str


def _messages(prompt, where: str, input_key: str) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if (isinstance(prompt, list) and prompt
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in prompt)):
        return prompt
    raise DataError(f"{where}: {input_key!r} must be a string or a list of {{role, content}} messages")


def load_prompts(path: str | Path, tokenizer, input_key: str = "prompt", label_key: str = "label",
                 enable_thinking: bool | None = None, limit: int | None = None,
                 template_kwargs: dict | None = None) -> list[PromptExample]:
    """Every record of `path` rendered for generation, with the chat template's extra variables
    `template_kwargs` (`data.template_kwargs`, e.g. {enable_thinking: false}); a record without
    either key is an error that names the file, the line and the keys the record has."""
    template_kwargs = dict(template_kwargs or {})
    if enable_thinking is not None:
        template_kwargs["enable_thinking"] = enable_thinking
    examples = []
    for where, raw in iter_records(Path(path)):
        if limit is not None and len(examples) >= limit:
            break
        record = parse_record(where, raw)  # a line that is not JSON raises, naming file and line
        if not isinstance(record, dict):
            raise DataError(f"{where}: a prompt record must be an object")
        for key, option in ((input_key, "data.input_key"), (label_key, "data.label_key")):
            if key not in record:
                raise DataError(f"{where}: no {key!r} ({option}); the record has {sorted(record)}")
        messages = _messages(record[input_key], where, input_key)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template_kwargs)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        examples.append(PromptExample(list(ids), text, str(record[label_key])))
    return examples
