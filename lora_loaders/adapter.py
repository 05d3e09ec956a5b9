"""The canonical in-memory LoRA: what every format converter produces.

A `LoraAdapter` maps targets `(component, module_path)` to `LoraLayer`s. A layer holds
only what is needed to compute its weight delta; nothing here knows file formats.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

KINDS = ("lora", "loha", "lokr", "full", "ia3", "replace")

# Tensors each kind needs (alternatives separated by "|").
_REQUIRED = {
    "lora": ("down", "up"),
    "loha": ("w1a", "w1b", "w2a", "w2b"),
    "lokr": ("w1|w1a", "w2|w2a"),
    "full": (),  # "diff" (weight delta) and/or a bias delta
    "ia3": ("weight",),  # per-channel scale of the weight (LyCORIS IA3)
    "replace": ("weight",),  # a value that replaces the weight (BFL Control's norm scales)
}


@dataclass
class LoraLayer:
    """One adapted module: factors of its weight delta, plus optional bias delta and DoRA."""

    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    bias: torch.Tensor | None = None  # bias delta, scaled like the weight delta
    magnitude: torch.Tensor | None = None  # PEFT DoRA magnitude (one per output)
    dora_scale: torch.Tensor | None = None  # LyCORIS DoRA scale (per output or per input)
    on_input: bool | None = None  # IA3: the scale is per input channel (else per output channel)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown LoRA layer kind {self.kind!r}")
        for need in _REQUIRED[self.kind]:
            if not any(n in self.tensors for n in need.split("|")):
                raise ValueError(f"{self.kind} layer is missing tensor {need!r}")
        if self.kind == "full" and "diff" not in self.tensors and self.bias is None:
            raise ValueError("full layer has neither a weight delta (diff) nor a bias delta (diff_b)")
        if self.kind == "lokr":
            if "w1" not in self.tensors and "w1b" not in self.tensors:
                raise ValueError("lokr layer has lokr_w1_a but no lokr_w1_b")
            if "w2" not in self.tensors and "w2b" not in self.tensors:
                raise ValueError("lokr layer has lokr_w2_a but no lokr_w2_b")

    def __repr__(self):  # the tensors' shapes, never their values
        shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
        return f"LoraLayer({self.kind}, {shapes}, alpha={self.alpha})"

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["w1b"].shape[0]
        if self.kind == "lokr":
            for k in ("w1b", "w2b"):
                if k in t:
                    return t[k].shape[0]
        return None

    @property
    def scale(self) -> float:
        """alpha / rank; 1 where the format has no alpha or no rank."""
        rank = self.rank
        if self.alpha is None or rank is None:
            return 1.0
        return float(self.alpha) / rank

    @property
    def is_additive(self) -> bool:
        """True when the effective weight is base + a delta that does not depend on base."""
        return self.magnitude is None and self.dora_scale is None and self.kind not in ("ia3", "replace")

    def delta_shape(self) -> tuple[int, ...]:
        """Shape of the delta this layer produces (2-D except for full deltas, IA3 and replacements)."""
        if self.kind == "full":
            return tuple(self.tensors["diff"].shape) if "diff" in self.tensors else ()
        if self.kind in ("ia3", "replace"):
            return tuple(self.tensors["weight"].shape)
        return _delta_2d_shape(self)

    def fits(self, weight_shape) -> bool:
        """Whether the delta can be added to a weight of this shape."""
        weight_shape = tuple(weight_shape)
        if not weight_shape:
            return False
        if self.bias is not None and self.bias.numel() != weight_shape[0]:
            return False
        if self.kind == "full":
            return "diff" not in self.tensors or _same_numel_rows(self.tensors["diff"].shape, weight_shape)
        if self.kind == "replace":
            return self.tensors["weight"].numel() == torch.Size(weight_shape).numel()
        if self.kind == "ia3":
            if len(weight_shape) < 2:
                return False
            return self.tensors["weight"].numel() == weight_shape[1 if self.on_input else 0]
        if len(weight_shape) < 2:
            return False  # low-rank factors need a matrix (or a conv kernel)
        out, rest = _delta_2d_shape(self)
        if out != weight_shape[0] or rest != torch.Size(weight_shape[1:]).numel():
            return False
        down = self.tensors.get("down")
        # A LoRA down projection with a kernel must use the conv's kernel.
        return down is None or down.dim() <= 2 or tuple(down.shape[2:]) == weight_shape[2:]

    def delta(self, weight_shape: torch.Size) -> torch.Tensor:
        """The unscaled-by-user delta (alpha/rank included), float32, in the weight's shape."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "lora":
            # A conv LoRA is a kxk down then a 1x1 up: their product is (out, in*k*k).
            d = t["up"].flatten(1) @ t["down"].flatten(1)
        elif self.kind == "loha":
            d = _rebuild(t, "w1a", "w1b", "t1", weight_shape) * _rebuild(t, "w2a", "w2b", "t2", weight_shape)
        elif self.kind == "lokr":
            w1 = t["w1"] if "w1" in t else t["w1a"] @ t["w1b"]
            if "w2" in t:
                w2 = t["w2"]
            elif "t2" in t:
                w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["t2"], t["w2a"], t["w2b"])
            else:
                w2 = t["w2a"] @ t["w2b"]
            if w2.dim() == 4:
                w1 = w1.reshape(*w1.shape, 1, 1)
            d = torch.kron(w1, w2)
        elif self.kind == "full" and "diff" in t:
            d = t["diff"]
        elif self.kind in ("ia3", "replace"):
            raise ValueError(f"a {self.kind} layer has no base-independent delta")
        else:
            return torch.zeros(weight_shape)
        return (d * self.scale).reshape(weight_shape)

    def bias_delta(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.float() * self.scale


def _same_numel_rows(shape, weight_shape) -> bool:
    """A full delta fits when it has the weight's shape, or its rows and elements (a conv stored flat)."""
    shape = tuple(shape)
    return shape == weight_shape or (len(shape) >= 1 and shape[0] == weight_shape[0]
                                     and torch.Size(shape).numel() == torch.Size(weight_shape).numel())


def _rebuild(t, a, b, tucker, weight_shape):
    if tucker in t:
        return torch.einsum("i j k l, j r, i p -> p r k l", t[tucker], t[b], t[a])
    return (t[a] @ t[b]).reshape(weight_shape[0], -1)


def _delta_2d_shape(layer: LoraLayer) -> tuple[int, int]:
    t = layer.tensors
    if layer.kind == "lora":
        return t["up"].shape[0], t["down"].flatten(1).shape[1]
    if layer.kind == "loha":
        if "t1" in t:  # Tucker: w1a (rank, out), w1b (rank, in), t1 (rank, rank, k, k)
            return t["w1a"].shape[1], t["w1b"].shape[1] * t["t1"].shape[2] * t["t1"].shape[3]
        return t["w1a"].shape[0], t["w1b"].shape[1]
    if layer.kind == "lokr":
        w1 = t["w1"].shape if "w1" in t else (t["w1a"].shape[0], t["w1b"].shape[1])
        if "w2" in t:
            w2 = tuple(t["w2"].shape)
        elif "t2" in t:
            w2 = (t["w2a"].shape[1], t["w2b"].shape[1], *t["t2"].shape[2:])
        else:
            w2 = (t["w2a"].shape[0], t["w2b"].shape[1])
        rest = w1[1] * w2[1]
        for s in w2[2:]:
            rest *= s
        return w1[0] * w2[0], rest
    d = t["diff"]
    return d.shape[0], d[0].numel() if d.dim() > 1 else 1


def adapter_name_list(adapter_names, present) -> list[str]:
    """`adapter_names` (a name or a list) as a list, raising as diffusers does if one is not present."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"Adapter name(s) {missing} not in the list of present adapters: {sorted(present)}")
    return names


def unique_name(name: str, taken) -> str:
    """`name`, or `name_2`, `name_3`, ... : the first not in `taken` (how export and refit name the
    adapters of one command line, e.g. the same file given twice)."""
    out, i = name, 1
    while out in taken:
        i += 1
        out = f"{name}_{i}"
    return out


@dataclass
class LoraAdapter:
    """A LoRA in canonical form: targets (component, module path) -> LoraLayer."""

    layers: dict[tuple[str, str], LoraLayer]
    family: str | None = None
    format: str = "unknown"
    source: str | None = None
    metadata: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict, repr=False, compare=False)  # target -> the file's module key

    def __repr__(self):
        return (f"LoraAdapter({len(self.layers)} layers for {self.components}, family={self.family!r}, "
                f"format={self.format!r}, source={self.source!r})")

    @property
    def components(self) -> list[str]:
        return sorted({c for c, _ in self.layers})

    def for_component(self, component: str) -> dict[str, LoraLayer]:
        return {m: layer for (c, m), layer in self.layers.items() if c == component}

    def fingerprint(self) -> str:
        """A content hash of the canonical tensors (stable across file formats)."""
        h = hashlib.sha256()
        for key in sorted(self.layers):
            layer = self.layers[key]
            h.update(repr((key, layer.kind, layer.alpha)).encode())
            for name in sorted(layer.tensors):
                h.update(name.encode())
                h.update(layer.tensors[name].detach().float().contiguous().numpy().tobytes())
            for t in (layer.bias, layer.magnitude, layer.dora_scale):
                if t is not None:
                    h.update(t.detach().float().contiguous().numpy().tobytes())
            h.update(repr(layer.on_input).encode())
        return h.hexdigest()

    def with_layers(self, layers: dict[tuple[str, str], LoraLayer]) -> LoraAdapter:
        return LoraAdapter(layers, self.family, self.format, self.source, self.metadata,
                           {k: v for k, v in self.origin.items() if k in layers})
