"""Rewards for the GRPO run tests, named as `toy_rewards:NAME` (tests/rl is on the import path)."""


def short(prompt: str, completion: str, label: str) -> float:
    """Shorter completions score higher: a reward every group of random samples disagrees on."""
    return 1.0 / (1.0 + len(completion))
