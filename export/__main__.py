"""`python -m export`: export a family's components to ONNX with LoRAs baked in.

    python -m export --family sdxl --model tiny --lora x.safetensors[:SCALE] [--lora ...] --out out/sdxl
           [--dtype fp16|bf16|fp32] [--components unet,text_encoder] [--tasks image-to-image,inpainting]
           [--tensorrt [--strip-plan]] [--torch]
           [--triton-repo DIR] [--overwrite]

Exit codes: 0 done, 2 bad usage or input (unknown family, missing or unusable LoRA, bad
scale, existing output without --overwrite), 1 a failure while working (validation past
tolerance, TensorRT unavailable, out of disk). Ctrl-C or SIGTERM leave nothing behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engines.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, sigterm_exits


def build_parser() -> argparse.ArgumentParser:
    from lora_loaders.families import FAMILIES

    exportable = [f.name for f in FAMILIES.values() if any(s.inputs for s in f.components.values())]
    p = argparse.ArgumentParser(prog="python -m export", description="Export a family's components to ONNX with LoRAs baked in.",
                                epilog=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, help="model family: " + " | ".join(exportable))
    p.add_argument("--model", required=True,
                   help="'tiny' (the built-in small model with random weights; 'tiny:VARIANT' for a variant such as "
                        "flux's fill or kontext, wan's i2v), a local diffusers directory, or a hub repo id")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA file to bake in, optionally with a scale; repeat to stack adapters")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--components", default=None, help="comma-separated subset, e.g. unet,text_encoder")
    p.add_argument("--tasks", default="", metavar="TASK[,TASK]",
                   help="also export what these tasks need (image-to-image, inpainting: the VAE encoder; "
                        "image-to-video: the video VAE encoder, Wan 2.1's image encoder)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (model.plan)")
    p.add_argument("--strip-plan", action="store_true",
                   help="with --tensorrt: plans without their refittable weights (refit before use)")
    p.add_argument("--torch", action="store_true",
                   help="also write each component's module (save_pretrained layout) for the torch engine")
    p.add_argument("--triton-repo", default=None, metavar="DIR", help="also write a Triton model repository")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log each step and how long it took (no progress bar)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Warnings of every library show (engines.noise drops the few that say nothing); -v adds
    # this project's own steps and timings, not the libraries' info logs.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        for ours in ("export", "engines", "lora_loaders"):
            logging.getLogger(ours).setLevel(logging.INFO)
    from . import export_pipeline
    from .onnx_export import ExportError
    from .pipeline import OutputExistsError

    with sigterm_exits():  # SIGTERM unwinds, so the temporary directory is removed
        try:
            manifest = export_pipeline(
                args.family, model=args.model, loras=args.lora, out_dir=args.out, dtype=args.dtype,
                components=args.components, tasks=args.tasks, opset=args.opset, progress=not (args.no_progress or args.verbose),
                validate=not args.no_validate, overwrite=args.overwrite, tensorrt=args.tensorrt, torch=args.torch,
                strip_plan=args.strip_plan,
            )
            if args.triton_repo:
                from engines.triton import write_repository

                write_repository(args.out, args.triton_repo)
        except KeyboardInterrupt:
            print("error: interrupted; nothing was written", file=sys.stderr)
            return EXIT_INTERRUPTED
        except OutputExistsError as e:
            print(f"error: {e.describe('--overwrite')}", file=sys.stderr)
            return EXIT_USAGE
        except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
            print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
            return EXIT_USAGE
        except (ExportError, OSError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_FAILED
    summary = {c: {"validation": (v.get("validation") or {}).get("outputs"), "dir": v["dir"]}
               for c, v in manifest["components"].items()}
    print(json.dumps({"out": args.out, "components": summary}, indent=1))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
