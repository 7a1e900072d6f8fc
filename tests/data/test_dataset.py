"""Episodes over the data users already have: torchvision ImageFolder, Hugging Face datasets, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from metaopt.data import DatasetTaskSampler, EpisodeDataset, collate_tasks
from metaopt.errors import DataError


def _image_folder(root, classes=6, per_class=4, size=10):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            pixels[0, 0] = (c, i, 0)  # identifies (class, item) in the tensor
            Image.fromarray(pixels).save(root / f"class{c:02d}" / f"{i}.png")
    return root


def _identity(x):  # (class, item) stamped in pixel (0, 0)
    return int(x[0, 0, 0]), int(x[1, 0, 0])


def _check(task, ways, shots, query):
    sx, sy, qx, qy = task
    assert sx.dtype == torch.uint8 and sx.shape[0] == ways * shots and qx.shape[0] == ways * query
    assert sy.tolist() == sorted(sy.tolist()) and set(sy.tolist()) == set(range(ways)) == set(qy.tolist())
    support, queried = {_identity(x) for x in sx}, {_identity(x) for x in qx}
    assert not support & queried  # no image in both support and query
    for label in range(ways):  # one source class per task label
        same = [_identity(z)[0] for z, w in zip([*sx, *qx], [*sy, *qy]) if w == label]
        assert len(set(same)) == 1


def test_image_folder_episodes_are_correct_and_lazy(tmp_path):
    folder = ImageFolder(str(_image_folder(tmp_path)))
    reads = []
    original = folder.loader
    folder.loader = lambda path: reads.append(path) or original(path)
    episodes = EpisodeDataset(folder, ways=3, shots=1, query=2, seed=0)  # labels from folder.targets
    assert not reads  # nothing read to index the classes
    task = episodes[7]
    _check(task, 3, 1, 2)
    assert len(reads) == 3 * 3  # only the images of this task
    assert all(torch.equal(a, b) for a, b in zip(task, episodes[7]))  # a function of (seed, index)
    assert not torch.equal(task.support_x, episodes[8].support_x)


def test_hugging_face_dataset_episodes(tmp_path):
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is in the test extra")
    rng = np.random.default_rng(1)
    images, labels = [], []
    for c in range(5):
        for i in range(4):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            pixels[0, 0] = (c, i, 0)
            images.append(Image.fromarray(pixels))
            labels.append(c)
    features = datasets.Features({"image": datasets.Image(), "fine": datasets.ClassLabel(num_classes=5)})
    hf = datasets.Dataset.from_dict({"image": images, "fine": labels}, features=features)
    episodes = EpisodeDataset(hf, ways=4, shots=2, query=2, labels="fine", seed=3)
    _check(episodes[0], 4, 2, 2)
    named = hf.add_column("species", [f"species_{c}" for c in labels])  # a string column names the classes
    assert EpisodeDataset(named, ways=4, shots=2, query=2, labels="species").classes == [
        f"species_{c}" for c in range(5)
    ]
    with pytest.raises(
        DataError, match=r"label column 'label' does not exist; the dataset's columns are \['image', 'fine'\]"
    ):
        EpisodeDataset(hf, labels="label")


def _items_by_class(names: list) -> TensorDataset:
    """Item i's single feature is i, so a task's inputs say exactly which items it drew."""
    return TensorDataset(torch.arange(len(names), dtype=torch.float64).unsqueeze(1), torch.zeros(len(names)))


def test_class_names_are_labels_and_a_task_holds_one_name_per_class():
    """String labels (a CSV's names, a Hugging Face string column) used to stop with int()'s ValueError."""
    names = ["cat", "dog", "owl", "yak"] * 3  # item i is of class names[i]
    episodes = EpisodeDataset(_items_by_class(names), ways=3, shots=1, query=2, labels=names, seed=0)
    assert episodes.classes == ["cat", "dog", "owl", "yak"]
    for index in range(10):
        task = episodes[index]
        for label in range(3):  # every relabelled class is one name, in the support and the query set
            drawn = torch.cat([task.support_x[task.support_y == label], task.query_x[task.query_y == label]])
            assert len({names[int(i)] for i in drawn.flatten()}) == 1
    with pytest.raises(DataError, match=r"class 'yak' has 2 items but a task needs shots \+ query = 3"):
        EpisodeDataset(_items_by_class(names[:-1]), ways=3, shots=1, query=2, labels=names[:-1])


def test_fractional_labels_are_refused_not_truncated_into_classes():
    """int(0.3) == int(0.7) == 0: regression targets used to become classes without a word."""
    targets = [0.25 * i for i in range(12)]
    with pytest.raises(DataError, match=r"label of item 1 is 0.25, a fractional or non-finite number, not a class"):
        EpisodeDataset(_items_by_class(targets), ways=2, shots=1, query=1, labels=targets)
    with pytest.raises(DataError, match=r"label of item 0 is nan"):
        EpisodeDataset(_items_by_class(targets), ways=2, shots=1, query=1, labels=[float("nan")] * 12)
    with pytest.raises(DataError, match=r"labels mix names and numbers \(item 0: 0, item 1: 'b'\)"):
        EpisodeDataset(_items_by_class(targets), ways=2, shots=1, query=1, labels=[0, "b"] * 6)
    whole = [float(i % 3) for i in range(12)] + [np.int64(1)]  # integral floats and numpy integers are classes
    episodes = EpisodeDataset(_items_by_class(whole), ways=2, shots=1, query=1, labels=whole)
    assert episodes.classes == [0, 1, 2] and all(type(c) is int for c in episodes.classes)


def test_rotation_classes_of_non_square_images_are_refused_naming_the_item():
    """A quarter turn of an 8x12 image is 12x8: the task's stacking error blamed the transform."""
    images, labels = torch.rand(40, 1, 8, 12), torch.arange(10).repeat_interleave(4)
    episodes = EpisodeDataset(TensorDataset(images, labels), ways=5, shots=1, query=1, rotations=True)
    with pytest.raises(DataError, match=r"rotations=True turns images by 90 degrees, which needs square images; "
                       r"dataset item \d+ is \(8, 12\)"):  # fmt: skip
        episodes[0]


def test_same_tasks_with_0_and_2_workers_and_exact_resume(tmp_path):
    folder = ImageFolder(str(_image_folder(tmp_path)))
    episodes = EpisodeDataset(folder, ways=3, shots=1, query=1, seed=0, length=12)
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(episodes, batch_size=4, num_workers=workers, collate_fn=collate_tasks)
        batches[workers] = [t for batch in loader for t in batch]
    assert len(batches[0]) == 12 and batches[0][0].support_x.dtype == torch.float32
    assert all(torch.equal(a.support_x, b.support_x) for a, b in zip(batches[0], batches[2]))
    sampler = DatasetTaskSampler(episodes, workers=2)
    first = sampler.sample(5)
    state = sampler.state_dict()
    expected = sampler.sample(3)
    resumed = DatasetTaskSampler(episodes, workers=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a.query_x, b.query_x) for a, b in zip(resumed.sample(3), expected))
    assert all(torch.equal(a.support_x, b.support_x) for a, b in zip(first, batches[0][:5]))


def test_per_image_transforms_and_rotation_augmentation(tmp_path):
    folder = ImageFolder(str(_image_folder(tmp_path)))
    flip = EpisodeDataset(
        folder, ways=2, shots=1, query=1, transform=v2.Compose([v2.PILToTensor(), v2.RandomHorizontalFlip(p=1.0)])
    )
    plain = EpisodeDataset(folder, ways=2, shots=1, query=1)
    assert torch.equal(flip[0].support_x, plain[0].support_x.flip(-1))
    rotated = EpisodeDataset(folder, ways=20, shots=1, query=1, rotations=True)  # 6 classes x 4 rotations
    assert rotated[0].support_x.shape[0] == 20


def test_bad_inputs_name_the_class_file_or_column(tmp_path):
    root = _image_folder(tmp_path / "data", classes=3, per_class=4)
    (root / "class01" / "3.png").unlink()
    (root / "class01" / "2.png").unlink()
    folder = ImageFolder(str(root))
    with pytest.raises(DataError, match="class 'class01' has 2 items but a task needs shots \\+ query = 3"):
        EpisodeDataset(folder, ways=2, shots=1, query=2)
    with pytest.raises(DataError, match="ways=5 is larger than the 3 classes"):
        EpisodeDataset(folder, ways=5, shots=1, query=1)
    (root / "class02" / "0.png").write_bytes(b"not an image")
    broken = EpisodeDataset(ImageFolder(str(root)), ways=3, shots=1, query=1, length=50)
    with pytest.raises(DataError, match="cannot read '.*class02/0.png'"):
        for i in range(50):
            broken[i]


def test_within_group_tasks_take_every_class_from_one_group():
    images = [torch.full((1, 4, 4), c, dtype=torch.uint8) for c in range(12) for _ in range(3)]
    labels = [c for c in range(12) for _ in range(3)]
    groups = {c: f"alphabet{c // 4}" for c in range(12)}  # 3 groups of 4 classes
    episodes = EpisodeDataset(
        list(zip(images, labels)), ways=3, shots=1, query=1, labels=labels, groups=groups, within_group=True
    )
    seen = set()
    for i in range(30):
        classes = {int(x.max()) for x in episodes[i].support_x}
        assert len({c // 4 for c in classes}) == 1, classes
        seen.add(min(classes) // 4)
    assert seen == {0, 1, 2}
    with pytest.raises(DataError, match="no group has 5 classes"):
        EpisodeDataset(
            list(zip(images, labels)), ways=5, shots=1, query=1, labels=labels, groups=groups, within_group=True
        )


class Recorder(torch.nn.Module):
    """A linear classifier that keeps every input it is given (what reaches the model)."""

    def __init__(self, features: int, ways: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(features, ways, dtype=dtype)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.linear(x.flatten(1))


def test_a_normalising_transform_reaches_the_task_and_the_model_bit_for_bit(tmp_path):
    """Items were stored as uint8 and floats clipped to [0, 1]: a mean/std transform came back in
    [0, 1] instead of about +-2."""
    import metaopt

    folder = ImageFolder(str(_image_folder(tmp_path, size=6)))
    transform = v2.Compose(
        [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.2] * 3)]
    )
    produced = [transform(folder[i][0]) for i in range(len(folder))]
    episodes = EpisodeDataset(folder, ways=3, shots=1, query=2, transform=transform, seed=0)
    task = episodes[0]
    assert task.support_x.dtype == torch.float32 and task.support_x.shape == (3, 3, 6, 6)
    for x in [*task.support_x, *task.query_x]:
        assert any(torch.equal(x, p) for p in produced)  # bit for bit what the transform made
    assert float(task.query_x.min()) < -2 and float(task.query_x.max()) > 2  # not squeezed into [0, 1]
    loader = DataLoader(episodes, batch_size=2, collate_fn=collate_tasks)
    batch = next(iter(loader))
    assert torch.equal(batch[0].support_x, episodes[0].support_x)  # collation leaves floats alone
    model = Recorder(3 * 6 * 6, 3, torch.float32)
    metaopt.MetaLearner(model, inner_steps=1, inner_lr=0.1).backward(batch)
    assert any(torch.equal(seen, episodes[0].support_x) for seen in model.seen)


def test_feature_vectors_keep_their_dtype_and_values():
    """N(0, 9) vectors came back as 8 distinct values in [0, 1]."""
    import metaopt

    g = torch.Generator().manual_seed(0)
    features = 3 * torch.randn(40, 5, generator=g, dtype=torch.float64)
    labels = torch.arange(4).repeat_interleave(10)
    episodes = EpisodeDataset(TensorDataset(features, labels), ways=4, shots=2, query=3, labels=labels.tolist())
    task = episodes[3]
    assert task.support_x.dtype == torch.float64 and task.support_x.shape == (8, 5)
    for x in [*task.support_x, *task.query_x]:
        assert (features == x).all(1).any()
    assert task.query_x.unique().numel() == task.query_x.numel()
    batch = collate_tasks([episodes[i] for i in range(2)])
    model = Recorder(5, 4, torch.float64)
    metaopt.MetaLearner(model, inner_steps=1, inner_lr=0.1).backward(batch)
    assert torch.equal(model.seen[0], episodes[0].support_x)


def test_decoded_images_are_compact_and_collate_to_unit_floats(tmp_path):
    folder = ImageFolder(str(_image_folder(tmp_path)))
    task = EpisodeDataset(folder, ways=2, shots=1, query=1)[0]
    assert task.support_x.dtype == torch.uint8  # lossless for 8-bit images
    (collated,) = collate_tasks([task])
    assert collated.support_x.dtype == torch.float32
    assert torch.equal(collated.support_x, task.support_x.float() / 255)


def test_items_of_different_shapes_or_dtypes_are_named():
    items = [(torch.zeros(4), 0), (torch.zeros(4), 0), (torch.zeros(5), 1), (torch.zeros(5), 1)]
    episodes = EpisodeDataset(items, ways=2, shots=1, query=1, labels=[0, 0, 1, 1])
    with pytest.raises(DataError, match=r"dataset items \d and \d differ after the transform: \(\d,\)"):
        episodes[0]
    with pytest.raises(DataError, match="rotations=True turns images by 90 degrees, but dataset item"):
        EpisodeDataset(items[:2] * 2, ways=2, shots=1, query=1, labels=[0, 0, 1, 1], rotations=True)[0]
