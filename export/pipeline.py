"""`export_pipeline`: a family's components, LoRAs baked in, to ONNX + weights maps + manifest.

Output layout (`out_dir`)::

    manifest.json
    <component>/model.onnx                  (+ model.onnx.data past 2 GB of weights)
    <component>/weights_map.json            (see export.weights_map)
    <component>/base_weights.safetensors    (only when adapters changed the component)

Everything is written to a temporary sibling directory that is renamed to `out_dir` at the
end; a failed export (bad input, validation past tolerance) leaves no `out_dir` behind.
Components are loaded, fused, exported and validated one at a time, so peak memory is
about one component.

manifest.json::

    {"format": "lora-engines.export", "version": 1, "family": "sdxl", "dtype": "fp16",
     "model": "tiny", "components": {"unet": {"dir": "unet", "model": "model.onnx",
       "external_data": null, "weights_map": "weights_map.json", "base_weights": null | file,
       "class": ..., "dtype": "float16", "opset": 20, "inputs": [{"name", "dtype", "shape"
       (ints or axis names), "dynamic_axes": {"0": "batch"}}], "outputs": [...],
       "baked_params": [...], "adapters": [{"name", "path", "sha256", "scale"}] (those touching
       this component), "sample_size": (UNet), "validation": {"passed", "tolerance", "outputs": {name:
       {"rel_err", "max_abs_err", ...}}, "input_shapes"}}, ...},
     "adapters": [{"name", "path", "sha256", "scale", "format", "targets"}],
     "validation_errors": {component: {output: rel_err}}, "versions": {...}}
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .onnx_export import ExportError, export_component, torch_to_numpy
from .specs import FamilySpec, family_spec
from .validate import ExportValidationError, validate_onnx
from .weights_map import BASE_WEIGHTS_FILE

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "lora-engines.export"
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_STEPS = ("load", "fuse", "reference", "export", "weights map", "save", "validate")


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """`path[:scale]` -> (path, scale). A trailing `:<number>` is the scale."""
    if ":" in arg:
        path, _, scale = arg.rpartition(":")
        try:
            return path, float(scale)
        except ValueError:
            pass
    return arg, 1.0


def _normalize_loras(loras) -> list[tuple[str, float, str | None]]:
    out = []
    for item in loras or ():
        if isinstance(item, (str, os.PathLike)):
            path, scale = parse_lora_arg(str(item))
            name = None
        elif isinstance(item, dict):
            path, scale, name = item["path"], float(item.get("scale", 1.0)), item.get("name")
        else:
            path, scale, *rest = item
            name = rest[0] if rest else None
        out.append((str(path), float(scale), name))
    return out


# --- models --------------------------------------------------------------------------------------


class ModelSource:
    """Where components come from: "tiny", a local diffusers directory, or a hub repo id."""

    def __init__(self, model, family: FamilySpec, components: list[str], seed: int = 0, hub_kwargs=None):
        self.model, self.family, self.components, self.seed = model, family, components, seed
        self.hub_kwargs = dict(hub_kwargs or {})
        if callable(model) and not isinstance(model, (str, os.PathLike)):
            self.kind = "factory"  # model(component, dtype) -> module; dropped after each export
            return
        self.kind = "modules" if isinstance(model, dict) else None
        if self.kind:
            missing = [c for c in components if c not in model]
            if missing:
                raise ValueError(f"model dict lacks component(s) {missing}")
            return
        model = str(model)
        if model == "tiny":
            self.kind = "tiny"
        elif Path(model).is_dir():
            self.kind, self.root = "dir", Path(model)
        elif Path(model).exists() or model.startswith((".", "/")) or model.count("/") != 1:
            raise FileNotFoundError(f"model {model!r} is not 'tiny', a diffusers directory or a hub repo id")
        else:
            self.kind = "hub"
            self.root = None

    def describe(self) -> str:
        return f"<{self.kind}>" if self.kind in ("modules", "factory") else str(self.model)

    def _ensure_root(self):
        if self.kind == "hub" and self.root is None:
            from huggingface_hub import snapshot_download

            patterns = ["model_index.json"]
            for c in self.components:
                patterns += [f"{c}/*.json", f"{c}/*.safetensors"]
            try:
                self.root = Path(snapshot_download(str(self.model), allow_patterns=patterns,
                                                        **self.hub_kwargs))
            except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth...
                raise FileNotFoundError(f"model {self.model!r} is not a local directory and could not be fetched "
                                        f"from the Hugging Face hub: {type(e).__name__}: {e}") from e
        return self.root

    def load(self, component: str, dtype: torch.dtype) -> torch.nn.Module:
        if self.kind == "modules":
            return self.model[component].to(dtype).eval()
        if self.kind == "factory":
            return self.model(component, dtype).to(dtype).eval()
        if self.kind == "tiny":
            from .tiny import build_tiny

            index = list(self.family.components).index(component)
            return build_tiny(self.family.name, [component], seed=self.seed + index, dtype=dtype)[component]
        root = self._ensure_root()
        spec = self.family.components[component]
        sub = root / component
        if not sub.is_dir():
            raise FileNotFoundError(f"{self.model}: no {component}/ subfolder (diffusers save_pretrained layout)")
        if spec.library == "diffusers":
            import diffusers

            cls = getattr(diffusers, spec.class_name)
            model = cls.from_pretrained(sub, torch_dtype=dtype)
        else:
            import transformers

            cls = getattr(transformers, spec.class_name)
            model = cls.from_pretrained(sub, dtype=dtype)
        return model.to(dtype).eval()

    def module_names(self) -> dict[str, list[str]] | None:
        """Targetable module names per component, from meta-device models (no weights)."""
        from lora_loaders.targets import targetable_modules

        names = {}
        try:
            if self.kind == "factory":
                return None
            for c in self.components:
                if self.kind == "modules":
                    names[c] = list(targetable_modules(self.model[c]))
                    continue
                with torch.device("meta"):
                    m = self._meta(c)
                names[c] = list(targetable_modules(m))
                del m
        except Exception as e:  # noqa: BLE001 - names only sharpen kohya name resolution
            log.debug("module names unavailable: %s", e)
            return None
        return names

    def _meta(self, component):
        spec = self.family.components[component]
        if self.kind == "tiny":
            from .tiny import TINY_CONFIGS

            _, _, config = TINY_CONFIGS[self.family.name][component]
        if spec.library == "diffusers":
            import diffusers

            cls = getattr(diffusers, spec.class_name)
            if self.kind != "tiny":
                config = cls.load_config(self._ensure_root() / component)
            return cls.from_config(config)
        import transformers

        cls = getattr(transformers, spec.class_name)
        if self.kind == "tiny":
            cfg = cls.config_class(**config)
        else:
            cfg = cls.config_class.from_pretrained(self._ensure_root() / component)
        return cls(cfg)


# --- adapters ------------------------------------------------------------------------------------


def read_adapters(loras, family: str, module_names) -> list[dict]:
    """[{adapter, scale, name, path, sha256}] with clear errors for missing / bad / foreign files."""
    from lora_loaders import read_lora
    from lora_loaders.reader import file_sha256

    out = []
    names = set()
    for path, scale, name in _normalize_loras(loras):
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"LoRA file not found: {path}")
        if p.is_dir():
            raise ValueError(f"LoRA path {path} is a directory; pass the .safetensors file")
        try:
            adapter = read_lora(str(p), family, module_names=module_names)
        except (OSError, ValueError, KeyError) as e:
            msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            raise type(e)(f"cannot use LoRA {path} for family {family!r}: {msg}") from e
        name = name or p.stem
        base, i = name, 1
        while name in names:
            i += 1
            name = f"{base}_{i}"
        names.add(name)
        out.append({"adapter": adapter, "scale": scale, "name": name, "path": str(p.resolve()),
                    "sha256": file_sha256(p)})
    return out


def _bake(module: torch.nn.Module, component: str, adapters: list[dict], comp_dir: Path) -> list[str]:
    """Fuse the adapters into `module` in place (effective_weight); save base values first.

    Returns the torch parameter names whose values the adapters set (the keys of
    base_weights.safetensors).
    """
    from lora_loaders.reader import align_to_model, check_against_model
    from lora_loaders.targets import contributions_by_module, targetable_modules
    from lora_loaders.weights import effective_bias, effective_weight
    from safetensors.torch import save_file

    aligned = []
    for a in adapters:
        ad = align_to_model(a["adapter"], {component: module})
        check_against_model(ad, {component: module}, name=a["name"])
        aligned.append((ad, a["scale"]))
    contribs = contributions_by_module(aligned, component)
    if not contribs:
        return []
    modules = targetable_modules(module)
    base = {}
    for path, cs in contribs.items():
        m = modules[path]
        base[f"{path}.weight"] = m.weight.detach()
        if any(layer.bias is not None for layer, _ in cs):
            base[f"{path}.bias"] = m.bias.detach()
    save_file({k: v.contiguous() for k, v in base.items()}, str(comp_dir / BASE_WEIGHTS_FILE),
              metadata={"component": component, "format": "lora-engines.base_weights"})
    del base
    with torch.no_grad():
        for path, cs in contribs.items():
            m = modules[path]
            m.weight.data = effective_weight(m.weight.data, cs)
            if any(layer.bias is not None for layer, _ in cs):
                m.bias.data = effective_bias(m.bias.data, cs)
    names = []
    for path, cs in contribs.items():
        names.append(f"{path}.weight")
        if any(layer.bias is not None for layer, _ in cs):
            names.append(f"{path}.bias")
    return names


# --- output directory ----------------------------------------------------------------------------


def _prepare_out(out_dir, overwrite: bool | None) -> tuple[Path, Path]:
    out = Path(out_dir).absolute()
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"output path {out} exists and is not a directory")
        contents = list(out.iterdir())
        previous = (out / MANIFEST_FILE).is_file()
        if contents and not previous and not overwrite:
            raise ExportError(f"output directory {out} is not empty and holds no previous export; "
                              "remove it or pass overwrite=True")
        if overwrite is False and contents:
            raise ExportError(f"output directory {out} exists (overwrite=False)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ExportError(f"output directory {out} is not writable: {e.strerror or e}") from e
    if not os.access(tmp, os.W_OK):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"output directory {out} is not writable")
    return out, tmp


def _commit(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    overwrite: bool | None = None,
    seed: int = 0,
    external_data: bool | None = None,
    tensorrt: bool = False,
    hub_kwargs: dict | None = None,
) -> dict:
    """Export a family's components with LoRAs baked in. Returns the manifest (also written).

    family: "sd" | "sdxl". model: "tiny", a local diffusers directory, a hub repo id, a
    {component: module} dict, or a callable (component, torch dtype) -> module (built on
    demand and freed after its export: the low-memory way to pass your own modules). loras: [(path, scale)] or ["path[:scale]"]. dtype: fp32 |
    fp16 | bf16. components: subset (list or "unet,text_encoder"); default all of the
    family's. overwrite: None replaces a previous export in out_dir but refuses a non-empty
    directory that is not one. Raises ValueError / FileNotFoundError / ExportError (and
    ExportValidationError past tolerance) and then leaves no out_dir behind. hub_kwargs go to
    `huggingface_hub.snapshot_download` (revision, cache_dir, local_files_only, token...).
    """
    from tqdm.auto import tqdm

    spec = family_spec(family)
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    tdtype = DTYPES[str(dtype)]
    if isinstance(components, str):
        components = [c.strip() for c in components.split(",") if c.strip()]
    components = list(components or spec.default_components)
    bad = [c for c in components if c not in spec.components]
    if bad:
        raise ValueError(f"family {family!r} has no component(s) {bad}; have {list(spec.components)}")
    source = ModelSource(model, spec, components, seed=seed, hub_kwargs=hub_kwargs)
    if tensorrt:
        from .tensorrt import check_available

        check_available()  # fail before spending minutes on the ONNX export
    out, tmp = _prepare_out(out_dir, overwrite)
    bar = tqdm(total=len(components) * len(_STEPS), desc=f"export {family}", disable=not progress, unit="step")
    try:
        adapters = read_adapters(loras, family, source.module_names() if loras else None)
        manifest = {
            "format": MANIFEST_FORMAT, "version": 1, "family": family, "dtype": _SHORT[tdtype],
            "model": source.describe(), "components": {},
            "adapters": [{"name": a["name"], "path": a["path"], "sha256": a["sha256"], "scale": a["scale"],
                          "format": a["adapter"].format, "targets": len(a["adapter"].layers),
                          "components": a["adapter"].components} for a in adapters],
            "validation_errors": {},
            "versions": versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        for component in components:
            entry = _export_one(source, spec, component, tdtype, adapters, tmp, family, opset, validate,
                                external_data, bar)
            manifest["components"][component] = entry
            val = entry.get("validation")
            if val:
                manifest["validation_errors"][component] = {
                    k: v.get("rel_err") for k, v in val["outputs"].items()}
        if tensorrt:
            from .tensorrt import build_engines

            build_engines(tmp, manifest)
        with open(tmp / MANIFEST_FILE, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    log.info("exported %s (%s) to %s", family, ", ".join(components), out)
    return manifest


def _export_one(source, spec, component, tdtype, adapters, tmp, family, opset, validate, external_data, bar) -> dict:
    cspec = spec.components[component]
    comp_dir = tmp / component
    comp_dir.mkdir()

    def step(name):
        log.debug("%s: %s done", component, name)
        bar.set_postfix_str(f"{component}: {name}", refresh=False)
        bar.update(1)

    log.info("%s: loading", component)
    module = source.load(component, tdtype)
    step("load")
    baked = _bake(module, component, adapters, comp_dir) if adapters else []
    step("fuse")
    feeds = ref = None
    if validate:
        inputs = cspec.make_inputs(module, tdtype, cspec.validate_inputs)
        feeds = {k: torch_to_numpy(v) for k, v in inputs.items()}
        if tdtype != torch.bfloat16:  # bf16: reference in float32 after the export (see validate.py)
            ref = _torch_outputs(cspec, module, inputs)
    step("reference")
    entry = export_component(module, cspec, comp_dir, family, opset=opset, external_data=external_data,
                             step=step)
    sample_size = getattr(getattr(module, "config", None), "sample_size", None)
    if isinstance(sample_size, int):
        entry["sample_size"] = sample_size
    entry["base_weights"] = BASE_WEIGHTS_FILE if baked else None
    entry["baked_params"] = baked
    entry["adapters"] = [{"name": a["name"], "path": a["path"], "sha256": a["sha256"], "scale": a["scale"]}
                         for a in adapters if a["adapter"].for_component(component)]
    if validate and tdtype == torch.bfloat16:
        module.float()
        ref = _torch_outputs(cspec, module, {k: (v.float() if v.is_floating_point() else v)
                                             for k, v in inputs.items()})
    alive = weakref.ref(module)
    params = [weakref.ref(p) for p in module.parameters()]
    del module
    _release_memory()
    if alive() is not None or any(p() is not None for p in params):
        log.debug("%s: the torch module (%s) or %d of its parameters still referenced after export", component,
                  "alive" if alive() is not None else "dead", sum(p() is not None for p in params))
    log.debug("%s: torch model released, rss %.2f GB", component, _rss() / 1e9)
    if validate:
        result = validate_onnx(comp_dir / entry["model"], entry["dtype"], feeds, ref, cspec.output_names, tmp)
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


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _release_memory() -> None:
    """Collect, then hand freed heap pages back to the OS (glibc keeps them otherwise), so the
    ONNX Runtime session of the validation step does not stack on the torch model's memory."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _torch_outputs(cspec, module, inputs) -> list[np.ndarray]:
    wrapper = cspec.wrap(module).eval()
    with torch.no_grad():
        out = wrapper(*[inputs[n] for n in cspec.input_names])
    out = out if isinstance(out, tuple) else (out,)
    return [o.detach().float().numpy() for o in out]
