"""Client side of the real-tritonserver tests: request inputs, and a bounded load from several threads."""

from __future__ import annotations

import threading

import numpy as np


def request_values(seed: int, prompt: str = "a red cube", **kw) -> dict[str, np.ndarray]:
    """A generating model's request inputs, one value each ([1])."""
    return {"prompt": np.array([prompt.encode()], dtype=object), "seed": np.array([seed]),
            **{k: np.array([x]) for k, x in kw.items()}}


def close_uint8(a, b) -> bool:
    """Equal pictures up to 1 level: a batch of prompts may differ from a lone one in the last bit of a float."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def grpc_inputs(grpc, values: dict) -> list:
    """A generating model's inputs ([1] per request: prompt BYTES, seed INT64, the rest INT32) as gRPC inputs."""
    ins = []
    for name, arr in values.items():
        arr = arr.reshape(1, 1)
        dtype = {"prompt": "BYTES", "seed": "INT64"}.get(name, "INT32")
        t = grpc.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr.astype(object if dtype == "BYTES" else {"INT64": np.int64}.get(dtype, np.int32)))
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
