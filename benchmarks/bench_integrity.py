"""What checking every reused artifact costs: SHA-256 over the bytes a cached run reuses, at the embedded default
and at ViT-L/14 size (files of the sizes the ViT-L/14 run's artifacts have, random bytes: hashing does not care
what they hold). Cold = first read from disk after dropping nothing (the page cache as found); warm = again.

    python benchmarks/bench_integrity.py --out integrity.json [--embedded-root clip-fp8-output]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from clip_fp8.integrity import manifest_of, verify_store

# The artifacts a cached ViT-L/14 run reuses, by size (MB), as docs/benchmarks.md measured them: the quantized
# checkpoint (FP16 safetensors on a GPU), the four raw and four repaired graphs (FP16 text 248 / image 608, FP8
# 162 / 305) and the torch-fp8 weights (467); the small JSON files are left out.
VITL_FILES_MB = {"quantize/model.safetensors": 856, "export_fp16/text.onnx": 248, "export_fp16/image.onnx": 608,
                 "set_scales/text.onnx": 162, "set_scales/image.onnx": 305, "surgery_fp16/text.onnx": 248,
                 "surgery_fp16/image.onnx": 608, "surgery_fp8/text.onnx": 162, "surgery_fp8/image.onnx": 305,
                 "torch_fp8/model.safetensors": 467}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--embedded-root", type=Path, help="an output root of the embedded default (clip-fp8 run)")
    args = parser.parse_args()
    result: dict = {"meta": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
                             "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}}
    if args.embedded_root:
        cold, verified = timed(lambda: verify_store(args.embedded_root))
        warm, _ = timed(lambda: verify_store(args.embedded_root))
        size = sum(p.stat().st_size for p in Path(args.embedded_root, "store").rglob("*") if p.is_file())
        result["embedded"] = {"artifacts": verified["checked"], "bytes": size, "cold_s": cold, "warm_s": warm}
    with tempfile.TemporaryDirectory(dir=Path.home()) as scratch:  # on the disk stores live on, not a tmpfs
        root = Path(scratch)
        for rel, mb in VITL_FILES_MB.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            with open(root / rel, "wb") as f:
                for _ in range(mb):
                    f.write(os.urandom(1 << 20))
        cold, _ = timed(lambda: manifest_of(root))
        warm, _ = timed(lambda: manifest_of(root))
        total = sum(VITL_FILES_MB.values()) << 20
        result["vit_l_14"] = {"bytes": total, "cold_s": cold, "warm_s": warm, "gb_per_s_warm": total / warm / 1e9}
    args.out.write_text(json.dumps(result, indent=1))
    print("| case | bytes | first check s | again s |\n|---|---:|---:|---:|")
    for name in ("embedded", "vit_l_14"):
        if name in result:
            r = result[name]
            print(f"| {name} | {r['bytes'] / 1e6:.1f} MB | {r['cold_s']:.2f} | {r['warm_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
