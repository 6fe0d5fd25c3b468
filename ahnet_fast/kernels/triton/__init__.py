"""Triton kernels (GPU; on CPU tensors under TRITON_INTERPRET=1). Triton is optional: nothing here
is imported unless a Triton backend is selected."""
