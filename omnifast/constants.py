"""Values every layer of omnifast agrees on."""

IGNORE_INDEX = -100  # a label or unit that is padding or not learned from, as in transformers and OpenOmni
