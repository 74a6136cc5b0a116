"""Constants shared by the data pipeline, the model and the torch oracle: defined here once."""

IGNORE = -100  # label of positions the loss skips (the prompt, padding); torch's cross_entropy ignore_index
