"""Make a STAMP model from a Qwen2-VL or Qwen2.5-VL base (Hub id or folder, e.g. Qwen/Qwen2-VL-2B-Instruct): the four
STAMP tokens appended as the official code adds them, the embeddings resized to the new vocabulary, an untrained mask
classifier. OUTPUT becomes a STAMP Hub folder (remote code, model card) that `stamp-hf train` fine-tunes; on text the
model answers exactly as the base does."""

from ._checks import check_at_least, check_output_folder, check_source


def add_arguments(parser):
    parser.add_argument("base", help="Qwen2-VL / Qwen2.5-VL checkpoint: a Hub repo id or a local folder")
    parser.add_argument("output", help="folder to write the STAMP model into (new, or replaced with --force)")
    parser.add_argument("--min-placeholders", type=int, default=1024,
                        help="fewest merged patches per image = mask placeholders per <|seg|> (default: 1024, the paper's)")
    parser.add_argument("--max-placeholders", type=int, default=1280, help="most merged patches per image (default 1280)")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept a base with pickled .bin/.pt weights (they can run code when loaded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the classifier's initialisation (default 0)")
    parser.add_argument("--repo-id", help="the repo the model card's usage snippet loads (default: OUTPUT)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")


def run(args):
    check_at_least(args, 1, "min_placeholders", "max_placeholders")
    check_source(args.base, "BASE", "base model")
    check_output_folder(args.output, "OUTPUT")
    from stamp_hf.init_base import init_from_base

    model, _ = init_from_base(
        args.base, args.output, args.min_placeholders, args.max_placeholders, force=args.force,
        allow_pickle=args.allow_pickle, seed=args.seed, repo_id=args.repo_id, max_shard_size=args.max_shard_size,
    )
    config = model.config
    print(f"wrote {args.output}: {type(model).__name__} on {args.base}, STAMP token ids "
          f"{[config.seg_token_id, config.mask_token_id, config.yes_token_id, config.no_token_id]}, untrained head")
