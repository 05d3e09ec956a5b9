"""ONNX translations of torch's layout ops on complex tensors, for rotary embeddings held as complex
numbers (Qwen-Image, Z-Image, Lumina2...).

torch's exporter stores a complex tensor as a real one with a trailing (real, imaginary) axis
and has complex translations for arithmetic, `cat`, `view`, `slice`, but none for `unsqueeze`,
`expand`, `index` or `split_with_sizes`: those fail with "No decompositions registered for the
complex-valued input". Each one here is the real op with negative axes shifted past the
trailing axis. Registered in onnxscript's torch_lib registry, which torch's exporter reads when
it builds its own; importing this module is enough.
"""

from __future__ import annotations

from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops import common as common_ops
from onnxscript.function_libs.torch_lib.ops.core import aten_index
from onnxscript.function_libs.torch_lib.registration import torch_op


def _axis(dim: int) -> int:
    return dim - 1 if dim < 0 else dim


@torch_op("aten::unsqueeze", trace_only=True, complex=True)
def unsqueeze_complex(self, dim: int):
    return op.Unsqueeze(self, [_axis(dim)])


@torch_op("aten::expand", trace_only=True, complex=True)
def expand_complex(self, size, implicit: bool = False):
    size = [1 if isinstance(s, int) and s == -1 else s for s in size]
    return op.Expand(self, common_ops.merge_dims([*size, 2]))


@torch_op("aten::split_with_sizes", trace_only=True, complex=True)
def split_with_sizes_complex(self, split_sizes, dim: int = 0):
    return op.SplitToSequence(self, split_sizes, axis=_axis(dim))


@torch_op("aten::index.Tensor", trace_only=True, complex=True)
def index_complex(self, indices):
    # indices address leading axes only: the trailing (real, imaginary) axis is kept as a torch axis would be
    return aten_index(self, indices)
