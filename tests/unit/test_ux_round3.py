"""Issue 23 items 9-11 (silent or late, messages, friction), each as its own small check.

Nothing here runs ModelOpt or a subprocess: the pipeline's pieces are called directly, with fakes
where a model would be (a tokenizer that records what it is given, a two-layer module).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.unit.test_cache import cache, invoke, root, source, three_entries  # noqa: F401  (fixtures)
from trtconv.artifact.manifest import GateResult
from trtconv.core.errors import ArtifactError, DataError, EngineUnavailable, ModelError, RecipeError
from trtconv.core.ui import Reporter

# ---------------------------------------------------------------------------------------------
# 9. Silent or late


class RecordingTokenizer:
    """One token per 4 characters; remembers the length of every text it was asked to tokenize."""

    eos_token_id = 0

    def __init__(self):
        self.lengths: list[int] = []

    def __call__(self, text: str, add_special_tokens: bool = False):
        self.lengths.append(len(text))
        return {"input_ids": [1 + (i % 50) for i in range(0, len(text), 4)]}


def _pack(tmp_path: Path, texts: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_a_huge_document_is_cut_before_it_is_tokenized(tmp_path):
    """One 51 MB line took 100 s and 8 GB for 1024 tokens: only what the rows need is tokenized."""
    from trtconv.data.samples import MAX_CHARS_PER_TOKEN, calibration_rows, evaluation_rows

    data = _pack(tmp_path, ["word " * 2_000_000])  # 10 MB in one document
    tok = RecordingTokenizer()
    calib = calibration_rows(data, tok, num_samples=4, seq_len=64, seed=1)
    assert max(tok.lengths) <= (4 * 64 + 1) * MAX_CHARS_PER_TOKEN
    assert len(calib.rows) == 4 and all(len(r) == 64 for r in calib.rows)
    assert "tokenize_rule" in calib.manifest_record()
    tok = RecordingTokenizer()
    evaluation_rows(data, tok, num_samples=1, seq_len=64, seed=1)
    assert max(tok.lengths) <= (64 + 1) * MAX_CHARS_PER_TOKEN


def test_the_cut_leaves_ordinary_rows_unchanged(tmp_path):
    """The cut keeps more characters than the tokens needed can cover: a real BPE tokenizer gives
    the same rows with and without it (long documents included)."""
    from tests.factories import make_tokenizer
    from trtconv.data import samples

    tok = make_tokenizer(tmp_path / "tok")
    texts = [f"def f{i}(x):\n    return x + {i}  # {'a longer comment ' * (i * 37 % 200)}\n" for i in range(60)]
    data = _pack(tmp_path, texts)
    capped = samples.calibration_rows(data, tok, 8, 64, 3).rows, samples.evaluation_rows(data, tok, 8, 64, 3).rows
    old = samples.MAX_CHARS_PER_TOKEN
    try:
        samples.MAX_CHARS_PER_TOKEN = 10**9  # effectively no cut: the rows as before
        uncapped = samples.calibration_rows(data, tok, 8, 64, 3).rows, samples.evaluation_rows(data, tok, 8, 64, 3).rows
    finally:
        samples.MAX_CHARS_PER_TOKEN = old
    assert capped == uncapped


class TwoLayers:
    """What make_forward_loop needs of a model: model.layers, and a call that runs each layer."""

    def __init__(self):
        import torch

        self.model = SimpleNamespace(layers=torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()]))

    def __call__(self, input_ids, use_cache=False):
        x = input_ids.float()
        for layer in self.model.layers:
            x = layer(x)
        return x


def test_each_calibration_pass_is_named_and_counted_per_layer():
    """AWQ's search used to show only "still running": each pass ModelOpt makes over the data is a
    named progress, advanced per decoder layer, so one batch still shows where it is."""
    from contextlib import contextmanager

    from trtconv.data.samples import TokenSet
    from trtconv.stages.calibrate import calibration_passes, make_forward_loop

    seen: list[tuple[str, int, int]] = []

    @contextmanager
    def progress(description, total):
        done = [0]
        yield lambda n=1: done.__setitem__(0, done[0] + n)
        seen.append((description, total, done[0]))

    passes = calibration_passes({"algorithm": {"method": "awq_lite", "alpha_step": 0.1}})
    assert passes == ("AWQ activation statistics", "AWQ scale search")
    tokens = TokenSet(rows=[[1, 2, 3]] * 3, lengths=[3] * 3, doc_ids=["a"], data_path="x", data_sha256="0", seed=0)
    announced: list[str] = []
    loop = make_forward_loop(tokens, batch_size=2, device="cpu", progress=progress, passes=passes, announce=announced.append)
    model = TwoLayers()
    loop(model)
    loop(model)
    assert announced == [f"calibrate: {p} (pass {i} of 2), decoder layer x batch: starting, 4 steps" for i, p in enumerate(passes, 1)]
    assert [s[0].removeprefix("calibrate: ").split(" (")[0] for s in seen] == list(passes)
    assert all(total == done == 2 * 2 for _, total, done in seen)  # 2 batches x 2 layers
    assert calibration_passes({"algorithm": "max"}) == ("calibration",)


def _gate(metric: str, verdict: str, threshold: float = 0.02) -> GateResult:
    return GateResult(metric=metric, value=0.01, ci_low=0.009, ci_high=0.011, comparator="<=", threshold=threshold,
                      verdict=verdict, reason="")


def _outcome(status: str = "failed"):
    from trtconv.artifact.manifest import StageRecord

    gates = [_gate("max_kl[eval]", "pass"), _gate("min_top1_agreement[eval]", "fail")]
    manifest = SimpleNamespace(status=status, gates=gates, artifact_digest="ab" * 32, engine={"target": "none"},
                               metrics={"ppl_baseline": {"value": 2.0}, "ppl_candidate": {"value": 2.1}},
                               stages=[StageRecord(name="load", status="ok", wall_s=1.0)])
    return SimpleNamespace(manifest=manifest, path=Path("/out"))


def test_each_gate_is_printed_once_with_its_own_verdict(capsys):
    from trtconv.cli.render import print_result
    from trtconv.stages.evaluate import report_gates

    reporter = Reporter(force_plain=True)
    report_gates(_outcome().manifest.gates, reporter)  # the evaluate stage: counts only
    print_result(_outcome(), reporter, json_mode=False)
    out = capsys.readouterr().out
    assert out.count("max_kl[eval]") == 1 and out.count("min_top1_agreement[eval]") == 2  # once, and once in the counts
    assert "gate PASS: max_kl[eval]" in out and "gate FAIL: min_top1_agreement[eval]" in out
    assert "FAILED: gate=" not in out


def test_quiet_prints_only_the_result_line(capsys):
    from trtconv.cli.render import print_result

    reporter = Reporter(quiet=True, force_plain=True)
    reporter.info("load: resolving the model")
    reporter.warn("something minor")
    with reporter.phase("calibrate"):
        reporter.stage("calibrate", "working")
    print_result(_outcome("passed"), reporter, json_mode=False)
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"passed: /out  artifact_digest: {'ab' * 32}"]
    assert captured.err == ""


def test_a_plain_log_gets_no_library_progress_bars(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    try:
        Reporter(force_plain=True)
        assert not hf_logging.is_progress_bar_enabled()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # for what imports transformers later
    finally:
        hf_logging.disable_progress_bar()


@pytest.mark.parametrize("kind", ["folder", "under-a-file", "read-only"])
def test_an_unwritable_junit_path_is_refused_before_any_work(tmp_path, kind):
    from trtconv.artifact.report import check_junit_path

    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = {"folder": tmp_path, "under-a-file": blocker / "gates.xml", "read-only": Path("/proc/gates.xml")}[kind]
    with pytest.raises(ArtifactError, match="--junit"):
        check_junit_path(path)
    check_junit_path(tmp_path / "new" / "gates.xml")  # a folder that write_junit will create is fine


def test_junit_and_require_engine_are_checked_before_the_model_is_touched(tmp_path, monkeypatch):
    """pipeline.build refuses both before the load stage: the model path here does not even exist."""
    from trtconv.pipeline import BuildOptions, build
    from trtconv.recipe.schema import recipe_from_dict

    recipe = recipe_from_dict({"name": "x", "model": {"path": str(tmp_path / "no-model")}, "quantization": {"precision": "fp8"}})
    reporter = Reporter(quiet=True, force_plain=True)
    with pytest.raises(ArtifactError, match="--junit"):
        build(recipe, BuildOptions(out=tmp_path / "out", junit=tmp_path, no_cache=True), reporter)
    with pytest.raises(EngineUnavailable, match="engine.target is none"):
        build(recipe, BuildOptions(out=tmp_path / "out", require_engine=True, no_cache=True), reporter)
    import trtconv.engine.record
    from trtconv.engine.record import TrtllmInstall

    monkeypatch.setattr(trtconv.engine.record, "probe_tensorrt_llm", lambda: TrtllmInstall(False, None, None))
    with_engine = recipe.model_copy(update={"engine": recipe.engine.model_copy(update={"target": "tensorrt"})})
    with pytest.raises(EngineUnavailable, match="tensorrt_llm is not installed.*nothing was run"):
        build(with_engine, BuildOptions(out=tmp_path / "out", require_engine=True, no_cache=True), reporter)
    assert not (tmp_path / "out").exists()


def test_check_refuses_an_unwritable_junit_path_before_loading_anything(cli, tmp_path):
    result = cli("check", tmp_path / "no-artifact", "--junit", tmp_path)
    assert result.exit_code == 2 and "--junit" in result.output and "is a folder" in result.output


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path):
    """kill -9 leaves .OUT.tmp-PID (a full copy of an artifact); the next run into the folder removes it."""
    from trtconv.artifact.writer import ArtifactWriter

    dead = _dead_pid()
    leftovers = [tmp_path / f".out.tmp-{dead}", tmp_path / f".out.tmp-{dead}.eval", tmp_path / f".other.tmp-{dead}"]
    alive = tmp_path / f".other.tmp-{os.getppid()}"  # a live process's: kept
    for folder in [*leftovers, alive]:
        (folder / "checkpoint").mkdir(parents=True)
    (tmp_path / ".not-ours.tmp-abc").mkdir()
    notes: list[str] = []
    with ArtifactWriter(tmp_path / "out", note=notes.append) as writer:
        assert writer.tmp.is_dir()
        assert not any(p.exists() for p in leftovers)
        assert alive.exists() and (tmp_path / ".not-ours.tmp-abc").exists()
    assert len(notes) == 3 and all("killed" in n for n in notes)


# ---------------------------------------------------------------------------------------------
# 10. Messages


def test_a_set_value_that_is_not_yaml_names_the_key_and_what_it_takes():
    from trtconv.recipe.schema import load_recipe

    with pytest.raises(RecipeError) as err:
        load_recipe("default", ["calibration.num_samples=[1,"])
    message = str(err.value)
    assert "--set 'calibration.num_samples=[1,'" in message and "not valid YAML" in message
    assert "calibration.num_samples takes a positive integer (default 64)" in message
    assert "<unicode string>" not in message and "^" not in message
    with pytest.raises(RecipeError, match="quantization.precision takes one of: none, fp8"):
        load_recipe("default", ["quantization.precision={"])


def test_build_data_without_text_field_names_the_recipe_key(tmp_path):
    from trtconv.data.samples import calibration_rows, evaluation_rows

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(DataError) as err:
        calibration_rows(data, RecordingTokenizer(), 1, 8, 0)
    assert "calibration.data" in str(err.value) and "--field NAME" in str(err.value) and "Choose the text field with --field" not in str(err.value)
    assert "the fields there are: content" in str(err.value)
    with pytest.raises(DataError, match="evaluate.data"):
        evaluation_rows(data, RecordingTokenizer(), 1, 8, 0)


def test_a_config_without_architectures_says_so(tmp_path):
    from trtconv.stages.load import check_architecture

    with pytest.raises(ModelError) as err:
        check_architecture({"model_type": "llama"}, tmp_path)
    message = str(err.value)
    assert "'architectures' is missing" in message and "LlamaForCausalLM" in message and "not supported" not in message


def test_an_empty_folder_is_missing_config_json_first(tmp_path):
    from trtconv.recipe.schema import ModelSection
    from trtconv.stages.load import remembered_inputs

    with pytest.raises(ModelError, match="no config.json"):
        remembered_inputs(ModelSection(path=str(tmp_path)))


def test_prune_refuses_an_unknown_stage(three_entries):  # noqa: F811
    result = invoke("prune", "--stage", "bogus", "--all")
    assert result.exit_code == 2
    assert "--stage 'bogus'" in result.output and "export" in result.output and "reference-models" in result.output
    assert all(p.exists() for p in three_entries.values())
    assert invoke("prune", "--stage", "bogus", "--all", "--json").stdout.strip().endswith('"exit_code": 2}')


# ---------------------------------------------------------------------------------------------
# 11. Friction


def test_calibrate_evaluates_as_the_shipped_recipes_do():
    """`calibrate` takes the schema's evaluate defaults; every shipped recipe states the same values."""
    from trtconv.recipe.schema import EvaluateSection, builtin_recipes_dir

    defaults = EvaluateSection()
    for path in builtin_recipes_dir().glob("*.yaml"):
        section = yaml.safe_load(path.read_text())["evaluate"]
        assert (section["num_samples"], section["batch_size"]) == (defaults.num_samples, defaults.batch_size), path


def test_cache_ls_shows_paths(three_entries):  # noqa: F811
    table = invoke("ls").stdout
    assert "PATH" in table.splitlines()[0]
    assert all(str(p) in table for p in three_entries.values())


def test_cache_du_counts_a_hard_linked_file_once(three_entries):  # noqa: F811
    export = three_entries["export"]
    before = json.loads(invoke("du", "--json").stdout)["total"]
    twin = export.parent / ("f" * 64)  # another entry whose files are hard links of export's (as run and export share)
    for f in sorted(export.rglob("*")):
        target = twin / f.relative_to(export)
        if f.is_dir():
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)
    data = json.loads(invoke("du", "--json").stdout)
    assert data["total"] == before
    assert data["groups"]["export"]["entries"] == 2


def test_verify_json(tmp_path, cli):
    """verify --json: one object on stdout for each way out (here: not an artifact, a usage mistake)."""
    result = cli("verify", tmp_path, "--json")
    assert result.exit_code == 2 and json.loads(result.stdout)["exit_code"] == 2


def test_charts_whole_layer_ticks_a_caption_that_fits_a_kl_threshold_and_sensitivity(tmp_path):
    import numpy as np

    from trtconv.artifact import report

    gates = [_gate(f"{key}[{pack}]", "pass") for key in ("max_kl", "min_top1_agreement", "max_ppl_increase_pct")
             for pack in ("eval", "eval-prose", "eval-code")]
    errors = [(f"model.layers.{i}.self_attn.q_proj", 0.1 + i / 100) for i in range(2)]
    fig = report.weight_error_figure(errors, gates)
    ticks = fig.axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for text in fig.texts:  # every caption line inside the figure
        box = text.get_window_extent(renderer)
        assert box.x1 <= fig.bbox.x1 and box.y0 >= 0
    assert len(fig.texts) == 3  # one line per gate key, each pack's verdict on it
    kl = report.token_kl_figure(np.full(100, 0.001), gates)
    assert any("gate: mean KL <= 0.02" in str(line.get_label()) for line in kl.axes[0].get_lines())
    advice = {"layers": [{"layer": "model.layers.1", "kl": 0.01}, {"layer": "model.layers.0", "kl": 0.004}],
              "full_kl": 0.015, "method": "one layer at a time"}
    sens = report.sensitivity_figure(advice, gates)
    assert [round(p.get_height(), 3) for p in sens.axes[0].patches] == [0.004, 0.01]
    assert any("gate: mean KL" in str(line.get_label()) for line in sens.axes[0].get_lines())
