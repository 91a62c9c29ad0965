"""Train a Hugging Face GPT-2 (built from a small config, no download) with EGN through
`transformers.Trainer`: `egn_fast.integrations.EGNTrainer`, Monte-Carlo rows, Armijo line search.

    .venv/bin/python examples/trainer_egn.py                  # 40 steps, b 16, T 24
    .venv/bin/python examples/trainer_egn.py --steps 10

The text is generated (each sequence counts up by a random stride mod the vocabulary, so there is a
rule to learn and no file to fetch); sequences have random lengths, right-padded, with −100 labels
on the padding as a padding collator makes them. Everything but the optimizer is the Trainer's:
the dataloader, the lr schedule (args.learning_rate is EGN's step multiplier), logging, evaluation,
and a checkpoint that resumes EGN's state (λ, momentum, the Monte-Carlo generator) as well.
Printed: the Trainer's logs, then the held-out loss before and after.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from egn_fast.integrations import EGNTrainer

PAD = 0


def counting_text(n: int, T: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """n examples {input_ids, attention_mask, labels} of length T: start + stride·t (mod vocab − 1,
    shifted past the pad id), cut to a random length ≥ T/2 and right-padded."""
    g = torch.Generator().manual_seed(seed)
    start, stride = torch.randint(vocab - 1, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    ids = 1 + (start + stride * torch.arange(T)) % (vocab - 1)
    mask = (torch.arange(T) < torch.randint(T // 2, T + 1, (n, 1), generator=g)).long()
    ids = torch.where(mask.bool(), ids, PAD)
    labels = torch.where(mask.bool(), ids, -100)  # no loss on the padding
    return [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]) for i in range(n)]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--b", type=int, default=16)
    parser.add_argument("--T", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = GPT2Config(n_layer=args.layers, n_embd=32, n_head=4, vocab_size=args.vocab, n_positions=args.T, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=PAD)
    model = GPT2LMHeadModel(config)
    train = counting_text(args.b * args.steps, args.T, args.vocab, args.seed)
    held_out = counting_text(128, args.T, args.vocab, args.seed + 1)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.b, per_device_eval_batch_size=128, max_steps=args.steps,
            learning_rate=1.0,  # EGN's lr: 1.0 is the full LM step; the schedule scales it
            lr_scheduler_type="constant", logging_steps=max(1, args.steps // 5), save_strategy="steps",
            save_steps=args.steps, report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=args.seed,
        )
        trainer = EGNTrainer(model=model, args=training, train_dataset=train, eval_dataset=held_out,
                             egn=dict(curvature="mc", mc_samples=1, damping=1.0, line_search="armijo"))
        before = trainer.evaluate()["eval_loss"]
        trainer.train()  # trainer.train(resume_from_checkpoint=True) would continue from out/checkpoint-*
        after = trainer.evaluate()["eval_loss"]
    print(f"held-out loss: {before:.3f} before, {after:.3f} after {args.steps} EGN steps")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
