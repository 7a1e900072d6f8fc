"""Task samplers: sinusoid regression, synthetic glyphs, Omniglot and class-per-folder images."""

from metaopt.data.dataset import DatasetTaskSampler, EpisodeDataset, collate_tasks
from metaopt.data.episodes import ClassImages, EpisodeSampler
from metaopt.data.glyphs import GlyphTasks
from metaopt.data.images import load_image_folder, load_omniglot, omniglot_alphabets
from metaopt.data.sampler import TaskSampler
from metaopt.data.sinusoid import SinusoidTasks
from metaopt.data.sources import make_sampler
from metaopt.data.splits import ClassSubset, split_classes

__all__ = [
    "ClassImages",
    "ClassSubset",
    "DatasetTaskSampler",
    "EpisodeDataset",
    "collate_tasks",
    "EpisodeSampler",
    "GlyphTasks",
    "SinusoidTasks",
    "TaskSampler",
    "load_image_folder",
    "load_omniglot",
    "make_sampler",
    "omniglot_alphabets",
    "split_classes",
]
