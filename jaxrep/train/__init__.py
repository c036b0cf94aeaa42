"""Training: the optimizer, the batch schedule and the vmapped, scanned
sub-run of a whole population (`make_trainer`), and evaluation."""

from jaxrep.train.schedule import batch_schedule
from jaxrep.train.trainer import (OPTIMIZERS, SCHEDULES, Population,
                                  TrainConfig, Trainer, check_population_args,
                                  evaluate, flatten_population, make_optimizer,
                                  make_trainer, provider_keys)
