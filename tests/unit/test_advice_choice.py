"""Which measured exclude list the failed gate's advice suggests, and how it says so (trtconv.gate.sensitivity)."""

from __future__ import annotations

from trtconv.gate.sensitivity import advice_lines, candidate_sizes, choose


def test_the_candidates_bracket_the_estimate_and_end_at_every_layer():
    assert candidate_sizes(0, 30) == []
    assert candidate_sizes(23, 30) == [12, 17, 23, 26, 28, 30]
    assert candidate_sizes(1, 4) == [1, 2, 3, 4]


def test_the_smallest_list_measured_to_reach_the_target_is_chosen():
    measured = [{"layers": 2, "kl": 0.0, "estimated_gate_kl": 0.009}, {"layers": 4, "kl": 0.0, "estimated_gate_kl": 0.006},
                {"layers": 8, "kl": 0.0, "estimated_gate_kl": 0.001}]
    assert choose(measured, target=0.007, max_kl=0.01) == (measured[1], True)
    # None reaches the target: the smallest within the gate.
    assert choose(measured, target=0.0005, max_kl=0.01) == (measured[0], True)
    # None within the gate: the best measured, marked as failing.
    assert choose(measured, target=0.0001, max_kl=0.0005) == (measured[2], False)
    assert choose([], target=0.1, max_kl=0.1) == (None, None)


def _record(passes):
    return {"method": "m", "full_kl": 0.04, "gate_kl": 0.05, "estimated_gate_kl_with_suggested_exclude": 0.02,
            "layers": [{"layer": "model.layers.3", "kl": 0.01}], "suggested_exclude": ["*layers.3.*"],
            "kl_with_suggested_exclude": 0.016, "suggestion_passes_kl_gate": passes, "num_layers": 8,
            "precisions_to_try": ["int8_sq"], "wall_s": 12.0, "reused": {"checkpoint": "checkpoint", "export": "built by this run"}}


def test_a_list_measured_as_still_failing_is_never_offered_as_the_way():
    lines = advice_lines(_record(False), [], 0.01)
    assert not any(line.startswith("try quantization.exclude") for line in lines)
    assert any(line.startswith("no exclude list measured reaches the KL gate") and "about 0.02 (gate 0.01)" in line for line in lines)
    passing = advice_lines(_record(True), ["*lm_head*"], 0.03)
    assert any(line.startswith("try quantization.exclude: ['*lm_head*', '*layers.3.*']") for line in passing)
    assert "no calibration: it read the shipped checkpoint/, built by this run" in passing[-1]
