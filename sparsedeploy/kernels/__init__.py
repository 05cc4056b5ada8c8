"""GPU kernels for the cuda target: cuSPARSELt 2:4 linear layers and CUDA-graph generation."""
