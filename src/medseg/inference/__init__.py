"""Inference: ``predict`` (the predict command's stage), the sliding window, post-processing, DICOM-SEG output and
the trained-model folder every later stage reads.
"""

from medseg import old_module_names

__all__: list[str] = []

# `from medseg.inference import ...` as before this was a folder (the names of medseg.inference.sliding_window)
__getattr__ = old_module_names(__name__, "sliding_window")
