"""Entry points for ``ray job submit`` (train, prepare_data, export); ``elastic_moe.jobs``."""

if __name__ != "elastic_moe.jobs":  # imported as a top-level `jobs`: a name this project does not own
    from elastic_moe._namespace import hand_over_top_level_name

    hand_over_top_level_name(__name__, __path__[0])
