"""`python -m export`: export a family's components to ONNX with LoRAs baked in.

    python -m export --family sdxl --model tiny --lora x.safetensors[:SCALE] [--lora ...] --out out/sdxl
           [--dtype fp16|bf16|fp32] [--components unet,text_encoder] [--tensorrt] [--triton-repo DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    p.add_argument("--family", required=True, help="model family: sd | sdxl")
    p.add_argument("--model", default="tiny",
                   help="'tiny' (built-in small random model), a local diffusers directory, or a hub repo id")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA file to bake in, optionally with a scale; repeat to stack adapters")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--components", default=None, help="comma-separated subset, e.g. unet,text_encoder")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (model.plan)")
    p.add_argument("--triton-repo", default=None, metavar="DIR", help="also write a Triton model repository")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch.onnx", "onnx_ir", "onnxscript", "diffusers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from . import export_pipeline
    from .onnx_export import ExportError
    from .validate import ExportValidationError

    try:
        manifest = export_pipeline(
            args.family, model=args.model, loras=args.lora, out_dir=args.out, dtype=args.dtype,
            components=args.components, opset=args.opset, progress=not args.no_progress,
            validate=not args.no_validate, overwrite=True if args.overwrite else None, tensorrt=args.tensorrt,
        )
        if args.triton_repo:
            from engines.triton import write_repository

            write_repository(args.out, args.triton_repo)
    except (ExportError, ExportValidationError, ValueError, KeyError, FileNotFoundError, OSError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    summary = {c: {"validation": (v.get("validation") or {}).get("outputs"), "dir": v["dir"]}
               for c, v in manifest["components"].items()}
    print(json.dumps({"out": args.out, "components": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
