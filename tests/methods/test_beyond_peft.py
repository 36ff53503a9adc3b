"""What sets the methods written outside peft apart (the shared table checks the common contract):
SIFT's and RoSA's sparse increments, GaLore's projected optimizer state, Houlsby's adapters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from conftest import LAYERS, quiet_trainer
from lit_peft import methods
from lit_peft.data import SST2Data
from lit_peft.errors import ConfigError
from lit_peft.methods.houlsby import BottleneckAdapter
from lit_peft.methods.sparse import SparseDelta, choose_by_gradient
from lit_peft.metrics import optimizer_state_bytes
from lit_peft.tasks import SequenceClassification


def task_and_data(tiny_bert, toy_data, lr=1e-2):
    task = SequenceClassification(backbone=tiny_bert, num_labels=2, learning_rate=lr, warmup_ratio=0.0)
    data = SST2Data(data_dir=str(toy_data), batch_size=16, max_length=16, tokenizer=tiny_bert)
    return task, data


def test_sparse_delta_adds_its_entries_and_folds_to_the_same_layer() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    wrapper = SparseDelta(layer, k=4)
    with torch.no_grad():
        wrapper.sparse_indices.copy_(torch.tensor([0, 7, 13, 29]))
        wrapper.sparse_values.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    delta = wrapper.delta()
    assert delta.flatten()[[0, 7, 13, 29]].tolist() == [1.0, -2.0, 0.5, 3.0] and delta.count_nonzero() == 4
    x = torch.randn(3, 6)
    expected = x @ (layer.weight + delta).T + layer.bias
    torch.testing.assert_close(wrapper(x), expected)
    folded = wrapper.fold()
    torch.testing.assert_close(folded(x), expected)


def test_sift_chooses_the_entries_with_the_largest_gradients(tiny_bert, toy_data) -> None:
    # the reference: |dL/dW| of the plain model summed over the first 2 batches, top 10% per query weight
    reference, data = task_and_data(tiny_bert, toy_data)
    reference.configure_backbone()
    reference.eval()
    data.setup("fit")
    for i, batch in enumerate(data.train_dataloader()):
        if i == 2:
            break
        reference.backbone.zero_grad()
        reference.loss(batch).backward()
        for layer in range(LAYERS):
            weight = reference.backbone.bert.encoder.layer[layer].attention.self.query.weight
            weight.score = weight.grad.abs() + getattr(weight, "score", 0)

    task, _ = task_and_data(tiny_bert, toy_data)
    methods.SIFT(density=0.1, targets=["query"], selection_batches=2).attach(task)
    layers = {n: m for n, m in task.named_modules() if isinstance(m, SparseDelta)}
    assert len(layers) == LAYERS
    choose_by_gradient(task, SimpleNamespace(datamodule=data, strategy=SimpleNamespace(root_device=torch.device("cpu"))),
                       layers, batches=2)
    for layer in range(LAYERS):
        score = reference.backbone.bert.encoder.layer[layer].attention.self.query.weight.score.flatten()
        chosen = task.backbone.bert.encoder.layer[layer].attention.self.query.sparse_indices
        expected = torch.topk(score, chosen.numel()).indices
        assert set(chosen.tolist()) == set(expected.tolist())
    assert all(not p.requires_grad for n, p in task.named_parameters() if n.endswith("query.base_layer.weight"))


def test_sift_keeps_optimizer_state_only_for_its_entries(tiny_bert, toy_data) -> None:
    task, data = task_and_data(tiny_bert, toy_data)
    method = methods.SIFT(density=0.05, selection_batches=2)
    trainer = quiet_trainer(max_steps=2, callbacks=[method])
    trainer.fit(task, datamodule=data)
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    moments = [s["exp_avg"] for s in trainer.optimizers[0].state.values()]
    assert sum(m.numel() for m in moments) == trainable  # one moment entry per trained entry, nothing weight-sized
    assert all(p.grad is None or p.grad.shape == p.shape for p in task.parameters())
    for layer in task.modules():
        if isinstance(layer, SparseDelta):  # the chosen entries are distinct positions inside the weight
            idx = layer.sparse_indices
            assert idx.unique().numel() == idx.numel() and int(idx.max()) < layer.out_features * layer.in_features


def test_galore_projects_the_optimizer_state_and_checkpoints_load_weights_only(tiny_bert, toy_data, tmp_path) -> None:
    runs = {}
    for name, method in (("adamw", methods.FullFineTune()), ("galore", methods.GaLore(rank=8, update_proj_gap=5))):
        task, data = task_and_data(tiny_bert, toy_data, lr=1e-3)
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, filename="last", every_n_train_steps=3)
        trainer = quiet_trainer(max_steps=3, callbacks=[method, ckpt], enable_checkpointing=True)
        trainer.fit(task, datamodule=data)
        runs[name] = (task, trainer.optimizers[0], method)
    task, optimizer, method = runs["galore"]
    names = {id(p): n for n, p in task.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if names[id(p)] in method.projected:
                assert 8 in state["exp_avg"].shape and state["exp_avg"].numel() < p.numel()
                assert state["projector"].ortho_matrix is not None
            else:
                assert state["exp_avg"].shape == p.shape
    assert optimizer_state_bytes(optimizer) < 0.6 * optimizer_state_bytes(runs["adamw"][1])
    saved = torch.load(tmp_path / "galore" / "last.ckpt", weights_only=True)  # projectors stored as plain data
    projectors = [s["projector"] for s in saved["optimizer_states"][0]["state"].values() if "projector" in s]
    assert projectors and all(isinstance(p["ortho_matrix"], torch.Tensor) for p in projectors)


def test_galore_8bit_needs_cuda_and_bad_settings_are_named(tiny_bert) -> None:
    task = SequenceClassification(backbone=tiny_bert, num_labels=2)
    method = methods.GaLore(rank=8, optimizer="adamw8bit")
    method.attach(task)
    with pytest.raises(ConfigError, match="CUDA only"):
        method.build_optimizer(method.param_groups(task, 1e-3, 0.0))
    with pytest.raises(ConfigError, match="unknown GaLore optimizer 'adam'"):
        methods.GaLore(optimizer="adam")
    with pytest.raises(ConfigError, match="no weight"):
        methods.GaLore(rank=512).attach(SequenceClassification(backbone=tiny_bert, num_labels=2))


def test_houlsby_starts_as_the_pretrained_model_with_two_adapters_per_block(tiny_bert, toy_data) -> None:
    task, data = task_and_data(tiny_bert, toy_data)
    plain, _ = task_and_data(tiny_bert, toy_data)
    plain.configure_backbone()
    methods.Houlsby(bottleneck=8).attach(task)
    places = sorted(n.rsplit(".", 1)[0] for n, m in task.backbone.named_modules() if isinstance(m, BottleneckAdapter))
    assert places == sorted([f"bert.encoder.layer.{i}.attention.output.dense" for i in range(LAYERS)]
                            + [f"bert.encoder.layer.{i}.output.dense" for i in range(LAYERS)])
    data.setup("fit")
    batch = {k: v for k, v in next(iter(data.val_dataloader())).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(task.eval()(**batch), plain.eval()(**batch), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="no module named 'attn_out'"):
        methods.Houlsby(targets=["attn_out"]).attach(SequenceClassification(backbone=tiny_bert, num_labels=2))


def test_rosa_trains_lora_and_a_sparse_part_on_the_same_layers(tiny_bert, toy_data) -> None:
    task, data = task_and_data(tiny_bert, toy_data)
    quiet_trainer(max_steps=3, callbacks=[methods.RoSA(r=4, alpha=8, density=0.1, selection_batches=2)]).fit(
        task, datamodule=data)
    trained = [n for n, p in task.named_parameters() if p.requires_grad and "classifier" not in n]
    for layer, proj in ((i, p) for i in range(LAYERS) for p in ("query", "value")):
        prefix = f"backbone.base_model.model.bert.encoder.layer.{layer}.attention.self.{proj}."
        assert {prefix + "lora_A.default.weight", prefix + "lora_B.default.weight",
                prefix + "base_layer.sparse_values"} <= set(trained)
        values = task.get_parameter(prefix + "base_layer.sparse_values")
        assert values.abs().sum() > 0  # the sparse part moved


def test_targets_that_are_not_weight_matrices_are_named(tiny_bert, toy_data) -> None:
    def trainable(method) -> int:
        task, _ = task_and_data(tiny_bert, toy_data)
        method.attach(task)
        return sum(p.numel() for p in task.parameters() if p.requires_grad)

    # one name as a string is one target, as in a list (not its characters)
    assert trainable(methods.Houlsby(bottleneck=4, targets="output.dense")) == \
        trainable(methods.Houlsby(bottleneck=4, targets=["output.dense"]))
    with pytest.raises(ConfigError, match="GaLore target '.*attention' has no weight matrix"):
        trainable(methods.GaLore(rank=2, targets=["attention"]))
    with pytest.raises(ConfigError, match=r"wrap linear layers .* only; target '.*attention.output \(BertSelfOutput\)'"):
        trainable(methods.SIFT(density=0.05, targets=["attention.output"]))


def test_qlora_quantizes_the_linear_layers_while_loading(tiny_bert, monkeypatch) -> None:
    """The backbone loads with a 4-bit quantization config (never as a full-precision model first):
    every encoder linear layer is bitsandbytes NF4 with double quantization; head and embeddings are not."""
    from transformers import AutoModelForSequenceClassification

    calls = []
    original = AutoModelForSequenceClassification.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", spy)
    task = SequenceClassification(backbone=tiny_bert, num_labels=2)
    methods.QLoRA(r=4, alpha=8, double_quant=True).attach(task)
    assert len(calls) == 1 and calls[0]["quantization_config"].load_in_4bit
    assert "classifier" in calls[0]["quantization_config"].llm_int8_skip_modules
    model = task.backbone.get_base_model()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n}
    quantized = {n for n, m in linears.items() if type(m).__name__ == "Linear4bit"}
    assert quantized == {n for n in linears if n.startswith("bert.")}  # encoder and pooler: every one
    for name in quantized:
        state = model.get_submodule(name).weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # double quantization quantizes the scales too
    assert not any(type(m).__name__ == "Linear4bit" for n, m in model.named_modules() if "classifier" in n)
    assert model.bert.embeddings.word_embeddings.weight.dtype == torch.float32


def test_sift_adapter_size_counts_its_indices(tiny_bert, toy_data, tmp_path) -> None:
    import json

    from lit_peft.metrics import EfficiencyReport

    task, data = task_and_data(tiny_bert, toy_data)
    method = methods.SIFT(density=0.05, selection_batches=1)
    quiet_trainer(max_steps=1, callbacks=[method, EfficiencyReport()], default_root_dir=str(tmp_path)).fit(
        task, datamodule=data)
    summary = json.loads((tmp_path / "lit-peft" / "version_0" / "summary.json").read_text())  # no logger: a run folder of its own
    values = sum(p.numel() * p.element_size() for p in task.parameters() if p.requires_grad)
    indices = sum(b.numel() * b.element_size() for n, b in task.named_buffers() if n.endswith("sparse_indices"))
    assert indices > 0 and summary["adapter_mb"] == pytest.approx((values + indices) / 2**20, abs=1e-3)
