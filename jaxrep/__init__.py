"""jaxrep: a JAX simulator of Replicate-Training-To-Detect (RTTD).

n simulated cloud providers train the same k-step sub-run of a model (image
or text classification) in one
vmapped, jit-compiled computation; pairwise distance kernels and detectors then
flag the providers that planted a backdoor.

Data flows one way:

    config -> data -> population (params, opt state, behaviour per provider)
           -> sub-run (k steps, lax.scan, vmap over providers, jit)
           -> distances (n x n per metric) -> detector -> metrics / report
"""

from jaxrep.core.version import __version__

from jaxrep.core.errors import ConfigError
from jaxrep.data.datasets import Dataset, load_dataset
from jaxrep.train.schedule import batch_schedule
from jaxrep.population.divergence import Divergence, DivergenceConfig, make_divergence
from jaxrep.models.zoo import (IMAGE_MODELS, MODELS, TEXT_MODELS, Model,
                           get_model, num_params)
from jaxrep.train.trainer import (Hooks, Population, TrainConfig, Trainer, evaluate,
                          flatten_population, make_optimizer, make_trainer,
                          provider_keys)
from jaxrep.population.image_attacks import (ATTACKS, BadNets, Behaviour, Blend, LabelFlip,
                            Scaling, Warp, attack_success_rate, make_behaviour,
                            make_hooks, population_specs)
from jaxrep.distances.kernels import (cka_distances, output_distances,
                              pairwise_distances, updates, zest_distances)
from jaxrep.detect.detectors import DETECTORS, Evidence, Verdict
from jaxrep.detect.metrics import auroc, fpr, roc_curve, tpr
from jaxrep.config import SimConfig
from jaxrep.protocol import METRICS, SimResult, replay, run
from jaxrep.population.text_attacks import PhraseTrigger, TextBehaviour, TokenTrigger
from jaxrep.population import adaptive
from jaxrep.runtime import distributed
from jaxrep.runtime import memory
from jaxrep.runtime import sharding
from jaxrep.data import text as text_data
