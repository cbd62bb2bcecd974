"""Training data: tokenizers, the SFT data set and the data-parallel batch order."""

from nemo_anchored.data.sft import BatchOrder, DataError, DataReport, SFTDataset, load_sft_dataset
from nemo_anchored.data.tokenizer import (ByteTokenizer, ConversationError, HFTokenizer, Tokenizer,
                                          TokenizerError, build_tokenizer, check_messages)

__all__ = ["BatchOrder", "ByteTokenizer", "ConversationError", "DataError", "DataReport",
           "HFTokenizer", "SFTDataset", "Tokenizer", "TokenizerError", "build_tokenizer",
           "check_messages", "load_sft_dataset"]
