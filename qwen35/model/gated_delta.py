"""The Gated DeltaNet layer (linear attention) of Qwen3.5.

in_proj_qkv -> depthwise causal conv (SiLU) -> q, k `[.., Hk, Dk]`, v `[.., Hv, Dv]`;
beta = sigmoid(in_proj_b x); g = -exp(A_log) * softplus(in_proj_a x + dt_bias), in float32;
gated delta rule (ops) -> gated RMSNorm with z = in_proj_z x -> out_proj.

`A_log` and `norm.weight` are stored in float32 in the official checkpoints and must stay so:
rounding A_log to bf16 changes every head's decay. The model keeps them float32 whatever the
compute dtype (see `Qwen35ForCausalLM.to_compute_dtype`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35 import ops
from qwen35.model.config import Qwen35Config


class GatedRMSNorm(nn.Module):
    """`w * norm(x) * silu(z)`: an ordinary weight (initialised to 1), unlike the (1+w) norms."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ops.gated_rms_norm(x, z, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        key_dim = self.num_k_heads * self.head_k_dim
        value_dim = self.num_v_heads * self.head_v_dim
        conv_dim = 2 * key_dim + value_dim

        self.in_proj_qkv = nn.Linear(config.hidden_size, conv_dim, bias=False)
        self.in_proj_z = nn.Linear(config.hidden_size, value_dim, bias=False)
        self.in_proj_b = nn.Linear(config.hidden_size, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(config.hidden_size, self.num_v_heads, bias=False)
        # nn.Conv1d only as the holder of the `[C, 1, K]` weight that checkpoints carry.
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, config.linear_conv_kernel_dim, groups=conv_dim, bias=False
        )
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, config.hidden_size, bias=False)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.dt_bias)
        with torch.no_grad():  # decay rates A spread over (0.01, 16), as transformers initialises
            self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(0.01, 16).log())

    def delta_rule(self, q, k, v, g, beta, cu_seqlens, initial_state, output_final_state: bool):
        """The recurrence over the whole row: o `[B, T, Hv, Dv]` and the final state (or None)."""
        return ops.gated_delta_rule(q, k, v, g, beta, cu_seqlens, initial_state, output_final_state=output_final_state)

    # The layer in three steps: `project` and `output` act on each token alone, `mix` is the only
    # step that mixes tokens, and it treats every head on its own.

    def forward(self, x_BTD, cu_seqlens=None, cache=None):
        qkv_BTC, beta, g, z = self.project(x_BTD)
        o = self.mix(qkv_BTC, beta, g, self.conv1d.weight.squeeze(1), cu_seqlens, cache)
        return self.output(o, z)

    def project(self, x_BTD):
        """The conv's input channels `[q | k | v]` `[B, T, C]`, beta and the log decay g (float32),
        both `[B, T, Hv]`, and the output gate z `[B, T, Hv * Dv]`. All four projections of the
        layer input happen here, so that a compiled layer reads it in one graph (before the delta
        rule's break) and its gradient is summed inside that graph's backward."""
        beta = self.in_proj_b(x_BTD).sigmoid()
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x_BTD).float() + self.dt_bias)
        return self.in_proj_qkv(x_BTD), beta, g, self.in_proj_z(x_BTD)

    def mix(self, qkv_BTC, beta, g, conv_weight_CK, cu_seqlens=None, cache=None):
        """The short conv (depthwise: channel c uses row c of `conv_weight_CK`) and the delta rule:
        o `[B, T, Hv, Dv]`. The head counts are read from beta, so any whole group of heads with
        their channels `[q heads | k heads | v heads]` and conv rows runs the same way."""
        batch, length, value_heads = beta.shape
        key_heads = value_heads * self.num_k_heads // self.num_v_heads
        conv_state = recurrent_state = None
        if cache is not None and cache.started:
            conv_state, recurrent_state = cache.conv_state, cache.recurrent_state
        want_state = cache is not None
        # a decoding step updates the cached conv window and recurrent state in place (one read and
        # one write of each)
        decoding = recurrent_state is not None and length == 1 and cu_seqlens is None
        if decoding:
            qkv = ops.causal_conv1d_step_(qkv_BTC, conv_weight_CK, conv_state)
        else:
            qkv, conv_state = ops.causal_conv1d(qkv_BTC, conv_weight_CK, cu_seqlens, conv_state, want_state)
        key_dim = key_heads * self.head_k_dim
        q, k, v = qkv.split((key_dim, key_dim, value_heads * self.head_v_dim), dim=-1)
        q = q.reshape(batch, length, key_heads, self.head_k_dim)
        k = k.reshape(batch, length, key_heads, self.head_k_dim)
        v = v.reshape(batch, length, value_heads, self.head_v_dim)

        if decoding:
            o = ops.gated_delta_rule_step_(q, k, v, g, beta, recurrent_state)
        else:
            o, recurrent_state = self.delta_rule(q, k, v, g, beta, cu_seqlens, recurrent_state, want_state)
        if cache is not None:
            cache.update(conv_state, recurrent_state)
        return o

    def output(self, o_BTHD, z):
        """Gated RMSNorm per head (gate z), then out_proj."""
        return self.out_proj(self.norm(o_BTHD, z.reshape(o_BTHD.shape)).flatten(2))
