"""What modelpress did to a model, as one typed record kept on it: `record(model)`.

    record(model).source        the file or folder it was loaded from (model/load.py)
    record(model).config        the method config that compressed it (registry.quantize, loaders)
    record(model).plan          the per-tensor GGUF types `auto` chose (methods/auto.py)
    record(model).calibration   what block-by-block calibration measured (model/sequential.py)
    record(model).adapter       the LoraConfig of the adapters on it (finetune/lora.py add_lora)
    record(model).head          a tied output head kept in GGUF blocks, for the decode kernels
                                (model/gguf_model.py); not a submodule, so not in the state dict

A leaf module: it imports nothing of modelpress but errors.py (another leaf)."""
from __future__ import annotations

import dataclasses
from typing import Any

from .errors import ModelpressError

ATTRIBUTE = "modelpress"  # where the record sits on the model


@dataclasses.dataclass
class Record:
    source: str | None = None
    config: Any = None
    plan: Any = None
    calibration: Any = None
    recovery: Any = None        # a pruned model's distillation history (methods/prune.py)
    dropped: Any = None         # structured pruning's dropped blocks and every block's influence
    head: Any = None
    adapter: Any = None


def record(model: Any) -> Record:
    """The model's record, made empty on first use (kept in the module's __dict__, outside its
    submodules, parameters and buffers)."""
    r = model.__dict__.get(ATTRIBUTE)
    if r is None:
        r = Record()
        object.__setattr__(model, ATTRIBUTE, r)
    return r


def check_no_adapter(model: Any, what: str) -> None:
    """Refuse to write or compress a model that carries LoRA adapters (finetune/): its files would
    hold the adapters' wrapped layers where the format expects the base's."""
    if model.__dict__.get(ATTRIBUTE) is not None and record(model).adapter is not None:
        raise ModelpressError(f"{what}: this model carries LoRA adapters; merge them first (modelpress merge, "
                              "modelpress.finetune.merge.merge_adapters) or save the adapter alone (save_adapter)")
