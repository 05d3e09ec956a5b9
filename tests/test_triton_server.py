"""End to end: a real tritonserver (PyPI nvidia-pytriton, CPU) serving a tiny SDXL export
and, beside it, a tiny Wan transformer (a transformer family: 5-D latents, text axis).

Per-request `loras` from several client threads, every answer equal to the local engine
refitted to the same adapters; bad requests get errors and the server keeps serving.
The server listens on 127.0.0.1 only, on free ports, and is stopped by the test.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

from engines.triton.server import TritonServer, pytriton_available

ok, why = pytriton_available()
if not ok:
    pytest.skip(f"no tritonserver to run: {why}", allow_module_level=True)
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

import engines  # noqa: E402
import refit  # noqa: E402
from engines.triton import write_repository  # noqa: E402
from refit_helpers import exported, inputs_for, lora_files  # noqa: E402

SETS = {  # request `loras` value -> the adapters the reference engine gets
    "{}": (),
    '{"x": 1}': (("x", 1.0),),
    '{"y": 0.5}': (("y", 0.5),),
    '{"x": 1, "y": 0.5}': (("x", 1.0), ("y", 0.5)),
    None: (("x", 1.0),),  # absent: what the export baked (x at 1.0)
}
BAD = ['{"../x": 1}', '{"loras/x": 1}', '{"..\\\\x": 1}', '{"escape": 1}', '{"outside": 1}', '{"nope": 1}', "{x: 1}",
       "not json", '{"x": NaN}', '{"x": Infinity}', '{"x": "1"}', "[1]"]
THREADS, PER_THREAD, SEEDS = 4, 55, 3
RTOL = ATOL = 1e-5
DEADLINE_S = 600


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton_server")
    loras = lora_files(root, "sdxl")
    export = exported(root, "sdxl", "x")  # unet + both text encoders, x baked at 1.0
    repo = root / "repo"
    write_repository(export, repo, text_encoder_backend="python", loras=[loras["y"]], max_batch_size=8,
                     intra_op_threads=1, log_batches=True)
    lora_dir = repo / "unet" / "loras"
    shutil.copy(loras["y"], root / "outside.safetensors")  # outside the adapter directory
    os.symlink(root / "outside.safetensors", lora_dir / "escape.safetensors")

    # local references: the same export, refitted here
    unet = export / "unet"
    eng = engines.load_engine(unet)
    feeds = [inputs_for(eng, seed=s) for s in range(SEEDS)]
    r = refit.Refitter(eng)  # x: baked, registered from the manifest
    r.load_lora(str(loras["y"]), adapter_name="y")
    refs = {}
    for key in set(SETS.values()):
        r.set_adapters([n for n, _ in key], [w for _, w in key])
        refs[key] = [eng.infer(f)["out_sample"] for f in feeds]
    eng.close()
    te = {c: engines.load_engine(export / c) for c in ("text_encoder", "text_encoder_2")}
    ids = inputs_for(te["text_encoder"], seed=5)
    te_refs = {c: e.infer(ids) for c, e in te.items()}

    # a transformer family in the same server: Wan's denoiser, model "wan_transformer"
    wan_loras = lora_files(root, "wan")
    wan = exported(root, "wan", "x", components=["transformer"])
    wan_repo = root / "wan_repo"
    write_repository(wan, wan_repo, components=["transformer"], prefix="wan_", loras=[wan_loras["y"]],
                     intra_op_threads=1)
    shutil.copytree(wan_repo / "wan_transformer", repo / "wan_transformer")
    eng = engines.load_engine(wan / "transformer")
    wan_feeds = inputs_for(eng, seed=7)
    r = refit.Refitter(eng)
    r.load_lora(str(wan_loras["y"]), adapter_name="y")
    wan_refs = {}
    for key in set(SETS.values()):
        r.set_adapters([n for n, _ in key], [w for _, w in key])
        wan_refs[key] = eng.infer(wan_feeds)["out_sample"]
    eng.close()

    server = TritonServer(repo, start_timeout=300)
    server.start()
    try:
        yield dict(server=server, feeds=feeds, refs=refs, ids=ids, te_refs=te_refs, wan_feeds=wan_feeds,
                   wan_refs=wan_refs)
    finally:
        proc = server.proc
        server.stop()
        assert proc.poll() is not None, "tritonserver still running after stop()"


def _unet_inputs(feeds, mod):
    ins = []
    for name, arr in feeds.items():
        if name == "timestep":  # [batch] graph input: dims [1] reshaped to [] in the config
            arr = arr.reshape(-1, 1)
        t = mod.InferInput(name, list(arr.shape), "FP32")
        t.set_data_from_numpy(np.ascontiguousarray(arr))
        ins.append(t)
    return ins


def _infer(client, feeds, loras, mod=grpcclient, model="unet"):
    params = {} if loras is None else {"loras": loras}
    kw = {"client_timeout": 120} if mod is grpcclient else {"timeout": 120}
    res = client.infer(model, _unet_inputs(feeds, mod), parameters=params, **kw)
    applied = res.as_numpy("applied_loras")
    return res.as_numpy("out_sample"), json.loads(applied.reshape(-1)[0])


def _check(served, out, applied, loras, seed):
    key = SETS[loras]
    assert applied == dict(key), (loras, applied)
    np.testing.assert_allclose(out, served["refs"][key][seed], rtol=RTOL, atol=ATOL, err_msg=f"loras={loras}")


def test_references_are_distinct(served):
    refs = served["refs"]
    keys = list(refs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert np.abs(refs[a][0] - refs[b][0]).max() > 100 * ATOL, (a, b)


def test_concurrent_interleaved_loras(served):
    url = served["server"].grpc_url
    order = list(SETS)
    results, errors = [], []
    deadline = time.monotonic() + DEADLINE_S

    def worker(t):
        client = grpcclient.InferenceServerClient(url)
        try:
            for i in range(PER_THREAD):
                if time.monotonic() > deadline:
                    errors.append((t, i, "deadline"))
                    return
                loras = order[(i + t) % len(order)]
                seed = (i * 7 + t) % SEEDS
                try:
                    out, applied = _infer(client, served["feeds"][seed], loras)
                    results.append((loras, seed, out, applied))
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append((t, i, loras, repr(e)))
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=DEADLINE_S + 60)
    assert not any(th.is_alive() for th in threads), "client threads did not finish"
    assert not errors, errors[:5]
    assert len(results) == THREADS * PER_THREAD >= 200
    assert {r[0] for r in results} == set(SETS)
    for loras, seed, out, applied in results:
        _check(served, out, applied, loras, seed)
    # the server's own account (log_batches): executes held several requests of several
    # adapter sets, and refitted at most once per set that differed (+1: y's first load)
    stats = [dict(kv.split("=") for kv in line.split("execute ", 1)[1].split())
             for line in served["server"].log_tail(10**7).splitlines() if "[lora-engines] execute" in line]
    stats = [{k: int(v) for k, v in st.items()} for st in stats]
    assert stats, "no execute statistics in the server log"
    assert max(st["requests"] for st in stats) > 1, "dynamic batching never grouped requests"
    assert any(st["groups"] > 1 for st in stats), "no execute held several adapter sets"
    assert all(st["refits"] <= st["groups"] + 1 for st in stats), stats
    assert sum(st["refits"] for st in stats) < sum(st["requests"] for st in stats)


def test_bad_requests_get_errors_and_server_keeps_serving(served):
    client = grpcclient.InferenceServerClient(served["server"].grpc_url)
    feeds = served["feeds"]
    try:
        for i, bad in enumerate(BAD):
            with pytest.raises(InferenceServerException) as exc:
                _infer(client, feeds[0], bad)
            assert "loras" in str(exc.value) or "adapter" in str(exc.value) or "finite" in str(exc.value), \
                str(exc.value)
            good = list(SETS)[i % len(SETS)]  # the next request still succeeds, with the right adapters
            out, applied = _infer(client, feeds[1], good)
            _check(served, out, applied, good, 1)
        # bad and good requests in flight together (one server execute may hold both)
        outcomes = [None] * 16

        def one(k):
            c = grpcclient.InferenceServerClient(served["server"].grpc_url)
            try:
                loras = BAD[k % len(BAD)] if k % 2 else list(SETS)[k % len(SETS)]
                try:
                    outcomes[k] = ("ok", loras, _infer(c, feeds[2], loras))
                except InferenceServerException as e:
                    outcomes[k] = ("err", loras, str(e))
            finally:
                c.close()

        ths = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(16)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(timeout=300)
        for k, (kind, loras, val) in enumerate(outcomes):
            if k % 2:
                assert kind == "err", (loras, val)
            else:
                assert kind == "ok", (loras, val)
                _check(served, val[0], val[1], loras, 2)
        assert served["server"].is_alive()
        assert client.is_model_ready("unet")
    finally:
        client.close()


def test_http_and_text_encoders(served):
    server = served["server"]
    h = httpclient.InferenceServerClient(server.http_url)
    try:
        out, applied = _infer(h, served["feeds"][0], '{"y": 0.5}', mod=httpclient)
        _check(served, out, applied, '{"y": 0.5}', 0)
        ids = served["ids"]["input_ids"]
        for comp, ref in served["te_refs"].items():
            t = httpclient.InferInput("input_ids", list(ids.shape), "INT64")
            t.set_data_from_numpy(ids)
            res = h.infer(comp, [t])
            for name, arr in ref.items():
                np.testing.assert_allclose(res.as_numpy(name), arr, rtol=RTOL, atol=ATOL)
    finally:
        h.close()


def test_transformer_family_with_per_request_loras(served):
    client = grpcclient.InferenceServerClient(served["server"].grpc_url)
    try:
        assert client.is_model_ready("wan_transformer")
        for loras in [*SETS, '{"x": 1}', None, "{}"]:
            out, applied = _infer(client, served["wan_feeds"], loras, model="wan_transformer")
            key = SETS[loras]
            assert applied == dict(key)
            np.testing.assert_allclose(out, served["wan_refs"][key], rtol=RTOL, atol=ATOL, err_msg=f"loras={loras}")
        with pytest.raises(InferenceServerException, match="adapter"):
            _infer(client, served["wan_feeds"], '{"nope": 1}', model="wan_transformer")
    finally:
        client.close()
