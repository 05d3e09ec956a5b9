"""fp16 export of the real SDXL UNet config (random weights) with a LoRA baked: time and peak RSS.

    python bench/bench_export.py [--config sdxl|sd15|tiny_sdxl] [--dtype fp16] [--rank 16] [--no-lora] [--out DIR] [--json FILE]

The UNet is built on the meta device and materialized in fp16 (never in fp32), handed to
`export.export_pipeline` as a factory so the pipeline frees it after export. Reports wall
time, peak resident memory (ru_maxrss of this process) against the exported weights'
bytes (target: at most 1.5x), and the ONNX Runtime validation error. Heavy: about 5 GB of
weights; run it alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from real_models import CONFIGS, real_unet  # noqa: E402

FAMILY = {"sdxl": "sdxl", "sd15": "sd", "tiny_sdxl": "sdxl"}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_lora(unet, rank: int, path: Path, seed: int = 0) -> int:
    """A diffusers/PEFT LoRA on every attention projection of the UNet (fp16 factors)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or \
                name.endswith("to_out.0"):
            sd[f"unet.{name}.lora_A.weight"] = (torch.randn(rank, m.in_features, generator=g) * 0.01).half()
            sd[f"unet.{name}.lora_B.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.01).half()
    save_file(sd, str(path))
    return len(sd) // 2


@torch.no_grad()
def realistic_unet(config: str, dtype) -> torch.nn.Module:
    """`real_unet` re-initialised like a trained net's scale: Linear/Conv ~ N(0, 1/fan_in), norms 1/0.

    (std 0.02 everywhere would shrink activations into fp16 subnormals and make the fp16
    comparison meaningless.)
    """
    unet = real_unet(config, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    for m in unet.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = m.weight[0].numel()
            m.weight.normal_(0, fan_in ** -0.5, generator=g)
            if m.bias is not None:
                m.bias.normal_(0, 0.02, generator=g)
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if m.weight is not None:
                m.weight.fill_(1)
            if m.bias is not None:
                m.bias.zero_()
    return unet


def run(dtype: str = "fp16", rank: int = 16, lora: bool = True, out: Path | None = None, keep: bool = False,
        config: str = "sdxl", external_data: bool | None = None) -> dict:
    import export

    work = Path(tempfile.mkdtemp(prefix="bench_export_"))
    out = out or work / "sdxl"
    loras = []
    n_modules = 0
    if lora:
        # Module names only: build on meta, no weights.
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            meta = UNet2DConditionModel(**CONFIGS[config])
        n_modules = make_lora(meta, rank, work / "lora.safetensors")
        del meta
        loras = [(work / "lora.safetensors", 0.8)]
    rss0 = peak_rss_bytes()
    t0 = time.perf_counter()
    manifest = export.export_pipeline(
        FAMILY[config], model=lambda component, dt: realistic_unet(config, dt), loras=loras, out_dir=out,
        dtype=dtype, components=["unet"], progress=True, external_data=external_data,
    )
    wall = time.perf_counter() - t0
    entry = manifest["components"]["unet"]
    weights = entry["initializer_bytes"]
    peak = peak_rss_bytes()
    from lora_loaders import kernels

    result = {
        "host": kernels.describe_host(),
        "config": config, "dtype": dtype, "wall_s": round(wall, 1), "peak_rss_gb": round(peak / 1e9, 2),
        "rss_before_gb": round(rss0 / 1e9, 2), "weights_gb": round(weights / 1e9, 2),
        "peak_over_weights": round(peak / weights, 2), "lora_modules": n_modules, "lora_rank": rank if lora else 0,
        "baked_params": len(entry["baked_params"]), "mapped_initializers": entry["mapped_initializers"],
        "external_data": entry["external_data"], "validation": entry["validation"]["outputs"],
        "validation_passed": entry["validation"]["passed"],
        "model_files_gb": round(sum(p.stat().st_size for p in (out / "unet").iterdir()) / 1e9, 2),
    }
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="sdxl", choices=sorted(FAMILY))
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--no-lora", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="keep the export here")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument("--external-data", action="store_true", help="force model.onnx.data (else only past 2 GB)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("torch.onnx", "onnx_ir", "onnxscript", "diffusers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run(args.dtype, args.rank, not args.no_lora, args.out, keep=args.out is not None, config=args.config,
                 external_data=True if args.external_data else None)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if result["validation_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
