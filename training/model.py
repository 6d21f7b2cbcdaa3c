"""The denoising network: a compact three-level U-Net that predicts the noise, not the image.

Why this shape: the budget is a 6248x4176 frame in 40 s on two CPU cores (about 50 k
multiply-accumulates per pixel at most). A U-Net with 16/32/64 channels costs about 24 k MAC/px
and sees about 40 px around each pixel, enough for stars and small-scale nebula texture; the
coarse levels see the large-scale structure cheaply. Predicting the residual (noise) lets bright
stars pass through almost untouched, as the noise to remove is about 1 everywhere in GAT units.

Contract (what ``subwatch`` relies on; the ONNX export carries it):
input ``[N, 2, H, W]`` float32 = (GAT(x) - c, noise-std map), output ``[N, 1, H, W]`` = the
denoised channel 0 in the same units; H and W multiples of ``MULTIPLE_OF``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MULTIPLE_OF = 4  # two 2x poolings
INPUT_SCALE = 10.0  # GAT units are divided by this inside the graph, and multiplied back


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.ReLU(inplace=True),
    )


def _residual(x: torch.Tensor, noise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The contract around any body: the GAT image scaled down (and the noise map) in, the
    body's predicted noise scaled back up and subtracted from the input."""
    z = x[:, 0:1]
    return z - INPUT_SCALE * noise(torch.cat([z / INPUT_SCALE, x[:, 1:2]], dim=1))


class UNet(nn.Module):
    """Three-level U-Net, ``width`` channels at full resolution, doubling per level."""

    multiple_of = MULTIPLE_OF

    def __init__(self, width: int = 16, inputs: int = 2, outputs: int = 1) -> None:
        super().__init__()
        c = width
        self.enc1 = _block(inputs, c)
        self.enc2 = _block(c, 2 * c)
        self.mid = _block(2 * c, 4 * c)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = _block(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = _block(2 * c, c)
        self.head = nn.Conv2d(c, outputs, 1)

    def features(self, a: torch.Tensor) -> torch.Tensor:
        """The U-Net proper: scaled inputs in, predicted noise out."""
        e1 = self.enc1(a)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _residual(x, self.features)


class ShuffleUNet(nn.Module):
    """The same U-Net at half resolution: each 2x2 block of pixels becomes 4 channels.

    Why: a convolution costs per position, so at half resolution a layer costs a quarter per
    pixel, and the receptive field doubles (88 px). With ``width`` 16 it has the shipped
    U-Net's parameter count at a quarter of its multiply-adds (6.3 k MAC/px); width 24 has
    2.3 times the parameters at 14 k MAC/px. Measured on this machine with onnxruntime
    (2 threads, 488x488 tiles, random weights): U-Net 16 0.89-1.14 us/px, shuffled 24
    0.61-0.77, shuffled 16 0.27-0.36 (docs/decisions.md).
    """

    multiple_of = 2 * MULTIPLE_OF

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.inner = UNet(width, inputs=8, outputs=4)
        self.down = nn.PixelUnshuffle(2)
        self.up = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _residual(x, lambda a: self.up(self.inner.features(self.down(a))))


ARCHITECTURES = {"unet": UNet, "shuffle": ShuffleUNet}


def build(arch: str = "unet", width: int = 16) -> nn.Module:
    """The network of a checkpoint: its architecture's name and width."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](width)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs_per_pixel(model: nn.Module, size: int = 64) -> float:
    """Multiply-accumulates per input pixel of the convolutions, counted with forward hooks."""
    total = 0

    def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            total += out.numel() * mod.in_channels * k // mod.groups
        elif isinstance(mod, nn.ConvTranspose2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            inp = _inp[0]
            total += inp.numel() * mod.out_channels * k

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 2, size, size))
    for h in handles:
        h.remove()
    return total / (size * size)


def receptive_field(model: nn.Module, size: int = 128) -> int:
    """Width (px) of the input region that influences one output pixel, found by autograd.

    The inputs look like the network's own (noise of a few GAT units, a noise map of 1) and
    come from a fixed seed, a batch of eight: on inputs unlike its training data (a noise map
    drawn from N(0, 1)) a trained network can have every ReLU on the path to a pixel shut, and
    the gradient then says nothing about how far it reaches.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, size, size, generator=gen) * 3.0
    x[:, 1] = 1.0
    x.requires_grad_(True)
    out = model(x)
    out[:, 0, size // 2, size // 2].sum().backward()
    assert x.grad is not None
    g = x.grad.abs().sum(dim=(0, 1))
    g[size // 2, size // 2] = 0.0  # the residual path's own pixel
    cols = torch.nonzero(g.sum(dim=0) > 0).flatten()
    rows = torch.nonzero(g.sum(dim=1) > 0).flatten()
    if cols.numel() == 0:
        raise RuntimeError("the output pixel depends on no other input pixel: a dead network")
    return int(max(cols.max() - cols.min(), rows.max() - rows.min()) + 1)
