"""Networks: the architectures (``architectures``: MONAI's U-Nets configured from a spec, the loss), encoders,
pretrained weights and the U-Net paper's border weights. The spec itself is :mod:`medseg.common.network_spec`.
"""

from medseg import old_module_names

__all__: list[str] = []

# `from medseg.networks import ...` as before this was a folder (the names of medseg.networks.architectures)
__getattr__ = old_module_names(__name__, "architectures")
