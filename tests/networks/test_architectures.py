import pickle

import pytest
import torch
import torch.nn.functional as F

from medseg.networks.architectures import NETWORKS, build_loss, build_network, load_network, required_divisor

SIZES = {2: (48, 64), 3: (32, 32, 16)}


def make_spec(name, dims, levels=3, deep_supervision=False, **overrides):
    """A tiny NETWORK SPEC; dynunet gets planned-style per-axis strides (first all ones) and kernels."""
    if name == "dynunet":
        strides = [[1] * dims] + [[2] * dims] * (levels - 1)
        kernels = [[3] * dims] * levels
    else:
        strides, kernels = [2] * (levels - 1), None
    spec = {"name": name, "spatial_dims": dims, "channels": [4, 8, 16, 32, 64][:levels], "strides": strides,
            "kernel_sizes": kernels, "num_res_units": 1, "norm": "instance", "dropout": 0.1,
            "deep_supervision": deep_supervision}
    return {**spec, **overrides}


def labels(shape, classes):
    return torch.randint(0, classes, (shape[0], 1, *shape[2:]))


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("dims", [2, 3])
def test_eval_output_is_full_resolution_logits(name, dims):
    for deep_supervision in [False, True] if name != "unet" else [False]:
        net = build_network(make_spec(name, dims, levels=4, deep_supervision=deep_supervision), 1, 4).eval()
        with torch.no_grad():
            out = net(torch.randn(2, 1, *SIZES[dims]))
        assert isinstance(out, torch.Tensor) and out.shape == (2, 4, *SIZES[dims])


@pytest.mark.parametrize("name,norm", [("unet", "instance"), ("unet", "batch"), ("attention_unet", "batch"),
                                       ("dynunet", "instance"), ("dynunet", "batch")])
def test_load_network_holds_the_saved_weights_and_buffers(name, norm):
    """Built on the meta device and given the saved tensors: the same outputs as a built and loaded network, nothing
    left on meta (batch norm's running statistics included), and a state dict of another shape refused."""
    spec = make_spec(name, 2, levels=3, deep_supervision=name != "unet", norm=norm)
    torch.manual_seed(0)
    trained = build_network(spec, 1, 4).train()
    with torch.no_grad():  # running statistics that differ from a fresh network's
        trained(torch.randn(2, 1, *SIZES[2]) * 3 + 1)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    reference = build_network(spec, 1, 4)
    reference.load_state_dict(state)
    net = load_network(spec, 1, 4, state)
    assert not any(t.is_meta for t in (*net.parameters(), *net.buffers()))
    assert all(p.requires_grad for p in net.parameters())
    given = {v.data_ptr() for v in state.values()}  # (DynUNet registers some modules under two names)
    assert all(v.data_ptr() in given for v in net.state_dict().values())  # taken, not copied
    x = torch.randn(1, 1, *SIZES[2])
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), reference.eval()(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        load_network({**spec, "channels": [4, 8, 32]}, 1, 4, state)


def test_old_model_section_without_planned_keys_still_builds():
    model = {"name": "unet", "spatial_dims": 2, "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1,
             "norm": "instance", "dropout": 0.1}
    assert build_network(model, 1, 3).eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(("levels", "heads"), [(3, 1), (5, 2)])
def test_deep_supervision_training_outputs(dims, levels, heads):
    size, x = SIZES[dims], torch.randn(2, 1, *SIZES[dims])
    # DynUNet stacks the coarser logits, interpolated to full size, behind the full-resolution ones
    dyn = build_network(make_spec("dynunet", dims, levels, deep_supervision=True), 1, 3).train()
    assert dyn(x).shape == (2, 1 + heads, 3, *size)
    # the attention U-Net returns them at their own scale: level k at size / 2**k
    att = build_network(make_spec("attention_unet", dims, levels, deep_supervision=True), 1, 3).train()
    out = att(x)
    assert [o.shape for o in out] == [(2, 3, *(s // 2**k for s in size)) for k in range(1 + heads)]


def test_unet_and_unsupervised_nets_return_plain_logits_in_training():
    for name in NETWORKS:
        net = build_network(make_spec(name, 2), 1, 3).train()
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("name", ["attention_unet", "dynunet"])
@pytest.mark.parametrize("dims", [2, 3])
def test_deep_supervision_loss_is_finite_and_trains_every_head(name, dims):
    spec = make_spec(name, dims, levels=5, deep_supervision=True)
    net = build_network(spec, 1, 3).train()
    x = torch.randn(2, 1, *SIZES[dims])
    loss = build_loss(spec)(net(x), labels(x.shape, 3))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    heads = net.heads if name == "attention_unet" else net.deep_supervision_heads
    assert len(heads) == 2
    for head in heads:
        for p in head.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_attention_deep_supervision_loss_weights_coarser_levels_against_resized_labels():
    from monai.losses import DiceCELoss

    spec = make_spec("attention_unet", 2, levels=5, deep_supervision=True)
    outputs = build_network(spec, 1, 3).train()(torch.randn(2, 1, 32, 32))
    target = labels((2, 1, 32, 32), 3)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    expected = sum(w * dice_ce(o, F.interpolate(target.float(), size=o.shape[2:], mode="nearest-exact"))
                   for w, o in zip([1.0, 0.5, 0.25], outputs))
    assert torch.allclose(build_loss(spec)(outputs, target), expected)


@pytest.mark.parametrize("name", NETWORKS)
def test_loss_without_deep_supervision_equals_dice_ce(name):
    from monai.losses import DiceCELoss

    spec = make_spec(name, 2)
    logits = build_network(spec, 1, 3).train()(torch.randn(2, 1, 32, 32))
    target = labels(logits.shape, 3)
    assert torch.equal(build_loss(spec)(logits, target), DiceCELoss(to_onehot_y=True, softmax=True)(logits, target))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_attention_gates_are_gated_by_the_coarser_scale(dims, deep_supervision):
    """Each gate's gating signal g is the upsampled output of the next-coarser level, not the skip x itself."""
    from monai.networks.nets.attentionunet import AttentionLayer

    net = build_network(make_spec("attention_unet", dims, levels=4, deep_supervision=deep_supervision), 1, 2)
    layers = [m for m in net.modules() if isinstance(m, AttentionLayer)]
    assert len(layers) == 3  # one gate per skip connection
    seen = {}

    def record(key):
        def hook(module, args, *rest):
            seen[key] = (args, rest)
        return hook

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(record(("skip", i)))
        layer.submodule.register_forward_hook(record(("coarse", i)))
        layer.upconv.register_forward_hook(record(("up", i)))
        layer.attention.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__(("gate", i), kw),
                                                  with_kwargs=True)
    net.eval()(torch.randn(1, 1, *SIZES[dims]))

    for i in range(len(layers)):
        skip = seen["skip", i][0][0]
        coarse = seen["coarse", i][1][0]
        (up_input,), (up_output,) = seen["up", i]
        gate = seen["gate", i]
        assert gate["x"] is skip  # the gate filters this level's skip connection ...
        assert gate["g"] is up_output and up_input is coarse  # ... with g upsampled from the coarser level
        assert tuple(coarse.shape[2:]) == tuple(s // 2 for s in skip.shape[2:])
        assert gate["g"].shape == gate["x"].shape and not torch.equal(gate["g"], gate["x"])


@pytest.mark.parametrize("name", ["attention_unet", "dynunet"])
@pytest.mark.parametrize("dims", [2, 3])
def test_deep_supervised_network_pickles(name, dims):
    spec = make_spec(name, dims, levels=4, deep_supervision=True)
    net = build_network(spec, 1, 3).train()
    x = torch.randn(2, 1, *SIZES[dims])
    net(x)  # a training step leaves batch-norm statistics and kept features behind
    copy = pickle.loads(pickle.dumps(net))
    with torch.no_grad():
        assert torch.equal(net.eval()(x), copy.eval()(x))
    # the copy is still deep-supervised, its hooks feeding its own heads
    out = copy.train()(x)
    assert len(out) == 2 if name == "attention_unet" else out.shape[1] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["attention_unet", "dynunet"])
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_deep_supervision_loss_under_autocast_on_cuda(name, amp_dtype):
    spec = make_spec(name, 3, levels=4, deep_supervision=True)
    net = build_network(spec, 1, 3).cuda().train()
    x = torch.randn(2, 1, *SIZES[3], device="cuda")
    with torch.autocast("cuda", dtype=amp_dtype):
        loss = build_loss(spec)(net(x), labels(x.shape, 3).cuda())
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    heads = net.heads if name == "attention_unet" else net.deep_supervision_heads
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in heads.parameters())

@pytest.mark.parametrize(("spec", "divisor"), [
    (make_spec("unet", 3, levels=4), (8, 8, 8)),
    ({**make_spec("dynunet", 2, 4), "strides": [[1, 1], [2, 2], [2, 2], [2, 2]]}, (8, 8)),
    ({**make_spec("dynunet", 3), "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]]}, (4, 4, 2)),
])
def test_required_divisor(spec, divisor):
    assert required_divisor(spec) == divisor


@pytest.mark.parametrize(("dims", "strides", "size"), [
    (2, [[1, 1], [2, 2], [2, 2], [2, 2]], (96, 128)),
    (3, [[1, 1, 1], [2, 2, 1], [2, 2, 2]], (64, 64, 16)),
])
def test_dynunet_with_planned_anisotropic_strides(dims, strides, size):
    spec = {**make_spec("dynunet", dims, len(strides), deep_supervision=True), "strides": strides}
    net = build_network(spec, 1, 4)
    x = torch.randn(2, 1, *size)
    loss = build_loss(spec)(net.train()(x), labels(x.shape, 4))
    assert torch.isfinite(loss)
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 4, *size)


@pytest.mark.parametrize(("override", "message"), [
    ({"name": "unet", "kernel_sizes": None, "strides": [2, 2], "deep_supervision": True}, "model.deep_supervision"),
    ({"name": "attention_unet", "kernel_sizes": None, "strides": [2], "channels": [4, 8], "deep_supervision": True},
     "model.deep_supervision"),
    ({"strides": [[1, 1], [2, 2]]}, "model.strides"),
    ({"kernel_sizes": [[3, 3]] * 4}, "model.kernel_sizes"),
    ({"kernel_sizes": None}, "model.kernel_sizes"),
    ({"strides": [[2, 2], [2, 2], [2, 2]]}, r"model.strides\[0\]"),
    ({"strides": [[1, 1], [2, 2, 2], [2, 2]]}, r"model.strides\[1\]"),
    ({"kernel_sizes": [[3, 3], [3, 0], [3, 3]]}, r"model.kernel_sizes\[1\]"),
    ({"name": "unet", "kernel_sizes": None, "strides": [2, 2, 2]}, "model.strides"),
    ({"name": "unet", "strides": [2, 2]}, "model.kernel_sizes"),
    ({"channels": [4, 8]}, "model.channels"),
    ({"spatial_dims": 4}, "model.spatial_dims"),
    ({"norm": "group"}, "model.norm"),
    ({"dropout": 1.5}, "model.dropout"),
])
def test_invalid_specs_name_the_key(override, message):
    spec = {**make_spec("dynunet", 2), **override}
    with pytest.raises(ValueError, match=message):
        build_network(spec, 1, 2)


def test_missing_key_is_named():
    spec = make_spec("dynunet", 2)
    del spec["num_res_units"]
    with pytest.raises(ValueError, match="model.num_res_units"):
        build_network(spec, 1, 2)


def test_unknown_network():
    with pytest.raises(ValueError, match="unknown model.name"):
        build_network({"name": "vnet", "spatial_dims": 2, "channels": [4, 8], "strides": [2], "dropout": 0.0}, 1, 2)
