"""Triton kernels (installed as scatterattn.kernels). Each kernel has a PyTorch reference (in
scatterattn.reference, scatterattn.lora or scatterattn.sparsity) and is bound in scatterattn; set
TRITON_INTERPRET=1 before importing triton to run them on the CPU."""
