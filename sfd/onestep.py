"""The one-step generator and the precision it runs in: what training, evaluation, export and sampling share.

G(z, c) = D_theta(sigma_init z, sigma_init, c) (SFD.md section 3); ``bf16`` / ``fp16`` autocast the network
passes where a run asks for them ('auto': bf16 where the device has native bf16 kernels).
"""
from __future__ import annotations

import torch

from .denoisers import Denoiser

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device) -> bool:
    """Whether ``device`` runs bf16 matrix/convolution kernels natively (CUDA with bf16 support; a CPU
    with AVX512-BF16 or AMX, which oneDNN uses): there bf16 autocast is faster, elsewhere emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device) -> str:
    """``auto`` -> ``bf16`` where the device has native bf16 kernels, else ``fp32``; others unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def one_step(generator: Denoiser, z: torch.Tensor, cond: torch.Tensor, sigma_init: float) -> torch.Tensor:
    """G(z, c) = D_theta(sigma_init z, sigma_init, c): the one-step generator (SFD.md section 3)."""
    return generator(z * sigma_init, sigma_init, cond)


def autocast_call(net, device, precision: str):
    """``net`` called under autocast in ``precision`` ('fp32': ``net`` itself)."""
    if precision == "fp32":
        return net
    dtype = DTYPES[precision]

    def call(*args):
        with torch.autocast(torch.device(device).type, dtype=dtype):
            return net(*args)
    return call
