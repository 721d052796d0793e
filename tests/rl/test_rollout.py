import pytest
import torch

from reference import perturb_norms
from qwen35.model import Qwen35Config, Qwen35ForCausalLM
from qwen35.rl.logprobs import completion_logprobs, pack_samples
from qwen35.rl.rollout import SamplingConfig, sample_rollout

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27]]


@pytest.fixture(scope="module")
def model():
    config = Qwen35Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4, tie_word_embeddings=True, pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = Qwen35ForCausalLM.from_config(config)
    perturb_norms(model)
    return model


def test_rollout_logprobs_equal_the_training_forward(model):
    cfg = SamplingConfig(n_samples_per_prompt=3, temperature=0.7, top_k=40, top_p=0.95, max_response_length=12)
    out = sample_rollout(model, PROMPTS, cfg, torch.Generator().manual_seed(0))
    assert len(out.completion_ids) == 9 and out.prompt_ids[3] == PROMPTS[1]
    assert [len(c) for c in out.completion_ids] == [len(v) for v in out.logprobs]
    with torch.no_grad():
        train_logp, _ = completion_logprobs(model, pack_samples(out.prompt_ids, out.completion_ids), temperature=0.7)
    rollout_logp = torch.tensor([v for row in out.logprobs for v in row])
    assert rollout_logp.shape == train_logp.shape and rollout_logp.numel() > 40
    assert (rollout_logp - train_logp).abs().max().item() <= 1e-5


def test_sampling_is_reproducible_with_a_seed(model):
    cfg = SamplingConfig(n_samples_per_prompt=2, temperature=1.0, max_response_length=10)
    first = sample_rollout(model, PROMPTS, cfg, torch.Generator().manual_seed(3))
    again = sample_rollout(model, PROMPTS, cfg, torch.Generator().manual_seed(3))
    other = sample_rollout(model, PROMPTS, cfg, torch.Generator().manual_seed(4))
    assert first.completion_ids == again.completion_ids and first.logprobs == again.logprobs
    assert first.completion_ids != other.completion_ids
    assert first.completion_ids[0] != first.completion_ids[1]  # samples of one prompt differ


def test_temperature_zero_is_greedy_generate(model):
    cfg = SamplingConfig(n_samples_per_prompt=2, temperature=0.0, max_response_length=10, batch_size=4)
    out = sample_rollout(model, PROMPTS, cfg)
    greedy = model.generate(PROMPTS, max_new_tokens=10, eos_token_id=1)
    assert out.completion_ids == [g for g in greedy for _ in range(2)]


def test_stop_tokens_end_completions_and_truncation_is_flagged(model):
    free = sample_rollout(model, PROMPTS, SamplingConfig(n_samples_per_prompt=1, temperature=0.0, max_response_length=8))
    stop = free.completion_ids[0][2]
    cfg = SamplingConfig(n_samples_per_prompt=1, temperature=0.0, max_response_length=8, stop_token_ids=(stop,))
    out = sample_rollout(model, PROMPTS, cfg)
    assert out.completion_ids[0] == free.completion_ids[0][: free.completion_ids[0].index(stop) + 1]
    assert not out.truncated[0]
    for completion, truncated in zip(out.completion_ids, out.truncated):
        assert truncated == (len(completion) == 8 and completion[-1] not in (1, stop))
