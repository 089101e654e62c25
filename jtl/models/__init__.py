"""Model definitions: one backbone for encoders and decoders, task heads on top."""
from jtl.models.heads import Model
from jtl.models.transformer import Backbone

__all__ = ["Model", "Backbone"]
