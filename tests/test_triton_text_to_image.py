"""The Triton text-to-image model: prompt in, picture out, LoRAs per request.

The server-independent core first (grouping, batching, errors), then a real tritonserver
(PyPI nvidia-pytriton, CPU, loopback): 100 requests from 4 threads with interleaved `loras`,
each image equal to the local engine pipeline's for the same inputs; bad requests (unknown
adapter, steps out of range, empty prompt) get their own errors and later requests succeed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import save_file

import engines
import export
from engines.triton.requests import LoraRequestError
from engines.triton.text_to_image import TextToImageSwitcher, to_uint8
from export.tiny import build_tiny
from lora_files import peft_lora
from triton_helpers import close_uint8, from_threads, grpc_inputs, request_values, start_generating_server

SETS = {"{}": (), '{"x": 1}': (("x", 1.0),), '{"y": 0.5}': (("y", 0.5),),
        '{"x": 1, "y": 0.5}': (("x", 1.0), ("y", 0.5)), None: (("x", 1.0),)}
STEPS, SIZE = 2, 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    models = {c: m for c, m in build_tiny("sd", ["unet", "text_encoder"]).items()}
    files = {}
    for name, seed in (("x", 1), ("y", 2)):
        files[name] = root / f"{name}.safetensors"
        save_file(peft_lora(models, seed=seed), str(files[name]))
    out = root / "out"
    export.export_pipeline("sd", "tiny", [(str(files["x"]), 1.0)], out, progress=False)
    lora_dir = root / "loras"
    lora_dir.mkdir()
    for n, p in files.items():
        (lora_dir / f"{n}.safetensors").write_bytes(p.read_bytes())
    # references: one local engine pipeline, refitted per adapter set
    pipe = engines.load_pipeline(out)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(files["y"]), adapter_name="y")
    refs = {}
    import torch

    for key in set(SETS.values()):
        pipe.set_adapters([n for n, _ in key], [w for _, w in key])
        for seed in (0, 1, 2):
            img = pipe("a red cube", num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np",
                       generator=torch.Generator().manual_seed(seed)).images[0]
            refs[(key, seed)] = to_uint8(img)
    return dict(root=root, out=out, files=files, lora_dir=lora_dir, refs=refs)


def _values(seed, prompt="a red cube", **kw):
    return request_values(seed, prompt, **{"steps": STEPS, "height": SIZE, "width": SIZE, **kw})


_close = close_uint8


def test_switcher_groups_batches_and_keeps_errors_apart(setup):
    pipe = engines.load_pipeline(setup["out"], lora_dir=setup["lora_dir"])
    pipe.set_progress_bar_config(disable=True)
    sw = TextToImageSwitcher(pipe, setup["lora_dir"], {"max_steps": 4})
    assert sw.current == (("x", 1.0),)  # the export's baked x, no refit
    items = [(_values(i % 3), list(SETS)[i % len(SETS)]) for i in range(10)]
    items += [(_values(0, prompt="  "), None), (_values(0, steps=9), None), (_values(0), '{"nope": 1}'),
              (_values(0, height=33), "{}")]
    res = sw.run(items)
    for (values, loras), r in zip(items[:10], res[:10]):
        img, key = r
        assert key == SETS[loras] and _close(img, setup["refs"][(key, int(values["seed"][0]))])
    assert [type(r) for r in res[10:]] == [LoraRequestError] * 4
    assert [w in str(r) for w, r in zip(("empty", "steps", "nope", "height"), res[10:])] == [True] * 4
    assert sw.refits <= len(SETS)  # one refit per adapter set that differed


def test_a_new_adapter_set_refits_each_component_once(setup):
    """A request whose adapters differ from what the engines hold: one refit of each component (its
    engine's weights written once), the new file read once; the same set again: none."""
    pipe = engines.load_pipeline(setup["out"], lora_dir=setup["lora_dir"])
    pipe.set_progress_bar_config(disable=True)
    sw = TextToImageSwitcher(pipe, setup["lora_dir"], {"max_steps": 4})
    writes = {c: 0 for c in pipe.refitter.components}
    for c, engine in pipe.refitter.engines.items():
        def counted(real=engine.writable_weights, c=c):
            writes[c] += 1
            return real()
        engine.writable_weights = counted
    assert set(writes) == {"unet", "text_encoder"}
    (img, key), = sw.run([(_values(1), '{"y": 0.5}')])
    assert key == (("y", 0.5),) and writes == {"unet": 1, "text_encoder": 1}
    assert _close(img, setup["refs"][(key, 1)])
    sw.run([(_values(2), '{"y": 0.5}'), (_values(0), '{"y": 0.5}')])
    assert writes == {"unet": 1, "text_encoder": 1}
    (img, key), = sw.run([(_values(0), "{}")])
    assert writes == {"unet": 2, "text_encoder": 2} and _close(img, setup["refs"][((), 0)])


def test_real_tritonserver_serves_pictures_with_per_request_loras(setup):
    # the VAE: a plain model
    grpc, InferenceServerException, server, written = start_generating_server(setup, ["text_to_image", "vae_decoder"])
    assert "text_to_image" in written

    def infer(client, values, loras):
        ins = grpc_inputs(grpc, values)
        params = {} if loras is None else {"loras": loras}
        result = client.infer("text_to_image", ins, parameters=params, client_timeout=300)
        applied = json.loads(result.as_numpy("applied_loras").reshape(-1)[0])
        assert loras not in SETS or applied == dict(SETS[loras]), (loras, applied)  # what it ran with
        return result.as_numpy("image")[0]

    try:
        def request(client, t, i):
            loras, seed = list(SETS)[(i + t) % len(SETS)], (i * 7 + t) % 3
            return loras, seed, infer(client, _values(seed), loras)

        results, errors = from_threads(grpc, server.grpc_url, 4, 25, request)
        assert not errors, errors[:3]
        assert len(results) == 100 and {r[0] for r in results} == set(SETS)
        for loras, seed, img in results:
            assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
            assert _close(img, setup["refs"][(SETS[loras], seed)]), (loras, seed)
        client = grpc.InferenceServerClient(server.grpc_url)
        for values, loras, says in [(_values(0), '{"nope": 1}', "nope"), (_values(0, steps=5), None, "steps"),
                                    (_values(0, prompt=""), None, "empty")]:
            with pytest.raises(InferenceServerException, match=says):
                infer(client, values, loras)
            assert _close(infer(client, _values(1), '{"y": 0.5}'), setup["refs"][((("y", 0.5),), 1)])
        client.close()
    finally:
        server.stop()
