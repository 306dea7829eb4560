"""polymodal: build, train, diagnose and run multimodal (image, text, audio) models in PyTorch."""

from polymodal.modality import Modality

__version__ = "0.1.0"
__all__ = ["Modality", "__version__"]
