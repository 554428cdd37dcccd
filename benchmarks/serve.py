"""Throughput and latency of `stamp-hf serve` (Ray Serve, dynamic batching on and off) and of the web demo's gradio
`/segment` endpoint (`stamp-hf demo`), side by side, on the bundled demo model.

Each server runs as its own `stamp-hf` subprocess on a free port of 127.0.0.1, one after the other (so they never
share the CPUs): serve with --max-batch-size B (batching on), serve with --max-batch-size 1 (off), and the demo with
each --demo-concurrency (the web demo's model calls at once on the one shared model). For 1, 2, 4 and 8 concurrent clients (threads, each with its own connection or
gradio Client), --requests requests go out (examples/shapes.png, the prompts cycling through the demo examples),
after --warmup requests per server; reported: requests/s (requests / wall time) and p50 / p95 latency.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/serve.py [--requests 32] [--clients 1 2 4 8] [--max-batch-size 8]
          [--batch-wait-ms 10] [--replicas 1] [--demo-concurrency 1 2] [--json benchmarks/results/serve_cpu.json]
Smoke: --requests 4 --clients 1 4.
"""

import argparse
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "examples" / "shapes.png"
PROMPTS = ("Please segment the red circle.", "Please segment the blue triangle.", "Please segment the red diamond.",
           "Is the star big or small?")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(arguments: list[str], ready_path: str, log) -> tuple[subprocess.Popen, str]:
    """A `stamp-hf` server subprocess and its URL, once `ready_path` answers."""
    port = free_port()
    script = Path(sys.executable).with_name("stamp-hf")
    process = subprocess.Popen([str(script), *arguments, "--host", "127.0.0.1", "--port", str(port)],
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                                    "RAY_USAGE_STATS_ENABLED": "0"},
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(url + ready_path, timeout=5).close()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"{' '.join(arguments)} did not start; see {log.name}")
            time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)


def serve_client(url: str):
    """A function (prompt) -> None that sends one /v1/segment request and checks the answer."""
    image = base64.b64encode(SHAPES.read_bytes()).decode()

    def request(prompt: str) -> None:
        body = json.dumps({"image": image, "prompt": prompt}).encode()
        call = urllib.request.Request(url + "/v1/segment", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(call, timeout=300) as response:
            assert response.status == 200 and "text" in json.loads(response.read())

    return request


def demo_client(url: str):
    from gradio_client import Client, handle_file

    client = Client(url + "/", verbose=False)

    def request(prompt: str) -> None:
        text, _, _ = client.predict(handle_file(str(SHAPES)), prompt, api_name="/segment")
        assert isinstance(text, str)

    return request


def measure(make_client, url: str, clients: int, requests: int) -> dict:
    """requests/s and latency percentiles of `requests` requests sent by `clients` threads at once."""
    senders = [make_client(url) for _ in range(clients)]
    latencies = []

    def worker(k: int) -> None:
        for n in range(k, requests, clients):
            begin = time.perf_counter()
            senders[k](PROMPTS[n % len(PROMPTS)])
            latencies.append(time.perf_counter() - begin)

    start_time = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - start_time
    ordered = sorted(latencies)
    return {"clients": clients, "requests": requests, "requests_per_s": round(requests / wall, 3),
            "p50_ms": round(1000 * statistics.median(ordered), 1),
            "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32, help="requests per point (default 32)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--demo-concurrency", type=int, nargs="+", default=[1, 2],
                        help="stamp-hf demo --concurrency values, one demo run each (default 1 2: one model call at a "
                        "time, and the demo's CPU default)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "serve_cpu.json"))
    args = parser.parse_args()

    serve_common = ["serve", "--replicas", str(args.replicas), "--batch-wait-ms", str(args.batch_wait_ms)]
    servers = [
        (f"serve, batching on (B={args.max_batch_size}, {args.batch_wait_ms:g} ms)",
         [*serve_common, "--max-batch-size", str(args.max_batch_size)], "/healthz", serve_client),
        ("serve, batching off (B=1)", [*serve_common, "--max-batch-size", "1"], "/healthz", serve_client),
        *((f"demo /segment (gradio, --concurrency {n})", ["demo", "--concurrency", str(n)], "/", demo_client)
          for n in args.demo_concurrency),
    ]
    results = {}
    with tempfile.TemporaryDirectory(prefix="stamp-bench-serve-") as folder:
        for name, arguments, ready_path, make_client in servers:
            with open(Path(folder) / f"{arguments[0]}-{len(results)}.log", "w") as log:
                started = time.perf_counter()
                process, url = start(arguments, ready_path, log)
                print(f"{name}: started in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
                try:
                    measure(make_client, url, 1, args.warmup)
                    results[name] = [measure(make_client, url, c, args.requests) for c in args.clients]
                finally:
                    stop(process)
            for point in results[name]:
                print(f"  {point}", file=sys.stderr, flush=True)

    names = list(results)
    print(f"{'clients':>8} | " + " | ".join(f"{n[:34]:>34}" for n in names))
    print(f"{'':>8} | " + " | ".join(f"{'req/s   p50 ms   p95 ms':>34}" for _ in names))
    for k, clients in enumerate(args.clients):
        cells = [results[n][k] for n in names]
        print(f"{clients:>8} | " + " | ".join(
            f"{c['requests_per_s']:>12.2f} {c['p50_ms']:>9.0f} {c['p95_ms']:>9.0f}  " for c in cells))
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "model": "the bundled demo model (stamp_hf.demo_model.DEMO_MODEL)", "image": "examples/shapes.png (320x240)",
        "settings": {key: getattr(args, key) for key in ("requests", "warmup", "clients", "max_batch_size",
                                                         "batch_wait_ms", "replicas", "demo_concurrency")},
        "results": results,
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
