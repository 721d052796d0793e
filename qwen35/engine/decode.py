"""The rollout engine: continuous batching over preallocated slots, decode steps as CUDA graphs.

    engine = DecodeEngine(model, num_slots=256, max_length=2048)
    tokens, logprobs = engine.generate(prompts, max_new_tokens=1024, temperature=1.0,
                                       stop_token_ids=[eos], generator=torch.Generator().manual_seed(0))

The loop, one iteration per generated token:

1. admit: while prompts wait and slots are free, the waiting prompts are prefilled into the free
   slots as packed rows (`cu_seqlens`, at most `prefill_tokens` tokens a row) by the model's own
   forward; each prompt's last logits land in its slot's row of the logits buffer;
2. sample one token for every slot from the logits buffer (greedy, or temperature / top-k / top-p)
   and its log-prob `log softmax(logits / temperature)`; a sequence ends at a stop token or at
   `max_new_tokens`;
3. decode: every slot feeds its token through one step of the model (`slots.DecodeView`), which
   writes the next logits buffer. On CUDA this step is a CUDA graph replayed with the same
   buffers: one launch instead of a few hundred kernels, so the GPU never waits for Python.
   The attention layers read only the first `bucket` cache positions: one graph per bucket
   (multiples of `attention_bucket` up to `max_length`), captured when the engine is built.
   Buckets of 128 keys: attention reads on average 64 unused positions per sequence (the
   attention kernels are ~20% of a step at 256 slots; their time grows with the bucket).

The host learns which slots have ended only at a sync point: every iteration while prompts wait
(a free slot is refilled at once), else every `check_every` iterations. Ended slots keep decoding
until then; their tokens are dropped. Everything else stays on the device until the end.

Exactness: the engine runs the model's own layers and kernels (`qwen35.ops`), so in float32 on
the CPU its greedy tokens are those of `qwen35.generate` and its log-probs those of the training
forward (tests/engine). The graphs replay the same kernels as the eager step.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Sequence

import torch
from torch.distributed.tensor import DTensor

from qwen35.engine.slots import DecodeView, PrefillView, SlotState
from qwen35.generate import sample_with_logprobs


class DecodeEngine:
    def __init__(self, model, num_slots: int, max_length: int, prefill_tokens: int = 32768,
                 attention_bucket: int = 128, cuda_graphs: bool | None = None, check_every: int = 16):
        """`max_length` bounds prompt + completion of every sequence. `cuda_graphs` defaults to
        on for a CUDA model whose parameters are plain tensors (not FSDP-sharded)."""
        if num_slots < 1 or max_length < 2 or prefill_tokens < 1 or attention_bucket < 1:
            raise ValueError("num_slots and prefill_tokens must be >= 1, max_length >= 2, attention_bucket >= 1")
        self.model = model
        param = next(model.parameters())
        self.device, dtype = param.device, model.model.embed_tokens.weight.dtype
        self.num_slots, self.max_length = num_slots, max_length
        self.prefill_tokens, self.check_every = prefill_tokens, check_every
        self.state = SlotState(model.config, num_slots, max_length, self.device, dtype)
        self.tokens = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(num_slots, model.config.vocab_size, dtype=torch.float32, device=self.device)
        self.buckets = sorted({min(b, max_length) for b in range(attention_bucket, max_length + attention_bucket,
                                                                  attention_bucket)})
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and not any(isinstance(p, DTensor) for p in model.parameters())
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if cuda_graphs:
            self._capture_graphs()

    # --- the decode step ----------------------------------------------------------------------

    def _step(self, bucket: int) -> None:
        view = DecodeView(self.state, self.positions, bucket)
        hidden = self.model.model(self.tokens[:, None], cache=view)
        self.logits.copy_(self.model.lm_head(hidden[:, -1]))

    @torch.no_grad()
    def _capture_graphs(self) -> None:
        """One graph per bucket, sharing one memory pool (only one runs at a time). Captured
        before any sequence is admitted: the warm-up runs write into the slots' state."""
        try:
            pool = None
            for bucket in self.buckets:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up: Triton autotuning, cuBLAS workspaces
                    for _ in range(2):
                        self._step(bucket)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._step(bucket)
                pool = graph.pool()
                self.graphs[bucket] = graph
        except Exception as e:  # an op that syncs with the host (e.g. MoE routing) cannot be captured
            warnings.warn(f"decode step not capturable as a CUDA graph, running it eagerly: {e}", stacklevel=3)
            self.graphs.clear()
        torch.cuda.synchronize()

    def _decode(self, bucket: int) -> None:
        if self.graphs:
            self.graphs[bucket].replay()
        else:
            self._step(bucket)

    # --- admission --------------------------------------------------------------------------

    def _prefill(self, prompts: list[list[int]], slots: list[int]) -> None:
        """Packed rows of at most `prefill_tokens` tokens (a longer prompt alone in its row)."""
        start = 0
        while start < len(prompts):
            end, total = start + 1, len(prompts[start])
            while end < len(prompts) and total + len(prompts[end]) <= self.prefill_tokens:
                total += len(prompts[end])
                end += 1
            rows, slot_ids = prompts[start:end], torch.tensor(slots[start:end], device=self.device)
            lengths = torch.tensor([len(p) for p in rows])
            cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(
                device=self.device, dtype=torch.int32)
            ids = torch.tensor([t for p in rows for t in p], device=self.device)[None]
            hidden = self.model.model(ids, cu_seqlens=cu_seqlens, cache=PrefillView(self.state, slot_ids))
            self.logits[slot_ids] = self.model.lm_head(hidden[0, cu_seqlens[1:].long() - 1]).float()
            self.positions[slot_ids] = lengths.to(self.device)
            start = end

    # --- generation -------------------------------------------------------------------------

    def _device_generator(self, generator: torch.Generator | None) -> torch.Generator | None:
        """A generator on the engine's device; a CPU generator for a CUDA engine seeds one."""
        if generator is None or generator.device == self.device:
            return generator
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
                 generator: torch.Generator | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """The new tokens of each prompt (up to and including its first stop token) and each
        token's `log softmax(logits / temperature)` (temperature 1 when greedy, `temperature` 0),
        taken before top-k/top-p filtering: the log-prob the training forward computes for it."""
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, each of at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        longest = max(map(len, prompts))
        if longest + max_new_tokens > self.max_length:
            raise ValueError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the engine's "
                             f"max_length {self.max_length}")
        do_sample = temperature > 0
        generator = self._device_generator(generator) if do_sample else None
        stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=self.device)
        slots = self.num_slots
        occupied = torch.zeros(slots, dtype=torch.bool, device=self.device)
        finished = torch.zeros(slots, dtype=torch.bool, device=self.device)
        count = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions.zero_()
        # host bookkeeping per slot: request, the iteration its prompt was admitted, prompt length
        request, admitted, prompt_len = [-1] * slots, [0] * slots, [0] * slots
        segments = []  # (request, slot, first iteration, end iteration)
        waiting = deque(range(len(prompts)))
        sampled, logps, live_steps = [], [], []
        step = 0
        while True:
            free = [s for s in range(slots) if request[s] < 0]
            if waiting and free:
                new = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
                taken = free[: len(new)]
                self._prefill([prompts[r] for r in new], taken)
                index = torch.tensor(taken, device=self.device)
                occupied[index], finished[index], count[index] = True, False, 0
                for s, r in zip(taken, new):
                    request[s], admitted[s], prompt_len[s] = r, step, len(prompts[r])

            token, logp = sample_with_logprobs(self.logits, do_sample, temperature, top_k, top_p, generator)
            live = occupied & ~finished
            sampled.append(token)
            logps.append(logp)
            live_steps.append(live)
            count += live
            finished |= live & (torch.isin(token, stops) | (count >= max_new_tokens))
            step += 1

            if waiting or step % self.check_every == 0 or step >= max_new_tokens + last_admission(request, admitted):
                done = (~occupied | finished).cpu().tolist()
                ended = [s for s in range(slots) if done[s] and request[s] >= 0]
                for s in ended:
                    segments.append((request[s], s, admitted[s], step))
                    request[s] = -1
                if ended:
                    index = torch.tensor(ended, device=self.device)
                    occupied[index] = False
                    self.positions[index] = 0
                if not waiting and all(r < 0 for r in request):
                    break

            self.tokens.copy_(token)
            bound = max((prompt_len[s] + min(step - 1 - admitted[s], max_new_tokens - 1)
                         for s in range(slots) if request[s] >= 0), default=0)
            self._decode(next(b for b in self.buckets if b > bound))
            self.positions += occupied & ~finished
        return self._collect(segments, len(prompts), sampled, logps, live_steps)

    @staticmethod
    def _collect(segments, n, sampled, logps, live_steps):
        """Each request's tokens and log-probs from the per-iteration rows (one copy to the host)."""
        tokens = torch.stack(sampled).tolist()
        values = torch.stack(logps).tolist()
        live = torch.stack(live_steps).tolist()
        out_tokens, out_logps = [[] for _ in range(n)], [[] for _ in range(n)]
        for r, s, first, end in segments:
            for t in range(first, end):
                if live[t][s]:
                    out_tokens[r].append(tokens[t][s])
                    out_logps[r].append(values[t][s])
        return out_tokens, out_logps


def last_admission(request: list[int], admitted: list[int]) -> int:
    """The latest admission iteration among occupied slots (0 if none): every sequence has ended
    `max_new_tokens` iterations after it, so that is a sure sync point."""
    return max((a for r, a in zip(request, admitted) if r >= 0), default=0)
