"""R(2+1)D-18: the video network of EchoNet-Dynamic, as the anchor that evim3's learning is measured against.

The architecture of torchvision's ``torchvision.models.video.r2plus1d_18`` (Tran et al. 2018), written here so
that the anchor needs no torchvision build matched to the installed torch (PyPI's torchvision wheels link
CUDA libraries, and a CPU torch cannot load them). Read top to bottom:

    clip (N, C, T, H, W)
      -> stem: (1x7x7 conv, stride 1x2x2) -> BN -> ReLU -> (3x1x1 conv) -> BN -> ReLU      64 channels
      -> 4 stages x 2 residual blocks, each conv a (2+1)D pair: 1x3x3 spatial, BN, ReLU, 3x1x1 temporal
         64, 128, 256, 512 channels; stages 2-4 halve time, height and width
      -> global average pool -> Linear 512 -> outputs

With 3 input channels and 400 outputs it has torchvision's 31,505,325 parameters (tests/test_r2plus1d.py).
EchoNet-Dynamic regresses EF with one output whose bias starts at the EF mean; ``R2Plus1D18EF`` does the
same in units of the EF spread, as evim3's own head (EF = ef_mean + ef_std * output).
"""

from __future__ import annotations

from torch import Tensor, nn

STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2


def _bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm3d(channels), nn.ReLU(inplace=True)]


class Conv2Plus1D(nn.Sequential):
    """A 3x3x3 convolution factorised into 1x3x3 (space) and 3x1x1 (time) with `mid` channels between."""

    def __init__(self, in_channels: int, out_channels: int, mid: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(in_channels, mid, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
            *_bn_relu(mid),
            nn.Conv3d(mid, out_channels, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0), bias=False),
        )


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        # torchvision's rule: as many parameters as a full 3x3x3 convolution from in_channels to channels.
        mid = (in_channels * channels * 27) // (in_channels * 9 + 3 * channels)
        self.conv1 = nn.Sequential(Conv2Plus1D(in_channels, channels, mid, stride), *_bn_relu(channels))
        self.conv2 = nn.Sequential(Conv2Plus1D(channels, channels, mid), nn.BatchNorm3d(channels))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv3d(in_channels, channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm3d(channels))

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + residual)


class R2Plus1D18(nn.Module):
    def __init__(self, in_channels: int = 3, num_outputs: int = 400):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, 45, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False), *_bn_relu(45),
            nn.Conv3d(45, STAGE_WIDTHS[0], (3, 1, 1), padding=(1, 0, 0), bias=False), *_bn_relu(STAGE_WIDTHS[0]),
        )
        stages, width = [], STAGE_WIDTHS[0]
        for i, channels in enumerate(STAGE_WIDTHS):
            blocks = [BasicBlock(width, channels, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(channels, channels) for _ in range(BLOCKS_PER_STAGE - 1)]
            stages.append(nn.Sequential(*blocks))
            width = channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(width, num_outputs)
        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, clip: Tensor) -> Tensor:
        """(N, C, T, H, W) -> (N, num_outputs)."""
        return self.fc(self.pool(self.stages(self.stem(clip))).flatten(1))


class R2Plus1D18EF(nn.Module):
    """EF regression on grayscale clips: EF = ef_mean + ef_std * network output (the output starts at 0)."""

    def __init__(self, ef_mean: float, ef_std: float = 1.0, in_channels: int = 1):
        super().__init__()
        self.net = R2Plus1D18(in_channels, num_outputs=1)
        self.ef_mean, self.ef_std = ef_mean, ef_std

    def forward(self, clip: Tensor) -> Tensor:
        return self.ef_mean + self.ef_std * self.net(clip)
