"""Triton kernels, installed as ``omnifast.kernels``. Import only through ``omnifast.ops._dispatch``."""
