"""Scoring a model, shared by training's periodic validation and the evaluation stage (which
both import it; it imports neither): validation loss and perplexity (loss), sampled text
(sampling), HellaSwag accuracy (hellaswag)."""
