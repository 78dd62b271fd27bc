"""The model zoo lives in bench/model_zoo.py (the benchmarks use it too and never import tests/)."""

from bench.model_zoo import *  # noqa: F403
from bench.model_zoo import VOCAB as VOCAB
from bench.model_zoo import build as build
