from __future__ import annotations

import pytest
import torch

from metaopt.data import EpisodeSampler, GlyphTasks, SinusoidTasks, load_image_folder, load_omniglot, make_sampler
from metaopt.errors import ConfigError, DataError


def _same(a, b):
    return all(torch.equal(x, y) for ta, tb in zip(a, b) for x, y in zip(ta, tb))


def test_sinusoid_ranges_and_determinism():
    tasks = SinusoidTasks(shots=10, query=5, seed=3).sample(50)
    x = torch.cat([t.support_x for t in tasks])
    y = torch.cat([t.support_y for t in tasks])
    assert x.min() >= -5 and x.max() <= 5 and y.abs().max() <= 5
    assert tasks[0].support_x.shape == (10, 1) and tasks[0].query_x.shape == (5, 1)
    assert _same(tasks, SinusoidTasks(shots=10, query=5, seed=3).sample(50))
    assert not _same(tasks, SinusoidTasks(shots=10, query=5, seed=4).sample(50))


def test_sampler_state_round_trip_continues_identically():
    s = SinusoidTasks(seed=1)
    s.sample(3)
    state = s.state_dict()
    expected = s.sample(2)
    s2 = SinusoidTasks(seed=99)
    s2.load_state_dict(state)
    assert _same(expected, s2.sample(2))


def test_glyph_tasks_shapes_labels_and_disjoint_splits():
    g = GlyphTasks(ways=5, shots=2, query=3, seed=0)
    t = g.sample_task()
    assert t.support_x.shape == (10, 1, 28, 28) and t.query_x.shape == (15, 1, 28, 28)
    assert t.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert t.support_x.min() >= 0 and t.support_x.max() <= 1
    assert _same([t], [GlyphTasks(ways=5, shots=2, query=3, seed=0).sample_task()])
    train = GlyphTasks(split="train")._prototype(0)
    test = GlyphTasks(split="test")._prototype(0)
    assert train.shape != test.shape or not torch.equal(train, test)


def test_episode_sampler_rejects_too_many_ways_and_shots():
    classes = {f"c{i}": torch.zeros(5, 1, 4, 4) for i in range(3)}
    with pytest.raises(DataError, match="ways=4") as info:
        EpisodeSampler(classes, ways=4, shots=1, query=1)
    assert "3 classes" in str(info.value)
    with pytest.raises(DataError, match="shots\\+query"):
        EpisodeSampler(classes, ways=3, shots=3, query=3)


def test_image_folder_reads_classes_and_names_bad_files(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("L", (10, 10), color=i * 50).save(tmp_path / c / f"{i}.png")
    classes = load_image_folder(tmp_path, size=8)
    assert sorted(classes) == ["a", "b"] and classes["a"].shape == (3, 1, 8, 8)
    (tmp_path / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(tmp_path, size=8)


def test_missing_data_path_and_unknown_source_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        make_sampler(f"omniglot:{tmp_path / 'nope.zip'}")
    with pytest.raises(ConfigError, match="glyphs"):
        make_sampler("glyph")


def test_omniglot_zip_reader_and_alphabet_split(omniglot_dir):
    classes = load_omniglot(omniglot_dir / "images_background_small1.zip", alphabets=["Greek"])
    assert len(classes) == 24 and all(v.shape == (20, 1, 28, 28) for v in classes.values())
    img = next(iter(classes.values()))[0]
    assert img.mean() < 0.5  # strokes are 1 on a 0 background
    train = make_sampler(f"omniglot:{omniglot_dir / 'images_background_small1.zip'}", split="train")
    test = make_sampler(f"omniglot:{omniglot_dir / 'images_background_small1.zip'}", split="test")
    train_alphabets = {n.split("/")[0] for n in train.episodes.dataset.classes}
    assert train_alphabets and not train_alphabets & {n.split("/")[0] for n in test.episodes.dataset.classes}
    task = train.sample(1)[0]  # decoded on use: strokes 1.0 on 0.0, as the eager reader gives
    eager = torch.cat(list(load_omniglot(omniglot_dir / "images_background_small1.zip").values()))
    assert task.support_x.shape == (5, 1, 28, 28)
    assert any(torch.allclose(task.support_x[0], x, atol=1e-6) for x in eager)  # (255 - a) / 255 vs 1 - a / 255
    rotated = load_omniglot(omniglot_dir / "images_background_small1.zip", alphabets=["Greek"], rotations=True)
    assert len(rotated) == 4 * 24
