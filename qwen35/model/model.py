"""The Qwen3.5 text model, single device, top to bottom.

Parameter names are transformers' (`model.layers.{i}.linear_attn.A_log`, ...), so a checkpoint
maps onto this model (almost) as the identity. Inputs are either a plain batch `[B, T]` of
sequences or one packed row `[1, T]` of several documents delimited by `cu_seqlens`; in the
packed case every token mixer (conv, delta rule, attention) stays inside its document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen35 import ops
from qwen35.model.cache import InferenceCache
from qwen35.model.config import Qwen35Config
from qwen35.model.gated_delta import GatedDeltaNet, GatedRMSNorm
from qwen35.model.mlp import MLP
from qwen35.model.moe import Experts, Router, RouterStats, SparseMoeBlock, router_stats
from qwen35.ops.autocast import compute_dtype
from qwen35.ops.cross_entropy import IGNORE_INDEX
from qwen35.ops.segments import document_starts, positions_in_documents



class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: `norm(x) * (1 + w)` in float32, cast back after the multiply.

    Through torch's `rms_norm` (autocast off, so float32 whatever autocast's policy), which keeps
    only its input and one rstd per row for the backward, not a float32 copy of the output.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = F.rms_norm(x.float(), self.weight.shape, 1.0 + self.weight.float(), self.eps)
        return y.type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """`x` in autocast's dtype when autocast is on, else as is. Autocast would cast it the same
    way inside each projection, but each projection then keeps its own copy for the backward."""
    return x.to(compute_dtype(x))


def rotary_tables(config: Qwen35Config, position_ids: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[B, T, rotary_dim]` for text positions `[B, T]` or M-RoPE positions `[3, B, T]`.

    M-RoPE gives frequency i to axis (t, h, w) interleaved: i % 3 == 1 reads the height row and
    i % 3 == 2 the width row within their `mrope_section` spans, the rest the temporal row. For
    text all three rows are equal and this is plain RoPE.
    """
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=position_ids.device).float() / dim))
    if position_ids.ndim == 2:
        position_ids = position_ids[None].expand(3, -1, -1)
    freqs = position_ids[..., None].float() * inv_freq  # [3, B, T, dim/2]
    axis = torch.zeros(dim // 2, dtype=torch.long, device=position_ids.device)
    for a in (1, 2):
        axis[a : 3 * config.mrope_section[a] : 3] = a
    freqs = freqs.gather(0, axis.expand(1, *freqs.shape[1:]))[0]  # [B, T, dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x_BTHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first `rotary_dim` channels of each head (half-split layout); the rest pass."""
    dim = cos.shape[-1]
    rot, rest = x_BTHD[..., :dim], x_BTHD[..., dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class GatedAttention(nn.Module):
    """Softmax attention with an output gate: `o_proj(attn * sigmoid(gate))`.

    q_proj yields query and gate interleaved per head (`[.., H, 2 * D]`, query first); q and k
    get per-head (1+w) RMSNorms before partial RoPE; GQA.
    """

    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, inner = config.hidden_size, config.num_attention_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, 2 * inner, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x_BTD, rotary, cu_seqlens=None, cache=None, cache_slots=None, cache_lengths=None):
        batch, length, _ = x_BTD.shape
        q, gate = self.q_proj(x_BTD).view(batch, length, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        k = self.k_proj(x_BTD).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_BTD).view(batch, length, self.num_kv_heads, self.head_dim)
        q = apply_rotary(self.q_norm(q), *rotary)
        k = apply_rotary(self.k_norm(k), *rotary)
        if cache is not None:
            sequence, position = cache_slots
            cache.keys[sequence, position] = k.reshape(-1, self.num_kv_heads, self.head_dim)
            cache.values[sequence, position] = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if cache is not None and cu_seqlens is None:
            out = ops.cached_attention(q, cache.keys, cache.values, cache_lengths)
        else:
            out = self.attend(q, k, v, cu_seqlens)
        out = out * torch.sigmoid(gate)
        return self.o_proj(out.reshape(batch, length, -1))

    def attend(self, q, k, v, cu_seqlens=None):
        """The one step that mixes tokens; everything around it acts on each token alone. Each
        query head reads only its kv head (`h // (H // Hkv)`), so any whole group of kv heads with
        their query heads runs the same way."""
        return ops.causal_attention(q, k, v, cu_seqlens)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: a token mixer (GDN or gated attention), then the MLP."""

    def __init__(self, config: Qwen35Config, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = GatedAttention(config)
        self.is_moe = config.num_experts > 0
        self.mlp = SparseMoeBlock(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rotary, cu_seqlens=None, cache=None, cache_slots=None, cache_lengths=None):
        """The layer's output and, for an MoE layer, its router logits `[B*T, E]` (else None).

        The logits are returned, not collected on the side, so that whatever wraps the layer sees
        every tensor that leaves it: FSDP unshards a layer's weights for the backward when a
        gradient reaches one of its outputs, and the balancing loss's gradient reaches the router
        through the logits."""
        h = autocast_input(self.input_layernorm(x))
        if self.layer_type == "linear_attention":
            h = self.linear_attn(h, cu_seqlens, cache)
        else:
            h = self.self_attn(h, rotary, cu_seqlens, cache, cache_slots, cache_lengths)
        x = x + h
        if not self.is_moe:
            return x + self.mlp(autocast_input(self.post_attention_layernorm(x))), None
        # not cast here: the MoE block sums its experts' outputs in the dtype of its input
        h, logits = self.mlp(self.post_attention_layernorm(x))
        return x + h, logits


class Qwen35Model(nn.Module):
    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, kind) for kind in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, cache: InferenceCache | None = None,
                router_logits: list | None = None, inputs_embeds=None):
        """`inputs_embeds [B, T, D]`, when given, replaces the embedding of `input_ids` (the
        vision-language model's, with media features in the pad tokens' places)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        if cu_seqlens is not None and batch != 1:
            raise ValueError(f"a packed row (cu_seqlens) must be passed as a batch of one, got batch {batch}")
        slots = None
        if cache is not None:
            slots = cache.slots(length, cu_seqlens)
            if position_ids is None:
                position_ids = slots[1].view(batch, length)  # each sequence continues where it stopped
        if position_ids is None:
            if cu_seqlens is not None:
                position_ids = positions_in_documents(cu_seqlens, length)[None]
            else:
                position_ids = torch.arange(length, device=x.device)[None].expand(batch, -1)
        rotary = rotary_tables(self.config, position_ids, x.dtype)
        lengths_after = None if cache is None else cache.lengths + length
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            x, logits = layer(x, rotary, cu_seqlens, layer_cache, slots, lengths_after)
            if router_logits is not None and logits is not None:
                router_logits.append(logits)
        if cache is not None:
            cache.advance(length, cu_seqlens)
        return self.norm(x)


def next_token_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The target of each position: the next label, -100 at a row's or a document's end."""
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    if cu_seqlens is not None:
        next_starts = F.pad(document_starts(cu_seqlens, labels.shape[1])[1:], (0, 1), value=True)
        targets = targets.masked_fill(next_starts[None], IGNORE_INDEX)
    return targets


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None = None  # [B, T, V]; not computed when labels are given
    loss: torch.Tensor | None = None  # mean over the loss tokens
    loss_sum: torch.Tensor | None = None
    num_loss_tokens: torch.Tensor | None = None
    router: RouterStats | None = None  # MoE: `loss` includes router_aux_loss_coef * router.aux_loss


def causal_lm_output(config: Qwen35Config, hidden, lm_head: nn.Linear, labels=None, cu_seqlens=None,
                     router_logits: list | None = None) -> CausalLMOutput:
    """Logits of the final hidden states, or with `labels` the loss (see `Qwen35ForCausalLM`)."""
    if labels is None:
        return CausalLMOutput(logits=lm_head(hidden))
    return causal_lm_loss(config, lm_head, hidden, next_token_targets(labels, cu_seqlens), router_logits)


def causal_lm_loss(config: Qwen35Config, lm_head: nn.Linear, hidden_BTD, targets_BT,
                   router_logits: list | None = None) -> CausalLMOutput:
    """The summed and mean token loss of the head over `hidden_BTD` against (already shifted)
    targets; for MoE, plus the router's auxiliary loss over `router_logits` (one tensor a layer)."""
    loss_sum = ops.linear_cross_entropy(hidden_BTD.flatten(0, 1), lm_head.weight, targets_BT.flatten())
    count = (targets_BT != IGNORE_INDEX).sum()
    out = CausalLMOutput(loss=loss_sum / count.clamp(min=1), loss_sum=loss_sum, num_loss_tokens=count)
    if router_logits:
        out.router = router_stats(router_logits, config.num_experts_per_tok)
        out.loss = out.loss + config.router_aux_loss_coef * out.router.aux_loss
    return out


class Qwen35ForCausalLM(nn.Module):
    def __init__(self, config: Qwen35Config):
        super().__init__()
        self.config = config
        self.model = Qwen35Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Small sizes share the embedding with the output head (again after `to_empty`)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, labels=None, cache=None, head=None):
        """Logits, or with `labels` (transformers' convention: aligned with `input_ids`, -100 for
        no loss, shifted here) the loss, computed in chunks so full logits never exist at once.

        In a packed row a document's first token is never a target of the token before it.

        `head(hidden_BTD, lm_head)`, when given, replaces both and its result is returned (GRPO's
        per-token log-probs, `qwen35.rl.logprobs`): it runs inside this forward, where FSDP has
        gathered the head's weight and an adapter on the head takes part.
        """
        router_logits = [] if self.config.num_experts and labels is not None else None
        hidden = self.model(input_ids, position_ids, cu_seqlens, cache, router_logits)
        if head is not None:
            return head(hidden, self.lm_head)
        return causal_lm_output(self.config, hidden, self.lm_head, labels, cu_seqlens, router_logits)

    def loss(self, hidden_BTD, targets_BT, router_logits: list | None = None) -> CausalLMOutput:
        """The loss of the head over `hidden_BTD` against (already shifted) targets (see
        `causal_lm_loss`)."""
        return causal_lm_loss(self.config, self.lm_head, hidden_BTD, targets_BT, router_logits)

    # --- construction ---------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' initialisation; works after meta construction and `to_empty`."""
        std = self.config.initializer_range
        for module in self.modules():
            if module is self.lm_head and self.config.tie_word_embeddings:
                continue  # drawn as the embedding
            if isinstance(module, (nn.Linear, nn.Conv1d, Router)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
                nn.init.normal_(module.down_proj, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, (RMSNorm, GatedRMSNorm, GatedDeltaNet)):
                module.reset_parameters()

    def fp32_parameter_names(self) -> list[str]:
        """Parameters that stay float32 whatever the compute dtype (stored so in checkpoints)."""
        return [n for n, _ in self.named_parameters() if n.endswith(("linear_attn.A_log", "linear_attn.norm.weight"))]

    def to_compute_dtype(self, dtype: torch.dtype) -> Qwen35ForCausalLM:
        """Casts to `dtype`, keeping the float32 parameters float32."""
        keep = set(self.fp32_parameter_names())
        for name, param in self.named_parameters():
            param.data = param.data.to(torch.float32 if name in keep else dtype)
        return self

    @classmethod
    def from_config(cls, config: Qwen35Config, device=None, dtype=torch.float32) -> Qwen35ForCausalLM:
        """A random-initialised model (presets, benchmarks, tests)."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device or "cpu")
        model.tie_weights()
        model.init_weights()
        return model.to_compute_dtype(dtype)

    @classmethod
    def from_pretrained(cls, model_dir, dtype: torch.dtype | None = None, device=None) -> Qwen35ForCausalLM:
        """Loads a HF model directory (see `qwen35.checkpoint.hf.load_pretrained`)."""
        from qwen35.checkpoint.hf import load_pretrained

        return load_pretrained(cls, model_dir, dtype=dtype, device=device)

    def save_pretrained(self, output_dir, max_shard_bytes: int = 5 * 2**30) -> None:
        from qwen35.checkpoint.hf import save_pretrained

        save_pretrained(self, output_dir, max_shard_bytes=max_shard_bytes)

    def generate(self, input_ids, **kwargs):
        from qwen35.generate import generate

        return generate(self, input_ids, **kwargs)
