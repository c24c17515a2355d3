"""nn.Modules built on evim3.ops."""

from evim3.modules.mamba import Mamba, ResidualMamba

__all__ = ["Mamba", "ResidualMamba"]
