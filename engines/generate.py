"""`python -m engines.generate OUT_DIR --prompt TEXT [--image in.png [--mask m.png] [--strength S]] [--lora F[:SCALE]]... --out image.png | video.mp4`

Prompt (and image) to picture or video over an export directory: the family's diffusers
pipeline for the task with its models replaced by the exported engines
(`engines.load_pipeline`): text-to-image / text-to-video; with --image, image-to-image (or the
model's own: Kontext, Qwen-Image-Edit) and for video families image-to-video; with --image and
--mask, inpainting (white repaints, black keeps; Flux Fill's own). `--lora` refits them first
(Wan 2.2: `--lora-2` into its second denoiser). Video families write `--frames` frames at
`--fps` to .mp4 (diffusers' `export_to_video`), .gif or .webp. Progress bars follow the
denoising steps and the decoded chunks.

Exit codes: 0 done, 2 bad usage or input (missing export, LoRA or image, a mask of another
size, strength outside (0, 1], size not a multiple of the VAE factor, steps <= 0), 1 a
failure while working.
"""

from __future__ import annotations

import argparse
import inspect
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
    p.add_argument("--lora-2", action="append", default=[], metavar="PATH[:SCALE]", dest="lora_2",
                   help="Wan 2.2: an adapter for its second (low-noise) denoiser, transformer_2, as --lora for "
                        "the first; repeat to stack")
    p.add_argument("--image", default=None, metavar="PATH",
                   help="input image: image-to-image (video families: image-to-video); the output has its size "
                        "unless --height / --width say otherwise")
    p.add_argument("--mask", default=None, metavar="PATH",
                   help="with --image: inpaint where the mask is white (same size as the image)")
    p.add_argument("--strength", type=float, default=None,
                   help="with --image: how much of it to repaint, in (0, 1] (default: the pipeline's)")
    p.add_argument("--frames", type=int, default=None,
                   help="video families: frames to make (default: the pipeline's; Wan: 4k + 1)")
    p.add_argument("--fps", type=float, default=16, help="video families: frames per second of the file (default: 16)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, up to what the export takes (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="pixels, as --height (default: the pipeline's)")
    p.add_argument("--backend", default=None, help="onnxruntime | tensorrt | torch (default: what the export has)")
    p.add_argument("--out", required=True, help="file to write: an image (.png, .jpg, .webp) or, for video "
                                                 "families, a video (.mp4, .gif, .webp)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    return p


class UsageError(ValueError):
    """An argument the user can fix."""


def check_args(args, pipe) -> None:
    from .pipeline import check_size, size_limits, size_multiple

    if args.steps <= 0:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UsageError(f"--guidance must be a finite number, got {args.guidance}")
    factor = size_multiple(pipe)
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % factor):
            raise UsageError(f"--{name} {v} is not a positive multiple of {factor} (the VAE factor x the "
                             "denoiser's patch size or downsampling)")
    check_size(pipe, args.height, args.width, what="--")
    if not args.prompt.strip():
        raise UsageError("--prompt is empty")
    if args.frames is not None:
        if not is_video(pipe):
            raise UsageError(f"--frames: {pipe.manifest.family} makes images, not videos")
        limit = size_limits(pipe)["frames"]
        if not 1 <= args.frames <= limit:
            raise UsageError(f"--frames must be between 1 and {limit} (the export's frames axis holds "
                             f"{pipe.manifest.axes['frames']['max']} latent frames), "
                             f"got {args.frames}")
    if not (math.isfinite(args.fps) and args.fps > 0):
        raise UsageError(f"--fps must be a positive number, got {args.fps}")
    if args.lora_2 and "transformer_2" not in pipe.manifest.components:
        raise UsageError("--lora-2: this export has no second denoiser (transformer_2: Wan 2.2)")


def read_inputs(args) -> tuple:
    """(image, mask) from --image / --mask as RGB / grayscale PIL images, or UsageError."""
    if args.image is None:
        for flag in ("mask", "strength"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag} needs --image")
        return None, None
    if args.strength is not None and not (math.isfinite(args.strength) and 0 < args.strength <= 1):
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    image = _read_image(args.image, "--image", "RGB")
    mask = _read_image(args.mask, "--mask", "L") if args.mask is not None else None
    if mask is not None and mask.size != image.size:
        raise UsageError(f"--mask {args.mask} is {mask.size[0]}x{mask.size[1]}, the image {image.size[0]}x"
                         f"{image.size[1]}: the mask must have the image's size")
    return image, mask


def _read_image(path: str, flag: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise UsageError(f"{flag}: no such file: {path}")
    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UsageError(f"{flag} {path}: not a readable image ({e})") from None


def task_of(args, video: bool) -> str:
    """The Hugging Face task the arguments ask for."""
    if args.image is None:
        return "text-to-video" if video else "text-to-image"
    if video:
        if args.mask is not None:
            raise UsageError("--mask: video families take --image only (image-to-video)")
        return "image-to-video"
    return "inpainting" if args.mask is not None else "image-to-image"


def is_video(pipe) -> bool:
    """Whether the export's family makes videos: its denoiser takes latent frames."""
    return "frames" in pipe.manifest.axes


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")


def generate(args) -> Path:
    import torch
    from PIL import Image

    from lora_loaders.adapter import unique_name
    from lora_loaders.io import parse_lora_arg

    from .pipeline import for_task, load_pipeline

    loras = [(p, s, {}) for p, s in map(parse_lora_arg, args.lora)]
    loras += [(p, s, {"load_into_transformer_2": True}) for p, s in map(parse_lora_arg, args.lora_2)]
    for path, _, _ in loras:
        if not Path(path).is_file():
            raise UsageError(f"LoRA file not found: {path}")
    out = Path(args.out)
    if out.suffix.lower() not in (*IMAGE_SUFFIXES, *VIDEO_SUFFIXES):
        raise UsageError(f"--out {out}: write an image (.png, .jpg, .webp) or a video (.mp4, .gif, .webp)")
    if not Path(args.out_dir).is_dir():
        raise UsageError(f"no such export directory: {args.out_dir}")
    image, mask = read_inputs(args)
    pipe = load_pipeline(args.out_dir, backend=args.backend)
    video = is_video(pipe)
    if image is not None:
        pipe = for_task(pipe, task_of(args, video))
        image, mask = _size_from_image(args, pipe, image, mask)
    check_args(args, pipe)
    if out.suffix.lower() not in (VIDEO_SUFFIXES if video else IMAGE_SUFFIXES):
        raise UsageError(f"--out {out}: {pipe.manifest.family} makes "
                         + ("videos: write .mp4, .gif or .webp" if video else "images: write .png, .jpg or .webp"))
    if loras:
        names = []
        for path, _, options in loras:  # named as export names them: the file's stem (x, x_2, ...)
            taken = set(names) | {n for ns in pipe.get_list_adapters().values() for n in ns}
            name = unique_name(Path(path).stem, taken)
            pipe.load_lora_weights(path, adapter_name=name, **options)
            names.append(name)
        pipe.set_adapters(names, [s for _, s, _ in loras])
    kw = {k: v for k, v in (("height", args.height), ("width", args.width), ("guidance_scale", args.guidance),
                            ("negative_prompt", args.negative_prompt), ("num_frames", args.frames),
                            ("image", image), ("mask_image", mask), ("strength", args.strength)) if v is not None}
    params = inspect.signature(type(pipe).__call__).parameters
    for key, flag in (("strength", "--strength"), ("negative_prompt", "--negative-prompt")):
        if key in kw and key not in params:
            raise UsageError(f"{flag}: {type(pipe).__mro__[1].__name__} takes no {key.replace('_', ' ')}")
    result = pipe(prompt=args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
                  **({"output_type": "np"} if video else {}), **kw)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    try:
        if video:
            write_video(result.frames[0], tmp, args.fps, getattr(args, "_size", None))
        else:
            picture = result.images[0] if hasattr(result, "images") else result.frames[0][0]
            if getattr(args, "_size", None) and picture.size != args._size:  # back to the input image's size
                picture = picture.resize(args._size, Image.LANCZOS)
            picture.save(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _size_from_image(args, pipe, image, mask) -> tuple:
    """--height / --width default to the input image's size, down to a multiple of the VAE factor x the
    denoiser's grid; the inputs are resized to it (pipelines without a size argument work at the
    image's) and the output back to the image's size (`args._size`) where that rounds."""
    from PIL import Image

    from .pipeline import check_size, size_multiple

    factor = size_multiple(pipe)
    if args.height is None and args.width is None:
        w, h = image.size
        check_size(pipe, h, w, what=f"--image {args.image}: ")
        args.width, args.height = max(factor, w - w % factor), max(factor, h - h % factor)
        if (args.width, args.height) != image.size:
            log.info("working at %dx%d (multiples of %d), resized back to %dx%d", args.width, args.height, factor, w, h)
            args._size = image.size
    size = (args.width or image.size[0], args.height or image.size[1])
    resize = lambda im: im if im is None or im.size == size else im.resize(size, Image.LANCZOS)  # noqa: E731
    return resize(image), resize(mask)


def write_video(frames, path: Path, fps: float, size: tuple[int, int] | None = None) -> None:
    """Frames [F, H, W, 3] in 0..1 to .mp4 (diffusers' `export_to_video`: imageio's ffmpeg), or an animated
    .gif / .webp (Pillow), looping; `size` (width, height) resizes each frame."""
    import numpy as np
    from PIL import Image

    frames = np.asarray(frames)
    if size and frames.shape[2:0:-1] != size:
        frames = np.stack([np.asarray(Image.fromarray(np.round(f * 255).clip(0, 255).astype(np.uint8))
                                      .resize(size, Image.LANCZOS)) / 255.0 for f in frames])
    if path.suffix.lower() == ".mp4":
        try:
            import imageio  # noqa: F401
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise UsageError("writing .mp4 needs imageio and imageio-ffmpeg: pip install 'lora-engines[video]' "
                             "(or write .gif / .webp)") from None
        from diffusers.utils import export_to_video

        export_to_video(list(frames), str(path), fps=fps)
        return
    images = [Image.fromarray(np.round(f * 255).clip(0, 255).astype(np.uint8)) for f in frames]
    fmt = "GIF" if path.suffix.lower() == ".gif" else "WEBP"
    images[0].save(path, format=fmt, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   **({"lossless": True} if fmt == "WEBP" else {}))


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
