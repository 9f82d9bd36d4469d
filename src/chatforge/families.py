"""Every model family and baseline, imported (and so registered) in one place.

This is the only module that knows the list. Adding a family is one folder under
``models/`` (or ``baselines/``) and one line here. Whoever needs the registry filled
(config loading, bundle loading, the CLI) imports this module explicitly; the registry
itself never imports families.
"""

from chatforge.baselines import ensemble, linear, retrieval, xgboost  # noqa: F401
from chatforge.models import bert, bytenet, elmo, gpt, transformer  # noqa: F401
