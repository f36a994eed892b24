"""Fine-tune a tiny LLaMA with a sparse update, compiled: loss and tokens/s per stage.

    python examples/llama_finetune/train.py                          # last-2-blocks (PockEngine-style)
    python examples/llama_finetune/train.py --scheme lora            # LoRA r=8 on q_proj, v_proj
    pockengine build examples/llama_finetune/train.py -o build/llama_finetune

The text is generated here, nothing is downloaded: stage 1 pretrains the randomly initialised model
(tiny_llama.py, transformers' LlamaForCausalLM) on simple English sentences, every parameter
trained; stage 2 fine-tunes it on arithmetic in words ("seven plus five is twelve.") with the
chosen scheme. Before and after stage 2 it prints the loss on held-out arithmetic and a greedy
completion (PyTorch runs the forward for those, on the compiled program's weights).
"""

import argparse
import copy
import os
import random
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_llama import batches, causal_lm_loss, decode, encode, tiny_llama

import pockengine as pe

BATCH, SEQ = 4, 128
# name -> (scheme, fine-tuning learning rate): adapters and norm scales want a larger one
SCHEMES = {
    "full": (lambda: None, 3e-3),
    "last-2-blocks": (lambda: pe.SparseUpdate.last_blocks(2), 3e-3),
    "biases+norms": (lambda: pe.SparseUpdate.bias_and_norm(), 1e-2),
    "lora": (lambda: pe.SparseUpdate.lora(8, ("q_proj", "v_proj"), alpha=16), 1e-2),
}
NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
           "sixteen seventeen eighteen nineteen twenty").split()


def english(n: int, seed: int) -> str:
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the old man", "my sister", "the teacher", "a bird", "the farmer", "our neighbour"]
    verbs = ["sees", "likes", "finds", "carries", "paints", "watches", "follows", "remembers"]
    objects = ["a red ball", "the green door", "an apple", "the small boat", "a long letter", "the blue kite"]
    places = ["in the garden", "at night", "near the river", "after school", "on the hill", "every morning"]
    return " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(places)}."
                    for _ in range(n))


def arithmetic(n: int, seed: int) -> str:
    rng = random.Random(seed)
    sums = []
    for _ in range(n):
        a = rng.randint(0, 10)
        b = rng.randint(0, 10)
        sums.append(f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
    return " ".join(sums)


def make_job(model, scheme: str, batch: int = BATCH, seq: int = SEQ):
    ids = next(batches(encode(arithmetic(200, seed=0)), batch, seq, torch.Generator().manual_seed(0)))
    make_scheme, lr = SCHEMES[scheme]
    return pe.TrainingJob(model, (ids[0],), ids[1], causal_lm_loss, pe.optim.AdamW(lr=lr, weight_decay=0.0),
                          sparse_update=make_scheme(), name="llama_finetune")


# What `pockengine build` compiles: stage 2 on a freshly initialised model.
job = make_job(tiny_llama(), "last-2-blocks")


def train(program, data, steps: int, label: str, every: int) -> list:
    tokens = program.signature.batch[0].shape[0] * program.signature.batch[0].shape[1]
    losses, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        losses.append(program.step(*next(data)))
        if step % every == 0 or step == steps:
            rate = tokens * step / (time.perf_counter() - start)
            print(f"  {label} step {step:>4}  loss {losses[-1]:.4f}  {rate:,.0f} tokens/s", flush=True)
    return losses


def held_out_loss(model, text: str, seq: int) -> float:
    ids = torch.tensor(encode(text))[: (len(encode(text)) // seq) * seq].reshape(-1, seq)
    with torch.no_grad():
        return float(causal_lm_loss(model(ids), ids))


def complete(model, prompt: str, tokens: int = 12) -> str:
    ids = torch.tensor([encode(prompt)[:-1]])  # no EOS: continue the prompt
    with torch.no_grad():
        for _ in range(tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return decode(ids[0].tolist())


def with_weights(model, program):
    """A copy of `model` holding the program's trained weights."""
    trained = copy.deepcopy(model)
    trained.load_state_dict(program.state_dict(as_torch=True))
    return trained.eval()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", choices=list(SCHEMES), default="last-2-blocks")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--seq", type=int, default=SEQ)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)

    print(f"stage 1: pretraining on generated English, every parameter, {args.pretrain_steps} steps")
    base = tiny_llama()
    pretrain = pe.TrainingJob(base, *next(batches(encode(english(50, 1)), args.batch, args.seq, generator)),
                              causal_lm_loss, pe.optim.AdamW(lr=2e-3, weight_decay=0.0), name="llama_pretrain")
    program = pe.compile(pretrain)
    train(program, batches(encode(english(20000, seed=2)), args.batch, args.seq, generator), args.pretrain_steps,
          "pretrain", every=50)
    pretrained = with_weights(base, program)

    held_out = arithmetic(400, seed=99)
    before = held_out_loss(pretrained, held_out, args.seq)
    print(f"\nstage 2: fine-tuning on arithmetic in words with {args.scheme}, {args.steps} steps")
    print(f"  held-out arithmetic loss before: {before:.4f};  'three plus four is' -> "
          f"{complete(pretrained, 'three plus four is')!r}")
    finetune = make_job(copy.deepcopy(pretrained).train(), args.scheme, args.batch, args.seq)
    program = pe.compile(finetune)
    trained = sum(int(np.prod(s.shape)) for s in program.signature.state
                  if program.signature.categories[s.name] == "param")
    total = sum(p.numel() for p in finetune.model.parameters())
    print(f"  training {trained:,} of {total:,} values; planned peak memory "
          f"{program.memory_report().peak_bytes / 2**20:.1f} MiB")
    losses = train(program, batches(encode(arithmetic(20000, seed=3)), args.batch, args.seq, generator), args.steps,
                   "fine-tune", every=50)
    finetuned = with_weights(finetune.model, program)
    after = held_out_loss(finetuned, held_out, args.seq)
    print(f"  held-out arithmetic loss after:  {after:.4f};  'three plus four is' -> "
          f"{complete(finetuned, 'three plus four is')!r}")
    return {"before": before, "after": after, "losses": losses}


if __name__ == "__main__":
    main()
