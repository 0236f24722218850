"""The sensitivity pass's per-layer KL started at the layer equals the whole forward's (gate/sensitivity.py).

LayerInputs skips the layers before layer i, which compute with every quantizer off; this checks,
on real ModelOpt-quantized tiny models, that the shortcut changes no KL: bit for bit, per layer,
for max calibration (fp8) and SmoothQuant (int8_sq, which rescales weights and inputs), on a Llama
and on a Qwen2 that mixes full and sliding-window attention layers (per-layer masks).
"""

from __future__ import annotations

import pytest
import torch

from tests.factories import tiny_config


def _quantized(arch: str, precision: str, **overrides):
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from trtconv.recipe.schema import QuantizationSection
    from trtconv.stages.calibrate import build_quant_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, num_hidden_layers=4, **overrides)).float().eval()
    calib = torch.randint(0, model.config.vocab_size, (4, 32))

    def loop(m):
        with torch.no_grad():
            m(input_ids=calib, use_cache=False)

    mtq.quantize(model, build_quant_config(QuantizationSection(precision=precision)), loop)
    return model


@pytest.mark.parametrize("arch,precision,overrides", [
    ("llama", "fp8", {}),
    ("llama", "int8_sq", {}),
    ("qwen2", "fp8", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
])
def test_the_kl_started_at_a_layer_equals_the_whole_forward(arch, precision, overrides):
    from trtconv.gate import sensitivity as s

    model = _quantized(arch, precision, **overrides)
    if arch == "qwen2":
        assert len(set(model.config.layer_types)) == 2  # both kinds of layer, so per-layer masks matter
    rows = torch.randint(0, model.config.vocab_size, (3, 24))
    lengths = [24, 20, 24]
    enabled = s._enabled_quantizers(model)
    s._set_quantizers(model, lambda n: False)
    with torch.no_grad():
        base_logp = torch.log_softmax(model(input_ids=rows, use_cache=False).logits.float(), -1)
    inputs = s.LayerInputs(model, rows)
    kls = []
    for i, prefix in enumerate(s.layer_prefixes(model)):
        s._set_quantizers(model, lambda n, p=prefix: n in enabled and n.startswith(p + "."))
        whole = s._kl(model, rows, lengths, base_logp)
        assert inputs.kl_from(i, lengths, base_logp) == whole, prefix
        kls.append(whole)
    assert all(k > 0 for k in kls)  # each layer's quantizers do change the output
