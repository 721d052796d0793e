"""`qwen35 train`, killed with SIGKILL in the middle of writing its second checkpoint: after the
tensors are written, before the checkpoint is complete."""

import os
import signal
import sys

import qwen35.train.checkpoint as checkpoint
from qwen35.cli import main

real_save = checkpoint.dcp.save
calls = []


def save_then_die(*args, **kwargs):
    real_save(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint.dcp.save = save_then_die
main(["train", *sys.argv[1:]])
