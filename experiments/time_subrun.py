"""Times the replicated sub-run of one model on Fashion-MNIST (k=10, batch 32).

    python experiments/time_subrun.py cnn 16

Prints compile time and provider-steps/s (median of 3 sub-runs).
"""
import time, sys, jax, jax.numpy as jnp, numpy as np
from jaxrep import data as D, models, train, divergence as dl
ds = D.load_dataset("idx", "/usr/share/datasets/fashion-mnist", max_train=10000, max_test=10)
name = sys.argv[1]; n = int(sys.argv[2]); k = 10
m = models.get_model(name, 10, ds.input_shape)
tr = train.make_trainer(m, train.TrainConfig())
pop = tr.init(jax.random.key(0), n)
x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
div = dl.make_divergence(dl.DivergenceConfig(), n)
keys = train.provider_keys(jax.random.key(1), n)
sched = jnp.asarray(D.batch_schedule(0, 0, k, 32, len(y)))
t = time.time(); out, _ = tr.sub_run(pop, x, y, sched, keys, div, jnp.zeros(n)); jax.block_until_ready(out); print("compile+run", time.time() - t)
ts = []
for r in range(3):
  t = time.time(); out, _ = tr.sub_run(out, x, y, sched, keys, div, jnp.zeros(n)); jax.block_until_ready(out); ts.append(time.time() - t)
print(name, n, "prov-steps/s", n * k / np.median(ts))
