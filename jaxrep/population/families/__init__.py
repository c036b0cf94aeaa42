"""The attack families, one per input modality: `image.IMAGE` and
`text.TEXT` (see `jaxrep.population.family`)."""
