import json

import pytest

from rlkd.data.jsonl import DataError
from rlkd.data.templates import alpaca_prompt
from rlkd.eval.tasks import TASKS, build_prompt, examples_sha256, get_task, load_examples
from rlkd.paths import default_data_dir

DATA = default_data_dir()
HAVE_DATA = DATA is not None and (DATA / "gsm8k").is_dir()

ROW_COUNTS = {"gsm8k": 1319, "dolly": 800, "xsum": 1000, "dolly_minillm": 500, "selfinst": 242,
              "vicuna": 80, "sni": 1694, "unni": 1050}


@pytest.mark.data
@pytest.mark.skipif(not HAVE_DATA, reason="needs ../shared/data")
@pytest.mark.parametrize("task", sorted(ROW_COUNTS))
def test_real_files_load_with_their_row_counts(task):
    examples = load_examples(task)
    assert len(examples) == ROW_COUNTS[task]
    assert [e.index for e in examples] == list(range(len(examples)))
    assert all(e.references and all(isinstance(r, str) for r in e.references) for e in examples)
    if TASKS[task].prompt_style == "minillm":
        # MiniLLM's stored prompt is rlkd's Alpaca template plus a newline
        assert all(build_prompt(e, "minillm") == alpaca_prompt(e.instruction, e.input) + "\n"
                   for e in examples)
    if task == "sni":
        assert max(len(e.references) for e in examples) > 1


def test_prompt_styles():
    from rlkd.eval.tasks import Example

    ex = Example(0, "Add the numbers.", "2 and 3", ("5",), "x:1")
    assert build_prompt(ex, "alpaca").endswith("### Input:\n2 and 3\n\n### Response:")
    assert build_prompt(ex, "minillm") == build_prompt(ex, "alpaca") + "\n"

    class ChatTokenizer:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return f"<user>{messages[0]['content']}</user><assistant>"

    assert build_prompt(ex, "chat", ChatTokenizer()) == "<user>Add the numbers.\n\n2 and 3</user><assistant>"
    with pytest.raises(ValueError, match="chat template"):
        build_prompt(ex, "chat", None)
    with pytest.raises(ValueError, match="unknown prompt style"):
        build_prompt(ex, "fancy")


def test_local_file_errors_and_hash(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n\n"
                    + json.dumps({"question": "2+2?", "answer": "four"}) + "\n")
    with pytest.raises(DataError, match=r"gsm\.jsonl:3: GSM8K answer has no '####'"):
        load_examples("gsm8k", path=path)
    first = load_examples("gsm8k", path=path, limit=1)
    assert first[0].references == ("2",) and first[0].where.endswith("gsm.jsonl:1")
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 3"}) + "\n")
    assert examples_sha256(load_examples("gsm8k", path=path)) != examples_sha256(first)
    with pytest.raises(DataError, match="data file not found"):
        load_examples("dolly", path=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="limit"):
        load_examples("gsm8k", path=path, limit=0)
    with pytest.raises(KeyError, match="unknown eval task"):
        get_task("mmlu")
    (tmp_path / "bad_refs.jsonl").write_text(json.dumps({"instruction": "x", "output": []}) + "\n")
    with pytest.raises(DataError, match=r"bad_refs\.jsonl:1: field 'output'"):
        load_examples("sni", path=tmp_path / "bad_refs.jsonl")


@pytest.mark.skipif(DATA is None or not (DATA / "tokenizers" / "llama2").is_dir(), reason="needs the llama2 tokenizer")
def test_fit_prompt_cuts_the_input_not_the_instruction():
    from transformers import AutoTokenizer

    from rlkd.eval.tasks import Example, fit_prompt

    tokenizer = AutoTokenizer.from_pretrained(DATA / "tokenizers" / "llama2")
    article = " ".join(f"Sentence number {i} of a long news article." for i in range(40))
    ex = Example(0, "Summarize the following article in one sentence.", article, ("x",), "f:1")
    prompt, cut = fit_prompt(ex, "alpaca", tokenizer, 80)
    assert cut and len(tokenizer(prompt)["input_ids"]) <= 80
    assert prompt.startswith("Below is an instruction") and prompt.endswith("\n\n### Response:")
    kept = prompt.split("### Input:\n", 1)[1].rsplit("\n\n### Response:", 1)[0]
    assert len(kept) > 50 and article.startswith(kept)
    assert fit_prompt(ex, "alpaca", tokenizer, 10_000) == (build_prompt(ex, "alpaca"), False)
    assert fit_prompt(ex, "alpaca", tokenizer, None) == (build_prompt(ex, "alpaca"), False)
