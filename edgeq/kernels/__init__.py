"""Generated matmul kernels for the TVM backend: specs, TIR sources, packed layouts, compilation."""
