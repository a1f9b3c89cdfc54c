"""nn.Modules only (no Lightning): the shared LM backbone, its mixers and feed-forward layers."""

from bkexp.models.backbone import Block, LanguageModel

__all__ = ["Block", "LanguageModel"]
