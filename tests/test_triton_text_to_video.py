"""The Triton text-to-video model over Wan 2.2 (both denoisers): prompt in, video out, `loras` and
`loras_2` (the second denoiser's adapters) per request, each response the local engine pipeline's
video for the same inputs; per-request errors. The server-independent core, then a real
tritonserver (PyPI nvidia-pytriton, CPU, loopback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import engines
import export
from engines.triton import write_repository
from engines.triton.requests import LoraRequestError, PerDenoiser
from engines.triton.text_to_image import TextToImageSwitcher, to_uint8
from export.tiny import build_tiny
from lora_files import peft_lora
from triton_helpers import close_uint8, from_threads, grpc_inputs, request_values

STEPS, SIZE, FRAMES = 2, 32, 5
# request parameters -> the adapter set they ask for
SETS = {(None, None): (("x", 1.0),), ("{}", None): (), ('{"y": 0.5}', None): (("y", 0.5),),
        ('{"y": 0.8}', '{"y": 0.5}'): (("y", 0.8), ("y@transformer_2", 0.5)),
        ("{}", '{"y": 1}'): (("y@transformer_2", 1.0),)}


def _loras(params):
    first, second = params
    return first if second is None else PerDenoiser(first, second)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2v")
    models = build_tiny("wan", ["transformer"])
    files = {}
    for name, seed in (("x", 1), ("y", 2)):
        files[name] = root / f"{name}.safetensors"
        save_file(peft_lora(models, seed=seed), str(files[name]))
    out = root / "out"
    export.export_pipeline("wan", "tiny", [(str(files["x"]), 1.0)], out, progress=False)
    lora_dir = root / "loras"
    lora_dir.mkdir()
    for n, p in files.items():
        (lora_dir / f"{n}.safetensors").write_bytes(p.read_bytes())
    pipe = engines.load_pipeline(out)  # the references: one local engine pipeline, refitted per adapter set
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(files["y"]), adapter_name="y")
    pipe.load_lora_weights(str(files["y"]), adapter_name="y@transformer_2", load_into_transformer_2=True)
    refs = {}
    for key in SETS.values():
        pipe.set_adapters([n for n, _ in key], [w for _, w in key])
        for seed in (0, 1):
            video = pipe("a red cube", num_inference_steps=STEPS, height=SIZE, width=SIZE, num_frames=FRAMES,
                         output_type="np", generator=torch.Generator().manual_seed(seed)).frames[0]
            refs[(key, seed)] = to_uint8(video)
    assert len({v.tobytes() for v in refs.values()}) == len(refs)  # every set and seed makes another video
    return dict(root=root, out=out, files=files, lora_dir=lora_dir, refs=refs)


def _values(seed, prompt="a red cube", **kw):
    return request_values(seed, prompt, **{"steps": STEPS, "height": SIZE, "width": SIZE, "frames": FRAMES, **kw})


_close = close_uint8


def test_switcher_serves_videos_with_adapters_per_denoiser(setup):
    pipe = engines.load_pipeline(setup["out"], lora_dir=setup["lora_dir"])
    pipe.set_progress_bar_config(disable=True)
    sw = TextToImageSwitcher(pipe, setup["lora_dir"], {"max_steps": 4})
    assert sw.video and sw.limits["max_frames"] == 121  # 31 latent frames x 4 + 1
    items = [(_values(i % 2), _loras(list(SETS)[i % len(SETS)])) for i in range(8)]
    items += [(_values(0, frames=200), None), (_values(0), PerDenoiser(None, '{"nope": 1}')),
              (_values(0), PerDenoiser("{}", "[1]"))]
    res = sw.run(items)
    for (values, loras), r in zip(items[:8], res[:8]):
        vid, key = r
        params = (loras.first, loras.second) if isinstance(loras, PerDenoiser) else (loras, None)
        assert key == tuple(sorted(SETS[params]))
        assert vid.shape == (FRAMES, SIZE, SIZE, 3) and _close(vid, setup["refs"][(SETS[params], int(values["seed"][0]))])
    assert [type(r) for r in res[8:]] == [LoraRequestError] * 3
    assert [w in str(r) for w, r in zip(("frames", "nope", "JSON object"), res[8:])] == [True] * 3


def test_real_tritonserver_serves_videos_with_interleaved_adapters(setup):
    from engines.triton.server import TritonServer, pytriton_available

    ok, why = pytriton_available()
    if not ok:
        pytest.skip(f"no tritonserver to run: {why}")
    grpc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    repo = setup["root"] / "repo"
    written = write_repository(setup["out"], repo, loras=[setup["files"]["y"]], text_encoder_backend="python",
                               limits={"max_steps": 4})  # what `--triton-repo` writes
    assert "text_to_video" in written and "text_to_image" not in written
    server = TritonServer(repo, models=["text_to_video"], start_timeout=300)
    server.start()

    def infer(client, values, params):
        ins = grpc_inputs(grpc, values)
        sent = {k: v for k, v in zip(("loras", "loras_2"), params) if v is not None}
        result = client.infer("text_to_video", ins, parameters=sent, client_timeout=300)
        applied = json.loads(result.as_numpy("applied_loras").reshape(-1)[0])
        assert applied == dict(SETS[params]), (params, applied)  # what it ran with
        return result.as_numpy("video")[0]

    try:
        def request(client, t, i):
            params, seed = list(SETS)[(i + t) % len(SETS)], (i + t) % 2
            return params, seed, infer(client, _values(seed), params)

        results, errors = from_threads(grpc, server.grpc_url, 2, 5, request)
        assert not errors, errors[:3]
        assert len(results) == 10 and {r[0] for r in results} == set(SETS)
        for params, seed, vid in results:
            assert vid.shape == (FRAMES, SIZE, SIZE, 3) and vid.dtype == np.uint8
            assert _close(vid, setup["refs"][(SETS[params], seed)]), (params, seed)
        client = grpc.InferenceServerClient(server.grpc_url)
        for values, params, says in [(_values(0), ('{"nope": 1}', None), "nope"),
                                     (_values(0, frames=999), (None, None), "frames")]:
            with pytest.raises(InferenceServerException, match=says):
                infer(client, values, params)
        assert _close(infer(client, _values(1), ('{"y": 0.8}', '{"y": 0.5}')),
                      setup["refs"][(SETS[('{"y": 0.8}', '{"y": 0.5}')], 1)])
        client.close()
    finally:
        server.stop()
