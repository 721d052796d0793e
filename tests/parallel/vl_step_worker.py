"""One optimizer step of the tiny-vl preset under FSDP (or one process) where the micro-batches
of rank 1 hold no image; rank 0 saves the step's loss and full gradients.

    torchrun --nproc-per-node N vl_step_worker.py DATA_DIR OUT.pt

With one process the same micro-batches run one after another, so the results must be equal.
"""

import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from qwen35.build import build_model_and_tokenizer
from qwen35.data.media import MediaEncoder, collate_media, media_row
from qwen35.data.processor import load_image_processor
from qwen35.data.render import ChatRenderer
from qwen35.parallel import leave_process_group
from qwen35.train.config_parser import load_run_config
from qwen35.train.setup import Runtime
from qwen35.train.step import forward_backward
from qwen35.train.trainer import _global_count

data_dir, out = Path(sys.argv[1]), sys.argv[2]
cfg = load_run_config(None, ["--model.preset", "tiny-vl", "--train.output_dir", str(data_dir / "run")])
rt = Runtime.start(cfg)
torch.manual_seed(0)
model, tokenizer = build_model_and_tokenizer(cfg, rt)
processor = load_image_processor(None, 64 * 64, 128 * 128)
encoder = MediaEncoder(ChatRenderer(tokenizer), processor)


def chat(question, answer, image=None):
    content = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


with_images = [chat("What colour?", "red", "a.png"), chat("How many?", "two", "b.png")]
text_only = [chat("Say hi.", "hi"), chat("Count to three.", "one two three")]
micro = [collate_media([media_row([encoder.encode(r, "x", data_dir / "data.jsonl") for r in records], 128,
                                  tokenizer.pad_token_id, processor, encoder.pad_id)])
         for records in (with_images, text_only)]
mine = micro if rt.world_size == 1 else [micro[rt.rank]]  # rank 1: no image at all
result = forward_backward(model, mine, _global_count, None, 0.0, rt.world_size)
grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in model.named_parameters()}
if rt.is_main:
    torch.save({"loss": result.loss, "grads": grads}, out)
leave_process_group()
