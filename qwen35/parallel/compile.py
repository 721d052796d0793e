"""torch.compile, applied to a built model per decoder layer and per vision block (after
activation checkpointing, before FSDP), in place: parameter names and state-dict keys stay as
they were.

Compiling fuses the elementwise chains between the matmuls. fla's kernels are not traceable
(`chunk_gated_delta_rule` is `torch.compiler.disable`d by fla itself), so a GDN layer compiles
as a few graphs around them; attention layers compile whole.
"""

from __future__ import annotations

from torch import nn

from qwen35.parallel.checkpointing import decoder_layers, vision_blocks


def compile_layers(model: nn.Module, **compile_kwargs) -> nn.Module:
    """`torch.compile`s each decoder layer and each vision block in place (after checkpointing,
    before FSDP).

    Layers share their code, so one compiled graph per layer type serves all of them (dynamo
    treats the parameters as inputs). `compile_kwargs` go to `torch.compile` (e.g. backend).
    """
    for layer in [*decoder_layers(model), *vision_blocks(model)]:
        layer.compile(**compile_kwargs)
    return model
