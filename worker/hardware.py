"""What accelerators this worker process can use (after CUDA_VISIBLE_DEVICES)."""

from __future__ import annotations


def gpu_inventory() -> tuple[int, str | None]:
    import torch

    if not torch.cuda.is_available():
        return 0, None
    return torch.cuda.device_count(), torch.cuda.get_device_name(0)
