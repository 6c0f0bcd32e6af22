"""Device selection: CUDA (bf16-capable) when present, else CPU fp32."""

from __future__ import annotations

import torch


def select_device(preferred: str | None = None) -> torch.device:
    """`preferred` ('cpu', 'cuda', 'cuda:1') wins; otherwise CUDA when available."""
    if preferred:
        device = torch.device(preferred)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {preferred!r} requested but CUDA is not available on this worker")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
