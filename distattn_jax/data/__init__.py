"""Data: every loader returns numpy batches; nothing here touches the network.

The loaders need only the core dependencies, except two research tasks that need the ``tasks`` extra
(``pip install 'distattn_jax[tasks]'``): ``mnist1d`` (the ``mnist1d`` package's generator) and the UCR
time-series sets (files in aeon's wheel); loading either without it is an error that says what to install."""
