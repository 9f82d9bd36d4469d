"""The ByteNet family (Kalchbrenner et al. 2016): dilated-convolution encoder-decoder generation."""

from chatforge.models.bytenet.config import ByteNetConfig
from chatforge.models.bytenet.model import ByteNet, ByteNetState, build, spell_bytes
from chatforge.registry import register_family

__all__ = [
    "ByteNet",
    "ByteNetConfig",
    "ByteNetState",
    "build",
    "spell_bytes",
]

register_family("bytenet", config_cls=ByteNetConfig, builder=build, tasks=("generation",))
