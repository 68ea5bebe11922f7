__version__ = "0.1.0"

from .core import (influence_scores, upweight_influence, param_changes, self_influence, Influence, SolveInfo,
                   InfluenceError, HessianNotPositiveDefinite, NonFiniteError, NotConvergedError,
                   NotConvergedWarning, InfluenceTypeError)
