"""llm-compressor's GPTQ or AWQ (or its SparseGPT / Wanda pruning: --sparsity, --mask-structure) on a
transformers folder, timed, its own ppl measured, and the compressed-tensors (pruned: dense) checkpoint
saved. Runs in llm-compressor's own virtual environment (it pins
transformers <= 5.17; see ../shared/PEERS.md):

    peer/bin/python benchmarks/peers/llmcompressor_run.py --model DIR --calib-ids calib.pt \
        --eval-ids eval.pt --method gptq --bits 4 --group-size 64 --out OUT

calib.pt / eval.pt hold (N, 512) int64 token ids (the same windows modelpress uses). Prints one
JSON line: quantize_seconds, ppl (the protocol of modelpress.eval.perplexity), settings.
"""
import argparse
import json
import math
import os
import sys
import time

import torch


def perplexity(model, ids: torch.Tensor, batch: int = 8) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            x = ids[i:i + batch].to(model.device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                     reduction="sum").item()
            n += x[:, 1:].numel()
    return math.exp(nll / n)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--calib-ids", required=True)
    p.add_argument("--eval-ids", required=True)
    p.add_argument("--method", choices=("gptq", "awq", "sparsegpt", "wanda"), required=True)
    p.add_argument("--sparsity", type=float, default=0.5, help="sparsegpt / wanda")
    p.add_argument("--mask-structure", default="0:0", help="sparsegpt / wanda: 0:0 (unstructured) or N:M, e.g. 2:4")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--batch-size", type=int, default=1,
                   help="calibration windows per forward (all are 512 tokens: no padding, the same sums)")
    p.add_argument("--device", default="cpu", help="cuda: llm-compressor onloads each layer to the GPU")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    calib = torch.load(a.calib_ids)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=a.bits, type="int", symmetric=a.symmetric, strategy="group", group_size=a.group_size))
    if a.method in ("sparsegpt", "wanda"):  # the decoder blocks' linears, as modelpress prunes them
        from llmcompressor.modifiers.pruning import (
            SparseGPTModifier,
            WandaPruningModifier,
        )

        cls = SparseGPTModifier if a.method == "sparsegpt" else WandaPruningModifier
        recipe = cls(sparsity=a.sparsity, mask_structure=a.mask_structure, targets=["Linear"], ignore=["re:.*lm_head"])
    elif a.method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    else:
        from llmcompressor.modifiers.awq import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        if a.device == "cpu":
            IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # it pins memory even on a CPU
        recipe = AWQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0], batch_size=a.batch_size)
    seconds = time.perf_counter() - start
    try:  # before saving: saving compresses the model in place
        if a.device != "cpu":
            from llmcompressor.utils.dev import dispatch_for_generation

            model = dispatch_for_generation(model)
        ppl = perplexity(model, torch.load(a.eval_ids))
    except Exception as e:  # the checkpoint is still worth keeping: modelpress evaluates it again
        print(f"evaluation failed: {e!r}", file=sys.stderr)
        ppl = None
    model.save_pretrained(a.out, save_compressed=a.method in ("gptq", "awq"))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(a.model).save_pretrained(a.out)
    import llmcompressor

    print(json.dumps({"tool": f"llm-compressor {llmcompressor.__version__}", "method": a.method, "bits": a.bits,
                      "group_size": a.group_size, "symmetric": a.symmetric,
                      **({"sparsity": a.sparsity, "mask_structure": a.mask_structure} if a.method in ("sparsegpt", "wanda")
                         else {}), "batch_size": a.batch_size, "device": a.device, "quantize_seconds": seconds,
                      "ppl": ppl, "calib_windows": calib.shape[0], "eval_windows": int(torch.load(a.eval_ids).shape[0]),
                      "out": a.out}), flush=True)


if __name__ == "__main__":
    main()
