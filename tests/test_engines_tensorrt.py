"""TensorRT engine: REFIT_INDIVIDUAL build of an exported component, refit bit-exact weights.

Skipped unless TensorRT imports and CUDA is available. Never faked: without TensorRT these
tests do not run at all.
"""

from __future__ import annotations

import numpy as np
import pytest

from engines.tensorrt import tensorrt_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not tensorrt_available(), reason="needs TensorRT and a CUDA device")]


def test_trt_refit_sequence_text_encoder(tmp_path_factory):
    import engines
    import refit
    from engines.tensorrt import TensorRTEngine, build_plan
    from refit_helpers import differing, exported, initializers, inputs_for, lora_files

    root = tmp_path_factory.getbasetemp()
    files = lora_files(root, "sd")
    d = exported(root, "sd", "x", ["text_encoder"]) / "text_encoder"
    build_plan(d / "model.onnx", profiles={"input_ids": ((1, 77), (1, 77), (2, 77))})
    engine = engines.load_engine(d)
    assert isinstance(engine, TensorRTEngine)
    ort_engine = engines.load_engine(d, backend="ort")
    r = refit.Refitter(engine)
    r.load_lora(str(files["y"]), adapter_name="y")
    want = initializers(exported(root, "sd", "y", ["text_encoder"]) / "text_encoder" / "model.onnx",
                        engine.weight_names())
    assert differing(engine.get_weights(), want) == []
    ref = refit.Refitter(ort_engine)
    ref.load_lora(str(files["y"]), adapter_name="y")
    feeds = inputs_for(ort_engine, seed=1)
    out, ref_out = engine.infer(feeds), ort_engine.infer(feeds)
    for k in ref_out:
        np.testing.assert_allclose(out[k], ref_out[k], rtol=1e-3, atol=1e-3)
    r.set_adapters([])
    ref.set_adapters([])
    out, ref_out = engine.infer(feeds), ort_engine.infer(feeds)
    for k in ref_out:
        np.testing.assert_allclose(out[k], ref_out[k], rtol=1e-3, atol=1e-3)
