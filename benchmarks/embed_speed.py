"""Embedding throughput of a backbone on this machine: fp32 vs bf16 autocast, NCHW vs channels_last.

    python -m benchmarks.embed_speed [--backbone efficientnet_lite0] [--image-size 128] [--batch 64]

All variants run side by side in one process (best of ``--repeats`` timed batches after a warm-up).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import md_table, write_outputs
from cdretrieval.models.backbones import build_backbone


def _throughput(model: torch.nn.Module, x: torch.Tensor, bf16: bool, repeats: int) -> float:
    best = 0.0
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x)
            if i:  # first pass is warm-up
                best = max(best, x.shape[0] / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    model = build_backbone(args.backbone).eval()
    x = torch.rand(args.batch, 3, args.image_size, args.image_size)
    rows, results = [], {}
    for layout in ("nchw", "channels_last"):
        m = model.to(memory_format=torch.channels_last) if layout == "channels_last" else model
        xi = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        for precision in ("fp32", "bf16"):
            ips = _throughput(m, xi, precision == "bf16", args.repeats)
            results[f"{layout}/{precision}"] = ips
            rows.append([layout, precision, round(ips, 1)])
    base = results["nchw/fp32"]
    for r in rows:
        r.append(round(results[f"{r[0]}/{r[1]}"] / base, 2))
    table = md_table(["layout", "precision", "images/s", "× fp32 NCHW"], rows)
    threads = torch.get_num_threads()
    title = f"{args.backbone} @ {args.image_size}px, batch {args.batch}, inference, CPU threads {threads}"
    write_outputs("embed_speed", {"args": vars(args), "images_per_s": results}, f"**{title}**\n\n{table}")


if __name__ == "__main__":
    main()
