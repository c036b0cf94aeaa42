"""jaxrep: a JAX simulator of Replicate-Training-To-Detect (RTTD).

n simulated cloud providers train the same k-step sub-run of a model in one
vmapped, jit-compiled computation; pairwise distance kernels and detectors then
flag the providers that planted a backdoor.
"""

from jaxrep.errors import ConfigError
from jaxrep.divergence import Divergence, DivergenceConfig, make_divergence
from jaxrep.models import MODELS, Model, get_model, num_params
from jaxrep.train import (Hooks, Population, TrainConfig, Trainer, evaluate,
                          flatten_population, make_optimizer, make_trainer,
                          provider_keys, updates)

__version__ = "0.1.0"
