"""Parallelism and its companions, applied to a built model by free functions, in the order
`qwen35.build` applies them: activation checkpointing (checkpointing.py), compile (compile.py),
FSDP2 (fsdp.py)."""

import torch.distributed as dist


def is_rank_zero() -> bool:
    """The process that writes shared files and prints: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0
