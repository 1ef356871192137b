"""Triton kernels of attrspace, installed as `attrspace.kernels`.

Importing this package imports triton, so nothing in attrspace imports it eagerly; set
TRITON_INTERPRET=1 before the first import to run the kernels on the CPU.
"""
