"""`python -m engines.generate OUT_DIR --prompt TEXT [--lora F[:SCALE]]... --out image.png`

Prompt to picture over an export directory: the family's diffusers pipeline with its models
replaced by the exported engines (`engines.load_pipeline`); `--lora` refits them first. A
progress bar follows the denoising steps.

Exit codes: 0 done, 2 bad usage or input (missing export or LoRA, size not a multiple of the
VAE factor, steps <= 0), 1 a failure while working.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engines.generate", description=__doc__.split("\n\n")[1],
                                epilog=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR", help="an export directory (python -m export ...)")
    p.add_argument("--prompt", required=True, help="what to picture")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="refit to these adapters first, each at SCALE (default 1.0); repeat to stack; "
                        "without: what the export baked")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, up to what the export takes (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="pixels, as --height (default: the pipeline's)")
    p.add_argument("--backend", default=None, help="onnxruntime | tensorrt | torch (default: what the export has)")
    p.add_argument("--out", required=True, help="image file to write: .png, .jpg or .webp")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    return p


class UsageError(ValueError):
    """An argument the user can fix."""


def check_args(args, pipe) -> None:
    if args.steps <= 0:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UsageError(f"--guidance must be a finite number, got {args.guidance}")
    factor = getattr(pipe, "vae_scale_factor", 8) * _patch(pipe)
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % factor):
            raise UsageError(f"--{name} {v} is not a positive multiple of {factor} (the VAE factor x the patch size)")
    from .pipeline import check_size

    check_size(pipe, args.height, args.width, what="--")
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")


def _patch(pipe) -> int:
    denoiser = getattr(pipe, "transformer", None)
    p = getattr(getattr(denoiser, "config", None), "patch_size", None) if denoiser is not None else None
    return int(p if isinstance(p, int) else (p[-1] if p else 1))


def generate(args) -> Path:
    import torch

    from lora_loaders.adapter import unique_name
    from lora_loaders.io import parse_lora_arg

    from .pipeline import load_pipeline

    loras = [parse_lora_arg(s) for s in args.lora]
    for path, _ in loras:
        if not Path(path).is_file():
            raise UsageError(f"LoRA file not found: {path}")
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UsageError(f"--out {out}: write a .png, .jpg or .webp file")
    if not Path(args.out_dir).is_dir():
        raise UsageError(f"no such export directory: {args.out_dir}")
    pipe = load_pipeline(args.out_dir, backend=args.backend)
    check_args(args, pipe)
    if loras:
        names = []
        for path, _ in loras:  # named as export names them: the file's stem (x, x_2, ...)
            taken = set(names) | {n for ns in pipe.get_list_adapters().values() for n in ns}
            name = unique_name(Path(path).stem, taken)
            pipe.load_lora_weights(path, adapter_name=name)
            names.append(name)
        pipe.set_adapters(names, [s for _, s in loras])
    kw = {k: v for k, v in (("height", args.height), ("width", args.width), ("guidance_scale", args.guidance),
                            ("negative_prompt", args.negative_prompt)) if v is not None}
    result = pipe(prompt=args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed), **kw)
    image = result.images[0] if hasattr(result, "images") else result.frames[0][0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    image.save(tmp)
    tmp.replace(out)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from . import noise
    from .cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

    noise.install()
    from .manifest import ManifestError
    from .pipeline import PipelineError

    try:
        out = generate(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (UsageError, ManifestError, FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return EXIT_USAGE
    except (PipelineError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
