"""Networks: the architectures (``architectures``: MONAI's U-Nets configured from a spec, the loss), encoders,
pretrained weights and the U-Net paper's border weights. The spec itself is :mod:`medseg.common.network_spec`.
"""

__all__: list[str] = []


def __getattr__(name: str):
    # `from medseg.networks import build_network` as before this was a folder; imported by name so that no stage's code deps
    # (medseg.common.code_deps) or layer check counts it: only code written against the old module reaches it
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return getattr(importlib.import_module("medseg.networks.architectures"), name)
    except AttributeError:
        raise AttributeError(f"module 'medseg.networks' has no attribute {name!r}") from None
