import math

import torch

from reference import perturb_norms
from qwen35.data.task import generate_problems
from qwen35.model import Qwen35Config, Qwen35ForCausalLM
from qwen35.rl.loss import LossConfig
from qwen35.rl.rewards import resolve_reward
from qwen35.rl.rollout import SamplingConfig
from qwen35.rl.data import PromptExample
from qwen35.rl.trainer import GRPOConfig, grpo_step


def tiny_policy(vocab_size=97, eos=1, seed=0):
    config = Qwen35Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=1, linear_num_value_heads=2, tie_word_embeddings=True, pad_token_id=0,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    model = Qwen35ForCausalLM.from_config(config)
    perturb_norms(model, seed)
    return model


def low_tokens(prompt, completion, label):
    """Toy verifiable reward: the share of completion tokens (written as numbers) below 20."""
    tokens = completion.split()
    return sum(int(t) < 20 for t in tokens) / max(len(tokens), 1)


def test_grpo_steps_raise_a_simple_reward():
    policy = tiny_policy()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-2, weight_decay=0.0)
    examples = [PromptExample([5 + i, 30 + i, 60 + i], "", "") for i in range(4)]
    cfg = GRPOConfig(sampling=SamplingConfig(n_samples_per_prompt=8, max_response_length=6), mini_batches=2,
                     micro_batch_size=16)
    gen = torch.Generator().manual_seed(0)
    history = [grpo_step(policy, optimizer, examples, low_tokens, lambda ids: " ".join(map(str, ids)), cfg, gen)
               for _ in range(8)]
    first, last = history[0], history[-1]
    assert first["updates"] == 2  # 2 mini-batches
    assert first["clip_fraction"] > 0.0 or history[1]["clip_fraction"] > 0.0  # the second update is off-policy
    assert max(m["logprob_mismatch_max"] for m in history) <= 1e-5  # engine == training forward
    start = sum(m["reward_mean"] for m in history[:2]) / 2
    end = sum(m["reward_mean"] for m in history[-2:]) / 2
    assert end > start + 0.25, (start, end)  # measured: 0.2 -> 0.55
    assert all(math.isfinite(m["entropy"]) and m["entropy"] > 0 for m in history)
    assert last["response_length_mean"] > 0


def test_grpo_step_on_the_arithmetic_task_with_kl_to_a_reference():
    from qwen35.data.tokenizer import build_tokenizer

    tok = build_tokenizer(vocab_size=400)
    policy = tiny_policy(vocab_size=len(tok), eos=tok.eos_token_id)
    reference = tiny_policy(vocab_size=len(tok), eos=tok.eos_token_id, seed=1).requires_grad_(False)
    examples = []
    for p in generate_problems(3, seed=1):
        messages = [{"role": "user", "content": p.question}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        examples.append(PromptExample(tok(text)["input_ids"], text, p.answer))
    cfg = GRPOConfig(sampling=SamplingConfig(n_samples_per_prompt=4, max_response_length=5),
                     loss=LossConfig(kl_coef=0.1, kl_type="low_var_kl"), micro_batch_size=5)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in policy.parameters()]
    metrics = grpo_step(policy, optimizer, examples, resolve_reward("exact"),
                        lambda ids: tok.decode(ids, skip_special_tokens=True), cfg, torch.Generator().manual_seed(0),
                        reference=reference)
    assert metrics["reward_mean"] == 0.0 and metrics["accuracy"] == 0.0  # an untrained model: scored, not right
    assert metrics["groups_kept"] == 3 and metrics["groups_dropped"] == 0 and metrics["reward_errors"] == 0
    assert metrics["clip_fraction"] == 0.0  # one on-policy update: every ratio is exactly 1
    assert metrics["kl"] > 0.0  # two different random models
    assert metrics["truncation_ratio"] > 0.0 and metrics["response_length_max"] == 5
    assert metrics["logprob_mismatch_max"] <= 1e-5
    # all advantages are 0, so only the KL term moves the weights
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_overlong_mask_takes_truncated_completions_out_of_the_loss():
    examples = [PromptExample([5 + i, 30 + i], "", "") for i in range(2)]
    for overlong, moved in (("mask", False), ("none", True)):
        policy = tiny_policy(eos=None)  # no stop token: every completion is truncated
        before = [p.detach().clone() for p in policy.parameters()]
        cfg = GRPOConfig(sampling=SamplingConfig(n_samples_per_prompt=4, max_response_length=3), overlong=overlong)
        metrics = grpo_step(policy, torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0), examples,
                            low_tokens, lambda ids: " ".join(map(str, ids)), cfg, torch.Generator().manual_seed(1))
        assert metrics["truncation_ratio"] == 1.0 and metrics["reward_std"] > 0
        assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters())) == moved
