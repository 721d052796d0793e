"""AdamW for bf16 weights that keeps the updates rounding would lose: Kahan compensation.

Why not plain bf16 weights: bf16 keeps 8 significant bits, so an update smaller than half the
spacing of bf16 numbers around a weight rounds back to the same weight. At a fine-tuning learning
rate (1e-5; an Adam step moves a weight by about lr) every weight larger than about 0.003 stops
moving, and training stalls. Float32 master weights fix that at 4 bytes per weight plus 4 for
its float32 gradient.

What this does instead: each bf16 weight `p` has a bf16 compensation `c` holding what the last
rounding dropped, so that the pair represents `w = p + c` to about 16 significant bits. A step
rebuilds `w` in float32 (exactly: a bf16 and a bf16 residual below half its spacing add without
error in float32's 24 bits), applies AdamW to `w`, and splits it again: `p = bf16(w)` (round to
nearest), `c = bf16(w - p)`. The dropped part of a small update is kept in `c` and reaches `p`
once the compensated sum crosses a rounding boundary, as Kahan summation carries the low bits of
a running sum. Cost: 2 bytes per weight for `c`; the model, its gradients and its activations
are all bf16.

Why Kahan and not stochastic rounding: stochastic rounding needs no buffer, but it is right only
on average, adds noise of the size of the bf16 spacing to every weight at every step, and makes a
run depend on a random stream that a resume must restore; Kahan compensation is deterministic
(a resumed run repeats the uninterrupted one bit for bit) and tracks float32 masters closely.

Moments: float32 (`exp_avg`, `exp_avg_sq`, 8 bytes per weight), or 8-bit blockwise
(bitsandbytes' dynamic quantisation in blocks of 256 with a float32 scale per block, 2 bytes per
weight) for tensors of at least 4096 elements, as bitsandbytes' AdamW8bit does. Parameters that
are float32 in the model (`A_log`, the GDN norm weight) are updated in place with no
compensation. The update runs in slices of at most 2^24 elements, so the float32 copies it needs
stay small next to a 1e9-element embedding.
"""

from __future__ import annotations

import torch

SLICE = 1 << 24  # elements updated at once; a multiple of the 8-bit block
BLOCK = 256  # bitsandbytes' block size for its blockwise 8-bit optimizer state
MIN_8BIT_SIZE = 4096  # smaller tensors keep float32 moments (bitsandbytes' default)


class KahanAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) on bf16 weights with a bf16 Kahan compensation buffer.

    `moments="float32"` or `"8bit"`. The state is an ordinary optimizer state dict (`step`,
    `compensation`, and `exp_avg`/`exp_avg_sq` or their 8-bit codes and block scales), so DCP
    checkpoints it and a resumed run continues exactly.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 moments: str = "float32"):
        if moments not in ("float32", "8bit"):
            raise ValueError(f"moments must be float32 or 8bit, not {moments!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moments = moments
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _eight_bit(self, p: torch.Tensor) -> bool:
        return self.moments == "8bit" and p.numel() >= MIN_8BIT_SIZE

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if p.dtype != torch.float32:
                state["compensation"] = torch.zeros_like(p)
            if self._eight_bit(p):
                blocks = -(-p.numel() // BLOCK)
                for name in ("exp_avg", "exp_avg_sq"):
                    state[f"{name}_8bit"] = torch.zeros(p.numel(), dtype=torch.uint8, device=p.device)
                    state[f"{name}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            else:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, except that each state tensor keeps its dtype (torch's would cast the
        float32 moments and the 8-bit codes to the parameter's dtype, bf16)."""
        load_state_keeping_dtypes(self, state_dict, lambda p: p.device)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                count = int(state["step"]) if self._eight_bit(p) else None  # bitsandbytes takes an int
                n = p.numel()
                for lo in range(0, n, SLICE):
                    self._update_slice(p, state, group, count, lo, min(n, lo + SLICE))

    def _update_slice(self, p, state, group, count: int | None, lo: int, hi: int) -> None:
        grad = p.grad.view(-1)[lo:hi].float()
        if p.dtype == torch.float32:
            weight = p.view(-1)[lo:hi]  # a float32 parameter is its own master
        else:
            p_slice, c_slice = p.view(-1)[lo:hi], state["compensation"].view(-1)[lo:hi]
            weight = p_slice.float() + c_slice.float()  # exact: the represented weight
        beta1, beta2 = group["betas"]
        if self._eight_bit(p):
            self._adamw_8bit(weight, grad, state, group, count, lo, hi)
        else:
            torch._fused_adamw_([weight], [grad], [state["exp_avg"].view(-1)[lo:hi]],
                                [state["exp_avg_sq"].view(-1)[lo:hi]], [], [state["step"]], lr=group["lr"],
                                beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                amsgrad=False, maximize=False)
        if p.dtype != torch.float32:
            p_slice.copy_(weight)  # round to nearest
            c_slice.copy_(weight - p_slice.float())  # what the rounding dropped (exact in float32)

    def _adamw_8bit(self, weight, grad, state, group, count: int, lo: int, hi: int) -> None:
        import bitsandbytes.functional as bnbf

        if weight.device not in self._qmaps:
            self._qmaps[weight.device] = (bnbf.create_dynamic_map(signed=True).to(weight.device),
                                          bnbf.create_dynamic_map(signed=False).to(weight.device))
        signed, unsigned = self._qmaps[weight.device]
        blocks = slice(lo // BLOCK, -(-hi // BLOCK))
        beta1, beta2 = group["betas"]
        bnbf.optimizer_update_8bit_blockwise(
            "adam", grad, weight, state["exp_avg_8bit"][lo:hi], state["exp_avg_sq_8bit"][lo:hi], beta1, beta2,
            0.0, 0.0, group["eps"], count, group["lr"], signed, unsigned,
            state["exp_avg_absmax"][blocks], state["exp_avg_sq_absmax"][blocks], group["weight_decay"])


def load_state_keeping_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict, device_of) -> None:
    """`optimizer.load_state_dict`, but each state tensor keeps its saved dtype and moves to
    `device_of(param)` (torch's casts every floating state tensor to its parameter's dtype)."""
    torch.optim.Optimizer.load_state_dict(optimizer, {"state": {}, "param_groups": state_dict["param_groups"]})
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for saved_id, p in zip(saved_ids, params):
        if saved_id in state_dict["state"]:
            optimizer.state[p] = {k: v.to(device_of(p), copy=True) for k, v in state_dict["state"][saved_id].items()}
