"""Everything OpenOmni in one place.

* ``load_openomni(folder)``: an OpenOmni checkpoint folder as an ``OmniModel``, every key mapped
  by name (``load.py``); ``speech_decoder_from_state_dict``: its speech generator alone;
  ``load_moe_state_dict``: its expert stack into an omnifast ``MoE``.
* ``keys.py``: how OpenOmni's speech-generator keys and layouts map to omnifast's modules.
* ``patch(model)``: omnifast's fused ops put into a live OpenOmni model (``patch.py``).
* ``reference.py``: OpenOmni's modules rebuilt from its code at small sizes, the reference the
  test suite holds the preset and the patch to, in float64.
* The preset: ``OmniConfig.openomni_7b()`` and ``SpeechDecoderConfig.openomni()`` differ from
  omnifast's defaults where OpenOmni computes differently: its text-guided attention sees every
  LLM state (it cannot stream), its upsampling rounds in floating point, its loss is the sum over
  the batch divided by the total units, and its DPO scores each side on its own upsampling.
"""

from .load import load_moe_state_dict, load_openomni, speech_decoder_from_state_dict
from .patch import patch

__all__ = ["load_openomni", "speech_decoder_from_state_dict", "load_moe_state_dict", "patch"]
