"""LoRA adapters on any linear layer modelpress holds, whatever its storage (fp32 / bf16, NF4 / FP4
with double quant = QLoRA, LLM.int8, RTN / GPTQ / AWQ integers, GGUF blocks): the base stays frozen
in its own format (its backward is nn/frozen.py's), only the adapters train.

Definitions are PEFT's (peft/tuners/lora/layer.py, variants.py, dora.py), so that adapters go both
ways (finetune/adapters.py):
    y = base(x) + scaling * B(A(dropout(x)))            scaling = alpha / r   (rsLoRA: alpha / sqrt(r))
    A (r, in) Kaiming-uniform (a = sqrt(5)) or N(0, 1/r) ("gaussian"); B (out, r) zero
    DoRA:  y = base(x) + (m / |W + s BA|_row - 1) * (base(x) - bias) + m / |W + s BA|_row * s B(A(x)),
           the norm detached (DoRA, arXiv:2402.09353, section 4.3), m initialised to |W|_row
    QA-LoRA (PEFT's use_qalora): A reads the input averaged over each run of `group` columns, times
           in / group; its update is then constant within each quantization group, which a merge
           turns exactly into a change of the group's offsets (merge.py)
    PiSSA: A, B from the top r singular triplets of W (divided by scaling), W replaced by the residual
    LoftQ: alternately quantize W - s BA with the base's method and fit s BA to W - Q by SVD
           (arXiv:2310.08659; PEFT's own runs only on a GPU)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..errors import ModelpressError
from ..model.walker import dense_weight, replace
from ..record import record

INITS = ("kaiming", "gaussian", "pissa", "loftq")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What adapters to add: rank `r`, `alpha`, `dropout` on the adapter's input, `targets` (module
    names such as "q_proj", matched as PEFT matches target_modules, or "all-linear": every linear
    layer but the output head), `rslora`, `dora`, `init`, and `qa_lora_group` (QA-LoRA pooling over
    that many input columns: the quantization group of an int base)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ("q_proj", "v_proj")
    rslora: bool = False
    dora: bool = False
    init: str = "kaiming"
    loftq_iter: int = 1
    qa_lora_group: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if not (isinstance(self.r, int) and self.r > 0):
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            raise ValueError(f"targets is a list of module names or 'all-linear', got {self.targets!r}")
        if not self.targets:
            raise ValueError("targets is empty: name the layers to adapt (e.g. q_proj v_proj) or 'all-linear'")
        if self.loftq_iter < 1:
            raise ValueError(f"loftq_iter must be at least 1, got {self.loftq_iter}")
        if self.qa_lora_group is not None and (self.dora or self.init in ("pissa", "loftq")):
            raise ValueError("QA-LoRA (qa_lora_group) goes with the plain kaiming / gaussian init, without DoRA")
        if self.dora and self.init in ("pissa", "loftq"):
            raise ValueError(f"DoRA goes with the kaiming / gaussian init, not {self.init} (its magnitudes would be "
                             "those of the changed base)")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def targeted(self, fqn: str) -> bool:
        """PEFT's rule: a target is the module's full name or its last dotted parts."""
        if self.targets == "all-linear":
            return fqn.rpartition(".")[2] != "lm_head"
        return any(fqn == t or fqn.endswith("." + t) for t in self.targets)


def linear_like(mod: torch.nn.Module) -> bool:
    """A linear layer of any storage: nn.Linear or a quantized layer (nn/) that dequantizes."""
    return isinstance(mod, torch.nn.Linear) or hasattr(mod, "dequantize") and hasattr(mod, "in_features")


def qa_lora_expand(a: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    """QA-LoRA's A (r, in / group), read on pooled input (group mean x in / group), as the (r, in)
    matrix giving the same product on the full input."""
    return a.float().repeat_interleave(group, dim=1) * (in_features // group) / group


class LoraLinear(torch.nn.Module):
    """A frozen `base_layer` plus one trainable low-rank update (the names are PEFT's, so a state dict
    key reads `...q_proj.lora_A.weight` as in PEFT's files)."""

    def __init__(self, base_layer: torch.nn.Module, config: LoraConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.scaling, self.group = config.r, config.scaling, config.qa_lora_group
        if self.group is not None and self.in_features % self.group:
            raise ModelpressError(f"QA-LoRA pools groups of {self.group} input columns; this layer has "
                                  f"{self.in_features}")
        a_in = self.in_features // self.group if self.group else self.in_features
        self.lora_A = torch.nn.Linear(a_in, config.r, bias=False)
        self.lora_B = torch.nn.Linear(config.r, self.out_features, bias=False)
        self.lora_dropout = torch.nn.Dropout(config.dropout) if config.dropout else torch.nn.Identity()
        self.lora_magnitude_vector = None
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.reset(config)

    @torch.no_grad()
    def reset(self, config: LoraConfig) -> None:
        """PEFT's kaiming / gaussian init (A random, B zero); PiSSA and LoftQ are set by `add_lora`."""
        if config.init == "gaussian":
            torch.nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_B.weight)
        if config.dora:
            self.lora_magnitude_vector = torch.nn.Parameter(dense_weight(self.base_layer).norm(dim=1))

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A as an (out, in) matrix (QA-LoRA's expanded over each group's columns)."""
        a = self.lora_A.weight.float()
        if self.group:
            a = qa_lora_expand(a, self.group, self.in_features)
        return self.scaling * (self.lora_B.weight.float() @ a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        dropped = isinstance(self.lora_dropout, torch.nn.Dropout) and self.training
        xa = self.lora_dropout(x) if dropped else x
        a = xa.to(self.lora_A.weight.dtype)
        if self.group:  # PEFT's QA-LoRA: the group mean times the number of groups
            a = a.reshape(*a.shape[:-1], -1, self.group).mean(-1) * (self.in_features // self.group)
        update = self.lora_B(self.lora_A(a)) * self.scaling
        if self.lora_magnitude_vector is None:
            return y + update.to(y.dtype)
        base_w = dense_weight(self.base_layer)
        norm = (base_w + self.delta_weight().detach()).norm(dim=1).detach()
        scale = (self.lora_magnitude_vector / norm).to(y.dtype)
        if dropped:  # PEFT: the base product of the dropped input
            plain = torch.nn.functional.linear(xa, base_w.to(xa.dtype)).to(y.dtype)
        else:
            bias = getattr(self.base_layer, "bias", None)
            plain = y if bias is None else y - bias.to(y.dtype)
        return y + (scale - 1) * plain + scale * update.to(y.dtype)


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLinear]:
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, LoraLinear)}


def add_lora(model: torch.nn.Module, config: LoraConfig, base_config: Any = None) -> torch.nn.Module:
    """Wrap every targeted linear layer of `model` in a LoraLinear (in place) and freeze everything
    else. `base_config`: the quantization method LoftQ quantizes the base with (LoftQ only)."""
    if lora_layers(model):
        raise ModelpressError("this model already has LoRA adapters; merge them first (modelpress merge)")
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(fqn, m) for fqn, m in model.named_modules() if linear_like(m) and config.targeted(fqn)]
    if not found:
        names = sorted({fqn.rpartition(".")[2] for fqn, m in model.named_modules() if linear_like(m)})
        raise ModelpressError(f"no linear layer matches the targets {list(config.targets)}; this model's are "
                              f"{', '.join(names)} (or 'all-linear')")
    if config.init in ("pissa", "loftq"):
        _check_float_bases(found, config.init)
    for fqn, mod in found:
        layer = LoraLinear(mod, config)
        if config.init == "pissa":
            _pissa(layer)
        elif config.init == "loftq":
            layer = _loftq(layer, config, base_config)
        replace(model, fqn, layer)
    record(model).adapter = config
    return model


@torch.no_grad()
def pissa_to_lora(config: LoraConfig, trained: dict[str, torch.Tensor],
                  initial: dict[str, torch.Tensor]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PiSSA adapter as a plain LoRA on the original base (PEFT's conversion on save): PiSSA trains
    on W - s B0 A0, so the trained model is W + s (B A - B0 A0) = W + s [B, -B0] [A; A0], a rank-2r
    adapter with the same scaling. `trained` / `initial`: the adapter tensors under PEFT's keys."""
    r2 = 2 * config.r
    alpha = config.scaling * (math.sqrt(r2) if config.rslora else r2)
    out = {}
    for key, a in trained.items():
        if key.endswith(".lora_A.weight"):
            out[key] = torch.cat([a, initial[key]], 0).contiguous()
        elif key.endswith(".lora_B.weight"):
            out[key] = torch.cat([a, -initial[key]], 1).contiguous()
        else:
            raise ModelpressError(f"{key}: a PiSSA adapter holds only lora_A / lora_B")
    return dataclasses.replace(config, r=r2, alpha=alpha, init="kaiming"), out


def _check_float_bases(found: list, init: str) -> None:
    quantized = [fqn for fqn, m in found if not isinstance(m, torch.nn.Linear)]
    if quantized:
        raise ModelpressError(f"{init} initialises from the float weights, but {quantized[0]} is already quantized: "
                              "start from the float model (LoftQ quantizes the base itself with --qlora's NF4)")


@torch.no_grad()
def _pissa(layer: LoraLinear) -> None:
    w = layer.base_layer.weight
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    sr = s[:layer.r] / layer.scaling
    layer.lora_A.weight.copy_(torch.diag(sr.sqrt()) @ vh[:layer.r])
    layer.lora_B.weight.copy_(u[:, :layer.r] @ torch.diag(sr.sqrt()))
    w.copy_((w.float() - layer.delta_weight()).to(w.dtype))


@torch.no_grad()
def _loftq(layer: LoraLinear, config: LoraConfig, base_config: Any) -> LoraLinear:
    """LoftQ: Q = quant(W - s BA); s BA = rank-r SVD of W - Q; `loftq_iter` times. The base becomes Q."""
    from ..registry import handler_for

    if base_config is None:
        raise ModelpressError("LoftQ quantizes the base itself: give the method (e.g. NF4Config(double_quant=True))")
    base = layer.base_layer
    w = base.weight.detach().float()
    everything = dataclasses.replace(base_config, targets=(r".*",), ignore=())
    residual = w
    for _ in range(config.loftq_iter):
        holder = torch.nn.Sequential(torch.nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None))
        holder[0].weight.data = residual.clone()
        if base.bias is not None:
            holder[0].bias.data = base.bias.detach().float().clone()
        handler_for(base_config)(holder, everything, None)
        u, s, vh = torch.linalg.svd(w - dense_weight(holder[0]), full_matrices=False)
        sr = s[:layer.r].sqrt()
        layer.lora_A.weight.copy_(torch.diag(sr) @ vh[:layer.r])
        layer.lora_B.weight.copy_(u[:, :layer.r] @ torch.diag(sr) / layer.scaling)
        residual = w - layer.delta_weight()
    layer.base_layer = holder[0]
    return layer
