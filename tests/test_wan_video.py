"""Prompt to video over Wan 2.2's engines (one tiny export, x baked, for the module):

- the Triton text-to-video model: prompt in, video out, `loras` and `loras_2` (the second denoiser's
  adapters) per request, each response the local engine pipeline's video for the same inputs;
  per-request errors; the server-independent core, then a real tritonserver (PyPI nvidia-pytriton,
  CPU, loopback);
- the causal VAE's chunk decoder against `vae.decode`, its graphs' caches and TensorRT profiles;
- per-denoiser adapters (`load_into_transformer_2`, `--lora-2`) against diffusers';
- `python -m engines.generate --frames` writing MP4 / GIF and its errors.

(Every family's pipeline against diffusers', baked and refitted, at two frame counts, and its VAE over
several chunks: tests/test_family_exports*.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import engines
import export
from engines.triton.requests import LoraRequestError, PerDenoiser
from engines.triton.text_to_image import TextToImageSwitcher, to_uint8
from export.tiny import build_tiny
from lora_files import peft_lora
from pipeline_reference import reference_pipeline
from triton_helpers import close_uint8, from_threads, grpc_inputs, request_values, start_generating_server

ROOT = Path(__file__).resolve().parents[1]
STEPS, SIZE, FRAMES = 2, 32, 5
CALL = dict(num_inference_steps=2, guidance_scale=4.0, height=32, width=32, output_type="np")
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
    # ORT vs PyTorch is validated by the family's export test (test_family_exports_more.py)
    export.export_pipeline("wan", "tiny", [(str(files["x"]), 1.0)], out, progress=False, validate=False)
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
    grpc, InferenceServerException, server, written = start_generating_server(setup, ["text_to_video"])
    assert "text_to_video" in written and "text_to_image" not in written

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


# -- the engine pipeline, its VAE and the CLI ----------------------------------------------------------


def video(pipe, frames: int, seed: int = 0) -> np.ndarray:
    return pipe("a red cube", num_frames=frames, generator=torch.Generator().manual_seed(seed), **CALL).frames[0]


@pytest.fixture(scope="module")
def exported(setup):
    pipe = engines.load_pipeline(setup["out"])
    pipe.set_progress_bar_config(disable=True)
    return "wan", setup["out"], setup["files"], pipe


def test_chunk_decoder_equals_vae_decode(exported):
    family, out, _, pipe = exported
    vae = build_tiny(family, ["vae_decoder"])["vae_decoder"]
    z = torch.randn(2, vae.config.z_dim, 4, 6, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = vae.decode(z).sample
    got = pipe.vae.decode(z).sample  # the first chunk, then three runs of the next-chunk graph
    assert got.shape == ref.shape == (2, 3, 13, 48, 80)
    assert float((got - ref).abs().max()) <= 1e-4
    pipe.vae.enable_slicing()  # one sample at a time: the same pixels
    from engines.pipeline import PipelineError

    with pytest.raises(PipelineError, match="tiling is not supported"):
        pipe.vae.enable_tiling()  # tiles would change them


def test_chunk_graphs_carry_caches_and_tensorrt_profiles_scale_them(exported):
    """Each later chunk takes the caches the run before left (outputs `<input>_out`), at the latent size
    times each convolution's scale: the manifest names them `height*2`..., TensorRT profiles scale the axis."""
    from export.tensorrt import profiles_for
    from lora_loaders.families.spec import parse_dim

    _, out, _, _ = exported
    manifest = engines.Manifest.read(out)
    first, later = manifest.components["vae_decoder"], manifest.components["vae_decoder_next"]
    caches = [i["name"] for i in later["inputs"][1:]]
    assert later["inputs"][0]["name"] == "latent_sample" and caches == [f"cache_{i}" for i in range(len(caches))]
    assert len(caches) > 10  # one per causal convolution
    outs = ["sample", *(f"{c}_out" for c in caches)]
    assert [o["name"] for o in later["outputs"]] == outs == [o["name"] for o in first["outputs"]]
    scaled = {d for i in later["inputs"] for d in i["shape"] if isinstance(d, str) and "*" in d}
    assert {"height*2", "height*4", "height*8", "width*8"} <= scaled
    profiles = profiles_for(later, manifest.axes)
    for i in later["inputs"]:
        for k, shape in zip(("min", "opt", "max"), profiles[i["name"]]):
            for d, n in zip(i["shape"], shape):
                if isinstance(d, str):
                    axis, factor = parse_dim(d)
                    assert n == manifest.axes[axis][k] * factor


def test_wan22_adapters_per_denoiser(exported, tmp_path):
    """Wan 2.2's lightning-style use: one file at 0.8 on the high-noise denoiser and at 0.5 on the low-noise
    one (`load_into_transformer_2`), as diffusers does it; the reference's transformer_2 sees the file too."""
    family, out, files, pipe = exported
    pipe.load_lora_weights(str(files["y"]), adapter_name="hi")
    pipe.load_lora_weights(str(files["y"]), adapter_name="lo", load_into_transformer_2=True)
    pipe.set_adapters(["hi", "lo"], [0.8, 0.5])
    assert pipe.get_list_adapters() == {"transformer": ["x", "hi"], "transformer_2": ["lo"]}
    ref = reference_pipeline(family, out)
    ref.load_lora_weights(str(files["y"]), adapter_name="hi")
    ref.load_lora_weights(str(files["y"]), adapter_name="lo", load_into_transformer_2=True)
    ref.set_adapters(["hi", "lo"], [0.8, 0.5])
    np.testing.assert_allclose(video(pipe, 5, 2), video(ref, 5, 2), atol=1e-3, rtol=0)
    base = video(reference_pipeline(family, out), 5, 2)
    assert np.abs(video(pipe, 5, 2) - base).max() > 1e-2  # the adapters change the video
    pipe.delete_adapters(["hi", "lo"])

    # the CLI: --lora for the first denoiser, --lora-2 for the second, an MP4 of the asked frames and size
    mp4 = tmp_path / "v.mp4"
    r = subprocess.run([sys.executable, "-m", "engines.generate", str(out), "--prompt", "a red cube", "--steps", "2",
                        "--seed", "2", "--height", "32", "--width", "32", "--frames", "5", "--guidance", "4",
                        "--lora", f"{files['y']}:0.8", "--lora-2", f"{files['y']}:0.5", "--out", str(mp4)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    import imageio.v3 as iio

    frames = iio.imread(mp4)
    assert frames.shape == (5, 32, 32, 3)
    ref_u8 = (video(ref, 5, 2) * 255).astype(np.uint8)  # export_to_video's conversion; H.264 is lossy
    assert np.abs(frames.astype(int) - ref_u8.astype(int)).mean() < 12


def test_generate_writes_gif_and_rejects_bad_video_arguments(exported, tmp_path):
    family, out, _, _ = exported
    base = [sys.executable, "-m", "engines.generate", str(out), "--prompt", "a red cube", "--steps", "1",
            "--height", "32", "--width", "32"]
    gif = tmp_path / "v.gif"
    r = subprocess.run([*base, "--frames", "9", "--out", str(gif)], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == 9 and im.size == (32, 32)
    for extra, message in ((["--frames", "500", "--out", str(tmp_path / "a.mp4")], "--frames must be between 1 and"),
                           (["--out", str(tmp_path / "a.png")], "makes videos: write .mp4, .gif or .webp"),
                           (["--fps", "0", "--out", str(tmp_path / "a.mp4")], "--fps must be a positive number")):
        r = subprocess.run([*base, *extra], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and message in r.stderr
        assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif"]  # nothing half-written
