"""Depthwise causal conv1d with SiLU, torch reference.

x `[B, T, C]` (channels last, as the projections produce it), weight `[C, K]`. Output t is
`silu(sum_j weight[:, K-1-j] * x[t-j])` over the taps j that stay inside t's document. The conv
state is the last K-1 inputs of each sequence `[B or N, C, K-1]` (transformers' layout), zero
where a document is shorter; passing it back in as `initial_state` continues the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen35.ops.segments import positions_in_documents, split_documents


def causal_conv1d(x, weight, cu_seqlens=None, initial_state=None, output_final_state=False):
    """The op behind the seam. With `cu_seqlens` (packed, `B == 1`) states are per document."""
    taps = weight.shape[1]
    if cu_seqlens is None:
        history = x.new_zeros(x.shape[0], taps - 1, x.shape[2]) if initial_state is None else initial_state.transpose(1, 2).to(x.dtype)
        full = torch.cat([history, x], dim=1)
        out = F.conv1d(full.transpose(1, 2), weight.unsqueeze(1).to(x.dtype), groups=weight.shape[0])
        final = full[:, -(taps - 1):].transpose(1, 2).contiguous() if output_final_state else None
        return F.silu(out.transpose(1, 2)), final

    assert x.shape[0] == 1, "packed rows (cu_seqlens) are passed as a batch of one"
    assert initial_state is None, "a packed row starts every document from an empty window"
    length = x.shape[1]
    position = positions_in_documents(cu_seqlens, length)
    padded = F.pad(x, (0, 0, taps - 1, 0))
    out = 0
    for j in range(taps):  # tap j reads x[t - j]; it is cut where t - j leaves t's document
        shifted = padded[:, taps - 1 - j : taps - 1 - j + length]
        keep = (position >= j).to(x.dtype)[None, :, None]
        out = out + shifted * keep * weight[:, taps - 1 - j]
    final = None
    if output_final_state:
        final = torch.stack([
            F.pad(x[0, max(start, end - taps + 1) : end], (0, 0, taps - 1 - min(end - start, taps - 1), 0)).T
            for start, end in split_documents(cu_seqlens)
        ])
    return F.silu(out), final


def causal_conv1d_step_(x, weight, state):
    """One decoding step (T == 1) of a plain batch: x `[B, 1, C]`, the window `state` `[B, C, K-1]`
    shifted in place to end at x; returns `silu(conv)` `[B, 1, C]`. In place, like the delta
    rule's step, so that a decoder keeps one window buffer per sequence (and a CUDA graph owns it).
    Products and sum in float32, as a conv kernel accumulates."""
    window = torch.cat([state, x.transpose(1, 2).to(state.dtype)], dim=-1)  # [B, C, K]
    out = (window.float() * weight.float()).sum(-1).to(x.dtype)
    state.copy_(window[..., 1:])
    return F.silu(out)[:, None]

