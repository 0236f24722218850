"""The layer-streamed export's merge of part files into a rank file: kernel copy against reads and writes.

    python3 scripts/bench_merge.py [--work /tmp/bench-merge] [--parts 8] [--mib-per-part 192] [--repeat 2]

Makes `--parts` safetensors part files (int8 and bf16 tensors, as an fp8/int8 layer's), then merges them
with `merge_parts` as shipped (os.copy_file_range) and with copy_file_range taken away (the read/write
fallback, what merge_parts did before), alternating, and prints a table. As root the page cache is
dropped before each merge, so the parts are read from disk as after a real export of a large model;
otherwise the parts are in page cache. Every output is compared with save_file's bytes.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtconv.artifact.writer import sha256_file  # after the repository is on the path


def make_parts(work: Path, n: int, mib: int) -> tuple[list[Path], str]:
    import torch
    from safetensors.torch import load_file, save_file

    work.mkdir(parents=True, exist_ok=True)
    rows = max(1, mib * 2**20 // (3 * 4096))  # int8 rows x 4096 + bf16 rows x 4096: 3 bytes a column pair
    g = torch.Generator().manual_seed(0)
    parts = []
    for i in range(n):
        p = work / f"part{i:03d}.safetensors"
        if not p.exists():
            save_file({f"transformer.layers.{i}.mlp.fc.weight": torch.randint(-128, 127, (rows, 4096), dtype=torch.int8, generator=g),
                       f"transformer.layers.{i}.mlp.proj.weight": torch.randn(rows, 4096, generator=g).to(torch.bfloat16),
                       f"transformer.layers.{i}.mlp.fc.weights_scaling_factor": torch.ones(())}, p)
        parts.append(p)
    ref = work / "save_file.safetensors"
    if not ref.exists():
        whole = {}
        for p in parts:
            whole.update(load_file(p))
        save_file(whole, ref)
    return parts, sha256_file(ref)


def drop_cache() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-merge"))
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--mib-per-part", type=int, default=192)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    from trtconv.checkpoints.safetensors_stream import merge_parts

    parts, want = make_parts(a.work, a.parts, a.mib_per_part)
    size = sum(p.stat().st_size for p in parts)
    real = getattr(os, "copy_file_range", None)
    rows = []
    for _ in range(a.repeat):
        for way in ("copy_file_range", "read/write"):
            if way == "read/write" and real is not None:
                del os.copy_file_range
            out = a.work / "merged.safetensors"
            out.unlink(missing_ok=True)
            cold = drop_cache()
            t = time.monotonic()
            merge_parts(parts, out)
            merged = time.monotonic() - t
            subprocess.run(["sync"], check=True)
            synced = time.monotonic() - t
            if real is not None:
                os.copy_file_range = real
            rows.append((way, cold, merged, synced, sha256_file(out) == want))
    print(f"merge_parts: {a.parts} parts, {size / 2**30:.2f} GiB; {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}, copy_file_range {'yes' if real else 'no'}")
    print("| copy | page cache dropped first | merge s | merge + sync s | same bytes as save_file |")
    print("|---|---|---|---|---|")
    for way, cold, merged, synced, same in rows:
        print(f"| {way} | {'yes' if cold else 'no (not root)'} | {merged:.2f} | {synced:.2f} | {same} |")


if __name__ == "__main__":
    main()
