"""Every way a model is fitted: the gradient loop with validation selection (``loop``), its
optimiser / scheduler / EMA, the training checkpoints (best / last, resume), where each epoch's
scalars go (``tracking``, ``test_curve``), and the baselines fitted in closed loop on cached final
features, each registered in ``FEATURE_FITS`` under its model kind's name (``probe``: the
scikit-learn linear probe; ``zs_probe``: ZS-LP and capnet's CLAP; ``clap_authors``), read from
the cached features under the run's views by ``feature_fit.fit_on_features``.

``fit`` reads a ``FitPlan`` (the train and optim sections, the deployed text side, the config
record saved with checkpoints) and calls only the hooks ``models.heads.ClassifierBase`` declares.
May import ``capnet.evaluation``, ``capnet.features``, ``capnet.runtime`` and the model contract;
never serving or the CLI.
"""
from capnet.train import clap_authors, probe, zs_probe  # noqa: F401,E402  (fill FEATURE_FITS)
