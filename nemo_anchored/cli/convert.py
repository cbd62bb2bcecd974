"""`nemo-anchored convert hf-to-mcore | mcore-to-hf`: the arguments, and the call into
nemo_anchored.models.hf_import / hf_export (imported only when a conversion runs: they load
megatron-core)."""
from nemo_anchored.config import MODEL_DTYPES


def add_arguments(parser) -> None:
    directions = parser.add_subparsers(dest="direction", required=True)
    to_mcore = directions.add_parser(
        "hf-to-mcore", help="a Hugging Face Llama/Qwen2 folder -> a nemo-anchored base directory")
    to_mcore.add_argument("--hf", required=True, help="Hugging Face model folder")
    to_mcore.add_argument("--out", required=True, help="output directory (must not exist)")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel shard processes")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel shard processes")
    to_mcore.add_argument("--gguf-file", default=None,
                          help="read this GGUF file of --hf instead of safetensors")
    to_mcore.add_argument("--dtype", choices=MODEL_DTYPES, default=None,
                          help="weights' dtype (default: the checkpoint's; float32 for GGUF)")
    to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                          help="vocabulary padding multiple (model.make_vocab_size_divisible_by)")
    to_hf = directions.add_parser(
        "mcore-to-hf", help="a nemo-anchored checkpoint -> a Hugging Face model folder")
    to_hf.add_argument("--checkpoint", required=True, help="nemo-anchored checkpoint directory")
    to_hf.add_argument("--base", required=True,
                       help="the hf-to-mcore output it started from (architecture, tokenizer)")
    to_hf.add_argument("--out", required=True, help="output folder (must not exist)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="per safetensors file (5GB)")
    to_hf.add_argument("--dtype", choices=MODEL_DTYPES, default=None,
                       help="weights' dtype (default: the checkpoint's)")


def run(args) -> int:
    from nemo_anchored.models.hf_export import convert_mcore_to_hf
    from nemo_anchored.models.hf_import import convert_hf_to_mcore
    from nemo_anchored.models.hf_layout import MODEL_YAML, TOKENIZER_SUBDIR

    if args.direction == "hf-to-mcore":
        out = convert_hf_to_mcore(
            args.hf, args.out, tp=args.tp, pp=args.pp, gguf_file=args.gguf_file,
            dtype=args.dtype, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        print(f"nemo-anchored: wrote {out} (model.base_checkpoint={out}, "
              f"data.tokenizer={out / TOKENIZER_SUBDIR}, recipe keys in {out / MODEL_YAML})")
    else:
        out = convert_mcore_to_hf(args.checkpoint, args.base, args.out,
                                  max_shard_size=args.max_shard_size, dtype=args.dtype)
        print(f"nemo-anchored: wrote {out}")
    return 0
