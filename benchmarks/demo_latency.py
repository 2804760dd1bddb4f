"""How fast the demo page's server answers a drawing: python -m mnist_lab.demo started as a user
would, then a 280 x 280 PNG of a real test digit (the size of the page's pad) posted --requests
times, one after another, as the page does while drawing.

    python benchmarks/demo_latency.py --ckpt PATH [--requests 200] [--data-dir DIR]

Prints the median and 95th percentile of the round trip (HTTP, PNG decoding, preprocessing, the
model) and of the server's own time for it (the "ms" of each answer).
"""

import argparse
import io
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from mnist_lab.defaults import default_data_dir

ROOT = Path(__file__).resolve().parents[1]


def drawing(data_dir: Path) -> bytes:
    raw = (data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    digit = np.frombuffer(raw[16 : 16 + 784], np.uint8).reshape(28, 28)  # the first test image, a 7
    out = io.BytesIO()
    Image.fromarray(digit).resize((280, 280), Image.Resampling.BILINEAR).save(out, "PNG")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mnist_lab.demo", "--ckpt", args.ckpt, "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api/predict"
    try:
        body = drawing(Path(args.data_dir))
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit("the demo server did not start")
                time.sleep(0.2)
        round_trips, server_ms = [], []
        for _ in range(args.requests):
            start = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST")) as response:
                answer = json.load(response)
            round_trips.append(1000 * (time.perf_counter() - start))
            server_ms.append(answer["ms"])
        print(f"{args.requests} drawings (280 x 280 PNG, {len(body)} bytes), answered {answer['digit']}")
        for name, values in (("round trip", round_trips), ("server", server_ms)):
            p95 = statistics.quantiles(values, n=20)[-1]
            print(f"{name:>10}: median {statistics.median(values):.1f} ms, 95th percentile {p95:.1f} ms")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
