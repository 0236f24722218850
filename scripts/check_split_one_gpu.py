"""On one GPU: the split's threads (two "devices" that are both cuda:0) write the one-device bytes.

    python3 scripts/check_split_one_gpu.py WORK

Not a multi-GPU measurement (no peer copies, no speed-up: one card): it checks, on a real CUDA device,
what the CPU tests cannot, that concurrent ModelOpt calibration on CUDA threads (each setting its
current device, the attention under its lock) and the hand-off between threads give byte-identical
checkpoints: fp8 with an fp8 KV cache, and int4_awq. Prints PASS/FAIL per precision and the seconds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import json

    from tests.contract.test_streaming import _recipe
    from tests.factories import make_tiny_model
    from trtconv.checkpoints.hf_model import load_tokenizer
    from trtconv.core.ui import Reporter
    from trtconv.data.packs import builtin_pack
    from trtconv.data.samples import calibration_rows
    from trtconv.pipeline import run_calibrate_and_export
    from trtconv.stages.devices import Devices

    work = Path(sys.argv[1])
    model = make_tiny_model(work / "model", "llama", hidden_size=512, intermediate_size=1024, num_hidden_layers=6)
    tok = load_tokenizer(model, False)
    arch = json.loads((model / "config.json").read_text())["architectures"][0]
    ok = True
    for precision, kv in (("fp8", "fp8"), ("int4_awq", "none")):
        recipe = _recipe(model, precision, kv)
        c = recipe.calibration
        rows = calibration_rows(builtin_pack("calib"), tok, c.num_samples, c.seq_len, c.seed)
        dirs = {}
        for name, devices in (("one", None), ("split", Devices(("cuda:0", "cuda:0")))):
            t = time.monotonic()
            exported, _, _ = run_calibrate_and_export(recipe, model, arch, tok, rows, work / f"{precision}-{name}", "cuda",
                                                      Reporter(quiet=True), streamed=True, devices=devices)
            dirs[name] = exported.checkpoint_dir
            print(f"{precision} {name}: {time.monotonic() - t:.1f} s", flush=True)
        same = all((dirs["one"] / f.name).read_bytes() == f.read_bytes() for f in sorted(dirs["split"].iterdir()) if f.is_file())
        ok &= same
        print(f"{precision} (kv {kv}): {'PASS' if same else 'FAIL'}: split files equal the one-device files", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
