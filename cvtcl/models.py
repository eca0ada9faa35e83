"""Video encoders: backbone f (S3D or a tiny CPU stand-in) and projection head g (paper §2.1, §3.1).

An `Encoder` maps clips `x: [N, C, T, H, W]` to
  - `.features(x) -> [N, F]`: the globally pooled backbone output (F = 1024 for S3D), what the
    evaluation uses (the head is discarded there);
  - `.forward(x) -> [N, D]`: g(f(x)), L2-normalised (D = 128), what the contrastive losses use.
Several clips (two copies, M local segments) are folded into N by the caller and encoded in one
call. The encoder holds no training state; the momentum copy and the queue live in `cvtcl.moco`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
        drop_batch_counters_(self)
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

    # run.compile=graph under torchrun: each call of a training step replays a CUDA graph (cvtcl.graphed.CallGraphs)
    graphs = None

    def forward(self, x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """x: [N, C, T, H, W] -> embedding [N, D], unit L2 norm. Further inputs (other shapes) are
        encoded in the same call and all embeddings come back as a tuple: one DDP forward, and
        under run.compile=graph one graph whose backward sums their gradients."""
        inputs = (x, *more)
        out = self.graphs(self, inputs) if self.graphs is not None else self.embed_each(inputs)
        return out if more else out[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """forward's computation, always eager."""
        return F.normalize(self.head(self.features(x)), dim=1)

    def embed_each(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(self.embed(x) for x in inputs)

    def config(self) -> dict:
        """The constructor arguments, enough to rebuild this encoder from a checkpoint."""
        return {
            "modality": self.modality,
            "backbone": self.backbone_name,
            "embed_dim": self.embed_dim,
            "channels_last_3d": self.channels_last_3d,
        }



def fewest_batch_norm_values(backbone: str, modality: str, frames: int, size: int) -> int:
    """The fewest values per channel that any BatchNorm of the encoder normalises for one clip of
    `frames` x `size` x `size`: shape arithmetic on the meta device, nothing computed. A BN batch
    of one such clip has no statistics when this is 1 (the deepest maps of small inputs)."""
    seen: list[int] = []
    with torch.device("meta"):
        encoder = Encoder(modality, backbone).eval()  # eval: running statistics, no batch-size check
        hooks = [layer.register_forward_pre_hook(lambda layer, args: seen.append(args[0][0, 0].numel()))
                 for layer in encoder.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]
        encoder(torch.empty(1, CHANNELS[modality], frames, size, size))
    for hook in hooks:
        hook.remove()
    return min(seen)


def drop_batch_counters_(module: nn.Module) -> None:
    """Remove every BatchNorm's num_batches_tracked: with a fixed momentum nothing reads it, and
    its `+= 1` was one kernel launch per BN per call (462 of S3D's ~2,950 per step). Checkpoints
    written before still load: the key is dropped from their state dicts on load."""
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.num_batches_tracked is not None:
            assert bn.momentum is not None, "a cumulative-average BatchNorm needs num_batches_tracked"
            bn.num_batches_tracked = None
            bn._register_load_state_dict_pre_hook(_drop_batch_counter)


def _drop_batch_counter(state_dict, prefix, *args) -> None:
    state_dict.pop(prefix + "num_batches_tracked", None)


def running_statistics(module: nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm's running mean and variance, in module order."""
    return [t for bn in module.modules() if isinstance(bn, nn.modules.batchnorm._BatchNorm)
            for t in (bn.running_mean, bn.running_var)]


class SplitBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d that, while `groups` > 1, normalises `groups` interleaved sub-batches (row
    i*groups + g belongs to group g) each with its own batch statistics, in one call.

    Shuffle-BN on one process (cvtcl.moco) encodes its keys in BN groups; with this the key
    encoder's convolutions, activations and pools run once over the whole batch instead of once
    per group. The groups are a [n, groups*C, ...] view of a contiguous input, so one batch_norm
    kernel computes the per-group statistics exactly as separate calls would. No running
    statistics are kept while split (keys are always computed in train mode; see
    MomentumContrast.momentum_update).
    """

    groups = 1
    repeated: tuple[torch.Tensor, torch.Tensor, int, int] | None = None  # (weight, bias) x groups, versions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1 or not self.training:  # eval: running statistics, nothing per group
            return super().forward(x)
        g, (n, c) = self.groups, x.shape[:2]
        if x.is_contiguous():
            grouped = x.view(n // g, g * c, *x.shape[2:])
            weight, bias = self._repeated_affine()
            return F.batch_norm(grouped, None, None, weight, bias, True, 0.0, self.eps).view_as(x)
        out = torch.empty_like(x)  # channels_last_3d: the groups are not a view; one call per group
        for i in range(g):
            out[i::g] = F.batch_norm(x[i::g], None, None, self.weight, self.bias, True, 0.0, self.eps)
        return out


    def _repeated_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """weight and bias repeated `groups` times: from `repeat_affine_` (two launches for the whole
        encoder per step) while the parameters have not changed since, else two launches here."""
        if torch.compiler.is_compiling():  # first: a traced read of the cache would guard on it every step
            return self.weight.repeat(self.groups), self.bias.repeat(self.groups)
        cached = self.repeated
        if cached is not None and len(cached[0]) == self.groups * len(self.weight) \
                and (cached[2], cached[3]) == (self.weight._version, self.bias._version):
            return cached[0], cached[1]
        return self.weight.repeat(self.groups), self.bias.repeat(self.groups)


def repeat_index(module: nn.Module, groups: int) -> torch.Tensor:
    """The gather index `repeat_affine_` uses: for the SplitBatchNorm3d layers' [weight, bias, ...]
    concatenated, each tensor's entries `groups` times in a row."""
    sizes = [len(m.weight) for m in module.modules() if isinstance(m, SplitBatchNorm3d) for _ in range(2)]
    starts = torch.tensor([0, *sizes]).cumsum(0)[:-1].tolist()
    return torch.cat([start + torch.arange(groups * size) % size for start, size in zip(starts, sizes)])


@torch.no_grad()
def repeat_affine_(module: nn.Module, index: torch.Tensor, groups: int, store: torch.Tensor) -> None:
    """Give every SplitBatchNorm3d of `module` its weight and bias repeated `groups` times, all in
    one gather with `index` (`repeat_index`) instead of two repeat launches per layer and call.
    Call after the parameters change. The gather writes into `store` (as long as `index`, kept by
    the caller): the layers read the same memory every step, as a key-encoder call replayed from a
    CUDA graph captured in an earlier step does (a new tensor each step would leave the replay
    reading the freed memory of the one it was captured with)."""
    layers = [m for m in module.modules() if isinstance(m, SplitBatchNorm3d)]
    flat = torch.cat([t for m in layers for t in (m.weight, m.bias)])
    torch.index_select(flat, 0, index, out=store)
    pieces = store.split([groups * len(m.weight) for m in layers for _ in range(2)])
    for m, weight, bias in zip(layers, pieces[0::2], pieces[1::2]):
        m.repeated = (weight, bias, m.weight._version, m.bias._version)


def split_batch_norm_(module: nn.Module) -> nn.Module:
    """Make every BatchNorm3d of `module` a SplitBatchNorm3d (same parameters and state dict keys)."""
    for bn in module.modules():
        if type(bn) is nn.BatchNorm3d:
            bn.__class__ = SplitBatchNorm3d
    return module


@contextmanager
def split_batch_norm(module: nn.Module, groups: int) -> Iterator[None]:
    """Within the block, `module`'s SplitBatchNorm3d layers normalise `groups` interleaved groups."""
    layers = [m for m in module.modules() if isinstance(m, SplitBatchNorm3d)]
    if not layers:
        raise RuntimeError("split_batch_norm: the module has no SplitBatchNorm3d (call split_batch_norm_ first)")
    for layer in layers:
        layer.groups = groups
    try:
        yield
    finally:
        for layer in layers:
            layer.groups = 1
