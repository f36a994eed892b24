"""Fine-tune a tiny LLaMA with a sparse update, compiled: loss and tokens/s per stage.

    python examples/llama_finetune/train.py                          # last-2-blocks (PockEngine-style)
    python examples/llama_finetune/train.py --scheme lora            # LoRA r=8 on q_proj, v_proj
    python examples/llama_finetune/train.py --scheme lora --base awq-w4   # LoRA on a 4-bit AWQ base
    pockengine build examples/llama_finetune/train.py -o build/llama_finetune

The text is generated here, nothing is downloaded: stage 1 pretrains the randomly initialised model
(tiny_llama.py, transformers' LlamaForCausalLM) on simple English sentences, every parameter
trained; with --base awq-w4 or smoothquant-w8a8 the pretrained model's frozen layers are then
quantized (pe.quantize.awq / smoothquant, calibrated on the English text); stage 2 fine-tunes it on
arithmetic in words ("seven plus five is twelve.") with the chosen scheme. Before and after stage 2
it prints the loss on held-out arithmetic and a greedy completion (PyTorch runs the forward for
those, on the compiled program's weights). Stage 3 deploys the fine-tuned model: an inference
artifact (pe.compile_inference: the quantized base stays quantized, LoRA adapters stay adapters)
exported to --export, loaded back and generating the completion itself, without PyTorch.
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
from tiny_llama import PAD, batches, causal_lm_loss, decode, encode, tiny_llama

import pockengine as pe

BATCH, SEQ = 4, 128
# name -> (scheme, fine-tuning learning rate): adapters and norm scales want a larger one
SCHEMES = {
    "full": (lambda: None, 3e-3),
    "last-2-blocks": (lambda: pe.SparseUpdate.last_blocks(2), 3e-3),
    "biases+norms": (lambda: pe.SparseUpdate.bias_and_norm(), 1e-2),
    "lora": (lambda: pe.SparseUpdate.lora(8, ("q_proj", "v_proj"), alpha=16), 1e-2),
}
# name -> the frozen base's format: a function (pretrained model, calibration batches, scheme) -> model
BASES = {
    "float32": lambda model, calibration, scheme: model,
    "awq-w4": lambda model, calibration, scheme: pe.quantize.awq(model, calibration, sparse_update=scheme),
    "smoothquant-w8a8": lambda model, calibration, scheme: pe.quantize.smoothquant(model, calibration,
                                                                                   sparse_update=scheme),
}
GENERATE_WINDOW = 48  # tokens the inference artifact reads: the prompt and what it generates
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


def quantized_base(pretrained, base: str, scheme: str, calibration: list):
    """The pretrained model with its frozen layers in the format `base` names (a copy when quantized)."""
    return BASES[base](pretrained, calibration, SCHEMES[scheme][0]())


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


def generate(program, prompt: str, tokens: int = 12) -> str:
    """Greedy completion by an inference program of the causal LM (pe.compile_inference) compiled for
    one window of GENERATE_WINDOW tokens: the text so far fills the window's start, PAD the rest, and
    the next token is read at the last filled position (attention is causal: what follows cannot
    change it). No key/value cache: each token runs the whole window."""
    window = program.signature.batch[0].shape[1]
    ids = encode(prompt)[:-1]
    for _ in range(min(tokens, window - len(ids))):
        filled = np.full((1, window), PAD, dtype=np.int64)
        filled[0, :len(ids)] = ids
        ids.append(int(program(filled)[0, len(ids) - 1].argmax()))
    return decode(ids)


def deploy(model, directory: str) -> object:
    """Compile the fine-tuned model's forward into an inference artifact, export it to `directory`
    and load it back, as a device would (numpy and the TVM runtime only)."""
    window = torch.full((1, GENERATE_WINDOW), PAD, dtype=torch.int64)
    program = pe.compile_inference(model, (window,), output=lambda out: out.logits, name="llama_finetune_inference")
    return pe.load(program.export(directory))


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
    parser.add_argument("--base", choices=list(BASES), default="float32",
                        help="the frozen base's format for stage 2 (quantized after pretraining)")
    parser.add_argument("--export", default=os.path.join("build", "llama_finetune_inference"),
                        help="where stage 3 writes the inference artifact (an existing PockEngine artifact there is "
                             "replaced, anything else refused)")
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
    if args.base != "float32":
        calibration = [next(batches(encode(english(200, seed=4)), args.batch, args.seq, generator))[0]
                       for _ in range(4)]
        print(f"\nquantizing the frozen base: {args.base}, calibrated on {len(calibration)} batches of English")
        pretrained = quantized_base(pretrained, args.base, args.scheme, calibration).eval()
    before = held_out_loss(pretrained, held_out, args.seq)
    print(f"\nstage 2: fine-tuning on arithmetic in words with {args.scheme} on a {args.base} base, {args.steps} steps")
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
    by_torch = complete(finetuned, "three plus four is")
    print(f"  held-out arithmetic loss after:  {after:.4f};  'three plus four is' -> {by_torch!r}")

    print(f"\nstage 3: deploying: an inference artifact of the fine-tuned model ({args.base} base) in {args.export}")
    deployed = deploy(finetuned, args.export)
    size = sum(os.path.getsize(os.path.join(args.export, f)) for f in os.listdir(args.export)) / 2**20
    by_artifact = generate(deployed, "three plus four is")
    print(f"  {size:.1f} MiB on disk, planned peak memory {deployed.memory_report().peak_bytes / 2**20:.1f} MiB; "
          f"'three plus four is' -> {by_artifact!r}"
          f" ({'as' if by_artifact == by_torch else 'unlike'} PyTorch's completion)")
    return {"before": before, "after": after, "losses": losses, "generated": by_artifact, "by_torch": by_torch,
            "finetuned": finetuned, "deployed": deployed}


if __name__ == "__main__":
    main()
