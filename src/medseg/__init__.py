"""medseg: reproducible medical image segmentation on MONAI, DVC, Prefect and MLflow."""

__version__ = "0.1.0"
