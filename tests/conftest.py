"""Test set-up: Triton kernels run on CPU tensors through the interpreter (set before any
import of triton), and hypothesis runs a bounded number of examples so the suite stays fast."""
import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("omnifast", deadline=None, max_examples=40, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=400,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "omnifast"))

# Import the Triton kernels now, while TRITON_INTERPRET=1 is set: @triton.jit decides at import
# time whether a kernel is interpreted, and some tests run code with the variable unset.
import omnifast.kernels.ctc  # noqa: E402,F401
import omnifast.kernels.fsq  # noqa: E402,F401
import omnifast.kernels.linear_ctc  # noqa: E402,F401
import omnifast.kernels.moe  # noqa: E402,F401
