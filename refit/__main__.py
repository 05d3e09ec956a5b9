"""`python -m refit DIR --lora y.safetensors[:SCALE] [--lora ...] --out DIR2`

Writes a new engine directory with these adapters (replacing whatever DIR had baked),
without building a torch model or re-exporting: the mapped initializers are recomputed
from base with the one effective-weight function, so the ONNX weights are bit-identical to
`python -m export` with the same adapters. DIR is an exported component directory
(model.onnx + weights_map.json [+ base_weights.safetensors]) or a pipeline export
directory (manifest.json + one such directory per component); DIR2 gets the same layout.
Nothing is written unless everything succeeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import onnx
from onnx import TensorProto

from engines.mapping import WEIGHTS_MAP
from engines.onnx_utils import MODEL_FILE

from . import core
from .store import MANIFEST, ComponentFiles, RefitError


def parse_lora(spec: str) -> tuple[str, float]:
    """'path[:scale]' -> (path, scale); a path that itself contains ':' still works."""
    path, sep, scale = spec.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def _component_dirs(src: Path) -> list[Path]:
    if (src / WEIGHTS_MAP).is_file():
        return [src]
    dirs = sorted(p for p in src.iterdir() if p.is_dir() and (p / WEIGHTS_MAP).is_file())
    if not dirs:
        raise RefitError(f"{src} is neither an exported component directory (no {WEIGHTS_MAP}) "
                         "nor a pipeline export holding such directories")
    return dirs


def refit_component(src: Path, dst: Path, loras: list[tuple[str, float]], family: str | None = None,
                    strict: bool = True) -> dict:
    """Write dst (a new component directory) with `loras` baked; returns what was done."""
    files = ComponentFiles(src)
    if family:
        files.family = family
    if files.family is None:
        raise RefitError(f"cannot tell the family of {src}; pass --family")
    pairs, records, applied = [], [], []
    for path, scale in loras:
        adapter, digest = core.read_adapter(path, files.family, module_names={files.component: files.map.modules()})
        from .refitter import _align

        adapter = _align(adapter, files.component, set(files.map.modules()))
        records.append({"name": Path(path).stem, "path": str(Path(path).resolve()), "sha256": digest, "scale": scale})
        if not adapter.for_component(files.component) and not strict:
            continue
        core.check_adapter(adapter, files, Path(path).name)
        pairs.append((adapter, scale))
        applied.append(path)
    targets, values = core.compute(files, pairs, files.baked_params() & set(files.map.entries),
                                   [Path(p).name for p in applied])
    arrays = core.to_initializers(files, values)

    dst.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(files.model_path), load_external_data=True)
    external = None
    src_model = onnx.load(str(files.model_path), load_external_data=False)
    for t in src_model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            external = {e.key: e.value for e in t.external_data}["location"]
            break
    by_name = {t.name: t for t in model.graph.initializer}
    for name, arr in arrays.items():
        t = by_name[name]
        for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            t.ClearField(f)
        t.raw_data = arr.tobytes()
    out_model = dst / files.model_path.name
    if external:
        onnx.save(model, str(out_model), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=Path(external).name, size_threshold=0)
    else:
        onnx.save(model, str(out_model))
    del model
    shutil.copyfile(files.map.path, dst / WEIGHTS_MAP)
    base = {p: files.base(p).contiguous() for p in sorted(targets)}
    if base:
        from safetensors.torch import save_file

        save_file(base, str(dst / "base_weights.safetensors"))
    for extra in src.iterdir():  # anything else of the component (e.g. config) is carried over
        if extra.is_file() and not (dst / extra.name).exists() and extra.suffix in (".json", ".txt") \
                and extra.name != MANIFEST:
            shutil.copyfile(extra, dst / extra.name)
    return {"component": files.component, "family": files.family, "dtype": files.map.dtype,
            "adapters": records, "applied": applied, "changed_initializers": len(arrays), "targets": len(targets)}


def refit_dir(src, dst, loras: list[tuple[str, float]], family: str | None = None, overwrite: bool = False) -> dict:
    """Refit an exported component or pipeline directory into a new directory (atomically)."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"no such engine directory: {src}")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {dst} exists and is not empty")
    for path, _ in loras:
        if not Path(path).is_file():
            raise FileNotFoundError(f"LoRA file not found: {path}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    comps = _component_dirs(src)
    single = comps == [src]
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        results = []
        for c in comps:
            results.append(refit_component(c, tmp if single else tmp / c.name, loras, family, strict=single))
        if not single:
            for path, _ in loras:
                if not any(path in r["applied"] for r in results):
                    raise RefitError(f"{path} touches none of the components in {src}")
        manifest = _manifest(src, results, loras, single)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _manifest(src: Path, results: list[dict], loras, single: bool) -> dict:
    files_manifest = {}
    for p in (src / MANIFEST, src.parent / MANIFEST if single else None):
        if p is not None and p.is_file():
            with open(p) as f:
                files_manifest = json.load(f)
            break
    records = results[0]["adapters"] if results else []
    manifest = dict(files_manifest)
    manifest.update(family=results[0]["family"], adapters=records, refit_from=str(src.resolve()),
                    refit_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if "loras" in manifest:
        manifest["loras"] = records
    if single:
        comps = manifest.get("components")
        if isinstance(comps, dict):
            manifest["components"] = {k: v for k, v in comps.items() if k == results[0]["component"]}
        manifest["component"] = results[0]["component"]
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m refit", description=__doc__.split("\n\n")[1])
    ap.add_argument("dir", help="exported component directory (or pipeline export directory)")
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                    help="LoRA file and scale (default 1.0); repeat to stack. None: back to base")
    ap.add_argument("--out", required=True, help="new engine directory to write")
    ap.add_argument("--family", help="model family (default: from the weights map / manifest)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    try:
        t0 = time.perf_counter()
        manifest = refit_dir(args.dir, args.out, [parse_lora(s) for s in args.lora], args.family, args.overwrite)
    except (RefitError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"refit: error: {e}", file=sys.stderr)
        return 1
    names = ", ".join(f"{a['name']}:{a['scale']}" for a in manifest["adapters"]) or "base"
    print(f"refit: wrote {args.out} ({names}) in {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
