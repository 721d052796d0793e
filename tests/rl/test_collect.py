import torch

from test_grpo_step import tiny_policy
from qwen35.rl.collect import collect_batch, overlong_penalty
from qwen35.rl.data import PromptExample
from qwen35.rl.rollout import SamplingConfig


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([10, 12, 14, 16])
    # max 16, buffer 4: free up to 12 tokens, then -0.5 per token down to -1.0 at 16 (factor 1)
    torch.testing.assert_close(overlong_penalty(lengths, 16, 4, 1.0), torch.tensor([0.0, 0.0, -0.5, -1.0]))


def first_token_parity(prompt, completion, label):
    """'same' prompts always score 1 (a group that teaches nothing); others by parity."""
    return 1.0 if label == "same" else float(int(completion.split()[0]) % 2)


def test_dynamic_sampling_drops_agreeing_groups_and_refills():
    policy = tiny_policy()
    same = [PromptExample([5 + i, 6], "", "same") for i in range(2)]
    mixed = iter([PromptExample([40 + i, 41, 42], "", "mixed") for i in range(20)])
    asked = []

    def more(k):
        asked.append(k)
        return [next(mixed) for _ in range(k)]

    batch = collect_batch(policy, same + [PromptExample([30, 31], "", "mixed")], first_token_parity,
                          lambda ids: " ".join(map(str, ids)),
                          SamplingConfig(n_samples_per_prompt=6, max_response_length=3),
                          torch.Generator().manual_seed(0), dynamic_sampling=True, more_prompts=more)
    groups = batch.rewards.view(-1, 6)
    assert groups.shape[0] == 3  # the batch is full again
    assert all(not bool((g == g[0]).all()) for g in groups)  # every kept group has a signal
    assert batch.groups_dropped >= 2 and asked[0] == 2
    assert len(batch.rollout.completion_ids) == 18 and len(batch.task_rewards) == 6 * (3 + sum(asked))
