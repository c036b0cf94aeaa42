"""jaxrep: a JAX simulator of Replicate-Training-To-Detect (RTTD).

n simulated cloud providers train the same k-step sub-run of a model (image
or text classification) in one vmapped, jit-compiled computation; pairwise
distance kernels and detectors then flag the providers that planted a
backdoor.

Data flows one way, one package folder per stage:

    config -> data -> population (behaviour, divergence per provider)
           -> train (k steps, lax.scan over a vmap over providers, jit)
           -> distances (n x n per metric) -> detect -> protocol -> report

This module re-exports the public names most users need.
"""

from jaxrep.core.version import __version__
from jaxrep.core.errors import ConfigError
from jaxrep.config import SimConfig
from jaxrep.data import Dataset, load_dataset
from jaxrep.models import (IMAGE_MODELS, MODELS, TEXT_MODELS, Model, get_model,
                           num_params)
from jaxrep.population import (ATTACKS, IMAGE, TEXT, BadNets, Behaviour, Blend,
                               DataOrder, Divergence, DivergenceConfig, Family,
                               Hooks, KeyedNoise, LabelFlip, PhraseTrigger,
                               Scaling, SecretKey, TokenTrigger, Warp,
                               make_divergence)
from jaxrep.train import (Population, TrainConfig, Trainer, batch_schedule,
                          evaluate, flatten_population, make_optimizer,
                          make_trainer, provider_keys)
from jaxrep.distances import (METRICS, cka_distances, model_distances,
                              output_distances, pairwise_distances, updates,
                              zest_distances)
from jaxrep.detect import DETECTORS, Evidence, Verdict, auroc, fpr, roc_curve, tpr
from jaxrep.protocol import SimResult, replay, run, setup, validate
from jaxrep import (config, core, data, detect, distances, models, population,
                    protocol, report, runtime, train)
