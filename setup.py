"""ke_tf: Knowledge Evolution (Taha, Shrivastava & Davis, CVPR 2021) for Keras 3 / TensorFlow."""
from setuptools import find_packages, setup

setup(
    name="ke_tf",
    version="0.1.0",
    description="Knowledge Evolution: train deep networks on small datasets, get a dense and a slim net.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # Every Python TensorFlow 2.21 ships wheels for; CI runs the oldest and the newest (.ci/run).
    python_requires=">=3.10,<3.14",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["ke_tf", "ke_tf.*"]),
    # The paper presets: ke_tf/flags is a link to the repository's flags/, their one source.
    package_data={"ke_tf": ["flags/*.flags"]},
    # Compatible ranges. Lower bounds: the versions CI's oldest leg installs and tests
    # (.ci/lowest.txt, Python 3.10); upper bounds: the next release that may change an API used
    # here (ke_tf/internals.py reaches into Keras and TensorFlow; CI's newest leg, Python 3.13,
    # installs the newest allowed). The exact tested set of the README's commands: constraints.txt.
    install_requires=[
        "tensorflow>=2.21.0,<2.22",
        "keras>=3.12.0,<3.16",
        # TensorFlow 2.21 no longer depends on it; tf.summary.text/histogram need it.
        "tensorboard>=2.20.0,<2.22",
        "tensorflow-datasets>=4.9.8,<4.10",
        # tensorflow-datasets 4.9.x imports it for downloads without declaring it.
        "importlib_resources>=6.4.0",
        "absl-py>=2.1.0,<3",
        "requests>=2.31.0,<3",  # ke_tf.data checks a dataset's servers before tfds retries for minutes
        "numpy>=1.26.4,<3",
        "scikit-learn>=1.5.2,<2",
        "matplotlib>=3.8.4,<4",  # tools/plot_generations.py
    ],
    extras_require={"test": ["pytest>=8.3.5,<10", "pytest-xdist>=3.8.0,<4"]},
    entry_points={"console_scripts": ["ke-tf=ke_tf.main:run"]},
)
