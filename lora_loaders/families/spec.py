"""What a family entry declares: components, axes, key namespaces and name tables.

Everything family-specific is data here (plus a few small hooks), read by every layer:
the loaders (components, namespaces, name tables, fuse defaults), the export (each
component's graph inputs and outputs over named axes, its class and tiny config), refit,
TensorRT profiles and Triton dims (the axes). Generic code never reads a model's config
fields; where a shape depends on the config, the entry says how (`Cfg`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Axis:
    """A named dynamic dimension: TensorRT / Triton range, and the sizes the export uses.

    `example` is the size the graph is traced at, `check` the size it is validated at (a
    different one, so validation exercises the dynamic axis). Both stay small: they decide
    the cost of export and validation, not what the engine accepts.
    """

    min: int
    opt: int
    max: int
    example: int
    check: int

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"axis range must satisfy 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        if self.example < 2:  # the exporter specializes size-1 dimensions
            raise ValueError("an axis' example size must be at least 2")


@dataclass(frozen=True)
class Cfg:
    """A dimension read from the component's config: `Cfg("in_channels")`, `Cfg("x", index=0)`,
    `Cfg(fn=lambda config: ...)`."""

    name: str = ""
    index: int | None = None
    fn: Callable[[Any], int] | None = None

    def __call__(self, config) -> int:
        if self.fn is not None:
            return int(self.fn(config))
        value = getattr(config, self.name)
        if self.index is not None and isinstance(value, (list, tuple)):
            value = value[self.index]
        return int(value)


@dataclass(frozen=True)
class Scaled:
    """A dimension that is a named axis times a factor (a video decoder's cache at twice the latent
    height: `Scaled("height", 2)`); named `"height*2"` in the manifest."""

    axis: str
    factor: int

    def __str__(self) -> str:
        return f"{self.axis}*{self.factor}"


Dim = str | int | Cfg | Scaled  # an axis name, a fixed size, a size from the config, or an axis times a factor


def parse_dim(name: str) -> tuple[str, int]:
    """(axis, factor) of a manifest dimension name: "height*2" -> ("height", 2), "batch" -> ("batch", 1)."""
    axis, _, factor = name.partition("*")
    return axis, int(factor or 1)


@dataclass(frozen=True)
class Bound:
    """A limit a component's config puts on a named axis: its table of positions holds exactly
    `fixed` entries (CogVideoX-2b's text length: the sincos table is text + patches long) or at
    most `max` (AuraFlow's `pos_embed_max_size`: the patches of height and width). Sizes are in
    the axis' units (latents, tokens); `when` the configs it applies to; `field` what an error
    names."""

    field: str
    fixed: Cfg | None = None
    max: Cfg | None = None
    when: Callable[[Any], bool] | None = None

    def applies(self, config) -> bool:
        return self.when is None or bool(self.when(config))


def bounded_axis(name: str, axis: Axis, bound: Bound, config, where: str) -> Axis:
    """The axis as this config can serve it: fixed at one size, or cut at a table's largest."""
    if bound.fixed is not None:
        n = bound.fixed(config)
        if n < 2:
            raise ValueError(f"{where}: {bound.field} gives the {name} axis a size of {n}, which cannot be exported "
                             "(at least 2)")
        return Axis(n, n, n, example=n, check=n)
    m = bound.max(config)
    if m < 2:
        raise ValueError(f"{where}: {bound.field} = {_field(config, bound.field)} leaves room for a {name} of {m}; "
                         "the export needs at least 2")
    if m >= axis.max:
        return axis
    return Axis(min(axis.min, m), min(axis.opt, m), m, example=max(2, min(axis.example, m)), check=min(axis.check, m))


def _field(config, name: str):
    return getattr(config, name, None) if not isinstance(config, Mapping) else config.get(name)


def select_output(result, source: str):
    """The tensor a `TensorSpec.source` names in a model's result: a dotted path of attributes,
    mapping keys and (negative) indices ("hidden_states.-2", "0.parameters")."""
    for part in source.split("."):
        if part.lstrip("-").isdigit():
            result = result[int(part)]
        elif isinstance(result, Mapping):
            result = result[part]
        else:
            result = getattr(result, part)
    return result


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    Inputs: `arg` is the forward argument it feeds ("a.b" for a nested dict entry, e.g.
    SDXL's `added_cond_kwargs.text_embeds`); `dtype` is "model" (the export dtype),
    "float32", "int64" or "int32"; `sample(shape, generator, ctx)` makes example values
    (default: normal floats / zeros for ints). Outputs: `source` is the path into the
    forward's result ("0", "sample", "hidden_states.-2").
    """

    name: str
    dims: tuple[Dim, ...]
    dtype: str = "model"
    arg: str | None = None
    source: str | None = None
    sample: Callable | None = None
    when: Callable[[Any], bool] | None = None  # present only for configs where this holds (Wan's I2V image input)
    doc: str = ""


@dataclass(frozen=True)
class Chunks:
    """How a causal video decoder runs over latent frames: its graph decodes the first chunk
    (`first(frames)` latent frames) and the component `next` each later chunk of `size` frames,
    taking the caches the run before left (its outputs `<input>_out`, by the `next` graph's
    input names). A first chunk of another frame count than this graph's runs the component
    `others[count]` (CogVideoX: an even count's first 2 frames). Diffusers' `vae.decode` does the
    same loop, so the frames are its own."""

    next: str
    size: int = 1
    first: Callable[[int], int] = lambda frames: 1
    others: Mapping[int, str] = field(default_factory=dict)  # first-chunk graphs of other frame counts


@dataclass(frozen=True)
class ComponentSpec:
    """One component of a family: class, role, whether it takes LoRAs, graph I/O, tiny config."""

    name: str
    library: str  # "diffusers" | "transformers"
    class_name: str
    role: str  # "denoiser" | "text_encoder" | "vae"
    lora: bool = True
    export: bool = True
    optional: bool = False  # a model may lack it (Wan 2.1 has no transformer_2)
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)  # static forward kwargs
    prepare: Callable | None = None  # (model, kwargs) -> kwargs: non-tensor forward args from shapes
    method: str = "forward"  # the model method the graph is (the VAE's "decode" / "encode")
    # (model, kwargs) -> result: a traceable stand-in for a forward whose control flow depends on
    # tensor values (Lumina2 packs captions by their lengths in Python loops); same outputs.
    graph_forward: Callable | None = None
    # (outputs by name, config) -> what the pipeline reads from the model's call, where the graph's
    # outputs are a reshaped form of it (FLUX.2's prompt embeddings: the layers the pipeline stacks)
    pipeline_output: Callable | None = None
    # (run, the call's arguments, config) -> what the model's call returns, where the pipeline's call
    # is not one graph run as it is (Z-Image passes per-sample lists of different lengths, Qwen-Image
    # packed latents); run(**graph arguments) -> {output name: tensor}
    pipeline_call: Callable | None = None
    # arguments the pipeline passes that the graph computes itself from its inputs (CogVideoX's rotary
    # embedding): not graph inputs, and not an error when given
    computed: tuple[str, ...] = ()
    # tensors outside the graph that the pipeline reads from the model (FLUX.2's VAE batch-norm
    # statistics), saved beside the engine
    pipeline_state: tuple[str, ...] = ()
    subfolder: str | None = None  # the diffusers folder it loads from (default: its name; both VAE halves: "vae")
    tokenizer: str | None = None  # a text encoder's tokenizer: the pipeline attribute ("tokenizer_2")
    tiny: Mapping[str, Any] | None = None  # config of the built-in tiny model
    config_class: str | None = None  # transformers config class for `tiny`
    aliases: tuple[str, ...] = ()  # module-path prefixes a file may have or lack (CLIP's "text_model.")
    renames: tuple[tuple[str, str], ...] = ()  # (regex, replacement) always applied to this component's names
    block_weights: Callable | None = None  # (scales, module names) -> {module prefix: weight}
    # Linear modules a LoRA may widen (more input columns, zero-padded, as diffusers does for Flux
    # Control's x_embedder), each with the config field that follows its input width.
    widen: Mapping[str, str] = field(default_factory=dict)
    # {axis: Bound}: the sizes this component's config can serve (a table of positions)
    bounds: Mapping[str, Bound] = field(default_factory=dict)
    # (config) -> (inputs, outputs) after the declared ones, where their number follows the config: a
    # causal video decoder's caches, one per convolution, that one chunk leaves to the next
    io: Callable | None = None
    chunks: Chunks | None = None  # a decoder over latent frames in chunks (causal video VAEs)
    # the tasks that need this component where the family's default one does not (the VAE encoder:
    # image-to-image, inpainting, image-to-video): exported when an export asks for one of them
    tasks: tuple[str, ...] = ()
    # (config) -> whether a model with this config has this graph: a variant's graph beside the family's
    # (`export=False`), exported by default where it holds over the variant's marked config
    # (`Variant.marks`): Qwen-Image-Edit's vision tower
    when: Callable[[Any], bool] | None = None

    @property
    def is_text_encoder(self) -> bool:
        return self.role == "text_encoder"

    @property
    def folder(self) -> str:
        """The `save_pretrained` subfolder and pipeline attribute this component belongs to."""
        return self.subfolder or self.name

    def inputs_for(self, config) -> tuple[TensorSpec, ...]:
        """The graph inputs of a model with this config."""
        extra = self.io(config)[0] if self.io is not None else ()
        return (*(t for t in self.inputs if t.when is None or t.when(config)), *extra)

    def outputs_for(self, config) -> tuple[TensorSpec, ...]:
        """The graph outputs of a model with this config."""
        return (*self.outputs, *(self.io(config)[1] if self.io is not None else ()))


@dataclass(frozen=True)
class Split:
    """A fused original layer that diffusers splits by output rows (qkv -> to_q, to_k, to_v).

    `targets` are replacement templates; `ratios` their relative sizes, used when the model
    is not at hand (with it, the target modules' own sizes are used and checked).
    `swap_halves`: the original orders (shift, scale) where diffusers has (scale, shift).
    """

    targets: tuple[str, ...]
    ratios: tuple[int, ...] | None = None
    swap_halves: bool = False


@dataclass(frozen=True)
class Rule:
    """One name-table rule: a full-match regex over a dotted original module name, and its
    diffusers name (a `re` replacement) or a `Split`. It also matches the flattened
    (`_`-joined, as kohya writes) spelling of the same name."""

    pattern: str
    target: str | Split

    def compiled(self) -> tuple[re.Pattern, re.Pattern]:
        flat = self.pattern.replace(r"\.", "_")
        return re.compile(self.pattern), re.compile(flat)


@dataclass(frozen=True)
class NameTable:
    """Original-checkpoint module names -> diffusers module names. Names no rule matches pass
    through unchanged (files mix both spellings), to be checked against the model."""

    rules: tuple[Rule, ...] = ()
    fn: Callable | None = None  # (name, ctx) -> name | None, for translations regexes cannot say (SGM blocks)
    vocab: tuple[str, ...] = ()  # multi-word names, to un-flatten original names without the model

    def __post_init__(self):
        object.__setattr__(self, "_compiled", [(r, *r.compiled()) for r in self.rules])

    def translate(self, name: str, flat: bool, ctx) -> str | Split | None:
        """The diffusers name (or a Split with names filled in) for `name`, None if no rule matches."""
        if self.fn is not None:
            out = self.fn(name, flat, ctx)
            if out is not None:
                return out
        for rule, dotted, flattened in self._compiled:  # noqa: B007
            m = (flattened if flat else dotted).fullmatch(name)
            if m is None:
                continue
            if isinstance(rule.target, Split):
                t = rule.target
                return Split(tuple(m.expand(x) for x in t.targets), t.ratios, t.swap_halves)
            return m.expand(rule.target)
        return None


@dataclass(frozen=True)
class Namespace:
    """A key prefix of LoRA files and what follows it.

    `component` is where the layers go; `flat`: module names joined by `_` (kohya);
    `table`: original-checkpoint names to translate; `format`: how the manifest names the
    layout. Files that hold only the denoiser without a prefix use the namespace "".
    """

    prefix: str
    component: str
    flat: bool = False
    table: NameTable | None = None
    format: str = "diffusers"


TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINTING = "text-to-image", "image-to-image", "inpainting"
TEXT_TO_VIDEO, IMAGE_TO_VIDEO = "text-to-video", "image-to-video"
TASKS = (TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINTING, TEXT_TO_VIDEO, IMAGE_TO_VIDEO)  # Hugging Face's task names


@dataclass(frozen=True)
class Processor:
    """A pipeline part that is neither a model nor a tokenizer (Wan I2V's CLIP `image_processor`):
    the tiny model's, built as `library.class_name(**config)` and saved into the export."""

    library: str
    class_name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    # (folder, tiny_tokenizer) -> None: writes the processor's files where building it takes more than a
    # config (Qwen2VLProcessor: a tokenizer with the vision tokens and an image processor); tiny_tokenizer
    # (folder) -> the export's tiny tokenizer, saved there, to add tokens to
    write: Callable | None = None


@dataclass(frozen=True)
class Variant:
    """A model of the family that another diffusers pipeline runs (Flux Fill and Kontext, Wan I2V):
    its pipeline class (what its model_index.json names), its tiny model's config changes
    (`--model tiny:<variant>`), the components it lacks and the pipeline settings it has."""

    pipeline: str
    tiny: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # {component: config overrides}
    lacks: tuple[str, ...] = ()  # optional components this variant does not have (Wan 2.1 I2V: transformer_2)
    pipeline_config: Mapping[str, Any] | None = None  # None: the family's
    processors: Mapping[str, Processor] = field(default_factory=dict)  # beyond the family's
    # the tasks its model does, {task: the pipeline class for it}, where they differ from the family's
    # (Kontext inpaints with FluxKontextInpaintPipeline; Fill only inpaints); None: the family's tasks
    tasks: Mapping[str, str] | None = None
    # {component: {config field: value}} the export sets on this variant's models (tiny or real, the
    # variant found by model_index.json's pipeline class), where its graphs differ from the family's
    # while its configs do not (Qwen-Image-Edit's are Qwen-Image's): the graphs' `when` read them
    marks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def pipeline_for(self, task: str, family: str) -> str | None:
        """The pipeline class this variant's model does `task` with (None: the family's choice); ValueError
        naming its tasks for one it cannot do."""
        if self.tasks is None:
            return None
        if task not in self.tasks:
            raise ValueError(f"a {family} model for {self.pipeline} has no {task!r} pipeline; its tasks: "
                             f"{', '.join(self.tasks)}")
        return self.tasks[task]


@dataclass(frozen=True)
class FamilySpec:
    """One model family: everything the loaders, export, refit, TensorRT and Triton need."""

    name: str
    mixin: str  # diffusers' mixin class name, kept for ours
    components: Mapping[str, ComponentSpec]
    axes: Mapping[str, Axis] = field(default_factory=dict)
    namespaces: tuple[Namespace, ...] = ()  # beyond "<component>." for every LoRA component
    fuse_default: tuple[str, ...] | None = None  # None: every LoRA component
    unfuse_default: tuple[str, ...] | None = None
    markers: tuple[str, ...] = ()  # regexes over "component.module" names typical of this family
    pipeline: str | None = None  # the diffusers pipeline class
    # (pipeline) -> call arguments its models need beyond the pipeline's defaults (FLUX.2: which
    # text-encoder layers make the prompt, for models of another depth than the real one)
    pipeline_kwargs: Callable | None = None
    scheduler: tuple[str, Mapping[str, Any]] | None = None  # its scheduler class and config for the tiny model
    pipeline_config: Mapping[str, Any] = field(default_factory=dict)  # the tiny model's pipeline settings
    # the pipeline takes a list of generators, one per prompt (aMUSEd's does not: servers then call it
    # once per request)
    generator_lists: bool = True
    # Family-specific `load_lora_weights(...=True)` flags that send a file's layers to another
    # component: Wan 2.2's {"load_into_transformer_2": {"transformer": "transformer_2"}}.
    load_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # {Hugging Face task: diffusers pipeline classes that do it}, beyond the default task's `pipeline`:
    # {"image-to-image": ("FluxImg2ImgPipeline", "FluxKontextPipeline")}; an export whose model_index
    # names one of a task's classes (a Kontext model) gets that one, else the first
    tasks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    variants: Mapping[str, Variant] = field(default_factory=dict)  # `--model tiny:<name>`
    processors: Mapping[str, Processor] = field(default_factory=dict)  # the tiny model's, by pipeline attribute
    # the task its `pipeline` does, where not the text-to-image / text-to-video its axes imply (a family
    # whose one pipeline is image-to-video)
    default: str | None = None

    @property
    def default_task(self) -> str:
        if self.default is not None:
            return self.default
        return TEXT_TO_VIDEO if "frames" in self.axes else TEXT_TO_IMAGE

    def task_pipelines(self) -> dict[str, tuple[str, ...]]:
        """{task: the diffusers pipeline classes that do it}, the default task's `pipeline` first."""
        out = {self.default_task: (self.pipeline,)} if self.pipeline else {}
        for task, classes in self.tasks.items():
            out[task] = tuple(dict.fromkeys((*out.get(task, ()), *classes)))
        for variant in self.variants.values():  # a variant's pipeline does one of the tasks above
            if not any(variant.pipeline in c for c in out.values()):
                raise ValueError(f"family {self.name!r}: variant pipeline {variant.pipeline} is in no task")
            for task, cls in (variant.tasks or {}).items():
                if cls not in out.get(task, ()):
                    raise ValueError(f"family {self.name!r}: variant pipeline {cls} is not a {task!r} pipeline")
        return out

    def task_of(self, pipeline: str) -> str | None:
        """The task a pipeline class of this family does (None: not one of its pipelines)."""
        return next((t for t, classes in self.task_pipelines().items() if pipeline in classes), None)

    def check_tasks(self, tasks) -> tuple[str, ...]:
        """The tasks as a tuple ("a,b" or a list); ValueError naming the family's for one it lacks."""
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        have = self.task_pipelines()
        bad = [t for t in tasks or () if t not in have]
        if bad:
            raise ValueError(f"family {self.name!r} has no task(s) {bad}; it has {list(have)}")
        return tuple(tasks or ())

    def task_components(self, task: str) -> tuple[str, ...]:
        """Components a task needs besides the default export (the VAE encoder for image-to-image)."""
        return tuple(c for c, s in self.components.items() if task in s.tasks)

    def variant_of(self, pipeline: str | None) -> Variant | None:
        """The variant whose model_index names `pipeline` (a Fill or Kontext export), or None."""
        return next((v for v in self.variants.values() if v.pipeline == pipeline), None)

    def variant(self, name: str) -> Variant:
        try:
            return self.variants[name]
        except KeyError:
            raise ValueError(f"family {self.name!r} has no tiny variant {name!r}; it has "
                             f"{list(self.variants) or 'none'}") from None

    @property
    def lora_components(self) -> tuple[str, ...]:
        return tuple(c for c, s in self.components.items() if s.lora)

    @property
    def exported(self) -> tuple[str, ...]:
        return tuple(c for c, s in self.components.items() if s.export)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(c for c, s in self.components.items() if s.is_text_encoder)

    @property
    def denoisers(self) -> tuple[str, ...]:
        return tuple(c for c, s in self.components.items() if s.role == "denoiser")

    @property
    def denoiser(self) -> str:
        return self.denoisers[0]

    def component(self, name: str) -> ComponentSpec:
        try:
            return self.components[name]
        except KeyError:
            raise ValueError(f"family {self.name!r} has no component {name!r}; it has {list(self.components)}") from None

    def bounded(self, configs: Mapping[str, Any]) -> tuple[FamilySpec, dict[str, str]]:
        """This family with its axes as the components' configs ({component: config}) can serve
        them (`ComponentSpec.bounds`), and {axis: why} for each axis a bound changed. ValueError,
        naming the config fields, for sizes no export can take or two bounds that disagree."""
        axes, why, fixed = dict(self.axes), {}, set()
        for comp, config in configs.items():
            for name, bound in self.component(comp).bounds.items():
                if config is None or not bound.applies(config) or name not in axes:
                    continue
                new = bounded_axis(name, axes[name], bound, config, f"{self.name} {comp}")
                clash = (name in fixed and new.max != axes[name].max) or (bound.fixed is not None and name in why
                                                                          and new.max > axes[name].max)
                if clash:
                    raise ValueError(f"{self.name} {comp}: {bound.field} asks for a {name} axis of {new.max}, but "
                                     f"{why[name]}")
                if bound.fixed is not None:
                    fixed.add(name)
                if new != axes[name]:
                    axes[name] = new
                    why[name] = f"{comp}'s {bound.field} {'fixes' if name in fixed else 'limits'} it at {new.max}"
        return (replace(self, axes=axes) if why else self), why

    def all_namespaces(self) -> list[Namespace]:
        """Every key prefix this family reads, longest first (so `lora_te1_` wins over `lora_te_`)."""
        spaces = list(self.namespaces)
        given = {n.prefix for n in spaces}
        spaces += [Namespace(f"{c}.", c) for c in self.lora_components if f"{c}." not in given]
        return sorted(spaces, key=lambda n: len(n.prefix), reverse=True)

    def remap_into(self, component: str) -> dict[str, str]:
        """The component remap that loads a file into `component` (Wan 2.2's transformer_2), or {}."""
        for mapping in self.load_options.values():
            if component in mapping.values():
                return {src: dst for src, dst in mapping.items() if dst == component}
        return {}

    def unprefixed(self) -> Namespace:
        """Keys without a prefix belong to the denoiser, spelled as its `<denoiser>.` keys may be."""
        own = next((n for n in self.namespaces if n.prefix == f"{self.denoiser}."), None)
        return Namespace("", self.denoiser, table=own.table if own else None)
