"""Publish a saved or converted STAMP folder to the Hugging Face Hub in one commit: weights, config, remote code,
processor, generation config and a model card (with a model-index when --eval-results is given). Needs the Hub: when
it does not answer within HF_HUB_ETAG_TIMEOUT seconds (10 by default), one line says so."""

from pathlib import Path

from ..cli import CommandError, network_errors
from ._checks import check_folder, check_hub_reachable


def add_arguments(parser):
    parser.add_argument("folder", help="a STAMP folder written by save_pretrained or stamp-hf convert")
    parser.add_argument("repo", help="Hub repo id to create or update (org/name)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--eval-results", metavar="RESULTS_JSON",
                        help='JSON list of {"dataset": ..., "dataset_type": ..., "split": ..., "cIoU": ..., "gIoU": ...}: '
                        "the card's results table (default: a card without results)")


def run(args):
    check_folder(args.folder, "FOLDER")
    if args.eval_results and not Path(args.eval_results).is_file():
        raise CommandError(f"--eval-results {args.eval_results}: no such file")
    doing = f"publish {args.folder} to {args.repo}"
    check_hub_reachable(doing)
    from stamp_hf.hub import push_folder

    with network_errors(doing):
        commit = push_folder(args.folder, args.repo, private=args.private, eval_results=args.eval_results)
    print(f"pushed {args.folder} to {args.repo}: {commit.commit_url}")
