"""Write a Triton model repository from an export directory.

    engines.triton.write_repository("out/sdxl", "repo")                 # GPU or CPU server with ORT
    engines.triton.write_repository("out/sdxl", "repo", text_encoder_backend="python")  # PyPI tritonserver
    engines.triton.write_repository("out/sdxl", "repo", RepositoryOptions(max_batch_size=4, prefix="a_"))

Layout written (``unet`` stands for any denoiser component, ``text_encoder`` for any text encoder)::

    repo/unet/config.pbtxt              backend: "python"; inputs/outputs of the ONNX graph + applied_loras
    repo/unet/1/model.py                delegates to engines.triton.serving.DenoiserModel
    repo/unet/1/unet/                   the exported component: model.onnx (+ .data), weights_map.json,
                                        base_weights.safetensors, model.plan (when built)
    repo/unet/1/manifest.json           the export's manifest (family, baked adapters)
    repo/unet/loras/<name>.safetensors  the adapter directory (baked adapters + `loras=` are copied here)
    repo/text_encoder/config.pbtxt      platform onnxruntime_onnx | tensorrt_plan, or backend python
    repo/text_encoder/1/model.onnx | model.plan | model.py + text_encoder/
    repo/text_to_image/config.pbtxt     backend: "python"; prompt, seed, steps, ... + loras -> image
    repo/text_to_image/1/export/        the whole export (hard links), served by its own pipeline
    repo/text_to_image/loras/           its adapter directory (the same adapters as the denoiser's)

Denoiser: Triton's TensorRT backend cannot refit, so the denoiser is a Python-backend model
that owns the engine (TensorRT plan on a GPU instance when TensorRT is importable and the
export has a ``model.plan``, ONNX Runtime otherwise) and a `refit.Refitter`; see
`engines.triton.serving` for the ``loras`` request parameter. Text encoders serve what the
export baked. The Python environment of the server needs this project installed (or the
``python_path`` option), numpy < 2 (Triton's Python backend), and onnxruntime / tensorrt.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from lora_loaders.io import commit_dirs, listing, new_dir_beside
from lora_loaders.reader import file_sha256

from ..manifest import MANIFEST_FILE, Manifest
from .layout import MODEL_PY, copy_dir, graph_io, make_config, place
from .requests import LORA_SUFFIX, _NAME
from .serving import APPLIED_OUTPUT
from .text_to_image import model_name, write_text_to_image_model

log = logging.getLogger(__name__)

TEXT_ENCODER_BACKENDS = ("auto", "onnxruntime", "tensorrt", "python")


@dataclass(frozen=True)
class RepositoryOptions:
    """How `write_repository` writes a repository (checked when made).

    lora_dir: the adapters' directory named in the denoiser configs (served by file stem).
      None: ``<repo>/<denoiser>/loras`` inside the repository. A path: used as is (absolute).
      The adapters baked at export (``copy_baked``) and ``loras`` (paths) are copied there.
    text_encoder_backend: auto (tensorrt when the export has a plan, else onnxruntime) |
      onnxruntime | tensorrt | python (for servers without those backends, e.g. the PyPI one).
    device: auto (gpu when the export has TensorRT plans) | cpu | gpu: instance kind.
    engine: the denoiser's engine: auto | onnxruntime | tensorrt.
    max_batch_size: >0 enables dynamic batching (when every graph tensor has a dynamic
      batch axis); requests of one execute are grouped by adapter set.
    components: a subset of the export's components (list or "a,b"); prefix: of model names.
    preload: baked | all | none: which adapters a denoiser reads at start.
    python_path: directories the Python models add to sys.path (the project, if the
      server's Python environment does not have it installed).
    link: hard-link engine files instead of copying when possible.
    overwrite: replace the models of these names in an existing repository (other models
      there are kept); False: refuse a non-empty repo_dir.
    log_batches: the denoiser logs, per execute, its requests, adapter groups and refits.
    text_to_image: also write ``<prefix>text_to_image`` (prompt in, picture out, per-request
      ``loras``; see engines.triton.text_to_image). None: when the export holds everything
      the family's pipeline needs (pipeline files, VAE decoder) and all its components are served.
    limits: the text-to-image model's ``max_steps``, ``max_height``, ``max_width`` (``max_frames``).
    """

    lora_dir: str | os.PathLike | None = None
    loras: tuple = ()
    copy_baked: bool = True
    text_encoder_backend: str = "auto"
    device: str = "auto"
    engine: str = "auto"
    max_batch_size: int = 8
    instance_count: int = 1
    queue_delay_us: int = 2000
    components: tuple | str | None = None
    prefix: str = ""
    preload: str = "baked"
    batch_requests: bool = True
    python_path: str | os.PathLike | tuple | None = None
    intra_op_threads: int = 0
    link: bool = True
    overwrite: bool = True
    log_batches: bool = False
    text_to_image: bool | None = None
    limits: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, allowed in (("text_encoder_backend", TEXT_ENCODER_BACKENDS), ("device", ("auto", "cpu", "gpu")),
                              ("engine", ("auto", "onnxruntime", "tensorrt")), ("preload", ("baked", "all", "none"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        object.__setattr__(self, "loras", tuple(self.loras or ()))
        object.__setattr__(self, "limits", dict(self.limits or {}))


# -- reading the export -----------------------------------------------------------------------


def _role(manifest, component: str) -> str:
    """The component's role from the family registry (or the manifest entry, for a component it lacks)."""
    from lora_loaders.families import get_family

    spec = get_family(manifest.family).components.get(component)
    return spec.role if spec is not None else manifest.components[component].get("role", "denoiser")


def _read_export(export_dir: Path, components) -> tuple[Manifest, dict]:
    if not export_dir.is_dir():
        raise FileNotFoundError(f"export directory not found: {export_dir}")
    if not (export_dir / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{export_dir} is not an export directory (no {MANIFEST_FILE})")
    manifest = Manifest.read(export_dir / MANIFEST_FILE)
    comps: dict = dict(manifest.components)
    if components is not None:
        components = [c.strip() for c in components.split(",")] if isinstance(components, str) else list(components)
        missing = [c for c in components if c not in comps]
        if missing:
            raise ValueError(f"the export has no component(s) {missing}; it has {list(comps)}")
        comps = {c: comps[c] for c in components}
    if not comps:
        raise ValueError(f"{export_dir}: the manifest lists no components")
    for component, entry in comps.items():
        onnx_path = manifest.component_dir(component) / (entry.get("model") or "model.onnx")
        if not onnx_path.is_file():
            raise FileNotFoundError(f"no ONNX model for {component} at {onnx_path}")
    return manifest, comps


def _generates(manifest: Manifest) -> bool:
    """Whether the export holds what the family's diffusers pipeline needs to make pictures (the
    files its manifest lists, there on disk)."""
    info = manifest.get("pipeline") or {}
    return bool(info) and not info.get("missing") and all((manifest.root / f).is_file() for f in info.get("files", []))


# -- adapters ------------------------------------------------------------------------------------


def _adapter_name(name: str | None, path: Path) -> str:
    for cand in (name, path.name[: -len(LORA_SUFFIX)] if path.name.endswith(LORA_SUFFIX) else path.stem):
        if cand and _NAME.match(cand) and ".." not in cand:
            return cand
    raise ValueError(f"cannot name adapter {path}: use a file stem of letters, digits and _ . + -")


@dataclass(frozen=True)
class _Shipment:
    """One adapter file to copy into an adapter directory, checked before anything is written."""

    src: Path
    name: str
    digest: str

    @property
    def file_name(self) -> str:
        return f"{self.name}{LORA_SUFFIX}"


def _shipment(src: Path, name: str, sha256: str | None = None, what: str = "adapter") -> _Shipment:
    if not src.is_file():
        raise FileNotFoundError(f"{what} file not found: {src}")
    digest = file_sha256(src)
    if sha256 and digest != sha256:
        raise ValueError(f"{what} {src} changed since the export (sha256 {digest[:12]} != {sha256[:12]})")
    return _Shipment(src, name, digest)


def _plan_adapters(manifest: Manifest, opts: RepositoryOptions, lora_dir: Path | None) -> list[_Shipment]:
    """Every adapter file to ship, hashed and checked for clashes (in the list, and in an existing
    `lora_dir`) before the repository is written."""
    ships = []
    if opts.copy_baked:
        for a in manifest.adapters:
            what = f"adapter {a.get('name')!r} baked into the export (pass --no-baked / copy_baked=False to skip it):"
            path = Path(a.get("path", ""))
            ships.append(_shipment(path, _adapter_name(a.get("name"), path), a.get("sha256"), what))
    ships += [_shipment(Path(p), _adapter_name(None, Path(p))) for p in opts.loras]
    unique: dict[str, _Shipment] = {}
    for s in ships:
        other = unique.setdefault(s.file_name, s)
        if other.digest != s.digest:
            raise FileExistsError(f"two different adapters would be {s.file_name}: {other.src} and {s.src}; "
                                  "rename one of them")
    for s in unique.values():
        dst = None if lora_dir is None else lora_dir / s.file_name
        if dst is not None and dst.exists() and (not dst.is_file() or file_sha256(dst) != s.digest):
            raise FileExistsError(f"{dst} exists with other contents; rename the adapter or remove that file")
    return list(unique.values())


def _check_fit(manifest: Manifest, comps: dict, loras) -> None:
    """Every adapter to ship, read and bound against the export's weights maps now (as export does),
    so one of another family or shape fails here, not in every request that names it."""
    import refit
    from lora_loaders.families import get_family

    spec = get_family(manifest.family)
    files = [refit.ComponentFiles(manifest.component_dir(c)) for c in comps
             if c in spec.components and spec.components[c].lora and (manifest.component_dir(c) / "weights_map.json").is_file()]
    for path in loras if files else ():
        try:
            adapter, _ = refit.read_adapter(str(path), files, Path(path).name)
            refit.check_adapter(adapter, manifest.family, [f.component for f in files], Path(path).name)
        except refit.RefitError as e:
            raise ValueError(f"adapter {path} does not fit this export: {e}") from e


def _copy_adapters(ships: list[_Shipment], lora_dir: Path) -> list[Path]:
    """Copy into lora_dir (each file under a temporary name, then renamed); returns the files added.
    On failure the files added so far are removed again."""
    from lora_loaders.io import atomic_path

    lora_dir.mkdir(parents=True, exist_ok=True)
    added = []
    try:
        for s in ships:
            dst = lora_dir / s.file_name
            if dst.is_file():  # same contents: _plan_adapters checked
                continue
            with atomic_path(dst) as tmp:
                shutil.copy2(s.src, tmp)
            added.append(dst)
    except BaseException:
        for f in added:
            f.unlink(missing_ok=True)
        raise
    return added


# -- the repository -----------------------------------------------------------------------------


def write_repository(export_dir, repo_dir, options: RepositoryOptions | None = None, **overrides) -> dict:
    """Write a Triton model repository for an export; returns {model name: config.pbtxt path}.

    options: a `RepositoryOptions` (see it for each option); keyword arguments override its
    fields (``write_repository(export, repo, max_batch_size=4)``).

    Everything is checked (export, adapter files and their hashes, name clashes) and the
    models are written to a temporary directory next to repo_dir, moved into place at the
    end: on any error (FileNotFoundError, ValueError, FileExistsError, ManifestError) or
    interrupt, neither repo_dir nor the adapter directory is changed.
    """
    opts = replace(options or RepositoryOptions(), **overrides)
    export_dir = Path(export_dir).resolve()
    repo = Path(repo_dir).absolute()
    manifest, comps = _read_export(export_dir, opts.components)
    external = Path(opts.lora_dir).resolve() if opts.lora_dir is not None else None
    denoisers = [c for c in comps if _role(manifest, c) == "denoiser"]  # the models that take `loras`
    if opts.loras and not denoisers:
        raise ValueError(f"adapters to ship were given, but none of {list(comps)} is a denoiser to serve them")
    text_to_image = opts.text_to_image
    if text_to_image is None:
        text_to_image = opts.components is None and _generates(manifest)
    elif text_to_image and not _generates(manifest):
        info = manifest.get("pipeline") or {}
        gone = info.get("missing") or [f for f in info.get("files", []) if not (export_dir / f).is_file()]
        raise ValueError(f"{export_dir}: the export lacks what a text-to-image model needs "
                         f"({', '.join(gone[:5]) if gone else 'its pipeline files'})")
    ships = _plan_adapters(manifest, opts, external) if denoisers else []
    _check_fit(manifest, comps, opts.loras)
    writer = _Writer(manifest, export_dir, opts, external, ships)
    _check_repo(repo, opts.overwrite,
                [f"{opts.prefix}{c}" for c in comps] + [f"{opts.prefix}{model_name(manifest.family)}"] * text_to_image)
    tmp = new_dir_beside(repo)
    added: list[Path] = []
    try:
        names = [writer.component(tmp, c) for c in comps]
        if text_to_image:
            names.append(writer.text_to_image(tmp))
        if external is not None:
            added = _copy_adapters(ships, external)
        commit_dirs([(tmp / n, repo / n) for n in names] if repo.exists() else [(tmp, repo)])
    except BaseException:
        for f in added:
            f.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s (%s) from %s", repo, ", ".join(names), export_dir)
    return {name: repo / name / "config.pbtxt" for name in names}


def _check_repo(repo: Path, overwrite: bool, names: list[str]) -> None:
    """A repository is written into only when absent, empty, or (with `overwrite`) a model
    repository: every entry a model directory (its config.pbtxt) or one of the models written
    (`names`, replaced; the other models are kept). Anything else is refused, naming what is there."""
    if repo.exists() and not repo.is_dir():
        raise FileExistsError(f"{repo} exists and is not a directory")
    if not repo.is_dir() or not any(repo.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{repo} is not empty ({listing(repo)}); pass overwrite=True to add to it")
    foreign = [p for p in sorted(repo.iterdir()) if p.name not in names and not (p / "config.pbtxt").is_file()]
    if foreign:
        raise FileExistsError(f"{repo} is not a model repository: {', '.join(p.name for p in foreign[:5])} "
                              "is not a model directory (no config.pbtxt); choose another directory")


class _Writer:
    """Writes the model directories of one repository (into a temporary directory)."""

    def __init__(self, manifest: Manifest, export_dir: Path, opts: RepositoryOptions, external: Path | None,
                 ships: list[_Shipment]):
        self.manifest, self.export_dir, self.opts, self.external, self.ships = manifest, export_dir, opts, external, ships
        has_plan = any((manifest.component_dir(c) / "model.plan").is_file() for c in manifest.components)
        self.kind = "KIND_GPU" if opts.device == "gpu" or (opts.device == "auto" and has_plan) else "KIND_CPU"
        paths = opts.python_path
        if paths is not None:
            paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
            paths = os.pathsep.join(str(Path(p).resolve()) for p in paths)
        self.python_path = paths

    def _lora_dir_param(self, mdir: Path) -> str:
        """The adapter directory a model names: its own (filled now) or the shared external one."""
        if self.external is None:
            _copy_adapters(self.ships, mdir / "loras")
            return "loras"
        return str(self.external)

    def _params(self, component: str) -> dict:
        params = {"family": self.manifest.family or "", "component": component}
        if self.python_path:
            params["python_path"] = self.python_path
        if self.opts.intra_op_threads:
            params["intra_op_threads"] = str(int(self.opts.intra_op_threads))
        return params

    def _common(self, onnx_path: Path) -> dict:
        inputs, outputs = graph_io(onnx_path)
        o = self.opts
        return dict(inputs=inputs, outputs=outputs, max_batch_size=o.max_batch_size, kind=self.kind,
                    count=o.instance_count, queue_delay_us=o.queue_delay_us)

    def component(self, tmp: Path, component: str) -> str:
        """One component's model directory; returns its name."""
        name = f"{self.opts.prefix}{component}"
        mdir = tmp / name
        src = self.manifest.component_dir(component)
        onnx_path = src / (self.manifest.components[component].get("model") or "model.onnx")
        write = self._denoiser if _role(self.manifest, component) == "denoiser" else self._encoder
        (mdir / "config.pbtxt").write_text(write(mdir, name, component, src, onnx_path))
        return name

    def _encoder(self, mdir: Path, name: str, component: str, src: Path, onnx_path: Path) -> str:
        """A text encoder or VAE as exported (Triton's onnxruntime / tensorrt_plan backends, or Python)."""
        vdir, link = mdir / "1", self.opts.link
        vdir.mkdir(parents=True)
        common = self._common(onnx_path)
        backend = self.opts.text_encoder_backend
        if backend == "auto":
            backend = "tensorrt" if (src / "model.plan").is_file() else "onnxruntime"
        if backend == "onnxruntime":
            for f in src.iterdir():  # model.onnx and its external data, side by side
                if f.is_file() and (f.name == onnx_path.name or f.name.startswith(onnx_path.name + ".")
                                    or f.suffix == ".data"):
                    place(f, vdir / ("model.onnx" if f == onnx_path else f.name), link)
            return make_config(name, platform="onnxruntime_onnx", **common)
        if backend == "tensorrt":
            plan = src / "model.plan"
            if not plan.is_file():
                raise FileNotFoundError(f"{component}: no model.plan in the export (export with --tensorrt)")
            place(plan, vdir / "model.plan", link)
            return make_config(name, platform="tensorrt_plan", **{**common, "kind": "KIND_GPU"})
        self._engine_files(vdir, component, src)
        (vdir / "model.py").write_text(MODEL_PY.format(what=f"{component}, as exported", module="serving",
                                                       cls="EncoderModel"))
        return make_config(name, backend="python", parameters={**self._params(component), "engine": self.opts.engine},
                           **common)

    def _denoiser(self, mdir: Path, name: str, component: str, src: Path, onnx_path: Path) -> str:
        """A denoiser: the Python backend over its engine + Refitter, with per-request ``loras``."""
        vdir = mdir / "1"
        vdir.mkdir(parents=True)
        self._engine_files(vdir, component, src)
        (vdir / "model.py").write_text(MODEL_PY.format(what=f"denoiser {component} with per-request LoRAs",
                                                       module="serving", cls="DenoiserModel"))
        o = self.opts
        params = {**self._params(component), "lora_dir": self._lora_dir_param(mdir), "engine": o.engine,
                  "preload": o.preload, "batch_requests": "true" if o.batch_requests else "false"}
        if o.log_batches:
            params["log_batches"] = "true"
        return make_config(name, backend="python", parameters=params,
                           extra_outputs=[(APPLIED_OUTPUT, "TYPE_STRING", [1])], **self._common(onnx_path))

    def _engine_files(self, vdir: Path, component: str, src: Path) -> None:
        copy_dir(src, vdir / component, self.opts.link)
        place(self.export_dir / MANIFEST_FILE, vdir / MANIFEST_FILE, False)

    def text_to_image(self, tmp: Path) -> str:
        o = self.opts
        name = f"{o.prefix}{model_name(self.manifest.family)}"
        mdir = tmp / name
        mdir.mkdir()
        text = write_text_to_image_model(
            self.export_dir, mdir, lora_dir=self._lora_dir_param(mdir), limits=o.limits,
            max_batch_size=o.max_batch_size, kind=self.kind, instance_count=o.instance_count,
            python_path=self.python_path, link=o.link)
        (mdir / "config.pbtxt").write_text(text)
        return name


