"""Hand-written Triton kernels used by fxforge code generation."""
