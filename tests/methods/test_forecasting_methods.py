"""Every method on forecasting: a tiny TimesFM (1.0/2.0 and 2.5) and a tiny PatchTST (batch norm) built from configs,
trained on a toy hourly table of two series. For each (architecture, method) row: the trainable
count (computed here from the layers' shapes), a short fit lowers the validation loss, the
checkpoint holds only what trained, resuming from a mid-run checkpoint is exact, and ``merge``
loads with ``from_pretrained`` (``export`` with ``PeftModel`` or ``load_adapter``) and gives the
same forecasts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from conftest import TS_CONTEXT, TS_HORIZON, quiet_trainer
from lit_peft import methods
from lit_peft.data import ForecastingData
from lit_peft.export import export_checkpoint, load_adapter, load_checkpoint, merge_checkpoint
from lit_peft.methods.houlsby import is_norm
from lit_peft.methods.qlora import exact_cpu_compute
from lit_peft.tasks import Forecasting

R, B = 4, 4

#: per architecture: the transformer blocks' prefix, the attention/feed-forward output layers
#: (Houlsby's places), and IA3's targets (keys, values, the feed-forward output, scaled on its input)
ARCH = {
    "timesfm": {"blocks": "decoder.layers.", "places": ("self_attn.o_proj", "mlp.down_proj"), "ff": "down_proj"},
    "timesfm2_5": {"blocks": "model.layers.", "places": ("self_attn.o_proj", "mlp.fc2"), "ff": "fc2"},
    "patchtst": {"blocks": "model.encoder.layers.", "places": ("self_attn.out_proj", "ff.3"), "ff": "ff.3"},
}


def base_model(folder: str) -> nn.Module:
    task = Forecasting(backbone=folder)
    task.configure_backbone()
    return task.backbone


def linears(model: nn.Module, suffixes: tuple[str, ...] = ()) -> list[nn.Linear]:
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and (not suffixes or n.endswith(suffixes))]


def lora(model, suffixes=("q_proj", "v_proj"), per_layer=lambda m: 0, rank=R) -> int:
    return sum(rank * (m.in_features + m.out_features) + per_layer(m) for m in linears(model, suffixes))


def params(model, keep: Callable[[str], bool]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if keep(n))


def total(model, arch) -> int:
    return params(model, lambda n: True)


def probe(model, arch) -> int:
    return params(model, lambda n: not n.startswith(ARCH[arch]["blocks"]))


def last_block(model, arch) -> int:
    prefix = ARCH[arch]["blocks"]
    last = max(int(n[len(prefix):].split(".")[0]) for n, _ in model.named_parameters() if n.startswith(prefix))
    return params(model, lambda n: n.startswith(f"{prefix}{last}."))


def ia3(model, arch) -> int:
    ff = ARCH[arch]["ff"]
    return sum(m.out_features for m in linears(model, ("k_proj", "v_proj"))) + sum(m.in_features for m in linears(model, (ff,)))


def houlsby(model, arch) -> int:
    places = linears(model, ARCH[arch]["places"])
    norms = sum(p.numel() for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False))
    return sum(2 * m.out_features * B + B + m.out_features for m in places) + norms


def sparse(model, suffixes, density) -> int:
    return sum(max(1, math.ceil(density * m.in_features * m.out_features)) for m in linears(model, suffixes))


@dataclass
class Case:
    id: str
    make: Callable[[str], methods.Method]  # arch -> method
    trainable: Callable[[nn.Module, str], int]  # (base model, arch) -> count
    lr: float = 3e-2
    mergeable: bool = True
    export: str = "peft"  # "peft", "lit-peft" or "none"


ALL = ()  # every linear layer: the all-linear preset (forecasters have no vocabulary-sized output layer)
CASES = [
    Case("full", lambda a: methods.FullFineTune(), total, lr=3e-3, export="none"),
    Case("linear_probe", lambda a: methods.LinearProbe(), probe, lr=1e-2, export="none"),
    Case("partial", lambda a: methods.PartialFineTune(last_n_blocks=1), lambda m, a: probe(m, a) + last_block(m, a),
         lr=3e-3, export="none"),
    Case("lora", lambda a: methods.LoRA(r=R, alpha=8), lambda m, a: lora(m)),
    Case("lora_qkv", lambda a: methods.LoRA(r=R, alpha=8, targets="qkv"), lambda m, a: lora(m, ("q_proj", "k_proj", "v_proj"))),
    Case("lora_all_linear", lambda a: methods.LoRA(r=R, alpha=8, targets="all-linear"), lambda m, a: lora(m, ALL), lr=1e-2),
    Case("dora", lambda a: methods.DoRA(r=R, alpha=8), lambda m, a: lora(m, per_layer=lambda x: x.out_features), lr=1e-1),
    Case("rslora", lambda a: methods.RsLoRA(r=R, alpha=8), lambda m, a: lora(m)),
    Case("pissa", lambda a: methods.PiSSA(r=R, alpha=R), lambda m, a: lora(m), lr=1e-2),
    Case("olora", lambda a: methods.OLoRA(r=R, alpha=8), lambda m, a: lora(m), lr=1e-2),
    Case("eva", lambda a: methods.EVA(r=R, alpha=8, rho=1.0), lambda m, a: lora(m)),
    Case("adalora", lambda a: methods.AdaLoRA(init_r=R, target_r=2, alpha=8, tinit=4, tfinal=4, delta_t=2),
         lambda m, a: lora(m, per_layer=lambda x: R)),
    Case("ia3", lambda a: methods.IA3(targets=["k_proj", "v_proj", ARCH[a]["ff"]], feedforward_modules=[ARCH[a]["ff"]]),
         ia3, lr=5e-2),
    Case("loha", lambda a: methods.PeftMethod("peft.LoHaConfig", {"r": R, "alpha": 8}), lambda m, a: 2 * lora(m)),
    Case("qlora", lambda a: methods.QLoRA(r=R, alpha=8), lambda m, a: lora(m)),
    Case("galore", lambda a: methods.GaLore(rank=4, update_proj_gap=5, scale=1.0), total, lr=3e-3, export="none"),
    Case("sift", lambda a: methods.SIFT(density=0.05, selection_batches=2), lambda m, a: sparse(m, ALL, 0.05),
         export="lit-peft"),
    Case("rosa", lambda a: methods.RoSA(r=R, alpha=8, density=0.1, selection_batches=2),
         lambda m, a: lora(m) + sparse(m, ("q_proj", "v_proj"), 0.1), export="lit-peft"),
    Case("houlsby", lambda a: methods.Houlsby(bottleneck=B), houlsby, lr=1e-2, mergeable=False, export="lit-peft"),
]
ROWS = [(arch, case) for arch in ARCH for case in CASES]


def make_task(folder: str, case: Case) -> Forecasting:
    return Forecasting(backbone=folder, learning_rate=case.lr, warmup_ratio=0.0, lr_schedule="linear")


def make_data(toy_series) -> ForecastingData:
    # 480 training rows per series: 97 windows of each of the 2 series, 13 batches an epoch
    return ForecastingData(file=str(toy_series), target_columns=None, context_len=TS_CONTEXT, horizon_len=TS_HORIZON,
                           stride=4, eval_stride=8, batch_size=16)


@pytest.fixture(scope="module")
def folders(tiny_timesfm, tiny_timesfm2_5, tiny_patchtst) -> dict[str, str]:
    return {"timesfm": tiny_timesfm, "timesfm2_5": tiny_timesfm2_5, "patchtst": tiny_patchtst}


_RUNS: dict = {}


def trained(arch: str, case: Case, folders, toy_series, tmp_path_factory):
    """Two epochs (26 steps), with checkpoints at steps 10 and 20 and at each epoch's end."""
    key = (arch, case.id)
    if key not in _RUNS:
        folder = tmp_path_factory.mktemp(f"ts-{arch}-{case.id}")
        task, data, method = make_task(folders[arch], case), make_data(toy_series), case.make(arch)
        method.attach(task)
        before = quiet_trainer().validate(task, datamodule=data, verbose=False)[0]["val_loss"]
        ckpts = [ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=10, save_top_k=-1),
                 ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1)]
        quiet_trainer(max_epochs=2, callbacks=[method, *ckpts], enable_checkpointing=True).fit(task, datamodule=data)
        after = quiet_trainer().validate(task, datamodule=data, verbose=False)[0]["val_loss"]
        _RUNS[key] = (task, data, folder, before, after)
    return _RUNS[key]


def forecasts(backbone: nn.Module, folder: str, data: ForecastingData) -> torch.Tensor:
    """Point forecasts of the first validation batch by ``backbone`` (a plain or peft-wrapped model)."""
    task = Forecasting(backbone=folder)
    task.backbone = backbone.eval()
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        return task.forecast(batch["past_values"], batch["freq"], TS_HORIZON)[0]


@pytest.mark.parametrize("arch, case", ROWS, ids=[f"{a}-{c.id}" for a, c in ROWS])
def test_forecasting_method_contract(arch: str, case: Case, folders, toy_series, tmp_path, tmp_path_factory) -> None:
    from transformers import PatchTSTForPrediction, TimesFm2_5ModelForPrediction, TimesFmModelForPrediction

    auto = {"timesfm": TimesFmModelForPrediction, "timesfm2_5": TimesFm2_5ModelForPrediction,
            "patchtst": PatchTSTForPrediction}[arch]
    task, data, folder, before, after = trained(arch, case, folders, toy_series, tmp_path_factory)
    assert sum(p.numel() for p in task.parameters() if p.requires_grad) == case.trainable(base_model(folders[arch]), arch)
    assert after < before * 0.99, (before, after)  # a short fit lowers the validation loss

    # the last checkpoint holds only what trained (and batch norms' statistics where they train)
    ckpt = torch.load(folder / "epoch=1.ckpt", map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == task.trained_keys()
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable <= set(ckpt["state_dict"])
    assert all(k in trainable or k.endswith(("sparse_indices", "running_mean", "running_var", "num_batches_tracked"))
               for k in ckpt["state_dict"])

    # resuming mid-epoch 0 from step 10 ends with the uninterrupted run's weights
    resumed, method = make_task(folders[arch], case), case.make(arch)
    quiet_trainer(max_epochs=2, callbacks=[method]).fit(resumed, datamodule=make_data(toy_series),
                                                        ckpt_path=folder / "step=10.ckpt")
    expected = {k: v for k, v in task.state_dict().items() if k in task.trained_keys()}
    got = {k: v for k, v in resumed.state_dict().items() if k in resumed.trained_keys()}
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)

    last = folder / "epoch=1.ckpt"
    reference = forecasts(load_checkpoint(last).backbone, folders[arch], data)
    torch.testing.assert_close(reference, forecasts(task.backbone, folders[arch], data), rtol=0, atol=1e-5)
    if case.mergeable:
        merge_checkpoint(last, tmp_path / "merged")
        merged = auto.from_pretrained(tmp_path / "merged")
        assert (reference - forecasts(merged, folders[arch], data)).abs().max() < 1e-4
        assert not (tmp_path / "merged" / "tokenizer_config.json").exists()  # a forecaster has no tokenizer
    else:
        from lit_peft.errors import ConfigError

        with pytest.raises(ConfigError, match="cannot be merged"):
            merge_checkpoint(last, tmp_path / "merged")
    if case.export == "peft":
        from peft import PeftModel

        export_checkpoint(last, tmp_path / "adapter")
        base = exact_cpu_compute(auto.from_pretrained(folders[arch], **case.make(arch).backbone_kwargs()))
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
        assert (reference - forecasts(loaded, folders[arch], data)).abs().max() < 1e-4
    elif case.export == "lit-peft":
        export_checkpoint(last, tmp_path / "adapter")
        assert (reference - forecasts(load_adapter(tmp_path / "adapter").backbone, folders[arch], data)).abs().max() < 1e-5


def test_a_frozen_batch_norm_keeps_its_statistics_and_a_trained_one_saves_them(tiny_patchtst, toy_series, tmp_path) -> None:
    """PatchTST normalises with batch norm: under LoRA its running statistics stay the pretrained
    ones (the layer stays in eval mode); under full fine-tuning they change and are checkpointed."""
    pretrained = {k: v.clone() for k, v in base_model(tiny_patchtst).state_dict().items() if "running_mean" in k}
    assert pretrained
    for make, changes in ((lambda: methods.LoRA(r=R, alpha=8), False), (methods.FullFineTune, True)):
        task, method = Forecasting(backbone=tiny_patchtst, learning_rate=1e-2), make()
        method.attach(task)
        quiet_trainer(max_steps=3, callbacks=[method]).fit(task, datamodule=make_data(toy_series))
        now = {k.split("backbone.", 1)[1].replace("base_model.model.", ""): v for k, v in task.state_dict().items()
               if "running_mean" in k}
        moved = [k for k in pretrained if not torch.equal(now[k], pretrained[k])]
        assert bool(moved) is changes, moved
        assert any("running_mean" in k for k in task.trained_keys()) is changes
