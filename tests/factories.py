"""Small real models and datasets as upload-ready bytes (tests need torch; the app does not)."""

from __future__ import annotations

import io
import zipfile
from functools import lru_cache

import numpy as np


@lru_cache
def digits_arrays(n: int = 300, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, upsampled to 3 x size x size float32 in [0, 1]."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.repeat(1, 3, 1, 1).numpy(), digits.target[:n].astype(np.int64)


def digits_npz(n: int = 300, size: int = 32) -> bytes:
    inputs, labels = digits_arrays(n, size)
    buffer = io.BytesIO()
    np.savez(buffer, inputs=inputs, labels=labels)
    return buffer.getvalue()


def digits_imagefolder_zip(n: int = 60) -> bytes:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(n):
            image = Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).convert("RGB")
            png = io.BytesIO()
            image.save(png, format="PNG")
            archive.writestr(f"digits/{digits.target[i]}/{i}.png", png.getvalue())
    return buffer.getvalue()


def model_state(architecture: str = "mobilenet_v3_small", num_classes: int = 10) -> dict:
    import torch
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes).state_dict()


def safetensors_bytes(architecture: str = "mobilenet_v3_small", num_classes: int = 10) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in model_state(architecture, num_classes).items()})


def state_dict_pt_bytes(architecture: str = "mobilenet_v3_small", num_classes: int = 10) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(model_state(architecture, num_classes), buffer)
    return buffer.getvalue()


def pickled_module_bytes() -> bytes:
    import torch
    import torchvision

    buffer = io.BytesIO()
    torch.save(torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=10), buffer)
    return buffer.getvalue()


class _Payload:
    """A pickle that would create `marker` when unpickled unsafely."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def malicious_pickle_pt_bytes(marker: str) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"weight": _Payload(marker)}, buffer)
    return buffer.getvalue()


def exported_program_bytes(input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> bytes:
    import torch
    import torchvision

    model = torchvision.models.get_model("squeezenet1_1", weights=None, num_classes=10).eval()
    program = torch.export.export(model, (torch.randn(*input_shape),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


LOCAL_AUTH = {"Authorization": "Bearer mp-local-dev-key"}  # the documented dev/test key
