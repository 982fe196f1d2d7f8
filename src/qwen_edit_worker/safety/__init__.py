"""The safety checker: which jobs are checked (policy), the classifier that checks them (classifier),
the baked one found and loaded (checker), and its tiny random-weight twin for tests and demos (tiny)."""

from .checker import FOLDER, REPO, load, load_for, locate, locate_for
from .classifier import Checker
from .policy import DEFAULT_MODE, MODES, wanted

__all__ = ["DEFAULT_MODE", "FOLDER", "MODES", "REPO", "Checker", "load", "load_for", "locate", "locate_for", "wanted"]
