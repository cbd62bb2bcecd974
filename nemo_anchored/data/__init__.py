"""Training data: tokenizers, the SFT data set and the data-parallel batch order, the
tokenized-data cache (cache.py); the offline task builders (builders.py, with medcalc.py and
task_format.py).

The names below are loaded from their module on first use, so that importing a module of this
package (the task builders, which the command line's parsers read) does not load torch, which
the SFT data set needs.
"""
import importlib

_HOMES = {"BatchOrder": "sft", "DataError": "sft", "DataReport": "sft", "SFTDataset": "sft",
          "load_sft_dataset": "sft", "cached_sft_dataset": "cache", "ByteTokenizer": "tokenizer",
          "ConversationError": "tokenizer", "HFTokenizer": "tokenizer", "Tokenizer": "tokenizer",
          "TokenizerError": "tokenizer", "build_tokenizer": "tokenizer",
          "check_messages": "tokenizer"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
