"""rlkd.bench.executor: what a cell hands the engine and the evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rlkd.bench.executor import train_sequences
from rlkd.bench.spec import expand, load_spec
from rlkd.factory import shared_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shared_tokenizer() is None, reason="needs the local Llama-2 tokenizer (RLKD_DATA_DIR)")
def test_a_top_k_cells_trained_on_sequences_are_the_exact_cells(tmp_path):
    # Alignment on trained-on data tokenises the cell's training rows. A top-K cell trains on the
    # same rows as its exact twin (only the teacher's storage differs), and its top-K setting, which
    # needs the benchmark's cache folder, must not stop the tokenisation.
    cells = expand(load_spec(REPO / "benchmarks" / "mini" / "sparse_teacher.yaml", tiny=True))
    by_k = {cell.arm.sweep["teacher_cache_top_k"]: cell for cell in cells
            if cell.arm.variant == "none" and cell.arm.objective_label == "KL"}
    assert set(by_k) == {None, 32, 128}
    tokenizer = AutoTokenizer.from_pretrained(shared_tokenizer())
    exact = train_sequences(by_k[None], tmp_path)(tokenizer)
    assert exact and all(len(ids) > 1 for ids in exact)
    assert train_sequences(by_k[32], tmp_path)(tokenizer) == exact
