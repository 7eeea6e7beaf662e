"""The issue-21 table: every model family on tiny random models (tests/model/families.py, with the
default model's vocabulary where llama.cpp reads the file), one row each: a saved folder loaded
(max logit difference to transformers), the GGUF export (architecture; tensors identical to
llama.cpp's converter's where it converts that family with this vocabulary), llama.cpp running our
F32 export (top-1 agreement and max logit difference to transformers), the engine's greedy tokens
against transformers' (batch 1, and batch 8 with preemptions), and GPTQ / AWQ at 3 bits (mean KL
to the model against round-to-nearest's).

    .venv/bin/python benchmarks/families_table.py --out benchmarks/results/families_table.json"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.simplefilter("ignore")

import modelpress  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from modelpress.formats.gguf_names import ARCH  # noqa: E402
from modelpress.model.decoder import FAMILIES  # noqa: E402
from modelpress.serve.engine import Engine  # noqa: E402
from modelpress.serve.sampler import SamplingParams  # noqa: E402
from tests.conftest import byte_tokenizer, hf_greedy_ids  # noqa: E402
from tests.formats.test_gguf_families import CONVERTER, gguf_config  # noqa: E402
from tests.model.families import tiny  # noqa: E402

X = torch.randint(3, 261, (2, 24), generator=torch.Generator().manual_seed(4))
CONVERTS = ("llama", "mistral", "qwen3", "gemma3_text")  # what the converter takes with SmolLM2's vocabulary


def logits(model, x=X):  # noqa: ANN001
    with torch.no_grad():
        return model(x).logits.float()


def kl(ref, got):  # noqa: ANN001
    return torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


def load_row(family: str, work: Path) -> float:
    model = tiny(family)
    model.save_pretrained(work / "hf")
    byte_tokenizer().save_pretrained(work / "hf")
    return (logits(modelpress.load(work / "hf")[0]) - logits(model)).abs().max().item()


def gguf_row(family: str, tok, work: Path) -> dict:  # noqa: ANN001
    if family not in ARCH:
        return {"gguf": "refused by name"}
    import llama_cpp
    from gguf import GGUFReader

    model = tiny(family, config=gguf_config(family, len(tok)))
    ours = work / "ours.gguf"
    modelpress.export_gguf(model, tok, ours, "F32", progress=False)
    row = {"gguf_architecture": ARCH[family]}
    if family in CONVERTS and (CONVERTER / "convert_hf_to_gguf.py").exists():
        model.save_pretrained(work / "conv")
        tok.save_pretrained(work / "conv")
        subprocess.run([sys.executable, str(CONVERTER / "convert_hf_to_gguf.py"), str(work / "conv"), "--outfile",
                        str(work / "theirs.gguf"), "--outtype", "f32"], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(CONVERTER / "gguf-py")})
        a = {t.name: t for t in GGUFReader(ours).tensors}
        b = {t.name: t for t in GGUFReader(work / "theirs.gguf").tensors}
        same = sum(n in a and np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data)) for n in b)
        row["identical_to_converter"] = f"{same}/{len(b)}"
    ids = [1, 504, 3000, 17, 42, 9000, 7, 311, 5]
    llm = llama_cpp.Llama(model_path=str(ours), n_ctx=32, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[:len(ids)])
    ref = logits(model, torch.tensor([ids]))[0]
    row["llama_cpp_top1"] = (theirs.argmax(-1) == ref.argmax(-1)).float().mean().item()
    row["llama_cpp_max_logit_diff"] = (theirs - ref).abs().max().item()
    row["max_abs_logit"] = ref.abs().max().item()
    return row


def engine_row(family: str) -> dict:
    model, tok = tiny(family), byte_tokenizer()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 261, (int(n),), generator=gen).tolist() for n in torch.randint(3, 20, (8,), generator=gen)]
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ref = [hf_greedy_ids(model, torch.tensor([p]), 16) for p in prompts]
    one = Engine(model, tok, max_num_seqs=1, kv_blocks=16, block_size=4).generate(prompts[:1], sp)[0]
    eight = Engine(model, tok, max_num_seqs=8, kv_blocks=24, block_size=4, max_tokens_per_step=32)
    outs = eight.generate(prompts, sp)
    return {"engine_batch1_equal": one.outputs[0].token_ids == ref[0],
            "engine_batch8_equal": sum(o.outputs[0].token_ids == r for o, r in zip(outs, ref)),
            "engine_preemptions": eight.scheduler.preemptions,
            "engine_fused_decode": eight.runner.fused() is not None}


def methods_row(family: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, 261, (128,), generator=gen) for _ in range(8)]
    model = tiny(family)
    ref = logits(model)
    out = {}
    for name, cfg in [("rtn", modelpress.RTNConfig(bits=3, group_size=32)), ("gptq", modelpress.GPTQConfig(bits=3, group_size=32)),
                      ("awq", modelpress.AWQConfig(bits=3, group_size=32))]:
        out[f"kl_{name}_w3"] = kl(ref, logits(modelpress.quantize(copy.deepcopy(model), cfg, calib)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/families_table.json")
    a = p.parse_args()
    _, tok = modelpress.load()
    rows = []
    for family in FAMILIES:
        work = Path(tempfile.mkdtemp(prefix=f"mp-{family}-"))
        row = {"family": family, "load_max_logit_diff": load_row(family, work), **gguf_row(family, tok, work),
               **engine_row(family), **methods_row(family)}
        rows.append(row)
        print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    write_result(a.out, "model families", rows, models="tiny random models, tests/model/families.py")


if __name__ == "__main__":
    main()
