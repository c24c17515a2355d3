"""Model assembly: the E-ViM3 encoder and heads, built from evim3.modules."""

from evim3.models.evim3 import EViM3, EViM3Encoder, GlobalTokenHead, Mamba3DBlock, count_parameters

__all__ = ["EViM3", "EViM3Encoder", "GlobalTokenHead", "Mamba3DBlock", "count_parameters"]
