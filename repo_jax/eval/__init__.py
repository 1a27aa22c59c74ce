"""Evaluation: multiple-choice tasks scored by log-likelihood, perplexity on a file,
and a RULER-style needle-in-a-haystack task (`python -m repo_jax.eval --help`)."""
from repo_jax.eval.niah import NiahSample, make_sample, make_samples
from repo_jax.eval.perplexity import perplexity
from repo_jax.eval.scoring import loglikelihoods, multiple_choice
from repo_jax.eval.tasks import TASKS, Example, load_examples

__all__ = ["TASKS", "Example", "NiahSample", "load_examples", "loglikelihoods", "make_sample",
           "make_samples", "multiple_choice", "perplexity"]
