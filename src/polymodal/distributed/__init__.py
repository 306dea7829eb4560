"""Data-parallel training on PyTorch's own engine: the process group (``process.py``), the
collectives parts call (``collectives.py``), the DDP wrapper (``data_parallel.py``), negatives
gathered for the contrastive loss (``contrastive.py``) and the ``--nproc-per-node`` launcher
(``launch.py``). Everything here is a no-op in a single process."""
