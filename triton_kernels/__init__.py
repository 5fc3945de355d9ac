"""sfnn's Triton kernels, installed as ``sfnn.triton_kernels``.

Never importable as a top-level ``triton_kernels``: that name belongs to Triton's own MoE
kernel package.
"""
