"""Benchmark: requests/s and latency of `headstart serve`, micro-batched vs one model call per
request, with 1, 8 and 32 concurrent clients on loopback, in the same run.

One ``headstart serve`` process per setting, all started up front on 127.0.0.1: batched (the
defaults, ``--max-batch 32 --max-wait-ms 5``: a model call takes what is queued, and waits up
to 5 ms only for images of requests being decoded right now), batched without any waiting
(``--max-wait-ms 0``), and one call per request (``--max-batch 1``). Each is warmed up, then
the rows are measured interleaved: ``--rounds`` times over, for each client count, each
setting in turn (in an order rotated every round) gets its share of the requests, so that a
slow spell of the shared machine hits all settings alike. C clients each post one image per
request, back to back. Usage: ``python bench/serve_load.py RUN IMAGE [--requests 320]
[--rounds 4] [--clients 1 8 32]`` (RUN: e.g. the run of ``headstart demo``). Writes
``bench/results/serve_load.{md,json}`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

SETTINGS = {
    "batched (default)": [],
    "batched, never waits": ["--max-wait-ms", "0"],
    "one call per request": ["--max-batch", "1"],
}
CLIENTS = (1, 8, 32)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(run: str, options: list[str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, "-m", "headstart", "--quiet", "serve", run, "--port", str(port)]
    server = subprocess.Popen(command + options)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.2)
    server.terminate()
    raise RuntimeError("the server did not start")


async def _load(url: str, image: bytes, clients: int, requests: int) -> tuple[list, float]:
    """Latencies (s) of ``requests`` requests from ``clients`` clients, and the wall time."""
    latencies: list[float] = []
    per_client = max(1, requests // clients)

    async def client(http: httpx.AsyncClient) -> None:
        for _ in range(per_client):
            start = time.perf_counter()
            response = await http.post("/predict", files={"files": ("image.png", image)})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return latencies, time.perf_counter() - started


def _row(latencies: list[float], seconds: float) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("image")
    parser.add_argument("--requests", type=int, default=320, help="per row and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load"))
    args = parser.parse_args()
    image = Path(args.image).read_bytes()
    servers = {}
    try:
        for name, options in SETTINGS.items():
            servers[name] = _start(args.run, options)
        for _, url in servers.values():  # warm-up: tracing of every batch size, thread pools
            for clients in args.clients:
                asyncio.run(_load(url, image, clients, 2 * clients))
        measured = {(n, c): ([], 0.0) for n in SETTINGS for c in args.clients}
        names = list(servers)
        for round_ in range(args.rounds):
            for clients in args.clients:
                turn = round_ % len(names)
                for name in names[turn:] + names[:turn]:
                    url = servers[name][1]
                    latencies, seconds = asyncio.run(_load(url, image, clients, args.requests))
                    done, total = measured[name, clients]
                    measured[name, clients] = (done + latencies, total + seconds)
                    print(round_, name, clients, round(len(latencies) / seconds, 1), flush=True)
        rows = []
        for (name, clients), (latencies, seconds) in measured.items():
            batching = httpx.get(servers[name][1] + "/health").json()["batching"]
            rows.append({"setting": name, "clients": clients, **_row(latencies, seconds)})
            rows[-1]["server"] = batching
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(60)
    lines = [
        f"`python bench/serve_load.py {args.run} {args.image} --requests {args.requests} "
        f"--rounds {args.rounds} --clients {' '.join(map(str, args.clients))}` "
        f"({platform.machine()}, {os.cpu_count()} cores shared by client "
        f"and servers, {time.strftime('%Y-%m-%d')})",
        "",
        "| server | clients | requests/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: r["clients"]):
        lines.append(
            f"| {row['setting']} | {row['clients']} | {row['requests_per_s']:.1f} | "
            f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
