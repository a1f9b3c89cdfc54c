"""Data for every experiment: Lightning datamodules for text and synthetic tasks, sources and tokenizers."""

from bkexp.data.datamodule import (
    ChunkedStream,
    ExampleDataset,
    IIDDataModule,
    MQARDataModule,
    TextDataModule,
    TokenDataModule,
)
from bkexp.data.streaming import StreamingTextDataModule, StreamSource, TokenChunks, text_datamodule
from bkexp.data.synthetic import IGNORE_INDEX, iid_tokens, mqar, split_seed
from bkexp.data.tokenizers import (
    ByteTokenizer,
    IdTokenizer,
    PretrainedTokenizer,
    Tokenizer,
    WordTokenizer,
    load_tokenizer,
)

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "ChunkedStream",
    "ExampleDataset",
    "IIDDataModule",
    "IdTokenizer",
    "MQARDataModule",
    "PretrainedTokenizer",
    "StreamSource",
    "StreamingTextDataModule",
    "TextDataModule",
    "TokenChunks",
    "TokenDataModule",
    "Tokenizer",
    "WordTokenizer",
    "iid_tokens",
    "load_tokenizer",
    "mqar",
    "split_seed",
    "text_datamodule",
]
