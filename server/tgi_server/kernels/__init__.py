"""Triton kernels for the GPU path: paged attention, fused RMSNorm, rotary + KV-cache write, gated
activations, the skinny linear.

They are leaves: `tgi_server.ops.triton_backend` calls them, and the portable PyTorch code in
`tgi_server.ops.portable` is their reference (tests compare the two, on CPU through Triton's
interpreter with TRITON_INTERPRET=1).
"""
