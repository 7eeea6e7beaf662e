#!/usr/bin/env bash
# llm-compressor's AWQ (w4 and w3, group 64, asymmetric) on a lent GPU machine: on 2 CPU cores it
# needs many hours for the default model (its grid search replays each layer 20 times per mapping).
# Same fp32 weights, the same 127 x 512 calibration windows and 99 x 512 evaluation windows as
# benchmarks/gptq_awq.py. Its checkpoints are loaded in modelpress there and evaluated again.
#
# The default model's 98 MB file is over what one call carries, so it travels in two parts
# (split -b 50000000 -d FILE .devdata/gguf.): the first call stashes gguf.00 in /root/stash,
# the second carries gguf.01, the token ids (.devdata/calib.pt, eval.pt) and the wheels (.whl:
# llmcompressor, compressed-tensors, datasets, loguru, pydantic, dill, multiprocess, gguf) and runs
#   bash benchmarks/peers/llmcompressor_gpu.sh
# Results: $OUT/awq*.json (the peer's own row), $OUT/loaded.json (ppl of its checkpoints in modelpress).
set -uo pipefail
export PYTHONPATH=$PWD TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site || exit 1
cat /root/stash/gguf.00 .devdata/gguf.01 > /tmp/model.gguf
(cd /tmp && sha256sum model.gguf) | tee "$OUT/sha.txt"
python3 - <<'EOF' 2>&1 | grep -v "it/s\]" | tee "$OUT/fp32.log"
import json, torch, modelpress
from modelpress.eval.perplexity import perplexity_of_windows
m, tok = modelpress.load("/tmp/model.gguf")
modelpress.save(m, tok, "/tmp/fp32")
ppl = perplexity_of_windows(m.to("cuda"), torch.load(".devdata/eval.pt"), progress=False).ppl
print(json.dumps({"method": "fp32", "tool": "modelpress", "device": "cuda", "ppl": ppl}))
EOF
for bits in 4 3; do
    timeout 420 python3 benchmarks/peers/llmcompressor_run.py --model /tmp/fp32 --calib-ids .devdata/calib.pt \
        --eval-ids .devdata/eval.pt --method awq --bits $bits --group-size 64 --batch-size 16 --device cuda \
        --out /tmp/lc-awq-$bits > "$OUT/awq$bits.json" 2> >(tail -c 4000 > "$OUT/awq$bits.err") &
done
wait
python3 - <<'EOF' 2>&1 | grep -v "it/s\]" | tee "$OUT/loaded.json"
import json, os, torch, modelpress
from modelpress.eval.perplexity import perplexity_of_windows
ev = torch.load(".devdata/eval.pt")
for bits in (4, 3):
    d = f"/tmp/lc-awq-{bits}"
    if os.path.exists(os.path.join(d, "config.json")):
        m, _ = modelpress.load(d)
        print(json.dumps({"bits": bits, "ppl_loaded_in_modelpress": perplexity_of_windows(m.to("cuda"), ev, progress=False).ppl}))
EOF
