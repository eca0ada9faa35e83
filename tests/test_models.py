"""Encoders: shapes, unit-norm embeddings, the flow stem, the BN momentum fix."""

import pytest
import torch
from torch import nn

from cvtcl.models import BN_MOMENTUM, Encoder
from trainer_fakes import one_thread  # noqa: F401 (autouse fixture)


@pytest.mark.parametrize("modality,channels", [("rgb", 3), ("flow", 2)])
def test_tiny_encoder_shapes_and_norm(modality, channels):
    torch.manual_seed(0)
    encoder = Encoder(modality, "tiny", embed_dim=16)
    x = torch.randn(3, channels, 8, 32, 32)
    assert encoder.features(x).shape == (3, encoder.feature_dim)
    z = encoder(x)
    assert z.shape == (3, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    head = [m for m in encoder.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in head] == [(encoder.feature_dim,) * 2, (encoder.feature_dim, 16)]


@pytest.mark.parametrize("modality,channels", [("rgb", 3), ("flow", 2)])
def test_s3d_encoder(modality, channels):
    encoder = Encoder(modality, "s3d").eval()
    assert encoder.feature_dim == 1024
    assert encoder.backbone[0][0][0].in_channels == channels
    assert all(m.momentum == BN_MOMENTUM for m in encoder.modules() if isinstance(m, nn.BatchNorm3d))
    with torch.no_grad():
        z = encoder(torch.randn(1, channels, 8, 32, 32))
    assert z.shape == (1, 128)


def test_channels_last_gives_same_embedding():
    torch.manual_seed(0)
    plain = Encoder("rgb", "tiny").eval()
    last = Encoder("rgb", "tiny", channels_last_3d=True).eval()
    last.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(last(x), plain(x), rtol=1e-4, atol=1e-5)


def test_wrong_input_channels_and_names_are_refused():
    with pytest.raises(ValueError, match="expects 2 channels"):
        Encoder("flow", "tiny")(torch.randn(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="modality"):
        Encoder("depth", "tiny")
    with pytest.raises(ValueError, match="backbone"):
        Encoder("rgb", "r3d")


@pytest.mark.parametrize("backbone, modality, frames, size", [
    ("tiny", "rgb", 8, 16), ("tiny", "flow", 8, 32), ("tiny", "rgb", 2, 16), ("s3d", "rgb", 8, 32),
    ("s3d", "flow", 16, 64),
])
def test_fewest_batch_norm_values_as_a_real_forward_sees_them(backbone, modality, frames, size):
    """The preflight's shape arithmetic (meta device) against a forward that computes."""
    from cvtcl.models import CHANNELS, fewest_batch_norm_values

    encoder, seen = Encoder(modality, backbone).eval(), []
    for layer in encoder.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.register_forward_pre_hook(lambda layer, args: seen.append(args[0][0, 0].numel()))
    with torch.no_grad():
        encoder(torch.zeros(1, CHANNELS[modality], frames, size, size))
    assert fewest_batch_norm_values(backbone, modality, frames, size) == min(seen)
