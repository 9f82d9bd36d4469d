"""The ByteNet family (Kalchbrenner et al. 2016): dilated-convolution encoder-decoder generation."""

from chatforge.models.bytenet.model import ByteNet, ByteNetConfig, ByteNetState, build, spell_bytes

__all__ = [
    "ByteNet",
    "ByteNetConfig",
    "ByteNetState",
    "build",
    "spell_bytes",
]
