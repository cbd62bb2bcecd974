"""Training data: tokenizers, the SFT data set and the data-parallel batch order."""

from nemo_anchored.data.sft import BatchOrder, DataError, DataReport, SFTDataset, load_sft_dataset
from nemo_anchored.data.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer

__all__ = ["BatchOrder", "ByteTokenizer", "DataError", "DataReport", "SFTDataset", "Tokenizer",
           "build_tokenizer", "load_sft_dataset"]
