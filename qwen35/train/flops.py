"""Model FLOPs of a training step, for MFU (recomputation not counted).

Per step of T tokens in documents of lengths L_d (docs/gpu.md#model-flops-and-mfu):

    6 * N * T                                            weight matmuls, forward and backward
  + 6 * V * H * T                                        output head (also when tied)
  + n_attn * 6 * H_q * D * sum_d L_d (L_d + 1)           causal softmax attention per document
  + n_gdn * 3 * T * Hv * (6 Dk Dv + 2 C (3 Dk + 2 Dv))   chunked gated delta rule, chunk C = 64

N is the parameters outside the embedding and head, the routed experts counted at top-k / E
(what one token runs through), read off a meta-device model of the config.

A vision-language step adds its vision tower (`vision_flops`): N patches in frames of n_f
patches, width D, MLP I, depth L, patch vectors of K = C * Tp * P^2 values, merged width
M = D * S^2 (S the merge size), language width H:

    6 * N * L * (4 D^2 + 2 D I)      blocks' weight matmuls (qkv, proj, two MLP), fwd + bwd
  + 4 * N * K * D                    patch embedding, fwd + weight gradient (pixels need none)
  + 6 * (N / S^2) * (M^2 + M H)      2x2 patch merger
  + L * 12 * D * sum_f n_f^2         bidirectional attention within each frame, fwd + bwd
"""

from __future__ import annotations

import torch

from qwen35.model.config import Qwen35Config

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16
GDN_CHUNK = 64


def active_parameters(config: Qwen35Config) -> int:
    from qwen35.model.model import Qwen35ForCausalLM

    with torch.device("meta"):
        model = Qwen35ForCausalLM(config)
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "lm_head" in name:
            continue
        routed = ".experts." in name and "shared_expert" not in name
        total += p.numel() * config.num_experts_per_tok // config.num_experts if routed else p.numel()
    return total


def step_flops(config: Qwen35Config, lengths: list[int]) -> float:
    tokens = sum(lengths)
    n_gdn = config.layer_types.count("linear_attention")
    dk, dv, hv = config.linear_key_head_dim, config.linear_value_head_dim, config.linear_num_value_heads
    dense = 6 * active_parameters(config) * tokens + 6 * config.vocab_size * config.hidden_size * tokens
    gdn = n_gdn * 3 * tokens * hv * (6 * dk * dv + 2 * GDN_CHUNK * (3 * dk + 2 * dv))
    return float(dense + attention_flops(config, lengths) + gdn)


def attention_flops(config: Qwen35Config, lengths: list[int], recompute: bool = False) -> float:
    """The causal softmax attention's share of `step_flops`: 2 H_q D L (L + 1) per document and
    layer forward, twice that backward, and one forward more when checkpointing recomputes it.
    At long context it is nearly the whole step: the floor no kernel schedule gets under."""
    forward = config.layer_types.count("full_attention") * 2 * config.num_attention_heads * config.head_dim * sum(
        n * (n + 1) for n in lengths)
    return float(forward * (4 if recompute else 3))


def flops_per_token(config: Qwen35Config, seq_len: int) -> float:
    """Per token of rows `seq_len` long, counted as one document each (packed rows of shorter
    documents do less attention work: MFU then reads a little high)."""
    return step_flops(config, [seq_len]) / seq_len


def vision_flops(vision, grid_thw) -> float:
    """Model FLOPs of the vision tower `vision` (a `VisionConfig`) over media of `grid_thw`
    (`[num_media, 3]` patch grids, as the processor returns them), forward and backward."""
    frames = [(t, h * w) for t, h, w in (tuple(int(x) for x in g) for g in grid_thw)]
    patches = sum(t * n for t, n in frames)
    d, inner, merge = vision.hidden_size, vision.intermediate_size, vision.spatial_merge_size ** 2
    k = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    merged = d * merge
    blocks = 6 * patches * vision.depth * (4 * d * d + 2 * d * inner)
    embed = 4 * patches * k * d
    merger = 6 * (patches // merge) * (merged * merged + merged * vision.out_hidden_size)
    attention = vision.depth * 12 * d * sum(t * n * n for t, n in frames)
    return float(blocks + embed + merger + attention)
