"""Every config.pbtxt that write_repository generates parses with Triton's own protobuf and is right."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from engines.triton import write_repository
from engines.triton.layout import ONNX_TO_TRITON
from refit_helpers import exported, lora_files

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient[grpc] is not installed")
from google.protobuf import text_format  # noqa: E402

CONFIG = model_config_pb2.ModelConfig
DT = model_config_pb2.DataType
KIND = model_config_pb2.ModelInstanceGroup.Kind


@pytest.fixture(scope="module")
def export_x(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton_config")
    return exported(root, "sdxl", "x"), lora_files(root, "sdxl")


def _parse(path: Path):
    return text_format.Parse(path.read_text(), CONFIG())


def _graph(onnx_path):
    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}

    def io(vs):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
                for v in vs if v.name not in inits]

    return io(m.graph.input), io(m.graph.output)


def _check_io(cfg, onnx_path, extra_outputs=()):
    g_in, g_out = _graph(onnx_path)
    batched = cfg.max_batch_size > 0
    for section, graph in ((cfg.input, g_in), (cfg.output, [o for o in g_out])):
        assert [t.name for t in section][:len(graph)] == [n for n, _, _ in graph]
        for t, (name, elem, dims) in zip(section, graph):
            assert DT.Name(t.data_type) == ONNX_TO_TRITON[elem], name
            want = dims[1:] if batched else dims
            if batched:
                assert dims[0] == -1, f"{name}: batched config over a static batch axis"
            if want:
                assert list(t.dims) == want, name
            else:  # [batch] tensor: dims [1] reshaped to a scalar per batch item
                assert list(t.dims) == [1] and t.HasField("reshape") and list(t.reshape.shape) == [], name
    assert [o.name for o in cfg.output[len(g_out):]] == list(extra_outputs)


def test_configs_cpu_python_text_encoders(export_x, tmp_path):
    export, loras = export_x
    repo = tmp_path / "repo"
    written = write_repository(export, repo, text_encoder_backend="python", loras=[loras["y"]], max_batch_size=4,
                               instance_count=2)
    assert set(written) == {"unet", "text_encoder", "text_encoder_2"}
    for name, path in written.items():
        cfg = _parse(path)
        assert cfg.name == name and cfg.backend == "python" and not cfg.platform
        assert cfg.max_batch_size == 4 and cfg.HasField("dynamic_batching")
        assert [(KIND.Name(g.kind), g.count) for g in cfg.instance_group] == [("KIND_CPU", 2)]
        assert (repo / name / "1" / "model.py").is_file()
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        assert params["family"] == "sdxl" and params["component"] == name
        assert (repo / name / "1" / name / "model.onnx").is_file()
        assert (repo / name / "1" / name / "weights_map.json").is_file()
        extra = ("applied_loras",) if name == "unet" else ()
        _check_io(cfg, export / name / "model.onnx", extra)
    cfg = _parse(written["unet"])
    out = cfg.output[-1]
    assert out.name == "applied_loras" and out.data_type == DT.Value("TYPE_STRING") and list(out.dims) == [1]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["lora_dir"] == "loras"  # what a request without `loras` gets: the shipped manifest's baked set
    shipped = json.loads((repo / "unet" / "1" / "manifest.json").read_text())
    assert [(a["name"], a["scale"]) for a in shipped["components"]["unet"]["adapters"]] == [("x", 1.0)]
    shipped = sorted(p.name for p in (repo / "unet" / "loras").iterdir())
    assert shipped == ["x.safetensors", "y.safetensors"]
    assert (repo / "unet" / "1" / "manifest.json").is_file()


def test_configs_onnxruntime_and_no_batching(export_x, tmp_path):
    export, _ = export_x
    repo = tmp_path / "repo"
    ldir = tmp_path / "server_loras"
    written = write_repository(export, repo, lora_dir=ldir, max_batch_size=0)
    for name, path in written.items():
        cfg = _parse(path)
        assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
        if name.startswith("text_encoder"):
            assert cfg.platform == "onnxruntime_onnx" and not cfg.backend
            assert (repo / name / "1" / "model.onnx").is_file()
            assert not (repo / name / "1" / "model.py").exists()
        else:
            assert cfg.backend == "python"
            assert cfg.parameters["lora_dir"].string_value == str(ldir.resolve())
        assert KIND.Name(cfg.instance_group[0].kind) == "KIND_CPU"
        _check_io(cfg, export / name / "model.onnx", ("applied_loras",) if name == "unet" else ())
    assert (ldir / "x.safetensors").is_file()  # the baked adapter shipped to the named directory


def test_configs_tensorrt(export_x, tmp_path):
    """An export with plans: GPU instances, text encoders as tensorrt_plan, denoiser still Python."""
    export, _ = export_x
    fake = tmp_path / "export"
    shutil.copytree(export, fake)
    for c in ("unet", "text_encoder", "text_encoder_2"):
        (fake / c / "model.plan").write_bytes(b"plan")
    repo = tmp_path / "repo"
    written = write_repository(fake, repo)
    for name, path in written.items():
        cfg = _parse(path)
        assert KIND.Name(cfg.instance_group[0].kind) == "KIND_GPU"
        if name.startswith("text_encoder"):
            assert cfg.platform == "tensorrt_plan" and (repo / name / "1" / "model.plan").is_file()
        else:
            assert cfg.backend == "python" and (repo / name / "1" / name / "model.plan").is_file()
        _check_io(cfg, fake / name / "model.onnx", ("applied_loras",) if name == "unet" else ())


def test_shipping_errors(export_x, tmp_path):
    export, loras = export_x
    changed = tmp_path / "export"
    shutil.copytree(export, changed)
    m = json.loads((changed / "manifest.json").read_text())
    m["adapters"][0]["sha256"] = "0" * 64
    (changed / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="changed since the export"):
        write_repository(changed, tmp_path / "r1")
    write_repository(changed, tmp_path / "r2", copy_baked=False)  # the baked file is not needed to write
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.safetensors").write_bytes(b"different")
    with pytest.raises(FileExistsError):
        write_repository(export, tmp_path / "r3", loras=[other / "x.safetensors"])
    with pytest.raises(ValueError):
        write_repository(export, tmp_path / "r4", text_encoder_backend="tensorflow")
    with pytest.raises(FileNotFoundError):
        write_repository(tmp_path / "nothing", tmp_path / "r5")


def test_cli_write(export_x, tmp_path, capsys):
    from engines.triton.__main__ import main

    export, loras = export_x
    repo = tmp_path / "repo"
    assert main(["write", str(export), str(repo), "--text-encoders", "python", "--lora", str(loras["y"]),
                 "--max-batch-size", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert f"{name}: " in printed
        cfg = _parse(repo / name / "config.pbtxt")
        assert cfg.backend == "python" and cfg.max_batch_size == 2
    assert (repo / "unet" / "loras" / "y.safetensors").is_file()
