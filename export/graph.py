"""A component's graph, generically, from its registry entry: the wrapper the exporter traces,
example inputs at the family's axis sizes, and the dynamic axes.

Graph input i is `ComponentSpec.inputs[i]`, passed to the model's forward as its `arg`
("a.b" for a nested dict entry); outputs are taken from the forward's result by `source`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lora_loaders.dtypes import torch_dtype
from lora_loaders.families import Cfg, ComponentSpec, FamilySpec, Scaled, TensorSpec
from lora_loaders.families.spec import select_output



class Wrapper(nn.Module):
    """Positional graph inputs -> the component's forward; holds the component as `.model`
    (its initializers are renamed back without the prefix)."""

    prefix = "model."

    def __init__(self, model: nn.Module, spec: ComponentSpec):
        super().__init__()
        self.model = model
        self._inputs = spec.inputs_for(model.config)
        self._sources = [o.source or o.name for o in spec.outputs_for(model.config)]
        self._call_kwargs = dict(spec.call_kwargs)
        self._prepare = spec.prepare
        self._method = spec.method
        self._graph_forward = spec.graph_forward

    def __new__(cls, model: nn.Module, spec: ComponentSpec):
        # The exporter reads the forward's signature: give each graph input a named parameter.
        names = [t.name for t in spec.inputs_for(model.config)]
        sig = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                 for n in ("self", *names)])

        def forward(self, *tensors):
            return self._call(tensors)

        forward.__signature__ = sig
        sub = type(f"{spec.class_name}Graph", (cls,), {"forward": forward})
        return super().__new__(sub)

    def _call(self, tensors):
        # Inputs that share an axis share its size: said to the exporter, which would otherwise give
        # each its own symbol and fail on a model that views one by the other's size (Sana's
        # `encoder_hidden_states.view(batch_size, -1, dim)`, its batch from `hidden_states`).
        first: dict[str, int] = {}
        for t, value in zip(self._inputs, tensors):
            for i, d in enumerate(t.dims):
                if isinstance(d, str):
                    size = first.setdefault(d, value.shape[i])
                    if size is not value.shape[i]:
                        torch._check(value.shape[i] == size)
        kwargs: dict = dict(self._call_kwargs)
        for t, value in zip(self._inputs, tensors):
            arg = (t.arg or t.name).split(".")
            target = kwargs
            for part in arg[:-1]:
                target = target.setdefault(part, {})
            target[arg[-1]] = value
        if self._prepare is not None:
            kwargs = self._prepare(self.model, kwargs)
        if self._graph_forward is not None:
            result = self._graph_forward(self.model, kwargs)
        else:
            result = self.model(**kwargs) if self._method == "forward" else getattr(self.model, self._method)(**kwargs)
        outs = tuple(select_output(result, s) for s in self._sources)
        return outs if len(outs) > 1 else outs[0]


@dataclass
class SampleContext:
    config: object
    sizes: dict[str, int]
    dtype: torch.dtype


def axis_sizes(family: FamilySpec, role: str) -> dict[str, int]:
    return {name: getattr(axis, role) for name, axis in family.axes.items()}


def shape_of(t: TensorSpec, config, sizes: Mapping[str, int]) -> tuple[int, ...]:
    dims = []
    for d in t.dims:
        if isinstance(d, str):
            if d not in sizes:
                raise ValueError(f"input {t.name!r} uses axis {d!r}, which the family does not declare")
            dims.append(int(sizes[d]))
        elif isinstance(d, Cfg):
            dims.append(d(config))
        elif isinstance(d, Scaled):
            dims.append(int(sizes[d.axis]) * d.factor)
        else:
            dims.append(int(d))
    return tuple(dims)


def example_inputs(family: FamilySpec, spec: ComponentSpec, model: nn.Module, dtype: torch.dtype,
                   role: str = "example", seed: int = 0, **sizes: int) -> dict[str, torch.Tensor]:
    """Seeded inputs for every graph input, at the family's `example` or `check` axis sizes
    (keyword arguments override axes: `batch=3, height=24`)."""
    sizes = {**axis_sizes(family, role), **sizes}
    ctx = SampleContext(model.config, sizes, dtype)
    out = {}
    for i, t in enumerate(spec.inputs_for(model.config)):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        shape = shape_of(t, model.config, sizes)
        tdtype = dtype if t.dtype == "model" else torch_dtype(t.dtype)
        if t.sample is not None:
            value = t.sample(shape, g, ctx)
        elif tdtype.is_floating_point:
            value = torch.randn(shape, generator=g)
        else:
            value = torch.zeros(shape, dtype=tdtype)
        out[t.name] = value.to(tdtype)
    return out


def dynamic_axes(spec: ComponentSpec, config, axes: Mapping | None = None) -> dict[str, dict[int, str]]:
    """{input or output name: {dim index: axis name ("height*2" for a `Scaled` one)}}; an axis of
    `axes` whose range is one size (fixed by a config's table of positions) stays static in the graph."""
    static = {n for n, a in (axes or {}).items() if a.min == a.max == a.example}
    out = {}
    for t in (*spec.inputs_for(config), *spec.outputs_for(config)):
        axes = {i: str(d) for i, d in enumerate(t.dims)
                if isinstance(d, (str, Scaled)) and getattr(d, "axis", d) not in static}
        if axes:
            out[t.name] = axes
    return out


def run_torch(spec: ComponentSpec, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> list:
    """The wrapped component's outputs on these inputs, as float32 numpy arrays."""
    wrapper = Wrapper(model, spec).eval()
    with torch.no_grad():
        out = wrapper(*[inputs[t.name] for t in spec.inputs_for(model.config)])
    out = out if isinstance(out, tuple) else (out,)
    return [o.detach().float().numpy() for o in out]
