"""A tiny LLaMA (transformers' LlamaForCausalLM, random-initialised) and a byte-level tokenizer: the
model the example fine-tunes and benchmarks/llm_finetune.py measures. Nothing is downloaded.

4 blocks, hidden 256, 4 heads (2 key/value heads: grouped-query attention), SiLU-gated MLP of 688,
rotary embeddings, RMSNorm, the embedding tied to the LM head. Tokens are the text's UTF-8 bytes
(0..255) plus BOS/EOS/PAD; the vocabulary is padded to 384 so the LM head's width is a multiple of
the SIMD vectors.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

BOS, EOS, PAD = 256, 257, 258
VOCAB = 384
IGNORE = -100  # label of positions the loss skips (padding)


def tiny_llama(layers: int = 4, hidden: int = 256, heads: int = 4, kv_heads: int = 2, mlp: int = 688,
               max_positions: int = 512, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=mlp, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                         attention_dropout=0.0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).train()


def encode(text: str) -> list:
    return [BOS] + list(text.encode("utf-8")) + [EOS]


def decode(ids) -> str:
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def causal_lm_loss(out, labels):
    """Next-token cross-entropy over the vocabulary; labels of IGNORE (padding) do not count."""
    logits = out.logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE)


def batches(token_ids: list, batch: int, seq: int, generator: torch.Generator):
    """Yield (input ids, labels) of `batch` random windows of `seq` tokens from one long stream."""
    stream = torch.tensor(token_ids)
    while True:
        starts = torch.randint(0, len(stream) - seq, (batch,), generator=generator)
        ids = torch.stack([stream[s:s + seq] for s in starts])
        yield ids, ids.clone()
