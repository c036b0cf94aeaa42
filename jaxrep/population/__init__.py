"""The population: every provider's behaviour, as data.

Modules, each importing only those above it:

  specs             attack specs: the fields every attack has, their flags
                    (`Knob`) and checks, `LabelFlip`, `DataOrder`, drawing
                    a population's specs (own target, source and trigger
                    per attacker)
  behaviour         `Behaviour` (per-provider arrays), the trainer `Hooks`,
                    poisoning, model replacement and ASR, written once
  family            `Family`: the attacks of one modality behind one
                    interface (specs, behaviour, hooks, trigger, ASR)
  families/image    BadNets, blend, label_flip, scaling, warp, keyed_noise,
                    secret_key, data_order: `IMAGE`
  families/text     token and phrase triggers, label_flip, data_order: `TEXT`
  adaptive          adaptive attackers wrapping any family's behaviour
  divergence        benign divergence of honest replicas
  build             the protocol's entry: the main job's attack options and
                    the population of a config

The public names of all of them are exported here.
"""

from jaxrep.population.adaptive import (ADAPTIVE, Adaptive, adapt, collude,
                                        poison_plan, subrun_behaviour, wrap)
from jaxrep.population.behaviour import Behaviour, Hooks
from jaxrep.population.build import (ATTACKS, DEFAULT_ATTACK, FAMILIES,
                                     OPTIONS, attack_specs, family)
from jaxrep.population.divergence import (Divergence, DivergenceConfig,
                                          make_divergence)
from jaxrep.population.families.image import (IMAGE, BadNets, Blend,
                                              ImageTrigger, KeyedNoise,
                                              Scaling, SecretKey, Warp)
from jaxrep.population.families.text import (TEXT, PhraseTrigger,
                                             TextTrigger, TokenTrigger)
from jaxrep.population.family import Family
from jaxrep.population.specs import (AttackSpec, DataOrder, Inputs, Knob,
                                     LabelFlip, Option)
