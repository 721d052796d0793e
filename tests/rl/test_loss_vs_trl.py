"""Our GRPO loss and gradient against TRL's own `GRPOTrainer._compute_loss` on the same batch.

Both sides hold the same tiny Qwen3.5 (transformers' on TRL's side, ours loaded from what
transformers saved); TRL's trainer is built for real and its loss method called with the inputs
its generation step would have prepared (prompts, right-padded completions, advantages, old and
reference log-probs). TRL's `dapo` is our `token_mean`, its `grpo` our `seq_mean_token_mean`.
"""

import pytest
import torch

from reference import hf_text_model, ours_from_hf
from qwen35.rl.logprobs import completion_logprobs, pack_samples
from qwen35.rl.loss import LossConfig, grpo_loss, token_weights

PROMPT_LEN, COMPLETION_LENGTHS = 5, [7, 3, 6, 1]


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def trl_tokenizer():
    from qwen35.data.tokenizer import build_tokenizer

    return build_tokenizer(texts=["one two three 1 2 3"], vocab_size=300)


def make_batch(vocab_size: int):
    gen = torch.Generator().manual_seed(7)
    prompts = torch.randint(2, vocab_size, (len(COMPLETION_LENGTHS), PROMPT_LEN), generator=gen)
    width = max(COMPLETION_LENGTHS)
    completions = torch.zeros(len(COMPLETION_LENGTHS), width, dtype=torch.long)  # right padding: 0
    mask = torch.zeros(len(COMPLETION_LENGTHS), width, dtype=torch.long)
    for i, n in enumerate(COMPLETION_LENGTHS):
        completions[i, :n] = torch.randint(2, vocab_size, (n,), generator=gen)
        mask[i, :n] = 1
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.5])
    # old and reference log-probs off the current ones by up to ±0.4, so tokens land on both sides
    # of both clip boundaries
    shift_old = (torch.rand(mask.shape, generator=gen) - 0.5) * 0.8
    shift_ref = (torch.rand(mask.shape, generator=gen) - 0.5) * 0.8
    return prompts, completions, mask, advantages, shift_old, shift_ref


def trl_loss_and_grads(hf, tokenizer, tmp_path, loss_type, batch, current_logp, beta, entropy_coef, kl_weighted):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts, completions, mask, advantages, shift_old, shift_ref = batch
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"), loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, beta=0.0,
        entropy_coef=entropy_coef, use_bias_correction_kl=kl_weighted, per_device_train_batch_size=len(COMPLETION_LENGTHS), num_generations=2,
        max_completion_length=max(COMPLETION_LENGTHS), temperature=1.0, use_cpu=True, report_to=[], bf16=False,
    )
    trainer = GRPOTrainer(model=hf, reward_funcs=lambda prompts, completions, **_: [0.0] * len(prompts), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we do not run
    # beta > 0 at construction would load a reference model by name; the loss reads only the
    # reference log-probs passed in, so the coefficient is set afterwards
    trainer.beta = beta
    inputs = {
        "prompt_ids": prompts, "prompt_mask": torch.ones_like(prompts),
        "completion_ids": completions, "completion_mask": mask, "advantages": advantages,
        "old_per_token_logps": (current_logp + shift_old) * mask,
        "ref_per_token_logps": (current_logp + shift_ref) * mask,
        "num_items_in_batch": mask.sum(),
    }
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    clip = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    return loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters()}, clip


@pytest.mark.parametrize("loss_type, aggregation, beta, entropy_coef, kl_weighted", [
    ("dapo", "token_mean", 0.0, 0.0, False),
    ("grpo", "seq_mean_token_mean", 0.0, 0.0, False),
    ("dapo", "token_mean", 0.05, 0.01, False),  # KL (TRL's k3) and the entropy bonus
    ("grpo", "seq_mean_token_mean", 0.05, 0.0, True),  # the KL weighted by the ratio, TRL's default
])
def test_loss_and_gradient_equal_trl(tmp_path, trl_tokenizer, loss_type, aggregation, beta, entropy_coef,
                                     kl_weighted):
    hf = hf_text_model()
    ours = ours_from_hf(hf, tmp_path)
    batch = make_batch(hf.config.vocab_size)
    prompts, completions, mask, advantages, shift_old, shift_ref = batch
    samples = pack_samples(prompts.tolist(), [c[:n].tolist() for c, n in zip(completions, COMPLETION_LENGTHS)])
    keep = mask.bool()

    logp, entropy = completion_logprobs(ours, samples, with_entropy=True)
    current = torch.zeros(mask.shape)
    current[keep] = logp.detach()  # in the padded layout TRL uses
    cfg = LossConfig(eps_clip=0.2, eps_clip_high=0.28, kl_coef=beta, kl_type="k3", kl_ratio_weighted=kl_weighted,
                     entropy_coef=entropy_coef, aggregation=aggregation)
    weights = token_weights(COMPLETION_LENGTHS, aggregation, sum(COMPLETION_LENGTHS), len(COMPLETION_LENGTHS))
    ours_out = grpo_loss(logp, (current + shift_old)[keep], advantages[:, None].expand_as(mask)[keep], weights, cfg,
                         ref_logp_N=(current + shift_ref)[keep], entropy_N=entropy)
    ours_out.loss.backward()

    trl_loss, trl_grads, trl_clip = trl_loss_and_grads(hf, trl_tokenizer, tmp_path, loss_type, batch, current,
                                                       beta, entropy_coef, kl_weighted)
    assert 0.0 < trl_clip < 1.0  # the batch exercises the clipping
    assert abs(ours_out.loss.item() - trl_loss.item()) <= 1e-5 * max(1.0, abs(trl_loss.item()))
    if aggregation == "token_mean":  # TRL's clip metric is a token mean
        assert ours_out.clip_fraction.item() == pytest.approx(trl_clip, abs=1e-6)
    for name, param in ours.named_parameters():
        assert relative_error(param.grad, trl_grads[name]) <= 1e-4, name


def test_group_advantages_use_trls_std():
    """TRL's advantages are `(r - group mean) / (nanstd(group) + 1e-4)`, its std Bessel-corrected."""
    from trl.trainer.utils import nanstd

    from qwen35.rl.loss import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0, 1.0])
    groups = rewards.view(2, 4)
    theirs = (groups - groups.mean(1, keepdim=True)) / (nanstd(groups, dim=1).unsqueeze(1) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4, eps=1e-4), theirs.view(-1))
