from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Under pytest-xdist (about one worker per core) each worker, and every process it starts, runs one
# torch thread unless OMP_NUM_THREADS says otherwise: intra-op thread pools would oversubscribe the
# cores and spin (a container's CPU quota can also be far below the CPUs it reports).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Subprocesses run `python -m metaopt.cli` from here: from the repository root, the source
# folder `metaopt/` would shadow the installed package (whose plugins/integrations live elsewhere).
OUTSIDE = tempfile.gettempdir()
OMNIGLOT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked slow first (otherwise in their order): parallel workers then fill the end
    with short tests instead of one worker running a long one alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def omniglot_dir() -> Path:
    if not (OMNIGLOT_DIR / "images_background_small1.zip").is_file():
        pytest.skip(f"Omniglot archives not found in {OMNIGLOT_DIR} (../shared/data/omniglot beside the checkout)")
    return OMNIGLOT_DIR


def regression_tasks(n: int = 3, shots: int = 10, dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(shots, 1, generator=g, dtype=dtype) for _ in range(4)) for _ in range(n)]


def image_tasks(
    n: int = 2, ways: int = 5, query: int = 2, dtype: torch.dtype = torch.float64, seed: int = 0, size: int = 28
):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(ways, 1, size, size, generator=g, dtype=dtype),
            torch.arange(ways),
            torch.randn(ways * query, 1, size, size, generator=g, dtype=dtype),
            torch.arange(ways).repeat(query),
        )
        for _ in range(n)
    ]


def class_tasks(n: int = 2, dtype: torch.dtype = torch.float64, seed: int = 0):
    """3-way 2-shot tasks of 4-dimensional inputs, 3 query examples per class."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(6, 4, generator=g, dtype=dtype),
            torch.arange(3).repeat(2),
            torch.randn(9, 4, generator=g, dtype=dtype),
            torch.arange(3).repeat(3),
        )
        for _ in range(n)
    ]


def assert_meta_gradient_matches_central_differences(reference, tasks, grad: torch.Tensor, seed: int) -> None:
    """``grad`` (the model's flat meta-gradient) against Richardson-extrapolated central differences
    of ``reference``'s float64 meta-objective (its forward only), along two random directions: the h^2
    term cancels (h = 1e-6 and 5e-7), and the error bound is 1e-7 relative to max(1, |difference|)."""
    params = list(reference.model.parameters())
    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()

    def objective(flat: torch.Tensor) -> float:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat, params)
        return float(reference.forward(tasks).loss.detach())

    def central(direction: torch.Tensor, h: float) -> float:
        return (objective(theta + h * direction) - objective(theta - h * direction)) / (2 * h)

    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        direction = torch.randn(theta.shape, generator=g, dtype=theta.dtype)
        fd = (4 * central(direction, 5e-7) - central(direction, 1e-6)) / 3
        assert abs(float(grad @ direction) - fd) <= 1e-7 * max(1.0, abs(fd))
