"""`python -m engines.triton`: write a Triton repository, or serve one with the PyPI tritonserver.

    python -m engines.triton write out/sdxl repo [--lora y.safetensors] [--text-encoders python] ...
    python -m engines.triton serve repo            # 127.0.0.1, free ports (or --http-port/--grpc-port)
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engines.triton", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write a Triton model repository from an export directory")
    w.add_argument("export_dir")
    w.add_argument("repo_dir")
    w.add_argument("--lora-dir", default=None, help="server-side adapter directory (default: inside the repo)")
    w.add_argument("--lora", action="append", default=[], help="adapter file to ship (repeatable)")
    w.add_argument("--no-baked", action="store_true", help="do not copy the baked adapters into the adapter dir")
    w.add_argument("--text-encoders", default="auto", choices=["auto", "onnxruntime", "tensorrt", "python"])
    w.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    w.add_argument("--engine", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    w.add_argument("--max-batch-size", type=int, default=8)
    w.add_argument("--instances", type=int, default=1)
    w.add_argument("--components", default=None)
    w.add_argument("--prefix", default="")
    w.add_argument("--preload", default="baked", choices=["baked", "all", "none"])
    s = sub.add_parser("serve", help="run the nvidia-pytriton tritonserver on a repository (loopback)")
    s.add_argument("repo_dir")
    s.add_argument("--model", action="append", default=None, help="model to load (default: all)")
    s.add_argument("--http-port", type=int, default=None)
    s.add_argument("--grpc-port", type=int, default=None)
    s.add_argument("--timeout", type=float, default=600, help="start timeout, seconds")
    args = p.parse_args(argv)

    if args.cmd == "write":
        from .repository import write_repository

        written = write_repository(
            args.export_dir, args.repo_dir, args.lora_dir, loras=args.lora, copy_baked=not args.no_baked,
            text_encoder_backend=args.text_encoders, device=args.device, engine=args.engine,
            max_batch_size=args.max_batch_size, instance_count=args.instances, components=args.components,
            prefix=args.prefix, preload=args.preload)
        for name, path in written.items():
            print(f"{name}: {path}")
        return 0

    from .server import TritonServer, TritonServerError, TritonUnavailable

    server = TritonServer(args.repo_dir, models=args.model, start_timeout=args.timeout,
                          http_port=args.http_port, grpc_port=args.grpc_port)
    try:
        server.start()
    except (TritonServerError, TritonUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"serving {args.repo_dir}: HTTP {server.http_url}  gRPC {server.grpc_url}  (Ctrl-C stops)", flush=True)
    try:
        while server.is_alive():
            time.sleep(1)
        print(f"tritonserver exited:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
