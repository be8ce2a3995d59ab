"""Benchmark: requests/s and latency of `headstart serve`, micro-batched vs one model call per
request, with 1, 8 and 32 concurrent clients on loopback, in the same run.

Each setting starts its own ``headstart serve`` process on 127.0.0.1 (batched: ``--max-batch
32 --max-wait-ms 5``; one call per request: ``--max-batch 1 --max-wait-ms 0``), warms it up,
then each of C clients posts one image per request, back to back, for a fixed number of
requests. Usage: ``python bench/serve_load.py RUN IMAGE [--requests 320]`` (RUN: e.g. the run
of ``headstart demo``). Writes ``bench/results/serve_load.{md,json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

SETTINGS = {
    "batched (32, 5 ms)": ["--max-batch", "32", "--max-wait-ms", "5"],
    "one call per request": ["--max-batch", "1", "--max-wait-ms", "0"],
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


async def _load(url: str, image: bytes, clients: int, requests: int) -> dict:
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
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("image")
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load"))
    args = parser.parse_args()
    image = Path(args.image).read_bytes()
    rows = []
    for name, options in SETTINGS.items():
        server, url = _start(args.run, options)
        try:
            asyncio.run(_load(url, image, 4, 16))  # warm-up: tracing, thread pools
            for clients in CLIENTS:
                result = asyncio.run(_load(url, image, clients, args.requests))
                calls = httpx.get(url + "/health").json()["batching"]
                rows.append({"setting": name, "clients": clients, **result, "server": calls})
                print(name, clients, {k: round(v, 1) for k, v in result.items()}, flush=True)
        finally:
            server.terminate()
            server.wait(30)
    lines = [
        f"`python bench/serve_load.py {args.run} {args.image} --requests {args.requests}` "
        f"({platform.machine()}, {time.strftime('%Y-%m-%d')})",
        "",
        "| server | clients | requests/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (r["clients"], r["setting"])):
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
