"""Image-conditioned requests to the Triton text-to-image model: `image` (image-to-image) and `image` +
`mask` (inpainting), with `strength`, interleaved with text-to-image requests and adapter sets; each
answer equals the local engine pipeline of that task (`engines.for_task`) with the same adapters, and a
bad image or mask gets its own error. The switcher first, then a real tritonserver (loopback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import engines
from engines.triton.requests import LoraRequestError
from engines.triton.text_to_image import TextToImageSwitcher, to_uint8
from task_reference import export_task, input_image, input_mask
from triton_helpers import close_uint8, from_threads, grpc_inputs, request_values, start_generating_server

STEPS = 2
IMAGE = np.asarray(input_image())  # 32 x 40
MASK = np.asarray(input_mask())
SETS = {"{}": (), '{"x": 1}': (("x", 1.0),), '{"y": 0.5}': (("y", 0.5),)}
KINDS = {"text": {}, "image": {"image": IMAGE, "strength": 0.6}, "inpaint": {"image": IMAGE, "mask": MASK}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_tasks")
    out, files = export_task("sd", root, ["image-to-image", "inpainting"])
    lora_dir = root / "loras"
    lora_dir.mkdir()
    for n, p in files.items():
        (lora_dir / f"{n}.safetensors").write_bytes(p.read_bytes())
    pipe = engines.load_pipeline(out)
    pipe.load_lora_weights(str(files["y"]), adapter_name="y")
    pipes = {"text": pipe, "image": engines.for_task(pipe, "image-to-image"),
             "inpaint": engines.for_task(pipe, "inpainting")}
    refs = {}
    for key in set(SETS.values()):
        pipe.set_adapters([n for n, _ in key], [w for _, w in key])
        for kind, p in pipes.items():
            p.set_progress_bar_config(disable=True)
            kw = {"image": _pil(IMAGE)} if "image" in KINDS[kind] else {}
            if kind == "inpaint":
                kw["mask_image"] = _pil(MASK)
            if kind == "image":
                kw["strength"] = 0.6
            for seed in (0, 1):
                img = p("a red cube", num_inference_steps=STEPS, height=32, width=40, output_type="np",
                        generator=torch.Generator().manual_seed(seed), **kw).images[0]
                refs[(key, kind, seed)] = to_uint8(img)
    return dict(root=root, out=out, files=files, lora_dir=lora_dir, refs=refs)


def _pil(a):
    from PIL import Image

    return Image.fromarray(a)


def _values(kind: str, seed: int, **kw) -> dict:
    values = request_values(seed, steps=STEPS, **({} if "image" in KINDS[kind] else {"height": 32, "width": 40}))
    for k, v in {**KINDS[kind], **kw}.items():
        values[k] = np.asarray(v) if k in ("image", "mask") else np.array([v], dtype=np.float32)
    return values


def test_switcher_runs_each_task_with_the_requests_adapters(setup):
    pipe = engines.load_pipeline(setup["out"], lora_dir=setup["lora_dir"])
    pipe.set_progress_bar_config(disable=True)
    sw = TextToImageSwitcher(pipe, setup["lora_dir"], {"max_steps": 4})
    items = [(_values(kind, i % 2), loras) for i, (kind, loras) in
             enumerate((k, s) for s in SETS for k in KINDS)]
    bad = [(_values("inpaint", 0, mask=MASK[:, :32]), None),  # another size than the image
           (_values("image", 0, strength=1.5), None), (_values("image", 0, image=IMAGE[:30]), None),
           (_values("image", 0, image=IMAGE.astype(np.float32)), None), (_values("text", 0, mask=MASK), None)]
    res = sw.run(items + bad)
    for (values, loras), r in zip(items, res):
        img, key = r
        kind = next(k for k in KINDS if ("mask" in values) == ("mask" in KINDS[k])
                    and ("image" in values) == ("image" in KINDS[k]))
        assert key == SETS[loras]
        assert close_uint8(img, setup["refs"][(key, kind, int(values["seed"][0]))]), (kind, loras)
    errors = res[len(items):]
    assert all(isinstance(e, LoraRequestError) for e in errors), errors
    for says, e in zip(("the mask must have the image's size", "strength must be in (0, 1]", "multiple of 4",
                        "UINT8", "mask needs an image"), errors):
        assert says in str(e), (says, e)
    with pytest.raises(LoraRequestError, match="image-to-video"):
        sw.pipeline("image-to-video")


def test_real_tritonserver_serves_image_requests_with_per_request_loras(setup):
    grpc, InferenceServerException, server, written = start_generating_server(setup, ["text_to_image"])
    cfg = (setup["root"] / "repo" / "text_to_image" / "config.pbtxt").read_text()
    assert '"image"' in cfg and '"mask"' in cfg and '"strength"' in cfg

    def infer(client, values, loras):
        params = {} if loras is None else {"loras": loras}
        result = client.infer("text_to_image", grpc_inputs(grpc, values), parameters=params, client_timeout=300)
        assert json.loads(result.as_numpy("applied_loras").reshape(-1)[0]) == dict(SETS[loras])
        return result.as_numpy("image")[0]

    try:
        def request(client, t, i):
            loras, kind, seed = list(SETS)[(i + t) % 3], list(KINDS)[(i * 2 + t) % 3], (i + t) % 2
            return loras, kind, seed, infer(client, _values(kind, seed), loras)

        results, errors = from_threads(grpc, server.grpc_url, 3, 6, request)
        assert not errors, errors[:3]
        assert {(r[0], r[1]) for r in results} == {(s, k) for s in SETS for k in KINDS}
        for loras, kind, seed, img in results:
            assert img.shape == (32, 40, 3) and close_uint8(img, setup["refs"][(SETS[loras], kind, seed)]), \
                (loras, kind, seed)
        client = grpc.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException, match="the mask must have the image's size"):
            infer(client, _values("inpaint", 0, mask=MASK[:, :32]), "{}")
        assert close_uint8(infer(client, _values("inpaint", 1), '{"y": 0.5}'),
                           setup["refs"][((("y", 0.5),), "inpaint", 1)])
        client.close()
    finally:
        server.stop()
