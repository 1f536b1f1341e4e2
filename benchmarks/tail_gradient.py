"""How well stored sparse teacher targets point the student's gradient, against the full KL's.

Run from the repository root (about a minute on 2 CPU cores):

    PYTHONPATH=. python benchmarks/tail_gradient.py
    PYTHONPATH=. python benchmarks/tail_gradient.py --top-k 64 --temperature 2 --samples 16,64,256 --blocks 4

Teacher: the bundled SmolLM2-135M; student: its 15-layer importance cut (the demo's starting
point). Data: the first ``--blocks`` blocks of 256 tokens of the bundled corpora's training
text. For the KL term at ``--temperature`` the script forms the gradient with respect to the
student's logits of

- the full forward KL (the live teacher): ``T (q - p)``;
- the top-k with the tail bucket (``cache-teacher --tail-samples 0``): ``T (q - p~)``, the
  tail mass spread like the student's own tail;
- the top-k with ``S`` tail samples drawn as ``cache-teacher`` draws them: the tail mass
  spread over the samples;

pushes each through the student's backward pass, and prints the cosine similarity and norm
ratio of the resulting parameter gradient against the full KL's, with the teacher mass that
the top-k holds. This is what decides whether a run from a cache can follow a live run
(docs/teacher_cache.md, "Tail samples").
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from lmdistill.data.corpora import CORPORA, corpus_documents
from lmdistill.models.arch import decoder_layers
from lmdistill.models.load import load_model, load_tokenizer
from lmdistill.student.build import build_student
from lmdistill.student.importance import block_influence, most_influential
from lmdistill.teacher_cache.build import sample_tail

TEACHER = "smollm2-135m"
BLOCK = 256


def parameter_gradient(student: torch.nn.Module, input_ids: torch.Tensor, logit_grad: torch.Tensor) -> torch.Tensor:
    """The student's parameter gradient, flattened, for ``logit_grad`` = d loss / d logits."""
    student.zero_grad(set_to_none=True)
    student(input_ids=input_ids).logits.backward(logit_grad)
    return torch.cat([p.grad.flatten().double() for p in student.parameters() if p.grad is not None])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--samples", default="16,64,256", help="comma-separated tail sample counts")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    T, k = args.temperature, args.top_k
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(TEACHER)
    text = "\n\n".join(doc.text for name in CORPORA for doc in corpus_documents(name, "train")[:1])
    tokens = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)
    teacher = load_model(TEACHER).eval()
    scores = block_influence(teacher, tokens, block_size=BLOCK, max_tokens=2048)
    layers = most_influential(scores, len(decoder_layers(teacher)) // 2)
    student = build_student(teacher, layers)
    input_ids = torch.from_numpy(tokens[: args.blocks * BLOCK].reshape(args.blocks, BLOCK))

    with torch.no_grad():
        shifted = teacher(input_ids=input_ids).logits.float()
        shifted -= shifted.max(dim=-1, keepdim=True).values
        q = torch.softmax(student(input_ids=input_ids).logits.float() / T, dim=-1)
    p_full = torch.softmax(shifted / T, dim=-1)
    top_p, top_ids = p_full.topk(k, dim=-1)
    p_tail = (1.0 - top_p.sum(dim=-1, keepdim=True)).clamp(min=0.0)
    mass = top_p.sum(dim=-1).flatten()
    print(f"teacher mass in its top {k} at T={T:g}: mean {mass.mean():.3f}, median {mass.median():.3f}, "
          f"10th percentile {mass.quantile(0.1):.3f} ({mass.numel():,} positions)")

    full = parameter_gradient(student, input_ids, T * (q - p_full))
    q_tail = (1.0 - q.gather(-1, top_ids).sum(dim=-1, keepdim=True)).clamp(min=1e-30)
    spread = (q * p_tail / q_tail).scatter(-1, top_ids, top_p)
    rows = [("top-k + tail bucket", parameter_gradient(student, input_ids, T * (q - spread)))]
    generator = torch.Generator().manual_seed(args.seed)
    for samples in (int(s) for s in args.samples.split(",") if s):
        ids = torch.stack([sample_tail(shifted[b], top_ids[b], T, samples, generator) for b in range(args.blocks)])
        counts = torch.zeros_like(q).scatter_add_(-1, ids, torch.ones_like(ids, dtype=q.dtype))
        target = (counts * p_tail / samples).scatter(-1, top_ids, top_p)
        rows.append((f"top-k + {samples} tail samples", parameter_gradient(student, input_ids, T * (q - target))))
    print(f"\nKL(T={T:g}) parameter gradient against the full KL's (student: teacher layers {layers}):\n")
    print("| targets | cosine | norm ratio |\n|---|---:|---:|")
    for name, grad in rows:
        cosine = float(grad @ full / (grad.norm() * full.norm()))
        print(f"| {name} | {cosine:.3f} | {float(grad.norm() / full.norm()):.3f} |")


if __name__ == "__main__":
    main()
