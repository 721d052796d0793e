"""Reading training data: local JSONL, JSON and parquet files, in the shapes chat data comes in.

Where the data is (`data.train_path`) is one string or a list of entries. An entry is a file, a
directory (its .jsonl / .json / .parquet files), or a glob (`~/data/*.parquet`, `**` allowed),
optionally followed by `:weight`; several entries are separated by commas:

    ~/tulu.parquet
    ~/chat/*.jsonl,~/extra.jsonl
    ~/tulu.parquet:0.7,~/math/*.jsonl:0.3

Without weights every sample is used once. With weights (every entry must then have one) the
weights are shares of the training samples: normalised to sum to 1, the mix has as many samples as
the sources together, and source i contributes round(w_i * total) of them: a random subset when it
has more, all of them repeated (plus a random subset) when it has fewer. A list may also hold
`{"path": ..., "weight": ...}` mappings, which is how to name a path that contains a comma.

Each record is one of, detected per record:

- `messages`: OpenAI chat, `[{role, content}]` (tulu-3-sft-mixture: id, messages, source);
  assistant turns may carry `reasoning_content` and `tool_calls`, tool results have role `tool`;
  an optional `tools` list is shown to the chat template.
- `conversations`: ShareGPT, `[{from, value}]`; human → user, gpt → assistant, observation →
  tool, function_call → an assistant tool call; optional top-level `system` and `tools`.
- `prompt` + `completion`: strings are plain text (loss on the completion only, no chat
  template, as TRL does); lists of messages are a chat split in two.
- `text`: continued pre-training, loss on every token.

A record that fits none of them, or breaks their rules (invalid JSON or UTF-8 included), is
malformed: with `on_malformed="skip"` it is reported (file and line, or parquet row) and left out;
with `"error"` it stops the run. JSONL is read line by line, parquet batch by batch, so a file of
any size costs one batch of memory; a `.json` list is read whole (use JSONL for large data).
A file that cannot be read at all (a truncated parquet file) is a `DataError` naming it.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qwen35.errors import UserError

EXTENSIONS = (".jsonl", ".ndjson", ".json", ".parquet")


@dataclass(frozen=True)
class Source:
    """One entry of the data spec: the files it names and its mixing weight (None: unweighted)."""

    entry: str
    files: tuple[Path, ...]
    weight: float | None = None


@dataclass
class Sample:
    """A record in one of three shapes, with `where` it came from for error messages."""

    where: str
    messages: list[dict] | None = None  # chat (with `tools`)
    tools: list[dict] | None = None
    prompt: str | None = None  # plain prompt/completion
    completion: str | None = None
    text: str | None = None  # pre-training text


class DataError(UserError):
    """A problem with the user's data: the message names the file (and line or row) and says what
    is wrong, so it can be shown without a traceback."""


class MissingDataFile(DataError, FileNotFoundError):
    """A data path that names no file."""


class MalformedRecord(DataError):
    """A record that cannot be used; its message starts with the file and line."""


@dataclass
class ReadResult:
    samples: list[Sample] = field(default_factory=list)
    records: int = 0
    problems: list[str] = field(default_factory=list)  # one "file:line: reason" per skipped record


# --- where the data is ----------------------------------------------------------------------


def parse_sources(spec: str | list) -> list[Source]:
    """The files behind a data spec (see the module docstring), each entry checked to exist."""
    if isinstance(spec, (str, os.PathLike)):
        entries: list[Any] = [e for e in str(spec).split(",") if e.strip()]
    elif isinstance(spec, (list, tuple)):
        entries = list(spec)
    else:
        raise DataError(f"data path must be a string or a list, got {type(spec).__name__}")
    sources = []
    for entry in entries:
        if isinstance(entry, dict):
            unknown = set(entry) - {"path", "weight"}
            if "path" not in entry or unknown:
                raise DataError(f"data source {entry!r}: expected keys path and weight")
            path, weight = str(entry["path"]), entry.get("weight")
            weight = None if weight is None else float(weight)
        else:
            path, weight = _split_weight(str(entry).strip())
        if weight is not None and weight <= 0:
            raise DataError(f"data source {path!r}: weight must be > 0, got {weight}")
        sources.append(Source(path, _expand(path), weight))
    if not sources:
        raise DataError(f"data path {spec!r} names no file")
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise DataError(f"data path {spec!r}: give every source a weight, or none")
    return sources


def _split_weight(entry: str) -> tuple[str, float | None]:
    path, colon, weight = entry.rpartition(":")
    if colon:
        try:
            return path, float(weight)
        except ValueError:
            pass  # a colon that is part of the path
    return entry, None


def _expand(entry: str) -> tuple[Path, ...]:
    path = os.path.expanduser(entry)
    if os.path.isdir(path):
        files = sorted(p for p in Path(path).iterdir() if p.suffix in EXTENSIONS)
    elif glob.has_magic(path):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    else:
        files = [Path(path)] if os.path.isfile(path) else []
    if not files:
        raise MissingDataFile(f"data source {entry!r} matches no file")
    for f in files:
        if f.suffix not in EXTENSIONS:
            raise DataError(f"{f}: unknown data file type; expected one of {', '.join(EXTENSIONS)}")
    return tuple(files)


# --- reading records ------------------------------------------------------------------------


def iter_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of a file, streamed. A JSONL line comes as its raw bytes
    (`parse_record` turns it into a record, in whichever process does the work); a record that
    cannot be read comes as a MalformedRecord; a file that cannot be read raises DataError."""
    if path.suffix == ".parquet":
        yield from _parquet_records(path)
        return
    if path.suffix == ".json":
        data = path.read_bytes()
        try:
            records = json.loads(_decode(data, path))
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data": a JSONL file named .json, read it as one
                raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        else:
            if not isinstance(records, list):
                raise DataError(f"{path}: a .json data file must hold a list of records")
            for i, record in enumerate(records):
                yield f"{path} record {i}", record
            return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield f"{path}:{lineno}", line


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 ({e.reason} at byte {e.start} of the file)") from None


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"{path} row {row}", record
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read this parquet file (after {row} rows): {e}") from None


def parse_record(where: str, record: Any) -> Any:
    """A JSONL line's bytes → its JSON value; anything else is already a record."""
    if not isinstance(record, bytes):
        return record
    try:
        text = record.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedRecord(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MalformedRecord(f"{where}: invalid JSON: {e.msg}") from None


def read_file(path: Path, on_malformed: str = "skip") -> ReadResult:
    """Every usable sample of a file in memory (for small files; the tokeniser streams instead);
    malformed records skipped and reported, or fatal."""
    result = ReadResult()
    for where, record in iter_records(path):
        result.records += 1
        try:
            result.samples.append(to_sample(parse_record(where, record), where))
        except MalformedRecord as e:
            if on_malformed == "error":
                raise
            result.problems.append(str(e))
    return result


# --- record shapes --------------------------------------------------------------------------

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "model": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool",
    "observation": "tool", "function_response": "tool", "function_call": "assistant",
}
ROLES = ("system", "user", "assistant", "tool")


def to_sample(record: Any, where: str) -> Sample:
    def bad(reason: str) -> MalformedRecord:
        return MalformedRecord(f"{where}: {reason}")

    if not isinstance(record, dict):
        raise bad(f"expected a JSON object, got {type(record).__name__}")
    tools = _tools(record.get("tools"), bad)
    if record.get("messages") is not None:
        return Sample(where, messages=_chat(record["messages"], bad), tools=tools)
    if record.get("conversations") is not None:
        return Sample(where, messages=_sharegpt(record, bad), tools=tools)
    if record.get("prompt") is not None or record.get("completion") is not None:
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                raise bad("empty completion")
            return Sample(where, prompt=prompt, completion=completion)
        if isinstance(prompt, list) and isinstance(completion, list):
            return Sample(where, messages=_chat(prompt + completion, bad), tools=tools)
        raise bad("prompt and completion must both be strings or both be lists of messages")
    if record.get("text") is not None:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise bad("text must be a non-empty string")
        return Sample(where, text=record["text"])
    raise bad("no messages, conversations, prompt/completion or text field "
              f"(keys: {', '.join(map(str, record)) or 'none'})")


def _chat(messages: Any, bad) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"message {i} is not an object")
        message = {k: v for k, v in message.items() if v is not None}  # parquet fills absent keys
        role = "system" if message.get("role") == "developer" else message.get("role")
        if role not in ROLES:
            raise bad(f"message {i} has role {message.get('role')!r}; expected one of {ROLES}")
        content = message.get("content", "")
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type", "text") != "text" or "text" not in p
                   for p in content):
                raise bad(f"message {i}: only text content is supported (found images or other parts)")
            message["content"] = "".join(p["text"] for p in content)  # as the template joins them
        elif not isinstance(content, str):
            raise bad(f"message {i}: content must be a string or a list of text parts")
        message["role"] = role
        if "tool_calls" in message:
            message["tool_calls"] = [_tool_call(c, bad, i) for c in message["tool_calls"]]
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        raise bad("no assistant message to learn from")
    return out


def _tool_call(call: Any, bad, i: int) -> dict:
    """OpenAI's `{type, function: {name, arguments}}` with the arguments as a mapping: Qwen's
    template writes each argument as a <parameter=...> block, so a JSON string must be parsed."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad(f"message {i}: a tool call needs a function name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise bad(f"message {i}: tool call arguments are not valid JSON") from None
    if not isinstance(arguments, dict):
        raise bad(f"message {i}: tool call arguments must be an object")
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _sharegpt(record: dict, bad) -> list[dict]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise bad("conversations must be a non-empty list")
    messages = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.append({"role": "system", "content": record["system"]})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise bad(f"conversation turn {i} needs a string value")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise bad(f"conversation turn {i} is from {speaker!r}; expected one of "
                      f"{', '.join(SHAREGPT_ROLES)}")
        if speaker == "function_call":
            try:
                calls = json.loads(turn["value"])
            except json.JSONDecodeError:
                raise bad(f"conversation turn {i}: function_call value is not JSON") from None
            calls = calls if isinstance(calls, list) else [calls]
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return _chat(messages, bad)


def _tools(tools: Any, bad) -> list[dict] | None:
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):  # LLaMA-Factory keeps them as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise bad("tools is not valid JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise bad("tools must be a list of objects")
    return tools
