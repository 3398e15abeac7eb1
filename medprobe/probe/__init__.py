"""Linear probes on activations: the regularised probe and the authors' probes, C and layer selection,
label efficiency.

* :mod:`~medprobe.probe.solver` - :class:`LogisticProbe`, :func:`fit`, :func:`fit_layers` (L2 logistic
  regression with scikit-learn's objective), built on :mod:`~medprobe.probe.problem` (:class:`FitOptions`,
  targets, weights, standardisation) and :mod:`~medprobe.probe.lbfgs` (the L-BFGS solver);
* :mod:`~medprobe.probe.selection` - validation metrics and the choice of C (:func:`select_C`);
* :mod:`~medprobe.probe.paper` - the authors' Adam and SGD probes (:func:`fit_adam`, :func:`fit_sgd`);
  :mod:`~medprobe.probe.modes` - one probe of a ``probe.mode`` (:func:`fit_mode`);
* :mod:`~medprobe.probe.task` - :func:`probe_task`, the workflow's ``probe`` rule;
* :mod:`~medprobe.probe.efficiency` and :mod:`~medprobe.probe.subsets` - :func:`efficiency_task`, the
  ``efficiency`` rule, and its training subsets;
* :mod:`~medprobe.probe.files` - activations checked against their manifest, the probes' output files.
"""

from medprobe.probe.efficiency import efficiency_task
from medprobe.probe.modes import PROBE_MODES, fit_mode
from medprobe.probe.paper import LinearProbe, SGDProbe, fit_adam, fit_sgd
from medprobe.probe.problem import FitOptions
from medprobe.probe.selection import log_loss, macro_auc, select_C
from medprobe.probe.solver import LogisticProbe, fit, fit_layers
from medprobe.probe.subsets import image_subsets, nested_subsets
from medprobe.probe.task import probe_task

__all__ = [
    "PROBE_MODES",
    "FitOptions",
    "LinearProbe",
    "LogisticProbe",
    "SGDProbe",
    "efficiency_task",
    "fit",
    "fit_adam",
    "fit_layers",
    "fit_mode",
    "fit_sgd",
    "image_subsets",
    "log_loss",
    "macro_auc",
    "nested_subsets",
    "probe_task",
    "select_C",
]
