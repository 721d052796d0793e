"""QLoRA of the 35B-A3B on one GPU: qwen35 with 4-bit routed experts against the Axolotl setup
(transformers + bitsandbytes + PEFT), same config, same tokens, one command.

    python benchmarks/bench_qlora_moe.py --tokens 8192                  # 35B-A3B, all 40 layers
    python benchmarks/bench_qlora_moe.py --layers 20                    # both sides with 20 layers
    python benchmarks/bench_qlora_moe.py --smoke                        # CPU, tiny-moe, a check that it runs

Both sides train rank-16 adapters (`--rank`, alpha twice the rank) on the routed experts (PEFT's `target_parameters`:
`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) and on the attention and GDN projections
(`ATTENTION_TARGETS`), with every layer checkpointed, bf16 compute, AdamW on the adapters, random
weights built on the device (no checkpoint is read):

- ours: the model built on the meta device, the routed experts made 4-bit (`quantize_experts`),
  memory given, the float weights drawn, each expert drawn and quantized one at a time (no bf16
  copy of the experts ever exists), the decoder's linear layers made 4-bit
  (`quantize_linear_layers`); one packed row of `--docs` documents; fast ops.
- peer: transformers' `Qwen3_5MoeForCausalLM` (grouped-GEMM experts, sdpa, fla's GDN when
  installed) built in bf16 on the device, its linear layers replaced by bitsandbytes `Linear4bit`
  as `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16)` does on load (NF4, double
  quantization, `lm_head` and the embedding kept); the routed experts stay bf16, since
  bitsandbytes quantizes linear layers only. PEFT's `get_peft_model` adds the adapters, transformers'
  gradient checkpointing (non-reentrant) checkpoints every layer. One row of the same tokens (its
  GDN path cannot keep packed documents apart).

Printed per system: build time, step time, tokens/s and the peak GPU memory of a training step
(`torch.cuda.max_memory_allocated`, model included), then a summary table.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peer import transformers_model  # noqa: E402
from qwen35 import Qwen35ForCausalLM, ops, preset  # noqa: E402
from qwen35.lora import LoraSettings, apply_lora, quantize_experts, quantize_linear_layers  # noqa: E402
from qwen35.lora.nf4_experts import NF4ExpertWeight  # noqa: E402
from qwen35.parallel.checkpointing import apply_activation_checkpointing  # noqa: E402

ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
RANK = 16  # alpha = 2 * rank


@dataclass
class Result:
    system: str
    status: str = "ok"
    build_s: float = 0.0
    step_ms: float = 0.0
    tokens_per_s: float = 0.0
    peak_gib: float = 0.0
    loss: float = float("nan")
    trainable: int = 0


def model_config(name: str, layers: int):
    if name == "tiny-moe":
        return preset(name, vocab_size=1024) if not layers else preset(name, vocab_size=1024, num_hidden_layers=layers)
    return preset(name, num_hidden_layers=layers) if layers else preset(name)


def batch(vocab: int, tokens: int, docs: int, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen).to(device)
    lengths = [tokens // docs] * (docs - 1) + [tokens - (tokens // docs) * (docs - 1)]
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32).to(device)
    return ids, cu


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _built(device) -> None:
    """The step's peak counts the model as it trains, not its construction (the peer's passes
    through the whole model in bf16 before its linear layers are quantized)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0


def _timed(step, steps: int, warmup: int, device) -> tuple[float, float]:
    loss = float("nan")
    for _ in range(warmup):
        loss = step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    return (time.perf_counter() - start) / max(steps, 1), loss


def _adamw(params, device):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda" or None)


def build_ours(config, device, dtype, rank: int = RANK):
    """The QLoRA model without any bf16 copy of the experts: see the module docstring."""
    with torch.device("meta"):
        model = Qwen35ForCausalLM(config)
    model.to_compute_dtype(dtype)
    quantize_experts(model)  # 4-bit storage, still on the meta device
    model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        model.init_weights()  # everything but the 4-bit experts
        for module in model.modules():
            if isinstance(module, NF4ExpertWeight):
                module.normal_(config.initializer_range, dtype)
    quantize_linear_layers(model, dtype)
    apply_lora(model, LoraSettings(rank, 2 * rank, target_modules=ATTENTION_TARGETS, target_parameters=EXPERT_TARGETS))
    apply_activation_checkpointing(model, "full")
    return model.train()


def run_ours(config, ids, cu, steps, warmup, device, rank: int = RANK) -> Result:
    result = Result("ours: 4-bit experts + 4-bit linears")
    start = time.perf_counter()
    model = build_ours(config, device, _dtype(device), rank)
    _built(device)
    result.build_s = time.perf_counter() - start
    return train_steps(result, model, lambda: model(ids, cu_seqlens=cu, labels=ids).loss, ids, steps, warmup, device)


def _dtype(device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def train_steps(result: Result, model, loss_of_batch, ids, steps: int, warmup: int, device) -> Result:
    """Times AdamW steps on the adapters (float32, under bf16 autocast on the GPU, as the trainer
    and transformers' Trainer with `bf16: true` run them); fills `result`."""
    trained = [p for p in model.parameters() if p.requires_grad]
    result.trainable = sum(p.numel() for p in trained)
    optimizer = _adamw(trained, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = loss_of_batch()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    seconds, loss = _timed(step, steps, warmup, device)
    result.step_ms, result.tokens_per_s, result.loss = seconds * 1e3, ids.numel() / seconds, float(loss)
    result.peak_gib = _peak_gib(device)
    return result


def build_peer(config, device, dtype, rank: int = RANK):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    hf_config = Qwen3_5MoeTextConfig(**config.to_hf_dict(), experts_implementation="grouped_mm")
    model = transformers_model(Qwen3_5MoeForCausalLM, hf_config, device, dtype)
    # What BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute) leaves after loading:
    # every nn.Linear but the output head a Linear4bit, quantized as it moves to the device.
    # (transformers' own path needs a checkpoint to load; this one builds the same modules.)
    for name, linear in [(n, m) for n, m in model.model.named_modules() if type(m) is torch.nn.Linear]:
        parent, _, child = name.rpartition(".")
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4", compress_statistics=True, device="meta")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data.cpu() if device.type == "cpu" else linear.weight.data,
                                             requires_grad=False, quant_type="nf4", compress_statistics=True)
        quantized.support_avx512bf16_for_cpu = False  # as ours: bitsandbytes' CPU repacking breaks small layers
        setattr(model.model.get_submodule(parent), child, quantized.to(device))
        del linear
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=ATTENTION_TARGETS,
                      target_parameters=EXPERT_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora).train()


def run_peer(config, ids, steps, warmup, device, rank: int = RANK) -> Result:
    result = Result("peer: transformers + bitsandbytes + PEFT")
    start = time.perf_counter()
    model = build_peer(config, device, _dtype(device), rank)
    _built(device)
    result.build_s = time.perf_counter() - start
    adapters = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    print(f"[qlora-moe] peer: experts implementation {model.config._experts_implementation}, "
          f"{sum(isinstance(m, bnb_linear()) for m in model.modules())} Linear4bit layers, adapters {adapters}",
          flush=True)
    return train_steps(result, model, lambda: model(input_ids=ids, labels=ids, use_cache=False).loss, ids, steps,
                       warmup, device)


def bnb_linear():
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit


def guarded(run, system: str, device) -> Result:
    try:
        return run()
    except torch.OutOfMemoryError as e:
        return Result(system, status=f"OOM (peak {_peak_gib(device):.1f} GiB): {str(e).splitlines()[0][:120]}")
    except Exception as e:  # one failing side must not hide the other's numbers
        return Result(system, status=f"error: {type(e).__name__}: {str(e)[:300]}")
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def line(r: Result) -> str:
    if r.status != "ok":
        return f"{r.system}: {r.status}"
    return (f"{r.system}: {r.tokens_per_s:,.0f} tokens/s, step {r.step_ms:,.0f} ms, peak {r.peak_gib:.2f} GiB, "
            f"build {r.build_s:.1f} s, {r.trainable / 1e6:.1f}M trainable, loss {r.loss:.3f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="35B-A3B")
    p.add_argument("--layers", type=int, default=0, help="decoder layers of both models; 0: the preset's")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--docs", type=int, default=4, help="documents packed in our row")
    p.add_argument("--rank", type=int, default=RANK)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--systems", nargs="+", default=["ours", "peer"], choices=["ours", "peer"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny-moe, 64 tokens, reference ops")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.tokens, args.docs, args.steps, args.warmup, args.device = "tiny-moe", 64, 2, 1, 1, "cpu"
    return args


def main(argv=None) -> list[Result]:
    args = parse_args(argv)
    device = torch.device(args.device)
    config = model_config(args.preset, args.layers)
    if device.type == "cuda":
        ops.use_backend("fast")
    print(f"[qlora-moe] {args.preset}, {config.num_hidden_layers} layers, {config.num_experts} experts, "
          f"{args.tokens} tokens ({args.docs} documents for ours), rank {args.rank}, full checkpointing, "
          f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}",
          flush=True)
    ids, cu = batch(config.vocab_size, args.tokens, args.docs, device)
    results = []
    for system in args.systems:
        torch.manual_seed(0)
        if system == "ours":
            r = guarded(lambda: run_ours(config, ids, cu, args.steps, args.warmup, device, args.rank), "ours", device)
        else:
            r = guarded(lambda: run_peer(config, ids, args.steps, args.warmup, device, args.rank), "peer", device)
        print(f"[qlora-moe] {line(r)}", flush=True)
        results.append(r)
    print(f"\n| system | layers | tokens | tokens/s | step ms | peak GiB |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.system} | {config.num_hidden_layers} | {args.tokens} | "
              + (f"{r.tokens_per_s:,.0f} | {r.step_ms:,.0f} | {r.peak_gib:.2f} |" if r.status == "ok"
                 else f"{r.status[:60]} | | |"))
    return results


if __name__ == "__main__":
    main()
