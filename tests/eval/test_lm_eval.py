"""lm-eval bridge, offline: a tiny local multiple-choice task on a tiny random checkpoint."""

import json
import random

import pytest
import torch

from rlkd.eval._testing import llama2_tokenizer_dir, save_tiny_checkpoint

TOKENIZER_DIR = llama2_tokenizer_dir()
pytestmark = pytest.mark.skipif(TOKENIZER_DIR is None, reason="needs the llama2 tokenizer in ../shared/data")

TASK_YAML = """\
task: rlkd_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _docs():
    rng = random.Random(0)
    words = ["apple", "river", "seven", "blue", "north", "stone", "quiet", "forty", "maple", "glass"]
    return [{"question": f"Which word goes with {rng.choice(words)}?",
             "choices": rng.sample(words, 4), "label": rng.randrange(4)} for _ in range(16)]


def _expected_accuracy(model, tokenizer, docs):
    """Pick the choice whose continuation " <choice>" has the highest summed log-likelihood given
    the context, tokenising context+continuation together and scoring the tokens after the
    context's own encoding (lm-eval's documented way); no BOS for this tokenizer config."""
    correct = 0
    with torch.no_grad():
        for doc in docs:
            context = f"Question: {doc['question']}\nAnswer:"
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            scores = []
            for choice in doc["choices"]:
                whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
                cont = whole[len(context_ids):]
                logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
                start = len(whole) - len(cont)
                scores.append(sum(logits[start - 1 + i, tok].item() for i, tok in enumerate(cont)))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return correct / len(docs)


@pytest.mark.slow
def test_lm_eval_runs_offline_on_a_local_task(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlkd.eval.lm_eval_bridge import run_lm_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    docs = _docs()
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", TOKENIZER_DIR, seed=7)

    result = run_lm_eval(ckpt, ["rlkd_tiny_mc"], out_dir=tmp_path / "out", include_path=tasks,
                         batch_size=4)
    stored = json.loads((tmp_path / "out" / "lm_eval" / "results.json").read_text())
    acc = stored["results"]["rlkd_tiny_mc"]["acc,none"]
    assert acc == result["results"]["rlkd_tiny_mc"]["acc,none"]
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert acc == pytest.approx(_expected_accuracy(model, tokenizer, docs))
    assert stored["provenance"]["checkpoint"]["hash_mode"] == "content"
    assert stored["n_samples"]["rlkd_tiny_mc"]["effective"] == 16

    with pytest.raises(KeyError, match="unknown lm-eval task"):
        run_lm_eval(ckpt, ["no_such_task_xyz"], out_dir=tmp_path / "out", include_path=tasks,
                    include_defaults=False)
