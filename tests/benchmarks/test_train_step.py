"""The headline benchmark: --quick runs the same code at tiny size on the CPU; its OpenOmni-recipe
loss is the same function as omnifast's; the estimate is labelled as one."""

import json

import torch

from benchmarks import openomni_recipe, train_step
from omnifast import cli
from omnifast.models import OmniConfig, response_states


def test_quick_run_writes_the_table_json_and_chart(tmp_path, capsys):
    assert cli.main(["bench", "train_step", "--quick", "--steps", "1", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "quick_train_step.json").read_text())
    assert (tmp_path / "quick_train_step.png").stat().st_size > 0
    assert {(r["stage"], r["implementation"], r["setting"]) for r in payload["rows"]} == {
        (s, i, b) for s in train_step.STAGES for i in train_step.IMPLEMENTATIONS for b in train_step.SETTINGS
    }
    for row in payload["rows"]:
        assert row["step_s"] > 0 and row["units_per_s"] > 0 and row["whole_run_s"] > 0
        if row["setting"] == "equal batch":
            assert row["peak_bytes"] > row["device_weight_bytes"] > 0
    cached = [r for r in payload["rows"] if r["implementation"] == "omnifast, state cache"]
    assert all(r["cache_build_s"] > 0 for r in cached)
    assert "vs recipe" in capsys.readouterr().out


def test_the_openomni_recipe_computes_omnifasts_loss():
    """Loop MoE, einsum RLSIAT, full logits + F.ctc_loss: the same CTC loss as the SpeechDecoder."""
    torch.manual_seed(0)
    config = OmniConfig.tiny()
    model = train_step.build_model(config, torch.device("cpu"), torch.float64)
    ids = torch.randint(0, 250, (3, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :6] = -100
    units = torch.randint(0, 20, (3, 12), generator=torch.Generator().manual_seed(2))
    hidden = model(ids, torch.ones_like(ids), labels, text_loss=False).hidden_states
    states, tokens, mask = response_states(hidden, labels)
    ours = model.speech_decoder(states, tokens, mask, mask, units).loss
    for vocab_logits in (True, False):
        nll = openomni_recipe.openomni_generator_nll(model.speech_decoder, states, tokens, mask, units, vocab_logits)
        torch.testing.assert_close((nll.sum() / units.numel()).double(), ours.double(), atol=1e-5, rtol=1e-5)


def test_the_estimate_is_labelled_and_counts_the_dpo_passes(tmp_path, capsys):
    assert train_step.main(["--estimate", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "train_step-estimate.json").read_text())
    assert "ESTIMATE" in payload["description"] and all(row["estimate"] for row in payload["rows"])
    step = {(r["stage"], r["implementation"]): r["step_s"] for r in payload["rows"]}
    recipe, cached = "OpenOmni recipe as shipped", "omnifast, state cache"
    # four generator passes (two with their backward) against one: the recipe's DPO costs more
    assert step[("emotion-dpo", recipe)] > 1.5 * step[("emotion-dpo", cached)]
    assert step[("speech-gen", "omnifast, no cache")] > step[("speech-gen", cached)]
    assert "ESTIMATE" in capsys.readouterr().out
