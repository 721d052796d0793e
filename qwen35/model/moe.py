"""The sparse mixture-of-experts block of the Qwen3.5 MoE models (35B-A3B, 122B-A10B).

Router: softmax over experts in float32, top-k, renormalised to sum 1. Routed experts are SwiGLU
MLPs held as two 3-D parameters, transformers' in-memory layout: `experts.gate_up_proj
[E, 2I, H]` (gate rows first) and `experts.down_proj [E, H, I]`; checkpoints store them per
expert (`experts.{e}.gate_proj.weight`, ...), fused and split by `qwen35.checkpoint.hf`. A shared
expert (an ordinary SwiGLU MLP) runs on every token, scaled by `sigmoid(shared_expert_gate(x))`.

The load-balancing loss (Switch Transformer, as transformers computes it over all layers):
`E * sum_e f_e * p_e`, with f_e the fraction of top-k assignments that go to expert e and p_e
the mean router probability of e, both over every token of every MoE layer. The optional
router z-loss (ST-MoE) is the mean of `logsumexp(logits)^2`; its coefficient is a training
setting (`train.router_z_loss_coef`), not part of the model's config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen35 import ops
from qwen35.model.config import Qwen35Config
from qwen35.model.mlp import MLP


class Router(nn.Module):
    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, x_ND):
        logits = F.linear(x_ND, self.weight)  # [N, E]
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(logits.dtype)
        return logits, weights, experts


class Experts(nn.Module):
    def __init__(self, config: Qwen35Config):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x_ND, weights_NK, experts_NK):
        return ops.routed_experts(x_ND, weights_NK, experts_NK, self.gate_up_proj, self.down_proj)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x_BTD):
        """Returns the block output and the router logits `[B*T, E]` (for the balancing loss)."""
        x = x_BTD.reshape(-1, x_BTD.shape[-1])
        logits, weights, experts = self.gate(x)
        out = self.experts(x, weights, experts)
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view_as(x_BTD), logits


@dataclass
class RouterStats:
    """What the routers of one forward did, over every MoE layer."""

    aux_loss: torch.Tensor  # load balancing, unscaled (the model adds router_aux_loss_coef * aux)
    z_loss: torch.Tensor  # mean over tokens and layers of logsumexp(router logits)^2 (ST-MoE)
    tokens_per_expert: torch.Tensor  # [layers, E] top-k assignments, no gradient
    # The sums both losses are made of, for a trainer that balances over more than one forward
    # (`qwen35.train.step`): aux = E * sum_e (assigned_e / rows) * (prob_sum_e / rows).
    prob_sum: torch.Tensor  # [E] router probabilities summed over tokens and layers (with gradient)
    z_sum: torch.Tensor  # logsumexp(router logits)^2 summed over tokens and layers (with gradient)
    rows: int  # tokens x MoE layers


def balance_loss(assigned_E: torch.Tensor, prob_sum_E: torch.Tensor, rows) -> torch.Tensor:
    """`E * sum_e f_e * p_e` from top-k assignment counts (no gradient) and probability sums."""
    return assigned_E.shape[-1] * torch.sum((assigned_E / rows) * (prob_sum_E / rows))


def router_stats(router_logits: list[torch.Tensor], top_k: int) -> RouterStats:
    num_experts = router_logits[0].shape[-1]
    counts, prob_sums, z_sum = [], [], 0.0
    for logits in router_logits:
        logits = logits.float()
        probs = logits.softmax(dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices
        counts.append(torch.bincount(chosen.flatten(), minlength=num_experts).float())
        prob_sums.append(probs.sum(dim=0))
        z_sum = z_sum + torch.logsumexp(logits, dim=-1).square().sum()
    rows = sum(logits.shape[0] for logits in router_logits)
    counts_LE, prob_sum = torch.stack(counts), torch.stack(prob_sums).sum(0)
    aux = balance_loss(counts_LE.sum(0), prob_sum, rows)
    return RouterStats(aux, z_sum / rows, counts_LE, prob_sum, z_sum, rows)
