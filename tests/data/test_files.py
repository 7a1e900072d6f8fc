"""The lazily loaded CLI sources folder: and csv:, workers, augmentation, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from metaopt.cli import main
from metaopt.config import TrainConfig
from metaopt.data.sources import make_sampler
from metaopt.errors import DataError
from metaopt.trainer import Trainer


def _miniimagenet_like(root, classes=6, per_class=4):
    """images/ + train.csv and test.csv with filename,label rows (the usual split-file layout)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = {"train": [], "test": []}
    for c in range(classes):
        split = "test" if c >= classes - 2 else "train"
        for i in range(per_class):
            name = f"n{c:04d}_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "images" / name)
            rows[split].append(f"{name},n{c:04d}")
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("filename,label\n" + "\n".join(lines) + "\n")
    return root


def test_csv_split_files_give_tasks_of_their_classes(tmp_path):
    root = _miniimagenet_like(tmp_path)
    train = make_sampler(
        f"csv:{root / 'train.csv'}", split="train", ways=3, shots=1, query=2, image_size=12, channels=3
    )
    test = make_sampler(f"csv:{root / 'train.csv'}", split="test", ways=2, shots=1, query=2, image_size=12, channels=3)
    assert train.episodes.dataset.classes == ["n0000", "n0001", "n0002", "n0003"]
    assert test.episodes.dataset.classes == ["n0004", "n0005"]  # the sibling test.csv
    task = train.sample(1)[0]
    assert task.support_x.shape == (3, 3, 12, 12) and task.support_x.dtype == torch.float32
    (root / "test.csv").unlink()
    with pytest.raises(DataError, match="sibling file .*test.csv"):
        make_sampler(f"csv:{root / 'train.csv'}", split="test", ways=2, shots=1, query=1)
    (root / "images" / "n0000_0.jpg").unlink()
    with pytest.raises(DataError, match="missing under"):
        make_sampler(f"csv:{root / 'train.csv'}", split="train", ways=2, shots=1, query=1)


def _class_folder(root, classes, per_class=3, size=8):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_a_test_split_that_would_be_the_training_classes_is_refused(tmp_path, capsys):
    """A folder of 4 classes used to give all 4 as its "test" split (every fifth class needs 5), and
    csv:test.csv is its own sibling test.csv: `metaopt eval` scored the training classes as "test"."""
    _class_folder(tmp_path / "four", [f"class{c}" for c in range(4)])
    spec = f"folder:{tmp_path / 'four'}"
    train = make_sampler(spec, split="train", ways=2, shots=1, query=1, image_size=8)
    assert train.episodes.dataset.classes == ["class0", "class1", "class2", "class3"]
    with pytest.raises(DataError, match=r"has 4 classes; the test split of folder: data is every fifth class"):
        make_sampler(spec, split="test", ways=2, shots=1, query=1, image_size=8)
    out = tmp_path / "run"
    base = ["train", "--out", str(out), "--data", spec, "--ways", "2", "--query", "1", "--image-size", "16"]
    assert main([*base, "--iterations", "1", "--meta-batch", "1", "--no-progress"]) == 0
    assert main(["eval", str(out), "--tasks", "2", "--json", "--no-progress"]) == 2
    assert "needs at least 5 classes" in capsys.readouterr().err
    assert main(["eval", str(out), "--tasks", "2", "--json", "--no-progress", "--split", "train"]) == 0
    root = _miniimagenet_like(tmp_path / "mini")
    with pytest.raises(DataError, match=r"trains on test.csv, which is also its test split"):
        make_sampler(f"csv:{root / 'test.csv'}", split="test", ways=2, shots=1, query=1)


def test_a_run_refuses_data_whose_listing_changed_since_it_was_trained(tmp_path, capsys):
    """One class added to a folder shifts "every fifth class": the test split of the run's own data then held
    classes it meta-trained on, and `metaopt eval` scored them as "test" without a word."""
    data = tmp_path / "data"
    _class_folder(data, [f"c{i}" for i in range(10)])
    out = tmp_path / "run"
    spec = f"folder:{data}"
    common = ["--no-progress"]
    train = ["train", "--out", str(out), "--data", spec, "--ways", "2", "--query", "1", "--image-size", "16"]
    assert main([*train, "--iterations", "1", "--meta-batch", "1", *common]) == 0
    record = json.loads((out / "data.json").read_text())
    assert record["data"] == spec and sorted(record["splits"]["test"]) == ["c4", "c9"]
    assert len(record["splits"]["train"]) == 8 and record["splits"]["train"]["c0"][0] == 3
    evaluate = ["eval", str(out), "--tasks", "2", "--json", "--no-baseline", *common]
    assert main(evaluate) == 0
    capsys.readouterr()
    _class_folder(data, ["b_added"])  # sorts first: every fifth class is now c3 and c8
    assert make_sampler(spec, split="test", ways=2, shots=1, query=1, image_size=16).episodes.dataset.classes == [
        "c3",
        "c8",
    ]
    assert main(evaluate) == 2
    err = capsys.readouterr().err
    assert "test split of folder:" in err and "the test split now holds meta-training classes ('c3', 'c8')" in err
    assert main(["train", "--resume", "--out", str(out), "--iterations", "2", *common]) == 2
    err = capsys.readouterr().err
    assert "train split of folder:" in err and "3 classes added ('b_added', 'c4', 'c9')" in err
    assert "the train split now holds the run's held-out classes ('c4', 'c9')" in err
    assert main([*evaluate, "--data", spec]) == 0  # other data, knowingly
    capsys.readouterr()
    for path in (data / "b_added").iterdir():
        path.unlink()
    (data / "b_added").rmdir()
    Image.new("L", (8, 8)).save(data / "c0" / "extra.png")
    assert main([*evaluate, "--split", "train"]) == 2
    assert "1 class with other images (e.g. 'c0': 3 images then, 4 now)" in capsys.readouterr().err
    (data / "c0" / "extra.png").unlink()
    assert main(["train", "--resume", "--out", str(out), "--iterations", "2", *common]) == 0
    assert main([*train, "--iterations", "1", "--meta-batch", "1", "--overwrite", *common]) == 0
    assert json.loads((out / "data.json").read_text()) == record


def test_sixteen_bit_images_keep_their_range_not_clipped_white(tmp_path):
    """PIL's convert("L") clips a 16-bit image at 255: a microscope or X-ray PNG became nearly all white."""
    from metaopt.data.images import load_image_folder

    rng = np.random.default_rng(0)
    sources = {}
    for c in range(5):
        (tmp_path / "deep" / f"class{c}").mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 65536, (16, 16), dtype=np.uint16)
            Image.fromarray(pixels).save(tmp_path / "deep" / f"class{c}" / f"{i}.png")
            sources[(c, i)] = torch.from_numpy(pixels.astype(np.float64) / 65535.0)
    assert Image.open(tmp_path / "deep" / "class0" / "0.png").mode in ("I;16", "I")
    sampler = make_sampler(f"folder:{tmp_path / 'deep'}", split="train", ways=2, shots=1, query=1, image_size=16)
    task = sampler.sample(1)[0]
    assert task.support_x.dtype == torch.float32 and task.support_x.shape == (2, 1, 16, 16)
    for image in torch.cat([task.support_x, task.query_x]):  # each is one source, to 8-bit rounding
        assert min(float((image[0].double() - src).abs().max()) for src in sources.values()) <= 0.5 / 255 + 1e-6
    assert float(task.support_x.mean()) < 0.6  # uniform 16-bit noise: mean 0.5 (clipped, it was ~1.0)
    loaded = load_image_folder(tmp_path / "deep", size=16)
    first = loaded["class0"][0, 0].double()
    assert float((first - sources[(0, 0)]).abs().max()) <= 0.5 / 255 + 1e-6
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(tmp_path / "deep" / "class0" / "float.tiff")
    with pytest.raises(DataError, match=r"float.tiff.*float pixels \(mode F\), which have no fixed range"):
        load_image_folder(tmp_path / "deep", size=16)


def test_cli_trains_on_csv_data_with_workers_and_augmentation(tmp_path, capsys):
    root = _miniimagenet_like(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--data", f"csv:{root / 'train.csv'}", "--ways", "2", "--query", "1"]
    args += [
        "--image-size",
        "16",
        "--meta-batch",
        "2",
        "--iterations",
        "2",
        "--workers",
        "2",
        "--augment",
        "--no-progress",
    ]
    assert main(args) == 0
    assert '"channels": 3' in (out / "config.json").read_text()
    assert main(["eval", str(out), "--tasks", "4", "--json", "--no-progress"]) == 0


def test_resume_with_a_worker_fed_source_is_bit_identical(tmp_path):
    root = _miniimagenet_like(tmp_path / "data")
    config = dict(data=f"csv:{root / 'train.csv'}", ways=2, query=1, image_size=16, meta_batch=2, iterations=4)
    config.update(checkpoint_every=2, workers=2, augment=True, keep_checkpoints=5)
    full = Trainer(TrainConfig(**config), tmp_path / "run")
    full.train(progress=False)
    (tmp_path / "run" / "checkpoints" / "ckpt-00000004.pt").unlink()
    resumed = Trainer(TrainConfig(**config), tmp_path / "run", resume=True)
    assert resumed.iteration == 2
    resumed.train(progress=False)
    for a, b in zip(full.learner.parameters(), resumed.learner.parameters(), strict=True):
        assert torch.equal(a, b)


def test_augmentation_changes_training_images_only(tmp_path):
    root = _miniimagenet_like(tmp_path)
    spec = f"csv:{root / 'train.csv'}"
    kwargs = dict(ways=2, shots=1, query=1, image_size=16, channels=3)
    plain = make_sampler(spec, split="train", **kwargs).sample(1)[0]
    augmented = make_sampler(spec, split="train", augment=True, **kwargs).sample(1)[0]
    assert not torch.equal(plain.support_x, augmented.support_x)
    with_workers = make_sampler(spec, split="train", augment=True, workers=2, **kwargs).sample(1)[0]
    assert torch.equal(augmented.support_x, with_workers.support_x)  # random transforms seeded per task
    test_plain = make_sampler(spec, split="test", **kwargs).sample(1)[0]
    test_aug = make_sampler(spec, split="test", augment=True, **kwargs).sample(1)[0]
    assert torch.equal(test_plain.support_x, test_aug.support_x)


@pytest.mark.slow
def test_sigkill_then_resume_with_workers_and_augmentation_is_bit_identical(tmp_path):
    """A worker-fed, augmented csv: run killed mid-training and resumed ends as the uninterrupted run."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import OUTSIDE

    from metaopt.checkpoint import load_safe

    root = _miniimagenet_like(tmp_path / "data")
    args = ["--data", f"csv:{root / 'train.csv'}", "--ways", "2", "--query", "1", "--image-size", "16"]
    args += ["--meta-batch", "2", "--iterations", "12", "--checkpoint-every", "1", "--workers", "2", "--augment"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(out, *extra):
        return [sys.executable, "-m", "metaopt.cli", "train", "--out", str(out), *args, "--no-progress", *extra]

    def final(out):
        state = load_safe(sorted((out / "checkpoints").glob("ckpt-*.pt"))[-1])
        assert state["iteration"] == 12
        return state["learner"]

    subprocess.run(cli(tmp_path / "straight"), env=env, check=True, capture_output=True, cwd=OUTSIDE)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cli(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=OUTSIDE)
    deadline = time.time() + 120
    log = out / "metrics.jsonl"
    while (
        (not log.is_file() or len(log.read_text().splitlines()) < 4) and proc.poll() is None and time.time() < deadline
    ):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    subprocess.run(cli(out, "--resume"), env=env, check=True, capture_output=True, cwd=OUTSIDE)
    a, b = final(tmp_path / "straight"), final(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["iteration"] for x in log.read_text().splitlines()] == list(range(1, 13))


def test_test_alphabets_chosen_by_hand_warn_when_the_run_trained_on_them(tmp_path, capsys, omniglot_dir):
    """An Omniglot run records its alphabet split; `eval --test-alphabet` naming a training alphabet scored
    memorisation as few-shot accuracy without a word."""
    import warnings

    from metaopt.data.splits import HeldOutWarning

    run = tmp_path / "run"
    archive = omniglot_dir / "images_background_small1.zip"
    args = ["train", "--out", str(run), "--data", f"omniglot:{archive}", "--iterations", "1", "--meta-batch", "1"]
    assert main([*args, "--query", "1", "--no-progress"]) == 0
    record = json.loads((run / "data.json").read_text())["splits"]
    trained = sorted({name.split("/")[0] for name in record["train"]})
    held = sorted({name.split("/")[0] for name in record["test"]})
    assert trained and held and not set(trained) & set(held)
    evaluate = ["eval", str(run), "--tasks", "2", "--no-baseline", "--no-progress", "--json"]
    with pytest.warns(
        HeldOutWarning, match=rf"--test-alphabet evaluates on \d+ classes this run meta-trained on \('{trained[0]}/"
    ):
        assert main([*evaluate, "--test-alphabet", trained[0]]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", HeldOutWarning)
        assert main([*evaluate, "--test-alphabet", held[0]]) == 0


def test_a_test_csv_that_lists_training_classes_warns_at_training_and_evaluation(tmp_path, capsys):
    """Split files are the user's: a test.csv that repeats classes of train.csv evaluated memorisation."""
    from metaopt.data.splits import HeldOutWarning

    root = _miniimagenet_like(tmp_path / "data")
    with open(root / "test.csv", "a") as fh:
        fh.write("n0000_0.jpg,n0000\nn0000_1.jpg,n0000\nn0000_2.jpg,n0000\n")  # a training class, again
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data", f"csv:{root / 'train.csv'}", "--ways", "2", "--query", "1"]
    with pytest.warns(
        HeldOutWarning, match=r"the test split evaluates on 1 class this run meta-trained on \('n0000'\)"
    ):
        assert main([*args, "--image-size", "16", "--meta-batch", "1", "--iterations", "1", "--no-progress"]) == 0
    with pytest.warns(HeldOutWarning, match=r"test.csv must not list classes of the training file"):
        assert main(["eval", str(run), "--tasks", "2", "--no-baseline", "--no-progress", "--json"]) == 0
