"""The Triton text-to-image model over the families that make pictures since their VAE decoders
are exported (HiDream, Z-Image, aMUSEd, Qwen-Image): two requests batched together, each the
local engine pipeline's picture for its own prompt and seed (aMUSEd's pipeline takes one generator:
one call per request; the server-independent core; the real
tritonserver run is tests/test_triton_text_to_image.py's, for SD)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engines
import export
from engines.triton.text_to_image import TextToImageSwitcher, to_uint8


@pytest.mark.parametrize("family", ["hidream", "z-image", "amused", "qwen-image"])
def test_requests_batched_together_make_the_local_pictures(family, tmp_path):
    out = tmp_path / "out"
    export.export_pipeline(family, "tiny", [], out, progress=False)
    pipe = engines.load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    sw = TextToImageSwitcher(pipe, tmp_path, {"max_steps": 4})
    requests = [("a red cube", 1), ("a blue ball", 2)]
    items = [({"prompt": np.array([p.encode()], dtype=object), "negative_prompt": np.array([b"blur"], dtype=object),
               "seed": np.array([s]), "steps": np.array([2]), "height": np.array([32]), "width": np.array([32])}, "{}")
             for p, s in requests]
    results = sw.run(items)
    for (prompt, seed), (img, key) in zip(requests, results):
        ref = pipe(prompt, negative_prompt="blur", num_inference_steps=2, height=32, width=32, output_type="np",
                   generator=torch.Generator().manual_seed(seed)).images[0]
        assert key == () and img.shape == to_uint8(ref).shape
        assert int(np.abs(img.astype(int) - to_uint8(ref).astype(int)).max()) <= 1, family
