"""Model FLOPs and MFU (model FLOPs utilisation) for the training loop.

FLOPs are counted, not estimated: one forward + backward of a (1, T) sequence under
``torch.utils.flop_counter`` on the current model, so factorized layers and frozen bases (ReLoRA,
WeLore: no weight gradients) are counted as they run. Attention follows the PaLM convention used for
MFU: 4·T·d per token and layer forward (QKᵀ and AV over all T keys), twice that backward, no
recomputation, the same on every device (the CPU kernels have no formula in torch).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten

# dense bf16 tensor-core peak per GPU (vendor datasheets, no sparsity), FLOP/s
PEAK_BF16_FLOPS = {
    "H200": 989.4e12, "H100 NVL": 835.0e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "GH200": 989.4e12,
    "A100": 312.0e12, "L40S": 362.1e12, "L4": 121.0e12, "A10G": 70.0e12, "A10": 125.0e12, "V100": 125.0e12,
}


def device_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of ``device``: ``override_tflops`` if given, else from the GPU's name; None on CPU
    or for an unknown GPU (then no MFU is reported)."""
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # most specific name first
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def _sdpa_fwd(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_mapping() -> dict:
    fwd = ["_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"]
    out = {}
    for name in fwd:
        for op, fn in ((name, _sdpa_fwd), (name + "_backward", _sdpa_bwd)):
            if hasattr(aten, op):
                out[getattr(aten, op)] = fn
    return out


def train_flops(model: nn.Module, example: torch.Tensor, device: torch.device) -> float:
    """FLOPs of one training step (forward + backward) on ``example``, SDPA attention counted as in
    ``sdpa_flop_count``. Runs in eval mode inside a forked RNG (no dropout draws) and clears the gradients it
    made, so the training run is unchanged."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_attention_mapping())
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), counter:
            out = model(example)
            (out if isinstance(out, torch.Tensor) else out[0]).float().sum().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return float(counter.get_total_flops())


def train_flops_per_token(model: nn.Module, block_size: int, device: torch.device) -> float:
    """FLOPs of one training token (forward + backward at sequence length ``block_size``).
    model: idx (1, T) -> logits (1, T, vocab)."""
    idx = torch.zeros(1, block_size, dtype=torch.long, device=device)
    return train_flops(model, idx, device) / block_size


def mfu(model_flops: float, seconds: float, peak_flops: float | None, world: int = 1) -> float | None:
    """Achieved model FLOP/s over ``world`` devices as a fraction of their peak (None without a peak)."""
    if peak_flops is None or seconds <= 0:
        return None
    return model_flops / seconds / (peak_flops * world)
