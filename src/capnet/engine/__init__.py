"""Training and evaluation engine: loaders, the fit loop, evaluation, checkpoints, DDP helpers."""
from capnet.engine.checkpoint import load_weights, save_weights  # noqa: F401
from capnet.engine.evaluate import evaluate, predict_scores  # noqa: F401
from capnet.engine.loaders import make_loaders  # noqa: F401
from capnet.engine.train import FitResult, fit  # noqa: F401
from capnet.engine.feature_cache import FeatureCache, cache_key, compute_features  # noqa: F401
