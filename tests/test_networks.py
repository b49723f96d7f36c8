import pytest
import torch

from medseg.networks import build_network


@pytest.mark.parametrize("name", ["unet", "attention_unet"])
@pytest.mark.parametrize(("dims", "size"), [(2, (48, 64)), (3, (32, 32, 16))])
def test_shapes(name, dims, size):
    model = {"name": name, "spatial_dims": dims, "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1,
             "norm": "instance", "dropout": 0.1}
    net = build_network(model, in_channels=1, out_channels=4).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, *size))
    assert out.shape == (2, 4, *size)


def test_attention_unet_has_gates():
    from monai.networks.nets.attentionunet import AttentionBlock

    model = {"name": "attention_unet", "spatial_dims": 2, "channels": [4, 8, 16], "strides": [2, 2],
             "num_res_units": 0, "norm": "instance", "dropout": 0.0}
    net = build_network(model, 1, 2)
    gates = [m for m in net.modules() if isinstance(m, AttentionBlock)]
    assert len(gates) == 2  # one per skip connection


def test_unknown_network():
    with pytest.raises(ValueError, match="unknown model.name"):
        build_network({"name": "vnet", "spatial_dims": 2, "channels": [4, 8], "strides": [2], "dropout": 0.0}, 1, 2)
