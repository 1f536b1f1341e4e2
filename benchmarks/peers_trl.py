"""TRL's ``GKDTrainer`` on fixed token blocks: the peer that ``benchmarks/peers.py`` times.

Runs inside the virtual environment that ``peers.py`` builds (pinned TRL beside this
project's torch and transformers), in a fresh process per measurement, and imports nothing
from lmdistill. Forward KL on a fixed dataset: ``lmbda=0`` (no on-policy samples), ``beta=0``
(the generalised JSD at beta 0 is KL(teacher || student)), ``seq_kd`` off, no gradient
checkpointing, float32, the student's dropout off (TRL's default, as lmdistill's recipes train).

    python peers_trl.py --teacher T --student S --blocks blocks.npy --batch 4 --steps 8 --threads 2 --out times.json

Writes ``{"step_end_s": [...], "tokens_per_step": ...}``: the wall-clock time at the end of every
optimiser step, from which the driver takes the time between consecutive steps (data,
forward, backward, optimiser and logging, as lmdistill's ``elapsed_s`` counts them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.experimental.gkd import GKDConfig, GKDTrainer


class StepClock(TrainerCallback):
    """The wall-clock time at the end of each optimiser step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Full blocks, no padding: every position is a target, as in lmdistill's blocks."""
    ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--blocks", required=True, help=".npy of shape (n, seq) int token ids")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--lr", type=float, default=2.5e-4)
    parser.add_argument("--max-grad-norm", type=float, default=5.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    blocks = np.load(args.blocks)
    if len(blocks) < args.batch * args.steps:
        raise SystemExit(f"{args.blocks} holds {len(blocks)} blocks; {args.batch * args.steps} are needed")
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    data = Dataset.from_dict({"input_ids": blocks[: args.batch * args.steps].tolist()})
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="peers-trl-") as scratch:
        config = GKDConfig(
            output_dir=scratch, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=args.lr, max_grad_norm=args.max_grad_norm,
            lmbda=0.0, beta=0.0, seq_kd=False, disable_dropout=True, gradient_checkpointing=False,
            bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0, logging_steps=1,
            report_to="none", save_strategy="no", seed=0,
        )
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, data_collator=collate,
                             train_dataset=data, processing_class=tokenizer, callbacks=[clock])
        trainer.train()
    Path(args.out).write_text(json.dumps({
        "step_end_s": clock.ends, "tokens_per_step": args.batch * blocks.shape[1],
        "torch_threads": torch.get_num_threads(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
