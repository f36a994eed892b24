"""Hugging Face architectures of every major family, random-initialised from tiny configs as people
configure them for training (train mode, use_cache=False), with their task's loss and batches.

Dropout is set to 0 in the configs here: these models check the gradient rules and the importer;
dropout in the step is checked on its own. Each entry: name -> (family, build() -> (model, loss,
batches)), a batch being (inputs tuple, target).
"""

import importlib
import inspect

import pytest
import torch

import pockengine as pe

transformers = pytest.importorskip("transformers")

VOCAB, BATCH, SEQ, STEPS = 128, 2, 12, 3
DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, use_cache=False, attention_dropout=0.0)


def causal_lm_loss(out, labels):
    """Next-token cross-entropy; -100 marks prompt positions without a target."""
    logits = out.logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def seq2seq_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def classification_loss(out, labels):
    return torch.nn.functional.cross_entropy(out.logits, labels)


class Seq2Seq(torch.nn.Module):
    """An encoder-decoder called positionally: (encoder input, decoder_input_ids) -> logits."""

    def __init__(self, model, encoder_input="input_ids"):
        super().__init__()
        self.model, self.encoder_input = model, encoder_input

    def forward(self, x, decoder_input_ids):
        return self.model(**{self.encoder_input: x}, decoder_input_ids=decoder_input_ids).logits


def _generator():
    return torch.Generator().manual_seed(1)


def lm_batches(padding=None):
    g, batches = _generator(), []
    for _ in range(STEPS):
        ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        if padding is not None:
            ids[:, -2:] = padding
        batches.append(((ids,), labels))
    return batches


def classification_batches(padding=None):
    g, batches = _generator(), []
    for _ in range(STEPS):
        ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
        if padding is not None:  # padded sequences: the embedding's padding_idx row gets no gradient
            ids[:, -2:] = padding
        batches.append(((ids,), torch.randint(0, 3, (BATCH,), generator=g)))
    return batches


def seq2seq_batches(padding=None):
    g, batches = _generator(), []
    for _ in range(STEPS):
        source = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
        if padding is not None:
            source[:, -2:] = padding
        batches.append(((source, torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)),
                        torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)))
    return batches


def causal(config_class, model_class, **overrides):
    return lambda: (getattr(transformers, model_class)(getattr(transformers, config_class)(**{**DECODER, **overrides})),
                    causal_lm_loss, lm_batches(overrides.get("pad_token_id")))


def whisper():
    config = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=8,
        max_target_positions=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
        decoder_layerdrop=0.0, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None)
    g = _generator()
    batches = [((torch.randn(BATCH, 8, 16, generator=g), torch.randint(3, VOCAB, (BATCH, 8), generator=g)),
                torch.randint(3, VOCAB, (BATCH, 8), generator=g)) for _ in range(STEPS)]
    return Seq2Seq(transformers.WhisperForConditionalGeneration(config), "input_features"), seq2seq_loss, batches


def wav2vec2(feature_norm):
    def build():
        config = transformers.Wav2Vec2Config(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=2, feat_extract_norm=feature_norm, hidden_dropout=0.0,
            activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0, feat_quantizer_dropout=0.0,
            final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, mask_feature_prob=0.0, num_labels=3,
            classifier_proj_size=16, do_stable_layer_norm=False)
        g = _generator()
        batches = [((torch.randn(BATCH, 160, generator=g),), torch.randint(0, 3, (BATCH,), generator=g))
                   for _ in range(STEPS)]
        return transformers.Wav2Vec2ForSequenceClassification(config), classification_loss, batches
    return build


def encoder(config_class, model_class, padding, **config):
    return lambda: (getattr(transformers, model_class)(getattr(transformers, config_class)(**config)),
                    classification_loss, classification_batches(padding))


def seq2seq(config_class, model_class, padding, **config):
    return lambda: (Seq2Seq(getattr(transformers, model_class)(getattr(transformers, config_class)(**config))),
                    seq2seq_loss, seq2seq_batches(padding))


MODELS = {
    "llama": causal("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=1),
    "qwen2": causal("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=1),
    "mistral": causal("MistralConfig", "MistralForCausalLM", num_key_value_heads=1, sliding_window=None),
    "gemma": causal("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=1, head_dim=16),
    "gemma2": causal("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=1, head_dim=16, sliding_window=8),
    "phi3": causal("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=1, resid_pdrop=0.0, embd_pdrop=0.0,
                   pad_token_id=0),
    "gpt2": lambda: (transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, use_cache=False)), causal_lm_loss, lm_batches()),
    "opt": lambda: (transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, layerdrop=0.0, use_cache=False, pad_token_id=1)), causal_lm_loss, lm_batches(1)),
    "bert": encoder("BertConfig", "BertForSequenceClassification", 0, vocab_size=VOCAB, hidden_size=32,
                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                    num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "roberta": encoder("RobertaConfig", "RobertaForSequenceClassification", 1, vocab_size=VOCAB, hidden_size=32,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                       num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       classifier_dropout=0.0),
    "distilbert": encoder("DistilBertConfig", "DistilBertForSequenceClassification", 0, vocab_size=VOCAB, dim=32,
                          n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64, num_labels=3,
                          dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, qa_dropout=0.0),
    "t5": seq2seq("T5Config", "T5ForConditionalGeneration", 0, vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64,
                  num_layers=1, num_decoder_layers=1, num_heads=2, dropout_rate=0.0, use_cache=False,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16),
    "bart": seq2seq("BartConfig", "BartForConditionalGeneration", 1, vocab_size=VOCAB, d_model=32, encoder_layers=1,
                    decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                    decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0, use_cache=False),
    "whisper": whisper,
    "wav2vec2 (group norm)": wav2vec2("group"),
    "wav2vec2 (layer norm)": wav2vec2("layer"),
}

CAUSAL_LMS = ["llama", "qwen2", "mistral", "gemma", "gemma2", "phi3", "gpt2", "opt"]


def float64_internals(monkeypatch):
    """transformers computes RMSNorm / T5LayerNorm statistics, rotary cos/sin and eager attention's
    softmax in float32 even in a float64 model. For the float64 comparison both sides compute them
    in the model's dtype (as tests/test_transformers.py does for LLaMA): otherwise the test measures
    float32 rounding, not our rules."""

    def rms_norm(self, hidden):
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def gemma_norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    def rotary(self, x, position_ids):
        freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(x.dtype)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    for family, prefix in (("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral"), ("phi3", "Phi3"),
                           ("gemma", "Gemma"), ("gemma2", "Gemma2")):
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        monkeypatch.setattr(getattr(module, f"{prefix}RMSNorm"), "forward",
                            gemma_norm if family.startswith("gemma") else rms_norm)
        monkeypatch.setattr(getattr(module, f"{prefix}RotaryEmbedding"), "forward", rotary)
        source = inspect.getsource(module.eager_attention_forward).replace("dtype=torch.float32", "dtype=query.dtype")
        namespace = dict(module.__dict__)
        exec(source, namespace)  # noqa: S102 - transformers' own function, recompiled with one dtype changed
        monkeypatch.setattr(module, "eager_attention_forward", namespace["eager_attention_forward"])
    from transformers.models.t5 import modeling_t5

    monkeypatch.setattr(modeling_t5.T5LayerNorm, "forward", rms_norm)


BIASES_AND_NORMS = ("biases and norms", lambda model: pe.SparseUpdate.bias_and_norm())
LORA_QV = ("LoRA r=4 on q, v", lambda model: pe.SparseUpdate.lora(4, ("q_proj", "v_proj"), alpha=8))
# name -> (label, model -> scheme): one sparse scheme per model, the kind people fine-tune that family with
SCHEMES = {
    "llama": LORA_QV,
    "qwen2": LORA_QV,
    "mistral": ("last 2 layers", lambda model: pe.SparseUpdate.last_k(2)),
    "gemma": LORA_QV,
    "gemma2": BIASES_AND_NORMS,
    "phi3": ("LoRA r=4 on qkv", lambda model: pe.SparseUpdate.lora(4, ("qkv_proj",), alpha=8)),
    "gpt2": BIASES_AND_NORMS,
    "opt": LORA_QV,
    "bert": ("LoRA r=4 on query, value", lambda model: pe.SparseUpdate.lora(4, ("query", "value"), alpha=8)),
    "roberta": BIASES_AND_NORMS,
    "distilbert": ("LoRA r=4 on q, v", lambda model: pe.SparseUpdate.lora(4, ("q_lin", "v_lin"), alpha=8)),
    "t5": ("norms (T5 has no biases)", lambda model: pe.SparseUpdate.bias_and_norm()),
    "bart": LORA_QV,
    "whisper": BIASES_AND_NORMS,
    "wav2vec2 (group norm)": BIASES_AND_NORMS,
    "wav2vec2 (layer norm)": ("last 2 layers", lambda model: pe.SparseUpdate.last_k(2)),
}


def build(name, monkeypatch):
    """-> (model, loss, batches) of a zoo entry, its internals in the model's dtype."""
    float64_internals(monkeypatch)
    torch.manual_seed(0)
    return MODELS[name]()
