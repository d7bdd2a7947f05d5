"""Every op family at its real (headline) shape against its torch recipe, forward and every
gradient, in the GPU test mode (``OMNIFAST_TEST_DEVICE=cuda``); these shapes are too large for the
interpreter, so the CPU mode skips them (``tests/benchmarks/test_gpu_check.py`` runs the same check
at small shapes there). float32: within 1e-3 of the recipe, relative to the largest value; bf16:
at most twice the bf16 recipe's own error against float32."""

import pytest
import torch

from benchmarks import gpu_check

pytestmark = pytest.mark.gpu_check(1)


@pytest.mark.cuda_only
@pytest.mark.parametrize("case", gpu_check.HEADLINE_CASES, ids=lambda case: case.name(False))
def test_every_implementation_matches_the_recipe_at_the_real_shape(case):
    results = gpu_check.check_parity(case, torch.device("cuda"), dry_run=False)
    failed = {name: result for name, result in results.items() if not result.get("passed", True)}
    assert not failed, f"{case.name(False)}: max relative errors over the allowed: {failed}"
