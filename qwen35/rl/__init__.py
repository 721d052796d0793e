"""GRPO: rollouts from our own decoding engine, verifiable rewards, a clipped policy loss."""
