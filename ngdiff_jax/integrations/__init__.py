"""Bridges to other tools' interfaces (application layer: the core never imports these).

* `ngdiff_jax.integrations.lm_harness`: our models as lm-evaluation-harness's ``ngdiff`` model
  (the optional extra ``lm-eval``).
"""
