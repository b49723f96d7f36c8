"""Prefect orchestration for medseg: the flow and its scheduled deployment."""
