"""Methods: one file per method, registered by name (``--method NAME``)."""

from cmrcnet.models.base import (
    ExpressionModel,
    MethodSpec,
    available_methods,
    get_method,
    method_colours,
    register_method,
)
from cmrcnet.models.predictors import Predictor, RegressionPredictor, RetrievalPredictor

# Importing a model file registers it.
from cmrcnet.models import cmrcnet as _cmrcnet  # noqa: F401,E402
from cmrcnet.models import bleep as _bleep  # noqa: F401,E402
from cmrcnet.models import stnet as _stnet  # noqa: F401,E402
from cmrcnet.models import histogene as _histogene  # noqa: F401,E402
from cmrcnet.models import ridge as _ridge  # noqa: F401,E402

__all__ = [
    "ExpressionModel",
    "MethodSpec",
    "Predictor",
    "RegressionPredictor",
    "RetrievalPredictor",
    "available_methods",
    "get_method",
    "method_colours",
    "register_method",
]
