"""Rollout throughput: qwen35's decode engine against transformers' `generate`, same GPU, same run.

    python benchmarks/bench_generate.py                                  # 0.8B and 2B, batch 64 and 256
    python benchmarks/bench_generate.py --device cpu --preset tiny       # smoke: CPU, tiny, a few tokens

Both sides get the same random-weight model (`--presets`), bf16 weights, the same prompts
(`--prompt-len` random tokens each, `--batches` of them) and sample at temperature 1 with no
top-k/top-p and no stop token, so every sequence generates exactly its new tokens. tokens/s counts
generated tokens over the wall time of the whole call, prefill included; "prefill" is the time of
the same call with one new token, and the decode rate counts the tokens after the first over the
time beyond it. Each side first runs the same prompts once (kernel autotuning, untimed). Peak
memory is the CUDA allocator's peak, the weights included.

- ours: `qwen35.engine.DecodeEngine` with one slot per sequence, the fast ops (fla's chunked GDN
  for the prefill, its fused recurrent kernel for decode steps, varlen flash attention), decode
  steps as CUDA graphs. Building the engine (allocating its state, capturing the graphs) is timed
  apart and not in tokens/s, since a trainer builds it once per rollout.
- peer: transformers' `Qwen3_5ForCausalLM.generate` (sdpa; its GDN layers run fla's kernels when
  fla imports, as here), left as it comes: a dynamic cache grown step by step, eager Python.
  It runs `--peer-new-tokens` new tokens (fewer than ours by default, to fit the time budget;
  its cache then stays shorter, which only helps it), and its tokens/s is over those.

`--grpo-step` (default on a GPU) then times one GRPO step on the first preset: rollout
(`qwen35.rl.rollout.sample_rollout`: `--grpo-prompts` prompts x `--grpo-samples` samples), π_old
log-probs (a no-grad training forward) and the update (forward, backward, AdamW step over all
samples in micro-batches of `--grpo-micro-tokens` tokens). Rewards are random: the timing does
not depend on them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peer import transformers_model  # noqa: E402
from qwen35 import Qwen35ForCausalLM, ops, preset  # noqa: E402
from qwen35.engine import DecodeEngine  # noqa: E402


@dataclass
class Result:
    system: str  # "ours" or "peer"
    preset: str
    batch: int
    prompt_len: int
    new_tokens: int
    status: str = "ok"
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    peak_gib: float = 0.0
    setup_s: float = 0.0  # ours: building the engine (state, graph capture)
    prefill_s: float = 0.0  # a call with one new token: the prefill and one sampling step
    decode_tokens_per_s: float = 0.0  # the tokens after the first over the time after the prefill


def _fill_rates(result: Result) -> None:
    result.tokens_per_s = result.batch * result.new_tokens / result.seconds
    decode_s = max(result.seconds - result.prefill_s, 1e-9)
    result.decode_tokens_per_s = result.batch * (result.new_tokens - 1) / decode_s


def smoke_config(name: str):
    if name == "tiny":
        return preset("tiny", vocab_size=512, eos_token_id=1)
    return preset(name)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0


def random_prompts(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_ours(model, name, prompts: torch.Tensor, new_tokens: int, device) -> Result:
    batch, length = prompts.shape
    result = Result("ours", name, batch, length, new_tokens)
    try:
        _reset(device)
        start = time.perf_counter()
        engine = DecodeEngine(model, num_slots=batch, max_length=length + new_tokens)
        _sync(device)
        result.setup_s = time.perf_counter() - start
        rows = prompts.tolist()
        engine.generate(rows, 2, temperature=1.0)  # the same prefill shapes first: kernel autotuning
        _sync(device)
        start = time.perf_counter()
        engine.generate(rows, 1, temperature=1.0)
        _sync(device)
        result.prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        tokens, _ = engine.generate(rows, new_tokens, temperature=1.0, generator=torch.Generator().manual_seed(0))
        _sync(device)
        result.seconds = time.perf_counter() - start
        assert all(len(t) == new_tokens for t in tokens), "every sequence generates all its tokens"
        _fill_rates(result)
        result.peak_gib = _peak_gib(device)
        del engine
    except torch.OutOfMemoryError:
        result.status = "OOM"
    except Exception as e:  # one failing case must not cost the others' numbers
        traceback.print_exc()
        result.status = f"error: {type(e).__name__}: {e}"[:200]
    return result


def build_peer(model, device, dtype):
    """transformers' model of the same config (built in `dtype` on the device, as transformers
    initialises it), with our random weights copied in."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    peer = transformers_model(Qwen3_5ForCausalLM, Qwen3_5TextConfig(**model.config.to_hf_dict()), device, dtype)
    missing, unexpected = peer.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return peer.eval()


def run_peer(peer, name, prompts: torch.Tensor, new_tokens: int, device) -> Result:
    batch, length = prompts.shape
    result = Result("peer", name, batch, length, new_tokens)
    ids = prompts.to(device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  eos_token_id=None, pad_token_id=0)
    try:
        _reset(device)
        with torch.no_grad():
            peer.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # kernel autotuning
            _sync(device)
            start = time.perf_counter()
            peer.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            _sync(device)
            result.prefill_s = time.perf_counter() - start
            start = time.perf_counter()
            out = peer.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            _sync(device)
        result.seconds = time.perf_counter() - start
        assert out.shape == (batch, length + new_tokens), out.shape
        _fill_rates(result)
        result.peak_gib = _peak_gib(device)
    except torch.OutOfMemoryError:
        result.status = "OOM"
    except Exception as e:
        traceback.print_exc()
        result.status = f"error: {type(e).__name__}: {e}"[:200]
    return result


def grpo_step_times(model, prompts: torch.Tensor, samples: int, response_len: int, micro_tokens: int,
                    device) -> dict[str, float]:
    """Seconds of one GRPO step's rollout, π_old log-probs and update (see the module docstring)."""
    from qwen35.rl.logprobs import completion_logprobs, pack_samples
    from qwen35.rl.loss import LossConfig, group_advantages, grpo_loss, token_weights
    from qwen35.rl.rollout import SamplingConfig, sample_rollout

    cfg = SamplingConfig(n_samples_per_prompt=samples, temperature=1.0, max_response_length=response_len,
                         batch_size=len(prompts) * samples)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    times = {}
    _reset(device)
    start = time.perf_counter()
    rollout = sample_rollout(model, prompts.tolist(), cfg, torch.Generator().manual_seed(0))
    _sync(device)
    times["rollout_s"] = time.perf_counter() - start
    n = len(rollout.completion_ids)
    per_micro = max(1, micro_tokens // (prompts.shape[1] + response_len))
    micros = [list(range(i, min(i + per_micro, n))) for i in range(0, n, per_micro)]

    def packed(micro):
        return pack_samples([rollout.prompt_ids[i] for i in micro], [rollout.completion_ids[i] for i in micro], device)

    start = time.perf_counter()
    with torch.no_grad():
        old = [completion_logprobs(model, packed(m), cfg.temperature)[0] for m in micros]
    _sync(device)
    times["logprob_s"] = time.perf_counter() - start

    rewards = torch.rand(n, generator=torch.Generator().manual_seed(1))
    advantages = group_advantages(rewards, samples)
    step_tokens = sum(len(c) for c in rollout.completion_ids)
    start = time.perf_counter()
    model.train()
    for m, old_logp in zip(micros, old):
        batch = packed(m)
        logp, _ = completion_logprobs(model, batch, cfg.temperature)
        weights = token_weights(batch.completion_lengths, "token_mean", step_tokens, n).to(device)
        adv = torch.cat([advantages[i].expand(len(rollout.completion_ids[i])) for i in m]).to(device)
        grpo_loss(logp, old_logp, adv, weights, LossConfig()).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    times["update_s"] = time.perf_counter() - start
    times["tokens"] = n * (prompts.shape[1] + response_len)
    times["peak_gib"] = _peak_gib(device)
    model.eval()
    return times


def format_row(r: Result, peer: Result | None = None) -> str:
    if r.status != "ok":
        return f"{r.system:5s} {r.preset:5s} batch {r.batch:4d}  {r.status}"
    ratio = f"  {r.tokens_per_s / peer.tokens_per_s:5.1f}x peer" if peer and peer.status == "ok" else ""
    setup = f"  (engine built in {r.setup_s:.1f} s)" if r.system == "ours" else ""
    decode_ratio = (f" (decode {r.decode_tokens_per_s / peer.decode_tokens_per_s:.1f}x)"
                    if peer and peer.status == "ok" else "")
    return (f"{r.system:5s} {r.preset:5s} batch {r.batch:4d}  prompt {r.prompt_len}  new {r.new_tokens:5d}  "
            f"{r.tokens_per_s:9,.0f} tok/s  {r.seconds:7.2f} s  (prefill {r.prefill_s:5.2f} s, decode "
            f"{r.decode_tokens_per_s:9,.0f} tok/s)  peak {r.peak_gib:6.1f} GiB{ratio}{decode_ratio}{setup}")


def main(argv=None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--presets", nargs="+", default=None, help="default: 0.8B 2B on a GPU, tiny on the CPU")
    p.add_argument("--preset", dest="presets", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default: 64 256 (GPU), 3 (CPU)")
    p.add_argument("--prompt-len", type=int, default=None, help="default: 1024 (GPU), 12 (CPU)")
    p.add_argument("--new-tokens", type=int, default=None, help="default: 1024 (GPU), 6 (CPU)")
    p.add_argument("--peer-new-tokens", type=int, default=None, help="default: 128 (GPU), as ours (CPU)")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--grpo-step", action=argparse.BooleanOptionalAction, default=None,
                   help="time one GRPO step on the first preset (default: on)")
    p.add_argument("--grpo-prompts", type=int, default=None, help="default: 16 (GPU), 2 (CPU)")
    p.add_argument("--grpo-samples", type=int, default=8)
    p.add_argument("--grpo-micro-tokens", type=int, default=16384)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    presets = args.presets or (["0.8B", "2B"] if gpu else ["tiny"])
    batches = args.batches or ([64, 256] if gpu else [3])
    prompt_len = args.prompt_len or (1024 if gpu else 12)
    new_tokens = args.new_tokens or (1024 if gpu else 6)
    peer_new = args.peer_new_tokens or (128 if gpu else new_tokens)
    grpo_prompts = args.grpo_prompts or (16 if gpu else 2)
    run_grpo = gpu if args.grpo_step is None else args.grpo_step
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu:
        ops.use_backend("fast")
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    results, grpo = [], None
    for name in presets:
        config = smoke_config(name)
        torch.manual_seed(0)
        model = Qwen35ForCausalLM.from_config(config, device=device, dtype=dtype).eval()
        peer = None if args.no_peer else build_peer(model, device, dtype)
        for batch in batches:
            prompts = random_prompts(config.vocab_size, batch, prompt_len)
            ours = run_ours(model, name, prompts, new_tokens, device)
            theirs = None if peer is None else run_peer(peer, name, prompts, peer_new, device)
            results += [r for r in (ours, theirs) if r is not None]
            print(format_row(ours, theirs), flush=True)
            if theirs is not None:
                print(format_row(theirs), flush=True)
        del peer
        if run_grpo and grpo is None:
            prompts = random_prompts(config.vocab_size, grpo_prompts, prompt_len, seed=1)
            try:
                grpo = grpo_step_times(model, prompts, args.grpo_samples, new_tokens, args.grpo_micro_tokens, device)
            except Exception as e:
                traceback.print_exc()
                grpo = {"error": f"{type(e).__name__}: {e}"[:200]}
                print(f"GRPO step failed: {grpo['error']}", flush=True)
                continue
            total = grpo["rollout_s"] + grpo["logprob_s"] + grpo["update_s"]
            print(f"GRPO step, {name}, {grpo_prompts} prompts x {args.grpo_samples} samples, prompt {prompt_len} + "
                  f"response {new_tokens}: rollout {grpo['rollout_s']:.2f} s, log-probs {grpo['logprob_s']:.2f} s, "
                  f"update {grpo['update_s']:.2f} s (total {total:.2f} s, peak {grpo['peak_gib']:.1f} GiB)", flush=True)
        del model
        _reset(device)
    if args.json:
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results], "grpo_step": grpo}, indent=1))
    return results


if __name__ == "__main__":
    main()
