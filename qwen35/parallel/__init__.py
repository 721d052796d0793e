"""Parallelism and its companions, applied to a built model by free functions, in the order
`qwen35.build` applies them: activation checkpointing (checkpointing.py), compile (compile.py),
FSDP2 (fsdp.py)."""

import torch.distributed as dist


def is_rank_zero() -> bool:
    """The process that writes shared files and prints: rank 0, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def leave_process_group() -> None:
    """The end of a distributed process: every rank first waits for the others (none tears its
    connections down while another still saves or communicates), then the process groups go,
    before the interpreter's exit. Left to that exit, gloo's worker threads have aborted
    processes ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
