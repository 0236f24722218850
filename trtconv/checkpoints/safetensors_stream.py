"""safetensors files byte-identical to `safetensors.torch.save_file`, assembled from part files.

`merge_parts`: layer-streamed export writes each decoder layer's tensors to a part file as soon as
the layer is done; the rank file is then assembled from the parts, so host memory stays at one copy
buffer instead of the whole checkpoint.

(A `save_file_streamed` for ModelOpt's in-memory export was tried and removed: ModelOpt's
`pack_linear_weights` and `postprocess_tensors(force_cpu=True)` already hold the whole rank in host
memory before save_file is called, so the 8B export's 9.6 GiB of anonymous memory did not change;
H200 run 5 in docs/performance.md.)

Byte identity with save_file (so the paths give the same artifact digest) follows save_file's layout
(safetensors 0.8, `prepare` in tensor.rs): u64 header length | compact JSON header padded with spaces
to a multiple of 8 | tensors back to back in header order. The order (dtype rank, then name) is asked
of the installed library by serializing zero-length stand-ins, never hard-coded.
"""

from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from pathlib import Path

COPY_CHUNK = 64 << 20


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


def library_order(dtypes: dict[str, str]) -> list[str]:
    """Tensor names in the order save_file writes them, as the installed library sorts them."""
    import torch
    from safetensors.torch import _TYPES, save

    blob = save({name: torch.empty(0, dtype=_TYPES[dt]) for name, dt in dtypes.items()})
    n = struct.unpack("<Q", blob[:8])[0]
    return [k for k in json.loads(blob[8 : 8 + n]) if k != "__metadata__"]


def _write_header(f, order: list[str], infos: dict[str, tuple[str, list[int], int]], metadata: dict | None = None) -> None:
    """save_file's header for tensors written in `order`; infos: name -> (dtype, shape, byte size).
    save_file(..., metadata=...) puts `__metadata__` first."""
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for name in order:
        dtype, shape, size = infos[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    f.write(struct.pack("<Q", len(raw)) + raw)


def merge_parts(parts: list[Path], out: Path, chunk: int = COPY_CHUNK, names: set[str] | None = None,
                metadata: dict[str, str] | None = None) -> None:
    """Write `out` as save_file(union of the parts' tensors, metadata=metadata) would, copying bytes part
    by part; `names`: only these tensors (one shard of several)."""
    src: dict[str, tuple[Path, int, dict]] = {}
    for p in parts:
        start, header = read_header(p)
        for name, info in header.items():
            if name == "__metadata__" or (names is not None and name not in names):
                continue
            if name in src:
                raise ValueError(f"tensor {name} is in both {src[name][0]} and {p}")
            src[name] = (p, start, info)
    order = library_order({k: v[2]["dtype"] for k, v in src.items()})
    infos = {k: (v[2]["dtype"], v[2]["shape"], v[2]["data_offsets"][1] - v[2]["data_offsets"][0]) for k, v in src.items()}
    with ExitStack() as stack, open(out, "wb") as f:
        handles = {p: stack.enter_context(open(p, "rb")) for p in parts}  # each part opened once
        _write_header(f, order, infos, metadata)
        for name in order:
            path, start, info = src[name]
            a, b = info["data_offsets"]
            copy_range(handles[path], start + a, b - a, f, chunk)


def copy_range(src, offset: int, count: int, dst, chunk: int = COPY_CHUNK) -> None:
    """Append src[offset : offset + count] to dst (both open binary files): in the kernel with
    copy_file_range where the filesystem has it (no trip through user space; on btrfs/xfs a reflink),
    else by reads and writes of `chunk` bytes. The bytes are the same either way."""
    import os

    if count and hasattr(os, "copy_file_range"):
        dst.flush()
        out_fd, position = dst.fileno(), dst.tell()
        try:
            while count:
                n = os.copy_file_range(src.fileno(), out_fd, min(count, 1 << 30), offset, position)
                if n == 0:
                    raise OSError("copy_file_range copied nothing")
                offset, position, count = offset + n, position + n, count - n
            dst.seek(position)
            return
        except OSError:  # EXDEV, ENOSYS, EINVAL (some filesystems): the rest by reads and writes
            dst.seek(position)
            dst.truncate()
    src.seek(offset)
    while count:
        block = src.read(min(chunk, count))
        if not block:
            raise OSError(f"{src.name}: ended {count} bytes early")
        dst.write(block)
        count -= len(block)
