"""The `stamp-hf` console script. Each subcommand lives in `stamp_hf.commands.<name>` and defines
`add_arguments(parser)` and `run(args) -> int`; a user error there raises `CommandError` (or ValueError / TypeError /
OSError), which becomes one line on stderr and exit status 2, never a traceback. Command modules import torch and the
model code inside `run` only, so `stamp-hf --help` and `--version` start in a fraction of a second."""

import argparse
import contextlib
import importlib
import sys

# name -> one-line help; the module stamp_hf.commands.<name> (- as _) implements it
COMMANDS = {
    "segment": "segment what a sentence describes in an image (masks, overlay, JSON)",
    "chat": "chat about an image, several turns on one cache; masks as overlays",
    "convert": "convert a released STAMP checkpoint (full or LoRA) into a STAMP Hub folder",
    "init": "make an untrained STAMP from a Qwen2-VL / Qwen2.5-VL / Qwen3-VL base (stamp-hf train then fine-tunes it)",
    "push": "publish a STAMP folder to the Hugging Face Hub with its model card",
    "train": "fine-tune STAMP on JSON Lines data (full or LoRA) with transformers' Trainer",
    "eval": "evaluate STAMP on referring segmentation data (cIoU, gIoU, N-acc, T-acc)",
    "prepare-data": "turn RefCOCO*/gRefCOCO/ReasonSeg/LLaVA data into the JSON Lines training format",
    "demo": "serve the web demo (gradio): upload, request, masks, chat, a /segment API",
    "serve": "serve STAMP as an HTTP JSON API on Ray Serve: dynamic batching, replicas, clusters",
}


class CommandError(Exception):
    """A problem with what the user asked for (a path, a size, a token): reported in one line, exit status 2."""


# what httpx (huggingface_hub's HTTP client) raises on a network failure is not an OSError; neither is a traceback
NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def is_network_error(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] in NETWORK_MODULES


@contextlib.contextmanager
def network_errors(doing: str):
    """A network failure inside becomes a CommandError saying what could not be done ("publish X to Y")."""
    try:
        yield
    except Exception as error:
        if not (is_network_error(error) or isinstance(error, ConnectionError)):
            raise
        raise CommandError(f"cannot {doing}: network error ({type(error).__name__}: {one_line(error)})") from None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="stamp-hf", description="STAMP segmentation MLLM on Hugging Face transformers")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"stamp_hf.commands.{name.replace('-', '_')}")
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    # torchao's two deprecation notices at transformers' import are filtered when stamp_hf is imported (__init__)
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except (CommandError, ValueError, TypeError, OSError, ImportError) as error:  # ImportError: a missing extra or
        # an unsupported transformers, each said in one line with the pip command
        print(f"stamp-hf {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a network failure anywhere: one line, not httpx's traceback
        if not is_network_error(error):
            raise
        print(f"stamp-hf {args.command}: error: network error ({type(error).__name__}: {one_line(error)})",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
