"""ke_tf: Knowledge Evolution (Taha, Shrivastava & Davis, CVPR 2021) for Keras 3 / TensorFlow.

Modules, one concept each: ``networks`` (architectures), ``graph`` (channel sets through a Keras
functional graph), ``masks`` (KELS/WELS split masks, sec. 3.2), ``reinit`` (Eq. 1), ``slim``
(the fit hypothesis as its own network), ``cost`` (parameters and MACs), ``config``, ``data``,
``losses``, ``metrics``, ``tasks`` (classification vs metric learning), ``model``
(train_step), ``methods`` (KE and its peers: LLF, DSD, DNR, long, slim from scratch),
``generations`` (the KE loop), ``results`` (the CSV tables), ``monitor``, ``export``, ``atomic``
(atomic outputs), ``cli`` (exit statuses) and ``main`` (the command line).
"""

__version__ = "0.1.0"
