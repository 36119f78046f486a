"""Methods on attention maps, one module per method. Importing this package registers the interventions."""

from vlmkit.attention.hooks import Intervention, intervention_names, make_intervention, register_intervention
from vlmkit.methods.carve import Carve, CarveResult  # noqa: F401  (CARVE pipeline; `carve()` lives in the module)
from vlmkit.methods.paint import PAINT  # noqa: F401  (registers "paint")
from vlmkit.methods.pai import PAI  # noqa: F401  (registers "pai")
from vlmkit.methods.vcd import VCD  # noqa: F401  (registers "vcd")
from vlmkit.methods.vhr import VHR, head_divergence  # noqa: F401  (registers "vhr")
from vlmkit.methods.var import VAR, discover_sink_dims  # noqa: F401  (registers "var")

__all__ = ["Intervention", "intervention_names", "make_intervention", "register_intervention"]
