"""benchmarks/llm_finetune.py at reduced size: every scheme compiles, is timed against PyTorch eager
with the same trainable set (LoRA also against PEFT), and its memory is measured (ratios are
reported, not asserted)."""

import json

import pytest

from conftest import FAST_HOST, load_example_module

pytest.importorskip("transformers")


def test_llm_finetune_benchmark_small(capsys):
    bench = load_example_module("benchmarks/llm_finetune.py", "llm_finetune")
    # LLVM -O0: the same kernels, built faster; the test asserts no speed.
    rows = {r["scheme"]: r for r in bench.main(["--small", "--repeats", "2", "--target", json.dumps(FAST_HOST),
                                                "--scheme", "full", "--scheme", "LoRA r=8 (q, v)"])}
    assert set(rows) == {"full", "LoRA r=8 (q, v)"}
    full, lora = rows["full"], rows["LoRA r=8 (q, v)"]
    assert lora["trained"] < full["trained"] / 50  # adapters only: 2 x 2 x (256 x 8 + 8 x d_out)
    assert lora["ours MiB"] < full["ours MiB"] and lora["eager MiB"] < full["eager MiB"]
    assert lora["peft ms"] > 0 and lora["peft RSS MiB"] > 0 and full["peft ms"] is None  # PEFT: LoRA only
    assert all(r[k] > 0 for r in rows.values()
               for k in ("ours ms", "eager ms", "ours MiB", "eager MiB", "ours RSS MiB", "eager RSS MiB"))
    out = capsys.readouterr().out
    printed = {line[:18].strip(): line[18:].split() for line in out.splitlines() if line[:18].strip() in rows}
    assert set(printed) == set(rows)
    for scheme, row in rows.items():  # the table's ratios are the measured rows'
        cells = printed[scheme]
        assert cells[0] == "float32" and cells[1] == f"{row['trained']:,}"
        assert f"{row['eager ms'] / row['ours ms']:.2f}x" in cells
        assert f"{row['eager MiB'] / row['ours MiB']:.2f}x" in cells


def test_llm_finetune_benchmark_on_a_w4_base(capsys):
    """--base awq-w4: LoRA on the AWQ-quantized tiny LLaMA beside the float32 base; its planned
    memory is below float's and the line under the table compares it with PyTorch's float32 LoRA."""
    bench = load_example_module("benchmarks/llm_finetune.py", "llm_finetune")
    rows = bench.main(["--small", "--repeats", "2", "--target", json.dumps(FAST_HOST), "--scheme", "LoRA r=8 (q, v)",
                       "--base", "float32", "--base", "awq-w4"])
    by_base = {r["base"]: r for r in rows}
    assert set(by_base) == {"float32", "awq-w4"}
    assert by_base["awq-w4"]["trained"] == by_base["float32"]["trained"]  # the same adapters
    assert by_base["awq-w4"]["ours MiB"] < by_base["float32"]["ours MiB"]
    out = capsys.readouterr().out
    assert "LoRA r=8 (q, v) on the awq-w4 base: our peak" in out and "of PyTorch's on the float32 base" in out


def test_llm_finetune_large_models_have_the_published_shapes():
    """--model smollm-135m / qwen2-0.5b build their transformers configs: the parameter counts are
    the published ones (134,515,008 and 494,032,768, tied heads counted once). Built on the meta
    device: no memory, no compile here."""
    import torch

    bench = load_example_module("benchmarks/llm_finetune.py", "llm_finetune")
    for name, count in (("smollm-135m", 134_515_008), ("qwen2-0.5b", 494_032_768)):
        with torch.device("meta"):
            model = bench.build_model(name, "full")
        assert sum(p.numel() for p in model.parameters()) == count, name
        assert model.training and not model.config.use_cache
    assert bench.default_schemes("qwen2-0.5b") == ["last-2-blocks", "biases+norms", "LoRA r=8 (q, v)",
                                                   "LoRA r=32 (q, v)"]
    with pytest.raises(SystemExit):  # --small is the tiny model's CI size
        bench.main(["--small", "--model", "smollm-135m"])


def test_the_peft_peer_trains_our_adapters_as_our_lora_does():
    """bench.peft_lora_model: PEFT's LoRA on the job's base, with our rank, scale, layers and initial
    adapters, trains to the same adapters as our LoRALinear model in PyTorch (float64, 3 AdamW steps);
    a LoRA job on a quantized base and a non-LoRA job are refused."""
    import copy

    import torch

    import pockengine as pe
    from conftest import train_torch
    from pockengine.bench import peft_lora_model
    from pockengine.errors import JobError

    llm = load_example_module("benchmarks/llm_finetune.py", "llm_finetune")
    job = llm.make_job("LoRA r=8 (q, v)", "small")
    job.model.double()
    ours = copy.deepcopy(job.model)
    for name, param in ours.named_parameters():
        param.requires_grad_("lora_" in name)
    peft_model = peft_lora_model(job)
    trained = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert trained == sorted(f"base_model.model.{n}.default.weight" for n, p in ours.named_parameters()
                             if p.requires_grad)
    g = torch.Generator().manual_seed(3)
    batches = [(ids, ids) for ids in (torch.randint(0, 256, (2, 32), generator=g) for _ in range(3))]
    losses = []
    for model in (ours, peft_model):
        torch.manual_seed(0)  # the same dropout masks
        losses.append(train_torch(model, pe.optim.AdamW(lr=1e-3), batches, loss_fn=llm.causal_lm_loss))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    layer = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    torch.testing.assert_close(layer.lora_B["default"].weight, ours.model.layers[1].self_attn.v_proj.lora_B,
                               rtol=1e-12, atol=0)
    with pytest.raises(JobError, match="LoRA jobs only"):
        peft_lora_model(llm.make_job("last-2-blocks", "small"))
    with pytest.raises(JobError, match="needs float base layers; model.layers.0.self_attn.q_proj is LoRAW4Linear"):
        peft_lora_model(llm.make_job("LoRA r=8 (q, v)", "small", base="awq-w4"))
