"""Methods on attention maps, one module per method. Importing this package registers the interventions."""

from vlmkit.attention.hooks import Intervention, intervention_names, make_intervention, register_intervention

__all__ = ["Intervention", "intervention_names", "make_intervention", "register_intervention"]
