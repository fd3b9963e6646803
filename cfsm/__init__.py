"""CFSM: controllable face synthesis (generator, discriminator, loading released generators).

The adversarial mix used in stage-2 training lives in `cfsm/attack.py` (training stream) and is exported here as
`adversarial_mix` once it exists.
"""
from .loading import generator_from_state_dict, load_generator
from .networks import Generator, MultiDiscriminator

__all__ = ["Generator", "MultiDiscriminator", "load_generator", "generator_from_state_dict"]

# Training stream: add `from .attack import adversarial_mix` and "adversarial_mix" to __all__ below this line.
