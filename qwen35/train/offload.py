"""AdamW with its float32 master weights and moments in CPU memory (`optim.cpu_offload`).

The GPU holds what the model computes with, the weights in their own dtype (bf16 under autocast)
and their gradients: 4 bytes per bf16 weight instead of 16; the CPU holds 12 (master, two moments).
A step moves each gradient to the CPU, updates the float32 master there with torch's fused AdamW
kernel, and copies the master, rounded to the parameter's dtype, back into the parameter.

That work is a pipeline, in chunks of at most `chunk_numel` elements, so the copies and the CPU
arithmetic overlap one another (and, with `in_backward`, the backward pass):

    hand-over (a backward hook, or step()): the gradient and an event on the compute stream
    copier thread:  each chunk into a free pinned slot, on a download stream after that event
    updater thread: waits for the chunk, runs AdamW on the master's chunk, rounds it into a pinned
                    slot and copies that into the parameter on an upload stream

Without `in_backward`, `step()` hands every gradient over after the backward, so clipping and
accumulation over micro-batches work as usual. With it, each parameter is handed over inside the
backward as soon as its gradient is complete (`register_post_accumulate_grad_hook`) and its
gradient dropped there, so the CPU works while the GPU computes the earlier layers' gradients; as
with `AdamWInBackward`: no clipping by the global norm, one micro-batch per step, the norm summed
for the log (`take_grad_norm`). Either way the step is over when every update has been copied:
`step()` (or `take_grad_norm()`) waits for the threads and makes the compute stream wait for the
upload stream, so the next forward reads the new weights; until then, with `in_backward`, the
weights are changing under the caller (the trainer calls `take_grad_norm()` right after the
backward).

From the first gradient of a step that is not finite on, the rest of the step's parameters are
left as they are, their step not counted. The state is an ordinary
optimizer state dict (`master`, `exp_avg`, `exp_avg_sq`, `step` per parameter), created when the
optimizer is built (DCP's state-dict helpers would otherwise run a step on zero gradients of every
parameter at once to create it), so DCP checkpoints it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from typing import NamedTuple

import torch

from qwen35.train.kahan import load_state_keeping_dtypes

CHUNK_NUMEL = 1 << 23  # elements per pinned slot: 32 MiB of float32
# chunks start at multiples of the CPU kernel's vector width, so that an update in chunks is the
# whole tensor's bit for bit (a chunk ending mid-vector would take the scalar path there: other
# rounding)
CHUNK_ALIGN = 64
GRADIENT_SLOTS = 4  # chunks downloaded ahead of the CPU update
WEIGHT_SLOTS = 2  # chunks of new weights on their way up


class OffloadedAdamW(torch.optim.Optimizer):
    """AdamW whose float32 masters and moments live in CPU memory (ZeRO-Offload's split); the
    module docstring says how a step runs."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 in_backward: bool = False, chunk_numel: int = CHUNK_NUMEL):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.updates_in_backward = in_backward
        self._group_index = {p: i for i, group in enumerate(self.param_groups) for p in group["params"]}
        devices = {p.device for p in self._group_index}
        if len(devices) != 1:
            raise ValueError(f"OffloadedAdamW takes the parameters of one device, not {sorted(map(str, devices))}")
        self._device = devices.pop()
        for p in self._group_index:
            if not p.is_contiguous():
                raise ValueError(f"OffloadedAdamW updates parameters in place by chunks: one of shape "
                                 f"{tuple(p.shape)} is not contiguous")
            master = p.detach().to("cpu", torch.float32, copy=True)
            self.state[p].update(master=master, exp_avg=torch.zeros_like(master),
                                 exp_avg_sq=torch.zeros_like(master), step=torch.zeros((), dtype=torch.float32))
            if in_backward:
                p.register_post_accumulate_grad_hook(hook_while_alive(self._hand_over_in_backward))
        if chunk_numel % CHUNK_ALIGN:
            raise ValueError(f"chunk_numel must be a multiple of {CHUNK_ALIGN}, not {chunk_numel}")
        self._chunk_numel = chunk_numel
        self._slots: _Slots | None = None  # pinned staging, allocated at the first step
        self._pipeline: _Pipeline | None = None  # the running step's threads
        self._sum_sq: torch.Tensor | None = None  # the step's squared gradient norm so far (in_backward)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that the state stays float32 on the CPU (torch's would cast every
        state tensor to its parameter's dtype and device: bf16, on the GPU)."""
        load_state_keeping_dtypes(self, state_dict, lambda p: torch.device("cpu"))

    def _hand_over_in_backward(self, p: torch.Tensor) -> None:
        sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
        self._sum_sq = sq if self._sum_sq is None else self._sum_sq + sq
        self._hand_over(p, p.grad, sq, _ready(self._device))
        p.grad = None

    @torch.no_grad()
    def _hand_over(self, p: torch.Tensor, grad: torch.Tensor, sq: torch.Tensor, ready) -> None:
        if self._pipeline is None:
            if self._slots is None:
                self._slots = _Slots(self._chunk_numel, self._device)
            self._pipeline = _Pipeline(self._slots)
        group = self.param_groups[self._group_index[p]]  # by index: load_state_dict replaces the groups
        self._pipeline.incoming.put(_Handover(p, grad, sq, ready, self.state[p], group))

    def _finish(self) -> None:
        """Waits for the step's updates; the compute stream then reads the new weights."""
        if self._pipeline is not None:
            pipeline, self._pipeline = self._pipeline, None
            pipeline.finish()

    @torch.no_grad()
    def step(self, closure=None):
        held = [(p, torch.linalg.vector_norm(p.grad, dtype=torch.float32).square())
                for p in self._group_index if p.grad is not None]
        ready = _ready(self._device)  # after the norms, which the copier reads
        for p, sq in held:
            self._hand_over(p, p.grad, sq, ready)
        self._finish()

    def take_grad_norm(self) -> torch.Tensor:
        """With `in_backward`: the norm of the gradients handed over since the last call (the
        step's, as `clip_grad_norm_` returns it), once their updates are done."""
        self._finish()
        norm = torch.zeros(()) if self._sum_sq is None else self._sum_sq.sqrt()
        self._sum_sq = None
        return norm


class _Handover(NamedTuple):
    """One parameter's gradient for the pipeline."""

    p: torch.Tensor
    grad: torch.Tensor
    sq: torch.Tensor  # its squared norm, float32 on the device
    ready: torch.cuda.Event | None  # after the gradient (and sq) on the compute stream; None on the CPU
    state: dict
    group: dict


class _Slots:
    """The pinned host buffers the chunks pass through, and the two copy streams."""

    def __init__(self, chunk_numel: int, device: torch.device):
        cuda = device.type == "cuda"
        nbytes = chunk_numel * 4  # the widest parameter dtype, float32

        def buffer():
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)

        self.chunk_numel = chunk_numel
        self.device = device
        self.gradients = [buffer() for _ in range(GRADIENT_SLOTS)]
        self.weights = [buffer() for _ in range(WEIGHT_SLOTS)]
        self.float32 = torch.empty(chunk_numel, dtype=torch.float32)  # a gradient chunk, widened
        self.download = torch.cuda.Stream(device) if cuda else None
        self.upload = torch.cuda.Stream(device) if cuda else None


class _Pipeline:
    """The copier and updater threads of one step."""

    def __init__(self, slots: _Slots):
        self.slots = slots
        self.incoming: queue.Queue = queue.Queue()  # _Handover, then None
        self._staged: queue.Queue = queue.Queue()  # downloaded (or downloading) chunks, then None
        self._free: queue.Queue = queue.Queue()  # gradient slots ready for a download
        for i in range(GRADIENT_SLOTS):
            self._free.put(i)
        self._uploaded = [None] * WEIGHT_SLOTS  # each weight slot's last upload
        self._turn = 0  # the weight slot the next chunk goes through
        self._skipping = False  # from the first gradient that is not finite on
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._guarded, args=(work,), daemon=True)
                         for work in (self._copy, self._update)]
        for thread in self._threads:
            thread.start()

    def finish(self) -> None:
        self.incoming.put(None)
        for thread in self._threads:
            thread.join()
        if self._error is not None:
            raise RuntimeError("the offloaded AdamW step failed; the weights are partly updated") from self._error
        if self.slots.upload is not None:
            torch.cuda.current_stream(self.slots.device).wait_stream(self.slots.upload)

    def _guarded(self, work) -> None:
        if self.slots.device.type == "cuda":
            torch.cuda.set_device(self.slots.device)
        try:
            work()
        except BaseException as e:  # reported by finish()
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        """Records the step's first error; both threads then only drain their queues."""
        self._error = self._error or error

    def _copy(self) -> None:
        """Each handed-over gradient, chunk by chunk, into free gradient slots."""
        try:
            while (handover := self.incoming.get()) is not None:
                if self._error is None:
                    try:
                        self._download(handover)
                    except BaseException as e:
                        self._fail(e)
                del handover
        finally:
            self._staged.put(None)

    def _download(self, handover: _Handover) -> None:
        slots = self.slots
        flat = handover.grad.view(-1)
        sq_host = torch.empty((), dtype=torch.float32, pin_memory=slots.download is not None)
        for start in range(0, flat.numel(), slots.chunk_numel):
            chunk = flat[start:start + slots.chunk_numel]
            slot = self._free.get()
            staged = slots.gradients[slot][:chunk.numel() * chunk.element_size()].view(chunk.dtype)
            with _on(slots.download):
                if slots.download is not None:
                    slots.download.wait_event(handover.ready)
                if start == 0:
                    sq_host.copy_(handover.sq, non_blocking=True)
                staged.copy_(chunk, non_blocking=True)
                done = _record(slots.download)
            self._staged.put((handover, start, slot, staged, sq_host if start == 0 else None, done))

    def _update(self) -> None:
        """AdamW on each staged chunk, in order; a gradient slot is free again after its chunk."""
        while (item := self._staged.get()) is not None:
            handover, start, slot, staged, sq_host, done = item
            try:
                if done is not None:
                    done.synchronize()
                if self._error is None:
                    self._apply(handover, start, staged, sq_host)
            except BaseException as e:
                self._fail(e)
            finally:
                self._free.put(slot)
                del item, handover, staged  # the last reference to a GPU gradient goes after its copy

    def _apply(self, handover: _Handover, start: int, staged: torch.Tensor, sq_host: torch.Tensor | None) -> None:
        slots, state, group = self.slots, handover.state, handover.group
        numel = staged.numel()
        if sq_host is not None:  # the parameter's first chunk
            self._skipping = self._skipping or not torch.isfinite(sq_host)
            if not self._skipping:
                state["step"] += 1
        if self._skipping:
            return
        widened = slots.float32[:numel]
        widened.copy_(staged)
        master = state["master"].view(-1)[start:start + numel]
        beta1, beta2 = group["betas"]
        torch._fused_adamw_([master], [widened], [state["exp_avg"].view(-1)[start:start + numel]],
                            [state["exp_avg_sq"].view(-1)[start:start + numel]], [], [state["step"]],
                            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                            eps=group["eps"], amsgrad=False, maximize=False)
        target = handover.p.detach().view(-1)[start:start + numel]
        turn = self._turn
        if self._uploaded[turn] is not None:
            self._uploaded[turn].synchronize()
        rounded = slots.weights[turn][:numel * target.element_size()].view(target.dtype)
        rounded.copy_(master)
        # no wait for the backward here: the gradient's download waited for it, and this thread
        # waited for the download
        with _on(slots.upload):
            target.copy_(rounded, non_blocking=True)
            self._uploaded[turn] = _record(slots.upload)
        self._turn = (turn + 1) % WEIGHT_SLOTS


def hook_while_alive(method):
    """A parameter hook that calls `method` while the object it is bound to lives: a strong
    reference from the parameters would keep an optimizer and its state alive for as long as the
    model (a cycle through a tensor's hooks, which the garbage collector does not break)."""
    ref = weakref.WeakMethod(method)

    def hook(p: torch.Tensor) -> None:
        bound = ref()
        if bound is not None:
            bound(p)

    return hook


def _ready(device: torch.device):
    """An event after the work queued so far on the device's current stream (None on the CPU)."""
    return _record(torch.cuda.current_stream(device) if device.type == "cuda" else None)


def _record(stream):
    """An event after the work queued so far on `stream` (None: the CPU, nothing to wait for)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
