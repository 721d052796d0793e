"""A small Qwen3.5-style tokenizer, trained by the project on its own text.

Qwen3.5's real vocabulary has 248,320 entries: its embedding alone would dwarf a 2M-parameter CPU
model. For the default run we train a byte-level BPE of ~1k entries on the bundled text and the
task's text, with everything else as in Qwen3.5: the same pre-split pattern (single digits, which
helps arithmetic), NFC normalisation, byte-level fallback (any text encodes, nothing is unknown),
Qwen3.5's 33 control tokens in Qwen's order after the learned vocabulary, and a chat template that
renders what Qwen3.5's renders. Code written against this tokenizer runs unchanged on the real one.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from qwen35.data.task import generate_problems

# Qwen3.5's control tokens in id order (248044 ... 248076 in the real vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>",
    "<think>", "</think>",
    "<|audio_start|>", "<|audio_end|>",
    "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>",
)
# Tokens a model writes as part of its visible answer: like Qwen, not "special", so that
# decode(skip_special_tokens=True) keeps them and tool-call / thinking parsers still see them.
VISIBLE_TOKENS = frozenset({
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
    "<|file_sep|>",
})
# Qwen3.5's pre-split pattern (letters with their combining marks, digits one at a time).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

HERE = Path(__file__).parent
CHAT_TEMPLATE_FILE = HERE / "chat_template.jinja"
CORPUS_FILE = HERE / "corpus.txt"


def chat_template() -> str:
    return CHAT_TEMPLATE_FILE.read_text()


def training_texts(seed: int = 0, n_problems: int = 2000) -> list[str]:
    """The bundled corpus and task problems cut as a chat render cuts them: the control tokens are
    added whole afterwards (learning merges of `<|im_start|>` would waste vocabulary), so the text
    between them is what the merges should fit: `user\n<question>`, `assistant\n<answer>`."""
    texts = CORPUS_FILE.read_text().split("\n\n")
    for p in generate_problems(n_problems, seed=seed):
        texts += [f"user\n{p.question}", f"assistant\n{p.answer}", "\n"]
    return texts


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 1024, seed: int = 0,
                    texts: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Trains the small tokenizer (a second or two) and, given `out_dir`, saves it there so that
    `AutoTokenizer.from_pretrained(out_dir)` loads it offline. `vocab_size` counts everything:
    256 bytes, the learned merges and the 33 control tokens."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the 256 bytes + "
                         f"{len(SPECIAL_TOKENS)} control tokens it must hold")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts if texts is not None else training_texts(seed), trainer)
    tok.add_tokens([AddedToken(t, special=t not in VISIBLE_TOKENS, normalized=False)
                    for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False, model_max_length=262144)
    tokenizer.chat_template = chat_template()
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer
