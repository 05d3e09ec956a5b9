"""Client side of the real-tritonserver tests: request inputs, and a bounded load from several threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest


def request_values(seed: int, prompt: str = "a red cube", **kw) -> dict[str, np.ndarray]:
    """A generating model's request inputs, one value each ([1])."""
    return {"prompt": np.array([prompt.encode()], dtype=object), "seed": np.array([seed]),
            **{k: np.array([x]) for k, x in kw.items()}}


def close_uint8(a, b) -> bool:
    """Equal pictures up to 1 level: a batch of prompts may differ from a lone one in the last bit of a float."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


TYPES = {"prompt": "BYTES", "seed": "INT64", "image": "UINT8", "mask": "UINT8", "strength": "FP32"}  # else INT32
NUMPY = {"INT64": np.int64, "UINT8": np.uint8, "FP32": np.float32}


def grpc_inputs(grpc, values: dict) -> list:
    """A generating model's inputs as gRPC inputs: `[1]` per request (prompt BYTES, seed INT64, strength
    FP32, the rest INT32), an `image` [H, W, 3] / `mask` [H, W] UINT8 as they are; with the batch dimension."""
    ins = []
    for name, arr in values.items():
        arr = arr[None] if name in ("image", "mask") else arr.reshape(1, 1)
        dtype = TYPES.get(name, "INT32")
        t = grpc.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr.astype(object if dtype == "BYTES" else NUMPY.get(dtype, np.int32)))
        ins.append(t)
    return ins


def from_threads(grpc, url: str, threads: int, per_thread: int, request) -> tuple[list, list]:
    """`request(client, thread, i)` `per_thread` times from each of `threads` threads (one client each):
    (results, errors as repr)."""
    results, errors = [], []

    def worker(t):
        client = grpc.InferenceServerClient(url)
        try:
            for i in range(per_thread):
                try:
                    results.append(request(client, t, i))
                except Exception as e:  # noqa: BLE001 - reported to the test
                    errors.append(repr(e))
        finally:
            client.close()

    pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=900)
    return results, errors


def start_generating_server(setup: dict, models: list[str]):
    """The repository `--triton-repo` writes for `setup`'s export (adapter y shipped, steps up to 4), served
    by the PyPI tritonserver on loopback with `models`: (grpc client module, its exception class, server,
    the written {model: config path}); skips where no tritonserver runs."""
    from engines.triton import write_repository
    from engines.triton.server import TritonServer, pytriton_available

    ok, why = pytriton_available()
    if not ok:
        pytest.skip(f"no tritonserver to run: {why}")
    grpc = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    written = write_repository(setup["out"], setup["root"] / "repo", loras=[setup["files"]["y"]],
                               text_encoder_backend="python", limits={"max_steps": 4})
    server = TritonServer(setup["root"] / "repo", models=models, start_timeout=300)
    server.start()
    return grpc, InferenceServerException, server, written
