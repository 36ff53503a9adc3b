"""Fine-tuning methods: each a Callback that rewrites the backbone before training."""

from lit_peft.methods.adalora import AdaLoRA
from lit_peft.methods.base import Method
from lit_peft.methods.freeze import FullFineTune, LinearProbe, PartialFineTune
from lit_peft.methods.galore import GaLore
from lit_peft.methods.houlsby import Houlsby
from lit_peft.methods.ia3 import IA3
from lit_peft.methods.lora import EVA, DoRA, LoRA, OLoRA, PiSSA, RsLoRA
from lit_peft.methods.peft_adapter import PeftAdapter, PeftMethod
from lit_peft.methods.qlora import QDoRA, QLoRA
from lit_peft.methods.rosa import RoSA
from lit_peft.methods.sparse import SIFT

__all__ = ["AdaLoRA", "DoRA", "EVA", "FullFineTune", "GaLore", "Houlsby", "IA3", "LinearProbe", "LoRA", "Method",
           "OLoRA", "PartialFineTune", "PeftAdapter", "PeftMethod", "PiSSA", "QDoRA", "QLoRA", "RoSA", "RsLoRA", "SIFT"]
