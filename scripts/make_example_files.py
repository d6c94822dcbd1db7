"""Writes the README walkthrough's inputs: resnet18.pt (a state_dict trained briefly on digits) and
digits.npz (scikit-learn's bundled digits as 3x32x32 tensors). Run with the ModelPress venv's python."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torchvision
from sklearn.datasets import load_digits


def digits_tensors(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.repeat(1, 3, 1, 1), torch.tensor(digits.target, dtype=torch.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (0: random weights)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    inputs, labels = digits_tensors()
    np.savez(args.out / "digits.npz", inputs=inputs.numpy(), labels=labels.numpy())
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(args.epochs):
        for start in range(0, len(inputs), 64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(inputs[start:start + 64]), labels[start:start + 64])
            loss.backward()
            optimizer.step()
    torch.save(model.eval().state_dict(), args.out / "resnet18.pt")
    print(f"wrote {args.out / 'resnet18.pt'} and {args.out / 'digits.npz'} ({len(inputs)} samples)")


if __name__ == "__main__":
    main()
