"""Fine-tuning (finetune/train.py, data.py, merge.py) on tiny models: the loss falls, gradient
accumulation is a bigger batch, a seed repeats a run, an interrupted run resumes to the same
adapter, two processes give one process's losses, chat data trains on the assistant turns only,
and merges keep the function (into a float model; QA-LoRA into its int4 base, exactly)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from safetensors.torch import load_file

import modelpress
from modelpress.errors import ModelpressError
from modelpress.finetune import train as train_mod
from modelpress.finetune.adapters import adapter_state, load_adapter, save_adapter
from modelpress.finetune.data import examples
from modelpress.finetune.lora import LoraConfig, add_lora, lora_layers
from modelpress.finetune.merge import merge_adapters, merge_qa_lora
from modelpress.finetune.train import TrainConfig, finetune
from tests.conftest import byte_tokenizer, tiny_llama

LORA = LoraConfig(r=8, alpha=16, targets="all-linear")
X = torch.randint(0, 261, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 120)
    return path


def _train(text, out=None, lora=LORA, **kw):
    cfg = TrainConfig(**{"steps": 12, "batch": 4, "ctx": 48, "lr": 3e-3, "eval_every": 6, "compute": "float32", **kw})
    return finetune(tiny_llama(), byte_tokenizer(), text, lora, cfg, out=out, progress=False)


def test_the_loss_falls_on_training_and_held_out_rows(text, tmp_path):
    result = _train(text, out=tmp_path / "a", steps=24, eval_every=12)
    losses = [h["loss"] for h in result.history]
    evals = [h["eval_loss"] for h in result.history if "eval_loss" in h]
    assert losses[-1] < 0.75 * losses[0] and evals[-1] < evals[0], (losses, evals)  # observed 5.85 -> 4.1
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert len(log["history"]) == 24 and not (tmp_path / "a" / "checkpoint").exists()
    model, _ = load_adapter(tiny_llama(), tmp_path / "a")  # the saved adapter is the trained one
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, result.model(X).logits, rtol=0, atol=1e-6)


def test_gradient_accumulation_is_a_bigger_batch(text):
    one = _train(text, batch=4, grad_accum=1, steps=4)
    two = _train(text, batch=2, grad_accum=2, steps=4)
    torch.testing.assert_close(torch.tensor([h["loss"] for h in two.history]),
                               torch.tensor([h["loss"] for h in one.history]), rtol=1e-5, atol=1e-6)
    for k, v in adapter_state(one.model).items():
        torch.testing.assert_close(adapter_state(two.model)[k], v, rtol=1e-4, atol=1e-6)


def test_a_seed_repeats_a_run_and_another_seed_does_not(text):
    a, b, c = _train(text, steps=3), _train(text, steps=3), _train(text, steps=3, seed=1)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h["loss"] for h in a.history] != [h["loss"] for h in c.history]


PISSA = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), init="pissa")


@pytest.mark.parametrize("lora", [LORA, PISSA], ids=["kaiming", "pissa"])
def test_an_interrupted_run_resumes_to_the_same_adapter(lora, text, tmp_path, monkeypatch):
    whole = _train(text, out=tmp_path / "whole", steps=6, lora=lora)
    calls = {"n": 0}
    real = train_mod.loss_sum

    def interrupting(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4: Ctrl-C
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_mod, "loss_sum", interrupting)
    with pytest.raises(ModelpressError, match="interrupted at step 3 of 6.*--resume"):
        _train(text, out=tmp_path / "run", steps=6, save_every=100, lora=lora)
    assert (tmp_path / "run" / "checkpoint" / "trainer_state.pt").is_file()
    monkeypatch.setattr(train_mod, "loss_sum", real)
    resumed = finetune(tiny_llama(), byte_tokenizer(), text, lora,
                       TrainConfig(steps=6, batch=4, ctx=48, lr=3e-3, eval_every=6, compute="float32"),
                       out=tmp_path / "run", resume=True, progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    for k, v in adapter_state(whole.model).items():
        assert torch.equal(adapter_state(resumed.model)[k], v), k
    saved = [load_file(str(tmp_path / run / "adapter_model.safetensors")) for run in ("whole", "run")]
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


@pytest.mark.parametrize("rslora", [False, True])
def test_a_pissa_adapter_is_saved_for_the_original_base(rslora, text, tmp_path):
    """PiSSA trains on the residual W - s B0 A0; the saved adapter is the rank-2r LoRA that gives the
    trained model on the untouched base (PEFT's conversion), for modelpress and for PEFT."""
    lora = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), init="pissa", rslora=rslora)
    result = _train(text, out=tmp_path / "p", steps=4, lora=lora)
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    with torch.no_grad():
        trained = result.model(X).logits
        base = tiny_llama()(X).logits
        model, _ = load_adapter(tiny_llama(), tmp_path / "p")
        mine = model(X).logits
    assert (trained - base).abs().max() > 1e-3  # training moved the model
    torch.testing.assert_close(mine, trained, rtol=0, atol=2e-5)
    peft = pytest.importorskip("peft", reason="peft is not installed: PEFT's reading of the adapter is not checked")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p")(X).logits
    torch.testing.assert_close(theirs, trained, rtol=0, atol=2e-5)


def test_two_processes_give_one_process_s_losses(text, tmp_path):
    """torchrun --nproc-per-node 2 -m modelpress finetune: gloo on a CPU, each process half the batch."""
    folder = tmp_path / "m"
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    args = [str(folder), "--data", str(text), "--steps", "3", "--batch", "4", "--ctx", "48", "--lr", "3e-3",
            "--targets", "all-linear", "--rank", "8", "--alpha", "16", "--compute", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "modelpress", "finetune", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29517", "-m", "modelpress", "finetune", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    logs = [json.loads((tmp_path / d / "training_log.json").read_text()) for d in ("one", "two")]
    assert logs[1]["processes"] == 2
    torch.testing.assert_close(torch.tensor([h["loss"] for h in logs[1]["history"]]),
                               torch.tensor([h["loss"] for h in logs[0]["history"]]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_chat_lines_train_on_the_assistant_turns_only(tmp_path, default_model):
    _, tok = default_model
    chat = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris is."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome is."}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n")
    (ids, mask), = examples(tok, path, 512)
    learned = tok.decode(ids[mask])
    assert "Paris is." in learned and "Rome is." in learned and "France" not in learned and "Italy" not in learned
    assert "user" not in learned  # the turns' headers are the template's, not the assistant's


def test_data_errors_are_clear(tmp_path):
    tok = byte_tokenizer()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ModelpressError, match=r'bad.jsonl:1 is not a JSON object with "text"'):
        examples(tok, tmp_path / "bad.jsonl", 64)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ModelpressError, match="fewer than one window of --ctx 64"):
        examples(tok, tmp_path / "short.txt", 64)
    with pytest.raises(ModelpressError, match="nothing to resume"):
        finetune(tiny_llama(), tok, None, LORA, TrainConfig(steps=1), out=tmp_path / "none", resume=True)
    with pytest.raises(ModelpressError, match="LoftQ replaces the base"):
        finetune(tiny_llama(), tok, None, LoraConfig(init="loftq"), TrainConfig(steps=1))
    with pytest.raises(ModelpressError, match="pissa initialises from the float weights.*already quantized"):
        finetune(modelpress.quantize(tiny_llama(), modelpress.NF4Config()), tok, tmp_path / "short.txt",
                 LoraConfig(init="pissa"), TrainConfig(steps=1, ctx=2))
    with pytest.raises(ValueError, match="DoRA goes with the kaiming"):
        LoraConfig(init="pissa", dora=True)


def _random_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("base", ["float", "nf4", "dora"])
def test_merge_into_a_float_model_keeps_the_function(base, tmp_path):
    model = tiny_llama()
    if base == "nf4":
        modelpress.quantize(model, modelpress.NF4Config(double_quant=True))
    add_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear", dora=base == "dora"))
    _random_adapters(model)
    with torch.no_grad():
        ref = model(X).logits
        merged = merge_adapters(model)
        assert not any(hasattr(m, "dequantize") and hasattr(m, "in_features") for m in merged.modules())
        torch.testing.assert_close(merged(X).logits, ref, rtol=0, atol=2e-5 * ref.abs().max().item())
    modelpress.save(merged, byte_tokenizer(), tmp_path / "merged")
    loaded, _ = modelpress.load(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X).logits, merged(X).logits, rtol=0, atol=0)


def test_a_qa_lora_adapter_merges_into_its_int4_base_without_loss(tmp_path):
    """QA-LoRA (PEFT's use_qalora pooling) over the base's groups of 32: the merged checkpoint keeps
    4-bit codes (each group's offset moved) and gives the unmerged model's logits."""
    model = modelpress.quantize(tiny_llama(), modelpress.RTNConfig(bits=4, group_size=32))
    codes = model.model.layers[0].mlp.down_proj.codes().clone()
    add_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear", qa_lora_group=32))
    _random_adapters(model)
    with torch.no_grad():
        ref = model(X).logits
        merged = merge_qa_lora(model)
        layer = merged.model.layers[0].mlp.down_proj
        assert layer.offset is not None and torch.equal(layer.codes(), codes)
        got = merged(X).logits
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
        modelpress.save(merged, byte_tokenizer(), tmp_path / "ck")
        loaded, _ = modelpress.load(tmp_path / "ck")
        assert torch.equal(loaded(X).logits, got)
        # decode-sized inputs take the int4 kernel, which folds the offset into its zeros
        small = loaded(X[:1, :4]).logits
        torch.testing.assert_close(small, ref[:1, :4], rtol=0, atol=0.02 * ref.abs().max().item())
    with pytest.raises(ModelpressError, match="no place in this layout"):
        modelpress.save(merged, byte_tokenizer(), tmp_path / "gptq", format="gptq")


def test_qa_lora_merge_refuses_a_mismatched_group():
    model = modelpress.quantize(tiny_llama(), modelpress.RTNConfig(bits=4, group_size=32))
    add_lora(model, LoraConfig(r=4, targets=("q_proj",), qa_lora_group=16))
    with pytest.raises(ModelpressError, match="group equals its integer base"):
        merge_qa_lora(model)


def test_the_cli_trains_qlora_and_merges(text, tmp_path):
    from modelpress.cli import main

    folder = tmp_path / "m"
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    assert main(["finetune", str(folder), "--data", str(text), "--steps", "4", "--ctx", "48", "--qlora",
                 "--out", str(tmp_path / "ad")]) == 0
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["r"] == 16
    assert main(["merge", str(folder), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "merged")]) == 0
    assert (Path(tmp_path / "merged") / "config.json").is_file()
    assert main(["export", str(folder), "--format", "gguf-lora", "--adapter", str(tmp_path / "ad"), "--out",
                 str(tmp_path / "a.gguf")]) == 0
    assert GGUFReader(tmp_path / "a.gguf").fields["adapter.type"].contents() == "lora"
    assert main(["export", str(folder), "--format", "gguf-lora", "--out", str(tmp_path / "b.gguf")]) == 2
    modelpress.export_gguf(tiny_llama(), byte_tokenizer(), tmp_path / "m.gguf", "Q8_0", progress=False)
    assert main(["finetune", str(tmp_path / "m.gguf"), "--data", str(text), "--steps", "2", "--ctx", "48",
                 "--out", str(tmp_path / "on-gguf")]) == 0  # LoRA on the GGUF file's Q8_0 blocks


@pytest.mark.parametrize("cap", [None, 3.0])
def test_the_head_cross_entropy_and_its_gradient_are_torch_s(cap, monkeypatch):
    """train.loss_sum's fused head + cross-entropy (gradient computed in the forward, in chunks)
    against logits -> (soft-cap) -> F.cross_entropy through autograd, in fp32."""
    monkeypatch.setattr(train_mod, "HEAD_CHUNK", 7)  # several chunks and a ragged last one
    model = tiny_llama()
    model.config.final_logit_softcapping = cap
    ids = torch.randint(0, 261, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.rand(3, 12, generator=torch.Generator().manual_seed(2)) > 0.3
    add_lora(model, LoraConfig(r=4, targets="all-linear"))
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    got = train_mod.loss_sum(model, ids, mask)
    got.backward()
    mine = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model.lm_head(model.model(input_ids=ids).last_hidden_state)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    sel = mask[:, 1:]
    ref = torch.nn.functional.cross_entropy(logits[:, :-1][sel], ids[:, 1:][sel], reduction="sum")
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(mine[n], p.grad, rtol=1e-4, atol=1e-5)  # fp32 sums in another order


def test_adapter_flags_on_compare_and_serve(text, tmp_path):
    """compare --adapter compares the compressions of the model with the adapter merged; serve
    --adapter runs every request with it, --lora NAME=DIR names adapters (bad forms refused)."""
    from modelpress.cli import main
    from modelpress.flags import name_dir_pairs

    folder = tmp_path / "m"
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    model = add_lora(tiny_llama(), LORA)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    save_adapter(model, LORA, tmp_path / "ad")
    assert main(["compare", str(folder), "--adapter", str(tmp_path / "ad"), "--methods", "fp32", "--eval-windows", "2",
                 "--ctx", "64", "--decode-tokens", "2", "--out", str(tmp_path / "cmp")]) == 0
    merged, _ = modelpress.load(tmp_path / "cmp" / "model+adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(X).logits, model(X).logits, rtol=0, atol=1e-5)
    assert name_dir_pairs(["a=x", "b=y"], "--lora") == {"a": "x", "b": "y"}
    with pytest.raises(ModelpressError, match="NAME=DIR"):
        name_dir_pairs(["nodir"], "--lora")
