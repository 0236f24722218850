"""Usage: python scripts/advice_speed.py ARTIFACT MODEL_DIR OLD_SENSITIVITY.py [ROWS]

The failed gate's advice before and after issue 21 item 4, side by side on one artifact (CPU, one
process, one after the other): OLD_SENSITIVITY.py is gate/sensitivity.py of an earlier commit (e.g.
`git show 03446dc:trtconv/gate/sensitivity.py > old.py`), which calibrated the original again in
float32; the current one reads the artifact's shipped checkpoint. Prints one JSON line: each one's
wall time and CPU time (process_time: comparable on a loaded host), the old one's calibration part
on its own, its ranking's top layers and suggestion. ROWS (default 6, both modules' SENSITIVITY_EVAL_ROWS)
makes a quicker comparison: the layer loops scale with it, the old calibration (16 rows) does not.
"""
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trtconv.checkpoints.hf_model import load_tokenizer  # noqa: E402
from trtconv.core.ui import Reporter  # noqa: E402
from trtconv.data import samples  # noqa: E402
from trtconv.gate import sensitivity as new  # noqa: E402
from trtconv.recipe.schema import Recipe  # noqa: E402
from trtconv.stages.evaluate import candidate_dir  # noqa: E402

art, model_dir, old_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
spec = importlib.util.spec_from_file_location("old_sensitivity", old_path)
old = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = old  # its dataclasses look their module up
spec.loader.exec_module(old)
rows = int(sys.argv[4]) if len(sys.argv) > 4 else 6
old.SENSITIVITY_EVAL_ROWS = new.SENSITIVITY_EVAL_ROWS = rows
from trtconv.stages import calibrate  # noqa: E402

calibration = {"s": 0.0, "cpu_s": 0.0}
real_calibrate = calibrate.run


def timed_calibrate(*args, **kwargs):  # the old pass's second calibration, timed on its own
    t, cpu = time.monotonic(), time.process_time()
    try:
        return real_calibrate(*args, **kwargs)
    finally:
        calibration["s"] += time.monotonic() - t
        calibration["cpu_s"] += time.process_time() - cpu


calibrate.run = timed_calibrate
m = json.loads((art / "manifest.json").read_text())
data = m["recipe"]
data["quantization"]["awq_group_size"] = m["calibration"].get("awq_group_size")
recipe = Recipe.model_validate(data).resolved()
tok = load_tokenizer(model_dir, False)
c, e = recipe.calibration, recipe.evaluate
calib = samples.calibration_rows(samples.builtin_packs("calibration"), tok, c.num_samples, c.seq_len, c.seed)
tokens = samples.evaluation_rows(samples.builtin_packs("evaluation"), tok, e.num_samples, e.seq_len, e.seed)
metrics = m["metrics"]
measured = max(x["mean_kl"]["value"] for x in [metrics, *(metrics.get("packs") or {}).values()])
out = {"precision": recipe.quantization.precision, "gate_kl": measured, "rows": rows}
t, cpu = time.monotonic(), time.process_time()
before = old.run(model_dir, recipe, calib, tokens, measured, "cpu", Reporter(quiet=True)).record()
out["before_s"], out["before_cpu_s"] = round(time.monotonic() - t, 1), round(time.process_time() - cpu, 1)
out["before_calibration"] = {k: round(v, 1) for k, v in calibration.items()}
t, cpu = time.monotonic(), time.process_time()
after = new.run(model_dir, candidate_dir(recipe, art), recipe, tokens, measured, "cpu", Reporter(quiet=True)).record()
out["after_s"], out["after_cpu_s"] = round(time.monotonic() - t, 1), round(time.process_time() - cpu, 1)
out["after_seconds"] = after["seconds"]
for name, rec in (("before", before), ("after", after)):
    out[name] = {"top5": [(d["layer"], round(d["kl"], 5)) for d in rec["layers"][:5]], "full_kl": rec["full_kl"],
                 "exclude": len(rec["suggested_exclude"]), "kl_with": rec["kl_with_suggested_exclude"]}
out["after"]["candidates"] = after["exclude_candidates"]
print(json.dumps(out))
