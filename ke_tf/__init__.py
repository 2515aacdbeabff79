"""ke_tf: Knowledge Evolution (Taha, Shrivastava & Davis, CVPR 2021) for Keras 3 / TensorFlow.

Modules, one concept each: ``networks`` (architectures), ``graph`` (channel sets through a Keras
functional graph), ``masks`` (KELS/WELS split masks, sec. 3.2), ``reinit`` (Eq. 1), ``slim``
(the fit hypothesis as its own network), ``cost`` (parameters and MACs), ``config``, ``data``,
``losses``, ``metrics``, ``model`` (train_step), ``generations`` (the KE loop), ``monitor``,
``export`` and ``main`` (the command line).
"""

__version__ = "0.1.0"
