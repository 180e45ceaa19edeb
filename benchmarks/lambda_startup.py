"""Cold-start import time of the four Lambda handlers, and the invoke function's own work per request.

Each import is timed in a fresh interpreter (what a Lambda cold start pays
before the first event), median of several runs. The per-request figure is
the invoke handler's parsing and checking of a base64 API Gateway body, with
no endpoint call. Prints a table.

    python benchmarks/lambda_startup.py [--runs 7]
"""
from __future__ import annotations

import argparse
import base64
import io
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAMBDA_DIR = ROOT / "lambda"
HANDLERS = ("deploy_endpoint", "wait_endpoint", "check_endpoint", "invoke_endpoint")
IMPORT_PROBE = (
    "import sys, time; sys.path.insert(0, {folder!r}); t = time.perf_counter(); import {module}; "
    "print(time.perf_counter() - t)"
)


def import_seconds(module: str, runs: int) -> list[float]:
    timings = []
    for _ in range(runs):
        probe = IMPORT_PROBE.format(folder=str(LAMBDA_DIR), module=module)
        output = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
        timings.append(float(output.strip().splitlines()[-1]))
    return timings


def request_parse_seconds(image_bytes: int, runs: int) -> list[float]:
    from PIL import Image

    sys.path.insert(0, str(LAMBDA_DIR))
    import invoke_endpoint
    import proxy_events

    side = 16
    while True:  # a noisy JPEG of about the wanted size
        buffer = io.BytesIO()
        Image.effect_noise((side, side), 64).convert("RGB").save(buffer, "JPEG", quality=95)
        if buffer.tell() >= image_bytes:
            break
        side = int(side * 1.3) + 1
    event = {
        "httpMethod": "POST", "headers": {"Content-Type": "image/jpeg"}, "requestContext": {"requestId": "bench"},
        "body": base64.b64encode(buffer.getvalue()).decode(), "isBase64Encoded": True,
    }
    settings = invoke_endpoint.Settings("bench", (), 5, 8 * 1024 * 1024, 5.0)
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        request = proxy_events.parse_request(event, settings.max_image_bytes)
        invoke_endpoint.image_from_request(request, settings)
        timings.append(time.perf_counter() - started)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    rows = [(f"import {module}", statistics.median(import_seconds(module, args.runs)) * 1000) for module in HANDLERS]
    rows.append(("import boto3 alone", statistics.median(import_seconds("boto3", args.runs)) * 1000))
    for size in (100_000, 1_000_000):
        rows.append((f"invoke: parse + check a {size // 1000} KB JPEG body", statistics.median(request_parse_seconds(size, 50)) * 1000))
    width = max(len(name) for name, _ in rows)
    print(f"{'what'.ljust(width)}  median ms")
    for name, milliseconds in rows:
        print(f"{name.ljust(width)}  {milliseconds:9.2f}")


if __name__ == "__main__":
    main()
