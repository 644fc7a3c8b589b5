"""Ray actors and the Ray-facing glue (the launcher, coordinator, workers); ``elastic_moe.actors``."""

if __name__ != "elastic_moe.actors":  # imported as a top-level `actors`: a name this project does not own
    from elastic_moe._namespace import hand_over_top_level_name

    hand_over_top_level_name(__name__, __path__[0])
