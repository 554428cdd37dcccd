"""Convert a released STAMP checkpoint (full fine-tune or LoRA adapter; local folder or Hub repo id) into a STAMP Hub
folder that loads with AutoModel / AutoProcessor (trust_remote_code=True), with or without stamp-hf installed."""

from ._checks import check_output_folder, check_source


def add_arguments(parser):
    parser.add_argument("source", help="checkpoint folder or Hub repo id (e.g. JiaZL/STAMP-2B-uni, JiaZL/STAMP-7B-lora)")
    parser.add_argument("destination", help="new (or empty) folder to write the STAMP Hub folder into")
    parser.add_argument("--base", help="base model of a LoRA adapter (default: the one its adapter_config names)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickled .bin/.pt weights (they can run code when loaded: only for trusted sources)")
    parser.add_argument("--repo-id", help="the repo the model card's usage snippet loads (default: DESTINATION)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")


def run(args):
    check_source(args.source, "SOURCE", "checkpoint", file_suffixes=(), markers=("config.json", "adapter_config.json"))
    if args.base:
        check_source(args.base, "--base", "base model")
    check_output_folder(args.destination, "DESTINATION")
    from stamp_hf.convert import convert_checkpoint

    folder = convert_checkpoint(
        args.source, args.destination, base=args.base, allow_pickle=args.allow_pickle,
        max_shard_size=args.max_shard_size, repo_id=args.repo_id,
    )
    print(f"wrote {folder}")
