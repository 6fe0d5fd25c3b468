"""Device kernels. `kernels.triton` holds the Triton kernels; they know nothing of modules or ops."""
