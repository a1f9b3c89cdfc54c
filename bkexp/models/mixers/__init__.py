"""Token mixers: attention (Transformer), BK-Core (ResNet-BK) and selective scan (Mamba)."""

from bkexp.models.mixers.attention import AttentionMixer
from bkexp.models.mixers.base import Mixer
from bkexp.models.mixers.bk import BKMixer
from bkexp.models.mixers.mamba import MambaMixer

__all__ = ["AttentionMixer", "BKMixer", "MambaMixer", "Mixer"]
