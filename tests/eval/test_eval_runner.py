import json

import pytest

import rlkd.eval.runner as runner
from rlkd.data.jsonl import DataError
from rlkd.eval import cli
from rlkd.eval._testing import llama2_tokenizer_dir, save_tiny_checkpoint, tiny_llama
from rlkd.eval.generate import CheckpointNotFoundError, Generation

TOKENIZER_DIR = llama2_tokenizer_dir()
needs_tokenizer = pytest.mark.skipif(TOKENIZER_DIR is None, reason="needs the llama2 tokenizer in ../shared/data")

GSM_ROWS = [
    {"question": "Ann has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
    {"question": "Tom reads 1,200 pages in 3 days. Pages per day?", "answer": "1200/3=400\n#### 400"},
    {"question": "A pen costs $2. Five pens?", "answer": "5*2=10\n#### 10"},
    {"question": "What is 10 minus 13?", "answer": "10-13=-3\n#### -3"},
    {"question": "Half of 9?", "answer": "9/2=4.5\n#### 4.5"},
]
# What the scripted "model" answers for each question: right, right (formatted), wrong, empty, right
SCRIPTED = {"Ann": "#### 7", "Tom": "So $400.00 a day.", "A pen": "#### 12", "What": "", "Half": "4.50"}


class _FakeTokenizer:
    chat_template = None


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def scripted_generation(monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, prompts, config, show_progress=False):
        calls.append(len(prompts))
        texts = [next(v for k, v in SCRIPTED.items() if f"Instruction:\n{k}" in p) for p in prompts]
        return [Generation(t, 10, len(t), True, False) for t in texts]

    monkeypatch.setattr(runner, "generate_distributed", fake_generate)
    monkeypatch.setattr(runner, "CHUNK_EXAMPLES", 2)
    return calls


def _evaluate(tmp_path, data, **kw):
    return runner.evaluate_task(None, "gsm8k", out_dir=tmp_path / "out", data_path=data,
                                model=tiny_llama(vocab_size=16, hidden=8, layers=1),
                                tokenizer=_FakeTokenizer(), **kw)


def test_scores_writes_outputs_and_skips_finished_work(tmp_path, scripted_generation):
    data = _write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS)
    result = _evaluate(tmp_path, data)
    assert result["metrics"] == {"correct": 3, "total": 5, "score": 60.0, "no_answer": 1}
    assert result["n_empty_predictions"] == 1
    folder = tmp_path / "out" / "gsm8k"
    records = [json.loads(line) for line in (folder / "predictions.jsonl").open()]
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["correct"] for r in records] == [True, True, False, False, True]
    assert records[1]["where"].endswith("gsm.jsonl:2") and records[1]["gold"] == "400"
    assert not (folder / "predictions.partial.jsonl").exists()
    stored = json.loads((folder / "metrics.json").read_text())
    prov = stored["provenance"]
    assert prov["decoding"]["do_sample"] is False and prov["protocol"] == "greedy"
    assert prov["checkpoint"]["hash_mode"] == "state-dict" and len(prov["checkpoint"]["sha256"]) == 64
    assert prov["data"]["n_examples"] == 5 and len(prov["data"]["file_sha256"]) == 64
    assert prov["versions"]["torch"] and prov["versions"]["rouge-score"]
    assert scripted_generation == [2, 2, 1]
    # Per example on the score's scale, in input order: right, right, wrong, empty, right.
    assert result["per_example"] == {"score": [100.0, 100.0, 0.0, 0.0, 100.0]}
    assert json.loads((folder / "per_example.json").read_text()) == result["per_example"]
    assert "per_example" not in stored
    again = _evaluate(tmp_path, data)
    assert again["metrics"] == result["metrics"] and scripted_generation == [2, 2, 1]
    assert again["per_example"] == result["per_example"]  # a finished run still hands them over


def test_resumes_a_partial_run(tmp_path, scripted_generation):
    data = _write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS)
    _evaluate(tmp_path, data)
    folder = tmp_path / "out" / "gsm8k"
    done = (folder / "predictions.jsonl").read_text().splitlines()
    # as if interrupted: examples 0 and 3 written, then a torn line
    (folder / "predictions.partial.jsonl").write_text(done[0] + "\n" + done[3] + "\n" + done[4][:20])
    (folder / "metrics.json").unlink()
    (folder / "predictions.jsonl").unlink()
    scripted_generation.clear()
    result = _evaluate(tmp_path, data)
    assert scripted_generation == [1, 1, 1]  # chunks {0,1}, {2,3}, {4}: one missing in each
    assert result["metrics"]["correct"] == 3
    assert len((folder / "predictions.jsonl").read_text().splitlines()) == 5


def test_refuses_other_settings_unless_overwrite(tmp_path, scripted_generation):
    data = _write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS)
    _evaluate(tmp_path, data, max_new_tokens=32)
    with pytest.raises(runner.RunMismatchError, match="different settings"):
        _evaluate(tmp_path, data, max_new_tokens=64)
    result = _evaluate(tmp_path, data, max_new_tokens=64, overwrite=True)
    assert result["provenance"]["decoding"]["max_new_tokens"] == 64


def test_sampled_protocol_averages_over_seeds(tmp_path, monkeypatch):
    rows = [{"instruction": "Say hi", "input": "", "output": ["hello there", "hi"]},
            {"instruction": "Name a colour", "input": "", "output": "red"}]
    data = _write_jsonl(tmp_path / "sni.jsonl", rows)
    outputs = {10: ["hello there", "blue"], 20: ["hi", "red"]}

    def fake_generate(model, tokenizer, prompts, config, show_progress=False):
        seed = config.seed // 1_000_003  # the runner derives one seed per chunk
        assert config.do_sample and config.no_repeat_ngram_size == 6
        return [Generation(t, 5, 2, True, False) for t in outputs[seed]]

    monkeypatch.setattr(runner, "generate_distributed", fake_generate)
    result = runner.evaluate_task(None, "sni", out_dir=tmp_path / "out", data_path=data, seeds=[10, 20],
                                  model=tiny_llama(vocab_size=16, hidden=8, layers=1),
                                  tokenizer=_FakeTokenizer(), with_rouge_pkg=False)
    # seed 10: max over refs 100 and 0 -> 50; seed 20: 100 ("hi") and 100 -> 100
    assert result["per_seed"] == {"seed10": {"rougeL": 50.0}, "seed20": {"rougeL": 100.0}}
    assert result["metrics"]["rougeL"] == pytest.approx(75.0)
    assert result["metrics"]["rougeL_std"] == pytest.approx(35.3553, abs=1e-4)
    assert (tmp_path / "out" / "sni" / "seed20" / "predictions.jsonl").exists()
    # per example, averaged over the sampling seeds: "Say hi" 100 then 100, "Name a colour" 0 then 100
    assert result["per_example"] == {"rougeL": [100.0, 50.0]}
    assert json.loads((tmp_path / "out" / "sni" / "per_example.json").read_text()) == result["per_example"]


def test_missing_field_names_file_and_line(tmp_path, scripted_generation):
    data = _write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS[:2] + [{"question": "no answer field"}])
    with pytest.raises(DataError, match=r"gsm\.jsonl:3: missing field 'answer'"):
        _evaluate(tmp_path, data)
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text(json.dumps(GSM_ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: malformed JSON"):
        _evaluate(tmp_path, bad_json)


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["--checkpoint", str(tmp_path / "nope"), "--task", "gsm8k"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["--task", "gsm8k"]) == 2
    assert cli.main(["--list-tasks"]) == 0
    assert "sni" in capsys.readouterr().out
    with pytest.raises(CheckpointNotFoundError):
        runner.evaluate_task(tmp_path / "nope", "gsm8k", out_dir=tmp_path)


@needs_tokenizer
def test_cli_end_to_end_with_a_tiny_checkpoint(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", TOKENIZER_DIR)
    data = _write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Describe a cat.", "context": "", "response": "A small furry animal."},
        {"instruction": "Summarise.", "context": "Cats sleep a lot.", "response": "Cats sleep."}])
    argv = ["--checkpoint", str(ckpt), "--task", "dolly", "--data-path", str(data),
            "--max-new-tokens", "4", "--out", str(tmp_path / "out"), "--quiet"]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stored = json.loads((tmp_path / "out" / "dolly" / "metrics.json").read_text())
    assert printed["n"] == 2 and printed["rougeL"] == pytest.approx(stored["metrics"]["rougeL"])
    assert stored["provenance"]["checkpoint"]["hash_mode"] == "content"
    predictions = [json.loads(x) for x in (tmp_path / "out" / "dolly" / "predictions.jsonl").open()]
    assert all(p["n_new_tokens"] <= 4 for p in predictions)
    assert predictions[1]["prompt"].endswith("### Input:\nCats sleep a lot.\n\n### Response:")


@needs_tokenizer
def test_cli_alignment_matches_compare_models(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlkd.eval.alignment import compare_models, make_token_slices

    student = save_tiny_checkpoint(tmp_path / "student", TOKENIZER_DIR, seed=1)
    teacher = save_tiny_checkpoint(tmp_path / "teacher", TOKENIZER_DIR, seed=2)
    corpus = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": "The quick brown fox jumps over the lazy dog. " * 3},
                                                      {"text": "Distillation aligns a student with its teacher."}])
    argv = ["--checkpoint", str(student), "--teacher", str(teacher), "--alignment-data", str(corpus),
            "--slice-len", "12", "--n-slices", "4", "--out", str(tmp_path / "out"), "--quiet"]
    assert cli.main(argv) == 0
    stored = json.loads((tmp_path / "out" / "alignment" / "metrics.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(student)
    texts = [json.loads(x)["text"] for x in corpus.open()]
    slices = make_token_slices(texts, tokenizer, 12, 4)
    expected = compare_models(AutoModelForCausalLM.from_pretrained(student),
                              AutoModelForCausalLM.from_pretrained(teacher), slices)
    assert stored["n_slices"] == len(slices) == 4 and stored["n_tokens"] == 4 * 11
    for name, value in expected.metrics.items():
        assert stored[name] == pytest.approx(value, rel=1e-5)
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"content": "no text field"}])
    assert cli.main(argv[:4] + ["--alignment-data", str(bad), "--out", str(tmp_path / "o2")]) == 1
    assert "bad.jsonl:1: missing field 'text'" in capsys.readouterr().err


def test_rescore_uses_the_stored_predictions(tmp_path, scripted_generation, capsys):
    data = _write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS)
    _evaluate(tmp_path, data)
    predictions = tmp_path / "out" / "gsm8k" / "predictions.jsonl"
    records = [json.loads(line) for line in predictions.open()]
    records[2]["prediction"] = "5 pens cost $10."  # was "#### 12"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = runner.rescore(tmp_path / "out", "gsm8k")
    assert result["metrics"]["correct"] == 4 and "rescored_at" in result
    assert json.loads(predictions.read_text().splitlines()[2])["correct"] is True
    assert cli.main(["--rescore", "--task", "gsm8k", "--out", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["correct"] == 4
    assert cli.main(["--rescore", "--task", "dolly", "--out", str(tmp_path / "out")]) == 1
