"""Model FLOPs utilisation (MFU) = achieved model FLOP/s ÷ the device's peak FLOP/s.

Achieved FLOP/s = tokens/s × FLOPs per token, where a training token costs 6·N (forward 2·N,
backward 4·N; N = parameters without embeddings) plus attention 12·L·T·d (PaLM, Chowdhery et
al. 2022, appendix B; the same count as nanoGPT's ``estimate_mfu``). See
``zerotune.models.gpt.flops_per_token``.

Peak FLOP/s: dense bf16 tensor-core figures from the vendors' data sheets for known GPUs
(the table below); on a CPU, or a GPU not in the table, the peak is *measured* once with a
large fp32 (CPU) or bf16 (GPU) matrix multiply, so MFU there is relative to achievable
matmul throughput, not a data-sheet number.
"""

from __future__ import annotations

import time

import torch

# dense (no sparsity) bf16 peak FLOP/s, from NVIDIA data sheets
PEAK_BF16 = {
    "H100 SXM": 989.4e12,
    "H100 NVL": 835.5e12,
    "H100 PCIe": 756.5e12,
    "H100": 989.4e12,  # HBM3 H100 parts report as "NVIDIA H100 80GB HBM3" (SXM)
    "H200": 989.4e12,
    "A100": 312e12,
    "L40S": 362.05e12,
    "L4": 121e12,
    "A10G": 70e12,
}

_measured: dict[str, float] = {}


def table_peak(name: str) -> float | None:
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_BF16[key]
    return None


def measured_peak(device: torch.device, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n×n matmul on ``device`` (fp32 on CPU, bf16 on GPU), best of ``repeats``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(device: torch.device) -> float:
    key = str(device)
    if key not in _measured:
        peak = table_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        _measured[key] = peak or measured_peak(device)
    return _measured[key]
