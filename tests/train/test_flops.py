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


def test_vision_tower_counts_its_weights_per_patch_and_attention_within_each_frame():
    from torch import nn

    from qwen35.model.config import VisionConfig
    from qwen35.model.vision import VisionModel
    from qwen35.train.flops import vision_flops

    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=24,
                          num_position_embeddings=36)
    with torch.device("meta"):
        tower = VisionModel(vision)
    blocks = sum(m.weight.numel() for m in tower.blocks.modules() if isinstance(m, nn.Linear))
    merger = sum(m.weight.numel() for m in tower.merger.modules() if isinstance(m, nn.Linear))
    embed = tower.patch_embed.proj.weight.numel()
    image = torch.tensor([[1, 4, 6]])  # 24 patches in one frame, 6 merged tokens
    assert vision_flops(vision, image) == 6 * 24 * blocks + 4 * 24 * embed + 6 * 6 * merger + 2 * 12 * 32 * 24**2
    # two frames attend separately (twice one frame's attention, not four times); media add up
    assert vision_flops(vision, torch.tensor([[2, 4, 6]])) == 2 * vision_flops(vision, image)
    small = torch.tensor([[1, 2, 2]])
    assert vision_flops(vision, torch.cat([image, small])) == vision_flops(vision, image) + vision_flops(vision, small)
