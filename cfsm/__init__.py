"""CFSM: controllable face synthesis (generator, discriminator, loading released generators).

`adversarial_mix` (cfsm/attack.py) is the stage-2 step: adversarial style search + clean/synthetic mix.
"""
from .attack import adversarial_mix
from .loading import generator_from_state_dict, load_generator
from .networks import INPUT_SKIPS, Generator, MultiDiscriminator

__all__ = ["Generator", "MultiDiscriminator", "INPUT_SKIPS", "load_generator", "generator_from_state_dict",
           "adversarial_mix"]
