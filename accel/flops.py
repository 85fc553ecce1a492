"""FLOP counting with ``torch.utils.flop_counter``, including attention on the CPU.

PyTorch's counter has formulas for the CUDA SDPA kernels but not for the CPU flash kernel
(``_scaled_dot_product_flash_attention_for_cpu``), so on a CPU it silently drops every attention
product; registering the same formula for it makes CPU and CUDA counts agree."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_registered = False


def register_cpu_sdpa() -> None:
    """Give torch's FLOP counter the CPU flash-attention kernel (once); every FlopCounterMode counts it then,
    Lightning's model summary too."""
    global _registered
    if _registered or _CPU_SDPA is None:
        return
    from torch.utils.flop_counter import flop_registry
    if _CPU_SDPA.default not in flop_registry and _CPU_SDPA not in flop_registry:
        @register_flop_formula(_CPU_SDPA)
        def _cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query, key, value)
    _registered = True


def count_flops(model: nn.Module, images: torch.Tensor) -> int:
    """Forward FLOPs (multiply and add counted separately) of ``model(images)`` in eval mode."""
    register_cpu_sdpa()
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(images)
    finally:
        model.train(was_training)
    return counter.get_total_flops()
