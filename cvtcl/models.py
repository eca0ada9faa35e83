"""Video encoders: backbone f (S3D or a tiny CPU stand-in) and projection head g (paper §2.1, §3.1).

An `Encoder` maps clips `x: [N, C, T, H, W]` to
  - `.features(x) -> [N, F]`: the globally pooled backbone output (F = 1024 for S3D), what the
    evaluation uses (the head is discarded there);
  - `.forward(x) -> [N, D]`: g(f(x)), L2-normalised (D = 128), what the contrastive losses use.
Several clips (two copies, M local segments) are folded into N by the caller and encoded in one
call. The encoder holds no training state; the momentum copy and the queue live in `cvtcl.moco`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

CHANNELS = {"rgb": 3, "flow": 2}  # rgb; flow x and y (preprocess/schema.py stores the same)
BACKBONES = ("s3d", "tiny")

# torchvision's S3D copies TensorFlow's BN momentum (0.001): running statistics would take ~1000s
# of steps to move away from their initial values, so evaluation in eval() mode (retrieval, linear
# probe) would see near-initial statistics. CoCLR's S3D uses PyTorch's default 0.1; so do we.
BN_MOMENTUM = 0.1


def _s3d_backbone(in_channels: int) -> tuple[nn.Module, int]:
    """torchvision S3D without weights, classifier removed; a new stem when `in_channels` != 3.

    The stem is the spatial half of the first separable conv (1x7x7, 3 -> 64); flow gets the same
    layer with 2 input channels (randomly initialised: there are no pretrained weights to adapt).
    Returns (module mapping [N, C, T, H, W] -> [N, 1024, T', H', W'], 1024).
    """
    s3d = torchvision.models.video.s3d(weights=None)
    features = s3d.features
    if in_channels != 3:
        old = features[0][0][0]
        features[0][0][0] = nn.Conv3d(
            in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
        )
    for module in features.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.momentum = BN_MOMENTUM
    return features, 1024


def _tiny_backbone(in_channels: int) -> tuple[nn.Module, int]:
    """A 4-layer 3D CNN (~0.6 M parameters with its head) for CPU tests and the demo. Not a research model.

    Same contract as S3D: [N, C, T, H, W] -> [N, 128, T', H', W'] with BatchNorm after every conv,
    so shuffle-BN and the BN-leak shortcut behave as they do with S3D.
    """
    widths = (in_channels, 32, 64, 96, 128)
    layers: list[nn.Module] = []
    for i in range(4):
        # The first layer keeps time (short clips: segments may be 2 frames); later ones halve it.
        stride = (1, 2, 2) if i == 0 else (2, 2, 2)
        layers += [
            nn.Conv3d(widths[i], widths[i + 1], kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm3d(widths[i + 1], momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers), widths[-1]


class Encoder(nn.Module):
    """f (backbone, global average pool) followed by g (F -> F, ReLU, F -> D) and L2 normalisation.

    `modality` fixes the input channels (rgb 3, flow 2). `channels_last_3d` stores weights (and
    expects inputs) in NDHWC, which lets cuDNN pick tensor-core kernels without layout transposes
    on some GPUs; measure it with benchmarks/train_speed.py before turning it on.
    """

    def __init__(self, modality: str, backbone: str = "s3d", embed_dim: int = 128, channels_last_3d: bool = False):
        super().__init__()
        if modality not in CHANNELS:
            raise ValueError(f"modality {modality!r}: choose one of {sorted(CHANNELS)}")
        if backbone not in BACKBONES:
            raise ValueError(f"backbone {backbone!r}: choose one of {BACKBONES}")
        self.modality, self.backbone_name, self.embed_dim = modality, backbone, embed_dim
        build = _s3d_backbone if backbone == "s3d" else _tiny_backbone
        self.backbone, self.feature_dim = build(CHANNELS[modality])
        self.head = nn.Sequential(
            nn.Linear(self.feature_dim, self.feature_dim),
            nn.ReLU(inplace=True),
            nn.Linear(self.feature_dim, embed_dim),
        )
        self.channels_last_3d = channels_last_3d
        if channels_last_3d:
            self.to(memory_format=torch.channels_last_3d)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, T, H, W] -> pooled backbone features [N, F] (head not applied)."""
        if x.shape[1] != CHANNELS[self.modality]:
            raise ValueError(
                f"{self.modality} encoder expects {CHANNELS[self.modality]} channels, got input {tuple(x.shape)}"
            )
        if self.channels_last_3d:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.backbone(x).mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, C, T, H, W] -> embedding [N, D], unit L2 norm."""
        return F.normalize(self.head(self.features(x)), dim=1)

    def config(self) -> dict:
        """The constructor arguments, enough to rebuild this encoder from a checkpoint."""
        return {
            "modality": self.modality,
            "backbone": self.backbone_name,
            "embed_dim": self.embed_dim,
            "channels_last_3d": self.channels_last_3d,
        }

