"""Images as tensors: uint8 arrays in, normalised device-resident batches out, augmentation on the device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Images:
    images: np.ndarray  # uint8 [N, 32, 32, 3], HWC RGB
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray | slice) -> "Images":
        return Images(self.images[index], self.labels[index])


def to_device(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
              dtype: torch.dtype = torch.float32, channels_last: bool = False) -> Tensor:
    """uint8 HWC images -> normalised NCHW tensor on `device` (converted there, not on the host)."""
    images = np.ascontiguousarray(images)
    # arrays from Ray's object store are read-only: copy those rather than wrap them
    host = torch.from_numpy(images) if images.flags.writeable else torch.tensor(images)
    x = host.to(device).permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    x = ((x - m) / s).to(dtype)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random 32x32 crop of the zero-padded batch and random horizontal flip, all on the tensor's device."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(x.device)
              for _ in range(2))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    crops = padded[batch, chans, rows, cols]
    flip = torch.rand(n, generator=generator, device=generator.device).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)
