"""Run under torchrun (gloo): every rank builds the data sets from one shared store directory and
saves the packed rows it sees, for tests/data/test_store.py to compare."""

import json
import sys

import numpy as np
import torch.distributed as dist
from transformers import AutoTokenizer

from qwen35.data.dataset import build_datasets
from qwen35.parallel import leave_process_group


def main(tokenizer_dir: str, spec: str, cache_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = build_datasets({"train_path": spec, "seq_len": 64, "cache_dir": cache_dir}, tokenizer,
                          progress=False)
    rows = [data.train[i] for i in range(len(data.train))]
    np.savez(f"{out}/rank{rank}.npz", input_ids=np.stack([r["input_ids"].numpy() for r in rows]),
             labels=np.stack([r["labels"].numpy() for r in rows]))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"files_from_cache": data.stats.files_from_cache,
                   "mapped": all(isinstance(file.ids, np.memmap) for file in data.train.files)}, f)
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
