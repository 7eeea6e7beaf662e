"""The issue-21 table: every model family on tiny random models (tests/model/families.py, with the
default model's vocabulary where llama.cpp runs the file), one row each: a saved folder loaded
(max logit difference to transformers), the GGUF export (architecture; tensors identical in type
and bytes to llama.cpp's converter's, F32 and Q8_0, and to llama-quantize's for every quantized mix,
on a trained SentencePiece vocabulary the converter takes for every family), llama.cpp running our
F32 export (top-1 agreement and max logit difference to transformers), the engine's greedy tokens
against transformers' (batch 1, and batch 8 with preemptions), and GPTQ / AWQ at 3 bits (mean KL
to the model against round-to-nearest's).

    .venv/bin/python benchmarks/families_table.py --out benchmarks/results/families_table.json"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import llama_cpp
import numpy as np
import torch
from gguf import GGUFReader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.simplefilter("ignore")

import modelpress  # noqa: E402
from benchmarks.common import scratch, write_result  # noqa: E402
from modelpress.model.decoder import FAMILIES  # noqa: E402
from modelpress.serve.engine import Engine  # noqa: E402
from modelpress.serve.sampler import SamplingParams  # noqa: E402
from tests.conftest import byte_tokenizer, hf_greedy_ids  # noqa: E402
from tests.formats.test_gguf_families import CONVERTER, QUANTIZED_MIXES, gguf_config  # noqa: E402
from tests.model.families import spm_vocabulary, tiny  # noqa: E402

X = torch.randint(3, 261, (2, 24), generator=torch.Generator().manual_seed(4))


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


def _same_tensors(ours: Path, theirs: Path) -> tuple[int, int]:
    """(tensors of `theirs` that `ours` holds by name with the same type and bytes, tensors in either)."""
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    same = sum(n in a and a[n].tensor_type == t.tensor_type and np.array_equal(np.asarray(a[n].data), np.asarray(t.data))
               for n, t in b.items())
    return same, len(set(a) | set(b))


def converter_row(family: str, spm_folder: Path, spm_tok, work: Path) -> dict:  # noqa: ANN001
    """Our export against llama.cpp's converter (F32, Q8_0) and against llama-quantize run on our F32
    file (every quantized mix), on the trained SentencePiece vocabulary that the converter takes for
    every family."""
    if not (CONVERTER / "convert_hf_to_gguf.py").exists():
        return {}
    cfg = gguf_config(family, len(spm_tok))
    cfg.hidden_size, cfg.intermediate_size = 256, 512  # rows of whole K blocks for the K mixes
    model = tiny(family, config=cfg)
    folder = work / "conv"
    model.save_pretrained(folder)
    spm_tok.save_pretrained(folder)
    shutil.copy(spm_folder / "tokenizer.model", folder)
    row = {}
    for mix in ("F32", "Q8_0"):
        subprocess.run([sys.executable, str(CONVERTER / "convert_hf_to_gguf.py"), str(folder), "--outfile",
                        str(work / "theirs.gguf"), "--outtype", mix.lower()], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(CONVERTER / "gguf-py")})
        modelpress.export_gguf(model, spm_tok, work / "ours.gguf", mix, progress=False)
        row[f"identical_to_converter_{mix}"] = "{}/{}".format(*_same_tensors(work / "ours.gguf", work / "theirs.gguf"))
    f32 = work / "ours-f32.gguf"
    modelpress.export_gguf(model, spm_tok, f32, "F32", progress=False)
    identical = 0
    for mix in QUANTIZED_MIXES:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(work / "theirs.gguf").encode(), params) == 0
        modelpress.export_gguf(model, spm_tok, work / "ours.gguf", mix, progress=False)
        same, total = _same_tensors(work / "ours.gguf", work / "theirs.gguf")
        identical += same == total
    row["mixes_identical_to_llama_quantize"] = f"{identical}/{len(QUANTIZED_MIXES)}"
    return row


def gguf_row(family: str, tok, work: Path) -> dict:  # noqa: ANN001
    """llama.cpp (llama-cpp-python) running our F32 export with the default model's vocabulary."""
    model = tiny(family, config=gguf_config(family, len(tok)))
    ours = work / "ours.gguf"
    modelpress.export_gguf(model, tok, ours, "F32", progress=False)
    row = {"gguf_architecture": GGUFReader(ours).fields["general.architecture"].contents()}
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
    spm_folder = scratch("mp-spm-")
    spm_tok = spm_vocabulary(spm_folder)
    rows = []
    for family in FAMILIES:
        work = scratch(f"mp-{family}-")
        row = {"family": family, "load_max_logit_diff": load_row(family, work), **gguf_row(family, tok, work),
               **converter_row(family, spm_folder, spm_tok, work), **engine_row(family), **methods_row(family)}
        rows.append(row)
        print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    write_result(a.out, "model families", rows, models="tiny random models, tests/model/families.py")


if __name__ == "__main__":
    main()
