"""One sample to tokens and labels, with the loss on what the model should learn to write.

Chats go through the tokenizer's own chat template, so training sees exactly the text inference
will: the token ids are the tokenisation of the template's render of the whole conversation. Loss
falls on the assistant turns only: each turn's thinking block (when the template renders one),
its content and tool calls, and its closing `<|im_end|>`, but not the `<|im_start|>assistant\\n`
header, which the inference prompt supplies, nor the newline after `<|im_end|>`, which the model
never writes because generation stops at `<|im_end|>`.

Where does each turn sit in the full render? Render the conversation up to the turn, and up to the
turn's end, and compare. The care is that a template may render a turn differently once later
turns exist: Qwen3.5 drops the thinking of every assistant turn before the last user query. A
prefix that ends in the middle of such a stretch renders its last turns *with* thinking, so it is
not a prefix of the full render. When that happens the prefix is rendered again followed by an
empty user turn, which puts the earlier turns in the same "before the last query" context the full
conversation gives them, and the empty turn's text is cut off again. Every boundary found this way
is checked against the full render; a template that defeats both readings is reported as an error
rather than guessed at.

Labels follow transformers: same length as `input_ids`, the token id where the token is learned
and -100 elsewhere; the model shifts them by one.
"""

from __future__ import annotations

import numpy as np
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer

from qwen35.data.formats import MalformedRecord, Sample
from qwen35.ops.cross_entropy import IGNORE_INDEX

ASSISTANT_HEADER = "<|im_start|>assistant\n"
_PROBE = {"role": "user", "content": ""}


class ChatRenderer:
    """Renders conversations with one tokenizer's chat template and finds the assistant spans."""

    def __init__(self, tokenizer, template_kwargs: dict | None = None, chat_template: str | None = None):
        """`template_kwargs` are extra variables for the template (`enable_thinking`, ...);
        `chat_template` is a template's text to use instead of the tokenizer's own."""
        self.tokenizer = tokenizer
        self.kwargs = dict(template_kwargs or {})
        if chat_template is not None:
            self.kwargs["chat_template"] = chat_template
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos token: it is needed to end text samples")
        # What an empty user turn adds at the end of a conversation (used to cut it off again).
        lead = [{"role": "user", "content": "x"}]
        self.probe_text = self.render(lead + [_PROBE])[len(self.render(lead)):]
        assert self.probe_text, "an empty user turn renders to nothing"
        # The Rust tokenizer itself, copied and set as transformers sets it for a plain call (no
        # truncation or padding, control tokens matched whole): calling it directly gives the same
        # tokens without transformers' per-token Python conversions.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))

    def render(self, messages: list[dict], tools: list | None = None) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **self.kwargs)

    def assistant_spans(self, messages: list[dict], tools: list | None, full: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of the assistant turns' learned text within `full`."""
        eos = self.tokenizer.eos_token
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._message_start(messages, i, tools, full)
            end = self._message_start(messages, i + 1, tools, full) if i + 1 < len(messages) else len(full)
            turn = full[start:end]
            if not turn.startswith(ASSISTANT_HEADER) or eos not in turn:
                raise ValueError(f"assistant message {i} does not render as {ASSISTANT_HEADER!r}"
                                 f"...{eos!r}: is this a Qwen (ChatML) chat template?")
            spans.append((start + len(ASSISTANT_HEADER), start + turn.rindex(eos) + len(eos)))
        return spans

    def _message_start(self, messages: list[dict], k: int, tools: list | None, full: str) -> int:
        """Where message k begins in `full` (see the module docstring)."""
        try:
            prefix = self.render(messages[:k], tools)
            if full.startswith(prefix):
                return len(prefix)
        except TemplateError:
            pass  # e.g. Qwen3.5 refuses a conversation with no user query yet
        probed = self.render(messages[:k] + [_PROBE], tools)
        if probed.endswith(self.probe_text) and full.startswith(probed[: -len(self.probe_text)]):
            return len(probed) - len(self.probe_text)
        raise ValueError(f"cannot locate message {k} in the rendered conversation: the chat "
                         "template renders earlier turns differently depending on later ones")

    def encode(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int32, loss mask bool) of one sample; MalformedRecord if it cannot render."""
        result = self.encode_batch([sample])[0]
        if isinstance(result, str):
            raise MalformedRecord(result)
        return result

    def encode_batch(self, samples: list[Sample]) -> list[tuple[np.ndarray, np.ndarray] | str]:
        """`encode` of many samples, each (ids, mask) or the message of why it cannot render. The
        texts go to the Rust tokenizer in one call, which spreads a batch over the cores when the
        process is allowed threads (TOKENIZERS_PARALLELISM)."""
        results: list = [None] * len(samples)
        rendered = []  # (index, text, learned spans, add_eos)
        for i, sample in enumerate(samples):
            try:
                rendered.append((i, *self.text_and_spans(sample)))
            except MalformedRecord as e:
                results[i] = str(e)
        encodings = self.backend.encode_batch([text for _, text, _, _ in rendered], add_special_tokens=False)
        for (i, _, spans, add_eos), enc in zip(rendered, encodings):
            results[i] = self._ids_and_mask(enc, spans, add_eos)
        return results

    def text_and_spans(self, sample: Sample) -> tuple[str, list[tuple[int, int]], bool]:
        """The text a sample trains on, the character spans learned, and whether an eos follows."""
        try:
            if sample.messages is not None:
                full = self.render(sample.messages, sample.tools)
                return full, self.assistant_spans(sample.messages, sample.tools, full), False
            if sample.text is not None:
                return sample.text, [(0, len(sample.text))], True
            text = sample.prompt + sample.completion
            return text, [(len(sample.prompt), len(text))], True
        except (TemplateError, ValueError) as e:
            raise MalformedRecord(f"{sample.where}: {e}") from None

    def _ids_and_mask(self, encoding, spans: list[tuple[int, int]], add_eos: bool):
        """A token is learned when it starts inside a span. The eos appended to plain text is
        learned too: it is how a model learns where a document ends."""
        ids = np.array(encoding.ids, dtype=np.int32)
        starts = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
        mask = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:
            mask |= (starts >= lo) & (starts < hi)
        if add_eos:
            ids = np.append(ids, np.int32(self.tokenizer.eos_token_id))
            mask = np.append(mask, True)
        return ids, mask


def labels_from_mask(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, ids, IGNORE_INDEX).astype(np.int64)
