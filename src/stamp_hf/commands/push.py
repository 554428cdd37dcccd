"""Publish a saved or converted STAMP folder to the Hugging Face Hub in one commit: weights, config, remote code,
processor, generation config and a model card (with a model-index when --eval-results is given)."""


def add_arguments(parser):
    parser.add_argument("folder", help="a STAMP folder written by save_pretrained or stamp-hf convert")
    parser.add_argument("repo", help="Hub repo id to create or update (org/name)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--eval-results", metavar="RESULTS_JSON",
                        help='JSON list of {"dataset": ..., "dataset_type": ..., "split": ..., "cIoU": ..., "gIoU": ...}')


def run(args):
    from stamp_hf.hub import push_folder

    commit = push_folder(args.folder, args.repo, private=args.private, eval_results=args.eval_results)
    print(f"pushed {args.folder} to {args.repo}: {commit.commit_url}")
