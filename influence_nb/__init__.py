__version__ = "0.1.0"

# The package's modules import one way: core (data, losses, gradients, curvature) -> solvers (the interface and the
# exact solve) -> ihvp (CG, block CG, LiSSA) -> scoring (the Influence facade and public functions) -> studies -> cli.
from .core import (SolveInfo, Curvature, InfluenceError, InfluenceTypeError, HessianNotPositiveDefinite, NonFiniteError,
                   NotConvergedError, NotConvergedWarning)
from .solvers import make_solver, register_solver, IHVPSolver, ExactSolver
from .scoring import influence_scores, upweight_influence, param_changes, self_influence, Influence
# modules that register a curvature or a solver by name: importing the package makes every name available
from . import ggn, krylov, kfac, choose  # noqa: F401
