"""Calibration and evaluation rows start as served text does: with BOS where the model's tokenizer adds one.

Found on a real Gemma 3 270M (issue 19's user trial): rows without <bos> put the model out of its range
(perplexity ~45 -> ~244 on the same text) and made FP8's measured KL 6-7x what serving sees.
"""

from __future__ import annotations

from tests.factories import make_tokenizer
from trtconv.data.packs import builtin_pack
from trtconv.data.samples import calibration_rows, evaluation_rows, row_prefix


def _bos_tokenizer(tmp_path):
    """A real fast tokenizer whose post-processor puts <bos> before every text, as Gemma's and Llama 2's do."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    plain = make_tokenizer(tmp_path / "plain")
    backend = plain.backend_tokenizer
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>"), bos


def test_rows_start_with_bos_where_the_tokenizer_adds_it(tmp_path):
    tok, bos = _bos_tokenizer(tmp_path)
    assert row_prefix(tok) == [bos]
    calib = calibration_rows(builtin_pack("calib"), tok, 4, 32, 0)
    assert all(row[0] == bos and len(row) == 32 for row in calib.rows)
    assert calib.extra["row_prefix"]["token_ids"] == [bos]
    evaluation = evaluation_rows(builtin_pack("eval"), tok, 4, 64, 0)
    assert all(row[0] == bos for row in evaluation.rows) and evaluation.extra["row_prefix"]["token_ids"] == [bos]
    assert all(bos not in row[1:] for row in calib.rows + evaluation.rows)  # only at the start


def test_rows_are_unchanged_without_a_bos(tmp_path):
    tok = make_tokenizer(tmp_path / "plain")
    assert row_prefix(tok) == []
    calib = calibration_rows(builtin_pack("calib"), tok, 4, 32, 0)
    assert "row_prefix" not in calib.extra  # records (and digests) made before the rule keep their bytes
