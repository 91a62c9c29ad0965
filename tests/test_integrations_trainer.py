"""EGNTrainer, a real `transformers.Trainer`: its step on a batch is `egn_fast.EGN.step` on the same
batch (float64, per model type, against closures written out here), its logged loss is the model's
own loss, it trains a tiny GPT-2 and a BERT classifier, resumes from a checkpoint bit for bit, runs
under bf16 autocast, and refuses what EGN cannot honour."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import egn_fast
from hf_tiny import bert, classification_dataset, collate, gpt2, lm_dataset
from oracle import rel_err

import transformers  # noqa: E402  (installed by requirements.txt, with accelerate)
from egn_fast.integrations import EGNTrainer, targets  # noqa: E402

B = 6


def training_args(tmp_path, **overrides) -> "transformers.TrainingArguments":
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=B, learning_rate=1.0, max_steps=1,
                   logging_steps=1, lr_scheduler_type="constant", weight_decay=0.0, report_to=[], use_cpu=True,
                   disable_tqdm=True, dataloader_num_workers=0, save_strategy="no", seed=0)
    return transformers.TrainingArguments(**{**options, **overrides})


class Recording(EGNTrainer):
    """EGNTrainer that keeps the batches its steps saw (for the reference step on the same batch)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches = getattr(self, "batches", []) + [{k: v.clone() for k, v in inputs.items()}]
        return super().training_step(model, inputs, num_items_in_batch)


# kind → (model, data, EGN options, EGN's loss, the reference closure's (outputs, targets) of a batch)
CASES = {
    "causal_lm": (lambda: gpt2(), lambda: lm_dataset(B), dict(curvature="mc", mc_samples=2, damping=0.5, line_search="armijo"),
                  "cross_entropy", lambda m, x: (m(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits[:, :-1],
                                                 x["labels"][:, 1:])),
    "sequence_ce": (lambda: bert("sequence"), lambda: classification_dataset(B, "sequence"), dict(damping=0.5, adaptive_damping=True),
                    "cross_entropy", lambda m, x: (m(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits, x["labels"])),
    "regression": (lambda: bert("sequence", num_labels=1), lambda: classification_dataset(B, "regression"), dict(damping=0.5),
                   nn.MSELoss(), lambda m, x: (m(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits,
                                               x["labels"].double().view(-1, 1))),
    "multi_label": (lambda: bert("sequence", problem_type="multi_label_classification"),
                    lambda: classification_dataset(B, "multi_label"), dict(damping=0.5), nn.BCEWithLogitsLoss(),
                    lambda m, x: (m(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits, x["labels"].double())),
    "token": (lambda: bert("token"), lambda: classification_dataset(B, "token"), dict(damping=0.5, momentum=0.5),
              "cross_entropy", lambda m, x: (m(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits, x["labels"])),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_the_trainers_step_is_egns_step_on_the_same_batch(kind, tmp_path):
    make, data, options, loss, reference_closure = CASES[kind]
    model = make()
    reference = copy.deepcopy(model)
    trainer = Recording(model=model, args=training_args(tmp_path), train_dataset=data(), data_collator=collate, egn=options)
    trainer.train()
    (batch,) = trainer.batches
    assert (batch["attention_mask"] == 0).any() and (kind not in ("causal_lm", "token") or (batch["labels"] == -100).any())

    before = [p.detach().clone() for p in reference.parameters()]
    with torch.no_grad():
        own_loss = float(reference(**batch).loss)  # the model's own loss on the batch, before the step
    generator = torch.Generator().manual_seed(0) if options.get("curvature") == "mc" else None  # args.seed
    opt = egn_fast.EGN(reference.train(), loss=loss, lr=1.0, generator=generator, **options)
    info = opt.step(closure=lambda: reference_closure(reference, batch))

    step = [p.detach() - b for p, b in zip(model.parameters(), before)]
    want = [p.detach() - b for p, b in zip(reference.parameters(), before)]
    assert info.accepted and all(float(w.abs().max()) > 0 for w in want)  # a real step: every parameter moved
    assert rel_err(step, want) < 1e-10, rel_err(step, want)
    assert trainer.last_step.loss == pytest.approx(info.loss, rel=1e-12)
    # what EGN minimizes is the model's own loss (transformers computes the causal LM loss in float32,
    # and BCE in the float32 labels' dtype)
    assert info.loss == pytest.approx(own_loss, rel=1e-6 if kind in ("causal_lm", "multi_label") else 1e-12)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(own_loss, rel=1e-4)  # logged (float32, rounded)


def test_it_trains_a_tiny_gpt2_and_a_bert_classifier_and_evaluates(tmp_path):
    for name, model, data, options in (
        ("gpt2", gpt2(dtype=torch.float32), lm_dataset(48, seed=3), dict(curvature="mc", damping=1.0, line_search="armijo")),
        ("bert", bert("sequence", dtype=torch.float32), classification_dataset(48, "sequence", seed=3), dict(damping=0.1, line_search="armijo")),
    ):
        args = training_args(tmp_path / name, per_device_train_batch_size=8, max_steps=8, logging_steps=2)
        trainer = EGNTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:16], data_collator=collate, egn=options)
        eval_before = trainer.evaluate()["eval_loss"]
        trainer.train()
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        steps = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logged) == 4 and all("egn_damping" in h and "grad_norm" not in h for h in steps)
        assert logged[-1] < 0.85 * logged[0], (name, logged)
        assert trainer.evaluate()["eval_loss"] < 0.8 * eval_before


def test_resuming_from_a_checkpoint_continues_bit_for_bit(tmp_path):
    """4 steps in one run = 2 steps, a checkpoint, and 2 resumed steps: λ (adaptive damping), the
    momentum buffers, the line search's step scale and the Monte-Carlo generator come back."""
    options = dict(curvature="mc", damping=1.0, momentum=0.9, line_search="armijo", adaptive_damping=True)

    def run(folder, resume=None):
        model = gpt2(dtype=torch.float32)
        args = training_args(folder, per_device_train_batch_size=4, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = EGNTrainer(model=model, args=args, train_dataset=lm_dataset(12, seed=5), data_collator=collate, egn=options)
        trainer.train(resume_from_checkpoint=resume)
        return [p.detach().clone() for p in model.parameters()], trainer

    full, first = run(tmp_path / "full")
    resumed, second = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert second.state.global_step == 4 and len([h for h in second.state.log_history if "loss" in h]) == 4
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
    a, b = first.egn.state_dict(), second.egn.state_dict()
    ea, eb = a["param_groups"][0]["egn"], b["param_groups"][0]["egn"]
    assert ea["damping"] == eb["damping"] and torch.equal(ea["generator_state"], eb["generator_state"])
    assert all(torch.equal(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"]) for k in a["state"])


def test_bf16_autocast_steps_close_to_the_fp32_step(tmp_path):
    """bf16=True on the CPU: Accelerate runs the forward under bf16 autocast; EGN's loss head and
    Gram stay fp32, so the step agrees with the fp32 one to bf16's precision."""
    model, data = bert("sequence", dtype=torch.float32), classification_dataset(B, "sequence")
    reference = copy.deepcopy(model).double()
    trainer = Recording(model=model, args=training_args(tmp_path, bf16=True), train_dataset=data, data_collator=collate,
                        egn=dict(damping=1.0))
    trainer.train()
    before = [p.detach().clone() for p in reference.parameters()]
    batch = trainer.batches[0]
    egn_fast.EGN(reference, loss="cross_entropy", damping=1.0).step(closure=lambda: (reference(**{
        k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"]))
    step = [p.detach().double() - b for p, b in zip(model.parameters(), before)]
    want = [p.detach() - b for p, b in zip(reference.parameters(), before)]
    assert 1e-4 < rel_err(step, want) < 5e-2  # bf16 made a difference, and only bf16's


def test_what_egn_cannot_honour_is_refused(tmp_path):
    data = classification_dataset(B, "sequence")
    refused = {
        "gradient_accumulation_steps": dict(args=training_args(tmp_path, gradient_accumulation_steps=2)),
        "optimizers=": dict(optimizers=(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), None)),
        "label_smoothing_factor": dict(args=training_args(tmp_path, label_smoothing_factor=0.1)),
    }
    for reason, kwargs in refused.items():
        with pytest.raises(ValueError, match=reason):
            EGNTrainer(model=bert("sequence"), **{"args": training_args(tmp_path), **kwargs}, train_dataset=data)
    with pytest.raises(ValueError, match="args.learning_rate"):
        EGNTrainer(model=bert("sequence"), args=training_args(tmp_path), train_dataset=data, egn=dict(lr=0.5))
    with pytest.raises(ValueError, match="multi_label_classification"):  # transformers would switch losses by dtype
        targets.outputs_and_targets(bert("sequence"), collate(classification_dataset(B, "multi_label")))
    with pytest.warns(UserWarning, match="learning_rate is EGN's step multiplier"):
        EGNTrainer(model=bert("sequence"), args=training_args(tmp_path, learning_rate=5e-5), train_dataset=data)
    trainer = EGNTrainer(model=bert("sequence"), args=training_args(tmp_path), train_dataset=data)
    with pytest.raises(RuntimeError, match="needs the batch"):
        trainer.create_optimizer().step()  # the Trainer's post-backward call with no EGN step before it


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x):
        return self.fc(x)


class NetTrainer(EGNTrainer):
    def outputs_and_targets(self, model, inputs):
        return model(inputs["x"]), inputs["y"]


def test_another_model_names_the_method_to_override_and_then_trains(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(24, 4)
    data = [dict(x=x[i], y=torch.stack([x[i, :2].sum(), x[i, 2] * x[i, 3]])) for i in range(24)]
    args = training_args(tmp_path, remove_unused_columns=False, max_steps=6, per_device_train_batch_size=8)
    with pytest.raises(TypeError, match="outputs_and_targets"):
        EGNTrainer(model=Net(), args=args, train_dataset=data).train()
    with pytest.raises(TypeError, match="outputs_and_targets"):
        EGNTrainer(model=Net(), args=args, train_dataset=data, egn=dict(loss="mse")).train()
    model = Net()
    full_loss = lambda: float(nn.functional.mse_loss(model(x), torch.stack([d["y"] for d in data])))
    before = full_loss()
    trainer = NetTrainer(model=model, args=args, train_dataset=data, egn=dict(loss="mse", damping=0.1, line_search="armijo"))
    trainer.train()
    assert full_loss() < 0.5 * before
