"""`load_pipeline`: the family's diffusers pipeline, its models replaced by the exported engines.

    pipe = engines.load_pipeline("out/sdxl")                  # ONNX Runtime, TensorRT or torch engines
    pipe.load_lora_weights("y.safetensors", adapter_name="y")  # refits the engines it targets
    pipe.set_adapters(["y"], [0.8])
    image = pipe("a red cube", num_inference_steps=30, generator=torch.Generator().manual_seed(0)).images[0]

    pipe = engines.load_pipeline("out/sdxl", task="inpainting")  # or engines.for_task(pipe, "inpainting")

`task` takes Hugging Face's task names (the registry's `FamilySpec.tasks`: image-to-image,
inpainting, image-to-video beside the default text-to-image / text-to-video); an export of a
model that is another pipeline's (Flux Fill, Kontext, Wan I2V) gets the pipeline its
model_index.json names. The pipeline is diffusers' own (its scheduler, tokenizers, guidance logic, image
processing); each model it calls is an `EngineModel`: a module without parameters that
maps the call's arguments onto the exported graph's inputs (the registry's TensorSpec
`arg`s), runs the engine, and returns what the model would (`[0]`, `.sample`,
`.hidden_states[-2]`, a latent distribution). The LoRA methods are those of one
`refit.Refitter` over the export's LoRA-capable engines (`pipe.refitter`): one adapter state,
diffusers' semantics, per-component and per-block weights included.

This module sits on top, beside the Triton deployment: it uses `refit`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from lora_loaders.dtypes import from_numpy, to_numpy, torch_dtype
from lora_loaders.families import ComponentSpec, FamilySpec, get_family
from refit import Refitter

from .load import load_engine
from .manifest import PIPELINE_STATE_FILE, Manifest

log = logging.getLogger(__name__)

# Arguments a pipeline passes that the exported graphs do not take; ignored when unset.
_PASSTHROUGH = {"return_dict", "output_hidden_states", "attention_mask", "generator", "cross_attention_kwargs",
                "joint_attention_kwargs", "attention_kwargs", "timestep_cond", "output_attentions",
                "force_not_quantize", "shape"}  # VQModel.decode's: the graph looks the codes up, shaped as they are


class PipelineError(RuntimeError):
    """An export that cannot back a pipeline (files missing), or a call the engines cannot serve."""


class SizeError(PipelineError, ValueError):
    """A size (height, width, frames, text length) beyond what the export's axes take: bad input."""


class EngineModel(torch.nn.Module):
    """Stands in for one model of a pipeline (both VAE halves: one `vae`) over exported engines."""

    def __init__(self, parts: dict[str, tuple[ComponentSpec, object, dict]], config, dtype: torch.dtype,
                 state: dict | None = None, axes: dict | None = None):
        super().__init__()
        self._parts = parts  # method -> (component spec, engine, manifest entry)
        self._state = state or {}  # tensors outside the graphs that the pipeline reads (ComponentSpec.pipeline_state)
        self._axes = axes or {}  # the manifest's: the largest size of each named dimension
        self._progress: dict = {}  # the pipeline's progress bar settings (set_progress_bar_config), for decoding
        self.config = config
        self._dtype = dtype
        first = next(iter(parts.values()))[0]
        self._cls = getattr(importlib.import_module(first.library), first.class_name)

    dtype = property(lambda self: self._dtype)
    device = property(lambda self: torch.device("cpu"))  # engines take and give host arrays

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
        # Structure a pipeline reads (`unet.add_embedding.linear_1.in_features`): the model's own,
        # built from its config on the meta device (no memory).
        meta = self.__dict__.get("_meta")
        if meta is None:
            with torch.device("meta"):
                meta = self._cls.from_config(self.config) if hasattr(self._cls, "from_config") else self._cls(self.config)
            for path, tensor in self._state.items():
                owner, _, leaf = path.rpartition(".")
                module = meta.get_submodule(owner)
                if leaf in module._parameters:  # a parameter (aMUSEd's codebook) takes a Parameter only
                    tensor = torch.nn.Parameter(tensor, requires_grad=False)
                setattr(module, leaf, tensor)
            self.__dict__["_meta"] = meta
        return getattr(meta, name)

    def forward(self, *args, **kwargs):
        return self._run("forward", args, kwargs)

    def decode(self, *args, **kwargs):
        return self._run("decode", args, kwargs)

    def encode(self, *args, **kwargs):
        return self._run("encode", args, kwargs)

    def enable_tiling(self, *args, **kwargs):
        """Spatial tiles would change the pixels diffusers' default decode makes: the engines decode whole frames."""
        raise PipelineError("the exported VAE decodes whole frames, as diffusers' default decode does; tiling is not "
                            "supported (a smaller size, or the torch VAE, decodes within less memory)")

    def enable_slicing(self):
        """One sample at a time gives the same pixels: the engines take any batch within the export's axis."""

    def disable_tiling(self):
        """Tiling is never on."""

    disable_slicing = enable_slicing

    def _run(self, method: str, args, kwargs):
        if method not in self._parts:
            raise PipelineError(f"this export has no engine for {self._cls.__name__}.{method} (export the "
                                f"{'vae_encoder' if method == 'encode' else method} component)")
        spec, engine, entry = self._parts[method]
        sig = inspect.signature(getattr(self._cls, method))
        bound = dict(sig.bind(None, *args, **kwargs).arguments)
        bound.pop(next(iter(bound)))  # self
        for name, p in sig.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                bound.update(bound.pop(name, {}))
        if spec.chunks is not None:
            return _result(spec, method, self._chunked(spec, engine, entry, bound), bound, self.config)
        if spec.pipeline_call is not None:  # the call is several graph runs (Z-Image's per-sample lists)
            def run(**graph_args):
                return self._infer(spec, engine, entry, graph_args)

            # another graph of this model (Qwen-Image-Edit's vision tower beside its language model)
            run.graph = lambda component: lambda **graph_args: self._infer(*self._graph(spec, component), graph_args)
            return spec.pipeline_call(run, bound, self.config)
        return _result(spec, method, self._infer(spec, engine, entry, bound), bound, self.config)

    def _infer(self, spec: ComponentSpec, engine, entry: dict, args: dict) -> dict[str, torch.Tensor]:
        """One run of the engine on the call's arguments: {output name: tensor}."""
        feeds = _feeds(spec, entry, args, self.config)
        if engine.backend == "tensorrt":  # its profile is the axes' range (ONNX Runtime runs what the pipeline
            _check_sizes(spec, entry, feeds, self._axes)  # chose within the pixel limits, e.g. Sana's size bins)
        out = engine.infer(feeds)
        return {o["name"]: from_numpy(out[o["name"]]) for o in entry["outputs"]}

    def _graph(self, spec: ComponentSpec, component: str) -> tuple:
        """The (spec, engine, manifest entry) of another graph a pipeline_call runs."""
        part = next((p for p in self._parts.values() if p[0].name == component), None)
        if part is None:
            raise PipelineError(f"this export has no {component} engine, which this call of {spec.name} needs "
                                f"(export the {component} component)")
        return part

    def _part(self, component: str | None, what: str) -> tuple:
        """The (spec, engine, manifest entry) of another graph of this model (a chunk decoder's)."""
        part = next((p for p in self._parts.values() if p[0].name == component), None)
        if part is None:
            raise PipelineError(f"this export has no {component or 'graph'} engine, which decodes {what}"
                                + (f" (export the {component} component)" if component else ""))
        return part

    def _chunked(self, spec: ComponentSpec, engine, entry: dict, args: dict) -> dict[str, torch.Tensor]:
        """A causal video decoder (encoder) over all latent (video) frames as diffusers' `decode`
        (`encode`) loops: the first chunk, then each later one (`Chunks.next`'s graph) with the caches the
        run before left. Frames after the last whole chunk are left out, as diffusers' loops leave them
        (Wan's encoder: 1 + 4 k frames)."""
        arg = spec.inputs[0].arg or spec.inputs[0].name
        z = args[arg]
        chunks = spec.chunks  # the first graph's: one for another first-chunk length has none of its own
        frames, size = z.shape[2], chunks.size
        first = min(chunks.first(frames), frames)
        if first != spec.inputs[0].dims[2]:  # a first chunk of another length: its own graph
            spec, engine, entry = self._part(chunks.others.get(first), f"a first chunk of {first} frames")
        frames = first + (frames - first) // size * size
        later = self._part(chunks.next, f"the frames after the first {first}") if frames > first else None
        out = self._infer(spec, engine, entry, {**args, arg: z[:, :, :first]})
        name = spec.outputs[0].name
        pieces = [out[name]]
        bar = {"desc": spec.method.partition("_")[0], "unit": "chunk", "leave": False, "disable": frames <= first,
               **self._progress}
        for start in tqdm(range(first, frames, size), **bar):
            nspec, nengine, nentry = later
            cached = {t.name: out[f"{t.name}_out"] for t in nspec.inputs_for(self.config)[len(nspec.inputs):]}
            out = self._infer(nspec, nengine, nentry, {**args, arg: z[:, :, start:start + size], **cached})
            pieces.append(out[name])
        return {name: torch.cat(pieces, 2)}


def _check_sizes(spec: ComponentSpec, entry: dict, feeds: dict, axes: dict) -> None:
    """SizeError, before the engine runs, for a named dimension beyond the manifest's axis (a TensorRT
    engine's profile is that range: a clear error instead of TensorRT's)."""
    for i in entry["inputs"]:
        for dim, n in zip(i["shape"], feeds[i["name"]].shape):
            if isinstance(dim, str) and dim in axes and n > int(axes[dim]["max"]):
                raise SizeError(f"{spec.name}: {i['name']} has {dim} {n}, beyond the export's largest "
                                f"{axes[dim]['max']} (the manifest's axes; export with a larger range)")


# how diffusers' video pipelines name the VAE's temporal compression
_TIME_FACTORS = ("vae_scale_factor_temporal", "vae_temporal_compression_ratio", "vae_temporal_scale_factor")


def spatial_factor(pipe) -> int:
    """Pixels per latent along height and width (image pipelines: `vae_scale_factor`, video: `_spatial`)."""
    return int(getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None) or 8)


def size_multiple(pipe) -> int:
    """What heights and widths (pixels) must be multiples of: the VAE factor times the denoiser's
    grid, a transformer's patch size or a UNet's downsamplings (its graph upsamples by fixed
    factors, so the latents must divide evenly)."""
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    config = getattr(denoiser, "config", None)
    if config is not None and config.get("down_block_types"):
        return spatial_factor(pipe) * 2 ** (len(config["down_block_types"]) - 1)
    p = config.get("patch_size") if config is not None else None
    return spatial_factor(pipe) * int(p if isinstance(p, int) else (p[-1] if p else 1))


def size_limits(pipe) -> dict[str, int]:
    """{"height", "width": the largest size in pixels, "frames": the most video frames} the export's
    engines take: its latent axes times the pipeline's VAE factors, and the VAE's own pixel axes."""
    axes, factor = pipe.manifest.axes, spatial_factor(pipe)
    out = {}
    if "frames" in axes:  # causal video VAEs: 1 + (latent frames - 1) x the time factor
        time = next((int(getattr(pipe, a)) for a in _TIME_FACTORS if getattr(pipe, a, None)), 1)
        out["frames"] = (int(axes["frames"]["max"]) - 1) * time + 1
    for name in ("height", "width"):
        limits = [int(axes[name]["max"]) * factor] if name in axes else []
        limits += [int(axes[f"image_{name}"]["max"])] if f"image_{name}" in axes else []
        if limits:
            out[name] = min(limits)
    return out


def check_size(pipe, height: int | None, width: int | None, what: str = "") -> None:
    """SizeError for a height or width (pixels) beyond `size_limits`."""
    for name, value in (("height", height), ("width", width)):
        limit = size_limits(pipe).get(name)
        if value is not None and limit is not None and value > limit:
            raise SizeError(f"{what}{name} {value} is above the export's largest {limit} pixels")


def check_image_size(pipe, kwargs: dict) -> None:
    """SizeError for an input image (or mask) larger than the export takes, where the call does not
    set the size: the pipelines then work at the image's own size."""
    if kwargs.get("height") is not None or kwargs.get("width") is not None:
        return
    for key in ("image", "mask_image"):
        value = kwargs.get(key)
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        size = getattr(value, "size", None)
        if isinstance(size, tuple) and len(size) == 2:  # a PIL image: (width, height)
            check_size(pipe, size[1], size[0], f"the {key.replace('_', ' ')}'s ")


def _feeds(spec: ComponentSpec, entry: dict, args: dict, config) -> dict[str, np.ndarray]:
    used = set()
    raw = {}
    inputs = spec.inputs_for(config)
    for t in inputs:
        if t.name not in {i["name"] for i in entry["inputs"]}:
            continue  # not in this config's graph (TensorSpec.when)
        path = (t.arg or t.name).split(".")
        used.add(path[0])
        value = args.get(path[0])
        for part in path[1:]:
            value = None if value is None else value.get(part)
        if value is None:
            raise PipelineError(f"{spec.name}: the pipeline did not pass {t.arg or t.name!r}, a graph input")
        raw[t.name] = value
    extra = [k for k, v in args.items() if k not in used and k not in _PASSTHROUGH and k not in spec.computed
             and v is not None and not (isinstance(v, bool))]
    extra += [f"{k}.{s}" for k in used if isinstance(args.get(k), Mapping)
              for s, v in args[k].items() if v is not None and f"{k}.{s}" not in {t.arg for t in inputs}]
    if extra:
        raise PipelineError(f"{spec.name}: the exported graph has no input for {sorted(extra)}")
    batch = next((v.shape[0] for t, v in zip(inputs, raw.values()) if torch.is_tensor(v) and v.dim()
                  and t.dims and t.dims[0] == "batch"), None)
    feeds = {}
    dtypes = {i["name"]: i["dtype"] for i in entry["inputs"]}
    for name, value in raw.items():
        v = torch.as_tensor(value).detach().cpu()
        rank = len(next(i["shape"] for i in entry["inputs"] if i["name"] == name))
        if v.dim() < rank and v.numel() == 1 and batch is not None:  # a scalar timestep: one per sample
            v = v.reshape(1).expand(batch)
        if v.dim() == rank + 1:  # per-sample position ids (FLUX.2): the same for every sample, as the model takes them
            v = v[0]
        feeds[name] = to_numpy(v.to(torch_dtype(dtypes[name])))
    return feeds


def _result(spec: ComponentSpec, method: str, values: dict, args: dict, config):
    if spec.pipeline_output is not None:
        return spec.pipeline_output(values, config)
    return_dict = args.get("return_dict", True)
    first = values[spec.outputs[0].name]
    if method == "decode":
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=first) if return_dict else (first,)
    if method == "encode":
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        dist = DiagonalGaussianDistribution(first)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)
    if spec.role != "text_encoder":
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=first) if return_dict else (first,)
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.clip.modeling_clip import CLIPTextModelOutput

    fields = {}
    for o in spec.outputs:
        if o.source.startswith("hidden_states."):
            index = int(o.source.split(".")[1])  # only that layer is exported: put it where the index finds it
            fields["hidden_states"] = (values[o.name], *[None] * (-index - 1)) if index < 0 else \
                (*[None] * index, values[o.name])
        else:
            fields[o.source] = values[o.name]
    cls = CLIPTextModelOutput if "text_embeds" in fields else BaseModelOutputWithPooling
    out = cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})
    return out if return_dict or return_dict is None else out.to_tuple()


# -- LoRA switching over the engines ---------------------------------------------------------------

_LORA_METHODS = ("load_lora_weights", "set_adapters", "disable_lora", "enable_lora", "delete_adapters",
                 "unload_lora_weights", "get_active_adapters", "get_list_adapters")


def _engine_pipeline_class(cls):
    """The diffusers pipeline class with its LoRA methods those of `self.refitter`."""
    def method(name):
        def call(self, *args, **kwargs):
            if self.refitter is None:
                raise PipelineError(f"{name}: this export has no LoRA-capable component")
            return getattr(self.refitter, name)(*args, **kwargs)
        call.__name__ = name
        call.__doc__ = getattr(Refitter, name).__doc__
        return call

    @functools.wraps(cls.__call__)  # its signature and docs are diffusers'
    def __call__(self, *args, **kwargs):
        for k, v in (self._engine_spec.pipeline_kwargs(self) if self._engine_spec.pipeline_kwargs else {}).items():
            kwargs.setdefault(k, v)
        check_size(self, kwargs.get("height"), kwargs.get("width"))  # before any work
        check_image_size(self, kwargs)
        for model in self.components.values():  # a chunked video decode shows progress as denoising does
            if isinstance(model, EngineModel):
                model._progress = {k: v for k, v in getattr(self, "_progress_bar_config", {}).items() if k == "disable"}
        return cls.__call__(self, *args, **kwargs)

    def fuse_lora(self, *args, **kwargs):
        """Engines always hold the effective weights: nothing to merge."""

    def unfuse_lora(self, *args, **kwargs):
        """Engines always hold the effective weights: nothing to unmerge (`set_adapters([])` gives base)."""

    return type(f"Engine{cls.__name__}", (cls,), {"__call__": __call__, "fuse_lora": fuse_lora,
                                                 "unfuse_lora": unfuse_lora,
                                                 **{n: method(n) for n in _LORA_METHODS}})


# -- loading ---------------------------------------------------------------------------------


def load_pipeline(out_dir, backend: str | None = None, lora_dir=None, *, task: str | None = None,
                  pipeline_class=None, **engine_opts):
    """The family's diffusers pipeline over the engines of an export directory.

    backend: as `engines.load_engine` ("onnxruntime", "tensorrt", "torch"; None: what is
    there). lora_dir: where else to find the files of the adapters the export baked (a
    Triton adapter directory). task: a Hugging Face task ("text-to-image", "image-to-image",
    "inpainting", "text-to-video", "image-to-video"): diffusers' pipeline for it (default:
    the one the export's model_index.json names, a Fill or Kontext model's own);
    pipeline_class: a diffusers pipeline class, or its name, instead. Raises PipelineError
    when the export lacks what the pipeline needs.
    """
    out_dir = Path(out_dir)
    manifest = Manifest.read(out_dir)
    spec: FamilySpec = get_family(manifest.family)
    info = manifest.get("pipeline") or {}
    if not spec.pipeline or not info:
        raise PipelineError(f"{out_dir}: the export records no pipeline files; export from a diffusers directory, "
                            "a hub id or --model tiny")
    if info.get("missing"):
        raise PipelineError(f"{out_dir}: the export lacks the pipeline's {info['missing']}")
    models, lora_engines = {}, {}
    groups: dict[str, dict] = {}
    for comp, entry in manifest.components.items():
        cspec = spec.component(comp)
        engine = load_engine(out_dir / entry.get("dir", comp), backend=backend, **engine_opts)
        groups.setdefault(cspec.folder, {})[cspec.method] = (cspec, engine, entry)
        if cspec.lora:
            lora_engines[comp] = engine
    for folder, parts in groups.items():
        cspec, _, entry = next(iter(parts.values()))
        comp_dir = out_dir / entry.get("dir", cspec.name)
        state = {}  # each graph's (aMUSEd's encoder saves the codebook its pipeline quantizes with)
        for pspec, _, pentry in parts.values():
            path = out_dir / pentry.get("dir", pspec.name) / PIPELINE_STATE_FILE
            state.update(load_file(path) if path.is_file() else {})
        models[folder] = EngineModel(parts, _config(cspec, comp_dir), torch_dtype(entry["dtype"]), state or None,
                                     manifest.axes)
    index = _model_index(out_dir)
    for name, (library, class_name) in index.items():
        if name not in models and library is not None and (out_dir / name).is_dir():
            models[name] = _from_pretrained(library, class_name, out_dir / name)
    base = {"refitter": Refitter(lora_engines, lora_dir=lora_dir) if lora_engines else None, "_engine_spec": spec,
            "manifest": manifest, "_engine_parts": models, "_engine_settings": _pipeline_settings(out_dir),
            "_engine_class": _index_class(out_dir)}
    return _assemble(base, task, pipeline_class)


def for_task(pipe, task: str | None = None, pipeline_class=None):
    """Another task's pipeline over the same engines and adapter state (as diffusers' `from_pipe`):
    `for_task(pipe, "inpainting")` after `load_pipeline(export)`; a LoRA set on one is set on both."""
    keys = ("refitter", "_engine_spec", "manifest", "_engine_parts", "_engine_settings", "_engine_class")
    return _assemble({k: getattr(pipe, k) for k in keys}, task, pipeline_class)


def _assemble(base: dict, task: str | None, pipeline_class):
    spec, manifest = base["_engine_spec"], base["manifest"]
    cls, task = _task_class(spec, manifest, base["_engine_class"], task, pipeline_class)
    if task is not None:
        _check_task(spec, manifest, task, cls.__name__)
    cls = _engine_pipeline_class(cls)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in base["_engine_parts"].items() if k in params}
    for name, p in params.items():
        if name not in kwargs and name != "self" and p.default is inspect.Parameter.empty \
                and p.kind is not inspect.Parameter.VAR_KEYWORD:
            kwargs[name] = None  # optional models the export does not serve (safety checker, image encoder)
    kwargs.update({k: v for k, v in base["_engine_settings"].items() if k in params and k not in kwargs})
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False
    pipe = cls(**{k: v for k, v in kwargs.items() if k in params})
    for k, v in base.items():
        setattr(pipe, k, v)
    pipe.task = task
    return pipe


def _task_class(spec: FamilySpec, manifest: Manifest, index_class: str | None, task, pipeline_class):
    """(diffusers pipeline class, its task or None) for a load_pipeline call."""
    import diffusers

    if pipeline_class is not None:
        name = pipeline_class if isinstance(pipeline_class, str) else pipeline_class.__name__
        cls = getattr(diffusers, name, None) if isinstance(pipeline_class, str) else pipeline_class
        if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
            raise PipelineError(f"pipeline_class {name!r} is not a diffusers pipeline")
        return cls, spec.task_of(name)
    pipelines = spec.task_pipelines()
    if task is None:
        name = index_class if spec.task_of(index_class or "") else spec.pipeline
        return getattr(diffusers, name), spec.task_of(name)
    if task not in pipelines:
        raise PipelineError(f"{manifest.family} has no {task!r} pipeline; its tasks: {', '.join(pipelines)}")
    variant = spec.variant_of(index_class)
    try:  # a variant's model may need its own class for a task (Kontext's inpainting) or lack one (Fill)
        own = variant.pipeline_for(task, manifest.family) if variant is not None else None
    except ValueError as e:
        raise PipelineError(str(e)) from None
    name = own or (index_class if index_class in pipelines[task] else pipelines[task][0])
    return getattr(diffusers, name), task


def _check_task(spec: FamilySpec, manifest: Manifest, task: str, cls_name: str) -> None:
    """PipelineError naming what to export, for a task whose components the export lacks."""
    served = (manifest.get("pipeline") or {}).get("tasks")
    lacking = [c for c in spec.task_components(task) if c not in manifest.components
               and not (spec.component(c).optional and served is not None and task in served)]
    if lacking:
        raise PipelineError(f"this export cannot serve {task} ({cls_name}): export the {', '.join(lacking)} "
                            f"component{'s' if len(lacking) > 1 else ''} (python -m export ... --tasks {task})")


def _from_pretrained(library: str, class_name: str, path: Path):
    return getattr(importlib.import_module(library), class_name).from_pretrained(path)


def _index_class(out_dir: Path) -> str | None:
    return json.loads((out_dir / "model_index.json").read_text()).get("_class_name")


def _model_index(out_dir: Path) -> dict:
    path = out_dir / "model_index.json"
    if not path.is_file():
        raise PipelineError(f"{out_dir}: no model_index.json")
    return {k: v for k, v in json.loads(path.read_text()).items() if isinstance(v, list) and len(v) == 2}


def _pipeline_settings(out_dir: Path) -> dict:
    """The pipeline's own registered settings in model_index.json (Wan 2.2's `boundary_ratio`)."""
    return {k: v for k, v in json.loads((out_dir / "model_index.json").read_text()).items()
            if not k.startswith("_") and not (isinstance(v, list) and len(v) == 2)}


def _config(cspec: ComponentSpec, comp_dir: Path):
    """The component's config, as its model would have it (`model.config`)."""
    cls = getattr(importlib.import_module(cspec.library), cspec.class_name)
    if cspec.library == "transformers":
        return cls.config_class.from_pretrained(comp_dir)
    from diffusers.configuration_utils import FrozenDict

    config = dict(cls.load_config(comp_dir))
    if "force_upcast" in config:
        config["force_upcast"] = False  # the VAE engine runs at its exported precision: nothing to upcast
    return FrozenDict(config)
