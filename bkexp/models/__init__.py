"""nn.Modules only (no Lightning): the shared LM backbone, its staged-execution subclass, mixers and feed-forward layers."""

from bkexp.models.backbone import Block, LanguageModel
from bkexp.models.decoding import DecodeState
from bkexp.models.ffn import MLP
from bkexp.models.moe import MoEFeedForward
from bkexp.models.staged import StagedLanguageModel

__all__ = ["MLP", "Block", "DecodeState", "LanguageModel", "MoEFeedForward", "StagedLanguageModel"]
