"""lift3d: lift 2D and multi-view diffusion priors into 3D assets by per-prompt optimization."""

from lift3d.registry import find, load_plugins, register, registered

__version__ = "0.1.0"

__all__ = ["register", "find", "registered", "load_plugins", "__version__"]
