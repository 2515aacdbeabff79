"""ke_tf: Knowledge Evolution (Taha, Shrivastava & Davis, CVPR 2021) for Keras 3 / TensorFlow."""
from setuptools import find_packages, setup

setup(
    name="ke_tf",
    version="0.1.0",
    description="Knowledge Evolution: train deep networks on small datasets, get a dense and a slim net.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["ke_tf", "ke_tf.*"]),
    install_requires=[
        "tensorflow==2.21.0",
        "keras==3.15.1",
        # TensorFlow 2.21 no longer depends on it; tf.summary.text/histogram need it.
        "tensorboard==2.21.0",
        "tensorflow-datasets==4.9.10",
        # tensorflow-datasets 4.9.x imports it for downloads without declaring it.
        "importlib_resources==7.1.0",
        "absl-py==2.5.1",
        "requests==2.34.2",  # ke_tf.data checks a dataset's servers before tfds retries for minutes
        "numpy==2.4.6",
        "scikit-learn==1.9.1",
        "matplotlib==3.11.2",  # tools/plot_generations.py
    ],
    extras_require={"test": ["pytest==9.2.0", "pytest-xdist==3.8.0"]},
    entry_points={"console_scripts": ["ke-tf=ke_tf.main:run"]},
)
