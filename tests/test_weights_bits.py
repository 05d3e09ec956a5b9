"""One machine, one definition: the effective weights' bits do not depend on the instruction set
(AVX-512 or AVX2), the thread count or the row-block size, nor on who computes them (the mixins'
fuse, the export, a refit).

The tiny SD UNet in float16 with a LoRA over its attention and feed-forward Linears (with a block
of 1024 elements every weight is split into several row blocks) is computed three ways under two
configurations: native ISA, 1 thread, the default blocks; AVX2, 2 threads, 1024-element blocks.
"""

from __future__ import annotations

import pytest
import torch

import engines
import lora_loaders as L
import refit
from export.tiny import build_tiny
from lora_loaders import kernels, weights
from refit_helpers import differing, export_dir, initializers, lora_files

CONFIGS = [("native", 1, weights.BLOCK_ELEMENTS), ("avx2", 2, 1024)]  # isa, threads, block elements


def _fused(lora) -> dict:
    """The mixins' fuse: diffusers' API over the tiny float16 UNet."""
    unet = build_tiny("sd", ["unet"], dtype=torch.float16)["unet"]
    loader = L.loader_for("sd", unet=unet)
    loader.load_lora_weights(str(lora), adapter_name="x")
    loader.fuse_lora()
    return dict(unet.named_parameters())


def _three_ways(tmp, lora) -> dict[str, dict]:
    """{consumer: {initializer: array}}: fuse, export with x baked, refit of a base export to x."""
    baked = export_dir("sd", ["unet"], [(lora, 1.0)], tmp / "x", dtype="fp16") / "unet"
    base = export_dir("sd", ["unet"], [], tmp / "base", dtype="fp16") / "unet"
    wm = engines.WeightsMap.load(baked)
    export = initializers(baked / "model.onnx", wm.initializers())
    engine = engines.load_engine(base)
    refit.Refitter(engine).load_lora(str(lora), adapter_name="x")
    params = _fused(lora)
    fuse = {e.initializer: e.to_onnx(params[p].detach()).numpy() for p, e in wm.entries.items()}
    return {"export": export, "refit": engine.get_weights(), "fuse": {k: fuse[k] for k in export}}


def test_same_bits_whatever_isa_threads_blocks_or_consumer(tmp_path):
    lora = lora_files(tmp_path, "sd")["x"]
    results = []
    threads = torch.get_num_threads()
    for isa, n, block in CONFIGS:
        try:
            kernels.set_backend("c", isa=isa)
        except RuntimeError as e:
            pytest.skip(f"C kernels unavailable here: {e}")
        old_block, weights.BLOCK_ELEMENTS = weights.BLOCK_ELEMENTS, block
        try:
            torch.set_num_threads(n)
            assert len(weights.row_blocks((64, 32))) == (2 if block == 1024 else 1)
            results.append(_three_ways(tmp_path / f"{isa}_{n}_{block}", lora))
        finally:
            torch.set_num_threads(threads)
            weights.BLOCK_ELEMENTS = old_block
            kernels._LIB_TRIED, kernels._LIB = False, None
    first = results[0]["export"]
    wm_names = list(first)
    assert wm_names
    base = initializers(tmp_path / f"native_1_{weights.BLOCK_ELEMENTS}" / "base" / "unet" / "model.onnx", wm_names)
    assert differing(first, base), "the LoRA changed no weight: the comparison would be empty"
    for (isa, n, block), got in zip(CONFIGS, results):
        for consumer, arrays in got.items():
            bad = differing(arrays, first, wm_names)
            assert not bad, f"{consumer} under {isa}, {n} threads, blocks of {block}: {len(bad)} differ, e.g. {bad[:3]}"
