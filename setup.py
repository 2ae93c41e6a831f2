"""maskrcnn: a from-scratch Mask R-CNN in PyTorch, in the Detectron tradition."""
import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="maskrcnn",
    version="0.1.0",
    description="Mask R-CNN from scratch on PyTorch, Detectron-style configs and API",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["maskrcnn", "maskrcnn.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "numpy>=1.21",
        "pycocotools>=2.0.4",
        "opencv-python-headless>=4.5",
        "yacs>=0.1.8",
        "PyYAML>=5.1",
    ],
    extras_require={
        "dev": ["pytest>=7", "hypothesis>=6", "pytest-timeout>=2"],
        "tensorboard": ["tensorboard>=2.10"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
