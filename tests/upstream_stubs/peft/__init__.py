"""peft, as ColossalAI's booster and checkpoint modules import it (upstream's ckpt_utils imports those).

Only the names are provided: nothing in the tests builds a LoRA model, so isinstance checks just fail.
"""

import enum


class PeftType(str, enum.Enum):
    LORA = "LORA"


class PeftModel:
    def __init__(self, *_args, **_kwargs):
        raise NotImplementedError("peft stand-in: PeftModel is not available in the tests")
