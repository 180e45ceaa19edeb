"""The endpoint under concurrent load: the real TorchServe front end with the container's handler service.

TorchServe is started as the PyTorch inference container's ``serve`` starts it
(``pipeline/local/torchserve.py``: the same config.properties, bound to 127.0.0.1), serving the
model archive the Evaluate step writes: resnet50 at 224 px (random weights, 10 classes) with its
stored fp32 serving artifact (the default InferencePrecision), built as ``cold_start.py`` builds it. For each server setting
(model server workers x threads per worker, set through the model's environment:
``SAGEMAKER_MODEL_SERVER_WORKERS`` and ``OMP_NUM_THREADS``), 1, 4 and 16 concurrent clients
each send the same number of requests, walking a mix of valid JPEG, PNG and JSON bodies and bad
ones (truncated JPEG, wrong Content-Type, a body above 6 MiB, non-UTF-8 JSON, malformed JSON;
``pipeline/local/load_run.py``). It prints requests per second, latency p50/p95/p99, the count
of 5xx answers and of answers with another status than the request must get, and the server's
resident memory (front end and workers) when it started serving and after each client count.
Only loopback traffic; every request has a 60 s timeout.

    .venv/bin/python benchmarks/serving_load.py [--requests-each 12] [--settings 1x1 1x2 2x1]
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from cold_start import stored_model_dir, training_model_dir  # noqa: E402
from inference_latency import PHOTO_SIZE, jpeg_bytes, load_average, machine  # noqa: E402

from pipeline.local.load_run import load_run, request_mix  # noqa: E402
from pipeline.local.torchserve import front_end  # noqa: E402
from real_images import sample_photo, write_digits  # noqa: E402

CLIENTS = (1, 4, 16)


HEADER = (f"{'workers x threads':>17} {'clients':>7} {'requests':>8} {'req/s':>6} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'p99 ms':>7} {'5xx':>4} {'wrong 4xx':>9} {'RSS before MiB':>14} {'RSS after MiB':>13}")


def row_text(row: tuple) -> str:
    name, clients, count, rate, p50, p95, p99, errors, wrong, before, after = row
    return (f"{name:>17} {clients:>7} {count:>8} {rate:>6.2f} {p50:>7.0f} {p95:>7.0f} {p99:>7.0f} {errors:>4} {wrong:>9} "
            f"{before:>14.0f} {after:>13.0f}")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def setting(text: str) -> tuple[int, int]:
    """``WxT``: W model server workers of T threads each."""
    try:
        workers, threads = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WORKERSxTHREADS, e.g. 2x1") from None
    if workers < 1 or threads < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: workers and threads must be 1 or more")
    return workers, threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests-each", type=int, default=12, help="requests per client")
    parser.add_argument("--settings", type=setting, nargs="+", default=[(1, 1), (1, 2), (2, 1)],
                        help="model server workers x threads per worker, e.g. 2x1")
    args = parser.parse_args()
    print(f"machine: {machine()}; load average at the start {load_average()}")
    photo = sample_photo("china.jpg").resize(PHOTO_SIZE, Image.BICUBIC)
    jpeg, png = jpeg_bytes(photo), png_bytes(photo.resize((224, 168)))
    mix = request_mix(jpeg, png)
    print(f"request mix (each client walks it from its own place): {', '.join(f'{r.name} -> {r.expected}' for r in mix)}")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        training_model_dir(scratch / "training", write_digits(scratch / "digits", per_class={"valid": 4}, size=224))
        stored_model_dir(scratch / "training", scratch / "model", "fp32")
        for workers, threads in args.settings:
            work = scratch / f"server-{workers}x{threads}"
            work.mkdir()
            environment = {"SAGEMAKER_MODEL_SERVER_WORKERS": str(workers), "OMP_NUM_THREADS": str(threads),
                           "MKL_NUM_THREADS": str(threads)}
            with front_end(scratch / "model", work, (jpeg, "image/jpeg"), environment) as server:
                resident = server.resident_mib()
                for clients in CLIENTS:
                    result = load_run(server.url, mix, clients, args.requests_each)
                    rows.append((f"{workers}x{threads}", clients, len(result.answers), result.per_second,
                                 result.latency_ms(50), result.latency_ms(95), result.latency_ms(99), result.server_errors,
                                 len(result.wrong) - result.server_errors, resident, server.resident_mib()))
                    resident = rows[-1][-1]
                    print(f"{row_text(rows[-1])}   (load average {load_average()})", flush=True)

    print(f"\n{HEADER}\n{'-' * len(HEADER)}")
    for row in rows:
        print(row_text(row))
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
