"""A long row through the gated delta rule slice by slice, each document's state carried over.

The delta rule is a recurrence, so a row can run as consecutive slices of at most S tokens, each
starting from the states the slice before it ended in: the same result up to rounding, but the
kernel's backward then works on one slice at a time. fla's chunked kernel rebuilds a
`[T / 64, Hv, Dk, Dv]` state history and its gradient in the backward, with its WY factors
and the value corrections: tens of GiB for the 0.8B at 512k tokens, a slice's share when sliced.

Packed rows: a slice border may cut a document. The document that runs across the border takes
its final state from the slice before as its initial state; every other document in a slice
starts from zero, as it does unsliced. Gradients flow back through the carried states.
"""

from __future__ import annotations

import bisect

import torch


def gated_delta_rule_in_slices(rule, q, k, v, g, beta, cu_seqlens, slice_tokens: int):
    """`rule(q, k, v, g, beta, cu_seqlens, initial_state, output_final_state)` (the seam's
    `gated_delta_rule`) over slices of at most `slice_tokens` tokens; returns o `[B, T, Hv, Dv]`."""
    length = q.shape[1]
    bounds = None if cu_seqlens is None else cu_seqlens.tolist()
    outputs, carry = [], None
    for start in range(0, length, slice_tokens):
        end = min(start + slice_tokens, length)
        piece = [x[:, start:end] for x in (q, k, v, g, beta)]
        if bounds is None:  # a plain batch: every sequence runs across every border
            local_cu, initial, runs_on = None, carry, end < length
        else:
            first = bisect.bisect_right(bounds, start) - 1  # the document holding `start`
            last = bisect.bisect_left(bounds, end) - 1  # the document holding `end - 1`
            cuts = [0, *(b - start for b in bounds[first + 1 : last + 1]), end - start]
            local_cu = torch.tensor(cuts, dtype=cu_seqlens.dtype).to(cu_seqlens.device)
            initial = None
            if carry is not None:  # the first document began in an earlier slice
                initial = torch.cat([carry[None], carry.new_zeros(len(cuts) - 2, *carry.shape)])
            runs_on = bounds[last + 1] > end
        o, final = rule(*piece, local_cu, initial, runs_on)
        outputs.append(o)
        carry = None if not runs_on else (final if bounds is None else final[-1])
    return torch.cat(outputs, dim=1)
