"""capnet: CAPNET (correlation adaptation prompt network) for long-tailed multi-label recognition."""
from capnet.config import Config, load_config
from capnet.registry import BACKBONES, DATASETS, GRAPHS, LOSSES, PEFT

__version__ = "0.1.0"
__all__ = ["Config", "load_config", "BACKBONES", "DATASETS", "GRAPHS", "LOSSES", "PEFT", "__version__"]
