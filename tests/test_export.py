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


def test_an_rgb_folder_run_exports_a_load_line_that_loads_and_gives_the_learners_outputs(tmp_path, capsys):
    """The printed line said in_chans=1 for every run: an RGB run's weights did not load (size mismatch)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "rgb"
    for c in range(6):
        (data / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(data / f"c{c}" / f"{i}.png")
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data", f"folder:{data}", "--model", "resnet10t", "--ways", "2"]
    args += ["--query", "1", "--image-size", "12", "--meta-batch", "1", "--iterations", "1", "--no-progress"]
    assert main([*args, "--inner-lr", "0.01", "--normalize", "true"]) == 0
    capsys.readouterr()
    assert main(["export", str(run)]) == 0
    printed = capsys.readouterr().out
    line = next(row[len("load: ") :] for row in printed.splitlines() if row.startswith("load: "))
    assert "in_chans=3" in line
    how = json.loads((run / "export" / "model.json").read_text())
    assert how["load"] == line and how["channels"] == 3
    mean, std = how["inputs"]["normalize"]["mean"], how["inputs"]["normalize"]["std"]
    assert how["inputs"]["shape"] == [3, 12, 12] and len(mean) == len(std) == 3
    exec(line, {"timm": timm, "torch": torch})  # the printed line, exactly as written: loads strictly
    constructor, weights = line.split(".load_state_dict(")
    plain = eval(constructor, {"timm": timm})
    plain.load_state_dict(eval(weights[:-1], {"torch": torch}))
    _, learner = load_run(run)
    x, y = torch.rand(4, 3, 12, 12), torch.arange(2).repeat(2)
    normalised = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    expected = learner.predict((normalised, y, normalised, y), steps=0)  # the learner's own outputs
    assert how["after_load"] == "metaopt.models.use_batch_statistics(model)"
    import metaopt

    exec(how["after_load"], {"metaopt": metaopt, "model": plain})
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(plain(normalised), expected, atol=1e-5)
    assert f"{[3, 12, 12]}" in printed and "mean" in printed


def test_predict_warns_on_a_single_example_under_transductive_batchnorm():
    """Documented but not caught: one image at a time under transductive BN gives worse answers."""
    import warnings

    import pytest

    from metaopt.learner import SingleExampleBatchNormWarning

    torch.manual_seed(0)
    learner = MetaLearner(conv4(num_classes=5, hidden=8), inner_steps=1, inner_lr=0.4)
    task = image_tasks(1, dtype=torch.float32, seed=9)[0]
    with pytest.warns(SingleExampleBatchNormWarning, match="bn_policy='transductive'.*whole query set"):
        learner.predict(task, task[2][:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.predict(task)  # the whole query set: no warning
        running = MetaLearner(conv4(num_classes=5, hidden=8), inner_steps=1, inner_lr=0.4, bn_policy="running")
        running.predict(task, task[2][:1])  # running statistics: one example is fine


def test_the_default_runs_export_line_builds_the_right_model(tmp_path, capsys):
    """The load line said metaopt.create_model('auto', ...), which builds nothing."""
    import metaopt

    run = tmp_path / "run"
    assert (
        main(["train", "--out", str(run), "--iterations", "1", "--meta-batch", "1", "--query", "1", "--no-progress"])
        == 0
    )
    capsys.readouterr()
    assert main(["export", str(run)]) == 0
    printed = capsys.readouterr().out
    line = next(r[len("load: ") :] for r in printed.splitlines() if r.startswith("load: "))
    assert line.startswith("metaopt.create_model('conv4', num_classes=5, img_size=28, in_chans=1)")
    exec(line, {"metaopt": metaopt, "torch": torch})  # loads strictly, as printed
    model = eval(line.split(".load_state_dict(")[0], {"metaopt": metaopt})
    model.load_state_dict(torch.load(run / "export" / "model.pt", weights_only=True))
    _, learner = load_run(run)
    x, y = torch.rand(10, 1, 28, 28), torch.arange(5).repeat(2)
    expected = learner.predict((x, y, x, y), steps=0)  # how the learner itself computes outputs
    model.eval()
    with torch.no_grad():  # eval-mode BatchNorm on untrained running statistics: another model's outputs
        assert not torch.allclose(model(x), expected, atol=1e-3)
    then = next(r[len("then: ") :] for r in printed.splitlines() if r.startswith("then: "))
    assert then.startswith("metaopt.models.use_batch_statistics(model)  # BatchNorm: the run normalised")
    exec(then.split("  #")[0], {"metaopt": metaopt, "model": model})  # the printed line, as written
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_a_meta_sgd_export_says_how_it_adapts_and_carries_its_learned_rates(tmp_path, capsys):
    """The export held the model's weights only: a Meta-SGD run's learned per-parameter rates were dropped
    without a word, and nothing said how many steps at which rate the run adapts with."""
    import metaopt

    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--iterations", "3", "--meta-batch", "2", "--query", "2", "--no-progress"]
    assert main([*args, "--plugin", "meta_sgd", "--meta-lr", "0.05", "--inner-steps", "2"]) == 0
    capsys.readouterr()
    assert main(["export", str(run)]) == 0
    out = capsys.readouterr().out
    assert "adapts with: 2 sgd steps at inner_lr 0.4, plugins: meta_sgd" in out
    assert "plugin modules (meta_sgd_lr) -> " in out
    how = json.loads((run / "export" / "model.json").read_text())
    steps = how["adaptation"]
    assert steps == {"inner_steps": 2, "inner_lr": 0.4, "inner_optimizer": "sgd", "first_order": False,
                     "plugins": [{"name": "meta_sgd"}]}  # fmt: skip
    # the documented way back: the load line, a learner built as 'adaptation' says, the plugin modules loaded
    model = eval(how["load"].split(".load_state_dict(")[0], {"metaopt": metaopt})
    model.load_state_dict(torch.load(run / "export" / "model.pt", weights_only=True))
    rebuilt = MetaLearner(model, [p["name"] for p in steps["plugins"]], inner_steps=2, inner_lr=steps["inner_lr"])
    before = [p.detach().clone() for p in rebuilt.plugin_modules.parameters()]
    rebuilt.plugin_modules.load_state_dict(torch.load(how["plugin_modules"]["file"], weights_only=True))
    assert any(not torch.equal(a, p) for a, p in zip(before, rebuilt.plugin_modules.parameters(), strict=True))
    _, learner = load_run(run)
    tasks = image_tasks(3, ways=5, query=2, dtype=torch.float32, seed=7)
    expected = learner.evaluate(tasks).metrics["query_loss"]
    assert rebuilt.evaluate(tasks).metrics["query_loss"] == expected
