"""Serve STAMP over HTTP on Ray Serve: POST /v1/segment and /v1/chat (JSON, the image base64-encoded), GET /healthz
and /v1/model. Concurrent requests are batched dynamically (--max-batch-size, --batch-wait-ms) into the pipeline's
left-padded batches; --replicas copies of the model share the load, on this machine (Ray starts here and stops with
the command) or on an existing Ray cluster (--address). Runs until Ctrl-C or SIGTERM. Needs the serve extra:
pip install -e ".[serve]"."""

import argparse
import os
import signal
import threading
import time

from ..cli import CommandError, one_line
from ..serve_limits import limits_text
from ._checks import check_at_least, check_port
from ._common import add_model_arguments, check_model_arguments, log


def add_arguments(parser):
    add_model_arguments(parser, refine=False)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (0.0.0.0: every interface; default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to serve on (default: 8000)")
    parser.add_argument("--replicas", type=int, default=1, help="copies of the model serving requests (default 1)")
    parser.add_argument("--max-batch-size", type=int, default=8, metavar="B",
                        help="requests one model call answers at most (default 8; 1 turns batching off)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="W",
                        help="how long a batch waits for more requests before it runs (default 10 ms)")
    parser.add_argument("--address", default=None,
                        help="an existing Ray cluster (auto, or HOST:PORT of its head); default: start Ray here")
    parser.add_argument("--cpus-per-replica", type=float, default=None, metavar="C",
                        help="CPUs Ray reserves for each replica (may be a fraction); torch gets max(1, int(C)) "
                        "threads (default: this machine's CPUs / replicas, or 1 on a cluster)")
    parser.add_argument("--gpus-per-replica", type=float, default=None, metavar="G",
                        help="GPUs Ray reserves for each replica (default: 1 with a CUDA --device, else 0)")
    parser.epilog = limits_text()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def check(args) -> None:
    """The options, refused in one line before torch or Ray load."""
    check_at_least(args, 1, "replicas", "max_batch_size")
    check_at_least(args, 0, "batch_wait_ms", "cpus_per_replica", "gpus_per_replica")
    check_model_arguments(args)
    if args.address is None:
        check_port(args.host, args.port)  # on a cluster the head's port is Ray's business
    elif not 0 < args.port < 65536:
        raise CommandError(f"--port must be 1..65535, got {args.port}")


def resources(args) -> tuple[float, float]:
    """(CPUs, GPUs) Ray reserves per replica."""
    cpus = args.cpus_per_replica
    if cpus is None:
        cpus = 1.0 if args.address else max(1.0, float((os.cpu_count() or 1) // args.replicas))
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if (args.device or "").startswith("cuda") else 0.0
    return cpus, gpus


def _ray():
    """ray and ray.serve, or a one-line error naming the missing extra."""
    try:
        import ray
        from ray import serve
    except ImportError as error:
        raise CommandError(f'stamp-hf serve needs Ray Serve ({error}); install it with pip install -e ".[serve]"') \
            from None
    return ray, serve


def _check_model(args) -> None:
    """A model that does not load is reported here in one line, not as a failed deployment's traceback."""
    from transformers import AutoConfig

    from ..modeling_stamp import register_auto_classes

    register_auto_classes()
    try:
        AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise CommandError(f"--model {args.model}: cannot load a STAMP model from it ({one_line(error)})") from None


def run(args):
    check(args)
    ray, serve = _ray()
    from .. import serve as service
    from ._common import resolve_device

    if args.address is None:
        resolve_device(args.device)  # on a cluster the replicas' machines decide
        if args.device is None and resolve_device(None).type == "cuda" and args.gpus_per_replica is None:
            args.gpus_per_replica = 1.0
    _check_model(args)
    cpus, gpus = resources(args)
    args.threads = max(1, int(cpus))
    start = time.perf_counter()
    ray.init(address=args.address, include_dashboard=False, logging_level="WARNING", configure_logging=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    try:
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config=quiet)
        serve.run(service.application(args, args.replicas, cpus, gpus), name=service.APP_NAME, route_prefix="/",
                  logging_config=quiet)
        log(f"serving {args.model} on http://{args.host}:{args.port} ({args.replicas} replica(s), {cpus:g} CPU "
            f"{gpus:g} GPU each, batches of up to {args.max_batch_size}, {args.batch_wait_ms:g} ms wait) after "
            f"{time.perf_counter() - start:.1f}s; Ctrl-C stops")
        while not stop.wait(0.5):
            pass
    except RuntimeError as error:  # a deployment that failed: its first line, not Ray's traceback
        raise CommandError(f"the service did not start: {str(error).strip().splitlines()[0]}") from None
    finally:
        log("stopping")
        _stop(ray, serve, service.APP_NAME, local=args.address is None)
    return 0


def _stop(ray, serve, name: str, local: bool) -> None:
    """Started here: Serve and Ray go. On a cluster: this application goes, and Serve only if nothing else runs."""
    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(name)
            if not serve.status().applications:
                serve.shutdown()
    finally:
        ray.shutdown()
