"""Usage: python scripts/sensitivity_speed.py ARTIFACT MODEL_DIR

The sensitivity pass's per-layer loop before and after LayerInputs, side by side on one model (CPU),
for an artifact built from it (e.g. by scripts/measure_precisions.py): one whole forward of the
sensitivity rows (what the old loop ran per layer) against the new loop (LayerInputs.kl_from for every
layer), same model, same process; prints one JSON line.
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trtconv.checkpoints.hf_model import load_hf_model, load_tokenizer
from trtconv.core.ui import Reporter
from trtconv.data import samples
from trtconv.gate import sensitivity as s
from trtconv.recipe.schema import Recipe
from trtconv.stages import calibrate
from trtconv.data.samples import TokenSet

art, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
m = json.loads((art / "manifest.json").read_text())
data = m["recipe"]; data["evaluate"]["gates"] = {}; data["quantization"]["awq_group_size"] = m["calibration"].get("awq_group_size")
recipe = Recipe.model_validate(data).resolved()
tok = load_tokenizer(model_dir, False)
calib_packs = samples.builtin_packs("calibration"); eval_packs = samples.builtin_packs("evaluation")
c, e = recipe.calibration, recipe.evaluate
ct = samples.calibration_rows(calib_packs, tok, c.num_samples, c.seq_len, c.seed)
et = samples.evaluation_rows(eval_packs, tok, e.num_samples, e.seq_len, e.seed)
torch.set_num_threads(2)
model = load_hf_model(model_dir, "float32", False, "cpu")
picked = s._spread_rows(et, s.SENSITIVITY_EVAL_ROWS)
rows = torch.tensor([et.rows[i] for i in picked]); lengths = [et.lengths[i] for i in picked]
with torch.no_grad():
    base = torch.log_softmax(model(input_ids=rows, use_cache=False).logits.float(), -1)
small = TokenSet(ct.rows[:16], ct.lengths[:16], ct.doc_ids, ct.data_path, ct.data_sha256, ct.seed)
calibrate.run(model, recipe.quantization, small, c.batch_size, "cpu", Reporter(quiet=True))
enabled = s._enabled_quantizers(model)
prefixes = s.layer_prefixes(model)
# old: one whole forward with layer 0's quantizers on (what the old loop ran per layer)
s._set_quantizers(model, lambda n: n in enabled and n.startswith(prefixes[0] + "."))
t = time.monotonic(); old0 = s._kl(model, rows, lengths, base); one_forward = time.monotonic() - t
s._set_quantizers(model, lambda n: False)
t = time.monotonic(); inputs = s.LayerInputs(model, rows); capture = time.monotonic() - t
t = time.monotonic(); kls = []
for i, p in enumerate(prefixes):
    s._set_quantizers(model, lambda n, p=p: n in enabled and n.startswith(p + "."))
    kls.append(inputs.kl_from(i, lengths, base))
loop = time.monotonic() - t
print(json.dumps({"precision": recipe.quantization.precision, "layers": len(prefixes), "rows": len(picked),
                  "one_whole_forward_s": round(one_forward, 2), "old_loop_estimate_s": round(one_forward * len(prefixes), 1),
                  "new_capture_s": round(capture, 2), "new_loop_s": round(loop, 1), "layer0_equal": kls[0] == old0}))
