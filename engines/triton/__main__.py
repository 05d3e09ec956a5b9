"""`python -m engines.triton`: write a Triton repository, or serve one with the PyPI tritonserver.

    python -m engines.triton write out/sdxl repo [--lora y.safetensors] [--text-encoders python] ...
    python -m engines.triton serve repo            # 127.0.0.1, free ports (or --http-port/--grpc-port)

Exit codes: 0 done, 2 bad usage or input (no such export or repository, missing or changed
adapter file, name clash), 1 a failure while working (no tritonserver, server died). `write`
changes nothing unless it succeeds; Ctrl-C or SIGTERM stop `serve` and its server.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, sigterm_exits


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engines.triton", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write a Triton model repository from an export directory")
    w.add_argument("export_dir", metavar="EXPORT", help="export directory (manifest.json + components)")
    w.add_argument("repo_dir", metavar="REPO",
                   help="model repository to write: new, empty, or a model repository whose models of the same "
                        "names are replaced (the others kept)")
    w.add_argument("--lora-dir", default=None,
                   help="server-side adapter directory, used as is (default: <model>/loras inside the repository)")
    w.add_argument("--lora", action="append", default=[], metavar="PATH",
                   help="adapter file to ship into the adapter directory, checked against the export (repeatable)")
    w.add_argument("--no-baked", action="store_true", help="do not copy the baked adapters into the adapter dir")
    w.add_argument("--text-encoders", default="auto", choices=["auto", "onnxruntime", "tensorrt", "python"],
                   help="how text encoders and the VAE are served: Triton's onnxruntime or tensorrt_plan backend, "
                        "or a Python-backend model (servers without those backends, e.g. the PyPI one); "
                        "auto: tensorrt when the export has plans, else onnxruntime (default: auto)")
    w.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="instance kind; auto: gpu when the export has TensorRT plans (default: auto)")
    w.add_argument("--engine", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                   help="the denoiser's engine; auto: TensorRT on a GPU instance with a plan, else ONNX Runtime "
                        "(default: auto)")
    w.add_argument("--max-batch-size", type=int, default=8,
                   help="Triton's max_batch_size; 0 disables dynamic batching (default: 8)")
    w.add_argument("--instances", type=int, default=1,
                   help="instances per model, each with its own engine and weights (default: 1)")
    w.add_argument("--components", default=None,
                   help="comma-separated subset of the export's components (default: all)")
    w.add_argument("--prefix", default="", help="prefix of the model names, e.g. sdxl_ (default: none)")
    w.add_argument("--preload", default="baked", choices=["baked", "all", "none"],
                   help="adapters a denoiser reads at start: the baked ones, every file in the adapter directory, or "
                        "none (read when first named) (default: baked)")
    w.add_argument("--text-to-image", default="auto", choices=["auto", "yes", "no"],
                   help="also write the text-to-image model (video families: text_to_video); auto: when the export "
                        "can generate (default: auto)")
    for limit, default in (("steps", "100"), ("height", "the export's"), ("width", "the export's"),
                           ("frames", "the export's; video families")):
        w.add_argument(f"--max-{limit}", type=int, default=None, metavar="N",
                       help=f"the text-to-image model's largest {limit} per request (default: {default})")
    s = sub.add_parser("serve", help="run the nvidia-pytriton tritonserver on a repository (loopback)")
    s.add_argument("repo_dir", metavar="REPO", help="a model repository (python -m engines.triton write ...)")
    s.add_argument("--model", action="append", default=None, help="model to load; repeatable (default: all)")
    s.add_argument("--http-port", type=int, default=None, help="HTTP port on 127.0.0.1 (default: a free one)")
    s.add_argument("--grpc-port", type=int, default=None, help="gRPC port on 127.0.0.1 (default: a free one)")
    s.add_argument("--timeout", type=float, default=600, help="seconds to wait for the models to load (default: 600)")
    return p


def _error(msg) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _write(args) -> int:
    from ..manifest import ManifestError
    from .repository import write_repository
    from .text_to_image import LIMIT_NAMES

    try:
        written = write_repository(
            args.export_dir, args.repo_dir, lora_dir=args.lora_dir, loras=args.lora, copy_baked=not args.no_baked,
            text_encoder_backend=args.text_encoders, device=args.device, engine=args.engine,
            max_batch_size=args.max_batch_size, instance_count=args.instances, components=args.components,
            prefix=args.prefix, preload=args.preload,
            text_to_image={"auto": None, "yes": True, "no": False}[args.text_to_image],
            limits={k: v for k in LIMIT_NAMES if (v := getattr(args, k)) is not None})
    except (FileNotFoundError, FileExistsError, ValueError, ManifestError) as e:
        _error(e)
        return EXIT_USAGE
    except OSError as e:
        _error(e)
        return EXIT_FAILED
    for name, path in written.items():
        print(f"{name}: {path}")
    return EXIT_OK


def _serve(args) -> int:
    from pathlib import Path

    from .server import TritonServer, TritonServerError, TritonUnavailable

    repo = Path(args.repo_dir)
    if not repo.is_dir() or not any(repo.glob("*/config.pbtxt")):
        _error(f"{repo} is not a model repository (no <model>/config.pbtxt); write one with "
               "`python -m engines.triton write EXPORT REPO`")
        return EXIT_USAGE
    server = TritonServer(repo, models=args.model, start_timeout=args.timeout,
                          http_port=args.http_port, grpc_port=args.grpc_port)
    try:
        server.start()
        print(f"serving {repo}: HTTP {server.http_url}  gRPC {server.grpc_url}  (Ctrl-C stops)", flush=True)
        while server.is_alive():
            time.sleep(1)
        _error("tritonserver exited: " + ("; ".join(server.failures()) or "(nothing in its log)"))
        return EXIT_FAILED
    except (TritonServerError, TritonUnavailable) as e:
        _error(str(e).splitlines()[0])  # the server log's reason (which model did not load, and why)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        server.stop()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_exits():  # unwinds: temporary files removed, server stopped
            return _write(args) if args.cmd == "write" else _serve(args)
    except KeyboardInterrupt:  # during write
        _error("interrupted; nothing was written")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
