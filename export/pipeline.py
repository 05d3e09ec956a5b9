"""`export_pipeline`: a family's components, LoRAs baked in, to ONNX + weights maps + manifest.

Output layout (`out_dir`)::

    manifest.json                           (engines.manifest)
    <component>/model.onnx                  (+ model.onnx.data past 2 GB of weights)
    <component>/weights_map.json            (engines.weights_map)
    <component>/base_weights.safetensors    (only when adapters changed the component)

LoRAs are read and bound against the components' module names (meta-device models, no
weights) before any model is built, so a bad file fails in seconds. Everything is written
to a temporary sibling directory that is renamed to `out_dir` at the end; a failed or
interrupted export leaves no `out_dir` behind. Components are loaded, fused, exported and
validated one at a time, so peak memory is about one component.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from engines.manifest import MANIFEST_FILE, PIPELINE_STATE_FILE, Manifest, adapter_record
from engines.weights_map import BASE_WEIGHTS_FILE
from lora_loaders import dtypes, kernels
from lora_loaders.adapter import unique_name
from lora_loaders.families import ComponentSpec, FamilySpec, get_family
from lora_loaders.io import commit_dirs, listing, new_dir_beside, parse_lora_arg
from lora_loaders.serialization import save_state_dict
from lora_loaders.state import finite_number

from .graph import example_inputs, run_torch
from .models import ModelSource
from .pipeline_files import write_pipeline_files
from .onnx_export import ExportError, export_component
from .validate import ExportValidationError, validate_onnx

log = logging.getLogger(__name__)

_STEPS = ("load", "fuse", "reference", "trace", "optimize", "weights map", "save", "validate")  # progress steps
_STEP_DONE = {  # what each step did, as `-v` logs it
    "load": "built or loaded the model", "fuse": "fused the LoRAs into its weights", "no fuse": "no LoRA touches it",
    "reference": "ran PyTorch for reference outputs", "trace": "traced it to ONNX (torch.onnx, dynamo)",
    "optimize": "optimized the graph (onnxscript)", "weights map": "built and verified the weights map",
    "save": "wrote the ONNX model", "validate": "compared ONNX Runtime with PyTorch",
}


class OutputExistsError(ExportError):
    """The output directory holds something: a previous export is replaced only when asked
    (`overwrite`), anything else never (an `--overwrite` that deletes a folder of notes is a bug)."""

    def __init__(self, path: Path, previous: bool, holds: str = "", flag: str = "overwrite=True"):
        self.path, self.previous, self.holds = path, previous, holds
        super().__init__(self.describe(flag))

    def describe(self, flag: str) -> str:
        if self.previous:
            return f"output directory {self.path} holds a previous export; pass {flag} to replace it"
        return (f"output directory {self.path} is not empty and holds no export ({self.holds}); {flag} replaces "
                "only a previous export: choose another directory, or empty this one")


def _normalize_loras(loras) -> list[tuple[str, float, str | None, str | None]]:
    """[(path, scale, name, into)] from "[COMPONENT=]path[:scale]" strings, tuples or dicts.

    `into` names the component a file's denoiser layers go to where the family has more than
    one (Wan 2.2: "transformer_2=low_noise.safetensors")."""
    out = []
    for item in loras or ():
        name = into = None
        if isinstance(item, (str, os.PathLike)):
            text = str(item)
            head, eq, rest = text.partition("=")
            if eq and head.isidentifier() and not Path(text).exists():
                into, text = head, rest
            path, scale = parse_lora_arg(text)
        elif isinstance(item, dict):
            path, scale, name, into = item["path"], item.get("scale", 1.0), item.get("name"), item.get("into")
        else:
            path, scale, *rest = item
            name = rest[0] if rest else None
            into = rest[1] if len(rest) > 1 else None
        out.append((str(path), finite_number(scale, f"LoRA {path}: its scale"), name, into))
    return out


# --- adapters ------------------------------------------------------------------------------------


def read_adapters(loras, family: FamilySpec, index) -> list[dict]:
    """[{adapter, parsed, scale, name, path, sha256}], bound against `index` (clear errors, no models built)."""
    from lora_loaders.reader import bind_parsed, parse_file

    out, names = [], set()
    for path, scale, name, into in _normalize_loras(loras):
        remap = family.remap_into(into) if into else {}
        if into and not remap:
            raise ValueError(f"LoRA {path}: family {family.name!r} cannot load a LoRA into {into!r} "
                             f"(components: {list(family.components)})")
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"LoRA file not found: {path}")
        if p.is_dir():
            raise ValueError(f"LoRA path {path} is a directory; pass the .safetensors file")
        try:
            parsed, digest, where = parse_file(str(p))
            adapter = bind_parsed(parsed, family, index, remap=remap, where=where, sha256=digest, widen=True)
        except (OSError, ValueError, KeyError) as e:
            msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            for prefix in (str(p.resolve()), str(p), path):  # said once, here
                msg = msg.removeprefix(prefix).removeprefix(":").strip()
            raise type(e)(f"cannot use LoRA {path} for family {family.name!r}: {msg}") from e
        name = unique_name(name or p.stem, names)
        names.add(name)
        out.append({"adapter": adapter, "parsed": parsed, "scale": scale, "name": name, "path": str(p.resolve()),
                    "sha256": digest, "where": where, "remap": remap})
    return out


def _bake(module: torch.nn.Module, component: str, family: FamilySpec, adapters: list[dict], comp_dir: Path,
          bound: bool, widened: dict | None = None) -> list[str]:
    """Fuse the adapters into `module` in place (effective weights); save base values first.

    Modules an adapter widens (Flux Control's x_embedder) are widened first, as the loaders do,
    and recorded in `widened` ({module: {"from", "to", "config"}}); the base values saved are
    the widened ones. Returns the torch parameter names whose values the adapters set (the
    keys of base_weights.safetensors).
    """
    from safetensors.torch import save_file

    from lora_loaders.bind import align, resolve_fused
    from lora_loaders.index import TargetIndex
    from lora_loaders.reader import bind_parsed
    from lora_loaders.targets import contributions_by_module, params_of
    from lora_loaders.weights import effective_bias, effective_weight
    from lora_loaders.widen import wanted, widen_modules

    index = TargetIndex.from_models({component: module})
    bound_adapters = []
    for a in adapters:
        adapter = a["adapter"]
        if not bound:  # no module index before the models existed (factories): bind now
            adapter = bind_parsed(a["parsed"], family, index, remap=a["remap"], where=a["where"], widen=True)
        bound_adapters.append(adapter)
    widths = {k: cols for k, cols in wanted(bound_adapters, family, index).items() if k[0] == component}
    if widths:
        records, index = widen_modules({component: module}, family, widths)
        done = {r.module: {"from": r.original_width, "to": widths[(component, r.module)], "config": r.field}
                for r in records}
        log.info("%s: widened %s for the LoRA(s) baked", component, {m: f"{d['from']} -> {d['to']}" for m, d in done.items()})
        if widened is not None:
            widened.update(done)
        bound_adapters = [align(adapter, family, index) for adapter in bound_adapters]
    state = dict(module.named_parameters())
    pairs = [(resolve_fused(adapter, lambda c, p: state[p].detach()), a["scale"])
             for adapter, a in zip(bound_adapters, adapters)]
    params = params_of(contributions_by_module(pairs, component))
    if not params:
        return []
    base = {p: state[p].detach() for p in params}
    save_file({k: v.contiguous() for k, v in base.items()}, str(comp_dir / BASE_WEIGHTS_FILE),
              metadata={"component": component, "format": "lora-engines.base_weights"})
    del base
    with torch.no_grad():
        for p, cs in params.items():
            t = state[p]
            t.data = effective_bias(t.data, cs) if p.endswith(".bias") else effective_weight(t.data, cs)
    return list(params)


# --- output directory ----------------------------------------------------------------------------


def _prepare_out(out_dir, overwrite: bool) -> tuple[Path, Path]:
    """(the output directory, a new temporary one beside it to write into)."""
    out = Path(out_dir).absolute()
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"output path {out} exists and is not a directory")
        if any(out.iterdir()) and not (overwrite and Manifest.holds(out)):
            raise OutputExistsError(out, Manifest.holds(out), listing(out))
    try:
        tmp = new_dir_beside(out)
    except OSError as e:
        raise ExportError(f"output directory {out} is not writable: {e.strerror or e}") from e
    if not os.access(tmp, os.W_OK):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"output directory {out} is not writable")
    return out, tmp


def _export_dtype(dtype) -> torch.dtype:
    """fp32 | fp16 | bf16 (or their full names, or the torch dtype) -> the torch dtype."""
    try:
        d = dtypes.dtype(dtype)
    except ValueError:
        d = None
    if d is None or d.name not in dtypes.FLOATS:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return d.torch


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "diffusers", "transformers", "lora-engines"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            if pkg == "onnxruntime":
                with contextlib.suppress(md.PackageNotFoundError):
                    out[pkg] = md.version("onnxruntime-gpu")
    return out


def _components(spec: FamilySpec, components, tasks=()) -> list[str]:
    if isinstance(components, str):
        components = [c.strip() for c in components.split(",") if c.strip()]
    exportable = [c for c, s in spec.components.items() if s.inputs]
    if not exportable:
        raise ValueError(f"family {spec.name!r} loads LoRAs but has no export entry yet; exportable families: "
                         f"{', '.join(f.name for f in _exportable_families())}")
    components = list(components or [c for c in spec.exported if c in exportable])
    components = list(dict.fromkeys([*components, *(c for t in tasks for c in spec.task_components(t))]))
    bad = [c for c in components if c not in exportable]
    if bad:
        raise ValueError(f"family {spec.name!r} has no exportable component(s) {bad}; have {exportable}")
    return components


def _exportable_families():
    from lora_loaders.families import FAMILIES

    return [f for f in FAMILIES.values() if any(s.inputs for s in f.components.values())]


# --- the pipeline --------------------------------------------------------------------------------


def export_pipeline(
    family: str,
    model="tiny",
    loras: Sequence = (),
    out_dir: str | os.PathLike = "out",
    dtype: str = "fp32",
    components: Sequence[str] | str | None = None,
    opset: int | None = None,
    progress: bool = True,
    validate: bool = True,
    overwrite: bool = False,
    seed: int = 0,
    external_data: bool | None = None,
    tensorrt: bool = False,
    hub_kwargs: dict | None = None,
    torch: bool = False,
    strip_plan: bool = False,
    tasks: Sequence[str] | str = (),
) -> Manifest:
    """Export a family's components with LoRAs baked in. Returns the manifest (also written).

    family: a registry family (`lora_loaders.FAMILIES`). model: "tiny", a local diffusers
    directory, a hub repo id, a {component: module} dict, or a callable (component, torch
    dtype) -> module (built on demand and freed after its export: the low-memory way to pass
    your own modules). loras: [(path, scale)] or ["path[:scale]"]. dtype: fp32 | fp16 | bf16.
    components: subset (list or "unet,text_encoder"); default all the family exports (an
    optional component the model lacks, such as Wan 2.1's transformer_2, is skipped).
    overwrite: replace a non-empty out_dir. Raises ValueError / FileNotFoundError /
    ExportError (and ExportValidationError past tolerance) and then leaves no out_dir
    behind. hub_kwargs go to `huggingface_hub.snapshot_download`. torch: also write each
    component's module (`save_pretrained` layout) for the torch engine (export/torch_save.py).
    strip_plan: with tensorrt, plans without their refittable weights. tasks: Hugging Face task
    names ("image-to-image", "inpainting", "image-to-video") whose components to export besides
    the default ones (the VAE encoder; Wan 2.1 I2V's image encoder).
    """
    from tqdm.auto import tqdm

    spec = get_family(family)
    tdtype = _export_dtype(dtype)
    tasks = spec.check_tasks(tasks)
    wanted = _components(spec, components, tasks)
    lora_list = _normalize_loras(loras)
    source = ModelSource(model, spec, wanted, seed=seed, hub_kwargs=hub_kwargs)
    if tensorrt:
        from .tensorrt import check_available

        check_available()  # fail before spending minutes on the ONNX export
    t0 = time.perf_counter()
    index = source.index() if lora_list else None
    adapters = read_adapters(lora_list, spec, index)
    log.info("read and bound %d LoRA(s) in %.2f s", len(adapters), time.perf_counter() - t0)
    explicit = components is not None
    present = [c for c in wanted if explicit or not spec.component(c).optional or source.present(c)]
    if not explicit:  # a variant's own graphs (ComponentSpec.when over its marked config)
        present += [c for c, s in spec.components.items()
                    if s.when is not None and c not in present and s.when(source.config(c))]
    spec, bounded = spec.bounded({c: source.config(c) for c in present if spec.component(c).bounds})
    for name, why in bounded.items():
        log.info("axis %s: %s", name, why)
    out, tmp = _prepare_out(out_dir, overwrite)
    bar = tqdm(total=len(present) * len(_STEPS), desc=f"export {family}", disable=not progress, unit="step")
    try:
        manifest = Manifest.new(
            family=family, dtype=dtypes.name(tdtype), model=source.describe(),
            axes={n: {"min": a.min, "opt": a.opt, "max": a.max} for n, a in spec.axes.items()},
            effective_weights=kernels.describe(), **({"axis_bounds": bounded} if bounded else {}),
            validation_errors={}, versions=versions(),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        for component in present:
            entry = _export_one(source, spec, component, tdtype, adapters, tmp, opset, validate, external_data, bar,
                                bound=index is not None, save_torch=torch)
            manifest.components[component] = entry
            val = entry.get("validation")
            if val:
                manifest["validation_errors"][component] = {k: v.get("rel_err") for k, v in val["outputs"].items()}
        manifest.record_adapters([adapter_record(a["name"], a["path"], a["sha256"], a["scale"], a["adapter"])
                                  for a in adapters])
        if tensorrt:
            from .tensorrt import build_engines

            build_engines(tmp, manifest, spec, strip_plan=strip_plan)
        manifest["pipeline"] = write_pipeline_files(source, spec, tmp, present)
        if manifest["pipeline"]:
            variant = getattr(source, "variant", None)  # a Fill model does fewer tasks than the family
            manifest["pipeline"]["tasks"] = [t for t in spec.task_pipelines()
                                             if (variant is None or variant.tasks is None or t in variant.tasks)
                                             and all(c in present for c in spec.task_components(t)
                                                    if not spec.component(c).optional or source.present(c))]
        manifest.write(tmp)
        commit_dirs([(tmp, out)])
        manifest.path = out / MANIFEST_FILE
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    log.info("exported %s (%s) to %s in %.1f s", family, ", ".join(present), out, time.perf_counter() - t0)
    return manifest


def _export_one(source, spec: FamilySpec, component, tdtype, adapters, tmp, opset, validate, external_data, bar,
                bound, save_torch: bool = False) -> dict:
    cspec = spec.component(component)
    comp_dir = tmp / component
    comp_dir.mkdir()
    started = {"t": time.perf_counter()}

    def step(done):
        now = time.perf_counter()
        log.info("%s: %s, %.2f s", component, _STEP_DONE.get(done, done), now - started["t"])
        started["t"] = now
        bar.set_postfix_str(f"{component}: {done}", refresh=False)
        bar.update(1)

    module = source.load(component, tdtype)
    _save_config(module, comp_dir, cspec)
    step("load")
    widened: dict = {}
    baked = _bake(module, component, spec, adapters, comp_dir, bound, widened) if adapters and cspec.lora else []
    step("fuse" if baked else "no fuse")
    feeds = ref = None
    if validate:
        inputs = example_inputs(spec, cspec, module, tdtype, "check", seed=1234)
        feeds = {k: dtypes.to_numpy(v) for k, v in inputs.items()}
        if tdtype != torch.bfloat16:  # bf16: reference in float32 after the export (see validate.py)
            ref = run_torch(cspec, module, inputs)
    step("reference")
    entry = export_component(module, cspec, comp_dir, spec, opset=opset, external_data=external_data, step=step)
    if save_torch:
        from .torch_save import save_torch_component

        entry["torch"] = save_torch_component(module, comp_dir)
    entry["base_weights"] = BASE_WEIGHTS_FILE if baked else None
    if widened:  # a Control LoRA's wider input: engines refit only adapters of this width
        entry["widened"] = widened
    entry["baked_params"] = baked
    if validate and tdtype == torch.bfloat16:
        module.float()
        ref = run_torch(cspec, module, {k: (v.float() if v.is_floating_point() else v) for k, v in inputs.items()})
    del module
    _release_memory()
    if validate:
        result = validate_onnx(comp_dir / entry["model"], entry["dtype"], feeds, ref,
                               [o["name"] for o in entry["outputs"]], tmp)
        entry["validation"] = result
        if not result["passed"]:
            errs = {k: v.get("rel_err", v.get("error")) for k, v in result["outputs"].items()}
            raise ExportValidationError(
                f"{component}: ONNX Runtime output differs from PyTorch beyond the {entry['dtype']} tolerance "
                f"{result['tolerance']}: {errs}")
        log.info("%s: validated, rel err %s", component,
                 {k: f"{v['rel_err']:.2e}" for k, v in result["outputs"].items()})
    step("validate")
    return entry


def _save_config(module, comp_dir: Path, cspec: ComponentSpec) -> None:
    """The component's config.json next to its engine (what a pipeline over the engine reads),
    and the tensors outside the graph that the pipeline reads too."""
    if hasattr(module, "save_config"):  # diffusers
        module.save_config(comp_dir)
    elif hasattr(module, "config") and hasattr(module.config, "save_pretrained"):  # transformers
        module.config.save_pretrained(comp_dir)
    if cspec.pipeline_state:
        tensors = {**dict(module.named_buffers()), **dict(module.named_parameters())}
        save_state_dict({n: tensors[n] for n in cspec.pipeline_state}, comp_dir / PIPELINE_STATE_FILE)


def _release_memory() -> None:
    """Collect, then hand freed heap pages back to the OS (glibc keeps them otherwise), so the
    ONNX Runtime session of the validation step does not stack on the torch model's memory."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
