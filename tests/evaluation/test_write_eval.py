"""eval.json: a re-evaluation replaces the figures and keeps what only training knew."""

from __future__ import annotations

import json

from polymodal.config import load_config
from polymodal.evaluation.run import EVAL_FILE, write_eval


def test_a_re_evaluation_keeps_the_training_records(tmp_path):
    config = load_config(["tiny"])
    write_eval(tmp_path, {"image_to_text": {"exact": 0.5}, "train": {"step": 20, "mfu": 0.2}, "selected": {"step": 10}}, config)
    write_eval(tmp_path, {"image_to_text": {"exact": 0.75}}, config)
    figures = json.loads((tmp_path / EVAL_FILE).read_text())["figures"]
    assert figures == {"train": {"step": 20, "mfu": 0.2}, "selected": {"step": 10}, "image_to_text": {"exact": 0.75}}
    (tmp_path / EVAL_FILE).write_text("{not json")
    write_eval(tmp_path, {"image_to_text": {"exact": 1.0}}, config)  # a damaged file is replaced whole
    assert json.loads((tmp_path / EVAL_FILE).read_text())["figures"] == {"image_to_text": {"exact": 1.0}}
