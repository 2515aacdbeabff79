"""ke_tf: Knowledge Evolution (Taha, Shrivastava & Davis, CVPR 2021) for Keras 3 / TensorFlow.

Modules, one concept each: ``networks`` (architectures), ``graph`` (channel sets through a Keras
functional graph), ``masks`` (KELS/WELS split masks, sec. 3.2), ``reinit`` (Eq. 1), ``slim``
(the fit hypothesis as its own network), ``cost`` (parameters and MACs), ``config`` (the
paper's settings as defaults), ``rules`` (every cross-flag rule, run in one place), ``presets``
(named settings), ``data`` (sources, transforms, pipelines), ``losses``, ``metrics``, ``tasks``
(classification vs metric learning), ``model`` (train_step, the one compiled KE model),
``methods`` (one object per method, its flags too: KE and its peers), ``generations`` (the KE
loop), ``rundir`` (fresh start, resume), ``evolution`` (``ke_tf.evolve``: KE for your own
model and data), ``state`` (where a run stands), ``hooks`` (the side work's interface),
``results`` (the CSV tables), ``checkpoint`` (resume and export), ``divergence`` (NaN stops a
run), ``repr_filters`` (RePr's filter ranking and orthogonal re-init), ``distribution``
(strategies, the chief, training under MultiWorkerMirroredStrategy without Keras's ``fit``),
``precision`` (mixed precision where it pays), ``cpu`` (the CPU and its TensorFlow kernels),
``internals`` (the private Keras/TensorFlow APIs used, in one place), ``monitor``, ``export``,
``faults`` (fault injection), ``atomic`` (atomic outputs), ``cli`` (exit statuses) and
``main`` (the command line).
"""

__version__ = "0.1.0"


def __getattr__(name):
    """`ke_tf.evolve` (`ke_tf.evolution.evolve`), imported on first use: `import ke_tf.config`
    and the command line's flag parsing stay free of TensorFlow."""
    if name == "evolve":
        from ke_tf.evolution import evolve

        return evolve
    raise AttributeError(f"module 'ke_tf' has no attribute {name!r}")
