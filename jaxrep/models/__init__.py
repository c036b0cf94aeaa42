"""Image and text models, chosen by name.

Modules, each importing only those above it:

  layers    matmul / convolution at explicit precision with per-provider
            operand rounding (float32, TF32, bf16 mantissa bits); convolution as patches x weights
  image     MLP, CNN, ResNet20
  text      TextCNN, TextTransformer
  registry  `Model` (pure init / apply / predict), `get_model`, the names

The public names of all of them are exported here.
"""

from jaxrep.models.image import CNN, MLP, ResNet20
from jaxrep.models.registry import (IMAGE_MODELS, MODELS, TEXT_MODELS, Model,
                                    get_model, num_params)
from jaxrep.models.text import TextCNN, TextTransformer
