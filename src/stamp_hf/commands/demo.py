"""Serve the web demo: upload an image, type a request, see the answer and its masks; chat about the image; an API
endpoint /segment for gradio_client. Needs the demo extra: pip install -e ".[demo]"."""

import shlex

from ..cli import CommandError
from ._checks import check_at_least, check_port
from ._common import DEFAULT_MODEL, add_model_arguments, check_model_arguments, load


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (0.0.0.0: every interface; default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--concurrency", type=int, default=None, metavar="N",
                        help="model calls run at once on the one shared model; more requests wait in gradio's queue "
                        "(default: 2 on a CPU, 4 on a GPU)")


def build(args):
    """The gr.Blocks for the parsed options (model loaded, queue set up); the options are checked before torch
    loads."""
    check_at_least(args, 1, "concurrency")
    check_model_arguments(args)
    webdemo = _webdemo()
    model, processor, refiner = load(args)
    concurrency = args.concurrency or webdemo.default_concurrency(model.device)
    bundled = args.model == DEFAULT_MODEL
    name = "the bundled demo model (synthetic shapes; not the paper's STAMP)" if bundled else f"`{args.model}`"
    return webdemo.build_demo(model, processor, refiner, max_new_tokens=args.max_new_tokens,
                              concurrency_limit=concurrency, model_name=name)


def parse_environment(text: str):
    """Options given as one string (the Space entry point reads them from $STAMP_DEMO_ARGS)."""
    import argparse

    parser = argparse.ArgumentParser(prog="app.py", description=__doc__)
    add_arguments(parser)
    return parser.parse_args(shlex.split(text))


def _webdemo():
    """stamp_hf.webdemo, or a one-line error naming the missing extra."""
    try:
        from .. import webdemo
    except ImportError as error:
        raise CommandError(f'the demo needs gradio ({error}); install it with pip install -e ".[demo]"') from None
    return webdemo


def run(args):
    check_port(args.host, args.port)  # before the model loads; gradio's own message names GRADIO_SERVER_PORT
    demo = build(args)
    check_port(args.host, args.port)  # again: another server may have taken it while the model loaded
    try:
        _webdemo().launch(demo, host=args.host, port=args.port, share=args.share)
    except OSError as error:  # taken in the instant between the check and gradio's bind
        if "Cannot find empty port" not in str(error):
            raise
        raise CommandError(f"--port {args.port}: the port is in use on {args.host} (another server?); stop it or "
                           "pick another --port") from None
    return 0
