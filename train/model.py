"""The classic UNet (Ronneberger et al., 2015) with configurable width, depth and normalisation.

The constructor's keyword arguments are the model config stored in the spec, so
``UNet(**spec.model)`` rebuilds the network. It outputs logits; activation belongs to the
loss and to inference. Convolutions are padded ("same"), unlike the paper's valid
convolutions, so the output has the input's size and no cropping is needed.
"""

from __future__ import annotations

import torch
from torch import nn

NORMS = ("none", "batch", "instance", "group")


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, ch), ch)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) twice."""

    def __init__(self, cin: int, cout: int, norm: str):
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias),
            _norm(norm, cout),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Upsample x2 (transposed conv, or bilinear + 1x1 conv), concatenate the skip, DoubleConv."""

    def __init__(self, cin: int, cout: int, norm: str, bilinear: bool):
        super().__init__()
        if bilinear:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(cin, cin // 2, 1),
            )
        else:
            self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = DoubleConv(cin // 2 + cout, cout, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Encoder-decoder with skip connections by concatenation and a 1x1 output conv.

    Args:
        in_channels: 1, or 2k+1 for k context slices on each side.
        classes: 3 (background/liver/tumour, softmax) or 1 (binary, sigmoid).
        base_width: channels of the first level (64 in the paper; 16-24 for the edge).
        depth: number of 2x2 max-pool downsamplings (4 in the paper).
        norm: "none", "batch", "instance" or "group".
        bilinear: bilinear upsampling + 1x1 conv instead of 2x2 transposed convolutions.
    """

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 3,
        base_width: int = 64,
        depth: int = 4,
        norm: str = "batch",
        bilinear: bool = False,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if depth < 1 or base_width < 1 or in_channels < 1 or classes < 1:
            raise ValueError("depth, base_width, in_channels and classes must be positive")
        self.config = dict(
            in_channels=in_channels, classes=classes, base_width=base_width, depth=depth, norm=norm, bilinear=bilinear
        )
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0], norm)
        self.down = nn.ModuleList(DoubleConv(widths[i], widths[i + 1], norm) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], norm, bilinear) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(widths[0], classes, 1)

    @property
    def multiple(self) -> int:
        return 2 ** self.config["depth"]

    def check_input_size(self, h: int, w: int) -> None:
        """Raise a ValueError naming the nearest valid size when h or w is not a multiple of 2**depth."""
        m = self.multiple
        bad = [s for s in (h, w) if s % m]
        if bad:
            near = [max(m, round(s / m) * m) for s in (h, w)]
            raise ValueError(
                f"input size {h}x{w} is not divisible by 2**depth = {m}; "
                f"use {near[0]}x{near[1]} (the nearest valid size)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()):
            self.check_input_size(int(x.shape[-2]), int(x.shape[-1]))
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(self.pool(skips[-1])))
        y = skips.pop()
        for up in self.up:
            y = up(y, skips.pop())
        return self.outc(y)


def count_flops(config: dict, height: int, width: int) -> int:
    """Multiply-accumulates x2 of one forward pass on one slice (convolutions only)."""
    c = dict(config)
    widths = [c["base_width"] * 2**i for i in range(c["depth"] + 1)]
    flops = 0

    def conv(cin: int, cout: int, k: int, h: int, w: int) -> int:
        return 2 * cin * cout * k * k * h * w

    h, w = height, width
    flops += conv(c["in_channels"], widths[0], 3, h, w) + conv(widths[0], widths[0], 3, h, w)
    for i in range(c["depth"]):
        h, w = h // 2, w // 2
        flops += conv(widths[i], widths[i + 1], 3, h, w) + conv(widths[i + 1], widths[i + 1], 3, h, w)
    for i in reversed(range(c["depth"])):
        cin = widths[i + 1]
        if c["bilinear"]:
            flops += conv(cin, cin // 2, 1, 2 * h, 2 * w)
        else:  # 2x2 transposed conv, stride 2: each input pixel feeds a 2x2 output patch
            flops += 2 * cin * (cin // 2) * 4 * h * w
        h, w = 2 * h, 2 * w
        flops += conv(cin // 2 + widths[i], widths[i], 3, h, w) + conv(widths[i], widths[i], 3, h, w)
    flops += conv(widths[0], c["classes"], 1, h, w)
    return flops
