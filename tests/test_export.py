"""Using the adapted model (learner.predict) and exporting meta-learned weights (metaopt export)."""

from __future__ import annotations

import json

import timm
import torch
from conftest import image_tasks
from torch.func import functional_call

from metaopt import MetaLearner
from metaopt.cli import main
from metaopt.models import conv4
from metaopt.trainer import load_run


def test_predict_uses_the_learners_batchnorm_policy():
    torch.manual_seed(0)
    model = conv4(num_classes=5, hidden=8)
    learner = MetaLearner(model, inner_steps=2, inner_lr=0.4)
    opt = torch.optim.Adam(learner.parameters(), 1e-2)
    for seed in range(3):
        opt.zero_grad()
        learner.backward(image_tasks(4, dtype=torch.float32, seed=seed))
        opt.step()
    task = image_tasks(1, dtype=torch.float32, seed=9)[0]
    out = learner.predict(task)
    metrics = learner.evaluate([task]).metrics
    loss = torch.nn.functional.cross_entropy(out, task[3]).item()
    assert abs(loss - metrics["query_loss"]) < 1e-5  # the same numbers evaluate() reports
    # the naive route (eval-mode BatchNorm with never-written running statistics) gives other outputs
    naive = functional_call(model.eval(), learner.adapt(task), (task[2],))
    assert (naive - out).abs().max() > 1e-3


def test_export_writes_timm_keys_that_timm_loads_strictly(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--model", "resnet10t", "--iterations", "1", "--meta-batch", "1"]
    assert main([*args, "--query", "1", "--no-progress", "--inner-lr", "0.01"]) == 0
    assert main(["export", str(run)]) == 0
    how = json.loads((run / "export" / "model.json").read_text())
    assert how["format"] == "timm" and how["classifier"] == "fc"
    state = torch.load(run / "export" / "model.pt", weights_only=True)
    plain = timm.create_model("resnet10t", num_classes=5, in_chans=1)
    plain.load_state_dict(state)  # strict: no key remapping needed
    _, learner = load_run(run)
    x = torch.randn(3, 1, 28, 28)
    plain.eval()
    learner.model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), learner.model(x), atol=1e-5)


def test_export_of_a_metaopt_model_keeps_its_keys(tmp_path):
    run = tmp_path / "run"
    assert (
        main(["train", "--out", str(run), "--iterations", "1", "--meta-batch", "1", "--query", "1", "--no-progress"])
        == 0
    )
    assert main(["export", str(run), "--out", str(tmp_path / "w.pt")]) == 0
    model = conv4(num_classes=5)
    model.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
