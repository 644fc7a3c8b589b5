"""elastic_moe: elastic training of DeepSeek-V3-style MoE models on Ray.

One import namespace for the whole project; see :mod:`elastic_moe._namespace` for how the
repository's top-level ``kernels/``, ``actors/`` and ``jobs/`` folders become
``elastic_moe.kernels``, ``elastic_moe.actors`` and ``elastic_moe.jobs``.
"""

from elastic_moe._namespace import install_checkout_finder

install_checkout_finder()
