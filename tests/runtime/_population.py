"""The population the runtime tests train: 16 digits MLP providers, the
first 8 planting BadNets backdoors. Imported by conftest.py and by the
multi-host worker script (a plain module beside them, not a test)."""

N = 16


def sub_run_args(ds, steps: int, n: int = N):
  """(model, trainer, the arguments of `trainer.sub_run`) for `steps` steps
  of the population on the dataset `ds`."""
  import jax  # pylint: disable=g-import-not-at-top

  from jaxrep import models  # pylint: disable=g-import-not-at-top
  from jaxrep import population
  from jaxrep.train import trainer as train
  from jaxrep.train.schedule import batch_schedule

  image = population.IMAGE
  specs = image.population_specs(n, n // 2, "badnets", num_classes=10)
  behaviour = image.make_behaviour(specs, ds.input_shape, 10)
  model = models.get_model("mlp", 10, ds.input_shape)
  trainer = train.make_trainer(model, train.TrainConfig(),
                               population.DivergenceConfig(),
                               image.make_hooks(behaviour))
  args = (trainer.init(jax.random.key(0), n), ds.x_train, ds.y_train,
          batch_schedule(0, 0, steps, 32, len(ds.y_train)),
          train.provider_keys(jax.random.key(1), n),
          population.make_divergence(population.DivergenceConfig(), n),
          behaviour)
  return model, trainer, args
