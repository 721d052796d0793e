"""The Qwen3.5 vision tower, single device: image and video patches in, language-width tokens out.

Input is what the processor returns: `pixel_values [N, C * Tp * P * P]`, one row per patch of
`temporal_patch_size` frames x `patch_size`² pixels, all images (or videos) of a batch
concatenated, and `grid_thw [num_media, 3]`, each medium's grid of patches (frames / Tp,
height / P, width / P). Within a frame the patches come in 2x2 merge-block order (the four
patches of a block are contiguous), so the merger is a plain reshape.

The tower: a linear patch embedding (transformers' Conv3d, whose kernel equals its stride), a
learned position table bilinearly resampled to each grid, 2-D rotary, pre-norm ViT blocks whose
attention stays within one frame, and a 2x2 patch merger to the language width. Parameter names
are transformers' (`model.visual.*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35 import ops
from qwen35.model.config import VisionConfig
from qwen35.model.model import apply_rotary


def frame_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """cu_seqlens over the patches, one segment per frame of every medium (int32 `[F + 1]`).

    Attention never crosses a frame: a video's frames see each other only through the language
    model (transformers does the same).
    """
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(per_frame.cumsum(0), (1, 0)).to(torch.int32)


def merge_order(h: int, w: int, merge: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each patch of an `h x w` frame in the processor's merge-block order."""
    rows = torch.arange(h, device=device).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
    cols = torch.arange(w, device=device).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
    # block row, block column, row in block, column in block
    return rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x_ND, rotary, cu_seqlens):
        q, k, v = self.qkv(x_ND).view(1, x_ND.shape[0], 3, self.num_heads, -1).unbind(2)
        # rotary in float32 over the whole head, as transformers does
        q, k = (apply_rotary(t.float(), *rotary).type_as(v) for t in (q, k))
        out = ops.causal_attention(q, k, v, cu_seqlens, causal=False)
        return self.proj(out.reshape(x_ND.shape))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x_ND, rotary, cu_seqlens):
        x_ND = x_ND + self.attn(self.norm1(x_ND), rotary, cu_seqlens)
        return x_ND + self.mlp(self.norm2(x_ND))


class PatchEmbed(nn.Module):
    """transformers' Conv3d with kernel == stride over one patch: a linear map of the flat patch
    (channel, frame, row, column order, as the processor flattens it). Kept as a Conv3d so the
    parameter has the checkpoint's shape `[D, C, Tp, P, P]`."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel, stride=kernel)

    def forward(self, pixels_NK):
        weight = self.proj.weight
        if pixels_NK.shape[-1] != weight[0].numel():
            raise ValueError(f"pixel_values rows have {pixels_NK.shape[-1]} values; this vision tower takes "
                             f"channels x temporal_patch_size x patch_size² = {weight[0].numel()}")
        return F.linear(pixels_NK.to(weight.dtype), weight.flatten(1), self.proj.bias)


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each 2x2 block's four patches concatenated through an MLP."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.merged = config.hidden_size * config.spatial_merge_size**2
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.linear_fc2 = nn.Linear(self.merged, config.out_hidden_size)

    def forward(self, x_ND):
        x = self.norm(x_ND).view(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, pixel_values, grid_thw):
        """`[sum(t * h * w) / merge², out_hidden_size]`: the tokens that replace the media pads,
        medium after medium."""
        grid_thw = grid_thw.long()
        if (grid_thw[:, 1:] % self.config.spatial_merge_size).any():
            raise ValueError(f"grid_thw {grid_thw.tolist()}: heights and widths must be multiples of the "
                             f"{self.config.spatial_merge_size}x{self.config.spatial_merge_size} merge")
        x = self.patch_embed(pixel_values)
        if x.shape[0] != int(grid_thw.prod(-1).sum()):
            raise ValueError(f"pixel_values has {x.shape[0]} patches but the grids (grid_thw) "
                             f"describe {int(grid_thw.prod(-1).sum())}")
        x = x + self.position_embeddings(grid_thw).to(x.dtype)
        rotary = self.rotary_tables(grid_thw)
        cu_seqlens = frame_seqlens(grid_thw)
        for block in self.blocks:
            x = block(x, rotary, cu_seqlens)
        return self.merger(x)

    def position_embeddings(self, grid_thw) -> torch.Tensor:
        """The learned `side x side` table resampled to each grid (bilinear, corners aligned),
        in merge-block order, repeated for every frame."""
        side = int(self.config.num_position_embeddings**0.5)
        table = self.pos_embed.weight.t().reshape(1, -1, side, side)
        out = []
        for t, h, w in grid_thw.tolist():
            grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]  # [D, h, w]
            rows, cols = merge_order(h, w, self.config.spatial_merge_size, grid.device)
            out.append(grid[:, rows, cols].t().repeat(t, 1))
        return torch.cat(out)

    def rotary_tables(self, grid_thw) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[1, N, head_dim]` of the 2-D rotary: a quarter of the head's frequencies
        turn with the patch row, the next quarter with the column, the second half repeats."""
        head_dim = self.config.hidden_size // self.config.num_heads
        device = grid_thw.device
        inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, head_dim // 2, 2, device=device).float() / (head_dim // 2))
        rows, cols = [], []
        for t, h, w in grid_thw.tolist():
            r, c = merge_order(h, w, self.config.spatial_merge_size, device)
            rows.append(r.repeat(t))
            cols.append(c.repeat(t))
        angles = torch.cat([torch.cat(rows)[:, None] * inv_freq, torch.cat(cols)[:, None] * inv_freq], dim=-1)
        emb = torch.cat([angles, angles], dim=-1)[None]
        return emb.cos(), emb.sin()

    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' initialisation: normal weights, zero biases, unit layer norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv3d, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
