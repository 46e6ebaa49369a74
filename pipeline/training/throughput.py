"""Model FLOPs utilisation: the device's peak and the model's FLOPs per token, both constants of
a run, computed once at setup; `Throughput.mfu` turns each step's tokens/s into MFU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense (no sparsity) bf16 tensor-core peak FLOP/s from NVIDIA's data sheets, matched in order
# against torch.cuda.get_device_name(); the first matching substring wins.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),  # SXM
    ("H800", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362.05e12),
    ("L40", 181.05e12),
    ("L4", 121.0e12),
    ("A6000", 154.8e12),
    ("A10G", 70.0e12),
    ("A10", 125.0e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71.0e12),
]


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device: the override, else the table above, else None (CPU
    or an unknown GPU, for which MFU is not reported)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def mfu(
    flops_per_token: float, tokens_per_s: float, peak: float | None, devices: int
) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over devices · peak (PaLM,
    Chowdhery et al. 2022, appendix B). None when the peak is unknown."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s / (peak * devices)


@dataclass(frozen=True)
class Throughput:
    """The constants of a run's MFU."""

    flops_per_token: int
    """Training FLOPs per token (pipeline.model.GPT.flops_per_token at the run's block_size)."""
    peak: float | None
    """Peak bf16 FLOP/s of one device (peak_flops); None: MFU is not reported."""
    devices: int
    """Processes (one device each) sharing the work."""

    def mfu(self, tokens_per_s: float) -> float | None:
        """MFU of the whole job at tokens_per_s (all processes together); None without a peak."""
        return mfu(self.flops_per_token, tokens_per_s, self.peak, self.devices)
