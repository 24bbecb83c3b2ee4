"""rlkd.integrations.hf: DistillLoss inside transformers.Trainer gives DistillLoss's loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from rlkd.integrations.hf import DistillationLoss, DistillationTrainerMixin, next_token_targets
from rlkd.objectives import DistillLoss

KL_R = {"objective": "kl", "ranking": {"enabled": True, "k": 5}}
# Composable terms: CE needs the next-token labels, so this also checks the label shift.
KL_CE_R = {"terms": [{"objective": "kl"}, {"objective": "ce", "weight": 0.5}], "ranking": {"enabled": True, "k": 5}}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _hf_batch(n_rows: int, length: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows, a prompt half with labels -100 and a padded tail; lengths differ per row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (n_rows, length), generator=generator)
    attention = torch.zeros(n_rows, length, dtype=torch.long)
    labels = torch.full((n_rows, length), -100)
    for row in range(n_rows):
        n = length - 2 * row
        attention[row, :n] = 1
        labels[row, n // 2:n] = input_ids[row, n // 2:n]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _reference_mask(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit t is supervised when token t+1 is a label: built position by position."""
    mask = torch.zeros(labels.shape, dtype=torch.bool)
    targets = torch.full(labels.shape, -100)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != -100:
                mask[b, t], targets[b, t] = True, labels[b, t + 1]
    return mask, targets


def _reference_loss(student, teacher, batch, loss_config):
    mask, targets = _reference_mask(batch["labels"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    out = DistillLoss(loss_config)(student(**inputs).logits, teacher_logits, mask, labels=targets)
    return out.loss_sum / int(mask.sum())


def test_next_token_targets_matches_the_shift():
    labels = _hf_batch(3, 10, 96)["labels"]
    assert [t.tolist() for t in next_token_targets(labels)] == [t.tolist() for t in _reference_mask(labels)]


@pytest.mark.parametrize("loss_config", [{"objective": "kl"}, KL_R, KL_CE_R], ids=["KL", "KL+R", "KL+0.5CE+R"])
def test_loss_and_gradients_equal_distill_loss(tiny_models, loss_config):
    teacher, student = _load(tiny_models["teacher"]).eval(), _load(tiny_models["student"])
    reference_student = copy.deepcopy(student)
    batch = _hf_batch(3, 12, 96)

    step = DistillationLoss(loss_config)(student, teacher, batch)
    step.loss.backward()
    expected = _reference_loss(reference_student, teacher, batch, loss_config)
    expected.backward()

    assert step.n_tokens == int((batch["labels"][:, 1:] != -100).sum())
    assert float(step.loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    if "ranking" in loss_config:
        assert step.metrics["rank"] > 0
    for (name, p), q in zip(student.named_parameters(), reference_student.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_plain_kl_equals_a_hand_written_kl(tiny_models):
    """The normalisation is per supervised token: mean over positions of KL(p_T || p_S)."""
    teacher, student = _load(tiny_models["teacher"]).eval(), _load(tiny_models["student"]).eval()
    batch = _hf_batch(2, 10, 96, seed=3)
    with torch.no_grad():
        loss = DistillationLoss({"objective": "kl"})(student, teacher, batch).loss
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        log_t, log_s = teacher(**inputs).logits.log_softmax(-1), student(**inputs).logits.log_softmax(-1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
        mask, _ = _reference_mask(batch["labels"])
    assert float(loss) == pytest.approx(float(kl[mask].mean()), rel=1e-5)


def test_missing_labels_and_teacher_are_clear_errors(tiny_models):
    student = _load(tiny_models["student"])
    batch = _hf_batch(1, 8, 96)
    with pytest.raises(ValueError, match="labels"):
        DistillationLoss(KL_R)(student, None, {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationLoss(KL_R)(student, None, batch)


def test_trainer_step_is_the_distill_loss_gradient_over_the_accumulated_batch(tiny_models, tmp_path):
    """One Trainer step (2 micro-batches of 2, accumulated; SGD, no clipping) moves every parameter by
    -lr times DistillLoss's gradient of the per-token mean over all four rows."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    class DistillTrainer(DistillationTrainerMixin, Trainer):
        pass

    teacher, student = _load(tiny_models["teacher"]), _load(tiny_models["student"])
    reference = copy.deepcopy(student)
    batch = _hf_batch(4, 12, 96, seed=5)
    rows = [{key: value[i] for key, value in batch.items()} for i in range(4)]
    lr = 0.5
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=1, max_grad_norm=0.0, use_cpu=True,
                             report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                             data_collator=default_data_collator, optimizers=(optimizer, schedule),
                             rlkd_loss=KL_R)
    trainer.train()

    expected = _reference_loss(reference, teacher, batch, KL_R)
    expected.backward()
    for (name, p), q in zip(student.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), (q - lr * q.grad).detach(), rtol=1e-5, atol=1e-6, msg=name)
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(float(expected), rel=1e-4)
    assert 0 < logged["rlkd/rank"] < 2 and 0 <= logged["rlkd/topk_overlap"] <= 1
    assert logged["rlkd/rank_fallback"] == 0 and logged["rlkd/base"] > 0


def _word_tokenizer(vocab: int = 96):
    """A tokenizer for the tiny models' ids (TRL's trainers insist on one); never downloads."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    backend = Tokenizer(WordLevel(words, unk_token="t0"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", bos_token="t1", eos_token="t2",
                                   pad_token="t0")


def _gkd_rows(batch, prompt_width: int) -> list[dict]:
    """GKD's batch layout: the full sequences plus left-padded prompts for its on-policy sampling."""
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        start = int((batch["labels"][i] != -100).nonzero()[0, 0])
        prompt = batch["input_ids"][i, :start].tolist()[-prompt_width:]
        pad = prompt_width - len(prompt)
        rows.append({key: value[i].tolist() for key, value in batch.items()}
                    | {"prompts": [0] * pad + prompt, "prompt_attention_mask": [0] * pad + [1] * len(prompt)})
    return rows


@pytest.mark.parametrize("lmbda", [0.0, 1.0], ids=["off-policy", "on-policy"])
def test_gkd_trainer_with_the_mixin(tiny_models, tmp_path, lmbda):
    """With TRL's GKDTrainer as the base: rlkd's `jsd` (beta=0.5) equals GKD's own generalized JSD on
    the same batch, and GKD's on-policy sampling (lmbda=1) feeds the mixin's loss."""
    pytest.importorskip("trl")
    from transformers import default_data_collator
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class RankedGKD(DistillationTrainerMixin, GKDTrainer):
        pass

    teacher, student = _load(tiny_models["teacher"]), _load(tiny_models["student"])
    batch = _hf_batch(4, 12, 96, seed=7)
    args = GKDConfig(output_dir=str(tmp_path / "gkd"), per_device_train_batch_size=2, max_steps=2, lmbda=lmbda,
                     beta=0.5, max_new_tokens=4, use_cpu=True, report_to=[], save_strategy="no",
                     logging_steps=1, disable_tqdm=True, learning_rate=1e-3)
    from datasets import Dataset

    trainer = RankedGKD(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(_gkd_rows(batch, 6)),
                        data_collator=default_data_collator, processing_class=_word_tokenizer(),
                        rlkd_loss={"objective": "jsd", "params": {"beta": 0.5}})
    assert trainer.teacher_model is not None and not trainer.teacher_model.training
    if lmbda == 0.0:
        inputs = default_data_collator(_gkd_rows(batch, 6))
        ours = trainer.compute_loss(student, inputs)
        with torch.no_grad():
            s = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            t = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        theirs = GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels=inputs["labels"][:, 1:], beta=0.5)
        assert float(ours.detach()) == pytest.approx(float(theirs), rel=1e-5)

    seen = []
    original = trainer._rlkd.__call__

    def spy(model, teacher_model, inputs, num_items_in_batch=None):
        seen.append(inputs["input_ids"].clone())
        return original(model, teacher_model, inputs, num_items_in_batch)

    trainer._rlkd = type("Spy", (), {"__call__": staticmethod(spy)})()
    trainer.train()
    assert len(seen) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history[:2])
    dataset_ids = {tuple(r.tolist()) for r in batch["input_ids"]}
    from_dataset = [tuple(r.tolist()) in dataset_ids for ids in seen for r in ids]
    assert all(from_dataset) == (lmbda == 0.0) and (not any(from_dataset)) == (lmbda == 1.0)


def test_padded_teacher_vocabulary_needs_shared_vocab(tiny_models):
    teacher, student = _load(tiny_models["teacher_padded"]).eval(), _load(tiny_models["student"])
    batch = _hf_batch(2, 10, 96, seed=4)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        DistillationLoss(KL_R)(student, teacher, batch)
    loss = DistillationLoss(KL_R, shared_vocab=True)(student, teacher, batch).loss
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    mask, targets = _reference_mask(batch["labels"])
    with torch.no_grad():
        expected = DistillLoss(KL_R)(student(**inputs).logits, teacher(**inputs).logits[..., :96], mask, labels=targets)
    assert float(loss.detach()) == pytest.approx(float(expected.loss_sum) / int(mask.sum()), rel=1e-6)
