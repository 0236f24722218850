"""Output that works on a terminal and in a CI log (issue 13, "output that works in both places")."""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml

from tests.doubles.conftest_double import no_trtllm  # noqa: F401  (fixture)

DIGEST_LINE = re.compile(r"^artifact_digest: [0-9a-f]{64}$", re.M)


def _commands():
    """Every command path of the CLI, groups included: ('build',), ('recipe', 'list'), ..."""
    import typer.main

    from trtconv.cli.app import app

    root = typer.main.get_command(app)
    paths = [()]

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            paths.append((*prefix, name))
            if hasattr(cmd, "commands"):
                walk(cmd, (*prefix, name))

    walk(root, ())
    return paths


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "trtconv")
def test_every_help_has_an_example_and_flags_show_no_bool(cli, path):
    r = cli(*path, "--help")
    assert r.exit_code == 0, r.output
    assert "Example" in r.output
    assert "<bool>" not in r.output


def test_every_calibrate_option_has_help_and_batch_size_matches_the_recipes():
    import typer.main

    from trtconv.cli.app import app
    from trtconv.recipe.schema import builtin_recipes_dir

    calibrate = typer.main.get_command(app).commands["calibrate"]
    missing = [p.name for p in calibrate.params if not getattr(p, "help", None)]
    assert missing == []
    default = next(p.default for p in calibrate.params if p.name == "batch_size")
    shipped = {yaml.safe_load(f.read_text())["calibration"]["batch_size"] for f in builtin_recipes_dir().glob("*.yaml")}
    assert shipped == {default}


def test_json_user_error_is_a_json_object_on_stdout(cli, tmp_path):
    r = cli("build", "no-such-recipe", "--json")
    assert r.exit_code == 2
    assert json.loads(r.stdout) == {"error": json.loads(r.stdout)["error"], "exit_code": 2}
    assert "no-such-recipe" in json.loads(r.stdout)["error"]
    r = cli("inspect", tmp_path, "--json")
    assert r.exit_code == 2 and json.loads(r.stdout)["exit_code"] == 2


def test_json_usage_errors_from_typer_are_json_too():
    """A value Typer itself refuses (before any trtconv code runs) still gives the JSON object under --json."""
    import subprocess
    import sys

    from tests.conftest import REPO

    for args, needle in ((["build", "default", "--device", "tpu"], "'tpu' is not one of"), (["version"], "No such option: --json")):
        r = subprocess.run([sys.executable, "-m", "trtconv", *args, "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        out = json.loads(r.stdout)
        assert out["exit_code"] == 2 and needle in out["error"], out
        assert "Traceback" not in r.stderr and needle in r.stderr  # the message is on stderr as well
    r = subprocess.run([sys.executable, "-m", "trtconv", "build", "default", "--device", "tpu"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""  # without --json: Typer's own output, unchanged


def test_plain_output_is_never_wrapped_and_tables_become_lines(capsys):
    from trtconv.core.ui import Reporter

    rep = Reporter(force_plain=True)
    long = "trtllm-build --checkpoint_dir " + "/very/long/path" * 20 + " --output_dir /x"
    rep.line(long)
    rep.info(long)
    rep.table("gates", ["gate", "verdict"], [["max_kl", "pass"], ["min_top1_agreement", "fail"]])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == long and out[1].endswith(long) and len(out) == 4
    assert out[2:] == ["gates: gate=max_kl, verdict=pass", "gates: gate=min_top1_agreement, verdict=fail"]


def test_long_phase_heartbeat_in_logs_and_a_closing_time(capsys, monkeypatch):
    from trtconv.core.ui import Reporter

    monkeypatch.setenv("TRTCONV_HEARTBEAT_S", "0.05")
    rep = Reporter(force_plain=True)
    with rep.phase("calibrate"):
        with rep.progress("calibration batches", total=2, then="ModelOpt computes the scales") as advance:
            advance()
            advance()
        time.sleep(0.3)  # ModelOpt's silent part (an AWQ search)
    out = capsys.readouterr().out
    assert re.search(r"calibration batches: 2/2 \([0-9.]+/s\)", out)
    assert "calibrate: still running" in out and "(last: calibration batches: done; ModelOpt computes the scales)" in out
    assert re.search(r"calibrate: finished in [0-9.]+ s", out)


@pytest.mark.integration
def test_build_log_and_engine_command_and_inspect(cli, tiny_llama, tmp_path, no_trtllm):  # noqa: F811
    # No TensorRT-LLM here (as on a CPU runner): the engine is not built, its command is recorded.
    out = tmp_path / ("a-rather-long-folder-name-so-commands-pass-80-columns" * 2) / "out"
    r = cli("calibrate", "--model", tiny_llama, "--precision", "none", "-o", out, "--num-samples", "4", "--seq-len", "64",
            "--set", "evaluate.num_samples=8", "--set", "evaluate.seq_len=64", "--set", "evaluate.allow_inconclusive=true",
            "--set", "evaluate.gates.max_kl=100", "--set", "evaluate.gates.max_ppl_increase_pct=1000",
            "--set", "engine.target=tensorrt")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "starting: importing torch" in lines[0]
    for stage in ("load", "export", "evaluate", "engine"):
        assert any(re.search(rf"\] {stage}: finished in [0-9.]+ s", line) for line in lines), stage
    assert DIGEST_LINE.search(r.output)
    engine_lines = [line for line in lines if line.startswith("engine command: trtllm-build ")]
    assert len(engine_lines) == 1 and len(engine_lines[0]) > 80 and " --output_dir " in engine_lines[0]
    # `trtconv engine OUT` where nothing can be built: the command on one line, the manifest untouched.
    before = (out / "manifest.json").read_bytes()
    e = cli("engine", out)
    assert e.exit_code == 0, e.output
    assert any(line.startswith("command: trtllm-build --checkpoint_dir ") and len(line) > 80 for line in e.output.splitlines())
    assert (out / "manifest.json").read_bytes() == before
    shown = cli("inspect", out).output
    assert len([line for line in shown.splitlines() if "not_built" in line]) == 1
    report = (out / "report.md").read_text()
    assert "## Serve it" in report
    assert "trtconv engine OUT --target tensorrt --require-engine" in report
    assert "trtllm-serve OUT/engine --backend tensorrt --tokenizer OUT/tokenizer" in report


# ---------------------------------------------------------------------------------------------
# report.md: charts readable at 70B scale, gate thresholds shown, a command to serve the artifact


def _gates():
    from trtconv.artifact.manifest import GateResult

    return [GateResult(metric="max_kl", comparator="<=", threshold=0.05, value=0.01, verdict="pass"),
            GateResult(metric="min_top1_agreement", comparator=">=", threshold=0.9, value=0.95, verdict="pass")]


def test_weight_error_chart_stays_readable_at_hundreds_of_layers(tmp_path):
    from PIL import Image

    from trtconv.artifact.report import plot_weight_errors, weight_error_figure

    kinds = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    errors = [(f"model.layers.{i}.{k}", 0.01 + 0.0001 * i + 0.001 * j) for i in range(80) for j, k in enumerate(kinds)]
    errors.append(("lm_head", 0.02))
    path = tmp_path / "w.png"
    plot_weight_errors(errors, path, _gates())
    width, height = Image.open(path).size
    assert width <= 1200 and height <= 600  # one page wide, whatever the layer count (was 0.18 in per module)
    fig = weight_error_figure(errors, _gates())
    ax = fig.axes[0]
    assert ax.get_xlabel() == "layer index"
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == sorted([*kinds, "lm_head (outside the layers)"])
    assert all(len(line.get_xdata()) == 80 for line in ax.lines if line.get_label() in kinds)
    assert any(t.get_text() == "gate max_kl <= 0.05: pass" for t in fig.texts)


def test_kl_chart_draws_the_gate_threshold():
    import numpy as np

    from trtconv.artifact.report import token_kl_figure

    fig = token_kl_figure(np.array([0.001, 0.01, 0.02, 0.2]), _gates())
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "gate: mean KL <= 0.05 (pass)" in labels
    gate_line = next(line for line in fig.axes[0].lines if line.get_label().startswith("gate:"))
    assert gate_line.get_xdata()[0] == pytest.approx(np.log10(0.05))


def test_cache_prune_json_error_is_json(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTCONV_CACHE", str(tmp_path / "cache"))
    r = cli("cache", "prune", "--json")
    assert r.exit_code == 2
    assert json.loads(r.stdout)["exit_code"] == 2 and "say what to prune" in json.loads(r.stdout)["error"]
