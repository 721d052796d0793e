"""Training FLOPs per token, for MFU.

Per token, a matrix product with an `m x n` weight costs 2mn FLOPs forward and 4mn backward:
6 x (parameters in matrix products), the output head included and the embedding lookup not.
Softmax attention adds, per attention layer, 2 products of the query with `seq_len / 2` keys on
average (causal), each `heads x head_dim` wide: 6 x 2 x heads x head_dim x seq_len / 2 x 2.
The gated delta rule's chunked form costs, per token and value head, about 4 products of
`key_dim x value_dim` (state read, state write, and the intra-chunk terms): 6 x 4 x Hv x Dk x Dv
per GDN layer (small next to the projections at these sizes).
"""

from __future__ import annotations

from qwen35.model.config import Qwen35Config

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16


def flops_per_token(config: Qwen35Config, seq_len: int) -> float:
    hidden = config.hidden_size
    attn_inner = config.num_attention_heads * config.head_dim
    kv_inner = config.num_key_value_heads * config.head_dim
    key_dim = config.linear_num_key_heads * config.linear_key_head_dim
    value_dim = config.linear_num_value_heads * config.linear_value_head_dim
    mlp = 3 * hidden * config.intermediate_size
    attention = hidden * (2 * attn_inner + 2 * kv_inner) + attn_inner * hidden
    deltanet = hidden * (2 * key_dim + 2 * value_dim + 2 * config.linear_num_value_heads) + value_dim * hidden
    n_attn = config.layer_types.count("full_attention")
    n_gdn = config.num_hidden_layers - n_attn
    matmul_params = config.num_hidden_layers * mlp + n_attn * attention + n_gdn * deltanet + hidden * config.vocab_size
    attention_scores = n_attn * 6 * 2 * attn_inner * seq_len / 2
    delta_rule = n_gdn * 6 * 4 * config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim
    return 6 * matmul_params + attention_scores + delta_rule
