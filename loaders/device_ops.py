"""What the dequant kernels (GGUF, NF4) may assume about a device's elementwise ops."""


def mixed_dtype_ops_fuse(device):
    """Whether an elementwise op with mixed input/output dtypes costs no more than a plain one.

    CUDA (and ROCm, which presents as cuda) kernels convert in registers, so widening the
    quantized values and rounding into the output dtype fold into the scaling ops. A CPU op with
    a differing output dtype runs through a temporary copy: there the kernels scale in float32
    in place and cast once. Other accelerators (MPS, XPU) take the CPU's sequence: it is exact
    everywhere, and nothing here can measure them. Both sequences give bit-identical results.
    """
    return device.type == "cuda"
