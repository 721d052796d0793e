"""The rollout engine against the model's own decoding and its full forward (float32, CPU)."""

import pytest
import torch

from reference import TINY_CONFIG, perturb_norms
from qwen35.engine import DecodeEngine
from qwen35.generate import generate
from qwen35.model import Qwen35Config, Qwen35ForCausalLM
from qwen35.rl.logprobs import completion_logprobs, pack_samples

PROMPT_LENGTHS = (5, 2, 9, 1, 7, 3, 12)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = Qwen35ForCausalLM.from_config(Qwen35Config(**TINY_CONFIG, eos_token_id=1, pad_token_id=0)).eval()
    perturb_norms(model)
    return model


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(2, 97, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def test_greedy_equals_generate_and_the_full_forward_argmax(model, prompts):
    # two slots for seven prompts: slots are refilled as sequences end; buckets of 4 positions
    engine = DecodeEngine(model, num_slots=2, max_length=32, attention_bucket=4)
    tokens, _ = engine.generate(prompts, max_new_tokens=12)
    assert tokens == generate(model, prompts, max_new_tokens=12, eos_token_id=[])
    for prompt, completion in zip(prompts, tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0]
        assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == completion


def test_more_prompts_than_slots_give_each_prompt_its_completion_alone(model, prompts):
    engine = DecodeEngine(model, num_slots=3, max_length=40, prefill_tokens=10)
    stop = 5
    together, _ = engine.generate(prompts, max_new_tokens=20, stop_token_ids=[stop])
    lengths = {len(t) for t in together}
    assert len(lengths) > 1  # some stopped early, so slots were refilled at different steps
    for prompt, completion in zip(prompts, together):
        alone, _ = DecodeEngine(model, num_slots=1, max_length=40).generate([prompt], 20, stop_token_ids=[stop])
        assert alone[0] == completion


def test_logprobs_equal_the_training_forward(model, prompts):
    engine = DecodeEngine(model, num_slots=3, max_length=32, attention_bucket=8)
    tokens, logps = engine.generate(prompts, 14, temperature=0.7, top_k=40, top_p=0.95,
                                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        train, _ = completion_logprobs(model, pack_samples(prompts, tokens), temperature=0.7)
    ours = torch.tensor([v for row in logps for v in row])
    assert ours.shape == train.shape and ours.numel() == 14 * len(prompts)
    assert (ours - train).abs().max().item() <= 1e-5


def test_greedy_logprobs_are_at_temperature_one(model, prompts):
    tokens, logps = DecodeEngine(model, 4, 32).generate(prompts, 6)
    with torch.no_grad():
        train, _ = completion_logprobs(model, pack_samples(prompts, tokens), temperature=1.0)
    assert (torch.tensor([v for row in logps for v in row]) - train).abs().max().item() <= 1e-5


def test_sampling_is_reproducible_with_a_seed(model, prompts):
    engine = DecodeEngine(model, num_slots=3, max_length=32)

    def run(seed):
        return engine.generate(prompts, 10, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(3), run(3), run(4)
    assert first == again
    assert first[0] != other[0]


def test_stop_tokens_end_a_sequence_after_the_stop(model, prompts):
    engine = DecodeEngine(model, num_slots=4, max_length=32)
    free, _ = engine.generate(prompts, 10)
    stop = free[0][3]
    stopped, logps = engine.generate(prompts, 10, stop_token_ids=[stop, 96])
    for f, s, lp in zip(free, stopped, logps):
        cut = min((f.index(t) for t in (stop, 96) if t in f), default=len(f) - 1)
        assert s == f[: cut + 1] and len(lp) == len(s)


def test_a_sequence_longer_than_the_engine_is_refused(model):
    engine = DecodeEngine(model, num_slots=1, max_length=10)
    with pytest.raises(ValueError, match="max_length 10"):
        engine.generate([[3] * 6], max_new_tokens=5)
