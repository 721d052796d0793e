"""Training throughput of qwen35's fast path against transformers + fla + Liger, same GPU, same run.

    python benchmarks/bench_train.py --presets 0.8B 2B --seq-lens 8192 32768 --steps 10
    python benchmarks/bench_train.py --presets 0.8B --max-context          # longest trainable row
    python benchmarks/bench_train.py --smoke                               # CPU, tiny, reference ops
    python benchmarks/bench_train.py --parallel one sp2 cp2 --max-context  # 2 GPUs: sp/cp vs one
    python benchmarks/bench_train.py --presets 2B-vl --ours fp32m:none:compile  # vision-language row

`--parallel` runs each layout as a torchrun job of `benchmarks/parallel_runs.py` (see there):
tokens/s of every preset at `--seq-lens`, and with `--max-context` the longest trainable row of
`--max-context-preset`, with sp or cp against one GPU, in one table.

Ours runs as the trainer does: a packed row of several documents (`--docs`), the fast ops, and
one of these precisions (`--ours`, "precision:checkpointing[:compile|:cudagraphs]"; `cudagraphs`
compiles the layers with `mode="reduce-overhead"`, an experiment the trainer does not offer):

- `fp32m`  float32 master parameters and AdamW state, bf16 compute under torch.autocast (the
           trainer's default); A_log and the GDN norm weight are float32 either way.
- `bf16`   bf16 parameters, gradients and AdamW state (A_log and the GDN norm weight stay float32).
- `lora`   frozen bf16 base, rank-16 float32 adapters on the trainer's default targets, bf16
           autocast; `qlora` the same over a 4-bit NF4 base (bitsandbytes). MFU counts the full
           model's FLOPs (the frozen weights still run forward and backward through activations).
- `offload` bf16 weights and gradients on the GPU, float32 masters and AdamW state in CPU memory
           (`qwen35.train.offload.OffloadedAdamW`, the trainer's `optim.cpu_offload`);
           `offload-inbwd` the same with the CPU update run during the backward
           (`optim.cpu_offload` with `optim.in_backward`).
- `fp32m-adam8`  as fp32m with bitsandbytes' 8-bit AdamW (`optim.name adamw8bit`).
- `fp32m-inbwd`  as fp32m, each weight updated inside the backward as its gradient is complete
                 and the gradient freed (`optim.in_backward`, `AdamWInBackward`).
- `bf16-kahan`   bf16 weights and gradients, float32 moments, each update's rounding error kept in
                 a bf16 compensation buffer (`optim.weights bf16_kahan`); `bf16-kahan-adam8` with
                 8-bit moments; `bf16-adam8` bf16 weights rounded each step, 8-bit moments. These
                 build the trainer's optimizer (`qwen35.train.optim.build_optimizer`, weight decay
                 0.1 on matrices only).

checkpointing: `none`, `selective` (keep matmul and attention outputs, recompute the rest) or
`full` (one layer input kept, the layer rerun in backward); see `qwen35.parallel.checkpointing`.

The peer runs as DESIGN §7 measured it: transformers' `Qwen3_5ForCausalLM`, bf16 weights, sdpa,
fla's GDN kernel (picked up by transformers when importable), Liger's kernels
(`apply_liger_kernel_to_qwen3_5`: RMSNorm, SwiGLU, fused linear cross-entropy), AdamW, one row
holding the same tokens as one sequence (transformers' GDN path cannot keep packed documents
apart), optionally with gradient checkpointing (`--peer-ac`).

A vision-language preset (`2B-vl`: the 2B language model and the 27-block, 1152-wide Qwen3.5
vision tower) gets image-text rows instead (`benchmarks/vl_rows.py`): documents of one image
(~`--vl-image-px`, 448: 196 image tokens) and ~`--vl-text-tokens` (300) text tokens each, as many
as fill `--seq-lens` exactly (16 at 8k). Ours packs them into one row, the vision tower running
once over all its images (attention within each image); the peer is transformers'
`Qwen3_5ForConditionalGeneration` (fla, with and without Liger) on the same documents and images as
a right-padded batch of one document per row (TRL does not pack vision-language data); its
`docs` column is that batch size. tokens/s counts every document token, text and image, for
both; MFU adds the vision tower's FLOPs (`qwen35.train.flops.vision_flops`).

Every ratio divides by the fastest peer variant measured in the same command for the same
preset and length (`--peer-variants`, default both: with and without Liger); the table says
which. `--delta-rule-kernel flash_qla` runs our delta rule through FlashQLA; it also turns on
fla's own dispatch to FlashQLA, so the peer gets the same kernel (`qwen35.ops` docstring).

For each of our configurations one more step runs under the torch profiler and its time is split
into GDN (delta rule, conv, gated norm kernels), attention, matmuls, loss (the cross-entropy
kernel; its matmuls count as matmuls), optimizer and other GPU kernels; the timed step's time
beyond those kernels is GPU idle (the host not keeping up). The profiled step itself runs slower
(the profiler's own overhead), so the table divides kernel times by the timed step; the printed
profiled wall time is not the step time. `--no-breakdown` skips it.

MFU is model FLOPs (recomputation not counted, `qwen35.train.flops.step_flops`, the same count
the trainer logs) per second against 989 TFLOP/s (H100 bf16 dense).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Both systems: rows of hundreds of thousands of tokens fragment the caching allocator's fixed
# segments by several GiB otherwise. Read when CUDA initialises, so set before torch is imported.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # parallel_runs

from benchmarks.peer import transformers_model  # noqa: E402
from benchmarks.vl_rows import VLWorkload  # noqa: E402
from qwen35 import Qwen35Config, Qwen35ForCausalLM, Qwen35ForConditionalGeneration, ops, preset  # noqa: E402
from qwen35.model.config import Qwen35VLConfig, VisionConfig  # noqa: E402
from qwen35.lora import LoraSettings, apply_lora, quantize_linear_layers  # noqa: E402
from qwen35.parallel.checkpointing import apply_activation_checkpointing  # noqa: E402
from qwen35.parallel.compile import compile_layers  # noqa: E402
from qwen35.train.config import LoraConfig  # noqa: E402
from qwen35.train.flops import PEAK_BF16_FLOPS, attention_flops, step_flops  # noqa: E402
from qwen35.train.optim import build_optimizer  # noqa: E402

# --ours precisions that the trainer's optimizer options build: name -> build_optimizer's options
OPTIM_PRECISIONS = {"fp32m-adam8": dict(name="adamw8bit"), "fp32m-inbwd": dict(in_backward=True),
                    "offload": dict(cpu_offload=True), "offload-inbwd": dict(cpu_offload=True, in_backward=True),
                    "bf16-kahan": dict(weights="bf16_kahan"), "bf16-kahan-adam8": dict(name="adamw8bit", weights="bf16_kahan"),
                    "bf16-adam8": dict(name="adamw8bit", weights="bf16")}



# --- workload -------------------------------------------------------------------------------


def document_lengths(total: int, docs: int) -> list[int]:
    """`docs` documents filling `total` tokens, uneven and (mostly) not multiples of 64."""
    if docs <= 1:
        return [total]
    weights = [1.0 + 0.6 * math.sin(1.7 * i + 0.4) for i in range(docs)]
    lengths = [max(1, int(total * w / sum(weights))) | 1 for w in weights[:-1]]
    return lengths + [total - sum(lengths)]


def packed_batch(vocab: int, lengths: list[int], device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (1, sum(lengths)), device=device, generator=gen)
    cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    return {"input_ids": ids, "labels": ids, "cu_seqlens": cu if len(lengths) > 1 else None}


# --- results --------------------------------------------------------------------------------


@dataclass
class Result:
    system: str  # "ours" or "peer"
    variant: str  # precision / checkpointing / liger
    preset: str
    seq_len: int
    docs: int
    status: str = "ok"  # "ok", "OOM", or an error
    step_ms: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    peak_gib: float = 0.0
    gdn_ms: float | None = None  # the GDN op alone, all GDN layers of one step (fwd + bwd)
    breakdown: dict[str, float] | None = None  # ms per category of one profiled step (`_profile`)
    steps: int = 0
    notes: list[str] = field(default_factory=list)


def _cleanup():
    torch._dynamo.reset()  # each configuration compiles afresh (no recompile limit carried over)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed_steps(step, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / max(steps, 1)


PROFILE = False  # --profile: also the peer's step, and the top kernels of every step
BREAKDOWN = True  # --no-breakdown: no profiled step for ours

_FAMILIES = {  # substring of a kernel name -> family (first match wins)
    # GDN: fla's delta-rule kernels, FlashQLA's TileLang ones, the conv and the gated norm
    "tilelang": "GDN", "gdr": "GDN", "kkt": "GDN", "chunk": "GDN", "wy": "GDN", "solve_tril": "GDN",
    "recompute_w_u": "GDN", "l2norm": "GDN", "gdn": "GDN", "merge_16x16": "GDN", "causal_conv1d": "GDN",
    "layer_norm_gated": "GDN",
    "flash": "attention", "fmha": "attention", "attn": "attention",
    "cross_entropy": "loss",
    "gemm": "matmuls", "nvjet": "matmuls", "cutlass": "matmuls", "sm90_xmma": "matmuls", "cublas": "matmuls",
    "adam": "optimizer", "multi_tensor": "optimizer",
}
CATEGORIES = ("GDN", "attention", "matmuls", "loss", "optimizer", "other")


def gpu_kernels(events) -> list:
    """The profiler's GPU kernels, without the GPU-side ranges of `record_function` annotations
    (the optimizer's `Optimizer.step#AdamW.step` among them): a range spans kernels that are
    also listed on their own, so counting it would count them twice."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)]


def kernel_split(kernels) -> tuple[dict[str, float], list]:
    """GPU ms per family of `CATEGORIES` (`_FAMILIES` by kernel name), and the "other" kernels."""
    split = dict.fromkeys(CATEGORIES, 0.0)
    others = []
    for e in kernels:
        family = next((f for key, f in _FAMILIES.items() if key in e.key.lower()), "other")
        split[family] += e.self_device_time_total / 1e3
        if family == "other":
            others.append(e)
    return split, others


def _profile(step, label: str, device, top: int = 6) -> dict[str, float]:
    """One profiled step: its wall time split into GPU time per kernel family (`_FAMILIES`) and
    the time the GPU idled (wall minus busy: the host not keeping up). Prints it and the longest
    kernels of "other"; returns {category: ms} with "idle" and "wall"."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        _sync(device)
        wall = (time.perf_counter() - start) * 1e3
    kernels = gpu_kernels(prof.key_averages())
    split, others = kernel_split(kernels)
    split["idle"] = max(0.0, wall - sum(split.values()))
    split["wall"] = wall
    parts = ", ".join(f"{k} {split[k]:.0f} ({100 * split[k] / wall:.0f}%)" for k in (*CATEGORIES, "idle"))
    print(f"[breakdown] {label}: profiled step {wall:.0f} ms: {parts}", flush=True)
    shown = sorted(kernels if PROFILE else others, key=lambda e: -e.self_device_time_total)[:top * (2 if PROFILE else 1)]
    for e in shown:
        print(f"[breakdown]   {e.self_device_time_total / 1e3:7.1f} ms  x{e.count:<4} {e.key[:90]}", flush=True)
    return split


MEMORY_PROFILE = False  # --memory-profile: what is alive at the peak of one step, by where it was allocated


def _memory_profile(step, label: str) -> None:
    """Runs `step` recording the allocator's history; prints the tensors alive at the step's
    peak, summed by the innermost frame of qwen35, fla, Liger or transformers that allocated them."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][0]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live, current, peak, peak_at = {}, 0, 0, -1
    for i, event in enumerate(trace):  # first pass: when is the peak?
        if event["action"] == "alloc":
            current += event["size"]
        elif event["action"] == "free_completed":
            current -= event["size"]
        if current > peak:
            peak, peak_at = current, i
    for event in trace[: peak_at + 1]:  # second pass: what is alive then
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    groups: dict[str, list] = {}
    for event in live.values():
        frames = [f for f in event.get("frames", []) if any(key in f["filename"] for key in (
            "qwen35", "/fla/", "liger_kernel", "transformers/models"))]
        where = "(no frame of ours: autograd engine, optimizer, or before the trace)"
        if frames:
            f = frames[0]
            where = f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}"
        group = groups.setdefault(where, [0, 0])
        group[0] += event["size"]
        group[1] += 1
    print(f"[memory] {label}: {peak / 2**30:.1f} GiB allocated during the step at its peak "
          f"(event {peak_at} of {len(trace)}), on top of what existed before it", flush=True)
    for where, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"[memory]   {size / 2**30:7.2f} GiB  x{count:<5} {where}", flush=True)


def _with_optimizer_state(optimizer, params) -> None:
    """One step on zero gradients, so the optimizer state exists before the first measured step
    (a one-step trial, as the longest-context search runs, would otherwise peak without it).
    A parameter at a time: the gradients of all of them at once would raise the peak of an
    optimizer that never holds them all (`fp32m-inbwd`)."""
    for p in params:
        p.grad = torch.zeros_like(p)
        optimizer.step()
        p.grad = None


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0


def _guarded(result: Result, run) -> Result:
    try:
        run(result)
    except torch.OutOfMemoryError as e:
        result.status = "OOM"
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(f"[OOM] {result.system} {result.variant} {result.seq_len}: peak {_peak_gib(device):.1f} GiB "
              f"before it; {str(e).splitlines()[0][:200]}", flush=True)
    except Exception as e:  # a failing configuration must not end the table
        result.status = f"error: {type(e).__name__}: {str(e)[:200]}"
    finally:
        _cleanup()
    return result


# --- ours -----------------------------------------------------------------------------------


def run_ours(config, name, variant, lengths, steps, warmup, device, media: VLWorkload | None = None) -> Result:
    """With `media` (a vision-language preset): its packed image-text row instead of `lengths`."""
    precision, ac, *rest = variant.split(":")
    lengths = media.lengths if media is not None else lengths
    result = Result("ours", variant, name, sum(lengths), len(lengths), steps=steps)

    def run(result):
        dtype = torch.float32 if precision.startswith("fp32m") else torch.bfloat16
        model_class = Qwen35ForConditionalGeneration if media is not None else Qwen35ForCausalLM
        model = model_class.from_config(config, device=device, dtype=dtype)
        if precision == "qlora":
            quantize_linear_layers(model, torch.bfloat16)
        if precision in ("lora", "qlora"):
            apply_lora(model, LoraSettings(rank=16, alpha=32, target_modules=LoraConfig().target_modules))
        apply_activation_checkpointing(model, ac)
        _reset_peak(device)  # construction (random init in float32) is not training
        if "compile" in rest:
            compile_layers(model)
        elif "cudagraphs" in rest:  # inductor's CUDA graph trees over each compiled piece
            compile_layers(model, mode="reduce-overhead")
        fused = device.type == "cuda"
        trained = [p for p in model.parameters() if p.requires_grad]
        if precision in OPTIM_PRECISIONS:
            optimizer = build_optimizer(model, 1e-5, 0.1, (0.9, 0.95), 1e-8, **OPTIM_PRECISIONS[precision])
        else:
            optimizer = torch.optim.AdamW(trained, lr=1e-5, weight_decay=0.1, fused=fused or None)
        _with_optimizer_state(optimizer, trained)
        batch = media.packed(device) if media is not None else packed_batch(config.vocab_size, lengths, device)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if not precision.startswith("bf16")
                    else contextlib.nullcontext())

        def step():
            if "cudagraphs" in rest:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast:
                out = model(**batch)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if MEMORY_PROFILE and device.type == "cuda":
            _memory_profile(step, f"ours {variant} {name} {sum(lengths)}x{len(lengths)} docs")
        seconds = _timed_steps(step, steps, warmup, device)
        _fill(result, seconds, media.flops() if media is not None else step_flops(config, lengths), device)
        if media is None and max(lengths) >= LONG_CONTEXT:
            print(attention_floor(config, lengths, ac, seconds), flush=True)
        if (BREAKDOWN or PROFILE) and device.type == "cuda":
            result.breakdown = _profile(step, f"ours {variant} {name} {sum(lengths)}x{len(lengths)} docs", device)

    return _guarded(result, run)


LONG_CONTEXT = 131072  # rows with a document this long also print the attention floor


def attention_floor(config, lengths, ac: str, seconds: float) -> str:
    """The time the causal attention alone needs at the bf16 peak, beside the measured step."""
    recompute = ac in ("full", "offload")
    flops = attention_flops(config, lengths, recompute=recompute)
    return (f"[floor] {sum(lengths):,} tokens in {len(lengths)} document(s), {ac} checkpointing: the causal "
            f"attention alone is {flops:.3g} FLOP (forward, backward{', recompute' if recompute else ''}), "
            f"{flops / PEAK_BF16_FLOPS:.0f} s at the {PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 peak; measured step "
            f"{seconds:.0f} s ({flops / seconds / 1e12:.0f} TFLOP/s of attention alone)")


def _fill(result: Result, seconds: float, flops: float, device) -> None:
    result.step_ms = seconds * 1e3
    result.tokens_per_s = result.seq_len / seconds
    result.mfu = flops / seconds / PEAK_BF16_FLOPS
    result.peak_gib = _peak_gib(device)


# --- the peer: transformers + fla + Liger ---------------------------------------------------


def build_peer(config: Qwen35Config, device, liger: bool):
    """transformers' Qwen3_5ForCausalLM, or Qwen3_5ForConditionalGeneration for a VL config."""
    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig

    if isinstance(config, Qwen35VLConfig):
        model_class, hf_config = Qwen3_5ForConditionalGeneration, Qwen3_5Config(**config.to_hf_dict())
    else:
        model_class, hf_config = Qwen3_5ForCausalLM, Qwen3_5TextConfig(**config.to_hf_dict())
    model = transformers_model(model_class, hf_config, device, torch.bfloat16)
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_5

        apply_liger_kernel_to_qwen3_5(model=model)
    return model.train()


def run_peer(config, name, variant, length, steps, warmup, device, media: VLWorkload | None = None) -> Result:
    """variant: "liger:none", "liger:full", "fla:none" (no Liger) ...; with `media`, its documents
    as a padded batch of one document per row (`docs` is then the batch size)."""
    kernels, ac = variant.split(":")
    result = Result("peer", variant, name, length, 1 if media is None else len(media.docs), steps=steps)

    def run(result):
        model = build_peer(config, device, liger=kernels == "liger")
        _reset_peak(device)
        if ac != "none":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
        _with_optimizer_state(optimizer, list(model.parameters()))
        if media is None:
            ids = packed_batch(config.vocab_size, [length], device)["input_ids"]
            batch = {"input_ids": ids, "labels": ids}
        else:
            batch = media.padded(device)

        def step():
            out = model(**batch, use_cache=False)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = _timed_steps(step, steps, warmup, device)
        _fill(result, seconds, media.flops() if media is not None else step_flops(config, [length]), device)
        if PROFILE and device.type == "cuda":
            result.breakdown = _profile(step, f"peer {variant} {name} {length}", device)

    return _guarded(result, run)


# --- kernels alone --------------------------------------------------------------------------


def gdn_step_ms(config: Qwen35Config, lengths: list[int], device, repeats: int = 5) -> float:
    """The fast GDN op alone, forward + backward, times the GDN layers of one step."""
    tokens = sum(lengths)
    hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    kw = dict(device=device, dtype=torch.bfloat16, requires_grad=True)
    q, k = torch.randn(1, tokens, hk, dk, **kw), torch.randn(1, tokens, hk, dk, **kw)
    v = torch.randn(1, tokens, hv, dv, **kw)
    beta = torch.rand(1, tokens, hv, **kw)
    g = (-torch.rand(1, tokens, hv, device=device)).requires_grad_()
    cu = packed_batch(8, lengths, device)["cu_seqlens"]
    do = torch.randn(1, tokens, hv, dv, device=device, dtype=torch.bfloat16)

    def once():
        o, _ = ops.gated_delta_rule(q, k, v, g, beta, cu)
        torch.autograd.grad(o, (q, k, v, g, beta), do)

    seconds = _timed_steps(once, repeats, 2, device)
    return seconds * 1e3 * config.layer_types.count("linear_attention")


def cross_entropy_bench(config: Qwen35Config, tokens: int, device, repeats: int = 5) -> list[dict]:
    """Ours (fused, Liger's CE kernel, our chunking) vs Liger's fused linear CE vs the chunked torch
    reference: fp32 hidden and weight under bf16 autocast, as in the trainer; fwd + bwd."""
    from qwen35.ops import cross_entropy, fast

    rows = []
    candidates = {"ours fused (2048-token chunks)": fast.linear_cross_entropy,
                  "torch chunked + checkpoint (reference)": cross_entropy.linear_cross_entropy}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        candidates["Liger fused linear CE"] = lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, reduction="sum")
    except ImportError:
        pass
    for label, fn in candidates.items():
        _cleanup()
        hidden = torch.randn(tokens, config.hidden_size, device=device, requires_grad=True)
        weight = (torch.randn(config.vocab_size, config.hidden_size, device=device) * 0.02).requires_grad_()
        targets = torch.randint(0, config.vocab_size, (tokens,), device=device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

        def once():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fn(hidden, weight, targets)
            loss.backward()
            hidden.grad = weight.grad = None

        try:
            ms = _timed_steps(once, repeats, 1, device) * 1e3
            rows.append({"loss": label, "ms": ms, "extra_peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30})
        except torch.OutOfMemoryError:
            rows.append({"loss": label, "ms": float("nan"), "extra_peak_gib": float("nan"), "status": "OOM"})
        del hidden, weight, targets
    _cleanup()
    return rows


def dump_fla_configs(directory: Path) -> int:
    """Writes the configs fla's autotuner chose in this process as fla config files
    (`{kernel}.json`, the format `FLA_CONFIG_DIR` + `FLA_CACHE_MODE=fuzzy` read). A later process
    on the same GPU model then skips autotuning, which costs minutes on a fresh machine. Launch
    configs only: the numbers are the same whichever config runs."""
    from fla.ops.utils.cache import AutotuneKey, CachedAutotuner

    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    for tuner in [o for o in gc.get_objects() if type(o) is CachedAutotuner]:
        if not tuner.cache:
            continue
        path = directory / f"{tuner.kernel_name}.json"
        data = json.loads(path.read_text()) if path.exists() else {
            "kernel_name": tuner.kernel_name, "triton_version": None, "autotune_entries": {}}
        for key, cfg in tuner.cache.items():
            data["autotune_entries"][AutotuneKey.key_hash(key)] = {
                "autotune_key": AutotuneKey.normalize_autotune_key(list(key)),
                "config": {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                           "num_ctas": getattr(cfg, "num_ctas", 1), "maxnreg": getattr(cfg, "maxnreg", None)},
            }
        path.write_text(json.dumps(data, indent=1, default=str))
        written += 1
    return written


# --- longest context ------------------------------------------------------------------------


def max_context(config, name, lengths_to_try, device, ours_variant, peer_variant, run_peer_too) -> list[Result]:
    """Tries one document of each length (ascending) until the first OOM, for ours and the peer.
    One step per length, no warm-up: the timing is indicative only."""
    results = []
    systems = ([("ours", ours_variant)] if ours_variant != "none" else []) + ([("peer", peer_variant)] if run_peer_too else [])
    for system, variant in systems:
        for length in lengths_to_try:
            if system == "ours":
                r = run_ours(config, name, variant, [length], 1, 0, device)
            else:
                r = run_peer(config, name, variant, length, 1, 0, device)
            r.notes.append("max-context trial")
            results.append(r)
            print_row(r, flush=True)
            if r.status != "ok":
                break
    return results


# --- table ----------------------------------------------------------------------------------

HEADER = ("| system | variant | preset | seq | docs | tokens/s | step ms | MFU | peak GiB | GDN ms (share) "
          "| vs fastest peer |\n|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: Result, peer: Result | None = None) -> str:
    if r.status != "ok":
        return f"| {r.system} | {r.variant} | {r.preset} | {r.seq_len} | {r.docs} | {r.status} | | | | | |"
    gdn = "" if r.gdn_ms is None else f"{r.gdn_ms:.0f} ({100 * r.gdn_ms / r.step_ms:.0f}%)"
    ratio = ""
    if peer is not None and r is not peer:
        ratio = f"{r.tokens_per_s / peer.tokens_per_s:.2f}x {peer.variant}"
    elif peer is not None:
        ratio = "(fastest peer)"
    return (f"| {r.system} | {r.variant} | {r.preset} | {r.seq_len} | {r.docs} | {r.tokens_per_s:,.0f} | "
            f"{r.step_ms:.0f} | {100 * r.mfu:.1f}% | {r.peak_gib:.1f} | {gdn} | {ratio} |")


def print_row(r: Result, flush=True) -> None:
    print(format_row(r), flush=flush)


def fastest_peers(results: list[Result]) -> dict[tuple[str, int], Result]:
    """Per (preset, length): the peer variant with the most tokens/s in this run (max-context
    trials, one untimed-warm-up step each, excluded)."""
    fastest: dict[tuple[str, int], Result] = {}
    for r in results:
        if r.system != "peer" or r.status != "ok" or r.notes:
            continue
        best = fastest.get((r.preset, r.seq_len))
        if best is None or r.tokens_per_s > best.tokens_per_s:
            fastest[(r.preset, r.seq_len)] = r
    return fastest


def final_table(results: list[Result]) -> str:
    peers = fastest_peers(results)
    lines = [HEADER] + [format_row(r, None if r.notes else peers.get((r.preset, r.seq_len))) for r in results]
    for (preset, length), peer in peers.items():
        lines.append(f"\nfastest peer, {preset} at {length} tokens: {peer.variant} "
                     f"({peer.tokens_per_s:,.0f} tokens/s, {peer.peak_gib:.1f} GiB peak)")
    for r in results:
        if r.breakdown:  # GPU time per family over the timed step; the rest of the step: GPU idle
            shares = {k: r.breakdown[k] for k in CATEGORIES}
            shares["GPU idle"] = max(0.0, r.step_ms - sum(shares.values()))
            parts = " | ".join(f"{v:.0f} ({100 * v / r.step_ms:.0f}%)" for v in shares.values())
            if not any(line.startswith("| breakdown") for line in lines):
                lines.append("\n| breakdown, ms (share of the timed step) | step ms | " + " | ".join(shares)
                             + " |\n|---|---|" + "---|" * len(shares))
            lines.append(f"| breakdown {r.system} {r.variant} {r.preset} {r.seq_len} | {r.step_ms:.0f} | {parts} |")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def smoke_config(name: str) -> Qwen35Config:
    config = preset(name, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_key_head_dim=16, linear_value_head_dim=16, vocab_size=1000, eos_token_id=1)
    if isinstance(config, Qwen35VLConfig):  # a 2-block tower; the media ids inside the small vocabulary
        vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                              num_position_embeddings=64)
        config = dataclasses.replace(config, vision=vision, vision_start_token_id=996, vision_end_token_id=997,
                                     image_token_id=998, video_token_id=999)
    return config


def vl_rows(config: Qwen35VLConfig, name: str, args, record, device) -> None:
    """A vision-language preset's rows: ours on the packed image-text row of each `--seq-lens`,
    then every peer variant on the same documents as a padded batch; `record` keeps each row."""
    image_px = args.vl_image_px or (64 if args.smoke else 448)
    text_tokens = args.vl_text_tokens or (24 if args.smoke else 300)
    for seq_len in args.seq_lens:
        try:
            media = VLWorkload(config, seq_len, image_px, text_tokens)
        except Exception as e:  # a row that cannot be built is an error row, not the end of the table
            record(Result("ours", "-", name, seq_len, 0, status=f"error: {type(e).__name__}: {e}"))
            continue
        docs = len(media.docs)
        print(f"[vl] {name}, {seq_len} tokens: {docs} documents of one image each ({media.image_tokens} image "
              f"tokens from {media.pixel_values.shape[0]} patches, {seq_len - media.image_tokens - 2 * docs} "
              f"text tokens); the peer's padded batch: {docs} x {max(media.lengths)}", flush=True)
        for variant in args.ours:
            record(run_ours(config, name, variant, None, args.steps, args.warmup, device, media))
        for variant in args.peer_variants if args.peer else []:
            record(run_peer(config, name, variant, seq_len, args.steps, args.warmup, device, media))


def _layout(text: str) -> str:
    import parallel_runs

    parallel_runs.parse_layout(text)  # raises argparse's error for a bad one
    return text


def main(argv=None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["0.8B", "2B"])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[8192])
    p.add_argument("--docs", nargs="+", type=int, default=[4], help="documents per packed row (ours)")
    p.add_argument("--vl-image-px", type=int, help="vision-language presets: image side the documents vary "
                   "around (default 448; --smoke 64)")
    p.add_argument("--vl-text-tokens", type=int, help="vision-language presets: text tokens per document "
                   "(default 300; --smoke 24)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ours", nargs="*", default=["fp32m:none", "fp32m:selective", "fp32m:full", "bf16:none"])
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--peer-variants", nargs="+", default=["fla:none", "liger:none"],
                   help="ratios divide by the fastest of these, per preset and length")
    p.add_argument("--delta-rule-kernel", choices=ops.DELTA_RULE_KERNELS, default="fla",
                   help="ours and (through fla's dispatch) the peer's delta-rule kernel")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="profile one more step of ours and split its time by kernel family")
    p.add_argument("--gdn", action=argparse.BooleanOptionalAction, default=True, help="time the GDN op alone")
    p.add_argument("--ce-bench", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--max-context", action="store_true", help="longest single-document row (0.8B)")
    p.add_argument("--max-context-lens", nargs="+", type=int,
                   default=[131072, 262144, 393216, 524288, 655360, 786432, 1048576])
    p.add_argument("--max-context-ours", default="fp32m:offload", help='"none": the peer only')
    p.add_argument("--max-context-peer", default="liger:full")
    p.add_argument("--only-max-context", action="store_true")
    p.add_argument("--profile", action="store_true", help="also profile the peer; list the top kernels")
    p.add_argument("--memory-profile", action="store_true",
                   help="ours: first run one step recording the allocator, print what is alive at its peak")
    p.add_argument("--dump-fla-configs", type=Path, help="write fla's autotuned configs here after each run")
    p.add_argument("--fla-configs", type=Path,
                   help="skip fla's autotuning: use the configs in this directory (e.g. "
                        "benchmarks/fla_configs/NVIDIA_H100_80GB_HBM3, written by --dump-fla-configs)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, reference ops, no Liger")
    p.add_argument("--parallel", nargs="+", type=_layout,
                   help="layouts (one, sp<N>, cp<N>): each a torchrun job of parallel_runs.py, nothing else runs")
    p.add_argument("--parallel-ac", default="full", help="--parallel: checkpointing of the throughput rows")
    p.add_argument("--parallel-dir", default="bench_parallel", help="--parallel: where each job writes its rows")
    p.add_argument("--parallel-timeout", type=int, default=1800, help="--parallel: seconds per layout job")
    p.add_argument("--max-context-preset", default="0.8B", help="--parallel: the preset of the longest-row search")
    args = p.parse_args(argv)

    global PROFILE, MEMORY_PROFILE, BREAKDOWN
    PROFILE, MEMORY_PROFILE, BREAKDOWN = args.profile, args.memory_profile, args.breakdown
    if args.fla_configs is not None:  # read by fla at import, so before the fast ops load
        os.environ.setdefault("FLA_CACHE_MODE", "fuzzy")
        os.environ["FLA_CONFIG_DIR"] = str(args.fla_configs.resolve())
    if args.parallel:  # each layout's job inherits the fla settings above
        import parallel_runs

        return parallel_runs.run_layouts(args)
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        ops.use_backend("reference")
        args.peer_variants = list(dict.fromkeys(v.replace("liger", "fla") for v in args.peer_variants))
        args.max_context_peer = args.max_context_peer.replace("liger", "fla")
    else:
        ops.use_backend("fast", delta_rule_kernel=args.delta_rule_kernel)
        from qwen35.envcheck import describe, probe

        print("environment:", describe(probe(flash_qla=args.delta_rule_kernel == "flash_qla")))
        print(f"delta rule: ours {ops.current_delta_rule_kernel()}, the peer's fla dispatch "
              f"FLA_FLASH_QLA={os.environ.get('FLA_FLASH_QLA')}")
    print("command:", " ".join(sys.argv), flush=True)
    print(HEADER, flush=True)
    results: list[Result] = []
    ce_rows = []

    def record(r: Result) -> None:
        results.append(r)
        print_row(r)
        if args.dump_fla_configs is not None and not args.smoke:
            try:
                print(f"[fla configs] {dump_fla_configs(args.dump_fla_configs)} kernels written", flush=True)
            except Exception as e:
                print(f"[fla configs] not written: {type(e).__name__}: {e}", flush=True)
    for name in args.presets:
        config = smoke_config(name) if args.smoke else preset(name)
        if args.only_max_context:
            break
        if isinstance(config, Qwen35VLConfig):
            vl_rows(config, name, args, record, device)
            continue
        for seq_len in args.seq_lens:
            for docs in args.docs:
                lengths = document_lengths(seq_len, docs)
                gdn = None
                if args.gdn and not args.smoke:
                    with contextlib.suppress(torch.OutOfMemoryError):
                        gdn = gdn_step_ms(config, lengths, device)
                    _cleanup()
                for variant in args.ours:
                    r = run_ours(config, name, variant, lengths, args.steps, args.warmup, device)
                    r.gdn_ms = gdn if r.status == "ok" else None
                    record(r)
            if args.peer:
                for variant in args.peer_variants:
                    r = run_peer(config, name, variant, seq_len, args.steps, args.warmup, device)
                    record(r)
            if args.ce_bench and not args.smoke:
                ce_rows.append({"preset": name, "tokens": seq_len, "rows": cross_entropy_bench(config, seq_len, device)})
                print(json.dumps(ce_rows[-1]), flush=True)
    if args.max_context:
        name = "0.8B"
        config = smoke_config(name) if args.smoke else preset(name)
        results += max_context(config, name, args.max_context_lens, device, args.max_context_ours,
                               args.max_context_peer, args.peer)

    print("\n" + final_table(results), flush=True)
    for block in ce_rows:
        print(f"\ncross-entropy fwd+bwd, {block['preset']} ({block['tokens']} tokens):")
        for row in block["rows"]:
            print(f"  {row['loss']:<42} {row['ms']:8.1f} ms   +{row['extra_peak_gib']:.2f} GiB peak")
    if args.json:
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results], "cross_entropy": ce_rows}, indent=1))
    return results


if __name__ == "__main__":
    main()
