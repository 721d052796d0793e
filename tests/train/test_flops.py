"""Model FLOPs for MFU: documents, not rows, set the attention term; routed experts count k/E."""

import torch

from reference import TINY_CONFIG
from qwen35 import Qwen35Config, Qwen35ForCausalLM
from qwen35.train.flops import active_parameters, flops_per_token, step_flops

def test_packed_documents_count_only_their_own_attention():
    config = Qwen35Config(**TINY_CONFIG)
    whole, halves = step_flops(config, [64]), step_flops(config, [32, 32])
    attention_layers = config.layer_types.count("full_attention")
    assert whole - halves == attention_layers * 6 * 4 * 16 * (64 * 65 - 2 * 32 * 33)
    assert flops_per_token(config, 64) == whole / 64


def test_routed_experts_count_at_top_k_over_experts():
    config = Qwen35Config(**TINY_CONFIG, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                          shared_expert_intermediate_size=16)
    with torch.device("meta"):
        model = Qwen35ForCausalLM(config)
    named = dict(model.named_parameters())
    routed = sum(p.numel() for n, p in named.items() if ".mlp.experts." in n)
    outside = sum(p.numel() for n, p in named.items() if "embed_tokens" not in n and "lm_head" not in n)
    assert routed > 0 and active_parameters(config) == outside - routed + routed * 2 // 8
